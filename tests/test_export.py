"""Shipping: GPTQ-format export and import, the Hub upload (against a local stub of the Hub's API),
the model card, and loading our checkpoints through ``transformers.from_pretrained``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_model
from hub_stub import HubStub
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save_file as save_np
from test_cli import assert_one_line_error, run

from quant import QuantContext, QuantError, RTNConfig, load_quantized, run_pipeline, save_quantized
from quant.formats.gptq_format import export_gptq, load_gptq
from quant.formats.hub import stage, upload
from quant.methods.d2quant import D2QuantConfig


def quantized_tiny(tmp_path, tokenizer, steps, name="ck", norm_biases=(), report=None):
    m = tiny_model()
    ctx = QuantContext(m, tokenizer)
    run_pipeline(ctx, steps)
    qc = {"method": steps[-1][0], "modules": ctx.modules, "norm_biases": list(ctx.norm_biases) + list(norm_biases)}
    return save_quantized(m, tokenizer, tmp_path / name, qc, report=report)


# ---- a reference GPTQ codec written from the format's description, independent of quant.formats.gptq_format ----


def ref_decode(qweight, qzeros, scales, bits, v1=True):
    """Dequantized ``[N, K]`` weight from GPTQ tensors, element by element in numpy."""
    pf, mask = 32 // bits, 2**bits - 1
    qw, qz = qweight.view(np.uint32), qzeros.view(np.uint32)
    k_all, n_all = qw.shape[0] * pf, qw.shape[1]
    g = k_all // scales.shape[0]
    k = np.arange(k_all)[:, None]
    n = np.arange(n_all)[None, :]
    q = (qw[k // pf, n] >> (bits * (k % pf))) & mask
    z = ((qz[k // g, n // pf] >> (bits * (n % pf))) & mask).astype(np.int64) + (1 if v1 else 0)
    return ((q.astype(np.int64) - z) * scales[k // g, n].astype(np.float32)).T


def ref_encode(codes, zeros, bits, v1=True):
    """GPTQ ``qweight``/``qzeros`` from ``codes [N, K]`` and ``zeros [N, G]``, word by word."""
    pf = 32 // bits
    n_out, k_in = codes.shape
    qweight = np.zeros((k_in // pf, n_out), dtype=np.uint32)
    for k in range(k_in):
        qweight[k // pf] |= codes[:, k].astype(np.uint32) << np.uint32(bits * (k % pf))
    stored = (zeros.T.astype(np.int64) - (1 if v1 else 0)) & (2**bits - 1)
    qzeros = np.zeros((zeros.shape[1], (n_out + pf - 1) // pf), dtype=np.uint32)
    for n in range(n_out):
        qzeros[:, n // pf] |= stored[:, n].astype(np.uint32) << np.uint32(bits * (n % pf))
    return qweight.view(np.int32), qzeros.view(np.int32)


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_export_matches_the_format(tmp_path, tokenizer, bits):
    ck = quantized_tiny(tmp_path, tokenizer, [("rtn", RTNConfig(bits=bits, group_size=32, sym=True))])
    out = export_gptq(ck, tmp_path / "gptq")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg | {"meta": None} == json.loads((out / "quantize_config.json").read_text()) | {"meta": None}
    assert (cfg["quant_method"], cfg["bits"], cfg["group_size"], cfg["desc_act"], cfg["sym"]) == (
        "gptq",
        bits,
        32,
        False,
        True,
    )
    assert cfg["checkpoint_format"] == "gptq"
    ours, _ = load_quantized(ck)
    t = load_np(str(out / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    assert t[f"{name}.qweight"].shape == (128 // (32 // bits), 64)
    assert np.array_equal(t[f"{name}.g_idx"], np.arange(128) // 32)
    w = ref_decode(t[f"{name}.qweight"], t[f"{name}.qzeros"], t[f"{name}.scales"], bits)
    assert np.array_equal(w, ours.get_submodule(name).dequantize().numpy())
    assert not any(k.endswith("down_proj.weight") for k in t)


def test_gptq_round_trip_and_v2(tmp_path, tokenizer):
    ck = quantized_tiny(tmp_path, tokenizer, [("rtn", RTNConfig(bits=4, group_size=32))])  # asymmetric
    ours, _ = load_quantized(ck)
    # v1 cannot hold a zero-point of 0 (tests/test_correct_gptq_format.py checks that refusal); this checkpoint has
    # none, so both layouts must be written and read back exactly
    assert all(bool((ours.get_submodule(n).zeros > 0).all()) for n in ours.lowbit_config["modules"])
    x = torch.randint(0, 1000, (1, 24))
    for fmt in ("gptq", "gptq_v2"):
        out = export_gptq(ck, tmp_path / fmt, checkpoint_format=fmt)
        assert json.loads((out / "config.json").read_text())["quantization_config"]["checkpoint_format"] == fmt
        back, _ = load_gptq(out)
        for name in back.lowbit_config["modules"]:
            assert torch.equal(back.get_submodule(name).dequantize(), ours.get_submodule(name).dequantize())
        with torch.no_grad():
            assert torch.equal(back(x).logits, ours(x).logits)


def test_import_a_hand_made_v1_checkpoint(tmp_path, tokenizer):
    """A GPTQ v1 folder encoded by the reference codec (as another tool writes it) imports exactly,
    including a stored zero field of 15, which v1 consumers read as zero-point 16."""
    m = tiny_model()
    m.save_pretrained(tmp_path / "float")
    tokenizer.save_pretrained(tmp_path / "gptq")
    cfg = json.loads((tmp_path / "float" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False}
    (tmp_path / "gptq" / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    state, expect = {}, {}
    for name, p in m.state_dict().items():
        mod = name.rsplit(".", 1)[0]
        if name.endswith("_proj.weight"):
            n_out, k_in = p.shape
            codes = rng.integers(0, 16, (n_out, k_in))
            zeros = rng.integers(1, 17, (n_out, k_in // 32))  # 16 is stored as 15 in v1
            scales = (rng.random((k_in // 32, n_out)) * 0.01 + 1e-3).astype(np.float16)
            qweight, qzeros = ref_encode(codes, zeros, 4)
            state |= {f"{mod}.qweight": qweight, f"{mod}.qzeros": qzeros, f"{mod}.scales": scales}
            state[f"{mod}.g_idx"] = (np.arange(k_in) // 32).astype(np.int32)
            expect[mod] = ref_decode(qweight, qzeros, scales, 4)
        elif not name.endswith("lm_head.weight"):
            state[name] = p.numpy()
    save_np(state, str(tmp_path / "gptq" / "model.safetensors"))
    model, _ = load_gptq(tmp_path / "gptq", dtype=torch.float32)
    assert len(expect) == 14
    for mod, w in expect.items():
        assert np.array_equal(model.get_submodule(mod).dequantize().numpy(), w), mod
    # re-exported (through our own format) it is the same file content, tensor for tensor
    qc = {"method": "gptq-import", "modules": model.lowbit_config["modules"]}
    ck = save_quantized(model, tokenizer, tmp_path / "ours", qc)
    again = load_np(str(export_gptq(ck, tmp_path / "again") / "model.safetensors"))
    for key, value in state.items():
        assert np.array_equal(again[key], value), key


def test_gptq_import_refuses_act_order_and_pickles(tmp_path, tokenizer):
    ck = quantized_tiny(tmp_path, tokenizer, [("rtn", RTNConfig(bits=4, group_size=32, sym=True))])
    out = export_gptq(ck, tmp_path / "gptq")
    t = load_np(str(out / "model.safetensors"))
    t["model.layers.0.self_attn.q_proj.g_idx"] = np.random.default_rng(0).permutation(64).astype(np.int32) // 32
    save_np(t, str(out / "model.safetensors"))
    with pytest.raises(QuantError, match="act-order"):
        load_gptq(out)
    (out / "model.safetensors").rename(out / "pytorch_model.bin")
    with pytest.raises(QuantError, match="pickled weights are never loaded"):
        load_gptq(out)


def test_gptq_export_refuses_what_it_cannot_express(tmp_path, tokenizer, calib):
    cases = {
        "dsq": ([("d2quant", D2QuantConfig(bits=3, group_size=32, backend="rtn", dac=False))], (), "DSQ"),
        "dac": ([("rtn", RTNConfig(bits=4, group_size=32, sym=True))], ["model.norm"], "DAC norm biases"),
        "3bit": ([("rtn", RTNConfig(bits=3, group_size=32, sym=True))], (), "3-bit"),
    }
    for name, (steps, biases, pattern) in cases.items():
        m = tiny_model()
        ctx = QuantContext(m, tokenizer, calib_ids=calib)
        run_pipeline(ctx, steps)
        qc = {"method": steps[-1][0], "modules": ctx.modules, "norm_biases": list(ctx.norm_biases) + list(biases)}
        if biases:
            from quant.runtime.dac import add_norm_bias

            add_norm_bias(m.model.norm, torch.zeros(64))
        ck = save_quantized(m, tokenizer, tmp_path / name, qc)
        with pytest.raises(QuantError, match=pattern):
            export_gptq(ck, tmp_path / f"{name}-gptq")
        assert not (tmp_path / f"{name}-gptq").exists()


def test_gptq_export_carries_per_module_settings_in_dynamic(tmp_path, tokenizer):
    """Mixed widths, mixed groups and a block linear left in float: GPTQModel's ``dynamic`` overrides (which
    vLLM also reads) say so, and the import gives the same logits as our checkpoint."""
    import re

    m = tiny_model()
    over = {"model.layers.0.mlp.up_proj": {"bits": 8}, "model.layers.1.mlp.up_proj": {"bits": 8}}
    over.update({f"model.layers.{i}.mlp.down_proj": {"group_size": 64} for i in (0, 1)})
    over["model.layers.1.self_attn.q_proj"] = {"bits": 2}
    ctx = QuantContext(m, tokenizer, overrides=over)
    run_pipeline(ctx, [("rtn", RTNConfig(bits=4, group_size=32, sym=True))])
    float_name = "model.layers.0.self_attn.k_proj"  # put one linear back in float
    q = m.get_submodule(float_name)
    lin = torch.nn.Linear(q.in_features, q.out_features, bias=False)
    lin.weight.data = q.dequantize().float()
    m.model.layers[0].self_attn.k_proj = lin
    del ctx.modules[float_name]
    ck = save_quantized(m, tokenizer, tmp_path / "mixed", {"method": "rtn", "modules": ctx.modules})
    out = export_gptq(ck, tmp_path / "mixed-gptq")
    gc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (gc["bits"], gc["group_size"], gc["sym"]) == (4, 32, True)  # the most common setting is the base
    dyn = gc["dynamic"]
    assert dyn[r"+:model\.layers\.\d+\.mlp\.up_proj$"]["bits"] == 8  # one pattern for both blocks
    assert dyn[r"+:model\.layers\.\d+\.mlp\.down_proj$"]["group_size"] == 64
    assert dyn[r"+:model\.layers\.1\.self_attn\.q_proj$"] == {"bits": 2, "group_size": 32, "sym": True,
                                                                  "desc_act": False}  # fmt: skip
    assert dyn[r"-:model\.layers\.0\.self_attn\.k_proj$"] == {}
    assert json.loads((out / "quantize_config.json").read_text())["dynamic"] == dyn
    # the patterns select exactly the intended layers (re.match, first match wins: how GPTQModel and vLLM read it)
    names = [f"model.layers.{i}.{r}" for i in (0, 1) for r in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj")]
    hits = {n: [p for p in dyn if re.match(p[2:], n)] for n in names}
    assert hits["model.layers.0.self_attn.q_proj"] == [] and len(hits["model.layers.1.mlp.up_proj"]) == 1
    ours, _ = load_quantized(ck)
    back, _ = load_gptq(out)
    assert type(back.model.layers[0].self_attn.k_proj) is torch.nn.Linear
    assert back.get_submodule("model.layers.1.self_attn.q_proj").bits == 2
    x = torch.randint(0, 49152, (2, 17))
    with torch.no_grad():
        assert torch.equal(ours(x).logits, back(x).logits)


@pytest.mark.parametrize(
    "dynamic, match",
    [
        ({"+:(a+)+$": {"bits": 8}}, "nested quantifiers"),
        ({"+:model[": {"bits": 8}}, "not a regular expression"),
        ({"+:model": {"bits": 3}}, "3-bit GPTQ"),
        ({"+:model": {"group_size": "x"}}, "group_size"),
        ({"+:model": {"adapter": 1}}, "some of bits"),
        ({"-:model\\.layers\\.0\\.mlp\\.up_proj$": {}}, "dynamic excludes"),
        ([], "dynamic must be an object"),
    ],
)
def test_gptq_dynamic_overrides_are_validated(tmp_path, tokenizer, dynamic, match):
    m = tiny_model()
    ctx = QuantContext(m, tokenizer)
    run_pipeline(ctx, [("rtn", RTNConfig(bits=4, group_size=32, sym=True))])
    out = export_gptq(save_quantized(m, tokenizer, tmp_path / "q", {"method": "rtn", "modules": ctx.modules}),
                      tmp_path / "g")  # fmt: skip
    for f in ("config.json", "quantize_config.json"):
        cfg = json.loads((out / f).read_text())
        (cfg["quantization_config"] if f == "config.json" else cfg)["dynamic"] = dynamic
        (out / f).write_text(json.dumps(cfg))
    with pytest.raises(QuantError, match=match):
        load_gptq(out)


def test_from_pretrained_matches_load_quantized_with_dsq_and_dac(tmp_path, tokenizer, calib):
    from transformers import AutoModelForCausalLM

    steps = [("d2quant", D2QuantConfig(bits=3, group_size=32, backend="gptq", dac=True))]
    m = tiny_model()
    ctx = QuantContext(m, tokenizer, calib_ids=calib)
    run_pipeline(ctx, steps)
    assert ctx.norm_biases and any(s["format"] == "dsq" for s in ctx.modules.values())
    qc = {"method": "d2quant", "modules": ctx.modules, "norm_biases": ctx.norm_biases}
    ck = save_quantized(m, tokenizer, tmp_path / "ck", qc)
    a, _ = load_quantized(ck)
    b = AutoModelForCausalLM.from_pretrained(ck)
    x = torch.randint(0, 49152, (2, 33))
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)


def test_dry_run_writes_the_upload_set_with_a_model_card(tmp_path, tokenizer):
    report = {
        "base_model": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"},
        "perplexity_float": {"ppl": 21.6, "windows": 4, "total_windows": 148},
        "perplexity_quantized": {"ppl": 25.1, "windows": 4, "total_windows": 148},
    }
    ck = quantized_tiny(tmp_path, tokenizer, [("rtn", RTNConfig(bits=4, group_size=32))], report=report)
    r = run("export", ck, "--dry-run", "--out", tmp_path / "dry", "--to-hub", "me/tiny-w4")
    assert r.returncode == 0, r.stderr
    names = sorted(f.name for f in (tmp_path / "dry").iterdir())
    assert names == sorted([*(f.name for f in ck.iterdir()), "README.md"])
    assert all(n in r.stdout for n in names)
    card = (tmp_path / "dry" / "README.md").read_text()
    head = card.split("---")[1]
    assert "license: apache-2.0" in head and "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in head
    assert "| this checkpoint | 25.100 |" in card and "4-bit: 14" in card and 'from_pretrained("me/tiny-w4")' in card


def test_export_bad_input(tmp_path, tokenizer, tiny_dir):
    ck = quantized_tiny(tmp_path, tokenizer, [("rtn", RTNConfig(bits=4, group_size=32))])
    assert_one_line_error(run("export", ck), "nothing to do")
    assert_one_line_error(run("export", ck, "--dry-run"), "--out")
    assert_one_line_error(run("export", ck, "--format", "awq", "--out", tmp_path / "x"), "unknown --format")
    assert_one_line_error(run("export", tiny_dir, "--dry-run", "--out", tmp_path / "y"), "not a lowbit checkpoint")
    (tmp_path / "taken").mkdir()
    assert_one_line_error(run("export", ck, "--dry-run", "--out", tmp_path / "taken"), "already exists")


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # only 127.0.0.1 is reached
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the stub speaks LFS, not Xet
    with HubStub() as stub:
        yield stub


def test_upload_to_a_stub_hub_and_resume(tmp_path, tokenizer, hub):
    ck = quantized_tiny(tmp_path, tokenizer, [("rtn", RTNConfig(bits=4, group_size=32))])
    expected = {n: (tmp_path / "dry" / n).read_bytes() for n in stage(ck, tmp_path / "dry", "me/tiny")}
    hub.state.fail_commits = 100  # the connection dies after the blobs went up
    with pytest.raises(QuantError, match="upload to me/tiny failed"):
        upload(ck, "me/tiny", private=True, token="hf_test", endpoint=hub.endpoint)
    sent = list(hub.state.lfs_uploads)
    assert sent, "the large files went up before the commit failed"
    hub.state.fail_commits = 0
    url = upload(ck, "me/tiny", private=True, token="hf_test", endpoint=hub.endpoint)
    assert hub.state.lfs_uploads == sent, "a resumed upload sends no blob twice"
    assert url.startswith(hub.endpoint) and "/me/tiny/commit/" in url
    repo = hub.state.repos["me/tiny"]
    assert repo["private"] and repo["branches"]["main"] == expected
    upload(ck, "me/tiny", revision="w4-g32", token="hf_test", endpoint=hub.endpoint)
    assert repo["branches"]["w4-g32"] == expected
    with pytest.raises(QuantError, match="ORG/NAME"):
        upload(ck, "no-namespace", endpoint=hub.endpoint)


@pytest.mark.slow
def test_smollm2_w4_gptq_round_trip_and_from_pretrained(tmp_path, smollm2):
    """Real model: ours -> GPTQ -> our importer gives identical weights and logits; from_pretrained too."""
    from transformers import AutoModelForCausalLM

    from quant.formats.models import load_model

    lm = load_model()
    ctx = QuantContext(lm.model, lm.tokenizer)
    run_pipeline(ctx, [("rtn", RTNConfig(bits=4, group_size=64, sym=True))])
    ck = save_quantized(lm.model, lm.tokenizer, tmp_path / "ck", {"method": "rtn", "modules": ctx.modules})
    ours, _ = load_quantized(ck)
    back, _ = load_gptq(export_gptq(ck, tmp_path / "gptq"))
    assert len(back.lowbit_config["modules"]) == 210
    for name in back.lowbit_config["modules"]:
        assert torch.equal(back.get_submodule(name).dequantize(), ours.get_submodule(name).dequantize()), name
    hf = AutoModelForCausalLM.from_pretrained(ck)
    x = lm.tokenizer("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = ours(x).logits
        assert torch.equal(back(x).logits, ref)
        assert torch.equal(hf(x).logits, ref)


def test_cli_evaluates_a_gptq_folder_like_the_original(tmp_path, tokenizer):
    ck = quantized_tiny(tmp_path, tokenizer, [("rtn", RTNConfig(bits=4, group_size=32, sym=True))])
    r = run("export", ck, "--format", "gptq", "--out", tmp_path / "gptq")
    assert r.returncode == 0 and "quantize_config.json" in r.stdout, r.stderr
    ppl = {}
    for name in ("ck", "gptq"):
        r = run("eval", tmp_path / name, "--max-windows", "1", "--json", tmp_path / f"{name}.json")
        assert r.returncode == 0, r.stderr
        res = json.loads((tmp_path / f"{name}.json").read_text())
        assert res["quantized"]
        ppl[name] = res["ppl"]
    assert ppl["ck"] == ppl["gptq"]
