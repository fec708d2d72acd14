"""The weight quantizer passes: RTN and GPTQ over every block linear (q/k/v/o, gate/up/down).

Embeddings, norms and lm_head stay in float, as in the GPTQ/QuaRot evaluation lineage.
"""

from __future__ import annotations

from dataclasses import dataclass

from quant.engine.options import option
from quant.engine.passes import QuantContext, register_block_pass
from quant.engine.structure import normalize
from quant.methods.blockquant import QuantizeStep, Solver
from quant.numerics.grid import QuantSpec, check_finite

GROUP_HELP = (
    "Inputs per quantization group: 32, 48, 64, 96, 128, 192, 256 (48, 96, 192 for --codebook vq3, whose groups "
    "need a multiple of 3), or -1 for per-channel. A layer whose width it does not divide uses the largest "
    "supported group that divides both (recorded per layer)."
)
CLIP_HELP = "Range per group: minmax, or mse (search the clipping that minimises the weight error)."
DAMP_HELP = "Damping added to the Hessian diagonal, as a fraction of its mean."
ACT_ORDER_HELP = "Quantize columns in order of decreasing Hessian diagonal."
SCALE_BITS_HELP = (
    "Bits per group scale: 16 (fp16 scales, uint8 zero-points) or 8 (scales as 8-bit codes on a per-row "
    "logarithmic grid, zero-points in 4 bits, codes packed densely; bits 2-4): 3-bit codes at group 64 cost 3.24 "
    "bits per weight instead of 3.6. A format-version-2 checkpoint, with no GPTQ export. DSQ layers keep fp16 "
    "row scales."
)
CODEBOOK_HELP = (
    "Code levels: uniform (equally spaced, with a zero-point per group) or kmeans (each layer's own 2^bits levels, "
    "fitted by 1-D k-means to its group-normalized weights; no zero-points, so 4 bits per group fewer; needs "
    "--scale-bits 8; a format-version-3 checkpoint the CPU kernel decodes), or vq2 / vq3 (the same, but each "
    "layer's 2^(2 bits) or 2^(3 bits) entries cover 2 or 3 consecutive weights: vector quantization, the codes still "
    "bits per weight; group size a multiple of 2 or 3; vq3 up to 3 bits; format version 4, its own portable CPU "
    "kernel, CUDA dequantizes). No GPTQ export for any codebook."
)


@dataclass
class RTNConfig:
    """Round to nearest: no data."""

    bits: int = option(4, "Weight bit width: 2, 3, 4 or 8.", "--bits")
    group_size: int = option(128, GROUP_HELP, "--group-size")
    sym: bool = option(False, "Symmetric (fixed zero-point) or asymmetric groups.", "--sym/--asym")
    # min-max measured better than the MSE clip search for RTN on SmolLM2 (benchmarks/results/clip.md)
    clip: str = option("minmax", CLIP_HELP, "--clip")
    scale_bits: int = option(16, SCALE_BITS_HELP, "--scale-bits")
    codebook: str = option("uniform", CODEBOOK_HELP, "--codebook")

    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.sym, self.clip, self.scale_bits, self.codebook)

    def validate(self) -> None:
        self.spec()


@dataclass
class GPTQConfig(RTNConfig):
    """GPTQ: calibrated, error feedback through the inverse Hessian."""

    clip: str = option("mse", CLIP_HELP, "--clip")  # measured better than min-max at w3 on SmolLM2 (results/clip.md)
    damp: float = option(0.01, DAMP_HELP, "--damp")
    act_order: bool = option(True, ACT_ORDER_HELP, "--act-order/--no-act-order")
    block_size: int = option(128, "Columns per lazy-update block of the solver.")


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
