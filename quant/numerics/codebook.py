"""Non-uniform codes: each layer's own codebook of 2^bits levels, and one scale per group.

A weight is stored as the code ``c`` of the level nearest to ``w / s``, and reads back as ``s * level[c]``:
no zero-point. The levels (fp16, 16 bytes at 3 bits, once per layer) are fitted by Lloyd's 1-D k-means to the
layer's weights with each group divided by its largest magnitude, starting from those values' quantiles. The
group scale ``s`` is then searched, as the uniform grid's clip is (``quant.numerics.grid.find_params``), over
shrinks of ``max|w| / max|level|``, on the row's 8-bit grid.

Why: after the Hadamard rotation a group's weights are close to Gaussian, where equally spaced levels spend
resolution on tails that hold few weights. On SmolLM2, rotation + GPTQ at group 64: 5.0% less held-out output
error at 3 bits and 6.8% less at 4 than uniform levels, at 4 bits per group less (no zero-point)
(benchmarks/results/codebook.md); the best 4-bit recipe with it: 22.66 on WikiText-2 at 4.17 bits per weight,
against 22.80 at 4.24 (README, Results).
"""

from __future__ import annotations

import torch

LLOYD_ITERS = 30
SAMPLE = 1 << 20  # values the k-means sees at most (a strided subsample: deterministic)


def fit_levels(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The 2^bits sorted levels (float32 holding fp16 values) of ``w`` ``[out, in]`` split in groups of
    ``group_size``, each group divided by its largest magnitude."""
    out, n = w.shape
    g = w.detach().float().reshape(-1, group_size)
    v = (g / g.abs().amax(1, keepdim=True).clamp(min=1e-12)).flatten()
    v = v[:: max(1, v.numel() // SAMPLE)].sort().values
    k = 2**bits
    levels = torch.quantile(v, (torch.arange(k, dtype=torch.float32) + 0.5) / k)
    for _ in range(LLOYD_ITERS):
        idx = nearest(v, levels)
        sums = torch.zeros(k).index_add_(0, idx, v)
        counts = torch.zeros(k).index_add_(0, idx, torch.ones_like(v))
        levels = torch.where(counts > 0, sums / counts.clamp(min=1), levels).sort().values
    return levels.to(torch.float16).float()


def nearest(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The index of the level nearest to each of ``x`` (``levels`` sorted ascending), int64."""
    mids = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(x, mids.to(x.device))


def codebook_scale(
    w: torch.Tensor, levels: torch.Tensor, snap, grid: int = 40, max_shrink: float = 0.5
) -> torch.Tensor:
    """Per row of ``w`` ``[rows, cols]`` (one group each), the scale ``[rows, 1]`` among shrinks of
    ``max|w| / max|level|`` in ``[1 - max_shrink, 1]`` with the lowest ``sum |w - s * level[c]|^2.4`` (the uniform
    grid's search norm), each rounded to what storage holds (``snap``: the rows' 8-bit grids, or fp16)."""
    w = w.detach().float()
    levels = levels.to(w.device)
    if levels.dim() == 2:  # a vector search costs 2^(bits*d) distances a run: fewer, coarser shrinks
        grid = 10
    top = levels.abs().max()
    amax = w.abs().amax(1, keepdim=True).clamp(min=1e-8) / top
    best = pick = None
    for i in range(grid + 1):
        s = snap(amax * (1 - max_shrink * i / grid))
        err = (w - s * decode(encode(w / s, levels), levels)).abs_().pow_(2.4).sum(1, keepdim=True)
        if best is None:
            best, pick = err, s
            continue
        better = err < best
        best, pick = torch.where(better, err, best), torch.where(better, s, pick)
    return pick


# Vector codebooks: ``levels`` ``[2^(bits*d), d]``, one entry per d consecutive weights of a group (d = 2 or 3).
# A vector's index is stored as its d weights' ``bits``-bit codes, the first the least significant, so the codes,
# their packing and their count are those of scalar codes, and in the dense layout (LSB first) a run's index is
# the next bits*d bits of the row; only the reading differs.


def vector_dim(levels: torch.Tensor) -> int:
    """1 for scalar levels ``[2^bits]``, d for vector ones ``[2^(bits*d), d]``."""
    return 1 if levels.dim() == 1 else levels.shape[1]


def _code_shifts(levels: torch.Tensor) -> tuple[torch.Tensor, int]:
    d = levels.shape[1]
    bits = (levels.shape[0].bit_length() - 1) // d
    return bits * torch.arange(d, device=levels.device), bits


def nearest_vectors(x: torch.Tensor, levels: torch.Tensor, metric: torch.Tensor | None = None) -> torch.Tensor:
    """The index of the entry of ``levels`` ``[K, d]`` nearest to each row of ``x`` ``[N, d]``, int64, in the
    norm ``e M e^T`` of ``metric`` ``[d, d]`` (Euclidean without); in chunks of about 4M distances."""
    levels = levels.to(x.device)
    lm = levels if metric is None else levels @ metric.to(x.device)
    norms = (lm * levels).sum(1)
    step = max(1, (1 << 22) // levels.shape[0])
    return torch.cat([torch.addmm(norms, ch, lm.T, alpha=-2).argmin(1) for ch in x.split(step)])


def encode(x: torch.Tensor, levels: torch.Tensor, metric: torch.Tensor | None = None) -> torch.Tensor:
    """Codes (int64, the shape of ``x``) of the nearest level, or, for vector levels, of the nearest entry to each
    run of d values along ``x``'s last dimension (in ``metric``'s norm, :func:`nearest_vectors`)."""
    if levels.dim() == 1:
        return nearest(x, levels)
    shifts, bits = _code_shifts(levels)
    idx = nearest_vectors(x.reshape(-1, levels.shape[1]).float(), levels, metric)
    return ((idx[:, None] >> shifts) & (2**bits - 1)).reshape(x.shape)


def decode(codes: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The values (float32, the shape of ``codes``) that ``codes`` stand for."""
    levels = levels.float().to(codes.device)
    if levels.dim() == 1:
        return levels[codes.long()]
    shifts, _ = _code_shifts(levels)
    idx = (codes.long().reshape(-1, levels.shape[1]) << shifts).sum(1)
    return levels[idx].reshape(codes.shape)


VECTOR_ITERS = 20
VECTOR_SAMPLE = 256  # vectors the k-means sees per entry at most


def fit_vectors(w: torch.Tensor, bits: int, group_size: int, d: int) -> torch.Tensor:
    """The ``[2^(bits*d), d]`` entries (float32 holding fp16 values) fitted by Lloyd's k-means to the runs of d
    weights of ``w``'s groups, each group divided by its largest magnitude; started from the product of the scalar
    levels (:func:`fit_levels`), so it is never worse than them on what it fits."""
    g = w.detach().float().reshape(-1, group_size)
    v = (g / g.abs().amax(1, keepdim=True).clamp(min=1e-12)).reshape(-1, d)
    k = 2 ** (bits * d)
    v = v[:: max(1, len(v) // (VECTOR_SAMPLE * k))]
    scalar = fit_levels(w, bits, group_size)
    entries = torch.cartesian_prod(*[scalar] * d).reshape(k, d).flip(1)  # the first code the least significant
    for _ in range(VECTOR_ITERS):
        idx = nearest_vectors(v, entries)
        sums = torch.zeros(k, d).index_add_(0, idx, v)
        counts = torch.zeros(k).index_add_(0, idx, torch.ones(len(v)))[:, None]
        entries = torch.where(counts > 0, sums / counts.clamp(min=1), entries)
    return entries.to(torch.float16).float()
