"""Stratified k-fold cross-validation of the sentence classifier, as the literature evaluates MR, Subj and CR
(Kim 2014: 10-fold CV).

Fold f of k is the test part; the other k-1 folds are the training part, of which a stratified
``val_fraction`` (default 10%) is held out as the validation part for early stopping and the choice of
epoch. Each fold trains one model with ``rnnmath.train.train`` into ``out/fold-<f>/`` and is scored on its
test part; the result is the mean ± sample standard deviation of accuracy and macro-F1 over the folds, and
every fold's metrics (written to ``out/cv.json``).
"""

from __future__ import annotations

import dataclasses
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .data import Examples, sentence_key, stratified_split
from .errors import UserError


def stratified_folds(labels: Sequence[str], k: int, seed: int) -> list[list[int]]:
    """Split indices 0..N-1 into ``k`` folds holding each class in (nearly) equal shares.

    Within each class (in sorted label order) the indices are shuffled by ``random.Random(seed)`` and dealt
    round-robin, continuing across classes from the fold where the last class stopped, so fold sizes differ
    by at most one. A class with fewer than ``k`` examples is missing from some folds. A UserError unless
    2 <= k <= N.
    """
    n = len(labels)
    if not 2 <= k <= n:
        raise UserError(f"--folds {k}: expected from 2 to the number of examples ({n})")
    rng = random.Random(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    position = 0
    for label in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == label]
        rng.shuffle(members)
        for i in members:
            folds[position % k].append(i)
            position += 1
    return [sorted(f) for f in folds]


def fold_parts(examples: Examples, folds: list[list[int]], f: int, seed: int,
               val_fraction: float = 0.1) -> tuple[Examples, Examples, Examples]:
    """(train, validation, test) of fold ``f``: test is fold f; validation a stratified ``val_fraction`` of
    the other folds; train the rest of them."""
    test = examples.subset(folds[f])
    rest = examples.subset(sorted(i for g, fold in enumerate(folds) if g != f for i in fold))
    fit, val = stratified_split(rest.labels, [1 - val_fraction, val_fraction], seed)
    return rest.subset(fit), rest.subset(val), test


def _run_fold(config, examples: Examples, folds: list[list[int]], f: int, out: str, val_fraction: float,
              threads: int | None, reader: dict | None) -> dict:
    import torch

    from .model import CHECKPOINT, load_model, write_split_record
    from .train import classification_metrics, label_indices, train

    if threads:
        torch.set_num_threads(threads)
    train_set, val_set, test_set = fold_parts(examples, folds, f, config.seed, val_fraction)
    directory = Path(out) / f"fold-{f}"
    start = time.perf_counter()
    on_start = None
    if reader is not None:  # the fold's split.json, as train writes one: evaluate --split test works on a fold
        def on_start(run):
            write_split_record(run, {"train": train_set, "val": val_set, "test": test_set}, reader)
    history = train(config, train_set, val_set, directory, on_start=on_start)
    seconds = time.perf_counter() - start
    (directory / CHECKPOINT).unlink(missing_ok=True)  # only --resume reads it, and cv has no resume
    trained = load_model(directory)
    predicted = trained.predict(test_set.texts).argmax(1)
    metrics = classification_metrics(label_indices(test_set, trained.labels).tolist(), predicted.tolist(),
                                     trained.labels)
    keys = {k for k in map(sentence_key, train_set.texts) if k is not None}
    overlap = sum(1 for text in test_set.texts if sentence_key(text) in keys)
    return {"fold": f, "train": len(train_set), "val": len(val_set), "test": len(test_set),
            "train_seconds": seconds, "best_epoch": history["best_epoch"],
            "best_val_accuracy": history["best_val_accuracy"],  # the network's alone
            "val_accuracy": history["wide"]["val_accuracy"] if isinstance(history.get("wide"), dict)
            else history["best_val_accuracy"],  # of what predicts: with the wide part mixed in, if there is one
            "train_overlap": overlap, **metrics}


def cross_validate(config, examples: Examples, out: str | os.PathLike, folds: int = 10, val_fraction: float = 0.1,
                   workers: int = 1, log: Callable[[str], None] | None = None, reader: dict | None = None) -> dict:
    """Train and test one model per fold; return {"folds": [...], "accuracy": {"mean", "std"}, "macro_f1":
    {...}, "repeated_lines", ...} and write it to ``out/cv.json``.

    ``config.seed`` seeds the folds, the validation parts and every model. ``workers`` > 1 runs folds in
    that many processes (each with one torch thread). ``reader``: ``read_examples``'s options that read
    ``examples`` from its file; given, each fold directory gets its split.json. Each fold's "train_overlap"
    counts its test sentences with the words of one of its training sentences (``data.sentence_key``): the
    folds keep lines apart, so a file that repeats sentences puts copies on both sides ("repeated_lines":
    how many lines repeat an earlier one). Raises UserError if ``out`` already holds a run.
    """
    from .model import write_json

    out = Path(out)
    if (out / "cv.json").exists() or any(out.glob("fold-*")):
        raise UserError(f"--out {out} already holds a cross-validation run; choose another --out")
    if len(set(examples.labels)) < 2:
        raise UserError(f"{examples.source}: the data has a single class; expected at least two labels")
    parts = stratified_folds(examples.labels, folds, config.seed)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot be written ({e.strerror})") from None
    keys = [k for k in map(sentence_key, examples.texts) if k is not None]
    results: list[dict] = []
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            futures = [pool.submit(_run_fold, config, examples, parts, f, str(out), val_fraction, 1, reader)
                       for f in range(folds)]
            for future in futures:
                results.append(future.result())
                if log:
                    log(_fold_line(results[-1], folds))
    else:
        for f in range(folds):
            results.append(_run_fold(config, examples, parts, f, str(out), val_fraction, None, reader))
            if log:
                log(_fold_line(results[-1], folds))
    summary = {
        "folds": results, "k": folds, "n": len(examples), "config": dataclasses.asdict(config),
        "accuracy": _mean_std([r["accuracy"] for r in results]),
        "macro_f1": _mean_std([r["macro_f1"] for r in results]),
        "train_seconds": sum(r["train_seconds"] for r in results),
        "repeated_lines": len(keys) - len(set(keys)),
    }
    write_json(out / "cv.json", "cv", **summary)
    return summary


def _fold_line(r: dict, k: int) -> str:
    # named as its directory and in cv.json (0-based), with its place in the run
    return (f"fold-{r['fold']} ({r['fold'] + 1} of {k}): accuracy {r['accuracy']:.4f}, macro F1 "
            f"{r['macro_f1']:.4f} (train {r['train']}, validation {r['val']}, test {r['test']}; "
            f"{r['train_seconds']:.0f} s)")


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
