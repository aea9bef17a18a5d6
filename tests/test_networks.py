"""Networks: the torch.nn drop-ins, make_recurrent/make_bidirectional, the native backend.

Everything is compared in float64 against torch.nn (the drop-ins, bidirectional
networks through the weight conversion) or against plain loops over
``torch.nn`` cells, one sequence at a time (make_recurrent).
"""
import copy
import dataclasses
import io
import pickle
import threading

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnndsl
from rnndsl.containers import _flatten, map_state
from rnndsl.native import load_native_state_dict, native_names, native_state_dict
from rnndsl.networks import GRU, LSTM, RNN, make_bidirectional, make_recurrent

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)
BACKENDS = ["script", "eager", "native"]
DROP_INS = {  # name: (ours, torch's, extra constructor arguments)
    "LSTM": (LSTM, nn.LSTM, {}),
    "GRU": (GRU, nn.GRU, {}),
    "RNN_TANH": (RNN, nn.RNN, {"nonlinearity": "tanh"}),
    "RNN_RELU": (RNN, nn.RNN, {"nonlinearity": "relu"}),
}


def randn(*shape, requires_grad=False):
    return torch.randn(*shape, dtype=F64, requires_grad=requires_grad)


def flat(result):
    """Outputs and hidden states of a torch.nn-style call as a list of tensors."""
    output, hidden = result
    output = output.data if isinstance(output, nn.utils.rnn.PackedSequence) else output
    return [output] + (list(hidden) if isinstance(hidden, tuple) else [hidden])


def pair(mode, backend, **options):
    """torch.nn's module and ours with the same weights."""
    ours_cls, torch_cls, extra = DROP_INS[mode]
    reference = torch_cls(**options, **extra, dtype=F64)
    ours = ours_cls(**options, **extra, backend=backend, dtype=F64)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


@settings(max_examples=45, deadline=None)
@given(mode=st.sampled_from(sorted(DROP_INS)), backend=st.sampled_from(BACKENDS),
       input_size=st.integers(1, 4), hidden_size=st.integers(1, 4), num_layers=st.integers(1, 3),
       bias=st.booleans(), batch_first=st.booleans(), bidirectional=st.booleans(),
       kind=st.sampled_from(["batched", "unbatched", "packed"]), with_hx=st.booleans(),
       data=st.data())
def test_drop_in_matches_torch(mode, backend, input_size, hidden_size, num_layers, bias,
                               batch_first, bidirectional, kind, with_hx, data):
    torch.manual_seed(0)
    reference, ours = pair(mode, backend, input_size=input_size, hidden_size=hidden_size,
                           num_layers=num_layers, bias=bias, batch_first=batch_first,
                           bidirectional=bidirectional)
    steps, batch = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 4))
    if kind == "unbatched":
        x = randn(steps, input_size, requires_grad=True)
    else:
        x = randn(*((batch, steps) if batch_first else (steps, batch)), input_size, requires_grad=True)
    inputs = x
    if kind == "packed":
        lengths = data.draw(st.lists(st.integers(1, steps), min_size=batch, max_size=batch))
        inputs = pack_padded_sequence(x, torch.tensor(lengths), batch_first=batch_first,
                                      enforce_sorted=data.draw(st.booleans())
                                      and lengths == sorted(lengths, reverse=True))
    hx = ()
    if with_hx:
        shape = (num_layers * (2 if bidirectional else 1),) + ((batch,) if kind != "unbatched" else ()) + (hidden_size,)
        hx = (randn(*shape, requires_grad=True), randn(*shape, requires_grad=True))[:2 if mode == "LSTM" else 1]
    args = (hx if mode == "LSTM" else hx[0],) if with_hx else ()
    expected, got = flat(reference(inputs, *args)), flat(ours(inputs, *args))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, **TOL)
    wrt = [x, *hx, *reference.parameters()]
    weights = [randn(*t.shape) for t in expected]
    grads = torch.autograd.grad(sum((t * w).sum() for t, w in zip(expected, weights)), wrt,
                                retain_graph=True)  # the packing of x is shared
    wrt_ours = [x, *hx, *ours.parameters()]
    grads_ours = torch.autograd.grad(sum((t * w).sum() for t, w in zip(got, weights)), wrt_ours)
    torch.testing.assert_close(grads_ours, grads, **TOL)


@pytest.mark.parametrize("mode", sorted(DROP_INS))
@pytest.mark.parametrize("bias", [True, False])
def test_drop_in_parameters_init_and_state_dict_match_torch(mode, bias):
    ours_cls, torch_cls, extra = DROP_INS[mode]
    options = dict(input_size=3, hidden_size=4, num_layers=2, bias=bias, bidirectional=True, **extra)
    torch.manual_seed(7)
    reference = torch_cls(**options)
    torch.manual_seed(7)
    ours = ours_cls(**options)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == \
        [(n, p.shape) for n, p in reference.named_parameters()]
    assert list(ours.named_buffers()) == []
    # Same default init as torch.nn: the same draws, so the same numbers.
    torch.testing.assert_close(ours.state_dict(), reference.state_dict(), rtol=0, atol=0)
    x = torch.randn(5, 2, 3)
    with torch.no_grad():
        ours.load_state_dict(reference.state_dict())
        for p in reference.parameters():
            p.add_(0.1)
        reference.load_state_dict(ours.state_dict())  # and back
        torch.testing.assert_close(flat(ours(x)), flat(reference(x)))


def test_dropout_matches_torch_in_train_and_eval():
    torch.manual_seed(0)
    for backend in BACKENDS:
        # p = 1 drops every input of layers above the first: deterministic in training.
        reference, ours = pair("LSTM", backend, input_size=3, hidden_size=4, num_layers=3, dropout=1.0)
        x = randn(5, 2, 3)
        torch.testing.assert_close(flat(ours(x)), flat(reference(x)), **TOL)
        reference.eval(), ours.eval()
        torch.testing.assert_close(flat(ours(x)), flat(reference(x)), **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("enforce_sorted", [False, True])
def test_seeded_dropout_draws_torchs_masks(backend, packed, enforce_sorted):
    """Under one seed, the same masks as torch.nn in training, so the same numbers and gradients, and
    the random stream left where torch leaves it: a PackedSequence's masks are drawn over its data, as
    torch drops it (they were drawn over the padded tensor once)."""
    reference, ours = pair("GRU", backend, input_size=3, hidden_size=4, num_layers=3, dropout=0.5,
                           bidirectional=True)
    x = randn(6, 3, 3)
    lengths = torch.tensor([6, 4, 2]) if enforce_sorted else torch.tensor([4, 6, 2])
    results = []
    for module in (reference, ours):
        leaf = x.clone().requires_grad_()
        given = pack_padded_sequence(leaf, lengths, enforce_sorted=enforce_sorted) if packed else leaf
        torch.manual_seed(3)
        outputs = flat(module(given))
        after = torch.rand(3)
        grads = torch.autograd.grad(sum((o * o).sum() for o in outputs), [leaf, *module.parameters()])
        results.append(outputs + list(grads) + [after])
    for want, got in zip(*results, strict=True):
        torch.testing.assert_close(got, want, **TOL)


def test_drop_in_pickles_copies_and_moves():
    torch.manual_seed(0)
    ours = LSTM(3, 4, num_layers=2)
    x = torch.randn(5, 2, 3)
    expected = flat(ours(x))
    for clone in (pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours)):
        torch.testing.assert_close(flat(clone(x)), expected)
    ours.double()
    torch.testing.assert_close(flat(ours(x.double())), [t.double() for t in expected])
    params = {n: p * 2 for n, p in ours.named_parameters()}
    doubled = torch.func.functional_call(ours, params, (x.double(),))
    assert not torch.allclose(flat(doubled)[0], expected[0].double())


def _replica_with_doubled_weights(module: nn.Module) -> nn.Module:
    """What nn.DataParallel runs on a second device: a shallow copy of the module with its own
    weights set on it (torch.nn.parallel.replicate's way), here twice the original's."""
    replica = module._replicate_for_data_parallel()
    for name, parameter in module.named_parameters():
        setattr(replica, name, (parameter * 2).detach())
    return replica


def _wrong_calls_at_once(modules, call) -> list:
    """Each module called 30 times in its own thread, all at once: how many calls per module
    differ from its call alone."""
    with torch.no_grad():
        expected = [call(module) for module in modules]
    assert not torch.equal(expected[0], expected[1])
    barrier = threading.Barrier(len(modules))
    wrong = [0] * len(modules)

    def calls(index: int, module: nn.Module) -> None:
        barrier.wait()
        for _ in range(30):
            with torch.no_grad():
                wrong[index] += not torch.equal(call(module), expected[index])

    threads = [threading.Thread(target=calls, args=pair) for pair in enumerate(modules)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return wrong


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_in_replicas_running_at_once_keep_their_own_weights(backend):
    """nn.DataParallel's replicas run in threads at once: each must compute with its own weights, as
    torch.nn's replicas do. They once shared the one engine whose parameter slots each call fills,
    and ran each other's weights."""
    torch.manual_seed(0)
    original = LSTM(4, 8, num_layers=2, backend=backend)
    x = torch.randn(30, 3, 4)
    modules = [original, _replica_with_doubled_weights(original)]
    assert _wrong_calls_at_once(modules, lambda module: module(x)[0]) == [0, 0]


def test_scripted_cell_replicas_running_at_once_keep_their_own_weights():
    """The same for a scripted cell (a make_recurrent network's layers hold them), whose replicas
    once shared its TorchScript kernel, into which each call binds its parameters: a sequence, and
    a step (the replica builds its own kernel from parameters held as plain attributes)."""
    torch.manual_seed(0)
    cell = rnndsl.load_cell("peephole_lstm").build(4, 16)
    xs, state = torch.randn(30, 3, 4), (torch.zeros(3, 16), torch.zeros(3, 16))
    modules = [cell, _replica_with_doubled_weights(cell)]
    assert _wrong_calls_at_once(modules, lambda module: module.forward_sequence(xs, state)[0]) == [0, 0]
    assert _wrong_calls_at_once(modules, lambda module: module(state, xs[0])[1]) == [0, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_in_errors_name_expected_and_received(backend):
    """The same errors on every backend, the native one's too (torch's own say less there)."""
    lstm = LSTM(10, 20, backend=backend)
    with pytest.raises(RuntimeError, match="Expected 10, got 11"):
        lstm(torch.randn(5, 3, 11))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(1, 3, 20\), got \[1, 4, 20\]"):
        lstm(torch.randn(5, 3, 10), (torch.zeros(1, 4, 20), torch.zeros(1, 3, 20)))
    packed = pack_padded_sequence(torch.randn(5, 2, 10), torch.tensor([5, 3]))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(1, 2, 20\), got \[1, 3, 20\]"):
        lstm(packed, (torch.zeros(1, 3, 20), torch.zeros(1, 3, 20)))
    with pytest.raises(RuntimeError, match="Expected 11, got 10"):
        LSTM(11, 20, backend=backend)(packed)
    with pytest.raises(RuntimeError, match=r"hx and cx should also be 3-D but got \(2-D, 2-D\) tensors"):
        lstm(torch.randn(5, 3, 10), (torch.zeros(3, 20), torch.zeros(3, 20)))
    with pytest.raises(ValueError, match="h_0 is torch.float64 on cpu but the input is torch.float32"):
        lstm(torch.randn(5, 3, 10), (torch.zeros(1, 3, 20, dtype=F64), torch.zeros(1, 3, 20)))
    # Mismatched dtypes and devices are RuntimeErrors too, as torch's (the meta device for another).
    with pytest.raises(RuntimeError, match="h_0 is torch.float32 on meta but the input is torch.float32 on cpu"):
        lstm(torch.randn(5, 3, 10), (torch.zeros(1, 3, 20, device="meta"), torch.zeros(1, 3, 20)))
    with pytest.raises(RuntimeError, match="^Input and parameter tensors are not at the same device, found input "
                                           "tensor at meta and parameter tensor at cpu$"):
        lstm(torch.randn(5, 3, 10, device="meta"))
    with pytest.raises(ValueError, match=r"hx must be a tuple \(h_0, c_0\) of tensors"):
        lstm(torch.randn(5, 3, 10), torch.zeros(1, 3, 20))
    for kind in ("LSTM", "GRU", "RNN"):  # torch's very words, which differ between its classes
        with pytest.raises(ValueError) as torch_error:
            getattr(nn, kind)(10, 20)(torch.randn(5, 3, 1, 10))
        with pytest.raises(ValueError) as our_error:
            getattr(rnndsl, kind)(10, 20, backend=backend)(torch.randn(5, 3, 1, 10))
        assert str(our_error.value) == str(torch_error.value)
    with pytest.raises(ValueError, match="GRU: hx must be a tensor, got tuple"):  # every backend alike
        GRU(10, 20, backend=backend)(torch.randn(5, 3, 10), (torch.zeros(1, 3, 20),))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_drop_in_projections_match_torch(backend, bidirectional, bias):
    torch.manual_seed(0)
    reference, ours = pair("LSTM", backend, input_size=3, hidden_size=5, proj_size=2, num_layers=2,
                           bias=bias, bidirectional=bidirectional, batch_first=True)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == \
        [(n, p.shape) for n, p in reference.named_parameters()]
    directions = 2 if bidirectional else 1
    x = randn(4, 3, 3, requires_grad=True)
    hx = (randn(2 * directions, 4, 2, requires_grad=True), randn(2 * directions, 4, 5, requires_grad=True))
    for args in [(), (hx,)]:
        expected, got = flat(reference(x, *args)), flat(ours(x, *args))
        torch.testing.assert_close(got, expected, **TOL)
        weights = [randn(*t.shape) for t in expected]
        wrt = [x, *(hx if args else ())]
        grads = torch.autograd.grad(sum((t * w).sum() for t, w in zip(expected, weights)),
                                    wrt + list(reference.parameters()))
        grads_ours = torch.autograd.grad(sum((t * w).sum() for t, w in zip(got, weights)),
                                         wrt + list(ours.parameters()))
        torch.testing.assert_close(grads_ours, grads, **TOL)


@pytest.mark.parametrize("first, second", [("script", "eager"), ("eager", "native"), ("native", "script")])
def test_a_backend_assigned_after_construction_takes_effect(first, second):
    reference, ours = pair("LSTM", first, input_size=3, hidden_size=4, num_layers=2)
    ours.backend = second
    assert ours.backend == second and f"backend='{second}'" in repr(ours)
    cell = ours._engine.layers[0].cell  # the native backend's: eager cells, which only torch.export runs
    assert hasattr(cell, "kernel") == (second == "script")  # a scripted cell keeps its TorchScript kernel
    x = randn(5, 2, 3)
    torch.testing.assert_close(flat(ours(x)), flat(reference(x)), **TOL)
    with pytest.raises(ValueError, match="unknown backend"):
        ours.backend = "cuda"
    assert ours.backend == second


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_set_after_construction_takes_effect(backend):
    torch.manual_seed(0)
    reference, ours = pair("GRU", backend, input_size=3, hidden_size=4, num_layers=2)
    x = randn(5, 2, 3)
    reference.dropout = ours.dropout = 1.0  # drops every input of the second layer: deterministic
    torch.testing.assert_close(flat(ours(x)), flat(reference(x)), **TOL)
    reference.dropout = ours.dropout = 0.0
    torch.testing.assert_close(flat(ours(x)), flat(reference(x)), **TOL)


def test_empty_sequences_raise_what_torch_raises_everywhere():
    with pytest.raises(RuntimeError) as expected:
        nn.LSTM(3, 4)(torch.randn(0, 2, 3))
    message = str(expected.value)
    for backend in BACKENDS:
        for batch_first, x in [(False, torch.randn(0, 2, 3)), (True, torch.randn(2, 0, 3)),
                               (False, torch.randn(0, 3))]:
            with pytest.raises(rnndsl.EmptySequenceError, match=message) as caught:
                LSTM(3, 4, batch_first=batch_first, backend=backend)(x)
            assert f"shape {tuple(x.shape)}" in str(caught.value)  # as given, not transposed
        with pytest.raises(rnndsl.EmptySequenceError, match=message):
            make_recurrent("gru", 3, [4], backend=backend)(torch.randn(0, 2, 3))
        with pytest.raises(rnndsl.EmptySequenceError, match=r"shape \(2, 0, 3\)"):
            make_recurrent("gru", 3, [4], backend=backend, batch_first=True)(torch.randn(2, 0, 3))
    for backend in ("script", "eager"):
        for scan in ("sequential", "parallel"):
            cell = rnndsl.load_cell("mingru").build(3, 4, backend=backend, scan=scan)
            with pytest.raises(rnndsl.EmptySequenceError, match=message):
                cell.forward_sequence(torch.randn(0, 2, 3), (torch.zeros(2, 4),))
            with pytest.raises(rnndsl.EmptySequenceError, match=message):
                rnndsl.scan(cell, torch.randn(0, 2, 3), (torch.zeros(2, 4),))
    # rnndsl promises a ValueError for inputs that do not fit, torch a RuntimeError: both hold.
    assert issubclass(rnndsl.EmptySequenceError, ValueError)


@pytest.mark.parametrize("mode", sorted(DROP_INS))
def test_construction_draws_what_torch_draws(mode):
    """Swapping the class into a seeded model leaves the init of its other layers as it was."""
    ours_cls, torch_cls, extra = DROP_INS[mode]
    draws = []
    for cls in (torch_cls, ours_cls):
        torch.manual_seed(3)
        cls(3, 4, num_layers=2, bidirectional=True, **extra)
        draws.append(torch.rand(5))
    torch.testing.assert_close(draws[1], draws[0], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_ins_trace_and_export_to_onnx(backend):
    torch.manual_seed(0)
    ours = LSTM(3, 4, num_layers=2, proj_size=2, bidirectional=True, backend=backend)
    traced = torch.jit.trace(ours, torch.randn(5, 2, 3))
    x = torch.randn(7, 3, 3)  # the trace holds torch's fused op: any length and batch
    torch.testing.assert_close(flat(traced(x)), flat(ours(x)))
    onnx = pytest.importorskip("onnx")
    buffer = io.BytesIO()
    torch.onnx.export(GRU(3, 4, backend=backend), (torch.randn(5, 2, 3),), buffer, dynamo=False)
    model = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(model)
    assert "GRU" in {node.op_type for node in model.graph.node}


class _Holder(nn.Module):
    """A model around an RNN, as users script them: TorchScript compiles this forward."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind, options", [("LSTM", dict(proj_size=2, bidirectional=True, num_layers=2)),
                                           ("GRU", dict(batch_first=True)),
                                           ("RNN", dict(nonlinearity="relu", bias=False))])
def test_a_model_holding_a_drop_in_scripts_as_one_holding_torchs(backend, kind, options):
    """torch.jit.script compiles torch.nn's module in the drop-in's place (its Python forward is not
    TorchScript's), on the same parameters: it once raised "Only a single generator is supported"."""
    torch.manual_seed(0)
    ours = getattr(rnndsl, kind)(3, 4, backend=backend, **options)
    x = torch.randn(5, 2, 3)
    expected = ours(x)[0]
    model = _Holder(ours)
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), expected)
    # TorchScript puts what __prepare_scriptable__ gives into the model, as for every such module:
    # torch.nn's class, on the drop-in's very parameters.
    assert type(model.rnn) is getattr(nn, kind) and model.rnn.weight_hh_l0 is ours.weight_hh_l0
    with torch.no_grad():
        ours.weight_hh_l0.mul_(2)  # shared, not copied
    torch.testing.assert_close(scripted(x), ours(x)[0])
    nn.utils.parametrizations.weight_norm(ours, "weight_hh_l0")
    with pytest.raises(RuntimeError, match=rf"cannot compile {kind} with a parametrized weight \(weight_hh_l0\)"):
        torch.jit.script(_Holder(ours))


@pytest.mark.filterwarnings("ignore:.*weight_norm is deprecated")
def test_a_scripted_drop_in_keeps_its_hooks_and_refuses_weight_norms_hook():
    """The module TorchScript puts in the drop-in's place keeps its hooks (TorchScript cannot compile
    a hook on torch.nn's RNNs, whose forward is overloaded: it raises as for torch.nn's own, and the
    model, which it changed first, still runs them); the hook form of weight_norm (a computed weight)
    is refused by name, as a parametrization is."""
    torch.manual_seed(0)
    seen = []

    def hook(module, args, output):
        seen.append(type(module))

    models = [_Holder(module) for module in (nn.LSTM(3, 4), rnndsl.LSTM(3, 4))]
    for model in models:
        model.rnn.register_forward_hook(hook)
        with pytest.raises(RuntimeError):  # "Couldn't find method: 'forward'" (then TorchScript's cache speaks)
            torch.jit.script(model)
        model(torch.randn(5, 2, 3))
    assert seen == [nn.LSTM, nn.LSTM]
    hooked = rnndsl.GRU(3, 4)
    nn.utils.weight_norm(hooked, "weight_hh_l0")
    with pytest.raises(RuntimeError, match=r"cannot compile GRU with a parametrized weight \(weight_hh_l0\)"):
        torch.jit.script(_Holder(hooked))


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_drop_ins_export_with_a_dynamic_batch(mode):
    torch.manual_seed(0)
    reference, ours = pair(mode, "script", input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    batch = torch.export.Dim("batch")
    exported = torch.export.export(ours, (randn(5, 2, 3),), dynamic_shapes=({1: batch},)).module()
    x = randn(5, 7, 3)  # the time loop is unrolled: the length stays the traced one
    torch.testing.assert_close(flat(exported(x)), flat(reference(x)), **TOL)


PEEPHOLE = """
cell peephole(x[input]) -> h {
    state h[hidden], c[hidden]
    param weight_ih[4*hidden, input], weight_hh[4*hidden, hidden], bias[4*hidden]
    param w_ci[hidden], w_cf[hidden], w_co[hidden]
    i, f, g, o = chunk(weight_ih @ x + weight_hh @ h + bias, 4)
    c' = sigmoid(f + w_cf * c) * c + sigmoid(i + w_ci * c) * tanh(g)
    h' = sigmoid(o + w_co * c') * tanh(c')
}
"""

# torch's LSTM again, under other names and with the sums in another order.
RENAMED_LSTM = """
cell my_lstm(x[input]) -> hid {
    state hid[hidden], mem[hidden]
    param U[4*hidden, hidden], W[4*hidden, input], b_h[4*hidden], b_x[4*hidden]
    i, f, g, o = chunk(b_h + U @ hid + W @ x + b_x, 4)
    mem' = sigmoid(i) * tanh(g) + sigmoid(f) * mem
    hid' = sigmoid(o) * tanh(mem')
}
"""


def test_backend_choice(tmp_path):
    (tmp_path / "peephole.cell").write_text(PEEPHOLE)
    peephole = rnndsl.load_cell(tmp_path / "peephole.cell")
    with pytest.raises(ValueError, match="backend='native' is not available for cell 'peephole'") as error:
        make_recurrent(peephole, 3, [4], backend="native")
    assert peephole.why_not_native in str(error.value)
    assert make_recurrent(peephole, 3, [4], backend="auto").backend == "script"
    assert make_recurrent("lstm", 3, [4], backend="auto").backend == "native"
    assert LSTM(3, 4, backend="auto").backend == "native"
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        make_recurrent("lstm", 3, [4], backend="cudnn")


class CellRef(nn.Module):
    """A torch.nn cell in the cell calling convention, for the references."""

    def __init__(self, torch_cell):
        super().__init__()
        self.inner = torch_cell

    def forward(self, state, x):
        if isinstance(self.inner, nn.LSTMCell):
            h, c = self.inner(x, state)
            return (h, c), h
        h = self.inner(x, state[0])
        return (h,), h


def reference_cells(network):
    """torch.nn cells holding each layer's weights, per layer and direction."""
    cls = {"LSTM": nn.LSTMCell, "GRU": nn.GRUCell, "RNN_TANH": nn.RNNCell, "RNN_RELU": nn.RNNCell}
    mode = network.spec.native_mode
    weights = native_state_dict(network)
    layers = []
    for depth, layer in enumerate(network.network.layers):
        directions = []
        for suffix in ("", "_reverse")[:2 if hasattr(layer, "fwd") else 1]:
            cell = layer.fwd.cell if hasattr(layer, "fwd") else layer.cell
            extra = {"nonlinearity": "relu"} if mode == "RNN_RELU" else {}
            torch_cell = cls[mode](cell.input_size, cell.hidden_size, dtype=F64, **extra)
            torch_cell.load_state_dict({n: weights[f"{n}_l{depth}{suffix}"] for n in
                                        ("weight_ih", "weight_hh", "bias_ih", "bias_hh")})
            directions.append(CellRef(torch_cell))
        layers.append(directions)
    return layers


def parameter_pairs(network, ref_layers):
    """Each parameter of the network with the reference parameters that play it."""
    names = native_names(network.spec)
    pairs = {}
    for layer, ref_directions in zip(network.network.layers, ref_layers):
        cells = [layer.fwd.cell, layer.reverse_layer.cell] if hasattr(layer, "fwd") else [layer.cell]
        for cell, ref in zip(cells, ref_directions):
            for torch_name, name in names.items():
                parameter = getattr(cell, name)
                pairs.setdefault(id(parameter), (parameter, []))[1].append(getattr(ref.inner, torch_name))
    return list(pairs.values())


def run_reference(layers, xs, states, lengths):
    """Layer by layer, one sequence at a time, each cut to its own length."""
    outputs, finals = [], []
    for b, length in enumerate(lengths):
        seq, per_layer = xs[:length, b:b + 1], []
        for directions, layer_state in zip(layers, states):
            layer_state = layer_state if len(directions) == 2 else (layer_state,)
            outs, ends = [], []
            for direction, (cell, state) in enumerate(zip(directions, layer_state)):
                state = tuple(s[b:b + 1] for s in state)
                ys = []
                for x in (seq.flip(0) if direction else seq):
                    state, y = cell(state, x)
                    ys.append(y)
                ys = torch.stack(ys)
                outs.append(ys.flip(0) if direction else ys)
                ends.append(state)
            seq = torch.cat(outs, -1)
            per_layer.append(tuple(ends) if len(directions) == 2 else ends[0])
        outputs.append(nn.functional.pad(seq, (0, 0, 0, 0, 0, xs.size(0) - length)))
        finals.append(per_layer)

    def stack(parts):
        if isinstance(parts[0], torch.Tensor):
            return torch.cat(parts)
        return tuple(stack([p[i] for p in parts]) for i in range(len(parts[0])))
    return torch.cat(outputs, 1), stack(finals)


@settings(max_examples=25, deadline=None)
@given(cell=st.sampled_from(["lstm", "gru", "rnn_tanh", "rnn_relu"]), backend=st.sampled_from(BACKENDS),
       hids=st.lists(st.integers(1, 5), min_size=1, max_size=3), bidirectional=st.booleans(),
       share=st.booleans(), with_lengths=st.booleans(), data=st.data())
def test_make_recurrent_matches_reference(cell, backend, hids, bidirectional, share, with_lengths, data):
    torch.manual_seed(0)
    if bidirectional:
        net = make_bidirectional(cell, 3, hids, backend=backend, share_weights=share)
    else:
        net = make_recurrent(cell, 3, hids, backend=backend)
    net.double()
    steps, batch = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 3))
    xs = randn(steps, batch, 3, requires_grad=True)
    lengths = data.draw(st.lists(st.integers(1, steps), min_size=batch, max_size=batch)) \
        if with_lengths else [steps] * batch
    state = map_state(lambda t: torch.randn_like(t).requires_grad_(), net.initialize_hidden(batch))
    ref_layers = reference_cells(net)
    ys, finals = net(xs, state, lengths if with_lengths else None)
    ref_ys, ref_finals = run_reference(ref_layers, xs, state, lengths)
    torch.testing.assert_close(ys, ref_ys, **TOL)
    torch.testing.assert_close(finals, ref_finals, **TOL)
    leaves = _flatten(state)[0]
    params = parameter_pairs(net, ref_layers)
    loss = ys.sin().sum() + sum(t.sin().sum() for t in _flatten(finals)[0])
    ref_loss = ref_ys.sin().sum() + sum(t.sin().sum() for t in _flatten(ref_finals)[0])
    grads = torch.autograd.grad(loss, [xs] + leaves + [p for p, _ in params])
    ref_grads = torch.autograd.grad(ref_loss, [xs] + leaves + [r for _, refs in params for r in refs])
    expected, rest = list(ref_grads[:1 + len(leaves)]), list(ref_grads[1 + len(leaves):])
    for _, refs in params:  # a weight shared by both directions gets both directions' gradients
        expected.append(sum(rest[:len(refs)]))
        rest = rest[len(refs):]
    torch.testing.assert_close(grads, tuple(expected), **TOL)
    if with_lengths:  # padded positions are zero and never leak into real ones
        mask = torch.arange(steps).unsqueeze(1) < torch.tensor(lengths)
        assert torch.all(ys[~mask] == 0)
        noisy = xs.detach().masked_fill(~mask.unsqueeze(-1), 1e3)
        ys2, finals2 = net(noisy, state, lengths)
        torch.testing.assert_close((ys2, finals2), (ys, finals), **TOL)


def test_make_recurrent_defaults_and_options():
    torch.manual_seed(0)
    net = make_recurrent("lstm", 3, [5, 2, 4])
    assert all(p.abs().max() <= 0.1 for p in net.parameters())
    assert net.network.output_size == 4
    x = torch.randn(6, 2, 3)
    all_layers = make_recurrent("lstm", 3, [5, 2, 4], return_all_layers=True, save_hidden=False)
    all_layers.load_state_dict(net.state_dict())
    outs, _ = all_layers(x)
    assert [tuple(o.shape) for o in outs] == [(6, 2, 5), (6, 2, 2), (6, 2, 4)]
    torch.testing.assert_close(outs[-1], net(x)[0])
    custom = make_recurrent("gru", 3, [4], winitfun=lambda m: [nn.init.constant_(p, 0.5) for p in m.parameters()],
                            hinitfun=lambda t: t.fill_(1.0), batch_first=True)
    assert all(torch.all(p == 0.5) for p in custom.parameters())
    assert torch.all(custom.initialize_hidden(2)[0][0] == 1.0)
    assert custom(torch.randn(2, 6, 3))[0].shape == (2, 6, 4)
    with pytest.raises(ValueError, match="hids must be a non-empty list"):
        make_recurrent("lstm", 3, [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_make_recurrent_hidden_state_carries_over(backend):
    torch.manual_seed(0)
    net = make_recurrent("lstm", 3, [4, 5], backend=backend)
    xs = torch.randn(8, 2, 3)
    whole, whole_final = net(xs, net.initialize_hidden(2))
    net.initialize_hidden(2)
    first, _ = net(xs[:3])
    second, final = net(xs[3:])
    torch.testing.assert_close(torch.cat([first, second]), whole)
    torch.testing.assert_close(final, whole_final)
    # a validation pass under inference_mode saves an inference tensor; training continues from it
    net.initialize_hidden(2)
    with torch.inference_mode():
        net(xs[:3])
    outputs, _ = net(xs[3:])
    outputs.sum().backward()
    torch.testing.assert_close(outputs, second)
    assert all(t.grad_fn is None for t in rnndsl.containers._flatten(net.hidden)[0])
    net.initialize_hidden(2)
    torch.testing.assert_close(net(xs[:3])[0], first)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("share", [False, True])
def test_make_bidirectional_matches_torch_through_the_weight_conversion(backend, share):
    torch.manual_seed(0)
    reference = nn.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=F64)
    if share:
        with torch.no_grad():
            for name, p in reference.named_parameters():
                if name.endswith("_reverse"):
                    p.copy_(reference.get_parameter(name[:-len("_reverse")]))
    net = make_bidirectional("lstm", 3, [4, 4], backend=backend, share_weights=share).double()
    load_native_state_dict(net, reference.state_dict())
    lengths = [5, 2, 4]
    xs = randn(5, 3, 3)
    out, (h, c) = reference(pack_padded_sequence(xs, torch.tensor(lengths), enforce_sorted=False))
    ys, finals = net(xs, lengths=lengths)
    padded, _ = nn.utils.rnn.pad_packed_sequence(out)
    torch.testing.assert_close(ys, padded, **TOL)
    ends = [d for layer in finals for d in layer]
    torch.testing.assert_close(torch.stack([e[0] for e in ends]), h, **TOL)
    torch.testing.assert_close(torch.stack([e[1] for e in ends]), c, **TOL)
    back = nn.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=F64)
    back.load_state_dict(native_state_dict(net))
    torch.testing.assert_close(flat(back(xs)), flat(reference(xs)), **TOL)
    if share:
        assert len(list(net.parameters())) == 8
        tampered = dict(reference.state_dict(), weight_ih_l0_reverse=torch.zeros(16, 3))
        with pytest.raises(ValueError, match="shares its weights"):
            load_native_state_dict(net, tampered)


def test_torchs_names_are_given_only_for_a_network_torch_can_hold():
    """Every layer's cell checked, not only the first's: a peephole LSTM above an LSTM would lose its
    peepholes in torch.nn.LSTM, a GRU beside an LSTM has no place in either."""
    for cells, words in [(["lstm", "peephole_lstm"], "'peephole_lstm' has no torch counterpart"),
                         (["lstm", "layernorm_lstm"], "'layernorm_lstm' has no torch counterpart"),
                         (["gru", "lstm"], "layer 1's cell 'lstm' is torch's LSTM, layer 0's 'gru' its GRU")]:
        net = make_recurrent(cells, 3, [4, 4])
        for convert in (native_state_dict, lambda n: load_native_state_dict(n, {})):
            with pytest.raises(ValueError, match=words):
                convert(net)
    with pytest.raises(ValueError, match="takes a network made by make_recurrent"):
        native_state_dict(LSTM(3, 4))


def test_native_runs_a_renamed_copy_of_the_lstm(tmp_path):
    (tmp_path / "my_lstm.cell").write_text(RENAMED_LSTM)
    spec = rnndsl.load_cell(tmp_path / "my_lstm.cell")
    assert spec.native_mode == "LSTM"
    torch.manual_seed(0)
    native = make_recurrent(spec, 3, [4, 4], backend="native", save_hidden=False).double()
    script = make_recurrent(spec, 3, [4, 4], backend="script", save_hidden=False).double()
    script.load_state_dict(native.state_dict())
    reference = nn.LSTM(3, 4, num_layers=2, dtype=F64)
    reference.load_state_dict(native_state_dict(native))
    xs = randn(6, 2, 3)
    expected = reference(xs)[0]
    torch.testing.assert_close(native(xs)[0], expected, **TOL)
    torch.testing.assert_close(script(xs)[0], expected, **TOL)


SHIFTED_RNN = """
cell shifted_rnn(x[input]) -> h {
    hyper shift = 0.0
    state h[hidden]
    param weight_ih[hidden, input], weight_hh[hidden, hidden]
    h' = tanh(weight_ih @ x + weight_hh @ h + shift)
}
"""


@pytest.mark.parametrize("backend", ["script", "eager", "auto"])
def test_make_recurrent_from_a_path_with_hyper_parameters(tmp_path, backend):
    path = tmp_path / "shifted.cell"
    path.write_text(SHIFTED_RNN)
    zero = lambda network: [nn.init.zeros_(p) for p in network.parameters()]  # noqa: E731
    net = make_recurrent(str(path), 2, [3, 2], backend=backend, winitfun=zero, shift=1.0)
    ys, _ = net(torch.randn(4, 2, 2))
    torch.testing.assert_close(ys, torch.full((4, 2, 2), torch.tanh(torch.tensor(1.0)).item()))


def test_make_recurrent_takes_packed_sequences():
    torch.manual_seed(0)
    net = make_bidirectional("gru", 3, [4], batch_first=True).double()
    x, lengths = randn(3, 5, 3), torch.tensor([2, 5, 4])
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, finals = net(packed)
    ys, expected = net(x, lengths=lengths)
    assert isinstance(out, nn.utils.rnn.PackedSequence) and torch.equal(out.batch_sizes, packed.batch_sizes)
    torch.testing.assert_close(nn.utils.rnn.pad_packed_sequence(out, batch_first=True)[0], ys, **TOL)
    torch.testing.assert_close(finals, expected, **TOL)


@pytest.mark.parametrize("lengths", [None, [3, 2]])
def test_native_kernel_runs_in_training_mode_when_autograd_records(monkeypatch, lengths):
    """cuDNN saves what its backward needs only when called with train=True, and refuses the
    backward of an inference-mode call ("cudnn RNN backward can only be called in training
    mode", seen on an H200): the native backend must ask for training mode whenever autograd
    records, and for inference mode under no_grad."""
    seen = []
    kernel = rnndsl.native.NATIVE_MODES["LSTM"].kernel

    def spy(*args):
        packed = isinstance(args[1], torch.Tensor)  # (data, batch_sizes, hx, ...) against (input, hx, ...)
        seen.append(args[-2] if packed else args[-3])  # the `train` flag
        return kernel(*args)

    monkeypatch.setitem(rnndsl.native.NATIVE_MODES, "LSTM", dataclasses.replace(rnndsl.native.NATIVE_MODES["LSTM"],
                                                                          kernel=spy))
    net = make_recurrent("lstm", 3, [4], backend="native", save_hidden=False)
    x = torch.randn(3, 2, 3)
    lengths = None if lengths is None else torch.tensor(lengths)
    net(x, lengths=lengths)[0].sum().backward()
    with torch.no_grad():
        net(x, lengths=lengths)
    assert seen == [True, False]


@pytest.mark.parametrize("backend", ["script", "eager"])
@pytest.mark.parametrize("cell, bidirectional", [("lstm", False), ("gru", True), ("mingru", False), ("gla", False)])
def test_nan_and_inf_in_the_padding_reach_no_output_and_no_gradient(cell, backend, bidirectional):
    """As torch's packed sequences, which never read the padding: outputs past each sequence's end
    are zero and the gradients those of zero padding. (The weight GEMMs over all steps multiplied a
    padded input by its zero gradient: 0 * nan is nan, in every parameter's gradient.)"""
    torch.manual_seed(0)
    make = make_bidirectional if bidirectional else make_recurrent
    net = make(cell, 3, [4], backend=backend, save_hidden=False).double()
    lengths = torch.tensor([2, 5, 4])
    mask = torch.arange(5)[:, None] < lengths
    xs = randn(5, 3, 3) * mask[..., None]

    def run(inputs):
        net.zero_grad()
        inputs = inputs.detach().requires_grad_()
        outputs, _ = net(inputs, lengths=lengths)
        (outputs * randn(*outputs.shape).abs()).sum().backward()
        return outputs, inputs.grad, [p.grad.clone() for p in net.parameters()]

    torch.manual_seed(1)
    expected = run(xs)
    for padding in (float("nan"), float("inf")):
        torch.manual_seed(1)
        outputs, input_grad, grads = run(torch.where(mask[..., None], xs, padding))
        assert not outputs[~mask].any()
        torch.testing.assert_close(outputs, expected[0], **TOL)
        torch.testing.assert_close(input_grad, expected[1], **TOL)
        torch.testing.assert_close(grads, expected[2], **TOL)


def test_native_layer_with_a_mask_lengths_cannot_give_runs_the_cells_loop():
    """torch's kernels take a mask only as lengths of at least one step; the containers also allow
    padding before a real step (the step keeps the state) and a sequence of no step. The native
    layer packed any mask by its count of real steps: another sequence, silently."""
    torch.manual_seed(0)
    native = make_recurrent("gru", 4, [5], backend="native", save_hidden=False).double()
    script = make_recurrent("gru", 4, [5], backend="script", save_hidden=False).double()
    script.load_state_dict(native.state_dict())
    xs, state = randn(4, 3, 4), ((randn(3, 5),),)
    mask = torch.tensor([[True, True, False], [False, True, False], [True, True, False], [True, False, False]])
    (final, ), outputs = native.network(state, xs, mask)
    (expected_final, ), expected = script.network(state, xs, mask)
    torch.testing.assert_close(outputs, expected, **TOL)
    torch.testing.assert_close(final, expected_final, **TOL)
    torch.testing.assert_close(final[0][2], state[0][0][2], **TOL)  # no real step: the state as given


def test_native_state_dict_gives_the_weight_a_wrapper_computes_and_loading_refuses_before_copying():
    torch.manual_seed(0)
    net = make_recurrent("lstm", 3, [4], save_hidden=False).double()
    nn.utils.parametrizations.weight_norm(net.network.layers[0].cell, "weight_hh")
    reference = nn.LSTM(3, 4, dtype=F64)
    reference.load_state_dict(native_state_dict(net))
    xs = randn(5, 2, 3)
    torch.testing.assert_close(reference(xs)[0], net(xs)[0], **TOL)
    with pytest.raises(ValueError, match="weight_hh_l0: the cell's 'weight_hh' is computed by a wrapper"):
        load_native_state_dict(net, reference.state_dict())

    two = make_recurrent("lstm", 3, [4, 6])
    before = copy.deepcopy(two.state_dict())
    with pytest.raises(ValueError, match=r"weight_hh_l1 has shape \(16, 4\), but layer 1's 'weight_hh' has \(24, 6\)"):
        load_native_state_dict(two, nn.LSTM(3, 4, num_layers=2).state_dict())
    assert all(torch.equal(before[k], v) for k, v in two.state_dict().items())  # nothing copied


def test_weight_and_hidden_init_functions_misused():
    with pytest.raises(ValueError, match="winitfun is called with the whole network.*xavier_uniform_"):
        make_recurrent("lstm", 3, [4], winitfun=nn.init.xavier_uniform_)
    net = make_recurrent("lstm", 3, [4], hinitfun=lambda t: torch.full_like(t, 0.5))  # returns, not in place
    assert all(torch.equal(s, torch.full((2, 4), 0.5)) for s in net.initialize_hidden(2)[0])
    with pytest.raises(ValueError, match=r"hinitfun must fill .* shape \(2, 4\), got \(4,\)"):
        make_recurrent("lstm", 3, [4], hinitfun=lambda t: t[0]).initialize_hidden(2)


def test_setup_recurrent_carries_no_state_through_a_bidirectional_layer_by_default():
    """Carried over, the reverse direction's state would start each batch from the previous batch's
    first step; make_bidirectional already defaults to not saving."""
    from rnndsl.containers import Bidirectional, RecurrentTable, SequenceTable, setup_recurrent
    cell = rnndsl.load_cell("gru").build(input_size=3, hidden_size=4)
    forward_only = setup_recurrent(SequenceTable([RecurrentTable(cell)]))
    both = setup_recurrent(SequenceTable([Bidirectional(RecurrentTable(cell))]))
    assert forward_only.save_hidden and not both.save_hidden
    xs = torch.randn(3, 2, 3)
    torch.testing.assert_close(both(xs)[0], both(xs)[0])


def test_a_hidden_init_function_may_return_a_learnt_state():
    h0 = torch.zeros(4, requires_grad=True)
    net = make_recurrent("gru", 3, [4], save_hidden=False, hinitfun=lambda t: h0.expand_as(t))
    net(torch.randn(5, 2, 3))[0].sum().backward()
    assert h0.grad is not None and h0.grad.abs().sum() > 0


def test_the_native_layer_under_torch_compile_runs_a_mask_with_a_gap_as_the_cells_loop():
    torch.manual_seed(0)
    native = make_recurrent("gru", 4, [5], backend="native", save_hidden=False)
    xs, state = torch.randn(4, 2, 4), ((torch.randn(2, 5),),)
    mask = torch.tensor([[True, True], [False, True], [True, True], [True, False]])
    expected = rnndsl.scan(native.network.layers[0].cell, xs, state[0], mask)[0]
    compiled = torch.compile(lambda s, x, m: native.network(s, x, m)[1], backend="eager")
    torch.testing.assert_close(compiled(state, xs, mask), expected)
