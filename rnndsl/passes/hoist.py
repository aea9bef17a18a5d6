"""Hoist what does not depend on a state out of the time loop.

Before (every node runs at every step)::

    matmul = matmul(weight_ih, x)          matmul_1 = matmul(weight_hh, h)
    bias = add(bias_ih, bias_hh)           gates = add(add(matmul, bias), matmul_1)

After: ``bias`` runs once per sequence (parameters only); ``matmul`` and the
sum with ``bias`` run once for all steps as one ``(T*batch) x input`` GEMM
(input only); only ``matmul_1`` and ``gates`` stay in the loop. What reads a
per-sequence input (``enc[context] per sequence``) and no other input or state,
``W_c @ enc``, runs once per sequence too, as one ``batch x context`` GEMM.

An op that makes a whole dim more than it reads (``outer(k, v)``, rnndsl/ops.py's
``EXPANDING_OPS``) stays in the loop even when it reads only the input: for all steps at
once it would hold ``T*batch*heads*key*value`` numbers, where the loop holds one step's.
What reads it stays there too.
"""
from __future__ import annotations

from dataclasses import replace

from ..dependency import Dependence, dependencies
from typing import Dict

from ..ir import Graph, Phase
from ..ops import EXPANDING_OPS

# The earliest phase a value can run in, by what it varies with.
_EARLIEST_PHASE = {Dependence.PARAMETERS: Phase.ONCE, Dependence.SEQUENCE: Phase.PER_SEQUENCE,
                   Dependence.INPUT: Phase.PER_INPUT, Dependence.STATE: Phase.PER_STEP}


def hoist_invariants(graph: Graph) -> Graph:
    found = dependencies(graph)
    phases: Dict[str, Phase] = {}
    for node in graph.nodes:
        phase = max([_EARLIEST_PHASE[found[node.name]]] + [phases[name] for name in node.inputs])
        if node.op in EXPANDING_OPS and phase is Phase.PER_INPUT:
            phase = Phase.PER_STEP
        phases[node.name] = phase
    return graph.with_nodes((replace(node, phase=phases[node.name]) for node in graph.nodes), "hoist")
