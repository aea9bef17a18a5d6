"""Hoist what does not depend on a state out of the time loop.

Before (every node runs at every step)::

    matmul = matmul(weight_ih, x)          matmul_1 = matmul(weight_hh, h)
    bias = add(bias_ih, bias_hh)           gates = add(add(matmul, bias), matmul_1)

After: ``bias`` runs once per sequence (parameters only); ``matmul`` and the
sum with ``bias`` run once for all steps as one ``(T*batch) x input`` GEMM
(input only); only ``matmul_1`` and ``gates`` stay in the loop.
"""
from __future__ import annotations

from dataclasses import replace

from ..dependency import Dependence, dependencies
from ..ir import Graph, Phase

# The earliest phase a value can run in, by what it varies with.
_EARLIEST_PHASE = {Dependence.PARAMETERS: Phase.ONCE, Dependence.INPUT: Phase.PER_INPUT,
                   Dependence.STATE: Phase.PER_STEP}


def hoist_invariants(graph: Graph) -> Graph:
    found = dependencies(graph)
    return graph.with_nodes((replace(node, phase=_EARLIEST_PHASE[found[node.name]]) for node in graph.nodes),
                            "hoist")
