"""CUDA low-bit GEMM kernels (kernels_cuda/) against fp16 cuBLAS and torch's tinygemm, on Llama-3 shapes.

Every shape is a linear layer ``y[M, N] = x[M, K] . W[N, K]^T``: K = in_features, N = out_features.

    Llama-3-8B   q_proj / o_proj   K=4096   N=4096
                 gate / up_proj    K=4096   N=14336
                 down_proj         K=14336  N=4096
    Llama-3-70B  gate / up_proj    K=8192   N=28672
                 down_proj         K=28672  N=8192

at M = 1, 4, 16, 64 tokens. For each: our INT4 and INT3 kernels (asymmetric, fp16 scales, uint8
zeros, group 128 by default), torch fp16 ``matmul`` (cuBLAS) and the ratio measured in the same
run, ``torch.ops.aten._weight_int4pack_mm`` (tinygemm, bf16, where it runs), and the achieved
bandwidth (packed weights + scales + zeros + x + y bytes per call) as a percentage of the
device-to-device copy bandwidth measured in the same run (bytes read + written / time).

Timing: each measurement is a CUDA graph of back-to-back calls (so Python launch overhead is not
timed) cycling through enough copies of the weights to overflow L2 three times (so no call finds
its weights in L2), timed with CUDA events; per-call median over many replays.

End to end: SmolLM2-135M, RTN 4-bit group 64, fp16 on the GPU, must generate the same 32 greedy
tokens with the kernel path and with the dequantize path (``kernels_cuda.disabled()``).

    python benchmarks/cuda_gemv.py              # full run (a few minutes on an H100)
    python benchmarks/cuda_gemv.py --quick      # M=1 and 16 only, fewer reps

Writes benchmarks/results/kernels.json and kernels.md and prints PASS/FAIL for the bars of issue 7
(H100/H200, batch 1 over the Llama shapes: INT4 >= 3.5x fp16 cuBLAS and >= 85% of the measured
bandwidth; INT3 >= 1.25x faster than INT4; batch 16: INT4 still faster than fp16). The bars are
judged on the totals over the five shapes (one pass through a layer of each kind); the per-shape
worst case is printed next to them.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = Path(__file__).parent / "results"
SHAPES = [  # (name, K = in_features, N = out_features)
    ("8B q/o_proj", 4096, 4096),
    ("8B gate/up_proj", 4096, 14336),
    ("8B down_proj", 14336, 4096),
    ("70B gate/up_proj", 8192, 28672),
    ("70B down_proj", 28672, 8192),
]
ROWS = (1, 4, 16, 64)
BARS = {
    "int4_vs_fp16_b1": 3.5,
    "int4_bandwidth_b1": 0.85,
    "int3_vs_int4_b1": 1.25,
    "int4_vs_fp16_b16": 1.0,
}


def timed(fns: list[Callable[[], object]], reps: int, min_calls: int = 24) -> float:
    """Median microseconds per call of ``fns`` run round-robin inside one CUDA graph."""
    calls = len(fns) * max(1, math.ceil(min_calls / len(fns)))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside capture (lazy init, cuBLAS workspaces)
        for _ in range(2):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    per_call = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(per_call)


def copy_bandwidth(reps: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), 1 GiB each way."""
    src = torch.empty(512 * 2**20, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def copies_for(nbytes: int, l2_bytes: int) -> int:
    return max(2, math.ceil(3 * l2_bytes / nbytes))


def random_layer(n: int, k: int, bits: int, group: int):
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, device="cuda")
    scales = (torch.rand(n, k // group, device="cuda") * 0.02 + 1e-3).to(torch.float16)
    zeros = torch.randint(0, 2**bits, (n, k // group), dtype=torch.uint8, device="cuda")
    return codes, scales, zeros


def tinygemm_pack(codes, scales, zeros, group: int, probe_x: torch.Tensor, ref: torch.Tensor):
    """tinygemm operands for our (code - zero) * scale weights; returns (packed, scales_zeros, rel err).

    Its convention is w = (q - 8) * scale + zero with a float zero, so zero = (8 - z) * scale. The
    nibble order inside a byte is not documented: both are tried and the one matching ``ref`` kept."""
    s = scales.to(torch.bfloat16)
    zf = ((8 - zeros.float()) * scales.float()).to(torch.bfloat16)
    sz = torch.stack([s, zf], dim=-1).transpose(0, 1).contiguous()  # [K / group, N, 2]
    best = None
    for hi, lo in ((0, 1), (1, 0)):
        w8 = ((codes[:, hi::2] << 4) | codes[:, lo::2]).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack(w8, 8)
        y = torch.ops.aten._weight_int4pack_mm(probe_x, packed, group, sz)
        err = ((y.double() - ref).norm() / ref.norm()).item()
        if best is None or err < best[2]:
            best = (packed, sz, err)
    return best


def bench_shape(name: str, k: int, n: int, rows: tuple[int, ...], group: int, reps: int, l2: int, bw: float):
    from kernels_cuda.dispatch import lowbit_matmul
    from kernels_cuda.layout import repack
    from quant.numerics.grid import dequantize_weight
    from quant.numerics.packing import pack

    out = []
    layers = {}
    for bits in (4, 3):
        codes, scales, zeros = random_layer(n, k, bits, group)
        kw = repack(pack(codes, bits), scales, zeros, bits, group, k)
        layers[bits] = (codes, scales, zeros, kw)
    w16 = dequantize_weight(*layers[4][:3], group, torch.float16)
    fp16_copies = [w16] + [w16.clone() for _ in range(copies_for(w16.numel() * 2, l2) - 1)]
    kw_copies = {}
    for bits, (_, _, _, kw) in layers.items():
        kw_copies[bits] = [kw] + [
            type(kw)(kw.qweight.clone(), kw.scales.clone(), kw.zeros.clone(), kw.n, kw.k, kw.bits, kw.group_size)
            for _ in range(copies_for(kw.nbytes, l2) - 1)
        ]

    tiny = None
    try:
        probe = torch.randn(4, k, device="cuda", dtype=torch.bfloat16)
        ref = probe.double() @ dequantize_weight(*layers[4][:3], group, torch.float64).T
        packed, sz, err = tinygemm_pack(*layers[4][:3], group, probe, ref)
        tiny = {"packed": [packed] + [packed.clone() for _ in range(copies_for(packed.numel() * 4, l2) - 1)], "sz": sz}
        tiny_err = err
    except Exception as e:  # noqa: BLE001 - tinygemm is optional
        tiny_err = f"{type(e).__name__}: {str(e)[:120]}"

    for m in rows:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        xy_bytes = (m * k + m * n) * 2
        r = {"shape": name, "K": k, "N": n, "M": m}
        r["fp16_us"] = timed([lambda w=w, x=x: torch.matmul(x, w.T) for w in fp16_copies], reps)
        r["fp16_bw"] = (n * k * 2 + xy_bytes) / (r["fp16_us"] * 1e-6) / bw
        for bits in (4, 3):
            kws = kw_copies[bits]
            # correctness on this exact operand before timing it
            y = lowbit_matmul(x, kws[0])
            codes, scales, zeros, _ = layers[bits]
            want = x.double() @ dequantize_weight(codes, scales, zeros, group, torch.float64).T
            r[f"int{bits}_err"] = ((y.double() - want).norm() / want.norm()).item()
            us = timed([lambda kw=kw, x=x: lowbit_matmul(x, kw) for kw in kws], reps)
            r[f"int{bits}_us"] = us
            r[f"int{bits}_speedup"] = r["fp16_us"] / us
            r[f"int{bits}_bw"] = (kws[0].nbytes + xy_bytes) / (us * 1e-6) / bw
        r["int3_vs_int4"] = r["int4_us"] / r["int3_us"]
        if tiny is not None:
            try:
                xb = x.to(torch.bfloat16)
                r["tinygemm_us"] = timed(
                    [
                        lambda p=p, xb=xb: torch.ops.aten._weight_int4pack_mm(xb, p, group, tiny["sz"])
                        for p in tiny["packed"]
                    ],
                    reps,
                )
                r["tinygemm_err"] = tiny_err
            except Exception as e:  # noqa: BLE001
                r["tinygemm_us"] = None
                r["tinygemm_err"] = f"{type(e).__name__}: {str(e)[:120]}"
        else:
            r["tinygemm_us"], r["tinygemm_err"] = None, tiny_err
        out.append(r)
        print(
            f"{name:18s} M={m:2d}  fp16 {r['fp16_us']:8.2f} us | INT4 {r['int4_us']:8.2f} us "
            f"x{r['int4_speedup']:.2f} {100 * r['int4_bw']:5.1f}%BW | INT3 {r['int3_us']:8.2f} us "
            f"x{r['int3_speedup']:.2f} {100 * r['int3_bw']:5.1f}%BW | INT3/INT4 x{r['int3_vs_int4']:.2f}"
            + (f" | tinygemm {r['tinygemm_us']:.2f} us" if r.get("tinygemm_us") else ""),
            flush=True,
        )
    return out


def judge(rows: list[dict]) -> dict:
    """The issue's bars, on totals over the shapes (and the worst single shape, for the record)."""

    def at(m: int) -> list[dict]:
        return [r for r in rows if r["M"] == m]

    def total(rs: list[dict], key: str) -> float:
        return sum(r[key] for r in rs)

    bars = {}
    b1, b16 = at(1), at(16)
    if b1:
        bytes4 = sum(r["int4_bw"] * r["int4_us"] for r in b1)  # bw fraction x time ~ bytes (same units)
        bars["int4_vs_fp16_b1"] = (total(b1, "fp16_us") / total(b1, "int4_us"), min(r["int4_speedup"] for r in b1))
        bars["int4_bandwidth_b1"] = (bytes4 / total(b1, "int4_us"), min(r["int4_bw"] for r in b1))
        bars["int3_vs_int4_b1"] = (total(b1, "int4_us") / total(b1, "int3_us"), min(r["int3_vs_int4"] for r in b1))
    if b16:
        bars["int4_vs_fp16_b16"] = (total(b16, "fp16_us") / total(b16, "int4_us"), min(r["int4_speedup"] for r in b16))
    return {
        key: {"total": v[0], "worst_shape": v[1], "bar": BARS[key], "pass": bool(v[0] >= BARS[key])}
        for key, v in bars.items()
    }


def end_to_end(tokens: int = 32) -> dict:
    import copy

    import kernels_cuda
    from quant.engine.passes import QuantContext, run_pipeline
    from quant.formats.models import load_model
    from quant.methods.quantizers import RTNConfig

    lm = load_model(None)
    model = copy.deepcopy(lm.model)
    run_pipeline(QuantContext(model, lm.tokenizer, progress=False), [("rtn", RTNConfig(bits=4, group_size=64))])
    model = model.half().cuda().eval()
    ids = lm.tokenizer("The three most important inventions of the last century are", return_tensors="pt").input_ids
    ids = ids.cuda()
    res = {"model": "SmolLM2-135M-Instruct", "quant": "rtn w4 g64 (asym, minmax)", "new_tokens": tokens}
    outs = {}
    with torch.no_grad():
        for path, ctx in (("kernel", None), ("dequant", kernels_cuda.disabled)):
            for _ in range(2):  # first run builds/loads and repacks; time the second
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                if ctx is None:
                    gen = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
                else:
                    with ctx():
                        gen = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
                torch.cuda.synchronize()
                dt = time.perf_counter() - t0
            outs[path] = gen[0, ids.shape[1] :].tolist()
            res[f"{path}_tokens_per_s_eager"] = round(tokens / dt, 1)
    res["same_tokens"] = outs["kernel"] == outs["dequant"]
    res["kernel_tokens"] = outs["kernel"]
    res["dequant_tokens"] = outs["dequant"]
    res["text"] = lm.tokenizer.decode(outs["kernel"])
    return res


def profile_calls(group: int, shape: tuple[str, int, int] = SHAPES[3]) -> None:
    """A few plain calls (no graphs, no timing) per width and M on one shape, for ``ncu`` to read the counters of
    (benchmarks/gpu_session.sh profile)."""
    from kernels_cuda.dispatch import lowbit_matmul
    from kernels_cuda.layout import repack
    from quant.numerics.packing import pack

    _, k, n = shape
    for bits in (4, 3):
        codes, scales, zeros = random_layer(n, k, bits, group)
        kw = repack(pack(codes, bits), scales, zeros, bits, group, k)
        for m in (1, 16):
            x = torch.randn(m, k, dtype=torch.float16, device="cuda")
            for _ in range(3):
                lowbit_matmul(x, kw)
    torch.cuda.synchronize()


def write_markdown(res: dict, path: Path) -> None:
    lines = [
        "# CUDA low-bit GEMM kernels vs fp16 cuBLAS",
        "",
        f"Device: **{res['device']}** ({res['sm_count']} SMs), torch {res['torch']} (CUDA {res['cuda']}). "
        f"Measured device-to-device copy bandwidth: **{res['copy_bandwidth_GBps']:.0f} GB/s**. "
        f"Weights: asymmetric, group {res['group']}, fp16 scales + uint8 zeros; activations fp16 "
        "(tinygemm: bf16). Times are medians per call inside CUDA graphs, weights rotated through "
        "copies so none is L2-resident. K = in_features, N = out_features. Produced by "
        "`python benchmarks/cuda_gemv.py`.",
        "",
        "| shape | K x N | M | fp16 us | INT4 us | INT4 x fp16 | INT4 %BW | INT3 us | INT3 x fp16 | INT3 %BW "
        "| INT3 x INT4 | tinygemm us |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        tg = f"{r['tinygemm_us']:.2f}" if r.get("tinygemm_us") else "n/a"
        lines.append(
            f"| {r['shape']} | {r['K']}x{r['N']} | {r['M']} | {r['fp16_us']:.2f} | {r['int4_us']:.2f} | "
            f"{r['int4_speedup']:.2f} | {100 * r['int4_bw']:.1f} | {r['int3_us']:.2f} | {r['int3_speedup']:.2f} | "
            f"{100 * r['int3_bw']:.1f} | {r['int3_vs_int4']:.2f} | {tg} |"
        )
    lines += ["", "## Bars (issue 7), on totals over the five shapes", ""]
    lines += ["| bar | need | total | worst shape | result |", "|---|---|---|---|---|"]
    for key, b in res["bars"].items():
        fmt = (lambda v: f"{100 * v:.1f}%") if "bandwidth" in key else (lambda v: f"{v:.2f}x")
        lines.append(
            f"| {key} | {fmt(b['bar'])} | {fmt(b['total'])} | {fmt(b['worst_shape'])} | "
            f"{'PASS' if b['pass'] else 'FAIL'} |"
        )
    e2e = res.get("end_to_end")
    if e2e:
        lines += [
            "",
            "## End to end",
            "",
            f"{e2e['model']}, {e2e['quant']}, fp16: {e2e['new_tokens']} greedy tokens "
            f"{'**identical**' if e2e.get('same_tokens') else '**DIFFERENT**'} with the kernel and the dequantize path "
            f"(eager decode: kernel {e2e.get('kernel_tokens_per_s_eager')} tok/s, dequantize "
            f"{e2e.get('dequant_tokens_per_s_eager')} tok/s; a 135M model measures launch overhead, not GEMMs).",
        ]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group", type=int, default=128, help="quantization group size (default 128)")
    ap.add_argument("--reps", type=int, default=50, help="graph replays per measurement (median)")
    ap.add_argument("--quick", action="store_true", help="M = 1 and 16 only, 15 reps")
    ap.add_argument("--no-e2e", action="store_true", help="skip the SmolLM2 greedy-token check")
    ap.add_argument("--out", type=Path, default=RESULTS / "kernels", help="results path stem (.json, .md)")
    ap.add_argument("--profile", action="store_true",
                    help="only a few plain calls on the 70B gate/up shape (INT4, INT3; M = 1, 16), to run under ncu")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/cuda_gemv.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured.")
        return 2

    import kernels_cuda

    if kernels_cuda.load_extension() is None:
        print(f"the lowbit CUDA extension failed to build: {kernels_cuda.extension_error()}")
        return 1
    if args.profile:
        profile_calls(args.group)
        return 0
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20
    rows = (1, 16) if args.quick else ROWS
    reps = 15 if args.quick else args.reps
    bw = copy_bandwidth()
    res = {
        "device": torch.cuda.get_device_name(0),
        "sm_count": props.multi_processor_count,
        "l2_bytes": l2,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "copy_bandwidth_GBps": bw / 1e9,
        "group": args.group,
        "timing": "median per call of CUDA-graph replays; weights rotated through >= 3x L2 of copies",
        "rows": [],
    }
    print(f"{res['device']}: copy bandwidth {bw / 1e9:.0f} GB/s, L2 {l2 / 2**20:.0f} MiB")
    with torch.no_grad():
        for name, k, n in SHAPES:
            res["rows"] += bench_shape(name, k, n, rows, args.group, reps, l2, bw)
            torch.cuda.empty_cache()
    res["bars"] = judge(res["rows"])
    if not args.no_e2e:
        try:
            res["end_to_end"] = end_to_end()
        except Exception as e:  # noqa: BLE001 - report, do not lose the GEMM numbers
            res["end_to_end"] = {"error": f"{type(e).__name__}: {e}"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    write_markdown(res, args.out.with_suffix(".md"))

    print("\nBars (totals over the Llama shapes; worst single shape in brackets):")
    for key, b in res["bars"].items():
        verdict = "PASS" if b["pass"] else "FAIL"
        print(f"  {verdict}  {key}: {b['total']:.3f} (worst {b['worst_shape']:.3f}), need {b['bar']}")
    e2e = res.get("end_to_end", {})
    if "same_tokens" in e2e:
        print(f"  {'PASS' if e2e['same_tokens'] else 'FAIL'}  SmolLM2 w4 greedy tokens identical (kernel vs dequant)")
    elif e2e:
        print(f"  FAIL  end-to-end check: {e2e.get('error')}")
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
