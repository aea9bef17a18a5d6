"""Codegen: IR graph -> readable Python source for a cell module, valid TorchScript.

Two methods are generated:

``forward(self, state, x)``
    one step, the cell calling convention ``(state, x) -> (new_state, output)``;
``forward_sequence(self, xs, state, mask)``
    the whole time loop. Nodes the hoisting pass marked ``ONCE`` run before
    the loop; ``PER_INPUT`` nodes run before it too, on the whole
    ``(T, batch, ...)`` input at once (their names get a ``_seq`` suffix, and
    the loop reads step ``t`` from them); ``PER_STEP`` nodes run in the loop.

Sizes and hyper-parameters are module constants (``self.hidden``), so one
source serves every size. Each op's code comes from the EMITTERS table.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

from .ir import Graph, Node, Op, OpKind, Phase
from .lower import Namespace

Emitter = Callable[[Node, List[str]], str]


def _size(value) -> str:
    return value.render(lambda name: f"self.{name}")


def _call(function: str) -> Emitter:
    return lambda node, args: f"{function}({', '.join(args)})"


def _infix(symbol: str) -> Emitter:
    return lambda node, args: f"{args[0]} {symbol} {args[1]}"


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
    Op.CHUNK: lambda node, args: f"{args[0]}.chunk({node.attr('parts')}, -1)[{node.attr('index')}]",
    Op.SLICE: lambda node, args: f"{args[0]}.narrow(-1, {_size(node.attr('start'))}, {_size(node.attr('length'))})",
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
        return repr(float(node.attr("value")))
    return None


class _Emitter:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.nodes = graph.node_map()
        self.lines: List[str] = []
        self.emitted_chunks: set = set()

    def ref(self, name: str, rename: Dict[str, str]) -> str:
        node = self.nodes[name]
        return leaf_reference(node) or rename.get(name, name)

    def emit(self, node: Node, indent: str, rename: Dict[str, str]) -> None:
        args = [self.ref(name, rename) for name in node.inputs]
        target = rename.get(node.name, node.name)
        if node.op is Op.CHUNK:
            self.emit_chunk(node, args[0], indent, rename)
            return
        self.lines.append(f"{indent}{target} = {EMITTERS[node.op](node, args)}")

    def emit_chunk(self, node: Node, source: str, indent: str, rename: Dict[str, str]) -> None:
        """All parts of one chunk in one line: ``i, f, g, o = gates.chunk(4, -1)``."""
        key = (node.inputs[0], node.attr("parts"))
        if key in self.emitted_chunks:
            return
        self.emitted_chunks.add(key)
        parts = {n.attr("index"): rename.get(n.name, n.name) for n in self.graph.nodes
                 if n.op is Op.CHUNK and n.inputs == node.inputs and n.attr("parts") == node.attr("parts")}
        names = [parts.get(i, f"_unused_{i}") for i in range(node.attr("parts"))]
        self.lines.append(f"{indent}{', '.join(names)} = {source}.chunk({node.attr('parts')}, -1)")


def _tuple_type(count: int) -> str:
    return f"Tuple[{', '.join(['Tensor'] * count)}]"


def _tuple(items: Sequence[str]) -> str:
    return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"


def _body_nodes(graph: Graph) -> List[Node]:
    return [n for n in graph.nodes if n.op.kind is not OpKind.LEAF]


def generate(graph: Graph, origin: str = "") -> str:
    """The Python/TorchScript source of the cell's methods."""
    states = [d.name for d in graph.states]
    state_type = _tuple_type(len(states))
    output_type = "Tensor" if len(graph.outputs) == 1 else _tuple_type(len(graph.outputs))
    emitter = _Emitter(graph)
    lines = emitter.lines
    if origin:
        lines.append(f"# Generated by rnndsl from {origin}. Edit the .cell file, not this code.")

    # One step.
    lines.append(f"def forward(self, state: {state_type}, {graph.input.name}: Tensor) "
                 f"-> Tuple[{state_type}, {output_type}]:")
    lines.extend(f"    {name} = state[{i}]" for i, name in enumerate(states))
    for node in _body_nodes(graph):
        emitter.emit(node, "    ", {})
    outputs = [emitter.ref(name, {}) for name in graph.outputs]
    output = outputs[0] if len(outputs) == 1 else _tuple(outputs)
    lines.append(f"    return {_tuple([emitter.ref(n, {}) for n in graph.next_states])}, {output}")
    lines.append("")
    lines.append("")
    _generate_sequence(graph, emitter, state_type, output_type)
    return "\n".join(lines) + "\n"


def _generate_sequence(graph: Graph, emitter: _Emitter, state_type: str, output_type: str) -> None:
    lines = emitter.lines
    emitter.emitted_chunks = set()
    states = [d.name for d in graph.states]
    body = _body_nodes(graph)
    names = Namespace({n.name for n in graph.nodes})
    x = graph.input.name
    hoisted = [n for n in body if n.phase is Phase.PER_INPUT]
    # Inside the loop, a hoisted value (or the input) is read at step t from its whole-sequence tensor.
    seq_name = {n.name: names.fresh(f"{n.name}_seq") for n in hoisted}
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
    for name in output_lists:
        lines.append(f"    {name} = torch.jit.annotate(List[Tensor], [])")
    lines.append("    for t in range(xs.size(0)):")
    for name in per_step_reads:
        lines.append(f"        {name} = {seq_name[name]}[t]")
    for node in step:
        emitter.emit(node, "        ", {})
    for name, output in zip(output_lists, graph.outputs):
        lines.append(f"        {name}.append({emitter.ref(output, {})})")
    nexts = [emitter.ref(n, {}) for n in graph.next_states]
    lines.append("        if mask is None:")
    lines.append(f"            {', '.join(states)} = {', '.join(nexts)}")
    lines.append("        else:")
    lines.append("            keep = mask[t].unsqueeze(1)")
    kept = [f"torch.where(keep, {new}, {old})" for new, old in zip(nexts, states)]
    lines.append(f"            {', '.join(states)} = {', '.join(kept)}")
    stacked = [f"torch.stack({name})" for name in output_lists]
    lines.append("    if mask is not None:")
    lines.append("        real = mask.unsqueeze(2)")
    stacked_masked = [f"{s} * real.to(xs.dtype)" for s in stacked]
    result = stacked_masked[0] if len(stacked) == 1 else _tuple(stacked_masked)
    lines.append(f"        return {result}, {_tuple(states)}")
    result = stacked[0] if len(stacked) == 1 else _tuple(stacked)
    lines.append(f"    return {result}, {_tuple(states)}")
