"""Resident memory of scripted builds: distinct cells, then rounds over more cells than the
128-entry class cache holds (160), each cell built again every round.

TorchScript keeps every class it compiles for the life of the process, so distinct cells cost
memory for good; a cell built again must reuse its compiled class (rnndsl/compile.py's registry)
rather than have TorchScript compile and keep another copy each round.

    python -m bench.bench_build_memory
"""
from __future__ import annotations

import gc
import os
import warnings

from rnndsl.cellspec import load_source


def resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def spec(index: int):
    source = (f"cell c{index}(x[input]) -> h {{\n state h[hidden]\n param W[hidden, input]\n"
              f" h' = tanh(W @ x + {index + 1}.0 * h)\n}}")
    return load_source(source)[f"c{index}"]


def main() -> None:
    warnings.simplefilter("ignore")
    specs = [spec(i) for i in range(160)]
    for s in specs[:10]:  # warm-up: TorchScript's own first-use costs
        s.build(3, 4)
    gc.collect()
    start = resident_mb()
    for s in specs[10:110]:
        s.build(3, 4)
    gc.collect()
    print(f"distinct cells: {(resident_mb() - start) * 1024 / 100:.0f} KB each")
    for s in specs[110:]:  # the rest once too, so that the rounds below build no cell for the first time
        s.build(3, 4)
    for round_ in range(3):
        gc.collect()
        start = resident_mb()
        for s in specs:
            s.build(3, 4)
        gc.collect()
        print(f"round {round_} over 160 cells, each built before: {resident_mb() - start:.1f} MB")


if __name__ == "__main__":
    main()
