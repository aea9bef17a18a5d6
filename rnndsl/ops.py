"""Per-op tables of the language: the functions a cell may call, and each op's shape rule.

Adding an op means one entry here (and one in the code emitters of
rnndsl/codegen/base.py, and one in the derivative rules of rnndsl/codegen/derivatives.py);
tests/test_ops_tables.py checks that every op has an entry in every table. Algebraic facts
live here too, read by whoever needs them: ``COMMUTATIVE_OPS`` (with ``operand_orders``) and
``Function.probability_last`` (``PROBABILITY_OPS``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Iterator, List, Optional, Tuple

from .ir import ONE, Node, Op, Shape, Size


class ShapeError(Exception):
    """Operands whose shapes do not fit; rnndsl/check.py adds the source position."""


@dataclass(frozen=True)
class Function:
    """A function callable by name in a ``.cell`` file."""

    op: Op
    min_args: int
    max_args: Optional[int]  # None: any number
    doc: str
    probability_last: bool = False  # its last argument is a probability: torch refuses one outside [0, 1]
    # Arguments that name a size, not a value (`split(q, heads)`): they become attributes.
    size_args: Tuple[int, ...] = ()
    # The node's attributes from its value arguments' shapes and its size arguments (ShapeError if none fit).
    attributes: Optional[Callable[[List[Shape], List[Size]], Dict[str, object]]] = None
    # The op when one argument is a number and the other a vector: `max(v, 0.0)` is torch's
    # clamp_min, whose subgradient at a tie passes to v (torch.maximum's splits it in halves).
    with_number: Optional[Op] = None


FUNCTIONS: Dict[str, Function] = {
    "sigmoid": Function(Op.SIGMOID, 1, 1, "logistic sigmoid"),
    "tanh": Function(Op.TANH, 1, 1, "hyperbolic tangent"),
    "relu": Function(Op.RELU, 1, 1, "max(x, 0)"),
    "exp": Function(Op.EXP, 1, 1, "exponential"),
    "log": Function(Op.LOG, 1, 1, "natural logarithm"),
    "softplus": Function(Op.SOFTPLUS, 1, 1, "log(1 + exp(x))"),
    "abs": Function(Op.ABS, 1, 1, "absolute value"),
    "sqrt": Function(Op.SQRT, 1, 1, "square root"),
    "silu": Function(Op.SILU, 1, 1, "x * sigmoid(x)"),
    "gelu": Function(Op.GELU, 1, 1, "x * Phi(x), Phi the normal CDF (torch's exact gelu)"),
    "elu": Function(Op.ELU, 1, 1, "x if x > 0 else exp(x) - 1"),
    "selu": Function(Op.SELU, 1, 1, "scaled elu, torch's constants"),
    "mish": Function(Op.MISH, 1, 1, "x * tanh(softplus(x))"),
    "logsigmoid": Function(Op.LOGSIGMOID, 1, 1, "log(sigmoid(x))"),
    "hardtanh": Function(Op.HARDTANH, 1, 1, "clamp(x, -1, 1)"),
    "hardsigmoid": Function(Op.HARDSIGMOID, 1, 1, "clamp(x / 6 + 1/2, 0, 1)"),
    "softsign": Function(Op.SOFTSIGN, 1, 1, "x / (1 + abs(x))"),
    "sin": Function(Op.SIN, 1, 1, "sine"),
    "cos": Function(Op.COS, 1, 1, "cosine"),
    "log1p": Function(Op.LOG1P, 1, 1, "log(1 + x)"),
    "expm1": Function(Op.EXPM1, 1, 1, "exp(x) - 1"),
    "erf": Function(Op.ERF, 1, 1, "the error function"),
    "pow": Function(Op.POW, 2, 2, "pow(a, k): a ** k for a number k"),
    "max": Function(Op.MAXIMUM, 2, 2, "max(a, b): the larger, unit by unit", with_number=Op.CLAMP_MIN),
    "min": Function(Op.MINIMUM, 2, 2, "min(a, b): the smaller, unit by unit", with_number=Op.CLAMP_MAX),
    "clamp": Function(Op.CLAMP, 3, 3, "clamp(v, lo, hi): v limited to [lo, hi], lo and hi numbers"),
    "where": Function(Op.WHERE, 3, 3, "where(m, a, b): a where the mask m (a comparison) holds, else b"),
    "sum": Function(Op.SUM, 1, 1, "sum(v): the sum of v's units, one unit per example"),
    "mean": Function(Op.MEAN, 1, 1, "mean(v): the mean of v's units, one unit per example"),
    "logsumexp": Function(Op.LOGSUMEXP, 1, 1, "logsumexp(v): log(sum(exp(v))), one unit per example"),
    "softmax": Function(Op.SOFTMAX, 1, 1, "softmax(v): exp(v) / sum(exp(v)) over v's units"),
    "chunk": Function(Op.CHUNK, 2, 2, "chunk(v, n): split v into n equal parts, `a, b = chunk(v, 2)`"),
    "concat": Function(Op.CONCAT, 2, None, "concat(a, b, ...): join vectors"),
    "layernorm": Function(Op.LAYERNORM, 3, 3, "layernorm(v, weight, bias): layer norm over features, eps 1e-5"),
    "dropout": Function(Op.DROPOUT, 2, 2, "dropout(v, p): zero units with probability p in training",
                        probability_last=True),
    "zoneout": Function(Op.ZONEOUT, 3, 3, "zoneout(new, old, p): keep old units with probability p in training",
                        probability_last=True),
}
# The ops whose last input is a probability.
PROBABILITY_OPS: FrozenSet[Op] = frozenset(function.op for function in FUNCTIONS.values() if function.probability_last)


def _not_matrix(shape: Shape, what: str) -> None:
    if shape.is_matrix and not shape.batched:
        raise ShapeError(f"{what} needs vectors or numbers, not a matrix; a matrix parameter can "
                         "only stand on the left of `@`")


# Ops that compute on numbers too (constants, hyper-parameters): a cell's `sigmoid(k)` of a
# hyper-parameter is a number, computed once with Python's floats (rnndsl/codegen/base.py,
# NUMBER_EMITTERS), not a tensor op.
NUMBER_OPS: FrozenSet[Op] = frozenset({
    Op.NEG, Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.SIGMOID, Op.TANH, Op.RELU, Op.EXP, Op.LOG, Op.SOFTPLUS,
    Op.ABS, Op.SQRT, Op.SILU, Op.GELU, Op.ELU, Op.SELU, Op.MISH, Op.LOGSIGMOID, Op.HARDTANH,
    Op.HARDSIGMOID, Op.SOFTSIGN, Op.SIN, Op.COS, Op.LOG1P, Op.EXPM1, Op.ERF, Op.POW, Op.MAXIMUM,
    Op.MINIMUM, Op.CLAMP, Op.CLAMP_MIN, Op.CLAMP_MAX})

# Comparisons: their result is a mask, which only `where` reads.
COMPARISON_OPS: Dict[str, Op] = {"<": Op.LT, "<=": Op.LE, ">": Op.GT, ">=": Op.GE}


def refuse_mask(shape: Shape, what: str) -> None:
    """A ShapeError where ``shape`` is a mask: only `where` reads one (lowering asks this of
    every operand of every other op)."""
    if shape.mask:
        raise ShapeError(f"{what} of a mask: a comparison's result is read only by `where`; "
                         "write `where(m, a, b)`, or `where(m, v, 0.0)` for v where m holds and 0 elsewhere")




def _elementwise_unary(node: Node, shapes: List[Shape]) -> Shape:
    (shape,) = shapes
    if node.op is Op.NEG and shape.is_matrix and not shape.batched:
        raise ShapeError("`-` of a matrix parameter: `-W @ x` groups as `(-W) @ x`, as in Python; "
                         "write `-(W @ x)`")
    _not_matrix(shape, node.op.label)
    refuse_mask(shape, node.op.label)
    if shape.is_scalar and node.op not in NUMBER_OPS:  # torch's functions take tensors, not numbers
        raise ShapeError(f"{node.op.label} takes a vector, not a number; write the number it gives, "
                         "or make the number a parameter vector")
    return shape


def broadcast(a: Shape, b: Shape, what: str) -> Shape:
    """Elementwise operands: numbers broadcast to anything, vectors must agree in size, and a
    vector of one unit (a reduction's result, a scalar parameter) broadcasts to any vector.

    Tensors of equal rank agree dim by dim, or where one has size 1: lowering makes the
    language's left-aligned broadcast (a per-head ``[heads]`` against ``[heads, key, value]``)
    explicit with an ``expand`` node (see :func:`aligned`).
    """
    for shape in (a, b):
        refuse_mask(shape, what)
        if not (a.is_tensor or b.is_tensor):  # beside a tensor, a two-dim parameter is an expanded vector
            _not_matrix(shape, what)
    if a.is_scalar:
        return b
    if b.is_scalar:
        return a
    if len(a.dims) > 1 or len(b.dims) > 1:
        if len(a.dims) != len(b.dims) or any(x != y and ONE not in (x, y) for x, y in zip(a.dims, b.dims)):
            raise ShapeError(f"{what} of values of shapes {_dims(a)} and {_dims(b)}, which do not fit: "
                             "dims are matched from the left, and a value of fewer dims must match the "
                             "leading dims of the other (a per-head [heads] against [heads, key, value])")
        return Shape(tuple(y if x == ONE else x for x, y in zip(a.dims, b.dims)), a.batched or b.batched)
    if a.dims != b.dims and ONE not in (a.dims[0], b.dims[0]):
        raise ShapeError(f"{what} of vectors of different sizes: [{a.dims[0]}] and [{b.dims[0]}]")
    return Shape(b.dims if a.dims[0] == ONE else a.dims, a.batched or b.batched)


def _elementwise_binary(node: Node, shapes: List[Shape]) -> Shape:
    return broadcast(shapes[0], shapes[1], _BINARY_WORDS[node.op])


_BINARY_WORDS = {Op.ADD: "addition", Op.SUB: "subtraction", Op.MUL: "multiplication", Op.DIV: "division",
                 Op.MAXIMUM: "max", Op.MINIMUM: "min"}


def _pow(node: Node, shapes: List[Shape]) -> Shape:
    base, exponent = shapes
    refuse_mask(exponent, "a power")
    if not exponent.is_scalar:
        raise ShapeError(f"the exponent of `**` must be a number or a hyper-parameter, got a {_describe(exponent)}")
    return broadcast(base, exponent, "a power")


def _clamp(node: Node, shapes: List[Shape]) -> Shape:
    value, low, high = shapes
    for what, bound in (("lower", low), ("upper", high)):
        if not bound.is_scalar:
            raise ShapeError(f"clamp's {what} bound must be a number or a hyper-parameter, got a "
                             f"{_describe(bound)}; for vector bounds write `min(max(v, lo), hi)`")
    return broadcast(value, low, "clamp")


def _clamp_one_side(node: Node, shapes: List[Shape]) -> Shape:
    value, bound = shapes
    if not bound.is_scalar:
        raise ShapeError(f"{node.op.label}'s bound must be a number, got a {_describe(bound)}")
    return broadcast(value, bound, node.op.label)


def _compare(node: Node, shapes: List[Shape]) -> Shape:
    a, b = shapes
    result = broadcast(a, b, "a comparison")
    if result.is_scalar:
        raise ShapeError("a comparison of two numbers: compare a vector, as in `v > 0`")
    return Shape(result.dims, result.batched, mask=True)


def _where(node: Node, shapes: List[Shape]) -> Shape:
    mask, a, b = shapes
    if not mask.mask:
        raise ShapeError(f"where's first argument must be a mask, a comparison such as `v > 0`; got a "
                         f"{_describe(mask)}")
    values = broadcast(a, b, "where")
    if values.is_scalar:
        raise ShapeError("where of two numbers would be a tensor of torch's default dtype: give one "
                         "vector branch, as in `where(m, ones, 0.0)` with `buffer ones[hidden] = 1.0`")
    return broadcast(Shape(mask.dims, mask.batched), values, "where")


def _reduction(node: Node, shapes: List[Shape]) -> Shape:
    (shape,) = shapes
    refuse_mask(shape, node.op.label)
    if not shape.is_vector:
        raise ShapeError(f"{node.op.label} takes a vector, got a {_describe(shape)}")
    return shape if node.op is Op.SOFTMAX else Shape((ONE,), shape.batched)


def _matmul(node: Node, shapes: List[Shape]) -> Shape:
    matrix, vector = shapes
    if not matrix.is_matrix:
        raise ShapeError(f"the left side of `@` must be a matrix parameter, got a {_describe(matrix)}")
    if not vector.is_vector:
        raise ShapeError(f"the right side of `@` must be a vector, got a {_describe(vector)}")
    rows, cols = matrix.dims
    if cols != vector.dims[0]:
        raise ShapeError(f"matrix product does not fit: a [{rows}, {cols}] matrix times a "
                         f"[{vector.dims[0]}] vector (the matrix needs {vector.dims[0]} columns to match, "
                         f"it has {cols})")
    return Shape((rows,), vector.batched)


def _chunk(node: Node, shapes: List[Shape]) -> Shape:
    """A vector, or a tensor along its first dim (the channels of a spatial value, as the
    language's broadcasting aligns dims from the left)."""
    (shape,) = shapes
    parts = node.attr("parts")
    if not (shape.is_vector or shape.is_tensor) or shape.mask:
        raise ShapeError(f"chunk splits a vector, or a tensor along its first dim, got a {_describe(shape)}")
    if not shape.dims[0].divisible_by(parts):
        what = "a vector" if shape.is_vector else f"the first dim of a {_describe(shape)}"
        raise ShapeError(f"chunk cannot split {what} of size {shape.dims[0]} into {parts} equal parts")
    return Shape((shape.dims[0] // parts,) + shape.dims[1:], shape.batched)


def _slice(node: Node, shapes: List[Shape]) -> Shape:
    (shape,) = shapes
    if not shape.is_vector:
        raise ShapeError(f"slice takes a vector, got a {_describe(shape)}")
    return Shape((node.attr("length"),), shape.batched)


def _concat(node: Node, shapes: List[Shape]) -> Shape:
    ranks = {len(s.dims) for s in shapes}
    if ranks == {1}:
        if len({s.batched for s in shapes}) > 1:
            raise ShapeError("concat joins vectors that are all per-example or all parameters, not a mix")
        total = Size()
        for s in shapes:
            total = total + s.dims[0]
        return Shape((total,), shapes[0].batched)
    if ranks == {2} and len({s.dims[1] for s in shapes}) == 1:
        if any(s.batched for s in shapes):  # stacked parameter matrices only: the rows of a GEMM's weight
            raise ShapeError("concat stacks matrices that are parameters (the rows of one weight), not per-example "
                             "tensors: got " + ", ".join(_describe(s) for s in shapes))
        rows = Size()
        for s in shapes:
            rows = rows + s.dims[0]
        return Shape((rows, shapes[0].dims[1]), False)
    raise ShapeError("concat joins vectors: got " + ", ".join(_describe(s) for s in shapes))


def _layernorm(node: Node, shapes: List[Shape]) -> Shape:
    x, weight, bias = shapes
    if not (x.is_vector and x.batched):
        raise ShapeError(f"layernorm normalizes a per-example vector, got a {_describe(x)}")
    for what, shape in (("weight", weight), ("bias", bias)):
        if not shape.is_vector or shape.batched or shape.dims != x.dims:
            raise ShapeError(f"layernorm's {what} must be a parameter vector of size [{x.dims[0]}], "
                             f"got a {_describe(shape)}")
    return x


def _probability_last(node: Node, shapes: List[Shape]) -> Shape:
    *values, p = shapes
    if not p.is_scalar:
        raise ShapeError(f"{node.op.label}'s probability must be a number or hyper-parameter")
    if node.op is Op.ZONEOUT:
        new, old = values
        if not (new.is_vector and new.batched and old.is_vector and old.batched and new.dims == old.dims):
            kinds = [("per-example " if shape.batched else "parameter ") * shape.is_vector + _describe(shape)
                     for shape in (new, old)]
            raise ShapeError(f"zoneout keeps units of a per-example vector from one of the same size, "
                             f"got a {kinds[0]} and a {kinds[1]}")
        return new
    (result,) = values
    if not result.is_vector:
        raise ShapeError(f"dropout zeroes units of a vector, got a {_describe(result)}")
    return result


def _describe(shape: Shape) -> str:
    if shape.mask:
        return f"mask {_dims(shape)}"
    if shape.is_scalar:
        return "number"
    if shape.is_vector:
        return f"vector [{shape.dims[0]}]"
    if shape.is_matrix and not shape.batched:
        return f"matrix [{shape.dims[0]}, {shape.dims[1]}]"
    return f"{'per-example ' if shape.batched else ''}tensor {_dims(shape)}"


def _dims(shape: Shape) -> str:
    return f"[{', '.join(str(d) for d in shape.dims)}]"


# Tensors with named sizes ------------------------------------------------------------------
#
# Per-example values may have several feature dims (`[B, heads, key, value]`). The ops below
# work on the trailing dims and batch over the leading ones, which must agree exactly: the
# only implicit broadcast is the left-aligned one of elementwise ops (see `aligned`).

def op_word(op: Op) -> str:
    """How error messages name an op: "multiplication", else its label."""
    return _BINARY_WORDS.get(op, op.label)


def aligned(a: Shape, b: Shape, what: str) -> Tuple[int, int]:
    """How many size-1 dims to append to each elementwise operand so that their ranks agree:
    a value of fewer dims broadcasts over the trailing dims of the other when its dims are the
    other's leading ones (``[heads]`` against ``[heads, key, value]`` reads as ``[heads, 1, 1]``).
    Numbers and equal ranks need none; any other mismatch is a ShapeError."""
    if a.is_scalar or b.is_scalar or len(a.dims) == len(b.dims) or not (a.is_tensor or b.is_tensor):
        return 0, 0
    short, long = (a, b) if len(a.dims) < len(b.dims) else (b, a)
    # A one-unit value (a scalar parameter, a feature reduction's result) broadcasts to all dims.
    if long.dims[:len(short.dims)] != short.dims and short.dims != (ONE,):
        raise ShapeError(f"{what} of values of shapes {_dims(a)} and {_dims(b)}, which do not fit: a value "
                         f"of fewer dims broadcasts over the trailing dims of the other, so its dims "
                         f"must be the other's leading ones ({_dims(long)} starts with "
                         f"[{', '.join(str(d) for d in long.dims[:len(short.dims)])}])")
    extra = len(long.dims) - len(short.dims)
    return (extra, 0) if short is a else (0, extra)


def _reshape(node: Node, shapes: List[Shape]) -> Shape:
    (shape,) = shapes
    count, dims = node.attr("count"), node.attr("dims")
    if len(shape.dims) < count:
        raise ShapeError(f"reshape of the last {count} dims of a {_describe(shape)}")
    if _product(shape.dims[len(shape.dims) - count:]) != _product(dims):
        raise ShapeError(f"reshape of {_dims(shape)} to {dims} changes the number of elements")
    return Shape(shape.dims[:len(shape.dims) - count] + tuple(dims), shape.batched)


def _product(dims) -> Size:
    total = Size.of(1)
    for dim in dims:
        total = total * dim
    return total


def _split_attributes(shapes: List[Shape], sizes: List[Size]) -> Dict[str, object]:
    (shape,), (parts,) = shapes, sizes
    if shape.is_scalar:
        raise ShapeError("split takes a vector or tensor, not a number")
    last = shape.dims[-1]
    part = last.over(parts.variables[0])
    if part is None or part.const < 0 or not (part.terms or part.const):
        raise ShapeError(f"cannot split [{last}] into `{parts}` parts: sizes are checked symbolically, "
                         f"so its size must be a multiple of {parts}, as in [{parts}*key]")
    return {"count": 1, "dims": (parts, part)}


def _join_attributes(shapes: List[Shape], sizes: List[Size]) -> Dict[str, object]:
    (shape,) = shapes
    if len(shape.dims) < 2:
        raise ShapeError(f"join merges the last two dims of a tensor, got a {_describe(shape)}")
    return {"count": 2, "dims": (shape.dims[-2] * shape.dims[-1],)}


def _reduce_over_attributes(function: str) -> Callable[[List[Shape], List[Size]], Dict[str, object]]:
    """The dim that ``sum_over(v, key)`` or ``max_over(v, key)`` reduces: the one dim of size ``key``."""
    def attributes(shapes: List[Shape], sizes: List[Size]) -> Dict[str, object]:
        (shape,), (size,) = shapes, sizes
        found = [i for i, dim in enumerate(shape.dims) if dim == size]
        if len(found) != 1:
            how = "has no dim" if not found else "has several dims"
            raise ShapeError(f"{function}: a value of shape {_dims(shape)} {how} of size `{size}`"
                             + (": name a size that only one dim has" if found else ""))
        return {"dim": found[0] - len(shape.dims)}
    return attributes


def _expand(node: Node, shapes: List[Shape]) -> Shape:
    (shape,) = shapes
    return Shape(shape.dims + (Size.of(1),) * node.attr("trailing"), shape.batched)


def _transpose(node: Node, shapes: List[Shape]) -> Shape:
    (shape,) = shapes
    if len(shape.dims) < 2:
        raise ShapeError(f"transpose swaps the last two dims of a tensor, got a {_describe(shape)}")
    return Shape(shape.dims[:-2] + (shape.dims[-1], shape.dims[-2]), shape.batched)


def _outer(node: Node, shapes: List[Shape]) -> Shape:
    a, b = shapes
    if a.is_scalar or b.is_scalar or a.dims[:-1] != b.dims[:-1]:
        raise ShapeError(f"outer takes two vectors, or two tensors of the same leading dims, got shapes "
                         f"{_dims(a)} and {_dims(b)}")
    return Shape(a.dims + b.dims[-1:], a.batched or b.batched)


def contract_form(a: Shape, b: Shape) -> Optional[str]:
    """Which product ``a @ b`` is when either side is a tensor (else None: a weight matrix times a
    vector, MATMUL): by ranks, matrix times vector ("mv"), vector times matrix ("vm"), or
    matrix times matrix ("mm"), each batched over equal leading dims."""
    if not (a.is_tensor or b.is_tensor):
        return None
    return {0: "mm", 1: "mv", -1: "vm"}.get(len(a.dims) - len(b.dims), "mm")


def _contract(node: Node, shapes: List[Shape]) -> Shape:
    a, b = shapes
    form, dims = node.attr("form"), None
    if not (a.is_scalar or b.is_scalar):
        if form == "mv" and len(a.dims) >= 2 and a.dims[:-2] == b.dims[:-1] and a.dims[-1] == b.dims[-1]:
            dims = a.dims[:-1]
        elif form == "vm" and len(b.dims) >= 2 and b.dims[:-2] == a.dims[:-1] and b.dims[-2] == a.dims[-1]:
            dims = b.dims[:-2] + b.dims[-1:]
        elif form == "mm" and len(a.dims) == len(b.dims) >= 2 and a.dims[:-2] == b.dims[:-2] \
                and a.dims[-1] == b.dims[-2]:
            dims = a.dims[:-1] + b.dims[-1:]
    if dims is None:
        hint = ("; for a convolution by a kernel, write `conv(K, v)`"
                if len(a.dims) == 4 and not a.batched and len(b.dims) == 3 and b.batched else "")
        raise ShapeError(f"product `@` of shapes {_dims(a)} and {_dims(b)} does not fit: the contracted "
                         "dims must agree, and the leading dims (one per head) must be the same" + hint)
    return Shape(dims, a.batched or b.batched)


def _reduce_over(node: Node, shapes: List[Shape]) -> Shape:
    (shape,) = shapes
    dim = node.attr("dim")
    if not -len(shape.dims) <= dim < 0:
        raise ShapeError(f"{node.op.value[0]} dim {dim} of a {_describe(shape)}")
    return Shape(shape.dims[:dim] + shape.dims[len(shape.dims) + dim + 1:], shape.batched)


def _conv(node: Node, shapes: List[Shape]) -> Shape:
    kernel, value = shapes
    if kernel.batched or kernel.mask or len(kernel.dims) != 4:
        raise ShapeError(f"conv's first argument must be a kernel parameter [out, in, kernel, kernel], got a "
                         f"{_describe(kernel)}")
    if not value.batched or value.mask or len(value.dims) != 3:
        raise ShapeError(f"conv's second argument must be a per-example spatial value [in, height, width], "
                         f"got a {_describe(value)}")
    out, channels, *window = kernel.dims
    if channels != value.dims[0]:
        raise ShapeError(f"conv does not fit: a kernel of shape {_dims(kernel)} reads [{channels}] channels, "
                         f"but the value of shape {_dims(value)} has [{value.dims[0]}]")
    for size in window:
        # A named size is checked when the cell is built (rnndsl/cellspec.py), its value known then.
        if not size.terms and size.const % 2 == 0:
            raise ShapeError(f"conv keeps height and width (zero padding of half the kernel on each side), "
                             f"so its kernel's sizes must be odd, got {_dims(kernel)}")
    return Shape((out,) + value.dims[1:], batched=True)


ShapeRule = Callable[[Node, List[Shape]], Shape]

SHAPE_RULES: Dict[Op, ShapeRule] = {
    Op.NEG: _elementwise_unary,
    Op.ADD: _elementwise_binary,
    Op.SUB: _elementwise_binary,
    Op.MUL: _elementwise_binary,
    Op.DIV: _elementwise_binary,
    Op.SIGMOID: _elementwise_unary,
    Op.TANH: _elementwise_unary,
    Op.RELU: _elementwise_unary,
    Op.EXP: _elementwise_unary,
    Op.LOG: _elementwise_unary,
    Op.SOFTPLUS: _elementwise_unary,
    Op.ABS: _elementwise_unary,
    Op.SQRT: _elementwise_unary,
    Op.SILU: _elementwise_unary,
    **{op: _elementwise_unary for op in (Op.GELU, Op.ELU, Op.SELU, Op.MISH, Op.LOGSIGMOID, Op.HARDTANH,
                                        Op.HARDSIGMOID, Op.SOFTSIGN, Op.SIN, Op.COS, Op.LOG1P, Op.EXPM1, Op.ERF)},
    Op.POW: _pow,
    Op.MAXIMUM: _elementwise_binary,
    Op.MINIMUM: _elementwise_binary,
    Op.CLAMP: _clamp,
    Op.CLAMP_MIN: _clamp_one_side,
    Op.CLAMP_MAX: _clamp_one_side,
    **{op: _compare for op in COMPARISON_OPS.values()},
    Op.WHERE: _where,
    **{op: _reduction for op in (Op.SUM, Op.MEAN, Op.LOGSUMEXP, Op.SOFTMAX)},
    Op.MATMUL: _matmul,
    Op.CHUNK: _chunk,
    Op.SLICE: _slice,
    Op.CONCAT: _concat,
    Op.LAYERNORM: _layernorm,
    Op.DROPOUT: _probability_last,
    Op.ZONEOUT: _probability_last,
    Op.RESHAPE: _reshape,
    Op.EXPAND: _expand,
    Op.TRANSPOSE: _transpose,
    Op.OUTER: _outer,
    Op.CONTRACT: _contract,
    Op.SUM_OVER: _reduce_over,
    Op.MAX_OVER: _reduce_over,
    Op.CONV: _conv,
}

# The functions of tensors with named sizes: kept together (their helpers come above), and
# joined into FUNCTIONS.
TENSOR_FUNCTIONS: Dict[str, Function] = {
    "split": Function(Op.RESHAPE, 2, 2, "split(v, heads): [heads*key] -> [heads, key], the last dim cut into "
                      "`heads` rows", size_args=(1,), attributes=_split_attributes),
    "join": Function(Op.RESHAPE, 1, 1, "join(v): [heads, value] -> [heads*value], the last two dims merged",
                     attributes=_join_attributes),
    "outer": Function(Op.OUTER, 2, 2, "outer(k, v): [heads, key] x [heads, value] -> [heads, key, value]"),
    "transpose": Function(Op.TRANSPOSE, 1, 1, "transpose(S): the last two dims swapped"),
    "sum_over": Function(Op.SUM_OVER, 2, 2, "sum_over(v, key): the sum over the dim of size `key`",
                         size_args=(1,), attributes=_reduce_over_attributes("sum_over")),
    "max_over": Function(Op.MAX_OVER, 2, 2, "max_over(v, key): the largest element along the dim of size `key`",
                         size_args=(1,), attributes=_reduce_over_attributes("max_over")),
    "conv": Function(Op.CONV, 2, 2, "conv(K, v): [in, height, width] -> [out, height, width], a 2-d convolution "
                     "by the kernel K[out, in, k, k] (k odd), zero-padded to keep height and width"),
}
FUNCTIONS.update(TENSOR_FUNCTIONS)

# Ops whose result is a whole dim larger than their operands (``outer(k, v)``): computed for all
# steps at once they would hold T times that, so the hoisting pass keeps them in the loop.
EXPANDING_OPS: FrozenSet[Op] = frozenset({Op.OUTER})

# Ops whose two operands may be swapped: ``a + b`` is ``b + a``.
COMMUTATIVE_OPS: FrozenSet[Op] = frozenset({Op.ADD, Op.MUL, Op.MAXIMUM, Op.MINIMUM})


def operand_orders(node: Node) -> Iterator[Tuple[str, ...]]:
    """The orders in which a pattern may read ``node``'s inputs: as written, and swapped when
    its op is commutative."""
    yield node.inputs
    if node.op in COMMUTATIVE_OPS:
        yield node.inputs[::-1]


BINARY_OPS = {"+": Op.ADD, "-": Op.SUB, "*": Op.MUL, "/": Op.DIV, "@": Op.MATMUL, "**": Op.POW,
              **COMPARISON_OPS}
