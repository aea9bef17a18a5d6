"""minGRU over time: the parallel scan against the sequential loop, forward+backward.

Both are rnndsl's default script backend (the loop with its derived backward),
built from cells/mingru.cell with scan="parallel" and scan="sequential";
medians of interleaved runs, batch 16, hidden 64 (input 64), float32, CPU.

"GEMM floor" times what every way of running the cell must do, the loop too:
the input projection of all steps (one GEMM with its bias) and its backward
(two GEMMs and a bias sum), with rnndsl's fastest kernels. No scan can beat
it, so "sequential / floor" bounds the speed-up any parallel scan can reach
over the sequential loop on this machine.

"fused C++" (--cpu-kernel) is the same parallel cell under rnndsl.linear_scan.use_cpu_kernel(), for
its runs only: minGRU's gate math and scan, forward and backward, as the one C++ loop the compiler
derives from the cell (rnndsl/codegen/fused.py, built on first use; `rnndsl show mingru --stage fused`).

    python -m bench.bench_parallel_scan [--threads N] [--lengths 64 256 1024 4096] [--device cuda] [--cpu-kernel]
"""
from __future__ import annotations

import argparse

import torch

import rnndsl
from rnndsl.kernels import linear_with_grad
from rnndsl.linear_scan import use_cpu_kernel
from rnndsl.scan import python_scan

from bench.timing import interleaved_medians


def _synchronized(function, device: torch.device):
    """``function`` waiting for its kernels on CUDA, which run asynchronously, so that timing it
    times them."""
    if device.type != "cuda":
        return function

    def run():
        function()
        torch.cuda.synchronize(device)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--python-loop", action="store_true",
                        help="also time a Python loop calling the (eager) cell once per step (slow)")
    parser.add_argument("--cpu-kernel", action="store_true",
                        help="also time the parallel cell with its fused C++ kernel (built on first use)")
    args = parser.parse_args()
    if args.cpu_kernel and not use_cpu_kernel():
        parser.error("the C++ kernels do not build here")
    use_cpu_kernel(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = rnndsl.load_cell("mingru")
    cells = {
        # the plain loop: TorchScript, autograd through every step
        "plain loop": spec.build(args.hidden, args.hidden, scan="sequential", derived_backward=False),
        # rnndsl's default for cells that are not linear: the loop with its derived backward
        "sequential": spec.build(args.hidden, args.hidden, scan="sequential"),
        "parallel": spec.build(args.hidden, args.hidden, scan="parallel"),
    }
    if args.python_loop:
        cells["python loop"] = spec.build(args.hidden, args.hidden, backend="eager", scan="sequential")
    if args.cpu_kernel and not all(kernel.library() for kernel in cells["parallel"].fused_kernels):
        parser.error("minGRU's fused kernel did not build")
    device = torch.device(args.device)
    for cell in cells.values():
        cell.load_state_dict(cells["sequential"].state_dict())
        cell.to(device)
    where = f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"minGRU fwd+bwd, batch {args.batch}, hidden {args.hidden}, {where}; ms, medians of interleaved runs")
    extra = f" {'python loop':>12} {'vs python':>10}" if args.python_loop else ""
    extra += f" {'fused C++':>10} {'vs sequential':>14}" if args.cpu_kernel else ""
    print(f"{'T':>6} {'plain loop':>11} {'sequential':>11} {'parallel':>9} {'vs plain':>9} {'vs sequential':>14}"
          f" {'GEMM floor':>11} {'sequential / floor':>19}" + extra)
    weights = torch.cat([cells["sequential"].weight_z, cells["sequential"].weight_h]).detach().requires_grad_()
    biases = torch.cat([cells["sequential"].bias_z, cells["sequential"].bias_h]).detach().requires_grad_()
    for steps in args.lengths:
        xs = torch.randn(steps, args.batch, args.hidden, device=device, requires_grad=True)
        state = (torch.zeros(args.batch, args.hidden, device=device),)

        def run(cell, xs=xs, state=state):
            scan = python_scan if cell is cells.get("python loop") else rnndsl.scan
            outputs, _ = scan(cell, xs, state)
            outputs.sum().backward()

        grad_gates = torch.randn(steps, args.batch, 2 * args.hidden, device=device)

        def floor(xs=xs, grad_gates=grad_gates):
            linear_with_grad(xs, weights, biases).backward(grad_gates)

        runs = {mode: (lambda cell=cell: run(cell)) for mode, cell in cells.items()}
        runs["floor"] = floor
        if args.cpu_kernel:
            def with_kernel(cell=cells["parallel"]):
                use_cpu_kernel()
                try:
                    run(cell)
                finally:
                    use_cpu_kernel(False)
            runs["fused C++"] = with_kernel
        medians = interleaved_medians({mode: _synchronized(function, device) for mode, function in runs.items()},
                                      args.rounds, warmups=4)  # TorchScript's loop settles on its 4th call
        ms = {mode: seconds * 1e3 for mode, seconds in medians.items()}
        plain, sequential, parallel = ms["plain loop"], ms["sequential"], ms["parallel"]
        extra = f" {ms['python loop']:>12.2f} {ms['python loop'] / parallel:>9.1f}x" if args.python_loop else ""
        if args.cpu_kernel:
            extra += f" {ms['fused C++']:>10.2f} {sequential / ms['fused C++']:>13.1f}x"
        print(f"{steps:>6} {plain:>11.2f} {sequential:>11.2f} {parallel:>9.2f} {plain / parallel:>8.1f}x "
              f"{sequential / parallel:>13.1f}x {ms['floor']:>11.2f} {sequential / ms['floor']:>18.1f}x" + extra)


if __name__ == "__main__":
    main()
