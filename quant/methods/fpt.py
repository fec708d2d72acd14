"""FPTQuant (arXiv:2506.04985): function-preserving transforms, fitted locally and end to end.

The transforms (methods.md §3.1), all exact in float arithmetic:

- ``rotation`` T_r: the residual stream rotated by an orthogonal ``Q = Q₀ · cayley(A)`` (Q₀ the
  Hadamard of the hidden width, A skew-symmetric and trainable, 0 at init). Merged as in
  ``quant.methods.rotation``: norms' γ folded into their readers, embedding untied, readers ``W Q``,
  writers ``Qᵀ W``.
- ``prerope`` T_k: per KV head h and RoPE pair j (HF's half-split pairs ``(j, j + d/2)``) a 2-D
  rotation by φ and a scale s: keys ``s R(φ) k``, queries of that group ``s⁻¹ R(φ) q``. 2-D rotations
  commute with RoPE's, and the scales cancel in ``q·k``. Merged into the rows of q_proj/k_proj.
- ``value`` T_v: per KV head an invertible ``A = I + Δ``: v_proj rows ``A W_v``, the o_proj columns
  of every query head in the group ``W_o A⁻¹``.
- ``mlp_scale`` T_u: ``up ← diag(s) up``, ``down ← down diag(s)⁻¹`` (SwiGLU is linear in up).
- ``down_hadamard`` T_d: an online Hadamard on down_proj's input, ``W_down ← W_down H``
  (``quant.runtime.inputops``; not mergeable).
- ``dynamic_scale`` S_n: each block's input is divided per token by its RMS, so the stream carries
  ``h / C`` with C the true stream's RMS, and the o_proj/down_proj inputs are divided by C too;
  RMSNorm does not see the difference (up to its ε). Block 0 is left alone: its input, the
  embedding, is small enough that ε would show. Online, no parameters.

Fitting: ``local_steps`` of AdamW on the data-free objective ``Σ_layers (mean |W_merged|⁴)^¼`` over
every block linear: first the rotation alone (on a random share of rows per step, since every step
otherwise multiplies all 100M weights by Q), then the per-block transforms with Q fixed. Unlike
AIMET's optimiser (methods.md §3.4) every mergeable transform's parameters are trained. Then
optionally ``e2e_steps`` of AdamW on the KL divergence between the float model (teacher) and the
quantized student (weights fake-quantized to ``weight``, activations to ``act``, rounding passed
straight through) on calibration windows, training all transform parameters at once.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from quant.engine.options import option
from quant.engine.passes import QuantContext, register_pass
from quant.engine.structure import PASS_NEEDS
from quant.errors import QuantError
from quant.methods.quantizers import RTNConfig, rtn
from quant.methods.rotation import fold_norms, online_down_hadamard, rotate
from quant.numerics.grid import QuantSpec, quantize_rtn
from quant.numerics.hadamard import hadamard, hadamard_transform, has_hadamard, random_orthogonal
from quant.runtime.inputops import ActQuantConfig, TokenScale, input_ops, set_act_quant, set_kv_quant

READERS = ("q", "k", "v", "gate", "up")
WRITERS = ("o", "down")


@dataclass
class FPTConfig:
    """FPTQuant's function-preserving transforms, fitted locally (data-free) and optionally end to end."""

    rotation: bool = option(True, "The residual-stream rotation.")
    prerope: bool = option(True, "The pre-RoPE transform of queries and keys.")
    value: bool = option(True, "The value/output transform.")
    mlp_scale: bool = option(True, "The MLP scaling between up and down.")
    down_hadamard: bool = option(False, "The online Hadamard before down_proj (worth it with activation quantization).")
    dynamic_scale: bool = option(False, "The online dynamic scale (only matters with static activation scales).")
    init: str = option("identity", "identity, or random non-identity parameters (for function-preservation tests).")
    local_steps: int = option(200, "AdamW steps of the data-free local fit (each phase).", "--fpt-local-steps")
    local_lr: float = option(1e-2, "Learning rate of the local fit.")
    rotation_rows: float = option(1 / 16, "Share of weight rows per step of the rotation's local fit.")
    e2e_steps: int = option(
        0,
        "AdamW steps of the end-to-end student-teacher fit on calibration windows (about 10 s each on 2 cores "
        "for SmolLM2). --method fptquant's transforms default to 32.",
        "--fpt-e2e-steps",
    )
    e2e_lr: float = option(1e-3, "Learning rate of the end-to-end fit.", "--fpt-e2e-lr")
    e2e_batch: int = option(2, "Calibration windows per end-to-end step.")
    weight: QuantSpec = option(
        help="The student's weight quantizer during the fits.", default_factory=lambda: QuantSpec(bits=4, clip="minmax")
    )
    act: ActQuantConfig | None = option(None, "The student's activation quantization (dynamic per token).")
    seed: int = option(0, "Seed of the random initialisations.", "--seed")

    def validate(self) -> None:
        if self.init not in ("identity", "random"):
            raise QuantError(f"FPT init must be 'identity' or 'random', got {self.init!r}")
        if min(self.local_steps, self.e2e_steps, self.e2e_batch) < 0 or not 0 < self.rotation_rows <= 1:
            raise QuantError("FPT step counts must be >= 0 and rotation_rows in (0, 1]")
        if self.act is not None:
            self.act.validate()


def cayley(p: torch.Tensor) -> torch.Tensor:
    """Orthogonal ``(I − A)⁻¹(I + A)`` of the skew-symmetric ``A`` built from p's upper triangle."""
    a = p.triu(1)
    a = a - a.T
    eye = torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
    return torch.linalg.solve(eye - a, eye + a)


class FPTParams(nn.Module):
    """Every trainable transform parameter of a dense Llama-like model; identity at zero."""

    def __init__(self, model: nn.Module, config: FPTConfig) -> None:
        super().__init__()
        c = model.config
        self.n_layers, d = c.num_hidden_layers, c.hidden_size
        self.n_q, self.n_kv = c.num_attention_heads, c.num_key_value_heads
        self.d_h = getattr(c, "head_dim", None) or d // self.n_q
        self.rep = self.n_q // self.n_kv
        L, half = self.n_layers, self.d_h // 2

        def param(on: bool, *shape: int) -> nn.Parameter | None:
            return nn.Parameter(torch.zeros(*shape)) if on else None

        q0 = hadamard(d) if has_hadamard(d) else random_orthogonal(d, config.seed)
        self.register_buffer("q0", q0.float() if config.rotation else None)
        self.rot = param(config.rotation, d, d)
        self.phi = param(config.prerope, L, self.n_kv, half)
        self.log_s = param(config.prerope, L, self.n_kv, half)
        self.delta = param(config.value, L, self.n_kv, self.d_h, self.d_h)
        self.log_u = param(config.mlp_scale, L, c.intermediate_size)
        if config.init == "random":
            g = torch.Generator().manual_seed(config.seed)
            for p, std in ((self.rot, 0.05), (self.phi, 1.0), (self.log_s, 0.3), (self.log_u, 0.3)):
                if p is not None:
                    p.data = std * torch.randn(p.shape, generator=g)
            if self.delta is not None:
                self.delta.data = 0.3 / math.sqrt(self.d_h) * torch.randn(self.delta.shape, generator=g)

    def rotation(self) -> torch.Tensor | None:
        return None if self.rot is None else self.q0.to(self.rot.dtype) @ cayley(self.rot)

    def block_params(self) -> list[nn.Parameter]:
        return [p for p in (self.phi, self.log_s, self.delta, self.log_u) if p is not None]


def _pair_transform(w: torch.Tensor, phi: torch.Tensor, log_s: torch.Tensor, rep: int) -> torch.Tensor:
    """Rotate pair (j, j + d/2) of every head's rows by φ and scale by e^{log s} (heads grouped per KV head)."""
    n_kv, half = phi.shape
    x = w.reshape(n_kv, rep, 2, half, -1)
    c, s, g = (t[:, None, :, None] for t in (torch.cos(phi), torch.sin(phi), torch.exp(log_s)))
    a, b = x[:, :, 0], x[:, :, 1]
    return torch.stack((g * (c * a - s * b), g * (s * a + c * b)), 2).reshape(w.shape)


def block_transforms(w: dict[str, torch.Tensor], p: FPTParams, i: int) -> dict[str, torch.Tensor]:
    """The per-block transforms applied to weights/biases ``w`` (``"q"``, ``"q.bias"``, ...)."""
    w = dict(w)
    if p.phi is not None:
        phi, log_s = p.phi[i].to(w["q"].dtype), p.log_s[i].to(w["q"].dtype)
        for key in [k for k in w if k.split(".")[0] in ("q", "k")]:
            rep = p.rep if key.startswith("q") else 1
            w[key] = _pair_transform(w[key], phi, -log_s if key.startswith("q") else log_s, rep)
    if p.delta is not None:
        eye = torch.eye(p.d_h, dtype=w["v"].dtype, device=w["v"].device)
        a = eye + p.delta[i].to(eye.dtype)
        for key in [k for k in w if k.split(".")[0] == "v"]:
            x = w[key]
            w[key] = (a @ x.reshape(p.n_kv, p.d_h, -1)).reshape(x.shape)
        wo = w["o"]
        o = wo.reshape(wo.shape[0], p.n_kv, p.rep, p.d_h)
        w["o"] = torch.einsum("dkre,kef->dkrf", o, torch.linalg.inv(a)).reshape(wo.shape)
    if p.log_u is not None:
        u = torch.exp(p.log_u[i].to(w["up"].dtype))
        w["up"] = w["up"] * u[:, None]
        if "up.bias" in w:
            w["up.bias"] = w["up.bias"] * u
        w["down"] = w["down"] / u[None, :]
    return w


FPT_NEEDS = PASS_NEEDS["fptquant"]  # Llama-shaped blocks: separate q/k/v/o and gate/up/down, plain RMSNorms


def _block_weights(block: nn.Module, structure, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    w = {}
    for role in READERS + WRITERS:
        lin = structure.role(block, role)
        w[role] = lin.weight.detach().to(dtype or lin.weight.dtype)
        if lin.bias is not None and role in ("q", "k", "v", "up"):
            w[f"{role}.bias"] = lin.bias.detach().to(dtype or lin.bias.dtype)
    return w


def _check_supported(ctx: QuantContext, config: FPTConfig) -> None:
    model = ctx.model
    ctx.structure.check("FPTQuant", FPT_NEEDS, "use --method gptq or d2quant")
    first = ctx.structure.blocks(model)[0]
    attn_mod = first.get_submodule(ctx.structure.roles["attn"])
    if config.prerope and (getattr(attn_mod, "q_norm", None) is not None):
        raise QuantError("FPTQuant's pre-RoPE transform cannot merge through per-head q/k norms (Qwen3); turn it off")
    if config.prerope and getattr(model.config, "partial_rotary_factor", 1.0) != 1.0:
        raise QuantError("the pre-RoPE transform needs RoPE on the whole head; this model rotates part of it")
    if config.down_hadamard and not has_hadamard(model.config.intermediate_size):
        raise QuantError(f"no Hadamard construction for the MLP width {model.config.intermediate_size}")
    for name in ctx.structure.linear_names(model):
        if not isinstance(model.get_submodule(name), nn.Linear):
            raise QuantError("FPT transforms go before any quantizer: the model already has quantized linears")


def _l4(w: torch.Tensor) -> torch.Tensor:
    return w.pow(4).mean().pow(0.25)


def fit_rotation(params: FPTParams, blocks: list[dict], config: FPTConfig, progress: bool) -> list[float]:
    """Local fit of the rotation alone: rows of readers and columns of writers, sampled each step."""
    # W Q row by row for readers, (Qᵀ W)ᵀ = Wᵀ Q column by column for writers: one stacked matmul
    rows = [w[r] for w in blocks for r in READERS] + [w[r].T for w in blocks for r in WRITERS]
    m = torch.cat(rows)
    lid = torch.cat([torch.full((len(r),), j) for j, r in enumerate(rows)])
    n_layers = len(rows)
    g = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW([params.rot], lr=config.local_lr)
    losses = []
    for _ in tqdm(range(config.local_steps), desc="fpt local: rotation", disable=not progress):
        pick = torch.rand(m.shape[0], generator=g) < config.rotation_rows
        y = (m[pick] @ params.rotation()).pow(4).mean(1)
        ids = lid[pick]
        s = torch.zeros(n_layers).index_add(0, ids, y)
        n = torch.zeros(n_layers).index_add(0, ids, torch.ones_like(y))
        losses.append(_step(opt, (s[n > 0] / n[n > 0]).pow(0.25).sum()))
    return losses


def fit_blocks(params: FPTParams, blocks: list[dict], config: FPTConfig, progress: bool) -> list[float]:
    """Local fit of the per-block transforms on the (already rotated) weights."""
    opt = torch.optim.AdamW(params.block_params(), lr=config.local_lr)
    owner = {"q": params.phi, "k": params.phi, "v": params.delta, "o": params.delta}
    owner |= {"up": params.log_u, "down": params.log_u}
    touched = [r for r, p in owner.items() if p is not None]  # gate (and untouched roles) stay constant
    losses = []
    for _ in tqdm(range(config.local_steps), desc="fpt local: per-block", disable=not progress):
        loss = sum(_l4(t[r]) for i, w in enumerate(blocks) for t in [block_transforms(w, params, i)] for r in touched)
        losses.append(_step(opt, loss))
    return losses


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def _rotate_block(w: dict[str, torch.Tensor], q: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Readers ``W Q``, writers ``Qᵀ W``; reader biases are on the output side and do not change."""
    if q is None:
        return w
    return {k: v if k.endswith(".bias") else v @ q if k in READERS else q.T @ v for k, v in w.items()}


def _ste_weight(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return w + (quantize_rtn(w.detach(), spec).dequantize(w.dtype) - w).detach()


def fit_e2e(
    model: nn.Module, teacher: nn.Module, params: FPTParams, base: list[dict], ctx: QuantContext, config: FPTConfig
) -> list[float]:
    """Student–teacher fit: KL(teacher ‖ quantized student) on calibration windows, all transforms trained."""
    structure = ctx.structure
    names = structure.linear_names(model)
    embed, head = structure.embeddings(model), structure.head(model)
    state: dict[str, torch.Tensor | None] = {"q": None}
    hooks = [
        embed.register_forward_hook(lambda _m, _a, out: out @ state["q"] if state["q"] is not None else out),
        head.register_forward_pre_hook(lambda _m, a: (a[0] @ state["q"].T,) if state["q"] is not None else a),
    ]  # embedding E Q and lm_head W Q, without materialising them
    act = config.act
    if act is not None:  # static scales are calibrated after the fit: the student uses per-token ones
        set_act_quant(model, names if act.bits != 16 else [], ActQuantConfig(act.bits, "dynamic", act.sym, act.clip))
        set_kv_quant(model, act.kv_bits)
    trainable = [p for p in params.parameters() if p.requires_grad]
    model.requires_grad_(False)  # only the transforms train
    opt = torch.optim.AdamW(trainable, lr=config.e2e_lr)
    g = torch.Generator().manual_seed(config.seed)
    ids_all = ctx.calib_ids
    losses = []
    try:
        for _ in tqdm(range(config.e2e_steps), desc="fpt end-to-end", disable=not ctx.progress):
            ids = ids_all[torch.randperm(ids_all.shape[0], generator=g)[: config.e2e_batch]]
            with torch.no_grad():
                target = F.log_softmax(teacher(ids, use_cache=False).logits.float(), -1)
            q = params.rotation()
            state["q"] = q
            weights = {}
            for i, w in enumerate(base):
                w = block_transforms(_rotate_block(w, q), params, i)
                if config.down_hadamard:
                    w["down"] = hadamard_transform(w["down"])
                prefix = f"{structure.layers}.{i}."
                for k, v in w.items():
                    role, _, kind = k.partition(".")
                    key = prefix + structure.roles[role] + "." + (kind or "weight")
                    weights[key] = v if kind else _ste_weight(v, ctx.spec_for(key[: -len(".weight")], config.weight))
            logits = torch.func.functional_call(model, weights, (ids,), {"use_cache": False}).logits
            kl = F.kl_div(F.log_softmax(logits.float(), -1), target, log_target=True, reduction="none")
            losses.append(_step(opt, kl.sum(-1).mean()))
    finally:
        for h in hooks:
            h.remove()
        if act is not None:
            set_act_quant(model, names if act.bits != 16 else [], None)
            set_kv_quant(model, 16)
    return losses


def _scale_block_input(holder: TokenScale, first: bool, eps: float, _module, args, kwargs):
    h = args[0] if args else kwargs["hidden_states"]
    r = h.detach().float().pow(2).mean(-1, keepdim=True).add(eps).sqrt()
    # the stream holds h_true / C; C (per token) grows by each block's factor, reset at the first one
    holder.value = r if first else holder.value * r
    h = h / r.to(h.dtype)
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def install_dynamic_scaling(model: nn.Module, scaled: list[str] | None = None) -> None:
    """S_n: from block 1 on, divide each block's input per token by its RMS. The stream then carries
    ``h / C`` (C the product of those factors, i.e. the true stream's RMS), so the o_proj/down_proj
    inputs (``scaled``: those of blocks 1 on; a checkpoint lists them) are divided by C as well, and every
    residual add stays consistent."""
    from functools import partial

    from quant.engine.structure import find_blocks, structure_of

    blocks = list(model.get_submodule(find_blocks(model)))[1:]
    if any(getattr(b, "_dynamic_scale_hook", None) is not None for b in blocks):
        return
    if scaled is None:
        s = structure_of(model)
        scaled = [f"{s.layers}.{i}.{s.info(i).roles[r]}" for i in range(1, len(s.block_info)) for r in WRITERS]
    eps = float(getattr(model.config, "rms_norm_eps", 1e-6))
    holder = TokenScale()
    for name in scaled:
        input_ops(model.get_submodule(name)).token_scale = holder
    for j, block in enumerate(blocks):
        block._dynamic_scale_hook = block.register_forward_pre_hook(
            partial(_scale_block_input, holder, j == 0, eps), with_kwargs=True
        )


@torch.no_grad()
def merge(model: nn.Module, params: FPTParams, structure, down_hadamard: bool) -> None:
    """Write the transforms into the weights (float64 arithmetic), and attach the online Hadamard."""
    p64 = copy.deepcopy(params).double()
    q = p64.rotation()
    if q is not None:
        rotate(model, q)
    for i, block in enumerate(structure.blocks(model)):
        w = block_transforms(_block_weights(block, structure, torch.float64), p64, i)
        for k, v in w.items():
            role, _, kind = k.partition(".")
            t = getattr(structure.role(block, role), kind or "weight")
            t.data = v.to(t.dtype)
        if down_hadamard:
            online_down_hadamard(structure, block)


@register_pass("fpt", FPTConfig)
def fpt_pass(ctx: QuantContext, config: FPTConfig) -> dict:
    """Fit and merge the FPTQuant transforms; the float model computes the same function afterwards."""
    config.validate()
    _check_supported(ctx, config)
    if config.e2e_steps and ctx.calib_ids is None:
        raise QuantError("the end-to-end FPT fit needs calibration data")
    model, structure = ctx.model, ctx.structure
    teacher = copy.deepcopy(model).eval() if config.e2e_steps else None
    was_tied = structure.is_tied(model)
    fold_norms(model)
    params = FPTParams(model, config)
    blocks = [_block_weights(b, structure) for b in structure.blocks(model)]
    out: dict = {"untied_embeddings": was_tied, "transforms": _names(config)}
    t0 = time.perf_counter()
    if config.local_steps and params.rot is not None:
        out["local_rotation_loss"] = _ends(fit_rotation(params, blocks, config, ctx.progress))
    if config.local_steps and params.block_params():
        with torch.no_grad():
            rotated = [_rotate_block(w, params.rotation()) for w in blocks]
        out["local_block_loss"] = _ends(fit_blocks(params, rotated, config, ctx.progress))
    out["local_seconds"] = round(time.perf_counter() - t0, 1)
    if config.dynamic_scale:
        install_dynamic_scaling(model)
    if config.e2e_steps:
        t0 = time.perf_counter()
        if config.down_hadamard:
            for block in structure.blocks(model):
                input_ops(structure.role(block, "down")).hadamard = model.config.intermediate_size
        out["e2e_kl"] = _ends(fit_e2e(model, teacher, params, blocks, ctx, config))
        out["e2e_seconds"] = round(time.perf_counter() - t0, 1)
        del teacher
    merge(model, params, structure, config.down_hadamard)
    return out


def _names(config: FPTConfig) -> list[str]:
    return [n for n in ("rotation", "prerope", "value", "mlp_scale", "down_hadamard", "dynamic_scale")
            if getattr(config, n)]  # fmt: skip


def _ends(losses: list[float]) -> dict:
    return {"first": round(losses[0], 5), "last": round(losses[-1], 5), "steps": len(losses)} if losses else {}


@dataclass
class FPTQuantConfig(RTNConfig):
    """FPTQuant as one method: the transforms (online Hadamard before down_proj included, local then
    end-to-end fit), then round-to-nearest weights. Activation quantization is its own pass after it."""

    transforms: FPTConfig = option(
        help="The transforms and their fits (see the fpt pass).",
        default_factory=lambda: FPTConfig(down_hadamard=True, e2e_steps=32),
    )


@register_pass("fptquant", FPTQuantConfig, needs_calibration=True, quantizer=True)
def fptquant_pass(ctx: QuantContext, config: FPTQuantConfig) -> dict:
    from quant.engine.loop import run_blocks

    fpt = fpt_pass(ctx, config.transforms)
    return {"fpt": fpt, "rtn": run_blocks(ctx, [rtn(ctx, config)])[0]}
