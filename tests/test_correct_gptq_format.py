"""GPTQ import at the edges of the zero-point field, on hand-made folders (the reference codec of test_export,
written from the format's description): v1's ``stored + 1`` at 2, 4 and 8 bits, the 8-bit field 0xFF whose
zero-point 256 has no uint8 form, 3-bit refusal, and the zero-point of 0 that only v2 can carry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_model
from safetensors.numpy import save_file as save_np
from test_export import ref_decode, ref_encode

from quant import QuantError, save_quantized
from quant.formats.gptq_format import export_gptq, load_gptq


def hand_made(tmp_path, tokenizer, bits: int, zero_range: tuple[int, int], v1: bool = True, name: str = "gptq"):
    """A GPTQ folder of the tiny Llama whose zero-points run over all of ``zero_range`` (inclusive) in every
    linear; returns (folder, {module: reference dequantized weight})."""
    m = tiny_model()
    folder = tmp_path / name
    m.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "gptq", "bits": bits, "group_size": 32, "desc_act": False, "sym": False,
        "checkpoint_format": "gptq" if v1 else "gptq_v2",
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(bits)
    lo, hi = zero_range
    state, expect = {}, {}
    for key, p in m.state_dict().items():
        mod = key.rsplit(".", 1)[0]
        if key.endswith("_proj.weight"):
            n_out, k_in = p.shape
            codes = rng.integers(0, 2**bits, (n_out, k_in))
            zeros = rng.integers(lo, hi + 1, (n_out, k_in // 32))
            zeros.flat[:2] = lo, hi  # both edges present in every layer
            scales = (rng.random((k_in // 32, n_out)) * 0.01 + 1e-3).astype(np.float16)
            qweight, qzeros = ref_encode(codes, zeros, bits, v1=v1)
            state |= {f"{mod}.qweight": qweight, f"{mod}.qzeros": qzeros, f"{mod}.scales": scales}
            state[f"{mod}.g_idx"] = (np.arange(k_in) // 32).astype(np.int32)
            expect[mod] = ref_decode(qweight, qzeros, scales, bits, v1=v1)
        elif not key.endswith("lm_head.weight"):
            state[key] = p.numpy()
    save_np(state, str(folder / "model.safetensors"))
    return folder, expect


@pytest.mark.parametrize("bits, zeros", [(2, (1, 4)), (4, (1, 16)), (8, (1, 255))])
def test_v1_zero_points_import_exactly_up_to_the_top_of_the_field(tmp_path, tokenizer, bits, zeros):
    """v1 stores z - 1, so z = 2^bits (2-bit: 4, 4-bit: 16) is the stored all-ones field; 8-bit tops at 255."""
    folder, expect = hand_made(tmp_path, tokenizer, bits, zeros)
    model, _ = load_gptq(folder, dtype=torch.float32)
    for mod, w in expect.items():
        q = model.get_submodule(mod)
        assert (int(q.zeros.min()), int(q.zeros.max())) == zeros, mod
        assert np.array_equal(q.dequantize().numpy(), w), mod


def test_v1_8bit_zero_field_0xff_is_refused_not_wrapped(tmp_path, tokenizer):
    """The live bug: 0xFF + 1 = 256 wrapped to 0 in the uint8 zeros and loaded as a different model."""
    folder, _ = hand_made(tmp_path, tokenizer, 8, (1, 256))
    with pytest.raises(QuantError, match="zero-point of 256"):
        load_gptq(folder)


def test_3bit_gptq_is_refused(tmp_path, tokenizer):
    folder, _ = hand_made(tmp_path, tokenizer, 4, (1, 16))  # GPTQ's 3-bit words straddle: only the header says 3
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantError, match="3-bit GPTQ checkpoints are not supported"):
        load_gptq(folder)


def test_zero_point_of_0_imports_from_v2_and_refuses_v1_export(tmp_path, tokenizer):
    folder, expect = hand_made(tmp_path, tokenizer, 8, (0, 255), v1=False)
    model, _ = load_gptq(folder, dtype=torch.float32)
    for mod, w in expect.items():
        assert np.array_equal(model.get_submodule(mod).dequantize().numpy(), w), mod
    qc = {"method": "gptq-import", "modules": model.lowbit_config["modules"]}
    ck = save_quantized(model, tokenizer, tmp_path / "ours", qc)
    with pytest.raises(QuantError, match="zero-point 0 that use every code"):
        export_gptq(ck, tmp_path / "v1", checkpoint_format="gptq")
    assert not (tmp_path / "v1").exists()
    back, _ = load_gptq(export_gptq(ck, tmp_path / "v2", checkpoint_format="gptq_v2"), dtype=torch.float32)
    for mod, w in expect.items():
        assert np.array_equal(back.get_submodule(mod).dequantize().numpy(), w), mod


def test_a_zero_point_of_0_is_shifted_into_v1_when_the_top_code_is_free(tmp_path, tokenizer):
    """v1 stores zero-1: a group with zero 0 whose codes stay below 2^bits-1 is written as (codes+1, zero 1),
    which dequantizes to the same weights; the reimport must equal the original bit for bit."""
    from quant import QuantContext, RTNConfig, load_quantized, run_pipeline
    from quant.numerics.packing import pack

    m = tiny_model()
    ctx = QuantContext(m, tokenizer)
    run_pipeline(ctx, [("rtn", RTNConfig(bits=4, group_size=32, sym=False))])
    q = m.get_submodule("model.layers.0.mlp.up_proj")
    codes = q.codes().clone()
    codes[3:9, 32:64] = codes[3:9, 32:64].clamp(max=14)  # rows 3-8, group 1: the top code unused
    q.qweight.copy_(pack(codes, 4))
    q.zeros[3:9, 1] = 0
    ck = save_quantized(m, tokenizer, tmp_path / "ours", {"method": "rtn", "modules": ctx.modules})
    ours, _ = load_quantized(ck)
    back, _ = load_gptq(export_gptq(ck, tmp_path / "v1", checkpoint_format="gptq"))
    for name in ours.lowbit_config["modules"]:
        assert torch.equal(back.get_submodule(name).dequantize(), ours.get_submodule(name).dequantize()), name
    assert int(back.get_submodule("model.layers.0.mlp.up_proj").zeros[3, 1]) == 1
