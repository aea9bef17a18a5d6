"""Hand-written PyTorch GLA and Mamba-2 SSD: a step loop and a chunkwise-parallel form.

What a careful user writes without custom kernels, as a baseline for rnndsl's compiled
matrix-state cells (cells/gla.cell, cells/mamba2.cell) and as an independent check.
Both recurrences keep one (dk, dv) state per head and decay it before adding an outer product:

    GLA (Yang et al. 2023)   S_t = diag(alpha_t) S_{t-1} + k_t v_t^T,  o_t = S_t^T q_t
                             alpha_t in (0, 1)^dk, one decay per key dimension
    Mamba-2 SSD (Dao & Gu)   S_t = a_t S_{t-1} + B_t x_t^T,           y_t = S_t^T C_t + D x_t
                             a_t in (0, 1), one decay per head

Tensors are time-major, ``(T, batch, heads, dim)``; states are ``(batch, heads, dk, dv)``.
Decays are passed as logarithms (``log_alpha = logsigmoid(...)``, ``log_a = -exp(A_log) * dt``),
as flash-linear-attention and Mamba do: a decay near 1 keeps its precision there, and the
chunkwise form needs the logarithms anyway. Every function returns ``(outputs, final_state)``.
For Mamba-2 proper pass ``x = dt * u`` and add ``D * u`` yourself (``D=None``); ``D`` here
multiplies the same ``x`` the state sees, as in the equations above.

The chunkwise form splits time into chunks of ``chunk_size`` (the last one padded with
steps that decay by 1 and add nothing, so the final state is exact). Within a chunk
``b_t = sum of log decays from the chunk's start up to t``; a step s <= t contributes
``exp(b_t - b_s) <= 1`` to t. Across chunks the state is carried by a plain loop over chunks,
T / chunk_size iterations instead of T.

Stability. The textbook factorization ``exp(b_t - b_s) = exp(b_t) * exp(-b_s)``, i.e.
``q~ = q * exp(b)`` and ``k~ = k * exp(-b)`` so the intra-chunk part is one matmul, overflows:
with decays near 0.01 ``b`` falls by 4.6 a step, and float32's exp overflows past 88.
Here every exponential that is taken has a non-positive argument:

* SSD (scalar decay): the (C, C) matrix ``exp(b_t - b_s)`` is built directly, masked to
  ``s <= t`` with -inf before the exp (Mamba-2's ``segsum`` minimal reference does the same).
* GLA (a decay per key dim): that matrix would be (C, C, dk) per chunk, so the chunk is cut
  again into sub-chunks of ``sub_chunk_size`` (GLA paper, section 4.3, "secondary chunking").
  Between sub-chunks the decay factors through the start of the query's sub-chunk, r:
  ``exp(b_t - b_s) = exp(b_t - b_r) * exp(b_r - b_s)`` with s < r <= t, both factors <= 1,
  so those blocks are matmuls of rescaled q and k (k rescaled once per query sub-chunk).
  Only the diagonal blocks build the (c, c, dk) tensor of pairwise decays; it costs
  ``T * sub_chunk_size * dk`` elements per batch and head, kept for the backward pass.

The logarithms are summed from each chunk's start, never from t = 0, so at T = 8192 the
cumulative sums stay within ``chunk_size * max |log decay|`` and their rounding stays small.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

Intra = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def _step_loop(queries: Tensor, keys: Tensor, values: Tensor, log_decay: Tensor,
               initial_state: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """S_t = exp(log_decay_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t, one step at a time.

    ``log_decay`` is (T, batch, heads, dk) or (T, batch, heads, 1) for one decay per head.
    """
    _, batch, heads, dk = keys.shape
    state = initial_state if initial_state is not None else keys.new_zeros(batch, heads, dk, values.shape[-1])
    decay = torch.exp(log_decay).unsqueeze(-1)
    outputs = []
    # unbind, not x[t]: the backward of each x[t] writes into a zero tensor the size of all of x,
    # which makes the loop's backward quadratic in T; unbind's backward stacks the gradients once.
    for q, k, v, a in zip(queries.unbind(0), keys.unbind(0), values.unbind(0), decay.unbind(0)):
        # Broadcasting and matmul rather than einsum: the same products, half the time per step on CPU.
        state = a * state + k.unsqueeze(-1) * v.unsqueeze(-2)
        outputs.append((q.unsqueeze(-2) @ state).squeeze(-2))
    return torch.stack(outputs), state


def _chunked(x: Tensor, chunk_size: int) -> Tensor:
    """(T, batch, heads, d) -> (batch, heads, chunks, chunk_size, d), zero padded at the end."""
    steps = x.shape[0]
    padded = -(-steps // chunk_size) * chunk_size
    x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, 0, 0, padded - steps))
    return x.unflatten(0, (-1, chunk_size)).permute(2, 3, 0, 1, 4)


def _chunkwise(queries: Tensor, keys: Tensor, values: Tensor, log_decay: Tensor,
               initial_state: Optional[Tensor], chunk_size: int, intra: Intra) -> Tuple[Tensor, Tensor]:
    """The step loop's result, a chunk at a time; ``intra(q, k, v, b)`` gives the part of the
    outputs that comes from steps of the same chunk, ``b`` the in-chunk cumulative log decay.

    Padding steps have log decay 0 (decay 1) and zero keys and values: they leave the state as it is.
    """
    steps, batch, heads, dk = keys.shape
    q, k, v, log_decay = (_chunked(x, chunk_size) for x in (queries, keys, values, log_decay))
    b = log_decay.cumsum(-2)  # (batch, heads, chunks, C, dk or 1)
    last = b[..., -1:, :]
    # What each chunk adds to the state by its end, and how much it decays what came before.
    updates = (k * torch.exp(last - b)).transpose(-1, -2) @ v  # (batch, heads, chunks, dk, dv)
    chunk_decay = torch.exp(last).transpose(-1, -2)  # (batch, heads, chunks, dk or 1, 1)
    state = initial_state if initial_state is not None else keys.new_zeros(batch, heads, dk, values.shape[-1])
    starts = []
    for decay, update in zip(chunk_decay.unbind(2), updates.unbind(2)):  # unbind: see _step_loop
        starts.append(state)
        state = decay * state + update
    from_before = (q * torch.exp(b)) @ torch.stack(starts, 2)
    outputs = from_before + intra(q, k, v, b)
    return outputs.permute(2, 3, 0, 1, 4).flatten(0, 1)[:steps], state


def _causal(size: int, device: torch.device) -> Tensor:
    return torch.ones(size, size, dtype=torch.bool, device=device).tril()


def _intra_scalar_decay(q: Tensor, k: Tensor, v: Tensor, b: Tensor) -> Tensor:
    """One decay per head: ((q k^T) * exp(b_t - b_s) masked to s <= t) v."""
    exponent = b - b.transpose(-1, -2)  # (..., C, 1) - (..., 1, C): b_t - b_s
    decay = torch.exp(exponent.masked_fill(~_causal(b.shape[-2], b.device), float("-inf")))
    return ((q @ k.transpose(-1, -2)) * decay) @ v


def _intra_per_key_decay(sub_chunk_size: int) -> Intra:
    """A decay per key dim, by sub-chunks of ``sub_chunk_size`` (see the module docstring)."""

    def intra(q: Tensor, k: Tensor, v: Tensor, b: Tensor) -> Tensor:
        size = q.shape[-2]
        c = sub_chunk_size
        subs = size // c
        position = torch.arange(size, device=q.device)
        # b at the start of each sub-chunk, before its first step: the reference point r.
        reference = torch.nn.functional.pad(b[..., c - 1:-1:c, :], (0, 0, 1, 0))  # (..., subs, dk)
        q_sub, k_sub, v_sub, b_sub = (x.unflatten(-2, (subs, c)) for x in (q, k, v, b))
        # Earlier sub-chunks: q~ = q exp(b_t - b_r) (t >= r), k~ = k exp(b_r - b_s) for s < r, else 0.
        q_scaled = q_sub * torch.exp(b_sub - reference.unsqueeze(-2))  # (..., subs, c, dk)
        earlier = (position < position[::c, None]).unsqueeze(-1)  # (subs, C, 1): s before sub-chunk i
        exponent = reference.unsqueeze(-2) - b.unsqueeze(-3)  # (..., subs, C, dk)
        k_scaled = k.unsqueeze(-3) * torch.exp(exponent.masked_fill(~earlier, float("-inf")))
        from_earlier = (q_scaled @ k_scaled.transpose(-1, -2)).flatten(-3, -2) @ v  # (..., C, dv)
        # Same sub-chunk: the pairwise decays exp(b_t - b_s), s <= t, one per key dim.
        exponent = b_sub.unsqueeze(-2) - b_sub.unsqueeze(-3)  # (..., subs, c_t, c_s, dk)
        pairwise = torch.exp(exponent.masked_fill(~_causal(c, q.device).unsqueeze(-1), float("-inf")))
        scores = ((pairwise * k_sub.unsqueeze(-3)) @ q_sub.unsqueeze(-1)).squeeze(-1)  # (..., subs, c_t, c_s)
        return from_earlier + (scores @ v_sub).flatten(-3, -2)

    return intra


def gla_step(q: Tensor, k: Tensor, v: Tensor, log_alpha: Tensor,
             initial_state: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """GLA one step at a time: ``o_t[v] = sum_k q_t[k] S_t[k, v]``; returns (o, final S)."""
    return _step_loop(q, k, v, log_alpha, initial_state)


def gla_chunkwise(q: Tensor, k: Tensor, v: Tensor, log_alpha: Tensor, initial_state: Optional[Tensor] = None,
                  chunk_size: int = 32, sub_chunk_size: int = 8) -> Tuple[Tensor, Tensor]:
    """GLA by chunks, equal to :func:`gla_step`; ``sub_chunk_size`` must divide ``chunk_size``.

    The defaults were the fastest fwd+bwd on one CPU thread at T = 1024, batch 4, 4 heads,
    key = value = 64 (bench/bench_chunkwise.py): 32/8 and 32/4 about 480 ms, 64/16 about 730 ms.
    """
    if chunk_size % sub_chunk_size:
        raise ValueError(f"sub_chunk_size {sub_chunk_size} does not divide chunk_size {chunk_size}")
    return _chunkwise(q, k, v, log_alpha, initial_state, chunk_size, _intra_per_key_decay(sub_chunk_size))


def _skip(outputs: Tensor, x: Tensor, D: Optional[Tensor]) -> Tensor:
    return outputs if D is None else outputs + D[:, None] * x


def ssd_step(x: Tensor, log_a: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
             initial_state: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Mamba-2 SSD one step at a time; ``log_a`` is (T, batch, heads), ``D`` (heads,) or None."""
    outputs, state = _step_loop(C, B, x, log_a.unsqueeze(-1), initial_state)
    return _skip(outputs, x, D), state


def ssd_chunkwise(x: Tensor, log_a: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                  initial_state: Optional[Tensor] = None, chunk_size: int = 64) -> Tuple[Tensor, Tensor]:
    """Mamba-2 SSD by chunks, equal to :func:`ssd_step`."""
    outputs, state = _chunkwise(C, B, x, log_a.unsqueeze(-1), initial_state, chunk_size, _intra_scalar_decay)
    return _skip(outputs, x, D), state
