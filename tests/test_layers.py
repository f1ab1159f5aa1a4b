"""rnnmath's cells and layers against torch.nn, the oracle: values and gradients, on both compute paths."""

import itertools

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnmath
from rnnmath import reference

KINDS = {  # name -> (rnnmath class, torch class, constructor kwargs)
    "rnn_tanh": (rnnmath.RNN, torch.nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (rnnmath.RNN, torch.nn.RNN, {"nonlinearity": "relu"}),
    "lstm": (rnnmath.LSTM, torch.nn.LSTM, {}),
    "gru": (rnnmath.GRU, torch.nn.GRU, {}),
}
T, B, I, H = 5, 3, 4, 3
LENGTHS = [5, 2, 4]  # one full, one short: steps past a length must not leak


def make_pair(kind, dtype=torch.float64, seed=0, **options):
    ours_cls, torch_cls, kwargs = KINDS[kind]
    torch.manual_seed(seed)
    theirs = torch_cls(I, H, **kwargs, **options).to(dtype)
    ours = ours_cls(I, H, **kwargs, **options).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def states(h):
    return list(h) if isinstance(h, tuple) else [h]


def run(module, x, hx, mode, batch_first, ours):
    """Call a layer in one of three ways and return (padded output, [h_n, (c_n)])."""
    lengths = torch.tensor(LENGTHS)
    if mode == "dense":
        out, h = module(x, hx)
    elif mode == "lengths" and ours:
        out, h = module(x, hx, lengths=lengths)
    else:  # packed, or torch's way of doing lengths
        packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
        out, h = module(packed, hx)
        if mode == "packed" and ours:
            assert isinstance(out, torch.nn.utils.rnn.PackedSequence)
        out, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=T)
    return out, states(h)


def compare(kind, num_layers, bidirectional, batch_first, bias, mode, give_hx, fast, dtype, tol):
    options = dict(num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias)
    ours, theirs = make_pair(kind, dtype, **options)
    ours.fast = fast
    g = torch.Generator().manual_seed(1)
    shape = (B, T, I) if batch_first else (T, B, I)
    x = torch.randn(shape, generator=g, dtype=dtype)
    D = 2 if bidirectional else 1
    n_states = 2 if kind == "lstm" else 1
    hx = [torch.randn(num_layers * D, B, H, generator=g, dtype=dtype) for _ in range(n_states)] if give_hx else None
    weights_out = torch.randn(*shape[:2], D * H, generator=g, dtype=dtype)
    weights_h = [torch.randn(num_layers * D, B, H, generator=g, dtype=dtype) for _ in range(n_states)]

    results = []
    for module, is_ours in ((ours, True), (theirs, False)):
        xi = x.clone().requires_grad_()
        hxi = None if hx is None else [s.clone().requires_grad_() for s in hx]
        hx_arg = None if hxi is None else (hxi[0] if n_states == 1 else tuple(hxi))
        out, h = run(module, xi, hx_arg, mode, batch_first, is_ours)
        loss = (out * weights_out).sum() + sum((s * w).sum() for s, w in zip(h, weights_h))
        leaves = [xi, *(hxi or []), *module.parameters()]
        grads = torch.autograd.grad(loss, leaves)
        results.append(([out, *h], grads))
    (values_ours, grads_ours), (values_torch, grads_torch) = results
    for a, b in zip(values_ours, values_torch):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    names = ["input"] + [f"hx[{i}]" for i in range(len(hx or []))] + [n for n, _ in ours.named_parameters()]
    for name, a, b in zip(names, grads_ours, grads_torch):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m, name=name: f"gradient of {name}: {m}")


GRID = list(itertools.product(KINDS, [1, 2, 3], [False, True], [False, True], [True, False],
                              ["dense", "lengths", "packed"], [False, True]))


@pytest.mark.parametrize("fast", [False, True], ids=["loop", "fast"])
@pytest.mark.parametrize("kind,num_layers,bidirectional,batch_first,bias,mode,give_hx", GRID)
def test_layer_equals_torch_float64(kind, num_layers, bidirectional, batch_first, bias, mode, give_hx, fast):
    compare(kind, num_layers, bidirectional, batch_first, bias, mode, give_hx, fast, torch.float64, 1e-10)


@pytest.mark.parametrize("fast", [False, True], ids=["loop", "fast"])
@pytest.mark.parametrize("mode", ["dense", "lengths", "packed"])
@pytest.mark.parametrize("kind", KINDS)
def test_layer_equals_torch_float32(kind, mode, fast):
    compare(kind, 2, True, False, True, mode, True, fast, torch.float32, 1e-5)


def test_two_layer_bidirectional_lstm_on_packed_sequence():
    """The core issue's acceptance case, spelled out: values and every gradient equal torch.nn.LSTM's."""
    compare("lstm", 2, True, False, True, "packed", True, True, torch.float32, 1e-5)
    compare("lstm", 2, True, False, True, "packed", True, False, torch.float64, 1e-10)


@pytest.mark.parametrize("fast", [False, True], ids=["loop", "fast"])
@pytest.mark.parametrize("kind", KINDS)
def test_zero_length_sequence_returns_initial_state(kind, fast):
    ours, theirs = make_pair(kind, bidirectional=True)
    ours.fast = fast
    x = torch.randn(T, B, I, dtype=torch.float64)
    n_states = 2 if kind == "lstm" else 1
    hx = [torch.randn(2, B, H, dtype=torch.float64) for _ in range(n_states)]
    hx_arg = hx[0] if n_states == 1 else tuple(hx)
    out, h = ours(x, hx_arg, lengths=torch.tensor([5, 0, 3]))
    assert torch.equal(out[:, 1], torch.zeros(T, 2 * H, dtype=torch.float64))
    for ours_state, initial in zip(states(h), hx):
        assert torch.equal(ours_state[:, 1], initial[:, 1])
    # the other sequences are unaffected by their zero-length neighbour
    keep = torch.tensor([0, 2])
    packed = pack_padded_sequence(x[:, keep], torch.tensor([5, 3]), enforce_sorted=False)
    hx_keep = [s[:, keep] for s in hx]
    out_t, h_t = theirs(packed, hx_keep[0] if n_states == 1 else tuple(hx_keep))
    out_t, _ = pad_packed_sequence(out_t, total_length=T)
    torch.testing.assert_close(out[:, keep], out_t, atol=1e-12, rtol=1e-12)
    for a, b in zip(states(h), states(h_t)):
        torch.testing.assert_close(a[:, keep], b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_unbatched_input(kind):
    ours, theirs = make_pair(kind, num_layers=2)
    x = torch.randn(T, I, dtype=torch.float64)
    out_o, h_o = ours(x)
    out_t, h_t = theirs(x)
    torch.testing.assert_close(out_o, out_t, atol=1e-12, rtol=1e-12)
    for a, b in zip(states(h_o), states(h_t)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


# -- cells ---------------------------------------------------------------------------------------------------
CELL_KINDS = {
    "rnn_tanh": (rnnmath.RNNCell, torch.nn.RNNCell, {"nonlinearity": "tanh"}),
    "rnn_relu": (rnnmath.RNNCell, torch.nn.RNNCell, {"nonlinearity": "relu"}),
    "lstm": (rnnmath.LSTMCell, torch.nn.LSTMCell, {}),
    "gru": (rnnmath.GRUCell, torch.nn.GRUCell, {}),
}


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("give_hx", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", CELL_KINDS)
def test_cell_equals_torch(kind, bias, give_hx, batched):
    ours_cls, torch_cls, kwargs = CELL_KINDS[kind]
    theirs = torch_cls(I, H, bias=bias, **kwargs).double()
    ours = ours_cls(I, H, bias=bias, **kwargs).double()
    ours.load_state_dict(theirs.state_dict())
    shape = (B,) if batched else ()
    x = torch.randn(*shape, I, dtype=torch.float64, requires_grad=True)
    n_states = 2 if kind == "lstm" else 1
    hx = [torch.randn(*shape, H, dtype=torch.float64) for _ in range(n_states)] if give_hx else None
    outputs = []
    for module in (ours, theirs):
        arg = None if hx is None else (hx[0] if n_states == 1 else tuple(hx))
        out = states(module(x, arg))
        loss = sum((o * (k + 1.5)).sum() for k, o in enumerate(out))
        outputs.append((out, torch.autograd.grad(loss, [x, *module.parameters()])))
    for a, b in zip(outputs[0][0] + list(outputs[0][1]), outputs[1][0] + list(outputs[1][1])):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dicts_load_both_ways(kind):
    ours_cls, torch_cls, kwargs = KINDS[kind]
    options = dict(num_layers=2, bidirectional=True, bias=True)
    ours, theirs = ours_cls(I, H, **kwargs, **options), torch_cls(I, H, **kwargs, **options)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]
    theirs.load_state_dict(ours.state_dict())
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)
    fresh = ours_cls(I, H, **kwargs, **options)
    fresh.load_state_dict(theirs.state_dict())
    for a, b in zip(fresh.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)
    cell_cls, torch_cell_cls, _ = CELL_KINDS[kind]
    cell, torch_cell = cell_cls(I, H, **kwargs), torch_cell_cls(I, H, **kwargs)
    cell.load_state_dict(torch_cell.state_dict())
    torch_cell.load_state_dict(cell.state_dict())


def test_initialisation_matches_torch_distribution():
    torch.manual_seed(0)
    layer = rnnmath.LSTM(10, 50, num_layers=2)
    bound = 1 / 50**0.5
    for p in layer.parameters():
        assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound


# -- token ids: the seed's one-hot input ---------------------------------------------------------------------
@pytest.mark.parametrize("fast", [False, True], ids=["loop", "fast"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_token_ids_equal_one_hot_product(kind, batch_first, fast):
    V = 11
    ours_cls, torch_cls, kwargs = KINDS[kind]
    torch.manual_seed(0)
    ids_layer = ours_cls(V, H, bidirectional=True, batch_first=batch_first, **kwargs).double()
    ids_layer.fast = fast
    torch_layer = torch_cls(V, H, bidirectional=True, batch_first=batch_first, **kwargs).double()
    torch_layer.load_state_dict(ids_layer.state_dict())
    ids = torch.randint(0, V, (B, T) if batch_first else (T, B))
    one_hot = torch.nn.functional.one_hot(ids, V).double()
    lengths = torch.tensor(LENGTHS)
    out_ids, h_ids = ids_layer(ids, lengths=lengths)
    packed = pack_padded_sequence(one_hot, lengths, batch_first=batch_first, enforce_sorted=False)
    out_oh, h_oh = torch_layer(packed)
    out_oh, _ = pad_packed_sequence(out_oh, batch_first=batch_first, total_length=T)
    torch.testing.assert_close(out_ids, out_oh, atol=1e-12, rtol=1e-12)
    g_ids = torch.autograd.grad(out_ids.sum() + sum(s.sum() for s in states(h_ids)), list(ids_layer.parameters()))
    g_oh = torch.autograd.grad(out_oh.sum() + sum(s.sum() for s in states(h_oh)), list(torch_layer.parameters()))
    for a, b in zip(g_ids, g_oh):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_token_ids_out_of_range_is_a_clear_error():
    layer = rnnmath.RNN(10, 3)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 10\).*got values from 0 to 10"):
        layer(torch.tensor([[0], [10]]))
    with pytest.raises(ValueError, match="got values from -1"):
        layer(torch.tensor([[-1], [2]]))


def test_packed_token_ids():
    layer = rnnmath.GRU(7, 3)
    ids = torch.randint(0, 7, (T, B))
    packed = pack_padded_sequence(ids, torch.tensor(LENGTHS), enforce_sorted=False)
    out, h = layer(packed)
    out, _ = pad_packed_sequence(out, total_length=T)
    out_l, h_l = layer(ids, lengths=torch.tensor(LENGTHS))
    torch.testing.assert_close(out, out_l)
    torch.testing.assert_close(h, h_l)


# -- gradcheck and the NumPy reference -----------------------------------------------------------------------
@pytest.mark.parametrize("fast", [False, True], ids=["loop", "fast"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(kind, fast):
    ours_cls, _, kwargs = KINDS[kind]
    torch.manual_seed(0)
    layer = ours_cls(2, 2, num_layers=2, bidirectional=True, **kwargs).double()
    layer.fast = fast
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    params = list(layer.parameters())

    def f(x, *weights):
        with torch.nn.utils.stateless._reparametrize_module(layer, dict(zip(dict(layer.named_parameters()), weights))):
            out, h = layer(x, lengths=torch.tensor([3, 1]))
        return out, *states(h)

    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("kind", KINDS)
def test_layer_equals_numpy_reference(kind):
    ours_cls, _, kwargs = KINDS[kind]
    torch.manual_seed(0)
    layer = ours_cls(I, H, **kwargs).double()
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    lengths = [5, 0, 3]
    n_states = 2 if kind == "lstm" else 1
    hx = [torch.randn(1, B, H, dtype=torch.float64, requires_grad=True) for _ in range(n_states)]
    out, h = layer(x, hx[0] if n_states == 1 else tuple(hx), lengths=torch.tensor(lengths))
    d_out, d_h = torch.randn_like(out), [torch.randn(1, B, H, dtype=torch.float64) for _ in range(n_states)]
    loss = (out * d_out).sum() + sum((s * d).sum() for s, d in zip(states(h), d_h))
    grads = dict(zip(["x", "h0", "c0"][: n_states + 1], torch.autograd.grad(loss, [x, *hx], retain_graph=True)))
    grads.update({n[: -len("_l0")]: g for n, g in zip(dict(layer.named_parameters()),
                                                         torch.autograd.grad(loss, list(layer.parameters())))})

    params = {n[: -len("_l0")]: p.detach().numpy() for n, p in layer.named_parameters()}
    lens = np.array(lengths)
    if kind == "lstm":
        ref_out, ref_h, ref_c, cache = reference.lstm_forward(params, x.detach().numpy(), hx[0][0].detach().numpy(),
                                                              hx[1][0].detach().numpy(), lens)
        ref_grads = reference.lstm_backward(params, cache, d_out.numpy(), d_h[0][0].numpy(), d_h[1][0].numpy())
        ref_states = [ref_h, ref_c]
    else:
        forward, backward = (reference.gru_forward, reference.gru_backward) if kind == "gru" else (
            reference.rnn_forward, reference.rnn_backward)
        extra = {} if kind == "gru" else {"nonlinearity": kwargs["nonlinearity"]}
        ref_out, ref_h, cache = forward(params, x.detach().numpy(), hx[0][0].detach().numpy(), lens, **extra)
        ref_grads = backward(params, cache, d_out.numpy(), d_h[0][0].numpy())
        ref_states = [ref_h]
    np.testing.assert_allclose(out.detach().numpy(), ref_out, atol=1e-12)
    for s, r in zip(states(h), ref_states):
        np.testing.assert_allclose(s[0].detach().numpy(), r, atol=1e-12)
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        g = g[0] if name in ("h0", "c0") else g
        np.testing.assert_allclose(g.numpy(), ref_grads[name], atol=1e-10, err_msg=name)


# -- training-mode behaviour, tracing and errors -------------------------------------------------------------
def test_dropout_between_layers_only_in_training():
    ours, theirs = make_pair("lstm", num_layers=3, dropout=0.5)
    x = torch.randn(T, B, I, dtype=torch.float64)
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(ours(x)[0], theirs(x)[0], atol=1e-12, rtol=1e-12)
    ours.train()
    torch.manual_seed(3)
    a = ours(x)[0]
    torch.manual_seed(4)
    b = ours(x)[0]
    assert not torch.allclose(a, b)  # dropout is active and random in training mode
    single, single_t = make_pair("gru", num_layers=1)  # no layer to drop between: torch warns, both identical
    single.dropout = 0.5
    single.train()
    torch.testing.assert_close(single(x)[0], single_t(x)[0], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_trace_is_bit_identical_and_complete(kind, monkeypatch):
    ours, _ = make_pair(kind, num_layers=2, bidirectional=True, dtype=torch.float32)
    x = torch.randn(T, B, I)
    lengths = torch.tensor(LENGTHS)
    out_kernel, h_kernel = ours(x, lengths=lengths)  # torch's fused operator: equal within float32 rounding
    monkeypatch.setattr(rnnmath.layers, "torch_kernels", False)
    out, h = ours(x, lengths=lengths)  # rnnmath's fused loop: bit-identical to the traced readable loop
    with rnnmath.trace(ours) as tr:
        out_t, h_t = ours(x, lengths=lengths)
    assert torch.equal(out, out_t)
    torch.testing.assert_close(out_kernel, out_t, rtol=1e-5, atol=1e-6)
    for a, b, c in zip(states(h), states(h_t), states(h_kernel)):
        assert torch.equal(a, b)
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6)
    gates = {"lstm": "ifgo", "gru": "rzn"}.get(kind, "")
    for k, d in itertools.product(range(2), range(2)):
        values = tr[k, d]
        assert set(values) == set(gates) | ({"h", "c"} if kind == "lstm" else {"h"})
        h_traced = values["h"]
        valid = tr.valid.unsqueeze(2).expand_as(h_traced)
        if k == 1:  # the top layer's traced h is the output, on the input's time axis
            assert torch.equal(h_traced[valid], out[..., d * H:(d + 1) * H][valid])
        assert torch.isnan(h_traced[~valid]).all()


def test_clear_errors():
    """Messages name the argument and the expected shape; types are torch.nn's (tests/test_conformance.py)."""
    layer = rnnmath.LSTM(I, H)
    x = torch.randn(T, B, I)
    with pytest.raises(RuntimeError, match=r"input_size. Expected 4, got 5"):
        layer(torch.randn(T, B, 5))
    with pytest.raises(ValueError, match=r"hx must be 2 tensor"):
        layer(x, torch.zeros(1, B, H))
    with pytest.raises(RuntimeError, match=r"Expected hidden size \(1, 3, 3\) for hx field 'c'"):
        layer(x, (torch.zeros(1, B, H), torch.zeros(1, B, 4)))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 5\]"):
        layer(x, lengths=torch.tensor([6, 1, 1]))
    with pytest.raises(ValueError, match=r"lengths must have shape \(3,\)"):
        layer(x, lengths=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="dropout should be a number in"):
        rnnmath.LSTM(I, H, dropout=1.5)
    with pytest.raises(ValueError, match="Unknown nonlinearity"):
        rnnmath.RNN(I, H, nonlinearity="sigmoid")


# -- property: any shape, lengths and options match torch.nn ------------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(KINDS)), data=st.data(), T_=st.integers(1, 6), B_=st.integers(1, 4),
       I_=st.integers(1, 5), H_=st.integers(1, 5), num_layers=st.integers(1, 3), bidirectional=st.booleans(),
       batch_first=st.booleans(), bias=st.booleans(), fast=st.booleans())
def test_random_configurations_match_torch(kind, data, T_, B_, I_, H_, num_layers, bidirectional, batch_first,
                                           bias, fast):
    lengths = torch.tensor(data.draw(st.lists(st.integers(1, T_), min_size=B_, max_size=B_)))
    ours_cls, torch_cls, kwargs = KINDS[kind]
    options = dict(num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias)
    theirs = torch_cls(I_, H_, **kwargs, **options).double()
    ours = ours_cls(I_, H_, **kwargs, **options).double()
    ours.load_state_dict(theirs.state_dict())
    ours.fast = fast
    x = torch.randn((B_, T_, I_) if batch_first else (T_, B_, I_), dtype=torch.float64, requires_grad=True)
    out, h = ours(x, lengths=lengths)
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    out_t, h_t = theirs(packed)
    out_t, _ = pad_packed_sequence(out_t, batch_first=batch_first, total_length=T_)
    torch.testing.assert_close(out, out_t, atol=1e-10, rtol=1e-10)
    for a, b in zip(states(h), states(h_t)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    loss_o = out.square().sum() + sum(s.sum() for s in states(h))
    loss_t = out_t.square().sum() + sum(s.sum() for s in states(h_t))
    for a, b in zip(torch.autograd.grad(loss_o, [x, *ours.parameters()]),
                    torch.autograd.grad(loss_t, [x, *theirs.parameters()])):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
