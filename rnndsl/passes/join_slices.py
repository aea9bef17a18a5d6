"""Add whole vectors instead of their slices one by one.

After ``merge_matmuls``, a cell written gate by gate adds each gate's slice of
the merged GEMM to its own term: four small adds per step where a stacked cell
does one. When the slices of one value are all added to something, and
together they cover it exactly, one add of the whole value (the other terms
joined by ``concat``, or taken whole when they are the matching slices of one
value) does the same work, and each old sum becomes a slice of the new one.

Before: ``a_i = add(b_i, slice(m, start=0, length=h)); a_f = add(b_f, slice(m, start=h, length=h))``
After:  ``joined = concat(b_i, b_f); whole = add(joined, m)``
        ``a_i = slice(whole, start=0, length=h); a_f = slice(whole, start=h, length=h)``

Run to a fixed point, this turns a gate-by-gate LSTM into the stacked one.
"""
from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import replace
from typing import Dict, List, Optional, Tuple

from ..ir import Graph, Node, Op, Shape, attrs, tiling_order
from ..names import Namespace
from ..ops import SHAPE_RULES

def _slice_operand(add: Node, nodes: Dict[str, Node]) -> Optional[Tuple[int, Node, str]]:
    """For ``add(u, slice(M))`` (either order): (position of the slice, the slice, u)."""
    for position in (1, 0):
        candidate = nodes[add.inputs[position]]
        if candidate.op is Op.SLICE and add.inputs[1 - position] != candidate.name:
            return position, candidate, add.inputs[1 - position]
    return None


def _rewrite_once(graph: Graph) -> Optional[List[Node]]:
    nodes = graph.node_map()
    groups: Dict[str, List[Tuple[Node, Node, str]]] = defaultdict(list)
    for node in graph.nodes:
        if node.op is Op.ADD:
            found = _slice_operand(node, nodes)
            if found is not None and found[1].shape == node.shape:
                groups[found[1].inputs[0]].append((node, found[1], found[2]))
    names = Namespace({n.name for n in graph.nodes})
    for source, members in groups.items():
        whole = nodes[source]
        order = tiling_order([(m[1].attr("start"), m[1].attr("length")) for m in members], whole.shape.dims[0])
        if len(members) < 2 or order is None:
            continue
        members = [members[i] for i in order]
        others = [nodes[m[2]] for m in members]
        if len({o.shape.batched for o in others}) != 1 or any(o.shape.is_scalar for o in others):
            continue
        if _downstream({m[0].name for m in members}, graph) & {o.name for o in others}:
            continue  # a term computed from another member's sum: joining them would form a cycle
        replacement = _join(members, others, whole, nodes, names)
        if replacement is None:
            continue
        new_nodes, sum_name = replacement
        adds = {m[0].name: m for m in members}
        out: List[Node] = []
        for node in graph.nodes:
            if node.name in adds:
                add, piece, _ = adds[node.name]
                if node.name == members[-1][0].name:
                    out.extend(new_nodes)
                out.append(Node(add.name, Op.SLICE, (sum_name,), add.shape, piece.attrs, add.span))
            else:
                out.append(node)
        return _topological(out)
    return None


def _join(members, others: List[Node], whole: Node, nodes: Dict[str, Node],
          names: Namespace) -> Optional[Tuple[List[Node], str]]:
    """The nodes computing ``others joined + whole``, and the name of that sum."""
    span = members[0][0].span
    sources = {o.inputs[0] for o in others if o.op is Op.SLICE}
    new: List[Node] = []
    if all(o.op is Op.SLICE for o in others) and len(sources) == 1 and \
            all(o.attrs == m[1].attrs for o, m in zip(others, members)):
        joined = nodes[sources.pop()]  # the matching slices of one value: take it whole
        if joined.shape.dims != whole.shape.dims:
            return None
    else:
        probe = Node("_", Op.CONCAT, tuple(o.name for o in others), Shape(), (), span)
        joined = Node(names.fresh("joined"), Op.CONCAT, probe.inputs,
                      SHAPE_RULES[Op.CONCAT](probe, [o.shape for o in others]), (), span)
        if joined.shape.dims != whole.shape.dims:
            return None
        new.append(joined)
    operands = (joined, whole) if members[0][0].inputs[0] == others[0].name else (whole, joined)
    shape = SHAPE_RULES[Op.ADD](members[0][0], [operands[0].shape, operands[1].shape])
    total = Node(names.fresh("whole"), Op.ADD, (operands[0].name, operands[1].name), shape, attrs(), span)
    new.append(total)
    return new, total.name


def _downstream(names: set, graph: Graph) -> set:
    """``names`` and every node computed from them."""
    found = set(names)
    for node in graph.nodes:
        if any(name in found for name in node.inputs):
            found.add(node.name)
    return found


def _topological(nodes: List[Node]) -> List[Node]:
    """Nodes reordered so each follows its inputs, otherwise keeping their order."""
    index = {node.name: i for i, node in enumerate(nodes)}
    waiting = {node.name: sum(1 for name in node.inputs if name in index) for node in nodes}
    users: Dict[str, List[str]] = defaultdict(list)
    for node in nodes:
        for name in node.inputs:
            users[name].append(node.name)
    ready = [index[name] for name, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    order: List[Node] = []
    while ready:
        node = nodes[heapq.heappop(ready)]
        order.append(node)
        for user in users[node.name]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, index[user])
    return order


def join_slices(graph: Graph) -> Graph:
    current = graph
    while (nodes := _rewrite_once(current)) is not None:
        current = replace(current, nodes=tuple(nodes))
    return current.with_nodes(current.nodes, "join_slices")
