"""Reorder sums so that what can be hoisted is added first.

``W_ih @ x + b_ih + W_hh @ h + b_hh`` parses as ``((mx + b_ih) + mh) + b_hh``,
so no partial sum is free of the state. This pass flattens each sum (through
intermediate sums used nowhere else) and rebuilds it with the terms ordered by
what they depend on: parameters, then the input, then states.

Before: ``add_2 = add(add_1, b_hh); add_1 = add(add, mh); add = add(mx, b_ih)``
After:  ``partial = add(b_ih, b_hh); partial_1 = add(partial, mx); add_2 = add(partial_1, mh)``
"""
from __future__ import annotations

from dataclasses import replace
from typing import Dict, List, Set, Tuple

from ..dependency import dependencies
from ..ir import Graph, Node, Op
from ..names import Namespace
from ..ops import SHAPE_RULES


def reassociate_sums(graph: Graph) -> Graph:
    nodes, users = graph.node_map(), graph.users()
    results = set(graph.results())
    found = dependencies(graph)
    absorbed: Set[str] = set()
    rebuilt: Dict[str, List[Node]] = {}
    names = Namespace({n.name for n in graph.nodes})

    def flatten(root: str) -> Tuple[List[str], List[str]]:
        """The terms of the sum at ``root``, and the inner sums it is made of."""
        terms, inner, stack = [], [], [root]
        while stack:
            node = nodes[stack.pop()]
            private = len(users[node.name]) == 1 and node.name not in results
            if node.op is Op.ADD and (node.name == root or private):
                if node.name != root:
                    inner.append(node.name)
                stack.extend(reversed(node.inputs))
            else:
                terms.append(node.name)
        return terms, inner

    for node in reversed(graph.nodes):
        if node.op is not Op.ADD or node.name in absorbed:
            continue
        terms, inner = flatten(node.name)
        ordered = sorted(terms, key=found.__getitem__)  # stable: keeps source order among equals
        if ordered == terms:
            continue
        absorbed.update(inner)
        chain, total = [], nodes[ordered[0]]
        for index, term in enumerate(ordered[1:], start=1):
            last = index == len(ordered) - 1
            inputs = (total.name, term)
            shape = SHAPE_RULES[Op.ADD](node, [total.shape, nodes[term].shape])
            total = replace(node, name=node.name if last else names.fresh("partial"), inputs=inputs, shape=shape)
            chain.append(total)
        rebuilt[node.name] = chain
    if not rebuilt:
        return graph.with_nodes(graph.nodes, "reassociate")
    out: List[Node] = []
    for node in graph.nodes:
        if node.name not in absorbed:
            out.extend(rebuilt.get(node.name, [node]))
    return graph.with_nodes(out, "reassociate")
