"""Smoke tests of the examples: tiny models, a few batches each.

The word model is trained once per module (with a ``.cell`` file of its own,
deleted afterwards) and shared by the checkpoint, export and generation tests.
The full runs are documented commands in the README, not tests.
"""
import contextlib
import io
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import char_lm  # noqa: E402
import classify  # noqa: E402
import conditional_lm  # noqa: E402
import generate  # noqa: E402
import moving_blobs  # noqa: E402
import word_lm  # noqa: E402

# Minimal gated unit: not one of torch's cells, so only the embedded source can rebuild it.
MGU_CELL = """\
cell mgu(x[input]) -> h {
    state h[hidden]
    param w_f[hidden, input], u_f[hidden, hidden], b_f[hidden]
    param w_h[hidden, input], u_h[hidden, hidden], b_h[hidden]
    f = sigmoid(w_f @ x + u_f @ h + b_f)
    h' = (1 - f) * h + f * tanh(w_h @ x + u_h @ (f * h) + b_h)
}
"""
TINY_WORD_LM = ["--emsize", "8", "--nhid", "8", "6", "--batch-size", "4", "--bptt", "5",
                "--epochs", "1", "--max-batches", "3"]


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models run fastest on one thread, and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_main(main, argv):
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        result = main([str(arg) for arg in argv])
    return result, output.getvalue()


@pytest.fixture(scope="module")
def word_model(tmp_path_factory):
    """A word model trained on Python's documentation, saved and exported; its .cell file removed."""
    folder = tmp_path_factory.mktemp("word_lm")
    cell = folder / "mgu.cell"
    cell.write_text(MGU_CELL)
    paths = {"checkpoint": folder / "lm.pt", "export": folder / "lm.pt2"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result, output = run_main(word_lm.main, TINY_WORD_LM + [
            "--cell", cell, "--save", paths["checkpoint"], "--export", paths["export"]])
    finally:
        torch.set_num_threads(threads)
    cell.unlink()
    return dict(paths, folder=folder, result=result, output=output)


def test_word_lm_trains_offline_and_reports_test_perplexity(word_model):
    output = word_model["output"]
    assert "pydoc_data.topics" in output
    assert "end of epoch   1" in output and "ms/batch" in output
    perplexity = float(re.search(r"test ppl (\d+\.\d+)", output).group(1))
    assert math.isfinite(perplexity) and perplexity > 1
    # printed with two decimals
    assert abs(perplexity - math.exp(word_model["result"]["test_loss"])) <= 0.005 + 1e-9


def test_checkpoint_loads_with_weights_only_and_without_the_cell_file(word_model):
    checkpoint = torch.load(word_model["checkpoint"], weights_only=True)
    assert "cell mgu" in checkpoint["cell_source"]
    assert not Path(checkpoint["cell_path"]).exists()
    model, vocabulary = word_lm.load_checkpoint(word_model["checkpoint"])
    assert model.rnn.spec.name == "mgu" and model.nhid == [8, 6]
    # The reloaded model scores the validation windows exactly as the trained one did.
    args = word_lm.parse_args(TINY_WORD_LM)
    loaded_vocabulary, _, valid, _ = word_lm.load_corpus(args)
    assert vocabulary.words == loaded_vocabulary.words
    valid_loss = word_lm.evaluate(model, valid, args.bptt, args.max_batches)
    assert valid_loss == pytest.approx(word_model["result"]["valid_loss"], rel=1e-6)


@pytest.mark.parametrize("form", ["pt2", "ts"])
def test_export_runs_with_torch_alone(word_model, form):
    """The export (a torch.export program by default, TorchScript with --torchscript) gives the
    model's next-word distribution in a process that cannot import rnndsl, from a folder outside
    the repository, at a length and batch it was not traced at."""
    tokens = torch.tensor([[5, 9, 2, 31, 7, 0, 3, 12, 40], [1, 4, 4, 8, 0, 2, 6, 11, 13]]).t()
    torch.save(tokens, word_model["folder"] / "tokens.pt")
    if form == "ts":
        model, vocabulary = word_lm.load_checkpoint(word_model["checkpoint"])
        word_lm.export(word_model["folder"] / "lm.ts", model, vocabulary)
    load = {"pt2": 'torch.export.load("lm.pt2", extra_files=extra).module()', "ts": 'torch.jit.load("lm.ts")'}[form]
    script = textwrap.dedent("""
        import sys
        sys.modules["rnndsl"] = None  # any import of rnndsl now fails
        import torch
        extra = {"vocabulary.txt": "", "state_size.txt": ""}
        model = LOAD
        tokens = torch.load("tokens.pt")
        state = torch.zeros(tokens.size(1), int(extra["state_size.txt"] or model.state_size))
        with torch.no_grad():
            whole, _ = model(tokens, state)
            head, state = model(tokens[:4], state)
            tail, _ = model(tokens[4:], state)
        torch.testing.assert_close(torch.cat([head, tail]), whole)
        words = extra["vocabulary.txt"].split("\\n") if extra["vocabulary.txt"] else model.vocabulary
        assert words[0] and len(words) == whole.size(-1)
        assert not [name for name in sys.modules if name.startswith("rnndsl.")]
        torch.save(whole, "log_probs.pt")
    """).replace("LOAD", load)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    subprocess.run([sys.executable, "-I", "-c", script], cwd=word_model["folder"], env=env,
                   check=True, timeout=120)
    exported = torch.load(word_model["folder"] / "log_probs.pt")
    model, _ = word_lm.load_checkpoint(word_model["checkpoint"])
    model.rnn.initialize_hidden(tokens.size(1))
    with torch.no_grad():
        expected = torch.log_softmax(model(tokens), dim=-1)
    torch.testing.assert_close(exported, expected, rtol=1e-5, atol=1e-5)


def test_generate_samples_from_an_exported_program(word_model):
    """generate.py --program: the torch.export file, sampled without rnndsl's model classes, draws
    what the checkpoint draws with the same seed."""
    argv = ["--words", "12", "--seed", "5", "--primer", "the"]
    with contextlib.redirect_stderr(io.StringIO()):
        from_program, _ = run_main(generate.main, ["--program", word_model["export"]] + argv)
        from_checkpoint, _ = run_main(generate.main, ["--checkpoint", word_model["checkpoint"]] + argv)
    assert from_program == from_checkpoint and len(from_program.split()) >= 1


def test_a_model_on_the_parallel_scan_exports_as_a_loop(tmp_path):
    """Tracing cannot keep the parallel scan (plain Python): the export rebuilds it as a TorchScript loop."""
    paths = {"checkpoint": tmp_path / "lm.pt", "export": tmp_path / "lm.ts"}
    run_main(word_lm.main, TINY_WORD_LM + ["--cell", "mingru", "--save", paths["checkpoint"],
                                           "--export", paths["export"], "--torchscript"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm.pt", "lm.ts"]  # no partial file left
    model, _ = word_lm.load_checkpoint(paths["checkpoint"])
    assert any(getattr(m, "scan_mode", "") == "parallel" for m in model.modules())
    exported = torch.jit.load(str(paths["export"]))
    tokens = torch.tensor([[5, 9, 2, 31, 7, 0, 3], [1, 4, 4, 8, 0, 2, 6]]).t()
    model.rnn.initialize_hidden(tokens.size(1))
    with torch.no_grad():
        expected = torch.log_softmax(model(tokens), dim=-1)
        got, _ = exported(tokens)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_generate_samples_reproducibly_after_the_primer(word_model):
    argv = ["--checkpoint", word_model["checkpoint"], "--words", "12", "--seed", "3",
            "--primer", "the if", "--temperature", "0.7"]
    first, _ = run_main(generate.main, argv)
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        second, printed = run_main(generate.main, argv)
    assert first == second and first.startswith("the if")
    assert printed.strip() == second  # the text alone on stdout; the rate on stderr
    assert re.fullmatch(r"sampled 12 words in [0-9.]+ s \([0-9]+ words/s, backend \w+\)\n", errors.getvalue())
    model, vocabulary = word_lm.load_checkpoint(word_model["checkpoint"])
    drawn = generate.sample(model, vocabulary, 12, 0.7, ["the"], torch.Generator().manual_seed(3))
    assert len(drawn) == 12 and set(drawn) <= set(vocabulary.words)


def test_word_lm_on_ptb_small_with_the_native_backend(data_dir):
    result, output = run_main(word_lm.main, TINY_WORD_LM + [
        "--data", data_dir / "ptb-small", "--backend", "native"])
    assert "vocabulary 7596" in output  # the figure in the data's README
    assert "backend native" in output and math.isfinite(result["test_loss"])


def test_char_lm_reports_bits_per_character(data_dir):
    result, output = run_main(char_lm.main, [
        "--data", data_dir / "tiny-shakespeare.txt", "--rnn-size", "16", "--wordvec-size", "8",
        "--seq-length", "10", "--max-batches", "3"])
    assert "65 characters" in output and "valid bpc" in output
    assert 0 < result["valid_bpc"] < 8


def write_keyword_sentences(path: Path, count: int = 200) -> None:
    """Labelled by which keyword the sentence holds, among filler words; lengths 3 to 13."""
    generator = torch.Generator().manual_seed(0)
    filler = "the a movie film plot was is really quite very story acting it this".split()
    keywords = {"pos": ["good", "great", "fine"], "neg": ["bad", "awful", "poor"]}
    lines = []
    for _ in range(count):
        label = ("pos", "neg")[int(torch.randint(2, (), generator=generator))]
        length = int(torch.randint(2, 13, (), generator=generator))
        words = [filler[int(i)] for i in torch.randint(len(filler), (length,), generator=generator)]
        keyword = keywords[label][int(torch.randint(3, (), generator=generator))]
        words.insert(int(torch.randint(len(words) + 1, (), generator=generator)), keyword)
        lines.append(f"{label}\t{' '.join(words)}\n")
    path.write_text("".join(lines))


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_classify_learns_keyword_sentences(tmp_path, pool):
    data = tmp_path / "labelled.tsv"
    write_keyword_sentences(data)
    result, output = run_main(classify.main, [
        "--train", data, "--emsize", "16", "--nhid", "16", "--batch-size", "10", "--epochs", "3",
        "--optimizer", "adam", "--lr", "0.01", "--pool", pool])
    assert "2 classes" in output and f"pool {pool}" in output
    assert result["valid_accuracy"] >= 0.9


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_classify_pools_over_real_positions_only(pool):
    """A sentence gets the same logits alone and padded beside a longer one."""
    torch.manual_seed(0)
    vocabulary = classify.Vocabulary([classify.PAD, classify.UNK, "a", "b", "c"])
    model = classify.Classifier("lstm", len(vocabulary), 3, emsize=4, nhid=[5, 3], pool=pool).eval()
    short, long = (["a", "b"], "x"), (["c", "a", "b", "b", "c"], "x")
    labels = {"x": 0}
    alone = model(*classify.pad_batch([short], vocabulary, labels)[:2])
    padded = model(*classify.pad_batch([short, long], vocabulary, labels)[:2])
    torch.testing.assert_close(padded[:1], alone)


TINY_BLOBS = ["--size", "8", "--frames", "4", "--hidden", "2", "2", "--kernel", "3", "--steps", "3",
              "--batch-size", "2", "--threads", "1"]


def test_moving_blobs_stay_on_the_canvas_and_move():
    frames = moving_blobs.moving_blobs(3, 40, 16, 2, torch.Generator().manual_seed(0))
    assert frames.shape == (40, 3, 16, 16) and frames.min() >= 0 and frames.max() <= 1
    assert (frames.flatten(2).amax(-1) > 0.5).all()  # a blob is seen in every frame, bounces included
    assert not torch.equal(frames[0], frames[1])


def test_moving_blobs_trains_a_convlstm_and_draws_its_predictions(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "blobs.png"
    (before, after), output = run_main(moving_blobs.main, TINY_BLOBS + ["--png", png])
    assert math.isfinite(before) and math.isfinite(after)
    assert "copying the last frame" in output and f"wrote {png}" in output
    assert png.read_bytes().startswith(b"\x89PNG")


def test_moving_blobs_without_matplotlib_skips_the_picture(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    png = tmp_path / "blobs.png"
    _, output = run_main(moving_blobs.main, TINY_BLOBS + ["--steps", "1", "--backend", "eager", "--png", png])
    assert "matplotlib is not installed: no picture" in output and not png.exists()


def test_conditional_lm_trains_a_few_steps():
    result, printed = run_main(conditional_lm.main, ["--topics", "2", "--nhid", "8", "--emsize", "4",
                                                     "--context", "3", "--bptt", "6", "--batch-size", "4",
                                                     "--steps", "3"])
    assert "held-out bits/char" in printed
    assert math.isfinite(result["own_topic"]) and math.isfinite(result["other_topic"])


@pytest.mark.parametrize("script, arguments, words", [
    ("word_lm.py", ["--max-batches", "-1"], "argument --max-batches: must be at least 1, got -1"),
    ("word_lm.py", ["--cell", "/no/such/x.cell", "--epochs", "1", "--max-batches", "1"],
     "error: no such file: /no/such/x.cell"),
    ("classify.py", ["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    ("generate.py", ["--checkpoint", "/no/such/model.pt"], "generate.py: error: [Errno 2] No such file"),
    # checked before training, not after it
    ("word_lm.py", ["--save", "/no/such/dir/lm.pt"], "argument --save: cannot write /no/such/dir/lm.pt: no directory"),
    ("word_lm.py", ["--cell", "convlstm"], "cell convlstm reads images [input, height, width] per step"),
    ("conditional_lm.py", ["--topics", "1"], "--topics must be from 2 to"),
    # a cell's error, before the corpus loads, under the script's name
    ("word_lm.py", ["--cell", "lstmm"], "word_lm.py: error: no stock cell named 'lstmm'"),
])
def test_bad_arguments_end_the_examples_with_an_error_not_a_traceback(script, arguments, words):
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *arguments], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode in (1, 2) and words in result.stderr
    assert "Traceback" not in result.stderr


def test_number_arguments_refuse_nan_inf_and_out_of_range_values():
    import argparse

    from data import number
    learning_rate, dropout = number(above=0), number(at_least=0, below=1)
    assert learning_rate("0.5") == 0.5 and dropout("0") == 0.0
    for parse, text, says in [(learning_rate, "nan", "finite"), (learning_rate, "inf", "finite"),
                              (learning_rate, "0", "above 0"), (dropout, "1", "below 1"),
                              (dropout, "-0.1", "at least 0"), (dropout, "x", "expected a number")]:
        with pytest.raises(argparse.ArgumentTypeError, match=says):
            parse(text)


def test_cell_argument_picks_one_cell_of_a_file_with_several(tmp_path):
    from data import load_vector_cell
    path = tmp_path / "two.cell"
    path.write_text(MGU_CELL + MGU_CELL.replace("cell mgu", "cell other"))
    assert load_vector_cell(f"{path}:other").name == "other"
    with pytest.raises(ValueError, match=f"pick one with --cell {path}:NAME"):
        load_vector_cell(str(path))
    with pytest.raises(ValueError, match="has no cell named 'third'; it has mgu, other"):
        load_vector_cell(f"{path}:third")


@pytest.mark.parametrize("flag, key, says", [
    ("--checkpoint", "export", "is a torch.export program (--export): give it as --program"),
    ("--program", "checkpoint", "is a checkpoint (word_lm.py --save): give it as --checkpoint"),
])
def test_generate_names_a_file_given_to_the_wrong_flag(word_model, flag, key, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        generate.main([flag, str(word_model[key]), "--words", "1"])


def test_generate_from_a_program_runs_without_importing_rnndsl(word_model):
    script = textwrap.dedent(f"""
        import sys
        sys.modules["rnndsl"] = None  # any import of rnndsl now fails
        sys.path.insert(0, {str(EXAMPLES)!r})
        import generate
        generate.main(["--program", "lm.pt2", "--words", "2"])
    """)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    subprocess.run([sys.executable, "-I", "-c", script], cwd=word_model["folder"], env=env, check=True,
                   capture_output=True, timeout=120)


def test_splits_too_short_for_a_window_are_refused_before_training(tmp_path, data_dir):
    """A run used to train on no window and report a train loss of 0.00, or divide by zero after
    its training, when a split held no full window of the asked length."""
    with pytest.raises(ValueError, match="the training split gives no full window of 4000 steps"):
        word_lm.main(["--emsize", "4", "--nhid", "4", "--batch-size", "20", "--bptt", "4000",
                      "--data", str(data_dir / "ptb-small")])  # 3,688 rows of 20
    text = tmp_path / "t.txt"
    text.write_text("a b c d e f g h\n" * 20)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="the validation split gives no window"):
        word_lm.main(TINY_WORD_LM + ["--train", str(text), "--valid", str(tmp_path / "empty.txt"), "--test", str(text)])
    with pytest.raises(ValueError, match="the validation split gives no full window of 1500 steps"):
        char_lm.main(["--data", str(data_dir / "tiny-shakespeare.txt"), "--seq-length", "1500", "--rnn-size", "4"])
    with pytest.raises(ValueError, match=r"--bptt 100000 is too long for topic .*: give --bptt \d+ or less"):
        conditional_lm.main(["--bptt", "100000", "--steps", "1"])


def test_examples_refuse_a_cell_with_other_inputs_and_a_classifier_of_one_label(tmp_path):
    from data import load_vector_cell
    with pytest.raises(ValueError, match=r"cell cond_gru reads inputs besides its step's vector \(enc\)"):
        load_vector_cell(str(EXAMPLES / "conditional_gru.cell"))
    one_label = tmp_path / "one.tsv"
    one_label.write_text("pos\tgood film\n" * 30)
    with pytest.raises(ValueError, match="the training set has 1 label"):
        classify.main(["--train", str(one_label), "--epochs", "1"])


def test_a_diverged_run_reports_an_infinite_perplexity():
    from data import perplexity
    assert perplexity(0.0) == 1.0 and perplexity(1e4) == math.inf


def test_generate_says_which_primer_words_the_model_reads_as_unknown(word_model):
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        text, _ = run_main(generate.main, ["--checkpoint", word_model["checkpoint"], "--words", "2",
                                           "--primer", "zzzqqq the"])
    assert text.startswith("<unk> the") and "does not know zzzqqq" in errors.getvalue()
