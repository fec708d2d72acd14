"""Passes and the pipeline that runs them.

A pass is a plain function ``fn(ctx, config) -> summary`` with a typed config dataclass, registered
by name. It transforms ``ctx.model`` in place (rotations, scale folding, quantization, bit
allocation, ...) and returns a small JSON-able summary of what it did. ``run_pipeline`` runs passes
in order and records each one's name, config, summary and wall time; that record goes into the
checkpoint's ``quantization_config["passes"]`` and its report.

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

from quant.errors import QuantError
from quant.grid import QuantSpec
from quant.quantlinear import PackedLinear
from quant.structure import Structure, structure_of


@dataclass
class QuantContext:
    model: nn.Module
    tokenizer: object = None
    calib_ids: torch.Tensor | None = None  # [samples, seqlen] calibration tokens, for passes that need data
    overrides: dict[str, dict] = field(default_factory=dict)  # module name -> QuantSpec field overrides
    modules: dict[str, dict] = field(default_factory=dict)  # module name -> what was stored (bits, group, sym)
    progress: bool = True
    allocation: object = None  # set by the "allocate" pass (quant.allocation.Allocation)
    norm_biases: list[str] = field(default_factory=list)  # norms given an output bias (DAC)

    @property
    def structure(self) -> Structure:
        return structure_of(self.model)

    def spec_for(self, name: str, default: QuantSpec) -> QuantSpec:
        o = self.overrides.get(name)
        return dataclasses.replace(default, **o) if o else default

    def install(self, name: str, q: PackedLinear, sym: bool) -> None:
        """Put a quantized linear in place of the float module ``name`` and record it."""
        parent, _, child = name.rpartition(".")
        old = self.model.get_submodule(name)
        device = next(itertools.chain(old.parameters(), old.buffers())).device
        if getattr(old, "input_ops", None) is not None:  # online ops / activation quantization stay with it
            from quant.inputops import move_input_ops

            move_input_ops(old, q)
        setattr(self.model.get_submodule(parent), child, q.to(device))
        self.modules[name] = {"bits": q.bits, "group_size": q.group_size, "sym": sym, "format": q.FORMAT}


@dataclass(frozen=True)
class PassInfo:
    name: str
    fn: Callable[[QuantContext, object], dict]
    config_cls: type
    needs_calibration: bool
    quantizer: bool  # a pass that turns float linears into QuantLinears (a user-facing --method)


PASSES: dict[str, PassInfo] = {}


def register_pass(name: str, config_cls: type, needs_calibration: bool = False, quantizer: bool = False):
    def deco(fn):
        PASSES[name] = PassInfo(name, fn, config_cls, needs_calibration, quantizer)
        return fn

    return deco


def get_pass(name: str) -> PassInfo:
    if name not in PASSES:
        raise QuantError(f"unknown method or pass {name!r}; available: {', '.join(sorted(PASSES))}")
    return PASSES[name]


def quantizer_methods() -> list[str]:
    return sorted(n for n, p in PASSES.items() if p.quantizer)


def run_pipeline(ctx: QuantContext, steps: list[tuple[str, object]]) -> list[dict]:
    records = []
    for name, config in steps:
        info = get_pass(name)
        if not isinstance(config, info.config_cls):
            raise TypeError(f"pass {name} expects {info.config_cls.__name__}, got {type(config).__name__}")
        if info.needs_calibration and ctx.calib_ids is None:
            raise QuantError(f"pass {name} needs calibration data")
        t0 = time.perf_counter()
        summary = info.fn(ctx, config)
        records.append(
            {
                "name": name,
                "config": dataclasses.asdict(config),
                "summary": summary or {},
                "seconds": round(time.perf_counter() - t0, 2),
            }
        )
    return records
