"""Bit-exact packing of integer codes into int32 words (checkpoint layout ``rowpack-int32-v1``).

Layout: codes stay in their weight's row order. Row ``r`` of a ``[out, in]`` code matrix becomes
``ceil(in / k)`` int32 words with ``k = 32 // bits`` codes per word: code ``j`` lives in word
``j // k`` at bit offset ``bits * (j % k)`` (little-endian within the word). No code straddles a
word, so 3-bit packs 10 codes per word and leaves the top 2 bits zero (3.2 bits/code); 1-, 2-, 4-
and 8-bit fill their words exactly (1-bit: the sign planes of DSQ). Padding codes at the end of a
row are zero.
"""

from __future__ import annotations

import torch

from quant.errors import QuantError

LAYOUT = "rowpack-int32-v1"


def codes_per_word(bits: int) -> int:
    if bits not in (1, 2, 3, 4, 8):
        raise QuantError(f"cannot pack {bits}-bit codes (supported: 1, 2, 3, 4, 8)")
    return 32 // bits


def packed_width(n: int, bits: int) -> int:
    k = codes_per_word(bits)
    return (n + k - 1) // k


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[rows, n]`` integer codes in ``[0, 2^bits)`` -> ``[rows, ceil(n / (32 // bits))]`` int32."""
    k = codes_per_word(bits)
    rows, n = codes.shape
    words = packed_width(n, bits)
    c = torch.zeros(rows, words * k, dtype=torch.int64, device=codes.device)
    c[:, :n] = codes.to(torch.int64)
    if c.min() < 0 or c.max() >= 2**bits:
        raise QuantError(f"codes out of range for {bits}-bit packing")
    shifts = torch.arange(k, dtype=torch.int64, device=codes.device) * bits
    packed = (c.view(rows, words, k) << shifts).sum(-1)  # disjoint bit fields: sum == bitwise or
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # reinterpret as signed int32
    return packed.to(torch.int32)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[rows, words]`` int32 -> ``[rows, n]`` uint8 codes."""
    k = codes_per_word(bits)
    rows, words = packed.shape
    if words * k < n:
        raise QuantError(f"packed tensor too small: {words} words cannot hold {n} {bits}-bit codes")
    p = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(k, dtype=torch.int64, device=packed.device) * bits
    codes = (p[..., None] >> shifts) & (2**bits - 1)
    return codes.view(rows, words * k)[:, :n].to(torch.uint8)
