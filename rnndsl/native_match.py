"""Recognize cells that compute exactly what one of torch's fused cells computes.

A cell qualifies for the ``"native"`` backend (torch.nn.LSTM/GRU/RNN, cuDNN on
GPU) when its equations are those of a stock cell up to names and the order of
sums and products: ``W_hh @ h + W_ih @ x + b`` matches ``W_ih @ x + W_hh @ h + b``.
Each node is fingerprinted bottom-up; sums and products are flattened and their
terms sorted, so the fingerprint ignores how the user ordered them.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Tuple

from .ir import Graph, Node, Op

NATIVE_CELLS = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN_TANH", "rnn_relu": "RNN_RELU"}
_COMMUTATIVE = (Op.ADD, Op.MUL)


def _fingerprints(graph: Graph) -> Dict[str, tuple]:
    nodes = graph.node_map()
    state_index = {d.name: i for i, d in enumerate(graph.states)}
    prints: Dict[str, tuple] = {}
    for node in graph.nodes:
        if node.op is Op.PARAM:
            prints[node.name] = ("param", str(node.shape))
        elif node.op is Op.STATE:
            prints[node.name] = ("state", state_index[node.name])
        elif node.op is Op.INPUT:
            prints[node.name] = ("input",)
        elif node.op is Op.CONST:
            prints[node.name] = ("const", float(node.attr("value")))
        elif node.op is Op.HYPER:
            prints[node.name] = ("hyper", float(graph_hyper_default(graph, node.name)))
        elif node.op in _COMMUTATIVE:
            terms = _flatten(node, nodes)
            prints[node.name] = (node.op.label, tuple(sorted(repr(prints[t]) for t in terms)))
        else:
            prints[node.name] = (node.op.label, node.attrs, tuple(repr(prints[i]) for i in node.inputs))
    return prints


def graph_hyper_default(graph: Graph, name: str) -> float:
    return next(d.default for d in graph.hypers if d.name == name)


def _flatten(node: Node, nodes: Dict[str, Node]) -> List[str]:
    """The terms of a chain of one commutative op: ``(a + b) + c`` -> a, b, c."""
    terms, stack = [], list(node.inputs)
    while stack:
        name = stack.pop()
        if nodes[name].op is node.op:
            stack.extend(nodes[name].inputs)
        else:
            terms.append(name)
    return terms


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
        if un.op in _COMMUTATIVE:
            u_in = sorted(_flatten(un, user_nodes), key=lambda n: repr(user_prints[n]))
            s_in = sorted(_flatten(sn, stock_nodes), key=lambda n: repr(stock_prints[n]))
        else:
            u_in, s_in = list(un.inputs), list(sn.inputs)
        stack.extend(zip(u_in, s_in))
    used = set(pairs.values())
    if len(used) != len(pairs) or len(pairs) != len(user.params) or used != {d.name for d in stock.params}:
        return None
    return pairs


@functools.lru_cache(maxsize=1)
def _stock_graphs() -> Dict[str, Graph]:
    from .cellspec import load_cell
    return {name: load_cell(name).optimized(disable=("hoist",)) for name in NATIVE_CELLS}


def match_native(spec) -> Tuple[Optional[str], str, Dict[str, str]]:
    """``(mode, why_not, parameter names)``: mode is None when torch has no fused kernel for the cell.

    The parameter names map the cell's parameters to torch's (``weight_ih``, ...).
    """
    graph = spec.optimized(disable=("hoist",))
    signature = _signature(graph)
    for name, stock in _stock_graphs().items():
        if _signature(stock) == signature:
            pairs = _pair_params(graph, stock)
            if pairs is not None:
                return NATIVE_CELLS[name], "", pairs
    same_states = [n for n, g in _stock_graphs().items() if len(g.states) == len(graph.states)]
    closest = f"; the closest, {same_states[0]}, has the same number of states but other equations" \
        if same_states else ""
    return None, (f"cell {spec.name} does not compute torch's LSTM, GRU, RNN-tanh or RNN-ReLU "
                  f"(its equations and parameters must match cells/{{lstm,gru,rnn_tanh,rnn_relu}}.cell up to "
                  f"names and the order of sums and products{closest})"), {}
