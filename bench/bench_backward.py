"""Forward+backward of a 2-layer LSTM: torch.nn.LSTM vs rnndsl with and without the derived backward.

The check for issue 5's goal on the default ("script") backend: rnndsl's cells
train through the backward derived from their equations (rnndsl/codegen/backward.py);
``derived_backward=False`` builds make them train through autograd of the
compiled loop instead. Also timed: a plain Python loop of an LSTM cell (the
naive baseline of bench/benchmark.py). Seq 20, batch 64, input size = hidden.

Variants run interleaved (the order rotates every round) after a warm-up, so a
busy neighbour slows all of them alike; the table gives medians of wall time and
of process CPU time per forward+backward, and their ratios to torch.nn.LSTM
measured in the same rounds. CPU time is the steadier figure on a shared machine;
there, OpenMP threads that spin while another job holds the other core can
slow every variant several-fold: ``OMP_WAIT_POLICY=PASSIVE`` or ``--threads 1``.

    python -m bench.bench_backward                      # hidden 256, 512, 1024
    python -m bench.bench_backward --hidden 256 --rounds 30 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List, Sequence

import torch
from torch import Tensor, nn

import rnndsl
from bench.benchmark import LoopLSTM, OutputsOnly


class CellStack(nn.Module):
    """rnndsl cells stacked in layers, each scanned over the sequence from a zero state."""

    def __init__(self, hidden: int, layers: int, derived_backward: bool) -> None:
        super().__init__()
        spec = rnndsl.load_cell("lstm")
        self.cells = nn.ModuleList(spec.build(hidden, hidden, derived_backward=derived_backward)
                                   for _ in range(layers))

    def forward(self, xs: Tensor) -> Tensor:
        for cell in self.cells:
            zeros = xs.new_zeros(xs.size(1), cell.hidden_size)
            xs, _ = rnndsl.scan(cell, xs, (zeros, zeros))
        return xs


def variants(hidden: int, layers: int) -> Dict[str, nn.Module]:
    reference = nn.LSTM(hidden, hidden, layers)
    found = {
        "torch.nn.LSTM": OutputsOnly(reference),
        "python loop": LoopLSTM(reference),
        "rnndsl derived backward": CellStack(hidden, layers, derived_backward=True),
        "rnndsl autograd of the loop": CellStack(hidden, layers, derived_backward=False),
    }
    # All on torch.nn.LSTM's weights, so they compute the same function.
    for name in ("rnndsl derived backward", "rnndsl autograd of the loop"):
        with torch.no_grad():
            for depth, cell in enumerate(found[name].cells):
                for parameter_name, parameter in cell.named_parameters():
                    parameter.copy_(getattr(reference, f"{parameter_name}_l{depth}"))
    return found


def forward_backward(model: nn.Module, xs: Tensor, grad: Tensor) -> Callable[[], None]:
    def run() -> None:
        for parameter in model.parameters():
            parameter.grad = None
        model(xs).backward(grad)
    return run


def measure(hidden: int, args: argparse.Namespace) -> List[str]:
    torch.manual_seed(0)
    models = variants(hidden, args.layers)
    xs = torch.randn(args.seq, args.batch, hidden, requires_grad=False)
    grad = torch.randn(args.seq, args.batch, hidden)
    calls = {name: forward_backward(model, xs, grad) for name, model in models.items()}
    for _ in range(args.warmup):
        for call in calls.values():
            call()
    wall: Dict[str, List[float]] = {name: [] for name in calls}
    cpu: Dict[str, List[float]] = {name: [] for name in calls}
    names = list(calls)
    for round_ in range(args.rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            calls[name]()
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)
    base_wall, base_cpu = (statistics.median(d["torch.nn.LSTM"]) for d in (wall, cpu))
    lines = []
    for name in names:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        lines.append(f"{hidden:>6} {name:<28} {w * 1e3:9.1f} {w / base_wall:6.2f}x {c * 1e3:9.1f} "
                     f"{c / base_cpu:6.2f}x")
    return lines


def main(argv: Sequence[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--seq", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"forward+backward, {args.layers} layers, seq {args.seq}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds")
    print(f"{'hidden':>6} {'variant':<28} {'wall ms':>9} {'ratio':>7} {'cpu ms':>9} {'ratio':>7}")
    for hidden in args.hidden:
        for line in measure(hidden, args):
            print(line, flush=True)


if __name__ == "__main__":
    main()
