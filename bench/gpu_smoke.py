"""Pre-flight for bench/gpu.sh: what runs where (date, device, versions), then the paths the
benchmarks time, checked against torch.nn in float64 on the device, in about 20 s.

Exits non-zero when a path is wrong, so that a short GPU window is not spent timing wrong code:
the drop-ins on every backend (4th call too: TorchScript optimizes after a few), packed
sequences, native networks with ``lengths=``, minGRU's parallel scan, float16 autocast, and
(unless ``--no-compile``) torch.compile with and without CUDA graphs.

    python -u -m bench.gpu_smoke [--device cuda] [--no-compile]
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from typing import List, Sequence

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from bench.timing import set_tf32

F64 = torch.float64


def describe(device: torch.device) -> str:
    """The date, Python, torch, CUDA and cuDNN versions, and the device."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    lines = [f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; python "
             f"{platform.python_version()}; torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {cudnn})"]
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        lines.append(f"device {properties.name}, {properties.total_memory >> 30} GiB, "
                     f"{properties.multi_processor_count} SMs")
    return "\n".join(lines)


def forward_backward(model: torch.nn.Module, xs, **keywords) -> List[torch.Tensor]:
    """The output, the input's gradient (not for a packed input) and the parameters' gradients of
    the squared output's sum."""
    for parameter in model.parameters():
        parameter.grad = None
    packed = isinstance(xs, PackedSequence)
    if not packed:
        xs = xs.detach().requires_grad_()
    output, _ = model(xs, **keywords)
    output = output.data if packed else output
    output.square().sum().backward()
    return [output] + ([] if packed else [xs.grad]) + [parameter.grad for parameter in model.parameters()]


class Checks:
    """Prints each check as it runs and counts the failures."""

    def __init__(self) -> None:
        self.failures: List[str] = []

    def close(self, what: str, got: Sequence[torch.Tensor], want: Sequence[torch.Tensor],
              tolerance: float = 1e-8) -> None:
        fine = len(got) == len(want) and all(torch.allclose(g, w, rtol=tolerance, atol=tolerance)
                                             for g, w in zip(got, want))
        self.report(what, fine)

    def report(self, what: str, fine: bool) -> None:
        print(f"  {'ok  ' if fine else 'FAIL'} {what}", flush=True)
        if not fine:
            self.failures.append(what)


def check_drop_ins(rnndsl, device: torch.device, checks: Checks) -> None:
    for family in ("LSTM", "GRU"):
        reference = getattr(torch.nn, family)(16, 16, 2).to(device, F64)
        xs = torch.randn(7, 3, 16, dtype=F64, device=device)
        want = forward_backward(reference, xs)
        lengths = torch.tensor([7, 4, 2])
        packed = pack_padded_sequence(xs, lengths, enforce_sorted=False)
        for backend in ("script", "eager", "native"):
            ours = getattr(rnndsl, family)(16, 16, 2, backend=backend).to(device, F64)
            ours.load_state_dict(reference.state_dict())
            checks.close(f"rnndsl.{family} {backend}: fwd+bwd", forward_backward(ours, xs), want)
            for _ in range(3):
                forward_backward(ours, xs)
            checks.close(f"rnndsl.{family} {backend}: fwd+bwd, 4th call", forward_backward(ours, xs), want)
            checks.close(f"rnndsl.{family} {backend}: packed", forward_backward(ours, packed),
                         forward_backward(reference, packed))
        networks = [rnndsl.make_recurrent(family.lower(), 16, [16, 16], backend=backend).to(device, F64)
                    for backend in ("native", "script")]
        networks[1].load_state_dict(networks[0].state_dict())
        checks.close(f"make_recurrent {family}: native against script, lengths=",
                     [networks[0](xs, lengths=lengths)[0]], [networks[1](xs, lengths=lengths)[0]])


def check_parallel_scan(rnndsl, device: torch.device, checks: Checks) -> None:
    spec = rnndsl.load_cell("mingru")
    sequential, parallel = spec.build(16, 16, scan="sequential"), spec.build(16, 16, scan="parallel")
    parallel.load_state_dict(sequential.state_dict())
    xs = torch.randn(50, 3, 16, dtype=F64, device=device)
    state = (torch.zeros(3, 16, dtype=F64, device=device),)
    checks.close("minGRU: parallel scan against the loop",
                 [rnndsl.scan(parallel.to(device, F64), xs, state)[0]],
                 [rnndsl.scan(sequential.to(device, F64), xs, state)[0]])


def check_autocast(rnndsl, device: torch.device, checks: Checks) -> None:
    model = rnndsl.LSTM(16, 16, 2).to(device)
    with torch.autocast(device.type, dtype=torch.float16):
        output, _ = model(torch.randn(7, 3, 16, device=device))
    output.float().sum().backward()
    finite = bool(torch.isfinite(output).all()) and all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    checks.report(f"autocast float16: finite output ({output.dtype}) and gradients", finite)


def check_compile(rnndsl, device: torch.device, checks: Checks) -> None:
    from torch._dynamo.utils import counters
    modes = ("default", "reduce-overhead") if device.type == "cuda" else ("default",)
    for mode in modes:
        torch._dynamo.reset()
        start = time.perf_counter()
        model, eager = rnndsl.LSTM(16, 16).to(device), rnndsl.LSTM(16, 16).to(device)
        eager.load_state_dict(model.state_dict())
        xs = torch.randn(5, 3, 16, device=device)
        try:
            compiled = torch.compile(model, mode=mode, dynamic=False)
            for _ in range(3):  # CUDA graphs record on the third call
                got = forward_backward(compiled, xs)
        except Exception as error:  # reported, as every check: the rest still runs
            checks.report(f"torch.compile mode={mode}: {type(error).__name__}: {error}", False)
            continue
        checks.close(f"torch.compile mode={mode} ({time.perf_counter() - start:.1f} s; CUDA graph skips so far: "
                     f"{counters['inductor']['cudagraph_skips']})", got, forward_backward(eager, xs), 1e-4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile checks (Inductor's "
                                                                    "first compile takes a minute)")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(describe(device), flush=True)
    try:
        import rnndsl
    except ImportError as error:
        sys.exit(f"gpu_smoke: {error}: carry the missing wheel (see bench/gpu.sh)")
    set_tf32(False)
    checks = Checks()
    start = time.perf_counter()
    torch.manual_seed(0)
    check_drop_ins(rnndsl, device, checks)
    check_parallel_scan(rnndsl, device, checks)
    if device.type == "cuda":
        check_autocast(rnndsl, device, checks)
    if not args.no_compile:
        check_compile(rnndsl, device, checks)
    print(f"smoke: {time.perf_counter() - start:.1f} s, {len(checks.failures)} failure(s)", flush=True)
    sys.exit(1 if checks.failures else 0)


if __name__ == "__main__":
    main()
