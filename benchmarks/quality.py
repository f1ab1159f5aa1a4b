"""Quality on real data: rnnmath's presets against TF-IDF + logistic regression and fastText, on the same splits.

Data sets (read from ../shared/data, see its SOURCES.md):

* ``mr``, ``subj``, ``cr`` (Kim 2014's MR, Subj, CR): stratified k-fold cross-validation (``--folds``, the
  literature uses 10), folds from ``rnnmath.crossval.stratified_folds`` with seed 0;
* ``trec``: the fixed 5,452 / 500 train/test split;
* ``amazon_yelp``: the UCI Amazon + Yelp sentences (2,000), stratified 80/20 splits, one per split seed
  (``--folds`` of them).

In every split all systems see the same parts: a stratified 10% of the training part is the validation part
(ours: early stopping and choice of epoch; the baselines: choice of their hyper-parameters); every system is
fitted on the other 90% and scored once on the test part. Systems:

* ``ours``: ``rnnmath.train.train`` with a preset (``--preset``, ``--set FIELD=VALUE`` overrides). For a model
  with a wide part (the default preset) the same run is also scored with each half alone, its network
  (λ = 0) and its wide part (λ = 1), as two more rows;
* ``tfidf``: scikit-learn TF-IDF of word 1–2-grams (sublinear tf, rnnmath's tokenizer) + logistic
  regression, C from {0.1, 0.3, 1, 3, 10, 30, 100} chosen on the validation part;
* ``fasttext``: fastText supervised (word bigrams, dim 100, 200,000 hash buckets, one thread, training
  lines shuffled), epoch from {5, 10, 25} and lr
  from {0.1, 0.5, 1.0} chosen on the validation part.

scikit-learn and fasttext are benchmark-only dependencies (``pip install -e .[benchmarks]``).

    .venv/bin/python benchmarks/quality.py --datasets mr,trec --folds 10 --json > run.json
    .venv/bin/python benchmarks/quality.py --only-splits 0,1 --json > a.json   # one process per part ...
    .venv/bin/python benchmarks/quality.py --merge a.json b.json --doc-table    # ... then one table
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from rnnmath import data
from rnnmath.crossval import stratified_folds
from rnnmath.model import PRESETS, load_model
from rnnmath.train import classification_metrics, label_indices, train
from rnnmath.wide import WEIGHT_GRID

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
KIM = {"mr": "kim2014/rt-polarity.all", "subj": "kim2014/subj.all", "cr": "kim2014/custrev.all"}
UCI = ("sentiment_labelled_sentences/amazon_cells_labelled.txt", "sentiment_labelled_sentences/yelp_labelled.txt")
DATASETS = ("mr", "subj", "trec", "cr", "amazon_yelp")
SYSTEMS = ("ours", "tfidf", "fasttext")
PART_NAMES = {"network": "its network alone (λ = 0)", "wide": "its wide part alone (λ = 1)"}
# Kim (2014), Table 2 (test accuracy %)
CITED = {"CNN-rand (Kim 2014)": {"mr": 76.1, "subj": 89.6, "trec": 91.2, "cr": 79.8},
         "CNN-non-static, word2vec (Kim 2014)": {"mr": 81.5, "subj": 93.4, "trec": 93.6, "cr": 84.3}}


def read_label_first(path: Path) -> data.Examples:
    """Kim's files: ``<label><space><text>`` a line; MR and Subj are Windows-1252 (``encoding="auto"``)."""
    return data.read_examples(path, format="label-first", encoding="auto")


def splits(name: str, root: Path, k: int) -> list[tuple[data.Examples, data.Examples]]:
    """(training part, test part) of each split of data set ``name``."""
    if name in KIM:
        examples = read_label_first(root / KIM[name])
        folds = stratified_folds(examples.labels, k, 0)
        return [(examples.subset(sorted(i for g, fold in enumerate(folds) if g != f for i in fold)),
                 examples.subset(folds[f])) for f in range(k)]
    if name == "trec":
        return [(read_label_first(root / "kim2014/TREC.train.all"), read_label_first(root / "kim2014/TREC.test.all"))]
    examples = data.Examples.concat([data.read_examples(root / f) for f in UCI])
    return [tuple(examples.subset(part) for part in data.stratified_split(examples.labels, [0.8, 0.2], seed))
            for seed in range(k)]


def validation_split(train_part: data.Examples) -> tuple[data.Examples, data.Examples]:
    fit, val = data.stratified_split(train_part.labels, [0.9, 0.1], 0)
    return train_part.subset(fit), train_part.subset(val)


def run_ours(config, fit, val, test) -> dict:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        history = train(config, fit, val, out)
        seconds = time.perf_counter() - start
        trained = load_model(out)
        truth = label_indices(test, trained.labels).tolist()
        predicted = trained.predict(test.texts).argmax(1)
        metrics = classification_metrics(truth, predicted.tolist(), trained.labels)
        parts, by_weight = {}, {}
        if trained.wide is not None:  # each half alone on the same test part: the network (λ 0), the wide part (λ 1)
            for name, weight in (("network", 0.0), ("wide", 1.0)):
                alone = classification_metrics(truth, trained.predict(test.texts, weight).argmax(1).tolist(),
                                               trained.labels)
                parts[name] = {"accuracy": alone["accuracy"], "macro_f1": alone["macro_f1"]}
            # the test figures at every λ of the grid: other rules for choosing λ can be scored on the same run
            for weight in WEIGHT_GRID:
                at = classification_metrics(truth, trained.predict(test.texts, weight).argmax(1).tolist(),
                                            trained.labels)
                by_weight[str(weight)] = {"accuracy": at["accuracy"], "macro_f1": at["macro_f1"]}
    wide = history.get("wide")
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "seconds": seconds,
            **({"parts": parts, "test_by_weight": by_weight} if parts else {}),
            "chosen": {"best_epoch": history["best_epoch"], "epochs": len(history["epochs"]),
                       "val_accuracy": history["best_val_accuracy"],
                       **({"members": history["members"]} if "members" in history else {}),
                       **({"wide": {k: wide[k] for k in ("C", "weight", "features", "val_accuracy",
                                                         "val_accuracy_by_weight", "val_cross_entropy_by_weight")}}
                          if wide else {})}}


def run_tfidf(fit, val, test) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    start = time.perf_counter()
    vectorizer = TfidfVectorizer(tokenizer=data.tokenize, lowercase=False, token_pattern=None,
                                 ngram_range=(1, 2), sublinear_tf=True)
    x_fit = vectorizer.fit_transform(fit.texts)
    x_val = vectorizer.transform(val.texts)
    best = None
    for C in (0.1, 0.3, 1, 3, 10, 30, 100):
        model = LogisticRegression(C=C, max_iter=5000).fit(x_fit, fit.labels)
        score = accuracy_score(val.labels, model.predict(x_val))
        if best is None or score > best[0]:
            best = (score, C, model)
    seconds = time.perf_counter() - start
    predicted = best[2].predict(vectorizer.transform(test.texts))
    return {"accuracy": accuracy_score(test.labels, predicted), "seconds": seconds, "chosen": {"C": best[1]},
            "macro_f1": f1_score(test.labels, predicted, average="macro")}


def run_fasttext(fit, val, test) -> dict:
    import random

    import fasttext
    from sklearn.metrics import f1_score

    def line(text: str) -> str:
        return " ".join(data.tokenize(text))

    def label(model, text: str) -> str:
        # the binding's own predict (model.f): FastText.predict fails under NumPy 2 (np.array(copy=False))
        return model.f.predict(line(text) + "\n", 1, 0.0, "strict")[0][1].removeprefix("__label__")

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.txt"
        lines = [f"__label__{y} {line(t)}\n" for t, y in zip(fit.texts, fit.labels)]
        random.Random(0).shuffle(lines)  # fastText reads the file in order: label-sorted lines ruin it
        path.write_text("".join(lines))
        best = None
        for epoch in (5, 10, 25):
            for lr in (0.1, 0.5, 1.0):
                try:
                    model = fasttext.train_supervised(input=str(path), wordNgrams=2, dim=100, epoch=epoch, lr=lr,
                                                      bucket=200_000, thread=1, seed=0, verbose=0)
                except RuntimeError as e:  # "Encountered NaN": it diverged at this lr (Subj, lr 1.0); skip the point
                    print(f"fasttext epoch {epoch} lr {lr}: {e}; skipped", file=sys.stderr)
                    continue
                predicted = [label(model, t) for t in val.texts]
                score = statistics.fmean(p == y for p, y in zip(predicted, val.labels))
                if best is None or score > best[0]:
                    best = (score, {"epoch": epoch, "lr": lr}, model)
    seconds = time.perf_counter() - start
    predicted = [label(best[2], t) for t in test.texts]
    return {"accuracy": statistics.fmean(p == y for p, y in zip(predicted, test.labels)), "seconds": seconds,
            "chosen": best[1], "macro_f1": f1_score(test.labels, predicted, average="macro")}


def parse_set(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value) if value[:1] in "0123456789-[tf" else value
    return overrides


def summarise(rows: list[dict]) -> dict:
    """{(dataset, system): {"accuracy": [...], "macro_f1": [...], "seconds": [...]}} as nested dicts."""
    table: dict = {}
    for r in rows:
        cell = table.setdefault(r["dataset"], {}).setdefault(r["system"], {"split": [], "accuracy": [],
                                                                            "macro_f1": [], "seconds": []})
        for key in cell:
            cell[key].append(r[key])
    return table


def markdown(rows: list[dict]) -> str:
    table = summarise(rows)
    names = [d for d in DATASETS if d in table]
    systems = list(dict.fromkeys(s for d in names for s in table[d]))

    def cell(values: list[float], scale=100.0) -> str:
        mean = statistics.fmean(values) * scale
        return f"{mean:.1f} ± {statistics.stdev(values) * scale:.1f}" if len(values) > 1 else f"{mean:.1f}"

    lines = ["| system | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for s in systems:
        lines.append(f"| {s} | " + " | ".join(cell(table[d][s]["accuracy"]) if s in table[d] else "–"
                                             for d in names) + " |")
    for name, figures in CITED.items():
        lines.append(f"| {name}, cited | " + " | ".join(f"{figures[d]:.1f}" if d in figures else "–"
                                                         for d in names) + " |")
    lines += ["", "Macro-F1 (%) and training seconds per run (mean over the runs; ours: one training with early "
              "stopping; baselines: their whole validation grid):", "",
              "| system | " + " | ".join(f"{d} F1 | {d} s" for d in names) + " |",
              "|---|" + "---|---|" * len(names)]
    for s in systems:
        parts = []
        for d in names:
            if s in table[d]:
                seconds = table[d][s]["seconds"]
                parts += [cell(table[d][s]["macro_f1"]),
                          "–" if None in seconds else f"{statistics.fmean(seconds):.1f}"]
            else:
                parts += ["–", "–"]
        lines.append(f"| {s} | " + " | ".join(parts) + " |")
    lines += ["", "Runs: " + ", ".join(f"{d}: {len(table[d][systems[0]]['split'])}" for d in names if systems[0]
                                       in table[d])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated, of {', '.join(DATASETS)}")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    parser.add_argument("--folds", type=int, default=10, help="folds of mr/subj/cr; split seeds of amazon_yelp")
    parser.add_argument("--only-splits", metavar="K,K", help="run only these folds/split seeds (0-based)")
    parser.add_argument("--preset", default="default", help="our preset (default: default)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field")
    parser.add_argument("--data-dir", default=str(SHARED), help="offline copy of the data (default ../shared/data)")
    parser.add_argument("--name", default="ours", help="name of our row in the table (default: ours)")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="print the table of several --json outputs")
    parser.add_argument("--json", action="store_true", help="print one JSON object with every run")
    args = parser.parse_args()

    if args.merge:
        rows = [r for path in args.merge for r in json.loads(Path(path).read_text())["runs"]]
        print(markdown(rows))
        return
    overrides = parse_set(args.set)
    config = dataclasses.replace(PRESETS[args.preset], **overrides).validate()
    only = None if args.only_splits is None else {int(k) for k in args.only_splits.split(",")}
    systems = args.systems.split(",")
    rows = []
    for name in args.datasets.split(","):
        for k, (train_part, test) in enumerate(splits(name, Path(args.data_dir), args.folds)):
            if only is not None and k not in only:
                continue
            fit, val = validation_split(train_part)
            for system in systems:
                if system == "ours":
                    result = run_ours(config, fit, val, test)
                elif system == "tfidf":
                    result = run_tfidf(fit, val, test)
                else:
                    result = run_fasttext(fit, val, test)
                label = args.name if system == "ours" else system
                rows.append({"dataset": name, "split": k, "system": label, **result})
                for part, alone in result.get("parts", {}).items():  # the same run, each half alone
                    rows.append({"dataset": name, "split": k, "system": f"{label}: {PART_NAMES[part]}",
                                 "seconds": None, **alone})
                print(f"{name} split {k} {label}: accuracy {result['accuracy']:.4f} macro-F1 "
                      f"{result['macro_f1']:.4f} {result['seconds']:.1f} s {result['chosen']} "
                      f"{result.get('parts', '')}",
                      file=sys.stderr)
    report = {"runs": rows, "preset": args.preset, "overrides": overrides, "config": dataclasses.asdict(config),
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                          "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
              "command": " ".join(sys.argv)}
    print(json.dumps(report, indent=1) if args.json else markdown(rows))


if __name__ == "__main__":
    main()
