"""torch.export of cells and networks with a dynamic sequence length and batch (rnndsl/codegen/scan.py).

Under export a cell's ``forward_sequence`` runs ``forward_sequence_scan``: the time loop as one
``scan`` node, so the exported program runs at any length, with torch alone, and so do its
AOTInductor package and its ONNX graph (a ``Scan`` node). ``torch.nn.LSTM`` itself cannot be
exported so ("Constraints violated"): the drop-ins can.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils._pytree import tree_leaves, tree_map

import rnndsl
from rnndsl.resources import stock_cell_names

TOL = dict(rtol=1e-10, atol=1e-12)
F64 = torch.float64


def _sequence_length(minimum: int = 1) -> torch.export.Dim:
    return torch.export.Dim("T", min=minimum, max=1 << 20)


def _batch() -> torch.export.Dim:
    return torch.export.Dim("B", min=1, max=1 << 16)


def _export(module: nn.Module, args: tuple, dynamic_shapes, kwargs=None) -> torch.export.ExportedProgram:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes on the prototype scan op
        return torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes)


def _assert_same(got, want, **tolerance) -> None:
    """Two nested results (outputs and states) equal leaf by leaf."""
    got, want = tree_leaves(got), tree_leaves(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **(tolerance or TOL))


def _assert_scan_form_computes_what_the_loop_computes(spec: rnndsl.CellSpec, size: int, backend: str) -> None:
    """The scan target against forward_sequence, with and without a mask (eager scan: no export
    needed to check the generated code)."""
    torch.manual_seed(0)
    hyper = {"heads": 5} if spec.name == "slstm" else {}  # its head_dim = hidden / heads must be whole
    cell = spec.build(size, 5, backend=backend, scan="sequential", **hyper).double().eval()
    python = cell._python_methods if backend == "script" else type(cell)
    view = rnndsl.twin.bound_view(cell) if backend == "script" else cell
    xs = torch.randn(6, 3, cell.input_size, dtype=F64)  # a spatial cell's input: its channels' images, flat
    state = tuple(torch.randn(3, n, dtype=F64) for n in cell.state_sizes)
    mask = torch.arange(6).unsqueeze(1) < torch.tensor([6, 2, 4]).unsqueeze(0)
    for m in (None, mask):
        want_outputs, want_state = cell.forward_sequence(xs, state, m)
        got_outputs, got_state = python.forward_sequence_scan(view, xs, state, m)
        _assert_same((got_outputs, got_state), (want_outputs, want_state))


@pytest.mark.parametrize("name", stock_cell_names())
@pytest.mark.parametrize("backend", ["script", "eager"])
def test_scan_form_computes_what_the_loop_computes(name, backend):
    """Every stock cell (attention_rnn reads a buffer, lstm_cell_clip a number computed once)."""
    _assert_scan_form_computes_what_the_loop_computes(rnndsl.load_cell(name), 5 if name == "sru" else 4, backend)


@pytest.mark.parametrize("backend", ["script", "eager"])
def test_scan_step_takes_buffers_as_inputs_and_numbers_from_the_method(backend):
    """Buffers named as the step's own locals (`keep`) or `self` come in as the scan op's inputs,
    under fresh names: a buffer the step closed over would reach the op as a real tensor among
    its fake ones. Numbers computed once from hyper-parameters (`-sigmoid(k)`) are Python floats,
    which the op refuses as inputs: the step reads them from the method around it."""
    spec = rnndsl.load_source(textwrap.dedent("""
        cell edge(x[input]) -> h {
            state h[hidden]
            param W[hidden, input], U[hidden, hidden]
            buffer keep[hidden] = 0.5, self[] = 2.0
            hyper k = 3.0
            h' = clamp(tanh(W @ x + U @ (keep * h) * self), -sigmoid(k), k * 0.5)
        }
        """))["edge"]
    step = spec.scan_code().split("def one_step")[1].split("time_scan")[0]
    assert "self." not in step, step
    _assert_scan_form_computes_what_the_loop_computes(spec, 3, backend)


def test_export_runs_no_dynamo():
    """The scan op takes the generated step as it is (it closes over no tensor): no dynamo trace,
    whose cache would outlive the export, and export takes a fraction of the time."""
    from torch._dynamo.utils import counters
    counters.clear()
    program = _export(rnndsl.GRU(3, 4, num_layers=2).eval(), (torch.randn(5, 2, 3),), ({0: _sequence_length()},))
    assert "scan" in str(program.graph)
    assert not counters["stats"]["unique_graphs"], dict(counters["stats"])


@pytest.mark.parametrize("name", stock_cell_names())
@pytest.mark.parametrize("backend", ["script", "eager"])
def test_every_stock_cell_exports_with_a_dynamic_length_and_batch(name, backend):
    """Two layers, each one scan node; the program at other lengths and batches equals the module."""
    torch.manual_seed(0)
    hyper = {"proj": 3} if name == "lstm_proj" else {"heads": 5} if name == "slstm" else {}
    net = rnndsl.make_recurrent(name, 5, [5, 5], backend=backend, save_hidden=False, **hyper).double().eval()
    features = net.network.input_size  # a spatial cell's input: its channels' images, flat
    program = _export(net, (torch.randn(6, 3, features, dtype=F64),), ({0: _sequence_length(), 1: _batch()},))
    assert str(program.graph).count("torch.ops.higher_order.scan") == 2  # not the traced length unrolled
    for steps, batch in ((1, 1), (11, 4)):
        x = torch.randn(steps, batch, features, dtype=F64)
        _assert_same(program.module()(x), net(x))


@pytest.mark.parametrize("cls, options", [
    (rnndsl.LSTM, dict(num_layers=2)),
    (rnndsl.LSTM, dict(bidirectional=True, batch_first=True, proj_size=2)),
    (rnndsl.GRU, dict(num_layers=2, bidirectional=True)),
    (rnndsl.RNN, dict(num_layers=2, nonlinearity="relu", batch_first=True)),
])
def test_drop_ins_export_with_a_dynamic_length_and_batch(cls, options):
    """The program equals torch.nn's own module at other lengths and batches. (Layers over chunks
    of a sum, GRU's gates: non-contiguous slices of the sum once made export fix the batch.)"""
    torch.manual_seed(0)
    reference = getattr(nn, cls.__name__)(3, 4, **options).double().eval()
    ours = cls(3, 4, **options).double().eval()
    ours.load_state_dict(reference.state_dict())
    time_dim, batch_dim = (1, 0) if options.get("batch_first") else (0, 1)
    dynamic = ({time_dim: _sequence_length(), batch_dim: _batch()},)
    program = _export(ours, (torch.randn(5, 2, 3, dtype=F64),), dynamic)
    for steps, batch in ((1, 1), (9, 6)):
        shape = (batch, steps, 3) if options.get("batch_first") else (steps, batch, 3)
        x = torch.randn(*shape, dtype=F64)
        _assert_same(program.module()(x), reference(x))


def test_torch_nn_lstm_cannot_export_with_a_dynamic_length():
    """The contrast: torch.nn.LSTM's fused op fixes the length it was traced at (torch 2.13)."""
    with pytest.raises(Exception, match="Constraints violated"):
        _export(nn.LSTM(3, 5, num_layers=2).eval(), (torch.randn(6, 2, 3),), ({0: _sequence_length(2)},))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_network_exports_with_lengths(bidirectional):
    """``lengths`` (one per sequence: the batch Dim) under export: the mask is made in the program,
    and a bidirectional layer reverses each sequence within its own length."""
    torch.manual_seed(0)
    make = rnndsl.make_bidirectional if bidirectional else rnndsl.make_recurrent
    net = make("gru", 3, [4, 4], save_hidden=False).double().eval()
    batch = _batch()
    program = _export(net, (torch.randn(6, 3, 3, dtype=F64),), {"x": {0: _sequence_length(), 1: batch},
                                                                "lengths": {0: batch}},
                      kwargs={"lengths": torch.tensor([6, 2, 4])})
    for steps, lengths in ((2, [1, 2]), (9, [9, 1, 4, 7, 3])):
        x, lengths = torch.randn(steps, len(lengths), 3, dtype=F64), torch.tensor(lengths)
        _assert_same(program.module()(x, lengths=lengths), net(x, lengths=lengths))
    # nan in the padding reaches no output: zero past each end, as the module gives
    padding = torch.arange(9)[:, None] >= lengths
    _assert_same(program.module()(x.masked_fill(padding[..., None], float("nan")), lengths=lengths),
                 net(x.masked_fill(padding[..., None], 0.0), lengths=lengths))
    with pytest.raises(RuntimeError, match=r"lengths must be whole numbers of steps in \[1, T\]"):
        program.module()(torch.randn(4, 2, 3, dtype=F64), lengths=torch.tensor([4, 5]))


def test_every_steps_state_exports_with_a_dynamic_length():
    """``return_all_states``: the Python loop that keeps each step's state is one scan node too."""
    torch.manual_seed(0)
    net = rnndsl.make_recurrent("lstm", 3, [4, 4], save_hidden=False, return_all_states=True).double().eval()
    batch = _batch()
    program = _export(net, (torch.randn(6, 3, 3, dtype=F64),), {"x": {0: _sequence_length(), 1: batch},
                                                                "lengths": {0: batch}},
                      kwargs={"lengths": torch.tensor([6, 2, 4])})
    for steps, lengths in ((1, [1]), (9, [9, 1, 4, 7, 3])):
        x, lengths = torch.randn(steps, len(lengths), 3, dtype=F64), torch.tensor(lengths)
        _assert_same(program.module()(x, lengths=lengths), net(x, lengths=lengths))


@pytest.mark.parametrize("backend", ["script", "eager"])
def test_deep_cell_exports_as_one_scan(backend):
    """A SequenceTable of cells run depth-first by one RecurrentTable: no forward_sequence, so the
    Python loop, which under export is one scan node over both cells (rnndsl/scan.py)."""
    torch.manual_seed(0)
    cells = [rnndsl.load_cell(name).build(size, hidden, backend=backend)
             for name, size, hidden in (("lstm", 3, 5), ("gru", 5, 4))]
    deep = rnndsl.RecurrentTable(rnndsl.SequenceTable(cells))
    net = rnndsl.setup_recurrent(deep, save_hidden=False).double().eval()
    batch = _batch()
    program = _export(net, (torch.randn(6, 3, 3, dtype=F64),), {"x": {0: _sequence_length(), 1: batch},
                                                                "lengths": {0: batch}},
                      kwargs={"lengths": torch.tensor([6, 2, 4])})
    assert str(program.graph).count("torch.ops.higher_order.scan") == 1
    for steps, lengths in ((1, [1]), (11, [11, 3, 8, 1])):
        x, lengths = torch.randn(steps, len(lengths), 3, dtype=F64), torch.tensor(lengths)
        _assert_same(program.module()(x, lengths=lengths), net(x, lengths=lengths))


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
    program = _export(module, (xs, h, mask), ({0: steps}, None, {0: steps}))
    xs = torch.randn(9, 2, 3)
    mask = torch.arange(9).unsqueeze(1) < torch.tensor([9, 4]).unsqueeze(0)
    _assert_same(program.module()(xs, h, mask), module(xs, h, mask), rtol=1e-6, atol=1e-7)


def test_saved_program_runs_where_rnndsl_cannot_be_imported(tmp_path):
    """``torch.export.save``, then ``load`` in a Python without rnndsl on its path (``-S``: no
    site, so no editable install either; only torch's folder added back)."""
    torch.manual_seed(0)
    module = rnndsl.LSTM(3, 4, num_layers=2, bidirectional=True).double().eval()
    program = _export(module, (torch.randn(5, 2, 3, dtype=F64),), ({0: _sequence_length(), 1: _batch()},))
    torch.export.save(program, str(tmp_path / "lstm.pt2"))
    x = torch.randn(13, 3, 3, dtype=F64)
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.path.append({os.path.dirname(os.path.dirname(torch.__file__))!r})
        try:
            import rnndsl
        except ModuleNotFoundError:
            pass
        else:
            raise AssertionError("rnndsl is importable: " + rnndsl.__file__)
        import torch
        output, (h, c) = torch.export.load("lstm.pt2").module()(torch.load("x.pt"))
        torch.save([output, h, c], "result.pt")
    """)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    subprocess.run([sys.executable, "-I", "-S", "-c", script], cwd=tmp_path, env=env, check=True, timeout=120)
    _assert_same(torch.load(tmp_path / "result.pt"), module(x))


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="AOTInductor needs a C++ compiler")
def test_aoti_package_runs_at_a_new_length_and_batch(tmp_path):
    """The one AOTInductor compile of the suite (~10 s): lengths, two layers, T and batch dynamic.
    Inductor turns each scan into a while loop whose buffers it sizes from the op's inputs, so the
    batch symbol rides along as one (rnndsl/kernels.py, ``time_scan``)."""
    torch.manual_seed(0)
    net = rnndsl.make_recurrent("lstm", 3, [5, 4], save_hidden=False).eval()
    batch = _batch()
    program = _export(net, (torch.randn(6, 3, 3),), {"x": {0: _sequence_length(), 1: batch}, "lengths": {0: batch}},
                      kwargs={"lengths": torch.tensor([6, 2, 4])})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "lstm.pt2"))
    compiled = torch._inductor.aoti_load_package(path)
    for steps, lengths in ((2, [2, 1]), (41, [41, 3, 17, 40, 1, 9, 22])):
        x, lengths = torch.randn(steps, len(lengths), 3), torch.tensor(lengths)
        _assert_same(compiled(x, lengths=lengths), net(x, lengths=lengths), rtol=1e-5, atol=1e-6)


def test_onnx_graph_holds_a_scan_and_runs_at_two_lengths():
    """``torch.onnx.export(..., dynamo=True)`` turns each scan node into an ONNX ``Scan``: the graph
    runs in onnxruntime at any length and batch."""
    pytest.importorskip("onnx", reason="ONNX export needs onnx (pip install rnndsl[onnx])")
    pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript (pip install rnndsl[onnx])")
    onnxruntime = pytest.importorskip("onnxruntime", reason="running ONNX needs onnxruntime (pip install rnndsl[onnx])")
    torch.manual_seed(0)
    module = rnndsl.LSTM(3, 5, num_layers=2).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(module, (torch.randn(6, 2, 3),), dynamo=True, verbose=False,
                                         dynamic_shapes=({0: _sequence_length(), 1: _batch()},))
    operators = [node.op_type for node in onnx_program.model_proto.graph.node]
    assert operators.count("Scan") + operators.count("Loop") == 2, operators
    session = onnxruntime.InferenceSession(onnx_program.model_proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    for steps, batch in ((2, 1), (23, 4)):
        x = torch.randn(steps, batch, 3)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        _assert_same([torch.from_numpy(a) for a in got], module(x), rtol=1e-5, atol=1e-6)


def test_a_saved_hidden_state_cannot_be_exported():
    """save_hidden=True carries a batch-sized tensor between calls: refused, naming both ways out."""
    net = rnndsl.make_recurrent("gru", 3, [4])
    with pytest.raises(ValueError, match=r"save_hidden=False.*or pass the state explicitly"):
        _export(net, (torch.randn(5, 2, 3),), ({0: _sequence_length()},))
    state = net.initialize_hidden(2)
    net.initialize_hidden(7)
    program = _export(net, (torch.randn(5, 2, 3), state),
                      ({0: _sequence_length()}, tree_map(lambda _: None, state)))
    assert tree_leaves(net.hidden)[0].size(0) == 7  # the traced state was not saved on the module
    x = torch.randn(8, 2, 3)
    _assert_same(program.module()(x, state), net(x, state), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("module", [rnndsl.GRU(3, 4), rnndsl.make_recurrent("gru", 3, [4], save_hidden=False)],
                         ids=["drop-in", "network"])
def test_a_packed_sequence_cannot_be_exported(module):
    packed = pack_padded_sequence(torch.randn(5, 2, 3), torch.tensor([5, 3]))
    with pytest.raises(ValueError, match="torch.export cannot take a PackedSequence.*padded"):
        _export(module.eval(), (packed,), None)


def test_a_length_outside_the_declared_range_names_the_bound():
    """torch's own guard is clear: it names the input, the dim and the bound."""
    program = _export(rnndsl.GRU(3, 4).eval(), (torch.randn(5, 2, 3),),
                      ({0: torch.export.Dim("T", min=2, max=64)},))
    with pytest.raises(AssertionError, match=r"input.size\(\)\[0\] <= 64"):
        program.module()(torch.randn(65, 2, 3))


def test_native_backend_networks_and_drop_ins_export_their_cells_code():
    """torch's fused kernel would fix the program at the example's length, and packs lengths as
    data: under export the native backend runs its cells' generated code."""
    torch.manual_seed(0)
    net = rnndsl.make_recurrent("gru", 3, [4, 4], backend="auto", save_hidden=False).double().eval()
    assert net.backend == "native"
    lengths = torch.tensor([5, 2, 4])
    program = _export(net, (torch.randn(5, 3, 3, dtype=F64),),
                      {"x": {0: _sequence_length(), 1: _batch()}, "lengths": {0: _batch()}}, {"lengths": lengths})
    xs, lengths = torch.randn(9, 4, 3, dtype=F64), torch.tensor([9, 1, 4, 7])
    _assert_same(program.module()(xs, lengths=lengths), net(xs, lengths=lengths))
    lstm = rnndsl.LSTM(3, 4, num_layers=2, backend="native", dtype=F64).eval()
    program = _export(lstm, (torch.randn(5, 3, 3, dtype=F64),), ({0: _sequence_length(), 1: _batch()},))
    _assert_same(program.module()(xs), lstm(xs))


TWO_OUTPUTS = """
cell two(x[input]) -> y, z {
    state h[hidden]
    param W[hidden, input], U[hidden, hidden], b[hidden]
    h' = tanh(W @ x + U @ h + b)
    y = h'
    z = sigmoid(h') * 2.0
}
"""


def test_stepped_cells_with_several_outputs_export_and_strict_export_works(tmp_path):
    """A deep cell (several cells in one RecurrentTable) is stepped through its call: one with two
    outputs failed in the export loop's where(); strict=True failed in torch's scan op."""
    (tmp_path / "two.cell").write_text(TWO_OUTPUTS)
    torch.manual_seed(0)
    deep = rnndsl.setup_recurrent(rnndsl.RecurrentTable(rnndsl.SequenceTable(
        [rnndsl.load_cell("lstm").build(3, 5), rnndsl.load_cell(tmp_path / "two.cell").build(5, 4)])),
        save_hidden=False).double().eval()
    program = _export(deep, (torch.randn(6, 2, 3, dtype=F64),), ({0: _sequence_length()},))
    xs = torch.randn(9, 2, 3, dtype=F64)
    _assert_same(program.module()(xs), deep(xs))
    net = rnndsl.make_recurrent("mingru", 3, [4, 4], save_hidden=False).double().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(net, (torch.randn(5, 3, 3, dtype=F64),),
                                      dynamic_shapes=({0: _sequence_length()},), strict=True)
    xs = torch.randn(9, 3, 3, dtype=F64)
    _assert_same(program.module()(xs), net(xs))


class _MaskedBidirectional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = rnndsl.Bidirectional(rnndsl.RecurrentTable(rnndsl.load_cell("gru").build(3, 4)))

    def forward(self, xs, mask):
        state = ((xs.new_zeros(xs.size(1), 4),), (xs.new_zeros(xs.size(1), 4),))
        return self.layer(state, xs, mask)[1]


def test_an_exported_bidirectional_layer_refuses_a_mask_with_a_gap_when_it_runs():
    module = _MaskedBidirectional().eval()
    prefix = torch.tensor([[True, True], [True, False], [True, False]])
    program = _export(module, (torch.randn(3, 2, 3), prefix), None)
    torch.testing.assert_close(program.module()(torch.ones(3, 2, 3), prefix), module(torch.ones(3, 2, 3), prefix))
    gapped = torch.tensor([[True, True], [False, True], [True, True]])
    with pytest.raises(RuntimeError, match="Bidirectional needs a mask True on a prefix"):
        program.module()(torch.ones(3, 2, 3), gapped)


class _TwoOutputUserCell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 4)

    def forward(self, state, x):
        h = torch.tanh(self.linear(x) + state[0])
        return (h,), (h, 2 * h)


class _ScanUserCell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cell = _TwoOutputUserCell()

    def forward(self, xs, h):
        outputs, final = rnndsl.scan(self.cell, xs, (h,))
        return outputs, final[0]


def test_a_user_cell_with_two_outputs_exports_strictly():
    """The loop body recorded whether the cell gave several outputs, a side effect dynamo refuses."""
    module = _ScanUserCell().double()
    xs, h = torch.randn(5, 2, 3, dtype=F64), torch.zeros(2, 4, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, (xs, h), dynamic_shapes=({0: _sequence_length(2)}, None), strict=True)
    xs = torch.randn(8, 2, 3, dtype=F64)
    _assert_same(program.module()(xs, h), module(xs, h))
