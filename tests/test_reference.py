"""The NumPy reference against finite differences and against torch.nn, for every cell."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnnmath import reference

CELLS = ["rnn_tanh", "rnn_relu", "lstm", "gru"]
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}
T, B, I, H = 5, 3, 4, 3


# One calling convention for all cells: states is (h,) or (h, c).


def forward(cell, params, x, states, lengths=None):
    if cell == "lstm":
        out, h_n, c_n, cache = reference.lstm_forward(params, x, *states, lengths=lengths)
        return out, (h_n, c_n), cache
    if cell == "gru":
        out, h_n, cache = reference.gru_forward(params, x, *states, lengths=lengths)
        return out, (h_n,), cache
    nonlinearity = cell.removeprefix("rnn_")
    out, h_n, cache = reference.rnn_forward(params, x, *states, lengths=lengths, nonlinearity=nonlinearity)
    return out, (h_n,), cache


def backward(cell, params, cache, d_out, d_states):
    if cell == "lstm":
        return reference.lstm_backward(params, cache, d_out, *d_states)
    if cell == "gru":
        return reference.gru_backward(params, cache, d_out, *d_states)
    return reference.rnn_backward(params, cache, d_out, *d_states)


def state_names(cell):
    return ["h0", "c0"] if cell == "lstm" else ["h0"]


def random_problem(cell, bias, rng, T=T, B=B, I=I, H=H):
    G = GATES[cell] * H
    params = {"weight_ih": rng.normal(0, 0.6, (G, I)), "weight_hh": rng.normal(0, 0.6, (G, H))}
    if bias:
        params |= {"bias_ih": rng.normal(0, 0.5, G), "bias_hh": rng.normal(0, 0.5, G)}
    x = rng.normal(size=(T, B, I))
    states = tuple(rng.normal(size=(B, H)) for _ in state_names(cell))
    return params, x, states


def loss_weights(cell, rng, T=T, B=B, H=H):
    """R1 for the outputs and one R per final state: L = Σ out ⊙ R1 + Σ h_n ⊙ R2 (+ Σ c_n ⊙ R3)."""
    return rng.normal(size=(T, B, H)), tuple(rng.normal(size=(B, H)) for _ in state_names(cell))


# ---------------------------------------------------------------------------------------------------------
# Finite differences
# ---------------------------------------------------------------------------------------------------------


def test_numerical_gradient_of_a_known_function():
    a = np.array([[0.5, -1.0], [2.0, 0.25]])
    grad = reference.numerical_gradient(lambda: float((a**3).sum()), a)
    np.testing.assert_allclose(grad, 3 * a**2, rtol=1e-9)
    np.testing.assert_array_equal(a, [[0.5, -1.0], [2.0, 0.25]])  # restored after nudging


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("lengths", [None, [5, 0, 3]], ids=["full", "lengths"])
@pytest.mark.parametrize("cell", CELLS)
def test_gradients_match_finite_differences(cell, lengths, bias):
    rng = np.random.default_rng(1234)
    params, x, states = random_problem(cell, bias, rng)
    R_out, R_states = loss_weights(cell, rng)

    def loss() -> float:
        out, finals, _ = forward(cell, params, x, states, lengths)
        return float((out * R_out).sum() + sum((s * R).sum() for s, R in zip(finals, R_states, strict=True)))

    _, _, cache = forward(cell, params, x, states, lengths)
    grads = backward(cell, params, cache, R_out, R_states)

    inputs = {**params, "x": x, **dict(zip(state_names(cell), states, strict=True))}
    assert set(grads) == set(inputs)
    for name, array in inputs.items():
        numeric = reference.numerical_gradient(loss, array)
        assert np.abs(numeric).max() > 1e-3, f"{name}: the loss does not depend on it, the check is empty"
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-8, err_msg=name)


# ---------------------------------------------------------------------------------------------------------
# Padding semantics
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", CELLS)
def test_steps_past_the_length_keep_the_state_and_output_zero(cell):
    rng = np.random.default_rng(7)
    params, x, states = random_problem(cell, True, rng)
    lengths = np.array([5, 0, 2])
    out, finals, cache = forward(cell, params, x, states, lengths)
    out_2, finals_2, _ = forward(cell, params, x[:2, 2:], tuple(s[2:] for s in states))

    for s, s0, s2 in zip(finals, states, finals_2, strict=True):
        np.testing.assert_array_equal(s[1], s0[1])  # length 0: the initial state
        np.testing.assert_allclose(s[2], s2[0], rtol=1e-14)  # length 2: the state after two steps
    np.testing.assert_array_equal(out[:, 1], 0)
    np.testing.assert_array_equal(out[2:, 2], 0)
    np.testing.assert_allclose(out[:2, 2], out_2[:, 0], rtol=1e-14)

    R_out, R_states = loss_weights(cell, rng)
    grads = backward(cell, params, cache, R_out, R_states)
    np.testing.assert_array_equal(grads["x"][:, 1], 0)
    np.testing.assert_array_equal(grads["x"][2:, 2], 0)
    for name, R in zip(state_names(cell), R_states, strict=True):
        np.testing.assert_array_equal(grads[name][1], R[1])  # ∂L/∂h0 = ∂L/∂h_n when nothing ran

    out_full, _, _ = forward(cell, params, x, states, np.full(B, T))
    np.testing.assert_array_equal(out_full, forward(cell, params, x, states)[0])


def test_errors_name_the_problem():
    rng = np.random.default_rng(0)
    params, x, (h0,) = random_problem("gru", True, rng)
    with pytest.raises(ValueError, match="lengths"):
        reference.gru_forward(params, x, h0, lengths=np.array([6, 1, 1]))
    with pytest.raises(ValueError, match="weight_ih"):
        reference.rnn_forward(params, x, h0)  # GRU weights have 3H rows, an RNN needs H
    with pytest.raises(ValueError, match="nonlinearity"):
        reference.rnn_forward({k: v[:H] for k, v in params.items()}, x, h0, nonlinearity="sigmoid")


# ---------------------------------------------------------------------------------------------------------
# Against torch.nn
# ---------------------------------------------------------------------------------------------------------


def torch_module(cell, input_size, hidden_size, bias):
    kwargs = dict(bias=bias, dtype=torch.float64)
    if cell == "lstm":
        return torch.nn.LSTM(input_size, hidden_size, **kwargs)
    if cell == "gru":
        return torch.nn.GRU(input_size, hidden_size, **kwargs)
    return torch.nn.RNN(input_size, hidden_size, nonlinearity=cell.removeprefix("rnn_"), **kwargs)


def check_against_torch(cell, bias, lengths, T, B, I, H, seed):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    module = torch_module(cell, I, H, bias)
    params = {name.removesuffix("_l0"): p.detach().numpy().copy() for name, p in module.named_parameters()}
    _, x, states = random_problem(cell, bias, rng, T, B, I, H)
    R_out, R_states = loss_weights(cell, rng, T, B, H)

    x_t = torch.tensor(x, requires_grad=True)
    states_t = [torch.tensor(s[None], requires_grad=True) for s in states]  # torch wants (layers, B, H)
    hx = tuple(states_t) if cell == "lstm" else states_t[0]
    if lengths is None:
        out_t, finals_t = module(x_t, hx)
    else:
        packed = pack_padded_sequence(x_t, torch.tensor(lengths), enforce_sorted=False)
        out_packed, finals_t = module(packed, hx)
        out_t, _ = pad_packed_sequence(out_packed, total_length=T)
    finals_t = finals_t if cell == "lstm" else (finals_t,)
    loss = (out_t * torch.tensor(R_out)).sum()
    loss = loss + sum((s[0] * torch.tensor(R)).sum() for s, R in zip(finals_t, R_states, strict=True))
    loss.backward()

    out, finals, cache = forward(cell, params, x, states, lengths)
    grads = backward(cell, params, cache, R_out, R_states)

    tol = dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out, out_t.detach().numpy(), **tol, err_msg="out")
    for name, s, s_t in zip(["h_n", "c_n"][: len(finals)], finals, finals_t, strict=True):
        np.testing.assert_allclose(s, s_t[0].detach().numpy(), **tol, err_msg=name)
    for name, p in module.named_parameters():
        np.testing.assert_allclose(grads[name.removesuffix("_l0")], p.grad.numpy(), **tol, err_msg=name)
    np.testing.assert_allclose(grads["x"], x_t.grad.numpy(), **tol, err_msg="x")
    for name, s_t in zip(state_names(cell), states_t, strict=True):
        np.testing.assert_allclose(grads[name], s_t.grad[0].numpy(), **tol, err_msg=name)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("lengths", [None, [5, 1, 3]], ids=["full", "packed"])
@pytest.mark.parametrize("cell", CELLS)
def test_matches_torch(cell, lengths, bias):
    check_against_torch(cell, bias, lengths, T, B, I, H, seed=0)


@st.composite
def shapes_and_lengths(draw):
    T, B = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    lengths = draw(st.none() | st.lists(st.integers(1, T), min_size=B, max_size=B))
    return T, B, draw(st.integers(1, 5)), draw(st.integers(1, 5)), lengths


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(CELLS), st.booleans(), shapes_and_lengths(), st.integers(0, 999))
def test_matches_torch_for_any_shape(cell, bias, problem, seed):
    T, B, I, H, lengths = problem
    check_against_torch(cell, bias, lengths, T, B, I, H, seed)
