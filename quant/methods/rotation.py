"""Mergeable residual-stream rotation (QuaRot-style, no online rotations): a pass that leaves the
float model the same function while spreading outlier channels before quantization.

With the residual stream rotated as ``h' = h Q`` (Q orthogonal):

- RMSNorm commutes with Q once its scale γ is folded into the linears that read its output
  (``rms(hQ) = rms(h)``), so every norm's γ goes into q/k/v, gate/up (MoE: every expert's, the
  shared expert's, the router and the shared-expert gate) and lm_head, and becomes 1;
- linears that read the stream take ``W Q`` (the same list), the embedding rows ``E Q``;
- linears that write to it take ``Qᵀ W`` (o, down: every expert's) and ``b Q`` for a bias.

Tied embeddings are untied first: lm_head gets the final norm's γ, the embedding does not.

Modes: ``hadamard`` (one Hadamard of the full width, see ``quant.numerics.hadamard``; Haar-random
orthogonal if the width has no Hadamard construction, recorded in the summary), ``groupwise``
(block-diagonal Hadamard with ``block``-sized blocks aligned with quantization groups), ``random``.

``down_hadamard`` adds the one rotation that cannot be merged: the MLP's intermediate activations (the input of
down_proj, after the elementwise gate, which no rotation passes) get an online Hadamard, ``x ← x H`` at run time
with ``W_down ← W_down H`` (QuaRot's online down_proj rotation), so down_proj's input channels are spread as the
residual's are. It costs a fast Walsh-Hadamard transform of the intermediate width per token and layer at run
time, and the checkpoint lists it (``input_ops``): GPTQ-format export refuses it, our loaders re-attach it.

``head_hadamard`` rotates each attention head's values (SpinQuant's R2, here a fixed Hadamard): ``v_h ← v_h H``
for every head (v_proj's rows and bias), and o_proj's input columns of every head by the same ``H``. Attention
mixes a head's values across positions, never across channels, so the function is unchanged and nothing runs
at run time; o_proj's input, which the residual rotation does not reach, is spread head by head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quant.engine.loop import BlockStep
from quant.engine.options import option
from quant.engine.passes import QuantContext, register_block_pass
from quant.engine.structure import PASS_NEEDS, structure_of
from quant.errors import QuantError
from quant.numerics.hadamard import block_hadamard, hadamard, hadamard_transform, has_hadamard, random_orthogonal
from quant.runtime.inputops import input_ops

MODES = ("hadamard", "groupwise", "random")


ROTATION_NEEDS = PASS_NEEDS["rotate"]  # a residual that only linears read (through RMS pre-norms) and write


@dataclass
class RotationConfig:
    """A mergeable orthogonal rotation of the residual stream (untying tied embeddings)."""

    mode: str = option(
        "hadamard",
        "hadamard (full width), groupwise (block-diagonal, one block per group) or random (orthogonal).",
        "--rotation-mode",
    )
    block: int = option(64, "groupwise: the Hadamard block (the command line uses the quantization group).")
    seed: int = option(0, "random mode, and the fallback for widths without a Hadamard.", "--seed")
    down_hadamard: bool = option(
        False,
        "Also an online Hadamard before every dense down_proj (its input, the MLP's intermediate activations, "
        "cannot be rotated mergeably): spreads that input's outlier channels for the quantizer, at the cost of a "
        "Hadamard transform per token and layer at run time; the checkpoint records it, GPTQ-format export "
        "refuses it, and it rules out D²Quant's DSQ on down_proj (use --no-dsq).",
        "--down-hadamard/--no-down-hadamard",
    )
    head_hadamard: bool = option(
        False,
        "Also a Hadamard on each attention head's values (v_proj's output and o_proj's input, head by head; "
        "merged into the weights, free at run time): spreads o_proj's input channels, which the residual "
        "rotation does not reach. Needs separate q/k/v/o projections.",
        "--head-hadamard/--no-head-hadamard",
    )

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


def untie_embeddings(model: nn.Module, structure=None) -> bool:
    """Give lm_head its own copy of the embedding matrix. Returns whether they were tied."""
    structure = structure or structure_of(model)
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


def _right(w: torch.Tensor, q: torch.Tensor) -> None:  # w ← w Q
    w.data = (w.data.double() @ q.to(w.device)).to(w.dtype)


def _left(w: torch.Tensor, q: torch.Tensor) -> None:  # w ← Qᵀ w
    w.data = (q.to(w.device).T @ w.data.double()).to(w.dtype)


@torch.no_grad()
def fold_block(structure, block: nn.Module) -> None:
    """Fold each residual pre-norm's γ of ``block`` into the linears (routers too) reading its output."""
    info = structure.info(block)
    for name, (kind, place) in info.norms.items():
        if place == "pre":
            readers = [block.get_submodule(r) for r, n in info.readers.items() if n == name]
            _fold(block.get_submodule(name), kind, readers)


@torch.no_grad()
def rotate_block(structure, block: nn.Module, q: torch.Tensor) -> None:
    """Rotate ``block``'s residual readers (``W Q``) and writers (``Qᵀ W``, bias ``b Q``); norms already folded."""
    info = structure.info(block)
    for name in info.readers:
        _right(block.get_submodule(name).weight, q)
    for name in info.writers:
        lin = block.get_submodule(name)
        _left(lin.weight, q)
        if lin.bias is not None:
            lin.bias.data = (lin.bias.data.double() @ q.to(lin.bias.device)).to(lin.bias.dtype)


@torch.no_grad()
def online_down_hadamard(structure, block: nn.Module) -> None:
    """``W_down ← W_down H`` (in float64) and ``x ← x H`` before down_proj at run time (its input ops): the same
    function, with down_proj's input channels spread."""
    down = structure.role(block, "down")
    down.weight.data = hadamard_transform(down.weight.data.double()).to(down.weight.dtype)
    input_ops(down).hadamard = down.in_features


def head_dim(model: nn.Module) -> int:
    c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


@torch.no_grad()
def rotate_heads(structure, block: nn.Module, h: torch.Tensor) -> None:
    """Every head's values ``v_h ← v_h H`` (v_proj's rows ``Hᵀ W``, bias ``b H``) and o_proj's input columns of
    every head ``W H``: the same function, o_proj's input spread within each head."""
    v, o = structure.role(block, "v"), structure.role(block, "o")
    n = h.shape[0]
    _left(v.weight, torch.block_diag(*[h] * (v.out_features // n)))
    if v.bias is not None:
        v.bias.data = (v.bias.data.double().reshape(-1, n) @ h.to(v.bias.device)).reshape(-1).to(v.bias.dtype)
    _right(o.weight, torch.block_diag(*[h] * (o.in_features // n)))


def check_head_hadamard(model: nn.Module, structure) -> None:
    """Separate q/k/v/o projections whose widths are whole heads of a width with a Hadamard, or a clear error."""
    structure.check("--head-hadamard", ("qkvo",), "quantize without --head-hadamard")
    d_h = head_dim(model)
    if not has_hadamard(d_h):
        raise QuantError(f"--head-hadamard: no Hadamard of order {d_h} (the head width)")
    block = structure.blocks(model)[0]
    widths = (structure.role(block, "v").out_features, structure.role(block, "o").in_features)
    if any(w % d_h for w in widths):
        raise QuantError(f"--head-hadamard: v_proj/o_proj widths {widths} are not whole heads of {d_h}")


def check_down_hadamard(model: nn.Module, structure) -> None:
    """Every block a dense MLP whose down_proj width has a Hadamard construction, or a clear error."""
    from moe.experts import is_moe_block

    for block in structure.blocks(model):
        if is_moe_block(structure.role(block, "mlp")):
            raise QuantError("--down-hadamard needs dense MLPs (one down_proj per block); this model has experts")
        width = structure.role(block, "down").in_features
        if not has_hadamard(width):
            raise QuantError(f"--down-hadamard: no Hadamard of order {width} (down_proj's input width)")


@torch.no_grad()
def fold_norms(model: nn.Module) -> None:
    """Fold every residual pre-norm's γ into the linears reading its output, and the final norm's into
    lm_head; the norms become weightless (whole-model form, for FPTQuant)."""
    structure = structure_of(model)
    structure.check("rotation", ROTATION_NEEDS, "quantize with --no-rotation")
    untie_embeddings(model)
    for block in structure.blocks(model):
        fold_block(structure, block)
    _fold(model.get_submodule(structure.final_norm), structure.final_norm_kind, [structure.head(model)])


@torch.no_grad()
def rotate(model: nn.Module, q: torch.Tensor) -> None:
    """Rotate the residual stream by the orthogonal ``q`` (norms must already be folded)."""
    structure = structure_of(model)
    _right(structure.embeddings(model).weight, q)
    for block in structure.blocks(model):
        rotate_block(structure, block, q)
    _right(structure.head(model).weight, q)


class RotateStep(BlockStep):
    """The rotation on the block engine: embeddings before block 0, each block as it loads (before the
    quantizer sees it), the final norm and lm_head at the end."""

    name = "rotate"

    def __init__(self, ctx: QuantContext, config: RotationConfig) -> None:
        self.ctx, self.config = ctx, config
        self.q, self.kind = rotation_matrix(ctx.model.config.hidden_size, config)
        self.h = hadamard(head_dim(ctx.model)).double() if config.head_hadamard else None

    def start(self, run) -> None:
        model, s = self.ctx.model, run.structure
        self.was_tied = untie_embeddings(model, s)
        _right(s.embeddings(model).weight, self.q)

    def block(self, run, i: int, block: nn.Module) -> None:
        fold_block(run.structure, block)
        rotate_block(run.structure, block, self.q)
        if self.config.down_hadamard:
            online_down_hadamard(run.structure, block)
        if self.h is not None:
            rotate_heads(run.structure, block, self.h)

    def finish(self, run) -> dict:
        model, s = self.ctx.model, run.structure
        with torch.no_grad():
            _fold(model.get_submodule(s.final_norm), s.final_norm_kind, [s.head(model)])
            _right(s.head(model).weight, self.q)
        return {"rotation": self.kind, "untied_embeddings": self.was_tied, "norms_folded": True,
                **{k: True for k in ("down_hadamard", "head_hadamard") if getattr(self.config, k)}}


@register_block_pass("rotate", RotationConfig)
def rotate_pass(ctx: QuantContext, config: RotationConfig) -> RotateStep:
    config.validate()
    ctx.structure.check("rotation", ROTATION_NEEDS, "quantize with --no-rotation")
    if config.down_hadamard:
        check_down_hadamard(ctx.model, ctx.structure)
    if config.head_hadamard:
        check_head_hadamard(ctx.model, ctx.structure)
    return RotateStep(ctx, config)
