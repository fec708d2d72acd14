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
from quant.gptq_format import export_gptq, load_gptq
from quant.models import load_model


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
