"""torch.export and AOTInductor of a 2-layer rnndsl.LSTM with a dynamic length and batch: export
time, AOTInductor compile time, and no_grad forward time at several lengths of the module, the
exported program, the AOTInductor package and torch.nn.LSTM (medians).

    python -m bench.bench_export                  # hidden 256, batch 4, T = 20 200 1000
    python -m bench.bench_export --hidden 512 --steps 20 200 --no-aoti
"""
from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, List

import torch

import rnndsl
from bench.timing import interleaved_medians


def median_seconds(run: Callable[..., object], rounds: int, *args: object) -> float:
    """The median wall time of ``run(*args)`` over ``rounds`` calls."""
    times: List[float] = []
    for _ in range(rounds):
        start = time.perf_counter()
        run(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 200, 1000], help="lengths the forwards run at")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-aoti", action="store_true", help="skip the AOTInductor compile (~20 s)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    reference = torch.nn.LSTM(args.hidden, args.hidden, num_layers=2).eval()
    module = rnndsl.LSTM(args.hidden, args.hidden, num_layers=2).eval()
    module.load_state_dict(reference.state_dict())
    example = (torch.randn(20, args.batch, args.hidden),)
    dynamic = ({0: torch.export.Dim("T", min=1, max=1 << 20), 1: torch.export.Dim("batch", min=1, max=1 << 16)},)

    torch.export.export(module, example, dynamic_shapes=dynamic)  # the first export also warms up; not timed
    programs = []
    export_time = median_seconds(lambda: programs.append(torch.export.export(module, example,
                                                                             dynamic_shapes=dynamic)), args.rounds)
    program = programs[-1]
    print(f"torch.export (T and batch dynamic): {export_time:.2f} s (median of {args.rounds}), "
          f"{str(program.graph).count('higher_order.scan')} scan nodes")
    runners = {"rnndsl module": module, "exported program": program.module(), "torch.nn.LSTM": reference}
    if not args.no_aoti:
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            path = torch._inductor.aoti_compile_and_package(program, package_path=str(Path(folder) / "lstm.pt2"))
            print(f"AOTInductor compile: {time.perf_counter() - start:.1f} s")
            runners["AOTInductor"] = torch._inductor.aoti_load_package(path)

    print(f"no_grad forward, batch {args.batch}, hidden {args.hidden}, medians of {args.rounds} interleaved "
          "rounds (ms); under no_grad the module runs torch's fused kernel at these sizes "
          "(rnndsl/cellspec.py, fused_sequence), the exported program the cells' generated code:")
    print(f"{'':>18}" + "".join(f"{f'T={steps}':>10}" for steps in args.steps))
    cells = {name: [] for name in runners}
    with torch.no_grad():
        for steps in args.steps:
            x = torch.randn(steps, args.batch, args.hidden)
            want = reference(x)[0]
            for name, run in runners.items():
                difference = (run(x)[0] - want).abs().max().item()
                if difference > 1e-4:
                    raise AssertionError(f"{name} differs from torch.nn.LSTM at T={steps} by {difference:.1e}")
            medians = interleaved_medians({name: functools.partial(run, x) for name, run in runners.items()},
                                          args.rounds, warmups=1)
            for name, seconds in medians.items():
                cells[name].append(f"{seconds * 1e3:>10.1f}")
    for name, row in cells.items():
        print(f"{name:>18}" + "".join(row))


if __name__ == "__main__":
    main()
