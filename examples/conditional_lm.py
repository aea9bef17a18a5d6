"""A character model conditioned on a topic: every step reads a per-sequence vector.

The cell (``examples/conditional_gru.cell``) is a GRU with one more input,
``enc[context] per sequence``: a learned embedding of the topic each sequence comes
from, fed to every step (its projection ``weight_ch @ enc`` is computed once per
sequence, outside the time loop). The topics are the largest entries of Python's own
documentation (``pydoc_data.topics``), so the example runs offline. Training windows
come from the first nine tenths of each topic's text, the held-out windows from the
rest; the held-out bits per character are reported with each window's own topic and
with another topic's, so the gap shows what the conditioning is worth.

    python examples/conditional_lm.py                   # tiny defaults, well under a minute on a CPU
    python examples/conditional_lm.py --topics 8 --nhid 256 --steps 2000
"""
import argparse
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # data.py, when imported from elsewhere

import rnndsl  # noqa: E402
from data import HelpFormatter, number, positive_int, run  # noqa: E402

CELL = Path(__file__).resolve().parent / "conditional_gru.cell"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--topics", type=positive_int, default=4, help="how many documentation topics (the classes)")
    parser.add_argument("--emsize", type=positive_int, default=16, help="character embedding size")
    parser.add_argument("--context", type=positive_int, default=16, help="topic embedding size (the cell's `context`)")
    parser.add_argument("--nhid", type=positive_int, nargs="+", default=[96], help="hidden size of each layer")
    parser.add_argument("--bptt", type=positive_int, default=48, help="characters per training window")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="windows per batch")
    parser.add_argument("--steps", type=positive_int, default=300, help="training steps (Adam)")
    parser.add_argument("--lr", type=number(above=0), default=5e-3, help="Adam's learning rate")
    parser.add_argument("--backend", default="script", choices=("script", "eager"), help="how the cells run")
    parser.add_argument("--seed", type=int, default=1111, help="random seed")
    parser.add_argument("--threads", type=positive_int, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    from pydoc_data.topics import topics
    if not 2 <= args.topics <= len(topics):  # the run compares a text's own topic with another
        parser.error(f"--topics must be from 2 to {len(topics)} (the documentation's topics), got {args.topics}")
    return args


def topic_texts(count: int) -> Dict[str, str]:
    """The ``count`` largest topics of Python's documentation, by name (a fixed choice)."""
    from pydoc_data.topics import topics
    names = sorted(topics, key=lambda name: (-len(topics[name]), name))[:count]
    return {name: topics[name] for name in names}


class ConditionalLM(nn.Module):
    """Characters -> embedding -> conditioned recurrent layers -> logits; the topic -> its embedding,
    which every layer's cell reads once per sequence (``enc=``)."""

    def __init__(self, characters: int, topics: int, args: argparse.Namespace) -> None:
        super().__init__()
        self.embed = nn.Embedding(characters, args.emsize)
        self.topic = nn.Embedding(topics, args.context)
        self.rnn = rnndsl.make_recurrent(str(CELL), args.emsize, args.nhid, context=args.context,
                                         backend=args.backend, save_hidden=False)
        self.decoder = nn.Linear(args.nhid[-1], characters)

    def forward(self, chars: Tensor, topics: Tensor) -> Tensor:
        """``chars`` (T, batch) and ``topics`` (batch,) -> logits (T, batch, characters)."""
        outputs, _ = self.rnn(self.embed(chars), enc=self.topic(topics))
        return self.decoder(outputs)


def windows(encoded: List[Tensor], length: int, batch: int, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
    """``batch`` random windows of ``length + 1`` characters, each from a random topic: (T+1, batch), topics."""
    topics = torch.randint(len(encoded), (batch,), generator=generator)
    columns = []
    for topic in topics.tolist():
        text = encoded[topic]
        start = int(torch.randint(len(text) - length - 1, (1,), generator=generator))
        columns.append(text[start:start + length + 1])
    return torch.stack(columns, 1), topics


def held_out_bits(model: ConditionalLM, encoded: List[Tensor], length: int, shift: int) -> float:
    """Bits per character over every whole held-out window, each read with topic ``(own + shift) % topics``."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for topic, text in enumerate(encoded):
            starts = range(0, len(text) - length - 1, length)
            chunk = torch.stack([text[s:s + length + 1] for s in starts], 1)
            topics = torch.full((chunk.size(1),), (topic + shift) % len(encoded))
            logits = model(chunk[:-1], topics)
            total += F.cross_entropy(logits.flatten(0, 1), chunk[1:].flatten(), reduction="sum").item()
            count += chunk[1:].numel()
    model.train()
    return total / count / math.log(2)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    texts = topic_texts(args.topics)
    alphabet = sorted(set("".join(texts.values())))
    index = {char: i for i, char in enumerate(alphabet)}
    encoded = [torch.tensor([index[c] for c in text]) for text in texts.values()]
    cut = [int(len(text) * 0.9) for text in encoded]
    train = [text[:at] for text, at in zip(encoded, cut)]
    valid = [text[at:] for text, at in zip(encoded, cut)]
    # A window reads bptt + 1 characters from a random start: every part needs one more than that.
    shortest, name = min((len(part), name) for name, parts in zip(texts, zip(train, valid)) for part in parts)
    if shortest < args.bptt + 2:
        hint = f"give --bptt {shortest - 2} or less, or fewer --topics" if shortest > 2 else "give fewer --topics"
        raise ValueError(f"--bptt {args.bptt} is too long for topic {name!r}, whose shorter part (training or "
                         f"held out) has {shortest} characters: {hint}")
    print(f"{len(texts)} topics ({', '.join(texts)}), {sum(map(len, encoded)):,} characters, "
          f"{len(alphabet)} distinct")
    model = ConditionalLM(len(alphabet), len(texts), args)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        chunk, topics = windows(train, args.bptt, args.batch_size, generator)
        loss = F.cross_entropy(model(chunk[:-1], topics).flatten(0, 1), chunk[1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == args.steps:
            print(f"step {step:5d} | train bits/char {loss.item() / math.log(2):.3f} | "
                  f"{(time.perf_counter() - started) / step * 1000:.1f} ms/step")
    own = held_out_bits(model, valid, args.bptt, 0)
    other = held_out_bits(model, valid, args.bptt, 1) if len(texts) > 1 else own
    print(f"held-out bits/char: {own:.3f} with each window's own topic, {other:.3f} with another topic's")
    return {"own_topic": own, "other_topic": other, "train_seconds": time.perf_counter() - started}


if __name__ == "__main__":
    run(main)
