"""How a network flows: gradients through time, and the classifier read word by word.

Shape letters: T time, B batch, H hidden, C classes, V vocabulary, L layers, D directions.

Gradient flow through time
--------------------------
For a loss L and the state h_t of layer k, direction d at step t, :func:`gradient_flow` gives ‖∂L/∂h_t‖,
the *total* derivative: what reaches h_t from its own output and from every later step (and every layer
above), exactly as backpropagation through time delivers it. :func:`jacobian_flow` gives ‖∂h_T/∂h_t‖_F,
the Frobenius norm of the Jacobian of each sequence's final state h_T (its state at its true last step)
with respect to h_t, within one layer and direction — the product of the step Jacobians
∂h_{s}/∂h_{s-1} for s = t+1 … T that makes gradients vanish or explode (see :mod:`rnnmath.reference`).

Both run the layer under ``rnnmath.trace(layer, keep_graph=True)``, which keeps the very tensors h_t the
time loop computed, and ask autograd for the gradient with respect to them: nothing is re-implemented.
Results are (T, B) per ``(layer, direction)`` on the input's time axis (the reverse direction too), NaN
past each sequence's length.

Word-by-word reading of the classifier
--------------------------------------
:func:`read_sentence` gives, for one sentence of a trained classifier:

* ``probabilities`` (T, C): the class probabilities after each word t, i.e. the classifier's prediction
  for the prefix w_1 … w_t. For a one-direction model with ``last`` pooling this is exactly the head
  applied to the state h_t (the states of a prefix are the states of the sentence); with ``max`` pooling
  it is the head applied to the running max of h_1 … h_t. For a **bidirectional** model the reverse
  direction of the prefix reads w_t … w_1, so it is not the reverse state of the full sentence: the curve
  says what the model would answer had the sentence ended after word t.
* ``grad_norm``: ‖∂L/∂h_t‖ per layer and direction with L = −log p(predicted class), and ``jacobian_norm``
  ‖∂h_T/∂h_t‖_F.
* ``attribution``: per word, three methods, all on the **log-odds** of the predicted class c,
  F = log p_c − log(1 − p_c) = log p_c − log Σ_{j≠c} p_j (for two classes, the difference of the two
  logits). The log-odds do not saturate: at p_c = 0.999999 a word that moves the logit by 2 still moves F
  by 2, while it moves p_c by about 1e-6 and log p_c by about 2e-6, which reads as "no word mattered".

  - ``grad_x_input``: ∂F/∂x_t[id_t], the gradient with respect to the one-hot input x_t picked at the
    word's id, which is gradient × input since x_t is 1 there and 0 elsewhere; equivalently (∂F/∂r_t)·r_t
    for the looked-up row r_t = W_ih[:, id_t] (summed over both directions of a bidirectional model).
  - ``integrated_gradients`` (Sundararajan, Taly & Yan, "Axiomatic Attribution for Deep Networks", ICML
    2017): IG_t = ∫₀¹ ∂F(α x)/∂x_t[id_t] dα, the gradient along the straight path from the baseline x' = 0
    (every word's one-hot vector zeroed: the layer sees only its biases, for the same length) to the input,
    by the midpoint rule with ``IG_STEPS`` points. Completeness: Σ_t IG_t = F(x) − F(0) up to the
    quadrature error; ``Reading.log_odds`` and ``Reading.baseline_log_odds`` hold the two ends.
  - ``occlusion``: F(sentence) − F(the word replaced by UNK).

  Positive values support the prediction, negative ones speak against it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cells import CELLS
from .layers import Recurrent, Trace, reverse_padded, trace

DIRECTIONS = ("forward", "reverse")


def key_name(k: int, d: int) -> str:
    """A readable name for layer k, direction d: 'layer 1 forward' (layers counted from 1)."""
    return f"layer {k + 1} {DIRECTIONS[d]}"


@dataclass
class Flow:
    """Per ``(layer, direction)``: a (T, B) tensor on the input's time axis, NaN past each length."""

    norms: dict[tuple[int, int], Tensor]
    valid: Tensor  # (T, B)
    trace: Trace
    loss: float = math.nan


def _to_input_time(per_step: list[Tensor], d: int, valid: Tensor) -> Tensor:
    """Per-step (B,) values in the order the loop ran -> (T, B) on the input's time axis, NaN past lengths."""
    T, B = valid.shape
    if not per_step:
        return torch.zeros(0, B)
    v = torch.stack(per_step)  # (T, B)
    if d == 1:
        v = reverse_padded(v, valid.sum(0))
    return v.masked_fill(~valid, math.nan)


def _grads(outputs: Tensor, inputs: list[Tensor], retain_graph: bool) -> list[Tensor]:
    """autograd.grad with zeros for the inputs that `outputs` does not depend on."""
    grads = torch.autograd.grad(outputs, inputs, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def gradient_flow(layer: Recurrent, loss_fn: Callable[[], Tensor]) -> Flow:
    """‖∂L/∂h_t‖ for every layer, direction and step, per sequence: ``norms[k, d]`` (T, B).

    ``loss_fn()`` runs the forward pass that calls ``layer`` (once, or the last call counts) and returns the
    scalar loss L. Use a loss summed over the batch so that each sequence's norms are those of its own loss.
    """
    with trace(layer, keep_graph=True) as tr:
        loss = loss_fn()
    keys = sorted(tr.steps)
    hs = [s["h"] for key in keys for s in tr.steps[key]]
    grads = _grads(loss, hs, retain_graph=False) if hs else []
    norms, i = {}, 0
    for k, d in keys:
        n = len(tr.steps[k, d])
        norms[k, d] = _to_input_time([g.norm(dim=1) for g in grads[i : i + n]], d, tr.valid)  # (T, B)
        i += n
    return Flow(norms, tr.valid, tr, float(loss.detach()))


def jacobian_flow(layer: Recurrent, run: Callable[[], object]) -> Flow:
    """‖∂h_T/∂h_t‖_F (Frobenius norm of the H×H Jacobian) per sequence, for every layer, direction, step.

    ``run()`` calls ``layer``. h_T is each sequence's state at its true last step (for the reverse
    direction: at the first word). Exact, not estimated: a backward pass from unit j of h_T gives row j of
    every sequence's Jacobian at once (sequences do not interact); autograd batches those H passes
    (``is_grads_batched``), 64 units at a time.
    """
    with trace(layer, keep_graph=True) as tr:
        run()
    norms = {}
    for k, d in sorted(tr.steps):
        hs = [s["h"] for s in tr.steps[k, d]]
        if not hs:
            norms[k, d] = torch.zeros(0, tr.valid.shape[1])
            continue
        last = hs[-1]  # (B, H): past a sequence's length the state is carried, so this is its h_T
        B, H = last.shape
        squares = last.new_zeros(len(hs), B).detach()  # (T, B)
        for start in range(0, H, 64):  # up to 64 rows of every Jacobian per batched backward pass
            units = torch.arange(start, min(H, start + 64))
            probes = F.one_hot(units, H).to(last.dtype).unsqueeze(1).expand(-1, B, H)  # (U, B, H)
            rows = torch.autograd.grad(last, hs, grad_outputs=probes, is_grads_batched=True, retain_graph=True,
                                       allow_unused=True)  # per step (U, B, H): rows of ∂h_T/∂h_t
            squares += torch.stack([r.pow(2).sum((0, 2)) if r is not None else last.new_zeros(B) for r in rows])
        norms[k, d] = _to_input_time(list(squares.sqrt()), d, tr.valid)
    return Flow(norms, tr.valid, tr)


# -- the classifier, word by word --------------------------------------------------------------------------
@dataclass
class Reading:
    """One sentence read by a trained classifier; every tensor is plain and detached (see module docstring)."""

    text: str
    tokens: list[str]  # the words as the tokenizer gives them (after max_len)
    unknown: list[bool]  # the word is not in the vocabulary and reads as UNK
    labels: list[str]
    probabilities: Tensor  # (T, C) after each word
    predicted: int
    grad_norm: dict[str, Tensor]  # 'layer 1 forward' -> (T,)
    jacobian_norm: dict[str, Tensor]  # 'layer 1 forward' -> (T,)
    attribution: dict[str, Tensor]  # 'integrated_gradients', 'grad_x_input', 'occlusion' -> (T,), on F
    log_odds: float = math.nan  # F(x): log-odds of the predicted class for the sentence
    baseline_log_odds: float = math.nan  # F(0): the same with every word's input zeroed (IG's baseline)
    states: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # 'layer 1 forward' -> {h, c, gates} (T, H)
    cell: str = ""

    def to_json(self) -> dict:
        """Plain numbers: tokens, per-step probabilities and grad_norm, per-word attribution."""
        def floats(t: Tensor) -> list:
            return [[round(float(v), 6) for v in row] for row in t] if t.dim() == 2 else \
                [round(float(v), 6) for v in t]

        return {
            "text": self.text,
            "tokens": self.tokens,
            "unknown": self.unknown,
            "labels": self.labels,
            "predicted": self.labels[self.predicted],
            "probabilities": floats(self.probabilities),
            "grad_norm": {name: floats(v) for name, v in self.grad_norm.items()},
            "jacobian_norm": {name: floats(v) for name, v in self.jacobian_norm.items()},
            "attribution": {name: floats(v) for name, v in self.attribution.items()},
            "attribution_target": "log-odds of the predicted class",
            "log_odds": round(self.log_odds, 6),
            "baseline_log_odds": round(self.baseline_log_odds, 6),
        }


def prefix_probabilities(model: nn.Module, ids: Tensor) -> Tensor:
    """Class probabilities (T, C) of every prefix w_1..w_t of one sentence ids (T,), in one batched call."""
    T = ids.shape[0]
    prefixes = ids.unsqueeze(0).expand(T, T).contiguous()  # (T, T): row t holds the sentence, length t+1
    return model(prefixes, torch.arange(1, T + 1)).exp()  # (T, C)


IG_STEPS = 64  # midpoint-rule points of integrated gradients; the completeness error shrinks as 1/steps²


def log_odds(log_p: Tensor, target: int) -> Tensor:
    """F = log p_target − log Σ_{j≠target} p_j (..., ) from log-probabilities (..., C): the log-odds of
    ``target``, computed from the log-probabilities without forming 1 − p (no cancellation near p = 1)."""
    others = torch.cat([log_p[..., :target], log_p[..., target + 1:]], dim=-1)  # (..., C-1)
    return log_p[..., target] - torch.logsumexp(others, dim=-1)


def occlusion(model: nn.Module, ids: Tensor, target: int, unk: int = 1) -> Tensor:
    """F(sentence) − F(word t replaced by the id `unk`) for each word t (T,), F the log-odds of target."""
    T = ids.shape[0]
    batch = ids.unsqueeze(0).repeat(T + 1, 1)  # (T+1, T): row 0 intact, row t+1 without word t
    batch[torch.arange(1, T + 1), torch.arange(T)] = unk
    f = log_odds(model(batch, torch.full((T + 1,), T)), target)  # (T+1,)
    return f[0] - f[1:]


def _one_hot(model: nn.Module, ids: Tensor, vocab_size: int) -> Tensor:
    """The sentence as one-hot float vectors (T, V) in the model's dtype: the layer's projection x W_ihᵀ picks
    the same row of W_ih that the token-id lookup picks, and autograd can differentiate with respect to x."""
    return F.one_hot(ids, vocab_size).to(next(model.parameters()).dtype)


def grad_x_input(model: nn.Module, ids: Tensor, target: int, vocab_size: int) -> Tensor:
    """∂F/∂x_t[id_t] for each word t (T,), F the log-odds of ``target``: the gradient with respect to the
    one-hot input x_t, picked at the word's id (= gradient × input, as the input is 1 there and 0 elsewhere)."""
    x = _one_hot(model, ids, vocab_size).unsqueeze(0).requires_grad_(True)  # (1, T, V)
    f = log_odds(model(x, torch.tensor([ids.shape[0]]))[0], target)
    (g,) = torch.autograd.grad(f, x)
    return g[0].gather(1, ids.unsqueeze(1)).squeeze(1)  # (T,)


def integrated_gradients(model: nn.Module, ids: Tensor, target: int, vocab_size: int, steps: int = IG_STEPS,
                         chunk: int = 16) -> tuple[Tensor, float, float]:
    """Integrated gradients of the log-odds F of ``target`` from the zero baseline (see the module docstring):
    IG (T,), F(x) and F(0). Midpoint rule over α = (k + ½)/steps, k = 0 … steps−1, ``chunk`` points a batch."""
    T = ids.shape[0]
    x = _one_hot(model, ids, vocab_size)  # (T, V)
    total = torch.zeros(T, dtype=x.dtype)  # (T,)
    alphas = (torch.arange(steps, dtype=x.dtype) + 0.5) / steps  # (S,)
    for start in range(0, steps, chunk):
        a = alphas[start : start + chunk]
        path = (a.view(-1, 1, 1) * x).requires_grad_(True)  # (S', T, V)
        f = log_odds(model(path, torch.full((len(a),), T)), target)  # (S',)
        (g,) = torch.autograd.grad(f.sum(), path)
        total += g.gather(2, ids.view(1, T, 1).expand(len(a), T, 1)).squeeze(2).sum(0)
    with torch.no_grad():
        ends = log_odds(model(torch.stack([x, torch.zeros_like(x)]), torch.full((2,), T)), target)  # (2,)
    return total / steps, float(ends[0]), float(ends[1])


def read_sentence(trained, text: str, jacobian: bool = True) -> Reading:
    """Read ``text`` with a trained classifier (``rnnmath.model.TrainedModel``): see the module docstring."""
    from .data import UNK, tokenize
    from .errors import UserError

    model, vocab, config = trained.model, trained.vocab, trained.config
    model.eval()
    words = tokenize(text)[: config.max_len]
    if not words:
        raise UserError(f"the text {text!r} has no words (the tokenizer keeps letters, digits and ' of any "
                        "script; see README 'Tokenizer')")
    ids = torch.tensor(vocab.ids(" ".join(words)))  # (T,)
    one = (ids.unsqueeze(0), torch.tensor([len(words)]))  # (1, T), (1,)
    with torch.no_grad():
        probabilities = prefix_probabilities(model, ids)  # (T, C)
    predicted = int(probabilities[-1].argmax())

    flow = gradient_flow(model.rnn, lambda: -model(*one)[0, predicted])
    states = {key_name(k, d): {n: v[:, 0].detach() for n, v in values.items()}
              for (k, d), values in flow.trace.values.items()}
    jac = jacobian_flow(model.rnn, lambda: model(*one)) if jacobian else None
    with torch.no_grad():
        occ = occlusion(model, ids, predicted, vocab.index[UNK])
    ig, f_x, f_0 = integrated_gradients(model, ids, predicted, len(vocab))
    return Reading(
        text=text,
        tokens=words,
        unknown=[int(i) == vocab.index[UNK] for i in ids],
        labels=list(trained.labels),
        probabilities=probabilities,
        predicted=predicted,
        grad_norm={key_name(*key): v[:, 0] for key, v in flow.norms.items()},
        jacobian_norm={key_name(*key): v[:, 0] for key, v in jac.norms.items()} if jac else {},
        attribution={"integrated_gradients": ig.detach(),
                     "grad_x_input": grad_x_input(model, ids, predicted, len(vocab)).detach(), "occlusion": occ},
        log_odds=f_x,
        baseline_log_odds=f_0,
        states=states,
        cell=config.cell,
    )


# -- vanishing gradients, shown ------------------------------------------------------------------------------
def adding_problem(T: int, B: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The adding problem (Hochreiter & Schmidhuber 1997): x (T, B, 2) holds random values in [0, 1) and a
    marker that is 1 at two steps, one in each half; the target (B,) is the sum of the two marked values."""
    values = torch.rand(T, B, generator=generator)  # (T, B)
    marks = torch.zeros(T, B)  # (T, B)
    first = torch.randint(0, max(1, T // 2), (B,), generator=generator)
    second = torch.randint(T // 2, T, (B,), generator=generator)
    marks[first, torch.arange(B)] = 1.0
    marks[second, torch.arange(B)] = 1.0
    return torch.stack([values, marks], dim=2), (values * marks).sum(0)


class Regressor(nn.Module):
    """One recurrent layer over (T, B, 2) and a linear read-out of its last state: ŷ = w·h_T + b."""

    def __init__(self, cell: str, hidden: int) -> None:
        super().__init__()
        self.rnn = Recurrent(CELLS[cell], 2, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        _, h_n = self.rnn(x)
        h = h_n[0] if isinstance(h_n, tuple) else h_n  # (1, B, H)
        return self.out(h[-1]).squeeze(1)  # (B,)


def train_adding(model: Regressor, steps: int, iterations: int, seed: int, lr: float = 0.01) -> float:
    """Train ``model`` on the adding problem of length ``steps`` with Adam (batches of 64, gradient norm
    clipped to 1); return the mean squared error on 1,000 fresh sequences (predicting the mean scores 1/6)."""
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(iterations):
        x, y = adding_problem(steps, 64, generator)
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    with torch.no_grad():
        x, y = adding_problem(steps, 1000, torch.Generator().manual_seed(seed + 1))
        return float(F.mse_loss(model(x), y))


@dataclass
class CellFlow:
    """‖∂L/∂h_t‖ (T,), the mean over the sequences, for one cell kind, untrained or trained."""

    cell: str
    norms: Tensor  # (T,)
    trained: bool
    mse: float = math.nan  # after training, on fresh sequences
    seconds: float = 0.0

    @property
    def ratio(self) -> float:
        """‖∂L/∂h_1‖ / ‖∂L/∂h_T‖: how much of the gradient at the last step reaches the first."""
        return float(self.norms[0] / self.norms[-1])


def vanishing_gradients(cells: list[str], steps: int = 100, batch: int = 32, hidden: int = 32, seed: int = 0,
                        train: bool = False, iterations: int = 1000, forget_bias: float = 0.0) -> list[CellFlow]:
    """‖∂L/∂h_t‖ over t for each cell kind on the same adding-problem sequences (T=steps), with
    L = ½ Σ_b (ŷ_b − y_b)² and torch.nn's default initialisation (seeded, the same for every cell);
    with ``train``, again after ``iterations`` Adam steps on the adding problem.

    ``forget_bias`` is added to the LSTM's forget-gate bias b_if (1 is the common practice of Gers et al.
    and Jozefowicz et al.; torch.nn's default is 0, under which the forget gate starts near σ(0) = ½).
    """
    x, y = adding_problem(steps, batch, torch.Generator().manual_seed(seed))
    results = []
    for name in cells:
        if name not in CELLS:
            raise ValueError(f"unknown cell {name!r}; known cells: {', '.join(sorted(CELLS))}")
        torch.manual_seed(seed)
        model = Regressor(name, hidden)
        if forget_bias and model.rnn.cells[0].gate_names[:2] == ("i", "f") and hasattr(model.rnn, "bias_ih_l0"):
            with torch.no_grad():
                model.rnn.bias_ih_l0[hidden : 2 * hidden] += forget_bias

        results.append(CellFlow(name, _mean_flow(model, x, y), trained=False))
        if train:
            start = time.perf_counter()
            mse = train_adding(model, steps, iterations, seed)
            results.append(CellFlow(name, _mean_flow(model, x, y), True, mse, time.perf_counter() - start))
    return results


def _mean_flow(model: Regressor, x: Tensor, y: Tensor) -> Tensor:
    """‖∂L/∂h_t‖ (T,), the mean over the sequences, for L = ½ Σ_b (ŷ_b − y_b)²."""
    flow = gradient_flow(model.rnn, lambda: 0.5 * (model(x) - y).pow(2).sum())
    return flow.norms[0, 0].mean(1)
