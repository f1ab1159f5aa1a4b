"""Time of one training step (forward, backward, clip, Adam) of the default preset with n-gram bags of
several bucket counts and without the bag, interleaved in one process so that the machine's load hits every
variant alike. Batches are 32 real MR sentences (``../shared/data/kim2014/rt-polarity.all``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bag_step_time.py [--rounds 5] [--steps 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rnnmath import data
from rnnmath.model import PRESETS, Classifier, trim

MR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "kim2014" / "rt-polarity.all"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    examples = data.read_examples(MR, format="label-first", encoding="auto")
    vocab = data.Vocabulary.build(examples.texts, PRESETS["default"].vocab_size)
    ids, lengths = data.encode(examples.texts, vocab, PRESETS["default"].max_len)
    y = torch.tensor([int(label) for label in examples.labels])
    variants = {f"bag, {b:,} buckets": {"ngram_buckets": b} for b in (100_000, 20_000, 5_000)}
    variants["no bag"] = {"ngram_dim": 0}
    models = {}
    for name, overrides in variants.items():
        torch.manual_seed(0)
        model = Classifier(dataclasses.replace(PRESETS["default"], **overrides), len(vocab), 2)
        models[name] = (model, torch.optim.Adam(model.parameters(), lr=3e-3))
    times: dict[str, list[float]] = {name: [] for name in variants}
    generator = torch.Generator().manual_seed(0)
    for _ in range(args.rounds):
        rows = [torch.randperm(len(y), generator=generator)[:32] for _ in range(args.steps)]
        for name, (model, optimizer) in models.items():
            start = time.perf_counter()
            for r in rows:
                log_p = model(*trim(ids[r], lengths[r]))
                loss = F.nll_loss(log_p, y[r])
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
            times[name].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times["no bag"])
    for name, t in times.items():
        median = statistics.median(t)
        print(f"{name:24s} median {1000 * median:7.1f} ms/step  ({median / base:.2f}x no bag)")


if __name__ == "__main__":
    main()
