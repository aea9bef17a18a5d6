"""Drop nodes whose values reach neither a next state nor an output.

Before: ``a = sigmoid(x); unused = tanh(x); h_next = mul(a, h)``
After:  ``a = sigmoid(x); h_next = mul(a, h)``  (leaves always stay)
"""
from __future__ import annotations

from ..ir import Graph, OpKind


def eliminate_dead_code(graph: Graph) -> Graph:
    live = set(graph.results())
    for node in reversed(graph.nodes):
        if node.name in live:
            live.update(node.inputs)
    kept = [n for n in graph.nodes if n.name in live or n.op.kind is OpKind.LEAF]
    return graph.with_nodes(kept, "dce")
