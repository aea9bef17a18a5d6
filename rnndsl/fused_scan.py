"""Runs the fused kernels rnndsl/codegen/fused.py writes: a linear recurrence with its coefficients'
math, forward and backward, as one generated C++ loop over time on the CPU.

Opt-in, with the C++ scan: after :func:`rnndsl.linear_scan.use_cpu_kernel`, a cell built with
``scan="parallel"`` (or ``"auto"``) whose updates all have a fused kernel runs them on CPU tensors
of float32 or float64, without a mask, outside torch.compile, tracing, torch.func and autocast;
everything else keeps the parallel scan's torch ops. Each kernel is compiled on its first call
(a C++ compiler; 2-4 s, cached on disk by torch's extension builder) with the SIMD flags of the
CPU torch runs on, and called through ctypes.

The kernel has no double backward: a backward under ``create_graph`` (or torch.func) raises,
naming the switch that turns it off.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import linear_scan
from .autograd_modes import plain_backward_needed, plain_ops_needed
from .linear_scan import along_steps

__all__ = ["FusedKernel", "fused_linear_recurrence", "fused_scan_runs"]

# ATen's own SIMD levels (torch.backends.cpu.get_cpu_capability()), each with the flags and the
# CPU_CAPABILITY that at::vec::Vectorized is compiled for in ATen's kernels of that level.
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512",
               "-DCPU_CAPABILITY=AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
}
_DEFAULT_FLAGS = ["-DCPU_CAPABILITY=DEFAULT"]
# No fused multiply-add contraction: a * s + b rounds as the step-by-step loop's two ops do. OpenMP:
# at::parallel_for's OpenMP backend lives in its header, and runs the loop on one thread without
# it; at load time the library binds to the libgomp.so.1 torch has loaded, as Inductor's do.
_COMMON_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp"]
_DTYPES = (torch.float32, torch.float64)
_lock = threading.Lock()


def fused_scan_runs(kernels: Sequence["FusedKernel"], xs: Tensor, mask: Optional[Tensor]) -> bool:
    """Whether the generated ``forward_parallel`` takes its fused ``kernels`` for this call; the first
    time they would, they are built (a kernel that fails to build warns and is not taken again)."""
    return (linear_scan.cpu_kernel_enabled() and mask is None and xs.device.type == "cpu" and xs.dtype in _DTYPES
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and not plain_ops_needed() and not torch.is_autocast_enabled("cpu")
            and all(kernel.library() is not None for kernel in kernels))


class FusedKernel:
    """A generated kernel's C++ source, compiled on first use."""

    def __init__(self, source: str):
        self.source = source
        self._library: Optional[Any] = None
        self._failed = False

    def __repr__(self) -> str:
        return f"FusedKernel({self.source.splitlines()[1][3:]!r})"

    def library(self) -> Optional[Any]:
        """The compiled library, built on the first call; None if it did not build."""
        if self._library is None and not self._failed:
            with _lock:
                if self._library is None and not self._failed:
                    try:
                        self._library = _build(self.source)
                    except Exception as error:  # noqa: BLE001 (any build failure leaves the torch ops in place)
                        self._failed = True
                        warnings.warn(f"rnndsl: a fused scan kernel did not build, the parallel scan's torch ops "
                                      f"stay: {error}", RuntimeWarning, stacklevel=3)
        return self._library

    def forward(self, leaves: Sequence[Tensor], s0: Tensor, steps: int) -> Tensor:
        """The states, from the leaves' ``(T, batch, hidden)`` views."""
        states = s0.new_empty((steps,) + tuple(s0.shape))
        data, strides = _leaf_arguments(leaves)
        self.library().rnndsl_forward(s0.dtype == torch.float64, data, strides, len(leaves), _pointer(s0),
                                      _pointer(states), *states.shape)
        return states

    def backward(self, leaves: Sequence[Tensor], s0: Tensor, states: Tensor, grad_states: Tensor,
                 grad_leaves: Sequence[Tensor]) -> Tensor:
        """The gradient of ``s0``; each leaf's written into ``grad_leaves`` (``(T, batch, hidden)``
        views, units contiguous)."""
        grad_s0 = torch.empty_like(s0)
        data, strides = _leaf_arguments(leaves)
        count = max(len(leaves), 1)
        outputs = (ctypes.c_void_p * count)(*[_pointer(g) for g in grad_leaves])
        output_strides = (ctypes.c_int64 * (2 * count))(*[s for g in grad_leaves for s in g.stride()[:2]])
        self.library().rnndsl_backward(s0.dtype == torch.float64, data, strides, len(leaves), _pointer(s0),
                                       _pointer(states), _pointer(grad_states), outputs, output_strides,
                                       _pointer(grad_s0), *states.shape)
        return grad_s0


def fused_linear_recurrence(kernel: FusedKernel, leaves: Sequence[Any], s0: Tensor, steps: int,
                            split_from: Sequence[Tensor] = ()) -> Tensor:
    """All ``steps`` states of ``s_t = a_t * s_(t-1) + b_t``, with ``a`` and ``b`` computed by ``kernel``
    from ``leaves`` (tensors of ``(T, batch, hidden)`` or broadcast to it: parameters, numbers).

    ``split_from`` holds the ``(T, batch, width)`` tensors the caller cut into leaves with ``split``
    (the generated code's GEMM output): such pieces go in as their tensor, so that the kernel writes
    their gradients into one buffer of its shape; given the pieces, autograd would join their
    gradients with a copy (at T = 1024, batch 16, 2 x 64 units: a sixth of minGRU's fwd+bwd time).
    Only the caller knows that nothing stands between a piece and its tensor in autograd, so no
    other leaf is ever grouped: a view made by a custom Function, or under no_grad, has a gradient
    path of its own.
    """
    sources: List[Tensor] = []
    roots: Dict[int, int] = {}  # id of a tensor in split_from -> its index in sources
    layout: List[Tuple[int, int]] = []  # each leaf: (index in sources, its first column there)
    for leaf in leaves:
        view = _as_leaf(leaf, steps, s0)
        root, column = _column_range_of(view, split_from)
        index = roots.get(id(root)) if root is not None else None
        if index is not None and any(i == index and abs(c - column) < view.size(2) for i, c in layout):
            root, index = None, None  # overlapping ranges: written into, their gradients would clobber
        if index is None:
            sources.append(view if root is None else root)
            index = len(sources) - 1
            if root is not None:
                roots[id(root)] = index
        layout.append((index, column if root is not None else 0))
    return _FusedRecurrence.apply(kernel, steps, tuple(layout), s0.contiguous(), *sources)


def _as_leaf(value: Any, steps: int, s0: Tensor) -> Tensor:
    """``value`` as a ``(T, batch, hidden)`` view of the state's dtype whose units are contiguous or
    broadcast, which is what the kernel's loads read."""
    leaf = along_steps(value, steps, s0)
    return leaf if leaf.stride(2) in (0, 1) else leaf.contiguous()


def _column_range_of(view: Tensor, split_from: Sequence[Tensor]) -> Tuple[Optional[Tensor], int]:
    """``(root, first column)`` when ``view`` is ``root[:, :, c:c + hidden]`` for a contiguous
    ``(T, batch, width)`` tensor ``root`` of ``split_from``; else ``(None, 0)``."""
    steps, batch, hidden = view.shape
    for root in split_from:
        if (root.dim() != 3 or tuple(root.shape[:2]) != (steps, batch) or not root.is_contiguous()
                or root.dtype != view.dtype or root.requires_grad != view.requires_grad
                or root.untyped_storage().data_ptr() != view.untyped_storage().data_ptr()):
            continue
        width = root.size(2)
        column = view.storage_offset() - root.storage_offset()
        if view.stride() == (batch * width, width, 1) and 0 <= column <= width - hidden:
            return root, column
    return None, 0


class _FusedRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, kernel: FusedKernel, steps: int, layout: Tuple[Tuple[int, int], ...], s0: Tensor,
                *sources: Tensor) -> Tensor:
        hidden = s0.size(1)
        states = kernel.forward([sources[i].narrow(2, c, hidden) for i, c in layout], s0, steps)
        ctx.kernel, ctx.layout = kernel, layout
        ctx.save_for_backward(s0, states, *sources)
        return states

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        if plain_backward_needed([grad]):
            raise RuntimeError("rnndsl: the fused C++ kernel of the parallel scan has no double backward and no "
                               "torch.func rule; run this with rnndsl.linear_scan.use_cpu_kernel(False)")
        s0, states, *sources = ctx.saved_tensors
        hidden = s0.size(1)
        # A source the leaves do not cover column for column gets zeros in the rest.
        covered = [sum(hidden for i, _ in ctx.layout if i == index) for index in range(len(sources))]
        grads = [(torch.empty if covered[index] == source.size(2) else torch.zeros)(
            source.shape, dtype=source.dtype, device=source.device) for index, source in enumerate(sources)]
        grad_s0 = ctx.kernel.backward([sources[i].narrow(2, c, hidden) for i, c in ctx.layout], s0, states,
                                      grad.contiguous(), [grads[i].narrow(2, c, hidden) for i, c in ctx.layout])
        return (None, None, None, grad_s0, *grads)


def _leaf_arguments(leaves: Sequence[Tensor]) -> Tuple[Any, Any]:
    count = max(len(leaves), 1)
    data = (ctypes.c_void_p * count)(*[_pointer(leaf) for leaf in leaves])
    strides = (ctypes.c_int64 * (3 * count))(*[s for leaf in leaves for s in leaf.stride()])
    return data, strides


def _pointer(tensor: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr())


def _build(source: str) -> Any:
    """The compiled library of ``source``, its two entry points typed."""
    from torch.utils import cpp_extension  # function-level: only this opt-in needs the builder
    flags = _COMMON_FLAGS + _CAPABILITY_FLAGS.get(torch.backends.cpu.get_cpu_capability(), _DEFAULT_FLAGS)
    digest = hashlib.sha256((source + " ".join(flags)).encode()).hexdigest()[:16]
    name = f"rnndsl_fused_{digest}"
    path = Path(tempfile.gettempdir()) / "rnndsl_fused" / f"{name}.cpp"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != source:
        # Written aside, then renamed: another process building the same kernel never reads half a file.
        partial = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}")
        partial.write_text(source)
        os.replace(partial, path)
    library = ctypes.CDLL(cpp_extension.load(name, [str(path)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                                                is_python_module=False))
    size, pointer = ctypes.c_int64, ctypes.c_void_p
    library.rnndsl_forward.argtypes = [ctypes.c_int, pointer, pointer, size, pointer, pointer, size, size, size]
    library.rnndsl_backward.argtypes = [ctypes.c_int, pointer, pointer, size, pointer, pointer, pointer, pointer,
                                        pointer, pointer, size, size, size]
    library.rnndsl_forward.restype = library.rnndsl_backward.restype = None
    return library
