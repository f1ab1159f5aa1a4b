"""The fast path (rnnmath.fused, through each built-in cell's fast_scan) against the readable loop it replaces.

The readable loop is the specification (tests/test_layers.py holds both paths equal to torch.nn); here the
fast path must give bit-identical forward values and the same gradients, in every corner the layer has:
lengths (zero included), both directions, stacked layers, hx given, token ids, float32 and float64.
The built-in layers' default path is torch's own fused operator where it serves (rnnmath.layers.torch_kernels);
these tests switch that off to reach the hand-written path, and the last section holds torch's path to the
readable loop within floating-point tolerance.
"""

from __future__ import annotations

import pytest
import torch

import rnnmath
from rnnmath import fused, layers

KINDS = {
    "rnn_tanh": lambda **kw: rnnmath.RNN(**kw),
    "rnn_relu": lambda **kw: rnnmath.RNN(nonlinearity="relu", **kw),
    "lstm": lambda **kw: rnnmath.LSTM(**kw),
    "gru": lambda **kw: rnnmath.GRU(**kw),
}
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def hand_written_path(request, monkeypatch):
    """Every test here but those of torch's kernels runs the hand-written fused path."""
    monkeypatch.setattr(layers, "torch_kernels", "torch_kernel" in request.node.name)


def run_both(layer, x, hx=None, lengths=None, seed=0):
    """Forward and backward on the fast and the readable path; returns {fast: (outputs, gradients)}.

    The loss weighs every output, h_n (and c_n) with fixed random weights, so every gradient path is used."""
    results = {}
    for fast in (True, False):
        layer.fast = fast
        layer.zero_grad(set_to_none=True)
        leaves = [t for t in [x, *(hx if isinstance(hx, tuple) else [hx])] if t is not None and t.requires_grad]
        for t in leaves:
            t.grad = None
        output, h_n = layer(x, hx, lengths=lengths)
        finals = h_n if isinstance(h_n, tuple) else (h_n,)
        g = torch.Generator(device=output.device).manual_seed(seed)
        loss = sum((v * torch.randn(v.shape, generator=g, device=v.device, dtype=v.dtype)).sum()
                   for v in (output, *finals))
        loss.backward()
        grads = [p.grad for p in layer.parameters()] + [t.grad for t in leaves]
        assert all(gr is not None for gr in grads)
        results[fast] = ([output.detach(), *(f.detach() for f in finals)], grads)
    return results


def assert_paths_equal(results, dtype, bitwise=True):
    (fast_values, fast_grads), (slow_values, slow_grads) = results[True], results[False]
    for a, b in zip(fast_values, slow_values):
        if bitwise:
            assert torch.equal(a, b), f"forward differs by {(a - b).abs().max().item():.3g}"
        else:
            torch.testing.assert_close(a, b, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    for a, b in zip(fast_grads, slow_grads):
        scale = max(1.0, b.abs().max().item())  # relu's gradients can be large
        torch.testing.assert_close(a, b, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("with_lengths", [False, True])
def test_fast_path_equals_readable_loop(kind, dtype, with_lengths, device):
    torch.manual_seed(0)
    # H = 5 and 20 leave tails that the vectorised kernels finish element by element: the layouts must match
    for hidden, bias in ((5, True), (20, False)):
        layer = KINDS[kind](input_size=6, hidden_size=hidden, num_layers=2, bidirectional=True, bias=bias,
                            dtype=dtype, device=device)
        x = torch.randn(7, 4, 6, dtype=dtype, device=device, requires_grad=True)  # (T, B, I)
        lengths = torch.tensor([7, 0, 3, 1]) if with_lengths else None  # a zero length returns the initial state
        n_fields = 2 if kind == "lstm" else 1
        hx = tuple(torch.randn(4, 4, hidden, dtype=dtype, device=device, requires_grad=True) for _ in range(n_fields))
        hx = hx if n_fields == 2 else hx[0]
        for state in (None, hx):
            # bitwise on CPU; a GPU library may pick a different kernel for in-place and fresh outputs
            assert_paths_equal(run_both(layer, x, state, lengths), dtype, bitwise=device == "cpu")


@pytest.mark.parametrize("kind", list(KINDS))
def test_fast_path_with_batch_first_and_one_step(kind):
    """A strided projection (batch_first) and T = 1 go through the same code with other layouts."""
    torch.manual_seed(1)
    layer = KINDS[kind](input_size=3, hidden_size=4, batch_first=True, dtype=torch.float64)
    for T in (1, 6):
        x = torch.randn(2, T, 3, dtype=torch.float64, requires_grad=True)  # (B, T, I)
        assert_paths_equal(run_both(layer, x), torch.float64)


def test_token_ids_on_the_seed_configuration():
    """The seed's shape (ids over V = 400, state 3, batch 128, tanh) with lengths: equal on both paths."""
    torch.manual_seed(2)
    layer = rnnmath.RNN(400, 3)
    ids = torch.randint(0, 400, (30, 128))  # (T, B)
    lengths = torch.randint(0, 31, (128,))
    assert_paths_equal(run_both(layer, ids, lengths=lengths), torch.float32)


def test_small_loops_run_on_one_thread_and_restore_the_count(monkeypatch):
    """A loop whose steps are small runs on the calling thread alone (ATen would split their tiny operations
    across threads, at a cost); the count comes back after it, also when it raises; large steps keep threads."""
    monkeypatch.setattr(fused, "_alone", lambda: True)  # whatever other tests left running
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with fused.one_thread_if_small(128, 3, 3):  # the seed configuration
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with fused.one_thread_if_small(64, 1024, 256):  # 16.8 M multiply-adds a step
            assert torch.get_num_threads() == 2
        with fused.one_thread_if_small(64, 1024, 0):  # no product, but 65536 gate elements
            assert torch.get_num_threads() == 2
        with pytest.raises(KeyboardInterrupt), fused.one_thread_if_small(1, 256, 64):
            raise KeyboardInterrupt
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(fused, "one_thread_max_product", 0)  # off, also for a cell without a product
        with fused.one_thread_if_small(1, 64, 0):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_one_thread_rule_is_off_with_its_environment_variable():
    import os
    import subprocess
    import sys

    code = "from rnnmath import fused; print(fused.one_thread_max_product, fused.one_thread_max_elements)"
    for value, want in (("0", "0 0"), ("1", f"{1 << 18} {1 << 12}")):
        env = {**os.environ, "RNNMATH_ONE_THREAD": value}
        got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert got.stdout.split() == want.split()


def test_only_tqdms_monitor_does_not_count_as_another_thread():
    """tqdm's monitor thread (inductor's compile progress leaves one) does not stop the loop's one thread."""
    import io
    import threading

    from tqdm import tqdm

    with tqdm(total=1, file=io.StringIO()):  # starts tqdm's monitor thread
        monitors = [t for t in threading.enumerate() if type(t).__module__ == "tqdm._monitor"]
        others = [t for t in threading.enumerate() if t is not threading.current_thread() and t not in monitors]
        assert monitors and fused._alone() == (not others)
    stop = threading.Event()
    waiting = threading.Thread(target=stop.wait)
    waiting.start()
    try:
        assert not fused._alone()
    finally:
        stop.set()
        waiting.join()


@pytest.mark.parametrize("other_thread", [False, True])
def test_the_seed_configuration_loops_on_one_thread(other_thread, monkeypatch):
    """Both passes of the seed's tanh RNN run their steps with one thread, and the layer leaves the count as it was;
    not while another Python thread runs (a thread it started meanwhile would inherit torch's count of 1)."""
    import threading

    seen, stop = [], threading.Event()
    if other_thread:
        threading.Thread(target=stop.wait).start()
    else:
        monkeypatch.setattr(fused, "_alone", lambda: True)  # whatever other tests left running

    def counting(original):
        def run(*args, **kwargs):
            seen.append(torch.get_num_threads())
            return original(*args, **kwargs)
        return run

    monkeypatch.setattr(torch, "tanh_", counting(torch.tanh_))
    monkeypatch.setattr(fused, "_tanh_backward", counting(fused._tanh_backward))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        layer = rnnmath.RNN(400, 3)
        output, _ = layer(torch.randint(0, 400, (30, 128)))  # (T, B) ids
        output.sum().backward()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
        stop.set()
    assert seen == [2 if other_thread else 1] * 60  # 30 steps forward, 30 back


def test_fast_path_equals_torch_nn():
    """One direct check against torch.nn, the oracle of the whole suite (the full grid is in test_layers)."""
    torch.manual_seed(3)
    for ours, theirs in ((rnnmath.LSTM, torch.nn.LSTM), (rnnmath.GRU, torch.nn.GRU), (rnnmath.RNN, torch.nn.RNN)):
        native = theirs(5, 6, num_layers=2, bidirectional=True, dtype=torch.float64)
        layer = ours(5, 6, num_layers=2, bidirectional=True, dtype=torch.float64)
        layer.load_state_dict(native.state_dict())
        assert layer.fast
        x = torch.randn(8, 3, 5, dtype=torch.float64)
        out, _ = layer(x)
        out.square().sum().backward()
        ref, _ = native(x)
        ref.square().sum().backward()
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        for name, p in native.named_parameters():
            torch.testing.assert_close(getattr(layer, name).grad, p.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["rnn_tanh", "rnn_relu", "lstm", "gru"])
def test_gradcheck_of_the_fused_functions(kind):
    """Finite differences on the Function itself, lengths included: every input's gradient is checked."""
    torch.manual_seed(4)
    T, B, H = 4, 3, 2
    G = {"lstm": 4, "gru": 3}.get(kind, 1) * H
    f64 = dict(dtype=torch.float64, requires_grad=True)
    xw, W, b = torch.randn(T, B, G, **f64), torch.randn(G, H, **f64), torch.randn(G, **f64)
    h0, c0 = torch.randn(B, H, **f64), torch.randn(B, H, **f64)
    mask = (torch.arange(T).unsqueeze(1) < torch.tensor([4, 0, 2])).unsqueeze(2)  # (T, B, 1)
    State = rnnmath.LSTMState if kind == "lstm" else rnnmath.HiddenState
    if kind == "lstm":
        cell = rnnmath.LSTMCell(1, H, device="meta")
    elif kind == "gru":
        cell = rnnmath.GRUCell(1, H, device="meta")
    else:
        cell = rnnmath.RNNCell(1, H, nonlinearity=kind.removeprefix("rnn_"), device="meta")

    def scan(xw, h0, c0, W, b):
        p = {"weight_hh": W, "bias_hh": b}
        if kind == "lstm":
            output, state = fused.lstm_scan(p, xw, State(h0, c0), mask, cell)
        elif kind == "gru":
            output, state = fused.gru_scan(p, xw, State(h0), mask, cell)
        else:
            output, state = fused.rnn_scan(p, xw, State(h0), mask, cell)
        return (output, *state)

    inputs = (xw, h0, c0 if kind == "lstm" else c0.detach(), W, b)
    assert torch.autograd.gradcheck(scan, inputs)
    # second order (create_graph) and vmapped first order (is_grads_batched) both replay the readable loop
    assert torch.autograd.gradgradcheck(scan, inputs)
    assert torch.autograd.gradcheck(scan, inputs, check_batched_grad=True)


def test_backward_twice_with_retain_graph():
    """The backward pass must not consume what it saved: a second backward gives the same gradients."""
    torch.manual_seed(5)
    layer = rnnmath.LSTM(3, 4)
    x = torch.randn(5, 2, 3)
    out, (h, c) = layer(x)
    loss = out.sum() + c.sum()
    first = torch.autograd.grad(loss, list(layer.parameters()), retain_graph=True)
    second = torch.autograd.grad(loss, list(layer.parameters()))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_double_backward_on_the_default_path_equals_the_readable_loop():
    """create_graph=True on the fast path replays the readable loop: same first and second derivatives."""
    torch.manual_seed(0)
    for make in KINDS.values():
        layer = make(input_size=2, hidden_size=3, num_layers=2, bidirectional=True, dtype=torch.float64)
        x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
        lengths = torch.tensor([4, 2])
        results = []
        for fast in (True, False):
            layer.fast = fast
            (g,) = torch.autograd.grad(layer(x, lengths=lengths)[0].pow(2).sum(), x, create_graph=True)
            second = torch.autograd.grad(g.pow(2).sum(), [x, *layer.parameters()])
            results.append([g.detach(), *second])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        assert results[0][1].abs().sum() > 0


def test_tracing_gives_the_fast_path_values_bitwise():
    """Tracing runs the readable loop: its results must equal the untraced (fast) run exactly."""
    torch.manual_seed(6)
    layer = rnnmath.LSTM(4, 7, num_layers=2, bidirectional=True)
    x = torch.randn(9, 3, 4)
    lengths = torch.tensor([9, 4, 1])
    fast_out, (fast_h, fast_c) = layer(x, lengths=lengths)
    with rnnmath.trace(layer):
        out, (h, c) = layer(x, lengths=lengths)
    assert torch.equal(out, fast_out) and torch.equal(h, fast_h) and torch.equal(c, fast_c)


# -- torch's own fused operators (rnnmath.layers.torch_kernels), the built-in layers' default path -------


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_kernel_path_equals_readable_loop(kind, dtype):
    """Values and every gradient within tolerance: lengths, both directions, stacked layers, hx, no bias."""
    torch.manual_seed(7)
    for hidden, bias in ((5, True), (20, False)):
        layer = KINDS[kind](input_size=6, hidden_size=hidden, num_layers=2, bidirectional=True, bias=bias,
                            dtype=dtype)
        assert layer._torch_kernel_serves(torch.zeros(1, 1, 6, dtype=dtype), None)
        x = torch.randn(7, 4, 6, dtype=dtype, requires_grad=True)  # (T, B, I)
        n_fields = 2 if kind == "lstm" else 1
        hx = tuple(torch.randn(4, 4, hidden, dtype=dtype, requires_grad=True) for _ in range(n_fields))
        for lengths in (None, torch.tensor([7, 2, 3, 1]), torch.tensor([7, 0, 3, 1])):  # a 0: rnnmath's path
            for state in (None, hx if n_fields == 2 else hx[0]):
                assert_paths_equal(run_both(layer, x, state, lengths), dtype, bitwise=False)


@pytest.mark.parametrize("kind", list(KINDS))
def test_torch_kernel_path_forms_of_input(kind):
    """batch_first, one step, an unbatched sequence and a PackedSequence reach the same values."""
    torch.manual_seed(8)
    layer = KINDS[kind](input_size=3, hidden_size=4, batch_first=True, dtype=torch.float64)
    for T in (1, 6):
        x = torch.randn(2, T, 3, dtype=torch.float64, requires_grad=True)  # (B, T, I)
        assert_paths_equal(run_both(layer, x), torch.float64, bitwise=False)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)  # (B, T, I) of one sequence: (T, I)
    assert_paths_equal(run_both(layer, x), torch.float64, bitwise=False)
    layer.batch_first = False
    packed = torch.nn.utils.rnn.pack_sequence([torch.randn(n, 3, dtype=torch.float64) for n in (2, 5, 3)],
                                              enforce_sorted=False)
    outputs = []
    for fast in (True, False):
        layer.fast = fast
        out, h_n = layer(packed)
        outputs.append((out.data, *(h_n if isinstance(h_n, tuple) else (h_n,))))
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_torch_kernel_path_with_projections_and_dropout():
    """proj_size, and inter-layer dropout in training: the same masks as the readable loop (one call per layer)."""
    torch.manual_seed(9)
    layer = rnnmath.LSTM(4, 6, num_layers=3, proj_size=2, bidirectional=True, dropout=0.5, dtype=torch.float64)
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    for lengths in (None, torch.tensor([5, 1, 3])):
        results = {}
        for fast in (True, False):
            layer.fast = fast
            torch.manual_seed(10)
            results[fast] = run_both_once(layer, x, lengths)
        for a, b in zip(results[True], results[False]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def run_both_once(layer, x, lengths):
    output, (h, c) = layer(x, lengths=lengths)
    grads = torch.autograd.grad(output.square().sum() + h.sum() + c.sum(), [x, *layer.parameters()])
    return [output, h, c, *grads]


def test_torch_kernel_path_is_not_taken_where_the_step_matters():
    """Tracing, layer.fast = False, recurrent dropout, token ids and subclassed cells keep rnnmath's loops."""
    x = torch.randn(3, 2, 4)
    assert rnnmath.LSTM(4, 5)._torch_kernel_serves(x, None)
    assert not rnnmath.LSTM(4, 5, recurrent_dropout=0.1)._torch_kernel_serves(x, None)
    assert rnnmath.LSTM(4, 5, recurrent_dropout=0.1).eval()._torch_kernel_serves(x, None)  # identity there
    assert not rnnmath.LSTM(4, 5)._torch_kernel_serves(torch.zeros(3, 2, dtype=torch.long), None)
    assert not rnnmath.LSTM(4, 5)._torch_kernel_serves(x, torch.tensor([3, 0]))

    class Mine(rnnmath.LSTMCell):
        """A subclass with nothing changed: still not torch's kernel (its step could differ)."""

    assert not rnnmath.Recurrent(Mine, 4, 5)._torch_kernel_serves(x, None)
    layer = rnnmath.GRU(4, 5)
    with rnnmath.trace(layer):
        assert not layer._torch_kernel_serves(x, None)
    layer.fast = False
    assert not layer._torch_kernel_serves(x, None)
