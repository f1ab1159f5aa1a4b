"""rnnmath: recurrent neural networks written as readable tensor math, numerically identical to torch.nn."""

from .cells import CELLS, Cell, GRUCell, HiddenState, LSTMCell, LSTMState, RNNCell
from .layers import GRU, LSTM, RNN, Recurrent, Trace, trace

__all__ = [
    "CELLS", "Cell", "GRU", "GRUCell", "HiddenState", "LSTM", "LSTMCell", "LSTMState", "RNN", "RNNCell",
    "Recurrent", "Trace", "trace",
]
__version__ = "0.1.0"
