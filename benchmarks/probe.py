"""Quick probes on the first 32 WikiText-2 windows, for design choices before a full benchmark run.

Each probe quantizes a fresh SmolLM2-135M and records perplexity on the first --max-windows windows
(32 tracks the full split within 1-5 %), the quantization wall time and the bits per weight, into
benchmarks/results/probe.{json,md}. Not a substitute for the full-split benchmarks.

    python benchmarks/probe.py --only nsds-2.5-odds nsds-2.5-score d2quant-w3
"""

from __future__ import annotations

import torch
from common import RESULTS, bench_args, load_results, ppl_first, run_setting, run_settings, save_results
from common import meta as common_meta

from calibrate import calibration_windows
from quant import AllocationConfig, GPTQConfig, load_model
from quant.allocation import allocate
from quant.allocation_plot import plot_allocation
from quant.d2quant import D2QuantConfig
from quant.perplexity import tokenize_eval
from quant.rotation import RotationConfig

PROBES = {  # name -> (calibration source, steps)
    "nsds-2.5-odds": ("c4-all", [("allocate", AllocationConfig(budget=2.5)), ("gptq", GPTQConfig(bits=4))]),
    "nsds-2.5-score": (
        "c4-all",
        [("allocate", AllocationConfig(budget=2.5, importance="score")), ("gptq", GPTQConfig(bits=4))],
    ),
    "nsds-3.0-score": (
        "c4-all",
        [("allocate", AllocationConfig(budget=3.0, importance="score")), ("gptq", GPTQConfig(bits=4))],
    ),
    "d2quant-w3": ("c4", [("rotate", RotationConfig()), ("d2quant", D2QuantConfig(bits=3))]),
}


def write_markdown(results: dict, meta: dict) -> None:
    lines = [
        "# Probes: SmolLM2-135M-Instruct, first WikiText-2 windows",
        "",
        f"fp32 on CPU ({meta['cpu']}), torch {meta['torch']}. Calibration: {meta['calibration']}.",
        "",
        "| probe | calibration | windows | perplexity | bits/weight | quantize wall (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['calibration']} | {r['ppl']['windows']} | {ppl_first(r, r['ppl']['windows']):.2f} "
            f"| {r['sizes']['bits_per_weight']} | {r['quantize_seconds']} |"
        )
    (RESULTS / "probe.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    args = bench_args(__doc__, only_choices=list(PROBES)).parse_args()
    args.max_windows = args.max_windows or 32
    out_json, results, meta = load_results("probe")
    meta = meta or common_meta(f"per probe (see table), {args.nsamples} x {args.seqlen} tokens, seed 0")
    if args.report_only:
        write_markdown(results, meta)
        return
    torch.manual_seed(0)
    base = load_model()
    ids = tokenize_eval(base.tokenizer)
    calib = {
        src: calibration_windows(base.tokenizer, src, args.nsamples, args.seqlen, seed=0) for src in ("c4", "c4-all")
    }
    for b in (2.5, 3.0):  # refresh the maps with the current plotting code
        plot_allocation(allocate(base.model, AllocationConfig(budget=b)), RESULTS / f"allocation-nsds-{b}.png")
    del base

    def measure(name: str) -> dict:
        src, steps = PROBES[name]
        r, _ = run_setting(steps, calib[src], ids, args.max_windows, name)
        r["calibration"] = src
        print(f"{name}: ppl {r['ppl']['ppl']:.3f} in {r['quantize_seconds']} s", flush=True)
        return r

    def save() -> None:
        save_results(out_json, meta, results)
        write_markdown(results, meta)

    run_settings(args.only or list(PROBES), results, args, measure, save)


if __name__ == "__main__":
    main()
