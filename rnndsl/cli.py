"""The command line: ``rnndsl check FILE...`` and ``rnndsl show FILE --stage STAGE`` (STAGES).

Problems in cell files print as compiler diagnostics and exit 1, never as a
Python traceback. ``--stage parallel`` of a cell that is not linear in its state
prints why, as a comment, and exits 0.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import List, Optional

from .cellspec import load_cells
from .dot import to_dot
from .errors import CellError, printable
from .passes import PASS_NAMES
from .syntax_tree import pretty

STAGES = ("ast", "ir", "code", "backward", "parallel", "fused", "scan", "dot")


def _say(text: object, stream=None) -> None:
    """Print, with control and format characters from a hostile file shown as `?`."""
    print(printable(text), file=stream or sys.stdout)


def _load(path: str):
    """The cells of ``path``, its warnings said on stderr as diagnostics (not as Python prints
    them, with rnndsl's own file and line); None, the error said, if it has one."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cells = load_cells(path)
        except CellError as error:
            _say(error, sys.stderr)
            return None
    for warning in caught:
        _say(warning.message, sys.stderr)
    return cells


def _check(paths: List[str]) -> int:
    status = 0
    for path in paths:
        cells = _load(path)
        if cells is None:
            status = 1
            continue
        _say(f"{path}: ok ({len(cells)} cell{'s' if len(cells) != 1 else ''}: {', '.join(cells)})")
    return status


def _show(path: str, stage: str, cell: Optional[str], disable: List[str], raw: bool) -> int:
    cells = _load(path)
    if cells is None:
        return 1
    if cell is not None and cell not in cells:
        _say(f"error: {path} has no cell named {cell!r}; it has {', '.join(cells)}", sys.stderr)
        return 1
    for name, spec in cells.items():
        if cell is not None and name != cell:
            continue
        if stage == "ast":
            print(pretty(spec.ast))
        elif stage == "ir":
            print(spec.graph if raw else spec.optimized(disable))
        elif stage == "code":
            print(spec.code(disable))
        elif stage == "backward":  # the derived backward's two methods (rnndsl/codegen/backward.py)
            print(spec.backward_code(disable))
        elif stage == "scan":  # forward_sequence_scan, what torch.export runs (rnndsl/codegen/scan.py)
            print(spec.scan_code(disable))
        elif stage == "parallel":  # forward_parallel, for cells linear in their state (rnndsl/codegen/parallel.py)
            source, why_not = spec.parallel_plan(disable)
            if source is None:
                # A cell that is not linear in its state is an answer, not a failure: printed in
                # place of the code, as a comment, and the exit status stays 0.
                _say(f"# cell {name} cannot run as a parallel scan: {why_not}")
            else:
                print(source)
        elif stage == "fused":  # the C++ forward_parallel calls under use_cpu_kernel() (rnndsl/codegen/fused.py)
            sources = spec.fused_sources(disable)
            if not sources:
                _say(f"# cell {name} has no fused kernel: it runs no parallel scan, or a state of it is a tensor "
                     "(--stage parallel says which)")
            print("\n".join(sources), end="")
        else:
            print(to_dot(spec.graph if raw else spec.optimized(disable)), end="")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="rnndsl", description="Check and inspect .cell files.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="check cell files; exit 1 if any has an error")
    check.add_argument("files", nargs="+", metavar="FILE", help="a .cell file or a stock cell name")
    show = commands.add_parser("show", help="print a compiler stage of a cell file")
    show.add_argument("file", metavar="FILE", help="a .cell file or a stock cell name")
    show.add_argument("--stage", choices=STAGES, default="ir")
    show.add_argument("--cell", help="only this cell of the file")
    show.add_argument("--raw", action="store_true", help="the IR before any pass (ir and dot stages)")
    show.add_argument("--disable", action="append", default=[], choices=PASS_NAMES, metavar="PASS",
                      help=f"switch a pass off (repeatable): {', '.join(PASS_NAMES)}")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            return _check(args.files)
        return _show(args.file, args.stage, args.cell, args.disable, args.raw)
    except BrokenPipeError:  # `rnndsl show ... | head`
        return 0
    except Exception as exc:  # the promise is no traceback, ever; say what broke instead
        _say(f"rnndsl: internal error: {type(exc).__name__}: {exc}", sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
