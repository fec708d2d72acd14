"""Before a full run: which spends 3-4 bits better, per layer? Calibration text only (no WikiText-2).

SmolLM2-135M, norms folded and the residual stream Hadamard-rotated, every block linear's input second moment H
taken on the *float* model over 32 C4 calibration windows of 512 (a second set of 16 is held out). Per linear,
GPTQ at group 64 with 8-bit scales, and the output error ``tr(E H_held E^T) / tr(W H_held W^T)`` on the held-out
windows, summed over the 30 blocks per kind of linear:

* ``uniform`` (equally spaced levels, 4-bit zero-points) against ``kmeans`` (``--codebook kmeans``: the layer's
  own levels, no zero-points), at 3 and 4 bits;
* at 3 bits, group 192 (3.06 bits instead of 3.24) plus an EoRA low-rank correction of the error (the SVD of
  ``E H^1/2`` truncated, its factors at 4 bits) with the rank the saved 0.125 bits pay for, and twice it.

Writes benchmarks/results/codebook.{json,md}.

    python benchmarks/codebook_probe.py
"""

from __future__ import annotations

import time

import torch
from common import RESULTS, save_results
from torch import nn
from tqdm import tqdm

from calibrate import calibration_windows
from quant import load_model
from quant.methods.gptq import gptq_quantize
from quant.methods.rotation import RotationConfig, fold_norms, rotate, rotation_matrix
from quant.numerics.grid import QuantSpec

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def hessians(model: nn.Module, windows: torch.Tensor, names: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    H = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in names.items()}

    def hook(name):
        def f(mod, inp, out):
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            H[name] += x.T @ x

        return f

    handles = [m.register_forward_hook(hook(n)) for n, m in names.items()]
    with torch.no_grad():
        for i in range(0, len(windows), 8):
            model(windows[i : i + 8])
    for h in handles:
        h.remove()
    return {n: h.float() for n, h in H.items()}


def q4_rows(x: torch.Tensor) -> torch.Tensor:
    """4-bit symmetric per row (absmax / 7), as the correction's factors would be stored."""
    s = x.abs().amax(1, keepdim=True).clamp(min=1e-12) / 7
    return torch.round(x / s).clamp(-8, 7) * s


def eora(E: torch.Tensor, H: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-``rank`` correction of the error ``E`` in the eigenspace of ``H``, factors at 4 bits."""
    lam, Q = torch.linalg.eigh(H.double())
    lam = lam.clamp(min=lam.max() * 1e-6)
    U, S, Vt = torch.linalg.svd(E.double() @ Q * lam.sqrt(), full_matrices=False)
    B, A = U[:, :rank] * S[:rank], (Vt[:rank] / lam.sqrt()) @ Q.T
    g = (A.norm(dim=1) / B.norm(dim=0).clamp(min=1e-12)).sqrt()  # balanced before rounding
    return q4_rows((B * g).T.float()).T @ q4_rows((A / g[:, None]).float())


def setup() -> tuple[dict[str, nn.Linear], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """SmolLM2 with norms folded and the residual stream Hadamard-rotated: its block linears, and their float-stream
    input moments over 32 C4 calibration windows of 512 (fit) and 16 more (held out)."""
    torch.manual_seed(0)
    lm = load_model()
    model = lm.model.eval()
    fold_norms(model)
    rotate(model, rotation_matrix(model.config.hidden_size, RotationConfig(mode="hadamard"))[0])
    names = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    calib = calibration_windows(lm.tokenizer, "c4", 48, 512, seed=0)
    fit, held = hessians(model, calib[:32], names), hessians(model, calib[32:], names)
    return names, fit, held


def main() -> None:
    names, fit, held = setup()
    sums: dict[str, dict[str, float]] = {k: {} for k in KINDS}
    t0 = time.time()
    for n, m in tqdm(names.items(), desc="linears"):
        W = m.weight.detach().float()
        out, inn = W.shape

        def err(E: torch.Tensor, n=n) -> float:
            return float(torch.einsum("oi,ij,oj->", E, held[n], E))

        base, row = err(W), {}
        for bits in (3, 4):
            for book in ("uniform", "kmeans"):
                qw = gptq_quantize(W, fit[n], QuantSpec(bits, 64, scale_bits=8, codebook=book))
                row[f"{book} w{bits} g64"] = err(W - qw.dequantize())
        E = W - gptq_quantize(W, fit[n], QuantSpec(3, 192, scale_bits=8)).dequantize()
        row["uniform w3 g192"] = err(E)
        rank = int(0.125 * out * inn // (4 * (out + inn) + 32))  # 4-bit factors and their fp16 row scales
        row["w3 g192 + EoRA (same bits)"] = err(E - eora(E, fit[n], rank))
        row["w3 g192 + EoRA (twice the rank)"] = err(E - eora(E, fit[n], 2 * rank))
        kind = n.rsplit(".", 1)[1]
        for k, v in row.items():
            sums[kind][k] = sums[kind].get(k, 0.0) + v / base
    meta = {"model": "SmolLM2-135M-Instruct, Hadamard-rotated", "calibration": "c4 32 x 512 (fit), 16 x 512 (held)",
            "seconds": round(time.time() - t0, 1)}
    save_results(RESULTS / "codebook.json", meta, sums)
    cols = list(next(iter(sums.values())))
    total = {c: sum(sums[k][c] for k in KINDS) for c in cols}
    lines = ["# Output error per kind of linear: uniform vs codebook levels, and EoRA at equal bits", "",
             __doc__.split("\n\n")[1].replace("\n", " "), "",
             "| linear | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {k} | " + " | ".join(f"{sums[k][c]:.4f}" for c in cols) + " |" for k in KINDS]
    lines += ["| all | " + " | ".join(f"{total[c]:.4f}" for c in cols) + " |"]
    (RESULTS / "codebook.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
