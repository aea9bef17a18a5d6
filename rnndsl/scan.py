"""Run a cell over time.

The scan knows nothing about the cell language: it runs any module with the
cell calling convention (rnnlib's gModule convention, in PyTorch idiom)::

    cell(state, x) -> (new_state, output)

where ``state`` is a tuple of ``(batch, size)`` tensors, ``x`` is
``(batch, input_size)`` and ``output`` is ``(batch, output_size)``.

A cell with several inputs takes the others by name, ``cell(state, x, enc=...)``, and
declares them in ``extra_inputs`` (name -> (size, read once per sequence)): the scan
gives it each one read at every step a step at a time, and the others whole.

A cell may also offer ``forward_sequence(xs, state, mask)`` that runs a whole
``(T, batch, input_size)`` sequence itself (cells built by rnndsl do: the loop
is compiled with the cell, input projections hoisted out of it). ``scan`` uses
it when present (unless the cell has forward hooks, which belong to its call: a step)
and falls back to a Python loop otherwise; under torch.export, that loop is one
``scan`` node too (:func:`exported_python_scan`), so a deep cell (a
``SequenceTable`` of cells) exports for any sequence length.

``mask`` is an optional ``(T, batch)`` bool tensor, True at real steps: at a
padded step the state is carried over unchanged and the output is zero, so each
sequence's final state is the one at its own last real step.

A sequence has at least one step: an empty one raises :class:`EmptySequenceError`
wherever it enters (``scan``, a cell's ``forward_sequence``, the networks).
"""
from __future__ import annotations

import itertools
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .errors import PlacementError

State = Tuple[Tensor, ...]


class EmptySequenceError(RuntimeError, ValueError):
    """A sequence of zero steps. A RuntimeError, as torch.nn.LSTM raises for one, and a
    ValueError, as rnndsl raises for every input that does not fit."""


def check_not_empty(xs: Tensor, where: str, time_dim: int = 0) -> None:
    """Raise :class:`EmptySequenceError` when the sequence ``xs``, whose steps run along
    ``time_dim`` (1 for a batch-first input, quoted as the user gave it), has no step.

    The message starts as torch.nn's does, so code matching torch's error matches ours.
    """
    if xs.size(time_dim) == 0:
        raise EmptySequenceError(f"Expected sequence length to be larger than 0 in RNN "
                                 f"({where} got a sequence of shape {tuple(xs.shape)})")


def scan(cell: torch.nn.Module, xs: Tensor, state: State,
         mask: Optional[Tensor] = None, **inputs: Tensor) -> Tuple[Tensor, State]:
    """Run ``cell`` over ``xs`` (T, batch, input) from ``state``; a cell with several inputs takes
    the others by name (``enc=``): ``(T, batch, n)`` where read at every step, ``(batch, n)`` where
    read once per sequence.

    Returns the outputs ``(T, batch, output_size)`` and the final state.
    """
    if not isinstance(xs, Tensor):
        raise ValueError(f"scan expects a (T, batch, input) tensor, got {type(xs).__name__}")
    # A compiled cell's own check says more of a wrong shape (images: flatten them).
    if xs.dim() != 3 and (xs.dim() < 2 or not hasattr(cell, "forward_sequence")):
        raise ValueError(f"scan expects a (T, batch, input) sequence, got shape {tuple(xs.shape)}")
    check_not_empty(xs, "scan")
    check_mask(mask, xs)
    if not isinstance(state, (tuple, list)):  # tuple() of a tensor would split it into its rows
        raise ValueError(f"scan: state must be a tuple of the cell's state tensors, as (h,) or (h, c), "
                         f"got {type(state).__name__}")
    state = tuple(state)
    forward_sequence = getattr(cell, "forward_sequence", None)
    if forward_sequence is not None and not has_step_hooks(cell):
        outputs, final = forward_sequence(xs, state, mask, **inputs)
        return outputs, tuple(final)
    if torch.compiler.is_exporting() and isinstance(cell, torch.nn.Module):
        if inputs:
            raise NotImplementedError("torch.export of a cell with several inputs is not supported yet")
        return exported_python_scan(cell, xs, state, mask)
    return python_scan(cell, xs, state, mask, inputs)


def has_step_hooks(cell: object) -> bool:
    """Whether ``cell`` has forward hooks of its own. A cell's call is one step, and so are its
    hooks: ``torch.nn.utils.prune`` and the old ``weight_norm`` compute a weight in a forward
    pre-hook, which a whole-sequence method would skip, running on a stale weight. Such a cell is
    stepped through its call, the hooks firing at every step."""
    return isinstance(cell, torch.nn.Module) and bool(cell._forward_pre_hooks or cell._forward_hooks)


def refuse_stepping_fixed_masks(cell: object) -> None:
    """A ValueError when ``cell`` (or a cell inside it), training, is about to be stepped through its
    call while built to draw its dropout masks once per sequence, which only its ``forward_sequence``
    does: each step would draw a new mask, silently."""
    modules = cell.modules() if isinstance(cell, torch.nn.Module) else ()
    for module in modules:
        if getattr(module, "_fixed_dropout_masks", False) and module.training:
            raise ValueError(f"cell {module.cell_name} was built with fixed_dropout_mask=True, which only its "
                             "whole-sequence method keeps, but here it runs a step at a time through its call "
                             "(for return_all_states, a forward hook, or several cells in one RecurrentTable), "
                             "which draws a new dropout mask at every step; train it without those, or build "
                             "it without fixed_dropout_mask")


def per_step_inputs(cell: object) -> Tuple[str, ...]:
    """The names of the inputs besides the first that ``cell`` reads at every step (its ``extra_inputs``)."""
    return tuple(name for name, (_, once) in getattr(cell, "extra_inputs", {}).items() if not once)


def check_mask(mask: Optional[Tensor], xs: Tensor) -> None:
    """Refuse a mask that is not a ``(T, batch)`` bool tensor beside ``xs``, naming what it is.

    Every way into a sequence (the scan, a cell's ``forward_sequence`` on either
    backend and scan mode, torch's fused kernels) goes through here: left to
    themselves, a float mask fails deep inside TorchScript and a ``(1, batch)``
    mask is broadcast over time by the parallel scan, silently.
    """
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a (T, batch) bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True at real steps), got {mask.dtype}; "
                         "convert it with mask.bool()")
    if tuple(mask.shape) != tuple(xs.shape[:2]):
        raise ValueError(f"mask must have shape (T, batch) = {tuple(xs.shape[:2])}, "
                         f"got {tuple(mask.shape)}")
    if mask.device != xs.device:
        raise PlacementError(f"mask is on {mask.device} but the input is on {xs.device}")


def zero_padded_steps(xs: Tensor, mask: Optional[Tensor]) -> Tensor:
    """``xs`` (T, batch, ...) with zeros where ``mask`` says a step is padding.

    What a padded step holds (often nan or garbage) must reach neither a real step's output nor a
    gradient, as with torch's packed sequences, which never read it. Carrying the state with
    ``where`` is not enough: the GEMMs over all steps (the hoisted input projection, the weight
    gradients) multiply a padded step's input by its zero gradient, and 0 * nan is nan."""
    if mask is None:
        return xs
    return xs.masked_fill(~mask.view(mask.shape + (1,) * (xs.dim() - 2)), 0)


def python_scan(cell: torch.nn.Module, xs: Tensor, state: State, mask: Optional[Tensor] = None,
                inputs: Optional[Dict[str, Tensor]] = None,
                per_step: Optional[Tuple[str, ...]] = None) -> Tuple[Tensor, State]:
    """The reference loop: one call of ``cell`` per step. ``inputs`` are the cell's others, by
    name; those named in ``per_step`` (default: :func:`per_step_inputs` of the cell) are
    ``(T, batch, n)`` and given a step at a time."""
    check_not_empty(xs, "python_scan")
    refuse_stepping_fixed_masks(cell)
    inputs = inputs or {}
    per_step = per_step_inputs(cell) if per_step is None else per_step
    xs = zero_padded_steps(xs, mask)
    steps = {name: zero_padded_steps(value, mask).unbind(0) for name, value in inputs.items() if name in per_step}
    outputs = []
    # unbind, not xs[t]: indexing at every step makes the backward zero-fill a whole
    # (T, batch, input) gradient per step, O(T^2).
    for t, x in enumerate(xs.unbind(0)):
        step_inputs = {name: steps[name][t] if name in steps else value for name, value in inputs.items()}
        new_state, output = cell(state, x, **step_inputs)
        if mask is not None:
            keep = mask[t].unsqueeze(1)
            new_state = _kept(keep, new_state, state)
            output = (tuple(torch.where(keep, o, 0) for o in output) if isinstance(output, tuple)
                      else torch.where(keep, output, 0))
        state = tuple(new_state)
        outputs.append(output)
    if isinstance(outputs[0], tuple):  # a cell with several outputs: a sequence of each
        return tuple(torch.stack(sequence) for sequence in zip(*outputs)), state
    return torch.stack(outputs), state


def _kept(keep: Tensor, new: State, old: State) -> State:
    """``new`` where ``keep``, else ``old``, tensor by tensor through any nesting (a deep cell's)."""
    if isinstance(new, Tensor):
        return torch.where(keep, new, old)
    return tuple(_kept(keep, n, o) for n, o in zip(new, old))


def exported_python_scan(cell: torch.nn.Module, xs: Tensor, state: State,
                         mask: Optional[Tensor] = None) -> Tuple[Tensor, State]:
    """:func:`python_scan` as one ``scan`` node, for torch.export: the program runs at any length.

    The step closes over no tensor (torch's scan op, called without dynamo, could not lift one):
    the cell's parameters and buffers come in as the op's inputs and the step runs the cell on
    them through ``functional_call``.
    """
    from .kernels import time_scan  # the scan op's convention, shared with the generated forward_sequence_scan
    named = dict(itertools.chain(cell.named_parameters(), cell.named_buffers()))
    keep_seq = mask if mask is not None else xs.new_ones(xs.shape[:2], dtype=torch.bool)

    # Whether the cell gives a tuple of outputs, from one step outside the loop (the program drops
    # it): the loop's body may not record it, which dynamo (strict=True) refuses as a side effect.
    several = isinstance(cell(state, xs[0])[1], tuple)

    def one_step(carry, step_inputs, invariants):
        x, keep = step_inputs[0], step_inputs[1].unsqueeze(1)
        new_state, output = torch.func.functional_call(cell, dict(zip(named, invariants)), (tuple(carry), x))
        # Fresh tensors, as scan requires (an output may be a state, or the input itself).
        return ([torch.where(keep, new, old) for new, old in zip(new_state, carry)],
                [torch.where(keep, o, 0) for o in (output if several else (output,))])

    final, outputs = time_scan(one_step, list(state), [xs, keep_seq], list(named.values()))
    return (tuple(outputs) if several else outputs[0]), tuple(final)
