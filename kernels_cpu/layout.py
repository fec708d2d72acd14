"""The CPU kernel's layout of uniform codes, ``chunk8``: each run of 8 consecutive codes of a row fills
``bits`` bytes, code ``i`` of the run at bit ``bits * i`` (little-endian). For 2-4 bits one unaligned 32-bit
load then holds a run, and a per-lane shift and mask put its 8 codes in 8 lanes; 8-bit runs are the code bytes,
widened directly. Rows are contiguous
(``in / 8 * bits`` bytes each) and the buffer ends with 4 bytes of padding, so the last load stays inside it.
3-bit codes take exactly 3 bits here (the checkpoint's ``rowpack-int32-v1`` leaves 2 bits of every word empty).
"""

from __future__ import annotations

import torch

from quant.numerics.packing import unpack


def chunk8(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """``rowpack-int32-v1`` words ``[out, words]`` -> flat uint8 ``[out * in / 8 * bits + 4]``."""
    if in_features % 8:
        raise ValueError(f"chunk8 needs in_features divisible by 8, got {in_features}")
    codes = unpack(qweight, bits, in_features).to(torch.int64)  # [out, in]
    if bits == 8:  # a run of 8 bytes is the codes themselves
        flat = codes.to(torch.uint8).reshape(-1)
        return torch.cat([flat, flat.new_zeros(4)])
    out = codes.shape[0]
    runs = codes.view(out, in_features // 8, 8)
    value = (runs << (torch.arange(8, dtype=torch.int64) * bits)).sum(-1)  # disjoint fields: sum == or
    nbytes = (value[..., None] >> (torch.arange(bits, dtype=torch.int64) * 8)) & 0xFF  # [out, runs, bits]
    flat = nbytes.to(torch.uint8).reshape(-1)
    return torch.cat([flat, flat.new_zeros(4)])
