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

from ..ir import Graph
from .dependency import dependency_phases


def hoist_invariants(graph: Graph) -> Graph:
    phases = dependency_phases(graph)
    return graph.with_nodes((replace(node, phase=phases[node.name]) for node in graph.nodes), "hoist")
