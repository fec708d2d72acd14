import copy

import pytest
import torch
from conftest import tiny_model

from quant import QuantContext, QuantError, QuantLinear, RTNConfig, run_pipeline
from quant.grid import quantize_rtn
from quant.structure import LINEAR_ROLES, structure_of


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_roles_resolve_and_rtn_runs(model_type):
    model = tiny_model(model_type)
    ad = structure_of(model)
    assert ad.blocks(model) is model.model.layers
    block = ad.blocks(model)[0]
    lin = ad.linears(block)
    attn, mlp = block.self_attn, block.mlp
    want = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj}
    want |= {"gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}
    assert set(lin) == set(LINEAR_ROLES) and all(lin[r] is want[r] for r in LINEAR_ROLES)
    assert lin["k"].out_features == 2 * (64 // 4)  # grouped-query attention: 2 kv heads of 16
    assert ad.role(block, "input_norm") is block.input_layernorm
    assert ad.role(block, "post_attention_norm") is block.post_attention_layernorm
    assert ad.embeddings(model) is model.model.embed_tokens and ad.head(model) is model.lm_head
    assert ad.is_tied(model)
    with torch.no_grad():  # qwen2's q/k/v biases start at 0: give them values, so that they have to be kept
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.uniform_(-1, 1)
    ref = copy.deepcopy(model)
    ctx = QuantContext(model, progress=False)
    run_pipeline(ctx, [("rtn", RTNConfig(bits=4, group_size=32))])
    assert len(ctx.modules) == 14
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in ctx.modules)
    # the quantized model is the float one with each linear's weight replaced by the RTN grid's
    spec = RTNConfig(bits=4, group_size=32).spec()
    with torch.no_grad():
        for name in ctx.modules:
            w = ref.get_submodule(name).weight
            assert torch.equal(model.get_submodule(name).dequantize(), quantize_rtn(w, spec).dequantize()), name
            w.copy_(model.get_submodule(name).dequantize())
        ids = torch.randint(0, 100, (1, 16))
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)


def test_unsupported_architecture_names_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    supported = "llama, mistral, mixtral, olmoe, qwen2, qwen2_moe, qwen3, qwen3_moe"
    with pytest.raises(QuantError, match=f"unsupported architecture .gpt2.; supported: {supported}"):
        structure_of(model)


def test_unknown_pass():
    with pytest.raises(QuantError, match="unknown method"):
        run_pipeline(QuantContext(tiny_model()), [("awq", RTNConfig())])
