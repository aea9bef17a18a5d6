"""PyTorch's module tests (``test/test_modules.py``) for the drop-ins, on every backend.

The cases are the wheel's own: ``module_db``'s entries for ``nn.RNN``, ``nn.GRU`` and
``nn.LSTM`` (``proj_size`` included), their ``module_inputs_func`` and
``module_error_inputs_func``, with ``rnndsl.RNN/GRU/LSTM`` swapped in. The checks are
torch's, written again here: forward against torch's module with the same weights and
against the inputs' own reference (an unbatched input run as a batch of one), factory
kwargs, a pickle round trip, ``gradcheck`` (with batched gradients apart),
``gradgradcheck`` and the error inputs. CPU, float64.
"""
from __future__ import annotations

import io
from typing import Callable

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

import rnndsl

# torch.testing._internal imports expecttest, which the test extras install.
common_modules = pytest.importorskip("torch.testing._internal.common_modules")

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)
OURS = {nn.RNN: rnndsl.RNN, nn.GRU: rnndsl.GRU, nn.LSTM: rnndsl.LSTM}
INFOS = [info for info in common_modules.module_db if info.module_cls in OURS]
BACKENDS = ["script", "eager", "native"]
CASES = [pytest.param(info, backend, id=f"{info.name}-{backend}") for info in INFOS for backend in BACKENDS]



def module_inputs(info, training: bool = True) -> list:
    return info.module_inputs_func(info, device="cpu", dtype=F64, requires_grad=True, training=training)


def build(info, module_input, backend: str, **factory) -> nn.Module:
    constructor = module_input.constructor_input
    return OURS[info.module_cls](*constructor.args, **constructor.kwargs, backend=backend, **factory)


def outputs(module: nn.Module, module_input) -> list:
    forward = module_input.forward_input
    return tree_flatten(module(*forward.args, **forward.kwargs))[0]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("info, backend", CASES)
def test_forward_matches_torch_and_the_reference(info, backend, training):
    for module_input in module_inputs(info, training):
        constructor = module_input.constructor_input
        reference = info.module_cls(*constructor.args, **constructor.kwargs, dtype=F64).train(training)
        ours = build(info, module_input, backend, dtype=F64).train(training)
        ours.load_state_dict(reference.state_dict())
        got = outputs(ours, module_input)
        torch.testing.assert_close(got, outputs(reference, module_input), **TOL)
        forward = module_input.forward_input
        expected = module_input.reference_fn(ours, *forward.args, **forward.kwargs)  # gets the parameters itself
        torch.testing.assert_close(got, tree_flatten(expected)[0], **TOL)


@pytest.mark.parametrize("info, backend", CASES)
def test_factory_kwargs(info, backend):
    for module_input in module_inputs(info):
        for factory in (dict(device="cpu", dtype=F64), dict(device="meta")):
            module = build(info, module_input, backend, **factory)
            for name, parameter in module.named_parameters():
                assert isinstance(parameter, nn.Parameter), name
                assert parameter.dtype == factory.get("dtype", torch.get_default_dtype()), name
                assert parameter.device.type == factory.get("device", "cpu"), name


@pytest.mark.parametrize("info, backend", CASES)
def test_a_forward_on_the_meta_device_gives_torchs_shapes(info, backend):
    """Shape inference: a module and its inputs on the meta device, as torch's module runs there."""
    def on_meta(args):
        return tree_map(lambda t: t.detach().to("meta") if isinstance(t, torch.Tensor) else t, args)

    for module_input in module_inputs(info):
        constructor, forward = module_input.constructor_input, module_input.forward_input
        args, kwargs = on_meta(forward.args), on_meta(forward.kwargs)
        reference = info.module_cls(*constructor.args, **constructor.kwargs, device="meta", dtype=F64)
        ours = build(info, module_input, backend, device="meta", dtype=F64)
        got, expected = tree_flatten(ours(*args, **kwargs))[0], tree_flatten(reference(*args, **kwargs))[0]
        assert [(t.shape, t.device.type) for t in got] == [(t.shape, t.device.type) for t in expected]


@pytest.mark.parametrize("info, backend", CASES)
def test_pickle_round_trip(info, backend):
    for module_input in module_inputs(info):
        module = build(info, module_input, backend, dtype=F64)
        buffer = io.BytesIO()
        torch.save(module, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert loaded.backend == backend
        torch.testing.assert_close(outputs(loaded, module_input), outputs(module, module_input), rtol=0, atol=0)


def check_gradients(info, backend: str, check: Callable[..., bool], **options) -> None:
    """torch's ``_test_gradients_helper``: ``check`` over the inputs and the parameters together,
    in training mode, perturbing the module's own parameters in place.

    In fast mode (a random projection of the Jacobian rather than all of it): the full one
    costs minutes over module_db's cases, and a wrong derivative shows in a random projection.
    """
    for module_input in module_inputs(info):
        module = build(info, module_input, backend, dtype=F64)
        forward = module_input.forward_input
        flat, spec = tree_flatten((forward.args, tuple(module.parameters())))

        def function(*tensors, spec=spec, module=module, forward=forward):
            args, _ = tree_unflatten(list(tensors), spec)
            return tuple(tree_flatten(module(*args, **forward.kwargs))[0])

        assert check(function, flat, fast_mode=True, **options)


@pytest.mark.parametrize("info, backend", CASES)
def test_gradcheck(info, backend):
    check_gradients(info, backend, torch.autograd.gradcheck, check_batched_grad=False)


@pytest.mark.parametrize("info, backend", CASES)
def test_gradcheck_of_batched_grads(info, backend):
    check_gradients(info, backend, torch.autograd.gradcheck, check_batched_grad=True)


@pytest.mark.parametrize("info, backend", CASES)
def test_gradgradcheck(info, backend):
    assert info.supports_gradgrad
    check_gradients(info, backend, torch.autograd.gradgradcheck)


@pytest.mark.parametrize("info, backend", CASES)
def test_error_inputs(info, backend):
    errors = info.module_error_inputs_func(info, device="cpu", dtype=F64, requires_grad=True, training=True)
    assert errors
    for error in errors:
        module_input = error.module_error_input
        if error.error_on == common_modules.ModuleErrorEnum.CONSTRUCTION_ERROR:
            with pytest.raises(error.error_type, match=error.error_regex):
                build(info, module_input, backend)
        else:
            module = build(info, module_input, backend)
            with pytest.raises(error.error_type, match=error.error_regex):
                outputs(module, module_input)
