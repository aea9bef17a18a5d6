"""Lower: checked AST -> IR graph (rnndsl/ir.py), computing every value's shape.

Each expression becomes one node; a value assigned a name keeps it (``c'``
becomes ``c_next``), intermediate values are named after their op
(``sigmoid_1``). Shape mismatches are reported here, at the expression that
causes them.

A tensor state ``S[heads, key, value]`` is carried flat between steps, a
``(batch, heads*key*value)`` vector like any other state (so the time loop, masks,
initial states and networks are the same for every cell): its leaf is the flat
vector, which a ``reshape`` node (``S_view``) turns into the tensor the equations
read, and its next value is flattened again (``S_next_flat``). A tensor input
``x[input, height, width]`` is carried flat likewise, ``(T, batch, input*height*width)``,
and read through ``x_view``; a tensor state named as an output is output flat. The language's
left-aligned broadcast becomes explicit ``expand`` nodes (rnndsl/ops.py, ``aligned``).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from . import syntax_tree as st
from .check import BUILTIN_SIZES, input_sizes
from .errors import CellError, Span
from .ir import MAX_DIMENSION, ONE, Decl, Graph, Node, Op, OpKind, Shape, Size, attrs
from .names import Namespace, joined_name
from .ops import BINARY_OPS, FUNCTIONS, SHAPE_RULES, ShapeError, aligned, contract_form, op_word, refuse_mask
from .spec import verify

def size_of(expr: st.SizeExpr) -> Size:
    """The size a declaration's shape gives, its numbers at most MAX_DIMENSION."""
    size = _size_of(expr)
    numbers = [size.const] + [coeff for _, coeff in size.terms]
    if any(abs(number) > MAX_DIMENSION for number in numbers):
        raise CellError(f"size `{size}` is too large: its numbers may be at most {MAX_DIMENSION:,}",
                        expr.span)
    # `hidden - hidden`, `1 - hidden`: no build makes it positive (sizes are at least 1, so a size of
    # no positive coefficient is largest when they all are 1)
    if all(coeff <= 0 for _, coeff in size.terms) and size.const + sum(coeff for _, coeff in size.terms) < 1:
        largest = size.const + sum(coeff for _, coeff in size.terms)
        what = f"is {size.const}" if not size.terms else f"`{size}` is at most {largest}"
        raise CellError(f"size {what} whatever the sizes given at build: a dim is at least 1", expr.span)
    return size


def _size_of(expr: st.SizeExpr) -> Size:
    if isinstance(expr, st.SizeInt):
        return Size.of(expr.value)
    if isinstance(expr, st.SizeName):
        return Size.of(expr.name)
    left, right = _size_of(expr.left), _size_of(expr.right)
    try:
        return {"+": left + right, "-": left - right}[expr.op] if expr.op != "*" else left * right
    except ValueError as exc:
        raise CellError(str(exc), expr.span) from None


def _declared(decl) -> Shape:
    """A state's or an input's shape as the equations see it: a vector, or a tensor."""
    return Shape(tuple(size_of(s) for s in decl.shape), batched=True)


def _carried(decl) -> Shape:
    """A state's shape between steps, and an input's: flat."""
    flat = Size.of(1)
    for dim in _declared(decl).dims:
        flat = flat * dim
    return Shape((flat,), batched=True)


class _Lowering:
    def __init__(self, cell: st.Cell):
        self.cell = cell
        declared = {d.name for d in cell.inputs} | {d.name for d in cell.states} | {d.name for d in cell.params} | \
                   {d.name for d in cell.buffers} | {d.name for d in cell.hypers} | {d.name for d in cell.sizes}
        self.names = Namespace(declared)
        self.nodes: List[Node] = []
        self.env: Dict[str, Node] = {}     # source name -> node
        self.next: Dict[str, Node] = {}    # state name -> node of its next value
        self.carried: Dict[str, Node] = {}  # state name -> its next value as carried (flat for a tensor)

    def add(self, node: Node) -> Node:
        self.nodes.append(node)
        return node

    def leaf(self, name: str, op: Op, shape: Shape, span: Optional[Span], **attributes) -> Node:
        return self.add(Node(self.names.claim(name), op, (), shape, attrs(**attributes), span))

    def make(self, op: Op, inputs: List[Node], span: Span, name: Optional[str] = None,
             hint: Optional[str] = None, **attributes) -> Node:
        """A new node; ``hint`` goes with a shape error."""
        try:
            for index, node in enumerate(inputs):  # a mask reaches `where`'s first argument only
                if not (op is Op.WHERE and index == 0):
                    refuse_mask(node.shape, op_word(op))
        except ShapeError as exc:
            raise CellError(str(exc), span, hint=hint) from None
        if op.kind is OpKind.ELEMENTWISE and len(inputs) == 2:
            inputs = self.broadcast(op, inputs, span)
        probe = Node("_", op, tuple(n.name for n in inputs), Shape(), attrs(**attributes), span)
        try:
            shape = SHAPE_RULES[op](probe, [n.shape for n in inputs])
        except ShapeError as exc:
            raise CellError(str(exc), span, hint=hint) from None
        final = self.names.fresh(name) if name else self.names.fresh(op.label)
        return self.add(Node(final, op, probe.inputs, shape, probe.attrs, span))

    def broadcast(self, op: Op, inputs: List[Node], span: Span) -> List[Node]:
        """Elementwise operands, the one of fewer dims expanded to the other's rank."""
        try:
            counts = aligned(inputs[0].shape, inputs[1].shape, op_word(op))
        except ShapeError as exc:
            raise CellError(str(exc), span) from None
        return [self.make(Op.EXPAND, [node], span, trailing=count) if count else node
                for node, count in zip(inputs, counts)]

    def expr(self, expr: st.Expr, name: Optional[str] = None) -> Node:
        if isinstance(expr, st.Number):
            return self.make_const(expr.value, expr.span)
        if isinstance(expr, st.Name):
            return self.env[expr.name]
        if isinstance(expr, st.Primed):
            return self.next[expr.name]
        if isinstance(expr, st.Neg):
            return self.make(Op.NEG, [self.expr(expr.operand)], expr.span, name)
        if isinstance(expr, st.Binary):
            left, right = self.expr(expr.left), self.expr(expr.right)
            # `a * U @ h` reads as `(a * U) @ h`: `*`, `/` and `@` bind equally, left to right.
            weight = right.shape.is_matrix and not right.shape.batched
            hint = (f"`*`, `/` and `@` bind equally, from the left: to multiply by a product, write "
                    f"`a {expr.op} (U @ v)`") if expr.op in "*/" and weight else None
            form = contract_form(left.shape, right.shape) if expr.op == "@" else None
            if form is not None:  # `@` of per-example tensors, or with a per-head parameter
                return self.make(Op.CONTRACT, [left, right], expr.span, name, form=form)
            return self.make(BINARY_OPS[expr.op], [left, right], expr.span, name, hint)
        function = FUNCTIONS[expr.function]
        args = [self.expr(arg) for i, arg in enumerate(expr.args) if i not in function.size_args]
        numbers = [arg.shape.is_scalar for arg in args]
        if function.with_number is not None and any(numbers) and not all(numbers):
            vector, number = sorted(args, key=lambda arg: arg.shape.is_scalar)
            return self.make(function.with_number, [vector, number], expr.span, name)
        attributes = {}
        if function.attributes is not None:
            sizes = [Size.of(expr.args[i].name) for i in function.size_args]
            try:
                attributes = function.attributes([arg.shape for arg in args], sizes)
            except ShapeError as exc:
                raise CellError(str(exc), expr.span, hint=function.doc) from None
        return self.make(function.op, args, expr.span, name, **attributes)

    def make_const(self, value: float, span: Span) -> Node:
        return self.add(Node(self.names.fresh("const"), Op.CONST, (), Shape(), attrs(value=value), span))

    def assign(self, assign: st.Assign) -> None:
        targets = assign.targets
        if len(targets) > 1 or (isinstance(assign.value, st.Call) and assign.value.function == "chunk"):
            source = self.expr(assign.value.args[0])
            for index, target in enumerate(targets):
                self.bind(target, self.make(Op.CHUNK, [source], assign.value.span, self.target_name(target),
                                            parts=len(targets), index=index))
            return
        (target,) = targets
        self.bind(target, self.expr(assign.value, self.target_name(target)))

    def target_name(self, target: st.Target) -> str:
        return joined_name(target.name, "next") if target.primed else target.name

    def bind(self, target: st.Target, node: Node) -> None:
        if not target.primed:
            self.env[target.name] = node
            return
        decl = next(d for d in self.cell.states if d.name == target.name)
        expected = _declared(decl)
        if node.shape != expected:
            if node.shape.mask:
                raise CellError(f"the next value of state `{decl.name}` is a mask (a comparison's result)",
                                target.span, hint="write `where(m, a, b)` to choose values by it")
            if node.shape.dims == expected.dims:
                raise CellError(f"the next value of state `{decl.name}` depends on neither the input nor "
                                "a state, so it would be the same for every example", target.span)
            raise CellError(f"state `{decl.name}` has shape {expected} but its next value has shape "
                            f"{node.shape}", target.span)
        self.next[target.name] = node
        self.carried[target.name] = node
        if len(expected.dims) > 1:
            self.carried[target.name] = self.make(Op.RESHAPE, [node], target.span, joined_name(node.name, "flat"),
                                                  count=len(expected.dims), dims=_carried(decl).dims)

    def run(self) -> Graph:
        cell = self.cell
        inputs = []
        for decl in cell.inputs:
            inputs.append(Decl(decl.name, _carried(decl), span=decl.span))
            self.carried_leaf(decl, Op.SEQUENCE_INPUT if decl.per_sequence else Op.INPUT)
        states = []
        for decl in cell.states:
            states.append(Decl(decl.name, _carried(decl), span=decl.span))
            self.carried_leaf(decl, Op.STATE)
        params = self.tensors(cell.params, Op.PARAM)
        buffers = self.tensors(cell.buffers, Op.BUFFER)
        hypers = []
        for decl in cell.hypers:
            hypers.append(Decl(decl.name, Shape(), decl.default, decl.span))
            self.env[decl.name] = self.leaf(decl.name, Op.HYPER, Shape(), decl.span)
        for assign in cell.body:
            self.assign(assign)
        outputs = []
        for output in cell.outputs:
            is_state = any(d.name == output.name for d in cell.states)
            # A tensor state is output as it is carried, flat: `-> h` of `state h[hidden, height, width]`.
            node = self.carried[output.name] if is_state else self.env[output.name]
            if node.shape.mask:
                raise CellError(f"output `{output.name}` is a mask (a comparison's result), which only `where` "
                                "reads", output.span, hint="write `where(m, a, b)` to choose values by it")
            if not (node.shape.batched and node.shape.is_vector):
                raise CellError(f"output `{output.name}` must be a per-example vector, got shape {node.shape}",
                                output.span)
            outputs.append(node.name)
        sizes = tuple(Decl(name) for name in BUILTIN_SIZES + input_sizes(cell)) + \
            tuple(Decl(d.name, default=d.default, span=d.span) for d in cell.sizes)
        graph = Graph(name=cell.name, input=inputs[0], extra_inputs=tuple(inputs[1:]),
                      per_sequence=tuple(d.name for d in cell.inputs if d.per_sequence), states=tuple(states),
                      params=params,
                      sizes=sizes, hypers=tuple(hypers), nodes=tuple(self.nodes),
                      next_states=tuple(self.carried[d.name].name for d in cell.states),
                      outputs=tuple(outputs), buffers=buffers)
        return verify(graph)

    def carried_leaf(self, decl, op: Op) -> None:
        """The leaf of an input or a state, carried flat; a tensor's equations read it through a view."""
        self.env[decl.name] = self.leaf(decl.name, op, _carried(decl), decl.span)
        if len(decl.shape) > 1:
            self.env[decl.name] = self.make(Op.RESHAPE, [self.env[decl.name]], decl.span,
                                            joined_name(decl.name, "view"), count=1, dims=_declared(decl).dims)

    def tensors(self, decls, op: Op) -> Tuple[Decl, ...]:
        """Parameters or buffers: their declarations, and their leaves. `param s` and `param s[]`
        are one unit, broadcast against vectors."""
        found = []
        for decl in decls:
            shape = Shape(tuple(size_of(s) for s in decl.shape) or (ONE,), batched=False)
            found.append(Decl(decl.name, shape, decl.init, decl.span))
            self.env[decl.name] = self.leaf(decl.name, op, shape, decl.span)
        return tuple(found)


def lower(cell: st.Cell) -> Graph:
    """The IR graph of a checked cell."""
    return _Lowering(cell).run()
