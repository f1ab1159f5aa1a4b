"""The classifier's "wide" part: TF-IDF of word 1–2-grams and a multinomial logistic regression on them.

This is the tuned linear baseline of docs/quality.md made a part of the model (the wide half of Cheng et al.
2016, "Wide & Deep Learning for Recommender Systems"). Shape letters: B sentences, F n-gram features, C classes.

Features (exactly scikit-learn's ``TfidfVectorizer(tokenizer=rnnmath.data.tokenize, lowercase=False,
ngram_range=(1, 2), sublinear_tf=True)`` with its defaults ``smooth_idf=True, norm="l2"``)::

    grams(s)   = the tokens of s, then its word bigrams "a b"         (the whole sentence: no max_len cut)
    features   = every gram of the training sentences, sorted          # F of them (at most MAX_WEIGHTS / C:
                                                                       # the most frequent are kept)
    idf[f]     = ln((1 + n) / (1 + df[f])) + 1                         # n training sentences; df: how many hold f
    x[s, f]    = (1 + ln tf[s, f]) · idf[f]   for tf[s, f] > 0 occurrences of f in s, else 0
    x[s]       = x[s] / ||x[s]||_2                                     # a sentence with no known gram stays 0

Logistic regression on x, fitted as scikit-learn's ``LogisticRegression`` (multinomial, L2)::

    z = x W + b                                                        # (B, C): one EmbeddingBag(F, C) sum
    minimise  mean_s CE(z_s, y_s) + ||W||² / (2·C·n)                   # b not penalised; full-batch L-BFGS

with C chosen from ``C_GRID`` by accuracy on the validation part. The model's prediction mixes the two
halves' log-probabilities with a weight λ also chosen on the validation part (``WEIGHT_GRID``)::

    log p(class) = log_softmax((1 − λ) · log p_network + λ · log_softmax(z))   # λ = 0: the network alone;
                                                                               # λ = 1: the linear model alone

Saved in the model directory as wide.json (features, C, λ and how they were chosen) and wide.safetensors
(idf, W, b); nothing is pickled.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import tokenize

C_GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)  # benchmarks/quality.py's TF-IDF baseline uses the same grid
# at most this many weights F·C: L-BFGS keeps 2·20 vectors of their size (float64), 320 MB at the limit; the
# sets of docs/quality.md stay far below it (MR: 107,830 features × 2 classes)
MAX_WEIGHTS = 1_000_000
WEIGHT_GRID = tuple(k / 10 for k in range(11))  # λ


def grams(text: str) -> list[str]:
    """Word unigrams then bigrams of ``text`` (scikit-learn's ``_word_ngrams`` order, bigrams joined by a space)."""
    tokens = tokenize(text)
    return tokens + [f"{a} {b}" for a, b in zip(tokens, tokens[1:])]


def rows(offsets: Tensor, total: int) -> Tensor:
    """The sentence (row) of each of the ``total`` flat entries of an EmbeddingBag input, from its offsets (B,)."""
    return torch.repeat_interleave(torch.arange(len(offsets)), torch.diff(offsets, append=torch.tensor([total])))


class Tfidf:
    """The feature map above: ``features`` (F names) and ``idf`` (F,) float64, built from training texts."""

    def __init__(self, features: Sequence[str], idf: Tensor) -> None:
        if len(features) != len(idf):
            raise ValueError(f"{len(features)} features but {len(idf)} idf values")
        self.features = list(features)
        self.index = {f: i for i, f in enumerate(self.features)}
        if len(self.index) != len(self.features):
            raise ValueError("the features repeat a name")
        self.idf = idf.to(torch.float64)

    @classmethod
    def fit(cls, texts: Sequence[str], max_features: int | None = None) -> Tfidf:
        """Features and idf of ``texts``; with ``max_features``, only that many grams are kept, those of the
        highest count over all texts (ties: the first name), as scikit-learn's ``max_features`` does."""
        df: Counter[str] = Counter()
        total: Counter[str] = Counter()
        for text in texts:
            g = grams(text)
            df.update(set(g))
            total.update(g)
        features = sorted(df)
        if max_features is not None and len(features) > max_features:
            features = sorted(sorted(features, key=lambda f: -total[f])[:max_features])
        n = len(texts)
        idf = torch.tensor([math.log((1 + n) / (1 + df[f])) + 1 for f in features], dtype=torch.float64)
        return cls(features, idf)

    def __len__(self) -> int:
        return len(self.features)

    def transform(self, texts: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        """The rows x of ``texts`` in EmbeddingBag's flat form: ``(indices (K,), weights (K,) float64,
        offsets (B,))``; sentence s owns ``indices[offsets[s]:offsets[s+1]]``, features in ascending order."""
        indices: list[int] = []
        counts: list[int] = []
        offsets: list[int] = []
        for text in texts:
            offsets.append(len(indices))
            occurrences = Counter(j for j in map(self.index.get, grams(text)) if j is not None)
            for j in sorted(occurrences):
                indices.append(j)
                counts.append(occurrences[j])
        index = torch.tensor(indices, dtype=torch.long)
        tf = torch.tensor(counts, dtype=torch.float64)
        weights = (1 + tf.log()) * self.idf[index]  # (K,)
        offsets_t = torch.tensor(offsets, dtype=torch.long)
        row = rows(offsets_t, len(index))
        norms = torch.zeros(len(texts), dtype=torch.float64).index_add_(0, row, weights**2).sqrt()  # (B,)
        return index, weights / norms[row], offsets_t

    def dense(self, texts: Sequence[str]) -> Tensor:
        """x as a dense (B, F) float64 matrix (for tests and small inputs)."""
        index, weights, offsets = self.transform(texts)
        x = torch.zeros(len(texts), len(self), dtype=torch.float64)
        x[rows(offsets, len(index)), index] = weights
        return x


class LinearPart(nn.Module):
    """z = x W + b (B, C) for TF-IDF rows x given as EmbeddingBag input: multinomial logistic regression."""

    def __init__(self, num_features: int, num_classes: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_features, num_classes, dtype=dtype))  # W (F, C)
        self.bias = nn.Parameter(torch.zeros(num_classes, dtype=dtype))  # b (C,)

    def forward(self, indices: Tensor, weights: Tensor, offsets: Tensor) -> Tensor:
        return F.embedding_bag(indices, self.weight, offsets, mode="sum",
                               per_sample_weights=weights.to(self.weight.dtype)) + self.bias  # (B, C)


def fit_logistic(x: tuple[Tensor, Tensor, Tensor], y: Tensor, num_features: int, num_classes: int, C: float,
                 start: LinearPart | None = None, max_iter: int = 1000) -> LinearPart:
    """Multinomial logistic regression by full-batch L-BFGS in float64, from zeros (or from ``start``'s
    weights: a warm start along the C grid): mean cross-entropy + ||W||² / (2·C·n), scikit-learn's objective."""
    model = LinearPart(num_features, num_classes, torch.float64)
    if start is not None:
        model.load_state_dict(start.state_dict())
    n = len(y)
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(*x), y) + (model.weight**2).sum() / (2 * C * n)
        loss.backward()
        return loss

    optimizer.step(objective)
    return model


@dataclass
class WidePart:
    """The fitted wide part: features, the linear model (float32) and the mixing weight λ."""

    tfidf: Tfidf
    linear: LinearPart
    weight: float  # λ
    C: float

    def log_probs(self, texts: Sequence[str]) -> Tensor:
        """log_softmax(z) (B, C) of ``texts``."""
        with torch.no_grad():
            return F.log_softmax(self.linear(*self.tfidf.transform(texts)), dim=1)


def mix(network: Tensor, linear: Tensor, weight: float) -> Tensor:
    """log_softmax((1 − λ)·network + λ·linear) of two (B, C) log-probabilities: the model's output."""
    return F.log_softmax((1 - weight) * network + weight * linear, dim=1)


def choose(train_texts: Sequence[str], y: Tensor, val_texts: Sequence[str], val_y: Tensor,
           network_val: Tensor, num_classes: int) -> tuple[WidePart, dict]:
    """Fit the wide part on the training texts and choose C, then λ, by validation accuracy (ties: the lower
    validation cross-entropy, then the smaller C / λ). ``network_val``: the network's log-probabilities (B, C)
    of the validation texts. Returns the part and a record of the choice (for history.json)."""
    tfidf = Tfidf.fit(train_texts, max_features=max(1, MAX_WEIGHTS // num_classes))
    x, x_val = tfidf.transform(train_texts), tfidf.transform(val_texts)
    best, model, scores = None, None, {}
    for C in C_GRID:
        model = fit_logistic(x, y, len(tfidf), num_classes, C, start=model)
        with torch.no_grad():
            z = model(*x_val)
        key = ((z.argmax(1) == val_y).double().mean().item(), -F.cross_entropy(z, val_y).item())
        scores[str(C)] = key[0]
        if best is None or key > best[0]:
            best = (key, C, model)
    (_, C, fitted) = best
    linear = LinearPart(len(tfidf), num_classes)
    linear.load_state_dict({k: v.float() for k, v in fitted.state_dict().items()})
    part = WidePart(tfidf, linear, 0.0, C)
    linear_val = part.log_probs(val_texts)
    best_weight, weights, cross_entropies = None, {}, {}
    for weight in WEIGHT_GRID:
        log_p = mix(network_val.float(), linear_val, weight)
        key = ((log_p.argmax(1) == val_y).double().mean().item(), F.nll_loss(log_p, val_y).neg().item())
        weights[str(weight)], cross_entropies[str(weight)] = key[0], -key[1]
        if best_weight is None or key > best_weight[0]:
            best_weight = (key, weight)
    part.weight = best_weight[1]
    record = {"C": C, "weight": part.weight, "features": len(tfidf), "val_accuracy": best_weight[0][0],
              "val_accuracy_by_C": scores, "val_accuracy_by_weight": weights,
              "val_cross_entropy_by_weight": cross_entropies}  # nats per sentence
    return part, record
