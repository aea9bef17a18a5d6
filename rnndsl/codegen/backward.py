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
    parameter-only part.

Where a value lives decides how its gradient is kept: a batched value that
depends on a state lives in the loop (one gradient per step); one that depends
only on the input lives on the whole sequence (per-step contributions go into
a buffer); unbatched values depend only on parameters and get the sum over
all steps and examples.

The ``torch.autograd.Function`` around the two methods, ``DerivedSequence``,
is runtime and lives in rnndsl/backward.py.

Matrix products in these methods go through the helpers of rnndsl/kernels.py
(``linear``, ``outer_sum``, ``prepack``), which pick oneDNN's GEMM where it is
faster.
"""
from __future__ import annotations

import enum
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ..ir import Graph, Node, Op, OpKind, Phase, Shape, Size, tiling_order
from ..names import SCRIPT_GLOBALS, Namespace
from .base import (EMITTERS, NodeEmitter, PythonCode, biased_products, gemm, masked_assignment, size_code,
                   state_update, tuple_type, validate_source)
from .derivatives import DERIVATIVES, Outer, Placed, Product, Term

# Products go through the helpers of rnndsl/kernels.py, which pick oneDNN's GEMM where it is faster.
BACKWARD_EMITTERS = {**EMITTERS, Op.MATMUL: gemm("linear")}

# Where values live --------------------------------------------------------------------------

class Level(enum.Enum):
    """Where a value lives in the sequence methods, and so how many leading dims it has there."""

    LOOP = "loop"      # per step, in the time loop: (batch, n)
    SEQ = "seq"        # the whole sequence at once: (T, batch, n)
    ONCE = "once"      # parameters only, unbatched: (n,), (m, n) or a number


_LEAD = {Level.LOOP: 1, Level.SEQ: 2, Level.ONCE: 0}  # leading dims of a batched value


def level_of(node: Node) -> Level:
    """Unbatched values depend only on parameters (the input and states are batched)."""
    if not node.shape.batched:
        return Level.ONCE
    if node.op is Op.INPUT or node.phase is Phase.PER_INPUT:
        return Level.SEQ
    return Level.LOOP


def _atom(expr: str) -> str:
    """``expr``, parenthesized unless it can take ``.method()`` or stand in a product as it is."""
    depth = 0
    for char in expr:
        depth += char in "(["
        depth -= char in ")]"
        if char == " " and depth == 0:  # generated operators have spaces around them
            return f"({expr})"
    return f"({expr})" if expr.startswith("-") else expr


def _reduce(expr: str, shape: Shape, lead: int, target: Shape) -> str:
    """Sum a gradient of IR shape ``shape`` with ``lead`` leading dims down to ``target``'s shape.

    Differentiable values are never numbers (parameters have dims), so only leading dims go.
    """
    if target.batched or lead == 0:
        return expr
    dims = "0" if lead == 1 else f"[{', '.join(str(d) for d in range(lead))}]"
    return f"{_atom(expr)}.sum({dims})"


@dataclass(frozen=True)
class _OuterOf:
    """An :class:`Outer` with its vector named (the rule gave an input index)."""

    grad: str
    vector: str


@dataclass(frozen=True)
class _Item:
    """A pending contribution, its IR shape, and the leading dims its code has beyond that shape."""

    contribution: object  # Term, Product, Placed or _OuterOf
    shape: Shape
    lead: int


@dataclass
class _Block:
    """The lines of one stretch of code at one level."""

    level: Level
    indent: str
    lines: List[str] = field(default_factory=list)

    def emit(self, line: str) -> None:
        self.lines.append(self.indent + line)


class _RuleContext:
    """What a derivative rule sees (the rnndsl.derivatives.Rule protocol)."""

    def __init__(self, generator: "_Generator", node: Node, grad: str, block: _Block):
        self.node, self.grad = node, grad
        self._generator, self._block = generator, block

    def needs(self, index: int) -> bool:
        return self.node.inputs[index] in self._generator.differentiable

    def shape(self, index: int) -> Shape:
        return self._generator.nodes[self.node.inputs[index]].shape

    def value(self, index: int) -> str:
        return self._generator.value(self.node.inputs[index], self._block.level)

    def output(self) -> str:
        return self._generator.value(self.node.name, self._block.level)

    def grad_times_matrix(self, index: int) -> str:
        return self._generator.times_matrix(self.grad, self.node.inputs[index], self._block.level)

    def size(self, size: Size) -> str:
        return size_code(size)

    def fresh(self, base: str) -> str:
        return self._generator.names.fresh(base)

    def emit(self, line: str) -> None:
        self._block.emit(line)


class _Generator:
    """Generates ``backward_sequence``, recording the forward values it reads, then the saving forward."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.nodes = graph.node_map()
        self.emitter = NodeEmitter(graph, BACKWARD_EMITTERS)
        self.names = Namespace({n.name for n in graph.nodes} | set(self.emitter.local.values()))
        # Both methods take the parameters as a list, so the backward uses exactly the tensors the
        # forward used (autograd's inputs), whatever the module holds by then.
        self.parameter_list = self.names.fresh("params")
        self.emitter.bind_parameters(self.names)
        self.differentiable = set()
        for node in graph.nodes:
            if node.op in (Op.PARAM, Op.STATE, Op.INPUT) or (
                    node.op.kind is not OpKind.LEAF and any(i in self.differentiable for i in node.inputs)):
                self.differentiable.add(node.name)
        body = [n for n in graph.nodes if n.op.kind is not OpKind.LEAF]
        self.body = {level: [n for n in body if level_of(n) is level] for level in Level}
        self.seq_names = {n.name: self.names.fresh(n.name, "seq") for n in self.body[Level.SEQ]}
        self.seq_names[graph.input.name] = "xs"
        # What the backward reads of the forward: loop values stacked over time, whole-sequence
        # values, and parameter-only values (by value name -> local name).
        self.stacked: Dict[str, str] = {}
        self.whole: Dict[str, str] = {}
        self.once: Dict[str, str] = {}
        self.numbers: set = set()  # numbers the backward computes again, by value name
        self.loads: Dict[str, str] = {}  # read in the loop at step t: value -> local
        # Matrices of the loop's products, packed once for oneDNN: value -> local, forward and backward.
        self.packed: Dict[str, str] = {}
        self.packed_transposed: Dict[str, Tuple[str, str]] = {}  # value -> (local, the matrix)
        self.buffers: Dict[str, Tuple[str, Shape]] = {}  # per-step gradient -> its (T, ...) buffer
        # Gradients joined from slices with torch.cat: local -> (block, line, its parts with their ranges).
        self.joins: Dict[str, Tuple[_Block, int, List[Tuple[str, Size, Size]]]] = {}
        self.views: Dict[str, Tuple[str, Size, Size]] = {}  # buffers that are slices of another buffer
        self.pending: Dict[str, List[_Item]] = defaultdict(list)
        self.crossing: Dict[str, List[_Item]] = defaultdict(list)  # from the loop to other levels

    # Forward values ------------------------------------------------------------------------

    def value(self, name: str, level: Level) -> str:
        """Forward value ``name`` as code at ``level`` sees it; records that the backward reads it."""
        node = self.nodes[name]
        leaf = self.emitter.leaf(node)
        if leaf is not None:
            return leaf
        home = level_of(node)
        if home is Level.ONCE:
            if not node.shape.dims:  # a number (hypers and constants): recomputed, as saved values are tensors
                self.recompute_number(name)
                return name
            self.once[name] = name
            return name
        if level is Level.LOOP:
            self.loads[name] = self.emitter.var(name)
            self.sequence(name)
            return self.loads[name]
        return self.sequence(name)

    def recompute_number(self, name: str) -> None:
        """Have ``backward_sequence`` compute number ``name`` again, with the numbers it is made of."""
        stack = [name]
        while stack:
            current = stack.pop()
            if current not in self.numbers and self.emitter.leaf(self.nodes[current]) is None:
                self.numbers.add(current)
                stack.extend(self.nodes[current].inputs)

    def sequence(self, name: str) -> str:
        """All steps of a batched value: its stack over time, or its whole-sequence tensor."""
        if level_of(self.nodes[name]) is Level.LOOP:
            if name not in self.stacked:
                self.stacked[name] = self.names.fresh(self.emitter.var(name), "steps")
            return self.stacked[name]
        if name != self.graph.input.name:
            self.whole[name] = self.seq_names[name]
        return self.seq_names[name]

    def times_matrix(self, grad: str, matrix: str, level: Level) -> str:
        """Code for ``grad @ matrix``; in the loop with the matrix transposed and packed once."""
        if level is Level.LOOP:
            if matrix not in self.packed_transposed:
                self.packed_transposed[matrix] = (self.names.fresh(matrix, "t", "packed"), self.value(matrix, level))
            return f"linear({grad}, {self.packed_transposed[matrix][0]})"
        return f"linear({grad}, {self.value(matrix, level)}.t())"

    # Gradients ------------------------------------------------------------------------------

    def differentiate(self, node: Node, block: _Block) -> None:
        """Apply ``node``'s rule to its finished gradient, filing what its inputs get."""
        grad = self.gradient(node.name, block)
        if grad is None:
            return
        contributions = DERIVATIVES[node.op].rule(_RuleContext(self, node, grad, block))
        for index, item in enumerate(contributions):
            target = self.nodes[node.inputs[index]]
            if item is None or target.name not in self.differentiable:
                continue
            if isinstance(item, Outer):
                item, shape = _OuterOf(item.grad, node.inputs[item.vector]), node.shape
            elif isinstance(item, Term):
                shape = item.shape or node.shape
            elif isinstance(item, Placed):
                shape = Shape(target.shape.dims, node.shape.batched)
            else:
                shape = node.shape
            self.route(target.name, item, shape, block)

    def route(self, target: str, item: object, shape: Shape, block: _Block) -> None:
        """File a contribution made at ``block``'s level where ``target``'s gradient is summed."""
        if block.level is Level.LOOP and level_of(self.nodes[target]) is not Level.LOOP:
            self.crossing[target].append(_Item(item, shape, _LEAD[Level.LOOP] if shape.batched else 0))
            return
        if isinstance(item, _OuterOf):  # outside the loop: one GEMM right away
            vector = self.value(item.vector, block.level)
            item, shape = Term(f"outer_sum({item.grad}, {vector})"), self.nodes[target].shape
        self.pending[target].append(_Item(item, shape, _LEAD[block.level] if shape.batched else 0))

    def gradient(self, name: str, block: _Block) -> Optional[str]:
        """The finished gradient of ``name`` as a local, or None when nothing reached it."""
        parts = ("grad", self.emitter.var(name))
        expr = self.combine(self.pending.pop(name, []), self.nodes[name].shape, block, parts)
        if expr is None:
            return None
        return self.assign(expr, parts, block)

    def assign(self, expr: str, parts: Tuple[str, ...], block: _Block) -> str:
        """``expr`` as a local: itself when it is one, else a new local named from ``parts``."""
        if expr.isidentifier():
            return expr
        local = self.names.fresh(*parts)
        block.emit(f"{local} = {expr}")
        return local

    def combine(self, items: Sequence[_Item], target: Shape, block: _Block,
                parts: Tuple[str, ...] = ("grad",)) -> Optional[str]:
        """The sum of ``items`` in ``target``'s shape, as code (lines it needs go to ``block``, locals
        named from ``parts``)."""
        groups: Dict[Tuple[Shape, int], List[object]] = defaultdict(list)
        for item in items:
            groups[item.shape, item.lead].append(item.contribution)
        sums = []
        for (shape, lead), group in groups.items():
            places = [c for c in group if isinstance(c, Placed)]
            total = self.place(places, shape, block, parts) if places else None
            for term in (c for c in group if isinstance(c, Term)):
                total = term.expr if total is None else f"{total} + {_atom(term.expr)}"
            for product in (c for c in group if isinstance(c, Product)):
                total = (f"{_atom(product.left)} * {_atom(product.right)}" if total is None else
                         f"torch.addcmul({total}, {product.left}, {product.right})")
            sums.append(_reduce(total, shape, lead, target))
        return " + ".join(sums[:1] + [_atom(s) for s in sums[1:]]) if sums else None

    def place(self, places: Sequence[Placed], shape: Shape, block: _Block, name: Tuple[str, ...]) -> str:
        """Gradients of slices of a vector, joined into the gradient of the whole vector."""
        parts: Dict[Tuple[Size, Size], str] = {}
        for place in places:
            key = (place.start, place.length)
            parts[key] = place.expr if key not in parts else f"{parts[key]} + {_atom(place.expr)}"
        keys, whole = list(parts), shape.dims[0]
        tiling = tiling_order(keys, whole)
        if tiling is not None:
            order = [keys[i] for i in tiling]
            bases = {self.views.get(parts[key], (None,))[0] for key in order}
            if len(bases) == 1 and None not in bases and all(
                    self.views[parts[key]][1:] == key for key in order):
                return bases.pop()  # the slices of one buffer, all of it in order: the buffer
            local = self.names.fresh(*name)
            self.joins[local] = (block, len(block.lines), [(parts[key],) + key for key in order])
            block.emit(f"{local} = torch.cat([{', '.join(parts[key] for key in order)}], -1)")
            return local
        # Gaps or overlaps: start from zeros (rare: a chunk with an unused part).
        first = _atom(next(iter(parts.values())))
        local = self.names.fresh("placed")
        block.emit(f"{local} = {first}.new_zeros({first}.size()[:-1] + [{size_code(whole)}])")
        for (start, length), expr in parts.items():
            block.emit(f"{local}.narrow(-1, {size_code(start)}, {size_code(length)}).add_({expr})")
        return local

    def buffer(self, local: str, shape: Shape) -> str:
        """The (T, ...) buffer that keeps the per-step gradient ``local`` of every step."""
        if local not in self.buffers:
            self.buffers[local] = (self.names.fresh(local, "steps"), shape)
        return self.buffers[local][0]

    # The backward ---------------------------------------------------------------------------

    def backward(self) -> str:
        """The source of ``backward_sequence``; generated first, it records what the forward keeps."""
        graph = self.graph
        fixed = {name: self.names.fresh(name) for name in
                 ("saved", "grad_outputs", "grad_state", "need_input_grad", "grad_xs", "steps", "batch")}
        self.steps, self.batch = fixed["steps"], fixed["batch"]
        states = [d.name for d in graph.states]
        carries = {s: self.names.fresh("grad", self.emitter.var(s)) for s in states}
        grad_outputs = [self.names.fresh("grad_output_seq") for _ in graph.outputs]

        loop = _Block(Level.LOOP, " " * 8)
        output_steps = [self.names.fresh("grad_output") for _ in graph.outputs]
        for name, local, whole in zip(graph.outputs, output_steps, grad_outputs):
            loop.emit(f"{local} = {whole}[t]")
            self.route(name, Term(local), self.nodes[name].shape, loop)
        seeds = {s: self.names.fresh("seed", self.emitter.var(s)) for s in states}
        carried = [carries[s] for s in states]
        for line in masked_assignment(list(seeds.values()), carried,
                                      [f"torch.where(keep, {c}, 0.0)" for c in carried]):
            loop.emit(line)
        for state, next_state in zip(states, graph.next_states):
            self.route(next_state, Term(seeds[state]), self.nodes[next_state].shape, loop)
        for node in reversed(self.body[Level.LOOP]):
            self.differentiate(node, loop)
        new = []
        for state in states:
            expr = self.combine(self.pending.pop(state, []), self.nodes[state].shape, loop)
            new.append(expr or f"torch.zeros_like({carries[state]})")
        after_loop = self.flush(loop)
        for line in masked_assignment(carried, new, [f"{_atom(n)} + torch.where(keep, 0.0, {c})"
                                                     for n, c in zip(new, carried)]):
            loop.emit(line)
        for target, item in after_loop:
            self.pending[target].append(item)

        seq = _Block(Level.SEQ, " " * 4)
        for node in reversed(self.body[Level.SEQ]):
            self.differentiate(node, seq)
        input_grad = _Block(Level.SEQ, " " * 8)
        x = graph.input.name
        grad_xs = self.combine(self.pending.pop(x, []), self.nodes[x].shape, input_grad)
        input_grad.emit(f"{fixed['grad_xs']} = {grad_xs or 'torch.zeros_like(xs)'}")
        once = _Block(Level.ONCE, " " * 4)
        for node in reversed(self.body[Level.ONCE]):
            self.differentiate(node, once)
        grad_params = []
        for decl in graph.params:
            expr = self.combine(self.pending.pop(decl.name, []), decl.shape, once)
            grad_params.append(self.assign(expr or f"torch.zeros_like({self.emitter.ref(decl.name, {})})",
                                           ("grad", decl.name), once))

        lines = [f"def backward_sequence(self, xs: Tensor, mask: Optional[Tensor], {self.parameter_list}: List[Tensor], "
                 f"{fixed['saved']}: List[Tensor], {fixed['grad_outputs']}: List[Tensor], "
                 f"{fixed['grad_state']}: List[Tensor], {fixed['need_input_grad']}: bool"
                 ") -> Tuple[Tensor, List[Tensor], List[Tensor]]:"]
        lines += self.parameter_lines()
        lines += [f"    {local} = {fixed['saved']}[{i}]" for i, local in enumerate(self.saved_locals())]
        lines += [f"    {node.name} = {self.emitter.expression(node, {})}" for node in graph.nodes
                  if node.name in self.numbers]
        lines += [f"    {local} = {fixed['grad_outputs']}[{i}]" for i, local in enumerate(grad_outputs)]
        lines.append("    if mask is not None:")
        lines += [f"        {local} = torch.where(mask.unsqueeze(2), {local}, 0.0)" for local in grad_outputs]
        lines += [f"    {carries[s]} = {fixed['grad_state']}[{i}]" for i, s in enumerate(states)]
        lines.append(f"    {self.steps}, {self.batch} = xs.size(0), xs.size(1)")
        for buffer, shape in self.buffers.values():
            dims = [self.steps] + ([self.batch] if shape.batched else []) + [size_code(d) for d in shape.dims]
            if buffer not in self.views:
                lines.append(f"    {buffer} = xs.new_empty([{', '.join(dims)}])")
        for buffer, (base, start, length) in self.views.items():
            lines.append(f"    {buffer} = {base}.narrow(-1, {size_code(start)}, {size_code(length)})")
        for local, matrix in self.packed_transposed.values():
            lines.append(f"    {local} = prepack({matrix}.t(), {self.batch})")
        lines.append(f"    for t in range({self.steps} - 1, -1, -1):")
        lines += [f"        {local} = {self.sequence(name)}[t]" for name, local in self.loads.items()]
        lines += loop.lines
        lines += seq.lines
        lines.append(f"    if {fixed['need_input_grad']}:")
        lines += input_grad.lines
        lines.append("    else:")
        lines.append(f"        {fixed['grad_xs']} = xs.new_empty([0])")
        lines += once.lines
        lines.append(f"    return {fixed['grad_xs']}, [{', '.join(carried)}], [{', '.join(grad_params)}]")
        return "\n".join(lines) + "\n"

    def flush(self, loop: _Block) -> List[Tuple[str, _Item]]:
        """End of a step: write what the loop gave to values outside it into buffers.

        Returns the contributions those buffers make after the loop, by target.
        """
        after = []
        for target, items in self.crossing.items():
            groups: Dict[Tuple[Shape, int], List[_Item]] = defaultdict(list)
            for item in items:
                outer = item.contribution
                if isinstance(outer, _OuterOf):  # loop values are batched: one GEMM over all steps
                    term = f"outer_sum({self.buffer(outer.grad, item.shape)}, {self.sequence(outer.vector)})"
                    after.append((target, _Item(Term(term), self.nodes[target].shape, 0)))
                else:
                    groups[item.shape, item.lead].append(item)
            for (shape, lead), group in groups.items():
                local = self.assign(self.combine(group, shape, loop), ("grad", target, "step"), loop)
                after.append((target, _Item(Term(self.buffer(local, shape)), shape, lead + 1)))
        for local, (buffer, _) in self.buffers.items():
            if local in self.joins:  # join the parts straight into the buffer: no copy, no allocation
                block, index, joined = self.joins[local]
                block.lines[index] = f"{block.lines[index][:-1]}, out={buffer}[t])"
                for part, start, length in joined:  # a buffered part is then a slice of this buffer
                    if part in self.buffers and part not in self.joins:
                        self.views.setdefault(self.buffers[part][0], (buffer, start, length))
        for local, (buffer, _) in self.buffers.items():
            if buffer not in self.views and local not in self.joins:
                loop.emit(f"{buffer}[t].copy_({local})")
        self.crossing.clear()
        return after

    def parameter_lines(self) -> List[str]:
        """A method's first lines: its parameters, in declaration order, from its parameter list."""
        return [f"    {self.emitter.ref(decl.name, {})} = {self.parameter_list}[{i}]"
                for i, decl in enumerate(self.graph.params)]

    def saved_locals(self) -> List[str]:
        return list(self.stacked.values()) + list(self.whole.values()) + list(self.once.values())

    # The saving forward --------------------------------------------------------------------

    def forward(self) -> str:
        """``forward_sequence_saving``: forward_sequence's loop, keeping what the backward reads."""
        graph, emitter = self.graph, self.emitter
        states = [emitter.var(d.name) for d in graph.states]
        lines = [f"def forward_sequence_saving(self, xs: Tensor, state: {tuple_type(len(states))}, "
                 f"mask: Optional[Tensor], {self.parameter_list}: List[Tensor]"
                 ") -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:"]
        lines += self.parameter_lines()
        lines += [f"    {local} = state[{i}]" for i, local in enumerate(states)]
        for node in self.body[Level.ONCE]:
            lines.append(f"    {node.name} = {self.emitter.expression(node, {})}")
        biased = self.emitter.biased = self.biased_products()
        for node in self.body[Level.SEQ]:
            if node.name in biased:  # computed with the sum below
                continue
            lines.append(f"    {self.seq_names[node.name]} = {self.emitter.expression(node, self.seq_names)}")
        step = self.body[Level.LOOP]
        for node in step:
            matrix = node.inputs[0] if node.op is Op.MATMUL else None
            if matrix is not None and matrix not in self.packed:
                self.packed[matrix] = self.names.fresh(matrix, "packed")
                lines.append(f"    {self.packed[matrix]} = prepack({emitter.ref(matrix, {})}, xs.size(1))")
        # Kept values are copied at each step into (T, batch, n) tensors, while still in cache
        # (a list of steps stacked after the loop costs twice as much here).
        outputs = [self.names.fresh("outputs") for _ in graph.outputs]
        for name, local in list(zip(graph.outputs, outputs)) + list(self.stacked.items()):
            size = size_code(self.nodes[name].shape.dims[0])
            lines.append(f"    {local} = xs.new_empty([xs.size(0), xs.size(1), {size}])")
        needed = [i for n in step for i in n.inputs] + list(graph.results())
        reads = [name for name in self.seq_names if name in needed]
        lines.append("    for t in range(xs.size(0)):")
        lines += [f"        {emitter.var(name)} = {self.seq_names[name]}[t]" for name in reads]
        lines += [f"        {self.stacked[d.name]}[t].copy_({emitter.var(d.name)})"
                  for d in graph.states if d.name in self.stacked]
        for node in step:
            lines.append(f"        {node.name} = {self.step_expression(node)}")
            if node.name in self.stacked:
                lines.append(f"        {self.stacked[node.name]}[t].copy_({node.name})")
        for local, name in zip(outputs, graph.outputs):
            lines.append(f"        {local}[t].copy_({emitter.ref(name, {})})")
        lines.extend(state_update(states, [emitter.ref(n, {}) for n in graph.next_states]))
        lines.append("    if mask is not None:")
        lines += [f"        {local} = {local} * mask.unsqueeze(2).to(xs.dtype)" for local in outputs]
        lines.append(f"    return [{', '.join(outputs)}], [{', '.join(states)}], [{', '.join(self.saved_locals())}]")
        return "\n".join(lines) + "\n"

    def biased_products(self) -> Dict[str, str]:
        """Whole-sequence products whose GEMM adds their bias (see base.biased_products); not
        those the backward reads, which must exist on their own."""
        once = {n.name for n in self.graph.nodes if level_of(n) is Level.ONCE}
        return biased_products(self.graph, self.body[Level.SEQ], once, kept=self.whole)

    def step_expression(self, node: Node) -> str:
        """A loop node's forward code; a matrix product by its matrix packed before the loop."""
        if node.op is Op.MATMUL:
            matrix, vector = node.inputs
            return BACKWARD_EMITTERS[Op.MATMUL](node, [self.packed[matrix], self.emitter.ref(vector, {})])
        return self.emitter.expression(node, {})


def generate_backward(graph: Graph) -> PythonCode:
    """``forward_sequence_saving`` and ``backward_sequence`` for an optimized graph."""
    generator = _Generator(graph)
    backward = generator.backward()  # first: it records what the forward must save
    return PythonCode(validate_source(generator.forward() + "\n\n" + backward), SCRIPT_GLOBALS)


def supports_training(graph: Graph) -> bool:
    """Whether the derived backward holds in training mode too (no op that draws noise per step)."""
    return all(DERIVATIVES[n.op].in_training for n in graph.nodes if n.op.kind is not OpKind.LEAF)
