"""The block pass's variants compared on calibration text only: held-out block error on the first few blocks.

SmolLM2-135M cut to its first ``--blocks`` (4) blocks, the best 3-bit recipe's start (Hadamard rotation with the
down and head Hadamards, D²Quant w3 g64 without DSQ, 8-bit scales; ``--bits 4`` for 4 bits), then
``--finetune block`` in bf16 with the scales alone or with the rounding too (and, with vector codes ``vq3`` at
group 96, the scales alone or with each layer's entries too: ``--finetune-levels``), on the benchmarks' 128 x 512 C4
calibration windows. Per variant: each block's held-out error (the pass's own measurement on the 16 held-out
windows: quantized block on the quantized stream against the float block on the float stream) before and after
tuning, and the wall time. A block's error carries the earlier blocks' tuning (the quantized stream goes through
them), so the last block's is the one to compare. No evaluation text is touched: this is where the block pass's
settings are chosen.

    python benchmarks/block_finetune.py      # about 5 minutes on 2 cores per bit width

Writes benchmarks/results/block_finetune.{json,md}; rows already measured are skipped.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from common import RESULTS, common_meta, load_results, save_results, setup_line
from torch import nn

from calibrate import calibration_windows
from quant import QuantContext, load_model, run_pipeline
from quant.methods.d2quant import D2QuantConfig
from quant.methods.finetune import FinetuneConfig
from quant.methods.rotation import RotationConfig

BASE = FinetuneConfig(mode="block", dtype="bf16")
UNIFORM = {"group_size": 64}
VQ3 = {"group_size": 96, "codebook": "vq3"}  # vector codes (3 bits only): each layer's 512 entries of 3 weights
# name: (the quantizer's settings, the block pass's); a name's "-scales" sibling is its reference
VARIANTS = {"scales": (UNIFORM, BASE), "rounding": (UNIFORM, replace(BASE, rounding=True)),
            "vq3g96-scales": (VQ3, BASE), "vq3g96-levels": (VQ3, replace(BASE, levels=True))}


def write_markdown(results: dict, meta: dict) -> None:
    lines = [
        "# Block pass variants: held-out block error on the first blocks (SmolLM2-135M-Instruct, calibration only)",
        "",
        setup_line(meta) + " Hadamard rotation with the down and head Hadamards, D²Quant g64 (vq3 rows: vector "
        "codes, g96) without DSQ, 8-bit scales, then `--finetune block` in bf16 (50 steps of 4 windows). Error: "
        "mean squared error of the block's output on the 16 held-out calibration windows, before -> after tuning; "
        "each block's starts from the earlier blocks as tuned.",
        "",
        "| bits | variant | error per block, before -> after | last block against the scales alone | wall (s) |",
        "|---|---|---|---|---|",
    ]
    for _, r in sorted(results.items()):
        stem = r["variant"].rpartition("-")[0]
        ref = results.get(f"w{r['bits']}-{stem + '-' if stem else ''}scales")
        vs = f"{100 * (r['after'][-1] / ref['after'][-1] - 1):+.1f}%" if ref else "-"
        blocks = "; ".join(f"{b:.4f} -> {a:.4f}" for b, a in zip(r["before"], r["after"], strict=True))
        lines.append(f"| {r['bits']} | {r['variant']} | {blocks} | {vs} | {r['seconds']:.0f} |")
    (RESULTS / "block_finetune.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[3], help="weight widths to compare at (3, 4)")
    ap.add_argument("--blocks", type=int, default=4, help="first blocks of the model kept")
    ap.add_argument("--force", action="store_true", help="re-measure rows already in the results")
    args = ap.parse_args()
    path, results, meta = load_results("block_finetune")
    meta = meta or common_meta("c4 (bundled), 128 x 512 tokens, seed 0")
    for bits in args.bits:
        for variant, (quantizer, cfg) in VARIANTS.items():
            key = f"w{bits}-{variant}"
            if quantizer.get("codebook") == "vq3" and bits != 3:
                continue
            if key in results and not args.force:
                print(f"{key}: already measured, skipping")
                continue
            lm = load_model()
            lm.model.model.layers = nn.ModuleList(lm.model.model.layers[: args.blocks])
            lm.model.config.num_hidden_layers = args.blocks
            calib = calibration_windows(lm.tokenizer, "c4", 128, 512, seed=0)
            ctx = QuantContext(lm.model, lm.tokenizer, calib_ids=calib, progress=False)
            steps = [("rotate", RotationConfig(mode="hadamard", down_hadamard=True, head_hadamard=True)),
                     ("d2quant", D2QuantConfig(bits=bits, dsq=False, scale_bits=8, **quantizer)),
                     ("finetune", cfg)]
            t0 = time.perf_counter()
            records = run_pipeline(ctx, steps)
            s = next(p["summary"] for p in records if p["name"] == "finetune")
            results[key] = {"bits": bits, "variant": variant, "blocks": args.blocks,
                            "before": s["held_loss_before"], "after": s["held_loss_after"],
                            "steps_run": s["steps_run"], "seconds": round(time.perf_counter() - t0, 1)}
            print(key, results[key], flush=True)
            save_results(path, meta, results)
            write_markdown(results, meta)


if __name__ == "__main__":
    main()
