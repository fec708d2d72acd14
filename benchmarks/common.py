"""What every benchmark does per setting: quantize, save, reload-check, measure perplexity."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from calibrate import calibration_windows
from quant import QuantContext, load_model, load_quantized, run_pipeline, save_quantized
from quant.runtime.perplexity import perplexity, tokenize_eval
from quant.runtime.quantlinear import quantized_sizes

CALIBRATION = "c4 (bundled, disjoint from the C4 evaluation slice), {nsamples} x {seqlen} tokens"


def common_meta(calibration: str) -> dict:
    return {
        "model": "SmolLM2-135M-Instruct (embedded GGUF Q4_1, dequantized to fp32)",
        "seqlen": 2048,
        "cpu": f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "calibration": calibration,
    }


def setup_line(meta: dict) -> str:
    """The sentence every results table opens with: where it ran and on what calibration text."""
    return (
        f"fp32 on CPU ({meta['cpu']}), torch {meta['torch']}, transformers {meta['transformers']}. "
        f"Calibration: {meta['calibration']}."
    )


def bits_per_weight(r: dict) -> float:
    """A measured setting's bits per weight with every scale counted (16 for the float model)."""
    return r["sizes"]["bits_per_weight"] if r.get("sizes") else 16


def run_setting(
    steps: list[tuple[str, object]],
    calib: torch.Tensor,
    ids: torch.Tensor,
    max_windows: int | None,
    desc: str,
    extra_evals: dict[str, tuple[torch.Tensor, int | None, str]] | None = None,
) -> tuple[dict, QuantContext | None]:
    """Quantize a fresh float model with ``steps`` (none: the float reference) and measure it: WikiText-2
    perplexity under ``r["ppl"]``, and each ``extra_evals[key] = (ids, max_windows, dataset)`` under ``r[key]``."""
    lm = load_model()
    r: dict = {}
    ctx = None
    if steps:
        ctx = QuantContext(lm.model, lm.tokenizer, calib_ids=calib)
        t0 = time.perf_counter()
        r["passes"] = run_pipeline(ctx, steps)
        r["quantize_seconds"] = round(time.perf_counter() - t0, 1)
        probe = ids[:128][None]
        with tempfile.TemporaryDirectory() as tmp:
            qc = {"method": steps[-1][0], "modules": ctx.modules, "norm_biases": ctx.norm_biases}
            ckpt = save_quantized(lm.model, lm.tokenizer, Path(tmp) / "ckpt", qc)
            on_disk = sum(f.stat().st_size for f in ckpt.iterdir() if f.suffix == ".safetensors")
            r["sizes"] = {"checkpoint_bytes": on_disk, **quantized_sizes(lm.model)}
            reloaded, _ = load_quantized(ckpt)
            with torch.no_grad():
                r["reload_identical"] = bool(torch.equal(lm.model(probe).logits, reloaded(probe).logits))
            del reloaded
    r["ppl"] = perplexity(lm.model, ids, max_windows=max_windows, desc=desc)
    for key, (eval_ids, n, dataset) in (extra_evals or {}).items():
        r[key] = perplexity(lm.model, eval_ids, max_windows=n, desc=f"{desc} {dataset}", dataset=dataset)
    return r, ctx


def c4_table(results: dict, order: list[str], extra: dict[str, Callable[[dict], str]] | None = None) -> list[str]:
    """The Markdown table of settings measured on WikiText-2 and the C4 slice (``run_calibrated_bench`` with
    ``c4_windows``), in ``order``; ``extra`` adds columns (header -> cell of a result) before the last one."""
    extra = extra or {}
    heads = ["setting", "WikiText-2 ppl", "C4 ppl", "bits/weight (all scales)", "quantize wall (s)", *extra,
             "reload identical"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for name in sorted(results, key=order.index):
        r = results[name]
        cells = [name, f"{r['ppl']['ppl']:.2f} ({r['ppl']['windows']}/{r['ppl']['total_windows']})",
                 f"{r['ppl_c4']['ppl']:.2f}", str(bits_per_weight(r)), str(r.get("quantize_seconds", "-")),
                 *(cell(r) for cell in extra.values()), str(r.get("reload_identical", "-"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def ppl_first(r: dict, n: int = 32) -> float:
    """Perplexity over the first ``n`` windows of a measured run (tracks the full split within 1-5%)."""
    nll = r["ppl"]["window_nll"][:n]
    return math.exp(sum(nll) / len(nll))


RESULTS = Path(__file__).parent / "results"


def bench_args(description: str, only_choices: list[str] | None = None) -> argparse.ArgumentParser:
    """The options every benchmark takes; a benchmark adds its own to the returned parser."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-windows", type=int, default=0, help="WikiText-2 windows (0 = the full test split, 148)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512, help="calibration window length")
    ap.add_argument("--force", action="store_true", help="re-measure settings already in the results")
    ap.add_argument("--report-only", action="store_true", help="rewrite the Markdown table from the JSON and exit")
    ap.add_argument("--only", nargs="+", choices=only_choices, help="run just these settings")
    return ap


def load_results(tag: str) -> tuple[Path, dict, dict | None]:
    """``benchmarks/results/<tag>.json``: (its path, the results so far, their meta or None)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{tag}.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    return path, doc.get("results", {}), doc.get("meta")


def save_results(path: Path, meta: dict, results: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    os.replace(tmp, path)


def already_measured(prev: dict | None, max_windows: int) -> bool:
    """A setting is skipped when measured before on the same number of windows."""
    return bool(prev) and prev["ppl"]["windows"] == (max_windows or prev["ppl"]["total_windows"])


def open_bench(
    tag: str,
    description: str,
    calibration: str,
    write_markdown: Callable[[dict, dict], None],
    only_choices: list[str] | None = None,
    default_windows: int = 0,
):
    """Parse the options, load ``results/<tag>.json``; on --report-only rewrite the table and exit.

    Returns ``(args, meta, run)`` where ``run(names, measure)`` measures each setting not measured yet
    and saves the JSON and Markdown after every one. ``calibration`` may use {nsamples} and {seqlen}.
    """
    args = bench_args(description, only_choices).parse_args()
    args.max_windows = args.max_windows or default_windows
    path, results, meta = load_results(tag)
    meta = meta or common_meta(calibration.format(nsamples=args.nsamples, seqlen=args.seqlen))
    if args.report_only:
        write_markdown(results, meta)
        raise SystemExit(0)
    torch.manual_seed(0)

    def save() -> None:
        save_results(path, meta, results)
        write_markdown(results, meta)

    def run(names: list[str], measure: Callable[[str], dict]) -> None:
        run_settings(names, results, args, measure, save)

    return args, meta, run


def eval_and_calibration(args, sources: tuple[str, ...]):
    """The float model, the tokenized WikiText-2 test text, and seeded calibration windows per source."""
    base = load_model()
    ids = tokenize_eval(base.tokenizer)
    calib = {src: calibration_windows(base.tokenizer, src, args.nsamples, args.seqlen, seed=0) for src in sources}
    return base, ids, calib


def run_settings(
    names: list[str], results: dict, args, measure: Callable[[str], dict], save: Callable[[], None]
) -> None:
    """Measure each named setting not measured yet, saving the results after every one."""
    for name in names:
        if not args.force and already_measured(results.get(name), args.max_windows):
            print(f"{name}: already measured, skipping")
            continue
        print(f"== {name}", flush=True)
        results[name] = measure(name)
        save()


def run_calibrated_bench(tag: str, description: str, todo: dict[str, list],
                         write_markdown: Callable[[dict, dict], None], c4_windows: int = 0,
                         calibration: dict[str, tuple[str, int, int]] | None = None) -> None:
    """The whole of a benchmark whose settings are recipes calibrated on C4: parse the options, then measure each
    setting not measured yet on WikiText-2 (and on the first ``c4_windows`` windows of the C4 evaluation slice
    when given, as ``r["ppl_c4"]``), saving after every one. ``calibration``: settings calibrated on other text or
    windows than ``c4`` ``--nsamples`` x ``--seqlen``, as (source, count, length) (drawn with the same seed;
    recorded as ``r["calibration_source"]``, ``r["calibration_windows"]`` and ``r["calibration_seqlen"]``)."""
    args, _, run = open_bench(tag, description, CALIBRATION, write_markdown, only_choices=list(todo))
    base, ids, calib = eval_and_calibration(args, ("c4",))
    extra = {"ppl_c4": (tokenize_eval(base.tokenizer, dataset="c4"), c4_windows, "c4")} if c4_windows else {}

    def measure(name: str) -> dict:
        source, n, seqlen = (calibration or {}).get(name, ("c4", args.nsamples, args.seqlen))
        own = (source, n, seqlen) != ("c4", args.nsamples, args.seqlen)
        calib_ids = calibration_windows(base.tokenizer, source, n, seqlen, seed=0, model=base.model) if own \
            else calib["c4"]
        r, _ = run_setting(todo[name], calib_ids, ids, args.max_windows or None, name, extra)
        r["calibration_source"], r["calibration_windows"], r["calibration_seqlen"] = source, n, seqlen
        c4 = f"  c4 {r['ppl_c4']['ppl']:.3f}" if extra else ""
        print(f"{name}: wikitext2 {r['ppl']['ppl']:.3f}{c4}  ({r.get('quantize_seconds', 0)} s)", flush=True)
        return r

    run(args.only or list(todo), measure)
