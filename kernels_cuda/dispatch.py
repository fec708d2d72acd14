"""``QuantLinear.forward`` on CUDA: use the low-bit kernel where shape and format allow.

The kernel covers 2/3/4-bit codes, groups of 32/64/k*128 or per-channel, fp16/bf16 activations
and up to :data:`MAX_ROWS` tokens (decode and small batches). Anything else (prefill with more
rows, fp32 activations, autograd, 8-bit, a failed build, ``LOWBIT_KERNELS=0``) falls back to
``PackedLinear``'s dequantize + matmul. Each path is logged once per process (logger
``lowbit.kernels``) with the reason for a fallback.

The repacked weights (:mod:`kernels_cuda.layout`) are built on first use and cached on the module;
they are rebuilt when the module's buffers move or are modified in place (``load_state_dict``).
"""

from __future__ import annotations

import functools

import torch

import kernels_cuda
from kernels_cuda import log_once, rows_reason
from kernels_cuda.layout import KERNEL_BITS, TILE_K, TILE_N, KernelWeights, kernel_group_ok, repack

MAX_ROWS = 64  # tokens per call; more is prefill, where dequantize + cuBLAS is the better path
DEFAULT_SMEM = 48 * 1024  # per-block shared memory every CUDA GPU allows without opting in


def unsupported_reason(layer: torch.nn.Module, x: torch.Tensor) -> tuple[str, str] | None:
    """(key, message) saying why the kernel cannot run this call, or None if it can."""
    if not kernels_cuda.enabled():
        return "disabled", "disabled by LOWBIT_KERNELS=0 or kernels_cuda.disabled()"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype-{x.dtype}", f"{x.dtype} activations (the kernel takes fp16/bf16)"
    if x.requires_grad and torch.is_grad_enabled():
        return "autograd", "input requires grad (the kernel has no backward)"
    if layer.bits not in KERNEL_BITS:
        return f"bits-{layer.bits}", f"{layer.bits}-bit weights (the kernel takes {KERNEL_BITS})"
    if not kernel_group_ok(layer.group_size, layer.in_features):
        return f"group-{layer.group_size}", f"group size {layer.group_size} (kernel: 32, 64, k*128, per-channel)"
    return rows_reason(layer, x, MAX_ROWS)


def kernel_weights(layer: torch.nn.Module) -> KernelWeights:
    """The layer's weights in the kernel layout, repacked once and cached on the module."""
    bufs = layer.storage_buffers()  # the stored tensors (8-bit scales: their codes, decoded in the repack)
    key = (bufs[0].device, *((b.data_ptr(), b._version) for b in bufs))
    cached = layer.__dict__.get("_kernel_weights")
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        kw = repack(layer.qweight, layer.scales, layer.zeros, layer.bits, layer.group_size, layer.in_features)
    layer.__dict__["_kernel_weights"] = (key, kw)
    return kw


def _nt(m: int) -> int:
    return 1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8


def smem_bytes(m: int, wn: int, wk: int) -> int:
    """Mirror of ``gemm_smem_bytes`` in lowbit_gemm.cu (tested against it on a GPU)."""
    x_bytes = (2 * m * (wk * TILE_K + 8) + 8) * 2
    red_bytes = (wk - 1) * wn * (2 * _nt(m) * 4) * 32 * 4
    return max(x_bytes, red_bytes)


@functools.lru_cache(maxsize=1024)
def launch_config(m: int, n: int, k: int, sm_count: int, max_smem: int = DEFAULT_SMEM) -> tuple[int, int, int]:
    """(wn, wk, splits): warps per block along n and k, and blocks along k.

    Every warp streams its own k tiles, so the number of warps in flight is (row tiles) x wk:
    wk is as large as shared memory (x is staged per round: 2 x m x wk x 128 elements) and k
    allow, up to 16 warps (8 for m > 16, whose kernels are built for 256 threads). Decode
    (m <= 16) keeps one row tile per block and no cross-block split, so sums are deterministic.
    Larger m lets up to 4 row tiles share the staged x and splits k across blocks (fp32 atomics)
    until the grid covers the GPU twice."""
    ntiles, kt = -(-n // TILE_N), -(-k // TILE_K)
    max_warps = 16 if m <= 16 else 8
    wk = max_warps
    while wk > 1 and (wk > kt or smem_bytes(m, 1, wk) > max_smem):
        wk //= 2
    if m <= 16:
        return 1, wk, 1
    wn = max(1, min(4, max_warps // wk, ntiles))
    while wn > 1 and smem_bytes(m, wn, wk) > max_smem:
        wn //= 2
    blocks = -(-ntiles // wn)
    splits = 1
    while blocks * splits < 2 * sm_count and kt >= 4 * wk * splits * 2:  # >= 4 k tiles per warp
        splits *= 2
    return wn, wk, splits


@functools.lru_cache(maxsize=16)
def _device_limits(device_index: int) -> tuple[int, int]:
    """(SM count, opt-in shared memory per block) of a CUDA device."""
    ext = kernels_cuda.load_extension()
    smem = ext.max_smem(device_index) if ext is not None else DEFAULT_SMEM
    return torch.cuda.get_device_properties(device_index).multi_processor_count, smem


def lowbit_matmul(
    x: torch.Tensor,
    kw: KernelWeights,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """``x[..., k] . dequant(W)^T + bias`` with the CUDA kernel (x fp16/bf16 on CUDA, <= 64 rows).

    ``out``: a ``[rows, n]`` tensor to write into; ``config``: force ``(wn, wk, splits)``
    instead of :func:`launch_config` (tests sweep it)."""
    ext = kernels_cuda.load_extension()
    if ext is None:
        raise RuntimeError(f"lowbit CUDA kernels unavailable: {kernels_cuda.extension_error()}")
    x2 = x.reshape(-1, kw.k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    dev = x2.device.index if x2.device.index is not None else torch.cuda.current_device()
    wn, wk, splits = config or launch_config(x2.shape[0], kw.n, kw.k, *_device_limits(dev))
    stream = torch.cuda.current_stream(x2.device).cuda_stream
    y = ext.gemm(x2, kw.qweight, kw.scales, kw.zeros, bias, kw.n, kw.group_size, kw.bits, wn, wk, splits, stream, out)
    return y.view(*x.shape[:-1], kw.n)


def kernel_forward(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The layer's output through the kernel, or None when the caller must fall back."""
    why = unsupported_reason(layer, x)
    if why is None and kernels_cuda.load_extension() is None:
        why = "build", f"kernel build failed ({kernels_cuda.extension_error()})"
    if why is not None:
        log_once(f"fallback:{why[0]}", "QuantLinear on %s: dequantize + matmul (%s)", x.device.type, why[1])
        return None
    log_once("kernel", "QuantLinear on cuda: lowbit CUDA kernel")
    return lowbit_matmul(x, kernel_weights(layer), layer.bias)
