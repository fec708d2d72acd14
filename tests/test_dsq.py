"""DSQ: the ALS fit, GPTQ integration, the sign-plane format and its checkpoint round trip."""

import pytest
import torch
from conftest import tiny_model

from quant import QuantContext, load_quantized, save_quantized
from quant.methods.dsq import dsq_quantize, fit_dsq
from quant.numerics.grid import QuantSpec, quantize_rtn
from quant.runtime.dsqlinear import DSQLinear


def rel_err(a, b):
    return float((a.double() - b.double()).pow(2).sum() / b.double().pow(2).sum())


def ref_dequantize(codes, r, c=None, group=None):
    """``Ŵ_ij = c_j · Σ_k r_k[i] · (±1)`` from the documented format alone (bit k of a code = plane k's sign,
    1 = +1), in float64; ``r`` is ``[m, K]``, or ``[m, groups, K]`` with ``group`` columns per group."""
    codes = codes.long()
    k = r.shape[-1]
    signs = torch.stack([((codes >> i) & 1) * 2.0 - 1 for i in range(k)]).double()  # [K, m, n]
    r = r.double() if group is None else r.double().repeat_interleave(group, dim=1)  # [m, (n,) K]
    w = torch.einsum("mk,kmn->mn", r, signs) if group is None else torch.einsum("mnk,kmn->mn", r, signs)
    return w if c is None else w * c.double()[None, :]


def _binary_code(bits, m=32, n=64):
    """An exact K-plane code in float64: row scales of distinct magnitudes per plane, column scales, signs."""
    g = torch.Generator().manual_seed(0)
    r = (torch.rand(m, bits, generator=g, dtype=torch.float64) + 0.5) * torch.tensor([4.0, 2.0, 1.0][:bits]).double()
    c = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    b = torch.randint(0, 2, (bits, m, n), generator=g) * 2.0 - 1
    return c[None, :] * torch.einsum("mk,kmn->mn", r, b.double())


def test_recovers_an_exact_two_plane_code():
    w = _binary_code(2)
    p, codes = fit_dsq(w, 2, iters=15)
    # found exactly: what is left is float64 round-off (and the 1e-12 ridge of the normal equations), ~1e-30
    assert rel_err(ref_dequantize(codes, p.r, p.c), w) < 1e-20
    assert (p.r >= 0).all() and (p.c > 0).all()


def test_three_planes_stop_at_a_fixed_point_of_als():
    """From the greedy start, ALS does not find the exact 3-plane code (a local optimum); what it returns is
    still ALS's fixed point: the codes are the nearest candidates, the row scales and the column scales the
    least-squares optimum given the rest, and the error is below the greedy start's."""
    w = _binary_code(3)
    p, codes = fit_dsq(w, 3, iters=15)
    p0, codes0 = fit_dsq(w, 3, iters=0)
    assert rel_err(ref_dequantize(codes, p.r, p.c), w) < rel_err(ref_dequantize(codes0, p0.r, p0.c), w)
    assert (p.r >= 0).all() and (p.c > 0).all()
    # codes: no other of the 8 candidates c_j · Σ_k ±r_k is nearer to w
    every = torch.stack([ref_dequantize(torch.full_like(codes, q), p.r, p.c) for q in range(8)])  # [8, m, n]
    dist = (every - w).abs()
    assert torch.equal(dist.gather(0, codes.long()[None])[0], dist.min(0).values)
    # row scales: per row, the least-squares fit of w_i by the columns c_j · b_k[i, j]
    planes = torch.stack([((codes.long() >> k) & 1) * 2.0 - 1 for k in range(3)]).double()  # [K, m, n]
    r_ls = torch.stack(
        [torch.linalg.lstsq(p.c[:, None] * planes[:, i].T, w[i][:, None]).solution[:, 0] for i in range(w.shape[0])]
    )
    # a fixed point up to float64 round-off in the 3x3 normal equations (~1e-13 here); a step away is >> 1e-9
    torch.testing.assert_close(p.r, r_ls, rtol=0, atol=1e-9)
    # column scales: c_j = Σ_i w_ij S_ij / Σ_i S_ij² with S = Σ_k r_k b_k
    S = torch.einsum("mk,kmn->mn", p.r, planes)
    torch.testing.assert_close(p.c, (w * S).sum(0) / (S * S).sum(0), rtol=1e-12, atol=0)


@pytest.mark.parametrize("bits", [2, 3])
def test_als_improves_on_greedy_and_beats_uniform_on_smollm2_down(smollm2, bits):
    w = smollm2.model.model.layers[12].mlp.down_proj.weight.detach()[:, :128]
    # every ALS step minimises the error over one block of unknowns (row scales, column scales, codes) with the
    # others fixed, so from the greedy start (0 iterations) the error can only fall, iteration after iteration
    errs = [rel_err(ref_dequantize(c, p.r, p.c), w) for p, c in (fit_dsq(w, bits, iters=i) for i in range(16))]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[-1] < errs[0]
    uniform = quantize_rtn(w, QuantSpec(bits, 128, sym=False, clip="mse")).dequantize()
    assert errs[-1] < rel_err(uniform, w)


def test_gptq_feedback_lowers_output_error():
    g = torch.Generator().manual_seed(1)
    n = 256
    w = torch.randn(64, n, generator=g) * (torch.rand(n, generator=g) * 3 + 0.2)
    mix = torch.eye(n) + 0.3 * torch.randn(n, n, generator=g) / n**0.5  # correlated inputs, as in a real layer
    x = (torch.randn(2048, n, generator=g) * (torch.rand(n, generator=g) * 2 + 0.1)) @ mix
    H = x.T @ x
    out = lambda q: rel_err(q.dequantize() @ x.T, w @ x.T)  # noqa: E731
    plain, fed = dsq_quantize(w, None, 2, 64), dsq_quantize(w, H, 2, 64)
    assert out(fed) < 0.9 * out(plain)


def test_sign_planes_round_trip_exactly():
    w = torch.randn(48, 256)
    q = dsq_quantize(w, None, 3, 64)
    m = DSQLinear.from_codes(q.codes, q.row_scales)
    assert torch.equal(m.codes(), q.codes.long())
    # plane k holds bit k of every code, 32 per int32 word: code j at bit j % 32 of word j // 32
    assert m.planes.shape == (3, 48, 8)
    words = m.planes.to(torch.int64) & 0xFFFFFFFF
    bits = ((words[..., None] >> torch.arange(32)) & 1).reshape(3, 48, 256)
    assert torch.equal(bits, torch.stack([(q.codes.long() >> k) & 1 for k in range(3)]))
    # the weight from the format's definition, not from the module's own decoder
    want = ref_dequantize(q.codes, q.row_scales.float(), group=64).float()
    torch.testing.assert_close(m.dequantize(), want)
    torch.testing.assert_close(q.dequantize(with_col_scale=False), want)
    torch.testing.assert_close(q.dequantize(), want * q.col_scale[None, :])
    x = torch.randn(5, 256)
    # 5 tokens take the CPU kernel, which sums in its own float32 order
    torch.testing.assert_close(m(x), x @ want.T, rtol=1e-5, atol=1e-4)


def test_dsq_checkpoint_reload_is_bit_exact(tmp_path, tokenizer):
    model = tiny_model()
    ctx = QuantContext(model, tokenizer, progress=False)
    name = "model.layers.1.mlp.down_proj"
    lin = model.get_submodule(name)
    q = dsq_quantize(lin.weight, None, 2, 32)
    ctx.install(name, DSQLinear.from_codes(q.codes, q.row_scales), sym=True)
    assert ctx.modules[name]["format"] == "dsq"
    out = save_quantized(model, tokenizer, tmp_path / "q", {"method": "test", "modules": ctx.modules})
    m2, _ = load_quantized(out)
    assert isinstance(m2.get_submodule(name), DSQLinear)
    ids = torch.randint(0, 49152, (1, 20))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, m2(ids).logits)
