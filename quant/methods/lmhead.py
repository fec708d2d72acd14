"""Quantize the output layer (lm_head) too.

At low bits a small model's float head is most of the bytes each decoded token reads (SmolLM2-135M: 113 MB of
fp32 head against about 48 MB of 3-bit block weights), so a CPU decoder is bound by it; llama.cpp stores its
output tensor quantized as well. Round to nearest with the MSE clip search (no data): 8-bit is close to lossless,
4-bit costs a little perplexity (benchmarks/results/latency.md lists which head every row used). A head tied to
the embeddings is untied: the embeddings keep the float matrix, the head gets its own packed copy, and the
saved config says ``tie_word_embeddings: false``.
"""

from __future__ import annotations

from dataclasses import dataclass

from quant.engine.options import option
from quant.engine.passes import QuantContext, register_pass
from quant.errors import QuantError
from quant.methods.quantizers import CLIP_HELP
from quant.numerics.grid import QuantSpec, check_finite, quantize_rtn
from quant.runtime.quantlinear import QuantLinear

HEAD_BITS = (4, 8, 16)  # 16: left in float


@dataclass
class LMHeadConfig:
    bits: int = option(
        16,
        "Bits of lm_head: 16 keeps it float; 8 or 4 quantize it (round to nearest, untied from the embeddings). "
        "At low bits a small model's float head is most of what a decoded token reads.",
        "--lm-head-bits",
    )
    group_size: int = option(64, "Inputs per quantization group of lm_head (32, 48, 64, 96, 128, 192, 256 or -1).",
                             "--lm-head-group-size")
    sym: bool = option(False, "Symmetric (fixed zero-point) or asymmetric groups for lm_head.")
    clip: str = option("mse", CLIP_HELP)

    def validate(self) -> None:
        if self.bits not in HEAD_BITS:
            raise QuantError(f"--lm-head-bits must be one of {HEAD_BITS}, got {self.bits}")
        if self.bits != 16:
            QuantSpec(self.bits, self.group_size, self.sym, self.clip)

    @property
    def enabled(self) -> bool:
        return self.bits != 16


@register_pass("lmhead", LMHeadConfig)
def quantize_lm_head(ctx: QuantContext, config: LMHeadConfig) -> dict:
    """Replace lm_head by a ``QuantLinear``; a tied head is untied first (the embeddings stay float)."""
    config.validate()
    if not config.enabled:
        return {"bits": 16}
    structure = ctx.structure
    head = structure.head(ctx.model)
    tied = structure.is_tied(ctx.model)
    check_finite(head.weight, structure.lm_head)
    qw = quantize_rtn(head.weight.detach(), QuantSpec(config.bits, config.group_size, config.sym, config.clip))
    ctx.install(structure.lm_head, QuantLinear.from_quantized(qw, head.bias), config.sym)
    if tied:  # storage now differs: the checkpoint must not re-tie the head to the embeddings on load
        text = ctx.model.config.get_text_config() if hasattr(ctx.model.config, "get_text_config") else None
        for cfg in {id(c): c for c in (ctx.model.config, text) if c is not None}.values():
            cfg.tie_word_embeddings = False
    return {"bits": config.bits, "group_size": qw.group_size, "untied": tied}
