"""Mixed-precision bit allocation under an average budget, as a pass that runs before any quantizer.

The budget is honest about storage: ``budget = B`` means the quantized linears may take no more
bytes (packed codes + scales + zeros, exactly as the checkpoint stores them: fp16 scales and uint8 zeros, or
with ``scale_bits=8`` 8-bit scale codes, 4-bit zeros and dense codes) than a uniform B-bit quantization with the
same groups and scales; a fractional B interpolates linearly between the
uniform ⌊B⌋- and ⌈B⌉-bit sizes. So uniform 3-bit meets ``budget=3`` exactly, and a mix may spend
what 3-bit packing wastes (10 codes per int32 word: 3.2 bits per code; none with 8-bit scales) on wider layers.

Allocators:

- ``nsds``: NSDS scores (``quant.methods.nsds``), no data. ``scheme="knapsack"`` (default) minimises a
  predicted loss ``Σ_u imp_u · err_u(b_u)``. ``err_u(b)`` is the unit's measured relative
  round-to-nearest weight error at width b (``error_model="rtn"``, default; still no data) or the
  ideal ``n_u · 4^(-b)`` (weight error variance falls 4× per bit). ``imp_u`` is the unit's Soft-OR
  score S (``importance="score"``, default) or its odds ``S/(1-S)``. ``scheme="tiers"`` is the
  paper's rule: the most sensitive units get the widest candidate, the rest the narrowest.
  The defaults (module granularity, score, rtn) are the rule that measured best on SmolLM2
  (benchmarks/results/allocation.md); the paper's layer granularity stays available.
- ``fisher``: measured sensitivity (``quant.methods.fisher``): ``err_u(b) = Σ F ⊙ (W − RTN_b(W))²``, the
  second-order rise of the calibration loss that quantizing the unit at b bits predicts, with ``F`` the
  diagonal of the empirical Fisher over ``fisher_windows`` calibration windows; the same knapsack minimises
  its sum. Needs calibration text and the model resident; in ``quantize model`` it runs after the rotation,
  so it weighs the weights the quantizer will see.
- ``uniform``: every unit at B (B must be one of the candidates).
- ``random``: the NSDS allocation's widths, shuffled among units of equal size (seeded): the same
  mix and the same bits per weight, placement at random. This is the baseline that isolates the
  value of the ranking.

A unit is a whole block (``granularity="layer"``, as in the paper) or one linear (``"module"``;
then each linear takes the score of its role: q/k the QK circuit, v/o the OV circuit).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from quant.engine.options import option
from quant.engine.passes import QuantContext, register_pass
from quant.engine.structure import LINEAR_ROLES, PASS_NEEDS, structure_of
from quant.errors import QuantError
from quant.methods.nsds import ROLES, NSDSConfig, NSDSScores, nsds_roles, nsds_scores
from quant.methods.quantizers import CODEBOOK_HELP, SCALE_BITS_HELP
from quant.numerics.grid import SUPPORTED_BITS, QuantSpec, quantize_rtn
from quant.runtime.quantlinear import storage_bytes

ALLOCATORS = ("nsds", "fisher", "uniform", "random")
SCHEMES = ("knapsack", "tiers")
GRANULARITIES = ("layer", "module")
ERROR_MODELS = ("ideal", "rtn")


@dataclass
class AllocationConfig:
    """Per-layer bit widths under an average budget (NSDS: data-free sensitivity)."""

    budget: float = option(3.0, "Average bits per weight, storage-matched to uniform quantization at that width.")
    allocator: str = option(
        "nsds", "nsds (data-free sensitivity), fisher (measured: Fisher-weighted rounding error on calibration "
        "text), uniform, or random (NSDS's mix of widths, shuffled; a baseline).",
        "--allocation",
    )
    candidates: tuple[int, ...] = option((2, 3, 4), "The widths a layer may get, comma-separated.", "--candidates")
    granularity: str = option(
        "module", "One width per linear (module) or per block (layer, as in the NSDS paper).", "--granularity"
    )
    scheme: str = option(
        "knapsack",
        "knapsack (minimise sensitivity-weighted predicted error under the budget) or tiers (the paper's rule: "
        "widest width to the most sensitive layers, narrowest to the rest).",
        "--scheme",
    )
    importance: str = option(
        "score", "Knapsack: weight each unit by its NSDS score, or by the odds S/(1-S) (sharper).", "--importance"
    )
    error_model: str = option(
        "rtn",
        "Knapsack: a unit's error at b bits is its measured round-to-nearest weight error (rtn, no data needed) "
        "or the ideal params x 4^-b.",
        "--error-model",
    )
    fisher_windows: int = option(32, "Calibration windows the fisher allocator takes gradients on.",
                                 "--fisher-windows")
    seed: int = option(0, "Seed for the random allocator.", "--alloc-seed")
    group_size: int = option(128, "The quantizer's group size (scales and zeros count in the budget).", "--group-size")
    scale_bits: int = option(16, SCALE_BITS_HELP, "--scale-bits")
    codebook: str = option("uniform", CODEBOOK_HELP, "--codebook")
    nsds: NSDSConfig = option(help="NSDS scoring.", default_factory=NSDSConfig)

    def validate(self) -> None:
        if self.allocator not in ALLOCATORS:
            raise QuantError(f"unknown allocator {self.allocator!r}; choose from {', '.join(ALLOCATORS)}")
        if self.scheme not in SCHEMES:
            raise QuantError(f"unknown allocation scheme {self.scheme!r}; choose from {', '.join(SCHEMES)}")
        if self.importance not in ("odds", "score"):
            raise QuantError(f"importance must be 'odds' or 'score', got {self.importance!r}")
        if self.error_model not in ERROR_MODELS:
            raise QuantError(f"error_model must be one of {ERROR_MODELS}, got {self.error_model!r}")
        if self.granularity not in GRANULARITIES:
            raise QuantError(f"unknown granularity {self.granularity!r}; choose from {', '.join(GRANULARITIES)}")
        bad = [b for b in self.candidates if b not in SUPPORTED_BITS]
        if bad or not self.candidates:
            raise QuantError(f"candidate widths must be among {SUPPORTED_BITS}, got {list(self.candidates)}")
        lo, hi = min(self.candidates), max(self.candidates)
        if not (math.isfinite(self.budget) and lo <= self.budget <= hi):
            raise QuantError(
                f"a budget of {self.budget} bits cannot be met with candidate widths {sorted(self.candidates)}: "
                f"the feasible range is {lo} to {hi} bits"
            )
        if self.fisher_windows < 1:
            raise QuantError("fisher_windows must be at least 1")
        if self.allocator == "fisher" and self.scheme != "knapsack":
            raise QuantError("the fisher allocator predicts losses for the knapsack scheme; tiers ranks NSDS scores")
        if self.allocator == "uniform" and self.budget not in self.candidates:
            raise QuantError(f"uniform allocation needs a budget among the candidates {sorted(self.candidates)}")
        self.layout(hi)  # validates the group size and scale bits

    def layout(self, bits: int | None = None) -> QuantSpec:
        """The quantizer's storage (group size, scale bits) at ``bits`` (default: the narrowest candidate)."""
        return QuantSpec(bits or min(self.candidates), self.group_size, scale_bits=self.scale_bits,
                         codebook=self.codebook)


@dataclass
class Unit:
    """What receives one width: a block's linears, or one linear."""

    label: str  # "12" or "12.down"
    modules: list[tuple[str, int, int]]  # (name, out_features, in_features)
    score: float = 0.0
    error: dict[int, float] = field(default_factory=dict)  # width -> predicted error (see knapsack)

    def error_at(self, bits: int) -> float:
        """Σ params · relative weight error at ``bits``: measured (error_model="rtn") or ``4^-bits``."""
        return self.error[bits] if self.error else self.params * 4.0**-bits

    @property
    def params(self) -> int:
        return sum(o * i for _, o, i in self.modules)

    def bytes_at(self, bits: int, layout: QuantSpec) -> int:
        """Bytes stored at ``bits`` with ``layout``'s groups and scales (its own width is ignored)."""
        return sum(storage_bytes(o, i, bits, layout.group_for(i), layout.scale_bits, layout.codebook)
                   for _, o, i in self.modules)


@dataclass
class Allocation:
    config: AllocationConfig
    units: list[Unit]
    bits: list[int]  # per unit
    budget_bytes: int
    scores: NSDSScores | None = None

    def module_bits(self) -> dict[str, int]:
        return {name: b for u, b in zip(self.units, self.bits, strict=True) for name, _, _ in u.modules}

    @property
    def used_bytes(self) -> int:
        return sum(u.bytes_at(b, self.config.layout()) for u, b in zip(self.units, self.bits, strict=True))

    @property
    def params(self) -> int:
        return sum(u.params for u in self.units)

    def summary(self) -> dict:
        counts = {str(b): self.bits.count(b) for b in sorted(set(self.bits))}
        return {
            "allocator": self.config.allocator,
            "scheme": self.config.scheme if self.config.allocator != "uniform" else None,
            "granularity": self.config.granularity,
            "budget_bits": self.config.budget,
            "candidates": list(self.config.candidates),
            "units_per_width": counts,
            "mean_code_bits": round(
                sum(u.params * b for u, b in zip(self.units, self.bits, strict=True)) / self.params, 4
            ),
            "bits_per_weight": round(8 * self.used_bytes / self.params, 4),
            "budget_bits_per_weight": round(8 * self.budget_bytes / self.params, 4),
            "bits": {u.label: b for u, b in zip(self.units, self.bits, strict=True)},
        }


def make_units(model: nn.Module, granularity: str, scores: NSDSScores | None) -> list[Unit]:
    """Per block one unit (``layer``) or one per linear (``module``, labelled by its role where it has one:
    q/k/v/o/gate/up/down, else by its name in the block), scored by the NSDS role it carries."""
    structure = structure_of(model)
    units = []
    for i, info in enumerate(structure.block_info):
        carries = nsds_roles(info)
        named = {n: r for r, n in info.roles.items() if r in LINEAR_ROLES}
        mods = []
        for n in info.linears:
            w = structure.blocks(model)[i].get_submodule(n).weight
            mods.append((f"{structure.layers}.{i}.{n}", w.shape[0], w.shape[1]))
        if granularity == "layer":
            units.append(Unit(str(i), mods, float(scores.layer_score[i]) if scores else 0.0))
        else:
            for n, m in zip(info.linears, mods, strict=True):
                s = float(scores.role_score[i, ROLES.index(carries[n])]) if scores else 0.0
                units.append(Unit(f"{i}.{named.get(n, n)}", [m], s))
    return units


@torch.no_grad()
def measure_rtn_errors(model: nn.Module, units: list[Unit], cands: list[int], layout: QuantSpec,
                       fisher: dict[str, torch.Tensor] | None = None) -> None:
    """Each unit's round-to-nearest error at every candidate width: ``Σ n_m ‖W_m − RTN_b(W_m)‖² / ‖W_m‖²``
    (still data-free, but it sees how much worse narrow widths are for heavy-tailed weights than the ideal 4×
    per bit), or with ``fisher`` the predicted loss ``Σ F_m ⊙ (W_m − RTN_b(W_m))²``."""
    for u in units:
        for b in cands:
            total = 0.0
            for name, o, i in u.modules:
                w = model.get_submodule(name).weight.float()
                err = (w - quantize_rtn(w, dataclasses.replace(layout, bits=b, clip="minmax")).dequantize()).pow(2)
                total += float((fisher[name] * err).sum()) if fisher else o * i * float(err.sum() / w.pow(2).sum())
            u.error[b] = total


def budget_bytes(units: list[Unit], budget: float, layout: QuantSpec) -> int:
    lo, hi = math.floor(budget), math.ceil(budget)
    f = budget - lo
    return int(sum((1 - f) * u.bytes_at(lo, layout) + f * u.bytes_at(hi, layout) for u in units) + 0.5)


def _importance(score: float, kind: str | None = "odds") -> float:
    if kind is None:  # the errors are predicted losses already (fisher)
        return 1.0
    s = min(max(score, 1e-6), 1 - 1e-6)
    return s / (1 - s) if kind == "odds" else s


@contextmanager
def _quiet_c_stdout():
    """Keep file descriptor 1 quiet for a call: scipy's HiGHS (1.12) prints a stray C++ debug line
    (``HighsMipSolverData::transformNewIntegerFeasibleSolution``) on some MIP restarts."""
    import ctypes
    import sys

    try:
        libc = ctypes.CDLL(None)
    except OSError:  # no C library to flush (Windows): leave stdout alone
        yield
        return
    sys.stdout.flush()
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    try:
        yield
    finally:
        libc.fflush(None)  # what C buffered goes to /dev/null, not to the restored stdout
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def knapsack(units: list[Unit], cands: list[int], limit: int, layout: QuantSpec,
             importance: str | None = "odds") -> list[int]:
    """The exact optimum: one width per unit minimising the predicted loss ``Σ imp_u · err_u(b_u)`` under
    ``Σ bytes_u(b_u) ≤ limit``, solved as a multiple-choice knapsack (binary ``x[u, b]``, one width per
    unit; HiGHS through ``scipy.optimize.milp``, zero gap). A greedy by loss reduction per byte is not
    exact: on small random instances it missed the brute-force optimum about one time in four
    (tests/test_correct_allocation.py). Afterwards any upgrade that still fits the leftover bytes is
    taken, so nothing affordable is left to the solver's tolerance (nor, should the solver fail, to it
    at all). A limit below the all-narrowest size gives all narrowest."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    n, m = len(units), len(cands)
    cost = np.array([[u.bytes_at(b, layout) for b in cands] for u in units], dtype=np.float64).reshape(n, m)
    loss = np.array(
        [[_importance(u.score, importance) * u.error_at(b) for b in cands] for u in units], dtype=np.float64
    ).reshape(n, m)
    level = [0] * n
    spare = limit - cost[:, 0].sum()  # bytes above the all-narrowest allocation
    if n and m > 1 and spare > 0:
        extra = (cost - cost[:, :1]).ravel()  # bytes relative to the narrowest width
        unit = math.gcd(*(int(v) for v in extra)) or 1  # in units of their gcd: small exact integers
        extra, spare = extra / unit, spare // unit
        gain = (loss - loss[:, :1]).ravel()
        scale = max(float(np.abs(gain).max()), 1e-300)
        one_each = LinearConstraint(np.kron(np.eye(n), np.ones(m)), 1, 1)
        fits = LinearConstraint(extra[None], -np.inf, spare)
        with _quiet_c_stdout():
            res = milp(gain / scale, constraints=[one_each, fits], integrality=np.ones(n * m), bounds=Bounds(0, 1),
                       options={"mip_rel_gap": 0.0, "time_limit": 60.0})  # fmt: skip
        if res.x is not None:
            level = [int(i) for i in res.x.reshape(n, m).argmax(1)]
            if cost[range(n), level].sum() > limit:  # never trust tolerances with the budget
                level = [0] * n
    used = cost[range(n), level].sum()
    while True:  # take the best upgrade that still fits until none does (exact optimum: usually none)
        best, best_gain = None, 0.0
        for j in range(n):
            for i in range(level[j] + 1, m):
                g = loss[j, level[j]] - loss[j, i]
                if used + cost[j, i] - cost[j, level[j]] <= limit and g > best_gain:
                    best, best_gain = (j, i), g
        if best is None:
            return [cands[lv] for lv in level]
        j, i = best
        used += cost[j, i] - cost[j, level[j]]
        level[j] = i


def tiers(units: list[Unit], cands: list[int], limit: int, layout: QuantSpec) -> list[int]:
    """The paper's rule: widest width to the most sensitive units while the rest at the narrowest still
    fits; leftover bytes lift the next units to intermediate widths."""
    order = sorted(range(len(units)), key=lambda j: -units[j].score)
    bits = [cands[0]] * len(units)
    used = sum(u.bytes_at(cands[0], layout) for u in units)
    for wanted in reversed(cands[1:]):  # widest first, then what still fits
        for j in order:
            if bits[j] >= wanted:
                continue
            extra = units[j].bytes_at(wanted, layout) - units[j].bytes_at(bits[j], layout)
            if used + extra <= limit:
                bits[j], used = wanted, used + extra
    return bits


def shuffle_within_sizes(units: list[Unit], bits: list[int], seed: int) -> list[int]:
    """Permute widths among units of the same shape: same mix, same bytes, random placement."""
    rng = random.Random(seed)
    out = list(bits)
    shapes: dict[tuple, list[int]] = {}
    for j, u in enumerate(units):
        shapes.setdefault(tuple((o, i) for _, o, i in u.modules), []).append(j)
    for idx in shapes.values():
        vals = [bits[j] for j in idx]
        rng.shuffle(vals)
        for j, v in zip(idx, vals, strict=True):
            out[j] = v
    return out


def allocate(model: nn.Module, config: AllocationConfig, calib_ids: torch.Tensor | None = None,
             progress: bool = True) -> Allocation:
    """Choose a width for every unit of ``model`` under ``config.budget``. Reads weights only, except the
    fisher allocator, which takes gradients on the first ``config.fisher_windows`` of ``calib_ids``."""
    config.validate()
    structure_of(model).check("bit allocation", PASS_NEEDS["nsds allocation"], "use --method rtn or gptq")
    cands = sorted(set(config.candidates))
    fisher = config.allocator == "fisher"
    scores = nsds_scores(model, config.nsds) if config.allocator in ("nsds", "random") else None
    units = make_units(model, config.granularity, scores)
    if fisher:
        from quant.methods.fisher import fisher_diagonal

        names = [n for u in units for n, _, _ in u.modules]
        ids = None if calib_ids is None else calib_ids[: config.fisher_windows]
        measure_rtn_errors(model, units, cands, config.layout(), fisher_diagonal(model, ids, names, progress))
    elif config.error_model == "rtn" and config.allocator != "uniform":
        measure_rtn_errors(model, units, cands, config.layout())
    limit = budget_bytes(units, config.budget, config.layout())
    if config.allocator == "uniform":
        bits = [int(config.budget)] * len(units)
    else:
        if config.scheme == "knapsack":
            bits = knapsack(units, cands, limit, config.layout(), None if fisher else config.importance)
        else:
            bits = tiers(units, cands, limit, config.layout())
        if config.allocator == "random":
            bits = shuffle_within_sizes(units, bits, config.seed)
    return Allocation(config, units, bits, limit, scores)


def allocation_table(alloc: Allocation) -> str:
    """Table of units: score, rank (most sensitive first) and chosen bits; then the totals."""
    order = sorted(range(len(alloc.units)), key=lambda j: -alloc.units[j].score)
    rank = {j: r + 1 for r, j in enumerate(order)}
    lines = [f"{'unit':>8}  {'score':>6}  {'rank':>4}  bits"]
    for j, (u, b) in enumerate(zip(alloc.units, alloc.bits, strict=True)):
        score = f"{u.score:6.3f}" if alloc.scores is not None else "     -"
        lines.append(f"{u.label:>8}  {score}  {rank[j] if alloc.scores is not None else '-':>4}  {b}")
    s = alloc.summary()
    lines.append(
        f"{alloc.config.allocator} allocation, budget {s['budget_bits']} bits: {mix_text(s['units_per_width'])}; "
        f"mean code width {s['mean_code_bits']}; {s['bits_per_weight']} bits/weight with scales and zeros "
        f"(uniform-equivalent budget {s['budget_bits_per_weight']})"
    )
    return "\n".join(lines)


def mix_text(units_per_width: dict) -> str:
    """{"2": 5, "3": 18} -> "5 x 2-bit, 18 x 3-bit"."""
    return ", ".join(f"{n} x {b}-bit" for b, n in units_per_width.items())


@register_pass("allocate", AllocationConfig)
def allocate_pass(ctx: QuantContext, config: AllocationConfig) -> dict:
    """Set per-module bits for the quantizer that follows (through ``ctx.overrides``)."""
    alloc = allocate(ctx.model, config, ctx.calib_ids, ctx.progress)
    for name, b in alloc.module_bits().items():
        ctx.overrides.setdefault(name, {})["bits"] = b
    ctx.allocation = alloc
    summary = alloc.summary()
    if alloc.scores is not None:
        summary["nsds"] = alloc.scores.to_dict()
    return summary
