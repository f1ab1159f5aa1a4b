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

Optionally, ``fast_scan(p, xw, state, mask) -> (outputs, last state)`` runs a whole sequence at once (held equal
to the loop of ``step`` by the tests); set ``fast_scan_composable = True`` when it is plain differentiable torch
code, so that it also runs under torch.compile and torch.func. A fast_scan that is an autograd.Function
(rnnmath.fused) differentiates the readable loop for a double backward; with ``fast_scan_recomputes_input``
it takes ``xw_again``, a function the layer gives it to recompute xw then. docs/cells.md walks through an
example.

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

from . import fused


class HiddenState(NamedTuple):
    h: Tensor  # (B, H)


class LSTMState(NamedTuple):
    h: Tensor  # (B, H)
    c: Tensor  # (B, H)


TOKEN_ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_token_ids(ids: Tensor, vocab_size: int) -> None:
    """Raise a clear error for token ids outside [0, vocab_size)."""
    if ids.dtype not in TOKEN_ID_DTYPES:
        raise TypeError(f"token ids must be an integer tensor, got {ids.dtype}")
    # reading values is a graph break under torch.compile(fullgraph=True) and impossible under torch.func
    # transforms (vmap): there the ids are trusted
    if (ids.numel() and not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()
            and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size)):
        raise ValueError(
            f"token ids must lie in [0, {vocab_size}) (input_size is the vocabulary size), "
            f"got values from {int(ids.min())} to {int(ids.max())}"
        )


_GATHER_COLUMNS_MAX_ROWS = 64
"""Token ids with at most this many gate rows G pick W_ih's columns with index_select and transpose the (G, N)
result; more rows use F.embedding on W_ihᵀ, a view whose rows are strided. Forward and backward together,
1 thread, 3,840 ids: 101 against 413 µs at G = 3 (the seed configuration), 195 against 634 µs at G = 12,
590 against 710 µs at G = 64, but 1,200 against 930 µs at G = 256. The same values either way. Both lose to
copying W_ihᵀ (V, G) contiguous and gathering its rows where the vocabulary V is no larger than the number of
ids N (measured side by side, 1 thread, N = 3,840, V = 400: G = 3 88 against 78 µs, G = 64 701 against 350,
G = 256 1,290 against 889; and lose where V > N: G = 64, V = 20,000, 3,243 against 12,191), so that comes first."""


_ATEN_NAMES = {torch.float64: "Double", torch.float32: "Float", torch.bfloat16: "BFloat16", torch.float16: "Half"}


def autocast_in_effect(input: Tensor, weight: Tensor, ids: bool) -> bool:
    """Whether ``torch.autocast`` changes a call of a cell or layer on ``input``: it is on for the input's device
    and the weights are not float64 (autocast casts only lower-precision-eligible floats, never float64). Raises
    torch.nn's error where it would leave one operand of the input projection in float64 and cast the other (a
    float64 input to a float32 layer, or the reverse)."""
    device_type = input.device.type
    if not torch.is_autocast_enabled(device_type):
        return False
    if not ids:
        autocast_dtype = torch.get_autocast_dtype(device_type)
        x_dtype, w_dtype = (d if d == torch.float64 else autocast_dtype for d in (input.dtype, weight.dtype))
        if x_dtype != w_dtype:
            raise RuntimeError(f"mat1 and mat2 must have the same dtype, but got {_ATEN_NAMES.get(x_dtype)} and "
                               f"{_ATEN_NAMES.get(w_dtype)}")
    return weight.dtype != torch.float64


class Cell(nn.Module):
    """Base class of every cell: parameters, input projection, initial state and the torch.nn call."""

    State: type = HiddenState
    num_gates: int = 1
    gate_names: tuple[str, ...] = ()
    # True when fast_scan is plain differentiable torch operations, so that it may also run under
    # torch.compile and torch.func transforms; otherwise (an autograd.Function) the layer uses `step` there.
    fast_scan_composable: bool = False
    # Under torch.autocast (see autocast_dtype): True runs in the autocast dtype, False in its promotion with
    # the state's dtype, as torch.nn does in a layer (RNN and LSTM lower, GRU not) and alone (RNNCell lower)
    autocast_lower_precision: bool = False
    autocast_lower_precision_alone: bool = False
    # True when the cell takes proj_size (a projected output, h smaller than c), as torch.nn.LSTM does
    supports_proj_size: bool = False
    # True when fast_scan takes ``xw_again``, a function that recomputes xw (for a double backward's replay)
    fast_scan_recomputes_input: bool = False
    # False where the generic compiled path should not loop chunks of steps inside one call at B = 1
    # (rnnmath.compiled.scan_max_batch): measured slower for minLSTM
    chunk_scans: bool = True

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        # torch.nn's cells: sizes are ints (TypeError), 0 is allowed, a negative size is a RuntimeError
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
            if value < 0:
                raise RuntimeError(f"{name} must be zero or positive, got {value}")
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
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0.0
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
        if x.dtype not in (torch.int64, torch.int32):  # embedding's index types; uint8/int8/int16 widen losslessly
            x = x.long()
        if weight_ih.shape[1] <= x.numel():  # a vocabulary no larger than the ids: W_ihᵀ copied, its rows gathered
            xw = torch.index_select(weight_ih.t().contiguous(), 0, x.reshape(-1)).view(*x.shape, weight_ih.shape[0])
        elif weight_ih.shape[0] <= _GATHER_COLUMNS_MAX_ROWS:  # few gate rows: gather W_ih's columns, transpose
            flat = torch.index_select(weight_ih, 1, x.reshape(-1))  # (G, N)
            xw = flat.t().contiguous().view(*x.shape, weight_ih.shape[0])  # (..., G)
        else:
            xw = F.embedding(x, weight_ih.t())  # (..., G)
        return xw if bias_ih is None else xw + bias_ih

    @property
    def output_size(self) -> int:
        """Size of h, the output of each step (H; an LSTM with projections: proj_size)."""
        return self.state_sizes()[0]

    def state_sizes(self) -> tuple[int, ...]:
        """Size of each state field, in ``State``'s order: H for all of them unless a cell says otherwise."""
        return tuple(self.hidden_size for _ in self.State._fields)

    def initial_state(self, batch_size: int, like: Tensor):
        """All-zero state, as torch.nn uses when hx is None: one (B, size) tensor per field."""
        return self.State(*(like.new_zeros(batch_size, n) for n in self.state_sizes()))

    def step(self, p: dict[str, Tensor | None], x: Tensor, state):
        """One time step: (this step's input projection x (B, G), previous state) -> new state."""
        raise NotImplementedError(f"{type(self).__name__} defines no step(p, x, state): a cell's equations go there "
                                  "(docs/cells.md)")

    def checked(self, new):
        """``new`` if it is this cell's State, else a TypeError naming the cell (a step that returned a bare tensor
        would otherwise fail one step later, inside the step, on ``state.h``)."""
        if not isinstance(new, self.State):
            raise TypeError(f"{type(self).__name__}.step returned a {type(new).__name__}; it must return the cell's "
                            f"state, a {self.State.__name__} (for example {self.State.__name__}(h) or "
                            "state._replace(h=h))")
        return new

    def autocast_dtype(self, autocast_dtype: torch.dtype, input_dtype: torch.dtype, state_dtype: torch.dtype, *,
                       in_layer: bool, packed: bool = False) -> torch.dtype:
        """The one dtype this cell computes in under ``torch.autocast``: the one torch.nn's results have.

        torch.nn's kernels run the matrix products in the autocast dtype A; where an update then mixes in the
        previous state (GRU's ``(1 − z) ⊙ n + z ⊙ h``, LSTM's ``f ⊙ c``), type promotion gives the state's dtype
        S (hx's, or the input's when hx is None) unless S is A: so by default promote(A, S) — float32 for a
        float32 input, A for an input already in A. ``autocast_lower_precision`` (a layer, unpacked, input in
        float32 or A: torch's ``rnn_tanh``/``lstm`` autocast kernels) and ``autocast_lower_precision_alone`` (the
        cell called alone: ``rnn_tanh_cell``) run everything in A. A PackedSequence reaches torch.nn's
        unlisted packed kernels, hence the promotion there.
        """
        if in_layer and self.autocast_lower_precision and not packed and input_dtype in (torch.float32,
                                                                                         autocast_dtype):
            return autocast_dtype
        if not in_layer and self.autocast_lower_precision_alone:
            return autocast_dtype
        return torch.promote_types(autocast_dtype, state_dtype)

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
        """Called like torch.nn's cells: input (B, I) or (I,) — or token ids (B,) / () — and hx per state field
        (B, size) or (size,), a tensor or a tuple (h, c) for an LSTM; returns h', or (h', c') for an LSTM.

        Errors as torch.nn's: ValueError for an input or hx of the wrong rank, RuntimeError for a wrong input
        size, hidden size or batch size (a state is never broadcast over the batch) or a dtype mismatch.
        """
        name = type(self).__name__
        ids = not input.is_floating_point()
        if input.dim() not in ((0, 1, 2) if ids else (1, 2)):
            raise ValueError(f"{name}: Expected input to be 1D or 2D (or 0D/1D token ids), "
                             f"got {input.dim()}D instead")
        if ids and (input.dtype not in TOKEN_ID_DTYPES or input.dim() == 2):
            # torch.nn's cells reach their matrix product with it: RuntimeError
            raise RuntimeError(f"{name}: mat1 and mat2 must have the same dtype, but got {input.dtype} input "
                               f"({input.dim()}D) and floating-point weights; a cell takes floating-point input "
                               "(B, I) / (I,), or token ids (B,) / () of an integer dtype")
        batched = input.dim() == (1 if ids else 2)
        if not ids and input.shape[-1] != self.input_size:
            raise RuntimeError(f"{name}: input has inconsistent input_size: got {input.shape[-1]} "
                               f"expected {self.input_size}")
        if not batched:
            input = input.unsqueeze(0)
        p = self.params()
        like = next(t for t in p.values() if t is not None)
        device_type = input.device.type
        autocast = autocast_in_effect(input, like, ids)
        if not ids and not autocast and input.dtype != like.dtype:
            raise RuntimeError(f"{name}: input dtype ({input.dtype}) does not match weight dtype ({like.dtype}); "
                               f"convert the input (input.to({like.dtype})) or the cell (cell.to({input.dtype}))")
        B = input.shape[0]
        if hx is None:
            state = self.initial_state(B, like)
        else:
            n = len(self.State._fields)
            # torch.nn's exception types: a one-field cell reads hx.dim() (AttributeError for a tuple or list);
            # lstm_cell takes a tuple of two tensors (TypeError for a tensor, RuntimeError for another count).
            # The cell's own State (HiddenState(h), as step returns it) is accepted: rnnmath's extension
            if n == 1 and not isinstance(hx, (Tensor, self.State)):
                raise AttributeError(f"{name}: hx must be a tensor (B, {self.hidden_size}) or "
                                     f"({self.hidden_size},), got a {type(hx).__name__}")
            if n > 1 and isinstance(hx, Tensor):
                raise TypeError(f"{name}: hx must be a tuple of {n} tensors {self.State._fields}, got a Tensor")
            fields = tuple(hx) if isinstance(hx, self.State) or n > 1 else (hx,)
            if len(fields) != n or not all(isinstance(f, Tensor) for f in fields):
                raise RuntimeError(f"{name}: hx must hold {n} tensors {self.State._fields} "
                                   f"({name} expects {n} hidden states), got {len(fields)} object(s)")
            checked = []
            for j, (field, f, size) in enumerate(zip(self.State._fields, fields, self.state_sizes())):
                label = "hidden" if len(fields) == 1 else f"hx[{j}]"
                if f.dim() not in (1, 2):
                    raise ValueError(f"{name}: Expected {label} to be 1D or 2D, got {f.dim()}D instead")
                if f.dim() != (2 if batched else 1):
                    raise RuntimeError(f"{name}: for {'batched 2-D' if batched else 'unbatched 1-D'} input, "
                                       f"{label} ({field}) should be {2 if batched else 1}-D, got {f.dim()}-D")
                f = f if batched else f.unsqueeze(0)
                if f.shape[1] != size:
                    raise RuntimeError(f"{name}: hidden{j} ({field}) has inconsistent hidden_size: got "
                                       f"{f.shape[1]}, expected {size}")
                if f.shape[0] != B:
                    raise RuntimeError(f"{name}: Input batch size {B} doesn't match hidden{j} ({field}) batch "
                                       f"size {f.shape[0]}")
                checked.append(f)
            state = self.State(*checked)
        if autocast:  # the precision torch.nn's cell would give (autocast_dtype)
            autocast_dtype = torch.get_autocast_dtype(device_type)
            input_dtype = like.dtype if ids else input.dtype
            state_dtype = input_dtype  # torch.nn's zero state has the input's dtype
            if hx is not None:
                state_dtype = state[0].dtype
                for s in state[1:]:
                    state_dtype = torch.promote_types(state_dtype, s.dtype)
            dtype = self.autocast_dtype(autocast_dtype, input_dtype, state_dtype, in_layer=False)
            p = {n: t if t is None else t.to(dtype) for n, t in p.items()}
            input = input if ids else input.to(dtype)
            state = self.State(*(s.to(dtype) for s in state))
            with torch.autocast(device_type, enabled=False):
                state = self.checked(self.step(p, self.project(p, input), state))
            if getattr(self, "proj_size", 0) and dtype != autocast_dtype:  # a projected h: a matrix product
                state = state._replace(h=state.h.to(autocast_dtype))
        else:
            state = self.checked(self.step(p, self.project(p, input), state))
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

    autocast_lower_precision = True
    autocast_lower_precision_alone = True
    fast_scan_recomputes_input = True

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh", device=None, dtype=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity {nonlinearity!r}. Select from 'tanh' or 'relu'.")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, bias, device, dtype)

    def step(self, p, x, state):
        # x + b_hh + h W_hhᵀ as one multiply-add: the fast path runs the same operation, so results match bitwise
        b_hh = p["bias_hh"]
        pre = torch.addmm(x if b_hh is None else x + b_hh, state.h, p["weight_hh"].t())  # (B, H)
        h = torch.tanh(pre) if self.nonlinearity == "tanh" else torch.relu(pre)
        return HiddenState(h)

    def fast_scan(self, p, xw, state, mask, xw_again=None):
        """The time loop fused, with a hand-derived backward (rnnmath.fused); equal to the readable loop."""
        return fused.rnn_scan(p, xw, state, mask, self, xw_again)

    def autocast_dtype(self, autocast_dtype, input_dtype, state_dtype, *, in_layer, packed=False):
        """Always the autocast dtype: torch.nn's RNN step reads the state only through a matrix product."""
        return autocast_dtype

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.nonlinearity == "tanh" else f", nonlinearity={self.nonlinearity}")


def _torch_lstm_takes_onednn(input_dtype: torch.dtype) -> bool:
    """Whether torch.nn.LSTM on the CPU takes its oneDNN kernel for a half-precision input (ATen's use_mkldnn in
    RNN.cpp): bfloat16 where this CPU has oneDNN's bfloat16, float16 where it has float16 and no gradient is
    recorded. That kernel computes in the autocast dtype; torch.nn's other kernel promotes."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    if input_dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if input_dtype == torch.float16:
        return not torch.is_grad_enabled() and torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return False


class LSTMCell(Cell):
    r"""Long short-term memory cell (Hochreiter & Schmidhuber 1997, with forget gate), as ``torch.nn.LSTMCell``.

    Gate rows of W_ih, W_hh, b_ih, b_hh are stacked in torch's order i | f | g | o::

        i = σ(x W_ii + b_ii + h W_hi + b_hi)      input gate
        f = σ(x W_if + b_if + h W_hf + b_hf)      forget gate
        g = tanh(x W_ig + b_ig + h W_hg + b_hg)   candidate cell
        o = σ(x W_io + b_io + h W_ho + b_ho)      output gate
        c' = f ⊙ c + i ⊙ g
        h' = o ⊙ tanh(c')

    With ``proj_size`` P > 0 (Sak, Senior & Beaufays 2014, "LSTM recurrent neural network architectures for
    large scale acoustic modeling"; torch.nn.LSTM's ``proj_size``) the output is projected to P units,
    h' = (o ⊙ tanh(c')) W_hrᵀ with ``weight_hr`` (P, H); h is then (B, P), W_hh (4H, P), and c stays (B, H).
    torch.nn.LSTMCell has no proj_size; here the layers use it for torch.nn.LSTM(proj_size=P).
    """

    State = LSTMState
    num_gates = 4
    gate_names = ("i", "f", "g", "o")
    autocast_lower_precision = True
    supports_proj_size = True
    fast_scan_recomputes_input = True

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None, proj_size: int = 0):
        if not isinstance(proj_size, int) or isinstance(proj_size, bool):
            raise TypeError(f"proj_size should be of type int, got: {type(proj_size).__name__}")
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size and proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")
        self.proj_size = proj_size
        super().__init__(input_size, hidden_size, bias, device, dtype)
        if proj_size:
            self.fast_scan = None  # the fused loop has no projection: the layer runs the readable loop

    def parameter_shapes(self):
        if not self.proj_size:
            return super().parameter_shapes()
        G, I, H, P = 4 * self.hidden_size, self.input_size, self.hidden_size, self.proj_size
        return {"weight_ih": (G, I), "weight_hh": (G, P), "bias_ih": (G,), "bias_hh": (G,), "weight_hr": (P, H)}

    def state_sizes(self):
        return (self.proj_size or self.hidden_size, self.hidden_size)

    def step(self, p, x, state):
        h, c = state
        # x + b_hh + h W_hhᵀ as one multiply-add: the fast path runs the same operation, so results match bitwise
        b_hh = p["bias_hh"]
        gates = torch.addmm(x if b_hh is None else x + b_hh, h, p["weight_hh"].t())  # (B, 4H)
        i, f, g, o = gates.chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c + i * g
        h = o * torch.tanh(c)
        if self.proj_size:
            h = torch.mm(h, p["weight_hr"].t())  # (B, P)
        self.record(i=i, f=f, g=g, o=o)
        return LSTMState(h, c)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", proj_size={self.proj_size}" if self.proj_size else "")

    def autocast_dtype(self, autocast_dtype, input_dtype, state_dtype, *, in_layer, packed=False):
        """With proj_size torch.nn.LSTM takes its promoting kernel: c promote(A, S), h (a projection) A."""
        if self.proj_size:
            return torch.promote_types(autocast_dtype, state_dtype)
        if in_layer and not packed and _torch_lstm_takes_onednn(input_dtype):
            return autocast_dtype  # torch.nn's oneDNN LSTM runs in A whatever half its input is in
        return super().autocast_dtype(autocast_dtype, input_dtype, state_dtype, in_layer=in_layer, packed=packed)

    def fast_scan(self, p, xw, state, mask, xw_again=None):
        """The time loop fused, with a hand-derived backward (rnnmath.fused); equal to the readable loop."""
        return fused.lstm_scan(p, xw, state, mask, self, xw_again)


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
    fast_scan_recomputes_input = True

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

    def fast_scan(self, p, xw, state, mask, xw_again=None):
        """The time loop fused, with a hand-derived backward (rnnmath.fused); equal to the readable loop."""
        return fused.gru_scan(p, xw, state, mask, self, xw_again)


def layer_norm(v: Tensor, gain: Tensor, shift: Tensor | None, eps: float) -> Tensor:
    """LN(v; γ, β) = γ ⊙ (v − mean(v)) / √(var(v) + ε) + β over the last axis (F.layer_norm's math).

    Written out so the cell reads as its paper, and because ATen's layer_norm opens an OpenMP region that
    stalls when a core is busy: on this loaded 2-core machine with 2 threads it took ~8 ms a call on (8, 64)
    and (64, 256) inputs against ~0.02–0.2 ms for these five operations (with 1 thread it is the faster one,
    ~8 µs against ~23 µs; measured 2026-11-25).
    """
    mean = v.mean(-1, keepdim=True)  # (..., 1)
    var = v.var(-1, unbiased=False, keepdim=True)  # (..., 1)
    normed = gain * (v - mean) * torch.rsqrt(var + eps)
    return normed if shift is None else normed + shift


class LayerNormLSTMCell(Cell):
    r"""LSTM with layer normalisation (Ba, Kiros & Hinton 2016, "Layer Normalization", §3.1 / appendix).

    As in the paper, the input and the recurrent contributions are normalised *separately*, each over all of
    its G = 4H gate rows at once, and the cell is normalised before its tanh::

        a = LN(x W_ihᵀ; γ_ih) + LN(h W_hhᵀ; γ_hh) + b     gate pre-activations, rows i | f | g | o
        i, f, o = σ(a_i), σ(a_f), σ(a_o);  g = tanh(a_g)
        c' = f ⊙ c + i ⊙ g
        h' = o ⊙ tanh(LN(c'; γ_c, β_c))

    with LN(v; γ, β) = γ ⊙ (v − mean(v)) / √(var(v) + ε) + β over the last axis (ε = 1e-5, as nn.LayerNorm).
    The paper's two shifts β_ih, β_hh and the bias b only ever appear summed, so they are one bias b here.
    The carried state c stays unnormalised; only the copy that makes h' is normalised, as in the paper.
    Parameters: ``weight_ih`` (G, I), ``weight_hh`` (G, H), gains ``gain_ih`` (G,), ``gain_hh`` (G,),
    ``gain_c`` (H,) initialised to 1; b = ``bias_gates`` (G,) and ``bias_c`` (H,) initialised to 0 (absent when
    ``bias=False``).
    """

    State = LSTMState
    num_gates = 4
    gate_names = ("i", "f", "g", "o")
    eps = 1e-5

    def parameter_shapes(self):
        G, I, H = 4 * self.hidden_size, self.input_size, self.hidden_size
        return {"weight_ih": (G, I), "weight_hh": (G, H), "gain_ih": (G,), "gain_hh": (G,), "bias_gates": (G,),
                "gain_c": (H,), "bias_c": (H,)}

    def init_parameter(self, name, tensor):
        if name.startswith("gain"):
            nn.init.ones_(tensor)
        elif name.startswith("bias"):
            nn.init.zeros_(tensor)
        else:
            super().init_parameter(name, tensor)

    def project(self, p, x):
        """LN(x W_ihᵀ; γ_ih) + b, for all time steps at once (token ids: a row lookup, then LN)."""
        xw = super().project({"weight_ih": p["weight_ih"]}, x)  # (..., G)
        return layer_norm(xw, p["gain_ih"], p["bias_gates"], self.eps)  # (..., G)

    def step(self, p, x, state):
        h, c = state
        hw = F.linear(h, p["weight_hh"])  # (B, 4H)
        a = x + layer_norm(hw, p["gain_hh"], None, self.eps)  # (B, 4H)
        i, f, g, o = a.chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c + i * g
        h = o * torch.tanh(layer_norm(c, p["gain_c"], p["bias_c"], self.eps))
        self.record(i=i, f=f, g=g, o=o)
        return LSTMState(h, c)


class PeepholeLSTMCell(Cell):
    r"""LSTM with peephole connections (Gers & Schmidhuber 2000, "Recurrent nets that time and count").

    The gates look at the cell through diagonal weights w_ci, w_cf, w_co (vectors, ⊙): the input and forget
    gates see the previous cell c, the output gate sees the new cell c'. Rows of W_ih, W_hh, b_ih, b_hh are
    torch.nn.LSTM's i | f | g | o, so a torch.nn.LSTM state dict loads into the shared names::

        i = σ(x W_ii + b_ii + h W_hi + b_hi + w_ci ⊙ c)
        f = σ(x W_if + b_if + h W_hf + b_hf + w_cf ⊙ c)
        g = tanh(x W_ig + b_ig + h W_hg + b_hg)
        c' = f ⊙ c + i ⊙ g
        o = σ(x W_io + b_io + h W_ho + b_ho + w_co ⊙ c')
        h' = o ⊙ tanh(c')

    With w_ci = w_cf = w_co = 0 this is torch.nn.LSTMCell. Peephole weights ``weight_ci``, ``weight_cf``,
    ``weight_co`` (H,) start like every other weight, U(−1/√H, 1/√H).
    """

    State = LSTMState
    num_gates = 4
    gate_names = ("i", "f", "g", "o")

    def parameter_shapes(self):
        H = self.hidden_size
        return {**super().parameter_shapes(), "weight_ci": (H,), "weight_cf": (H,), "weight_co": (H,)}

    def step(self, p, x, state):
        h, c = state
        a_i, a_f, a_g, a_o = (x + F.linear(h, p["weight_hh"], p["bias_hh"])).chunk(4, dim=1)  # (B, H) each
        i = torch.sigmoid(a_i + p["weight_ci"] * c)
        f = torch.sigmoid(a_f + p["weight_cf"] * c)
        g = torch.tanh(a_g)
        c = f * c + i * g
        o = torch.sigmoid(a_o + p["weight_co"] * c)
        h = o * torch.tanh(c)
        self.record(i=i, f=f, g=g, o=o)
        return LSTMState(h, c)


class IndRNNCell(Cell):
    r"""Independently recurrent neural network (Li, Li, Cook, Zhu & Gao 2018, "IndRNN").

    Each unit sees only its own past: the recurrent weight is a vector u (⊙), not a matrix::

        h' = relu(x W_ihᵀ + b_ih + u ⊙ h)

    Parameters: ``weight_ih`` (H, I), ``weight_hh`` = u (H,) and ``bias_ih`` (H,). Because unit j's
    gradient through time is a product of u_j · relu'(·) factors, |u_j| bounds how fast it explodes or
    vanishes; u starts at U(0, 1) (non-negative, at most 1: each unit starts as a leaky memory), the input
    weights at torch.nn's U(−1/√H, 1/√H) and the bias at 0.
    """

    def parameter_shapes(self):
        H, I = self.hidden_size, self.input_size
        return {"weight_ih": (H, I), "weight_hh": (H,), "bias_ih": (H,)}

    def init_parameter(self, name, tensor):
        if name == "weight_hh":
            nn.init.uniform_(tensor, 0.0, 1.0)
        elif name == "bias_ih":
            nn.init.zeros_(tensor)
        else:
            super().init_parameter(name, tensor)

    def step(self, p, x, state):
        return HiddenState(torch.relu(x + p["weight_hh"] * state.h))


def g(x: Tensor) -> Tensor:
    """minGRU/minLSTM's positive activation: x + ½ for x ≥ 0, σ(x) below (continuous, > 0, so log g exists)."""
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def log_g(x: Tensor) -> Tensor:
    """log g(x), computed without forming g: log(x + ½) for x ≥ 0, −softplus(−x) = log σ(x) below."""
    return torch.where(x >= 0, torch.log(torch.relu(x) + 0.5), -F.softplus(-x))


def parallel_scan_log(log_a: Tensor, log_b: Tensor, h0: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    r"""h_t = a_t ⊙ h_{t−1} + b_t for every t at once, given log a_t and log b_t (a_t, b_t > 0; Heinsen 2023).

    Unrolled, with A_t = a_1 ⊙ … ⊙ a_t::

        h_t = A_t ⊙ h_0 + A_t ⊙ Σ_{s≤t} b_s / A_s
        log A_t = cumsum_t(log a_t)
        A_t ⊙ Σ_{s≤t} b_s / A_s = exp(log A_t + logcumsumexp_t(log b_t − log A_t))

    Cumulative sums over time replace the sequential loop; h_0 is kept outside the logarithms, so it may
    have any sign (a state given by the user, or zeros). Where mask (T, B, 1) is False the update is the
    identity (a = 1, b = 0), so the state is carried past each sequence's length. log_a, log_b: (T, B, H);
    returns the states (T, B, H), zero past each length, and the last state (B, H).
    """
    if mask is not None:
        log_a = log_a.masked_fill(~mask, 0.0)
        log_b = log_b.masked_fill(~mask, float("-inf"))
    log_A = torch.cumsum(log_a, dim=0)  # (T, B, H)
    h = torch.exp(log_A) * h0 + torch.exp(log_A + torch.logcumsumexp(log_b - log_A, dim=0))  # (T, B, H)
    last = h[-1] if h.shape[0] else h0
    if mask is not None:
        h = h.masked_fill(~mask, 0.0)
    return h, last


class MinGRUCell(Cell):
    r"""minGRU (Feng, Tung, Ahmed, Bengio & Hajimirsadeghi 2024, "Were RNNs All We Needed?").

    The gate and the candidate depend on x only, so the recurrence is linear in h and all time steps can be
    computed at once by a parallel scan. Rows of W_ih, b_ih: z | h̃::

        z  = σ(x W_izᵀ + b_iz)               update gate
        h̃  = g(x W_ihᵀ + b_ih)               candidate, g(v) = v + ½ (v ≥ 0), σ(v) (v < 0): positive
        h' = (1 − z) ⊙ h + z ⊙ h̃

    ``step`` is the paper's sequential mode (generation, tracing); ``fast_scan`` its log-space parallel
    mode for training: log(1 − z) = −softplus(a_z), log z = −softplus(−a_z), log h̃ = log g(a_h), then
    :func:`parallel_scan_log`. The tests hold the two equal, values and gradients.
    There is no W_hh: parameters are ``weight_ih`` (2H, I) and ``bias_ih`` (2H,).
    """

    num_gates = 2
    gate_names = ("z", "h_tilde")
    fast_scan_composable = True

    def parameter_shapes(self):
        G, I = 2 * self.hidden_size, self.input_size
        return {"weight_ih": (G, I), "bias_ih": (G,)}

    def step(self, p, x, state):
        a_z, a_h = x.chunk(2, dim=1)  # (B, H) each
        z = torch.sigmoid(a_z)
        h_tilde = g(a_h)
        h = (1 - z) * state.h + z * h_tilde
        self.record(z=z, h_tilde=h_tilde)
        return HiddenState(h)

    def fast_scan(self, p, xw, state, mask):
        a_z, a_h = xw.chunk(2, dim=2)  # (T, B, H) each
        log_a = -F.softplus(a_z)  # log(1 − z)
        log_b = -F.softplus(-a_z) + log_g(a_h)  # log(z ⊙ h̃)
        h, last = parallel_scan_log(log_a, log_b, state.h, mask)
        return h, HiddenState(last)


class MinLSTMCell(Cell):
    r"""minLSTM (Feng, Tung, Ahmed, Bengio & Hajimirsadeghi 2024, "Were RNNs All We Needed?").

    Forget and input gates depend on x only and are normalised to sum to one, so h needs no separate cell
    state and the recurrence is linear in h. Rows of W_ih, b_ih: f | i | h̃::

        f  = σ(x W_ifᵀ + b_if),  i = σ(x W_iiᵀ + b_ii)
        h̃  = g(x W_ihᵀ + b_ih)              g(v) = v + ½ (v ≥ 0), σ(v) (v < 0)
        f' = f / (f + i),  i' = i / (f + i)
        h' = f' ⊙ h + i' ⊙ h̃

    ``fast_scan`` is the paper's log-space parallel mode: with d = softplus(−a_f) − softplus(−a_i)
    (= log i − log f), log f' = −softplus(d) and log i' = −softplus(−d); then :func:`parallel_scan_log`.
    Parameters: ``weight_ih`` (3H, I) and ``bias_ih`` (3H,); no W_hh.
    """

    num_gates = 3
    gate_names = ("f", "i", "h_tilde")
    fast_scan_composable = True
    # rnnmath / torch.nn.LSTM, H = 64, T = 100, B = 1, 1 thread, chunks -> scans (alternating order, Intel Xeon):
    # training 1.12-1.18 -> 1.29-1.30, inference 1.09-1.11 -> 1.23-1.25 (IndRNN there 1.03 -> 0.84; minGRU equal)
    chunk_scans = False

    def parameter_shapes(self):
        G, I = 3 * self.hidden_size, self.input_size
        return {"weight_ih": (G, I), "bias_ih": (G,)}

    def step(self, p, x, state):
        a_f, a_i, a_h = x.chunk(3, dim=1)  # (B, H) each
        f, i = torch.sigmoid(a_f), torch.sigmoid(a_i)
        h_tilde = g(a_h)
        h = f / (f + i) * state.h + i / (f + i) * h_tilde
        self.record(f=f, i=i, h_tilde=h_tilde)
        return HiddenState(h)

    def fast_scan(self, p, xw, state, mask):
        a_f, a_i, a_h = xw.chunk(3, dim=2)  # (T, B, H) each
        d = F.softplus(-a_f) - F.softplus(-a_i)  # log i − log f
        h, last = parallel_scan_log(-F.softplus(d), -F.softplus(-d) + log_g(a_h), state.h, mask)
        return h, HiddenState(last)


CELLS: dict[str, type[Cell]] = {
    "rnn": RNNCell, "lstm": LSTMCell, "gru": GRUCell,
    "layernorm_lstm": LayerNormLSTMCell, "peephole_lstm": PeepholeLSTMCell, "indrnn": IndRNNCell,
    "mingru": MinGRUCell, "minlstm": MinLSTMCell,
}
"""Cells by the name the CLI and configs use. Register a new cell here to make it available everywhere."""
