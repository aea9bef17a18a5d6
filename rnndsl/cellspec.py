"""The public face of the compiler: ``load_cell`` and ``CellSpec.build``.

``load_cell`` runs parse -> check -> lower and keeps the IR graph;
``build`` checks sizes and hyper-parameters, takes the build choices as one
:class:`~rnndsl.options.BuildOptions`, and returns a module: plain Python
(``backend="eager"``) or TorchScript (``backend="script"``). The cached
pipeline behind it (passes, code generation, exec) lives in rnndsl/compile.py,
the built cells' classes in rnndsl/cells.py.
"""
from __future__ import annotations

import functools
import math
import operator
import os
import stat
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from . import syntax_tree as st
from .cells import Recipe
from .check import check_file, hyper_value_problem, input_sizes
from .compile import (backward_source, cached, cell_class, compile_lock, generated_class, fused_sources, optimized,
                      parallel_plan, scan_source, step_source)
from .codegen.base import NUMBER_EMITTERS
from .errors import CellError, CellWarning, Span, quoted_line, quoted_text
from .ir import MAX_DIMENSION, Graph, Node, Op, Size
from .lower import lower, size_of
from .native import NATIVE_MODES, PARAMETER_NAMES, run_native
from .native_match import MATCH_DISABLE, match_native
from .passes.dead_code import live_names
from .ops import PROBABILITY_OPS
from .options import CELL_BACKENDS, BuildOptions, Passes
from .resources import stock_cell_names, stock_cells_dir
from .syntax import MAX_FILE_BYTES, decode, parse

# All the parameters of one cell: 2**36 float32 numbers are 256 GiB, more than any accelerator holds.
MAX_ELEMENTS = 2**36


def positive_size(value: object) -> Optional[int]:
    """``value`` as a Python int when it is a positive integer of any kind (``numpy.int64``, a 0-d
    integer tensor: what a config file or ``x.shape`` gives), else None (a bool, a float, below 1)."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and (value.dim() != 0 or value.dtype == torch.bool)):
        return None  # operator.index takes True, torch.tensor(True) and a one-number tensor [4]
    try:
        number = operator.index(value)
    except TypeError:
        return None
    return number if number is not None and number >= 1 else None


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
    def input_dims(self) -> Tuple[Size, ...]:
        """The input's dims as declared: one for a vector, ``(input, height, width)`` for a spatial
        input, which cells take flat, ``(T, batch, input*height*width)``."""
        return tuple(size_of(size) for size in self.ast.input.shape)

    @functools.cached_property
    def _probability_hypers(self) -> frozenset:
        """The hyper-parameters that are the probability of a dropout or zoneout."""
        nodes = self.graph.node_map()
        return frozenset(n.inputs[-1] for n in self.graph.nodes
                         if n.op in PROBABILITY_OPS and nodes[n.inputs[-1]].op is Op.HYPER)

    @functools.cached_property
    def _native_match(self) -> Tuple[Optional[str], str, Dict[str, str]]:
        # Fingerprints the whole IR: once per spec.
        return match_native(self.optimized(disable=MATCH_DISABLE), _native_stock_graphs())

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

    @functools.cached_property
    def fused_step(self) -> Optional[Tuple[Callable[..., object], Tuple[str, ...]]]:
        """torch's one-step kernel computing this cell (``torch.lstm_cell``, ...) and the cell's
        parameters in the order it takes them (``weight_ih``, ``weight_hh``, ``bias_ih``,
        ``bias_hh``); None when no kernel computes it."""
        if self.native_mode is None:
            return None
        names = {torch_name: name for name, torch_name in self.native_param_names.items()}
        return NATIVE_MODES[self.native_mode].step, tuple(names[torch_name] for torch_name in PARAMETER_NAMES)

    @functools.cached_property
    def fused_sequence(self) -> Optional[Callable[..., Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]]]:
        """:func:`rnndsl.native.run_native` for this cell's mode (one layer by ``torch.lstm``, ...):
        ``(xs, state, weights)`` -> (outputs, final state), the weights in :attr:`fused_step`'s
        order; None when no kernel computes the cell."""
        return None if self.native_mode is None else functools.partial(run_native, self.native_mode)

    @property
    def fused_sequence_bounds(self) -> Optional[Tuple[int, int]]:
        """Where :attr:`fused_sequence` runs a no-grad sequence (``NativeMode.sequence_kernel_bounds``):
        None, always; (numbers, batch), with a recurrent weight of at most that many numbers or a
        batch of at least that many sequences."""
        return None if self.native_mode is None else NATIVE_MODES[self.native_mode].sequence_kernel_bounds

    def optimized(self, disable: Passes = ()) -> Graph:
        """The IR after the passes (see rnndsl.passes)."""
        return optimized(self.graph, BuildOptions(disable))

    def code(self, disable: Passes = (), fixed_dropout_mask: bool = False) -> str:
        """The generated source, without building a module."""
        return step_source(self.graph, BuildOptions(disable, fixed_dropout_mask=fixed_dropout_mask), self.path)

    def backward_code(self, disable: Passes = ()) -> str:
        """The generated source of the derived backward (rnndsl/codegen/backward.py)."""
        return backward_source(self.graph, BuildOptions(disable))

    def scan_code(self, disable: Passes = ()) -> str:
        """The generated source of ``forward_sequence_scan``, the time loop as one ``scan`` node that
        torch.export keeps valid for any sequence length (rnndsl/codegen/scan.py)."""
        return scan_source(self.graph, BuildOptions(disable))

    def _checked_size(self, what: str, value: object) -> int:
        number = positive_size(value)
        if number is None:
            raise ValueError(f"{self.name}: {what} must be a positive integer, got {value!r}")
        return number

    def bind(self, input_size: int, hidden_size: int, **hyper: float) -> Tuple[Dict[str, int], Dict[str, float]]:
        """Size variables and hyper-parameters for a build, checked."""
        input_size = self._checked_size("input_size", input_size)
        hidden_size = self._checked_size("hidden_size", hidden_size)
        sizes: Dict[str, int] = {"input": input_size, "hidden": hidden_size}
        hypers = self.hypers
        for key, value in hyper.items():
            if key in hypers:
                problem = hyper_value_problem(value, key in self._probability_hypers)
                if problem:
                    raise ValueError(f"cell {self.name}: hyper-parameter {key} {problem}")
                hypers[key] = float(value)
            elif key in self.sizes and key not in sizes:
                sizes[key] = self._checked_size(f"size {key}", value)
            else:
                known = sorted(set(hypers) | (set(self.sizes) - {"input", "hidden"}))
                raise TypeError(f"cell {self.name} has no hyper-parameter or size {key!r}"
                                + (f"; it has {', '.join(known)}" if known else ""))
        for name, default in self.sizes.items():
            if default is not None:
                sizes.setdefault(name, default)
        for name in input_sizes(self.ast):
            if name not in sizes:
                decl = next(d for d in self.ast.inputs if any(name in size_of(s).variables for s in d.shape))
                shape = ", ".join(str(size_of(s)) for s in decl.shape)
                raise TypeError(f"cell {self.name} reads `{decl.name}[{shape}]`: give the size {name} at build, "
                                f"as in build(input_size, hidden_size, {name}=16)")
        for decl in self.ast.sizes:
            if decl.formula is not None and decl.name not in sizes:
                sizes[decl.name] = self._computed_size(decl, sizes)
        # input_size is the size of the input's first dim: its features, or a spatial input's channels.
        dim = self.input_dims[0]
        declared = dim.evaluate(sizes)
        if declared != input_size:
            wanted = dim.render(lambda name: f"{name}_size" if name in ("input", "hidden") else name)
            shape = ", ".join(str(d) for d in self.input_dims)
            which = "" if len(self.input_dims) == 1 else ", the size of its first dim,"
            raise ValueError(f"cell {self.name} declares its input as `{self.graph.input.name}[{shape}]`, so "
                             f"input_size{which} must be {wanted} = {declared}; got input_size={input_size}")
        for decl in self.graph.params + self.graph.states:
            for dim in decl.shape.dims:
                if not 1 <= dim.evaluate(sizes) <= MAX_DIMENSION:
                    raise ValueError(f"cell {self.name}: {decl.name} would have size {dim} = "
                                     f"{dim.evaluate(sizes)} with {sizes}; sizes run from 1 to "
                                     f"{MAX_DIMENSION:,}")
        self._check_kernels(sizes)
        self._check_numbers(hypers)
        elements = sum(math.prod(dim.evaluate(sizes) for dim in decl.shape.dims) for decl in self.graph.params)
        if elements > MAX_ELEMENTS:
            raise ValueError(f"cell {self.name}: with {sizes} its parameters would hold {elements:,} numbers, "
                             f"{elements * torch.finfo(torch.get_default_dtype()).bits // 8:,} bytes in "
                             f"{torch.get_default_dtype()}; a cell may have at most {MAX_ELEMENTS:,} numbers")
        return sizes, hypers

    def _check_numbers(self, hypers: Dict[str, float]) -> None:
        """Compute the cell's numbers (functions of constants and hyper-parameters, as the generated
        code computes them on Python floats) with these hypers: a ValueError naming the equation
        where one is not a finite number (`sqrt(k)` with k < 0, `1 / 0`, `exp(1000)`), which the
        eager backend would raise as a bare Python error at the first call and TorchScript would
        carry on as nan or inf; where a clamp's bounds are crossed (`clamp(c, -k, k)` with
        k < 0), which makes every value its upper bound; where a value is divided by a zero number;
        or where a dropout or zoneout probability lies outside [0, 1]. Values that reach no result
        (dead code, which the passes drop) are not checked."""
        def refuse(node: Node, what: str, problem: str) -> None:
            where = "" if node.span is None else f" at {node.span} (`{quoted_line(self.source, node.span)}`)"
            given = ", ".join(f"{name}={value!r}" for name, value in hypers.items())
            raise ValueError(f"cell {self.name}: {what}{where} {problem}" + (f" with {given}" if given else ""))

        def number(node: Node) -> str:  # as the file spells it: the IR's names (`sqrt_1`) mean nothing there
            text = None if node.span is None else quoted_text(self.source, node.span)
            return f"the number `{text or node.name}`"

        live = live_names(self.graph)
        values: Dict[str, float] = {}
        for node in self.graph.nodes:
            if node.name not in live:
                continue
            if node.op is Op.CONST:
                values[node.name] = float(node.attr("value"))
            elif node.op is Op.HYPER:
                values[node.name] = hypers[node.name]
            elif node.shape.is_scalar and node.op in NUMBER_EMITTERS and all(i in values for i in node.inputs):
                expression = NUMBER_EMITTERS[node.op](node, [f"({values[i]!r})" for i in node.inputs])
                try:
                    value = float(eval(expression, {"math": math}))  # noqa: S307 (our own emitter's code)
                except (ArithmeticError, ValueError) as error:
                    refuse(node, number(node), f"cannot be computed ({error})")
                if not math.isfinite(value):
                    refuse(node, number(node), f"is {value}")
                values[node.name] = value
            elif node.op is Op.CLAMP and all(bound in values for bound in node.inputs[1:]):
                low, high = (values[bound] for bound in node.inputs[1:])
                if low > high:
                    refuse(node, "clamp", f"has its lower bound {low:g} above its upper bound {high:g}, which "
                                          f"makes every value {high:g}")
            elif node.op is Op.DIV and node.inputs[1] in values and values[node.inputs[1]] == 0:
                refuse(node, "a division", "divides by zero")  # the loop would give inf or nan, the parallel scan fail
            elif node.op in PROBABILITY_OPS and node.inputs[-1] in values and not 0 <= values[node.inputs[-1]] <= 1:
                # A computed probability (`2 * p + 0.25`): dropout would fail at the first call, zoneout
                # above 1 would keep every old value, silently.
                refuse(node, node.op.name.lower(), f"has the probability {values[node.inputs[-1]]:g}, outside [0, 1]")

    def input_size_reading(self, features: int, hidden_size: int, image_below: Tuple[int, ...] = (),
                           **hyper: float) -> int:
        """The ``input_size`` with which this cell reads ``features`` numbers per example (what the
        layer below outputs, images of ``image_below`` where it outputs images): ``features`` for a
        vector input; for a spatial input ``x[input, height, width]``, the channels,
        ``features / (height*width)`` at these sizes, which must be the images' below."""
        if len(self.input_dims) == 1:
            return features
        try:
            sizes, _ = self.bind(1, hidden_size, **hyper)  # the sizes of the other dims; input_size set below
        except ValueError:  # a first dim other than `input`: build names what it must be
            return features
        dims = tuple(dim.evaluate(sizes) for dim in self.input_dims[1:])
        shape = ", ".join(f"{dim}={dim.evaluate(sizes)}" for dim in self.input_dims[1:])
        if image_below and image_below != dims:  # the same numbers read as other images: pixels scrambled
            raise ValueError(f"cell {self.name} reads images [{shape}], but the layer below outputs images of "
                             f"{' x '.join(map(str, image_below))}: give both layers the same image sizes")
        image = math.prod(dims)
        if features % image:
            raise ValueError(f"cell {self.name} reads images [{shape}] of {image} numbers per channel, "
                             f"which {features} numbers per example are not a whole number of")
        return features // image

    def _check_kernels(self, sizes: Dict[str, int]) -> None:
        """A convolution keeps height and width by padding half its kernel on each side: its kernel's
        sizes must be odd. The checker refuses an even number; a named size is known only here."""
        nodes = self.graph.node_map()
        for node in self.graph.nodes:
            if node.op is Op.CONV:
                kernel = nodes[node.inputs[0]].shape.dims
                values = [dim.evaluate(sizes) for dim in kernel]
                if any(value % 2 == 0 for value in values[2:]):
                    names = dict.fromkeys(name for dim in kernel[2:] for name in dim.variables)  # once each
                    named = ", ".join(f"{name}={sizes[name]}" for name in names)
                    raise ValueError(f"cell {self.name}: conv's kernel `{node.inputs[0]}` would have shape "
                                     f"{values}{f' with {named}' if named else ''}, but conv keeps height and "
                                     "width by padding half the kernel on each side: its sizes must be odd")

    def _computed_size(self, decl: st.SizeDecl, sizes: Dict[str, int]) -> int:
        """A size whose default is a formula of other sizes (``size key = hidden / heads``), exact."""
        def value(expr: st.SizeExpr) -> int:
            if isinstance(expr, st.SizeInt):
                return expr.value
            if isinstance(expr, st.SizeName):
                return sizes[expr.name]
            left, right = value(expr.left), value(expr.right)
            if expr.op == "/":
                if left % right:
                    raise ValueError(f"cell {self.name}: size {decl.name} defaults to {_formula(decl.formula)} "
                                     f"= {left} / {right}, which is not whole; pass {decl.name}= or sizes "
                                     "that divide")
                return left // right
            return {"+": left + right, "-": left - right, "*": left * right}[expr.op]
        result = value(decl.formula)
        if result < 1:
            raise ValueError(f"cell {self.name}: size {decl.name} defaults to {_formula(decl.formula)} = {result}; "
                             "sizes are positive")
        return result

    def parallel_plan(self, disable: Passes = (),
                      fixed_dropout_mask: bool = False) -> Tuple[Optional[str], str]:
        """``(source of forward_parallel, "")`` when the recurrence is linear in the state, else
        ``(None, why not)`` quoting the equation that is not (see rnndsl/codegen/parallel.py)."""
        return parallel_plan(self.graph, BuildOptions(disable, fixed_dropout_mask=fixed_dropout_mask), self.source)

    def fused_sources(self, disable: Passes = ()) -> Tuple[str, ...]:
        """The C++ of the kernels that run each state's coefficients and scan as one loop under
        ``rnndsl.linear_scan.use_cpu_kernel()`` (rnndsl/codegen/fused.py); none for a cell without
        a parallel scan, or with a tensor state."""
        return fused_sources(self.graph, BuildOptions(disable), self.source)

    def build(self, input_size: int, hidden_size: int, backend: str = "script", *,
              disable: Passes = (), fixed_dropout_mask: bool = False, scan: str = "auto",
              derived_backward: bool = True, **hyper: float) -> torch.nn.Module:
        """A cell module: ``cell(state, x) -> (new_state, output)``.

        The keywords before ``hyper`` are the build options (rnndsl.options.BuildOptions):
        ``disable`` switches passes off;
        ``fixed_dropout_mask=True``: in ``forward_sequence`` (so in ``rnndsl.scan``),
        each ``dropout`` of a value that depends on a state draws one mask per
        sequence instead of one per step.
        ``scan``: ``"parallel"`` runs ``forward_sequence`` as a parallel scan (only for
        cells linear in their state, else ValueError), ``"sequential"`` as a time loop,
        ``"auto"`` picks the parallel scan where it applies.
        ``derived_backward=False`` trains a scripted cell through autograd of its compiled
        loop instead of the backward derived from its equations.
        """
        if backend not in CELL_BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; cells build with {', '.join(CELL_BACKENDS)} "
                             "(networks also offer 'native' and 'auto')")
        options = BuildOptions(disable, fixed_dropout_mask, scan, derived_backward)
        sizes, hypers = self.bind(input_size, hidden_size, **hyper)
        given = {key: hypers[key] if key in hypers else sizes[key] for key in hyper}  # as Python numbers
        recipe = Recipe(self.source, self.path, self.name, sizes["input"], sizes["hidden"], backend, options,
                        tuple(sorted(given.items())), tuple(hypers))
        cls = self.cell_class(options, backend)
        cell = cls(self, sizes, hypers, cls.generated_source)
        cell._recipe = recipe  # what pickling needs to make the cell again
        cell._fixed_dropout_masks = options.fixed_dropout_mask and any(n.op is Op.DROPOUT for n in self.graph.nodes)
        if backend == "script":
            cell.kernel()  # compiled now, so that a cell TorchScript refuses fails at build
        return cell

    def cell_class(self, options: BuildOptions, backend: str = "eager") -> type:
        """The class of a cell built with ``options`` and ``backend`` (unpickling makes an instance of it)."""
        return cell_class(backend, *generated_class(self.graph, options, self.path, self.source))

    def __repr__(self) -> str:
        return f"CellSpec({self.name!r} from {self.path})"


def _formula(expr: st.SizeExpr) -> str:
    """A size formula as written: ``hidden / heads``."""
    if isinstance(expr, st.SizeInt):
        return str(expr.value)
    if isinstance(expr, st.SizeName):
        return expr.name
    return f"({_formula(expr.left)} {expr.op} {_formula(expr.right)})"


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
    that a folder ``lstm/`` beside a script cannot hide the stock ``lstm``; a
    directory with no stock cell's name is returned, to be refused as a directory.
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
    if path.is_dir() and text not in stock_cell_names():  # reported as a directory, not as no stock cell
        return path
    return _stock_file(text)


def _stock_file(name: str) -> Path:
    """The packaged file of stock cell ``name``; a CellError listing the stock cells when there is none."""
    if name not in stock_cell_names():
        raise CellError(f"no stock cell named {name!r}; stock cells are {', '.join(stock_cell_names())}",
                        None)
    return stock_cells_dir() / f"{name}.cell"


@cached(maxsize=1)
def _native_stock_graphs() -> Dict[str, Graph]:
    """For each of torch's fused modes, its stock cell's graph as the native matcher compares it."""
    return {mode: load_stock_cell(native.stock_cell).optimized(disable=MATCH_DISABLE)
            for mode, native in NATIVE_MODES.items()}


def load_source(source: Union[str, bytes], path: str = "<string>") -> Dict[str, CellSpec]:
    """Every cell of a ``.cell`` text (or its UTF-8 bytes, as a file holds them), by name."""
    if isinstance(source, (bytes, bytearray)):
        source = decode(bytes(source), path)
    elif not isinstance(source, str):
        raise TypeError(f"load_source takes the text of a .cell file, got {type(source).__name__}; "
                        "for a file, use rnndsl.load_cell(path)")
    try:
        file = check_file(parse(source, path))
        if not file.cells:
            raise CellError("the file holds no cell", Span(path, 1, 1, 1, 2),
                            hint="a cell starts with `cell name(x[input]) -> h {`")
        return {cell.name: CellSpec(cell, source, path) for cell in file.cells}
    except CellError as error:
        raise (error.with_source(source) if error.source is None else error) from None


@cached(maxsize=64)
def _load_file(path: str, data: bytes) -> Dict[str, CellSpec]:
    return load_source(decode(data, path), path)


def load_cells(name_or_path: Union[str, os.PathLike]) -> Dict[str, CellSpec]:
    """Every cell in a ``.cell`` file (or the stock file of that name), by name."""
    path = _resolve(name_or_path)
    _regular_file_status(path)
    # Cached on the content, not on the file's mtime and size: a rewrite of the same size within
    # the mtime's resolution (or with the mtime kept) must load the new equations.
    data = _read(path)
    with compile_lock:
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

