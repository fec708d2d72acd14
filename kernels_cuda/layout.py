"""The kernel's weight layout: an offline repack of ``QuantLinear``'s checkpoint buffers.

The checkpoint layout (``quant.numerics.packing``, ``rowpack-int32-v1``) stays the only on-disk format. The
CUDA kernel wants each lane's share of a warp tile in one place, so :func:`repack` rewrites
the buffers once per module and device (``kernels_cuda.dispatch`` caches the result on the module):

* **Codes.** A warp tile is 32 weight rows x 128 inputs: two 16-row x eight 16-input
  ``mma.m16n8k16`` A fragments per lane. Lane ``l`` (``g = l // 4``, ``t = l % 4``) holds, for
  fragment ``f = 8 * mi + ks``, four pairs ``r = 0..3``: row ``16 mi + g + 8 (r & 1)``, inputs
  ``16 ks + 2 t + 8 (r >> 1) + {0, 1}``. A pair sits in one 32-bit word at bit ``P`` (first code)
  and ``P + 16`` (second), so one mask-and-or turns it into a packed fp16/bf16 pair:

  * 4-bit: word ``f``, ``P = 4 r`` (16 words per lane per tile);
  * 2-bit: word ``f // 2``, ``P = 2 (4 (f % 2) + r)`` (8 words);
  * 3-bit: dense, 32 codes in 3 words (12 words): slot ``s = 4 (f % 4) + r`` of word triplet
    ``c = f // 4``; ``s < 15``: word ``3 c + s // 5``, ``P = 3 (s % 5)``; slot 15 stores code bit
    ``i`` in bit 15 (first code) / 31 (second) of word ``3 c + i``. Unlike the checkpoint's
    10-codes-per-word packing this wastes no bits, so INT3 moves 3/4 of INT4's bytes.

  In memory the words of tile ``(tn, kt)`` are ``[bits][32 lanes][4]``: load ``j`` of every lane
  reads words ``4 j .. 4 j + 3``, one coalesced 512-byte access per warp. Tiles are ordered
  ``[n tiles][k tiles]``. Rows past ``n`` and inputs past ``k`` are zero codes.
* **Scales and zeros.** ``[n tiles][groups][32]`` with the 32 rows of a tile in the order
  ``4 g + j`` <- row ``g + 8 j``, so a lane reads the 4 scales (8 bytes) and 4 zeros (4 bytes) of
  its rows with one load each. Padded rows get scale 0, zero 0.

Everything here is plain torch and runs on CPU or GPU; :func:`emulate_dequant` decodes the layout
the way the CUDA kernel does (same formulas, same fp16/bf16 magic-number arithmetic) so the
layout is testable without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quant.numerics.packing import unpack

TILE_N = 32  # weight rows per warp tile (two m16 fragments)
TILE_K = 128  # inputs per warp tile (eight k16 fragments)
KERNEL_BITS = (2, 3, 4)
ROW_ORDER = [i // 4 + 8 * (i % 4) for i in range(TILE_N)]  # record slot 4 g + j <- row g + 8 j


def kernel_group_ok(group_size: int, in_features: int) -> bool:
    """Group sizes the kernel handles: 32 and 64 (split a 128-input tile), multiples of 128 (span
    whole tiles) and per-channel (one group per row)."""
    if group_size < 1 or in_features % group_size:
        return False
    return group_size in (32, 64) or group_size % TILE_K == 0 or group_size == in_features


@dataclass
class KernelWeights:
    """One layer's weights in the kernel layout (what ``kernels_cuda.ops.gemm`` consumes)."""

    qweight: torch.Tensor  # int32, flat: [n tiles][k tiles][bits][32][4]
    scales: torch.Tensor  # fp16, flat: [n tiles][groups][32]
    zeros: torch.Tensor  # uint8, flat: [n tiles][groups][32]
    n: int
    k: int
    bits: int
    group_size: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))


def _fields(bits: int) -> list[tuple[int, int, int, int, int, int, int, int]]:
    """Every bit field of a lane's words in one tile: (word, bit, mi, ks, r, second, code bit, width).

    ``second`` picks the pair's second code (input + 1); ``code bit``/``width`` select which bits
    of the code the field stores (the 3-bit spare pair stores one bit per field)."""
    out = []
    for f in range(16):
        mi, ks = divmod(f, 8)
        for r in range(4):
            for hi in (0, 1):
                if bits == 4:
                    out.append((f, 4 * r + 16 * hi, mi, ks, r, hi, 0, 4))
                elif bits == 2:
                    out.append((f // 2, 2 * (4 * (f % 2) + r) + 16 * hi, mi, ks, r, hi, 0, 2))
                else:
                    c, s = f // 4, 4 * (f % 4) + r
                    if s < 15:
                        out.append((3 * c + s // 5, 3 * (s % 5) + 16 * hi, mi, ks, r, hi, 0, 3))
                    else:
                        out.extend((3 * c + i, 15 + 16 * hi, mi, ks, r, hi, i, 1) for i in range(3))
    return out


def _field_index(bits: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Per (field, lane): source row/input inside the tile, destination word and bit."""
    f = torch.tensor(_fields(bits), dtype=torch.int64, device=device)  # [F, 8]
    lane = torch.arange(32, device=device)
    g, t = lane // 4, lane % 4
    word, bit, mi, ks, r, hi, cbit, width = (f[:, i : i + 1] for i in range(8))
    return {
        "row": 16 * mi + g + 8 * (r & 1),  # [F, 32]
        "col": 16 * ks + 2 * t + 8 * (r >> 1) + hi,
        "word": word.expand(-1, 32),
        "bit": bit.expand(-1, 32),
        "cbit": cbit.expand(-1, 32),
        "mask": ((1 << width) - 1).expand(-1, 32),
    }


def _tiles(codes: torch.Tensor) -> torch.Tensor:
    """``[n, k]`` codes -> zero-padded ``[n tiles, k tiles, 32, 128]``."""
    n, k = codes.shape
    nt, kt = -(-n // TILE_N), -(-k // TILE_K)
    padded = torch.zeros(nt * TILE_N, kt * TILE_K, dtype=torch.uint8, device=codes.device)
    padded[:n, :k] = codes
    return padded.view(nt, TILE_N, kt, TILE_K).permute(0, 2, 1, 3)


def repack_codes(codes: torch.Tensor, bits: int, chunk_tiles: int = 64) -> torch.Tensor:
    """``[n, k]`` uint8 codes -> the kernel's int32 words (flat). Runs in row-tile chunks so the
    int64 scratch stays small on the largest layers."""
    if bits not in KERNEL_BITS:
        raise ValueError(f"the kernel layout has no {bits}-bit variant (supported: {KERNEL_BITS})")
    tiles = _tiles(codes)
    nt, kt = tiles.shape[:2]
    idx = _field_index(bits, codes.device)
    words = 4 * bits
    out = torch.empty(nt, kt, words, 32, dtype=torch.int32, device=codes.device)
    for s in range(0, nt, chunk_tiles):
        part = tiles[s : s + chunk_tiles].to(torch.int64)  # [c, kt, 32, 128]
        vals = part[:, :, idx["row"], idx["col"]]  # [c, kt, F, 32]
        vals = ((vals >> idx["cbit"]) & idx["mask"]) << idx["bit"]
        acc = torch.zeros(*vals.shape[:2], words, 32, dtype=torch.int64, device=codes.device)
        acc.scatter_add_(2, idx["word"].expand_as(vals), vals)  # disjoint bit fields: sum == or
        out[s : s + chunk_tiles] = torch.where(acc >= 2**31, acc - 2**32, acc).to(torch.int32)
    # memory order per tile: [load j][lane][4 words] with word = 4 j + e
    return out.view(nt, kt, bits, 4, 32).transpose(3, 4).reshape(-1).contiguous()


def unpack_kernel_codes(qweight: torch.Tensor, bits: int, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`repack_codes` (for tests): kernel words -> ``[n, k]`` uint8 codes."""
    nt, kt = -(-n // TILE_N), -(-k // TILE_K)
    w = qweight.view(nt, kt, bits, 32, 4).transpose(3, 4).reshape(nt, kt, 4 * bits, 32).to(torch.int64)
    w = w & 0xFFFFFFFF
    idx = _field_index(bits, qweight.device)
    vals = (w[:, :, idx["word"], torch.arange(32, device=w.device)] >> idx["bit"]) & idx["mask"]
    vals = vals << idx["cbit"]  # [nt, kt, F, 32]
    tiles = torch.zeros(nt, kt, TILE_N, TILE_K, dtype=torch.int64, device=w.device)
    flat = (idx["row"] * TILE_K + idx["col"]).expand_as(vals).reshape(nt, kt, -1)
    tiles.view(nt, kt, -1).scatter_add_(2, flat, vals.reshape(nt, kt, -1))
    full = tiles.permute(0, 2, 1, 3).reshape(nt * TILE_N, kt * TILE_K)
    return full[:n, :k].to(torch.uint8)


def repack_group_params(t: torch.Tensor) -> torch.Tensor:
    """``[n, groups]`` scales or zeros -> ``[n tiles][groups][32]`` (flat) in the lane row order."""
    n, groups = t.shape
    nt = -(-n // TILE_N)
    padded = torch.zeros(nt * TILE_N, groups, dtype=t.dtype, device=t.device)
    padded[:n] = t
    order = torch.tensor(ROW_ORDER, device=t.device)
    return padded.view(nt, TILE_N, groups)[:, order, :].transpose(1, 2).reshape(-1).contiguous()


def repack(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int, in_features: int
) -> KernelWeights:
    """``QuantLinear`` buffers (checkpoint layout) -> :class:`KernelWeights` on the same device."""
    n = qweight.shape[0]
    codes = unpack(qweight, bits, in_features)
    return KernelWeights(
        qweight=repack_codes(codes, bits),
        scales=repack_group_params(scales.to(torch.float16)),
        zeros=repack_group_params(zeros.to(torch.uint8)),
        n=n,
        k=in_features,
        bits=bits,
        group_size=group_size,
    )


# --- emulation of the kernel's decode (tests, debugging) --------------------------------------

_ELEM = {  # dtype -> (mantissa bits, exponent bias, magic value 2^e)
    torch.float16: (10, 15, 1024),
    torch.bfloat16: (7, 127, 128),
}


def _pair_position(bits: int, f: int, r: int) -> tuple[int, int] | None:
    """(word, P) of pair r of fragment f, as the CUDA ``Dequant::fragment``; None: 3-bit spare."""
    if bits == 4:
        return f, 4 * r
    if bits == 2:
        return f // 2, 2 * (4 * (f % 2) + r)
    c, s = f // 4, 4 * (f % 4) + r
    return (3 * c + s // 5, 3 * (s % 5)) if s < 15 else None


def _as_elem(halves: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int64 16-bit patterns -> float64 values of ``dtype``."""
    signed = torch.where(halves >= 2**15, halves - 2**16, halves).to(torch.int16)
    return signed.view(dtype).to(torch.float64)


def emulate_dequant(w: KernelWeights, dtype: torch.dtype) -> torch.Tensor:
    """The ``[n, k]`` weight the kernel feeds its tensor cores, decoded like the CUDA code does.

    Mirrors ``Dequant`` in lowbit_gemm.cu: magic-number field extraction, ``fma`` with
    ``(2^-pp, -(2^e / 2^pp + zero))`` and the multiply by the scale rounded to ``dtype``. For
    fp16 the result equals ``QuantLinear.dequantize(torch.float16)`` bit for bit."""
    mant, bias, magic_val = _ELEM[dtype]
    chunk = (mant // w.bits) * w.bits
    nt, kt = -(-w.n // TILE_N), -(-w.k // TILE_K)
    groups = w.k // w.group_size
    words = w.qweight.view(nt, kt, w.bits, 32, 4).transpose(3, 4).reshape(nt, kt, 4 * w.bits, 32)
    words = words.to(torch.int64) & 0xFFFFFFFF
    sc = w.scales.view(nt, groups, TILE_N).to(torch.float64)
    zz = w.zeros.view(nt, groups, TILE_N).to(torch.float64)
    lane = torch.arange(32)
    g, t = lane // 4, lane % 4
    out = torch.zeros(nt * TILE_N, kt * TILE_K, dtype=torch.float64)
    gpt, kpg = (TILE_K // w.group_size, 8 * w.group_size // TILE_K) if groups > 1 and w.group_size < TILE_K else (1, 8)
    rows_base = torch.arange(nt)[:, None, None] * TILE_N
    cols_base = torch.arange(kt)[None, :, None] * TILE_K
    for f in range(16):
        mi, ks = divmod(f, 8)
        # group of this k-step, as load_tile + the in-tile rotation choose it
        kts = torch.arange(kt)
        grp = kts * gpt + ks // kpg if gpt > 1 else torch.clamp(kts * TILE_K // w.group_size, max=groups - 1)
        grp = torch.clamp(grp, max=groups - 1)  # [kt]
        for r in range(4):
            j = 2 * mi + (r & 1)
            slot = 4 * g + j  # [32] record slot of this lane's row
            s = sc[:, grp][:, :, slot]  # [nt, kt, 32]
            z = zz[:, grp][:, :, slot]
            pos = _pair_position(w.bits, f, r)
            if pos is None:
                c = f // 4
                w0, w1, w2 = (words[:, :, 3 * c + i, :] for i in range(3))
                v = ((w0 >> 15) & 0x10001) | ((w1 >> 14) & 0x20002) | ((w2 >> 13) & 0x40004)
                pp = 0
            else:
                word, p = pos
                shift = (p // chunk) * chunk
                pp = p - shift
                v = (words[:, :, word, :] >> shift) & ((((1 << w.bits) - 1) * 0x10001) << pp)
            s_t = s.to(dtype).to(torch.float64)  # scale rounded to the element type (exact for fp16)
            for half, col_off in ((v & 0xFFFF, 0), (v >> 16, 1)):
                magic_bits = (bias + (magic_val.bit_length() - 1)) << mant
                val = _as_elem(half | magic_bits, dtype)  # 2^e + field * 2^pp, exact
                q = val * 2.0**-pp - (magic_val / 2**pp + z)  # exact integer code - zero
                a = (q * s_t).to(dtype).to(torch.float64)  # one rounding, as mul.rn
                row = rows_base + 16 * mi + g + 8 * (r & 1)
                col = cols_base + 16 * ks + 2 * t + 8 * (r >> 1) + col_off
                out[row.expand(nt, kt, 32), col.expand(nt, kt, 32)] = a
    return out[: w.n, : w.k].to(dtype)
