"""The scan target: IR graph -> ``forward_sequence_scan``, the time loop as one ``scan`` node.

``torch.export`` unrolls a Python loop over time at the traced length, so an exported
``forward_sequence`` would run at that length only. Written with torch's ``scan``
higher-order op instead, the loop is one node of the exported program, valid for any
sequence length (a dynamic ``T``), which ``torch.nn.LSTM`` itself cannot export.

The method computes what ``forward_sequence`` (rnndsl/codegen/step.py) computes, in the
same order: parameter-only values once, input-only values for all steps at once, then
``time_scan(one_step, state, per_step, invariants)`` where ``one_step(carry, step_inputs,
invariants)`` takes the carried state, this step's slices (the hoisted values and the mask)
and the tensors every step reads alike (the parameters, buffers and parameter-only values
the step uses; a number computed once, a Python float, it reads from the enclosing method),
and returns the next state and the outputs. Both are fresh tensors, as scan requires: the
state is always ``torch.where(keep, new, old)`` and the outputs ``torch.where(keep, output, 0)``,
with a mask that is all True when the caller gives none.

The step reads no tensor from outside itself: everything comes in through its arguments.
torch's ``scan`` op then traces it as it is, without dynamo (which ``torch.scan`` runs to
find what a step closes over), and export fixes no size a closed-over tensor would carry.
"""
from __future__ import annotations

from ..ir import Graph, Op, Phase
from ..names import SCAN_GLOBALS, Namespace
from .base import NodeEmitter, PythonCode, body_nodes, one_or_tuple, tuple_code, tuple_type, validate_source
from .precision import carried_dtype_casts


def generate_scan(graph: Graph) -> PythonCode:
    """``forward_sequence_scan(self, xs, state, mask=None) -> (outputs, final state)``."""
    emitter = NodeEmitter(graph)
    lines = emitter.lines
    # Lowering and the emitter kept user names clear of RESERVED, so this code may use those names itself.
    names = Namespace({n.name for n in graph.nodes} | set(emitter.local.values()), reserved=frozenset())
    states = [emitter.var(d.name) for d in graph.states]
    # Outputs take the first state's dtype, the input's: the step reads nothing batched from outside.
    emitter.casts = carried_dtype_casts(graph, states, f"{states[0]}.dtype")
    body = body_nodes(graph)
    hoisted = [n for n in body if n.phase is Phase.PER_INPUT]
    seq_name = {graph.input.name: "xs", **{n.name: names.fresh(n.name, "seq") for n in hoisted}}
    step = [n for n in body if n.phase is Phase.PER_STEP]
    needed = {name for n in step for name in n.inputs} | set(graph.results())
    reads = [name for name in seq_name if name in needed]
    by_name = graph.node_map()
    # The tensors every step reads alike: parameters, buffers, and values computed once from them.
    # A number computed once (`-cell_clip`) is a Python float, not a tensor: the step reads it
    # from the enclosing method, as it reads hyper-parameters from `self`.
    invariants = [n.name for n in graph.nodes if n.name in needed
                  and (n.op in (Op.PARAM, Op.BUFFER)
                       or (n in body and n.phase is Phase.ONCE and not n.shape.is_scalar))]
    one_step, carry, step_inputs, step_invariants, keep_seq, final, outputs = (
        names.fresh(base) for base in ("one_step", "carry", "step_inputs", "invariants", "keep_seq", "final",
                                       "outputs"))
    output_type = "Tensor" if len(graph.outputs) == 1 else tuple_type(len(graph.outputs))

    lines.append(f"def forward_sequence_scan(self, xs: Tensor, state: {tuple_type(len(states))}, "
                 f"mask: Optional[Tensor] = None) -> Tuple[{output_type}, {tuple_type(len(states))}]:")
    lines.extend(f"    {name} = state[{i}]" for i, name in enumerate(states))
    for comment, nodes, rename in (("Once per sequence: these depend only on parameters.",
                                    [n for n in body if n.phase is Phase.ONCE], {}),
                                   ("For all steps at once: these depend on the input but on no state.",
                                    hoisted, seq_name)):
        if nodes:
            lines.append(f"    # {comment}")
            for node in nodes:
                emitter.emit(node, "    ", rename)
    lines.append(f"    {keep_seq} = mask if mask is not None else xs.new_ones([xs.size(0), xs.size(1)]).bool()")
    lines.append("")
    lines.append("    # One step: the carried state and this step's slices in; the next state and outputs out.")
    lines.append(f"    def {one_step}({carry}: List[Tensor], {step_inputs}: List[Tensor], "
                 f"{step_invariants}: List[Tensor]):")
    lines.extend(f"        {name} = {carry}[{i}]" for i, name in enumerate(states))
    lines.extend(f"        {emitter.var(name)} = {step_inputs}[{i}]" for i, name in enumerate(reads))
    lines.append(f"        keep = {step_inputs}[{len(reads)}].unsqueeze(1)")
    # Inside the step, the parameters and buffers it reads are locals bound from its arguments, not
    # `self.weight`: a tensor the step closes over reaches the scan op real, not fake.
    emitter.bind_parameters(names, [name for name in invariants if by_name[name].op in (Op.PARAM, Op.BUFFER)])
    lines.extend(f"        {emitter.parameter_locals.get(name, name)} = {step_invariants}[{i}]"
                 for i, name in enumerate(invariants))
    for node in step:
        emitter.emit(node, "        ", {})
    kept = [f"torch.where(keep, {emitter.ref(new, {})}, {old})" for new, old in zip(graph.next_states, states)]
    # The step reads no batched value from outside itself (not even xs.dtype): export would fix the
    # batch size of a tensor the step closes over.
    # where, not a product with the mask: a padded step's output may be nan (from nan padding).
    masked = [f"torch.where(keep, {ref}, 0.0)" for ref in (emitter.ref(name, {}) for name in graph.outputs)]
    lines.append(f"        return [{', '.join(kept)}], [{', '.join(masked)}]")
    lines.append("")
    # Contiguous slices (a chunk of a sum is not): export would otherwise fix the batch size when the
    # next layer's step is traced against the guards of this one's strides.
    per_step = [f"{seq_name[name]}.contiguous()" for name in reads] + [keep_seq]
    emitter.parameter_locals = {}
    shared = [emitter.ref(name, {}) for name in invariants]
    lines.append(f"    {final}, {outputs} = time_scan({one_step}, [{', '.join(states)}], [{', '.join(per_step)}], "
                 f"[{', '.join(shared)}])")
    result = one_or_tuple([f"{outputs}[{i}]" for i in range(len(graph.outputs))])
    lines.append(f"    return {result}, {tuple_code([f'{final}[{i}]' for i in range(len(states))])}")
    return PythonCode(validate_source("\n".join(lines) + "\n"), SCAN_GLOBALS)
