"""Cells beyond torch.nn, the regularisers, and the transforms (torch.compile, torch.func).

Oracles: each cell's equations written again here as plain per-step torch code (slicing gates by hand, layer
norm from its definition), torch.nn.LSTM for the peephole LSTM with zero peepholes, the sequential loop for the
parallel scan, and eager execution for the transforms.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnmath
from rnnmath.cells import CELLS
from rnnmath.layers import Recurrent

NEW = ["layernorm_lstm", "peephole_lstm", "indrnn", "mingru", "minlstm"]
PARALLEL = ["mingru", "minlstm"]
LSTM_LIKE = {"layernorm_lstm", "peephole_lstm"}


# -- the equations again, one step at a time --------------------------------------------------------------
def layer_norm(v, gain, shift, eps=1e-5):
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    return gain * (v - mean) / torch.sqrt(var + eps) + shift


def positive(v):  # minGRU's g
    return torch.where(v >= 0, v + 0.5, torch.sigmoid(v))


def reference_step(name, P, x, h, c):
    """One step of cell `name` from its paper's equations; P holds the layer's tensors by cell name."""
    H = h.shape[-1]

    def rows(W, k):  # gate k's rows of a stacked weight
        return W[k * H:(k + 1) * H]

    if name == "layernorm_lstm":
        a = (layer_norm(x @ P["weight_ih"].T, P["gain_ih"], 0) + layer_norm(h @ P["weight_hh"].T, P["gain_hh"], 0)
             + P["bias_gates"])
        i, f, g, o = (a[:, k * H:(k + 1) * H] for k in range(4))
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(layer_norm(c, P["gain_c"], P["bias_c"])), c
    if name == "peephole_lstm":
        def pre(k):
            return x @ rows(P["weight_ih"], k).T + rows(P["bias_ih"], k) + h @ rows(P["weight_hh"], k).T + rows(
                P["bias_hh"], k)
        i = torch.sigmoid(pre(0) + P["weight_ci"] * c)
        f = torch.sigmoid(pre(1) + P["weight_cf"] * c)
        c = f * c + i * torch.tanh(pre(2))
        return torch.sigmoid(pre(3) + P["weight_co"] * c) * torch.tanh(c), c
    if name == "indrnn":
        return torch.relu(x @ P["weight_ih"].T + P["bias_ih"] + P["weight_hh"] * h), None
    W, b = P["weight_ih"], P["bias_ih"]
    if name == "mingru":
        z = torch.sigmoid(x @ rows(W, 0).T + rows(b, 0))
        return (1 - z) * h + z * positive(x @ rows(W, 1).T + rows(b, 1)), None
    if name == "minlstm":
        f = torch.sigmoid(x @ rows(W, 0).T + rows(b, 0))
        i = torch.sigmoid(x @ rows(W, 1).T + rows(b, 1))
        return f / (f + i) * h + i / (f + i) * positive(x @ rows(W, 2).T + rows(b, 2)), None
    raise KeyError(name)


def reference_direction(name, P, xs, h, c):
    """One layer and direction over xs (T, B, I) with no padding: outputs (T, B, H) and the last state."""
    hs = []
    for x in xs:
        h, c = reference_step(name, P, x, h, c)
        hs.append(h)
    return torch.stack(hs), h, c


def reference_stack(name, layer, x):
    """A whole (stacked, bidirectional) layer over one unpadded batch x (T, B, I), from zeros."""
    B, H = x.shape[1], layer.hidden_size
    h_n, c_n = [], []
    for k in range(layer.num_layers):
        outs = []
        for d in range(layer.num_directions):
            P = layer.layer_params(k, d)
            zero = x.new_zeros(B, H)
            xs = x if d == 0 else x.flip(0)
            out, h, c = reference_direction(name, P, xs, zero, zero if name in LSTM_LIKE else None)
            outs.append(out if d == 0 else out.flip(0))
            h_n.append(h)
            c_n.append(c)
        x = torch.cat(outs, dim=2)
    return x, torch.stack(h_n), (torch.stack(c_n) if name in LSTM_LIKE else None)


def make_layer(name, *, seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    layer = Recurrent(CELLS[name], 3, 4, dtype=dtype, **kw)
    with torch.no_grad():  # move gains and zero biases off their initial values so every term is exercised
        for n, p in layer.named_parameters():
            if n.startswith(("gain", "bias")):
                p.add_(0.3 * torch.randn_like(p))
    return layer


def split_state(name, h_n):
    return (h_n[0], h_n[1]) if name in LSTM_LIKE else (h_n, None)


def weighted_loss(out, h, c):
    g = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    loss = loss + (h * torch.randn(h.shape, generator=g, dtype=h.dtype)).sum()
    return loss if c is None else loss + (c * torch.randn(c.shape, generator=g, dtype=c.dtype)).sum()


# -- each cell against its equations ------------------------------------------------------------------------
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("name", NEW)
def test_cell_equals_its_equations_values_and_gradients(name, fast):
    layer = make_layer(name, num_layers=2, bidirectional=True)
    layer.fast = fast
    x = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    out, h_n = layer(x)
    h, c = split_state(name, h_n)
    ref_out, ref_h, ref_c = reference_stack(name, layer, x)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h, ref_h, rtol=1e-10, atol=1e-12)
    if c is not None:
        torch.testing.assert_close(c, ref_c, rtol=1e-10, atol=1e-12)
    inputs = [x, *layer.parameters()]
    got = torch.autograd.grad(weighted_loss(out, h, c), inputs)
    want = torch.autograd.grad(weighted_loss(ref_out, ref_h, ref_c), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", NEW)
def test_cell_alone_is_one_step_of_its_equations(name):
    torch.manual_seed(0)
    cell = CELLS[name](3, 4, dtype=torch.float64)
    x, h0 = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    c0 = torch.randn(2, 4, dtype=torch.float64) if name in LSTM_LIKE else None
    got = cell(x, h0 if c0 is None else (h0, c0))
    want_h, want_c = reference_step(name, cell.params(), x, h0, c0)
    torch.testing.assert_close(got[0] if c0 is not None else got, want_h)
    if c0 is not None:
        torch.testing.assert_close(got[1], want_c)


def test_layernorm_lstm_initialisation_gains_one_biases_zero():
    layer = Recurrent(CELLS["layernorm_lstm"], 3, 4)
    for n, p in layer.named_parameters():
        if n.startswith("gain"):
            assert torch.equal(p, torch.ones_like(p)), n
        if n.startswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), n
    assert {n for n, _ in layer.named_parameters()} == {
        "weight_ih_l0", "weight_hh_l0", "gain_ih_l0", "gain_hh_l0", "bias_gates_l0", "gain_c_l0", "bias_c_l0"}
    no_bias = Recurrent(CELLS["layernorm_lstm"], 3, 4, bias=False)
    assert not any(n.startswith("bias") for n, _ in no_bias.named_parameters())


def test_indrnn_shapes_and_initialisation():
    layer = Recurrent(CELLS["indrnn"], 3, 64)
    assert layer.weight_hh_l0.shape == (64,) and layer.weight_ih_l0.shape == (64, 3)
    assert 0 <= layer.weight_hh_l0.min() and layer.weight_hh_l0.max() <= 1


def test_peephole_lstm_with_zero_peepholes_is_torch_lstm():
    torch.manual_seed(0)
    ref = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True).double()
    layer = Recurrent(CELLS["peephole_lstm"], 3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    missing, unexpected = layer.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected and all(n.startswith("weight_c") for n in missing)
    with torch.no_grad():
        for n in missing:
            getattr(layer, n).zero_()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    out, (h, c) = layer(x)
    want, (want_h, want_c) = ref(x)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(c, want_c)


@pytest.mark.parametrize("name", NEW)
def test_gradcheck(name):
    layer = make_layer(name, num_layers=1, bidirectional=True)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 2])
    params = dict(layer.named_parameters())

    def f(x, *ps):
        out, h_n = functional_call(layer, dict(zip(params, ps)), (x,), {"lengths": lengths})
        return out, *(h_n if isinstance(h_n, tuple) else (h_n,))

    assert torch.autograd.gradcheck(f, (x, *params.values()), fast_mode=True)


# -- parallel scan == sequential loop ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", PARALLEL)
def test_parallel_scan_equals_sequential_loop(name, dtype):
    layer = make_layer(name, num_layers=2, bidirectional=True, dtype=dtype)
    T, B = 60, 4
    x = torch.randn(T, B, 3, dtype=dtype, requires_grad=True)
    lengths = torch.tensor([60, 0, 17, 1])
    hx = torch.randn(4, B, 4, dtype=dtype)  # any sign: the scan keeps h_0 out of its logarithms
    results = []
    for fast in (True, False):
        layer.fast = fast
        out, h_n = layer(x, hx, lengths=lengths)
        grads = torch.autograd.grad(weighted_loss(out, h_n, None), [x, *layer.parameters()])
        results.append((out, h_n, grads))
    (out, h_n, grads), (want_out, want_h, want_grads) = results
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, want_out, **tol)
    torch.testing.assert_close(h_n, want_h, **tol)
    torch.testing.assert_close(h_n[:, 1], hx[:, 1])  # length 0: the initial state comes back
    for a, b in zip(grads, want_grads):
        assert torch.isfinite(a).all()
        if dtype == torch.float64:
            torch.testing.assert_close(a, b, **tol)
        else:  # float32 gradients sum 60 steps of log-space terms: measured ≤ 8e-5 of each tensor's largest entry
            assert (a - b).abs().max() <= 3e-4 * b.abs().max()


# -- the layer's services for every new cell --------------------------------------------------------------------
@pytest.mark.parametrize("name", NEW)
def test_stacked_bidirectional_lengths_equal_each_sequence_alone(name):
    layer = make_layer(name, num_layers=2, bidirectional=True)
    lengths = torch.tensor([5, 3, 1])
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    out, h_n = layer(x, lengths=lengths)
    h, c = split_state(name, h_n)
    for b, n in enumerate(lengths.tolist()):
        want_out, want_h, want_c = reference_stack(name, layer, x[:n, b:b + 1])
        torch.testing.assert_close(out[:n, b:b + 1], want_out)
        assert out[n:, b].abs().sum() == 0
        torch.testing.assert_close(h[:, b:b + 1], want_h)
        if c is not None:
            torch.testing.assert_close(c[:, b:b + 1], want_c)
    packed = pack_padded_sequence(x, lengths)
    p_out, p_h_n = layer(packed)
    torch.testing.assert_close(pad_packed_sequence(p_out)[0], out)
    torch.testing.assert_close(p_h_n, h_n)


@pytest.mark.parametrize("name", NEW)
def test_token_ids_and_trace(name):
    layer = make_layer(name, num_layers=2)
    ids = torch.tensor([[0, 2], [1, 1], [2, 0]])  # (T, B)
    out, _ = layer(ids)
    torch.testing.assert_close(out, layer(F.one_hot(ids, 3).double())[0])
    with rnnmath.trace(layer) as tr:
        traced, _ = layer(ids, lengths=torch.tensor([3, 2]))
    assert set(tr[1, 0]) == {*layer.cells[0].gate_names, *layer.cells[0].State._fields}
    torch.testing.assert_close(tr[1, 0]["h"][:2, 1], traced[:2, 1])
    assert tr[1, 0]["h"][2, 1].isnan().all()


# -- regularisers ---------------------------------------------------------------------------------------------
class SpyRNNCell(rnnmath.RNNCell):
    """A tanh RNN cell that remembers the h it was fed and the state it returned at every step."""

    def step(self, p, x, state):
        new = super().step(p, x, state)
        self.fed.append(state.h)
        self.returned.append(new.h)
        return new


def spy_layer(num_layers=2, bidirectional=True, **kw):
    torch.manual_seed(0)
    layer = Recurrent(SpyRNNCell, 3, 64, num_layers, dtype=torch.float64, bidirectional=bidirectional, **kw)
    for cell in layer.cells:
        cell.fed, cell.returned = [], []
    return layer


def test_recurrent_dropout_one_mask_per_sequence_layer_and_direction():
    p = 0.4
    layer = spy_layer(recurrent_dropout=p)
    x = torch.randn(6, 8, 3, dtype=torch.float64)
    out, _ = layer(x)
    masks = []
    for cell in layer.cells:
        for d in range(2):
            steps = range(d * 6, d * 6 + 6)  # the cell served direction 0, then direction 1
            prev = [cell.returned[t - 1] if t > d * 6 else None for t in steps]
            ratios = [cell.fed[t] / prev_h for t, prev_h in zip(list(steps)[1:], prev[1:])]  # fed = h ⊙ m
            m = ratios[0]
            for r in ratios[1:]:
                torch.testing.assert_close(r, m)  # the same mask at every step
            assert ((m == 0) | torch.isclose(m, torch.tensor(1 / (1 - p), dtype=m.dtype))).all()
            assert 0.2 < (m == 0).double().mean() < 0.6
            assert not torch.equal(m[0], m[1])  # one mask per sequence
            masks.append(m)
    assert all(not torch.equal(masks[0], m) for m in masks[1:])  # per layer and direction
    # outputs carry the undropped h: the next layer's input is the returned h, not the fed one
    torch.testing.assert_close(out[:, :, :64], torch.stack(layer.cells[1].returned[:6]))


@pytest.mark.parametrize("name", ["lstm", *NEW])
def test_regularisers_identity_when_off(name):
    torch.manual_seed(0)
    plain = Recurrent(CELLS[name], 3, 4, num_layers=2, dtype=torch.float64)
    regular = Recurrent(CELLS[name], 3, 4, num_layers=2, dtype=torch.float64, recurrent_dropout=0.5)
    regular.load_state_dict(plain.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    regular.eval()
    torch.testing.assert_close(regular(x)[0], plain(x)[0], rtol=0, atol=0)
    regular.train()
    assert not torch.equal(regular(x)[0], plain(x)[0])


def test_zoneout_training_keeps_each_unit_with_probability_z():
    z = 0.3
    layer = spy_layer(1, False, zoneout=z)
    x = torch.randn(20, 32, 3, dtype=torch.float64)
    out, _ = layer(x)
    cell = layer.cells[0]
    kept = []
    for t in range(1, 20):
        old, new, got = out[t - 1], cell.returned[t], out[t]  # the state is the output: zoned out or new
        is_old, is_new = got == old, got == new
        assert (is_old | is_new).all()  # every unit is either the old or the new value
        kept.append(is_old & ~is_new)
    frac = torch.stack(kept).double().mean().item()
    assert abs(frac - z) < 0.02, frac


def test_zoneout_eval_is_the_expectation():
    z = 0.3
    layer = spy_layer(1, False, zoneout=z).eval()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    out, _ = layer(x)
    P = layer.layer_params(0, 0)
    h = torch.zeros(2, 64, dtype=torch.float64)
    for t in range(5):
        new = torch.tanh(x[t] @ P["weight_ih"].T + P["bias_ih"] + h @ P["weight_hh"].T + P["bias_hh"])
        h = (1 - z) * new + z * h
        torch.testing.assert_close(out[t], h)


def test_zoneout_lstm_applies_to_c_too_in_eval():
    z = 0.5
    torch.manual_seed(0)
    layer = rnnmath.LSTM(3, 4, zoneout=z).double().eval()
    ref = torch.nn.LSTMCell(3, 4).double()
    ref.load_state_dict({n[:-3]: p for n, p in layer.state_dict().items()})
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    h = c = torch.zeros(2, 4, dtype=torch.float64)
    for t in range(4):
        nh, nc = ref(x[t], (h, c))
        h, c = (1 - z) * nh + z * h, (1 - z) * nc + z * c
    out, (h_n, c_n) = layer(x)
    torch.testing.assert_close(h_n[0], h)
    torch.testing.assert_close(c_n[0], c)


def test_regularised_training_uses_the_readable_loop():
    layer = Recurrent(CELLS["mingru"], 3, 4, recurrent_dropout=0.2, zoneout=0.1)

    def refuse(*args):
        raise AssertionError("fast_scan ran")

    layer.cells[0].fast_scan = refuse
    layer(torch.randn(3, 2, 3))  # training, regularised: the loop
    layer.zoneout = 0.0
    layer.eval()  # recurrent dropout alone is off in eval: the fast path again
    with pytest.raises(AssertionError, match="fast_scan ran"):
        layer(torch.randn(3, 2, 3))


def test_regulariser_arguments_are_keyword_only_and_checked():
    assert rnnmath.GRU(3, 4, zoneout=0.1).zoneout == 0.1
    assert "recurrent_dropout=0.2" in repr(rnnmath.RNN(3, 4, recurrent_dropout=0.2))
    with pytest.raises(ValueError, match="zoneout"):
        rnnmath.LSTM(3, 4, zoneout=1.0)
    with pytest.raises(TypeError):
        rnnmath.LSTM(3, 4, 1, True, False, 0.0, False, None, None, 0.1)


# -- torch.compile and torch.func ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CELLS))
def test_readable_path_compiles_without_graph_breaks(name):
    torch._dynamo.reset()
    layer = make_layer(name, dtype=torch.float32)
    layer.fast = False
    x = torch.randn(3, 2, 3, requires_grad=True)
    lengths = torch.tensor([3, 2])
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out, h_n = compiled(x, lengths=lengths)
    want, want_h = layer(x, lengths=lengths)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(h_n, want_h)
    got = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
    expected = torch.autograd.grad(want.square().sum(), [x, *layer.parameters()])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["lstm", "gru", "mingru"])
def test_fast_layer_compiles_too(name):
    """With fast=True the fused autograd.Function paths step aside under compile; minGRU's scan compiles."""
    torch._dynamo.reset()
    layer = make_layer(name, dtype=torch.float32)
    x = torch.randn(3, 2, 3, requires_grad=True)
    out, _ = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, lengths=torch.tensor([3, 1]))
    want, _ = layer(x, lengths=torch.tensor([3, 1]))
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0])


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("name", list(CELLS))
def test_vmap_and_grad_equal_eager(name, fast):
    layer = make_layer(name, dtype=torch.float64, num_layers=2, bidirectional=True)
    layer.fast = fast
    params = {n: p.detach() for n, p in layer.named_parameters()}
    xs = torch.randn(3, 4, 2, 3, dtype=torch.float64)  # 3 independent batches of (T, B, I)
    lengths = torch.tensor([4, 2])

    def loss(params, x):
        out, _ = functional_call(layer, params, (x,), {"lengths": lengths})
        return out.square().sum()

    per_batch = vmap(loss, in_dims=(None, 0))(params, xs)
    torch.testing.assert_close(per_batch, torch.stack([loss(params, x) for x in xs]))
    grads = grad(loss)(params, xs[0])
    eager = torch.autograd.grad(loss(dict(layer.named_parameters()), xs[0]), list(layer.parameters()))
    for n, e in zip(params, eager):
        torch.testing.assert_close(grads[n], e)
    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, xs)
    for n in params:
        torch.testing.assert_close(per_sample[n][1], grad(loss)(params, xs[1])[n])


# -- the command line -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NEW)
def test_cli_trains_and_evaluates_new_cells_with_regularisers(name, tmp_path, capsys):
    from rnnmath import cli, data
    from rnnmath.model import load_model

    task = data.make_order_task(80, seed=5)
    (tmp_path / "train.tsv").write_text("".join(f"{t}\t{y}\n" for t, y in zip(task.texts, task.labels)))
    out = tmp_path / "model"
    argv = ["train", "--data", str(tmp_path / "train.tsv"), "--out", str(out), "--quiet", "--cell", name,
            "--recurrent-dropout", "0.2", "--zoneout", "0.1", "--hidden", "8", "--vocab-size", "40",
            "--max-len", "10", "--epochs", "1", "--batch-size", "16"]
    assert cli.main(argv) == 0
    trained = load_model(out)
    assert trained.config.cell == name
    assert trained.model.rnn.cells[0].__class__ is CELLS[name]
    assert (trained.model.rnn.recurrent_dropout, trained.model.rnn.zoneout) == (0.2, 0.1)
    assert cli.main(["evaluate", str(out), "--data", str(tmp_path / "train.tsv"), "--json"]) == 0
    capsys.readouterr()


# -- a new cell written wrongly: the mistake named at once ----------------------------------------------------
def test_a_step_that_returns_a_bare_tensor_is_named_at_the_first_step():
    class Bare(rnnmath.Cell):
        num_gates = 1

        def step(self, p, x, state):
            return torch.tanh(x + F.linear(state.h, p["weight_hh"], p["bias_hh"]))  # not HiddenState(...)

    with pytest.raises(TypeError, match=r"Bare\.step returned a Tensor; it must return the cell's state, a "
                                        r"HiddenState"):
        Recurrent(Bare, 3, 4)(torch.randn(5, 2, 3))
    with pytest.raises(TypeError, match=r"Bare\.step returned a Tensor"):
        Bare(3, 4)(torch.randn(2, 3))


def test_a_cell_without_step_says_where_its_equations_go():
    class Empty(rnnmath.Cell):
        num_gates = 1

    with pytest.raises(NotImplementedError, match=r"Empty defines no step\(p, x, state\).*docs/cells.md"):
        Recurrent(Empty, 3, 4)(torch.randn(5, 2, 3))
