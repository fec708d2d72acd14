"""CPU inference speed of SmolLM2-135M, every format side by side in one run: the float model (fp32, bf16), our
INT4 / INT3 / INT2 / D²Quant (DSQ) checkpoints, torch's int4 CPU kernel on our INT4 weights, and llama.cpp on the
embedded Q4_1 GGUF itself. Batch 1 (and 4 where the runtime batches), a 256-token prompt of WikiText-2 test text,
128 greedy new tokens, the same thread count everywhere; each row's median of 3 timed runs.

Every row runs in its own process (``quantize bench``, or this script with ``--one``) so its peak memory is its
own; the peak is reset after loading, so it is the memory of generation. ``--again`` measures every row once
more and keeps the faster round (whole processes run slower at times on this shared machine: a row's prefill,
which no kernel of ours touches, halves with its decode). "compiled" rows run the decode step
``torch.compile``'d (``quantize bench --compile``); the others run transformers' eager forward. The machine's copy
bandwidth is measured in the same run, and each row's roofline is bandwidth / bytes of weights read per token.

Our INT4/INT3/INT2 checkpoints are RTN (speed depends on the format, not on how the codes were chosen: a GPTQ
checkpoint has the same layout) and D²Quant's uses 16 calibration windows: their perplexity is not measured here.
llama.cpp comes from ``llama-cpp-python`` (PyPI, built from source by pip) in its own virtual environment, not a
project dependency:

    python3 -m venv ../peers/venv_llamacpp && ../peers/venv_llamacpp/bin/pip install llama-cpp-python
    python benchmarks/latency.py [--llama-python ../peers/venv_llamacpp/bin/python] [--rows "a;b"] [--force | --again]
        # -> benchmarks/results/latency.{json,md,png}; rows already measured are kept (resumable)
    python benchmarks/latency.py --paired 9    # INT4 / fp32, INT3 / INT4, D2Quant / INT3, interleaved in one process
    python benchmarks/latency.py --prefill 9   # prefill: table lookup against dequantize, and against fp32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
WORK = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit")) / "latency"
THREADS = 2
PROMPT, NEW = 256, 128
REPEATS = 3  # timed runs per row and batch size; the median (by decode speed) is reported
GROUP = 64
DEFAULT_LLAMA = ROOT.parent / "peers" / "venv_llamacpp" / "bin" / "python"

# name -> (checkpoint recipe or None for the float model, bench options)
CHECKPOINTS = {
    "int4-h4": ["--method", "rtn", "--bits", "4", "--lm-head-bits", "4"],
    "int4": ["--method", "rtn", "--bits", "4"],
    "int3-h4": ["--method", "rtn", "--bits", "3", "--lm-head-bits", "4"],
    "int2-h4": ["--method", "rtn", "--bits", "2", "--lm-head-bits", "4"],
    "int3-s8-h4": ["--method", "rtn", "--bits", "3", "--scale-bits", "8", "--lm-head-bits", "4"],
    "int3-km-h4": ["--method", "rtn", "--bits", "3", "--scale-bits", "8", "--codebook", "kmeans",
                   "--lm-head-bits", "4"],
    "d2quant3-h4": ["--method", "d2quant", "--bits", "3", "--lm-head-bits", "4", "--nsamples", "16"],
}
ROWS = {  # row -> (kind, checkpoint, extra bench options)
    "float fp32": ("bench", None, ["--dtype", "float32"]),
    "float fp32, compiled": ("bench", None, ["--dtype", "float32", "--compile"]),
    "float bf16": ("bench", None, ["--dtype", "bfloat16"]),
    "ours int4 g64, head int4": ("bench", "int4-h4", []),
    "ours int4 g64, head int4, compiled": ("bench", "int4-h4", ["--compile"]),
    "ours int4 g64, head fp32, compiled": ("bench", "int4", ["--compile"]),
    "ours int3 g64, head int4": ("bench", "int3-h4", []),
    "ours int3 g64, head int4, compiled": ("bench", "int3-h4", ["--compile"]),
    "ours int2 g64, head int4, compiled": ("bench", "int2-h4", ["--compile"]),
    "ours int3 g64 8-bit scales, head int4, compiled": ("bench", "int3-s8-h4", ["--compile"]),
    "ours int3 g64 codebook (kmeans levels, 8-bit scales), head int4": ("bench", "int3-km-h4", []),
    "ours int3 g64 codebook (kmeans levels, 8-bit scales), head int4, compiled": ("bench", "int3-km-h4", ["--compile"]),
    "ours D2Quant w3 g64 (DSQ down_proj), head int4": ("bench", "d2quant3-h4", []),
    "ours D2Quant w3 g64 (DSQ down_proj), head int4, compiled": ("bench", "d2quant3-h4", ["--compile"]),
    "torch int4 kernel, same int4 weights, head int4": ("torch-int4", "int4-h4", []),
    "torch int4 kernel, same int4 weights, head int4, compiled": ("torch-int4", "int4-h4", ["--compile"]),
    "llama.cpp Q4_1 (the embedded GGUF)": ("llama.cpp", None, []),
}


# ----------------------------------------------------------------------------------------------- helpers
def kernel_body() -> str:
    """The CPU kernels' body for our group-64 checkpoints on this machine, int8 tokens on (the machines these
    sessions get differ)."""
    import kernels_cpu

    return kernels_cpu.EXTENSION.load().kernel_body(-1, 64, 4)


def bandwidth() -> float:
    """Bytes per second of a large tensor copy (read + write), best of 5."""
    import torch

    a = torch.empty(256 * 2**20, dtype=torch.uint8).fill_(1)
    b = torch.empty_like(a)
    b.copy_(a)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        best = max(best, 2 * a.numel() / (time.perf_counter() - t0))
    return best


def quantize_cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import cli; cli.main()", *args]


def checkpoint(name: str) -> Path:
    out = WORK / name
    if not (out / "config.json").exists():
        cmd = quantize_cli("model", "--group-size", str(GROUP), "--no-eval", "--out", str(out), "--overwrite",
                           *CHECKPOINTS[name])
        print("building", name, flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return out


def run_bench(ckpt: Path | None, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        js = Path(tmp) / "r.json"
        cmd = quantize_cli("bench", *([str(ckpt)] if ckpt else []), "--prompt-tokens", str(PROMPT), "--new-tokens",
                           str(NEW), "--batch", "1,4", "--threads", str(THREADS), "--repeats", str(REPEATS), "--json",
                           str(js), *extra)
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.loads(js.read_text())


# ----------------------------------------------------------------------------------------------- torch int4
def torch_int4(ckpt: Path, compiled: bool) -> dict:
    """Our INT4 checkpoint with every QuantLinear replaced by torch's int4 CPU kernel on the same codes, scales and
    zero-points (``_weight_int4pack_mm_for_cpu``, what torchao's int4 CPU path calls), then the same bench."""
    import torch
    from torch import nn

    from quant.formats.models import load_model
    from quant.runtime.generation import bench, peak_rss
    from quant.runtime.quantlinear import QuantLinear

    class TorchInt4Linear(nn.Module):
        def __init__(self, q: QuantLinear) -> None:
            super().__init__()
            self.in_features, self.out_features, self.group = q.in_features, q.out_features, q.group_size
            codes = q.codes().to(torch.int32)
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
            s, z = q.scales.float(), q.zeros.float()  # ours: (c - z) s; torch's: (c - 8) scale + zero
            self.sz = torch.stack([s.t(), ((8 - z) * s).t()], -1).contiguous()
            self.bias = q.bias

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).contiguous(), self.packed,
                                                           self.group, self.sz)
            y = y + self.bias if self.bias is not None else y
            return y.view(*x.shape[:-1], self.out_features)

    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    lm = load_model(str(ckpt))
    nbytes = 0
    for name, m in list(lm.model.named_modules()):
        if isinstance(m, QuantLinear):
            t = TorchInt4Linear(m)
            x = torch.randn(3, m.in_features)
            assert torch.allclose(t(x), nn.functional.linear(x, m.dequantize()), rtol=1e-3, atol=1e-3), name
            parent, _, child = name.rpartition(".")
            setattr(lm.model.get_submodule(parent), child, t)
            nbytes += t.packed.numel() * t.packed.element_size() + t.sz.numel() * 4
    load = {"load_seconds": round(time.perf_counter() - t0, 2), "peak_rss_load_bytes": peak_rss()}
    res = {"model": str(ckpt), "quantized": True, **load,
           **bench(lm.model, lm.tokenizer, PROMPT, NEW, (1,), REPEATS, compiled)}  # batch 4: minutes a row
    res.update(bytes_per_token=nbytes, lm_head_bytes=None)  # every linear and the head: torch's layout, fp32 scales
    return res


# ----------------------------------------------------------------------------------------------- paired
# compiled; ours with head int4; None: the float model (fp32)
PAIRED = {"fp32": None, "int4": "int4-h4", "int3": "int3-h4", "d2quant-w3": "d2quant3-h4"}
# loads of each checkpoint: two loads of one checkpoint differed by up to 6% in a run (where their weights landed in
# memory), more than the checkpoints differ, so each ratio is between the means over the loads
INSTANCES = 2


def paired(rounds: int) -> dict:
    """The compiled fp32 model and our INT4, INT3 and D²Quant checkpoints in one process, decoding side by side for
    ``rounds`` rounds: in a round every model decodes the same prompt, their steps interleaved token by token (the
    order rotating), so
    the slow spells of this shared machine, which moved whole processes by up to 20% between rounds of the rows
    above and runs seconds apart by as much, fall on every model alike. Each checkpoint is loaded ``INSTANCES``
    times; the median over rounds of the ratio of the loads' mean speeds is reported."""
    import statistics

    import torch
    import torch._inductor.config as inductor

    from kernels_cpu.dispatch import use_int8_tokens
    from quant.formats.models import load_model
    from quant.runtime.generation import bench_prompt, interleaved_decode, timed_run

    inductor.compile_threads = 1  # as `quantize bench --compile`: no pool of compile workers beside the timing
    use_int8_tokens(True)
    torch.set_num_threads(THREADS)
    models = {f"{k} #{i + 1}": load_model(None if v is None else str(checkpoint(v))).model
              for i in range(INSTANCES) for k, v in PAIRED.items()}
    tok = load_model(str(checkpoint(PAIRED["int4"]))).tokenizer
    ids, warm = bench_prompt(tok, PROMPT, 1), bench_prompt(tok, 16, 1)
    speeds: dict = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            timed_run(m, warm, 4)  # kernels loaded, codes repacked
            timed_run(m, ids, 3, True, PROMPT + NEW)  # compiled for the timed shapes
        for _ in range(rounds):
            for k, v in interleaved_decode(models, ids, NEW).items():
                speeds[k].append(round(v, 2))

    def mean(k: str) -> list[float]:  # per round, over the loads of checkpoint k
        return [statistics.mean(v) for v in zip(*(speeds[f"{k} #{i + 1}"] for i in range(INSTANCES)), strict=True)]

    ratio = lambda a, b: round(statistics.median(x / y for x, y in zip(mean(a), mean(b), strict=True)), 3)  # noqa: E731
    return {"rounds": rounds, "kernel_body": kernel_body(), "bandwidth_bytes_s": bandwidth(), "decode_tok_s": speeds,
            "median_ratios": {
        "int4 / fp32": ratio("int4", "fp32"), "int3 / int4": ratio("int3", "int4"),
        "d2quant-w3 / int3": ratio("d2quant-w3", "int3")}}


# ----------------------------------------------------------------------------------------------- prefill
PREFILL = {"fp32": None, "int4": "int4-h4", "int3": "int3-h4", "int3 8-bit scales": "int3-s8-h4",
           "int3 codebook": "int3-km-h4", "d2quant-w3": "d2quant3-h4"}


def prefill_pairs(rounds: int) -> dict:
    """One eager forward over the prompt (batch 1), in one process for ``rounds`` rounds, the order rotating: the
    fp32 model, and each of our checkpoints readied for decoding twice, its layers' weights rebuilt by table lookup
    (``lookup_dequantize``, the default) and by ``dequantize`` (inside ``kernels_cuda.disabled()``). Reports
    each way's median tok/s and the median per-round ratios."""
    import contextlib
    import statistics

    import torch

    import kernels_cuda
    from kernels_cpu.dispatch import prepare_for_decode
    from quant.formats.models import load_model
    from quant.runtime.generation import bench_prompt

    torch.set_num_threads(THREADS)
    loaded = {k: load_model(None if v is None else str(checkpoint(v))) for k, v in PREFILL.items()}
    models = {k: lm.model for k, lm in loaded.items()}
    for m in models.values():
        prepare_for_decode(m)
    ids = bench_prompt(loaded["int3"].tokenizer, PROMPT, 1)
    ways = [(k, False) for k in models] + [(k, True) for k in models if PREFILL[k]]
    speeds: dict = {f"{k}{' (dequantize)' if d else ''}": [] for k, d in ways}

    def once(k: str, dequantize: bool) -> float:
        t0 = time.perf_counter()
        with kernels_cuda.disabled() if dequantize else contextlib.nullcontext():
            models[k](ids, use_cache=False, logits_to_keep=1)
        return PROMPT / (time.perf_counter() - t0)

    with torch.inference_mode():
        for k, d in ways:
            once(k, d)  # warm-up: kernels loaded, BLAS buffers
        for r in range(rounds):
            for k, d in ways[r % len(ways):] + ways[: r % len(ways)]:
                speeds[f"{k}{' (dequantize)' if d else ''}"].append(round(once(k, d), 1))

    def ratio(a: str, b: str) -> float:
        return round(statistics.median(x / y for x, y in zip(speeds[a], speeds[b], strict=True)), 3)

    ratios = {f"{k} lookup / dequantize": ratio(k, f"{k} (dequantize)") for k in models if PREFILL[k]}
    ratios |= {f"{k} lookup / fp32": ratio(k, "fp32") for k in models if PREFILL[k]}
    return {"rounds": rounds, "prompt": PROMPT, "kernel_body": kernel_body(), "prefill_tok_s": speeds,
            "median_tok_s": {k: statistics.median(v) for k, v in speeds.items()}, "median_ratios": ratios}


# ----------------------------------------------------------------------------------------------- llama.cpp
LLAMA_SCRIPT = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

path, text = sys.argv[1], open(sys.argv[2]).read()
prompt, new, threads, repeats = (int(a) for a in sys.argv[3:7])
t0 = time.perf_counter()
ctx = max(512, prompt + new)  # scores has n_batch rows (without logits_all): indexed up to the last position
m = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=ctx, n_batch=ctx, verbose=False)
load = time.perf_counter() - t0
load_rss = rss()
toks = m.tokenize(text.encode(), add_bos=False)[:prompt]
m.eval(toks[:16])  # warm-up
open("/proc/self/clear_refs", "w").write("5")
runs = []
for _ in range(repeats):
    m.reset()
    t0 = time.perf_counter()
    m.eval(toks)
    tok = int(np.argmax(m.scores[m.n_tokens - 1]))
    ttft = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(new - 1):
        m.eval([tok])
        tok = int(np.argmax(m.scores[m.n_tokens - 1]))
    decode = time.perf_counter() - t1
    runs.append({"ttft_s": round(ttft, 4), "prefill_tok_s": round(prompt / ttft, 4),
                 "decode_tok_s": round((new - 1) / decode, 4)})
median = sorted(runs, key=lambda r: r["decode_tok_s"])[len(runs) // 2]
print(json.dumps({"load_seconds": round(load, 2), "peak_rss_load_bytes": load_rss, "batches": {"1": {
    **median, "peak_rss_bytes": rss(), "peak_rss_since_load": True}}}))
"""


def llama_cpp(python: Path) -> dict:
    from calibrate.data import eval_text
    from quant.formats.models import _gguf_path

    gguf = _gguf_path()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "s.py").write_text(LLAMA_SCRIPT)
        (Path(tmp) / "t.txt").write_text(eval_text()[:8000])
        out = subprocess.run([str(python), str(Path(tmp) / "s.py"), str(gguf), str(Path(tmp) / "t.txt"), str(PROMPT),
                              str(NEW), str(THREADS), str(REPEATS)], check=True, capture_output=True, text=True).stdout
    version = subprocess.run([str(python), "-c", "import llama_cpp; print(llama_cpp.__version__)"], check=True,
                             capture_output=True, text=True).stdout.strip()
    res = json.loads(out.strip().splitlines()[-1])
    # every tensor but the token embedding's rows is read once per token; its output layer is the tied embedding
    res.update(model=str(gguf), quantized=True, compiled=False, threads=THREADS, prompt_tokens=PROMPT, new_tokens=NEW,
               lm_head="Q4_1 (tied token_embd)", bytes_per_token=gguf.stat().st_size,
               runtime=f"llama-cpp-python {version}")
    return res


# ----------------------------------------------------------------------------------------------- report
def linear_params(data: dict) -> float:
    """Weights of the linears and the head: the fp32 float row reads 4 bytes of each per token."""
    return data["rows"]["float fp32"]["bytes_per_token"] / 4


def write_report(data: dict) -> None:
    bw, params = data["bandwidth_bytes_s"], linear_params(data)
    lines = [
        "# CPU inference speed, SmolLM2-135M",
        "",
        f"`python benchmarks/latency.py`, one run on this machine ({THREADS} threads, {data['cpu']}"
        f"{', kernels: the ' + data['kernel_body'] + ' body' if 'kernel_body' in data else ''}); measured copy "
        f"bandwidth {bw / 1e9:.2f} GB/s. Prompt {PROMPT} tokens of WikiText-2 test text, {NEW} greedy new tokens. "
        "Roofline = bandwidth / weight bytes read per decoded token (embedding row, norms and KV cache left out); "
        "\"of roofline\" is batch-1 decode against it. Peak RSS is the high-water mark of generation (reset after "
        "loading). Compiled rows run the decode step `torch.compile`'d over a static cache (`quantize bench "
        "--compile`); the others, transformers' eager forward. Our checkpoints: RTN codes (the layout GPTQ writes "
        "too), D2Quant with 16 calibration windows; no perplexity is measured here.",
        "",
        "| row | lm_head | bits/weight | MB/token | decode tok/s (b=1) | of roofline | decode tok/s (b=4) "
        "| prefill tok/s | TTFT ms | peak RSS MiB | decode vs float fp32 (same mode) | decode vs llama.cpp |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = data["rows"]
    llama = rows.get("llama.cpp Q4_1 (the embedded GGUF)")
    for name, r in rows.items():
        b1, b4 = r["batches"]["1"], r["batches"].get("4", {})
        roof = bw / r["bytes_per_token"]
        base = rows.get("float fp32, compiled" if r.get("compiled") else "float fp32")
        ratio = f"{b1['decode_tok_s'] / base['batches']['1']['decode_tok_s']:.2f}x" if base else ""
        vs_llama = f"{b1['decode_tok_s'] / llama['batches']['1']['decode_tok_s']:.2f}x" if llama else ""
        batch4 = f"{b4['decode_tok_s']:.1f}" if b4 else "n/a"
        lines.append(
            f"| {name} | {r['lm_head']} | {8 * r['bytes_per_token'] / params:.2f} | "
            f"{r['bytes_per_token'] / 1e6:.1f} | {b1['decode_tok_s']:.1f} | {b1['decode_tok_s'] / roof:.2f} | "
            f"{batch4} | {b1['prefill_tok_s']:.0f} | {1000 * b1['ttft_s']:.0f} | "
            f"{b1['peak_rss_bytes'] / 2**20:.0f} | {ratio} | {vs_llama} |"
        )
    lines += ["", "Bits/weight: weight bytes per token x 8 over the linear and head parameters (llama.cpp: its file)."]
    rounds = [f"- {n}: {', '.join(f'{v:.1f}' for v in r['decode_rounds'])}" for n, r in rows.items()
              if "decode_rounds" in r]
    if rounds:
        lines += ["", "Batch-1 decode tok/s of each round (`--again`; the table shows the faster round):", *rounds]
    p = data.get("paired")
    if p:
        where = (f" on a machine whose kernels ran the {p['kernel_body']} body, copy bandwidth "
                 f"{p['bandwidth_bytes_s'] / 1e9:.2f} GB/s" if "kernel_body" in p else "")
        lines += ["", f"Paired, in one process (`--paired {p['rounds']}`){where}: compiled models decoding "
                  f"side by side, their steps interleaved token by token, {p['rounds']} rounds; batch-1 decode tok/s "
                  "per round, and the median of the per-round ratios:",
                  *[f"- {k}: {', '.join(f'{v:.1f}' for v in vs)}" for k, vs in p["decode_tok_s"].items()],
                  *[f"- {k}: {v:.3f}x" for k, v in p["median_ratios"].items()]]
    p = data.get("prefill")
    if p:
        lines += ["", f"Prefill, in one process (`--prefill {p['rounds']}`, kernels: the {p['kernel_body']} body): one "
                  f"eager forward over a {p['prompt']}-token prompt (batch 1), the models in turn, {p['rounds']} "
                  "rounds; each checkpoint readied for decoding, its weights rebuilt for the matmul by table lookup "
                  "(the default) and by `dequantize`. Median tok/s, and the median of the per-round ratios:",
                  *[f"- {k}: {v:.0f}" for k, v in p["median_tok_s"].items()],
                  *[f"- {k}: {v:.2f}x" for k, v in p["median_ratios"].items()]]
    extra = [f"- {n}: compiled in {r['batches']['1']['compile_s']} s (batch 1)" for n, r in rows.items()
             if "compile_s" in r["batches"]["1"]]
    lines += ["", "Compile times (once per batch size, not in the speeds):", *extra, ""]
    (RESULTS / "latency.md").write_text("\n".join(lines) + "\n")
    plot(data)


def plot(data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = linear_params(data)
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in data["rows"].items():
        x = 8 * r["bytes_per_token"] / params
        y = r["batches"]["1"]["decode_tok_s"]
        marker = "s" if "llama.cpp" in name else "^" if "torch" in name else "o" if "ours" in name else "x"
        ax.scatter(x, y, marker=marker, color="C1" if r.get("compiled") else "C0")
        ax.annotate(name.replace(", head", "\nhead"), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    xs = [1.5 + i * 0.1 for i in range(320)]
    ax.plot(xs, [data["bandwidth_bytes_s"] / (x / 8 * params) for x in xs], "k--", lw=0.8,
            label="roofline (copy bandwidth)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight read per token (linears + head)")
    ax.set_ylabel("decode tokens/s, batch 1")
    ax.set_title(f"SmolLM2-135M decode on {THREADS} CPU threads (blue eager, orange compiled)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "latency.png", dpi=130)


# ----------------------------------------------------------------------------------------------- main
def write_atomic(out: Path, data: dict) -> None:
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(out)



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="", help="row names separated by semicolons (default: all)")
    ap.add_argument("--force", action="store_true", help="re-measure rows already in the results")
    ap.add_argument("--again", action="store_true",
                    help="measure every row once more and keep, per row, the round with the faster batch-1 decode "
                    "(this shared 2-core machine slows whole processes at times; every round's speed is kept)")
    ap.add_argument("--paired", type=int, default=0, metavar="ROUNDS",
                    help="only time our compiled INT4, INT3 and D2Quant checkpoints in turn in one process for ROUNDS "
                    "rounds and report the median per-round ratios (the rows are kept as they are)")
    ap.add_argument("--prefill", type=int, default=0, metavar="ROUNDS",
                    help="only time one eager prefill forward of the fp32 model and of our checkpoints, each both with "
                    "its weights rebuilt by table lookup and by dequantize, in one process for ROUNDS rounds")
    ap.add_argument("--llama-python", type=Path, default=DEFAULT_LLAMA, help="python of the llama-cpp-python venv")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: torch-int4 in this process
    ap.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one == "torch-int4":
        args.json.write_text(json.dumps(torch_int4(args.ckpt, args.compile)))
        return

    out = RESULTS / "latency.json"
    data = json.loads(out.read_text()) if out.exists() else {"rows": {}}
    if args.paired or args.prefill:  # the rows and their bandwidth stay as measured
        key = "paired" if args.paired else "prefill"
        data[key] = paired(args.paired) if args.paired else prefill_pairs(args.prefill)
        print(json.dumps(data[key]["median_ratios"]), flush=True)
        write_atomic(out, data)
        write_report(data)
        return
    import platform

    import torch

    torch.set_num_threads(THREADS)
    data.update(bandwidth_bytes_s=bandwidth(), cpu=platform.processor() or platform.machine(),
                kernel_body=kernel_body(), torch=torch.__version__)
    wanted = [r.strip() for r in args.rows.split(";") if r.strip()] or list(ROWS)
    for name in wanted:
        old = data["rows"].get(name)
        if old is not None and not (args.force or args.again):
            continue
        kind, ckpt_name, extra = ROWS[name]
        ckpt = checkpoint(ckpt_name) if ckpt_name else None
        print("measuring", name, flush=True)
        if kind == "bench":
            res = run_bench(ckpt, extra)
        elif kind == "torch-int4":
            with tempfile.TemporaryDirectory() as tmp:
                js = Path(tmp) / "r.json"
                subprocess.run([sys.executable, __file__, "--one", "torch-int4", "--ckpt", str(ckpt), "--json",
                                str(js), *(["--compile"] if extra else [])], check=True, cwd=ROOT,
                               stderr=subprocess.DEVNULL)
                res = json.loads(js.read_text())
        else:
            res = llama_cpp(args.llama_python)
        if args.again and old is not None:
            speed = lambda r: r["batches"]["1"]["decode_tok_s"]  # noqa: E731
            rounds = [*old.get("decode_rounds", [speed(old)]), speed(res)]
            res = max(old, res, key=speed)
            res["decode_rounds"] = rounds
        data["rows"][name] = res
        data["rows"] = {k: data["rows"][k] for k in ROWS if k in data["rows"]}  # the table's order
        write_atomic(out, data)  # after every row: a killed run keeps what it measured
        b1 = res["batches"]["1"]
        print(f"  decode {b1['decode_tok_s']:.1f} tok/s, prefill {b1['prefill_tok_s']:.0f} tok/s", flush=True)
    write_report(data)


if __name__ == "__main__":
    main()
