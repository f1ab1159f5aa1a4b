"""Training throughput of the sentence classifier with 1 vs 2 processes (DDP, gloo on CPU), and the cost of
DDP's gradient synchronisation. Results: docs/distributed.md.

    python benchmarks/distributed.py                 # default preset, 32 sentences per process per step
    python benchmarks/distributed.py --json          # one JSON object instead of the tables

What is timed (the rules of /work/shared/BENCHMARKING.md): one training step of rnnmath.train's loop:
forward, nll loss, backward, gradient clipping, Adam step, on sentences of the built-in order task.

* one process, global batch 2·B, with 2 threads and with 1 thread, in alternating blocks of ``--block``
  steps (switching torch's thread count every step costs more than the step), one untimed step after
  each switch;
* two processes (torch.multiprocessing, gloo, 1 thread each), batch B each: a DDP step (backward
  all-reduces the gradients) interleaved with a step under ``no_sync()`` (no all-reduce), and a bare
  ``all_reduce`` of a tensor as large as all gradients together. The processes meet at a barrier before
  every timed step, so that each measures the same step.

The one-process and two-process measurements cannot run at the same time, so they alternate ``--rounds``
times (one, two, one, two, ...). Every figure is the median over all timed steps (``--steps`` per round,
after ``--warmup`` untimed ones); throughput = examples of the global batch / median step time (rank 0's).
The load average before and after is printed: on a shared machine, compare only figures of one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from rnnmath.common import cpu_model
from rnnmath.data import Vocabulary, encode, make_order_task
from rnnmath.model import PRESETS, Classifier, trim


def setup(args: argparse.Namespace):
    """The model (seeded, the same in every process), its optimiser, and the encoded sentences."""
    examples = make_order_task(4096, seed=0)
    vocab = Vocabulary.build(examples.texts, 5000)
    ids, lengths = encode(examples.texts, vocab, 50)  # (N, T), (N,)
    y = torch.tensor([examples.labels[i] == "positive" for i in range(len(examples))], dtype=torch.long)
    config = dataclasses.replace(PRESETS[args.preset], dropout=0.0)
    torch.manual_seed(0)
    model = Classifier(config, len(vocab), 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return model, optimizer, ids, lengths, y


def step(net, model, optimizer, ids, lengths, y, rows) -> None:
    batch_ids, batch_lengths = trim(ids[rows], lengths[rows])
    loss = F.nll_loss(net(batch_ids, batch_lengths), y[rows])
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def batches(n: int, size: int, offset: int = 0, stride: int = 1):
    """Endless batches of ``size`` rows: global batch k is order[k·size·stride ...], this process's share
    every ``stride``-th row from ``offset`` (the sharding of rnnmath.distributed)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    k = 0
    while True:
        start = (k * size * stride) % (n - size * stride)
        yield order[start : start + size * stride][offset::stride]
        k += 1


def one_process(args: argparse.Namespace) -> dict[str, list[float]]:
    model, optimizer, ids, lengths, y = setup(args)
    rows = batches(len(y), 2 * args.batch_size)
    threads: dict[int, list[float]] = {2: [], 1: []}
    for _ in range(args.warmup):
        step(model, model, optimizer, ids, lengths, y, next(rows))
    for block in range(0, args.steps, args.block):
        for t in threads:  # alternating blocks: 2 threads, 1 thread, 2, 1, ...
            torch.set_num_threads(t)
            step(model, model, optimizer, ids, lengths, y, next(rows))  # after the switch: untimed
            for _ in range(min(args.block, args.steps - block)):
                start = time.perf_counter()
                step(model, model, optimizer, ids, lengths, y, next(rows))
                threads[t].append(time.perf_counter() - start)
    torch.set_num_threads(2)
    return {f"1 process x {t} thread{'s' * (t > 1)}": times for t, times in threads.items()}


def worker(rank: int, port: int, args: argparse.Namespace, result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model, optimizer, ids, lengths, y = setup(args)
    net = torch.nn.parallel.DistributedDataParallel(model)
    rows = batches(len(y), args.batch_size, offset=rank, stride=2)
    flat = torch.zeros(sum(p.numel() for p in model.parameters()))  # (P,) as many floats as all gradients
    times: dict[str, list[float]] = {"DDP step": [], "no_sync step": [], "all_reduce of the gradients": []}
    for i in range(args.warmup + args.steps):
        for kind in times:  # interleaved
            dist.barrier()
            start = time.perf_counter()
            if kind == "DDP step":
                step(net, model, optimizer, ids, lengths, y, next(rows))
            elif kind == "no_sync step":
                with net.no_sync():
                    step(net, model, optimizer, ids, lengths, y, next(rows))
            else:
                dist.all_reduce(flat)
            if i >= args.warmup:
                times[kind].append(time.perf_counter() - start)
    if rank == 0:
        Path(result).write_text(json.dumps({"times": times, "parameters": flat.numel()}))
    dist.barrier()  # neither rank tears gloo down while the other may still use it (a SIGABRT otherwise)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="default", help="model configuration (rnnmath.model.PRESETS)")
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per process per step (B)")
    parser.add_argument("--steps", type=int, default=40, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--block", type=int, default=10, help="one-process steps between thread switches")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of one and two processes")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    load_before = os.getloadavg()
    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, t in one_process(args).items():
            times.setdefault(name, []).extend(t)
        with tempfile.TemporaryDirectory() as tmp:
            result = os.path.join(tmp, "ddp.json")
            mp.spawn(worker, args=(free_port(), args, result), nprocs=2, join=True)
            two = json.loads(Path(result).read_text())
        for name, t in two["times"].items():
            times.setdefault(name, []).extend(t)
    single = {name: statistics.median(t) for name, t in times.items() if name.startswith("1 process")}
    ddp = {name: statistics.median(t) for name, t in times.items() if not name.startswith("1 process")}
    ddp["parameters"] = two["parameters"]
    B = args.batch_size
    rows = [(name, 2 * B, t) for name, t in single.items()]
    rows.append(("2 processes x 1 thread, DDP", 2 * B, ddp["DDP step"]))
    rows.append(("2 processes x 1 thread, no_sync (no gradient sync)", 2 * B, ddp["no_sync step"]))
    report = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version(), "load_average_1min_before_after":
                    [round(load_before[0], 2), round(os.getloadavg()[0], 2)]},
        "preset": args.preset, "batch_per_process": B, "global_batch": 2 * B,
        "timed_steps": args.rounds * args.steps,
        "parameters": ddp["parameters"],
        "throughput": [{"setting": n, "step_ms": t * 1e3, "examples_per_s": b / t} for n, b, t in rows],
        "sync": {"ddp_step_ms": ddp["DDP step"] * 1e3, "no_sync_step_ms": ddp["no_sync step"] * 1e3,
                 "overhead_ms": (ddp["DDP step"] - ddp["no_sync step"]) * 1e3,
                 "all_reduce_ms": ddp["all_reduce of the gradients"] * 1e3},
    }
    if args.json:
        print(json.dumps(report, sort_keys=True))
        return 0
    m = report["machine"]
    print(f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}; preset {args.preset} "
          f"({report['parameters']:,} parameters), global batch {2 * B}, median of {args.rounds * args.steps} "
          f"steps; load average {m['load_average_1min_before_after'][0]} before, "
          f"{m['load_average_1min_before_after'][1]} after\n")
    print(f"| {'setting':<52} | step ms | examples/s |\n|{'-' * 54}|---------|------------|")
    for r in report["throughput"]:
        print(f"| {r['setting']:<52} | {r['step_ms']:7.2f} | {r['examples_per_s']:10.0f} |")
    s = report["sync"]
    print(f"\ngradient sync: DDP step {s['ddp_step_ms']:.2f} ms - no_sync step {s['no_sync_step_ms']:.2f} ms = "
          f"{s['overhead_ms']:.2f} ms per step; a bare all_reduce of {report['parameters']:,} floats "
          f"{s['all_reduce_ms']:.2f} ms")
    return 0



if __name__ == "__main__":
    sys.exit(main())
