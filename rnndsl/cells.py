"""The module classes of built cells, and what they do at run time besides the generated code.

:class:`CellModule` holds a cell's parameters, sizes and hyper-parameters;
:class:`EagerCell` runs the generated methods as Python, :class:`ScriptedCell` as
TorchScript (and through the derived backward of rnndsl/derived.py when autograd
records). Both check their arguments first (:func:`check_call`) and pickle as a
:class:`Recipe`: the ``.cell`` source and the build arguments, rebuilt on loading.

Add here what every built cell does at run time (a check, a copy or pickling rule);
the classes with generated methods are made from these in rnndsl/compile.py.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import derived, opaque
from .autograd_modes import autocast_enabled, plain_ops_needed
from .codegen import supports_training
from .errors import CellWarning, PlacementError
from .ir import Op
from .options import BuildOptions
from .pool import IdlePool
from .scan import check_mask, check_not_empty, zero_padded_steps
from .twin import constants_of

if TYPE_CHECKING:
    from .cellspec import CellSpec


class CellModule(torch.nn.Module):
    """Base of every generated cell: registers parameters, sizes and hyper-parameters.

    Subclasses get ``forward`` and ``forward_sequence`` from generated source.
    """

    _fused_step: Optional[Tuple[Callable[..., object], Tuple[str, ...]]] = None  # also for cells pickled without it
    _fused_sequence: Optional[Callable[..., Tuple[Tensor, Tuple[Tensor, ...]]]] = None  # the same
    # Whether forward_sequence draws each dropout's mask once per sequence (build's
    # fixed_dropout_mask, for a cell with a dropout); a step of the cell's call draws anew.
    _fixed_dropout_masks = False
    # A cell pickled before the bounds were the kernel's: its old ones (under 2^18 numbers, any batch).
    _fused_sequence_bounds: Optional[Tuple[int, int]] = (2 ** 18 - 1, 2 ** 62)

    def __init__(self, spec: "CellSpec", sizes: Dict[str, int], hypers: Dict[str, float], source: str):
        super().__init__()
        graph = spec.graph
        for name, value in sizes.items():
            setattr(self, name, value)
        for name, value in hypers.items():
            setattr(self, name, value)
        self.cell_name = graph.name
        # What the cell reads per example: the input's features, all of them for a spatial input
        # `x[input, height, width]`, which comes flat. (build's input_size is its first dim.)
        self.input_size = graph.input.shape.dims[0].evaluate(sizes)
        self._input_dims = tuple((str(dim), dim.evaluate(sizes)) for dim in spec.input_dims)
        self.hidden_size = sizes["hidden"]
        # The inputs besides the first, in declaration order: name -> (flat size, read once per sequence).
        self.extra_inputs: Dict[str, Tuple[int, bool]] = {
            d.name: (d.shape.dims[0].evaluate(sizes), d.name in graph.per_sequence) for d in graph.extra_inputs}
        self.state_names: List[str] = [d.name for d in graph.states]
        self.state_sizes: List[int] = [d.shape.dims[0].evaluate(sizes) for d in graph.states]
        output = graph.node_map()[graph.outputs[0]]
        self.output_size = output.shape.dims[0].evaluate(sizes)
        # An image output comes flat: the sizes of its image, (height, width), which a spatial
        # layer above must read as they are; () for a vector.
        unflat = graph.node_map()[output.inputs[0]] if output.op is Op.RESHAPE else output
        self.output_image = tuple(dim.evaluate(sizes) for dim in unflat.shape.dims[1:])
        self.source = source
        self.derived_backward_trains = supports_training(graph)
        # torch's one-step kernel where one computes this cell (CellSpec.fused_step): what a
        # sampler's step runs (see EagerCell._fused_step).
        self._fused_step = spec.fused_step
        self._fused_sequence = spec.fused_sequence  # run_native: see EagerCell._fused_sequence_of
        self._fused_sequence_bounds = spec.fused_sequence_bounds
        self._inits: Dict[str, Optional[float]] = {d.name: d.default for d in graph.params}
        for decl in graph.params:
            shape = tuple(dim.evaluate(sizes) for dim in decl.shape.dims)
            try:
                parameter = torch.nn.Parameter(torch.empty(shape))
            except RuntimeError as exc:  # the allocator's own words, but naming the cell and the size
                dtype = torch.get_default_dtype()
                need = math.prod(shape) * torch.finfo(dtype).bits // 8
                raise MemoryError(f"cell {graph.name}: parameter {decl.name} of shape {list(shape)} needs "
                                  f"{need:,} bytes in {dtype}, which cannot be allocated ({exc})") from None
            self.register_parameter(decl.name, parameter)
        # From here on, a parameter assigned with another shape is refused where it is assigned.
        self._parameter_shapes = {name: parameter.shape for name, parameter in self._parameters.items()}
        # Buffers: constants in the state_dict, moved by `.to()`, never trained nor re-initialized.
        self._buffer_names: Tuple[str, ...] = tuple(d.name for d in graph.buffers)
        largest = torch.finfo(torch.get_default_dtype()).max
        for decl in graph.buffers:
            shape = tuple(dim.evaluate(sizes) for dim in decl.shape.dims)
            if abs(float(decl.default)) > largest:
                raise ValueError(f"cell {self.cell_name}: buffer {decl.name} is declared `= {decl.default:g}`, beyond "
                                 f"the largest {torch.get_default_dtype()} ({largest:g})")
            self.register_buffer(decl.name, torch.full(shape, float(decl.default)))
        self.reset_parameters()

    def register_parameter(self, name: str, param: Optional[torch.nn.Parameter]) -> None:
        """torch's, refusing a parameter of another shape than the cell declares (``cell.weight_hh =
        nn.Parameter(...)``, ``load_state_dict(assign=True)``): the generated code would fail deep in
        TorchScript, and torch's fused kernels, which no-grad calls run, read past a smaller one."""
        shape = self.__dict__.get("_parameter_shapes", {}).get(name)
        if shape is not None and param is not None and param.shape != shape:
            raise ValueError(f"cell {self.cell_name}: parameter {name} must have shape {tuple(shape)}, "
                             f"as the cell declares it, got {tuple(param.shape)}")
        super().register_parameter(name, param)

    @torch.jit.ignore
    def reset_parameters(self) -> None:
        """Uniform in ±1/sqrt(hidden), as torch.nn's cells; parameters declared ``= value`` get that value."""
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0.0
        with torch.no_grad():
            for name, parameter in self.named_parameters():
                init = self._inits.get(name)
                if init is None:
                    parameter.uniform_(-bound, bound)
                elif parameter.is_floating_point() and abs(init) > torch.finfo(parameter.dtype).max:
                    raise ValueError(f"cell {self.cell_name}: parameter {name} is declared `= {init:g}`, beyond "
                                     f"the largest {parameter.dtype} ({torch.finfo(parameter.dtype).max:g})")
                else:
                    parameter.fill_(init)

    @property
    def code(self) -> str:
        """The generated source of this cell's methods."""
        return self.source


def check_call(cell: torch.nn.Module, state, x: Tensor, sequence: bool, mask: Optional[Tensor] = None,
               inputs: Optional[Dict[str, Tensor]] = None) -> Tuple[Tensor, ...]:
    """Refuse inputs that do not fit, naming what was expected and what was received; return the
    other ``inputs`` (keyword arguments, by the names of the cell file) in declaration order.

    Runs in Python before the generated code, so errors are plain ValueErrors
    rather than TorchScript tracebacks.
    """
    if mask is None and not inputs and not cell.extra_inputs and _call_fits(cell, state, x, sequence):
        return ()
    name = cell.cell_name
    shape = "(T, batch, {})" if sequence else "(batch, {})"
    if not isinstance(x, Tensor) or x.dim() != (3 if sequence else 2) or x.size(-1) != cell.input_size:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        swapped = isinstance(state, Tensor) and isinstance(x, (tuple, list))
        hint = "; cells take the state first: cell(state, x), as rnnlib's gModule" if swapped else ""
        flat, dims = "", getattr(cell, "_input_dims", ())
        if len(dims) > 1:  # a spatial input, taken flat
            leading = 2 if sequence else 1
            flat = f" (its [{', '.join(f'{dim}={value}' for dim, value in dims)}] flattened)"
            if isinstance(x, Tensor) and tuple(x.shape[leading:]) == tuple(value for _, value in dims):
                hint = f"; flatten it with x.flatten({leading})" + hint
        raise ValueError(f"cell {name}: expected input of shape {shape.format(cell.input_size)}{flat}, got {got}"
                         + hint)
    if sequence:
        check_not_empty(x, f"cell {name}")
    check_mask(mask, x)
    names, sizes = cell.state_names, cell.state_sizes
    if not isinstance(state, (tuple, list)) or len(state) != len(sizes) or \
            not all(isinstance(s, Tensor) for s in state):
        got = f"{len(state)} values" if isinstance(state, (tuple, list)) else type(state).__name__
        raise ValueError(f"cell {name}: expected the state as a tuple of {len(sizes)} tensor(s) "
                         f"({', '.join(names)}), got {got}")
    batch, dtype, device = x.size(-2), x.dtype, x.device
    for state_name, size, value in zip(names, sizes, state):
        if value.shape != (batch, size):
            raise ValueError(f"cell {name}: expected state {state_name} of shape ({batch}, {size}), "
                             f"got {tuple(value.shape)}")
        if value.dtype != dtype or value.device != device:
            raise PlacementError(f"cell {name}: state {state_name} is {value.dtype} on {value.device}, "
                                 f"but the input is {dtype} on {device}")
    misfit = _misfit_tensor(cell, dtype, device)
    if misfit is not None:
        kind, tensor_name, tensor = misfit
        raise PlacementError(f"cell {name}: its {kind} {tensor_name} is {tensor.dtype} on {tensor.device}, "
                             f"but the input is {dtype} on {device}; convert one with .to()")
    return check_inputs(cell, inputs or {}, x, sequence)


def _misfit_tensor(cell: torch.nn.Module, dtype: torch.dtype,
                   device: torch.device) -> Optional[Tuple[str, str, Tensor]]:
    """The first parameter or buffer the cell's code reads that is not of ``dtype`` on ``device``
    (a buffer that is no float, a step count, only on another device), as (kind, name, tensor); None
    when all fit. Every one is checked: a product with one weight on another device or dtype gives
    garbage (``meta``) or a silently promoted result. The declared names, read from the dicts (as
    ``functional_call`` swaps them): a tensor the user registered beside them is not the code's, and
    a parametrized one is computed, from originals that may be stored otherwise. This runs before
    every step of a sampler: no parameters(), no parametrization call."""
    parameters, buffers = cell._parameters, cell._buffers
    for name in cell._inits:
        parameter = parameters.get(name)
        if parameter is not None and (parameter.dtype != dtype or parameter.device != device):
            return "parameter", name, parameter
    for name in cell._buffer_names:
        buffer = buffers.get(name)
        if buffer is not None and (buffer.device != device or (buffer.is_floating_point() and buffer.dtype != dtype)):
            return "buffer", name, buffer
    return None


def _call_fits(cell: torch.nn.Module, state, x, sequence: bool) -> bool:
    """True when a call with one input and no mask passes every check of :func:`check_call`.

    A sampler calls the cell once a word, and at batch 1 and hidden 200 the step itself
    takes 30 us: this asks only the questions whose answers are all yes, in about a third
    of the time the checks that explain a failure take (which run whenever this says no).
    """
    if not isinstance(x, Tensor) or not isinstance(state, tuple):
        return False
    shape = x.shape
    if len(shape) != (3 if sequence else 2) or shape[-1] != cell.input_size or shape[0] == 0:
        return False
    sizes = cell.state_sizes
    if len(state) != len(sizes):
        return False
    batch, dtype, device = shape[-2], x.dtype, x.device
    for value, size in zip(state, sizes):
        if not isinstance(value, Tensor) or value.shape != (batch, size) or value.dtype != dtype \
                or value.device != device:
            return False
    return _misfit_tensor(cell, dtype, device) is None


def current_parameter(cell: torch.nn.Module, name: str) -> Tensor:
    """The tensor a cell's parameter ``name`` is now: the registered one, the one ``functional_call``
    swapped into ``_parameters``, or the one a parametrization (``weight_norm``) computes on getattr."""
    value = cell._parameters.get(name)
    return getattr(cell, name) if value is None else value


def describe_inputs(cell: torch.nn.Module) -> str:
    """The inputs a cell takes besides the first, for messages: ``enc (batch, 16) once per sequence``."""
    return ", ".join(f"{name} {'(batch, ' if once else '(T, batch, '}{size}) "
                     f"{'once per sequence' if once else 'at every step'}"
                     for name, (size, once) in getattr(cell, "extra_inputs", {}).items())


def check_inputs(cell: torch.nn.Module, inputs: Dict[str, Tensor], x: Tensor, sequence: bool) -> Tuple[Tensor, ...]:
    """The cell's inputs besides ``x``, given by name, checked against ``x`` and returned in declaration order."""
    name, declared = cell.cell_name, getattr(cell, "extra_inputs", {})
    unknown = [key for key in inputs if key not in declared]
    if unknown:
        takes = f"its other inputs are {describe_inputs(cell)}" if declared else "it takes one input"
        raise ValueError(f"cell {name} has no input named {', '.join(map(repr, unknown))}: {takes}")
    leading = (tuple(x.shape[:2]) if sequence else tuple(x.shape[:1]))
    found = []
    for key, (size, once) in declared.items():
        lead = leading[-1:] if once else leading
        expected = lead + (size,)
        value = inputs.get(key)
        where = "once per sequence" if once else "at every step"
        if value is None:
            call = f"cell.forward_sequence(xs, state, mask, {key}=...)" if sequence else f"cell(state, x, {key}=...)"
            raise ValueError(f"cell {name}: missing input {key}, a tensor of shape {expected} read {where}; "
                             f"pass it by name: {call}")
        if not isinstance(value, Tensor) or tuple(value.shape) != expected:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            hint = ""
            if once and isinstance(value, Tensor) and sequence and tuple(value.shape) == leading + (size,):
                hint = f"; {key} is declared `per sequence`: one (batch, {size}) value for the whole sequence"
            raise ValueError(f"cell {name}: expected input {key} of shape {expected} (read {where}), got {got}"
                             + hint)
        if value.dtype != x.dtype or value.device != x.device:
            raise PlacementError(f"cell {name}: input {key} is {value.dtype} on {value.device}, but the input is "
                                 f"{x.dtype} on {x.device}")
        found.append(value)
    return tuple(found)


@dataclass(frozen=True)
class Recipe:
    """What rebuilds a cell: its ``.cell`` source and the arguments ``CellSpec.build`` got."""

    source: str
    path: str
    name: str
    input_size: int
    hidden_size: int
    backend: str
    options: BuildOptions
    keywords: Tuple[Tuple[str, object], ...]  # the sizes and hyper-parameters build got
    hypers: Tuple[str, ...]  # the cell's hyper-parameters, which may be set on the cell after build

    def of(self, cell: torch.nn.Module) -> "Recipe":
        """This recipe, with the hyper-parameters ``cell`` holds now."""
        keywords = dict(self.keywords, **{name: getattr(cell, name) for name in self.hypers})
        return dataclasses.replace(self, keywords=tuple(sorted(keywords.items())))


def _unpickled_spec(recipe: Recipe) -> "CellSpec":
    # The one edge from run time back to the compiler: a pickled cell is made again from its
    # .cell source. Imported here, when a cell is unpickled, because the facade imports this module.
    from .cellspec import load_source
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellWarning)  # shown when the cell was first loaded
        return load_source(recipe.source, recipe.path)[recipe.name]


def _empty_cell(recipe: Recipe) -> "EagerCell":
    """Unpickling a cell: its class, made again from the source, without ``__init__``; pickle
    then restores its ``__dict__`` (parameters, buffers, hooks, flags, as they were). A scripted
    cell compiles its TorchScript kernel again when it next runs."""
    cls = _unpickled_spec(recipe).cell_class(recipe.options, recipe.backend)
    return cls.__new__(cls)


class EagerCell(CellModule):
    """The generated methods run as plain Python, after checking their arguments."""

    scan_mode = "sequential"  # "parallel" on the classes that carry a forward_parallel
    _python_methods: type  # the generated class, whose methods are plain Python

    def __reduce__(self):
        # The class is made at run time (pickle could not find it by name): rebuilt from the source.
        # __getstate__, not __dict__: torch refuses to pickle what it cannot (parametrized modules).
        return _empty_cell, (self._recipe,), self.__getstate__()

    def forward(self, state, x, **inputs):
        extras = check_call(self, state, x, sequence=False, inputs=inputs)
        fused = self._fused_step_of(state, x)
        if fused is not None:
            return fused
        return self._python_methods.forward(self, state, x, *extras)

    def _fused_kernel(self, x):
        """torch's one-step kernel (torch.lstm_cell, ...) and the cell's weights in its order, where
        one computes this cell and nothing follows the Python: no autograd (whose double backward
        and derived backward the generated code serves), no torch.compile, torch.func, tracing or
        autocast, on the CPU in float32 or float64. None elsewhere."""
        fused = self._fused_step
        if fused is None or torch.is_grad_enabled() or not x.is_cpu or x.dtype not in _FUSED_DTYPES \
                or torch.compiler.is_compiling() or torch.compiler.is_exporting() \
                or plain_ops_needed() or torch.jit.is_tracing() \
                or torch.is_autocast_enabled("cpu"):
            return None
        step, names = fused
        return step, [current_parameter(self, name) for name in names]

    def _fused_step_of(self, state, x):
        """The step by torch's one-step kernel where :meth:`_fused_kernel` allows; None elsewhere.
        At batch 1, the generated step's dozen ops cost more than their arithmetic (issue 16: 1.3x
        torch.nn.LSTMCell at hidden 200)."""
        fused = self._fused_kernel(x)
        if fused is None:
            return None
        step, weights = fused
        if len(state) == 2:  # LSTM: (h, c)
            h, c = step(x, state, *weights)
            return (h, c), h
        h = step(x, state[0], *weights)
        return (h,), h

    def _fused_sequence_of(self, state, xs, mask):
        """The whole unmasked sequence by torch's sequence kernel (torch.lstm, ...) where
        :meth:`_fused_kernel` allows and the kernel's bounds do (``NativeMode.sequence_kernel_bounds``:
        an LSTM up to hidden 256 or from batch 8, any other cell); None elsewhere.

        torch.lstm (oneDNN's) pays a weight reorder at every call, so at small batches it wins only
        for small weights; the figures behind the bounds are at ``NativeMode.sequence_kernel_bounds``
        (rnndsl/native.py), and ``python -m bench.bench_fused_sequence`` measures them again.
        """
        fused = None if mask is not None else self._fused_kernel(xs)
        if fused is None:
            return None
        _, weights = fused  # weight_ih, weight_hh, bias_ih, bias_hh: torch's order
        run, bounds = self._fused_sequence, self._fused_sequence_bounds
        if run is None or (bounds is not None and weights[1].numel() > bounds[0] and xs.size(1) < bounds[1]):
            return None
        return run(xs, state, weights)

    def forward_sequence(self, xs, state, mask=None, **inputs):
        """The whole ``(T, batch, ...)`` sequence ``xs`` from ``state``: (outputs, final state). A cell
        with several inputs takes the others by name: one read at every step as ``(T, batch, n)``, one
        read once per sequence as ``(batch, n)``."""
        extras = check_call(self, state, xs, sequence=True, mask=mask, inputs=inputs)
        # The generated code carries states over padded steps, but computes them. (Not when exporting:
        # the program has no backward to protect, its scan masks its outputs with `where`, and AOTInductor
        # in torch 2.13 emits C++ that redeclares a buffer for this where before a scan.)
        if mask is not None and not torch.compiler.is_exporting():
            xs = zero_padded_steps(xs, mask)
            extras = tuple(zero_padded_steps(value, mask) if value.dim() == 3 else value for value in extras)
        return self._run_sequence(xs, state, mask, extras)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        opaque.register(self)

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        opaque.register(self)

    def _run_sequence(self, xs, state, mask, extras=()):
        """``forward_sequence`` after the checks: the form that suits the caller."""
        if extras:
            return self._run_sequence_of_several_inputs(xs, state, mask, extras)
        if torch.compiler.is_exporting():  # one scan node: the program runs at any length, with torch alone
            return self.forward_sequence_scan(xs, state, mask)
        if torch.compiler.is_compiling() and not plain_ops_needed():
            if self.scan_mode == "parallel":
                return self.forward_parallel(xs, state, mask)
            # The loop as one opaque op, compiled once whatever the length. (Not the scan form:
            # Inductor's backward of scan gives wrong gradients for some cells in torch 2.13.)
            compiled = derived.compiled_forward_sequence(self, xs, state, mask)
            if compiled is not None:
                return compiled
        # The parallel scan's autograd Functions have no vmap or jvp rule: torch.func and forward AD run the loop.
        if self.scan_mode == "parallel" and not plain_ops_needed():
            return self.forward_parallel(xs, state, mask)
        fused = self._fused_sequence_of(tuple(state), xs, mask)
        if fused is not None:
            return fused
        return self._python_methods.forward_sequence(self, xs, state, mask)

    def _run_sequence_of_several_inputs(self, xs, state, mask, extras):
        """A cell with several inputs runs its generated loop (eagerly, or unrolled by torch.compile):
        neither the parallel scan, nor the export form, nor the compile path's op takes other inputs yet."""
        if torch.compiler.is_exporting():
            raise NotImplementedError(f"cell {self.cell_name} has several inputs, which torch.export does not "
                                      "support yet (the scan form takes one); export a cell with one input")
        return self._python_methods.forward_sequence(self, xs, state, mask, *extras)


@dataclass
class _BoundKernel:
    """A TorchScript kernel and what it is bound to: parameters (by identity) and settings."""

    module: torch.jit.RecursiveScriptModule
    parameters: List[Optional[Tensor]]
    settings: Tuple[object, ...] = ()


class ScriptedCell(EagerCell):
    """A cell whose methods run as TorchScript: a plain module (its parameters, hooks, parametrizations
    and ``functional_call`` behave as any module's) that runs a TorchScript *kernel*, compiled from the
    same generated class, bound to the module's current parameters before each call.

    Where TorchScript cannot follow (torch.compile, torch.export, torch.func, autocast) it runs as an
    :class:`EagerCell`; when autograd records, ``forward_sequence`` runs through the derived backward
    (rnndsl/derived.py). Its ``.code`` is the source rnndsl generated; TorchScript's own re-print of
    ``forward`` is ``.scripted_method("forward").code``; ``torch.jit.save(cell, f)`` saves the kernel,
    which loads with torch alone.
    """

    def __getstate__(self):
        state = dict(super().__getstate__())
        for name in _KERNEL_ATTRIBUTES:  # TorchScript modules do not pickle; compiled again on use
            state.pop(name, None)
        return state

    _script_kernel: Callable  # compile.script_kernel, set on each class by the compiler that made it

    def kernel(self, parameters: Optional[Sequence[Tensor]] = None,
               buffers: Optional[Sequence[Tensor]] = None,
               settings: Optional[Tuple[object, ...]] = None) -> torch.jit.RecursiveScriptModule:
        """The TorchScript module, bound to this cell's mode and hyper-parameters, parameters and
        buffers now (or to ``settings`` = (training, *hyper-parameters), ``parameters`` and
        ``buffers``, in declaration order: the derived backward binds its forward's). A call running
        meanwhile in another thread may bind it again: the cell's own calls go through
        :meth:`call_kernel`."""
        bound = self._take_kernel(parameters, buffers, settings)
        self._kernel_pool().give_back(bound)
        return bound.module

    def call_kernel(self, method: str, *args, parameters: Optional[Sequence[Tensor]] = None,
                    buffers: Optional[Sequence[Tensor]] = None, settings: Optional[Tuple[object, ...]] = None):
        """A method of a kernel bound as :meth:`kernel` binds it, which no other call uses meanwhile."""
        bound = self._take_kernel(parameters, buffers, settings)
        try:
            return bound.module._c._get_method(method)(*args)
        finally:
            self._kernel_pool().give_back(bound)

    def _kernel_pool(self) -> IdlePool[_BoundKernel]:
        pool = self.__dict__.get("_kernels")
        if pool is None:
            pool = self.__dict__["_kernels"] = IdlePool()
        return pool

    def _new_bound_kernel(self) -> _BoundKernel:
        return _BoundKernel(self._script_kernel(self), [None] * len(self._inits))

    def _take_kernel(self, parameters: Optional[Sequence[Tensor]], buffers: Optional[Sequence[Tensor]],
                     settings: Optional[Tuple[object, ...]]) -> _BoundKernel:
        """A kernel from the pool (compiled if none is idle), bound; the caller gives it back."""
        if torch.jit.is_tracing():
            raise RuntimeError(f"cell {self.cell_name}: torch.jit.trace cannot follow a scripted cell's TorchScript "
                               "kernel, which is not a submodule; trace rnndsl.torchscript(model), where the cells are "
                               "their kernels, or export with torch.export")
        bound = self._kernel_pool().take(self._new_bound_kernel)
        kernel = bound.module
        # The mode and the hyper-parameters set after build (`cell.beta = 0.25`), pushed when they change.
        if settings is None:
            settings = (self.training, *constants_of(self))
        if settings != bound.settings:
            kernel.train(settings[0])
            for name, value in zip(self._python_methods._constant_names, settings[1:]):
                setattr(kernel, name, value)
            bound.settings = settings
        for index, name in enumerate(self._buffer_names):  # `.to()` replaces a buffer's tensor: bound again by identity
            current = getattr(self, name) if buffers is None else buffers[index]
            if getattr(kernel, name) is not current:
                kernel._c.setattr(name, current)
        for index, name in enumerate(self._inits):
            # The module's tensor now, found by identity: functional_call's swap into _parameters;
            # parametrizations and weight_norm remove the name from it and compute the tensor on
            # getattr. Rebinding is rare and cheap (a pointer).
            current = current_parameter(self, name) if parameters is None else parameters[index]
            if current is not bound.parameters[index]:
                kernel._c.setattr(name, current)
                bound.parameters[index] = current
        return bound

    def scripted_method(self, name: str):
        """A compiled method of the kernel."""
        return self.kernel()._c._get_method(name)

    def save(self, f, _extra_files=None) -> None:
        """What ``torch.jit.save(cell, path)`` calls: saves the kernel (loads with torch alone)."""
        self.kernel().save(f, _extra_files=_extra_files or {})

    def save_to_buffer(self, _extra_files=None) -> bytes:
        """What ``torch.jit.save(cell, buffer)`` calls."""
        return self.kernel().save_to_buffer(_extra_files=_extra_files or {})

    def forward(self, state, x, **inputs):
        if torch.compiler.is_compiling() or plain_ops_needed():
            return super().forward(state, x, **inputs)
        extras = check_call(self, state, x, sequence=False, inputs=inputs)
        fused = self._fused_step_of(state, x)
        if fused is not None:
            return fused
        return self.call_kernel("forward", state, x, *extras)

    def _run_sequence(self, xs, state, mask, extras=()):
        if torch.compiler.is_compiling() or plain_ops_needed():
            # torch.compile, torch.export, torch.func and forward AD follow Python, not TorchScript nor
            # a Function without a vmap or jvp rule (the derived backward's, the parallel scan's).
            return super()._run_sequence(xs, state, mask, extras)
        if extras:
            if autocast_enabled(xs.device.type):
                return self._python_methods.forward_sequence(self, xs, state, mask, *extras)
            if derived.uses_derived_backward(self, xs, state, extras):
                return derived.derived_forward_sequence(self, xs, state, mask, extras)
            return self.call_kernel("forward_sequence", xs, state, mask, *extras)
        if self.scan_mode == "parallel":
            return self.forward_parallel(xs, state, mask)
        if autocast_enabled(xs.device.type):
            # Autocast's casts are autograd's to undo; the derived backward, run outside autocast
            # on what the forward saved in mixed dtypes, does not know them.
            return self._python_methods.forward_sequence(self, xs, state, mask)
        if derived.uses_derived_backward(self, xs, state):
            return derived.derived_forward_sequence(self, xs, state, mask)
        if xs.size(0) == 1 and mask is None and not torch.is_grad_enabled():
            # A sampler's step: the step method skips the loop's hoisting, unbind and stack,
            # which at one step cost as much as the step itself.
            fused = self._fused_step_of(tuple(state), xs[0])
            state, output = self.call_kernel("forward", tuple(state), xs[0]) if fused is None else fused
            return output.unsqueeze(0), state
        fused = self._fused_sequence_of(tuple(state), xs, mask)
        if fused is not None:
            return fused
        return self.call_kernel("forward_sequence", xs, state, mask)

    @property
    def code(self) -> str:
        return self.source


_FUSED_DTYPES = (torch.float32, torch.float64)
_KERNEL_ATTRIBUTES = ("_kernels",)


def torchscript(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` in which every scripted cell is its TorchScript kernel: what
    ``torch.jit.trace``, ``torch.jit.script`` and ``torch.jit.save`` take. The kernels run the
    generated methods on the copy's own parameters, without rnndsl's argument checks or the
    derived backward (autograd of the TorchScript loop trains them)."""
    run_natively = {id(layer.cell) for layer in model.modules() if getattr(layer, "traces_torchs_kernel", False)}
    for name, cell in model.named_modules():
        if isinstance(cell, CellModule) and not isinstance(cell, ScriptedCell) and id(cell) not in run_natively:
            where = f" ({name})" if name else ""
            raise ValueError(f"rnndsl.torchscript: cell {cell.cell_name}{where} runs on the eager backend, which has "
                             f"no TorchScript kernel: a trace would hold its loop unrolled at the traced length. "
                             f"Build it with backend='script', or export the model with torch.export (any length)")
    model = copy.deepcopy(model)
    if isinstance(model, ScriptedCell):
        return model.kernel()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ScriptedCell):
                setattr(parent, name, child.kernel())
    return model
