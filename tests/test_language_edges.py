"""Edges of the language and the compiler (issue 11, section 4): names, numbers and sizes at the
limits, build-time hyper-parameters, error positions, the file cache and the compiled-class store.

Each test failed before its fix; each builds small cells on both backends where it matters.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import rnndsl
from rnndsl import CellError
from rnndsl.cellspec import load_source
from rnndsl.codegen import validate_source
from rnndsl.ir import IRError

BACKENDS = ("eager", "script")


def cell_source(*lines: str) -> str:
    """A one-state cell ``c`` with a matrix ``W``, then ``lines``."""
    return "\n".join(["cell c(x[input]) -> h {", "  state h[hidden]", "  param W[hidden, input]",
                      *(f"  {line}" for line in lines), "}", ""])


def load(source: str) -> rnndsl.CellSpec:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rnndsl.CellWarning)
        return load_source(source)["c"]


@pytest.mark.parametrize("name", ["lambda_", "_", "_1", "x_", "a_b_"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_names_the_checker_accepts_build_and_compute(name, backend):
    spec = load(cell_source(f"{name} = tanh(W @ x)", f"h' = {name} + h"))
    cell = spec.build(3, 4, backend)
    xs, h = torch.randn(5, 2, 3), torch.zeros(2, 4)
    outputs, (final,) = cell.forward_sequence(xs, (h,))
    for x in xs:
        (h,), _ = cell((h,), x)
    torch.testing.assert_close(final, h)
    assert "__" not in cell.code


def test_trailing_underscore_hypers_params_and_states_build():
    spec = load(cell_source("hyper beta_ = 0.5", "param g_[hidden] = 1.0", "state s_[hidden]",
                            "s_' = tanh(W @ x) * g_", "h' = s_' * beta_ + h"))
    for backend in BACKENDS:
        spec.build(3, 4, backend)


def test_name_holding_double_underscore_is_a_cell_error_at_the_name():
    with pytest.raises(CellError) as error:
        load(cell_source("a__b = tanh(W @ x)", "h' = a__b"))
    assert (error.value.line, error.value.column) == (4, 3)
    assert "`__`" in error.value.message and "a_b" in error.value.hint


def test_keyword_hint_names_a_name_that_builds():
    with pytest.raises(CellError) as error:
        load(cell_source("lambda = tanh(W @ x)", "h' = lambda"))
    suggested = error.value.hint.split("`")[1]
    load(cell_source(f"{suggested} = tanh(W @ x)", f"h' = {suggested}")).build(3, 4, "script")


def test_guard_refuses_a_number_running_into_a_name():
    with pytest.raises(IRError, match="runs into"):
        validate_source("y = 1_seq\n")
    assert validate_source("y = 1.0 + x_1\n")
