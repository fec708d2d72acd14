"""Codebook codes (format codebook-dq8): each layer's own levels, the solvers, fine-tuning, checkpoints, exporters."""


import pytest
import torch
import torch.nn.functional as F

import kernels_cuda
from quant import GPTQConfig, QuantContext, QuantError, load_quantized, run_pipeline
from quant.formats.checkpoint import save_quantized
from quant.formats.gptq_format import export_gptq
from quant.methods.d2quant import D2QuantConfig
from quant.methods.finetune import Tunable
from quant.methods.gptq import gptq_quantize
from quant.numerics.codebook import fit_levels
from quant.numerics.grid import QuantSpec, quantize_rtn
from quant.runtime.quantlinear import CodebookLinear, QuantLinear, quantized_sizes
from tests.test_scale_codes import _quantize, check_reload_and_version

UNIFORM = QuantSpec(3, 64, scale_bits=8)
KMEANS = QuantSpec(3, 64, scale_bits=8, codebook="kmeans")


def _gaussian(out=96, n=256, seed=0):
    return torch.randn(out, n, generator=torch.Generator().manual_seed(seed)) * 0.02


def test_levels_are_sorted_fp16_and_fit_gaussian_weights_denser_near_zero():
    levels = fit_levels(_gaussian(), 3, 64)
    assert levels.shape == (8,) and torch.equal(levels, levels.sort().values)
    assert torch.equal(levels, levels.half().float())
    gaps = levels.diff()
    assert gaps[3] < gaps[0] and gaps[3] < gaps[-1]  # Gaussian groups: finer steps in the middle than at the tails


def test_kmeans_codes_beat_uniform_codes_with_fewer_bytes():
    w = _gaussian()
    uni, km = quantize_rtn(w, UNIFORM), quantize_rtn(w, KMEANS)
    err_u = (uni.dequantize() - w).pow(2).mean()
    err_k = (km.dequantize() - w).pow(2).mean()
    assert err_k < 0.97 * err_u  # 4% on Gaussian groups
    layer_u, layer_k = QuantLinear.from_quantized(uni), QuantLinear.from_quantized(km)
    assert isinstance(layer_k, CodebookLinear)
    bits_u = quantized_sizes(torch.nn.Sequential(layer_u))["bits_per_weight"]
    bits_k = quantized_sizes(torch.nn.Sequential(layer_k))["bits_per_weight"]
    # no zero-points (4 bits a group); the levels cost 8 fp16 values a layer
    assert bits_k == pytest.approx(bits_u - 4 / 64 + 8 * 16 / w.numel(), abs=1e-3)
    torch.testing.assert_close(layer_k.dequantize(), km.dequantize())


def test_gptq_with_a_codebook_lowers_the_output_error():
    gen = torch.Generator().manual_seed(1)
    w = _gaussian(seed=2)
    x = torch.randn(2048, 256, generator=gen) @ (torch.eye(256) + 0.3 * torch.randn(256, 256, generator=gen) / 16)
    H = x.T @ x
    errs = {}
    for name, spec in (("uniform", UNIFORM), ("kmeans", KMEANS)):
        e = gptq_quantize(w, H, spec).dequantize() - w
        errs[name] = float(torch.einsum("oi,ij,oj->", e, H, e))
    assert errs["kmeans"] < 0.95 * errs["uniform"]


def test_codebook_needs_8bit_scales_and_a_known_name():
    with pytest.raises(QuantError, match="--scale-bits 8"):
        QuantSpec(3, 64, codebook="kmeans")
    with pytest.raises(QuantError, match="codebook must be one of"):
        QuantSpec(3, 64, scale_bits=8, codebook="nf4")


def test_tuning_a_codebook_layer_starts_at_its_weight_and_moves_along_the_levels():
    layer = QuantLinear.from_quantized(quantize_rtn(_gaussian(), KMEANS))
    t = Tunable(layer, rounding=True)
    w0 = t.weight()
    torch.testing.assert_close(w0, layer.dequantize())
    x = torch.randn(4, 256)
    F.linear(x, t.weight()).pow(2).sum().backward()
    assert t.v.grad.abs().sum() > 0 and t.a.grad.abs().sum() > 0  # the levels' slope carries the gradient
    with torch.no_grad():
        t.a.fill_(0.1)
        t.v.fill_(0.49)  # under half a step: the codes stay
    codes = layer.codes().clone()
    t.harden()
    assert torch.equal(layer.codes(), codes)
    ratio = layer.scales.float() / QuantLinear.from_quantized(quantize_rtn(_gaussian(), KMEANS)).scales.float()
    assert ratio.mean() == pytest.approx(1.1, abs=0.01)  # the trained scale factor, on the row's 8-bit grid


def test_a_codebook_layer_matches_its_weight_with_and_without_the_kernel():
    layer = QuantLinear.from_quantized(quantize_rtn(_gaussian(), KMEANS))
    x = torch.randn(2, 256)  # decoding-sized: the CPU kernel where it builds (tests/test_kernels_cpu.py checks it runs)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize()))
        with kernels_cuda.disabled():
            torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize()))


def _saved_gptq(tmp_path, model, tokenizer, calib, bits: int):
    qc = _quantize(model, tokenizer, "gptq", GPTQConfig(bits=bits, group_size=32, scale_bits=8, codebook="kmeans"),
                   calib)
    return save_quantized(model, tokenizer, tmp_path / "q", qc)


def test_codebook_checkpoint_reloads_bit_exactly_as_version_3(tmp_path, tiny_llama, tokenizer, calib):
    config = D2QuantConfig(bits=3, group_size=32, scale_bits=8, codebook="kmeans", dsq=False)
    qc = _quantize(tiny_llama, tokenizer, "d2quant", config, calib)
    check_reload_and_version(tmp_path, tiny_llama, tokenizer, qc, "codebook-dq8", 3, CodebookLinear)


def test_corrupt_levels_are_refused(tmp_path, tiny_llama, tokenizer, calib):
    from tests.test_load_checks import rewrite

    out = _saved_gptq(tmp_path, tiny_llama, tokenizer, calib, 3)

    def poison(state):
        state["model.layers.1.self_attn.o_proj.levels"][2] = float("nan")

    rewrite(out, poison)
    with pytest.raises(QuantError, match="o_proj.levels holds NaN or Inf"):
        load_quantized(out)


def test_gptq_export_refuses_codebook_codes(tmp_path, tiny_llama, tokenizer, calib):
    out = _saved_gptq(tmp_path, tiny_llama, tokenizer, calib, 4)
    with pytest.raises(QuantError, match="codebook codes"):
        export_gptq(out, tmp_path / "g")
    assert not (tmp_path / "g").exists()


def test_finetune_tunes_codebook_layers_and_the_result_reloads(tmp_path, tokenizer):
    from calibrate import calibration_windows
    from quant.methods.finetune import FinetuneConfig
    from tests.conftest import tiny_model

    ids = calibration_windows(tokenizer, "c4", 8, 64, seed=0)
    model = tiny_model("llama", seed=4)
    ctx = QuantContext(model, tokenizer=tokenizer, calib_ids=ids, progress=False)
    tune = FinetuneConfig(mode="both", steps=6, e2e_steps=4, rounding=True, eval_every=2, holdout=0.25)
    records = run_pipeline(ctx, [("gptq", GPTQConfig(bits=3, group_size=32, scale_bits=8, codebook="kmeans")),
                                 ("finetune", tune)])
    summary = records[1]["summary"]
    assert summary["blocks"] == 2
    assert all(a <= b for b, a in zip(summary["held_loss_before"], summary["held_loss_after"], strict=True))
    assert all(isinstance(model.get_submodule(n), CodebookLinear) for n in ctx.modules)
    out = save_quantized(model, tokenizer, tmp_path / "ck", {"method": "gptq", "modules": ctx.modules,
                                                              "passes": records})
    again, _ = load_quantized(out)
    with torch.no_grad():
        assert torch.equal(again(ids[:2]).logits, model(ids[:2]).logits)
