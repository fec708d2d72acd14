"""Perplexity against transformers' own loss: exp of the mean over non-overlapping windows (remainder
dropped, at most max_windows) of ``model(window, labels=window).loss``."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

from quant.runtime.perplexity import perplexity


@pytest.mark.parametrize(
    "n_tokens, seqlen, max_windows",
    [
        (1000, 96, None),  # 10 windows, 40 tokens left over
        (1000, 96, 4),  # capped below the 10 available
        (1024, 128, None),  # an exact multiple: all 8 windows
    ],
)
def test_perplexity_is_exp_of_mean_hf_loss(calib, n_tokens, seqlen, max_windows):
    model = tiny_model("llama", num_hidden_layers=2)
    ids = calib.flatten()[:n_tokens]
    total = n_tokens // seqlen
    n = total if max_windows is None else max_windows
    with torch.no_grad():  # HF shifts the labels itself: the mean NLL of tokens 1..seqlen-1 given their prefix
        losses = [float(model(w[None], labels=w[None]).loss) for w in ids[: total * seqlen].view(total, seqlen)[:n]]
    ref_nll = sum(losses) / n
    got = perplexity(model, ids, seqlen, max_windows, progress=False)
    assert (got["windows"], got["total_windows"]) == (n, total)
    assert got["window_nll"] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    assert got["mean_nll"] == pytest.approx(ref_nll, rel=1e-6)
    assert got["ppl"] == pytest.approx(math.exp(ref_nll), rel=1e-6)
    # the windows differ, so the mean of exp is not the exp of the mean (a swapped order would show)
    assert sum(math.exp(x) for x in losses) / n > math.exp(ref_nll) * (1 + 1e-6)
