"""Mergeable rotation: Hadamard constructions, and the rotated float model is the same function."""

import copy

import pytest
import torch
from conftest import tiny_model

from quant import QuantContext, run_pipeline
from quant.errors import QuantError
from quant.methods.rotation import RotationConfig
from quant.numerics.hadamard import block_hadamard, hadamard, has_hadamard, random_orthogonal


@pytest.mark.parametrize("n", [1, 2, 8, 12, 20, 576, 960, 896, 1536, 5120])
def test_hadamard_is_orthonormal_with_flat_entries(n):
    h = hadamard(n)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(h.abs(), torch.full_like(h, n**-0.5), atol=1e-12, rtol=0)


def test_orders_without_construction():
    assert not has_hadamard(9) and not has_hadamard(6) and not has_hadamard(0)
    with pytest.raises(QuantError, match="no Hadamard construction for order 9"):
        hadamard(9)
    b = block_hadamard(576, 64)
    assert torch.equal(b, torch.block_diag(*[hadamard(64)] * 9))  # 9 copies of the order-64 Hadamard
    r = random_orthogonal(50, seed=3)
    torch.testing.assert_close(r.T @ r, torch.eye(50, dtype=torch.float64), atol=1e-12, rtol=0)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.double()


def assert_same_function(rotated, ref32, ref64):
    """Rotation is exact in exact arithmetic, so the rotated float32 model is one more float32 evaluation of the
    same function: its distance to the float64 evaluation of the original is of the size of the original's own
    float32 error, measured here (4x: room for the rotated weights' own rounding); a wrong rotation is O(1) off."""
    assert (rotated - ref64).abs().max() <= 4 * (ref32 - ref64).abs().max()


def _with_references(m):
    """Non-trivial norm scales (so folding is exercised), token ids, and the float32 and float64 logits."""
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    ids = torch.randint(0, 49152, (2, 16))
    return m, ids, _logits(m, ids), _logits(copy.deepcopy(m).double(), ids)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("mode", ["hadamard", "groupwise", "random"])
def test_rotated_tiny_model_is_the_same_function(model_type, mode):
    kw = {"hidden_size": 96, "head_dim": 24} if mode != "groupwise" else {}
    m, ids, ref, ref64 = _with_references(tiny_model(model_type, **kw))
    info = run_pipeline(QuantContext(m, progress=False), [("rotate", RotationConfig(mode=mode, block=32))])
    assert info[0]["summary"]["untied_embeddings"] is True
    assert m.lm_head.weight is not m.model.embed_tokens.weight
    assert_same_function(_logits(m, ids), ref, ref64)


def test_online_down_hadamard_keeps_the_function():
    m, ids, ref, ref64 = _with_references(tiny_model("llama"))
    down0 = m.model.layers[0].mlp.down_proj.weight.detach().clone()
    run_pipeline(QuantContext(m, progress=False), [("rotate", RotationConfig(down_hadamard=True))])
    assert_same_function(_logits(m, ids), ref, ref64)
    assert m.model.layers[0].mlp.down_proj.input_ops.hadamard == 128
    # the down_proj weight's input side is rotated too, not only its output side (the residual's Qᵀ)
    q = hadamard(64)
    torch.testing.assert_close(m.model.layers[0].mlp.down_proj.weight.double(),
                               q.T @ down0.double() @ hadamard(128), rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])  # qwen2: v_proj has a bias
def test_head_hadamard_keeps_the_function_and_rotates_each_head(model_type):
    m, ids, ref, ref64 = _with_references(tiny_model(model_type))  # 4 query heads, 2 KV heads of 16
    attn = m.model.layers[1].self_attn
    o0, v0 = attn.o_proj.weight.detach().double().clone(), attn.v_proj.weight.detach().double().clone()
    gamma = m.model.layers[1].input_layernorm.weight.detach().double().clone()
    info = run_pipeline(QuantContext(m, progress=False), [("rotate", RotationConfig(head_hadamard=True))])
    assert info[0]["summary"]["head_hadamard"] is True
    assert_same_function(_logits(m, ids), ref, ref64)
    q, h = hadamard(64), hadamard(16)
    # o_proj: the residual's Qᵀ on its output side, the head Hadamard on each head's input columns
    torch.testing.assert_close(attn.o_proj.weight.double(), q.T @ o0 @ torch.block_diag(h, h, h, h), rtol=0, atol=1e-5)
    # v_proj: each KV head's rows rotated, its input side the folded norm and the residual rotation
    torch.testing.assert_close(torch.block_diag(h, h).T @ (v0 * gamma) @ q, attn.v_proj.weight.double(),
                               rtol=0, atol=1e-5)


def test_head_hadamard_needs_separate_projections_and_a_head_hadamard():
    with pytest.raises(QuantError, match="--head-hadamard: no Hadamard of order 6"):
        run_pipeline(QuantContext(tiny_model("llama", head_dim=6), progress=False),
                     [("rotate", RotationConfig(mode="random", head_hadamard=True))])
    with pytest.raises(QuantError, match="--head-hadamard cannot run on this phi3 model: .*no separate q/k/v"):
        run_pipeline(QuantContext(tiny_model("phi3"), progress=False), [("rotate", RotationConfig(head_hadamard=True))])


def test_rotated_smollm2_is_the_same_function(smollm2, tokenizer):
    from quant.formats.models import load_model

    lm = load_model()
    ids = tokenizer("The capital of France is Paris. It is known for", return_tensors="pt").input_ids
    ref, ref64 = _logits(smollm2.model, ids), _logits(lm.model.double(), ids)
    lm.model.float()  # float32 -> float64 -> float32 is exact: lm is the float32 model again
    info = run_pipeline(QuantContext(lm.model, progress=False), [("rotate", RotationConfig())])
    assert info[0]["summary"]["rotation"] == "Hadamard 576"
    out = _logits(lm.model, ids)
    assert_same_function(out, ref, ref64)
    assert torch.equal(out[0, -1].argmax(), ref[0, -1].argmax())
