"""Cells with several inputs: per-step ones (``y[extra]``) and per-sequence ones
(``enc[context] per sequence``), through the language, both backends, the derived backward,
hoisting, the scan, containers, networks and pickling.

The reference is an independent hand-written loop over the cell's equations (as
tests/references.py does for the stock cells), compared in float64 at 1e-10, forward and
gradients with respect to every input, the state and every parameter, with masks.
"""
import copy
import io
import re
import warnings
from pathlib import Path

import pytest
import torch

import rnndsl
from rnndsl import CellError, load_source


@pytest.fixture(autouse=True)
def float64():
    """Every tensor and parameter here in float64, restored afterwards for the other test files."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


SOURCE = """\
cell conditioned(x[input], enc[context] per sequence, y[extra]) -> out, h {
    state h[hidden], c[hidden]
    param weight_ih[4*hidden, input + context], weight_hh[4*hidden, hidden], bias[4*hidden]
    param weight_y[hidden, extra], weight_g[hidden, context]

    i, f, g, o = chunk(weight_ih @ concat(x, enc) + weight_hh @ h + bias, 4)
    gate = sigmoid(weight_g @ enc)
    c' = sigmoid(f) * c + sigmoid(i) * tanh(g + gate * (weight_y @ y))
    h' = sigmoid(o) * tanh(c')
    out = h' * gate
}
"""
T, B, INPUT, HIDDEN, CONTEXT, EXTRA = 5, 3, 4, 6, 7, 2


def spec():
    return load_source(SOURCE, "conditioned.cell")["conditioned"]


def reference(p, xs, ys, enc, state, mask):
    """The equations by hand, step by step: (outputs out, outputs h), final (h, c)."""
    h, c = state
    gate = torch.sigmoid(enc @ p["weight_g"].t())
    outs, hs = [], []
    for t in range(xs.size(0)):
        z = torch.cat([xs[t], enc], -1) @ p["weight_ih"].t() + h @ p["weight_hh"].t() + p["bias"]
        i, f, g, o = z.chunk(4, -1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g + gate * (ys[t] @ p["weight_y"].t()))
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        keep = mask[t].unsqueeze(1)
        outs.append(h_new * gate * keep)
        hs.append(h_new * keep)
        h, c = torch.where(keep, h_new, h), torch.where(keep, c_new, c)
    return (torch.stack(outs), torch.stack(hs)), (h, c)


def inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    def draw(*shape):
        return torch.randn(*shape, generator=generator).requires_grad_()
    mask = torch.ones(T, B, dtype=torch.bool)
    mask[3:, 1] = False
    mask[1:, 2] = False
    return draw(T, B, INPUT), draw(T, B, EXTRA), draw(B, CONTEXT), (draw(B, HIDDEN), draw(B, HIDDEN)), mask


@pytest.mark.parametrize("backend", ["eager", "script"])
@pytest.mark.parametrize("disable", [(), ("hoist",)])
def test_against_a_hand_written_loop(backend, disable):
    cell = spec().build(INPUT, HIDDEN, backend=backend, context=CONTEXT, extra=EXTRA, disable=disable)
    params = dict(cell.named_parameters())
    xs, ys, enc, state, mask = inputs()
    (out, hs), final = cell.forward_sequence(xs, state, mask, enc=enc, y=ys)
    (ref_out, ref_hs), ref_final = reference(params, xs, ys, enc, state, mask)
    weights = [torch.randn_like(v, generator=torch.Generator().manual_seed(5)) for v in (out, hs)]
    def loss(outs, final):
        return sum((o * w).sum() for o, w in zip(outs, weights)) + sum((s ** 2).sum() for s in final)
    wrt = [xs, ys, enc, *state, *params.values()]
    got = torch.autograd.grad(loss((out, hs), final), wrt)
    expected = torch.autograd.grad(loss((ref_out, ref_hs), ref_final), wrt)
    for a, b in zip((out, hs, *final), (ref_out, ref_hs, *ref_final)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    for name, a, b in zip(["xs", "y", "enc", "h0", "c0", *params], got, expected):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0, msg=name)


def test_the_scripted_cell_trains_through_the_derived_backward(monkeypatch):
    from rnndsl import derived
    calls = []
    original = derived.DerivedSequence.apply
    monkeypatch.setattr(derived.DerivedSequence, "apply", lambda *args: calls.append(args[3]) or original(*args))
    cell = spec().build(INPUT, HIDDEN, context=CONTEXT, extra=EXTRA)
    xs, ys, enc, state, mask = inputs()
    (out, _), _ = cell.forward_sequence(xs, state, mask, enc=enc, y=ys)
    out.sum().backward()
    assert calls == [(2, 2)] and enc.grad is not None and ys.grad is not None


@pytest.mark.parametrize("backend", ["eager", "script"])
def test_one_step_and_rnndsl_scan_agree_with_the_loop(backend):
    cell = spec().build(INPUT, HIDDEN, backend=backend, context=CONTEXT, extra=EXTRA)
    xs, ys, enc, state, mask = inputs()
    (out, hs), final = rnndsl.scan(cell, xs, state, mask, enc=enc, y=ys)
    (ref_out, _), ref_final = reference(dict(cell.named_parameters()), xs, ys, enc, state, mask)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=0)
    new_state, (step_out, _) = cell(state, xs[0], enc=enc, y=ys[0])
    torch.testing.assert_close(step_out, ref_out[0], atol=1e-10, rtol=0)


def test_the_per_sequence_projection_runs_once_per_sequence():
    graph = spec().optimized()
    text = str(graph)
    once = text.split("# once per sequence, per example")[1].split("#")[0]
    assert "matmul(weight_g, enc)" in once and "sigmoid" in once
    code = spec().code()
    sequence = code[code.index("def forward_sequence"):]
    projection = next(line for line in sequence.splitlines() if "self.weight_g)" in line)
    assert projection.startswith("    ") and not projection.startswith("        ")  # before the loop
    assert sequence.index(projection) < sequence.index("for t in range")
    assert "torch.cat([xs, enc.expand(" in sequence  # the input GEMM reads enc at every step, as a view
    backward = spec().backward_code()
    assert re.search(r"grad_enc = ", backward) and "for t in" in backward


@pytest.mark.parametrize("text, line, column, message", [
    ("cell c(enc[input] per sequence) -> h {\n state h[hidden]\n h' = h\n}", 1, 8, "cannot be `per sequence`"),
    ("cell c(x[input], x[hidden] per sequence) -> h {\n state h[hidden]\n h' = h\n}", 1, 18, "declared twice"),
    ("cell c(x[input], e[ctx] per step) -> h {\n state h[hidden]\n h' = h\n}", 1, 29, "drop `per step`"),
    ("cell c(x[input], e[hidden] per sequence) -> h {\n state h[hidden]\n e = h\n h' = e\n}", 3, 2,
     "cannot assign to `e`: it is the cell's input"),
    ("cell c(x[input], e[ctx] per sequence) -> h {\n state h[hidden]\n param W[hidden, ctx]\n"
     " h' = W @ e + ctx\n}", 4, 15, "`ctx` is a size"),
    ("cell c(x[input], e[hidden] per sequence) -> h {\n state h[hidden]\n h' = tanh(x + e)\n}", 3, 12,
     "input"),
])
def test_errors_name_line_and_column(text, line, column, message):
    with pytest.raises(CellError) as info:
        load_source(text, "bad.cell")
    error = info.value
    assert (error.line, error.column) == (line, column), str(error)
    assert message in str(error)


def test_an_unused_input_is_a_warning():
    with pytest.warns(rnndsl.CellWarning, match="input `e` is never used"):
        load_source("cell c(x[input], e[ctx] per sequence) -> h {\n state h[hidden]\n"
                    " param W[hidden, input]\n h' = tanh(W @ x)\n}", "unused.cell")


def test_input_sizes_are_set_at_build():
    with pytest.raises(TypeError, match=r"give the size context at build.*context=16"):
        spec().build(INPUT, HIDDEN, extra=EXTRA)
    cell = spec().build(INPUT, HIDDEN, context=CONTEXT, extra=EXTRA)
    assert cell.extra_inputs == {"enc": (CONTEXT, True), "y": (EXTRA, False)}
    assert cell.context == CONTEXT


@pytest.mark.parametrize("backend", ["eager", "script"])
def test_run_time_errors_name_expected_and_received_shapes(backend):
    cell = spec().build(INPUT, HIDDEN, backend=backend, context=CONTEXT, extra=EXTRA)
    xs, ys, enc, state, mask = inputs()
    with pytest.raises(ValueError, match=r"missing input enc, a tensor of shape \(3, 7\) read once per sequence"):
        cell.forward_sequence(xs, state, mask, y=ys)
    with pytest.raises(ValueError, match=r"expected input enc of shape \(3, 7\) .*got \(5, 3, 7\); enc is "
                                         r"declared `per sequence`"):
        cell.forward_sequence(xs, state, mask, enc=enc.expand(T, B, CONTEXT), y=ys)
    with pytest.raises(ValueError, match=r"expected input y of shape \(5, 3, 2\) \(read at every step\), got \(3, 2\)"):
        cell.forward_sequence(xs, state, mask, enc=enc, y=ys[0])
    with pytest.raises(ValueError, match=r"has no input named 'z': its other inputs are enc \(batch, 7\) once per "
                                         r"sequence, y \(T, batch, 2\) at every step"):
        cell.forward_sequence(xs, state, mask, enc=enc, y=ys, z=ys)
    with pytest.raises(ValueError, match=r"expected input y of shape \(3, 2\)"):
        cell(state, xs[0], enc=enc, y=ys)
    lstm = rnndsl.load_cell("lstm").build(INPUT, HIDDEN, backend=backend)
    with pytest.raises(ValueError, match="has no input named 'enc': it takes one input"):
        lstm(state, xs[0], enc=enc)


@pytest.mark.parametrize("backend", ["eager", "script"])
def test_networks_give_each_layer_the_inputs_its_cell_declares(backend, tmp_path):
    path = tmp_path / "layers.cell"
    path.write_text(SOURCE + """
cell plain(x[input]) -> h {
    state h[hidden]
    param W[hidden, input], U[hidden, hidden]
    h' = tanh(W @ x + U @ h)
}
""")
    net = rnndsl.make_recurrent(cells=[(str(path), "conditioned"), (str(path), "plain"),
                                       (str(path), "conditioned")],
                                # sizes per layer, as hyper-parameters are: None for the plain layer
                                input_size=INPUT, hids=[HIDDEN, 5, HIDDEN], context=[CONTEXT, None, CONTEXT],
                                extra=[EXTRA, None, EXTRA],
                                backend=backend, save_hidden=False)
    assert net.extra_inputs == {"enc": (CONTEXT, True), "y": (EXTRA, False)}
    xs, ys, enc, _, mask = inputs()
    lengths = mask.sum(0)
    (out, hs), final = net(xs, lengths=lengths, enc=enc, y=ys)
    # By hand: each layer run on its own, the conditioned ones with enc and y.
    layers = [layer.cell for layer in net.network.layers]
    zeros = [tuple(torch.zeros(B, size) for size in layer.state_sizes) for layer in layers]
    first, _ = layers[0].forward_sequence(xs, zeros[0], mask, enc=enc, y=ys)
    second, _ = layers[1].forward_sequence(first[0], zeros[1], mask)
    third, _ = layers[2].forward_sequence(second, zeros[2], mask, enc=enc, y=ys)
    torch.testing.assert_close(out, third[0], atol=1e-10, rtol=0)
    batch_first = rnndsl.make_recurrent(str(path), INPUT, [HIDDEN], cell_name="conditioned", context=CONTEXT,
                                        extra=EXTRA, backend=backend, batch_first=True, save_hidden=False)
    batch_first.load_state_dict(rnndsl.make_recurrent(str(path), INPUT, [HIDDEN], cell_name="conditioned",
                                                      context=CONTEXT, extra=EXTRA).state_dict())
    (got, _), _ = batch_first(xs.transpose(0, 1), enc=enc, y=ys.transpose(0, 1))
    (want, _), _ = batch_first.network.layers[0].cell.forward_sequence(
        xs, tuple(torch.zeros(B, HIDDEN) for _ in range(2)), enc=enc, y=ys)
    torch.testing.assert_close(got, want.transpose(0, 1), atol=1e-10, rtol=0)
    # Quoted in the caller's layout (they quoted the internal (T, batch, n) one, and the transposed y).
    with pytest.raises(ValueError, match=rf"missing input y, a \(batch, T, {EXTRA}\) tensor"):
        batch_first(xs.transpose(0, 1), enc=enc)
    with pytest.raises(ValueError, match=rf"input y: expected \(batch, T, n\) = \({B}, {xs.size(0)}, {EXTRA}\) with "
                                         rf"batch_first=True, got \({B}, {xs.size(0)}, {EXTRA + 1}\)"):
        batch_first(xs.transpose(0, 1), enc=enc, y=torch.zeros(B, xs.size(0), EXTRA + 1))
    with pytest.raises(ValueError, match=r"missing input enc, a \(batch, 7\) tensor its cells read once per "
                                         r"sequence; pass it by name, as in net\(x, enc=...\)"):
        net(xs, y=ys)
    with pytest.raises(ValueError, match="has no input named 'ctx'"):
        net(xs, enc=enc, y=ys, ctx=enc)


def test_a_bidirectional_layer_reads_per_step_inputs_backwards_too():
    net = rnndsl.make_bidirectional(rnndsl.load_source(SOURCE, "c.cell")["conditioned"], INPUT, [HIDDEN],
                                    context=CONTEXT, extra=EXTRA, save_hidden=False)
    xs, ys, enc, _, mask = inputs()
    lengths = mask.sum(0)
    (out, _), _ = net(xs, lengths=lengths, enc=enc, y=ys)
    layer = net.network.layers[0]
    zeros = tuple(torch.zeros(B, HIDDEN) for _ in range(2))
    (reverse, _), _ = layer.rev.cell.forward_sequence(
        rnndsl.sequences.reverse_padded(xs, lengths), zeros, mask, enc=enc,
        y=rnndsl.sequences.reverse_padded(ys, lengths))
    torch.testing.assert_close(out[..., HIDDEN:], rnndsl.sequences.reverse_padded(reverse, lengths),
                               atol=1e-10, rtol=0)


@pytest.mark.parametrize("backend", ["eager", "script"])
def test_pickling_and_deepcopy(backend):
    cell = spec().build(INPUT, HIDDEN, backend=backend, context=CONTEXT, extra=EXTRA)
    xs, ys, enc, state, mask = inputs()
    expected, _ = cell.forward_sequence(xs, state, mask, enc=enc, y=ys)
    buffer = io.BytesIO()
    torch.save(cell, buffer)
    buffer.seek(0)
    for copied in (torch.load(buffer, weights_only=False), copy.deepcopy(cell)):
        got, _ = copied.forward_sequence(xs, state, mask, enc=enc, y=ys)
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_the_parallel_scan_and_native_kernels_refuse_with_a_reason():
    source = """cell linear(x[input], enc[context] per sequence) -> h {
    state h[hidden]
    param W[hidden, input], U[hidden, context]
    h' = sigmoid(U @ enc) * h + W @ x
}"""
    linear = load_source(source, "linear.cell")["linear"]
    with pytest.raises(ValueError, match="several inputs .* parallel scan does not take yet"):
        linear.build(INPUT, HIDDEN, context=CONTEXT, scan="parallel")
    assert linear.build(INPUT, HIDDEN, context=CONTEXT).scan_mode == "sequential"  # scan="auto": the loop
    assert linear.native_mode is None and "several inputs" in linear.why_not_native


def test_torch_export_refuses_with_a_clear_error():
    cell = spec().build(INPUT, HIDDEN, context=CONTEXT, extra=EXTRA).eval()
    xs, ys, enc, state, _ = inputs()

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = cell

        def forward(self, xs, ys, enc, h, c):
            return self.cell.forward_sequence(xs, (h, c), None, enc=enc, y=ys)

    with pytest.raises(Exception, match="several inputs, which torch.export does not support yet"):
        torch.export.export(Wrapper(), tuple(t.detach() for t in (xs, ys, enc, *state)))


def test_show_prints_every_stage(capsys, tmp_path):
    from rnndsl.cli import main
    path = tmp_path / "conditioned.cell"
    path.write_text(SOURCE)
    for stage in ("ast", "ir", "code", "backward", "parallel", "scan", "dot"):
        main(["show", str(path), "--stage", stage])
    shown = capsys.readouterr().out
    assert "enc: [B, context] per sequence" in shown and "per_sequence=True" in shown
    assert "does not take yet" in shown


def test_the_example_cell_hoists_its_conditioning():
    example = Path(__file__).resolve().parent.parent / "examples" / "conditional_gru.cell"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graph = rnndsl.load_cell(str(example)).optimized()
    once = str(graph).split("# once per sequence, per example")[1].split("#")[0]
    assert "matmul(weight_ch, enc)" in once


def test_torch_compile_runs_the_loop_unrolled_and_agrees():
    net = rnndsl.make_recurrent(rnndsl.load_source(SOURCE, "c.cell")["conditioned"], INPUT, [HIDDEN],
                                context=CONTEXT, extra=EXTRA, save_hidden=False)
    xs, ys, enc, _, _ = inputs()
    (expected, _), _ = net(xs, enc=enc, y=ys)
    expected_grad, = torch.autograd.grad(expected.sum(), enc)
    (got, _), _ = torch.compile(net)(xs, enc=enc, y=ys)
    grad, = torch.autograd.grad(got.sum(), enc)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(grad, expected_grad, atol=1e-10, rtol=0)
