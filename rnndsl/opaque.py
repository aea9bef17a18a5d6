"""What torch.compile sees of a scripted cell's sequence: one opaque ``torch.library`` op, with the
derived backward as its registered autograd formula.

Traced by dynamo, a cell's Python loop would be unrolled at the traced length (compile time
growing with T), and a ``scan`` node gives Inductor the recurrence but drops the derived
backward (on CPU it trains slower than TorchScript: see the README's compile table). So
under ``torch.compile`` a scripted cell's ``forward_sequence`` is the op
``rnndsl::sequence``: at run time it calls the TorchScript kernel's
``forward_sequence_saving`` (or ``forward_sequence`` when nothing needs a gradient), and its
backward is ``rnndsl::sequence_backward``, the kernel's ``backward_sequence``. Inductor
compiles the code around the op; the op itself is the fast loop, compiled once whatever T.

A custom op takes tensors and numbers, not modules: the cell travels as its ``id``, looked
up in :data:`_live_cells` (cells register themselves when built or unpickled), and its
parameters and buffers as the op's inputs, the buffers without a gradient: the op's methods
read only the tensors it is given, so its fake run sees fake tensors, never the module's real ones. The mode
and hyper-parameters are read when the op runs (a new value compiles nothing again) and saved
with its results as a tensor, so that the backward runs with the forward's. The op's
shapes for the compiler (its "fake" implementation) come from the cell's Python twin run
for one and for two steps on fake tensors: what changes with the length is per step.

An eager cell takes the same op, running its generated Python methods: slower per step than
TorchScript, but Inductor's own backward of a ``scan`` gave wrong gradients for some cells
in torch 2.13 (the GRU's ``bias_hh``, an LSTM network's ``weight_hh``; plain ``scan`` of a
tanh RNN was right), and a silently wrong gradient is the worst result a compile path can give.

These ops exist only inside compiled graphs of a process where rnndsl is imported:
``torch.export`` takes the ``scan`` form instead (rnndsl/codegen/scan.py), which runs with
torch alone.
"""
from __future__ import annotations

import functools
import weakref
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .twin import bound_view, constants_of

_live_cells: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()


def register(cell: torch.nn.Module) -> None:
    """Make ``cell`` reachable from the ops by its ``id`` (done when a scripted cell is built or unpickled)."""
    _live_cells[id(cell)] = cell


def _cell(cell_id: int) -> torch.nn.Module:
    try:
        return _live_cells[cell_id]
    except KeyError:
        raise RuntimeError("rnndsl::sequence: the cell this compiled graph was made for no longer exists; "
                           "compile the model again (torch._dynamo.reset())") from None


def settings_of(cell) -> List[float]:
    """The cell's mode and hyper-parameters now, as the ops take them: [training, *hyper-parameters]."""
    return [float(cell.training), *(float(value) for value in constants_of(cell))]


def _typed(cell, settings: List[float]) -> Tuple[bool, Tuple[object, ...]]:
    """``settings`` back as (training, hyper-parameters) of the types the cell holds (TorchScript
    attributes keep the type they were built with)."""
    return bool(settings[0]), tuple(type(now)(value) for now, value in zip(constants_of(cell), settings[1:]))


def _view(cell, params: List[Tensor], buffers: List[Tensor], settings: List[float]):
    training, constants = _typed(cell, settings)
    return bound_view(cell, params, training=training, buffers=buffers, constants=constants)


def _method(cell, name: str, params: List[Tensor], buffers: List[Tensor], settings: List[float]):
    """A generated method of ``cell`` bound to ``params``, ``buffers`` and ``settings`` (see
    :func:`settings_of`): the TorchScript kernel's for a scripted cell, the plain Python one for
    an eager cell."""
    if hasattr(cell, "call_kernel"):
        training, constants = _typed(cell, settings)
        return functools.partial(cell.call_kernel, name, parameters=params, buffers=buffers,
                                 settings=(training, *constants))
    return functools.partial(getattr(cell._python_methods, name), _view(cell, params, buffers, settings))


def _distinct(results: Sequence[Tensor], inputs: Sequence[Optional[Tensor]]) -> List[Tensor]:
    """``results`` made contiguous, as the ops' fake implementations promise and Inductor checks (a
    reduction's gradient is an expanded view), and with every tensor that shares memory with an
    input or an earlier result (the same tensor, or a view of it) replaced by a copy: a custom op's
    outputs may alias neither."""
    def storage(t: Tensor) -> int:
        return t.untyped_storage().data_ptr()

    taken = {storage(t) for t in inputs if t is not None and t.numel()}
    distinct = []
    for result in results:
        result = result.contiguous()
        if result.numel() and storage(result) in taken:
            result = result.clone()
        distinct.append(result)
        if result.numel():
            taken.add(storage(result))
    return distinct


@torch.library.custom_op("rnndsl::sequence", mutates_args=())
def sequence(cell_id: int, xs: Tensor, mask: Optional[Tensor], state: List[Tensor], params: List[Tensor],
             buffers: List[Tensor], saving: bool) -> List[Tensor]:
    """The cell's outputs, then its final state, then (when ``saving``) what its backward reads, flat,
    and the mode and hyper-parameters it ran with (:func:`settings_of`, a float64 tensor)."""
    cell = _cell(cell_id)
    # Read when the op runs, as the eager cell reads them: a value the trace fixed would compile the
    # graph again for every new value (a schedule), and fall back to eager after dynamo's limit.
    settings = settings_of(cell)
    if saving:
        outputs, final, saved = _method(cell, "forward_sequence_saving", params, buffers, settings)(
            xs, tuple(state), mask, params)
        saved = [*saved, torch.tensor(settings, dtype=torch.float64)]  # for the backward: the forward's
    else:
        outputs, final = _method(cell, "forward_sequence", params, buffers, settings)(xs, tuple(state), mask)
        outputs, saved = (list(outputs) if isinstance(outputs, tuple) else [outputs]), []
    return _distinct([*outputs, *final, *saved], [xs, mask, *state, *params, *buffers])


@sequence.register_fake
def _sequence_shapes(cell_id: int, xs: Tensor, mask: Optional[Tensor], state: List[Tensor],
                     params: List[Tensor], buffers: List[Tensor], saving: bool) -> List[Tensor]:
    cell = _cell(cell_id)
    settings = settings_of(cell)
    one, two = (_twin_results(cell, xs, mask, state, params, buffers, settings, saving, steps) for steps in (1, 2))
    steps = xs.size(0)
    # A result that grows with the length is per step: (T, ...) at the real length.
    results = [a.new_empty((steps, *a.shape[1:])) if a.dim() and b.dim() and a.size(0) == 1 and b.size(0) == 2
               else a.new_empty(a.shape) for a, b in zip(one, two)]
    return results + [torch.empty(len(settings), dtype=torch.float64)] * saving


def _twin_results(cell, xs: Tensor, mask: Optional[Tensor], state: List[Tensor], params: List[Tensor],
                  buffers: List[Tensor], settings: List[float], saving: bool, steps: int) -> List[Tensor]:
    """What :func:`sequence` returns, computed by the cell's Python twin for ``steps`` steps (on fake
    tensors: only the shapes count, so a sequence of one step gives two as well)."""
    view = _view(cell, params, buffers, settings)
    xs = xs.new_empty((steps, *xs.shape[1:]))
    mask = None if mask is None else mask.new_empty((steps, *mask.shape[1:]))
    # Grad mode on: the twin's products then take torch's matmul, which fake tensors support.
    with torch.enable_grad():
        if saving:
            outputs, final, saved = cell._python_methods.forward_sequence_saving(view, xs, tuple(state), mask, params)
            return [*outputs, *final, *saved]
        outputs, final = cell._python_methods.forward_sequence(view, xs, tuple(state), mask)
        return [*(outputs if isinstance(outputs, tuple) else (outputs,)), *final]


@torch.library.custom_op("rnndsl::sequence_backward", mutates_args=())
def sequence_backward(cell_id: int, xs: Tensor, mask: Optional[Tensor], params: List[Tensor], buffers: List[Tensor],
                      settings: Tensor, saved: List[Tensor], grad_outputs: List[Tensor],
                      grad_state: List[Tensor], need_input_grad: bool) -> List[Tensor]:
    """The gradients of xs (an empty tensor when not needed), of the initial state and of the
    parameters, with the forward's buffers and ``settings`` (the tensor :func:`sequence` saved)."""
    settings = settings.tolist()
    grad_xs, grad_initial, grad_params = _method(_cell(cell_id), "backward_sequence", params, buffers, settings)(
        xs, mask, params, saved, [g.contiguous() for g in grad_outputs], [g.contiguous() for g in grad_state],
        need_input_grad)
    grad_xs = grad_xs if need_input_grad else xs.new_empty(0)
    return _distinct([grad_xs, *grad_initial, *grad_params],
                     [xs, mask, *params, *buffers, *saved, *grad_outputs, *grad_state])


@sequence_backward.register_fake
def _sequence_backward_shapes(cell_id: int, xs: Tensor, mask: Optional[Tensor], params: List[Tensor],
                              buffers: List[Tensor], settings: Tensor, saved: List[Tensor],
                              grad_outputs: List[Tensor],
                              grad_state: List[Tensor], need_input_grad: bool) -> List[Tensor]:
    grad_xs = xs.new_empty(xs.shape) if need_input_grad else xs.new_empty(0)
    return [grad_xs, *(g.new_empty(g.shape) for g in grad_state), *(p.new_empty(p.shape) for p in params)]


def _setup_context(ctx, inputs: Tuple, output: List[Tensor]) -> None:
    cell_id, xs, mask, state, params, buffers, saving = inputs
    outputs = _cell(cell_id)._python_methods._output_count
    ctx.cell_id, ctx.counts = cell_id, (outputs, len(state), len(params), len(buffers))
    ctx.result_shapes = [r.shape for r in output[:outputs + len(state)]]
    ctx.need_input_grad = xs.requires_grad
    ctx.save_for_backward(xs, mask, *params, *buffers, *output[outputs + len(state):])


def _backward(ctx, grads: List[Optional[Tensor]]):
    xs, mask, *rest = ctx.saved_tensors
    outputs, states, parameters, buffer_count = ctx.counts
    params, rest = rest[:parameters], rest[parameters:]
    # The backward runs with the forward's buffers, mode and hyper-parameters, as autograd of the loop does.
    buffers, saved, settings = rest[:buffer_count], rest[buffer_count:-1], rest[-1]
    like = xs.new_zeros  # a result nothing used gets a zero gradient, as the derived backward expects
    grads = [g if g is not None else like(shape) for g, shape in zip(grads, ctx.result_shapes)]
    results = sequence_backward(ctx.cell_id, xs, mask, list(params), list(buffers), settings, list(saved),
                                grads[:outputs], grads[outputs:outputs + states], ctx.need_input_grad)
    grad_xs = results[0] if ctx.need_input_grad else None
    return None, grad_xs, None, results[1:1 + states], results[1 + states:], [None] * len(buffers), None


sequence.register_autograd(_backward, setup_context=_setup_context)


def forward_sequence(cell, xs: Tensor, state: Sequence[Tensor], mask: Optional[Tensor], params: List[Tensor],
                     buffers: List[Tensor], saving: bool):
    """``forward_sequence`` of ``cell`` through :func:`sequence`: (outputs, final state)."""
    results = torch.ops.rnndsl.sequence(id(cell), xs, mask, list(state), params, buffers, saving)
    outputs, states = cell._python_methods._output_count, len(state)
    final = tuple(results[outputs:outputs + states])
    return (results[0] if outputs == 1 else tuple(results[:outputs])), final
