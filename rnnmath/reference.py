"""NumPy reference for one-layer RNN, LSTM and GRU, with hand-derived backpropagation through time.

This module is the project's independent oracle: plain NumPy in float64, no torch. It uses exactly
torch.nn's parameter names and gate order, so a torch state dict (with the ``_l0`` suffix dropped) loads
as is, and the tests hold it equal to torch.nn and to finite differences.

Shapes, declared once::

    T  time steps        B  batch          I  input features
    H  hidden units      G  gate rows: H (RNN), 4H (LSTM, blocks i|f|g|o), 3H (GRU, blocks r|z|n)

Parameters are a dict ``{"weight_ih": (G, I), "weight_hh": (G, H), "bias_ih": (G,), "bias_hh": (G,)}``;
absent biases count as zero. Inputs are ``x`` (T, B, I) and the initial state ``h0`` (B, H) (and ``c0``
for the LSTM). Optional ``lengths`` (B,) mark padding: at steps t >= lengths[b] sequence b keeps its state
and outputs zeros, as torch's packed sequences do, so ``h_n`` is each sequence's state at its own last step.

How gradients flow back through time
------------------------------------
The forward pass is a chain h_0 -> h_1 -> ... -> h_T where every link is the same function
h_t = F(x_t, h_{t-1}). The loss touches the chain at every output h_t and at h_n, so the gradient that
reaches h_{t-1} is what h_{t-1} fed directly plus everything it fed through h_t:

    ∂L/∂h_{t-1} = (∂L/∂h_{t-1})_direct + (∂h_t/∂h_{t-1})ᵀ ∂L/∂h_t

The backward functions below walk t = T-1 ... 0, carrying ∂L/∂h_t in ``dh``: at each step they add the
output's gradient, push it through one cell (one commented line per derivative), accumulate the weight
gradients of that step, and hand the rest to step t-1. Weights are shared across steps, so their gradient
is the sum of the per-step contributions.

For the plain RNN the recurrent Jacobian is ∂h_t/∂h_{t-1} = diag(tanh'(a_t)) W_hh. A gradient that has
travelled k steps has been multiplied by k such matrices. Since |tanh'| <= 1, when the largest singular
value of W_hh is below 1 the product shrinks geometrically and early inputs stop receiving any signal
(vanishing gradients); when it is well above 1 and the units are not saturated the product can grow
geometrically (exploding gradients, which is why training clips the gradient norm).

The LSTM adds a second path, the cell: c_t = f_t ⊙ c_{t-1} + i_t ⊙ g_t. Along it the Jacobian is
∂c_t/∂c_{t-1} = diag(f_t): no weight matrix and no squashing derivative, only the forget gate, which the
network can learn to hold near 1. Because the update is additive, gradient along the cell path survives
for as long as the forget gates stay open. The GRU gets the same effect from h_t = (1 - z) ⊙ n + z ⊙ h_{t-1},
whose direct term contributes diag(z_t) to the Jacobian.

Masking for ``lengths`` is one more gate with no parameters: h_t = m_t ⊙ h̃_t + (1 - m_t) ⊙ h_{t-1} with
m_t = [t < length]. In the backward pass the candidate h̃_t receives gradient only where m_t = 1 and the
rest passes straight to h_{t-1}.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Params = dict[str, np.ndarray]


def sigmoid(a: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-a))


def _weights(params: Params, gates: int, x: np.ndarray, h0: np.ndarray):
    """Read (W_ih, W_hh, b_ih, b_hh) from ``params``, zeros for absent biases, and check the shapes."""
    W_ih, W_hh = params["weight_ih"], params["weight_hh"]
    H = h0.shape[1]
    if W_ih.shape != (gates * H, x.shape[2]) or W_hh.shape != (gates * H, H):
        raise ValueError(
            f"weight_ih {W_ih.shape} and weight_hh {W_hh.shape} do not fit x {x.shape} and h0 {h0.shape}: "
            f"expected ({gates * H}, {x.shape[2]}) and ({gates * H}, {H})"
        )
    b_ih = params.get("bias_ih", np.zeros(gates * H))
    b_hh = params.get("bias_hh", np.zeros(gates * H))
    return W_ih, W_hh, b_ih, b_hh


def _step_mask(lengths, T: int, B: int) -> np.ndarray:
    """m[t, b] = 1 while step t is inside sequence b, else 0."""
    if lengths is None:
        return np.ones((T, B, 1))
    lengths = np.asarray(lengths)
    if lengths.shape != (B,) or (lengths < 0).any() or (lengths > T).any():
        raise ValueError(f"lengths must be {B} integers in [0, {T}], got {lengths.tolist()}")
    return (np.arange(T)[:, None] < lengths[None, :])[:, :, None].astype(np.float64)  # (T, B, 1)


def _zero_grads(params: Params, x: np.ndarray) -> dict[str, np.ndarray]:
    grads = {name: np.zeros_like(value) for name, value in params.items()}
    grads["x"] = np.zeros_like(x)
    return grads


def _zeros_if_none(d: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    return np.zeros(shape) if d is None else d


# ---------------------------------------------------------------------------------------------------------
# Elman RNN:  h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)   (or relu)
# ---------------------------------------------------------------------------------------------------------


def rnn_forward(
    params: Params,
    x: np.ndarray,
    h0: np.ndarray,
    lengths: np.ndarray | None = None,
    nonlinearity: str = "tanh",
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Run the RNN over ``x``; return (out (T, B, H), h_n (B, H), cache for ``rnn_backward``)."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    W_ih, W_hh, b_ih, b_hh = _weights(params, 1, x, h0)
    T, B, _ = x.shape
    m = _step_mask(lengths, T, B)  # (T, B, 1)
    h = h0
    out, steps = np.zeros((T, B, h0.shape[1])), []
    for t in range(T):
        a = x[t] @ W_ih.T + b_ih + h @ W_hh.T + b_hh  # (B, H)
        h_new = np.tanh(a) if nonlinearity == "tanh" else np.maximum(a, 0.0)
        steps.append({"h_prev": h, "a": a, "h_new": h_new})
        out[t] = m[t] * h_new
        h = m[t] * h_new + (1 - m[t]) * h
    return out, h, {"x": x, "m": m, "steps": steps, "nonlinearity": nonlinearity}


def rnn_backward(
    params: Params, cache: dict, d_out: np.ndarray | None, d_hn: np.ndarray | None
) -> dict[str, np.ndarray]:
    """Gradients of L given ∂L/∂out (T, B, H) and ∂L/∂h_n (B, H); None means zero.

    Returns a dict with one entry per key of ``params`` plus "x" and "h0".
    """
    W_ih, W_hh = params["weight_ih"], params["weight_hh"]
    x, m, steps = cache["x"], cache["m"], cache["steps"]
    grads = _zero_grads(params, x)
    T, B, H = x.shape[0], x.shape[1], W_hh.shape[1]
    d_out = _zeros_if_none(d_out, (T, B, H))
    dh = _zeros_if_none(d_hn, (B, H))  # ∂L/∂h_T
    for t in reversed(range(T)):
        s = steps[t]
        dh_new = m[t] * (dh + d_out[t])  # ∂L/∂h̃_t: the candidate reaches the loss only on real steps
        if cache["nonlinearity"] == "tanh":
            da = dh_new * (1 - s["h_new"] ** 2)  # ∂L/∂a_t = ∂L/∂h̃_t ⊙ (1 − tanh²a_t)
        else:
            da = dh_new * (s["a"] > 0)  # ∂L/∂a_t = ∂L/∂h̃_t ⊙ [a_t > 0]
        grads["weight_ih"] += da.T @ x[t]  # ∂L/∂W_ih += ∂L/∂a_t x_tᵀ
        grads["weight_hh"] += da.T @ s["h_prev"]  # ∂L/∂W_hh += ∂L/∂a_t h_{t-1}ᵀ
        if "bias_ih" in grads:
            grads["bias_ih"] += da.sum(0)  # ∂L/∂b_ih += Σ_batch ∂L/∂a_t
        if "bias_hh" in grads:
            grads["bias_hh"] += da.sum(0)  # ∂L/∂b_hh += Σ_batch ∂L/∂a_t
        grads["x"][t] = da @ W_ih  # ∂L/∂x_t = W_ihᵀ ∂L/∂a_t
        dh = da @ W_hh + (1 - m[t]) * dh  # ∂L/∂h_{t-1} = W_hhᵀ ∂L/∂a_t + (1 − m_t) ⊙ ∂L/∂h_t
    grads["h0"] = dh
    return grads


# ---------------------------------------------------------------------------------------------------------
# LSTM:  i, f, g, o = σ, σ, tanh, σ of (W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), split into four H blocks
#        c_t = f ⊙ c_{t-1} + i ⊙ g        h_t = o ⊙ tanh(c_t)
# ---------------------------------------------------------------------------------------------------------


def lstm_forward(
    params: Params,
    x: np.ndarray,
    h0: np.ndarray,
    c0: np.ndarray,
    lengths: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Run the LSTM over ``x``; return (out (T, B, H), h_n (B, H), c_n (B, H), cache for lstm_backward)."""
    W_ih, W_hh, b_ih, b_hh = _weights(params, 4, x, h0)
    T, B, _ = x.shape
    H = h0.shape[1]
    m = _step_mask(lengths, T, B)  # (T, B, 1)
    h, c = h0, c0
    out, steps = np.zeros((T, B, H)), []
    for t in range(T):
        gates = x[t] @ W_ih.T + b_ih + h @ W_hh.T + b_hh  # (B, 4H)
        i = sigmoid(gates[:, 0 * H : 1 * H])
        f = sigmoid(gates[:, 1 * H : 2 * H])
        g = np.tanh(gates[:, 2 * H : 3 * H])
        o = sigmoid(gates[:, 3 * H : 4 * H])
        c_new = f * c + i * g  # (B, H)
        tanh_c = np.tanh(c_new)
        h_new = o * tanh_c  # (B, H)
        steps.append({"h_prev": h, "c_prev": c, "i": i, "f": f, "g": g, "o": o, "tanh_c": tanh_c})
        out[t] = m[t] * h_new
        h = m[t] * h_new + (1 - m[t]) * h
        c = m[t] * c_new + (1 - m[t]) * c
    return out, h, c, {"x": x, "m": m, "steps": steps}


def lstm_backward(
    params: Params,
    cache: dict,
    d_out: np.ndarray | None,
    d_hn: np.ndarray | None,
    d_cn: np.ndarray | None,
) -> dict[str, np.ndarray]:
    """Gradients of L given ∂L/∂out, ∂L/∂h_n and ∂L/∂c_n; None means zero.

    Returns a dict with one entry per key of ``params`` plus "x", "h0" and "c0".
    """
    W_ih, W_hh = params["weight_ih"], params["weight_hh"]
    x, m, steps = cache["x"], cache["m"], cache["steps"]
    grads = _zero_grads(params, x)
    T, B, H = x.shape[0], x.shape[1], W_hh.shape[1]
    d_out = _zeros_if_none(d_out, (T, B, H))
    dh = _zeros_if_none(d_hn, (B, H))  # ∂L/∂h_T
    dc = _zeros_if_none(d_cn, (B, H))  # ∂L/∂c_T
    for t in reversed(range(T)):
        s = steps[t]
        i, f, g, o, tanh_c = s["i"], s["f"], s["g"], s["o"], s["tanh_c"]
        dh_new = m[t] * (dh + d_out[t])  # ∂L/∂h̃_t, real steps only
        dc_new = dh_new * o * (1 - tanh_c**2) + m[t] * dc  # ∂L/∂c̃_t = ∂L/∂h̃_t ⊙ o ⊙ (1 − tanh²c_t) + ∂L/∂c_t
        do = dh_new * tanh_c  # ∂L/∂o = ∂L/∂h̃_t ⊙ tanh c_t
        di = dc_new * g  # ∂L/∂i = ∂L/∂c̃_t ⊙ g
        df = dc_new * s["c_prev"]  # ∂L/∂f = ∂L/∂c̃_t ⊙ c_{t-1}
        dg = dc_new * i  # ∂L/∂g = ∂L/∂c̃_t ⊙ i
        d_gates = np.concatenate(  # ∂L/∂(pre-activations), blocks i|f|g|o  (B, 4H)
            [
                di * i * (1 - i),  # σ' = σ(1 − σ)
                df * f * (1 - f),
                dg * (1 - g**2),  # tanh' = 1 − tanh²
                do * o * (1 - o),
            ],
            axis=1,
        )
        grads["weight_ih"] += d_gates.T @ x[t]  # ∂L/∂W_ih += ∂L/∂gates x_tᵀ
        grads["weight_hh"] += d_gates.T @ s["h_prev"]  # ∂L/∂W_hh += ∂L/∂gates h_{t-1}ᵀ
        if "bias_ih" in grads:
            grads["bias_ih"] += d_gates.sum(0)  # ∂L/∂b_ih += Σ_batch ∂L/∂gates
        if "bias_hh" in grads:
            grads["bias_hh"] += d_gates.sum(0)  # ∂L/∂b_hh += Σ_batch ∂L/∂gates
        grads["x"][t] = d_gates @ W_ih  # ∂L/∂x_t = W_ihᵀ ∂L/∂gates
        # the additive cell path: ∂L/∂c_{t-1} = ∂L/∂c̃_t ⊙ f + (1 − m_t) ⊙ ∂L/∂c_t, no W_hh, no squashing
        dc = dc_new * f + (1 - m[t]) * dc
        dh = d_gates @ W_hh + (1 - m[t]) * dh  # ∂L/∂h_{t-1} = W_hhᵀ ∂L/∂gates + (1 − m_t) ⊙ ∂L/∂h_t
    grads["h0"] = dh
    grads["c0"] = dc
    return grads


# ---------------------------------------------------------------------------------------------------------
# GRU:  r = σ(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)
#       z = σ(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)
#       n = tanh(W_in x_t + b_in + r ⊙ (W_hn h_{t-1} + b_hn))
#       h_t = (1 − z) ⊙ n + z ⊙ h_{t-1}
# Note: torch applies r after the product W_hn h_{t-1} (+ b_hn). Cho et al. (2014) apply it before,
# W_hn (r ⊙ h_{t-1}); the two are different functions, and this reference follows torch.
# ---------------------------------------------------------------------------------------------------------


def gru_forward(
    params: Params,
    x: np.ndarray,
    h0: np.ndarray,
    lengths: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Run the GRU over ``x``; return (out (T, B, H), h_n (B, H), cache for ``gru_backward``)."""
    W_ih, W_hh, b_ih, b_hh = _weights(params, 3, x, h0)
    T, B, _ = x.shape
    H = h0.shape[1]
    m = _step_mask(lengths, T, B)  # (T, B, 1)
    h = h0
    out, steps = np.zeros((T, B, H)), []
    for t in range(T):
        gi = x[t] @ W_ih.T + b_ih  # (B, 3H), blocks r|z|n
        gh = h @ W_hh.T + b_hh  # (B, 3H), kept apart because r multiplies only its n block
        r = sigmoid(gi[:, 0 * H : 1 * H] + gh[:, 0 * H : 1 * H])
        z = sigmoid(gi[:, 1 * H : 2 * H] + gh[:, 1 * H : 2 * H])
        hn = gh[:, 2 * H : 3 * H]  # W_hn h_{t-1} + b_hn
        n = np.tanh(gi[:, 2 * H : 3 * H] + r * hn)
        h_new = (1 - z) * n + z * h  # (B, H)
        steps.append({"h_prev": h, "r": r, "z": z, "n": n, "hn": hn})
        out[t] = m[t] * h_new
        h = m[t] * h_new + (1 - m[t]) * h
    return out, h, {"x": x, "m": m, "steps": steps}


def gru_backward(
    params: Params, cache: dict, d_out: np.ndarray | None, d_hn: np.ndarray | None
) -> dict[str, np.ndarray]:
    """Gradients of L given ∂L/∂out (T, B, H) and ∂L/∂h_n (B, H); None means zero.

    Returns a dict with one entry per key of ``params`` plus "x" and "h0".
    """
    W_ih, W_hh = params["weight_ih"], params["weight_hh"]
    x, m, steps = cache["x"], cache["m"], cache["steps"]
    grads = _zero_grads(params, x)
    T, B, H = x.shape[0], x.shape[1], W_hh.shape[1]
    d_out = _zeros_if_none(d_out, (T, B, H))
    dh = _zeros_if_none(d_hn, (B, H))  # ∂L/∂h_T
    for t in reversed(range(T)):
        s = steps[t]
        r, z, n, hn, h_prev = s["r"], s["z"], s["n"], s["hn"], s["h_prev"]
        dh_new = m[t] * (dh + d_out[t])  # ∂L/∂h̃_t, real steps only
        dn = dh_new * (1 - z)  # ∂L/∂n = ∂L/∂h̃_t ⊙ (1 − z)
        dz = dh_new * (h_prev - n)  # ∂L/∂z = ∂L/∂h̃_t ⊙ (h_{t-1} − n)
        dn_pre = dn * (1 - n**2)  # ∂L/∂(n's pre-activation) = ∂L/∂n ⊙ (1 − n²)
        dr = dn_pre * hn  # ∂L/∂r = ∂L/∂n_pre ⊙ (W_hn h_{t-1} + b_hn)
        dr_pre = dr * r * (1 - r)  # ∂L/∂(r's pre-activation) = ∂L/∂r ⊙ r(1 − r)
        dz_pre = dz * z * (1 - z)  # ∂L/∂(z's pre-activation) = ∂L/∂z ⊙ z(1 − z)
        d_gi = np.concatenate([dr_pre, dz_pre, dn_pre], axis=1)  # ∂L/∂(W_ih x_t + b_ih)   (B, 3H)
        # ∂L/∂(W_hh h_{t-1} + b_hh): the same, except the n block passes through r first   (B, 3H)
        d_gh = np.concatenate([dr_pre, dz_pre, dn_pre * r], axis=1)
        grads["weight_ih"] += d_gi.T @ x[t]  # ∂L/∂W_ih += ∂L/∂gi x_tᵀ
        grads["weight_hh"] += d_gh.T @ h_prev  # ∂L/∂W_hh += ∂L/∂gh h_{t-1}ᵀ
        if "bias_ih" in grads:
            grads["bias_ih"] += d_gi.sum(0)  # ∂L/∂b_ih += Σ_batch ∂L/∂gi
        if "bias_hh" in grads:
            grads["bias_hh"] += d_gh.sum(0)  # ∂L/∂b_hh += Σ_batch ∂L/∂gh
        grads["x"][t] = d_gi @ W_ih  # ∂L/∂x_t = W_ihᵀ ∂L/∂gi
        # ∂L/∂h_{t-1} = W_hhᵀ ∂L/∂gh + ∂L/∂h̃_t ⊙ z + (1 − m_t) ⊙ ∂L/∂h_t
        dh = d_gh @ W_hh + dh_new * z + (1 - m[t]) * dh
    grads["h0"] = dh
    return grads


# ---------------------------------------------------------------------------------------------------------
# Finite differences, the check on all of the above
# ---------------------------------------------------------------------------------------------------------


def numerical_gradient(f: Callable[[], float], array: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """∂f/∂array by central differences, (f(a + ε) − f(a − ε)) / 2ε per entry.

    ``f`` takes no arguments and reads ``array``, which is nudged in place one entry at a time and
    restored afterwards. In float64 with ε = 1e-6 the error is about ε² (truncation) plus 1e-16 |f| / ε
    (rounding), around 1e-9 for losses of order one.
    """
    grad = np.zeros_like(array, dtype=np.float64)
    for index in np.ndindex(array.shape):
        saved = array[index]
        array[index] = saved + eps
        f_plus = f()
        array[index] = saved - eps
        f_minus = f()
        array[index] = saved
        grad[index] = (f_plus - f_minus) / (2 * eps)
    return grad
