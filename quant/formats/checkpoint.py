"""Quantized checkpoints: safetensors shards + ``config.json`` with ``quantization_config``.

Folder layout (format version 1; 2 where a linear has 8-bit scales; 3 where one has codebook codes; 4 where
one has vector codebook codes)::

    config.json                  HF config + quantization_config (below)
    generation_config.json       if the model has one
    model.safetensors            or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    tokenizer files
    quant_report.json            what the run did: passes, timings, sizes, perplexity
    SHA256SUMS                   checksums of the weight shards, verified on load

``quantization_config``::

    quant_method    "lowbit"
    format_version  1; 2 when a module has format "uniform-dq8"; 3 when one has "codebook-dq8"; 4 when one has
                    "vq2-dq8" or "vq3-dq8" (the lowest version that holds the checkpoint)
    packing         "rowpack-int32-v1" (see quant.numerics.packing)
    method          the quantizer pass ("rtn", "gptq", ...)
    bits, group_size, sym     the requested defaults
    modules         {qualified name: {"bits", "group_size", "sym", "format"}}: what each packed linear
                    holds; group_size is the effective one for that layer; format "uniform"
                    (``QuantLinear``: qweight/scales/zeros, the default when absent), "dsq"
                    (``DSQLinear``: sign planes + per-(row, group) scales), "uniform-dq8"
                    (``ScaleCodedLinear``: dense codes, 8-bit scale codes on per-row grids, 4-bit zeros) or
                    "codebook-dq8" (``CodebookLinear``: dense codes indexing the layer's fp16 levels, 8-bit scales),
                    "vq2-dq8"/"vq3-dq8" (``VectorCodebookLinear``: the same, each run of 2/3 codes one entry)
    not_quantized   float modules kept as they were (embeddings, lm_head, norms)
    norm_biases     norms given an additive output bias by DAC (optional): stored as ``<norm>.bias``
                    and added to the norm's output (``quant.runtime.dac``); RMSNorm has no bias of its own
    input_ops       {linear: {"hadamard", "token_scale"}} online ops left by FPTQuant's transforms or --down-hadamard
                    (optional; ``quant.runtime.inputops``, ``quant.methods.fpt``), written by ``save_quantized``
    activations     simulated activation quantization (optional): bits, mode, sym, clip and the
                    linears it applies to; static scales are stored as ``<linear>.input_ops.act_scale``
    passes          [{"name", "config"}] in the order they ran

Each uniform linear ``<name>`` stores ``<name>.qweight``, ``.scales``, ``.zeros`` (and ``.bias``), or with 8-bit
scales ``.qcodes``, ``.scale_codes``, ``.scale_grid``, ``.zero_pairs``, see ``quant.runtime.quantlinear``;
each DSQ linear ``<name>.planes`` and ``.row_scales``, see ``quant.runtime.dsqlinear``.
Everything else is the model's own state dict in its dtype; a tied ``lm_head`` is stored once, as
the embedding.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from quant.errors import QuantError
from quant.formats import qconfig, reader
from quant.formats.atomic import atomic_dir, recover_output
from quant.formats.qconfig import FORMAT_VERSION, QUANT_METHOD  # noqa: F401  (public here)
from quant.numerics.packing import LAYOUT
from quant.runtime.dac import add_norm_bias
from quant.runtime.dsqlinear import DSQLinear
from quant.runtime.inputops import attach_from_config, input_ops_config
from quant.runtime.quantlinear import (
    CODEBOOK_CLASSES,
    CodebookLinear,
    PackedLinear,
    QuantLinear,
    ScaleCoded,
    ScaleCodedLinear,
)

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output folder before any work is done (unless ``overwrite``).

    What killed writers left next to ``out`` is tidied first (:func:`recover_output`), so a folder whose
    replacement was killed half-way counts as existing, as it did before that run."""
    out = Path(out)
    recover_output(out)
    if out.exists() and not overwrite:
        raise QuantError(f"output folder {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise QuantError(f"output path {out} exists and is not a folder")
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with shared tensors (tied lm_head) stored once. Tensors still on the meta device (a streamed
    run's, which lie in its work folder) are kept as they are: ``save_quantized`` reads them shard by shard."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    tied = reader.tied(model.config)
    for name, t in model.state_dict(keep_vars=True).items():
        key = t.untyped_storage().data_ptr() if t.numel() and not t.is_meta else id(t)
        if (key in seen or (tied and t.is_meta)) and name.endswith("lm_head.weight"):
            continue
        seen.add(key)
        out[name] = t.detach()
    return out


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def save_quantized(
    model: nn.Module,
    tokenizer,
    out: str | Path,
    quantization_config: dict,
    report: dict | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tensors=None,
) -> Path:
    """Write the checkpoint into a temporary sibling folder, then rename it into place.

    ``tensors(name)`` gives the tensors ``model`` holds on the meta device (a streamed run: its work folder
    has them); they are read one shard at a time, so memory stays near one shard."""
    out = check_output_dir(out, overwrite).absolute()
    with atomic_dir(out) as tmp:
        state = _unique_state_dict(model)
        shards = _shards(state, max_shard_bytes)
        names = (
            ["model.safetensors"]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        for fname, shard in zip(names, shards, strict=False):
            real = {k: (tensors(k) if t.is_meta else t).cpu().contiguous() for k, t in shard.items()}
            save_file(real, str(tmp / fname), metadata={"format": "pt"})
            del real
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                "weight_map": {k: f for f, s in zip(names, shards, strict=False) for k in s},
            }
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "SHA256SUMS").write_text("".join(f"{_sha256(tmp / f)}  {f}\n" for f in names))

        version = qconfig.version_for(quantization_config["modules"])
        qc = {"quant_method": QUANT_METHOD, "format_version": version, "packing": LAYOUT, **quantization_config}
        qc.update(input_ops_config(model))
        config = json.loads(model.config.to_json_string(use_diff=False))
        config["quantization_config"] = qc
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / "quant_report.json").write_text(json.dumps(report, indent=2))
    return out


def read_quantization_config(path: str | Path, raw: dict | None = None) -> dict:
    """Our validated ``quantization_config`` from the folder's config.json (or from ``raw``, its contents)."""
    path = Path(path)
    config = reader.read_config(path) if raw is None else raw
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise QuantError(f"{path} is not a lowbit checkpoint (quantization_config.quant_method is not 'lowbit')")
    qconfig.check_version(qc, path)
    qconfig.validate(qc, path)
    return qc


def _verified_files(path: Path) -> list[Path]:
    """The weight files SHA256SUMS lists, each matching its checksum; an index, if present, must agree."""
    sums = path / "SHA256SUMS"
    if not os.path.lexists(sums):
        raise reader.corrupt(path, "SHA256SUMS is missing")
    files: list[Path] = []
    for i, line in enumerate(reader.read_text(sums, path).splitlines(), 1):
        m = re.fullmatch(r"([0-9a-f]{64})  (\S.*)", line)
        if m is None:
            raise reader.corrupt(path, f"SHA256SUMS line {i} is not '<sha256>  <file name>'")
        digest, fname = m.groups()
        f = reader.weight_file(path, fname, path, "SHA256SUMS")
        if f in files:
            raise reader.corrupt(path, f"SHA256SUMS lists {fname} twice")
        if _sha256(f) != digest:
            raise reader.corrupt(path, f"{fname} does not match its checksum (truncated or altered)")
        files.append(f)
    if not files:
        raise reader.corrupt(path, "SHA256SUMS lists no weight files")
    index = path / "model.safetensors.index.json"
    if os.path.lexists(index):  # what transformers reads: it must name the same files
        wm = reader.read_json(index, path).get("weight_map")
        if not isinstance(wm, dict) or {f.name for f in files} != set(wm.values()):
            raise reader.corrupt(path, f"{index.name} does not name the files SHA256SUMS lists")
    return files


LINEAR_FORMATS = {cls.FORMAT: cls for cls in (QuantLinear, DSQLinear, ScaleCodedLinear, *CODEBOOK_CLASSES.values())}


def empty_packed(lin: nn.Module, spec: dict, dtype: torch.dtype) -> PackedLinear:
    """The zeroed packed linear a checkpoint's module ``spec`` describes, in place of the linear ``lin``."""
    cls = LINEAR_FORMATS[spec.get("format", "uniform")]
    return cls(lin.in_features, lin.out_features, spec["bits"], spec["group_size"], lin.bias is not None, dtype)


def _skeleton(config, qc: dict, dtype: torch.dtype, path: Path, device: str) -> nn.Module:
    """The model ``qc`` describes, with uninitialised weights: float, with packed linears and DAC norm biases
    where the checkpoint has them. On ``"meta"`` it costs nothing."""
    return install_packed(reader.build(config, dtype, path, device), qc, dtype, path, device)


def install_packed(model: nn.Module, qc: dict, dtype: torch.dtype, path: Path, device: str) -> nn.Module:
    """Replace the linears ``qc`` lists with empty packed ones, add its DAC norm biases and activation
    quantizers: the form a checkpoint's tensors load into."""
    with torch.device(device):
        for name, spec in qc["modules"].items():
            lin = qconfig.check_linear(model, name, spec, path)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, empty_packed(lin, spec, dtype))
        for name in qc.get("norm_biases", []):
            norm = qconfig.check_norm(model, name, path)
            add_norm_bias(norm, torch.zeros_like(norm.weight))
        attach_from_config(model, qc, path)
    return model


def _valid(m: nn.Module) -> bool:
    if isinstance(m, DSQLinear):
        r = m.row_scales.float()
        return bool(torch.isfinite(r).all() and (r >= 0).all())
    if isinstance(m, ScaleCoded):
        grid = m.scale_grid.float()
        if not bool(torch.isfinite(grid).all() and (grid[:, 0] > 0).all() and (grid[:, 1] >= 0).all()):
            return False
    s = m.scales.float()
    if not bool(torch.isfinite(s).all() and (s >= 0).all()):
        return False
    return isinstance(m, CodebookLinear) or int(m.zeros.max()) <= 2**m.bits  # 2^bits: v1 imports


def load_quantized(path: str | Path, dtype: torch.dtype | None = None):
    """Rebuild a model saved by :func:`save_quantized`; returns ``(model, tokenizer)``.

    Order: config and quantization_config validated; checksums verified; the headers' names, dtypes and
    shapes checked against a meta-device skeleton; only then the model built and the tensors read."""
    path = Path(path)
    raw = reader.read_config(path)
    qc = read_quantization_config(path, raw)
    config, stored, dtype = reader.open_model_config(raw, path, torch.float32, dtype)
    files = _verified_files(path)
    meta = _skeleton(config, qc, dtype, path, "meta")
    reader.check_memory(meta, path)  # what the loaded model holds: packed linears, not the float ones they replace
    reader.check_headers(reader.read_headers(files, path), meta, set(meta.state_dict()), config, stored, path)
    model = _skeleton(config, qc, dtype, path, "cpu")
    reader.load_weights(model, reader.read_tensors(files, path), config, stored, path, assign=True)
    for name in qc["modules"]:
        if not _valid(model.get_submodule(name)):
            raise reader.corrupt(path, f"{name} has invalid scales or zero-points")
    for name, m in model.named_modules():  # static activation scales are calibrated: positive by construction
        if getattr(m, "act_scale", None) is not None and not float(m.act_scale) > 0:
            raise reader.corrupt(path, f"{name}.act_scale is {float(m.act_scale)}, not a positive scale")
    model.lowbit_config = qc
    model.eval()
    return model, reader.load_tokenizer(path)
