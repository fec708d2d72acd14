"""A run as a recipe: the ordered list of passes with their configs (as llm-compressor's recipes and torchao's
config objects). ``quantize model`` builds one from its flags or reads it with ``--recipe FILE``; the checkpoint
records it (``quantization_config.passes``) and the resume fingerprint is computed from it.

A recipe file is YAML or JSON, either a list or ``{"passes": [...]}`` (so a checkpoint's own
``quantization_config`` block, or its whole ``config.json``, replays the run that wrote it)::

    - name: rotate
      config: {mode: hadamard}
    - name: d2quant
      config: {bits: 3, group_size: 64}

Each config is the pass's dataclass: unknown fields, wrong types and invalid values are one-line errors, and
fields left out take the dataclass's defaults. A name without a path is one of the bundled presets in
``quant/recipes/`` (``w3-fast``, ``w3-best``; their files say what they measured).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

from quant.engine.passes import get_pass
from quant.errors import QuantError


def _bad(where: str, what: str) -> QuantError:
    return QuantError(f"recipe {where}: {what}")


def _value(tp, v, where: str):
    """``v`` (parsed YAML) as the field type ``tp``: nested dataclasses from mappings, tuples from lists."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)][:1] or (tp,)
    if dataclasses.is_dataclass(tp):
        if not isinstance(v, dict):
            raise _bad(where, f"expects a mapping of {tp.__name__} fields, got {v!r:.60}")
        return config_from_dict(tp, v, where)
    if typing.get_origin(tp) is tuple:
        if not isinstance(v, (list, tuple)):
            raise _bad(where, f"expects a list, got {v!r:.60}")
        return tuple(v)
    want = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}.get(tp)
    if want is not None and (not isinstance(v, want) or (tp is not bool and isinstance(v, bool))):
        raise _bad(where, f"expects {tp.__name__}, got {v!r:.60}")
    return float(v) if tp is float else v


def config_from_dict(cls: type, data: dict, where: str = ""):
    """``cls(**data)`` with every field checked; nested configs (FPT's weight spec, activation config) too."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise _bad(where, f"{cls.__name__} has no field {unknown[0]!r} (fields: {', '.join(sorted(names))})")
    try:
        return cls(**{k: _value(hints[k], v, f"{where}.{k}") for k, v in data.items()})
    except TypeError as e:
        raise _bad(where, str(e)) from None


def steps_from(data, where: str) -> list[tuple[str, object]]:
    """Passes and configs from a parsed recipe (see the module docstring), each validated."""
    if isinstance(data, dict) and "quantization_config" in data:
        data = data["quantization_config"]
    if isinstance(data, dict):
        data = data.get("passes")
    if not isinstance(data, list) or not data:
        raise _bad(where, "must be a non-empty list of passes, or a mapping with one under 'passes'")
    steps = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise _bad(where, f"pass {i} must be a mapping with a 'name' (and optionally a 'config')")
        extra = sorted(set(entry) - {"name", "config"})
        if extra:
            raise _bad(where, f"pass {i} ({entry['name']}) has an unknown key {extra[0]!r}")
        info = get_pass(entry["name"])
        config = config_from_dict(info.config_cls, entry.get("config") or {}, f"{where}: {entry['name']}")
        for check in ("validate", "spec"):
            if hasattr(config, check):
                getattr(config, check)()
        steps.append((info.name, config))
    quantizers = [n for n, _ in steps if get_pass(n).quantizer]
    if len(quantizers) != 1:
        have = ", ".join(quantizers) or "none"
        raise _bad(where, f"needs exactly one quantizer pass, has {len(quantizers)} ({have})")
    return steps


PRESETS = Path(__file__).resolve().parents[1] / "recipes"  # bundled recipes, by name: --recipe w3-fast


def presets() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def load_recipe(path: str | Path) -> list[tuple[str, object]]:
    """The passes of a recipe file, or of a bundled preset named without a path (``w3-fast``, ``w3-best``)."""
    import yaml

    path = Path(path)
    if not path.is_file() and path.name == str(path) and (PRESETS / f"{path}.yaml").is_file():
        path = PRESETS / f"{path}.yaml"
    if not path.is_file():
        raise _bad(str(path), f"no such file (bundled presets: {', '.join(presets())})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise _bad(str(path), f"is not valid YAML or JSON ({str(e).splitlines()[0]})") from None
    return steps_from(data, str(path))


def recipe_of(steps: list[tuple[str, object]]) -> list[dict]:
    """The JSON-able form the checkpoint records and ``load_recipe`` reads back."""
    return [{"name": n, "config": dataclasses.asdict(c)} for n, c in steps]
