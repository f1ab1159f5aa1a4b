"""The generic fast path (rnnmath.compiled) against the readable loop it replaces, for every cell.

The readable loop (``layers.scan`` calling ``cell.step``) is the specification. The generic path splits the
step, traces it and differentiates it by autograd; with ``compile=False`` it runs the traced graphs as they are,
which checks that derivation for every cell, in float64 to 1e-12 and float32 to 1e-6 (relative to each
tensor's scale), with lengths (zero included) and a given initial state. Compilation itself (inductor) takes
seconds per cell on 2 busy cores, so only a few small tests compile (float32 and float64, lengths, a doc cell).
"""

from __future__ import annotations

import pytest
import torch

import rnnmath
from rnnmath import compiled, layers
from rnnmath.cells import CELLS

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6}


def run_path(cell, p, xw, state, mask, generic: bool, compile: bool = False):
    """Forward and backward through one path; returns the outputs and the gradients of xw, state and p."""
    leaves = [xw, *state, *(t for t in p.values() if t is not None)]
    for t in leaves:
        t.grad = None
    if generic:
        output, last = compiled.generic_scan(cell, p, xw, state, mask, compile=compile)
    else:
        output, last = layers.scan(cell, p, xw, state, mask)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(v.shape, generator=g, dtype=v.dtype) for v in (output, *last)]
    loss = sum((v * w).sum() for v, w in zip((output, *last), weights))
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [output.detach(), *(s.detach() for s in last)], [gr for gr in grads if gr is not None]


def assert_close_scaled(got, want, dtype):
    for a, b in zip(got, want, strict=True):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * scale)


def as_float64(cell, p, xw, state):
    """The same case in float64 (an oracle for float32 runs): leaves that require gradients again."""
    copy = lambda t: t if t is None else t.detach().double().requires_grad_(t.requires_grad)  # noqa: E731
    return (cell, {n: copy(t) if isinstance(t, torch.Tensor) else t for n, t in p.items()}, copy(xw),
            type(state)(*(copy(s) for s in state)))


def assert_as_exact_as(got, want, exact, factor=3.0):
    """float32 results `got` at most `factor` times as far from the float64 `exact` as the readable loop's `want`
    (relative to each tensor's largest magnitude), values and gradients."""
    for a, b, e in zip([*got[0], *got[1]], [*want[0], *want[1]], [*exact[0], *exact[1]], strict=True):
        scale = e.abs().max().clamp(min=1.0)
        error_got, error_want = (a.double() - e).abs().max() / scale, (b.double() - e).abs().max() / scale
        assert error_got <= factor * error_want + 1e-7, (error_got, error_want)


def case(cell_class, dtype, hidden=5, batch=4, steps=7, seed=0, **kwargs):
    """A one-layer cell with its parameters, input projections (T, B, G) and a random initial state."""
    torch.manual_seed(seed)
    layer = layers.Recurrent(cell_class, 6, hidden, dtype=dtype, **kwargs)
    cell, p = layer.cells[0], layer.layer_params(0, 0)
    x = torch.randn(steps, batch, 6, dtype=dtype)
    xw = cell.project(p, x).detach().requires_grad_()  # (T, B, G)
    state = cell.State(*(torch.randn(batch, hidden, dtype=dtype, requires_grad=True) for _ in cell.State._fields))
    return cell, p, xw, state


# T = 7: one step a call; a chunk of 4, then 2 (a half chunk) and a step
@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(CELLS) + ["rnn_relu"])
def test_generic_path_equals_readable_loop_for_every_cell(name, dtype, chunk, monkeypatch):
    monkeypatch.setattr(compiled, "chunk_steps", chunk)
    cell_class, kwargs = (CELLS["rnn"], {"nonlinearity": "relu"}) if name == "rnn_relu" else (CELLS[name], {})
    for hidden, bias in ((5, True), (20, False)):
        cell, p, xw, state = case(cell_class, dtype, hidden=hidden, bias=bias, **kwargs)
        lengths = torch.tensor([7, 0, 3, 1])  # a zero length returns the initial state
        for mask in (None, (torch.arange(7).unsqueeze(1) < lengths).unsqueeze(2)):
            got = run_path(cell, p, xw, state, mask, generic=True)
            want = run_path(cell, p, xw, state, mask, generic=False)
            assert_close_scaled(got[0], want[0], dtype)
            assert_close_scaled(got[1], want[1], dtype)


# T = 11, chunks of 2, scans of at least 2 chunks: a scan of 4 chunks (8 steps), a chunk and a step
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(CELLS))
def test_scans_of_chunks_equal_readable_loop_for_every_cell(name, dtype, monkeypatch):
    monkeypatch.setattr(compiled, "chunk_steps", 2)
    monkeypatch.setattr(compiled, "scan_min_chunks", 2)
    monkeypatch.setattr(compiled, "scan_max_batch", 3)
    assert compiled.chunk_sizes(11, scan=True) == [8, 2, 1]
    cell, p, xw, state = case(CELLS[name], dtype, batch=3, steps=11)
    for mask in (None, (torch.arange(11).unsqueeze(1) < torch.tensor([11, 0, 6])).unsqueeze(2)):
        got = run_path(cell, p, xw, state, mask, generic=True)
        want = run_path(cell, p, xw, state, mask, generic=False)
        if name == "layernorm_lstm" and dtype == torch.float32:  # see the float32 LayerNorm-LSTM test below
            exact = run_path(*as_float64(cell, p, xw, state), mask, generic=False)
            assert_as_exact_as(got, want, exact)
            continue
        assert_close_scaled(got[0], want[0], dtype)
        assert_close_scaled(got[1], want[1], dtype)
    # the scans ran, but for minLSTM, which keeps its chunks (chunk_scans, measured)
    assert all((8 in graphs.chunks) == (name != "minlstm") for graphs in compiled._GRAPHS[cell].values())


def test_a_scan_that_cannot_be_built_leaves_the_chunks(monkeypatch):
    """If torch's scan operator fails (tracing or compiling), one warning, and the loop runs chunks as before."""
    monkeypatch.setattr(compiled, "chunk_steps", 2)
    monkeypatch.setattr(compiled, "scan_min_chunks", 2)
    monkeypatch.setattr(compiled, "scan_max_batch", 3)

    def broken(*args):
        raise RuntimeError("no scan here")

    monkeypatch.setattr(compiled, "_scan_functions", broken)
    cell, p, xw, state = case(CELLS["peephole_lstm"], torch.float64, batch=3, steps=11)
    with pytest.warns(UserWarning, match="scans of chunks are switched off.*no scan here"):
        got = run_path(cell, p, xw, state, None, generic=True)
    assert compiled.scan_max_batch == 0
    want = run_path(cell, p, xw, state, None, generic=False)
    assert_close_scaled(got[0], want[0], torch.float64)
    assert_close_scaled(got[1], want[1], torch.float64)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("name", ["peephole_lstm", "gru", "layernorm_lstm"])
def test_onednn_recurrent_products_equal_the_readable_loop(name, monkeypatch):
    """The products h W_hhᵀ and ∂L/∂hw W_hh through oneDNN (float32, H >= onednn_min_hidden), lengths included."""
    monkeypatch.setattr(compiled, "onednn_min_hidden", 1)
    monkeypatch.setattr(compiled, "onednn_min_steps", 7)
    cell, p, xw, state = case(CELLS[name], torch.float32, hidden=20)  # T = 7 single steps
    assert compiled._use_onednn(p["weight_hh"], 7) and not compiled._use_onednn(p["weight_hh"], 6)
    mask = (torch.arange(7).unsqueeze(1) < torch.tensor([7, 0, 3, 1])).unsqueeze(2)
    got = run_path(cell, p, xw, state, mask, generic=True)
    want = run_path(cell, p, xw, state, mask, generic=False)
    assert_close_scaled(got[0], want[0], torch.float32)
    assert_close_scaled(got[1], want[1], torch.float32)
    assert not compiled._use_onednn(p["weight_hh"].double(), 7)  # float64 never takes it
    monkeypatch.setattr(compiled, "onednn_min_hidden", 0)  # 0 turns it off
    assert not compiled._use_onednn(p["weight_hh"], 7)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_onednn_products_over_all_steps_equal_float64(monkeypatch):
    """∂L/∂W_hh and the input projection with its gradients through oneDNN (matmul, _Linear) against float64."""
    monkeypatch.setattr(compiled, "onednn_min_work", 1)
    g = torch.Generator().manual_seed(0)
    for a, b in ((torch.randn(30, 20, generator=g), torch.randn(20, 9, generator=g)),  # a contiguous
                 (torch.randn(20, 30, generator=g).t(), torch.randn(20, 9, generator=g))):  # a transposed (Σ_t)
        assert compiled._onednn_pays(a, b)
        torch.testing.assert_close(compiled.matmul(a, b), (a.double() @ b.double()).float(), rtol=1e-6, atol=1e-5)
    x = torch.randn(7, 4, 6, generator=g).transpose(0, 1).requires_grad_()  # not contiguous, as batch_first
    w, bias = torch.randn(12, 6, generator=g, requires_grad=True), torch.randn(12, generator=g, requires_grad=True)
    y = compiled._Linear.apply(x, w, bias)
    weights = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad((y * weights).sum(), (x, w, bias))
    leaves = [t.detach().double().requires_grad_() for t in (x, w, bias)]
    want = torch.nn.functional.linear(*leaves)
    want = [want, *torch.autograd.grad((want * weights.double()).sum(), leaves)]
    assert_close_scaled([y, *grads], [t.float() for t in want], torch.float32)
    second = torch.autograd.grad(compiled._Linear.apply(x, w, None).square().sum(), w, create_graph=True)[0]
    assert second.requires_grad  # a recorded backward pass (double backward) takes ATen's products
    assert not compiled._onednn_pays(a.double(), b.double())  # float64 never takes it
    monkeypatch.setattr(compiled, "onednn_min_work", 0)  # 0 turns it off
    assert not compiled._onednn_pays(a, b)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("chunk", [1, 4])
def test_generic_path_with_onednn_weight_gradient_equals_readable_loop(chunk, monkeypatch):
    monkeypatch.setattr(compiled, "onednn_min_work", 1)
    monkeypatch.setattr(compiled, "chunk_steps", chunk)
    cell, p, xw, state = case(CELLS["peephole_lstm"], torch.float32, hidden=20)
    mask = (torch.arange(7).unsqueeze(1) < torch.tensor([7, 0, 3, 1])).unsqueeze(2)
    got = run_path(cell, p, xw, state, mask, generic=True)
    want = run_path(cell, p, xw, state, mask, generic=False)
    assert_close_scaled(got[0], want[0], torch.float32)
    assert_close_scaled(got[1], want[1], torch.float32)


def test_compiled_tanh_is_within_2e_7_of_torch_tanh():
    """The tanh traced for inductor (float32): series near 0, exp-based beyond; special values as torch.tanh."""
    x = torch.cat([torch.logspace(-38, 2, 100_000), torch.linspace(0.3, 0.5, 20_001), torch.randn(50_000) * 3])
    x = torch.cat([x, -x])
    want = torch.tanh(x.double())
    got = compiled._tanh(x)
    assert got.dtype == torch.float32
    assert ((got.double() - want).abs() / want.abs()).max() < 2e-7
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-45, 9.0, -9.0, 100.0, float("nan")])
    torch.testing.assert_close(compiled._tanh(special), torch.tanh(special), equal_nan=True, rtol=0, atol=0)
    assert torch.signbit(compiled._tanh(torch.tensor(-0.0)))
    assert compiled._tanh(x.double()) is NotImplemented  # float64 keeps tanh
    fused = torch.compile(compiled._tanh)(x)  # as inductor compiles it
    assert ((fused.double() - want).abs() / want.abs()).max() < 2e-7
    table = compiled._decompositions(True)
    assert table[torch.ops.aten.tanh.default] is compiled._tanh
    assert compiled._decompositions(False) is None


def test_split_finds_the_recurrent_product_in_every_spelling():
    """addmm(·, h, W.t()) (LSTM), F.linear(h, W, b) (GRU, peephole), F.linear(h, W) (LayerNorm-LSTM): W_hh
    leaves the traced update, whose gradient is then one product after the loop; IndRNN's vector u stays in."""
    for name, split in (("lstm", True), ("gru", True), ("peephole_lstm", True), ("layernorm_lstm", True),
                        ("indrnn", False), ("mingru", False)):
        cell, p, xw, state = case(CELLS[name], torch.float64)
        graphs = compiled._graphs(cell, p, xw, state, None, compile=False)
        assert graphs.split is split, name
        assert ("weight_hh" in graphs.names) is (name == "indrnn"), name
        assert "weight_ih" not in graphs.names  # used by project only, so not an input of the step


class TwiceProduct(rnnmath.cells.Cell):
    """A cell that uses h W_hhᵀ twice and W_hh once more alone: not splittable, W_hh stays in the update."""

    def step(self, p, x, state):
        hw = torch.nn.functional.linear(state.h, p["weight_hh"])
        return rnnmath.cells.HiddenState(torch.tanh(x + hw + 0.1 * hw * p["weight_hh"].sum()))


def test_unsplittable_cell_keeps_w_hh_in_the_update():
    cell, p, xw, state = case(TwiceProduct, torch.float64)
    assert not compiled._graphs(cell, p, xw, state, None, compile=False).split
    got = run_path(cell, p, xw, state, None, generic=True)
    want = run_path(cell, p, xw, state, None, generic=False)
    assert_close_scaled(got[0], want[0], torch.float64)
    assert_close_scaled(got[1], want[1], torch.float64)


class ValueBranch(rnnmath.cells.Cell):
    """Python control flow on a tensor's value: cannot be traced, so the readable loop must run."""

    def step(self, p, x, state):
        h = torch.nn.functional.linear(state.h, p["weight_hh"]) + x
        return rnnmath.cells.HiddenState(torch.tanh(h) if h.sum() > 0 else torch.sigmoid(h))


def test_untraceable_cell_falls_back_to_the_readable_loop():
    cell, p, xw, state = case(ValueBranch, torch.float64)
    assert compiled._graphs(cell, p, xw, state, None, compile=False) is None
    got = run_path(cell, p, xw, state, None, generic=True)
    want = run_path(cell, p, xw, state, None, generic=False)
    assert_close_scaled(got[0], want[0], torch.float64)


@pytest.mark.parametrize("chunk", [1, 3])
def test_double_backward_replays_the_readable_loop(chunk, monkeypatch):
    monkeypatch.setattr(compiled, "chunk_steps", chunk)
    cell, p, xw, state = case(CELLS["layernorm_lstm"], torch.float64, steps=4)
    inputs = [xw, *state]
    out = {}
    for generic in (True, False):
        if generic:
            output, last = compiled.generic_scan(cell, p, xw, state, None, compile=False)
        else:
            output, last = layers.scan(cell, p, xw, state, None)
        grads = torch.autograd.grad(output.square().sum() + last.c.sum(), inputs, create_graph=True)
        penalty = sum(g.square().sum() for g in grads)
        out[generic] = torch.autograd.grad(penalty, [p["weight_hh"], p["gain_c"], xw])
    assert_close_scaled(out[True], out[False], torch.float64)


def test_compile_switch_and_unsupported_modes_use_other_paths(monkeypatch):
    """Compilation off (RNNMATH_COMPILE=0, as in this suite), forward-mode AD, autocast: supported() says no."""
    x = torch.randn(3, 2, 4)
    monkeypatch.setattr(compiled, "enabled", False)
    assert not compiled.supported(x)
    monkeypatch.setattr(compiled, "enabled", True)
    assert compiled.supported(x)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        assert not compiled.supported(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not compiled.supported(x)
    assert not compiled.supported(x.to("meta"))  # only measured on the CPU


# -- compiled (inductor): few and small, seconds each on 2 cores ------------------------------------------------
# T = 5: one step a call; chunks of 2 and a step; a scan of 2 chunks and a step
@pytest.mark.parametrize(("chunk", "scan"), [(8, False), (2, False), (2, True)])
def test_compiled_layer_equals_readable_layer(monkeypatch, chunk, scan):
    """A bidirectional LayerNorm-LSTM layer with lengths: the compiled step and the compiled projection
    against the readable loop, values and gradients, float32; compiled on the second call of the layer
    (min_calls = 3: each call runs the cell twice, once per direction)."""
    monkeypatch.setattr(compiled, "enabled", True)
    monkeypatch.setattr(compiled, "min_calls", 3)
    monkeypatch.setattr(compiled, "chunk_steps", chunk)
    monkeypatch.setattr(compiled, "scan_max_batch", 2 if scan else 0)
    monkeypatch.setattr(compiled, "scan_min_chunks", 2)
    monkeypatch.setattr(compiled, "COMPILE_SECONDS", {})
    monkeypatch.setattr(compiled, "onednn_min_hidden", 1)  # the single steps' products through oneDNN
    monkeypatch.setattr(compiled, "onednn_min_steps", 1)
    torch.manual_seed(0)
    dtype = torch.float32
    layer = rnnmath.Recurrent(CELLS["layernorm_lstm"], 3, 4, bidirectional=True, dtype=dtype)
    x = torch.randn(5, 2, 3, dtype=dtype, requires_grad=True)
    lengths = torch.tensor([5, 2])
    results = {}
    layer(x, lengths=lengths)  # the first call: not yet compiled
    assert "LayerNormLSTMCell project" not in compiled.COMPILE_SECONDS
    step_key = "LayerNormLSTMCell B=2 H=4 float32 lengths"
    assert step_key not in compiled.COMPILE_SECONDS
    for fast in (True, False):
        layer.fast = fast
        layer.zero_grad(set_to_none=True)
        output, (h_n, c_n) = layer(x, lengths=lengths)
        loss = output.square().sum() + h_n.sum() + c_n.sum()
        results[fast] = [output.detach(), h_n.detach(), c_n.detach(),
                         *torch.autograd.grad(loss, [x, *layer.parameters()])]
    assert_close_scaled(results[True], results[False], dtype)
    assert step_key in compiled.COMPILE_SECONDS
    assert ("LayerNormLSTMCell B=2 H=4 float32 2 steps lengths" in compiled.COMPILE_SECONDS) == (chunk == 2
                                                                                                and not scan)
    assert ("LayerNormLSTMCell B=2 H=4 float32 4 steps lengths" in compiled.COMPILE_SECONDS) == scan
    assert "LayerNormLSTMCell project" in compiled.COMPILE_SECONDS
    copy = __import__("copy").deepcopy(layer)  # the compiled code stays outside the layer: copies start afresh
    copy.fast = True
    torch.testing.assert_close(copy(x, lengths=lengths)[0], results[True][0])


def test_float32_layernorm_lstm_is_as_exact_as_its_readable_loop(monkeypatch):
    """At H = 256 a float32 LayerNorm-LSTM's compiled path and readable loop differ by about 1e-5 of a tensor's
    scale (an outside tester's finding), because each is about 5e-6 from the exact result: the normalisation
    divides by a row's spread. So both are held to the float64 computation, and the compiled path must be as
    close to it as the readable loop is (within 3 times), values and gradients."""
    import copy

    monkeypatch.setattr(compiled, "enabled", True)
    monkeypatch.setattr(compiled, "min_calls", 1)
    torch.manual_seed(0)
    layer = rnnmath.Recurrent(CELLS["layernorm_lstm"], 16, 256)
    layer64 = copy.deepcopy(layer).double()
    x = torch.randn(6, 12, 16)  # B = 12: single steps, no chunks

    def run(model, x, fast):
        model.fast = fast
        x = x.clone().requires_grad_()
        output, last = model(x)
        g = torch.Generator().manual_seed(1)
        loss = sum((v * torch.randn(v.shape, generator=g).to(v.dtype)).sum() for v in (output, *last))
        return [output, *last, *torch.autograd.grad(loss, [x, *model.parameters()])]

    exact = run(layer64, x.double(), False)
    fast, readable = run(layer, x, True), run(layer, x, False)
    assert "LayerNormLSTMCell B=12 H=256 float32" in compiled.COMPILE_SECONDS
    for a, b, e in zip(fast, readable, exact, strict=True):
        scale = e.abs().max()
        error_fast, error_readable = (a.double() - e).abs().max() / scale, (b.double() - e).abs().max() / scale
        assert error_fast <= 3 * error_readable + 1e-7, (error_fast, error_readable)


def test_layers_of_other_sizes_share_the_compiled_projection(monkeypatch):
    """Six LayerNorm-LSTM layers (stacks of 2 bidirectional layers, three sizes, two dtypes) in one process:
    the compiled projection is one function allowed 64 variants instead of torch.compile's default 8, so
    every layer keeps it (an outside tester's sweep fell back to eager with eight warnings)."""
    import torch._dynamo

    monkeypatch.setattr(compiled, "enabled", True)
    monkeypatch.setattr(compiled, "min_calls", 1)
    monkeypatch.setattr(compiled, "_PROJECTS", __import__("weakref").WeakKeyDictionary())
    torch._dynamo.reset()
    cells = []
    for dtype, hidden in ((torch.float32, 3), (torch.float32, 5), (torch.float64, 4)):
        layer = rnnmath.Recurrent(CELLS["layernorm_lstm"], 2, hidden, num_layers=2, bidirectional=True, dtype=dtype)
        layer(torch.randn(3, 9, 2, dtype=dtype))[0].sum().backward()
        with torch.no_grad():  # grad mode is guarded: 3 sizes x 2 layers x 2 modes = 12 variants, over the 8
            layer(torch.randn(3, 9, 2, dtype=dtype))
        cells += layer.cells
    assert len(cells) == 6 and all(compiled._PROJECTS[c] is compiled._compiled_project for c in cells)
    torch._dynamo.reset()


def test_a_projection_that_cannot_be_compiled_again_runs_eagerly(monkeypatch):
    """torch.compile's recompile limit for the projection (`project_variants`, 64; once 8 variants of one
    function — LayerNorm-LSTM layers × grad modes × thread counts — which `rnnmath bench` reached and lost
    compilation for every cell after; set to 1 here) costs that layer's compiled projection only: compilation
    stays on for the rest."""
    import torch._dynamo

    monkeypatch.setattr(compiled, "enabled", True)
    monkeypatch.setattr(compiled, "min_calls", 1)
    monkeypatch.setattr(compiled, "project_variants", 1)
    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    layer = rnnmath.Recurrent(CELLS["layernorm_lstm"], 4, 3, dtype=torch.float64)
    out = layer(x)[0]
    with torch.no_grad():  # grad mode is part of torch.compile's guards: a second variant, over the limit
        out_no_grad = layer(x)[0]
    layer.fast = False
    torch.testing.assert_close(out, layer(x)[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out_no_grad, layer(x)[0], rtol=1e-10, atol=1e-10)
    assert compiled.enabled
    assert compiled._PROJECTS[layer.cells[0]] is compiled._EAGER
    torch._dynamo.reset()


@pytest.mark.parametrize("chunk", [1, 2])
def test_a_new_cell_gets_the_compiled_path(monkeypatch, chunk):
    """docs/cells.md's CIFG cell, written as its equations only, runs compiled and equals its readable loop
    (float64, to 1e-12), one step a call and in compiled chunks of 2 steps (T = 7: three chunks and a step)."""
    from test_docs import worked_example

    monkeypatch.setattr(compiled, "enabled", True)
    monkeypatch.setattr(compiled, "min_calls", 1)
    monkeypatch.setattr(compiled, "chunk_steps", chunk)
    monkeypatch.setattr(rnnmath, "CELLS", dict(rnnmath.CELLS))
    namespace: dict = {}
    exec(compile(worked_example(), "cells.md", "exec"), namespace)
    cell_class = namespace["CIFGLSTMCell"]
    cell, p, xw, state = case(cell_class, torch.float64, hidden=4, batch=3)
    got = run_path(cell, p, xw, state, None, generic=True, compile=True)
    want = run_path(cell, p, xw, state, None, generic=False)
    assert_close_scaled(got[0], want[0], torch.float64)
    assert_close_scaled(got[1], want[1], torch.float64)
    assert compiled._graphs(cell, p, xw, state, None, compile=True).split
    assert "CIFGLSTMCell B=3 H=4 float64" in compiled.COMPILE_SECONDS
    assert ("CIFGLSTMCell B=3 H=4 float64 2 steps" in compiled.COMPILE_SECONDS) == (chunk == 2)


def test_bench_covers_every_cell_and_thread_count(monkeypatch):
    """`rnnmath bench` times every cell (and the docs' new cell), training and inference, at each thread count,
    and reports the worst ratio per cell against its torch.nn reference (a tiny grid; compilation off here)."""
    import argparse

    from rnnmath import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--hidden", "3", "--steps", "2", "--batch", "2", "--repeats", "1", "--threads", "1",
                              "--no-memory", "--no-seed"])
    threads = torch.get_num_threads()
    monkeypatch.setattr(compiled, "min_calls", compiled.min_calls)  # bench.run sets it to 1: restored after
    try:
        result = bench.run(args)
    finally:
        torch.set_num_threads(threads)
    assert {(r["cell"], r["mode"]) for r in result["rows"]} == {(c, m) for c in bench.CELLS for m in ("train", "infer")}
    assert {w["cell"] for w in result["worst"]} == set(bench.CELLS)
    lstm = next(r for r in result["rows"] if r["cell"] == "layernorm_lstm")
    assert lstm["reference"] == "torch.nn.LSTM" and lstm["rnnmath ms"] > 0 and lstm["readable ms"] > 0
    assert "| cifg_lstm (docs) |" in bench.report(result) and " hand | readable |" in bench.report(result)
    assert "small steps on one thread: B·G·H ≤ 262144, B·G ≤ 4096" in bench.report(result)
    custom = {**result, "rows": [r for r in result["rows"] if r["cell"] == "cifg_lstm (docs)"]}
    assert "| cifg_lstm (docs) |" in bench.report(custom) and " hand |" not in bench.report(custom)


@pytest.mark.parametrize("chunk", [1, 3])
def test_generic_path_for_lstm_with_proj_size(chunk, monkeypatch):
    """h = W_hr (o ⊙ tanh c): W_hh still splits off, W_hr stays in the update (float64, lengths, hx)."""
    monkeypatch.setattr(compiled, "chunk_steps", chunk)
    torch.manual_seed(0)
    layer = rnnmath.LSTM(6, 5, proj_size=2, dtype=torch.float64)
    cell, p = layer.cells[0], layer.layer_params(0, 0)
    xw = cell.project(p, torch.randn(7, 4, 6, dtype=torch.float64)).detach().requires_grad_()
    state = cell.State(torch.randn(4, 2, dtype=torch.float64, requires_grad=True),
                       torch.randn(4, 5, dtype=torch.float64, requires_grad=True))
    mask = (torch.arange(7).unsqueeze(1) < torch.tensor([7, 0, 3, 1])).unsqueeze(2)
    graphs = compiled._graphs(cell, p, xw, state, mask, compile=False)
    assert graphs.split and "weight_hr" in graphs.names
    got = run_path(cell, p, xw, state, mask, generic=True)
    want = run_path(cell, p, xw, state, mask, generic=False)
    assert_close_scaled(got[0], want[0], torch.float64)
    assert_close_scaled(got[1], want[1], torch.float64)


def test_every_cell_class_of_cells_is_a_top_level_name():
    """The README's cell table names classes (PeepholeLSTMCell, ...): rnnmath.<class> reaches each."""
    for cell_class in CELLS.values():
        assert getattr(rnnmath, cell_class.__name__) is cell_class
        assert cell_class.__name__ in rnnmath.__all__


def test_the_settings_the_docs_turn_are_reachable_after_import_rnnmath():
    """rnnmath.compiled.enabled and rnnmath.layers.torch_kernels after a plain `import rnnmath` (an outside
    tester's AttributeError: the package imports its names lazily)."""
    import subprocess
    import sys

    code = ("import rnnmath; rnnmath.compiled.enabled = False; rnnmath.layers.torch_kernels = False; "
            "print(rnnmath.compiled.chunk_steps, rnnmath.cells.CELLS is rnnmath.CELLS)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["8", "True"]


def test_a_second_identical_layer_traces_but_compiles_nothing(monkeypatch):
    """Each layer traces its own graphs and COMPILE_SECONDS holds the sum over the layers (it kept only the
    last; an outside tester's finding); a graph compiled before in the process (same code, same input layouts)
    is shared, so the second layer compiles nothing and computes the same."""
    monkeypatch.setattr(compiled, "enabled", True)
    monkeypatch.setattr(compiled, "min_calls", 1)
    monkeypatch.setattr(compiled, "COMPILE_SECONDS", {})
    monkeypatch.setattr(compiled, "_COMPILED", {})
    compiles = []
    real = compiled._compile_now
    monkeypatch.setattr(compiled, "_compile_now", lambda gm, example: compiles.append(gm) or real(gm, example))
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    first = rnnmath.Recurrent(CELLS["peephole_lstm"], 4, 3, dtype=torch.float64)
    second = rnnmath.Recurrent(CELLS["peephole_lstm"], 4, 3, dtype=torch.float64)
    second.load_state_dict(first.state_dict())
    with torch.no_grad():
        want = first(x)[0]
        once, compiled_once = dict(compiled.COMPILE_SECONDS), len(compiles)
        got = second(x)[0]
    key = "PeepholeLSTMCell B=2 H=3 float64"
    assert compiled.COMPILE_SECONDS[key] > once[key] > 0
    assert compiled_once > 0 and len(compiles) == compiled_once
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    wider = rnnmath.Recurrent(CELLS["peephole_lstm"], 4, 5, dtype=torch.float64)
    with torch.no_grad():
        wider(x)
    assert len(compiles) > compiled_once  # other shapes: compiled anew


def test_chunk_steps_from_the_environment():
    """RNNMATH_CHUNK_STEPS (a server's way to turn chunks off, docs/serving.md); a bad value is said, not fatal."""
    import os
    import subprocess
    import sys

    def steps(value):
        result = subprocess.run([sys.executable, "-c", "import rnnmath; print(rnnmath.compiled.chunk_steps)"],
                                capture_output=True, text=True, check=True,
                                env={**os.environ, "RNNMATH_CHUNK_STEPS": value})
        return result.stdout.strip(), result.stderr

    assert steps("1")[0] == "1" and steps("16")[0] == "16"
    out, err = steps("zero")
    assert out == "8" and "RNNMATH_CHUNK_STEPS='zero' is not a whole number of steps" in err



# one step a call (B = 2); a scan of two chunks of 2 steps (B = 1, T = 4): 2 graphs more, forward and backward
@pytest.mark.parametrize(("setup", "batch", "graphs"), [
    ("chunk_steps = 1", 2, 2), ("chunk_steps, c.scan_min_chunks = 2, 2", 1, 4)])
def test_a_new_process_takes_the_compiled_graphs_from_inductors_disk_cache(setup, batch, graphs, tmp_path):
    """Every graph inductor compiled in one process is a hit of its on-disk FX-graph cache in the next (they all
    bypassed it before, "No shape env", and real example inputs were hashed with their values; scans bypassed it
    as torch's scan operator is not marked cacheable), and the results are the same."""
    import os
    import subprocess
    import sys

    code = ("import torch, rnnmath\n"
            "from torch._dynamo.utils import counters\n"
            "c = rnnmath.compiled\n"
            f"c.enabled, c.min_calls = True, 1\nc.{setup}\n"
            "torch.manual_seed(0)\n"
            "layer = rnnmath.Recurrent(rnnmath.CELLS['peephole_lstm'], 3, 4, dtype=torch.float64)\n"
            f"out = layer(torch.randn(4, {batch}, 3, dtype=torch.float64))[0]\n"
            "out.sum().backward()\n"
            "print(sorted(k for k in rnnmath.compiled.COMPILE_SECONDS), dict(counters['inductor']).get("
            "'fxgraph_cache_hit', 0), dict(counters['inductor']).get('fxgraph_cache_miss', 0), "
            "out.sum().item(), layer.weight_hh_l0.grad.sum().item())\n")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "RNNMATH_COMPILE": "1"}

    def run():
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        return result.stdout.strip().rsplit(" ", 4)

    keys, hits, misses, value, grad = run()
    assert f"PeepholeLSTMCell B={batch} H=4 float64" in keys and (hits, misses) == ("0", str(graphs))
    assert ("PeepholeLSTMCell B=1 H=4 float64 4 steps" in keys) == (batch == 1)
    assert run() == [keys, str(graphs), "0", value, grad]


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("name", ["lstm", "peephole_lstm", "mingru"])
def test_a_call_without_gradients_runs_the_forward_pass_alone_and_gives_the_same_values(name, chunk, monkeypatch):
    """Under torch.no_grad() nothing is recorded for autograd and only h is kept (autograd.Function's ctx would
    say the parameters need gradients there); the outputs and last state equal the recorded call's."""
    monkeypatch.setattr(compiled, "chunk_steps", chunk)
    cell, p, xw, state = case(CELLS[name], torch.float64)
    mask = (torch.arange(7).unsqueeze(1) < torch.tensor([7, 0, 3, 1])).unsqueeze(2)
    for m in (None, mask):
        want_output, want_last = compiled.generic_scan(cell, p, xw, state, m, compile=False)
        assert want_output.grad_fn is not None

        def refuse(*args):
            raise AssertionError("autograd.Function.apply called without gradients to record")

        with monkeypatch.context() as patch, torch.no_grad():
            patch.setattr(compiled._GenericScan, "apply", refuse)
            output, last = compiled.generic_scan(cell, p, xw, state, m, compile=False)
        assert output.grad_fn is None
        torch.testing.assert_close(output, want_output.detach(), rtol=0, atol=0)
        for a, b in zip(last, want_last, strict=True):
            torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


@pytest.mark.parametrize(("K", "T", "sizes"), [
    (8, 30, [8, 8, 8, 4, 2]), (8, 100, [8] * 12 + [4]), (8, 7, [1] * 7), (8, 16, [8, 8]), (8, 1, [1]),
    (1, 3, [1, 1, 1]), (3, 7, [3, 3, 1]), (10, 29, [10, 10, 5, 2, 1, 1]),
])
def test_chunk_sizes_are_whole_chunks_then_halves_then_single_steps(K, T, sizes, monkeypatch):
    monkeypatch.setattr(compiled, "chunk_steps", K)
    assert compiled.chunk_sizes(T) == sizes


@pytest.mark.parametrize(("T", "sizes"), [
    (100, [64, 32, 4]), (30, [8, 8, 8, 4, 2]), (35, [32, 2, 1]), (56, [32, 8, 8, 8]), (128, [128]), (7, [1] * 7),
])
def test_scans_take_the_powers_of_two_of_at_least_scan_min_chunks_chunks(T, sizes):
    assert (compiled.chunk_steps, compiled.scan_min_chunks) == (8, 4)
    assert compiled.chunk_sizes(T, scan=True) == sizes


def test_chunks_run_where_a_steps_recurrent_product_is_small(monkeypatch):
    """B · G · H ≤ chunk_max_work (2^23): up to B = 64 at H = 64 for an LSTM-like cell (G = 4H); where the single
    steps' products go through oneDNN (float32, H ≥ 256) at most B = 2 (chunk_max_batch_onednn), and with more
    than one thread none at H = 1024 (chunk_max_weight_threaded); a cell without a matrix W_hh always; 0 turns
    chunks off."""
    monkeypatch.setattr(compiled, "onednn_min_hidden", 256)  # the default on CPUs other than Intel's

    def p(cell, hidden):
        return rnnmath.Recurrent(CELLS[cell], 3, hidden, device="meta").layer_params(0, 0)

    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert compiled._chunks_pay(p("peephole_lstm", 64), 64)
            assert not compiled._chunks_pay(p("peephole_lstm", 64), 1024)  # 2^24
            assert compiled._chunks_pay(p("peephole_lstm", 256), 2)
            assert not compiled._chunks_pay(p("peephole_lstm", 256), 4)
            # W_hh of 4H × H = 4 Mi elements: with threads, oneDNN's products (single steps) instead
            assert compiled._chunks_pay(p("peephole_lstm", 1024), 2) == (n == 1)
            assert not compiled._chunks_pay(p("peephole_lstm", 1024), 4)
            assert compiled._chunks_pay(p("mingru", 1024), 64) and compiled._chunks_pay(p("indrnn", 1024), 64)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(compiled, "onednn_min_hidden", 0)  # single steps without oneDNN (Intel's CPUs): the work rule
    assert compiled._chunks_pay(p("peephole_lstm", 256), 32)
    try:  # and with threads at H = 1024 too: the single steps' products would be ATen's mm as well
        torch.set_num_threads(2)
        assert compiled._chunks_pay(p("peephole_lstm", 1024), 2)
        assert not compiled._chunks_pay(p("peephole_lstm", 1024), 3)  # B · G · H over 2^23
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(compiled, "chunk_max_work", 0)
    assert not compiled._chunks_pay(p("mingru", 64), 1)


def test_a_layer_first_due_under_inference_mode_compiles_and_stays_exact(monkeypatch):
    """The call that compiles may come under torch.inference_mode() (a server): tracing the update's derivative
    needs ordinary tensors, so the examples are copied out of inference mode; before, that layer silently kept
    the readable loop for good (found by an outside tester). Later training calls use the compiled graphs."""
    monkeypatch.setattr(compiled, "enabled", True)
    monkeypatch.setattr(compiled, "min_calls", 1)
    monkeypatch.setattr(compiled, "chunk_steps", 4)
    monkeypatch.setattr(compiled, "COMPILE_SECONDS", {})
    torch.manual_seed(0)
    layer = rnnmath.Recurrent(CELLS["indrnn"], 4, 8, dtype=torch.float64)
    slow = rnnmath.Recurrent(CELLS["indrnn"], 4, 8, dtype=torch.float64)
    slow.load_state_dict(layer.state_dict())
    slow.fast = False
    x = torch.randn(6, 2, 4, dtype=torch.float64)
    with torch.inference_mode():
        output = layer(x)[0]
    assert sorted(compiled.COMPILE_SECONDS) == ["IndRNNCell B=2 H=8 float64", "IndRNNCell B=2 H=8 float64 2 steps",
                                                 "IndRNNCell B=2 H=8 float64 4 steps"]
    torch.testing.assert_close(output, slow(x)[0].detach(), rtol=1e-12, atol=1e-12)
    got, want = layer(x)[0], slow(x)[0]
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(layer.parameters(), slow.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
