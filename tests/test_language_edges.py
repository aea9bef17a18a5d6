"""Edges of the language and the compiler (issue 11, section 4): names, numbers and sizes at the
limits, build-time hyper-parameters, error positions, the file cache and the compiled-class store.

Each test failed before its fix; each builds small cells on both backends where it matters.
"""
from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

import rnndsl
from rnndsl import CellError
from rnndsl.cellspec import load_source
from rnndsl.codegen import validate_source
from rnndsl.ir import IRError

BACKENDS = ("eager", "script")


def cell_source(*lines: str) -> str:
    """A one-state cell ``c`` with a matrix ``W``, then ``lines``."""
    return "\n".join(["cell c(x[input]) -> h {", "  state h[hidden]", "  param W[hidden, input]",
                      *(f"  {line}" for line in lines), "}", ""])


def load(source: str) -> rnndsl.CellSpec:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rnndsl.CellWarning)
        return load_source(source)["c"]


@pytest.mark.parametrize("name", ["lambda_", "_", "_1", "x_", "a_b_"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_names_the_checker_accepts_build_and_compute(name, backend):
    spec = load(cell_source(f"{name} = tanh(W @ x)", f"h' = {name} + h"))
    cell = spec.build(3, 4, backend)
    xs, h = torch.randn(5, 2, 3), torch.zeros(2, 4)
    outputs, (final,) = cell.forward_sequence(xs, (h,))
    for x in xs:
        (h,), _ = cell((h,), x)
    torch.testing.assert_close(final, h)
    assert "__" not in cell.code


def test_trailing_underscore_hypers_params_and_states_build():
    spec = load(cell_source("hyper beta_ = 0.5", "param g_[hidden] = 1.0", "state s_[hidden]",
                            "s_' = tanh(W @ x) * g_", "h' = s_' * beta_ + h"))
    for backend in BACKENDS:
        spec.build(3, 4, backend)


def test_name_holding_double_underscore_is_a_cell_error_at_the_name():
    with pytest.raises(CellError) as error:
        load(cell_source("a__b = tanh(W @ x)", "h' = a__b"))
    assert (error.value.line, error.value.column) == (4, 3)
    assert "`__`" in error.value.message and "a_b" in error.value.hint


def test_keyword_hint_names_a_name_that_builds():
    with pytest.raises(CellError) as error:
        load(cell_source("lambda = tanh(W @ x)", "h' = lambda"))
    suggested = error.value.hint.split("`")[1]
    load(cell_source(f"{suggested} = tanh(W @ x)", f"h' = {suggested}")).build(3, 4, "script")


def test_guard_refuses_a_number_running_into_a_name():
    with pytest.raises(IRError, match="runs into"):
        validate_source("y = 1_seq\n")
    assert validate_source("y = 1.0 + x_1\n")


@pytest.mark.parametrize("declaration", ["param V[hidden, {}]", "size k = {}"])
def test_a_size_literal_of_thousands_of_digits_is_a_cell_error(declaration):
    with pytest.raises(CellError, match="number is too long") as error:
        load(cell_source(declaration.format("9" * 5000), "h' = tanh(W @ x)"))
    assert error.value.line == 4


def test_a_constant_init_beyond_float32_is_a_clear_error_at_build():
    spec = load(cell_source("param V[hidden] = 1e308", "h' = tanh(W @ x) * V"))
    with pytest.raises(ValueError, match="cell c: parameter V is declared `= 1e\\+308`, beyond the largest"):
        spec.build(3, 4, "eager")
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # where the number fits, it is the init
    try:
        assert spec.build(3, 4, "eager").V[0].item() == 1e308
    finally:
        torch.set_default_dtype(saved)


@pytest.mark.parametrize("shape, needed", [("2000000000, 2000000000", "16,000,000,000,000,000,048 bytes"),
                                            ("hidden*100000000, 100000000", "160,000,000,000,000,048 bytes")])
def test_parameters_no_memory_could_hold_are_refused_with_the_bytes_needed(shape, needed):
    spec = load(cell_source(f"param V[{shape}]", "h' = tanh(W @ x)"))
    with pytest.raises(ValueError, match=f"cell c: .*would hold .* numbers, {needed} in torch.float32"):
        spec.build(3, 4, "eager")


def test_an_allocation_that_fails_names_the_cell_and_the_bytes(monkeypatch):
    spec = load(cell_source("param V[hidden, 1000]", "h' = tanh(W @ x)"))

    def refuse(*shape, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
    monkeypatch.setattr(torch, "empty", refuse)
    with pytest.raises(MemoryError, match=r"cell c: parameter W of shape \[4, 3\] needs 48 bytes"):
        spec.build(3, 4, "eager")


def test_size_coefficients_beyond_int64_are_a_cell_error_not_a_script_failure():
    big = "99999999999999999999"
    with pytest.raises(CellError, match="is too large: its numbers may be at most 2,147,483,647") as error:
        load(cell_source(f"param U[{big}*hidden - {big}*input + hidden, input]", "h' = tanh(W @ x)"))
    assert (error.value.line, error.value.column) == (4, 11)
    # Numbers that cancel are fine: the size is what they leave.
    spec = load(cell_source(f"param U[hidden + {big}*input - {big}*input, input]", "h' = tanh(U @ x + W @ x)"))
    spec.build(3, 4, "script")


ZONEOUT_CELL = cell_source("hyper p = 0.1", "hyper k = 2.0", "h' = zoneout(tanh(W @ x) * k, h, p)")


@pytest.mark.parametrize("hyper, value, words", [
    ("p", 1.5, "hyper-parameter p is a probability of dropout or zoneout and must lie between 0 and 1"),
    ("p", -0.25, "between 0 and 1"),
    ("k", float("inf"), "hyper-parameter k must be a finite number"),
    ("k", float("nan"), "must be a finite number"),
    ("k", "2.0", "hyper-parameter k must be a number, got '2.0'"),
    ("p", "abc", "hyper-parameter p must be a number"),
    ("k", True, "must be a number, got True"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_hypers_given_at_build_are_checked_as_file_defaults(hyper, value, words, backend):
    with pytest.raises(ValueError, match="cell c: ") as error:
        load(ZONEOUT_CELL).build(3, 4, backend, **{hyper: value})
    assert words in str(error.value)


def test_hypers_given_at_build_within_their_range_are_used():
    cell = load(ZONEOUT_CELL).build(3, 4, "script", p=1, k=3)
    assert (cell.p, cell.k) == (1.0, 3.0)
    cell.train()
    state = (torch.randn(2, 4),)
    (h,), _ = cell(state, torch.randn(2, 3))
    torch.testing.assert_close(h, state[0])  # p = 1: zoneout keeps every unit


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_hyper_set_after_build_survives_deepcopy_and_save(backend, tmp_path):
    spec = load(cell_source("hyper beta = 0.5", "h' = tanh(W @ x) * beta"))
    cell = spec.build(3, 4, backend)
    cell.beta = 0.25
    state, x = (torch.zeros(2, 4),), torch.randn(2, 3)
    expected = cell(state, x)[1]
    torch.testing.assert_close(expected, torch.tanh(x @ cell.W.T) * 0.25)
    torch.save(cell, tmp_path / "cell.pt")
    for copied in (copy.deepcopy(cell), torch.load(tmp_path / "cell.pt", weights_only=False)):
        assert copied.beta == 0.25
        torch.testing.assert_close(copied(state, x)[1], expected)


@pytest.mark.parametrize("make", [rnndsl.make_recurrent, rnndsl.make_bidirectional])
@pytest.mark.parametrize("backend", BACKENDS)
def test_default_network_init_keeps_the_values_a_cell_declares(make, backend):
    network = make("layernorm_lstm", 3, [4, 5], backend=backend)
    gains = {name: p for name, p in network.named_parameters() if name.endswith("_weight") and "layernorm" in name}
    biases = {name: p for name, p in network.named_parameters() if name.endswith("_bias") and "layernorm" in name}
    assert gains and biases
    for parameter in gains.values():
        assert torch.equal(parameter, torch.ones_like(parameter))
    for parameter in biases.values():
        assert torch.equal(parameter, torch.zeros_like(parameter))
    weights = [p for name, p in network.named_parameters() if "weight_ih" in name]
    assert all(0 < p.abs().max() <= 0.1 for p in weights)


def test_matmul_shape_error_names_the_columns_the_vector_needs():
    with pytest.raises(CellError) as error:
        load(cell_source("param U[hidden, hidden]", "h' = tanh(U @ x)"))
    assert "needs input columns to match, it has hidden" in error.value.message
    assert (error.value.line, error.value.column) == (5, 13)


@pytest.mark.parametrize("declaration, column, hint", [
    ("hyper beta", 13, "`beta` needs a default value, as in `hyper beta = 0.5`"),
    ("size k", 9, "`k` needs a value, as in `size k = 4`"),
])
def test_a_declaration_cut_short_is_reported_at_its_own_line(declaration, column, hint):
    with pytest.raises(CellError) as error:
        load(cell_source(declaration, "h' = tanh(W @ x)"))
    assert (error.value.line, error.value.column) == (4, column)
    assert error.value.hint == hint


@pytest.mark.parametrize("declaration, column", [("buffer s[] =", 15), ("param s[hidden] =", 20)])
def test_a_default_cut_short_after_its_equals_sign_is_reported_there(declaration, column):
    """It was reported at the next line's `h'`, with the hint that next-state names go on the left of `=`."""
    with pytest.raises(CellError) as error:
        load(cell_source(declaration, "", "h' = tanh(W @ x)"))
    assert (error.value.line, error.value.column) == (4, column)
    assert error.value.message.startswith("the line ends after `=`")
    assert error.value.hint == "a value must follow `=`, as in `= 1.0`"
    # An equation may go on at the next line: one cut short there is not told to give `= 1.0`.
    with pytest.raises(CellError) as error:
        load(cell_source("h' =", "}"))
    assert error.value.message.startswith("unexpected `}`")


def test_a_matrix_multiplied_by_a_product_suggests_parentheses():
    with pytest.raises(CellError) as error:
        load(cell_source("param U[hidden, hidden]", "h' = W @ x * U @ h"))
    assert "`a * (U @ v)`" in error.value.hint
    load(cell_source("param U[hidden, hidden]", "h' = W @ x * (U @ h)"))


@pytest.mark.parametrize("separator", ["\f", "\v", "\x85", "\u2028", "\r"])
def test_quoted_line_is_the_error_line_after_odd_line_breaks_in_a_comment(separator):
    source = cell_source(f"# a comment{separator}with an odd break", "h' = tanhh(W @ x)")
    with pytest.raises(CellError) as error:
        load(source)
    assert error.value.line == 5
    assert "h' = tanhh(W @ x)" in str(error.value).splitlines()[1]


def test_quoted_line_of_a_windows_file_has_no_stray_character():
    with pytest.raises(CellError) as error:
        load(cell_source("h' = tanhh(W @ x)").replace("\n", "\r\n"))
    assert str(error.value).splitlines()[1] == "      h' = tanhh(W @ x)"


def test_a_same_size_rewrite_with_the_mtime_kept_loads_the_new_equations(tmp_path):
    path = tmp_path / "c.cell"
    path.write_text(cell_source("h' = tanh(W @ x)"))
    assert "torch.tanh" in rnndsl.load_cell(path).code()
    stat = path.stat()
    path.write_text(cell_source("h' = relu(W @ x)"))  # as long as the first
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    assert "torch.relu" in rnndsl.load_cell(path).code()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_fixed_dropout_mask_of_a_parameter_vector_has_its_shape(backend):
    spec = load(cell_source("param g[hidden] = 1.0", "param b[hidden] = 0.0",
                            "h' = layernorm(tanh(W @ x) + h, dropout(g, 0.5), b)"))
    cell = spec.build(3, 64, backend, fixed_dropout_mask=True).train()
    xs = torch.randn(6, 2, 3, requires_grad=True)
    outputs, _ = cell.forward_sequence(xs, (torch.zeros(2, 64),))
    outputs.sum().backward()
    dropped = outputs == 0
    assert dropped.any() and not dropped.all()
    assert (dropped == dropped[0, 0]).all()  # one mask: every step, every example


def test_training_forward_keeps_tanh_relatively_accurate_for_tiny_arguments():
    spec = load(cell_source("h' = 4 * tanh((W @ x + h) / 4)"))  # soft-capped: tanh of small values
    cell = spec.build(3, 8, "script")
    xs, h = 1e-6 * torch.randn(7, 2, 3), (torch.zeros(2, 8),)
    with torch.no_grad():
        expected, _ = cell.forward_sequence(xs, h)
    trained, _ = cell.forward_sequence(xs.requires_grad_(True), h)  # the derived backward's saving forward
    torch.testing.assert_close(trained, expected, rtol=1e-5, atol=0)


GATES_3_2 = """
cell c(x[input]) -> h {
    state h[hidden]
    param W1[hidden, input], W2[hidden, input]
    param U1[hidden, hidden], U2[hidden, hidden], U3[hidden, hidden]
    p = W1 @ x + U1 @ h
    q = W2 @ x + U2 @ h
    r = U3 @ h
    h' = tanh(p) * sigmoid(q) + 0.1 * r
}
"""


@pytest.mark.parametrize("disable", [(), ("cse",)])
def test_the_derived_backward_of_gates_merged_beside_a_recurrent_only_product(disable):
    """Three recurrent GEMMs merged, two of them also reading x: the input's gradient took the
    merged buffer (3 * hidden wide) as the gradient of the two gates (2 * hidden), a shape error
    whenever x needed a gradient (any layer above the first)."""
    spec = load(GATES_3_2)
    torch.manual_seed(0)
    eager = spec.build(3, 4, backend="eager", disable=disable).double()
    script = spec.build(3, 4, disable=disable).double()
    script.load_state_dict(eager.state_dict())
    xs, state = torch.randn(5, 2, 3, dtype=torch.float64), (torch.randn(2, 4, dtype=torch.float64),)
    found = []
    for cell in (eager, script):
        x = xs.clone().requires_grad_()
        outputs, _ = rnndsl.scan(cell, x, state)
        found.append(torch.autograd.grad(outputs.square().sum(), [x, *cell.parameters()]))
    for want, got in zip(*found):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("random", ["dropout(enc, 0.1)", "zoneout(tanh(enc), enc, 0.5)"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_ops_of_a_per_sequence_input_are_drawn_per_step(random, backend):
    """A draw of a per-sequence value (no time axis) was made with the all-steps values and read
    back one row per step: step t got example t's row, silently (batch > T), or an IndexError."""
    spec = load_source("cell c(x[input], enc[hidden] per sequence) -> h {\n  state h[hidden]\n"
                       f"  param W[hidden, input]\n  h' = tanh(W @ x + h) + {random}\n}}\n")["c"]
    torch.manual_seed(0)
    cell = spec.build(3, 4, backend=backend).double().eval()
    xs, enc = torch.randn(3, 6, 3, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    state = (torch.zeros(6, 4, dtype=torch.float64),)
    outputs, _ = rnndsl.scan(cell, xs, state, enc=enc)
    stepped = []
    for x in xs:
        state, y = cell(state, x, enc=enc)
        stepped.append(y)
    torch.testing.assert_close(outputs, torch.stack(stepped))
    cell.train()
    assert rnndsl.scan(cell, torch.randn(9, 2, 3, dtype=torch.float64), (torch.zeros(2, 4, dtype=torch.float64),),
                       enc=enc[:2])[0].shape == (9, 2, 4)  # T > batch: was an IndexError


@pytest.mark.parametrize("text, message", [
    ("cell c(x[input], mask[hidden]) -> h {\n  state h[hidden]\n  h' = h * mask\n}\n",
     "`mask` cannot name an input besides the first"),
    ("cell c(x[input], lengths[hidden]) -> h {\n  state h[hidden]\n  h' = h * lengths\n}\n",
     "`lengths` cannot name an input besides the first"),
    ("cell c(x[input]) -> y {\n  size heads = 2\n  state S[heads, hidden]\n  param W[hidden, input], "
     "P[heads, hidden]\n  S' = tanh(S)\n  y = concat(S', P) @ (W @ x)\n}\n",
     "concat stacks matrices that are parameters"),
])
def test_declarations_and_shapes_the_calls_could_not_take(text, message):
    with pytest.raises(CellError, match=message):
        load_source(text)


@pytest.mark.parametrize("lines, build, message", [
    (["hyper p = 0.5", "h' = tanh(W @ x + dropout(h, 2 * p + 0.25))"], {}, "has the probability 1.25"),
    (["hyper p = 0.25", "h' = zoneout(tanh(W @ x), h, 1 - p)"], {"p": -0.5}, "has the probability 1.5"),
    (["hyper tau = 4.0", "h' = h + (tanh(W @ x) - h) / tau"], {"tau": 0.0}, "divides by zero"),
])
def test_numbers_computed_from_hyper_parameters_are_checked_at_build(lines, build, message):
    """A computed dropout probability failed at the first call (zoneout above 1 kept every old value,
    silently); a division by a zero hyper-parameter gave inf in the loop, a ZeroDivisionError in the
    parallel scan."""
    with pytest.raises(ValueError, match=message):
        load(cell_source(*lines)).build(3, 4, **build)


def test_a_chunkwise_cell_takes_a_batch_of_no_sequence():
    for name in ("gla", "mamba2"):
        cell = rnndsl.load_cell(name).build(4, 4)
        outputs, _ = rnndsl.scan(cell, torch.randn(3, 0, 4), tuple(torch.zeros(0, s) for s in cell.state_sizes))
        assert outputs.shape == (3, 0, 4)


def test_a_batch_first_network_quotes_a_wrong_per_step_input_in_the_callers_layout():
    spec = load_source("cell c(x[input], u[extra]) -> h {\n  state h[hidden]\n  param W[hidden, input], "
                       "V[hidden, extra]\n  h' = tanh(W @ x + V @ u + h)\n}\n")["c"]
    net = rnndsl.make_recurrent(spec, 3, [4], extra=2, batch_first=True, save_hidden=False)
    with pytest.raises(ValueError, match=r"input u: expected \(batch, T, n\) = \(2, 5, 2\) with batch_first=True, "
                                         r"got \(5, 2, 2\)"):
        net(torch.randn(2, 5, 3), u=torch.randn(5, 2, 2))
    assert net(torch.randn(2, 5, 3), u=torch.randn(2, 5, 2))[0].shape == (2, 5, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zoneout_of_a_per_example_value_beside_a_per_step_one_draws_at_every_step(backend):
    """`zoneout(enc, W @ x, p)`: the draw had the per-example value's shape, so the all-steps
    form reused one draw at every step."""
    spec = load_source("cell c(x[input], enc[hidden] per sequence) -> h {\n  state h[hidden]\n"
                       "  param W[hidden, input]\n  h' = zoneout(enc, W @ x, 0.5) + 0 * h\n}\n")["c"]
    cell = spec.build(3, 64, backend=backend).train()
    outputs, _ = rnndsl.scan(cell, torch.ones(6, 2, 3), (torch.zeros(2, 64),), enc=torch.full((2, 64), 7.0))
    kept = outputs == 7.0  # the units that kept enc at each step
    assert not all(torch.equal(kept[0], step) for step in kept[1:])


def test_a_division_in_dead_code_is_not_checked():
    load(cell_source("hyper tau = 4.0", "k = h / tau", "h' = tanh(W @ x + h)")).build(3, 4, tau=0.0)


def test_a_one_row_product_beside_a_full_bias_runs_on_both_backends():
    """`W[1, input] @ x + b[hidden]` (a one-unit vector broadcast over the bias) was folded into one
    GEMM adding b, which fails for a one-row weight: the script backend's sequence raised."""
    spec = load("cell c(x[input]) -> h {\n  state h[hidden]\n  param W[1, input], U[hidden, hidden], b[hidden]\n"
                "  h' = tanh(W @ x + b + U @ h)\n}\n")
    torch.manual_seed(0)
    cells = [spec.build(3, 4, backend=backend).double() for backend in BACKENDS]
    cells[1].load_state_dict(cells[0].state_dict())
    xs, h = torch.randn(5, 2, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    results = []
    for cell in cells:
        outputs, _ = cell.forward_sequence(xs, (h,))
        results.append([outputs, *torch.autograd.grad(outputs.square().sum(), list(cell.parameters()))])
    torch.testing.assert_close(results[1], results[0], rtol=1e-10, atol=1e-12)
    step = torch.tanh(xs[0] @ cells[0].W.T + cells[0].b + h @ cells[0].U.T)  # the equation, by hand
    torch.testing.assert_close(results[0][0][0], step, rtol=1e-10, atol=1e-12)


def test_a_huge_integer_hyper_and_a_buffer_beyond_float32_are_clear_errors():
    """An int beyond any float (math.isfinite's OverflowError) and a buffer declared 1e39 (torch.full's
    "value cannot be converted to type float") were bare tracebacks at build."""
    with pytest.raises(ValueError, match="hyper-parameter beta must be a finite number"):
        rnndsl.load_cell("janet").build(3, 4, beta=10 ** 400)
    spec = load(cell_source("buffer s[hidden] = 1e39", "h' = tanh(W @ x) * s"))
    with pytest.raises(ValueError, match=r"buffer s is declared `= 1e\+39`, beyond the largest torch.float32"):
        spec.build(3, 4)


@pytest.mark.parametrize("declaration, position, words", [
    ("param b[hidden - hidden]", (4, 11), "size is 0 whatever the sizes given at build"),
    ("param b[2 - 3]", (4, 11), "size is -1 whatever the sizes given at build"),
    ("param b[1 - hidden]", (4, 11), "is at most 0 whatever the sizes given at build"),
])
def test_a_dim_that_no_build_can_make_positive_is_refused_at_load(declaration, position, words):
    """It loaded and `rnndsl check` said ok; build then refused it without a position."""
    with pytest.raises(CellError, match=words) as error:
        load(cell_source(declaration, "h' = tanh(W @ x)"))
    assert (error.value.line, error.value.column) == position


def test_the_first_input_cannot_be_a_multiple_of_its_own_size():
    """`x[2*input]` loaded; build then asked input_size = 2 * input_size, which nothing satisfies."""
    with pytest.raises(CellError, match="the first input's first dim is `input` itself") as error:
        load(cell_source("h' = tanh(W @ x)").replace("x[input]", "x[2*input]"))
    assert (error.value.line, error.value.column) == (1, 10)


def test_load_source_takes_bytes_and_refuses_what_is_no_text_and_twice_named_outputs():
    """bytes gave "cannot use a string pattern on a bytes-like object", None a bare TypeError, and
    `-> h, h` loaded as two outputs of one value."""
    source = cell_source("h' = tanh(W @ x)")
    assert list(load_source(source.encode())) == ["c"]
    with pytest.raises(CellError, match="file is not valid UTF-8"):
        load_source(b"\xff" + source.encode())
    with pytest.raises(TypeError, match="load_source takes the text of a .cell file, got NoneType"):
        load_source(None)
    with pytest.raises(CellError, match=r"output `h` is named twice \(first at line 1\)") as error:
        load(source.replace("-> h", "-> h, h"))
    assert (error.value.line, error.value.column) == (1, 24)
