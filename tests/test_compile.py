"""torch.compile of cells and networks: whole graphs (``fullgraph=True``), the same numbers as
eager (float64, 1e-10, values and gradients), the recurrence compiled once whatever the length.

Under torch.compile a cell's sequence is one opaque op (rnndsl/opaque.py) whose backward is
the derived one; the parallel scan is traced as it is. Most cases compile with the
``aot_eager`` backend, which runs dynamo and AOTAutograd as Inductor does but skips
Inductor's code generation around the op (seconds per case on two cores); one case per
kind of network runs Inductor itself.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnndsl
from rnndsl.resources import stock_cell_names

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # dynamo's notes on recompiling for new shapes
        yield


def _size(name: str) -> int:
    return 4 if name == "sru" else 3  # sru reads x[hidden]


def _compare(model: torch.nn.Module, run, inputs, backend: str = "aot_eager", dynamic=None) -> None:
    """``run(model, *inputs)``'s tensors and the gradients of their sum (inputs and parameters),
    compiled whole against eager."""
    results = {}
    for mode in ("compiled", "eager"):
        model.zero_grad()
        leaves = [None if t is None else t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
        call = torch.compile(run, backend=backend, fullgraph=True, dynamic=dynamic) if mode == "compiled" else run
        outputs = [t for t in torch.utils._pytree.tree_leaves(call(model, *leaves)) if isinstance(t, torch.Tensor)]
        sum(o.sum() for o in outputs if o.requires_grad).backward()
        grads = [t.grad for t in leaves if t is not None and t.requires_grad] + [p.grad for p in model.parameters()]
        results[mode] = outputs + grads
    assert len(results["compiled"]) == len(results["eager"])
    for got, want in zip(results["compiled"], results["eager"]):
        torch.testing.assert_close(got, want, **TOL)


def _network(model, xs, lengths):
    return model(xs, lengths=lengths)


@pytest.mark.parametrize("name", stock_cell_names())
@pytest.mark.parametrize("backend", ["script", "eager"])
def test_every_stock_cell_network_compiles_whole_and_matches_eager(name, backend):
    torch.manual_seed(0)
    net = rnndsl.make_recurrent(name, _size(name), [4, 4], backend=backend, save_hidden=False).double()
    if not all(getattr(m, "derived_backward_trains", True) for m in net.modules()):
        net.eval()  # cells with dropout draw noise in training, which compiled and eager would draw apart
    xs = torch.randn(5, 3, net.network.input_size, dtype=F64)  # a spatial cell's input: its images, flat
    _compare(net, _network, (xs, torch.tensor([5, 2, 4])))


def test_gla_compiles_where_its_decays_gradient_is_a_permuted_tensor():
    """gla wrote its decay as exp(-softplus(-z) / 16): at these sizes AOTAutograd's backward
    graph viewed softplus_backward's permuted result, which fails when it runs outside Inductor
    ("view size is not compatible"); logsigmoid, the same value, compiles."""
    torch.manual_seed(0)
    net = rnndsl.make_recurrent("gla", 8, [8], save_hidden=False).double()
    _compare(net, lambda model, xs: model(xs)[0], (torch.randn(5, 2, 8, dtype=F64),))


@pytest.mark.parametrize("name", ["retnet", "gla"])  # a decay per head, per key dim
def test_the_chunkwise_form_compiles_with_a_dynamic_length_over_padded_chunks(name):
    """70 steps: two chunks, the second padded. With a dynamic length, AOTAutograd's backward of the
    padding (F.pad then) came out, at run time, a view of a permuted gradient that its traced shapes
    took for contiguous, and raised ("view size is not compatible")."""
    torch.manual_seed(0)
    net = rnndsl.make_recurrent(name, 3, [4], save_hidden=False).double()
    _compare(net, lambda model, xs: model(xs)[0], (torch.randn(70, 2, 3, dtype=F64),), dynamic=True)


def _graphs(model, run, lengths) -> list:
    """The graphs dynamo makes, for each sequence length."""
    graphs = []
    for steps in lengths:
        torch._dynamo.reset()
        graphs.append([])

        def backend(graph_module, example_inputs, found=graphs[-1]):
            found.append(graph_module.graph)
            return graph_module.forward

        torch.compile(run, backend=backend, fullgraph=True, dynamic=False)(model, torch.randn(steps, 2, 3))
    return graphs


def _calls_the_op(graph) -> bool:
    """Whether a dynamo graph calls ``rnndsl::sequence`` (as the op, or its one overload)."""
    op = torch.ops.rnndsl.sequence
    return any(node.target in (op, op.default) for node in graph.nodes)


@pytest.mark.parametrize("name", ["lstm", "attention_rnn"])
@pytest.mark.parametrize("backend", ["script", "eager"])
def test_the_recurrence_is_one_op_whatever_the_length(name, backend):
    """Compiled at T=3 and at T=60 (no dynamic shapes), the graphs are the same size and call the
    op: the loop is not unrolled, for a cell with buffers (attention_rnn) too."""
    net = rnndsl.make_recurrent(name, 3, [4, 4], backend=backend, save_hidden=False)
    short, long = _graphs(net, lambda m, x: m(x)[0], (3, 60))
    assert [len(g.nodes) for g in short] == [len(g.nodes) for g in long] and len(short) == 1
    assert _calls_the_op(short[0])


@pytest.mark.parametrize("backend", ["script", "eager"])
def test_a_cell_with_buffers_compiles_to_the_op_and_matches_eager(backend):
    """The buffer reaches the op as an input, without a gradient: the value it holds now (not its
    default) drives the compiled sequence, forward and backward, as it drives eager."""
    torch.manual_seed(0)
    net = rnndsl.make_recurrent("attention_rnn", 3, [4, 4], backend=backend, save_hidden=False).double()
    for cell in (layer.cell for layer in net.network.layers):
        cell.sharpness.fill_(0.75)
    _compare(net, _network, (torch.randn(5, 3, 3, dtype=F64), torch.tensor([5, 2, 4])))
    (graph,), = _graphs(net.float(), lambda m, x: m(x)[0], (4,))
    assert _calls_the_op(graph)


@pytest.mark.parametrize("name", ["mingru", "qrnn"])
def test_the_parallel_scan_compiles(name):
    torch.manual_seed(0)
    net = rnndsl.make_recurrent(name, 3, [4], scan="parallel", save_hidden=False).double()
    _compare(net, _network, (torch.randn(6, 2, 3, dtype=F64), torch.tensor([6, 3])))


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("backend", ["script", "eager"])
def test_drop_ins_compile_whole_with_hx(kind, backend):
    torch.manual_seed(0)
    module = getattr(rnndsl, kind)(3, 4, num_layers=2, bidirectional=True, backend=backend, dtype=F64)

    def run(module, xs, h0):
        return module(xs, (h0, h0.tanh()) if kind == "LSTM" else h0)

    _compare(module, run, (torch.randn(5, 3, 3, dtype=F64), torch.randn(4, 3, 4, dtype=F64)))


def test_drop_ins_compile_packed_sequences_around_torchs_packing():
    """torch's pack_padded_sequence and pad_packed_sequence are marked for dynamo to skip, so a
    PackedSequence costs a graph break each way (torch 2.13): compiled, not whole."""
    torch.manual_seed(0)
    module = rnndsl.LSTM(3, 4, num_layers=2, dtype=F64)
    packed = pack_padded_sequence(torch.randn(5, 3, 3, dtype=F64), torch.tensor([5, 4, 2]))
    got, (h, c) = torch.compile(module, backend="aot_eager")(packed)
    want, (want_h, want_c) = module(packed)
    for a, b in ((got.data, want.data), (h, want_h), (c, want_c)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("cell", ["gru", "mingru", "retnet"])
def test_saved_hidden_state_carries_across_compiled_calls(cell):
    """The parallel scan's and the chunkwise form's final state is a view of the outputs, which a
    saved state kept as an alias AOTAutograd could not replay (the first call crashed). The last
    call has one step, which the op's shape function could not take (it ran the twin on two)."""
    torch.manual_seed(0)
    nets = [rnndsl.make_recurrent(cell, 3, [4, 4]).double() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    compiled = torch.compile(nets[0], backend="aot_eager", fullgraph=True)
    for steps in (4, 4, 1):
        xs = torch.randn(steps, 2, 3, dtype=F64)
        got, want = compiled(xs), nets[1](xs)
        torch.testing.assert_close(got[0], want[0], **TOL)


def test_scan_containers_and_bidirectional_networks_compile():
    torch.manual_seed(0)
    spec = rnndsl.load_cell("lstm")
    table = rnndsl.SequenceTable([rnndsl.RecurrentTable(spec.build(3, 4).double()),
                                  rnndsl.RecurrentTable(spec.build(4, 4, backend="eager").double())])
    state = tuple((torch.zeros(2, 4, dtype=F64), torch.zeros(2, 4, dtype=F64)) for _ in range(2))
    _compare(table, lambda m, xs: m(state, xs), (torch.randn(5, 2, 3, dtype=F64),))
    bidirectional = rnndsl.make_bidirectional("gru", 3, [4], save_hidden=False).double()
    _compare(bidirectional, _network, (torch.randn(5, 2, 3, dtype=F64), torch.tensor([5, 3])))


@pytest.mark.parametrize("backend", ["script", "eager"])
def test_inductor_compiles_a_drop_in_network(backend):
    """Inductor itself, around the op: forward and backward as eager."""
    torch.manual_seed(0)
    module = rnndsl.LSTM(3, 4, num_layers=2, backend=backend, dtype=F64)
    _compare(module, lambda m, xs: m(xs), (torch.randn(5, 2, 3, dtype=F64),), backend="inductor")


@pytest.mark.parametrize("backend", ["script", "eager"])
def test_inductor_compiles_a_cell_whose_gradients_are_expanded_views(backend):
    """A reduction's gradient is spread back as an expanded view; the op still hands Inductor
    the contiguous tensors its fake implementation promised (here the initial state's gradient)."""
    torch.manual_seed(0)
    spec = rnndsl.load_source("""
        cell spread(x[input]) -> h {
            state h[hidden]
            param W[hidden, input]
            h' = tanh(W @ x) + mean(h)
        }""")["spread"]
    cell = spec.build(3, 4, backend=backend).double()
    _compare(cell, lambda m, xs, h: m.forward_sequence(xs, (h,))[0],
             (torch.randn(5, 2, 3, dtype=F64), torch.randn(2, 4, dtype=F64)), backend="inductor")


def test_a_parametrized_cell_compiles():
    """A scripted cell is a plain module: a parametrization's tensor reaches the compiled op."""
    torch.manual_seed(0)
    net = rnndsl.make_recurrent("lstm", 3, [4], save_hidden=False).double()
    torch.nn.utils.parametrizations.weight_norm(net.network.layers[0].cell, "weight_hh")
    _compare(net, _network, (torch.randn(5, 2, 3, dtype=F64), None))


@pytest.mark.parametrize("backend", ["script", "eager"])
def test_the_compiled_backward_uses_the_forwards_hyper_parameters(backend):
    """A hyper-parameter changed between a compiled forward and its backward changed the gradient:
    the op's backward read it when it ran. Autograd of the eager loop keeps the forward's."""
    torch.manual_seed(0)
    spec = rnndsl.load_source("""
        cell clipped(x[input]) -> h {
            state h[hidden]
            param W[hidden, input], U[hidden, hidden]
            hyper clip = 0.5
            hyper p = 0.5
            h' = dropout(clamp(tanh(W @ x + U @ h) * 3, -clip, clip), p)
        }""")["clipped"]
    cell = spec.build(3, 4, backend=backend).double().eval()  # training with dropout takes autograd's loop
    xs, state = torch.randn(6, 2, 3, dtype=F64), (torch.zeros(2, 4, dtype=F64),)
    run = torch.compile(lambda xs, state: cell.forward_sequence(xs, state)[0], backend="aot_eager", fullgraph=True)
    grads = []
    for changed in (False, True):
        outputs = run(xs, state)
        if changed:
            cell.clip = 3.0
        grads.append(torch.autograd.grad(outputs.square().sum(), list(cell.parameters())))
        cell.clip = 0.5
    for before, after in zip(*grads):
        torch.testing.assert_close(after, before, **TOL)
    # A new value is read by the next compiled call, without compiling again: the values are read
    # when the op runs (as a trace constant, a schedule recompiled at every value, then ran eagerly).
    torch._dynamo.utils.counters.clear()
    for clip in (3.0, 0.25, 1.5):
        cell.clip = clip
        torch.testing.assert_close(run(xs, state), cell.forward_sequence(xs, state)[0], **TOL)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
