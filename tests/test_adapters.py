import pytest
import torch
from conftest import tiny_model
from torch import nn

from quant import QuantContext, QuantError, QuantLinear, RTNConfig, run_pipeline
from quant.adapters import LINEAR_ROLES, adapter_for


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_roles_resolve_and_rtn_runs(model_type):
    model = tiny_model(model_type)
    ad = adapter_for(model)
    block = ad.blocks(model)[0]
    lin = ad.linears(block)
    assert set(lin) == set(LINEAR_ROLES)
    assert lin["q"].in_features == 64 and lin["down"].in_features == 128
    assert lin["k"].out_features == 2 * (64 // 4)  # grouped-query attention: 2 kv heads of 16
    assert isinstance(ad.role(block, "input_norm"), nn.Module)
    assert isinstance(ad.role(block, "post_attention_norm"), nn.Module)
    assert ad.is_tied(model)
    ctx = QuantContext(model, progress=False)
    run_pipeline(ctx, [("rtn", RTNConfig(bits=4, group_size=32))])
    assert len(ctx.modules) == 14
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in ctx.modules)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 100, (1, 16))).logits).all()


def test_unsupported_architecture_names_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    supported = "llama, mistral, mixtral, olmoe, qwen2, qwen2_moe, qwen3, qwen3_moe"
    with pytest.raises(QuantError, match=f"unsupported architecture .gpt2.; supported: {supported}"):
        adapter_for(model)


def test_unknown_pass():
    with pytest.raises(QuantError, match="unknown method"):
        run_pipeline(QuantContext(tiny_model()), [("awq", RTNConfig())])
