"""Classic memory tasks for every cell: the adding problem and the copy-memory task, on a fixed step budget.

Adding problem (Hochreiter & Schmidhuber 1997, in the form of Le et al. 2015 / Arjovsky et al. 2016):
input (T, B, 2); channel 0 holds numbers ~ U(0, 1), channel 1 marks exactly two steps, one in each half of the
sequence; the target is the sum of the two marked numbers, read from the last hidden state. Always predicting
1 (the mean of the sum) gives MSE = Var(u1 + u2) = 2/12 = 1/6 ≈ 0.167: the baseline a model must beat.

Copy memory (Hochreiter & Schmidhuber 1997; Arjovsky et al. 2016): 10 symbols from {1..8}, then T − 1 blanks
(0), a delimiter (9) and 10 more blanks; length T + 20. The target is blank everywhere except the last 10 steps,
which must repeat the 10 symbols. Predicting blanks and then a uniform guess over the 8 symbols costs
10·ln 8 / (T + 20) nats per step: the baseline.

Every configuration trains from the same seed with Adam (lr 1e-2 unless --lr), gradient-norm clipping at 1, batch
64, hidden 64, one layer, for --steps steps, then reports the loss on 1,000 fresh sequences of a fixed seed.

    .venv/bin/python benchmarks/memory_tasks.py                 # the whole table (see docs/memory_tasks.md)
    .venv/bin/python benchmarks/memory_tasks.py --cells lstm rnn --tasks adding --T 100 --steps 300
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rnnmath

CELL_ORDER = ["rnn", "lstm", "gru", "layernorm_lstm", "peephole_lstm", "indrnn", "mingru", "minlstm"]


def adding_batch(T: int, B: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Inputs (T, B, 2) and targets (B,) of the adding problem."""
    numbers = torch.rand(T, B, generator=g)  # (T, B)
    first = torch.randint(0, T // 2, (B,), generator=g)
    second = torch.randint(T // 2, T, (B,), generator=g)
    marks = torch.zeros(T, B)  # (T, B)
    marks[first, torch.arange(B)] = 1.0
    marks[second, torch.arange(B)] = 1.0
    return torch.stack([numbers, marks], dim=2), (numbers * marks).sum(0)


def copy_batch(T: int, B: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Token ids (T + 20, B) over 10 symbols (0 blank, 1..8 data, 9 delimiter) and targets (T + 20, B)."""
    data = torch.randint(1, 9, (10, B), generator=g)  # (10, B)
    blanks = torch.zeros(T - 1, B, dtype=torch.long)
    inputs = torch.cat([data, blanks, torch.full((1, B), 9), torch.zeros(10, B, dtype=torch.long)])  # (T + 20, B)
    targets = torch.cat([torch.zeros(T + 10, B, dtype=torch.long), data])  # (T + 20, B)
    return inputs, targets


class Model(nn.Module):
    """A one-layer recurrent net of any cell and a linear read-out (of the last state, or of every step)."""

    def __init__(self, cell: str, input_size: int, hidden_size: int, output_size: int) -> None:
        super().__init__()
        kwargs = {"nonlinearity": "tanh"} if cell == "rnn" else {}
        self.rnn = rnnmath.Recurrent(rnnmath.CELLS[cell], input_size, hidden_size, **kwargs)
        self.readout = nn.Linear(hidden_size, output_size)

    def forward(self, x: Tensor, every_step: bool) -> Tensor:
        output, _ = self.rnn(x)  # (T, B, H)
        return self.readout(output if every_step else output[-1])


def run(task: str, cell: str, T: int, steps: int, lr: float, seed: int = 0) -> dict:
    """Train one configuration and return its final held-out loss, its baseline and its timing."""
    torch.set_num_threads(1)  # configurations run side by side, one core each
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if task == "adding":
        model, baseline = Model(cell, 2, 64, 1), 1 / 6

        def loss_of(batch):
            x, y = batch
            return F.mse_loss(model(x, every_step=False).squeeze(1), y)

        make = adding_batch
    else:
        model, baseline = Model(cell, 10, 64, 10), 10 * math.log(8) / (T + 20)

        def loss_of(batch):
            x, y = batch
            return F.cross_entropy(model(x, every_step=True).flatten(0, 1), y.flatten())

        make = copy_batch
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    start, cpu_start = time.perf_counter(), time.process_time()
    curve = []
    for step in range(steps):
        loss = loss_of(make(T, 64, g))
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % max(1, steps // 10) == 0:
            curve.append(round(loss.item(), 4))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    model.eval()
    with torch.no_grad():
        final = loss_of(make(T, 1000, torch.Generator().manual_seed(1234))).item()
    return {"task": task, "cell": cell, "T": T, "steps": steps, "lr": lr, "final_loss": final,
            "baseline": baseline, "ratio": final / baseline, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "curve": curve}


def machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (StopIteration, OSError):
        cpu = platform.processor() or "unknown CPU"
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", nargs="+", default=CELL_ORDER, choices=list(rnnmath.CELLS))
    ap.add_argument("--tasks", nargs="+", default=["adding", "copy"], choices=["adding", "copy"])
    ap.add_argument("--T", nargs="+", type=int, default=None, help="sequence lengths (adding: 50 100 200; copy: 50)")
    ap.add_argument("--steps", type=int, default=400, help="training steps per configuration")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--jobs", type=int, default=2, help="configurations trained at once, one core each")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    args = ap.parse_args()

    configs = []
    for task in args.tasks:
        for T in args.T or ([50, 100, 200] if task == "adding" else [50]):
            configs += [(task, cell, T, args.steps, args.lr) for cell in args.cells]
    # longest first, so the two workers finish together
    configs.sort(key=lambda c: -c[2])
    start = time.perf_counter()
    results = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for r in pool.map(run, *zip(*configs)):
            results.append(r)
            print(f"[{time.perf_counter() - start:5.0f} s] {r['task']} T={r['T']} {r['cell']}: "
                  f"{r['final_loss']:.4f} (baseline {r['baseline']:.4f})", file=sys.stderr, flush=True)
    wall = time.perf_counter() - start

    print(f"machine: {machine()}; {args.jobs} worker(s); wall {wall:.0f} s")
    print(f"{'task':7} {'T':>4} {'cell':15} {'final loss':>10} {'baseline':>9} {'ratio':>6} {'train s':>8} "
          f"{'CPU s':>7}")
    order = {c: i for i, c in enumerate(CELL_ORDER)}
    for r in sorted(results, key=lambda r: (r["task"], r["T"], order.get(r["cell"], 99))):
        print(f"{r['task']:7} {r['T']:>4} {r['cell']:15} {r['final_loss']:>10.4f} {r['baseline']:>9.4f} "
              f"{r['ratio']:>6.2f} {r['seconds']:>8.1f} {r['cpu_seconds']:>7.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "wall_seconds": wall, "args": vars(args), "results": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
