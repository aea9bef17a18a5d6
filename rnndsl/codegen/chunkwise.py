"""Tensor states in the parallel form: which updates it can run without a time loop.

A tensor state is carried flat and read through its view (``S_view = reshape(S)``, see
rnndsl/lower.py). Two kinds of update run in parallel over time:

- ``MatrixUpdate``: ``S' = decay * S + outer(k, v)`` on a state ``[heads, key, value]``, with the
  decay 1, a number per head (``[heads]`` expanded) or a vector per key dim (``[heads, key]``
  expanded), and ``S'`` read only by ``q @ S'``. This is the linear-attention family (linear
  attention, RetNet, GLA, Mamba-2's SSD); rnndsl/chunkwise.py runs it chunk by chunk, and never
  makes a state per step.
- ``ViewUpdate``: ``s' = a * s + b`` on a smaller tensor state (a normalizer ``z[heads, key]``):
  the flat linear scan of rnndsl/linear_scan.py, ``a`` and ``b`` broadcast to the state's shape.

``tensor_update`` recognizes them, or raises NotLinear saying why not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from ..ir import Graph, Node, Op
from ..ops import operand_orders

# The rank (per example) of a state the chunkwise form runs: [heads, key, value].
MATRIX_RANK = 3


class NotLinear(Exception):
    """Why a cell's recurrence is not linear in its state; ``node`` is the offending equation."""

    def __init__(self, message: str, node: Optional[Node]):
        super().__init__(message)
        self.node = node


class DecayNotPositive(NotLinear):
    """A linear update whose decay may be 0 or negative: the chunkwise form, which takes its log,
    cannot run it (the step loop can)."""


@dataclass(frozen=True)
class MatrixUpdate:
    """``state' = decay * state + outer(key, value)``, read by ``query @ state'`` (node ``read``)."""

    state: str
    next: str  # the flat next state
    tensor: str  # the next state as a tensor (what the equations write)
    decay: Optional[str]  # before its expand; None: no decay
    per_key: bool
    key: str
    value: str
    read: str
    query: str


@dataclass(frozen=True)
class ViewUpdate:
    """``state' = a * state + b`` on a tensor state, through its view; ``a`` None is 1."""

    state: str
    next: str
    tensor: str
    view: str
    a: Optional[str]
    b: str


def state_view(graph: Graph, state: str) -> Optional[str]:
    """The node that reads a flat tensor state as its tensor, or None for a vector state."""
    nodes = graph.node_map()
    for user in graph.users()[state]:
        if nodes[user].op is Op.RESHAPE and nodes[user].inputs == (state,):
            return user
    return None


def tensor_update(graph: Graph, state: str, next_name: str, free: Dict[str, bool]):
    """The MatrixUpdate or ViewUpdate of a tensor state, or NotLinear."""
    nodes, users = graph.node_map(), graph.users()
    view = state_view(graph, state)
    flat = nodes[next_name]
    if flat.op is not Op.RESHAPE:
        raise NotLinear(f"the next value of `{state}` is not its tensor, flattened", flat)
    tensor = nodes[flat.inputs[0]]
    a, b = _affine(tensor, view, nodes, free, state)
    if len(nodes[view].shape.dims) < MATRIX_RANK:
        return ViewUpdate(state, next_name, tensor.name, view, a, b)
    outer = nodes[b]
    if outer.op is not Op.OUTER:
        raise NotLinear(f"the next value of `{state}` adds `{b}`, not an outer product outer(k, v)", tensor)
    decay, per_key = _decay(a, nodes, state, tensor)
    reads = [nodes[user] for user in users[tensor.name] if user != next_name]
    contractions = [node for node in reads if node.op is Op.CONTRACT and node.attr("form") == "vm"
                    and node.inputs[1] == tensor.name and free[node.inputs[0]]]
    if len(reads) != 1 or len(contractions) != 1:
        raise NotLinear(f"`{state}'` must be read once, by `q @ {state}'` with q free of the states, "
                        "for the chunkwise form", tensor)
    (read,) = contractions
    return MatrixUpdate(state, next_name, tensor.name, decay, per_key, outer.inputs[0], outer.inputs[1],
                        read.name, read.inputs[0])


def _affine(tensor: Node, view: str, nodes: Dict[str, Node], free: Dict[str, bool],
            state: str) -> Tuple[Optional[str], str]:
    """``(a, b)`` of ``tensor = a * view + b`` (``a`` None for 1), else NotLinear."""
    if tensor.op is Op.ADD:
        for scaled, offset in operand_orders(tensor):
            if not free[offset]:
                continue
            if scaled == view:
                return None, offset
            term = nodes[scaled]
            if term.op is Op.MUL:
                for coefficient, factor in operand_orders(term):
                    if factor == view and free[coefficient]:
                        return coefficient, offset
    raise NotLinear(f"the next value of `{state}` is not of the form a * {state} + b "
                    "with a and b independent of every state", tensor)


def _decay(a: Optional[str], nodes: Dict[str, Node], state: str, tensor: Node) -> Tuple[Optional[str], bool]:
    """``(decay before its expand, per key dim?)`` of the coefficient ``a``."""
    if a is None:
        return None, False
    node = nodes[a]
    base, per_key = None, False
    if node.shape.is_scalar:  # a number, the same for every head
        base = node
    elif node.op is Op.EXPAND:
        inner = nodes[node.inputs[0]]
        if node.attr("trailing") == 2 and len(inner.shape.dims) == 1:
            base = inner
        elif node.attr("trailing") == 1 and len(inner.shape.dims) == 2:
            base, per_key = inner, True
    if base is None:
        raise NotLinear(f"the decay of `{state}` must be a number per head ([heads]) or per key dim "
                        f"([heads, key]), got `{a}` of shape {node.shape}", tensor)
    if decay_operands(base, nodes) is None:
        raise DecayNotPositive(f"it takes the decay of `{state}` by its logarithm, and `{base.name}` may be 0 "
                               "or negative: write it as sigmoid(...) or exp(...) (what is positive by its form: "
                               "those, a positive constant, and their products)", tensor)
    return base.name, per_key


def log_code(node: Node, nodes: Dict[str, Node], ref) -> Optional[str]:
    """Code for the log of a decay, from its meaning (no underflow to log 0 for a tiny decay, no nan
    for a negative one): ``exp(x)`` is ``x``, ``sigmoid(x)`` is ``logsigmoid(x)``, a positive
    constant its log, a product the sum of its factors' logs. None where the decay is not positive
    by its form: a parameter may be 0 or negative, and then only the step loop computes it."""
    if node.op is Op.EXP:
        return ref(node.inputs[0])
    if node.op is Op.SIGMOID:
        return f"torch.nn.functional.logsigmoid({ref(node.inputs[0])})"
    if node.op is Op.CONST and float(node.attr("value")) > 0:
        return repr(math.log(float(node.attr("value"))))
    if node.op is Op.MUL:
        logs = [log_code(nodes[name], nodes, ref) for name in node.inputs]
        if None not in logs:
            return f"({logs[0]} + {logs[1]})"
    return None


def decay_operands(node: Node, nodes: Dict[str, Node]) -> Optional[List[str]]:
    """The values :func:`log_code` reads for the decay ``node``, or None when it has no log form."""
    found: List[str] = []
    return None if log_code(node, nodes, lambda name: found.append(name) or name) is None else found
