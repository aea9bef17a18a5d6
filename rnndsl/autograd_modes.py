"""When a custom autograd Function's backward must be made of plain, differentiable torch ops.

rnndsl's Functions (the derived backward in rnndsl/derived.py, the parallel scan in
rnndsl/linear_scan.py, oneDNN's products in rnndsl/kernels.py) have fast backwards built
from in-place and ``out=`` kernels, which autograd cannot differentiate again and vmap
cannot batch. Each switches to plain ops when :func:`plain_backward_needed` says so.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``; False for a device autocast does not know (meta,
    where a forward only infers shapes), on which ``torch.is_autocast_enabled`` raises."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def forward_ad_active() -> bool:
    """Whether forward-mode AD is recording (a ``torch.autograd.forward_ad.dual_level`` is open:
    ``jacfwd``-style ``autograd.functional`` strategies, ``gradcheck(check_forward_ad=True)``,
    ``torch.func.linearize``)."""
    return torch.autograd.forward_ad._current_level >= 0


def plain_ops_needed() -> bool:
    """Whether the code running now must be plain torch ops, with no TorchScript kernel and no custom
    autograd Function: under torch.func's transforms (the Functions have no vmap rule) and under
    forward-mode AD (they have no jvp rule, and TorchScript's optimized graphs drop tangents after
    their first run: a silently zero derivative)."""
    return torch._C._are_functorch_transforms_active() or forward_ad_active()


def plain_backward_needed(grads: Sequence[Optional[Tensor]]) -> bool:
    """Whether the backward running now must be differentiable or batchable: under
    ``create_graph`` (grad mode is on inside the backward), under torch.func's transforms, or
    under the vmap behind ``autograd.grad(is_grads_batched=True)`` (``gradcheck``'s batched
    check, ``jacobian(vectorize=True)``), whose gradients come as batched tensors."""
    return (torch.is_grad_enabled() or torch._C._are_functorch_transforms_active()
            or any(g is not None and torch._C._functorch.is_legacy_batchedtensor(g) for g in grads))
