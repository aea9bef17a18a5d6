"""Where a no-grad sequence should take torch's sequence kernel: ``torch.lstm`` / ``gru`` / ``rnn_tanh``
against the generated loop (the script backend's), for the stock cells, by hidden size and batch.

    python -m bench.bench_fused_sequence                          # lstm, gru, rnn_tanh; 1 thread
    python -m bench.bench_fused_sequence --cells lstm --hidden 256 362 512 --batch 1 8 --threads 2

A built cell picks between the two by ``NativeMode.sequence_kernel_bounds`` (rnndsl/native.py).
This benchmark runs the same cell both ways in every round (the two interleaved, medians) and
prints, for each size, the kernel's time over the loop's, which way the cell itself takes, and
whether that way is the faster one or within 5% of it; ``--csv`` keeps the table.
"""
from __future__ import annotations

import argparse
import csv
import warnings
from typing import Callable, Dict, Tuple

import torch

import rnndsl
from bench.timing import interleaved_medians

ALWAYS_KERNEL = None  # bounds that let every size through
NEVER_KERNEL = (-1, 2 ** 62)  # bounds that no weight and no batch meets
WITHIN_NOISE = 1.05  # a way at most 5% slower than the other is no wrong pick on these machines


def counting_kernel_calls(cell) -> Callable[[], int]:
    """Wraps the cell's fused sequence (torch.lstm, ...) to count the calls that take it; returns
    the count's reader."""
    kernel, calls = cell._fused_sequence, [0]

    def counted(*args):
        calls[0] += 1
        return kernel(*args)
    cell._fused_sequence = counted
    return lambda: calls[0]


def timed_both_ways(cell_name: str, hidden: int, batch: int, steps: int, rounds: int,
                    calls: int) -> Tuple[Dict[str, float], str]:
    """Median seconds of one sequence call through torch's kernel and through the generated loop,
    and the way the cell takes with its own bounds ("kernel" or "loop")."""
    torch.manual_seed(0)
    cell = rnndsl.load_cell(cell_name).build(hidden, hidden)
    own_bounds = cell._fused_sequence_bounds
    xs = torch.randn(steps, batch, hidden)
    state = tuple(torch.zeros(batch, hidden) for _ in cell.state_names)

    def run_with(bounds):
        def run():
            cell._fused_sequence_bounds = bounds
            return cell.forward_sequence(xs, state)[0]
        return run
    ways = {"kernel": run_with(ALWAYS_KERNEL), "loop": run_with(NEVER_KERNEL)}
    with torch.no_grad():
        kernel = cell._fused_sequence
        kernel_calls = counting_kernel_calls(cell)
        outputs = {way: run() for way, run in ways.items()}
        if kernel_calls() != 1:  # the kernel way took it once, the loop way never
            raise RuntimeError(f"{cell_name}: the two ways did not take the two paths ({kernel_calls()} kernel calls)")
        torch.testing.assert_close(outputs["kernel"], outputs["loop"], rtol=1e-4, atol=1e-5)
        run_with(own_bounds)()
        own_way = "kernel" if kernel_calls() == 2 else "loop"
        cell._fused_sequence = kernel  # timed without the counter
        medians = interleaved_medians(ways, rounds, calls, warmups=calls)
    return medians, own_way


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", nargs="+", default=["lstm", "gru", "rnn_tanh"])
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 200, 256, 362, 512, 650, 1024])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8, 20, 64])
    parser.add_argument("--steps", type=int, default=20,
                        help="at least 2: a one-step sequence takes the one-step kernel instead")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5, help="sequence calls per way per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--csv", help="write the table here too")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2: a one-step sequence takes the one-step kernel, not the sequence's")
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    print(f"{args.steps} steps, no_grad, script backend, {torch.get_num_threads()} thread(s), "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}; kernel / loop time, "
          f"medians of {args.rounds}", flush=True)
    rows = []
    for cell_name in args.cells:
        for hidden in args.hidden:
            for batch in args.batch:
                medians, own_way = timed_both_ways(cell_name, hidden, batch, args.steps, args.rounds, args.calls)
                ratio = medians["kernel"] / medians["loop"]
                verdict = "ok" if medians[own_way] <= WITHIN_NOISE * min(medians.values()) else "slower pick"
                print(f"{cell_name:<9} hidden {hidden:5d} batch {batch:3d}: kernel {medians['kernel'] * 1e3:8.3f} ms, "
                      f"loop {medians['loop'] * 1e3:8.3f} ms, {ratio:5.2f}x; picks {own_way:<6} {verdict}", flush=True)
                rows.append({"cell": cell_name, "hidden": hidden, "batch": batch, "threads": torch.get_num_threads(),
                             "kernel_ms": round(medians["kernel"] * 1e3, 4), "loop_ms": round(medians["loop"] * 1e3, 4),
                             "ratio": round(ratio, 3), "picks": own_way})
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
