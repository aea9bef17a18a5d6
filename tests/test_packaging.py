"""An installed wheel carries the grammar and the stock cells, and finds them."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_ships_grammar_and_cells_and_finds_them(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(REPO)], check=True, timeout=300, capture_output=True)
    (wheel,) = tmp_path.glob("rnndsl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "rnndsl/grammars/cell.lark" in names
    stock = {Path(n).stem for n in names if n.startswith("rnndsl/cells/") and n.endswith(".cell")}
    assert {"lstm", "gru", "rnn_tanh", "rnn_relu", "rnn_sigmoid"} <= stock
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                    str(wheel)], check=True, timeout=300, capture_output=True)
    probe = ("import rnndsl, sys; assert rnndsl.__file__.startswith(sys.argv[1]), rnndsl.__file__; "
             "print(rnndsl.load_cell('gru').build(3, 4).hidden_size)")
    result = subprocess.run([sys.executable, "-c", probe, str(target)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "4"
