"""Structure discovery (quant.engine.structure): what it finds in each family, and that it finds it from the model.

Facts are checked against the families' modeling code in transformers (read by hand), not against the
names our code looks for: the discovery never reads names, so a wrong graph walk shows up here.
"""

import copy

import pytest
import torch
from arch_matrix import FAMILIES, family_model
from conftest import tiny_model

from quant import QuantContext, QuantError, QuantLinear, RTNConfig, run_pipeline
from quant.engine.structure import LINEAR_ROLES, normalize, structure_of
from quant.numerics.grid import quantize_rtn

# family -> (stages of block 0, pre-norm kinds, writers through post-norms, parallel, staged)
FACTS = {
    "llama": ([["q", "k", "v"], ["o"], ["gate", "up"], ["down"]], {"rms"}, False, False, True),
    "gemma": ([["q", "k", "v"], ["o"], ["gate", "up"], ["down"]], {"rms_1p"}, False, False, True),
    "gemma2": ([["q", "k", "v"], ["o"], ["gate", "up"], ["down"]], {"rms_1p"}, True, False, False),
    "gemma3_text": ([["q", "k", "v"], ["o"], ["gate", "up"], ["down"]], {"rms_1p"}, True, False, False),
    "olmo2": ([["q", "k", "v"], ["o"], ["gate", "up"], ["down"]], set(), True, False, False),
    "phi3": ([["self_attn.qkv_proj"], ["o"], ["mlp.gate_up_proj"], ["down"]], {"rms"}, False, False, True),
    "phi": ([["q", "k", "v", "mlp.fc1"], ["o", "down"]], {"layernorm"}, False, True, False),
    "gpt2": ([["attn.c_attn"], ["o"], ["mlp.c_fc"], ["down"]], {"layernorm"}, False, False, True),
    "gpt_neox": ([["attention.query_key_value", "mlp.dense_h_to_4h"], ["o", "down"]], {"layernorm"}, False, True,
                 False),
    "falcon": ([["self_attention.query_key_value", "mlp.dense_h_to_4h"], ["o", "down"]], {"layernorm"}, False, True,
               False),
    "cohere": ([["q", "k", "v", "gate", "up"], ["o", "down"]], {"layernorm"}, False, True, False),
    "granite": ([["q", "k", "v"], ["o"], ["gate", "up"], ["down"]], {"rms"}, False, False, False),  # multipliers
    "starcoder2": ([["q", "k", "v"], ["o"], ["mlp.c_fc"], ["down"]], {"layernorm"}, False, False, True),
}  # fmt: skip


@pytest.mark.parametrize("family", list(FACTS))
def test_discovered_structure(family):
    stages, kinds, post, parallel, staged = FACTS[family]
    s = structure_of(family_model(family))
    b = s.block_info[0]
    assert [[b.roles.get(n, n) for n in st] for st in stages] == b.stages
    assert {k for k, p in b.norms.values() if p == "pre"} == kinds
    assert any(b.writers.values()) == post
    assert b.parallel == parallel and b.staged == staged
    assert len(s.block_info) == 2


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_roles_resolve_and_rtn_runs(model_type):
    model = tiny_model(model_type)
    s = structure_of(model)
    assert s.blocks(model) is model.model.layers
    block = s.blocks(model)[0]
    attn, mlp = block.self_attn, block.mlp
    want = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj}
    want |= {"gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}
    assert all(s.role(block, r) is want[r] for r in LINEAR_ROLES)
    assert s.role(block, "k").out_features == 2 * (64 // 4)  # grouped-query attention: 2 kv heads of 16
    assert s.role(block, "input_norm") is block.input_layernorm
    assert s.role(block, "post_attention_norm") is block.post_attention_layernorm
    assert s.embeddings(model) is model.model.embed_tokens and s.head(model) is model.lm_head
    assert s.is_tied(model) and s.final_norm == "model.norm"
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


def test_conv1d_becomes_linear_computing_the_same():
    model = family_model("gpt2")
    x = torch.randint(0, 49152, (2, 20))
    with torch.no_grad():
        ref = model(x).logits
        normalize(model)
        assert isinstance(model.transformer.h[0].attn.c_attn, torch.nn.Linear)
        assert model.transformer.h[0].attn.c_attn.weight.shape == (192, 64)  # [out, in], not Conv1D's [in, out]
        torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=1e-5)
    assert structure_of(model).position_embeddings


def test_each_block_replays_its_own_attention_arguments(tokenizer, monkeypatch):
    """Gemma 3 alternates sliding-window and global layers: block 1 must see its own mask, not block 0's,
    both where they are recorded and where the quantizer runs the block."""
    import quant.methods.blockquant as bq
    from quant import GPTQConfig, QuantContext, run_pipeline
    from quant.engine.blockwise import call_block
    from quant.engine.loop import capture

    model = family_model("gemma3_text")
    ids = torch.randint(0, 49152, (2, 40), generator=torch.Generator().manual_seed(0))
    x0, kws = capture(model, model.model.layers, ids)
    assert not torch.equal(kws[0]["position_embeddings"][0], kws[1]["position_embeddings"][0])
    got = []
    h = model.model.layers[1].register_forward_hook(lambda _m, _a, out: got.append(out[0] if isinstance(out, tuple)
                                                                                   else out))  # fmt: skip
    with torch.no_grad():
        model(ids[:1], use_cache=False)
        h.remove()
        want = got[0]
        x1 = call_block(model.model.layers[0], x0[:1], kws[0])
        out = call_block(model.model.layers[1], x1, kws[1])
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        wrong = call_block(model.model.layers[1], x1, kws[0])  # block 0's (sliding) arguments: different
    assert not torch.allclose(wrong, want, atol=1e-4)
    seen = []  # the quantizer runs each block with its own arguments
    real = bq.run_staged
    monkeypatch.setattr(bq, "run_staged", lambda b, s, x, kw, visit: seen.append(kw) or real(b, s, x, kw, visit))
    run_pipeline(QuantContext(model, None, calib_ids=ids, progress=False), [("gptq", GPTQConfig(group_size=32))])
    assert [torch.equal(k["position_embeddings"][0], kws[i]["position_embeddings"][0]) for i, k in enumerate(seen)] \
        == [True] * len(kws)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("gemma2", "gemma3_text", "olmo2")])
def test_rotation_preserves_the_function_where_it_applies(family):
    from quant.methods.rotation import ROTATION_NEEDS, RotationConfig

    model = family_model(family)
    s = structure_of(model)
    x = torch.randint(0, 49152, (2, 20))
    with torch.no_grad():
        ref = model(x).logits
    ctx = QuantContext(model, progress=False)
    if s.missing(ROTATION_NEEDS):
        with pytest.raises(QuantError, match="rotation cannot run on this"):
            run_pipeline(ctx, [("rotate", RotationConfig())])
        return
    run_pipeline(ctx, [("rotate", RotationConfig())])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref, rtol=1e-4, atol=1e-4)


def test_a_declarative_entry_adds_a_role_the_graph_cannot_fix(monkeypatch):
    from quant.engine import structure

    assert "up" not in structure_of(family_model("starcoder2")).roles  # non-gated MLP: no up projection
    monkeypatch.setitem(structure.ROLE_OVERRIDES, "starcoder2", {"up": "mlp.c_fc", "gate": "mlp.no_such"})
    roles = structure_of(family_model("starcoder2")).roles
    assert roles["up"] == "mlp.c_fc" and "gate" not in roles


def test_unsupported_architecture_is_refused_by_name():
    from quant.engine.structure import check_model_type

    with pytest.raises(QuantError, match="unsupported architecture 'vit': transformers has no causal language model"):
        check_model_type("vit")
    check_model_type("gpt2")  # any causal LM transformers builds


def test_unknown_pass():
    with pytest.raises(QuantError, match="unknown method"):
        run_pipeline(QuantContext(tiny_model()), [("awq", RTNConfig())])
