"""NSDS's knapsack against independent optima: brute force on small instances, a dynamic program on a
SmolLM2-sized one. Loss, bytes and importance are recomputed here from their definitions (module
docstring of quant.methods.allocation), never through the code under test."""

from __future__ import annotations

import itertools
import math
import random
import time

import numpy as np
import pytest

from quant.methods.allocation import Unit, knapsack
from quant.numerics.grid import QuantSpec

CANDS = [2, 3, 4]
G32 = QuantSpec(2, 32)  # the storage layout: group 32, fp16 scales (the width is each candidate's)
SHAPES = [(64, 128), (128, 64), (64, 64), (128, 128), (32, 128), (192, 64), (96, 256)]


def ref_group(width: int, group: int) -> int:
    # the largest supported group (32/64/128) not above the requested one that divides the width
    return max(g for g in (32, 64, 128) if g <= group and width % g == 0)


def ref_bytes(u: Unit, bits: int, group: int) -> int:
    """Checkpoint bytes from first principles: ⌊32/bits⌋ codes per int32 word per row (2: 16, 3: 10, 4: 8),
    plus one fp16 scale and one uint8 zero per group of inputs."""
    per_word = 32 // bits
    return sum(o * (4 * math.ceil(i / per_word) + 3 * (i // ref_group(i, group))) for _, o, i in u.modules)


def ref_importance(score: float, kind: str) -> float:
    s = min(max(score, 1e-6), 1 - 1e-6)
    return s if kind == "score" else s / (1 - s)


def ref_error(u: Unit, bits: int) -> float:
    # measured errors if given, else the ideal model: params · 4^-bits
    return u.error[bits] if u.error else sum(o * i for _, o, i in u.modules) * 4.0**-bits


def ref_loss(units, bits, kind) -> float:
    return sum(ref_importance(u.score, kind) * ref_error(u, b) for u, b in zip(units, bits, strict=True))


def random_instance(rng: random.Random):
    n = rng.randint(3, 6)
    units = []
    for j in range(n):
        mods = [(f"m{j}.{k}", *rng.choice(SHAPES)) for k in range(rng.choice((1, 1, 2)))]
        u = Unit(str(j), mods, rng.uniform(0.01, 0.99))
        if rng.random() < 0.7:  # measured-like errors: decreasing, ratio per bit between 2 and 6 (convex)
            e2 = rng.uniform(0.5, 2.0) * u.params
            e3 = e2 / rng.uniform(2, 6)
            u.error = {2: e2, 3: e3, 4: e3 / rng.uniform(2, 6)}
        units.append(u)
    lo = sum(ref_bytes(u, 2, 32) for u in units)
    hi = sum(ref_bytes(u, 4, 32) for u in units)
    return units, rng.randint(lo, hi)


def brute_force(units, limit, group, kind) -> float:
    best = math.inf
    for bits in itertools.product(CANDS, repeat=len(units)):
        if sum(ref_bytes(u, b, group) for u, b in zip(units, bits, strict=True)) <= limit:
            best = min(best, ref_loss(units, bits, kind))
    return best


def test_knapsack_equals_brute_force_optimum_on_small_instances():
    # 150 random instances (3-6 units, 1-2 linears each, both importances, measured or ideal errors)
    for seed in range(150):
        rng = random.Random(seed)
        units, limit = random_instance(rng)
        kind = rng.choice(("score", "odds"))
        bits = knapsack(units, CANDS, limit, G32, kind)
        assert len(bits) == len(units) and set(bits) <= set(CANDS)
        used = sum(ref_bytes(u, b, 32) for u, b in zip(units, bits, strict=True))
        assert used <= limit, (seed, used, limit)
        assert ref_loss(units, bits, kind) == pytest.approx(brute_force(units, limit, 32, kind), rel=1e-9), seed


def test_knapsack_takes_the_big_upgrade_a_per_byte_greedy_misses():
    # Hand-made: at group 32, a 128-input row takes 44 / 64 / 76 bytes at 2 / 3 / 4 bits.
    # X (128 rows): 2->3 costs 128·20 = 2560 bytes, gains 3. Y (32 rows): 2->3 costs 640, gains 1; 3->4: 384, 0.1.
    # The spare is exactly 2560. Per byte Y (1/640) beats X (3/2560), so a greedy lifts Y, then X no longer
    # fits: reduction 1.1. The optimum lifts X alone: reduction 3.
    x = Unit("X", [("x", 128, 128)], 0.5, {2: 4.0, 3: 1.0, 4: 0.9})
    y = Unit("Y", [("y", 32, 128)], 0.5, {2: 2.0, 3: 1.0, 4: 0.9})
    limit = 128 * 44 + 32 * 44 + 2560
    assert knapsack([x, y], CANDS, limit, G32, "score") == [3, 2]
    assert knapsack([x, y], CANDS, limit - 1, G32, "score") == [2, 4]  # one byte less: X cannot move


def test_knapsack_limits_outside_the_range():
    units, _ = random_instance(random.Random(7))
    lo = sum(ref_bytes(u, 2, 32) for u in units)
    hi = sum(ref_bytes(u, 4, 32) for u in units)
    assert knapsack(units, CANDS, lo, G32, "score") == [2] * len(units)
    assert knapsack(units, CANDS, hi, G32, "score") == [4] * len(units)  # errors fall with width: all widest


def dp_optimum(units, limit, group, kind) -> float:
    """Exact multiple-choice knapsack by dynamic programming over bytes in units of their gcd."""
    cost = np.array([[ref_bytes(u, b, group) for b in CANDS] for u in units])
    loss = np.array([[ref_importance(u.score, kind) * ref_error(u, b) for b in CANDS] for u in units])
    extra = cost - cost[:, :1]
    g = math.gcd(*extra.ravel().tolist())
    extra //= g
    cap = (limit - int(cost[:, 0].sum())) // g
    best = np.full(cap + 1, np.inf)  # best[c]: least loss using at most c spare units so far
    best[:] = 0.0
    for j in range(len(units)):
        new = np.full(cap + 1, np.inf)
        for i in range(len(CANDS)):
            e = extra[j, i]
            if e <= cap:
                new[e:] = np.minimum(new[e:], best[: cap + 1 - e] + loss[j, i])
        best = new
    return float(best[cap])


def test_knapsack_is_exact_and_fast_at_smollm2_size():
    # 30 blocks x 7 linears with SmolLM2-135M's shapes (group 128: 64 on 576 inputs), measured-like errors
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    rng = random.Random(0)
    units = []
    for layer in range(30):
        for k, (o, i) in enumerate(shapes):
            e2 = o * i * rng.uniform(0.5, 2.0)
            e3 = e2 / rng.uniform(2.5, 4.5)
            units.append(Unit(f"{layer}.{k}", [(f"m{layer}.{k}", o, i)], rng.uniform(0.01, 0.99),
                              {2: e2, 3: e3, 4: e3 / rng.uniform(3, 4.2)}))  # fmt: skip
    lo = sum(ref_bytes(u, 2, 128) for u in units)
    hi = sum(ref_bytes(u, 4, 128) for u in units)
    for frac in (0.3, 0.55):
        limit = int(lo + frac * (hi - lo))
        t = time.perf_counter()
        bits = knapsack(units, CANDS, limit, QuantSpec(2, 128), "score")
        took = time.perf_counter() - t
        assert took < 20  # about 0.1 s alone; generous for a shared CPU
        assert sum(ref_bytes(u, b, 128) for u, b in zip(units, bits, strict=True)) <= limit
        assert ref_loss(units, bits, "score") == pytest.approx(dp_optimum(units, limit, 128, "score"), rel=1e-9)
