"""NSDS scoring: the math pieces against references, GQA handling, and the direction of the score."""

import numpy as np
import pytest
import torch
from conftest import tiny_model
from scipy import stats

from quant.nsds import (
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
    for side in ("right", "left"):
        s, vecs = _dense_svd(w if side == "right" else w.T, side, energy=1.0)
        torch.testing.assert_close(s, torch.linalg.svdvals(w.double())[: s.numel()], rtol=1e-7, atol=1e-7)
        assert vecs.shape[0] == 48


def test_kept_rank_energy_rule():
    s = torch.tensor([10.0, 1.0, 0.1, 0.01])
    assert kept_rank(s, 0.99) == 2  # 100/101.01 < 0.99 needs the second; minimum 2 anyway
    assert kept_rank(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.99) == 4
    assert kept_rank(torch.tensor([5.0, 0.0, 0.0]), 0.5) == 2


def test_spectral_capacity_is_magnitude_over_effective_rank():
    s = torch.tensor([3.0, 3.0, 3.0])
    assert spectral_capacity(s, torch.ones(3)) == pytest.approx(9.0 / 3.0)  # flat spectrum: effective rank 3
    assert spectral_capacity(torch.tensor([4.0, 0.0]), torch.ones(2)) == pytest.approx(4.0)  # rank 1
    assert spectral_capacity(s, torch.zeros(3)) == 0.0


def test_mad_sigmoid_and_soft_or():
    x = torch.tensor([[1.0], [2.0], [3.0], [10.0], [2.5]])
    p = mad_sigmoid(x)[:, 0]
    assert p[4] == pytest.approx(0.5)  # the median maps to 0.5
    assert torch.all(p[torch.argsort(x[:, 0])].diff() > 0)  # monotone
    probs = torch.tensor([[0.1, 0.9, 0.5], [0.2, 0.2, 0.2]])
    out = soft_or(probs, 1)
    assert out.shape == (2,)  # one score per layer (the released code returns a scalar)
    ref = 1 - torch.exp(torch.log(1 - probs).mean(1))
    torch.testing.assert_close(out, ref)


def test_scores_on_gqa_model_and_outlier_layer_ranks_first():
    model = tiny_model(num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2)
    sc = nsds_scores(model)
    assert sc.raw.shape == (6, len(ROLES), 2) and torch.isfinite(sc.raw).all()
    assert ((sc.layer_score > 0) & (sc.layer_score < 1)).all()
    # heavy-tailed weights in one block's down_proj and up_proj: that block must rank most sensitive
    with torch.no_grad():
        for name in ("down_proj", "up_proj", "gate_proj"):
            w = getattr(model.model.layers[3].mlp, name).weight
            w[::7, ::5] *= 40
    sc = nsds_scores(model)
    assert sc.ranking()[0] == 3
    assert sc.prob[3, ROLES.index("down"), 0] == sc.prob[:, ROLES.index("down"), 0].max()


def test_smollm2_scores(smollm2):
    sc = nsds_scores(smollm2.model)
    assert sc.raw.shape == (30, 5, 2) and torch.isfinite(sc.raw).all()
    rank = sc.ranking()
    assert sorted(rank) == list(range(30))
    assert torch.all(sc.layer_score[rank].diff() <= 0)  # most sensitive first
    assert 2 <= sc.unembed_rank <= sc.hidden == 576
    assert torch.equal(nsds_scores(smollm2.model).layer_score, sc.layer_score)  # deterministic


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_every_supported_architecture_scores(model_type):
    sc = nsds_scores(tiny_model(model_type, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1))
    assert sc.layer_score.shape == (4,) and torch.isfinite(sc.raw).all() and (sc.raw[:, :, 1] > 0).all()
