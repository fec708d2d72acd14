"""The CUDA low-bit GEMM kernels (kernels_cuda/).

* CPU (always run): the kernel layout round-trips and decodes (emulated exactly as the CUDA code
  does) to the reference weights; launch configurations respect the kernel's limits; CPU
  ``QuantLinear`` never touches the kernel package; importing it needs no nvcc.
* Compile check (needs nvcc, no GPU): the .cu compiles to objects for sm_80 and sm_90 without
  register spills; the torch binding passes a C++ syntax check against the installed torch.
* GPU (skipped without CUDA): the kernel against a float64 reference on fresh random data every
  run, NaN-poisoned outputs, odd shapes, every bit width, group size, dtype and batch size; forced
  launch configurations; QuantLinear dispatch; SmolLM2 greedy tokens (slow).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

import pytest
import torch

import kernels_cuda
from kernels_cuda import build, dispatch
from kernels_cuda.layout import TILE_N, emulate_dequant, repack, unpack_kernel_codes
from quant.numerics.grid import QuantSpec, dequantize_weight, quantize_rtn
from quant.numerics.packing import pack
from quant.runtime.quantlinear import QuantLinear

GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (kernel correctness runs only there)")
ROWS = (1, 2, 3, 7, 16, 17, 33, 64)
GROUPS = (32, 64, 128, -1)  # -1: per-channel (group = k)
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def random_quantized(n: int, k: int, bits: int, group: int, device: str = "cpu"):
    """Random codes/scales/zeros of a [n, k] layer (fresh every call: no fixed seed)."""
    g = k if group == -1 else group
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, device=device)
    scales = (torch.rand(n, k // g, device=device) * 0.02 + 1e-3).to(torch.float16)
    zeros = torch.randint(0, 2**bits, (n, k // g), dtype=torch.uint8, device=device)
    return codes, scales, zeros, g


# --- CPU: layout ---------------------------------------------------------------------------------

LAYOUT_SHAPES = [(32, 128), (70, 576), (33, 640), (96, 100), (200, 1152)]


@pytest.mark.parametrize("bits", (2, 3, 4))
@pytest.mark.parametrize("group", GROUPS)
def test_layout_round_trip_and_emulated_decode(bits, group):
    for n, k in LAYOUT_SHAPES:
        if group != -1 and k % group:
            continue
        codes, scales, zeros, g = random_quantized(n, k, bits, group)
        kw = repack(pack(codes, bits), scales, zeros, bits, g, k)
        assert torch.equal(unpack_kernel_codes(kw.qweight, bits, n, k), codes)
        # fp16: the kernel's tensor-core operand is the reference fp16 weight, bit for bit
        ref16 = dequantize_weight(codes, scales, zeros, g, torch.float16)
        assert torch.equal(emulate_dequant(kw, torch.float16), ref16)
        # bf16: the fp16 scale is rounded to bf16 first, then the product once more
        G = k // g
        q = codes.double().view(n, G, g) - zeros.double()[..., None]
        ref_bf = (q * scales.to(torch.bfloat16).double()[..., None]).view(n, k).to(torch.bfloat16)
        assert torch.equal(emulate_dequant(kw, torch.bfloat16), ref_bf)


def test_dense_int3_moves_three_quarters_of_int4():
    n, k = 256, 4096
    sizes = {}
    for bits in (3, 4):
        codes, scales, zeros, g = random_quantized(n, k, bits, 128)
        sizes[bits] = repack(pack(codes, bits), scales, zeros, bits, g, k).qweight.numel()
    assert sizes[3] * 4 == sizes[4] * 3
    assert sizes[4] == n * k // 8  # no padding at tile multiples


def test_group_params_layout_is_lane_order():
    n, k = 40, 256
    codes, scales, zeros, g = random_quantized(n, k, 4, 64)
    kw = repack(pack(codes, 4), scales, zeros, 4, g, k)
    rec = kw.scales.view(-1, k // g, TILE_N)
    for tn in range(rec.shape[0]):
        for slot in range(TILE_N):
            row = tn * TILE_N + slot // 4 + 8 * (slot % 4)
            want = scales[row] if row < n else torch.zeros(k // g, dtype=torch.float16)
            assert torch.equal(rec[tn, :, slot], want)


# --- CPU: the kernel's data flow, simulated warp by warp -------------------------------------------


def _mma(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mma.m16n8k16 on per-lane fragments, as the PTX ISA defines them (g = lane / 4, t = lane % 4).

    a: [32 lanes, 4 regs, 2] (a0: row g, cols 2t+e; a1: row g+8; a2: row g, cols 2t+8+e; a3: row
    g+8, cols 2t+8+e); b: [32, 2 regs, 2] (b0: k = 2t+e, n = g; b1: k = 2t+8+e). Returns the C
    fragment [32, 4] (c0, c1: row g, cols 2t, 2t+1; c2, c3: row g+8)."""
    A = torch.zeros(16, 16, dtype=torch.float64)
    B = torch.zeros(16, 8, dtype=torch.float64)
    for lane in range(32):
        g, t = divmod(lane, 4)
        for e in range(2):
            A[g, 2 * t + e], A[g + 8, 2 * t + e] = a[lane, 0, e], a[lane, 1, e]
            A[g, 2 * t + 8 + e], A[g + 8, 2 * t + 8 + e] = a[lane, 2, e], a[lane, 3, e]
            B[2 * t + e, g], B[2 * t + 8 + e, g] = b[lane, 0, e], b[lane, 1, e]
    D = A @ B
    c = torch.empty(32, 4, dtype=torch.float64)
    for lane in range(32):
        g, t = divmod(lane, 4)
        c[lane] = torch.stack([D[g, 2 * t], D[g, 2 * t + 1], D[g + 8, 2 * t], D[g + 8, 2 * t + 1]])
    return c


def _ldmatrix_x4(rows: list[torch.Tensor]) -> torch.Tensor:
    """ldmatrix .x4: lane 8 i + r supplies row r of matrix i; lane l receives, in register i, elements
    2 (l % 4), +1 of row l / 4 of matrix i. Returns [32, 4 regs, 2]."""
    out = torch.empty(32, 4, 2, dtype=torch.float64)
    for lane in range(32):
        for i in range(4):
            out[lane, i] = rows[8 * i + lane // 4][2 * (lane % 4) : 2 * (lane % 4) + 2]
    return out


def _simulate_kernel(x: torch.Tensor, w: torch.Tensor, bias, wn: int, wk: int, splits: int) -> torch.Tensor:
    """Transliteration of gemm_kernel's control and data flow (rounds, x staging with zero fill,
    ldmatrix addresses, fragment use, split-K, in-block reduction, output mapping) with exact
    float64 arithmetic. ``w`` is the padded [ntiles * 32, kt * 128] tensor-core operand; its
    padding holds garbage that the zero-filled x must cancel. Keep in sync with lowbit_gemm.cu."""
    m, k = x.shape
    n = bias.numel()
    ntiles, num_kt = w.shape[0] // 32, w.shape[1] // 128
    nt = dispatch._nt(m)
    y = torch.full((m, n), float("nan"), dtype=torch.float64)
    ws = torch.zeros(m, n, dtype=torch.float64)
    per_split = -(-num_kt // splits)
    xs_stride = wk * 128 + 8
    for by in range(splits):
        kt_begin = by * per_split
        kt_end = min(num_kt, kt_begin + per_split)
        if kt_begin >= kt_end:
            continue
        rounds = -(-(kt_end - kt_begin) // wk)
        for bx in range(-(-ntiles // wn)):
            xbuf = torch.full((2, m, xs_stride), float("nan"), dtype=torch.float64)  # poisoned smem
            zero_row = torch.zeros(8, dtype=torch.float64)

            def stage(rnd: int, b: int, xbuf=xbuf, kt_begin=kt_begin) -> None:
                k0 = (kt_begin + rnd * wk) * 128
                for tok in range(m):
                    for cu in range(wk * 16):
                        kk = k0 + cu * 8
                        vals = [x[tok, kk + e].item() if kk + e < k else 0.0 for e in range(8)]
                        xbuf[b, tok, cu * 8 : cu * 8 + 8] = torch.tensor(vals, dtype=torch.float64)

            acc = torch.zeros(wn, wk, 2, nt, 32, 4, dtype=torch.float64)
            stage(0, 0)
            for rnd in range(rounds):
                if rnd + 1 < rounds:
                    stage(rnd + 1, (rnd + 1) & 1)
                for wn_i in range(wn):
                    tn = bx * wn + wn_i
                    for wk_i in range(wk):
                        kt = kt_begin + rnd * wk + wk_i
                        if tn >= ntiles or kt >= kt_end:
                            continue
                        for ks0 in range(0, 8, 2):
                            a = torch.empty(2, 2, 32, 4, 2, dtype=torch.float64)  # [h][mi][lane][reg][e]
                            for h in range(2):
                                for mi in range(2):
                                    for lane in range(32):
                                        g, t = divmod(lane, 4)
                                        for r in range(4):
                                            row = tn * 32 + 16 * mi + g + 8 * (r & 1)
                                            col = kt * 128 + 16 * (ks0 + h) + 2 * t + 8 * (r >> 1)
                                            a[h, mi, lane, r] = w[row, col : col + 2]
                            for j in range(nt):
                                rows = []
                                for lane in range(32):
                                    tok = 8 * j + (lane & 7)
                                    kofs = wk_i * 128 + 8 * (lane >> 3) + 16 * ks0
                                    rows.append(xbuf[rnd & 1, tok, kofs : kofs + 8] if tok < m else zero_row)
                                b = _ldmatrix_x4(rows)
                                for h in range(2):
                                    for mi in range(2):
                                        acc[wn_i, wk_i, mi, j] += _mma(a[h, mi], b[:, 2 * h : 2 * h + 2])
            for wn_i in range(wn):
                tn = bx * wn + wn_i
                if tn >= ntiles:
                    continue
                tot = acc[wn_i].sum(0)  # the in-block reduction over wk
                for mi in range(2):
                    for c in range(4):
                        for lane in range(32):
                            g, t = divmod(lane, 4)
                            row = tn * 32 + 16 * mi + g + 8 * (c >> 1)
                            for j in range(nt):
                                tok = 8 * j + 2 * t + (c & 1)
                                if row >= n or tok >= m:
                                    continue
                                v = tot[mi, j, lane, c] + (bias[row] if by == 0 else 0.0)
                                if splits > 1:
                                    ws[tok, row] += v
                                else:
                                    y[tok, row] = v
    return ws if splits > 1 else y


@pytest.mark.parametrize(
    ("m", "wn", "wk", "splits"),
    [(1, 1, 1, 1), (3, 1, 2, 1), (9, 2, 1, 1), (9, 1, 4, 2), (17, 2, 2, 3), (5, 3, 1, 2)],
)
def test_simulated_kernel_data_flow(m, wn, wk, splits):
    n, k = 70, 300  # 3 row tiles (last one partial), 3 k tiles (last one partial)
    w = torch.randn(96, 384, dtype=torch.float64)  # padding = garbage, cancelled by x's zero fill
    x = torch.randn(m, k, dtype=torch.float16).double()
    bias = torch.randn(n, dtype=torch.float64)
    y = _simulate_kernel(x, w, bias, wn, wk, splits)
    ref = x @ w[:n, :k].T + bias
    assert torch.isfinite(y).all()
    assert torch.allclose(y, ref, rtol=1e-12, atol=1e-9)


# --- CPU: dispatch -------------------------------------------------------------------------------


def test_launch_config_respects_kernel_limits():
    shapes = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192), (8192, 28672), (576, 576), (70, 100)]
    for max_smem in (48 * 1024, 163 * 1024, 227 * 1024):  # default, A100 and H100 opt-in limits
        for n, k in shapes:
            for m in range(1, 65):
                wn, wk, splits = dispatch.launch_config(m, n, k, 132, max_smem)
                kt = -(-k // 128)
                max_warps = 16 if m <= 16 else 8
                assert 32 * wn * wk <= 32 * max_warps
                assert dispatch.smem_bytes(m, wn, wk) <= max_smem
                assert wk == 1 or wk <= kt
                # and k-splitting warps are as many as the limits allow: twice as many would break one of them
                assert wk == max_warps or 2 * wk > kt or dispatch.smem_bytes(m, 1, 2 * wk) > max_smem, (m, n, k)
                if m <= 16:
                    assert splits == 1  # decode sums are deterministic
    # H100 decode on the Llama shapes: 16 k-splitting warps per row tile up to 16 tokens
    assert dispatch.launch_config(1, 4096, 4096, 132, 227 * 1024) == (1, 16, 1)
    assert dispatch.launch_config(16, 4096, 4096, 132, 227 * 1024) == (1, 16, 1)


def _layer(bits: int = 4, group: int = 64, n: int = 96, k: int = 256, bias: bool = True) -> QuantLinear:
    w = torch.randn(n, k)
    b = torch.randn(n) if bias else None
    return QuantLinear.from_quantized(quantize_rtn(w, QuantSpec(bits, group, clip="minmax")), b)


def test_cpu_forward_never_touches_the_kernel_package(monkeypatch):
    monkeypatch.delitem(sys.modules, "kernels_cuda.dispatch", raising=False)

    def boom():
        raise AssertionError("CPU forward must not load the extension")

    monkeypatch.setattr(kernels_cuda, "load_extension", boom)
    layer = _layer()
    x = torch.randn(3, 256)
    y = layer(x)  # served by the CPU kernel (kernels_cpu) or dequantize + matmul, never the CUDA package
    assert "kernels_cuda.dispatch" not in sys.modules
    torch.testing.assert_close(y, torch.nn.functional.linear(x, layer.dequantize(), layer.bias), rtol=1e-5, atol=1e-4)


def test_enabled_switches(monkeypatch):
    monkeypatch.delenv("LOWBIT_KERNELS", raising=False)
    assert kernels_cuda.enabled()
    with kernels_cuda.disabled():
        assert not kernels_cuda.enabled()
        with kernels_cuda.disabled():
            assert not kernels_cuda.enabled()
        assert not kernels_cuda.enabled()
    assert kernels_cuda.enabled()
    for off in ("0", "false", "OFF"):
        monkeypatch.setenv("LOWBIT_KERNELS", off)
        assert not kernels_cuda.enabled()


def test_unsupported_reasons(monkeypatch):
    monkeypatch.delenv("LOWBIT_KERNELS", raising=False)
    layer = _layer(bits=4, group=64, k=256)
    x16 = torch.randn(2, 256, dtype=torch.float16)
    assert dispatch.unsupported_reason(layer, x16) is None
    assert dispatch.unsupported_reason(layer, x16.float())[0].startswith("dtype")
    assert dispatch.unsupported_reason(layer, torch.randn(65, 256, dtype=torch.float16))[0] == "rows"
    assert dispatch.unsupported_reason(layer, x16.requires_grad_())[0] == "autograd"
    assert dispatch.unsupported_reason(_layer(bits=8), torch.randn(2, 256, dtype=torch.float16))[0] == "bits-8"
    with kernels_cuda.disabled():
        assert dispatch.unsupported_reason(layer, torch.randn(2, 256, dtype=torch.float16))[0] == "disabled"


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only torch (the build must fail)")
def test_failed_build_is_reported_once_and_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(kernels_cuda.EXTENSION, "module", None)
    monkeypatch.setattr(kernels_cuda.EXTENSION, "error", None)
    monkeypatch.setattr(kernels_cuda, "_seen", set())
    monkeypatch.delenv("LOWBIT_KERNELS", raising=False)
    layer = _layer()
    x = torch.randn(2, 256, dtype=torch.float16)
    with caplog.at_level("INFO", logger="lowbit.kernels"):
        with pytest.warns(RuntimeWarning, match="CPU-only"):
            assert dispatch.kernel_forward(layer, x) is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a second call must stay quiet
            assert dispatch.kernel_forward(layer, x) is None
    fallbacks = [r for r in caplog.records if "dequantize + matmul" in r.getMessage()]
    assert len(fallbacks) == 1 and "build failed" in fallbacks[0].getMessage()


def test_import_needs_no_nvcc(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env["PATH"] = str(Path(sys.executable).parent)  # no nvcc on it
    env["CUDA_HOME"] = str(tmp_path / "no-cuda-here")
    code = "import quant, kernels_cuda, kernels_cuda.dispatch, kernels_cuda.build, kernels_cuda.layout; print('ok')"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=Path.cwd())
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


# --- compile check (nvcc, no GPU) ------------------------------------------------------------------


@pytest.mark.skipif(build.find_nvcc() is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
def test_kernels_compile_for_sm80_and_sm90(tmp_path):
    objects = build.compile_check(tmp_path)
    assert [o.name for o in objects] == ["lowbit_gemm.sm_80.o", "lowbit_gemm.sm_90.o"]
    nm = shutil.which("nm")
    if nm:  # the symbols binding.cpp links against are defined
        syms = subprocess.run([nm, "-C", str(objects[0])], capture_output=True, text=True).stdout
        for name in ("lowbit::gemm_launch", "lowbit::gemm_smem_bytes", "lowbit::gemm_error_string"):
            assert any(name in line and " T " in line for line in syms.splitlines()), name


@pytest.mark.skipif(shutil.which("c++") is None, reason="no host C++ compiler")
def test_binding_compiles_against_installed_torch():
    from torch.utils.cpp_extension import include_paths

    py_include = sysconfig.get_paths()["include"]
    if not (Path(py_include) / "Python.h").is_file():
        pytest.skip(f"no Python headers at {py_include}")
    cmd = [
        "c++",
        "-fsyntax-only",
        "-std=c++20",  # what torch.utils.cpp_extension uses for torch >= 2.10
        "-DTORCH_EXTENSION_NAME=lowbit_check",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        *(f"-I{p}" for p in include_paths()),
        f"-I{py_include}",
        f"-I{build.CSRC}",
        str(build.BINDING_SOURCE),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]


# --- GPU -----------------------------------------------------------------------------------------


def _reference(x: torch.Tensor, codes, scales, zeros, g: int, bias=None) -> torch.Tensor:
    w = dequantize_weight(codes, scales, zeros, g, torch.float64)
    y = x.double() @ w.T
    return y if bias is None else y + bias.double()


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


KERNEL_SHAPES = [(96, 128), (200, 576), (33, 640), (70, 100), (1000, 1152), (1024, 4096)]


@needs_gpu
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("bits", (2, 3, 4))
def test_kernel_matches_float64_reference(bits, group, dtype):
    dev = "cuda"
    for n, k in KERNEL_SHAPES:
        if group != -1 and k % group:
            continue
        codes, scales, zeros, g = random_quantized(n, k, bits, group, dev)
        kw = repack(pack(codes, bits), scales, zeros, bits, g, k)
        bias = torch.randn(n, device=dev, dtype=dtype)
        w_t = dequantize_weight(codes, scales, zeros, g, dtype)
        for m in ROWS:
            x = torch.randn(m, k, device=dev, dtype=dtype)
            out = torch.full((m, n), float("nan"), device=dev, dtype=dtype)
            y = dispatch.lowbit_matmul(x, kw, bias, out=out)
            torch.cuda.synchronize()
            assert torch.isfinite(y).all(), f"unwritten/NaN outputs: bits={bits} g={g} n={n} k={k} m={m}"
            ref = _reference(x, codes, scales, zeros, g, bias)
            err = _rel_err(y, ref)
            err_torch = _rel_err(torch.nn.functional.linear(x, w_t, bias), ref)
            ctx = f"bits={bits} g={g} {dtype} n={n} k={k} m={m}: err {err:.2e}, dequant path {err_torch:.2e}"
            assert err < 4 * EPS[dtype], ctx
            assert err < 2 * err_torch + EPS[dtype] / 8, ctx


@needs_gpu
@pytest.mark.parametrize("bits", (3, 4))
def test_forced_launch_configs(bits):
    """Every block shape / split-K combination gives the same answer (not only the heuristic's)."""
    n, k, dev = 330, 2048, "cuda"
    codes, scales, zeros, g = random_quantized(n, k, bits, 64, dev)
    kw = repack(pack(codes, bits), scales, zeros, bits, g, k)
    max_smem = kernels_cuda.load_extension().max_smem(torch.cuda.current_device())
    for m in (1, 5, 16, 24, 40):
        x = torch.randn(m, k, device=dev, dtype=torch.float16)
        ref = _reference(x, codes, scales, zeros, g)
        for wn, wk, splits in [(1, 1, 1), (1, 2, 1), (2, 2, 3), (4, 1, 2), (1, 4, 5), (2, 4, 1), (1, 8, 2), (1, 16, 1)]:
            if 32 * wn * wk > (512 if m <= 16 else 256) or dispatch.smem_bytes(m, wn, wk) > max_smem:
                continue
            out = torch.full((m, n), float("nan"), device=dev, dtype=torch.float16)
            y = dispatch.lowbit_matmul(x, kw, out=out, config=(wn, wk, splits))
            assert _rel_err(y, ref) < 4 * EPS[torch.float16], (m, wn, wk, splits)


@needs_gpu
def test_smem_formula_matches_extension():
    ext = kernels_cuda.load_extension()
    assert ext is not None, kernels_cuda.extension_error()
    assert ext.max_smem(torch.cuda.current_device()) >= dispatch.DEFAULT_SMEM
    for m in ROWS:
        for wn in (1, 2, 4):
            for wk in (1, 2, 4, 8, 16):
                assert ext.smem_bytes(m, wn, wk) == dispatch.smem_bytes(m, wn, wk)


@needs_gpu
def test_unaligned_and_strided_inputs():
    n, k, dev = 128, 1024, "cuda"
    codes, scales, zeros, g = random_quantized(n, k, 4, 128, dev)
    kw = repack(pack(codes, 4), scales, zeros, 4, g, k)
    base = torch.randn(5 * k + 1, device=dev, dtype=torch.float16)
    x = base[1:].view(5, k)  # 2-byte offset: the kernel must take its scalar staging path
    assert _rel_err(dispatch.lowbit_matmul(x, kw), _reference(x, codes, scales, zeros, g)) < 4 * EPS[torch.float16]
    xt = torch.randn(k, 6, device=dev, dtype=torch.float16).T  # non-contiguous
    assert _rel_err(dispatch.lowbit_matmul(xt, kw), _reference(xt, codes, scales, zeros, g)) < 4 * EPS[torch.float16]


@needs_gpu
def test_quantlinear_dispatches_to_kernel_on_cuda(monkeypatch):
    monkeypatch.delenv("LOWBIT_KERNELS", raising=False)
    calls = []
    real = dispatch.lowbit_matmul
    monkeypatch.setattr(dispatch, "lowbit_matmul", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for bits in (3, 4):
        layer = _layer(bits=bits, group=64, n=300, k=576).cuda().half()
        x = torch.randn(2, 7, 576, device="cuda", dtype=torch.float16)
        before = len(calls)
        y = layer(x)
        assert len(calls) == before + 1 and y.shape == (2, 7, 300)
        with kernels_cuda.disabled():
            y_ref = layer(x)
        assert len(calls) == before + 1
        assert _rel_err(y, y_ref.double()) < 4 * EPS[torch.float16]
        layer(torch.randn(65, 576, device="cuda", dtype=torch.float16))  # prefill: falls back
        assert len(calls) == before + 1
        # in-place change of the buffers (load_state_dict does this) must re-pack
        layer.scales.mul_(2)
        y2 = layer(x)
        assert _rel_err(y2 - layer.bias, 2 * (y - layer.bias).double()) < 4 * EPS[torch.float16]


@needs_gpu
@pytest.mark.slow
def test_smollm2_greedy_tokens_match_dequant_path(smollm2):
    import copy

    from quant import QuantContext, run_pipeline
    from quant.methods.quantizers import RTNConfig

    model = copy.deepcopy(smollm2.model)
    run_pipeline(QuantContext(model, smollm2.tokenizer, progress=False), [("rtn", RTNConfig(bits=4, group_size=64))])
    model = model.half().cuda().eval()
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids.cuda()
    with torch.no_grad():
        fast = model.generate(ids, max_new_tokens=32, do_sample=False)
        with kernels_cuda.disabled():
            slow = model.generate(ids, max_new_tokens=32, do_sample=False)
    assert torch.equal(fast, slow)
