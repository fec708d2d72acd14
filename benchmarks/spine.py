"""Spine benchmark: float vs RTN vs GPTQ at 4 and 3 bits on the embedded SmolLM2-135M.

For each setting: quantize (wall time), save the checkpoint (size on disk, bytes of the quantized
linears against their fp16 bytes), reload it (logits must be identical), and measure WikiText-2
perplexity with the standard protocol (full test split unless --max-windows).

    python benchmarks/spine.py                      # full split, ~75 min on 2 CPU cores
    python benchmarks/spine.py --max-windows 4      # quick look

Results are written after every setting to benchmarks/results/spine.json and spine.md; a rerun
skips settings already measured with the same window count (use --force to redo them).
"""

from __future__ import annotations

import torch
from common import RESULTS, bench_args, common_meta, load_results, run_setting, run_settings, save_results

from calibrate import calibration_windows
from quant import GPTQConfig, RTNConfig, load_model
from quant.runtime.perplexity import tokenize_eval

# Pairs first (the comparison that matters), the float reference last.
SETTINGS = {
    "rtn-w3-g128": ("rtn", RTNConfig(bits=3, group_size=128, clip="mse")),
    "gptq-w3-g128": ("gptq", GPTQConfig(bits=3, group_size=128)),
    "rtn-w4-g128": ("rtn", RTNConfig(bits=4, group_size=128, clip="mse")),
    "gptq-w4-g128": ("gptq", GPTQConfig(bits=4, group_size=128)),
    "float": None,
}
# Ablations, run with --only: the clipping choice of the group range.
EXTRA = {
    "rtn-w3-g128-minmax": ("rtn", RTNConfig(bits=3, group_size=128, clip="minmax")),
    "rtn-w4-g128-minmax": ("rtn", RTNConfig(bits=4, group_size=128, clip="minmax")),
    "gptq-w3-g128-minmax": ("gptq", GPTQConfig(bits=3, group_size=128, clip="minmax")),
}


def write_markdown(results: dict, meta: dict, tag: str) -> None:
    lines = [
        f"# Benchmark `{tag}`: SmolLM2-135M-Instruct, WikiText-2 raw test perplexity",
        "",
        f'Protocol: test split joined with "\\n\\n", tokenized once, non-overlapping {meta["seqlen"]}-token '
        f"windows, ppl = exp(mean window NLL). fp32 on CPU ({meta['cpu']}). torch {meta['torch']}, "
        f"transformers {meta['transformers']}. Calibration: {meta['calibration']}.",
        "",
        "Group 128 requested: layers with 576 inputs (q/k/v/o/gate/up) use group 64, down_proj (1536 inputs) "
        "uses 128. Every q/k/v/o/gate/up/down is quantized (asymmetric, integer zero-point, MSE clip "
        "search unless the setting says minmax); "
        "embeddings, norms and lm_head stay fp32. GPTQ: act-order, damping 0.01, sequential q/k/v, o, gate/up, down.",
        "",
        "| setting | windows | perplexity | quantize wall (s) | weights on disk (MiB) "
        "| quantized linears / their fp16 bytes | reload logits identical |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        p, s = r["ppl"], r.get("sizes")
        cells = [name, f"{p['windows']}/{p['total_windows']}", f"{p['ppl']:.2f}", str(r.get("quantize_seconds", "-"))]
        if s:
            cells += [f"{s['checkpoint_bytes'] / 2**20:.1f}", f"{s['ratio_to_fp16']:.3f}", str(r["reload_identical"])]
        else:
            cells += ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    (RESULTS / f"{tag}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = bench_args(__doc__, only_choices=[*SETTINGS, *EXTRA])
    ap.add_argument("--tag", default="spine", help="results go to benchmarks/results/<tag>.json and .md")
    args = ap.parse_args()
    out_json, results, meta = load_results(args.tag)
    if args.report_only:
        write_markdown(results, meta, args.tag)
        return
    meta = common_meta(f"c4-all (the whole bundled sample), {args.nsamples} x {args.seqlen} tokens, seed 0")

    torch.manual_seed(0)
    base = load_model()
    ids = tokenize_eval(base.tokenizer)
    calib = calibration_windows(base.tokenizer, "c4-all", args.nsamples, args.seqlen, seed=0)
    every = {**SETTINGS, **EXTRA}

    def measure(name: str) -> dict:
        step = every[name]
        r, _ = run_setting([step] if step else [], calib, ids, args.max_windows or None, name)
        print(f"{name}: ppl {r['ppl']['ppl']:.3f}")
        return r

    def save() -> None:
        save_results(out_json, meta, results)
        write_markdown(results, meta, args.tag)

    run_settings(args.only or list(SETTINGS), results, args, measure, save)


if __name__ == "__main__":
    main()
