"""Whole networks from cells: rnnlib's ``makeRecurrent`` and ``nn.LSTM{...}``.

Two ways in, both built on :mod:`rnndsl.containers`:

- :func:`make_recurrent` / :func:`make_bidirectional` stack any cell (a stock
  name, a ``.cell`` path or a ``CellSpec``) into layers of any sizes, with
  rnnlib's defaults: weights uniform in ±0.1, the hidden state carried over
  from one call to the next.
- :class:`LSTM`, :class:`GRU`, :class:`RNN` are drop-in replacements for their
  ``torch.nn`` namesakes (they subclass them): same arguments, parameters,
  initialization, inputs and outputs, plus ``backend=``.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import dataclasses
import functools
import inspect
import os
import sys
from collections.abc import Iterable
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from .autograd_modes import autocast_enabled, plain_ops_needed
from .cellspec import CellSpec, load_cell, load_stock_cell, positive_size
from .containers import Bidirectional, RecurrentNetwork, RecurrentTable, SequenceTable, ZeroState, setup_recurrent
from .errors import PlacementError, did_you_mean
from .options import BuildOptions
from .native import NATIVE_MODES, PARAMETER_NAMES, NativeLayer, native_names, resolve_backend
from .pool import IdlePool
from .scan import check_not_empty
from .sequences import lengths_mask, refuse_packed_under_export, repack


def _load_spec(cell, cell_name: Optional[str] = None) -> CellSpec:
    """A CellSpec from a stock name, a path to a ``.cell`` file (``cell_name`` picking one of
    several cells in it), or a CellSpec."""
    if isinstance(cell, (str, os.PathLike)):
        return load_cell(os.fspath(cell), cell_name)
    if isinstance(cell, tuple) and len(cell) == 2 and isinstance(cell[1], str):  # (path, name of a cell in it)
        return load_cell(os.fspath(cell[0]), cell[1])
    if isinstance(cell, CellSpec):
        return cell
    name = getattr(cell, "cell_name", None)
    built = (f" (a built {name} cell: the network builds one cell per layer from a spec, so pass "
             f"rnndsl.load_cell({name!r}) or the cell's file)") if name is not None else ""
    raise TypeError(f"cell must be a stock cell name, a path to a .cell file or a CellSpec, "
                    f"got {type(cell).__name__}{built}")


def _check_keywords(spec: CellSpec, hyper: dict, function: Callable) -> None:
    """Refuse keywords that neither ``function`` nor the cell's ``build`` takes, naming both lists
    and the closest one: a misspelt ``dropout=`` would otherwise be blamed on the cell."""
    def keywords(signature_of: Callable) -> List[str]:
        parameters = inspect.signature(signature_of).parameters.values()
        return [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]

    network, build = keywords(function), keywords(CellSpec.build)
    cell = list(spec.hypers) + [name for name in spec.sizes if name not in ("input", "hidden")]
    unknown = [key for key in hyper if key not in network + build + cell]
    if not unknown:
        return
    hint = did_you_mean(unknown[0], network + build + cell)
    cell_takes = (f"its hyper-parameters and sizes are {', '.join(cell)}" if cell
                  else "it has no hyper-parameters or sizes")
    raise TypeError(f"{function.__name__}() got an unexpected keyword argument {unknown[0]!r}"
                    f"{'; ' + hint if hint else ''} ({function.__name__} takes {', '.join(network)}; "
                    f"the cell's build takes {', '.join(k for k in build if k not in network)}; "
                    f"cell {spec.name}: {cell_takes})")


def uniform_weights(module: nn.Module, bound: float = 0.1) -> None:
    """rnnlib's default weight init: every parameter uniform in ±``bound``, except those a cell
    declares with a value (``param g[hidden] = 1.0``: a layer norm's gain), which get it."""
    declared = {}
    for submodule in module.modules():
        inits = getattr(submodule, "_inits", {})  # a cell's declared values (rnndsl.cells.CellModule)
        for name, parameter in submodule.named_parameters(recurse=False):
            if inits.get(name) is not None:
                declared[parameter] = inits[name]
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter in declared:
                parameter.fill_(declared[parameter])
            else:
                parameter.uniform_(-bound, bound)


def _layer(spec, input_size: int, hidden_size: int, backend: str, hyper: dict,
           return_states: bool = False) -> nn.Module:
    if backend == "native":
        return NativeLayer(spec.build(input_size, hidden_size, backend="eager", **hyper),
                           spec.native_mode, native_names(spec))
    return RecurrentTable(spec.build(input_size, hidden_size, backend=backend, **hyper), return_states)


# Build options are the same for every layer; a tuple there (`disable=("hoist",)`) is one value.
_BUILD_OPTIONS = frozenset(field.name for field in dataclasses.fields(BuildOptions))


def _per_layer(hyper: dict, layers: int) -> List[dict]:
    """Each layer's keywords: a list or tuple of a hyper-parameter or size gives one value per
    layer, None keeping that layer's cell default."""
    split = {key for key, value in hyper.items() if isinstance(value, (list, tuple)) and key not in _BUILD_OPTIONS}
    for key in split:
        if len(hyper[key]) != layers:
            raise ValueError(f"{key} has {len(hyper[key])} values, but the network has {layers} layers "
                             "(a list gives one value per layer)")
    return [{key: (value[index] if key in split else value) for key, value in hyper.items()
             if key not in split or value[index] is not None} for index in range(layers)]


def _make(cell, input_size: int, hids: Sequence[int], *, bidirectional: bool,
          share_weights: bool, backend: str, dropout: float, batch_first: bool,
          save_hidden: bool, winitfun: Optional[Callable[[nn.Module], None]],
          hinitfun: Optional[Callable[[Tensor], None]], return_all_layers: bool,
          hyper: dict, function: Callable, cell_name: Optional[str] = None,
          return_all_states: bool = False) -> RecurrentNetwork:
    if isinstance(hids, (str, bytes)) or not isinstance(hids, Iterable):
        example = f"; for one layer of {hids}, write [{hids}]" if isinstance(hids, int) else ""
        raise TypeError(f"hids must be a list of hidden sizes, one per layer, got {hids!r}{example}")
    sizes = [positive_size(h) for h in hids]
    if not sizes or None in sizes:
        raise ValueError(f"hids must be a non-empty list of positive sizes, got {list(hids)}")
    hids = sizes
    if isinstance(cell, list):  # one cell per layer
        if len(cell) != len(hids):
            raise ValueError(f"{len(cell)} cells for {len(hids)} layers: give one cell per entry of hids")
        specs = [_load_spec(c, cell_name) for c in cell]
    else:
        specs = [_load_spec(cell, cell_name)] * len(hids)
    keywords = _per_layer(hyper, len(hids))
    for spec, layer_keywords in zip(specs, keywords):
        _check_keywords(spec, layer_keywords, function)
    # "auto" takes the script backend where every step's state is asked for: torch's kernels give the last.
    backends = [resolve_backend("script" if return_all_states and backend == "auto" else backend, spec)
                for spec in specs]
    if return_all_states and "native" in backends:
        raise ValueError("return_all_states needs the script or eager backend: torch's fused kernels "
                         "return the final state only")
    layers, size, image = [], input_size, ()
    for spec, hidden, layer_backend, layer_keywords in zip(specs, hids, backends, keywords):
        if layers:  # the layer below gives `size` numbers per example: a spatial cell reads them as channels
            sizes = {key: value for key, value in layer_keywords.items() if key not in _BUILD_OPTIONS}
            size = spec.input_size_reading(size, hidden, image, **sizes)
        layer = _layer(spec, size, hidden, layer_backend, layer_keywords, return_all_states)
        if bidirectional:
            reverse = None if share_weights else _layer(spec, size, hidden, layer_backend, layer_keywords)
            layer = Bidirectional(layer, reverse)
        layers.append(layer)
        size, image = layer.output_size, (layer.fwd if bidirectional else layer).cell.output_image
    table = SequenceTable(layers, dropout=dropout, return_all=return_all_layers)
    network = setup_recurrent(table, [ZeroState(layer.state_sizes, hinitfun) for layer in layers],
                              save_hidden, batch_first=batch_first)
    _initialize_weights(network, winitfun)
    # `spec` and `backend`: the network's one cell and backend, or the first layer's; `specs`: each layer's.
    network.spec, network.backend, network.specs = specs[0], backends[0], specs
    return network


def _initialize_weights(network: nn.Module, winitfun: Optional[Callable[[nn.Module], None]]) -> None:
    """rnnlib's ``winitfun(network)``; a torch.nn.init function, which takes a tensor, gets its
    mistake named rather than a bare AttributeError from inside it."""
    if winitfun is None:
        uniform_weights(network)
        return
    try:
        winitfun(network)
    except AttributeError as error:
        function = getattr(winitfun, "func", winitfun)  # functools.partial(torch.nn.init.uniform_, ...)
        if getattr(function, "__module__", None) != "torch.nn.init":
            raise
        name = getattr(function, "__name__", "it")
        raise ValueError(f"winitfun is called with the whole network, as rnnlib's is, and {name} takes one "
                         f"tensor; give lambda network: [torch.nn.init.{name}(p) for p in network.parameters() "
                         f"if p.dim() > 1]") from error


def make_recurrent(cell=None, input_size: Optional[int] = None, hids: Optional[Sequence[int]] = None, *,
                   cells: Optional[list] = None, cell_name: Optional[str] = None, backend: str = "script",
                   dropout: float = 0.0, batch_first: bool = False, save_hidden: bool = True,
                   winitfun: Optional[Callable[[nn.Module], None]] = None,
                   hinitfun: Optional[Callable[[Tensor], None]] = None,
                   return_all_layers: bool = False, return_all_states: bool = False, scan: str = "auto",
                   **hyper) -> RecurrentNetwork:
    """A stack of recurrent layers, one per entry of ``hids``: rnnlib's ``makeRecurrent``.

    ``cell`` is a stock name (``"lstm"``), a path to a ``.cell`` file, a ``(path, cell name)``
    pair or a ``CellSpec``; ``cells=[...]`` (or a list as ``cell``) gives one per layer, so
    the cell may change over depth. ``cell_name`` picks the cell of a file that holds
    several. ``hyper`` goes to ``CellSpec.build``: a list value gives one per layer (None
    keeping that layer's default), as ``make_recurrent(cells=["janet", "lstm"], ...,
    beta=[2.0, None])``. With ``return_all_states`` the output is ``(outputs, states)``,
    ``states`` holding every layer's state after every step, each tensor ``(T, batch, size)``
    (zero at padded steps, as the outputs; a Python loop over steps computes them). The result's
    ``forward(x, state=None, lengths=None)`` returns the top layer's outputs
    (every layer's, as a tuple, with ``return_all_layers``) and every layer's
    final state; see :class:`~rnndsl.containers.RecurrentNetwork` for the
    saved hidden state. ``winitfun(network)`` initializes the weights (default:
    uniform in ±0.1, as rnnlib); ``hinitfun(tensor)`` fills each fresh state
    tensor in place (default: zeros). ``backend`` is ``"script"``, ``"eager"``,
    ``"native"`` (torch's fused kernels) or ``"auto"``. ``scan`` is ``"auto"``
    (a parallel scan over time where the cell's recurrence is linear in its
    state, as minGRU's), ``"parallel"`` (ValueError naming the equation when it
    is not) or ``"sequential"``. The result also carries ``spec`` and the
    ``backend`` chosen.
    """
    if (cell is None) == (cells is None):
        raise TypeError("make_recurrent takes a cell, or cells=[...] with one per layer (not both)")
    if input_size is None or hids is None:
        raise TypeError("make_recurrent needs input_size and hids")
    return _make(cell if cells is None else list(cells), input_size, hids, bidirectional=False,
                 share_weights=False, backend=backend, dropout=dropout, batch_first=batch_first,
                 save_hidden=save_hidden, winitfun=winitfun, hinitfun=hinitfun,
                 return_all_layers=return_all_layers, hyper=dict(hyper, scan=scan), function=make_recurrent,
                 cell_name=cell_name, return_all_states=return_all_states)


def make_bidirectional(cell, input_size: int, hids: Sequence[int], *, share_weights: bool = False,
                       backend: str = "script", dropout: float = 0.0, batch_first: bool = False,
                       save_hidden: bool = False,
                       winitfun: Optional[Callable[[nn.Module], None]] = None,
                       hinitfun: Optional[Callable[[Tensor], None]] = None,
                       return_all_layers: bool = False, scan: str = "auto", **hyper) -> RecurrentNetwork:
    """Like :func:`make_recurrent`, each layer reading forwards and backwards:
    rnnlib's ``makeBidirectional``.

    A layer's output is its two directions' outputs concatenated; its state is
    ``(forward_state, reverse_state)``. With ``lengths`` the reverse direction
    reads each sequence backwards from its own last step. ``share_weights``
    runs both directions with the same cell (rnnlib's ``sharefields``).
    ``save_hidden`` defaults to False, as in rnnlib: carrying the reverse
    direction's state over to the next batch rarely makes sense.
    """
    return _make(cell, input_size, hids, bidirectional=True, share_weights=share_weights,
                 backend=backend, dropout=dropout, batch_first=batch_first,
                 save_hidden=save_hidden, winitfun=winitfun, hinitfun=hinitfun,
                 return_all_layers=return_all_layers, hyper=dict(hyper, scan=scan),
                 function=make_bidirectional)


# The drop-ins load their mode's stock cell (rnndsl.native.NATIVE_MODES) with load_stock_cell: they
# promise torch's numbers, so a file named `gru` in the working directory must not stand in for it.
# torch.nn.LSTM(proj_size=...)'s cell: h is projected by weight_hr to proj_size units.
_PROJECTED_LSTM = "lstm_proj"


def _let_dynamo_trace_drop_ins() -> None:
    """Set ``torch._dynamo.config.allow_rnn``, now if dynamo is loaded, else as soon as it loads.

    Dynamo refuses every module that is an nn.LSTM/GRU/RNN unless the flag is set, and the
    drop-ins are (users' isinstance checks must hold). The flag is global: dynamo then traces
    torch's own nn.LSTM in this process too (correctly, but unrolled; see the README). Loading
    dynamo just to set it would cost about 2 s, so a one-shot import hook sets it when
    torch.compile first loads dynamo.
    """
    config = sys.modules.get("torch._dynamo.config")
    if config is not None:
        config.allow_rnn = True
    elif not any(isinstance(finder, _SetFlagWhenDynamoLoads) for finder in sys.meta_path):
        sys.meta_path.insert(0, _SetFlagWhenDynamoLoads())


class _SetFlagWhenDynamoLoads(importlib.abc.MetaPathFinder):
    """An import hook that runs once: after ``torch._dynamo.config`` executes, sets ``allow_rnn``."""

    def find_spec(self, name, path, target=None):
        if name != "torch._dynamo.config":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module) -> None:
            execute(module)
            module.allow_rnn = True

        spec.loader.exec_module = exec_module
        return spec


def _slots(engine: SequenceTable, bindings: Iterable[str]) -> List[Tuple[Dict[str, Tensor], str]]:
    """Where each cell parameter of ``engine`` lives: its module's ``_parameters`` and its name there."""
    return [(engine.get_submodule(inner.rpartition(".")[0])._parameters, inner.rpartition(".")[2])
            for inner in bindings]


class _CompiledRNNBase:
    """Runs a ``torch.nn.RNNBase`` subclass's layers with rnndsl's stock cells.

    The module keeps torch's parameters (names, shapes, init, ``state_dict``);
    the cells it builds for each layer and direction are kept out of the module
    tree and are pointed at those parameters before every call (through
    ``torch.func.functional_call`` where a compiler or torch.func is tracing), so
    ``.to()``, ``load_state_dict``, parametrizations and ``functional_call`` on
    the module itself all reach them. ``bias=False`` runs the cells with zero biases;
    ``proj_size > 0`` runs the stock ``lstm_proj`` cell, ``weight_hr`` included.

    Under ``torch.autocast`` the cells carry the state in the parameters' dtype, as every rnndsl
    network does; on CPU the results come back in the dtypes torch.nn's own forward gives them
    (:meth:`_autocast_dtypes`).

    Under ``torch.jit.trace`` (so ``torch.onnx.export(..., dynamo=False)``) the
    module runs torch's fused kernel on the same parameters, whatever the
    backend: it computes the same function, a trace cannot hold
    ``functional_call``, and the trace then holds one LSTM/GRU/RNN op valid for
    any sequence length (ONNX's own), not a loop unrolled at the traced one.
    """

    def __init__(self, *args, backend: str = "script", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.backend = backend

    @property
    def backend(self) -> str:
        """``"script"``, ``"eager"`` or ``"native"``; assigning another (or ``"auto"``) rebuilds the cells."""
        return self.__dict__["_backend"]

    @backend.setter
    def backend(self, backend: str) -> None:
        # torch's fused kernels take projections too: the native backend runs any proj_size.
        self.__dict__["_backend"] = resolve_backend(backend, load_stock_cell(NATIVE_MODES[self.mode].stock_cell))
        self._build_engine()
        if self.backend != "native":
            _let_dynamo_trace_drop_ins()

    def _build_engine(self) -> None:
        """Build the cells and how their parameters map onto this module's. The native backend's
        are eager cells that only torch.export runs: torch's fused kernel would fix the program at
        the example's length, and cannot take lengths there."""
        engine, bindings = self._new_engine()
        self.__dict__["_engine"] = engine
        self.__dict__["_bindings"] = bindings
        # Eager calls run on engines taken from here, with the slots they fill: see _run_engine.
        self.__dict__["_engines"] = IdlePool([(engine, _slots(engine, bindings))])

    def _new_engine(self) -> Tuple[SequenceTable, Dict[str, str]]:
        """A fresh engine: the layers of cells, and each cell parameter's name in this module."""
        backend = "eager" if self.backend == "native" else self.backend
        spec = load_stock_cell(_PROJECTED_LSTM if self.proj_size else NATIVE_MODES[self.mode].stock_cell)
        sizes = {"proj": self.proj_size} if self.proj_size else {}
        names = PARAMETER_NAMES + (("weight_hr",) if self.proj_size else ())
        directions = 2 if self.bidirectional else 1
        layers, bindings = [], {}
        # Building initializes the cells' own parameters, replaced by this module's: leave the
        # global random stream where torch.nn's constructor leaves it, so that swapping the class
        # into a seeded model does not change the init of its other layers.
        with torch.random.fork_rng(devices=[]):
            for depth in range(self.num_layers):
                size = self.input_size if depth == 0 else (self.proj_size or self.hidden_size) * directions
                tables = []
                for direction in range(directions):
                    cell = spec.build(size, self.hidden_size, backend=backend, **sizes)
                    prefix = f"layers.{depth}." + ("" if directions == 1 else ("fwd.", "rev.")[direction])
                    suffix = f"_l{depth}" + ("_reverse" if direction else "")
                    for name in names:
                        bindings[f"{prefix}cell.{name}"] = name + suffix
                        if hasattr(self, name + suffix):
                            # Share storage now so the cells' own copies are freed;
                            # functional_call rebinds on every call regardless.
                            setattr(cell, name, getattr(self, name + suffix))
                    tables.append(RecurrentTable(cell))
                layers.append(tables[0] if directions == 1 else Bidirectional(*tables))
        return SequenceTable(layers, dropout=self.dropout), bindings

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_engine", None)  # TorchScript modules cannot be pickled; rebuilt on load
        state.pop("_bindings", None)
        state.pop("_engines", None)
        return state

    def __setstate__(self, state) -> None:
        if "backend" in state:  # pickled before `backend` was a property
            state["_backend"] = state.pop("backend")
        super().__setstate__(state)
        self._build_engine()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script`` compiles in this module's place (TorchScript cannot compile its
        Python ``forward``): torch.nn's own class on the same parameters, shared, not copied, which
        runs torch's fused kernel, as ``torch.jit.trace`` records it. (TorchScript also puts the
        module returned here into the model being scripted, in this one's place.)"""
        torch_class = next(c for c in type(self).__mro__ if c.__module__ == nn.RNNBase.__module__)
        computed = [name for name in self._flat_weights_names if name not in self._parameters]
        if computed:  # a parametrization, weight_norm's hook or a prune computes it
            raise RuntimeError(f"torch.jit.script cannot compile {torch_class.__name__} with a parametrized "
                               f"weight ({', '.join(computed)}), nor torch.nn's (whose error names its forward's "
                               f"hx); torch.compile takes it")
        options = {"nonlinearity": self.nonlinearity} if isinstance(self, nn.RNN) else {}
        if self.proj_size:
            options["proj_size"] = self.proj_size
        plain = torch_class(self.input_size, self.hidden_size, num_layers=self.num_layers, bias=self.bias,
                            batch_first=self.batch_first, dropout=self.dropout, bidirectional=self.bidirectional,
                            device="meta", **options)
        for name in self._flat_weights_names:
            setattr(plain, name, getattr(self, name))
        # The hooks too, the same dicts: TorchScript puts `plain` into the model in this one's place.
        plain.__dict__.update({key: value for key, value in self.__dict__.items() if "hook" in key})
        return plain.train(self.training)

    def _parameters_for_engine(self) -> Dict[str, Tensor]:
        """The tensors the engine's cells compute with, read once for the call (the first is
        ``weight_ih_l0``'s)."""
        if parametrize.is_parametrized(self):
            # torch.nn's forward evaluates a parametrized weight twice (its check for changed
            # weights, then its list of them): so here, so that a parametrization with a state
            # (spectral_norm's power iteration, in training) steps as often as under torch.nn.
            self._update_flat_weights()
            read = dict(zip(self._flat_weights_names, self._flat_weights)).__getitem__
        else:
            read = functools.partial(getattr, self)
        if self.bias:
            return {inner: read(outer) for inner, outer in self._bindings.items()}
        weights = {inner: read(outer) for inner, outer in self._bindings.items() if "weight" in outer}
        zeros = next(iter(weights.values())).new_zeros(NATIVE_MODES[self.mode].gates * self.hidden_size)
        return {inner: weights.get(inner, zeros) for inner in self._bindings}

    def forward(self, input, hx=None):
        if torch.jit.is_tracing():
            return super().forward(input, hx)
        lstm = self.mode == "LSTM"
        refuse_packed_under_export(input, type(self).__name__)
        packed = isinstance(input, PackedSequence)
        if not packed:
            if input.dim() not in (2, 3):
                # torch.nn.RNN's words differ from LSTM's and GRU's by one; each drop-in says its own.
                noun = " tensor" if self.mode.startswith("RNN") else ""
                raise ValueError(f"{type(self).__name__}: Expected input to be 2D or 3D, "
                                 f"got {input.dim()}D{noun} instead")
            # Checked before choosing the kernel, so every backend raises the same error.
            check_not_empty(input, type(self).__name__, 1 if self.batch_first and input.dim() == 3 else 0)
        if packed:
            checked, batch_sizes, batched = input.data, input.batch_sizes, True
        else:
            batched = input.dim() == 3
            checked = input if batched else input.unsqueeze(0 if self.batch_first else 1)
            batch_sizes = None
        # Checked before choosing the kernel too: torch's own errors for these are less clear.
        self.check_input(checked, batch_sizes)
        parameter = self._flat_weights[0]  # what check_input reads the dtype from
        if checked.device != parameter.device:  # torch's kernels' words, before a cell names its own weight
            raise PlacementError(f"Input and parameter tensors are not at the same device, found input tensor at "
                                 f"{checked.device} and parameter tensor at {parameter.device}")
        given_hx = hx if hx is None else self._checked_hx(hx, checked, batch_sizes, batched)
        if self.backend == "native" and not torch.compiler.is_exporting():
            return super().forward(input, hx)
        rows = None
        if packed:
            xs, lengths = pad_packed_sequence(input)
            if self.dropout and self.training and self.num_layers > 1 and not torch.compiler.is_compiling():
                # (Compiled, over the padded tensor: the rows' count is data, which dynamo would
                # have to trace; compiled draws need not be eager's anyway, as under Inductor.)
                # Each packed row's place in the padded (T, batch) grid, flattened: the grid's
                # positions, packed as the input is.
                positions = torch.arange(xs.size(0) * xs.size(1), device=xs.device).view(xs.shape[:2])
                rows = repack(positions, lengths, input).data
        else:
            xs, lengths = (checked.transpose(0, 1) if self.batch_first else checked), None
        hx = given_hx if given_hx is not None else self._zero_hx(xs)
        # Under autocast the layers carry the state in the parameters' dtype, whatever the input's
        # (torch.nn skips its dtype check under autocast: a bfloat16 model takes a float32 input).
        parameters = self._parameters_for_engine()
        carried = next(iter(parameters.values())).dtype  # weight_ih_l0's
        if autocast_enabled(xs.device.type) and xs.is_floating_point():
            xs, hx = xs.to(carried), tuple(h.to(carried) for h in hx)
        returned = self._autocast_dtypes(checked, packed, carried)
        state = self._layer_states(hx)
        mask = None if lengths is None else lengths_mask(lengths, xs.size(0), xs.size(1), xs.device)
        args = (state, xs) if mask is None else (state, xs, mask)
        finals, outputs = self._run_engine(args, parameters, rows)
        directions = [d for layer in finals for d in (layer if self.bidirectional else (layer,))]
        hidden = tuple(torch.stack([d[k] for d in directions]) for k in range(2 if lstm else 1))
        if returned is not None:
            outputs = outputs.to(returned[0])
            hidden = tuple(h.to(dtype) for h, dtype in zip(hidden, returned[1:]))
        if packed:
            outputs = repack(outputs, lengths, input)
        else:
            if self.batch_first:
                outputs = outputs.transpose(0, 1)
            if not batched:
                outputs = outputs.squeeze(0 if self.batch_first else 1)
                hidden = tuple(h.squeeze(1) for h in hidden)
        return outputs, (hidden if lstm else hidden[0])

    def _run_engine(self, args: tuple, parameters: Dict[str, Tensor], dropout_rows: Optional[Tensor] = None):
        """The engine's cells on ``parameters`` (:meth:`_parameters_for_engine`), their dropout drawn
        over ``dropout_rows`` where given (:attr:`SequenceTable.dropout_rows`)."""
        if torch.compiler.is_compiling() or plain_ops_needed():
            self._set_modes(self._engine, dropout_rows)
            return torch.func.functional_call(self._engine, parameters, args)
        # Eagerly, point each cell's slot at the tensor: what functional_call does, without its
        # walk over the module tree (a third of a generation step's time) or the swap back. The
        # slots are the engine's own state, so a call takes an engine no other call is running:
        # DataParallel's replicas (threads, each with its device's weights) would otherwise run
        # one another's weights.
        engine, slots = self._engines.take(self._fresh_engine)
        try:
            self._set_modes(engine, dropout_rows)
            for (slot, name), tensor in zip(slots, parameters.values()):
                slot[name] = tensor
            return engine(*args)
        finally:
            self._engines.give_back((engine, slots))

    def _fresh_engine(self) -> Tuple[SequenceTable, List[Tuple[Dict[str, Tensor], str]]]:
        engine, bindings = self._new_engine()
        return engine, _slots(engine, bindings)

    def _set_modes(self, engine: SequenceTable, dropout_rows: Optional[Tensor]) -> None:
        if engine.training != self.training:
            engine.train(self.training)
        engine.dropout = self.dropout  # as torch, which reads it at each call
        engine.dropout_rows = dropout_rows

    def _autocast_dtypes(self, xs: Tensor, packed: bool, weights: torch.dtype) -> Optional[Tuple[torch.dtype, ...]]:
        """The dtypes of (output, h[, c]) that torch.nn's own forward returns under CPU autocast,
        for float32 parameters (``weights``, their dtype) and an input ``xs`` in float32 or in
        autocast's dtype (torch 2.13, checked against torch by tests/test_mixed_precision.py); None
        outside CPU autocast or where it leaves the parameters alone (not float32). On other
        devices the drop-ins return what every rnndsl network returns, the parameters' dtype:
        torch's choices there (cuDNN) are not mirrored.

        torch.nn runs everything in autocast's dtype when it runs oneDNN's fused LSTM layer, which
        autocast lowers whole (a padded batch, no projections, oneDNN enabled), or when the input
        comes in that dtype (its zero state takes the input's dtype). Otherwise it composes each
        step from products autocast lowers and elementwise ops that keep float32 where the
        float32 state enters: an LSTM's c and h (with a projection: c only) and a GRU's h stay
        float32, an RNN's h = tanh(W x + b + W h + b) does not.
        """
        if xs.device.type != "cpu" or not torch.is_autocast_enabled("cpu") or \
                weights != torch.float32:
            return None
        low, full = torch.get_autocast_dtype("cpu"), torch.float32
        lstm = self.mode == "LSTM"
        onednn = (lstm and not self.proj_size and not packed
                  and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)
        if xs.dtype == low or onednn:
            return (low,) * (3 if lstm else 2)
        if lstm:
            return (low, low, full) if self.proj_size else (full, full, full)
        return (full, full) if self.mode == "GRU" else (low, low)

    def _zero_hx(self, xs: Tensor) -> Tuple[Tensor, ...]:
        """torch's zero initial state for a (steps, batch, features) ``xs``; a tuple."""
        h_0 = xs.new_zeros(self.num_layers * (2 if self.bidirectional else 1), xs.size(1),
                           self.proj_size or self.hidden_size)
        return (h_0, xs.new_zeros(h_0.shape[:2] + (self.hidden_size,))) if self.mode == "LSTM" else (h_0,)

    def _checked_hx(self, hx, checked: Tensor, batch_sizes, batched: bool) -> Tuple[Tensor, ...]:
        """The user's ``hx`` checked against the (batched) input ``checked`` and made 3-D; a tuple."""
        lstm = self.mode == "LSTM"
        if not lstm and not isinstance(hx, Tensor):  # as torch's, whose kernel alone would take no tuple
            raise ValueError(f"{type(self).__name__}: hx must be a tensor, got {type(hx).__name__}")
        hx = (hx,) if isinstance(hx, Tensor) else tuple(hx)
        if len(hx) != (2 if lstm else 1) or not all(isinstance(h, Tensor) for h in hx):
            raise ValueError(f"{type(self).__name__}: hx must be "
                             + ("a tuple (h_0, c_0) of tensors" if lstm else "a tensor"))
        dims = 3 if batched else 2
        if any(h.dim() != dims for h in hx):  # torch's words
            got = f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors" if lstm else f"{hx[0].dim()}-D tensor"
            raise RuntimeError(f"For {'batched 3-D' if batched else 'unbatched 2-D'} input, "
                               f"{'hx and cx' if lstm else 'hx'} should also be {dims}-D but got {got}")
        if not batched:
            hx = tuple(h.unsqueeze(1) for h in hx)
        self.check_forward_args(checked, hx if lstm else hx[0], batch_sizes)
        for name, h in zip(("h_0", "c_0"), hx):
            if h.dtype != checked.dtype or h.device != checked.device:
                raise PlacementError(f"{type(self).__name__}: {name} is {h.dtype} on {h.device} "
                                     f"but the input is {checked.dtype} on {checked.device}")
        return hx

    def _layer_states(self, hx: Tuple[Tensor, ...]):
        """torch's stacked (layers * directions, batch, hidden) states, per layer."""
        directions = 2 if self.bidirectional else 1
        layers = []
        for depth in range(self.num_layers):
            per_direction = [tuple(h[depth * directions + d] for h in hx) for d in range(directions)]
            layers.append(per_direction[0] if directions == 1 else tuple(per_direction))
        return tuple(layers)


class LSTM(_CompiledRNNBase, nn.LSTM):
    """``torch.nn.LSTM`` run by rnndsl's stock ``lstm`` cell; takes ``backend=``."""


class GRU(_CompiledRNNBase, nn.GRU):
    """``torch.nn.GRU`` run by rnndsl's stock ``gru`` cell; takes ``backend=``."""


class RNN(_CompiledRNNBase, nn.RNN):
    """``torch.nn.RNN`` run by rnndsl's stock ``rnn_tanh``/``rnn_relu`` cell; takes ``backend=``."""
