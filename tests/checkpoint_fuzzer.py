"""A seeded fuzzer of checkpoint loading, written as an attacker or a broken tool would damage a folder.

Small checkpoints in both formats (ours: RTN, sharded RTN, D²Quant with DSQ + DAC + static INT8 activations
+ INT8 KV cache, FPTQuant with online Hadamards; GPTQ v1 and v2 exports) are copied and mutated: bytes,
safetensors headers, tensors (dtype, shape, values, extra and missing), config fields, checksum and index
files, stray, linked and special files, tokenizer files, the run report, pickles and model code that would
run if anything unpickled or imported them. Each copy is loaded through one of ``load_quantized``,
``load_gptq``, ``load_model``, ``quantize inspect`` and ``quantize eval`` in a forked child with a timeout and
a memory cap, and the outcome must be a clean error (one line: a ``QuantError``, or exit 2 with one
``error:`` line) or an exact load (the same logits and tokenization as the undamaged folder, the same
perplexity for ``eval``). Anything else is counted: a traceback, a hang, a crash, a silent corruption, or
code execution (a sentinel file written by the planted pickle or module).

What the fuzzer does not generate, because no loader can tell it from a real checkpoint: value edits of
weights that keep dtype, shape and finiteness under a rewritten SHA256SUMS (or anywhere in the GPTQ format,
which has no checksums); and valid redefinitions in config.json (another valid ``hidden_act``, ``rms_norm_eps``
or ``rope_theta``, an online Hadamard switched between 0 and the full width, GPTQ v1 relabelled v2). Field
mutations draw only values outside what the schema admits or values inconsistent with the stored tensors.

Run it:  ``python tests/checkpoint_fuzzer.py --cases 2000`` (writes benchmarks/results/fuzz.{json,md});
the test suite runs ``LOWBIT_FUZZ_CASES`` cases (default 300).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import pickle
import random
import re
import resource
import select
import shutil
import signal
import struct
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

BAD = ("traceback", "hang", "crash", "silent", "code-exec", "multiline")
SENTINEL = "PWNED"
PROBE_IDS = [[1, 42, 7, 999, 123, 5, 77, 300, 2, 64, 31, 8, 415, 9, 10, 11]]
PROBE_TEXT = "Hello world, a fuzzed checkpoint!"
MEMORY_CAP = 6 * 1024**3  # a child that tries to allocate an absurd model fails instead of taking the machine

# ---------------------------------------------------------------------------------------------- fixtures


def build_fixtures(root: Path) -> dict[str, dict]:
    """The undamaged checkpoints: {name: {"dir", "format", "tied"}}."""
    import torch
    from conftest import tiny_model

    from calibrate import calibration_windows
    from quant import ActQuantConfig, FPTConfig, QuantContext, RTNConfig, run_pipeline, save_quantized
    from quant.formats.gptq_format import export_gptq
    from quant.formats.models import load_model
    from quant.methods.d2quant import D2QuantConfig
    from quant.methods.fpt import FPTQuantConfig

    tok = load_model().tokenizer
    calib = calibration_windows(tok, "c4", 4, 64, seed=0)
    out: dict[str, dict] = {}

    def ours(name, steps, shard=None, **kw):
        torch.manual_seed(0)
        model = tiny_model("llama", **kw)
        ctx = QuantContext(model, tok, calib_ids=calib, progress=False)
        run_pipeline(ctx, steps)
        extra = {"max_shard_bytes": shard} if shard else {}
        d = save_quantized(
            model,
            tok,
            root / name,
            {"method": steps[0][0], "modules": ctx.modules, "norm_biases": ctx.norm_biases},
            **extra,
            report={
                "sizes": {"bits_per_weight": 4.5},
                "quantize_seconds": 1.0,
                "perplexity_quantized": {"ppl": 9.9, "windows": 1, "total_windows": 2},
            },
        )
        out[name] = {"dir": str(d), "format": "lowbit"}

    ours("rtn", [("rtn", RTNConfig(bits=4, group_size=32, sym=True))])
    ours("rtn-sharded", [("rtn", RTNConfig(bits=4, group_size=32, sym=False))], shard=4 * 1024**2)
    d2q = D2QuantConfig(bits=2, group_size=32, backend="rtn", dsq=True, dac=True, dac_teacher="local")
    ours("d2quant", [("d2quant", d2q), ("actquant", ActQuantConfig(bits=8, mode="static", kv_bits=8))])
    fpt = FPTConfig(down_hadamard=True, dynamic_scale=True, local_steps=1, e2e_steps=0, rotation_rows=1.0)
    ours(
        "fpt",
        [
            ("fptquant", FPTQuantConfig(bits=4, group_size=32, transforms=fpt)),
            ("actquant", ActQuantConfig(bits=8, mode="static")),
        ],
    )
    for fmt, src in (("gptq", "rtn"), ("gptq_v2", "rtn-sharded")):
        d = export_gptq(out[src]["dir"], root / fmt, checkpoint_format=fmt)
        out[fmt] = {"dir": str(d), "format": "gptq"}
    return out


LOADERS = {
    "lowbit": ("load_quantized", "load_model", "inspect", "eval"),
    "gptq": ("load_gptq", "load_model", "inspect", "eval"),
}

# --------------------------------------------------------------------------------------- file helpers


def _st_split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _st_join(header: dict, body: bytes) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + body


def _weights(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _resum(folder: Path) -> None:
    """Rewrite SHA256SUMS to match the weight files (what an attacker or a careless tool does)."""
    if (folder / "SHA256SUMS").exists():
        lines = [f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}\n" for f in _weights(folder)]
        (folder / "SHA256SUMS").write_text("".join(lines))


def _replace(path: Path, data: bytes) -> None:
    """Write a new file (weight files are hard links to the fixture's: never write through them)."""
    if path.is_symlink() or path.exists():
        path.unlink()
    path.write_bytes(data)


def _edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    obj = edit(obj)
    _replace(path, json.dumps(obj).encode())


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _save_tensors(path: Path, state: dict) -> None:
    from safetensors.torch import save_file

    path.unlink()
    save_file(state, str(path), metadata={"format": "pt"})


def _evil_pickle(sentinel: Path) -> bytes:
    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(sentinel)!r}, 'w').write('x')",))

    return pickle.dumps({"w": Evil()})


def _evil_module(sentinel: Path) -> str:
    return f"open({str(sentinel)!r}, 'w').write('x')\n"


# ------------------------------------------------------------------------------------------- mutations

MISSING = object()
JUNK = [None, "x", -1, 0, 1.5, True, [], {}, 2**40, 2**62, "NaN"]


def _set_path(obj, path: list, value):
    """Set (or delete, for MISSING) ``obj[path]``; returns the object."""
    if not path:
        return value
    cur = obj
    for p in path[:-1]:
        cur = cur[p]
    if value is MISSING:
        cur.pop(path[-1], None) if isinstance(cur, dict) else None
    else:
        cur[path[-1]] = value
    return obj


def _config_fields(cfg: dict, fmt: str) -> list[tuple[list, list]]:
    """(path in config.json, values the schema must refuse or the tensors contradict)."""
    qc = cfg["quantization_config"]
    ints = [MISSING, None, "x", 0, -1, 1.5, True, [], 2**40, 2**62]
    f: list[tuple[list, list]] = []
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
    ):
        v = cfg[key]
        f.append(([key], ints + [v + 1, v * 2, v // 2 or 3]))
    f += [
        (["model_type"], [MISSING, None, "x", 3, "bert", "gpt2", "t5", ""]),
        (["hidden_act"], [MISSING, None, "x", 3, "", [], {"a": 1}]),
        (["rms_norm_eps"], [None, "x", -1, 0, True, [], "NaN", "Infinity", -1e-5]),
        (
            ["rope_parameters"],
            [
                None,
                "x",
                3,
                {"rope_type": "x"},
                {"rope_type": "default", "rope_theta": -1},
                {"rope_type": "default", "rope_theta": "x"},
                {"rope_type": "default"},
            ],
        ),
        (["tie_word_embeddings"], [False, None, "x", 0, []]),
        (["dtype"], [None, "x", 3, "int8", "float16", "bfloat16", "bool", [], "torch.int32"]),
        (["attention_bias"], [True, "x", 1]),
        (["mlp_bias"], [True, "x", 1]),
        (["pad_token_id"], [2**40, -5, "x", 1.5]),
        (["attn_implementation"], ["flash_attention_2", "x", 3]),
        (["auto_map"], ["EVIL"]),
        (["quantization_config"], [MISSING, None, "x", 3, [], {}]),
        (["quantization_config", "quant_method"], [MISSING, None, "x", 3, "awq", "bitsandbytes", "LOWBIT"]),
    ]
    if fmt == "lowbit":
        f += [
            (["quantization_config", "format_version"], [MISSING, None, 4, 0, "1", [], 1.5, True]),
            (["quantization_config", "packing"], [MISSING, None, "x", 3]),
            (["quantization_config", "modules"], [MISSING, None, [], {}, "x", 3]),
        ]
        for name, spec in list(qc["modules"].items())[:12]:
            p = ["quantization_config", "modules", name]
            f += [
                (p, [MISSING, None, [], "x", {}, {"bits": spec["bits"]}]),
                (
                    p + ["bits"],
                    [
                        MISSING,
                        None,
                        "4",
                        float(spec["bits"]),
                        0,
                        1,
                        5,
                        16,
                        -4,
                        True,
                        2**40,
                        3 if spec["bits"] != 3 else 4,
                    ],
                ),
                (p + ["group_size"], [MISSING, None, 0, -1, 3, 7, 16, 128, 2**40, 32.0, "32", True]),
                (p + ["format"], [None, "awq", 3, "dsq" if spec.get("format", "uniform") == "uniform" else "uniform"]),
            ]
        f.append(
            (["quantization_config", "modules", "model.layers.0.input_layernorm"], [{"bits": 4, "group_size": 32}])
        )
        f.append((["quantization_config", "modules", "model.embed_tokens"], [{"bits": 4, "group_size": 32}]))
        f.append((["quantization_config", "modules", "model.layers.7.mlp.up_proj"], [{"bits": 4, "group_size": 32}]))
        f.append(
            (
                ["quantization_config", "norm_biases"],
                [None, "x", [3], ["model.norm"], ["model.layers.0.self_attn.q_proj"], ["nope"], ["model.norm"] * 2]
                + ([MISSING, []] if qc.get("norm_biases") else []),
            )
        )
        ops = qc.get("input_ops") or {}
        f.append((["quantization_config", "input_ops"], [None, [], "x", {"model.nope": {"hadamard": 0}}]))
        for name in list(ops)[:4]:
            p = ["quantization_config", "input_ops", name]
            f += [(p, [None, "x", []]), (p + ["hadamard"], [-1, 1.5, 2**40, 3, "x", None, True, 48])]
            f += [(p + ["token_scale"], ["x", None, 3, []])]
            f += [(p + ["act_scale"], ["x"])]
        act = qc.get("activations")
        if act:
            p = ["quantization_config", "activations"]
            f += [(p, [MISSING, None, "x", [], 3, {}])]
            for key, vals in (
                ("bits", [None, "8", 5, 0, -1, 2**40, 8.5, True]),
                ("kv_bits", [None, "8", 5, 0, 7.5]),
                ("mode", [None, "x", 3]),
                ("sym", [None, "x", 3]),
                ("clip", ["x", None, -1, "NaN"]),
                ("modules", [None, "x", [3], ["model.nope"], []]),
            ):
                f.append((p + [key], [MISSING, *vals] if key in ("bits", "modules", "mode") else vals))
    else:
        p = ["quantization_config"]
        f += [
            (p + ["bits"], [MISSING, None, "4", 3, 5, 0, 16, 4.0, True, 2**40, 8, 2]),
            (p + ["group_size"], [None, 0, -2, 7, 3.5, "32", True, 2**40, 64, 16, -1]),
            (p + ["sym"], [None, "x", 3]),
            (p + ["checkpoint_format"], [None, "x", 3, "marlin"]),
            (p + ["desc_act"], ["x", 3, None]),
            (p + ["dynamic"], ["x", [], 3, {"+:(a+)+$": {}}, {"+:[": {}}, {"+:.*": {"bits": 3}}, {"-:.*": {}},
                               {"+:.*": {"bits": 8}}, {"+:.*": {"group_size": 16}}, {"+:.*": {"x": 1}}]),
        ]
    return f


@dataclass
class Mutation:
    kind: str  # the class in the terms
    detail: str


def _config_field(rng: random.Random, d: Path, fx: dict) -> Mutation:
    cfg = json.loads((d / "config.json").read_text())
    path, values = rng.choice(_config_fields(cfg, fx["format"]))
    value = rng.choice(values)
    if path == ["auto_map"]:
        (d / "evil.py").write_text(_evil_module(d.parent / SENTINEL))
        value = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    text = json.dumps(_set_path(cfg, list(path), value))
    if value in ("NaN", "Infinity"):
        text = text.replace(f'"{value}"', value)  # JSON's non-standard tokens, as Python writes them
    _replace(d / "config.json", text.encode())
    shown = "<deleted>" if value is MISSING else json.dumps(value)[:40]
    return Mutation("config-field", f"{'.'.join(map(str, path))} = {shown}")


def _gptq_side_config(rng: random.Random, d: Path, fx: dict) -> Mutation:
    """quantize_config.json (the file vLLM reads) edited, or standing alone without config.json's copy."""
    if fx["format"] != "gptq":
        return _config_field(rng, d, fx)
    choice = rng.randrange(4)
    side = d / "quantize_config.json"
    if choice == 0:
        _edit_json(side, lambda c: {**c, "bits": rng.choice([2, 8, "x", None])})
        return Mutation("config-field", "quantize_config.json bits disagrees")
    if choice == 1:
        _edit_json(side, lambda c: {**c, "group_size": rng.choice([64, 16, "x", 0])})
        return Mutation("config-field", "quantize_config.json group_size disagrees")
    if choice == 2:
        _edit_json(d / "config.json", lambda c: {k: v for k, v in c.items() if k != "quantization_config"})
        return Mutation("config-field", "quantization_config only in quantize_config.json")
    _replace(side, rng.choice([b"{", b"[]", b"\xff\xfe", b"3"]))
    return Mutation("config-field", "quantize_config.json unreadable")


def _config_file(rng: random.Random, d: Path, fx: dict) -> Mutation:
    f = d / "config.json"
    choice = rng.randrange(9)
    if choice == 0:
        data = bytearray(f.read_bytes())
        for _ in range(50):  # flip bytes until the text is no longer valid JSON: valid edits are field mutations
            trial = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                trial[rng.randrange(len(trial))] ^= 1 << rng.randrange(8)
            try:
                json.loads(trial.decode())
            except (ValueError, UnicodeDecodeError):
                _replace(f, bytes(trial))
                return Mutation("config-file", "bit flips (invalid JSON)")
        return Mutation("config-file", "bit flips (no invalid variant found: unchanged)")
    if choice == 1:
        data = f.read_bytes()
        _replace(f, data[: rng.randrange(len(data))])
        return Mutation("config-file", "truncated")
    if choice == 2:
        _replace(f, rng.choice([b"", b"[1, 2]", b"3", b'"x"', b"null", b"\xff\xfe\x00x", b"NaN"]))
        return Mutation("config-file", "not an object")
    if choice == 3:
        depth = rng.choice([1000, 100000])
        _replace(f, b'{"a": ' + b"[" * depth + b"]" * depth + b"}")
        return Mutation("config-file", f"nested {depth} deep")
    if choice == 4:
        f.unlink()
        os.symlink("/dev/zero", f)
        return Mutation("linked-file", "config.json -> /dev/zero")
    if choice == 5:
        f.unlink()
        os.mkfifo(f)
        return Mutation("linked-file", "config.json is a FIFO")
    if choice == 6:
        f.unlink()
        with open(f, "wb") as fh:
            fh.truncate(2**40)  # sparse: a terabyte of zeros
        return Mutation("linked-file", "config.json is 1 TiB (sparse)")
    if choice == 7:
        f.unlink()
        return Mutation("config-file", "deleted")
    f.unlink()
    f.mkdir()
    return Mutation("config-file", "a directory")


def _weight_bytes(rng: random.Random, d: Path, fx: dict) -> Mutation:
    f = rng.choice(_weights(d))
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    choice = rng.randrange(4)
    resum = fx["format"] == "lowbit" and rng.random() < 0.5
    if choice == 0:  # the header (with rewritten checksums: the header parser and checks must catch it)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(8 + n)
            data[i] ^= 1 << rng.randrange(8)
        what = "header bit flips"
    elif choice == 1 and fx["format"] == "lowbit":  # the data: only checksums can tell; never rewritten here
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(8 + n, len(data))] ^= 1 << rng.randrange(8)
        resum, what = False, "data bit flips"
    elif choice == 2:
        data = data[: rng.randrange(len(data))]
        what = "truncated"
    else:
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        what = "trailing bytes"
    _replace(f, bytes(data))
    if resum:
        _resum(d)
    return Mutation("weight-bytes", f"{f.name}: {what}{' (sums rewritten)' if resum else ''}")


ST_DTYPES = ["F32", "F16", "BF16", "I32", "U32", "I16", "U8", "I8", "BOOL", "F64", "I64", "F8_E4M3", "X"]


def _weight_header(rng: random.Random, d: Path, fx: dict) -> Mutation:
    f = rng.choice(_weights(d))
    header, body = _st_split(f.read_bytes())
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    t = header[name]
    choice = rng.randrange(5)
    if choice == 0:
        t["dtype"] = rng.choice([x for x in ST_DTYPES if x != t["dtype"]])
        what = f"dtype -> {t['dtype']}"
    elif choice == 1:
        s = t["shape"]
        t["shape"] = rng.choice([s[::-1], [*s, 1], s[1:] or [0], [x * 2 for x in s], [-1] + s[1:], [2**40] + s[1:]])
        what = f"shape -> {t['shape']}"
    elif choice == 2:
        a, b = t["data_offsets"]
        t["data_offsets"] = rng.choice([[b, a], [a, b + 8], [a + 1, b], [0, 2**62], [a, a]])
        what = f"offsets -> {t['data_offsets']}"
    elif choice == 3:
        header[rng.choice(["model.nope", name + "x", "lm_head.weight"])] = dict(t)
        what = "a second name for the same bytes"
    else:
        header["__metadata__"] = rng.choice([{"format": 3}, [], {"format": "pt", "x": "y" * 1000}, "x"])
        what = "metadata"
    _replace(f, _st_join(header, body))
    _resum(d)
    return Mutation("weight-header", f"{f.name}: {name}: {what}")


def _pick_tensor(rng: random.Random, state: dict) -> str:
    keys = sorted(state)
    packed = [
        k
        for k in keys
        if k.rsplit(".", 1)[1]
        in ("qweight", "qzeros", "scales", "zeros", "planes", "row_scales", "g_idx", "act_scale", "bias")
    ]
    return rng.choice(packed if packed and rng.random() < 0.7 else keys)


def _tensor_edit(rng: random.Random, d: Path, fx: dict) -> Mutation:
    import torch

    f = rng.choice(_weights(d))
    state = _tensors(f)
    name = _pick_tensor(rng, state)
    t = state[name]
    choice = rng.randrange(7)
    if choice == 0:
        dt = rng.choice(
            [
                x
                for x in (
                    torch.float32,
                    torch.float16,
                    torch.bfloat16,
                    torch.int8,
                    torch.int16,
                    torch.int32,
                    torch.uint8,
                    torch.bool,
                    torch.float64,
                    torch.int64,
                )
                if x != t.dtype
            ]
        )
        state[name] = t.to(dt)
        what = f"cast to {dt}"
    elif choice == 1:
        state[name] = rng.choice(
            [
                t.reshape(-1),
                t.reshape(-1)[: max(1, t.numel() // 2)].clone(),
                t[..., None],
                t.reshape(-1)[:1].clone(),
                t.t().contiguous() if t.dim() == 2 else t[None],
            ]
        )
        what = f"shape {list(t.shape)} -> {list(state[name].shape)}"
    elif choice == 2:
        del state[name]
        what = "removed"
        if not state:
            state["model.nope"] = torch.zeros(1)
    elif choice == 3:
        extra = rng.choice(
            [
                "model.nope",
                "lm_head.weight",
                "model.layers.0.mlp.up_proj.extra",
                "model.layers.0.post_attention_layernorm.bias",
                name + "2",
            ]
        )
        state[extra] = t.clone() if extra != "lm_head.weight" else torch.zeros(49152, 64)
        what = f"extra tensor {extra}"
    elif choice == 4 and t.is_floating_point():
        v = t.clone()
        v.reshape(-1)[rng.randrange(v.numel())] = rng.choice([float("nan"), float("inf"), -float("inf")])
        state[name] = v
        what = "a non-finite value"
    elif choice == 5 and name.endswith((".zeros", ".row_scales", ".scales", ".act_scale")):
        v = t.clone()
        v.reshape(-1)[rng.randrange(v.numel())] = 255 if name.endswith(".zeros") else -1.0
        state[name] = v
        what = "an out-of-range value"
    elif choice == 6 and name.endswith(".bias"):
        state[name] = t[:1].clone()
        what = "bias of shape [1]"
    else:
        state[name] = t.reshape(-1)[:-1].clone() if t.numel() > 1 else t.new_zeros(2)
        what = "one element short"
    _save_tensors(f, state)
    _resum(d)
    return Mutation("tensor", f"{name}: {what} (sums rewritten)")


def _checksums(rng: random.Random, d: Path, fx: dict) -> Mutation:
    if fx["format"] != "lowbit":
        return _stray(rng, d, fx)
    sums = d / "SHA256SUMS"
    lines = sums.read_text().splitlines()
    digest = lines[0].split()[0]
    choice = rng.randrange(9)
    variants = [
        lambda: "\n" + "\n".join(lines) + "\n",
        lambda: "not a checksum line\n" + "\n".join(lines),
        lambda: f"{digest}  ../{d.name}/model.safetensors\n",
        lambda: f"{digest}  /etc/passwd\n",
        lambda: "\n".join(lines[1:]) + "\n" if len(lines) > 1 else "",
        lambda: "\n".join(lines + lines) + "\n",
        lambda: "\n".join(x.upper() for x in lines) + "\n",
        lambda: "\r\n".join(lines) + "\r\n",
        lambda: f"{hashlib.sha256((d / 'config.json').read_bytes()).hexdigest()}  config.json\n" + "\n".join(lines),
    ]
    _replace(sums, variants[choice]().encode())
    if rng.random() < 0.2:
        sums.unlink()
        return Mutation("checksums", "SHA256SUMS removed")
    return Mutation("checksums", f"SHA256SUMS variant {choice}")


def _stray(rng: random.Random, d: Path, fx: dict) -> Mutation:
    """Files an attacker adds: weights that would override real ones, pickles that execute code, links."""
    import torch

    sentinel = d.parent / SENTINEL
    choice = rng.randrange(7)
    if choice == 0:
        w = _weights(d)[0]
        state = {k: torch.zeros_like(v) for k, v in list(_tensors(w).items())[:3]}
        stray = d / rng.choice(["zz-extra.safetensors", "adapter.safetensors", "model-override.safetensors"])
        from safetensors.torch import save_file

        save_file(state, str(stray))
        if fx["format"] == "lowbit" and rng.random() < 0.5:
            with open(d / "SHA256SUMS", "a") as fh:
                fh.write(f"{hashlib.sha256(stray.read_bytes()).hexdigest()}  {stray.name}\n")
            return Mutation("stray-file", f"{stray.name} overriding 3 tensors, listed in SHA256SUMS")
        return Mutation("stray-file", f"{stray.name} overriding 3 tensors")
    if choice == 1:
        for name in ("pytorch_model.bin", "model.bin", "training_args.bin", "optimizer.pt"):
            (d / name).write_bytes(_evil_pickle(sentinel))
        return Mutation("pickle", "pickles beside the weights")
    if choice == 2:
        w = rng.choice(_weights(d))
        _replace(w, _evil_pickle(sentinel))
        _resum(d)
        return Mutation("pickle", f"{w.name} replaced by a pickle")
    if choice == 3:
        for w in _weights(d):
            w.unlink()
        (d / "pytorch_model.bin").write_bytes(_evil_pickle(sentinel))
        return Mutation("pickle", "only a pickle, no safetensors")
    if choice == 4:
        w = rng.choice(_weights(d))
        w.unlink()
        os.symlink(rng.choice(["/dev/zero", "/dev/null", "/nonexistent", "/etc"]), w)
        return Mutation("linked-file", f"{w.name} -> a device or nothing")
    if choice == 5:
        idx = d / "model.safetensors.index.json"
        weights = _weights(d)
        target = rng.choice([f"../{d.name}/{weights[0].name}", "/etc/passwd", "nope.safetensors", 3, None])
        if idx.exists():
            _edit_json(idx, lambda c: {**c, "weight_map": {**c["weight_map"], next(iter(c["weight_map"])): target}})
        else:
            key = next(iter(_st_split(weights[0].read_bytes())[0]))
            _replace(idx, json.dumps({"metadata": {}, "weight_map": {key: target}}).encode())
        return Mutation("index", f"index maps a tensor to {target!r}")
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        _replace(idx, rng.choice([b"{", b"[]", b'{"weight_map": 3}', b'{"weight_map": {}}', b"\xff"]))
        return Mutation("index", "index unreadable or empty")
    return _weight_bytes(rng, d, fx)


def _tokenizer(rng: random.Random, d: Path, fx: dict) -> Mutation:
    files = ["tokenizer.json", "tokenizer_config.json"]
    f = d / rng.choice(files)
    choice = rng.randrange(8)
    if choice == 0:
        f.unlink()
        return Mutation("tokenizer", f"{f.name} deleted")
    if choice == 1:
        for x in files:
            (d / x).unlink()
        return Mutation("tokenizer", "all tokenizer files deleted")
    if choice == 2:
        data = f.read_bytes()
        _replace(f, data[: rng.randrange(len(data))])
        return Mutation("tokenizer", f"{f.name} truncated")
    if choice == 3:
        _replace(f, rng.choice([b"\xff\xfe", b"[]", b"3", b"{", b"null"]))
        return Mutation("tokenizer", f"{f.name} not an object")
    if choice == 4:
        (d / "evil_tok.py").write_text(_evil_module(d.parent / SENTINEL))
        cls = rng.choice(["EvilTokenizer", "x", 3, None])
        _edit_json(
            d / "tokenizer_config.json",
            lambda c: {**c, "tokenizer_class": cls, "auto_map": {"AutoTokenizer": ["evil_tok.Evil", None]}},
        )
        return Mutation("tokenizer", f"tokenizer_class {cls!r} with auto_map code")
    if choice == 5:
        f.unlink()
        os.mkfifo(f)
        return Mutation("linked-file", f"{f.name} is a FIFO")
    if choice == 6:
        f.unlink()
        with open(f, "wb") as fh:
            fh.truncate(2**40)
        return Mutation("linked-file", f"{f.name} is 1 TiB (sparse)")
    f.unlink()
    os.symlink("/dev/zero", f)
    return Mutation("linked-file", f"{f.name} -> /dev/zero")


def _report(rng: random.Random, d: Path, fx: dict) -> Mutation:
    f = d / "quant_report.json"
    good = json.loads(f.read_text()) if f.is_file() else {}
    variants = [
        lambda: f.read_bytes()[: rng.randrange(1, 40)] if f.is_file() else b"{",
        lambda: b"[]",
        lambda: b"\xff\xfe",
        lambda: json.dumps({**good, "sizes": 3}).encode(),
        lambda: json.dumps({**good, "sizes": {"bits_per_weight": "x"}}).encode(),
        lambda: json.dumps({**good, "perplexity_quantized": {"ppl": "x"}}).encode(),
        lambda: json.dumps({**good, "perplexity_quantized": 3}).encode(),
        lambda: json.dumps({"perplexity_float": {"ppl": 1.0}}).encode(),
        lambda: b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}",
        lambda: json.dumps({**good, "quantize_seconds": {"x": [1]}}).encode(),
    ]
    i = rng.randrange(len(variants) + 2)
    if i == len(variants):
        if f.exists():
            f.unlink()
        os.mkfifo(f)
        return Mutation("report", "quant_report.json is a FIFO")
    if i == len(variants) + 1:
        if f.exists():
            f.unlink()
        with open(f, "wb") as fh:
            fh.truncate(2**40)
        return Mutation("report", "quant_report.json is 1 TiB (sparse)")
    _replace(f, variants[i]())
    return Mutation("report", f"quant_report.json variant {i}")


MUTATORS = [
    (_config_field, 30),
    (_gptq_side_config, 3),
    (_config_file, 8),
    (_weight_bytes, 10),
    (_weight_header, 10),
    (_tensor_edit, 14),
    (_checksums, 6),
    (_stray, 8),
    (_tokenizer, 7),
    (_report, 4),
]


def make_case(i: int, seed: int, fixtures: dict, work: Path) -> dict:
    rng = random.Random(f"{seed}-{i}")
    name = rng.choice(sorted(fixtures))
    fx = fixtures[name]
    loader = rng.choice(LOADERS[fx["format"]])
    case_root = work / f"case-{i:05d}"
    d = case_root / "ckpt"
    d.mkdir(parents=True)
    for f in Path(fx["dir"]).iterdir():  # weights are hard links (every edit replaces them), the rest copies
        (os.link if f.suffix == ".safetensors" else shutil.copyfile)(f, d / f.name)
    fn = rng.choices([m for m, _ in MUTATORS], weights=[w for _, w in MUTATORS])[0]
    m = fn(rng, d, fx)
    if m.kind == "report" and loader not in ("inspect",) and rng.random() < 0.7:
        loader = "inspect"  # the report is only read by inspect
    return {"id": i, "fixture": name, "loader": loader, "dir": str(d), "kind": m.kind, "detail": m.detail}


# ---------------------------------------------------------------------------------------- the child side


def _digest(model, tok) -> str:
    import torch

    with torch.no_grad():
        logits = model(torch.tensor(PROBE_IDS)).logits
    if not bool(torch.isfinite(logits).all()):
        return "non-finite logits"
    h = hashlib.sha256(logits.float().numpy().tobytes())
    h.update(json.dumps(tok(PROBE_TEXT).input_ids).encode())
    return h.hexdigest()


def _run_api(loader: str, folder: str) -> dict:
    from quant import QuantError
    from quant.formats.checkpoint import load_quantized
    from quant.formats.gptq_format import load_gptq
    from quant.formats.models import load_model

    try:
        if loader == "load_model":
            lm = load_model(folder)
            model, tok = lm.model, lm.tokenizer
        else:
            model, tok = (load_quantized if loader == "load_quantized" else load_gptq)(folder)
    except QuantError as e:
        msg = str(e)
        return {"outcome": "multiline" if "\n" in msg.strip() else "error", "message": msg[:300]}
    except Exception as e:  # noqa: BLE001  (what the fuzzer is looking for)
        return {"outcome": "traceback", "message": f"{type(e).__name__}: {str(e)[:300]}"}
    try:
        return {"outcome": "loaded", "digest": _digest(model, tok)}
    except Exception as e:  # noqa: BLE001
        return {"outcome": "traceback", "message": f"after load: {type(e).__name__}: {str(e)[:300]}"}


def _run_cli(loader: str, folder: str) -> dict:
    import cli

    argv = ["quantize", "inspect", folder]
    if loader == "eval":
        argv = ["quantize", "eval", folder, "--max-windows", "1", "--seqlen", "32", "--dataset", "c4"]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException as e:  # noqa: BLE001
        return {"outcome": "traceback", "message": f"{type(e).__name__}: {str(e)[:300]}"}
    stderr = err.getvalue()
    bar = re.compile(r"\d+%\|")  # perplexity's progress bar, the only other thing eval writes to stderr
    lines = [x for x in stderr.replace("\r", "\n").splitlines() if x.strip() and not bar.search(x)]
    if "Traceback" in stderr:
        return {"outcome": "traceback", "message": stderr[-300:]}
    if code == 2 and lines and lines[-1].startswith("error:"):
        return {"outcome": "error", "message": lines[-1][:300]}
    if code != 0:
        return {"outcome": "traceback", "message": f"exit {code}: {stderr[-300:]}"}
    if loader == "eval":
        try:
            return {"outcome": "loaded", "digest": repr(json.loads(out.getvalue())["ppl"])}
        except (ValueError, KeyError) as e:
            return {"outcome": "traceback", "message": f"eval output unreadable: {e}"}
    return {"outcome": "loaded", "digest": "inspect"}


def child(case: dict, limit: bool = True) -> dict:
    import torch

    torch.set_num_threads(1)
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    if case["loader"] in ("inspect", "eval"):
        return _run_cli(case["loader"], case["dir"])
    return _run_api(case["loader"], case["dir"])


def worker() -> None:
    """Read cases (JSON lines) on stdin; run each in a forked child with a timeout; answer on stdout."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ["TQDM_DISABLE"] = "1"
    import transformers  # noqa: F401

    import cli  # noqa: F401  (imported once here; every child is a fork of this process)
    import quant  # noqa: F401
    from quant.runtime import perplexity

    # eval reads one 32-token window: a short slice of the real C4 text, not the 1,000 records, tokenized
    text, desc = perplexity.EVAL_SETS["c4"]
    short = text()[:4000]
    perplexity.EVAL_SETS["c4"] = (lambda: short, desc + " (first 4,000 characters, fuzzer)")

    out = sys.stdout
    sys.stdout = sys.stderr
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        case = json.loads(line)
        if "warm" in case:  # load every undamaged fixture once here, so the children inherit the lazy imports
            import torch

            torch.set_num_threads(1)  # no thread pool is started before the forks
            with contextlib.redirect_stderr(io.StringIO()):
                for c in case["warm"]:
                    child(c, limit=False)
            out.write("{}\n")
            out.flush()
            continue
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            try:
                res = child(case)
            except BaseException as e:  # noqa: BLE001
                res = {"outcome": "traceback", "message": f"{type(e).__name__}: {str(e)[:300]}"}
            os.write(w, json.dumps(res).encode())
            os._exit(0)
        os.close(w)
        t0 = time.monotonic()
        buf = b""
        res = None
        while True:
            left = case["timeout"] - (time.monotonic() - t0)
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                res = {"outcome": "hang", "message": f"no answer in {case['timeout']} s"}
                break
            ready, _, _ = select.select([r], [], [], left)
            if ready:
                chunk = os.read(r, 1 << 16)
                if not chunk:
                    break
                buf += chunk
        os.close(r)
        _, status = os.waitpid(pid, 0)
        if res is None:
            try:
                res = json.loads(buf)
            except ValueError:
                res = {"outcome": "crash", "message": f"child ended with status {status} and no answer"}
        res["seconds"] = round(time.monotonic() - t0, 3)
        out.write(json.dumps(res) + "\n")
        out.flush()


# ---------------------------------------------------------------------------------------- the parent side


class Worker:
    def __init__(self) -> None:
        import subprocess

        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)])}
        self.p = subprocess.Popen(
            [sys.executable, __file__, "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        assert self.p.stdout.readline().strip() == "ready"

    def run(self, case: dict) -> dict:
        self.p.stdin.write(json.dumps(case) + "\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait()


def judge(case: dict, res: dict, base: dict) -> str:
    """The case's verdict: "error" or "exact" pass; anything in BAD fails."""
    if Path(case["dir"]).parent.joinpath(SENTINEL).exists():
        return "code-exec"
    if res["outcome"] != "loaded":
        return res["outcome"]
    return "exact" if res["digest"] == base[(case["fixture"], case["loader"])] else "silent"


def fuzz(cases: int, seed: int = 0, timeout: float = 60.0, work: Path | None = None, progress=None) -> dict:
    """Build the fixtures, run ``cases`` mutations, return {"cases": [...], "summary": {...}}."""
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="lowbit-fuzz-")) if own else work
    try:
        listing = work / "fixtures" / "fixtures.json"
        if listing.is_file():  # --work DIR reuses the fixtures an earlier run built there
            fixtures = json.loads(listing.read_text())
        else:
            fixtures = build_fixtures(work / "fixtures")
            listing.write_text(json.dumps(fixtures))
        w = Worker()
        warm = {fx["format"]: fx["dir"] for fx in fixtures.values()}
        w.run({"warm": [{"dir": d, "loader": ld} for fmt, d in warm.items() for ld in LOADERS[fmt]]})
        base: dict = {}
        for name, fx in fixtures.items():
            for loader in LOADERS[fx["format"]]:
                res = w.run({"dir": fx["dir"], "loader": loader, "timeout": timeout})
                if res["outcome"] != "loaded":
                    raise RuntimeError(f"fixture {name} does not load through {loader}: {res}")
                base[(name, loader)] = res["digest"]
        results = []
        t0 = time.monotonic()
        for i in range(cases):
            shutil.rmtree(work / "cases" / f"case-{i:05d}", ignore_errors=True)
            case = make_case(i, seed, fixtures, work / "cases")
            res = w.run({**case, "timeout": timeout})
            verdict = judge(case, res, base)
            results.append({**case, "verdict": verdict, "message": res.get("message", ""), "seconds": res["seconds"]})
            shutil.rmtree(Path(case["dir"]).parent, ignore_errors=True)
            if progress:
                progress(i, results[-1])
        w.close()
        return {"cases": results, "summary": summarize(results, seed, time.monotonic() - t0)}
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def summarize(results: list[dict], seed: int, seconds: float) -> dict:
    verdicts = Counter(r["verdict"] for r in results)
    by_kind: dict[str, Counter] = {}
    by_loader: dict[str, Counter] = {}
    for r in results:
        by_kind.setdefault(r["kind"], Counter())[r["verdict"]] += 1
        by_loader.setdefault(r["loader"], Counter())[r["verdict"]] += 1
    return {
        "cases": len(results),
        "seed": seed,
        "seconds": round(seconds, 1),
        "verdicts": dict(verdicts),
        "failures": sum(verdicts[b] for b in BAD),
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "by_loader": {k: dict(v) for k, v in sorted(by_loader.items())},
        "formats": dict(Counter("gptq" if r["fixture"].startswith("gptq") else "lowbit" for r in results)),
    }


def markdown(summary: dict, results: list[dict]) -> str:
    cols = ["error", "exact", *BAD]
    out = [
        f"# Checkpoint fuzzer: {summary['cases']} cases (seed {summary['seed']}, {summary['seconds']} s on this "
        "machine)",
        "",
        "`python tests/checkpoint_fuzzer.py --cases N` (tests/checkpoint_fuzzer.py). Pass: a clean one-line error "
        "or an exact load. Cases per format: " + ", ".join(f"{k} {v}" for k, v in summary["formats"].items()) + ".",
        "",
    ]
    for title, table in (("mutation class", summary["by_kind"]), ("loader", summary["by_loader"])):
        out += [f"| {title} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for k, v in table.items():
            out.append(f"| {k} | " + " | ".join(str(v.get(c, 0)) for c in cols) + " |")
        total = Counter()
        for v in table.values():
            total.update(v)
        out += ["| **all** | " + " | ".join(f"**{total.get(c, 0)}**" for c in cols) + " |", ""]
    bad = [r for r in results if r["verdict"] in BAD]
    if bad:
        out += ["## Failures", ""] + [
            f"- case {r['id']} {r['fixture']}/{r['loader']} [{r['kind']}] {r['detail']}: **{r['verdict']}** "
            f"{r['message'][:200]}"
            for r in bad
        ]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fuzz")
    ap.add_argument("--work", type=Path, help="keep fixtures here and reuse them on the next run")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def show(i, r):
        if r["verdict"] in BAD:
            print(f"[{i}] {r['fixture']}/{r['loader']} {r['kind']}: {r['detail']}: {r['verdict']} {r['message'][:160]}")
        elif i % 100 == 0:
            print(f"[{i}] ...", flush=True)

    res = fuzz(args.cases, args.seed, args.timeout, work=args.work, progress=show)
    from quant.formats.atomic import atomic_file

    args.out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(res, indent=1)), (".md", markdown(res["summary"], res["cases"]))):
        with atomic_file(args.out.with_suffix(suffix)) as f:
            f.write(text)
    print(json.dumps(res["summary"], indent=1))


if __name__ == "__main__":
    main()
