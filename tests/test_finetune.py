"""Block-wise learned rounding and ranges (the ``finetune`` pass): the tunable weight is the packed one until it
moves, codes move at most one step and stay on the grid, hardening writes what was tuned, and a tuned model is
closer to the float one than the solver alone left it."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_kernels_cpu import dsq_layer, uniform_layer

from quant import QuantContext, QuantError, load_quantized, run_pipeline, save_quantized
from quant.methods.finetune import FinetuneConfig, Schedule, Tunable, fit, rate
from quant.methods.quantizers import GPTQConfig, RTNConfig
from quant.runtime.dsqlinear import DSQLinear
from quant.runtime.quantlinear import QuantLinear


def test_tunables_apply_the_online_down_hadamard(tokenizer, calib):
    """A tuned block computes what the packed block computes, the Hadamard before down_proj included."""
    from quant.engine.blockwise import call_block
    from quant.engine.loop import capture
    from quant.methods.d2quant import D2QuantConfig
    from quant.methods.finetune import tunable_names, tunables
    from quant.methods.rotation import RotationConfig

    model = tiny_model()
    ctx = QuantContext(model, tokenizer, calib_ids=calib[:4, :64], progress=False)
    run_pipeline(ctx, [("rotate", RotationConfig(down_hadamard=True)),
                       ("d2quant", D2QuantConfig(bits=3, group_size=32, dsq=False))])
    xs, kws = capture(model, model.model.layers, calib[:2, :32])
    block = model.model.layers[1]
    with torch.no_grad():
        ref = call_block(block, xs, kws[1])
        with tunables(block, tunable_names(block), rounding=False):
            got = call_block(block, xs, kws[1])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_tunable_starts_at_the_packed_weight_and_hardens_to_the_grid():
    layer = uniform_layer(24, 64, 3, 32, seed=0)
    before = layer.dequantize()
    w = before + 0.3 * layer.scales.float().repeat_interleave(32, 1) * torch.randn(24, 64)
    layer.__dict__["_float_weight"] = w
    t = Tunable(layer, rounding=True)
    torch.testing.assert_close(t.weight(), before, rtol=0, atol=1e-6)
    with torch.no_grad():
        t.v.uniform_(-3, 3)  # far past the bounds: clamp_ brings them back
        t.a.fill_(0.1)
    t.clamp_()
    assert t.v.abs().max() <= 0.5 and t.a.max() <= 0.5
    codes0 = layer.codes()
    scales0 = layer.scales.clone()
    t.harden()
    moved = (layer.codes().long() - codes0.long()).abs()
    assert moved.max() <= 1 and moved.sum() > 0  # one step at most, and some moved
    assert layer.codes().max() <= 7 and layer.codes().min() >= 0
    torch.testing.assert_close(layer.scales, (scales0.float() * 1.1).half())
    torch.testing.assert_close(layer.dequantize(), t.weight().detach(), rtol=1e-3, atol=1e-4)


def test_tunable_dsq_keeps_its_signs_and_scales_its_row_scales():
    layer = dsq_layer(16, 64, 2, 32, seed=1)
    t = Tunable(layer, rounding=True)
    assert t.v is None  # sign planes are kept
    torch.testing.assert_close(t.weight(), layer.dequantize(), rtol=1e-5, atol=1e-6)
    codes = layer.codes()
    with torch.no_grad():
        t.a.fill_(-0.2)
    t.harden()
    assert torch.equal(layer.codes(), codes)
    torch.testing.assert_close(layer.dequantize(), t.weight().detach(), rtol=1e-3, atol=1e-4)


def test_the_gradient_reaches_rounding_and_scales():
    layer = uniform_layer(8, 32, 4, 32, seed=2)
    t = Tunable(layer, rounding=True)
    t(torch.randn(5, 32)).square().sum().backward()
    assert t.v.grad.abs().sum() > 0 and t.a.grad.abs().sum() > 0


def test_warmup_rises_linearly_then_decays_and_holds_off_the_early_stop():
    # (the end-to-end pass turns the early stop off: every step runs, the best measured point kept)
    assert [rate(s, 10, 0.0) for s in (0, 5, 9)] == pytest.approx([1.0, 0.5, 0.1])
    # 4 warm-up steps of 10: 1/4, 2/4, 3/4, then the plain decay
    assert [rate(s, 10, 0.4) for s in range(6)] == pytest.approx([0.25, 0.9 * 0.5, 0.8 * 0.75, 0.7, 0.6, 0.5])
    with pytest.raises(QuantError, match="warmup"):
        FinetuneConfig(mode="e2e", warmup=1.0).validate()

    # a held-out loss that only gets worse: without warm-up the first measurement stops the run (patience 1);
    # with it, not before the warm-up's last step
    p = torch.nn.Parameter(torch.zeros(3))
    calls = iter(range(10**6))

    def worsening(idx):
        return p.square().sum() + next(calls)

    for warmup, early_stop, ran in ((0.0, True, 1), (0.5, True, 6), (0.0, False, 10)):
        cfg = FinetuneConfig(mode="e2e", warmup=warmup, eval_every=1, patience=1)
        curve = fit([], worsening, 8, cfg, Schedule(10, 1, 1e-3, early_stop=early_stop), progress=False, extra=[p])
        assert len(curve["train"]) == ran and curve["best_step"] == 0


def _logit_error(model, ref, ids):
    with torch.no_grad():
        return float((model(ids).logits - ref).pow(2).mean())


def test_finetune_brings_the_quantized_model_closer_to_the_float_one(tmp_path, tokenizer):
    from calibrate import calibration_windows

    ids = calibration_windows(tokenizer, "c4", 32, 128, seed=0)
    test_ids = calibration_windows(tokenizer, "wikitext2-valid", 4, 64, seed=1)
    ref_model = tiny_model("llama", seed=3)
    with torch.no_grad():
        ref = ref_model(test_ids).logits
    errors = {}
    for name, steps in {"solver": [("gptq", GPTQConfig(bits=2, group_size=32))],
                        "tuned": [("gptq", GPTQConfig(bits=2, group_size=32)),
                                  ("finetune", FinetuneConfig(mode="block", steps=60, holdout=0.25))]}.items():
        model = tiny_model("llama", seed=3)
        ctx = QuantContext(model, tokenizer=tokenizer, calib_ids=ids, progress=False)
        records = run_pipeline(ctx, steps)
        errors[name] = _logit_error(model, ref, test_ids)
    summary = records[1]["summary"]
    assert summary["blocks"] == 2 and len(summary["curves"]) == 2
    assert all(after <= before for before, after in zip(summary["held_loss_before"], summary["held_loss_after"],
                                                         strict=True))
    assert errors["tuned"] < errors["solver"], errors  # on text it never saw
    # the tuned codes and scales are an ordinary checkpoint: saved and reloaded, the same logits
    out = save_quantized(model, tokenizer, tmp_path / "ck", {"method": "gptq", "modules": ctx.modules,
                                                              "passes": records})
    again, _ = load_quantized(out)
    with torch.no_grad():
        assert torch.equal(again(test_ids).logits, model(test_ids).logits)


def test_finetune_tunes_dsq_and_rtn_output_too(tokenizer):
    from calibrate import calibration_windows
    from quant.methods.d2quant import D2QuantConfig

    ids = calibration_windows(tokenizer, "c4", 6, 32, seed=0)
    for quantizer in (("rtn", RTNConfig(bits=3, group_size=32)), ("d2quant", D2QuantConfig(bits=2, group_size=32))):
        model = tiny_model("llama", seed=4)
        ctx = QuantContext(model, tokenizer=tokenizer, calib_ids=ids, progress=False)
        records = run_pipeline(ctx, [quantizer, ("finetune", FinetuneConfig(mode="block", steps=5, eval_every=1))])
        assert records[1]["summary"]["blocks"] == 2
        kinds = {type(m) for m in model.modules() if isinstance(m, (QuantLinear, DSQLinear))}
        assert QuantLinear in kinds and (DSQLinear in kinds) == (quantizer[0] == "d2quant")


def test_finetune_needs_a_quantizer_before_it(tokenizer):
    from calibrate import calibration_windows

    ctx = QuantContext(tiny_model("llama"), tokenizer=tokenizer,
                       calib_ids=calibration_windows(tokenizer, "c4", 2, 32, seed=0), progress=False)
    with pytest.raises(QuantError, match="must follow a quantizer"):
        run_pipeline(ctx, [("finetune", FinetuneConfig(mode="block", steps=2))])
    with pytest.raises(QuantError, match="unknown --finetune"):
        FinetuneConfig(mode="e2e2").validate()


def _kl_to(model, ref_logits, ids) -> float:
    """Mean KL(float || quantized) per token."""
    with torch.no_grad():
        s = torch.log_softmax(model(ids).logits.double(), -1)
        t = torch.log_softmax(ref_logits.double(), -1)
    return float(torch.nn.functional.kl_div(s, t, log_target=True, reduction="sum") / (ids.shape[0] * ids.shape[1]))


# the scales alone; with the norms' weights (--finetune-e2e-norms); with the rounding (--finetune-rounding); the
# scales alone computed in bfloat16 (--finetune-dtype bf16)
@pytest.mark.parametrize("trained", ["scales", "norms", "rounding", "bf16"])
def test_e2e_distillation_brings_the_next_token_distribution_closer_to_the_float_one(tmp_path, tokenizer, trained):
    from calibrate import calibration_windows

    ids = calibration_windows(tokenizer, "c4", 32, 128, seed=0)
    test_ids = calibration_windows(tokenizer, "wikitext2-valid", 4, 64, seed=1)
    with torch.no_grad():
        ref = tiny_model("llama", seed=5)(test_ids).logits
    kl, codes = {}, {}
    norms = trained == "norms"
    e2e_cfg = FinetuneConfig(mode="e2e", e2e_steps=40, e2e_batch=4, holdout=0.25, e2e_lr=5e-3, e2e_norms=norms,
                             rounding=trained == "rounding", dtype="bf16" if trained == "bf16" else "fp32",
                             eval_every=2, patience=1)  # (the end-to-end pass never stops early)
    head_dtypes = set()
    for name, tail in {"solver": [], "e2e": [("finetune", e2e_cfg)]}.items():
        model = tiny_model("llama", seed=5)
        ctx = QuantContext(model, tokenizer=tokenizer, calib_ids=ids, progress=False)
        hook = model.lm_head.register_forward_hook(lambda m, i, o: head_dtypes.add(o.dtype))
        records = run_pipeline(ctx, [("gptq", GPTQConfig(bits=2, group_size=32, scale_bits=8)), *tail])
        hook.remove()
        kl[name] = _kl_to(model, ref, test_ids)
        codes[name] = torch.cat([m.codes().flatten() for m in model.modules() if isinstance(m, QuantLinear)])
    assert (torch.bfloat16 in head_dtypes) == (trained == "bf16")  # the distillation's matmuls ran in bf16
    changed = (codes["e2e"] != codes["solver"]).float().mean()
    assert (0 < changed < 0.2) if trained == "rounding" else changed == 0, changed  # a code moves by one at most
    assert not any("_float_weight" in m.__dict__ for m in model.modules())  # the rounding's start is let go
    norm_weights = [model.model.norm.weight, *(m.weight for b in model.model.layers
                                                for m in (b.input_layernorm, b.post_attention_layernorm))]
    moved = [not torch.equal(w, torch.ones_like(w)) for w in norm_weights]  # (the tiny model's norms start at 1)
    assert all(moved) if norms else not any(moved)
    assert all(w.requires_grad for w in norm_weights)  # as they were before the pass
    e2e = records[1]["summary"]["e2e"]
    assert records[1]["summary"]["blocks"] == 0  # e2e alone: no block tuning
    assert e2e["held_best"] < e2e["held"][0] and e2e["kl_reduction"] > 0
    assert len(e2e["train"]) == e2e_cfg.e2e_steps and len(e2e["held"]) == 1 + e2e_cfg.e2e_steps // 2
    assert kl["e2e"] < kl["solver"], kl  # on text it never saw
    hold = ids[24:]  # the last quarter: the held-out windows; the hardened point measured through the packed model
    with torch.no_grad():
        hardened = _kl_to(model, tiny_model("llama", seed=5)(hold).logits, hold)
    assert e2e["held_hardened"] == pytest.approx(hardened, rel=0.02 if trained == "bf16" else 1e-4)
    out = save_quantized(model, tokenizer, tmp_path / "ck", {"method": "gptq", "modules": ctx.modules,
                                                              "passes": records})
    again, _ = load_quantized(out)  # the tuned scales are still points of their 8-bit grids: exact reload
    with torch.no_grad():
        assert torch.equal(again(test_ids).logits, model(test_ids).logits)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_both_modes_run_block_then_e2e_on_dsq(tokenizer, dtype):
    from calibrate import calibration_windows
    from quant.methods.d2quant import D2QuantConfig

    ids = calibration_windows(tokenizer, "c4", 8, 32, seed=0)
    model = tiny_model("llama", seed=6)
    ctx = QuantContext(model, tokenizer=tokenizer, calib_ids=ids, progress=False)
    records = run_pipeline(ctx, [("d2quant", D2QuantConfig(bits=2, group_size=32)),
                                 ("finetune", FinetuneConfig(mode="both", steps=3, e2e_steps=3, eval_every=1,
                                                             dtype=dtype))])
    summary = records[1]["summary"]
    assert summary["blocks"] == 2 and len(summary["e2e"]["held"]) == 4  # before, and after each of 3 steps
    assert summary["e2e"]["held_best"] <= summary["e2e"]["held"][0]
