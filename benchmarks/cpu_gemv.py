"""CPU decode GEMV, layer by layer: our kernels (kernels_cpu) against fp32 ``F.linear``, torch's int4 CPU kernel
(``aten._weight_int4pack_mm_for_cpu``, what torchao uses) and our dequantize + matmul path, in one process.

Decoding streams every weight from memory once per token, so each row cycles through enough copies of the
layer (random weights) that they do not fit in the last-level cache: the number is what a model's layer costs
when it is not cache-resident. Shapes: SmolLM2-135M's (576/1536) and Llama-3-8B's (4096/14336); 1 and 4
tokens; 2/3/4-bit group 64 (torch's int4 kernel: group 64 too), DSQ 3-bit, codebook 3-bit (``--codebook
kmeans``) and vector codebook 3-bit (``vq2`` group 64; ``vq3`` group 96, on the widths 96 divides). The
machine's copy bandwidth is measured in the same run, and each row gets its roofline fraction (bytes read per
call / bandwidth / time).

    python benchmarks/cpu_gemv.py        # -> benchmarks/results/cpu_gemv.{json,md}
"""

from __future__ import annotations

import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_kernels_cpu import dsq_layer, uniform_layer  # noqa: E402

import kernels_cpu  # noqa: E402
import kernels_cuda  # noqa: E402
from kernels_cpu.layout import chunk8, codebook_tables, dsq_chunk8, dsq_tables, for_body, kernel_buffer  # noqa: E402
from quant.numerics.packing import pack_dense  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SHAPES = [("smollm2 gate/up", 1536, 576), ("smollm2 down", 576, 1536), ("llama3-8b o", 4096, 4096),
          ("llama3-8b gate/up", 14336, 4096), ("llama3-8b down", 4096, 14336)]  # fmt: skip


def last_level_cache() -> int:
    """Bytes of the CPU's last-level cache (Linux sysfs), 32 MiB where it cannot be read."""
    caches = sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"))
    sizes = [int(p.read_text().strip().rstrip("K")) * 1024 for p in caches if p.read_text().strip().endswith("K")]
    return max(sizes, default=32 * 2**20)


# bytes of fp32 weights per row: at least twice the last-level cache (these sessions' machines range from 32 MiB
# to 480 MiB of L3), so the weights stream from memory as a big model's do
WORKING_SET = max(256 * 2**20, 2 * last_level_cache())
GROUP = 64


def bandwidth() -> float:
    """Bytes per second of a large tensor copy (read + write)."""
    a = torch.empty(WORKING_SET, dtype=torch.uint8).fill_(1)  # past the last-level cache too
    b = torch.empty_like(a)
    b.copy_(a)
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    return 2 * a.numel() * 10 / (time.perf_counter() - t0)


def timed(fns: list, reps: int) -> float:
    """Seconds per call, cycling through ``fns`` (one per copy of the layer)."""
    for f in fns[: min(len(fns), 4)]:
        f()
    t0 = time.perf_counter()
    for i in range(reps):
        fns[i % len(fns)]()
    return (time.perf_counter() - t0) / reps


def int4_torch(out: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's CPU int4 layout of random codes (group 64) and its fp32 scales-and-zeros."""
    codes = torch.randint(0, 16, (out, n), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    sz = torch.stack([torch.rand(n // GROUP, out) * 0.01, torch.rand(n // GROUP, out) * 0.01], -1).contiguous()
    return packed, sz


def main() -> None:
    torch.manual_seed(0)
    ext = kernels_cpu.EXTENSION.load()
    if ext is None:
        raise SystemExit(f"the CPU kernels did not build: {kernels_cpu.EXTENSION.error}")
    bw = bandwidth()
    rows = []
    for label, out, n in SHAPES:
        copies = max(2, WORKING_SET // (out * n * 4))
        reps = max(8, min(400, int(2e9 // (out * n))))
        for m in (1, 4):
            x = torch.randn(m, n)
            cands = {}
            ws = [torch.randn(out, n) for _ in range(copies)]
            cands["fp32 F.linear"] = ([partial(F.linear, x, w) for w in ws], out * n * 4)
            del ws
            for bits in (4, 3, 2):
                layers = [uniform_layer(out, n, bits, GROUP, seed=i) for i in range(copies)]
                body = ext.kernel_body(-1, GROUP, bits)  # its layout (split3 for 3 bits on the AVX2 int8 body)
                args = [(for_body(chunk8(q.qweight, bits, n), bits, n, body), q.scales, q.zeros) for q in layers]
                nbytes = len(args[0][0]) + out * (n // GROUP) * 3
                cands[f"ours int{bits}"] = ([partial(ext.uniform_gemv, x, *a, bits, GROUP) for a in args], nbytes)
                if bits == 4:
                    cands["ours int4 AVX2"] = ([partial(ext.uniform_gemv, x, *a, 4, GROUP, 1) for a in args], nbytes)
                    with kernels_cuda.disabled(), torch.no_grad():
                        t = timed([partial(layers[0], x)], 2)
                    cands["dequantize + matmul int4 (before)"] = (t, nbytes)
            dl = [dsq_layer(out, n, 3, GROUP, seed=i) for i in range(copies)]
            body = ext.kernel_body(-1, GROUP, 3)
            dsq = [partial(ext.dsq_gemv, x, for_body(dsq_chunk8(d.planes, n), 3, n, body), d.row_scales,
                           dsq_tables(d.row_scales), GROUP) for d in dl]
            cands["ours DSQ 3-bit"] = (dsq, dl[0].planes.numel() * 4 + dl[0].row_scales.numel() * 2)
            # codebook 3-bit: random codes, scales and sorted levels (the kernel reads them as a checkpoint's decode)
            cb = []
            for _ in range(copies):
                scales = (torch.rand(out, n // GROUP) * 0.01 + 1e-3).half()
                levels = torch.randn(8).sort().values
                codes = kernel_buffer(pack_dense(torch.randint(0, 8, (out, n)), 3))
                cb.append((for_body(codes, 3, n, body), scales, levels, codebook_tables(scales, levels)))
            cands["ours codebook 3-bit"] = ([partial(ext.codebook_gemv, x, *a, GROUP) for a in cb],
                                            len(cb[0][0]) + out * (n // GROUP) * 2)
            for d, group in ((2, GROUP), (3, 96)):  # vector codes: random codes, scales and entries
                if n % group:
                    continue
                vq = [(kernel_buffer(pack_dense(torch.randint(0, 8, (out, n)), 3)),
                       (torch.rand(out, n // group) * 0.01 + 1e-3).half(), torch.randn(8**d, d)) for _ in range(copies)]
                cands[f"ours vq{d} 3-bit g{group}"] = ([partial(ext.vector_gemv, x, *a, group) for a in vq],
                                                       len(vq[0][0]) + out * (n // group) * 2)
            mms = [int4_torch(out, n) for _ in range(copies)]
            mm = torch.ops.aten._weight_int4pack_mm_for_cpu
            cands["torch int4 (_weight_int4pack_mm_for_cpu)"] = ([partial(mm, x, p, GROUP, sz) for p, sz in mms],
                                                                 mms[0][0].numel() + mms[0][1].numel() * 4)  # fmt: skip
            for name, (fns, nbytes) in cands.items():
                t = fns if isinstance(fns, float) else timed(fns, reps)
                rows.append({"layer": label, "out": out, "in": n, "tokens": m, "kernel": name, "us": round(t * 1e6, 1),
                             "bytes": nbytes, "roofline_fraction": round(nbytes / bw / t, 3)})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
            del cands, layers, args, dl, mms, cb, vq
    res = {"bandwidth_gb_s": round(bw / 1e9, 2), "threads": torch.get_num_threads(),
           "working_set_mib": WORKING_SET // 2**20, "l3_mib": last_level_cache() // 2**20,
           "machine": f"{os.cpu_count()} cores, ISA level {ext.isa_level()} (2 = AVX-512)", "rows": rows}  # fmt: skip
    (RESULTS / "cpu_gemv.json").write_text(json.dumps(res, indent=2))
    lines = ["# CPU decode GEMV per layer (benchmarks/cpu_gemv.py)", "",
             f"{res['machine']}, {res['threads']} threads, copy bandwidth {res['bandwidth_gb_s']} GB/s. Each row "
             f"cycles through copies of the layer worth {res['working_set_mib']} MiB of fp32 weights (L3 "
             f"{res['l3_mib']} MiB), so none is cache-resident "
             "(decoding). Group 64. Roofline: bytes read per call / bandwidth / time.", "",
             "| layer | tokens | kernel | µs per call | vs fp32 | roofline |",
             "|---|---:|---|---:|---:|---:|"]  # fmt: skip
    fp32 = {(r["layer"], r["tokens"]): r["us"] for r in rows if r["kernel"] == "fp32 F.linear"}
    for r in rows:
        speed = fp32[(r["layer"], r["tokens"])] / r["us"]
        lines.append(f"| {r['layer']} ({r['out']}x{r['in']}) | {r['tokens']} | {r['kernel']} | {r['us']} | "
                     f"{speed:.2f}x | {r['roofline_fraction']:.2f} |")  # fmt: skip
    (RESULTS / "cpu_gemv.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
