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

Each block costs one float and one quantized forward (``quant.blockwise.run_staged``): every group
is quantized as soon as its input has been computed for all calibration windows.

Backends: ``gptaq`` (default): GPTQ on the target ``W + W·E[(x - x̃) x̃ᵀ]·(H + λI)⁻¹``, which is the
unconstrained minimiser of ``E‖W x − Ŵ x̃‖²`` (float inputs x, the quantized model's own inputs x̃):
the asymmetric calibration of GPTAQ, as one closed-form target followed by ordinary GPTQ (the two
have the same objective), with the correction scaled by ``gptaq_alpha`` (0.25, as GPTAQ's release);
``gptq`` (inputs x̃ only); ``rtn`` (no Hessian; DAC still uses data).
The mergeable rotation is a separate pass (``rotate``) that runs first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from quant.blockwise import POST_ATTENTION_NORM, BlockRunner, mlp_inputs, run_staged
from quant.dac import add_norm_bias
from quant.dsq import DSQ_BITS, dsq_quantize
from quant.dsqlinear import DSQLinear
from quant.errors import QuantError
from quant.gptq import gptq_quantize
from quant.grid import QuantSpec, quantize_rtn
from quant.inputops import ops_modules
from quant.passes import QuantContext, register_pass
from quant.quantizers import check_model
from quant.quantlinear import QuantLinear
from quant.structure import PASS_NEEDS

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
    if any(o.hadamard or o.token_scale is not None for o in ops_modules(ctx.model).values()):
        # run_staged feeds each linear the input it captured, and DSQ's column scale cannot pass a Hadamard
        raise QuantError("d2quant cannot follow online input ops (FPT's down_proj Hadamard or dynamic scaling)")
    structure, prefix, model = ctx.structure, ctx.structure.layers, ctx.model
    if config.dsq and spec.bits in DSQ_BITS:
        structure.check("d2quant's DSQ", PASS_NEEDS["d2quant DSQ"], "use --no-dsq (GPTAQ alone) or --method gptq")
    if config.dac:
        structure.check("d2quant's DAC", PASS_NEEDS["d2quant DAC"], "use --no-dac")
    blocks = structure.blocks(model)
    local_dac = config.dac and config.dac_teacher == "local"
    two_streams = config.backend == "gptaq" or (config.dac and not local_dac)
    runner = BlockRunner(model, blocks, ctx.calib_ids)
    float_stream = runner.inputs.clone() if two_streams else None
    dac_norms, dac_shift = [], []

    def quantize_group(
        i: int, block, group: tuple[str, ...], xq: torch.Tensor | dict, xf: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Quantize one sequential group from its inputs on the quantized (``xq``) and float (``xf``) streams;
        returns dense down_proj's input after DSQ's column scale went into up_proj (up to fp16 rounding of
        up's scales). MoE groups come as ``{name: rows}`` (see ``run_staged``): each expert's routed tokens,
        with no float pairing (the float stream routes tokens differently), so experts get GPTQ's symmetric
        objective; an expert with fewer tokens than inputs uses all tokens' Hessian (gate/up) or none (down)."""
        inputs = xq if isinstance(xq, dict) else dict.fromkeys(group, xq)
        pairs = structure.info(block).dsq_pairs
        moments: dict[tuple[int, int], torch.Tensor] = {}  # q/k/v, or an expert's gate/up, share their input

        def moment(u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            """``E[u xᵀ]`` over tokens: the Hessian with ``u = x``, GPTAQ's cross term with the float ``u``."""
            if (id(u), id(x)) not in moments:
                a = x.reshape(-1, x.shape[-1]).float()
                moments[id(u), id(x)] = (a if u is x else u.reshape(-1, u.shape[-1]).float()).T @ a / a.shape[0]
            return moments[id(u), id(x)]

        out = None
        for rel in group:
            lin, x = block.get_submodule(rel), inputs[rel]
            name = f"{prefix}.{i}.{rel}"
            s = ctx.spec_for(name, spec)
            H = P = None
            if config.backend != "rtn":
                if x.reshape(-1, x.shape[-1]).shape[0] >= lin.in_features:
                    H = moment(x, x)
                elif "" in inputs and not rel.endswith("down_proj"):
                    H = moment(inputs[""], inputs[""])
            if H is not None and config.backend == "gptaq" and xf is not None:
                u = xf.get(rel) if isinstance(xf, dict) else xf
                P = moment(u, x) if u is not None and u.shape == x.shape else None
            w = lin.weight if P is None else gptaq_target(lin.weight, H, P, config.damp, config.gptaq_alpha)
            if rel in pairs and config.dsq and s.bits in DSQ_BITS:
                g = s.group_for(w.shape[1])
                q = dsq_quantize(w, H, s.bits, g, config.dsq_iters, config.damp, config.act_order, config.block_size)
                ctx.install(name, DSQLinear.from_codes(q.codes, q.row_scales, lin.bias), sym=True)
                absorb_column_scale(block.get_submodule(pairs[rel]), q.col_scale)
                if not isinstance(xq, dict):
                    out = xq * q.col_scale.to(xq.dtype)
            elif H is None:
                ctx.install(name, QuantLinear.from_quantized(quantize_rtn(w, s), lin.bias), s.sym)
            else:
                qw = gptq_quantize(w, H, s, config.damp, config.act_order, config.block_size)
                ctx.install(name, QuantLinear.from_quantized(qw, lin.bias), s.sym)
        return out

    for i in tqdm(range(len(blocks)), desc="d2quant", disable=not ctx.progress, unit="block"):
        block = blocks[i]
        float_in: dict = {}
        if two_streams:  # the block is still float: carry the float stream through it, keeping each stage's input
            float_stream = run_staged(block, structure, float_stream, runner.kwargs[i], float_in.__setitem__)
            # experts (their stages carry "": all tokens) get no float pairing
            float_in = {k: v for k, v in float_in.items() if not (isinstance(v, dict) and "" in v)}
        if local_dac:  # still float: its attention on the quantized stream is this block's teacher
            float_in[POST_ATTENTION_NORM] = mlp_inputs(block, structure, runner.inputs, runner.kwargs[i])

        def visit(stage, xq: torch.Tensor, i: int = i, block=block, float_in: dict = float_in) -> torch.Tensor | None:
            if stage != POST_ATTENTION_NORM:
                return quantize_group(i, block, stage, xq, float_in.get(stage))
            if config.dac:  # attention is quantized: shift the norm's output back to the float mean
                k = config.dac_skip_first
                mu = (float_in[stage][:, k:] - xq[:, k:]).mean((0, 1))
                if add_norm_bias(structure.role(block, POST_ATTENTION_NORM), mu):
                    dac_norms.append(f"{prefix}.{i}.{structure.info(i).roles[POST_ATTENTION_NORM]}")
                dac_shift.append(round(float(mu.norm()), 5))
            return None

        runner.inputs = run_staged(block, structure, runner.inputs, runner.kwargs[i], visit)
        del float_in
    ctx.norm_biases = dac_norms
    return {
        "backend": config.backend,
        "dsq": config.dsq,
        "dac": config.dac,
        "dac_bias_norm_per_block": dac_shift,
        "calibration_tokens": int(ctx.calib_ids.numel()),
    }
