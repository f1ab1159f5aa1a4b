"""Language-model benchmarks of issue 15 (results in docs/language_models.md).

Three parts, each a subcommand:

* ``run``: train a preset through the CLI with a wall-time limit, then evaluate on the test text and sample at
  temperatures 0.5, 0.8 and 1.0; print what the model directory's timing.json recorded (validation loss after
  each evaluation, with its wall time and tokens seen)::

      .venv/bin/python benchmarks/language_model.py run ptb --minutes 70 --out runs/ptb
      .venv/bin/python benchmarks/language_model.py run shakespeare --minutes 30 --out runs/ts

  ``ptb`` is ``--preset zaremba-small`` on ../shared/data/ptb (train / valid / test); ``shakespeare`` is
  ``--preset char-rnn`` on tiny-shakespeare, the first 90% for training and the last 10% for validation (as
  nanoGPT splits it; the split files are written next to --out).

* ``report DIR``: the same summary for a model directory trained before (also one stopped by --time-limit).

* ``compare``: tokens/s of one training step (forward, backward, clipping, SGD) of the zaremba-small model with
  rnnmath's LSTM (its default path — torch's fused operator on this float input — and its generic compiled
  path), and with torch.nn.LSTM in its place, on PTB windows, interleaved A B C A B C after warm-up, in one
  process; prints the median of each and the median ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data"


def environment() -> str:
    import torch

    from rnnmath.common import cpu_model

    cpu = cpu_model()
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    return (f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python "
            f"{platform.python_version()}, load average {' '.join(load)}")


def rnnmath_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rnnmath", *argv], cwd=ROOT, text=True, capture_output=True)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.corpus == "ptb":
        train, val, test = (DATA / "ptb" / f"ptb.{p}.txt" for p in ("train", "valid", "test"))
        preset, prompt = "zaremba-small", ""
    else:
        text = (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
        n = int(len(text) * 0.9)
        out.parent.mkdir(parents=True, exist_ok=True)
        train, val = out.parent / "ts_train.txt", out.parent / "ts_val.txt"
        train.write_text(text[:n], encoding="utf-8")
        val.write_text(text[n:], encoding="utf-8")
        test, preset, prompt = val, "char-rnn", "ROMEO:"
    argv = ["train", "--preset", preset, "--data", str(train), "--val", str(val), "--out", str(out),
            "--time-limit", str(args.minutes)]
    if args.corpus == "shakespeare":
        argv += ["--eval-every", "0"]  # evaluate at each epoch's end (and at the time limit), not every 1000
    if (out / "checkpoint.safetensors").exists():
        argv.append("--resume")
    start = time.perf_counter()
    done = rnnmath_cli(*argv)
    print(f"$ rnnmath {' '.join(argv)}\n{done.stdout}{done.stderr[-2000:]}wall {time.perf_counter() - start:.0f} s")
    if done.returncode:
        return done.returncode
    print(f"environment after the run: {environment()}")
    return report(argparse.Namespace(model=str(out), test=str(test), prompt=prompt))


def report(args: argparse.Namespace) -> int:
    out = Path(args.model)
    timing = json.loads((out / "timing.json").read_text())["evaluations"]
    print(f"{'epoch':>5} {'window':>7} {'reason':>10} {'wall s':>7} {'tokens':>10} {'tok/s':>6} {'train':>7} "
          f"{'val':>7} {'val ppl':>8}")
    for e in timing:
        val = e.get("val_loss", float("nan"))
        print(f"{e['epoch']:>5} {e['window']:>7} {e['reason']:>10} {e['seconds']:>7.0f} {e['tokens_seen']:>10} "
              f"{e['tokens_seen'] / e['seconds']:>6.0f} {e['train_loss']:>7.4f} {val:>7.4f} "
              f"{2.718281828459045 ** val:>8.2f}")
    if args.test:
        done = rnnmath_cli("evaluate", str(out), "--data", args.test, "--json")
        print(f"evaluate {args.test}: {done.stdout.strip() or done.stderr.strip()}")
    for temperature in ("0.5", "0.8", "1.0"):
        done = rnnmath_cli("generate", str(out), "--prompt", args.prompt, "--length",
                           "400" if args.prompt else "80", "--temperature", temperature, "--seed", "1")
        print(f"--- sample at temperature {temperature} (seed 1) ---\n{done.stdout.strip() or done.stderr.strip()}")
    return 0


def compare(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    from rnnmath import compiled, layers
    from rnnmath import language_model as lm

    torch.set_num_threads(args.threads)
    config = lm.LM_PRESETS["zaremba-small"]
    text = (DATA / "ptb" / "ptb.train.txt").read_text(encoding="utf-8")
    vocab = lm.TokenVocabulary.build(text, "word")
    ids, _ = vocab.encode(text)
    windows = [w for _, w in zip(range(args.windows), lm.tbptt_batches(ids, config.batch_size, config.bptt))]

    def make(kind: str):
        torch.manual_seed(0)
        model = lm.LanguageModel.from_config(config, len(vocab))
        if kind == "torch.nn.LSTM":
            model.rnn = torch.nn.LSTM(config.embedding, config.hidden, config.layers)
        lm.initialize(model, config)
        return model, torch.optim.SGD(model.parameters(), lr=config.lr)

    def steps(model, optimizer, own_path: bool) -> float:
        """Tokens per second over the windows, the state carried as in training; ``own_path``: rnnmath's LSTM on
        its generic compiled path instead of torch's fused operator (``layers.torch_kernels`` off)."""
        layers.torch_kernels = not own_path
        state, start = None, time.perf_counter()
        for x, y in windows:
            logits, state = model(x, state)
            state = lm.detach(state)
            loss = F.cross_entropy(logits.reshape(-1, len(vocab)), y.reshape(-1))
            optimizer.zero_grad()
            (loss * x.shape[0]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            optimizer.step()
        return sum(y.numel() for _, y in windows) / (time.perf_counter() - start)

    kinds = ["rnnmath LSTM", "rnnmath LSTM, compiled path", "torch.nn.LSTM"]
    models = {k: make(k) for k in kinds}
    compiled.min_calls = 1
    for k in kinds:
        steps(*models[k], k.endswith("compiled path"))  # warm-up (and compilation)
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for k in kinds:
            rates[k].append(steps(*models[k], k.endswith("compiled path")))
    layers.torch_kernels = True
    ratios = [a / b for a, b in zip(rates[kinds[0]], rates[kinds[2]])]
    compiled_ratios = [a / b for a, b in zip(rates[kinds[1]], rates[kinds[2]])]
    result = {"environment": environment(), "windows_per_round": args.windows, "rounds": args.rounds,
              "tokens_per_s": {k: statistics.median(v) for k, v in rates.items()},
              "all_tokens_per_s": rates, "median_ratio_rnnmath_over_torch": statistics.median(ratios),
              "median_ratio_compiled_path_over_torch": statistics.median(compiled_ratios)}
    if args.json:
        print(json.dumps(result))
        return 0
    print(result["environment"])
    print(f"zaremba-small training step (B=20, T=20, V={len(vocab)}), {args.windows} windows x {args.rounds} "
          "rounds, interleaved")
    for k in kinds:
        print(f"  {k:<28} median {result['tokens_per_s'][k]:7.0f} tokens/s   "
              f"({', '.join(f'{r:.0f}' for r in rates[k])})")
    print(f"  rnnmath / torch.nn median ratio of tokens/s: {result['median_ratio_rnnmath_over_torch']:.3f} (default "
          f"path), {result['median_ratio_compiled_path_over_torch']:.3f} (compiled path)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train a preset with a time limit, then report")
    p.add_argument("corpus", choices=["ptb", "shakespeare"])
    p.add_argument("--minutes", type=float, required=True, help="--time-limit of the training run")
    p.add_argument("--out", required=True, help="model directory (resumed when it holds a checkpoint)")
    p.set_defaults(func=run)
    p = sub.add_parser("report", help="summarise a trained model directory")
    p.add_argument("model")
    p.add_argument("--test", help="text to evaluate on")
    p.add_argument("--prompt", default="", help="prompt of the samples")
    p.set_defaults(func=report)
    p = sub.add_parser("compare", help="rnnmath's LSTM vs torch.nn.LSTM in the zaremba-small model, tokens/s")
    p.add_argument("--windows", type=int, default=20, help="windows per measurement (default: 20)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved measurements of each (default: 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=compare)
    args = parser.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
