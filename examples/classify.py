"""Bidirectional sentence classifier: torch-rnnlib's sentiment example.

Reads any ``label<TAB>sentence`` file. Sentences are embedded, read forwards
and backwards by ``rnndsl.make_bidirectional`` in padded batches with their
lengths, pooled over their real positions only (``--pool mean``, rnnlib's
length-normalized sum, or ``--pool max``) and classified by a linear layer.
rnnlib's protocol otherwise: weights uniform in ±0.1, decoder bias zero, plain
SGD with optional gradient-norm clipping, the learning rate halved whenever
the validation loss rises, a fresh hidden state for every batch. Small
models learn slowly under plain SGD; ``--optimizer adam`` trains them faster.

    python examples/classify.py --train sst.train.tsv --valid sst.dev.tsv --test sst.test.tsv
    python examples/classify.py --train labelled.tsv --pool max --cell gru --nhid 128
"""
import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # data.py, when imported from elsewhere

import rnndsl  # noqa: E402
from data import (CELL_HELP, UNK, HelpFormatter, Progress, Vocabulary, divide_lr_if_worse, load_vector_cell, number,
                  positive_int, run)  # noqa: E402

PAD = "<pad>"
INIT_RANGE = 0.1
Example = Tuple[List[str], str]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--train", type=Path, required=True, help="label<TAB>sentence file")
    parser.add_argument("--valid", type=Path,
                        help="validation file (default: every tenth training example, held out)")
    parser.add_argument("--test", type=Path, help="test file, scored once at the end")
    parser.add_argument("--cell", default="lstm", help=CELL_HELP)
    parser.add_argument("--backend", default="script", choices=("script", "eager", "native", "auto"),
                        help="how the cells run; native is torch's fused kernel")
    parser.add_argument("--emsize", type=positive_int, default=256, help="word embedding size")
    parser.add_argument("--nhid", type=positive_int, nargs="+", default=[512, 512],
                        help="hidden size of each layer (per direction), one value per layer")
    parser.add_argument("--pool", choices=("mean", "max"), default="mean",
                        help="how outputs are pooled over each sentence's real positions")
    parser.add_argument("--share", action="store_true",
                        help="share the weights of the forward and reverse directions")
    parser.add_argument("--dropout", type=number(at_least=0, below=1), default=0.0, help="dropout on the pooled vector")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd", help="optimizer")
    parser.add_argument("--lr", type=number(above=0), help="initial learning rate (default: 1 for sgd, "
                        "1e-3 for adam)")
    parser.add_argument("--clip", type=number(at_least=0), default=0.0, help="gradient norm clipping (0: none)")
    parser.add_argument("--batch-size", type=positive_int, default=20, help="sentences per batch")
    parser.add_argument("--epochs", type=positive_int, default=10, help="number of epochs")
    parser.add_argument("--max-batches", type=positive_int, help="at most this many training batches per epoch")
    parser.add_argument("--seed", type=int, default=1111, help="random seed")
    parser.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if args.lr is None:
        args.lr = 1.0 if args.optimizer == "sgd" else 1e-3
    for path in (args.train, args.valid, args.test):
        if path is not None and not path.is_file():
            parser.error(f"no such file: {path}")
    return args


def read_examples(path: Path) -> List[Example]:
    """``(words, label)`` for every non-blank ``label<TAB>sentence`` line; words lower-cased."""
    examples = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            label, tab, sentence = line.rstrip("\n").partition("\t")
            words = sentence.lower().split()
            if not tab or not label.strip() or not words:
                raise ValueError(f"{path}:{number}: expected 'label<TAB>sentence', got {line.strip()!r}")
            examples.append((words, label.strip()))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def pad_batch(examples: Sequence[Example], vocabulary: Vocabulary,
              labels: Dict[str, int]) -> Tuple[Tensor, Tensor, Tensor]:
    """Token ids ``(T, batch)`` padded at the end, the lengths ``(batch,)`` and the label ids."""
    lengths = torch.tensor([len(words) for words, _ in examples])
    tokens = torch.full((int(lengths.max()), len(examples)), vocabulary.index[PAD], dtype=torch.long)
    for column, (words, _) in enumerate(examples):
        tokens[:len(words), column] = torch.tensor(vocabulary.ids(words))
    return tokens, lengths, torch.tensor([labels[label] for _, label in examples])


class Classifier(nn.Module):
    """Embedding, bidirectional layers, pooling over real positions, linear decoder."""

    def __init__(self, cell, vocabulary_size: int, classes: int, emsize: int, nhid: Sequence[int],
                 pool: str = "mean", backend: str = "script", share: bool = False,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.pool = pool
        self.encoder = nn.Embedding(vocabulary_size, emsize)
        self.rnn = rnndsl.make_bidirectional(cell, emsize, list(nhid), backend=backend,
                                             share_weights=share)
        self.dropout = nn.Dropout(dropout)
        self.decoder = nn.Linear(self.rnn.network.output_size, classes)
        with torch.no_grad():
            self.encoder.weight.uniform_(-INIT_RANGE, INIT_RANGE)
            self.decoder.weight.uniform_(-INIT_RANGE, INIT_RANGE)
            self.decoder.bias.zero_()

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        outputs, _ = self.rnn(self.encoder(tokens), lengths=lengths)
        real = (torch.arange(tokens.size(0)).unsqueeze(1) < lengths.unsqueeze(0)).unsqueeze(2)
        if self.pool == "mean":
            pooled = outputs.masked_fill(~real, 0.0).sum(0) / lengths.unsqueeze(1).to(outputs.dtype)
        else:
            pooled = outputs.masked_fill(~real, float("-inf")).max(0).values
        return self.decoder(self.dropout(pooled))


def batches(examples: Sequence[Example], batch_size: int,
            order: Optional[Tensor] = None) -> List[List[Example]]:
    indices = range(len(examples)) if order is None else order.tolist()
    chosen = [examples[i] for i in indices]
    return [chosen[start:start + batch_size] for start in range(0, len(chosen), batch_size)]


def evaluate(model: Classifier, examples: Sequence[Example], vocabulary: Vocabulary,
             labels: Dict[str, int], batch_size: int) -> Tuple[float, float]:
    """Mean loss per sentence and accuracy."""
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for batch in batches(examples, batch_size):
            tokens, lengths, targets = pad_batch(batch, vocabulary, labels)
            logits = model(tokens, lengths)
            loss += F.cross_entropy(logits, targets, reduction="sum").item()
            correct += int((logits.argmax(1) == targets).sum())
    return loss / len(examples), correct / len(examples)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train = read_examples(args.train)
    if args.valid is None:
        train, valid = [e for i, e in enumerate(train) if i % 10 != 9], train[9::10]
        if not valid or not train:
            raise ValueError("too few examples to hold out a validation set; give --valid")
    else:
        valid = read_examples(args.valid)
    test = read_examples(args.test) if args.test is not None else []
    labels = {label: i for i, label in enumerate(sorted({label for _, label in train}))}
    if len(labels) < 2:
        raise ValueError(f"the training set has {len(labels)} label ({', '.join(labels)}); "
                         "a classifier needs two or more")
    unseen = {label for _, label in valid + test} - set(labels)
    if unseen:
        raise ValueError(f"labels {sorted(unseen)} do not occur in the training set")
    counts = Counter(word for words, _ in train for word in words)
    vocabulary = Vocabulary([PAD, UNK] + sorted(counts, key=lambda w: (-counts[w], w)))
    print(f"data: {len(train)} train, {len(valid)} valid, {len(test)} test sentences | "
          f"{len(labels)} classes | vocabulary {len(vocabulary)}")
    model = Classifier(load_vector_cell(args.cell), len(vocabulary), len(labels), args.emsize,
                       args.nhid, args.pool, args.backend, args.share, args.dropout)
    print(f"model: cell {model.rnn.spec.name}, backend {model.rnn.backend}, pool {args.pool}, "
          f"{sum(p.numel() for p in model.parameters())} parameters")
    lr = args.lr
    optimizer_class = torch.optim.SGD if args.optimizer == "sgd" else torch.optim.Adam
    optimizer = optimizer_class(model.parameters(), lr=lr)
    previous = None
    for epoch in range(1, args.epochs + 1):
        model.train()
        epoch_batches = batches(train, args.batch_size, torch.randperm(len(train)))[:args.max_batches]
        progress = Progress(len(epoch_batches), f"epoch {epoch}")
        start, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        for batch in epoch_batches:
            tokens, lengths, targets = pad_batch(batch, vocabulary, labels)
            logits = model(tokens, lengths)
            loss = F.cross_entropy(logits, targets)
            optimizer.zero_grad()
            loss.backward()
            if args.clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            loss_sum += loss.item() * len(batch)
            correct += int((logits.argmax(1) == targets).sum())
            seen += len(batch)
            progress.update(loss=loss_sum / seen, acc=correct / seen)
        progress.close()
        seconds = time.perf_counter() - start
        valid_loss, valid_accuracy = evaluate(model, valid, vocabulary, labels, args.batch_size)
        milliseconds = 1000 * seconds / len(epoch_batches)
        print(f"| end of epoch {epoch:3d} | lr {lr:.4g} | {milliseconds:6.1f} ms/batch "
              f"| train loss {loss_sum / seen:.4f} acc {correct / seen:.3f} "
              f"| valid loss {valid_loss:.4f} acc {valid_accuracy:.3f}", flush=True)
        lr = divide_lr_if_worse(optimizer, lr, previous, valid_loss, factor=2)
        previous = valid_loss
    results = {"valid_loss": valid_loss, "valid_accuracy": valid_accuracy}
    if test:
        test_loss, test_accuracy = evaluate(model, test, vocabulary, labels, args.batch_size)
        print(f"| end of training | test loss {test_loss:.4f} | test acc {test_accuracy:.3f}")
        results.update(test_loss=test_loss, test_accuracy=test_accuracy)
    return results


if __name__ == "__main__":
    run(main)
