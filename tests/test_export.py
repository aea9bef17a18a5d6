"""torch.export of cells and networks with a dynamic sequence length (rnndsl/codegen/scan.py).

Under export a cell's ``forward_sequence`` runs ``forward_sequence_scan``: the time loop as one
``scan`` node, so the exported program runs at any length. ``torch.nn.LSTM`` itself cannot be
exported so ("Constraints violated"): the drop-ins can.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import rnndsl
from rnndsl.resources import stock_cell_names

TOL = dict(rtol=1e-10, atol=1e-12)


def _sequence_length(minimum: int = 2) -> torch.export.Dim:
    return torch.export.Dim("T", min=minimum, max=1 << 20)


@pytest.mark.parametrize("name", stock_cell_names())
@pytest.mark.parametrize("backend", ["script", "eager"])
def test_scan_form_computes_what_the_loop_computes(name, backend):
    """The scan target against forward_sequence, every stock cell, with and without a mask (eager
    scan: no export needed to check the generated code)."""
    torch.manual_seed(0)
    size = 5 if name == "sru" else 4  # sru reads x[hidden]
    cell = rnndsl.load_cell(name).build(size, 5, backend=backend, scan="sequential").double().eval()
    python = cell._python_methods if backend == "script" else type(cell)
    view = rnndsl.twin.bound_view(cell) if backend == "script" else cell
    xs = torch.randn(6, 3, size, dtype=torch.float64)
    state = tuple(torch.randn(3, n, dtype=torch.float64) for n in cell.state_sizes)
    mask = torch.arange(6).unsqueeze(1) < torch.tensor([6, 2, 4]).unsqueeze(0)
    for m in (None, mask):
        want_outputs, want_state = cell.forward_sequence(xs, state, m)
        got_outputs, got_state = python.forward_sequence_scan(view, xs, state, m)
        torch.testing.assert_close(got_outputs, want_outputs, **TOL)
        for got, want in zip(got_state, want_state):
            torch.testing.assert_close(got, want, **TOL)


def test_export_runs_no_dynamo():
    """The scan op takes the generated step as it is (it closes over no tensor): no dynamo trace,
    whose cache would outlive the export, and export takes a fraction of the time."""
    from torch._dynamo.utils import counters
    counters.clear()
    module = rnndsl.GRU(3, 4, num_layers=2).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, (torch.randn(5, 2, 3),), dynamic_shapes=({0: _sequence_length()},))
    assert "scan" in str(program.graph)
    assert not counters["stats"]["unique_graphs"], dict(counters["stats"])


@pytest.mark.parametrize("name, backend", [("lstm", "script"), ("gru", "eager"), ("mingru", "script")])
def test_exported_network_runs_at_any_sequence_length(name, backend):
    torch.manual_seed(0)
    net = rnndsl.make_recurrent(name, 3, [5, 4], backend=backend, save_hidden=False).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(net, (torch.randn(6, 2, 3),), dynamic_shapes=({0: _sequence_length()},))
    assert "scan" in str(program.graph)  # one loop node, not the traced length unrolled
    for steps in (2, 3, 41):
        x = torch.randn(steps, 2, 3)
        torch.testing.assert_close(program.module()(x)[0], net(x)[0], rtol=1e-6, atol=1e-7)


def test_drop_in_exports_with_a_dynamic_length_where_torch_nn_cannot():
    torch.manual_seed(0)
    reference = nn.LSTM(3, 5, num_layers=2).eval()
    ours = rnndsl.LSTM(3, 5, num_layers=2).eval()
    ours.load_state_dict(reference.state_dict())
    example, dynamic = (torch.randn(6, 2, 3),), ({0: _sequence_length()},)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception, match="Constraints violated"):
            torch.export.export(reference, example, dynamic_shapes=dynamic)
        program = torch.export.export(ours, example, dynamic_shapes=dynamic)
    for steps in (3, 29):
        x = torch.randn(steps, 2, 3)
        output, (h, c) = program.module()(x)
        want, (want_h, want_c) = reference(x)
        torch.testing.assert_close(output, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c, want_c, rtol=1e-5, atol=1e-6)


class _Sequence(nn.Module):
    """A cell's forward_sequence as a module's forward, mask included, for export."""

    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, xs, h, mask):
        outputs, (final,) = self.cell.forward_sequence(xs, (h,), mask)
        return outputs, final


def test_exported_cell_takes_a_mask_of_any_length():
    torch.manual_seed(0)
    module = _Sequence(rnndsl.load_cell("rnn_tanh").build(3, 4)).eval()
    steps = _sequence_length()
    xs, h = torch.randn(5, 2, 3), torch.zeros(2, 4)
    mask = torch.ones(5, 2, dtype=torch.bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, (xs, h, mask), dynamic_shapes=({0: steps}, None, {0: steps}))
    xs = torch.randn(9, 2, 3)
    mask = torch.arange(9).unsqueeze(1) < torch.tensor([9, 4]).unsqueeze(0)
    for got, want in zip(program.module()(xs, h, mask), module(xs, h, mask)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("num_layers, bidirectional", [(2, False), (1, True), (2, True)])
def test_drop_in_exports_with_length_and_batch_both_dynamic(num_layers, bidirectional):
    """Layers of one cell class, each a scan over chunks of a sum (GRU's gates): the batch stays
    dynamic too (non-contiguous slices of the sum once made export fix it)."""
    torch.manual_seed(0)
    module = rnndsl.GRU(3, 4, num_layers=num_layers, bidirectional=bidirectional).eval()
    dynamic = ({0: _sequence_length(), 1: torch.export.Dim("batch")},)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, (torch.randn(5, 2, 3),), dynamic_shapes=dynamic)
    x = torch.randn(8, 6, 3)
    for got, want in zip(program.module()(x), module(x)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
