"""Data-parallel training (rnnmath.distributed) on CPU with gloo and 2 processes.

The oracle is one process: W processes with --batch-size B must take the same steps as one process with
--batch-size W·B on the same data order (DDP averages the gradients), so their weights must agree to float
rounding. Also: only rank 0 writes; a run stopped by a failing worker names that rank in one line, leaves
the last complete epoch as the model, and resumes to exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from rnnmath import distributed
from rnnmath.data import make_order_task
from rnnmath.model import PRESETS, load_model
from rnnmath.train import train

B = 5  # per-process batch
# no dropout: with it, one process and two would draw different masks
CONFIG = dataclasses.replace(PRESETS["default"], hidden=8, epochs=2, patience=2, batch_size=B, dropout=0.0,
                             word_dropout=0.0, vocab_size=60)
# N training sentences -> the last global batch of 2·B: 3 rows (shares of 2 and 1), 1 row (rank 1: stand-in)
SIZES = {"uneven": 63, "stand-in": 61}
VAL = 21  # odd: the ranks evaluate 11 and 10 sentences


def data(n_train: int):
    examples = make_order_task(n_train + VAL, seed=7)
    return examples.subset(range(n_train)), examples.subset(range(n_train, n_train + VAL))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the shares of a step, checked against the global batch without any process group ---------------------
@pytest.mark.parametrize("world,n", [(2, 26), (3, 26), (3, 25), (4, 9), (2, 2)])
def test_shards_average_to_the_global_batch(monkeypatch, world, n):
    """(1/W) Σ_r weight_r · mean(x[rows_r]) is the mean of x over the global batch, and the real rows of the
    W shares are the global batch, each row once."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    x = torch.randn(n, dtype=torch.float64)
    shares = []
    for r in range(world):
        monkeypatch.setattr(distributed, "world_size", lambda w=world: w)
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shares.append(distributed.shard(order, batch_size=3))
    global_batches = order.split(3 * world)
    assert all(len(s) == len(global_batches) for s in shares)  # the same number of backward passes
    for k, batch in enumerate(global_batches):
        steps = [s[k] for s in shares]
        real = torch.cat([s.rows[: s.count] for s in steps])
        assert sorted(real.tolist()) == sorted(batch.tolist())
        assert all(s.count == len(s.rows) or (s.count == 0 and s.weight == 0) for s in steps)
        average = sum(s.weight * x[s.rows].mean() for s in steps) / world
        torch.testing.assert_close(average, x[batch].mean(), rtol=1e-12, atol=1e-12)


# -- two processes started by torch.multiprocessing ---------------------------------------------------------
def _worker(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    import rnnmath.data
    import rnnmath.train  # noqa: F401 (imports every module that writes)

    writes = []
    original = rnnmath.data.atomic_write

    def recording_write(path, content):
        writes.append(Path(path).name)
        original(path, content)

    for name, module in list(sys.modules.items()):  # also where it was imported by name (model.py)
        if name.startswith("rnnmath") and getattr(module, "atomic_write", None) is original:
            module.atomic_write = recording_write
    with distributed.process_group():
        for name, n in SIZES.items():
            train(CONFIG, *data(n), Path(root) / name)
    Path(root, f"writes-rank{rank}.json").write_text(json.dumps(writes))


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(free_port(), str(root)), nprocs=2, join=True)
    return root


@pytest.mark.parametrize("case", list(SIZES))
def test_two_processes_equal_one_with_twice_the_batch(two_process_runs, tmp_path, case):
    one = train(dataclasses.replace(CONFIG, batch_size=2 * B), *data(SIZES[case]), tmp_path / "one")
    two = json.loads((two_process_runs / case / "history.json").read_text())
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(two_process_runs / case / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    # validation accuracy is a reduced count, exact; the mean training loss is a reduced float sum
    assert [e["val_accuracy"] for e in two["epochs"]] == [e["val_accuracy"] for e in one["epochs"]]
    for e1, e2 in zip(one["epochs"], two["epochs"]):
        assert e2["train_loss"] == pytest.approx(e1["train_loss"], rel=1e-5)
    assert len(two["epochs"]) == CONFIG.epochs


def test_only_rank_0_writes(two_process_runs):
    rank0 = json.loads((two_process_runs / "writes-rank0.json").read_text())
    rank1 = json.loads((two_process_runs / "writes-rank1.json").read_text())
    assert rank1 == []
    expected = {"config.json", "vocab.json", "labels.json", "model.safetensors", "history.json",
                "checkpoint.safetensors", "wide.json", "wide.safetensors"}
    assert set(rank0) == expected
    assert rank0.count("checkpoint.safetensors") == 2 * CONFIG.epochs  # each epoch of each of the two runs
    for case in SIZES:
        assert {p.name for p in (two_process_runs / case).iterdir()} == expected


# -- the command line: rnnmath train --workers 2 ------------------------------------------------------------
FAIL_RANK_1 = """
import os
if os.environ.get("RANK") == os.environ.get("FAIL_RANK"):
    import signal
    import rnnmath.distributed as d
    from rnnmath.errors import UserError
    seed_dropout = d.seed_dropout

    def failing(seed, epoch):  # called at the start of each epoch: stop at the second
        if epoch == 1:
            if os.environ["FAIL_HOW"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise UserError("injected failure at the start of epoch 2")
        seed_dropout(seed, epoch)

    d.seed_dropout = failing
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    examples = make_order_task(200, seed=3)
    (root / "order.tsv").write_text("".join(f"{t}\t{y}\n" for t, y in zip(examples.texts, examples.labels)))
    (root / "sitecustomize.py").write_text(textwrap.dedent(FAIL_RANK_1))
    return root


def rnnmath_train(corpus: Path, out: Path, *flags: str, fail: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if fail:  # FAIL_RANK:FAIL_HOW, read by the sitecustomize that every worker imports at start-up
        env.update(PYTHONPATH=str(corpus), FAIL_RANK=fail.split(":")[0], FAIL_HOW=fail.split(":")[1])
    command = [sys.executable, "-m", "rnnmath", "train", "--data", str(corpus / "order.tsv"), "--out", str(out),
               "--workers", "2", "--hidden", "8", "--epochs", "3", "--patience", "3", "--dropout", "0.2",
               "--batch-size", "8", "--json", *flags]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def uninterrupted(corpus) -> Path:
    result = rnnmath_train(corpus, corpus / "uninterrupted")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1  # rank 0 alone prints
    assert [e["epoch"] for e in json.loads(lines[0])["epochs"]] == [1, 2, 3]
    return corpus / "uninterrupted"


def test_a_failing_worker_is_named_and_the_run_resumes_exactly(corpus, uninterrupted):
    out = corpus / "failed"
    failed = rnnmath_train(corpus, out, fail="1:raise")
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines()[-1] == (
        "rnnmath: error: worker rank 1 of 2 stopped the run with exit code 2: "
        "injected failure at the start of epoch 2")
    # the model is the last complete epoch, nothing half-written beside it
    history = json.loads((out / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1]
    assert load_model(out).model is not None
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in uninterrupted.iterdir()
                                                          if p.name not in ("wide.json", "wide.safetensors"))

    resumed = rnnmath_train(corpus, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    for name in ("model.safetensors", "checkpoint.safetensors", "wide.safetensors"):
        a, b = load_file(uninterrupted / name), load_file(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_a_killed_worker_is_named(corpus):
    out = corpus / "killed"
    killed = rnnmath_train(corpus, out, fail="0:kill")
    assert killed.returncode == 1
    assert killed.stderr.strip().splitlines()[-1] == (
        "rnnmath: error: worker rank 0 of 2 was killed by SIGKILL; the run stopped")
    assert [e["epoch"] for e in json.loads((out / "history.json").read_text())["epochs"]] == [1]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
