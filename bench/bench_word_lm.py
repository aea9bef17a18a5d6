"""The main job's pace: examples/word_lm.py's training and evaluation, rnndsl's backends side by side.

    python -m bench.bench_word_lm                          # ptb-small (or Python's docs), 1 thread
    python -m bench.bench_word_lm --backends script native eager --rounds 9

Each backend gets the example's own model (``WordLM``: embedding, 2x200 layers of the cell,
decoder over the whole vocabulary) from the same seed, and the example's own step
(``train_step``: forward, cross-entropy, backward, clipping, SGD; ``window_loss_sum``: a
batch-1 evaluation window). Every round runs ``--batches`` training windows then as many
evaluation windows on each backend in turn (every other round in reverse order), the
state carried as in an epoch. The report: the median ms per window over the rounds, and each
backend's ratio to ``native`` (torch's fused LSTM kernel, what ``--backend native`` trains
with), the median of the rounds' ratios.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # examples/ is not installed

import rnndsl  # noqa: E402
import word_lm  # noqa: E402
from data import batchify, bptt_batches, shared_data_dir  # noqa: E402


def windows(source: torch.Tensor, bptt: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """The training windows over and over, as epochs follow each other."""
    while True:
        yield from bptt_batches(source, bptt, full_only=True)


def measure(args: argparse.Namespace) -> Dict[str, Dict[str, List[float]]]:
    """Seconds per training window and per evaluation window of each backend, round by round."""
    data = args.data
    if data is None and shared_data_dir() is not None:
        data = shared_data_dir() / "ptb-small"
    options = word_lm.parse_args(["--data", str(data)] if data is not None and data.is_dir() else [])
    print(f"corpus: {options.train or 'Python documentation (no ../shared/data)'}", flush=True)
    vocabulary, train, valid, _ = word_lm.load_corpus(options)
    train = batchify(train, options.batch_size)
    valid = valid.view(-1, 1)
    runs = {}
    for backend in args.backends:
        torch.manual_seed(options.seed)
        model = word_lm.WordLM(rnndsl.load_cell(args.cell), len(vocabulary), options.emsize, options.nhid, backend)
        optimizer = torch.optim.SGD(model.parameters(), lr=options.lr)
        runs[backend] = (model, optimizer, windows(train, options.bptt), windows(valid, options.bptt))

    def train_windows(backend: str, count: int) -> float:
        model, optimizer, batches, _ = runs[backend]
        model.train()
        parameters: List[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
        start = time.perf_counter()
        for _ in range(count):
            inputs, targets = next(batches)
            word_lm.train_step(model, inputs, targets, optimizer, parameters, options.clip)
        return (time.perf_counter() - start) / count

    def evaluate_windows(backend: str, count: int) -> float:
        model, _, _, batches = runs[backend]
        model.eval()
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(count):
                inputs, targets = next(batches)
                word_lm.window_loss_sum(model, inputs, targets)
        return (time.perf_counter() - start) / count

    for backend in args.backends:  # warm-up: the first calls build and profile
        runs[backend][0].rnn.initialize_hidden(options.batch_size)
        train_windows(backend, 3)
        runs[backend][0].rnn.initialize_hidden(1)
        evaluate_windows(backend, 3)
    times = {backend: {"train": [], "evaluate": []} for backend in args.backends}
    for round_ in range(args.rounds):
        # Every other round in reverse order, so that no backend always follows the same one.
        for backend in args.backends[::1 if round_ % 2 == 0 else -1]:
            runs[backend][0].rnn.initialize_hidden(options.batch_size)
            times[backend]["train"].append(train_windows(backend, args.batches))
            runs[backend][0].rnn.initialize_hidden(1)
            times[backend]["evaluate"].append(evaluate_windows(backend, args.batches))
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    return times


def report(times: Dict[str, Dict[str, List[float]]], reference: str) -> str:
    """Median ms per window, and the median over rounds of each round's ratio to ``reference``
    (paired within a round, so that the machine's drift between rounds cancels)."""
    lines = [f"{'backend':<10} {'train ms/window':>16} {'x ' + reference:>10} "
             f"{'eval ms/window':>15} {'x ' + reference:>10}"]
    for backend, kinds in times.items():
        cells = []
        for kind in ("train", "evaluate"):
            ratios = ([ours / theirs for ours, theirs in zip(kinds[kind], times[reference][kind])]
                      if reference in times else [float("nan")])
            cells.append((1000 * statistics.median(kinds[kind]), statistics.median(ratios)))
        (train, train_ratio), (evaluate, evaluate_ratio) = cells
        lines.append(f"{backend:<10} {train:16.2f} {train_ratio:10.3f} {evaluate:15.2f} {evaluate_ratio:10.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="directory with train/valid/test.txt "
                                                  "(default ../shared/data/ptb-small, else Python's docs)")
    parser.add_argument("--cell", default="lstm", help="stock cell name or .cell path")
    parser.add_argument("--backends", nargs="+", default=["native", "script"],
                        choices=("native", "script", "eager"))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batches", type=int, default=20, help="windows per backend per round")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    times = measure(args)
    print(f"word_lm, {args.cell}, {torch.get_num_threads()} thread(s), median of {args.rounds} rounds "
          f"of {args.batches} windows per backend")
    print(report(times, "native"))


if __name__ == "__main__":
    main()
