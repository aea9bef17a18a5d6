"""The parallel scan: cells whose recurrence is linear in the state run without a time loop.

When every state's update has the form ``s' = a * s + b`` with ``a`` and ``b``
independent of every state (minGRU, minLSTM, QRNN, ...), ``a`` and ``b`` are
computed for all steps at once, like hoisted input projections, and
:func:`rnndsl.linear_scan.linear_recurrence` runs the whole sequence in
O(log T) depth, forward and backward. Outputs that depend on the states only
through their next values (QRNN's ``o * c'``) are then computed for all steps
at once too.

Linearity is read from meaning, not spelling: :func:`linearized` expands each next
state in its state and collects the terms (``a' = a + x`` is ``1 * a + x``,
``h' = x * h + h`` is ``(x + 1) * h + 0``, ``a' = a * (x + 1) - k`` is
``(x + 1) * a + (-k)``), writing the coefficient and the offset as new nodes.

``find_linear_recurrences`` decides; ``generate_parallel`` writes the
``forward_parallel`` method (plain Python: autograd Functions cannot be called
from TorchScript). When every state is a vector updated ``a * s + b``, the method
has a second branch: each state's coefficients and scan as one generated C++ kernel
(rnndsl/codegen/fused.py), taken under ``rnndsl.linear_scan.use_cpu_kernel()``. Its
dialect of the emitters sends matrix products to ``linear_with_grad``
(rnndsl/kernels.py), the bias added in the same GEMM.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Dict, List, Optional, Set, Tuple, Union

from ..dependency import Dependence, dependencies
from ..ir import Graph, Node, Op, OpKind, Shape, Size, attrs, tiling_order
from ..names import PARALLEL_GLOBALS, Namespace
from ..ops import SHAPE_RULES, operand_orders
from .chunkwise import MatrixUpdate, NotLinear, ViewUpdate, decay_operands, log_code, state_view, tensor_update
from .fused import FusedKernelCode, fused_kernel
from .base import (EMITTERS, NodeEmitter, PythonCode, biased_products, body_nodes, gemm, one_or_tuple,
                   reshape_code, size_code, tuple_code, validate_source)
from .precision import carried_dtype_casts

# Products go through oneDNN's GEMM where it is faster, under autograd (this code runs as Python).
PARALLEL_EMITTERS = {**EMITTERS, Op.MATMUL: gemm("linear_with_grad")}


@dataclass(frozen=True)
class LinearUpdate:
    """``state' = a * state + b``, with ``a`` and ``b`` node names free of every state."""

    state: str
    next: str
    a: str
    b: str


Update = Union[LinearUpdate, MatrixUpdate, ViewUpdate]


def _update_of(state: str, node: Node, nodes: Dict[str, Node], free: Dict[str, bool]) -> Tuple[str, str]:
    """``(a, b)`` if ``node`` is ``a * state + b`` (in any order), else NotLinear."""
    if node.op is Op.ADD:
        for scaled, offset in operand_orders(node):
            term = nodes[scaled]
            if free[offset] and term.op is Op.MUL:
                for coefficient, factor in operand_orders(term):
                    if factor == state and coefficient != state and free[coefficient]:
                        return coefficient, offset
    raise NotLinear(f"the next value of `{state}` is not of the form a * {state} + b "
                    "with a and b independent of every state", node)


_ONE = "1"  # the coefficient 1, made a node only where an op needs it (never a node name)


@dataclass(frozen=True)
class _Affine:
    """A value as ``a * state + b``, with ``a`` and ``b`` names of state-free nodes; None is zero,
    ``_ONE`` one."""

    a: Optional[str]
    b: Optional[str]


class _Collector:
    """Expands values in one state and collects its terms, making the nodes of the coefficients."""

    def __init__(self, graph: Graph, state: str, span, names: Namespace):
        self.nodes, self.state, self.span, self.names = graph.node_map(), state, span, names
        self.free = {name: d is not Dependence.STATE for name, d in dependencies(graph).items()}
        self.made: List[Node] = []
        self.forms: Dict[str, Optional[_Affine]] = {}

    def make(self, op: Op, inputs: Tuple[str, ...], **attributes) -> str:
        probe = Node("_", op, inputs, Shape(), attrs(**attributes), self.span)
        shape = SHAPE_RULES[op](probe, [self.nodes[name].shape for name in inputs]) if inputs else Shape()
        node = Node(self.names.fresh(op.label), op, inputs, shape, probe.attrs, self.span)
        self.nodes[node.name] = node
        self.made.append(node)
        return node.name

    def node(self, value: str) -> str:
        """``value`` as a node's name: the coefficient 1 becomes a constant."""
        return self.make(Op.CONST, (), value=1.0) if value == _ONE else value

    def plus(self, x: Optional[str], y: Optional[str], op: Op = Op.ADD) -> Optional[str]:
        if y is None:
            return x
        if x is None:
            return y if op is Op.ADD else self.make(Op.NEG, (self.node(y),))
        return self.make(op, (self.node(x), self.node(y)))

    def times(self, x: Optional[str], factor: str, op: Op = Op.MUL) -> Optional[str]:
        if x is None:
            return None
        if x == _ONE and op is Op.MUL:
            return factor
        return self.make(op, (self.node(x), factor))

    def form(self, name: str) -> Optional[_Affine]:
        """``name`` as ``a * state + b``, or None when it is not linear in the state."""
        if name not in self.forms:
            self.forms[name] = self._form(self.nodes[name])
        return self.forms[name]

    def _form(self, node: Node) -> Optional[_Affine]:
        if self.free[node.name]:
            return _Affine(None, node.name)
        if node.op is Op.STATE:
            return _Affine(_ONE, None) if node.name == self.state else None
        parts = [self.form(name) for name in node.inputs]
        if any(part is None for part in parts) or node.op not in (Op.NEG, Op.ADD, Op.SUB, Op.MUL, Op.DIV):
            return None
        if node.op is Op.NEG:
            (x,) = parts
            return _Affine(self.plus(None, x.a, Op.SUB), self.plus(None, x.b, Op.SUB))
        x, y = parts
        if node.op in (Op.ADD, Op.SUB):
            return _Affine(self.plus(x.a, y.a, node.op), self.plus(x.b, y.b, node.op))
        if node.op is Op.DIV:
            if y.a is not None:
                return None
            return _Affine(self.times(x.a, y.b, Op.DIV), self.times(x.b, y.b, Op.DIV))
        if x.a is not None and y.a is not None:  # state times state
            return None
        scaled, factor = (y, x.b) if x.a is None else (x, y.b)
        if factor is None:
            return _Affine(None, None)
        return _Affine(self.times(scaled.a, factor), self.times(scaled.b, factor))


def linearized(graph: Graph) -> Graph:
    """``graph`` with each next state that is linear in its state, but not written ``a * s + b``,
    rewritten as ``a * s + b`` (the coefficient and offset as new nodes, the next state keeping
    its name); other next states unchanged.

    Before: ``h_next = add(mul(x, h), h)``
    After:  ``const = 1.0; add_1 = add(x, const); mul_1 = mul(add_1, h); const_1 = 0.0;
    h_next = add(mul_1, const_1)``
    """
    nodes = graph.node_map()
    free = {name: dependence is not Dependence.STATE for name, dependence in dependencies(graph).items()}
    names = Namespace({n.name for n in graph.nodes})
    rewritten: Dict[str, List[Node]] = {}
    for decl, next_name in zip(graph.states, graph.next_states):
        node = nodes[next_name]
        if node.op.kind is OpKind.LEAF:  # `h' = h`: nothing to rewrite in place
            continue
        try:
            _update_of(decl.name, node, nodes, free)
            continue  # already in the form: left as written
        except NotLinear:
            pass
        collector = _Collector(graph, decl.name, node.span, names)
        form = collector.form(next_name)
        if form is None or form.a is None:
            continue
        scaled = collector.make(Op.MUL, (collector.node(form.a), decl.name))
        offset = form.b if form.b is not None else collector.make(Op.CONST, (), value=0.0)
        total = Node(next_name, Op.ADD, (scaled, offset), node.shape, (), node.span)
        rewritten[next_name] = collector.made + [total]
    if not rewritten:
        return graph
    out: List[Node] = []
    for node in graph.nodes:
        out.extend(rewritten.get(node.name, [node]))
    return graph.with_nodes(out, "linearized")


def find_linear_recurrences(graph: Graph, fixed_dropout_mask: bool = False) -> List[LinearUpdate]:
    """The linear update of every state, or NotLinear naming the first equation that is not.

    Random ops on the way from the new states to the outputs are fine (a draw for every step,
    made for all steps at once), unless ``fixed_dropout_mask`` asks for one mask per sequence,
    or the value drawn for is parameter-only (the loop draws its mask anew at each step).
    """
    nodes = graph.node_map()
    free = {name: dependence is not Dependence.STATE for name, dependence in dependencies(graph).items()}
    updates: List[Update] = []
    for decl, next_name in zip(graph.states, graph.next_states):
        # A tensor state (rnndsl/codegen/chunkwise.py) is read as its tensor and its next value is one,
        # flattened; a vector state read through split() (slstm's h) has a view too, but is updated as a
        # vector, and is refused (or taken) for what that update is.
        if state_view(graph, decl.name) is not None and nodes[next_name].op is Op.RESHAPE:
            updates.append(tensor_update(graph, decl.name, next_name, free))
        elif next_name == decl.name:
            raise NotLinear(f"`{decl.name}' = {decl.name}` passes the state through unchanged, which the parallel "
                            f"scan does not take: drop the state, or run scan=\"sequential\"", nodes[next_name])
        else:
            a, b = _update_of(decl.name, nodes[next_name], nodes, free)
            updates.append(LinearUpdate(decl.name, next_name, a, b))
    available = {name for name, is_free in free.items() if is_free} | {u.next for u in updates} | \
        {u.read if isinstance(u, MatrixUpdate) else u.tensor for u in updates if not isinstance(u, LinearUpdate)}
    # A matrix state's next value exists only through its read (the chunkwise form makes no state per step).
    unmade = {name: u.state for u in updates if isinstance(u, MatrixUpdate) for name in (u.tensor, u.next)}
    for output in graph.outputs:
        stack = [output]
        while stack:
            name = stack.pop()
            if name in available:
                continue
            node = nodes[name]
            if name in unmade:
                raise NotLinear(f"output `{output}` reads `{unmade[name]}'` other than through `q @ {unmade[name]}'`, "
                                "and the chunkwise form makes no state per step", nodes[output])
            if node.op is Op.STATE:
                raise NotLinear(f"output `{output}` depends on a state other than through its next value",
                                nodes[output])
            if node.op.kind is OpKind.RANDOM:
                if fixed_dropout_mask:
                    raise NotLinear(f"with fixed_dropout_mask, `{name}` draws one mask for the whole sequence, "
                                    "which the parallel scan does not do", node)
                if not nodes[node.inputs[0]].shape.batched:  # one draw here would serve every step
                    raise NotLinear(f"`{name}` draws a fresh mask for a parameter-only value at each step, "
                                    "which the parallel scan does not do", node)
            stack.extend(node.inputs)
    return updates


def generate_parallel(graph: Graph, updates: List[Update]) -> PythonCode:
    """``forward_parallel(self, xs, state, mask=None)``, plain Python."""
    code = _WholeSequenceCode(graph)
    nodes, found, lines = code.nodes, code.dependencies, code.lines
    names = Namespace({n.name for n in graph.nodes} | set(code.local.values()), reserved=frozenset())
    body = body_nodes(graph)
    # Values with a time axis get a _seq name; parameter-only values keep theirs.
    seq = {n.name: names.fresh(n.name, "seq") for n in body if found[n.name] is not Dependence.PARAMETERS}
    seq[graph.input.name] = "xs"
    done = {u.next for u in updates} | {u.read if isinstance(u, MatrixUpdate) else u.tensor
                                        for u in updates if not isinstance(u, LinearUpdate)}
    # Only the values the scans and the outputs read: not outer(k, v) for all steps, which the
    # chunkwise form exists to avoid.
    from_outputs = _needed_for_outputs(graph, nodes, done)
    wanted = code.with_whole_splits(_upstream(nodes, from_outputs | _operands(updates, nodes), done, code.biased))
    kernels = _fused_kernels(graph, updates, code.biased.values())
    # With fused kernels, what only the coefficients need is computed on the other branch alone.
    shared = wanted if not kernels else code.with_whole_splits(
        _upstream(nodes, from_outputs | {leaf for kernel in kernels for leaf in kernel.leaves}, done, code.biased))
    states = [code.var(d.name) for d in graph.states]
    lines.append("def forward_parallel(self, xs, state, mask=None):")
    lines.extend(f"    {name} = state[{i}]" for i, name in enumerate(states))
    lines.append("    # Every value free of the states, for all steps at once.")
    for node in body:
        if found[node.name] is not Dependence.STATE and node.name in shared:
            code.emit_whole(node, seq if found[node.name] is Dependence.INPUT else {})
    lines.append("    if mask is not None:")
    lines.append("        real = mask.unsqueeze(2)")
    indent = _emit_fused_branch(code, kernels, updates, states, seq, wanted - shared) if kernels else "    "
    finals = []
    for update, var in zip(updates, states):
        if isinstance(update, MatrixUpdate):
            finals.append(_emit_chunkwise(update, var, code, seq, names))
            continue
        full_a, full_b = names.fresh(update.state, "a"), names.fresh(update.state, "b")
        like = var
        if isinstance(update, ViewUpdate):  # a and b broadcast to the state's tensor, then flattened
            like = names.fresh(update.state, "start")
            lines.append(f"{indent}{like} = {reshape_code(var, 1, nodes[update.view].shape.dims)}")
        a = "1.0" if isinstance(update, ViewUpdate) and update.a is None else code.ref(update.a, seq)
        # Coefficients shared by all steps (a parameter, a number) are broadcast over them.
        lines.append(f"{indent}{full_a} = along_steps({a}, xs.size(0), {like})")
        lines.append(f"{indent}{full_b} = along_steps({code.ref(update.b, seq)}, xs.size(0), {like})")
        if isinstance(update, ViewUpdate):
            lines.append(f"{indent}{full_a}, {full_b} = {full_a}.flatten(2), {full_b}.flatten(2)")
        lines.append(f"{indent}if mask is not None:  # padded steps keep the state: a = 1, b = 0")
        lines.append(f"{indent}    {full_a} = torch.where(real, {full_a}, 1.0)")
        lines.append(f"{indent}    {full_b} = torch.where(real, {full_b}, 0.0)")
        lines.append(f"{indent}{seq[update.next]} = linear_recurrence({full_a}, {full_b}, {var})")
        if isinstance(update, ViewUpdate):
            dims = nodes[update.tensor].shape.dims
            lines.append(f"{indent}{seq[update.tensor]} = {reshape_code(seq[update.next], 1, dims)}")
        finals.append(f"{seq[update.next]}[-1]")
    lines.append("    # What the outputs need from the new states, for all steps at once.")
    needed = code.with_whole_splits(from_outputs)
    for node in body:
        if found[node.name] is Dependence.STATE and node.name not in done and node.name in needed:
            code.emit_whole(node, seq)
    # The scan keeps the states in their own dtype (along_steps casts a and b to it); an output that
    # autocast may compute in low precision is cast to the input's dtype, as the loop's is.
    casts = carried_dtype_casts(graph, states, "xs.dtype", lowered=code.biased.values())
    outputs = [code.ref(name, seq) + (f".to({casts[name]})" if name in casts else "") for name in graph.outputs]
    zeroed = [f"{o} * real.to(xs.dtype)" for o in outputs]
    lines.append("    if mask is not None:")
    lines.append(f"        return {one_or_tuple(zeroed)}, {tuple_code(finals)}")
    lines.append(f"    return {one_or_tuple(outputs)}, {tuple_code(finals)}")
    return PythonCode(validate_source("\n".join(lines) + "\n"), PARALLEL_GLOBALS,
                      tuple(kernel.source for kernel in kernels))


def _emit_fused_branch(code: "_WholeSequenceCode", kernels: List[FusedKernelCode], updates: List[Update],
                       states: List[str], seq: Dict[str, str], coefficients_only: Set[str]) -> str:
    """``if fused_scan_runs(...)``: the fused kernels' calls; ``else:``, then the values only the
    coefficients need. Returns the indent of the else branch, where the scans follow."""
    code.lines.append("    if fused_scan_runs(self.fused_kernels, xs, mask):  # the C++: rnndsl show --stage fused")
    for index, (kernel, update, var) in enumerate(zip(kernels, updates, states)):
        leaves = ", ".join(code.ref(name, seq) for name in kernel.leaves)
        # The values this code split whose pieces are leaves: the kernel takes those pieces as
        # column ranges of the value, and writes their gradients into one buffer.
        split = [value for value, pieces in code.splits.items() if any(p in kernel.leaves for p, _ in pieces)]
        roots = f", split_from=[{', '.join(code.ref(value, seq) for value in split)}]" if split else ""
        code.lines.append(f"        {seq[update.next]} = fused_linear_recurrence("
                          f"self.fused_kernels[{index}], [{leaves}], {var}, xs.size(0){roots})")
    code.lines.append("    else:")
    for node in body_nodes(code.graph):
        if code.dependencies[node.name] is not Dependence.STATE and node.name in coefficients_only:
            code.emit_whole(node, seq if code.dependencies[node.name] is Dependence.INPUT else {}, "        ")
    return "        "


def _fused_kernels(graph: Graph, updates: List[Update], leaves_only: Collection[str]) -> List[FusedKernelCode]:
    """A fused kernel per update (rnndsl/codegen/fused.py) when every update is ``a * s + b`` of a
    vector state, else none: the generated code takes all of them or none."""
    if not all(type(update) is LinearUpdate for update in updates):
        return []
    return [fused_kernel(graph, u.state, u.a, u.b, leaves_only, f"cell {graph.name}") for u in updates]


def _emit_chunkwise(update: MatrixUpdate, var: str, code: "_WholeSequenceCode", seq: Dict[str, str],
                    names: Namespace) -> str:
    """The call of the chunkwise form (rnndsl/chunkwise.py) for ``update``; the final state's code."""
    view = code.nodes[update.tensor].shape.dims
    start, final = names.fresh(update.state, "start"), names.fresh(update.state, "final")
    ref = lambda name: code.ref(name, seq)  # noqa: E731
    log_decay = "None" if update.decay is None else log_code(code.nodes[update.decay], code.nodes, ref)
    if update.decay is not None and code.nodes[update.decay].shape.is_scalar:  # a number: as a tensor
        log_decay = f"xs.new_full([1], {log_decay})"
    code.lines.append(f"    {start} = {reshape_code(var, 1, view)}")
    code.lines.append(f"    # {update.state}' = decay * {update.state} + outer({update.key}, {update.value}), "
                      f"read by {update.query} @ {update.state}': chunk by chunk")
    code.lines.append(f"    {seq[update.read]}, {final} = chunkwise_attention({ref(update.query)}, {ref(update.key)}, "
                      f"{ref(update.value)}, {log_decay}, {start}, xs.size(0), mask, "
                      f"per_key={update.per_key})")
    return f"{final}.flatten(1)"


def _operands(updates: List[Update], nodes: Dict[str, Node]) -> Set[str]:
    """The values the scans read."""
    found = set()
    for update in updates:
        if isinstance(update, MatrixUpdate):
            found |= {update.key, update.value, update.query}
            if update.decay is not None:
                found |= set(decay_operands(nodes[update.decay], nodes))
        else:
            found |= {name for name in (update.a, update.b) if name is not None}
    return found


def _upstream(nodes: Dict[str, Node], roots: Set[str], made: Set[str], biased: Dict[str, str]) -> Set[str]:
    """``roots`` and every value they are computed from, short of the values the scans make; a
    product's bias-adding sum with it (one line makes both)."""
    found, stack = set(), list(roots)
    while stack:
        name = stack.pop()
        if name in found or name not in nodes:
            continue
        found.add(name)
        if name not in made:
            stack.extend(nodes[name].inputs)
        if name in biased:
            stack.append(biased[name])
    return found


class _WholeSequenceCode(NodeEmitter):
    """Emits nodes as code over whole sequences, run under autograd as plain Python.

    So it can use what TorchScript's derivatives get wrong or lack: one ``split`` for
    slices that tile a value (``narrow``'s backward zero-fills a whole gradient per
    slice), and oneDNN's GEMM, its bias added in the same call, through ``linear_with_grad``.
    """

    def __init__(self, graph: Graph):
        super().__init__(graph, PARALLEL_EMITTERS)
        self.dependencies = dependencies(graph)
        once = {n.name for n in graph.nodes if self.dependencies[n.name] is Dependence.PARAMETERS}
        body = body_nodes(graph)
        per_input = [n for n in body if self.dependencies[n.name] is Dependence.INPUT]
        self.biased = biased_products(graph, per_input, once)  # product -> the sum adding its bias
        self.splits = tiling_slices(graph)  # value -> its pieces
        self.pieces = {piece for pieces in self.splits.values() for piece, _ in pieces}
        # The split goes where the first of its pieces comes in the code, before any piece is read.
        order = {n.name: index for index, n in enumerate(body)}
        self.split_at = {min((piece for piece, _ in pieces), key=order.__getitem__): value
                         for value, pieces in self.splits.items()}

    def with_whole_splits(self, wanted: Set[str]) -> Set[str]:
        """``wanted`` plus every piece of a split one of whose pieces is wanted (one line makes all)."""
        extra = {piece for pieces in self.splits.values() if any(p in wanted for p, _ in pieces)
                 for piece, _ in pieces}
        return wanted | extra

    def emit_whole(self, node: Node, rename: Dict[str, str], indent: str = "    ") -> None:
        """``node``'s line over whole sequences, unless another line makes it: a product with the sum
        that adds its bias, a piece with its split."""
        if node.name in self.split_at:
            value = self.split_at[node.name]
            pieces = self.splits[value]
            targets = ", ".join(rename.get(piece, piece) for piece, _ in pieces)
            sizes = ", ".join(size_code(length) for _, length in pieces)
            self.lines.append(f"{indent}{targets} = {self.ref(value, rename)}.split([{sizes}], -1)")
        elif node.name not in self.biased and node.name not in self.pieces:
            self.emit(node, indent, rename)


def tiling_slices(graph: Graph) -> Dict[str, List[Tuple[str, Size]]]:
    """Values whose slices (and chunks) tile them exactly, each with its pieces ``(name, length)``
    in order: code can cut such a value with one ``split``."""
    nodes, users = graph.node_map(), graph.users()
    found = {}
    for name, user_names in users.items():
        pieces = []
        for user in user_names:
            node = nodes[user]
            if node.op is Op.SLICE and node.inputs[0] == name:
                pieces.append((node.attr("start"), node.attr("length"), user))
            elif node.op is Op.CHUNK:
                length = node.shape.dims[0]
                pieces.append((length * node.attr("index"), length, user))
        if len(pieces) < 2 or not nodes[name].shape.dims:
            continue
        order = tiling_order([(start, length) for start, length, _ in pieces], nodes[name].shape.dims[-1])
        if order is not None:
            found[name] = [(pieces[i][2], pieces[i][1]) for i in order]
    return found


def _needed_for_outputs(graph: Graph, nodes: Dict[str, Node], new_states: set) -> set:
    """The nodes on the way to an output, from the new states (which the scan computes)."""
    wanted, stack = set(), list(graph.outputs)
    while stack:
        current = stack.pop()
        if current not in wanted:
            wanted.add(current)
            if current not in new_states:
                stack.extend(nodes[current].inputs)
    return wanted
