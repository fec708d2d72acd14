"""The end-to-end distillation computed in fp32 against bf16 (``--finetune-dtype``), from the same solver output.

SmolLM2-135M, RTN w3 g64 with 8-bit scales (the cheapest solver: the comparison is of the training loop, not of
the start), then ``--finetune e2e`` for a few steps of 2 windows in each dtype, same seed and windows. Per dtype:
the finetune pass's wall time, the held-out KL curve as the pass measured it (in its own dtype), and the KL to the
float model per token measured afterwards in fp32 on 8 windows of WikiText-2 *validation* (text no pass saw).

    python benchmarks/finetune_dtype.py      # about 12 minutes on 2 cores

Writes benchmarks/results/finetune_dtype.{json,md}; rows already measured are skipped.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import RESULTS, common_meta, load_results, save_results, setup_line
from torch.nn import functional as F

from calibrate import calibration_windows
from quant import QuantContext, load_model, run_pipeline
from quant.methods.finetune import DTYPES, FinetuneConfig
from quant.methods.quantizers import RTNConfig

STEPS = 20


def kl_to_float(model, ref_logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean KL(float || quantized) per token, in fp32, window by window."""
    total = 0.0
    with torch.no_grad():
        for row, ref in zip(ids, ref_logits, strict=True):
            s = F.log_softmax(model(row[None]).logits[0].float(), -1)
            total += float(F.kl_div(s, F.log_softmax(ref, -1), log_target=True, reduction="sum"))
    return total / ids.numel()


def write_markdown(results: dict, meta: dict) -> None:
    lines = [
        "# End-to-end distillation: fp32 against bf16 compute (SmolLM2-135M-Instruct, RTN w3 g64, 8-bit scales)",
        "",
        setup_line(meta) + f" {STEPS} end-to-end steps of 2 windows from the same RTN output; held-out KL: the "
        "pass's own measurement on 16 held-out calibration windows (in its dtype); KL on WikiText-2 valid: "
        "measured afterwards in fp32 on 8 windows of 512 tokens (the RTN start: see the first row).",
        "",
        "| compute | finetune wall (s) | held-out KL, start -> best | KL on WikiText-2 valid |",
        "|---|---|---|---|",
    ]
    if "rtn" in results:
        lines.append(f"| RTN alone | - | - | {results['rtn']['kl_valid']:.4f} |")
    for d in DTYPES:
        if d in results:
            r = results[d]
            lines.append(f"| {d} | {r['finetune_seconds']:.1f} | {r['held'][0]:.4f} -> {r['held_best']:.4f} | "
                         f"{r['kl_valid']:.4f} |")
    if all(d in results for d in DTYPES):
        a, b = results["fp32"], results["bf16"]
        lines += ["", f"bf16 / fp32 finetune wall: {b['finetune_seconds'] / a['finetune_seconds']:.2f}; "
                      f"KL on WikiText-2 valid, bf16 / fp32: {b['kl_valid'] / a['kl_valid']:.3f}."]
    (RESULTS / "finetune_dtype.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="re-measure rows already in the results")
    args = ap.parse_args()
    path, results, meta = load_results("finetune_dtype")
    meta = meta or common_meta("c4 (bundled), 128 x 512 tokens, seed 0")
    base = load_model()
    calib = calibration_windows(base.tokenizer, "c4", 128, 512, seed=0)
    valid = calibration_windows(base.tokenizer, "wikitext2-valid", 8, 512, seed=1)
    with torch.no_grad():
        ref = torch.stack([base.model(row[None]).logits[0].float() for row in valid])
    rtn = ("rtn", RTNConfig(bits=3, group_size=64, scale_bits=8))
    for name in ("rtn", *DTYPES):
        if name in results and not args.force:
            print(f"{name}: already measured, skipping")
            continue
        model = load_model().model
        ctx = QuantContext(model, base.tokenizer, calib_ids=calib)
        ft = [("finetune", FinetuneConfig(mode="e2e", e2e_steps=STEPS, dtype=name))] if name != "rtn" else []
        t0 = time.perf_counter()
        records = run_pipeline(ctx, [rtn, *ft])
        r = {"seconds": round(time.perf_counter() - t0, 1), "kl_valid": kl_to_float(model, ref, valid)}
        if ft:
            e2e = records[1]["summary"]["e2e"]
            r |= {"finetune_seconds": e2e["seconds"], "held": e2e["held"], "held_best": e2e["held_best"]}
        results[name] = r
        print(name, r, flush=True)
        save_results(path, meta, results)
        write_markdown(results, meta)


if __name__ == "__main__":
    main()
