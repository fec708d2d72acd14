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


def add_norm_bias(norm: nn.Module, bias: torch.Tensor) -> None:
    """Give ``norm`` an additive output bias (added to an existing one, if it has one from DAC)."""
    if getattr(norm, "bias", None) is not None:
        if getattr(norm, "_lowbit_bias_hook", None) is None:
            raise ValueError(f"{type(norm).__name__} already has its own bias; add μ to it instead")
        norm.bias.data += bias.to(norm.bias.dtype)
        return
    norm.register_parameter("bias", nn.Parameter(bias.detach().clone().to(norm.weight.dtype), requires_grad=False))
    norm._lowbit_bias_hook = norm.register_forward_hook(_add_bias)


def norm_bias_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if getattr(m, "_lowbit_bias_hook", None) is not None]
