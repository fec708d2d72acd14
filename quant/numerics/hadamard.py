"""Orthonormal Hadamard matrices of the sizes LLM hidden widths take (576, 960, 1536, 4096, ...).

A Hadamard matrix of order n exists for the sizes we need as a Kronecker product of a Sylvester
matrix (order 2^k) and Paley-I matrices (order q + 1 for a prime q ≡ 3 mod 4: 4, 8, 12, 20, 24,
32, 44, 48, 60, 72, ...). SmolLM2's 576 = 72 · 8, for instance. ``hadamard(n)`` returns it scaled
by 1/√n, so it is orthogonal: a rotation that spreads every channel over all the others.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from quant.errors import QuantError


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _paley(q: int) -> torch.Tensor:
    """Paley construction I: order q + 1, for a prime q ≡ 3 (mod 4). Entries ±1."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jacobsthal = chi[(idx[None, :] - idx[:, None]) % q]  # Q_ij = χ(j - i), skew-symmetric for q ≡ 3 mod 4
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jacobsthal
    return torch.eye(q + 1, dtype=torch.float64) + s  # H Hᵀ = I + S Sᵀ = (q + 1) I since S is skew


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _factor(n: int) -> tuple[int, int] | None:
    """n = m · 2^k with m = 1 or a Paley-I order (largest power of two first)."""
    k = (n & -n).bit_length() - 1
    for j in range(k, -1, -1):
        m = n >> j
        if m == 1 or (m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3):
            return m, 1 << j
    return None


def has_hadamard(n: int) -> bool:
    return n >= 1 and _factor(n) is not None


@lru_cache(maxsize=16)
def _hadamard(n: int) -> torch.Tensor:
    f = _factor(n) if n >= 1 else None
    if f is None:
        raise QuantError(f"no Hadamard construction for order {n} (needs 2^k, or (q+1)·2^k with q prime, q ≡ 3 mod 4)")
    m, p = f
    h = _sylvester(p) if m == 1 else torch.kron(_paley(m - 1), _sylvester(p))
    return h / math.sqrt(n)


@lru_cache(maxsize=32)
def _factors(n: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    f = _factor(n) if n >= 1 else None
    if f is None:
        raise QuantError(f"no Hadamard construction for order {n} (needs 2^k, or (q+1)·2^k with q prime, q ≡ 3 mod 4)")
    m, p = f
    a = torch.ones(1, 1, dtype=torch.float64) if m == 1 else _paley(m - 1) / math.sqrt(m)
    return a.to(dtype=dtype, device=device), (_sylvester(p) / math.sqrt(p)).to(dtype=dtype, device=device)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """``x @ hadamard(n)`` over the last dimension without forming the n×n matrix: with
    ``H = A ⊗ B`` (A Paley of order m, B Sylvester of order p), a row viewed as an m×p matrix X
    maps to ``Aᵀ X B``, which costs n(m + p) multiply-adds per row instead of n²."""
    n = x.shape[-1]
    a, b = _factors(n, x.dtype, str(x.device))
    y = a.T @ x.reshape(*x.shape[:-1], a.shape[0], b.shape[0]) @ b
    return y.reshape(x.shape)


def hadamard(n: int) -> torch.Tensor:
    """Orthonormal Hadamard matrix of order n, float64."""
    return _hadamard(n).clone()


def block_hadamard(n: int, block: int) -> torch.Tensor:
    """Block-diagonal orthonormal Hadamard: n/block copies of ``hadamard(block)`` (a group-wise rotation)."""
    if n % block:
        raise QuantError(f"rotation block {block} does not divide width {n}")
    return torch.block_diag(*[_hadamard(block)] * (n // block))


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """Haar-random orthogonal matrix (QR of a Gaussian with the sign fix), float64."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]
