"""Built cells and the networks holding them survive pickling, torch.save and deepcopy.

A compiled cell pickles as its .cell source, its build arguments and its tensors, and is
compiled again on loading: the copy computes the same numbers, with the same dtype, mode,
scan, hyper-parameters and passes, and weights shared between directions stay shared.
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
    for got, want in zip(_outputs_and_grads(copy_, xs), _outputs_and_grads(net, xs)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for original, loaded in zip(net.modules(), copy_.modules()):
        assert type(loaded) is type(original)
        assert getattr(loaded, "scan_mode", None) == getattr(original, "scan_mode", None)


def test_a_cell_keeps_its_hypers_passes_mode_and_scan():
    spec = rnndsl.load_source(HYPER_CELL, "biased.cell")["biased"]
    cell = spec.build(3, 4, forget_bias=-2.0, disable=("derived_backward",)).double().eval()
    copy_ = pickle.loads(pickle.dumps(cell))
    assert copy_.forget_bias == -2.0 and not copy_.training
    assert not copy_._c._has_method("backward_sequence")
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
