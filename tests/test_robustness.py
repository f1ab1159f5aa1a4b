"""Robustness and safety through the ``rnnmath`` command (issue 6).

Bad input gets one clear error (exit 2, one ``rnnmath: error:`` line naming the file and 1-based line or the
flag, never a traceback); legal but odd input works; faults lose nothing (atomic writes, SIGKILL and resume,
non-finite loss, Ctrl-C); model directories load safely (nothing unpickled, damage named); the same seed gives
byte-identical files. "Random shapes, lengths and layer options always match torch.nn" is
tests/test_layers.py::test_random_configurations_match_torch; no pickle anywhere in the package is
tests/test_model.py::test_no_pickle_anywhere_in_the_package.

Commands run in-process (``cli.main``) where they can; the SIGKILL, Ctrl-C and reproducibility runs are
subprocesses, so that they all see the same thread count.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rnnmath import cli, data
from rnnmath.model import load_model

# bidirectional GRU of 4 units over 50 words: trains in about a second; one thread, because the default thread
# count follows the load average and byte-identical reruns need the same count
TINY = ["--hidden", "4", "--vocab-size", "50", "--max-len", "12", "--batch-size", "16", "--dropout", "0.2",
        "--quiet", "--threads", "1"]
LABELS = ["negative", "positive"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``rnnmath argv`` run in this process."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error(code: int, err: str, *fragments: str) -> None:
    """Exit 2, one ``rnnmath...: error: ...`` line holding every fragment, no traceback."""
    assert code == 2, err
    assert "Traceback" not in err and "internal error" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("rnnmath"), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)


def write_tsv(path: Path, texts, labels) -> Path:
    path.write_text("".join(f"{t}\t{y}\n" for t, y in zip(texts, labels)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    task = data.make_order_task(160, seed=3)
    return {"train": write_tsv(root / "train.tsv", task.texts[:120], task.labels[:120]),
            "test": write_tsv(root / "test.tsv", task.texts[120:], task.labels[120:]), "root": root}


@pytest.fixture(scope="module")
def model(files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "m"
    assert cli.main(["train", "--data", str(files["train"]), "--out", str(out), "--epochs", "2", *TINY]) == 0
    return out


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# -- 1. bad input -> one clear error -----------------------------------------------------------------------
BAD_FILES = [
    # name, bytes, what the message must say
    ("empty.tsv", b"", ["empty.tsv", "holds no examples"]),
    ("blank.tsv", b"\n  \n\r\n", ["blank.tsv", "holds no examples"]),
    ("binary.tsv", bytes(range(256)) * 4, ["binary.tsv line 2", "0x80", "UTF-8"]),
    ("latin1.tsv", "good\tpositive\ncaf\u00e9 ok\tpositive\n".encode("latin-1"),
     ["latin1.tsv line 2", "0xe9", "not valid UTF-8", "UTF-8"]),
    ("utf16.tsv", "good\tpositive\n".encode("utf-16-le"), ["utf16.tsv line 1", "UTF-16", "UTF-8"]),
    ("utf16bom.tsv", "good\tpositive\n".encode("utf-16"), ["utf16bom.tsv line 1", "UTF-16", "UTF-8"]),
    ("nolabel.tsv", b"good\tpositive\njust a sentence\n", ["nolabel.tsv line 2", "2 tab-separated fields",
                                                           "found 1"]),
    ("extra.tsv", b"good\tpositive\nbad\tnegative\textra\n", ["extra.tsv line 2", "found 3"]),
    ("emptylabel.tsv", b"good\tpositive\nbad\t \n", ["emptylabel.tsv line 2", "expected a label"]),
    ("header.tsv", b"text\tsentiment\ngood\tpositive\n", ["header.tsv line 1", "'label'", "'text', 'sentiment'"]),
    ("broken.jsonl", b'{"text": "good", "label": "positive"}\n{"text": "bad", "label"\n',
     ["broken.jsonl line 2", "broken JSON", "column"]),
    ("nokey.jsonl", b'{"text": "good", "label": "positive"}\n\n{"text": "bad"}\n',
     ["nokey.jsonl line 3", "key 'label'"]),
    ("array.jsonl", b'["good", "positive"]\n', ["array.jsonl line 1", "expected a JSON object"]),
    ("nulllabel.jsonl", b'{"text": "good", "label": null}\n', ["nulllabel.jsonl line 1", "label", "None"]),
    ("columns.csv", b"sentence,label\ngood,positive\n", ["columns.csv line 1", "no column 'text'",
                                                          "found 'sentence', 'label'"]),
    ("fields.csv", b"text,label\ngood,positive\n\"bad, really\",negative,x\n", ["fields.csv line 3", "found 3"]),
    ("quotes.csv", b'text,label\ngood,positive\n"bad" oops,negative\n', ["quotes.csv line 3", "CSV"]),
]


@pytest.mark.parametrize("name, content, fragments", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_data_file_is_one_error_naming_file_and_line(name, content, fragments, model, tmp_path, capsys):
    path = tmp_path / name
    path.write_bytes(content)
    code, out, err = run(capsys, "evaluate", model, "--data", path)
    assert_one_error(code, err, *fragments)
    code, out, err = run(capsys, "train", "--data", path, "--out", tmp_path / "m", *TINY)
    assert_one_error(code, err, *fragments)
    assert not (tmp_path / "m").exists()  # nothing written for a run that could not start


def test_missing_data_file_and_directory(model, tmp_path, capsys):
    for command in (["evaluate", model], ["train", "--out", tmp_path / "m"]):
        code, _, err = run(capsys, *command, "--data", tmp_path / "nope.tsv")
        assert_one_error(code, err, "nope.tsv: no such file")
        code, _, err = run(capsys, *command, "--data", tmp_path)
        assert_one_error(code, err, "is a directory")


def test_single_class_in_training_data(tmp_path, capsys):
    path = write_tsv(tmp_path / "one.tsv", [f"sentence {i}" for i in range(30)], ["positive"] * 30)
    code, _, err = run(capsys, "train", "--data", path, "--out", tmp_path / "m", *TINY)
    assert_one_error(code, err, "one.tsv", "single class 'positive'", "at least two")


def test_labels_the_model_never_saw(model, tmp_path, capsys):
    path = write_tsv(tmp_path / "new.tsv", ["good", "so so", "bad"], ["positive", "neutral", "negative"])
    code, _, err = run(capsys, "evaluate", model, "--data", path)
    assert_one_error(code, err, "new.tsv line 2", "'neutral'", "'negative', 'positive'")


def test_validation_label_not_in_training_data(files, tmp_path, capsys):
    val = write_tsv(tmp_path / "val.tsv", ["good", "meh"], ["positive", "neutral"])
    code, _, err = run(capsys, "train", "--data", files["train"], "--val", val, "--out", tmp_path / "m", *TINY)
    assert_one_error(code, err, "val.tsv line 2", "'neutral'")


@pytest.mark.parametrize("flag, value", [
    ("--epochs", "-1"), ("--epochs", "0"), ("--hidden", "0"), ("--hidden", "1e3"), ("--lr", "nan"),
    ("--lr", "inf"), ("--lr", "-0.1"), ("--lr", "0"), ("--batch-size", "0"), ("--max-len", "0"),
    ("--vocab-size", "0"), ("--vocab-size", "-5"), ("--layers", "0"), ("--dropout", "1"), ("--dropout", "-0.5"),
    ("--word-dropout", "1"), ("--clip", "nan"), ("--patience", "0"), ("--seed", "-1"), ("--seed", str(2**64)),
    ("--dense", "0"), ("--workers", "0"), ("--hidden", "99999999"), ("--hidden", "65536"), ("--layers", "65"),
])
def test_negative_or_absurd_flag_values(flag, value, files, tmp_path, capsys):
    code, _, err = run(capsys, "train", "--data", files["train"], "--out", tmp_path / "m", *TINY, flag, value)
    assert_one_error(code, err, flag)
    assert not (tmp_path / "m").exists()


def test_huge_seed_within_range_trains(files, tmp_path, capsys):
    code, _, err = run(capsys, "train", "--data", files["train"], "--out", tmp_path / "m", *TINY, "--epochs", "1",
                       "--seed", str(2**32 - 1))
    assert code == 0, err


def test_model_directory_missing_or_incomplete(model, files, tmp_path, capsys):
    code, _, err = run(capsys, "predict", tmp_path / "nope", "good")
    assert_one_error(code, err, "nope: no such model directory")
    (tmp_path / "file").write_text("x")
    code, _, err = run(capsys, "evaluate", tmp_path / "file", "--data", files["test"])
    assert_one_error(code, err, "file: is not a directory")
    for name in ("config.json", "vocab.json", "labels.json", "model.safetensors"):
        broken = tmp_path / name.replace(".", "_")
        broken.mkdir()
        for f in model.iterdir():
            if f.name != name:
                (broken / f.name).write_bytes(f.read_bytes())
        for command in (["predict", broken, "good"], ["evaluate", broken, "--data", files["test"]]):
            code, _, err = run(capsys, *command)
            assert_one_error(code, err, str(broken / name), "missing")


def test_on_bad_line_skip_counts_and_names_the_lines(model, files, tmp_path, capsys):
    good = files["test"].read_text().splitlines()
    lines = good[:5] + ["no label here", "a\tb\tc"] + good[5:20] + ["\tpositive\tx", "x\t"] + good[20:]
    path = tmp_path / "some_bad.tsv"
    path.write_text("\n".join(lines) + "\n")
    code, _, err = run(capsys, "evaluate", model, "--data", path)
    assert_one_error(code, err, "some_bad.tsv line 6", "--on-bad-line skip")
    code, out, err = run(capsys, "evaluate", model, "--data", path, "--on-bad-line", "skip", "--json")
    assert code == 0 and "Traceback" not in err
    assert f"skipped 4 bad line(s) of {path}: 6, 7, 23, 24" in err
    metrics = json.loads(out)
    assert metrics["n"] == len(good) and metrics["skipped_lines"] == [6, 7, 23, 24]
    code, out, err = run(capsys, "train", "--data", path, "--on-bad-line", "skip", "--out", tmp_path / "m",
                         "--epochs", "1", *TINY)
    assert code == 0 and "skipped 4 bad line(s)" in err
    path.write_text("no label\nnor here\n")
    code, _, err = run(capsys, "evaluate", model, "--data", path, "--on-bad-line", "skip")
    assert_one_error(code, err, "all 2 records are bad")


def test_on_bad_line_skip_in_csv_and_jsonl(model, tmp_path, capsys):
    csv_path = tmp_path / "some_bad.csv"
    csv_path.write_text('text,label\ngood,positive\n"bad" oops,negative\nbad,negative,x\n"fine, really",positive\n')
    jsonl_path = tmp_path / "some_bad.jsonl"
    jsonl_path.write_text('{"text": "good", "label": "positive"}\n{"text": "bad"\n[1]\n{"text": "x", "label": 1.5}\n'
                          '{"text": "bad", "label": "negative"}\n{"text": "y"}\n')
    for path, skipped, n in [(csv_path, [3, 4], 2), (jsonl_path, [2, 3, 4, 6], 2)]:
        code, out, err = run(capsys, "evaluate", model, "--data", path, "--on-bad-line", "skip", "--json")
        assert code == 0 and "Traceback" not in err, err
        assert json.loads(out)["n"] == n and json.loads(out)["skipped_lines"] == skipped
        assert f"skipped {len(skipped)} bad line(s) of {path}: {', '.join(map(str, skipped))}" in err
        code, _, err = run(capsys, "evaluate", model, "--data", path)
        assert_one_error(code, err, f"{path.name} line {skipped[0]}", "--on-bad-line skip")


# -- 2. legal but odd input works --------------------------------------------------------------------------
ODD_TEXTS = [
    "",  # empty text
    "zzqv xxkq wwpj",  # only unknown words
    "qqqq jjjj kkkk",  # as many unknown words: must read exactly like the line above
    "\U0001f600\U0001f44d\U0001f3fd",  # emoji only: no words at all, so like the empty text
    "the\u200bfood\u200d was good",  # zero-width space and joiner split words
    "\u05d4\u05d0\u05d5\u05db\u05dc \u05d4\u05d9\u05d4 \u05d8\u05e2\u05d9\u05dd "  # Hebrew, then Arabic
    "\u202b\u0627\u0644\u0637\u0639\u0627\u0645\u202c",  # inside right-to-left embedding marks
    "the food was good \u2028 but slow",  # a Unicode line separator stays inside the record
]


def test_odd_but_legal_texts_train_evaluate_and_predict(files, tmp_path, capsys):
    task = data.make_order_task(80, seed=9)
    big = " ".join(["good"] * 30 + ["bad"] * 200_000)  # 1.2 MB, one line
    texts = task.texts + ODD_TEXTS[:1] + ["blorp fnord"] + ODD_TEXTS[3:] + [big]  # [1], [2]: never seen
    labels = task.labels + [LABELS[i % 2] for i in range(len(texts) - len(task.texts))]
    body = "".join(f"{t}\t{y}\r\n" for t, y in zip(texts, labels))  # Windows line endings, UTF-8 BOM
    path = tmp_path / "odd.tsv"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    out = tmp_path / "m"
    code, _, err = run(capsys, "train", "--data", path, "--out", out, "--epochs", "2", *TINY)
    assert code == 0, err
    vocab = json.loads((out / "vocab.json").read_text())["words"]
    assert not any("\r" in w or "\ufeff" in w for w in vocab)  # the BOM and CRs never become words
    assert not set(data.tokenize(ODD_TEXTS[1] + " " + ODD_TEXTS[2])) & set(vocab)
    assert sorted(json.loads((out / "labels.json").read_text())["labels"]) == LABELS  # no "positive\r"

    code, report, err = run(capsys, "evaluate", out, "--data", path, "--json")
    assert code == 0 and json.loads(report)["n"] == len(texts), err

    (tmp_path / "odd.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(
        json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\r\n" for t, y in zip(texts, labels)).encode())
    code, report_jsonl, err = run(capsys, "evaluate", out, "--data", tmp_path / "odd.jsonl", "--json")
    assert code == 0 and json.loads(report_jsonl) == json.loads(report), err  # the same records either way

    code, printed, err = run(capsys, "predict", out, "--json", *ODD_TEXTS, big)  # TEXTs after a flag too
    assert code == 0, err
    rows = [json.loads(line) for line in printed.splitlines()]
    assert [r["text"] for r in rows] == ODD_TEXTS + [big]
    p = {r["text"]: r["probabilities"] for r in rows}
    assert all(abs(sum(q.values()) - 1) < 1e-5 for q in p.values())
    assert p[ODD_TEXTS[1]] == p[ODD_TEXTS[2]]  # the same number of UNKs reads the same
    assert p[ODD_TEXTS[3]] == p[""]  # no words at all
    assert p[ODD_TEXTS[0]] != p[ODD_TEXTS[1]]
    code, printed, _ = run(capsys, "predict", "--json", out, big)
    alone = json.loads(printed)["probabilities"]
    assert alone == pytest.approx(p[big], abs=1e-6)  # (another batch: float rounding may differ)
    network = load_model(out).predict([big, " ".join(["good"] * 30 + ["bad"] * 3)], weight=0.0)
    assert torch.allclose(network[0], network[1], atol=1e-6)  # max_len 12: the network never reads the rest


def test_predict_from_stdin_with_bom_crlf_and_odd_lines(model, capsys, monkeypatch):
    lines = ODD_TEXTS + ["good"]
    raw = b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8") + b"\r\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8"))
    code, printed, err = run(capsys, "predict", model, "--json")
    assert code == 0, err
    assert [json.loads(line)["text"] for line in printed.splitlines()] == lines
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"good\n\xff\xfe\n"), encoding="utf-8"))
    code, _, err = run(capsys, "predict", model)
    assert_one_error(code, err, "standard input line 2", "UTF-8")


def test_vocab_size_one_and_max_len_one_are_legal(files, tmp_path, capsys):
    out = tmp_path / "m"
    code, _, err = run(capsys, "train", "--data", files["train"], "--out", out, *TINY, "--epochs", "1",
                       "--vocab-size", "1", "--max-len", "1", "--batch-size", "1000")
    assert code == 0, err
    assert len(json.loads((out / "vocab.json").read_text())["words"]) == 1


# -- 3. faults lose nothing --------------------------------------------------------------------------------
def test_every_model_file_is_written_atomically(files, tmp_path, capsys, monkeypatch):
    """Each file of the model directory is written to a temporary file in the same directory, fsynced, then
    renamed over the target; a write that fails (disk full) leaves the old file whole and no litter."""
    synced, replaced = set(), []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.add(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else fd)
        return real_fsync(fd)

    def replace(src, dst):
        assert str(src) in synced, f"{src} renamed before fsync"
        assert Path(src).parent == Path(dst).parent and Path(src).name.startswith(f".{Path(dst).name}.")
        replaced.append(Path(dst).name)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "m"
    code, _, err = run(capsys, "train", "--data", files["train"], "--out", out, "--epochs", "3", "--patience", "3",
                       *TINY)
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == set(replaced)  # every file, no other way in
    assert replaced.count("checkpoint.safetensors") == 3

    saved, writes = {}, {"n": 0}

    def disk_full_at_the_second_checkpoint(src, dst):
        if Path(dst).name == "checkpoint.safetensors":
            writes["n"] += 1
            if writes["n"] == 2:
                saved.update(snapshot(Path(dst).parent))
                raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    out = tmp_path / "full_disk"
    monkeypatch.setattr(os, "replace", disk_full_at_the_second_checkpoint)
    code, _, err = run(capsys, "train", "--data", files["train"], "--out", out, "--epochs", "3", "--patience", "3",
                       *TINY)
    assert_one_error(code, err, str(out / "checkpoint.safetensors"), "cannot be written", "No space left")
    assert {p.name for p in out.iterdir()} == {p.name for p in tmp_path.joinpath("m").iterdir()} \
        - {"wide.json", "wide.safetensors"}  # no litter (the wide part comes after the last epoch)
    assert snapshot(out)["checkpoint.safetensors"] == saved["checkpoint.safetensors"]  # epoch 1's, whole
    monkeypatch.setattr(os, "replace", real_replace)
    assert run(capsys, "predict", out, "good")[0] == 0
    code, _, err = run(capsys, "train", "--data", files["train"], "--out", out, "--epochs", "3", "--patience", "3",
                       *TINY, "--resume")
    assert code == 0, err
    assert snapshot(out) == snapshot(tmp_path / "m")  # and nothing is lost: resume ends where the full run did


def test_out_that_cannot_be_written(files, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = run(capsys, "train", "--data", files["train"], "--out", tmp_path / "file" / "m", *TINY)
    assert_one_error(code, err, str(tmp_path / "file" / "m"), "cannot be written")


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def start(*argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rnnmath", *map(str, argv)], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.01)


def random_moment_after_two_epochs(proc: subprocess.Popen, out: Path) -> float:
    """Wait for the checkpoints of epochs 1 and 2, then for a random time of up to 3 epochs (6 of 8 remain):
    a moment anywhere in a batch, an evaluation or a write. Returns the delay in epochs."""
    checkpoint = out / "checkpoint.safetensors"
    wait_for(proc, checkpoint.exists)
    first, start = checkpoint.stat().st_ino, time.monotonic()
    wait_for(proc, lambda: checkpoint.stat().st_ino != first)  # atomic replace: a new inode
    epoch = time.monotonic() - start
    delay = random.uniform(0, 3)
    time.sleep(delay * epoch)
    assert proc.poll() is None, f"the run ended before the signal ({delay:.2f} epochs after epoch 2)"
    return delay


# 8 epochs of 6 batches, with dropout and word dropout (the RNG state must survive the kill)
LONG = ["--epochs", "8", "--patience", "8", "--dropout", "0.3", "--word-dropout", "0.1"]


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory) -> dict[str, bytes]:
    """Two uninterrupted runs with the same data, flags and seed, in parallel: their files are identical."""
    root = tmp_path_factory.mktemp("reference")
    procs = [start("train", "--data", files["train"], "--out", root / name, *TINY, *LONG) for name in "ab"]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    a, b = snapshot(root / "a"), snapshot(root / "b")
    assert a == b, [name for name in a if a[name] != b.get(name)]
    return a


def test_same_data_flags_and_seed_give_byte_identical_files(reference, files, tmp_path, capsys):
    assert set(reference) == {"config.json", "vocab.json", "labels.json", "model.safetensors", "history.json",
                              "checkpoint.safetensors", "split.json", "wide.json", "wide.safetensors"}
    code, _, err = run(capsys, "train", "--data", files["train"], "--out", tmp_path / "other", *TINY, "--epochs", "1",
                       "--seed", "1")
    assert code == 0, err
    assert (tmp_path / "other" / "model.safetensors").read_bytes() != reference["model.safetensors"]


def test_sigkill_at_a_random_moment_then_resume(reference, files, tmp_path, capsys):
    out = tmp_path / "m"
    proc = start("train", "--data", files["train"], "--out", out, *TINY, *LONG)
    delay = random_moment_after_two_epochs(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    epochs_done = len(json.loads((out / "history.json").read_text())["epochs"])
    assert 2 <= epochs_done < 8, delay

    code, printed, err = run(capsys, "predict", out, "the food was good")
    assert code == 0 and printed.startswith(("positive", "negative")), err
    code, printed, err = run(capsys, "evaluate", out, "--data", files["test"], "--json")
    assert code == 0 and json.loads(printed)["n"] == 40, err

    resumed = subprocess.run([sys.executable, "-m", "rnnmath", "train", "--data", str(files["train"]), "--out",
                              str(out), *TINY, *LONG, "--resume"], env=subprocess_env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    after = snapshot(out)
    assert after == reference, (f"killed {delay:.2f} epochs after epoch 2, at epoch {epochs_done}",
                                [name for name in after if after[name] != reference.get(name)])


def test_ctrl_c_saves_stops_cleanly_and_resumes_to_the_same_model(reference, files, tmp_path):
    out = tmp_path / "m"
    proc = start("train", "--data", files["train"], "--out", out, *TINY, *LONG)
    random_moment_after_two_epochs(proc, out)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "saved a checkpoint in" in err and "--resume" in err, err
    resumed = subprocess.run([sys.executable, "-m", "rnnmath", "train", "--data", str(files["train"]), "--out",
                              str(out), *TINY, *LONG, "--resume"], env=subprocess_env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert snapshot(out) == reference


def test_resume_after_a_kill_before_the_first_checkpoint(files, tmp_path, capsys):
    """Killed while writing the first files (config.json only): --resume starts the run over."""
    full, out = tmp_path / "full", tmp_path / "cut"
    flags = ["--data", files["train"], *TINY, "--epochs", "2"]
    assert run(capsys, "train", "--out", full, *flags)[0] == 0
    out.mkdir()
    (out / "config.json").write_bytes((full / "config.json").read_bytes())
    (out / ".checkpoint.safetensors.x1y2.tmp").write_bytes(b"half a file")  # the kill's litter
    code, _, err = run(capsys, "predict", out, "good")
    assert_one_error(code, err, "vocab.json is missing")
    code, _, err = run(capsys, "train", "--out", out, *flags, "--resume")
    assert code == 0, err
    assert snapshot(out) == snapshot(full)


def nan_at(call: int, out: Path, saved: dict):
    """An nll_loss that returns NaN at its ``call``-th call, noting the model directory's files then."""
    real, calls = F.nll_loss, {"n": 0}

    def nll_loss(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        if calls["n"] == call:
            saved.update(snapshot(out))
            return loss * float("nan")
        return loss

    return nll_loss


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(files, tmp_path, capsys, monkeypatch):
    out, saved = tmp_path / "m", {}
    monkeypatch.setattr(F, "nll_loss", nan_at(6 + 3, out, saved))  # 96 train sentences / 16: 6 batches an epoch
    code, _, err = run(capsys, "train", "--data", files["train"], "--out", out, *TINY, "--epochs", "3")
    assert_one_error(code, err, "epoch 2, batch 3", "loss became nan", "last good checkpoint", str(out))
    assert saved and snapshot(out) == saved  # epoch 1's files, untouched
    assert json.loads((out / "history.json").read_text())["epochs"][-1]["epoch"] == 1
    assert run(capsys, "predict", out, "good")[0] == 0


def test_weights_that_turn_non_finite_are_never_saved(files, tmp_path, capsys, monkeypatch):
    """A step that leaves a NaN weight at the end of an epoch must not become the checkpoint."""
    out, saved, calls = tmp_path / "m", {}, {"n": 0}
    real_step = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 7:  # the first step of epoch 2 (6 an epoch): epoch 1's files are written
            saved.update(snapshot(out))
        if calls["n"] == 12:  # the last step of epoch 2
            with torch.no_grad():
                self.param_groups[0]["params"][0][0, 0] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    code, _, err = run(capsys, "train", "--data", files["train"], "--out", out, *TINY, "--epochs", "3")
    assert_one_error(code, err, "epoch 2", "non-finite", "last good checkpoint")
    assert snapshot(out) == saved


# -- 4. safe loading ---------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this runs ``open(marker, "w")``: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("name", ["model.safetensors", "checkpoint.safetensors", "config.json", "vocab.json"])
def test_a_malicious_pickle_in_a_model_directory_never_runs(name, model, files, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    for f in model.iterdir():
        (evil / f.name).write_bytes(f.read_bytes())
    payload = pickle.dumps(_Payload(marker))
    pickle.loads(payload)  # the payload works: it makes the marker
    assert marker.exists()
    marker.unlink()
    (evil / name).write_bytes(payload)
    (evil / "model.pt").write_bytes(payload)  # a torch.save-style file beside it is never looked at
    (evil / "pytorch_model.bin").write_bytes(payload)
    commands = [["predict", evil, "good"], ["evaluate", evil, "--data", files["test"]],
                ["train", "--data", files["train"], "--out", evil, *TINY, "--epochs", "2", "--resume"]]
    for command in commands:
        code, _, err = run(capsys, *command)
        if name == "checkpoint.safetensors" and command[0] != "train":
            assert code == 0, err  # only --resume reads the checkpoint
        else:
            assert_one_error(code, err, str(evil / name))
        assert not marker.exists()


def damage_weights(d: Path, how: str) -> None:
    path = d / "model.safetensors"
    blob = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(blob[: len(blob) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "header byte":
        blob[12] ^= 0xFF
        path.write_bytes(bytes(blob))
    elif how == "data byte":
        blob[-3] ^= 0x40  # inside the last tensor: only a checksum can tell
        path.write_bytes(bytes(blob))


def edit_json(d: Path, name: str, edit) -> None:
    document = json.loads((d / name).read_text())
    edit(document)
    (d / name).write_text(json.dumps(document))


DAMAGE = [
    ("truncated weights", lambda d: damage_weights(d, "truncated"), "model.safetensors", "truncated or damaged"),
    ("empty weights", lambda d: damage_weights(d, "empty"), "model.safetensors", "damaged"),
    ("header byte", lambda d: damage_weights(d, "header byte"), "model.safetensors", "damaged"),
    ("data byte", lambda d: damage_weights(d, "data byte"), "model.safetensors", "checksum"),
    ("weights of the checkpoint", lambda d: (d / "model.safetensors").write_bytes(
        (d / "checkpoint.safetensors").read_bytes()), "model.safetensors", "not an rnnmath weights file"),
    ("invalid json", lambda d: (d / "config.json").write_text('{"format": "rnnmath-config",'),
     "config.json", "not valid JSON"),
    ("not an object", lambda d: (d / "labels.json").write_text("[1, 2]"), "labels.json", "format"),
    ("missing version", lambda d: edit_json(d, "config.json", lambda j: j.pop("format_version")),
     "config.json", "format_version None is not supported"),
    ("wrong version", lambda d: edit_json(d, "vocab.json", lambda j: j.update(format_version=2)),
     "vocab.json", "format_version 2 is not supported"),
    ("wrong format", lambda d: edit_json(d, "config.json", lambda j: j.update(format="other")),
     "config.json", "rnnmath-config"),
    ("unknown field", lambda d: edit_json(d, "config.json", lambda j: j["config"].update(units=3)),
     "config.json", "unknown config field 'units'"),
    ("bad field", lambda d: edit_json(d, "config.json", lambda j: j["config"].update(hidden=-4)),
     "config.json", "--hidden"),
    ("absurd field", lambda d: edit_json(d, "config.json", lambda j: j["config"].update(hidden=60000)),
     "config.json", "parameters"),
    ("shape", lambda d: edit_json(d, "config.json", lambda j: j["config"].update(hidden=5)),
     "model.safetensors", "has shape"),
    ("vocab size", lambda d: edit_json(d, "vocab.json", lambda j: j["words"].pop()),
     "model.safetensors", "has shape"),
    ("one label", lambda d: edit_json(d, "labels.json", lambda j: j.update(labels=["x"])),
     "labels.json", "at least 2"),
]


@pytest.mark.parametrize("what, damage, file, message", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_model_directory_is_one_error_naming_the_file(what, damage, file, message, model, files, tmp_path,
                                                             capsys):
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in model.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    damage(copy)
    for command in (["predict", copy, "good"], ["evaluate", copy, "--data", files["test"]]):
        code, _, err = run(capsys, *command)
        assert_one_error(code, err, str(copy / file), message)


def test_damaged_checkpoint_on_resume(model, files, tmp_path, capsys):
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in model.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    blob = (copy / "checkpoint.safetensors").read_bytes()
    (copy / "checkpoint.safetensors").write_bytes(blob[: len(blob) - 100])
    code, _, err = run(capsys, "train", "--data", files["train"], "--out", copy, *TINY, "--epochs", "2", "--resume")
    assert_one_error(code, err, str(copy / "checkpoint.safetensors"), "damaged")


# -- 6. property-based: no input ever gives a traceback ----------------------------------------------------
RUNS = itertools.count()  # a fresh --out for every example
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(blob=st.binary(max_size=300), suffix=st.sampled_from([".tsv", ".csv", ".jsonl", ".txt"]))
def test_random_bytes_never_give_a_traceback(blob, suffix, model, tmp_path, capsys):
    path = tmp_path / f"random{suffix}"
    path.write_bytes(blob)
    for skip in ("error", "skip"):
        code, _, err = run(capsys, "evaluate", model, "--data", path, "--on-bad-line", skip)
        assert code in (0, 2) and "Traceback" not in err, err
        if code == 2:
            assert_one_error(code, err, str(path))
    code, _, err = run(capsys, "train", "--data", path, "--out", tmp_path / f"m{next(RUNS)}", *TINY, "--epochs", "1")
    assert code in (0, 2) and "Traceback" not in err and "internal error" not in err, err


FIELD = st.one_of(st.sampled_from(["positive", "negative", "", " ", "neutral", "1", "0", '"', '""', "text",
                                   "label", "{", "}", ",", "null", "\ufeff"]),
                  st.text(max_size=12))
RECORD = st.one_of(
    st.lists(FIELD, max_size=4).map("\t".join),
    st.lists(FIELD, max_size=4).map(",".join),
    st.dictionaries(st.sampled_from(["text", "label", "x"]),
                    st.one_of(FIELD, st.integers(), st.none(), st.booleans(), st.floats(allow_nan=True),
                              st.lists(st.integers(), max_size=2)), max_size=3).map(json.dumps),
    st.sampled_from(["good\tpositive", "bad\tnegative", '{"text": "good", "label": "positive"}', "text,label",
                     "text\tlabel", '"good, fine",positive']),
)


@FAST
@given(records=st.lists(RECORD, max_size=8), suffix=st.sampled_from([".tsv", ".csv", ".jsonl"]),
       newline=st.sampled_from(["\n", "\r\n"]), skip=st.sampled_from(["error", "skip"]))
def test_random_malformed_records_never_give_a_traceback(records, suffix, newline, skip, model, tmp_path, capsys):
    path = tmp_path / f"records{suffix}"
    path.write_text(newline.join(records), encoding="utf-8", newline="")
    code, _, err = run(capsys, "evaluate", model, "--data", path, "--on-bad-line", skip)
    assert code in (0, 2) and "Traceback" not in err and "internal error" not in err, err
    if code == 2:
        assert_one_error(code, err, str(path))
    # train refuses such data (too few examples for a validation set) or trains: never a traceback
    out = tmp_path / f"m{next(RUNS)}"
    code, _, err = run(capsys, "train", "--data", path, "--out", out, "--on-bad-line", skip, *TINY, "--epochs", "1")
    assert code in (0, 2) and "Traceback" not in err and "internal error" not in err, err


# -- issue 12: column and format mistakes are caught; every common layout is readable --------------------------
KIM = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "kim2014"


def sms_like(path: Path, n: int = 120) -> Path:
    """``label<TAB>text``, the SMS Spam Collection's layout: the columns the other way round."""
    task = data.make_order_task(n, seed=4)
    rows = [f"{y}\t{t} number {i}" for i, (t, y) in enumerate(zip(task.texts, task.labels))]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_swapped_columns_stop_training_and_column_numbers_fix_it(tmp_path, capsys):
    path = sms_like(tmp_path / "SMSSpamCollection")
    code, _, err = run(capsys, "train", "--data", path, "--out", tmp_path / "m", "--epochs", "1", *TINY)
    assert_one_error(code, err, "SMSSpamCollection", "label column 2", "120 distinct values", "columns look swapped",
                     "--text-column/--label-column")
    assert not (tmp_path / "m").exists()  # nothing written
    code, out, err = run(capsys, "train", "--data", path, "--out", tmp_path / "m", "--epochs", "1",
                         "--text-column", "2", "--label-column", "1", *TINY)
    assert code == 0, err
    assert json.loads((tmp_path / "m" / "labels.json").read_text())["labels"] == LABELS


def test_many_labels_need_max_labels(tmp_path, capsys):
    task = data.make_order_task(240, seed=4)
    path = write_tsv(tmp_path / "many.tsv", task.texts, [f"class{i % 60}" for i in range(240)])
    code, _, err = run(capsys, "train", "--data", path, "--out", tmp_path / "m", "--epochs", "1", *TINY)
    assert_one_error(code, err, "many.tsv", "60 distinct values", "--max-labels")
    code, _, err = run(capsys, "train", "--data", path, "--out", tmp_path / "m", "--epochs", "1",
                       "--max-labels", "60", *TINY)
    assert code == 0, err


@pytest.mark.skipif(not KIM.is_dir(), reason="../shared/data/kim2014 is not present")
def test_kim2014_file_trains_as_it_is(tmp_path, capsys):
    # custrev.all: label first, a space, ASCII; then a cp1252 one through --encoding auto
    code, out, err = run(capsys, "train", "--data", KIM / "custrev.all", "--format", "label-first",
                         "--out", tmp_path / "cr", "--epochs", "1", *TINY)
    assert code == 0, err
    assert "trained on 3020 sentences" in out
    code, out, err = run(capsys, "evaluate", tmp_path / "cr", "--data", KIM / "rt-polarity.all",
                         "--format", "label-first", "--json")
    assert_one_error(code, err, "rt-polarity.all line 32", "0xe9", "--encoding auto")
    code, out, err = run(capsys, "evaluate", tmp_path / "cr", "--data", KIM / "rt-polarity.all",
                         "--format", "label-first", "--encoding", "auto", "--json")
    assert code == 0 and json.loads(out)["n"] == 10662, err
    assert "rt-polarity.all is not UTF-8 (byte 0xe9 on line 32); read it as Windows-1252" in err


def test_fasttext_layout_through_the_cli(model, tmp_path, capsys):
    task = data.make_order_task(40, seed=9)
    path = tmp_path / "ft.txt"
    path.write_text("".join(f"__label__{y} {t}\n" for t, y in zip(task.texts, task.labels)))
    code, out, err = run(capsys, "evaluate", model, "--data", path, "--format", "fasttext", "--json")
    assert code == 0 and json.loads(out)["n"] == 40, err


def test_unterminated_csv_quote_skips_one_line(model, tmp_path, capsys):
    task = data.make_order_task(200, seed=9)
    rows = ["text,label"] + [f"{t},{y}" for t, y in zip(task.texts, task.labels)]
    rows[60] = '"' + rows[60]  # line 61 opens a quote it never closes
    path = tmp_path / "q.csv"
    path.write_text("\n".join(rows) + "\n")
    code, out, err = run(capsys, "evaluate", model, "--data", path, "--on-bad-line", "skip", "--json")
    assert code == 0 and json.loads(out)["n"] == 199, err
    assert any(line.startswith("rnnmath: skipped 1 bad line(s) of") and line.endswith("q.csv: 61")
               for line in err.splitlines()), err
    code, out, err = run(capsys, "evaluate", model, "--data", path, "--json")
    assert_one_error(code, err, "q.csv line 61", "quoted field opens on this line")


def test_csv_with_a_150_kb_field(model, tmp_path, capsys):
    path = tmp_path / "big.csv"
    path.write_text('text,label\n"' + "the food was good " * 8500 + '",positive\nthe food was bad,negative\n')
    code, out, err = run(capsys, "evaluate", model, "--data", path, "--json")
    assert code == 0 and json.loads(out)["n"] == 2, err


def test_non_finite_loss_in_the_first_epoch_says_no_checkpoint_exists(files, tmp_path, capsys, monkeypatch):
    out, saved = tmp_path / "m", {}
    monkeypatch.setattr(F, "nll_loss", nan_at(2, out, saved))
    code, _, err = run(capsys, "train", "--data", files["train"], "--out", out, *TINY, "--epochs", "3")
    assert_one_error(code, err, "epoch 1, batch 2", "loss became nan", f"no checkpoint exists yet in {out}",
                     "nothing to resume")
    assert "last good checkpoint" not in err and not (out / "checkpoint.safetensors").exists()


def test_history_stays_small_with_many_classes(tmp_path, capsys):
    """A 150-class run (allowed by --max-labels) writes no 150 x 150 confusion matrix into history.json."""
    task = data.make_order_task(1500, seed=2)  # 10 sentences a class: 8 / 1 / 1 in the split
    path = write_tsv(tmp_path / "many.tsv", task.texts, [f"c{i % 150}" for i in range(1500)])
    code, out, err = run(capsys, "train", "--data", path, "--out", tmp_path / "m", "--epochs", "1",
                         "--max-labels", "150", "--json", *TINY)
    assert code == 0, err
    assert "confusion" in json.loads(out)["test"]  # printed in full
    history = json.loads((tmp_path / "m" / "history.json").read_text())
    assert "confusion" not in history["test"] and len(history["test"]["per_class"]) == 150
    assert (tmp_path / "m" / "history.json").stat().st_size < 60_000


def test_overwrite_with_a_mistake_keeps_the_old_run(model, files, tmp_path, capsys):
    import shutil

    out = tmp_path / "m"
    shutil.copytree(model, out)
    before = snapshot(out)
    one_class = write_tsv(tmp_path / "one.tsv", ["good", "fine", "great"], ["positive"] * 3)
    code, _, err = run(capsys, "train", "--data", one_class, "--out", out, "--overwrite", *TINY)
    assert_one_error(code, err, "single class")
    code, _, err = run(capsys, "train", "--data", tmp_path / "missing.tsv", "--out", out, "--overwrite", *TINY)
    assert_one_error(code, err, "no such file")
    assert snapshot(out) == before
