"""Speed and memory of rnnmath's layers against torch.nn's native layers, the readable loop and the seed's loop.

Run it as ``rnnmath bench`` or ``python benchmarks/speed.py`` (same flags); results are in docs/benchmarks.md.

How the figures are made (the rules of /work/shared/BENCHMARKING.md):

* every figure is the median of ``repeats`` runs, the implementations of one configuration interleaved
  (A B C A B C ...) in one process after warm-up runs, so that machine noise hits all of them alike;
  a ratio is the median of the per-round ratios;
* **training step** = forward + ``output.sum().backward()`` (gradients set to None first); **inference** =
  forward under ``torch.no_grad()``;
* **roofline**: FLOPs are those of the matrix products, 2·M·N·K each: per step the input projection
  2·B·I·G and the recurrent product 2·B·H·G; a training step is three times the forward (the backward pass
  has two products per forward product). Achieved GFLOP/s stand beside the measured throughput of a large
  square matmul (``peak``) in the same run;
* **peak memory** of a training step: the peak resident memory of a fresh subprocess per configuration and
  implementation (Linux: VmHWM of /proc/self/status, because getrusage's maxrss survives exec and would report
  the parent's peak; elsewhere getrusage maxrss; on CUDA ``torch.cuda.max_memory_allocated``); ``step MB`` is
  the peak during the step minus the resident memory after building the layer and its input.

Implementations: ``rnnmath`` (the layer's fast path, :mod:`rnnmath.fused`), ``torch.nn`` (native kernels:
oneDNN's LSTM on CPU, cuDNN on CUDA), ``readable`` (the same rnnmath layer with ``fast = False``: the
per-step loop that is the specification). The seed's configuration (token ids, vocabulary 400, 30 steps,
state 3, batch 128, tanh RNN) compares the seed tutorial's loop ``h = tanh(one_hot(x_t) W_ih + h W_hh + b)``,
torch.nn.RNN fed the same one-hot vectors, and rnnmath.RNN fed the token ids (a row lookup).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from . import layers

GATES = {"rnn": 1, "lstm": 4, "gru": 3}
RNNMATH = {"rnn": layers.RNN, "lstm": layers.LSTM, "gru": layers.GRU}
TORCH = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}
IMPLS = ("rnnmath", "torch.nn", "readable")
SEED = {"vocab": 400, "steps": 30, "hidden": 3, "batch": 128}
SEED_IMPLS = ("rnnmath ids", "torch.nn one-hot", "seed one-hot loop", "readable ids")


@dataclass(frozen=True)
class Config:
    """One benchmarked configuration: cell, hidden size H, steps T, batch B and input size I."""

    cell: str
    hidden: int
    steps: int
    batch: int
    input: int = 128

    def flops_per_step(self) -> int:
        """FLOPs of one forward step's matrix products: 2·B·I·G (input projection) + 2·B·H·G (recurrent)."""
        G = GATES[self.cell] * self.hidden
        return 2 * self.batch * G * (self.input + self.hidden)


# -- what gets timed ------------------------------------------------------------------------------------------
def make_layer(impl: str, cell: str, input_size: int, hidden: int, device: str) -> torch.nn.Module:
    """A one-layer network of `impl`; all implementations get torch.nn's initial weights (the same values)."""
    native = TORCH[cell](input_size, hidden, device=device)
    if impl == "torch.nn":
        return native
    layer = RNNMATH[cell](input_size, hidden, device=device)
    layer.load_state_dict(native.state_dict())
    layer.fast = impl == "rnnmath"
    return layer


def step_function(model: torch.nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    """A training step (forward + backward) or an inference call of `model` on `x`."""
    if mode == "infer":
        def infer() -> None:
            with torch.no_grad():
                model(x)
        return infer

    def train() -> None:
        model.zero_grad(set_to_none=True)
        output, _ = model(x)
        output.sum().backward()
    return train


class SeedLoop(torch.nn.Module):
    """The seed tutorial's RNN: one-hot input times W_ih in a Python loop, h = tanh(x W_ih + h W_hh + b)."""

    def __init__(self, vocab: int, hidden: int, device: str) -> None:
        super().__init__()
        self.vocab = vocab
        self.W_ih = torch.nn.Parameter(torch.randn(vocab, hidden, device=device) * 0.1)  # (V, H)
        self.W_hh = torch.nn.Parameter(torch.randn(hidden, hidden, device=device) * 0.1)  # (H, H)
        self.b = torch.nn.Parameter(torch.zeros(hidden, device=device))  # (H,)

    def forward(self, ids: torch.Tensor):
        x = F.one_hot(ids, self.vocab).float()  # (T, B, V)
        h = x.new_zeros(x.shape[1], self.W_hh.shape[0])  # (B, H)
        hs = []
        for t in range(x.shape[0]):
            h = torch.tanh(x[t] @ self.W_ih + h @ self.W_hh + self.b)
            hs.append(h)
        return torch.stack(hs), h  # (T, B, H)


class OneHot(torch.nn.Module):
    """torch.nn.RNN fed one-hot vectors of the token ids, as a user without a lookup would feed it."""

    def __init__(self, vocab: int, hidden: int, device: str) -> None:
        super().__init__()
        self.vocab = vocab
        self.rnn = torch.nn.RNN(vocab, hidden, device=device)

    def forward(self, ids: torch.Tensor):
        return self.rnn(F.one_hot(ids, self.vocab).float())


def make_seed_model(impl: str, device: str) -> torch.nn.Module:
    V, H = SEED["vocab"], SEED["hidden"]
    if impl == "seed one-hot loop":
        return SeedLoop(V, H, device)
    if impl == "torch.nn one-hot":
        return OneHot(V, H, device)
    layer = layers.RNN(V, H, device=device)
    layer.fast = impl == "rnnmath ids"
    return layer


def seed_input(device: str) -> torch.Tensor:
    return torch.randint(0, SEED["vocab"], (SEED["steps"], SEED["batch"]), device=device)  # (T, B)


# -- measuring ------------------------------------------------------------------------------------------------
def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], None]], repeats: int, warmup: int, device: str) -> dict[str, list]:
    """Seconds per call of each function, called in turn (A B C A B C ...) after `warmup` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def median_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a/b: both were measured in the same round, under the same load."""
    return statistics.median(x / y for x, y in zip(a, b))


def matmul_peak(device: str, n: int = 2048, repeats: int = 5) -> float:
    """Measured GFLOP/s of an n×n float32 matmul: the roofline every figure is read against."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    c = torch.empty(n, n, device=device)
    times = interleaved({"mm": lambda: torch.mm(a, b, out=c)}, repeats, 2, device)["mm"]
    return 2 * n**3 / statistics.median(times) / 1e9


def memory_probe(impl: str, cell: str, hidden: int, steps: int, batch: int, input_size: int, device: str) -> dict:
    """Run in a fresh process: peak memory (MB) of one training step, and its growth during the step."""
    torch.manual_seed(0)
    if cell == "seed":
        model, x = make_seed_model(impl, device), seed_input(device)
    else:
        model = make_layer(impl, cell, input_size, hidden, device)
        x = torch.randn(steps, batch, input_size, device=device)  # (T, B, I)
    train = step_function(model, x, "train")
    if device.startswith("cuda"):
        synchronize(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_mb": peak / 2**20, "step_mb": (peak - before) / 2**20}
    before = resident_kib("VmRSS")
    train()
    return {"peak_mb": resident_kib("VmHWM") / 1024, "step_mb": (resident_kib("VmHWM") - before) / 1024}


def resident_kib(field: str) -> int:
    """Resident memory (KiB) of this process: VmRSS now, or VmHWM, its peak.

    On Linux getrusage's ru_maxrss survives exec: a probe started by a large parent reports the parent's
    peak (we measured 1020 MB for every probe), so read /proc/self/status, whose VmHWM starts with the new
    program. Elsewhere fall back to ru_maxrss, the peak of this process."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS


def measure_memory(impl: str, cell: str, hidden: int, steps: int, batch: int, input_size: int, device: str) -> dict:
    """memory_probe in a fresh Python process, so that nothing measured before counts."""
    command = [sys.executable, "-m", "rnnmath.bench", "--memory-probe",
               json.dumps([impl, cell, hidden, steps, batch, input_size, device])]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the benchmark ---------------------------------------------------------------------------------------------
def grid(quick: bool, cells, hidden, steps, batch) -> list[Config]:
    cells = cells or list(GATES)
    hidden = hidden or ([64, 256] if quick else [64, 256, 1024])
    steps = steps or ([30] if quick else [30, 100])
    batch = batch or ([64] if quick else [1, 64])
    return [Config(c, h, t, b) for c in cells for h in hidden for t in steps for b in batch]


def repeats_for(config: Config, repeats: int | None, quick: bool) -> int:
    """Fewer rounds where one round takes seconds (H = 1024) or in --quick (run_config adds rounds to short ones)."""
    if repeats:
        return repeats
    if config.hidden >= 1024:
        return 3
    return 5 if quick else 11


def more_rounds(fns: dict[str, Callable[[], None]], repeats: int, device: str, seconds: float = 1.0) -> int:
    """Short calls are the noisiest: give them rounds up to about `seconds` in all (at most 101)."""
    round_time = sum(min(interleaved({name: fn}, 1, 0, device)[name]) for name, fn in fns.items())
    return max(repeats, min(101, int(seconds / round_time)))


def run_config(config: Config, repeats: int, device: str, peak: float) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(config.steps, config.batch, config.input, device=device)  # (T, B, I)
    models = {impl: make_layer(impl, config.cell, config.input, config.hidden, device) for impl in IMPLS}
    rows = []
    for mode in ("train", "infer"):
        fns = {impl: step_function(m, x, mode) for impl, m in models.items()}
        warmup = 2 if config.hidden < 1024 else 1
        rounds = more_rounds(fns, repeats, device) if config.hidden < 1024 else repeats
        times = interleaved(fns, rounds, warmup, device)
        flops = config.flops_per_step() * config.steps * (3 if mode == "train" else 1)
        row = {**asdict(config), "mode": mode, "repeats": rounds, "flops_per_step": config.flops_per_step()}
        for impl in IMPLS:
            t = statistics.median(times[impl])
            row[f"{impl} ms"] = t * 1e3
            row[f"{impl} GFLOP/s"] = flops / t / 1e9
        row["rnnmath % peak"] = 100 * row["rnnmath GFLOP/s"] / peak
        row["torch.nn % peak"] = 100 * row["torch.nn GFLOP/s"] / peak
        row["rnnmath/torch.nn"] = median_ratio(times["rnnmath"], times["torch.nn"])
        row["readable/torch.nn"] = median_ratio(times["readable"], times["torch.nn"])
        rows.append(row)
    return rows


def run_seed(repeats: int, device: str) -> list[dict]:
    torch.manual_seed(0)
    ids = seed_input(device)
    models = {impl: make_seed_model(impl, device) for impl in SEED_IMPLS}
    rows = []
    for mode in ("train", "infer"):
        fns = {impl: step_function(m, ids, mode) for impl, m in models.items()}
        times = interleaved(fns, repeats, warmup=5, device=device)
        row = {"mode": mode, "repeats": repeats, **{f"{impl} ms": statistics.median(times[impl]) * 1e3
                                                   for impl in SEED_IMPLS}}
        for impl in SEED_IMPLS[1:]:
            row[f"{impl} / rnnmath ids"] = median_ratio(times[impl], times["rnnmath ids"])
        rows.append(row)
    return rows


def check_targets(rows: list[dict], seed: list[dict], memory: list[dict]) -> list[dict]:
    """The issue's targets, each with the measured figure and whether it is met."""
    targets = []
    for r in rows:
        if r["mode"] == "train" and r["batch"] == 64 and r["input"] == 128 and r["hidden"] in (64, 256):
            bound = 1.2 if r["hidden"] == 256 else 1.5
            targets.append({"target": f"train {r['cell']} H={r['hidden']} T={r['steps']} B=64: rnnmath/torch.nn "
                            f"≤ {bound}", "measured": round(r["rnnmath/torch.nn"], 2),
                            "met": r["rnnmath/torch.nn"] <= bound})
    for r in seed:
        if r["mode"] == "train":
            loop, native = r["seed one-hot loop / rnnmath ids"], r["torch.nn one-hot / rnnmath ids"]
            targets.append({"target": "seed config: ≥ 3× faster than the seed's one-hot loop",
                            "measured": round(loop, 2), "met": loop >= 3})
            targets.append({"target": "seed config: faster than torch.nn.RNN fed one-hot",
                            "measured": round(native, 2), "met": native > 1})
    for m in memory:
        targets.append({"target": f"peak memory {m['cell']} H={m['hidden']} T={m['steps']} B={m['batch']}: "
                        "rnnmath/torch.nn ≤ 1.2", "measured": round(m["peak ratio"], 3), "met": m["peak ratio"] <= 1.2})
    return targets


def run(args: argparse.Namespace) -> dict:
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("rnnmath bench: --device cuda needs a GPU, and torch sees none")
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = grid(args.quick, args.cells, args.hidden, args.steps, args.batch)
    def log(*message) -> None:  # progress on stderr; stdout carries only the tables or the JSON
        print(*message, file=sys.stderr, flush=True)

    peak = matmul_peak(device)
    log(f"matmul peak: {peak:.1f} GFLOP/s")
    rows = []
    for config in configs:
        log(f"timing {config}")
        rows += run_config(config, repeats_for(config, args.repeats, args.quick), device, peak)
    seed = run_seed(args.repeats or (11 if args.quick else 31), device) if not args.no_seed else []
    memory = []
    if not args.no_memory:
        for config in configs:
            if config.batch == 1:  # the activations are negligible next to the libraries at B = 1
                continue
            log(f"memory {config}")
            m = {impl: measure_memory(impl, config.cell, config.hidden, config.steps, config.batch, config.input,
                                      device) for impl in ("rnnmath", "torch.nn")}
            memory.append({**asdict(config), **{f"{impl} {k}": v for impl, d in m.items() for k, v in d.items()},
                           "peak ratio": m["rnnmath"]["peak_mb"] / m["torch.nn"]["peak_mb"]})
    return {"machine": machine(device), "matmul_peak_gflops": peak, "rows": rows, "seed": seed, "memory": memory,
            "targets": check_targets(rows, seed, memory)}


def machine(device: str) -> dict:
    cpu = platform.processor()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else None
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "device": device,
            "gpu": gpu, "python": platform.python_version(), "load_average": os.getloadavg()[0]}


# -- output ----------------------------------------------------------------------------------------------------
def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (header, key, format)."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(format(r[k], f) for _, k, f in columns) + " |")
    return "\n".join(lines)


def report(result: dict) -> str:
    m = result["machine"]
    parts = [f"Machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}, device {m['device']}"
             + (f" ({m['gpu']})" if m["gpu"] else "") + f"; matmul peak {result['matmul_peak_gflops']:.1f} GFLOP/s; "
             f"load average {m['load_average']:.1f} at the start"]
    parts.append("\n### Layers (I = 128): milliseconds per call, median of interleaved runs\n")
    parts.append(markdown_table(result["rows"], [
        ("cell", "cell", ""), ("H", "hidden", "d"), ("T", "steps", "d"), ("B", "batch", "d"), ("mode", "mode", ""),
        ("FLOP/step", "flops_per_step", ".2e"), ("rnnmath", "rnnmath ms", ".2f"), ("torch.nn", "torch.nn ms", ".2f"),
        ("readable", "readable ms", ".2f"), ("rnnmath/torch.nn", "rnnmath/torch.nn", ".2f"),
        ("readable/torch.nn", "readable/torch.nn", ".2f"), ("rnnmath GFLOP/s", "rnnmath GFLOP/s", ".1f"),
        ("% peak", "rnnmath % peak", ".0f"), ("torch.nn GFLOP/s", "torch.nn GFLOP/s", ".1f"),
        ("torch.nn % peak", "torch.nn % peak", ".0f"), ("runs", "repeats", "d")]))
    if result["seed"]:
        s = SEED
        parts.append(f"\n### Seed configuration (tanh RNN, token ids, V={s['vocab']}, T={s['steps']}, "
                     f"H={s['hidden']}, B={s['batch']}): milliseconds\n")
        parts.append(markdown_table(result["seed"], [("mode", "mode", "")]
                                    + [(impl, f"{impl} ms", ".3f") for impl in SEED_IMPLS]
                                    + [(f"{impl} / rnnmath ids", f"{impl} / rnnmath ids", ".2f")
                                       for impl in SEED_IMPLS[1:]] + [("runs", "repeats", "d")]))
    if result["memory"]:
        parts.append("\n### Peak memory of a training step (fresh process each; MB)\n")
        parts.append(markdown_table(result["memory"], [
            ("cell", "cell", ""), ("H", "hidden", "d"), ("T", "steps", "d"), ("B", "batch", "d"),
            ("rnnmath peak", "rnnmath peak_mb", ".0f"), ("torch.nn peak", "torch.nn peak_mb", ".0f"),
            ("ratio", "peak ratio", ".3f"), ("rnnmath step", "rnnmath step_mb", ".1f"),
            ("torch.nn step", "torch.nn step_mb", ".1f")]))
    parts.append("\n### Targets\n")
    parts.append(markdown_table([{**t, "met": "met" if t["met"] else "MISSED"} for t in result["targets"]],
                                [("target", "target", ""), ("measured", "measured", ""), ("", "met", "")]))
    return "\n".join(parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's flags, shared by ``rnnmath bench`` and benchmarks/speed.py."""
    parser.add_argument("--quick", action="store_true", help="H ∈ {64, 256}, T = 30, B = 64 and fewer runs")
    parser.add_argument("--cells", nargs="+", choices=list(GATES), help="cells to run (default: all)")
    parser.add_argument("--hidden", nargs="+", type=int, help="hidden sizes (default: 64 256 1024)")
    parser.add_argument("--steps", nargs="+", type=int, help="sequence lengths (default: 30 100)")
    parser.add_argument("--batch", nargs="+", type=int, help="batch sizes (default: 1 64)")
    parser.add_argument("--repeats", type=int, help="interleaved runs per figure (default: 11, 3 at H=1024)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--no-seed", action="store_true", help="skip the seed configuration")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> int:
    if args.memory_probe:  # the subprocess of measure_memory
        print(json.dumps(memory_probe(*json.loads(args.memory_probe))))
        return 0
    result = run(args)
    print(json.dumps(result, indent=1) if args.json else report(result))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="rnnmath speed benchmark")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
