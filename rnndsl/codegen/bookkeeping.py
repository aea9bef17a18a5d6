"""The derived backward's bookkeeping (rnndsl/codegen/backward.py), behind two small objects.

:class:`ForwardReads` records what the backward reads of the forward (values stacked over
time, whole-sequence values, parameter-only values, numbers to compute again), so that the
saving forward keeps exactly those. :class:`GradientSums` holds where gradients accumulate:
contributions pending per value, those a loop step makes to values outside the loop, and the
``(T, ...)`` buffers that carry them out of it.

Where a value lives decides how its gradient is kept (:class:`Level`): a batched value that
depends on a state lives in the loop (one gradient per step); one that depends only on the
input lives on the whole sequence (per-step contributions go into a buffer); one that depends
on a per-sequence input and on no step lives once per sequence, per example (what the steps
give it is summed over them); unbatched values depend only on parameters and get the sum over
all steps and examples.
"""
from __future__ import annotations

import enum
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

from ..ir import ONE, Graph, Node, Op, Phase, Shape, Size, tiling_order
from ..names import Namespace
from .base import NodeEmitter, atom, per_sequence, size_code
from .derivatives import Placed, Product, Term


class Level(enum.Enum):
    """Where a value lives in the sequence methods, and so how many leading dims it has there."""

    LOOP = "loop"      # per step, in the time loop: (batch, n)
    SEQ = "seq"        # the whole sequence at once: (T, batch, n)
    SEQUENCE = "sequence"  # once per sequence, per example (per-sequence inputs): (batch, n)
    ONCE = "once"      # parameters only, unbatched: (n,), (m, n) or a number


LEAD = {Level.LOOP: 1, Level.SEQ: 2, Level.SEQUENCE: 1, Level.ONCE: 0}  # leading dims of a batched value


def level_of(node: Node) -> Level:
    """Unbatched values depend only on parameters (the inputs and states are batched)."""
    if not node.shape.batched:
        return Level.ONCE
    if per_sequence(node):
        return Level.SEQUENCE
    if node.op is Op.INPUT or node.phase is Phase.PER_INPUT:
        return Level.SEQ
    return Level.LOOP


# Gradient calls of ATen that write into a given tensor (their ``grad_input=`` form).
_WRITE_GRAD_INPUT = ("torch.ops.aten.sigmoid_backward(", "torch.ops.aten.tanh_backward(",
                     "torch.ops.aten.threshold_backward(")


def _one_call(expr: str, opening: int) -> bool:
    """Whether the parenthesis at ``opening`` closes at the end of ``expr`` (``expr`` is one call)."""
    depth = 0
    for position in range(opening, len(expr)):
        depth += {"(": 1, ")": -1}.get(expr[position], 0)
        if depth == 0:
            return position == len(expr) - 1
    return False


def _written_into(expr: str, into: str, products: Dict[str, Tuple[str, str]]) -> Optional[str]:
    """``expr`` computed into the tensor ``into`` by its op's out= form, or None where it has none."""
    if expr in products:
        return f"torch.mul({', '.join(products[expr])}, out={into})"
    for call in _WRITE_GRAD_INPUT:
        if expr.startswith(call) and _one_call(expr, len(call) - 1):
            return f"{expr[:-1]}, grad_input={into})"
    return None


def _reduce(expr: str, shape: Shape, lead: int, target: Shape, target_lead: int) -> str:
    """Sum a gradient of IR shape ``shape`` with ``lead`` leading dims down to ``target``'s shape,
    which has ``target_lead`` leading dims where it is summed.

    Differentiable values are never numbers (parameters have dims), so leading dims go (all of
    them for an unbatched target; for a per-sequence one, the steps), and the dims a value was
    broadcast over: size 1 in ``target`` (a one-unit value against a vector, a tensor's ``expand``).
    """
    broadcast = [i - len(shape.dims) for i, (dim, kept) in enumerate(zip(shape.dims, target.dims))
                 if kept == ONE and dim != ONE]
    if broadcast:
        expr = f"{atom(expr)}.sum([{', '.join(str(i) for i in broadcast)}], True)"
    summed = lead - (target_lead if target.batched else 0)
    if summed <= 0:
        return expr
    dims = "0" if summed == 1 else f"[{', '.join(str(d) for d in range(summed))}]"
    return f"{atom(expr)}.sum({dims})"


@dataclass(frozen=True)
class OuterOf:
    """An ``Outer`` contribution with its vector named (the rule gave an input index)."""

    grad: str
    vector: str
    call: str  # code of {grad} and {vector}

    def code(self, grad: str, vector: str) -> str:
        return self.call.format(grad=grad, vector=vector)


@dataclass(frozen=True)
class Item:
    """A pending contribution, its IR shape, and the leading dims its code has beyond that shape."""

    contribution: object  # Term, Product, Placed or OuterOf
    shape: Shape
    lead: int


@dataclass(frozen=True)
class Definition:
    """Where a gradient local was assigned, and to what."""

    block: "Block"
    index: int
    expr: str


@dataclass
class Block:
    """The lines of one stretch of code at one level."""

    level: Level
    indent: str
    lines: List[str] = field(default_factory=list)

    def emit(self, line: str) -> None:
        self.lines.append(self.indent + line)


class ForwardReads:
    """What the backward reads of the forward, by value name -> local name."""

    def __init__(self, graph: Graph, emitter: NodeEmitter, names: Namespace, whole_sequence: Sequence[Node]):
        self.graph, self.nodes, self.emitter, self.names = graph, graph.node_map(), emitter, names
        self.seq_names = {n.name: names.fresh(n.name, "seq") for n in whole_sequence}
        # The inputs read at every step are arguments of both methods: `xs`, and the others by
        # their whole-sequence names.
        self.arguments = {graph.input.name: "xs"}
        for decl in graph.extra_inputs:
            self.arguments[decl.name] = (emitter.var(decl.name) if decl.name in graph.per_sequence
                                         else names.fresh(emitter.var(decl.name), "seq"))
        self.seq_names.update({name: self.arguments[name] for name in graph.inputs_read_per_step()})
        self.stacked: Dict[str, str] = {}  # loop values, stacked over time
        self.whole: Dict[str, str] = {}    # whole-sequence values
        self.once: Dict[str, str] = {}     # parameter-only values
        self.numbers: Set[str] = set()     # numbers the backward computes again
        self.loads: Dict[str, str] = {}    # read in the loop at step t: value -> local
        # Matrices of the loop's products, transposed and packed once for oneDNN: value -> (local, matrix).
        self.packed_transposed: Dict[str, Tuple[str, str]] = {}

    def value(self, name: str, level: Level) -> str:
        """Forward value ``name`` as code at ``level`` sees it; records that the backward reads it."""
        node = self.nodes[name]
        leaf = self.emitter.leaf(node)
        if leaf is not None:
            return leaf
        home = level_of(node)
        if node.op is Op.SEQUENCE_INPUT:  # an argument
            return self.arguments[name]
        if home is Level.SEQUENCE:  # (batch, n), which broadcasts against a step's or all steps' values
            self.once[name] = name
            return name
        if home is Level.ONCE:
            if not node.shape.dims:  # a number (hypers and constants): recomputed, as saved values are tensors
                self._recompute_number(name)
                return name
            self.once[name] = name
            return name
        if level is Level.LOOP:
            self.loads[name] = self.emitter.var(name)
            self.sequence(name)
            return self.loads[name]
        return self.sequence(name)

    def _recompute_number(self, name: str) -> None:
        """Have ``backward_sequence`` compute number ``name`` again, with the numbers it is made of."""
        stack = [name]
        while stack:
            current = stack.pop()
            if current not in self.numbers and self.emitter.leaf(self.nodes[current]) is None:
                self.numbers.add(current)
                stack.extend(self.nodes[current].inputs)

    def sequence(self, name: str) -> str:
        """All steps of a batched value: its stack over time, or its whole-sequence tensor (a
        per-sequence value expanded over the steps, a view)."""
        home = level_of(self.nodes[name])
        if home is Level.LOOP:
            if name not in self.stacked:
                self.stacked[name] = self.names.fresh(self.emitter.var(name), "steps")
            return self.stacked[name]
        if home is Level.SEQUENCE:
            local = self.value(name, Level.SEQUENCE)
            return f"{local}.expand([xs.size(0)] + list({local}.size()))"
        if name not in self.arguments:
            self.whole[name] = self.seq_names[name]
        return self.seq_names[name]

    def times_matrix(self, grad: str, matrix: str, level: Level) -> str:
        """Code for ``grad @ matrix``; in the loop with the matrix transposed and packed once."""
        if level is Level.LOOP:
            if matrix not in self.packed_transposed:
                self.packed_transposed[matrix] = (self.names.fresh(matrix, "t", "packed"), self.value(matrix, level))
            return f"linear({grad}, {self.packed_transposed[matrix][0]})"
        return f"linear({grad}, {self.value(matrix, level)}.t())"

    def saved_locals(self) -> List[str]:
        """What the saving forward returns for the backward, in the order the backward unpacks it."""
        return list(self.stacked.values()) + list(self.whole.values()) + list(self.once.values())


class GradientSums:
    """Where gradients accumulate, and the code that sums them."""

    def __init__(self, graph: Graph, names: Namespace, reads: ForwardReads):
        self.nodes, self.names, self.reads = graph.node_map(), names, reads
        self.pending: Dict[str, List[Item]] = defaultdict(list)
        self.crossing: Dict[str, List[Item]] = defaultdict(list)  # from the loop to other levels
        self.buffers: Dict[str, Tuple[str, Shape]] = {}  # per-step gradient -> its (T, ...) buffer
        # Gradients joined from slices with torch.cat: local -> (block, line, dim, its parts with their ranges).
        self.joins: Dict[str, Tuple[Block, int, int, List[Tuple[str, Size, Size]]]] = {}
        self.views: Dict[str, Tuple[str, Size, Size]] = {}  # buffers that are slices of another buffer
        self.definitions: Dict[str, Definition] = {}  # gradient locals by the line that assigns them
        self.products: Dict[str, Tuple[str, str]] = {}  # code ``a * b`` of two tensors -> (a, b)

    def route(self, target: str, item: object, shape: Shape, block: Block) -> None:
        """File a contribution made at ``block``'s level where ``target``'s gradient is summed."""
        if block.level is Level.LOOP and level_of(self.nodes[target]) is not Level.LOOP:
            self.crossing[target].append(Item(item, shape, LEAD[Level.LOOP] if shape.batched else 0))
            return
        if isinstance(item, OuterOf):  # outside the loop: one GEMM right away
            vector = self.reads.value(item.vector, block.level)
            item, shape = Term(item.code(item.grad, vector)), self.nodes[target].shape
        self.pending[target].append(Item(item, shape, LEAD[block.level] if shape.batched else 0))

    def total(self, name: str, block: Block, parts: Tuple[str, ...] = ("grad",)) -> Optional[str]:
        """The sum of what reached ``name`` so far, as code (None when nothing did)."""
        return self.combine(self.pending.pop(name, []), self.nodes[name].shape, block, parts)

    def assign(self, expr: str, parts: Tuple[str, ...], block: Block) -> str:
        """``expr`` as a local: itself when it is one, else a new local named from ``parts``."""
        if expr.isidentifier():
            return expr
        local = self.names.fresh(*parts)
        self.definitions[local] = Definition(block, len(block.lines), expr)
        block.emit(f"{local} = {expr}")
        return local

    def combine(self, items: Sequence[Item], target: Shape, block: Block,
                parts: Tuple[str, ...] = ("grad",)) -> Optional[str]:
        """The sum of ``items`` in ``target``'s shape, as code (lines it needs go to ``block``, locals
        named from ``parts``)."""
        groups: Dict[Tuple[Shape, int], List[object]] = defaultdict(list)
        for item in items:
            groups[item.shape, item.lead].append(item.contribution)
        sums = []
        for (shape, lead), group in groups.items():
            places = [c for c in group if isinstance(c, Placed)]
            total = self._place(places, shape, block, parts) if places else None
            for term in (c for c in group if isinstance(c, Term)):
                total = term.expr if total is None else f"{total} + {atom(term.expr)}"
            for product in (c for c in group if isinstance(c, Product)):
                if total is None:
                    total = f"{atom(product.left)} * {atom(product.right)}"
                    self.products[total] = (atom(product.left), atom(product.right))
                else:
                    total = f"torch.addcmul({total}, {product.left}, {product.right})"
            sums.append(_reduce(total, shape, lead, target, LEAD[block.level]))
        return " + ".join(sums[:1] + [atom(s) for s in sums[1:]]) if sums else None

    def _place(self, places: Sequence[Placed], shape: Shape, block: Block, name: Tuple[str, ...]) -> str:
        """Gradients of slices of a vector (of a tensor's first dim), joined into the gradient of the whole."""
        dim = -len(shape.dims)
        parts: Dict[Tuple[Size, Size], str] = {}
        for place in places:
            key = (place.start, place.length)
            parts[key] = place.expr if key not in parts else f"{parts[key]} + {atom(place.expr)}"
        keys, whole = list(parts), shape.dims[0]
        tiling = tiling_order(keys, whole)
        if tiling is not None:
            order = [keys[i] for i in tiling]
            bases = {self.views.get(parts[key], (None,))[0] for key in order}
            if len(bases) == 1 and None not in bases and all(
                    self.views[parts[key]][1:] == key for key in order):
                base = bases.pop()  # the slices of one buffer, in order, from its start: the buffer
                base_shape = dict(self.buffers.values())[base]
                if base_shape.dims[0] == whole:
                    return base
                # The buffer is longer (it also holds the gradient of a product this value is not
                # part of, say a third GEMM's merged beside two): its first `whole` entries.
                return f"{base}.narrow({dim}, 0, {size_code(whole)})"
            local = self.names.fresh(*name)
            self.joins[local] = (block, len(block.lines), dim, [(parts[key],) + key for key in order])
            block.emit(f"{local} = torch.cat([{', '.join(parts[key] for key in order)}], {dim})")
            return local
        # Gaps or overlaps: start from zeros (rare: a chunk with an unused part).
        first = atom(next(iter(parts.values())))
        local = self.names.fresh("placed")
        after = f" + list({first}.size()[{dim + 1}:])" if dim < -1 else ""
        block.emit(f"{local} = {first}.new_zeros(list({first}.size()[:{dim}]) + [{size_code(whole)}]{after})")
        for (start, length), expr in parts.items():
            block.emit(f"{local}.narrow({dim}, {size_code(start)}, {size_code(length)}).add_({expr})")
        return local

    def _buffer(self, local: str, shape: Shape) -> str:
        """The (T, ...) buffer that keeps the per-step gradient ``local`` of every step."""
        if local not in self.buffers:
            self.buffers[local] = (self.names.fresh(local, "steps"), shape)
        return self.buffers[local][0]

    def flush(self, loop: Block) -> List[Tuple[str, Item]]:
        """End of a step: write what the loop gave to values outside it into buffers.

        Returns the contributions those buffers make after the loop, by target (see :meth:`file`).
        """
        after = []
        for target, items in self.crossing.items():
            groups: Dict[Tuple[Shape, int], List[Item]] = defaultdict(list)
            for item in items:
                outer = item.contribution
                if isinstance(outer, OuterOf):  # loop values are batched: one GEMM over all steps
                    term = outer.code(self._buffer(outer.grad, item.shape), self.reads.sequence(outer.vector))
                    after.append((target, Item(Term(term), self.nodes[target].shape, 0)))
                else:
                    groups[item.shape, item.lead].append(item)
            for (shape, lead), group in groups.items():
                # Summed over the dims the target was broadcast over (``expand``) here, at each step,
                # so that the buffer holds the target's dims.
                shape = Shape(self.nodes[target].shape.dims, shape.batched)
                local = self.assign(self.combine(group, shape, loop), ("grad", target, "step"), loop)
                after.append((target, Item(Term(self._buffer(local, shape)), shape, lead + 1)))
        for local, (buffer, _) in self.buffers.items():
            if local in self.joins:  # join the parts straight into the buffer: no copy, no allocation
                block, index, dim, joined = self.joins[local]
                if self._compute_parts_into(f"{buffer}[t]", block, index, dim, joined):
                    block.lines[index] = f"{block.indent}{local} = {buffer}[t]"
                else:
                    block.lines[index] = f"{block.lines[index][:-1]}, out={buffer}[t])"
                for part, start, length in joined:  # a buffered part is then a slice of this buffer
                    if part in self.buffers and part not in self.joins:
                        self.views.setdefault(self.buffers[part][0], (buffer, start, length))
        for local, (buffer, _) in self.buffers.items():
            if buffer not in self.views and local not in self.joins:
                rewrite = self._computed_into(local, f"{buffer}[t]", loop, len(loop.lines))
                if rewrite is None:
                    loop.emit(f"{buffer}[t].copy_({local})")
                else:  # computed straight into its row: no copy
                    loop.lines[rewrite[0]] = rewrite[1]
                    del self.definitions[local]
        self.crossing.clear()
        return after

    def _computed_into(self, local: str, into: str, block: Block, before: int) -> Optional[Tuple[int, str]]:
        """The line of ``block`` that assigns ``local`` and that line rewritten to compute it straight
        into the tensor ``into`` (by its op's out= form); None unless ``local`` is assigned once, by a
        line of ``block`` before line ``before``, of an op with an out= form."""
        definition = self.definitions.get(local)
        if definition is None or definition.block is not block or definition.index >= before:
            return None
        code = _written_into(definition.expr, into, self.products)
        return None if code is None else (definition.index, f"{block.indent}{local} = {code}")

    def _compute_parts_into(self, whole: str, block: Block, index: int, dim: int,
                            joined: Sequence[Tuple[str, Size, Size]]) -> bool:
        """Have each part of a join computed straight into its slice of ``whole``, so that no
        ``torch.cat`` copies them there; False, changing nothing, unless every part can."""
        rewrites = []
        for part, start, length in joined:
            rewrite = self._computed_into(
                part, f"{whole}.narrow({dim}, {size_code(start)}, {size_code(length)})", block, index)
            if rewrite is None:
                return False
            rewrites.append(rewrite)
        if len({line for line, _ in rewrites}) < len(rewrites):  # one local for two parts
            return False
        for line, code in rewrites:
            block.lines[line] = code
        for part, _, _ in joined:  # written once: a later join cannot move it again
            del self.definitions[part]
        return True

    def file(self, contributions: Sequence[Tuple[str, Item]]) -> None:
        """File contributions already in their final form (the loop's buffers, after the loop)."""
        for target, item in contributions:
            self.pending[target].append(item)

    def buffer_lines(self, steps: str, batch: str) -> List[str]:
        """``backward_sequence``'s lines that make the buffers, before the loop."""
        lines = []
        for buffer, shape in self.buffers.values():
            dims = [steps] + ([batch] if shape.batched else []) + [size_code(d) for d in shape.dims]
            if buffer not in self.views:
                lines.append(f"    {buffer} = xs.new_empty([{', '.join(dims)}])")
        shapes = dict(self.buffers.values())
        for buffer, (base, start, length) in self.views.items():
            dim = -len(shapes[buffer].dims)
            lines.append(f"    {buffer} = {base}.narrow({dim}, {size_code(start)}, {size_code(length)})")
        return lines
