"""Fuzzing the cell language, and the compiler under threads and many distinct cells.

- token soup and mutated cells raise only CellError, each within a hang guard
  (a mutated cell that is accepted must also build and run);
- random well-formed cells (tests/strategies.py) compile on both backends and
  agree in float64, forward and gradients, step and sequence;
- building from several threads at once is safe; the compiler's caches stay
  bounded however many distinct cells are built.

Raise the number of examples with HYPOTHESIS_PROFILE=thorough.
"""
from __future__ import annotations

import gc
import re
import itertools
import linecache
import threading
import warnings
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rnndsl
from rnndsl import CellError, cellspec, compile
from rnndsl.codegen import validate_source
from strategies import DrawnCell, linear_cells, mutated_cells, token_soup, well_formed_cells
from test_hostile import hang_guard


def examples(count: int) -> int:
    """``count`` examples, or more under a more thorough profile."""
    return max(count, settings.default.max_examples)


def load(source: str, path: str = "fuzz.cell"):
    with warnings.catch_warnings(), hang_guard():
        warnings.simplefilter("ignore")  # unused values are legal
        return rnndsl.load_source(source, path)


def assert_positioned(error: CellError) -> None:
    assert error.file and error.line >= 1 and error.column >= 1, str(error)
    assert str(error).startswith(f"{error.file}:{error.line}:{error.column}: error: ")


@settings(max_examples=examples(300))
@given(token_soup())
def test_token_soup_raises_only_cell_error(text):
    try:
        cells = load(text)
    except CellError as error:
        assert_positioned(error)
        return
    for spec in cells.values():  # the rare soup that is a cell must build
        spec.build(2, 3, backend="eager")


_files = itertools.count()


@settings(max_examples=examples(100))
@given(st.binary(max_size=200) | st.lists(st.sampled_from([b"cell", b"\xff", b"\x00", b"{", b"\xc3", b"(",
                                                           b"\xe2\x80\xae", b"\n", b" "])).map(b"".join))
def test_random_bytes_in_a_file_raise_only_cell_error(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / f"bytes{next(_files)}.cell"
    path.write_bytes(data)
    with pytest.raises(CellError) as caught, hang_guard():
        rnndsl.load_cell(path)
    assert_positioned(caught.value)


@settings(max_examples=examples(150))
@given(mutated_cells(), st.integers(1, 4), st.integers(1, 4))
def test_mutated_cells_raise_only_cell_error_or_work(text, input_size, hidden_size):
    _loads_and_runs_or_is_refused(text, input_size, hidden_size, "eager")


@settings(max_examples=examples(40), deadline=None)
@given(mutated_cells(stock=True), st.integers(1, 4), st.integers(1, 4), st.sampled_from(["eager", "script"]))
def test_mutated_stock_cells_raise_only_cell_error_or_work(text, input_size, hidden_size, backend):
    """The stock cells hold every feature of the language; a mutant that loads must build, step,
    run a sequence and train on both backends (a comparison reaching a matmul, a one-row weight
    beside a full bias: found by a longer run of this, 9,700 mutants)."""
    _loads_and_runs_or_is_refused(text, input_size, hidden_size, backend)


def _loads_and_runs_or_is_refused(text: str, input_size: int, hidden_size: int, backend: str) -> None:
    """A CellError at a position, or cells that build (or refuse these sizes naming the cell), step,
    run a sequence with a float output and take its gradient."""
    try:
        cells = load(text)
    except CellError as error:
        assert_positioned(error)
        return
    for spec in cells.values():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", rnndsl.CellWarning)
                cell = spec.build(input_size, hidden_size, backend=backend)
        except ValueError as error:  # sizes that cannot hold for this build, e.g. input_size != hidden_size
            assert spec.name in str(error)
            continue
        if cell.extra_inputs:
            continue
        state = tuple(torch.randn(2, size) for size in cell.state_sizes)
        cell(state, torch.randn(2, cell.input_size))  # a spatial cell's input: its images, flat
        state = tuple(part.requires_grad_() for part in state)
        outputs, _ = cell.forward_sequence(torch.randn(3, 2, cell.input_size, requires_grad=True), state)
        outputs = _flatten(outputs)
        assert all(output.is_floating_point() for output in outputs)
        loss = sum(output.sum() for output in outputs)
        if loss.requires_grad:  # an output may be a constant of the cell (`h' = 1`), with nothing to differentiate
            loss.backward()


def _inputs(cell, batch: int, steps: int):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(steps, batch, cell.input_size, dtype=torch.float64, generator=generator)
    state = tuple(torch.randn(batch, size, dtype=torch.float64, generator=generator)
                  for size in cell.state_sizes)
    mask = torch.rand(steps, batch, generator=generator) < 0.7
    return x, state, mask


def _flatten(value):
    if isinstance(value, torch.Tensor):
        return [value]
    return [tensor for item in value for tensor in _flatten(item)]


def _run(cell, x, state, mask, only=None):
    """Step and sequence results of a cell, and gradients of their weighted sum (or of result ``only``)."""
    x = x.clone().requires_grad_(True)
    state = tuple(s.clone().requires_grad_(True) for s in state)
    step = _flatten(cell(state, x[0]))
    sequence = _flatten(cell.forward_sequence(x, state, mask)) + _flatten(cell.forward_sequence(x, state))
    results = step + sequence
    weights = torch.Generator().manual_seed(1)
    chosen = results if only is None else [results[only % len(results)]]
    total = sum((r * torch.rand(r.shape, dtype=r.dtype, generator=weights)).sum() for r in chosen)
    inputs = [x, *state, *cell.parameters()]
    grads = torch.autograd.grad(total, inputs, allow_unused=True)
    return results, [g if g is not None else torch.zeros_like(i) for g, i in zip(grads, inputs)]


@settings(max_examples=examples(25))
@given(well_formed_cells(), st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.integers(1, 4),
       st.integers(1, 3), st.integers(0, 20))
def test_random_well_formed_cells_agree_on_both_backends(cell: DrawnCell, input_size, hidden_size, batch, steps,
                                                         extra_size, only):
    spec = load(cell.source)[cell.name]
    assert validate_source(spec.code()) == spec.code()
    sizes = {name: extra_size for name in cell.extra_sizes}  # override the declared defaults
    eager = spec.build(input_size, hidden_size, backend="eager", **sizes).double().eval()
    scripted = spec.build(input_size, hidden_size, backend="script", **sizes).double().eval()
    scripted.load_state_dict(eager.state_dict())
    x, state, mask = _inputs(eager, batch, steps)
    # Gradients of all results, then of one: some values get no gradient. Each runs twice, since
    # TorchScript's profiling executor specializes (and once broke chunk's derivative) on the second call.
    for chosen in (None, only):
        expected = _run(eager, x, state, mask, chosen)
        for _ in range(2):
            got = _run(scripted, x, state, mask, chosen)
            for a, b in zip(got[0] + got[1], expected[0] + expected[1]):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, equal_nan=True)


@settings(max_examples=examples(25))
@given(linear_cells(), st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.integers(1, 9))
def test_random_linear_cells_run_as_a_parallel_scan_equal_to_the_loop(cell: DrawnCell, input_size, hidden_size,
                                                                      batch, steps):
    """Every drawn cell is linear in its states: both backends take scan="parallel" and agree with
    the compiled loop and its derived backward, values and gradients, with and without a mask."""
    spec = load(cell.source)[cell.name]
    loop = spec.build(input_size, hidden_size, scan="sequential").double().eval()
    x, state, mask = _inputs(loop, batch, steps)
    expected = _run(loop, x, state, mask)
    for backend in ("script", "eager"):
        parallel = spec.build(input_size, hidden_size, backend=backend, scan="parallel").double().eval()
        parallel.load_state_dict(loop.state_dict())
        got = _run(parallel, x, state, mask)
        for a, b in zip(got[0] + got[1], expected[0] + expected[1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, equal_nan=True)


def test_scripted_lstm_trains_on_its_cell_state_alone():
    """Found by the test above: a loss of c alone left the o gate without gradient, and the
    scripted cell failed from its second backward (TorchScript's derivative of chunk)."""
    cell = rnndsl.load_cell("lstm").build(4, 3, backend="script")
    for _ in range(3):
        x = torch.randn(2, 2, 4, requires_grad=True)
        _, (h, c) = cell.forward_sequence(x, (torch.zeros(2, 3), torch.zeros(2, 3)))
        (grad,) = torch.autograd.grad(c.sum(), x)
        assert torch.isfinite(grad).all()


# Threads and caches ------------------------------------------------------------

def _cell_source(index: int) -> str:
    return (f"cell c{index}(x[input]) -> h {{\n    state h[hidden]\n    param W[hidden, input], U[hidden, hidden]\n"
            f"    h' = tanh(W @ x + U @ h) * {index + 1}.0\n}}\n")


@pytest.mark.parametrize("backend", ["script", "eager"])
def test_building_the_same_cell_from_threads_is_safe(backend, tmp_path):
    # A cell no other test built: the threads race on parsing, code generation and compilation.
    path = tmp_path / "threads.cell"
    path.write_text(_cell_source(10_000 + (backend == "eager")))
    torch.manual_seed(0)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    h0 = (torch.zeros(3, 6, dtype=torch.float64),)
    start = threading.Barrier(6)
    results, errors = {}, []

    def work(index: int) -> None:
        try:
            start.wait()
            cell = rnndsl.load_cell(path).build(4, 6, backend=backend).double()
            with torch.no_grad():
                for parameter in cell.parameters():
                    parameter.copy_(torch.linspace(-0.5, 0.5, parameter.numel()).view_as(parameter))
            outputs, (h,) = cell.forward_sequence(x, h0)
            results[index] = (outputs, h, cell(h0, x[0])[1])
        except BaseException as error:  # report every failure from the threads, not just the first
            errors.append(error)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert len(results) == 6
    first = results[0]
    for outputs, h, y in results.values():
        assert torch.equal(outputs, first[0]) and torch.equal(h, first[1]) and torch.equal(y, first[2])


def test_caches_stay_bounded_over_300_distinct_cells(tmp_path):
    caches = [compile._optimized, compile._source, compile._module_class, compile.cell_class,
              cellspec._load_file]
    classes = []
    for index in range(300):
        path = tmp_path / f"c{index}.cell"
        path.write_text(_cell_source(index))
        cell = rnndsl.load_cell(path).build(2, 3, backend="eager")
        classes.append(weakref.ref(type(cell)))
    gc.collect()
    for cache in caches:
        info = cache.cache_info()
        assert info.currsize <= info.maxsize, (cache.__name__, info)
    bound = max(cache.cache_info().maxsize for cache in caches)
    alive = sum(ref() is not None for ref in classes)
    registered = sum(1 for name in linecache.cache if re.match(r"<rnndsl c\d+ ", name))  # this test's cells
    assert alive <= bound, alive
    assert registered <= 2 * bound, registered  # generated sources leave linecache with their classes


def test_a_scripted_cell_built_again_after_its_class_left_the_cache_reuses_it():
    """TorchScript keeps every class it compiles: a cell built again after its class left
    _module_class's bounded cache must reuse the compiled class, or each round over more cells
    than the cache holds would compile (and keep) a new copy of every one (~35 MB a round over
    160 cells before)."""
    spec = rnndsl.load_source(_cell_source(7001))["c7001"]
    first = spec.build(2, 3, backend="script")
    compile._module_class.cache_clear()
    second = spec.build(2, 3, backend="script")
    assert second._python_methods is first._python_methods
    assert second.kernel()._c._type() == first.kernel()._c._type()  # one TorchScript class, compiled once


def test_cells_alike_in_code_but_not_in_constants_do_not_share_a_class(tmp_path):
    """The same equations, one file declaring an unused hyper-parameter: the same generated text,
    but not the same class, whose constants (read under torch.export) differ."""
    body = "    state h[hidden]\n    param W[hidden, input]\n    h' = tanh(W @ x + h)\n}\n"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.cell").write_text("cell x(x[input]) -> h {\n    hyper beta = 0.5\n" + body)
    (tmp_path / "b" / "x.cell").write_text("cell x(x[input]) -> h {\n" + body)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unused hyper-parameter
        first = rnndsl.load_cell(tmp_path / "a" / "x.cell").build(3, 4)
    second = rnndsl.load_cell(tmp_path / "b" / "x.cell").build(3, 4)
    assert first._python_methods is not second._python_methods
    view = rnndsl.twin.bound_view(second)  # reads every constant of its class from the cell
    assert not hasattr(view, "beta")
