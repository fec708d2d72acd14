"""Mergeable residual-stream rotation (QuaRot-style, no online rotations): a pass that leaves the
float model the same function while spreading outlier channels before quantization.

With the residual stream rotated as ``h' = h Q`` (Q orthogonal):

- RMSNorm commutes with Q once its scale γ is folded into the linears that read its output
  (``rms(hQ) = rms(h)``), so every norm's γ goes into q/k/v, gate/up (MoE: every expert's, the
  shared expert's, the router and the shared-expert gate) and lm_head, and becomes 1;
- linears that read the stream take ``W Q`` (the same list), the embedding rows ``E Q``;
- linears that write to it take ``Qᵀ W`` (o, down: every expert's) and ``b Q`` for a bias.

Tied embeddings are untied first: lm_head gets the final norm's γ, the embedding does not.

Modes: ``hadamard`` (one Hadamard of the full width, see ``quant.hadamard``; Haar-random
orthogonal if the width has no Hadamard construction, recorded in the summary), ``groupwise``
(block-diagonal Hadamard with ``block``-sized blocks aligned with quantization groups), ``random``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe.experts import unfuse_experts
from quant.adapters import adapter_for
from quant.errors import QuantError
from quant.hadamard import block_hadamard, hadamard, has_hadamard, random_orthogonal
from quant.passes import QuantContext, register_pass

MODES = ("hadamard", "groupwise", "random")


@dataclass
class RotationConfig:
    mode: str = "hadamard"
    block: int = 64  # groupwise: the Hadamard block (match the quantization group)
    seed: int = 0  # random mode, and the fallback for widths without a Hadamard

    def validate(self) -> None:
        if self.mode not in MODES:
            raise QuantError(f"unknown rotation mode {self.mode!r}; choose from {', '.join(MODES)}")
        if self.mode == "groupwise" and not has_hadamard(self.block):
            raise QuantError(f"no Hadamard of order {self.block} for the group-wise rotation")


def rotation_matrix(d: int, config: RotationConfig) -> tuple[torch.Tensor, str]:
    config.validate()
    if config.mode == "groupwise":
        return block_hadamard(d, config.block), f"block-diagonal Hadamard {config.block}"
    if config.mode == "hadamard" and has_hadamard(d):
        return hadamard(d), f"Hadamard {d}"
    return random_orthogonal(d, config.seed), f"random orthogonal {d} (seed {config.seed})"


def _scale_inputs(linear: nn.Linear, gamma: torch.Tensor) -> None:
    linear.weight.data = (linear.weight.data.double() * gamma.double()[None, :]).to(linear.weight.dtype)


def untie_embeddings(model: nn.Module) -> bool:
    """Give lm_head its own copy of the embedding matrix. Returns whether they were tied."""
    adapter = adapter_for(model)
    if not adapter.is_tied(model):
        return False
    head = adapter.head(model)
    head.weight = nn.Parameter(head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    return True


@torch.no_grad()
def fold_norms(model: nn.Module) -> None:
    """Fold every RMSNorm's γ into the linears reading its output; the norms become weightless (γ = 1)."""
    adapter = adapter_for(model)
    unfuse_experts(model)  # MoE: one linear per expert projection (same function)
    untie_embeddings(model)
    for block in adapter.blocks(model):
        readers1, readers2, _ = adapter.residual_io(block)
        for norm_role, readers in (("input_norm", readers1), ("post_attention_norm", readers2)):
            norm = adapter.role(block, norm_role)
            for lin in readers:
                _scale_inputs(lin, norm.weight)
            norm.weight.fill_(1.0)
    final = model.get_submodule(adapter.final_norm)
    _scale_inputs(adapter.head(model), final.weight)
    final.weight.fill_(1.0)


@torch.no_grad()
def rotate(model: nn.Module, q: torch.Tensor) -> None:
    """Rotate the residual stream by the orthogonal ``q`` (norms must already be folded)."""
    adapter = adapter_for(model)

    def right(w: torch.Tensor) -> None:  # w ← w Q
        w.data = (w.data.double() @ q).to(w.dtype)

    def left(w: torch.Tensor) -> None:  # w ← Qᵀ w
        w.data = (q.T @ w.data.double()).to(w.dtype)

    right(adapter.embeddings(model).weight)
    for block in adapter.blocks(model):
        readers1, readers2, writers = adapter.residual_io(block)
        for lin in readers1 + readers2:
            right(lin.weight)
        for lin in writers:
            left(lin.weight)
            if lin.bias is not None:
                lin.bias.data = (lin.bias.data.double() @ q).to(lin.bias.dtype)
    right(adapter.head(model).weight)


@register_pass("rotate", RotationConfig)
def rotate_pass(ctx: QuantContext, config: RotationConfig) -> dict:
    model = ctx.model
    d = model.config.hidden_size
    q, kind = rotation_matrix(d, config)
    was_tied = ctx.adapter.is_tied(model)
    fold_norms(model)
    rotate(model, q)
    return {"rotation": kind, "untied_embeddings": was_tied, "norms_folded": True}
