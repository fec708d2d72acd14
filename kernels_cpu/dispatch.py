"""``QuantLinear``/``DSQLinear.forward`` on the CPU: the low-bit kernel for decoding-sized calls.

The kernel serves float32 inputs of at most :data:`MAX_ROWS` tokens (decode, small batches) without autograd,
for 2/3/4/8-bit uniform codes and DSQ sign planes whose group is a multiple of 8. Anything else (prefill,
where dequantize + a BLAS matmul is faster; training; a failed build; ``LOWBIT_KERNELS=0``) falls
back to ``PackedLinear``'s dequantize + matmul. Other float dtypes are computed in float32 and cast back.
Each path is logged once per process (logger ``lowbit.kernels``).

Uniform codes are repacked once into the ``chunk8`` layout (:mod:`kernels_cpu.layout`) and cached on the
module (rebuilt when its buffers change): a second copy of the codes, the same size or smaller (3-bit), and no
float weight. The fp16 scales and uint8 zeros, and DSQ's planes and row scales, are read as stored.
"""

from __future__ import annotations

import weakref

import torch

import kernels_cpu
import kernels_cuda
from kernels_cpu.layout import chunk8
from kernels_cuda import log_once, rows_reason

MAX_ROWS = 8  # tokens per call; more is prefill, where dequantize + BLAS is the better path
KERNEL_BITS = {"uniform": (2, 3, 4, 8), "dsq": (1, 2, 3, 4)}


def unsupported_reason(layer: torch.nn.Module, x: torch.Tensor) -> tuple[str, str] | None:
    """(key, message) saying why the kernel cannot run this call, or None if it can."""
    if not kernels_cuda.enabled():
        return "disabled", "disabled by LOWBIT_KERNELS=0 or kernels_cuda.disabled()"
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype-{x.dtype}", f"{x.dtype} input (the kernel computes in float32)"
    if x.shape[-1] != layer.in_features:
        return "shape", "input width is not in_features"  # F.linear raises the error
    scales = layer.row_scales if layer.FORMAT == "dsq" else layer.scales
    if scales.dtype != torch.float16:
        return f"scales-{scales.dtype}", f"{scales.dtype} scales (the kernel reads the checkpoint's fp16)"
    if x.requires_grad and torch.is_grad_enabled():
        return "autograd", "input requires grad (the kernel has no backward)"
    if layer.bits not in KERNEL_BITS.get(layer.FORMAT, ()):
        return f"bits-{layer.FORMAT}{layer.bits}", f"{layer.bits}-bit {layer.FORMAT} weights"
    if layer.group_size % 8:
        return "group", f"group size {layer.group_size} (the kernel needs a multiple of 8)"
    return rows_reason(layer, x, MAX_ROWS)


def _chunk8(layer: torch.nn.Module) -> torch.Tensor:
    """The repacked codes, cached on the module; rebuilt when ``qweight`` is replaced or written in place (writes
    through ``.data`` that bypass the version counter are not seen: load weights with ``load_state_dict``)."""
    q = layer.qweight
    key = (id(q), q.data_ptr(), q._version if not q.is_inference() else 0)
    cached = layer.__dict__.get("_cpu_kernel_codes")
    if cached is None or cached[0] != key or cached[1]() is not q:
        with torch.no_grad():
            cached = (key, weakref.ref(q), chunk8(q, layer.bits, layer.in_features))
        layer.__dict__["_cpu_kernel_codes"] = cached
    return cached[2]


def lowbit_matmul_cpu(layer: torch.nn.Module, x: torch.Tensor, isa: int = -1) -> torch.Tensor:
    """``x[..., in] . W^T + bias`` with the CPU kernel. ``isa``: -1 best, 0 portable, 1 AVX2, 2 AVX-512."""
    ext = kernels_cpu.EXTENSION.load()
    if ext is None:
        raise RuntimeError(f"lowbit CPU kernels unavailable: {kernels_cpu.EXTENSION.error}")
    x2 = x.reshape(-1, layer.in_features).to(torch.float32).contiguous()
    if layer.FORMAT == "dsq":
        y = ext.dsq_gemv(x2, layer.planes, layer.row_scales, layer.group_size, isa)
    else:
        y = ext.uniform_gemv(x2, _chunk8(layer), layer.scales, layer.zeros, layer.bits, layer.group_size, isa)
    if layer.bias is not None:
        y += layer.bias
    return y.to(x.dtype).view(*x.shape[:-1], layer.out_features)


def kernel_forward(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The layer's output through the kernel, or None when the caller must fall back."""
    why = unsupported_reason(layer, x)
    if why is None and kernels_cpu.EXTENSION.load() is None:
        why = "build", f"kernel build failed ({kernels_cpu.EXTENSION.error})"
    if why is not None:
        log_once(f"cpu-fallback:{why[0]}", "%s on cpu: dequantize + matmul (%s)", type(layer).__name__, why[1])
        return None
    log_once(f"cpu-kernel:{layer.FORMAT}", "%s on cpu: lowbit CPU kernel", type(layer).__name__)
    return lowbit_matmul_cpu(layer, x)
