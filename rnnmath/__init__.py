"""rnnmath: recurrent neural networks written as readable tensor math, numerically identical to torch.nn.

The names below are imported on first use (PEP 562), so that ``import rnnmath.cli`` does not import torch
and ``rnnmath --help`` starts fast; ``from rnnmath import LSTM`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_LAZY = {
    "CELLS": "cells", "Cell": "cells", "GRUCell": "cells", "HiddenState": "cells", "LSTMCell": "cells",
    "LSTMState": "cells", "RNNCell": "cells", "LayerNormLSTMCell": "cells", "PeepholeLSTMCell": "cells",
    "IndRNNCell": "cells", "MinGRUCell": "cells", "MinLSTMCell": "cells",
    "GRU": "layers", "LSTM": "layers", "RNN": "layers", "Recurrent": "layers", "Trace": "layers", "trace": "layers",
    "LanguageModel": "language_model", "tbptt_batches": "language_model",  # a tool built on the layers
}
__all__ = sorted(_LAZY)
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .cells import (  # noqa: F401
        CELLS,
        Cell,
        GRUCell,
        HiddenState,
        IndRNNCell,
        LayerNormLSTMCell,
        LSTMCell,
        LSTMState,
        MinGRUCell,
        MinLSTMCell,
        PeepholeLSTMCell,
        RNNCell,
    )
    from .language_model import LanguageModel, tbptt_batches  # noqa: F401
    from .layers import GRU, LSTM, RNN, Recurrent, Trace, trace  # noqa: F401


# the modules whose settings the docs turn (rnnmath.compiled.enabled, rnnmath.layers.torch_kernels, ...): reachable
# as attributes after a plain `import rnnmath`, imported on first use like the names above
_SUBMODULES = {"cells", "compiled", "flow", "fused", "language_model", "layers", "reference"}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)  # the import sets the attribute for later look-ups
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
