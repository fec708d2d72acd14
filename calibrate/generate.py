"""Calibration text the model writes itself (``--calib self``): data-free calibration, as LLM-QAT distils on
the float model's own samples. The windows follow the model's distribution, which is what a KL against it
measures, and need no text from the user."""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from quant.errors import QuantError
from quant.runtime.generation import cache_kwarg

BATCH = 32  # sequences sampled at once: the KV cache of 32 x 512 tokens of a 135M model is under 1 GiB


@torch.no_grad()
def sample_windows(model: nn.Module, first: torch.Tensor, n: int, seqlen: int, g: torch.Generator) -> torch.Tensor:
    """``[n, seqlen]`` tokens: each row opens with a token drawn uniformly from ``first`` (LLM-QAT's start: an
    instruction-tuned model's BOS would open a chat transcript every time), the rest sampled at temperature 1
    from ``model``. ``g`` is the only randomness (all draws on the CPU: one seed, the same text on any device), and
    nothing else shapes the distribution (``generate`` would apply the model's own top-k, penalties and stop token)."""
    params = list(model.parameters())
    if not params or any(p.device.type == "meta" for p in params):
        raise QuantError("--calib self samples text from the model, which must be resident (not streamed)")
    from transformers import DynamicCache

    device, kv, rows = params[0].device, cache_kwarg(model), []
    bar = tqdm(total=n * seqlen, desc="sampling calibration text", unit="tok")
    for b in range(0, n, BATCH):
        size = min(BATCH, n - b)
        token = first[torch.randint(0, len(first), (size, 1), generator=g)]
        cache, out = DynamicCache(), [token]
        bar.update(size)
        for _ in range(seqlen - 1):
            o = model(input_ids=token.to(device), **{kv: cache}, use_cache=True)
            token = torch.multinomial(torch.softmax(o.logits[:, -1].float().cpu(), dim=-1), 1, generator=g)
            out.append(token)
            bar.update(size)
        rows.append(torch.cat(out, dim=1))
    bar.close()
    return torch.cat(rows)
