"""The CPU kernel's layout of uniform codes, ``chunk8`` (``quant.numerics.packing.pack_dense``): each run of 8
consecutive codes of a row fills ``bits`` bytes, code ``i`` of the run at bit ``bits * i`` (little-endian). For
2-4 bits one unaligned 32-bit load then holds a run, and a per-lane shift and mask put its 8 codes in 8 lanes;
8-bit runs are the code bytes, widened directly. Rows are contiguous (``in / 8 * bits`` bytes each) and the buffer
ends with 4 bytes of padding, so the last load stays inside it. 3-bit codes take exactly 3 bits here (the
checkpoint's ``rowpack-int32-v1`` leaves 2 bits of every word empty; 8-bit-scale layers store ``chunk8`` as is).
DSQ's B sign planes become B-bit codes in the same layout (bit k of a code = plane k's sign bit, 1-4 bits).
For the int8 bodies, each DSQ or codebook group's table of values also comes as bytes (:func:`dsq_tables`,
:func:`codebook_tables`); for the AVX2 int8 body, 3-bit codes (uniform, codebook, and DSQ's three planes) come as
``split3`` (:func:`split3`), which it unpacks without a multiply or a shuffle; :func:`for_body` picks a body's
layout.
"""

from __future__ import annotations

import torch

from quant.numerics.packing import pack_dense, unpack, unpack_dense


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


# split3's high bits: byte b of 32-bit lane l (bit 8b + l of the word) is code 16 (l % 2) + 4 b + l // 2 of the 32,
# the code the AVX2 int8 body's 2-bit unpack puts in the same output byte (4 l + b)
_SPLIT3_HIGH = torch.tensor([[16 * (lane % 2) + 4 * b + lane // 2 for lane in range(8)] for b in range(4)])


def split3(codes: torch.Tensor) -> torch.Tensor:
    """3-bit codes ``[out, in]`` (``in`` a multiple of 32) -> ``split3`` rows ``[out, in / 8 * 3]`` (uint8): per 32
    codes, their low 2 bits as 2-bit ``chunk8`` (8 bytes: code k at bit 2k), then their high bits (4 bytes: code
    ``16 (l % 2) + 4 b + l // 2`` at bit ``8 b + l``). The AVX2 int8 body gets 32 codes as bytes from it with two
    per-lane shifts, two masks, a shift and an or (``chunk8`` would take two shuffles and two multiplies)."""
    out, n = codes.shape
    if n % 32:
        raise ValueError(f"split3 needs in_features divisible by 32, got {n}")
    c = codes.to(torch.int64).view(out, n // 32, 32)
    low = ((c & 3).view(out, n // 32, 8, 4) << torch.arange(0, 8, 2)).sum(-1)  # byte b: codes 4b .. 4b + 3
    high = ((c[..., _SPLIT3_HIGH] >> 2) << torch.arange(8)).sum(-1)  # [out, blocks, 4]
    return torch.cat([low, high], -1).to(torch.uint8).view(out, n // 8 * 3)


def for_body(buffer: torch.Tensor, bits: int, in_features: int, body: str) -> torch.Tensor:
    """A flat ``chunk8`` kernel buffer (uniform codes or DSQ's, :func:`chunk8` / :func:`dsq_chunk8`) in the layout
    that ``body`` (the extension's ``kernel_body``) reads: the same buffer, or ``split3`` for 3-bit codes on the
    AVX2 int8 body."""
    if bits != 3 or body != "avx2-int8":
        return buffer
    rows = buffer[:-4].view(-1, in_features // 8 * 3)
    return kernel_buffer(split3(unpack_dense(rows, 3, in_features)))


def dsq_tables(row_scales: torch.Tensor) -> torch.Tensor:
    """DSQ row scales ``[out, groups, B]`` (fp16) -> each group's table of weight values as the int8 bodies read
    it, flat uint8 ``[out * groups * (2 + 2^B)]``: per row, its groups' fp16 steps ``t``, then their tables
    ``T'[c] = round(T[c] / t) + 64`` for every code ``c`` (1..127).

    A group's weights take the 2^B values ``T[c] = sum_k r_k (2 bit_k(c) - 1)``; ``t = sum_k |r_k| / 63`` (no
    ``|T[c]|`` is larger), 7 bits, offset by 64 so that the kernels multiply them unsigned (the offset comes back
    out through the tokens' sums). ``T[~c] = -T[c]`` holds after rounding too (half to even is symmetric). The
    whole table is stored, twice the half that determines it, so that a kernel's table is one broadcast load; the
    steps lie together so that 8 or 16 groups' are one vector load."""
    r = row_scales.float()
    out, groups, bits = r.shape
    signs = torch.tensor([[1.0 if c >> k & 1 else -1.0 for k in range(bits)] for c in range(2**bits)])
    step = (r.abs().sum(-1) / 63).half()  # [out, groups]
    inv = torch.where(step > 0, 1 / step.float(), torch.zeros_like(step, dtype=torch.float32))
    table = torch.round((r @ signs.T) * inv[..., None]).clamp(-63, 63).to(torch.int16) + 64  # [out, groups, 2^B]
    rows = torch.cat([step.view(torch.uint8).reshape(out, 2 * groups), table.to(torch.uint8).reshape(out, -1)], -1)
    return rows.reshape(-1).contiguous()


def codebook_tables(scales: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """A codebook layer's group scales ``[out, groups]`` (fp16) and levels ``[2^B]`` -> the int8 bodies' tables, flat
    uint8 ``[out * groups * 2 + 2^B]``: every group's fp16 step ``t = s max|L| / 63`` (rows one after another, as
    :func:`dsq_tables` lays out its steps), then one table ``round(L[c] / (max|L| / 63)) + 64`` that every group
    shares (its values ``s L[c]`` differ from group to group only by the step): 2 bytes a group, as the fp16 scales
    the float bodies read, not DSQ's 2 + 2^B."""
    amax = levels.float().abs().max()
    step = (scales.float() * amax / 63).half()
    table = torch.round(levels.float() * (63 / amax if amax > 0 else 0.0)).clamp(-63, 63).to(torch.int16) + 64
    return torch.cat([step.view(torch.uint8).reshape(-1), table.to(torch.uint8)])
