"""Character-level language model on tiny-shakespeare with torch-rnn's defaults.

torch-rnn's ``train.lua`` defaults: characters embedded in 64 dimensions, a
2-layer LSTM of 128 units, sequences of 50, batches of 50, Adam at 2e-3
halved every 5 epochs, gradients clamped to ±5, the hidden state carried
from one batch to the next. The text is split 90/5/5 into train, validation
and test, each read as ``batch-size`` contiguous streams. It prints the
validation loss in bits per character; ``--backend native`` runs the same
model on ``torch.nn.LSTM``'s kernel for comparison.

    python examples/char_lm.py --epochs 1
    python examples/char_lm.py --epochs 1 --backend native
    python examples/char_lm.py --cell my.cell --max-batches 200
"""
import argparse
import math
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # data.py, when imported from elsewhere

import rnndsl  # noqa: E402
from data import (CELL_HELP, HelpFormatter, Progress, batchify, bptt_batches, count_batches,  # noqa: E402
                  load_vector_cell, number, positive_int, require_windows, run, shared_data_dir)


def _default_data() -> Optional[Path]:
    shared = shared_data_dir()
    return None if shared is None else shared / "tiny-shakespeare.txt"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--data", type=Path, default=_default_data(),
                        help="a text file (default: ../shared/data/tiny-shakespeare.txt)")
    parser.add_argument("--cell", default="lstm", help=CELL_HELP)
    parser.add_argument("--backend", default="script", choices=("script", "eager", "native", "auto"),
                        help="how the cells run; native is torch's fused kernel")
    parser.add_argument("--wordvec-size", type=positive_int, default=64, help="character embedding size")
    parser.add_argument("--rnn-size", type=positive_int, default=128, help="hidden size of each layer")
    parser.add_argument("--num-layers", type=positive_int, default=2, help="number of layers")
    parser.add_argument("--dropout", type=number(at_least=0, below=1), default=0.0, help="dropout between layers")
    parser.add_argument("--seq-length", type=positive_int, default=50, help="truncated-BPTT length")
    parser.add_argument("--batch-size", type=positive_int, default=50, help="number of parallel streams")
    parser.add_argument("--lr", type=number(above=0), default=2e-3, help="Adam learning rate")
    parser.add_argument("--lr-decay-every", type=positive_int, default=5, help="epochs between decays")
    parser.add_argument("--lr-decay-factor", type=number(above=0), default=0.5, help="learning rate decay")
    parser.add_argument("--grad-clip", type=number(at_least=0), default=5.0, help="clamp each gradient to ±this")
    parser.add_argument("--epochs", type=positive_int, default=1, help="training budget in epochs "
                        "(torch-rnn trains 50)")
    parser.add_argument("--max-batches", type=positive_int,
                        help="at most this many batches per epoch and per evaluation")
    parser.add_argument("--seed", type=int, default=1111, help="random seed")
    parser.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.data is None:
        parser.error("no --data given and ../shared/data/tiny-shakespeare.txt is absent")
    if not args.data.is_file():
        parser.error(f"no such file: {args.data}")
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    return args


def load_splits(path: Path) -> Tuple[str, Tensor, Tensor, Tensor]:
    """The sorted characters of the text, and its first 90%, next 5% and last 5% as ids."""
    text = path.read_text(encoding="utf-8")
    alphabet = "".join(sorted(set(text)))
    index = {char: i for i, char in enumerate(alphabet)}
    ids = torch.tensor([index[char] for char in text], dtype=torch.long)
    train_end, valid_end = int(0.9 * len(ids)), int(0.95 * len(ids))
    return alphabet, ids[:train_end], ids[train_end:valid_end], ids[valid_end:]


class CharLM(nn.Module):
    """Embedding, recurrent layers, linear decoder over characters."""

    def __init__(self, cell, alphabet_size: int, args: argparse.Namespace) -> None:
        super().__init__()
        self.encoder = nn.Embedding(alphabet_size, args.wordvec_size)
        self.rnn = rnndsl.make_recurrent(cell, args.wordvec_size, [args.rnn_size] * args.num_layers,
                                  backend=args.backend, dropout=args.dropout)
        self.decoder = nn.Linear(self.rnn.network.output_size, alphabet_size)

    def forward(self, tokens: Tensor) -> Tensor:
        outputs, _ = self.rnn(self.encoder(tokens))
        return self.decoder(outputs)


def bits_per_character(model: CharLM, data: Tensor, args: argparse.Namespace) -> float:
    """Mean cross-entropy in bits over every full window of ``data`` (batch ``--batch-size``)."""
    model.eval()
    model.rnn.initialize_hidden(args.batch_size)
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, targets in bptt_batches(data, args.seq_length, args.max_batches, full_only=True):
            logits = model(inputs)
            total += F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                     reduction="sum").item()
            count += targets.numel()
    return total / count / math.log(2)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    alphabet, train, valid, test = load_splits(args.data)
    print(f"data: {args.data} | {len(alphabet)} characters | train {train.numel()}, "
          f"valid {valid.numel()}, test {test.numel()}")
    train, valid, test = (batchify(split, args.batch_size) for split in (train, valid, test))
    for split, source in (("training", train), ("validation", valid), ("test", test)):
        require_windows(source, args.seq_length, split, True, "give a smaller --seq-length or --batch-size")
    model = CharLM(load_vector_cell(args.cell), len(alphabet), args)
    print(f"model: cell {model.rnn.spec.name}, backend {model.rnn.backend}, "
          f"{sum(p.numel() for p in model.parameters())} parameters")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_decay_every, args.lr_decay_factor)
    for epoch in range(1, args.epochs + 1):
        model.train()
        model.rnn.initialize_hidden(args.batch_size)
        total = count_batches(train, args.seq_length, args.max_batches, full_only=True)
        progress = Progress(total, f"epoch {epoch}")
        start, loss_sum = time.perf_counter(), 0.0
        for inputs, targets in bptt_batches(train, args.seq_length, args.max_batches, full_only=True):
            logits = model(inputs)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            if args.grad_clip > 0:
                nn.utils.clip_grad_value_(model.parameters(), args.grad_clip)
            optimizer.step()
            loss_sum += loss.item()
            progress.update(bpc=loss.item() / math.log(2))
        progress.close()
        seconds = time.perf_counter() - start
        schedule.step()
        valid_bpc = bits_per_character(model, valid, args)
        print(f"| end of epoch {epoch:3d} | {total} batches, {1000 * seconds / total:6.1f} ms/batch, "
              f"train {seconds:6.1f} s | train bpc {loss_sum / total / math.log(2):.4f} "
              f"| valid bpc {valid_bpc:.4f}", flush=True)
    test_bpc = bits_per_character(model, test, args)
    print(f"| end of training | valid bpc {valid_bpc:.4f} | test bpc {test_bpc:.4f}")
    return {"valid_bpc": valid_bpc, "test_bpc": test_bpc}


if __name__ == "__main__":
    run(main)
