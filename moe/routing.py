"""Routing fidelity: how a quantized (or re-aligned) MoE model routes tokens compared with the reference.

Per MoE layer, on the same text: top-k set overlap (mean |S_ref ∩ S| / k), exact top-k set match,
top-1 agreement, KL(p_ref ‖ p) of the router distributions, and the load balance of each model as
MaxVio = (max expert load − mean load) / mean load, with load = tokens assigned (top-k counted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe.experts import is_moe_block


def routers(model: nn.Module) -> dict[str, nn.Module]:
    """``{layer name: router}`` of every sparse-MoE block (the module whose first output is the logits)."""
    return {name: m.gate for name, m in model.named_modules() if is_moe_block(m) and isinstance(m.gate, nn.Module)}


@torch.no_grad()
def router_logits(model: nn.Module, ids: torch.Tensor, batch: int = 4) -> dict[str, torch.Tensor]:
    """Router logits ``[tokens, experts]`` (fp32) of every MoE layer while ``model`` reads ``ids [n, seq]``."""
    got: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, r in routers(model).items():
        got[name] = []
        hooks.append(r.register_forward_hook(lambda _m, _a, out, n=name: got[n].append(out[0].detach().float())))
    try:
        for i in range(0, ids.shape[0], batch):
            model(ids[i : i + batch], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


def max_violation(topk: torch.Tensor, n_experts: int) -> float:
    load = torch.bincount(topk.reshape(-1), minlength=n_experts).float()
    return float((load.max() - load.mean()) / load.mean())


@dataclass
class LayerRouting:
    topk_overlap: float
    exact_set_match: float
    top1_agreement: float
    kl: float
    maxvio_ref: float
    maxvio: float


def compare_routing(ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor], k: int) -> dict[str, LayerRouting]:
    """Per-layer routing agreement of ``other`` against ``ref`` (both from :func:`router_logits`)."""
    out = {}
    for name, a in ref.items():
        b = other[name]
        ta, tb = a.topk(k, -1).indices, b.topk(k, -1).indices
        hit = (ta[:, :, None] == tb[:, None, :]).any(-1).float()  # [T, k]: each ref choice kept?
        la, lb = a.log_softmax(-1), b.log_softmax(-1)
        out[name] = LayerRouting(
            topk_overlap=float(hit.mean()),
            exact_set_match=float(hit.all(-1).float().mean()),
            top1_agreement=float((ta[:, 0] == tb[:, 0]).float().mean()),
            kl=float((la.exp() * (la - lb)).sum(-1).mean()),
            maxvio_ref=max_violation(ta, a.shape[-1]),
            maxvio=max_violation(tb, b.shape[-1]),
        )
    return out


def summarize(per_layer: dict[str, LayerRouting]) -> dict[str, float]:
    """Means over layers (MaxVio: the mean of each layer's value)."""
    n = max(len(per_layer), 1)
    fields = LayerRouting.__dataclass_fields__
    return {f: sum(getattr(r, f) for r in per_layer.values()) / n for f in fields}
