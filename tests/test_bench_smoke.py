"""Smoke tests of the benchmark harnesses (bench/benchmark.py, bench/bench_parallel_scan.py,
bench/bench_precision.py, bench/bench_word_lm.py, bench/bench_fused_sequence.py): they run and report, at a tiny size.

No timing is asserted; the hand-written baselines are checked to compute an LSTM,
so the benchmark compares like with like.
"""
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bench/ is run from the repository root, not installed

from bench.benchmark import GATES_CELL, VARIANTS, Config, LoopLSTM, benchmark_size, format_tables  # noqa: E402

TINY = Config(seq=3, batch=2, layers=2, repeats=1, warmup=1)


def test_one_variant_produces_its_rows():
    rows = benchmark_size([VARIANTS["torch.nn.LSTM"]], hidden=8, config=TINY)
    metrics = {r["metric"]: r for r in rows if r["variant"] == "torch.nn.LSTM"}
    assert set(metrics) == {"fwd_ms", "fwd_bwd_ms", "first_call_s", "warmup_s"}
    assert metrics["fwd_ms"]["value"] > 0 and metrics["fwd_ms"]["ratio"] == 1.0
    assert "torch.nn.LSTM" in format_tables(rows, TINY)


def test_start_up_and_memory_are_medians_of_fresh_processes_in_turns(monkeypatch):
    """Each variant's figures are the median of its processes, taken in turns; a variant whose
    process fails is left out, and the others keep their ratios to the reference."""
    import bench.benchmark as benchmark

    peaks = {"torch.nn.LSTM": [100, 300, 200], "rnndsl.LSTM-script": [250, 110, 120]}
    order = []

    def fake_process(variant, hidden, memory_seq, config):
        order.append(variant.name)
        if variant.name == "rnndsl-lstm-script":
            raise RuntimeError("no luck")
        return {"import_s": 1.0, "peak_rss_growth_bytes": peaks[variant.name][order.count(variant.name) - 1]}

    monkeypatch.setattr(benchmark, "measure_in_fresh_process", fake_process)
    variants = [VARIANTS[name] for name in ("torch.nn.LSTM", "rnndsl.LSTM-script", "rnndsl-lstm-script")]
    rows = benchmark.startup_and_memory(variants, 8, 10, TINY, runs=3)
    assert order == ["torch.nn.LSTM", "rnndsl.LSTM-script", "rnndsl-lstm-script",
                     "torch.nn.LSTM", "rnndsl.LSTM-script", "torch.nn.LSTM", "rnndsl.LSTM-script"]
    peak = {r["variant"]: r for r in rows if r["metric"] == "peak_rss_growth_bytes"}
    assert set(peak) == {"torch.nn.LSTM", "rnndsl.LSTM-script"}
    assert peak["torch.nn.LSTM"]["value"] == 200 and peak["rnndsl.LSTM-script"]["value"] == 120
    assert peak["rnndsl.LSTM-script"]["ratio"] == 0.6
    assert "medians of 3 processes" in format_tables(rows, TINY)
    assert {r["processes"] for r in rows} == {3}


def test_python_loop_is_torch_lstm():
    torch.manual_seed(0)
    reference = torch.nn.LSTM(5, 8, 2).double()
    xs = torch.randn(4, 3, 5, dtype=torch.float64)
    loop = LoopLSTM(reference)
    expected = reference(xs)[0]
    torch.testing.assert_close(loop(xs), expected)
    torch.testing.assert_close(torch.jit.script(loop)(xs), expected)


def test_gates_cell_is_torch_lstm_cell():
    rnndsl = pytest.importorskip("rnndsl")
    torch.manual_seed(0)
    reference = torch.nn.LSTMCell(5, 8).double()
    cell = rnndsl.load_cell(GATES_CELL).build(5, 8, backend="eager").double()
    weights_i, weights_h = reference.weight_ih.chunk(4), reference.weight_hh.chunk(4)
    biases = (reference.bias_ih + reference.bias_hh).chunk(4)
    with torch.no_grad():
        for k, gate in enumerate("ifgo"):
            getattr(cell, f"weight_i{gate}").copy_(weights_i[k])
            getattr(cell, f"weight_h{gate}").copy_(weights_h[k])
            getattr(cell, f"bias_{gate}").copy_(biases[k])
    x = torch.randn(3, 5, dtype=torch.float64)
    h, c = torch.randn(2, 3, 8, dtype=torch.float64)
    (h_next, c_next), output = cell((h, c), x)
    expected_h, expected_c = reference(x, (h, c))
    torch.testing.assert_close(h_next, expected_h)
    torch.testing.assert_close(c_next, expected_c)
    torch.testing.assert_close(output, expected_h)


def test_parallel_scan_benchmark_reports_every_column(monkeypatch, capsys):
    from bench import bench_parallel_scan

    monkeypatch.setattr(sys, "argv", ["bench_parallel_scan", "--lengths", "8", "--rounds", "1", "--batch", "2",
                                      "--hidden", "4", "--python-loop"])
    bench_parallel_scan.main()
    header, row = capsys.readouterr().out.splitlines()[-2:]
    assert "GEMM floor" in header and "python loop" in header
    assert row.split()[0] == "8" and len(row.split()) == 10


def test_precision_benchmark_reports_every_variant_at_every_step(monkeypatch, capsys):
    from bench import bench_precision

    monkeypatch.setattr(sys, "argv", ["bench_precision", "--steps", "5", "--hidden", "4", "--batch", "2",
                                      "--at", "1", "5", "64", "--forget-bias", "3"])
    bench_precision.main()
    lines = capsys.readouterr().out.splitlines()
    assert "autocast max" in lines[1] and "bfloat16 state max" in lines[1]
    assert [line.split()[0] for line in lines[2:]] == ["1", "5"]  # step 64 lies beyond the 5 steps run
    float32_error = float(lines[-1].split()[-2])
    assert float32_error < 1e-4 < float(lines[-1].split()[3])  # bfloat16 state's error stands out


def test_word_lm_benchmark_reports_each_backend_against_native(monkeypatch, capsys, tmp_path):
    from bench import bench_word_lm

    words = [f"w{k % 37}" for k in range(1200)]
    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.txt").write_text("\n".join(" ".join(words[i:i + 12]) for i in range(0, 1200, 12)))
    monkeypatch.setattr(sys, "argv", ["bench_word_lm", "--data", str(tmp_path), "--rounds", "1", "--batches", "1",
                                      "--backends", "native", "script"])
    bench_word_lm.main()
    lines = capsys.readouterr().out.splitlines()
    assert "x native" in lines[-3]
    assert [line.split()[0] for line in lines[-2:]] == ["native", "script"]
    assert lines[-2].split()[2] == "1.000"


def test_fused_sequence_benchmark_times_both_ways_and_reports_the_cells_pick(monkeypatch, capsys, tmp_path):
    """Each size gets a row with both ways timed, and the way reported is the one the cell takes:
    with the LSTM's bounds set to batches of 3 or more, the loop at batch 1 and the kernel at 3."""
    import csv
    import dataclasses

    from bench import bench_fused_sequence
    from rnndsl.native import NATIVE_MODES

    monkeypatch.setitem(NATIVE_MODES, "LSTM", dataclasses.replace(NATIVE_MODES["LSTM"], sequence_kernel_bounds=(0, 3)))
    table = tmp_path / "table.csv"
    monkeypatch.setattr(sys, "argv", ["bench_fused_sequence", "--cells", "lstm", "gru", "--hidden", "8",
                                      "--batch", "1", "3", "--steps", "4", "--rounds", "1", "--calls", "1",
                                      "--csv", str(table)])
    bench_fused_sequence.main()
    lines = capsys.readouterr().out.splitlines()
    assert "kernel / loop time" in lines[0] and len(lines) == 5
    rows = list(csv.DictReader(table.open()))
    assert [(r["cell"], r["batch"], r["picks"]) for r in rows] == [
        ("lstm", "1", "loop"), ("lstm", "3", "kernel"), ("gru", "1", "kernel"), ("gru", "3", "kernel")]


def test_fused_sequence_benchmark_refuses_when_the_two_ways_take_one_path(monkeypatch):
    """Were the loop's bounds to let the kernel run, both ways would time the same code: refused."""
    from bench import bench_fused_sequence

    monkeypatch.setattr(bench_fused_sequence, "NEVER_KERNEL", None)
    with pytest.raises(RuntimeError, match="did not take the two paths"):
        bench_fused_sequence.timed_both_ways("gru", 8, 2, steps=3, rounds=1, calls=1)


# The other harnesses, each run once at a tiny size: they must not rot between the runs that
# feed the README.
@pytest.mark.parametrize("module, argv", [
    ("bench_latency", ["--hidden", "8", "--rounds", "1", "--calls", "1"]),
    ("bench_backward", ["--hidden", "8", "--seq", "3", "--batch", "2", "--rounds", "1", "--warmup", "1"]),
    ("bench_linear_scan", ["--steps", "8", "--batch", "2", "--hidden", "4", "--repeats", "1", "--algorithms"]),
    ("bench_export", ["--hidden", "8", "--batch", "2", "--steps", "3", "5", "--rounds", "1", "--no-aoti"]),
    ("gpu_smoke", ["--device", "cpu", "--no-compile"]),
    ("benchmark", ["--hidden", "8", "--seq", "3", "--batch", "2", "--repeats", "1", "--warmup", "1", "--no-compile",
                   "--no-startup-memory", "--no-plot", "--variants", "rnndsl.LSTM-script", "rnndsl-lstm-script",
                   "python-loop"]),
])
def test_each_benchmark_runs_at_a_tiny_size(module, argv, monkeypatch, capsys, tmp_path):
    import importlib
    bench = importlib.import_module(f"bench.{module}")
    if module == "benchmark":
        argv = argv + ["--csv", str(tmp_path / "rows.csv")]
    monkeypatch.setattr(sys, "argv", [module, *argv])
    if module == "gpu_smoke":  # exits: 0 when every check passed
        with pytest.raises(SystemExit) as exit_:
            bench.main()
        assert exit_.value.code == 0
    else:
        bench.main()
    out = capsys.readouterr().out
    assert out.strip()
    if module == "benchmark":
        assert "rnndsl.LSTM-script" in out and "python-loop" in out
