"""The valid IR, written down and checked: ``verify(graph)`` (as tinygrad's ``spec.py``).

It sits above the IR (rnndsl/ir.py) and the shape table (rnndsl/ops.py), since it
checks every node's shape by its rule. Lowering (rnndsl/lower.py) and the pass
runner (rnndsl/passes/) call it after each stage.
"""
from __future__ import annotations

from typing import Dict

from .ir import Graph, IRError, Node, OpKind
from .ops import SHAPE_RULES


def verify(graph: Graph) -> Graph:
    """Check the IR's invariants; return the graph unchanged."""
    seen: Dict[str, Node] = {}
    for node in graph.nodes:
        if node.name in seen:
            raise IRError(f"{graph.name}: node name {node.name!r} defined twice")
        if not node.name.isidentifier():
            raise IRError(f"{graph.name}: node name {node.name!r} is not an identifier")
        for name in node.inputs:
            if name not in seen:
                raise IRError(f"{graph.name}: {node.name} uses {name!r} before it is defined")
        inputs = [seen[name] for name in node.inputs]
        if node.op.kind is not OpKind.LEAF:
            expected = SHAPE_RULES[node.op](node, [n.shape for n in inputs])
            if expected != node.shape:
                raise IRError(f"{graph.name}: {node.name} has shape {node.shape}, its rule gives {expected}")
            if any(n.phase > node.phase for n in inputs):
                raise IRError(f"{graph.name}: {node.name} is hoisted above an input of a later phase")
        seen[node.name] = node
    if len(graph.next_states) != len(graph.states):
        raise IRError(f"{graph.name}: {len(graph.states)} states but {len(graph.next_states)} next states")
    for decl, name in zip(graph.states, graph.next_states):
        if name not in seen:
            raise IRError(f"{graph.name}: next value of state {decl.name} is undefined")
        if seen[name].shape != decl.shape:
            raise IRError(f"{graph.name}: next value of {decl.name} has shape {seen[name].shape}, "
                          f"the state {decl.shape}")
    for name in graph.outputs:
        if name not in seen or not seen[name].shape.batched:
            raise IRError(f"{graph.name}: output {name!r} is not a batched node")
    return graph
