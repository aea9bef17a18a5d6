"""The few helpers generated code calls by name, besides torch's own.

Convolutions go through :func:`conv_same` and its two gradients, for values of any
leading dims. Matrix products go through :func:`linear` and :func:`outer_sum`. :func:`linear`
uses oneDNN's GEMM for large float32 products on CPUs where torch's own matmul (MKL's
sgemm) is slow: on AMD CPUs it runs at about half the speed torch.nn.LSTM's
oneDNN kernels get. On Intel CPUs MKL is as fast or faster (:func:`_onednn_beats_mkl`),
and they use torch's matmul. oneDNN's op has no derivative, so :func:`linear` picks it
only where autograd does not record (the derived backward's methods run that way);
:func:`linear_with_grad` wraps it in an autograd Function for code that runs
under autograd (the parallel scan's ``forward_parallel``). :func:`outer_sum` (a weight's
gradient over all steps) is torch's matmul but on AMD CPUs with AVX-512: see where it is picked.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from .autograd_modes import autocast_enabled, plain_backward_needed, plain_ops_needed
from .chunkwise import chunkwise_attention  # noqa: F401 (generated code gets it through resolve_globals())
from .fused_scan import fused_linear_recurrence, fused_scan_runs  # noqa: F401 (likewise)
from .linear_scan import along_steps, linear_recurrence  # noqa: F401 (likewise)
from .names import EMITTED_HELPERS, PARALLEL_HELPERS, SCAN_HELPERS, SCRIPT_HELPERS


def resolve_globals(names: Iterable[str]) -> Dict[str, Any]:
    """The namespace generated code runs in: each of ``names`` (the globals a generator returns
    with its source, from rnndsl/names.py) bound to its object."""
    known = {"torch": torch, "math": math, "Tensor": Tensor, "Tuple": Tuple, "List": List, "Optional": Optional,
             **{name: globals()[name] for name in EMITTED_HELPERS + SCRIPT_HELPERS + PARALLEL_HELPERS + SCAN_HELPERS}}
    return {name: known[name] for name in names}


def _step_weight_to_onednn_avx2(weight: Tensor) -> bool:
    """Whether a step's product (under 256 rows) with ``weight`` goes to oneDNN on a CPU without
    AVX-512: from a weight of half a million numbers. With a smaller one, MKL reading the weight's
    transpose in place (:func:`_prepack_onednn`) was 5-20% faster on an AVX2 AMD EPYC (batch 16 to
    64, hidden 200 and 256, forward and backward, one thread) and saves the weight's reorder; from
    hidden 512 (a million numbers) oneDNN was 5-15% faster."""
    return weight.size(0) * weight.size(1) >= 524288


def _step_weight_to_onednn_avx512(weight: Tensor) -> bool:
    """:func:`_step_weight_to_onednn_avx2` on a CPU with AVX-512, where oneDNN's kernels also win a
    forward step's product from a quarter of a million numbers: one that widens (more outputs than
    inputs, as a cell's gates from its state). On an AVX-512 AMD EPYC (2026-12-06, a sequence of 20
    steps with the weight's reorder or copy, batch 4 to 64, 1 and 2 threads) an LSTM's took
    0.54-0.88x MKL's time at hidden 256 and 0.61-0.94x at 300-362; its backward's product, which
    narrows, 0.98-1.44x at hidden 256 (and MKL 1.00-1.20x oneDNN's at hidden 200 either way)."""
    return _step_weight_to_onednn_avx2(weight) or (
        weight.size(0) * weight.size(1) >= 262144 and weight.size(0) > weight.size(1))


def _step_weight_to_onednn_any(weight: Tensor) -> bool:
    """:func:`_step_weight_to_onednn_avx2` on an AMD Zen 5 (CPU family 26 and later), where oneDNN's
    kernels win a step's product at every size measured: 0.39-0.59x MKL's time forward and backward
    at hidden 200 to 512, batch 20 and 64, 2 threads (a Zen 5 EPYC VM, 2026-12-07)."""
    return True


def _has_avx512() -> bool:
    """Whether torch runs its CPU kernels with AVX-512. oneDNN reads the CPU's own flags, so the two
    agree unless ``ATEN_CPU_CAPABILITY`` lowers torch's. (A kernel saved by ``torch.jit.save``
    keeps the rule of the machine that compiled it, as it keeps :data:`linear`'s choice.)"""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _cpuinfo_field(name: str) -> str:
    """A field of the first CPU in /proc/cpuinfo (``vendor_id``: ``GenuineIntel``, ``AuthenticAMD``;
    ``cpu family``), empty where unknown."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
                if not line.strip():  # the first CPU's block ends
                    break
    except OSError:
        pass
    return ""


def _amd_family() -> int:
    """The CPU family of an AMD CPU (25: Zen 3 and 4; 26: Zen 5); 0 for any other."""
    family = _cpuinfo_field("cpu family")
    return int(family) if _cpuinfo_field("vendor_id") == "AuthenticAMD" and family.isdigit() else 0


_step_weight_to_onednn = (_step_weight_to_onednn_any if _amd_family() >= 26 else
                          _step_weight_to_onednn_avx512 if _has_avx512() else _step_weight_to_onednn_avx2)


def _onednn_fits(rows: int, weight: Tensor) -> bool:
    """Whether a ``rows``-row product with ``weight`` is float32 on CPU and large enough for oneDNN:
    below about a million multiply-adds its fixed cost per call outweighs its faster kernel. A
    step's product (under 256 rows) also needs the weight :func:`_step_weight_to_onednn` asks for.

    (TorchScript compiles this function too, so the thresholds are literals, not globals; the
    CPU's rule is a function picked at import.)
    """
    return (weight.dtype == torch.float32 and weight.device.type == "cpu"
            and rows * weight.size(0) * weight.size(1) >= 1048576
            and (rows >= 256 or _step_weight_to_onednn(weight)))


def _uses_onednn(rows: int, weight: Tensor) -> bool:
    """Whether :func:`linear` sends a ``rows``-row product with ``weight`` to oneDNN: only outside
    autograd, since oneDNN's kernels have no derivative."""
    return not torch.is_grad_enabled() and _onednn_fits(rows, weight)


def _rows(v: Tensor) -> int:
    """Rows of ``v`` as one GEMM sees them: every leading dim flattened."""
    return v.numel() // max(v.size(-1), 1)


def _linear_onednn(v: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``v @ weight.t() + bias`` over the last dim of ``v`` (any leading dims); ``weight`` may be prepacked.
    ``bias`` is a vector, or a whole addend the size of the result."""
    if weight.is_mkldnn or _uses_onednn(_rows(v), weight):
        vector = bias if bias is not None and bias.dim() == 1 else None  # oneDNN adds a vector only
        if vector is not None:
            vector = vector.contiguous()
        flat = torch.ops.mkldnn._linear_pointwise(v.reshape(-1, v.size(-1)), weight, vector, "none", [], "")
        product = flat.reshape(list(v.size())[:-1] + [flat.size(-1)])
        return product + bias if bias is not None and vector is None else product
    return _linear_matmul(v, weight, bias)


def _prepack_onednn(weight: Tensor, rows: int) -> Tensor:
    """``weight`` in oneDNN's blocked layout for products of ``rows`` rows, when they go to oneDNN;
    otherwise laid out so that MKL reads ``weight.t()`` as a plain row-major matrix.

    Packed once per sequence, the recurrent weight saves a reorder in each step's GEMM
    (10 to 20% of its time here). MKL's small products ran 5-10% faster with the transpose
    contiguous than with a transposed view (a copy only where the layout is not already so:
    the backward's ``weight.t()`` needs none).
    """
    if _uses_onednn(rows, weight):
        return torch.ops.mkldnn._reorder_linear_weight(weight, rows)
    if weight.dtype == torch.float32 and weight.device.type == "cpu" and not torch.is_grad_enabled():
        return weight.t().contiguous().t()
    return weight


def _linear_matmul(v: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``v @ weight.t() + bias`` over the last dim of ``v``, any leading dims; ``bias`` is a vector
    or a whole addend the size of the result."""
    if bias is not None and (v.dim() == 2 or (bias.dim() == 1 and v.is_contiguous())):
        # The GEMM adds it: one pass less over the result. F.linear, not torch.addmm, which
        # TorchScript's executor splits into a GEMM and an add (its DecomposeOps pass).
        return torch.nn.functional.linear(v, weight, bias)
    product = torch.matmul(v, weight.t())
    return product if bias is None else product + bias


def _accumulate_matmul(addend: Tensor, v: Tensor, weight: Tensor) -> Tensor:
    """``addend + v @ weight.t()`` for a 2-D ``v``, written over ``addend`` (which nothing else reads):
    the GEMM adds into it in place, where :func:`linear`'s addmm first copies it into a new result."""
    return addend.addmm_(v, weight.t())


def _accumulate_onednn(addend: Tensor, v: Tensor, weight: Tensor) -> Tensor:
    """:func:`_accumulate_matmul` by oneDNN's GEMM where :func:`linear` would take it (``weight`` may
    be prepacked)."""
    if weight.is_mkldnn or _uses_onednn(_rows(v), weight):
        return addend.add_(_linear_onednn(v, weight))
    return _accumulate_matmul(addend, v, weight)


def _prepack_none(weight: Tensor, rows: int) -> Tensor:
    """Without oneDNN, weights stay as they are."""
    return weight


def _images(v: Tensor) -> Tensor:
    """``v`` (..., channels, height, width) as one batch of images, every leading dim flattened."""
    return v.reshape([-1] + list(v.size()[-3:]))


def _unflattened(images: Tensor, like: Tensor) -> Tensor:
    """A batch of images back under the leading dims of ``like``."""
    return images.reshape(list(like.size()[:-3]) + list(images.size()[-3:]))


def hardtanh(v: Tensor) -> Tensor:
    """``hardtanh`` of the cell language, torch's: ``v`` clamped to [-1, 1], with torch's gradient, 0 at
    the bounds. Not F.hardtanh, which TorchScript's autodiff differentiates as a clamp, passing the
    gradient there (``hardtanh(h + 1)`` from a zero state sits on a bound)."""
    return torch.where((v > -1.0) & (v < 1.0), v, torch.clamp(v, -1.0, 1.0).detach())


def conv_same(weight: Tensor, v: Tensor) -> Tensor:
    """``conv(K, v)`` of the cell language: ``v`` (..., in, height, width), any leading dims (a step's
    batch, or all steps at once), convolved by ``weight`` (out, in, kh, kw), zero-padded by half the
    (odd) kernel on each side so that height and width stay."""
    padding = [weight.size(2) // 2, weight.size(3) // 2]
    return _unflattened(torch.nn.functional.conv2d(_images(v), weight, None, [1, 1], padding), v)


def conv_same_input_grad(grad: Tensor, weight: Tensor) -> Tensor:
    """The gradient of ``v`` in :func:`conv_same`: the transposed convolution of ``grad``."""
    padding = [weight.size(2) // 2, weight.size(3) // 2]
    return _unflattened(torch.nn.functional.conv_transpose2d(_images(grad), weight, None, [1, 1], padding), grad)


def conv_same_weight_grad(grad: Tensor, v: Tensor, weight: Tensor) -> Tensor:
    """The gradient of ``weight`` in :func:`conv_same`, summed over all leading dims: one call over
    every image of the sequence, as :func:`outer_sum` is one GEMM."""
    padding = [weight.size(2) // 2, weight.size(3) // 2]
    grads = torch.ops.aten.convolution_backward(_images(grad), _images(v), weight, None, [1, 1], padding, [1, 1],
                                                False, [0, 0], 1, [False, True, False])
    return grads[1]


def _outer_sum_matmul(grad: Tensor, vector: Tensor) -> Tensor:
    """``sum_k grad[k] ⊗ vector[k]`` over all leading dims: the gradient of W in ``W @ v``, one GEMM
    (torch's matmul, MKL's sgemm, which reads the transposed operand in place)."""
    return torch.mm(grad.reshape(-1, grad.size(-1)).t(), vector.reshape(-1, vector.size(-1)))


def _outer_sum_onednn(grad: Tensor, vector: Tensor) -> Tensor:
    """:func:`_outer_sum_matmul` through oneDNN's GEMM where it fits (float32 on the CPU, outside
    autograd, about a million multiply-adds or more) and wins: a sum over at most 4,096 rows into a
    weight of at least 64 numbers per row, as an LSTM's over a batch of windows (1,280 rows into
    1024 x 256: 0.66x MKL's time). Over more rows into a smaller weight MKL wins, 1.5-4x (minGRU's
    16,384 rows into 128 x 64; 8,192 rows into 1024 x 256).

    Up to 2**21 numbers of ``grad`` (an LSTM's at hidden 256 over 1,280 rows), oneDNN's inner-product
    weight gradient reads both operands as they lie, after a plain copy into oneDNN's tensors: the
    2-layer LSTM's fwd+bwd at hidden 256 took 1.11-1.15x torch.nn.LSTM's time against 1.20-1.25x
    with the operands transposed into copies (three paired processes each, a Zen 5 EPYC VM,
    2026-12-07). Above that size the copies into oneDNN's tensors cost what the transposes do (at
    hidden 512 the two ran even); there the operands are transposed into copies for its GEMM."""
    flat_grad, flat_vector = grad.reshape(-1, grad.size(-1)), vector.reshape(-1, vector.size(-1))
    rows, weight_numbers = flat_grad.size(0), flat_grad.size(1) * flat_vector.size(1)
    if (not torch.is_grad_enabled() and flat_grad.dtype == torch.float32 and flat_vector.dtype == torch.float32
            and flat_grad.device.type == "cpu" and rows * weight_numbers >= 1048576
            and rows <= 4096 and weight_numbers >= 64 * rows):
        if flat_grad.numel() <= 2097152:
            # The third argument gives only the result's dtype and device.
            return torch.ops.aten.mkldnn_linear_backward_weights(
                flat_grad.contiguous().to_mkldnn(), flat_vector.contiguous().to_mkldnn(), flat_grad.new_empty([0]),
                False)[0]
        return torch.ops.mkldnn._linear_pointwise(flat_grad.t().contiguous(), flat_vector.t().contiguous(), None,
                                                  "none", [], "")
    return torch.mm(flat_grad.t(), flat_vector)


def _cpu_vendor() -> str:
    """The CPU's vendor as Linux names it (``GenuineIntel``, ``AuthenticAMD``); empty where unknown."""
    return _cpuinfo_field("vendor_id")


def _onednn_beats_mkl() -> bool:
    """Whether large float32 products (weight gradients by their own rule: :func:`outer_sum`) should go to oneDNN
    rather than torch's matmul (MKL's sgemm).

    Measured at one thread for an LSTM's products (batch 20 to 64, hidden 200 to 1024): on AMD
    EPYC, MKL ran at about half oneDNN's speed. On an Intel Xeon, MKL was as fast for a step's
    product and faster for the backward's ones with a transposed weight (53 against 72 us at
    batch 20, hidden 200), and oneDNN's weight reorder (0.2 to 0.35 ms per sequence) was then
    pure cost: the derived backward's forward and backward together ran 20% faster with MKL.
    Where the vendor is unknown (no /proc/cpuinfo), oneDNN, as before this was measured.
    """
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    return not torch.backends.mkl.is_available() or _cpu_vendor() != "GenuineIntel"


_USE_ONEDNN = _onednn_beats_mkl()
linear = _linear_onednn if _USE_ONEDNN else _linear_matmul
prepack = _prepack_onednn if _USE_ONEDNN else _prepack_none
accumulate = _accumulate_onednn if _USE_ONEDNN else _accumulate_matmul
# A weight's gradient over all steps: torch's matmul, except on the AMD CPUs with AVX-512, where
# oneDNN, copies of the transposes included, took 0.56-0.71x MKL's time (a Zen 5 EPYC, 2026-12-07,
# 2 threads, an LSTM's at hidden 200 to 1024). On an AVX2 EPYC (2026-12-05) MKL was the faster,
# 0.67-0.77x oneDNN's at hidden 200 and 0.91-0.97x at 256 to 1024; on Intel CPUs MKL is.
outer_sum = _outer_sum_onednn if _USE_ONEDNN and _has_avx512() else _outer_sum_matmul




class _LinearFunction(torch.autograd.Function):
    """``v @ weight.t() + bias`` whose forward product and input gradient go through :func:`linear`
    (autograd's own would take MKL's matmul), its weight gradient through :func:`outer_sum`."""

    @staticmethod
    def forward(ctx: Any, v: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(v, weight)
        ctx.has_bias = bias is not None
        return linear(v, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        v, weight = ctx.saved_tensors
        need_v, need_weight, need_bias = ctx.needs_input_grad
        if plain_backward_needed([grad]):  # products autograd can differentiate again, and vmap batch
            flat = grad.reshape(-1, grad.size(-1))
            return (grad @ weight if need_v else None,
                    flat.t() @ v.reshape(-1, v.size(-1)) if need_weight else None,
                    flat.sum(0) if ctx.has_bias and need_bias else None)
        grad = grad.contiguous()
        grad_v = linear(grad, weight.t()) if need_v else None
        grad_weight = outer_sum(grad, v) if need_weight else None
        grad_bias = grad.reshape(-1, grad.size(-1)).sum(0) if ctx.has_bias and need_bias else None
        return grad_v, grad_weight, grad_bias


def linear_with_grad(v: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """:func:`linear` under autograd too: large float32 CPU products keep oneDNN's GEMM, forward
    and backward (about twice as fast as MKL's there for a (T*batch, n) sequence). Under autocast,
    torch's own product, which autocast runs in its low-precision dtype (oneDNN's op would run
    in float32); under torch.compile too, where Inductor picks its own GEMM."""
    if autocast_enabled(v.device.type) or torch.compiler.is_compiling() or plain_ops_needed():
        return torch.nn.functional.linear(v, weight, bias)
    if _USE_ONEDNN and torch.is_grad_enabled() and _onednn_fits(_rows(v), weight):
        return _LinearFunction.apply(v, weight, bias)
    return linear(v, weight, bias)


def time_scan(step, init: List[Tensor], per_step: List[Tensor],
              invariants: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
    """torch's ``scan`` op: ``step(carry, slices, invariants) -> (carry, outputs)`` over the first dim
    of ``per_step``; ``invariants`` are the tensors every step reads alike. torch.export keeps it as
    one loop node valid for any sequence length.

    The op itself, not ``torch._higher_order_ops.scan.scan``: that wrapper runs dynamo over the
    step to find the tensors it closes over, which takes most of an export's time, and dynamo's
    cache then outlives the export (the guards of one trace, checked against a later one, could
    fix a dynamic size). The generated step closes over no tensor, so the op can take it as is.
    """
    if torch.compiler.is_dynamo_compiling():
        # torch.export(strict=True) traces with dynamo, which refuses the op's bare step: there the
        # public wrapper, whose step dynamo traces itself (lifting the tensors it closes over).
        from torch._higher_order_ops.scan import scan

        def combine(carry: List[Tensor], sliced: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
            new_carry, outputs = step(list(carry), list(sliced), list(invariants))
            return list(new_carry), list(outputs)

        carry, outputs = scan(combine, [t.contiguous() for t in init], list(per_step))
        return list(carry), list(outputs)
    from torch._higher_order_ops.scan import scan_op  # function-level: a private module, loaded when exporting
    carried, sliced, shared = len(init), len(per_step), len(invariants)
    # Inductor (AOTInductor) lowers scan to a while loop whose output buffers it sizes from the
    # op's inputs: a symbolic size (a dynamic batch) must be one of them, as dynamo would lift it.
    # The step ignores them. (Sizes are plain ints outside export: none then.)
    symbols = {size.node.expr: size for t in (*init, *per_step) for size in t.shape
               if isinstance(size, torch.SymInt) and size.node.expr.is_symbol}

    def flat_step(*args: Tensor) -> List[Tensor]:  # the op's convention: flat arguments, flat results
        carry, outputs = step(list(args[:carried]), list(args[carried:carried + sliced]),
                              list(args[carried + sliced:carried + sliced + shared]))
        return [*carry, *outputs]

    # scan wants the carry's layout to stay as the step returns it: a state sliced from a wider
    # tensor (a column block of a flat state) comes in strided, and leaves the step contiguous.
    results = scan_op(flat_step, [t.contiguous() for t in init], per_step, (*invariants, *symbols.values()))
    return list(results[:carried]), list(results[carried:])
