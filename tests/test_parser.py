"""The language front end: snippets that must parse, and mistakes that must be reported precisely."""
from __future__ import annotations

import textwrap
import warnings

import pytest

import rnndsl
from rnndsl.errors import CellWarning


def load(source: str, name: str = "t.cell"):
    return rnndsl.load_source(textwrap.dedent(source).strip("\n"), name)


GOOD = {
    "comments and blank lines": """
        # a comment
        cell c(x[input]) -> h {   # trailing comment
            state h[hidden]

            param W[hidden, input]
            h' = tanh(W @ x)
        }
    """,
    "multi-line equation": """
        cell c(x[input]) -> h {
            state h[hidden]
            param W[hidden, input], U[hidden, hidden]
            h' = tanh(W @ x
                      + U @ h)
        }
    """,
    "sizes, hypers, inits, literals": """
        cell c(x[input]) -> y {
            size proj = 3
            hyper forget_bias = 1.0
            hyper scale = -2.5e-1
            state h[hidden], m[proj]
            param W[2*hidden, input], P[proj, input], b[hidden] = 0.5, v[proj] = 1
            a, unused = chunk(W @ x, 2)
            q = P @ x
            y = concat(a, q, unused)
            h' = sigmoid(a + b + forget_bias) * h / (1 + exp(-abs(a))) + scale
            m' = relu(q * v) - 3 * m
        }
    """,
    "several cells": """
        cell one(x[input]) -> h { state h[hidden] param W[hidden, input] h' = tanh(W @ x + h) }
        cell two(x[input]) -> h { state h[hidden] param W[hidden, input] h' = relu(W @ x) * h }
    """,
    "next state used later": """
        cell c(x[input]) -> h {
            state h[hidden], c[hidden]
            param W[2*hidden, input]
            a, b = chunk(W @ x, 2)
            c' = a * c
            h' = b * tanh(c') + log(softplus(c'))
        }
    """,
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_snippets_parse_and_build(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error", CellWarning)
        cells = load(GOOD[name])
    for spec in cells.values():
        spec.build(4, 6, backend="eager")


BAD = [
    # (source, line, column, words the message must contain, words the hint must contain)
    ("""
     cell c(x[input]) -> h {
         state h[hidden]
         h' = x +* h
     }""", 3, 13, ["unexpected `*`"], None),
    ("""
     cell c(x[input]) -> h {
         state h[hidden]
         param W[hidden, input]
         h' = tanhh(W @ x)
     }""", 4, 10, ["unknown function `tanhh`"], "did you mean `tanh`"),
    ("""
     cell c(x[input]) -> h {
         state h[hidden]
         param W[hidden, input]
         h' = tanh(W @ y)
     }""", 4, 19, ["undefined name `y`"], None),
    ("""
     cell c(x[input]) -> h {
         state h[hidden]
         param W[hidden, input]
         a = W @ x
         a = tanh(a)
         h' = a
     }""", 5, 5, ["`a` is assigned twice", "line 4"], None),
    ("""
     cell c(x[input]) -> h {
         state h[hidden], c[hidden]
         param W[hidden, input]
         h' = tanh(W @ x)
     }""", 2, 22, ["state `c` is never updated"], "c' = ..."),
    ("""
     cell c(x[input]) -> y {
         state h[hidden]
         param W[hidden, input]
         h' = tanh(W @ x)
     }""", 1, 21, ["output `y` is never defined"], None),
    ("""
     cell c(x[input]) -> h {
         stat h[hidden]
         param W[hidden, input]
         h' = tanh(W @ x)
     }""", 2, 10, ["unexpected `h`"], "did you mean `state`?"),
    ("""
     cell c(x[input]) -> h {
         state h[hidden]
         param W[hidden, input]
         h' = tanh(W @ x) \u2212 h
     }""", 4, 22, ["unexpected character `\u2212` (U+2212)"], "did you mean `-`?"),
    ("""
     cell c(x[input]) -> h {
         size key = heads * 2
         size heads = 4
         state h[hidden]
         param W[hidden, input]
         h' = tanh(W @ x)
     }""", 2, 16, ["size `heads` is declared below, at line 3"], "move its declaration up"),
    ("""
     cell c(x[input]) -> h {
         state h[hidden]
         param W[hidden, input]
         h' = -W @ x + h
     }""", 4, 10, ["`-W @ x` groups as `(-W) @ x`, as in Python; write `-(W @ x)`"], None),
    ("""
     cell c(x[input]) -> W {
         state h[hidden]
         param W[hidden, input]
         h' = tanh(W @ x)
     }""", 1, 21, ["output `W` is a parameter, not a value the cell computes"], "outputs name a state"),
    ("""
     cell c(x[input]) -> h {
         state h[hidden]
         param W[4*hidden, input], b[hidden]
         h' = W @ x + b
     }""", 4, 10, ["addition of vectors of different sizes", "[4*hidden]", "[hidden]"], None),
    ("""
     cell c(x[input]) -> h {
         state h[hidden]
         param W[hidden, hidden]
         h' = tanh(W @ x)
     }""", 4, 15, ["matrix product does not fit", "[hidden, hidden]", "[input]"], None),
    ("""
     cell c(x[input]) -> h {
         state h[hidden]
         param W[4*hidden, input]
         a, b, c = chunk(W @ x, 3)
         h' = a + b + c
     }""", 4, 15, ["cannot split a vector of size 4*hidden into 3 equal parts"], None),
    ("""
     cell c(x[input]) -> h {
         state h[hidden]
         h' = c' + x
     }""", 3, 10, ["`c'` is not a next state"], None),
    ("""
     cell c(x[input]) -> h {
         state h[hidden], c[hidden]
         h' = c' + h
         c' = h
     }""", 3, 10, ["`c'` is used before it is assigned"], None),
    ("""
     cell c(x[input]) -> h {
         state h[hidden]
         h = h + 1
     }""", 3, 5, ["cannot assign to `h`"], "h' = ..."),
    ("""
     cell c(x[input]) -> h {
         state h[hidden]
         param W[hidden, inptu]
         h' = W @ x
     }""", 3, 21, ["unknown size `inptu`"], "did you mean `input`"),
    ("""
     cell c(x[input]) -> h {
         state h[hidden]
         h' = h
     """, 3, 11, ["unexpected end of file", "not closed"], "add `}`"),
    ("""
     cell c(x[input]) -> h {
         state h[hidden]
         h' = sigmoid(h, x)
     }""", 3, 10, ["`sigmoid` takes 1 argument, got 2"], None),
    ("""
     cell c(x[input]) -> h {
         state h[hidden]
         param W[hidden, input]
         h' = W * x
     }""", 4, 10, ["not a matrix"], None),
    ("""
     cell c(x[input]) -> h {
         state h[hidden]
         param b[hidden]
         h' = b + 1
     }""", 4, 5, ["depends on neither the input nor a state"], None),
]


@pytest.mark.parametrize("source, line, column, words, hint", BAD)
def test_bad_snippets_point_at_the_mistake(source, line, column, words, hint):
    with pytest.raises(rnndsl.CellError) as caught:
        load(source, "bad.cell")
    error = caught.value
    assert (error.file, error.line, error.column) == ("bad.cell", line, column), str(error)
    for word in words:
        assert word in error.message, str(error)
    if hint:
        assert error.hint and hint in error.hint, str(error)
    text = str(error)
    assert text.startswith(f"bad.cell:{line}:{column}: error: ")
    assert "\n    " in text and "^" in text  # the source line and a caret under the spot


def test_error_underline_sits_under_the_spot():
    with pytest.raises(rnndsl.CellError) as caught:
        load("""
            cell c(x[input]) -> h {
                state h[hidden]
                h' = tanhh(h)
            }""", "u.cell")
    lines = str(caught.value).splitlines()
    source, marker = lines[1], lines[2]
    assert source.strip() == "h' = tanhh(h)"
    assert source[marker.index("^"):].startswith("tanhh")
    assert marker.strip() == "^~~~~"


def test_unused_parameter_is_a_warning_with_position():
    with pytest.warns(CellWarning, match=r"t.cell:3:11: warning: parameter `U` is never used"):
        load("""
            cell c(x[input]) -> h {
                state h[hidden]
                param U[hidden, hidden]
                h' = tanh(h + 1)
            }""")


def test_several_cells_need_a_choice(tmp_path):
    path = tmp_path / "two.cell"
    path.write_text(textwrap.dedent(GOOD["several cells"]))
    with pytest.raises(rnndsl.CellError, match="several cells"):
        rnndsl.load_cell(path)
    assert rnndsl.load_cell(path, cell="two").name == "two"
    assert set(rnndsl.load_cells(path)) == {"one", "two"}


def test_hyper_parameters_and_sizes_are_overridable():
    spec = load(GOOD["sizes, hypers, inits, literals"])["c"]
    assert spec.hypers == {"forget_bias": 1.0, "scale": -0.25}
    cell = spec.build(4, 6, backend="eager", forget_bias=2.0, proj=5)
    assert cell.forget_bias == 2.0 and cell.state_sizes == [6, 5]
    assert cell.b[0].item() == 0.5 and cell.v[0].item() == 1.0
    with pytest.raises(TypeError, match="no hyper-parameter or size 'forget'"):
        spec.build(4, 6, forget=1.0)


def test_stock_names_and_paths_resolve(tmp_path):
    assert rnndsl.load_cell("gru").name == "gru"
    with pytest.raises(rnndsl.CellError, match="no stock cell named 'lsmt'"):
        rnndsl.load_cell("lsmt")
    with pytest.raises(rnndsl.CellError, match="no such file"):
        rnndsl.load_cell(tmp_path / "missing.cell")
