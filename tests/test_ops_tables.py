"""Per-op knowledge lives in one table per concern: every op must have an entry in each."""
from __future__ import annotations

from rnndsl.codegen.base import EMITTERS, NUMBER_EMITTERS
from rnndsl.codegen.derivatives import DERIVATIVES
from rnndsl.codegen.precision import PRECISION
from rnndsl.ir import Op, OpKind
from rnndsl.ops import FUNCTIONS, NUMBER_OPS, SHAPE_RULES

COMPUTING_OPS = [op for op in Op if op.kind is not OpKind.LEAF]


def test_every_op_has_a_shape_rule_an_emitter_a_derivative_and_an_autocast_rule():
    assert set(SHAPE_RULES) == set(COMPUTING_OPS)
    assert set(EMITTERS) == set(COMPUTING_OPS)
    assert set(DERIVATIVES) == set(COMPUTING_OPS)
    assert set(PRECISION) == set(COMPUTING_OPS)


def test_every_function_names_a_computing_op():
    assert all(function.op in COMPUTING_OPS for function in FUNCTIONS.values())


def test_every_op_that_computes_on_numbers_has_a_number_emitter():
    assert set(NUMBER_EMITTERS) == set(NUMBER_OPS)
