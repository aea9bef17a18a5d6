"""Where a no-grad sequence should take torch's sequence kernel: ``torch.lstm`` / ``gru`` / ``rnn_tanh``
against the generated loop, for the stock cells, by hidden size and batch.

    python -m bench.bench_fused_sequence                          # lstm, gru, rnn_tanh; 1 thread
    python -m bench.bench_fused_sequence --cells lstm --hidden 256 362 512 --batch 1 8 --threads 2

A built cell picks between the two by ``NativeMode.sequence_kernel_bounds`` (rnndsl/native.py).
This benchmark runs the same cell both ways in every round (the two interleaved, medians) and
prints, for each size, the kernel's time over the loop's and whether the bounds pick the faster
one (or one within 5% of it); ``--csv`` keeps the table.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import time
import warnings
from typing import Dict, List

import torch

import rnndsl

ALWAYS_KERNEL = None  # bounds that let every size through
NEVER_KERNEL = (-1, 2 ** 62)  # bounds that no weight and no batch meets
NOISE = 1.05


def timed_both_ways(cell_name: str, hidden: int, batch: int, steps: int, rounds: int, calls: int) -> Dict[str, float]:
    """Median seconds of one sequence call through torch's kernel and through the generated loop."""
    torch.manual_seed(0)
    cell = rnndsl.load_cell(cell_name).build(hidden, hidden)
    picked = cell._fused_sequence_bounds
    xs = torch.randn(steps, batch, hidden)
    state = tuple(torch.zeros(batch, hidden) for _ in cell.state_names)
    ways = {"kernel": ALWAYS_KERNEL, "loop": NEVER_KERNEL}
    times: Dict[str, List[float]] = {way: [] for way in ways}
    with torch.no_grad():
        outputs = {}
        for way, bounds in ways.items():
            cell._fused_sequence_bounds = bounds
            for _ in range(calls):
                outputs[way] = cell.forward_sequence(xs, state)[0]
        torch.testing.assert_close(outputs["kernel"], outputs["loop"], rtol=1e-4, atol=1e-5)
        for _ in range(rounds):
            for way, bounds in ways.items():
                cell._fused_sequence_bounds = bounds
                start = time.perf_counter()
                for _ in range(calls):
                    cell.forward_sequence(xs, state)
                times[way].append((time.perf_counter() - start) / calls)
        cell._fused_sequence_bounds = picked
        kernel_runs = cell._fused_sequence_of(state, xs, None) is not None  # the cell's own choice
    medians = {way: statistics.median(values) for way, values in times.items()}
    return {**medians, "picks_kernel": kernel_runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", nargs="+", default=["lstm", "gru", "rnn_tanh"])
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 200, 256, 362, 512, 650, 1024])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8, 20, 64])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5, help="sequence calls per way per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--csv", help="write the table here too")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    print(f"{args.steps} steps, no_grad, {torch.get_num_threads()} thread(s), "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}; kernel / loop time, "
          f"medians of {args.rounds}", flush=True)
    rows = []
    for cell_name in args.cells:
        for hidden in args.hidden:
            for batch in args.batch:
                result = timed_both_ways(cell_name, hidden, batch, args.steps, args.rounds, args.calls)
                ratio = result["kernel"] / result["loop"]
                picked = "kernel" if result["picks_kernel"] else "loop"
                # Within 5% is the machines' noise, not a wrong pick.
                verdict = "ok" if result[picked] <= NOISE * min(result["kernel"], result["loop"]) else "slower pick"
                print(f"{cell_name:<9} hidden {hidden:5d} batch {batch:3d}: kernel {result['kernel'] * 1e3:8.3f} ms, "
                      f"loop {result['loop'] * 1e3:8.3f} ms, {ratio:5.2f}x; picks {picked:<6} {verdict}", flush=True)
                rows.append({"cell": cell_name, "hidden": hidden, "batch": batch, "threads": torch.get_num_threads(),
                             "kernel_ms": round(result["kernel"] * 1e3, 4), "loop_ms": round(result["loop"] * 1e3, 4),
                             "ratio": round(ratio, 3), "picks": picked})
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
