"""The backward derived from the equations (rnndsl/codegen/derivatives.py, rnndsl/codegen/backward.py,
rnndsl/derived.py).

- every op has a derivative rule;
- ``torch.autograd.gradcheck`` of the derived ``torch.autograd.Function`` for
  every stock and zoo cell, in float64, with and without a mask;
- equality with autograd through the plain compiled loop (values and all
  gradients), sizes drawn by hypothesis, float64 and float32 (oneDNN's GEMMs);
- when the derived path runs, and when the cell falls back to autograd;
- the switch, what ``rnndsl show --stage backward`` prints, and jit.save.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs

import rnndsl
from rnndsl import cli
from rnndsl.codegen.derivatives import DERIVATIVES
from rnndsl import opaque
from rnndsl.derived import DerivedSequence
from rnndsl.twin import buffers_of, parameters_of
from rnndsl.ir import Op, OpKind
from strategies import well_formed_cells

CELLS_DIR = Path(__file__).resolve().parent.parent / "cells"
CELLS = sorted(path.stem for path in CELLS_DIR.glob("*.cell"))
STOCK = ["lstm", "gru", "rnn_tanh", "rnn_relu", "rnn_sigmoid"]


def build(name: str, input_size: int, hidden: int, **options) -> torch.nn.Module:
    """A zoo cell as a time loop (cells linear in their state would otherwise run a parallel scan)."""
    spec = rnndsl.load_cell(CELLS_DIR / f"{name}.cell")
    if spec.graph.input.shape.dims[0].variables == ("hidden",):  # sru: the input size is the hidden size
        input_size = hidden
    if name == "slstm" and hidden % 2:  # it cuts hidden into 2 heads: head_dim = hidden / 2 must be whole
        hidden += 1
    return spec.build(input_size, hidden, scan="sequential", **options)


def inputs(cell, steps: int, batch: int, dtype=torch.float64, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    xs = torch.randn(steps, batch, cell.input_size, dtype=dtype, generator=generator)
    state = tuple(torch.randn(batch, size, dtype=dtype, generator=generator) for size in cell.state_sizes)
    mask = torch.rand(steps, batch, generator=generator) < 0.6
    return xs, state, mask


def run(cell, xs, state, mask, seed: int = 1, forward_sequence=None):
    """Outputs, final state, and the gradients of a random weighting of both wrt inputs and parameters,
    from ``forward_sequence(cell, xs, state, mask)`` (by default the cell's own)."""
    xs = xs.clone().requires_grad_(True)
    state = tuple(s.clone().requires_grad_(True) for s in state)
    if forward_sequence is None:
        outputs, final = cell.forward_sequence(xs, state, mask)
    else:
        outputs, final = forward_sequence(cell, xs, state, mask)
    results = list(outputs if isinstance(outputs, tuple) else (outputs,)) + list(final)
    generator = torch.Generator().manual_seed(seed)
    loss = sum((r * torch.randn(r.shape, dtype=r.dtype, generator=generator)).sum() for r in results)
    wrt = [xs, *state, *cell.parameters()]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)  # a cell may ignore its input
    return results, [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)], results[0].grad_fn


def test_every_computing_op_has_a_derivative():
    assert set(DERIVATIVES) == {op for op in Op if op.kind is not OpKind.LEAF}
    # Random ops hold in evaluation mode only: in training their per-step noise is not saved.
    assert {op for op, rule in DERIVATIVES.items() if not rule.in_training} == {Op.DROPOUT, Op.ZONEOUT}


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", CELLS)
def test_gradcheck_of_the_derived_function(name, masked):
    cell = build(name, 3, 2).double().eval()
    xs, state, mask = inputs(cell, steps=3, batch=2)
    mask = mask if masked else None

    def function(xs, *tensors):
        return DerivedSequence.apply(cell, xs, mask, len(state), *tensors)

    # The cell's own parameters: gradcheck perturbs them in place, where the cell reads them.
    arguments = [xs.requires_grad_(True), *(s.requires_grad_(True) for s in state), *cell.parameters()]
    assert torch.autograd.gradcheck(function, arguments, fast_mode=name not in STOCK)


@settings(max_examples=12, deadline=None)
@given(name=hs.sampled_from(CELLS), input_size=hs.integers(1, 5), hidden=hs.integers(1, 6),
       steps=hs.integers(1, 6), batch=hs.integers(1, 4), masked=hs.booleans(), seed=hs.integers(0, 1000))
def test_derived_backward_equals_autograd_of_the_loop(name, input_size, hidden, steps, batch, masked, seed):
    derived = build(name, input_size, hidden).double()
    loop = build(name, input_size, hidden, derived_backward=False).double()
    loop.load_state_dict(derived.state_dict())
    xs, state, mask = inputs(derived, steps, batch, seed=seed)
    mask = mask if masked else None
    got, expected = run(derived, xs, state, mask, seed), run(loop, xs, state, mask, seed)
    assert type(got[2]).__name__ == "DerivedSequenceBackward"
    assert type(expected[2]).__name__ != "DerivedSequenceBackward"
    for a, b in zip(got[0] + got[1], expected[0] + expected[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def through_the_compiled_op(cell, xs, state, mask):
    """What torch.compile runs for ``cell``'s sequence (rnndsl/opaque.py), called without dynamo: for an
    eager cell, its generated Python methods, which nothing else runs backward."""
    return opaque.forward_sequence(cell, xs, state, mask, parameters_of(cell), buffers_of(cell), saving=True)


@settings(max_examples=10, deadline=None)
@given(drawn=well_formed_cells(), input_size=hs.integers(1, 3), hidden=hs.integers(1, 3),
       steps=hs.integers(1, 4), masked=hs.booleans(), backend=hs.sampled_from(["script", "eager"]))
def test_random_cells_derive_the_same_gradients(drawn, input_size, hidden, steps, masked, backend):
    """Every op of the language, in random combinations (tests/strategies.py), evaluation mode; the
    derived backward in TorchScript (DerivedSequence) and in Python (the eager cell's, under torch.compile)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unused values are legal
        spec = rnndsl.load_source(drawn.source)[drawn.name]
    try:
        derived = spec.build(input_size, hidden, scan="sequential", backend=backend).double().eval()
    except ValueError:  # sizes this cell cannot take (e.g. its input must be as large as a state)
        return
    loop = spec.build(input_size, hidden, derived_backward=False, scan="sequential").double().eval()
    loop.load_state_dict(derived.state_dict())
    xs, state, mask = inputs(derived, steps, batch=2)
    mask = mask if masked else None
    got = run(derived, xs, state, mask, forward_sequence=None if backend == "script" else through_the_compiled_op)
    expected = run(loop, xs, state, mask)
    for a, b in zip(got[0] + got[1], expected[0] + expected[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("literal", [False, True], ids=["hyper", "literal"])
@pytest.mark.parametrize("k", [0.0, 1.0, 2.0, 3.0, -1.0, -2.0, 0.5, 2.5])
def test_the_derivative_of_a_power_is_torchs(k, literal):
    """d(a ** k)/da as torch's pow backward: zero for k == 0 everywhere, even at a == 0 (where
    k * a ** (k - 1) is 0 * inf), else k * a ** (k - 1). Whole-number k >= 0 meets bases exactly
    zero (an input of zeros, a state of zeros); the others, where a ** k is not finite or not
    real at zero or below, meet bases in (0, 1)."""
    exponent = repr(k) if literal else "k"
    zero_bases = k >= 0 and k.is_integer()
    a, b = ("w @ x", "h") if zero_bases else ("sigmoid(w @ x)", "sigmoid(h)")
    spec = rnndsl.load_source("cell t(x[input]) -> h {\n    state h[hidden]\n    hyper k = 1.0\n"
                              "    param w[hidden, input]\n"
                              f"    h' = tanh(({a}) ** {exponent} + pow({b}, {exponent}))\n}}\n")["t"]
    derived = spec.build(3, 4, scan="sequential", k=k).double()
    loop = spec.build(3, 4, scan="sequential", k=k, derived_backward=False).double()
    loop.load_state_dict(derived.state_dict())
    xs, state, mask = inputs(derived, steps=3, batch=2)
    if zero_bases:
        xs[0, 0], xs[2, 1] = 0.0, 0.0
        state[0][0, :2] = 0.0
    for masked in (None, mask):
        got, expected = run(derived, xs, state, masked), run(loop, xs, state, masked)
        assert type(got[2]).__name__ == "DerivedSequenceBackward"
        for a, b in zip(got[0] + got[1], expected[0] + expected[1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, hidden", [("lstm", 128), ("gru", 128), ("layernorm_lstm", 128), ("lstm", 256),
                                          ("lstm", 384)])
def test_float32_on_onednn_matches_autograd_of_the_loop(name, hidden):
    """Sizes large enough that the sequence's products go to oneDNN on CPUs where it serves them
    (rnndsl/kernels.py); at hidden 384 each step's too, with the recurrent weight prepacked, and at
    256 the forward step's on AVX-512."""
    derived = build(name, 96, hidden)
    loop = build(name, 96, hidden, derived_backward=False)
    loop.load_state_dict(derived.state_dict())
    xs, state, mask = inputs(derived, steps=5, batch=64, dtype=torch.float32)
    for masked in (None, mask):
        got, expected = run(derived, xs, state, masked), run(loop, xs, state, masked)
        for a, b in zip(got[0] + got[1], expected[0] + expected[1]):
            # float32 sums over steps and examples in another order: relative to the largest entry.
            assert (a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-6


def test_a_steps_product_goes_to_onednn_by_the_rule_of_the_cpus_kind():
    """A step's product (under 256 rows) takes oneDNN from a weight of 2^19 numbers; with AVX-512,
    from 2^18 when it widens (a cell's gates from its state), not when it narrows (the backward's)."""
    from rnndsl import kernels

    def weight(rows, columns):
        return torch.empty(rows, columns)

    for rule in (kernels._step_weight_to_onednn_avx2, kernels._step_weight_to_onednn_avx512):
        assert rule(weight(4 * 384, 384)) and rule(weight(384, 4 * 384))
        assert not rule(weight(4 * 200, 200)) and not rule(weight(256, 256))
    assert kernels._step_weight_to_onednn_avx512(weight(4 * 256, 256))
    assert not kernels._step_weight_to_onednn_avx512(weight(256, 4 * 256))
    assert not kernels._step_weight_to_onednn_avx2(weight(4 * 256, 256))
    # A sequence's product (256 rows or more) needs only a million multiply-adds, in float32 on CPU.
    assert kernels._onednn_fits(20 * 64, weight(4 * 200, 200))
    assert not kernels._onednn_fits(20 * 64, weight(4 * 200, 200).double())
    assert not kernels._onednn_fits(2, weight(4 * 200, 200))
    # On AMD's Zen 5 every step's product (of a million multiply-adds or more) takes oneDNN.
    assert kernels._step_weight_to_onednn_any(weight(4 * 200, 200))
    # The rule of this machine's kind, and what it does to a step's weight here.
    avx512, zen5 = kernels._has_avx512(), kernels._amd_family() >= 26
    assert kernels._step_weight_to_onednn is (kernels._step_weight_to_onednn_any if zen5 else
                                              kernels._step_weight_to_onednn_avx512 if avx512
                                              else kernels._step_weight_to_onednn_avx2)
    with torch.no_grad():
        packed = kernels.prepack(torch.randn(4 * 256, 256), 64)
    assert packed.is_mkldnn == (kernels._USE_ONEDNN and (avx512 or zen5))
    # Weights' gradients: oneDNN on AMD CPUs with AVX-512 only.
    assert kernels.outer_sum is (kernels._outer_sum_onednn if kernels._USE_ONEDNN and avx512
                                 else kernels._outer_sum_matmul)
    grad, vector = torch.randn(320, 4 * 256), torch.randn(320, 256)  # a batch of windows: oneDNN's case
    wide = torch.randn(320, 8 * 256)
    # Its inner-product weight gradient up to 2**21 numbers of grad (a view too), its GEMM on
    # transposed copies above.
    cases = [(grad, vector), (wide.narrow(1, 256, 4 * 256), vector),
             (torch.randn(1280, 8 * 256), torch.randn(1280, 2 * 256))]
    with torch.no_grad():  # (under autograd it takes torch's matmul, which has a derivative)
        for grad, vector in cases:
            torch.testing.assert_close(kernels._outer_sum_onednn(grad, vector), grad.t() @ vector,
                                       rtol=1e-4, atol=1e-3)


def test_gradients_reach_everything_from_the_final_state_or_the_outputs_alone():
    derived = build("lstm", 3, 4).double()
    loop = build("lstm", 3, 4, derived_backward=False).double()
    loop.load_state_dict(derived.state_dict())
    xs, state, _ = inputs(derived, steps=4, batch=3)
    for pick in (lambda out, final: final[1].sum(), lambda out, final: out.sum()):
        grads = []
        for cell in (derived, loop):
            x = xs.clone().requires_grad_(True)
            outputs, final = cell.forward_sequence(x, state)
            grads.append(torch.autograd.grad(pick(outputs, final), [x, *cell.parameters()]))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_fully_padded_sequence_keeps_its_state_and_gets_its_gradient_through():
    cell = build("gru", 3, 4).double()
    xs, state, _ = inputs(cell, steps=3, batch=2)
    mask = torch.tensor([[True, False]] * 3)
    h0 = state[0].clone().requires_grad_(True)
    outputs, (h,) = cell.forward_sequence(xs, (h0,), mask)
    assert torch.equal(h[1], h0[1]) and not outputs[:, 1].any()
    (grad,) = torch.autograd.grad(h.sum(), h0)
    assert torch.equal(grad[1], torch.ones(4, dtype=torch.float64))


ADDITIVE = """
cell additive(x[input]) -> h {
    state h[hidden]
    param U[hidden, input]
    h' = tanh(U @ x) + h
}
"""


@pytest.mark.parametrize("name", ["lstm", "gru", "additive"])
@pytest.mark.parametrize("masked", [False, True])
def test_the_results_are_tensors_of_their_own_that_a_caller_may_edit_in_place(name, masked):
    # The saving forward computes each output and next state straight into its buffers; the results
    # must still be no views of them (autograd refuses in-place edits of a Function's views), and
    # an edit after the call must not reach what the backward reads. (additive: a state the
    # backward does not keep, whose next value is the output.)
    if name == "additive":
        spec = rnndsl.load_source(ADDITIVE)["additive"]
        derived = spec.build(3, 4, scan="sequential").double()
        loop = spec.build(3, 4, scan="sequential", derived_backward=False).double()
    else:
        derived = build(name, 3, 4).double()
        loop = build(name, 3, 4, derived_backward=False).double()
    loop.load_state_dict(derived.state_dict())
    xs, state, mask = inputs(derived, steps=4, batch=3)
    grads = []
    for cell in (derived, loop):
        x = xs.clone().requires_grad_(True)
        outputs, final = cell.forward_sequence(x, state, mask if masked else None)
        if cell is derived:
            assert outputs.grad_fn is not None and all(t._base is None for t in (outputs, *final))
        outputs.mul_(2)
        for value in final:
            value.add_(1)
        loss = outputs.pow(2).sum() + sum(value.pow(2).sum() for value in final)
        grads.append(torch.autograd.grad(loss, [x, *cell.parameters()]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


INPUT_AS_ADDEND = """
cell plain(x[hidden]) -> h {
    state h[hidden]
    param W[hidden, hidden]
    h' = tanh(W @ h + x)
}
cell halves(x[2*hidden]) -> h {
    state h[hidden]
    param W[hidden, hidden]
    a, b = chunk(x, 2)
    h' = tanh(W @ h + a) * sigmoid(b)
}
cell projected(x[input]) -> h {
    state h[hidden]
    param W[hidden, hidden], U[hidden, input]
    h' = tanh(W @ h + U @ x)
}
"""


@pytest.mark.parametrize("name", ["plain", "halves", "projected"])
@pytest.mark.parametrize("masked", [False, True])
def test_the_saving_forward_never_writes_into_the_callers_input(name, masked):
    # The step's GEMM may add into its row of a whole-sequence value in place (accumulate): only
    # into one rnndsl computed, never into the input or a view of it (a chunk of x).
    spec = rnndsl.load_source(INPUT_AS_ADDEND)[name]
    derived = spec.build({"plain": 4, "halves": 8, "projected": 3}[name], 4).double()
    loop = spec.build(derived.input_size, 4, derived_backward=False).double()
    loop.load_state_dict(derived.state_dict())
    xs, state, mask = inputs(derived, steps=5, batch=3)
    mask = mask if masked else None
    for requires_grad in (True, False):  # the derived path, with and without the input's gradient
        x = xs.clone().requires_grad_(requires_grad)
        outputs, _ = derived.forward_sequence(x, state, mask)
        outputs.sum().backward()
        assert type(outputs.grad_fn).__name__ == "DerivedSequenceBackward"
        assert torch.equal(x.detach(), xs)
    got, expected = run(derived, xs, state, mask), run(loop, xs, state, mask)
    for a, b in zip(got[0] + got[1], expected[0] + expected[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_parameters_train_without_an_input_gradient():
    cell = build("lstm", 3, 4)
    xs, state, _ = inputs(cell, steps=3, batch=2, dtype=torch.float32)
    outputs, _ = cell.forward_sequence(xs, state)
    outputs.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in cell.parameters())
    # Two parameters that share one gradient tensor (bias_ih and bias_hh) still get their own.
    assert cell.bias_ih.grad.data_ptr() != cell.bias_hh.grad.data_ptr()


def test_when_the_derived_backward_runs():
    cell = build("lstm", 3, 4)
    xs, state, _ = inputs(cell, steps=2, batch=2, dtype=torch.float32)
    assert type(cell.forward_sequence(xs, state)[0].grad_fn).__name__ == "DerivedSequenceBackward"
    with torch.no_grad():
        assert cell.forward_sequence(xs, state)[0].grad_fn is None
    for parameter in cell.parameters():
        parameter.requires_grad_(False)
    assert cell.forward_sequence(xs, state)[0].grad_fn is None  # nothing needs a gradient
    assert type(cell.forward_sequence(xs.requires_grad_(True), state)[0].grad_fn).__name__ == \
        "DerivedSequenceBackward"


def test_rnndsl_scan_goes_through_the_derived_backward(monkeypatch):
    calls = []
    original = DerivedSequence.backward

    def counted(ctx, *grads):
        calls.append(len(grads))
        return original(ctx, *grads)

    monkeypatch.setattr(DerivedSequence, "backward", staticmethod(counted))
    cell = build("gru", 3, 4)
    xs, state, _ = inputs(cell, steps=2, batch=2, dtype=torch.float32)
    outputs, _ = rnndsl.scan(cell, xs, state)
    outputs.sum().backward()
    assert calls == [2]  # one output, one state


RANDOM_CELL = """
cell noisy(x[input]) -> h {
    state h[hidden]
    param W[hidden, input], U[hidden, hidden]
    hyper p = 0.5
    h' = zoneout(tanh(W @ x + dropout(U @ h, p)), h, p)
}
"""


def test_random_ops_train_through_autograd_and_evaluate_through_the_derived_backward():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = rnndsl.load_source(RANDOM_CELL)["noisy"]
    cell = spec.build(3, 4).double()
    loop = spec.build(3, 4, derived_backward=False).double().eval()
    loop.load_state_dict(cell.state_dict())
    xs, state, _ = inputs(cell, steps=3, batch=2)
    assert type(run(cell.train(), xs, state, None)[2]).__name__ != "DerivedSequenceBackward"
    got, expected = run(cell.eval(), xs, state, None), run(loop, xs, state, None)
    assert type(got[2]).__name__ == "DerivedSequenceBackward"
    for a, b in zip(got[0] + got[1], expected[0] + expected[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


MANY_OPS_CELL = """
cell many(x[input]) -> y, h {
    state h[hidden], c[hidden]
    param W[2*hidden, input], U[2*hidden, hidden], b[hidden], s[hidden], g[hidden], n[hidden]
    hyper k = 0.3
    a, z = chunk(W @ x + U @ h, 2)
    d = exp(-abs(a)) / (1 + softplus(z)) - sqrt(c * c + 1) * s + log(1 + sigmoid(b))
    e = layernorm(silu(d) + relu(a) * k, g, n)
    u, v = chunk(concat(e, tanh(z)), 2)
    y = u * v - b + 0.5 * sum(h) - mean(c)
    h' = tanh(y)
    c' = c
}
"""


def assert_derived_equals_the_loop(spec, backend: str, **options) -> None:
    """The derived backward (TorchScript's, or an eager cell's through the compiled op) against
    autograd of the compiled loop, values and all gradients, with and without a mask."""
    derived = spec.build(3, 4, backend=backend, **options).double()
    loop = spec.build(3, 4, derived_backward=False, **options).double()
    derived.load_state_dict(loop.state_dict())
    xs, state, mask = inputs(derived, steps=3, batch=2)
    forward_sequence = None if backend == "script" else through_the_compiled_op
    for masked in (None, mask):
        got, expected = run(derived, xs, state, masked, forward_sequence=forward_sequence), run(loop, xs, state, masked)
        assert ("DerivedSequence" if backend == "script" else "rnndsl_sequence") in type(got[2]).__name__
        for a, b in zip(got[0] + got[1], expected[0] + expected[1]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("disable", [(), ("hoist",), ("cse", "dce", "hoist", "merge_matmuls", "reassociate")])
@pytest.mark.parametrize("backend", ["script", "eager"])
def test_every_op_with_and_without_the_passes(disable, backend):
    """Parameter vectors in the loop, a state passed through, two outputs, layer norm, concat, sums."""
    assert_derived_equals_the_loop(rnndsl.load_source(MANY_OPS_CELL)["many"], backend, disable=disable)


@pytest.mark.parametrize("backend", ["script", "eager"])
def test_an_output_that_is_a_state_kept_in_a_trail(backend):
    """`y = h` where the backward keeps `h`'s steps in a trail (its next value is computed into
    it): the output still gets a buffer of its own."""
    spec = rnndsl.load_source("""
        cell kept(x[input]) -> y {
            state h[hidden]
            h' = log(1 + softplus(h)) + sum(x)
            y = h
        }""")["kept"]
    assert_derived_equals_the_loop(spec, backend)


def test_the_switch_leaves_the_derived_methods_out():
    cell = build("rnn_tanh", 3, 4, derived_backward=False)
    assert not hasattr(type(cell), "backward_sequence")
    assert hasattr(type(build("rnn_tanh", 3, 4)), "backward_sequence")


def test_show_prints_the_backward(capsys):
    assert cli.main(["show", "lstm", "--stage", "backward"]) == 0
    printed = capsys.readouterr().out
    assert "def forward_sequence_saving(" in printed and "def backward_sequence(" in printed
    assert printed.strip() == rnndsl.load_cell("lstm").backward_code().strip()


def test_a_saved_cell_loads_without_rnndsl_and_trains_through_its_loop():
    cell = build("lstm", 3, 4)
    buffer = io.BytesIO()
    torch.jit.save(cell, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    assert type(loaded) is torch.jit.RecursiveScriptModule
    xs, state, _ = inputs(cell, steps=3, batch=2, dtype=torch.float32)
    outputs, final = loaded.forward_sequence(xs.requires_grad_(True), state, None)
    expected, _ = cell.forward_sequence(xs, state)
    torch.testing.assert_close(outputs, expected, rtol=1e-5, atol=1e-6)
    outputs.sum().backward()
    assert xs.grad is not None


def test_a_number_computed_from_hypers_is_recomputed_not_saved():
    """`(decay * 0.5) * h`: the coefficient is a Python number, which the saved list (tensors) cannot
    hold; the backward recomputes it."""
    spec = rnndsl.load_source(
        "cell t(x[input]) -> h {\n    state h[hidden]\n    hyper decay = 0.9\n    param w[hidden, input]\n"
        "    h' = (decay * 0.5) * h + w @ x\n}\n")["t"]
    derived = spec.build(3, 4, scan="sequential", decay=0.7).double()
    loop = spec.build(3, 4, scan="sequential", decay=0.7, derived_backward=False).double()
    loop.load_state_dict(derived.state_dict())
    xs, state, mask = inputs(derived, steps=6, batch=2)
    got, expected = run(derived, xs, state, mask), run(loop, xs, state, mask)
    assert isinstance(got[2], torch.autograd.function.BackwardCFunction)  # the derived backward ran
    for a, b in zip(got[0] + got[1], expected[0] + expected[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_numbers_built_on_numbers_are_computed_once_each():
    """Inlined, `a1 = a0 * a0, a2 = a1 * a1, ...` would double the backward's code at every line."""
    chain = ["a0 = k * k"] + [f"a{i} = a{i - 1} * a{i - 1}" for i in range(1, 40)]
    spec = rnndsl.load_source("cell t(x[input]) -> h {\n    state h[hidden]\n    hyper k = 1.0\n"
                              "    param w[hidden, input]\n    " + "\n    ".join(chain) +
                              "\n    h' = a39 * h + w @ x\n}\n")["t"]
    assert len(spec.backward_code()) < 10_000
    derived = spec.build(3, 4, scan="sequential").double()  # k = 1: the coefficient stays 1
    loop = spec.build(3, 4, scan="sequential", derived_backward=False).double()
    loop.load_state_dict(derived.state_dict())
    xs, state, mask = inputs(derived, steps=3, batch=2)
    got, expected = run(derived, xs, state, mask), run(loop, xs, state, mask)
    for a, b in zip(got[0] + got[1], expected[0] + expected[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _backward_loop(name: str) -> str:
    """The time loop of a stock or zoo cell's derived backward, as code."""
    code = rnndsl.load_cell(CELLS_DIR / f"{name}.cell").backward_code()
    lines = code[code.index("    for t in", code.index("def backward_sequence")):].splitlines()
    body = [line for line in lines[1:] if not line.startswith(" " * 8)]  # the first line after the loop
    return "\n".join(lines[:lines.index(body[0])] if body else lines)


@pytest.mark.parametrize("name", ["lstm", "gru", "cifg_lstm"])
def test_gate_gradients_are_written_into_the_steps_buffer_row_without_a_cat(name):
    loop = _backward_loop(name)
    assert "grad_input=" in loop and "torch.cat(" not in loop


def test_a_part_whose_gradient_is_a_sum_is_joined_by_cat_into_the_buffer_row():
    # janet's gate gradient adds two terms: no single op writes it, so its join copies it in
    loop = _backward_loop("janet")
    assert "grad_input=" not in loop and "torch.cat(" in loop and ", out=" in loop


def test_no_two_gradients_share_memory(tmp_path):
    # h' = relu(x + h + b): the state's gradient is the first row of the buffer that is the input's
    path = tmp_path / "residual.cell"
    path.write_text("cell residual(x[hidden]) -> h {\n    state h[hidden]\n    param b[hidden]\n"
                    "    h' = relu(x + h + b)\n}\n")
    for cell in (rnndsl.load_cell(path).build(4, 4, scan="sequential"), build("lstm", 3, 4)):
        xs = torch.randn(3, 2, cell.input_size, requires_grad=True)
        state = tuple(torch.randn(2, size, requires_grad=True) for size in cell.state_sizes)
        outputs, _ = cell.forward_sequence(xs, state, None)
        grads = torch.autograd.grad(outputs.sum(), [xs, *state, *cell.parameters()])
        storages = [grad.untyped_storage().data_ptr() for grad in grads]
        assert len(set(storages)) == len(storages)  # the LSTM's two bias gradients are one sum
