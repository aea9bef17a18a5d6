"""Build options: what ``CellSpec.build`` is told besides sizes and hyper-parameters.

One frozen :class:`BuildOptions`, normalised once when made, is the key of the
generated module classes (rnndsl/compile.py; its finer caches key on the fields
they depend on) and part of the recipe a pickled cell is rebuilt from
(rnndsl/cells.py). A new build choice is a new field here and a
keyword of ``CellSpec.build``. This module imports neither torch nor the
compiler, so that the front end (rnndsl/check.py) can keep the names of sizes
and hyper-parameters clear of build's arguments.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Tuple, Union

# What a cell builds as; networks offer more (rnndsl.native.NETWORK_BACKENDS).
CELL_BACKENDS = ("script", "eager")
SCANS = ("auto", "parallel", "sequential")
# CellSpec.build's arguments before its keyword-only ones, which are BuildOptions' fields.
BUILD_POSITIONAL = ("self", "input_size", "hidden_size", "backend")

# Passes to switch off: names, or one name as a string.
Passes = Union[str, Iterable[str]]


@dataclass(frozen=True)
class BuildOptions:
    """How a cell is compiled and run.

    ``disable``: passes to switch off (rnndsl.passes.PASS_NAMES), one name or several.
    ``fixed_dropout_mask``: in ``forward_sequence``, each ``dropout`` drawn in the loop (of a value
    that depends on a state, or has no time axis: parameters, a per-sequence input) draws one mask
    per sequence instead of one per step.
    ``scan``: ``"parallel"`` runs ``forward_sequence`` as a parallel scan (only for cells
    linear in their state), ``"sequential"`` as a time loop, ``"auto"`` picks the parallel
    scan where it applies.
    ``derived_backward``: scripted cells train through the backward derived from their
    equations (rnndsl/codegen/backward.py); False trains them through autograd of the compiled loop.
    """

    disable: Tuple[str, ...] = ()
    fixed_dropout_mask: bool = False
    scan: str = "auto"
    derived_backward: bool = True

    def __post_init__(self) -> None:
        # A string is one name, not a sequence of one-letter names; sorted, so that each
        # selection of passes is one cache key.
        disable = (self.disable,) if isinstance(self.disable, str) else tuple(sorted(self.disable))
        if "derived_backward" in disable:
            raise ValueError("`derived_backward` is not a pass: build(..., derived_backward=False) "
                             "trains through autograd of the compiled loop")
        if self.scan not in SCANS:
            raise ValueError(f"unknown scan {self.scan!r}; choose one of {', '.join(SCANS)}")
        object.__setattr__(self, "disable", disable)
        for flag in ("derived_backward", "fixed_dropout_mask"):
            value = getattr(self, flag)
            if value not in (True, False):  # a per-layer list, or "no", would read as True
                raise TypeError(f"{flag} must be True or False (one for every layer), got {value!r}")
            object.__setattr__(self, flag, bool(value))

