"""quantize -> save -> load on a tiny random Llama: bit-exact reload, atomic writes, corrupt files."""

import hashlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

import quant.formats.checkpoint as ckpt_mod
from quant import (
    GPTQConfig,
    QuantContext,
    QuantError,
    QuantLinear,
    RTNConfig,
    load_quantized,
    run_pipeline,
    save_quantized,
)
from quant.runtime.perplexity import perplexity, tokenize_eval


def _quantize(model, tokenizer, step, calib=None):
    ctx = QuantContext(model, tokenizer, calib_ids=calib, progress=False)
    passes = run_pipeline(ctx, [step])
    return {
        "method": step[0],
        "modules": ctx.modules,
        "passes": [{"name": p["name"], "config": p["config"]} for p in passes],
    }


def _qlinears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize(
    "step", [("rtn", RTNConfig(bits=3, group_size=32)), ("gptq", GPTQConfig(bits=4, group_size=64))]
)
def test_save_load_bit_exact(tmp_path, tiny_llama, tokenizer, calib, step):
    qc = _quantize(tiny_llama, tokenizer, step, calib)
    assert len(qc["modules"]) == 14  # 2 blocks x 7 linears
    out = save_quantized(tiny_llama, tokenizer, tmp_path / "q", qc, report={"note": "test"})
    model2, tok2 = load_quantized(out)
    a, b = _qlinears(tiny_llama), _qlinears(model2)
    assert a.keys() == b.keys()
    for name in a:
        for buf in ("qweight", "scales", "zeros"):
            assert torch.equal(getattr(a[name], buf), getattr(b[name], buf)), (name, buf)
    ids = torch.randint(0, 49152, (2, 64))
    with torch.no_grad():
        assert torch.equal(tiny_llama(ids).logits, model2(ids).logits)
    assert model2.lm_head.weight is model2.model.embed_tokens.weight  # tied embeddings survive
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "lowbit" and config["format_version"] == 1
    assert config["packing"] == "rowpack-int32-v1"
    assert config["modules"]["model.layers.0.mlp.down_proj"]["bits"] == step[1].bits
    assert (out / "quant_report.json").is_file() and (out / "tokenizer.json").is_file()
    # end to end: the reloaded model evaluates, to exp(mean NLL of each next token) of its first window
    ids = tokenize_eval(tok2)
    res = perplexity(model2, ids, seqlen=256, max_windows=1, progress=False)
    window = ids[:256]
    with torch.no_grad():
        nll = F.cross_entropy(model2(window[None]).logits[0, :-1].double(), window[1:]).item()
    assert res["windows"] == 1 and res["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_sharded_checkpoint_reloads(tmp_path, tiny_llama, tokenizer):
    qc = _quantize(tiny_llama, tokenizer, ("rtn", RTNConfig(bits=4, group_size=32)))
    out = save_quantized(tiny_llama, tokenizer, tmp_path / "q", qc, max_shard_bytes=2 * 2**20)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    model2, _ = load_quantized(out)
    ids = torch.randint(0, 49152, (1, 32))
    with torch.no_grad():
        assert torch.equal(tiny_llama(ids).logits, model2(ids).logits)


def test_existing_output_refused_and_untouched(tmp_path, tiny_llama, tokenizer):
    qc = _quantize(tiny_llama, tokenizer, ("rtn", RTNConfig(bits=4, group_size=32)))
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(QuantError, match="already exists"):
        save_quantized(tiny_llama, tokenizer, out, qc)
    assert (out / "keep.txt").read_text() == "mine"
    save_quantized(tiny_llama, tokenizer, out, qc, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # no temp or backup folders left


def test_interrupted_save_leaves_nothing(tmp_path, tiny_llama, tokenizer, monkeypatch):
    qc = _quantize(tiny_llama, tokenizer, ("rtn", RTNConfig(bits=4, group_size=32)))

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(tiny_llama, tokenizer, tmp_path / "q", qc)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def saved(tmp_path, tiny_llama, tokenizer):
    qc = _quantize(tiny_llama, tokenizer, ("rtn", RTNConfig(bits=4, group_size=32)))
    return save_quantized(tiny_llama, tokenizer, tmp_path / "q", qc)


def test_checksums_are_the_files_sha256(saved):
    """SHA256SUMS is what ``sha256sum -c`` reads: one "<sha256 hex>  <file>" line per weight file."""
    lines = (saved / "SHA256SUMS").read_text().splitlines()
    files = sorted(saved.glob("*.safetensors"))
    assert lines == [f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}" for f in files]


def test_truncated_checkpoint_detected(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(QuantError, match="corrupt checkpoint.*checksum"):
        load_quantized(saved)


def test_altered_byte_detected(saved):
    f = saved / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(QuantError, match="checksum"):
        load_quantized(saved)


def test_missing_tensor_detected(saved):
    from safetensors.torch import load_file, save_file

    f = saved / "model.safetensors"
    state = load_file(str(f))
    del state["model.layers.1.mlp.up_proj.scales"]
    save_file(state, str(f))
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    (saved / "SHA256SUMS").write_text(f"{digest}  model.safetensors\n")
    with pytest.raises(QuantError, match="missing"):
        load_quantized(saved)


def test_not_a_checkpoint(tmp_path, tiny_dir):
    with pytest.raises(QuantError, match="not a lowbit checkpoint"):
        load_quantized(tiny_dir)
    with pytest.raises(QuantError, match="no config.json"):
        load_quantized(tmp_path)


def test_per_module_bits_override_reloads(tmp_path, tiny_llama, tokenizer, calib):
    # a bit-allocation pass (NSDS) sets per-module bits through ctx.overrides; the checkpoint must keep them
    ctx = QuantContext(tiny_llama, tokenizer, calib_ids=calib, progress=False)
    ctx.overrides = {"model.layers.0.mlp.down_proj": {"bits": 2}, "model.layers.1.self_attn.q_proj": {"bits": 8}}
    run_pipeline(ctx, [("gptq", GPTQConfig(bits=3, group_size=32))])
    assert ctx.modules["model.layers.0.mlp.down_proj"]["bits"] == 2
    assert ctx.modules["model.layers.1.self_attn.q_proj"]["bits"] == 8
    assert ctx.modules["model.layers.0.mlp.up_proj"]["bits"] == 3
    out = save_quantized(tiny_llama, tokenizer, tmp_path / "q", {"method": "gptq", "modules": ctx.modules})
    model2, _ = load_quantized(out)
    assert model2.model.layers[0].mlp.down_proj.bits == 2 and model2.model.layers[1].self_attn.q_proj.bits == 8
    ids = torch.randint(0, 49152, (1, 32))
    with torch.no_grad():
        assert torch.equal(tiny_llama(ids).logits, model2(ids).logits)
