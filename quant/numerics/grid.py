"""Group-wise uniform quantization: the one place where scales, zero-points and codes are computed.

Every weight row is split into contiguous groups of ``group_size`` input columns (``-1`` = the whole
row, i.e. per-channel). A group has an fp16 scale ``s`` and an integer zero-point ``z`` in
``[0, 2^bits - 1]``; a weight ``w`` becomes the code ``q = clamp(round(w / s) + z, 0, 2^bits - 1)``
and dequantizes to ``(q - z) * s``.

* asymmetric: ``s = (max - min) / maxq``, ``z = round(-min / s)``. The zero-point is rounded to an
  integer on purpose: on SmolLM2 at 3 bits a float zero-point measured 2.4x worse perplexity although
  its weight error was lower (shared/research/environment.md).
* symmetric: ``s = 2 * max|w| / maxq`` with the fixed zero ``z = 2^(bits-1)`` (GPTQ's convention, so
  symmetric checkpoints map directly onto the GPTQ format).

Scales are rounded to fp16 *before* codes are computed, so quantize -> dequantize here is exactly
what a reloaded checkpoint computes.

With ``codebook="kmeans"`` the same functions take the layer's ``levels`` (``quant.numerics.codebook``): a code
is the index of the level nearest to ``w / s`` and dequantizes to ``levels[q] * s``; no zero-point.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from quant.errors import QuantError
from quant.numerics.codebook import codebook_scale, decode, encode, fit_levels, fit_vectors
from quant.numerics.scalecodes import SCALE_BITS, ScaleGrid

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 48, 64, 96, 128, 192, 256)  # plus -1 for per-channel; 48, 96, 192 for vq3's runs of 3
CLIP_METHODS = ("minmax", "mse")
CODEBOOKS = ("uniform", "kmeans", "vq2", "vq3")  # equally spaced levels and a zero-point, or the layer's own
# (numerics.codebook): scalar levels, or entries for runs of 2 or 3 weights


@dataclass(frozen=True)
class QuantSpec:
    """How one linear layer's weight is quantized."""

    bits: int = 4
    group_size: int = 128  # -1: one group per row
    sym: bool = False
    clip: str = "mse"  # "minmax" or "mse" (search a shrink of the range that minimises the error)
    scale_bits: int = 16  # 16: fp16 scales, uint8 zeros; 8: scales on a per-row 8-bit grid, 4-bit zeros
    codebook: str = "uniform"  # kmeans: symmetric non-uniform levels fitted per layer, no zero-points

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise QuantError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.scale_bits not in SCALE_BITS:
            raise QuantError(f"scale bits must be one of {SCALE_BITS}, got {self.scale_bits}")
        if self.scale_bits == 8 and self.bits > 4:
            raise QuantError(f"8-bit scales store 4-bit zero-points: they need bits <= 4, got {self.bits}")
        if self.group_size != -1 and self.group_size not in SUPPORTED_GROUP_SIZES:
            raise QuantError(
                f"group size must be one of {SUPPORTED_GROUP_SIZES} or -1 (per-channel), got {self.group_size}"
            )
        if self.clip not in CLIP_METHODS:
            raise QuantError(f"clip must be one of {CLIP_METHODS}, got {self.clip!r}")
        if self.codebook not in CODEBOOKS:
            raise QuantError(f"codebook must be one of {CODEBOOKS}, got {self.codebook!r}")
        if self.codebook != "uniform" and (self.scale_bits != 8 or self.bits > 4):
            raise QuantError(
                f"the {self.codebook} codebook takes 2-4-bit codes with 8-bit scales (--scale-bits 8); got "
                f"{self.bits}-bit codes with {self.scale_bits}-bit scales"
            )
        if self.vector_dim == 3 and self.bits > 3:  # 2^12 entries of 3 values a layer: more than the codes save
            raise QuantError(f"the vq3 codebook takes 2-3-bit codes; got {self.bits}")
        if self.group_size != -1 and self.group_size % self.vector_dim:  # (-1: checked per layer, codebook_levels)
            raise QuantError(f"the {self.codebook} codebook needs a group size that is a multiple of "
                             f"{self.vector_dim}; got {self.group_size}")

    @property
    def vector_dim(self) -> int:
        return codebook_dim(self.codebook)

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def group_for(self, in_features: int) -> int:
        """The group size actually used for a layer with ``in_features`` inputs.

        When the requested group does not divide the width (SmolLM2: 576 is not a multiple of 128),
        the largest supported group that divides both the request and the width is used instead, so groups never
        straddle rows (and a vq3 request of 96 falls back to 48, a multiple of 3 still, before 32).
        """
        if self.group_size == -1 or self.group_size == in_features:
            return in_features
        for g in sorted((g for g in SUPPORTED_GROUP_SIZES if self.group_size % g == 0), reverse=True):
            if in_features % g == 0:
                return g
        raise QuantError(
            f"group size {self.group_size} fits no group of a layer with {in_features} inputs "
            f"(needs a divisor among {SUPPORTED_GROUP_SIZES}); use --group-size -1 (per-channel)"
        )


def codebook_dim(codebook: str) -> int:
    """How many consecutive weights one entry of a ``codebook`` (a name of CODEBOOKS) covers: 1 but for vq2, vq3."""
    return int(codebook[2:]) if codebook.startswith("vq") else 1


Snap = Callable[[torch.Tensor], torch.Tensor]  # a scale -> the nearest one storage holds (ScaleGrid.snap)


def _minmax_params(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool, snap: Snap | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    maxq = 2**bits - 1
    if sym:
        amax = torch.maximum(xmin.abs(), xmax.abs())
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        xmin = torch.minimum(xmin, torch.zeros_like(xmin))  # keep 0 representable
        xmax = torch.maximum(xmax, torch.zeros_like(xmax))
        scale = (xmax - xmin) / maxq
        zero = None
    # round now to what storage holds (fp16, or the row's 8-bit grid) so codes are computed with the stored scale
    scale = scale.clamp(min=1e-8)
    scale = scale.to(torch.float16).to(torch.float32) if snap is None else snap(scale)
    if zero is None:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    levels: torch.Tensor | None = None,
    metric: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integer codes (as float) of ``w`` given per-row ``scale``/``zero`` broadcastable to it (with a codebook's
    ``levels``: the nearest level's index, for vector levels in ``metric``'s norm; ``zero`` is unused)."""
    if levels is not None:
        return encode(w / scale, levels, metric).float()
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def dequantize_codes(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: torch.Tensor | None = None
) -> torch.Tensor:
    if levels is not None:
        return decode(q, levels) * scale
    return (q - zero) * scale


def find_params(
    w: torch.Tensor,
    spec: QuantSpec,
    grid: int = 40,
    max_shrink: float = 0.75,
    snap: Snap | None = None,
    levels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero (each ``[rows, 1]``, float32) for one group of columns ``w`` of shape ``[rows, cols]``.

    With ``clip="mse"`` the range is shrunk by factors in ``[1 - max_shrink, 1]`` and, per row, the
    factor with the lowest ``sum |w - deq(q(w))|^2.4`` is kept (the norm GPTQ's reference search uses;
    on ties the widest range). Factors are tried together, in chunks of about 4M elements computed in place
    in one buffer: GPTQ calls this for every group, where a loop over factors cost hundreds of small kernel
    launches and fresh temporaries cost most of an 8B-shaped block's time in page faults. ``snap`` stands for the
    fp16 rounding of the scale (8-bit scales: the rows' grids), in the search too. With a codebook's ``levels``
    the scale is searched over shrinks of ``max|w|`` (:func:`quant.numerics.codebook.codebook_scale`); zeros are 0.
    """
    w = w.float()
    if levels is not None:
        s = codebook_scale(w, levels, snap or (lambda x: x.to(torch.float16).float()))
        return s, torch.zeros_like(s)
    xmin = w.min(dim=1, keepdim=True).values
    xmax = w.max(dim=1, keepdim=True).values
    if spec.clip == "minmax":
        return _minmax_params(xmin, xmax, spec.bits, spec.sym, snap)
    shrink = torch.tensor([1 - max_shrink * i / grid for i in range(grid + 1)], device=w.device)
    chunk = max(1, (1 << 22) // max(w.numel(), 1))
    best = pick = None
    with torch.no_grad():  # the search picks a factor per row; the range below is built (with grad) from it
        wd, lo, hi = w.detach(), xmin.detach(), xmax.detach()
        buf = torch.empty(min(chunk, grid + 1), *w.shape, device=w.device)  # reused: fresh ones cost page faults
        for c0 in range(0, grid + 1, chunk):
            p = shrink[c0 : c0 + chunk, None, None]
            s, z = _minmax_params(p * lo, p * hi, spec.bits, spec.sym, snap)  # [factors, rows, 1]
            t = torch.div(wd, s, out=buf[: p.shape[0]])  # |w - deq(q(w))|^2.4 as quantize/dequantize_codes do
            err = t.round_().add_(z).clamp_(0, 2**spec.bits - 1).sub_(z).mul_(s).sub_(wd).abs_().pow_(2.4).sum(-1)
            err, i = err.min(0)  # the first (widest) factor among equals, as a strict-improvement scan keeps
            if best is None:
                best, pick = err, i + c0
                continue
            better = err < best
            best, pick = torch.where(better, err, best), torch.where(better, i + c0, pick)
    p = shrink[pick][:, None]
    return _minmax_params(p * xmin, p * xmax, spec.bits, spec.sym, snap)


@dataclass
class QuantizedWeight:
    """Unpacked result of quantizing one weight matrix: codes ``[out, in]`` and per-group params ``[out, G]``."""

    codes: torch.Tensor  # uint8
    scales: torch.Tensor  # float16
    zeros: torch.Tensor  # uint8
    bits: int
    group_size: int  # effective group size for this layer
    scale_grid: ScaleGrid | None = None  # 8-bit scales: every scale is a point of its row's grid
    levels: torch.Tensor | None = None  # a codebook's levels (codes index them; zeros unused)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight(self.codes, self.scales, self.zeros, self.group_size, dtype, self.levels)


def dequantize_weight(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
    levels: torch.Tensor | None = None,
) -> torch.Tensor:
    out, n = codes.shape
    if levels is not None:
        g = decode(codes, levels).view(out, n // group_size, group_size)
        return (g * scales.float()[..., None]).view(out, n).to(dtype)
    g = codes.float().view(out, n // group_size, group_size)
    w = (g - zeros.float()[..., None]) * scales.float()[..., None]
    return w.view(out, n).to(dtype)


def check_finite(w: torch.Tensor, name: str) -> None:
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise QuantError(f"{name} has {bad} NaN/Inf weight(s); refusing to quantize a broken model")


def codebook_levels(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor | None:
    """The layer's codebook levels for ``w`` ``[out, in]`` (None for uniform levels)."""
    if spec.codebook == "uniform":
        return None
    g, d = spec.group_for(w.shape[1]), spec.vector_dim
    if d == 1:
        return fit_levels(w, spec.bits, g)
    if g % d:
        raise QuantError(f"the {spec.codebook} codebook needs a group size that is a multiple of {d}; got {g}")
    return fit_vectors(w, spec.bits, g, d)


def scale_grid(w: torch.Tensor, spec: QuantSpec, levels: torch.Tensor | None = None) -> ScaleGrid | None:
    """With 8-bit scales, each row's grid, fitted to the scales its groups of ``w`` ``[out, in]`` would get in
    fp16 (the solvers then keep every scale on it); None with fp16 scales."""
    if spec.scale_bits == 16:
        return None
    out, n = w.shape
    g = spec.group_for(n)
    scale, _ = find_params(w.detach().float().reshape(out * (n // g), g), spec, levels=levels)
    return ScaleGrid.fit(scale.reshape(out, n // g))


def quantize_rtn(w: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest, group by group."""
    out, n = w.shape
    g = spec.group_for(n)
    groups = w.float().reshape(out * (n // g), g)  # every (row, group) pair is an independent row here
    levels = codebook_levels(w, spec)
    sg = scale_grid(w, spec, levels)
    scale, zero = find_params(groups, spec, snap=None if sg is None else sg.rows(n // g).snap, levels=levels)
    codes = quantize_codes(groups, scale, zero, spec.bits, levels)
    return QuantizedWeight(
        codes=codes.reshape(out, n).to(torch.uint8),
        scales=scale.reshape(out, n // g).to(torch.float16),
        zeros=zero.reshape(out, n // g).to(torch.uint8),
        bits=spec.bits,
        group_size=g,
        scale_grid=sg,
        levels=levels,
    )
