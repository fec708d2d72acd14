"""Sparse MoE models (tiny random Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): unfused experts are the same
function; RTN and GPTQ quantize every expert with routed calibration tokens; checkpoints reload exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from moe.experts import ExpertList, unfuse_experts
from quant import GPTQConfig, QuantContext, QuantError, RTNConfig, load_quantized, run_pipeline, save_quantized
from quant.d2quant import D2QuantConfig

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

    from quant.blockwise import BlockRunner, expert_hessians

    model = tiny_moe("mixtral")

    def never_expert_3(mod, args, _out):  # layer 0's router never picks expert 3
        logits = F.linear(args[0].reshape(-1, mod.hidden_dim), mod.weight)
        logits[:, 3] = -float("inf")
        top, idx = torch.topk(torch.softmax(logits, -1), mod.top_k, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), idx

    model.model.layers[0].mlp.gate.register_forward_hook(never_expert_3)
    unfuse_experts(model)
    runner = BlockRunner(model, model.model.layers, calib)
    block = model.model.layers[0]
    names = [f"mlp.experts.{e}.gate_proj" for e in range(4)]
    hs = expert_hessians(runner, block, {n: block.get_submodule(n) for n in names}, block.mlp)
    counts = [hs[n][1] for n in names]
    assert hs[""][1] == calib.numel() and sum(counts) == 2 * calib.numel()  # top-2: two experts per token
    assert counts[3] == 0 and min(counts[:3]) > 0
    ctx = QuantContext(model, tokenizer, calib_ids=calib)
    summary = run_pipeline(ctx, [("gptq", GPTQConfig(bits=4, group_size=32))])[0]["summary"]
    assert summary["rtn_fallback_experts"] == ["model.layers.0.mlp.experts.3.down_proj"]


def test_passes_that_do_not_handle_moe_say_so(tokenizer, calib):
    ctx = QuantContext(tiny_moe("mixtral"), tokenizer, calib_ids=calib)
    with pytest.raises(QuantError, match="Mixture-of-Experts"):
        run_pipeline(ctx, [("d2quant", D2QuantConfig(bits=3, group_size=32))])
