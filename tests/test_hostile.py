"""Hostile and broken input to the compiler: nothing crashes, hangs, executes, or is silently wrong.

Every malformed file is a CellError naming file, line and column, through
``rnndsl.load_cell`` and through ``rnndsl check`` (exit 1, no traceback), each
within a hang guard; names that shadow Python or the generated code are
renamed and compute the right numbers, or are refused clearly; generated code
holds only validated identifiers and float literals.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import os
import re
import signal
import subprocess
import sys
import time
import tokenize
import warnings
from pathlib import Path

import pytest
import torch

import rnndsl
from rnndsl import CellError, CellWarning
from rnndsl.check import BUILD_ARGUMENTS, MODULE_ATTRIBUTES
from rnndsl.cli import main
from rnndsl.codegen import PythonCode, validate_source
from rnndsl.codegen import generate_step as generate
from rnndsl.errors import printable
from rnndsl.ir import IRError, Op

REPO = Path(__file__).resolve().parent.parent
HANG_GUARD_S = 10  # generous: each case takes well under a second; this only turns a hang into a failure
HEADER = "cell c(x[input]) -> h {\n    state h[hidden]\n    param w[hidden, input]\n"


@contextlib.contextmanager
def hang_guard(seconds: float = HANG_GUARD_S):
    """Fail, rather than hang, when the body runs longer than ``seconds``."""
    def expire(signum, frame):
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def body(equations: str) -> bytes:
    return (HEADER + equations + "\n}\n").encode()


# name -> (file contents, words the message must contain, (line, column) or None)
MALFORMED = {
    "empty": (b"", "holds no cell", (1, 1)),
    "only a comment": (b"# nothing here\n", "holds no cell", (1, 1)),
    "NUL bytes": (b"\x00\x00cell", "NUL byte", (1, 1)),
    "binary": (bytes(range(256)) * 4, "not valid UTF-8", (2, 118)),
    "invalid UTF-8": (b"cell c(x[input]) -> h {\n  h\xff = x\n}\n", "not valid UTF-8 (byte 0xff)", (2, 4)),
    "truncated UTF-8": (b"cell c(x[input]) -> h \xe2\x82", "not valid UTF-8", (1, 23)),
    "unterminated block": (HEADER.encode(), "a cell is not closed", (3, 27)),
    "unterminated parenthesis": (body("    h' = tanh(w @ x"), "unexpected `}`", (5, 1)),
    "200,000 open parentheses": (body("    h' = " + "(" * 200_000 + "w @ x"),
                                 "parentheses are nested too deeply", (4, 110)),
    "200,000 balanced parentheses": (body("    h' = " + "(" * 200_000 + "w @ x" + ")" * 200_000),
                                     "parentheses are nested too deeply", (4, 110)),
    "100,000 unary minus": (body("    h' = " + "-" * 100_000 + "w @ x"),
                            "expression is nested too deeply", (4, 110)),
    "unary minus spaced": (body("    h' = " + "- " * 5_000 + "w @ x"), "expression is nested too deeply", (4, 210)),
    "200 nested calls": (body("    h' = " + "tanh(" * 200 + "w @ x" + ")" * 200),
                         "parentheses are nested too deeply", (4, 514)),
    "a sum of 1,000 terms": (body("    h' = " + " + ".join(["w @ x"] * 1_000)),
                             "expression is nested too deeply", None),
    "10 MB": (b"# " + b"x" * (10 << 20) + b"\n", "file is too large", (1, 1)),
    "100,000 tokens": (body("".join(f"    a{i} = w @ x\n" for i in range(20_000)) + "    h' = a0"),
                       "file is too long", None),
    "Unicode identifier": (body("    é = w @ x\n    h' = é"), "unexpected character `é` (U+00E9)", (4, 5)),
    "full-width exec": (body("    h' = ｅｘｅｃ(w @ x)"), "unexpected character `ｅ`", (4, 10)),
    "bidirectional override": (body("    h' = w @ x \u202e"), "unexpected character U+202E", (4, 16)),
    "escape sequence": (body("    h' = w @ x \x1b[2J"), "unexpected character U+001B", (4, 16)),
    "__import__": (body("    h' = __import__(w @ x)"), "unknown function `__import__`", (4, 10)),
    "__import__ with a string": (body("    h' = __import__('os')"), "unexpected character `'`", (4, 21)),
    "exec": (body("    h' = exec(w @ x)"), "unknown function `exec`", (4, 10)),
    "eval": (body("    h' = eval(w @ x)"), "unknown function `eval`", (4, 10)),
    "open": (body("    h' = open(w @ x)"), "unknown function `open`", (4, 10)),
    "attribute access": (body("    h' = x.__class__"), "unexpected character `.`", (4, 11)),
    "method call": (body("    h' = w.t() @ x"), "unexpected character `.`", (4, 11)),
    "single-quoted string": (body("    h' = 'abc'"), "unexpected character `'`", (4, 10)),
    "double-quoted string": (body('    h\' = "abc"'), 'unexpected character `"`', (4, 10)),
    "f-string": (body("    h' = f\"{x}\""), 'unexpected character `"`', (4, 11)),
    "backslash": (body("    h' = w @ x \\\n + 1"), "unexpected character `\\`", (4, 16)),
    "lambda": (body("    h' = lambda: x"), "unexpected character `:`", (4, 16)),
    "semicolon": (body("    h' = w @ x; import os"), "unexpected character `;`", (4, 15)),
    "import statement": (body("    import os\n    h' = w @ x"), "unexpected `os`", (4, 12)),
    "indexing": (body("    h' = x[0]"), "unexpected `[`", (4, 11)),
    "power": (body("    h' = x *** 2"), "unexpected `*`", (4, 14)),
    "dunder name": (body("    __class__ = w @ x\n    h' = __class__"), "reserved in Python", (4, 5)),
    "Python keyword as name": (body("    lambda = w @ x\n    h' = lambda"), "reserved in Python", (4, 5)),
    "1e999": (body("    h' = w @ x * 1e999"), "would be infinity", (4, 18)),
    "1e999 hyper": (b"cell c(x[input]) -> h {\n    hyper p = 1e999\n    state h[hidden]\n    h' = x * p\n}\n",
                    "would be infinity", (2, 5)),
    "1_000": (body("    h' = w @ x * 1_000"), "malformed number `1_000`", (4, 18)),
    "hex": (body("    h' = w @ x * 0x10"), "malformed number `0x10`", (4, 18)),
    "number then name": (body("    h' = 2x"), "malformed number `2x`", (4, 10)),
    "dropout probability": (body("    h' = dropout(w @ x, 2)"), "probability between 0 and 1", (4, 25)),
    "parameter named training": (b"cell c(x[input]) -> h {\n    state h[hidden]\n    param training[hidden, input]\n"
                                 b"    h' = training @ x\n}\n", "clashes with the attribute `training`", (3, 11)),
    "hyper named _parameters": (b"cell c(x[input]) -> h {\n    hyper _parameters = 1\n    state h[hidden]\n"
                                b"    h' = x * _parameters\n}\n", "`_parameters` cannot name", (2, 5)),
    "size named forward_sequence": (b"cell c(x[input]) -> h {\n    size forward_sequence = 2\n    state h[hidden]\n"
                                    b"    h' = x\n}\n", "`forward_sequence` cannot name", (2, 5)),
}


@pytest.fixture(scope="module")
def malformed_files(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("malformed")
    paths = {}
    for index, (name, (data, _, _)) in enumerate(MALFORMED.items()):
        paths[name] = folder / f"case{index}.cell"
        paths[name].write_bytes(data)
    return paths


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_file_is_a_positioned_cell_error(name, malformed_files, capsys):
    _, words, position = MALFORMED[name]
    path = str(malformed_files[name])
    start = time.perf_counter()
    with hang_guard(), pytest.raises(CellError) as caught:
        rnndsl.load_cell(path)
    elapsed = time.perf_counter() - start
    error = caught.value
    assert words in error.message, str(error)
    assert error.file == path and error.line >= 1 and error.column >= 1, str(error)
    if position:
        assert (error.line, error.column) == position, str(error)
    text = str(error)
    assert text.startswith(f"{path}:{error.line}:{error.column}: error: ")
    assert "\x1b" not in text and "\u202e" not in text  # quoted source lines are shown sanitized
    assert elapsed < HANG_GUARD_S
    with hang_guard():
        assert main(["check", path]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{path}:{error.line}:{error.column}: error: {error.message}")
    assert "Traceback" not in err and "\x1b" not in err and "\u202e" not in err


def test_check_command_reports_every_malformed_file_without_traceback(malformed_files):
    """One real `python -m rnndsl check` over all the files: exit 1, a diagnostic for each."""
    paths = [str(path) for path in malformed_files.values()]
    run = subprocess.run([sys.executable, "-m", "rnndsl", "check", *paths], capture_output=True,
                         text=True, errors="replace", timeout=120, cwd=REPO)
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr and "internal error" not in run.stderr
    for path in paths:
        assert re.search(rf"^{re.escape(path)}:\d+:\d+: error: ", run.stderr, re.MULTILINE), path


# Paths that are not readable .cell files -----------------------------------------

def _unreadable_paths(tmp_path: Path) -> dict:
    a_file = tmp_path / "plain.cell"
    a_file.write_text("# nothing\n")
    paths = {
        "nonexistent": (str(tmp_path / "missing.cell"), "no such file"),
        "directory": (str(tmp_path), "is a directory"),
        "path inside a file": (str(a_file / "inner.cell"), "Not a directory"),
        "unknown stock name": ("lstmm", "no stock cell named 'lstmm'"),
        "NUL in the path": (str(tmp_path / "a\x00.cell"), "embedded null byte"),
    }
    if os.path.exists("/dev/zero"):  # endless: refused before it is opened
        paths["endless device"] = ("/dev/zero", "is a character device, not a regular file")
    return paths


def test_missing_or_unreadable_paths_are_clear_errors(tmp_path, capsys):
    for name, (path, words) in _unreadable_paths(tmp_path).items():
        with hang_guard(), pytest.raises(CellError) as caught:
            rnndsl.load_cell(path)
        assert words in str(caught.value), (name, str(caught.value))
        # the path as printed: a NUL in it shows as `?`
        assert printable(path) in str(caught.value) or path == "/dev/zero", (name, str(caught.value))
        with hang_guard():
            assert main(["check", path]) == 1, name
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, (name, err)


def test_a_bare_folder_name_is_refused_as_a_folder_not_as_no_stock_cell(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mycells").mkdir()
    with pytest.raises(CellError, match="mycells is a directory, not a .cell file"):
        rnndsl.load_cell("mycells")
    (tmp_path / "lstm").mkdir()  # a folder never hides a stock cell
    assert rnndsl.load_cell("lstm").name == "lstm"


# The bad-input list of the language issue --------------------------------------------

def _snippet(*lines: str) -> str:
    return "\n".join(lines) + "\n"


# (source, line, column, words of the message, words of the hint or None)
BAD_INPUT = {
    "syntax error": (_snippet("cell c(x[input]) -> h {", "    state h[hidden]", "    h' = x + * h", "}"),
                     3, 14, "unexpected `*`", None),
    "unknown function": (_snippet("cell c(x[input]) -> h {", "    state h[hidden]", "    param W[hidden, input]",
                                  "    h' = sigmoidd(W @ x)", "}"),
                         4, 10, "unknown function `sigmoidd`", "did you mean `sigmoid`?"),
    "undefined name": (_snippet("cell c(x[input]) -> h {", "    state h[hidden]", "    param W[hidden, input]",
                                "    h' = tanh(W @ x + bias)", "}"),
                       4, 23, "undefined name `bias`", None),
    "assigned twice": (_snippet("cell c(x[input]) -> h {", "    state h[hidden]", "    param W[hidden, input]",
                                "    a = W @ x", "    a = tanh(a)", "    h' = a", "}"),
                       5, 5, "`a` is assigned twice (first at line 4)", "give each value its own name"),
    "state never updated": (_snippet("cell c(x[input]) -> h {", "    state h[hidden], c[hidden]",
                                     "    param W[hidden, input]", "    h' = tanh(W @ x)", "}"),
                            2, 22, "state `c` is never updated", "c' = ..."),
    "output never defined": (_snippet("cell c(x[input]) -> y {", "    state h[hidden]", "    param W[hidden, input]",
                                      "    h' = tanh(W @ x)", "}"),
                             1, 21, "output `y` is never defined", None),
    "[4*hidden] plus [hidden]": (_snippet("cell c(x[input]) -> h {", "    state h[hidden]",
                                          "    param W[4*hidden, input], b[hidden]", "    h' = W @ x + b", "}"),
                                 4, 10, "addition of vectors of different sizes: [4*hidden] and [hidden]", None),
    "matmul that does not fit": (_snippet("cell c(x[input]) -> h {", "    state h[hidden]",
                                          "    param U[hidden, hidden]", "    h' = tanh(U @ x)", "}"),
                                 4, 15, "matrix product does not fit: a [hidden, hidden] matrix times a [input] vector",
                                 None),
    "chunk that does not divide": (_snippet("cell c(x[input]) -> h {", "    state h[hidden]",
                                            "    param W[4*hidden, input]", "    a, b, c = chunk(W @ x, 3)",
                                            "    h' = a + b + c", "}"),
                                   4, 15, "cannot split a vector of size 4*hidden into 3 equal parts", None),
    # torch's functions take tensors: these once passed the checker and failed in TorchScript
    # (a pointwise function of a number is a number: `sigmoid(k)` is computed with Python's floats)
    "function of a number": (_snippet("cell c(x[input]) -> h {", "    hyper k = 1.0", "    state h[hidden]",
                                      "    h' = softmax(k) * h + x", "}"),
                             4, 10, "softmax takes a vector, got a number", None),
    "dropout of a number": (_snippet("cell c(x[input]) -> h {", "    hyper k = 1.0", "    state h[hidden]",
                                     "    h' = dropout(k, 0.5) * h + x", "}"),
                            4, 10, "dropout zeroes units of a vector, got a number", None),
    # in eval, zoneout(v, h', p) returned v, a parameter, where a per-example value was due
    "zoneout of a parameter": (_snippet("cell c(x[input]) -> h {", "    state h[hidden]", "    param v[hidden]",
                                        "    h' = zoneout(v, h, 0.5) + x", "}"),
                               4, 10, "got a parameter vector [hidden] and a per-example vector [hidden]", None),
}


@pytest.mark.parametrize("name", list(BAD_INPUT))
def test_bad_input_of_the_language_issue(name, tmp_path, capsys):
    source, line, column, words, hint = BAD_INPUT[name]
    path = tmp_path / "bad.cell"
    path.write_text(source)
    with pytest.raises(CellError) as caught:
        rnndsl.load_cell(path)
    error = caught.value
    assert (error.line, error.column) == (line, column), str(error)
    assert words in error.message, str(error)
    if hint:
        assert error.hint and hint in error.hint, str(error)
    assert main(["check", str(path)]) == 1
    printed = capsys.readouterr().err.splitlines()
    source_line = source.splitlines()[line - 1]
    assert printed[0] == f"{path}:{line}:{column}: error: {error.message}"
    assert printed[1] == f"    {source_line}"
    assert printed[2].index("^") == 4 + column - 1  # the caret sits under the spot
    if hint:
        assert printed[3] == f"hint: {error.hint}"


def test_unused_parameter_is_a_warning_with_its_position(tmp_path, capsys):
    path = tmp_path / "unused.cell"
    path.write_text(_snippet("cell c(x[input]) -> h {", "    state h[hidden]",
                             "    param W[hidden, input], V[hidden, hidden]", "    h' = tanh(W @ x)", "}"))
    with pytest.warns(CellWarning, match=r"unused\.cell:3:29: warning: parameter `V` is never used"):
        rnndsl.load_source(path.read_text(), str(path))
    assert main(["check", str(path)]) == 0
    assert "parameter `V` is never used" in capsys.readouterr().err


# Names that shadow Python, TorchScript or the generated code ----------------------

SHADOWING = ["sum", "len", "range", "torch", "self", "t", "xs", "mask", "keep", "real", "outputs",
             "Tensor", "List", "Optional", "exec", "eval", "print", "nan", "inf", "_unused_0", "x_seq",
             "h_next", "tanh_1", "annotate", "fork", "wait", "Dict", "Union", "Any", "Final", "isinstance",
             "super", "math", "F"]


def _shadowing_cell(input_name: str, state_name: str, local_name: str) -> str:
    return (f"cell c({input_name}[input]) -> {state_name}, {local_name} {{\n    state {state_name}[hidden]\n"
            f"    param w[hidden, input], u[hidden, hidden]\n    {local_name} = w @ {input_name}\n"
            f"    {state_name}' = tanh({local_name} + u @ {state_name})\n}}\n")


def test_names_that_shadow_builtins_are_renamed_and_compute_correctly():
    torch.manual_seed(0)
    xs = torch.randn(4, 2, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 1], [1, 0], [0, 1]], dtype=torch.bool)
    h0 = torch.randn(2, 5, dtype=torch.float64)
    count = len(SHADOWING)
    for index in range(count):  # each name once as the input, once as the state, once as a local
        names = [SHADOWING[(index + shift) % count] for shift in range(3)]
        spec = rnndsl.load_source(_shadowing_cell(*names))["c"]
        for backend in ("eager", "script"):
            cell = spec.build(3, 5, backend=backend).double()
            w, u = cell.w.detach(), cell.u.detach()
            h, expected_h, expected_a = h0, [], []
            for step in range(4):  # the reference: the same cell written by hand
                a = xs[step] @ w.T
                new = torch.tanh(a + h @ u.T)
                keep = mask[step].unsqueeze(1)
                expected_h.append(new * keep)
                expected_a.append(a * keep)
                h = torch.where(keep, new, h)
            (outputs, local), (final,) = cell.forward_sequence(xs, (h0,), mask)
            torch.testing.assert_close(outputs, torch.stack(expected_h), msg=f"{names} {backend}")
            torch.testing.assert_close(local, torch.stack(expected_a), msg=f"{names} {backend}")
            torch.testing.assert_close(final, h, msg=f"{names} {backend}")
            (step_h,), (step_y, _) = cell((h0,), xs[0])
            torch.testing.assert_close(step_h, torch.tanh(xs[0] @ w.T + h0 @ u.T))
        assert validate_source(spec.code()) == spec.code()


# declaration, the column its error points at (a parameter's own span starts at its name)
ATTRIBUTE_DECLARATIONS = [("param {name}[input]", 11), ("hyper {name} = 0.5", 5), ("size {name} = 2", 5)]


@pytest.mark.parametrize("what, column", ATTRIBUTE_DECLARATIONS)
def test_attribute_names_are_refused_clearly_or_work(what, column):
    """Parameters, sizes and hyper-parameters become module attributes: clashes are refused."""
    for name in ["training", "forward", "forward_sequence", "reset_parameters", "state_dict", "cuda",
                 "_parameters", "_inits", "cell_name", "code", "graph", "save", "sum", "torch", "t", "xs"]:
        declaration = what.format(name=name)
        use = f" + {name}" if not what.startswith("size") else ""
        source = (f"cell c(x[input]) -> h {{\n    state h[input]\n    {declaration}\n"
                  f"    h' = tanh(x){use}\n}}\n")
        if name in MODULE_ATTRIBUTES or name.startswith("_"):
            with pytest.raises(CellError, match=rf"`{name}` cannot name") as caught:
                rnndsl.load_source(source)
            assert (caught.value.line, caught.value.column) == (3, column)
            assert caught.value.hint
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cell = rnndsl.load_source(source)["c"].build(4, 4, backend="script")
            assert torch.isfinite(cell((torch.zeros(1, 4),), torch.ones(1, 4))[1]).all()


def test_module_attribute_list_covers_every_attribute_of_a_built_cell():
    """A new attribute on cell modules must join check.MODULE_ATTRIBUTES, or a .cell name could clobber it."""
    spec = rnndsl.load_cell("lstm")
    for backend in ("eager", "script"):
        cell = spec.build(3, 4, backend=backend)
        names = set(dir(type(cell))) | set(vars(cell)) | set(dir(cell))
        declared = {name for name, _ in cell.named_parameters()} | {"input", "hidden"}
        missing = sorted(n for n in names - declared - MODULE_ATTRIBUTES if not n.startswith("_"))
        assert not missing, f"{backend}: add {missing} to rnndsl.check.MODULE_ATTRIBUTES"


def test_sizes_and_hypers_never_share_a_name_with_an_argument_of_build():
    arguments = [name for name, parameter in inspect.signature(rnndsl.CellSpec.build).parameters.items()
                 if parameter.kind is not inspect.Parameter.VAR_KEYWORD]
    assert set(arguments) <= BUILD_ARGUMENTS, "add them to rnndsl.check.BUILD_ARGUMENTS"
    for name in ("backend", "disable", "fixed_dropout_mask", "self"):
        for declaration in (f"size {name} = 2", f"hyper {name} = 0.5"):
            with pytest.raises(CellError, match=f"`{name}` cannot name .*an argument of CellSpec.build"):
                rnndsl.load_source(HEADER + f"    {declaration}\n    h' = w @ x\n}}\n")


# Nothing in a .cell file is executed ------------------------------------------------------

def _names_in(code: str) -> set:
    return {t.string for t in tokenize.generate_tokens(io.StringIO(code).readline) if t.type == tokenize.NAME}


def test_generated_code_holds_only_validated_identifiers_and_floats():
    source = _snippet("cell c(exec[input]) -> print {", "    hyper exit = 0.25",
                      "    state print[hidden], open[hidden]",
                      "    param w[hidden, input], getattr[hidden, hidden]",
                      "    nan = w @ exec * 1e300 + 1e-300 * .5", "    inf = tanh(nan) * exit",
                      "    print' = inf + getattr @ open", "    open' = -nan / 3.", "}")
    spec = rnndsl.load_source(source)["c"]
    code = spec.code()
    assert validate_source(code) == code
    # Python's names survive only as attributes of the module (`self.getattr`); locals were renamed.
    assert not {"exec", "print", "open", "getattr", "exit"} & _names_in(
        code.replace("self.getattr", "").replace("self.exit", ""))
    numbers = [t.string for t in tokenize.generate_tokens(io.StringIO(code).readline) if t.type == tokenize.NUMBER]
    assert all(re.fullmatch(r"[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?", number) for number in numbers), numbers
    assert any("e+300" in number for number in numbers), numbers
    cell = spec.build(2, 3, backend="script").double()
    zeros = torch.zeros(1, 3, dtype=torch.float64)
    (new_print, new_open), output = cell((zeros, zeros), torch.full((1, 2), 1e-300, dtype=torch.float64))
    assert torch.isfinite(output).all() and torch.isfinite(new_open).all()


@pytest.mark.parametrize("code", [
    "import os\n", "x = __import__('os')\n", "x = exec(y)\n", "x = eval(y)\n", "x = y.__class__\n",
    "x = 'text'\n", "x = lambda: 1\n", "x = ｅｘｅｃ(y)\n", "x = 1_000\n", "x = 0x10\n", "x = y; z = w\n",
    "x = {y}\n", "x = y ** 2\n", "x = open(y)\n", "x = getattr(y, z)\n", "del x\n", "class A:\n    pass\n",
    "x = f'{y}'\n", "x = y\\\n",
])
def test_the_final_guard_refuses_code_no_cell_can_generate(code):
    with pytest.raises(IRError):
        validate_source(code)


def test_the_final_guard_stands_behind_a_doctored_graph():
    """Even an IR that bypassed the checker cannot smuggle a name or a non-finite number into code."""
    graph = rnndsl.load_cell("gru").optimized()

    def rename(name: str) -> str:
        return "ｅｘｅｃ" if name == graph.input.name else name  # Python would read it as `exec` (NFKC)

    doctored = dataclasses.replace(
        graph, input=dataclasses.replace(graph.input, name="ｅｘｅｃ"),
        nodes=tuple(dataclasses.replace(n, name=rename(n.name), inputs=tuple(map(rename, n.inputs)))
                    for n in graph.nodes))
    with pytest.raises(IRError, match="not a plain ASCII name"):
        generate(doctored)
    constant = next(n for n in graph.nodes if n.op is Op.CONST)  # the 1 of `(1 - z)`
    for value in (float("inf"), float("-inf"), float("nan")):
        corrupted = dataclasses.replace(constant, attrs=(("value", value),))
        doctored = dataclasses.replace(graph, nodes=tuple(corrupted if n is constant else n for n in graph.nodes))
        with pytest.raises(IRError, match="finite"):
            generate(doctored)


def test_nothing_reaches_exec_without_the_final_guard(monkeypatch):
    """Whatever a code generator returns (the forward's or the derived backward's), build validates it."""
    from rnndsl import compile
    monkeypatch.setattr(compile, "generate_step",
                        lambda *args, **kwargs: PythonCode("import os\nos.system('true')\n", ()))
    spec = rnndsl.load_source(HEADER + "    h' = tanh(w @ x) * 0.123456789\n}\n", "guard.cell")["c"]
    with pytest.raises(IRError, match="never generated"):
        spec.build(2, 3, backend="eager")
    compile._source.cache_clear()  # drop the doctored source


def test_a_file_name_with_a_newline_stays_in_its_comment():
    evil = "evil\nimport os\nos.system('echo pwned')\n.cell"
    spec = rnndsl.load_source(HEADER + "    h' = tanh(w @ x)\n}\n", evil)["c"]
    code = spec.code()
    assert validate_source(code) == code
    assert not any(line.startswith(("import", "os.")) for line in code.splitlines())
    spec.build(2, 3, backend="eager")


def test_a_file_name_with_a_newline_cannot_forge_a_diagnostic_line(tmp_path):
    forged = "a.cell\nb.cell:1:1: error: forged"
    with pytest.raises(CellError) as caught:
        rnndsl.load_source("cell c(x[input]) -> h {\n    h = x\n}\n", forged)
    first, *rest = str(caught.value).splitlines()
    assert first.startswith("a.cell?b.cell:1:1: error: forged:1:")
    assert not any("error:" in line for line in rest)
    with pytest.raises(CellError) as caught:  # an error without a position names the path too
        rnndsl.load_cell(str(tmp_path / forged))
    assert len(str(caught.value).splitlines()) == 1
    spec = rnndsl.load_source(HEADER + "    h' = tanh(w @ x + h)  # \x1b[31m\n}\n", forged)["c"]
    with pytest.raises(ValueError) as refused:  # the parallel scan's refusal quotes file and line
        spec.build(2, 3, scan="parallel")
    assert "\n" not in str(refused.value) and "\x1b" not in str(refused.value)


# Numbers at the edges -----------------------------------------------------------------

def test_nan_and_inf_are_ordinary_names_and_big_literals_stay_numbers():
    source = _snippet("cell c(x[input]) -> h {", "    state h[hidden]", "    param w[hidden, input]",
                      "    nan = w @ x", "    inf = nan * 1e300 * 1e-300", "    h' = tanh(inf) + 0 * h", "}")
    for backend in ("eager", "script"):
        cell = rnndsl.load_source(source)["c"].build(2, 3, backend=backend).double()
        x = torch.randn(4, 2, dtype=torch.float64)
        (h,), _ = cell((torch.zeros(4, 3, dtype=torch.float64),), x)
        torch.testing.assert_close(h, torch.tanh(x @ cell.w.detach().T * 1e300 * 1e-300))


def test_deep_but_legal_nesting_compiles_without_recursion_errors():
    source = body("    h' = " + "tanh(" * 40 + "-(" * 40 + "w @ x" + ")" * 80)
    cell = rnndsl.load_source(source.decode())["c"].build(2, 3, backend="script")
    assert torch.isfinite(cell((torch.zeros(1, 3),), torch.ones(1, 2))[1]).all()


# Stock cells under large inputs -------------------------------------------------------

@pytest.mark.parametrize("name", ["lstm", "gru", "rnn_tanh", "rnn_relu", "rnn_sigmoid"])
@pytest.mark.parametrize("backend", ["script", "eager"])
def test_stock_cells_stay_finite_for_inputs_up_to_1e4(name, backend):
    torch.manual_seed(0)
    cell = rnndsl.load_cell(name).build(8, 16, backend=backend)
    for magnitude in (1e2, 1e3, 1e4):
        xs = (magnitude * torch.randn(20, 4, 8).sign()).requires_grad_(True)
        state = tuple(torch.zeros(4, size) for size in cell.state_sizes)
        outputs, final = cell.forward_sequence(xs, state)
        new_state, output = cell(state, xs[0])
        for value in (outputs, output, *final, *new_state):
            assert torch.isfinite(value).all(), (name, backend, magnitude)
        (grad,) = torch.autograd.grad(outputs.sum() + output.sum(), xs)
        assert torch.isfinite(grad).all(), (name, backend, magnitude)


def test_sizes_beyond_what_torch_can_allocate_are_refused():
    lines = ["cell c(x[input]) -> h {", "    size k = 99999999999999999999", "    state h[k]",
             "    param v[k, input]", "    h' = v @ x", "}"]
    with pytest.raises(CellError, match="size `k` must be from 1 to 2,147,483,647") as error:
        rnndsl.load_source(_snippet(*lines))
    assert (error.value.line, error.value.column) == (2, 5)
    lines[1] = "    size k = 1"
    spec = rnndsl.load_source(_snippet(*lines))["c"]
    with pytest.raises(ValueError, match="sizes run from 1 to 2,147,483,647"):
        spec.build(3, 3, backend="eager", k=2**40)
    assert spec.build(3, 3, backend="eager", k=2).state_sizes == [2]


def test_a_failed_scripted_build_does_not_poison_the_next(monkeypatch):
    """TorchScript keeps what it compiled before an error; the next build must still compile, not
    fail with "Can't redefine method". The failure is forced with a helper TorchScript rejects."""
    from rnndsl import kernels

    def not_scriptable(x, *rest):
        return x

    spec = rnndsl.load_source(HEADER.replace("cell c", "cell poisoned") + "    h' = tanh(w @ x + h)\n}\n")["poisoned"]
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "outer_sum", not_scriptable)
        with pytest.raises(Exception, match="variable number of arguments"):
            spec.build(3, 4)
    cell = spec.build(3, 4)
    assert cell((torch.zeros(2, 4),), torch.randn(2, 3))[1].shape == (2, 4)
