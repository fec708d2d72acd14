"""Dual-Scale Quantizer (D²Quant's DSQ), the math: a binary-coding quantizer with two kinds of scale.

For a block of columns ``W[m, n]`` (one quantization group of a ``down_proj``) and K = bits planes:

    Ŵ_ij = c_j · Σ_k r_k[i] · b_k[i, j],    b ∈ {-1, +1},  r ≥ 0 per row,  c > 0 per column

so each row has a symmetric 2^K-level codebook ``{Σ_k ±r_k}``, stretched per column by ``c_j``. The
column scale is later absorbed into ``up_proj`` (SwiGLU is linear in its up branch), so it costs
nothing at inference.

Fitting (methods.md §1.2): greedy residual binarisation, then alternating least squares, each
iteration (1) row scales jointly by the K×K normal equations, a negative scale flipping its plane,
(2) column scales by per-column least squares, (3) codes as the nearest of the 2^K candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DSQ_BITS = (2, 3)


def sign_table(k: int, device=None) -> torch.Tensor:
    """[2^K, K] of ±1: row ``code`` holds the signs whose bit k is ``(code >> k) & 1`` (1 -> +1)."""
    rows = [[1.0 if (code >> j) & 1 else -1.0 for j in range(k)] for code in range(2**k)]
    return torch.tensor(rows, device=device)


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


@dataclass
class DSQParams:
    r: torch.Tensor  # [m, K] row scales, >= 0
    c: torch.Tensor  # [n] column scales, > 0

    def levels(self) -> torch.Tensor:
        """[m, 2^K] codebook of every row (before the column stretch)."""
        return self.r @ sign_table(self.r.shape[1], self.r.device).to(self.r.dtype).T


def nearest_codes(w: torch.Tensor, params: DSQParams, cols: slice | torch.Tensor = slice(None)) -> torch.Tensor:
    """Codes (``[m, n']`` in ``[0, 2^K)``) of the candidates ``c_j · level`` nearest to ``w[m, n']``."""
    cand = params.c[cols][None, :, None] * params.levels()[:, None, :]  # [m, n', 2^K]
    return (w[:, :, None] - cand).abs().argmin(-1)


def decode(codes: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Row codebook values ``Σ_k ±r_k`` for codes ``[m, n]`` and row scales ``[m, K]`` (no column scale)."""
    return torch.gather(DSQParams(r, r.new_ones(1)).levels(), 1, codes.long())


def _planes(codes: torch.Tensor, k: int) -> torch.Tensor:
    """[K, m, n] of ±1 from codes."""
    return torch.stack([((codes >> j) & 1) * 2.0 - 1.0 for j in range(k)])


def fit_dsq(w: torch.Tensor, bits: int, iters: int = 15, eps: float = 1e-12) -> tuple[DSQParams, torch.Tensor]:
    """Fit row scales, column scales and codes to ``w[m, n]``. Returns (params, codes)."""
    if bits not in DSQ_BITS:
        raise ValueError(f"DSQ is defined for {DSQ_BITS} bits, got {bits}")
    w = w.double()
    m, n = w.shape
    c = w.abs().mean(0).clamp_min(eps)
    # greedy residual binarisation
    planes, r_cols, resid = [], [], w.clone()
    for _ in range(bits):
        b = _sign(resid)
        rk = (resid * c * b).sum(1) / (c * c).sum()
        planes.append(b)
        r_cols.append(rk)
        resid = resid - rk[:, None] * c * b
    B = torch.stack(planes)  # [K, m, n]
    r = torch.stack(r_cols, 1)  # [m, K]
    eye = torch.eye(bits, dtype=w.dtype, device=w.device)
    for _ in range(iters):
        # (1) row scales jointly: A[i] = Σ_j c_j² b_k b_l, rhs[i] = Σ_j w_ij c_j b_k
        cb = B * c  # [K, m, n]
        A = torch.einsum("kmn,lmn->mkl", cb, cb) + eps * eye
        rhs = torch.einsum("kmn,mn->mk", cb, w)
        r = torch.linalg.solve(A, rhs)
        flip = r < 0
        r = r.abs()
        B = torch.where(flip.T[:, :, None], -B, B)
        # (2) column scales: c_j = |Σ_i W_ij S_ij| / Σ_i S_ij²
        S = torch.einsum("mk,kmn->mn", r, B)
        c = ((w * S).sum(0).abs() / (S * S).sum(0).clamp_min(eps)).clamp_min(eps)
        # (3) codes: nearest candidate
        codes = nearest_codes(w, DSQParams(r, c))
        B = _planes(codes, bits).to(w.dtype)
    params = DSQParams(r, c)
    return params, nearest_codes(w, params)


def dsq_dequantize(codes: torch.Tensor, r: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """Ŵ = c_j · Σ_k r_k b_k for one group (``c=None``: after absorption)."""
    w = decode(codes, r)
    return w if c is None else w * c[None, :]


@dataclass
class DSQWeight:
    codes: torch.Tensor  # [out, n] uint8, bit k = sign of plane k
    row_scales: torch.Tensor  # [out, n / group_size, bits] fp16
    col_scale: torch.Tensor  # [n] fp32: to absorb into the layer that feeds this one
    bits: int
    group_size: int

    def dequantize(self, with_col_scale: bool = True) -> torch.Tensor:
        out, n = self.codes.shape
        g = self.group_size
        w = decode(self.codes.view(out * (n // g), g), self.row_scales.float().reshape(-1, self.bits))
        w = w.view(out, n)
        return w * self.col_scale[None, :] if with_col_scale else w


@torch.no_grad()
def dsq_quantize(
    weight: torch.Tensor,
    H: torch.Tensor | None,
    bits: int,
    group_size: int,
    iters: int = 15,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
) -> DSQWeight:
    """DSQ over every group of ``weight[out, n]``; inside the GPTQ column loop when ``H`` is given
    (each group fitted on its error-updated columns, each column rounded with its own ``c_j`` and its
    error fed to the columns not yet quantized), group by group with no feedback when ``H`` is None."""
    from quant.methods.gptq import gptq_loop

    W = weight.detach().float().clone()
    out, n = W.shape
    if n % group_size:
        raise ValueError(f"group size {group_size} does not divide {n} inputs")
    row_scales = torch.zeros(out, n // group_size, bits, device=W.device)
    col_scale = torch.zeros(n, device=W.device)
    levels: dict[int, torch.Tensor] = {}

    def fit_group(gid: int, current: torch.Tensor) -> None:
        params, _ = fit_dsq(current, bits, iters)
        r = params.r.half().float()  # stored in fp16: codes are chosen against what will be reloaded
        row_scales[:, gid] = r
        col_scale[gid * group_size : (gid + 1) * group_size] = params.c.float()
        levels[gid] = DSQParams(r, params.c.float()).levels()

    def quantize_column(gid: int, j: int, w: torch.Tensor):
        cand = col_scale[gid * group_size + j] * levels[gid]  # [out, 2^K]
        q = (w[:, None] - cand).abs().argmin(1)
        return q, torch.gather(cand, 1, q[:, None])[:, 0]

    if H is None:
        codes = torch.zeros(out, n, dtype=torch.long, device=W.device)
        for gid in range(n // group_size):
            cols = slice(gid * group_size, (gid + 1) * group_size)
            fit_group(gid, W[:, cols])
            for j in range(group_size):
                codes[:, gid * group_size + j] = quantize_column(gid, j, W[:, gid * group_size + j])[0]
    else:
        H = H.detach().float().to(W.device)  # read only
        codes = gptq_loop(W, H, group_size, fit_group, quantize_column, damp, act_order, block_size)
    return DSQWeight(codes.to(torch.uint8), row_scales.half(), col_scale, bits, group_size)
