"""The weight quantizer passes: RTN and GPTQ over every block linear (q/k/v/o, gate/up/down).

Embeddings, norms and lm_head stay in float, as in the GPTQ/QuaRot evaluation lineage.
"""

from __future__ import annotations

from dataclasses import dataclass

from quant.engine.passes import QuantContext, register_block_pass
from quant.engine.structure import normalize
from quant.methods.blockquant import QuantizeStep, Solver
from quant.numerics.grid import QuantSpec, check_finite


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
    """Validate every target before touching any: NaN/Inf weights and group fit fail fast (a streamed
    model's weights are still on the meta device here: they are checked as they are read).

    Fused MoE experts are split into one linear per expert projection, GPT-2's Conv1D become nn.Linear
    (``quant.engine.structure.normalize``: the same function)."""
    if not ctx.streaming:
        normalize(ctx.model)
    names = ctx.structure.linear_names(ctx.model)
    for name in names:
        w = ctx.model.get_submodule(name).weight
        if not w.is_meta:
            check_finite(w, name)
        ctx.spec_for(name, spec).group_for(w.shape[1])
    return names


@register_block_pass("rtn", RTNConfig, quantizer=True)
def rtn(ctx: QuantContext, config: RTNConfig) -> QuantizeStep:
    spec = config.spec()
    check_model(ctx, spec)
    return QuantizeStep("rtn", ctx, Solver(spec, backend="rtn"))


@register_block_pass("gptq", GPTQConfig, needs_calibration=True, quantizer=True)
def gptq(ctx: QuantContext, config: GPTQConfig) -> QuantizeStep:
    spec = config.spec()
    check_model(ctx, spec)
    solver = Solver(spec, backend="gptq", damp=config.damp, act_order=config.act_order, block_size=config.block_size)
    return QuantizeStep("gptq", ctx, solver)
