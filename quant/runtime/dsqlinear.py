"""``DSQLinear``: a linear layer stored in D²Quant's dual-scale (binary-coding) format.

Buffers (saved in the checkpoint under ``<module>.<name>``):

* ``planes``     int32 ``[bits, out, ceil(in / 32)]``: sign plane k, bit 1 = +1, packed 32 per word
                 with the 1-bit ``rowpack-int32-v1`` layout (exactly 1 bit per weight per plane)
* ``row_scales`` fp16  ``[out, in / group_size, bits]``: r_k per (row, group), all >= 0
* ``bias``       (optional) in the model's dtype

The weight is ``W[i, j] = Σ_k r_k[i, j // g] · b_k[i, j]``. DSQ's per-column scale is not stored:
it has been absorbed into the layer that feeds this one (``up_proj`` for a ``down_proj``).
Cost per weight: ``bits + 16 · bits / group_size`` bits (2-bit g128: 2.25; 3-bit g128: 3.375).
"""

from __future__ import annotations

import torch

from quant.methods.dsq import decode
from quant.numerics.packing import pack, packed_width, unpack
from quant.runtime.quantlinear import PackedLinear


class DSQLinear(PackedLinear):
    FORMAT = "dsq"
    STORED = ("planes", "row_scales")

    def _register_weight(self) -> None:
        out, n, k = self.out_features, self.in_features, self.bits
        self.register_buffer("planes", torch.zeros(k, out, packed_width(n, 1), dtype=torch.int32))
        self.register_buffer("row_scales", torch.zeros(out, n // self.group_size, k, dtype=torch.float16))

    @classmethod
    def from_codes(cls, codes: torch.Tensor, row_scales: torch.Tensor, bias: torch.Tensor | None = None) -> DSQLinear:
        """``codes[out, in]`` in ``[0, 2^bits)`` (bit k = plane k's sign), ``row_scales[out, groups, bits]``."""
        out, n = codes.shape
        groups, bits = row_scales.shape[1:]
        dtype = bias.dtype if bias is not None else torch.float32
        m = cls(n, out, bits, n // groups, bias=bias is not None, dtype=dtype)
        c = codes.to(torch.int64)
        for k in range(bits):
            m.planes[k].copy_(pack((c >> k) & 1, 1))
        m.row_scales.copy_(row_scales)
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m

    def codes(self) -> torch.Tensor:
        code = torch.zeros(self.out_features, self.in_features, dtype=torch.int64, device=self.planes.device)
        for k in range(self.bits):
            code |= unpack(self.planes[k], 1, self.in_features).to(torch.int64) << k
        return code

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g, n_groups = self.group_size, self.in_features // self.group_size
        codes = self.codes().view(self.out_features * n_groups, g)
        r = self.row_scales.float().reshape(self.out_features * n_groups, self.bits)
        return decode(codes, r).view(self.out_features, self.in_features).to(dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, format=dsq, bias={self.bias is not None}"
        )
