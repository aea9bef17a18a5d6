"""Word-level language model: torch-rnnlib's word_lm, with the cell read from a ``.cell`` file.

The protocol is rnnlib's ``examples/word-language-model/word_lm.lua``: an
embedding, a stack of recurrent layers and a linear decoder; embedding and
decoder weights uniform in ±0.1 and the decoder bias zero, the recurrent weights
with the cell's own init (as the torch.nn.LSTM reference figures were measured;
``--rnn-init rnnlib`` puts them in ±0.1 too, as rnnlib did); plain SGD on the mean cross-entropy
with the gradients' global norm clipped; the hidden state carried from one
batch to the next (and reset at each epoch); the learning rate divided by 4
whenever the validation loss rises; validation and test read with batch size 1.
Each line of text ends with ``<eos>``; the vocabulary covers all three splits.
Evaluation reads windows of ``--bptt`` words with the state carried across
them, which gives the same loss as rnnlib's one word at a time, faster.

    python examples/word_lm.py                         # Python's own docs, offline
    python examples/word_lm.py --data ../shared/data/ptb-small --backend native
    python examples/word_lm.py --cell my.cell --nhid 400 400 --save lm.pt --export lm.pt2

``--save`` writes a checkpoint that embeds the cell's ``.cell`` source (read it
back with :func:`load_checkpoint`, ``torch.load(..., weights_only=True)``
underneath); ``--export`` writes a torch.export program that runs at any length and
batch with torch alone (:func:`export_program`; ``--torchscript`` writes a TorchScript
:class:`ExportedLM` instead); ``examples/generate.py --program`` samples from either.
``--compile`` trains under torch.compile, ``--amp`` under bfloat16 autocast.
"""
import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # data.py, when imported from elsewhere

import rnndsl  # noqa: E402
from data import (CELL_HELP, EOS, HelpFormatter, Progress, Vocabulary, batchify, bptt_batches, count_batches,  # noqa: E402
                  divide_lr_if_worse, load_vector_cell, number, output_file, perplexity, positive_int, read_lines,
                  require_windows, run, stdlib_corpus, tokenize)

INIT_RANGE = 0.1


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    data = parser.add_argument_group("data (default: Python's documentation, pydoc_data.topics)")
    data.add_argument("--data", type=Path, help="directory with train.txt, valid.txt, test.txt")
    data.add_argument("--train", type=Path, help="training text, one sentence per line")
    data.add_argument("--valid", type=Path, help="validation text")
    data.add_argument("--test", type=Path, help="test text")
    model = parser.add_argument_group("model")
    model.add_argument("--cell", default="lstm", help=CELL_HELP)
    model.add_argument("--emsize", type=positive_int, default=200, help="word embedding size")
    model.add_argument("--nhid", type=positive_int, nargs="+", default=[200, 200],
                       help="hidden size of each layer, one value per layer")
    model.add_argument("--rnn-init", default="cell", choices=("cell", "rnnlib"),
                       help="recurrent weights: the cell's own init (uniform in ±1/sqrt(hidden), as "
                            "torch.nn and PyTorch's word_language_model) or rnnlib's uniform ±0.1")
    model.add_argument("--backend", default="script", choices=("script", "eager", "native", "auto"),
                       help="how the cells run; native is torch's fused kernel")
    training = parser.add_argument_group("training")
    training.add_argument("--lr", type=number(above=0), default=20.0, help="initial learning rate")
    training.add_argument("--clip", type=number(above=0), default=0.5, help="gradient norm clipping")
    training.add_argument("--epochs", type=positive_int, default=6, help="number of epochs")
    training.add_argument("--batch-size", type=positive_int, default=20, help="training batch size")
    training.add_argument("--bptt", type=positive_int, default=20, help="truncated-BPTT length")
    training.add_argument("--seed", type=int, default=1111, help="random seed")
    training.add_argument("--threads", type=positive_int,
                          help="CPU threads for torch (default: torch's choice)")
    training.add_argument("--max-batches", type=positive_int,
                          help="at most this many batches per epoch and per evaluation (smoke runs)")
    output = parser.add_argument_group("output")
    output.add_argument("--save", type=output_file, help="write a checkpoint here (embeds the cell source)")
    output.add_argument("--export", type=output_file,
                        help="write the model here as a torch.export program (.pt2) that runs at any length "
                             "and batch with torch alone; see --torchscript")
    output.add_argument("--torchscript", action="store_true",
                        help="--export writes a TorchScript model (torch.jit.load) instead")
    training.add_argument("--compile", action="store_true", help="train under torch.compile")
    training.add_argument("--amp", action="store_true",
                          help="train and evaluate under bfloat16 autocast (the states stay float32)")
    args = parser.parse_args(argv)
    files = (args.train, args.valid, args.test)
    if args.data is not None and any(files):
        parser.error("give either --data or --train/--valid/--test, not both")
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if any(files) and not all(files):
        parser.error("--train, --valid and --test go together")
    if args.data is not None:
        args.train, args.valid, args.test = (args.data / f"{split}.txt"
                                             for split in ("train", "valid", "test"))
    for name in ("train", "valid", "test"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            parser.error(f"no such file: {path}")
    return args


def load_corpus(args: argparse.Namespace) -> Tuple[Vocabulary, Tensor, Tensor, Tensor]:
    """The vocabulary (words of train, valid, test in order of appearance, as rnnlib
    builds it) and each split as one stream of ids."""
    if args.train is None:
        splits = stdlib_corpus()
    else:
        splits = tuple(read_lines(path) for path in (args.train, args.valid, args.test))
    vocabulary = Vocabulary()
    for lines in splits:
        for words in lines:
            for word in words:
                vocabulary.add(word)
            vocabulary.add(EOS)
    train, valid, test = (tokenize(lines, vocabulary) for lines in splits)
    return vocabulary, train, valid, test


class WordLM(nn.Module):
    """Embedding, recurrent layers, linear decoder: ``forward(tokens (T, B)) -> logits (T, B, V)``.

    The recurrent network keeps its final state for the next call
    (``self.rnn.initialize_hidden(batch_size)`` resets it).
    """

    def __init__(self, cell, vocabulary_size: int, emsize: int, nhid: Sequence[int],
                 backend: str = "script", rnn_init: str = "cell", scan: str = "auto") -> None:
        super().__init__()
        self.nhid = list(nhid)
        self.encoder = nn.Embedding(vocabulary_size, emsize)
        keep_cell_init = (lambda network: None) if rnn_init == "cell" else None
        self.rnn = rnndsl.make_recurrent(cell, emsize, list(nhid), backend=backend, winitfun=keep_cell_init,
                                         scan=scan)
        self.decoder = nn.Linear(self.rnn.network.output_size, vocabulary_size)
        with torch.no_grad():
            self.encoder.weight.uniform_(-INIT_RANGE, INIT_RANGE)
            self.decoder.weight.uniform_(-INIT_RANGE, INIT_RANGE)
            self.decoder.bias.zero_()

    def forward(self, tokens: Tensor) -> Tensor:
        outputs, _ = self.rnn(self.encoder(tokens))
        return self.decoder(outputs)


def evaluate(model: WordLM, data: Tensor, bptt: int, max_batches: Optional[int] = None, amp: bool = False) -> float:
    """Mean cross-entropy per word over ``data`` read as one sequence (batch size 1)."""
    model.eval()
    model.rnn.initialize_hidden(1)
    source = data.view(-1, 1)
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, targets in bptt_batches(source, bptt, max_batches):
            total += window_loss_sum(model, inputs, targets, amp)
            count += targets.numel()
    return total / count


def window_loss_sum(model: WordLM, inputs: Tensor, targets: Tensor, amp: bool = False) -> float:
    """The summed cross-entropy of one evaluation window (call under ``torch.no_grad``)."""
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(inputs).float()
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction="sum").item()


def train_epoch(model: WordLM, data: Tensor, optimizer: torch.optim.Optimizer,
                args: argparse.Namespace, epoch: int) -> Tuple[float, int, float]:
    """One pass over the training windows; the mean loss, the number of batches and the seconds."""
    model.train()
    model.rnn.initialize_hidden(args.batch_size)
    parameters = [p for p in model.parameters() if p.requires_grad]
    total = count_batches(data, args.bptt, args.max_batches, full_only=True)
    progress = Progress(total, f"epoch {epoch}")
    loss_sum, batches = 0.0, 0
    start = time.perf_counter()
    for inputs, targets in bptt_batches(data, args.bptt, args.max_batches, full_only=True):
        loss_sum += train_step(model, inputs, targets, optimizer, parameters, args.clip, args.amp)
        batches += 1
        mean = loss_sum / batches
        progress.update(loss=mean, ppl=perplexity(mean))
    progress.close()
    return loss_sum / max(batches, 1), batches, time.perf_counter() - start


def train_step(model: WordLM, inputs: Tensor, targets: Tensor, optimizer: torch.optim.Optimizer,
               parameters: List[Tensor], clip: float, amp: bool = False) -> float:
    """One SGD step on one window: forward, mean cross-entropy, backward, clipping; the loss."""
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(inputs)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
    optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(parameters, clip)
    optimizer.step()
    return loss.item()


# ----------------------------------------------------------------------------
# Checkpoints and TorchScript export


def save_checkpoint(path: Path, model: WordLM, vocabulary: Vocabulary,
                    args: argparse.Namespace) -> None:
    """Weights, vocabulary, options and the cell's source: only plain types and tensors,
    so :func:`load_checkpoint` can use ``torch.load(weights_only=True)``."""
    spec = model.rnn.spec
    options = {"emsize": args.emsize, "nhid": list(args.nhid), "backend": model.rnn.backend}
    torch.save({"cell_source": spec.source, "cell_name": spec.name, "cell_path": str(spec.path),
                "options": options, "vocabulary": list(vocabulary.words),
                "state_dict": model.state_dict()}, path)


def load_checkpoint(path: Path, backend: Optional[str] = None) -> Tuple[WordLM, Vocabulary]:
    """The model (in eval mode) and vocabulary saved by :func:`save_checkpoint`;
    the cell is rebuilt from the embedded source, so the ``.cell`` file is not needed."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    cells = rnndsl.load_source(checkpoint["cell_source"], checkpoint["cell_path"])
    spec = cells[checkpoint["cell_name"]]
    options = checkpoint["options"]
    vocabulary = Vocabulary(checkpoint["vocabulary"])
    model = WordLM(spec, len(vocabulary), options["emsize"], options["nhid"],
                   backend=backend or options["backend"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), vocabulary


def _flatten_sizes(sizes) -> List[int]:
    if isinstance(sizes, int):
        return [sizes]
    return [size for part in sizes for size in _flatten_sizes(part)]


def _unflatten_state(flat: Tensor, sizes, start: int = 0):
    """The nested state with sizes ``sizes`` cut out of ``flat`` (batch, total) from ``start``."""
    if isinstance(sizes, int):
        return flat.narrow(1, start, sizes), start + sizes
    parts = []
    for part in sizes:
        state, start = _unflatten_state(flat, part, start)
        parts.append(state)
    return tuple(parts), start


def _flatten_state(state) -> List[Tensor]:
    if isinstance(state, Tensor):
        return [state]
    return [tensor for part in state for tensor in _flatten_state(part)]


class _FlatStateLM(nn.Module):
    """The model with its whole state as one ``(batch, state_size)`` tensor, for tracing:
    ``(tokens (T, B), state) -> (log-probabilities (T, B, V), new state)``."""

    def __init__(self, model: WordLM) -> None:
        super().__init__()
        self.encoder, self.network, self.decoder = model.encoder, model.rnn.network, model.decoder
        self.sizes = self.network.state_sizes

    def forward(self, tokens: Tensor, state: Tensor) -> Tuple[Tensor, Tensor]:
        nested, _ = _unflatten_state(state, self.sizes)
        final, outputs = self.network(nested, self.encoder(tokens))
        return F.log_softmax(self.decoder(outputs), dim=-1), torch.cat(_flatten_state(final), dim=1)


class ExportedLM(nn.Module):
    """What ``--export`` writes; load it with ``torch.jit.load`` alone.

    ``forward(tokens, state=None) -> (log_probs, state)``: ``tokens`` is a
    ``(T, batch)`` tensor of word ids, ``log_probs`` the ``(T, batch, vocab)``
    next-word log-probabilities and ``state`` a ``(batch, state_size)`` tensor
    to pass back in (zeros from ``initial_state(batch)`` when omitted).
    ``vocabulary`` maps ids to words.
    """

    vocabulary: List[str]
    state_size: int

    def __init__(self, core: nn.Module, vocabulary: List[str], state_size: int) -> None:
        super().__init__()
        self.core = core
        self.vocabulary = vocabulary
        self.state_size = state_size

    @torch.jit.export
    def initial_state(self, batch_size: int) -> Tensor:
        return torch.zeros(batch_size, self.state_size)

    def forward(self, tokens: Tensor, state: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        if state is None:
            state = self.initial_state(tokens.size(1))
        return self.core(tokens, state)


def export_program(path: Path, model: WordLM, vocabulary: Vocabulary) -> None:
    """Write ``model`` as a torch.export program: ``(tokens (T, B), state (B, S)) -> (log_probs, state)``,
    T and B dynamic; the vocabulary (one word per line) and S ride along as extra files.

    Every cell exports its loop as one ``scan`` node (any backend, any scan mode), so the program
    runs at any length; ``torch.export.load`` reads it without rnndsl.
    """
    core = _FlatStateLM(model.eval())
    state_size = sum(_flatten_sizes(core.sizes))
    example = (torch.zeros(3, 2, dtype=torch.long), torch.zeros(2, state_size))
    steps, batch = torch.export.Dim("T", min=1, max=1 << 20), torch.export.Dim("batch", min=1, max=1 << 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes on specializing the state's width
        program = torch.export.export(core, example, dynamic_shapes=({0: steps, 1: batch}, {0: batch}))
    partial = path.with_name("." + path.name)  # torch.export.save wants the .pt2 suffix
    torch.export.save(program, str(partial), extra_files={"vocabulary.txt": "\n".join(vocabulary.words),
                                                          "state_size.txt": str(state_size)})
    partial.replace(path)


def export(path: Path, model: WordLM, vocabulary: Vocabulary) -> None:
    """Write ``model`` as a TorchScript :class:`ExportedLM`.

    The network is traced; the compiled cells' ``forward_sequence`` keeps its
    loop over time under tracing, so the program takes any length and batch.
    Eager cells would be unrolled to the traced length, and a parallel scan is
    plain Python that tracing cannot keep, so such models are rebuilt as
    TorchScript loops (same weights) first.
    """
    parallel = any(getattr(module, "scan_mode", "") == "parallel" for module in model.modules())
    if model.rnn.backend == "eager" or parallel:
        scripted = WordLM(model.rnn.spec, len(vocabulary), model.encoder.embedding_dim,
                          model.nhid, backend="script", scan="sequential")
        scripted.load_state_dict(model.state_dict())
        model = scripted
    model = rnndsl.torchscript(model.eval())  # the cells as their TorchScript kernels, which tracing keeps
    core = _FlatStateLM(model)
    state_size = sum(_flatten_sizes(core.sizes))
    example = (torch.zeros(3, 2, dtype=torch.long), torch.zeros(2, state_size))
    with torch.no_grad(), warnings.catch_warnings():
        # The network's input checks read shapes; the trace drops them, which is
        # what we want (tests run the export at other lengths and batch sizes).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(core, example, check_trace=False)
    # Written next to the target, then renamed: a failure leaves no half-written file behind.
    partial = path.with_name(path.name + ".partial")
    torch.jit.save(torch.jit.script(ExportedLM(traced, list(vocabulary.words), state_size)), str(partial))
    partial.replace(path)


# ----------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cell = load_vector_cell(args.cell)  # before the corpus: a cell's error should not wait for it
    vocabulary, train, valid, test = load_corpus(args)
    corpus = "Python's documentation (pydoc_data.topics)" if args.train is None else str(args.train)
    print(f"corpus: {corpus} | vocabulary {len(vocabulary)} | words: train {train.numel()}, "
          f"valid {valid.numel()}, test {test.numel()}")
    train = batchify(train, args.batch_size)
    require_windows(train, args.bptt, "training", True, "give a smaller --bptt or --batch-size")
    for split, words in (("validation", valid), ("test", test)):  # read as one sequence
        require_windows(words.view(-1, 1), args.bptt, split, False, "it needs two words or more")
    model = WordLM(cell, len(vocabulary), args.emsize, args.nhid, args.backend, args.rnn_init)
    spec, size = model.rnn.spec, sum(p.numel() for p in model.parameters())
    print(f"model: cell {spec.name} ({spec.path}), backend {model.rnn.backend}, emsize {args.emsize}, "
          f"nhid {' '.join(map(str, args.nhid))}, {size} parameters")
    lr = args.lr
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    trained = model
    if args.compile:
        model = torch.compile(model)  # the same parameters; the saved and exported model is the plain one
    previous_valid = None
    for epoch in range(1, args.epochs + 1):
        train_loss, batches, train_seconds = train_epoch(model, train, optimizer, args, epoch)
        start = time.perf_counter()
        valid_loss = evaluate(model, valid, args.bptt, args.max_batches, args.amp)
        test_loss = evaluate(model, test, args.bptt, args.max_batches, args.amp)
        eval_seconds = time.perf_counter() - start
        print(f"| end of epoch {epoch:3d} | lr {lr:8.4f} | {batches} batches, "
              f"{1000 * train_seconds / max(batches, 1):6.1f} ms/batch, train {train_seconds:6.1f} s "
              f"| train loss {train_loss:5.2f} "
              f"| valid loss {valid_loss:5.2f} ppl {perplexity(valid_loss):8.2f} "
              f"| test loss {test_loss:5.2f} ppl {perplexity(test_loss):8.2f} "
              f"| eval {eval_seconds:5.1f} s", flush=True)
        lr = divide_lr_if_worse(optimizer, lr, previous_valid, valid_loss, factor=4)
        previous_valid = valid_loss
    print(f"| end of training | test loss {test_loss:5.2f} | test ppl {perplexity(test_loss):.2f}")
    if args.save is not None:
        save_checkpoint(args.save, trained, vocabulary, args)
        print(f"saved checkpoint to {args.save}")
    if args.export is not None:
        if args.torchscript:
            export(args.export, trained, vocabulary)
            print(f"exported TorchScript model to {args.export}")
        else:
            export_program(args.export, trained, vocabulary)
            print(f"exported torch.export program to {args.export}")
    return {"test_loss": test_loss, "valid_loss": valid_loss}


if __name__ == "__main__":
    run(main)
