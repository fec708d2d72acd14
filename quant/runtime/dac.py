"""Deviation-Aware Correction (D²Quant's DAC): an additive bias on a norm's output.

After a block's attention weights are quantized, the post-attention norm's output drifts from the
float model's by a per-channel mean ``μ`` (measured on calibration tokens, teacher minus student).
Giving that norm the bias ``μ`` removes the drift. Llama-style RMSNorm has no bias, so one is
registered on the module as a parameter named ``bias`` (saved as ``<norm>.bias``) and added to its
output by a forward hook; the checkpoint lists such norms under ``quantization_config.norm_biases``
and loading re-attaches them.
"""

from __future__ import annotations

import torch
from torch import nn


def _add_bias(_module: nn.Module, _args, out: torch.Tensor) -> torch.Tensor:
    return out + _module.bias.to(out.dtype)


def add_norm_bias(norm: nn.Module, bias: torch.Tensor) -> bool:
    """Add ``bias`` to ``norm``'s output. A norm with a bias of its own (LayerNorm, or an earlier DAC) takes
    it there; an RMSNorm gets a new ``bias`` added by a hook. Returns whether a bias was created (the
    checkpoint lists those norms, so that loading recreates them)."""
    if getattr(norm, "bias", None) is not None:
        norm.bias.data += bias.to(norm.bias.dtype)
        return False
    norm.register_parameter("bias", nn.Parameter(bias.detach().clone().to(norm.weight.dtype), requires_grad=False))
    norm._lowbit_bias_hook = norm.register_forward_hook(_add_bias)
    return True


def norm_bias_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if getattr(m, "_lowbit_bias_hook", None) is not None]
