"""Speed, start-up time and memory of LSTM language-model cores, after torch-rnnlib's benchmark.

rnnlib timed a 2-layer LSTM (seq 20, batch 64) against cuDNN for growing hidden
sizes. This harness does the same for a registry of variants: ``torch.nn.LSTM``
(the reference), a hand-written Python loop of an LSTM cell (eager, under
``torch.jit.script`` and under ``torch.compile``) and rnndsl's networks on each
backend, when ``rnndsl.make_recurrent`` is importable. GRU variants are compared
with ``torch.nn.GRU``.

Timing: every variant of one hidden size is built, warmed up, then timed in
interleaved rounds (the order rotates each round), so a noisy neighbour slows
all variants alike; the table shows medians and the ratio to the reference
measured in the same rounds. "fwd" is the forward pass as in training (autograd
recording); "fwd+bwd" adds the backward pass of the outputs. Input size equals
the hidden size (a language model's embedding feeding its core).

Start-up and memory run in a fresh process per variant (the median of three,
``--memory-runs``, the variants taking turns): the time to import,
construct and make the first forward+backward call, then, at seq 100 after
warm-up, the bytes of tensors saved for backward (parameters and input
excluded), the peak resident-set growth of one forward+backward call, and on
CUDA the peak of ``torch.cuda.max_memory_allocated`` above what was allocated
before the call.

    python -m bench.benchmark --quick     # smoke run: hidden 256 only, no torch.compile
    python -m bench.benchmark             # full CPU run: hidden 256, 512, 1024, minutes
    python -m bench.benchmark --list      # the variants, and why any is skipped
    bench/gpu.sh                          # the same on CUDA, hidden 256 to 4096

Run from the repository root. Outputs go to ``bench/results/`` (git-ignored) by
default; see ``--csv`` and ``--plot``.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.timing import set_tf32

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
GATES_CELL = Path(__file__).with_name("lstm_gates.cell")
CPU_HIDDEN = (256, 512, 1024)
CUDA_HIDDEN = (256, 512, 1024, 2048, 4096)
MB = 1 << 20


# ----------------------------------------------------------------------------
# Hand-written baselines


class LoopLSTMLayer(nn.Module):
    """One LSTM layer as a Python loop over time, parameters laid out as ``torch.nn.LSTMCell``."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size))

    def forward(self, xs: Tensor) -> Tensor:
        h = xs.new_zeros(xs.size(1), self.weight_hh.size(1))
        c = h
        outputs: List[Tensor] = []
        for t in range(xs.size(0)):
            gates = F.linear(xs[t], self.weight_ih, self.bias_ih) + F.linear(h, self.weight_hh, self.bias_hh)
            i, f, g, o = gates.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return torch.stack(outputs)


class LoopLSTM(nn.Module):
    """A stack of :class:`LoopLSTMLayer` from zero state: the naive baseline (rnnlib without cuDNN)."""

    def __init__(self, reference: nn.LSTM) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            LoopLSTMLayer(reference.input_size if k == 0 else reference.hidden_size, reference.hidden_size)
            for k in range(reference.num_layers))
        self.to(reference.weight_ih_l0)
        with torch.no_grad():
            for k, layer in enumerate(self.layers):
                for name, parameter in layer.named_parameters():
                    parameter.copy_(getattr(reference, f"{name}_l{k}"))

    def forward(self, xs: Tensor) -> Tensor:
        for layer in self.layers:
            xs = layer(xs)
        return xs


class OutputsOnly(nn.Module):
    """Keeps the outputs of a network that returns ``(outputs, state)``."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, xs: Tensor) -> Tensor:
        return self.network(xs)[0]


# ----------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class Variant:
    """One way to run a recurrent network; ``build(input, hidden, layers, device)`` maps
    ``(T, B, input)`` to outputs."""

    name: str
    family: str  # the torch.nn network it is compared with: a key of REFERENCES
    build: Callable[[int, int, int, torch.device], nn.Module]
    unavailable: Callable[[], str] = lambda: ""  # why it cannot run here, "" when it can
    compiles: bool = False  # torch.compile: skipped by --no-compile
    uses_rnndsl: bool = False


VARIANTS: Dict[str, Variant] = {}
REFERENCES = {"lstm": "torch.nn.LSTM", "gru": "torch.nn.GRU"}


def register(name: str, family: str = "lstm", **options) -> Callable:
    """Decorator adding a build function to :data:`VARIANTS`."""
    def add(build: Callable[[int, int, int, torch.device], nn.Module]) -> Callable:
        VARIANTS[name] = Variant(name, family, build, **options)
        return build
    return add


@register("torch.nn.LSTM")
def build_nn_lstm(input_size: int, hidden: int, layers: int, device: torch.device) -> nn.Module:
    return OutputsOnly(nn.LSTM(input_size, hidden, layers)).to(device)


@register("torch.nn.GRU", family="gru")
def build_nn_gru(input_size: int, hidden: int, layers: int, device: torch.device) -> nn.Module:
    return OutputsOnly(nn.GRU(input_size, hidden, layers)).to(device)


@register("python-loop")
def build_loop(input_size: int, hidden: int, layers: int, device: torch.device) -> nn.Module:
    return LoopLSTM(nn.LSTM(input_size, hidden, layers)).to(device)


@register("python-loop-jit")
def build_loop_jit(input_size: int, hidden: int, layers: int, device: torch.device) -> nn.Module:
    return torch.jit.script(build_loop(input_size, hidden, layers, device))


@register("python-loop-compile", compiles=True)
def build_loop_compiled(input_size: int, hidden: int, layers: int, device: torch.device) -> nn.Module:
    import torch._inductor.config
    # A cold compile every time: with inductor's on-disk cache the first call
    # would take 30 s or 3 s depending on what ran before on this machine.
    torch._inductor.config.force_disable_caches = True
    return torch.compile(build_loop(input_size, hidden, layers, device), dynamic=False)


def rnndsl_unavailable(cell: str, backend: str) -> str:
    """Why ``rnndsl.make_recurrent(cell, ..., backend=backend)`` cannot run here, or ""."""
    try:
        import rnndsl
    except Exception as error:  # any import failure means "skip", and says why
        return f"import rnndsl failed ({type(error).__name__}: {error})"
    if not hasattr(rnndsl, "make_recurrent"):
        return "rnndsl does not export make_recurrent"
    if backend == "native":
        spec = rnndsl.load_cell(cell)
        if spec.native_mode is None:
            return f"no native backend: {spec.why_not_native}"
    return ""


def register_rnndsl(label: str, cell: str, family: str, backend: str) -> None:
    """Add ``rnndsl.make_recurrent(cell, ...)`` on ``backend`` as variant ``rnndsl-<label>-<backend>``."""
    def build(input_size: int, hidden: int, layers: int, device: torch.device) -> nn.Module:
        import rnndsl
        network = rnndsl.make_recurrent(cell, input_size, [hidden] * layers, backend=backend,
                                        save_hidden=False)
        return OutputsOnly(network).to(device)

    VARIANTS[f"rnndsl-{label}-{backend}"] = Variant(
        f"rnndsl-{label}-{backend}", family, build,
        unavailable=lambda: rnndsl_unavailable(cell, backend), uses_rnndsl=True)


for _label, _cell, _family in (("lstm", "lstm", "lstm"), ("gates", str(GATES_CELL), "lstm"),
                               ("gru", "gru", "gru")):
    for _backend in ("script", "eager", "native"):
        register_rnndsl(_label, _cell, _family, _backend)


def register_drop_in(family: str, backend: str) -> None:
    """Add ``rnndsl.LSTM``/``rnndsl.GRU`` (torch.nn's class and parameters, rnndsl's cells) as
    variant ``rnndsl.LSTM-<backend>``: what a user swapping the class in runs."""
    label = {"lstm": "LSTM", "gru": "GRU"}[family]

    def build(input_size: int, hidden: int, layers: int, device: torch.device) -> nn.Module:
        import rnndsl
        return OutputsOnly(getattr(rnndsl, label)(input_size, hidden, layers, backend=backend)).to(device)

    VARIANTS[f"rnndsl.{label}-{backend}"] = Variant(
        f"rnndsl.{label}-{backend}", family, build,
        unavailable=lambda: rnndsl_unavailable(family, "script"), uses_rnndsl=True)


for _family in ("lstm", "gru"):
    register_drop_in(_family, "script")


# ----------------------------------------------------------------------------
# Measuring


@dataclass(frozen=True)
class Config:
    """The problem size and how long to measure it."""

    device: str = "cpu"
    seq: int = 20
    batch: int = 64
    layers: int = 2
    repeats: int = 15  # five rounds' ratios wandered by +-0.25 on a noisy 2-core VM
    warmup: int = 3  # TorchScript's profiling executor settles after about four calls
    threads: int = 0  # torch CPU threads; 0 keeps torch's choice
    allow_tf32: bool = False  # default: every variant in full fp32, cuDNN included

    def apply(self) -> None:
        """Set torch's process-wide options this configuration asks for."""
        if self.threads:
            torch.set_num_threads(self.threads)
        set_tf32(self.allow_tf32)


@dataclass
class Case:
    """A variant built at one hidden size, with its input batch and output gradient."""

    variant: Variant
    model: nn.Module
    xs: Tensor
    grad_outputs: Tensor

    def forward(self) -> None:
        self.model(self.xs)

    def forward_backward(self) -> None:
        self.model(self.xs).backward(self.grad_outputs)

    def clear_grads(self) -> None:
        for parameter in self.model.parameters():
            parameter.grad = None


def make_case(variant: Variant, hidden: int, seq: int, config: Config,
              model: Optional[nn.Module] = None) -> Case:
    """``variant`` built with input and hidden size ``hidden`` (or ``model``), and a random batch of ``seq`` steps."""
    if model is None:
        model = variant.build(hidden, hidden, config.layers, torch.device(config.device))
    xs, grad_outputs = torch.randn(2, seq, config.batch, hidden, device=config.device)
    return Case(variant, model, xs, grad_outputs)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(call: Callable[[], None], case: Case, device: str) -> float:
    """Seconds taken by ``call()``, gradients cleared beforehand as an optimizer's ``zero_grad`` would."""
    case.clear_grads()
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - start


def with_references(variants: Sequence[Variant]) -> List[Variant]:
    """``variants`` with the torch.nn reference of each family they use put first."""
    families = {variant.family for variant in variants}
    references = [VARIANTS[REFERENCES[family]] for family in REFERENCES if family in families]
    return references + [variant for variant in variants if variant not in references]


def benchmark_size(variants: Sequence[Variant], hidden: int, config: Config,
                   log: Callable[[str], None] = lambda line: None) -> List[dict]:
    """Time forward and forward+backward of each variant at one hidden size, interleaved.

    Returns one row per variant and metric (see :func:`row`), with the ratio to
    the family's reference when the reference is among ``variants``. A variant
    that fails to build or run is reported through ``log`` and left out.
    """
    if any(variant.compiles for variant in variants):
        import torch._dynamo  # imported here: it adds seconds to every start-up
        torch._dynamo.reset()  # compile each size from scratch, as a user's first run would
    cases: Dict[str, Case] = {}
    first_call: Dict[str, float] = {}
    warmup: Dict[str, float] = {}
    for variant in variants:
        log(f"hidden {hidden}: building and warming up {variant.name}")
        try:
            start = time.perf_counter()
            case = make_case(variant, hidden, config.seq, config)
            case.forward_backward()
            synchronize(config.device)
            first_call[variant.name] = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(config.warmup):
                case.forward()
                case.forward_backward()
            synchronize(config.device)
            warmup[variant.name] = time.perf_counter() - start
        except Exception as error:  # one broken variant must not void the others' numbers
            log(f"hidden {hidden}: {variant.name} failed and is left out: {type(error).__name__}: {error}")
            continue
        cases[variant.name] = case

    times: Dict[str, Dict[str, List[float]]] = {name: {"fwd_ms": [], "fwd_bwd_ms": []} for name in cases}
    names = list(cases)
    for round_index in range(config.repeats):
        shift = round_index % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            case = cases[name]
            times[name]["fwd_ms"].append(1e3 * timed(case.forward, case, config.device))
            times[name]["fwd_bwd_ms"].append(1e3 * timed(case.forward_backward, case, config.device))
        log(f"hidden {hidden}: round {round_index + 1}/{config.repeats} done")

    medians = {name: {metric: statistics.median(values) for metric, values in metrics.items()}
               for name, metrics in times.items()}
    rows = []
    for name, case in cases.items():
        reference = times.get(REFERENCES[case.variant.family])
        for metric, value in medians[name].items():
            # The ratio of each round's pair, then their median: a slow spell of the machine then
            # weighs on both sides of a ratio, not on one side's median.
            ratio = statistics.median(mine / theirs for mine, theirs in zip(times[name][metric], reference[metric])) \
                if reference else None
            rows.append(row("time", case.variant, hidden, config.seq, metric, value, ratio,
                            f"median of {config.repeats} interleaved runs; ratio: median of the rounds' ratios"))
        rows.append(row("time", case.variant, hidden, config.seq, "first_call_s", first_call[name], None,
                        "construct + first fwd+bwd in the benchmark process (torch.compile: cold compile)"))
        rows.append(row("time", case.variant, hidden, config.seq, "warmup_s", warmup[name], None,
                        f"{config.warmup} untimed fwd and fwd+bwd calls after the first "
                        f"(TorchScript optimizes during these)"))
    return rows


CSV_FIELDS = ["section", "variant", "family", "hidden", "seq", "metric", "value", "ratio", "note", "processes"]


def row(section: str, variant: Variant, hidden: int, seq: int, metric: str, value: Optional[float],
        ratio: Optional[float], note: str) -> dict:
    """One line of the CSV."""
    return {"section": section, "variant": variant.name, "family": variant.family, "hidden": hidden,
            "seq": seq, "metric": metric, "value": value, "ratio": ratio, "note": note}


# ----------------------------------------------------------------------------
# Start-up and memory, each variant in a fresh process


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> Optional[int]:
    """Reset this process's peak RSS (Linux ``clear_refs``) and return the current RSS in bytes, or None.

    Freed heap memory is handed back to the system first (glibc ``malloc_trim``):
    malloc keeps what the warm-up calls freed, and the measured call would reuse
    it without raising the peak.
    """
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the growth may then read low
        pass
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return 1024 * _status_kb("VmRSS")
    except OSError:
        return None


def saved_for_backward_bytes(case: Case) -> int:
    """Bytes of the distinct storages a forward pass saves for backward, not counting parameters or the input."""
    excluded = {parameter.untyped_storage().data_ptr() for parameter in case.model.parameters()}
    excluded.add(case.xs.untyped_storage().data_ptr())
    saved: Dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        try:
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # opaque tensors (mkldnn) have no storage
            key, size = id(tensor), tensor.element_size() * tensor.nelement()
        if key not in excluded:
            saved[key] = size
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        case.model(case.xs)
    return sum(saved.values())


def child_main(spec_json: str, import_torch_s: float) -> None:
    """Entry point of the fresh process started by :func:`measure_in_fresh_process`; prints one JSON line."""
    spec = json.loads(spec_json)
    config = Config(**spec["config"])
    config.apply()
    variant = VARIANTS[spec["variant"]]
    result = {"import_s": import_torch_s}
    if variant.uses_rnndsl:
        start = time.perf_counter()
        import rnndsl  # noqa: F401  (timed: part of a user's start-up)
        result["import_s"] += time.perf_counter() - start

    start = time.perf_counter()
    case = make_case(variant, spec["hidden"], config.seq, config)
    synchronize(config.device)
    result["construct_s"] = time.perf_counter() - start
    result["first_fwd_bwd_s"] = timed(case.forward_backward, case, config.device)

    case = make_case(variant, spec["hidden"], spec["memory_seq"], config, model=case.model)
    for _ in range(max(config.warmup, 3)):  # measure the steady state, after TorchScript's optimizations
        case.forward_backward()
    synchronize(config.device)
    rss_before = reset_peak_rss()
    if config.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    case.forward_backward()
    synchronize(config.device)
    if rss_before is not None:
        result["peak_rss_growth_bytes"] = 1024 * _status_kb("VmHWM") - rss_before
    if config.device.startswith("cuda"):
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - cuda_before
    result["saved_for_backward_bytes"] = saved_for_backward_bytes(case)
    print(json.dumps(result))


CHILD_CODE = ("import time; start = time.perf_counter(); import torch; "
              "import_s = time.perf_counter() - start; "
              "from bench.benchmark import child_main; child_main({spec!r}, import_s)")

AUX_METRICS = {
    "import_s": "import torch (and rnndsl for its variants) in a fresh process",
    "construct_s": "construct the network (rnndsl: load_cell + build of each layer)",
    "first_fwd_bwd_s": "first fwd+bwd call (torch.compile: cold compile)",
    "saved_for_backward_bytes": "bytes saved for backward by one forward (saved_tensors_hooks; "
                                "parameters and input excluded)",
    "peak_rss_growth_bytes": "peak RSS during one fwd+bwd minus RSS before it, after warm-up (fresh process)",
    "cuda_peak_bytes": "torch.cuda.max_memory_allocated during one fwd+bwd minus allocated before it",
}


def measure_in_fresh_process(variant: Variant, hidden: int, memory_seq: int, config: Config,
                             timeout_s: float = 900) -> Dict[str, float]:
    """Start-up times and memory of ``variant`` (keys of :data:`AUX_METRICS`), in a new Python process.

    torch.compile compiles twice there, at ``config.seq`` and at ``memory_seq``;
    its compile time grows with the sequence length (the loop is unrolled).
    """
    spec = json.dumps({"variant": variant.name, "hidden": hidden, "memory_seq": memory_seq,
                       "config": asdict(config)})
    done = subprocess.run([sys.executable, "-c", CHILD_CODE.format(spec=spec)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else
                           f"exit status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def startup_and_memory(variants: Sequence[Variant], hidden: int, memory_seq: int, config: Config,
                       log: Callable[[str], None] = lambda line: None, runs: int = 3) -> List[dict]:
    """Rows of :data:`AUX_METRICS` for each variant, memory also as a ratio to the family's reference.

    Each figure is the median of ``runs`` fresh processes, the variants taking turns: a process's
    peak resident set moves with where the allocator happens to place the buffers (rnndsl's
    LSTM drop-in read 163-190 MB over four processes at hidden 256, torch.nn.GRU 147-166 MB).
    """
    measured: Dict[str, List[Dict[str, float]]] = {variant.name: [] for variant in variants}
    failed = set()
    interrupted = False
    try:
        for run in range(runs):
            for variant in variants:
                if variant.name in failed:
                    continue
                log(f"start-up and memory: {variant.name} in a fresh process ({run + 1} of {runs})")
                try:
                    measured[variant.name].append(measure_in_fresh_process(variant, hidden, memory_seq, config))
                except (RuntimeError, subprocess.TimeoutExpired) as error:
                    log(f"start-up and memory: {variant.name} failed and is left out: {error}")
                    failed.add(variant.name)
    except KeyboardInterrupt:  # keep the processes that finished
        interrupted = True
    results = {name: {metric: statistics.median(run[metric] for run in runs_of)
                      for metric in runs_of[0]}
               for name, runs_of in measured.items() if runs_of and name not in failed}
    rows = []
    for variant in variants:
        if variant.name not in results:
            continue
        reference = results.get(REFERENCES[variant.family], {})
        for metric, value in results[variant.name].items():
            ratio = value / reference[metric] if metric.endswith("bytes") and reference.get(metric) else None
            seq = config.seq if metric.endswith("_s") else memory_seq
            row_ = row("startup_memory", variant, hidden, seq, metric, value, ratio, AUX_METRICS[metric])
            rows.append({**row_, "processes": len(measured[variant.name])})
    if interrupted:
        raise Interrupted(rows)
    return rows


class Interrupted(KeyboardInterrupt):
    """A section cut short by SIGINT, with the rows it finished."""

    def __init__(self, rows: List[dict]) -> None:
        super().__init__()
        self.rows = rows


# ----------------------------------------------------------------------------
# Reporting


def machine() -> str:
    """CPU model, core count, torch version and threads (and the GPU when timing on CUDA)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text


def format_tables(rows: Sequence[dict], config: Config) -> str:
    """The timing table per hidden size, then the start-up and memory table."""
    lines = []
    time_rows = [r for r in rows if r["section"] == "time"]
    for hidden in sorted({r["hidden"] for r in time_rows}):
        lines.append(f"\nhidden {hidden}: seq {config.seq}, batch {config.batch}, {config.layers} layers, "
                     f"{config.device}; ms per batch, median of {config.repeats} interleaved runs")
        lines.append(f"{'variant':<24}{'fwd ms':>10}{'x ref':>7}{'fwd+bwd ms':>12}{'x ref':>7}"
                     f"{'first call s':>14}{'warm-up s':>11}")
        by_variant: Dict[str, Dict[str, dict]] = {}
        for r in time_rows:
            if r["hidden"] == hidden:
                by_variant.setdefault(r["variant"], {})[r["metric"]] = r
        for name, metrics in by_variant.items():
            fwd, both = metrics["fwd_ms"], metrics["fwd_bwd_ms"]
            lines.append(f"{name:<24}{fwd['value']:>10.2f}{_ratio(fwd):>7}{both['value']:>12.2f}"
                         f"{_ratio(both):>7}{metrics['first_call_s']['value']:>14.2f}"
                         f"{metrics['warmup_s']['value']:>11.2f}")

    aux_rows = [r for r in rows if r["section"] == "startup_memory"]
    if aux_rows:
        first = aux_rows[0]
        lines.append(f"\nstart-up (seq {config.seq}) and memory of one fwd+bwd (seq "
                     f"{next((r['seq'] for r in aux_rows if r['metric'].endswith('bytes')), '?')}), "
                     f"hidden {first['hidden']}, medians of {first.get('processes', 1)} processes"
                     f" (a fresh one per variant, in turns)")
        columns = [m for m in AUX_METRICS if any(r["metric"] == m for r in aux_rows)]
        headers = {"import_s": "import s", "construct_s": "build s", "first_fwd_bwd_s": "1st call s",
                   "saved_for_backward_bytes": "saved MB (x ref)",
                   "peak_rss_growth_bytes": "peak RSS+ MB (x ref)", "cuda_peak_bytes": "CUDA peak MB (x ref)"}
        lines.append(f"{'variant':<24}" + "".join(f"{headers[m]:>22}" for m in columns))
        by_variant = {}
        for r in aux_rows:
            by_variant.setdefault(r["variant"], {})[r["metric"]] = r
        for name, metrics in by_variant.items():
            cells = []
            for metric in columns:
                r = metrics.get(metric)
                if r is None:
                    cells.append("n/a")
                elif metric.endswith("bytes"):
                    cells.append(f"{r['value'] / MB:.1f} ({_ratio(r).strip() or '-'})")
                else:
                    cells.append(f"{r['value']:.2f}")
            lines.append(f"{name:<24}" + "".join(f"{cell:>22}" for cell in cells))
        lines.append("saved MB: tensors saved for backward (saved_tensors_hooks), parameters and input excluded; "
                     "peak RSS+ MB: growth of the peak resident set during the call")
    return "\n".join(lines)


def _ratio(r: dict) -> str:
    return f"{r['ratio']:.2f}" if r["ratio"] is not None else ""


def header_lines(config: Config, when: str, load_before: str) -> List[str]:
    """The CSV's comment header: what ran, where and when."""
    return [f"rnndsl benchmark (after torch-rnnlib's), {when}",
            f"machine: {machine()}",
            f"config: {json.dumps(asdict(config))}",
            f"load average before: {load_before}, after: {load_average()}"]


def load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def write_csv(path: Path, rows: Sequence[dict], header: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as out:
        out.writelines(f"# {line}\n" for line in header)
        writer = csv.DictWriter(out, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def write_plot(path: Path, rows: Sequence[dict], title: str) -> Optional[str]:
    """Log-log time against hidden size, one line per variant, fwd and fwd+bwd panels; a note if skipped."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    figure, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for axis, (metric, label) in zip(axes, (("fwd_ms", "forward"), ("fwd_bwd_ms", "forward + backward"))):
        series: Dict[str, List[tuple]] = {}
        for r in rows:
            if r["section"] == "time" and r["metric"] == metric:
                series.setdefault(r["variant"], []).append((r["hidden"], r["value"]))
        colors = plt.get_cmap("tab20").colors  # more variants than tab10's ten colours
        for index, (name, points) in enumerate(series.items()):
            points.sort()
            style = "-" if name in REFERENCES.values() else "--" if name.startswith("rnndsl") else ":"
            axis.plot(*zip(*points), style, marker="o", label=name, color=colors[index % len(colors)])
        axis.set(xscale="log", yscale="log", xlabel="hidden size", title=label)
        axis.set_xticks(sorted({r["hidden"] for r in rows if r["section"] == "time"}))
        axis.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())  # log axes label 3x10^2...
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms per batch (median)")
    axes[1].legend(fontsize="small")
    figure.suptitle(title, fontsize="medium")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return None


# ----------------------------------------------------------------------------
# Command line


def select_variants(names: Optional[Sequence[str]], compile_: bool,
                    log: Callable[[str], None]) -> List[Variant]:
    """``names`` (default: every variant), less those unavailable or compiled without ``compile_``,
    with the reference of each family left put first."""
    unknown = [name for name in names or () if name not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; --list shows them")
    requested = ([VARIANTS[name] for name in names] if names else
                 [variant for variant in VARIANTS.values() if variant.name not in REFERENCES.values()])
    chosen = []
    for variant in requested:
        reason = "--no-compile" if variant.compiles and not compile_ else variant.unavailable()
        if reason:
            log(f"skipping {variant.name}: {reason}")
        else:
            chosen.append(variant)
    return with_references(chosen)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--hidden", type=int, nargs="+",
                        help=f"hidden sizes (default {CPU_HIDDEN} on CPU, {CUDA_HIDDEN} on CUDA)")
    parser.add_argument("--seq", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=Config.repeats, help="interleaved timing rounds")
    parser.add_argument("--warmup", type=int, default=Config.warmup,
                        help="untimed fwd and fwd+bwd calls per variant before timing")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--variants", nargs="+", metavar="NAME",
                        help="variants to run (default all available); references are always added")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: hidden 256 only, 3 rounds, no torch.compile, one fresh process "
                             "per memory figure")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip torch.compile (its cold compile takes 20-40 s per size on CPU)")
    parser.add_argument("--no-startup-memory", dest="startup_memory", action="store_false",
                        help="skip the fresh-process start-up and memory measurements")
    parser.add_argument("--memory-seq", type=int, default=100, help="sequence length of the memory run")
    parser.add_argument("--memory-hidden", type=int, default=256,
                        help="hidden size of the start-up and memory runs")
    parser.add_argument("--memory-runs", type=int, default=3,
                        help="fresh processes per variant for start-up and memory (their median)")
    parser.add_argument("--allow-tf32", action="store_true",
                        help="let CUDA matmuls and cuDNN use TF32 (default: full fp32 for every variant)")
    parser.add_argument("--csv", type=Path, help="CSV path (default bench/results/benchmark-<device>.csv)")
    parser.add_argument("--plot", type=Path, help="PNG path (default bench/results/benchmark-<device>.png)")
    parser.add_argument("--no-plot", dest="make_plot", action="store_false")
    parser.add_argument("--list", action="store_true", help="list the variants and exit")
    args = parser.parse_args(argv)
    if args.memory_runs < 1:
        parser.error(f"--memory-runs must be at least 1, not {args.memory_runs}")
    if args.quick:
        args.hidden, args.repeats, args.compile, args.memory_runs = [256], 3, False, 1
    args.hidden = args.hidden or list(CUDA_HIDDEN if args.device.startswith("cuda") else CPU_HIDDEN)
    args.csv = args.csv or RESULTS / f"benchmark-{args.device.split(':')[0]}.csv"
    args.plot = args.plot or RESULTS / f"benchmark-{args.device.split(':')[0]}.png"
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)

    started = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {line}", file=sys.stderr, flush=True)

    if args.list:
        for variant in VARIANTS.values():
            reason = variant.unavailable()
            print(f"{variant.name:<24} vs {REFERENCES[variant.family]:<14} {'skipped: ' + reason if reason else ''}")
        return
    config = Config(args.device, args.seq, args.batch, args.layers, args.repeats, args.warmup,
                    args.threads or 0, args.allow_tf32)
    config.apply()
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    load_before = load_average()
    threads, cores = torch.get_num_threads(), os.cpu_count() or 1
    if args.device == "cpu" and os.getloadavg()[0] > cores - threads + 0.5:
        log(f"note: load average {load_before} with {threads} threads on {cores} cores: other processes "
            f"compete for the cores, timings will be noisy" + (
                "; threads that wait for a busy core make them erratic (try --threads 1)" if threads > 1 else ""))
    variants = select_variants(args.variants, args.compile, log)

    rows: List[dict] = []
    notes: List[str] = []

    def save() -> None:
        # Written after every section, so a run cut short (gpu.sh's time limit) keeps what it measured.
        write_csv(args.csv, rows, header_lines(config, when, load_before))
        if args.make_plot and any(r["section"] == "time" for r in rows):
            note = write_plot(args.plot, rows, f"{config.layers}-layer LSTM LM core, seq {config.seq}, "
                              f"batch {config.batch}, {config.device}, {when}\n{machine()}")
            if note and note not in notes:
                notes.append(note)
                log(note)

    try:
        # Timing first: it is what a time-limited run (gpu.sh) is for; start-up and memory after it.
        for hidden in args.hidden:
            rows += benchmark_size(variants, hidden, config, log)
            save()
        if args.startup_memory:
            rows += startup_and_memory(variants, args.memory_hidden, args.memory_seq, config, log,
                                       args.memory_runs)
    except KeyboardInterrupt as interrupt:
        rows += getattr(interrupt, "rows", [])
        log("interrupted: reporting the sections that finished")
    finally:
        save()
    print(f"rnndsl benchmark, {when}; {machine()}")
    print(format_tables(rows, config))
    plotted = args.make_plot and not notes and any(r["section"] == "time" for r in rows)
    print(f"\nwrote {args.csv}" + (f" and {args.plot}" if plotted else ""))

if __name__ == "__main__":
    main()
