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

Implementations, for every cell of ``rnnmath.CELLS`` and docs/cells.md's CIFG cell (a new cell written as its
equations only): ``rnnmath`` (the layer's default path: on the CPU the generic compiled path of
:mod:`rnnmath.compiled`), ``torch.nn`` (the cell's torch.nn counterpart — oneDNN's LSTM and torch's C++ RNN/GRU
loops on CPU, cuDNN on CUDA — and torch.nn.LSTM at the same B, T, I, H for the cells torch.nn lacks), ``hand``
(the cell's hand-written ``fast_scan``, run with compilation off: the fused RNN/LSTM/GRU of :mod:`rnnmath.fused`,
minGRU's and minLSTM's parallel scan) and ``readable`` (the same rnnmath layer with ``fast = False``: the
per-step loop that is the specification). Each configuration is timed at every thread count of ``--threads``
(default 1 and 2), the models built once; compile times (first calls) are listed. The seed's configuration
(token ids, vocabulary 400, 30 steps, state 3, batch 128, tanh RNN) compares the seed tutorial's loop
``h = tanh(one_hot(x_t) W_ih + h W_hh + b)``, torch.nn.RNN fed the same one-hot vectors, and rnnmath.RNN fed the
token ids (a row lookup).
"""

from __future__ import annotations

import argparse
import json
import math
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

from . import cells, compiled, fused, layers
from .cells import Cell, LSTMState
from .common import cpu_model

TORCH = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}
# rnnmath: the layer's default path (the generic compiled path on the CPU); torch.nn: the cell's torch.nn
# counterpart, torch.nn.LSTM for cells torch.nn lacks; hand: the cell's hand-written fast_scan (the fused
# RNN/LSTM/GRU of rnnmath.fused, minGRU's and minLSTM's parallel scan), run with compilation off;
# readable: the per-step loop that is the specification
IMPLS = ("rnnmath", "torch.nn", "hand", "readable")
SEED = {"vocab": 400, "steps": 30, "hidden": 3, "batch": 128}
SEED_IMPLS = ("rnnmath ids", "torch.nn one-hot", "seed one-hot loop", "readable ids")


class CIFGLSTMCell(Cell):
    r"""docs/cells.md's worked example, copied: a new cell written as its equations only (Greff et al. 2017).

    f, g, o = σ, tanh, σ of (x W_ihᵀ + b_ih + h W_hhᵀ + b_hh), rows f | g | o; c' = f ⊙ c + (1 − f) ⊙ g;
    h' = o ⊙ tanh(c'). It has no hand-written fast path: the bench shows what the generic one gives it.
    """

    State = LSTMState
    num_gates = 3

    def step(self, p, x, state):
        h, c = state
        gates = x + F.linear(h, p["weight_hh"], p["bias_hh"])  # (B, 3H)
        f, g, o = gates.chunk(3, dim=1)
        f, g, o = torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c + (1 - f) * g
        h = o * torch.tanh(c)
        return LSTMState(h, c)


CELLS = {**cells.CELLS, "cifg_lstm (docs)": CIFGLSTMCell}


@dataclass(frozen=True)
class Config:
    """One benchmarked configuration: cell, hidden size H, steps T, batch B and input size I."""

    cell: str
    hidden: int
    steps: int
    batch: int
    input: int = 128

    def flops_per_step(self) -> int:
        """FLOPs of one forward step's matrix products: 2·B·I·G (input projection) + 2·B·H·G (recurrent, when
        W_hh is a matrix), G the rows of W_ih."""
        shapes = CELLS[self.cell](self.input, self.hidden, device="meta").parameter_shapes()
        G = shapes["weight_ih"][0]
        recurrent = shapes["weight_hh"][0] * shapes["weight_hh"][1] if len(shapes.get("weight_hh", ())) == 2 else 0
        return 2 * self.batch * (G * self.input + recurrent)

    def reference(self) -> str:
        """The torch.nn layer this cell is compared with."""
        return f"torch.nn.{TORCH[self.cell].__name__}" if self.cell in TORCH else "torch.nn.LSTM"


# -- what gets timed ------------------------------------------------------------------------------------------
def make_layer(impl: str, cell: str, input_size: int, hidden: int, device: str) -> torch.nn.Module | None:
    """A one-layer network of `impl` (None where the cell has no such path). The cells torch.nn has get
    torch.nn's initial weights in every implementation (the same values)."""
    native = TORCH.get(cell, torch.nn.LSTM)(input_size, hidden, device=device)
    if impl == "torch.nn":
        return native
    layer = layers.Recurrent(CELLS[cell], input_size, hidden, device=device)
    if cell in TORCH:
        layer.load_state_dict(native.state_dict())
    if impl == "hand" and not hasattr(layer.cells[0], "fast_scan"):
        return None
    layer.fast = impl != "readable"
    return layer


def step_function(model: torch.nn.Module, x: torch.Tensor, mode: str, compile: bool = True) -> Callable[[], None]:
    """A training step (forward + backward) or an inference call of `model` on `x`; ``compile=False`` runs it
    with rnnmath.compiled and torch's kernels (``layers.torch_kernels``) switched off: the hand-written fast
    paths then run."""
    def call() -> None:
        if mode == "infer":
            with torch.no_grad():
                model(x)
            return
        model.zero_grad(set_to_none=True)
        output, _ = model(x)
        output.sum().backward()

    if compile:
        return call

    def without_compilation() -> None:
        before = compiled.enabled, layers.torch_kernels
        compiled.enabled, layers.torch_kernels = False, False
        try:
            call()
        finally:
            compiled.enabled, layers.torch_kernels = before
    return without_compilation


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
    cells = cells or list(CELLS)
    hidden = hidden or ([64, 256] if quick else [64, 256, 1024])
    steps = steps or ([30] if quick else [30, 100])
    batch = batch or ([64] if quick else [1, 32, 64])
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


def run_config(config: Config, repeats: int, device: str, peak: float, threads: list[int],
               extend: bool = True, impls: tuple[str, ...] = IMPLS) -> list[dict]:
    """Training and inference of each implementation of one configuration, at each thread count (``extend``:
    more rounds for short calls, see more_rounds)."""
    torch.manual_seed(0)
    torch._dynamo.reset()  # each configuration starts with torch.compile's caches empty (its recompile limit)
    x = torch.randn(config.steps, config.batch, config.input, device=device)  # (T, B, I)
    models = {impl: make_layer(impl, config.cell, config.input, config.hidden, device) for impl in impls}
    models = {impl: m for impl, m in models.items() if m is not None}
    rows = []
    for n in threads:
        torch.set_num_threads(n)
        for mode in ("train", "infer"):
            fns = {impl: step_function(m, x, mode, compile=impl != "hand") for impl, m in models.items()}
            interleaved(fns, 0, 2 if config.hidden < 1024 else 1, device)  # warm-up (and the first call compiles)
            rounds = more_rounds(fns, repeats, device) if config.hidden < 1024 and extend else repeats
            times = interleaved(fns, rounds, 0, device)
            flops = config.flops_per_step() * config.steps * (3 if mode == "train" else 1)
            row = {**asdict(config), "threads": n, "mode": mode, "repeats": rounds, "reference": config.reference(),
                   "flops_per_step": config.flops_per_step()}
            for impl in IMPLS:
                t = statistics.median(times[impl]) if impl in times else float("nan")
                row[f"{impl} ms"] = t * 1e3
                row[f"{impl} GFLOP/s"] = flops / t / 1e9
                ratio = median_ratio(times[impl], times["torch.nn"]) if impl in times else float("nan")
                row[f"{impl}/torch.nn"] = ratio
            row["rnnmath % peak"] = 100 * row["rnnmath GFLOP/s"] / peak
            row["torch.nn % peak"] = 100 * row["torch.nn GFLOP/s"] / peak
            rows.append(row)
    return rows


def run_seed(repeats: int, device: str, threads: list[int]) -> list[dict]:
    torch.manual_seed(0)
    ids = seed_input(device)
    models = {impl: make_seed_model(impl, device) for impl in SEED_IMPLS}
    rows = []
    for n in threads:
        torch.set_num_threads(n)
        for mode in ("train", "infer"):
            fns = {impl: step_function(m, ids, mode) for impl, m in models.items()}
            times = interleaved(fns, repeats, warmup=5, device=device)
            row = {"threads": n, "mode": mode, "repeats": repeats,
                   **{f"{impl} ms": statistics.median(times[impl]) * 1e3 for impl in SEED_IMPLS}}
            for impl in SEED_IMPLS[1:]:
                row[f"{impl} / rnnmath ids"] = median_ratio(times[impl], times["rnnmath ids"])
            rows.append(row)
    return rows


def bound_for(cell: str, mode: str) -> float:
    """Issue 16's bound on rnnmath / torch.nn (the cell's counterpart, torch.nn.LSTM for the others)."""
    if cell in TORCH:
        return 1.0 if mode == "train" else 1.1
    if cell in ("layernorm_lstm", "peephole_lstm"):
        return 1.3
    if cell in ("indrnn", "mingru", "minlstm"):
        return 1.0
    return 1.5  # a new cell written as docs/cells.md shows


def worst_ratios(rows: list[dict]) -> list[dict]:
    """Per cell, mode and thread count: the largest rnnmath / torch.nn over the grid, and where it was."""
    worst: dict[tuple, dict] = {}
    for r in rows:
        key = (r["cell"], r["mode"], r["threads"])
        if key not in worst or r["rnnmath/torch.nn"] > worst[key]["rnnmath/torch.nn"]:
            worst[key] = r
    out = []
    for (cell, mode, threads), r in worst.items():
        bound = bound_for(cell, mode)
        out.append({"cell": cell, "mode": mode, "threads": threads, "reference": r["reference"],
                    "worst": r["rnnmath/torch.nn"], "at": f"H={r['hidden']} T={r['steps']} B={r['batch']}",
                    "bound": bound, "met": r["rnnmath/torch.nn"] <= bound})
    return out


def check_targets(rows: list[dict], seed: list[dict], memory: list[dict]) -> list[dict]:
    """The issue's targets, each with the measured figure and whether it is met."""
    targets = []
    for w in worst_ratios(rows):
        targets.append({"target": f"{w['mode']} {w['cell']}, {w['threads']} thread(s), worst of the grid "
                        f"({w['at']}): rnnmath/{w['reference']} ≤ {w['bound']}", "measured": round(w["worst"], 2),
                        "met": w["met"]})
    for r in seed:
        if r["mode"] == "train":
            loop, native = r["seed one-hot loop / rnnmath ids"], r["torch.nn one-hot / rnnmath ids"]
            targets.append({"target": f"seed config, {r['threads']} thread(s): ≥ 5× faster than the seed's "
                            "one-hot loop", "measured": round(loop, 2), "met": loop >= 5})
            targets.append({"target": f"seed config, {r['threads']} thread(s): faster than torch.nn.RNN fed one-hot",
                            "measured": round(native, 2), "met": native > 1})
    for m in memory:
        targets.append({"target": f"peak memory {m['cell']} H={m['hidden']} T={m['steps']} B={m['batch']}: "
                        "rnnmath/torch.nn ≤ 1.2", "measured": round(m["peak ratio"], 3), "met": m["peak ratio"] <= 1.2})
    return targets


def run(args: argparse.Namespace) -> dict:
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("rnnmath bench: --device cuda needs a GPU, and torch sees none")
    threads = args.threads or [1, 2]
    compiled.min_calls = 1  # compile on the first (warm-up) call: the timed calls all run compiled code
    configs = grid(args.quick, args.cells, args.hidden, args.steps, args.batch)
    def log(*message) -> None:  # progress on stderr; stdout carries only the tables or the JSON
        print(*message, file=sys.stderr, flush=True)

    torch.set_num_threads(max(threads))
    peak = matmul_peak(device)
    log(f"matmul peak: {peak:.1f} GFLOP/s at {max(threads)} thread(s)")
    rows = []
    for config in configs:
        log(f"timing {config}")
        rows += run_config(config, repeats_for(config, args.repeats, args.quick), device, peak, threads,
                           extend=not args.repeats, impls=("rnnmath", "torch.nn", *args.also))
    seed = run_seed(args.repeats or (11 if args.quick else 31), device, threads) if not args.no_seed else []
    memory = []
    if not args.no_memory:
        torch.set_num_threads(max(threads))
        for config in configs:
            if config.batch == 1:  # the activations are negligible next to the libraries at B = 1
                continue
            log(f"memory {config}")
            m = {impl: measure_memory(impl, config.cell, config.hidden, config.steps, config.batch, config.input,
                                      device) for impl in ("rnnmath", "torch.nn")}
            memory.append({**asdict(config), **{f"{impl} {k}": v for impl, d in m.items() for k, v in d.items()},
                           "peak ratio": m["rnnmath"]["peak_mb"] / m["torch.nn"]["peak_mb"]})
    return {"machine": machine(device), "matmul_peak_gflops": peak, "rows": rows, "seed": seed, "memory": memory,
            "worst": worst_ratios(rows), "compile_seconds": dict(compiled.COMPILE_SECONDS),
            "targets": check_targets(rows, seed, memory)}


def machine(device: str) -> dict:
    cpu = cpu_model()
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else None
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "device": device,
            "gpu": gpu, "python": platform.python_version(), "load_average": os.getloadavg()[0],
            # small steps' loops on one thread (docs/cells.md item 7): its bounds, or 0 when off
            "one_thread_max_product": fused.one_thread_max_product,
            "one_thread_max_elements": fused.one_thread_max_elements}


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
             f"load average {m['load_average']:.1f} at the start; small steps on one thread: "
             + ("off" if not (m["one_thread_max_product"] and m["one_thread_max_elements"]) else
                f"B·G·H ≤ {m['one_thread_max_product']}, B·G ≤ {m['one_thread_max_elements']}")]
    parts.append("\n### Worst ratio per cell over the grid (rnnmath / its torch.nn reference)\n")
    parts.append(markdown_table([{**w, "met": "met" if w["met"] else "MISSED"} for w in result["worst"]], [
        ("cell", "cell", ""), ("mode", "mode", ""), ("threads", "threads", "d"), ("reference", "reference", ""),
        ("worst ratio", "worst", ".3f"), ("at", "at", ""), ("target", "bound", ".1f"), ("", "met", "")]))
    parts.append("\n### Layers (I = 128): milliseconds per call, median of interleaved runs\n")
    parts.append("torch.nn is the cell's torch.nn counterpart, torch.nn.LSTM for the cells torch.nn lacks; hand is "
                 "the cell's hand-written fast_scan (none: nan; the column is left out when no cell has one).\n")
    columns = [
        ("cell", "cell", ""), ("H", "hidden", "d"), ("T", "steps", "d"), ("B", "batch", "d"),
        ("threads", "threads", "d"), ("mode", "mode", ""), ("rnnmath", "rnnmath ms", ".2f"),
        ("torch.nn", "torch.nn ms", ".2f"), ("hand", "hand ms", ".2f"), ("readable", "readable ms", ".2f"),
        ("rnnmath/torch.nn", "rnnmath/torch.nn", ".2f"), ("hand/torch.nn", "hand/torch.nn", ".2f"),
        ("readable/torch.nn", "readable/torch.nn", ".2f"), ("rnnmath GFLOP/s", "rnnmath GFLOP/s", ".1f"),
        ("% peak", "rnnmath % peak", ".0f"), ("runs", "repeats", "d")]
    parts.append(markdown_table(result["rows"], [c for c in columns if not c[1].startswith("hand") or any(
        isinstance(row.get(c[1]), float) and not math.isnan(row[c[1]]) for row in result["rows"])]))
    if result["compile_seconds"]:
        parts.append("\n### Compile time of the generic path (first call; seconds, tracing included)\n")
        parts.append(markdown_table([{"what": k, "s": v} for k, v in result["compile_seconds"].items()],
                                    [("cell and shapes", "what", ""), ("seconds", "s", ".1f")]))
    if result["seed"]:
        s = SEED
        parts.append(f"\n### Seed configuration (tanh RNN, token ids, V={s['vocab']}, T={s['steps']}, "
                     f"H={s['hidden']}, B={s['batch']}): milliseconds\n")
        parts.append(markdown_table(result["seed"], [("threads", "threads", "d"), ("mode", "mode", "")]
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
    parser.add_argument("--cells", nargs="+", choices=list(CELLS), help="cells to run (default: all)")
    parser.add_argument("--hidden", nargs="+", type=int, help="hidden sizes (default: 64 256 1024)")
    parser.add_argument("--steps", nargs="+", type=int, help="sequence lengths (default: 30 100)")
    parser.add_argument("--batch", nargs="+", type=int, help="batch sizes (default: 1 32 64)")
    parser.add_argument("--repeats", type=int, help="interleaved runs per figure, exactly (default: 11, 3 at "
                        "H=1024, short calls more)")
    parser.add_argument("--also", nargs="*", default=["hand", "readable"], choices=["hand", "readable"],
                        help="implementations timed beside rnnmath and torch.nn (default: hand readable; "
                        "none: --also with no names)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--threads", nargs="+", type=int, help="thread counts, each timed in turn (default: 1 2)")
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
