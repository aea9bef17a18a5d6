"""The public face of the compiler: ``load_cell`` and ``CellSpec.build``.

``load_cell`` runs parse -> check -> lower and keeps the IR graph;
``build`` binds sizes and hyper-parameters, runs the passes, generates the
source (cached per graph and pass selection), and returns a module: plain
Python (``backend="eager"``) or TorchScript (``backend="script"``).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import linecache
import math
import os
import stat
import threading
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor

from . import backward, kernels
from . import syntax_tree as st
from .check import check_file, hyper_value_problem
from .codegen import (NotLinear, find_linear_recurrences, generate_backward, generate_parallel, generate_step,
                      supports_training, validate_source)
from .errors import CellError, CellWarning, Span, one_line, source_lines
from .ir import MAX_DIMENSION, Graph, Op
from .lower import lower
from .names import PARALLEL_GLOBALS, SCRIPT_GLOBALS
from .native_match import match_native
from .ops import PROBABILITY_OPS
from .passes import run_passes
from .resources import stock_cell_names, stock_cells_dir
from .scan import check_mask, check_not_empty
from .syntax import MAX_FILE_BYTES, decode, parse

BACKENDS = ("script", "eager")
SCANS = ("auto", "parallel", "sequential")
# Not a pass, but switched off the same way: build(..., disable=("derived_backward",)) trains
# scripted cells through autograd of the compiled loop instead (rnndsl/backward.py).
DERIVED_BACKWARD = "derived_backward"
# All the parameters of one cell: 2**36 float32 numbers are 256 GiB, more than any accelerator holds.
MAX_ELEMENTS = 2**36
_compile_lock = threading.RLock()  # TorchScript compilation and our caches are shared state
_counter = itertools.count()


class CellModule(torch.nn.Module):
    """Base of every generated cell: registers parameters, sizes and hyper-parameters.

    Subclasses get ``forward`` and ``forward_sequence`` from generated source.
    """

    def __init__(self, spec: "CellSpec", sizes: Dict[str, int], hypers: Dict[str, float], source: str):
        super().__init__()
        graph = spec.graph
        for name, value in sizes.items():
            setattr(self, name, value)
        for name, value in hypers.items():
            setattr(self, name, value)
        self.cell_name = graph.name
        self.input_size = sizes["input"]
        self.hidden_size = sizes["hidden"]
        self.state_names: List[str] = [d.name for d in graph.states]
        self.state_sizes: List[int] = [d.shape.dims[0].evaluate(sizes) for d in graph.states]
        output = graph.node_map()[graph.outputs[0]]
        self.output_size = output.shape.dims[0].evaluate(sizes)
        self.source = source
        self.derived_backward_trains = supports_training(graph)
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
        self.reset_parameters()

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


def check_call(cell: torch.nn.Module, state, x: Tensor, sequence: bool, mask: Optional[Tensor] = None) -> None:
    """Refuse inputs that do not fit, naming what was expected and what was received.

    Runs in Python before the generated code, so errors are plain ValueErrors
    rather than TorchScript tracebacks.
    """
    name = cell.cell_name
    shape = "(T, batch, {})" if sequence else "(batch, {})"
    if not isinstance(x, Tensor) or x.dim() != (3 if sequence else 2) or x.size(-1) != cell.input_size:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        swapped = isinstance(state, Tensor) and isinstance(x, (tuple, list))
        hint = "; cells take the state first: cell(state, x), as rnnlib's gModule" if swapped else ""
        raise ValueError(f"cell {name}: expected input of shape {shape.format(cell.input_size)}, got {got}"
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
    batch = x.size(-2)
    for state_name, size, value in zip(names, sizes, state):
        if tuple(value.shape) != (batch, size):
            raise ValueError(f"cell {name}: expected state {state_name} of shape ({batch}, {size}), "
                             f"got {tuple(value.shape)}")
        if value.dtype != x.dtype or value.device != x.device:
            raise ValueError(f"cell {name}: state {state_name} is {value.dtype} on {value.device}, "
                             f"but the input is {x.dtype} on {x.device}")
    for parameter in cell.parameters():
        if parameter.dtype != x.dtype or parameter.device != x.device:
            raise ValueError(f"cell {name}: its parameters are {parameter.dtype} on {parameter.device}, "
                             f"but the input is {x.dtype} on {x.device}; convert one with .to()")
        break


@dataclass(frozen=True)
class _Recipe:
    """What rebuilds a cell: its ``.cell`` source and the arguments ``CellSpec.build`` got."""

    source: str
    path: str
    name: str
    input_size: int
    hidden_size: int
    backend: str
    options: Tuple[Tuple[str, object], ...]
    hypers: Tuple[str, ...]  # the cell's hyper-parameters, which may be set on the cell after build

    def of(self, cell: torch.nn.Module) -> "_Recipe":
        """This recipe, with the hyper-parameters ``cell`` holds now."""
        options = dict(self.options, **{name: getattr(cell, name) for name in self.hypers})
        return dataclasses.replace(self, options=tuple(sorted(options.items())))


def _unpickled_spec(recipe: _Recipe) -> "CellSpec":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellWarning)  # shown when the cell was first loaded
        return load_source(recipe.source, recipe.path)[recipe.name]


def _empty_eager_cell(recipe: _Recipe) -> "EagerCell":
    """Unpickling an eager cell: its class, made again from the source, without ``__init__``;
    pickle then restores its ``__dict__`` (parameters, buffers, hooks, flags, as they were)."""
    options = dict(recipe.options)
    cls, parallel = _unpickled_spec(recipe)._generated_class(
        options["disable"], options["fixed_dropout_mask"], options["scan"])
    eager = _eager_class(cls, parallel)
    return eager.__new__(eager)


def _rebuilt_scripted_cell(recipe: _Recipe, parameters: Dict[str, Tensor], training: bool) -> "ScriptedCell":
    """Unpickling a scripted cell: compiled again from its source, then given the saved Parameter
    objects themselves (values, dtype, device, requires_grad, and identity where they are shared)."""
    spec = _unpickled_spec(recipe)
    with torch.random.fork_rng(devices=[]):  # building initializes parameters: leave the RNG as it was
        cell = spec.build(recipe.input_size, recipe.hidden_size, recipe.backend, **dict(recipe.options))
    for name, parameter in parameters.items():
        setattr(cell, name, parameter)
    return cell.train(training)


class EagerCell(CellModule):
    """The generated methods run as plain Python, after checking their arguments."""

    scan_mode = "sequential"  # "parallel" on the classes that carry a forward_parallel

    def __reduce__(self):
        # The class is made at run time (pickle could not find it by name): rebuilt from the source.
        # __getstate__, not __dict__: torch refuses to pickle what it cannot (parametrized modules).
        return _empty_eager_cell, (self._recipe,), self.__getstate__()

    def forward(self, state, x):
        check_call(self, state, x, sequence=False)
        return super().forward(state, x)

    def forward_sequence(self, xs, state, mask=None):
        check_call(self, state, xs, sequence=True, mask=mask)
        if self.scan_mode == "parallel":
            return self.forward_parallel(xs, state, mask)
        return super().forward_sequence(xs, state, mask)


class ScriptedCell(torch.jit.RecursiveScriptModule):
    """A scripted cell: checks arguments in Python, then runs the TorchScript methods.

    Its ``.code`` is the source rnndsl generated; TorchScript's own re-print
    of ``forward`` is ``.scripted_method("forward").code``.
    """

    scan_mode = "sequential"  # "parallel" on the classes that carry a forward_parallel
    # The generated class, whose methods run as Python under torch.export and torch.compile:
    # TorchScript's interpreter would make every symbolic size (a dynamic batch) a constant.
    _python_methods: type

    def __reduce__(self):
        # A TorchScript module does not pickle: it is compiled again from its source on loading,
        # with the hyper-parameters it holds now (`cell.beta = 0.25` after build sets the compiled
        # module's attribute, which the forward reads).
        parameters = dict(self.named_parameters(recurse=False, remove_duplicate=False))
        return _rebuilt_scripted_cell, (self._recipe.of(self), parameters, self.training)

    def __delattr__(self, name: str) -> None:
        # torch.nn.utils.parametrize (weight_norm, spectral_norm, ...) starts by deleting the
        # parameter, which TorchScript refuses with a message that names neither cause nor fix.
        if name in dict(self.named_parameters(recurse=False)):
            raise RuntimeError(f"cell {self.cell_name}: a scripted cell cannot remove or parametrize its "
                               f"parameter {name!r} (TorchScript fixes a module's parameters); build the "
                               "cell with backend='eager', or parametrize the parameters of an rnndsl.LSTM/"
                               "GRU/RNN drop-in, which are plain ones")
        super().__delattr__(name)

    def __deepcopy__(self, memo):
        # RecursiveScriptModule's own copies are bare RecursiveScriptModules: without this class, a
        # copy would lose the argument checks, the derived backward and the parallel scan.
        rebuild, arguments = self.__reduce__()
        return rebuild(*copy.deepcopy(arguments, memo))

    def __copy__(self):
        rebuild, arguments = self.__reduce__()  # a shallow copy shares the parameters
        return rebuild(*arguments)

    @staticmethod
    def adopt(scripted: torch.jit.RecursiveScriptModule, cls: type) -> "ScriptedCell":
        """Re-class a freshly scripted cell to ``cls`` (ScriptedCell or a subclass)."""
        scripted.__class__ = cls
        # torch.jit.script binds each compiled method in the instance __dict__, which would
        # shadow the checking methods below; the compiled ones stay reachable via _c.
        for name in [k for k, v in vars(scripted).items() if isinstance(v, torch._C.ScriptMethod)]:
            del scripted.__dict__[name]
        return scripted

    def scripted_method(self, name: str):
        """A compiled method, bypassing the Python one of the same name."""
        return self._c._get_method(name)

    def forward(self, state, x):
        check_call(self, state, x, sequence=False)
        if torch.compiler.is_compiling():
            return self._python_methods.forward(self, state, x)
        return self.scripted_method("forward")(state, x)

    def forward_sequence(self, xs, state, mask=None):
        check_call(self, state, xs, sequence=True, mask=mask)
        if self.scan_mode == "parallel":
            return self.forward_parallel(xs, state, mask)
        if torch._C._are_functorch_transforms_active():
            # torch.func's transforms follow plain Python, not TorchScript nor a Function without
            # a vmap rule: run the same generated loop as Python.
            return backward.eager_forward_sequence(self, xs, state, mask)
        if torch.compiler.is_compiling():
            return self._python_methods.forward_sequence(self, xs, state, mask)
        if backward.uses_derived_backward(self, xs, state):
            return backward.derived_forward_sequence(self, xs, state, mask)
        return self.scripted_method("forward_sequence")(xs, state, mask)

    @property
    def code(self) -> str:
        return self.source


# Passes to switch off: names, or one name as a string.
Passes = Union[str, Iterable[str]]


def _pass_names(disable: Passes) -> Tuple[str, ...]:
    """``disable`` as the sorted tuple the caches key on; a string is one name, not a sequence of
    one-letter names."""
    return (disable,) if isinstance(disable, str) else tuple(sorted(disable))


class CellSpec:
    """A checked cell, ready to build at any size: rnnlib's cell constructor, from a ``.cell`` file."""

    def __init__(self, cell: st.Cell, source: str, path: str):
        self.ast = cell
        self.source = source
        self.path = path
        self.graph: Graph = lower(cell)

    @property
    def name(self) -> str:
        return self.graph.name

    @property
    def state_names(self) -> Tuple[str, ...]:
        return tuple(d.name for d in self.graph.states)

    @property
    def hypers(self) -> Dict[str, float]:
        return {d.name: d.default for d in self.graph.hypers}

    @property
    def sizes(self) -> Dict[str, Optional[int]]:
        return {d.name: (int(d.default) if d.default is not None else None) for d in self.graph.sizes}

    @functools.cached_property
    def _probability_hypers(self) -> frozenset:
        """The hyper-parameters that are the probability of a dropout or zoneout."""
        nodes = self.graph.node_map()
        return frozenset(n.inputs[-1] for n in self.graph.nodes
                         if n.op in PROBABILITY_OPS and nodes[n.inputs[-1]].op is Op.HYPER)

    @functools.cached_property
    def _native_match(self) -> Tuple[Optional[str], str, Dict[str, str]]:
        return match_native(self)  # fingerprints the whole IR: once per spec

    @property
    def native_mode(self) -> Optional[str]:
        """"LSTM", "GRU", "RNN_TANH" or "RNN_RELU" when torch has a fused kernel for this cell."""
        return self._native_match[0]

    @property
    def why_not_native(self) -> str:
        """Why the cell cannot run on torch's fused kernels ("" when it can)."""
        return self._native_match[1]

    @property
    def native_param_names(self) -> Dict[str, str]:
        """This cell's parameter names -> torch's (``weight_ih``, ...), for a native cell."""
        return dict(self._native_match[2])

    def optimized(self, disable: Passes = ()) -> Graph:
        """The IR after the passes (see rnndsl.passes)."""
        return _optimized(self.graph, _pass_names(disable))

    def code(self, disable: Passes = (), fixed_dropout_mask: bool = False) -> str:
        """The generated source, without building a module."""
        return _source(self.graph, _pass_names(disable), self.path, fixed_dropout_mask)

    def backward_code(self, disable: Passes = ()) -> str:
        """The generated source of the derived backward (rnndsl/backward.py)."""
        return _backward_source(self.graph, _pass_names(disable))

    def bind(self, input_size: int, hidden_size: int, **hyper: float) -> Tuple[Dict[str, int], Dict[str, float]]:
        """Size variables and hyper-parameters for a build, checked."""
        for what, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.name}: {what} must be a positive integer, got {value!r}")
        sizes: Dict[str, int] = {"input": input_size, "hidden": hidden_size}
        hypers = self.hypers
        for key, value in hyper.items():
            if key in hypers:
                problem = hyper_value_problem(value, key in self._probability_hypers)
                if problem:
                    raise ValueError(f"cell {self.name}: hyper-parameter {key} {problem}")
                hypers[key] = float(value)
            elif key in self.sizes and key not in sizes:
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{self.name}: size {key} must be a positive integer, got {value!r}")
                sizes[key] = value
            else:
                known = sorted(set(hypers) | (set(self.sizes) - {"input", "hidden"}))
                raise TypeError(f"cell {self.name} has no hyper-parameter or size {key!r}"
                                + (f"; it has {', '.join(known)}" if known else ""))
        for name, default in self.sizes.items():
            sizes.setdefault(name, default)
        declared = self.graph.input.shape.dims[0].evaluate(sizes)
        if declared != input_size:
            dim = self.graph.input.shape.dims[0]
            wanted = dim.render(lambda name: f"{name}_size" if name in ("input", "hidden") else name)
            raise ValueError(f"cell {self.name} declares its input as `{self.graph.input.name}[{dim}]`, so "
                             f"input_size must be {wanted} = {declared}; got input_size={input_size}")
        for decl in self.graph.params + self.graph.states:
            for dim in decl.shape.dims:
                if not 1 <= dim.evaluate(sizes) <= MAX_DIMENSION:
                    raise ValueError(f"cell {self.name}: {decl.name} would have size {dim} = "
                                     f"{dim.evaluate(sizes)} with {sizes}; sizes run from 1 to "
                                     f"{MAX_DIMENSION:,}")
        elements = sum(math.prod(dim.evaluate(sizes) for dim in decl.shape.dims) for decl in self.graph.params)
        if elements > MAX_ELEMENTS:
            raise ValueError(f"cell {self.name}: with {sizes} its parameters would hold {elements:,} numbers, "
                             f"{elements * torch.finfo(torch.get_default_dtype()).bits // 8:,} bytes in "
                             f"{torch.get_default_dtype()}; a cell may have at most {MAX_ELEMENTS:,} numbers")
        return sizes, hypers

    def parallel_plan(self, disable: Passes = (),
                      fixed_dropout_mask: bool = False) -> Tuple[Optional[str], str]:
        """``(source of forward_parallel, "")`` when the recurrence is linear in the state, else
        ``(None, why not)`` quoting the equation that is not (see rnndsl/parallel.py)."""
        return _parallel_plan(self.graph, _pass_names(disable), self.source, bool(fixed_dropout_mask))

    def build(self, input_size: int, hidden_size: int, backend: str = "script", *,
              disable: Passes = (), fixed_dropout_mask: bool = False, scan: str = "auto",
              **hyper: float) -> torch.nn.Module:
        """A cell module: ``cell(state, x) -> (new_state, output)``.

        ``fixed_dropout_mask=True``: in ``forward_sequence`` (so in ``rnndsl.scan``),
        each ``dropout`` of a value that depends on a state draws one mask per
        sequence instead of one per step.
        ``scan``: ``"parallel"`` runs ``forward_sequence`` as a parallel scan (only for
        cells linear in their state, else ValueError), ``"sequential"`` as a time loop,
        ``"auto"`` picks the parallel scan where it applies.
        """
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; cells build with {', '.join(BACKENDS)} "
                             "(networks also offer 'native' and 'auto')")
        if scan not in SCANS:
            raise ValueError(f"unknown scan {scan!r}; choose one of {', '.join(SCANS)}")
        sizes, hypers = self.bind(input_size, hidden_size, **hyper)
        disable = _pass_names(disable)
        cls, parallel = self._generated_class(disable, bool(fixed_dropout_mask), scan)
        options = dict(disable=disable, fixed_dropout_mask=bool(fixed_dropout_mask), scan=scan, **hyper)
        recipe = _Recipe(self.source, self.path, self.name, input_size, hidden_size, backend,
                         tuple(sorted(options.items())), tuple(hypers))
        if backend == "eager":
            cell = _eager_class(cls, parallel)(self, sizes, hypers, cls.generated_source)
        else:
            cell = _script(cls(self, sizes, hypers, cls.generated_source), parallel)
        cell._recipe = recipe  # what pickling needs to make the cell again
        return cell

    def _generated_class(self, disable: Tuple[str, ...], fixed_dropout_mask: bool,
                        scan: str) -> Tuple[type, Optional[str]]:
        """The module class with the generated methods, and the parallel scan's source (None when
        the cell runs a time loop)."""
        parallel, why_not = (self.parallel_plan(disable, fixed_dropout_mask) if scan != "sequential"
                             else (None, ""))
        if scan == "parallel" and parallel is None:
            raise ValueError(f"cell {self.name} cannot run as a parallel scan: {why_not}")
        return _module_class(self.graph, tuple(sorted(disable)), self.path, fixed_dropout_mask), parallel

    def __repr__(self) -> str:
        return f"CellSpec({self.name!r} from {self.path})"


def _script(module: CellModule, parallel: Optional[str]) -> "ScriptedCell":
    with _compile_lock, warnings.catch_warnings():
        # torch 2.13 deprecates torch.jit.script; the user did not call it, rnndsl did, and
        # rnndsl's own pickling and deepcopy must work under -W error.
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=DeprecationWarning)
        try:
            scripted = torch.jit.script(module)
        except Exception:
            # TorchScript keeps the methods it compiled before failing, and would refuse to
            # compile this class again ("Can't redefine method"), hiding the real error on
            # the next build: forget the class so that build makes a fresh one.
            _module_class.cache_clear()
            raise
    cell = ScriptedCell.adopt(scripted, _scripted_class(parallel))
    cell._python_methods = type(module)
    _scripted_classes.setdefault(type(module)._methods_text, type(module))
    return cell


# Classes TorchScript has compiled, by the text of their methods. TorchScript keeps every class it
# compiles for the life of the process (no API frees one), so a cell built again after its class
# left _module_class's cache must reuse that class, not have TorchScript compile and keep a copy.
_scripted_classes: Dict[str, type] = {}


@functools.lru_cache(maxsize=128)
def _optimized(graph: Graph, disable: Tuple[str, ...]) -> Graph:
    return run_passes(graph, tuple(name for name in disable if name != DERIVED_BACKWARD))


@functools.lru_cache(maxsize=128)
def _backward_source(graph: Graph, disable: Tuple[str, ...]) -> str:
    return generate_backward(_optimized(graph, disable)).source


@functools.lru_cache(maxsize=128)
def _source(graph: Graph, disable: Tuple[str, ...], origin: str, fixed_dropout_mask: bool = False) -> str:
    return generate_step(_optimized(graph, disable), f"{os.path.basename(origin)} (cell {graph.name})",
                         fixed_dropout_mask).source


@functools.lru_cache(maxsize=128)
def _module_class(graph: Graph, disable: Tuple[str, ...], origin: str, fixed_dropout_mask: bool = False) -> type:
    """A CellModule subclass with the generated methods; cached, so TorchScript compiles it once."""
    with _compile_lock:
        source = _source(graph, disable, origin, fixed_dropout_mask)
        derived = DERIVED_BACKWARD not in disable
        text = source + ("\n\n" + _backward_source(graph, disable) if derived else "")
        if text in _scripted_classes:
            return _scripted_classes[text]
        filename = f"<rnndsl {graph.name} #{next(_counter)}>"
        # Registered like torch.fx does, so tracebacks and torch.jit.script can read the source.
        linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
        namespace = kernels.resolve_globals(SCRIPT_GLOBALS)
        # The source comes only from the IR; validate_source is the last guard before exec.
        exec(compile(validate_source(text), filename, "exec"), namespace)
        methods = {
            "forward": namespace["forward"],
            "forward_sequence": torch.jit.export(namespace["forward_sequence"]),
            "generated_source": source,
            "_methods_text": text,
        }
        if derived:
            for name in ("forward_sequence_saving", "backward_sequence"):
                methods[name] = torch.jit.export(namespace[name])
        cls = type(f"{graph.name}_cell", (CellModule,), methods)
        # The source lives as long as the class (the caches here are bounded; TorchScript's own
        # store keeps every class it compiled).
        weakref.finalize(cls, linecache.cache.pop, filename, None)
        return cls


def _parallel_methods(parallel_source: Optional[str]) -> dict:
    """Class attributes for a cell that runs as a parallel scan (none when it does not)."""
    if parallel_source is None:
        return {}
    filename = f"<rnndsl parallel #{next(_counter)}>"
    linecache.cache[filename] = (len(parallel_source), None, parallel_source.splitlines(True), filename)
    namespace = kernels.resolve_globals(PARALLEL_GLOBALS)
    exec(compile(validate_source(parallel_source), filename, "exec"), namespace)  # generated from the IR
    return {"forward_parallel": namespace["forward_parallel"], "scan_mode": "parallel",
            "parallel_source": parallel_source}


@functools.lru_cache(maxsize=128)
def _eager_class(generated: type, parallel_source: Optional[str] = None) -> type:
    return type(generated.__name__, (EagerCell, generated), _parallel_methods(parallel_source))


@functools.lru_cache(maxsize=128)
def _scripted_class(parallel_source: Optional[str]) -> type:
    if parallel_source is None:
        return ScriptedCell
    return type("ScriptedParallelCell", (ScriptedCell,), _parallel_methods(parallel_source))


@functools.lru_cache(maxsize=128)
def _parallel_plan(graph: Graph, disable: Tuple[str, ...], source: str,
                   fixed_dropout_mask: bool) -> Tuple[Optional[str], str]:
    try:
        try:
            optimized = _optimized(graph, disable)
            updates = find_linear_recurrences(optimized, fixed_dropout_mask)
        except NotLinear:
            # join_slices may have joined the sums `a * s + b` of several states into slices of one
            # add, hiding their linear form (it joins the bias adds that the GEMM then fuses, too,
            # so it is tried first).
            optimized = _optimized(graph, tuple(sorted(set(disable) | {"join_slices"})))
            updates = find_linear_recurrences(optimized, fixed_dropout_mask)
        return generate_parallel(optimized, updates).source, ""
    except NotLinear as reason:
        where = ""
        span = reason.node.span if reason.node is not None else None
        if span is not None:
            lines = source_lines(source)
            quoted = lines[span.line - 1].strip() if 0 < span.line <= len(lines) else ""
            where = f" (at {one_line(span.file)}:{span.line}: `{one_line(quoted)}`)"
        return None, f"the recurrence is not linear in the state: {reason}{where}"


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            # Bounded, so that a huge file cannot fill memory; decode refuses what is too long.
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:  # a permission denied, or the file gone since _regular_file_status
        raise CellError(f"cannot read {path}: {exc.strerror or exc}", None) from None
    return data


_SPECIAL_FILES = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _regular_file_status(path: Path) -> os.stat_result:
    """The status of ``path``, or a CellError saying why it is not a readable regular file.

    Checked before opening: opening a FIFO that nobody writes to blocks forever, and a
    device such as /dev/zero never ends.
    """
    try:
        status = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise CellError(f"{path} is a broken symbolic link: its target {os.readlink(path)} "
                            "does not exist", None) from None
        raise CellError(f"no such file: {path}", None) from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise CellError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}", None) from None
    if stat.S_ISDIR(status.st_mode):
        raise CellError(f"{path} is a directory, not a .cell file", None)
    if not stat.S_ISREG(status.st_mode):
        kind = next((kind for test, kind in _SPECIAL_FILES if test(status.st_mode)), "a special file")
        raise CellError(f"{path} is {kind}, not a regular file; cells are read from regular files only",
                        None)
    return status


def _resolve(name_or_path: Union[str, os.PathLike]) -> Path:
    """The file to read for ``name_or_path``: a path as given, or a stock cell's file.

    A bare name (no suffix, no separator) is a stock cell unless something other
    than a directory has that name in the working directory: that file wins, with
    a warning naming it when it shadows a stock cell. A directory never does, so
    that a folder ``lstm/`` beside a script cannot hide the stock ``lstm``.
    """
    text = os.fspath(name_or_path)
    if not text:  # Path("") is ".", which would be reported as a directory
        raise CellError("the path is empty; give a .cell file or a stock cell name "
                        f"({', '.join(stock_cell_names())})", None)
    path = Path(text)
    if path.suffix or os.sep in text or "/" in text:
        return path
    if os.path.lexists(path) and not path.is_dir():
        if text in stock_cell_names():
            warnings.warn(f"{text!r} names the file {path.absolute()}, which is loaded instead of the stock "
                          f"cell {text}; rnndsl.load_stock_cell({text!r}) loads the stock one",
                          CellWarning, stacklevel=4)
        return path
    return _stock_file(text)


def _stock_file(name: str) -> Path:
    """The packaged file of stock cell ``name``; a CellError listing the stock cells when there is none."""
    if name not in stock_cell_names():
        raise CellError(f"no stock cell named {name!r}; stock cells are {', '.join(stock_cell_names())}",
                        None)
    return stock_cells_dir() / f"{name}.cell"


def load_source(source: str, path: str = "<string>") -> Dict[str, CellSpec]:
    """Every cell of a ``.cell`` text, by name."""
    try:
        file = check_file(parse(source, path))
        if not file.cells:
            raise CellError("the file holds no cell", Span(path, 1, 1, 1, 2),
                            hint="a cell starts with `cell name(x[input]) -> h {`")
        return {cell.name: CellSpec(cell, source, path) for cell in file.cells}
    except CellError as error:
        raise (error.with_source(source) if error.source is None else error) from None


@functools.lru_cache(maxsize=64)
def _load_file(path: str, data: bytes) -> Dict[str, CellSpec]:
    return load_source(decode(data, path), path)


def load_cells(name_or_path: Union[str, os.PathLike]) -> Dict[str, CellSpec]:
    """Every cell in a ``.cell`` file (or the stock file of that name), by name."""
    path = _resolve(name_or_path)
    _regular_file_status(path)
    # Cached on the content, not on the file's mtime and size: a rewrite of the same size within
    # the mtime's resolution (or with the mtime kept) must load the new equations.
    data = _read(path)
    with _compile_lock:
        return dict(_load_file(str(path), data))


def load_cell(name_or_path: Union[str, os.PathLike], cell: Optional[str] = None) -> CellSpec:
    """A stock cell by name (``"lstm"``), or a cell from a ``.cell`` file.

    A file with several cells needs ``cell=`` to pick one.
    """
    cells = load_cells(name_or_path)
    if cell is not None:
        if cell not in cells:
            raise CellError(f"{name_or_path} has no cell named {cell!r}; it has {', '.join(cells)}", None)
        return cells[cell]
    if len(cells) == 1:
        return next(iter(cells.values()))
    raise CellError(f"{name_or_path} holds several cells ({', '.join(cells)}); "
                    "pick one with load_cell(path, cell=NAME)", None)


def load_stock_cell(name: str) -> CellSpec:
    """The packaged stock cell ``name`` (``"lstm"``), whatever lies in the working directory."""
    return load_cell(_stock_file(name))

