"""D²Quant pieces: absorption, DAC's bias, the GPTAQ target, and the pass end to end with reload."""

import copy

import pytest
import torch
from conftest import tiny_model

from quant import QuantContext, load_quantized, run_pipeline, save_quantized
from quant.engine.blockwise import call_block, mlp_inputs, run_staged
from quant.engine.loop import capture
from quant.engine.structure import structure_of
from quant.errors import QuantError
from quant.methods.d2quant import D2QuantConfig, absorb_column_scale, gptaq_target
from quant.methods.rotation import RotationConfig, online_down_hadamard
from quant.runtime.dac import norm_bias_names
from quant.runtime.dsqlinear import DSQLinear


def test_absorption_alone_leaves_the_float_model_unchanged(smollm2):
    mlp = copy.deepcopy(smollm2.model.model.layers[7].mlp).double()  # float64: only the algebra is tested
    x = torch.randn(3, 11, 576, dtype=torch.float64)
    with torch.no_grad():
        ref = mlp(x)
        c = torch.rand(1536, dtype=torch.float64) * 2 + 0.1
        mlp.down_proj.weight.div_(c[None, :])
        absorb_column_scale(mlp.up_proj, c)
        torch.testing.assert_close(mlp(x), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_staged_block_is_the_block(model_type, calib):
    """run_staged computes exactly the block's output and shows each group its real input."""
    model = tiny_model(model_type)
    xs, kws = capture(model, model.model.layers, calib[:5, :48])
    block = model.model.layers[0]
    seen: dict = {}
    out = run_staged(block, structure_of(model), xs, kws[0], seen.__setitem__, chunk=2)
    # the reference: one plain forward of the block per window, each stage's input caught by a hook
    caught: dict = {}

    def catch(key):
        return lambda _m, args, out=None: caught.setdefault(key, []).append(args[0] if out is None else out)

    qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    gate_up, down = ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)
    hooks = [block.get_submodule(g[0]).register_forward_pre_hook(catch(g)) for g in (qkv, ("self_attn.o_proj",))]
    hooks += [block.get_submodule(g[0]).register_forward_pre_hook(catch(g)) for g in (gate_up, down)]
    hooks.append(block.post_attention_layernorm.register_forward_hook(catch("post_attention_norm")))
    with torch.no_grad():
        ref = torch.cat([call_block(block, x[None], kws[0]) for x in xs])
    for h in hooks:
        h.remove()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert list(seen) == [qkv, ("self_attn.o_proj",), "post_attention_norm", gate_up, down]
    for key, got in seen.items():
        torch.testing.assert_close(got, torch.cat(caught[key]), rtol=1e-5, atol=1e-5, msg=f"{key}")


def test_staged_block_with_the_online_down_hadamard_is_the_block(calib):
    """With the Hadamard before down_proj (an input op on its pre-hook), run_staged still computes the block's
    output (the op runs once, not again on the input it captured) and shows down_proj its input after the op."""
    model = tiny_model("llama")
    xs, kws = capture(model, model.model.layers, calib[:3, :32])
    block = model.model.layers[0]
    online_down_hadamard(structure_of(model), block)
    seen: dict = {}
    out = run_staged(block, structure_of(model), xs, kws[0], seen.__setitem__, chunk=2)
    caught = []
    hook = block.mlp.down_proj.register_forward_pre_hook(lambda _m, args: caught.append(args[0]))  # after the op
    with torch.no_grad():
        ref = torch.cat([call_block(block, x[None], kws[0]) for x in xs])
    hook.remove()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen[("mlp.down_proj",)], torch.cat(caught), rtol=1e-5, atol=1e-5)


def test_down_hadamard_with_gptaq_reloads_exactly_and_refuses_dsq(tmp_path, tokenizer, calib):
    rot = ("rotate", RotationConfig(mode="groupwise", block=32, down_hadamard=True))
    with pytest.raises(QuantError, match="DSQ cannot pass the online Hadamard before down_proj"):
        run_pipeline(QuantContext(tiny_model(), tokenizer, calib_ids=calib[:4, :64], progress=False),
                     [rot, ("d2quant", D2QuantConfig(bits=3, group_size=32))])
    model = tiny_model()
    ids = torch.randint(0, 49152, (1, 24))
    with torch.no_grad():
        ref = model(ids).logits
    ctx = QuantContext(model, tokenizer, calib_ids=calib[:4, :64], progress=False)
    info = run_pipeline(ctx, [rot, ("d2quant", D2QuantConfig(bits=4, group_size=32, dsq=False))])
    assert info[0]["summary"]["down_hadamard"] is True
    assert all(b.mlp.down_proj.input_ops.hadamard == 128 for b in model.model.layers)
    out = save_quantized(model, tokenizer, tmp_path / "q", {"method": "d2quant", "modules": ctx.modules})
    m2, _ = load_quantized(out)
    assert all(b.mlp.down_proj.input_ops.hadamard == 128 for b in m2.model.layers)
    with torch.no_grad():
        got = model(ids).logits
        assert torch.equal(got, m2(ids).logits)
    # 4-bit codes of the right weights (W_down H, with H applied at run time): the function is kept
    assert (got - ref).norm() < 0.2 * ref.norm()


def test_dac_bias_is_teacher_minus_student(tokenizer, calib):
    """After the pass, block 0's corrected norm output has the float model's mean (first tokens excluded)."""
    model = tiny_model()
    float_model = copy.deepcopy(model)
    ctx = QuantContext(model, tokenizer, calib_ids=calib)
    cfg = D2QuantConfig(bits=2, group_size=32, backend="rtn", dsq=False, dac=True, dac_teacher="float")
    run_pipeline(ctx, [("d2quant", cfg)])
    assert ctx.norm_biases[0] == "model.layers.0.post_attention_layernorm"

    def norm_out(m):
        got = []
        h = m.model.layers[0].post_attention_layernorm.register_forward_hook(lambda _m, _a, out: got.append(out))
        with torch.no_grad():
            m(calib)
        h.remove()
        return got[0][:, cfg.dac_skip_first :].mean((0, 1))

    teacher, student = norm_out(float_model), norm_out(model)
    atol = 1e-5
    torch.testing.assert_close(student, teacher, atol=atol, rtol=0)
    # not vacuous: 2-bit attention really moved the mean, by far more than the tolerance, and DAC moved it back
    bias = model.model.layers[0].post_attention_layernorm.bias
    assert bias.abs().max() > 100 * atol


def test_local_dac_teacher_is_float_attention_on_the_quantized_stream(tokenizer, calib):
    """With ``dac_teacher="local"``, block 1's corrected norm output has the mean that block 1's float
    attention gives on the quantized model's own block-1 inputs (which block 0's quantization moved)."""
    model = tiny_model()
    float_block = copy.deepcopy(model.model.layers[1])
    ctx = QuantContext(model, tokenizer, calib_ids=calib, progress=False)
    cfg = D2QuantConfig(bits=2, group_size=32, backend="rtn", dsq=False, dac=True, dac_teacher="local")
    run_pipeline(ctx, [("d2quant", cfg)])
    got: dict = {}

    def keep(key):
        def hook(_m, args, kw=None):
            got.setdefault(key, args[0] if args else kw["hidden_states"])

        return hook

    layer = model.model.layers[1]
    hooks = [
        layer.register_forward_pre_hook(keep("x"), with_kwargs=True),
        layer.mlp.register_forward_pre_hook(keep("student")),
    ]
    with torch.no_grad():
        model(calib)
    for h in hooks:
        h.remove()
    _, kws = capture(model, model.model.layers, calib[:1])  # only for the block's rotary/mask kwargs
    teacher = mlp_inputs(float_block, structure_of(model), got["x"], kws[1])
    k = cfg.dac_skip_first
    torch.testing.assert_close(got["student"][:, k:].mean((0, 1)), teacher[:, k:].mean((0, 1)), atol=1e-5, rtol=0)
    with pytest.raises(QuantError, match="DAC teacher"):
        D2QuantConfig(dac_teacher="teacher").spec()


def test_gptaq_target_without_drift_is_the_weight():
    x = torch.randn(500, 32, dtype=torch.float64)
    H = x.T @ x / 500
    w = torch.randn(8, 32)
    assert torch.equal(gptaq_target(w, H, H.clone(), 0.01), w)  # P - H = 0: nothing is added
    # with drift and no damping it is the least-squares solution of W x ≈ Ŵ x̃
    xt = x + 0.1 * torch.randn(500, 32, dtype=torch.float64)
    Ht, P = xt.T @ xt / 500, x.T @ xt / 500
    ws = gptaq_target(w, Ht, P, 0.0)
    ref = torch.linalg.lstsq(xt, x @ w.double().T).solution.T
    # all in float64 but the returned float32: each entry is off by its rounding, 2^-24 relative (and the solve
    # of a well-conditioned 32x32 system adds ~1e-14)
    torch.testing.assert_close(ws.double(), ref, rtol=2**-23, atol=1e-12)
    # alpha scales the correction: W + α (W* - W)
    ref_a = w.double() + 0.25 * (ref - w.double())
    torch.testing.assert_close(gptaq_target(w, Ht, P, 0.0, alpha=0.25).double(), ref_a, rtol=2**-23, atol=1e-12)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"backend": "gptq"},
        {"backend": "rtn", "bits": 2},
        {"dsq": False},
        {"dac": True, "backend": "gptq"},
    ],
)
def test_pass_end_to_end_reloads_exactly(tmp_path, tokenizer, calib, kw):
    model = tiny_model()
    ctx = QuantContext(model, tokenizer, calib_ids=calib[:4, :64], progress=False)
    cfg = D2QuantConfig(group_size=32, **kw)
    run_pipeline(ctx, [("rotate", RotationConfig(mode="groupwise", block=32)), ("d2quant", cfg)])
    down = model.model.layers[1].mlp.down_proj
    assert isinstance(down, DSQLinear) == cfg.dsq
    assert len(ctx.norm_biases) == (2 if cfg.dac else 0) and norm_bias_names(model) == ctx.norm_biases
    qc = {"method": "d2quant", "modules": ctx.modules, "norm_biases": ctx.norm_biases}
    out = save_quantized(model, tokenizer, tmp_path / "q", qc)
    m2, _ = load_quantized(out)
    assert norm_bias_names(m2) == ctx.norm_biases
    ids = torch.randint(0, 49152, (1, 24))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, m2(ids).logits)


def test_bad_backend():
    with pytest.raises(QuantError, match="unknown backend"):
        D2QuantConfig(backend="awq").spec()
