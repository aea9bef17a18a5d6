"""Time rnndsl.linear_scan against the sequential loop.

Default: forward + backward of ``linear_recurrence`` and of the autograd loop
``sequential_linear_recurrence``, run alternately, medians side by side for
T = 64, 128, ..., 4096. ``--algorithms`` instead times the forward pass of the
candidate parallel algorithms (the chunked scan shipped, Hillis-Steele
doubling, log-space cumsum) and their error against a float64 loop.

    .venv/bin/python bench/bench_linear_scan.py [--threads 2] [--clock cpu] [--csv PATH]
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path
from typing import Callable, List

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.timing import interleaved_medians  # noqa: E402
from rnndsl.linear_scan import linear_recurrence, sequential_linear_recurrence  # noqa: E402


def hillis_steele(a: Tensor, b: Tensor, s0: Tensor) -> Tensor:
    """Doubling scan: log2(T) rounds, each combining every step with the one `offset` back."""
    b = torch.cat([(b[0] + a[0] * s0).unsqueeze(0), b[1:]])
    offset = 1
    while offset < a.size(0):
        b = torch.cat([b[:offset], torch.addcmul(b[offset:], a[offset:], b[:-offset])])
        a = torch.cat([a[:offset], a[offset:] * a[:-offset]])
        offset *= 2
    return b


def log_space(a: Tensor, b: Tensor, s0: Tensor) -> Tensor:
    """s_t = P_t (s0 + sum_k b_k / P_k) with P_t = a_1...a_t, summed in logs, signs apart."""
    log_p = torch.log(a.abs()).cumsum(0)
    sign_p = torch.where(a < 0, -1.0, 1.0).to(a.dtype).cumprod(0)
    terms = torch.cat([s0.unsqueeze(0), b * sign_p])
    log_terms = torch.log(terms.abs()) - torch.cat([torch.zeros_like(s0).unsqueeze(0), log_p])
    minus_inf = torch.tensor(-math.inf, dtype=a.dtype)
    positive = torch.logcumsumexp(torch.where(terms > 0, log_terms, minus_inf), 0)[1:]
    negative = torch.logcumsumexp(torch.where(terms < 0, log_terms, minus_inf), 0)[1:]
    return sign_p * (torch.exp(log_p + positive) - torch.exp(log_p + negative))


def inputs(steps: int, batch: int, hidden: int, dtype: torch.dtype, seed: int = 0) -> List[Tensor]:
    """a in (0.01, 0.99) (a forget gate), b and s0 standard normal."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.rand(steps, batch, hidden, generator=generator, dtype=dtype) * 0.98 + 0.01
    b = torch.randn(steps, batch, hidden, generator=generator, dtype=dtype)
    s0 = torch.randn(batch, hidden, generator=generator, dtype=dtype)
    return [a, b, s0]


def forward_backward(recurrence: Callable[..., Tensor], tensors: List[Tensor]) -> Callable[[], None]:
    leaves = [t.clone().requires_grad_() for t in tensors]
    weights = torch.randn_like(tensors[1])

    def run() -> None:
        for leaf in leaves:
            leaf.grad = None
        recurrence(*leaves).backward(weights)
    return run


def compare_with_loop(args: argparse.Namespace) -> List[dict]:
    rows = []
    print(f"{'T':>6} {'loop ms':>10} {'scan ms':>10} {'speedup':>8}")
    for steps in args.steps:
        tensors = inputs(steps, args.batch, args.hidden, args.dtype)
        timed = interleaved_medians({"loop": forward_backward(sequential_linear_recurrence, tensors),
                                     "scan": forward_backward(linear_recurrence, tensors)},
                                    args.repeats, clock=args.clock)
        row = {"T": steps, "loop_ms": 1e3 * timed["loop"], "scan_ms": 1e3 * timed["scan"],
               "speedup": timed["loop"] / timed["scan"]}
        print(f"{steps:>6} {row['loop_ms']:>10.3f} {row['scan_ms']:>10.3f} {row['speedup']:>7.1f}x",
              flush=True)
        rows.append(row)
    return rows


def compare_algorithms(args: argparse.Namespace) -> List[dict]:
    candidates = {"loop": sequential_linear_recurrence, "chunked": linear_recurrence,
                  "hillis_steele": hillis_steele, "log_space": log_space}
    rows = []
    print(f"{'T':>6} {'algorithm':>14} {'fwd ms':>10} {'max rel err':>12} {'a=0 ok':>7}"
          "  (error vs float64 loop)")
    for steps in args.steps:
        tensors = inputs(steps, args.batch, args.hidden, args.dtype)
        reference = sequential_linear_recurrence(*[t.double() for t in tensors])
        with_zero = [t.clone() for t in tensors]
        with_zero[0][steps // 2] = 0.0
        with torch.no_grad():
            timed = interleaved_medians({name: lambda f=f, tensors=tensors: f(*tensors)
                                         for name, f in candidates.items()}, args.repeats, clock=args.clock)
            for name, f in candidates.items():
                error = ((f(*tensors).double() - reference).abs().max()
                         / reference.abs().max()).item()
                zero_ok = bool(torch.isfinite(f(*with_zero)).all())
                row = {"T": steps, "algorithm": name, "forward_ms": 1e3 * timed[name],
                       "max_rel_error": error, "finite_with_a_zero": zero_ok}
                print(f"{steps:>6} {name:>14} {row['forward_ms']:>10.3f} {error:>12.1e} "
                      f"{'yes' if zero_ok else 'NO':>7}", flush=True)
                rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[2 ** k for k in range(6, 13)])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: process CPU time, which leaves out time spent waiting for a "
                             "core on a shared machine (compare with --threads 1)")
    parser.add_argument("--algorithms", action="store_true",
                        help="compare candidate parallel algorithms (forward only)")
    parser.add_argument("--csv", type=Path, help="also write the table here")
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)
    args.clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    print(f"batch {args.batch}, hidden {args.hidden}, {args.dtype}, {args.threads} threads, "
          f"median of {args.repeats}, {args.clock.__name__}")
    rows = compare_algorithms(args) if args.algorithms else compare_with_loop(args)
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
