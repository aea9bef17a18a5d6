"""Truncated BPTT keeps no graph of earlier batches alive: memory stays flat over 1,000 batches."""
from __future__ import annotations

import gc

import torch

import rnndsl


def _live_tensor_bytes() -> int:
    gc.collect()
    total = 0
    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance reads __class__, which on some deprecated torch
        # objects (torch.distributed.reduce_op) warns.
        if issubclass(type(obj), torch.Tensor):
            total += obj.untyped_storage().nbytes()
    return total


def test_saved_hidden_state_keeps_memory_flat_over_1000_batches():
    torch.manual_seed(0)
    net = rnndsl.make_recurrent("lstm", 8, [16, 16])  # save_hidden=True: each call continues the last
    head = torch.nn.Linear(16, 8)
    optimizer = torch.optim.SGD(list(net.parameters()) + list(head.parameters()), lr=0.1)
    data = torch.randn(6, 4, 8)
    samples = {}
    for batch in range(1, 1001):
        outputs, state = net(data)
        loss = torch.nn.functional.mse_loss(head(outputs), data)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if batch in (100, 1000):
            samples[batch] = _live_tensor_bytes()
    assert all(s.grad_fn is None for layer in net.hidden for s in layer)  # saved state is detached
    # Nothing grows with the number of batches: allow a few KiB of noise, far below one batch's graph.
    assert samples[1000] <= samples[100] + 16 * 1024, samples
