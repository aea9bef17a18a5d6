"""Hypothesis strategies for the cell language.

- :func:`token_soup`: text made of the language's tokens and of junk (Python,
  Unicode look-alikes, control characters, malformed numbers).
- :func:`well_formed_cells`: random cells that the compiler must accept, drawn
  from the grammar: sizes, hyper-parameters, states, parameters and equations
  built from every op of the language, with shapes that fit. Names come from
  a pool full of words the generated code itself uses (``torch``, ``self``,
  ``t``, ``xs``, ``mask``, ``range``, ...), so every draw also tests renaming.
- :func:`linear_cells`: random cells linear in their states, for the parallel scan.
- :func:`mutated_cells`: a well-formed cell with a few of its tokens deleted,
  repeated, swapped or replaced: text that gets past the parser more often.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from hypothesis import strategies as st

from rnndsl.check import BUILD_ARGUMENTS, MODULE_ATTRIBUTES
from rnndsl.ops import FUNCTIONS

KEYWORDS = ["cell", "state", "param", "size", "hyper"]
PUNCTUATION = ["(", ")", "[", "]", "{", "}", ",", "=", "->", "+", "-", "*", "/", "@", "'"]
LANGUAGE_TOKENS = KEYWORDS + PUNCTUATION + sorted(FUNCTIONS) + [
    "x", "h", "c", "h'", "c'", "W", "b", "input", "hidden", "0", "1", "4", "0.5", ".5", "2e-3", "1.",
    "#", "# comment\n", "\n", "cell c(x[input]) -> h {", "state h[hidden]", "param W[hidden, input]",
]
JUNK = [
    ".", ";", ":", '"', "\\", "\x00", "\t", "\r", "\x0c", "\x1b[2J", "\u202e", "\u2028", "\ufeff",
    "é", "π", "𝑥", "ｅｘｅｃ", "__import__", "__class__", "exec", "eval", "lambda", "import", "os",
    "f'", "'''", "1_000", "0x1f", "0b1", "1e999", "1e", "3x", "nan", "inf", "!", "$", "`", "%", "&",
    "|", "~", "^", "?", "<", ">", "**", "//", ":=", "torch", "self", "sum", "print", "{x}",
]

# Names for inputs, states and locals: many shadow what Python or the generated code uses.
LOCAL_NAMES = [
    "h", "c", "m", "n", "a", "g", "z", "gate", "acc", "sum", "len", "torch", "self", "t", "xs",
    "mask", "keep", "real", "outputs", "outputs_1", "range", "Tensor", "List", "Optional", "nan",
    "inf", "const", "matmul", "x_seq", "h_next", "tanh_1", "_unused_0", "print", "exec", "eval",
    "id", "weights", "merged", "slice", "float", "int", "bool", "max", "annotate", "fork", "Dict", "Any",
]
# Parameters, sizes and hyper-parameters become module attributes, which the checker guards.
ATTRIBUTE_NAMES = [name for name in LOCAL_NAMES + ["W", "U", "bias", "gain", "scale", "p", "k", "q"]
                   if name not in MODULE_ATTRIBUTES | BUILD_ARGUMENTS and not name.startswith("_")]

_SEPARATORS = st.sampled_from([" ", " ", "", "\n", "  ", "\t", "\n    "])


def token_soup() -> st.SearchStrategy[str]:
    """Random sequences of language tokens and junk, sometimes inside a valid cell header."""
    token = st.sampled_from(LANGUAGE_TOKENS + JUNK) | st.text(max_size=3)
    body = st.lists(st.tuples(token, _SEPARATORS), max_size=60).map(
        lambda pairs: "".join(text + separator for text, separator in pairs))
    header = "cell c(x[input]) -> h {\n    state h[hidden]\n    param W[hidden, input]\n    h' = "
    return body | body.map(lambda text: header + text + "\n}\n")


@dataclass
class DrawnCell:
    """A random well-formed cell: its source, its name and the sizes it can be built with."""

    source: str
    name: str
    extra_sizes: Dict[str, int] = field(default_factory=dict)


@dataclass
class _Builder:
    """Names, declarations and the values available while drawing one cell."""

    draw: object
    names: List[str]            # for the input, states and locals, in drawn order
    attribute_names: List[str]  # for parameters, sizes and hyper-parameters
    size_exprs: List[str]
    params: List[str] = field(default_factory=list)
    hypers: Dict[str, float] = field(default_factory=dict)
    pool: Dict[str, List[str]] = field(default_factory=dict)  # size -> batched values of that size
    used: set = field(default_factory=set)

    def _take(self, candidates: List[str], fallback: str) -> str:
        while candidates and candidates[-1] in self.used:
            candidates.pop()
        name = candidates.pop() if candidates else f"{fallback}{len(self.used)}"
        self.used.add(name)
        return name

    def fresh(self) -> str:
        return self._take(self.names, "v")

    def fresh_attribute(self) -> str:
        return self._take(self.attribute_names, "w")

    def param(self, shape: str) -> str:
        name = self.fresh_attribute()
        self.params.append(f"{name}[{shape}]")
        return name

    def scalar(self) -> str:
        """A number: a literal, a hyper-parameter, or sometimes a product of two (still a number)."""
        if self.draw(st.integers(0, 3)) == 0:
            return f"({self._number()} * {self._number()})"
        return self._number()

    def _number(self) -> str:
        if self.hypers and self.draw(st.booleans()):
            return self.draw(st.sampled_from(sorted(self.hypers)))
        return self.draw(st.sampled_from(["0.5", "2", "1.5e-1", ".25", "3.", "1e-3", "0"]))

    def probability(self) -> str:
        usable = sorted(name for name, value in self.hypers.items() if 0 <= value <= 1)
        if usable and self.draw(st.booleans()):
            return self.draw(st.sampled_from(usable))
        return self.draw(st.sampled_from(["0.5", "0", ".25", "1e-1"]))

    def vector(self, size: str, depth: int) -> str:
        """An expression for a per-example vector of ``size``."""
        sources = [s for s, values in self.pool.items() if values]
        kinds = ["matmul"] if size not in self.pool or not self.pool[size] else ["leaf", "matmul"]
        if depth > 0:
            kinds += ["matmul", "concat", "unary", "safe", "neg", "binary", "scale", "bias", "divide",
                      "layernorm", "reduce", "dropout", "zoneout"]
        kind = self.draw(st.sampled_from(kinds))
        if kind == "leaf":
            return self.draw(st.sampled_from(self.pool[size]))
        if kind == "matmul":
            source = self.draw(st.sampled_from(sources))
            return f"{self.param(f'{size}, {source}')} @ {_operand(self.vector(source, max(depth - 1, 0)))}"
        if kind == "concat":
            left, right = self.draw(st.sampled_from(sources)), self.draw(st.sampled_from(sources))
            joined = f"concat({self.vector(left, 0)}, {self.vector(right, 0)})"
            return f"{self.param(f'{size}, {left} + {right}')} @ {joined}"
        inner = self.vector(size, depth - 1)
        if kind == "unary":
            # Not hardsigmoid: torch's own derivative of it is 1/6 rounded to float32 in float64 too
            # (0.16666667163), TorchScript's autodiff of a scripted step the exact 1/6, so the two
            # backends' gradients part at 3e-8 (tests/test_functions.py checks it against torch).
            function = self.draw(st.sampled_from(["sigmoid", "tanh", "relu", "abs", "silu", "softplus", "gelu",
                                                  "elu", "selu", "mish", "logsigmoid", "hardtanh", "softsign",
                                                  "sin", "cos", "erf", "softmax"]))
            return f"{function}({inner})"
        if kind == "safe":  # functions whose domain or range needs a guard to stay finite
            return self.draw(st.sampled_from([f"exp(tanh({inner}))", f"log(1 + softplus({inner}))",
                                              f"sqrt(abs({inner}) + 1)", f"log1p(abs({inner}))",
                                              f"expm1(tanh({inner}))"]))
        if kind == "reduce":  # a number per example, spread back over the vector
            function = self.draw(st.sampled_from(["sum", "mean", "logsumexp"]))
            source = self.draw(st.sampled_from(sources))
            return f"({inner} + {function}({self.vector(source, depth - 1)}))"
        if kind == "neg":
            return f"-({inner})"
        if kind == "binary":  # `+` and `-` bind looser than `@`; `*` needs the parentheses
            operator = self.draw(st.sampled_from(["+", "-", "*"]))
            left, right = inner, self.vector(size, depth - 1)
            if operator == "*":
                left, right = _operand(left), _operand(right)
            return f"({left} {operator} {right})"
        if kind == "scale":
            operator = self.draw(st.sampled_from(["+", "-", "*"]))
            scalar, inner = self.scalar(), _operand(inner)
            return f"({scalar} {operator} {inner})" if self.draw(st.booleans()) else f"({inner} {operator} {scalar})"
        if kind == "bias":
            return f"({inner} + {self.param(size)})"
        if kind == "divide":
            inner = _operand(inner)
            return self.draw(st.sampled_from([f"{inner} / 2.5", f"{inner} / (1 + abs({self.vector(size, 0)}))"]))
        if kind == "layernorm":
            return f"layernorm({inner}, {self.param(size)}, {self.param(size)})"
        if kind == "dropout":
            return f"dropout({inner}, {self.probability()})"
        return f"zoneout({inner}, {self.vector(size, depth - 1)}, {self.probability()})"


def _operand(expression: str) -> str:
    """``expression`` as the right side of `@`, which binds as tightly as `*`."""
    return expression if re.fullmatch(r"[\w']+", expression) else f"({expression})"


@st.composite
def well_formed_cells(draw) -> DrawnCell:
    """A random cell the compiler must accept, with every op of the language in reach."""
    names = list(draw(st.permutations(LOCAL_NAMES)))
    attribute_names = list(draw(st.permutations(ATTRIBUTE_NAMES)))
    builder = _Builder(draw, names, attribute_names, ["hidden", "input", "2*hidden"])
    lines: List[str] = []
    extra_sizes: Dict[str, int] = {}
    if draw(st.booleans()):
        size = builder.fresh_attribute()
        extra_sizes[size] = draw(st.integers(1, 3))
        lines.append(f"size {size} = {extra_sizes[size]}")
        builder.size_exprs.append(size)
    for _ in range(draw(st.integers(0, 2))):
        hyper, value = builder.fresh_attribute(), draw(st.sampled_from(["0", "0.25", "-1.5", "2e-1"]))
        builder.hypers[hyper] = float(value)
        lines.append(f"hyper {hyper} = {value}")
    x = builder.fresh()
    builder.pool["input"] = [x]
    states: List[Tuple[str, str]] = []
    for _ in range(draw(st.integers(1, 3))):
        name, size = builder.fresh(), draw(st.sampled_from(builder.size_exprs))
        states.append((name, size))
        builder.pool.setdefault(size, []).append(name)
    lines.append("state " + ", ".join(f"{name}[{size}]" for name, size in states))

    # Equations: locals, chunks and state updates, in a random order; each may use what came before.
    steps = [("update", state) for state in states] + \
        [("local", None)] * draw(st.integers(0, 3)) + [("chunk", None)] * draw(st.integers(0, 1))
    steps = draw(st.permutations(steps))
    equations: List[str] = []
    locals_: List[str] = []
    for kind, state in steps:
        depth = draw(st.integers(0, 2))
        if kind == "update":
            name, size = state
            equations.append(f"{name}' = {builder.vector(size, depth)}")
            builder.pool[size].append(f"{name}'")
        elif kind == "local":
            name, size = builder.fresh(), draw(st.sampled_from(sorted(builder.pool)))
            equations.append(f"{name} = {builder.vector(size, depth)}")
            builder.pool[size].append(name)
            locals_.append(name)
        else:
            size, parts = draw(st.sampled_from(sorted(builder.pool))), draw(st.integers(2, 4))
            source = builder.draw(st.sampled_from([s for s, v in builder.pool.items() if v]))
            targets = [builder.fresh() for _ in range(parts)]
            weight = builder.param(f"{parts}*({size}), {source}")
            equations.append(f"{', '.join(targets)} = chunk({weight} @ {_operand(builder.vector(source, 0))}, {parts})")
            builder.pool[size].extend(targets)
            locals_.extend(targets)
    if builder.params:
        lines.insert(draw(st.integers(0, len(lines))), "param " + ", ".join(builder.params))
    outputs = draw(st.lists(st.sampled_from([name for name, _ in states] + locals_), min_size=1,
                            max_size=2, unique=True))
    separator = draw(st.sampled_from(["\n    ", "\n    # a comment\n    ", "  "]))
    name = draw(st.sampled_from(["c", "drawn", "torch", "self", "forward"]))
    source = (f"cell {name}({x}[input]) -> {', '.join(outputs)} {{\n    "
              + separator.join(lines + equations) + "\n}\n")
    return DrawnCell(source, name, extra_sizes)


@st.composite
def linear_cells(draw) -> DrawnCell:
    """A random cell whose recurrence is linear in its states, which the parallel scan must run.

    Each state's update is ``a * s + b`` (in a drawn order) with ``a`` and ``b`` drawn from the
    input alone, or ``a`` a parameter vector or a number; a chunk of the input's projection may
    feed them (one split); outputs read the new states, not the old.
    """
    builder = _Builder(draw, list(draw(st.permutations(LOCAL_NAMES))),
                       list(draw(st.permutations(ATTRIBUTE_NAMES))), ["hidden", "input", "2*hidden"])
    lines: List[str] = []
    for _ in range(draw(st.integers(0, 1))):
        hyper, value = builder.fresh_attribute(), draw(st.sampled_from(["0.5", "-1.5", "2e-1"]))
        builder.hypers[hyper] = float(value)
        lines.append(f"hyper {hyper} = {value}")
    x = builder.fresh()
    builder.pool["input"] = [x]
    states = [(builder.fresh(), draw(st.sampled_from(["hidden", "2*hidden"]))) for _ in range(draw(st.integers(1, 2)))]
    lines.append("state " + ", ".join(f"{name}[{size}]" for name, size in states))
    equations: List[str] = []
    if draw(st.booleans()):
        parts = draw(st.integers(2, 3))
        targets = [builder.fresh() for _ in range(parts)]
        equations.append(f"{', '.join(targets)} = chunk({builder.param(f'{parts}*hidden, input')} @ {x}, {parts})")
        builder.pool.setdefault("hidden", []).extend(targets)
    updates = []
    for name, size in states:  # every coefficient is drawn before any new state joins the pool
        depth = draw(st.integers(0, 2))
        kind = draw(st.sampled_from(["gate", "vector", "parameter", "number"]))
        a = {"gate": lambda size=size, depth=depth: f"sigmoid({builder.vector(size, depth)})",
             "vector": lambda size=size: builder.vector(size, 0),
             "parameter": lambda size=size: builder.param(size), "number": builder.scalar}[kind]()
        b = builder.vector(size, depth)
        a, b = _operand(a), _operand(b)
        updates.append(draw(st.sampled_from([f"{name}' = {a} * {name} + {b}", f"{name}' = {b} + {name} * {a}"])))
    equations.extend(updates)
    outputs = []
    for name, size in states:
        builder.pool.setdefault(size, []).append(f"{name}'")
    for name, size in states:
        if draw(st.booleans()):
            outputs.append(name)
        else:
            local = builder.fresh()
            equations.append(f"{local} = {builder.vector(size, draw(st.integers(0, 1)))}")
            outputs.append(local)
    if builder.params:
        lines.append("param " + ", ".join(builder.params))
    source = f"cell linear({x}[input]) -> {', '.join(outputs)} {{\n    " + "\n    ".join(lines + equations) + "\n}\n"
    return DrawnCell(source, "linear")


_ROUGH_TOKEN = re.compile(r"#[^\n]*|[A-Za-z0-9_.']+|->|\S")


def _stock_sources() -> List[str]:
    from rnndsl.resources import stock_cells_dir
    return [path.read_text() for path in sorted(stock_cells_dir().glob("*.cell"))]


@st.composite
def mutated_cells(draw, stock: bool = False) -> str:
    """A well-formed cell (a stock cell's file, with ``stock``) with one to three tokens deleted,
    repeated, swapped or replaced."""
    source = draw(st.sampled_from(_stock_sources())) if stock else draw(well_formed_cells()).source
    tokens = _ROUGH_TOKEN.findall(source)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(tokens) - 1))
        change = draw(st.sampled_from(["delete", "repeat", "swap", "replace"]))
        if change == "delete":
            del tokens[at]
        elif change == "repeat":
            tokens.insert(at, tokens[at])
        elif change == "swap":
            other = draw(st.integers(0, len(tokens) - 1))
            tokens[at], tokens[other] = tokens[other], tokens[at]
        else:
            tokens[at] = draw(st.sampled_from(LANGUAGE_TOKENS + JUNK + LOCAL_NAMES))
        if not tokens:
            break
    return " ".join(token + "\n" if token.startswith("#") else token for token in tokens)
