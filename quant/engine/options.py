"""A pass's options, declared once on its config dataclass: the help, the command-line flag, and (in the
config's ``validate``) the checks. ``quantize model`` builds its per-pass options from these declarations,
so a new pass brings its own flags and help and the command does not grow; a recipe file sets the same
fields by name, and ``quantize passes`` prints them all.

    @dataclass
    class GPTQConfig(RTNConfig):
        damp: float = option(0.01, "Damping added to the Hessian diagonal, as a fraction of its mean.", "--damp")

A field without a flag is a recipe-only setting (documented by its help). Passes that share a flag (``--damp``
of gptq and d2quant) share one option; its value goes to whichever of them runs.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import MISSING, dataclass

from quant.errors import QuantError


def option(default=MISSING, help: str = "", flag: str | None = None, *, default_factory=MISSING):  # noqa: A002
    """A dataclass field that documents itself: ``help`` for --help and recipes, ``flag`` for the command line
    (``--name``; a bool gets ``--name/--no-name`` unless the flag spells both)."""
    if not help:
        raise ValueError("an option needs its help")
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help, "flag": flag})


@dataclass
class CliOption:
    """One command-line flag and the config fields (pass, field) it sets."""

    flag: str  # as declared: "--damp" or "--dsq/--no-dsq"
    dest: str  # the Python parameter name
    type: type
    help: str
    targets: list[tuple[str, str]]  # (pass name, field name)
    defaults: dict[str, object]  # pass name -> that pass's default

    def help_text(self) -> str:
        """The help, prefixed by the passes it applies to and followed by their defaults."""
        passes = ", ".join(dict.fromkeys(p for p, _ in self.targets))
        shown = {p: _show(d) for p, d in self.defaults.items()}
        if len(set(shown.values())) == 1:
            default = f"Default: {next(iter(shown.values()))}."
        else:
            default = "Default: " + ", ".join(f"{v} ({p})" for p, v in shown.items()) + "."
        return f"{passes}: {self.help} {default}"


def _show(v) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, tuple):
        return ",".join(map(str, v))
    return str(v)


def _field_type(cls: type, name: str) -> type:
    tp = typing.get_type_hints(cls)[name]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not MISSING else f.default


def fields_with_help(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init and f.metadata.get("help")]


def cli_options(passes: dict) -> list[CliOption]:
    """The flags every registered pass's config declares (``passes``: name -> PassInfo), merged by flag."""
    out: dict[str, CliOption] = {}
    for name, info in passes.items():
        for f in fields_with_help(info.config_cls):
            flag = f.metadata["flag"]
            if flag is None:
                continue
            tp = _field_type(info.config_cls, f.name)
            cli_type = str if typing.get_origin(tp) is tuple else tp  # tuples: comma-separated on the command line
            dest = flag.split("/")[0].removeprefix("--").replace("-", "_")
            if flag not in out:
                out[flag] = CliOption(flag, dest, cli_type, f.metadata["help"], [], {})
            elif out[flag].type is not cli_type:
                raise TypeError(f"{flag} is {out[flag].type.__name__} in one pass and {cli_type.__name__} in {name}")
            out[flag].targets.append((name, f.name))
            out[flag].defaults[name] = _default(f)
    return list(out.values())


def given_fields(cls: type, pass_name: str, options: list[CliOption], values: dict) -> dict:
    """The fields of ``pass_name``'s config set by the flags the user gave (``values``: dest -> value, None when
    not given), converted to the fields' types; the pass's defaults fill the rest when the config is built."""
    out = {}
    for o in options:
        v = values.get(o.dest)
        for p, field_name in o.targets:
            if p != pass_name or v is None:
                continue
            tp = _field_type(cls, field_name)
            if typing.get_origin(tp) is tuple:
                (elem, *_) = typing.get_args(tp)
                try:
                    v = tuple(elem(x) for x in str(v).split(","))
                except ValueError:
                    kind = {int: "integers", float: "numbers"}.get(elem, elem.__name__)
                    raise QuantError(f"{o.flag} must be comma-separated {kind}, got {values[o.dest]!r}") from None
            out[field_name] = v
    return out


def describe(cls: type, indent: str = "  ", values: object = None) -> list[str]:
    """Every field of a config (nested configs indented, with the defaults their parent gives them): name, type,
    default, flag, help."""
    lines = []
    for f in (f for f in dataclasses.fields(cls) if f.init):
        tp = _field_type(cls, f.name)
        default = getattr(values, f.name) if values is not None else _default(f)
        flag = f" ({f.metadata['flag']})" if f.metadata.get("flag") else ""
        text = f.metadata.get("help", "")
        if dataclasses.is_dataclass(tp):
            unset = " = none" if default is None else ""
            lines.append(f"{indent}{f.name}: {tp.__name__}{unset}{flag}  {text}".rstrip())
            lines += describe(tp, indent + "    ", default)
            continue
        name = getattr(tp, "__name__", str(tp))
        lines.append(f"{indent}{f.name}: {name} = {_show(default)}{flag}  {text}".rstrip())
    return lines
