"""Run-time input, loading and the command line: what does not fit is a clear error, at once.

Each mistake a user can make at a call (a float or broadcastable mask, fractional
lengths, a path that is no file, a misspelt keyword, a swapped argument) is
refused with an error naming what was expected and what was received, on every
backend and scan mode, before anything runs.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from test_hostile import hang_guard
from torch import nn

import rnndsl
from rnndsl import CellError, CellWarning, make_recurrent
from rnndsl.cli import main
from rnndsl.resources import stock_cells_dir

T, BATCH, INPUT, HIDDEN = 4, 3, 5, 6


@pytest.mark.parametrize("backend", ["script", "eager"])
@pytest.mark.parametrize("name", ["lstm", "mingru"])  # a time loop, a parallel scan
@pytest.mark.parametrize("mask, words", [
    (torch.ones(T, BATCH), "mask must be a bool tensor (True at real steps), got torch.float32"),
    (torch.ones(1, BATCH, dtype=torch.bool), "mask must have shape (T, batch) = (4, 3), got (1, 3)"),
    (torch.ones(T, BATCH - 1, dtype=torch.bool), "mask must have shape (T, batch) = (4, 3), got (4, 2)"),
    ([[True] * BATCH] * T, "mask must be a (T, batch) bool tensor, got list"),
], ids=["float", "one-step", "short-batch", "list"])
def test_forward_sequence_refuses_a_mask_that_does_not_fit(name, backend, mask, words):
    cell = rnndsl.load_cell(name).build(INPUT, HIDDEN, backend)
    assert cell.scan_mode == ("sequential" if name == "lstm" else "parallel")
    xs = torch.randn(T, BATCH, INPUT)
    state = tuple(torch.zeros(BATCH, size) for size in cell.state_sizes)
    with pytest.raises(ValueError) as caught:
        cell.forward_sequence(xs, state, mask)
    assert words in str(caught.value)
    with pytest.raises(ValueError) as caught:
        rnndsl.scan(cell, xs, state, mask)
    assert words in str(caught.value)


@pytest.mark.parametrize("backend", ["script", "native"])
def test_layers_refuse_a_mask_that_does_not_fit(backend):
    layer = make_recurrent("lstm", INPUT, [HIDDEN], backend=backend).network.layers[0]
    state = tuple(torch.zeros(BATCH, HIDDEN) for _ in range(2))
    with pytest.raises(ValueError, match=r"mask must have shape \(T, batch\) = \(4, 3\), got \(1, 3\)"):
        layer(state, torch.randn(T, BATCH, INPUT), torch.ones(1, BATCH, dtype=torch.bool))


@pytest.mark.parametrize("lengths", [[2.5, 3], torch.tensor([2.5, 3.0]), [True, True], [float("inf"), 3]])
def test_fractional_lengths_are_refused(lengths):
    net = make_recurrent("lstm", INPUT, [HIDDEN])
    with pytest.raises(ValueError, match=r"lengths must be whole numbers of steps, got \["):
        net(torch.randn(3, 2, INPUT), lengths=lengths)


@pytest.mark.parametrize("lengths", [[2, None], "ab", [[1, 2], [3]]])
def test_lengths_that_are_not_numbers_are_refused_by_name(lengths):
    with pytest.raises(ValueError, match="lengths must be a tensor or a sequence of whole numbers of steps, got"):
        make_recurrent("lstm", INPUT, [HIDDEN])(torch.randn(3, 2, INPUT), lengths=lengths)


def test_whole_lengths_in_floats_are_steps():
    net = make_recurrent("lstm", INPUT, [HIDDEN], save_hidden=False)
    xs = torch.randn(3, 2, INPUT)
    torch.testing.assert_close(net(xs, lengths=[2.0, 3.0]), net(xs, lengths=torch.tensor([2, 3])))


@pytest.mark.parametrize("backend", ["script", "eager", "native"])
def test_an_empty_batch_takes_empty_lengths(backend):
    net = make_recurrent("lstm", INPUT, [HIDDEN], backend=backend)
    outputs, ((h, c),) = net(torch.randn(3, 0, INPUT), lengths=[])
    assert outputs.shape == (3, 0, HIDDEN) and h.shape == c.shape == (0, HIDDEN)


@pytest.mark.parametrize("backend", ["script", "eager", "native"])
def test_every_backend_names_a_dtype_mismatch(backend):
    net = make_recurrent("lstm", INPUT, [HIDDEN], backend=backend)
    with pytest.raises(ValueError, match="cell lstm: its parameter weight_ih is torch.float32 on cpu, "
                                         "but the input is torch.float64 on cpu"):
        net(torch.randn(3, 2, INPUT, dtype=torch.float64))
    with pytest.raises(RuntimeError):  # a PlacementError is both, as torch raises RuntimeErrors for these
        net(torch.randn(3, 2, INPUT, dtype=torch.float64))
    xs = torch.randn(3, 2, INPUT)
    with pytest.raises(rnndsl.PlacementError, match=r"state\[0\]\[0\] \(h\) is float64 on cpu but the input"):
        net(xs, ((torch.zeros(2, HIDDEN, dtype=torch.float64), torch.zeros(2, HIDDEN)),))
    with pytest.raises(rnndsl.PlacementError, match="mask is on meta but the input is on cpu"):
        rnndsl.scan(net.network.layers[0].cell, xs, (torch.zeros(2, HIDDEN), torch.zeros(2, HIDDEN)),
                    torch.ones(3, 2, dtype=torch.bool, device="meta"))


# Loading: paths that are no cell file ----------------------------------------------

QUICK_S = 2  # a clear error comes at once; reading a FIFO nobody writes to would block forever


def _refused(path: str, words: str, capsys) -> None:
    """``load_cell`` and ``rnndsl check`` both refuse ``path`` at once, with ``words``."""
    with hang_guard(QUICK_S), pytest.raises(CellError) as caught:
        rnndsl.load_cell(path)
    assert words in str(caught.value)
    with hang_guard(QUICK_S):
        assert main(["check", path]) == 1
    assert words in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
@pytest.mark.parametrize("name", ["pipe.cell", "pipe"])
def test_a_fifo_nobody_writes_to_is_refused_at_once(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    os.mkfifo(name)
    _refused(name, f"{name} is a FIFO (named pipe), not a regular file", capsys)


@pytest.mark.parametrize("name", ["dangling.cell", "dangling"])
def test_a_dangling_symlink_is_reported_as_one(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    os.symlink("nowhere", name)
    _refused(name, f"{name} is a broken symbolic link: its target nowhere does not exist", capsys)


def test_an_empty_path_is_reported_as_empty(capsys):
    _refused("", "the path is empty; give a .cell file or a stock cell name (", capsys)


# Loading: stock cells cannot be shadowed ------------------------------------------

# The stock GRU with relu for tanh: same parameters, other numbers.
RELU_GRU = (stock_cells_dir() / "gru.cell").read_text().replace("n = tanh(", "n = relu(")


def test_a_folder_named_like_a_stock_cell_does_not_hide_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("lstm").mkdir()
    assert Path(rnndsl.load_cell("lstm").path) == stock_cells_dir() / "lstm.cell"
    outputs, _ = rnndsl.LSTM(4, 6)(torch.randn(3, 2, 4))
    assert outputs.shape == (3, 2, 6)


def test_a_file_named_like_a_stock_cell_is_named_and_never_runs_the_drop_ins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("gru").write_text(RELU_GRU)
    with pytest.warns(CellWarning, match=f"'gru' names the file {tmp_path / 'gru'}, which is loaded "
                                         "instead of the stock cell gru"):
        assert rnndsl.load_cell("gru").path == "gru"
    assert Path(rnndsl.load_stock_cell("gru").path) == stock_cells_dir() / "gru.cell"
    torch.manual_seed(0)
    reference = nn.GRU(4, 6, dtype=torch.float64)
    gru = rnndsl.GRU(4, 6, dtype=torch.float64)
    gru.load_state_dict(reference.state_dict())
    xs = torch.randn(3, 2, 4, dtype=torch.float64)
    torch.testing.assert_close(gru(xs), reference(xs))


def test_load_stock_cell_knows_only_stock_cells():
    with pytest.raises(CellError, match="no stock cell named 'gru.cell'; stock cells are attention_rnn, cifg_lstm, "):
        rnndsl.load_stock_cell("gru.cell")


# Building networks: mistakes at the call ------------------------------------------

SHIFTED_RNN = """
cell shifted(x[input]) -> h {
    hyper shift = 0.0
    state h[hidden]
    param weight_ih[hidden, input], weight_hh[hidden, hidden]
    h' = tanh(weight_ih @ x + weight_hh @ h + shift)
}
"""


def test_one_hidden_size_instead_of_a_list_is_refused():
    with pytest.raises(TypeError, match=r"hids must be a list of hidden sizes, one per layer, got 16; "
                                        r"for one layer of 16, write \[16\]"):
        make_recurrent("lstm", INPUT, 16)


def test_sizes_of_any_integer_type_build_and_others_are_refused():
    """``numpy.int64`` and 0-d integer tensors (what ``x.shape``, numpy or a config gives) were refused
    as "must be a positive integer"; they are integers, kept as Python ints in the recipe."""
    import pickle

    import numpy as np
    cell = rnndsl.load_cell("lstm").build(np.int64(INPUT), torch.tensor(HIDDEN))
    assert type(cell._recipe.input_size) is int and type(cell._recipe.hidden_size) is int
    assert pickle.loads(pickle.dumps(cell)).weight_hh.shape == (4 * HIDDEN, HIDDEN)
    net = make_recurrent("gru", np.int64(INPUT), np.array([HIDDEN, 2]))
    assert net(torch.randn(T, BATCH, INPUT))[0].shape == (T, BATCH, 2)
    for bad in (True, 2.0, 0, "4", torch.tensor(True), torch.tensor([4])):
        with pytest.raises(ValueError, match="lstm: hidden_size must be a positive integer, got"):
            rnndsl.load_cell("lstm").build(INPUT, bad)
        with pytest.raises(ValueError, match="hids must be a non-empty list of positive sizes"):
            make_recurrent("gru", INPUT, [HIDDEN, bad])


@pytest.mark.parametrize("backend", ["script", "eager"])
def test_every_parameter_and_buffer_must_match_the_inputs_dtype_and_device(backend):
    """Only the first parameter was checked: a weight moved to ``meta`` gave uninitialized numbers
    (cpu @ meta), a float64 bias a float64 output, where torch.nn.LSTM raises."""
    x, h = torch.randn(T, BATCH, INPUT), torch.zeros(BATCH, HIDDEN)
    cell = rnndsl.load_cell("lstm").build(INPUT, HIDDEN, backend=backend)
    cell.weight_hh = nn.Parameter(cell.weight_hh.detach().to("meta"))
    with pytest.raises(ValueError, match="cell lstm: its parameter weight_hh is torch.float32 on meta, but the "
                                         "input is torch.float32 on cpu"):
        cell.forward_sequence(x, (h, h))
    cell = rnndsl.load_cell("lstm").build(INPUT, HIDDEN, backend=backend)
    cell.bias_hh = nn.Parameter(cell.bias_hh.detach().double())
    with pytest.raises(ValueError, match="its parameter bias_hh is torch.float64 on cpu"):
        cell((h, h), x[0])
    drop_in = rnndsl.LSTM(INPUT, HIDDEN, backend=backend)
    drop_in.weight_hh_l0 = nn.Parameter(drop_in.weight_hh_l0.detach().to("meta"))
    with pytest.raises(ValueError, match="its parameter weight_hh is torch.float32 on meta"):
        drop_in(x)
    attention = rnndsl.load_cell("attention_rnn").build(INPUT, HIDDEN, backend=backend)
    attention.sharpness = attention.sharpness.double()
    with pytest.raises(ValueError, match="its buffer sharpness is torch.float64 on cpu"):
        attention.forward_sequence(x, (h,))
    # What the code does not read is the user's: a buffer of their own, a parametrization's original.
    cell = rnndsl.load_cell("lstm").build(INPUT, HIDDEN, backend=backend)
    cell.register_buffer("running_norm", torch.zeros((), dtype=torch.float64))

    class Upcast(nn.Module):
        def forward(self, stored):
            return stored.float()

    nn.utils.parametrize.register_parametrization(cell, "weight_hh", Upcast(), unsafe=True)
    stored = cell.parametrizations.weight_hh
    stored.original = nn.Parameter(stored.original.detach().bfloat16())  # kept in bfloat16, read as float32
    assert cell.forward_sequence(x, (h, h))[0].dtype == torch.float32


def test_a_built_cell_instead_of_a_spec_is_refused():
    cell = rnndsl.load_cell("lstm").build(INPUT, HIDDEN)
    with pytest.raises(TypeError, match=r"cell must be a stock cell name, a path to a .cell file or a CellSpec, "
                                        r"got lstm_cell \(a built lstm cell: .* rnndsl.load_cell\('lstm'\)"):
        make_recurrent(cell, INPUT, [HIDDEN])


def test_a_misspelt_keyword_names_the_network_and_the_cell_keywords(tmp_path):
    with pytest.raises(TypeError) as caught:
        make_recurrent("lstm", INPUT, [HIDDEN], dropuot=0.1)
    message = str(caught.value)
    assert message.startswith("make_recurrent() got an unexpected keyword argument 'dropuot'; "
                              "did you mean `dropout`?")
    assert "make_recurrent takes cells, cell_name, backend, dropout, " in message
    assert "the cell's build takes disable, fixed_dropout_mask" in message
    assert "cell lstm: it has no hyper-parameters or sizes" in message
    path = tmp_path / "shifted.cell"
    path.write_text(SHIFTED_RNN)
    with pytest.raises(TypeError, match=r"make_bidirectional\(\) got an unexpected keyword argument 'shfit'; "
                                        r"did you mean `shift`\? .* cell shifted: its hyper-parameters and "
                                        r"sizes are shift\)"):
        rnndsl.make_bidirectional(path, INPUT, [HIDDEN], shfit=1.0)
    assert make_recurrent(path, INPUT, [HIDDEN], shift=1.0, disable="cse").network.layers[0].cell.shift == 1.0


@pytest.mark.parametrize("backend", ["script", "eager"])
def test_a_cell_called_input_first_is_told_the_convention(backend):
    cell = rnndsl.load_cell("lstm").build(INPUT, HIDDEN, backend)
    state = (torch.zeros(2, HIDDEN), torch.zeros(2, HIDDEN))
    with pytest.raises(ValueError, match=r"got tuple; cells take the state first: cell\(state, x\)"):
        cell(torch.randn(2, INPUT), state)


def test_one_pass_to_disable_may_be_a_string():
    spec = rnndsl.load_cell("lstm")
    assert spec.code(disable="hoist") == spec.code(disable=["hoist"])
    assert str(spec.optimized("cse")) == str(spec.optimized(("cse",)))
    cell = spec.build(INPUT, HIDDEN, disable="hoist")
    assert cell.code == spec.code(disable=("hoist",))
    with pytest.raises(ValueError, match=r"unknown pass\(es\) \['hoister'\]; passes are cse, "):
        spec.build(INPUT, HIDDEN, disable="hoister")


def test_a_parameter_assigned_with_another_shape_is_refused_where_it_is_assigned():
    """It gave numbers without grad (torch's fused kernel reading past a smaller weight) and a
    TorchScript traceback with grad."""
    cell = rnndsl.load_cell("lstm").build(INPUT, HIDDEN)
    with pytest.raises(ValueError, match=rf"parameter weight_hh must have shape \({4 * HIDDEN}, {HIDDEN}\), as "
                                         rf"the cell declares it, got \({4 * HIDDEN}, {HIDDEN + 1}\)"):
        cell.weight_hh = torch.nn.Parameter(torch.randn(4 * HIDDEN, HIDDEN + 1))
    cell.weight_hh = torch.nn.Parameter(torch.zeros(4 * HIDDEN, HIDDEN))  # the declared shape: taken
    assert not cell.weight_hh.any()
