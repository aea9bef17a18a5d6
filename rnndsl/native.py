"""Torch's fused recurrent kernels as a backend: rnnlib's ``makeCudnnRecurrent``.

A cell whose IR the compiler recognizes as one of torch's fused computations
(``spec.native_mode``: LSTM, GRU, RNN_TANH, RNN_RELU) can run through the kernel
behind ``torch.nn.LSTM/GRU/RNN`` (cuDNN on GPU, the native CPU kernel
otherwise). The cell keeps owning its parameters under its own names (the
recognizer says which plays torch's ``weight_ih``, ``weight_hh``, ``bias_ih``,
``bias_hh``), so a network's ``state_dict`` is the same whichever backend runs
it; :func:`native_state_dict` and :func:`load_native_state_dict` convert a whole
network's weights to and from ``torch.nn.LSTM``'s names (``weight_ih_l0``, ...).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .cells import check_call
from .containers import Bidirectional, RecurrentTable, cell_sizes, out_of_autocast
from .options import CELL_BACKENDS
from .scan import check_not_empty, has_step_hooks, scan
from .sequences import first_gap

# What networks build with: a cell backend, torch's fused kernels, or the kernels where they apply.
NETWORK_BACKENDS = CELL_BACKENDS + ("native", "auto")
PARAMETER_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


@dataclass(frozen=True)
class NativeMode:
    """One of torch's fused recurrent computations (``torch.nn.RNNBase.mode``)."""

    stock_cell: str  # the packaged cell that computes it: cells match it to run natively
    gates: int  # gate blocks per hidden unit in torch's weights and biases
    kernel: Callable[..., Tuple[Tensor, ...]]  # a whole sequence: torch.lstm, ...
    step: Callable[..., object]  # one step, what torch.nn.LSTMCell runs: torch.lstm_cell, ...
    # Where a cell's no-grad CPU sequence takes `kernel` rather than its generated loop
    # (rnndsl/cells.py, _fused_sequence_of): None, always; (numbers, batch), only with a recurrent
    # weight of at most that many numbers or a batch of at least that many sequences.
    # torch.lstm is oneDNN's kernel, which reorders the weights at every call. Over 20 steps, at
    # batch 1 and one thread, it took 0.36-0.52x the loop's time up to hidden 200 on AMD EPYCs with
    # and without AVX-512 (2026-12-05/06), at 256 0.54x with AVX-512 and 1.03x without, and 1.3-2.2x
    # at 362-650 (erratic between: 1.5x at 288, 0.6x at 320, with AVX-512); at batch 2 and 4 up to
    # 1.9x (hidden 362-1024, one thread); from batch 8, 0.51-0.94x at every size measured (hidden
    # 362 to 1024, 1 and 2 threads, with AVX-512; 0.80-0.86x at batch 20 without). torch.gru and
    # torch.rnn_* run ATen's own loop, which has no reorder to pay: 0.62-0.99x the generated loop's
    # time at every size measured, hidden 128 to 650 without AVX-512 and to 1024 with it.
    # On an Intel Xeon (2026-12-06, `python -m bench.bench_fused_sequence`, one thread): LSTM 0.44-0.80x
    # up to hidden 256 at any batch but one (1.03x at 256, batch 4), 0.59-0.89x from batch 8 at every
    # size, 1.0-1.8x at batch 1 from hidden 512; with 2 threads 0.56-0.96x from batch 8 and erratic
    # below it (0.71-2.4x at hidden 362-1024); GRU 0.67-0.98x, RNN 0.90-1.01x. There the loop kept
    # three cases the kernel won by more than 5% (hidden 362 batch 1, 0.95x; 512 and 650 at batch 4,
    # 0.87x and 0.91x); the bounds stay, because with AVX-512 the AMD EPYC's kernel took up to 1.9x
    # the loop's time at batch 2-4.
    sequence_kernel_bounds: Optional[Tuple[int, int]] = None


# The one table of native modes: the recognizer (through CellSpec.native_mode), the native
# backend and the torch.nn drop-ins (rnndsl/networks.py) all read it.
NATIVE_MODES: Dict[str, NativeMode] = {
    "LSTM": NativeMode("lstm", 4, torch.lstm, torch.lstm_cell, sequence_kernel_bounds=(2 ** 18, 8)),
    "GRU": NativeMode("gru", 3, torch.gru, torch.gru_cell),
    "RNN_TANH": NativeMode("rnn_tanh", 1, torch.rnn_tanh, torch.rnn_tanh_cell),
    "RNN_RELU": NativeMode("rnn_relu", 1, torch.rnn_relu, torch.rnn_relu_cell),
}


def resolve_backend(backend: str, spec) -> str:
    """The backend that will run ``spec``'s cells: ``"auto"`` becomes
    ``"native"`` where the cell allows it and ``"script"`` elsewhere."""
    if backend not in NETWORK_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(map(repr, NETWORK_BACKENDS))}")
    if backend == "auto":
        return "script" if spec.native_mode is None else "native"
    if backend == "native" and spec.native_mode is None:
        raise ValueError(f"backend='native' is not available for cell {spec.name!r}: "
                         f"{spec.why_not_native}")
    return backend


def native_names(spec) -> Dict[str, str]:
    """Which of ``spec``'s parameters plays each of torch's (``weight_ih`` -> the
    cell's name for it), as the compiler's recognizer paired them."""
    if spec.native_mode is None:
        raise ValueError(f"cell {spec.name!r} has no torch counterpart: {spec.why_not_native}")
    return {torch_name: name for name, torch_name in spec.native_param_names.items()}


def run_native(mode: str, xs: Tensor, state: Tuple[Tensor, ...], weights: List[Tensor],
               mask: Optional[Tensor] = None) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    """Run one unidirectional layer with torch's fused kernel.

    Same contract as :func:`rnndsl.scan.scan`, except that ``mask`` must be True
    on a prefix of each sequence (as ``lengths`` give): the sequences are then
    packed, so each final state is taken at its sequence's last step.
    """
    check_not_empty(xs, "run_native")
    kernel = NATIVE_MODES[mode].kernel
    hx = [s.unsqueeze(0) for s in state] if mode == "LSTM" else state[0].unsqueeze(0)
    # The kernel's `train` flag: cuDNN keeps what its backward needs only in training mode (and
    # refuses the backward otherwise); dropout is 0 here, so the flag changes no number. A trace
    # holds it as a constant: True, which any later call can run with (and torch.jit.trace's check,
    # which reruns the call without autograd, then finds the same graph).
    train = torch.jit.is_tracing() or torch.is_grad_enabled()
    if mask is None:
        outputs, *final = kernel(xs, hx, weights, True, 1, 0.0, train, False, False)
        return outputs, tuple(f.squeeze(0) for f in final)
    packed = pack_padded_sequence(xs, mask.sum(0).cpu(), enforce_sorted=False)
    sort = packed.sorted_indices
    hx = [h.index_select(1, sort) for h in hx] if mode == "LSTM" else hx.index_select(1, sort)
    data, *final = kernel(packed.data, packed.batch_sizes, hx, weights, True, 1, 0.0, train, False)
    outputs, _ = pad_packed_sequence(
        PackedSequence(data, packed.batch_sizes, sort, packed.unsorted_indices),
        total_length=xs.size(0))
    return outputs, tuple(f.squeeze(0).index_select(0, packed.unsorted_indices) for f in final)


class NativeLayer(RecurrentTable):
    """Runs a cell over time with torch's fused kernel instead of its own code.

    Same convention as :class:`rnndsl.containers.RecurrentTable`; the cell
    (built with the eager backend) only holds the parameters, ``names`` says
    which is which (see :func:`native_names`).
    """

    # Under torch.jit.trace the layer records torch's kernel, not its (eager) cell's loop:
    # rnndsl.torchscript leaves it as it is.
    traces_torchs_kernel = True

    def __init__(self, cell: nn.Module, mode: str, names: Mapping[str, str]) -> None:
        super().__init__(cell)
        if sorted(names) != sorted(PARAMETER_NAMES):
            raise ValueError(f"names must map each of {PARAMETER_NAMES} to a cell parameter, "
                             f"got {dict(names)}")
        self.mode = mode
        self.names = dict(names)

    def extra_repr(self) -> str:
        return f"{self.mode}, {cell_sizes(self.cell)}"

    def forward(self, state: Tuple[Tensor, ...], xs: Tensor,
                mask: Optional[Tensor] = None) -> Tuple[Tuple[Tensor, ...], Tensor]:
        # The fused kernels' own errors (a dtype mismatch inside a GEMM) name neither the cell nor the
        # argument: check as the compiled cells do.
        check_call(self.cell, tuple(state), xs, sequence=True, mask=mask)
        # A weight prune's hook computes at every call: step the cell. torch's kernels take a mask
        # only as lengths of at least one step (packed); a mask RecurrentTable allows beyond that
        # (padding before a real step, which keeps the state; a sequence of no step) runs the
        # cell's own loop too.
        # torch.export: the cell's generated code, one loop node valid at any length (torch's kernel
        # would fix the program at the example's length, and packs lengths as data).
        # Under torch.compile a mask's values are unknown while tracing: any mask takes the loop.
        if has_step_hooks(self.cell) or torch.compiler.is_exporting() or \
                (mask is not None and (torch.compiler.is_compiling() or first_gap(mask) is not None
                                       or not bool(mask[0].all()))):
            outputs, final = scan(self.cell, xs, tuple(state), mask)
            return final, outputs
        weights = [getattr(self.cell, self.names[name]) for name in PARAMETER_NAMES]
        outputs, final = run_native(self.mode, xs, tuple(state), weights, mask)
        # Under autocast torch's kernel answers in the low-precision dtype: the layer carries its
        # parameters' dtype, as the compiled cells do (the layer above checks its input against it).
        return tuple(out_of_autocast(f, xs.dtype) for f in final), out_of_autocast(outputs, xs.dtype)


def _layer_cells(network: nn.Module) -> List[List[nn.Module]]:
    """The cells of a made network, per layer and direction."""
    cells = []
    for layer in network.network.layers:
        directions = [layer.fwd, layer.reverse_layer] if isinstance(layer, Bidirectional) else [layer]
        cells.append([direction.cell for direction in directions])
    return cells


def _names_per_layer(network: nn.Module) -> List[Dict[str, str]]:
    """:func:`native_names` of each layer's cell; a ValueError unless every layer is torch's one
    kind of layer (a torch.nn module holds one: a peephole or a GRU layer beside LSTM ones has
    no place in it)."""
    specs = getattr(network, "specs", None)
    if specs is None:
        raise ValueError(f"native_state_dict takes a network made by make_recurrent or make_bidirectional, "
                         f"got {type(network).__name__} (the drop-ins' state_dict has torch's names already)")
    names = [native_names(spec) for spec in specs]  # refuses a cell with no torch counterpart
    for depth, spec in enumerate(specs):
        if spec.native_mode != specs[0].native_mode:
            raise ValueError(f"layer {depth}'s cell {spec.name!r} is torch's {spec.native_mode}, layer 0's "
                             f"{specs[0].name!r} its {specs[0].native_mode}: one torch.nn module holds one kind")
    return names


def native_state_dict(network: nn.Module) -> Dict[str, Tensor]:
    """The weights of a network made by ``make_recurrent``/``make_bidirectional``
    under ``torch.nn.LSTM``'s names (``weight_ih_l0``, ``bias_hh_l1_reverse``...),
    ready for ``torch.nn.LSTM(...).load_state_dict`` when all layers have one size.

    Each is the weight the cell computes with: through a parametrization, ``weight_norm`` or a
    prune, the product, which torch.nn then computes as the cell did."""
    per_layer = _names_per_layer(network)
    result = {}
    for depth, (names, directions) in enumerate(zip(per_layer, _layer_cells(network))):
        for direction, cell in enumerate(directions):
            suffix = f"_l{depth}" + ("_reverse" if direction else "")
            for torch_name, name in names.items():
                result[torch_name + suffix] = getattr(cell, name).detach()
    return result


def load_native_state_dict(network: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load weights named as ``torch.nn.LSTM``'s (see :func:`native_state_dict`)
    into a network made by ``make_recurrent``/``make_bidirectional``.

    Everything is checked before anything is copied: a refused state_dict leaves the network as it was."""
    expected = native_state_dict(network)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"state_dict does not fit this network: missing {missing}, "
                         f"unexpected {unexpected}")
    copies = []
    for depth, (names, directions) in enumerate(zip(_names_per_layer(network), _layer_cells(network))):
        shared = len(directions) == 2 and directions[0] is directions[1]
        for direction, cell in enumerate(directions):
            suffix = f"_l{depth}" + ("_reverse" if direction else "")
            if shared and direction == 1:
                if any(not torch.equal(state_dict[n + suffix], state_dict[n + f"_l{depth}"])
                       for n in names):
                    raise ValueError(f"layer {depth} shares its weights between directions, "
                                     f"but the state_dict's forward and reverse weights differ")
                continue
            for torch_name, name in names.items():
                key, value = torch_name + suffix, state_dict[torch_name + suffix]
                target = cell._parameters.get(name)
                if target is None:  # a parametrization, weight_norm or prune computes it from others
                    raise ValueError(f"{key}: the cell's {name!r} is computed by a wrapper (a parametrization, "
                                     f"weight_norm, prune), not a parameter to copy into; load the weights "
                                     f"before wrapping it")
                if tuple(value.shape) != tuple(target.shape):
                    raise ValueError(f"{key} has shape {tuple(value.shape)}, but layer {depth}'s "
                                     f"{name!r} has {tuple(target.shape)}")
                copies.append((target, value))
    with torch.no_grad():
        for target, value in copies:
            target.copy_(value)

