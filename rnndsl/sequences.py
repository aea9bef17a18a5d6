"""Padded sequences: the mask of real steps from lengths, reversal within lengths, repacking.

A padded batch is a ``(T, batch, ...)`` tensor whose sequence ``b`` is real for its
first ``lengths[b]`` steps; the ``(T, batch)`` bool mask of those steps is what
:func:`rnndsl.scan.scan` and the cells' ``forward_sequence`` take.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence


def repack(outputs: Tensor, lengths: Tensor, like: PackedSequence) -> PackedSequence:
    """Pack padded ``outputs`` (T, batch, ...) with the order and batch sizes of ``like``."""
    if like.sorted_indices is not None:
        outputs = outputs.index_select(1, like.sorted_indices)
        lengths = lengths.index_select(0, like.sorted_indices.cpu())
    data = pack_padded_sequence(outputs, lengths, enforce_sorted=True).data
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


def refuse_packed_under_export(x: object, where: str) -> None:
    """Refuse a ``PackedSequence`` while torch.export traces ``where``, saying what to do instead.

    Its ``batch_sizes`` are data, not shapes: a program could only fix them at the traced values,
    and left to itself export fails deep inside ``pad_packed_sequence`` on a tensor without data.
    """
    if isinstance(x, PackedSequence) and torch.compiler.is_exporting():
        raise ValueError(f"{where}: torch.export cannot take a PackedSequence (its batch_sizes are data the "
                         "program would fix at the traced values); export with the padded (T, batch, input) "
                         "tensor instead (torch.nn.utils.rnn.pad_packed_sequence), and for sequences of "
                         "different lengths use an rnndsl network, whose forward takes lengths=")


def lengths_mask(lengths: Union[Tensor, Sequence[int]], steps: int, batch_size: int,
                 device: torch.device) -> Optional[Tensor]:
    """The (T, batch) mask of real steps for sequences of the given lengths;
    None when every sequence fills all ``steps``, so no masking is needed."""
    try:
        lengths = torch.as_tensor(lengths)
    except (TypeError, RuntimeError, ValueError):  # torch's words would be "could not infer dtype of NoneType"
        raise ValueError(f"lengths must be a tensor or a sequence of whole numbers of steps, got {lengths!r}") from None
    if tuple(lengths.shape) != (batch_size,):
        raise ValueError(f"lengths must have shape ({batch_size},), one per sequence, "
                         f"got {tuple(lengths.shape)}")
    if lengths.device.type == "meta":  # no values to check or mask by
        raise ValueError("lengths are on the meta device, which holds no values; give them on the CPU or the "
                         "input's device")
    if lengths.numel() == 0:  # an empty batch: no sequence to mask
        return None
    if torch.compiler.is_compiling():
        # The values are unknown while tracing: checked when the graph runs, and the mask always made.
        if lengths.dtype == torch.bool or lengths.is_complex():
            raise ValueError(f"lengths must be whole numbers of steps, got {lengths.dtype}")
        valid = (lengths == lengths.trunc()).all() & (lengths >= 1).all() & (lengths <= steps).all()
        torch._assert_async(valid, "lengths must be whole numbers of steps in [1, T]")
        return torch.arange(steps, device=device).unsqueeze(1) < lengths.to(device).unsqueeze(0)
    # A length of 2.5 would otherwise run 3 steps (torch's packing truncates it to 2): neither is
    # clearly what was meant, so only whole numbers are steps.
    whole = lengths.dtype != torch.bool and not lengths.is_complex() and \
        bool((lengths.isfinite() & (lengths == lengths.trunc())).all())
    if not whole:
        raise ValueError(f"lengths must be whole numbers of steps, got {lengths.tolist()} ({lengths.dtype})")
    shortest, longest = int(lengths.min()), int(lengths.max())
    if shortest < 1 or longest > steps:
        raise ValueError(f"lengths must lie in [1, {steps}] for a sequence of {steps} steps, "
                         f"got {lengths.tolist()}")
    if shortest == steps:
        return None
    lengths = lengths.to(device)
    return torch.arange(steps, device=device).unsqueeze(1) < lengths.unsqueeze(0)


def prefix_of(mask: Tensor) -> Tensor:
    """The (T, batch) mask with each sequence's count of real steps at its start."""
    return torch.arange(mask.size(0), device=mask.device).unsqueeze(1) < mask.sum(0).unsqueeze(0)


def first_gap(mask: Tensor) -> Optional[int]:
    """The first sequence of a (T, batch) mask whose real steps are not a prefix (padding before
    a real step), or None when every sequence's are, as :func:`lengths_mask` makes them."""
    gapped = (mask != prefix_of(mask)).any(0).nonzero()
    return int(gapped[0]) if gapped.numel() else None


def reverse_padded(xs: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
    """Reverse each sequence of ``xs`` (T, batch, ...) within its own length.

    Padded steps stay where they are, so reversing twice is the identity.
    """
    if lengths is None:
        return xs.flip(0)
    steps = torch.arange(xs.size(0), device=xs.device).unsqueeze(1)
    lengths = lengths.to(xs.device).unsqueeze(0)
    index = torch.where(steps < lengths, lengths - 1 - steps, steps)
    index = index.reshape(index.shape + (1,) * (xs.dim() - 2)).expand_as(xs)
    return xs.gather(0, index)
