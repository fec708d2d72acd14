"""MPI: Manifold Power Iteration for MoE routers (methods.md §4).

Router row ``R_i`` (logits ``x Rᵀ``) should point along expert i's principal input direction, the top
right singular vector of its gate weight ``W_i`` (HF ``gate_proj.weight``, ``[F, D]``). One
Power-then-Retract step:

    R̂_i = (R_i W_iᵀ) W_i            (two mat-vecs; the D×D Gram matrix is never formed)
    R'_i = C · R̂_i / ‖R̂_i‖,  C = C′ / √N

As a router (:class:`MPIRouter`) the raw ``R`` is the trained parameter and gating uses ``R'``; the
expert weights enter the power step detached by default (``stop_grad_experts``: methods.md §4.4,
gradients of the routing loss then move only the router, which keeps expert training unchanged),
and ``freeze()`` stores ``R'`` once so serving costs nothing. :func:`align_routers` applies it after
training; :func:`alignment` is the diagnostic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe.experts import ExpertList, is_moe_block


def expert_gate_weights(experts: nn.Module) -> torch.Tensor:
    """``[N, F, D]`` gate projections of all experts (fused or unfused)."""
    if isinstance(experts, ExpertList):
        ws = []
        for e in experts:
            g = e.gate_proj
            ws.append(g.weight if hasattr(g, "weight") else g.dequantize())
        return torch.stack(ws)
    f = experts.gate_up_proj.shape[1] // 2
    return experts.gate_up_proj[:, :f]


def power_retract(R: torch.Tensor, W: torch.Tensor, C: float | torch.Tensor, steps: int = 1) -> torch.Tensor:
    """``steps`` Power-then-Retract steps of every router row ``R [N, D]`` against its expert's ``W [N, F, D]``."""
    for _ in range(steps):
        z = torch.einsum("nd,nfd->nf", R, W)  # R_i W_iᵀ
        R = torch.einsum("nf,nfd->nd", z, W)  # (R_i W_iᵀ) W_i
        R = C * F.normalize(R, dim=-1)
    return R


def principal_directions(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top right singular vector ``[N, D]`` and top singular value ``[N]`` of every expert's ``W [N, F, D]``."""
    _, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return Vh[:, 0].to(W.dtype), S[:, 0].to(W.dtype)


@dataclass
class Alignment:
    cosine: list[float]  # |cos(R_i, v₁(W_i))| per expert
    rayleigh: list[float]  # ‖W_i R_iᵀ‖² / (‖R_i‖² σ₁²) ∈ [0, 1] per expert
    row_norm_mean: float
    row_norm_cv: float  # std / mean of the row norms: the spread the retraction removes

    def summary(self) -> dict[str, float]:
        return {
            "cosine_mean": sum(self.cosine) / len(self.cosine),
            "rayleigh_mean": sum(self.rayleigh) / len(self.rayleigh),
            "row_norm_mean": self.row_norm_mean,
            "row_norm_cv": self.row_norm_cv,
        }


@torch.no_grad()
def router_alignment(R: torch.Tensor, W: torch.Tensor) -> Alignment:
    R, W = R.double(), W.double()
    v, s = principal_directions(W)
    norms = R.norm(dim=-1)
    cos = (R * v).sum(-1).abs() / norms
    rq = torch.einsum("nd,nfd->nf", R, W).pow(2).sum(-1) / (norms**2 * s**2)
    return Alignment(cos.tolist(), rq.tolist(), float(norms.mean()), float(norms.std() / norms.mean()))


def moe_blocks(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if is_moe_block(m)}


def alignment(model: nn.Module) -> dict[str, Alignment]:
    """Per MoE layer: each router row's alignment with its expert's principal direction, and the norm spread."""
    return {name: router_alignment(effective_weight(m.gate), expert_gate_weights(m.experts)) for name, m in
            moe_blocks(model).items()}  # fmt: skip


def effective_weight(router: nn.Module) -> torch.Tensor:
    return router.effective_weight() if isinstance(router, MPIRouter) else router.weight


class MPIRouter(nn.Module):
    """A top-k router that gates with ``R' = C · normalize(R W W ᵀ-power step)`` of its raw weight ``R``.

    Wraps the model's own router (kept as ``inner``: its gating rule, top-k and normalisation are
    reused unchanged, only the weight it sees is ``R'``). ``c_prime``: C′ in ``C = C′/√N``.
    """

    def __init__(
        self, inner: nn.Module, experts: nn.Module, c_prime: float, steps: int = 1, stop_grad_experts: bool = True
    ):
        super().__init__()
        self.inner = inner
        self.experts = [experts]  # a list: not registered as a submodule (the block owns it)
        self.C = c_prime / math.sqrt(inner.weight.shape[0])
        self.steps = steps
        self.stop_grad_experts = stop_grad_experts
        self.register_buffer("frozen", None)

    @property
    def weight(self) -> torch.Tensor:  # what code reading ``router.weight`` (diagnostics, metrics) should see
        return self.effective_weight()

    def effective_weight(self) -> torch.Tensor:
        if self.frozen is not None:
            return self.frozen
        W = expert_gate_weights(self.experts[0])
        if self.stop_grad_experts:
            W = W.detach()
        return power_retract(self.inner.weight, W.to(self.inner.weight.dtype), self.C, self.steps)

    @torch.no_grad()
    def freeze(self) -> None:
        """Store ``R'`` for inference: gating then costs exactly what the plain router costs."""
        self.frozen = None
        self.frozen = self.effective_weight().detach().clone()

    def forward(self, hidden_states: torch.Tensor):
        return _route_with(self.inner, self.effective_weight(), hidden_states)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """The plain router holding ``R'``: a standard checkpoint, and no cost at inference."""
        self.inner.weight.copy_(self.effective_weight())
        return self.inner


def _route_with(router: nn.Module, weight: torch.Tensor, hidden_states: torch.Tensor):
    """Run ``router``'s own gating rule with ``weight`` in place of its parameter (gradients flow into it)."""
    param = router._parameters["weight"]
    router._parameters["weight"] = weight  # a plain tensor for this call only
    try:
        return router(hidden_states)
    finally:
        router._parameters["weight"] = param


@dataclass
class AlignConfig:
    """Post-training MPI. C is matched to each layer's mean router row norm, so logits keep their scale."""

    power_steps: int = 1
    finetune_steps: int = 0  # router-only distillation against the original model (0: one blind step)
    lr: float = 1e-3
    stop_grad_experts: bool = True


def wrap_routers(model: nn.Module, config: AlignConfig) -> list[MPIRouter]:
    wrapped = []
    for m in moe_blocks(model).values():
        R = m.gate.weight.detach()
        c_prime = float(R.norm(dim=-1).mean()) * math.sqrt(R.shape[0])
        m.gate = MPIRouter(m.gate, m.experts, c_prime, config.power_steps, config.stop_grad_experts)
        wrapped.append(m.gate)
    return wrapped


def align_routers(model: nn.Module, config: AlignConfig, calib_ids: torch.Tensor | None = None, progress=None) -> dict:
    """Re-align a trained model's routers with MPI, in place; returns the fine-tune loss log (if any).

    With ``finetune_steps`` the raw routers are trained (everything else frozen) so the MPI-gated
    model's next-token distribution matches the original's (KL on ``calib_ids``), instead of
    changing routing blindly; then ``R'`` is merged into plain routers.
    """
    import copy

    teacher = copy.deepcopy(model).eval() if config.finetune_steps else None
    wrapped = wrap_routers(model, config)
    log: list[float] = []
    if config.finetune_steps:
        if calib_ids is None:
            raise ValueError("router fine-tuning needs calibration text")
        params = [r.inner.weight for r in wrapped]
        trainable = {p: p.requires_grad for p in model.parameters()}
        for p in trainable:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=config.lr)
        steps = range(config.finetune_steps) if progress is None else progress(range(config.finetune_steps))
        for step in steps:
            batch = calib_ids[step % calib_ids.shape[0]][None]
            with torch.no_grad():
                target = teacher(batch, use_cache=False).logits.log_softmax(-1)
            out = model(batch, use_cache=False).logits.log_softmax(-1)
            loss = F.kl_div(out, target, log_target=True, reduction="batchmean") / batch.shape[1]
            opt.zero_grad()
            loss.backward()
            opt.step()
            log.append(loss.item())
        for p, flag in trainable.items():
            p.requires_grad_(flag)
    for m in moe_blocks(model).values():
        m.gate = m.gate.merge()
    return {"finetune_loss": log}
