"""The shared base of code generation: what every target (rnndsl/codegen/step.py,
backward.py, parallel.py, scan.py) writes alike.

- ``EMITTERS``: one code emitter per IR op, the per-op table of this stage. A target's
  dialect is a dict merge, ``{**EMITTERS, Op.MATMUL: gemm("linear")}``.
- :class:`NodeEmitter`: a node as one line of code, its operands referred to as leaves
  (``self.weight``, ``0.5``), locals, or renamed whole-sequence values, cast to a dtype where
  a target asks (``casts``, from rnndsl/codegen/precision.py); :func:`atom` parenthesizes an
  operand.
- Lines of the time loop (:func:`masked_assignment`, :func:`state_update`), tuples,
  and :func:`biased_products`, the products whose GEMM can add their bias itself.
- :class:`PythonCode`: what a generator returns, its source and the globals it reads.
- :func:`validate_source`: the last guard on every generated source.

Nothing here imports torch: generated code names what it needs, and the runtime binds
those names (rnndsl/kernels.py, ``resolve_globals``).
"""
from __future__ import annotations

import io
import keyword
import math
import re
import tokenize
from dataclasses import dataclass
from typing import Callable, Collection, Dict, Iterable, List, Optional, Sequence, Tuple

from ..ir import Graph, IRError, Node, Op, OpKind, Phase
from ..names import RESERVED, Namespace
from ..ops import operand_orders

Emitter = Callable[[Node, List[str]], str]


@dataclass(frozen=True)
class PythonCode:
    """A generator's result, as torch.fx's ``PythonCode``: the source, and the names of the globals
    it reads (from rnndsl/names.py's registry), which the runtime binds before running it; and the
    C++ sources of the kernels it calls as ``self.fused_kernels[i]`` (rnndsl/codegen/fused.py)."""

    source: str
    globals: Tuple[str, ...]
    kernels: Tuple[str, ...] = ()


def size_code(value) -> str:
    """A size as code: ``4*self.hidden``."""
    return value.render(lambda name: f"self.{name}")


def _call(function: str) -> Emitter:
    return lambda node, args: f"{function}({', '.join(args)})"


def _infix(symbol: str) -> Emitter:
    return lambda node, args: f"{args[0]} {symbol} {args[1]}"


def gemm(function: str) -> Emitter:
    """``W @ v`` as ``function(v, W)``; given a third operand, ``function(v, W, bias)`` adds the
    bias in the same GEMM (see :meth:`NodeEmitter.expression`)."""
    return lambda node, args: f"{function}({', '.join([args[1], args[0]] + args[2:])})"


def _chunk(node: Node, args: List[str]) -> str:
    # `narrow`, not `Tensor.chunk`: TorchScript's derivative of chunk breaks from the second call on
    # (once the profiling executor specializes) when a part gets no gradient, e.g. an LSTM whose
    # loss reads only c, and its `chunk(...)[i]` can give silently wrong gradients.
    # A vector's features, or a tensor's first dim (a spatial value's channels).
    size = node.shape.dims[0]
    return f"{args[0]}.narrow({-len(node.shape.dims)}, {size_code(size * node.attr('index'))}, {size_code(size)})"


def _concat(node: Node, args: List[str]) -> str:
    dim = 0 if node.shape.is_matrix else -1
    return f"torch.cat([{', '.join(args)}], {dim})"


def _zoneout(node: Node, args: List[str]) -> str:
    new, old, p = args
    # Drawn at the shape of both: a per-example `new` beside a per-step `old` (all steps at once)
    # must get a draw per step, not one reused at every step.
    return (f"torch.where(torch.rand_like(torch.broadcast_tensors({new}, {old})[0]) < {p}, {old}, {new}) "
            f"if self.training else {new}")


def reshape_code(value: str, count: int, dims: Sequence) -> str:
    """``value`` with its last ``count`` dims made ``dims``: an unflatten, a flatten, or a reshape."""
    sizes = ", ".join(size_code(d) for d in dims)
    if count == 1:
        return f"{value}.unflatten(-1, [{sizes}])"
    if len(dims) == 1:
        return f"{value}.flatten(-{count})"
    return f"{value}.reshape(list({value}.size()[:-{count}]) + [{sizes}])"  # list: a torch.Size in Python


# `@` of tensors, batched over the leading dims: vectors take part as one-row or one-column matrices.
_CONTRACTIONS = {"mv": "torch.matmul({0}, {1}.unsqueeze(-1)).squeeze(-1)",
                 "vm": "torch.matmul({0}.unsqueeze(-2), {1}).squeeze(-2)",
                 "mm": "torch.matmul({0}, {1})"}


EMITTERS: Dict[Op, Emitter] = {
    Op.NEG: lambda node, args: f"-{args[0]}",
    Op.ADD: _infix("+"),
    Op.SUB: _infix("-"),
    Op.MUL: _infix("*"),
    Op.DIV: _infix("/"),
    Op.SIGMOID: _call("torch.sigmoid"),
    Op.TANH: _call("torch.tanh"),
    Op.RELU: _call("torch.relu"),
    Op.EXP: _call("torch.exp"),
    Op.LOG: _call("torch.log"),
    Op.SOFTPLUS: _call("torch.nn.functional.softplus"),
    Op.ABS: _call("torch.abs"),
    Op.SQRT: _call("torch.sqrt"),
    Op.SILU: _call("torch.nn.functional.silu"),
    Op.GELU: _call("torch.nn.functional.gelu"),
    Op.ELU: _call("torch.nn.functional.elu"),
    Op.SELU: _call("torch.selu"),
    Op.MISH: _call("torch.nn.functional.mish"),
    Op.LOGSIGMOID: _call("torch.nn.functional.logsigmoid"),
    Op.HARDTANH: _call("hardtanh"),
    Op.HARDSIGMOID: _call("torch.nn.functional.hardsigmoid"),
    Op.SOFTSIGN: lambda node, args: f"{atom(args[0])} / (1.0 + torch.abs({args[0]}))",
    Op.SIN: _call("torch.sin"),
    Op.COS: _call("torch.cos"),
    Op.LOG1P: _call("torch.log1p"),
    Op.EXPM1: _call("torch.expm1"),
    Op.ERF: _call("torch.erf"),
    Op.POW: _call("torch.pow"),
    Op.MAXIMUM: _call("torch.maximum"),
    Op.MINIMUM: _call("torch.minimum"),
    Op.CLAMP: _call("torch.clamp"),
    Op.CLAMP_MIN: _call("torch.clamp_min"),
    Op.CLAMP_MAX: _call("torch.clamp_max"),
    Op.LT: _infix("<"),
    Op.LE: _infix("<="),
    Op.GT: _infix(">"),
    Op.GE: _infix(">="),
    Op.WHERE: _call("torch.where"),
    Op.SUM: lambda node, args: f"{atom(args[0])}.sum(-1, keepdim=True)",
    Op.MEAN: lambda node, args: f"{atom(args[0])}.mean(-1, keepdim=True)",
    Op.LOGSUMEXP: lambda node, args: f"torch.logsumexp({args[0]}, -1, keepdim=True)",
    Op.SOFTMAX: lambda node, args: f"torch.softmax({args[0]}, -1)",
    # W @ v with v of shape (..., n): one GEMM for any number of leading dims.
    Op.MATMUL: gemm("torch.nn.functional.linear"),
    Op.CHUNK: _chunk,
    Op.SLICE: lambda node, args: (f"{args[0]}.narrow(-1, {size_code(node.attr('start'))}, "
                                  f"{size_code(node.attr('length'))})"),
    Op.CONCAT: _concat,
    Op.LAYERNORM: lambda node, args: (f"torch.nn.functional.layer_norm({args[0]}, [{args[0]}.size(-1)], "
                                      f"{args[1]}, {args[2]}, {node.attr('eps', 1e-5)!r})"),
    Op.DROPOUT: lambda node, args: f"torch.nn.functional.dropout({args[0]}, {args[1]}, self.training)",
    Op.ZONEOUT: _zoneout,
    Op.RESHAPE: lambda node, args: reshape_code(args[0], node.attr("count"), node.attr("dims")),
    Op.EXPAND: lambda node, args: args[0] + ".unsqueeze(-1)" * node.attr("trailing"),
    Op.TRANSPOSE: lambda node, args: f"{args[0]}.transpose(-1, -2)",
    Op.OUTER: lambda node, args: f"{args[0]}.unsqueeze(-1) * {args[1]}.unsqueeze(-2)",
    Op.CONTRACT: lambda node, args: _CONTRACTIONS[node.attr("form")].format(*args),
    Op.SUM_OVER: lambda node, args: f"{args[0]}.sum({node.attr('dim')})",
    Op.MAX_OVER: lambda node, args: f"{args[0]}.amax({node.attr('dim')})",
    Op.CONV: _call("conv_same"),  # rnndsl/kernels.py: torch's conv2d over any leading dims
}


def _number_call(template: str) -> Emitter:
    """A function of numbers on Python floats: ``template`` with ``{0}``, ``{1}``, ... its arguments."""
    return lambda node, args: template.format(*args)


_SOFTPLUS = "({0} if {0} > 20.0 else math.log1p(math.exp({0})))"  # torch's threshold 20

# Functions of numbers (hyper-parameters, constants), computed once on Python floats where the
# tensor op would refuse a number (rnndsl/ops.py, NUMBER_OPS): `sigmoid(k)` of a hyper-parameter.
NUMBER_EMITTERS: Dict[Op, Emitter] = {
    **{op: EMITTERS[op] for op in (Op.NEG, Op.ADD, Op.SUB, Op.MUL, Op.DIV)},
    # Split by sign, so that no exp overflows (Python's math.exp raises where TorchScript's gives inf).
    Op.SIGMOID: _number_call("(1.0 / (1.0 + math.exp(-{0})) if {0} >= 0.0 else math.exp({0}) / (1.0 + math.exp({0})))"),
    Op.TANH: _number_call("math.tanh({0})"),
    Op.RELU: _number_call("max({0}, 0.0)"),
    Op.EXP: _number_call("math.exp({0})"),
    Op.LOG: _number_call("math.log({0})"),
    Op.SOFTPLUS: _number_call(_SOFTPLUS),
    Op.ABS: _number_call("math.fabs({0})"),
    Op.SQRT: _number_call("math.sqrt({0})"),
    Op.SILU: _number_call("({0} / (1.0 + math.exp(-{0})) if {0} >= 0.0 "
                          "else {0} * math.exp({0}) / (1.0 + math.exp({0})))"),
    Op.GELU: _number_call("0.5 * {0} * (1.0 + math.erf({0} / 1.4142135623730951))"),
    Op.ELU: _number_call("({0} if {0} > 0.0 else math.expm1({0}))"),
    Op.SELU: _number_call("1.0507009873554805 * ({0} if {0} > 0.0 else 1.6732632423543772 * math.expm1({0}))"),
    Op.MISH: _number_call("{0} * math.tanh(" + _SOFTPLUS + ")"),
    Op.LOGSIGMOID: _number_call("min({0}, 0.0) - math.log1p(math.exp(-math.fabs({0})))"),
    Op.HARDTANH: _number_call("min(max({0}, -1.0), 1.0)"),
    Op.HARDSIGMOID: _number_call("min(max({0} / 6.0 + 0.5, 0.0), 1.0)"),
    Op.SOFTSIGN: _number_call("{0} / (1.0 + math.fabs({0}))"),
    Op.SIN: _number_call("math.sin({0})"),
    Op.COS: _number_call("math.cos({0})"),
    Op.LOG1P: _number_call("math.log1p({0})"),
    Op.EXPM1: _number_call("math.expm1({0})"),
    Op.ERF: _number_call("math.erf({0})"),
    Op.POW: _number_call("math.pow({0}, {1})"),
    Op.MAXIMUM: _number_call("max({0}, {1})"),
    Op.MINIMUM: _number_call("min({0}, {1})"),
    Op.CLAMP: _number_call("min(max({0}, {1}), {2})"),
    Op.CLAMP_MIN: _number_call("max({0}, {1})"),
    Op.CLAMP_MAX: _number_call("min({0}, {1})"),
}


def leaf_reference(node: Node) -> Optional[str]:
    """How code refers to a leaf: parameters, buffers and hypers live on the module, constants inline."""
    if node.op in (Op.PARAM, Op.BUFFER, Op.HYPER):
        return f"self.{node.name}"
    if node.op is Op.CONST:
        value = float(node.attr("value"))
        if not math.isfinite(value):  # repr gives `inf` or `nan`: a name, not a number
            raise IRError(f"constant {node.name} is {value}; the checker admits only finite numbers")
        return repr(value)
    return None


class NodeEmitter:
    """Writes nodes as lines of one method, in a dialect of the emitters.

    ``biased`` maps a matrix product to the sum that adds its bias (see
    :func:`biased_products`): the sum's line is then the product's GEMM with the bias.
    """

    def __init__(self, graph: Graph, emitters: Dict[Op, Emitter] = EMITTERS):
        self.graph = graph
        self.emitters = emitters
        self.biased: Dict[str, str] = {}
        self.nodes = graph.node_map()
        self.lines: List[str] = []
        # Lowering keeps body values clear of RESERVED, but the inputs and the states keep their
        # declared names in the IR; here those that would shadow what the code needs (`torch`,
        # `self`, `range`, `t`, `xs`, ...) become fresh locals.
        self.names = Namespace({n.name for n in graph.nodes})
        self.local = {n.name: self.names.fresh(n.name) for n in graph.nodes
                      if n.op in (Op.INPUT, Op.SEQUENCE_INPUT, Op.STATE) and n.name in RESERVED}
        # Parameters the method takes as arguments instead of reading them from the module
        # (see bind_parameters): parameter name -> local.
        self.parameter_locals: Dict[str, str] = {}
        # Values cast to a dtype where they are computed (rnndsl/codegen/precision.py): name -> dtype code.
        self.casts: Dict[str, str] = {}

    def var(self, name: str) -> str:
        """The local variable holding an input or a state."""
        return self.local.get(name, name)

    def leaf(self, node: Node) -> Optional[str]:
        """How this method refers to a leaf: a parameter bound to a local, else leaf_reference."""
        return self.parameter_locals.get(node.name) or leaf_reference(node)

    def bind_parameters(self, names: Namespace, leaves: Optional[Iterable[str]] = None) -> None:
        """Make parameters (or the named ``leaves``: parameters and buffers) locals of the method,
        bound from its parameter list, named as declared unless that would shadow what generated
        code uses."""
        leaves = [d.name for d in self.graph.params] if leaves is None else leaves
        self.parameter_locals = {name: (names.fresh(name) if name in RESERVED else name) for name in leaves}

    def ref(self, name: str, rename: Dict[str, str]) -> str:
        """How code refers to value ``name``: a leaf, its ``rename`` (whole-sequence values), or its local."""
        node = self.nodes[name]
        return self.leaf(node) or rename.get(name, self.var(name))

    def emitter_of(self, node: Node) -> Emitter:
        """The emitter of ``node``: a number's on Python floats, else the dialect's."""
        return NUMBER_EMITTERS[node.op] if node.shape.is_scalar else self.emitters[node.op]

    def inline(self, name: str) -> str:
        """A value as one expression of leaves, for code that runs before the nodes that compute it."""
        node = self.nodes[name]
        return self.leaf(node) or f"({self.emitter_of(node)(node, [self.inline(i) for i in node.inputs])})"

    def expression(self, node: Node, rename: Dict[str, str]) -> str:
        """``node``'s code; a sum that adds the bias of a ``biased`` product is that product's GEMM."""
        product = next((i for i in node.inputs if self.biased.get(i) == node.name), None)
        if product is not None:
            matrix, vector = (self.ref(name, rename) for name in self.nodes[product].inputs)
            bias = next(self.ref(i, rename) for i in node.inputs if i != product)
            return self.emitters[Op.MATMUL](self.nodes[product], [matrix, vector, bias])
        return self.emitter_of(node)(node, [self.ref(name, rename) for name in node.inputs])

    def emit(self, node: Node, indent: str, rename: Dict[str, str]) -> None:
        """Append ``node``'s line, assigning its value (or its ``rename``), cast where ``casts`` says."""
        code = self.expression(node, rename)
        if node.name in self.casts:
            code = f"{atom(code)}.to({self.casts[node.name]})  # back from autocast's low precision"
        self.lines.append(f"{indent}{rename.get(node.name, node.name)} = {code}")


def atom(expr: str) -> str:
    """``expr``, parenthesized unless it can take ``.method()`` or stand in a product as it is."""
    depth = 0
    for char in expr:
        depth += char in "(["
        depth -= char in ")]"
        if char == " " and depth == 0:  # generated operators have spaces around them
            return f"({expr})"
    return f"({expr})" if expr.startswith("-") else expr


def biased_products(graph: Graph, among: Sequence[Node], addends: Collection[str],
                    kept: Collection[str] = ()) -> Dict[str, str]:
    """Products ``W @ x`` ``among`` these nodes whose one use is ``+ b``, by the sum's name.

    ``b`` must be one of ``addends`` (for a whole-sequence product, parameters-only values: its
    GEMM adds a vector; for a step's, any tensor the size of the sum) with the sum's features,
    and the product must not be ``kept`` on its own. Code for the sum can then be one GEMM that
    adds ``b`` itself: one pass less over the result.
    """
    nodes, users, results = graph.node_map(), graph.users(), set(graph.results())
    candidates = {n.name for n in among}
    found = {}
    for node in among:
        if node.op is not Op.ADD:
            continue
        for product, bias in operand_orders(node):
            if (nodes[product].op is Op.MATMUL and product in candidates and users[product] == (node.name,)
                    and bias != product
                    and product not in results and product not in kept and bias in addends
                    and nodes[bias].shape.dims == node.shape.dims == nodes[product].shape.dims):
                # (a one-row product broadcast over the bias, `W[1, input] @ x + b`, is not one GEMM)
                found[product] = node.name
                break
    return found


def masked_assignment(targets: Sequence[str], plain: Sequence[str], masked: Sequence[str]) -> List[str]:
    """Lines for step ``t`` of a loop: ``targets = plain`` without a mask, else ``targets = masked``,
    which may read ``keep``, the step's mask as a ``(batch, 1)`` column."""
    return ["if mask is None:",
            f"    {', '.join(targets)} = {', '.join(plain)}",
            "else:",
            "    keep = mask[t].unsqueeze(1)",
            f"    {', '.join(targets)} = {', '.join(masked)}"]


def state_update(states: Sequence[str], nexts: Sequence[str]) -> List[str]:
    """The loop's last lines: states take their next values, except at padded steps."""
    kept = [f"torch.where(keep, {new}, {old})" for new, old in zip(nexts, states)]
    return ["        " + line for line in masked_assignment(states, nexts, kept)]


def tuple_type(count: int) -> str:
    """The TorchScript type of a tuple of ``count`` tensors."""
    return f"Tuple[{', '.join(['Tensor'] * count)}]"


def tuple_code(items: Sequence[str]) -> str:
    """A tuple expression of ``items``, one item included: ``(h,)``."""
    return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"


def one_or_tuple(items: Sequence[str]) -> str:
    """One item as itself, several as a tuple: how a cell returns its outputs."""
    return items[0] if len(items) == 1 else tuple_code(items)


def per_sequence(node: Node) -> bool:
    """Whether ``node`` is the same at every step but per example: a per-sequence input, or what
    the hoisting pass computes from one once per sequence."""
    return node.op is Op.SEQUENCE_INPUT or node.phase is Phase.PER_SEQUENCE


def over_steps(graph: Graph, node: Node, steps: str) -> Dict[str, str]:
    """Renames for a whole-sequence ``node`` (``(T, batch, ...)``): a concat's per-sequence operands
    (``(batch, ...)``) expanded over the ``steps`` (a view, no copy); every other op broadcasts them."""
    if node.op is not Op.CONCAT:
        return {}
    nodes = graph.node_map()
    return {name: f"{name}.expand([{steps}] + list({name}.size()))" for name in node.inputs
            if per_sequence(nodes[name])}


def extra_input_parameters(graph: Graph, emitter: "NodeEmitter", seq_name: Dict[str, str]) -> str:
    """The extra inputs as a method's parameters, in declaration order: ``, y_seq: Tensor, enc: Tensor``
    (a per-step input by its whole-sequence name in ``seq_name``, a per-sequence one by its local)."""
    return "".join(f", {seq_name.get(d.name) or emitter.var(d.name)}: Tensor" for d in graph.extra_inputs)


def body_nodes(graph: Graph) -> List[Node]:
    """The graph's nodes that compute something (not leaves), in order."""
    return [n for n in graph.nodes if n.op.kind is not OpKind.LEAF]


# The final guard: whatever a bug upstream let through, generated code stays within this vocabulary.
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FLOAT = re.compile(r"[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?")
_KEYWORDS = {"def", "return", "for", "in", "if", "else", "is", "not", "and", "or", "None", "True", "False"}
_OPERATORS = {"(", ")", "[", "]", ",", ":", "=", ".", "+", "-", "*", "/", "@", "<", ">", "->", "==", "!=",
              "<=", ">="}
_FORBIDDEN = {"exec", "eval", "compile", "open", "getattr", "setattr", "delattr", "globals", "locals",
              "vars", "input", "breakpoint", "help", "exit", "quit", "memoryview", "type", "object",
              "super", "dir", "print"}


def validate_source(source: str) -> str:
    """Return ``source`` if every token is one generated code may hold, else raise IRError.

    Identifiers are ASCII (Python would NFKC-normalize others, ``ｅｘｅｃ`` to ``exec``)
    and never dunders, numbers are plain float literals, and there are no strings,
    imports, lambdas or calls of builtins that reach outside the cell.
    """
    previous = None
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError) as exc:
        raise IRError(f"generated code does not tokenize: {exc}") from None
    for token in tokens:
        kind, text = token.type, token.string
        where = f"line {token.start[0]} of the generated code"
        if kind == tokenize.NAME:
            if previous is not None and previous.type == tokenize.NUMBER and previous.end == token.start:
                # `1_seq`: Python's tokenizer reads a number then a name; its compiler refuses the line.
                raise IRError(f"number {previous.string!r} runs into the name {text!r} at {where}")
            if not _IDENTIFIER.fullmatch(text) or "__" in text:
                raise IRError(f"identifier {text!r} at {where} is not a plain ASCII name")
            if keyword.iskeyword(text) and text not in _KEYWORDS:
                raise IRError(f"keyword {text!r} at {where} is never generated")
            if text in _FORBIDDEN and not (previous is not None and previous.string == "."):
                raise IRError(f"builtin {text!r} at {where} is never generated")
        elif kind == tokenize.NUMBER:
            if not _FLOAT.fullmatch(text):
                raise IRError(f"number {text!r} at {where} is not a plain float literal")
        elif kind == tokenize.OP:
            if text not in _OPERATORS:
                raise IRError(f"operator {text!r} at {where} is never generated")
        elif kind not in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT,
                          tokenize.COMMENT, tokenize.ENDMARKER):
            raise IRError(f"{tokenize.tok_name[kind]} token {text!r} at {where} is never generated")
        previous = token
    return source
