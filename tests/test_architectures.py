"""Every pass on every family of the matrix (tests/arch_matrix.py): it runs and its checkpoint reloads
exactly (load_quantized, from_pretrained; GPTQ export and re-import for RTN and GPTQ), or it refuses with
the one line below. The README's architecture table is these cells (benchmarks/arch_table.py)."""

import pytest
from arch_matrix import FAMILIES, PASSES, run_cell

NOT_STAGED = "its blocks are not pre-norm `x + attn(norm(x))`, `h + mlp(norm(h))`"
NO_UP = "d2quant's DSQ cannot run on this {f} model: its MLP has no gated up projection"
LAYERNORM = "rotation cannot run on this {f} model: its norms are layernorm, not RMSNorm (mean-centring)"
POST = "rotation cannot run on this {f} model: post-norms sit between its writers and the residual stream"
FUSED_QKV = "FPTQuant cannot run on this {f} model: its attention has no separate q/k/v projections (fused)"
REFUSED = {
    ("gemma", "fptquant"): "FPTQuant cannot run on this gemma model: its norms are rms_1p",
    ("gemma2", "dac"): "d2quant's DAC cannot run on this gemma2 model: " + NOT_STAGED + " (post-norms",
    ("gemma2", "rotate"): POST,
    ("gemma2", "fptquant"): "FPTQuant cannot run on this gemma2 model: " + NOT_STAGED,
    ("gemma2", "w4a8"): "KV-cache quantization runs on SDPA attention, which has no logit soft-capping",
    ("gemma3_text", "dac"): "d2quant's DAC cannot run on this gemma3_text model: " + NOT_STAGED,
    ("gemma3_text", "rotate"): POST,
    ("gemma3_text", "fptquant"): "FPTQuant cannot run on this gemma3_text model: " + NOT_STAGED,
    ("phi3", "d2quant"): NO_UP,
    ("phi3", "fptquant"): FUSED_QKV,
    ("phi", "d2quant"): NO_UP,
    ("phi", "dac"): "d2quant's DAC cannot run on this phi model: " + NOT_STAGED + " (parallel attention and MLP)",
    ("phi", "rotate"): LAYERNORM,
    ("phi", "fptquant"): "FPTQuant cannot run on this phi model: " + NOT_STAGED,
    ("gpt2", "d2quant"): NO_UP,
    ("gpt2", "rotate"): LAYERNORM,
    ("gpt2", "fptquant"): FUSED_QKV,
    ("gpt_neox", "d2quant"): NO_UP,
    ("gpt_neox", "dac"): "d2quant's DAC cannot run on this gpt_neox model: " + NOT_STAGED,
    ("gpt_neox", "rotate"): LAYERNORM,
    ("gpt_neox", "fptquant"): "FPTQuant cannot run on this gpt_neox model: " + NOT_STAGED,
    ("falcon", "d2quant"): NO_UP,
    ("falcon", "dac"): "d2quant's DAC cannot run on this falcon model: " + NOT_STAGED,
    ("falcon", "rotate"): LAYERNORM,
    ("falcon", "fptquant"): "FPTQuant cannot run on this falcon model: " + NOT_STAGED,
    ("olmo2", "dac"): "d2quant's DAC cannot run on this olmo2 model: " + NOT_STAGED + " (post-norms",
    ("olmo2", "rotate"): POST,
    ("olmo2", "fptquant"): "FPTQuant cannot run on this olmo2 model: " + NOT_STAGED,
    ("cohere", "dac"): "d2quant's DAC cannot run on this cohere model: " + NOT_STAGED,
    ("cohere", "rotate"): LAYERNORM,
    ("cohere", "fptquant"): "FPTQuant cannot run on this cohere model: " + NOT_STAGED,
    ("granite", "dac"): "d2quant's DAC cannot run on this granite model: " + NOT_STAGED + " (checked numerically",
    ("granite", "fptquant"): "FPTQuant cannot run on this granite model: " + NOT_STAGED,
    ("starcoder2", "d2quant"): NO_UP,
    ("starcoder2", "rotate"): LAYERNORM,
    ("starcoder2", "fptquant"): "FPTQuant cannot run on this starcoder2 model: its MLP has no separate gate/up",
    ("qwen2_moe", "nsds"): "bit allocation cannot run on this qwen2_moe model: it has Mixture-of-Experts blocks",
    ("qwen2_moe", "fptquant"): "FPTQuant cannot run on this qwen2_moe model: it has Mixture-of-Experts blocks",
    ("qwen3", "fptquant"): "FPTQuant's pre-RoPE transform cannot merge through per-head q/k norms",
}


@pytest.mark.parametrize("name", PASSES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_pass_on_family(family, name, tokenizer, calib, tmp_path):
    got = run_cell(family, name, tokenizer, calib, tmp_path)
    want = REFUSED.get((family, name), "✔").format(f=family)
    assert got.startswith(want) if want != "✔" else got == "✔", got


def test_every_refusal_is_a_real_cell():
    assert {f for f, _ in REFUSED} <= set(FAMILIES) and {p for _, p in REFUSED} <= set(PASSES)
