"""rnnmath: recurrent neural networks written as readable tensor math, numerically identical to torch.nn."""

from .cells import CELLS, Cell, GRUCell, HiddenState, LSTMCell, LSTMState, RNNCell
from .layers import GRU, LSTM, RNN, Recurrent, Trace, trace

__all__ = [
    "CELLS", "Cell", "GRU", "GRUCell", "HiddenState", "LSTM", "LSTMCell", "LSTMState", "RNN", "RNNCell",
    "Recurrent", "Trace", "trace", "LanguageModel", "tbptt_batches",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    """The language-model tool (rnnmath.language_model), imported on first use: ``rnnmath.LanguageModel``."""
    if name in ("LanguageModel", "tbptt_batches"):
        from . import language_model

        return getattr(language_model, name)
    raise AttributeError(f"module 'rnnmath' has no attribute {name!r}")
