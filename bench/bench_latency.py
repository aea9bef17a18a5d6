"""Step latency, what a user sampling text waits on: one call at batch 1, ``torch.no_grad``, one thread.

    python -m bench.bench_latency                    # hidden 200 and 650, 15 interleaved rounds
    python -m bench.bench_latency --hidden 200 --rounds 31

Three pairs, each measured side by side in every round (medians, ratios against torch):
- one call of the stock lstm cell (script and eager backends) against ``torch.nn.LSTMCell``;
- one step (T=1) of a 2-layer ``rnndsl.LSTM`` against a 2-layer ``torch.nn.LSTM``;
- a word sampler's loop (embedding, the 2-layer LSTM, decoder, softmax, draw) over a 10,000-word
  vocabulary, in words per second, with each of the two LSTMs.
"""
from __future__ import annotations

import argparse
import warnings
from typing import Callable, Dict

import torch
from torch import nn

import rnndsl
from bench.timing import interleaved_medians

VOCABULARY = 10_000


class Sampler(nn.Module):
    """word_lm's model reduced to what sampling runs: embed, recur, decode, draw."""

    def __init__(self, rnn: nn.Module, hidden: int) -> None:
        super().__init__()
        self.encoder = nn.Embedding(VOCABULARY, hidden)
        self.rnn = rnn
        self.decoder = nn.Linear(hidden, VOCABULARY)

    def words(self, count: int) -> None:
        token = torch.zeros(1, 1, dtype=torch.long)
        state = None
        for _ in range(count):
            output, state = self.rnn(self.encoder(token), state)
            weights = torch.softmax(self.decoder(output[0, 0]), dim=-1)
            token = torch.multinomial(weights, 1).view(1, 1)


def cases(hidden: int) -> Dict[str, Callable[[], object]]:
    """The calls to time, by name; each pair's torch reference comes first."""
    torch.manual_seed(0)
    x = torch.randn(1, hidden)
    state = (torch.zeros(1, hidden), torch.zeros(1, hidden))
    xs = torch.randn(1, 1, hidden)
    hidden0 = (torch.zeros(2, 1, hidden), torch.zeros(2, 1, hidden))
    torch_cell = nn.LSTMCell(hidden, hidden)
    script_cell = rnndsl.load_cell("lstm").build(hidden, hidden)
    eager_cell = rnndsl.load_cell("lstm").build(hidden, hidden, backend="eager")
    torch_lstm = nn.LSTM(hidden, hidden, num_layers=2)
    ours = rnndsl.LSTM(hidden, hidden, num_layers=2)
    samplers = {"torch": Sampler(nn.LSTM(hidden, hidden, num_layers=2), hidden),
                "rnndsl": Sampler(rnndsl.LSTM(hidden, hidden, num_layers=2), hidden)}
    return {
        "torch.nn.LSTMCell call": lambda: torch_cell(x, state),
        "rnndsl lstm cell call (script)": lambda: script_cell(state, x),
        "rnndsl lstm cell call (eager)": lambda: eager_cell(state, x),
        "torch.nn.LSTM step": lambda: torch_lstm(xs, hidden0),
        "rnndsl.LSTM step": lambda: ours(xs, hidden0),
        "sampler with torch.nn.LSTM (10 words)": lambda: samplers["torch"].words(10),
        "sampler with rnndsl.LSTM (10 words)": lambda: samplers["rnndsl"].words(10),
    }


def measure(hidden: int, rounds: int, calls: int) -> Dict[str, float]:
    """Median seconds per call of every case, interleaved round by round."""
    with torch.no_grad():
        return interleaved_medians(cases(hidden), rounds, calls, warmups=calls)


def report(hidden: int, medians: Dict[str, float]) -> str:
    names = list(medians)
    pairs = [(names[0], names[1:3]), (names[3], names[4:5]), (names[5], names[6:7])]
    lines = [f"hidden {hidden}, batch 1, no_grad, {torch.get_num_threads()} thread(s)"]
    for reference, ours in pairs:
        lines.append(f"  {reference:<40} {medians[reference] * 1e6:9.1f} us")
        for name in ours:
            ratio = medians[name] / medians[reference]
            lines.append(f"  {name:<40} {medians[name] * 1e6:9.1f} us  {ratio:.2f}x")
    for name in names[5:]:
        lines.append(f"  {name.split(' (')[0]:<40} {10 / medians[name]:9.0f} words/s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[200, 650])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=50, help="calls per case per round")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    for hidden in args.hidden:
        print(report(hidden, measure(hidden, args.rounds, args.calls)), flush=True)


if __name__ == "__main__":
    main()
