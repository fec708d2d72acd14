"""The CPU kernel's layout of uniform codes, ``chunk8`` (``quant.numerics.packing.pack_dense``): each run of 8
consecutive codes of a row fills ``bits`` bytes, code ``i`` of the run at bit ``bits * i`` (little-endian). For
2-4 bits one unaligned 32-bit load then holds a run, and a per-lane shift and mask put its 8 codes in 8 lanes;
8-bit runs are the code bytes, widened directly. Rows are contiguous (``in / 8 * bits`` bytes each) and the buffer
ends with 4 bytes of padding, so the last load stays inside it. 3-bit codes take exactly 3 bits here (the
checkpoint's ``rowpack-int32-v1`` leaves 2 bits of every word empty; 8-bit-scale layers store ``chunk8`` as is).
DSQ's B sign planes become B-bit codes in the same layout (bit k of a code = plane k's sign bit, 1-4 bits).
"""

from __future__ import annotations

import torch

from quant.numerics.packing import pack_dense, unpack


def kernel_buffer(dense: torch.Tensor) -> torch.Tensor:
    """``chunk8`` rows ``[out, in / 8 * bits]`` -> the flat buffer the kernel reads (4 bytes of padding)."""
    flat = dense.reshape(-1)
    return torch.cat([flat, flat.new_zeros(4)])


def dsq_chunk8(planes: torch.Tensor, in_features: int) -> torch.Tensor:
    """DSQ sign planes ``[bits, out, words]`` -> the flat ``chunk8`` buffer of their codes (bit k = plane k)."""
    if in_features % 8:
        raise ValueError(f"chunk8 needs in_features divisible by 8, got {in_features}")
    code = unpack(planes[0], 1, in_features)
    for k in range(1, planes.shape[0]):
        code |= unpack(planes[k], 1, in_features) << k
    return kernel_buffer(pack_dense(code, planes.shape[0]))


def chunk8(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """``rowpack-int32-v1`` words ``[out, words]`` -> flat uint8 ``[out * in / 8 * bits + 4]``."""
    if in_features % 8:
        raise ValueError(f"chunk8 needs in_features divisible by 8, got {in_features}")
    return kernel_buffer(pack_dense(unpack(qweight, bits, in_features), bits))
