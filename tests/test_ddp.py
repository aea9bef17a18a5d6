"""A make_recurrent language model under DistributedDataParallel.

Two CPU processes (gloo on the loopback address) each train on half of every
batch, carrying their half of the hidden state across batches (truncated
BPTT); the parameters must end up equal to one process training on the whole
batch, since DDP averages the two halves' gradients.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from rnndsl.networks import make_recurrent

VOCAB, EMBED, HIDS, STEPS, BATCH, SEQ = 11, 6, [8, 7], 4, 4, 5

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


class LanguageModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, EMBED)
        self.rnn = make_recurrent("lstm", EMBED, HIDS)
        self.out = nn.Linear(HIDS[-1], VOCAB)

    def forward(self, tokens):
        return self.out(self.rnn(self.embed(tokens))[0])


def batches():
    """STEPS consecutive (T, BATCH) chunks of one token stream per column."""
    stream = torch.randint(VOCAB, (STEPS * SEQ + 1, BATCH), generator=torch.Generator().manual_seed(1))
    return [(stream[i * SEQ:(i + 1) * SEQ], stream[i * SEQ + 1:(i + 1) * SEQ + 1]) for i in range(STEPS)]


def train(model, columns):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for inputs, targets in batches():
        logits = model(inputs[:, columns])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets[:, columns].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def new_model():
    torch.manual_seed(0)
    return LanguageModel().double()


def worker(rank, world_size, port, path):
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        model = new_model()
        share = BATCH // world_size
        train(nn.parallel.DistributedDataParallel(model), slice(rank * share, (rank + 1) * share))
        if rank == 0:
            torch.save(model.state_dict(), path)
        # Both ranks finish before either tears gloo down: destroying the group while the
        # other rank still talks to it can abort a worker ("terminate called without an
        # active exception", seen about once in ten runs).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_training_equals_single_process(tmp_path):
    path = str(tmp_path / "ddp.pt")
    mp.spawn(worker, args=(2, free_port(), path), nprocs=2, join=True)
    single = new_model()
    train(single, slice(None))
    distributed = torch.load(path)
    assert distributed.keys() == single.state_dict().keys()
    torch.testing.assert_close(distributed, single.state_dict(), rtol=1e-10, atol=1e-12)
    assert not torch.equal(distributed["rnn.network.layers.0.cell.weight_ih"],
                           new_model().state_dict()["rnn.network.layers.0.cell.weight_ih"])
