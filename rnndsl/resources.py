"""Where the grammar and the stock cells live, in a checkout and in an installed wheel.

In the source tree they sit at the top level (``grammars/``, ``cells/``); the
wheel ships them inside the package as ``rnndsl/grammars`` and ``rnndsl/cells``
(see pyproject.toml).
"""
from __future__ import annotations

from pathlib import Path
from typing import List

_PACKAGE = Path(__file__).resolve().parent


def _data_dir(name: str) -> Path:
    for candidate in (_PACKAGE / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"rnndsl is installed without its {name}/ folder (looked in "
                            f"{_PACKAGE / name} and {_PACKAGE.parent / name})")


def grammar_path() -> Path:
    return _data_dir("grammars") / "cell.lark"


def stock_cells_dir() -> Path:
    return _data_dir("cells")


def stock_cell_names() -> List[str]:
    return sorted(path.stem for path in stock_cells_dir().glob("*.cell"))
