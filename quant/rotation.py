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

from quant.errors import QuantError
from quant.hadamard import block_hadamard, hadamard, has_hadamard, random_orthogonal
from quant.passes import QuantContext, register_pass
from quant.structure import PASS_NEEDS, structure_of

MODES = ("hadamard", "groupwise", "random")


ROTATION_NEEDS = PASS_NEEDS["rotate"]  # a residual that only linears read (through RMS pre-norms) and write


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
    structure = structure_of(model)
    if not structure.is_tied(model):
        return False
    head = structure.head(model)
    head.weight = nn.Parameter(head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    return True


def _fold(norm: nn.Module, kind: str, readers: list[nn.Module]) -> None:
    """Fold a norm's γ (``w``, or ``1 + w`` for Gemma's norms) into its readers; the norm becomes γ = 1."""
    gamma = norm.weight + 1 if kind == "rms_1p" else norm.weight.clone()
    for lin in readers:
        _scale_inputs(lin, gamma)
    norm.weight.fill_(0.0 if kind == "rms_1p" else 1.0)


@torch.no_grad()
def fold_norms(model: nn.Module) -> None:
    """Fold every residual pre-norm's γ into the linears (routers too) reading its output, and the final
    norm's into lm_head; the norms become weightless."""
    structure = structure_of(model)
    structure.check("rotation", ROTATION_NEEDS, "quantize with --no-rotation")
    untie_embeddings(model)
    for block in structure.blocks(model):
        info = structure.info(block)
        for name, (kind, place) in info.norms.items():
            if place == "pre":
                readers = [block.get_submodule(r) for r, n in info.readers.items() if n == name]
                _fold(block.get_submodule(name), kind, readers)
    _fold(model.get_submodule(structure.final_norm), structure.final_norm_kind, [structure.head(model)])


@torch.no_grad()
def rotate(model: nn.Module, q: torch.Tensor) -> None:
    """Rotate the residual stream by the orthogonal ``q`` (norms must already be folded)."""
    structure = structure_of(model)

    def right(w: torch.Tensor) -> None:  # w ← w Q
        w.data = (w.data.double() @ q).to(w.dtype)

    def left(w: torch.Tensor) -> None:  # w ← Qᵀ w
        w.data = (q.T @ w.data.double()).to(w.dtype)

    right(structure.embeddings(model).weight)
    for block in structure.blocks(model):
        info = structure.info(block)
        for name in info.readers:
            right(block.get_submodule(name).weight)
        for name in info.writers:
            lin = block.get_submodule(name)
            left(lin.weight)
            if lin.bias is not None:
                lin.bias.data = (lin.bias.data.double() @ q).to(lin.bias.dtype)
    right(structure.head(model).weight)


@register_pass("rotate", RotationConfig)
def rotate_pass(ctx: QuantContext, config: RotationConfig) -> dict:
    model = ctx.model
    d = model.config.hidden_size
    q, kind = rotation_matrix(d, config)
    ctx.structure.check("rotation", ROTATION_NEEDS, "quantize with --no-rotation")
    was_tied = ctx.structure.is_tied(model)
    fold_norms(model)
    rotate(model, q)
    return {"rotation": kind, "untied_embeddings": was_tied, "norms_folded": True}
