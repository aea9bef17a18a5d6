"""Code generation: optimized IR graph -> Python/TorchScript source, one module per target.

- ``base``: the shared, public base every target writes with (the per-op ``EMITTERS``
  table, :class:`~rnndsl.codegen.base.NodeEmitter`, loop and tuple helpers,
  ``PythonCode``, ``validate_source``);
- ``step``: ``generate_step``, the cell's ``forward`` and its time loop ``forward_sequence``;
- ``backward`` (with its per-op rules in ``derivatives``): ``generate_backward``, the derived
  backward's ``forward_sequence_saving`` and ``backward_sequence``;
- ``parallel``: ``generate_parallel``, ``forward_parallel`` for recurrences linear in the state;
- ``fused`` (C++, not Python; called by ``parallel``): ``fused_kernel``, a linear recurrence's
  coefficient math and scan, forward and backward, as one loop over time;
- ``scan``: ``generate_scan``, ``forward_sequence_scan``, the time loop as one ``scan`` node,
  which ``torch.export`` keeps valid for any sequence length;
- ``precision`` (not a target): which values ``torch.autocast`` may compute in low precision
  (its per-op ``PRECISION`` table), and the casts the targets write to keep a state in the
  dtype it came in.

Each entry point returns a :class:`~rnndsl.codegen.base.PythonCode`: the source and the
names of the globals it reads (rnndsl/names.py), which the runtime binds with
``rnndsl.kernels.resolve_globals`` before exec. A new target is one more sibling module
built on ``base``; a target's dialect is a dict merge of ``EMITTERS``; siblings never import
each other's private names. Nothing here imports torch.
"""
from .backward import generate_backward, supports_training
from .base import PythonCode, validate_source
from .chunkwise import DecayNotPositive
from .parallel import NotLinear, find_linear_recurrences, generate_parallel, linearized
from .scan import generate_scan
from .step import generate_step

__all__ = ["PythonCode", "validate_source", "generate_step", "generate_backward", "supports_training",
           "generate_parallel", "find_linear_recurrences", "linearized", "NotLinear", "DecayNotPositive",
           "generate_scan"]
