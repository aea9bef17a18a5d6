"""The chunkwise form of matrix-state recurrences (rnndsl/chunkwise.py and the compiler's use of it,
rnndsl/codegen/chunkwise.py): equal to the step loop, values and gradients, with masks, over many
chunks, and stable over long sequences."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rnndsl
from rnndsl.chunkwise import chunkwise_attention, sequential_attention
from test_parallel_scan import sequential_and_parallel

CHUNKWISE_CELLS = ["linear_attention", "retnet", "gla", "mamba2"]


def _problem(steps, batch, heads, keys, values, per_key, generator, low=-3.0, masked=False):
    def draw(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=generator).requires_grad_()
    q, k, v = draw(steps, batch, heads, keys), draw(steps, batch, heads, keys), draw(steps, batch, heads, values)
    shape = (steps, batch, heads, keys) if per_key else (steps, batch, heads)
    log_decay = (low * torch.rand(*shape, dtype=torch.float64, generator=generator)).requires_grad_()
    state = draw(batch, heads, keys, values)
    mask = None
    if masked:
        lengths = torch.randint(1, steps + 1, (batch,), generator=generator)
        mask = torch.arange(steps)[:, None] < lengths[None, :]
    return q, k, v, log_decay, state, mask


def _results_and_grads(function, inputs, mask, steps, per_key, chunk=None):
    q, k, v, log_decay, state, _ = inputs
    kwargs = {} if chunk is None else dict(chunk=chunk)
    o, final = function(q, k, v, log_decay, state, steps, mask, per_key, **kwargs)
    if mask is not None:
        o = o * mask[:, :, None, None]
    weights = torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)
    grads = torch.autograd.grad((o * weights).sum() + (final * final).sum(), [q, k, v, log_decay, state])
    return [o, final, *grads]


@settings(max_examples=25, deadline=None)
@given(steps=st.integers(1, 40), chunk=st.integers(1, 9), per_key=st.booleans(), masked=st.booleans(),
       seed=st.integers(0, 2**16))
def test_chunkwise_equals_the_step_loop(steps, chunk, per_key, masked, seed):
    g = torch.Generator().manual_seed(seed)
    inputs = _problem(steps, 2, 2, 3, 4, per_key, g, masked=masked)
    mask = inputs[-1]
    got = _results_and_grads(chunkwise_attention, inputs, mask, steps, per_key, chunk)
    want = _results_and_grads(sequential_attention, inputs, mask, steps, per_key)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("per_key", [False, True])
@pytest.mark.parametrize("low", [-0.001, -5.0])  # decays near 1 and near 0.007
def test_long_sequences_stay_finite_and_exact(per_key, low):
    g = torch.Generator().manual_seed(0)
    steps = 2048
    inputs = _problem(steps, 1, 1, 2, 2, per_key, g, low=low)
    with torch.no_grad():
        o, final = chunkwise_attention(*inputs[:5], steps, None, per_key)
        o_loop, final_loop = sequential_attention(*inputs[:5], steps, None, per_key)
    assert torch.isfinite(o).all() and torch.isfinite(final).all()
    torch.testing.assert_close(o, o_loop, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(final, final_loop, rtol=1e-9, atol=1e-9)


def test_float32_at_8192_steps_with_extreme_decays():
    """log-space decays: no overflow where a cumulative product of decays e^-20 would underflow and
    its inverse overflow; float32 agrees with the float64 loop."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(8192, 1, 2, 4, generator=g) for _ in range(3))
    log_decay = torch.where(torch.rand(8192, 1, 2, 4, generator=g) < 0.5, -20.0, -1e-3)
    o, final = chunkwise_attention(q, k, v, log_decay, torch.zeros(1, 2, 4, 4), 8192, None, True)
    assert torch.isfinite(o).all() and torch.isfinite(final).all()
    with torch.no_grad():
        want, want_final = sequential_attention(*(t.double() for t in (q, k, v, log_decay)),
                                                torch.zeros(1, 2, 4, 4, dtype=torch.float64), 8192, None, True)
    torch.testing.assert_close(o.double(), want, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(final.double(), want_final, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("per_key", [False, True])
def test_a_decay_of_exactly_zero_is_the_loops(dtype, per_key):
    """A log-decay of -inf (exp overflowing in mamba2's exp(-exp(A_log) * dt)) or huge: the loop
    multiplies the state by 0 there; the chunkwise form once gave nan (-inf - -inf in G_t - G_s)."""
    g = torch.Generator().manual_seed(3)
    q, k, v, log_decay, state, _ = _problem(70, 2, 2, 3, 4, per_key, g)
    with torch.no_grad():
        log_decay.view(70, -1)[5, 0] = float("-inf")
        log_decay.view(70, -1)[40, 1] = -1e30
        log_decay.view(70, -1)[41] = float("-inf")
    inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, log_decay, state)] + [None]
    got = _results_and_grads(chunkwise_attention, inputs, None, 70, per_key, chunk=16)
    want = _results_and_grads(sequential_attention, inputs, None, 70, per_key)
    tolerance = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for a, b in zip(got, want, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **tolerance)


@pytest.mark.parametrize("backend", ["script", "eager"])
@pytest.mark.parametrize("name", CHUNKWISE_CELLS)
@settings(max_examples=4, deadline=None)
@given(steps=st.sampled_from([1, 5, 17, 70, 130]), batch=st.integers(1, 3), masked=st.booleans(),
       seed=st.integers(0, 2**16))
def test_stock_cells_chunkwise_equal_their_loop(name, backend, steps, batch, masked, seed):
    sequential, parallel = sequential_and_parallel(name, backend, 3, 4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parallel.parameters():
            p.copy_(0.5 * torch.randn(p.shape, dtype=torch.float64, generator=g))
    sequential.load_state_dict(parallel.state_dict())
    xs = torch.randn(steps, batch, 3, dtype=torch.float64, generator=g, requires_grad=True)
    state = tuple((0.3 * torch.randn(batch, size, dtype=torch.float64, generator=g)).requires_grad_()
                  for size in sequential.state_sizes)
    mask = None
    if masked:
        lengths = torch.randint(1, steps + 1, (batch,), generator=g)
        mask = torch.arange(steps)[:, None] < lengths[None, :]
    results = []
    for cell in (sequential, parallel):
        outputs, final = rnndsl.scan(cell, xs, state, mask)
        loss = (outputs * torch.linspace(-1, 1, outputs.numel(), dtype=outputs.dtype).view_as(outputs)).sum()
        loss = loss + sum((s * s).sum() for s in final)
        results.append([outputs, *final, *torch.autograd.grad(loss, [xs, *state, *cell.parameters()])])
    for a, b in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", CHUNKWISE_CELLS)
def test_what_padded_steps_hold_never_reaches_the_real_ones(name):
    """inf and nan in the padding: the real steps' outputs and the final state are those of zero
    padding, as in the step loop (the padding's k and v are left out, not multiplied by 0)."""
    sequential, parallel = sequential_and_parallel(name, "script", 3, 4)
    lengths = torch.tensor([70, 20, 1])
    mask = torch.arange(70)[:, None] < lengths[None, :]
    xs = torch.randn(70, 3, 3, dtype=torch.float64)
    state = tuple(torch.zeros(3, size, dtype=torch.float64) for size in sequential.state_sizes)
    for padding in (float("nan"), float("inf")):
        poisoned = torch.where(mask[..., None], xs, padding)
        for cell in (sequential, parallel):
            expected, expected_final = rnndsl.scan(cell, xs * mask[..., None], state, mask)
            outputs, final = rnndsl.scan(cell, poisoned, state, mask)
            torch.testing.assert_close(outputs[mask], expected[mask], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(final, expected_final, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", CHUNKWISE_CELLS)
def test_the_chunkwise_form_makes_no_state_per_step(name):
    source = rnndsl.load_cell(name).parallel_plan()[0]
    assert "chunkwise_attention(" in source
    assert "outer_seq" not in source and ".unsqueeze(-2)" not in source.split("chunkwise_attention(")[0]


def test_the_auto_scan_picks_the_chunkwise_form_and_the_delta_rule_keeps_the_loop():
    assert rnndsl.load_cell("gla").build(3, 4).scan_mode == "parallel"
    assert rnndsl.load_cell("deltanet").build(3, 4).scan_mode == "sequential"
    with pytest.raises(ValueError, match=r"deltanet cannot run as a parallel scan.*deltanet.cell:\d+: `S' = "):
        rnndsl.load_cell("deltanet").build(3, 4, scan="parallel")
    # A vector state read through split() (slstm's h) is a vector state: refused for what its update
    # is, not as a tensor state ("is not its tensor, flattened").
    with pytest.raises(ValueError, match=r"next value of `h` is not of the form a \* h \+ b .*slstm.cell:\d+: `h' = "):
        rnndsl.load_cell("slstm").build(4, 4, scan="parallel")


DECAY_PER_VALUE = """
cell per_value(x[input]) -> y {
    size heads = 1
    state S[heads, hidden, hidden]
    param wq[heads*hidden, input], wk[heads*hidden, input], wv[heads*hidden, input], wa[heads*hidden, input]
    q = split(wq @ x, heads)
    S' = transpose(sigmoid(split(wa @ x, heads)) * transpose(S)) + outer(split(wk @ x, heads), split(wv @ x, heads))
    y = join(q @ S')
}
"""


def test_a_decay_outside_the_class_is_refused_by_name():
    spec = rnndsl.load_source(DECAY_PER_VALUE)["per_value"]
    assert spec.build(3, 4).scan_mode == "sequential"
    with pytest.raises(ValueError, match="not of the form a \\* S \\+ b"):
        spec.build(3, 4, scan="parallel")


def _decayed_attention(decay: str) -> str:
    return f"""
cell t(x[input]) -> y {{
    size heads = 2
    state S[heads, hidden, hidden]
    param weight_q[heads*hidden, input], weight_k[heads*hidden, input], weight_v[heads*hidden, input]
    {"param d[heads]" if "d" in decay.replace("decay", "") else ""}
    q = split(weight_q @ x, heads)
    k = split(weight_k @ x, heads)
    v = split(weight_v @ x, heads)
    S' = {decay} * S + outer(k, v)
    y = join(q @ S')
}}"""


@pytest.mark.parametrize("decay", ["0.9", "1.0", "sigmoid(d) * exp(-d * d)", "0.5 * sigmoid(d)"])
def test_decays_positive_by_their_form_run_chunkwise_and_equal_the_loop(decay):
    from test_parallel_scan import _run
    spec = rnndsl.load_source(_decayed_attention(decay))["t"]
    sequential = spec.build(3, 4, scan="sequential").double()
    parallel = spec.build(3, 4, scan="parallel").double()
    assert "chunkwise_attention(" in spec.parallel_plan()[0]
    parallel.load_state_dict(sequential.state_dict())
    xs = torch.randn(37, 2, 3, dtype=torch.float64, requires_grad=True)
    state = (torch.randn(2, sequential.state_sizes[0], dtype=torch.float64, requires_grad=True),)
    mask = torch.arange(37)[:, None] < torch.tensor([37, 20])
    want, got = _run(sequential, xs, state, mask), _run(parallel, xs, state, mask)
    for a, b in zip(got[:1] + got[1] + got[2], want[:1] + want[1] + want[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_a_decay_that_may_be_negative_keeps_the_loop():
    """The chunkwise form takes the decay's log: a raw parameter, which training may push to 0 or
    below, gave nan there where the loop is exact. It is refused, and scan="auto" keeps the loop."""
    spec = rnndsl.load_source(_decayed_attention("d"))["t"]
    assert spec.build(3, 4).scan_mode == "sequential"
    with pytest.raises(ValueError, match=r"needs a decay positive by its form: .*`d` may be 0 or negative"):
        spec.build(3, 4, scan="parallel")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_as_exact_as_the_loop(dtype):
    """Large log-decays early in a chunk: rounded at their cumulative magnitude in half precision,
    the chunkwise form strayed far further from float64 than the loop in bfloat16, and gave nan in
    float16 (a cumulative sum past -65504 is -inf). It computes in float32: the loop's error bounds it."""
    g = torch.Generator().manual_seed(0)
    q, k, v, _, state, _ = _problem(64, 2, 2, 3, 4, False, g)
    log_decay = torch.full((64, 2, 2), -0.01, dtype=torch.float64)
    log_decay[:10] = -1600.0
    exact, exact_final = sequential_attention(q, k, v, log_decay, state, 64)
    low = [t.detach().to(dtype) for t in (q, k, v, log_decay, state)]
    for function, slack in ((sequential_attention, 1.0), (chunkwise_attention, 2.0)):
        o, final = function(*low, 64)
        assert o.dtype == final.dtype == dtype
        error = ((final.double() - exact_final).abs().max() / exact_final.abs().max()).item()
        if function is sequential_attention:
            loop_error = error
        assert torch.isfinite(o).all() and error <= slack * loop_error + 1e-3, (function.__name__, error)
