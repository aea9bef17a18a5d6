"""Graphviz text of a cell's IR, like nngraph's graph pictures (``rnndsl show FILE --stage dot``)."""
from __future__ import annotations

from .ir import Graph, Op, Phase

_LEAF_STYLE = {Op.INPUT: "shape=box, style=filled, fillcolor=lightblue",
               Op.SEQUENCE_INPUT: "shape=box, style=filled, fillcolor=lightcyan",
               Op.STATE: "shape=box, style=filled, fillcolor=khaki",
               Op.PARAM: "shape=note, style=filled, fillcolor=grey90",
               Op.HYPER: "shape=note", Op.CONST: "shape=plaintext"}
_PHASE_COLOR = {Phase.ONCE: "grey60", Phase.PER_SEQUENCE: "cadetblue", Phase.PER_INPUT: "steelblue",
                Phase.PER_STEP: "black"}


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(graph: Graph) -> str:
    lines = [f"digraph {_quote(graph.name)} {{", "  rankdir=TB;", '  node [fontname="Helvetica"];']
    for node in graph.nodes:
        if node.op in _LEAF_STYLE:
            label = repr(node.attr("value")) if node.op is Op.CONST else node.name
            style = _LEAF_STYLE[node.op]
        else:
            label = f"{node.name}\\n{node.op.label} {node.shape}"
            style = f"shape=ellipse, color={_PHASE_COLOR[node.phase]}"
        lines.append(f"  {_quote(node.name)} [label={_quote(label)}, {style}];")
        for index, source in enumerate(node.inputs):
            lines.append(f"  {_quote(source)} -> {_quote(node.name)} [label={_quote(str(index))}];")
    for decl, name in zip(graph.states, graph.next_states):
        lines.append(f"  {_quote(decl.name + chr(39))} [shape=box, style=filled, fillcolor=khaki];")
        lines.append(f"  {_quote(name)} -> {_quote(decl.name + chr(39))};")
    for index, name in enumerate(graph.outputs):
        label = f"output {index}" if len(graph.outputs) > 1 else "output"
        lines.append(f"  {_quote(label)} [shape=box, style=filled, fillcolor=palegreen];")
        lines.append(f"  {_quote(name)} -> {_quote(label)};")
    lines.append("}")
    return "\n".join(lines) + "\n"
