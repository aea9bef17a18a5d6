"""Recognize cells that compute exactly what one of torch's fused cells computes.

A cell qualifies for the ``"native"`` backend (torch.nn.LSTM/GRU/RNN, cuDNN on
GPU) when its equations are those of a stock cell up to names and the order of
sums and products: ``W_hh @ h + W_ih @ x + b`` matches ``W_ih @ x + W_hh @ h + b``.
Each node is fingerprinted bottom-up; sums and products are flattened and their
terms sorted, so the fingerprint ignores how the user ordered them. A fingerprint is a
digest of its node's op and its inputs' digests: nesting whole sub-fingerprints would
grow exponentially on a deep graph whose values are read twice (``h' = f(f(x))`` with
each ``f`` reading its argument twice).

The stock graphs to match come from the caller (``CellSpec.native_mode`` passes
those of rnndsl.native.NATIVE_MODES): this module knows the IR, not where cells live.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from typing import Dict, List, Mapping, Optional, Tuple

from .ir import Graph, Node, Op
from .ops import COMMUTATIVE_OPS

# The passes to leave off in the graphs compared: hoisting moves values out of the step in ways
# that depend on the order of sums, which the fingerprints ignore.
MATCH_DISABLE = ("hoist",)


def _digest(fingerprint: tuple) -> str:
    return hashlib.sha1(repr(fingerprint).encode()).hexdigest()


def _fingerprints(graph: Graph) -> Dict[str, str]:
    nodes = graph.node_map()
    state_index = {d.name: i for i, d in enumerate(graph.states)}
    prints: Dict[str, str] = {}
    terms: Dict[str, Counter] = {}
    for node in graph.nodes:
        if node.op is Op.PARAM:
            fingerprint: tuple = ("param", str(node.shape))
        elif node.op is Op.STATE:
            fingerprint = ("state", state_index[node.name])
        elif node.op is Op.INPUT:
            fingerprint = ("input",)
        elif node.op is Op.CONST:
            fingerprint = ("const", float(node.attr("value")))
        elif node.op is Op.HYPER:
            fingerprint = ("hyper", float(graph_hyper_default(graph, node.name)))
        elif node.op in COMMUTATIVE_OPS:
            counts = Counter()
            for term, count in _terms(node, nodes, terms).items():
                counts[prints[term]] += count
            fingerprint = (node.op.label, tuple(sorted(counts.items())))
        else:
            fingerprint = (node.op.label, node.attrs, tuple(prints[i] for i in node.inputs))
        prints[node.name] = _digest(fingerprint)
    return prints


def graph_hyper_default(graph: Graph, name: str) -> float:
    return next(d.default for d in graph.hypers if d.name == name)


def _terms(node: Node, nodes: Dict[str, Node], known: Dict[str, Counter]) -> Counter:
    """The terms of a chain of one commutative op, with their counts: ``(a + b) + a`` -> a: 2, b: 1.
    Counts, not a list: ``y = x + x; z = y + y; ...`` has 2**depth terms. ``known`` memoizes by node."""
    if node.name not in known:
        counts: Counter = Counter()
        for name in node.inputs:
            if nodes[name].op is node.op:
                counts.update(_terms(nodes[name], nodes, known))
            else:
                counts[name] += 1
        known[node.name] = counts
    return known[node.name]


def _flatten(node: Node, nodes: Dict[str, Node]) -> List[str]:
    """The terms of a chain of one commutative op: ``(a + b) + c`` -> a, b, c (for the small graphs
    whose fingerprints matched a stock cell's)."""
    return list(_terms(node, nodes, {}).elements())


def _signature(graph: Graph) -> tuple:
    prints = _fingerprints(graph)
    return tuple(prints[n] for n in graph.next_states), tuple(prints[n] for n in graph.outputs)


def _pair_params(user: Graph, stock: Graph) -> Optional[Dict[str, str]]:
    """Which stock parameter each user parameter plays, by walking both graphs together."""
    user_nodes, stock_nodes = user.node_map(), stock.node_map()
    user_prints, stock_prints = _fingerprints(user), _fingerprints(stock)
    pairs: Dict[str, str] = {}
    stack = list(zip(user.results(), stock.results()))
    while stack:
        u, s = stack.pop()
        un, sn = user_nodes[u], stock_nodes[s]
        if un.op is Op.PARAM:
            if pairs.setdefault(u, s) != s:
                return None
            continue
        if un.op in COMMUTATIVE_OPS:
            u_in = sorted(_flatten(un, user_nodes), key=user_prints.__getitem__)
            s_in = sorted(_flatten(sn, stock_nodes), key=stock_prints.__getitem__)
        else:
            u_in, s_in = list(un.inputs), list(sn.inputs)
        stack.extend(zip(u_in, s_in))
    used = set(pairs.values())
    if len(used) != len(pairs) or len(pairs) != len(user.params) or used != {d.name for d in stock.params}:
        return None
    return pairs


def match_native(graph: Graph, stock: Mapping[str, Graph]) -> Tuple[Optional[str], str, Dict[str, str]]:
    """``(mode, why_not, parameter names)`` for a cell's ``graph``: the mode of ``stock`` (mode ->
    the graph of the stock cell that computes it) whose cell computes the same, or None.

    Both are taken after the passes, with those of :data:`MATCH_DISABLE` off. The parameter
    names map the cell's parameters to torch's (``weight_ih``, ...).
    """
    if graph.extra_inputs:
        return None, (f"cell {graph.name} has several inputs ({', '.join(d.name for d in graph.inputs)}); "
                      "torch's fused kernels take one"), {}
    signature = _signature(graph)
    for mode, stock_graph in stock.items():
        if _signature(stock_graph) == signature:
            pairs = _pair_params(graph, stock_graph)
            if pairs is not None:
                return mode, "", pairs
    same_states = [g.name for g in stock.values() if len(g.states) == len(graph.states)]
    closest = f"; the closest, {same_states[0]}, has the same number of states but other equations" \
        if same_states else ""
    files = ",".join(g.name for g in stock.values())
    return None, (f"cell {graph.name} does not compute torch's LSTM, GRU, RNN-tanh or RNN-ReLU "
                  f"(its equations and parameters must match cells/{{{files}}}.cell up to "
                  f"names and the order of sums and products{closest})"), {}
