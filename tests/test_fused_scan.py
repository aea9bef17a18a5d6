"""The fused kernels (rnndsl/codegen/fused.py, rnndsl/fused_scan.py): a linear recurrence's
coefficient math and its scan as one generated C++ loop, opt-in with use_cpu_kernel(). Each test
checks that the kernel ran (or did not), then compares with the compiled time loop and its derived
backward: values and gradients."""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rnndsl
from rnndsl import fused_scan
from rnndsl.cli import main as cli_main
from rnndsl.linear_scan import use_cpu_kernel
from strategies import DrawnCell, linear_cells

# Every op with a C++ rule, the leaves of every kind: slices of one GEMM (strided views), a
# parameter vector (broadcast over steps and batch), a hyper-parameter (a number), constants.
EVERY_OP = """
cell every_op(x[input]) -> y {
    state h[hidden], c[hidden]
    param W[4*hidden, input], bias[4*hidden], decay[hidden]
    hyper k = 0.5
    p, q, r, s = chunk(W @ x + bias, 4)
    h' = sigmoid(p) / (1 + exp(-relu(q))) * h + silu(r) - log(softplus(s) + 1)
    c' = decay * c + tanh(-p) * k + 0.25
    y = h' * c'
}
"""

# The input itself is a leaf (no GEMM): the kernel reads the caller's tensor.
ELEMENTWISE_INPUT = """
cell elementwise(x[hidden]) -> y {
    state h[hidden]
    h' = sigmoid(x) * h + tanh(x)
    y = h'
}
"""


@pytest.fixture
def fused(monkeypatch, at_least_two_threads):
    """use_cpu_kernel() on for one test, and the fused kernels' forward and backward calls counted."""
    if not use_cpu_kernel():
        pytest.skip("the C++ kernels do not build here")
    calls = {"forward": 0, "backward": 0}
    for name in calls:
        original = getattr(fused_scan.FusedKernel, name)

        def counted(self, *args, _name=name, _original=original):
            calls[_name] += 1
            return _original(self, *args)
        monkeypatch.setattr(fused_scan.FusedKernel, name, counted)
    yield calls
    use_cpu_kernel(False)


def loop_and_parallel(spec, input_size: int, hidden: int, dtype=torch.float64):
    loop = spec.build(input_size, hidden, scan="sequential").to(dtype)
    parallel = spec.build(input_size, hidden, scan="parallel").to(dtype)
    parallel.load_state_dict(loop.state_dict())
    return loop, parallel


def run(cell, xs, state, mask=None):
    """Outputs, final state, and the gradients of a weighted sum of both."""
    xs = xs.clone().requires_grad_(True)
    state = tuple(s.clone().requires_grad_(True) for s in state)
    outputs, final = rnndsl.scan(cell, xs, state, mask)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)  # a cell may have several
    loss = sum((s * s).sum() for s in final)
    for output in outputs:
        loss = loss + (output * torch.linspace(-1, 1, output.numel(), dtype=output.dtype).view_as(output)).sum()
    wrt = [xs, *state, *cell.parameters()]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)  # a drawn cell may leave a parameter unused
    return [*outputs, *final, *(torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt))]


def assert_all_close(got, want, tolerance: float = 1e-10) -> None:
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)


def inputs(cell, steps: int, batch: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(steps, batch, cell.input_size, dtype=dtype, generator=g)
    return xs, tuple(torch.randn(batch, size, dtype=dtype, generator=g) for size in cell.state_sizes)


@pytest.mark.parametrize("name", ["mingru", "minlstm", "qrnn"])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# 300 units: two blocks of the kernel's 256, the second a partial vector
@given(steps=st.integers(1, 40), batch=st.integers(1, 4), hidden=st.sampled_from([1, 5, 17, 300]),
       seed=st.integers(0, 2**16))
def test_stock_cells_fused_equal_the_loop(fused, name, steps, batch, hidden, seed):
    loop, parallel = loop_and_parallel(rnndsl.load_cell(name), 3, hidden)
    xs, state = inputs(loop, steps, batch, seed)
    want = run(loop, xs, state)
    before = dict(fused)
    got = run(parallel, xs, state)
    assert fused["forward"] == before["forward"] + 1 and fused["backward"] == before["backward"] + 1
    assert_all_close(got, want)


def test_every_op_and_leaf_kind_fused_equals_the_loop(fused):
    spec = rnndsl.load_source(EVERY_OP, "every_op.cell")["every_op"]
    loop, parallel = loop_and_parallel(spec, 3, 6)
    source = "\n".join(spec.fused_sources())
    for op in ("exp()", "log()", "tanh()", "clamp_min", "log1p()", "neg()", " / "):
        assert op in source
    xs, state = inputs(loop, 25, 3, 0)
    state = (state[0], state[1].abs() + 0.5)
    want = run(loop, xs, state)
    got = run(parallel, xs, state)
    assert fused == {"forward": 2, "backward": 2}  # one kernel per state
    assert_all_close(got, want)


RATIO = """
cell ratio(x[input]) -> y {
    state h[hidden]
    param W[2*hidden, input]
    p, q = chunk(W @ x, 2)
    h' = 0.5 * h + p / q
    y = h'
}
"""


@pytest.mark.parametrize("scale", [1e-23, 1e20])
def test_the_gradient_of_a_quotient_holds_at_extreme_magnitudes(fused, scale):
    """The kernel's rule squared the divisor, which overflows (or underflows) in float32 where the
    quotient is O(1): nan, inf or a row of zeros in the weight's gradient, where the loop is right."""
    loop, parallel = loop_and_parallel(rnndsl.load_source(RATIO, "ratio.cell")["ratio"], 3, 4, torch.float32)
    xs, state = inputs(loop, 5, 2, 0, torch.float32)
    want = run(loop, xs * scale, state)
    got = run(parallel, xs * scale, state)
    assert fused == {"forward": 1, "backward": 1}
    for a, b in zip(got, want, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_float32_fused_stays_close_to_float64(fused):
    loop, parallel = loop_and_parallel(rnndsl.load_cell("mingru"), 8, 40)
    xs, state = inputs(loop, 300, 4, 1)
    want = run(loop, xs, state)
    got = run(parallel.float(), xs.float(), tuple(s.float() for s in state))
    assert fused == {"forward": 1, "backward": 1}
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_a_mask_takes_the_torch_ops(fused):
    loop, parallel = loop_and_parallel(rnndsl.load_cell("qrnn"), 3, 4)
    xs, state = inputs(loop, 12, 3, 2)
    mask = torch.arange(12)[:, None] < torch.tensor([12, 5, 9])[None, :]
    assert_all_close(run(parallel, xs, state, mask), run(loop, xs, state, mask))
    assert fused == {"forward": 0, "backward": 0}


def test_double_backward_says_to_switch_the_kernel_off(fused):
    _, parallel = loop_and_parallel(rnndsl.load_cell("mingru"), 3, 4)
    xs, state = inputs(parallel, 5, 2, 3)
    xs.requires_grad_(True)
    outputs, _ = rnndsl.scan(parallel, xs, state)
    with pytest.raises(RuntimeError, match=r"no double backward.*use_cpu_kernel\(False\)"):
        torch.autograd.grad(outputs.sum(), xs, create_graph=True)


def test_a_kernel_that_does_not_build_warns_and_the_torch_ops_run(fused, monkeypatch):
    def broken(source):
        raise OSError("no compiler")
    monkeypatch.setattr(fused_scan, "_build", broken)
    # A cell of its own: its kernel has not been built by another test.
    spec = rnndsl.load_source(EVERY_OP.replace("every_op", "unbuilt"), "unbuilt.cell")["unbuilt"]
    loop, parallel = loop_and_parallel(spec, 3, 4)
    xs, state = inputs(loop, 7, 2, 4)
    state = (state[0], state[1].abs() + 0.5)
    with pytest.warns(RuntimeWarning, match="no compiler"):
        got = run(parallel, xs, state)
    assert_all_close(got, run(loop, xs, state))
    assert fused == {"forward": 0, "backward": 0}


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(linear_cells(), st.integers(1, 4), st.integers(1, 3), st.integers(1, 9))
def test_random_linear_cells_fused_equal_the_loop(fused, cell: DrawnCell, hidden, batch, steps):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unused values are legal
        spec = rnndsl.load_source(cell.source, "fuzz.cell")[cell.name]
    loop, parallel = loop_and_parallel(spec, 3, hidden)
    loop.eval(), parallel.eval()  # no dropout draws, which the two would make differently
    xs, state = inputs(loop, steps, batch, 5)
    want = run(loop, xs, state)
    before = fused["forward"]
    got = run(parallel, xs, state)
    assert fused["forward"] - before == len(spec.fused_sources())
    assert_all_close(got, want, 1e-9)


def test_show_prints_the_kernel_or_why_there_is_none(capsys):
    assert cli_main(["show", "mingru", "--stage", "fused"]) == 0
    source = capsys.readouterr().out
    assert "// h' = a * h + b, a = sub, b = mul_1" in source and 'extern "C" void rnndsl_backward' in source
    assert cli_main(["show", "lstm", "--stage", "fused"]) == 0
    assert "cell lstm has no fused kernel" in capsys.readouterr().out


@pytest.mark.parametrize("columns", [(0, 4), (6, 2), (0, 2)], ids=["disjoint", "reversed", "overlapping"])
def test_leaves_cut_from_one_tensor_get_its_gradient(fused, columns):
    """The pieces of one tensor go in as that tensor, their gradients written into one buffer of its
    shape (zeros where no piece lies); overlapping pieces go in apart, or their writes would clobber."""
    (kernel,) = rnndsl.load_cell("mingru").build(3, 4, scan="parallel").fused_kernels  # z, then the candidate
    g = torch.Generator().manual_seed(6)
    whole = torch.randn(9, 2, 10, dtype=torch.float64, generator=g, requires_grad=True)
    s0 = torch.randn(2, 4, dtype=torch.float64, generator=g, requires_grad=True)

    z_in, candidate = (whole[..., c:c + 4] for c in columns)
    got = fused_scan.fused_linear_recurrence(kernel, [z_in, candidate], s0, 9, split_from=[whole])
    sources = len(got.grad_fn.next_functions) - 1  # the tensors the kernel's Function took, s0 aside
    assert sources == (2 if columns == (0, 2) else 1)
    weights = torch.randn(got.shape, dtype=torch.float64, generator=g)
    got_grads = torch.autograd.grad((got * weights).sum(), [whole, s0])
    z = torch.sigmoid(z_in)
    want = rnndsl.linear_scan.sequential_linear_recurrence(1 - z, z * candidate, s0)
    want_grads = torch.autograd.grad((want * weights).sum(), [whole, s0])
    assert fused == {"forward": 1, "backward": 1}
    assert_all_close([got, *got_grads], [want, *want_grads])


class _ReverseGradient(torch.autograd.Function):
    """A view of its input whose backward flips the gradient's sign (domain-adversarial training's)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


@pytest.mark.parametrize("make_view", [_ReverseGradient.apply, lambda x: x.detach()[:].requires_grad_()],
                         ids=["custom-function", "made-under-no-grad"])
def test_a_view_the_generated_code_did_not_split_keeps_its_own_gradient_path(fused, make_view):
    """A leaf that views another tensor goes in as itself: the kernel cannot see what autograd puts
    between a view and its base (here a flipped sign, or no path at all)."""
    spec = rnndsl.load_source(ELEMENTWISE_INPUT, "elementwise.cell")["elementwise"]
    loop, parallel = loop_and_parallel(spec, 4, 4)
    base = torch.randn(7, 3, 4, dtype=torch.float64, requires_grad=True)
    state = (torch.randn(3, 4, dtype=torch.float64),)
    got = []
    for cell in (loop, parallel):
        view = make_view(base)
        outputs, _ = rnndsl.scan(cell, view, state)
        grads = torch.autograd.grad((outputs * outputs).sum(), [base, view], allow_unused=True)
        got.append([torch.zeros_like(base) if g is None else g for g in grads])
    assert fused == {"forward": 1, "backward": 1}
    assert_all_close(got[1], got[0])
