"""The abstract syntax tree of a ``.cell`` file.

Frozen dataclasses, one per grammar rule, each with the :class:`Span` it came
from. The parser only builds these; checks happen afterwards (rnndsl/check.py).

Grammar, in short (grammars/cell.lark is the truth)::

    file       := cell*
    cell       := "cell" NAME "(" input, ... ")" "->" NAME ("," NAME)* "{" stmt* "}"
    input      := NAME "[" size, ... "]" ("per" "sequence")?
    stmt       := "state" NAME[size, ...], ... | "param" NAME([size, ...])? (= number)?, ...
                | "buffer" NAME[size, ...] (= number)?, ...
                | "size" NAME = size           | "hyper" NAME = number
                | target, ... = expr           (target: NAME or NAME')
    expr       := expr (<|<=|>|>=) expr | expr (+|-|*|/|@) expr | -expr | expr ** expr
                | number | NAME | NAME' | NAME(expr, ...) | (expr)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple, Union

from .errors import Span


# Sizes: integer expressions over size names.

@dataclass(frozen=True, slots=True)
class SizeInt:
    value: int
    span: Span


@dataclass(frozen=True, slots=True)
class SizeName:
    name: str
    span: Span


@dataclass(frozen=True, slots=True)
class SizeBinary:
    op: str  # "+", "-", "*", and "/" in a size's default only
    left: "SizeExpr"
    right: "SizeExpr"
    span: Span


SizeExpr = Union[SizeInt, SizeName, SizeBinary]


# Expressions.

@dataclass(frozen=True, slots=True)
class Number:
    value: float
    span: Span


@dataclass(frozen=True, slots=True)
class Name:
    name: str
    span: Span


@dataclass(frozen=True, slots=True)
class Primed:
    """``h'``: the next value of state ``h``."""

    name: str
    span: Span


@dataclass(frozen=True, slots=True)
class Binary:
    op: str  # "+", "-", "*", "/", "@", "**", "<", "<=", ">", ">="
    left: "Expr"
    right: "Expr"
    span: Span


@dataclass(frozen=True, slots=True)
class Neg:
    operand: "Expr"
    span: Span


@dataclass(frozen=True, slots=True)
class Call:
    function: str
    args: Tuple["Expr", ...]
    span: Span
    name_span: Span


Expr = Union[Number, Name, Primed, Binary, Neg, Call]


# Declarations and statements.

@dataclass(frozen=True, slots=True)
class VarDecl:
    """A state or the input: a name and its shape, one size for a vector, several for a tensor
    (a state ``S[heads, key, value]``, a spatial input ``x[input, height, width]``)."""

    name: str
    shape: Tuple[SizeExpr, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class InputDecl:
    """An input of the cell: read at every step (``x[input]``, a ``(T, batch, n)`` sequence), or
    once for the whole sequence (``enc[context] per sequence``, a ``(batch, n)`` value)."""

    name: str
    shape: Tuple[SizeExpr, ...]
    per_sequence: bool
    span: Span


@dataclass(frozen=True, slots=True)
class ParamDecl:
    name: str
    shape: Tuple[SizeExpr, ...]  # (rows,) a vector, (rows, cols) a matrix, more: per-head blocks
    init: Union[float, None]     # a constant initial value, or None for the default
    span: Span


@dataclass(frozen=True, slots=True)
class BufferDecl:
    """A constant tensor, not trained: ``buffer ones[hidden] = 1.0``."""

    name: str
    shape: Tuple[SizeExpr, ...]
    init: float  # the value filling it
    span: Span


@dataclass(frozen=True, slots=True)
class SizeDecl:
    name: str
    default: Union[int, None]  # None: computed from ``formula`` at build
    span: Span
    formula: Union[SizeExpr, None] = None  # ``size key = hidden / heads``


@dataclass(frozen=True, slots=True)
class HyperDecl:
    name: str
    default: float
    span: Span


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    primed: bool
    span: Span


@dataclass(frozen=True, slots=True)
class Assign:
    targets: Tuple[Target, ...]
    value: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class Output:
    name: str
    span: Span


@dataclass(frozen=True, slots=True)
class Cell:
    name: str
    inputs: Tuple[InputDecl, ...]  # the first is read at every step: what a layer below feeds
    outputs: Tuple[Output, ...]
    states: Tuple[VarDecl, ...]
    params: Tuple[ParamDecl, ...]
    sizes: Tuple[SizeDecl, ...]
    hypers: Tuple[HyperDecl, ...]
    body: Tuple[Assign, ...]
    span: Span
    name_span: Span
    buffers: Tuple[BufferDecl, ...] = ()

    @property
    def input(self) -> InputDecl:
        """The first input, read at every step (``x``)."""
        return self.inputs[0]


@dataclass(frozen=True, slots=True)
class File:
    path: str
    source: str
    cells: Tuple[Cell, ...]


def pretty(node: object, indent: int = 0) -> str:
    """A readable dump of an AST, spans left out (``rnndsl show --stage ast``)."""
    pad = "  " * indent
    if isinstance(node, tuple):
        if not node:
            return pad + "()"
        return "\n".join(pretty(item, indent) for item in node)
    fields = [f for f in getattr(node, "__dataclass_fields__", {}) if "span" not in f and f != "source"]
    if not fields:
        return pad + repr(node)
    simple, nested = [], []
    for field in fields:
        value = getattr(node, field)
        if hasattr(value, "__dataclass_fields__") or (isinstance(value, tuple) and value
                                                      and hasattr(value[0], "__dataclass_fields__")):
            nested.append((field, value))
        else:
            simple.append(f"{field}={value!r}")
    lines = [f"{pad}{type(node).__name__}({', '.join(simple)})"]
    for field, value in nested:
        lines.append(f"{pad}  {field}:")
        lines.append(pretty(value, indent + 2))
    return "\n".join(lines)
