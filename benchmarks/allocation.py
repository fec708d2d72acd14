"""NSDS bit allocation against uniform and random allocations, GPTQ as the quantizer, SmolLM2-135M.

Budgets 2.5 and 3.0 average bits (storage-matched: see quant/methods/allocation.py). For each budget:
NSDS (defaults: module granularity, score importance, measured RTN error), uniform (3.0 only: 2.5
is no single width), and five random allocations that shuffle NSDS's widths among linears of the
same shape (same mix, same bytes). Every setting quantizes a fresh float model with GPTQ
(defaults of `quantize model`), saves and reloads the checkpoint (logits must be identical), and
measures WikiText-2 perplexity on the full test split.

    python benchmarks/allocation.py                    # everything, ~19 min per setting on 2 cores
    python benchmarks/allocation.py --max-windows 4    # quick look

Results are written after every setting to benchmarks/results/allocation.{json,md}; a rerun skips
settings already measured with the same window count. Allocation maps go to
benchmarks/results/allocation-nsds-<budget>.png.
"""

from __future__ import annotations

import statistics
import time

from common import RESULTS, eval_and_calibration, open_bench, ppl_first, run_setting, setup_line

from quant import AllocationConfig, GPTQConfig
from quant.methods.allocation import allocate
from quant.methods.allocation_plot import plot_allocation

BUDGETS = (3.0, 2.5)
SEEDS = range(5)


def settings() -> dict[str, AllocationConfig]:
    out = {}
    for b in BUDGETS:
        out[f"nsds-{b}"] = AllocationConfig(budget=b)
        if b == int(b):
            out[f"uniform-{b}"] = AllocationConfig(budget=b, allocator="uniform")
    for s in SEEDS:  # interleaved so a partial run still covers both budgets
        for b in BUDGETS:
            out[f"random-{b}-s{s}"] = AllocationConfig(budget=b, allocator="random", seed=s)
    for b in BUDGETS:  # ablation: one width per block, odds importance, ideal 4^-b error (the first rule we tried)
        out[f"nsds-layer-odds-ideal-{b}"] = AllocationConfig(
            budget=b, granularity="layer", importance="odds", error_model="ideal"
        )
    return out


def write_markdown(results: dict, meta: dict) -> None:
    lines = [
        "# NSDS vs uniform vs random bit allocation: SmolLM2-135M-Instruct, GPTQ, WikiText-2 raw test",
        "",
        f"{setup_line(meta)} NSDS allocation of the whole model (scores, RTN errors, knapsack; "
        f"no data): {meta.get('nsds_allocate_seconds_3.0')} s. "
        "GPTQ defaults (asymmetric, MSE clip, act-order, damping 0.01); "
        "group 128 requested (576-input layers use 64). Bits per weight count packed codes, fp16 scales "
        "and uint8 zeros of every quantized linear.",
        "",
        "| setting | units at 2/3/4 bits | bits/weight | ppl (full split) | ppl (first 32 windows) "
        "| quantize (s) | reload identical |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        u = r["allocation"]["units_per_width"]
        mix = "/".join(str(u.get(str(b), 0)) for b in (2, 3, 4))
        lines.append(
            f"| {name} | {mix} | {r['sizes']['bits_per_weight']} | {r['ppl']['ppl']:.2f} "
            f"({r['ppl']['windows']}/{r['ppl']['total_windows']}) | {ppl_first(r):.2f} | {r['quantize_seconds']} "
            f"| {r['reload_identical']} |"
        )
    lines += ["", "## Summary", ""]
    for b in BUDGETS:
        ns = results.get(f"nsds-{b}")
        if not ns:
            continue
        row = f"- budget {b}: NSDS {ns['ppl']['ppl']:.2f}"
        uni = results.get(f"uniform-{b}")
        if uni:
            row += f"; uniform {uni['ppl']['ppl']:.2f}"
        rnd = [r["ppl"]["ppl"] for n, r in results.items() if n.startswith(f"random-{b}-")]
        if rnd:
            row += (
                f"; random ({len(rnd)} draws) mean {statistics.mean(rnd):.2f}, best {min(rnd):.2f}, "
                f"worst {max(rnd):.2f}"
            )
        lines.append(row)
    (RESULTS / "allocation.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    calibration = "c4-all (the whole bundled sample), {nsamples} x {seqlen} tokens, seed 0"
    args, meta, run = open_bench("allocation", __doc__, calibration, write_markdown)
    base, ids, calib = eval_and_calibration(args, ("c4-all",))
    for b in BUDGETS:
        t0 = time.perf_counter()
        alloc = allocate(base.model, AllocationConfig(budget=b))  # NSDS scores + RTN errors + knapsack, no data
        meta[f"nsds_allocate_seconds_{b}"] = round(time.perf_counter() - t0, 2)
        plot_allocation(alloc, RESULTS / f"allocation-nsds-{b}.png")
    del base
    todo = settings()

    def measure(name: str) -> dict:
        steps = [("allocate", todo[name]), ("gptq", GPTQConfig(bits=4))]  # every module's bits come from allocate
        r, _ = run_setting(steps, calib["c4-all"], ids, args.max_windows or None, name)
        r["allocation"] = r["passes"][0]["summary"]
        r["allocation"].pop("nsds", None)
        print(f"{name}: ppl {r['ppl']['ppl']:.3f} (first 32 windows {ppl_first(r):.3f})", flush=True)
        return r

    run(args.only or list(todo), measure)


if __name__ == "__main__":
    main()
