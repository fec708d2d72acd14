"""D²Quant pieces: absorption, DAC's bias, the GPTAQ target, and the pass end to end with reload."""

import copy

import pytest
import torch
from conftest import tiny_model

from quant import QuantContext, load_quantized, run_pipeline, save_quantized
from quant.blockwise import BlockRunner
from quant.d2quant import D2QuantConfig, absorb_column_scale, gptaq_target
from quant.dac import add_norm_bias, norm_bias_names
from quant.dsqlinear import DSQLinear
from quant.errors import QuantError
from quant.rotation import RotationConfig


def test_absorption_alone_leaves_the_float_model_unchanged(smollm2):
    mlp = copy.deepcopy(smollm2.model.model.layers[7].mlp).double()  # float64: only the algebra is tested
    x = torch.randn(3, 11, 576, dtype=torch.float64)
    with torch.no_grad():
        ref = mlp(x)
        c = torch.rand(1536, dtype=torch.float64) * 2 + 0.1
        mlp.down_proj.weight.div_(c[None, :])
        absorb_column_scale(mlp.up_proj, c)
        torch.testing.assert_close(mlp(x), ref, rtol=1e-10, atol=1e-10)


def test_dac_bias_is_teacher_minus_student(tiny_llama, calib):
    blocks = tiny_llama.model.layers
    runner = BlockRunner(tiny_llama, blocks, calib[:2, :32], keep_float=True)
    block, fblock = blocks[0], copy.deepcopy(blocks[0])
    norm, fnorm = block.post_attention_layernorm, fblock.post_attention_layernorm
    assert runner.mean_output_gap(block, norm, fblock, fnorm).abs().max() < 1e-6
    add_norm_bias(fnorm, torch.full((64,), 0.2))  # teacher = student + 0.2
    mu = runner.mean_output_gap(block, norm, fblock, fnorm)
    torch.testing.assert_close(mu, torch.full((64,), 0.2), atol=1e-5, rtol=0)
    add_norm_bias(norm, mu)
    assert runner.mean_output_gap(block, norm, fblock, fnorm).abs().max() < 1e-5


def test_gptaq_target_without_drift_is_the_weight():
    x = torch.randn(500, 32)
    H = x.T @ x / 500
    w = torch.randn(8, 32)
    torch.testing.assert_close(gptaq_target(w, H, H.clone(), 0.01), w)
    # with drift and no damping it is the least-squares solution of W x ≈ Ŵ x̃
    xt = x + 0.1 * torch.randn(500, 32)
    Ht, P = xt.T @ xt / 500, x.T @ xt / 500
    ws = gptaq_target(w, Ht.double(), P.double(), 0.0)
    ref = torch.linalg.lstsq(xt.double(), (x @ w.T).double()).solution.T
    torch.testing.assert_close(ws.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"backend": "gptq"},
        {"backend": "rtn", "bits": 2},
        {"dsq": False},
        {"dac": False, "backend": "gptq"},
    ],
)
def test_pass_end_to_end_reloads_exactly(tmp_path, tokenizer, calib, kw):
    model = tiny_model()
    ctx = QuantContext(model, tokenizer, calib_ids=calib[:4, :64], progress=False)
    cfg = D2QuantConfig(group_size=32, **kw)
    run_pipeline(ctx, [("rotate", RotationConfig(mode="groupwise", block=32)), ("d2quant", cfg)])
    down = model.model.layers[1].mlp.down_proj
    assert isinstance(down, DSQLinear) == cfg.dsq
    assert len(ctx.norm_biases) == (2 if cfg.dac else 0) and norm_bias_names(model) == ctx.norm_biases
    qc = {"method": "d2quant", "modules": ctx.modules, "norm_biases": ctx.norm_biases}
    out = save_quantized(model, tokenizer, tmp_path / "q", qc)
    m2, _ = load_quantized(out)
    assert norm_bias_names(m2) == ctx.norm_biases
    ids = torch.randint(0, 49152, (1, 24))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, m2(ids).logits)


def test_bad_backend():
    with pytest.raises(QuantError, match="unknown backend"):
        D2QuantConfig(backend="awq").spec()
