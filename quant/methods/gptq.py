"""GPTQ (Frantar et al., 2022): quantize columns one at a time, pushing each column's rounding
error onto the not-yet-quantized columns through the inverse Hessian of the layer's inputs.

Written from the paper's algorithm: damping ``damp * mean(diag H)``, the upper Cholesky factor of
``H⁻¹``, lazy batched updates in blocks of ``block_size`` columns, optional act-order (columns by
descending ``diag H``). Groups stay contiguous in the original column order even with act-order:
a group's scale and zero are fitted when its first column comes up, on the current (error-updated)
values of all its columns, so no ``g_idx`` is needed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from quant.errors import QuantError
from quant.numerics.grid import (
    QuantizedWeight,
    QuantSpec,
    codebook_levels,
    dequantize_codes,
    find_params,
    quantize_codes,
    scale_grid,
)


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` (``λ = damp · mean(diag H)``); raises the damping if ``H`` is
    not positive definite.

    With ``J`` the reversal permutation and ``J (H + λI) J = L Lᵀ``, the factor is ``J L⁻¹ J``: one Cholesky
    and one triangular inverse (about ⅔ n³ flops), where inverting and factoring again costs twice that, which
    is most of a 14336-wide down_proj's time on a CPU."""
    return _reversed_inverse_cholesky(H.flip(0, 1), damp, torch.diag(H).mean())


def _reversed_inverse_cholesky(A: torch.Tensor, damp: float, diag_mean: torch.Tensor) -> torch.Tensor:
    """:func:`_inverse_cholesky` given ``A = J H J``, consuming ``A`` (damped in place, then freed): beside the
    factor, at most one more ``[n, n]`` matrix lives at once (a 14336-wide down_proj: 0.8 GB)."""
    diag = A.diagonal().clone()
    for attempt in range(5):
        A.diagonal().copy_(diag + damp * (10**attempt) * diag_mean)
        L, info = torch.linalg.cholesky_ex(A)
        if info == 0:
            del A
            return _lower_inverse(L).flip(0, 1)
        del L
    raise QuantError("GPTQ: the calibration Hessian is not positive definite even with 1000x damping")


def _lower_inverse(L: torch.Tensor) -> torch.Tensor:
    """``L⁻¹`` of a lower-triangular ``L``: LAPACK's trtri in place on a CPU (torch has no binding for it; L's
    row-major memory is Lᵀ to Fortran, so it is inverted as an upper matrix without a copy), a triangular
    solve elsewhere."""
    if L.device.type != "cpu" or L.dtype not in (torch.float32, torch.float64):
        eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
        return torch.linalg.solve_triangular(L, eye, upper=False)
    from scipy.linalg import lapack

    trtri = lapack.strtri if L.dtype == torch.float32 else lapack.dtrtri
    upper_t = L.contiguous().numpy().T  # Fortran-ordered view of Lᵀ
    inv, info = trtri(upper_t, lower=0, overwrite_c=1)
    if info != 0:
        raise QuantError(f"GPTQ: triangular inverse failed (LAPACK info {info})")
    return torch.from_numpy(inv.T)  # L⁻¹; its upper part stayed L's zeros (trtri writes one triangle)
def gptq_loop(
    W: torch.Tensor,
    H: torch.Tensor,
    g: int,
    fit_group: Callable[[int, torch.Tensor], None],
    quantize_column: Callable[[int, int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    damp: float,
    act_order: bool,
    block_size: int,
    vector: int = 1,
) -> torch.Tensor:
    """The GPTQ column loop, for any group quantizer. Returns the codes ``[out, n]`` (original order). ``W`` is
    overwritten; ``H`` is read only.

    ``fit_group(gid, current)`` fits group ``gid`` on its columns' current (error-updated) values
    ``[out, g]`` the first time one of them comes up; ``quantize_column(gid, j, w)`` rounds column
    ``j`` of that group and returns ``(codes, dequantized)``. With ``vector`` > 1 (a vector codebook) the columns
    go in runs of that many, kept together by act-order, and ``quantize_column(gid, j, w, metric)`` rounds a whole
    run ``[out, vector]`` at its first column, on the run's current values, nearest in the norm ``e M e^T`` whose
    ``M = (U_b^T U_b)^-1`` (``U_b`` the run's block of the factor) is what the run's error ``e`` costs the layer
    once fed on; each column's error is then fed on as usual, the run's later columns included (the vector form of
    GPTQ's update, as QuIP#'s BlockLDLQ and GPTVQ do it).
    """
    out, n = W.shape
    diag = torch.diag(H).clone()
    dead = diag == 0  # inputs that never fire: weight irrelevant, quantize as 0
    diag[dead] = 1
    W[:, dead] = 0

    if act_order and vector > 1:  # runs ranked by their columns' summed diag H, each kept in order
        runs = torch.argsort(diag.view(-1, vector).sum(1), descending=True)
        perm = (runs[:, None] * vector + torch.arange(vector, device=W.device)).flatten()
    elif act_order:
        perm = torch.argsort(diag, descending=True)
    else:
        perm = torch.arange(n, device=W.device)
    pos = torch.argsort(perm)  # pos[j]: where original column j sits in the processing order
    W = W[:, perm]
    rev = perm.flip(0)  # J P H P J in one gather: H itself is neither copied whole nor changed
    A = H.index_select(0, rev).index_select(1, rev)
    A.diagonal().copy_(diag[rev])
    Hinv = _reversed_inverse_cholesky(A, damp, diag[perm].mean())

    if not act_order:  # keep each group inside one lazy-update block, so its fit sees every update
        block_size = g * max(1, block_size // g) if g < n else n
    block_size = vector * max(1, block_size // vector)  # and each run
    fitted = [False] * (n // g)
    orig = perm.tolist()
    codes = torch.zeros_like(W)

    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            gid, j = divmod(orig[i1 + i], g)
            if not fitted[gid]:
                cols = pos[gid * g : (gid + 1) * g]
                current = W[:, cols].clone()
                inside = (cols >= i1) & (cols < i2)
                current[:, inside] = W1[:, cols[inside] - i1]
                fit_group(gid, current)
                fitted[gid] = True
            w = W1[:, i]
            if vector == 1:
                q, deq = quantize_column(gid, j, w)
            else:
                if j % vector == 0:
                    U = Hinv1[i : i + vector, i : i + vector]
                    run_q, run_deq = quantize_column(gid, j, W1[:, i : i + vector], torch.linalg.inv(U.T @ U))
                q, deq = run_q[:, j % vector], run_deq[:, j % vector]
            codes[:, i1 + i] = q
            err = (w - deq) / Hinv1[i, i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)  # in place: a temporary per column costs page faults
            Err1[:, i] = err
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)
    return codes[:, pos]


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
) -> QuantizedWeight:
    W = weight.detach().float().clone()
    out, n = W.shape
    g = spec.group_for(n)
    scales = torch.zeros(out, n // g, device=W.device)
    zeros = torch.zeros_like(scales)
    # 8-bit scales: each row's grid is fixed before any code, from the weight's own groups; a group whose
    # error-fed columns later want a scale past the grid gets its end (clipped a little)
    levels = codebook_levels(W, spec)
    sg = scale_grid(W, spec, levels)

    def fit_group(gid: int, current: torch.Tensor) -> None:
        s, z = find_params(current, spec, snap=None if sg is None else sg.snap, levels=levels)
        scales[:, gid], zeros[:, gid] = s[:, 0], z[:, 0]

    def quantize_column(gid: int, j: int, w: torch.Tensor, metric: torch.Tensor | None = None):
        s, z = scales[:, gid], zeros[:, gid]
        if w.dim() == 2:  # a vector codebook's run of columns
            s, z = s[:, None], z[:, None]
        q = quantize_codes(w, s, z, spec.bits, levels, metric)
        return q, dequantize_codes(q, s, z, levels)

    H = H.detach().float().to(W.device)  # gptq_loop leaves H unchanged: no copy (a down_proj's is 0.8 GB)
    codes = gptq_loop(W, H, g, fit_group, quantize_column, damp, act_order, block_size, spec.vector_dim)
    return QuantizedWeight(
        codes=codes.to(torch.uint8),
        scales=scales.to(torch.float16),
        zeros=zeros.to(torch.uint8),
        bits=spec.bits,
        group_size=g,
        scale_grid=sg,
        levels=levels,
    )
