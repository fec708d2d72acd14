"""NSDS: calibration-free sensitivity of each block, from its weights alone.

Each block is split into five operational roles (methods.md §2.1):

- Detectors read the residual stream: the QK circuit ``W_Q^hᵀ W_K^{kv(h)}`` per query head, ``up``, ``gate``.
- Writers write into it: the OV circuit ``W_O^{[:,h]} W_V^{kv(h)}`` per head, ``down``.

Two aspects per role: numerical vulnerability (excess kurtosis of the weights) and structural
expressiveness (role-reweighted singular values over their effective rank). Each (role, aspect)
is normalised across layers by MAD-Sigmoid, then Soft-OR folds the roles (per aspect) and the two
aspects into one score per layer. Higher means more sensitive.

This is the intended math, not the released code's defects (methods.md §2.6): Soft-OR averages
over roles only (one score per layer), ``down``'s writer weights use the output-space singular
vectors, the MAD factor is 1.4826, and rankings are most-sensitive first.

Circuit matrices have rank ≤ head_dim, so their spectra come from a QR of each factor and the SVD of
the small core; dense matrices go through an eigendecomposition of their 576×576-sized Gram matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quant.engine.options import option
from quant.engine.structure import LINEAR_ROLES, structure_of

ROLES = ("qk", "ov", "up", "gate", "down")
ASPECTS = ("nv", "se")
ENERGY = 0.99  # spectral energy kept (the paper's "top" subspace)
MAD_FACTOR = 1.4826  # MAD -> standard deviation for a normal distribution (paper figure)


@dataclass
class NSDSConfig:
    temperature: float = option(1.0, "T of the MAD-sigmoid: sigmoid(z / T).")
    energy: float = option(ENERGY, "Spectral energy kept in the 'top' subspace of each weight.")


@dataclass
class NSDSScores:
    """Raw per-(layer, role, aspect) values, their MAD-Sigmoid probabilities, and the aggregates."""

    raw: torch.Tensor  # [layers, roles, aspects]
    prob: torch.Tensor  # [layers, roles, aspects], MAD-Sigmoid across layers
    role_score: torch.Tensor  # [layers, roles], Soft-OR over the two aspects (for module-level allocation)
    layer_score: torch.Tensor  # [layers], Soft-OR over roles per aspect, then over aspects
    unembed_rank: int  # k_U: dimension of the vocabulary-readable subspace
    hidden: int

    def ranking(self) -> list[int]:
        """Layer indices, most sensitive first."""
        return torch.argsort(self.layer_score, descending=True, stable=True).tolist()

    def to_dict(self) -> dict:
        return {
            "roles": list(ROLES),
            "aspects": list(ASPECTS),
            "raw": self.raw.tolist(),
            "prob": self.prob.tolist(),
            "role_score": self.role_score.tolist(),
            "layer_score": self.layer_score.tolist(),
            "ranking_most_sensitive_first": self.ranking(),
            "unembed_rank": self.unembed_rank,
            "hidden": self.hidden,
        }


def excess_kurtosis(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Fisher kurtosis E[(x-μ)^4] / E[(x-μ)^2]^2 - 3 (over all entries, or along ``dim``)."""
    x = x.double()
    if dim is None:
        x = x.reshape(-1)
        dim = 0
    c = x - x.mean(dim, keepdim=True)
    m2 = c.pow(2).mean(dim)
    return c.pow(4).mean(dim) / m2.pow(2).clamp_min(1e-300) - 3.0


def kept_rank(s: torch.Tensor, energy: float = ENERGY) -> int:
    """Smallest k (at least 2) whose top-k singular values hold ``energy`` of the total s²."""
    e = torch.cumsum(s.double() ** 2, 0)
    k = int(torch.searchsorted(e, energy * e[-1]).item()) + 1
    return max(2, min(k, s.numel()))


def spectral_capacity(s: torch.Tensor, alpha: torch.Tensor) -> float:
    """Σ s̃ / exp(H(p)) with s̃ = s·α and p = s̃ / Σ s̃: reweighted magnitude over effective rank."""
    st = (s.double() * alpha.double()).clamp_min(0)
    total = st.sum()
    if total <= 0:
        return 0.0
    p = st / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float(total / entropy.exp())


def _dense_svd(w: torch.Tensor, side: str, energy: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top singular values of ``w`` and the matching singular vectors on one side, via the Gram matrix.

    side="right": vectors in the input space (columns of V); side="left": output space (columns of U).
    The Gram matrix is the smaller-side one here (hidden × hidden), so this costs one eigh of d×d.
    """
    w = w.double()
    g = w.T @ w if side == "right" else w @ w.T
    ev, vecs = torch.linalg.eigh(g)
    ev, vecs = ev.flip(0).clamp_min(0), vecs.flip(1)
    s = ev.sqrt()
    k = kept_rank(s, energy)
    return s[:k], vecs[:, :k]


def _product_svd(a: torch.Tensor, b: torch.Tensor, energy: float):
    """SVD of the low-rank product ``a @ b`` (a: d×r, b: r×d) from QR factors and an r×r core."""
    qa, ra = torch.linalg.qr(a.double())
    qb, rb = torch.linalg.qr(b.double().T)
    uc, s, vch = torch.linalg.svd(ra @ rb.T)
    k = kept_rank(s, energy)
    return s[:k], (qa @ uc)[:, :k], (qb @ vch.T)[:, :k]


def _unembedding_subspace(w_u: torch.Tensor, energy: float) -> torch.Tensor:
    """P_U: right singular vectors of the unembedding that hold ``energy`` of its spectrum (d × k_U)."""
    _, vecs = _dense_svd(w_u, "right", energy)
    return vecs


def _pos(x: torch.Tensor) -> torch.Tensor:
    return x.clamp_min(0)


def nsds_roles(info) -> dict[str, str]:
    """Each quantizable linear of a block (``quant.engine.structure.BlockStructure``) -> the NSDS role it carries.

    Separate q/k/v/o, gate/up/down carry their own. Where the graph fixes no such role (a fused
    ``qkv_proj`` or ``query_key_value``, a fused ``gate_up_proj``, a non-gated ``fc1``), an attention input
    counts as ``qk`` and an MLP input as ``up``: scored as dense detectors, not per-head circuits."""
    named = {n: r for r, n in info.roles.items() if r in LINEAR_ROLES}
    role = {"q": "qk", "k": "qk", "v": "ov", "o": "ov", "gate": "gate", "up": "up", "down": "down"}
    attn = info.roles.get("attn", "") + "."
    return {n: role[named[n]] if n in named else "qk" if n.startswith(attn) else "up" for n in info.linears}


def _role_values(block: nn.Module, structure, n_heads: int, n_kv: int, p_u: torch.Tensor, energy: float):
    """[roles, aspects] raw NV and SE for one block (a role the block lacks stays 0: absent)."""
    info = structure.info(block)
    lin = {r: block.get_submodule(info.roles[r]).weight.detach().float() for r in LINEAR_ROLES if r in info.roles}
    roles = nsds_roles(info)
    fused = {
        r: torch.cat([block.get_submodule(n).weight.detach().float() for n, x in roles.items() if x == r])
        for r in ("qk", "up")
        if any(x == r and n not in info.roles.values() for n, x in roles.items())
    }
    out = torch.zeros(len(ROLES), len(ASPECTS), dtype=torch.float64)
    if all(r in lin for r in ("q", "k", "v", "o")):
        out[0], out[1] = _circuits(lin, n_heads, n_kv, p_u, energy)
    else:  # fused attention input: a dense detector; o alone as the writer
        out[0] = _detector(fused["qk"], energy) if "qk" in fused else 0
        if "o" in lin:
            out[1] = _writer(lin["o"], p_u, energy)
    for i, role in ((2, "up"), (3, "gate")):
        w = lin.get(role, fused.get(role))
        if w is not None:
            out[i] = _detector(w, energy)
    if "down" in lin:
        out[4] = _writer(lin["down"], p_u, energy)
    return out


def _detector(w: torch.Tensor, energy: float) -> torch.Tensor:
    s, v = _dense_svd(w, "right", energy)  # reading directions live in the input space
    alpha = torch.log1p(_pos(excess_kurtosis(v, 0)))
    return torch.tensor([excess_kurtosis(w).item(), spectral_capacity(s, alpha)])


def _writer(w: torch.Tensor, p_u: torch.Tensor, energy: float) -> torch.Tensor:
    s, u = _dense_svd(w, "left", energy)  # written directions live in the output space
    return torch.tensor([excess_kurtosis(w).item(), spectral_capacity(s, (p_u.T @ u).norm(dim=0))])


def _circuits(lin: dict, n_heads: int, n_kv: int, p_u: torch.Tensor, energy: float):
    """The QK and OV circuits, head by head: ``[nv, se]`` each."""
    head_dim = lin["q"].shape[0] // n_heads
    group = n_heads // n_kv
    qk_nv, qk_se, ov_nv, ov_se = [], [], [], []
    for h in range(n_heads):
        kv = h // group
        q = lin["q"][h * head_dim : (h + 1) * head_dim]  # [hd, d]
        k = lin["k"][kv * head_dim : (kv + 1) * head_dim]  # [hd, d]
        v = lin["v"][kv * head_dim : (kv + 1) * head_dim]  # [hd, d]
        o = lin["o"][:, h * head_dim : (h + 1) * head_dim]  # [d, hd]
        # QK circuit: bilinear form between the query-side and key-side residual directions.
        qk_nv.append(excess_kurtosis(q.T @ k))
        s, u, vv = _product_svd(q.T, k, energy)
        alpha = torch.log1p(_pos(excess_kurtosis(u, 0)) * _pos(excess_kurtosis(vv, 0)))
        qk_se.append(spectral_capacity(s, alpha))
        # OV circuit: what a head writes to the residual stream given what it reads.
        ov_nv.append(excess_kurtosis(o @ v))
        s, u, _ = _product_svd(o, v, energy)
        ov_se.append(spectral_capacity(s, (p_u.T @ u).norm(dim=0)))
    qk = torch.tensor([torch.stack(qk_nv).mean().item(), sum(qk_se) / n_heads])
    return qk, torch.tensor([torch.stack(ov_nv).mean().item(), sum(ov_se) / n_heads])


def mad_sigmoid(x: torch.Tensor, temperature: float = 1.0, eps: float = 1e-12) -> torch.Tensor:
    """sigmoid(((x - median) / (1.4826 · MAD)) / T) along dim 0 (across layers)."""
    med = x.quantile(0.5, dim=0)  # interpolating median: with an even layer count, the mean of the middle two
    mad = (x - med).abs().quantile(0.5, dim=0)
    return torch.sigmoid((x - med) / (MAD_FACTOR * mad + eps) / temperature)


def soft_or(p: torch.Tensor, dim: int) -> torch.Tensor:
    """1 - exp(mean log(1 - p)) along ``dim``: one minus the geometric mean of the complements."""
    return 1 - torch.log1p(-p.clamp(max=1 - 1e-12)).mean(dim).exp()


@torch.no_grad()
def nsds_scores(model: nn.Module, config: NSDSConfig | None = None) -> NSDSScores:
    """Score every block of ``model`` from its weights (no data). Works for any supported structure."""
    config = config or NSDSConfig()
    structure = structure_of(model)
    cfg = model.config
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    p_u = _unembedding_subspace(structure.head(model).weight.detach().float(), config.energy)
    blocks = structure.blocks(model)
    raw = torch.stack([_role_values(b, structure, n_heads, n_kv, p_u, config.energy) for b in blocks])
    raw = torch.nan_to_num(raw, nan=0.0)
    prob = mad_sigmoid(raw, config.temperature)
    present = raw.abs().sum(0) > 0  # [roles, aspects]: a role that scores zero everywhere is absent
    per_aspect = torch.stack([soft_or(prob[:, present[:, a], a], 1) for a in range(len(ASPECTS))], 1)
    layer = soft_or(per_aspect, 1)
    role_score = soft_or(prob, 2)
    return NSDSScores(raw.float(), prob.float(), role_score.float(), layer.float(), p_u.shape[1], p_u.shape[0])


def score_table(scores: NSDSScores) -> str:
    """A fixed-width table: per layer the Soft-OR score, its rank, and each role's NV/SE probability."""
    rank = {layer: r + 1 for r, layer in enumerate(scores.ranking())}
    head = "layer  score  rank  " + "  ".join(f"{r:>4}.nv {r:>4}.se" for r in ROLES)
    rows = [head]
    for i in range(len(scores.layer_score)):
        cells = "  ".join(f"{scores.prob[i, j, 0]:7.2f} {scores.prob[i, j, 1]:7.2f}" for j in range(len(ROLES)))
        rows.append(f"{i:5d}  {scores.layer_score[i]:.3f}  {rank[i]:4d}  {cells}")
    return "\n".join(rows)
