"""Run-time input, loading and the command line: what does not fit is a clear error, at once.

Each mistake a user can make at a call (a float or broadcastable mask, fractional
lengths, a path that is no file, a misspelt keyword, a swapped argument) is
refused with an error naming what was expected and what was received, on every
backend and scan mode, before anything runs.
"""
from __future__ import annotations

import os

import pytest
import torch

import rnndsl
from rnndsl import make_recurrent

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
    with pytest.raises(ValueError, match="cell lstm: its parameters are torch.float32 on cpu, "
                                         "but the input is torch.float64 on cpu"):
        net(torch.randn(3, 2, INPUT, dtype=torch.float64))
