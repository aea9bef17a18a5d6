"""The IR: a cell as a graph of named nodes from ``(state, input)`` to ``(next state, output)``.

The counterpart of rnnlib's nngraph gModule. Its grammar::

    graph   := name, input decl, extra input decls, state decls, param decls, buffer decls, sizes, hypers,
               nodes (topologically ordered), next_states (one node per state), outputs
    node    := name = op(inputs...; attrs) : shape      at a phase
    shape   := [] (scalar) | [n] (vector) | [m, n] (matrix); "batched" vectors carry a batch dim;
               a "mask" (a comparison's result) is read only by `where`
    size    := a linear polynomial of size variables, e.g. 4*hidden + input

Nodes are frozen and slotted; passes build new graphs (rnndsl/passes/).
Per-op knowledge lives in tables, one per concern: shape rules (rnndsl/ops.py),
code emitters (rnndsl/codegen/base.py) and derivatives (rnndsl/codegen/derivatives.py);
the IR's invariants are checked by rnndsl/spec.py.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .errors import Span


# Sizes ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Size:
    """A polynomial over size variables: ``sum(coeff * monomial) + const``.

    A term's key names its monomial, the variables it multiplies joined by ``*`` in sorted
    order (``hidden``, ``heads*key``): vector sizes are linear (``4*hidden + input``), and the
    flat size of a tensor is the product of its dims (``heads*key*value``).
    """

    terms: Tuple[Tuple[str, int], ...] = ()
    const: int = 0

    @staticmethod
    def of(value: "int | str | Size") -> "Size":
        if isinstance(value, Size):
            return value
        if isinstance(value, str):
            return Size(((value, 1),), 0)
        return Size((), int(value))

    @staticmethod
    def _make(coeffs: Mapping[str, int], const: int) -> "Size":
        return Size(tuple(sorted((k, v) for k, v in coeffs.items() if v != 0)), const)

    def __add__(self, other: "Size | int") -> "Size":
        other = Size.of(other)
        coeffs = dict(self.terms)
        for name, coeff in other.terms:
            coeffs[name] = coeffs.get(name, 0) + coeff
        return Size._make(coeffs, self.const + other.const)

    def __neg__(self) -> "Size":
        return Size(tuple((k, -v) for k, v in self.terms), -self.const)

    def __sub__(self, other: "Size | int") -> "Size":
        return self + (-Size.of(other))

    def __mul__(self, other: "Size | int") -> "Size":
        other = Size.of(other)
        left = self.terms + (("", self.const),)
        right = other.terms + (("", other.const),)
        coeffs: Dict[str, int] = {}
        for a, x in left:
            for b, y in right:
                key = "*".join(sorted(a.split("*") + b.split("*"))).strip("*")
                coeffs[key] = coeffs.get(key, 0) + x * y
        const = coeffs.pop("", 0)
        return Size._make(coeffs, const)

    __rmul__ = __mul__
    __radd__ = __add__

    def divisible_by(self, n: int) -> bool:
        return all(v % n == 0 for _, v in self.terms) and self.const % n == 0

    def __floordiv__(self, n: int) -> "Size":
        assert self.divisible_by(n), (self, n)
        return Size(tuple((k, v // n) for k, v in self.terms), self.const // n)

    def over(self, variable: str) -> Optional["Size"]:
        """``self / variable`` when every term has the factor ``variable`` (``heads*key`` over
        ``heads`` is ``key``), else None: sizes are symbolic, so a split must divide exactly."""
        if self.const:
            return None
        coeffs = {}
        for key, coeff in self.terms:
            factors = key.split("*")
            if variable not in factors:
                return None
            factors.remove(variable)
            coeffs["*".join(factors)] = coeff
        const = coeffs.pop("", 0)
        return Size._make(coeffs, const)

    @property
    def variables(self) -> Tuple[str, ...]:
        return tuple(dict.fromkeys(f for k, _ in self.terms for f in k.split("*")))

    def evaluate(self, env: Mapping[str, int]) -> int:
        return sum(coeff * math.prod(env[f] for f in key.split("*")) for key, coeff in self.terms) + self.const

    def render(self, variable=lambda name: name) -> str:
        """``4*hidden + 2``; ``variable`` maps names, e.g. to ``self.hidden`` in code."""
        parts = []
        for key, coeff in self.terms:
            monomial = "*".join(variable(f) for f in key.split("*"))
            parts.append(monomial if coeff == 1 else f"{coeff}*{monomial}")
        if self.const or not parts:
            parts.append(str(self.const))
        return " + ".join(parts).replace("+ -", "- ")

    def __str__(self) -> str:
        return self.render()


# The largest size of one dimension: beyond, torch.empty overflows (and no memory could hold
# the tensor). Declared sizes keep their coefficients below it too, so that sums of sizes
# (a concat of many slices) stay within the int64 TorchScript computes them in.
MAX_DIMENSION = 2**31 - 1


@dataclass(frozen=True, slots=True)
class Shape:
    """Feature dims, and whether the value carries a leading batch dim."""

    dims: Tuple[Size, ...] = ()
    batched: bool = False
    mask: bool = False  # a comparison's result: true or false per unit, read only by `where`

    @property
    def is_scalar(self) -> bool:
        return not self.dims

    @property
    def is_vector(self) -> bool:
        return len(self.dims) == 1

    @property
    def is_matrix(self) -> bool:
        return len(self.dims) == 2

    @property
    def is_tensor(self) -> bool:
        """A per-example value of several dims (``[B, heads, key]``), or a parameter of more than two
        (``[heads, hidden, hidden]``): what the tensor ops (split, outer, contractions) work on.
        A two-dim parameter stays a weight matrix, which only stands on the left of ``@``."""
        return len(self.dims) >= (2 if self.batched else 3)

    def __str__(self) -> str:
        inner = ", ".join(str(d) for d in self.dims)
        text = f"[B, {inner}]" if self.batched else f"[{inner}]"
        return f"mask{text}" if self.mask else text


SCALAR = Shape()
# The size of a reduction's result and of a learnable scalar (`param s`): one unit, which
# broadcasts against vectors of any size as torch's trailing dim of 1 does.
ONE = Size.of(1)


def tiling_order(pieces: Sequence[Tuple[Size, Size]], whole: Size) -> Optional[List[int]]:
    """The indices of ``(start, length)`` pieces in offset order, if together they cover
    ``[0, whole)`` exactly once; else None. Sizes are symbolic, so the pieces are walked from
    offset 0, each starting where the last ended, not sorted."""
    order, position, remaining = [], Size(), list(range(len(pieces)))
    while remaining:
        following = [i for i in remaining if pieces[i][0] == position]
        if len(following) != 1:
            return None
        order.append(following[0])
        remaining.remove(following[0])
        position = position + pieces[following[0]][1]
    return order if position == whole else None


# Ops -----------------------------------------------------------------------

class OpKind(enum.Enum):
    LEAF = "leaf"              # values from outside the equations
    ELEMENTWISE = "elementwise"
    LINEAR = "linear"          # matrix products
    LAYOUT = "layout"          # slicing and joining feature vectors
    NORMALIZE = "normalize"    # reductions over the feature dimension
    RANDOM = "random"          # active only in training


class Op(enum.Enum):
    """The closed set of IR operations, grouped by kind."""

    INPUT = ("input", OpKind.LEAF)             # read at every step: (T, batch, n) over a sequence
    SEQUENCE_INPUT = ("sequence_input", OpKind.LEAF)  # `per sequence`: (batch, n), the same at every step
    STATE = ("state", OpKind.LEAF)
    PARAM = ("param", OpKind.LEAF)
    BUFFER = ("buffer", OpKind.LEAF)   # a constant tensor, not trained: a registered buffer
    HYPER = ("hyper", OpKind.LEAF)
    CONST = ("const", OpKind.LEAF)

    NEG = ("neg", OpKind.ELEMENTWISE)
    ADD = ("add", OpKind.ELEMENTWISE)
    SUB = ("sub", OpKind.ELEMENTWISE)
    MUL = ("mul", OpKind.ELEMENTWISE)
    DIV = ("div", OpKind.ELEMENTWISE)
    SIGMOID = ("sigmoid", OpKind.ELEMENTWISE)
    TANH = ("tanh", OpKind.ELEMENTWISE)
    RELU = ("relu", OpKind.ELEMENTWISE)
    EXP = ("exp", OpKind.ELEMENTWISE)
    LOG = ("log", OpKind.ELEMENTWISE)
    SOFTPLUS = ("softplus", OpKind.ELEMENTWISE)
    ABS = ("abs", OpKind.ELEMENTWISE)
    SQRT = ("sqrt", OpKind.ELEMENTWISE)
    SILU = ("silu", OpKind.ELEMENTWISE)
    GELU = ("gelu", OpKind.ELEMENTWISE)
    ELU = ("elu", OpKind.ELEMENTWISE)
    SELU = ("selu", OpKind.ELEMENTWISE)
    MISH = ("mish", OpKind.ELEMENTWISE)
    LOGSIGMOID = ("logsigmoid", OpKind.ELEMENTWISE)
    HARDTANH = ("hardtanh", OpKind.ELEMENTWISE)
    HARDSIGMOID = ("hardsigmoid", OpKind.ELEMENTWISE)
    SOFTSIGN = ("softsign", OpKind.ELEMENTWISE)
    SIN = ("sin", OpKind.ELEMENTWISE)
    COS = ("cos", OpKind.ELEMENTWISE)
    LOG1P = ("log1p", OpKind.ELEMENTWISE)
    EXPM1 = ("expm1", OpKind.ELEMENTWISE)
    ERF = ("erf", OpKind.ELEMENTWISE)
    POW = ("pow", OpKind.ELEMENTWISE)            # (base, exponent): the exponent is a number
    MAXIMUM = ("max", OpKind.ELEMENTWISE)
    MINIMUM = ("min", OpKind.ELEMENTWISE)
    CLAMP = ("clamp", OpKind.ELEMENTWISE)        # (v, lo, hi): the bounds are numbers
    CLAMP_MIN = ("clamp_min", OpKind.ELEMENTWISE)  # max(v, k) of a number k: (v, k)
    CLAMP_MAX = ("clamp_max", OpKind.ELEMENTWISE)  # min(v, k) of a number k: (v, k)
    LT = ("lt", OpKind.ELEMENTWISE)              # comparisons give a mask
    LE = ("le", OpKind.ELEMENTWISE)
    GT = ("gt", OpKind.ELEMENTWISE)
    GE = ("ge", OpKind.ELEMENTWISE)
    WHERE = ("where", OpKind.ELEMENTWISE)        # (mask, a, b)

    MATMUL = ("matmul", OpKind.LINEAR)

    CHUNK = ("chunk", OpKind.LAYOUT)     # attrs: parts, index
    SLICE = ("slice", OpKind.LAYOUT)     # attrs: start, length (Sizes)
    CONCAT = ("concat", OpKind.LAYOUT)   # joins vectors, or matrices by rows

    # Tensors with named sizes (matrix-valued states, heads).
    RESHAPE = ("reshape", OpKind.LAYOUT)      # attrs: count, dims: the last `count` dims become `dims`
    EXPAND = ("expand", OpKind.LAYOUT)        # attrs: trailing: that many size-1 dims appended
    TRANSPOSE = ("transpose", OpKind.LAYOUT)  # swaps the last two dims
    OUTER = ("outer", OpKind.LINEAR)          # [.., m] x [.., n] -> [.., m, n]
    CONTRACT = ("contract", OpKind.LINEAR)    # `@` of tensors, per leading dims; attrs: form ("mv", "vm", "mm")
    SUM_OVER = ("sum_over", OpKind.NORMALIZE)  # attrs: dim (negative): the sum over that dim
    MAX_OVER = ("max_over", OpKind.NORMALIZE)  # attrs: dim (negative): the largest element along that dim
    # Spatial values: (kernel [out, in, kh, kw], v [in, height, width]) -> [out, height, width],
    # a 2-d convolution with "same" padding (odd kernels).
    CONV = ("conv", OpKind.LINEAR)

    LAYERNORM = ("layernorm", OpKind.NORMALIZE)  # (x, weight, bias); attrs: eps
    SUM = ("sum", OpKind.NORMALIZE)              # over the features, to one unit per example
    MEAN = ("mean", OpKind.NORMALIZE)
    LOGSUMEXP = ("logsumexp", OpKind.NORMALIZE)
    SOFTMAX = ("softmax", OpKind.NORMALIZE)      # over the features, same shape
    DROPOUT = ("dropout", OpKind.RANDOM)         # (x); attrs: p
    ZONEOUT = ("zoneout", OpKind.RANDOM)         # (new, old); attrs: p

    def __init__(self, label: str, kind: OpKind):
        self.label = label
        self.kind = kind


class Phase(enum.IntEnum):
    """When a node runs in the sequence loop (set by the hoisting pass)."""

    ONCE = 0          # depends only on parameters: once per sequence
    PER_SEQUENCE = 1  # on per-sequence inputs too: once per sequence, per example (batched)
    PER_INPUT = 2     # depends on an input read at every step but no state: all steps in one batched op
    PER_STEP = 3      # depends on a state: inside the time loop


# Nodes and graphs ------------------------------------------------------------

Attrs = Tuple[Tuple[str, object], ...]


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    op: Op
    inputs: Tuple[str, ...]
    shape: Shape
    attrs: Attrs = ()
    span: Optional[Span] = field(default=None, compare=False)
    phase: Phase = Phase.PER_STEP

    def attr(self, key: str, default: object = None) -> object:
        for name, value in self.attrs:
            if name == key:
                return value
        return default


def attrs(**values: object) -> Attrs:
    return tuple(sorted(values.items()))


@dataclass(frozen=True, slots=True)
class Decl:
    """A declared input, state, parameter, size or hyper-parameter."""

    name: str
    shape: Shape = SCALAR
    default: Optional[float] = None  # sizes and hypers: default value; params: constant init
    span: Optional[Span] = field(default=None, compare=False)


@dataclass(frozen=True)
class Graph:
    name: str
    input: Decl
    states: Tuple[Decl, ...]
    params: Tuple[Decl, ...]
    sizes: Tuple[Decl, ...]
    hypers: Tuple[Decl, ...]
    nodes: Tuple[Node, ...]
    next_states: Tuple[str, ...]
    outputs: Tuple[str, ...]
    passes: Tuple[str, ...] = ()  # the passes that made this graph, in order
    buffers: Tuple[Decl, ...] = ()  # constant tensors (default: their value), registered buffers
    # Inputs besides the first, in declaration order (read at every step, or once per sequence:
    # those named in `per_sequence`); each is a leaf, flat like the first.
    extra_inputs: Tuple[Decl, ...] = ()
    per_sequence: Tuple[str, ...] = ()

    @property
    def inputs(self) -> Tuple[Decl, ...]:
        """Every input, the first (read at every step) first."""
        return (self.input,) + self.extra_inputs

    def inputs_read_per_step(self) -> Tuple[str, ...]:
        """The names of the inputs read at every step (not ``per sequence``), the first first."""
        return tuple(d.name for d in self.inputs if d.name not in self.per_sequence)

    def node_map(self) -> Dict[str, Node]:
        return {node.name: node for node in self.nodes}

    def users(self) -> Dict[str, Tuple[str, ...]]:
        found: Dict[str, list] = {node.name: [] for node in self.nodes}
        for node in self.nodes:
            for name in node.inputs:
                found[name].append(node.name)
        return {name: tuple(users) for name, users in found.items()}

    def results(self) -> Tuple[str, ...]:
        """Nodes whose values leave the cell: next states and outputs."""
        return self.next_states + self.outputs

    def with_nodes(self, nodes: Iterable[Node], pass_name: str, **changes) -> "Graph":
        return replace(self, nodes=tuple(nodes), passes=self.passes + (pass_name,), **changes)

    def __str__(self) -> str:
        return format_graph(self)


class IRError(Exception):
    """A broken IR invariant: a bug in rnndsl, never in the user's cell."""


def _format_value(value: object) -> str:
    if isinstance(value, tuple) and value and all(isinstance(item, Size) for item in value):
        return f"[{', '.join(str(item) for item in value)}]"  # the dims of a reshape
    return repr(value) if not isinstance(value, Size) else str(value)


def format_node(node: Node) -> str:
    if node.op is Op.CONST:
        rhs = repr(node.attr("value"))
    else:
        args = list(node.inputs) + [f"{k}={_format_value(v)}" for k, v in node.attrs]
        rhs = f"{node.op.label}({', '.join(args)})"
    return f"{node.name} = {rhs}  : {node.shape}"


_PHASE_TITLES = {Phase.ONCE: "once per sequence (parameters only)",
                 Phase.PER_SEQUENCE: "once per sequence, per example (per-sequence inputs)",
                 Phase.PER_INPUT: "for all steps at once (input only)",
                 Phase.PER_STEP: "every step"}


def format_graph(graph: Graph) -> str:
    """The graph as a readable program."""
    def decls(items: Iterable[Decl]) -> str:
        return ", ".join(f"{d.name}: {d.shape}" for d in items) or "-"

    inputs = ", ".join(f"{d.name}: {d.shape}" + (" per sequence" if d.name in graph.per_sequence else "")
                       for d in graph.inputs)
    lines = [f"graph {graph.name}({inputs}) {{"]
    lines.append(f"  states  {decls(graph.states)}")
    lines.append(f"  params  {decls(graph.params)}")
    if graph.buffers:
        lines.append(f"  buffers {decls(graph.buffers)}")
    if graph.sizes:
        lines.append("  sizes   " + ", ".join(f"{d.name}" + (f" = {d.default:g}" if d.default is not None else "")
                                          for d in graph.sizes))
    if graph.hypers:
        lines.append("  hypers  " + ", ".join(f"{d.name} = {d.default:g}" for d in graph.hypers))
    if graph.passes:
        lines.append(f"  passes  {', '.join(graph.passes)}")
    body = [n for n in graph.nodes if n.op.kind is not OpKind.LEAF or n.op is Op.CONST]
    phases = sorted({n.phase for n in body})
    for phase in phases:
        if len(phases) > 1:
            lines.append(f"  # {_PHASE_TITLES[phase]}")
        lines.extend(f"  {format_node(n)}" for n in body if n.phase == phase)
    nexts = ", ".join(f"{d.name}' = {name}" for d, name in zip(graph.states, graph.next_states))
    lines.append(f"  next    {nexts}")
    lines.append(f"  output  {', '.join(graph.outputs)}")
    lines.append("}")
    return "\n".join(lines)
