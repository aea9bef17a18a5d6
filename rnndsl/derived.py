"""The derived backward at run time: the autograd Function around a scripted cell's
generated ``forward_sequence_saving`` and ``backward_sequence`` (their source comes from
rnndsl/codegen/backward.py), and the rule for when ``ScriptedCell.forward_sequence`` uses it.

Add here what a scripted cell does at run time with the derived backward (when it runs,
how its gradients reach autograd, the fallback to autograd of the loop run as Python).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import opaque
from .twin import buffers_of, constants_of, eager_forward_sequence, parameters_of
from .autograd_modes import autocast_enabled, plain_backward_needed


class DerivedSequence(torch.autograd.Function):
    """A whole sequence through a cell, with the backward derived from its equations.

    ``apply(cell, xs, mask, (state_count, input_count), *state, *parameters, *inputs)`` (for a cell of
    one input, ``apply(cell, xs, mask, state_count, *state, *parameters)``) returns the
    outputs then the final state, flat; ``inputs`` are the cell's inputs besides ``xs``, in
    declaration order; the cell is a scripted rnndsl cell with the generated methods. Both
    methods get the parameter tensors of ``apply`` itself, never the module's attributes, so the
    backward differentiates exactly what the forward computed with (tied, parametrized or
    functional_call'd weights), and autograd's version counters catch in-place edits between.

    Where the derived backward cannot serve, a gradient that must itself be differentiable
    (``create_graph=True``) or a batched one (``torch.func``, ``gradcheck``'s batched check),
    the backward recomputes the forward with autograd instead (:func:`_recomputed_gradients`).

    The backward runs with the forward's hyper-parameters, mode and buffers, as autograd of the eager
    loop does: one reassigned in between (``cell.beta = 0.25``, a new buffer tensor) does not change
    the gradient, and a buffer changed in place is caught by its version counter.
    """

    @staticmethod
    def forward(ctx, cell, xs: Tensor, mask: Optional[Tensor], counts: Union[int, Tuple[int, int]], *tensors: Tensor):
        state_count, input_count = counts if isinstance(counts, tuple) else (counts, 0)  # one input: the state's count
        state, parameters = tuple(tensors[:state_count]), list(tensors[state_count:len(tensors) - input_count])
        inputs = [list(tensors[len(tensors) - input_count:])] if input_count else []
        outputs, final, saved = cell.call_kernel("forward_sequence_saving", xs, state, mask, parameters, *inputs)
        ctx.cell, ctx.training, ctx.constants = cell, cell.training, constants_of(cell)
        buffers = buffers_of(cell)
        ctx.counts = (len(outputs), len(tensors), state_count, input_count, len(buffers))
        ctx.save_for_backward(xs, mask, *tensors, *buffers, *saved)
        return (*outputs, *final)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        xs, mask, *rest = ctx.saved_tensors
        output_count, tensor_count, state_count, input_count, buffer_count = ctx.counts
        tensors, buffers = rest[:tensor_count], rest[tensor_count:tensor_count + buffer_count]
        saved = rest[tensor_count + buffer_count:]
        if plain_backward_needed(grads):
            return (None, *_recomputed_gradients(ctx, xs, mask, tensors, buffers, grads))
        need_input_grad = bool(ctx.needs_input_grad[1])
        inputs = [list(tensors[tensor_count - input_count:])] if input_count else []
        # grad_params ends with the other inputs' gradients, as tensors ends with them.
        grad_xs, grad_state, grad_params = ctx.cell.call_kernel(
            "backward_sequence", xs, mask, list(tensors[state_count:tensor_count - input_count]), saved,
            [g.contiguous() for g in grads[:output_count]], [g.contiguous() for g in grads[output_count:]],
            need_input_grad, *inputs,
            buffers=buffers, settings=(ctx.training, *ctx.constants))  # the forward's
        grad_xs, *rest = _in_memory_of_their_own([grad_xs if need_input_grad else None, *grad_state,
                                                   *grad_params])
        return (None, grad_xs, None, None, *rest)


def _in_memory_of_their_own(grads: Sequence[Optional[Tensor]]) -> List[Optional[Tensor]]:
    """``grads`` with a copy of each one whose memory overlaps an earlier one's.

    The generated backward may return one tensor as two gradients (bias_ih and bias_hh of a sum),
    or a state's gradient as a row of the input's (a cell that adds its input to its state); the
    caller, or autograd keeping them as two ``.grad``, could then change one by writing the other.
    Disjoint slices of one buffer (weights joined by the passes) stay as they are.
    """
    spans: List[Tuple[int, int]] = []
    distinct: List[Optional[Tensor]] = []
    for grad in grads:
        if grad is None or grad.numel() == 0:
            distinct.append(grad)
            continue
        first, past = _span(grad)
        if any(first < end and start < past for start, end in spans):
            grad = grad.clone()
            first, past = _span(grad)
        spans.append((first, past))
        distinct.append(grad)
    return distinct


def _span(tensor: Tensor) -> Tuple[int, int]:
    """The addresses from ``tensor``'s first element to past its last."""
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return tensor.data_ptr(), tensor.data_ptr() + (last + 1) * tensor.element_size()


def _recomputed_gradients(ctx, xs: Tensor, mask: Optional[Tensor], tensors: Sequence[Tensor],
                          buffers: Sequence[Tensor], grads: Sequence[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """DerivedSequence's gradients for ``(xs, mask, state_count, *tensors)`` by autograd through
    the generated loop run again as plain Python on the saved inputs.

    The saved inputs keep their own history, so with ``create_graph`` the gradients are
    differentiable in everything they depend on; under torch.func's vmap the grads come batched
    and the plain ops batch them.
    """
    _, tensor_count, state_count, input_count, _ = ctx.counts
    needs = ctx.needs_input_grad
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        # A view per argument: its gradient is that argument's share alone, even where one tensor
        # fills two (tied weights; networks' shared zero biases), and it keeps the graph back to
        # the tensor for the next derivative.
        arguments = [t.view_as(t) if need else t for t, need in zip((xs, *tensors), (needs[1], *needs[4:]))]
        inner_xs, inner = arguments[0], arguments[1:]
        parameters, inputs = inner[state_count:tensor_count - input_count], inner[tensor_count - input_count:]
        outputs, final = eager_forward_sequence(ctx.cell, inner_xs, inner[:state_count], mask,
                                                parameters, ctx.training, inputs, buffers, ctx.constants)
        results = (*(outputs if isinstance(outputs, tuple) else (outputs,)), *final)
        # A result that depends on nothing differentiated (a state that only doubles itself, from a
        # start that needs no gradient) contributes nothing, and autograd.grad refuses it.
        pairs = [(result, grad) for result, grad in zip(results, grads) if result.requires_grad]
        wanted = [i for i, need in enumerate((needs[1], *needs[4:])) if need]
        found = torch.autograd.grad([r for r, _ in pairs], [arguments[i] for i in wanted], [g for _, g in pairs],
                                    create_graph=create_graph, allow_unused=True,
                                    materialize_grads=True) if pairs else [None] * len(wanted)
    gradients: List[Optional[Tensor]] = [None] * (1 + tensor_count)
    for index, grad in zip(wanted, found):
        gradients[index] = grad
    return (gradients[0], None, None, *gradients[1:])


def uses_derived_backward(cell, xs: Tensor, state: Sequence[Tensor], inputs: Sequence[Tensor] = ()) -> bool:
    """Whether ``forward_sequence`` should run through :class:`DerivedSequence`.

    Only when autograd records and something needs a gradient, the cell was built with the
    derived backward, and it is not training with random ops (their noise is not saved).
    """
    if torch.jit.is_tracing():
        return False
    return _records(xs, (*state, *inputs), cell) and derived_backward_serves(cell) and not _buffer_needs_grad(cell)


def _buffer_needs_grad(cell) -> bool:
    """Whether a buffer was swapped for a tensor that needs a gradient (``functional_call`` with a
    buffer's name): the derived backward gives none to buffers, autograd of the loop does."""
    return any(b.requires_grad for b in buffers_of(cell))


def derived_backward_serves(cell) -> bool:
    """Whether the cell has the derived backward and may train with it: not while training with
    random ops (their noise is not saved)."""
    return hasattr(cell._python_methods, "backward_sequence") and not (cell.training
                                                                       and not cell.derived_backward_trains)


def _records(xs: Tensor, state: Sequence[Tensor], cell) -> bool:
    """Whether autograd records this sequence: grad mode on and something needs a gradient."""
    return torch.is_grad_enabled() and (xs.requires_grad or any(s.requires_grad for s in state)
                                        or any(p.requires_grad for p in parameters_of(cell)))


def derived_forward_sequence(cell, xs: Tensor, state: Sequence[Tensor], mask: Optional[Tensor],
                             inputs: Sequence[Tensor] = ()):
    """``forward_sequence`` through :class:`DerivedSequence`: (outputs, final state)."""
    state = tuple(state)
    results = DerivedSequence.apply(cell, xs, mask, (len(state), len(inputs)), *state, *parameters_of(cell),
                                    *inputs)
    outputs = results[:len(results) - len(state)]
    return (outputs[0] if len(outputs) == 1 else tuple(outputs)), tuple(results[len(outputs):])


def compiled_forward_sequence(cell, xs: Tensor, state: Sequence[Tensor], mask: Optional[Tensor]):
    """``forward_sequence`` under torch.compile: the TorchScript loop as one opaque op, trained by
    the derived backward (rnndsl/opaque.py); None where that cannot serve (autograd records but the
    cell cannot train with the derived backward; autocast), and the caller then runs the Python loop,
    which dynamo unrolls."""
    saving = _records(xs, state, cell)
    if saving and (not derived_backward_serves(cell) or _buffer_needs_grad(cell)):
        return None
    if autocast_enabled(xs.device.type):
        return None  # the op's backward would see autocast's mixed dtypes, which autograd alone undoes
    return opaque.forward_sequence(cell, xs, tuple(state), mask, parameters_of(cell), buffers_of(cell), saving)
