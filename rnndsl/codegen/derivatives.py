"""Derivative rules: one per IR op, the third per-op table (after shape rules and emitters).

A rule reads the node's output gradient and returns, for each input, its
gradient contribution as code (or None where the input gets none). Rules ask
the :class:`Rule` context for the forward values they need (``r.value(i)``,
``r.output()``), and that is all the backward saves: the sequence-level
generator (rnndsl/codegen/backward.py) runs every rule once to learn what to save,
then emits the saving forward and the backward around them.

Contributions come in four forms, so the generator can sum them cheaply and
handle broadcasting in one place:

- :class:`Term`: an expression, in the node's output shape unless it says
  otherwise; flowing into a parameter vector it is summed over the batch, and
  over time outside the loop.
- :class:`Product`: ``a * b``; several add up with ``torch.addcmul``.
- :class:`Placed`: the gradient of a slice, placed into the input's range;
  the slices of one vector join with one ``torch.cat``.
- :class:`Outer`: the gradient of the matrix in ``W @ v`` (or of the kernel in
  ``conv(K, v)``), the sum over the batch (and over time, in the loop) of
  ``grad ⊗ v``: the generator buffers ``grad`` across steps and computes all of
  them with one GEMM (one convolution).

Random ops differentiate as in evaluation mode (where they are the identity);
in training their noise is drawn inside the loop and not saved, so a cell that
uses them trains through autograd instead (``Derivative.in_training``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Protocol, Sequence, Union

from ..ir import Node, Op, Shape, Size
from .base import atom, reshape_code


@dataclass(frozen=True)
class Term:
    """A gradient as an expression; ``shape`` None means the node's output shape."""

    expr: str
    shape: Optional[Shape] = None


@dataclass(frozen=True)
class Product:
    """The gradient ``left * right``, in the node's output shape."""

    left: str
    right: str


@dataclass(frozen=True)
class Placed:
    """A gradient of the input's features ``[start, start + length)``; zero elsewhere."""

    expr: str
    start: Size
    length: Size


@dataclass(frozen=True)
class Outer:
    """The gradient of ``W`` in ``W @ v``: sum over examples of ``grad ⊗ v``, where v is input ``vector``.

    ``call`` is that sum as code of ``{grad}`` and ``{vector}``, each with any leading dims (one
    step's batch, or all steps at once): ``outer_sum`` for a matrix product, one GEMM, or a
    convolution's kernel gradient.
    """

    grad: str
    vector: int
    call: str = "outer_sum({grad}, {vector})"


Contribution = Union[Term, Product, Placed, Outer]


class Rule(Protocol):
    """What a derivative rule sees of the node it differentiates."""

    node: Node
    grad: str  # the output gradient, a variable name

    def needs(self, index: int) -> bool:
        """Whether input ``index`` takes a gradient (parameters, states, the input and what depends on them)."""

    def shape(self, index: int) -> Shape:
        """The IR shape of input ``index``."""

    def value(self, index: int) -> str:
        """The forward value of input ``index``: asking for it saves it for the backward."""

    def output(self) -> str:
        """The forward value of the node itself, saved likewise."""

    def grad_times_matrix(self, index: int) -> str:
        """Code for ``grad @ M``, M the matrix input ``index``: one GEMM."""

    def size(self, size: Size) -> str:
        """A size as code."""

    def fresh(self, base: str) -> str:
        """A new local variable name."""

    def emit(self, line: str) -> None:
        """A statement to run before the contributions are used."""


Contributions = Sequence[Optional[Contribution]]


@dataclass(frozen=True)
class Derivative:
    """An op's derivative rule; ``in_training`` False: valid only in evaluation mode."""

    rule: Callable[[Rule], Contributions]
    in_training: bool = True


def _unary(function: str, of_output: bool) -> Callable[[Rule], Contributions]:
    """``function(grad, y)`` where y is the op's output (``of_output``) or its input."""
    def rule(r: Rule) -> Contributions:
        forward = r.output() if of_output else r.value(0)
        return [Term(f"{function}({r.grad}, {forward})")]
    return rule


def _neg(r: Rule) -> Contributions:
    return [Term(f"-{r.grad}")]


def _add(r: Rule) -> Contributions:
    return [Term(r.grad), Term(r.grad)]


def _sub(r: Rule) -> Contributions:
    return [Term(r.grad), Term(f"-{r.grad}") if r.needs(1) else None]


def _mul(r: Rule) -> Contributions:
    def times(other: int) -> Contribution:
        # A number (a constant or hyper-parameter) is a Python float, which addcmul refuses.
        value = r.value(other)
        return Term(f"{r.grad} * {value}") if r.shape(other).is_scalar else Product(r.grad, value)
    return [times(1) if r.needs(0) else None, times(0) if r.needs(1) else None]


def _div(r: Rule) -> Contributions:
    # d(a/b)/db = -(a/b)/b: the output, already computed, stands for a/b.
    return [Term(f"{r.grad} / {r.value(1)}") if r.needs(0) else None,
            Term(f"-{r.grad} * {r.output()} / {r.value(1)}") if r.needs(1) else None]


def _exp(r: Rule) -> Contributions:
    return [Product(r.grad, r.output())]


def _log(r: Rule) -> Contributions:
    return [Term(f"{r.grad} / {r.value(0)}")]


def _abs(r: Rule) -> Contributions:
    return [Product(r.grad, f"torch.sgn({r.value(0)})")]


def _sqrt(r: Rule) -> Contributions:
    return [Term(f"{r.grad} / (2.0 * {r.output()})")]


def _softplus(r: Rule) -> Contributions:
    # beta 1 and threshold 20: the defaults of torch.nn.functional.softplus, which the forward calls.
    return [Term(f"torch.ops.aten.softplus_backward({r.grad}, {r.value(0)}, 1.0, 20.0)")]


def _relu(r: Rule) -> Contributions:
    return [Term(f"torch.ops.aten.threshold_backward({r.grad}, {r.output()}, 0.0)")]


def _of_input(template: str) -> Callable[[Rule], Contributions]:
    """The gradient ``template`` of the output gradient ``{g}`` and the input ``{x}``."""
    def rule(r: Rule) -> Contributions:
        return [Term(template.format(g=r.grad, x=r.value(0)))]
    return rule


def _expm1(r: Rule) -> Contributions:
    return [Term(f"{r.grad} * ({r.output()} + 1.0)")]


def _pow(r: Rule) -> Contributions:
    # torch's pow_backward for a number exponent k: zero where k == 0, else grad * k * a ** (k - 1).
    # k == 0 is its own case: at a == 0, k * a ** (k - 1) would be 0 * inf, NaN.
    base, exponent = r.value(0), r.value(1)
    try:
        k = float(exponent)  # a literal exponent (`a ** 2`): the case is decided here
    except ValueError:  # a hyper-parameter or a number computed from them: decided when it runs
        return [Term(f"({r.grad} * ({exponent} * torch.pow({base}, {exponent} - 1.0)) if {exponent} != 0.0 "
                     f"else torch.zeros_like({r.grad}))"), None]
    return [Term(f"{r.grad} * ({k!r} * torch.pow({base}, {k - 1.0!r}))" if k != 0.0
                 else f"torch.zeros_like({r.grad})"), None]


def _extremum(larger: str) -> Callable[[Rule], Contributions]:
    """max (``larger`` ">") and min ("<") of two tensors: torch.maximum's subgradient, which
    splits the gradient in halves where the two are equal."""
    def rule(r: Rule) -> Contributions:
        a, b = r.value(0), r.value(1)

        def share(mine: str, other: str) -> Term:
            return Term(f"torch.where({mine} {larger} {other}, {r.grad}, "
                        f"torch.where({mine} == {other}, {r.grad} / 2.0, 0.0))")
        return [share(a, b) if r.needs(0) else None, share(b, a) if r.needs(1) else None]
    return rule


def _clamp(r: Rule) -> Contributions:
    # torch.clamp's subgradient: the gradient passes where lo <= v <= hi, bounds included.
    v, low, high = r.value(0), r.value(1), r.value(2)
    return [Term(f"torch.where({v} < {low}, 0.0, torch.where({v} > {high}, 0.0, {r.grad}))"), None, None]


def _clamp_one_side(keeps: str) -> Callable[[Rule], Contributions]:
    """clamp_min (``keeps`` ">=") and clamp_max ("<="): the gradient passes where v is kept, ties included."""
    def rule(r: Rule) -> Contributions:
        return [Term(f"torch.where({r.value(0)} {keeps} {r.value(1)}, {r.grad}, 0.0)"), None]
    return rule


def _no_gradient(r: Rule) -> Contributions:
    """A comparison's mask is piecewise constant: no gradient."""
    return [None] * len(r.node.inputs)


def _where(r: Rule) -> Contributions:
    # `.to(torch.bool)`: a mask kept over time is stored in the input's dtype, as ones and zeros.
    mask = f"{atom(r.value(0))}.to(torch.bool)"
    return [None, Term(f"torch.where({mask}, {r.grad}, 0.0)") if r.needs(1) else None,
            Term(f"torch.where({mask}, 0.0, {r.grad})") if r.needs(2) else None]


def _spread(r: Rule, grad: str) -> Term:
    """A reduction's gradient (one unit per example) spread over the units of its input."""
    # `list(...)`: in Python (the eager cell's methods) a size's slice is a tuple, in TorchScript a list.
    return Term(f"{atom(grad)}.expand(list({atom(grad)}.size()[:-1]) + [{r.size(r.shape(0).dims[0])}])", r.shape(0))


def _sum(r: Rule) -> Contributions:
    return [_spread(r, r.grad)]


def _mean(r: Rule) -> Contributions:
    return [_spread(r, f"{r.grad} / ({r.size(r.shape(0).dims[0])})")]


def _logsumexp(r: Rule) -> Contributions:
    return [Term(f"{r.grad} * torch.exp({r.value(0)} - {r.output()})", r.shape(0))]


def _softmax(r: Rule) -> Contributions:
    # torch's _softmax_backward_data: y * (grad - sum(grad * y)).
    y = r.output()
    return [Term(f"{y} * ({r.grad} - ({r.grad} * {y}).sum(-1, keepdim=True))")]


def _matmul(r: Rule) -> Contributions:
    # W @ v: dv = grad @ W, one GEMM; dW is left to the generator, which batches it over steps.
    return [Outer(r.grad, 1) if r.needs(0) else None,
            Term(r.grad_times_matrix(0), r.shape(1)) if r.needs(1) else None]


def _chunk(r: Rule) -> Contributions:
    size = r.node.shape.dims[0]
    return [Placed(r.grad, size * r.node.attr("index"), size)]


def _slice(r: Rule) -> Contributions:
    return [Placed(r.grad, r.node.attr("start"), r.node.attr("length"))]


def _concat(r: Rule) -> Contributions:
    # Vectors join along features (the last dim), matrices along rows.
    dim = "0" if r.node.shape.is_matrix else "-1"
    out, start = [], Size()
    for index in range(len(r.node.inputs)):
        length = r.shape(index).dims[0]
        out.append(Term(f"{r.grad}.narrow({dim}, {r.size(start)}, {r.size(length)})", r.shape(index))
                   if r.needs(index) else None)
        start = start + length
    return out


def _layernorm(r: Rule) -> Contributions:
    # torch.nn.functional.layer_norm keeps no mean and 1/std; they are recomputed here from the
    # saved input, one extra normalization per step, instead of saved.
    x, weight, bias = (r.value(i) for i in range(3))
    eps = repr(float(r.node.attr("eps", 1e-5)))
    normalized, mean, rstd = (r.fresh(name) for name in ("normalized", "mean", "rstd"))
    grads = [r.fresh(f"{name}_grad") for name in ("x", "weight", "bias")]
    wanted = ", ".join(str(r.needs(i)) for i in range(3))
    r.emit(f"{normalized}, {mean}, {rstd} = torch.native_layer_norm({x}, [{x}.size(-1)], {weight}, {bias}, {eps})")
    r.emit(f"{', '.join(grads)} = torch.ops.aten.native_layer_norm_backward({r.grad}, {x}, "
           f"[{x}.size(-1)], {mean}, {rstd}, {weight}, {bias}, [{wanted}])")
    # The weight and bias gradients come back summed over the batch.
    return [Term(grads[0]) if r.needs(0) else None,
            Term(grads[1], r.shape(1)) if r.needs(1) else None,
            Term(grads[2], r.shape(2)) if r.needs(2) else None]


# Tensors with named sizes. A gradient keeps the batchedness of the node's output: flowing into a
# parameter it is summed over the batch (and time) by the generator.

def _in_shape_of(r: Rule, index: int, expr: str) -> Optional[Contribution]:
    """``expr`` as input ``index``'s gradient, if it takes one."""
    return Term(expr, Shape(r.shape(index).dims, r.node.shape.batched)) if r.needs(index) else None


def _reshape(r: Rule) -> Contributions:
    # The inverse reshape: the node's new dims back to the input's last `count` dims.
    count, dims = r.node.attr("count"), r.shape(0).dims
    replaced = len(r.node.attr("dims"))
    return [_in_shape_of(r, 0, reshape_code(r.grad, replaced, dims[len(dims) - count:]))]


def _expand(r: Rule) -> Contributions:
    # The gradient reached this node already summed over the broadcast dims (to size 1).
    return [_in_shape_of(r, 0, r.grad + ".squeeze(-1)" * r.node.attr("trailing"))]


def _transpose(r: Rule) -> Contributions:
    return [_in_shape_of(r, 0, f"{r.grad}.transpose(-1, -2)")]


def _outer(r: Rule) -> Contributions:
    # d(a ⊗ b): da = g @ b, db = a @ g, per leading dims.
    return [_in_shape_of(r, 0, f"torch.matmul({r.grad}, {r.value(1)}.unsqueeze(-1)).squeeze(-1)")
            if r.needs(0) else None,
            _in_shape_of(r, 1, f"torch.matmul({r.value(0)}.unsqueeze(-2), {r.grad}).squeeze(-2)")
            if r.needs(1) else None]


def _contract(r: Rule) -> Contributions:
    g, form = r.grad, r.node.attr("form")
    a = r.value(0) if r.needs(1) else None
    b = r.value(1) if r.needs(0) else None
    if form == "mv":    # y = M v: dM = g ⊗ v, dv = g @ M
        grads = (f"{g}.unsqueeze(-1) * {b}.unsqueeze(-2)", f"torch.matmul({g}.unsqueeze(-2), {a}).squeeze(-2)")
    elif form == "vm":  # y = v M: dv = M @ g, dM = v ⊗ g
        grads = (f"torch.matmul({b}, {g}.unsqueeze(-1)).squeeze(-1)", f"{a}.unsqueeze(-1) * {g}.unsqueeze(-2)")
    else:               # C = A B: dA = g B^T, dB = A^T g
        grads = (f"torch.matmul({g}, {b}.transpose(-1, -2))", f"torch.matmul({a}.transpose(-1, -2), {g})")
    return [_in_shape_of(r, index, grads[index]) for index in (0, 1)]


def _sum_over(r: Rule) -> Contributions:
    dim, dims = r.node.attr("dim"), r.shape(0).dims
    # The gradient spread back over the summed dim: an expand (a view) to the input's size. (`list`:
    # in Python a size is a torch.Size, which takes no list added to it; in TorchScript a no-op.)
    after = -dim - 1  # dims after the summed one
    size = f"[{r.size(dims[dim])}]"
    sizes = (f"list({r.grad}.size()) + {size}" if after == 0 else
             f"list({r.grad}.size()[:-{after}]) + {size} + list({r.grad}.size()[-{after}:])")
    return [_in_shape_of(r, 0, f"{r.grad}.unsqueeze({dim}).expand({sizes})")]


def _max_over(r: Rule) -> Contributions:
    # torch.amax's subgradient: the gradient split evenly between the elements equal to the maximum.
    dim = r.node.attr("dim")
    at_max = r.fresh("at_max")
    r.emit(f"{at_max} = ({r.value(0)} == {r.output()}.unsqueeze({dim})).to({r.grad}.dtype)")
    return [_in_shape_of(r, 0, f"{at_max} * ({r.grad} / {at_max}.sum({dim})).unsqueeze({dim})")]


def _conv(r: Rule) -> Contributions:
    # y = conv(K, v): dv is the transposed convolution of the gradient by K; dK, summed over the
    # examples, is left to the generator, which batches it over steps as a matrix product's.
    kernel = r.value(0)
    return [Outer(r.grad, 1, f"conv_same_weight_grad({{grad}}, {{vector}}, {kernel})") if r.needs(0) else None,
            _in_shape_of(r, 1, f"conv_same_input_grad({r.grad}, {kernel})")]


def _first_only(r: Rule) -> Contributions:
    """Evaluation-mode dropout and zoneout give their first input unchanged."""
    return [Term(r.grad)] + [None] * (len(r.node.inputs) - 1)


DERIVATIVES: Dict[Op, Derivative] = {
    Op.NEG: Derivative(_neg),
    Op.ADD: Derivative(_add),
    Op.SUB: Derivative(_sub),
    Op.MUL: Derivative(_mul),
    Op.DIV: Derivative(_div),
    Op.SIGMOID: Derivative(_unary("torch.ops.aten.sigmoid_backward", of_output=True)),
    Op.TANH: Derivative(_unary("torch.ops.aten.tanh_backward", of_output=True)),
    Op.RELU: Derivative(_relu),
    Op.EXP: Derivative(_exp),
    Op.LOG: Derivative(_log),
    Op.SOFTPLUS: Derivative(_softplus),
    Op.ABS: Derivative(_abs),
    Op.SQRT: Derivative(_sqrt),
    Op.SILU: Derivative(_unary("torch.ops.aten.silu_backward", of_output=False)),
    Op.GELU: Derivative(_unary("torch.ops.aten.gelu_backward", of_output=False)),
    Op.ELU: Derivative(_of_input("torch.ops.aten.elu_backward({g}, 1.0, 1.0, 1.0, False, {x})")),
    # selu is elu with torch's alpha and scale.
    Op.SELU: Derivative(_of_input("torch.ops.aten.elu_backward({g}, 1.6732632423543772, 1.0507009873554805, "
                                  "1.0, False, {x})")),
    Op.MISH: Derivative(_unary("torch.ops.aten.mish_backward", of_output=False)),
    Op.LOGSIGMOID: Derivative(_of_input("{g} * torch.sigmoid(-{x})")),
    Op.HARDTANH: Derivative(_of_input("torch.ops.aten.hardtanh_backward({g}, {x}, -1.0, 1.0)")),
    Op.HARDSIGMOID: Derivative(_unary("torch.ops.aten.hardsigmoid_backward", of_output=False)),
    Op.SOFTSIGN: Derivative(_of_input("{g} / torch.square(1.0 + torch.abs({x}))")),
    Op.SIN: Derivative(_of_input("{g} * torch.cos({x})")),
    Op.COS: Derivative(_of_input("-{g} * torch.sin({x})")),
    Op.LOG1P: Derivative(_of_input("{g} / (1.0 + {x})")),
    Op.EXPM1: Derivative(_expm1),
    Op.ERF: Derivative(_of_input("{g} * 1.1283791670955126 * torch.exp(-{x} * {x})")),  # 2/sqrt(pi)
    Op.POW: Derivative(_pow),
    Op.MAXIMUM: Derivative(_extremum(">")),
    Op.MINIMUM: Derivative(_extremum("<")),
    Op.CLAMP: Derivative(_clamp),
    Op.CLAMP_MIN: Derivative(_clamp_one_side(">=")),
    Op.CLAMP_MAX: Derivative(_clamp_one_side("<=")),
    Op.LT: Derivative(_no_gradient),
    Op.LE: Derivative(_no_gradient),
    Op.GT: Derivative(_no_gradient),
    Op.GE: Derivative(_no_gradient),
    Op.WHERE: Derivative(_where),
    Op.SUM: Derivative(_sum),
    Op.MEAN: Derivative(_mean),
    Op.LOGSUMEXP: Derivative(_logsumexp),
    Op.SOFTMAX: Derivative(_softmax),
    Op.MATMUL: Derivative(_matmul),
    Op.CHUNK: Derivative(_chunk),
    Op.SLICE: Derivative(_slice),
    Op.CONCAT: Derivative(_concat),
    Op.LAYERNORM: Derivative(_layernorm),
    # In training these draw fresh noise at every step, which the derived backward does not save.
    Op.DROPOUT: Derivative(_first_only, in_training=False),
    Op.ZONEOUT: Derivative(_first_only, in_training=False),
    Op.RESHAPE: Derivative(_reshape),
    Op.EXPAND: Derivative(_expand),
    Op.TRANSPOSE: Derivative(_transpose),
    Op.OUTER: Derivative(_outer),
    Op.CONTRACT: Derivative(_contract),
    Op.SUM_OVER: Derivative(_sum_over),
    Op.MAX_OVER: Derivative(_max_over),
    Op.CONV: Derivative(_conv),
}
