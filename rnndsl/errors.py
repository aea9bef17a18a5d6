"""Source positions and the one error type of the cell language; and PlacementError, a run-time one.

Every problem found in a ``.cell`` file is a :class:`CellError` that prints like
a compiler diagnostic::

    lstm.cell:7:22: error: unknown function `tanhh`
        c' = sigmoid(f) * c + tanhh(g)
                              ^~~~~
    hint: did you mean `tanh`?
"""
from __future__ import annotations

import difflib
import unicodedata
import warnings
from dataclasses import dataclass
from typing import Iterable, List, Optional


class PlacementError(RuntimeError, ValueError):
    """A state, input or parameter of another dtype or device than the input. A RuntimeError, as
    torch raises for one (its ops, torch.nn.LSTM's device check), and a ValueError, as rnndsl
    raises for every input that does not fit."""


@dataclass(frozen=True, slots=True)
class Span:
    """A stretch of source text: 1-based line and column, end exclusive."""

    file: str
    line: int
    column: int
    end_line: int
    end_column: int

    def __str__(self) -> str:
        return f"{one_line(self.file)}:{self.line}:{self.column}"


def printable(text: object) -> str:
    """``text`` with control and format characters shown as `?` (newlines and spaces kept).

    Diagnostics quote source lines, names and file names: raw escape sequences or
    bidirectional overrides from a hostile file must not reach a terminal or a log.
    """
    return "".join(char if char in "\n " or unicodedata.category(char)[0] not in "CZ" else "?"
                   for char in str(text))


def one_line(text: object) -> str:
    """:func:`printable`, with newlines shown as `?` too: a file name or a quoted line holding one
    could otherwise print what looks like another diagnostic."""
    return printable(text).replace("\n", "?")


def source_lines(source: str) -> List[str]:
    """The lines of a ``.cell`` text as spans count them: split on ``\n`` only (a form feed or
    U+2028 in a comment ends no line for Lark, though ``str.splitlines`` would split there),
    without the ``\r`` of Windows line ends."""
    return [line.removesuffix("\r") for line in source.split("\n")]


def quoted_line(source: str, span: Span) -> str:
    """The source line ``span`` starts on, stripped and printable on one line; "" if out of range."""
    lines = source_lines(source)
    return one_line(lines[span.line - 1].strip()) if 0 < span.line <= len(lines) else ""


def quoted_text(source: str, span: Span) -> Optional[str]:
    """The source text ``span`` covers, printable, on one line (an expression written over several
    is joined, its line breaks and indents as single spaces); None if out of range."""
    lines = source_lines(source)
    if not 0 < span.line <= span.end_line <= len(lines):
        return None
    if span.line == span.end_line:
        text = lines[span.line - 1][span.column - 1:span.end_column - 1]
    else:
        text = " ".join([lines[span.line - 1][span.column - 1:], *lines[span.line:span.end_line - 1],
                         lines[span.end_line - 1][:span.end_column - 1]])
    return one_line(" ".join(text.split())) or None


def _underline(source: Optional[str], span: Span) -> str:
    """The source line of ``span`` with a ``^~~~`` marker under it."""
    if not source:
        return ""
    lines = source_lines(source)
    if not 1 <= span.line <= len(lines):
        return ""
    text = lines[span.line - 1]
    if len(text) > 200:  # keep huge lines readable: show a window around the spot
        start = max(0, span.column - 80)
        text = text[start:start + 160]
        column = span.column - start
    else:
        column = span.column
    width = span.end_column - span.column if span.end_line == span.line else len(text) - column + 1
    width = max(1, min(width, len(text) - column + 2))
    text = one_line(text.replace("\t", " "))  # one character for one: the caret stays in place
    return f"    {text}\n    {' ' * (column - 1)}^{'~' * (width - 1)}"


class CellError(Exception):
    """A problem in a ``.cell`` file, with its position and, where it helps, a hint."""

    def __init__(self, message: str, span: Optional[Span] = None, *,
                 source: Optional[str] = None, hint: Optional[str] = None):
        self.message = message
        self.span = span
        self.source = source
        self.hint = hint
        super().__init__(self.format())

    @property
    def file(self) -> Optional[str]:
        return self.span.file if self.span else None

    @property
    def line(self) -> Optional[int]:
        return self.span.line if self.span else None

    @property
    def column(self) -> Optional[int]:
        return self.span.column if self.span else None

    def with_source(self, source: str) -> "CellError":
        """The same error, able to quote the offending line."""
        return CellError(self.message, self.span, source=source, hint=self.hint)

    def format(self) -> str:
        """The diagnostic: ``file:line:column: error: message``, the quoted line, the hint; every
        part one line, with control characters shown as `?`."""
        where = f"{self.span}: " if self.span else ""
        parts = [one_line(f"{where}error: {self.message}")]
        if self.span:
            quoted = _underline(self.source, self.span)
            if quoted:
                parts.append(quoted)
        if self.hint:
            parts.append(one_line(f"hint: {self.hint}"))
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.format()


class CellWarning(UserWarning):
    """Something legal but probably unintended, such as an unused parameter."""


def warn(message: str, span: Optional[Span]) -> None:
    where = f"{span}: " if span else ""
    warnings.warn(one_line(f"{where}warning: {message}"), CellWarning, stacklevel=3)


def did_you_mean(name: str, candidates: Iterable[str]) -> Optional[str]:
    """A hint naming the closest candidate, or None."""
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`?" if close else None
