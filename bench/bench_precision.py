"""Drift of a long recurrence in low precision: why rnndsl carries the state in float32 under autocast.

One cell (default the stock LSTM, hidden 256, batch 8, input size = hidden) runs a random sequence
of 4096 steps three ways, each compared with the same cell and weights in float64:

- ``autocast``: float32 parameters under ``torch.autocast("cpu", dtype=torch.bfloat16)``, what
  rnndsl does: products in bfloat16, the state carried in float32;
- ``bfloat16 state``: the same cell ``.to(torch.bfloat16)``, products and state both in bfloat16;
- ``float32``: no autocast, for scale.

It prints the largest and the mean absolute error of the outputs at a few steps. Inputs are
normal with standard deviation ``--scale``; the weights keep the cell's own init (uniform in
±1/sqrt(hidden), as torch.nn's). With that init an LSTM's forget gate sits near 0.5 and it
forgets within a few steps, so errors cannot pile up; ``--forget-bias 3`` (a gate near 0.95, a
memory of about 20 steps, as trained LSTMs often have) shows how a bfloat16 state drifts. All
variants run the cell's generated loop as Python (``backend="eager"``), which is what a
scripted cell runs under autocast too.

    python -m bench.bench_precision                          # LSTM, 4096 steps, hidden 256, batch 8 (about 10 s)
    python -m bench.bench_precision --forget-bias 3
    python -m bench.bench_precision --cell gru --steps 1024 --scale 2
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rnndsl  # noqa: E402

VARIANTS = ("autocast", "bfloat16 state", "float32")


def outputs_by_variant(cell_name: str, steps: int, hidden: int, batch: int, scale: float,
                       forget_bias: float, seed: int) -> Dict[str, Tensor]:
    """The cell's outputs ``(steps, batch, output)`` for each variant and for float64, as float64."""
    torch.manual_seed(seed)
    spec = rnndsl.load_cell(cell_name)
    cell = spec.build(hidden, hidden, backend="eager")
    if forget_bias:
        bias = getattr(cell, "bias_ih", None)
        if bias is None or bias.shape != (4 * hidden,):
            raise SystemExit(f"--forget-bias needs an LSTM laid out as torch's (bias_ih[4*hidden], gates "
                             f"i, f, g, o); cell {spec.name} is not")
        with torch.no_grad():
            bias[hidden:2 * hidden] += forget_bias
    xs = scale * torch.randn(steps, batch, hidden, dtype=torch.float64)

    def run(dtype: torch.dtype, autocast: bool = False) -> Tensor:
        copy = spec.build(hidden, hidden, backend="eager").to(dtype)
        copy.load_state_dict(cell.state_dict())
        state = tuple(torch.zeros(batch, size, dtype=dtype) for size in copy.state_sizes)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            outputs, _ = copy.forward_sequence(xs.to(dtype), state)
        return outputs.double()

    return {"float64": run(torch.float64), "autocast": run(torch.float32, autocast=True),
            "bfloat16 state": run(torch.bfloat16), "float32": run(torch.float32)}


def drift_table(outputs: Dict[str, Tensor], at: Sequence[int]) -> List[str]:
    """Lines of the table: for each step, each variant's largest and mean absolute error."""
    reference = outputs["float64"]
    header = f"{'step':>6} " + " ".join(f"{name + ' max':>20} {'mean':>9}" for name in VARIANTS)
    lines = [header]
    for step in at:
        cells = []
        for name in VARIANTS:
            error = (outputs[name][step - 1] - reference[step - 1]).abs()
            cells.append(f"{error.max().item():>20.2e} {error.mean().item():>9.2e}")
        lines.append(f"{step:>6} " + " ".join(cells))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", default="lstm", help="a stock cell name or a .cell path (default lstm)")
    parser.add_argument("--steps", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--scale", type=float, default=1.0, help="standard deviation of the inputs")
    parser.add_argument("--forget-bias", type=float, default=0.0,
                        help="added to an LSTM's forget-gate bias, for a longer memory (default 0)")
    parser.add_argument("--at", type=int, nargs="+", default=[1, 64, 512, 4096],
                        help="steps to report (those beyond --steps are dropped)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    outputs = outputs_by_variant(args.cell, args.steps, args.hidden, args.batch, args.scale, args.forget_bias,
                                 args.seed)
    print(f"{args.cell}, hidden {args.hidden}, batch {args.batch}, inputs N(0, {args.scale:g}^2), forget bias "
          f"+{args.forget_bias:g}: absolute error of the outputs against float64")
    print("\n".join(drift_table(outputs, [step for step in args.at if step <= args.steps])))


if __name__ == "__main__":
    main()
