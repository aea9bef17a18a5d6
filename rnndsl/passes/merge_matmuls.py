"""Merge matrix products that share their vector into one GEMM.

A cell written gate by gate runs one GEMM per gate; one GEMM over the
concatenated weights does the same work faster. Parameters keep their names:
the concatenation happens in the graph, once per sequence.

Before: ``mi = matmul(weight_ii, x); mf = matmul(weight_if, x)``
After:  ``weights = concat(weight_ii, weight_if)``  (once per sequence)
        ``merged = matmul(weights, x)``
        ``mi = slice(merged, start=0, length=hidden); mf = slice(merged, start=hidden, length=hidden)``
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List

from ..ir import Graph, Node, Op, Shape, Size, attrs
from ..names import Namespace


def merge_matmuls(graph: Graph) -> Graph:
    nodes = graph.node_map()
    groups: Dict[str, List[Node]] = defaultdict(list)
    for node in graph.nodes:
        if node.op is Op.MATMUL and nodes[node.inputs[0]].op is Op.PARAM:
            groups[node.inputs[1]].append(node)
    groups = {vector: members for vector, members in groups.items() if len(members) > 1}
    if not groups:
        return graph.with_nodes(graph.nodes, "merge_matmuls")
    names = Namespace({n.name for n in graph.nodes})
    replacement: Dict[str, List[Node]] = {}
    for vector, members in groups.items():
        first = members[0]
        matrices = [nodes[m.inputs[0]] for m in members]
        rows = Size()
        for matrix in matrices:
            rows = rows + matrix.shape.dims[0]
        weights = Node(names.fresh("weights"), Op.CONCAT, tuple(m.name for m in matrices),
                       Shape((rows, matrices[0].shape.dims[1])), span=first.span)
        merged = Node(names.fresh("merged"), Op.MATMUL, (weights.name, vector),
                      Shape((rows,), first.shape.batched), span=first.span)
        replacement[first.name] = [weights, merged]
        start = Size()
        for member, matrix in zip(members, matrices):
            length = matrix.shape.dims[0]
            sliced = Node(member.name, Op.SLICE, (merged.name,), member.shape,
                          attrs(start=start, length=length), member.span)
            replacement.setdefault(member.name, []).append(sliced)
            start = start + length
    out: List[Node] = []
    for node in graph.nodes:
        out.extend(replacement.get(node.name, [node]))
    return graph.with_nodes(out, "merge_matmuls")
