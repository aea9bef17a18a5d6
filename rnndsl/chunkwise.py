"""The chunkwise form of a recurrence linear in a matrix state (linear attention, RetNet, GLA,
Mamba-2's SSD), which the compiler emits for cells of that class (rnndsl/codegen/chunkwise.py).

Per head, with ``a_t`` a decay per head (a number) or per key dim (a vector)::

    S_t = diag(a_t) S_{t-1} + k_t v_t^T        o_t = S_t^T q_t

The sequence is cut into chunks of C steps. Within a chunk, with ``G_t`` the cumulative
log-decay since the chunk's start (``G_t - G_s = log a_{s+1} + ... + log a_t``)::

    o_t = (q_t * exp(G_t))^T S_start  +  sum_{s <= t} (q_t * exp(G_t - G_s)) . k_s  v_s

and across chunks ``S_end = exp(G_C) * S_start + sum_s (k_s * exp(G_C - G_s)) v_s^T``, a linear
recurrence over T/C chunk states (run by rnndsl.linear_scan's parallel scan). No state is made per
step: only one per chunk. Every exponent is a difference ``G_t - G_s`` with ``s <= t``, so at most
zero: the form is stable at any length and any decay, 0 included (log-space, no division by a
cumulative product; log-decays below the dtype's underflow are raised to it). A decay per head
makes the ``(C, C)`` matrix of those exponentials. A decay per key dim would need a ``(C, C, key)``
tensor; instead each chunk is cut again into sub-chunks (GLA's secondary chunking, Yang et al.
2024): pairs of steps in one sub-chunk use that tensor, only ``(c, c, key)``, and pairs across
sub-chunks factor the decay through the sub-chunks' bounds,
``exp(G_t - G_s) = exp(G_t - G_start(i)) exp(G_start(i) - G_end(j)) exp(G_end(j) - G_s)``, every
factor again at most 1, into matrix products.

Plain torch ops: autograd derives the backward.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .linear_scan import linear_recurrence

# Steps per chunk, and per sub-chunk for a decay per key dim: the fastest in a sweep on CPU
# (bench/bench_chunkwise.py).
CHUNK_PER_HEAD = 64
CHUNK_PER_KEY = 32
SUB_CHUNK = 8


def chunkwise_attention(q: Tensor, k: Tensor, v: Tensor, log_decay: Optional[Tensor], state: Tensor,
                        steps: int, mask: Optional[Tensor] = None, per_key: bool = False,
                        chunk: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """``(o, final state)`` of the recurrence above over ``steps`` steps.

    ``q``, ``k``: ``(T, batch, heads, key)``; ``v``: ``(T, batch, heads, value)``; values shared by
    all steps (a parameter) may omit the leading dims, and broadcast. ``log_decay``: None (no
    decay), or broadcastable to ``(T, batch, heads)`` (``per_key=False``) or ``(T, batch, heads,
    key)``. ``state``: ``(batch, heads, key, value)``. ``mask``: ``(T, batch)``, False where a step
    is padding (the state is kept there; its output is whatever, the caller zeroes it).
    Returns ``o``: ``(T, batch, heads, value)`` and the state after the last step.
    """
    batch, heads, keys, values = state.shape
    # Half precision computes in float32: the cumulative log-decays G grow along a chunk, and their
    # differences rounded at G's magnitude (multiples of 2 once |G| passes 500 in bfloat16; -inf
    # past -65504 in float16, and then -inf - -inf = nan) are exponentiated.
    returned = state.dtype
    dtype = torch.float32 if returned in (torch.float16, torch.bfloat16) else returned
    state = state.to(dtype)
    q = torch.broadcast_to(q.to(dtype), (steps, batch, heads, keys))
    k = torch.broadcast_to(k.to(dtype), (steps, batch, heads, keys))
    v = torch.broadcast_to(v.to(dtype), (steps, batch, heads, values))
    decay_shape = (steps, batch, heads, keys) if per_key else (steps, batch, heads)
    g = (torch.zeros(decay_shape, dtype=dtype, device=state.device) if log_decay is None
         else torch.broadcast_to(log_decay.to(dtype), decay_shape))
    # A decay of exactly 0 (log -inf: exp overflowing in a cell's exp(-exp(A) * dt)) would make the
    # differences G_t - G_s below -inf - -inf = nan; a huge finite one would swamp the chunk's other
    # steps in G's rounding. Below the log of the dtype's smallest number, exp is 0 already: raising
    # the log-decays to there changes no decay, and keeps every G finite and rounded at its scale.
    g = g.clamp(min=_log_of_zero(dtype))
    if mask is not None:  # a padded step keeps the state: decay 1 (log 0), nothing added
        # `where`, not a product with the mask: whatever the padding holds (inf, nan) stays out.
        g = torch.where(mask.view(mask.shape + (1,) * (g.dim() - 2)), g, 0.0)
        k, v = (torch.where(mask[:, :, None, None], t, 0.0) for t in (k, v))
    size = max(1, min(chunk or (CHUNK_PER_KEY if per_key else CHUNK_PER_HEAD), steps))
    sub = min(SUB_CHUNK, size)
    if per_key:
        size = -(-size // sub) * sub  # whole sub-chunks
    count = -(-steps // size)
    pad = count * size - steps
    if pad:  # padded like masked steps: the state passes through them unchanged
        # Zeros joined on, not F.pad: under torch.compile with a dynamic length, AOT autograd's
        # backward for F.pad (a pad by minus as much) came out a view of a permuted gradient at run
        # time that the traced shapes took for contiguous, and a later view raised.
        q, k, v, g = (torch.cat([t, t.new_zeros((pad,) + t.shape[1:])]) for t in (q, k, v, g))
    # (T, batch, heads, ...) -> (batch, heads, chunks, C, ...)
    # Sizes spelled out, not -1: a batch of 0 sequences leaves -1 undetermined.
    q, k, v = (t.permute(1, 2, 0, 3).reshape(batch, heads, count, size, t.size(-1)) for t in (q, k, v))
    if per_key:
        g = g.permute(1, 2, 0, 3).reshape(batch, heads, count, size, keys)
    else:
        g = g.permute(1, 2, 0).reshape(batch, heads, count, size, 1)
    cumulative = g.cumsum(3)  # G_t, (batch, heads, chunks, C, key or 1)
    last = cumulative[:, :, :, -1:]  # G_C
    if per_key:
        inside = _inside_per_key(q, k, v, cumulative, sub)
    else:
        scores = (q @ k.transpose(-1, -2)) * _causal_decays(cumulative).squeeze(-1)
        inside = scores @ v  # (batch, heads, chunks, C, value)
    # The chunk states: S_end = exp(G_C) S_start + sum_s (k_s exp(G_C - G_s)) v_s^T.
    added = (k * torch.exp(last - cumulative)).transpose(-1, -2) @ v  # (batch, heads, chunks, key, value)
    carried = torch.exp(last).squeeze(3).unsqueeze(-1).expand(batch, heads, count, keys, values)
    # The chunk states in the state's dtype (under autocast the products come in low precision).
    flat = heads * keys * values
    ends = linear_recurrence(carried.to(dtype).permute(2, 0, 1, 3, 4).reshape(count, batch, flat),
                             added.to(dtype).permute(2, 0, 1, 3, 4).reshape(count, batch, flat),
                             state.reshape(batch, flat))  # (chunks, batch, heads*key*value)
    starts = torch.cat([state.reshape(1, batch, flat), ends[:-1]])
    starts = starts.reshape(count, batch, heads, keys, values).permute(1, 2, 0, 3, 4)
    across = (q * torch.exp(cumulative)) @ starts  # (batch, heads, chunks, C, value)
    o = (inside + across).reshape(batch, heads, count * size, values)[:, :, :steps]
    return o.permute(2, 0, 1, 3).to(returned), ends[-1].reshape(batch, heads, keys, values).to(returned)


def _log_of_zero(dtype: torch.dtype) -> float:
    """A log whose exp is 0 in ``dtype``: below the log of its smallest subnormal number."""
    info = torch.finfo(dtype)
    return math.log(info.tiny * info.eps) - 1.0


def _causal_decays(cumulative: Tensor) -> Tensor:
    """``exp(G_t - G_s)`` for ``s <= t``, zero above the diagonal (filled before exp: no overflow
    there); ``cumulative``: ``(..., C, d)`` gives ``(..., C, C, d)``."""
    size = cumulative.shape[-2]
    causal = torch.ones(size, size, dtype=torch.bool, device=cumulative.device).tril()
    difference = cumulative.unsqueeze(-2) - cumulative.unsqueeze(-3)  # (..., t, s, d)
    return torch.exp(difference.masked_fill(~causal[:, :, None], float("-inf")))


def _inside_per_key(q: Tensor, k: Tensor, v: Tensor, cumulative: Tensor, sub: int) -> Tensor:
    """``sum_{s <= t in the chunk} (q_t * exp(G_t - G_s)) . k_s  v_s`` for a decay per key dim, by
    sub-chunks of ``sub`` steps; ``q``, ``k``, ``cumulative``: ``(..., C, key)``, ``v``: ``(..., C, value)``."""
    *lead, size, keys = q.shape
    count = size // sub
    q, k, cumulative = (t.reshape(*lead, count, sub, keys) for t in (q, k, cumulative))
    v = v.reshape(*lead, count, sub, v.shape[-1])
    # Pairs in one sub-chunk: the (sub, sub, key) decays.
    same = (q.unsqueeze(-2) * k.unsqueeze(-3) * _causal_decays(cumulative)).sum(-1) @ v
    # Pairs across sub-chunks i > j, through G at the end of j and G just before i starts.
    ends = cumulative[..., -1, :]  # (..., sub-chunks, key)
    starts = torch.cat([torch.zeros_like(ends[..., :1, :]), ends[..., :-1, :]], -2)
    q_scaled = q * torch.exp(cumulative - starts.unsqueeze(-2))  # (..., i, sub, key)
    k_scaled = k * torch.exp(ends.unsqueeze(-2) - cumulative)  # (..., j, sub, key)
    earlier = torch.ones(count, count, dtype=torch.bool, device=q.device).tril(-1)
    between = torch.exp((starts.unsqueeze(-2) - ends.unsqueeze(-3)).masked_fill(~earlier[:, :, None], float("-inf")))
    scores = (q_scaled.unsqueeze(-3) * between.unsqueeze(-2)) @ k_scaled.unsqueeze(-4).transpose(-1, -2)
    across = (scores @ v.unsqueeze(-4)).sum(-3)  # (..., i, sub, value)
    return (same + across).reshape(*lead, size, v.shape[-1])


def sequential_attention(q: Tensor, k: Tensor, v: Tensor, log_decay: Optional[Tensor], state: Tensor,
                         steps: int, mask: Optional[Tensor] = None,
                         per_key: bool = False) -> Tuple[Tensor, Tensor]:
    """The reference: the recurrence one step at a time (the arguments of :func:`chunkwise_attention`)."""
    batch, heads, keys, values = state.shape
    q = torch.broadcast_to(q, (steps, batch, heads, keys))
    k = torch.broadcast_to(k, (steps, batch, heads, keys))
    v = torch.broadcast_to(v, (steps, batch, heads, values))
    decay_shape = (steps, batch, heads, keys) if per_key else (steps, batch, heads)
    a = (torch.ones(decay_shape, dtype=state.dtype, device=state.device) if log_decay is None
         else torch.exp(torch.broadcast_to(log_decay, decay_shape)))
    outputs = []
    for t in range(steps):
        decay = a[t].unsqueeze(-1) if per_key else a[t][..., None, None]
        updated = decay * state + k[t].unsqueeze(-1) * v[t].unsqueeze(-2)
        state = updated if mask is None else torch.where(mask[t][:, None, None, None], updated, state)
        outputs.append((q[t].unsqueeze(-1) * state).sum(-2))
    return torch.stack(outputs), state
