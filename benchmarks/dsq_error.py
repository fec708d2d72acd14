"""Weight-level error of DSQ against the uniform grid on every down_proj of SmolLM2-135M (no data).

For each block's down_proj and each width (3, 2): the relative Frobenius error ‖W − Ŵ‖² / ‖W‖² of
group-64 asymmetric uniform round-to-nearest with the MSE clip search (what GPTQ/GPTAQ use per group)
and of DSQ (greedy binarisation + 15 ALS rounds), both without error feedback. It says where DSQ's
non-uniform levels can help before any calibration enters.

    python benchmarks/dsq_error.py        # about 2 minutes on 2 cores

Writes benchmarks/results/dsq_error.{json,md}.
"""

from __future__ import annotations

import json
import statistics

import torch
from common import RESULTS
from tqdm.auto import tqdm

from quant import load_model
from quant.methods.dsq import dsq_dequantize, fit_dsq
from quant.numerics.grid import QuantSpec, quantize_rtn

GROUP = 64


def rel_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float(((w_hat.float() - w) ** 2).sum() / (w**2).sum())


def dsq_reconstruct(w: torch.Tensor, bits: int) -> torch.Tensor:
    parts = []
    for g in range(0, w.shape[1], GROUP):
        params, codes = fit_dsq(w[:, g : g + GROUP], bits)
        parts.append(dsq_dequantize(codes, params.r, params.c))
    return torch.cat(parts, 1)


def main() -> None:
    lm = load_model()
    rows = []
    for i, block in enumerate(tqdm(lm.model.model.layers, desc="down_proj", unit="block")):
        w = block.mlp.down_proj.weight.detach().float()
        for bits in (3, 2):
            uniform = quantize_rtn(w, QuantSpec(bits, GROUP, sym=False, clip="mse")).dequantize()
            dsq = dsq_reconstruct(w, bits)
            rows.append({"block": i, "bits": bits, "uniform": rel_error(w, uniform), "dsq": rel_error(w, dsq)})
    (RESULTS / "dsq_error.json").write_text(json.dumps({"group_size": GROUP, "rows": rows}, indent=1) + "\n")
    lines = [
        "# DSQ vs uniform grid, weight error of every down_proj (SmolLM2-135M, group 64, no data)",
        "",
        "Relative error ‖W − Ŵ‖² / ‖W‖², round-to-nearest, no error feedback (`python benchmarks/dsq_error.py`).",
        "",
        "| bits | uniform asym + MSE clip (mean) | DSQ (mean) | DSQ / uniform (median) | blocks where DSQ is lower |",
        "|---|---|---|---|---|",
    ]
    for bits in (3, 2):
        rs = [r for r in rows if r["bits"] == bits]
        ratio = statistics.median(r["dsq"] / r["uniform"] for r in rs)
        wins = sum(r["dsq"] < r["uniform"] for r in rs)
        lines.append(
            f"| {bits} | {statistics.mean(r['uniform'] for r in rs):.4f} | {statistics.mean(r['dsq'] for r in rs):.4f} "
            f"| {ratio:.3f} | {wins}/{len(rs)} |"
        )
    (RESULTS / "dsq_error.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
