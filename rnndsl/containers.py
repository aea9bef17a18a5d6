"""Containers that assemble cells into networks: rnnlib's low-level API.

Each container follows the cell calling convention, lifted from one step to a
whole sequence::

    module(state, xs, mask=None) -> (final_state, outputs)

with ``xs`` a ``(T, batch, input)`` sequence and ``mask`` an optional
``(T, batch)`` bool tensor, True at real steps (see :mod:`rnndsl.scan`). A cell with
several inputs takes the others by name, ``module(state, xs, mask, enc=...)``; every
container passes each to the layers whose cells declare it (``extra_inputs``). Because
the convention is the same at every level, containers nest:

- :class:`RecurrentTable` runs one cell over time (a scan);
- :class:`SequenceTable` chains modules over depth, each module's outputs
  feeding the next and the state being a tuple of per-module states; chaining
  cells gives a deep cell, which a ``RecurrentTable`` then unrolls depth-first;
- :class:`Bidirectional` pairs a forward layer with one that reads each
  sequence backwards within its own length;
- :func:`setup_recurrent` wraps a network in :class:`RecurrentNetwork`, which
  takes ``forward(x, state=None, lengths=None)``, makes the initial state and
  carries the final state over to the next call (truncated BPTT).

Under ``torch.autocast`` the cells run their matrix products in autocast's
low-precision dtype and carry their state in the parameters' dtype (float32):
a state rounded to bfloat16 at every step drifts over long sequences
(``python -m bench.bench_precision``). A :class:`RecurrentNetwork` then takes
an input (and a state) in autocast's dtype too, as torch.nn's layers do, and
returns its outputs and final state in the parameters' dtype.

States may nest (a tuple of per-layer tuples of tensors); containers that
expose ``input_size``, ``output_size``, ``state_sizes`` and ``state_names``
mirror that nesting so that initial states and shape checks come for free.
"""
from __future__ import annotations

import itertools
import operator
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from .autograd_modes import autocast_enabled
from .errors import PlacementError
from .scan import check_mask, check_not_empty, per_step_inputs, scan
from .sequences import first_gap, lengths_mask, prefix_of, refuse_packed_under_export, repack, reverse_padded

StateTree = Union[Tensor, Tuple["StateTree", ...]]
InitFunction = Callable[..., StateTree]


def map_state(fn: Callable[[Tensor], Tensor], state: StateTree) -> StateTree:
    """Apply ``fn`` to every tensor of a nested state, keeping its nesting."""
    if isinstance(state, Tensor):
        return fn(state)
    return tuple(map_state(fn, part) for part in state)


def _flatten(state: StateTree, leaf: type = Tensor) -> Tuple[List[Tensor], Any]:
    """The tensors of a nested state in order, and the nesting to rebuild it (of a module's
    ``state_sizes``, with ``leaf=int``: the sizes)."""
    if isinstance(state, leaf):
        return [state], None
    leaves, layout = [], []
    for part in state:
        part_leaves, part_layout = _flatten(part, leaf)
        leaves += part_leaves
        layout.append((len(part_leaves), part_layout))
    return leaves, layout


def _unflatten(leaves: Sequence[Tensor], layout: Any) -> StateTree:
    if layout is None:
        return leaves[0]
    parts, start = [], 0
    for count, part_layout in layout:
        parts.append(_unflatten(leaves[start:start + count], part_layout))
        start += count
    return tuple(parts)


class _FlatStateCell(nn.Module):
    """Shows a cell with a nested state to the scan as one with a flat state,
    so that masking (which works tensor by tensor) applies to every layer. A module, so that
    the scan finds the cell's parameters (under torch.export it passes them to the step)."""

    def __init__(self, cell: Callable, layout: Any) -> None:
        super().__init__()
        self.cell = cell
        self.layout = layout

    @property
    def extra_inputs(self) -> Dict[str, Tuple[int, bool]]:
        return extra_inputs_of(self.cell)

    def forward(self, state: Tuple[Tensor, ...], x: Tensor, **inputs: Tensor) -> Tuple[Tuple[Tensor, ...], Tensor]:
        new_state, output = self.cell(_unflatten(state, self.layout), x, **inputs)
        return tuple(_flatten(new_state)[0]), output


class _StatesAsOutputCell(nn.Module):
    """Shows a cell to the scan as one whose output is its output and its new state, joined, for
    ``return_all_states``. A module, as :class:`_FlatStateCell`: under torch.export the scan takes
    it as one ``scan`` node, whatever the length."""

    def __init__(self, cell: Callable) -> None:
        super().__init__()
        self.cell = cell

    @property
    def extra_inputs(self) -> Dict[str, Tuple[int, bool]]:
        return extra_inputs_of(self.cell)

    def forward(self, state: Tuple[Tensor, ...], x: Tensor, **inputs: Tensor) -> Tuple[Tuple[Tensor, ...], Tensor]:
        new_state, output = self.cell(state, x, **inputs)
        return new_state, torch.cat([first_output(output), *_flatten(new_state)[0]], -1)


def extra_inputs_of(*modules: nn.Module) -> Dict[str, Tuple[int, bool]]:
    """The inputs besides the first that these modules' cells declare: name -> (size, read once per sequence)."""
    found: Dict[str, Tuple[int, bool]] = {}
    for module in modules:
        for name, declared in getattr(module, "extra_inputs", {}).items():
            found.setdefault(name, declared)
    return found


def inputs_for(module: nn.Module, inputs: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Of ``inputs``, those ``module``'s cells declare."""
    declared = getattr(module, "extra_inputs", {})
    return {name: value for name, value in inputs.items() if name in declared}


def check_input_names(module: nn.Module, inputs: Dict[str, Tensor], where: str, batch_first: bool = False) -> None:
    """Refuse inputs that no cell of ``module`` declares, naming those it does (a missing one in the
    caller's layout)."""
    declared = extra_inputs_of(module)
    unknown = [name for name in inputs if name not in declared]
    if unknown:
        takes = (f"its cells' other inputs are {', '.join(declared)}" if declared
                 else "its cells take one input each")
        raise ValueError(f"{where} has no input named {', '.join(map(repr, unknown))}: {takes}")
    for name, (size, once) in declared.items():
        if name not in inputs:
            shape, when = ("(batch, ", "once per sequence") if once else \
                (f"{'(batch, T, ' if batch_first else '(T, batch, '}", "at every step")
            raise ValueError(f"{where}: missing input {name}, a {shape}{size}) tensor its cells read {when}; "
                             f"pass it by name, as in net(x, {name}=...)")


def cell_sizes(cell: nn.Module) -> str:
    """The sizes a cell declares, for a container's repr."""
    return ", ".join(f"{key}={getattr(cell, key)}" for key in ("input_size", "hidden_size")
                     if hasattr(cell, key))


class RecurrentTable(nn.Module):
    """Runs one cell over time: rnnlib's ``nn.RecurrentTable``.

    ``forward(state, xs, mask=None) -> (final_state, outputs)``. The cell may be
    any module with the cell calling convention, including a
    :class:`SequenceTable` of cells (a deep cell with a nested state).
    """

    def __init__(self, cell: nn.Module, return_states: bool = False) -> None:
        super().__init__()
        self.cell = cell
        self.return_states = return_states

    @property
    def input_size(self) -> int:
        return self.cell.input_size

    @property
    def output_size(self) -> int:
        return self.cell.output_size

    @property
    def state_sizes(self):
        return self.cell.state_sizes

    @property
    def state_names(self):
        return self.cell.state_names

    @property
    def extra_inputs(self) -> Dict[str, Tuple[int, bool]]:
        return extra_inputs_of(self.cell)

    def extra_repr(self) -> str:
        return cell_sizes(self.cell)

    def forward(self, state: StateTree, xs: Tensor,
                mask: Optional[Tensor] = None, **inputs: Tensor) -> Tuple[StateTree, Tensor]:
        check_module_state(self.cell, state, "RecurrentTable")
        if self.return_states:
            return self._forward_with_states(state, xs, mask, inputs)
        leaves, layout = _flatten(state)
        if all(part_layout is None for _, part_layout in layout):
            outputs, final = scan(self.cell, xs, tuple(leaves), mask, **inputs)
            return final, outputs
        outputs, final = scan(_FlatStateCell(self.cell, layout), xs, tuple(leaves), mask, **inputs)
        return _unflatten(final, layout), outputs


    def _forward_with_states(self, state: StateTree, xs: Tensor, mask: Optional[Tensor], inputs: Dict[str, Tensor]):
        """``(final_state, (outputs, states))``: ``states`` the state after every step, each
        ``(T, batch, size)`` (zero at padded steps, as the outputs). A Python loop over steps,
        since the compiled loop keeps no state but the last."""
        joined, final = scan(_StatesAsOutputCell(self.cell), xs, tuple(state), mask, **inputs)
        sizes, layout = _flatten(self.state_sizes, leaf=int)  # a deep cell's are nested
        outputs, *states = joined.split([self.output_size] + sizes, -1)
        return final, (outputs, _unflatten(states, layout))


class SequenceTable(nn.Module):
    """Chains modules over depth: rnnlib's ``nn.SequenceTable`` along layers.

    Module ``i`` takes ``state[i]`` and the previous module's output, so the
    state is a tuple with one entry per module. The modules may be layers
    (``(state, xs, mask)``, as :class:`RecurrentTable`) or cells (one step;
    wrap the table in a :class:`RecurrentTable` to unroll depth-first).
    ``dropout`` applies to every module's input but the first, as in
    ``torch.nn.LSTM``. With ``return_all=True`` the output is the tuple of
    every module's outputs instead of the last one's. A module whose cell has
    several outputs (``-> y, z``) feeds its first to the next module; the last
    module's outputs are returned, all of them. Inputs given by name (``enc=``) go to
    every module whose cells declare them.
    """

    def __init__(self, modules: Sequence[nn.Module], dropout: float = 0.0,
                 return_all: bool = False) -> None:
        super().__init__()
        if len(modules) == 0:
            raise ValueError("SequenceTable needs at least one module")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must lie in [0, 1], got {dropout}")
        self.layers = nn.ModuleList(modules)
        self.dropout = dropout
        self.return_all = return_all
        # Where dropout draws, when set: the (step, sequence) positions of the real steps, flattened,
        # in the order of a PackedSequence's data, so that a drop-in given one draws torch.nn's masks
        # (torch drops the packed data). None: over the whole (T, batch, features) input.
        self.dropout_rows: Optional[Tensor] = None

    @property
    def input_size(self) -> int:
        return self.layers[0].input_size

    @property
    def output_size(self) -> int:
        return self.layers[-1].output_size

    @property
    def state_sizes(self):
        return tuple(layer.state_sizes for layer in self.layers)

    @property
    def state_names(self):
        return tuple(layer.state_names for layer in self.layers)

    @property
    def extra_inputs(self) -> Dict[str, Tuple[int, bool]]:
        return extra_inputs_of(*self.layers)

    def extra_repr(self) -> str:
        return ", ".join([f"dropout={self.dropout}"] * bool(self.dropout)
                         + ["return_all=True"] * self.return_all)

    def forward(self, state: Sequence[StateTree], x: Tensor,
                mask: Optional[Tensor] = None, **inputs: Tensor):
        if not isinstance(state, (tuple, list)) or len(state) != len(self.layers):  # each layer checks its entry
            check_module_state(self, state, "SequenceTable")
        check_input_names(self, inputs, "SequenceTable")
        finals, outputs, steps = [], [], []
        for depth, (layer, layer_state) in enumerate(zip(self.layers, state)):
            if depth > 0:
                x = first_output(x)
                if self.dropout > 0:
                    x = self._dropped(x)
            given = inputs_for(layer, inputs)
            layer_state, x = layer(layer_state, x, **given) if mask is None else layer(layer_state, x, mask, **given)
            if getattr(layer, "return_states", False):  # (outputs, the state after every step)
                x, layer_steps = x
                steps.append(layer_steps)
            finals.append(layer_state)
            outputs.append(x)
        result = tuple(outputs) if self.return_all else x
        return tuple(finals), (result, tuple(steps)) if steps else result

    def _dropped(self, x: Tensor) -> Tensor:
        if self.dropout_rows is None or not self.training:
            return nn.functional.dropout(x, self.dropout, self.training)
        flat = x.reshape(-1, x.size(-1))
        dropped = nn.functional.dropout(flat[self.dropout_rows], self.dropout, True)
        return flat.index_copy(0, self.dropout_rows, dropped).view_as(x)


def check_module_state(module: object, state: object, where: str) -> None:
    """:func:`check_nesting` of ``state`` against ``module``'s ``state_sizes``, where it declares them
    (a user's own cell may not)."""
    try:
        sizes = module.state_sizes
    except AttributeError:  # a user's cell, or a container of one
        return
    check_nesting(state, sizes, f"{where}: state")


def first_output(outputs: Union[Tensor, Tuple[Tensor, ...]]) -> Tensor:
    """What the next layer reads of a layer's outputs: the first, for a cell with several."""
    return outputs[0] if isinstance(outputs, tuple) else outputs


class Bidirectional(nn.Module):
    """A forward and a reverse layer over the same sequence, outputs concatenated.

    The reverse layer reads each sequence backwards within its own length (the
    mask must be True on a prefix of each sequence, as ``lengths`` give). With
    ``reverse=None`` both directions run ``forward_layer``: the weights are
    shared (rnnlib's ``sharefields``) while each direction keeps its own state.
    The state is ``(forward_state, reverse_state)``.
    """

    def __init__(self, forward_layer: nn.Module, reverse: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.fwd = forward_layer
        self.rev = reverse

    @property
    def shares_weights(self) -> bool:
        return self.rev is None

    @property
    def reverse_layer(self) -> nn.Module:
        return self.fwd if self.rev is None else self.rev

    @property
    def input_size(self) -> int:
        return self.fwd.input_size

    @property
    def output_size(self) -> int:
        return self.fwd.output_size + self.reverse_layer.output_size

    @property
    def state_sizes(self):
        return (self.fwd.state_sizes, self.reverse_layer.state_sizes)

    @property
    def state_names(self):
        return (self.fwd.state_names, self.reverse_layer.state_names)

    @property
    def extra_inputs(self) -> Dict[str, Tuple[int, bool]]:
        return extra_inputs_of(self.fwd, self.reverse_layer)

    def forward(self, state: Tuple[StateTree, StateTree], xs: Tensor,
                mask: Optional[Tensor] = None, **inputs: Tensor) -> Tuple[Tuple[StateTree, StateTree], Tensor]:
        if not isinstance(state, (tuple, list)) or len(state) != 2:  # each direction's layer checks its entry
            check_module_state(self, state, "Bidirectional")
        check_mask(mask, xs)  # before reading it for the lengths
        forward_state, reverse_state = state
        lengths = None if mask is None else mask.sum(0)
        if mask is not None:
            needs = ("Bidirectional needs a mask True on a prefix of each sequence, as lengths= gives (the reverse "
                     "direction starts at each sequence's last real step)")
            if torch.compiler.is_compiling():  # the mask's values are unknown while tracing: checked when it runs
                torch._assert_async((mask == prefix_of(mask)).all(), needs)
            else:
                late = first_gap(mask)
                if late is not None:
                    raise ValueError(f"{needs}; sequence {late}'s has padding before a real step")
        forward_final, forward_out = self.fwd(forward_state, xs, mask, **inputs_for(self.fwd, inputs))
        # The reverse layer reads the inputs of every step backwards too; per-sequence ones as they are.
        per_step = per_step_inputs(self.reverse_layer)
        reversed_inputs = {name: reverse_padded(value, lengths) if name in per_step else value
                           for name, value in inputs_for(self.reverse_layer, inputs).items()}
        reverse_final, reverse_out = self.reverse_layer(reverse_state, reverse_padded(xs, lengths), mask,
                                                        **reversed_inputs)
        if isinstance(forward_out, tuple):  # a cell with several outputs: each joined on its own
            outputs = tuple(torch.cat([f, reverse_padded(r, lengths)], dim=-1)
                            for f, r in zip(forward_out, reverse_out))
        else:
            outputs = torch.cat([forward_out, reverse_padded(reverse_out, lengths)], dim=-1)
        return (forward_final, reverse_final), outputs


class ZeroState:
    """An init function giving zero states of the given (nested) sizes.

    ``hinitfun``, if given, is then applied to each state tensor, in place like
    the ``torch.nn.init`` functions (``hinitfun=torch.nn.init.normal_``), or
    returning the state to use (``lambda t: torch.full_like(t, 0.5)``).
    """

    def __init__(self, state_sizes, hinitfun: Optional[Callable[[Tensor], Any]] = None) -> None:
        self.state_sizes = state_sizes
        self.hinitfun = hinitfun

    def __call__(self, batch_size: int, *, dtype: torch.dtype, device: torch.device) -> StateTree:
        return self._build(self.state_sizes, batch_size, dtype, device)

    def _build(self, sizes, batch_size: int, dtype: torch.dtype, device: torch.device) -> StateTree:
        if not isinstance(sizes, int):
            return tuple(self._build(part, batch_size, dtype, device) for part in sizes)
        tensor = torch.zeros(batch_size, sizes, dtype=dtype, device=device)
        if self.hinitfun is None:
            return tensor
        made = self.hinitfun(tensor)  # not under no_grad: a returned state may be learnt (h0.expand_as(t))
        if made is None or made is tensor:
            return tensor
        # A function that returns a new tensor (not in place) means that tensor; one of another
        # shape or kind would otherwise fail later, far from its cause.
        if not isinstance(made, Tensor) or made.shape != tensor.shape:
            got = tuple(made.shape) if isinstance(made, Tensor) else type(made).__name__
            raise ValueError(f"hinitfun must fill the state tensor it is given in place or return one of "
                             f"its shape {tuple(tensor.shape)}, got {got}")
        return made.to(dtype=dtype, device=device)


def out_of_autocast(tensor: Tensor, carried: torch.dtype) -> Tensor:
    """``tensor`` in the ``carried`` dtype if autocast is on for its device and ``tensor`` comes in
    autocast's low-precision dtype; otherwise ``tensor`` itself.

    The cells compute in the dtype they are given, autocast lowering their products: an input
    in bfloat16 would make a bfloat16 state. Converted, it loses nothing (bfloat16 and float16
    fit in float32), and the products lower it again.
    """
    if not isinstance(tensor, Tensor):  # left for the checks to name
        return tensor
    device = tensor.device.type
    if autocast_enabled(device) and tensor.dtype == torch.get_autocast_dtype(device) != carried:
        return tensor.to(carried)
    return tensor


def _describe(tensor: Tensor) -> str:
    return f"{str(tensor.dtype).replace('torch.', '')} on {tensor.device}"


def state_template(sizes, batch: object = "batch") -> str:
    """How a state of ``sizes`` (a module's ``state_sizes``) is nested, for messages:
    ``((batch, 4), (batch, 4))`` for an LSTM cell, ``(((batch, 4), (batch, 4)),)`` for one layer of it."""
    if isinstance(sizes, int):
        return f"({batch}, {sizes})"
    parts = [state_template(part, batch) for part in sizes]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def check_nesting(state: object, sizes, where: str = "state") -> None:
    """Raise a ValueError, showing the nesting wanted, where ``state`` is not nested as ``sizes``
    (a module's ``state_sizes``: a tuple of sizes for a cell, of those for a stack): a tensor where a
    tuple belongs or the reverse, a tuple of another length, ``None``, a dict. The shapes are the
    cells' to check. Every container checks its own call, so the walk that says yes is kept cheap."""
    if not _nested_as(state, sizes):
        _refuse_nesting(state, sizes, where, sizes)


def _nested_as(state: object, sizes) -> bool:
    if isinstance(sizes, int):
        return isinstance(state, Tensor)
    if not isinstance(state, (tuple, list)) or len(state) != len(sizes):
        return False
    for part, part_sizes in zip(state, sizes):
        if not _nested_as(part, part_sizes):
            return False
    return True


def _refuse_nesting(state: object, sizes, where: str, whole) -> None:
    """The first entry of ``state`` not nested as ``sizes``, raised as a ValueError."""
    if isinstance(sizes, int):
        if not isinstance(state, Tensor):
            raise ValueError(f"{where} must be a tensor of shape (batch, {sizes}), got {type(state).__name__}; "
                             f"the state is nested as {state_template(whole)}")
        return
    if not isinstance(state, (tuple, list)) or len(state) != len(sizes):
        got = f"{len(state)} entries" if isinstance(state, (tuple, list)) else type(state).__name__
        raise ValueError(f"{where} must be a tuple of {len(sizes)}, got {got}; the state is nested as "
                         f"{state_template(whole)}")
    for index, (part, part_sizes) in enumerate(zip(state, sizes)):
        _refuse_nesting(part, part_sizes, f"{where}[{index}]", whole)


def _batch_count(batch_size: object) -> int:
    """``batch_size`` as a Python int, any integer type (not a bool, nor a tensor of more than one
    number), refusing what is no count of sequences."""
    try:
        count = None if isinstance(batch_size, bool) or (isinstance(batch_size, Tensor) and (
            batch_size.dim() != 0 or batch_size.dtype == torch.bool)) else operator.index(batch_size)
    except TypeError:
        count = None
    if count is None or count < 0:
        raise ValueError(f"initialize_hidden: batch_size must be a whole number of sequences (0 or more), "
                         f"got {batch_size!r}")
    return count


def check_state(state: StateTree, sizes, names, batch_size: int, like: Tensor,
                where: str = "state") -> None:
    """Raise a ValueError naming the first entry of ``state`` whose nesting,
    shape, dtype or device differs from what ``sizes`` and ``like`` ask for."""
    check_nesting(state, sizes, where)
    _check_leaves(state, sizes, names, batch_size, like, where)


def _check_leaves(state: StateTree, sizes, names, batch_size: int, like: Tensor, where: str) -> None:
    if isinstance(sizes, int):
        label = where if not isinstance(names, str) else f"{where} ({names})"
        if not isinstance(state, Tensor):
            raise ValueError(f"{label} must be a tensor of shape ({batch_size}, {sizes}), "
                             f"got {type(state).__name__}")
        if tuple(state.shape) != (batch_size, sizes):
            raise ValueError(f"{label} has shape {tuple(state.shape)}, expected "
                             f"({batch_size}, {sizes}) (batch {batch_size}, size {sizes})")
        if state.dtype != like.dtype or state.device != like.device:
            raise PlacementError(f"{label} is {_describe(state)} but the input is {_describe(like)}")
        return
    if names is None or isinstance(names, str) or len(names) != len(sizes):
        names = [None] * len(sizes)
    for index, (part, part_sizes, part_names) in enumerate(zip(state, sizes, names)):
        _check_leaves(part, part_sizes, part_names, batch_size, like, f"{where}[{index}]")


class RecurrentNetwork(nn.Module):
    """A network with hidden-state handling: what :func:`setup_recurrent` returns.

    ``forward(x, state=None, lengths=None) -> (output, final_state)``, where
    ``x`` is ``(T, batch, input)`` (``(batch, T, input)`` with
    ``batch_first``), ``state`` is the wrapped network's nested state and
    ``lengths`` gives each sequence's length in a padded batch (outputs past a
    sequence's end are zero; its final state is the one at its own last step).
    A ``PackedSequence`` ``x`` stands for a padded batch and its lengths; the
    output is then packed the same way.

    With ``save_hidden`` a call without ``state`` continues from the final state
    of the previous call, detached so that no graph outlives its batch; a
    change of batch size starts afresh from the init functions.
    :meth:`initialize_hidden` resets it and :attr:`hidden` reads it.
    """

    def __init__(self, network: nn.Module, init_functions: Optional[Sequence[InitFunction]] = None,
                 *, save_hidden: bool = True, batch_first: bool = False) -> None:
        super().__init__()
        self.network = network
        if init_functions is None:
            sizes = getattr(network, "state_sizes", None)
            if sizes is None:
                raise ValueError("init_functions are needed for a network without state_sizes")
            init_functions = [ZeroState(layer_sizes) for layer_sizes in sizes]
        if callable(init_functions) or not isinstance(init_functions, Iterable):
            kind = type(init_functions).__name__
            raise TypeError(f"init_functions must be a list with one function per layer, got a {kind}: "
                            f"write [{kind}(...), ...]")
        self.init_functions = list(init_functions)
        self.save_hidden = save_hidden
        self.batch_first = batch_first
        self._hidden: Optional[StateTree] = None

    def extra_repr(self) -> str:
        return f"save_hidden={self.save_hidden}, batch_first={self.batch_first}"

    @property
    def hidden(self) -> Optional[StateTree]:
        """The saved final state of the last call (None before the first)."""
        return self._hidden

    def _factory(self) -> dict:
        tensor = next(itertools.chain(self.parameters(), self.buffers()), None)
        if tensor is None:
            return {"dtype": torch.get_default_dtype(), "device": torch.device("cpu")}
        return {"dtype": tensor.dtype, "device": tensor.device}

    def initialize_hidden(self, batch_size: int, *, dtype: Optional[torch.dtype] = None,
                          device: Optional[torch.device] = None) -> StateTree:
        """A fresh initial state for ``batch_size`` sequences; saved with ``save_hidden``."""
        if not isinstance(batch_size, torch.SymInt):  # a traced batch stays symbolic (export, dynamic compile)
            batch_size = _batch_count(batch_size)
        factory = self._factory()
        factory = {"dtype": dtype or factory["dtype"], "device": device or factory["device"]}
        state = tuple(init(batch_size, **factory) for init in self.init_functions)
        if self.save_hidden:
            self._hidden = state
        return state

    def _initial_state(self, batch_size: int, like: Tensor) -> StateTree:
        saved = self._hidden if self.save_hidden else None
        if saved is not None and _flatten(saved)[0][0].size(0) == batch_size:
            # A state saved under torch.inference_mode is an inference tensor, which autograd may
            # not save: outside that mode it continues from a copy (as torch's error advises).
            escape = not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled()
            return map_state(lambda t: (t.clone() if escape and t.is_inference() else t)
                             .to(dtype=like.dtype, device=like.device), saved)
        return self.initialize_hidden(batch_size, dtype=like.dtype, device=like.device)

    @property
    def extra_inputs(self) -> Dict[str, Tuple[int, bool]]:
        """The inputs besides ``x`` that the network's cells declare: name -> (size, read once per
        sequence); give them by name, ``net(x, enc=...)``."""
        return extra_inputs_of(self.network)

    def forward(self, x: Union[Tensor, PackedSequence], state: Optional[StateTree] = None,
                lengths: Optional[Union[Tensor, Sequence[int]]] = None, **inputs: Tensor):
        exporting = torch.compiler.is_exporting()
        if exporting and self.save_hidden and state is None:
            raise ValueError("this network was built with save_hidden=True: each call starts from the final state "
                             "of the last, a batch-sized tensor kept on the module, which an exported program "
                             "cannot carry between calls. Build it with save_hidden=False (or set "
                             "net.save_hidden = False) to start each call from the init functions, or pass the "
                             "state explicitly: net(x, state)")
        refuse_packed_under_export(x, type(self).__name__)
        check_input_names(self.network, inputs, type(self).__name__, self.batch_first)
        packed = x if isinstance(x, PackedSequence) else None
        if packed is not None and inputs:
            raise ValueError("a PackedSequence cannot come with other inputs: pass the padded batch and lengths=")
        if packed is not None:
            if lengths is not None:
                raise ValueError("a PackedSequence carries its own lengths; do not pass lengths=")
            x, lengths = pad_packed_sequence(packed, batch_first=self.batch_first)
        if not isinstance(x, Tensor):
            raise ValueError(f"{type(self).__name__}: expected the input as a tensor or a PackedSequence, "
                             f"got {type(x).__name__}")
        if x.dim() != 3:
            layout = "(batch, T, input)" if self.batch_first else "(T, batch, input)"
            hint = "; a spatial cell takes its images flat: x.flatten(2)" if x.dim() > 3 else ""
            raise ValueError(f"expected a {layout} input, got shape {tuple(x.shape)}{hint}")
        check_not_empty(x, type(self).__name__, 1 if self.batch_first else 0)  # quoting the shape as given
        xs = x.transpose(0, 1) if self.batch_first else x
        carried = self._factory()["dtype"]
        xs = out_of_autocast(xs, carried)
        if state is not None and autocast_enabled(xs.device.type):
            state = map_state(lambda t: out_of_autocast(t, carried), state)
        steps, batch_size = xs.shape[:2]
        input_size = getattr(self.network, "input_size", None)
        if input_size is not None and xs.size(2) != input_size:
            raise ValueError(f"expected input of size {input_size} in the last dimension, "
                             f"got {xs.size(2)} (input shape {tuple(x.shape)})")
        mask = None if lengths is None else lengths_mask(lengths, steps, batch_size, xs.device)
        given = state is not None
        if not given:
            state = self._initial_state(batch_size, xs)
        sizes = getattr(self.network, "state_sizes", None)
        if sizes is not None:  # the init functions' states too: a user's may return a bare tensor
            check_state(state, sizes, getattr(self.network, "state_names", None), batch_size, xs,
                        "state" if given else "the init functions' state")
        per_step = per_step_inputs(self.network)
        declared = extra_inputs_of(self.network) if inputs else {}
        for name, value in inputs.items():  # quoted in the caller's layout, before it is transposed
            expected = (batch_size, steps, declared[name][0])
            if self.batch_first and name in per_step and isinstance(value, Tensor) and value.dim() == 3 \
                    and tuple(value.shape) != expected:
                raise ValueError(f"input {name}: expected (batch, T, n) = {expected} with batch_first=True, "
                                 f"got {tuple(value.shape)}")
        inputs = {name: out_of_autocast(value.transpose(0, 1) if self.batch_first and name in per_step
                                        and isinstance(value, Tensor) else value, carried)
                  for name, value in inputs.items()}
        final, outputs = (self.network(state, xs, mask, **inputs) if mask is not None
                          else self.network(state, xs, **inputs))
        # Neither the traced state of an export nor the wrapped one of torch.func (vmap's batched
        # tensor would fail the next plain call) is a tensor to keep.
        if self.save_hidden and not exporting and not torch._C._are_functorch_transforms_active():
            # A copy: a final state may be a view of the whole output sequence (the parallel scan's
            # last step), which it would keep alive, and which AOTAutograd cannot replay as an alias.
            self._hidden = map_state(lambda t: t.detach().clone(), final)
        if packed is not None:
            return map_state(lambda t: repack(t, lengths, packed), outputs), final
        if self.batch_first:
            outputs = map_state(lambda t: t.transpose(0, 1), outputs)
        return outputs, final


def setup_recurrent(network: nn.Module, init_functions: Optional[Sequence[InitFunction]] = None,
                    save_hidden: Optional[bool] = None, *, batch_first: bool = False) -> RecurrentNetwork:
    """Add hidden-state handling to ``network``: rnnlib's ``setupRecurrent``.

    ``network`` follows the container convention ``(state, xs, mask) ->
    (final_state, outputs)`` with a state holding one entry per layer;
    ``init_functions[i](batch_size, dtype=..., device=...)`` makes layer
    ``i``'s initial state (zeros of ``network.state_sizes`` when omitted).
    ``save_hidden`` (carry the final state into the next call) defaults to True, as rnnlib's,
    but to False for a network holding a :class:`Bidirectional` layer, as ``make_bidirectional``:
    its reverse direction would start each batch from the previous batch's *first* step.
    """
    if save_hidden is None:
        save_hidden = not any(isinstance(module, Bidirectional) for module in network.modules())
    return RecurrentNetwork(network, init_functions, save_hidden=save_hidden,
                            batch_first=batch_first)
