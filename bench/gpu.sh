#!/usr/bin/env bash
# The benchmarks on CUDA: hidden 256 to 4096, every variant against cuDNN's
# torch.nn.LSTM / torch.nn.GRU, start-up and memory at hidden 1024; then
# minGRU's parallel scan against its loop (issue 6's goal, which on CPU the
# shared GEMMs bound; on a GPU the loop is launch-bound instead); then
# torch.compile'd rnndsl LSTMs (Inductor's kernels, and CUDA graphs with
# mode="reduce-overhead") against cuDNN at hidden 512 to 2048 (issue 16's goal).
# Writes benchmark-cuda.{csv,png,txt}, parallel-scan-cuda.txt and compile-cuda.txt
# to $OUT when set, else to bench/results/. Not needed for CPU use: `python -m
# bench.benchmark`, `bench.bench_parallel_scan` and `bench.bench_compile` are the
# CPU benchmarks.
#
# Stops itself after 330 + 90 + 150 s (the device machine allows 600 s a command);
# the CSV and plot are rewritten after every section, and the compiled rows are
# printed a size at a time, so a run cut short keeps what it measured. Extra
# arguments go to the benchmark (e.g. --variants ...). PYTHON picks the interpreter;
# by default the first of .venv/bin/python, python3, python whose torch sees a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-bench/results}"
mkdir -p "$out"

python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    for candidate in .venv/bin/python python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 &&
           "$candidate" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
            python="$candidate"
            break
        fi
    done
fi
if [[ -z "$python" ]]; then
    echo "gpu.sh: no Python here has a CUDA build of torch that sees a GPU (set PYTHON=...)" >&2
    exit 1
fi

# --no-compile: torch.compile of the unrolled Python loop alone took 213 s to start on an H200
# (2026-12-04), more than all other variants together.
timeout --signal=INT --kill-after=10 330 \
    "$python" -m bench.benchmark --device cuda --memory-hidden 1024 --memory-runs 1 --repeats 10 --no-compile \
        --csv "$out/benchmark-cuda.csv" --plot "$out/benchmark-cuda.png" "$@" \
    2>&1 | tee "$out/benchmark-cuda.txt" || true
timeout --signal=INT --kill-after=10 90 \
    "$python" -m bench.bench_parallel_scan --device cuda --python-loop \
    2>&1 | tee "$out/parallel-scan-cuda.txt" || true
# Each size compiles three variants afresh (Inductor, then Triton), so few sizes and rounds.
timeout --signal=INT --kill-after=10 150 \
    "$python" -u -m bench.bench_compile --device cuda --skip-compile-time --hidden 512 1024 2048 --rounds 5 \
    2>&1 | tee "$out/compile-cuda.txt"
