"""Quick probes on the first 32 WikiText-2 windows, for design choices before a full benchmark run.

Each probe quantizes a fresh SmolLM2-135M and records perplexity on the first --max-windows windows
(32 tracks the full split within 1-5 %), the quantization wall time and the bits per weight, into
benchmarks/results/probe.{json,md}. Not a substitute for the full-split benchmarks.

    python benchmarks/probe.py --only nsds-2.5-odds nsds-2.5-score d2quant-w3
"""

from __future__ import annotations

from common import RESULTS, eval_and_calibration, open_bench, ppl_first, run_setting

from quant import AllocationConfig, GPTQConfig
from quant.methods.allocation import allocate
from quant.methods.allocation_plot import plot_allocation
from quant.methods.d2quant import D2QuantConfig
from quant.methods.rotation import RotationConfig

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
    "nsds-3.0-score-module-rtnerr": (
        "c4-all",
        [
            ("allocate", AllocationConfig(budget=3.0, importance="score", granularity="module", error_model="rtn")),
            ("gptq", GPTQConfig(bits=4)),
        ],
    ),
    "nsds-2.5-score-module-rtnerr": (
        "c4-all",
        [
            ("allocate", AllocationConfig(budget=2.5, importance="score", granularity="module", error_model="rtn")),
            ("gptq", GPTQConfig(bits=4)),
        ],
    ),
    # as its recorded row ran: float-teacher DAC was then the default
    "d2quant-w3": (
        "c4",
        [("rotate", RotationConfig()), ("d2quant", D2QuantConfig(bits=3, dac=True, dac_teacher="float"))],
    ),
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
    calibration = "per probe (see table), {nsamples} x {seqlen} tokens, seed 0"
    args, _, run = open_bench("probe", __doc__, calibration, write_markdown, list(PROBES), default_windows=32)
    base, ids, calib = eval_and_calibration(args, ("c4", "c4-all"))
    for b in (2.5, 3.0):  # refresh the maps with the current plotting code
        plot_allocation(allocate(base.model, AllocationConfig(budget=b)), RESULTS / f"allocation-nsds-{b}.png")
    del base

    def measure(name: str) -> dict:
        src, steps = PROBES[name]
        r, _ = run_setting(steps, calib[src], ids, args.max_windows, name)
        r["calibration"] = src
        print(f"{name}: ppl {r['ppl']['ppl']:.3f} in {r['quantize_seconds']} s", flush=True)
        return r

    run(args.only or list(PROBES), measure)


if __name__ == "__main__":
    main()
