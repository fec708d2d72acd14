"""Decode attention on the CPU for a ``torch.compile``'d step over a static KV cache.

Registered with transformers as the attention implementation ``"lowbit_cpu"`` (``AttentionInterface``), masks made
as for ``"sdpa"``: a single float32 query token with a boolean mask goes to ``torch.ops.lowbit_cpu.decode_attention``
(csrc/decode_attention_cpu.cpp), which reads the cache only up to the last position the mask allows; every other
call (prefill, other dtypes, dropout, soft-capping, attention sinks, a float or per-head mask) is transformers' own
``sdpa`` attention, unchanged. Inductor's decode attention over a static cache was ~160 µs a layer on SmolLM2 (2
threads), a quarter of a compiled INT4 decode step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import kernels_cpu

NAME = "lowbit_cpu"


def _served(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            mask: torch.Tensor | None, dropout: float, kwargs: dict) -> bool:
    return (query.shape[2] == 1 and query.device.type == "cpu" and dropout == 0.0
            and query.dtype == key.dtype == value.dtype == torch.float32
            and isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 4
            and mask.shape[1] == 1 and mask.shape[-1] == key.shape[2]
            and not any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "sinks", "position_bias"))
            and kernels_cpu.EXTENSION.load() is not None)


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``[B, H, q, D]`` in, ``([B, q, H, D], None)`` out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not _served(module, query, key, value, attention_mask, dropout, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    return torch.ops.lowbit_cpu.decode_attention(query, key, value, attention_mask[:, 0, -1, :], scale), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(NAME, attention_forward)
        AttentionMaskInterface.register(NAME, sdpa_mask)


def use_decode_attention(model: nn.Module) -> bool:
    """Switch a CPU model that uses ``sdpa`` attention to ``"lowbit_cpu"`` (the same results; decode steps through
    the kernel). False, and nothing changed, where the model uses another implementation or the kernels are
    unavailable."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa" or kernels_cpu.EXTENSION.load() is None:
        return False
    _register()
    model.set_attn_implementation(NAME)
    return True
