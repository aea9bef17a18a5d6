"""Drop nodes whose values reach neither a next state nor an output.

Before: ``a = sigmoid(x); unused = tanh(x); h_next = mul(a, h)``
After:  ``a = sigmoid(x); h_next = mul(a, h)``  (leaves always stay)
"""
from __future__ import annotations

from typing import Set

from ..ir import Graph, OpKind


def live_names(graph: Graph) -> Set[str]:
    """The names of the nodes whose values reach a next state or an output."""
    live = set(graph.results())
    for node in reversed(graph.nodes):
        if node.name in live:
            live.update(node.inputs)
    return live


def eliminate_dead_code(graph: Graph) -> Graph:
    live = live_names(graph)
    kept = [n for n in graph.nodes if n.name in live or n.op.kind is OpKind.LEAF]
    return graph.with_nodes(kept, "dce")
