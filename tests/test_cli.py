"""The rnnmath command end to end: train -> evaluate -> predict, resume, presets, errors, demo, datasets."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.nn.functional as F
from safetensors import safe_open

from rnnmath import cli, data

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
# --threads 1: the default depends on the load average, and byte-identical reruns need one thread count
TINY = ["--hidden", "8", "--vocab-size", "60", "--max-len", "12", "--epochs", "2", "--batch-size", "16",
        "--threads", "1"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def order_files(tmp_path_factory) -> dict[str, Path]:
    """The demo task written as a headerless TSV (train) and JSON Lines (test)."""
    root = tmp_path_factory.mktemp("data")
    task = data.make_order_task(300, seed=5)
    (root / "train.tsv").write_text("".join(f"{t}\t{y}\n" for t, y in zip(task.texts[:240], task.labels[:240])))
    (root / "test.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n"
                                             for t, y in zip(task.texts[240:], task.labels[240:])))
    return {"train": root / "train.tsv", "test": root / "test.jsonl"}


@pytest.fixture(scope="module")
def trained(order_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "m"
    assert cli.main(["train", "--data", str(order_files["train"]), "--out", str(out), "--quiet", *TINY]) == 0
    return out


def test_train_evaluate_predict_end_to_end(trained, order_files, capsys):
    history = json.loads((trained / "history.json").read_text())
    assert len(history["epochs"]) == 2 and "test" in history  # 80/10/10 split of --data, test evaluated
    assert history["test"]["n"] == 24

    code, out, _ = run(capsys, "evaluate", str(trained), "--data", str(order_files["test"]), "--json")
    metrics = json.loads(out)
    assert code == 0 and metrics["n"] == 60 and 0 <= metrics["accuracy"] <= 1
    assert set(metrics) >= {"accuracy", "macro_f1", "n", "per_class", "confusion"}
    assert sum(map(sum, metrics["confusion"])) == 60

    code, out, _ = run(capsys, "evaluate", str(trained), "--data", str(order_files["test"]))
    assert code == 0 and "accuracy" in out and "confusion matrix" in out and "precision" in out

    code, out, _ = run(capsys, "predict", str(trained), "the food was good", "--json")
    record = json.loads(out)
    assert record["text"] == "the food was good" and record["label"] in ("negative", "positive")
    assert sum(record["probabilities"].values()) == pytest.approx(1.0)

    code, out, _ = run(capsys, "predict", str(trained), "the food was good", "", "zzz unknown words")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 3
    label, probability, text = lines[0].split("\t")
    assert label == record["label"] and float(probability) == pytest.approx(max(record["probabilities"].values()),
                                                                             abs=1e-4)


def test_predict_reads_stdin_lines(trained, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\ufeffgood\r\nbad\u2028still one\n".encode())))
    code, out, _ = run(capsys, "predict", str(trained), "--json")
    texts = [json.loads(line)["text"] for line in out.splitlines()]
    assert code == 0 and texts == ["good", "bad\u2028still one"]


def test_python_dash_m_works(trained):
    result = subprocess.run([sys.executable, "-m", "rnnmath", "predict", str(trained), "not bad"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.endswith("\tnot bad\n")


def test_same_flags_same_seed_identical_files_and_resume_refuses_other_flags(trained, order_files, tmp_path, capsys):
    out = tmp_path / "again"
    code, _, _ = run(capsys, "train", "--data", str(order_files["train"]), "--out", str(out), "--quiet", *TINY)
    assert code == 0
    for name in ("model.safetensors", "checkpoint.safetensors", "config.json", "vocab.json", "history.json"):
        assert (out / name).read_bytes() == (trained / name).read_bytes(), name
    code, _, err = run(capsys, "train", "--data", str(order_files["train"]), "--out", str(out), "--resume",
                       "--hidden", "9")
    assert code == 2 and "--hidden 9 differs from the run being resumed" in err


def test_ctrl_c_then_resume_gives_the_same_model(trained, order_files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cut"
    argv = ["train", "--data", str(order_files["train"]), "--out", str(out), "--quiet", *TINY]
    calls = {"n": 0}
    real_nll_loss = F.nll_loss

    def nll_loss_then_ctrl_c(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 15:  # epoch 2 (of 12 batches each), batch 3
            os.kill(os.getpid(), signal.SIGINT)
        return real_nll_loss(*args, **kwargs)

    monkeypatch.setattr(F, "nll_loss", nll_loss_then_ctrl_c)
    code, _, err = run(capsys, *argv)
    assert code == 130 and "interrupted at epoch 2, batch 3: saved a checkpoint" in err and "--resume" in err
    monkeypatch.setattr(F, "nll_loss", real_nll_loss)
    assert run(capsys, *argv, "--resume")[0] == 0
    for name in ("model.safetensors", "checkpoint.safetensors", "history.json"):
        assert (out / name).read_bytes() == (trained / name).read_bytes(), name
    # resuming a finished run changes nothing
    assert run(capsys, *argv, "--resume")[0] == 0
    assert (out / "model.safetensors").read_bytes() == (trained / "model.safetensors").read_bytes()


def test_seed_preset_through_the_cli(order_files, tmp_path, capsys):
    out = tmp_path / "seed"
    code, _, _ = run(capsys, "train", "--data", str(order_files["train"]), "--out", str(out), "--preset", "seed",
                     "--epochs", "1", "--quiet")
    assert code == 0
    with safe_open(out / "model.safetensors", framework="pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    vocab = len(json.loads((out / "vocab.json").read_text())["words"]) + 2  # this data has < 400 words
    assert shapes == {"rnn.weight_ih_l0": (3, vocab), "rnn.weight_hh_l0": (3, 3), "rnn.bias_ih_l0": (3,),
                      "rnn.bias_hh_l0": (3,), "dense.0.weight": (4, 3), "dense.0.bias": (4,),
                      "dense.1.weight": (6, 4), "dense.1.bias": (6,), "out.weight": (2, 6), "out.bias": (2,)}
    config = json.loads((out / "config.json").read_text())["config"]
    assert (config["cell"], config["hidden"], config["vocab_size"], config["max_len"]) == ("rnn", 3, 400, 30)


def test_separate_val_and_test_files_and_csv_columns(tmp_path, capsys):
    task = data.make_order_task(120, seed=1)
    rows = "".join(f'"{t}",{y}\n' for t, y in zip(task.texts, task.labels))
    (tmp_path / "all.csv").write_text("review,sentiment\n" + rows)
    code, out, _ = run(capsys, "train", "--data", str(tmp_path / "all.csv"), "--val", str(tmp_path / "all.csv"),
                       "--test", str(tmp_path / "all.csv"), "--out", str(tmp_path / "m"), "--text-column", "review",
                       "--label-column", "sentiment", "--json", *TINY)
    result = json.loads(out)
    assert code == 0 and result["train"] == 120 and result["val"] == 120 and result["test"]["n"] == 120


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "MISSING.txt", "--out", "o"], "rnnmath: error: MISSING.txt: no such file"),
    (["evaluate", "NO_SUCH_DIR", "--data", "x"], "rnnmath: error: NO_SUCH_DIR: no such model directory"),
    (["predict", "NO_SUCH_DIR", "x"], "rnnmath: error: NO_SUCH_DIR: no such model directory"),
    (["datasets", "--fetch", "nope"], "rnnmath: error: unknown dataset 'nope'"),
])
def test_user_errors_exit_2_with_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *argv)
    assert code == 2 and err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("flag, value", [("--hidden", "0"), ("--hidden", "-3"), ("--lr", "nan"), ("--epochs", "x"),
                                         ("--dropout", "1.5"), ("--cell", "transformer"), ("--dense", "4,a")])
def test_bad_flag_values_are_usage_errors(flag, value, capsys):
    code, _, err = run(capsys, "train", "--data", "d", "--out", "o", flag, value)
    assert code == 2 and (f"argument {flag}" in err or f"error: {flag} must be one of" in err)
    assert "Traceback" not in err  # --cell is checked by Config.validate (no torch at start-up), the rest by argparse


def test_unknown_label_at_evaluation(trained, tmp_path, capsys):
    (tmp_path / "odd.txt").write_text("fine\tpositive\nmeh\tneutral\n")
    code, _, err = run(capsys, "evaluate", str(trained), "--data", str(tmp_path / "odd.txt"))
    assert code == 2 and "odd.txt line 2: label 'neutral' is not one the model was trained on" in err


def test_skip_bad_lines_reports_them(trained, tmp_path, capsys):
    (tmp_path / "bad.txt").write_text("fine\tpositive\nno label\nbad\tnegative\n")
    code, out, err = run(capsys, "evaluate", str(trained), "--data", str(tmp_path / "bad.txt"), "--json",
                         "--on-bad-line", "skip")
    assert code == 0 and json.loads(out)["n"] == 2 and "skipped 1 bad line(s)" in err and ": 2" in err


def test_internal_error_is_one_line_exit_1(capsys, monkeypatch):
    def broken(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cli, "cmd_datasets", broken)
    code, _, err = run(capsys, "datasets")
    assert code == 1 and err == "rnnmath: internal error: RuntimeError: boom second line " \
                                "(set RNNMATH_DEBUG=1 for the traceback)\n"
    monkeypatch.setenv("RNNMATH_DEBUG", "1")
    code, _, err = run(capsys, "datasets")
    assert code == 1 and "Traceback" in err


def test_datasets_lists_urls_and_finds_the_offline_copy(capsys, tmp_path):
    data_dir = SHARED if SHARED.is_dir() else tmp_path
    code, out, _ = run(capsys, "datasets", "--json", "--data-dir", str(data_dir), "--cache-dir", str(tmp_path))
    listing = {d["name"]: d for d in json.loads(out)["datasets"]}
    assert code == 0 and set(listing) == set(data.DATASETS)
    assert listing["tiny-shakespeare"]["sha256"] == data.DATASETS["tiny-shakespeare"].sha256
    if SHARED.is_dir():
        assert listing["sentiment-labelled-sentences"]["local"] == str(SHARED)
        code, out, _ = run(capsys, "datasets", "--fetch", "sentiment-labelled-sentences", "--data-dir", str(SHARED))
        assert code == 0 and "amazon_cells_labelled.txt" in out
    code, out, _ = run(capsys, "datasets", "--cache-dir", str(tmp_path))
    assert code == 0 and "archive.ics.uci.edu" in out


def test_subcommands_come_from_one_list():
    parser = cli.build_parser()
    names = set(parser._subparsers._group_actions[0].choices)
    assert names >= {"train", "evaluate", "predict", "demo", "datasets"}
    assert len(cli.SUBCOMMANDS) == len(names)  # each command is one entry of SUBCOMMANDS


def test_demo_quick(capsys, tmp_path):
    """The demo's reduced version (hidden --quick flag: 600 sentences, 2 epochs); the full demo is the same
    code with more data and epochs."""
    code, out, _ = run(capsys, "demo", "--quick", "--out", str(tmp_path / "demo"))
    assert code == 0
    assert "RNN (default preset)" in out and "bag-of-words logistic regression" in out
    assert "same words in another order and the opposite label" in out
    assert "predictions of the RNN" in out and (tmp_path / "demo" / "model.safetensors").exists()


def test_help_imports_no_torch_numpy_or_matplotlib():
    """``rnnmath --help`` and ``rnnmath predict --help`` stay fast: nothing heavy is imported to answer them."""
    probe = ("import sys; from rnnmath import cli\n"
             "for argv in (['--help'], ['predict', '--help'], ['train', '--help'], ['evaluate', '--help']):\n"
             "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
             "print(sorted(m for m in ('torch', 'numpy', 'matplotlib') if m in sys.modules), file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr.strip() == "[]", result.stderr
    assert "train" in result.stdout and "--encoding" in result.stdout and "--max-labels" in result.stdout


# -- issue 12.4: honest evaluation ----------------------------------------------------------------------------
def test_split_record_and_evaluate_split_test(trained, order_files, capsys):
    record = json.loads((trained / "split.json").read_text())
    parts = record["parts"]
    lines = [set(parts[p]["lines"]) for p in ("train", "val", "test")]
    assert [len(s) for s in lines] == [192, 24, 24] and not (lines[0] & lines[1] or lines[0] & lines[2])
    assert set().union(*lines) == set(range(1, 241))  # every line of the 240-line file, once
    file = record["files"][str(order_files["train"])]
    assert file["sha256"] == hashlib.sha256(order_files["train"].read_bytes()).hexdigest()
    history = json.loads((trained / "history.json").read_text())
    code, out, err = run(capsys, "evaluate", str(trained), "--split", "test", "--json")
    metrics = json.loads(out)
    assert code == 0 and metrics["n"] == 24 and metrics["accuracy"] == history["test"]["accuracy"], err
    assert "warning" not in err


def test_evaluate_on_the_training_file_warns_with_count_and_share(trained, order_files, capsys):
    code, out, err = run(capsys, "evaluate", str(trained), "--data", str(order_files["train"]), "--json")
    metrics = json.loads(out)
    overlap = metrics["train_overlap"]
    assert code == 0 and overlap >= 192  # the 192 training sentences, and held-out ones with a twin in them
    share = f"{overlap / 240:.1%}"
    assert f"warning: {overlap} of 240 evaluated sentences ({share}) were also in the training data" in err
    assert "--split test" in err


def test_evaluate_needs_data_or_split(trained, capsys):
    code, _, err = run(capsys, "evaluate", str(trained))
    assert code == 2 and "give either --data FILE or --split" in err


def test_evaluate_split_when_the_file_changed(trained, order_files, tmp_path, capsys):
    moved = tmp_path / "m"
    import shutil

    shutil.copytree(trained, moved)
    record = json.loads((moved / "split.json").read_text())
    copy = tmp_path / "train.tsv"
    copy.write_bytes(order_files["train"].read_bytes() + b"one more\tpositive\n")
    record["files"][str(order_files["train"])]["path"] = str(copy)
    (moved / "split.json").write_text(json.dumps(record))
    code, _, err = run(capsys, "evaluate", str(moved), "--split", "test")
    assert code == 2 and f"{copy} changed since {moved} was trained" in err and err.count("\n") == 1


def three_class_files(root: Path) -> tuple[Path, Path]:
    words = {"a": "alpha", "b": "beta", "c": "gamma"}
    rows = [f"the {words[y]} one {i % 7}\t{y}" for i in range(150) for y in "abc"]
    (root / "three.tsv").write_text("\n".join(rows) + "\n")
    (root / "two.tsv").write_text("the alpha one\ta\nthe beta one\tb\nthe alpha one 3\ta\n")
    return root / "three.tsv", root / "two.tsv"


def test_macro_average_counts_only_labels_present(tmp_path, capsys):
    """The issue's case: a 3-class model, a file holding two of the classes, all predicted right. scikit-learn's
    f1_score(average="macro") gives 1.0 there (labels present in y_true or y_pred), not 0.6667."""
    three, two = three_class_files(tmp_path)
    code, _, err = run(capsys, "train", "--data", str(three), "--out", str(tmp_path / "m"), "--quiet",
                       "--hidden", "8", "--epochs", "6", "--lr", "0.02", "--dropout", "0")
    assert code == 0, err
    code, out, _ = run(capsys, "evaluate", str(tmp_path / "m"), "--data", str(two), "--json")
    metrics = json.loads(out)
    assert metrics["accuracy"] == 1.0 and metrics["macro_f1"] == 1.0 and metrics["macro_labels"] == ["a", "b"]
    code, out, _ = run(capsys, "evaluate", str(tmp_path / "m"), "--data", str(two))
    assert "macro F1 1.0000 (mean over the 2 labels present in true or predicted labels)" in out


@pytest.mark.parametrize("y_true, y_pred, expected", [
    # expected values from sklearn.metrics.precision_recall_fscore_support(..., average="macro", zero_division=0)
    # worked by hand: mean over the labels present in y_true or y_pred
    ([0, 0, 1, 1], [0, 0, 1, 1], (1.0, 1.0, 1.0)),
    ([0, 0, 1, 1], [0, 2, 1, 1], ((1 + 1 + 0) / 3, (0.5 + 1 + 0) / 3, (2 / 3 + 1 + 0) / 3)),
    ([0, 1, 2, 0], [0, 2, 1, 1], ((1 + 0 + 0) / 3, (0.5 + 0 + 0) / 3, (2 / 3 + 0 + 0) / 3)),
])
def test_macro_average_is_scikit_learns(y_true, y_pred, expected):
    from rnnmath.common import classification_metrics

    m = classification_metrics(y_true, y_pred, ["a", "b", "c", "d"])
    assert (m["macro_precision"], m["macro_recall"], m["macro_f1"]) == pytest.approx(expected)
    try:
        from sklearn.metrics import precision_recall_fscore_support
    except ImportError:
        return
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    assert (m["macro_precision"], m["macro_recall"], m["macro_f1"]) == pytest.approx((p, r, f))


def test_val_without_test_says_what_it_did(order_files, tmp_path, capsys):
    code, _, err = run(capsys, "train", "--data", str(order_files["train"]), "--val", str(order_files["train"]),
                       "--out", str(tmp_path / "m"), *TINY, "--epochs", "1")
    assert code == 0
    assert (f"split {order_files['train']} (stratified, seed 0): train 216, test 24 sentences; no --test file was "
            "given, so 10% of --data is the test set") in err
    code, out, _ = run(capsys, "train", "--data", str(order_files["train"]), "--val", str(order_files["train"]),
                       "--out", str(tmp_path / "j"), *TINY, "--epochs", "1", "--json")
    result = json.loads(out)
    assert result["test_source"] == f"10% of {order_files['train']}" and result["test"]["n"] == 24
    assert result["val_source"] == str(order_files["train"])


# -- issue 12.5: usable from programs and under load ------------------------------------------------------------
def test_predict_on_a_pipe_answers_each_line_as_it_arrives(trained):
    proc = subprocess.Popen([sys.executable, "-m", "rnnmath", "predict", str(trained), "--json"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for text in ("the food was good", "the food was slow but good", ""):
            proc.stdin.write(text.encode() + b"\n")
            proc.stdin.flush()
            answer = _readline(proc.stdout, timeout=120)  # the pipe stays open: the answer must come anyway
            assert json.loads(answer)["text"] == text
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0 and proc.stdout.read() == b""
    finally:
        proc.kill()
        proc.wait()


def _readline(stream, timeout: float) -> bytes:
    import select

    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, "no answer before the timeout"
    return stream.readline()


def test_overwrite_and_out_holding_a_run(trained, order_files, tmp_path, capsys):
    import shutil

    out = tmp_path / "m"
    shutil.copytree(trained, out)
    (out / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "train", "--data", str(order_files["train"]), "--out", str(out), *TINY)
    assert code == 2 and "already holds a run; pass --resume to continue it, --overwrite to replace it" in err
    code, _, err = run(capsys, "train", "--data", str(order_files["train"]), "--out", str(out), *TINY,
                       "--epochs", "1", "--overwrite", "--quiet")
    assert code == 0, err
    assert len(json.loads((out / "history.json").read_text())["epochs"]) == 1
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files are replaced


def test_resume_without_a_run_is_an_error(order_files, tmp_path, capsys):
    code, _, err = run(capsys, "train", "--data", str(order_files["train"]), "--out", str(tmp_path / "none"),
                       "--resume", *TINY)
    assert code == 2 and "holds no checkpoint to resume (no run was started there)" in err
    assert not (tmp_path / "none").exists()


def test_train_log_has_elapsed_eta_and_threads(order_files, tmp_path, capsys):
    code, _, err = run(capsys, "train", "--data", str(order_files["train"]), "--out", str(tmp_path / "m"), *TINY,
                       "--epochs", "2", "--patience", "2", "--threads", "1")
    assert code == 0
    assert "training on 1 thread(s)" in err
    assert re.search(r"epoch 1/2: loss \d\.\d{4}, validation accuracy \d\.\d{4}, elapsed \d+:\d\d, ETA \d+:\d\d at "
                     r"most", err), err
    assert re.search(r"epoch 2/2: .*elapsed \d+:\d\d\n", err), err  # no ETA once done


# -- issue 12.2: any language ------------------------------------------------------------------------------------
def test_russian_and_chinese_sentences_train_and_predict(tmp_path, capsys):
    good = ["Отличный фильм", "Очень хороший сервис", "这部电影很好看", "服务很好", "Прекрасная еда"]
    bad = ["Ужасный фильм", "Очень плохой сервис", "这部电影很难看", "服务很差", "Отвратительная еда"]
    rows = [f"{t} {i}\tpos" for i in range(20) for t in good] + [f"{t} {i}\tneg" for i in range(20) for t in bad]
    rows.append("🙂🙂\tpos")  # no letter or digit: an empty sentence, counted
    (tmp_path / "ru_zh.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "ru_zh.tsv"), "--out", str(tmp_path / "m"),
                       "--hidden", "8", "--epochs", "8", "--lr", "0.02", "--dropout", "0")
    assert code == 0, err
    assert re.search(r"rnnmath: 1 of 16\d training sentences have no token at all", err), err
    words = json.loads((tmp_path / "m" / "vocab.json").read_text())["words"]
    assert {"фильм", "хороший", "好", "差"} <= set(words)
    code, out, _ = run(capsys, "predict", str(tmp_path / "m"), "--json", "Отличный сервис", "服务很差")
    labels = [json.loads(line)["label"] for line in out.splitlines()]
    assert code == 0 and labels == ["pos", "neg"]


def test_train_checks_the_device_before_reading_data(order_files, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: --device cuda is valid")
    for task in ([], ["--task", "lm"]):
        code, out, err = run(capsys, "train", "--data", str(order_files["train"]), "--out", str(tmp_path / "m"),
                             "--device", "cuda", *task, *TINY[-2:])
        assert code == 2 and out == "" and err.startswith("rnnmath: error: --device cuda")
        assert len(err.splitlines()) == 1
        assert not (tmp_path / "m").exists()


def test_predict_takes_texts_starting_with_a_dash_after_double_dash(trained, capsys):
    texts = ["-5 stars, awful", "-5", "--json", "-x"]
    for argv in (["--", *texts], ["--json", "--", *texts], ["the food", "--json", "--", *texts]):
        code, out, err = run(capsys, "predict", str(trained), *argv)
        assert code == 0, err
        lines = out.splitlines()
        expected = (["the food"] if argv[0] == "the food" else []) + texts
        if "--json" in argv[:argv.index("--")]:
            assert [json.loads(line)["text"] for line in lines] == expected
        else:
            assert [line.split("\t")[2] for line in lines] == expected


# -- issue 12: an outside tester's findings, each a kind --------------------------------------------------------
def one_line_error(code, err, message: str) -> None:
    assert code == 2 and err.startswith("rnnmath: error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err and "internal error" not in err, err


@pytest.mark.parametrize("where", ["existing file", "impossible"])
@pytest.mark.parametrize("command", ["train", "train-lm", "cv", "inspect", "flow", "demo"])
def test_every_out_that_cannot_be_written_is_exit_2_one_line(command, where, trained, order_files, tmp_path,
                                                             capsys):
    (tmp_path / "existing.txt").write_text("mine\n")
    (tmp_path / "text.txt").write_text("the cat sat on the mat. the dog sat on the log.\n" * 30)
    out = str(tmp_path / "existing.txt") if where == "existing file" else "/proc/nope/r"
    argv = {"train": ["train", "--data", str(order_files["train"]), *TINY],
            "train-lm": ["train", "--task", "lm", "--data", str(tmp_path / "text.txt"), "--bptt", "10",
                         "--batch-size", "4", "--epochs", "1", "--threads", "1"],
            "cv": ["cv", "--data", str(order_files["train"]), "--folds", "2", "--epochs", "1"],
            "inspect": ["inspect", str(trained), "good"],
            "flow": ["flow", "--cells", "rnn", "--steps", "3", "--batch", "2", "--hidden", "2"],
            "demo": ["demo", "--quick"]}[command]
    code, _, err = run(capsys, *argv, "--out", out)
    one_line_error(code, err, f"{out}/config.json: cannot be written (" if command == "train-lm"
                   else f"{out}: cannot be written (")
    assert (tmp_path / "existing.txt").read_text() == "mine\n"  # loses nothing


def test_an_oserror_naming_a_path_is_the_users_mistake(capsys, monkeypatch):
    def broken(args):
        raise IsADirectoryError(21, "Is a directory", "some/dir")

    monkeypatch.setattr(cli, "cmd_datasets", broken)
    code, _, err = run(capsys, "datasets")
    assert code == 2 and err == "rnnmath: error: some/dir: Is a directory\n"


@pytest.mark.parametrize("flag", ["--data", "--val", "--test"])
@pytest.mark.parametrize("path, message", [("/proc/nope", "/proc/nope: no such file"),
                                           ("/proc", "/proc: is a directory")])
def test_every_data_path_error_is_exit_2_one_line(flag, path, message, order_files, tmp_path, capsys):
    argv = {"--data": [], "--val": ["--data", str(order_files["train"])],
            "--test": ["--data", str(order_files["train"])]}[flag]
    code, _, err = run(capsys, "train", *argv, flag, path, "--out", str(tmp_path / "m"), *TINY)
    one_line_error(code, err, message)
    assert not (tmp_path / "m").exists()


def test_non_utf8_bytes_in_data_and_out_paths(order_files, tmp_path, capsys):
    """File names are bytes on Linux; Python keeps those that are not UTF-8 as lone surrogates (PEP 383)."""
    data_file = tmp_path / os.fsdecode(b"caf\xe9.tsv")
    out = tmp_path / os.fsdecode(b"r\xe9")
    try:
        data_file.write_bytes(order_files["train"].read_bytes())
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses non-UTF-8 names")
    code, stdout, err = run(capsys, "train", "--data", str(data_file), "--out", str(out), *TINY)
    assert code == 0, err
    shown_out = str(tmp_path) + "/r\\xe9"
    assert f"model written to {shown_out}" in stdout and "caf\\xe9.tsv (stratified" in err and "\\udc" not in err
    record = json.loads((out / "split.json").read_text(encoding="utf-8"))
    assert os.fsencode(record["parts"]["test"]["file"]) == os.fsencode(data_file)  # the bytes come back
    code, stdout, err = run(capsys, "evaluate", str(out), "--split", "test", "--json")
    assert code == 0 and json.loads(stdout)["n"] == 24, err
    code, stdout, err = run(capsys, "predict", str(out), "good")
    assert code == 0 and stdout.endswith("\tgood\n"), err
    code, stdout, err = run(capsys, "inspect", str(out), "good", "--out", str(tmp_path / os.fsdecode(b"i\xe9")),
                            "--json")
    assert code == 0 and json.loads(stdout)["report"] == str(tmp_path) + "/i\\xe9/report.html", err
    (out / "model.safetensors").write_bytes(b"damaged")
    code, _, err = run(capsys, "predict", str(out), "good")
    one_line_error(code, err, f"{shown_out}/model.safetensors: not a readable safetensors file")


def test_a_run_that_fails_while_starting_leaves_no_directory(order_files, tmp_path, capsys, monkeypatch):
    from rnnmath import model

    def broken(*args):
        raise UnicodeEncodeError("utf-8", "x", 0, 1, "surrogates not allowed")

    monkeypatch.setattr(model, "write_split_record", broken)
    code, _, err = run(capsys, "train", "--data", str(order_files["train"]), "--out", str(tmp_path / "m"), *TINY)
    assert code == 1 and not (tmp_path / "m").exists(), err


def header_files(root: Path) -> dict[str, Path]:
    rows = [(f"{word} thing number {i}", label) for i in range(20)
            for word, label in (("good", "a"), ("bad", "b"), ("odd", "c"))]
    (root / "three.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    (root / "three.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    (root / "first.txt").write_text("label text\n" + "".join(f"{y} {t}\n" for t, y in rows))
    (root / "fast.txt").write_text("".join(f"__label__{y} {t}\n" for t, y in rows))
    return {"tsv": root / "three.tsv", "csv": root / "three.csv", "label-first": root / "first.txt",
            "fasttext": root / "fast.txt"}


@pytest.mark.parametrize("kind", ["tsv", "csv"])
def test_a_header_read_with_column_numbers_stops_unless_a_flag_says(kind, tmp_path, capsys):
    path = header_files(tmp_path)[kind]
    argv = ["train", "--data", str(path), "--text-column", "1", "--label-column", "2", *TINY, "--epochs", "1"]
    code, _, err = run(capsys, *argv, "--out", str(tmp_path / "m"))
    one_line_error(code, err, f"{path} line 1: looks like a header (its label 'label' occurs on no other line)")
    assert "--text-column text --label-column label" in err and "--header" in err
    assert not (tmp_path / "m").exists()
    code, _, err = run(capsys, *argv, "--header", "--out", str(tmp_path / "h"), "--json")
    assert code == 0, err
    assert json.loads((tmp_path / "h" / "labels.json").read_text())["labels"] == ["a", "b", "c"]
    assert json.loads((tmp_path / "h" / "split.json").read_text())["reader"]["header"] is True
    code, out, err = run(capsys, "evaluate", str(tmp_path / "h"), "--split", "test", "--json")
    assert code == 0 and json.loads(out)["n"] == 6, err  # the split record re-reads with --header
    code, _, err = run(capsys, *argv, "--no-header", "--out", str(tmp_path / "n"), "--quiet")
    assert code == 0 and "label" in json.loads((tmp_path / "n" / "labels.json").read_text())["labels"]
    code, _, err = run(capsys, "train", "--data", str(path), "--no-header", "--out", str(tmp_path / "x"), *TINY)
    one_line_error(code, err, "--no-header needs column numbers")


def test_a_tsv_read_as_label_first_is_an_error_naming_the_format(tmp_path, capsys):
    path = header_files(tmp_path)["tsv"]
    code, _, err = run(capsys, "train", "--data", str(path), "--format", "label-first", "--out",
                       str(tmp_path / "m"), *TINY)
    one_line_error(code, err, f"{path}: 61 of 61 lines hold a TAB (line 1 first), so this looks like a "
                              "tab-separated file, not --format label-first")
    assert "use --format tsv" in err and not (tmp_path / "m").exists()


def test_a_header_word_is_never_a_label_first_class(tmp_path, capsys):
    path = header_files(tmp_path)["label-first"]
    argv = ["train", "--data", str(path), "--format", "label-first", *TINY, "--epochs", "1"]
    code, _, err = run(capsys, *argv, "--out", str(tmp_path / "m"))
    one_line_error(code, err, f"{path} line 1: looks like a header (its label 'label' occurs on no other line)")
    code, _, err = run(capsys, *argv, "--header", "--out", str(tmp_path / "h"), "--quiet")
    assert code == 0 and json.loads((tmp_path / "h" / "labels.json").read_text())["labels"] == ["a", "b", "c"]


@pytest.mark.parametrize("kind, hint", [("label-first", "--format label-first ('<label> <text>')"),
                                        ("fasttext", "its lines start with __label__: --format fasttext")])
def test_a_label_first_file_read_as_tsv_suggests_its_format(kind, hint, tmp_path, capsys):
    path = header_files(tmp_path)[kind]
    code, _, err = run(capsys, "train", "--data", str(path), "--out", str(tmp_path / "m"), *TINY)
    one_line_error(code, err, hint)
    assert "line 1: expected 'sentence<TAB>label'" in err


def test_evaluate_split_test_blames_repeated_sentences_not_the_user(tmp_path, capsys):
    rows = [f"{w} thing number {i}\t{y}" for i in range(20) for w, y in (("good", "a"), ("bad", "b"))]
    rows += ["the same words again\ta"] * 30
    (tmp_path / "dup.tsv").write_text("\n".join(rows) + "\n")
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "dup.tsv"), "--out", str(tmp_path / "m"), *TINY,
                       "--quiet")
    assert code == 0, err
    record = json.loads((tmp_path / "m" / "split.json").read_text())
    copies = sum(1 for n in record["parts"]["test"]["lines"] if n > 40)  # lines 41-70 are the repeats
    assert copies > 0
    code, out, err = run(capsys, "evaluate", str(tmp_path / "m"), "--split", "test", "--json")
    n = json.loads(out)["n"]
    assert code == 0 and json.loads(out)["train_overlap"] == copies
    assert (f"warning: {copies} of {n} test sentences ({copies / n:.1%}) have the same words as a training "
            f"sentence, because {tmp_path / 'dup.tsv'} repeats sentences (29 line(s) repeat an earlier one)") in err
    assert "--split test'" not in err and err.count("\n") == 1


def test_evaluate_split_test_names_a_test_file_that_shares_sentences_with_training(tmp_path, capsys):
    """--test FILE of its own: the overlap is between the two files, not repeats within one (an outside
    tester's case: the warning blamed repeated lines of the training file)."""
    rows = [f"{w} thing number {i}\t{y}" for i in range(30) for w, y in (("good", "a"), ("bad", "b"))]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    test_rows = rows[:3] + [f"{w} other item {i}\t{y}" for i in range(5) for w, y in (("good", "a"), ("bad", "b"))]
    (tmp_path / "test.tsv").write_text("\n".join(test_rows) + "\n")
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "train.tsv"), "--test", str(tmp_path / "test.tsv"),
                       "--out", str(tmp_path / "m"), *TINY, "--quiet")
    assert code == 0, err
    code, out, err = run(capsys, "evaluate", str(tmp_path / "m"), "--split", "test", "--json")
    assert code == 0 and json.loads(out)["train_overlap"] == 3
    assert (f"warning: 3 of 13 test sentences (23.1%) from {tmp_path / 'test.tsv'} have the same words as a sentence "
            f"of the training data ({tmp_path / 'train.tsv'})") in err
    assert "repeats sentences" not in err and err.count("\n") == 1


def test_train_says_where_validation_came_from_with_test_alone(order_files, tmp_path, capsys):
    code, _, err = run(capsys, "train", "--data", str(order_files["train"]), "--test", str(order_files["test"]),
                       "--out", str(tmp_path / "m"), *TINY, "--epochs", "1")
    assert code == 0
    assert (f"split {order_files['train']} (stratified, seed 0): train 216, validation 24 sentences; no --val file "
            "was given, so 10% of --data is the validation set") in err


def test_resume_errors_come_alone_and_a_finished_run_says_it_cannot_grow(trained, order_files, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "m"
    shutil.copytree(trained, run_dir)
    other = tmp_path / "other.tsv"
    other.write_bytes(order_files["train"].read_bytes().replace(b"good", b"fine"))
    code, _, err = run(capsys, "train", "--data", str(other), "--out", str(run_dir), "--resume", "--threads", "1")
    one_line_error(code, err, "--resume: the training/validation data differ from those of the run in")
    code, _, err = run(capsys, "train", "--data", str(order_files["train"]), "--out", str(run_dir), "--resume",
                       "--epochs", "5", "--threads", "1")
    one_line_error(code, err, "--epochs 5 differs from the run being resumed")
    assert "a finished run cannot be extended" in err
    code, _, err = run(capsys, "train", "--data", str(order_files["train"]), "--out", str(run_dir), "--resume",
                       "--threads", "1")
    assert code == 0 and "had already finished (2 epochs); --resume has nothing to do" in err


def test_inspect_on_chinese_text_warns_nothing(tmp_path, capsys):
    import warnings

    rows = [f"{t} {i}\t{y}" for i in range(10) for t, y in (("这部电影很好看", "pos"), ("这部电影很难看", "neg"))]
    (tmp_path / "zh.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "zh.tsv"), "--out", str(tmp_path / "m"), *TINY,
                       "--quiet", "--no-wide")  # with a wide part, inspect says that it shows the network alone
    assert code == 0, err
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = run(capsys, "inspect", str(tmp_path / "m"), "这部电影很好看", "--out", str(tmp_path / "r"))
    assert code == 0 and err == "" and not [w for w in caught if "missing from" in str(w.message)], err
    assert "这" in (tmp_path / "r" / "report.html").read_text(encoding="utf-8")  # the page has the text itself


@pytest.mark.parametrize("argv, flag", [
    (["train", "--task", "lm", "--bptt", "0", "--data", "x", "--out", "y"], "--bptt"),
    (["train", "--batch-size", "0", "--data", "x", "--out", "y"], "--batch-size"),
    (["generate", "m", "--temperature", "-1"], "--temperature"),
    (["evaluate"], "DIR"),
    ([], "COMMAND"),
])
def test_a_mistake_in_the_flags_is_one_line(argv, flag, capsys):
    """argparse's own errors (a value out of range, a missing argument) print one line naming the flag, no
    usage block, exit status 2."""
    from rnnmath.cli import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err and "error:" in err and "usage" not in err
