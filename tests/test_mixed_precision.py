"""Mixed precision: ``torch.autocast`` and low-precision models (``.to(torch.bfloat16)``, ``.half()``).

The rule (rnndsl/codegen/precision.py): under autocast the matrix products run in low
precision and the recurrent state is carried in the parameters' dtype, float32. Every stock
and zoo cell, on both backends and in each scan mode it takes, trains under CPU bfloat16
autocast with a padded batch, returns float32 and stays close to its float32 run; the
drop-ins return the dtypes torch.nn's own layers return under autocast; whole models in
bfloat16 or float16 train on both backends. Sizes are tiny: this file is about dtypes.
"""
from __future__ import annotations

import functools
import warnings
from typing import List, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnndsl
from references import REFERENCES, reference_scan
from rnndsl.codegen.precision import low_precision_values
from rnndsl.containers import _flatten
from rnndsl.kernels import linear_with_grad
from rnndsl.resources import stock_cell_names
from strategies import DrawnCell, linear_cells, well_formed_cells

CELLS = sorted(set(stock_cell_names()) | set(REFERENCES))
BACKENDS = ["script", "eager"]
LOW = torch.bfloat16
# bfloat16 keeps 8 bits of mantissa (relative rounding 2**-9). A gradient that sums terms of either
# sign can cancel to an element far smaller than its terms, and keep their rounding: so results are
# compared as tensors, their largest error against their largest element. Measured: at most 2.5% under
# autocast (layernorm_lstm's gradients), 4.4% for a whole model in bfloat16, its state included.
AUTOCAST_SCALE, LOW_MODEL_SCALE = 5e-2, 1e-1
# The matrix-state cells normalize their input and their heads' output: two layer norms over a few
# features (4 and 12 here) amplify bfloat16's rounding, so that their hand-written references
# (tests/references.py), run under the same autocast, land up to 9% from float32 (retnet's
# o_norm_weight gradient). Each of their results may be as far from float32 as twice its reference's.
NORMED_MATRIX_CELLS = {"gla", "deltanet", "gated_deltanet", "mlstm", "retnet", "mamba2", "linear_attention"}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest error against the largest element (at least 1e-2, for tensors near zero)."""
    return (got.double() - want.double()).abs().max().item() / max(want.abs().max().item(), 1e-2)


def assert_close_in_scale(got: torch.Tensor, want: torch.Tensor, relative: float = AUTOCAST_SCALE) -> None:
    error = relative_error(got, want)
    assert error <= relative, f"largest error {error:.3g} of the largest element, above {relative:.3g}"


@functools.lru_cache(maxsize=None)
def takes_parallel_scan(name: str) -> bool:
    return rnndsl.load_cell(name).parallel_plan()[0] is not None


def autocast():
    return torch.autocast("cpu", dtype=LOW)


def leaves(tree) -> List[torch.Tensor]:
    return _flatten(tree)[0]


def _train(net: nn.Module, x: torch.Tensor, lengths, low: bool) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Outputs, final state and parameter gradients of one forward+backward, under autocast if ``low``."""
    net.zero_grad()
    xs = x.clone().requires_grad_()
    if low:
        with autocast():
            output, state = net(xs, lengths=lengths)
    else:
        output, state = net(xs, lengths=lengths)
    results = [output, *leaves(state)]
    _loss(results).backward()
    return results, [xs.grad] + [p.grad for p in net.parameters()]


def _loss(results: List[torch.Tensor]) -> torch.Tensor:
    """A loss of every result, so that every state's gradient flows back."""
    return sum(((r.float() - 0.1) ** 2).sum() for r in results)


def _train_reference(name: str, net: nn.Module, x: torch.Tensor, lengths,
                     low: bool) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """``_train`` of the same network written with the cell's hand-written reference, layer by layer."""
    xs = x.clone().requires_grad_()
    parameters = list(net.parameters())
    mask = torch.arange(x.size(0))[:, None] < torch.tensor(lengths)[None, :]
    with torch.autocast("cpu", dtype=LOW, enabled=low):
        inputs, finals = xs, []
        for layer, state in zip(net.network.layers, net.initialize_hidden(x.size(1))):
            inputs, final = reference_scan(REFERENCES[name], dict(layer.cell.named_parameters()), state, inputs, mask)
            finals += list(final)
    results = [r.float() for r in (inputs, *finals)]
    grads = torch.autograd.grad(_loss(results), [xs, *parameters])
    return results, list(grads)


@pytest.mark.parametrize("scan", ["sequential", "auto", "parallel"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CELLS)
def test_every_cell_trains_under_bfloat16_autocast_carrying_a_float32_state(name, backend, scan):
    if scan != "sequential" and not takes_parallel_scan(name):
        pytest.skip(f"{name} runs a time loop whatever the scan")  # "auto" is "sequential" then
    size = 6 if name == "sru" else 4  # sru reads x[hidden]
    torch.manual_seed(0)
    # Two layers: the second reads the first one's outputs, as autocast leaves them.
    net = rnndsl.make_recurrent(name, size, [6, 6], backend=backend, scan=scan, save_hidden=False)
    # A spatial cell's input: its channels' images, flat.
    x = torch.randn(5, 3, net.network.input_size, generator=torch.Generator().manual_seed(1))
    lengths = [5, 3, 1]
    expected, expected_grads = _train(net, x, lengths, low=False)
    got, grads = _train(net, x, lengths, low=True)
    for value in got + grads:
        assert value.dtype == torch.float32
        assert torch.isfinite(value).all()
    bounds = [AUTOCAST_SCALE] * len(got + grads)
    if name in NORMED_MATRIX_CELLS:
        reference, reference_grads = _train_reference(name, net, x, lengths, low=False)
        low, low_grads = _train_reference(name, net, x, lengths, low=True)
        bounds = [max(AUTOCAST_SCALE, 2 * relative_error(a, b))
                  for a, b in zip(low + low_grads, reference + reference_grads, strict=True)]
        assert max(bounds) <= 2 * LOW_MODEL_SCALE, "the reference itself strays under autocast: no bound to hold"
    for a, b, bound in zip(got + grads, expected + expected_grads, bounds, strict=True):
        assert_close_in_scale(a, b, bound)


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("lengths", [None, [5, 3, 1]])
def test_native_layers_carry_float32_under_autocast_as_the_compiled_ones(name, lengths):
    """torch's fused kernel answers in bfloat16 under autocast: a native layer turned it back, or
    the layer above refused its own network's output ("state h is float32, but the input is
    bfloat16"), and one layer returned bfloat16 where make_recurrent promises float32."""
    torch.manual_seed(0)
    net = rnndsl.make_recurrent(name, 4, [6, 6], backend="native", save_hidden=False)
    x = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(1))
    expected, expected_grads = _train(net, x, lengths, low=False)
    got, grads = _train(net, x, lengths, low=True)
    for a, b in zip(got + grads, expected + expected_grads, strict=True):
        assert a.dtype == torch.float32 and torch.isfinite(a).all()
        assert_close_in_scale(a, b, AUTOCAST_SCALE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_step_and_the_python_scan_keep_the_state_float32(backend):
    """A cell's own step (what a stack of cells in one RecurrentTable runs, through the Python scan):
    lstm_proj's h is a product, which autocast computes in bfloat16, and comes back float32."""
    spec = rnndsl.load_cell("lstm_proj")
    cells = [spec.build(4, 5, backend=backend, proj=3), spec.build(3, 5, backend=backend, proj=3)]
    deep = rnndsl.RecurrentTable(rnndsl.SequenceTable(cells))
    state = tuple((torch.zeros(2, 3), torch.zeros(2, 5)) for _ in cells)
    with autocast():
        step_state, y = cells[0](state[0], torch.randn(2, 4))
        final, outputs = deep(state, torch.randn(4, 2, 4), torch.tensor([[True, True]] * 3 + [[True, False]]))
    assert [t.dtype for t in (y, *step_state, outputs, *leaves(final))] == [torch.float32] * 8
    outputs.sum().backward()


def test_a_network_takes_an_input_in_the_autocast_dtype():
    """torch.nn's layers take a bfloat16 input under autocast (from a Linear before them, say); so
    does a network, carrying its state in float32 all the same."""
    net = rnndsl.make_recurrent("lstm_proj", 4, [5, 5], proj=2)
    with autocast():
        output, state = net(torch.randn(3, 2, 4).to(LOW), state=net.initialize_hidden(2, dtype=LOW))
    assert [t.dtype for t in (output, *leaves(state))] == [torch.float32] * 5


@functools.lru_cache(maxsize=None)
def _cached_pair(mode: str, backend: str, options: Tuple[Tuple[str, object], ...]) -> Tuple[nn.Module, nn.Module]:
    return _torch_pair(mode, backend, **dict(options))


def _torch_pair(mode: str, backend: str, **options) -> Tuple[nn.Module, nn.Module]:
    """A torch.nn layer and the rnndsl drop-in with its weights."""
    theirs_class, ours_class, extra = {"LSTM": (nn.LSTM, rnndsl.LSTM, {}), "GRU": (nn.GRU, rnndsl.GRU, {}),
                                       "RNN_TANH": (nn.RNN, rnndsl.RNN, {"nonlinearity": "tanh"}),
                                       "RNN_RELU": (nn.RNN, rnndsl.RNN, {"nonlinearity": "relu"})}[mode]
    torch.manual_seed(0)
    theirs = theirs_class(4, 5, num_layers=2, **extra, **options)
    ours = ours_class(4, 5, num_layers=2, backend=backend, **extra, **options)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _dtypes_and_values(module: nn.Module, inputs) -> Tuple[List[torch.dtype], List[torch.Tensor]]:
    module.zero_grad()
    with warnings.catch_warnings(), autocast():
        warnings.simplefilter("ignore")  # torch's "LSTM with projections is not supported with oneDNN"
        output, hidden = module(inputs)
    output = output.data if isinstance(output, nn.utils.rnn.PackedSequence) else output
    values = [output, *(hidden if isinstance(hidden, tuple) else (hidden,))]
    sum(v.float().sum() for v in values).backward()
    return [v.dtype for v in values], values


DROP_IN_CASES = [("LSTM", {}), ("LSTM", {"proj_size": 3}), ("LSTM", {"bidirectional": True}),
                 ("GRU", {}), ("RNN_TANH", {"bias": False}), ("RNN_RELU", {"batch_first": True})]


@pytest.mark.parametrize("form", ["padded", "padded, oneDNN off", "packed", "bfloat16 input"])
@pytest.mark.parametrize("mode, options", DROP_IN_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_ins_return_what_torch_nn_returns_under_autocast(backend, mode, options, form):
    """torch.nn's dtypes follow which kernel it runs (oneDNN's fused LSTM, lowered whole, or steps
    composed of lowered products), checked here against torch itself; values agree within bfloat16."""
    theirs, ours = _cached_pair(mode, backend, tuple(sorted(options.items())))
    x = torch.randn(2, 3, 4) if options.get("batch_first") else torch.randn(3, 2, 4)
    if form == "packed":
        x = pack_padded_sequence(x, [3, 2], batch_first=options.get("batch_first", False))
    elif form == "bfloat16 input":
        x = x.to(LOW)
    with torch.backends.mkldnn.flags(enabled=form != "padded, oneDNN off"):
        try:
            want, expected = _dtypes_and_values(theirs, x)
        except RuntimeError as error:
            # On CPUs without bfloat16 instructions (an AMD EPYC with AVX2 only), oneDNN has no
            # bfloat16 LSTM primitive and torch.nn.LSTM itself raises: there is nothing to mirror.
            # "padded, oneDNN off" still checks the values against torch on such a CPU.
            if "could not create a primitive descriptor" not in str(error):
                raise
            pytest.skip(f"torch.nn.{mode} itself fails under autocast on this CPU: {str(error).splitlines()[0]}")
        got, values = _dtypes_and_values(ours, x)
    assert got == want
    for a, b in zip(values, expected, strict=True):
        assert_close_in_scale(a, b)
    for name, parameter in ours.named_parameters():
        assert_close_in_scale(parameter.grad, dict(theirs.named_parameters())[name].grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["lstm", "lstm_proj", "gru", "layernorm_lstm", "mingru", "qrnn"])
def test_networks_train_as_low_precision_models(name, backend, dtype):
    """A whole network in bfloat16 or float16 (state, products and all), the derived backward
    included, close to its float32 run; the parallel scan for mingru and qrnn."""
    torch.manual_seed(0)
    net = rnndsl.make_recurrent(name, 4, [6, 6], backend=backend, save_hidden=False)
    x = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(1))
    expected, expected_grads = _train(net, x, [5, 3, 1], low=False)
    net = net.to(dtype)
    got, grads = _train(net, x.to(dtype), [5, 3, 1], low=False)
    for value in got + grads:
        assert value.dtype == dtype
    for a, b in zip(got + grads, expected + expected_grads, strict=True):
        assert_close_in_scale(a, b, LOW_MODEL_SCALE)


@pytest.mark.parametrize("convert", ["to_bfloat16", "half"])
@pytest.mark.parametrize("mode, options", DROP_IN_CASES[:4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_ins_train_as_low_precision_models(backend, mode, options, convert):
    theirs, ours = _torch_pair(mode, backend, **options)
    dtype = torch.bfloat16 if convert == "to_bfloat16" else torch.float16
    ours = ours.to(torch.bfloat16) if convert == "to_bfloat16" else ours.half()
    x = torch.randn(3, 2, 4)
    output, hidden = ours(x.to(dtype))
    values = [output, *(hidden if isinstance(hidden, tuple) else (hidden,))]
    assert [v.dtype for v in values] == [dtype] * len(values)
    sum(v.float().sum() for v in values).backward()
    assert all(p.grad.dtype == dtype and torch.isfinite(p.grad).all() for p in ours.parameters())
    expected, _ = theirs(x)
    assert_close_in_scale(output, expected, LOW_MODEL_SCALE)


@pytest.mark.parametrize("mode, options", DROP_IN_CASES[:4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bfloat16_drop_in_takes_a_float32_input_under_autocast_as_torch_nn(backend, mode, options):
    """torch.nn skips its dtype check under autocast; the drop-ins refused the float32 input of a
    bfloat16 model ("its parameters are torch.bfloat16 ..., but the input is torch.float32"). They
    now run it in the model's dtype, which they return (torch.nn keeps a float32 state in some
    layers here: see _autocast_dtypes, which mirrors torch's choices for float32 models only)."""
    theirs, ours = _torch_pair(mode, backend, **options)
    theirs, ours = theirs.to(torch.bfloat16), ours.to(torch.bfloat16)
    x = torch.randn(3, 2, 4)
    _, expected = _dtypes_and_values(theirs, x)
    got, values = _dtypes_and_values(ours, x)
    assert got == [torch.bfloat16] * len(got)
    for a, b in zip(values, expected, strict=True):
        assert_close_in_scale(a, b, LOW_MODEL_SCALE)


# The analysis behind the casts -----------------------------------------------------------------

def test_only_the_products_that_reach_a_state_alone_are_cast_back():
    """lstm_proj's h' is a product: cast back in both methods. Its c' mixes in the float32 c, and
    the stock LSTM's h' = sigmoid(o) * tanh(c') the float32 c': no cast (the golden files pin that)."""
    spec = rnndsl.load_cell("lstm_proj")
    low = low_precision_values(spec.optimized())
    assert "h_next" in low and "c_next" not in low
    assert spec.code().count(".to(h.dtype)") == 2
    assert "autocast" not in rnndsl.load_cell("lstm").code()


def test_parallel_products_follow_autocast():
    """oneDNN's float32 product, which the parallel scan takes for large float32 products, would
    escape autocast."""
    v, weight = torch.randn(64, 256), torch.randn(256, 256, requires_grad=True)
    with autocast():
        assert linear_with_grad(v, weight).dtype == LOW
        with torch.no_grad():
            assert linear_with_grad(v, weight).dtype == LOW


def _all_float32_under_autocast(cell: nn.Module, batch: int, steps: int) -> None:
    x = torch.randn(steps, batch, cell.input_size)
    state = tuple(torch.randn(batch, size) for size in cell.state_sizes)
    mask = torch.rand(steps, batch) < 0.7
    with autocast():
        step_state, step_output = cell(state, x[0])
        outputs, final = cell.forward_sequence(x, state, mask)
        unmasked, unmasked_final = cell.forward_sequence(x, state)
    results = [*step_state, *leaves(step_output), *leaves(outputs), *final, *leaves(unmasked), *unmasked_final]
    assert all(r.dtype == torch.float32 for r in results), [r.dtype for r in results]


@settings(max_examples=10)
@given(well_formed_cells(), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))
def test_random_cells_return_float32_under_autocast(cell: DrawnCell, size, batch, steps):
    """Whatever the equations, nothing a cell returns is left in low precision: the analysis
    misses no value that autocast lowers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unused values are legal
        spec = rnndsl.load_source(cell.source, "drawn.cell")[cell.name]
    _all_float32_under_autocast(spec.build(size, size, backend="eager").eval(), batch, steps)


@settings(max_examples=10)
@given(linear_cells(), st.integers(1, 3), st.integers(1, 3), st.integers(1, 6))
def test_random_linear_cells_return_float32_from_the_parallel_scan_under_autocast(cell: DrawnCell, size,
                                                                                  batch, steps):
    spec = rnndsl.load_source(cell.source, "drawn.cell")[cell.name]
    _all_float32_under_autocast(spec.build(size, size, backend="eager", scan="parallel").eval(), batch, steps)

