"""Does our GPTQ-format export load in another tool, with the same logits? (GPTQModel through transformers.)

Quantizes SmolLM2-135M to 4 bits (symmetric, group 64: the layout vLLM's Marlin path accepts; the
quantizer does not matter for the format, so RTN keeps this quick), saves our checkpoint, exports
it with `quantize export --format gptq`, then loads the export with
``transformers.AutoModelForCausalLM.from_pretrained`` (which hands GPTQ checkpoints to GPTQModel)
and compares its logits and perplexity with our ``load_quantized`` on the same WikiText-2 windows.

Needs a Python with ``gptqmodel`` and ``optimum`` installed (not a project dependency: GPTQModel
pins newer torch than CPU CI uses); writes benchmarks/results/gptq_interop.{json,md}.

    python benchmarks/gptq_interop.py --windows 4
    python benchmarks/gptq_interop.py --checkpoint out/default --windows 8 --name gptq_interop_default

``--checkpoint`` exports one of our checkpoints instead (for example the one `quantize model` writes with
its defaults: GPTQ w4 g128 asym, whose 576-wide layers get group 64 and travel as ``dynamic`` overrides).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=4, help="WikiText-2 windows of 2048 to compare on")
    ap.add_argument("--checkpoint", type=Path, help="our checkpoint to export (default: RTN w4 g64 sym, made here)")
    ap.add_argument("--name", default="gptq_interop", help="results file stem under benchmarks/results/")
    ap.add_argument("--checkpoint-format", default="gptq", help="gptq (v1) or gptq_v2 (asymmetric: GPTQModel "
                    "loads v1 asym only from its own files)")
    ap.add_argument("--loader", default="transformers", help="transformers (from_pretrained, through optimum: "
                    "ignores `dynamic`) or gptqmodel (GPTQModel.load with its TORCH backend, which applies it)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import gptqmodel
    import transformers
    from transformers import AutoModelForCausalLM

    from quant import QuantContext, RTNConfig, load_quantized, run_pipeline, save_quantized
    from quant.formats.models import load_model
    from quant.runtime.perplexity import perplexity, tokenize_eval

    lm = load_model()
    ids = tokenize_eval(lm.tokenizer)
    setting = "SmolLM2-135M-Instruct, RTN w4 g64 sym, fp32 on CPU"
    if args.checkpoint is None:
        ctx = QuantContext(lm.model, lm.tokenizer)
        run_pipeline(ctx, [("rtn", RTNConfig(bits=4, group_size=64, sym=True))])
    else:
        qc = json.loads((args.checkpoint / "config.json").read_text())["quantization_config"]
        setting = (f"SmolLM2-135M-Instruct, `quantize model` checkpoint: {qc['method']} w{qc['bits']} "
                   f"g{qc['group_size']} {'sym' if qc['sym'] else 'asym'}, fp32 on CPU")  # fmt: skip
    out: dict = {
        "setting": setting,
        "versions": {"gptqmodel": gptqmodel.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        ck = args.checkpoint or save_quantized(
            lm.model, lm.tokenizer, Path(tmp) / "ck", {"method": "rtn", "modules": ctx.modules}
        )
        gq = Path(tmp) / "gptq"
        r = subprocess.run(
            [sys.executable, "-c", "import cli; cli.main()", "export", str(ck), "--format", "gptq", "--out", str(gq),
             "--checkpoint-format", args.checkpoint_format],
            cwd=ROOT, capture_output=True, text=True, check=True,
        )  # fmt: skip
        out["export"] = r.stdout.strip()
        out["dynamic"] = json.loads((gq / "config.json").read_text())["quantization_config"].get("dynamic")
        ours, _ = load_quantized(ck)
        if args.loader == "gptqmodel":
            # GPTQModel's default CPU kernel (TorchFusedLinear) computes wrong outputs from gptq_v2 asymmetric
            # zero-points although its dequantize_weight() equals ours exactly (measured); its plain TORCH backend
            # is right. It loads in fp16 only; the model is then run in fp32 like ours.
            theirs = gptqmodel.GPTQModel.load(
                str(gq), device="cpu", dtype=torch.float16, backend=gptqmodel.BACKEND.TORCH
            ).model.float().eval()
        else:
            theirs = AutoModelForCausalLM.from_pretrained(gq, device_map="cpu", dtype=torch.float32).eval()
        out["loader"] = args.loader
        out["checkpoint_format"] = args.checkpoint_format
        kinds = sorted({type(m).__name__ for m in theirs.modules() if "QuantLinear" in type(m).__name__
                        or type(m).__module__.startswith("gptqmodel")})  # fmt: skip
        out["their_layer_classes"] = kinds
        x = ids[:2048][None]
        with torch.no_grad():
            a, b = ours(x).logits, theirs(x).logits
        out["logits"] = {
            "max_abs_diff": float((a - b).abs().max()),
            "rel_l2": float((a - b).norm() / a.norm()),
            "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
        }
        out["ppl_ours"] = perplexity(ours, ids, max_windows=args.windows, desc="ours")["ppl"]
        out["ppl_gptqmodel"] = perplexity(theirs, ids, max_windows=args.windows, desc="gptqmodel")["ppl"]
        out["windows"] = args.windows
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=2))
    lg = out["logits"]
    how = "GPTQModel.load" if args.loader == "gptqmodel" else "through transformers"
    (RESULTS / f"{args.name}.md").write_text(
        f"# GPTQ export loaded by GPTQModel ({how})\n\n"
        f"{out['setting']}; gptqmodel {out['versions']['gptqmodel']}, transformers {out['versions']['transformers']}, "
        f"torch {out['versions']['torch']}; export `{args.checkpoint_format}`, loaded with {args.loader}. "
        f"Their layers: {', '.join(kinds)}.\n\n"
        "| check | value |\n|---|---|\n"
        f"| logits max abs diff (one 2048-token window) | {lg['max_abs_diff']:.3g} |\n"
        f"| logits relative L2 diff | {lg['rel_l2']:.3g} |\n"
        f"| argmax agreement | {lg['argmax_agreement']:.4f} |\n"
        f"| WikiText-2 ppl, ours ({args.windows} windows) | {out['ppl_ours']:.4f} |\n"
        f"| WikiText-2 ppl, GPTQModel ({args.windows} windows) | {out['ppl_gptqmodel']:.4f} |\n"
        f"| relative difference | {out['ppl_gptqmodel'] / out['ppl_ours'] - 1:+.4%} |\n"
        f"| `dynamic` overrides in the export | {len(out['dynamic'] or {})} |\n"
    )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
