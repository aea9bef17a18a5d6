"""Compute each distinct value once (common subexpression elimination).

Before: ``a = sigmoid(f); b = sigmoid(f); c = mul(a, b)``
After:  ``a = sigmoid(f); c = mul(a, a)``

Random ops are never merged: two dropouts of one value draw two masks.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Dict

from ..ir import Graph, OpKind


def eliminate_common_subexpressions(graph: Graph) -> Graph:
    canonical: Dict[tuple, str] = {}
    alias: Dict[str, str] = {}
    kept = []
    for node in graph.nodes:
        node = replace(node, inputs=tuple(alias.get(name, name) for name in node.inputs))
        if node.op.kind is not OpKind.LEAF and node.op.kind is not OpKind.RANDOM:
            key = (node.op, node.inputs, node.attrs)
            if key in canonical:
                alias[node.name] = canonical[key]
                continue
            canonical[key] = node.name
        kept.append(node)
    return graph.with_nodes(kept, "cse",
                            next_states=tuple(alias.get(n, n) for n in graph.next_states),
                            outputs=tuple(alias.get(n, n) for n in graph.outputs))
