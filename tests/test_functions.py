"""The language's everyday functions, one small cell each, against hand-written PyTorch.

For every function: the cell compiles on both backends; one step and a sequence (through
``rnndsl.scan``) agree in float64 with a reference written directly in torch, outputs and
gradients with respect to the input, the state and every parameter; and
``torch.autograd.gradcheck`` holds for the derived backward. Subgradients (max, min, clamp,
where) follow torch's conventions, so they equal autograd of the reference. Then the errors:
each misuse is a CellError at its line and column.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict

import pytest
import torch
import torch.nn.functional as F

import rnndsl
from rnndsl.cellspec import load_source
from rnndsl.derived import DerivedSequence
from rnndsl.errors import CellError
from rnndsl.networks import uniform_weights
from rnndsl.options import CELL_BACKENDS as BACKENDS

TOLERANCE = dict(rtol=1e-10, atol=1e-12)


def cell_source(*lines: str) -> str:
    """A one-state cell with a pre-activation ``a`` that depends on the input and the state."""
    return "\n".join(["cell f(x[input]) -> h {", "  state h[hidden]", "  param W[hidden, input], U[hidden, hidden]",
                      *(f"  {line}" for line in lines), "}", ""])


def _number(function, value: float) -> float:
    """A torch function of a number, in float64."""
    return function(torch.tensor(value, dtype=torch.float64)).item()


def pre(p, h, x):
    return x @ p["W"].t() + h @ p["U"].t()


# name -> (lines of the cell after `a = W @ x + U @ h`, the next h from (params, a, h, x))
CASES: Dict[str, tuple] = {
    "gelu": (["h' = gelu(a)"], lambda p, a, h, x: F.gelu(a)),
    "elu": (["h' = elu(a)"], lambda p, a, h, x: F.elu(a)),
    "selu": (["h' = selu(a)"], lambda p, a, h, x: torch.selu(a)),
    "mish": (["h' = mish(a)"], lambda p, a, h, x: F.mish(a)),
    "logsigmoid": (["h' = logsigmoid(a)"], lambda p, a, h, x: F.logsigmoid(a)),
    "hardtanh": (["h' = hardtanh(3 * a)"], lambda p, a, h, x: F.hardtanh(3 * a)),
    "hardsigmoid": (["h' = hardsigmoid(6 * a)"], lambda p, a, h, x: F.hardsigmoid(6 * a)),
    "softsign": (["h' = softsign(a)"], lambda p, a, h, x: F.softsign(a)),
    "sin_cos": (["h' = sin(a) * cos(h)"], lambda p, a, h, x: torch.sin(a) * torch.cos(h)),
    "log1p_expm1": (["h' = log1p(sigmoid(a)) + expm1(tanh(h))"],
                    lambda p, a, h, x: torch.log1p(torch.sigmoid(a)) + torch.expm1(torch.tanh(h))),
    "erf": (["h' = erf(a)"], lambda p, a, h, x: torch.erf(a)),
    "power": (["hyper k = 1.5", "h' = tanh(tanh(a) ** 2 + pow(sigmoid(h), k) - 0.5 * sigmoid(a) ** -1)"],
              lambda p, a, h, x: torch.tanh(torch.tanh(a) ** 2 + torch.sigmoid(h) ** 1.5
                                            - 0.5 * torch.sigmoid(a) ** -1)),
    "max_min": (["h' = max(tanh(a), h) + min(a, U @ h)"],
                lambda p, a, h, x: torch.maximum(torch.tanh(a), h) + torch.minimum(a, h @ p["U"].t())),
    "max_min_number": (["h' = max(a, 0.1) - min(-0.2, h)"],
                       lambda p, a, h, x: torch.clamp(a, min=0.1) - torch.clamp(h, max=-0.2)),
    "clamp": (["h' = clamp(a, -0.5, 0.25) + clamp(h, -1, 1)"],
              lambda p, a, h, x: torch.clamp(a, -0.5, 0.25) + torch.clamp(h, -1, 1)),
    "where": (["h' = where(a > h, tanh(a), h) + where(a <= 0.1, 0.0, a) + where(0.2 >= h, h, 1.0)"
               " - where(h < a, a, h)"],
              lambda p, a, h, x: (torch.where(a > h, torch.tanh(a), h) + torch.where(a <= 0.1, 0.0, a)
                                  + torch.where(0.2 >= h, h, 1.0) - torch.where(h < a, a, h))),
    "sum_mean": (["h' = tanh(a - mean(a) + 0.1 * sum(h))"],
                 lambda p, a, h, x: torch.tanh(a - a.mean(-1, keepdim=True) + 0.1 * h.sum(-1, keepdim=True))),
    "softmax": (["h' = softmax(a) + 0.5 * h"], lambda p, a, h, x: torch.softmax(a, -1) + 0.5 * h),
    "logsumexp": (["h' = tanh(a - logsumexp(a)) * logsumexp(x)"],
                  lambda p, a, h, x: torch.tanh(a - torch.logsumexp(a, -1, keepdim=True))
                  * torch.logsumexp(x, -1, keepdim=True)),
    "scalar_params": (["param s, g[] = 0.5", "h' = tanh(s * a + g) * mean(h) + s"],
                      lambda p, a, h, x: torch.tanh(p["s"] * a + p["g"]) * h.mean(-1, keepdim=True) + p["s"]),
    "buffer": (["buffer ones[hidden] = 1.0, decay = 0.5", "h' = tanh(a) * ones + decay * h"],
               lambda p, a, h, x: torch.tanh(a) + 0.5 * h),
    "numbers_folded": (["hyper k = 0.3", "h' = sigmoid(k) * tanh(a) + exp(-k) * h + gelu(k) + max(k, 0.5)"
                        " + clamp(sqrt(k), 0.0, 0.5) + softplus(log(k)) * elu(-k) ** 2"],
                       lambda p, a, h, x: (_number(torch.sigmoid, 0.3) * torch.tanh(a)
                                           + math.exp(-0.3) * h + _number(F.gelu, 0.3) + 0.5
                                           + min(math.sqrt(0.3), 0.5)
                                           + _number(F.softplus, math.log(0.3)) * math.expm1(-0.3) ** 2)),
}


def load(source: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rnndsl.CellWarning)
        return load_source(source)["f"]


def spec_of(name: str):
    lines, _ = CASES[name]
    return load(cell_source("a = W @ x + U @ h", *lines))


def reference_step(name: str, params, h, x):
    return CASES[name][1](params, pre(params, h, x), h, x)


def _drawn_cell(name: str, backend: str, steps: int, seed: int):
    """Case ``name`` built with parameters drawn from ``seed``, and a (steps, 2, 3) sequence, a
    (2, 4) state and a mask drawn from ``seed + 1``: ``(cell, parameter values, xs, h, mask)``."""
    cell = spec_of(name).build(3, 4, backend, scan="sequential").double()
    generator = torch.Generator().manual_seed(seed)
    values = {key: 0.5 * torch.randn(p.shape, generator=generator, dtype=torch.float64)
              for key, p in cell.named_parameters()}
    with torch.no_grad():
        for key, parameter in cell.named_parameters():
            parameter.copy_(values[key])
    generator = torch.Generator().manual_seed(seed + 1)
    xs = torch.randn(steps, 2, 3, generator=generator, dtype=torch.float64)
    h = torch.randn(2, 4, generator=generator, dtype=torch.float64)
    mask = torch.rand(steps, 2, generator=generator) < 0.7
    return cell, values, xs, h, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_function_matches_torch(name: str, backend: str):
    cell, values, xs, h0, mask = _drawn_cell(name, backend, steps=5, seed=1)

    def ours(xs, h, params):
        return rnndsl.scan(cell, xs, (h,), mask)

    def theirs(xs, h, params):
        outputs = []
        for t in range(xs.size(0)):
            new = reference_step(name, params, h, xs[t])
            h = torch.where(mask[t].unsqueeze(1), new, h)
            outputs.append(new * mask[t].unsqueeze(1))
        return torch.stack(outputs), (h,)

    results = []
    for function, params in ((ours, dict(cell.named_parameters())),
                             (theirs, {k: v.clone().requires_grad_() for k, v in values.items()})):
        x, h = xs.clone().requires_grad_(), h0.clone().requires_grad_()
        outputs, (final,) = function(x, h, params)
        weights = torch.Generator().manual_seed(3)
        loss = sum((r * torch.randn(r.shape, generator=weights, dtype=r.dtype)).sum() for r in (outputs, final))
        grads = torch.autograd.grad(loss, [x, h, *params.values()])
        results.append([outputs, final, *grads])
        # One step, as the cell's forward.
        if function is ours:
            step = cell((h0,), xs[0])[1]
        else:
            step = reference_step(name, params, h0, xs[0])
        results[-1].append(step)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **TOLERANCE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [{}, {"derived_backward": False}])
def test_hardtanh_on_its_bound_has_torchs_gradient_at_every_call(backend, options):
    """hardtanh(h + 1) from a zero state sits on the bound, where torch's gradient is 0. The script
    backend gave 1 from the second call on: TorchScript's autodiff (which runs from its second call)
    differentiates aten::hardtanh as a clamp."""
    cell = load(cell_source("h' = W @ x + hardtanh(h + 1)")).build(3, 4, backend, **options).double()
    x = torch.randn(1, 2, 3, dtype=torch.float64)
    for _ in range(4):
        for run in (lambda h: cell((h,), x[0])[0][0], lambda h: rnndsl.scan(cell, x, (h,))[1][0]):
            h = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
            assert torch.autograd.grad(run(h).sum(), h)[0].abs().max() == 0


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradcheck_of_the_derived_backward(name: str):
    cell, _, xs, h, mask = _drawn_cell(name, "script", steps=3, seed=4)
    cell.eval()

    def function(xs, *tensors):
        return DerivedSequence.apply(cell, xs, mask, 1, *tensors)

    arguments = [xs.requires_grad_(True), h.requires_grad_(True), *cell.parameters()]
    assert torch.autograd.gradcheck(function, arguments)


# Errors: each at its line and column (line 4 is `a = W @ x + U @ h`, the lines follow it).
@pytest.mark.parametrize("line, position, words", [
    ("h' = max(h)", (5, 8), "`max` takes 2 arguments, got 1"),
    ("h' = sum(h, a)", (5, 8), "`sum` takes 1 argument, got 2"),
    ("h' = where(h, a, h)", (5, 8), "where's first argument must be a mask"),
    ("h' = where(a > h, 1.0, 0.0)", (5, 8), "where of two numbers"),
    ("h' = a ** h", (5, 8), "the exponent of `**` must be a number"),
    ("h' = pow(a, x)", (5, 8), "the exponent of `**` must be a number"),
    ("h' = clamp(a, h, 1.0)", (5, 8), "clamp's lower bound must be a number"),
    ("h' = (a > h) * h", (5, 8), "multiplication of a mask"),
    ("h' = tanh(a > 0)", (5, 8), "tanh of a mask"),
    # Ops that checked no operand for a mask (bool != float at the first call, silent 0/1 arithmetic):
    ("h' = tanh(U @ (a > h))", (5, 13), "matmul of a mask"),
    ("h' = dropout(a > h, 0.1)", (5, 8), "dropout of a mask"),
    ("h' = tanh(a) + sum(concat(a > h, a))", (5, 22), "concat of a mask"),
    ("h' = sum(2.0) * a", (5, 8), "sum takes a vector, got a number"),
    ("h' = a + (1.0 < 2.0)", (5, 13), "a comparison of two numbers"),
    ("h' = a > h", (5, 3), "the next value of state `h` is a mask"),
])
def test_misuse_is_an_error_at_its_position(line, position, words):
    with pytest.raises(CellError) as error:
        load(cell_source("a = W @ x + U @ h", line))
    assert words in error.value.message
    assert (error.value.line, error.value.column) == position


def test_a_mask_is_read_by_where_alone_through_views_and_as_an_output():
    """split, transpose and sum_over passed a mask on as a value (join(split(m)) * 2.0 computed on
    0/1, sum_over gave int64), and a mask output came out bool."""
    viewed = ("cell v(x[input]) -> h {\n  size heads = 2\n  state h[heads*hidden]\n  param W[heads*hidden, input]\n"
              "  h' = tanh(join(split(W @ x > 0.0, heads)) * 2.0 + h)\n}\n")
    with pytest.raises(CellError, match="reshape of a mask") as error:
        load(viewed)
    assert (error.value.line, error.value.column) == (5, 18)  # at split(...)
    with pytest.raises(CellError, match="output `y` is a mask"):
        load(cell_source("a = W @ x + U @ h", "h' = tanh(a)", "y = h' > 0.0").replace("-> h", "-> y"))


def test_comparisons_do_not_chain_and_bind_below_arithmetic():
    with pytest.raises(CellError) as error:
        load(cell_source("a = W @ x + U @ h", "h' = where(0 < a < 1, a, h)"))
    assert (error.value.line, error.value.column) == (5, 20)
    graph = load(cell_source("a = W @ x + U @ h", "h' = where(a + 1 > h * 2, -a ** 2, h)")).graph
    ops = [node.op.label for node in graph.nodes]
    assert ops.index("neg") > ops.index("pow")  # -a ** 2 is -(a ** 2), as in Python


def test_a_number_written_over_two_lines_is_quoted_as_one():
    spec = load(cell_source("hyper k = -2.0", "h' = tanh(W @ x) * sqrt(", "    k)"))
    with pytest.raises(ValueError, match=r"the number `sqrt\( k\)` at <string>:5:22"):
        spec.build(3, 4)


@pytest.mark.parametrize("number, words", [
    ("sqrt(-1.0)", r"the number `sqrt\(-1.0\)` at <string>:5:22 \(`h' = tanh\(W @ x\) \* sqrt\(-1.0\)`\) cannot be "
                   r"computed \(math domain error\)"),
    ("(1.0 / 0.0)", "cannot be computed"), ("exp(1000.0)", "cannot be computed"), ("10.0 ** 400", "cannot be computed"),
    ("log(k)", r"`log\(k\)` at <string>:5:22 .* cannot be computed \(math domain error\) with k=-2.0")])
def test_a_number_that_is_not_finite_is_refused_at_build(number, words):
    """Python's math raises (the eager backend's first call) where TorchScript gives nan or inf: both
    backends refuse the build instead, naming the equation and quoting the number as written (it
    named the IR's node, `sqrt`)."""
    spec = load(cell_source("hyper k = -2.0", f"h' = tanh(W @ x) * {number}"))
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=words):
            spec.build(3, 4, backend=backend)


@pytest.mark.parametrize("bounds, words", [("-k, k", "lower bound 2 above its upper bound -2, which makes every "
                                                      "value -2 with k=-2.0"), ("1.0, -1.0", "lower bound 1 above")])
def test_a_clamp_whose_bounds_cross_is_refused_at_build(bounds, words):
    """torch's clamp with min > max gives max everywhere: a cell clipped by a negative hyper
    (lstm_cell_clip's cell_clip=-1) computed a constant, silently."""
    spec = load(cell_source("hyper k = -2.0", f"h' = clamp(tanh(W @ x) + h, {bounds})"))
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=r"clamp at <string>:5:\d+ .*" + words):
            spec.build(3, 4, backend=backend)
    if "k" in bounds:
        spec.build(3, 4, k=2.0)  # the same cell with bounds in order


@pytest.mark.parametrize("function", ["sigmoid", "silu"])
def test_numbers_far_below_zero_do_not_overflow(function):
    """`sigmoid(k)` of a hyper-parameter k = -1000 is 0 (Python's exp(1000) would overflow)."""
    spec = load(cell_source("hyper k = -1000.0", f"h' = tanh(W @ x) + {function}(k) * h"))
    x, h = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    results = []
    for backend in BACKENDS:
        cell = spec.build(3, 4, backend=backend).double()
        if results:
            cell.load_state_dict(results[0][1])
        results.append((cell((h,), x)[1], cell.state_dict()))
    expected = torch.tanh(x @ results[0][1]["W"].t())
    for got, _ in results:
        torch.testing.assert_close(got, expected, **TOLERANCE)


def test_scalar_parameters_and_buffers_in_the_module():
    source = cell_source("param s, g[] = 2.0", "buffer ones[hidden] = 1.0, table[hidden, input] = 0.5",
                         "h' = tanh(W @ x + s * (table @ x) + U @ h) * ones + g")
    cell = load(source).build(3, 4)
    assert dict(cell.named_parameters())["s"].shape == (1,) and cell.g.item() == 2.0
    assert {name for name, _ in cell.named_buffers()} == {"ones", "table"}
    assert "ones" not in dict(cell.named_parameters()) and "ones" in cell.state_dict()
    uniform_weights(cell)
    assert torch.equal(cell.ones, torch.ones(4)) and torch.equal(cell.table, torch.full((4, 3), 0.5))
    double = cell.double()
    assert double.ones.dtype == torch.float64
    with torch.no_grad():
        double.ones.mul_(2.0)  # a buffer changed in place: the kernel reads the same tensor
    x, h = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    eager = load(source).build(3, 4, "eager").double()
    eager.load_state_dict(double.state_dict())
    torch.testing.assert_close(double((h,), x)[1], eager((h,), x)[1])


def test_a_cell_with_new_constructs_pickles_and_hoists():
    import pickle
    spec = load(cell_source("buffer ones[hidden] = 1.0", "param s",
                            "a = softmax(W @ x) * ones + s", "h' = tanh(a + U @ h) + max(sum(a), 0.0)"))
    cell = spec.build(3, 4).double()
    clone = pickle.loads(pickle.dumps(cell))
    assert torch.equal(clone.ones, cell.ones)
    x, h = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(clone((h,), x)[1], cell((h,), x)[1])
    optimized = rnndsl.compile.optimized(spec.graph, rnndsl.options.BuildOptions())
    per_input = {node.op.label for node in optimized.nodes if node.phase.name == "PER_INPUT"}
    assert {"softmax", "sum", "clamp_min"} <= per_input  # input-only work leaves the loop


def test_show_prints_every_stage_of_a_cell_with_new_constructs(tmp_path, capsys):
    from rnndsl import cli
    path = tmp_path / "f.cell"
    path.write_text(CELL_WITH_EVERYTHING)
    for stage in ("ast", "ir", "code", "backward", "scan"):
        assert cli.main(["show", str(path), "--stage", stage]) == 0
    out = capsys.readouterr().out
    assert "buffers ones: [hidden]" in out and "where(" in out and "math.exp(-self.k)" in out


CELL_WITH_EVERYTHING = cell_source("param s", "buffer ones[hidden] = 1.0", "hyper k = 0.5",
                                   "a = W @ x + U @ h",
                                   "h' = where(a > 0, softmax(a), sigmoid(k) * ones) * s + clamp(h, -1, 1) ** 2")
