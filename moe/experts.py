"""Sparse-MoE experts as one linear per projection, so every per-linear quantizer applies to each expert.

transformers 5 stores the experts of Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE fused: ``gate_up_proj``
``[E, 2F, D]`` and ``down_proj`` ``[E, D, F]`` in one ``*Experts`` module. ``unfuse_experts`` swaps each
such module for :class:`ExpertList`, whose expert ``e`` has ``gate_proj``/``up_proj``/``down_proj``
linears (``experts.{e}.gate_proj``, the per-expert naming these models used before fusing), and
computes the same function: tokens go to their top-k experts, each output weighted by its routing
weight and summed. Routers (``mlp.gate``) and shared-expert gates are left alone (float).
"""

from __future__ import annotations

import torch
from torch import nn


class ExpertMLP(nn.Module):
    """One SwiGLU expert: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, intermediate: int, act_fn: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, dtype=dtype)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ExpertList(nn.ModuleList):
    """Drop-in for a fused ``*Experts`` module: ``forward(hidden [T, D], top_k_index [T, k], top_k_weights [T, k])``."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act_fn: nn.Module, dtype: torch.dtype):
        super().__init__(ExpertMLP(hidden, intermediate, act_fn, dtype) for _ in range(num_experts))
        self.num_experts = num_experts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            y = expert(hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def is_fused_experts(m: nn.Module) -> bool:
    w = getattr(m, "gate_up_proj", None)
    return isinstance(w, torch.Tensor) and w.dim() == 3 and getattr(m, "down_proj", None) is not None


@torch.no_grad()
def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module by an :class:`ExpertList` with the same weights; returns how many."""
    fused = [(name, m) for name, m in model.named_modules() if is_fused_experts(m)]
    for name, m in fused:
        n, two_f, d = m.gate_up_proj.shape
        f = two_f // 2
        new = ExpertList(n, d, f, m.act_fn, m.gate_up_proj.dtype)
        if m.gate_up_proj.device.type != "meta":
            for e, expert in enumerate(new):
                expert.gate_proj.weight.copy_(m.gate_up_proj[e, :f])
                expert.up_proj.weight.copy_(m.gate_up_proj[e, f:])
                expert.down_proj.weight.copy_(m.down_proj[e])
        new.to(m.gate_up_proj.device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return len(fused)


def is_moe_block(mlp: nn.Module) -> bool:
    experts = getattr(mlp, "experts", None)
    return experts is not None and (isinstance(experts, ExpertList) or is_fused_experts(experts))
