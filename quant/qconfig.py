"""The schema of our ``quantization_config`` (format version 1), checked before any tensor is read.

Structure and ranges here (:func:`validate`); what needs the model (a module name that exists and is a
linear, a group that divides its width, a norm that is a norm) is checked by :func:`check_linear` and
:func:`check_norm` as the loader builds the skeleton. Every failure is one line naming the field.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from quant.dsq import DSQ_BITS
from quant.errors import QuantError
from quant.grid import SUPPORTED_BITS

FORMATS = ("uniform", "dsq")


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
        if fmt not in FORMATS:
            raise _bad(path, f"{field}.format", f"is {fmt!r}; known formats: {', '.join(FORMATS)}")
        bits, group = spec.get("bits"), spec.get("group_size")
        allowed = DSQ_BITS if fmt == "dsq" else SUPPORTED_BITS
        if not _int(bits) or bits not in allowed:
            raise _bad(path, f"{field}.bits", f"must be one of {allowed} for format {fmt}, got {bits!r}")
        if not _int(group) or group <= 0:
            raise _bad(path, f"{field}.group_size", f"must be a positive integer (the effective group), got {group!r}")
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
    act = qc.get("activations")
    if act is not None and (not isinstance(act, dict) or not isinstance(act.get("modules", []), list)):
        raise _bad(path, "activations", "must be an object with a list of modules")


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
    from quant.hadamard import has_hadamard

    n = getattr(linear, "in_features", None)
    if width and (width != n or not has_hadamard(width)):
        raise _bad(path, f"input_ops[{name!r}].hadamard", f"is {width}; must be 0 or its input width {n}")
