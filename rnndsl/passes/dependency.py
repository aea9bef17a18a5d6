"""What each node depends on: parameters only, the input, or a state."""
from __future__ import annotations

from typing import Dict

from ..ir import Graph, Op, OpKind, Phase

_LEAF_PHASES = {Op.PARAM: Phase.ONCE, Op.HYPER: Phase.ONCE, Op.CONST: Phase.ONCE,
                Op.INPUT: Phase.PER_INPUT, Op.STATE: Phase.PER_STEP}


def dependency_phases(graph: Graph) -> Dict[str, Phase]:
    """The earliest phase each node could run in.

    Random ops draw fresh noise at every step, so they never run once per sequence; one
    of a parameter-only value (no batch, no time axis) runs in the loop, a fresh draw per step.
    """
    phases: Dict[str, Phase] = {}
    for node in graph.nodes:
        if node.op.kind is OpKind.LEAF:
            phases[node.name] = _LEAF_PHASES[node.op]
            continue
        phase = max((phases[name] for name in node.inputs), default=Phase.ONCE)
        if node.op.kind is OpKind.RANDOM:
            phase = max(phase, Phase.PER_INPUT if node.shape.batched else Phase.PER_STEP)
        phases[node.name] = phase
    return phases
