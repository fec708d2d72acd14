"""The GPTQ checkpoint format (``quant_method: "gptq"``): export ours into it, and import it into ours.

The format is what transformers (through GPTQModel), vLLM and SGLang load. Per linear ``<name>``
(K = in_features, N = out_features, ``pf = 32 // bits`` codes per int32 word):

* ``qweight`` int32 ``[K / pf, N]``: codes packed along K (input row ``k`` in word ``k // pf`` at bit
  offset ``bits * (k % pf)``): our row packing applied to the transposed code matrix.
* ``qzeros``  int32 ``[K / g, N / pf]``: zero-points packed along N.
* ``scales``  fp16  ``[K / g, N]``.
* ``g_idx``   int32 ``[K]``: the group of each input row (``k // g`` without act-order).

Both use ``w = (q - z) * s``, so our uniform codes, scales and zeros carry over bit for bit. The
legacy v1 layout (``checkpoint_format: "gptq"``, the one every consumer reads) stores ``z - 1`` and
loaders add 1 back; ``gptq_v2`` (GPTQModel) stores ``z``. A zero-point of 0 has no v1 encoding
(``-1`` wraps and the +1 on load carries into the neighbouring field), so such checkpoints refuse v1.

Only what the format can say is exported: one bit width (2, 4 or 8; 3-bit codes straddle words in
GPTQ's layout and no serving kernel reads them) and one group size for every quantized linear, every
linear of every block quantized, no DSQ codes, no DAC norm biases. Anything else is refused with the
reason and the alternative (our own format, which ``quantize export --to-hub`` ships as is).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from quant.errors import QuantError
from quant.formats import reader
from quant.formats.atomic import atomic_dir
from quant.formats.checkpoint import check_output_dir, load_quantized, read_quantization_config
from quant.formats.qconfig import GPTQ_BITS, GPTQ_FORMATS, GPTQ_KEYS, gptq_module_settings, validate_gptq
from quant.formats.tensor_checks import check_tensor
from quant.numerics.packing import pack, unpack
from quant.runtime.quantlinear import QuantLinear

CHECKPOINT_FORMATS = GPTQ_FORMATS
GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")
ZERO_MAX = 255  # QuantLinear.zeros is uint8


def _v1_codes(name: str, q: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and zero-points for the v1 layout, which stores ``zero - 1`` and so has no encoding for a
    zero-point of 0. A group with zero 0 that never uses the top code is stored as ``(codes + 1, zero 1)``:
    the same weights, exactly. A group that uses every code cannot be, and is refused."""
    codes, zeros = q.codes().to(torch.int64), q.zeros.to(torch.int64)
    z0 = zeros == 0
    if not bool(z0.any()):
        return codes, zeros
    n, g = q.out_features, q.group_size
    top = codes.view(n, -1, g).amax(-1) == 2**q.bits - 1
    if bool((z0 & top).any()):
        raise QuantError(
            f"cannot write the legacy GPTQ v1 layout: {name} has groups with zero-point 0 that use every code, "
            "which v1 cannot store (it keeps zero-1). Use --checkpoint-format gptq_v2 (GPTQModel reads it; vLLM "
            "reads only v1), or quantize with --sym"
        )
    return codes + z0.repeat_interleave(g, dim=1), zeros + z0


def _gptq_tensors(name: str, q: QuantLinear, v1: bool) -> dict[str, torch.Tensor]:
    maxq = 2**q.bits - 1
    codes, zeros = _v1_codes(name, q) if v1 else (q.codes(), q.zeros.to(torch.int64))
    if v1:
        zeros = zeros - 1  # >= 0 after _v1_codes
    return {
        "qweight": pack(codes, q.bits).t().contiguous(),
        "qzeros": pack((zeros & maxq).t(), q.bits).contiguous(),
        "scales": q.scales.t().contiguous(),
        "g_idx": (torch.arange(q.in_features, dtype=torch.int32) // q.group_size),
    }


def _setting(q: QuantLinear, sym: bool) -> tuple[int, int, bool]:
    """(bits, GPTQ group size, sym) of one layer; a group spanning the whole row is GPTQ's -1."""
    return q.bits, -1 if q.group_size == q.in_features else q.group_size, sym


def _dynamic(settings: dict[str, tuple | None], base: tuple) -> dict:
    """GPTQModel's ``dynamic`` overrides for every layer whose setting is not ``base`` (``None``: not quantized).

    Layers that differ only by their block index share one pattern (``model\\.layers\\.\\d+\\.mlp\\.down_proj$``)
    when every layer it matches has the same setting; otherwise each gets an exact pattern."""

    def entry(setting):
        bits, group, sym = setting
        return {"bits": bits, "group_size": group, "sym": sym, "desc_act": False}

    def general(name: str) -> str:
        return re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(name)) + "$"

    by_pattern: dict[str, set] = {}
    for name, setting in settings.items():
        by_pattern.setdefault(general(name), set()).add(setting)
    out: dict[str, dict] = {}
    for name, setting in settings.items():
        if setting == base:
            continue
        pattern = general(name) if len(by_pattern[general(name)]) == 1 else re.escape(name) + "$"
        out[("-:" if setting is None else "+:") + pattern] = {} if setting is None else entry(setting)
    return out


def _check_exportable(qc: dict, model: torch.nn.Module, linears: dict[str, QuantLinear], v1: bool) -> tuple:
    """The base (bits, group size, sym) of the export and every block linear's own setting (``None``: left in
    float), or a QuantError that says why the checkpoint has no GPTQ form."""
    alt = "ship our own format instead (`quantize export DIR --to-hub ORG/NAME`), which keeps everything"
    formats = {spec.get("format", "uniform") for spec in qc["modules"].values()}
    if "dsq" in formats:
        raise QuantError(
            f"cannot export to GPTQ format: DSQ codes (sign planes + dual scales) have no GPTQ form; {alt}"
        )
    if formats & {"codebook-dq8", "vq2-dq8", "vq3-dq8"}:
        raise QuantError(
            "cannot export to GPTQ format: codebook codes (non-uniform levels, --codebook kmeans/vq2/vq3) have no GPTQ "
            f"form; quantize with --codebook uniform --scale-bits 16 for a GPTQ-exportable model, or {alt}"
        )
    if formats != {"uniform"}:
        raise QuantError(
            "cannot export to GPTQ format: 8-bit scales and 4-bit zero-points (uniform-dq8) have no GPTQ form "
            f"(GPTQ stores fp16 scales); quantize with --scale-bits 16 for a GPTQ-exportable model, or {alt}"
        )
    if qc.get("norm_biases"):
        raise QuantError(
            "cannot export to GPTQ format: the checkpoint has DAC norm biases, which stock model classes drop; "
            f"quantize with --no-dac for a GPTQ-exportable model, or {alt}"
        )
    if qc.get("input_ops") or qc.get("activations"):
        raise QuantError(f"cannot export to GPTQ format: online transforms and activation quantization have no "
                         f"GPTQ form; {alt}")  # fmt: skip
    odd = sorted({q.bits for q in linears.values()} - set(GPTQ_BITS))
    if odd:
        raise QuantError(
            f"cannot export {odd[0]}-bit weights to GPTQ format: it supports {GPTQ_BITS} here (GPTQ's 3-bit layout "
            f"straddles words and no serving kernel reads it); {alt}"
        )
    for name, q in linears.items():
        if not v1 and int(q.zeros.max()) > 2**q.bits - 1:
            raise QuantError(
                f"{name}: zero-points of 2^bits (from a v1 import) only exist in the v1 layout: use "
                "--checkpoint-format gptq"
            )
    from quant.engine.structure import structure_of

    settings: dict[str, tuple | None] = {
        n: _setting(linears[n], bool(qc["modules"][n].get("sym", False))) if n in linears else None
        for n in structure_of(model).linear_names(model)
    }
    outside = sorted(set(linears) - set(settings))
    if outside:
        raise QuantError(f"cannot export to GPTQ format: {outside[0]} is quantized but not a block linear; {alt}")
    counts = Counter(s for s in settings.values() if s is not None)
    return counts.most_common(1)[0][0], settings


def export_gptq(src: str | Path, out: str | Path, checkpoint_format: str = "gptq", overwrite: bool = False) -> Path:
    """Write our checkpoint ``src`` in GPTQ format to ``out`` (atomically: temporary folder, then rename).

    Layers whose bits, group size or symmetry differ from the most common setting (a group that does not
    divide every width, an NSDS allocation) and block linears left in float are described by GPTQModel's
    ``dynamic`` overrides, which GPTQModel and vLLM read."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise QuantError(f"unknown GPTQ checkpoint format {checkpoint_format!r}; choose from {CHECKPOINT_FORMATS}")
    qc = read_quantization_config(src)
    out = check_output_dir(out, overwrite).absolute()
    model, tok = load_quantized(src)
    linears = {n: model.get_submodule(n) for n in qc["modules"]}
    v1 = checkpoint_format == "gptq"
    (bits, group, sym), settings = _check_exportable(qc, model, linears, v1)

    state: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        owner = name.rpartition(".")[0]
        if owner in linears and not name.endswith(".bias"):
            continue
        if name.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False):
            continue  # tied: stored once, as the embedding
        state[name] = t.detach().contiguous()
    for name, q in linears.items():
        state.update({f"{name}.{k}": v for k, v in _gptq_tensors(name, q, v1).items()})

    gptq_config = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group,
        "desc_act": False,  # our codes keep the natural column order; act-order only changed the solve order
        "sym": sym,
        "checkpoint_format": checkpoint_format,
        "pack_dtype": "int32",
        "lm_head": False,
        "true_sequential": True,
        "meta": {
            "quantizer": ["lowbit:0.1.0"],
            "source_method": qc.get("method"),
            "calibration": qc.get("calibration"),
        },
    }
    dynamic = _dynamic(settings, (bits, group, sym))
    if dynamic:
        gptq_config["dynamic"] = dynamic
    with atomic_dir(out) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads(model.config.to_json_string(use_diff=False))
        config["quantization_config"] = gptq_config
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        (tmp / "quantize_config.json").write_text(json.dumps(gptq_config, indent=2))  # the file vLLM looks for
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def read_gptq_config(path: Path, raw: dict) -> dict:
    """The GPTQ settings: config.json's ``quantization_config``, else ``quantize_config.json`` (older AutoGPTQ
    folders, and the file vLLM reads); when both are there they must agree."""
    gc = raw.get("quantization_config")
    side_file = path / "quantize_config.json"
    side = reader.read_json(side_file, path) if os.path.lexists(side_file) else None
    if gc is None and side is None:
        raise QuantError(f"{path} is not a GPTQ checkpoint (no quantization_config, no quantize_config.json)")
    if gc is not None and (not isinstance(gc, dict) or gc.get("quant_method") != "gptq"):
        raise QuantError(f"{path} is not a GPTQ checkpoint (quantization_config.quant_method is not 'gptq')")
    if side is not None:
        validate_gptq(side, path, "quantize_config.json")
        if side.get("quant_method", "gptq") != "gptq":
            raise QuantError(f"corrupt GPTQ checkpoint {path}: quantize_config.json is not a GPTQ config")
    if gc is not None:
        validate_gptq(gc, path)
    if gc is not None and side is not None:
        default = {"group_size": -1, "sym": True, "desc_act": False, "checkpoint_format": "gptq"}
        for k in GPTQ_KEYS:
            if gc.get(k, default.get(k)) != side.get(k, default.get(k)):
                raise QuantError(f"corrupt GPTQ checkpoint {path}: config.json and quantize_config.json disagree "
                                 f"on {k} ({gc.get(k)!r} vs {side.get(k)!r})")  # fmt: skip
    return gc if gc is not None else side


def _weight_files(path: Path) -> list[Path]:
    """The weight files of a GPTQ folder: those its index names, else ``model.safetensors``, else its one
    ``*.safetensors`` (older tools name it after the settings). Any other ``.safetensors`` file is ignored."""
    index = path / "model.safetensors.index.json"
    if os.path.lexists(index):
        wm = reader.read_json(index, path).get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise reader.corrupt(path, f"{index.name} has no weight_map")
        return [reader.weight_file(path, n, path, index.name) for n in sorted(set(map(str, wm.values())))]
    if (path / "model.safetensors").exists():
        return [reader.weight_file(path, "model.safetensors", path, "the folder")]
    files = sorted(f.name for f in path.glob("*.safetensors"))
    if len(files) == 1:
        return [reader.weight_file(path, files[0], path, "the folder")]
    if files:
        raise QuantError(f"{path} has several .safetensors files and no model.safetensors.index.json to say which")
    pickles = [f.name for f in path.iterdir() if f.suffix in (".bin", ".pt", ".pth")]
    hint = f" (found {pickles[:2]}: pickled weights are never loaded)" if pickles else ""
    raise QuantError(f"{path} has no .safetensors weights{hint}")


def _check_gptq(name: str, t: dict[str, torch.Tensor], spec: dict, lin: torch.nn.Module, where: Path) -> int:
    """Check one linear's GPTQ tensors (dtype and exact shape; meta tensors from the headers do) and return
    its effective group size."""
    if not isinstance(lin, torch.nn.Linear):
        raise reader.corrupt(where, f"{name} holds GPTQ tensors but is a {type(lin).__name__}, not a linear layer")
    unknown = set(t) - set(GPTQ_TENSORS) - {"bias"}
    missing = [k for k in ("qweight", "qzeros", "scales") if k not in t]
    if missing or unknown:
        raise reader.corrupt(where, f"{name} lacks {missing} or has unknown tensors {sorted(unknown)}")
    n, k, bits, group = lin.out_features, lin.in_features, spec["bits"], spec["group_size"]
    pf = 32 // bits
    g = k if group == -1 else group
    if k % pf or k % g:
        raise reader.corrupt(where, f"{name} has {k} inputs, which group {group} and {bits}-bit words do not divide")
    groups = k // g
    check_tensor(f"{name}.qweight", t["qweight"], (torch.int32,), (k // pf, n), where)
    check_tensor(f"{name}.qzeros", t["qzeros"], (torch.int32,), (groups, -(-n // pf)), where)
    check_tensor(f"{name}.scales", t["scales"], (torch.float16,), (groups, n), where)
    if "g_idx" in t:
        check_tensor(f"{name}.g_idx", t["g_idx"], (torch.int32,), (k,), where)
    if "bias" in t:
        check_tensor(f"{name}.bias", t["bias"], (torch.float16, torch.bfloat16, torch.float32), (n,), where)
    return g


def _from_gptq(
    name: str, t: dict[str, torch.Tensor], spec: dict, v1: bool, g: int, lin, dtype: torch.dtype
) -> QuantLinear:
    """Our ``QuantLinear`` (bias in ``dtype``) for ``lin`` from its GPTQ tensors, checked by :func:`_check_gptq`."""
    n, k, bits = lin.out_features, lin.in_features, spec["bits"]
    g_idx = t.get("g_idx")
    if g_idx is not None and not torch.equal(g_idx.to(torch.int64), torch.arange(k) // g):
        raise QuantError(
            f"{name}: act-order (desc_act) GPTQ checkpoints with a permuted g_idx are not supported: our layers "
            "store contiguous groups. Re-export it with desc_act=False"
        )
    if not bool(torch.isfinite(t["scales"]).all() and (t["scales"] >= 0).all()):
        raise QuantError(f"{name}: GPTQ scales hold negative, NaN or Inf values")
    zeros = unpack(t["qzeros"], bits, n).to(torch.int64)  # [G, N]
    if v1:
        zeros = zeros + 1  # v1 stores zero - 1; consumers add it back without wrapping
    if int(zeros.max()) > ZERO_MAX:  # 8-bit v1: a stored 0xFF means 256, which would wrap to 0 in uint8
        raise QuantError(
            f"{name}: the v1 zero field 0x{2**bits - 1:X} means a zero-point of {2**bits}, which our uint8 "
            "zero-points cannot hold; re-export it as gptq_v2 or with symmetric quantization"
        )
    bias = t.get("bias")
    q = QuantLinear(k, n, bits, g, bias=bias is not None, dtype=dtype)
    q.qweight.copy_(pack(unpack(t["qweight"].t().contiguous(), bits, k), bits))
    q.scales.copy_(t["scales"].t())
    q.zeros.copy_(zeros.t())
    if bias is not None:
        if not bool(torch.isfinite(bias).all()):
            raise QuantError(f"{name}: bias holds NaN or Inf values")
        q.bias.copy_(bias)
    return q


def _split(state: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """``({linear: {qweight, qzeros, scales, g_idx, bias}}, the float tensors)``: a linear is quantized when
    the file has its ``qweight``; its bias goes with it."""
    owners = {k.rpartition(".")[0] for k in state if k.endswith(".qweight")}
    layers: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        owner, _, leaf = key.rpartition(".")
        if owner in owners or leaf in GPTQ_TENSORS:
            layers.setdefault(owner, {})[leaf] = t
        else:
            rest[key] = t
    return layers, rest


def load_gptq(path: str | Path, dtype: torch.dtype | None = None):
    """Load a GPTQ-format checkpoint (v1 or v2, 2/4/8-bit, no act-order permutation) into our ``QuantLinear``s.

    Returns ``(model, tokenizer)`` like :func:`quant.formats.checkpoint.load_quantized`; ``model.lowbit_config``
    describes it in our terms, so it can be evaluated and re-exported. The same order of checks: settings,
    then every header against a meta-device skeleton, then the real model and the tensors.
    """
    path = Path(path)
    raw = reader.read_config(path)
    gc = read_gptq_config(path, raw)
    config, stored, dtype = reader.open_model_config(raw, path, torch.float16, dtype)
    files = _weight_files(path)

    meta = reader.build(config, dtype, path, "meta")
    reader.check_memory(meta, path)
    layers, rest = _split(reader.read_headers(files, path))
    specs, groups = {}, {}
    for owner, t in layers.items():
        try:
            lin = meta.get_submodule(owner)
        except AttributeError:
            raise reader.corrupt(path, f"{owner} is not in the model") from None
        specs[owner] = gptq_module_settings(gc, owner)
        if specs[owner] is None:
            raise reader.corrupt(path, f"{owner} holds GPTQ tensors but quantization_config.dynamic excludes it")
        groups[owner] = _check_gptq(owner, t, specs[owner], lin, path)
    float_names = {k for k in meta.state_dict() if k.rpartition(".")[0] not in layers}
    reader.check_headers(rest, meta, float_names, config, stored, path)

    model = reader.build(config, dtype, path, "cpu")
    layers, rest = _split(reader.read_tensors(files, path))
    modules = {}
    v1 = gc.get("checkpoint_format", "gptq") == "gptq"
    for owner, t in layers.items():
        q = _from_gptq(owner, t, specs[owner], v1, groups[owner], model.get_submodule(owner), dtype)
        parent, _, child = owner.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
        modules[owner] = {"bits": q.bits, "group_size": q.group_size, "sym": bool(specs[owner]["sym"])}
    reader.load_weights(model, rest, config, stored, path)
    model.lowbit_config = {
        "quant_method": "gptq",
        "method": "gptq-import",
        "bits": gc["bits"],
        "group_size": gc.get("group_size"),
        "sym": bool(gc.get("sym")),
        "modules": modules,
        "norm_biases": [],
        "source": {"path": str(path), "checkpoint_format": gc.get("checkpoint_format", "gptq"), "meta": gc.get("meta")},
    }
    model.eval()
    return model, reader.load_tokenizer(path)
