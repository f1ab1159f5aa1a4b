"""Quality on real data: amazon + yelp sentences (UCI Sentiment Labelled Sentences), 2,000 in all.

For each split seed: a stratified 80/20 train/test split; the RNN presets take 10% of the training part
(stratified) as validation for early stopping; the bag-of-words logistic regression fits the whole training
part. Prints test accuracy mean ± std over the seeds as a markdown table (or JSON with --json).

    .venv/bin/python benchmarks/quality.py [--seeds 5] [--data-dir ../shared/data] [--json]
    .venv/bin/python benchmarks/quality.py --presets default --set hidden=128 --set dropout=0.4   # tuning
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from rnnmath import data
from rnnmath.model import PRESETS, load_model
from rnnmath.train import BagOfWordsLogReg, label_indices, train

FILES = ("sentiment_labelled_sentences/amazon_cells_labelled.txt", "sentiment_labelled_sentences/yelp_labelled.txt")
SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def load_sentences(data_dir: str | None) -> data.Examples:
    if data_dir is None and data.default_data_dir() is None and SHARED.is_dir():
        data_dir = str(SHARED)
    root = data.locate("sentiment-labelled-sentences", data_dir)
    return data.Examples.concat([data.read_examples(root / f) for f in FILES])


def run_preset(name: str, overrides: dict, examples: data.Examples, train_idx, test_idx, seed: int) -> float:
    config = dataclasses.replace(PRESETS[name], **overrides, seed=seed).validate()
    train_part = examples.subset(train_idx)
    fit_idx, val_idx = data.stratified_split(train_part.labels, [0.9, 0.1], seed)
    test = examples.subset(test_idx)
    with tempfile.TemporaryDirectory() as out:
        train(config, train_part.subset(fit_idx), train_part.subset(val_idx), out)
        trained = load_model(out)
        predicted = trained.predict(test.texts).argmax(1)
        return (predicted == label_indices(test, trained.labels)).double().mean().item()


def run_bow(examples: data.Examples, train_idx, test_idx) -> float:
    train_part, test = examples.subset(train_idx), examples.subset(test_idx)
    labels = sorted(set(train_part.labels))
    model = BagOfWordsLogReg(vocab_size=400).fit(train_part.texts, label_indices(train_part, labels), len(labels))
    return (model.predict(test.texts) == label_indices(test, labels)).double().mean().item()


def parse_set(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value) if value[:1] in "0123456789-[tf" else value
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="split seeds 0..N-1 (default 5)")
    parser.add_argument("--only-seeds", metavar="K,K", help="run just these split seeds (e.g. one process each, "
                        "with --json, then --merge)")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="print the table of several --json outputs")
    parser.add_argument("--data-dir", help="offline copy of the data (default: ../shared/data if present)")
    parser.add_argument("--presets", default="default,seed", help="comma-separated presets (default default,seed)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field of the presets (tuning)")
    parser.add_argument("--no-bow", action="store_true", help="skip the bag-of-words baseline")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    if args.merge:
        return print_merged(args.merge, args.json)
    examples = load_sentences(args.data_dir)
    overrides = parse_set(args.set)
    rows: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    seeds = [int(k) for k in args.only_seeds.split(",")] if args.only_seeds else range(args.seeds)
    for seed in seeds:
        train_idx, test_idx = data.stratified_split(examples.labels, [0.8, 0.2], seed)
        runs = [(f"{p} preset", run_preset, (p, overrides, examples, train_idx, test_idx, seed))
                for p in args.presets.split(",") if p]
        if not args.no_bow:
            runs.append(("bag-of-words LR, top-400 words", run_bow, (examples, train_idx, test_idx)))
        for name, run, run_args in runs:
            start = time.perf_counter()
            rows.setdefault(name, []).append(run(*run_args))
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
            print(f"seed {seed}: {name}: {rows[name][-1]:.4f}", file=sys.stderr)

    environment = {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
                   "machine": platform.processor() or platform.machine(), "overrides": overrides,
                   "n": len(examples), "seeds": list(seeds)}
    print_results(rows, seconds, environment, args.json)


def print_merged(paths: list[str], as_json: bool) -> None:
    """Combine the --json outputs of runs over different split seeds (in the order given)."""
    rows: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    environment: dict = {}
    for path in paths:
        run = json.loads(Path(path).read_text())
        for name, r in run["results"].items():
            rows.setdefault(name, []).extend(r["per_seed"])
            seconds[name] = seconds.get(name, 0.0) + r["seconds"]
        seeds = environment.get("seeds", []) + run["environment"]["seeds"]
        environment = {**run["environment"], "seeds": seeds}
    print_results(rows, seconds, environment, as_json)


def print_results(rows: dict[str, list[float]], seconds: dict[str, float], environment: dict, as_json: bool) -> None:
    results = {
        name: {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
               "per_seed": accs, "seconds": seconds[name]}
        for name, accs in rows.items()
    }
    if as_json:
        print(json.dumps({"results": results, "environment": environment}, indent=1))
        return
    print("| model | test accuracy (mean ± std) | per seed | time (all seeds) |")
    print("|---|---|---|---|")
    for name, r in results.items():
        per_seed = " ".join(f"{a:.3f}" for a in r["per_seed"])
        print(f"| {name} | {r['mean']:.3f} ± {r['std']:.3f} | {per_seed} | {r['seconds']:.0f} s |")
    print(f"\n{environment['n']} sentences, split seeds {environment['seeds']}, torch {environment['torch']}, "
          f"{environment['threads']} thread(s) per process"
          + (f", overrides {environment['overrides']}" if environment["overrides"] else ""))


if __name__ == "__main__":
    main()
