"""Codes are chosen with the scale as stored (fp16), so a reloaded checkpoint computes exactly what the quantizer
meant: recomputed here from the stored scale and zero by the documented formula, on many weights (some sit
within fp16's rounding of a code boundary, where an fp32 scale would pick the other code)."""

import pytest
import torch

from quant.numerics.grid import QuantSpec, quantize_rtn


@pytest.mark.parametrize("bits, sym", [(3, False), (4, False), (4, True), (8, False)])
def test_codes_are_rounded_with_the_stored_fp16_scale(bits, sym):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(512, 256, generator=g) * torch.rand(512, 1, generator=g)
    q = quantize_rtn(w, QuantSpec(bits, 32, sym=sym, clip="minmax"))
    s = q.scales.float().repeat_interleave(32, 1)
    z = q.zeros.float().repeat_interleave(32, 1)
    ref = torch.clamp(torch.round(w / s) + z, 0, 2**bits - 1)
    assert torch.equal(q.codes.float(), ref)
