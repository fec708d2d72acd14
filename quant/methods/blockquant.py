"""The one block quantizer behind the rtn, gptq and d2quant passes: a step of the block engine.

Per block, stage by stage (``quant.engine.blockwise.run_staged``: q/k/v, o, gate/up, down; a parallel block's
attention and MLP inputs together; experts for MoE), each linear is quantized as soon as its input on the
quantized stream is known for every calibration window:

- ``rtn``: round to nearest, no data;
- ``gptq``: GPTQ on the Hessian ``E[x̃ x̃ᵀ]`` of the quantized model's own inputs;
- ``gptaq``: GPTQ on the target ``W + α W (P − H)(H + λI)⁻¹`` with the float stream's cross moment
  ``P = E[x x̃ᵀ]`` (GPTAQ's asymmetric calibration, see ``quant.methods.d2quant``);

optionally with DSQ on the MLP writer (its column scale absorbed into up) and DAC's bias on the
post-attention norm. In a sparse-MoE stage each expert gets the tokens its router sends it; an expert with
fewer tokens than inputs uses all tokens' Hessian (gate/up) or none (down: rounded to nearest, noted).
Moments and token counts are summed across data-parallel ranks (``quant.engine.distributed``), so every rank
solves the same problem.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quant.engine import distributed as dist
from quant.engine.blockwise import POST_ATTENTION_NORM, mlp_inputs, run_staged
from quant.engine.loop import BlockStep, Run
from quant.methods.dsq import DSQ_BITS, dsq_quantize
from quant.methods.gptq import gptq_quantize
from quant.numerics.grid import QuantSpec, quantize_rtn
from quant.runtime.dac import add_norm_bias
from quant.runtime.dsqlinear import DSQLinear
from quant.runtime.quantlinear import CodebookLinear, QuantLinear


@dataclass
class Solver:
    """What the block quantizer does to each linear (the rtn, gptq and d2quant configs all map to one)."""

    spec: QuantSpec
    backend: str = "gptq"  # rtn | gptq | gptaq
    dsq: bool = False
    dac: bool = False
    dac_teacher: str = "local"
    dac_skip_first: int = 4
    gptaq_alpha: float = 0.25
    dsq_iters: int = 15
    damp: float = 0.01
    act_order: bool = True
    block_size: int = 128


def gptaq_target(w: torch.Tensor, H: torch.Tensor, P: torch.Tensor, damp: float, alpha: float = 1.0) -> torch.Tensor:
    """``W + α W (P − H)(H + λI)⁻¹``: equals ``W`` when the quantized inputs have not drifted; with α = 1
    and λ = 0 it is the least-squares map from the quantized inputs to the float outputs."""
    H, P, w64 = H.double(), P.double(), w.detach().double()
    A = H + damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return (w64 + alpha * torch.linalg.solve(A, (w64 @ (P - H)).T).T).float()  # A is symmetric


def absorb_column_scale(up: torch.nn.Module, c: torch.Tensor) -> None:
    """Multiply output row j of ``up`` by ``c_j``: exact for SwiGLU, whose output is linear in up."""
    if isinstance(up, (QuantLinear, CodebookLinear)):
        up.scale_rows(c)
        fw = up.__dict__.get("_float_weight")
        if fw is not None:  # finetune's starting point moves with it
            up.__dict__["_float_weight"] = fw * c[:, None].to(fw.device)
    else:
        up.weight.data.mul_(c[:, None].to(up.weight.dtype))
    if up.bias is not None:
        up.bias.data.mul_(c.to(up.bias.dtype))


def _rows(x: torch.Tensor, width: int) -> torch.Tensor:
    return x.reshape(-1, width)


class QuantizeStep(BlockStep):
    def __init__(self, name: str, ctx, solver: Solver) -> None:
        self.name, self.ctx, self.s = name, ctx, solver
        self.needs_data = solver.backend != "rtn" or solver.dac
        local_dac = solver.dac and solver.dac_teacher == "local"
        self.float_stream = solver.backend == "gptaq" or (solver.dac and not local_dac)
        self.local_dac = local_dac
        self.keep_float = False  # leave each linear's float weight on its packed module (finetune's start)

    # -- one linear ---------------------------------------------------------------------------------------
    def _install(self, run: Run, name: str, lin, qw, s: QuantSpec, w: torch.Tensor | None = None) -> None:
        q = QuantLinear.from_quantized(qw, lin.bias)
        if self.keep_float and w is not None:  # the weight it was quantized from: finetune's starting point
            q.__dict__["_float_weight"] = w.detach()
        self.ctx.install(name, q, s.sym)

    def _quantize_group(self, run: Run, i: int, block, group: tuple[str, ...], xq, xf):
        """Quantize one stage from its inputs on the quantized (``xq``) and float (``xf``) streams; returns
        dense down_proj's input after DSQ's column scale went into up_proj (up to fp16 rounding of up's scales).
        MoE stages come as ``{name: rows}`` with ``""`` all tokens, and get no float pairing."""
        cfg, structure = self.s, run.structure
        prefix = structure.layers
        inputs = xq if isinstance(xq, dict) else dict.fromkeys(group, xq)
        pairs = structure.info(block).dsq_pairs
        moments: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}  # q/k/v, an expert's gate/up share input

        def moment(u: torch.Tensor, x: torch.Tensor, width: int) -> tuple[torch.Tensor, int]:
            """``(E[u xᵀ], tokens)`` over every rank's tokens: the Hessian with ``u = x``, GPTAQ's cross term
            with the float ``u``. Window by window in float32, summed in float64 and rounded once, so how the
            windows are split across ranks does not change the result (to float32 rounding)."""
            if (id(u), id(x)) not in moments:
                xs = x if x.dim() == 3 else x.reshape(1, -1, width)  # MoE rows: one "window"
                us = xs if u is x else (u if u.dim() == 3 else u.reshape(1, -1, width))
                m = torch.zeros(width, width, dtype=torch.float64, device=x.device)
                tmp = torch.empty(width, width, device=x.device)  # one buffer: fresh temporaries cost page faults
                # on a CPU, float64 slices small enough to come from the heap (a copy of all of tmp page-faults)
                rows = max(1, (1 << 19) // (8 * width)) if x.device.type == "cpu" else width
                for uw, xw in zip(us, xs, strict=True):
                    a = _rows(xw, width).float()
                    torch.mm((a if u is x else _rows(uw, width).float()).T, a, out=tmp)
                    for r in range(0, width, rows):  # m += tmp, without a float64 copy of all of tmp
                        m[r : r + rows] += tmp[r : r + rows].double()
                del tmp  # before the float32 copy below: a down_proj's tmp is 0.8 GB
                n = torch.tensor([float(xs.shape[0] * xs.shape[1])], dtype=torch.float64, device=m.device)
                dist.sum_(m), dist.sum_(n)
                moments[id(u), id(x)] = (m.div_(max(float(n), 1.0)).float(), int(n))
            return moments[id(u), id(x)]

        out = None
        for rel in group:
            lin, x = block.get_submodule(rel), inputs[rel]
            name = f"{prefix}.{i}.{rel}"
            s = self.ctx.spec_for(name, cfg.spec)
            H = P = None
            if cfg.backend != "rtn":
                H, n = moment(x, x, lin.in_features)
                if n < lin.in_features and ".experts." in rel:  # an expert (almost) no token reached (dense
                    # linears with fewer calibration tokens than inputs keep GPTQ: damping makes H definite)
                    H = moment(inputs[""], inputs[""], lin.in_features)[0] if "" in inputs and not rel.endswith(
                        "down_proj") else None
                    if H is None:
                        run.note("rtn_fallback", run.notes.get(i, {}).get("rtn_fallback", []) + [name])
            if H is not None and cfg.backend == "gptaq" and xf is not None:
                u = xf.get(rel) if isinstance(xf, dict) else xf
                P = moment(u, x, lin.in_features)[0] if u is not None and u.shape == x.shape else None
            w = lin.weight if P is None else gptaq_target(lin.weight, H, P, cfg.damp, cfg.gptaq_alpha)
            if rel in pairs and cfg.dsq and s.bits in DSQ_BITS:
                g = s.group_for(w.shape[1])
                q = dsq_quantize(w, H, s.bits, g, cfg.dsq_iters, cfg.damp, cfg.act_order, cfg.block_size)
                self.ctx.install(name, DSQLinear.from_codes(q.codes, q.row_scales, lin.bias), sym=True)
                absorb_column_scale(block.get_submodule(pairs[rel]), q.col_scale)
                if not isinstance(xq, dict):
                    out = xq * q.col_scale.to(xq.dtype)
            elif H is None:
                self._install(run, name, lin, quantize_rtn(w, s), s, w)
            else:
                self._install(run, name, lin, gptq_quantize(w, H, s, cfg.damp, cfg.act_order, cfg.block_size), s, w)
        return out

    # -- one block ----------------------------------------------------------------------------------------
    def block(self, run: Run, i: int, block) -> None:
        cfg, structure = self.s, run.structure
        if not self.needs_data:
            for stage in structure.linear_groups(block):
                self._quantize_group(run, i, block, tuple(stage), {n: None for n in stage}, None)
            return
        float_in: dict = {}
        if self.float_stream:  # the block is still float: carry the float stream through it, keeping stage inputs
            run.xf = run_staged(block, structure, run.xf, run.kwargs[i], float_in.__setitem__)
            # experts (their stages carry "": all tokens) get no float pairing
            float_in = {k: v for k, v in float_in.items() if not (isinstance(v, dict) and "" in v)}
        if self.local_dac:  # still float: its attention on the quantized stream is this block's teacher
            float_in[POST_ATTENTION_NORM] = mlp_inputs(block, structure, run.x, run.kwargs[i])

        def visit(stage, xq):
            if stage != POST_ATTENTION_NORM:
                return self._quantize_group(run, i, block, stage, xq, float_in.get(stage))
            if cfg.dac:  # attention is quantized: shift the norm's output back to the float mean
                k = cfg.dac_skip_first
                diff = (float_in[stage][:, k:] - xq[:, k:]).float()
                total = diff.sum((0, 1))
                n = torch.tensor([float(diff.shape[0] * diff.shape[1])], device=total.device)
                dist.sum_(total), dist.sum_(n)
                mu = (total / n).to(xq.dtype)
                if add_norm_bias(structure.role(block, POST_ATTENTION_NORM), mu):
                    self.ctx.norm_biases.append(f"{structure.layers}.{i}.{structure.info(i).roles[POST_ATTENTION_NORM]}")
                run.note("dac_shift", round(float(mu.float().norm()), 5))
            return None

        run.x = run_staged(block, structure, run.x, run.kwargs[i], visit)

    def finish(self, run: Run) -> dict:
        out: dict = {"layers": sum(len(structure_linears) for structure_linears in
                                   (run.structure.info(j).linears for j in range(len(run.blocks))))}
        if self.needs_data and self.ctx.calib_ids is not None:
            out["calibration_tokens"] = int(self.ctx.calib_ids.numel())
        fallback = [n for names in run.noted("rtn_fallback") for n in names]
        if fallback:
            out["rtn_fallback_experts"] = fallback
        return out
