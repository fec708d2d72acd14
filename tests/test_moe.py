"""Sparse MoE models (tiny random Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): unfused experts are the same
function; RTN and GPTQ quantize every expert with routed calibration tokens; checkpoints reload exactly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

from moe.experts import ExpertList, unfuse_experts
from quant import GPTQConfig, QuantContext, QuantError, RTNConfig, load_quantized, run_pipeline, save_quantized
from quant.methods.d2quant import D2QuantConfig

MOE = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=96,
        decoder_sparse_step=1, mlp_only_layers=[],
    ),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1,
                      mlp_only_layers=[]),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
}  # fmt: skip


def tiny_moe(model_type: str, seed: int = 0):
    return tiny_model(model_type, seed=seed, **MOE[model_type])


@pytest.mark.parametrize("model_type", list(MOE))
def test_unfused_experts_are_the_same_function(model_type):
    model = tiny_moe(model_type)
    x = torch.randint(0, 49152, (2, 40))
    with torch.no_grad():
        ref = model(x).logits
        assert unfuse_experts(model) == 2
        assert isinstance(model.model.layers[0].mlp.experts, ExpertList)
        torch.testing.assert_close(model(x).logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_every_expert_save_and_reload(tmp_path, tokenizer, calib, model_type, method):
    model = tiny_moe(model_type)
    ctx = QuantContext(model, tokenizer, calib_ids=calib)
    config = RTNConfig(bits=4, group_size=32) if method == "rtn" else GPTQConfig(bits=4, group_size=32)
    run_pipeline(ctx, [(method, config)])
    experts = [n for n in ctx.modules if ".experts." in n]
    assert len(experts) == 2 * 4 * 3  # layers x experts x (gate, up, down)
    assert any("shared_expert." in n for n in ctx.modules) == (model_type == "qwen2_moe")
    assert not any(n.endswith("mlp.gate") or "shared_expert_gate" in n for n in ctx.modules)  # routers stay float
    ck = save_quantized(model, tokenizer, tmp_path / "ck", {"method": method, "modules": ctx.modules})
    back, _ = load_quantized(ck)
    x = torch.randint(0, 49152, (2, 40))
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)


def test_gptq_uses_routed_tokens_and_falls_back_for_a_starved_expert(tokenizer, calib):
    import torch.nn.functional as F

    model = tiny_moe("mixtral")

    def never_expert_3(mod, args, _out):  # layer 0's router never picks expert 3
        logits = F.linear(args[0].reshape(-1, mod.hidden_dim), mod.weight)
        logits[:, 3] = -float("inf")
        top, idx = torch.topk(torch.softmax(logits, -1), mod.top_k, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), idx

    model.model.layers[0].mlp.gate.register_forward_hook(never_expert_3)
    unfuse_experts(model)
    ctx = QuantContext(model, tokenizer, calib_ids=calib)
    summary = run_pipeline(ctx, [("gptq", GPTQConfig(bits=4, group_size=32))])[0]["summary"]
    assert summary["rtn_fallback_experts"] == ["model.layers.0.mlp.experts.3.down_proj"]


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_d2quant_with_rotation_quantizes_every_expert_and_reloads(tmp_path, tokenizer, calib, model_type):
    from quant.methods.rotation import RotationConfig

    model = tiny_moe(model_type)
    ctx = QuantContext(model, tokenizer, calib_ids=calib)
    run_pipeline(ctx, [("rotate", RotationConfig()), ("d2quant", D2QuantConfig(bits=3, group_size=32, dac=True))])
    downs = [n for n in ctx.modules if n.endswith("down_proj")]
    assert all(ctx.modules[n]["format"] == "dsq" for n in downs) and len(downs) == 2 * (4 + (model_type == "qwen2_moe"))
    assert len(ctx.norm_biases) == 2
    qc = {"method": "d2quant", "modules": ctx.modules, "norm_biases": ctx.norm_biases}
    ck = save_quantized(model, tokenizer, tmp_path / "ck", qc)
    back, _ = load_quantized(ck)
    x = torch.randint(0, 49152, (2, 40))
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)


def test_allocation_says_it_does_not_handle_moe(tokenizer):
    from quant import AllocationConfig

    ctx = QuantContext(tiny_moe("mixtral"), tokenizer)
    with pytest.raises(QuantError, match="Mixture-of-Experts"):
        run_pipeline(ctx, [("allocate", AllocationConfig(budget=3.0, group_size=32))])


def test_power_step_raises_alignment_monotonically():
    from moe.mpi import power_retract, router_alignment

    torch.manual_seed(0)
    W = torch.randn(3, 48, 32, dtype=torch.float64)  # three random experts, gate_proj [F, D]
    R = torch.randn(3, 32, dtype=torch.float64)
    C = 2.5
    prev = router_alignment(R, W).rayleigh
    for _ in range(200):  # random Gaussian experts: small spectral gaps, slow but steady convergence
        R = power_retract(R, W, C)
        torch.testing.assert_close(R.norm(dim=-1), torch.full((3,), C, dtype=torch.float64))
        now = router_alignment(R, W).rayleigh
        assert all(b >= a - 1e-12 for a, b in zip(prev, now, strict=True)), (prev, now)
        prev = now
    final = router_alignment(R, W)
    assert min(final.cosine) > 0.99 and min(final.rayleigh) > 0.99 and final.row_norm_cv < 1e-9


def test_mpi_router_gates_with_the_aligned_weight_and_merges(tokenizer):
    from moe.mpi import MPIRouter, expert_gate_weights, power_retract

    model = tiny_moe("mixtral")
    block = model.model.layers[0].mlp
    raw = block.gate.weight.detach().clone()
    router = MPIRouter(block.gate, block.experts, c_prime=4.0)
    x = torch.randn(10, 64)
    W = expert_gate_weights(block.experts).detach()
    r_prime = power_retract(raw, W, 4.0 / 2)  # C = C'/sqrt(N), N = 4
    logits, scores, idx = router(x)
    torch.testing.assert_close(logits, x @ r_prime.T)
    assert torch.equal(block.gate.weight, raw)  # the raw parameter is untouched by gating
    logits.sum().backward()  # gradients reach the raw router, not the experts (stop-gradient default)
    assert block.gate.weight.grad is not None and block.experts.gate_up_proj.grad is None
    router.freeze()
    torch.testing.assert_close(router(x)[0], logits.detach())
    merged = router.merge()
    torch.testing.assert_close(merged(x)[0], logits.detach())
    assert torch.equal(merged(x)[2], idx)


def test_align_routers_post_training_with_router_finetune(calib):
    from moe.mpi import AlignConfig, align_routers, alignment
    from moe.routing import compare_routing, router_logits

    model = tiny_moe("qwen3_moe")
    before = {n: a.summary() for n, a in alignment(model).items()}
    ref = router_logits(model, calib[:2])
    with torch.no_grad():
        teacher = model(calib[:1], use_cache=False).logits.log_softmax(-1)
        blind = tiny_moe("qwen3_moe")  # the same model aligned without fine-tuning: what step 0 distils
        align_routers(blind, AlignConfig())
        student = blind(calib[:1], use_cache=False).logits.log_softmax(-1)
    out = align_routers(model, AlignConfig(finetune_steps=4, lr=1e-2), calib)
    assert len(out["finetune_loss"]) == 4
    # the first loss is KL(original ‖ MPI-gated) per token on window 0, recomputed here
    kl = float((teacher.exp() * (teacher - student)).sum(-1).mean())
    assert kl > 0 and out["finetune_loss"][0] == pytest.approx(kl, rel=1e-4)  # reverse KL: 1e-3 off
    assert not any(type(m).__name__ == "MPIRouter" for m in model.modules())  # merged into plain routers
    after = {n: a.summary() for n, a in alignment(model).items()}
    for n in before:
        assert after[n]["rayleigh_mean"] > before[n]["rayleigh_mean"]
        assert after[n]["row_norm_cv"] < before[n]["row_norm_cv"]
    new = router_logits(model, calib[:2])
    agree = compare_routing(ref, new, k=2)
    for n, r in agree.items():  # the overlap recounted from every token's two top-2 sets
        a, b = ref[n].topk(2, -1).indices.tolist(), new[n].topk(2, -1).indices.tolist()
        mine = sum(len(set(x) & set(y)) for x, y in zip(a, b, strict=True)) / (2 * len(a))
        assert r.topk_overlap == pytest.approx(mine)
        assert 0.5 < mine < 1  # routing moved (the rows turned), yet agrees more than chance (2 of 4: 0.5)
    assert all(p.requires_grad for p in model.parameters())


def test_cli_quantizes_a_moe_model_and_aligns_routers(tmp_path, tokenizer):
    from test_cli import assert_one_line_error, run

    src = tmp_path / "tiny-mixtral"
    tiny_moe("mixtral").save_pretrained(src)
    tokenizer.save_pretrained(src)
    r = run("model", src, "--method", "gptq", "--bits", "4", "--group-size", "32", "--nsamples", "8",
            "--seqlen", "64", "--no-eval", "--out", tmp_path / "q")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "routing vs float: topk_overlap" in r.stdout
    report = json.loads((tmp_path / "q" / "quant_report.json").read_text())
    assert 0.5 < report["routing"]["topk_overlap"] <= 1.0
    r = run("moe", "align", src, "--finetune-steps", "2", "--nsamples", "2", "--seqlen", "32",
            "--out", tmp_path / "aligned", "--json", tmp_path / "a.json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "a.json").read_text())
    layer = next(iter(res["before"]))
    assert res["after"][layer]["rayleigh_mean"] > res["before"][layer]["rayleigh_mean"]
    assert (tmp_path / "aligned" / "model.safetensors").is_file()
    assert_one_line_error(run("moe", "align", tmp_path / "q"), "not a float Mixture-of-Experts model")


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_rotation_keeps_a_moe_model_and_its_routing(model_type):
    from moe.routing import router_logits
    from quant.methods.rotation import RotationConfig

    model = tiny_moe(model_type)
    with torch.no_grad():  # non-trivial norm scales, so folding into routers and experts is exercised
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    ids = torch.randint(0, 49152, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
    before = router_logits(model, ids)
    with pytest.raises(QuantError, match="--down-hadamard needs dense MLPs"):  # experts: refused
        run_pipeline(QuantContext(model, progress=False), [("rotate", RotationConfig(down_hadamard=True))])
    # the per-head Hadamard is the attention's: experts take it
    run_pipeline(QuantContext(model, progress=False), [("rotate", RotationConfig(head_hadamard=True))])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, atol=2e-4, rtol=1e-4)
    for name, logits in router_logits(model, ids).items():
        torch.testing.assert_close(logits, before[name], atol=1e-4, rtol=1e-4)
