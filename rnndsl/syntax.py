"""Parse: ``.cell`` text -> AST (rnndsl/syntax_tree.py), or a :class:`CellError`.

The grammar lives in ``grammars/cell.lark``. Lark's LALR parser builds a parse
tree without recursion; before the (recursive) transformer turns it into the
AST we bound the tree's depth, so hostile input such as 200,000 open
parentheses is a clear error instead of a ``RecursionError``.
"""
from __future__ import annotations

import functools
import re

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from . import syntax_tree as st
from .errors import CellError, Span, did_you_mean, source_lines
from .resources import grammar_path

MAX_FILE_BYTES = 1 << 20   # a cell is a few hundred bytes; larger files are not even read in full
MAX_NESTING = 100          # like CPython's own limit on nested parentheses
MAX_TOKENS = 20_000        # Lark lexes, parses and transforms some 10^4 tokens a second; a cell has a few hundred
# No float needs more digits (the exact decimal of a double has at most 767), and Python converts
# no longer integer text (its limit is 4,300 digits).
MAX_NUMBER_LENGTH = 1_000

# The pre-scan's rough tokens: comments (skipped), parentheses, numbers with a signed exponent
# (`1e-3`), other words and numbers, any other character.
_ROUGH_TOKEN = re.compile(r"#[^\n]*|[()]|(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+[A-Za-z0-9_.']*"
                          r"|[A-Za-z0-9_.']+|\S")
_STARTS_NUMBER = re.compile(r"[0-9]|\.[0-9]")


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    # cache=True keeps the built parse table in the temp folder: 25 ms instead of 450 ms per process.
    return Lark(grammar_path().read_text(encoding="utf-8"), start="file", parser="lalr",
                lexer="contextual", propagate_positions=True, maybe_placeholders=True, cache=True)


def decode(data: bytes, path: str) -> str:
    """Bytes of a ``.cell`` file -> text, refusing what no cell file contains."""
    if len(data) > MAX_FILE_BYTES:
        raise CellError(f"file is too large: more than {MAX_FILE_BYTES:,} bytes (a cell has a few hundred)",
                        Span(path, 1, 1, 1, 2))
    try:
        text = data.decode("utf-8-sig")  # editors on Windows may start the file with a byte-order mark
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        column = len(data[line_start:exc.start].decode("utf-8-sig", errors="replace")) + 1  # in characters
        raise CellError(f"file is not valid UTF-8 (byte 0x{data[exc.start]:02x})",
                        Span(path, line, column, line, column + 1),
                        source=data.decode("utf-8-sig", errors="replace")) from None
    return text


def parse(text: str, path: str = "<string>") -> st.File:
    """Parse the text of a ``.cell`` file."""
    if len(text) > MAX_FILE_BYTES:
        raise CellError(f"file is too large ({len(text):,} characters; a .cell file may have at "
                        f"most {MAX_FILE_BYTES:,})", Span(path, 1, 1, 1, 2))
    bad_number = _prescan(text, path)
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as exc:
        error = _syntax_error(exc, text, path)
        if bad_number and (bad_number.line, bad_number.column) < (error.line, error.column):
            raise bad_number from None
        raise error from None
    if bad_number:
        raise bad_number
    _check_depth(tree, text, path)
    cells = _ToAst(path).transform(tree)
    return st.File(path=path, source=text, cells=tuple(cells))


def _prescan(text: str, path: str) -> CellError | None:
    """Refuse, before Lark sees them, files it would take long to parse; find malformed numbers.

    One pass over at most MAX_TOKENS rough tokens bounds the parser's work and
    the depth of parentheses (which do not deepen the parse tree, so _check_depth
    cannot see them) and the length of numbers. It also returns the first ``1_000``, ``0x10`` or ``2x``,
    which Lark would read as a number followed by a name and report somewhere
    later; the caller reports whichever error comes first in the file.
    """
    depth = 0   # open parentheses
    prefix = 0  # `-` and `(` in a row: each `-` there is a unary minus, one level deeper
    count = 0
    bad_number = None
    split = "split the expression into several equations with intermediate names"
    for match in _ROUGH_TOKEN.finditer(text):
        token = match.group()
        if token.startswith("#"):
            continue
        count += 1
        if count > MAX_TOKENS:
            raise _error_at(text, path, match, f"file is too long: more than {MAX_TOKENS:,} tokens "
                            "(a cell has a few hundred)", "split the cells into several files")
        prefix = prefix + 1 if token in ("-", "(") else 0
        if token == "(":
            depth += 1
            if depth > MAX_NESTING:
                raise _error_at(text, path, match, f"parentheses are nested too deeply (more than "
                                f"{MAX_NESTING} levels)", split)
        elif prefix > MAX_NESTING:
            raise _error_at(text, path, match, f"expression is nested too deeply (more than "
                            f"{MAX_NESTING} levels)", split)
        elif token == ")":
            depth = max(depth - 1, 0)
        elif _STARTS_NUMBER.match(token) and len(token) > MAX_NUMBER_LENGTH:
            raise _error_at(text, path, match, f"number is too long: more than {MAX_NUMBER_LENGTH:,} "
                            "characters", "write large and small numbers with an exponent, as in 1e30")
        elif bad_number is None and _STARTS_NUMBER.match(token) and not _number_pattern().fullmatch(token):
            bad_number = _error_at(text, path, match, f"malformed number `{token}`", _number_hint(token))
    return bad_number


@functools.lru_cache(maxsize=1)
def _number_pattern() -> "re.Pattern[str]":
    return re.compile(_parser().get_terminal("NUMBER").pattern.value)


def _number_hint(token: str) -> str:
    if "_" in token:
        return "write numbers without `_`, as in 1000"
    if token[:2].lower() in ("0x", "0o", "0b"):
        return "numbers are decimal, as in 16, 0.5 or 1e-3"
    if re.fullmatch(r"[0-9.]+[eE]", token):
        return "an exponent needs digits, as in 1e-3"
    if token[-1:].isalpha() or token[-1:] == "_":
        return "write a product with `*`, as in `2 * x`"
    return "numbers look like 3, 0.5, .5 or 1e-3"


def _error_at(text: str, path: str, match: "re.Match[str]", message: str, hint: str) -> CellError:
    line = text.count("\n", 0, match.start()) + 1
    column = match.start() - (text.rfind("\n", 0, match.start()) + 1) + 1
    span = Span(path, line, column, line, column + len(match.group()))
    return CellError(message, span, source=text, hint=hint)


def _check_depth(tree: Tree, text: str, path: str) -> None:
    """Refuse parse trees deeper than MAX_NESTING, without recursing."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING:
            span = _span_of(node, path)
            raise CellError(f"expression is nested too deeply (more than {MAX_NESTING} levels)",
                            span, source=text,
                            hint="split it into several equations with intermediate names")
        stack.extend((child, depth + 1) for child in node.children if isinstance(child, Tree))


def _span_of(node: Tree, path: str) -> Span:
    meta = node.meta
    if getattr(meta, "empty", True):
        return Span(path, 1, 1, 1, 2)
    return Span(path, meta.line, meta.column, meta.end_line, meta.end_column)


def _token_span(token: Token, path: str) -> Span:
    return Span(path, token.line, token.column, token.end_line, token.end_column)


def _describe_terminal(name: str) -> str:
    readable = {"NAME": "a name", "PRIMED": "a next-state name like `h'`", "INT": "an integer",
                "NUMBER": "a number", "$END": "the end of the file"}
    if name in readable:
        return readable[name]
    try:
        pattern = _parser().get_terminal(name).pattern
    except KeyError:
        return name
    return f"`{pattern.value}`" if pattern.type == "str" else name


def _syntax_error(exc: UnexpectedInput, text: str, path: str) -> CellError:
    line = getattr(exc, "line", 1) or 1
    column = getattr(exc, "column", 1) or 1
    at_end = isinstance(exc, UnexpectedEOF) or (isinstance(exc, UnexpectedToken) and exc.token.type == "$END")
    if at_end or line < 1:  # point just after the last character of the file
        lines = source_lines(text.rstrip())
        line, column = len(lines), len(lines[-1]) + 1
    span = Span(path, line, column, line, column + 1)
    if isinstance(exc, UnexpectedCharacters):
        char = text[exc.pos_in_stream] if exc.pos_in_stream < len(text) else ""
        if char == "\x00":
            message = "unexpected NUL byte: this looks like a binary file, not a .cell file"
        elif char.isprintable() and not char.isascii():
            message = f"unexpected character `{char}` (U+{ord(char):04X})" + \
                ("" if char in _CHARACTER_HINTS else ": names use ASCII letters, digits and `_`")
        elif char.isprintable():
            message = f"unexpected character `{char}`"
        else:
            message = f"unexpected character U+{ord(char):04X}"
        return CellError(message, span, source=text, hint=_CHARACTER_HINTS.get(char))
    expected = sorted({_describe_terminal(name) for name in getattr(exc, "expected", ()) or ()})
    if at_end:
        what = "unexpected end of file"
        if "`}`" in expected:
            return CellError(f"{what}: a cell is not closed", span, source=text,
                             hint="add `}` at the end of the cell")
    else:
        token = exc.token
        span = _token_span(token, path) if getattr(token, "line", None) else span
        what = f"unexpected `{token}`" if token.type != "$END" else "unexpected end of file"
        unfinished = _unfinished_line(exc, path)
        if unfinished:
            return CellError(f"{unfinished[0]}; expected {', '.join(expected)}", unfinished[1], source=text,
                             hint=unfinished[2])
    hint = _hint_for(exc)
    listed = ", ".join(expected[:8]) + (", ..." if len(expected) > 8 else "")
    message = f"{what}; expected {listed}" if expected else what
    return CellError(message, span, source=text, hint=hint)


# Characters the language never uses, mostly met when Python is typed into a cell.
_CHARACTER_HINTS = {
    "'": "the cell language has no strings",
    '"': "the cell language has no strings",
    ".": "the cell language has no attribute access; functions are called by name, as in `tanh(v)`",
    ";": "statements need no separator: put each on its own line",
    "\\": "no line continuation is needed: an equation may span lines",
    ":": "the cell language has no lambdas, slices or type annotations",
    # Lookalikes a word processor or a paper's PDF puts in place of the ASCII operator.
    "\u2212": "did you mean `-`?", "\u2013": "did you mean `-`?", "\u00d7": "did you mean `*`?",
    "\u22c5": "did you mean `*`?", "\u2218": "did you mean `*`?", "\u00f7": "did you mean `/`?",
    "\u2019": "did you mean `'`?", "\u2032": "did you mean `'`?", "\uff08": "did you mean `(`?",
    "\uff09": "did you mean `)`?",
}


# A declaration that stops at the end of its line, by its keyword: what it lacks, as an example.
_UNFINISHED = {"STATE": "a shape, as in `state {name}[hidden]`",
               "HYPER": "a default value, as in `hyper {name} = 0.5`", "SIZE": "a value, as in `size {name} = 4`"}


def _unfinished_line(exc: UnexpectedToken, path: str) -> "tuple[str, Span, str] | None":
    """(message, span, hint) when a declaration is a keyword and a name alone on its line, as in
    `param s` or `hyper beta`: the error belongs after the name, not at the next line's first token."""
    stack = getattr(getattr(exc, "state", None), "value_stack", None) or []
    last = stack[-1] if stack else None
    if isinstance(last, Token) and str(last) == "=" and exc.token.line > last.end_line and _in_declaration(stack):
        # `buffer s[] =` and nothing after: the next line's first token is no value for it (an
        # equation may go on at the next line: there the token is simply unexpected)
        span = Span(path, last.end_line, last.end_column, last.end_line, last.end_column + 1)
        return ("the line ends after `=`", span, "a value must follow `=`, as in `= 1.0`")
    if len(stack) < 2 or not all(isinstance(item, Token) for item in stack[-2:]):
        return None
    keyword, name = stack[-2:]
    if keyword.type not in _UNFINISHED or name.type != "NAME" or exc.token.line <= name.end_line:
        return None
    span = Span(path, name.end_line, name.end_column, name.end_line, name.end_column + 1)
    return (f"the line ends after `{keyword} {name}`", span,
            f"`{name}` needs {_UNFINISHED[keyword.type].format(name=name)}")


def _in_declaration(stack: list) -> bool:
    """Whether the parser's stack ends inside a declaration (`param`, `buffer`, `hyper`, `size`),
    not an equation: walked back to the statement's keyword or its start."""
    for item in reversed(stack):
        kind = getattr(item, "type", None)
        if kind in ("PARAM", "BUFFER", "HYPER", "SIZE"):
            return True
        data = getattr(item, "data", None)
        if kind == "LBRACE" or data == "target" or (isinstance(data, str) and data.startswith("__cell")):
            return False
    return False


def _hint_for(exc: UnexpectedInput) -> str | None:
    token = getattr(exc, "token", None)
    if token is None:
        return None
    if str(token) == "[":
        return "brackets give shapes in declarations only; to split a vector use `a, b = chunk(v, 2)`"
    if str(token) == "step" and "SEQUENCE" in getattr(exc, "expected", ()):
        return "an input is read at every step unless marked `per sequence`: drop `per step`"
    if token.type == "PRIMED":
        return "next-state names like `h'` go on the left of `=` or after the state's update"
    stack = getattr(getattr(exc, "state", None), "value_stack", None) or []
    if token.type == "NAME" and stack and isinstance(stack[-1], Token) and stack[-1].type == "NAME":
        # two names in a row: the first was meant as a keyword (`stat h[hidden]`)
        return did_you_mean(str(stack[-1]), ["state", "param", "buffer", "hyper", "size", "cell"])
    return None


@v_args(meta=True)
class _ToAst(Transformer):
    """Parse tree -> AST. Builds only; checks come later (Lark wraps exceptions here)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def _span(self, meta) -> Span:
        if getattr(meta, "empty", True):
            return Span(self.path, 1, 1, 1, 2)
        return Span(self.path, meta.line, meta.column, meta.end_line, meta.end_column)

    def _tok(self, token: Token) -> Span:
        return _token_span(token, self.path)

    # file and cell

    def file(self, meta, cells):
        return list(cells)

    def cell(self, meta, children):
        name, *rest = children
        count = next(i for i, child in enumerate(rest) if not isinstance(child, st.InputDecl))
        inputs, outputs, statements = tuple(rest[:count]), rest[count], rest[count + 1:]
        kinds = {kind: [] for kind in (st.VarDecl, st.ParamDecl, st.BufferDecl, st.SizeDecl, st.HyperDecl,
                                       st.Assign)}
        for statement in statements:
            if isinstance(statement, list):  # state and param declarations list several names
                for item in statement:
                    kinds[type(item)].append(item)
            else:
                kinds[type(statement)].append(statement)
        return st.Cell(name=str(name), inputs=inputs, outputs=outputs,
                       states=tuple(kinds[st.VarDecl]), params=tuple(kinds[st.ParamDecl]),
                       sizes=tuple(kinds[st.SizeDecl]), hypers=tuple(kinds[st.HyperDecl]),
                       body=tuple(kinds[st.Assign]), span=self._span(meta), name_span=self._tok(name),
                       buffers=tuple(kinds[st.BufferDecl]))

    def input_decl(self, meta, children):
        name, *shape, per_sequence = children
        return st.InputDecl(str(name), tuple(shape), per_sequence is not None, self._span(meta))

    def per_sequence(self, meta, children):
        return True

    def output_list(self, meta, names):
        return tuple(st.Output(str(name), self._tok(name)) for name in names)

    # declarations

    def state_decl(self, meta, decls):
        return list(decls)

    def var_decl(self, meta, children):
        name, *shape = children
        return st.VarDecl(str(name), tuple(shape), self._span(meta))

    def param_decl(self, meta, items):
        return list(items)

    def param_item(self, meta, children):
        name, *rest = children
        init = rest.pop() if rest and not _is_size(rest[-1]) else None
        return st.ParamDecl(str(name), tuple(size for size in rest if size is not None), init,
                            self._span(meta))

    def buffer_decl(self, meta, items):
        return [st.BufferDecl(item.name, item.shape, item.init if item.init is not None else 0.0, item.span)
                for item in items]

    def size_decl(self, meta, children):
        name, value = children
        if isinstance(value, st.SizeInt):
            return st.SizeDecl(str(name), value.value, self._span(meta))
        return st.SizeDecl(str(name), None, self._span(meta), formula=value)

    def hyper_decl(self, meta, children):
        name, value = children
        return st.HyperDecl(str(name), value, self._span(meta))

    def signed_number(self, meta, children):
        sign, number = children
        value = float(number)
        return -value if sign is not None else value

    def assign(self, meta, children):
        *targets, value = children
        return st.Assign(tuple(targets), value, self._span(meta))

    def target(self, meta, children):
        (token,) = children
        primed = token.type == "PRIMED"
        return st.Target(str(token).rstrip("'"), primed, self._tok(token))

    # sizes

    def size_int(self, meta, children):
        (token,) = children
        return st.SizeInt(int(token), self._tok(token))

    def size_name(self, meta, children):
        (token,) = children
        return st.SizeName(str(token), self._tok(token))

    def _size_binary(op):
        def build(self, meta, children):
            left, right = children
            return st.SizeBinary(op, left, right, self._span(meta))
        return build

    size_add, size_sub, size_mul = _size_binary("+"), _size_binary("-"), _size_binary("*")
    size_div = _size_binary("/")

    # expressions

    def number(self, meta, children):
        (token,) = children
        return st.Number(float(token), self._tok(token))

    def name(self, meta, children):
        (token,) = children
        return st.Name(str(token), self._tok(token))

    def primed(self, meta, children):
        (token,) = children
        return st.Primed(str(token).rstrip("'"), self._tok(token))

    def neg(self, meta, children):
        (operand,) = children
        return st.Neg(operand, self._span(meta))

    def call(self, meta, children):
        name, *args = children
        args = tuple(arg for arg in args if arg is not None)  # f() gives one placeholder
        return st.Call(str(name), args, self._span(meta), self._tok(name))

    def _binary(op):
        def build(self, meta, children):
            left, right = children
            return st.Binary(op, left, right, self._span(meta))
        return build

    add, sub, mul, div, matmul = _binary("+"), _binary("-"), _binary("*"), _binary("/"), _binary("@")
    pow = _binary("**")
    lt, le, gt, ge = _binary("<"), _binary("<="), _binary(">"), _binary(">=")
    del _binary, _size_binary


def _is_size(node: object) -> bool:
    return isinstance(node, (st.SizeInt, st.SizeName, st.SizeBinary))

