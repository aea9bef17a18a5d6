"""Dependency analysis: what each value varies with (parameters only, per-sequence inputs, the
inputs read at every step, or a state).

An analysis, not a schedule: the hoisting pass (rnndsl/passes/hoist.py) turns it into
the phase each node runs in, and the code generators read it where the schedule may
have been switched off (with hoisting disabled every node runs at every step).
"""
from __future__ import annotations

import enum
from typing import Dict

from .ir import Graph, Op, OpKind


class Dependence(enum.IntEnum):
    """What a value varies with, from least to most."""

    PARAMETERS = 0  # parameters, hyper-parameters and constants only: the same at every step
    SEQUENCE = 1    # per-sequence inputs too: the same at every step, but per example
    INPUT = 2       # an input read at every step but no state: every step can be computed before the loop
    STATE = 3       # a state (or a fresh draw at every step): only step by step


_LEAF_DEPENDENCES = {Op.PARAM: Dependence.PARAMETERS, Op.BUFFER: Dependence.PARAMETERS, Op.HYPER: Dependence.PARAMETERS,
                     Op.CONST: Dependence.PARAMETERS, Op.SEQUENCE_INPUT: Dependence.SEQUENCE,
                     Op.INPUT: Dependence.INPUT, Op.STATE: Dependence.STATE}


def dependencies(graph: Graph) -> Dict[str, Dependence]:
    """What each node's value varies with.

    Random ops draw fresh noise at every step, so they never count as parameters only: one of
    a value read at every step varies like the input (all steps' draws can be made at once, over
    its time axis); one of a value without a time axis (parameters only, or a per-sequence input's)
    counts as STATE, a fresh draw per step.
    """
    found: Dict[str, Dependence] = {}
    for node in graph.nodes:
        if node.op.kind is OpKind.LEAF:
            found[node.name] = _LEAF_DEPENDENCES[node.op]
            continue
        dependence = max((found[name] for name in node.inputs), default=Dependence.PARAMETERS)
        if node.op.kind is OpKind.RANDOM:
            dependence = Dependence.INPUT if dependence is Dependence.INPUT else Dependence.STATE
        found[node.name] = dependence
    return found
