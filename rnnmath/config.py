"""The sentence classifier's configuration: one dataclass, saved with every model, and its presets.

No torch here: the CLI builds ``rnnmath train``'s flags from ``Config`` at start-up (``rnnmath --help`` must
stay fast); rnnmath.model builds the network from it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError


def _cell_names() -> list[str]:
    from .cells import CELLS  # imports torch: only when a config is validated

    return sorted(CELLS)


POOLINGS = ("last", "max", "last+max")
ACTIVATION_NAMES = ("tanh", "relu")


def _flag(help: str, low: float | None = None, high: float | None = None, choices=None) -> Any:
    """Field metadata from which the CLI builds a flag: help text, allowed range, and choices: a tuple (the
    CLI offers them) or a function returning them (checked by ``Config.validate`` only, so that building the
    CLI's parser imports nothing heavy)."""
    return {"help": help, "low": low, "high": high, "choices": choices}


@dataclass
class Config:
    """Everything that defines a training run: the model, the encoding and the optimisation.

    Saved with every model (config.json); each field is a ``rnnmath train`` flag (``vocab_size`` ->
    ``--vocab-size``). The defaults are the ``default`` preset; ``PRESETS["seed"]`` is the seed's model.
    """

    cell: str = field(default="gru", metadata=_flag("recurrent cell (rnnmath.CELLS)", choices=_cell_names))
    hidden: int = field(default=96, metadata=_flag("state size H of each direction", 1, 65536))
    layers: int = field(default=1, metadata=_flag("stacked recurrent layers", 1, 64))
    bidirectional: bool = field(default=True, metadata=_flag("read each sentence in both directions"))
    pooling: str = field(default="last+max", metadata=_flag("sentence features: the state at the last word, "
                                                             "the max over time of the states, or both",
                                                             choices=POOLINGS))
    dense: tuple[int, ...] = field(default=(), metadata=_flag("sizes of the dense layers before the output, "
                                                              "comma-separated (e.g. 4,6); empty for none"))
    activation: str = field(default="tanh", metadata=_flag("activation of the dense layers",
                                                           choices=ACTIVATION_NAMES))
    dropout: float = field(default=0.5, metadata=_flag("dropout on the sentence features (and between layers)", 0, 1))
    word_dropout: float = field(default=0.0, metadata=_flag("in training, replace each word by UNK with this "
                                                             "probability", 0, 1))
    recurrent_dropout: float = field(default=0.0, metadata=_flag("in training, drop the same units of the "
                                                                  "recurrent state h at every step (Gal & "
                                                                  "Ghahramani 2016)", 0, 1))
    zoneout: float = field(default=0.0, metadata=_flag("keep each state unit's previous value with this "
                                                        "probability at each step (Krueger et al. 2017)", 0, 1))
    embedding_dim: int = field(default=0, metadata=_flag("size E of the word embeddings the recurrent layer "
                                                         "reads; 0 feeds it one-hot ids (W_ih is then the "
                                                         "embedding)", 0, 65536))
    embeddings: str = field(default="", metadata=_flag("word-vector text file (word2vec/GloVe/fastText, .gz too) "
                                                       "to initialise the embeddings from; sets --embedding-dim "
                                                       "to its size"))
    freeze_embeddings: bool = field(default=False, metadata=_flag("keep the --embeddings vectors fixed in "
                                                                  "training"))
    ngram_dim: int = field(default=64, metadata=_flag("size of a bag of word uni- and bigram embeddings, averaged "
                                                     "over the sentence and set beside the recurrent features "
                                                     "(fastText, Joulin et al. 2017); 0 for none", 0, 65536))
    ngram_buckets: int = field(default=20_000, metadata=_flag("hash buckets of the word bigrams of the n-gram "
                                                               "bag", 1, 100_000_000))
    wide: bool = field(default=True, metadata=_flag("add a wide part: logistic regression on TF-IDF word 1-2-grams, "
                                                     "its C and its weight against the network chosen on the "
                                                     "validation set (rnnmath.wide)"))
    ensemble: int = field(default=1, metadata=_flag("train N networks, member k from seed + k, and average "
                                                    "their probabilities (one model directory)", 1, 64))
    vocab_size: int = field(default=5000, metadata=_flag("the N most frequent training words kept (plus PAD "
                                                         "and UNK)", 1, 10_000_000))
    max_len: int = field(default=50, metadata=_flag("words kept per sentence; the rest are cut", 1, 100_000))
    epochs: int = field(default=20, metadata=_flag("maximum training epochs", 1, 100_000))
    batch_size: int = field(default=32, metadata=_flag("sentences per training step", 1, 1_000_000))
    lr: float = field(default=0.003, metadata=_flag("Adam learning rate", 0, 10))
    weight_decay: float = field(default=0.0, metadata=_flag("Adam L2 weight decay", 0, 10))
    clip: float = field(default=1.0, metadata=_flag("clip the gradient norm to this", 0, 1e6))
    patience: int = field(default=2, metadata=_flag("stop after this many epochs without a better "
                                                    "validation accuracy", 1, 100_000))
    seed: int = field(default=0, metadata=_flag("seed of the split, initialisation, dropout and data order",
                                                0, 2**32 - 1))  # the seeds derived from it must fit 64 bits

    def validate(self) -> Config:
        """Check every field's type and range; a UserError names the flag."""
        for f in dataclasses.fields(self):
            value, flag, meta = getattr(self, f.name), "--" + f.name.replace("_", "-"), f.metadata
            kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool, "str": str,
                                                              "tuple[int, ...]": tuple}[f.type]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, f.name, value)
            if kind is tuple and isinstance(value, list):
                value = tuple(value)
                setattr(self, f.name, value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise UserError(f"{flag} must be of type {kind.__name__}, got {value!r}")
            if kind is tuple and not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 65536
                                         for v in value):
                raise UserError(f"{flag} must be a list of integers from 1 to 65536, got {value!r}")
            if kind is float and not math.isfinite(value):
                raise UserError(f"{flag} must be a finite number, got {value!r}")
            if meta["low"] is not None and not meta["low"] <= value <= meta["high"]:
                raise UserError(f"{flag} must lie in [{meta['low']}, {meta['high']}], got {value!r}")
            choices = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
            if choices is not None and value not in choices:
                raise UserError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr!r}")
        if self.dropout >= 1 or self.word_dropout >= 1:
            raise UserError("--dropout and --word-dropout must be below 1")
        if self.recurrent_dropout >= 1 or self.zoneout >= 1:
            raise UserError("--recurrent-dropout and --zoneout must be below 1")
        if self.freeze_embeddings and not self.embeddings:
            raise UserError("--freeze-embeddings needs --embeddings FILE (there is nothing to keep fixed)")
        return self


PRESETS: dict[str, Config] = {
    # chosen on amazon + yelp (docs/quality.md): a bidirectional GRU over a larger vocabulary, the last
    # states beside the max over time of all states, and strong dropout against 1,600 training sentences
    "default": Config(),
    # the seed: one-hot over 400 words (+ PAD, UNK), tanh RNN of state 3, tanh dense 4 and 6, softmax over 2
    "seed": Config(cell="rnn", hidden=3, layers=1, bidirectional=False, pooling="last", dense=(4, 6),
                   activation="tanh", dropout=0.0, vocab_size=400, max_len=30, epochs=60, lr=0.05,
                   patience=15, ngram_dim=0, wide=False),
}
