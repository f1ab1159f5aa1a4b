"""The rnnmath command end to end: train -> evaluate -> predict, resume, presets, errors, demo, datasets."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.nn.functional as F
from safetensors import safe_open

from rnnmath import cli, data

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
TINY = ["--hidden", "8", "--vocab-size", "60", "--max-len", "12", "--epochs", "2", "--batch-size", "16"]


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
