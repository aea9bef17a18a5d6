"""Spatial cells: inputs and states over [channels, height, width], and ``conv(K, v)``.

The stock cells convlstm and convgru against hand-written references (tests/references.py,
``SPATIAL_REFERENCES``): outputs, next states and the gradients of the input, the state and
every parameter, in float64, on both backends (the script backend trains through the derived
backward), for one step, over masked sequences and in a network given lengths. They live here,
not in tests/test_zoo.py, because their input is an image of drawn height and width, not a
vector. Then the language: positioned errors, the hoisted input convolution, the shapes a cell
refuses at run time, pickling and the command line.
"""
from __future__ import annotations

import functools
import io
import pickle
from contextlib import redirect_stdout

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs

import rnndsl
from rnndsl.cli import main
from rnndsl.ir import Op, Phase
from references import SPATIAL_REFERENCES, compare_with_reference, random_parameters, reference_scan

BACKENDS = ["script", "eager"]
TOLERANCE = dict(rtol=1e-10, atol=1e-12)


@functools.lru_cache(maxsize=None)
def built(name: str, channels: int, hidden: int, height: int, width: int, kernel: int, backend: str):
    return rnndsl.load_cell(name).build(channels, hidden, backend, height=height, width=width,
                                        kernel_size=kernel).double()


@hs.composite
def problems(draw) -> dict:
    return dict(channels=draw(hs.integers(1, 3)), hidden=draw(hs.integers(1, 3)), height=draw(hs.integers(1, 5)),
                width=draw(hs.integers(1, 5)), kernel=draw(hs.sampled_from([1, 3, 5])), batch=draw(hs.integers(1, 3)),
                steps=draw(hs.integers(1, 4)), masked=draw(hs.booleans()), seed=draw(hs.integers(0, 2 ** 31 - 1)))


def _compare(name: str, problem: dict, backend: str, sequence: bool) -> None:
    p = problem
    cell = built(name, p["channels"], p["hidden"], p["height"], p["width"], p["kernel"], backend)
    assert cell.input_size == p["channels"] * p["height"] * p["width"]
    reference = functools.partial(SPATIAL_REFERENCES[name], height=p["height"], width=p["width"])
    compare_with_reference(cell, reference, batch=p["batch"], steps=p["steps"], masked=p["masked"], seed=p["seed"],
                           sequence=sequence, tolerance=TOLERANCE, label=f"{name} {backend}")


@pytest.mark.parametrize("name", sorted(SPATIAL_REFERENCES))
@settings(max_examples=6, deadline=None)
@given(problem=problems())
def test_spatial_cell_matches_reference(name: str, problem: dict) -> None:
    for backend in BACKENDS:
        _compare(name, problem, backend, sequence=False)
        _compare(name, problem, backend, sequence=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(SPATIAL_REFERENCES))
def test_a_network_of_a_spatial_cell_takes_lengths(name: str, backend: str) -> None:
    """Padded sequences of different lengths: the outputs past a length are zero and the final
    state is the one at each sequence's end, as the reference run under the lengths' mask."""
    net = rnndsl.make_recurrent(name, 2, [3], backend=backend, height=4, width=3).double()
    (cell,) = [m for m in net.modules() if hasattr(m, "state_sizes") and hasattr(m, "cell_name")]
    params = random_parameters(cell, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    xs = torch.randn(5, 3, 2 * 4 * 3, generator=generator, dtype=torch.float64)
    lengths = torch.tensor([5, 2, 4])
    output, state = net(xs, lengths=lengths)
    mask = torch.arange(5)[:, None] < lengths[None, :]
    zeros = tuple(torch.zeros(3, size, dtype=torch.float64) for size in cell.state_sizes)
    reference = functools.partial(SPATIAL_REFERENCES[name], height=4, width=3)
    want_output, want_final = reference_scan(reference, params, zeros, xs, mask)
    torch.testing.assert_close(output, want_output, **TOLERANCE)
    torch.testing.assert_close(state[0], want_final, **TOLERANCE)


# The language ---------------------------------------------------------------------------

def _error(source: str) -> rnndsl.CellError:
    with pytest.raises(rnndsl.CellError) as caught:
        rnndsl.load_source(source, "bad.cell")
    return caught.value


def _cell(body: str, kernel: str = "3") -> str:
    return f"""cell c(x[input, height, width]) -> h {{
    size height = 4
    size width = 5
    state h[hidden, height, width]
    param K[hidden, input, {kernel}, {kernel}], U[hidden, hidden, 3, 3]
{body}
}}
"""


def test_a_kernel_of_the_wrong_channels_is_an_error_at_the_conv():
    error = _error(_cell("    h' = tanh(conv(K, x) + conv(K, h) + conv(U, h))"))
    assert (error.line, error.column) == (6, 28)
    assert "[hidden, input, 3, 3] reads [input] channels" in error.message
    assert "[hidden, height, width] has [hidden]" in error.message


@pytest.mark.parametrize("body, words", [
    ("    h' = tanh(conv(U, h) + conv(x, K))", "first argument must be a kernel parameter"),
    ("    h' = tanh(conv(U, h) + conv(K, K))", "second argument must be a per-example spatial value"),
    ("    h' = tanh(K @ x + conv(U, h))", "write `conv(K, v)`"),
    ("    h' = tanh(conv(U, h) + conv(K, x) + conv(U, h) @ h)", "does not fit"),
])
def test_conv_of_the_wrong_shapes_says_what_it_takes(body, words):
    error = _error(_cell(body))
    assert error.line == 6 and words in error.message


def test_an_even_kernel_is_refused_by_the_checker_or_at_build():
    error = _error(_cell("    h' = tanh(conv(K, x) + conv(U, h))", kernel="2"))
    assert (error.line, error.column) == (6, 15) and "must be odd" in error.message
    spec = rnndsl.load_cell("convlstm")
    with pytest.raises(ValueError, match=r"conv's kernel `weight_x` would have shape \[12, 1, 4, 4\] with "
                                         r"kernel_size=4, .*must be odd"):
        spec.build(1, 3, kernel_size=4)


def test_input_size_is_the_channels_and_the_input_comes_flat():
    cell = rnndsl.load_cell("convgru").build(2, 3, height=4, width=5)
    assert (cell.input_size, cell.state_sizes, cell.output_size) == (40, [60], 60)
    with pytest.raises(ValueError, match=r"expected input of shape \(T, batch, 40\) \(its \[input=2, height=4, "
                                         r"width=5\] flattened\), got \(6, 3, 2, 4, 5\); flatten it with "
                                         r"x.flatten\(2\)"):
        cell.forward_sequence(torch.randn(6, 3, 2, 4, 5), (torch.zeros(3, 60),))
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, 40\) .*, got \(3, 39\)$"):
        cell((torch.zeros(3, 60),), torch.randn(3, 39))
    source = _cell("    h' = tanh(conv(K, x) + conv(U, h))").replace("input", "2*hidden")
    spec = rnndsl.load_source(source)["c"]
    with pytest.raises(ValueError, match=r"`x\[2\*hidden, height, width\]`, so input_size, the size of its first "
                                         r"dim, must be 2\*hidden_size = 6; got input_size=2"):
        spec.build(2, 3)


def test_spatial_layers_read_the_images_of_the_layer_below_as_they_are():
    """Per-layer image sizes that differ would read the same numbers as other images (8 x 8 as
    4 x 16, or 4 channels of 8 x 8 as 16 of 4 x 4): refused, naming both."""
    for height, width in [([8, 4], [8, 16]), ([8, 4], [8, 4])]:
        with pytest.raises(ValueError, match=r"reads images \[height=4, width=\d+\], but the layer below "
                                             r"outputs images of 8 x 8"):
            rnndsl.make_recurrent("convgru", 1, [4, 2], height=height, width=width)
    with pytest.raises(ValueError, match="the layer below outputs images of 4 x 4"):
        rnndsl.make_bidirectional("convlstm", 1, [4, 2], height=[4, 2], width=[4, 8])
    stacked = rnndsl.make_recurrent(["gru", "convgru", "gru"], 5, [32, 2, 3], height=[None, 4, None],
                                    width=[None, 2, None], save_hidden=False)  # vectors below and above
    assert stacked(torch.randn(3, 2, 5))[0].shape == (3, 2, 3)
    assert rnndsl.load_cell("convgru").build(2, 3, height=4, width=5).output_image == (4, 5)
    assert rnndsl.load_cell("gru").build(2, 3).output_image == ()


def test_the_input_convolution_runs_for_all_steps_at_once():
    graph = rnndsl.load_cell("convlstm").optimized()
    phases = {node.inputs[1]: node.phase for node in graph.nodes if node.op is Op.CONV}
    assert phases == {"x_view": Phase.PER_INPUT, "h_view": Phase.PER_STEP}
    code = rnndsl.load_cell("convlstm").code()
    assert "conv_seq = conv_same(self.weight_x, x_view_seq)" in code
    # The kernels' gradients: one convolution over every step's images each, after the loop.
    backward = rnndsl.load_cell("convlstm").backward_code()
    loop = backward[backward.index("for t in range(steps"):]
    assert loop.count("conv_same_weight_grad(") == 2
    assert all(line.startswith("    grad_") for line in loop.splitlines() if "conv_same_weight_grad(" in line)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_spatial_cell_pickles(backend):
    cell = rnndsl.load_cell("convlstm").build(1, 2, backend, height=3, width=4)
    again = pickle.loads(pickle.dumps(cell))
    xs, state = torch.randn(3, 2, 12), tuple(torch.randn(2, 24) for _ in range(2))
    for a, b in zip(rnndsl.scan(cell, xs, state), rnndsl.scan(again, xs, state)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("stage", ["ast", "ir", "code", "backward", "scan", "dot"])
def test_command_line_shows_every_stage_of_a_spatial_cell(stage):
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["show", str(rnndsl.load_cell("convgru").path), "--stage", stage]) == 0
    assert "conv" in out.getvalue()


def test_unflattened_frames_get_the_flatten_hint_at_every_entry():
    """scan and the networks gave only "expected a (T, batch, input) sequence" for frames; the
    hint to flatten them came from the cell's own method alone."""
    cell = rnndsl.load_cell("convgru").build(2, 3, height=3, width=4)
    frames = torch.randn(2, 1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"flatten it with x\.flatten\(2\)"):
        rnndsl.scan(cell, frames, (torch.zeros(1, 36),))
    with pytest.raises(ValueError, match=r"a spatial cell takes its images flat: x\.flatten\(2\)"):
        rnndsl.make_recurrent("convgru", 2, [3], height=3, width=4)(frames)
