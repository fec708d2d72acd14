"""8-bit scales (format uniform-dq8): the per-row grid, dense codes, the solvers, checkpoints and exporters."""

import json

import pytest
import torch

from quant import GPTQConfig, QuantContext, QuantError, RTNConfig, load_quantized, run_pipeline
from quant.formats.checkpoint import save_quantized
from quant.formats.gptq_format import export_gptq
from quant.methods.d2quant import D2QuantConfig
from quant.methods.gptq import gptq_quantize
from quant.numerics.grid import QuantSpec, quantize_rtn
from quant.numerics.packing import pack, pack_dense, unpack, unpack_dense
from quant.numerics.scalecodes import LEVELS, ScaleGrid, pack_nibbles, unpack_nibbles
from quant.runtime.quantlinear import QuantLinear, ScaleCodedLinear, quantized_sizes


def test_grid_holds_every_scale_of_its_row_within_half_a_step():
    gen = torch.Generator().manual_seed(0)
    scales = torch.exp(torch.randn(7, 40, generator=gen)).to(torch.float16).float()  # rows spanning ~e^5
    grid = ScaleGrid.fit(scales)
    codes = grid.encode(scales)
    back = grid.decode(codes).float()
    assert codes.dtype == torch.uint8 and int(codes.max()) == LEVELS and int(codes.min()) == 0
    ratio = (back / scales).log2().abs()
    assert (ratio <= grid.step / 2 + 2**-10).all()  # half a step, plus fp16's rounding of the decoded value
    assert torch.equal(grid.decode(grid.encode(back)), back.half())  # grid points are fixed points
    stored = ScaleGrid.from_stored(grid.stored())
    assert torch.equal(stored.decode(codes), grid.decode(codes))  # what the checkpoint holds decodes the same


def test_grid_caps_a_row_at_two_to_the_sixteen():
    scales = torch.tensor([[1e-8, 1.0, 2.0, 4.0]])
    grid = ScaleGrid.fit(scales)
    assert float(grid.base) == pytest.approx(4.0 * 2**-16, rel=1e-3)  # the tiny group is raised, not the row coarsened
    assert float(grid.step) <= 16 / LEVELS * 1.001
    assert torch.equal(grid.encode(torch.tensor([[4.0]])), torch.tensor([[LEVELS]], dtype=torch.uint8))


def test_grid_of_a_row_of_equal_scales_is_exact():
    scales = torch.full((3, 5), 0.0123).half().float()
    grid = ScaleGrid.fit(scales)
    assert torch.equal(grid.decode(grid.encode(scales)), scales.half())


def test_every_grid_point_encodes_to_its_own_code_in_narrow_rows():
    # rows whose scales span a few percent (a rotated model's): fp16's rounding of a decoded scale must not move it
    # to a neighbouring code, or a stored scale would not be the one the codes were computed with
    gen = torch.Generator().manual_seed(3)
    scales = (1 + 0.05 * torch.rand(64, 24, generator=gen)) * torch.logspace(-4, 1, 64)[:, None]
    grid = ScaleGrid.fit(scales)
    codes = torch.arange(LEVELS + 1, dtype=torch.uint8).expand(64, -1)
    assert torch.equal(grid.encode(grid.decode(codes).float()), codes)
    snapped = grid.snap(scales.T[:, :, None])  # as the clip search calls it: [factors, rows, 1]
    assert torch.equal(grid.decode(grid.encode(snapped[..., 0].T)).float(), snapped[..., 0].T)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_dense_packing_roundtrips_and_matches_the_kernel_layout(bits):
    codes = torch.randint(0, 2**bits, (5, 48), generator=torch.Generator().manual_seed(bits))
    dense = pack_dense(codes, bits)
    assert dense.shape == (5, 48 // 8 * bits) and dense.dtype == torch.uint8
    assert torch.equal(unpack_dense(dense, bits, 48), codes.to(torch.uint8))
    assert torch.equal(unpack(pack(codes, bits), bits, 48), unpack_dense(dense, bits, 48))
    if bits == 3:  # code i of a run of 8 at bit 3i: codes 0..7 -> 0b111_110_101_100_011_010_001_000
        assert pack_dense(torch.arange(8)[None], 3).tolist() == [[0x88, 0xC6, 0xFA]]
    with pytest.raises(QuantError):
        pack_dense(codes[:, :44], bits)


def test_nibbles_roundtrip():
    z = torch.randint(0, 16, (4, 9), dtype=torch.uint8)
    p = pack_nibbles(z)
    assert p.shape == (4, 5) and torch.equal(unpack_nibbles(p, 9), z)


@pytest.mark.parametrize("solver", ["rtn", "gptq"])
def test_solvers_keep_every_scale_on_its_grid_at_about_the_fp16_error(solver):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(48, 256, generator=gen) * torch.linspace(0.2, 3, 256)  # column ranges differ
    x = torch.randn(1024, 256, generator=gen)
    H = x.T @ x / len(x)

    def run(scale_bits):
        spec = QuantSpec(3, 64, clip="mse", scale_bits=scale_bits)
        return quantize_rtn(w, spec) if solver == "rtn" else gptq_quantize(w, H, spec)

    q16, q8 = run(16), run(8)
    assert q16.scale_grid is None and q8.scale_grid is not None
    assert torch.equal(q8.scale_grid.decode(q8.scale_grid.encode(q8.scales)), q8.scales)
    assert int(q8.zeros.max()) <= 7
    err = {k: float(((q.dequantize() - w) @ x.T).pow(2).mean()) for k, q in (("16", q16), ("8", q8))}
    assert err["8"] <= 1.05 * err["16"], err  # the grid's half step (~0.5% of a scale here) costs about nothing
    layer = QuantLinear.from_quantized(q8)
    assert isinstance(layer, ScaleCodedLinear)
    assert torch.equal(layer.dequantize(), q8.dequantize())
    assert torch.equal(layer.codes(), q8.codes) and torch.equal(layer.zeros, q8.zeros)
    # 3 bits per code + 8 per group scale + 4 per zero + 2 x 16 per row
    bits = quantized_sizes(torch.nn.Sequential(layer))["bits_per_weight"]
    assert bits == pytest.approx(3 + 8 / 64 + 4 / 64 + 32 / 256, abs=1e-3)


def test_8bit_scales_need_bits_up_to_4():
    with pytest.raises(QuantError, match="bits <= 4"):
        QuantSpec(8, 64, scale_bits=8)
    with pytest.raises(QuantError, match="scale bits"):
        QuantSpec(3, 64, scale_bits=12)


def test_the_cpu_kernel_reads_8bit_scale_layers(monkeypatch):
    pytest.importorskip("kernels_cpu")
    import kernels_cpu

    if kernels_cpu.EXTENSION.load() is None:
        pytest.skip(f"no CPU kernel build: {kernels_cpu.EXTENSION.error}")
    w = torch.randn(40, 192, generator=torch.Generator().manual_seed(2))
    layer = QuantLinear.from_quantized(quantize_rtn(w, QuantSpec(4, 64, scale_bits=8)))
    x = torch.randn(3, 192)
    ref = x.double() @ layer.dequantize().double().T
    with torch.no_grad():
        y = layer(x)  # decoding-sized: the kernel, float32 tokens
    assert layer.__dict__["_cpu_kernel_plan"][2] is None  # the kernel served it
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)


def _quantize(model, tokenizer, name, config, calib=None):
    ctx = QuantContext(model, tokenizer, calib_ids=calib, progress=False)
    passes = run_pipeline(ctx, [(name, config)])
    passes = [{"name": p["name"], "config": p["config"]} for p in passes]
    return {"method": name, "modules": ctx.modules, "passes": passes}


def check_reload_and_version(tmp_path, model, tokenizer, qc: dict, fmt: str, version: int, cls) -> None:
    """``qc``'s modules are all ``fmt``: saved as format ``version``, reloaded bit-exactly as ``cls``, and a config
    of the version before it, which cannot name ``fmt``, refused in one line."""
    assert {m["format"] for m in qc["modules"].values()} == {fmt}
    out = save_quantized(model, tokenizer, tmp_path / "q", qc)
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["format_version"] == version
    model2, _ = load_quantized(out)
    ids = torch.randint(0, 49152, (2, 32))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model2(ids).logits)
    layer = model2.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(layer, cls) and layer.qcodes.dtype == torch.uint8
    saved["format_version"] = version - 1
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = saved
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantError, match=f"is '{fmt}'; format version {version - 1} knows"):
        load_quantized(out)


def test_checkpoint_with_8bit_scales_reloads_bit_exactly_as_version_2(tmp_path, tiny_llama, tokenizer, calib):
    qc = _quantize(tiny_llama, tokenizer, "gptq", GPTQConfig(bits=3, group_size=32, scale_bits=8), calib)
    check_reload_and_version(tmp_path, tiny_llama, tokenizer, qc, "uniform-dq8", 2, ScaleCodedLinear)


def test_checkpoint_without_8bit_scales_stays_version_1(tmp_path, tiny_llama, tokenizer):
    qc = _quantize(tiny_llama, tokenizer, "rtn", RTNConfig(bits=4, group_size=32))
    out = save_quantized(tiny_llama, tokenizer, tmp_path / "q", qc)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format_version"] == 1


def test_corrupt_scale_grid_is_refused(tmp_path, tiny_llama, tokenizer):
    from tests.test_load_checks import rewrite

    qc = _quantize(tiny_llama, tokenizer, "rtn", RTNConfig(bits=3, group_size=32, scale_bits=8))
    out = save_quantized(tiny_llama, tokenizer, tmp_path / "q", qc)

    def poison(state):
        state["model.layers.1.self_attn.o_proj.scale_grid"][3, 0] = -1.0  # a negative base: every scale negative

    rewrite(out, poison)
    with pytest.raises(QuantError, match="o_proj has invalid scales"):
        load_quantized(out)


def test_gptq_export_refuses_8bit_scales(tmp_path, tiny_llama, tokenizer):
    qc = _quantize(tiny_llama, tokenizer, "rtn", RTNConfig(bits=4, group_size=32, scale_bits=8))
    out = save_quantized(tiny_llama, tokenizer, tmp_path / "q", qc)
    with pytest.raises(QuantError, match="8-bit scales"):
        export_gptq(out, tmp_path / "g")
    assert not (tmp_path / "g").exists()


def test_d2quant_with_8bit_scales_absorbs_dsq_column_scales_into_the_grid(tokenizer, calib):
    from tests.conftest import tiny_model

    float_model = tiny_model("llama")
    model = tiny_model("llama")
    qc = _quantize(model, tokenizer, "d2quant", D2QuantConfig(bits=3, group_size=32, scale_bits=8), calib)
    formats = {n.rsplit(".", 1)[-1]: m["format"] for n, m in qc["modules"].items()}
    assert formats["down_proj"] == "dsq" and formats["up_proj"] == "uniform-dq8"
    ids = calib[:2, :64]
    with torch.no_grad():
        ref, out = float_model(ids).logits, model(ids).logits
    assert torch.isfinite(out).all()
    assert (out - ref).pow(2).mean() < 0.5 * ref.pow(2).mean()  # the absorbed column scale kept the MLP's output
