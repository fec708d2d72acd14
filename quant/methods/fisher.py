"""Measured sensitivity: the diagonal of the empirical Fisher information of the linears' weights.

Quantizing a weight by ``δ`` raises the language-model loss by about ``½ Σ F_i δ_i²`` where ``F`` is the Fisher
(the loss's expected Hessian; its diagonal is the mean squared gradient, SqueezeLLM's and HAWQ's sensitivity).
The allocator weighs each layer's round-to-nearest error by it to spend bits where the model, not the
weights alone, says they matter. The model must be resident: one forward and backward pass per window.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from quant.errors import QuantError


def fisher_diagonal(model: nn.Module, ids: torch.Tensor, names: list[str], progress: bool = True
                    ) -> dict[str, torch.Tensor]:
    """``E[(∂L/∂W)²]`` over the windows ``ids`` ([n, seqlen]) for each named linear's weight, where ``L`` is a
    window's mean next-token cross-entropy on its own text (the empirical Fisher, one window per sample)."""
    if ids is None or ids.ndim != 2 or not len(ids):
        raise QuantError("the fisher allocator needs calibration windows (it measures gradients on text)")
    weights = {n: model.get_submodule(n).weight for n in names}
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    device = next(model.parameters()).device
    acc = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
    was_training = model.training
    model.eval()
    try:
        for row in tqdm(ids, desc="fisher", unit="window", disable=not progress):
            x = row[None].to(device)
            loss = model(input_ids=x, labels=x, use_cache=False).loss
            grads = torch.autograd.grad(loss, list(weights.values()))
            for n, g in zip(weights, grads, strict=True):
                acc[n].add_(g.float().pow(2))
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return {n: a.div_(len(ids)) for n, a in acc.items()}


__all__ = ["fisher_diagonal"]
