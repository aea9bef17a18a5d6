"""The parallel linear scan against the sequential loop: values and gradients."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

import rnndsl
from rnndsl.linear_scan import linear_recurrence, sequential_linear_recurrence, use_cpu_kernel

FAST = settings(max_examples=40, deadline=None)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-10) -> None:
    """Equal up to `tolerance` relative to the largest value (|a| > 1 lets values grow)."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=0, atol=tolerance * scale)


@st.composite
def recurrences(draw, max_steps: int = 40):
    """(a, b, s0) in float64; a is any real in [-1.5, 1.5], zeros included."""
    steps = draw(st.integers(1, max_steps))
    batch = draw(st.integers(1, 3))
    hidden = draw(st.integers(1, 4))
    coefficient = st.one_of(st.just(0.0), st.floats(-1.5, 1.5))
    value = st.floats(-2.0, 2.0)
    a = draw(arrays(np.float64, (steps, batch, hidden), elements=coefficient))
    b = draw(arrays(np.float64, (steps, batch, hidden), elements=value))
    s0 = draw(arrays(np.float64, (batch, hidden), elements=value))
    return torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(s0)


def gradients(recurrence, a, b, s0, weights, requires=(True, True, True)):
    leaves = [t.clone().requires_grad_(r) for t, r in zip((a, b, s0), requires)]
    states = recurrence(*leaves)
    states.backward(weights)
    return states.detach(), [leaf.grad for leaf in leaves]


@FAST
@given(recurrences())
def test_states_match_the_loop(inputs):
    assert_matches(linear_recurrence(*inputs), sequential_linear_recurrence(*inputs))


@FAST
@given(recurrences(), st.integers(0, 2 ** 31 - 1))
def test_gradients_match_autograd_through_the_loop(inputs, seed):
    weights = torch.randn(inputs[0].shape, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(seed))
    states, grads = gradients(linear_recurrence, *inputs, weights)
    expected_states, expected_grads = gradients(sequential_linear_recurrence, *inputs, weights)
    assert_matches(states, expected_states)
    for grad, expected in zip(grads, expected_grads):
        assert_matches(grad, expected)


@pytest.mark.parametrize("steps", [1, 2, 5, 13])
def test_gradcheck(steps):
    generator = torch.Generator().manual_seed(steps)
    a = torch.randn(steps, 2, 3, dtype=torch.float64, generator=generator)
    a[steps // 2, 0, 0] = 0.0
    b = torch.randn(steps, 2, 3, dtype=torch.float64, generator=generator)
    s0 = torch.randn(2, 3, dtype=torch.float64, generator=generator)
    leaves = [t.requires_grad_() for t in (a, b, s0)]
    assert torch.autograd.gradcheck(linear_recurrence, leaves)


@pytest.mark.parametrize("requires", [(False, True, True), (True, False, False), (False, False, True)])
def test_gradients_for_a_subset_of_inputs(requires):
    a, b, s0 = (torch.randn(30, 2, 3, dtype=torch.float64), torch.randn(30, 2, 3, dtype=torch.float64),
                torch.randn(2, 3, dtype=torch.float64))
    weights = torch.randn(30, 2, 3, dtype=torch.float64)
    _, grads = gradients(linear_recurrence, a, b, s0, weights, requires)
    _, expected = gradients(sequential_linear_recurrence, a, b, s0, weights, requires)
    for grad, reference, required in zip(grads, expected, requires):
        assert (grad is None) == (not required)
        if required:
            assert_matches(grad, reference)


def test_single_step():
    a, b, s0 = torch.tensor([[[-2.0, 0.0]]]), torch.tensor([[[1.0, 3.0]]]), torch.tensor([[5.0, 7.0]])
    leaves = [t.double().requires_grad_() for t in (a, b, s0)]
    states = linear_recurrence(*leaves)
    assert states.tolist() == [[[-9.0, 3.0]]]
    states.sum().backward()
    assert leaves[0].grad.tolist() == [[[5.0, 7.0]]]
    assert leaves[1].grad.tolist() == [[[1.0, 1.0]]]
    assert leaves[2].grad.tolist() == [[-2.0, 0.0]]


def test_matches_the_loop_at_512_steps_in_float64():
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(512, 4, 8, dtype=torch.float64, generator=generator) * 2.1 - 1.05
    b = torch.randn(512, 4, 8, dtype=torch.float64, generator=generator)
    s0 = torch.randn(4, 8, dtype=torch.float64, generator=generator)
    weights = torch.randn(512, 4, 8, dtype=torch.float64, generator=generator)
    states, grads = gradients(linear_recurrence, a, b, s0, weights)
    expected_states, expected_grads = gradients(sequential_linear_recurrence, a, b, s0, weights)
    assert (states - expected_states).abs().max() < 1e-8
    for grad, expected in zip(grads, expected_grads):
        assert (grad - expected).abs().max() < 1e-8


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-8), (torch.float32, 1e-5)])
def test_long_sequences_stay_finite_and_accurate(dtype, tolerance):
    # Products of 4096 gates in (0, 1) underflow to zero; cumprod-and-divide would give NaN.
    generator = torch.Generator().manual_seed(1)
    a = torch.rand(4096, 2, 16, dtype=torch.float64, generator=generator) * 0.999 + 0.001
    b = torch.randn(4096, 2, 16, dtype=torch.float64, generator=generator)
    s0 = torch.randn(2, 16, dtype=torch.float64, generator=generator)
    expected = sequential_linear_recurrence(a, b, s0)
    leaves = [t.to(dtype).requires_grad_() for t in (a, b, s0)]
    states = linear_recurrence(*leaves)
    states.sum().backward()
    assert states.dtype == dtype
    assert all(torch.isfinite(t).all() for t in (states, *(leaf.grad for leaf in leaves)))
    assert (states.double() - expected).abs().max() < tolerance * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("dtype, steps, growth", [(torch.float32, 300, 4.0), (torch.float64, 4100, 2.0)])
def test_coefficients_whose_chunk_products_overflow_match_the_loop(dtype, steps, growth):
    """A state that grows (a > 1) with no input until the last steps: the loop's states are finite,
    the chunks' products of a overflow, and inf * 0 made the chunked scan nan, forward and backward."""
    a = torch.full((steps, 2, 3), growth, dtype=dtype, requires_grad=True)
    b = torch.zeros(steps, 2, 3, dtype=dtype)
    b[-3:] = 1.0
    b.requires_grad_()
    s0 = torch.zeros(2, 3, dtype=dtype, requires_grad=True)
    got, want = linear_recurrence(a, b, s0), sequential_linear_recurrence(a, b, s0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # The first steps' loss: its gradient runs back through products of a that stay finite.
    for g, w in zip(torch.autograd.grad(got[:3].sum(), (b, s0)), torch.autograd.grad(want[:3].sum(), (b, s0))):
        assert torch.isfinite(w).all()
        torch.testing.assert_close(g, w)


def test_torch_func_transforms_take_the_loop():
    """vmap, grad and jacrev raised torch's 'must override the setup_context staticmethod' from
    the scan's autograd Function; they now run the loop, as the cells do under torch.func."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 5, 2, 3, dtype=torch.float64, generator=g)
    b = torch.randn(4, 5, 2, 3, dtype=torch.float64, generator=g)
    s0 = torch.randn(4, 2, 3, dtype=torch.float64, generator=g)
    torch.testing.assert_close(torch.func.vmap(linear_recurrence)(a, b, s0),
                               torch.stack([sequential_linear_recurrence(*args) for args in zip(a, b, s0)]))
    grads = [torch.func.grad(lambda a, f=f: f(a, b[0], s0[0]).square().sum())(a[0])
             for f in (linear_recurrence, sequential_linear_recurrence)]
    torch.testing.assert_close(grads[0], grads[1])


def test_wide_steps_take_the_plain_loop_and_agree():
    # 2 x 2100 = 4200 elements a step: above the width where CPU chunking stops paying.
    inputs = (torch.rand(9, 2, 2100, dtype=torch.float64), torch.randn(9, 2, 2100, dtype=torch.float64),
              torch.randn(2, 2100, dtype=torch.float64))
    weights = torch.randn(9, 2, 2100, dtype=torch.float64)
    states, grads = gradients(linear_recurrence, *inputs, weights)
    expected_states, expected_grads = gradients(sequential_linear_recurrence, *inputs, weights)
    assert_matches(states, expected_states)
    for grad, expected in zip(grads, expected_grads):
        assert_matches(grad, expected)


def test_non_contiguous_inputs():
    # Batch-major storage seen time-major, as a transpose of a (batch, T, hidden) tensor.
    a = torch.rand(3, 50, 4, dtype=torch.float64).transpose(0, 1)
    b = torch.randn(4, 3, 50, dtype=torch.float64).permute(2, 1, 0)[:, :, :4]
    s0 = torch.randn(4, 3, dtype=torch.float64).t()
    assert_matches(linear_recurrence(a, b, s0), sequential_linear_recurrence(a, b, s0))


def test_float32_matches_float64():
    a = torch.rand(300, 4, 8, dtype=torch.float64)
    b = torch.randn(300, 4, 8, dtype=torch.float64)
    s0 = torch.randn(4, 8, dtype=torch.float64)
    states = linear_recurrence(a.float(), b.float(), s0.float())
    assert states.dtype == torch.float32
    assert_matches(states.double(), sequential_linear_recurrence(a, b, s0), tolerance=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    inputs = [torch.rand(200, 4, 8, dtype=torch.float64), torch.randn(200, 4, 8, dtype=torch.float64),
              torch.randn(4, 8, dtype=torch.float64)]
    weights = torch.randn(200, 4, 8, dtype=torch.float64)
    states, grads = gradients(linear_recurrence, *[t.cuda() for t in inputs], weights.cuda())
    expected_states, expected_grads = gradients(sequential_linear_recurrence, *inputs, weights)
    assert states.is_cuda
    assert_matches(states.cpu(), expected_states)
    for grad, expected in zip(grads, expected_grads):
        assert_matches(grad.cpu(), expected)


@pytest.mark.parametrize("recurrence", [linear_recurrence, sequential_linear_recurrence])
@pytest.mark.parametrize("a_shape, b_shape, s0_shape, message", [
    ((5, 2, 3), (5, 2, 4), (2, 3), "b must have the shape of a, (T, batch, hidden) = (5, 2, 3), got (5, 2, 4)"),
    ((5, 2, 3), (5, 2, 3), (3, 2), "s0 must have shape (batch, hidden) = (2, 3), got (3, 2)"),
    ((5, 2, 3), (5, 2, 3), (1, 2, 3), "s0 must have shape (batch, hidden) = (2, 3), got (1, 2, 3)"),
    ((5, 6), (5, 6), (6,), "a must have shape (T, batch, hidden) with T >= 1, got (5, 6)"),
    ((0, 2, 3), (0, 2, 3), (2, 3), "a must have shape (T, batch, hidden) with T >= 1, got (0, 2, 3)"),
])
def test_mismatched_shapes_name_expected_and_received(recurrence, a_shape, b_shape, s0_shape, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        recurrence(torch.zeros(a_shape), torch.zeros(b_shape), torch.zeros(s0_shape))


def test_mismatched_dtypes_are_named():
    with pytest.raises(ValueError, match="torch.float32, torch.float64, torch.float32"):
        linear_recurrence(torch.zeros(4, 2, 3), torch.zeros(4, 2, 3, dtype=torch.float64), torch.zeros(2, 3))


@pytest.fixture
def cpu_kernel(at_least_two_threads):
    """The C++ scan switched on for one test (built on first use), off again after."""
    if not use_cpu_kernel():
        pytest.skip("the C++ linear scan did not build here")
    yield
    use_cpu_kernel(False)


# 3 x 5 lanes run on one thread; 4 x 300 are split between threads (the kernel's grain is 256 lanes).
@pytest.mark.parametrize("steps, lanes", [(1, (3, 5)), (2, (3, 5)), (17, (3, 5)), (300, (3, 5)), (17, (4, 300))])
def test_cpu_kernel_matches_the_loop(cpu_kernel, steps, lanes):
    g = torch.Generator().manual_seed(steps)
    a = torch.randn(steps, *lanes, dtype=torch.float64, generator=g)
    a[a.abs() < 0.3] = 0.0  # zeros, negatives and values above one alike
    b, weights = (torch.randn(steps, *lanes, dtype=torch.float64, generator=g) for _ in range(2))
    s0 = torch.randn(*lanes, dtype=torch.float64, generator=g)
    assert_matches(linear_recurrence(a, b, s0), sequential_linear_recurrence(a, b, s0))
    for requires in [(True, True, True), (False, True, True), (True, False, False)]:
        _, got_grads = gradients(linear_recurrence, a, b, s0, weights, requires)
        _, want_grads = gradients(sequential_linear_recurrence, a, b, s0, weights, requires)
        for got, want in zip(got_grads, want_grads, strict=True):
            assert (got is None) == (want is None)
            if got is not None:
                assert_matches(got, want)


def test_cpu_kernel_takes_broadcast_and_strided_inputs(cpu_kernel):
    a = torch.rand(5, dtype=torch.float64).expand(40, 2, 5)  # a coefficient shared by all steps
    b = torch.randn(2, 40, 5, dtype=torch.float64).transpose(0, 1)
    s0 = torch.randn(5, 2, dtype=torch.float64).t()
    assert_matches(linear_recurrence(a, b, s0), sequential_linear_recurrence(a, b, s0))
    grad = torch.ones(()).to(torch.float64).expand(40, 2, 5)  # what sum() hands back
    _, got_grads = gradients(linear_recurrence, a, b, s0, grad)
    _, want_grads = gradients(sequential_linear_recurrence, a, b, s0, grad)
    for got, want in zip(got_grads, want_grads, strict=True):
        assert_matches(got, want)


def test_cpu_kernel_runs_the_parallel_cells(cpu_kernel):
    spec = rnndsl.load_cell("minlstm")
    sequential = spec.build(3, 4, scan="sequential").double()
    parallel = spec.build(3, 4, scan="parallel").double()
    parallel.load_state_dict(sequential.state_dict())
    xs = torch.randn(50, 2, 3, dtype=torch.float64, requires_grad=True)
    state = (torch.randn(2, 4, dtype=torch.float64, requires_grad=True),)
    results = []
    for cell in (sequential, parallel):
        outputs, final = rnndsl.scan(cell, xs, state)
        loss = (outputs * torch.linspace(-1, 1, outputs.numel(), dtype=torch.float64).view_as(outputs)).sum()
        results.append([outputs, *torch.autograd.grad(loss + final[0].square().sum(), [xs, *state])])
    for got, want in zip(results[1], results[0]):
        assert_matches(got, want)
