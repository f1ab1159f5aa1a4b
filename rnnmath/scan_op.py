"""The time loop as one scan operator, for graphs that keep the time axis symbolic (torch.export, ONNX).

The readable loop (:func:`rnnmath.layers.scan`) is a Python ``for`` over the steps: a graph capture
(``torch.export``, which ``torch.onnx.export(..., dynamo=True)`` runs first) unrolls it into T copies of the
step, so the graph only takes sequences of the length it was traced with. The fast path (an
``autograd.Function`` with hand-written kernels) cannot be captured at all. Here the same step runs inside
torch's ``scan`` higher-order operator (``torch._higher_order_ops.scan``, a prototype in torch 2.13):
``torch.export`` keeps it as one node whose body is ``cell.step`` traced once, and torch's ONNX exporter
writes that node as ONNX ``Scan``, so batch and time axes stay dynamic. Measured with torch 2.13.0 and
onnxruntime 1.32: onnxruntime's outputs differed from torch's by at most 3e-7 for RNN/LSTM/GRU, 2 layers,
bidirectional, with lengths, at T from 1 to 30 and B from 1 to 17, and by at most 4.3e-6 for the other cells
(tests/test_export.py holds them within 1e-5; docs/serving.md).

The layer selects this path itself while it is being exported (``torch.compiler.is_exporting()``), so::

    torch.onnx.export(rnnmath.LSTM(8, 16, num_layers=2, bidirectional=True), (x,), dynamo=True,
                      dynamic_shapes=({0: torch.export.Dim("T"), 1: torch.export.Dim("B")},))

gives a graph for any T and B. Anything any cell's ``step`` does is captured (every cell of rnnmath.CELLS),
and so are lengths (the same ``torch.where`` carry as the readable loop) and zoneout in evaluation.
Not captured: tracing (nothing records inside a graph) and the random masks of training-mode regularisers.
Export under ``torch.no_grad()``: with gradients on, the operator also traces a backward, which failed for
the LayerNorm-LSTM (its variance has no derivative rule at the level the operator traces it).
"""

from __future__ import annotations

import torch
from torch import Tensor


def scan(cell, p: dict, xw: Tensor, state, mask: Tensor | None, *, h_mask: Tensor | None = None,
         zoneout: float = 0.0, training: bool = False):
    """Same contract and values as :func:`rnnmath.layers.scan` (outputs (T, B, H), last state), computed by
    torch's scan operator. Raises ValueError for zoneout in training mode (a random draw per step)."""
    from torch._higher_order_ops.scan import scan as scan_operator

    from .layers import _zoneout

    if zoneout and training:
        raise ValueError("zoneout in training mode draws random masks at every step and cannot be exported; "
                         "call .eval() first")
    State = type(state)

    def step(carry: tuple[Tensor, ...], inputs: tuple[Tensor, ...]):
        previous = State(*carry)
        new = cell.step(p, inputs[0], previous if h_mask is None else previous._replace(h=previous.h * h_mask))
        if zoneout:
            new = _zoneout(new, previous, zoneout, False)
        if mask is not None:  # past a sequence's length the state is carried unchanged
            new = State(*(torch.where(inputs[1], n, s) for n, s in zip(new, previous)))
        return tuple(new), new.h.clone()  # the operator forbids an output that aliases the carry

    # the operator also forbids initial carries that alias one another (an LSTM's zero h and c are one tensor)
    init = tuple(s.clone() for s in state)
    final, output = scan_operator(step, init, (xw,) if mask is None else (xw, mask))  # output (T, B, H)
    if mask is not None:
        output = output.masked_fill(~mask, 0.0)
    return output, State(*final)
