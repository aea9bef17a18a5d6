"""Tensor values with named sizes (matrix-valued states and heads): the language, its errors,
the IR, hoisting, the derived backward (gradcheck), pickling and the command line.

The stock cells built on them (linear_attention, retnet, gla, mamba2) are checked against
hand-written references in tests/test_zoo.py.
"""
from __future__ import annotations

import io
import pickle
from contextlib import redirect_stdout

import pytest
import torch

import rnndsl
from rnndsl.cli import main
from rnndsl.derived import DerivedSequence
from rnndsl.ir import Op, Phase, Size

BACKENDS = ["script", "eager"]

HEADS = """
cell heads(x[input]) -> y {
    size heads = 2
    size key = hidden / heads
    state S[heads, key, key], h[heads*key]
    param weight_q[heads*key, input], weight_k[heads*key, input]
    param R[heads, key, key], decay[heads], mix[heads, key, key]
    q = split(weight_q @ x, heads)
    k = split(weight_k @ x, heads)
    g = split(h, heads)
    r = tanh(R @ g + q)
    S' = sigmoid(decay) * S + outer(k, r) + transpose(S) @ mix
    n = sum_over(q * (r @ S'), key)
    m = max_over(q * r, key)
    y = join((q @ S') / (1 + abs(n) + abs(m)))
    h' = tanh(y)
}
"""


def _error(source: str) -> rnndsl.CellError:
    with pytest.raises(rnndsl.CellError) as caught:
        rnndsl.load_source(source, "bad.cell")
    return caught.value


def _cell(body: str, sizes: str = "size heads = 2\n    size key = 3") -> str:
    return f"""cell c(x[input]) -> y {{
    {sizes}
    state S[heads, key, key]
    param weight_k[heads*key, input]
    k = split(weight_k @ x, heads)
{body}
}}
"""


def test_sizes_are_polynomials_and_split_divides_symbolically():
    heads, key = Size.of("heads"), Size.of("key")
    assert str(heads * key * key + 2 * heads) == "2*heads + heads*key*key"
    assert (heads * key).over("heads") == key
    assert (heads * key + 1).over("heads") is None
    assert (heads * key).evaluate({"heads": 3, "key": 5}) == 15


def test_a_tensor_state_is_carried_flat_and_viewed_as_declared():
    spec = rnndsl.load_source(HEADS)["heads"]
    graph = spec.graph
    assert [str(d.shape) for d in graph.states] == ["[B, heads*key*key]", "[B, heads*key]"]
    nodes = graph.node_map()
    assert str(nodes["S_view"].shape) == "[B, heads, key, key]"
    assert nodes[graph.next_states[0]].op is Op.RESHAPE
    cell = spec.build(3, 4)  # key = hidden / heads = 2
    assert cell.state_sizes == [8, 4] and cell.key == 2
    assert "S_view = S.unflatten(-1, [self.heads, self.key, self.key])" in spec.code()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_of_every_tensor_op(backend, masked):
    """split, join, outer, transpose, sum_over, max_over, `@` as matrix-vector, vector-matrix and
    matrix-matrix (with a per-head parameter too), and the broadcast of [heads] over
    [heads, key, key]: through the derived backward on the script backend."""
    torch.manual_seed(0)
    cell = rnndsl.load_source(HEADS)["heads"].build(3, 4, backend, scan="sequential").double()
    for parameter in cell.parameters():
        torch.nn.init.uniform_(parameter, -0.5, 0.5)
    xs = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    state = [torch.randn(2, n, dtype=torch.float64, requires_grad=True) for n in cell.state_sizes]
    mask = torch.tensor([[True, True], [True, False], [False, True], [True, True]]) if masked else None

    if backend == "script":
        def function(xs, *tensors):
            return DerivedSequence.apply(cell, xs, mask, len(state), *tensors)
    else:
        def function(xs, *tensors):
            outputs, final = cell.forward_sequence(xs, tuple(tensors[:len(state)]), mask)
            return (outputs, *final)
    assert torch.autograd.gradcheck(function, [xs, *state, *cell.parameters()])


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_and_pickle(backend):
    torch.manual_seed(0)
    spec = rnndsl.load_cell("gla")
    cell = spec.build(3, 4, backend).double()
    eager = spec.build(3, 4, "eager").double()
    eager.load_state_dict(cell.state_dict())
    xs = torch.randn(5, 2, 3, dtype=torch.float64)
    want, _ = rnndsl.scan(eager, xs, (torch.zeros(2, cell.state_sizes[0], dtype=torch.float64),))
    got, _ = rnndsl.scan(cell, xs, (torch.zeros(2, cell.state_sizes[0], dtype=torch.float64),))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    again = pickle.loads(pickle.dumps(cell))
    copied, _ = rnndsl.scan(again, xs, (torch.zeros(2, cell.state_sizes[0], dtype=torch.float64),))
    torch.testing.assert_close(copied, want, rtol=0, atol=0)


def test_projections_are_hoisted_as_one_gemm_and_outer_products_stay_in_the_loop():
    graph = rnndsl.load_cell("gla").optimized()
    nodes = graph.node_map()
    products = [n for n in graph.nodes if n.op is Op.MATMUL and n.phase is Phase.PER_INPUT]
    assert len(products) == 1  # q, k, v, alpha and the gate: one GEMM over all steps
    assert nodes[products[0].inputs[0]].op is Op.CONCAT
    splits = [n for n in graph.nodes if n.op is Op.RESHAPE and nodes[n.inputs[0]].op is not Op.STATE
              and n.name in ("q", "k", "v")]
    assert {n.phase for n in splits} == {Phase.PER_INPUT}
    (outer,) = [n for n in graph.nodes if n.op is Op.OUTER]
    assert outer.phase is Phase.PER_STEP  # for all steps at once it would hold T*B*heads*key*value


@pytest.mark.parametrize("name", ["linear_attention", "retnet", "gla", "mamba2", "deltanet", "gated_deltanet",
                                  "mlstm", "slstm"])
def test_stock_tensor_cells_build_in_networks_from_two_sizes(name):
    torch.manual_seed(0)
    outputs, _ = rnndsl.make_recurrent(name, 5, [6, 6])(torch.randn(4, 3, 5))
    assert outputs.shape == (4, 3, 6)
    wide = rnndsl.make_recurrent(name, 5, [8], heads=4)
    outputs, _ = wide(torch.randn(2, 1, 5))
    assert outputs.shape == (2, 1, 8) and [m.heads for m in wide.modules() if hasattr(m, "heads")] == [4]


def test_size_formula_must_divide_at_build():
    with pytest.raises(ValueError, match="key defaults to .*hidden / heads.* = 5 / 2, which is not whole"):
        rnndsl.load_source(HEADS)["heads"].build(3, 5)
    assert rnndsl.load_source(HEADS)["heads"].build(3, 6, heads=3).key == 2


@pytest.mark.parametrize("body, line, column, words", [
    ("    S' = S + outer(k, k)\n    y = join(split(x, heads))", 8, 14,
     ["cannot split [input] into `heads` parts"]),
    ("    S' = S * join(k) + outer(k, k)\n    y = join(k)", 7, 10,
     ["multiplication of values of shapes [heads, key, key] and [heads*key]"]),
    ("    S' = S + outer(k, k)\n    y = join(sum_over(S', key))", 8, 14, ["several dims of size `key`"]),
    ("    S' = S + outer(k, k)\n    y = join(max_over(S', input))", 8, 14, ["max_over", "no dim of size `input`"]),
    ("    S' = S + outer(k, k) @ join(k)\n    y = join(k)", 7, 14, ["product `@` of shapes"]),
    ("    S' = S + k * S\n    y = join(split(k, 2))", 8, 23, ["takes the name of a size"]),
])
def test_shape_errors_point_at_the_expression(body, line, column, words):
    error = _error(_cell(body))
    assert (error.line, error.column) == (line, column), str(error)
    for word in words:
        assert word in error.message, str(error)


def test_broadcast_is_left_aligned_and_a_mismatch_names_both_shapes():
    error = _error(_cell("    param u[key]\n    S' = S + outer(k, k) * u\n    y = join(k)"))
    assert (error.line, error.column) == (8, 14)
    assert "[heads, key, key] and [key]" in error.message and "leading" in error.message


def test_division_of_sizes_only_in_a_default():
    error = _error("cell c(x[input]) -> h {\n    state h[hidden / 2]\n    h' = h + x\n}")
    assert (error.line, error.column) == (2, 13) and "divide only in a size's default" in error.message


def test_tensor_outputs_must_be_joined():
    error = _error(_cell("    S' = S + outer(k, k)\n    y = k"))
    assert "output `y` must be a per-example vector" in error.message


@pytest.mark.parametrize("stage", ["ir", "code", "dot", "backward"])
def test_command_line_shows_every_stage_of_a_tensor_cell(stage, tmp_path):
    path = tmp_path / "heads.cell"
    path.write_text(HEADS)
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["show", str(path), "--stage", stage]) == 0
    assert "S_view" in out.getvalue()


def test_a_general_reshape_and_sum_over_run_as_python_and_torchscript():
    """The derived backward's code runs as TorchScript (the zoo's tests), and as Python under
    torch.compile: sizes built with `list(...)` work in both."""
    from rnndsl.codegen.base import reshape_code
    namespace = {"torch": torch}
    code = reshape_code("g", 2, [Size.of(4), Size.of(3)])
    exec(f"def f(g: torch.Tensor):\n    return {code}\n", namespace)
    g = torch.randn(2, 3, 4)
    assert namespace["f"](g).shape == (2, 4, 3)
    spec = rnndsl.load_cell("linear_attention")
    assert "list(" in spec.backward_code()


TIED_MAXIMA = """
cell tied(x[input]) -> y {
    size heads = 2
    state h[heads*hidden]
    param weight[heads*hidden, input], bias[heads*hidden]
    m = max_over(split(relu(weight @ x + bias) + h, heads), hidden)
    h' = tanh(h + join(m * split(weight @ x, heads)))
    y = h'
}
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_over_splits_the_gradient_between_tied_maxima_as_torch_amax(backend):
    """relu's zeros tie for the maximum: the derived backward gives each tied element an equal share,
    as autograd through torch.amax does."""
    spec = rnndsl.load_source(TIED_MAXIMA)["tied"]
    derived = spec.build(3, 3, backend, scan="sequential").double()
    autograd = spec.build(3, 3, backend, scan="sequential", derived_backward=False).double()
    with torch.no_grad():
        derived.bias.fill_(-10.0)  # relu(.) is 0 everywhere
    autograd.load_state_dict(derived.state_dict())
    xs = torch.randn(4, 2, 3, dtype=torch.float64)
    # relu(.) + h is 0.5 in every unit at the first step: all tie for the maximum.
    state = (torch.full((2, derived.state_sizes[0]), 0.5, dtype=torch.float64, requires_grad=True),)
    grads = []
    for cell in (derived, autograd):
        outputs, final = rnndsl.scan(cell, xs, state)
        grads.append(torch.autograd.grad((outputs ** 2).sum(), [state[0], *cell.parameters()]))
    assert grads[0][0].abs().min() > 0
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert "amax" in spec.code()


SCALAR_AGAINST_TENSORS = """
cell scalar_decay(x[input]) -> y {
    size heads = 2
    state S[heads, hidden, hidden]
    param s, wk[heads*hidden, input], wv[heads*hidden, input], wq[heads*hidden, input]
    k = split(wk @ x, heads)
    S' = s * S + outer(k, split(wv @ x, heads))
    y = sum(join(split(wq @ x, heads) @ S')) * join(k @ S)
}
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_scalar_parameter_broadcasts_against_tensors_and_gets_its_gradient(backend):
    """A one-unit value (`param s`, a feature sum) against a tensor: every dim broadcasts, and the
    derived backward sums the gradient back over all of them."""
    spec = rnndsl.load_source(SCALAR_AGAINST_TENSORS)["scalar_decay"]
    derived = spec.build(3, 2, backend, scan="sequential").double()
    autograd = spec.build(3, 2, backend, scan="sequential", derived_backward=False).double()
    autograd.load_state_dict(derived.state_dict())
    xs = torch.randn(4, 2, 3, dtype=torch.float64)
    state = (torch.randn(2, derived.state_sizes[0], dtype=torch.float64),)
    grads = []
    for cell in (derived, autograd):
        outputs, final = rnndsl.scan(cell, xs, state)
        grads.append(torch.autograd.grad((outputs ** 2).sum() + final[0].sum(), list(cell.parameters())))
    assert derived.s.shape == (1,)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
