"""The backward of a whole sequence, derived from the cell's equations.

From the optimized IR this target generates two more TorchScript methods of
the cell (next to ``forward`` and ``forward_sequence``, rnndsl/codegen/step.py):

``forward_sequence_saving(xs, state, mask) -> (outputs, final state, saved)``
    the same loop as ``forward_sequence``, keeping over time only the values
    the derivative rules (rnndsl/codegen/derivatives.py) read;
``backward_sequence(xs, mask, saved, grad_outputs, grad_state, need_input_grad)
-> (grad_xs, grad_state0, grad_params)``
    walks time backwards: per step, the elementwise rules and one GEMM per
    recurrent matrix product (``grad_h = grad_gates @ W_hh``). The gradient of
    every matrix product is written into a ``(T, batch, rows)`` buffer, and
    after the loop each weight gradient is ONE GEMM over all steps
    (``grad_W = G.reshape(T*B, -1).t() @ V.reshape(T*B, -1)``); the hoisted
    (input-only) part runs backwards on whole-sequence tensors, then the
    parameter-only part. A cell with several inputs takes the others as one more
    argument of both methods, a list in declaration order, and ``grad_params`` ends
    with their gradients; what depends on a per-sequence input and no step runs
    backwards between the whole-sequence part and the parameter-only one.

The sweep reads like autodidax's ``backward_pass``: for each node in reverse,
apply its derivative rule (rnndsl/codegen/derivatives.py) to its gradient and
file what its inputs get. What the backward reads of the forward and where
gradients accumulate sit behind two small objects (rnndsl/codegen/bookkeeping.py,
which also says where each value's gradient lives).

The ``torch.autograd.Function`` around the two methods, ``DerivedSequence``,
is runtime and lives in rnndsl/derived.py.

Matrix products in these methods go through the helpers of rnndsl/kernels.py
(``linear``, ``outer_sum``, ``prepack``), which pick oneDNN's GEMM where it is
faster.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from ..ir import Graph, Node, Op, OpKind, Shape, Size
from ..names import SCRIPT_GLOBALS, Namespace
from .base import (EMITTERS, NodeEmitter, PythonCode, atom, biased_products, gemm, masked_assignment, over_steps,
                   size_code, state_update, tuple_type, validate_source)
from .bookkeeping import Block, ForwardReads, GradientSums, Level, OuterOf, level_of
from .derivatives import DERIVATIVES, Outer, Placed, Term

# Products go through the helpers of rnndsl/kernels.py, which pick oneDNN's GEMM where it is faster.
BACKWARD_EMITTERS = {**EMITTERS, Op.MATMUL: gemm("linear")}

# Elementwise ops by the torch function that can write its result into a given tensor (``out=``):
# the saving forward computes a value it keeps straight into its row of the (T, ...) buffer,
# instead of computing it and copying it there (the same kernel, so the same numbers).
WRITES_INTO: Dict[Op, str] = {
    Op.ADD: "torch.add", Op.SUB: "torch.sub", Op.MUL: "torch.mul", Op.DIV: "torch.div",
    Op.SIGMOID: "torch.sigmoid", Op.TANH: "torch.tanh", Op.EXP: "torch.exp", Op.LOG: "torch.log",
    Op.ABS: "torch.abs", Op.SQRT: "torch.sqrt", Op.SIN: "torch.sin", Op.COS: "torch.cos",
    Op.LOG1P: "torch.log1p", Op.EXPM1: "torch.expm1", Op.ERF: "torch.erf",
}


class _RuleContext:
    """What a derivative rule sees (the rnndsl.codegen.derivatives.Rule protocol)."""

    def __init__(self, generator: "_Generator", node: Node, grad: str, block: Block):
        self.node, self.grad = node, grad
        self._generator, self._block = generator, block

    def needs(self, index: int) -> bool:
        return self.node.inputs[index] in self._generator.differentiable

    def shape(self, index: int) -> Shape:
        return self._generator.nodes[self.node.inputs[index]].shape

    def value(self, index: int) -> str:
        return self._generator.reads.value(self.node.inputs[index], self._block.level)

    def output(self) -> str:
        return self._generator.reads.value(self.node.name, self._block.level)

    def grad_times_matrix(self, index: int) -> str:
        return self._generator.reads.times_matrix(self.grad, self.node.inputs[index], self._block.level)

    def size(self, size: Size) -> str:
        return size_code(size)

    def fresh(self, base: str) -> str:
        return self._generator.names.fresh(base)

    def emit(self, line: str) -> None:
        self._block.emit(line)


class _Generator:
    """Generates ``backward_sequence`` (recording what it reads of the forward), then the saving forward."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.nodes = graph.node_map()
        self.emitter = NodeEmitter(graph, BACKWARD_EMITTERS)
        self.names = Namespace({n.name for n in graph.nodes} | set(self.emitter.local.values()))
        # Both methods take the parameters as a list, so the backward uses exactly the tensors the
        # forward used (autograd's inputs), whatever the module holds by then.
        self.parameter_list = self.names.fresh("params")
        self.input_list = self.names.fresh("inputs") if graph.extra_inputs else None  # the other inputs
        self.emitter.bind_parameters(self.names)
        self.differentiable = set()
        for node in graph.nodes:
            if node.op in (Op.PARAM, Op.STATE, Op.INPUT, Op.SEQUENCE_INPUT) or (
                    node.op.kind is not OpKind.LEAF and any(i in self.differentiable for i in node.inputs)):
                self.differentiable.add(node.name)
        body = [n for n in graph.nodes if n.op.kind is not OpKind.LEAF]
        self.body = {level: [n for n in body if level_of(n) is level] for level in Level}
        self.reads = ForwardReads(graph, self.emitter, self.names, self.body[Level.SEQ])
        self.sums = GradientSums(graph, self.names, self.reads)
        self.packed: Dict[str, str] = {}  # the loop's matrices, packed once for oneDNN: value -> local

    # The sweep --------------------------------------------------------------------------------

    def differentiate(self, node: Node, block: Block) -> None:
        """Apply ``node``'s rule to its finished gradient, filing what its inputs get."""
        parts = ("grad", self.emitter.var(node.name))
        total = self.sums.total(node.name, block, parts)
        if total is None:
            return
        grad = self.sums.assign(total, parts, block)
        contributions = DERIVATIVES[node.op].rule(_RuleContext(self, node, grad, block))
        for index, item in enumerate(contributions):
            target = self.nodes[node.inputs[index]]
            if item is None or target.name not in self.differentiable:
                continue
            if isinstance(item, Outer):
                item, shape = OuterOf(item.grad, node.inputs[item.vector], item.call), node.shape
            elif isinstance(item, Term):
                shape = item.shape or node.shape
            elif isinstance(item, Placed):
                shape = Shape(target.shape.dims, node.shape.batched)
            else:
                shape = node.shape
            self.sums.route(target.name, item, shape, block)

    def sweep(self, level: Level, indent: str) -> Block:
        """Every node that lives at ``level``, in reverse: the code of their gradients."""
        block = Block(level, indent)
        for node in reversed(self.body[level]):
            self.differentiate(node, block)
        return block

    def backward(self) -> str:
        """The source of ``backward_sequence``; generated first, it records what the forward keeps."""
        self.fixed = {name: self.names.fresh(name) for name in
                      ("saved", "grad_outputs", "grad_state", "need_input_grad", "grad_xs", "steps", "batch")}
        self.carries = {d.name: self.names.fresh("grad", self.emitter.var(d.name)) for d in self.graph.states}
        self.grad_outputs = [self.names.fresh("grad_output_seq") for _ in self.graph.outputs]
        loop = self.sweep_loop()
        seq = self.sweep(Level.SEQ, " " * 4)
        input_grad = Block(Level.SEQ, " " * 8)
        grad_xs = self.sums.total(self.graph.input.name, input_grad)
        input_grad.emit(f"{self.fixed['grad_xs']} = {grad_xs or 'torch.zeros_like(xs)'}")
        # The other inputs: those read at every step get what the whole-sequence part gave them;
        # then what depends on per-sequence inputs runs backwards, and they get theirs.
        per_step = Block(Level.SEQ, " " * 4)
        grad_inputs = {decl.name: self.input_grad(decl.name, per_step) for decl in self.graph.extra_inputs
                       if decl.name not in self.graph.per_sequence}
        sequence = self.sweep(Level.SEQUENCE, " " * 4)
        grad_inputs.update({name: self.input_grad(name, sequence) for name in self.graph.per_sequence})
        once = self.sweep(Level.ONCE, " " * 4)
        grad_params = []
        for decl in self.graph.params:
            total = self.sums.total(decl.name, once)
            grad_params.append(self.sums.assign(total or f"torch.zeros_like({self.emitter.ref(decl.name, {})})",
                                                ("grad", decl.name), once))
        grad_params += [grad_inputs[decl.name] for decl in self.graph.extra_inputs]
        return self.backward_method(loop, seq, input_grad, [per_step, sequence, once], grad_params)

    def input_grad(self, name: str, block: Block) -> str:
        """The gradient of extra input ``name``, summed in ``block``, as a local."""
        argument = self.reads.arguments[name]
        return self.sums.assign(self.sums.total(name, block) or f"torch.zeros_like({argument})",
                                ("grad", self.emitter.var(name)), block)

    def sweep_loop(self) -> Block:
        """One step of the loop backwards: from the step's output gradients and the gradients the
        next step carried back, to the gradients this step carries to the one before."""
        graph, loop = self.graph, Block(Level.LOOP, " " * 8)
        output_steps = [self.names.fresh("grad_output") for _ in graph.outputs]
        for name, local, whole in zip(graph.outputs, output_steps, self.grad_outputs):
            loop.emit(f"{local} = {whole}[t]")
            self.sums.route(name, Term(local), self.nodes[name].shape, loop)
        seeds = {s: self.names.fresh("seed", self.emitter.var(s)) for s in self.carries}
        carried = list(self.carries.values())
        for line in masked_assignment(list(seeds.values()), carried,
                                      [f"torch.where(keep, {c}, 0.0)" for c in carried]):
            loop.emit(line)
        for state, next_state in zip(self.carries, graph.next_states):
            self.sums.route(next_state, Term(seeds[state]), self.nodes[next_state].shape, loop)
        for node in reversed(self.body[Level.LOOP]):
            self.differentiate(node, loop)
        new = [self.sums.total(state, loop) or f"torch.zeros_like({self.carries[state]})" for state in self.carries]
        after_loop = self.sums.flush(loop)
        for line in masked_assignment(carried, new, [f"{atom(n)} + torch.where(keep, 0.0, {c})"
                                                     for n, c in zip(new, carried)]):
            loop.emit(line)
        self.sums.file(after_loop)
        return loop

    def backward_method(self, loop: Block, seq: Block, input_grad: Block, after: Sequence[Block],
                        grad_params: Sequence[str]) -> str:
        """``backward_sequence`` around the swept blocks (``after`` the input's gradient: the other
        inputs', the per-sequence part, the parameter-only part): unpacking, buffers, the loop, the returns."""
        fixed, reads = self.fixed, self.reads
        lines = [f"def backward_sequence(self, xs: Tensor, mask: Optional[Tensor], "
                 f"{self.parameter_list}: List[Tensor], "
                 f"{fixed['saved']}: List[Tensor], {fixed['grad_outputs']}: List[Tensor], "
                 f"{fixed['grad_state']}: List[Tensor], {fixed['need_input_grad']}: bool{self.input_argument()}"
                 ") -> Tuple[Tensor, List[Tensor], List[Tensor]]:"]
        lines += self.parameter_lines()
        lines += [f"    {local} = {fixed['saved']}[{i}]" for i, local in enumerate(reads.saved_locals())]
        lines += [f"    {node.name} = {self.emitter.expression(node, {})}" for node in self.graph.nodes
                  if node.name in reads.numbers]
        lines += [f"    {local} = {fixed['grad_outputs']}[{i}]" for i, local in enumerate(self.grad_outputs)]
        lines.append("    if mask is not None:")
        lines += [f"        {local} = torch.where(mask.unsqueeze(2), {local}, 0.0)" for local in self.grad_outputs]
        lines += [f"    {carry} = {fixed['grad_state']}[{i}]" for i, carry in enumerate(self.carries.values())]
        lines.append(f"    {fixed['steps']}, {fixed['batch']} = xs.size(0), xs.size(1)")
        lines += self.sums.buffer_lines(fixed["steps"], fixed["batch"])
        lines += [f"    {local} = prepack({matrix}.t(), {fixed['batch']})"
                  for local, matrix in reads.packed_transposed.values()]
        lines.append(f"    for t in range({fixed['steps']} - 1, -1, -1):")
        lines += [f"        {local} = {reads.sequence(name)}[t]" for name, local in reads.loads.items()]
        lines += loop.lines + seq.lines
        lines.append(f"    if {fixed['need_input_grad']}:")
        lines += input_grad.lines
        lines.append("    else:")
        lines.append(f"        {fixed['grad_xs']} = xs.new_empty([0])")
        for block in after:
            lines += block.lines
        carried = ", ".join(self.carries.values())
        lines.append(f"    return {fixed['grad_xs']}, [{carried}], [{', '.join(grad_params)}]")
        return "\n".join(lines) + "\n"

    def parameter_lines(self) -> List[str]:
        """A method's first lines: its parameters, in declaration order, from its parameter list,
        and its other inputs from theirs."""
        return [f"    {self.emitter.ref(decl.name, {})} = {self.parameter_list}[{i}]"
                for i, decl in enumerate(self.graph.params)] + \
            [f"    {self.reads.arguments[decl.name]} = {self.input_list}[{i}]"
             for i, decl in enumerate(self.graph.extra_inputs)]

    def input_argument(self) -> str:
        """The argument holding the other inputs, where the cell has several."""
        return f", {self.input_list}: List[Tensor]" if self.input_list else ""

    # The saving forward --------------------------------------------------------------------

    def forward(self) -> str:
        """``forward_sequence_saving``: forward_sequence's loop, keeping what the backward reads."""
        graph, emitter = self.graph, self.emitter
        states = [emitter.var(d.name) for d in graph.states]
        lines = [f"def forward_sequence_saving(self, xs: Tensor, state: {tuple_type(len(states))}, "
                 f"mask: Optional[Tensor], {self.parameter_list}: List[Tensor]{self.input_argument()}"
                 ") -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:"]
        lines += self.parameter_lines()
        lines += [f"    {local} = state[{i}]" for i, local in enumerate(states)]
        for node in self.body[Level.ONCE] + self.body[Level.SEQUENCE]:
            lines.append(f"    {node.name} = {self.emitter.expression(node, {})}")
        biased = self.emitter.biased = self.biased_products()
        for node in self.body[Level.SEQ]:
            if node.name in biased:  # computed with the sum below
                continue
            seq_names = self.reads.seq_names
            rename = {**seq_names, **over_steps(graph, node, "xs.size(0)")}
            lines.append(f"    {seq_names[node.name]} = {self.emitter.expression(node, rename)}")
        step = self.body[Level.LOOP]
        for node in step:
            matrix = node.inputs[0] if node.op is Op.MATMUL else None
            if matrix is not None and matrix not in self.packed:
                self.packed[matrix] = self.names.fresh(matrix, "packed")
                lines.append(f"    {self.packed[matrix]} = prepack({emitter.ref(matrix, {})}, xs.size(1))")
        # Kept values go at each step into (T, batch, n) tensors, while still in cache (a list of
        # steps stacked after the loop costs twice as much here): written there by their op's out=
        # form where it has one, else copied. Each op saved is a few microseconds per step.
        outputs = [self.names.fresh("outputs") for _ in graph.outputs]
        writes, from_outputs, trails = self.kept_in_place(outputs)
        # A kept state with a trail takes its steps from it; an output that reads that state
        # (`y = h`) still needs its own buffer.
        kept = [(name, local) for name, local in self.reads.stacked.items() if name not in trails]
        for name, local in list(zip(graph.outputs, outputs)) + kept:
            size = ", ".join(size_code(d) for d in self.nodes[name].shape.dims)
            lines.append(f"    {local} = xs.new_empty([xs.size(0), xs.size(1), {size}])")
        for index, d in enumerate(graph.states):
            if d.name in trails:
                size = ", ".join(size_code(dim) for dim in d.shape.dims)
                lines.append(f"    {trails[d.name]} = xs.new_empty([xs.size(0) + 1, xs.size(1), {size}])")
                lines.append(f"    {trails[d.name]}[0].copy_({states[index]})")
        needed = [i for n in step for i in n.inputs] + list(graph.results())
        reads = [name for name in self.reads.seq_names if name in needed]
        lines.append("    for t in range(xs.size(0)):")
        lines += [f"        {emitter.var(name)} = {self.reads.seq_names[name]}[t]" for name in reads]
        for d in graph.states:
            if d.name in from_outputs:  # unmasked, the outputs' rows give it after the loop
                lines.append("        if mask is not None:")
                lines.append(f"            {self.reads.stacked[d.name]}[t].copy_({emitter.var(d.name)})")
            elif d.name in self.reads.stacked and d.name not in trails:
                lines.append(f"        {self.reads.stacked[d.name]}[t].copy_({emitter.var(d.name)})")
        for node in step:
            if node.name in biased:  # computed with the sum below
                continue
            buffer = self.reads.stacked.get(node.name)
            target = f"{buffer}[t]" if buffer is not None else writes.get(node.name)
            written = target is not None and self.written_into(node, target)
            lines.append(f"        {node.name} = {written or self.step_expression(node)}")
            if buffer is not None and not written:
                lines.append(f"        {buffer}[t].copy_({node.name})")
        for local, name in zip(outputs, graph.outputs):
            if writes.get(name) != f"{local}[t]":
                lines.append(f"        {local}[t].copy_({emitter.ref(name, {})})")
        lines.extend(state_update(states, [emitter.ref(n, {}) for n in graph.next_states]))
        for d, local in zip(graph.states, states):
            if d.name in trails:  # masked, the state carried is not always the value written
                lines.append("        if mask is not None:")
                lines.append(f"            {trails[d.name]}[t + 1].copy_({local})")
        lines += [f"    {self.reads.stacked[name]} = {trail}.narrow(0, 0, xs.size(0))"
                  for name, trail in trails.items()]
        if from_outputs:
            index = {d.name: i for i, d in enumerate(graph.states)}
            lines.append("    if mask is None:")
            lines += [f"        {self.reads.stacked[name]} = torch.cat([state[{index[name]}].unsqueeze(0), "
                      f"{output}.narrow(0, 0, xs.size(0) - 1)])" for name, output in from_outputs.items()]
        # A final state computed into a buffer (an output's, a trail's, a kept value's) is a view
        # of it: each gets its own tensor, as autograd wants of the results of a Function that a
        # caller may edit in place (one copy of (batch, n) per sequence).
        lines += [f"    {local} = {local}.clone()" for local in states]
        lines.append("    if mask is not None:")
        lines += [f"        {local} = {local} * mask.unsqueeze(2).to(xs.dtype)" for local in outputs]
        saved = ", ".join(self.reads.saved_locals())
        lines.append(f"    return [{', '.join(outputs)}], [{', '.join(states)}], [{saved}]")
        return "\n".join(lines) + "\n"

    def kept_in_place(self, outputs: List[str]) -> Tuple[Dict[str, str], Dict[str, str], Dict[str, str]]:
        """Where the saving forward's loop writes values straight into their buffers, not copied:
        ``writes``, a loop value -> the buffer row it is computed into (an output's, or a trail's);
        ``from_outputs``, a kept state whose next value is an output -> that output's buffer (its
        steps are the initial state and the outputs but the last, when no mask holds it back);
        ``trails``, another kept state -> a local of T + 1 rows, the initial state then each next
        value computed into its row (its steps are the first T)."""
        graph = self.graph
        loop = {n.name for n in self.body[Level.LOOP]} - set(self.emitter.biased)
        writable = {name for name in loop if name not in self.reads.stacked and self.nodes[name].op in WRITES_INTO
                    and not any(self.nodes[i].shape.is_scalar or i in self.emitter.biased
                                for i in self.nodes[name].inputs)}
        written_outputs: Dict[str, str] = {}  # an output computed into its buffer -> that buffer
        for name, local in zip(graph.outputs, outputs):
            if name in writable:
                written_outputs.setdefault(name, local)
        writes = {name: f"{local}[t]" for name, local in written_outputs.items()}
        nexts = dict(zip((d.name for d in graph.states), graph.next_states))
        from_outputs: Dict[str, str] = {}
        trails: Dict[str, str] = {}
        for state, following in nexts.items():
            if state not in self.reads.stacked or list(nexts.values()).count(following) != 1:
                continue
            if following in written_outputs:
                from_outputs[state] = written_outputs[following]
            elif following in writable:
                trails[state] = self.names.fresh(self.emitter.var(state), "trail")
                writes[following] = f"{trails[state]}[t + 1]"
        return writes, from_outputs, trails

    def biased_products(self) -> Dict[str, str]:
        """Products whose GEMM adds their bias (see base.biased_products): over the whole sequence
        a parameter-only one, in the loop any tensor (``W @ h + partial``); not products the
        backward reads, which must exist on their own."""
        once = {n.name for n in self.graph.nodes if level_of(n) is Level.ONCE}
        tensors = {n.name for n in self.graph.nodes if not n.shape.is_scalar}
        return {**biased_products(self.graph, self.body[Level.SEQ], once, kept=self.reads.whole),
                **biased_products(self.graph, self.body[Level.LOOP], tensors, kept=self.reads.stacked)}

    def written_into(self, node: Node, target: str) -> Optional[str]:
        """A loop node's forward code writing its value into ``target``, where its op can and
        its operands are all tensors (``torch.mul(2.0, x)`` has no out= form); else None, as for
        a sum that a product's GEMM computes (``step_expression``)."""
        function = WRITES_INTO.get(node.op)
        if function is None or any(self.nodes[i].shape.is_scalar or i in self.emitter.biased for i in node.inputs):
            return None
        return f"{function}({', '.join(self.emitter.ref(i, {}) for i in node.inputs)}, out={target})"

    def step_expression(self, node: Node) -> str:
        """A loop node's forward code; a matrix product by its matrix packed before the loop, and
        a sum that adds to a ``biased`` product as that product's GEMM."""
        if node.op is Op.MATMUL:
            product, addend = node, []
        else:
            biased = next((i for i in node.inputs if self.emitter.biased.get(i) == node.name), None)
            if biased is None:
                return self.emitter.expression(node, {})
            product, addend = self.nodes[biased], [self.emitter.ref(i, {}) for i in node.inputs if i != biased]
            others = [i for i in node.inputs if i != biased]
            if len(others) == 1 and self.overwritable(others[0]):
                matrix, vector = product.inputs
                return f"accumulate({addend[0]}, {self.emitter.ref(vector, {})}, {self.packed[matrix]})"
        matrix, vector = product.inputs
        return BACKWARD_EMITTERS[Op.MATMUL](product, [self.packed[matrix], self.emitter.ref(vector, {})] + addend)

    def overwritable(self, name: str) -> bool:
        """Whether a step's row of whole-sequence value ``name`` (the input projection hoisted out of
        the loop) may be overwritten by the one sum that reads it: a tensor of its own computed here
        (an arithmetic op's or a product's result: never an input, nor a view of one such as a
        chunk of ``x``), read by no other node of the loop, not a result and not kept for the
        backward. The step's GEMM then adds into it in place (``accumulate``), where an addmm
        would copy it first."""
        node = self.nodes[name]
        if node not in self.body[Level.SEQ] or name in self.reads.whole \
                or not (node.op in WRITES_INTO or node.op is Op.MATMUL):
            return False
        readers = [n for n in self.body[Level.LOOP] for i in n.inputs if i == name]
        return len(readers) == 1 and name not in self.graph.results()


def generate_backward(graph: Graph) -> PythonCode:
    """``forward_sequence_saving`` and ``backward_sequence`` for an optimized graph."""
    generator = _Generator(graph)
    backward = generator.backward()  # first: it records what the forward must save
    return PythonCode(validate_source(generator.forward() + "\n\n" + backward), SCRIPT_GLOBALS)


def supports_training(graph: Graph) -> bool:
    """Whether the derived backward holds in training mode too (no op that draws noise per step)."""
    return all(DERIVATIVES[n.op].in_training for n in graph.nodes if n.op.kind is not OpKind.LEAF)
