"""D²Quant (arXiv:2602.02546) as a pass: sub-4-bit weight-only quantization of every block linear.

Per block, in the order of methods.md §1.3:

1. q/k/v, then o: asymmetric uniform groups with the MSE clip search, by the chosen backend;
2. DAC: the post-attention norm gets the bias ``μ`` = mean(float − quantized) of its output;
3. gate/up on inputs that include the corrected norm;
4. down_proj with DSQ (2 and 3 bits), whose per-column scale is then absorbed into up_proj;
5. both activation streams advance through the block.

Backends: ``gptaq`` (default): GPTQ on the target ``W + W·E[(x - x̃) x̃ᵀ]·(H + λI)⁻¹``, which is the
unconstrained minimiser of ``E‖W x − Ŵ x̃‖²`` (float inputs x, the quantized model's own inputs x̃):
the asymmetric calibration of GPTAQ, as one closed-form target followed by ordinary GPTQ (the two
have the same objective), with the correction scaled by ``gptaq_alpha`` (0.25, as GPTAQ's release);
``gptq`` (inputs x̃ only); ``rtn`` (no Hessian; DAC still uses data).
The mergeable rotation is a separate pass (``rotate``) that runs first.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from quant.blockwise import BlockRunner
from quant.dac import add_norm_bias
from quant.dsq import DSQ_BITS, dsq_quantize
from quant.dsqlinear import DSQLinear
from quant.errors import QuantError
from quant.gptq import gptq_quantize
from quant.grid import QuantSpec, quantize_rtn
from quant.passes import QuantContext, register_pass
from quant.quantizers import check_model
from quant.quantlinear import QuantLinear

BACKENDS = ("gptaq", "gptq", "rtn")


@dataclass
class D2QuantConfig:
    bits: int = 3
    group_size: int = 64
    backend: str = "gptaq"
    dsq: bool = True
    dac: bool = True
    dsq_iters: int = 15
    dac_teacher: str = "float"  # float: the float model's own activations; quantized: same input as the student
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
        if self.dac_teacher not in ("float", "quantized"):
            raise QuantError(f"dac_teacher must be 'float' or 'quantized', got {self.dac_teacher!r}")
        return QuantSpec(self.bits, self.group_size, self.sym, self.clip)


def gptaq_target(w: torch.Tensor, H: torch.Tensor, P: torch.Tensor, damp: float, alpha: float = 1.0) -> torch.Tensor:
    """``W + α W (P − H)(H + λI)⁻¹``: equals ``W`` when the quantized inputs have not drifted; with α = 1
    and λ = 0 it is the least-squares map from the quantized inputs to the float outputs."""
    H, P, w64 = H.double(), P.double(), w.detach().double()
    A = H + damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return (w64 + alpha * torch.linalg.solve(A, (w64 @ (P - H)).T).T).float()  # A is symmetric


def absorb_column_scale(up: torch.nn.Module, c: torch.Tensor) -> None:
    """Multiply output row j of ``up`` by ``c_j``: exact for SwiGLU, whose output is linear in up."""
    if isinstance(up, QuantLinear):
        up.scales.copy_((up.scales.float() * c[:, None]).to(up.scales.dtype))
    else:
        up.weight.data.mul_(c[:, None].to(up.weight.dtype))
    if up.bias is not None:
        up.bias.data.mul_(c.to(up.bias.dtype))


@register_pass("d2quant", D2QuantConfig, needs_calibration=True, quantizer=True)
def d2quant(ctx: QuantContext, config: D2QuantConfig) -> dict:
    spec = config.spec()
    check_model(ctx, spec)
    adapter, prefix, model = ctx.adapter, ctx.adapter.layers, ctx.model
    blocks = adapter.blocks(model)
    two_streams = config.backend == "gptaq" or config.dac
    runner = BlockRunner(model, blocks, ctx.calib_ids, keep_float=two_streams)
    dac_norms, dac_shift = [], []

    def quantize(i: int, block, fblock, group: tuple[str, ...]) -> dict:
        """Quantize one sequential group; returns the DSQ column scales if down went through DSQ."""
        reader = adapter.role(block, group[0])
        H = P = None
        if config.backend == "gptq":
            H = runner.hessian(block, reader)
        elif config.backend == "gptaq":
            H, P = runner.hessian_and_cross(block, reader, fblock, adapter.role(fblock, group[0]))
        col_scales = {}
        for role in group:
            lin = adapter.role(block, role)
            name = f"{prefix}.{i}.{adapter.roles[role]}"
            s = ctx.spec_for(name, spec)
            w = lin.weight if P is None else gptaq_target(lin.weight, H, P, config.damp, config.gptaq_alpha)
            if role == "down" and config.dsq and s.bits in DSQ_BITS:
                g = s.group_for(w.shape[1])
                q = dsq_quantize(w, H, s.bits, g, config.dsq_iters, config.damp, config.act_order, config.block_size)
                ctx.install(name, DSQLinear.from_codes(q.codes, q.row_scales, lin.bias), sym=True)
                col_scales[role] = q.col_scale
            elif H is None:
                ctx.install(name, QuantLinear.from_quantized(quantize_rtn(w, s), lin.bias), s.sym)
            else:
                qw = gptq_quantize(w, H, s, config.damp, config.act_order, config.block_size)
                ctx.install(name, QuantLinear.from_quantized(qw, lin.bias), s.sym)
        return col_scales

    for i in tqdm(range(len(blocks)), desc="d2quant", disable=not ctx.progress, unit="block"):
        block = blocks[i]
        fblock = copy.deepcopy(block) if two_streams else None
        quantize(i, block, fblock, ("q", "k", "v"))
        quantize(i, block, fblock, ("o",))
        if config.dac:
            norm = adapter.role(block, "post_attention_norm")
            fnorm = adapter.role(fblock, "post_attention_norm")
            mu = runner.mean_output_gap(block, norm, fblock, fnorm, config.dac_teacher, config.dac_skip_first)
            add_norm_bias(norm, mu)
            dac_norms.append(f"{prefix}.{i}.{adapter.roles['post_attention_norm']}")
            dac_shift.append(round(float(mu.norm()), 5))
        quantize(i, block, fblock, ("gate", "up"))
        c = quantize(i, block, fblock, ("down",)).get("down")
        if c is not None:
            absorb_column_scale(adapter.role(block, "up"), c)
        runner.advance(block, fblock)
        del fblock
    ctx.norm_biases = dac_norms
    return {
        "backend": config.backend,
        "dsq": config.dsq,
        "dac": config.dac,
        "dac_bias_norm_per_block": dac_shift,
        "calibration_tokens": int(ctx.calib_ids.numel()),
    }
