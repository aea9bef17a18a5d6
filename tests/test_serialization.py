"""Built cells and the networks holding them survive pickling, torch.save and deepcopy.

A compiled cell pickles as its .cell source, its build arguments and its parameters, and is
compiled again on loading: the copy computes the same numbers, with the same dtype, mode,
scan, hyper-parameters and passes; frozen parameters stay frozen and tied ones tied; copying
draws no random numbers and repeats no warnings.
"""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import rnndsl

HYPER_CELL = """
cell biased(x[input]) -> h {
    hyper forget_bias = 1.0
    state h[hidden]
    param weight[hidden, input], recurrent[hidden, hidden]
    h' = tanh(weight @ x + recurrent @ h + forget_bias)
}
"""


def _reloaded(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _outputs_and_grads(module, xs):
    outputs = module(xs)[0]
    return (outputs, *torch.autograd.grad(outputs.sum(), list(module.parameters())))


@pytest.mark.parametrize("backend", ["script", "eager"])
@pytest.mark.parametrize("name", ["lstm", "mingru"])
def test_torch_save_of_a_network_loads_an_equal_network(name, backend):
    torch.manual_seed(0)
    net = rnndsl.make_recurrent(name, 3, [4, 5], backend=backend, save_hidden=False).double()
    copy_ = _reloaded(net)
    xs = torch.randn(7, 2, 3, dtype=torch.float64)
    for got, want in zip(_outputs_and_grads(copy_, xs), _outputs_and_grads(net, xs), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for original, loaded in zip(net.modules(), copy_.modules(), strict=True):
        assert type(loaded) is type(original)
        assert getattr(loaded, "scan_mode", None) == getattr(original, "scan_mode", None)


def test_a_cell_keeps_its_hypers_passes_mode_and_scan():
    spec = rnndsl.load_source(HYPER_CELL, "biased.cell")["biased"]
    cell = spec.build(3, 4, forget_bias=-2.0, derived_backward=False).double().eval()
    copy_ = pickle.loads(pickle.dumps(cell))
    assert copy_.forget_bias == -2.0 and not copy_.training
    assert not hasattr(type(copy_), "backward_sequence")
    state, x = (torch.randn(2, 4, dtype=torch.float64),), torch.randn(2, 3, dtype=torch.float64)
    torch.testing.assert_close(copy_(state, x)[1], cell(state, x)[1], rtol=0, atol=0)
    sequential = rnndsl.load_cell("mingru").build(3, 4, scan="sequential")
    assert pickle.loads(pickle.dumps(sequential)).scan_mode == "sequential"


def test_shared_weights_stay_shared():
    net = rnndsl.make_bidirectional("gru", 3, [4], share_weights=True, save_hidden=False)
    copy_ = _reloaded(net)
    assert len(list(copy_.parameters())) == len(list(net.parameters()))
    with torch.no_grad():
        next(copy_.parameters()).add_(1.0)  # one update reaches both directions, as in the original
    xs = torch.randn(5, 2, 3)
    _, backward = copy_(xs)[0].split(4, -1)
    flipped, _ = copy_(xs.flip(0))[0].split(4, -1)
    torch.testing.assert_close(backward, flipped.flip(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["script", "eager"])
def test_deepcopy_keeps_the_cell_class_and_its_checks(backend):
    cell = rnndsl.load_cell("mingru").build(3, 4, backend=backend)
    twin = copy.deepcopy(cell)
    assert type(twin) is type(cell) and twin.scan_mode == "parallel"
    assert twin.weight_z is not cell.weight_z and torch.equal(twin.weight_z, cell.weight_z)
    with pytest.raises(ValueError, match="expected input of shape"):
        twin((torch.zeros(2, 4),), torch.zeros(2, 5))


def _copies():
    return {"deepcopy": copy.deepcopy, "pickle": lambda m: pickle.loads(pickle.dumps(m)), "torch.save": _reloaded}


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("backend", ["script", "eager"])
def test_copies_keep_frozen_and_tied_parameters(backend, how):
    copier = _copies()[how]
    holder = torch.nn.Module()
    holder.cell = rnndsl.load_cell("gru").build(4, 4, backend=backend)
    holder.other = rnndsl.load_cell("gru").build(4, 4, backend=backend)
    holder.other.weight_hh = holder.cell.weight_hh  # tied across two cells
    holder.head = torch.nn.Linear(4, 12, bias=False)
    holder.head.weight = holder.cell.weight_ih  # tied with a plain module
    holder.cell.bias_ih.requires_grad_(False)  # frozen
    twin = copier(holder)
    assert twin.other.weight_hh is twin.cell.weight_hh and twin.head.weight is twin.cell.weight_ih
    assert len(list(twin.parameters())) == len(list(holder.parameters()))
    assert not twin.cell.bias_ih.requires_grad and twin.cell.weight_ih.requires_grad


@pytest.mark.parametrize("backend", ["script", "eager"])
def test_copies_draw_no_random_numbers_and_repeat_no_warnings(backend, recwarn):
    with pytest.warns(rnndsl.CellWarning):
        spec = rnndsl.load_source(HYPER_CELL.replace("    h' =", "    unused = tanh(h)\n    h' ="))["biased"]
    cell = spec.build(3, 4, backend=backend)
    recwarn.clear()
    torch.manual_seed(5)
    for copier in _copies().values():
        copier(cell)
    drawn = torch.rand(3)
    torch.manual_seed(5)
    torch.testing.assert_close(drawn, torch.rand(3))
    assert not [w for w in recwarn if issubclass(w.category, (rnndsl.CellWarning, DeprecationWarning))]


def test_an_eager_copy_keeps_buffers_hooks_and_attributes():
    cell = rnndsl.load_cell("gru").build(3, 4, backend="eager")
    cell.register_buffer("steps_seen", torch.tensor(7))
    cell.register_forward_hook(_count_calls)
    cell.note = "kept"
    for copier in _copies().values():
        twin = copier(cell)
        assert int(twin.steps_seen) == 7 and twin.note == "kept" and len(twin._forward_hooks) == 1


def _count_calls(module, inputs, outputs):  # module-level: hooks must pickle by name
    module.calls = getattr(module, "calls", 0) + 1


@pytest.mark.parametrize("backend", ["script", "eager"])
def test_a_shallow_copy_keeps_the_class_and_shares_the_parameters(backend):
    cell = rnndsl.load_cell("mingru").build(3, 4, backend=backend)
    twin = copy.copy(cell)
    assert type(twin) is type(cell) and twin.weight_z is cell.weight_z
    with pytest.raises(ValueError, match="expected input of shape"):
        twin((torch.zeros(2, 4),), torch.zeros(2, 5))


def test_a_parametrized_cell_refuses_pickling_as_torch_does():
    cell = rnndsl.load_cell("gru").build(3, 4, backend="eager")
    torch.nn.utils.parametrize.register_parametrization(cell, "weight_hh", _Doubled())
    with pytest.raises(RuntimeError, match="parametrized modules"):
        pickle.dumps(cell)


class _Doubled(torch.nn.Module):
    def forward(self, weight):
        return 2 * weight


@pytest.mark.parametrize("backend", ["script", "native", "eager"])
def test_a_traced_torchscript_copy_runs_at_any_length_or_is_refused(backend):
    """rnndsl.torchscript's copy, traced, holds each scripted cell's loop (or torch's op for a native
    layer), so it runs at a length it was not traced at; an eager cell has no kernel, and its trace
    would unroll the loop at the traced length (once a cryptic error at another): refused by name."""
    torch.manual_seed(0)
    net = rnndsl.make_recurrent("gru", 4, [5, 3], backend=backend, save_hidden=False)
    state = ((torch.zeros(3, 5),), (torch.zeros(3, 3),))
    if backend == "eager":
        with pytest.raises(ValueError, match=r"cell gru \(network.layers.0.cell\) runs on the eager backend"):
            rnndsl.torchscript(net)
        return
    traced = torch.jit.trace(rnndsl.torchscript(net), (torch.randn(6, 3, 4), state))
    xs = torch.randn(9, 3, 4)
    torch.testing.assert_close(traced(xs, state)[0], net(xs, state)[0])
