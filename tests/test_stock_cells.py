"""Every stock cell against an independent reference, forward and gradients, on both backends.

References: torch.nn.LSTMCell / GRUCell / RNNCell (and one-layer torch.nn.LSTM /
GRU / RNN over sequences); rnn_sigmoid, which torch lacks, against a hand-written
function. Sizes and values are drawn by hypothesis, in float64.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rnndsl
from references import TORCH_CELLS

BACKENDS = ["script", "eager"]
TORCH_LAYERS = {
    "lstm": lambda i, h: torch.nn.LSTM(i, h),
    "gru": lambda i, h: torch.nn.GRU(i, h),
    "rnn_tanh": lambda i, h: torch.nn.RNN(i, h, nonlinearity="tanh"),
    "rnn_relu": lambda i, h: torch.nn.RNN(i, h, nonlinearity="relu"),
}
TOL = dict(rtol=1e-10, atol=1e-10)

sizes = st.integers(1, 32)
batches = st.integers(1, 8)


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(batch, input_size, hidden, states, seed):
    g = _seeded(seed)
    x = torch.randn(batch, input_size, dtype=torch.float64, generator=g, requires_grad=True)
    state = tuple(torch.randn(batch, hidden, dtype=torch.float64, generator=g, requires_grad=True)
                  for _ in range(states))
    return x, state


def _grads(outputs, wrt):
    total = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in outputs)
    return torch.autograd.grad(total, wrt, allow_unused=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(TORCH_CELLS))
@given(batch=batches, input_size=sizes, hidden=sizes, seed=st.integers(0, 2**16))
def test_cell_matches_torch_nn(name, backend, batch, input_size, hidden, seed):
    reference = TORCH_CELLS[name](input_size, hidden).double()
    cell = rnndsl.load_cell(name).build(input_size, hidden, backend=backend).double()
    cell.load_state_dict(reference.state_dict())
    n_states = len(cell.state_sizes)
    x, state = _inputs(batch, input_size, hidden, n_states, seed)

    new_state, output = cell(state, x)
    if name == "lstm":
        h, c = reference(x, state)
        expected = (h, c)
    else:
        h = reference(x, state[0])
        expected = (h,)
    for got, want in zip(new_state, expected):
        torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(output, expected[0], **TOL)

    wrt_ours = [x, *state, *cell.parameters()]
    wrt_ref = [x, *state, *reference.parameters()]
    for got, want in zip(_grads(list(new_state) + [output], wrt_ours),
                         _grads(list(expected) + [expected[0]], wrt_ref)):
        torch.testing.assert_close(got, want, **TOL)


def rnn_sigmoid_reference(params, h, x):
    """rnnlib's RNNSigmoid, written out: h' = sigmoid(W_ih x + b_ih + W_hh h + b_hh)."""
    return torch.sigmoid(x @ params["weight_ih"].t() + params["bias_ih"] + h @ params["weight_hh"].t()
                         + params["bias_hh"])


@pytest.mark.parametrize("backend", BACKENDS)
@given(batch=batches, input_size=sizes, hidden=sizes, seed=st.integers(0, 2**16))
def test_rnn_sigmoid_matches_reference(backend, batch, input_size, hidden, seed):
    cell = rnndsl.load_cell("rnn_sigmoid").build(input_size, hidden, backend=backend).double()
    x, (h,) = _inputs(batch, input_size, hidden, 1, seed)
    (h_next,), output = cell((h,), x)
    params = dict(cell.named_parameters())
    expected = rnn_sigmoid_reference(params, h, x)
    torch.testing.assert_close(h_next, expected, **TOL)
    torch.testing.assert_close(output, expected, **TOL)
    wrt = [x, h, *params.values()]
    for got, want in zip(_grads([h_next], wrt), _grads([expected], wrt)):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(TORCH_LAYERS))
@given(steps=st.integers(1, 16), batch=batches, input_size=st.integers(1, 12), hidden=st.integers(1, 12),
       seed=st.integers(0, 2**16))
def test_sequence_matches_one_layer_torch_nn(name, backend, steps, batch, input_size, hidden, seed):
    layer = TORCH_LAYERS[name](input_size, hidden).double()
    cell = rnndsl.load_cell(name).build(input_size, hidden, backend=backend).double()
    cell.load_state_dict({k[:-3]: v for k, v in layer.state_dict().items()})  # weight_ih_l0 -> weight_ih
    g = _seeded(seed)
    xs = torch.randn(steps, batch, input_size, dtype=torch.float64, generator=g, requires_grad=True)
    state = tuple(torch.randn(batch, hidden, dtype=torch.float64, generator=g, requires_grad=True)
                  for _ in cell.state_sizes)

    outputs, final = rnndsl.scan(cell, xs, state)
    hx = (state[0][None], state[1][None]) if name == "lstm" else state[0][None]
    want_outputs, want_final = layer(xs, hx)
    want_final = tuple(s[0] for s in want_final) if name == "lstm" else (want_final[0],)
    torch.testing.assert_close(outputs, want_outputs, **TOL)
    for got, want in zip(final, want_final):
        torch.testing.assert_close(got, want, **TOL)

    ours = _grads([outputs, *final], [xs, *state, *cell.parameters()])
    theirs = _grads([want_outputs, *want_final], [xs, *state, *layer.parameters()])
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn_tanh", "rnn_relu", "rnn_sigmoid"])
def test_step_and_sequence_agree_with_python_loop(name):
    """forward_sequence (hoisted, compiled loop) equals calling forward step by step."""
    torch.manual_seed(0)
    cell = rnndsl.load_cell(name).build(5, 7).double()
    xs = torch.randn(9, 3, 5, dtype=torch.float64)
    state = tuple(torch.randn(3, 7, dtype=torch.float64) for _ in cell.state_sizes)
    mask = torch.rand(9, 3) < 0.7
    for m in (None, mask):
        compiled = rnndsl.scan(cell, xs, state, m)
        looped = rnndsl.scan.__globals__["python_scan"](cell, xs, state, m)
        torch.testing.assert_close(compiled[0], looped[0], **TOL)
        for a, b in zip(compiled[1], looped[1]):
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("name", sorted(TORCH_CELLS))
def test_state_dict_moves_both_ways(name):
    cell = rnndsl.load_cell(name).build(4, 6)
    reference = TORCH_CELLS[name](4, 6)
    reference.load_state_dict(cell.state_dict())
    cell.load_state_dict(reference.state_dict())
    assert {k: tuple(v.shape) for k, v in cell.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in reference.state_dict().items()}


def test_default_init_is_torch_nn_range():
    cell = rnndsl.load_cell("lstm").build(10, 100)
    bound = 1 / 100 ** 0.5
    for parameter in cell.parameters():
        assert parameter.abs().max() <= bound
        assert parameter.abs().max() > 0.8 * bound


def test_scripted_cell_survives_jit_save_and_load(tmp_path):
    cell = rnndsl.load_cell("lstm").build(3, 4)
    path = tmp_path / "cell.pt"
    torch.jit.save(cell, str(path))
    loaded = torch.jit.load(str(path))
    xs = torch.randn(5, 2, 3)
    state = (torch.zeros(2, 4), torch.zeros(2, 4))
    torch.testing.assert_close(loaded.forward_sequence(xs, state, None)[0], cell.forward_sequence(xs, state)[0])
    torch.testing.assert_close(loaded(state, xs[0])[1], cell(state, xs[0])[1])


def test_code_is_the_generated_source():
    spec = rnndsl.load_cell("lstm")
    for backend in BACKENDS:
        cell = spec.build(3, 4, backend=backend)
        assert cell.code == spec.code()
        assert "def forward(self, state: Tuple[Tensor, Tensor], x: Tensor)" in cell.code
        assert "def forward_sequence(" in cell.code
