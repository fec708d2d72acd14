"""NSDS scoring: the math pieces against references, GQA handling, and the direction of the score."""

import numpy as np
import pytest
import torch
from conftest import tiny_model
from scipy import stats

from quant.methods.nsds import (
    ROLES,
    _dense_svd,
    _product_svd,
    excess_kurtosis,
    kept_rank,
    mad_sigmoid,
    nsds_scores,
    soft_or,
    spectral_capacity,
)


def test_kurtosis_matches_scipy():
    g = torch.Generator().manual_seed(0)
    for x in (torch.randn(500, generator=g), torch.distributions.Laplace(0, 1).sample((4000,)), torch.rand(300)):
        ref = stats.kurtosis(x.double().numpy(), fisher=True, bias=True)
        assert excess_kurtosis(x).item() == pytest.approx(ref, rel=1e-9)
    cols = torch.randn(50, 7, generator=g)
    ref = stats.kurtosis(cols.double().numpy(), axis=0, fisher=True, bias=True)
    np.testing.assert_allclose(excess_kurtosis(cols, 0).numpy(), ref, rtol=1e-9)


def test_low_rank_and_gram_spectra_match_dense_svd():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(96, 16, generator=g), torch.randn(16, 96, generator=g)
    s, u, v = _product_svd(a, b, energy=1.0)
    ref = torch.linalg.svdvals((a @ b).double())[:16]
    torch.testing.assert_close(s, ref[: s.numel()])
    # the vectors reconstruct the product's action on the kept subspace
    torch.testing.assert_close(a.double() @ b.double() @ v, u * s, rtol=1e-8, atol=1e-8)
    w = torch.randn(200, 48, generator=g)
    gram = w.double().T @ w.double()  # both calls below take the 48-wide side: its Gram matrix
    for side in ("right", "left"):
        s, vecs = _dense_svd(w if side == "right" else w.T, side, energy=1.0)
        torch.testing.assert_close(s, torch.linalg.svdvals(w.double())[: s.numel()], rtol=1e-7, atol=1e-7)
        # the vectors are the singular vectors of those values, in the same order, orthonormal; float64 eigh
        # leaves residuals of ~n·eps·‖G‖ = 48 · 2e-16 · 400 ≈ 4e-12
        assert vecs.shape == (48, s.numel())
        torch.testing.assert_close(gram @ vecs, vecs * s**2, rtol=0, atol=1e-9)
        torch.testing.assert_close(vecs.T @ vecs, torch.eye(s.numel(), dtype=torch.float64), rtol=0, atol=1e-12)


def test_kept_rank_energy_rule():
    # the smallest k whose top-k squares hold the energy: energies 9, 13, 14 of 14.01 -> 13/14.01 = 0.928 < 0.99
    # and 14/14.01 = 0.9993 >= 0.99, so 3; one more or one fewer is what an off-by-one in the rule gives
    assert kept_rank(torch.tensor([3.0, 2.0, 1.0, 0.1]), 0.99) == 3
    assert kept_rank(torch.tensor([3.0, 2.0, 1.0, 0.1]), 0.92) == 2  # 0.928 >= 0.92
    assert kept_rank(torch.tensor([1.0, 1.0, 1.0, 1.0, 0.01]), 0.99) == 4  # 4 / 4.0001 holds it; 3/4 does not
    assert kept_rank(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.99) == 4
    assert kept_rank(torch.tensor([5.0, 0.0, 0.0]), 0.5) == 2  # rank 1 holds it all: the minimum of 2 applies
    assert kept_rank(torch.tensor([10.0, 1.0, 0.1, 0.01]), 0.99) == 2  # 100/101.01 = 0.98999..: the second


def test_spectral_capacity_is_magnitude_over_effective_rank():
    s = torch.tensor([3.0, 3.0, 3.0])
    assert spectral_capacity(s, torch.ones(3)) == pytest.approx(9.0 / 3.0)  # flat spectrum: effective rank 3
    assert spectral_capacity(torch.tensor([4.0, 0.0]), torch.ones(2)) == pytest.approx(4.0)  # rank 1
    assert spectral_capacity(s, torch.zeros(3)) == 0.0


def test_mad_sigmoid_and_soft_or():
    x = torch.tensor([[1.0], [2.0], [3.0], [10.0], [2.5]])
    p = mad_sigmoid(x)[:, 0]
    assert p[4] == pytest.approx(0.5)  # the median maps to 0.5
    # median 2.5, MAD = median(|x - 2.5|) = median(1.5, 0.5, 0.5, 7.5, 0) = 0.5; z = (x - 2.5) / (1.4826 · 0.5) / T
    for t in (1.0, 2.0):
        ref = 1 / (1 + np.exp(-(np.array([1.0, 2.0, 3.0, 10.0, 2.5]) - 2.5) / (1.4826 * 0.5) / t))
        np.testing.assert_allclose(mad_sigmoid(x, temperature=t)[:, 0].numpy(), ref, rtol=1e-6)
    # an even count: the median is the mean of the middle two, 2.5 here again (MAD = 1)
    ref = 1 / (1 + np.exp(-(np.array([1.0, 2.0, 3.0, 10.0]) - 2.5) / 1.4826))
    np.testing.assert_allclose(mad_sigmoid(x[:4])[:, 0].numpy(), ref, rtol=1e-6)
    probs = torch.tensor([[0.1, 0.9, 0.5], [0.2, 0.2, 0.2]])
    out = soft_or(probs, 1)
    assert out.shape == (2,)  # one score per layer (the released code returns a scalar)
    ref = 1 - torch.exp(torch.log(1 - probs).mean(1))
    torch.testing.assert_close(out, ref)


def test_scores_on_gqa_model_and_outlier_layer_ranks_first():
    model = tiny_model(num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2)
    sc = nsds_scores(model)
    assert sc.raw.shape == (6, len(ROLES), 2) and torch.isfinite(sc.raw).all()
    # the QK circuit's NV: mean over query heads h of the kurtosis of W_Q^hᵀ W_K^{kv(h)}, kv(h) = h // 2 here
    for i, layer in enumerate(model.model.layers):
        wq, wk = (layer.self_attn.get_submodule(f"{r}_proj").weight.detach().double() for r in "qk")
        per_head = [
            stats.kurtosis((wq[16 * h : 16 * h + 16].T @ wk[16 * (h // 2) : 16 * (h // 2) + 16]).numpy().ravel())
            for h in range(4)
        ]
        assert sc.raw[i, ROLES.index("qk"), 0].item() == pytest.approx(np.mean(per_head), rel=1e-6)
    # the aggregation, from the raw values by the documented formulas (numpy, float64)
    raw = sc.raw.double().numpy()
    med = np.median(raw, 0)
    prob = 1 / (1 + np.exp(-(raw - med) / (1.4826 * np.median(np.abs(raw - med), 0) + 1e-12)))
    np.testing.assert_allclose(sc.prob.numpy(), prob, rtol=1e-5, atol=1e-6)

    def ref_or(p, axis):
        return 1 - np.exp(np.log(1 - p).mean(axis))

    np.testing.assert_allclose(sc.role_score.numpy(), ref_or(prob, 2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sc.layer_score.numpy(), ref_or(ref_or(prob, 1), 1), rtol=1e-5, atol=1e-6)
    # heavy-tailed weights in one block's down_proj and up_proj: that block must rank most sensitive
    with torch.no_grad():
        for name in ("down_proj", "up_proj", "gate_proj"):
            w = getattr(model.model.layers[3].mlp, name).weight
            w[::7, ::5] *= 40
    sc = nsds_scores(model)
    assert sc.ranking()[0] == 3
    assert sc.prob[3, ROLES.index("down"), 0] == sc.prob[:, ROLES.index("down"), 0].max()


def test_smollm2_scores(smollm2):
    lm = smollm2.model
    sc = nsds_scores(lm)
    assert sc.raw.shape == (30, 5, 2) and torch.isfinite(sc.raw).all()
    rank = sc.ranking()
    assert torch.all(sc.layer_score[rank].diff() <= 0)  # most sensitive first
    # k_U: the smallest k whose top-k singular values of the unembedding hold 99% of its energy
    e = torch.linalg.svdvals(lm.lm_head.weight.detach().double()).pow(2).cumsum(0)
    assert sc.hidden == 576 and sc.unembed_rank == int((e < 0.99 * e[-1]).sum()) + 1
    # the dense roles' NV on real weights: the excess kurtosis of the whole matrix (scipy's)
    for layer in (0, 17):
        mlp = lm.model.layers[layer].mlp
        for role in ("up", "gate", "down"):
            ref = stats.kurtosis(getattr(mlp, f"{role}_proj").weight.detach().double().numpy().ravel())
            assert sc.raw[layer, ROLES.index(role), 0].item() == pytest.approx(ref, rel=1e-6), (layer, role)


def test_scores_are_deterministic():
    model = tiny_model(num_hidden_layers=4)
    a, b = nsds_scores(model), nsds_scores(model)
    assert torch.equal(a.raw, b.raw) and torch.equal(a.layer_score, b.layer_score)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_every_supported_architecture_scores(model_type):
    sc = nsds_scores(tiny_model(model_type, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1))
    assert sc.layer_score.shape == (4,) and torch.isfinite(sc.raw).all() and (sc.raw[:, :, 1] > 0).all()
