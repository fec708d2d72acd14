"""D²Quant (arXiv:2602.02546) as a pass: sub-4-bit weight-only quantization of every block linear.

Per block, in the order of methods.md §1.3:

1. q/k/v, then o: asymmetric uniform groups with the MSE clip search, by the chosen backend;
2. DAC (opt-in, ``dac=True``: with GPTAQ it measured slightly worse at 3 and 2 bits, GPTAQ's target
   already fitting each linear to the drifted inputs): the post-attention norm gets the bias ``μ`` =
   mean(teacher − quantized) of its output, the teacher being float attention run on the quantized
   stream's own inputs (``dac_teacher="local"``: only this block's attention error is corrected) or the
   float model's own output there (``"float"``, methods.md §1.3 as worded: it also "corrects" the drift
   earlier blocks left, which GPTAQ's objective already targets; measured far worse, collapsing at 2 bits:
   benchmarks/results/d2quant.md);
3. gate/up on inputs that include the corrected norm;
4. down_proj with DSQ (2 and 3 bits), whose per-column scale is then absorbed into up_proj;
5. both activation streams advance through the block.

Each block costs one float and one quantized forward on the block engine (``quant.methods.blockquant``): every
group is quantized as soon as its input has been computed for all calibration windows.

Backends: ``gptaq`` (default): GPTQ on the target ``W + W·E[(x - x̃) x̃ᵀ]·(H + λI)⁻¹``, which is the
unconstrained minimiser of ``E‖W x − Ŵ x̃‖²`` (float inputs x, the quantized model's own inputs x̃):
the asymmetric calibration of GPTAQ, as one closed-form target followed by ordinary GPTQ (the two
have the same objective), with the correction scaled by ``gptaq_alpha`` (0.25, as GPTAQ's release);
``gptq`` (inputs x̃ only); ``rtn`` (no Hessian; DAC still uses data).
The mergeable rotation is a separate pass (``rotate``) that runs first.
"""

from __future__ import annotations

from dataclasses import dataclass

from quant.engine.options import option
from quant.engine.passes import QuantContext, register_block_pass
from quant.engine.structure import PASS_NEEDS
from quant.errors import QuantError
from quant.methods.blockquant import QuantizeStep, Solver, absorb_column_scale, gptaq_target  # noqa: F401  (public here)
from quant.methods.dsq import DSQ_BITS
from quant.methods.quantizers import (
    ACT_ORDER_HELP,
    CLIP_HELP,
    CODEBOOK_HELP,
    DAMP_HELP,
    GROUP_HELP,
    SCALE_BITS_HELP,
    check_model,
)
from quant.numerics.grid import QuantSpec
from quant.runtime.inputops import ops_modules

BACKENDS = ("gptaq", "gptq", "rtn")
DAC_TEACHERS = ("float", "local")


@dataclass
class D2QuantConfig:
    """D²Quant: dual-scale down_proj, GPTAQ, optional deviation-aware norm correction (sub-4-bit)."""

    bits: int = option(3, "Weight bit width: 2, 3, 4 or 8.", "--bits")
    group_size: int = option(64, GROUP_HELP, "--group-size")
    backend: str = option("gptaq", "The solver for every layer: gptaq, gptq or rtn.", "--backend")
    dsq: bool = option(True, "Dual-scale quantizer on down_proj (2 and 3 bits).", "--dsq/--no-dsq")
    # opt-in: measured worse with GPTAQ (3 and 2 bits) and GPTQ (2 bits): results/d2quant.md
    dac: bool = option(
        False,
        "Deviation-aware correction, a bias on each post-attention norm (off by default: with the gptaq backend "
        "it measured slightly worse on SmolLM2 at 3 and 2 bits, with gptq 17% worse at 2 bits).",
        "--dac/--no-dac",
    )
    dsq_iters: int = option(15, "Alternating refinements of DSQ's row and column scales.")
    dac_teacher: str = option(
        "local",
        "What DAC corrects toward: local (float attention on the quantized model's own inputs: only this block's "
        "attention error) or float (the float model's activations, as methods.md words it: also the drift earlier "
        "blocks left, which measured far worse).",
        "--dac-teacher",
    )
    dac_skip_first: int = option(4, "First tokens of each calibration window left out of DAC's mean (attention sinks).")
    gptaq_alpha: float = option(0.25, "Share of GPTAQ's asymmetric correction applied (GPTAQ's released default).")
    sym: bool = option(False, "Symmetric (fixed zero-point) or asymmetric groups.", "--sym/--asym")
    clip: str = option("mse", CLIP_HELP + " For the uniform (non-DSQ) layers.", "--clip")
    damp: float = option(0.01, DAMP_HELP, "--damp")
    act_order: bool = option(True, ACT_ORDER_HELP, "--act-order/--no-act-order")
    block_size: int = option(128, "Columns per lazy-update block of the solver.")
    scale_bits: int = option(16, SCALE_BITS_HELP, "--scale-bits")
    codebook: str = option("uniform", CODEBOOK_HELP + " For the uniform (non-DSQ) layers.", "--codebook")

    def spec(self) -> QuantSpec:
        if self.backend not in BACKENDS:
            raise QuantError(f"unknown backend {self.backend!r}; choose from {', '.join(BACKENDS)}")
        if self.dac_teacher not in DAC_TEACHERS:
            raise QuantError(f"unknown DAC teacher {self.dac_teacher!r}; choose from {', '.join(DAC_TEACHERS)}")
        return QuantSpec(self.bits, self.group_size, self.sym, self.clip, self.scale_bits, self.codebook)

    def validate(self) -> None:
        self.spec()


class D2QuantStep(QuantizeStep):
    def start(self, run) -> None:
        from quant.methods.rotation import RotateStep

        # the rotation attaches the online Hadamard block by block, after this pass was set up
        if _dsq_possible(self.ctx, self.s.dsq, self.s.spec.bits) and any(
                isinstance(s, RotateStep) and s.config.down_hadamard for s in run.steps):
            raise QuantError(DSQ_PAST_HADAMARD)

    def finish(self, run) -> dict:
        return {
            "backend": self.s.backend,
            "dsq": self.s.dsq,
            "dac": self.s.dac,
            "dac_bias_norm_per_block": run.noted("dac_shift"),
            "calibration_tokens": int(self.ctx.calib_ids.numel()),
        }


# DSQ's column scale goes into up_proj, which the intermediate activations leave before the Hadamard
DSQ_PAST_HADAMARD = "DSQ cannot pass the online Hadamard before down_proj: use --no-dsq with --down-hadamard"


def _dsq_possible(ctx: QuantContext, dsq: bool, bits: int) -> bool:
    """Whether some down_proj may get DSQ: at DSQ's widths, or at any width an allocation may give it."""
    return dsq and (bits in DSQ_BITS or ctx.allocation is not None)


@register_block_pass("d2quant", D2QuantConfig, needs_calibration=True, quantizer=True)
def d2quant(ctx: QuantContext, config: D2QuantConfig) -> D2QuantStep:
    spec = config.spec()
    check_model(ctx, spec)
    ops = ops_modules(ctx.model).values()
    if any(o.token_scale is not None for o in ops):  # the scale is computed in the block's forward, per call
        raise QuantError("d2quant cannot follow FPT's dynamic scaling")
    structure = ctx.structure
    if _dsq_possible(ctx, config.dsq, spec.bits) and any(o.hadamard for o in ops):
        raise QuantError(DSQ_PAST_HADAMARD)
    if config.dsq and spec.bits in DSQ_BITS:
        structure.check("d2quant's DSQ", PASS_NEEDS["d2quant DSQ"], "use --no-dsq (GPTAQ alone) or --method gptq")
    if config.dac:
        structure.check("d2quant's DAC", PASS_NEEDS["d2quant DAC"], "use --no-dac")
    solver = Solver(
        spec,
        backend=config.backend,
        dsq=config.dsq,
        dac=config.dac,
        dac_teacher=config.dac_teacher,
        dac_skip_first=config.dac_skip_first,
        gptaq_alpha=config.gptaq_alpha,
        dsq_iters=config.dsq_iters,
        damp=config.damp,
        act_order=config.act_order,
        block_size=config.block_size,
    )
    return D2QuantStep("d2quant", ctx, solver)
