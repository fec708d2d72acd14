"""Passes and the pipeline that runs them.

A pass has a typed config dataclass and is registered by name, in one of two forms:

- a block pass (``register_block_pass``: rotation, rtn, gptq, d2quant) returns a ``quant.engine.loop.BlockStep``
  for its config; consecutive block passes run together, block by block, in one engine run, so a rotation
  and the quantizer after it share one load of each block (and a streamed model never needs to fit);
- a whole-model pass (``register_pass``: fpt, fptquant, allocate, actquant) is ``fn(ctx, config) -> summary``
  on the resident model; on a streamed model it is refused with the memory it would need.

``run_pipeline`` runs passes in order and records each one's name, config, summary and wall time; that
record goes into the checkpoint's ``quantization_config["passes"]`` and its report.

Quantizer passes consult ``ctx.spec_for(name, default)`` so a bit-allocation pass that runs earlier
(NSDS) can set per-module bits through ``ctx.overrides``.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from quant.engine.structure import Structure
from quant.errors import QuantError
from quant.numerics.grid import QuantSpec
from quant.runtime.quantlinear import PackedLinear


@dataclass
class QuantContext:
    model: nn.Module
    tokenizer: object = None
    calib_ids: torch.Tensor | None = None  # [samples, seqlen] calibration tokens, for passes that need data
    overrides: dict[str, dict] = field(default_factory=dict)  # module name -> QuantSpec field overrides
    modules: dict[str, dict] = field(default_factory=dict)  # module name -> what was stored (bits, group, sym)
    progress: bool = True
    allocation: object = None  # set by the "allocate" pass (quant.methods.allocation.Allocation)
    norm_biases: list[str] = field(default_factory=list)  # norms given an output bias (DAC)
    device: str = "cpu"  # where blocks compute (quant.engine.loop.parse_device)
    source: object = None  # where block weights come from (quant.engine.streaming); default: the resident model
    work: object = None  # the run's work folder (quant.engine.resume.WorkDir): finished blocks are kept, runs resume
    activations: object = None  # where calibration activations live (quant.engine.blockwise.ActivationStore)

    def __post_init__(self) -> None:
        if self.source is None:
            from quant.engine.streaming import ResidentSource

            self.source = ResidentSource(self.device)

    @property
    def streaming(self) -> bool:
        return bool(self.source.streaming)

    @property
    def structure(self) -> Structure:
        return self.source.structure(self.model)

    def spec_for(self, name: str, default: QuantSpec) -> QuantSpec:
        o = self.overrides.get(name)
        return dataclasses.replace(default, **o) if o else default

    def install(self, name: str, q: PackedLinear, sym: bool) -> None:
        """Put a quantized linear in place of the float module ``name`` and record it."""
        parent, _, child = name.rpartition(".")
        old = self.model.get_submodule(name)
        device = next(itertools.chain(old.parameters(), old.buffers())).device
        if getattr(old, "input_ops", None) is not None:  # online ops / activation quantization stay with it
            from quant.runtime.inputops import move_input_ops

            move_input_ops(old, q)
        setattr(self.model.get_submodule(parent), child, q.to(device))
        self.modules[name] = {"bits": q.bits, "group_size": q.group_size, "sym": sym, "format": q.FORMAT}


@dataclass(frozen=True)
class PassInfo:
    name: str
    fn: Callable[[QuantContext, object], object]  # the summary (whole-model pass) or a BlockStep (block pass)
    config_cls: type
    needs_calibration: bool
    quantizer: bool  # a pass that turns float linears into QuantLinears (a user-facing --method)
    block: bool = False  # runs on the block engine


PASSES: dict[str, PassInfo] = {}


def register_pass(name: str, config_cls: type, needs_calibration: bool = False, quantizer: bool = False):
    def deco(fn):
        PASSES[name] = PassInfo(name, fn, config_cls, needs_calibration, quantizer)
        return fn

    return deco


def register_block_pass(name: str, config_cls: type, needs_calibration: bool = False, quantizer: bool = False):
    """Register ``fn(ctx, config) -> BlockStep``: it validates the config against the model and returns the step."""

    def deco(fn):
        PASSES[name] = PassInfo(name, fn, config_cls, needs_calibration, quantizer, block=True)
        return fn

    return deco


def get_pass(name: str) -> PassInfo:
    if name not in PASSES:
        raise QuantError(f"unknown method or pass {name!r}; available: {', '.join(sorted(PASSES))}")
    return PASSES[name]


def quantizer_methods() -> list[str]:
    return sorted(n for n, p in PASSES.items() if p.quantizer)


def check_resumable(steps: list[tuple[str, object]], resumable: bool) -> None:
    """A run with a work folder records one engine run's blocks: its block passes must come in one row."""
    infos = [get_pass(name) for name, _ in steps]
    runs = [block for block, _ in itertools.groupby(infos, key=lambda i: i.block) if block]
    if resumable and len(runs) > 1:
        raise QuantError("a resumable run takes its block passes in one row: "
                         f"{' -> '.join(i.name for i in infos)} puts a whole-model pass between them; "
                         "move it before or after")


def run_pipeline(ctx: QuantContext, steps: list[tuple[str, object]]) -> list[dict]:
    """Run ``steps`` in order; consecutive block passes share one engine run (``quant.engine.loop.run_blocks``)."""
    from quant.engine.loop import run_blocks

    infos = []
    for name, config in steps:
        info = get_pass(name)
        if not isinstance(config, info.config_cls):
            raise TypeError(f"pass {name} expects {info.config_cls.__name__}, got {type(config).__name__}")
        if info.needs_calibration and ctx.calib_ids is None:
            raise QuantError(f"pass {name} needs calibration data")
        if ctx.streaming and not info.block:
            raise QuantError(f"pass {name} needs the whole model in memory; {whole_model_memory(ctx)}")
        infos.append(info)
    check_resumable(steps, ctx.work is not None)
    records = []
    for block, group in itertools.groupby(zip(infos, (c for _, c in steps), strict=True), key=lambda t: t[0].block):
        group = list(group)
        t0 = time.perf_counter()
        if block:
            summaries = run_blocks(ctx, [info.fn(ctx, config) for info, config in group])
        else:
            summaries = [info.fn(ctx, config) for info, config in group]
        seconds = round(time.perf_counter() - t0, 2)
        for (info, config), summary in zip(group, summaries, strict=True):
            records.append(
                {
                    "name": info.name,
                    "config": dataclasses.asdict(config),
                    "summary": summary or {},
                    "seconds": seconds,  # of the whole engine run where passes shared one
                    **({"engine_run": "+".join(i.name for i, _ in group)} if block and len(group) > 1 else {}),
                }
            )
    return records


def whole_model_memory(ctx: QuantContext) -> str:
    """The memory a resident copy of a streamed model would take, and what this machine has free."""
    from quant.formats.reader import available_memory

    need = sum(p.numel() * 4 for p in ctx.model.parameters())
    avail = available_memory()
    have = f"{avail / 2**30:.1f} GiB available" if avail is not None else "available memory unknown"
    return f"the model needs about {need / 2**30:.1f} GiB in fp32 and {have}; drop --stream or choose a block pass"
