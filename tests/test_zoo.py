"""The cell zoo (cells/*.cell) against hand-written references (tests/references.py),
and the language's random ops: dropout (with a mask fixed over the sequence) and zoneout.

Every cell, on every backend, in float64: outputs, next states and gradients
with respect to the input, the state and every parameter, for one step and over
a sequence through ``rnndsl.scan``.
"""
from __future__ import annotations

import functools
from typing import Dict, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs

import rnndsl
from rnndsl.options import CELL_BACKENDS as BACKENDS
from rnndsl.scan import python_scan
from references import REFERENCES, compare_with_reference

CELLS = sorted(REFERENCES)
TOLERANCE = dict(rtol=1e-10, atol=1e-12)
SETTINGS = settings(max_examples=6, deadline=None)


@functools.lru_cache(maxsize=None)
def built(name: str, input_size: int, hidden_size: int, backend: str) -> torch.nn.Module:
    """Built once per size; each example sets the parameters it draws."""
    return rnndsl.load_cell(name).build(input_size, hidden_size, backend).double()


@hs.composite
def problems(draw, name: str) -> dict:
    # slstm cuts hidden into heads (2 by default): head_dim = hidden / heads must be whole.
    hidden = draw(hs.integers(1, 8)) * 2 if name == "slstm" else draw(hs.integers(1, 16))
    input_size = hidden if name == "sru" else draw(hs.integers(1, 16))
    return dict(batch=draw(hs.integers(1, 6)), input_size=input_size, hidden=hidden,
                steps=draw(hs.integers(1, 5)), masked=draw(hs.booleans()),
                seed=draw(hs.integers(0, 2 ** 31 - 1)))


def _compare(name: str, problem: dict, backend: str, sequence: bool) -> None:
    cell = built(name, problem["input_size"], problem["hidden"], backend)
    compare_with_reference(cell, REFERENCES[name], batch=problem["batch"], steps=problem["steps"],
                           masked=problem["masked"], seed=problem["seed"], sequence=sequence,
                           tolerance=TOLERANCE, label=f"{name} {backend}")


@pytest.mark.parametrize("name", CELLS)
@SETTINGS
@given(data=hs.data())
def test_cell_matches_reference(name: str, data) -> None:
    """One step, and a sequence through rnndsl.scan (the cell's compiled loop)."""
    problem = data.draw(problems(name))
    for backend in BACKENDS:
        _compare(name, problem, backend, sequence=False)
        _compare(name, problem, backend, sequence=True)


def test_parameter_names_and_states() -> None:
    """The names models carry between libraries, and the order of the states."""
    expected = {
        "mingru": (("h",), {"weight_z": (4, 3), "bias_z": (4,), "weight_h": (4, 3), "bias_h": (4,)}),
        "indrnn": (("h",), {"weight_ih": (4, 3), "bias_ih": (4,), "weight_hh": (4,)}),
        "qrnn": (("c",), None),
        "peephole_lstm": (("h", "c"), {"weight_ih": (16, 3), "weight_hh": (16, 4), "bias_ih": (16,),
                                       "bias_hh": (16,), "peephole_i": (4,), "peephole_f": (4,),
                                       "peephole_o": (4,)}),
        "cifg_lstm": (("h", "c"), {"weight_ih": (12, 3), "weight_hh": (12, 4), "bias_ih": (12,),
                                   "bias_hh": (12,)}),
        "layernorm_lstm": (("h", "c"), {"weight_ih": (16, 3), "weight_hh": (16, 4),
                                        "layernorm_ih_weight": (16,), "layernorm_ih_bias": (16,),
                                        "layernorm_hh_weight": (16,), "layernorm_hh_bias": (16,),
                                        "layernorm_c_weight": (4,), "layernorm_c_bias": (4,)}),
    }
    for name, (states, shapes) in expected.items():
        assert rnndsl.load_cell(name).state_names == states
        if shapes is not None:
            cell = built(name, 3, 4, "eager")
            assert {k: tuple(v.shape) for k, v in cell.named_parameters()} == shapes
    norm = rnndsl.load_cell("layernorm_lstm").build(3, 4)
    for key, value in norm.named_parameters():
        if key.startswith("layernorm"):
            assert torch.all(value == (1.0 if key.endswith("weight") else 0.0)), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_sru_refuses_input_size_other_than_hidden(backend: str) -> None:
    with pytest.raises(ValueError, match=r"sru .*`x\[hidden\]`.*input_size must be hidden_size = 8; "
                                         r"got input_size=4"):
        rnndsl.load_cell("sru").build(4, 8, backend)


# Cells whose paper's equations overflow at such inputs, as their reference implementations do.
OVERFLOWS_BY_DESIGN = {
    "slstm": "sLSTM's normalizer n' = f n + exp(i~ - m') starts from 0 and underflows when the input gate's "
             "pre-activation is 1e4 below the forget gate's log: c'/n' is then 0/0",
}


@pytest.mark.parametrize("name", CELLS)
def test_cells_stay_finite_for_large_inputs(name: str) -> None:
    """float32, inputs of magnitude 1e4: values and gradients (minLSTM's f / (f + i) is the risk)."""
    if name in OVERFLOWS_BY_DESIGN:
        pytest.skip(OVERFLOWS_BY_DESIGN[name])
    torch.manual_seed(0)
    for backend in BACKENDS:
        cell = rnndsl.load_cell(name).build(8, 8, backend)
        xs = (1e4 * torch.randn(6, 3, 8).sign()).requires_grad_()
        state = tuple(torch.zeros(3, size, requires_grad=True) for size in cell.state_sizes)
        outputs, final = rnndsl.scan(cell, xs, state)
        step_state, step_output = cell(state, xs[0])
        values = [outputs, *final, step_output, *step_state]
        grads = torch.autograd.grad(sum(v.sum() for v in values), [xs, *state, *cell.parameters()])
        for value in values + list(grads):
            assert torch.isfinite(value).all(), f"{name} {backend}"


# Random ops ----------------------------------------------------------------------

DROPOUT_PROBE = """
# y shows the recurrent dropout mask (h stays at its initial ones); z the input dropout's.
# The probability is computed (p = 0.5), so the mask drawn before the loop must compute it too.
cell probe(x[hidden]) -> y, z {
    state h[hidden]
    hyper q = 0.25
    y = dropout(h, 2 * q)
    z = dropout(x, 2 * q)
    h' = h + 0 * x
}

cell zone(x[hidden]) -> h {
    state h[hidden]
    hyper p = 0.3
    h' = zoneout(x, h, p)
}
"""


@functools.lru_cache(maxsize=None)
def _probe_specs() -> Dict[str, rnndsl.CellSpec]:
    return rnndsl.load_source(DROPOUT_PROBE)


def _probe(backend: str, steps: int = 5, batch: int = 40, hidden: int = 50,
           **options) -> Tuple[torch.nn.Module, torch.Tensor, Tuple[torch.Tensor, ...]]:
    cell = _probe_specs()["probe"].build(hidden, hidden, backend, **options)
    return cell, torch.ones(steps, batch, hidden), (torch.ones(batch, hidden),)


@pytest.mark.parametrize("disable", [(), ("hoist",)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_dropout_mask_is_drawn_once_per_sequence(backend: str, disable: Tuple[str, ...]) -> None:
    torch.manual_seed(0)
    cell, xs, state = _probe(backend, fixed_dropout_mask=True, disable=disable)
    (y, z), _ = rnndsl.scan(cell, xs, state)
    assert all(torch.equal(y[t], y[0]) for t in range(1, len(y)))
    assert set(y.unique().tolist()) == {0.0, 2.0}  # kept units scaled by 1 / (1 - p)
    assert abs((y == 0).double().mean().item() - 0.5) < 0.05
    assert not torch.equal(y[0], y[0].flip(0))  # one mask per example
    assert not torch.equal(z[1], z[0])  # dropout of the input alone still draws per step
    (y_again, _), _ = rnndsl.scan(cell, xs, state)
    assert not torch.equal(y_again[0], y[0])  # a new sequence, a new mask


def test_a_fixed_mask_is_refused_where_the_cell_runs_a_step_at_a_time():
    """Only forward_sequence draws a mask per sequence; return_all_states, a forward hook or a stack
    of cells in one RecurrentTable step the cell through its call, which drew a new mask at every
    step, silently. Refused in training; in eval, where dropout is off, they run."""
    cell, xs, state = _probe("eager", fixed_dropout_mask=True)
    stepped = {"return_all_states": lambda: rnndsl.RecurrentTable(cell, return_states=True)(state, xs),
               "a forward hook": lambda: (cell.register_forward_hook(lambda *args: None),
                                          rnndsl.scan(cell, xs, state))}
    for run in stepped.values():
        cell.train()
        with pytest.raises(ValueError, match="fixed_dropout_mask=True, which only its whole-sequence method keeps"):
            run()
        cell.eval()
        run()
    with pytest.raises(TypeError, match=r"fixed_dropout_mask must be True or False \(one for every layer\)"):
        rnndsl.make_recurrent("janet", 3, [4, 4], fixed_dropout_mask=[True, False])


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_mask_is_redrawn_each_step_by_default(backend: str) -> None:
    torch.manual_seed(0)
    cell, xs, state = _probe(backend)
    (y, _), _ = rnndsl.scan(cell, xs, state)
    assert not torch.equal(y[1], y[0])


@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_is_identity_in_eval(backend: str, fixed: bool) -> None:
    cell, xs, state = _probe(backend, fixed_dropout_mask=fixed)
    cell.eval()
    (y, z), _ = rnndsl.scan(cell, xs, state)
    (h,), (y_step, z_step) = cell(state, xs[0])
    for value in (y, z, y_step, z_step):
        assert torch.equal(value, torch.ones_like(value))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zoneout_keeps_old_units_with_probability_p(backend: str) -> None:
    torch.manual_seed(0)
    cell = _probe_specs()["zone"].build(50, 50, backend)
    old, new = torch.zeros(200, 50), torch.ones(200, 50)
    (h,), _ = cell((old,), new)
    assert set(h.unique().tolist()) <= {0.0, 1.0}
    assert abs((h == 0).double().mean().item() - 0.3) < 0.02  # 10 000 units: 4.4 standard deviations
    cell.eval()
    (h,), _ = cell((old,), new)
    assert torch.equal(h, new)


def test_dropout_of_a_parameter_vector_draws_per_step_in_the_loop():
    spec = rnndsl.load_source("""
        cell c(x[input]) -> h {
            state h[hidden]
            param W[hidden, input], b[hidden]
            h' = tanh(W @ x + h * dropout(b, 0.5))
        }""")["c"]
    for backend in ("script", "eager"):
        cell = spec.build(3, 4, backend=backend).train()
        xs, state = torch.randn(6, 2, 3), (torch.ones(2, 4),)
        outputs, _ = rnndsl.scan(cell, xs, state)
        assert outputs.shape == (6, 2, 4) and torch.isfinite(outputs).all()
        cell.eval()
        torch.testing.assert_close(rnndsl.scan(cell, xs, state)[0], python_scan(cell, xs, state)[0])
