"""Recurrent cells: one time step each, written as the equations.

Shape letters, used in every comment: B batch, T time, I input, H hidden, G gate rows (``num_gates * H``),
V vocabulary (an input of token ids is one-hot over V = I words).

The cell protocol
-----------------
A cell is one small class that says three things and nothing about time:

* its **state**: ``State``, a NamedTuple whose first field is ``h`` (the output); ``initial_state`` makes it;
* its **parameters**: ``parameter_shapes()`` -> ``{name: shape}`` and ``init_parameter(name, tensor)``.
  Names that start with ``bias`` exist only when ``bias=True``, as in torch.nn (``p[name]`` is then None);
* **one step**: ``step(p, x, state) -> state``. ``x`` is this step's input projection, ``project(p, input)``,
  which the layer computes for all time steps in one matrix product before its loop; ``p`` maps each
  parameter name to its tensor (``None`` for an absent bias).

``step`` may call ``self.record(name=tensor, ...)`` for quantities worth seeing (gates); it costs one
attribute test unless the layer is being traced.

Used alone, a cell owns its parameters and is called like ``torch.nn.RNNCell/LSTMCell/GRUCell``. Inside a
layer (:class:`rnnmath.Recurrent`) the layer owns the parameters under torch.nn's flat names
(``weight_ih_l0``, ...) and passes them in ``p``; the cell object there only carries the math.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class HiddenState(NamedTuple):
    h: Tensor  # (B, H)


class LSTMState(NamedTuple):
    h: Tensor  # (B, H)
    c: Tensor  # (B, H)


def check_token_ids(ids: Tensor, vocab_size: int) -> None:
    """Raise a clear error for token ids outside [0, vocab_size)."""
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"token ids must be an integer tensor, got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(
            f"token ids must lie in [0, {vocab_size}) (input_size is the vocabulary size), "
            f"got values from {int(ids.min())} to {int(ids.max())}"
        )


class Cell(nn.Module):
    """Base class of every cell: parameters, input projection, initial state and the torch.nn call."""

    State: type = HiddenState
    num_gates: int = 1
    gate_names: tuple[str, ...] = ()

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if input_size <= 0 or hidden_size <= 0:
            raise ValueError(f"input_size and hidden_size must be positive, got {input_size} and {hidden_size}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self._recorder = None
        for name, shape in self.parameter_shapes().items():
            if self.has_parameter(name):
                self.register_parameter(name, nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
        self.reset_parameters()

    # -- what a new cell may override -------------------------------------------------------------------
    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """torch.nn's layout: W_ih (G, I), W_hh (G, H), b_ih (G,), b_hh (G,)."""
        G, I, H = self.num_gates * self.hidden_size, self.input_size, self.hidden_size
        return {"weight_ih": (G, I), "weight_hh": (G, H), "bias_ih": (G,), "bias_hh": (G,)}

    def init_parameter(self, name: str, tensor: Tensor) -> None:
        """torch.nn's initialisation: every parameter ~ U(-1/√H, 1/√H)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        nn.init.uniform_(tensor, -bound, bound)

    def reset_parameters(self) -> None:
        for name, param in self.named_parameters(recurse=False):
            self.init_parameter(name, param)

    def project(self, p: dict[str, Tensor | None], x: Tensor) -> Tensor:
        """x W_ihᵀ + b_ih for inputs (..., I), or the row lookup W_ih[:, ids]ᵀ + b_ih for token ids (...)."""
        weight_ih, bias_ih = p["weight_ih"], p.get("bias_ih")
        if x.is_floating_point():
            return F.linear(x, weight_ih, bias_ih)  # (..., G)
        # one_hot(ids) @ W_ihᵀ picks row `id` of W_ihᵀ: a lookup, with the same values and gradients
        check_token_ids(x, weight_ih.shape[1])
        xw = F.embedding(x, weight_ih.t())  # (..., G)
        return xw if bias_ih is None else xw + bias_ih

    def initial_state(self, batch_size: int, like: Tensor):
        """All-zero state, as torch.nn uses when hx is None."""
        zeros = like.new_zeros(batch_size, self.hidden_size)  # (B, H)
        return self.State(*(zeros for _ in self.State._fields))

    def step(self, p: dict[str, Tensor | None], x: Tensor, state):
        """One time step: (this step's input projection x (B, G), previous state) -> new state."""
        raise NotImplementedError

    # -- machinery ---------------------------------------------------------------------------------------
    def record(self, **tensors: Tensor) -> None:
        """Hand named intermediate values (gates) to a trace; does nothing unless tracing."""
        if self._recorder is not None:
            self._recorder(tensors)

    def has_parameter(self, name: str) -> bool:
        """torch.nn's rule: parameters named bias* exist only when bias=True."""
        return self.bias or not name.startswith("bias")

    def params(self) -> dict[str, Tensor | None]:
        """This cell's own parameters by name, absent biases as None (used when the cell runs alone)."""
        return {name: getattr(self, name, None) for name in self.parameter_shapes()}

    def forward(self, input: Tensor, hx=None):
        """Called like torch.nn's cells: input (B, I) or (I,); returns h', or (h', c') for an LSTM."""
        batched = input.dim() == (2 if input.is_floating_point() else 1)
        if not batched:
            input = input.unsqueeze(0)
            if hx is not None:
                hx = hx.unsqueeze(0) if isinstance(hx, Tensor) else tuple(s.unsqueeze(0) for s in hx)
        p = self.params()
        if hx is None:
            like = next(t for t in p.values() if t is not None)
            state = self.initial_state(input.shape[0], like)
        else:
            state = self.State(hx) if isinstance(hx, Tensor) else self.State(*hx)
        state = self.step(p, self.project(p, input), state)
        if not batched:
            state = self.State(*(s.squeeze(0) for s in state))
        return state.h if len(state) == 1 else tuple(state)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}" + ("" if self.bias else ", bias=False")


class RNNCell(Cell):
    r"""Elman RNN cell, as ``torch.nn.RNNCell``.

    .. math::
        h' = \tanh(x W_{ih}^T + b_{ih} + h W_{hh}^T + b_{hh})

    with ``nonlinearity='relu'`` using relu in place of tanh.
    """

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh", device=None, dtype=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, bias, device, dtype)

    def step(self, p, x, state):
        pre = x + F.linear(state.h, p["weight_hh"], p["bias_hh"])  # (B, H)
        h = torch.tanh(pre) if self.nonlinearity == "tanh" else torch.relu(pre)
        return HiddenState(h)

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.nonlinearity == "tanh" else ", nonlinearity='relu'")


class LSTMCell(Cell):
    r"""Long short-term memory cell (Hochreiter & Schmidhuber 1997, with forget gate), as ``torch.nn.LSTMCell``.

    Gate rows of W_ih, W_hh, b_ih, b_hh are stacked in torch's order i | f | g | o::

        i = σ(x W_ii + b_ii + h W_hi + b_hi)      input gate
        f = σ(x W_if + b_if + h W_hf + b_hf)      forget gate
        g = tanh(x W_ig + b_ig + h W_hg + b_hg)   candidate cell
        o = σ(x W_io + b_io + h W_ho + b_ho)      output gate
        c' = f ⊙ c + i ⊙ g
        h' = o ⊙ tanh(c')
    """

    State = LSTMState
    num_gates = 4
    gate_names = ("i", "f", "g", "o")

    def step(self, p, x, state):
        h, c = state
        gates = x + F.linear(h, p["weight_hh"], p["bias_hh"])  # (B, 4H)
        i, f, g, o = gates.chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c + i * g
        h = o * torch.tanh(c)
        self.record(i=i, f=f, g=g, o=o)
        return LSTMState(h, c)


class GRUCell(Cell):
    r"""Gated recurrent unit (Cho et al. 2014), as ``torch.nn.GRUCell``.

    Gate rows are stacked in torch's order r | z | n::

        r = σ(x W_ir + b_ir + h W_hr + b_hr)          reset gate
        z = σ(x W_iz + b_iz + h W_hz + b_hz)          update gate
        n = tanh(x W_in + b_in + r ⊙ (h W_hn + b_hn))  candidate state
        h' = (1 − z) ⊙ n + z ⊙ h

    Note: like torch (and cuDNN), r multiplies (h W_hn + b_hn); Cho et al. apply it before the product,
    n = tanh(x W_in + b_in + (r ⊙ h) W_hn + b_hn). The two are different functions of the same weights.
    """

    num_gates = 3
    gate_names = ("r", "z", "n")

    def step(self, p, x, state):
        h = state.h
        x_r, x_z, x_n = x.chunk(3, dim=1)  # (B, H) each
        h_r, h_z, h_n = F.linear(h, p["weight_hh"], p["bias_hh"]).chunk(3, dim=1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        h = (1 - z) * n + z * h
        self.record(r=r, z=z, n=n)
        return HiddenState(h)


CELLS: dict[str, type[Cell]] = {"rnn": RNNCell, "lstm": LSTMCell, "gru": GRUCell}
"""Cells by the name the CLI and configs use. Register a new cell here to make it available everywhere."""
