"""Timing shared by the benchmarks: cases run in interleaved rounds, medians.

Every round runs each case in turn, so a busy neighbour or a change of clock speed slows all the
cases of that round alike; the median of the rounds then drops the rounds it hit hardest.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List

import torch


def interleaved_medians(cases: Dict[str, Callable[[], object]], rounds: int, calls: int = 1, warmups: int = 1,
                        clock: Callable[[], float] = time.perf_counter) -> Dict[str, float]:
    """Median seconds per call of each case: ``warmups`` calls of each first, then ``rounds``
    rounds in which each case in turn runs ``calls`` times, each round starting one case later
    (so that no case always runs right after the same other one, whose cache footprint it meets)."""
    for case in cases.values():
        for _ in range(warmups):
            case()
    times: Dict[str, List[float]] = {name: [] for name in cases}
    names = list(cases)
    for round_index in range(rounds if names else 0):
        start_at = round_index % len(names)
        for name in names[start_at:] + names[:start_at]:
            case = cases[name]
            start = clock()
            for _ in range(calls):
                case()
            times[name].append((clock() - start) / calls)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def set_tf32(allowed: bool) -> None:
    """Let (or forbid) float32 matrix products and cuDNN's kernels round through TF32 on the GPU.

    The benchmarks default to full float32 everywhere, cuDNN's LSTM included, so that every variant
    computes the same numbers. cuDNN's flag is set only where cuDNN exists: torch's own test suite
    freezes the cuDNN flags once imported, and a benchmark run inside pytest would otherwise fail."""
    torch.backends.cuda.matmul.allow_tf32 = allowed
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.allow_tf32 = allowed
