"""Codebook codes (formats codebook-dq8, vq2-dq8, vq3-dq8): each layer's own levels or vector entries, the solvers,
fine-tuning, checkpoints, exporters."""

import json

import pytest
import torch
import torch.nn.functional as F

import kernels_cuda
from quant import GPTQConfig, QuantContext, QuantError, load_quantized, run_pipeline
from quant.formats.checkpoint import save_quantized
from quant.formats.gptq_format import export_gptq
from quant.methods.d2quant import D2QuantConfig
from quant.methods.finetune import FinetuneConfig, Schedule, Tunable, fit
from quant.methods.gptq import gptq_quantize
from quant.numerics.codebook import decode, encode, fit_levels, fit_vectors
from quant.numerics.grid import QuantSpec, quantize_rtn
from quant.runtime.quantlinear import (
    CodebookLinear,
    QuantLinear,
    Vector3CodebookLinear,
    VectorCodebookLinear,
    quantized_sizes,
    storage_bytes,
)
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


VQ2 = QuantSpec(3, 64, scale_bits=8, codebook="vq2")


def test_vector_codes_index_entries_of_runs_of_weights():
    levels = fit_vectors(_gaussian(), 3, 64, 2)
    assert levels.shape == (64, 2) and torch.equal(levels, levels.half().float())
    x = torch.randn(10, 64) * 0.5
    codes = encode(x, levels)
    assert codes.shape == x.shape and int(codes.min()) >= 0 and int(codes.max()) <= 7
    idx = codes.view(-1, 2)[:, 0] + 8 * codes.view(-1, 2)[:, 1]  # the first code is the least significant
    torch.testing.assert_close(decode(codes, levels), levels[idx].view(10, 64))
    dist = (x.view(-1, 1, 2) - levels[None]).pow(2).sum(-1)  # every entry against every run: the nearest is taken
    torch.testing.assert_close(dist.gather(1, idx[:, None])[:, 0], dist.min(1).values)


def test_vector_codes_beat_scalar_codes_at_the_same_bits():
    w = _gaussian(out=192)
    km, vq = quantize_rtn(w, KMEANS), quantize_rtn(w, VQ2)
    err_k, err_v = (km.dequantize() - w).pow(2).mean(), (vq.dequantize() - w).pow(2).mean()
    assert err_v < 0.92 * err_k
    layer_k, layer_v = QuantLinear.from_quantized(km), QuantLinear.from_quantized(vq)
    assert isinstance(layer_v, VectorCodebookLinear) and layer_v.FORMAT == "vq2-dq8"
    bits_k = quantized_sizes(torch.nn.Sequential(layer_k))["bits_per_weight"]
    bits_v = quantized_sizes(torch.nn.Sequential(layer_v))["bits_per_weight"]
    assert bits_v == pytest.approx(bits_k + (128 - 8) * 16 / w.numel(), abs=1e-3)  # 64 entries of 2 against 8
    assert 8 * storage_bytes(192, 256, 3, 64, 8, "vq2") / w.numel() == pytest.approx(bits_v, abs=1e-3)
    torch.testing.assert_close(layer_v.dequantize(), vq.dequantize())
    x = torch.randn(2, 256)
    with torch.no_grad():  # no kernel reads vector codes: the layer dequantizes
        torch.testing.assert_close(layer_v(x), F.linear(x, vq.dequantize()))


def test_gptq_with_vector_codes_lowers_the_output_error_further():
    gen = torch.Generator().manual_seed(1)
    w = _gaussian(out=192, seed=2)
    x = torch.randn(2048, 256, generator=gen) @ (torch.eye(256) + 0.3 * torch.randn(256, 256, generator=gen) / 16)
    H = x.T @ x
    errs = {}
    for spec in (KMEANS, VQ2):
        for act_order in (True, False):
            e = gptq_quantize(w, H, spec, act_order=act_order).dequantize() - w
            errs[spec.codebook, act_order] = float(torch.einsum("oi,ij,oj->", e, H, e))
    assert errs["vq2", True] < 0.92 * errs["kmeans", True] and errs["vq2", False] < 0.92 * errs["kmeans", False]
    rtn = quantize_rtn(w, VQ2).dequantize() - w
    assert errs["vq2", True] < 0.95 * float(torch.einsum("oi,ij,oj->", rtn, H, rtn))  # the runs' errors are fed on


def test_vector_codebooks_check_their_settings():
    with pytest.raises(QuantError, match="vq3 codebook takes 2-3-bit"):
        QuantSpec(4, 64, scale_bits=8, codebook="vq3")
    with pytest.raises(QuantError, match="multiple of 3; got 64"):
        QuantSpec(3, 64, scale_bits=8, codebook="vq3")
    with pytest.raises(QuantError, match="multiple of 3; got 256"):  # per channel: the layer's width
        quantize_rtn(_gaussian(), QuantSpec(3, -1, scale_bits=8, codebook="vq3"))
    w = _gaussian(out=48, n=192)  # per channel: 192 inputs are 64 runs of 3
    vq3 = quantize_rtn(w, QuantSpec(2, -1, scale_bits=8, codebook="vq3"))
    assert vq3.levels.shape == (64, 3) and isinstance(QuantLinear.from_quantized(vq3), Vector3CodebookLinear)


def test_tuning_a_vector_codebook_layer_trains_its_scales_and_keeps_its_codes():
    layer = QuantLinear.from_quantized(quantize_rtn(_gaussian(), VQ2))
    t = Tunable(layer, rounding=True)
    assert t.v is None  # entries have no order to slide along
    torch.testing.assert_close(t.weight(), layer.dequantize())
    F.linear(torch.randn(4, 256), t.weight()).pow(2).sum().backward()
    assert t.a.grad.abs().sum() > 0
    codes = layer.codes().clone()
    with torch.no_grad():
        t.a.fill_(0.1)
    t.harden()
    assert torch.equal(layer.codes(), codes)
    ratio = layer.scales.float() / QuantLinear.from_quantized(quantize_rtn(_gaussian(), VQ2)).scales.float()
    assert ratio.mean() == pytest.approx(1.1, abs=0.01)


@pytest.mark.parametrize("spec", [KMEANS, VQ2], ids=["kmeans", "vq2"])
def test_training_a_codebooks_levels_fits_the_output_closer_than_its_scales_alone(spec):
    gen = torch.Generator().manual_seed(3)
    w = _gaussian(seed=4)
    x = torch.randn(16, 64, 256, generator=gen)
    target = w + 0.5 * w**3 / w.abs().amax(1, keepdim=True) ** 2  # a warp of each row: levels can follow it, scales not
    held = {}
    for levels in (False, True):
        layer = QuantLinear.from_quantized(quantize_rtn(w, spec))
        codes, fitted = layer.codes().clone(), layer.levels.clone()
        t = Tunable(layer, rounding=False, levels=levels)

        def loss_on(idx, t=t):
            return F.mse_loss(F.linear(x[idx], t.weight()), F.linear(x[idx], target))

        cfg = FinetuneConfig(mode="block", holdout=0.25, eval_every=5)
        curve = fit([t], loss_on, len(x), cfg, Schedule(steps=60, batch=4, scale_lr=5e-3), progress=False)
        held[levels] = curve["held_best"]
        assert torch.equal(layer.codes(), codes)  # the codes stay either way
        assert torch.equal(layer.levels, fitted) != levels  # the trained levels are what the layer stores
        with torch.no_grad():  # and the hardened layer computes what was measured (to the 8-bit scales' grid)
            got = F.mse_loss(F.linear(x[12:], layer.dequantize()), F.linear(x[12:], target))
        assert float(got) == pytest.approx(curve["held_best"], rel=0.05)
    assert held[True] < 0.9 * held[False]


def test_e2e_distillation_trains_vector_entries_and_the_checkpoint_keeps_them(tmp_path, tokenizer):
    from conftest import tiny_model

    from calibrate import calibration_windows

    ids = calibration_windows(tokenizer, "c4", 32, 128, seed=0)  # as the uniform layers' end-to-end test
    config = D2QuantConfig(bits=2, group_size=32, scale_bits=8, codebook="vq2", dsq=False)
    e2e = FinetuneConfig(mode="e2e", levels=True, e2e_steps=40, e2e_batch=4, holdout=0.25, e2e_lr=5e-3, eval_every=5)
    levels, codes = {}, {}
    for name, tail in {"solver": [], "e2e": [("finetune", e2e)]}.items():
        model = tiny_model("llama", seed=5)
        ctx = QuantContext(model, tokenizer, calib_ids=ids, progress=False)
        records = run_pipeline(ctx, [("d2quant", config), *tail])
        layers = [m for m in model.modules() if isinstance(m, VectorCodebookLinear)]
        levels[name] = torch.cat([m.levels.flatten() for m in layers])
        codes[name] = torch.cat([m.codes().flatten() for m in layers])
    summary = records[-1]["summary"]["e2e"]
    assert summary["held_best"] < summary["held"][0], summary
    assert torch.equal(codes["e2e"], codes["solver"])  # the codes stay
    assert (levels["e2e"] != levels["solver"]).float().mean() > 0.5  # the entries moved
    qc = {"method": "d2quant", "modules": ctx.modules, "passes": records}
    check_reload_and_version(tmp_path, model, tokenizer, qc, "vq2-dq8", 4, VectorCodebookLinear)


def test_vector_codebook_checkpoint_reloads_bit_exactly_as_version_4(tmp_path, tiny_llama, tokenizer, calib):
    config = D2QuantConfig(bits=3, group_size=32, scale_bits=8, codebook="vq2", dsq=False)
    qc = _quantize(tiny_llama, tokenizer, "d2quant", config, calib)
    check_reload_and_version(tmp_path, tiny_llama, tokenizer, qc, "vq2-dq8", 4, VectorCodebookLinear)
    with pytest.raises(QuantError, match="codebook codes"):
        export_gptq(save_quantized(tiny_llama, tokenizer, tmp_path / "v4", qc), tmp_path / "g")
    assert not (tmp_path / "g").exists()


def test_a_vector_group_that_splits_a_run_is_refused(tmp_path, tiny_llama, tokenizer, calib):
    qc = _quantize(tiny_llama, tokenizer, "gptq", GPTQConfig(bits=3, group_size=32, scale_bits=8, codebook="vq2"),
                   calib)
    out = save_quantized(tiny_llama, tokenizer, tmp_path / "q", qc)
    cfg = json.loads((out / "config.json").read_text())
    spec = cfg["quantization_config"]["modules"]["model.layers.0.mlp.down_proj"]
    spec["format"] = "vq3-dq8"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantError, match=r"group_size must be a multiple of 3 for format vq3-dq8, got 32"):
        load_quantized(out)
