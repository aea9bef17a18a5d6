"""Sample text from a word model saved by ``word_lm.py --save`` or ``--export``: torch-rnnlib's generate.lua.

The model reads ``<eos>`` (the start of a sentence) and the primer, then
draws each next word from its softmax at the given temperature and feeds it
back. ``<eos>`` is printed as a line break.

    python examples/word_lm.py --save lm.pt --export lm.pt2
    python examples/generate.py --checkpoint lm.pt --words 50 --temperature 0.8 --primer "the"
    python examples/generate.py --program lm.pt2 --words 50     # torch alone: rnndsl is not imported

``--program`` takes what ``word_lm.py --export`` wrote: a torch.export program (``.pt2``) or,
with ``--torchscript``, a TorchScript model.
"""
import argparse
import sys
import time
import zipfile
from pathlib import Path
from typing import List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # word_lm.py, when imported from elsewhere

from data import EOS, UNK, HelpFormatter, Vocabulary, number, run  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="file written by word_lm.py --save")
    source.add_argument("--program", type=Path, help="file written by word_lm.py --export (needs only torch)")
    parser.add_argument("--words", type=int, default=100, help="number of words to sample")
    parser.add_argument("--temperature", type=number(above=0), default=1.0,
                        help="softmax temperature: lower is more conservative")
    parser.add_argument("--seed", type=int, default=1111, help="random seed")
    parser.add_argument("--primer", default="", help="text the model reads before sampling")
    parser.add_argument("--backend", choices=("script", "eager", "native", "auto"),
                        help="how the cells run (default: the one the model was trained with)")
    args = parser.parse_args(argv)
    if args.words < 0:
        parser.error("--words must not be negative")
    return args


def sample(model, vocabulary: Vocabulary, words: int, temperature: float = 1.0,
           primer: Sequence[str] = (), generator: Optional[torch.Generator] = None) -> List[str]:
    """``words`` words drawn one at a time after ``<eos>`` and ``primer``."""
    model.eval()
    model.rnn.initialize_hidden(1)
    context = torch.tensor([vocabulary.index[EOS]] + vocabulary.ids(primer)).view(-1, 1)
    drawn: List[str] = []
    with torch.no_grad():
        logits = model(context)[-1, 0]
        for _ in range(words):
            probabilities = torch.softmax(logits / temperature, dim=-1)
            index = int(torch.multinomial(probabilities, 1, generator=generator))
            drawn.append(vocabulary.words[index])
            logits = model(torch.tensor([[index]]))[-1, 0]
    return drawn


def archive_kind(path: Path) -> str:
    """What ``word_lm.py`` wrote at ``path``: ``"checkpoint"`` (``--save``), ``"program"`` (a
    torch.export program, ``--export``) or ``"torchscript"`` (``--export --torchscript``), read
    from the names inside the zip archive each of them is, so that a file given to the wrong flag
    is named for what it is, not reported as a corrupted file by torch."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = {name.split("/", 1)[-1] for name in archive.namelist()}
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not a file written by word_lm.py --save or --export "
                         "(it is not a torch archive)") from None
    for kind, marker in (("program", "archive_format"), ("torchscript", "constants.pkl"), ("checkpoint", "data.pkl")):
        if marker in names:
            return kind
    raise ValueError(f"{path} is a zip archive, but not one written by word_lm.py --save or --export")


def _expect(path: Path, flag: str) -> str:
    """The :func:`archive_kind` of ``path``; a ValueError for a file written for the other flag,
    saying which flag takes it."""
    kind = archive_kind(path)
    wanted = {"--checkpoint": ("checkpoint",), "--program": ("program", "torchscript")}[flag]
    if kind not in wanted:
        other = "--program" if flag == "--checkpoint" else "--checkpoint"
        what = {"checkpoint": "a checkpoint (word_lm.py --save)", "program": "a torch.export program (--export)",
                "torchscript": "a TorchScript model (--export --torchscript)"}[kind]
        raise ValueError(f"{path} is {what}: give it as {other} {path}")
    return kind


class ProgramLM:
    """A program written by ``word_lm.py --export`` as the model :func:`sample` drives:
    ``model(tokens)`` carries the state across calls, ``model.rnn.initialize_hidden(batch)`` resets it."""

    def __init__(self, path: Path) -> None:
        if _expect(path, "--program") == "program":  # with the vocabulary and the state's width as extra files
            extra = {"vocabulary.txt": "", "state_size.txt": ""}
            self.forward = torch.export.load(str(path), extra_files=extra).module()
            self.words, self.state_size = extra["vocabulary.txt"].split("\n"), int(extra["state_size.txt"])
        else:
            scripted = torch.jit.load(str(path))
            self.forward, self.words, self.state_size = scripted, list(scripted.vocabulary), scripted.state_size
        self.rnn, self.state = self, None

    def initialize_hidden(self, batch_size: int) -> None:
        self.state = torch.zeros(batch_size, self.state_size)

    def eval(self) -> "ProgramLM":
        return self

    def __call__(self, tokens):
        log_probs, self.state = self.forward(tokens, self.state)
        return log_probs


def main(argv: Optional[Sequence[str]] = None) -> str:
    args = parse_args(argv)
    if args.program is not None:
        model = ProgramLM(args.program)
        vocabulary = Vocabulary(model.words)
    else:
        _expect(args.checkpoint, "--checkpoint")
        from word_lm import load_checkpoint  # imports rnndsl, which a program does not need
        model, vocabulary = load_checkpoint(args.checkpoint, backend=args.backend)
    primer = args.primer.split()
    unknown = [word for word in primer if word not in vocabulary.index]
    if unknown and UNK not in vocabulary.index:
        raise ValueError(f"the primer has words the model does not know: {', '.join(unknown)}")
    if unknown:  # the model reads them as <unk>: say so, and show the primer as it was read
        print(f"generate.py: warning: the model does not know {', '.join(unknown)} (its words are case-sensitive); "
              f"it reads {UNK} in their place", file=sys.stderr)
        primer = [UNK if word in unknown else word for word in primer]
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    drawn = sample(model, vocabulary, args.words, args.temperature, primer, generator)
    seconds = time.perf_counter() - start
    text = " ".join(primer + drawn).replace(f" {EOS} ", "\n").replace(EOS, "\n").strip()
    print(text)
    # On stderr, so that the text alone goes to stdout: what a user waits on per word.
    print(f"sampled {len(drawn)} words in {seconds:.2f} s ({len(drawn) / max(seconds, 1e-9):.0f} words/s, "
          f"{'program ' + str(args.program) if args.program else 'backend ' + model.rnn.backend})", file=sys.stderr)
    return text


if __name__ == "__main__":
    run(main)
