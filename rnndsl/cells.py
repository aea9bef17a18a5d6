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
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import derived
from .codegen import supports_training
from .errors import CellWarning
from .options import BuildOptions
from .scan import check_mask, check_not_empty

if TYPE_CHECKING:
    from .cellspec import CellSpec


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


def _empty_eager_cell(recipe: Recipe) -> "EagerCell":
    """Unpickling an eager cell: its class, made again from the source, without ``__init__``;
    pickle then restores its ``__dict__`` (parameters, buffers, hooks, flags, as they were)."""
    eager = _unpickled_spec(recipe).eager_class(recipe.options)
    return eager.__new__(eager)


def _rebuilt_scripted_cell(recipe: Recipe, parameters: Dict[str, Tensor], training: bool) -> "ScriptedCell":
    """Unpickling a scripted cell: compiled again from its source, then given the saved Parameter
    objects themselves (values, dtype, device, requires_grad, and identity where they are shared)."""
    spec = _unpickled_spec(recipe)
    with torch.random.fork_rng(devices=[]):  # building initializes parameters: leave the RNG as it was
        cell = spec.build(recipe.input_size, recipe.hidden_size, recipe.backend,
                          **dataclasses.asdict(recipe.options), **dict(recipe.keywords))
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
        if torch.compiler.is_exporting():  # one scan node: the program runs at any length
            return self.forward_sequence_scan(xs, state, mask)
        # The parallel scan's autograd Functions have no vmap rule: torch.func runs the loop.
        if self.scan_mode == "parallel" and not torch._C._are_functorch_transforms_active():
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
        if torch.compiler.is_exporting():  # one scan node: the program runs at any length
            return self._python_methods.forward_sequence_scan(derived.bound_view(self), xs, state, mask)
        if torch._C._are_functorch_transforms_active():
            # torch.func's transforms follow plain Python, not TorchScript nor a Function without
            # a vmap rule (the derived backward's, the parallel scan's): run the loop as Python.
            return derived.eager_forward_sequence(self, xs, state, mask)
        if self.scan_mode == "parallel":
            return self.forward_parallel(xs, state, mask)
        if torch.compiler.is_compiling():
            return self._python_methods.forward_sequence(self, xs, state, mask)
        if torch.is_autocast_enabled(xs.device.type):
            # Autocast's casts are autograd's to undo; the derived backward, run outside autocast
            # on what the forward saved in mixed dtypes, does not know them.
            return derived.eager_forward_sequence(self, xs, state, mask)
        if derived.uses_derived_backward(self, xs, state):
            return derived.derived_forward_sequence(self, xs, state, mask)
        return self.scripted_method("forward_sequence")(xs, state, mask)

    @property
    def code(self) -> str:
        return self.source
