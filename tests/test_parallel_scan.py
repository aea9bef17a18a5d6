"""Cells linear in their state run as a parallel scan: equal to the time loop, values and gradients."""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rnndsl
from rnndsl.codegen import NotLinear, find_linear_recurrences

LINEAR = ["mingru", "minlstm", "qrnn"]
NOT_LINEAR = {"lstm": "h' = sigmoid(o) * tanh(c')", "gru": "h' = (1 - z) * n + z * h", "indrnn": "h' = relu("}


def sequential_and_parallel(name, backend, input_size, hidden):
    """The stock cell ``name`` built both ways, with the same parameters (float64)."""
    spec = rnndsl.load_cell(name)
    sequential = spec.build(input_size, hidden, backend=backend, scan="sequential").double()
    parallel = spec.build(input_size, hidden, backend=backend, scan="parallel").double()
    parallel.load_state_dict(sequential.state_dict())
    return sequential, parallel


def _run(cell, xs, state, mask):
    """Outputs (one tensor, or a tuple for several), final state, and the gradients of a loss of both."""
    outputs, final = rnndsl.scan(cell, xs, state, mask)
    loss = sum((s * s).sum() for s in final)
    for output in (outputs if isinstance(outputs, tuple) else (outputs,)):
        loss = loss + (output * torch.linspace(-1, 1, output.numel(), dtype=output.dtype).view_as(output)).sum()
    grads = torch.autograd.grad(loss, [xs, *state, *cell.parameters()])
    return outputs, final, grads


@pytest.mark.parametrize("backend", ["script", "eager"])
@pytest.mark.parametrize("name", LINEAR)
@given(steps=st.integers(1, 70), batch=st.integers(1, 4), hidden=st.integers(1, 9), masked=st.booleans(),
       seed=st.integers(0, 2**16))
def test_parallel_equals_sequential(name, backend, steps, batch, hidden, masked, seed):
    sequential, parallel = sequential_and_parallel(name, backend, 3, hidden)
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(steps, batch, 3, dtype=torch.float64, generator=g, requires_grad=True)
    state = tuple(torch.randn(batch, hidden, dtype=torch.float64, generator=g, requires_grad=True)
                  for _ in sequential.state_sizes)
    mask = None
    if masked:
        lengths = torch.randint(1, steps + 1, (batch,), generator=g)
        mask = torch.arange(steps)[:, None] < lengths[None, :]
    want, got = _run(sequential, xs, state, mask), _run(parallel, xs, state, mask)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
    for a, b in zip(got[1] + got[2], want[1] + want[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# Coefficients the scan must broadcast over steps (a parameter vector, a number), a product of the
# new state after the scan, and chunks that tile a value (cut with one split).
SHARED_COEFFICIENTS = """
cell decaying(x[input]) -> y {
    state h[hidden], c[hidden]
    param decay[hidden], proj[hidden, hidden], weight[2*hidden, input], bias[2*hidden]
    u, v = chunk(weight @ x + bias, 2)
    h' = decay * h + 0.5
    c' = sigmoid(u) * c + v
    y = proj @ h' + c'
}
"""


@pytest.mark.parametrize("masked", [False, True])
def test_shared_coefficients_and_outputs_after_the_scan(masked):
    spec = rnndsl.load_source(SHARED_COEFFICIENTS, "decaying.cell")["decaying"]
    sequential = spec.build(3, 4, scan="sequential").double()
    parallel = spec.build(3, 4, scan="parallel").double()
    parallel.load_state_dict(sequential.state_dict())
    assert "along_steps(self.decay" in parallel.parallel_source and ".split(" in parallel.parallel_source
    xs = torch.randn(30, 2, 3, dtype=torch.float64, requires_grad=True)
    state = tuple(torch.randn(2, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = (torch.arange(30)[:, None] < torch.tensor([30, 17])[None, :]) if masked else None
    want, got = _run(sequential, xs, state, mask), _run(parallel, xs, state, mask)
    for a, b in zip(got[:1] + got[1] + got[2], want[:1] + want[1] + want[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# Cells that once broke the parallel scan's code, or that it once refused wrongly.
TRICKY_CELLS = {
    # merge_matmuls stacks Wc before Wz, so the piece at offset 0 is used after the other one
    "pieces used out of offset order": ("""
cell t(x[input]) -> h {
    state h[hidden]
    param Wc[hidden, input], Wz[hidden, input], bz[hidden], bc[hidden]
    mc = Wc @ x
    mz = Wz @ x
    z = sigmoid(mz + bz)
    c = tanh(mc + bc)
    h' = (1 - z) * h + z * c
}""", ()),
    # after the scan, only the second piece is needed (kept alive by disabling dce)
    "a split after the scan with an unneeded piece": ("""
cell t(x[input]) -> y {
    state h[2*hidden]
    param U[2*hidden, input], W[2*hidden, input]
    h' = sigmoid(U @ x) * h + W @ x
    a, b = chunk(h', 2)
    y = tanh(b)
}""", ("dce",)),
    "a chunk of one piece": ("""
cell t(x[input]) -> h {
    state h[hidden]
    param W[hidden, input]
    a = chunk(W @ x, 1)
    h' = sigmoid(a) * h + a
}""", ()),
    # join_slices would join the two sums into slices of one add, hiding both linear forms
    "two states with parameter coefficients": ("""
cell t(x[input]) -> h, c {
    state h[hidden], c[hidden]
    param a[hidden], b[hidden], W[hidden, input], V[hidden, input]
    h' = a * h + W @ x
    c' = b * c + V @ x
}""", ()),
}


@pytest.mark.parametrize("case", list(TRICKY_CELLS))
def test_tricky_cells_equal_the_loop(case):
    source, disable = TRICKY_CELLS[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rnndsl.CellWarning)  # `a` unused in one case
        spec = rnndsl.load_source(source)["t"]
    sequential = spec.build(3, 4, scan="sequential", disable=disable).double()
    parallel = spec.build(3, 4, scan="parallel", disable=disable).double()
    parallel.load_state_dict(sequential.state_dict())
    xs = torch.randn(9, 2, 3, dtype=torch.float64, requires_grad=True)
    state = tuple(torch.randn(2, size, dtype=torch.float64, requires_grad=True) for size in sequential.state_sizes)
    want, got = _run(sequential, xs, state, None), _run(parallel, xs, state, None)
    for a, b in zip(got[:1] + got[1] + got[2], want[:1] + want[1] + want[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", LINEAR)
def test_float32_on_onednn_matches_the_loop(name):
    """Sizes large enough that the input projection's GEMMs go to oneDNN, forward and backward."""
    sequential, parallel = (rnndsl.load_cell(name).build(96, 128, scan=scan) for scan in ("sequential", "parallel"))
    parallel.load_state_dict(sequential.state_dict())
    xs = torch.randn(20, 64, 96, requires_grad=True)
    state = (torch.randn(64, 128, requires_grad=True),)
    want, got = _run(sequential, xs, state, None), _run(parallel, xs, state, None)
    for a, b in zip(got[:1] + got[1] + got[2], want[:1] + want[1] + want[2], strict=True):
        # float32 sums over steps and examples in another order: relative to the largest entry.
        assert (a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-6


def test_long_sequences_are_exact_and_finite():
    sequential, parallel = sequential_and_parallel("mingru", "script", 4, 8)
    xs = torch.randn(512, 2, 4, dtype=torch.float64)
    state = (torch.randn(2, 8, dtype=torch.float64),)
    with torch.no_grad():
        torch.testing.assert_close(rnndsl.scan(parallel, xs, state)[0], rnndsl.scan(sequential, xs, state)[0],
                                   rtol=0, atol=1e-8)
        long = torch.randn(4096, 2, 4, dtype=torch.float64)
        assert torch.isfinite(rnndsl.scan(parallel, long, state)[0]).all()


def test_auto_picks_the_parallel_scan_only_where_it_applies():
    assert rnndsl.load_cell("mingru").build(3, 4, scan="auto").scan_mode == "parallel"
    assert rnndsl.load_cell("lstm").build(3, 4, scan="auto").scan_mode == "sequential"


@pytest.mark.parametrize("name", sorted(NOT_LINEAR))
def test_refusal_names_the_equation(name):
    with pytest.raises(ValueError) as caught:
        rnndsl.load_cell(name).build(3, 4, scan="parallel")
    message = str(caught.value)
    assert "not linear in the state" in message
    assert NOT_LINEAR[name] in message
    assert f"{name}.cell:" in message


def test_a_state_passed_through_is_refused_by_name():
    spec = rnndsl.load_source("""
        cell kept(x[input]) -> y {
            state h[hidden], s[hidden]
            param W[hidden, input], U[hidden, input]
            h' = sigmoid(W @ x) * h + U @ x
            s' = s
            y = h' + s'
        }""", path="kept.cell")["kept"]
    with pytest.raises(ValueError, match="`s' = s` passes the state through unchanged"):
        spec.build(4, 4, scan="parallel")
    assert spec.build(4, 4, scan="auto").scan_mode == "sequential"


def test_find_linear_recurrences_reads_the_ir():
    (update,) = find_linear_recurrences(rnndsl.load_cell("qrnn").optimized())
    assert update.state == "c" and update.next == "c_next"
    with pytest.raises(NotLinear):
        find_linear_recurrences(rnndsl.load_cell("sru").optimized())


def test_networks_take_a_scan_option():
    net = rnndsl.make_recurrent("mingru", 3, [5, 4], scan="parallel", save_hidden=False)
    reference = rnndsl.make_recurrent("mingru", 3, [5, 4], scan="sequential", save_hidden=False)
    reference.load_state_dict(net.state_dict())
    xs = torch.randn(40, 2, 3)
    torch.testing.assert_close(net(xs)[0], reference(xs)[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not linear in the state"):
        rnndsl.make_recurrent("lstm", 3, [5], scan="parallel")


OUTPUT_DROPOUT = """
cell dropped(x[input]) -> y {
    state h[hidden]
    param W[hidden, input], U[hidden, input]
    h' = sigmoid(U @ x) * h + W @ x
    y = dropout(h', 0.5)
}
"""


def test_dropout_after_the_scan_draws_for_every_step_unless_one_mask_is_asked_for():
    spec = rnndsl.load_source(OUTPUT_DROPOUT)["dropped"]
    parallel = spec.build(3, 64, scan="parallel")
    sequential = spec.build(3, 64, scan="sequential")
    sequential.load_state_dict(parallel.state_dict())
    xs, state = torch.randn(50, 8, 3), (torch.randn(8, 64),)
    with torch.no_grad():
        kept = rnndsl.scan(parallel.eval(), xs, state)[0]
        torch.testing.assert_close(kept, rnndsl.scan(sequential.eval(), xs, state)[0])
        trained = rnndsl.scan(parallel.train(), xs, state)[0]
    dropped = trained == 0
    torch.testing.assert_close(trained[~dropped], 2 * kept[~dropped])  # survivors scaled by 1 / (1 - p)
    assert 0.45 < dropped.double().mean() < 0.55  # half of all outputs
    assert dropped.any(0).all() and not dropped.all(0).any()  # a fresh mask at every step...
    assert (dropped[:, 0] != dropped[:, 1]).any()  # ...and for every example
    with pytest.raises(ValueError, match="with fixed_dropout_mask, `y` draws one mask for the whole sequence"):
        spec.build(3, 4, scan="parallel", fixed_dropout_mask=True)
    assert spec.build(3, 4, scan="auto", fixed_dropout_mask=True).scan_mode == "sequential"
    # a parameter-only value: the loop draws its mask at every step, which one draw cannot do
    shared = rnndsl.load_source(OUTPUT_DROPOUT.replace("param W[hidden, input], U[hidden, input]",
                                                       "param W[hidden, input], U[hidden, input], v[hidden]")
                                .replace("y = dropout(h', 0.5)", "y = h' * dropout(v, 0.5)"))["dropped"]
    with pytest.raises(ValueError, match="draws a fresh mask for a parameter-only value at each step"):
        shared.build(3, 4, scan="parallel")


# Linear in the state by meaning, not by spelling: expanded and collected into a * s + b.
SPELLED_OTHERWISE = {
    "a' = a + x": "a' = a + W @ x / k",
    "a' = a * (x + 1) - k": "a' = a * (W @ x + 1) - k",
    "h' = x * h + h": "a' = (W @ x) * a + a / k",
    "a sum of scaled differences": "a' = -(2 * (a - W @ x) / 3) + tanh(W @ x) * (W @ x - a) - a / k",
}


@pytest.mark.parametrize("backend", ["script", "eager"])
@pytest.mark.parametrize("case", list(SPELLED_OTHERWISE))
def test_linearity_is_read_from_meaning(case, backend):
    source = f"""
cell t(x[input]) -> a {{
    state a[hidden]
    param W[hidden, input], k[hidden]
    {SPELLED_OTHERWISE[case]}
}}"""
    spec = rnndsl.load_source(source)["t"]
    assert spec.parallel_plan()[0] is not None, spec.parallel_plan()[1]
    sequential = spec.build(3, 4, backend, scan="sequential").double()
    parallel = spec.build(3, 4, backend, scan="parallel").double()
    with torch.no_grad():
        sequential.k.uniform_(1, 2)  # a divisor
    parallel.load_state_dict(sequential.state_dict())
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(11, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    state = (torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True),)
    mask = torch.arange(11)[:, None] < torch.tensor([11, 4, 7])[None, :]
    want, got = _run(sequential, xs, state, mask), _run(parallel, xs, state, mask)
    for a, b in zip(got[:1] + got[1] + got[2], want[:1] + want[1] + want[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_a_state_times_itself_stays_a_loop():
    spec = rnndsl.load_source("cell t(x[input]) -> h {\n state h[input]\n h' = h * h + x\n}")["t"]
    assert spec.parallel_plan()[0] is None
    assert "not of the form a * h + b" in spec.parallel_plan()[1]
