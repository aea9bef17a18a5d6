"""torch.export of a 2-layer rnndsl.LSTM with a dynamic sequence length: export time at two traced
lengths, the program's size, and the program against the module at a third length.

    python -m bench.bench_export                  # hidden 256, batch 4
    python -m bench.bench_export --hidden 512 --steps 20 200 --run-steps 1000
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import rnndsl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 200], help="traced lengths")
    parser.add_argument("--run-steps", type=int, default=1000, help="length the program then runs at")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    module = rnndsl.LSTM(args.hidden, args.hidden, num_layers=2).eval()
    dynamic = ({0: torch.export.Dim("T", min=2, max=1 << 20)},)
    program = torch.export.export(module, (torch.randn(2, args.batch, args.hidden),), dynamic_shapes=dynamic)
    for steps in args.steps:  # the first export of a process also pays for warming up; not timed
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            program = torch.export.export(module, (torch.randn(steps, args.batch, args.hidden),),
                                          dynamic_shapes=dynamic)
            times.append(time.perf_counter() - start)
        print(f"export traced at T={steps}: {statistics.median(times):.2f} s (median of {args.rounds}), "
              f"{len(program.graph.nodes)} nodes")
    x = torch.randn(args.run_steps, args.batch, args.hidden)
    with torch.no_grad():
        start = time.perf_counter()
        exported = program.module()(x)[0]
        program_time = time.perf_counter() - start
        module(x)
        start = time.perf_counter()
        direct = module(x)[0]
        module_time = time.perf_counter() - start
    print(f"at T={args.run_steps}: program {program_time:.2f} s, module {module_time:.2f} s, "
          f"max |difference| {(exported - direct).abs().max().item():.1e}")


if __name__ == "__main__":
    main()
