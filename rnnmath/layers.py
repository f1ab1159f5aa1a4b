"""Layers that own time: the loop over steps, stacking, directions and variable lengths, for any cell.

Shape letters: T time, B batch, I input, H hidden, G gate rows, D directions (1 or 2), L layers.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import compiled
from .cells import TOKEN_ID_DTYPES, Cell, GRUCell, LSTMCell, RNNCell, autocast_in_effect

torch_kernels: bool = True
"""Let the built-in RNN, LSTM and GRU run torch's own fused operators where they can
(:meth:`Recurrent._torch_kernel_serves`); False keeps them on rnnmath's own paths (tests and benchmarks)."""


def _torch_kernel(cell: Cell):
    """torch's fused operator for a built-in cell of exactly that class (not a subclass), else None."""
    kind = type(cell)
    if kind is LSTMCell:
        return torch.lstm
    if kind is GRUCell:
        return torch.gru
    if kind is RNNCell:
        return torch.rnn_tanh if cell.nonlinearity == "tanh" else torch.rnn_relu
    return None


def reverse_padded(x: Tensor, lengths: Tensor | None) -> Tensor:
    """Reverse each sequence of x (T, B, ...) within its own length; padding stays where it is.

    The reverse direction reads each sequence from its true last token, and reversing twice is the identity.
    """
    if lengths is None:
        return x.flip(0)
    T = x.shape[0]
    t = torch.arange(T, device=x.device).unsqueeze(1)  # (T, 1)
    n = lengths.to(x.device).unsqueeze(0)  # (1, B)
    index = torch.where(t < n, n - 1 - t, t)  # (T, B)
    index = index.view(T, -1, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(0, index)


def scan(cell: Cell, p: dict, xw: Tensor, state, mask: Tensor | None, *, h_mask: Tensor | None = None,
         zoneout: float = 0.0, training: bool = False):
    """The time loop: apply cell.step at every step of xw (T, B, G) from `state`.

    Where mask[t] (B, 1) is False (past a sequence's length) the state is carried unchanged and the output
    is zero. Returns the outputs h_t (T, B, H) and the last state.

    Regularisers (see :class:`Recurrent`): ``h_mask`` (B, H), the recurrent-dropout mask, multiplies the h fed
    into every step; ``zoneout`` z keeps each unit of every state field at its old value with probability z
    (training), or mixes (1 − z)·new + z·old (evaluation).
    """
    outputs = []
    for t in range(xw.shape[0]):
        new = cell.checked(cell.step(p, xw[t], state if h_mask is None else state._replace(h=state.h * h_mask)))
        if zoneout:
            new = _zoneout(new, state, zoneout, training)
        if mask is not None:
            new = type(new)(*(torch.where(mask[t], n, s) for n, s in zip(new, state)))
        state = new
        outputs.append(state.h)
        if cell._recorder is not None:
            cell._recorder.end_step(state)
    if not outputs:
        return xw.new_zeros(0, xw.shape[1], cell.output_size), state
    output = torch.stack(outputs)  # (T, B, H)
    if mask is not None:
        output = output.masked_fill(~mask, 0.0)
    return output, state


def _projection(cell: Cell, p: dict, layer_input: Tensor, d: int, lengths: Tensor | None,
                compile: bool = False) -> Tensor:
    """The input projection of every step for direction d (the reverse one reversed within each length);
    ``compile``: through rnnmath.compiled (compiled once for all shapes when the cell overrides ``project``)."""
    xw = compiled.project(cell, p, layer_input) if compile else cell.project(p, layer_input)  # (T, B, G)
    return reverse_padded(xw, lengths) if d == 1 else xw


def _zoneout(new, old, z: float, training: bool):
    """Zoneout (Krueger et al. 2017) of every state field: new' = d ⊙ old + (1 − d) ⊙ new, d ~ Bernoulli(z)."""
    if training:
        return type(new)(*(torch.where(torch.rand_like(n) < z, o, n) for n, o in zip(new, old)))
    return type(new)(*((1 - z) * n + z * o for n, o in zip(new, old)))


class Recurrent(nn.Module):
    r"""A stack of recurrent layers of any cell, with the constructor and call of ``torch.nn.RNN/LSTM/GRU``.

    Layer ``k`` and direction ``d`` own the cell's parameters under torch.nn's names
    ``{name}_l{k}`` and ``{name}_l{k}_reverse`` (``weight_ih_l0``, ...), so state dicts load both ways.

    The computation is this loop (the code below adds lengths and packing, and projects the input of all
    steps with one matrix product before the loop)::

        layer_input = x                                      # (T, B, I)
        for k in range(num_layers):
            outputs = []
            for d in directions:                             # forward, then reverse
                xs = layer_input if d == 0 else layer_input.flip(0)
                state = hx[k * D + d]
                hs = []
                for x_t in xs:
                    state = cell.step(p[k, d], cell.project(p[k, d], x_t), state)
                    hs.append(state.h)
                hs = torch.stack(hs)
                outputs.append(hs if d == 0 else hs.flip(0))
                h_n[k * D + d] = state
            layer_input = dropout(torch.cat(outputs, -1)) if k < num_layers - 1 else torch.cat(outputs, -1)
        return layer_input, h_n

    ``forward(input, hx=None, lengths=None)``:

    * ``input``: (T, B, I) — or (B, T, I) with ``batch_first`` — or unbatched (T, I), or a ``PackedSequence``
      (the output is then packed too). An integer tensor (T, B) / (B, T) / (T,) holds token ids: one-hot
      vectors over a vocabulary of ``input_size`` words, whose projection is a row lookup of W_ih.
    * ``hx``: the initial state, (L·D, B, H) per state field — a tensor, or a tuple (h_0, c_0) for an LSTM.
    * ``lengths``: (B,) true lengths of padded input. Outputs past a sequence's length are zero; ``h_n`` holds
      each sequence's state at its true last step, and the reverse direction starts at its true last token.
      A length of 0 returns the initial state. The padded steps are zeroed before anything reads them, so
      whatever they hold (NaN, inf) reaches no output, state or gradient. Under ``torch.func.vmap`` over
      unbatched samples, ``lengths`` may be a 0-d tensor per sample (per-sample gradients).

    Returns ``(output, h_n)``, with ``h_n`` a tuple ``(h_n, c_n, ...)`` when the cell's state has several
    fields; output is (T, B, D·H). With ``proj_size`` P (LSTM cells) h is projected: output (T, B, D·P),
    h_n (L·D, B, P), c_n (L·D, B, H), parameters ``weight_hr_l{k}[_reverse]`` (P, H), as torch.nn.LSTM.

    Errors are torch.nn's exception types (TypeError/ValueError for constructor arguments, ValueError for
    the input's rank or dtype, RuntimeError for input size, hx shape or dtype), and ``torch.jit.trace``
    is refused (a trace would fix the number of steps); docs/compatibility.md lists what holds.
    Under ``torch.autocast`` the layer runs in the precision torch.nn's layer of the same kind would.

    Regularisers beyond torch.nn, for any cell (keyword-only, off by default; with both at 0 nothing runs):

    * ``recurrent_dropout`` p — variational dropout of the recurrence (Gal & Ghahramani 2016). In training,
      each layer and direction draws one mask m ~ Bernoulli(1 − p)/(1 − p) of shape (B, H) per call, i.e. per
      sequence, and every step is fed ``state.h ⊙ m`` instead of ``state.h``: the same units are dropped at
      every step. Outputs and carried states are not masked. Identity in evaluation.
    * ``zoneout`` z — zoneout (Krueger et al. 2017). In training, at each step every unit of every state
      field (h, and c for an LSTM) keeps its previous value with probability z:
      ``s_t = d_t ⊙ s_{t−1} + (1 − d_t) ⊙ step(s_{t−1})``, d_t ~ Bernoulli(z). In evaluation, as in the paper,
      the expectation ``s_t = (1 − z) ⊙ step(s_{t−1}) + z ⊙ s_{t−1}``: so zoneout is *not* the identity in
      evaluation, and a model trained with it must be evaluated with it.

    While either is active the readable loop runs (a cell's ``fast_scan`` knows nothing of them); see
    :meth:`_path` for the whole rule.
    """

    def __init__(
        self,
        cell: type[Cell],
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
        *,
        proj_size: int = 0,
        recurrent_dropout: float = 0.0,
        zoneout: float = 0.0,
        **cell_kwargs,
    ) -> None:
        super().__init__()
        _check_arguments(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size)
        if proj_size and not getattr(cell, "supports_proj_size", False):
            # torch.nn's message for RNN and GRU; for another cell, which cells take it
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU"
                             if cell in (RNNCell, GRUCell) else
                             f"proj_size argument is only supported for LSTM cells (supports_proj_size = True), "
                             f"not {cell.__name__}")
        for flag, value in (("recurrent_dropout", recurrent_dropout), ("zoneout", zoneout)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
                raise ValueError(f"{flag} must be a number in [0, 1), got {value!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                          f"expects num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}",
                          stacklevel=2 if type(self).__init__ is Recurrent.__init__ else 3)  # the caller's line
        if proj_size:
            cell_kwargs["proj_size"] = proj_size
        self.recurrent_dropout = float(recurrent_dropout)
        self.zoneout = float(zoneout)
        self.cell_class = cell
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bool(bidirectional)
        self.proj_size = proj_size
        self.num_directions = 2 if bidirectional else 1

        # One cell per layer carries the math; it lives on the meta device (no memory) and outside the
        # module tree, because the layer, not the cell, owns the parameters under torch.nn's names.
        cells = []
        for k in range(num_layers):
            layer_input = input_size if k == 0 else cells[-1].output_size * self.num_directions
            cells.append(cell(layer_input, hidden_size, bias, device="meta", **cell_kwargs))
        self._cells = tuple(cells)
        self.fast = True  # use a cell's fast_scan when it has one; False forces the readable loop
        self._trace: Trace | None = None
        self._names: list[list[dict[str, str]]] = []  # [layer][direction] -> {cell name: layer name}
        for k, c in enumerate(cells):
            per_direction = []
            for suffix in ("", "_reverse")[: self.num_directions]:
                names = {}
                for name, shape in c.parameter_shapes().items():
                    names[name] = f"{name}_l{k}{suffix}"
                    if c.has_parameter(name):
                        param = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
                        self.register_parameter(names[name], param)
                per_direction.append(names)
            self._names.append(per_direction)
        self.reset_parameters()

    @property
    def cells(self) -> tuple[Cell, ...]:
        """The cell of each layer (its math; the parameters live on this layer)."""
        return self._cells

    def reset_parameters(self) -> None:
        for cell, per_direction in zip(self._cells, self._names):
            for names in per_direction:
                for name, layer_name in names.items():
                    if cell.has_parameter(name):
                        cell.init_parameter(name, getattr(self, layer_name))

    def flatten_parameters(self) -> None:
        """Accepted for drop-in compatibility with torch.nn (cuDNN's weight packing); nothing to do here."""

    def layer_params(self, layer: int, direction: int) -> dict[str, Tensor | None]:
        """The parameters of one layer and direction under the cell's names (p for cell.step)."""
        return {name: getattr(self, layer_name, None) for name, layer_name in self._names[layer][direction].items()}

    def _weight_ih(self) -> Tensor:
        """W_ih of layer 0: its dtype and device are the layer's (cheaper than next(self.parameters()))."""
        return getattr(self, self._names[0][0]["weight_ih"])

    @property
    def all_weights(self) -> list[list[Tensor]]:
        return [
            [getattr(self, n) for n in names.values() if hasattr(self, n)]
            for per_direction in self._names
            for names in per_direction
        ]

    # -- forward -----------------------------------------------------------------------------------------
    def forward(self, input, hx=None, lengths: Tensor | None = None):
        if torch.jit.is_tracing():  # torch.jit.trace, and torch.onnx.export(dynamo=False), which traces
            tracer = "torch.onnx.export(dynamo=False)" if _is_exporting() else "torch.jit.trace"
            raise RuntimeError(
                f"{tracer} cannot record rnnmath.{type(self).__name__}: the loop over time would be unrolled "
                "to the traced length and give silently wrong shapes at any other length; run the module "
                "eagerly, or use torch.compile / torch.export / torch.onnx.export(dynamo=True)"
            )
        name = type(self).__name__
        packed = isinstance(input, PackedSequence)
        if packed:
            if lengths is not None:
                raise ValueError("pass either a PackedSequence or lengths, not both")
            x, lengths = pad_packed_sequence(input)  # (T, B, ...) in the caller's batch order
        else:
            x = input
        ids = not x.is_floating_point()
        if ids and x.dtype not in TOKEN_ID_DTYPES:
            raise ValueError(f"{name}: input of dtype {x.dtype} is neither floating point nor token ids "
                             f"(an integer dtype: {', '.join(str(t) for t in TOKEN_ID_DTYPES)})")
        if x.dim() not in ((1, 2) if ids else (2, 3)):
            raise ValueError(f"{name}: Expected input to be {'1D or 2D (token ids)' if ids else '2D or 3D'}, "
                             f"got {x.dim()}D instead")
        batched = x.dim() == (2 if ids else 3)
        if not batched:
            x = x.unsqueeze(1)
            hx = _unsqueeze_state(hx, name)
            if lengths is not None and torch.as_tensor(lengths).dim() == 0:
                lengths = torch.as_tensor(lengths).unsqueeze(0)  # one length per (vmapped) sample
        elif self.batch_first and not packed:
            x = x.transpose(0, 1)
        if not ids and x.shape[-1] != self.input_size:
            raise RuntimeError(f"{name}: input.size(-1) must be equal to input_size. "
                               f"Expected {self.input_size}, got {x.shape[-1]}")
        T, B = x.shape[0], x.shape[1]
        weight = self._weight_ih()
        autocast = autocast_in_effect(x, weight, ids)
        if not ids and not autocast and x.dtype != weight.dtype:  # torch.nn skips this check under autocast
            raise ValueError(f"{name}: input dtype ({x.dtype}) does not match weight dtype ({weight.dtype}). "
                             f"Convert input: input.to({weight.dtype}), or convert model: model.to({x.dtype})")
        mask = None
        if lengths is not None:
            lengths = _check_lengths(lengths, B, T)
            mask = (torch.arange(T, device=x.device).unsqueeze(1) < lengths.to(x.device)).unsqueeze(2)  # (T, B, 1)
            # padding never reaches a result: 0 × NaN/inf there would poison every weight gradient, and a
            # padding id outside the vocabulary (-1, -100) would be refused
            x = x.masked_fill(~mask, 0.0) if not ids else x.masked_fill(~mask.squeeze(2), 0)
        kernel = self._torch_kernel_serves(x, lengths)  # never under autocast
        states = None if kernel and hx is None else self._initial_states(hx, B, x)  # kernel: zeros made there
        if autocast:
            # the layer runs in one precision, the one torch.nn's layer of this kind gives (Cell.autocast_dtype)
            autocast_dtype = torch.get_autocast_dtype(x.device.type)
            state_dtype = _state_dtype(hx, weight.dtype if ids else x.dtype)
            # an empty input, like a packed one, reaches torch.nn's promoting kernels (ATen's use_mkldnn asks
            # input.numel() != 0): an empty batch of an LSTM gives float32 where a full one gives bfloat16
            compute_dtype = self._cells[0].autocast_dtype(autocast_dtype, weight.dtype if ids else x.dtype,
                                                          state_dtype, in_layer=True, packed=packed or x.numel() == 0)
            x = x if ids else x.to(compute_dtype)
            states = [type(s)(*(v.to(compute_dtype) for v in s)) for s in states]
            with torch.autocast(x.device.type, enabled=False):
                output, h_n = self._run(x, states, lengths, mask, compute_dtype)
            if getattr(self._cells[0], "proj_size", 0) and compute_dtype != autocast_dtype:
                # torch.nn.LSTM's projection is a matrix product: h in the autocast dtype, c in compute_dtype
                output = output.to(autocast_dtype)
                h_n = (h_n[0].to(autocast_dtype), *h_n[1:])
        elif kernel:
            output, h_n = self._run_torch_kernel(x, states, lengths)
        else:
            output, h_n = self._run(x, states, lengths, mask, weight.dtype)
        if self._trace is not None:
            self._trace.finish(lengths, T, B, x.device)

        if packed:
            if input.sorted_indices is not None:
                output, lengths = output.index_select(1, input.sorted_indices), lengths[input.sorted_indices]
            data = pack_padded_sequence(output, lengths.cpu(), enforce_sorted=True).data
            output = PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices)
        elif not batched:
            output, h_n = output.squeeze(1), _map_state(h_n, lambda s: s.squeeze(1))
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, h_n

    def _torch_kernel_serves(self, x: Tensor, lengths: Tensor | None) -> bool:
        """Whether this call runs torch's own fused kernel (``torch.lstm``/``gru``/``rnn_tanh``/``rnn_relu``, the
        ATen operators torch.nn's layers call; oneDNN's LSTM on this CPU) instead of rnnmath's loops.

        Only the built-in cells themselves (not subclasses), float32/float64 features on the CPU, every length
        at least 1, and nothing that needs the step: not tracing (``rnnmath.trace``), recurrent dropout in
        training, zoneout, ``layer.fast = False``, token ids (their projection is rnnmath's row lookup), autocast (the
        layer's dtype rule), torch.compile/export, torch.func transforms or forward-mode AD. The readable loop
        stays the specification: tests hold this path equal to it within floating-point tolerance.
        """
        return (torch_kernels and self.fast and self._trace is None and _torch_kernel(self._cells[0]) is not None
                and not (self.recurrent_dropout and self.training) and not self.zoneout
                and x.is_floating_point() and x.dtype in (torch.float32, torch.float64) and x.device.type == "cpu"
                and x.shape[0] > 0 and x.shape[1] > 0
                and not torch.is_autocast_enabled(x.device.type)
                and not torch.compiler.is_compiling() and not torch.compiler.is_exporting()
                and not torch._C._are_functorch_transforms_active()
                and getattr(forward_ad, "_current_level", -1) < 0
                and (lengths is None or bool((lengths > 0).all())))

    def _run_torch_kernel(self, x: Tensor, states: list | None, lengths: Tensor | None):
        """All layers and directions through torch's fused operator; the same results as :meth:`_run`.

        One call for the whole stack, or one per layer when inter-layer dropout is on, so that dropout draws
        the same masks (``F.dropout`` of the whole (T, B, D·H) layer output) as the other paths. Lengths run
        as torch.nn runs them: packed, sorted by length, then padded back with zeros.
        """
        cell, L, D = self._cells[0], self.num_layers, self.num_directions
        kernel = _torch_kernel(cell)
        if states is None:  # no hx: zeros
            hx = [x.new_zeros(L * D, x.shape[1], size) for size in cell.state_sizes()]
        else:
            hx = [torch.stack(field) for field in zip(*states)]  # per state field (L·D, B, size)
        params = self._parameters  # torch.nn.LSTM's flat weight order, without all_weights' getattr per name
        weights = [params[n] if n in params else getattr(self, n) for per_direction in self._names
                   for names in per_direction for n in names.values() if n in params or hasattr(self, n)]
        per_layer = len(weights) // L
        T = x.shape[0]
        packed = None
        if lengths is not None:
            packed = pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
            hx = [h.index_select(1, packed.sorted_indices) for h in hx]
        blocks = [(0, L)] if not (self.dropout and self.training and L > 1) else [(k, k + 1) for k in range(L)]
        layer_input, finals = x, []
        for first, end in blocks:
            h0 = hx if len(blocks) == 1 else [h[first * D:end * D] for h in hx]
            args = (h0 if len(h0) > 1 else h0[0], weights[first * per_layer:end * per_layer], self.bias,
                    end - first, 0.0, self.training, self.bidirectional)
            if packed is None:
                output, *last = kernel(layer_input, *args, False)  # (T, B, D·H)
            else:
                data = packed.data if first == 0 else pack_padded_sequence(
                    layer_input, lengths.cpu(), enforce_sorted=False).data
                output, *last = kernel(data, packed.batch_sizes, *args)
                output = pad_packed_sequence(PackedSequence(output, packed.batch_sizes, packed.sorted_indices,
                                                            packed.unsorted_indices), total_length=T)[0]
            finals.append(last)
            layer_input = output
            if end < L and self.dropout and self.training:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        h_n = finals[0] if len(finals) == 1 else [torch.cat(field) for field in zip(*finals)]  # (L·D, B, size) each
        if packed is not None:
            h_n = [h.index_select(1, packed.unsorted_indices) for h in h_n]
        return layer_input, h_n[0] if len(h_n) == 1 else tuple(h_n)

    def _run(self, x: Tensor, states: list, lengths: Tensor | None, mask: Tensor | None, dtype: torch.dtype):
        """All layers and directions over x (T, B, ·); returns output (T, B, D·H) and h_n."""
        finals = []
        layer_input = x
        for k, cell in enumerate(self._cells):
            outputs = []
            for d in range(self.num_directions):
                p = self.layer_params(k, d)
                if dtype != x.dtype or any(t is not None and t.dtype != dtype for t in p.values()):
                    p = {n: t if t is None else t.to(dtype) for n, t in p.items()}  # autocast
                compile = self.fast and self._trace is None and compiled.supported(layer_input)
                xw = _projection(cell, p, layer_input, d, lengths, compile)  # (T, B, G): every step's input at once

                def xw_again(cell=cell, p=p, layer_input=layer_input, d=d):  # for a double backward's replay
                    return _projection(cell, p, layer_input, d, lengths)

                output, state = self._scan(k, d, cell, p, xw, states[k * self.num_directions + d], mask, xw_again)
                outputs.append(output if d == 0 else reverse_padded(output, lengths))
                finals.append(state)
            layer_input = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)  # (T, B, D·H)
            if self.dropout and self.training and k < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        h_n = [torch.stack(field) for field in zip(*finals)]  # per state field: (L·D, B, H)
        return layer_input, h_n[0] if len(h_n) == 1 else tuple(h_n)

    def _scan(self, k: int, d: int, cell: Cell, p: dict, xw: Tensor, state, mask: Tensor | None, xw_again=None):
        """Run one layer and direction over time on the path :meth:`_path` chooses."""
        regularise = {}
        if self.recurrent_dropout and self.training:
            h_mask = F.dropout(xw.new_ones(xw.shape[1], cell.output_size), self.recurrent_dropout)  # (B, H)
            regularise.update(h_mask=h_mask)
        if self.zoneout:
            regularise.update(zoneout=self.zoneout, training=self.training)
        if torch.compiler.is_exporting():  # torch.export / ONNX: one scan operator, time axis kept symbolic
            from . import scan_op

            return scan_op.scan(cell, p, xw, state, mask, **regularise)
        if self._trace is not None:
            cell._recorder = self._trace.recorder(k, d)
            try:
                return scan(cell, p, xw, state, mask, **regularise)
            finally:
                cell._recorder = None
        path = self._path(cell, regularise, (xw, *state, *(t for t in p.values() if t is not None)))
        if path == "generic":
            return compiled.generic_scan(cell, p, xw, state, mask)
        if path == "fast":
            if cell.fast_scan_recomputes_input:
                return cell.fast_scan(p, xw, state, mask, xw_again=xw_again)
            return cell.fast_scan(p, xw, state, mask)
        return scan(cell, p, xw, state, mask, **regularise)

    def _path(self, cell: Cell, regularise: dict, tensors) -> str:
        """Which loop runs: ``"generic"`` (rnnmath.compiled), ``"fast"`` (the cell's ``fast_scan``) or ``"loop"``
        (the readable ``scan``). (Before any of them, the built-in RNN, LSTM and GRU on float CPU input run the
        whole stack through torch's own fused operator: :meth:`_torch_kernel_serves`.)

        The rule, in order: the readable loop whenever something looks inside or changes the step (tracing,
        recurrent dropout, zoneout), when ``layer.fast`` is False or the cell has no fast_scan, when inputs or
        parameters carry forward-mode tangents (``torch.autograd.forward_ad``; the fused Functions define no
        jvp), and under torch.func transforms or torch.compile unless the cell's fast_scan is plain
        differentiable torch code (``fast_scan_composable``). Everything else, the default training and
        inference call included, takes the fast path. Double backward and ``is_grads_batched`` need no
        choice here: the fused Functions' backward replays the readable loop when asked for them
        (:mod:`rnnmath.fused`).
        """
        if regularise or not self.fast:
            return "loop"
        # on the CPU, any cell whose hand-written path is not faster: its step split, derived and compiled
        # (compilation on, float32/float64, no autocast, transform, forward-mode AD or torch.compile around it)
        if compiled.supported(tensors[0]) and compiled.chosen_for(cell):
            return "generic"
        if getattr(cell, "fast_scan", None) is None:
            return "loop"
        if cell.fast_scan_composable:  # plain torch code: runs under every transform
            return "fast"
        if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
            return "loop"
        dual_level = getattr(forward_ad, "_current_level", 0) >= 0  # a forward_ad.dual_level() is open
        if dual_level and any(forward_ad.unpack_dual(t).tangent is not None for t in tensors):
            return "loop"
        return "fast"

    def _initial_states(self, hx, batch_size: int, x: Tensor) -> list:
        """hx (per field (L·D, B, size)) -> one cell State per layer and direction; zeros when hx is None.

        Errors as torch.nn's: RuntimeError for a wrong shape or dtype; hx is never broadcast over the batch.
        """
        cell = self._cells[0]
        name = type(self).__name__
        n = self.num_layers * self.num_directions
        like = self._weight_ih()
        if hx is None:
            zero = cell.initial_state(batch_size, like)
            return [zero] * n
        if len(cell.State._fields) == 1 and not isinstance(hx, (Tensor, cell.State)):
            # torch.nn.RNN/GRU read hx.dim(): AttributeError for a tuple or list, which is what they raise
            # (the cell's own State, a NamedTuple, is accepted: rnnmath's extension)
            raise AttributeError(f"{name}: hx must be a tensor (num_layers * num_directions, batch, "
                                 f"{cell.state_sizes()[0]}), got a {type(hx).__name__}")
        fields = (hx,) if isinstance(hx, Tensor) else tuple(hx)
        if len(fields) != len(cell.State._fields) or not all(isinstance(f, Tensor) for f in fields):
            raise ValueError(
                f"{name}: hx must be {len(cell.State._fields)} tensor(s) {cell.State._fields} of shape "
                f"(num_layers * num_directions, batch, size), got {len(fields)} object(s)"
            )
        for field, f, size in zip(cell.State._fields, fields, cell.state_sizes()):
            expected = (n, batch_size, size)
            if f.dim() != 3:
                raise RuntimeError(f"{name}: for batched 3-D input, hx should also be 3-D but got {f.dim()}-D tensor")
            if tuple(f.shape) != expected:
                raise RuntimeError(f"{name}: Expected hidden size {expected} for hx field {field!r} "
                                   f"(num_layers * num_directions, batch, size), got {list(f.shape)}")
            if (f.dtype != like.dtype and not torch.is_autocast_enabled(x.device.type)) or not f.is_floating_point():
                raise RuntimeError(f"{name}: hx field {field!r} has dtype {f.dtype}, expected {like.dtype} "
                                   "(the parameters' dtype)")
        return [cell.State(*(f[j] for f in fields)) for j in range(n)]

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size:  # torch.nn's order
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self.recurrent_dropout:
            s += f", recurrent_dropout={self.recurrent_dropout}"
        if self.zoneout:
            s += f", zoneout={self.zoneout}"
        return s


class _StepRecorder:
    """Collects what one layer and direction records at each step: the cell's gates, then its state."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Tensor]] = []
        self._pending: dict[str, Tensor] = {}

    def __call__(self, tensors: dict[str, Tensor]) -> None:
        self._pending.update(tensors)

    def end_step(self, state) -> None:
        self.steps.append({**self._pending, **state._asdict()})
        self._pending = {}


class Trace:
    """Every internal quantity of a run of a :class:`Recurrent` layer, made by :func:`trace`.

    ``trace[k, d]`` is a dict for layer k and direction d (0 forward, 1 reverse): each state field (``h``,
    ``c``) and each gate the cell records (LSTM ``i f g o``, GRU ``r z n``) as a (T, B, H) tensor on the
    input's time axis — for the reverse direction too. Steps past a sequence's length are NaN and
    ``valid`` (T, B) is False there: nothing is computed for them, so nothing is shown.
    Tensors are detached copies of the values the layer computed; the layer's results are unchanged.

    With ``keep_graph=True`` nothing is detached, and ``steps[k, d]`` holds the per-step dicts of the very
    tensors the loop used, in the order it ran them (the reverse direction from each sequence's end): pass
    ``[s["h"] for s in steps[k, d]]`` to ``torch.autograd.grad`` to get ∂L/∂h_t through all later steps.
    """

    def __init__(self, layer: Recurrent, keep_graph: bool = False) -> None:
        self.layer = layer
        self.keep_graph = keep_graph
        self._recorders: dict[tuple[int, int], _StepRecorder] = {}
        self.values: dict[tuple[int, int], dict[str, Tensor]] = {}
        self.steps: dict[tuple[int, int], list[dict[str, Tensor]]] = {}
        self.valid: Tensor | None = None

    def recorder(self, k: int, d: int) -> _StepRecorder:
        self._recorders[k, d] = _StepRecorder()
        return self._recorders[k, d]

    def finish(self, lengths: Tensor | None, T: int, B: int, device) -> None:
        valid = torch.ones(T, B, dtype=torch.bool, device=device)
        if lengths is not None:
            valid = torch.arange(T, device=device).unsqueeze(1) < lengths.to(device).unsqueeze(0)
        self.valid = valid
        for (k, d), rec in self._recorders.items():
            names = rec.steps[0].keys() if rec.steps else ()
            values = {}
            for name in names:
                v = torch.stack([s[name] if self.keep_graph else s[name].detach() for s in rec.steps])  # (T, B, H)
                if d == 1:
                    v = reverse_padded(v, lengths)
                values[name] = v.masked_fill(~valid.unsqueeze(2), float("nan"))
            self.values[k, d] = values
            if self.keep_graph:
                self.steps[k, d] = rec.steps
        self._recorders = {}

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Tensor]:
        return self.values[key]


@contextmanager
def trace(layer: Recurrent, keep_graph: bool = False) -> Iterator[Trace]:
    """Record states and gates of every layer, direction and step while running `layer` (the last call wins)::

        with rnnmath.trace(model.rnn) as tr:
            output, h_n = model.rnn(x, lengths=lengths)
        tr[0, 0]["h"], tr[0, 0]["f"]          # (T, B, H) each

    Tracing only keeps references to tensors the layer computes anyway, and off it costs one attribute test per
    step. With it on, the readable loop runs: its results are bit-identical to rnnmath's own fast paths, and
    equal within floating-point rounding to torch's fused operator, which the built-in RNN/LSTM/GRU run
    otherwise on float input (:meth:`Recurrent._torch_kernel_serves`). ``keep_graph=True`` keeps the recorded tensors in
    autograd's graph (see :class:`Trace`), for gradients with respect to h_t.
    """
    if not isinstance(layer, Recurrent):
        raise TypeError(f"trace() takes an rnnmath layer (Recurrent), got {type(layer).__name__}")
    t = Trace(layer, keep_graph)
    layer._trace = t
    try:
        yield t
    finally:
        layer._trace = None


def _is_exporting() -> bool:
    """True inside torch.onnx.export; with dynamo=False it traces, and the layer refuses (see forward)."""
    return torch.onnx.is_in_onnx_export()


def _unsqueeze_state(hx, name: str):
    """hx of an unbatched call: (L·D, H) per field -> (L·D, 1, H); a batched hx there is an error, as in torch."""
    if hx is None:
        return None
    if not isinstance(hx, (Tensor, tuple, list)):
        return hx  # _initial_states says what is wrong with it
    for f in (hx,) if isinstance(hx, Tensor) else hx:
        if isinstance(f, Tensor) and f.dim() != 2:
            raise RuntimeError(f"{name}: for unbatched 2-D input, hx should also be 2-D but got {f.dim()}-D tensor")
    return _map_state(hx, lambda s: s.unsqueeze(1))


def _check_arguments(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size):
    """torch.nn.RNNBase's checks, with its exception types: TypeError for a wrong type, ValueError for a value."""
    for flag, value in (("bias", bias), ("batch_first", batch_first)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} should be of type bool, got: {type(value).__name__}")
    if not isinstance(bidirectional, bool) and bidirectional not in (0, 1):
        # torch.nn reads any truthy object as True; a string such as "False" is refused here
        raise TypeError(f"bidirectional should be of type bool, got: {type(bidirectional).__name__}")
    for flag, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers),
                        ("proj_size", proj_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{flag} should be of type int, got: {type(value).__name__}")
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
        raise ValueError("dropout should be a number in range [0, 1] representing the probability of an element "
                         f"being zeroed, got {dropout!r}")
    for flag, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
        if value <= 0:
            raise ValueError(f"{flag} must be greater than zero, got {value}")
    if proj_size < 0:
        raise ValueError("proj_size should be a positive integer or zero to disable projections")
    if proj_size >= hidden_size:
        raise ValueError(f"proj_size has to be smaller than hidden_size, got {proj_size} >= {hidden_size}")


def _state_dtype(hx, default: torch.dtype) -> torch.dtype:
    """The dtype torch.nn's state has: hx's (its fields promoted), or the input's when hx is None."""
    if hx is None:
        return default
    dtype = None
    for f in (hx,) if isinstance(hx, Tensor) else hx:
        dtype = f.dtype if dtype is None else torch.promote_types(dtype, f.dtype)
    return default if dtype is None else dtype


def _map_state(state, fn):
    if state is None:
        return None
    return fn(state) if isinstance(state, Tensor) else tuple(fn(s) for s in state)


def _check_lengths(lengths, batch_size: int, T: int) -> Tensor:
    lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1 or lengths.shape[0] != batch_size:
        raise ValueError(f"lengths must have shape ({batch_size},), got {tuple(lengths.shape)}")
    if lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be integers, got {lengths.dtype}")
    # reading values is a graph break under torch.compile(fullgraph=True) and impossible under torch.func's
    # vmap (per-sample lengths): there the lengths are trusted
    if (lengths.numel() and not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()
            and (int(lengths.min()) < 0 or int(lengths.max()) > T)):
        raise ValueError(f"lengths must lie in [0, {T}] (the padded length), got {lengths.tolist()}")
    return lengths.long()


class RNN(Recurrent):
    """Elman RNN layers, as ``torch.nn.RNN``; see :class:`Recurrent` and :class:`rnnmath.RNNCell`.

    ``proj_size`` exists for torch.nn's signature; only 0 is allowed (ValueError otherwise, as in torch).
    """

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None, *,
                 proj_size=0, recurrent_dropout=0.0, zoneout=0.0):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity {nonlinearity!r}. Select from 'tanh' or 'relu'.")
        super().__init__(RNNCell, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device, dtype, nonlinearity=nonlinearity, proj_size=proj_size,
                         recurrent_dropout=recurrent_dropout, zoneout=zoneout)
        self.nonlinearity = nonlinearity
        self.mode = "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU"  # torch.nn's name of the kind


class LSTM(Recurrent):
    """LSTM layers, as ``torch.nn.LSTM``; see :class:`Recurrent` and :class:`rnnmath.LSTMCell`.

    ``proj_size`` P > 0 adds torch.nn.LSTM's projection h_t = W_hr (o_t ⊙ tanh c_t) (parameters
    ``weight_hr_l{k}[_reverse]`` (P, H)): output (T, B, D·P), h_n (L·D, B, P), c_n (L·D, B, H). On float
    input they run torch's fused operator like the other LSTMs; elsewhere the generic compiled path or the
    readable loop (rnnmath's hand-written fused LSTM has no projection).
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, proj_size=0, device=None, dtype=None, *, recurrent_dropout=0.0, zoneout=0.0):
        super().__init__(LSTMCell, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device, dtype, proj_size=proj_size, recurrent_dropout=recurrent_dropout,
                         zoneout=zoneout)
        self.mode = "LSTM"


class GRU(Recurrent):
    """GRU layers, as ``torch.nn.GRU``; see :class:`Recurrent` and :class:`rnnmath.GRUCell`.

    ``proj_size`` exists for torch.nn's signature; only 0 is allowed (ValueError otherwise, as in torch).
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, device=None, dtype=None, *, proj_size=0, recurrent_dropout=0.0, zoneout=0.0):
        super().__init__(GRUCell, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device, dtype, proj_size=proj_size, recurrent_dropout=recurrent_dropout,
                         zoneout=zoneout)
        self.mode = "GRU"
