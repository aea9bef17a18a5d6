"""Corpora, batching and progress reporting shared by the examples.

- :class:`Vocabulary` and :func:`tokenize` turn lines of words into ids, one
  ``<eos>`` after each line, as torch-rnnlib's word-language-model loader does.
- :func:`stdlib_corpus` is a word corpus every Python installation has: the
  English documentation in ``pydoc_data.topics``, split deterministically into
  train/valid/test, so the examples run offline with nothing downloaded.
- :func:`batchify` lays a token stream out as ``batch_size`` parallel columns
  and :func:`bptt_batches` cuts them into truncated-BPTT windows.
- :class:`Progress` shows a tqdm bar when tqdm is installed and the output is
  a terminal, and prints a plain line every few batches otherwise.
- :class:`HelpFormatter` shows each option's default once.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

if TYPE_CHECKING:  # rnndsl is imported only where an example uses it: generate.py --program needs torch alone
    from rnndsl import CellSpec


EOS = "<eos>"
UNK = "<unk>"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: ...)`` to an option's help, unless the help already says its default
    or there is none (``None``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if "(default" in (action.help or "") or action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def positive_int(text: str) -> int:
    """An argparse type for sizes and counts: a whole number from 1 up."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def number(*, above: Optional[float] = None, at_least: Optional[float] = None,
           below: Optional[float] = None) -> Callable[[str], float]:
    """An argparse type for a finite float within the given bounds (``nan`` and ``inf`` are
    refused: a nan learning rate trains silently to nan)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        for bound, holds, says in ((above, lambda b: value > b, "above"),
                                   (at_least, lambda b: value >= b, "at least"),
                                   (below, lambda b: value < b, "below")):
            if bound is not None and not holds(bound):
                raise argparse.ArgumentTypeError(f"must be {says} {bound:g}, got {value:g}")
        return value
    return parse


def output_file(text: str) -> Path:
    """An argparse type for a file the run writes at its end: its folder must exist and it must
    not be a folder itself, checked before training rather than after it."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name")
    folder = path.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text}: no directory {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: directory {folder} is not writable")
    return path


CELL_HELP = "stock cell name, path to a .cell file, or FILE.cell:NAME for one cell of a file with several"


def load_vector_cell(argument: str) -> CellSpec:
    """The cell ``--cell`` names (see ``CELL_HELP``), which must read a vector per step: these
    examples feed it embeddings, which an image cell (``x[input, height, width]``) would take as
    channels of images and refuse only once the model is built."""
    path, colon, name = argument.rpartition(":")
    if not (colon and path.endswith(".cell")):
        path, name = argument, ""
    from rnndsl import load_cells

    cells = load_cells(path)
    if name and name not in cells:
        raise ValueError(f"{path} has no cell named {name!r}; it has {', '.join(cells)}")
    if not name and len(cells) > 1:
        raise ValueError(f"{path} holds several cells ({', '.join(cells)}); pick one with --cell {path}:NAME")
    spec = cells[name] if name else next(iter(cells.values()))
    if len(spec.input_dims) != 1:
        dims = ", ".join(map(str, spec.input_dims))
        raise ValueError(f"cell {spec.name} reads images [{dims}] per step, and this example feeds it vectors: "
                         "use a cell whose input is a vector (such as lstm)")
    if spec.graph.extra_inputs:
        others = ", ".join(decl.name for decl in spec.graph.extra_inputs)
        raise ValueError(f"cell {spec.name} reads inputs besides its step's vector ({others}), "
                         "which this example has no data for: use a cell with one input (such as lstm)")
    return spec


def run(main: Callable[[], None]) -> None:
    """Run an example's ``main``: what rnndsl or the file system refuses (a cell file with an error,
    a size a cell cannot take, a missing file) ends the run as ``prog: error: ...``, exit 1, as
    argparse's own errors do, not as a traceback."""
    try:
        main()
    except (ValueError, OSError) as error:
        print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as error:
        rnndsl = sys.modules.get("rnndsl")  # a CellError can only come once rnndsl is imported
        if rnndsl is None or not isinstance(error, rnndsl.CellError):
            raise
        print(f"{Path(sys.argv[0]).name}: {error}", file=sys.stderr)  # says its file, line and column itself
        raise SystemExit(1) from None


def shared_data_dir() -> Optional[Path]:
    """``<repo>/../shared/data`` when present: the data the README's measurements use."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    return path if path.is_dir() else None


class Vocabulary:
    """Words to ids and back, in order of first appearance."""

    def __init__(self, words: Iterable[str] = ()) -> None:
        self.words: List[str] = []
        self.index: Dict[str, int] = {}
        for word in words:
            self.add(word)

    def add(self, word: str) -> int:
        if word not in self.index:
            self.index[word] = len(self.words)
            self.words.append(word)
        return self.index[word]

    def __len__(self) -> int:
        return len(self.words)

    def ids(self, words: Sequence[str]) -> List[int]:
        """Ids of ``words``; a word not in the vocabulary becomes ``<unk>``, or raises
        a KeyError when the vocabulary has no ``<unk>``."""
        unknown = self.index.get(UNK)
        result = []
        for word in words:
            index = self.index.get(word, unknown)
            if index is None:
                raise KeyError(f"{word!r} is not in the vocabulary (which has no {UNK})")
            result.append(index)
        return result


def read_lines(path: Path) -> List[List[str]]:
    """The whitespace-separated words of each line of a text file."""
    with open(path, encoding="utf-8") as file:
        return [line.split() for line in file]


def tokenize(lines: Sequence[Sequence[str]], vocabulary: Vocabulary) -> Tensor:
    """One long tensor of word ids, ``<eos>`` after each line."""
    ids: List[int] = []
    eos = vocabulary.index[EOS]
    for words in lines:
        ids.extend(vocabulary.ids(words))
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


_WORD = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]")


def stdlib_corpus(min_count: int = 2) -> Tuple[List[List[str]], List[List[str]], List[List[str]]]:
    """train/valid/test lines from Python's own documentation (``pydoc_data.topics``).

    Preprocessed the way Mikolov's Penn Treebank was: lower case, every number
    ``N``, punctuation as separate tokens, and words seen fewer than
    ``min_count`` times in the training split replaced by ``<unk>``. Paragraphs
    (in sorted topic order) go to valid when their index ends in 8, to test when
    it ends in 9 and to train otherwise, so the split never changes.
    """
    from pydoc_data.topics import topics

    splits: Tuple[List[List[str]], ...] = ([], [], [])
    index = 0
    for name in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[name]):
            lines = [["N" if word.isdigit() else word for word in _WORD.findall(line.lower())]
                     for line in paragraph.splitlines()]
            lines = [words for words in lines if words]
            if not lines:
                continue
            splits[{8: 1, 9: 2}.get(index % 10, 0)].extend(lines)
            index += 1
    counts = Counter(word for words in splits[0] for word in words)
    keep = {word for word, count in counts.items() if count >= min_count}
    train, valid, test = ([[word if word in keep else UNK for word in words] for words in lines]
                          for lines in splits)
    return train, valid, test


def batchify(data: Tensor, batch_size: int) -> Tensor:
    """``data`` (N,) as ``batch_size`` contiguous columns ``(N // batch_size, batch_size)``;
    the remainder that does not fill a row is dropped."""
    rows = data.size(0) // batch_size
    if rows < 2:
        raise ValueError(f"{data.size(0)} tokens are too few for batch size {batch_size}")
    return data[:rows * batch_size].view(batch_size, rows).t().contiguous()


def _window_starts(source: Tensor, bptt: int, full_only: bool, max_batches: Optional[int]) -> range:
    # The last token has no successor, so windows end one step early.
    end = source.size(0) - 1 - (bptt - 1 if full_only else 0)
    starts = range(0, max(end, 0), bptt)
    return starts if max_batches is None else starts[:max_batches]


def bptt_batches(source: Tensor, bptt: int, max_batches: Optional[int] = None,
                 full_only: bool = False) -> Iterator[Tuple[Tensor, Tensor]]:
    """Consecutive windows of ``source`` (N, batch): inputs ``(T, batch)`` and their next
    tokens, ``T = bptt`` except for a shorter last window (dropped with ``full_only``)."""
    for start in _window_starts(source, bptt, full_only, max_batches):
        steps = min(bptt, source.size(0) - 1 - start)
        yield source[start:start + steps], source[start + 1:start + 1 + steps]


def count_batches(source: Tensor, bptt: int, max_batches: Optional[int] = None,
                  full_only: bool = False) -> int:
    """How many windows :func:`bptt_batches` yields."""
    return len(_window_starts(source, bptt, full_only, max_batches))


def require_windows(source: Tensor, bptt: int, split: str, full_only: bool, hint: str) -> None:
    """Refuse a split that gives no window (no full one with ``full_only``) of ``bptt`` steps: a run
    would otherwise report a loss over nothing (0.00 for training) or divide by zero after training."""
    if count_batches(source, bptt, full_only=full_only) == 0:
        kind = "full window" if full_only else "window"
        raise ValueError(f"the {split} split gives no {kind} of {bptt} steps ({source.size(0)} rows of "
                         f"{source.size(1)} sequences); {hint}")


def perplexity(loss: float) -> float:
    """``exp(loss)``; inf where a diverged run's loss is past float range, not an OverflowError."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def divide_lr_if_worse(optimizer: torch.optim.Optimizer, lr: float, previous: Optional[float],
                       current: float, factor: float) -> float:
    """rnnlib's schedule: divide the learning rate by ``factor`` when validation loss rose."""
    if previous is not None and current > previous:
        lr /= factor
        for group in optimizer.param_groups:
            group["lr"] = lr
    return lr


class Progress:
    """Training progress: a tqdm bar on a terminal, a plain line every ``every`` batches elsewhere.

    ``update(**stats)`` after each batch; ``close()`` at the end.
    """

    def __init__(self, total: int, description: str, every: int = 50) -> None:
        self.total, self.description, self.every = total, description, every
        self.count, self.start = 0, time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # tqdm is the optional "examples" extra
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc=description, unit="batch", leave=False)

    def update(self, **stats: float) -> None:
        self.count += 1
        elapsed = time.perf_counter() - self.start
        stats = dict(stats, ms_per_batch=1000 * elapsed / self.count)
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in stats.items()}, refresh=False)
            self.bar.update()
        elif self.count % self.every == 0 or self.count == self.total:
            shown = " | ".join(f"{k.replace('_', ' ')} {v:.4g}" for k, v in stats.items())
            print(f"{self.description} | {self.count}/{self.total} batches | {shown}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
