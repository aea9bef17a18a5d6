"""Mixed precision: which values ``torch.autocast`` may compute in its low-precision dtype,
and the casts that keep a cell's state in the dtype it came in.

Under autocast, matrix products run in the low-precision dtype (bfloat16, float16); every
other op of the language keeps the widest dtype of its tensor operands (``PRECISION``, the
per-op table of this concern). So a value that mixes in a float32 state, input or parameter
vector comes back float32 on its own, and an LSTM's ``c' = sigmoid(f) * c + ...`` keeps
accumulating in float32. A next state made of products alone does not: lstm_proj's
``h' = weight_hr @ (...)`` would come back bfloat16 and be carried on in bfloat16, where
its rounding compounds over the steps. The generated code casts such a value, and only
such a value, back to the dtype of the state it replaces (an output that is no state: to
the input's)::

    h_next = torch.nn.functional.linear(mul_2, self.weight_hr).to(h.dtype)  # state keeps its dtype

Outside autocast the cast changes nothing (``.to`` of a tensor already in that dtype
returns it), and cells whose next states already mix in a full-precision value, the stock
LSTM, GRU and RNNs among them, get no cast at all.
"""
from __future__ import annotations

import enum
from typing import Collection, Dict, Sequence, Set

from ..ir import Graph, Op, OpKind


class Precision(enum.Enum):
    """The dtype an op's result takes under autocast, given its operands'."""

    LOWERED = "lowered"    # autocast runs it in the low-precision dtype (matrix products)
    PROMOTED = "promoted"  # the widest of its tensor operands (numbers do not count), as torch promotes
    FIRST = "first"        # its first operand's: layer_norm's output follows its input, not its weights;
    #                        slices and dropout keep what they are given


PRECISION: Dict[Op, Precision] = {
    **{op: Precision.PROMOTED for op in Op if op.kind is OpKind.ELEMENTWISE},
    Op.MATMUL: Precision.LOWERED,
    Op.CHUNK: Precision.FIRST,
    Op.SLICE: Precision.FIRST,
    Op.CONCAT: Precision.PROMOTED,  # torch.cat promotes under autocast
    Op.LAYERNORM: Precision.FIRST,
    # Autocast may compute these in float32 from a low-precision input; counting them low costs
    # at most a cast that changes nothing, counting them full could leave a state lowered.
    Op.SUM: Precision.FIRST,
    Op.MEAN: Precision.FIRST,
    Op.LOGSUMEXP: Precision.FIRST,
    Op.SOFTMAX: Precision.FIRST,
    Op.DROPOUT: Precision.FIRST,
    # torch.where(draw, old, new) promotes, but only in training: in eval it is `new` itself.
    Op.ZONEOUT: Precision.FIRST,
    Op.RESHAPE: Precision.FIRST,
    Op.EXPAND: Precision.FIRST,
    Op.TRANSPOSE: Precision.FIRST,
    Op.OUTER: Precision.PROMOTED,   # an elementwise product
    Op.CONTRACT: Precision.LOWERED,  # torch.matmul
    Op.SUM_OVER: Precision.FIRST,
    Op.MAX_OVER: Precision.FIRST,
    Op.CONV: Precision.LOWERED,      # conv2d
}


def low_precision_values(graph: Graph, lowered: Collection[str] = ()) -> Set[str]:
    """The nodes autocast may compute in its low-precision dtype when the input, the states and
    the parameters are in full precision. ``lowered`` names more nodes that the target's code
    computes as one autocast product (a sum that a GEMM adds as its bias)."""
    nodes = graph.node_map()
    low: Set[str] = set()
    for node in graph.nodes:
        if node.op.kind is OpKind.LEAF:
            continue
        rule = PRECISION[node.op]
        # Numbers (constants, hyper-parameters, what is computed from them alone) are Python
        # floats in the code: they never widen a tensor's dtype; nor does where's mask.
        tensors = [name for name in node.inputs if not nodes[name].shape.is_scalar and not nodes[name].shape.mask]
        if node.name in lowered or rule is Precision.LOWERED:
            low.add(node.name)
        elif rule is Precision.FIRST and node.inputs[0] in low:
            low.add(node.name)
        elif rule is Precision.PROMOTED and tensors and all(name in low for name in tensors):
            low.add(node.name)
    return low


def carried_dtype_casts(graph: Graph, state_vars: Sequence[str], output_dtype: str,
                        lowered: Collection[str] = ()) -> Dict[str, str]:
    """The casts that keep every result in full precision under autocast, as node name -> dtype
    code: for each next state autocast may lower, its state's dtype (``h.dtype``; ``state_vars``
    are the states' variables, in order); for each other output it may lower, ``output_dtype``
    (the input's, ``xs.dtype``, which the run-time checks make the states' and parameters')."""
    low = low_precision_values(graph, lowered)
    casts: Dict[str, str] = {}
    for var, name in zip(state_vars, graph.next_states):
        if name in low:
            casts.setdefault(name, f"{var}.dtype")
    for name in graph.outputs:
        if name in low:
            casts.setdefault(name, output_dtype)
    return casts
