"""Parallel scan for recurrences linear in the state.

Takes per-step coefficients ``a``, ``b`` of shape ``(T, batch, hidden)`` and an
initial state ``s0`` ``(batch, hidden)``; returns every state of::

    s_t = a_t * s_{t-1} + b_t        t = 1..T

as a ``(T, batch, hidden)`` tensor. Cells such as minGRU, minLSTM and QRNN have
this form once their input-only work is hoisted out of the time loop, so the
whole sequence runs as a few vectorized passes instead of T small steps.

Algorithm (chunked scan): split time into chunks of up to 16 steps, run all
chunks side by side from a zero state, carry each chunk's end state across
chunks with the same scan (recursively), then rerun the chunks from their true
entering states. That is about 32 vectorized ops per factor of 16 in T, each
over T/16 steps at once, instead of T small ops (on CPU, steps wider than 4096
elements keep the plain loop; see ``_chunk_length``). Only products and sums
of the inputs appear, never a division or a logarithm, so it holds for any
real ``a`` (zero, negative, above one): a product of gates that underflows to
zero only drops a contribution that small, where cumprod-and-divide would
divide by it; a chunk's product that overflows (coefficients above one) runs
the plain loop instead. ``bench/bench_linear_scan.py --algorithms`` measures it against
the alternatives (forward, float32, batch 16, hidden 64, one thread, T = 64 to
4096): Hillis-Steele doubling does O(T log T) work and ran 1.1-1.3x slower at
T = 64 and 8-13x slower at T >= 1024; a log-space cumsum with sign handling
ran 12-90x slower, lost accuracy (2e-4 relative error at T = 4096) and gives
NaN at a = 0.

The backward pass is the same scan run in reverse time: with g_t = dL/ds_t
accumulated through the recurrence, g_t = dL/ds_t + a_{t+1} * g_{t+1}, and then
dL/da_t = g_t * s_{t-1}, dL/db_t = g_t, dL/ds0 = a_1 * g_1.

On CPU, :func:`use_cpu_kernel` swaps both for a small C++ loop (rnndsl/csrc/linear_scan.cpp),
compiled on first use: one pass over memory each way where the chunked scan makes five or six,
the gradient of ``a`` in the same pass as the reverse scan. It also lets a cell's generated code
run its coefficients' math and the scan as one generated kernel (rnndsl/fused_scan.py).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .autograd_modes import plain_backward_needed, plain_ops_needed
from .errors import PlacementError

__all__ = ["along_steps", "linear_recurrence", "sequential_linear_recurrence", "use_cpu_kernel"]

_KERNEL_SOURCE = Path(__file__).resolve().parent / "csrc" / "linear_scan.cpp"
_built: Optional[Any] = None  # the compiled extension, once built
_kernel: Optional[Any] = None  # the same while use_cpu_kernel() is on


def use_cpu_kernel(enabled: bool = True) -> bool:
    """Run the scan on CPU (float32, float64) as one C++ loop over time instead of the chunked scan;
    returns whether it is on.

    The first call compiles rnndsl/csrc/linear_scan.cpp with torch's C++ extension builder (a C++
    compiler and ninja; about 20 seconds, cached on disk after that). If the build fails, a warning
    says why and the chunked scan stays. It adds in the order of the step-by-step loop, so its results
    are that loop's (the chunked scan's to rounding).
    """
    global _built, _kernel
    if enabled and _built is None:
        try:
            from torch.utils import cpp_extension  # function-level: only this opt-in needs the builder
            # No fused multiply-add, so every machine rounds as the step-by-step loop does. OpenMP, or
            # at::parallel_for (its OpenMP backend is all in the header) runs on one thread.
            _built = cpp_extension.load("rnndsl_linear_scan", [str(_KERNEL_SOURCE)],
                                        extra_cflags=["-O3", "-ffp-contract=off", "-fopenmp"],
                                        extra_ldflags=["-fopenmp"])
        except Exception as error:  # noqa: BLE001 (any build failure leaves the chunked scan in place)
            warnings.warn(f"rnndsl: the C++ linear scan did not build, the chunked scan stays: {error}",
                          RuntimeWarning, stacklevel=2)
    _kernel = _built if enabled else None
    return _kernel is not None


def cpu_kernel_enabled() -> bool:
    """Whether :func:`use_cpu_kernel` is on (and its kernel built)."""
    return _kernel is not None


def _kernel_runs(a: Tensor) -> bool:
    return _kernel is not None and a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64)


def linear_recurrence(a: Tensor, b: Tensor, s0: Tensor) -> Tensor:
    """All states s_1..s_T of ``s_t = a_t * s_{t-1} + b_t``, in parallel over time.

    ``a``, ``b``: ``(T, batch, hidden)``; ``s0``: ``(batch, hidden)``. Returns
    ``(T, batch, hidden)``. Differentiable in ``a``, ``b`` and ``s0``, twice too; under torch.func's
    transforms (vmap, grad, jacrev) it is the loop, which they batch and differentiate.
    """
    _check_inputs(a, b, s0)
    if plain_ops_needed():  # the autograd Function has no vmap or jvp rule
        return sequential_linear_recurrence(a, b, s0)
    if torch.compiler.is_compiling():  # the chunked scan's in-place writes as one op dynamo need not trace
        return torch.ops.rnndsl.linear_recurrence(a, b, s0)
    return _LinearRecurrence.apply(a, b, s0)


def along_steps(value: Union[Tensor, float], steps: int, s0: Tensor) -> Tensor:
    """A coefficient of a linear recurrence as the ``(T, batch, hidden)`` tensor
    :func:`linear_recurrence` takes.

    Per-step values already have that shape and pass through; a parameter vector
    or a number, shared by all steps, is broadcast as a view (autograd sums its gradient back).
    The coefficients take the state's dtype: under autocast, those made from products come in
    low precision, and the recurrence runs in the dtype the state is carried in (a no-op otherwise).
    """
    shape = (steps,) + tuple(s0.shape)
    if isinstance(value, Tensor):
        value = value.to(s0.dtype)
        return value if value.shape == shape else value.expand(shape)
    return s0.new_full(shape, value)


def sequential_linear_recurrence(a: Tensor, b: Tensor, s0: Tensor) -> Tensor:
    """The reference: one step at a time, differentiated by autograd."""
    _check_inputs(a, b, s0)
    states = []
    state = s0
    # unbind, not a[t]: autograd would back-propagate each a[t] into a zero
    # tensor of the full (T, batch, hidden) shape, making backward O(T^2).
    for a_t, b_t in zip(a.unbind(0), b.unbind(0)):
        state = a_t * state + b_t
        states.append(state)
    return torch.stack(states)


def _check_inputs(a: Tensor, b: Tensor, s0: Tensor) -> None:
    if a.dim() != 3 or a.size(0) == 0:
        raise ValueError(f"a must have shape (T, batch, hidden) with T >= 1, got {tuple(a.shape)}")
    if b.shape != a.shape:
        raise ValueError(f"b must have the shape of a, (T, batch, hidden) = {tuple(a.shape)}, "
                         f"got {tuple(b.shape)}")
    if s0.shape != a.shape[1:]:
        raise ValueError(f"s0 must have shape (batch, hidden) = {tuple(a.shape[1:])}, "
                         f"got {tuple(s0.shape)}")
    if not (a.dtype == b.dtype == s0.dtype):
        raise PlacementError(f"a, b and s0 must share a dtype, got {a.dtype}, {b.dtype}, {s0.dtype}")
    if not (a.device == b.device == s0.device):
        raise PlacementError(f"a, b and s0 must be on one device, got {a.device}, {b.device}, {s0.device}")


class _LinearRecurrence(torch.autograd.Function):
    """Forward and backward are both chunked scans; see the module docstring."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor, s0: Tensor) -> Tensor:
        states = _states(a, b, s0)
        # The states (and s0) only serve dL/da; a serves every gradient.
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(a, s0, states)
        else:
            ctx.save_for_backward(a, None, None)
        return states

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        a, s0, states = ctx.saved_tensors
        if plain_backward_needed([grad]):
            return _plain_backward(ctx.needs_input_grad, grad, a, s0, states)
        return _backward(ctx.needs_input_grad, grad, a, s0, states)


def _states(a: Tensor, b: Tensor, s0: Tensor) -> Tensor:
    """The forward scan on plain tensors, by the C++ loop where it runs."""
    if _kernel_runs(a):
        return _kernel.forward(a.contiguous(), b.contiguous(), s0.contiguous())
    return _scan(a, b, s0, reverse=False)


def _backward(needs: Sequence[bool], grad: Tensor, a: Tensor, s0: Optional[Tensor],
              states: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """The gradients of ``a``, ``b`` and ``s0`` (those ``needs`` asks for) by the reverse scan."""
    if states is not None and _kernel_runs(a):
        grads = _kernel.backward(grad.contiguous(), a.contiguous(), s0.contiguous(), states)
        return tuple(value if need else None for value, need in zip(grads, needs))
    # g_T = grad_T; earlier g_t follow the reverse scan with decay a_{t+1},
    # written straight into g so no shifted copy of a is made.
    g = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
    g[-1] = grad[-1]
    _scan(a[1:], grad[:-1], g[-1], reverse=True, out=g[:-1])
    grad_a = grad_s0 = None
    if needs[0]:
        grad_a = torch.empty_like(g)
        torch.mul(g[1:], states[:-1], out=grad_a[1:])
        torch.mul(g[0], s0, out=grad_a[0])
    if needs[2]:
        grad_s0 = a[0] * g[0]
    return grad_a, g, grad_s0


# Under torch.compile: the same scans as torch.library ops, opaque to dynamo (which cannot trace the
# in-place `out=` writes), with the reverse scan as the registered backward.
@torch.library.custom_op("rnndsl::linear_recurrence", mutates_args=())
def _linear_recurrence_op(a: Tensor, b: Tensor, s0: Tensor) -> Tensor:
    return _states(a, b, s0)


@_linear_recurrence_op.register_fake
def _linear_recurrence_shape(a: Tensor, b: Tensor, s0: Tensor) -> Tensor:
    return a.new_empty(a.shape)


@torch.library.custom_op("rnndsl::linear_recurrence_backward", mutates_args=())
def _linear_recurrence_backward_op(grad: Tensor, a: Tensor, s0: Tensor, states: Tensor) -> List[Tensor]:
    return list(_backward((True, True, True), grad.contiguous(), a, s0, states))


@_linear_recurrence_backward_op.register_fake
def _linear_recurrence_backward_shapes(grad: Tensor, a: Tensor, s0: Tensor, states: Tensor) -> List[Tensor]:
    return [a.new_empty(a.shape), a.new_empty(a.shape), s0.new_empty(s0.shape)]


def _save_for_op_backward(ctx: Any, inputs: Tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
    a, _, s0 = inputs
    ctx.save_for_backward(a, s0, output)


def _op_backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, ...]:
    return tuple(torch.ops.rnndsl.linear_recurrence_backward(grad, *ctx.saved_tensors))


_linear_recurrence_op.register_autograd(_op_backward, setup_context=_save_for_op_backward)


def _plain_backward(needs: Sequence[bool], grad: Tensor, a: Tensor, s0: Optional[Tensor],
                    states: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """The same gradients from plain ops, one step at a time: what autograd differentiates again
    (the saved ``a`` and ``states`` carry their own history) and what vmap batches."""
    decays, grads = a.unbind(0), grad.unbind(0)
    g = [grads[-1]]
    for t in range(len(grads) - 2, -1, -1):
        g.append(decays[t + 1] * g[-1] + grads[t])
    g = torch.stack(g[::-1])
    grad_a = torch.cat([(g[0] * s0).unsqueeze(0), g[1:] * states[:-1]]) if needs[0] else None
    return grad_a, g, (a[0] * g[0] if needs[2] else None)


def _scan(a: Tensor, b: Tensor, init: Tensor, reverse: bool,
          out: Optional[Tensor] = None) -> Tensor:
    """The scan on plain tensors (no autograd), into ``out`` when given.

    Forward: s_t = a_t * s_{t-1} + b_t from s_0 = ``init``. Reverse:
    s_t = a_t * s_{t+1} + b_t from s_{T+1} = ``init``.
    """
    if out is None:
        out = torch.empty(b.shape, dtype=b.dtype, device=b.device)
    steps = a.size(0)
    length = _chunk_length(steps, b.shape[1:].numel(), b.device)
    chunks = steps // length if length else 0
    if chunks < 2:
        _run(a.unbind(0), b.unbind(0), init, out.unbind(0), reverse)
        return out
    # The chunks cover whole multiples of `length`; the few steps left over
    # come last in scan order, so they run after the chunked body.
    body = chunks * length
    start = steps - body if reverse else 0
    tail = slice(0, start) if reverse else slice(body, steps)

    def by_chunk(x: Tensor) -> Tensor:
        # (body, ...) -> (chunks, length, ...). Splitting dim 0 is always a view,
        # whatever the strides (even for the expanded grads autograd hands back).
        return x[start:start + body].view(chunks, length, *x.shape[1:])

    a_chunked = by_chunk(a)
    decay = a_chunked.prod(1)
    if not bool(torch.isfinite(decay).all()):
        # Coefficients above 1 whose product over a chunk overflows, where the loop's states need
        # not (a later step's 0 or small gate undoes the growth): inf * 0 would be nan. The loop.
        _run(a.unbind(0), b.unbind(0), init, out.unbind(0), reverse)
        return out
    # One (chunks, ...) tensor per offset within a chunk: all chunks step together.
    a_at, b_at, out_at = a_chunked.unbind(1), by_chunk(b).unbind(1), by_chunk(out).unbind(1)
    # First pass: each chunk's end state from a zero start, kept in one small
    # buffer rather than written out, which saves a pass over memory.
    order = _order(length, reverse)
    local_ends = b_at[order[0]].clone()
    for t in order[1:]:
        torch.addcmul(b_at[t], a_at[t], local_ends, out=local_ends)
    ends = _scan(decay, local_ends, init, reverse)
    if reverse:
        entering = torch.cat([ends[1:], init.unsqueeze(0)])
        last = ends[0]
    else:
        entering = torch.cat([init.unsqueeze(0), ends[:-1]])
        last = ends[-1]
    _run(a_at, b_at, entering, out_at, reverse)
    _run(a[tail].unbind(0), b[tail].unbind(0), last, out[tail].unbind(0), reverse)
    return out


def _run(a: Sequence[Tensor], b: Sequence[Tensor], init: Tensor,
         out: Sequence[Tensor], reverse: bool) -> None:
    """The plain loop over the given steps."""
    state = init
    for t in _order(len(a), reverse):
        state = torch.addcmul(b[t], a[t], state, out=out[t])


def _order(steps: int, reverse: bool) -> range:
    """Step indices in scan order."""
    return range(steps - 1, -1, -1) if reverse else range(steps)


def _chunk_length(steps: int, width: int, device: torch.device) -> int:
    """Steps per chunk, or 0 to run the plain loop.

    sqrt(steps / 2) minimizes the 2 * length + steps / length ops of one level;
    capping it at 16 adds levels of recursion but makes each op wider, which
    ran 5-15% faster at T = 1024 and 4096 (lengths 8 to 32 all did about as
    well). On CPU, steps wider than ``_CPU_LOOP_WIDTH`` are bound by memory
    bandwidth, not per-op overhead, and the chunked scan's extra passes over
    memory make it slower than the loop.
    """
    if device.type == "cpu" and width > _CPU_LOOP_WIDTH:
        return 0
    return max(2, min(16, round(math.sqrt(steps / 2))))


# Measured on a 2-core EPYC (float32, one thread, forward, T = 128, 512, 2048):
# the chunked scan ran 1.4-2.1x faster than the loop at 2048 elements a step,
# 1.1-2.6x at 4096, and 0.4-1.0x (slower) at 8192. Other devices always chunk:
# a GPU kernel launch costs microseconds and moves megabytes meanwhile, so the
# loop stays launch-bound to far wider steps (reasoned, not measured here).
_CPU_LOOP_WIDTH = 4096
