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

from quant.engine.passes import QuantContext, register_block_pass
from quant.engine.structure import PASS_NEEDS
from quant.errors import QuantError
from quant.methods.blockquant import QuantizeStep, Solver, absorb_column_scale, gptaq_target  # noqa: F401  (public here)
from quant.methods.dsq import DSQ_BITS
from quant.methods.quantizers import check_model
from quant.numerics.grid import QuantSpec
from quant.runtime.inputops import ops_modules

BACKENDS = ("gptaq", "gptq", "rtn")
DAC_TEACHERS = ("float", "local")


@dataclass
class D2QuantConfig:
    bits: int = 3
    group_size: int = 64
    backend: str = "gptaq"
    dsq: bool = True
    dac: bool = False  # opt-in: measured worse with GPTAQ (3 and 2 bits) and GPTQ (2 bits): results/d2quant.md
    dsq_iters: int = 15
    dac_teacher: str = "local"  # "float" (methods.md's wording) corrects earlier blocks' drift too: measured far worse
    dac_skip_first: int = 4  # first tokens of each calibration window left out of μ: attention sinks (measured)
    gptaq_alpha: float = 0.25  # share of the asymmetric correction applied (GPTAQ's released default)
    sym: bool = False
    clip: str = "mse"  # for the uniform (non-DSQ) layers
    damp: float = 0.01
    act_order: bool = True
    block_size: int = 128

    def spec(self) -> QuantSpec:
        if self.backend not in BACKENDS:
            raise QuantError(f"unknown backend {self.backend!r}; choose from {', '.join(BACKENDS)}")
        if self.dac_teacher not in DAC_TEACHERS:
            raise QuantError(f"unknown DAC teacher {self.dac_teacher!r}; choose from {', '.join(DAC_TEACHERS)}")
        return QuantSpec(self.bits, self.group_size, self.sym, self.clip)


class D2QuantStep(QuantizeStep):
    def finish(self, run) -> dict:
        return {
            "backend": self.s.backend,
            "dsq": self.s.dsq,
            "dac": self.s.dac,
            "dac_bias_norm_per_block": run.noted("dac_shift"),
            "calibration_tokens": int(self.ctx.calib_ids.numel()),
        }


@register_block_pass("d2quant", D2QuantConfig, needs_calibration=True, quantizer=True)
def d2quant(ctx: QuantContext, config: D2QuantConfig) -> D2QuantStep:
    spec = config.spec()
    check_model(ctx, spec)
    if any(o.hadamard or o.token_scale is not None for o in ops_modules(ctx.model).values()):
        # run_staged feeds each linear the input it captured, and DSQ's column scale cannot pass a Hadamard
        raise QuantError("d2quant cannot follow online input ops (FPT's down_proj Hadamard or dynamic scaling)")
    structure = ctx.structure
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
