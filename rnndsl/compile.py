"""The cached pipeline from IR to module classes: passes, code generation, exec, TorchScript.

Owns the state that builds share: one lock, the caches (bounded, cleared together by
:func:`clear_caches`), the registry of classes TorchScript has compiled, and the
registration of generated source with ``linecache`` (so that tracebacks and
``torch.jit.script`` can read it, as torch.fx does). Every function takes the build
choices as one :class:`~rnndsl.options.BuildOptions`. The facade (rnndsl/cellspec.py)
calls it; the classes it makes derive from those of rnndsl/cells.py.

A new target (another generated method, another way to run a cell) adds its cached
source and its exec here.
"""
from __future__ import annotations

import functools
import itertools
import linecache
import os
import threading
import warnings
import weakref
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import kernels
from .cells import CellModule, EagerCell, ScriptedCell
from .codegen import (DecayNotPositive, NotLinear, PythonCode, find_linear_recurrences, generate_backward,
                      generate_parallel, generate_scan, generate_step, linearized, validate_source)
from .errors import one_line, quoted_line
from .fused_scan import FusedKernel
from .ir import Graph
from .options import BuildOptions
from .passes import run_passes

compile_lock = threading.RLock()  # TorchScript compilation and the caches are shared state
_counter = itertools.count()
_caches: List[Callable] = []


def cached(maxsize: int) -> Callable[[Callable], Callable]:
    """``functools.lru_cache(maxsize)``, one of the caches that :func:`clear_caches` clears."""
    def decorate(function: Callable) -> Callable:
        cache = functools.lru_cache(maxsize=maxsize)(function)
        _caches.append(cache)
        return cache
    return decorate


def clear_caches() -> None:
    """Forget every cached graph, source, class and loaded file; later builds make them again.

    The registry of classes TorchScript has compiled stays: TorchScript keeps them anyway.
    """
    with compile_lock:
        for cache in _caches:
            cache.cache_clear()


def generated_class(graph: Graph, options: BuildOptions, origin: str,
                    cell_source: str) -> Tuple[type, Optional[PythonCode]]:
    """The module class with the generated methods, and the parallel scan's code (None when
    the cell runs a time loop). ``origin`` names the file in the generated source's comment;
    ``cell_source`` is the ``.cell`` text, quoted when the scan cannot be parallel."""
    parallel, why_not = (_parallel_plan(graph, options.disable, options.fixed_dropout_mask, cell_source)
                         if options.scan != "sequential" else (None, ""))
    if options.scan == "parallel" and parallel is None:
        raise ValueError(f"cell {graph.name} cannot run as a parallel scan: {why_not}")
    return _module_class(graph, options, origin), parallel


def optimized(graph: Graph, options: BuildOptions) -> Graph:
    """The IR after the passes that ``options`` leaves on."""
    return _optimized(graph, options.disable)


def step_source(graph: Graph, options: BuildOptions, origin: str) -> str:
    """The source of ``forward`` and ``forward_sequence`` (rnndsl/codegen/step.py)."""
    return _source(graph, options.disable, origin, options.fixed_dropout_mask).source


def backward_source(graph: Graph, options: BuildOptions) -> str:
    """The source of the derived backward's methods (rnndsl/codegen/backward.py)."""
    return _backward_source(graph, options.disable).source


def scan_source(graph: Graph, options: BuildOptions) -> str:
    """The source of ``forward_sequence_scan``, what torch.export runs (rnndsl/codegen/scan.py); for a
    cell with several inputs, which that form does not take yet, a comment saying so."""
    if graph.extra_inputs:
        return (f"# cell {graph.name} has several inputs ({', '.join(d.name for d in graph.inputs)}), which "
                "the scan form (torch.export) does not take yet\n")
    return _scan_source(graph, options.disable).source


def parallel_plan(graph: Graph, options: BuildOptions, cell_source: str) -> Tuple[Optional[str], str]:
    """``(source of forward_parallel, "")`` when the recurrence is linear in the state, else
    ``(None, why not)`` quoting the equation of ``cell_source`` that is not (rnndsl/codegen/parallel.py)."""
    code, why_not = _parallel_plan(graph, options.disable, options.fixed_dropout_mask, cell_source)
    return (None if code is None else code.source), why_not


def fused_sources(graph: Graph, options: BuildOptions, cell_source: str) -> Tuple[str, ...]:
    """The C++ of the fused kernels ``forward_parallel`` calls under ``use_cpu_kernel()``
    (rnndsl/codegen/fused.py): one per state, or none when the cell runs no parallel scan or a
    state of it is a tensor."""
    code, _ = _parallel_plan(graph, options.disable, options.fixed_dropout_mask, cell_source)
    return () if code is None else code.kernels


def script_kernel(cell: CellModule) -> torch.jit.RecursiveScriptModule:
    """The TorchScript module a :class:`ScriptedCell` runs: its generated class compiled, holding the
    cell's parameters (the same tensors), sizes, hyper-parameters and mode."""
    generated = cell._python_methods
    shell = generated.__new__(generated)
    torch.nn.Module.__init__(shell)
    # The cell's plain attributes, so that every cell of a class has one TorchScript type, compiled once.
    # (A DataParallel replica holds its parameters and buffers as plain attributes: registered below.)
    tensors = set(cell._inits) | set(cell._buffer_names)
    for name, value in vars(cell).items():
        if not name.startswith("_") and name != "training" and name not in tensors:
            object.__setattr__(shell, name, value)
    shell.training = cell.training
    for name in cell._inits:
        value = getattr(cell, name)  # a parametrized one is computed: the cell binds the real one per call
        shell.register_parameter(name, value if isinstance(value, torch.nn.Parameter)
                                 else torch.nn.Parameter(value.detach(), value.requires_grad))
    for name in cell._buffer_names:
        shell.register_buffer(name, getattr(cell, name))
    with compile_lock, warnings.catch_warnings():
        # torch 2.13 deprecates torch.jit.script; the user did not call it, rnndsl did, and
        # rnndsl's own pickling and deepcopy must work under -W error.
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=DeprecationWarning)
        try:
            kernel = torch.jit.script(shell)
        except Exception:
            # TorchScript keeps the methods it compiled before failing, and would refuse to
            # compile this class again ("Can't redefine method"), hiding the real error on
            # the next build: forget the class so that build makes a fresh one.
            clear_caches()
            raise
        _scripted_classes.setdefault(generated._registry_key, generated)
    return kernel


# Classes TorchScript has compiled, by their methods' text and the constants they read. TorchScript
# keeps every class it compiles for the life of the process (no API frees one), so a cell built again
# after its class left _module_class's cache must reuse that class, not have TorchScript compile and
# keep a copy.
_scripted_classes: Dict[Tuple[str, Tuple[str, ...]], type] = {}


@cached(maxsize=128)
def _optimized(graph: Graph, disable: Tuple[str, ...]) -> Graph:
    return run_passes(graph, disable)


@cached(maxsize=128)
def _backward_source(graph: Graph, disable: Tuple[str, ...]) -> PythonCode:
    return generate_backward(_optimized(graph, disable))


@cached(maxsize=128)
def _scan_source(graph: Graph, disable: Tuple[str, ...]) -> PythonCode:
    return generate_scan(_optimized(graph, disable))


@cached(maxsize=128)
def _source(graph: Graph, disable: Tuple[str, ...], origin: str, fixed_dropout_mask: bool = False) -> PythonCode:
    return generate_step(_optimized(graph, disable), f"{os.path.basename(origin)} (cell {graph.name})",
                         fixed_dropout_mask)


@cached(maxsize=128)
def _module_class(graph: Graph, options: BuildOptions, origin: str) -> type:
    """A CellModule subclass with the generated methods; cached, so TorchScript compiles it once."""
    with compile_lock:
        step = _source(graph, options.disable, origin, options.fixed_dropout_mask)
        code = _joined(step, _backward_source(graph, options.disable)) if options.derived_backward else step
        # forward_sequence_scan is plain Python that TorchScript never compiles (no method it
        # compiles calls it): what torch.export runs. It takes one input (export refuses others).
        if not graph.extra_inputs:
            code = _joined(code, _scan_source(graph, options.disable))
        # The sizes and hyper-parameters the code reads as module attributes (`self.hidden`).
        constants = tuple(dict.fromkeys(["input", "hidden"] + [d.name for d in graph.sizes]
                                        + [d.name for d in graph.hypers]))
        key = (code.source, constants)  # everything the class is made of
        if key in _scripted_classes:
            return _scripted_classes[key]
        namespace, filename = _run(code, graph.name)
        methods = {
            "forward": namespace["forward"],
            "forward_sequence": torch.jit.export(namespace["forward_sequence"]),
            "forward_sequence_scan": namespace.get("forward_sequence_scan"),
            "generated_source": step.source,
            "_constant_names": constants,
            "_registry_key": key,
        }
        if options.derived_backward:
            for name in ("forward_sequence_saving", "backward_sequence"):
                methods[name] = torch.jit.export(namespace[name])
        methods["_output_count"] = len(graph.outputs)
        cls = type(f"{graph.name}_cell", (CellModule,), methods)
        # The source lives as long as the class (the caches here are bounded; TorchScript's own
        # store keeps every class it compiled).
        weakref.finalize(cls, linecache.cache.pop, filename, None)
        return cls


def _joined(first: PythonCode, second: PythonCode) -> PythonCode:
    """Two generated sources as one module's: the text of both, the globals either reads."""
    return PythonCode(first.source + "\n\n" + second.source, tuple(dict.fromkeys(first.globals + second.globals)))


def _class_with_parallel(name: str, bases: Tuple[type, ...], parallel: Optional[PythonCode]) -> type:
    """A class over ``bases`` that runs as a parallel scan when given its code; that source stays
    in linecache as long as the class."""
    generated = {"_python_methods": bases[-1]}
    if parallel is None:
        return type(name, bases, generated)
    namespace, filename = _run(parallel, "parallel")
    cls = type(name, bases, {**generated, "forward_parallel": namespace["forward_parallel"], "scan_mode": "parallel",
                             "parallel_source": parallel.source,
                             "fused_kernels": tuple(FusedKernel(source) for source in parallel.kernels)})
    weakref.finalize(cls, linecache.cache.pop, filename, None)
    return cls


@cached(maxsize=128)
def cell_class(backend: str, generated: type, parallel: Optional[PythonCode] = None) -> type:
    """The class of a cell over a generated class, for ``backend`` "eager" or "script" (with
    ``forward_parallel`` when given its code)."""
    if backend == "eager":
        return _class_with_parallel(generated.__name__, (EagerCell, generated), parallel)
    cls = _class_with_parallel(generated.__name__, (ScriptedCell, generated), parallel)
    cls._script_kernel = staticmethod(script_kernel)
    return cls


@cached(maxsize=128)
def _parallel_plan(graph: Graph, disable: Tuple[str, ...], fixed_dropout_mask: bool,
                   source: str) -> Tuple[Optional[PythonCode], str]:
    if graph.extra_inputs:
        return None, (f"it has several inputs ({', '.join(d.name for d in graph.inputs)}), which the "
                      "parallel scan does not take yet")
    try:
        try:
            # Linearity from meaning: `h' = x * h + h` is written `(x + 1) * h + 0` first.
            optimized = linearized(_optimized(graph, disable))
            updates = find_linear_recurrences(optimized, fixed_dropout_mask)
        except NotLinear:
            # join_slices may have joined the sums `a * s + b` of several states into slices of one
            # add, hiding their linear form (it joins the bias adds that the GEMM then fuses, too,
            # so it is tried first).
            optimized = linearized(_optimized(graph, tuple(sorted(set(disable) | {"join_slices"}))))
            updates = find_linear_recurrences(optimized, fixed_dropout_mask)
        return generate_parallel(optimized, updates), ""
    except NotLinear as reason:
        where = ""
        span = reason.node.span if reason.node is not None else None
        if span is not None:
            where = f" (at {one_line(span.file)}:{span.line}: `{quoted_line(source, span)}`)"
        problem = ("the chunkwise form needs a decay positive by its form" if isinstance(reason, DecayNotPositive)
                   else "the recurrence is not linear in the state")
        return None, f"{problem}: {reason}{where}"


def _run(code: PythonCode, label: str) -> Tuple[dict, str]:
    """Execute generated ``code`` with the globals it names bound; its namespace and the file name
    it runs as."""
    filename = f"<rnndsl {label} #{next(_counter)}>"
    # Registered like torch.fx does, so tracebacks and torch.jit.script can read the source.
    linecache.cache[filename] = (len(code.source), None, code.source.splitlines(True), filename)
    namespace = kernels.resolve_globals(code.globals)
    # The source comes only from the IR; validate_source is the last guard before exec.
    exec(compile(validate_source(code.source), filename, "exec"), namespace)
    return namespace, filename
