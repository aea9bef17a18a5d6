"""Codegen: IR graph -> readable Python source for a cell module, valid TorchScript.

Two methods are generated:

``forward(self, state, x)``
    one step, the cell calling convention ``(state, x) -> (new_state, output)``;
``forward_sequence(self, xs, state, mask)``
    the whole time loop. Nodes the hoisting pass marked ``ONCE`` run before
    the loop; ``PER_INPUT`` nodes run before it too, on the whole
    ``(T, batch, ...)`` input at once (their names get a ``_seq`` suffix, and
    the loop reads step ``t`` from them); ``PER_STEP`` nodes run in the loop.
    With ``fixed_dropout_mask``, each ``dropout`` of a value that depends on
    a state draws its mask once, before the loop, and every step reuses it
    (recurrent dropout, Gal & Ghahramani 2016); ``forward`` always draws anew.

Sizes and hyper-parameters are module constants (``self.hidden``), so one
source serves every size. Each op's code comes from the EMITTERS table.
"""
from __future__ import annotations

import io
import keyword
import math
import re
import tokenize
from typing import Callable, Collection, Dict, List, Optional, Sequence

from .dependency import Dependence, dependencies
from .ir import Graph, IRError, Node, Op, OpKind, Phase
from .ops import operand_orders
from .names import RESERVED, Namespace

Emitter = Callable[[Node, List[str]], str]


def size_code(value) -> str:
    """A size as code: ``4*self.hidden``."""
    return value.render(lambda name: f"self.{name}")


def _call(function: str) -> Emitter:
    return lambda node, args: f"{function}({', '.join(args)})"


def _infix(symbol: str) -> Emitter:
    return lambda node, args: f"{args[0]} {symbol} {args[1]}"


def _chunk(node: Node, args: List[str]) -> str:
    # `narrow`, not `Tensor.chunk`: TorchScript's derivative of chunk breaks from the second call on
    # (once the profiling executor specializes) when a part gets no gradient, e.g. an LSTM whose
    # loss reads only c, and its `chunk(...)[i]` can give silently wrong gradients.
    size = node.shape.dims[0]
    return f"{args[0]}.narrow(-1, {size_code(size * node.attr('index'))}, {size_code(size)})"


def _concat(node: Node, args: List[str]) -> str:
    dim = 0 if node.shape.is_matrix else -1
    return f"torch.cat([{', '.join(args)}], {dim})"


def _zoneout(node: Node, args: List[str]) -> str:
    new, old, p = args
    return (f"torch.where(torch.rand_like({new}) < {p}, {old}, {new}) "
            f"if self.training else {new}")


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
    # W @ v with v of shape (..., n): one GEMM for any number of leading dims.
    Op.MATMUL: lambda node, args: f"torch.nn.functional.linear({args[1]}, {args[0]})",
    Op.CHUNK: _chunk,
    Op.SLICE: lambda node, args: f"{args[0]}.narrow(-1, {size_code(node.attr('start'))}, {size_code(node.attr('length'))})",
    Op.CONCAT: _concat,
    Op.LAYERNORM: lambda node, args: (f"torch.nn.functional.layer_norm({args[0]}, [{args[0]}.size(-1)], "
                                      f"{args[1]}, {args[2]}, {node.attr('eps', 1e-5)!r})"),
    Op.DROPOUT: lambda node, args: f"torch.nn.functional.dropout({args[0]}, {args[1]}, self.training)",
    Op.ZONEOUT: _zoneout,
}


def leaf_reference(node: Node) -> Optional[str]:
    """How code refers to a leaf: parameters and hypers live on the module, constants inline."""
    if node.op in (Op.PARAM, Op.HYPER):
        return f"self.{node.name}"
    if node.op is Op.CONST:
        value = float(node.attr("value"))
        if not math.isfinite(value):  # repr gives `inf` or `nan`: a name, not a number
            raise IRError(f"constant {node.name} is {value}; the checker admits only finite numbers")
        return repr(value)
    return None


class _Emitter:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.nodes = graph.node_map()
        self.lines: List[str] = []
        # Lowering keeps body values clear of RESERVED, but the input and the states keep their
        # declared names in the IR; here those that would shadow what the code needs (`torch`,
        # `self`, `range`, `t`, `xs`, ...) become fresh locals.
        self.names = Namespace({n.name for n in graph.nodes})
        self.local = {n.name: self.names.fresh(n.name) for n in graph.nodes
                      if n.op in (Op.INPUT, Op.STATE) and n.name in RESERVED}
        # Parameters the method takes as arguments instead of reading them from the module
        # (see bind_parameters): parameter name -> local.
        self.parameter_locals: Dict[str, str] = {}

    def var(self, name: str) -> str:
        """The local variable holding the input or a state."""
        return self.local.get(name, name)

    def leaf(self, node: Node) -> Optional[str]:
        """How this method refers to a leaf: a parameter bound to a local, else leaf_reference."""
        return self.parameter_locals.get(node.name) or leaf_reference(node)

    def bind_parameters(self, names: Namespace) -> None:
        """Make parameters locals of the method (bound from its parameter list), named as declared
        unless that would shadow what generated code uses."""
        self.parameter_locals = {d.name: (names.fresh(d.name) if d.name in RESERVED else d.name)
                                 for d in self.graph.params}

    def ref(self, name: str, rename: Dict[str, str]) -> str:
        node = self.nodes[name]
        return self.leaf(node) or rename.get(name, self.var(name))

    def inline(self, name: str) -> str:
        """A value as one expression of leaves, for code that runs before the nodes that compute it."""
        node = self.nodes[name]
        return self.leaf(node) or f"({EMITTERS[node.op](node, [self.inline(i) for i in node.inputs])})"

    def emit(self, node: Node, indent: str, rename: Dict[str, str]) -> None:
        args = [self.ref(name, rename) for name in node.inputs]
        target = rename.get(node.name, node.name)
        self.lines.append(f"{indent}{target} = {EMITTERS[node.op](node, args)}")


def biased_products(graph: Graph, whole_sequence: Sequence[Node], once: Collection[str],
                    kept: Collection[str] = ()) -> Dict[str, str]:
    """Products ``W @ x`` among ``whole_sequence`` whose one use is ``+ b``, by the sum's name.

    ``b`` must be a parameters-only value (in ``once``) the size of the sum, and the product
    must not be ``kept`` on its own. Code for the sum can then be one GEMM that adds the bias
    itself: one pass less over a (T, batch, rows) tensor.
    """
    nodes, users, results = graph.node_map(), graph.users(), set(graph.results())
    candidates = {n.name for n in whole_sequence}
    found = {}
    for node in whole_sequence:
        if node.op is not Op.ADD:
            continue
        for product, bias in operand_orders(node):
            if (nodes[product].op is Op.MATMUL and product in candidates and users[product] == (node.name,)
                    and product not in results and product not in kept and bias in once
                    and nodes[bias].shape.dims == node.shape.dims):
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


def _tuple_type(count: int) -> str:
    return f"Tuple[{', '.join(['Tensor'] * count)}]"


def _tuple(items: Sequence[str]) -> str:
    return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"


def _body_nodes(graph: Graph) -> List[Node]:
    return [n for n in graph.nodes if n.op.kind is not OpKind.LEAF]


def generate(graph: Graph, origin: str = "", fixed_dropout_mask: bool = False) -> str:
    """The Python/TorchScript source of the cell's methods, checked by :func:`validate_source`."""
    emitter = _Emitter(graph)
    states = [emitter.var(d.name) for d in graph.states]
    state_type = _tuple_type(len(states))
    output_type = "Tensor" if len(graph.outputs) == 1 else _tuple_type(len(graph.outputs))
    lines = emitter.lines
    if origin:
        # A file name may hold a newline, which would end the comment and start code.
        printable = "".join(char if char.isprintable() else "?" for char in origin)
        lines.append(f"# Generated by rnndsl from {printable}. Edit the .cell file, not this code.")

    # One step.
    lines.append(f"def forward(self, state: {state_type}, {emitter.var(graph.input.name)}: Tensor) "
                 f"-> Tuple[{state_type}, {output_type}]:")
    lines.extend(f"    {name} = state[{i}]" for i, name in enumerate(states))
    for node in _body_nodes(graph):
        emitter.emit(node, "    ", {})
    outputs = [emitter.ref(name, {}) for name in graph.outputs]
    output = outputs[0] if len(outputs) == 1 else _tuple(outputs)
    lines.append(f"    return {_tuple([emitter.ref(n, {}) for n in graph.next_states])}, {output}")
    lines.append("")
    lines.append("")
    _generate_sequence(graph, emitter, state_type, output_type, fixed_dropout_mask)
    return validate_source("\n".join(lines) + "\n")


def _generate_sequence(graph: Graph, emitter: _Emitter, state_type: str, output_type: str,
                       fixed_dropout_mask: bool) -> None:
    lines = emitter.lines
    states = [emitter.var(d.name) for d in graph.states]
    body = _body_nodes(graph)
    # Lowering and the emitter kept user names clear of RESERVED, so this code may use those names itself.
    names = Namespace({n.name for n in graph.nodes} | set(emitter.local.values()), reserved=frozenset())
    x = graph.input.name
    hoisted = [n for n in body if n.phase is Phase.PER_INPUT]
    # Inside the loop, a hoisted value (or the input) is read at step t from its whole-sequence tensor.
    seq_name = {n.name: names.fresh(n.name, "seq") for n in hoisted}
    seq_name[x] = "xs"
    step = [n for n in body if n.phase is Phase.PER_STEP]
    needed_in_loop = {name for n in step for name in n.inputs} | set(graph.results())
    per_step_reads = [name for name in [x] + [n.name for n in hoisted] if name in needed_in_loop]
    output_lists = [names.fresh(f"outputs_{i}" if len(graph.outputs) > 1 else "outputs")
                    for i in range(len(graph.outputs))]

    lines.append(f"def forward_sequence(self, xs: Tensor, state: {state_type}, "
                 f"mask: Optional[Tensor] = None) -> Tuple[{output_type}, {state_type}]:")
    lines.extend(f"    {name} = state[{i}]" for i, name in enumerate(states))
    once = [n for n in body if n.phase is Phase.ONCE]
    if once:
        lines.append("    # Once per sequence: these depend only on parameters.")
        for node in once:
            emitter.emit(node, "    ", {})
    if hoisted:
        lines.append("    # For all steps at once: these depend on the input but on no state.")
        for node in hoisted:
            emitter.emit(node, "    ", seq_name)
    # Read from the dependencies, not the phases: with hoisting disabled every node is PER_STEP.
    found = dependencies(graph)
    masks = {n.name: names.fresh(n.name, "mask") for n in step
             if fixed_dropout_mask and n.op is Op.DROPOUT and found[n.name] is Dependence.STATE}
    if masks:
        lines.append("    # Recurrent dropout: one mask per sequence, the same at every step.")
    for node in step:
        if node.name in masks:
            # The probability is a number: parameters-only, but maybe computed in the loop (no hoisting).
            size, p = size_code(node.shape.dims[0]), emitter.inline(node.inputs[1])
            # The mask has the value's shape: a parameter vector's has no batch dimension.
            shape = f"[xs.size(1), {size}]" if node.shape.batched else f"[{size}]"
            lines.append(f"    {masks[node.name]} = torch.nn.functional.dropout("
                         f"xs.new_ones({shape}), {p}, self.training)")
    for name in output_lists:
        lines.append(f"    {name} = torch.jit.annotate(List[Tensor], [])")
    # unbind, not seq[t] in the loop: the backward of one indexing per step would zero-fill a
    # whole (T, batch, n) gradient at every step, O(T^2); unbind's backward is one stack.
    step_lists = {name: names.fresh(emitter.var(name), "steps") for name in per_step_reads}
    for name in per_step_reads:
        lines.append(f"    {step_lists[name]} = {seq_name[name]}.unbind(0)")
    lines.append("    for t in range(xs.size(0)):")
    for name in per_step_reads:
        lines.append(f"        {emitter.var(name)} = {step_lists[name]}[t]")
    for node in step:
        if node.name in masks:
            lines.append(f"        {node.name} = {emitter.ref(node.inputs[0], {})} * {masks[node.name]}")
        else:
            emitter.emit(node, "        ", {})
    for name, output in zip(output_lists, graph.outputs):
        lines.append(f"        {name}.append({emitter.ref(output, {})})")
    lines.extend(state_update(states, [emitter.ref(n, {}) for n in graph.next_states]))
    stacked = [f"torch.stack({name})" for name in output_lists]
    lines.append("    if mask is not None:")
    lines.append("        real = mask.unsqueeze(2)")
    stacked_masked = [f"{s} * real.to(xs.dtype)" for s in stacked]
    result = stacked_masked[0] if len(stacked) == 1 else _tuple(stacked_masked)
    lines.append(f"        return {result}, {_tuple(states)}")
    result = stacked[0] if len(stacked) == 1 else _tuple(stacked)
    lines.append(f"    return {result}, {_tuple(states)}")


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
