"""Golden files: the IR text and generated code of every stock cell.

A change to the compiler that changes them shows up here as a diff. When the
change is intended, regenerate the files and review the diff before committing:

    RNNDSL_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import rnndsl

GOLDEN = Path(__file__).parent / "golden"
STOCK = ["lstm", "gru", "rnn_tanh", "rnn_relu", "rnn_sigmoid"]
UPDATE = os.environ.get("RNNDSL_UPDATE_GOLDEN") == "1"


def _stages(name: str) -> dict:
    spec = rnndsl.load_cell(name)
    return {f"{name}.ir": str(spec.graph) + "\n",
            f"{name}.optimized.ir": str(spec.optimized()) + "\n",
            f"{name}.py": spec.code()}


@pytest.mark.parametrize("name", STOCK)
def test_stock_cell_matches_golden_files(name):
    for filename, text in _stages(name).items():
        path = GOLDEN / filename
        if UPDATE:
            GOLDEN.mkdir(exist_ok=True)
            path.write_text(text)
        assert path.exists(), f"{path} missing: run RNNDSL_UPDATE_GOLDEN=1 python -m pytest {__file__}"
        assert text == path.read_text(), (f"{filename} differs from its golden file; if intended, "
                                          "regenerate with RNNDSL_UPDATE_GOLDEN=1 and review the diff")
