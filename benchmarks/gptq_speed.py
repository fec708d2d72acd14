"""GPTQ speed against llm-compressor, side by side in one run, same machine, same calibration tokens.

SmolLM2-135M (fp32), GPTQ W3 asymmetric, group 64 (llm-compressor refuses 128 on 576-wide inputs), the same
128 x 512 windows of the bundled C4 (``calibration_windows(tok, "c4", 128, 512, seed=0)``, written to a file
that the peer's script reads). Each row is a separate process, one at a time:

- ``ours``: ``quantize model --method gptq --bits 3 --group-size 64 --no-eval`` (its ``quantize_seconds`` is
  the pipeline alone: calibration capture, every block's forward and solve; wall and peak RSS of the process too);
- ``llm-compressor``: ``oneshot(...)`` with ``GPTQModifier`` W3 asym g64 (timed around the call alone), run in
  its own venv (``--llmc-python``; llmcompressor 0.14.0.1 pins transformers <= 5.17), as peers2.md did.

Rows already measured are skipped; ``--rows`` picks some. Results: ``benchmarks/results/gptq_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

PEER = r"""
import json, sys, time, torch
from safetensors.torch import load_file
from datasets import Dataset
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier

model_dir, ids_file = sys.argv[1], sys.argv[2]
ids = load_file(ids_file)["ids"]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
recipe = GPTQModifier(ignore=["lm_head"], config_groups={"group_0": {"targets": ["Linear"], "weights": {
    "num_bits": 3, "type": "int", "symmetric": False, "strategy": "group", "group_size": 64}}})
t0 = time.perf_counter()
oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=ids.shape[1], num_calibration_samples=ids.shape[0])
print(json.dumps({"quantize_seconds": round(time.perf_counter() - t0, 1)}))
"""


def timed(cmd: list[str], log: Path, env: dict) -> dict:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    text = log.read_text(errors="replace")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    out = {"exit": r.returncode, "wall_s": round(time.perf_counter() - t0, 1),
           "peak_rss_gib": round(int(rss.group(1)) / 2**20, 3) if rss else None}  # fmt: skip
    found = re.findall(r'\{"quantize_seconds": [0-9.]+\}', text)
    if found:
        out.update(json.loads(found[-1]))
    if r.returncode:
        out["tail"] = text.strip().splitlines()[-20:]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llmc-python", default=str(Path("/work/peers/venv_llmc/bin/python")))
    ap.add_argument("--rows", default="ours,eval-ours,llm-compressor")
    args = ap.parse_args()
    import torch
    from safetensors.torch import save_file

    from calibrate import calibration_windows
    from quant.formats.models import embedded_model_dir, load_model

    model_dir = embedded_model_dir()
    work = Path(tempfile.gettempdir()) / "lowbit-gptq-speed"
    work.mkdir(exist_ok=True)
    ids = calibration_windows(load_model().tokenizer, "c4", 128, 512, seed=0)
    save_file({"ids": ids.contiguous()}, str(work / "ids.safetensors"))
    (work / "peer.py").write_text(PEER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"}
    out_json = RESULTS / "gptq_speed.json"
    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    commands = {
        "ours": [sys.executable, "-c", "import cli; cli.main()", "model", "--method", "gptq", "--bits", "3",
                 "--group-size", "64", "--no-eval", "--out", str(work / "ours"), "--device", "cpu"],
        "eval-ours": [sys.executable, "-c", "import cli; cli.main()", "eval", str(work / "ours"), "--max-windows", "16",
                      "--json", str(work / "eval.json")],
        "llm-compressor": [args.llmc_python, str(work / "peer.py"), str(model_dir), str(work / "ids.safetensors")],
    }  # fmt: skip
    for row in args.rows.split(","):
        if results.get(row, {}).get("exit") == 0:
            print(f"{row}: measured already")
            continue
        print(f"{row} ...", flush=True)
        results[row] = timed(commands[row], work / f"{row}.log", env)
        if row == "ours" and results[row]["exit"] == 0:
            report = json.loads((work / "ours" / "quant_report.json").read_text())
            results[row]["quantize_seconds"] = report["quantize_seconds"]
        if row == "eval-ours" and results[row]["exit"] == 0:
            results[row]["wikitext2_ppl_16_windows"] = json.loads((work / "eval.json").read_text())["ppl"]
        results[row]["machine"] = f"{os.cpu_count()} cores, torch {torch.__version__}, no GPU"
        print(row, json.dumps(results[row]), flush=True)
        out_json.write_text(json.dumps(results, indent=2))
    lines = ["# GPTQ W3 g64 on SmolLM2-135M: ours against llm-compressor 0.14.0.1 (benchmarks/gptq_speed.py)", "",
             "Same 128 x 512 C4 calibration tokens, one process at a time, 2 threads.", "",
             "| row | quantize s | process wall s | peak RSS GiB |", "|---|---:|---:|---:|"]  # fmt: skip
    for row, r in results.items():
        if row.startswith("eval"):
            lines.append(f"| {row}: WikiText-2 ppl, first 16 windows = {r.get('wikitext2_ppl_16_windows')} | | "
                         f"{r['wall_s']} | {r['peak_rss_gib']} |")
        else:
            lines.append(f"| {row} | {r.get('quantize_seconds')} | {r['wall_s']} | {r['peak_rss_gib']} |")
    if "ours" in results and "llm-compressor" in results:
        a, b = results["ours"].get("quantize_seconds"), results["llm-compressor"].get("quantize_seconds")
        if a and b:
            lines += ["", f"Ours / llm-compressor, quantize time: {a / b:.2f}x."]
    (RESULTS / "gptq_speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
