"""The command line: exit codes, the printed stages, and no Python traceback on bad input."""
from __future__ import annotations

import subprocess
import sys

import pytest

from rnndsl.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "rnndsl", *args], capture_output=True, text=True, timeout=120)


def test_check_good_and_bad_files(tmp_path):
    bad = tmp_path / "bad.cell"
    bad.write_text("cell c(x[input]) -> h {\n  state h[hidden]\n  h' = tanhh(h)\n}\n")
    result = run("check", "lstm", str(bad))
    assert result.returncode == 1
    assert "lstm: ok" in result.stdout
    assert f"{bad}:3:8: error: unknown function `tanhh`" in result.stderr
    assert "did you mean `tanh`?" in result.stderr
    assert "Traceback" not in result.stderr
    assert run("check", "lstm", "gru").returncode == 0


@pytest.mark.parametrize("stage, marker", [("ast", "Cell(name='gru'"), ("ir", "graph gru("),
                                           ("code", "def forward_sequence("), ("dot", "digraph \"gru\"")])
def test_show_prints_each_stage(stage, marker, capsys):
    assert main(["show", "gru", "--stage", stage]) == 0
    assert marker in capsys.readouterr().out


def test_show_parallel_prints_the_scan_or_why_not(capsys):
    assert main(["show", "mingru", "--stage", "parallel"]) == 0
    assert "linear_recurrence(" in capsys.readouterr().out
    assert main(["show", "lstm", "--stage", "parallel"]) == 0  # an answer, not an error
    out, err = capsys.readouterr()
    assert out.startswith("# cell lstm cannot run as a parallel scan: the recurrence is not linear in the state")
    assert err == ""


def test_show_with_a_pass_disabled(capsys):
    main(["show", "lstm", "--stage", "ir", "--disable", "hoist"])
    text = capsys.readouterr().out
    assert "hoist" not in text.split("passes")[1].splitlines()[0]
    assert "# every step" not in text


def test_show_says_a_files_warnings_as_check_does(tmp_path, capsys):
    for index, command in enumerate((["check"], ["show", "--stage", "ast"])):
        path = tmp_path / f"unused{index}.cell"  # a file of its own: a loaded file's warnings are said once
        path.write_text("cell c(x[input]) -> h {\n  state h[hidden]\n  param W[hidden, input], V[hidden]\n"
                        "  h' = tanh(W @ x)\n}\n")
        assert main([*command, str(path)]) == 0
        err = capsys.readouterr().err
        assert err.startswith(f"{path}:3:27: warning: parameter `V` is never used") and "CellWarning" not in err


def test_missing_file_is_a_clear_error(capsys):
    assert main(["check", "/no/such/dir/x.cell"]) == 1
    assert "no such file: /no/such/dir/x.cell" in capsys.readouterr().err
