"""The architecture × pass matrix: tiny random-init models of 17 families, each quantized by every pass.

A cell is ``"✔"`` when the pass ran and the checkpoint it wrote reloads, through ``load_quantized`` and
through transformers' ``from_pretrained``, to exactly the logits of the model in memory (and, for RTN and
GPTQ, when the GPTQ-format export re-imports to those logits too); otherwise it is the one-line refusal
the pass gave. Anything else (a traceback, different logits) raises. ``tests/test_architectures.py``
runs every cell; ``benchmarks/arch_table.py`` writes the table in the README from the same cells.

Random weights: these models say nothing about quality, only about mechanics and structure.
"""

from __future__ import annotations

from pathlib import Path

import torch

# model_type -> config overrides on conftest.tiny_config (hidden 64, 4 heads of 16, 2 kv heads, 2 layers)
FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma": {},
    "gemma2": {},
    "gemma3_text": {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
    "phi3": {},
    "phi": {},
    "gpt2": {},
    "gpt_neox": {"rotary_pct": 0.5},
    "falcon": {"head_dim": None, "new_decoder_architecture": True, "num_kv_heads": 2},
    "olmo2": {},
    "cohere": {},
    "granite": {"residual_multiplier": 0.5, "embedding_multiplier": 2.0, "logits_scaling": 2.0},
    "starcoder2": {},
    "qwen2_moe": {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 96, "decoder_sparse_step": 1, "mlp_only_layers": [],
    },
}  # fmt: skip

PASSES = ("rtn", "gptq", "gptaq", "d2quant", "dac", "nsds", "rotate", "fptquant", "w4a8")


def family_model(family: str, seed: int = 0):
    from conftest import tiny_config
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(FAMILIES[family])
    if kw.pop("head_dim", 0) is None:  # Falcon derives it and refuses to be given one
        base = tiny_config("llama", **kw).to_dict()
        cfg = {k: base[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")}
        config = AutoConfig.for_model(family, **cfg, tie_word_embeddings=True, **kw)
    else:
        config = tiny_config(family, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # norms and biases start at 1/0: give them values, so that folding them is tested
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def steps(name: str) -> list[tuple]:
    from quant import GPTQConfig, RTNConfig
    from quant.methods.allocation import AllocationConfig
    from quant.methods.d2quant import D2QuantConfig
    from quant.methods.fpt import FPTConfig, FPTQuantConfig
    from quant.methods.rotation import RotationConfig
    from quant.runtime.inputops import ActQuantConfig

    g = 32
    return {
        "rtn": [("rtn", RTNConfig(bits=4, group_size=g))],
        "gptq": [("gptq", GPTQConfig(bits=4, group_size=g))],
        "gptaq": [("d2quant", D2QuantConfig(bits=3, group_size=g, dsq=False))],
        "d2quant": [("d2quant", D2QuantConfig(bits=3, group_size=g))],
        "dac": [("d2quant", D2QuantConfig(bits=3, group_size=g, dsq=False, dac=True))],
        "nsds": [("allocate", AllocationConfig(budget=3.0, group_size=g)), ("gptq", GPTQConfig(bits=3, group_size=g))],
        "rotate": [("rotate", RotationConfig()), ("rtn", RTNConfig(bits=4, group_size=g))],
        "fptquant": [
            ("fptquant", FPTQuantConfig(bits=4, group_size=g, transforms=FPTConfig(local_steps=2, e2e_steps=1)))
        ],
        "w4a8": [("rtn", RTNConfig(bits=4, group_size=g)), ("actquant", ActQuantConfig(bits=8, kv_bits=8))],
    }[name]


def run_cell(family: str, name: str, tokenizer, calib: torch.Tensor, tmp: Path) -> str:
    """Run one pass on one family (see the module docstring); returns "✔" or the refusal."""
    from transformers import AutoModelForCausalLM

    from quant import QuantContext, QuantError, load_quantized, run_pipeline, save_quantized
    from quant.formats.gptq_format import export_gptq, load_gptq

    model = family_model(family)
    ctx = QuantContext(model, tokenizer, calib_ids=calib, progress=False)
    try:
        passes = run_pipeline(ctx, steps(name))
    except QuantError as e:
        msg = str(e)
        assert "\n" not in msg and msg, msg
        return msg
    qc = {
        "method": name,
        "modules": ctx.modules,
        "norm_biases": ctx.norm_biases,
        "passes": [{"name": p["name"], "config": p["config"]} for p in passes],
    }
    ck = save_quantized(model, tokenizer, tmp / f"{family}-{name}", qc)
    x = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).logits
        a, _ = load_quantized(ck)
        b = AutoModelForCausalLM.from_pretrained(ck)
        for what, m in (("load_quantized", a), ("from_pretrained", b)):
            got = m(x).logits
            assert torch.equal(got, ref), f"{family}/{name}: {what} logits differ by {(got - ref).abs().max()}"
        if name in ("rtn", "gptq"):
            back, _ = load_gptq(export_gptq(ck, tmp / f"{family}-{name}-gptq", checkpoint_format="gptq_v2"))
            got = back(x).logits
            assert torch.equal(got, ref), f"{family}/{name}: GPTQ re-import differs by {(got - ref).abs().max()}"
    return "✔"
