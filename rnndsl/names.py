"""Naming for generated code: identifiers that never collide, and the names the code reserves.

Like torch.fx's ``_Namespace`` (which sits beside its ``Graph`` and ``CodeGen``), this
is shared by every stage that makes names: lowering (rnndsl/lower.py), the passes
(rnndsl/passes/) and the code generators (rnndsl/codegen/). It imports nothing from
rnndsl, so the compiler can name things without importing torch.

The globals generated code reads are written down here once, by target: they are
what a generator returns with its source (rnndsl/codegen/base.py, ``PythonCode``),
what user names must avoid (``RESERVED``), and what the runtime resolves to objects
to exec the source (rnndsl/kernels.py, ``resolve_globals``).
"""
from __future__ import annotations

import builtins
import keyword
from typing import Dict, Tuple

# Helpers of rnndsl/kernels.py that generated code calls by name: those the shared emitters
# (rnndsl/codegen/base.py) call, which every target's code may hold, then each target's own.
EMITTED_HELPERS = ("conv_same", "hardtanh")
SCRIPT_HELPERS = ("linear", "accumulate", "outer_sum", "prepack", "conv_same_input_grad", "conv_same_weight_grad")
PARALLEL_HELPERS = ("along_steps", "chunkwise_attention", "linear_recurrence", "linear_with_grad",
                    "fused_linear_recurrence", "fused_scan_runs")
SCAN_HELPERS = ("time_scan",)

# The globals each target's source reads: TorchScript methods (step loop, derived backward) and
# the parallel scan's plain Python.
# `math` computes functions of numbers (hyper-parameters, constants) on Python floats.
SCRIPT_GLOBALS: Tuple[str, ...] = ("torch", "math", "Tensor", "Tuple", "List", "Optional") + EMITTED_HELPERS + \
    SCRIPT_HELPERS
PARALLEL_GLOBALS: Tuple[str, ...] = ("torch", "math") + EMITTED_HELPERS + PARALLEL_HELPERS
# The scan target's plain Python, which torch.export traces (rnndsl/codegen/scan.py).
SCAN_GLOBALS: Tuple[str, ...] = ("torch", "math", "Tensor", "Tuple", "List", "Optional") + EMITTED_HELPERS + \
    SCAN_HELPERS

# Locals generated code makes for itself.
GENERATED_LOCALS = ("self", "state", "xs", "mask", "outputs", "t", "keep", "real")

# Names the generated code uses for itself; user names that collide get a suffix.
RESERVED = (set(keyword.kwlist) | set(dir(builtins)) | set(GENERATED_LOCALS) | set(SCRIPT_GLOBALS)
            | set(PARALLEL_GLOBALS) | set(SCAN_GLOBALS))


def joined_name(*parts: str) -> str:
    """``parts`` joined by ``_``: ``joined_name("c", "seq")`` is ``c_seq``.

    The joints never give ``__`` (which generated code refuses as dunder-like: ``lambda_`` and
    ``seq`` make ``lambda_seq``), and a leading ``_`` stays (``_1`` and ``seq`` make ``_1_seq``,
    not the number-then-name ``1_seq``). One part is returned as it is.
    """
    head, *rest = parts
    if not rest:
        return head
    pieces = [head.rstrip("_")] + [part.strip("_") for part in rest]
    name = "_".join(piece for piece in pieces if piece)
    return name if not head.startswith("_") or name.startswith("_") else f"_{name}"


class Namespace:
    """Hands out identifiers that never collide with each other or with RESERVED."""

    def __init__(self, taken: set, reserved: frozenset = frozenset(RESERVED)):
        self.taken = set(taken) | reserved
        self.next_suffix: Dict[str, int] = {}  # suffixes below are taken: keeps a cell of n values O(n)

    def claim(self, name: str) -> str:
        """Take exactly ``name`` (declared names must keep theirs)."""
        self.taken.add(name)
        return name

    def fresh(self, *parts: str) -> str:
        """A new identifier named from ``parts`` (see :func:`joined_name`), with a numeric suffix
        if that is taken."""
        base = joined_name(*parts)
        candidate = base if base not in self.taken else None
        suffix = self.next_suffix.get(base, 1)
        while candidate is None:
            if joined_name(base, str(suffix)) not in self.taken:
                candidate = joined_name(base, str(suffix))
            suffix += 1
        self.next_suffix[base] = suffix
        self.taken.add(candidate)
        return candidate
