"""rnndsl: recurrent cells written as equations, compiled to TorchScript.

    >>> import rnndsl
    >>> cell = rnndsl.load_cell("lstm").build(input_size=10, hidden_size=20)
    >>> (h, c), y = cell((h0, c0), x)
"""
from .cellspec import CellSpec, load_cell, load_cells, load_source
from .errors import CellError, CellWarning, Span
from .scan import scan

__all__ = ["CellError", "CellSpec", "CellWarning", "Span", "load_cell", "load_cells", "load_source", "scan"]
