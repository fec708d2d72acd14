"""End-to-end distillation of the quantization scales (``--finetune e2e`` or ``both``), with the codes frozen (or,
with ``--finetune-rounding``, each free to move one step).

After the last block of the quantizer's engine run, every packed linear of the model gets a trainable factor
``1 + a`` on each group scale (and each DSQ row scale), as the block pass learns them (:class:`Tunable`), and all
of them are trained together so that the quantized model's next-token distribution matches the float model's:
KL(float || quantized) per token, over the calibration windows (never the evaluation text). This is
EfficientQAT's end-to-end step (its E2E-QP trains the step sizes with the integer codes frozen): the block pass
matches each block's output, this one what the model finally predicts, so errors that only add up across blocks
are corrected too.

The float model is no longer there at this point; its prediction is not needed in full. The engine carried the
float model's residual stream through every block (the quantizer's float stream, GPTAQ's target), so after the
last block ``run.xf`` holds the float model's final hidden states for every calibration window; the teacher's
logits are the final norm and lm_head (still float, and the same modules the student ends in) applied to them.
The student runs its blocks from the embeddings with the engine's own block calls, so any architecture the
structure discovery supports works, and the model must be resident (a streamed run refuses it).

Optimiser: Adam on the factors (with ``e2e_norms``, also on every norm's weight and bias: float parameters, stored
as they are), ``e2e_lr`` decaying linearly (after a linear rise over the ``warmup`` share of the steps, if set),
``e2e_steps`` steps of ``e2e_batch`` windows; with ``rounding`` the codes move too, each by at most one step,
through the block pass's bounded offsets and signed steps (the quantizer keeps every float weight until then, the
offsets' starting point); 1/8 of the windows held out and the best held-out KL kept (every step runs, no early stop;
the shared loop of :func:`quant.methods.finetune.fit`), so the result is never worse than the solver's on held-out
calibration text. Hardened as the block pass does: fp16 scales (or the rows' 8-bit grids), the format unchanged.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from quant.engine.blockwise import call_block
from quant.engine.loop import Run, capture, to_compute


def distill_scales(run: Run, cfg, progress: bool = True) -> dict:
    """Train every packed linear's scale factors on KL(float || quantized) next-token distributions; returns the
    loss curve. ``cfg``: the :class:`quant.methods.finetune.FinetuneConfig` (its ``e2e_*`` settings)."""
    from quant.engine import distributed as dist
    from quant.methods.finetune import Schedule, fit, mean_loss, split, tunable_names, tunables

    ctx, structure, model = run.ctx, run.structure, run.ctx.model
    norm = model.get_submodule(structure.final_norm) if structure.final_norm else nn.Identity()
    teacher_norm = copy.deepcopy(norm)  # the float model's, however the student's final norm is trained
    head = structure.head(model)
    ids = dist.shard(ctx.calib_ids).to(run.device)
    ctx.source.load_outer(model, structure, "inputs")
    x0, _ = capture(model, run.blocks, ids)  # every window's input to block 0 (the embeddings' output)
    ctx.source.release_outer(model, structure, "inputs")
    x0 = to_compute(x0, run.device, getattr(ctx.source, "dtype", None))  # in the blocks' compute dtype, as the engine's
    teacher = run.xf

    def logprobs(h: torch.Tensor, final_norm: nn.Module) -> torch.Tensor:
        return F.log_softmax(head(final_norm(h)).float(), dim=-1)

    def loss_on(idx: torch.Tensor) -> torch.Tensor:
        x = x0[idx]
        for i, block in enumerate(run.blocks):
            x = call_block(block, x, run.kwargs[i])
        with torch.no_grad():
            t = logprobs(teacher[idx].to(x.dtype), teacher_norm)
        s = logprobs(x, norm)
        return F.kl_div(s, t, log_target=True, reduction="sum") / (s.shape[0] * s.shape[1])

    names = [n for n in tunable_names(model) if n.startswith(f"{structure.layers}.")]  # the blocks' linears
    with _blocks_loaded(run):
        with tunables(model, names, cfg.rounding, cfg.levels) as tun, \
                _trainable(norm_parameters(model, structure) if cfg.e2e_norms else []) as extra:
            # every step runs (no early stop): the held-out KL of 16 windows is noisy at 4 bits, and twice three
            # measurements above the best ended a run that was still to fall; the best measured point is kept
            sched = Schedule(cfg.e2e_steps, cfg.e2e_batch, cfg.e2e_lr, cfg.lr, early_stop=False)
            curve = fit(tun, loss_on, x0.shape[0], cfg, sched, "finetune e2e (KL)", progress, extra)
        # the same held-out windows through the packed modules as stored: what hardening (fp16 or 8-bit scales,
        # integer codes) kept of the trained point
        hold = split(x0.shape[0], cfg.holdout)[1]
        curve["held_hardened"] = float(f"{mean_loss(loss_on, hold, cfg.e2e_batch, x0.device.type, cfg.dtype):.6g}")
    return curve


def norm_parameters(model: nn.Module, structure) -> list[nn.Parameter]:
    """The weight and bias of every norm in the blocks (pre-, post- and inner norms, DAC's biases among them) and of
    the final norm, as the structure discovery found them."""
    mods = [block.get_submodule(name) for block, info in zip(structure.blocks(model), structure.block_info,
                                                             strict=True) for name in info.norms]
    if structure.final_norm:
        mods.append(model.get_submodule(structure.final_norm))
    return [p for m in mods for p in (m._parameters.get("weight"), m._parameters.get("bias")) if p is not None]


@contextmanager
def _blocks_loaded(run: Run):
    """Every block on the compute device and in its dtype for the end-to-end steps (the engine hands each back to
    where the model lives once it is done with it), and back there after."""
    source, model, structure = run.ctx.source, run.ctx.model, run.structure
    for i in range(len(run.blocks)):
        source.load_block(model, structure, i, run)
    try:
        yield
    finally:
        for i in range(len(run.blocks)):
            source.release_block(model, structure, i)


@contextmanager
def _trainable(params: list[nn.Parameter]):
    """``params`` with gradients for the duration (inside :func:`tunables`, which freezes every parameter)."""
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        yield params
    finally:
        for p, w in zip(params, was, strict=True):
            p.requires_grad_(w)
