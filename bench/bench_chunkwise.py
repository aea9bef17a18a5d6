"""GLA and Mamba-2 SSD over time: the hand-written chunkwise form against the hand-written step
loop (bench/chunkwise_reference.py), forward+backward, time and peak memory.

Batch 4, 4 heads, key = value = 64 (SSD: dstate = head_dim = 64), float32, CPU, decays drawn
in [0.9, 0.999]; the loss is the sum of the outputs and of the final state. Times are medians
of interleaved rounds (every variant once per round), after two warm-up runs each.

Peak memory is measured in a fresh subprocess per variant and length: it runs the variant
once at a length of 64 (to load MKL, allocator pools), builds the inputs, resets the kernel's
peak-RSS mark (writing 5 to /proc/self/clear_refs), runs fwd+bwd once, and reports the peak
(VmHWM in /proc/self/status) above the RSS at the reset. That is what the operating system
had to give the process for the tensors autograd keeps and the temporaries, allocator slack
included. tracemalloc would miss torch's C++ allocations; an in-process peak would be hidden
by the largest earlier run; and getrusage's ru_maxrss is no good in a subprocess: Linux keeps
the parent's peak across fork and exec, so every row read as the bench's own size.

Each variant is one row of VARIANTS: a name, the model it computes (rows of one model are
compared with that model's step loop) and a function from the length to a fwd+bwd closure.
Three kinds of row:
- the hand-written step loop and chunkwise form (bench/chunkwise_reference.py);
- "rnndsl chunkwise gla|ssd": rnndsl.chunkwise.chunkwise_attention, the function rnndsl's
  generated code calls, on the same inputs: like for like with the hand-written chunkwise rows;
- "gla|mamba2 cell sequential|parallel": rnndsl's compiled stock cell in a network
  (``make_recurrent("gla", dim, [dim], heads=4, key=dim, value=dim)``), which also runs the
  cell's pre-norm and projections (six GEMMs of all steps), compared with the same cell's
  step loop (``scan="sequential"``, its derived backward).

    python -m bench.bench_chunkwise [--lengths 256 1024] [--rounds 5] [--no-memory] [--plot PNG]
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from bench.chunkwise_reference import gla_chunkwise, gla_step, ssd_chunkwise, ssd_step
from bench.timing import interleaved_medians

Run = Callable[[], None]


@dataclass(frozen=True)
class Shape:
    batch: int = 4
    heads: int = 4
    dim: int = 64  # key = value = dstate = head_dim
    gla_chunk_size: int = 32
    gla_sub_chunk_size: int = 8
    ssd_chunk_size: int = 64


@dataclass(frozen=True)
class Variant:
    name: str
    model: str  # rows of one model are compared with BASELINES[model]
    prepare: Callable[[int, Shape], Run]  # length -> one forward+backward, inputs made ahead


def _leaf(*size: int, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(*size, generator=generator)).requires_grad_()


def _log_decays(*size: int, generator: torch.Generator) -> torch.Tensor:
    """log of decays in [0.9, 0.999]: slow enough that the state remembers a few hundred steps."""
    return torch.log(0.9 + 0.099 * torch.rand(*size, generator=generator)).requires_grad_()


def _gla(function: Callable) -> Callable[[int, Shape], Run]:
    def prepare(steps: int, shape: Shape) -> Run:
        g = torch.Generator().manual_seed(0)
        size = (steps, shape.batch, shape.heads, shape.dim)
        q, k = _leaf(*size, generator=g, scale=shape.dim ** -0.5), _leaf(*size, generator=g, scale=shape.dim ** -0.5)
        v, log_alpha = _leaf(*size, generator=g), _log_decays(*size, generator=g)

        def run() -> None:
            outputs, state = function(q, k, v, log_alpha, shape)
            (outputs.sum() + state.sum()).backward()

        return run

    return prepare


def _ssd(function: Callable) -> Callable[[int, Shape], Run]:
    def prepare(steps: int, shape: Shape) -> Run:
        g = torch.Generator().manual_seed(0)
        size = (steps, shape.batch, shape.heads, shape.dim)
        x, B = _leaf(*size, generator=g), _leaf(*size, generator=g)
        C = _leaf(*size, generator=g, scale=shape.dim ** -0.5)
        log_a, D = _log_decays(*size[:3], generator=g), _leaf(shape.heads, generator=g)

        def run() -> None:
            outputs, state = function(x, log_a, B, C, D, shape)
            (outputs.sum() + state.sum()).backward()

        return run

    return prepare


def _rnndsl_core(per_key: bool) -> Callable:
    """rnndsl.chunkwise.chunkwise_attention, the function rnndsl's generated code calls, on the
    hand-written rows' inputs: like for like with them (no projections)."""
    def gla(q, k, v, log_alpha, shape):
        from rnndsl.chunkwise import chunkwise_attention
        steps, batch, heads, dim = q.shape
        return chunkwise_attention(q, k, v, log_alpha, q.new_zeros(batch, heads, dim, v.shape[-1]), steps,
                                   per_key=True)

    def ssd(x, log_a, B, C, D, shape):  # y = S^T C + D x with S' = a S + B x^T
        from rnndsl.chunkwise import chunkwise_attention
        steps, batch, heads, dim = x.shape
        y, state = chunkwise_attention(C, B, x, log_a, x.new_zeros(batch, heads, B.shape[-1], dim), steps)
        return y + D[:, None] * x, state

    return gla if per_key else ssd


def _rnndsl_cell(name: str, scan: str) -> Callable[[int, Shape], Run]:
    """rnndsl's compiled stock cell over time, input = hidden = dim, key = value (head_dim, dstate)
    = dim, heads from the shape: the cell runs its projections too."""

    def prepare(steps: int, shape: Shape) -> Run:
        import rnndsl

        torch.manual_seed(0)
        sizes = dict(key=shape.dim, value=shape.dim) if name == "gla" else dict(head_dim=shape.dim, dstate=shape.dim)
        network = rnndsl.make_recurrent(name, shape.dim, [shape.dim], scan=scan, heads=shape.heads, **sizes)
        xs = torch.randn(steps, shape.batch, shape.dim, requires_grad=True)

        def run() -> None:
            outputs, _ = network(xs)
            outputs.sum().backward()

        return run

    return prepare


VARIANTS: Dict[str, Variant] = {v.name: v for v in [
    Variant("gla step", "gla", _gla(lambda q, k, v, a, shape: gla_step(q, k, v, a))),
    Variant("gla chunkwise", "gla", _gla(lambda q, k, v, a, shape: gla_chunkwise(
        q, k, v, a, chunk_size=shape.gla_chunk_size, sub_chunk_size=shape.gla_sub_chunk_size))),
    Variant("ssd step", "ssd", _ssd(lambda x, a, B, C, D, shape: ssd_step(x, a, B, C, D))),
    Variant("ssd chunkwise", "ssd", _ssd(lambda x, a, B, C, D, shape: ssd_chunkwise(
        x, a, B, C, D, chunk_size=shape.ssd_chunk_size))),
    Variant("rnndsl chunkwise gla", "gla", _gla(_rnndsl_core(per_key=True))),
    Variant("rnndsl chunkwise ssd", "ssd", _ssd(_rnndsl_core(per_key=False))),
    Variant("gla cell sequential", "gla cell", _rnndsl_cell("gla", "sequential")),
    Variant("gla cell parallel", "gla cell", _rnndsl_cell("gla", "parallel")),
    Variant("mamba2 cell sequential", "mamba2 cell", _rnndsl_cell("mamba2", "sequential")),
    Variant("mamba2 cell parallel", "mamba2 cell", _rnndsl_cell("mamba2", "parallel")),
]}
# Each row is compared with its model's step loop: the hand-written one, or the cell's own loop.
BASELINES = {"gla": "gla step", "ssd": "ssd step", "gla cell": "gla cell sequential",
             "mamba2 cell": "mamba2 cell sequential"}


def _median_ms(runs: Dict[str, Run], rounds: int) -> Dict[str, float]:
    return {name: seconds * 1e3 for name, seconds in interleaved_medians(runs, rounds, warmups=2).items()}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def measure_peak_mb(name: str, steps: int, shape: Shape) -> float:
    """In this (fresh) process: peak RSS of one fwd+bwd above the RSS after the inputs and a warm-up."""
    variant = VARIANTS[name]
    variant.prepare(64, shape)()
    run = variant.prepare(steps, shape)
    # Heap the warm-up and the inputs' making freed goes back to the system first: the measured
    # call would reuse it without raising the peak (5-10% low without this).
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # the peak mark starts again from the RSS now (Linux 4.0 and later)
    baseline = _status_mb("VmRSS")
    run()
    return _status_mb("VmHWM") - baseline


def _peak_mb_in_subprocess(name: str, steps: int, args: argparse.Namespace) -> Optional[float]:
    command = [sys.executable, "-m", "bench.bench_chunkwise", "--peak-of", name, str(steps),
               "--threads", str(torch.get_num_threads()), "--batch", str(args.batch), "--heads", str(args.heads),
               "--dim", str(args.dim), "--gla-chunk-size", str(args.gla_chunk_size),
               "--gla-sub-chunk-size", str(args.gla_sub_chunk_size), "--ssd-chunk-size", str(args.ssd_chunk_size)]
    if args.rnndsl_from:
        command += ["--rnndsl-from", str(args.rnndsl_from)]
    # The median of three processes: one process's peak varied by up to 1.6x with the allocator.
    peaks = []
    for _ in range(3):
        done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        if done.returncode:
            print(f"  memory of {name} at T={steps} failed: {done.stderr.strip().splitlines()[-1:]}",
                  file=sys.stderr)
            return None
        peaks.append(json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"])
    return statistics.median(peaks)


def _usable(names: List[str], shape: Shape) -> Dict[str, Variant]:
    """The variants that build and run here at a tiny length; the others are named with the reason."""
    usable = {}
    for name in names:
        try:
            VARIANTS[name].prepare(3, shape)()
        except Exception as error:  # noqa: BLE001 - a variant this checkout cannot build is skipped, not fatal
            print(f"skipped {name}: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
            continue
        usable[name] = VARIANTS[name]
    return usable


def write_plot(path: Path, rows: List[dict], title: str) -> None:
    """Time and peak memory against T, log-log, one line per variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 5))
    for axis, (metric, label) in zip(axes, (("ms", "fwd+bwd ms (median)"), ("peak_mb", "peak RSS above inputs, MB"))):
        for name in dict.fromkeys(r["variant"] for r in rows):
            points = [(r["T"], r[metric]) for r in rows if r["variant"] == name and r[metric] is not None]
            if points:
                style = "-" if "chunkwise" in name else "--" if "step" in name else ":"
                axis.plot(*zip(*points), style, marker="o", label=name)
        axis.set(xscale="log", yscale="log", xlabel="T", ylabel=label)
        axis.set_xticks(sorted({r["T"] for r in rows}))
        axis.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize="small")
    figure.suptitle(title, fontsize="medium")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--gla-chunk-size", type=int, default=Shape.gla_chunk_size)
    parser.add_argument("--gla-sub-chunk-size", type=int, default=Shape.gla_sub_chunk_size)
    parser.add_argument("--ssd-chunk-size", type=int, default=Shape.ssd_chunk_size)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory subprocesses")
    parser.add_argument("--plot", type=Path, help="write time and memory against T to this PNG")
    parser.add_argument("--rnndsl-from", type=Path, help="import rnndsl from this checkout (one whose cells/ has gla)")
    parser.add_argument("--peak-of", nargs=2, metavar=("VARIANT", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rnndsl_from:
        sys.path.insert(0, str(args.rnndsl_from.resolve()))
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = Shape(args.batch, args.heads, args.dim, args.gla_chunk_size, args.gla_sub_chunk_size, args.ssd_chunk_size)
    if args.peak_of:
        name, steps = args.peak_of
        print(json.dumps({"peak_mb": measure_peak_mb(name, int(steps), shape)}))
        return

    variants = _usable(args.variants, shape)
    print(f"fwd+bwd, batch {shape.batch}, {shape.heads} heads, key = value = {shape.dim}, float32, "
          f"{torch.get_num_threads()} threads, chunks GLA {shape.gla_chunk_size}/{shape.gla_sub_chunk_size} "
          f"SSD {shape.ssd_chunk_size}; "
          f"ms: medians of {args.rounds} interleaved rounds; MB: peak RSS above inputs, median of 3 fresh "
          "processes")
    print(f"{'T':>6} {'variant':<24} {'ms':>10} {'peak MB':>9} {'vs step loop':>13}")
    rows = []
    for steps in args.lengths:
        ms = _median_ms({name: variant.prepare(steps, shape) for name, variant in variants.items()}, args.rounds)
        for name, variant in variants.items():
            peak = _peak_mb_in_subprocess(name, steps, args) if args.memory else None
            baseline = ms.get(BASELINES[variant.model])
            speedup = f"{baseline / ms[name]:>12.2f}x" if baseline else f"{'':>13}"
            peak_text = f"{peak if peak is not None else float('nan'):>9.0f}"
            print(f"{steps:>6} {name:<24} {ms[name]:>10.1f} {peak_text} {speedup}", flush=True)
            rows.append({"T": steps, "variant": name, "ms": ms[name], "peak_mb": peak})
    if args.plot:
        write_plot(args.plot, rows, f"GLA and SSD fwd+bwd, batch {shape.batch}, {shape.heads} heads, dim {shape.dim}, "
                                    f"float32, {torch.get_num_threads()} CPU threads")
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
