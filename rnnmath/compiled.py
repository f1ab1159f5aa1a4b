"""The generic fast path: any cell's time loop, with its step split, traced, differentiated and compiled once.

Shape letters: T time, B batch, H hidden, G gate rows (the rows of W_hh), I input.

The readable loop (:func:`rnnmath.layers.scan` calling ``cell.step``) is the specification; this module derives
a faster equivalent of it from ``cell.step`` alone, for any cell written as docs/cells.md shows, with no
hand-written derivative:

1. **Split.** A step is the recurrent product ``hw = h W_hhᵀ`` and an *update* ``(x, hw, state, p) -> state``
   holding everything else (gates, normalisation, the cell's pointwise and row-wise math). The split is found
   by running ``cell.step`` under a :class:`torch.overrides.TorchFunctionMode` that answers the product of the
   state's h with ``W_hh`` (``F.linear``, ``mm``, ``addmm``, ``matmul``, ``@``, through ``W_hh.t()``/``.T``)
   with an input ``hw``. A cell whose ``W_hh`` is used any other way (IndRNN's vector ``u ⊙ h``), or that
   has none (minGRU), keeps every parameter inside the update.
2. **Trace.** ``torch.fx.experimental.proxy_tensor.make_fx`` records the update as a graph of ATen operations,
   and the graph of its vector-Jacobian product (autograd of the update, recomputing its forward from the
   saved inputs): the derivative is autograd's, generated once per cell, shape, dtype and device.
3. **Compile** (on by default). Inductor's ``compile_fx_inner`` (its entry for graphs already in ATen operations,
   without the AOTAutograd wrapper of ``torch._inductor.compile``) turns each graph into fused C++ loops
   (TorchInductor, Ansel et al. 2024, "PyTorch 2"; the layer enables this path on the CPU only, the one device
   measured).
   Each graph's kernels are called from C++ (inductor's ``cpp_wrapper``, :data:`cpp_wrapper`), not Python.
   The compiled code is cached in memory per cell and shapes, and by inductor on disk (its FX-graph cache).
   It happens on the :data:`min_calls`-th call with a batch size (before, the cell's other paths run), so
   one-off shapes cost nothing. Compile time is counted in :data:`COMPILE_SECONDS`. ``RNNMATH_COMPILE=0``
   (read at import) or ``rnnmath.compiled.enabled = False`` turns compilation off; the layer then runs a
   cell's hand-written ``fast_scan`` if it has one, else the readable loop.
4. **Scan.** One :class:`torch.autograd.Function` runs the loop: the forward pass, with nothing recorded for
   autograd, is one matrix product and one compiled update call a step; the backward pass is one compiled
   vector-Jacobian call and one product ``∂L/∂hw_t W_hh`` a step, and after the loop ``∂L/∂W_hh =
   Σ_t ∂L/∂hw_tᵀ h_{t-1}`` is ONE matrix product over all steps (as in :mod:`rnnmath.fused`). ∂L/∂x is
   returned whole, so the layer's input projection gets its weight gradient as one product as well. These
   products over all steps, and a plain projection x W_ihᵀ + b_ih (:func:`project`), run through oneDNN's
   matrix product where they are large (:data:`onednn_min_work`) on CPUs other than Intel's: on an AMD EPYC
   ATen's float32 ``mm`` is MKL's, and oneDNN's was up to 2.4 times as fast (on an Intel Xeon the two were
   within 15 %, so there ATen's is kept).
5. **Chunks** (small steps: :data:`chunk_max_work`). At B = 1 a step is a few microseconds of arithmetic and
   about ten of Python around the calls, so there the loop runs :data:`chunk_steps` steps per call: the same
   update and its vector-Jacobian product unrolled K times, with the products ``h W_hhᵀ`` and ``∂L/∂hw W_hh``
   inside, traced and compiled as one graph each (on first use, per K and shapes); the steps left over run as
   chunks of K/2, K/4, ... where they fit, then one a call (:func:`chunk_sizes`). The saved states and ∂L/∂hw
   are the same as above, so ∂L/∂W_hh is still one product.
6. **Scans of chunks** (B = 1: :data:`scan_max_batch`). Four or more whole chunks in a row are one compiled
   call: the chunk's graph looped by torch's ``scan`` operator (``torch._higher_order_ops.scan``), which
   inductor compiles into a loop inside the C++ wrapper, forward and (over the chunks reversed) backward; its
   inputs and outputs are those of one chunk of as many steps, so the loop above does not change.
7. **One thread for small steps.** The loop runs with one thread where a step is small and no other Python thread
   is alive (:func:`rnnmath.fused.one_thread_if_small`): more threads only split its tiny operations, at a cost.

Lengths (``mask`` (T, B, 1)) are part of the traced update: past a sequence's length the state is carried
unchanged, exactly as in ``scan``. The values equal the readable loop's within floating-point tolerance
(different but equally exact roundings: fused multiply-adds, a different order of a sum), not bit for bit.

Limits, where :class:`rnnmath.Recurrent` uses another path instead (``supported`` says which): recurrent
dropout, zoneout and tracing (the readable loop); torch.compile, torch.func transforms, forward-mode AD and
autocast (the readable loop, which supports them); devices other than the CPU (not measured: no GPU was lent).
The compiled backward is first order: when the backward pass is itself recorded (``create_graph=True``: double
backward, gradient penalties) or batched (``is_grads_batched``), it differentiates the readable loop replayed
from the saved inputs instead, so those gradients are exact and differentiable as well.

If the compiler fails (no C++ compiler, say), a warning says so once, compilation is switched off for the
process and the layer falls back to its other paths.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .cells import Cell, GRUCell, RNNCell
from .fused import one_thread_if_small, without_autocast

enabled: bool = os.environ.get("RNNMATH_COMPILE", "1").strip().lower() not in ("0", "false", "no", "off")
"""Use the compiled generic path (default True). False (or RNNMATH_COMPILE=0 at import) never starts the
compiler: cells with a hand-written ``fast_scan`` run it, the others the readable loop."""

min_calls: int = 3
"""Compile a cell's step for a batch size on its ``min_calls``-th call with it (and its projection on its
``min_calls``-th call); earlier calls take the cell's other paths. One-off shapes (a last partial batch, a single
prediction) then never pay seconds of compilation."""


@contextmanager
def by_shape() -> Iterator[None]:
    """Within it, a layer chooses its path by the shapes alone, not by how often this process has called it:
    :data:`min_calls` is 1, so a batch size compiles on its first call instead of its third. Training loops run
    under it, because a run resumed in a new process would otherwise take another path for its first batches
    than the uninterrupted run did, and its weights would differ in the last bits (different, equally exact
    roundings): ``--resume`` could not end with the same files."""
    global min_calls
    saved, min_calls = min_calls, 1
    try:
        yield
    finally:
        min_calls = saved


def _steps_from_environment() -> int:
    text = os.environ.get("RNNMATH_CHUNK_STEPS", "8").strip()
    if text.isdigit() and int(text) >= 1:
        return int(text)
    warnings.warn(f"rnnmath: RNNMATH_CHUNK_STEPS={text!r} is not a whole number of steps of at least 1; using 8",
                  stacklevel=2)
    return 8


chunk_steps: int = _steps_from_environment()
"""Steps per compiled call where a step is small (:data:`chunk_max_work`; ``RNNMATH_CHUNK_STEPS`` at import,
default 8): the loop runs K = ``chunk_steps`` steps (their recurrent products included) as one compiled graph
forward and one backward, and a remainder of fewer than K steps as chunks of K/2, K/4, ... and single steps
(:func:`chunk_sizes`). At B = 1 a step's arithmetic takes a few microseconds and the Python around each call
about 10: chunks of 8 cut the time of a training step 1.2-1.9 fold, and the half chunks for the remainder 7-9 %
more at T = 30 (docs/benchmarks.md). 1 turns chunks off."""

chunk_max_work: int = 1 << 23
"""Chunks only where a step's recurrent product is at most this many multiply-adds, B · G · H (W_hh's G × H;
cells without one, such as minGRU and IndRNN, always): up to B = 64 at H = 64, and at most B = 2 where the
single steps' products go through oneDNN (:data:`chunk_max_batch_onednn`). There a step's arithmetic is
comparable with the Python and dispatch around its calls. Measured side by side (rnnmath / torch.nn.LSTM without
and with chunks, rounds in alternating order, this CPU): peephole LSTM, H = 64, T = 100, B = 64, 2 threads,
training 1.34 -> 1.15; T = 30, inference 2.11 -> 1.74; minGRU, H = 64, B = 32, 2 threads 0.83 -> 0.63. Above
it, the single steps' oneDNN products win: H = 1024, B = 32 1.13 against 1.55 with chunks. Compiling the chunks
takes several times as long as one step (docs/cells.md). 0 turns chunks off."""

chunk_max_weight_threaded: int = 1 << 20
"""With more than one thread, no chunks where W_hh has more elements than this (float32: 4 MiB; H = 1024 for an
LSTM-like cell) and the single steps' products go through oneDNN (:data:`onednn_min_hidden`): oneDNN spreads a
small batch's product over the threads where ATen's ``mm`` in the chunk graphs does not (AMD EPYC, B = 1,
H = 1024, 2 threads: 144 against 365 µs a product). Peephole LSTM, H = 1024, B = 1, 2 threads, rnnmath /
torch.nn.LSTM with and without chunks: T = 30 training 0.86 against 0.71, inference 2.49 against 1.48; with 1
thread chunks win (0.56 against 0.74, 1.05 against 1.24). Where the single steps' products are ATen's as well
(Intel Xeon, oneDNN off), chunks win at 2 threads too: T = 30 training 0.58 against 0.67, inference 0.91
against 1.09."""


chunk_max_batch_onednn: int = 2
"""No chunks above this batch size where the single steps' products run through oneDNN (float32, H at least
:data:`onednn_min_hidden`): inside the chunk graphs they are ATen's ``mm`` (MKL, slow on an AMD CPU). Peephole
LSTM, T = 30, rnnmath / torch.nn.LSTM without and with chunks (alternating order, AMD EPYC): H = 256, B = 8, 2 threads,
inference 2.29 against 2.60, 1 thread training 1.99 against 2.08; B = 32 1.59 against 2.65 and 1.41 against
1.74; B = 4 mixed (training 1.77 against 1.52 with chunks, inference 2.40 against 2.99); B = 1 and 2 chunks win
(1 thread, B = 1 training 2.23 against 1.23, H = 1024 1.71 against 1.37; B = 2 inference 2.12 against 1.58)."""


scan_max_batch: int = 1
"""Up to this batch size, runs of :data:`scan_min_chunks` or more whole chunks are one compiled call each: a
chunk's graph looped by torch's ``scan`` operator inside the compiled code, so that the Python around each
chunk's call (10-20 µs at B = 1 under cProfile) is paid once per scan (:func:`chunk_sizes`). Measured side by
side (rnnmath / torch.nn.LSTM, chunks then scans, rounds in alternating order, Intel Xeon, 1 thread, T = 100,
B = 1): LayerNorm-LSTM H = 64 training 3.23 -> 2.72, inference 3.26 -> 2.97; peephole LSTM H = 64 2.42 -> 2.16,
2.46 -> 2.24, H = 256 0.99 -> 0.98, 1.62 -> 1.56; IndRNN H = 64 1.01 -> 0.85, 1.08 -> 0.93; minGRU equal;
minLSTM slower (1.12-1.18 -> 1.29-1.30: its class sets ``chunk_scans = False``). At B = 32 they lost (peephole
H = 64 1.87 -> 2.13, LayerNorm-LSTM H = 256 1.35 -> 1.57), and at T = 30, B = 1 (two chunks a scan) too
(peephole H = 64 1.87 -> 1.98). 0 turns scans off."""

scan_min_chunks: int = 4
"""The fewest whole chunks one scan covers (:data:`scan_max_batch`): 4 chunks of 8, 32 steps."""


def _chunks_pay(p: dict, B: int) -> bool:
    """Whether a step of this cell at batch size B is small enough to run in chunks (:data:`chunk_max_work`,
    :data:`chunk_max_weight_threaded`)."""
    w = p.get("weight_hh")
    if not isinstance(w, Tensor) or w.dim() != 2:
        return chunk_max_work > 0
    if _use_onednn(w, onednn_min_steps):  # the single steps' products would be oneDNN's
        if B > chunk_max_batch_onednn or (torch.get_num_threads() > 1 and w.numel() > chunk_max_weight_threaded):
            return False
    return 0 < B * w.numel() <= chunk_max_work


COMPILE_SECONDS: dict[str, float] = {}
"""Seconds spent tracing and compiling, per cell class and shapes (e.g. ``"LayerNormLSTMCell B=64 H=256 ..."``),
summed over the layers and directions that traced them: each cell object traces its own graphs, and a graph
compiled before in this process (the same code and input layouts, ``_COMPILED``) is not compiled again, so then
only its tracing counts."""


def _count_compile(key: str, start: float) -> None:
    COMPILE_SECONDS[key] = COMPILE_SECONDS.get(key, 0.0) + time.perf_counter() - start


# per cell object (one per layer), outside it so that copying or deep-copying a layer copies no compiled code
_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PROJECTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SEEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # calls per cell and shapes before compiling


class NotSplittable(Exception):
    """W_hh is used other than in the one product h W_hhᵀ: the update keeps W_hh as an ordinary input."""


_PRODUCTS = {F.linear, torch.mm, torch.addmm, torch.matmul, Tensor.__matmul__, Tensor.matmul, Tensor.mm}
_TRANSPOSES = {Tensor.t, torch.t, Tensor.T.__get__}


class _SplitRecurrentProduct(TorchFunctionMode):
    """While cell.step runs, answer h W_hhᵀ (in any of its spellings) with the given hw instead of computing it."""

    def __init__(self, weight: Tensor, h: Tensor, hw: Tensor) -> None:
        super().__init__()
        self.weight, self.h, self.hw = weight, h, hw
        self.transposed: list[Tensor] = []  # W_hh.t() results seen so far (kept alive for the identity test)
        self.uses = 0

    def _is(self, t, kind: str) -> bool:
        if kind == "w":
            return t is self.weight
        return any(t is w for w in self.transposed)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        everything = list(args) + list(kwargs.values())
        touches = [a for a in everything if isinstance(a, Tensor) and (self._is(a, "w") or self._is(a, "t"))]
        if not touches:
            return func(*args, **kwargs)
        if func in _TRANSPOSES and self._is(args[0], "w") and len(everything) == 1:
            marker = torch.empty(0, device="meta")  # stands for W_hhᵀ; any use but the product is refused
            self.transposed.append(marker)
            return marker
        if func is F.linear and args[0] is self.h and self._is(args[1], "w") and len(everything) <= 3:
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            self.uses += 1
            return self.hw if bias is None else self.hw + bias
        if func in (torch.mm, torch.matmul, Tensor.__matmul__, Tensor.matmul, Tensor.mm) and not kwargs \
                and args[0] is self.h and self._is(args[1], "t"):
            self.uses += 1
            return self.hw
        if func is torch.addmm and not kwargs and len(args) == 3 and args[1] is self.h and self._is(args[2], "t"):
            self.uses += 1
            return args[0] + self.hw
        raise NotSplittable(f"{getattr(func, '__name__', func)} uses W_hh")


@dataclass
class _Graphs:
    """The traced and compiled update of one cell at one set of shapes."""

    forward: object  # [x, [hw], *state, *params, [keep]] -> state fields (one list: inductor's boxed call)
    backward: object  # [same inputs, *grad_state] -> grads of x, [hw], state fields, params
    split: bool  # hw is an input (W_hh left out of the update)
    names: list[str]  # the parameter names that are inputs of the update, in order
    update: object  # the traced Python update (to build chunks from)
    vjp: object  # the traced graph of its vector-Jacobian product (to build chunks from), [inputs, *grads]
    chunks: dict  # K -> (forward, backward): K steps in one graph each, built on first use (_chunk_graphs)


def _update_function(cell, names: list[str], split: bool, n_state: int, masked: bool, p_all: dict):
    """(x, [hw], *state, *params, [keep]) -> new state fields, from cell.step alone."""

    def update(*inputs):
        x, rest = inputs[0], list(inputs[1:])
        hw = rest.pop(0) if split else None
        keep = rest.pop() if masked else None
        state = cell.State(*rest[:n_state])
        p = dict(p_all)
        p.update(zip(names, rest[n_state:]))
        if split:
            with _SplitRecurrentProduct(p["weight_hh"], state.h, hw) as mode:
                new = cell.step(p, x, state)
            if mode.uses != 1:
                raise NotSplittable(f"h W_hhᵀ computed {mode.uses} times")
        else:
            new = cell.step(p, x, state)
        if masked:
            new = type(new)(*(torch.where(keep, n, s) for n, s in zip(new, state)))
        return tuple(new)

    return update


def _vjp_function(update, n_inputs: int):
    def vjp(*inputs_and_grads):
        inputs, grads = inputs_and_grads[:n_inputs], inputs_and_grads[n_inputs:]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
            outputs = update(*leaves)
            wrt = [t for t in leaves if t.requires_grad]
            found = torch.autograd.grad(outputs, wrt, grads, allow_unused=True)
        found = iter(found)
        return tuple(next(found) if t.requires_grad else None for t in leaves)

    return vjp


cpp_wrapper: bool = True
"""Compile each graph with a C++ wrapper (inductor's ``cpp_wrapper``): the code that calls its kernels and matrix
products is C++ instead of Python (default True). Measured side by side (rnnmath / torch.nn.LSTM, Python wrapper
against C++, alternating order): LayerNorm-LSTM, H = 64, T = 100, B = 1, 1 thread, inference 4.11 -> 2.99,
training 4.08 -> 2.94; peephole LSTM, H = 64, T = 30, B = 1, 2 threads, training 2.09 -> 1.68; no change where a
step's arithmetic dominates (peephole, H = 256, B = 64: 1.65 both). Compiling takes about as long (peephole B = 1
training, empty cache: 27 against 26 s). False keeps inductor's Python wrapper."""


_COMPILED: dict[tuple, object] = {}
"""Compiled graphs by their code and example inputs' layouts, shared by every cell object in the process: a new
layer, a reloaded model or a second training run in one process compiles nothing it has compiled before, and
pays its tracing only (a language model's graphs, B = 8 and 1, H = 32, took 15-23 s to compile again before)."""


def _compile(gm, example, compile: bool):
    """A callable taking the inputs as one list (which it may empty): the graph compiled, or run as it is."""
    if not compile:
        return lambda inputs: gm(*inputs)  # the same math, without the fused kernels (tests use it)
    # tensors the code does not show (subgraphs, a scan's loop body, are code and go into the key)
    has_constants = any(node.op == "get_attr" and isinstance(getattr(gm, node.target), Tensor)
                        for node in gm.graph.nodes)
    code = tuple(m.code for _, m in gm.named_modules() if isinstance(m, torch.fx.GraphModule))
    key = None if has_constants else (
        code, tuple((tuple(t.shape), t.stride(), t.dtype, t.device) if isinstance(t, Tensor) else repr(t)
                       for t in example), cpp_wrapper, torch.get_num_threads())
    if key is None or key not in _COMPILED:
        compiled = _compile_now(gm, example)
        if key is None:
            return compiled
        _COMPILED[key] = compiled
    return _COMPILED[key]


def _compile_now(gm, example):
    """_compile's work on a miss: inductor's compiled graph, called through its module's entry where it can."""
    # inductor's inner entry: the graph is already ATen operations, so no AOTAutograd wrapper runs around
    # every call (half the per-step overhead at B = 1)
    from torch._inductor import config
    from torch._inductor.compile_fx import compile_fx_inner, get_cpp_wrapper_config

    # torch's scan operator is left out of inductor's disk cache by default (every process compiled the scans
    # again, 10-12 s each); its loop body is a submodule of gm, part of the cache key, so mark it cacheable
    scan = {"torch.ops.higher_order.scan": torch.__version__}
    with _cacheable(gm, example) as example, config.patch(unsafe_marked_cacheable_functions=scan):
        if not cpp_wrapper:
            graph = compile_fx_inner(gm, example)
        else:
            with config.patch(get_cpp_wrapper_config()):
                graph = compile_fx_inner(gm, example, cpp_wrapper=True)
    # its compiled module's entry, without the profiler, metrics and autotune-cache bookkeeping inductor's
    # __call__ does around it on every call (LayerNorm-LSTM, H = 64, T = 100, B = 1, 1 thread, inference
    # 3.66 -> 3.26 x torch.nn.LSTM); the bookkeeping matters only while a compile context is active
    if getattr(graph, "_compile_context", None) is None and callable(getattr(graph, "current_callable", None)):
        return graph.current_callable
    return graph


@contextmanager
def _cacheable(gm, example: list):
    """Inductor's compile made cacheable on disk across processes: inside a tracing context whose fake mode has a
    shape environment (without one inductor bypasses its FX-graph cache, "No shape env"), and with the example
    inputs as fake tensors (real ones are hashed with their values, so no two processes shared a key). Yields the
    fake example inputs."""
    from torch._guards import TracingContext, detect_fake_mode, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    # the fake mode gm was traced in (make_fx's has a shape environment), which its subgraphs' values share
    fake_mode = detect_fake_mode([node.meta.get("val") for node in gm.graph.nodes if node.op == "placeholder"])
    if fake_mode is None or fake_mode.shape_env is None:
        fake_mode = FakeTensorMode(shape_env=ShapeEnv())
    fakes = [fake_mode.from_tensor(t, static_shapes=True) if isinstance(t, Tensor) else t for t in example]
    with tracing(TracingContext(fake_mode)):
        yield fakes


fast_tanh: bool = True
"""Trace float32 tanh as :func:`_tanh` for inductor (default True); False keeps inductor's own vectorised tanh."""

_TANH_TAYLOR = (1.0, -1 / 3, 2 / 15, -17 / 315, 62 / 2835, -1382 / 155925, 21844 / 6081075)  # of x, x³, ..., x¹³


def _tanh(x: Tensor) -> Tensor:
    """torch.tanh of float32, traced as operations inductor compiles about twice as fast on this CPU (compiled,
    262,144 floats, 1 thread: its vectorised tanh, SLEEF's, 1.46 ns an element, this 0.67, exp alone 0.25): for
    |x| < 0.4 the Taylor series to x¹³ (the next term is below 2e-9), else 1 − 2 / (1 + e^{2|x|}) with the sign
    of x. Within 2e-7 relative of torch.tanh
    (tested). Other dtypes keep tanh. (Inductor turns expm1 into exp − 1, so −m/(2+m), m = expm1(−2|x|), would
    lose the relative accuracy near 0.)"""
    if x.dtype != torch.float32:
        return NotImplemented
    a, s = x.abs(), x * x
    series = torch.full_like(x, _TANH_TAYLOR[-1])
    for c in reversed(_TANH_TAYLOR[:-1]):
        series = series * s + c
    far = torch.copysign(1.0 - 2.0 / (1.0 + torch.exp(2.0 * a)), x)
    return torch.where(a < 0.4, x * series, far)


def _decompositions(compile: bool) -> dict | None:
    """The ATen operations decomposed while tracing: the subset inductor lowers, and tanh as :func:`_tanh`."""
    if not compile:
        return None
    from torch._inductor.decomposition import select_decomp_table

    table = dict(select_decomp_table())
    if fast_tanh:
        table[torch.ops.aten.tanh.default] = _tanh
    return table


def _build(cell, p: dict, xw: Tensor, state, mask: Tensor | None, compile: bool) -> _Graphs:
    """Split, trace and compile cell.step for the shapes of one step of xw (T, B, G)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    decompositions = _decompositions(compile)
    start = time.perf_counter()
    n_state = len(state)
    x0, keep0 = xw[0], (mask[0] if mask is not None else None)
    has_w = isinstance(p.get("weight_hh"), Tensor) and p["weight_hh"].dim() == 2
    graphs = None
    for split in ((True, False) if has_w else (False,)):
        names = [n for n, t in p.items() if isinstance(t, Tensor) and not (split and n == "weight_hh")]
        constants = {n: t for n, t in p.items() if not isinstance(t, Tensor)}
        if split:  # only its identity is used: the mode answers every product with it
            constants["weight_hh"] = p["weight_hh"].detach()
        hw0 = state.h @ p["weight_hh"].detach().t() if split else None
        lead = [x0.detach(), *([hw0] if split else []), *(s.detach() for s in state)]
        try:
            while True:  # trace; then again without the parameters the step does not use (W_ih: project's)
                update = _update_function(cell, names, split, n_state, mask is not None, constants)
                inputs = lead + [p[n].detach() for n in names] + ([keep0] if mask is not None else [])
                with torch.no_grad():
                    outputs = update(*inputs)
                fwd = make_fx(update, decompositions, tracing_mode="fake")(*inputs)
                placeholders = [node for node in fwd.graph.nodes if node.op == "placeholder"]
                used = [n for n, node in zip(names, placeholders[len(lead):]) if node.users]
                if used == names:
                    break
                names = used
        except NotSplittable:
            continue
        grads = [torch.ones_like(o) for o in outputs]
        bwd = make_fx(_vjp_function(update, len(inputs)), decompositions, tracing_mode="fake")(*inputs, *grads)
        # the chunks and scans trace bwd again: a copy, as inductor rewrites the graphs it compiles in place (a
        # scan's graph then differed between a process that compiled bwd and one that took it from the cache)
        vjp = copy.deepcopy(bwd)
        graphs = _Graphs(_compile(fwd, inputs, compile), _compile(bwd, inputs + grads, compile), split, names,
                         update, vjp, {})
        break
    if compile:
        key = f"{type(cell).__name__} B={xw.shape[1]} H={state.h.shape[1]} {str(xw.dtype)[6:]}"
        _count_compile(key + (" lengths" if mask is not None else ""), start)
    return graphs


def _chunk_functions(graphs: _Graphs, K: int, n_state: int, n_params: int, masked: bool):
    """K steps of the update as one forward and one backward function (unrolled; the recurrent products inside).

    forward: [xs (K, B, Gx), *state, [W_hh], *params, [keep (K, B, 1)]] -> (*fields after each step (K, B, H),
    [hw of each step (K, B, G)]). backward: [xs, [hws], *fields before each step (K, B, H), [W_hh], *params,
    [keep], g_prev (K, B, H), *grads of the last state] -> (∂xs, [∂hws], *∂state before the chunk, *∂params),
    where g_prev[k] is the gradient the outputs give h before step k. As in the one-step loop, ∂W_hh is left to
    one product over all steps after the loop (from ∂hws)."""
    update, vjp, split = graphs.update, graphs.vjp, graphs.split
    lead = 2 if split else 1

    def unpack(rest):
        w = rest.pop(0) if split else None
        params = rest[:n_params]
        keep = rest[n_params] if masked else None
        return w, params, keep

    def forward(xs, *rest):
        state, (w, params, keep) = list(rest[:n_state]), unpack(list(rest[n_state:]))
        fields, hws = [[] for _ in range(n_state)], []
        for k in range(K):
            inputs = [xs[k]]
            if split:
                hws.append(torch.mm(state[0], w.t()))
                inputs.append(hws[-1])
            state = list(update(*inputs, *state, *params, *([keep[k]] if masked else [])))
            for field, s in zip(fields, state):
                field.append(s)
        return (*(torch.stack(f) for f in fields), *([torch.stack(hws)] if split else []))

    def backward(xs, *rest):
        rest = list(rest)
        hws = rest.pop(0) if split else None
        before, rest = rest[:n_state], rest[n_state:]
        g_prev, grads = rest[-n_state - 1], list(rest[-n_state:])
        w, params, keep = unpack(rest[:-n_state - 1])
        dxs, dhws, dparams = [], [], [torch.zeros_like(q) for q in params]
        for k in reversed(range(K)):
            inputs = [xs[k], *([hws[k]] if split else []), *(f[k] for f in before), *params,
                      *([keep[k]] if masked else [])]
            found = [g if g is not None or not t.is_floating_point() else torch.zeros_like(t)
                     for g, t in zip(vjp(*inputs, *grads), inputs)]
            dxs.append(found[0])
            dparams = [a + g for a, g in zip(dparams, found[lead + n_state:lead + n_state + n_params])]
            grads = found[lead:lead + n_state]
            if split:
                dhws.append(found[1])
                grads[0] = grads[0] + torch.mm(found[1], w)  # ∂L/∂h through hw = h W_hhᵀ
            grads[0] = grads[0] + g_prev[k]
        return (torch.stack(dxs[::-1]), *([torch.stack(dhws[::-1])] if split else []), *grads, *dparams)

    return forward, backward


def _scan_functions(graphs: _Graphs, K: int, n: int, n_state: int, n_params: int, masked: bool):
    """n chunks of K steps as one forward and one backward function with the same inputs and outputs as
    :func:`_chunk_functions`' for n·K steps: a chunk's graph once, looped over the chunks by a scan (torch's
    ``scan`` higher-order operator), so the loop itself runs inside the compiled code."""
    from torch._higher_order_ops.scan import scan_op

    forward, backward = _chunk_functions(graphs, K, n_state, n_params, masked)
    split, lead = graphs.split, 2 if graphs.split else 1

    def chunked(t: Tensor) -> Tensor:  # (n·K, ...) -> (n, K, ...)
        return t.reshape(n, K, *t.shape[1:])

    def whole(t: Tensor) -> Tensor:  # (n, K, ...) -> (n·K, ...)
        return t.reshape(n * K, *t.shape[2:])

    def scan_forward(xs, *rest):
        state, constants = list(rest[:n_state]), list(rest[n_state:len(rest) - masked])
        sequences = [chunked(xs)] + ([chunked(rest[-1])] if masked else [])

        def body(*args):
            carry, x = args[:n_state], args[n_state]
            keep = [args[n_state + 1]] if masked else []
            found = forward(x, *carry, *args[n_state + 1 + masked:], *keep)
            return (*(f[-1].clone() for f in found[:n_state]), *found)

        found = scan_op(body, state, sequences, tuple(constants))
        return tuple(whole(y) for y in found[n_state:])

    def scan_backward(xs, *rest):
        rest = list(rest)
        n_seq = lead + n_state
        sequences, rest = [xs] + rest[:n_seq - 1], rest[n_seq - 1:]
        g_prev, grads, constants = rest[-n_state - 1], rest[-n_state:], rest[:-n_state - 1]
        if masked:
            sequences.append(constants.pop())
        sequences.append(g_prev)
        params = constants[split:]
        # the last chunk first: the sequences reversed chunk by chunk, and the outputs back
        sequences = [chunked(t).flip(0) for t in sequences]

        def body(*args):
            carry, sums = args[:n_state], args[n_state:n_state + n_params]
            seq = args[n_state + n_params:n_state + n_params + len(sequences)]
            found = backward(*seq[:n_seq], *args[n_state + n_params + len(sequences):], *seq[n_seq:-1], seq[-1],
                             *carry)
            return (*(g.clone() for g in found[lead:lead + n_state]),
                    *(a + g for a, g in zip(sums, found[lead + n_state:])), *found[:lead])

        found = scan_op(body, [*grads, *(torch.zeros_like(q) for q in params)], sequences, tuple(constants))
        return (*(whole(y.flip(0)) for y in found[n_state + n_params:]), *found[:n_state + n_params])

    return scan_forward, scan_backward


def _chunk_graphs(cell, graphs: _Graphs, K: int, xw: Tensor, state: list, weight_hh: Tensor, params: list,
                  mask: Tensor | None, compile: bool):
    """(forward, backward): K steps for these shapes in one graph each, traced and compiled on first use."""
    if K in graphs.chunks:
        return graphs.chunks[K]
    with torch.inference_mode(False):  # see _ordinary
        return _trace_chunk(cell, graphs, K, _ordinary(xw[:K]), list(map(_ordinary, state)), weight_hh, params,
                            _ordinary(mask[:K]) if mask is not None else None, compile)


def _trace_chunk(cell, graphs: _Graphs, K: int, xw: Tensor, state: list, weight_hh: Tensor, params: list,
                 mask: Tensor | None, compile: bool):
    """_chunk_graphs' work on a cache miss, from ordinary example tensors."""
    from torch.fx.experimental.proxy_tensor import make_fx

    start = time.perf_counter()
    n_state, masked = len(state), mask is not None
    if K > chunk_steps:
        forward, backward = _scan_functions(graphs, chunk_steps, K // chunk_steps, n_state, len(params), masked)
    else:
        forward, backward = _chunk_functions(graphs, K, n_state, len(params), masked)
    xs = xw[:K].detach().contiguous()
    rest = [s.detach() for s in state] + ([weight_hh.detach()] if graphs.split else []) + \
        [q.detach() for q in params] + ([mask[:K].contiguous()] if masked else [])
    decompositions = _decompositions(compile)
    with torch.no_grad():
        outputs = forward(xs, *rest)
    fields, hws = outputs[:n_state], (outputs[n_state] if graphs.split else None)
    before = [torch.cat([s.detach()[None], f[:-1]]) for s, f in zip(state, fields)]
    backward_inputs = [xs, *([hws] if graphs.split else []), *before, *rest[n_state:],
                       torch.zeros_like(fields[0]), *(torch.ones_like(s) for s in state)]
    fwd = make_fx(forward, decompositions, tracing_mode="fake")(xs, *rest)
    bwd = make_fx(backward, decompositions, tracing_mode="fake")(*backward_inputs)
    graphs.chunks[K] = (_compile(fwd, [xs, *rest], compile), _compile(bwd, backward_inputs, compile))
    if compile:
        _count_compile(f"{type(cell).__name__} B={xw.shape[1]} H={state[0].shape[1]} {str(xw.dtype)[6:]} {K} steps"
                       + (" lengths" if masked else ""), start)
    return graphs.chunks[K]


def _graphs(cell, p: dict, xw: Tensor, state, mask: Tensor | None, compile: bool) -> _Graphs:
    """The graphs of cell for these shapes, built on first use and kept while the cell lives (one per layer)."""
    key = (tuple(xw.shape[1:]), tuple(state.h.shape), xw.dtype, xw.device, mask is not None, compile,
           tuple((n, None if t is None else (tuple(t.shape), t.dtype)) for n, t in p.items()))
    cache = _GRAPHS.setdefault(cell, {})
    if key not in cache:
        if compile and not _due(cell, key):
            return None
        try:
            with torch.inference_mode(False):  # see _ordinary
                cache[key] = _build(cell, p, _ordinary(xw[:1]), type(state)(*map(_ordinary, state)),
                                    _ordinary(mask[:1]) if mask is not None else None, compile)
        except Exception as error:  # noqa: BLE001 - a step that cannot be traced, or a compiler failure
            if compile and _is_compiler_error(error):
                _give_up(error)
                return None
            cache[key] = None  # e.g. Python control flow on tensor values: this cell keeps the readable loop
    return cache[key]


def _ordinary(t: Tensor) -> Tensor:
    """An example input for tracing: a tensor made under torch.inference_mode() copied into an ordinary one (the
    update's derivative is traced by autograd, which inference tensors refuse), others as they are."""
    return t.clone() if t.is_inference() else t


def _due(cell, key) -> bool:
    """Count a call of `cell` with `key`; True from the min_calls-th on."""
    seen = _SEEN.setdefault(cell, {})
    seen[key] = seen.get(key, 0) + 1
    return seen[key] >= min_calls


def _is_compiler_error(error: Exception) -> bool:
    return "inductor" in type(error).__module__ or "Compil" in type(error).__name__ or isinstance(error, OSError)


def _one_thread_if_small(graphs: _Graphs, xw: Tensor, weight_hh: Tensor):
    """:func:`rnnmath.fused.one_thread_if_small` for a loop of these graphs: the step's product h W_hhᵀ, or none
    when the cell keeps W_hh inside its update."""
    if graphs.split:
        return one_thread_if_small(xw.shape[1], *weight_hh.shape)
    return one_thread_if_small(xw.shape[1], xw.shape[2], 0)


class _GenericScan(torch.autograd.Function):
    """The time loop of any cell with the derived update (see the module docstring)."""

    @staticmethod
    def forward(ctx, graphs, chunks, cell, p_template, xw, mask, n_state, weight_hh, *state_and_params):
        T = xw.shape[0]
        # the compiled code assumes the layouts it was traced with: contiguous (expanded or transposed inputs,
        # e.g. the gradient of a sum, would fail its stride checks)
        xw = xw.contiguous()
        state = [s.contiguous() for s in state_and_params[:n_state]]
        params = [q.contiguous() for q in state_and_params[n_state:]]
        B = xw.shape[1]
        segments = _segments(T, chunks)
        onednn = _use_onednn(weight_hh, sum(K == 1 for _, K in segments))  # for both passes' products
        product = _Product(weight_hh, B, onednn) if graphs.split else None  # h W_hhᵀ
        # each field before the first step, then after each (T+1, B, H): the backward pass needs them all, an
        # inference call (ctx: _Inference) only h; written step by step into buffers made once (memory the
        # allocator must find anew at every step is slower to fill)
        training = any(ctx.needs_input_grad)
        fields = [xw.new_empty(T + 1, B, s.shape[1]) for s in (state if training else state[:1])]
        for f, s in zip(fields, state):
            f[0] = s
        hws = xw.new_empty(T, B, weight_hh.shape[0]) if graphs.split and training else None  # (T, B, G)
        with _one_thread_if_small(graphs, xw, weight_hh):
            for t0, K in segments:
                if K > 1:
                    inputs = [xw[t0:t0 + K], *state, *([weight_hh] if graphs.split else []), *params,
                              *([mask[t0:t0 + K]] if mask is not None else [])]
                    found = chunks[K][0](inputs)
                    for f, new in zip(fields, found[:n_state]):
                        f[t0 + 1:t0 + K + 1] = new
                    if hws is not None:
                        hws[t0:t0 + K] = found[n_state]
                    state = [f[-1] for f in found[:n_state]]
                    continue
                inputs = [xw[t0]]
                if graphs.split:
                    inputs.append(product(state[0], out=hws[t0] if hws is not None else None))
                inputs += state + params
                if mask is not None:
                    inputs.append(mask[t0])
                state = [s.contiguous() for s in graphs.forward(inputs)]
                for f, new in zip(fields, state):
                    f[t0 + 1] = new
        ctx.graphs, ctx.chunks, ctx.cell, ctx.p_template = graphs, chunks, cell, p_template
        ctx.n_state, ctx.T, ctx.segments, ctx.onednn = n_state, T, segments, onednn
        if training:
            ctx.save_for_backward(xw, mask, weight_hh, hws, *fields, *params, *state_and_params[:n_state])
        output = fields[0][1:]
        if mask is not None:
            output = output.masked_fill(~mask, 0.0)
        if not training:
            return (output, *state)
        return (output, *(f[-1].clone() for f in fields))

    @staticmethod
    @without_autocast
    def backward(ctx, grad_output, *grad_last):
        graphs, chunks, n_state, T, segments = ctx.graphs, ctx.chunks, ctx.n_state, ctx.T, ctx.segments
        xw, mask, weight_hh, hws, *rest = ctx.saved_tensors
        fields, params, state0 = rest[:n_state], rest[n_state:-n_state], rest[-n_state:]
        if (torch.is_grad_enabled() or torch._C._are_functorch_transforms_active()
                or any(torch._C._functorch.is_legacy_batchedtensor(g) for g in (grad_output, *grad_last))):
            return (None, None, None, None, *_replay_backward(ctx, xw, mask, weight_hh, state0, params,
                                                              (grad_output, *grad_last)))
        if mask is not None:
            grad_output = grad_output.masked_fill(~mask, 0.0)
        grads = [g.contiguous() if g is not None else torch.zeros_like(f[-1]) for g, f in zip(grad_last, fields)]
        grads[0] = grads[0] + grad_output[T - 1]
        # g_prev[t]: what the outputs give h before step t (∂L/∂output_{t-1}; nothing before the first step)
        g_prev = torch.cat([torch.zeros_like(grad_output[:1]), grad_output[:-1]])
        # per step only the compiled call and the product ∂L/∂hw_t W_hh; everything else is gathered after the loop
        # (∂L/∂x and ∂L/∂hw written step by step into buffers made once, as the forward pass's fields)
        dx = xw.new_empty(xw.shape)  # (T, B, G_x)
        dhw = torch.empty_like(hws) if graphs.split else None  # (T, B, G)
        dparams = [[] for _ in params]
        lead = 2 if graphs.split else 1
        params = list(params)
        # ∂L/∂hw W_hh: the product with the matrix W_hhᵀ (H, G)
        product = _Product(weight_hh.t(), xw.shape[1], ctx.onednn) if graphs.split else None
        with _one_thread_if_small(graphs, xw, weight_hh):
            for t0, K in reversed(segments):
                if K > 1:
                    span = slice(t0, t0 + K)
                    found = chunks[K][1]([xw[span], *([hws[span]] if graphs.split else []), *(f[span] for f in fields),
                                      *([weight_hh] if graphs.split else []), *params,
                                      *([mask[span]] if mask is not None else []), g_prev[span], *grads])
                    dx[span] = found[0]
                    if graphs.split:
                        dhw[span] = found[1]
                    grads = list(found[lead:lead + n_state])
                    for acc, g in zip(dparams, found[lead + n_state:]):
                        acc.append(g)
                    continue
                t = t0
                inputs = [xw[t]] + ([hws[t]] if graphs.split else []) + [f[t] for f in fields] + params
                if mask is not None:
                    inputs.append(mask[t])
                found = graphs.backward(inputs + grads)
                dx[t] = found[0]
                for acc, g in zip(dparams, found[lead + n_state:lead + n_state + len(params)]):
                    if g is not None:
                        acc.append(g)
                dstate = [g if g is not None else torch.zeros_like(f[t])
                          for g, f in zip(found[lead:lead + n_state], fields)]
                direct = found[lead]  # ∂L/∂h_{t-1} other than through hw (None when h enters only the product)
                if graphs.split:
                    dhw[t] = found[1]
                    carried = g_prev[t] if t > 0 else None
                    if direct is not None:
                        carried = direct if carried is None else carried + direct
                    # ∂L/∂h_{t-1} through hw = h W_hhᵀ
                    dstate[0] = product(found[1], add=carried)
                elif t > 0:
                    dstate[0] = dstate[0] + g_prev[t]
                grads = [g.contiguous() for g in dstate]
        dparams = [torch.stack(g).sum(0) if g else torch.zeros_like(q) for g, q in zip(dparams, params)]
        dW = None
        if graphs.split and ctx.needs_input_grad[7]:
            G, H = dhw.shape[2], fields[0].shape[2]
            dW = matmul(dhw.reshape(-1, G).t(), fields[0][:-1].reshape(-1, H))  # (G, H): one product
        return (None, None, None, None, dx, None, None, dW, *grads, *dparams)


def chunk_sizes(T: int, scan: bool = False) -> list[int]:
    """The steps of each call for a sequence of T steps with chunks (:data:`chunk_steps` = K): K while K steps
    are left, then halves of K (K // 2, K // 4, ... down to 2) where they fit, then single steps — for K = 8
    and T = 30: 8, 8, 8, 4, 2. At most one chunk of each smaller size, so at most log2 K graphs per shape. A
    sequence shorter than K runs one step a call. With ``scan`` (:data:`scan_max_batch`), the n = T // K whole
    chunks are split as n's binary digits, and each power of two of at least :data:`scan_min_chunks` chunks is
    one call (a scan): K = 8, T = 100: 64, 32, 4; T = 30: 8, 8, 8, 4, 2 (3 chunks, fewer than 4)."""
    K = chunk_steps
    if not 1 < K <= T:
        return [1] * T
    n, sizes = T // K, []
    for i in reversed(range(n.bit_length())):
        if n >> i & 1:
            sizes += [K << i] if scan and 1 << i >= max(scan_min_chunks, 2) else [K] * (1 << i)
    left, size = T - sum(sizes), K // 2
    while size >= 2:
        if left >= size:
            sizes.append(size)
            left -= size
        size //= 2
    return sizes + [1] * left


def _segments(T: int, chunks: dict | None) -> list[tuple[int, int]]:
    """(first step, steps) of each call: :func:`chunk_sizes` with chunks (scans where chunks has them), else single
    steps."""
    sizes = chunk_sizes(T, any(K > chunk_steps for K in chunks)) if chunks else [1] * T
    starts = [0]
    for K in sizes[:-1]:
        starts.append(starts[-1] + K)
    return list(zip(starts, sizes))


def _mkl_tuned_for_this_cpu() -> bool:
    """Whether the CPU is Intel's (``vendor_id`` in /proc/cpuinfo; False where that cannot be read): ATen's
    float32 ``mm`` on x86 is MKL's, whose fast code paths are Intel's. Measured: on an AMD EPYC oneDNN's product
    was up to 2.4 times as fast as ATen's; on an Intel Xeon (AVX-512) within 15 % either way (B = 32, H = 256:
    158 against 128 µs; B = 64, H = 1024: 4.2 against 4.5 ms) and the layers faster without it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return any(line.startswith("vendor_id") and "GenuineIntel" in line for line in f)
    except OSError:
        return False


_ONEDNN_PAYS_HERE = not _mkl_tuned_for_this_cpu()

onednn_min_hidden: int = 256 if _ONEDNN_PAYS_HERE else 0
"""A call with at least :data:`onednn_min_steps` single steps (not chunks), float32, and H (W_hh's columns) at
least this runs their recurrent products ``h W_hhᵀ`` and ``∂L/∂hw W_hh`` through oneDNN's matrix product on
W_hh reordered once per call into its own layout, as torch.nn.LSTM's oneDNN kernel does, instead of ATen's mm
(MKL). 0 turns it off; the default is 256 on CPUs other than Intel's and 0 on Intel's
(:func:`_mkl_tuned_for_this_cpu`). On an AMD EPYC, 1 thread, one product at B = 64: 5.4 against 7.2 ms at
H = 1024, 0.33 against 0.38 ms at H = 256, but 32 against 25 µs at H = 64; the reordering costs about one
product (4.8 ms at H = 1024, B = 64; 0.6 ms at H = 64, B = 1). On an Intel Xeon, rnnmath / torch.nn.LSTM with
and without it (peephole LSTM, H = 256, T = 30, B = 32, alternating order): training 1.64 against 1.39 (1
thread), 1.92 against 1.54 (2 threads); inference 1.95 against 1.52 and 1.84 against 1.59 (without it the
steps also run in chunks, :data:`chunk_max_batch_onednn`)."""

onednn_min_steps: int = 16
"""See :data:`onednn_min_hidden`: fewer single steps than this do not repay reordering W_hh."""


def _use_onednn(weight_hh: Tensor, steps: int) -> bool:
    return (weight_hh.dtype == torch.float32 and weight_hh.shape[1] >= onednn_min_hidden > 0
            and steps >= onednn_min_steps and torch.backends.mkldnn.is_available())


class _Product:
    """x ↦ x Mᵀ for a fixed matrix M (N, K): with ``onednn``, oneDNN's product on M reordered once for batch
    size B; else ATen's mm (``out`` then receives it)."""

    def __init__(self, matrix: Tensor, batch: int, onednn: bool) -> None:
        self.matrix = matrix
        self.packed = torch.ops.mkldnn._reorder_linear_weight(matrix.contiguous(), batch) if onednn else None

    def __call__(self, x: Tensor, add: Tensor | None = None, out: Tensor | None = None) -> Tensor:
        if self.packed is None:
            if add is not None:
                return torch.addmm(add, x, self.matrix.t())
            return torch.mm(x, self.matrix.t(), out=out)
        y = torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [None], "")
        if add is not None:
            y += add
        if out is not None:
            out.copy_(y)
        return y


onednn_min_work: int = 1 << 21 if _ONEDNN_PAYS_HERE else 0
"""The products over all steps — ∂L/∂W_hh = Σ_t ∂L/∂hw_tᵀ h_{t-1}, and a plain input projection x W_ihᵀ + b_ih with
its two gradient products — run through oneDNN's matrix product (:func:`matmul`) where they are float32 and at
least this many multiply-adds; 0 turns it off (the default on Intel's CPUs, as :data:`onednn_min_hidden`). On an
AMD EPYC (where ATen's float32 ``mm`` is MKL's)
oneDNN's was 1.2-2.4 times as fast from about 2^21 multiply-adds on (∂L/∂W_hh at T·B = 1920, G = 1024, H = 256,
1 thread: 4.3 against 10.4 ms; the projection at I = 128: 2.3 against 4.9 ms) and slower below (T·B = 30,
G = 256, H = 64: 22 against 12 µs)."""


def _onednn_pays(a: Tensor, b: Tensor) -> bool:
    """Whether a @ b (a (M, K), b (K, N)) should run through oneDNN (:data:`onednn_min_work`)."""
    return (a.dtype == b.dtype == torch.float32 and a.device.type == "cpu" and onednn_min_work > 0
            and a.shape[0] * a.shape[1] * b.shape[1] >= onednn_min_work and torch.backends.mkldnn.is_available())


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for matrices a (M, K) and b (K, N), either contiguous or transposed: ``torch.mm``, or oneDNN's product
    where that pays (:data:`onednn_min_work`). Not recorded by autograd."""
    if not _onednn_pays(a, b):
        return torch.mm(a, b)
    linear = torch.ops.mkldnn._linear_pointwise  # (src, weight) -> src weightᵀ; src is copied when not contiguous
    if a.is_contiguous():
        return linear(a, b.t(), None, "none", [None], "")
    # a transposed (a Σ_t product such as ∂L/∂hwᵀ h): as the weight, oneDNN's reorder reads it in place, and
    # a b = (bᵀ aᵀ)ᵀ. ∂L/∂W_hh at T·B = 1920, G = 1024, H = 256: 4.7 against 6.1 ms with a as the source
    return linear(b.t(), a, None, "none", [None], "").t()


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x Wᵀ + b (x (..., I), W (G, I), b (G) or None), through oneDNN where that pays (:func:`_onednn_pays`)."""
    x2 = x.reshape(-1, x.shape[-1])  # (N, I)
    if _onednn_pays(x2, weight.t()):
        y = torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [None], "")
    else:
        y = F.linear(x2, weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


class _Linear(torch.autograd.Function):
    """x Wᵀ + b (x (..., I), W (G, I), b (G) or None) with the three products through :func:`matmul`. A backward
    pass that is itself recorded (``create_graph=True``) uses ATen's differentiable products instead."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _linear(x, weight, bias)

    @staticmethod
    @without_autocast
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        x2, g2 = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])  # (N, I), (N, G)
        mm = torch.mm if torch.is_grad_enabled() else matmul
        dx = mm(g2, weight).view(x.shape) if ctx.needs_input_grad[0] else None
        dw = mm(g2.t(), x2) if ctx.needs_input_grad[1] else None
        db = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def _replay_backward(ctx, xw, mask, weight_hh, state0, params, grads) -> list:
    """Gradients of (xw, mask, n_state, W_hh, *state, *params) by differentiating the readable loop replayed
    from the saved inputs; recorded when the backward pass is (create_graph=True), so they are differentiable."""
    from .layers import scan  # the readable loop; imported here because layers imports this module

    graphs, n_state = ctx.graphs, ctx.n_state
    create_graph = torch.is_grad_enabled()
    inputs = [xw, weight_hh, *state0, *params]
    needs = [ctx.needs_input_grad[4], ctx.needs_input_grad[7], *ctx.needs_input_grad[8:]]
    with torch.enable_grad():
        if not create_graph:
            inputs = [t.detach().requires_grad_(n) for t, n in zip(inputs, needs)]
        xw_, w, *rest = inputs
        p = dict(ctx.p_template)
        p.update(zip(graphs.names, rest[n_state:]))
        if graphs.split:
            p["weight_hh"] = w
        output, last = scan(ctx.cell, p, xw_, ctx.cell.State(*rest[:n_state]), mask)
        wrt = [t for t, n in zip(inputs, needs) if n]
        found = iter(torch.autograd.grad([output, *last], wrt, grads, create_graph=create_graph,
                                         allow_unused=True, materialize_grads=True))
    dxw, dw, *drest = [next(found) if n else None for n in needs]
    return [dxw, None, None, dw, *drest]


HAND_WRITTEN_FASTER: tuple[type, ...] = (RNNCell, GRUCell)
"""Cells whose hand-written ``fast_scan`` measured at least as fast as the generic path on the CPU (``rnnmath
bench``, 1 thread, H=256 T=30 B=64, training: Elman RNN 0.85 against 1.13 × torch.nn.RNN, GRU 0.88 both): they
keep it and never pay compilation (the demo's GRU: 165 s without, 318 s with it on the loaded machine). The
exact class only; a subclass with its own ``step`` gets the generic path."""


def chosen_for(cell) -> bool:
    """Whether the layer should run this cell through the generic path (when :func:`supported`)."""
    return type(cell) not in HAND_WRITTEN_FASTER


def supported(xw: Tensor) -> bool:
    """Whether the compiled generic path may run now: compilation on, a CPU tensor, and no mode it cannot serve."""
    return (enabled and xw.device.type == "cpu" and xw.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled(xw.device.type)
            and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active()
            and torch.autograd.forward_ad._current_level < 0)  # no forward-mode AD level entered


def generic_scan(cell, p: dict, xw: Tensor, state, mask: Tensor | None, *, compile: bool = True):
    """Any cell's time loop through the split, derived and compiled update; same contract as ``layers.scan``.

    xw (T, B, G) are the input projections, state the cell's State of (B, H) fields, mask (T, B, 1) or None.
    Returns the outputs h_t (T, B, H), zero past each length, and the last state. ``compile=False`` runs the
    traced graphs without compiling them (the same derivation; the tests use it for every cell).
    """
    T = xw.shape[0]
    if T == 0:
        return xw.new_zeros(0, xw.shape[1], cell.hidden_size), state
    graphs = _graphs(cell, p, xw, state, mask, compile)
    if graphs is None:  # not yet due, cannot be traced, or the compiler failed: the cell's other paths
        from .layers import scan

        fast_scan = getattr(cell, "fast_scan", None)
        return fast_scan(p, xw, state, mask) if fast_scan is not None else scan(cell, p, xw, state, mask)
    weight_hh = p["weight_hh"] if graphs.split else xw.new_zeros(0, 0)
    params = [p[n] for n in graphs.names]
    template = {n: t for n, t in p.items() if not isinstance(t, Tensor)}
    chunks = None
    if T >= chunk_steps > 1 and _chunks_pay(p, xw.shape[1]):
        chunks = _all_chunk_graphs(cell, graphs, xw, list(state), weight_hh, params, mask, compile)
    args = (graphs, chunks, cell, template, xw, mask, len(state), weight_hh, *state, *params)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (xw, weight_hh, *state, *params)):
        output, *last = _GenericScan.apply(*args)
    else:  # nothing to differentiate (torch.no_grad(), inference): the forward pass alone, keeping only h
        output, *last = _GenericScan.forward(_Inference(), *args)
    return output, type(state)(*last)


def _all_chunk_graphs(cell, graphs: _Graphs, xw: Tensor, state: list, weight_hh: Tensor, params: list,
                      mask: Tensor | None, compile: bool) -> dict:
    """K -> (forward, backward) for every chunk size of :func:`chunk_sizes` at xw's length, with scans where they
    pay (:data:`scan_max_batch`, and the cell's ``chunk_scans``). If a scan cannot be traced or compiled, a
    warning says so once and the loop runs chunks as before (``scan_max_batch`` is set to 0)."""
    global scan_max_batch

    def build(scan: bool) -> dict:
        return {K: _chunk_graphs(cell, graphs, K, xw, state, weight_hh, params, mask, compile)
                for K in set(chunk_sizes(xw.shape[0], scan)) - {1}}

    if xw.shape[1] <= scan_max_batch and cell.chunk_scans:
        try:
            return build(scan=True)
        except Exception as error:  # noqa: BLE001 - torch's scan operator is young: chunks do without it
            warnings.warn(f"rnnmath: scans of chunks are switched off for this process ({type(error).__name__}: "
                          f"{error}); the loop runs one chunk a call", stacklevel=3)
            scan_max_batch = 0
    return build(scan=False)


class _Inference:
    """The ctx of a :class:`_GenericScan` forward pass that autograd does not record: no input needs a gradient
    (autograd.Function's own ctx says they do under torch.no_grad() whenever they require one)."""

    needs_input_grad: tuple = ()

    def save_for_backward(self, *tensors) -> None:
        pass


def project(cell, p: dict, x: Tensor) -> Tensor:
    """cell.project(p, x) for all steps, compiled once for every T and B (dynamic shapes) when the cell overrides
    the plain ``x W_ihᵀ + b_ih`` (LayerNorm-LSTM normalises it); token ids always run eagerly (their check)."""
    if not x.is_floating_point():
        return cell.project(p, x)
    if type(cell).project is Cell.project:  # x W_ihᵀ + b_ih, its products through oneDNN where that pays
        operands = (x, p["weight_ih"], p.get("bias_ih"))
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in operands):
            return _Linear.apply(*operands)
        return _linear(*operands)  # inference: without autograd.Function's bookkeeping (about 15 µs a call)
    fn = _PROJECTS.get(cell)
    first = fn is None
    if first:
        if not _due(cell, "project"):
            return cell.project(p, x)
        global _compiled_project
        if _compiled_project is None:
            _compiled_project = torch.compile(_project_of, dynamic=True, fullgraph=True)
        fn = _PROJECTS[cell] = _compiled_project
    if fn is _EAGER:
        return cell.project(p, x)
    start = time.perf_counter()
    try:
        # compiles on first use, and again where its guards ask (grad mode, threads, dtype, the parameters' sizes:
        # symbolic ones made LayerNorm-LSTM inference 2.1 -> 2.7 x torch.nn.LSTM at H = 64, B = 32), so allow
        # more variants than torch.compile's default 8 (a sweep of layer sizes in one process)
        with torch._dynamo.config.patch(recompile_limit=project_variants):
            xw = fn(cell, p, x)
    except Exception as error:  # noqa: BLE001
        if _is_compiler_error(error):  # no working compiler: the steps would fail as well
            _give_up(error)
        # e.g. torch.compile's recompile limit (8 variants of this code: reached with many such layers): this
        # layer's projection runs eagerly from now on, and nothing else changes
        _PROJECTS[cell] = _EAGER
        return cell.project(p, x)
    if first:
        _count_compile(f"{type(cell).__name__} project", start)
    return xw


_EAGER = object()  # in _PROJECTS: this cell's projection could not be compiled and runs eagerly


def _project_of(cell, p: dict, x: Tensor) -> Tensor:
    return cell.project(p, x)


# torch.compile(_project_of), made on first use: ONE compiled function for every cell, the cell an argument, so
# that layers of one class, size and dtype share its code (its guards check the cell's class and the attributes
# it reads, not its identity). Each other size, dtype or grad mode is a variant of that one code object: a
# sweep of LayerNorm-LSTM stacks in one process ran past torch.compile's default limit of 8 (an outside
# tester's finding: eight warnings, then eager projections), hence project_variants
_compiled_project = None

project_variants: int = 64
"""torch.compile's recompile limit for the compiled projection: shapes, dtypes and grad modes it keeps code
for; past it a layer's projection runs eagerly."""


def _give_up(error: Exception) -> None:
    """Compilation failed: warn once and switch it off for this process (the layers then use their other paths)."""
    global enabled
    enabled = False
    warnings.warn(f"rnnmath: compiling the generic fast path failed ({type(error).__name__}: {error}); "
                  "using the readable loop instead (set RNNMATH_COMPILE=0 to skip the attempt)", stacklevel=3)
