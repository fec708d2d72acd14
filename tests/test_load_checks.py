"""Malformed checkpoints that used to load as a different model are refused in one line: tensors of the
wrong dtype or shape (load_state_dict would convert or broadcast them), non-finite values, stray weight
files, and a quantized folder whose quantization_config was lost (transformers would leave every linear
randomly initialised)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file

from quant import QuantContext, QuantError, RTNConfig, load_quantized, run_pipeline, save_quantized
from quant.formats.gptq_format import export_gptq, load_gptq
from quant.formats.models import load_model


@pytest.fixture
def ours(tmp_path, tokenizer):
    model = tiny_model()
    ctx = QuantContext(model, tokenizer, progress=False)
    run_pipeline(ctx, [("rtn", RTNConfig(bits=4, group_size=32, sym=True))])
    return save_quantized(model, tokenizer, tmp_path / "q", {"method": "rtn", "modules": ctx.modules})


def rewrite(folder, edit, sums: bool = True) -> None:
    """Apply ``edit(state)`` to the folder's model.safetensors and, for our format, rewrite SHA256SUMS to match
    (an attacker or a broken tool can do both, so the checksums cannot be what catches it)."""
    f = folder / "model.safetensors"
    state = load_file(str(f))
    edit(state)
    save_file(state, str(f), metadata={"format": "pt"})
    if sums:
        (folder / "SHA256SUMS").write_text(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  model.safetensors\n")


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "key, cast, match",
    [
        (f"{Q}.scales", torch.bfloat16, "scales is bfloat16"),
        (f"{Q}.scales", torch.int8, "scales is int8"),
        (f"{Q}.qweight", torch.int16, "qweight is int16"),
        ("model.embed_tokens.weight", torch.int32, "embed_tokens.weight is int32"),
        ("model.norm.weight", torch.bool, "norm.weight is bool"),
    ],
)
def test_wrong_dtype_is_refused_in_our_format(ours, key, cast, match):
    rewrite(ours, lambda s: s.__setitem__(key, s[key].to(cast)))
    with pytest.raises(QuantError, match=match):
        load_quantized(ours)


def test_non_finite_and_reshaped_tensors_are_refused_in_our_format(ours):
    rewrite(ours, lambda s: s["model.norm.weight"].__setitem__(0, float("nan")))
    with pytest.raises(QuantError, match="NaN or Inf"):
        load_quantized(ours)


def test_a_float_dtype_requested_on_load_still_loads(ours):
    model, _ = load_quantized(ours)
    half, _ = load_quantized(ours, dtype=torch.float16)
    assert half.model.embed_tokens.weight.dtype == torch.float16
    assert torch.equal(half.get_submodule(Q).qweight, model.get_submodule(Q).qweight)


@pytest.fixture
def gptq(tmp_path, ours):
    return export_gptq(ours, tmp_path / "gptq")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda s: s.__setitem__(f"{Q}.scales", s[f"{Q}.scales"].to(torch.bfloat16)), "scales is bfloat16"),
        (lambda s: s.__setitem__(f"{Q}.qweight", s[f"{Q}.qweight"].to(torch.int16)), "qweight is int16"),
        (lambda s: s.__setitem__(f"{Q}.qzeros", s[f"{Q}.qzeros"][:, :1].contiguous()), "qzeros is int32"),
        (lambda s: s[f"{Q}.scales"].__setitem__((0, 0), float("inf")), "NaN or Inf"),
        (lambda s: s.__setitem__(f"{Q}.bias", torch.ones(1, dtype=torch.float32)), "bias is float32 \\[1\\]"),
        (lambda s: s.__setitem__("model.embed_tokens.weight", s["model.embed_tokens.weight"].to(torch.int32)),
         "embed_tokens.weight is int32"),
    ],
)  # fmt: skip
def test_malformed_gptq_tensors_are_refused(gptq, edit, match):
    rewrite(gptq, edit, sums=False)
    with pytest.raises(QuantError, match=match):
        load_gptq(gptq)


def test_a_stray_safetensors_file_does_not_override_the_gptq_weights(gptq):
    x = torch.randint(0, 1000, (1, 16))
    model, _ = load_gptq(gptq)
    with torch.no_grad():
        ref = model(x).logits
    state = load_file(str(gptq / "model.safetensors"))
    save_file({k: torch.zeros_like(v) for k, v in state.items()}, str(gptq / "zz-stray.safetensors"))
    again, _ = load_gptq(gptq)
    with torch.no_grad():
        assert torch.equal(again(x).logits, ref)


@pytest.mark.parametrize("how", ["removed", "null", "unknown"])
def test_a_quantized_folder_without_its_quantization_config_is_not_loaded_as_float(ours, how):
    """transformers would load it as a float model with every linear randomly initialised, and eval would
    print a perplexity."""
    cfg = json.loads((ours / "config.json").read_text())
    if how == "removed":
        del cfg["quantization_config"]
    else:
        cfg["quantization_config"] = None if how == "null" else {"quant_method": "something-else"}
    (ours / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantError, match="quantiz"):
        load_model(str(ours))


def edit_config(folder, edit) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg["quantization_config"])
    (folder / "config.json").write_text(json.dumps(cfg))


def _set(path: str, value):
    """An edit of quantization_config: ``path`` like "modules/<name>/bits"; value ``...`` deletes it."""

    def edit(qc):
        *parents, leaf = path.split("/")
        d = qc
        for p in parents:
            d = d[p]
        if value is ...:
            del d[leaf]
        else:
            d[leaf] = value

    return edit


@pytest.mark.parametrize(
    "edit, field",
    [
        (_set("modules", ...), "modules must be"),
        (_set("modules", None), "modules must be"),
        (_set("modules", ["a"]), "modules must be"),
        (_set(f"modules/{Q}", 4), rf"modules\['{Q}'\] must be an object"),
        (_set(f"modules/{Q}/bits", ...), rf"modules\['{Q}'\].bits must be"),
        (_set(f"modules/{Q}/bits", 5), rf"modules\['{Q}'\].bits must be"),
        (_set(f"modules/{Q}/group_size", 0), "group_size must be a positive integer"),
        (_set(f"modules/{Q}/group_size", -1), "group_size must be a positive integer"),
        (_set(f"modules/{Q}/group_size", 32.0), "group_size must be a positive integer"),
        (_set(f"modules/{Q}/group_size", "32"), "group_size must be a positive integer"),
        (_set(f"modules/{Q}/group_size", 48), "48 does not divide its 64 inputs"),
        (_set(f"modules/{Q}/format", "awq"), "format is 'awq'"),
        (_set("modules/model.layers.0.input_layernorm", {"bits": 4, "group_size": 32}), "not a linear layer"),
        (_set("modules/model.layers.9.mlp.up_proj", {"bits": 4, "group_size": 32}), "not in the model"),
        (_set("norm_biases", None), "norm_biases must be"),
        (_set("norm_biases", [f"{Q}"]), "which is not a norm"),
        (_set("input_ops", {f"{Q}": {"hadamard": 2**40}}), "hadamard"),
        (_set("input_ops", {f"{Q}": {"hadamard": -1}}), "hadamard"),
        (_set("input_ops", {f"{Q}": {"hadamard": 1.5}}), "hadamard"),
    ],
)
def test_malformed_quantization_config_is_refused_naming_the_field(ours, edit, field):
    edit_config(ours, edit)
    with pytest.raises(QuantError, match=field):
        load_quantized(ours)


@pytest.mark.parametrize(
    "sums, match",
    [
        ("\n", "SHA256SUMS line 1"),
        ("not a checksum line\n", "SHA256SUMS line 1"),
        ("{digest}  ../q/model.safetensors\n", "not a file of the folder"),
        ("{digest}  /etc/passwd\n", "not a file of the folder"),
    ],
)
def test_malformed_or_escaping_checksum_files_are_refused(ours, sums, match):
    digest = hashlib.sha256((ours / "model.safetensors").read_bytes()).hexdigest()
    (ours / "SHA256SUMS").write_text(sums.format(digest=digest))
    with pytest.raises(QuantError, match=match):
        load_quantized(ours)


@pytest.mark.parametrize("text", [b"\xff\xfe not utf-8", b"[1, 2]", b"[" * 100000, b'{"quantization_config": 3}'])
def test_unreadable_or_odd_config_json_is_one_error(ours, text):
    (ours / "config.json").write_bytes(text)
    with pytest.raises(QuantError):
        load_quantized(ours)


# -- the GPTQ settings: one schema for config.json's quantization_config and quantize_config.json --


def _gptq_set(folder, key, value, file: str = "config.json") -> None:
    cfg = json.loads((folder / file).read_text())
    target = cfg["quantization_config"] if file == "config.json" else cfg
    target[key] = value
    (folder / file).write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "key, value, field",
    [
        ("bits", "4", "quantization_config.bits"),
        ("bits", 4.0, "quantization_config.bits"),
        ("bits", None, "quantization_config.bits"),
        ("group_size", 0, "quantization_config.group_size"),
        ("group_size", "32", "quantization_config.group_size"),
        ("group_size", 3.5, "quantization_config.group_size"),
        ("sym", "yes", "quantization_config.sym"),
        ("desc_act", 1, "quantization_config.desc_act"),
        ("checkpoint_format", "marlin", "quantization_config.checkpoint_format"),
        ("pack_dtype", "int16", "quantization_config.pack_dtype"),
    ],
)
def test_malformed_gptq_config_is_refused_naming_the_field(gptq, key, value, field):
    _gptq_set(gptq, key, value)
    with pytest.raises(QuantError, match=field):
        load_gptq(gptq)


def test_gptq_config_files_must_agree_and_either_one_is_enough(gptq):
    ref, _ = load_gptq(gptq)
    cfg = json.loads((gptq / "config.json").read_text())
    del cfg["quantization_config"]  # older AutoGPTQ folders keep the settings in quantize_config.json only
    (gptq / "config.json").write_text(json.dumps(cfg))
    model, _ = load_gptq(gptq)
    x = torch.randint(0, 1000, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)
    _gptq_set(gptq, "group_size", 64, "quantize_config.json")
    with pytest.raises(QuantError, match="qzeros is int32 \\[4, 8\\], expected int32 \\[2, 8\\]"):
        load_gptq(gptq)


def test_gptq_config_and_quantize_config_disagreeing_is_refused(gptq):
    _gptq_set(gptq, "bits", 8, "quantize_config.json")
    with pytest.raises(QuantError, match="disagree on bits"):
        load_model(str(gptq))


# -- config.json: transformers' own errors and absurd sizes are one line, before anything is allocated --


def _edit_model_config(folder, **kw) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in kw.items():
        if v is ...:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("fmt", ["ours", "gptq"])
@pytest.mark.parametrize(
    "edit, match",
    [
        ({"hidden_act": "swishy"}, "hidden_act"),
        ({"num_attention_heads": 0}, "num_attention_heads"),
        ({"num_attention_heads": 3}, "rejected by transformers"),  # 64 wide, 3 heads
        ({"model_type": "no-such-model"}, "unsupported architecture|no-such-model"),
        ({"model_type": ...}, "model_type"),
        ({"dtype": "int8"}, "dtype"),
        ({"vocab_size": 2**40}, "vocab_size"),
        ({"vocab_size": 2**30, "hidden_size": 2**20}, "memory|expected"),  # built on meta: refused, not allocated
        ({"rms_norm_eps": -1e-5}, "rms_norm_eps"),  # transformers takes it; NaN logits at the first forward
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
        ({"attn_implementation": "flash_attention_2"}, "config.json"),
        ({"num_hidden_layers": None}, "num_hidden_layers"),
    ],
)
def test_bad_model_config_is_one_error(ours, gptq, fmt, edit, match):
    folder = ours if fmt == "ours" else gptq
    _edit_model_config(folder, **edit)
    with pytest.raises(QuantError, match=match):
        load_model(str(folder))


def test_no_tensor_is_read_before_the_headers_are_checked(ours, monkeypatch):
    """A checkpoint whose shapes contradict its config is refused from the headers alone."""
    import quant.formats.reader

    def refuse(*a, **k):
        raise AssertionError("tensor data was read before the headers were checked")

    rewrite(ours, lambda s: s.__setitem__(f"{Q}.scales", s[f"{Q}.scales"][:1].clone()))
    monkeypatch.setattr(quant.formats.reader, "read_tensors", refuse)
    with pytest.raises(QuantError, match="scales is float16 \\[1, "):
        load_quantized(ours)


@pytest.mark.parametrize("what", ["fifo", "dev-zero", "sparse-1TiB", "directory"])
@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "SHA256SUMS"])
def test_special_and_endless_files_are_refused_without_reading_them(ours, what, name):
    """Run in a child with a timeout: without the regular-file check a FIFO blocks for ever."""
    import os
    import subprocess
    import sys

    f = ours / name
    f.unlink()
    if what == "fifo":
        os.mkfifo(f)
    elif what == "dev-zero":
        os.symlink("/dev/zero", f)
    elif what == "directory":
        f.mkdir()
    else:
        with open(f, "wb") as fh:
            fh.truncate(2**40)
    code = (
        "from quant import QuantError, load_quantized\n"
        "try:\n    load_quantized(%r)\nexcept QuantError as e:\n    print('REFUSED', e)"
    )
    out = subprocess.run([sys.executable, "-c", code % str(ours)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "REFUSED" in out.stdout and name in out.stdout, out.stderr[-500:]


# -- weights: which files, each name once, tied heads --


def test_a_tensor_stored_twice_is_refused(ours):
    state = load_file(str(ours / "model.safetensors"))
    save_file({f"{Q}.scales": torch.zeros_like(state[f"{Q}.scales"])}, str(ours / "extra.safetensors"))
    with open(ours / "SHA256SUMS", "a") as f:
        f.write(f"{hashlib.sha256((ours / 'extra.safetensors').read_bytes()).hexdigest()}  extra.safetensors\n")
    with pytest.raises(QuantError, match="stored twice"):
        load_quantized(ours)


def test_a_weight_file_linked_to_a_device_is_refused(ours):
    import os

    (ours / "model.safetensors").unlink()
    os.symlink("/dev/zero", ours / "model.safetensors")
    with pytest.raises(QuantError, match="not a regular file"):
        load_quantized(ours)


def test_an_index_that_disagrees_with_the_checksums_is_refused(ours):
    (ours / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "other.safetensors"}}))
    with pytest.raises(QuantError, match="index.json does not name the files"):
        load_quantized(ours)


@pytest.mark.parametrize("fmt", ["ours", "gptq"])
def test_an_extra_lm_head_in_a_tied_checkpoint_must_equal_the_embedding(ours, gptq, fmt):
    """Some tools store both; only a copy of the embedding is accepted (tied, only one can be used)."""
    folder = ours if fmt == "ours" else gptq
    x = torch.randint(0, 1000, (1, 8))
    loader = load_quantized if fmt == "ours" else load_gptq
    ref, _ = loader(folder)
    rewrite(folder, lambda s: s.__setitem__("lm_head.weight", s["model.embed_tokens.weight"].clone()), fmt == "ours")
    same, _ = loader(folder)
    with torch.no_grad():
        assert torch.equal(same(x).logits, ref(x).logits)
    rewrite(folder, lambda s: s.__setitem__("lm_head.weight", torch.zeros_like(s["lm_head.weight"])), fmt == "ours")
    with pytest.raises(QuantError, match="lm_head.weight differs from the embedding"):
        loader(folder)


@pytest.mark.parametrize("fmt", ["ours", "gptq"])
def test_pickles_are_never_unpickled(ours, gptq, fmt, tmp_path):
    import pickle

    sentinel = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(sentinel)!r}, 'w').write('x')",))

    folder = ours if fmt == "ours" else gptq
    (folder / "model.safetensors").write_bytes(pickle.dumps(Evil()))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(QuantError):
        load_model(str(folder))
    assert not sentinel.exists()


# -- tokenizer files --


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: [(d / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")], "cannot load the tok"),
        (lambda d: (d / "tokenizer.json").write_text('{"model": '), "tokenizer"),
        (lambda d: (d / "tokenizer_config.json").write_text("[]"), "tokenizer_config.json holds a list"),
        (lambda d: (d / "tokenizer_config.json").write_bytes(b"\xff\xfe"), "tokenizer_config.json is not UTF-8"),
    ],
)
def test_broken_or_missing_tokenizer_files_are_one_error(ours, edit, match):
    edit(ours)
    with pytest.raises(QuantError, match=match):
        load_quantized(ours)


# -- the CLI: inspect reads odd reports, eval refuses a perplexity that overflows --


@pytest.mark.parametrize(
    "report", [b'{"sizes": {"bits_per', b"[]", b'{"sizes": 3, "perplexity_quantized": {"ppl": "x"}}', b"\xff"]
)
def test_inspect_survives_a_truncated_or_odd_report(ours, report):
    from typer.testing import CliRunner

    from cli import app

    (ours / "quant_report.json").write_bytes(report)
    res = CliRunner().invoke(app, ["inspect", str(ours)])
    assert res.exception is None or isinstance(res.exception, (QuantError, SystemExit)), res.exception
    if res.exit_code == 0:
        assert "quantized linears" in res.output


def test_inspect_describes_a_gptq_folder(gptq):
    from typer.testing import CliRunner

    from cli import app

    res = CliRunner().invoke(app, ["inspect", str(gptq)])
    assert res.exit_code == 0 and "GPTQ (gptq), 4 bits, group size 32" in res.output, res.output


def test_a_perplexity_that_overflows_is_an_error_not_a_traceback(tokenizer):
    from quant.runtime.perplexity import perplexity

    model = tiny_model()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1e4)  # logits in the millions: NLL far past exp()'s range
    ids = torch.randint(0, 1000, (64,))
    with pytest.raises(QuantError, match="perplexity overflows"):
        perplexity(model, ids, seqlen=32, progress=False)


def test_a_static_activation_scale_that_is_not_positive_is_refused(tmp_path, tokenizer, calib):
    from quant import ActQuantConfig

    model = tiny_model()
    ctx = QuantContext(model, tokenizer, calib_ids=calib[:2, :64], progress=False)
    run_pipeline(ctx, [("rtn", RTNConfig(bits=4, group_size=32)), ("actquant", ActQuantConfig(8, mode="static"))])
    out = save_quantized(model, tokenizer, tmp_path / "q", {"method": "rtn", "modules": ctx.modules})
    key = f"{Q}.input_ops.act_scale"
    rewrite(out, lambda s: s.__setitem__(key, -s[key]))
    with pytest.raises(QuantError, match="act_scale is -"):
        load_quantized(out)
