"""Bit-exact packing of integer codes into int32 words (checkpoint layout ``rowpack-int32-v1``).

Layout: codes stay in their weight's row order. Row ``r`` of a ``[out, in]`` code matrix becomes
``ceil(in / k)`` int32 words with ``k = 32 // bits`` codes per word: code ``j`` lives in word
``j // k`` at bit offset ``bits * (j % k)`` (little-endian within the word). No code straddles a
word, so 3-bit packs 10 codes per word and leaves the top 2 bits zero (3.2 bits/code); 1-, 2-, 4-
and 8-bit fill their words exactly (1-bit: the sign planes of DSQ). Padding codes at the end of a
row are zero.

The 8-bit-scale format (``ScaleCodedLinear``) packs its codes densely instead (:func:`pack_dense`, layout
``chunk8``): every run of 8 consecutive codes of a row fills ``bits`` bytes, code ``i`` of the run at bit
``bits * i``, so 3-bit codes cost 3 bits, not 3.2. It is the CPU kernel's own layout (``kernels_cpu``).
"""

from __future__ import annotations

import torch

from quant.errors import QuantError

LAYOUT = "rowpack-int32-v1"
# codes per slice of rows: the bit arithmetic runs in int64, 8-16 bytes a code. Whole, a 28M-code lm_head took
# ~450 MB in passing and glibc's heap kept much of it (the decode benchmark's peak RSS rose by a quarter); slices
# of 64K codes keep every temporary under a megabyte or so
SLICE_CODES = 1 << 16


def _by_rows(fn, t: torch.Tensor, codes_per_row: int, *args) -> torch.Tensor:
    """``fn(t, *args)`` on slices of about :data:`SLICE_CODES` codes of rows, written into one output."""
    step = max(1, SLICE_CODES // max(codes_per_row, 1))
    if t.shape[0] <= step:
        return fn(t, *args)
    first = fn(t[:step], *args)
    out = first.new_empty((t.shape[0], *first.shape[1:]))
    out[:step] = first
    for i in range(step, t.shape[0], step):
        out[i:i + step] = fn(t[i:i + step], *args)
    return out


def codes_per_word(bits: int) -> int:
    if bits not in (1, 2, 3, 4, 8):
        raise QuantError(f"cannot pack {bits}-bit codes (supported: 1, 2, 3, 4, 8)")
    return 32 // bits


def packed_width(n: int, bits: int) -> int:
    k = codes_per_word(bits)
    return (n + k - 1) // k


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[rows, n]`` integer codes in ``[0, 2^bits)`` -> ``[rows, ceil(n / (32 // bits))]`` int32."""
    return _by_rows(_pack, codes, codes.shape[1], bits)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
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
    return _by_rows(_unpack, packed, n, bits, n)


def _unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    k = codes_per_word(bits)
    rows, words = packed.shape
    if words * k < n:
        raise QuantError(f"packed tensor too small: {words} words cannot hold {n} {bits}-bit codes")
    p = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(k, dtype=torch.int64, device=packed.device) * bits
    codes = (p[..., None] >> shifts) & (2**bits - 1)
    return codes.view(rows, words * k)[:, :n].to(torch.uint8)


def pack_dense(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[rows, n]`` codes (``n`` a multiple of 8, ``bits`` 1, 2, 3, 4 or 8) -> uint8 ``[rows, n / 8 * bits]``."""
    return _by_rows(_pack_dense, codes, codes.shape[1], bits)


def _pack_dense(codes: torch.Tensor, bits: int) -> torch.Tensor:
    rows, n = codes.shape
    if n % 8 or bits not in (1, 2, 3, 4, 8):
        raise QuantError(f"dense packing needs rows of a multiple of 8 codes of 1, 2, 3, 4 or 8 bits; got {n} x {bits}")
    c = codes.to(torch.int64)
    if c.numel() and (c.min() < 0 or c.max() >= 2**bits):
        raise QuantError(f"codes out of range for {bits}-bit packing")
    value = (c.view(rows, n // 8, 8) << (torch.arange(8, device=c.device) * bits)).sum(-1)  # disjoint fields
    nbytes = (value[..., None] >> (torch.arange(bits, device=c.device) * 8)) & 0xFF  # [rows, runs, bits]
    return nbytes.to(torch.uint8).reshape(rows, n // 8 * bits)


def unpack_dense(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_dense`: uint8 ``[rows, n]`` codes."""
    return _by_rows(_unpack_dense, packed, n, bits, n)


def _unpack_dense(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    rows = packed.shape[0]
    nbytes = packed.to(torch.int64).view(rows, n // 8, bits)
    value = (nbytes << (torch.arange(bits, device=packed.device) * 8)).sum(-1)  # [rows, runs]
    codes = (value[..., None] >> (torch.arange(8, device=packed.device) * bits)) & (2**bits - 1)
    return codes.reshape(rows, n).to(torch.uint8)
