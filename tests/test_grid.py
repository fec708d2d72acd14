import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from quant.errors import QuantError
from quant.numerics.grid import QuantSpec, check_finite, dequantize_weight, find_params, quantize_rtn


def _weight(seed, rows, cols):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, 0] = 0.4  # an outlier
    if rows > 1:
        w[1] = w[1].abs()  # a row of one sign: 0 must stay representable (its zero-point is 0)
    return w


def ref_params(lo, hi, bits, sym):
    """Scale and zero-point of a range ``[lo, hi]`` as the module docstring defines them, in plain torch."""
    maxq = 2**bits - 1
    if sym:
        s = (2 * torch.maximum(lo.abs(), hi.abs()) / maxq).half().float()  # stored in fp16, rounded first
        return s, torch.full_like(s, 2 ** (bits - 1))
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)  # the grid always holds 0
    s = ((hi - lo) / maxq).half().float()
    return s, torch.round(-lo / s).clamp(0, maxq)


def ref_codes(w, s, z, bits):
    return torch.clamp(torch.round(w / s) + z, 0, 2**bits - 1)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    group=st.sampled_from([32, 64, 128, -1]),
    sym=st.booleans(),
    clip=st.sampled_from(["minmax", "mse"]),
    rows=st.integers(1, 6),
    ngroups=st.integers(1, 4),
    seed=st.integers(0, 2**31),
)
@example(bits=3, group=32, sym=False, clip="minmax", rows=1, ngroups=2, seed=0)  # fp16 scale: 0.502 steps off
def test_quantize_dequantize_roundtrip(bits, group, sym, clip, rows, ngroups, seed):
    cols = 128 * ngroups
    w = _weight(seed, rows, cols)
    spec = QuantSpec(bits, group, sym, clip)
    qw = quantize_rtn(w, spec)
    g = cols if group == -1 else group
    assert qw.group_size == g
    assert qw.codes.shape == (rows, cols) and qw.scales.shape == (rows, cols // g)
    assert int(qw.codes.max()) <= 2**bits - 1 and int(qw.zeros.max()) <= 2**bits - 1
    if sym:
        assert bool((qw.zeros == 2 ** (bits - 1)).all())
    deq = qw.dequantize()
    # every code is w rounded on its group's stored grid: q = clamp(round(w / s) + z, 0, 2^bits - 1)
    s = qw.scales.float().repeat_interleave(g, dim=1)
    z = qw.zeros.float().repeat_interleave(g, dim=1)
    assert torch.equal(ref_codes(w, s, z, bits).to(torch.uint8), qw.codes)
    if clip == "minmax":  # and the grid is the documented one, from each group's min and max
        groups = w.reshape(rows * (cols // g), g)
        s_ref, z_ref = ref_params(groups.min(1).values, groups.max(1).values, bits, sym)
        assert torch.equal(qw.scales.float().reshape(-1), s_ref)
        assert torch.equal(qw.zeros.float().reshape(-1), z_ref)
    if clip == "minmax" and not sym:
        # nothing is clipped: every error is at most half a step, plus what rounding the scale to fp16
        # (relative error <= 2^-11) takes off the grid's span of 2^bits - 1 steps, which one edge may carry
        step = qw.scales.float().repeat_interleave(g, dim=1)
        assert bool(((w - deq).abs() <= step * (0.5 + (2**bits - 1) * 2**-11) + 1e-6).all())


def test_dequantize_matches_formula():
    w = _weight(1, 4, 64)
    qw = quantize_rtn(w, QuantSpec(4, 32, False, "minmax"))
    manual = (qw.codes.float() - qw.zeros.float().repeat_interleave(32, 1)) * qw.scales.float().repeat_interleave(32, 1)
    assert torch.equal(dequantize_weight(qw.codes, qw.scales, qw.zeros, 32), manual)


def test_more_bits_less_error_and_mse_clip_helps():
    w = _weight(2, 64, 256)
    errs = {b: (quantize_rtn(w, QuantSpec(b, 64, clip="minmax")).dequantize() - w).norm() for b in (2, 3, 4, 8)}
    assert errs[8] < errs[4] < errs[3] < errs[2]
    mse = (quantize_rtn(w, QuantSpec(3, 64, clip="mse")).dequantize() - w).norm()
    assert mse < errs[3]


@pytest.mark.parametrize("rows", [96, 9000])  # 9000 x 64 splits the 41 shrink factors into two chunks
@pytest.mark.parametrize("bits,sym", [(2, False), (3, False), (4, True)])
def test_mse_clip_picks_the_first_best_shrink_per_row(rows, bits, sym):
    """The batched search equals a plain scan of the factors that keeps only strict improvements."""
    w = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows + bits)) ** 3  # heavy tails: clipping pays
    spec = QuantSpec(bits, 64, sym, "mse")
    lo, hi = w.min(1, keepdim=True).values, w.max(1, keepdim=True).values
    best = scale = zero = None
    for i in range(41):
        s, z = ref_params((1 - 0.75 * i / 40) * lo, (1 - 0.75 * i / 40) * hi, bits, sym)
        err = (w - (ref_codes(w, s, z, bits) - z) * s).abs().pow(2.4).sum(1)
        better = err < best if best is not None else torch.ones_like(err, dtype=torch.bool)
        best = err if best is None else torch.where(better, err, best)
        scale = s if scale is None else torch.where(better[:, None], s, scale)
        zero = z if zero is None else torch.where(better[:, None], z, zero)
    got_scale, got_zero = find_params(w, spec)
    assert torch.equal(got_scale, scale) and torch.equal(got_zero, zero)
    assert (got_scale < ref_params(lo, hi, bits, sym)[0]).any()  # some rows really were clipped


def test_group_fallback_for_widths_not_divisible():
    spec = QuantSpec(4, 128)
    assert spec.group_for(576) == 64  # SmolLM2 hidden size
    assert spec.group_for(1536) == 128
    assert QuantSpec(4, -1).group_for(576) == 576
    with pytest.raises(QuantError, match="fits no group"):
        spec.group_for(100)
    # the fallback divides the request too: 96 (vq3's runs of 3) falls back to 48 before 32
    assert QuantSpec(3, 96).group_for(576) == 96 and QuantSpec(3, 96).group_for(240) == 48
    assert QuantSpec(3, 96).group_for(32 * 7) == 32 and QuantSpec(3, 192).group_for(640) == 64


@pytest.mark.parametrize("kw", [{"bits": 5}, {"bits": 1}, {"group_size": 100}, {"clip": "foo"}])
def test_invalid_specs(kw):
    with pytest.raises(QuantError):
        QuantSpec(**kw)


def test_nan_weights_rejected():
    w = torch.zeros(2, 32)
    w[1, 3] = float("nan")
    with pytest.raises(QuantError, match="NaN"):
        check_finite(w, "layer")
