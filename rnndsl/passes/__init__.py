"""Compiler passes: pure functions ``Graph -> Graph``, run in a plain list.

Each can be switched off for debugging (``CellSpec.build(..., disable=("hoist",))``,
``rnndsl show FILE --stage ir --disable hoist``); the graph records which ran.
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Tuple

from ..ir import Graph
from ..spec import verify
from .dead_code import eliminate_dead_code
from .dedupe import eliminate_common_subexpressions
from .hoist import hoist_invariants
from .join_slices import join_slices
from .merge_matmuls import merge_matmuls
from .reassociate import reassociate_sums

Pass = Callable[[Graph], Graph]

PASSES: List[Tuple[str, Pass]] = [
    ("cse", eliminate_common_subexpressions),
    ("reassociate", reassociate_sums),
    ("merge_matmuls", merge_matmuls),
    ("join_slices", join_slices),
    ("dce", eliminate_dead_code),
    ("hoist", hoist_invariants),
]
PASS_NAMES = tuple(name for name, _ in PASSES)


def run_passes(graph: Graph, disable: Iterable[str] = ()) -> Graph:
    """Run every pass not in ``disable``, verifying the IR after each."""
    disable = set(disable)
    unknown = disable - set(PASS_NAMES)
    if unknown:
        raise ValueError(f"unknown pass(es) {sorted(unknown)}; passes are {', '.join(PASS_NAMES)}")
    for name, function in PASSES:
        if name not in disable:
            graph = verify(function(graph))
    return graph
