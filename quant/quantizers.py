"""The weight quantizer passes: RTN and GPTQ over every block linear (q/k/v/o, gate/up/down).

Embeddings, norms and lm_head stay in float, as in the GPTQ/QuaRot evaluation lineage.
"""

from __future__ import annotations

from dataclasses import dataclass

from tqdm.auto import tqdm

from quant.blockwise import quantize_blockwise
from quant.gptq import gptq_quantize
from quant.grid import QuantSpec, check_finite, quantize_rtn
from quant.passes import QuantContext, register_pass
from quant.quantlinear import QuantLinear
from quant.structure import normalize


@dataclass
class RTNConfig:
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    # min-max measured better than the MSE clip search for RTN on SmolLM2 (benchmarks/results/clip.md)
    clip: str = "minmax"

    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.sym, self.clip)


@dataclass
class GPTQConfig(RTNConfig):
    clip: str = "mse"  # measured better than min-max for GPTQ at w3 on SmolLM2 (benchmarks/results/clip.md)
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    act_order: bool = True
    block_size: int = 128  # lazy-update block (columns)


def check_model(ctx: QuantContext, spec: QuantSpec) -> list[str]:
    """Validate every target before touching any: NaN/Inf weights and group fit fail fast.

    Fused MoE experts are split into one linear per expert projection, GPT-2's Conv1D become nn.Linear
    (``quant.structure.normalize``: the same function)."""
    normalize(ctx.model)
    names = ctx.structure.linear_names(ctx.model)
    for name in names:
        w = ctx.model.get_submodule(name).weight
        check_finite(w, name)
        ctx.spec_for(name, spec).group_for(w.shape[1])
    return names


@register_pass("rtn", RTNConfig, quantizer=True)
def rtn(ctx: QuantContext, config: RTNConfig) -> dict:
    spec = config.spec()
    names = check_model(ctx, spec)
    for name in tqdm(names, desc="rtn", disable=not ctx.progress, unit="layer"):
        lin = ctx.model.get_submodule(name)
        s = ctx.spec_for(name, spec)
        ctx.install(name, QuantLinear.from_quantized(quantize_rtn(lin.weight, s), lin.bias), s.sym)
    return {"layers": len(names)}


@register_pass("gptq", GPTQConfig, needs_calibration=True, quantizer=True)
def gptq(ctx: QuantContext, config: GPTQConfig) -> dict:
    spec = config.spec()
    names = check_model(ctx, spec)
    structure, prefix = ctx.structure, ctx.structure.layers
    n_blocks = len(structure.blocks(ctx.model))

    rounded: list[str] = []

    def quantize_group(i, block, linears, hessians):
        for rel, lin in linears.items():
            name, H = f"{prefix}.{i}.{rel}", hessians[rel]
            s = ctx.spec_for(name, spec)
            if H is None:  # an expert's down_proj that the calibration tokens (almost) never reached
                qw = quantize_rtn(lin.weight, s)
                rounded.append(name)
            else:
                qw = gptq_quantize(lin.weight, H, s, config.damp, config.act_order, config.block_size)
            ctx.install(name, QuantLinear.from_quantized(qw, lin.bias), s.sym)

    bar = tqdm(range(n_blocks), desc="gptq", disable=not ctx.progress, unit="block")
    quantize_blockwise(ctx.model, structure, ctx.calib_ids, quantize_group, bar)
    out = {"layers": len(names), "calibration_tokens": int(ctx.calib_ids.numel())}
    if rounded:
        out["rtn_fallback_experts"] = rounded
    return out
