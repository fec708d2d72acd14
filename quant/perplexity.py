"""WikiText-2 perplexity with the GPTQ/QuaRot protocol (shared/research/methods.md §5.1).

The test split joined with ``"\\n\\n"`` is tokenized once; non-overlapping windows of ``seqlen``
tokens (remainder dropped) each give a mean next-token NLL; ``ppl = exp(mean of window NLLs)``.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from calibrate.data import c4_eval_text, eval_text
from quant.errors import QuantError
from quant.quantlinear import dequantized_weights

EVAL_SETS = {
    "wikitext2": (eval_text, "wikitext-2-raw-v1 test"),
    "c4": (c4_eval_text, "c4 validation slice (bundled records 0-999)"),
}


def tokenize_eval(tokenizer, text: str | None = None, dataset: str = "wikitext2") -> torch.Tensor:
    return tokenizer(EVAL_SETS[dataset][0]() if text is None else text, return_tensors="pt").input_ids[0]


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    seqlen: int = 2048,
    max_windows: int | None = None,
    progress: bool = True,
    desc: str = "perplexity",
    dataset: str = "wikitext2",
) -> dict:
    total = ids.numel() // seqlen
    n = total if not max_windows else min(total, max_windows)
    if n < 1:
        raise QuantError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    device = next(model.parameters()).device
    nlls = []
    t0 = time.perf_counter()
    dtype = next(model.parameters()).dtype
    with dequantized_weights(model, dtype):
        for i in tqdm(range(n), desc=desc, disable=not progress, unit="win"):
            window = ids[i * seqlen : (i + 1) * seqlen].to(device)[None]
            logits = model(window, use_cache=False).logits[0, :-1].float()
            nlls.append(F.cross_entropy(logits, window[0, 1:]).item())
    mean_nll = sum(nlls) / n
    if not mean_nll < 700:  # exp() overflows past ~709 nats; NaN fails this test too
        raise QuantError(f"perplexity overflows (mean NLL {mean_nll:.4g} nats over {n} windows): the model is broken")
    return {
        "ppl": math.exp(mean_nll),
        "mean_nll": mean_nll,
        "windows": n,
        "total_windows": total,
        "seqlen": seqlen,
        "dataset": EVAL_SETS[dataset][1],
        "seconds": round(time.perf_counter() - t0, 2),
        "window_nll": nlls,
    }
