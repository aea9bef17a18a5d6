"""torch.compile of rnndsl networks: how long the compile takes at two lengths, and how fast the
compiled network trains against the script backend and torch.nn.LSTM.

    python -m bench.bench_compile                      # compile times, then fwd+bwd at hidden 256 512 1024
    python -m bench.bench_compile --skip-speed --steps 20 200
    python -m bench.bench_compile --skip-compile-time --hidden 256 --rounds 11
    python -m bench.bench_compile --skip-compile-time --device cuda --hidden 256 512 1024 2048 4096

Compile time is measured in a fresh process per case (the first compile of a process also
loads dynamo and Inductor, which a second compile in the same process would not pay): the
time of the first compiled forward+backward minus that of the next ones (median of 3). The cases: a
2-layer ``rnndsl.LSTM`` (hidden 256, batch 16) on each backend, and, for contrast, the same
LSTM written as a plain Python loop over time, which dynamo unrolls at the traced length.
Speed: fwd+bwd of a 1-layer LSTM (T=20, batch 64), all variants interleaved in each round,
medians; ratios against torch.nn.LSTM.
"""
from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import warnings

import torch

import rnndsl
from bench.timing import interleaved_medians, set_tf32

_COMPILE_CASE = r"""
import time, warnings, torch, rnndsl
warnings.simplefilter("ignore")
torch._inductor.config.force_disable_caches = True  # else a second run reads Inductor's disk cache (8x less)
kind, steps, hidden = {kind!r}, {steps}, {hidden}
torch.manual_seed(0)
if kind == "python loop":
    cells = torch.nn.ModuleList([torch.nn.LSTMCell(hidden, hidden) for _ in range(2)])
    def model(xs):
        h = [xs.new_zeros(xs.size(1), hidden) for _ in cells]; c = list(h)
        outputs = []
        for x in xs:
            for i, cell in enumerate(cells):
                h[i], c[i] = cell(x, (h[i], c[i])); x = h[i]
            outputs.append(x)
        return torch.stack(outputs), cells
else:
    model = rnndsl.LSTM(hidden, hidden, num_layers=2, backend=kind)
xs = torch.randn(steps, 16, hidden)
def run(f):
    start = time.perf_counter(); f(xs)[0].sum().backward(); return time.perf_counter() - start
compiled = torch.compile(model)
first = run(compiled)
print(first - sorted(run(compiled) for _ in range(3))[1])
"""


def compile_seconds(kind: str, steps: int, hidden: int) -> float:
    """Seconds the first compiled fwd+bwd takes beyond a later one, in a fresh process."""
    code = _COMPILE_CASE.format(kind=kind, steps=steps, hidden=hidden)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def speed(hidden: int, rounds: int, device: str, steps: int = 20, batch: int = 64) -> dict:
    """Median fwd+bwd seconds of each variant of a 1-layer LSTM at ``hidden``; a variant that fails
    to compile or run is reported and left out."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()  # each size compiled afresh: no automatic dynamic shapes, no recompile limit
    torch.manual_seed(0)
    reference = torch.nn.LSTM(hidden, hidden).to(device)
    script = rnndsl.LSTM(hidden, hidden).to(device)
    eager = rnndsl.LSTM(hidden, hidden, backend="eager").to(device)
    compile_ = functools.partial(torch.compile, dynamic=False)
    variants = {"torch.nn.LSTM": reference, "rnndsl script": script,
                "rnndsl script, compiled": compile_(script), "rnndsl eager, compiled": compile_(eager)}
    if device == "cuda":  # CUDA graphs replay each step's launches without Python or the CPU in the way
        variants["rnndsl script, compiled reduce-overhead"] = compile_(script, mode="reduce-overhead")
    xs = torch.randn(steps, batch, hidden, device=device)

    def step(model) -> None:
        model(xs)[0].sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    # Three warm-up calls each: the first compiles, and CUDA graphs record on the third.
    working = {}
    for name, model in variants.items():
        skips = counters["inductor"]["cudagraph_skips"]
        try:
            for _ in range(3):
                step(model)
        except Exception as error:  # noqa: BLE001 (one variant must not void the others' numbers)
            print(f"  hidden {hidden}: {name} failed and is left out: {type(error).__name__}: {error}", flush=True)
            continue
        if "reduce-overhead" in name and counters["inductor"]["cudagraph_skips"] > skips:
            name += " (CUDA graphs skipped)"
        working[name] = functools.partial(step, model)
    return interleaved_medians(working, rounds, warmups=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 200], help="lengths to compile at")
    parser.add_argument("--compile-hidden", type=int, default=256)
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-compile-time", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--kinds", nargs="+", default=["script", "eager", "python loop"])
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    # As bench.benchmark: every variant in full float32, cuDNN's LSTM too (cuDNN may use TF32 by default).
    set_tf32(False)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, TF32 off", flush=True)
    if not args.skip_compile_time:
        print(f"compile time, 2-layer LSTM, hidden {args.compile_hidden}, batch 16 "
              "(first compiled fwd+bwd minus a later one)")
        for kind in args.kinds:
            cells = [f"T={steps}: {compile_seconds(kind, steps, args.compile_hidden):6.1f} s" for steps in args.steps]
            print(f"  {kind:<12} " + "   ".join(cells))
    if not args.skip_speed:
        print(f"fwd+bwd, 1 layer, T=20, batch 64, {args.device}, {torch.get_num_threads()} threads, "
              f"median of {args.rounds} interleaved rounds")
        for hidden in args.hidden:
            medians = speed(hidden, args.rounds, args.device)
            base = medians["torch.nn.LSTM"]
            print(f"  hidden {hidden}: " + ", ".join(f"{name} {value * 1e3:.1f} ms ({value / base:.2f}x)"
                                                    for name, value in medians.items()))


if __name__ == "__main__":
    main()
