"""Block-wise reconstruction after the solver: learned rounding and quantizer ranges, per block.

Starting from the codes and scales GPTQ, GPTAQ or D²Quant just produced for a block, it learns

* the rounding (opt-in): a bounded offset ``v ∈ [-½, ½]`` per weight on top of a soft grid position that rounds
  to the solver's code (halfway from that code toward the float weight's position, clamped to the code's bin), so
  a code moves at most one step;
* the ranges: a factor ``1 + a`` (``a ∈ [-½, ½]``) on each group's scale, and on each of DSQ's row scales (DSQ's
  sign planes are kept; its absorbed column scale is in up_proj's scales, which are tuned too),

so that the quantized block's output on the quantized stream matches the float block's output on the float stream
(GPTAQ's asymmetric target: what the next block will really see against what it should). The rounding goes through
a straight-through estimator and takes signed-gradient steps of ``lr`` (default ``1 / steps``) decaying linearly,
as AutoRound (SignRound) does: every offset moves at the same pace, which suits bounded offsets where only crossing
a rounding boundary matters, and the total travel is at most half a step. The scale factors take Adam steps
(``scale_lr``, decaying linearly): signed steps of AutoRound's size moved every scale by 2% a step and first
raised the held-out block error on SmolLM2, where Adam lowered it from the first measurement. A slice of the
calibration windows is held out; its loss is measured every few steps, the best parameters are kept, and tuning
stops early when it has not improved for ``patience`` measurements. The result is hardened to integer codes and
scales as the format stores them (fp16, or the nearest points of the rows' 8-bit grids): the format is unchanged.

On SmolLM2 (D²Quant w3 g64, 32 x 512 calibration tokens, first 4 blocks, 50 steps) the rounding started at the
float weight's position clamped to within half a step of the solver's code first tripled the block error (codes
that GPTQ had moved flipped back at once); started halfway there, it helped block 0 a little and hurt later blocks
against the scales alone, so the scales alone are the default (``--finetune-rounding`` adds the rounding). On
128 x 512 tokens after both Hadamards it cut block 3's error 10% below the scales alone, and the full WikiText-2
split still rose 1.1% (benchmarks/block_finetune.py, README). EfficientQAT's Block-AP (every weight a free latent,
re-rounded under the tuned scale) lowered no block's held-out error there: the scales' straight-through gradient is
then only the rounding residual, zero at the start. A codebook layer's levels (vector entries) can train too
(``--finetune-levels``, GPTVQ's codebook update): on the same windows with vq3 g96 that left block 3's error 1.7%
above the scales alone, so it is opt-in.

It is a block pass (``finetune``) after the quantizer in the same engine run: the quantizer carries the float
stream for it, and the block's quantized-stream input is ``run.x_in``. With ``e2e`` or ``both`` it also trains
every scale of the model end to end after the last block (:mod:`quant.methods.distill`); both share the training
loop :func:`fit`.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from quant.engine import distributed as dist
from quant.engine.blockwise import call_block
from quant.engine.loop import BlockStep, Run, _advance
from quant.engine.options import option
from quant.engine.passes import QuantContext, register_block_pass
from quant.errors import QuantError
from quant.numerics.codebook import decode
from quant.runtime.dsqlinear import DSQLinear
from quant.runtime.quantlinear import CodebookLinear, PackedLinear, QuantLinear

MODES = ("none", "block", "e2e", "both")
DTYPES = ("fp32", "bf16")


@dataclass
class FinetuneConfig:
    mode: str = option(
        "none",
        "Learned rounding and quantizer ranges after the solver: none; block (per block, against the float "
        "block's output on the float stream); e2e (every scale of the model at once, against the float model's "
        "next-token distribution: KL, codes frozen; the model must be resident); or both (block, then e2e).",
        "--finetune",
    )
    steps: int = option(50, "Steps per block (fewer when the held-out loss stops improving).",
                        "--finetune-steps")
    batch: int = option(4, "Calibration windows per step.", "--finetune-batch")
    lr: float = option(0.0, "Step of the signed rounding updates (0: 1 / steps, AutoRound's); decays linearly.",
                       "--finetune-lr")
    scale_lr: float = option(5e-3, "Adam learning rate of the scale factors; decays linearly.", "--finetune-scale-lr")
    rounding: bool = option(False, "Also learn the rounding of uniform layers, per block and end to end (off: the "
                            "scale factors only, which measured better per block on SmolLM2).",
                            "--finetune-rounding/--finetune-scales-only")
    levels: bool = option(False, "Also train each codebook layer's own levels or vector entries (--codebook kmeans, "
                          "vq2, vq3; codes stay), per block and end to end, as GPTVQ's codebook update and AQLM's "
                          "fine-tuning do; off: its scales only.", "--finetune-levels/--finetune-fixed-levels")
    e2e_steps: int = option(100, "Steps of the end-to-end distillation (e2e, both).", "--finetune-e2e-steps")
    e2e_batch: int = option(2, "Calibration windows per end-to-end step.", "--finetune-e2e-batch")
    e2e_lr: float = option(1e-3, "Adam learning rate of the scale factors end to end; decays linearly.",
                           "--finetune-e2e-lr")
    e2e_norms: bool = option(False, "End to end, also train every norm's weight and bias (DAC's biases included; "
                             "float parameters the checkpoint stores as they are) beside the scales.",
                             "--finetune-e2e-norms/--finetune-e2e-scales-only")
    dtype: str = option(
        "fp32",
        "Compute of both passes' forward and backward: fp32, or bf16 (autocast: matmuls in bfloat16, about 1.9x the "
        "fp32 speed on CPUs with AVX512-BF16 or AMX, and on GPUs; the trained factors, the losses and the hardened "
        "scales stay fp32).",
        "--finetune-dtype",
    )
    warmup: float = option(
        0.0,
        "Share of each run's steps over which the learning rates rise linearly from 0 before their linear decay "
        "(the block pass's early stopping waits for it to end): Adam's first steps move every factor by the full "
        "rate, which raised the held-out KL in every 4-bit end-to-end run.",
        "--finetune-warmup",
    )
    holdout: float = option(0.125, "Share of the calibration windows held out to choose the best step.")
    eval_every: int = option(10, "Steps between held-out measurements.")
    patience: int = option(3, "Held-out measurements without improvement before a block stops early.")
    seed: int = option(0, "Seed of the window order.")

    def validate(self) -> None:
        if self.mode not in MODES:
            raise QuantError(f"unknown --finetune {self.mode!r}; choose from {', '.join(MODES)}")
        if min(self.steps, self.batch, self.e2e_steps, self.e2e_batch, self.eval_every, self.patience) < 1:
            raise QuantError("--finetune-steps, --finetune-batch, --finetune-e2e-steps, --finetune-e2e-batch, "
                             "eval_every and patience must be at least 1")
        if self.dtype not in DTYPES:
            raise QuantError(f"unknown --finetune-dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        if not 0 < self.holdout < 1 or min(self.lr, self.scale_lr, self.e2e_lr) < 0 or not 0 <= self.warmup < 1:
            raise QuantError("finetune holdout must be in (0, 1), --finetune-warmup in [0, 1) and the learning "
                             "rates not negative")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def blockwise(self) -> bool:
        return self.mode in ("block", "both")

    @property
    def end_to_end(self) -> bool:
        return self.mode in ("e2e", "both")


class _Ste(torch.autograd.Function):
    """round() forward, identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return g


class Tunable(nn.Module):
    """A packed linear while its block is tuned: the weight rebuilt from trainable rounding offsets and scale
    factors on every forward. ``harden()`` writes the result back into the packed module."""

    def __init__(self, packed: PackedLinear, rounding: bool, levels: bool = False) -> None:
        super().__init__()
        self.packed = packed
        g = packed.group_size
        self.e = None  # a codebook's trained change to its levels
        if isinstance(packed, CodebookLinear):  # codes index the levels: the offsets move along them
            self.register_buffer("s", packed.scales.float().repeat_interleave(g, 1))
            self.register_buffer("fitted", packed.levels.float())
            if levels:  # shared by the whole layer: a few hundred values that every group's weights move with
                self.e = nn.Parameter(torch.zeros_like(self.fitted))
            self.register_buffer("base", packed.codes().float())
            # a vector codebook's entries have no order to slide along: its codes stay, its scales train
            rounding = rounding and packed.DIM == 1
            self.v = nn.Parameter(torch.zeros_like(self.base)) if rounding else None
            self.a = nn.Parameter(torch.zeros_like(packed.scales.float()))
        elif isinstance(packed, QuantLinear):
            q = packed.codes().float()
            s, z = packed.scales.float(), packed.zeros.float()
            self.register_buffer("s", s.repeat_interleave(g, 1))
            self.register_buffer("z", z.repeat_interleave(g, 1))
            base = q
            w = packed.__dict__.get("_float_weight")
            if w is not None:  # halfway toward the float weight's grid position, within the solver's bin
                d = torch.nan_to_num(w.float() / self.s + self.z - q, nan=0.0, posinf=0.0, neginf=0.0)
                base = q + 0.5 * d.clamp(-0.5, 0.5)  # (a zero scale gives no position: the code itself)
            self.register_buffer("base", base)
            self.v = nn.Parameter(torch.zeros_like(q)) if rounding else None
            self.a = nn.Parameter(torch.zeros_like(s))
        elif isinstance(packed, DSQLinear):
            r = packed.row_scales.float()  # [out, groups, bits]; W = Σ_k r_k b_k, linear in each r_k
            self.register_buffer("r", r)
            self.register_buffer("signs", self._planes(packed))  # [bits, out, in] of ±1
            self.v = None
            self.a = nn.Parameter(torch.zeros_like(r))
        else:
            raise TypeError(f"cannot tune {type(packed).__name__}")

    @staticmethod
    def _planes(m: DSQLinear) -> torch.Tensor:
        codes = m.codes()
        return torch.stack([((codes >> k) & 1).float() * 2 - 1 for k in range(m.bits)])

    @property
    def levels(self) -> torch.Tensor:
        return self.fitted if self.e is None else self.fitted + self.e

    def _codes(self) -> torch.Tensor:
        m = self.packed
        u = self.base if self.v is None else self.base + self.v
        return _Ste.apply(u).clamp(0, 2**m.bits - 1)

    def _level_values(self) -> torch.Tensor:
        """The levels the codes pick; with rounding offsets, their gradient is the levels' local slope (the
        uniform grid's is its step, 1 in code units)."""
        q = self._codes()
        levels = self.levels
        lv = decode(q.detach(), levels)
        if self.v is None:
            return lv
        top = len(levels) - 1
        hi, lo = (q.detach() + 1).clamp(max=top).long(), (q.detach() - 1).clamp(min=0).long()
        slope = (levels[hi] - levels[lo]).detach() / (hi - lo).float()
        u = self.base + self.v
        return lv + slope * (u - u.detach())

    def weight(self) -> torch.Tensor:
        m, g = self.packed, self.packed.group_size
        if isinstance(m, CodebookLinear):
            return self._level_values() * self.s * (1 + self.a).repeat_interleave(g, 1)
        if isinstance(m, QuantLinear):
            scale = self.s * (1 + self.a).repeat_interleave(g, 1)
            return (self._codes() - self.z) * scale
        r = (self.r * (1 + self.a)).repeat_interleave(g, 1)  # [out, in, bits]
        return torch.einsum("oik,koi->oi", r, self.signs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = getattr(self.packed, "input_ops", None)  # its online ops (the down_proj Hadamard) ride on its hook
        return F.linear(x if ops is None else ops(x), self.weight().to(x.dtype), self.packed.bias)

    def clamp_(self) -> None:
        with torch.no_grad():
            if self.v is not None:
                self.v.clamp_(-0.5, 0.5)
            self.a.clamp_(-0.5, 0.5)

    @torch.no_grad()
    def harden(self) -> None:
        m = self.packed
        if isinstance(m, (QuantLinear, CodebookLinear)):
            m.set_codes(self._codes().to(torch.int64))
            m.set_scales(m.scales.float() * (1 + self.a))  # 8-bit scales: the nearest point of the row's grid
            if self.e is not None:
                m.levels.copy_(self.levels)
        else:
            m.row_scales.copy_((self.r * (1 + self.a)).half())


def drop_float_weights(module: nn.Module) -> None:
    """Forget the float weights the quantizer left on ``module``'s packed linears for the rounding's start."""
    for m in module.modules():
        m.__dict__.pop("_float_weight", None)


def _swap(block: nn.Module, names: list[str], new: list[nn.Module]) -> None:
    for name, mod in zip(names, new, strict=True):
        parent, _, child = name.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, child, mod)


@dataclass
class Schedule:
    """How one tuning run steps: the block pass's and the end-to-end pass's settings share this loop."""

    steps: int
    batch: int
    scale_lr: float
    lr: float = 0.0  # signed rounding steps (0: 1 / steps)
    early_stop: bool = True  # stop after cfg.patience held-out measurements without improvement


def rate(step: int, steps: int, warmup: float) -> float:
    """The learning rates' multiplier at ``step`` (0-based) of ``steps``: a linear rise over the first ``warmup``
    share of the steps times a linear decay over all of them."""
    warm = warmup * steps
    return (1 - step / steps) * (min(1.0, (step + 1) / warm) if warm > 0 else 1.0)


def split(n: int, holdout: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The training and held-out window indices of ``n`` windows: the last share ``holdout`` held out (all of
    them both, for a single window)."""
    held = max(1, round(n * holdout)) if n > 1 else 0
    if held == 0:
        return torch.arange(n), torch.arange(n)
    return torch.arange(n - held), torch.arange(n - held, n)


def _compute(device: str, dtype: str):
    return torch.autocast(device, torch.bfloat16, enabled=dtype == "bf16")


def mean_loss(loss_on, idx: torch.Tensor, batch: int, device: str, dtype: str) -> float:
    """``loss_on`` averaged over the windows ``idx`` (in batches of ``batch``, summed over the ranks), no grad."""
    with torch.no_grad(), _compute(device, dtype):
        total = torch.tensor([sum(float(loss_on(idx[i : i + batch])) * len(idx[i : i + batch])
                                  for i in range(0, len(idx), batch)), float(len(idx))], dtype=torch.float64)
    dist.sum_(total)
    return float(total[0] / total[1])


def tunable_names(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if isinstance(m, (QuantLinear, CodebookLinear, DSQLinear))]


@contextmanager
def tunables(module: nn.Module, names: list[str], rounding: bool, levels: bool = False):
    """The packed linears ``names`` of ``module`` swapped for :class:`Tunable` s and every other parameter frozen,
    for the duration; the packed modules come back, hardened only by an explicit ``harden()``."""
    packed = [module.get_submodule(n) for n in names]
    tun = [Tunable(m, rounding, levels) for m in packed]
    frozen = [p for p in module.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    _swap(module, names, tun)
    try:
        yield tun
    finally:
        _swap(module, names, packed)
        for p in frozen:
            p.requires_grad_(True)


def fit(tun: list[Tunable], loss_on, n: int, cfg: FinetuneConfig, sched: Schedule, desc: str = "",
        progress: bool = True, extra: list[nn.Parameter] = ()) -> dict:
    """Minimise ``loss_on(window indices)`` over the tunables' parameters (and the float parameters ``extra``, by
    the scales' Adam) on ``n`` windows (1/``cfg.holdout`` held out, measured every ``cfg.eval_every`` steps, the
    best kept, early stop, if ``sched.early_stop``, after ``cfg.patience`` measurements without improvement once the
    warm-up is over), then
    harden the tunables into their packed modules; returns the loss curve."""
    rounding = [t.v for t in tun if t.v is not None]
    scales = [t.a for t in tun] + [t.e for t in tun if t.e is not None] + list(extra)
    params = rounding + scales
    adam = torch.optim.Adam(scales, lr=sched.scale_lr)
    train, hold = split(n, cfg.holdout)
    g = torch.Generator().manual_seed(cfg.seed)
    lr = sched.lr or 1.0 / sched.steps
    device = params[0].device.type if params else "cpu"

    def compute():  # a fresh autocast context each time (they are not reentrant)
        return _compute(device, cfg.dtype)

    def held_loss() -> float:
        return mean_loss(loss_on, hold, sched.batch, device, cfg.dtype)

    curve: dict = {"train": [], "held": [], "best_step": 0}
    sig = lambda v: float(f"{v:.6g}")  # noqa: E731  (the report's precision: six significant digits)
    best = held_loss()
    curve["held"].append(sig(best))
    kept = [p.detach().clone() for p in params]
    stale = 0
    bar = tqdm(range(sched.steps), desc=desc or "finetune", leave=False, disable=not progress)
    for step in bar:
        idx = train[torch.randperm(len(train), generator=g)[: sched.batch]]
        with torch.enable_grad():
            with compute():
                loss = loss_on(idx)
            grads = torch.autograd.grad(loss, params)
        loss = float(loss.detach())
        decay = rate(step, sched.steps, cfg.warmup)
        with torch.no_grad():
            for p, gr in zip(rounding, grads, strict=False):
                p.sub_(lr * decay * torch.sign(dist.sum_(gr)))
        for p, gr in zip(scales, grads[len(rounding):], strict=True):
            p.grad = dist.sum_(gr)
        for group in adam.param_groups:
            group["lr"] = sched.scale_lr * decay
        adam.step()
        for t in tun:
            t.clamp_()
        curve["train"].append(sig(loss))
        bar.set_postfix(loss=f"{loss:.3g}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == sched.steps:
            h = held_loss()
            curve["held"].append(sig(h))
            bar.set_postfix(loss=f"{loss:.3g}", held=f"{h:.3g}")
            if h < best:
                best, stale, curve["best_step"] = h, 0, step + 1
                kept = [p.detach().clone() for p in params]
            elif step + 1 > cfg.warmup * sched.steps:
                stale += 1
                if sched.early_stop and stale >= cfg.patience:
                    break
    with torch.no_grad():
        for p, k in zip(params, kept, strict=True):
            p.copy_(k)
    for t in tun:
        t.harden()
    curve["held_best"] = sig(best)
    return curve


def tune_block(block: nn.Module, x: torch.Tensor, target: torch.Tensor, kwargs: dict, cfg: FinetuneConfig,
               desc: str = "", progress: bool = True) -> dict:
    """Tune the packed linears of ``block`` so ``block(x)`` approaches ``target`` (both ``[windows, seq, hidden]``);
    returns the loss curve (train loss per step, held-out loss per measurement). The block keeps its packed
    modules, with the tuned codes and scales written back."""
    names = tunable_names(block)
    if not names:
        return {}

    def loss_on(idx: torch.Tensor) -> torch.Tensor:
        out = call_block(block, x[idx], kwargs)
        return F.mse_loss(out.float(), target[idx].float())

    with tunables(block, names, cfg.rounding, cfg.levels) as tun:
        return fit(tun, loss_on, x.shape[0], cfg, Schedule(cfg.steps, cfg.batch, cfg.scale_lr, cfg.lr), desc,
                   progress)


class BlockFinetuneStep(BlockStep):
    """After the quantizer step of the same engine run: tune the block, then advance the quantized stream through
    the tuned block (the quantizer advanced it through the untuned one)."""

    name = "finetune"
    needs_data = True
    float_stream = True

    def __init__(self, ctx: QuantContext, cfg: FinetuneConfig) -> None:
        self.ctx, self.cfg = ctx, cfg

    def start(self, run: Run) -> None:
        from quant.methods.blockquant import QuantizeStep

        mine = run.steps.index(self)
        quantizers = [s for s in run.steps[:mine] if isinstance(s, QuantizeStep)]
        if not quantizers:
            raise QuantError("finetune must follow a quantizer pass (rtn, gptq, d2quant) in the same run")
        q = quantizers[-1]
        # it carries the float stream through each float block for us (the block targets; after the last block,
        # the float model's final hidden states, the end-to-end teacher) and, for learned rounding, leaves each
        # linear's float weight as the rounding's starting point
        q.needs_data = q.float_stream = True
        q.keep_float = self.cfg.rounding

    def block(self, run: Run, i: int, block: nn.Module) -> None:
        if not self.cfg.blockwise:
            return
        curve = tune_block(block, run.x_in, run.xf, run.kwargs[i], self.cfg, f"finetune block {i}",
                           self.ctx.progress)
        run.x = _advance(block, run.x_in, run.kwargs[i])
        if not self.cfg.end_to_end:  # the end-to-end rounding starts from them again
            drop_float_weights(block)
        if curve:
            run.note("finetune", curve)

    def finish(self, run: Run) -> dict:
        curves = run.noted("finetune")
        first = [c["held"][0] for c in curves]
        best = [c["held_best"] for c in curves]
        out = {"mode": self.cfg.mode, "blocks": len(curves),
               "held_loss_before": first, "held_loss_after": best,
               "mean_reduction": round(1 - sum(b / f for b, f in zip(best, first, strict=True) if f > 0)
                                       / max(len(curves), 1), 4) if curves else 0.0,
               "steps_run": [len(c["train"]) for c in curves], "curves": curves}
        if self.cfg.end_to_end:
            from quant.methods.distill import distill_scales

            t0 = time.perf_counter()
            e2e = distill_scales(run, self.cfg, self.ctx.progress)
            drop_float_weights(self.ctx.model)
            out["e2e"] = {**e2e, "kl_reduction": round(1 - e2e["held_best"] / e2e["held"][0], 4)
                          if e2e["held"][0] > 0 else 0.0, "seconds": round(time.perf_counter() - t0, 1)}
        return out


@register_block_pass("finetune", FinetuneConfig, needs_calibration=True)
def finetune(ctx: QuantContext, config: FinetuneConfig) -> BlockFinetuneStep:
    config.validate()
    if not config.enabled:
        raise QuantError("the finetune pass needs mode: block, e2e or both")
    if config.end_to_end and ctx.streaming:
        raise QuantError("--finetune e2e needs the whole model in memory (it trains every block at once); "
                         "use --finetune block with --stream")
    return BlockFinetuneStep(ctx, config)


__all__ = ["FinetuneConfig", "BlockFinetuneStep", "Schedule", "Tunable", "fit", "tune_block", "tunables"]
