"""FPTQuant: the transforms preserve the function (real SmolLM2, random non-identity parameters), the
fits lower their objectives, activation quantization and online ops survive save/load exactly."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import tiny_model

from quant import ActQuantConfig, FPTConfig, QuantContext, QuantError, QuantSpec, RTNConfig, run_pipeline
from quant.formats.checkpoint import load_quantized, save_quantized
from quant.methods.fpt import FPTQuantConfig, cayley
from quant.numerics.hadamard import hadamard, hadamard_transform
from quant.runtime.inputops import fake_quant_tokens, kv_bits, ops_modules, set_kv_quant

OFF = dict(rotation=False, prerope=False, value=False, mlp_scale=False)
ALONE = {
    "rotation": {**OFF, "rotation": True},
    "prerope": {**OFF, "prerope": True},
    "value": {**OFF, "value": True},
    "mlp_scale": {**OFF, "mlp_scale": True},
    "down_hadamard": {**OFF, "down_hadamard": True},
    "dynamic_scale": {**OFF, "dynamic_scale": True},
    "all": {"down_hadamard": True, "dynamic_scale": True},
}
CHANGED = {"value": "self_attn.v_proj", "mlp_scale": "mlp.up_proj", "down_hadamard": "mlp.down_proj"}


def _transformed(model, **kw):
    m = copy.deepcopy(model)
    cfg = FPTConfig(init="random", local_steps=0, **kw)
    run_pipeline(QuantContext(m, progress=False), [("fpt", cfg)])
    return m


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.slow
@pytest.mark.parametrize("which", list(ALONE))
def test_transforms_preserve_smollm2_logits(smollm2, which):
    ids = smollm2.tokenizer(
        "The tower is 324 metres tall, about the same height as an 81-storey building.", return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        ref = smollm2.model(ids).logits
        m = _transformed(smollm2.model, **ALONE[which])
        out = m(ids).logits
    assert _rel(out, ref) < 1e-4
    # the transforms really changed the weights (random, non-identity parameters)
    if which != "dynamic_scale":
        path = f"model.layers.3.{CHANGED.get(which, 'self_attn.q_proj')}.weight"
        assert _rel(m.get_parameter(path), smollm2.model.get_parameter(path)) > 1e-2


def test_hadamard_transform_is_the_matrix_product():
    for n in (64, 576, 1536):
        x = torch.randn(3, n, dtype=torch.float64)
        assert torch.allclose(hadamard_transform(x), x @ hadamard(n), atol=1e-12)


def test_cayley_is_orthogonal():
    q = cayley(torch.randn(32, 32, dtype=torch.float64))
    assert torch.allclose(q @ q.T, torch.eye(32, dtype=torch.float64), atol=1e-10)


def test_fake_quant_tokens_levels_and_straight_through():
    x = torch.randn(5, 64, requires_grad=True)
    xd = x.detach()
    for sym in (True, False):
        y = fake_quant_tokens(x, ActQuantConfig(bits=4, sym=sym))
        # the 4-bit grid from each row's own range: sym amax / 7 (codes -8..7), asym (max - min) / 15 with
        # an integer zero, so (q - z) * s is a multiple of s either way
        if sym:
            scale = xd.abs().amax(-1, keepdim=True) / 7
        else:
            scale = (xd.amax(-1, keepdim=True) - xd.amin(-1, keepdim=True)) / 15
        q = y.detach() / scale
        assert torch.allclose(q, q.round(), atol=1e-4)  # on the grid
        codes = q.round() + (0 if sym else torch.round(-xd.amin(-1, keepdim=True) / scale))
        assert codes.min() >= (-8 if sym else 0) and codes.max() <= (7 if sym else 15)  # 16 levels
        assert ((y.detach() - xd).abs() <= scale / 2 * (1 + 1e-4)).all()  # and the nearest grid point
        err = (y - x).abs().max(-1).values
        span = x.detach().amax(-1) - x.detach().amin(-1)
        assert (err <= span / 15 * 0.51 + 1e-6).all() if not sym else (err <= x.abs().amax(-1) / 7 * 0.51 + 1e-6).all()
        (g,) = torch.autograd.grad(y.sum(), x)
        assert torch.equal(g, torch.ones_like(x))


def test_local_fit_lowers_the_objective_and_keeps_the_function():
    model = tiny_model("llama", num_hidden_layers=2)
    ids = torch.randint(0, 1000, (1, 24))
    with torch.no_grad():
        ref = model(ids).logits
    ctx = QuantContext(model, progress=False)
    (rec,) = run_pipeline(ctx, [("fpt", FPTConfig(local_steps=30, rotation_rows=1.0))])
    s = rec["summary"]
    assert s["local_rotation_loss"]["last"] < s["local_rotation_loss"]["first"]
    assert s["local_block_loss"]["last"] < s["local_block_loss"]["first"]
    with torch.no_grad():
        assert _rel(model(ids).logits, ref) < 1e-4


def test_e2e_fit_lowers_the_kl(calib):
    model = tiny_model("llama", num_hidden_layers=2)
    cfg = FPTConfig(local_steps=0, e2e_steps=12, e2e_lr=1e-3, e2e_batch=2, weight=QuantSpec(3, 32, clip="minmax"))
    cfg.act = ActQuantConfig(bits=4)
    # the same two windows every step, so the loss is comparable from step to step; at 1e-2 the STE steps
    # overshoot on this tiny model (the KL wanders, 4.7e-4 -> 5.2e-4 under transformers 5.25), at 1e-3 it
    # falls by a third
    (rec,) = run_pipeline(QuantContext(model, calib_ids=calib[:2, :64], progress=False), [("fpt", cfg)])
    kl = rec["summary"]["e2e_kl"]
    assert kl["steps"] == 12 and kl["last"] < kl["first"]
    assert not any(o.act is not None for o in ops_modules(model).values())  # the fit's act quant is removed


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_w4a4_checkpoint_reloads_exactly(tmp_path, calib, tokenizer, mode):
    model = tiny_model("llama", num_hidden_layers=2)
    act = ActQuantConfig(bits=4, mode=mode, kv_bits=8 if mode == "static" else 16)
    fpt = FPTConfig(down_hadamard=True, dynamic_scale=True, local_steps=3, rotation_rows=1.0)
    ctx = QuantContext(model, calib_ids=calib[:4, :64], progress=False)
    run_pipeline(ctx, [("fptquant", FPTQuantConfig(bits=4, group_size=32, transforms=fpt)), ("actquant", act)])
    ops = ops_modules(model)
    assert all(type(model.get_submodule(n)).__name__ == "QuantLinear" for n in ops)  # moved onto QuantLinear
    assert sum(o.hadamard > 0 for o in ops.values()) == 2
    if mode == "static":
        assert all(float(o.act_scale) != 1.0 for o in ops.values())
    out = save_quantized(model, tokenizer, tmp_path / "ckpt", {"method": "fptquant", "modules": ctx.modules})
    loaded, _ = load_quantized(out)
    ids = torch.randint(0, 1000, (1, 20))
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
        assert torch.equal(model(ids).logits, hf(ids).logits)
    with torch.no_grad():  # and activation quantization is really on: turning it off changes the logits
        for o in ops_modules(loaded).values():
            o.act = None
        assert not torch.equal(model(ids).logits, loaded(ids).logits)


def test_refusals(tiny_llama):
    with pytest.raises(QuantError, match="activation bits"):
        ActQuantConfig(bits=3).validate()
    with pytest.raises(QuantError, match="calibration"):
        run_pipeline(QuantContext(tiny_llama, progress=False), [("fpt", FPTConfig(e2e_steps=2))])
    qwen3 = tiny_model("qwen3")
    with pytest.raises(QuantError, match="pre-RoPE"):
        run_pipeline(QuantContext(qwen3, progress=False), [("fpt", FPTConfig(local_steps=0))])
    run_pipeline(QuantContext(qwen3, progress=False), [("fpt", FPTConfig(local_steps=0, prerope=False))])
    q = copy.deepcopy(tiny_llama)
    run_pipeline(QuantContext(q, progress=False), [("rtn", RTNConfig(bits=4, group_size=32))])
    with pytest.raises(QuantError, match="before any quantizer"):
        run_pipeline(QuantContext(q, progress=False), [("fpt", dataclasses.replace(FPTConfig(), local_steps=0))])


def test_fpt_prepass_then_d2quant(calib):
    from quant.methods.d2quant import D2QuantConfig

    model = tiny_model("llama", num_hidden_layers=2)
    ids = torch.randint(0, 1000, (1, 20))
    steps = [("fpt", FPTConfig(local_steps=2)), ("d2quant", D2QuantConfig(bits=3, group_size=32))]
    run_pipeline(QuantContext(model, calib_ids=calib[:4, :64], progress=False), steps)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    bad = tiny_model("llama", num_hidden_layers=2)
    steps[0] = ("fpt", FPTConfig(local_steps=0, down_hadamard=True))
    with pytest.raises(QuantError, match="DSQ cannot pass the online Hadamard"):
        run_pipeline(QuantContext(bad, calib_ids=calib[:4, :64], progress=False), steps)
    steps[1] = ("d2quant", D2QuantConfig(bits=3, group_size=32, dsq=False))  # GPTAQ alone takes it
    good = tiny_model("llama", num_hidden_layers=2)
    run_pipeline(QuantContext(good, calib_ids=calib[:4, :64], progress=False), steps)
    with torch.no_grad():
        assert torch.isfinite(good(ids).logits).all()


def test_kv_cache_quantization(tmp_path, tokenizer):
    model = tiny_model("llama", num_hidden_layers=2)
    ids = torch.randint(0, 1000, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
    ctx = QuantContext(model, progress=False)
    run_pipeline(ctx, [("rtn", RTNConfig(bits=8, group_size=32)), ("actquant", ActQuantConfig(bits=16, kv_bits=4))])
    assert kv_bits(model) == 4 and not ops_modules(model)
    with torch.no_grad():
        out = model(ids).logits
        assert 1e-3 < _rel(out, ref) < 0.5  # keys/values really quantized, the model still sane
        set_kv_quant(model, 16)  # the registered attention without quantization is plain SDPA
        assert _rel(model(ids).logits, ref) < 1e-2  # only the 8-bit weights remain
        set_kv_quant(model, 4)
    ck = save_quantized(model, tokenizer, tmp_path / "kv", {"method": "rtn", "modules": ctx.modules})
    loaded, _ = load_quantized(ck)
    assert kv_bits(loaded) == 4
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out)
        gen = loaded.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 12)
