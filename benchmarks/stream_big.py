"""A model that does not fit: Llama-3-8B shapes, random weights, quantized by streaming on this machine.

The script writes a randomly initialised Llama-architecture model with Llama-3-8B's shapes (hidden 4096, MLP 14336,
32 layers, GQA 32/8 heads, vocabulary 128256, untied head) as bf16 safetensors shards (about 16 GB; its fp32
form, 32 GB, does not fit in 24 GiB of RAM), without ever holding more than one layer. Then, one process at a
time, each row runs the real command under ``/usr/bin/time -v`` and records wall time and peak RSS:

- ``quantize model DIR --stream --method rtn --bits 4``
- ``quantize model DIR --stream --method gptq --bits 4 --nsamples 8 --seqlen 256``
- ``quantize eval OUT --max-windows 1`` on each output (random weights: the perplexity means nothing; the run is
  the point: the checkpoint reloads and computes).

Rows already in the results file are skipped (resumable). A long row can be run in pieces (``--stop-after S``
kills it after S seconds; the same command resumes it from its last finished block): the row then sums the
pieces' wall times and keeps their largest peak RSS. Results: ``benchmarks/results/stream_big.{json,md}``.

    python benchmarks/stream_big.py [--work /path/with/50GB] [--rows rtn,gptq,eval-rtn,eval-gptq] [--stop-after S]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHAPES = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def make_model(path: Path) -> None:
    """Write the random model shard by shard (four layers per shard, the embeddings and head alone)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from quant.formats.models import embedded_model_dir
    from quant.formats.reader import load_tokenizer

    if (path / "model.safetensors.index.json").exists():
        return
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = LlamaConfig(**SHAPES, dtype="bfloat16", bos_token_id=1, eos_token_id=2)
    cfg.save_pretrained(tmp)
    load_tokenizer(embedded_model_dir()).save_pretrained(tmp)  # SmolLM2's ids (< 49152) are valid here
    g = torch.Generator().manual_seed(0)
    h, f, kv = SHAPES["hidden_size"], SHAPES["intermediate_size"], 8 * 128

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    weight_map, total = {}, 0

    def write(name: str, tensors: dict) -> None:
        nonlocal total
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    n_layers = SHAPES["num_hidden_layers"]
    shards = 2 + n_layers // 4
    write(f"model-00001-of-{shards:05d}.safetensors", {"model.embed_tokens.weight": rand(SHAPES["vocab_size"], h)})
    for s in range(n_layers // 4):
        tensors = {}
        for i in range(4 * s, 4 * s + 4):
            p = f"model.layers.{i}."
            tensors.update({
                p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
                p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
                p + "mlp.gate_proj.weight": rand(f, h), p + "mlp.up_proj.weight": rand(f, h),
                p + "mlp.down_proj.weight": rand(h, f),
                p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            })  # fmt: skip
        write(f"model-{s + 2:05d}-of-{shards:05d}.safetensors", tensors)
        print(f"wrote layers {4 * s}..{4 * s + 3}", flush=True)
    last = {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16), "lm_head.weight": rand(SHAPES["vocab_size"], h)}
    write(f"model-{shards:05d}-of-{shards:05d}.safetensors", last)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    tmp.rename(path)


def timed(cmd: list[str], log: Path, stop_after: float | None = None) -> dict:
    """Run ``cmd`` under /usr/bin/time -v; wall seconds, peak RSS and the exit status. With ``stop_after``, the
    command (not ``time``, which then still reports its peak) is SIGKILLed after that many seconds: a piece of
    a resumable run."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            p.wait(timeout=stop_after)
        except subprocess.TimeoutExpired:
            children = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
            for c in children:
                os.kill(int(c), signal.SIGKILL)
            p.wait()
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {
        "command": " ".join(cmd),
        "exit": p.returncode if "terminated by signal" not in text else "killed (a piece of a resumable run)",
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(int(rss.group(1)) / 2**20, 3) if rss else None,
        "tail": text.strip().splitlines()[-30:-23] if p.returncode == 0 else text.strip().splitlines()[-40:],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path.home() / "lowbit-big", help="where the model and outputs go")
    ap.add_argument("--rows", default="rtn,eval-rtn,gptq,eval-gptq")
    ap.add_argument("--stop-after", type=float, default=None,
                    help="kill a quantize run after this many seconds; the next invocation resumes it, and the row "
                    "sums its pieces' wall times and keeps their largest peak RSS")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.work / "llama3-8b-shape-random-bf16"
    t0 = time.perf_counter()
    make_model(model)
    print(f"model ready in {time.perf_counter() - t0:.0f} s: {model}", flush=True)
    out_json = RESULTS / "stream_big.json"
    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    q = [sys.executable, "-c", "import cli; cli.main()"]
    commands = {
        "rtn": [*q, "model", str(model), "--stream", "--method", "rtn", "--bits", "4", "--group-size", "128",
                "--no-eval", "--out", str(args.work / "rtn-w4g128"), "--overwrite"],
        "gptq": [*q, "model", str(model), "--stream", "--method", "gptq", "--bits", "4", "--group-size", "128",
                 "--nsamples", "8", "--seqlen", "256", "--no-eval", "--out", str(args.work / "gptq-w4g128"),
                 "--overwrite"],
        "eval-rtn": [*q, "eval", str(args.work / "rtn-w4g128"), "--max-windows", "1"],
        "eval-gptq": [*q, "eval", str(args.work / "gptq-w4g128"), "--max-windows", "1"],
    }  # fmt: skip
    for row in args.rows.split(","):
        if row in results and results[row]["exit"] == 0:
            print(f"{row}: measured already ({results[row]['wall_s']} s)")
            continue
        print(f"{row}: {' '.join(commands[row][3:])}", flush=True)
        stop = args.stop_after if not row.startswith("eval") else None
        piece = timed(commands[row], args.work / f"{row}.log", stop)
        partial = args.work / f".{Path(commands[row][commands[row].index('--out') + 1]).name}.partial" \
            if "--out" in commands[row] else None
        piece["blocks_finished"] = len(list(partial.glob("block-*.json"))) if partial and partial.exists() else None
        pieces = [*results.get(row, {}).get("pieces", []), {k: v for k, v in piece.items() if k != "tail"}]
        results[row] = {**piece, "pieces": pieces, "wall_s": round(sum(x["wall_s"] for x in pieces), 1),
                        "peak_rss_gib": max((x["peak_rss_gib"] or 0) for x in pieces)}
        results[row]["machine"] = f"{os.cpu_count()} cores, {_mem_gib():.0f} GiB RAM, no GPU"
        print(json.dumps({k: v for k, v in results[row].items() if k != "tail"}), flush=True)
        if piece["exit"] != 0:
            out_json.write_text(json.dumps(results, indent=2))
            write_md(results)
            break  # unfinished: later rows need its output
        out_json.write_text(json.dumps(results, indent=2))
        write_md(results)


def _mem_gib() -> float:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) / 2**20


def write_md(results: dict) -> None:
    lines = [
        "# Streaming a model that does not fit: Llama-3-8B shapes, random bf16 weights (benchmarks/stream_big.py)",
        "",
        "16 GB of bf16 safetensors; in fp32 (the CPU compute dtype) 32 GB, more than this machine's RAM. Random "
        "weights: perplexity is meaningless, the rows show the run completes, in how much memory and time.",
        "",
        "| row | wall s | peak RSS GiB | exit | command |",
        "|---|---:|---:|---:|---|",
    ]
    for row, r in results.items():
        cmd = r["command"].split("cli.main()", 1)[-1].strip()
        lines.append(f"| {row} | {r['wall_s']} | {r['peak_rss_gib']} | {r['exit']} | `quantize {cmd}` |")
    for row, r in results.items():  # what happened to a row that its numbers do not say (added by hand)
        for i, piece in enumerate(r.get("pieces", []) if len(r.get("pieces", [])) > 1 else []):
            lines.append(f"\n- {row}, piece {i + 1}: {piece['wall_s']} s, peak {piece['peak_rss_gib']} GiB, "
                         f"{piece.get('blocks_finished') or 'all'} blocks done; {piece.get('note', '')}".rstrip("; "))
        if r.get("note"):
            lines.append(f"\n- {row}: {r['note']}")
    lines += ["", f"Machine: {next(iter(results.values()))['machine']}." if results else ""]
    (RESULTS / "stream_big.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
