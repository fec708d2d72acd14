"""Before a full run: do vector codebooks (``--codebook vq2``/``vq3``: one entry per 2 or 3 consecutive weights of a
group) spend 3 bits better than scalar levels? Calibration text only (no WikiText-2).

The set-up of ``codebook_probe.py`` (SmolLM2-135M, norms folded, residual stream Hadamard-rotated, per linear the
float model's input second moment H over 32 C4 calibration windows of 512, 16 more held out), GPTQ with 8-bit
scales at 3 bits, and the output error ``tr(E H_held E^T) / tr(W H_held W^T)`` on the held-out windows summed
over the 30 blocks per kind of linear; beside each column its bits per weight over these linears (codes, scale
codes, row grids, levels).

Rule fixed before it ran: a vector codebook earns a full quality row if it cuts the summed error by 15% or more
against uniform levels at group 64 (3.24 bits) within 3.25 bits; the scalar codebook cut it by 5% and gained
nothing on perplexity.

Writes benchmarks/results/vector_codebook.{json,md}.

    python benchmarks/vector_probe.py
"""

from __future__ import annotations

import time

import torch
from codebook_probe import KINDS, setup
from common import RESULTS, save_results
from tqdm import tqdm

from quant.methods.gptq import gptq_quantize
from quant.numerics.grid import QuantSpec

COLUMNS = (("uniform", 64), ("vq2", 64), ("vq2", 48), ("vq3", 96))


def bits_of(qw, out: int, inn: int) -> float:
    """Bits this layer stores: codes, a scale code a group, 4-bit zeros (uniform), the row's grid, the levels."""
    groups = inn // qw.group_size
    b = out * (inn * qw.bits + 8 * groups + 32) + (0 if qw.levels is None else 16 * qw.levels.numel())
    return b + (0 if qw.levels is not None else out * groups * 4)


def main() -> None:
    names, fit, held = setup()
    cols = [f"{book} w3 g{g}" for book, g in COLUMNS]
    sums: dict[str, dict[str, float]] = {k: dict.fromkeys(cols, 0.0) for k in KINDS}
    bits = dict.fromkeys(cols, 0.0)
    weights = 0
    t0 = time.time()
    for n, m in tqdm(names.items(), desc="linears"):
        W = m.weight.detach().float()
        out, inn = W.shape
        base = float(torch.einsum("oi,ij,oj->", W, held[n], W))
        kind = n.rsplit(".", 1)[1]
        weights += out * inn
        for (book, g), col in zip(COLUMNS, cols, strict=True):
            qw = gptq_quantize(W, fit[n], QuantSpec(3, g, scale_bits=8, codebook=book))
            E = W - qw.dequantize()
            sums[kind][col] += float(torch.einsum("oi,ij,oj->", E, held[n], E)) / base
            bits[col] += bits_of(qw, out, inn)
    bpw = {c: round(b / weights, 3) for c, b in bits.items()}
    meta = {"model": "SmolLM2-135M-Instruct, Hadamard-rotated", "calibration": "c4 32 x 512 (fit), 16 x 512 (held)",
            "seconds": round(time.time() - t0, 1), "bits_per_weight": bpw}
    save_results(RESULTS / "vector_codebook.json", meta, sums)
    total = {c: sum(sums[k][c] for k in KINDS) for c in cols}
    lines = ["# Output error per kind of linear at 3 bits: scalar against vector codebooks", "",
             __doc__.split("\n\n")[1].replace("\n", " "), "",
             "| linear | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {k} | " + " | ".join(f"{sums[k][c]:.4f}" for c in cols) + " |" for k in KINDS]
    lines += ["| all | " + " | ".join(f"{total[c]:.4f}" for c in cols) + " |",
              "| against uniform | " + " | ".join(f"{total[c] / total[cols[0]] - 1:+.1%}" for c in cols) + " |",
              "| bits per weight | " + " | ".join(f"{bpw[c]:.3f}" for c in cols) + " |"]
    (RESULTS / "vector_codebook.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
