"""The language model's one config dataclass and its presets, without torch (the CLI builds its flags from
them at start-up, and ``rnnmath --help`` must stay fast). The model and its training: rnnmath.language_model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError

LEVELS = ("char", "word")
OPTIMIZERS = ("sgd", "adam", "rmsprop")
CLIP_KINDS = ("norm", "value")
LM_CELLS = ("rnn", "lstm", "gru", "layernorm_lstm", "peephole_lstm", "indrnn", "mingru", "minlstm")


def _flag(help: str, low: float | None = None, high: float | None = None, choices: tuple | None = None) -> Any:
    return {"help": help, "low": low, "high": high, "choices": choices}


@dataclass
class LMConfig:
    """Everything that defines a language-model run; saved in config.json, one ``rnnmath train --task lm``
    flag per field (``bptt`` -> ``--bptt``). The defaults are Karpathy's char-rnn (``--preset char-rnn``)."""

    level: str = field(default="char", metadata=_flag("tokens: characters, or words split on white space with "
                                                      "<eos> at each line end (Zaremba et al.)", choices=LEVELS))
    cell: str = field(default="lstm", metadata=_flag("recurrent cell (rnnmath.CELLS)", choices=LM_CELLS))
    hidden: int = field(default=128, metadata=_flag("state size H of each layer", 1, 65536))
    layers: int = field(default=2, metadata=_flag("stacked recurrent layers", 1, 64))
    embedding: int = field(default=0, metadata=_flag("embedding size E; 0: no embedding, the layer reads one-hot "
                                                     "vectors (char-rnn)", 0, 65536))
    dropout: float = field(default=0.0, metadata=_flag("dropout on the embedding, between layers and before the "
                                                       "decoder (Zaremba et al.)", 0, 0.99))
    tie_weights: bool = field(default=False, metadata=_flag("the decoder's weight is the embedding's (Press & Wolf "
                                                            "2017; needs --embedding equal to --hidden)"))
    bptt: int = field(default=50, metadata=_flag("steps of one truncated-BPTT window", 1, 100_000))
    batch_size: int = field(default=50, metadata=_flag("parallel streams B the text is cut into", 1, 100_000))
    epochs: int = field(default=50, metadata=_flag("passes over the training text", 1, 100_000))
    optimizer: str = field(default="rmsprop", metadata=_flag("sgd, adam or rmsprop (alpha 0.95, as char-rnn)",
                                                             choices=OPTIMIZERS))
    lr: float = field(default=0.002, metadata=_flag("learning rate", 1e-9, 100))
    lr_decay: float = field(default=0.97, metadata=_flag("multiply the learning rate by this after each epoch "
                                                         "past --decay-after", 0.001, 1))
    decay_after: int = field(default=10, metadata=_flag("epochs at the full learning rate", 0, 100_000))
    clip: float = field(default=5.0, metadata=_flag("gradient clipping threshold; 0: none", 0, 1e6))
    clip_kind: str = field(default="value", metadata=_flag("clip the global norm (Zaremba et al.) or each "
                                                           "element (char-rnn)", choices=CLIP_KINDS))
    sum_over_time: bool = field(default=True, metadata=_flag("the gradient is that of the loss summed over the "
                                                             "window's steps and averaged over the streams, as "
                                                             "both classic codes; else the mean per token"))
    init_range: float = field(default=0.08, metadata=_flag("initialise every weight from U(-r, r); 0: the layers' "
                                                           "own initialisation", 0, 10))
    forget_bias: float = field(default=1.0, metadata=_flag("LSTM only: set the input-side forget-gate bias to this "
                                                           "after initialisation (char-rnn: 1); 0: leave it", -100,
                                                           100))
    max_vocab: int = field(default=0, metadata=_flag("keep the N most frequent training tokens; 0: all", 0,
                                                     10_000_000))
    eval_every: int = field(default=1000, metadata=_flag("also evaluate on the validation text every N windows "
                                                         "(char-rnn: 1000); 0: only at the end of each epoch", 0,
                                                         10_000_000))
    seed: int = field(default=0, metadata=_flag("seed of initialisation and dropout", 0, 2**32 - 1))

    def validate(self) -> LMConfig:
        """Check every field's type and range; a UserError names the flag."""
        kinds = {"int": int, "float": float, "bool": bool, "str": str}
        for f in dataclasses.fields(self):
            value, flag, meta = getattr(self, f.name), "--" + f.name.replace("_", "-"), f.metadata
            kind = kinds[f.type] if isinstance(f.type, str) else f.type
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, f.name, value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise UserError(f"{flag} must be of type {kind.__name__}, got {value!r}")
            if kind is float and not math.isfinite(value):
                raise UserError(f"{flag} must be a finite number, got {value!r}")
            if meta["low"] is not None and not meta["low"] <= value <= meta["high"]:
                raise UserError(f"{flag} must lie in [{meta['low']}, {meta['high']}], got {value!r}")
            if meta["choices"] is not None and value not in meta["choices"]:
                raise UserError(f"{flag} must be one of {', '.join(meta['choices'])}, got {value!r}")
        if self.tie_weights and self.embedding != self.hidden:
            raise UserError(f"--tie-weights needs --embedding equal to --hidden (the decoder reads h_t), got "
                            f"--embedding {self.embedding} and --hidden {self.hidden}")
        return self


LM_PRESETS: dict[str, LMConfig] = {
    # Karpathy's char-rnn (train.lua defaults): 2 x 128 LSTM on one-hot characters, 50 streams of 50 steps,
    # RMSprop lr 2e-3 (alpha 0.95), x0.97 per epoch after epoch 10, element-wise clipping at 5, U(±0.08) init
    # with forget-gate bias 1, 50 epochs, validation every 1000 iterations
    "char-rnn": LMConfig(),
    # Zaremba, Sutskever & Vinyals (2014), the non-regularised "small" PTB model: 2 x 200 LSTM, embedding 200,
    # 20 streams of 20 steps, SGD lr 1 halved after each epoch past the 4th, 13 epochs, global-norm clipping
    # at 5, U(±0.1) init, no dropout; the gradient of the loss summed over the window, averaged over streams
    "zaremba-small": LMConfig(level="word", cell="lstm", hidden=200, layers=2, embedding=200, dropout=0.0,
                              bptt=20, batch_size=20, epochs=13, optimizer="sgd", lr=1.0, lr_decay=0.5,
                              decay_after=4, clip=5.0, clip_kind="norm", init_range=0.1, forget_bias=0.0,
                              eval_every=0),
}
