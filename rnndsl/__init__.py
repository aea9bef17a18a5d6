"""rnndsl: recurrent cells written as equations, compiled to TorchScript.

    >>> import rnndsl
    >>> cell = rnndsl.load_cell("lstm").build(input_size=10, hidden_size=20)
    >>> (h, c), y = cell((h0, c0), x)
"""
from .cells import torchscript
from .cellspec import CellSpec, load_cell, load_cells, load_source, load_stock_cell
from .containers import Bidirectional, RecurrentNetwork, RecurrentTable, SequenceTable, ZeroState, setup_recurrent
from .errors import CellError, CellWarning, PlacementError, Span
from .linear_scan import linear_recurrence, sequential_linear_recurrence
from .native import load_native_state_dict, native_state_dict
from .networks import GRU, LSTM, RNN, make_bidirectional, make_recurrent
from .scan import EmptySequenceError, scan

__all__ = ["Bidirectional", "CellError", "EmptySequenceError", "CellSpec", "CellWarning", "GRU", "LSTM", "RNN",
           "PlacementError", "RecurrentNetwork", "RecurrentTable", "SequenceTable", "Span", "ZeroState",
           "load_cell", "load_cells", "linear_recurrence", "load_native_state_dict", "load_source", "load_stock_cell",
           "make_bidirectional", "make_recurrent", "native_state_dict", "scan", "sequential_linear_recurrence",
           "setup_recurrent", "torchscript"]
