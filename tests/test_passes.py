"""Each compiler pass: the IR before and after, and unchanged numbers with any pass switched off."""
from __future__ import annotations

import itertools
import textwrap

import pytest
import torch

import rnndsl
from rnndsl.ir import Op, Phase
from rnndsl.spec import verify
from rnndsl.passes import PASS_NAMES, eliminate_common_subexpressions, eliminate_dead_code, \
    hoist_invariants, merge_matmuls, reassociate_sums

GATES = textwrap.dedent("""
    # An LSTM written gate by gate, as a user might.
    cell lstm_gates(x[input]) -> h {
        state h[hidden], c[hidden]
        param weight_ii[hidden, input], weight_if[hidden, input], weight_ig[hidden, input], weight_io[hidden, input]
        param weight_hi[hidden, hidden], weight_hf[hidden, hidden], weight_hg[hidden, hidden], weight_ho[hidden, hidden]
        param bias_i[hidden], bias_f[hidden], bias_g[hidden], bias_o[hidden]
        i = sigmoid(weight_ii @ x + weight_hi @ h + bias_i)
        f = sigmoid(weight_if @ x + weight_hf @ h + bias_f)
        g = tanh(weight_ig @ x + weight_hg @ h + bias_g)
        o = sigmoid(weight_io @ x + weight_ho @ h + bias_o)
        c' = f * c + i * g
        h' = o * tanh(c')
    }
""")


def ops(graph):
    return [n.op for n in graph.nodes if n.op.kind.value != "leaf"]


def test_reassociate_groups_terms_by_what_they_depend_on():
    graph = rnndsl.load_cell("lstm").graph
    before = graph.node_map()["add_2"]
    assert before.inputs == ("add_1", "bias_hh")  # ((W_ih x + b_ih) + W_hh h) + b_hh
    after = verify(reassociate_sums(graph))
    nodes = after.node_map()
    root = nodes["add_2"]
    first, last = (nodes[name] for name in root.inputs)
    assert last.op is Op.MATMUL and last.inputs == ("weight_hh", "h")   # the state term comes last
    assert set(nodes[first.inputs[0]].inputs) == {"bias_ih", "bias_hh"}  # the biases are summed first


def test_hoist_marks_what_can_leave_the_loop():
    graph = hoist_invariants(reassociate_sums(rnndsl.load_cell("lstm").graph))
    phases = {n.name: n.phase for n in graph.nodes if n.op.kind.value != "leaf"}
    assert phases["matmul"] is Phase.PER_INPUT          # W_ih @ x: one GEMM for all steps
    assert phases["matmul_1"] is Phase.PER_STEP         # W_hh @ h stays in the loop
    assert [n for n, p in phases.items() if p is Phase.ONCE]  # b_ih + b_hh, once per sequence
    code = rnndsl.load_cell("lstm").code()
    loop = code[code.index("for t in range"):]
    assert "weight_ih" not in loop and "bias_ih" not in loop


def test_merge_matmuls_makes_one_gemm_per_operand():
    spec = rnndsl.load_source(GATES)["lstm_gates"]
    before = spec.graph
    assert ops(before).count(Op.MATMUL) == 8
    after = verify(merge_matmuls(before))
    assert ops(after).count(Op.MATMUL) == 2
    assert ops(after).count(Op.SLICE) == 8
    assert {n.name for n in after.nodes if n.op is Op.PARAM} == {d.name for d in before.params}


def test_cse_and_dce():
    with pytest.warns(rnndsl.CellWarning, match="`unused` is assigned but never used"):
        spec = rnndsl.load_source(textwrap.dedent("""
            cell c(x[input]) -> h {
                state h[hidden]
                param W[hidden, input]
                a = sigmoid(W @ x)
                b = sigmoid(W @ x)
                unused = tanh(a)
                h' = a * b + h
            }"""))["c"]
    graph = eliminate_common_subexpressions(spec.graph)
    assert ops(graph).count(Op.SIGMOID) == 1 and ops(graph).count(Op.MATMUL) == 1
    assert Op.TANH in ops(graph)
    assert Op.TANH not in ops(eliminate_dead_code(graph))


def test_passes_are_recorded_and_printed():
    optimized = rnndsl.load_cell("lstm").optimized()
    assert optimized.passes == PASS_NAMES
    text = str(optimized)
    assert "passes  " + ", ".join(PASS_NAMES) in text
    assert "# every step" in text and "# for all steps at once (input only)" in text
    assert rnndsl.load_cell("lstm").optimized(disable=["hoist"]).passes == tuple(p for p in PASS_NAMES if p != "hoist")
    with pytest.raises(ValueError, match="unknown pass"):
        rnndsl.load_cell("lstm").optimized(disable=["nope"])


@pytest.mark.parametrize("disable", [()] + [(p,) for p in PASS_NAMES] + [PASS_NAMES])
def test_numbers_do_not_depend_on_the_passes(disable):
    spec = rnndsl.load_source(GATES)["lstm_gates"]
    torch.manual_seed(0)
    reference = spec.build(5, 6, backend="eager", disable=PASS_NAMES).double()
    cell = spec.build(5, 6, disable=disable).double()
    cell.load_state_dict(reference.state_dict())
    xs = torch.randn(7, 3, 5, dtype=torch.float64)
    state = (torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64))
    want = rnndsl.scan(reference, xs, state)
    got = rnndsl.scan(cell, xs, state)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    for a, b in itertools.chain(zip(got[1], want[1])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gate_by_gate_lstm_computes_the_stock_lstm():
    """After the passes the user's gate-by-gate LSTM equals cells/lstm.cell with stacked weights."""
    gates = rnndsl.load_source(GATES)["lstm_gates"].build(4, 3).double()
    stock = rnndsl.load_cell("lstm").build(4, 3).double()
    p = dict(gates.named_parameters())
    with torch.no_grad():
        stock.weight_ih.copy_(torch.cat([p[f"weight_i{g}"] for g in "ifgo"]))
        stock.weight_hh.copy_(torch.cat([p[f"weight_h{g}"] for g in "ifgo"]))
        stock.bias_ih.copy_(torch.cat([p[f"bias_{g}"] for g in "ifgo"]))
        stock.bias_hh.zero_()
    xs = torch.randn(6, 2, 4, dtype=torch.float64)
    state = (torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64))
    torch.testing.assert_close(rnndsl.scan(gates, xs, state)[0], rnndsl.scan(stock, xs, state)[0])


def test_join_slices_turns_the_gate_by_gate_lstm_into_the_stacked_one():
    graph = rnndsl.load_source(GATES)["lstm_gates"].optimized()
    step_adds = [n for n in graph.nodes if n.op is Op.ADD and n.phase is Phase.PER_STEP and n.name != "c_next"]
    assert len(step_adds) == 1  # one add of the whole [B, 4*hidden] per step, as cells/lstm.cell
    assert sum(n.op is Op.MATMUL for n in graph.nodes) == 2
    joined = [n for n in graph.nodes if n.op is Op.CONCAT and n.phase is Phase.ONCE]
    assert {tuple(n.inputs) for n in joined} >= {("bias_i", "bias_f", "bias_g", "bias_o")}
    assert "join_slices" not in rnndsl.load_source(GATES)["lstm_gates"].optimized(disable=["join_slices"]).passes
