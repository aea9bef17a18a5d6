#!/usr/bin/env bash
# The benchmarks on CUDA, as one command for a short GPU window: the environment and a
# correctness smoke check (bench/gpu_smoke.py; the benchmarks do not run when it fails), then
# every variant against cuDNN's torch.nn.LSTM / torch.nn.GRU at hidden 256 to 4096 with
# start-up and memory at hidden 1024 (bench.benchmark), minGRU's parallel scan against its loop
# (bench.bench_parallel_scan), and torch.compile'd rnndsl LSTMs, with CUDA graphs too, at hidden
# 512 to 2048 (bench.bench_compile). Writes env.txt, benchmark-cuda.{csv,png,txt},
# parallel-scan-cuda.txt and compile-cuda.txt to $OUT when set, else to bench/results/.
#
# The device image has torch but not lark, rnndsl's parser: carry it as a wheel in .whl/
# (git-ignored), made here with
#     python3 -m pip download --no-deps --only-binary=:all: -d .whl lark
# then run this with the device tool: run(command="bench/gpu.sh", carry=[".whl"], timeout_s=570).
#
# Each section stops itself (60 + 240 + 60 + 120 s, plus 10 s grace each: 520 s at most, under
# the device's 600 s a command); the CSV is rewritten after every size and on an interrupt, and
# the other sections print as they go, so a section cut short keeps what it measured, and the
# next still runs. DEVICE=cpu DRY_RUN=1 bench/gpu.sh runs every command at tiny sizes on the CPU,
# to catch argument errors before a GPU is lent. Extra arguments go to bench.benchmark.
set -uo pipefail   # no -e: a section that fails or times out must not stop the next
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
device="${DEVICE:-cuda}"
export PYTHONUNBUFFERED=1   # a killed section's output is not lost in a buffer

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu-site .whl/*.whl &&
        export PYTHONPATH="/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}"
fi
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    for candidate in .venv/bin/python python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import sys, torch, lark
sys.exit('$device' == 'cuda' and not torch.cuda.is_available())" 2>/dev/null; then
            python="$candidate"
            break
        fi
    done
fi
if [[ -z "$python" ]]; then
    echo "gpu.sh: no Python here has torch (a CUDA build that sees a GPU) and lark (see the top of this file)" >&2
    exit 1
fi

if [[ -n "${DRY_RUN:-}" ]]; then
    bench=(--hidden 16 32 --seq 3 --batch 2 --repeats 1 --memory-hidden 16 --memory-seq 5)
    scan=(--lengths 8 32 --rounds 1)
    compiled=(--hidden 8 16 --rounds 1)
else
    # --no-compile below: torch.compile of the unrolled Python loop alone took 213 s to start on an
    # H200 (2026-12-04); the compiled rnndsl variants are bench_compile's section.
    bench=(--repeats 10 --memory-hidden 1024)
    scan=(--lengths 64 256 1024 4096)
    compiled=(--hidden 512 1024 2048 --rounds 5)
fi

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  git rev-parse HEAD 2>/dev/null; } 2>&1 | tee "$out/env.txt"
if ! timeout --signal=INT --kill-after=10 60 "$python" -m bench.gpu_smoke --device "$device" --no-compile \
        2>&1 | tee -a "$out/env.txt"; then
    echo "gpu.sh: the smoke check failed (above): the benchmarks would time wrong code" >&2
    exit 1
fi
timeout --signal=INT --kill-after=10 240 \
    "$python" -m bench.benchmark --device "$device" --memory-runs 1 --no-compile "${bench[@]}" \
        --csv "$out/benchmark-$device.csv" --plot "$out/benchmark-$device.png" "$@" \
    2>&1 | tee "$out/benchmark-$device.txt"
timeout --signal=INT --kill-after=10 60 \
    "$python" -m bench.bench_parallel_scan --device "$device" --python-loop "${scan[@]}" \
    2>&1 | tee "$out/parallel-scan-$device.txt"
timeout --signal=INT --kill-after=10 120 \
    "$python" -m bench.bench_compile --device "$device" --skip-compile-time "${compiled[@]}" \
    2>&1 | tee "$out/compile-$device.txt"
exit 0
