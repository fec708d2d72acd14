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
from quant.engine.loop import BlockStep, _advance, run_blocks
from quant.errors import QuantError
from quant.runtime.quantlinear import dequantized_weights

EVAL_SETS = {
    "wikitext2": (eval_text, "wikitext-2-raw-v1 test"),
    "c4": (c4_eval_text, "c4 validation slice (bundled records 0-999)"),
}


def tokenize_eval(tokenizer, text: str | None = None, dataset: str = "wikitext2") -> torch.Tensor:
    return tokenizer(EVAL_SETS[dataset][0]() if text is None else text, return_tensors="pt").input_ids[0]


def _windows(ids: torch.Tensor, seqlen: int, max_windows: int | None) -> tuple[int, int]:
    total = ids.numel() // seqlen
    n = total if not max_windows else min(total, max_windows)
    if n < 1:
        raise QuantError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return n, total


def _result(nlls: list[float], total: int, seqlen: int, dataset: str, t0: float, **extra) -> dict:
    n = len(nlls)
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
        **extra,
        "window_nll": nlls,
    }


@torch.no_grad()
def perplexity(
    model: nn.Module | None,
    ids: torch.Tensor,
    seqlen: int = 2048,
    max_windows: int | None = None,
    progress: bool = True,
    desc: str = "perplexity",
    dataset: str = "wikitext2",
    source=None,
    window_batch: int | None = None,
) -> dict:
    """Perplexity of ``model``, or (``source``: a ``quant.engine.streaming.DiskSource``, ``model`` None) of a
    model read block by block from disk, for models that do not fit in memory: batches of ``window_batch``
    windows go through the block engine (each batch reads every block once), and the model's own forward turns
    the last block's output into logits."""
    n, total = _windows(ids, seqlen, max_windows)
    t0 = time.perf_counter()
    if source is not None:
        return _streamed(source, ids[: n * seqlen].view(n, seqlen), progress, desc, window_batch, total, dataset, t0)
    device = next(model.parameters()).device
    nlls = []
    dtype = next(model.parameters()).dtype
    with dequantized_weights(model, dtype):
        for i in tqdm(range(n), desc=desc, disable=not progress, unit="win"):
            window = ids[i * seqlen : (i + 1) * seqlen].to(device)[None]
            logits = model(window, use_cache=False).logits[0, :-1].float()
            nlls.append(F.cross_entropy(logits, window[0, 1:]).item())
    return _result(nlls, total, seqlen, dataset, t0)


def _streamed(source, windows: torch.Tensor, progress: bool, desc: str, batch: int | None, total: int,
              dataset: str, t0: float) -> dict:
    from quant.engine.passes import QuantContext

    model = source.skeleton()
    n, seqlen = windows.shape
    batch = batch or _window_batch(model, seqlen, n)
    nlls: list[float] = []
    for b0 in range(0, n, batch):
        step = WindowNLL(windows[b0 : b0 + batch], seqlen, f"{desc} windows {b0 + 1}-{min(n, b0 + batch)}/{n}")
        ctx = QuantContext(model, calib_ids=step.windows, progress=progress, device=str(source.device), source=source)
        nlls += run_blocks(ctx, [step])[0]["window_nll"]
    return _result(nlls, total, seqlen, dataset, t0, streamed=True, window_batch=batch)


def _window_batch(model: nn.Module, seqlen: int, n: int) -> int:
    """Windows per pass over the blocks: their streams (twice, while a block advances them) in a quarter of
    the available memory; every pass reads the whole model from disk once."""
    from quant.formats.reader import available_memory

    width = model.get_input_embeddings().embedding_dim
    per = 2 * seqlen * width * 4
    avail = available_memory() or 8 * 2**30
    return max(1, min(n, avail // 4 // per))


class WindowNLL(BlockStep):
    """The block step of a streamed :func:`perplexity`: advances the windows' streams through each block, then
    runs the model's forward with the embeddings and blocks stubbed out (the last block hands over the
    stream) so the final norm, head and any logit scaling or soft-capping are the model's own."""

    needs_data = True

    def __init__(self, windows: torch.Tensor, seqlen: int, name: str) -> None:
        self.windows, self.name = windows, name
        self.chunk = max(1, 8192 // seqlen)  # windows per block call: bounds the MLP's intermediate activations

    def block(self, run, i: int, block: nn.Module) -> None:
        run.x = _advance(block, run.x, run.kwargs[i], self.chunk)

    def finish(self, run) -> dict:
        from quant.engine.streaming import _outer_names

        model, nlls = run.ctx.model, []
        embeddings = [model.get_submodule(n) for n in _outer_names(model, run.structure, "inputs")]
        current: list[torch.Tensor] = []

        def zeros(m: nn.Embedding):
            return lambda ids, *a, **k: torch.zeros(*ids.shape, m.embedding_dim, dtype=run.x.dtype, device=ids.device)

        for m in embeddings:
            m.forward = zeros(m)
        for b in run.blocks:
            b.forward = lambda *a, **k: a[0] if a else k["hidden_states"]
        run.blocks[-1].forward = lambda *a, **k: current[0]
        try:
            for w, row in enumerate(self.windows.to(run.device)):
                current[:] = [run.x[w : w + 1]]
                logits = model(row[None], use_cache=False).logits[0, :-1].float()
                nlls.append(F.cross_entropy(logits, row[1:]).item())
        finally:
            for m in [*embeddings, *run.blocks]:
                del m.forward
        return {"window_nll": nlls}
