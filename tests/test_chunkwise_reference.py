"""bench/chunkwise_reference.py: the chunkwise GLA and SSD equal their step loops, values and
gradients, in float64; at T = 8192 they stay finite and close for slow and fast decays."""
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not installed

from bench.chunkwise_reference import gla_chunkwise, gla_step, ssd_chunkwise, ssd_step  # noqa: E402

F64 = torch.float64


def _log_decay(shape, low: float, high: float, generator: torch.Generator, dtype=F64) -> torch.Tensor:
    """Logarithms of decays drawn uniformly from [low, high] (both in (0, 1))."""
    decay = low + (high - low) * torch.rand(shape, dtype=F64, generator=generator)
    return torch.log(decay).to(dtype)


def _gla_inputs(steps, batch, heads, dk, dv, low, high, seed, dtype=F64, initial=True):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(steps, batch, heads, dk, dtype=F64, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(steps, batch, heads, dv, dtype=F64, generator=g).to(dtype)
    state = torch.randn(batch, heads, dk, dv, dtype=F64, generator=g).to(dtype) if initial else None
    return q, k, v, _log_decay((steps, batch, heads, dk), low, high, g, dtype), state


def _ssd_inputs(steps, batch, heads, dstate, dhead, low, high, seed, dtype=F64, initial=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, batch, heads, dhead, dtype=F64, generator=g).to(dtype)
    B, C = (torch.randn(steps, batch, heads, dstate, dtype=F64, generator=g).to(dtype) for _ in range(2))
    D = torch.randn(heads, dtype=F64, generator=g).to(dtype)
    state = torch.randn(batch, heads, dstate, dhead, dtype=F64, generator=g).to(dtype) if initial else None
    return x, _log_decay((steps, batch, heads), low, high, g, dtype), B, C, D, state


def _outputs_and_grads(function, inputs):
    """Outputs, final state, and the gradients of a loss of both with respect to every input."""
    inputs = [x.detach().requires_grad_() if x is not None else None for x in inputs]
    outputs, state = function(*inputs)
    weights = torch.linspace(-1, 1, outputs.numel(), dtype=outputs.dtype).view_as(outputs)
    loss = (outputs * weights).sum() + (state * state).sum()
    leaves = [x for x in inputs if x is not None]
    return [outputs, state, *torch.autograd.grad(loss, leaves)]


def _assert_all_close(got, want, tolerance):
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)


# Chunks that divide T, that do not, that are longer than T; sub-chunks of 1 up to the whole chunk.
CHUNKS = st.sampled_from([(1, 1), (4, 2), (8, 8), (16, 4), (64, 16), (32, 32)])
STEPS = st.one_of(st.sampled_from([1, 7, 64, 257]), st.integers(1, 40))
DECAYS = st.sampled_from([(0.9, 0.999), (0.005, 0.02), (0.01, 0.999)])


@given(steps=STEPS, batch=st.integers(1, 2), heads=st.integers(1, 2), dk=st.integers(1, 5), dv=st.integers(1, 4),
       chunks=CHUNKS, decays=DECAYS, initial=st.booleans(), seed=st.integers(0, 2**16))
def test_gla_chunkwise_equals_step_loop(steps, batch, heads, dk, dv, chunks, decays, initial, seed):
    chunk, sub_chunk = chunks
    inputs = _gla_inputs(steps, batch, heads, dk, dv, *decays, seed, initial=initial)
    want = _outputs_and_grads(gla_step, inputs)
    got = _outputs_and_grads(lambda *x: gla_chunkwise(*x, chunk_size=chunk, sub_chunk_size=sub_chunk), inputs)
    _assert_all_close(got, want, 1e-10)


@given(steps=STEPS, batch=st.integers(1, 2), heads=st.integers(1, 2), dstate=st.integers(1, 5),
       dhead=st.integers(1, 4), chunk=st.sampled_from([1, 4, 16, 64]), decays=DECAYS, initial=st.booleans(),
       seed=st.integers(0, 2**16))
def test_ssd_chunkwise_equals_step_loop(steps, batch, heads, dstate, dhead, chunk, decays, initial, seed):
    inputs = _ssd_inputs(steps, batch, heads, dstate, dhead, *decays, seed, initial=initial)
    want = _outputs_and_grads(ssd_step, inputs)
    got = _outputs_and_grads(lambda *x: ssd_chunkwise(*x, chunk_size=chunk), inputs)
    _assert_all_close(got, want, 1e-10)


def test_step_loops_follow_the_equations():
    """o_t = sum_{s <= t} (q_t . (prod_{s < r <= t} alpha_r * k_s)) v_s + q_t . (prod_{r <= t} alpha_r * S_0),
    written out as sums over s; SSD is GLA with one decay repeated over the key dims, plus D x."""
    q, k, v, log_alpha, state = _gla_inputs(5, 2, 3, 4, 3, 0.3, 0.9, seed=1)
    cumulative = log_alpha.cumsum(0)
    for t in range(5):
        want = torch.einsum("bhk,bhkv->bhv", q[t] * cumulative[t].exp(), state)
        for s in range(t + 1):
            decayed = k[s] * (cumulative[t] - cumulative[s]).exp()
            want = want + (q[t] * decayed).sum(-1, keepdim=True) * v[s]
        torch.testing.assert_close(gla_step(q, k, v, log_alpha, state)[0][t], want, rtol=1e-12, atol=1e-12)
    x, log_a, B, C, D, state = _ssd_inputs(5, 2, 3, 4, 3, 0.3, 0.9, seed=2)
    outputs, final = ssd_step(x, log_a, B, C, D, state)
    as_gla, final_gla = gla_step(C, B, x, log_a.unsqueeze(-1).expand_as(B), state)
    torch.testing.assert_close(outputs, as_gla + D[:, None] * x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, final_gla, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("decays", [(0.9, 0.999), (0.005, 0.02)], ids=["slow", "fast"])
@pytest.mark.parametrize("form", ["gla", "ssd"])
def test_long_sequences_stay_finite_and_close(form, decays):
    """T = 8192: float64 chunkwise equals the float64 loop; float32 chunkwise (where the naive
    q exp(b), k exp(-b) factorization overflows) is finite, values and gradients, and close."""
    steps = 8192
    if form == "gla":
        make, step, chunkwise = _gla_inputs, gla_step, gla_chunkwise
    else:
        make, step, chunkwise = _ssd_inputs, ssd_step, ssd_chunkwise
    inputs = make(steps, 1, 2, 8, 8, *decays, seed=3)
    want = step(*inputs)
    _assert_all_close(chunkwise(*inputs), want, 1e-9)
    single = [x.float() for x in inputs]
    got = _outputs_and_grads(chunkwise, single)
    assert all(torch.isfinite(x).all() for x in got)
    for a, b in zip(got[:2], want, strict=True):
        scale = b.abs().max().item()
        assert (a.double() - b).abs().max().item() <= 1e-5 * scale  # the float32 loop errs by ~2e-7


def test_sub_chunks_must_divide_chunks():
    with pytest.raises(ValueError, match="does not divide"):
        gla_chunkwise(*_gla_inputs(4, 1, 1, 2, 2, 0.5, 0.9, seed=0), chunk_size=16, sub_chunk_size=6)


def test_benchmark_reports_time_and_memory_of_each_variant(monkeypatch, capsys):
    from bench import bench_chunkwise

    monkeypatch.setattr(sys, "argv", ["bench_chunkwise", "--lengths", "8", "--rounds", "1", "--batch", "1",
                                      "--heads", "1", "--dim", "4", "--variants", "gla step", "ssd chunkwise"])
    bench_chunkwise.main()
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("     8 ")]
    assert [row[1:3] for row in rows] == [["gla", "step"], ["ssd", "chunkwise"]]
    assert all(float(row[3]) > 0 and row[4] != "nan" for row in rows)
