"""A cell's generated methods as plain Python, bound to given parameters: the *twin* of a cell.

The generated methods read ``self.weight``, ``self.hidden``, ``self.training``. Run on
:func:`bound_view` instead of the cell, they compute with exactly the tensors given (the
saved inputs of a backward, a compiled graph's inputs, torch.func's wrapped ones), which
is what the recomputed backward (rnndsl/derived.py) and the compile path's op
(rnndsl/opaque.py) need.
"""
from __future__ import annotations

import types
from typing import List, Optional, Sequence, Tuple

from torch import Tensor


def bound_view(cell, parameters: Optional[Sequence[Tensor]] = None, training: Optional[bool] = None,
               buffers: Optional[Sequence[Tensor]] = None,
               constants: Optional[Sequence[object]] = None) -> types.SimpleNamespace:
    """A cell as its generated methods read it (``self.weight``, ``self.hidden``,
    ``self.training``), as plain attributes, with its parameters bound to ``parameters``, its
    buffers to ``buffers`` and its hyper-parameters to ``constants``, in declaration order
    (default: the cell's own now), and ``training`` (default: the cell's mode)."""
    parameters = parameters_of(cell) if parameters is None else parameters
    buffers = buffers_of(cell) if buffers is None else buffers
    constants = dict(zip(cell._python_methods._constant_names, constants_of(cell) if constants is None else constants))
    return types.SimpleNamespace(training=cell.training if training is None else training, **constants,
                                 **dict(zip(cell._buffer_names, buffers)), **dict(zip(cell._inits, parameters)))


def eager_forward_sequence(cell, xs: Tensor, state: Sequence[Tensor], mask: Optional[Tensor],
                           parameters: Optional[Sequence[Tensor]] = None, training: Optional[bool] = None,
                           inputs: Sequence[Tensor] = (), buffers: Optional[Sequence[Tensor]] = None,
                           constants: Optional[Sequence[object]] = None):
    """A cell's ``forward_sequence`` run as plain Python on :func:`bound_view`: (outputs, final state);
    ``inputs`` are its other inputs, in declaration order."""
    view = bound_view(cell, parameters, training, buffers, constants)
    return cell._python_methods.forward_sequence(view, xs, tuple(state), mask, *inputs)


def parameters_of(cell) -> List[Tensor]:
    """Every parameter in declaration order, the order of backward_sequence's gradients.

    Duplicates stay: torch.func.functional_call may bind one tensor to two parameters
    (networks with ``bias=False`` bind one zero vector to both biases).
    """
    return [p for _, p in named_parameters_of(cell)]


def named_parameters_of(cell) -> List[Tuple[str, Tensor]]:
    """The cell's parameters with their names, in declaration order, duplicates kept, as the cell's
    code reads them (a parametrized one computed)."""
    return [(name, getattr(cell, name)) for name in cell._inits]


def constants_of(cell) -> Tuple[object, ...]:
    """The hyper-parameters' values now (``cell.beta``), in the order of ``_constant_names``."""
    return tuple(getattr(cell, name) for name in cell._python_methods._constant_names)


def buffers_of(cell) -> List[Tensor]:
    """Every buffer in declaration order, as the cell's code reads them."""
    return [getattr(cell, name) for name in cell._buffer_names]
