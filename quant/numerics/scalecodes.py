"""8-bit group scales (double quantization): every count of the bit budget spent on codes, not on fp16 scales.

A row's group scales become uint8 codes on a logarithmic grid of its own,

    scale(c) = fp16(base * 2 ** (c * step)),   c in 0..255,

with ``base`` (the row's smallest scale) and ``step`` (its log2 range over 255) stored in fp16, two per row,
and the integer zero-points (at most 4 bits wide for 2-4-bit codes) packed two per byte; the layer's codes are
packed densely too (``ScaleCodedLinear``). At 3 bits and group 64 that is 3 + 8/64 + 4/64 bits per weight plus
32 bits per row: 3.24 on SmolLM2's shapes, against 3.6 with fp16 scales, uint8 zeros and rowpack's 3.2-bit codes.
A log grid keeps the relative error the same for small and large scales (half a step:
0.3% for a row whose scales span 4x), where a linear one (bitsandbytes' absmax) loses small scales first; a row's
range is capped at 2^16 (smaller scales are raised to it), so one all-zero group cannot coarsen its row.

The solvers compute codes with the scale as it will be stored: :func:`fit` makes a row's grid from its
scales, and :meth:`ScaleGrid.snap` replaces the fp16 rounding of a scale by the nearest grid point
(``quant.numerics.grid.find_params``). Decoding is in float64 on the CPU, so it gives the same fp16 values
wherever the checkpoint is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_BITS = (16, 8)  # fp16 scales with uint8 zeros, or the 8-bit grid here with 4-bit zeros
LEVELS = 255  # the highest code
MAX_OCTAVES = 16.0  # a row's scales span at most 2^16
# The smallest step (log2): half of it exceeds fp16's rounding of a decoded scale (2^-11 relative, 0.0007 in
# log2), so every grid point encodes back to its own code; a row whose scales span less than one octave then
# uses fewer than 256 codes (the error stays below half of 2^-8: 0.14%).
MIN_STEP = 2.0**-8


def _fp16_up(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to an fp16 value no smaller than it (the step: the grid must reach the row's largest scale)."""
    h = x.to(torch.float16)
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h).float()


@dataclass
class ScaleGrid:
    """Per-row grids: ``base`` and ``step`` ``[rows, 1]`` float32 tensors holding fp16 values."""

    base: torch.Tensor
    step: torch.Tensor

    @classmethod
    def fit(cls, scales: torch.Tensor) -> ScaleGrid:
        """The grid of each row of ``scales`` ``[rows, groups]`` (positive): from its smallest to its largest."""
        s = scales.detach().double().clamp(min=1e-8)
        hi = s.max(dim=1, keepdim=True).values
        lo = torch.maximum(s.min(dim=1, keepdim=True).values, hi * 2.0**-MAX_OCTAVES)
        base = lo.to(torch.float16).float().clamp(min=2.0**-24)  # fp16's smallest positive value
        step = _fp16_up((torch.log2(hi) - torch.log2(base.double())).float() / LEVELS).clamp(min=MIN_STEP)
        return cls(base.cpu(), step.cpu())

    @classmethod
    def from_stored(cls, stored: torch.Tensor) -> ScaleGrid:
        """From the checkpoint's fp16 ``[rows, 2]`` (base, step)."""
        return cls(stored[:, :1].float().cpu(), stored[:, 1:].float().cpu())

    def stored(self) -> torch.Tensor:
        return torch.cat([self.base, self.step], 1).to(torch.float16)

    def rows(self, n: int) -> ScaleGrid:
        """Each row's grid repeated ``n`` times (one row per (row, group) pair, as RTN flattens them)."""
        return ScaleGrid(self.base.repeat_interleave(n, 0), self.step.repeat_interleave(n, 0))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """fp16 scales of uint8 ``codes`` ``[rows, groups]``."""
        c = codes.detach().cpu().double()
        return (self.base.double() * torch.exp2(c * self.step.double())).to(torch.float16).to(codes.device)

    def encode(self, scales: torch.Tensor) -> torch.Tensor:
        """The nearest code (in log2) of every scale, clamped to the row's grid; uint8, shaped like ``scales``."""
        s = scales.detach().cpu().double().clamp(min=1e-30)
        step = self.step.double()
        steps = (torch.log2(s) - torch.log2(self.base.double())) / torch.where(step > 0, step, torch.ones_like(step))
        return steps.round().clamp(0, LEVELS).to(torch.uint8).to(scales.device)

    def snap(self, scales: torch.Tensor) -> torch.Tensor:
        """``scales`` (``[..., rows, 1]``, one per row) moved to their rows' nearest grid point, float32."""
        shape = scales.shape
        flat = scales.reshape(-1, shape[-2]).T  # [rows, k]
        return self.decode(self.encode(flat)).T.reshape(shape).float()


def pack_nibbles(z: torch.Tensor) -> torch.Tensor:
    """uint8 ``[rows, n]`` values below 16 -> ``[rows, ceil(n / 2)]``, even columns in the low nibble."""
    if z.shape[1] % 2:
        z = torch.cat([z, z.new_zeros(z.shape[0], 1)], 1)
    z = z.to(torch.uint8)
    return z[:, 0::2] | (z[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: ``[rows, n]`` uint8."""
    both = torch.stack([packed & 0xF, packed >> 4], dim=2)
    return both.reshape(packed.shape[0], -1)[:, :n].contiguous()
