"""make_recurrent with a cell per layer, per-layer hyper-parameters, a cell picked from a
multi-cell file, and every step's state of every layer (return_all_states)."""
from __future__ import annotations

import pytest
import torch

from rnndsl.containers import RecurrentTable, SequenceTable, setup_recurrent
from rnndsl.networks import make_recurrent

TWO_CELLS = """
cell tanh_rnn(x[input]) -> h {
  state h[hidden]
  param W[hidden, input], U[hidden, hidden]
  h' = tanh(W @ x + U @ h)
}
cell relu_rnn(x[input]) -> h {
  state h[hidden]
  param W[hidden, input], U[hidden, hidden]
  h' = relu(W @ x + U @ h)
}
"""


def test_a_cell_per_layer_equals_the_hand_built_table():
    network = make_recurrent(cells=["janet", "lstm", "gru"], input_size=3, hids=[4, 5, 2], beta=[2.0, None, None],
                             save_hidden=False).double()
    layers = network.network.layers
    assert [layer.cell.cell_name for layer in layers] == ["janet", "lstm", "gru"]
    assert layers[0].cell.beta == 2.0
    by_hand = setup_recurrent(SequenceTable([RecurrentTable(layer.cell) for layer in layers]), save_hidden=False)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    (out, final), (want, _) = network(x), by_hand(x)
    torch.testing.assert_close(out, want)
    assert final[1][1].shape == (2, 5)  # ((h, c)) of the LSTM layer


def test_per_layer_values_must_match_the_layers():
    with pytest.raises(ValueError, match="beta has 3 values, but the network has 2 layers"):
        make_recurrent(cells=["janet", "janet"], input_size=3, hids=[4, 4], beta=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="2 cells for 3 layers"):
        make_recurrent(cells=["lstm", "gru"], input_size=3, hids=[4, 4, 4])
    with pytest.raises(TypeError, match="not both"):
        make_recurrent("lstm", 3, [4], cells=["lstm"])


def test_a_cell_picked_from_a_file_of_several(tmp_path):
    path = tmp_path / "two.cell"
    path.write_text(TWO_CELLS)
    network = make_recurrent(path, 3, [4], cell_name="relu_rnn")
    assert network.network.layers[0].cell.cell_name == "relu_rnn"
    mixed = make_recurrent(cells=[(path, "tanh_rnn"), (path, "relu_rnn")], input_size=3, hids=[4, 4])
    assert [layer.cell.cell_name for layer in mixed.network.layers] == ["tanh_rnn", "relu_rnn"]


@pytest.mark.parametrize("backend", ["script", "eager", "auto"])
def test_return_all_states_gives_every_step_of_every_layer(backend):
    """"auto", which would take torch's kernels for these cells, takes the script backend here."""
    kwargs = dict(input_size=3, hids=[4, 5], backend=backend, save_hidden=False)
    plain = make_recurrent(cells=["gru", "lstm"], **kwargs).double()
    every = make_recurrent(cells=["gru", "lstm"], return_all_states=True, **kwargs).double()
    every.load_state_dict(plain.state_dict())
    x = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    (outputs, states), final = every(x, lengths=[6, 4])
    want, want_final = plain(x, lengths=[6, 4])
    torch.testing.assert_close(outputs, want)
    assert [[s.shape for s in layer] for layer in states] == [[(6, 2, 4)], [(6, 2, 5), (6, 2, 5)]]
    torch.testing.assert_close(states[1][1][5, 0], want_final[1][1][0])  # c of the top layer at the last step
    torch.testing.assert_close(states[1][1][3, 1], want_final[1][1][1])  # the shorter sequence's own last step
    assert torch.all(states[0][0][4:, 1] == 0)  # padded steps are zero, as the outputs
    states[1][0].sum().backward()
    assert x.grad is not None
