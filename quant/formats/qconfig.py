"""The schema of our ``quantization_config`` (format versions 1 to 4), checked before any tensor is read.

Version 2 added the linear format ``uniform-dq8`` (8-bit scales, ``ScaleCodedLinear``), version 3 ``codebook-dq8``
(codes indexing each layer's levels, ``CodebookLinear``), version 4 ``vq2-dq8`` and ``vq3-dq8`` (vector codebooks,
``VectorCodebookLinear``). A checkpoint records the lowest version that holds it,
so one without them still reads in releases that know only version 1.

Structure and ranges here (:func:`validate`); what needs the model (a module name that exists and is a
linear, a group that divides its width, a norm that is a norm) is checked by :func:`check_linear` and
:func:`check_norm` as the loader builds the skeleton. Every failure is one line naming the field.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from torch import nn

from quant.errors import QuantError
from quant.methods.dsq import DSQ_BITS
from quant.numerics.grid import SUPPORTED_BITS
from quant.numerics.packing import LAYOUT

QUANT_METHOD = "lowbit"  # quantization_config.quant_method of our checkpoints
FORMATS_BY_VERSION = {  # the linear formats each allows
    1: ("uniform", "dsq"),
    2: ("uniform", "dsq", "uniform-dq8"),
    3: ("uniform", "dsq", "uniform-dq8", "codebook-dq8"),
    4: ("uniform", "dsq", "uniform-dq8", "codebook-dq8", "vq2-dq8", "vq3-dq8"),
}
VECTOR_DIM = {"vq2-dq8": 2, "vq3-dq8": 3}  # weights one entry covers: the group must be a multiple
FORMAT_VERSION = max(FORMATS_BY_VERSION)  # the newest this release reads
FORMATS = FORMATS_BY_VERSION[FORMAT_VERSION]
BITS_BY_FORMAT = {"uniform": SUPPORTED_BITS, "dsq": DSQ_BITS, "uniform-dq8": (2, 3, 4), "codebook-dq8": (2, 3, 4),
                  "vq2-dq8": (2, 3, 4), "vq3-dq8": (2, 3)}


def version_for(modules: dict) -> int:
    """The lowest format version that holds these module specs."""
    formats = {spec.get("format", "uniform") for spec in modules.values()}
    return min(v for v, allowed in FORMATS_BY_VERSION.items() if formats <= set(allowed))


def check_version(qc: dict, where: str | Path) -> None:
    """A one-line error unless this release reads the config's format version and packing."""
    version, packing = qc.get("format_version"), qc.get("packing")
    if not _int(version) or version not in FORMATS_BY_VERSION or packing != LAYOUT:
        readable = " and ".join(str(v) for v in FORMATS_BY_VERSION)
        raise QuantError(f"{where} uses checkpoint format {version} with packing {packing}; this version of lowbit "
                         f"reads formats {readable} with packing {LAYOUT}")


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _bad(path: str | Path, field: str, msg: str) -> QuantError:
    return QuantError(f"corrupt checkpoint {path}: quantization_config.{field} {msg}")


def validate(qc: dict, path: str | Path) -> None:
    """Types and ranges of every field the loader reads."""
    modules = qc.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise _bad(path, "modules", "must be a non-empty object {linear name: spec}")
    for name, spec in modules.items():
        field = f"modules[{name!r}]"
        if not isinstance(spec, dict):
            raise _bad(path, field, "must be an object with bits, group_size and format")
        fmt = spec.get("format", "uniform")
        known = FORMATS_BY_VERSION.get(qc.get("format_version"), FORMATS)
        if fmt not in known:
            raise _bad(path, f"{field}.format", f"is {fmt!r}; format version {qc.get('format_version')} knows "
                       f"{', '.join(known)}")
        bits, group = spec.get("bits"), spec.get("group_size")
        allowed = BITS_BY_FORMAT[fmt]
        if not _int(bits) or bits not in allowed:
            raise _bad(path, f"{field}.bits", f"must be one of {allowed} for format {fmt}, got {bits!r}")
        if not _int(group) or group <= 0:
            raise _bad(path, f"{field}.group_size", f"must be a positive integer (the effective group), got {group!r}")
        if group % VECTOR_DIM.get(fmt, 1):
            raise _bad(path, f"{field}.group_size", f"must be a multiple of {VECTOR_DIM[fmt]} for format {fmt}, "
                       f"got {group}")
    norms = qc.get("norm_biases", [])
    if not isinstance(norms, list) or not all(isinstance(n, str) for n in norms):
        raise _bad(path, "norm_biases", "must be a list of norm module names")
    ops = qc.get("input_ops", {})
    if not isinstance(ops, dict) or not all(isinstance(s, dict) for s in ops.values()):
        raise _bad(path, "input_ops", "must be an object {linear name: {hadamard, token_scale}}")
    for name, spec in ops.items():
        h = spec.get("hadamard", 0)
        if not _int(h) or h < 0:
            raise _bad(path, f"input_ops[{name!r}].hadamard", f"must be 0 or the linear's input width, got {h!r}")
        if not isinstance(spec.get("token_scale", False), bool):
            raise _bad(path, f"input_ops[{name!r}].token_scale", f"must be true or false, got {spec['token_scale']!r}")
        unknown = sorted(set(spec) - {"hadamard", "token_scale"})
        if unknown:
            raise _bad(path, f"input_ops[{name!r}]", f"has unknown keys {unknown}")
    if "activations" in qc:
        _validate_activations(qc["activations"], path)


def _validate_activations(act: object, path: str | Path) -> None:
    from quant.runtime.inputops import ACT_BITS, ACT_MODES, ActQuantConfig

    if act is None:
        return
    if not isinstance(act, dict) or not isinstance(act.get("modules"), list):
        raise _bad(path, "activations", "must be an object with the list of modules it applies to")
    if not all(isinstance(m, str) for m in act["modules"]):
        raise _bad(path, "activations.modules", "must be a list of linear names")
    known = {f.name for f in dataclasses.fields(ActQuantConfig)}
    if set(act) - known - {"modules"}:
        raise _bad(path, "activations", f"has unknown keys {sorted(set(act) - known - {'modules'})}")
    for key in ("bits", "kv_bits"):
        if key in act and not (_int(act[key]) and act[key] in ACT_BITS):
            raise _bad(path, f"activations.{key}", f"must be one of {ACT_BITS}, got {act[key]!r}")
    if act.get("mode", "dynamic") not in ACT_MODES:
        raise _bad(path, "activations.mode", f"must be one of {ACT_MODES}, got {act['mode']!r}")
    if not isinstance(act.get("sym", True), bool):
        raise _bad(path, "activations.sym", f"must be true or false, got {act['sym']!r}")
    clip = act.get("clip", 1.0)
    if not (isinstance(clip, (int, float)) and not isinstance(clip, bool) and 0 < clip <= 1):
        raise _bad(path, "activations.clip", f"must be a number in (0, 1], got {clip!r}")
    try:
        ActQuantConfig(**{k: v for k, v in act.items() if k != "modules"}).validate()
    except QuantError as e:
        raise _bad(path, "activations", str(e)) from None


def _module(model: nn.Module, name: str, field: str, path: str | Path) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise _bad(path, field, f"names {name!r}, which is not in the model") from None


def check_linear(model: nn.Module, name: str, spec: dict, path: str | Path) -> nn.Linear:
    """The float linear ``name`` that ``spec`` replaces, after checking it is one and the group fits it."""
    lin = _module(model, name, f"modules[{name!r}]", path)
    if not isinstance(lin, nn.Linear):
        raise _bad(path, f"modules[{name!r}]", f"names a {type(lin).__name__}, not a linear layer")
    if lin.in_features % spec["group_size"]:
        raise _bad(
            path, f"modules[{name!r}].group_size", f"{spec['group_size']} does not divide its {lin.in_features} inputs"
        )
    return lin


def check_norm(model: nn.Module, name: str, path: str | Path) -> nn.Module:
    norm = _module(model, name, "norm_biases", path)
    w = getattr(norm, "weight", None)
    if "norm" not in type(norm).__name__.lower() or not isinstance(w, nn.Parameter) or w.dim() != 1:
        raise _bad(path, "norm_biases", f"names {name!r}, a {type(norm).__name__}, which is not a norm")
    return norm


def check_hadamard(linear: nn.Module, name: str, width: int, path: str | Path) -> None:
    """FPTQuant's online Hadamard is of the linear's full input width: any other value is refused."""
    from quant.numerics.hadamard import has_hadamard

    n = getattr(linear, "in_features", None)
    if width and (width != n or not has_hadamard(width)):
        raise _bad(path, f"input_ops[{name!r}].hadamard", f"is {width}; must be 0 or its input width {n}")


# ----------------------------------------------------------------------------------------------- GPTQ

GPTQ_BITS = (2, 4, 8)
GPTQ_FORMATS = ("gptq", "gptq_v2")
# what config.json and quantize_config.json must agree on
GPTQ_KEYS = ("bits", "group_size", "sym", "desc_act", "checkpoint_format", "dynamic")


def _check_gptq_settings(gc: dict, bad) -> None:
    """bits, group_size, sym, desc_act: shared by the base settings and every ``dynamic`` override."""
    bits = gc.get("bits", GPTQ_BITS[0])
    if not (_int(bits) and bits in GPTQ_BITS):
        raise bad("bits", f"is {bits!r}: {bits}-bit GPTQ checkpoints are not supported (supported: {GPTQ_BITS})")
    group = gc.get("group_size", -1)
    if not _int(group) or not (group == -1 or group > 0):
        raise bad("group_size", f"is {group!r}; it must be -1 (one group per row) or a positive integer")
    for key in ("sym", "desc_act"):
        if key in gc and not isinstance(gc[key], bool):
            raise bad(key, f"is {gc[key]!r}; it must be true or false")


# A quantified group that itself holds a quantifier ("(a+)+"): the shape of regexes that backtrack for ever.
_NESTED_QUANTIFIER = re.compile(r"\([^()]*[+*}][^()]*\)[+*{]")


def validate_gptq(gc: object, path: str | Path, field: str = "quantization_config") -> dict:
    """A GPTQ ``quantization_config`` (or ``quantize_config.json``): types and ranges, one line naming the field.

    ``dynamic`` (GPTQModel's per-module overrides, also read by vLLM) maps a regular expression over module
    names to overrides of bits, group_size, sym and desc_act; a ``-:`` prefix means "not quantized". Patterns
    are checked to compile, and refused when over 512 characters or with nested quantifiers (a crafted
    pattern would otherwise backtrack for ever on a module name)."""

    def bad(key: str, msg: str) -> QuantError:
        return QuantError(f"corrupt GPTQ checkpoint {path}: {field}.{key} {msg}")

    if not isinstance(gc, dict):
        raise QuantError(f"corrupt GPTQ checkpoint {path}: {field} must be an object")
    if "bits" not in gc:
        raise bad("bits", "is missing")
    _check_gptq_settings(gc, bad)
    fmt = gc.get("checkpoint_format", "gptq")
    if fmt not in GPTQ_FORMATS:
        raise bad("checkpoint_format", f"is {fmt!r}; this version reads {', '.join(GPTQ_FORMATS)}")
    if gc.get("pack_dtype", "int32") != "int32":
        raise bad("pack_dtype", f"is {gc['pack_dtype']!r}; this version reads int32 words")
    dynamic = gc.get("dynamic")
    if dynamic is None:
        return gc
    if not isinstance(dynamic, dict):
        raise bad("dynamic", "must be an object {module regex: overrides}")
    for pattern, over in dynamic.items():
        key = f"dynamic[{pattern[:60]!r}]"
        if len(pattern) > 512 or _NESTED_QUANTIFIER.search(pattern):
            raise bad(key, "is too long or has nested quantifiers")
        try:
            re.compile(pattern.removeprefix("+:").removeprefix("-:"))
        except re.error as e:
            raise bad(key, f"is not a regular expression ({e})") from None
        if not isinstance(over, dict) or set(over) - {"bits", "group_size", "sym", "desc_act"}:
            raise bad(key, "must be an object with some of bits, group_size, sym, desc_act")
        _check_gptq_settings(over, lambda k, msg, key=key: bad(f"{key}.{k}", msg))
    return gc


def gptq_module_settings(gc: dict, name: str) -> dict | None:
    """The GPTQ settings of module ``name`` (``dynamic`` applied as GPTQModel and vLLM apply it: the first
    matching pattern wins, ``re.match`` semantics), or ``None`` where a ``-:`` pattern leaves it unquantized."""
    base = {"bits": gc["bits"], "group_size": gc.get("group_size", -1), "sym": gc.get("sym", True)}
    for pattern, over in (gc.get("dynamic") or {}).items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], name):
                return None
        elif re.match(pattern.removeprefix("+:"), name):
            return {**base, **{k: v for k, v in over.items() if k in base}}
    return base
