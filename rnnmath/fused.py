"""The fast path: the time loop of each built-in cell as one autograd Function with a hand-derived backward.

Shape letters: T time, B batch, H hidden, G gate rows (H RNN, 4H LSTM, 3H GRU).

The readable loop (:func:`rnnmath.layers.scan` calling ``cell.step``) is the specification; the functions
here compute the same thing faster and the tests hold them equal. Three things make them fast:

* **Forward**: one pass over time that writes into buffers allocated once for all steps, with the pointwise
  work done in place on slices. It runs the same floating-point operations in the same order, on operands
  of the same layout, as ``cell.step`` does, so its values are bit-identical to the readable loop's (and
  therefore to a traced run). Nothing is recorded for autograd per step.
* **Backward**: backpropagation through time written out by hand, the math of :mod:`rnnmath.reference`.
  Only ∂L/∂h_{t-1} = ∂L/∂G_t W_hh (plus the cell's direct paths) is sequential; the LSTM computes the
  activation derivatives that do not depend on the carried gradients for all steps before its loop. The
  gradients of the gate pre-activations ∂L/∂G_t go into one (T, B, G) buffer, from which
  ∂L/∂W_hh = Σ_t ∂L/∂G_tᵀ h_{t-1} is ONE matrix product over all steps, ∂L/∂b_hh one sum, and ∂L/∂xw is
  returned whole, so the layer's input projection gets its weight gradient as one product as well.
* **Threads**: a loop whose steps are small runs on one thread (:func:`one_thread_if_small`).
* **Lengths**: ``mask`` (T, B, 1) is True while step t is inside sequence b. Outside, the state is carried
  unchanged and the output is zero, exactly as in ``scan``; in the backward pass the candidate state gets no
  gradient there and the carried gradient passes straight through.

Higher-order and batched gradients: the hand-derived backward is first order only. When the backward pass
itself is recorded (``create_graph=True``: double backward, gradient penalties, ``gradgradcheck``) or runs
under a torch.func transform (``is_grads_batched=True`` vmaps it), each Function instead differentiates the
readable loop (``cell.step``) replayed from its saved inputs (:func:`_replay_backward`): the gradients it
returns are then themselves differentiable, with the same values. The plain first-order backward (training)
never takes that branch. The replay needs the input projection xw: a layer passes ``xw_again``, a function
that recomputes it from the layer's input (which autograd keeps anyway), so nothing more is kept in memory;
called without it, a Function keeps xw itself.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

# grad ⊙ (1 − y²), grad ⊙ y(1 − y) and grad ⊙ [y > 0] written into a given buffer (the derivative of
# tanh, sigmoid and relu from their outputs y), each one kernel instead of three
_tanh_backward = torch.ops.aten.tanh_backward.grad_input
_sigmoid_backward = torch.ops.aten.sigmoid_backward.grad_input
_threshold_backward = torch.ops.aten.threshold_backward.grad_input

_ONE_THREAD = os.environ.get("RNNMATH_ONE_THREAD", "1").strip().lower() not in ("0", "false", "no", "off")
one_thread_max_product: int = 1 << 18 if _ONE_THREAD else 0
"""A loop over time whose step's recurrent product h W_hhᵀ has at most this many multiply-adds (B·G·H; an LSTM's
G is 4H: up to H = 256 at B = 1, H = 128 at B = 4) ..."""
one_thread_max_elements: int = 1 << 12 if _ONE_THREAD else 0
"""... and whose step has at most this many gate elements (B·G) runs with one thread
(:func:`one_thread_if_small`, for this module's loops and rnnmath.compiled's). Either at 0 turns it off, as does
``RNNMATH_ONE_THREAD=0`` in the environment (read at import)."""


@contextmanager
def one_thread_if_small(batch: int, gates: int, hidden: int) -> Iterator[None]:
    """Run the block (a loop over time) with ``torch.set_num_threads(1)``, then restore the count, when one step is
    small: at most :data:`one_thread_max_product` multiply-adds in its product (B·G·H; ``hidden`` = 0 for a cell
    without one) and :data:`one_thread_max_elements` gate elements (B·G).

    Such a step is a few microseconds of work, yet with more threads ATen and MKL split some of its operations
    (``tanh`` of 256 elements, a (128, 3) × (3, 3) product) into parallel regions that cost more than they save.
    Measured on a 2-core AMD EPYC at 2 threads (docs/benchmarks.md): B = 1 and small B = 32 steps 5-39 % faster
    in one hour, no different beyond the noise in the next; slower at B = 32, H = 64 (peephole LSTM, 1.17 x) and
    at H = 1024, B = 1 (1.6 x), hence the bounds.

    Only while this is the process's one Python thread (:func:`_alone`): torch keeps, beside each thread's own
    count, one process-wide count that threads started later inherit, and ``torch.set_num_threads`` sets both, so
    with other threads about (a server's pool, a Jupyter kernel's) a thread they start during the loop would keep
    1 thread and a count set elsewhere would be overwritten. Those processes keep torch's threads here.
    """
    threads = torch.get_num_threads()
    off = not (one_thread_max_product and one_thread_max_elements)  # either at 0, for cells without a product too
    if (off or threads == 1 or batch * gates * hidden > one_thread_max_product
            or batch * gates > one_thread_max_elements or not _alone()):
        yield
        return
    try:  # set inside the try: an interrupt (Ctrl-C) between setting and the try would leave 1 thread for good
        torch.set_num_threads(1)
        yield
    finally:
        torch.set_num_threads(threads)


def _alone() -> bool:
    """Whether no other Python thread is alive but tqdm's monitor, which only refreshes progress bars (inductor's
    first compile in a process starts one, and it stays)."""
    if threading.active_count() == 1:
        return True
    me = threading.current_thread()
    return all(t is me or type(t).__module__ == "tqdm._monitor" for t in threading.enumerate())


def without_autocast(backward):
    """An autograd.Function's backward run with autocast off on the gradients' device: the hand-written
    backward works in its forward's precision, and a ``loss.backward()`` called inside a ``torch.autocast``
    block would otherwise cast its products (and fail on the in-place ones: "self and mat2 must have the same
    dtype")."""
    @functools.wraps(backward)
    def run(ctx, *grads):
        device = next((g.device.type for g in grads if isinstance(g, Tensor)), "cpu")
        with torch.autocast(device, enabled=False):
            return backward(ctx, *grads)

    return run


def _needs_replay(grads) -> bool:
    """True when the backward pass is itself recorded (create_graph=True), runs under a torch.func transform,
    or gets batched gradients (``is_grads_batched=True`` vmaps it): there the hand-derived, in-place backward
    cannot serve."""
    return (torch.is_grad_enabled() or torch._C._are_functorch_transforms_active()
            or any(torch._C._functorch.is_legacy_batchedtensor(g) for g in grads))


def _replay_backward(ctx, xw: Tensor | None, state: tuple, weight_hh: Tensor, bias_hh: Tensor | None,
                     mask: Tensor | None, grads: tuple) -> list:
    """Gradients of the Function's inputs (xw, *state, W_hh, b_hh) by differentiating the readable loop.

    With create_graph the saved tensors keep their graph, so the gradients returned are differentiable
    functions of the inputs and of ``grads`` (double backward); otherwise detached copies are used.
    xw is None when the layer gave ``ctx.xw_again`` to recompute it (differentiably, from the layer's input).
    """
    from .layers import scan  # the readable loop; imported here because layers imports this module

    cell = ctx.cell
    create_graph = torch.is_grad_enabled()
    if xw is None:
        with torch.set_grad_enabled(create_graph), torch.autocast(weight_hh.device.type, enabled=False):
            xw = ctx.xw_again()
    inputs = [xw, *state, weight_hh, bias_hh]
    needs = ctx.needs_input_grad[: len(inputs)]
    with torch.enable_grad():
        if not create_graph:
            inputs = [t if t is None else t.detach().requires_grad_(n) for t, n in zip(inputs, needs)]
        xw_, *rest = inputs
        state_, (w, b) = cell.State(*rest[: len(state)]), rest[len(state):]
        output, last = scan(cell, {"weight_hh": w, "bias_hh": b}, xw_, state_, mask)
        wrt = [t for t, n in zip(inputs, needs) if n]
        found = iter(torch.autograd.grad([output, *last], wrt, grads, create_graph=create_graph,
                                         allow_unused=True, materialize_grads=True))
    return [next(found) if n else None for n in needs]


def _step_buffer(T: int, B: int, n: int, like: Tensor) -> Tensor:
    """An empty (T, B, n) buffer whose every step [t] is contiguous and starts on a 64-byte boundary.

    The h_t written here are the next step's operand of a matrix product, and on some CPUs (measured on an
    AVX-512 AMD EPYC) a product's rounding depends on its operand's alignment. The readable loop's h_t are
    fresh tensors (64-byte aligned by torch's allocator); a plain (T, B, n) buffer's steps are aligned only when
    B·n is a multiple of 16 floats, so the steps are padded to that, keeping the two paths bitwise equal.
    """
    per_step = B * n
    unit = max(1, 64 // like.element_size())
    stride = -(-per_step // unit) * unit
    return like.new_empty(T, stride)[:, :per_step].view(T, B, n)


def _plus_bias(xw: Tensor, bias: Tensor | None) -> Tensor:
    """x_t + b_hh for all steps at once, in a fresh step-aligned buffer the forward pass then writes into."""
    out = _step_buffer(*xw.shape, xw)  # (T, B, G)
    return out.copy_(xw) if bias is None else torch.add(xw, bias, out=out)


def _weight_grads(ctx, dG: Tensor, h0: Tensor, hs: Tensor, w_index: int):
    """∂L/∂W_hh = Σ_t ∂L/∂G_tᵀ h_{t-1} as one product over steps 1..T-1 plus step 0, and ∂L/∂b_hh = Σ ∂L/∂G."""
    dW = db = None
    if ctx.needs_input_grad[w_index]:
        G, H = dG.shape[2], hs.shape[2]
        dW = torch.mm(dG[1:].reshape(-1, G).t(), hs[:-1].reshape(-1, H))  # (G, H)
        dW.addmm_(dG[0].t(), h0)
    if ctx.has_bias and ctx.needs_input_grad[w_index + 1]:
        db = dG.sum((0, 1))  # (G,)
    return dW, db


def _masked_grad(grad_output: Tensor, mask: Tensor | None) -> Tensor:
    """The output past a sequence's length is the constant 0: whatever gradient arrives there is dropped."""
    return grad_output if mask is None else grad_output.masked_fill(~mask, 0.0)


def _per_step(blocks) -> list[tuple[Tensor, ...]]:
    """For each (T, B, H) block, its T per-step views, made once before the loop rather than at every step."""
    return [block.unbind(0) for block in blocks]


def _steps(mask: Tensor | None, T: int):
    """Per-step (keep, drop) masks (B, 1), or Nones without lengths."""
    if mask is None:
        return [None] * T, [None] * T
    return mask.unbind(0), (~mask).unbind(0)


class _RNNScan(torch.autograd.Function):
    """h_t = act(x_t + b_hh + h_{t-1} W_hhᵀ) over all t, with act tanh or relu."""

    @staticmethod
    def forward(ctx, xw, h0, weight_hh, bias_hh, mask, relu: bool, cell, xw_again):
        T = xw.shape[0]
        hs = _plus_bias(xw, bias_hh)  # (T, B, H): x_t + b_hh, then h_t in place
        w_t = weight_hh.t()
        keep, _ = _steps(mask, T)
        activation_ = torch.relu_ if relu else torch.tanh_
        h = h0
        with one_thread_if_small(hs.shape[1], *weight_hh.shape):
            for t, a in enumerate(hs.unbind(0)):
                activation_(a.addmm_(h, w_t))  # the cell's torch.addmm(x + b_hh, h, W_hhᵀ), then tanh or relu
                if mask is not None:
                    torch.where(keep[t], a, h, out=a)
                h = a
        ctx.save_for_backward(hs, h0, weight_hh, mask, xw if xw_again is None else None, bias_hh)
        ctx.relu, ctx.has_bias, ctx.cell, ctx.xw_again = relu, bias_hh is not None, cell, xw_again
        output = hs if mask is None else hs.masked_fill(~mask, 0.0)  # (T, B, H)
        return output, h.clone()

    @staticmethod
    @without_autocast
    def backward(ctx, grad_output, grad_hn):
        hs, h0, weight_hh, mask, xw, bias_hh = ctx.saved_tensors
        if _needs_replay((grad_output, grad_hn)):
            return (*_replay_backward(ctx, xw, (h0,), weight_hh, bias_hh, mask, (grad_output, grad_hn)), None, None,
                    None, None)
        T = hs.shape[0]
        keep, drop = _steps(mask, T)
        grad_output = _masked_grad(grad_output, mask)
        dG = torch.empty_like(hs)  # (T, B, H): ∂L/∂a_t, the pre-activations
        dh = grad_hn.clone(memory_format=torch.contiguous_format)  # (B, H): ∂L/∂h_t, carried back
        back = torch.empty_like(dh) if mask is not None else None
        dG_, hs_, grad_output = _per_step((dG, hs, grad_output))
        with one_thread_if_small(hs.shape[1], *weight_hh.shape):
            for t in reversed(range(T)):
                dh.add_(grad_output[t])
                if ctx.relu:
                    _threshold_backward(dh, hs_[t], 0, grad_input=dG_[t])  # ⊙ [a_t > 0]
                else:
                    _tanh_backward(dh, hs_[t], grad_input=dG_[t])  # ⊙ (1 − h_t²)
                if mask is not None:
                    dG_[t].masked_fill_(drop[t], 0.0)
                if t == 0 and not ctx.needs_input_grad[1]:
                    break
                if mask is None:
                    torch.mm(dG_[t], weight_hh, out=dh)  # ∂L/∂h_{t-1} = ∂L/∂a_t W_hh
                else:
                    torch.where(keep[t], torch.mm(dG_[t], weight_hh, out=back), dh, out=dh)
        dW, db = _weight_grads(ctx, dG, h0, hs, 2)
        return dG, dh if ctx.needs_input_grad[1] else None, dW, db, None, None, None, None


class _LSTMScan(torch.autograd.Function):
    """i, f, g, o = σ, σ, tanh, σ of (x_t + b_hh + h_{t-1} W_hhᵀ); c_t = f c_{t-1} + i g; h_t = o tanh(c_t).

    Backward, per step, with ∂L/∂h_t and ∂L/∂c_t carried back from step t+1::

        ∂L/∂c_t     += ∂L/∂h_t ⊙ K_t               K_t = o ⊙ (1 − tanh² c_t)
        ∂L/∂G_t      = [∂L/∂c_t ⊙ P_t | ∂L/∂h_t ⊙ Q_t]
                       P_t = [g ⊙ i(1 − i) | c_{t-1} ⊙ f(1 − f) | i ⊙ (1 − g²)],  Q_t = tanh(c_t) ⊙ o(1 − o)
        ∂L/∂c_{t-1}  = ∂L/∂c_t ⊙ f
        ∂L/∂h_{t-1}  = ∂L/∂out_{t-1} + ∂L/∂G_t W_hh

    K, P and Q do not depend on the carried gradients, so they are computed for all steps at once before the
    loop (P and Q straight into ∂L/∂G's buffer, which the loop then scales in place), leaving five ops a step
    instead of about fifteen. tanh(c_t) is recomputed for them, so the forward pass saves nothing more; its
    f ⊙ c + i ⊙ g stays two products and a sum (addcmul would fuse them and round differently from ``cell.step``).
    """

    @staticmethod
    def forward(ctx, xw, h0, c0, weight_hh, bias_hh, mask, cell, xw_again):
        T, B, G = xw.shape
        H = G // 4
        gates = _plus_bias(xw, bias_hh)  # (T, B, 4H): x_t + b_hh, then the activated gates in place
        hs = _step_buffer(T, B, H, xw)  # (T, B, H), each step aligned: it is the next step's operand
        cs = xw.new_empty(T, B, H)  # (T, B, H)
        fc, ig = xw.new_empty(B, H), xw.new_empty(B, H)  # (B, H) scratch for f ⊙ c and i ⊙ g
        w_t = weight_hh.t()
        keep, _ = _steps(mask, T)
        # each gate activated on its own (B, H) slice as in cell.step: one sigmoid over i | f together would
        # send other elements through the kernels' scalar tail loop, which rounds differently from the vector one
        i, f, g, o = _per_step(gates.chunk(4, dim=2))  # (B, H) views of each step's gates
        h, c = h0, c0
        with one_thread_if_small(B, G, H):
            for t, (a, c_t, h_t) in enumerate(zip(gates.unbind(0), cs.unbind(0), hs.unbind(0))):
                a.addmm_(h, w_t)
                i[t].sigmoid_()
                f[t].sigmoid_()
                g[t].tanh_()
                o[t].sigmoid_()
                # f ⊙ c + i ⊙ g as two products and a sum: addcmul would fuse them (FMA) and round differently
                torch.add(torch.mul(f[t], c, out=fc), torch.mul(i[t], g[t], out=ig), out=c_t)
                torch.mul(o[t], torch.tanh(c_t, out=fc), out=h_t)
                if mask is not None:
                    torch.where(keep[t], c_t, c, out=c_t)
                    torch.where(keep[t], h_t, h, out=h_t)
                h, c = h_t, c_t
        ctx.save_for_backward(gates, hs, cs, h0, c0, weight_hh, mask, xw if xw_again is None else None, bias_hh)
        ctx.has_bias, ctx.cell, ctx.xw_again = bias_hh is not None, cell, xw_again
        output = hs if mask is None else hs.masked_fill(~mask, 0.0)  # (T, B, H)
        return output, h.clone(), c.clone()

    @staticmethod
    @without_autocast
    def backward(ctx, grad_output, grad_hn, grad_cn):
        gates, hs, cs, h0, c0, weight_hh, mask, xw, bias_hh = ctx.saved_tensors
        grads = (grad_output, grad_hn, grad_cn)
        if _needs_replay(grads):
            return (*_replay_backward(ctx, xw, (h0, c0), weight_hh, bias_hh, mask, grads), None, None, None)
        T, B, G = gates.shape
        H = G // 4
        keep, _ = _steps(mask, T)
        grad_output = _masked_grad(grad_output, mask)
        i, f, g, o = gates.chunk(4, dim=2)  # (T, B, H) views
        dG = torch.empty_like(gates)  # (T, B, 4H): ∂L/∂ of the gate pre-activations; first P_t | Q_t
        dG_i, dG_f, dG_g, dG_o = dG.chunk(4, dim=2)
        _sigmoid_backward(g, i, grad_input=dG_i)  # g ⊙ i(1 − i)
        _sigmoid_backward(cs[:-1], f[1:], grad_input=dG_f[1:])  # c_{t-1} ⊙ f(1 − f)
        _sigmoid_backward(c0, f[0], grad_input=dG_f[0])
        _tanh_backward(i, g, grad_input=dG_g)  # i ⊙ (1 − g²)
        K = torch.tanh(cs)  # (T, B, H): tanh(c_t), then K in place
        _sigmoid_backward(K, o, grad_input=dG_o)  # Q = tanh(c_t) ⊙ o(1 − o)
        _tanh_backward(o, K, grad_input=K)  # K = o ⊙ (1 − tanh² c_t)
        f_carry = f
        if mask is not None:
            # past a sequence's length the gates get no gradient and ∂L/∂c passes through unchanged (K = 0, f → 1)
            dG.masked_fill_(~mask, 0.0)
            K.masked_fill_(~mask, 0.0)
            f_carry = f.masked_fill(~mask, 1.0)  # (T, B, H)
        P = dG[:, :, : 3 * H].unflatten(2, (3, H)).unbind(0)  # (B, 3, H) per step: i | f | g
        Q, K, f_carry = dG_o.unbind(0), K.unbind(0), f_carry.unbind(0)
        dG_, grad_output = dG.unbind(0), grad_output.unbind(0)
        dh = torch.add(grad_hn, grad_output[T - 1])  # (B, H): ∂L/∂h_t, carried back
        dc = grad_cn.clone(memory_format=torch.contiguous_format)  # (B, H): ∂L/∂c_t, carried back
        back = torch.empty_like(dh) if mask is not None else None  # (B, H) scratch
        with one_thread_if_small(B, G, H):
            for t in reversed(range(T)):
                dc.addcmul_(dh, K[t])  # ∂L/∂c_t: from c_{t+1} and through h_t = o tanh(c_t)
                P[t].mul_(dc[:, None, :])  # ∂L/∂(i, f, g) pre-activations
                Q[t].mul_(dh)  # ∂L/∂o pre-activation
                dc.mul_(f_carry[t])  # ∂L/∂c_{t-1} = ∂L/∂c_t ⊙ f
                if t == 0:
                    if ctx.needs_input_grad[1]:
                        new = torch.mm(dG_[0], weight_hh)  # (B, H)
                        dh = new if mask is None else torch.where(keep[0], new, dh)
                    break
                if mask is None:
                    torch.addmm(grad_output[t - 1], dG_[t], weight_hh, out=dh)  # ∂L/∂h_{t-1} = ∂L/∂out + ∂L/∂G_t W_hh
                else:  # h_{t-1} carried unchanged past the length: its gradient passes through
                    torch.where(keep[t], torch.mm(dG_[t], weight_hh, out=back), dh, out=dh).add_(grad_output[t - 1])
        dW, db = _weight_grads(ctx, dG, h0, hs, 3)
        dh0 = dh if ctx.needs_input_grad[1] else None
        dc0 = dc if ctx.needs_input_grad[2] else None
        return dG, dh0, dc0, dW, db, None, None, None


class _GRUScan(torch.autograd.Function):
    """r, z = σ(x_{r,z} + h W_{h r,z}ᵀ + b_{h r,z}); n = tanh(x_n + r (h W_hnᵀ + b_hn)); h' = (1 − z) n + z h."""

    @staticmethod
    def forward(ctx, xw, h0, weight_hh, bias_hh, mask, cell, xw_again):
        T, B, G = xw.shape
        H = G // 3
        hh = xw.new_empty(T, B, G)  # (T, B, 3H): h_{t-1} W_hhᵀ + b_hh, kept for the backward pass
        r, z, n = (xw.new_empty(T, B, H) for _ in range(3))  # (T, B, H) each, contiguous per step
        hs = _step_buffer(T, B, H, xw)  # (T, B, H), each step aligned: it is the next step's operand
        u, v = xw.new_empty(B, H), xw.new_empty(B, H)  # (B, H) scratch
        w_t = weight_hh.t()
        x_r, x_z, x_n = _per_step(xw.chunk(3, dim=2))
        h_r, h_z, h_n = _per_step(hh.chunk(3, dim=2))
        hh_, r_, z_, n_, hs_ = _per_step((hh, r, z, n, hs))
        keep, _ = _steps(mask, T)
        h = h0
        with one_thread_if_small(B, G, H):
            for t in range(T):
                # the cell's F.linear(h, W_hh, b_hh) is addmm(b_hh, h, W_hhᵀ), or mm without a bias
                if bias_hh is None:
                    torch.mm(h, w_t, out=hh_[t])
                else:
                    torch.addmm(bias_hh, h, w_t, out=hh_[t])
                torch.add(x_r[t], h_r[t], out=r_[t]).sigmoid_()
                torch.add(x_z[t], h_z[t], out=z_[t]).sigmoid_()
                torch.add(x_n[t], torch.mul(r_[t], h_n[t], out=u), out=n_[t]).tanh_()
                h_t = torch.add(torch.neg(z_[t], out=u).add_(1).mul_(n_[t]), torch.mul(z_[t], h, out=v), out=hs_[t])
                if mask is not None:
                    torch.where(keep[t], h_t, h, out=h_t)
                h = h_t
        ctx.save_for_backward(hh, r, z, n, hs, h0, weight_hh, mask, xw if xw_again is None else None, bias_hh)
        ctx.has_bias, ctx.cell, ctx.xw_again = bias_hh is not None, cell, xw_again
        output = hs if mask is None else hs.masked_fill(~mask, 0.0)  # (T, B, H)
        return output, h.clone()

    @staticmethod
    @without_autocast
    def backward(ctx, grad_output, grad_hn):
        hh, r, z, n, hs, h0, weight_hh, mask, xw, bias_hh = ctx.saved_tensors
        if _needs_replay((grad_output, grad_hn)):
            return (*_replay_backward(ctx, xw, (h0,), weight_hh, bias_hh, mask, (grad_output, grad_hn)), None, None,
                    None)
        T, B, G = hh.shape
        H = G // 3
        keep, drop = _steps(mask, T)
        grad_output = _masked_grad(grad_output, mask)
        dx = torch.empty_like(hh)  # (T, B, 3H): ∂L/∂ of x_t's part of each gate pre-activation
        dhh = torch.empty_like(hh)  # (T, B, 3H): ∂L/∂(h_{t-1} W_hhᵀ + b_hh)
        dh = grad_hn.clone(memory_format=torch.contiguous_format)  # (B, H): ∂L/∂h_t, carried back
        u, back = torch.empty_like(dh), torch.empty_like(dh)  # (B, H) scratch
        dx_r, dx_z, dx_n = _per_step(dx.chunk(3, dim=2))
        dhh_rz, dhh_n = _per_step(dhh.split((2 * H, H), dim=2))
        dx_rz, h_n = dx[:, :, : 2 * H].unbind(0), hh[:, :, 2 * H :].unbind(0)
        dx_, dhh_, r, z, n, hs_, grad_output = _per_step((dx, dhh, r, z, n, hs, grad_output))
        with one_thread_if_small(B, G, H):
            for t in reversed(range(T)):
                h_prev = hs_[t - 1] if t > 0 else h0
                dh.add_(grad_output[t])
                # ∂L/∂n = ∂L/∂h ⊙ (1 − z), through tanh
                _tanh_backward(torch.neg(z[t], out=u).add_(1).mul_(dh), n[t], grad_input=dx_n[t])
                # ∂L/∂z = ∂L/∂h ⊙ (h_{t-1} − n), through σ
                _sigmoid_backward(torch.sub(h_prev, n[t], out=u).mul_(dh), z[t], grad_input=dx_z[t])
                # ∂L/∂r = ∂L/∂n_pre ⊙ (h W_hnᵀ + b_hn), through σ
                _sigmoid_backward(torch.mul(dx_n[t], h_n[t], out=u), r[t], grad_input=dx_r[t])
                dhh_rz[t].copy_(dx_rz[t])
                torch.mul(dx_n[t], r[t], out=dhh_n[t])  # r multiplies the recurrent part of n
                if mask is not None:
                    dx_[t].masked_fill_(drop[t], 0.0)
                    dhh_[t].masked_fill_(drop[t], 0.0)
                if t == 0 and not ctx.needs_input_grad[1]:
                    break
                # ∂L/∂h_{t-1} = ∂L/∂h ⊙ z + ∂L/∂hh_t W_hh
                if mask is None:
                    torch.addmm(torch.mul(dh, z[t], out=u), dhh_[t], weight_hh, out=dh)
                else:
                    new = torch.addmm(torch.mul(dh, z[t], out=u), dhh_[t], weight_hh, out=back)
                    torch.where(keep[t], new, dh, out=dh)
        dW, db = _weight_grads(ctx, dhh, h0, hs, 2)
        return dx, dh if ctx.needs_input_grad[1] else None, dW, db, None, None, None


def _empty_scan(xw: Tensor, state, hidden_size: int):
    """Zero steps: no output, the initial state unchanged (as the readable loop)."""
    return xw.new_zeros(0, xw.shape[1], hidden_size), state


def rnn_scan(p: dict, xw: Tensor, state, mask: Tensor | None, cell, xw_again=None):
    """The Elman RNN's time loop; same contract as :func:`rnnmath.layers.scan`. ``cell`` (an RNNCell) gives
    the nonlinearity and the step a double backward differentiates; ``xw_again()`` recomputes xw for it
    (without it xw is kept)."""
    H = p["weight_hh"].shape[1]
    if xw.shape[0] == 0:
        return _empty_scan(xw, state, H)
    output, h = _RNNScan.apply(xw, state.h, p["weight_hh"], p["bias_hh"], mask, cell.nonlinearity == "relu", cell,
                               xw_again)
    return output, type(state)(h)


def lstm_scan(p: dict, xw: Tensor, state, mask: Tensor | None, cell, xw_again=None):
    """The LSTM's time loop (no projection); same contract as :func:`rnnmath.layers.scan`."""
    H = p["weight_hh"].shape[1]
    if xw.shape[0] == 0:
        return _empty_scan(xw, state, H)
    output, h, c = _LSTMScan.apply(xw, state.h, state.c, p["weight_hh"], p["bias_hh"], mask, cell, xw_again)
    return output, type(state)(h, c)


def gru_scan(p: dict, xw: Tensor, state, mask: Tensor | None, cell, xw_again=None):
    """The GRU's time loop; same contract as :func:`rnnmath.layers.scan`."""
    H = p["weight_hh"].shape[1]
    if xw.shape[0] == 0:
        return _empty_scan(xw, state, H)
    output, h = _GRUScan.apply(xw, state.h, p["weight_hh"], p["bias_hh"], mask, cell, xw_again)
    return output, type(state)(h)
