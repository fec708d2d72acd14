"""The one guarded reader under every loader (our format, GPTQ import, float folders).

Everything a loader takes from a folder comes through here: small text files read with a size bound and
only if they are regular files (a link to ``/dev/zero`` or a FIFO is refused, not read forever);
``config.json`` checked against the fields every decoder config shares before transformers sees it; the
model built on the meta device first, so that the names, dtypes and shapes in the safetensors headers are
checked against it before any tensor is read or any real memory is allocated; weights read only from the
files named by SHA256SUMS or the index, inside the folder, each tensor name once; the tokenizer loaded with
its files checked first. Every failure of json, safetensors or transformers on the way becomes one
``QuantError`` line naming the folder and the file or field.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from quant.errors import QuantError
from quant.formats.tensor_checks import check_state, torch_dtype

TEXT_LIMIT = 16 * 1024**2  # config.json, SHA256SUMS, index, reports
TOKENIZER_LIMIT = 512 * 1024**2  # tokenizer.json of a 256k vocabulary is ~35 MB
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
MAX_DIM = 2**31  # no real width, depth or vocabulary comes near it


def corrupt(where: str | Path, what: str) -> QuantError:
    return QuantError(f"corrupt checkpoint {where}: {what}")


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def regular_file(f: Path, where: str | Path, limit: int) -> int:
    """The size of ``f`` after following links, or an error: not a regular file, or larger than ``limit``."""
    try:
        st = os.stat(f)
    except OSError as e:
        raise corrupt(where, f"{f.name} unreadable ({first_line(e)})") from None
    if not stat.S_ISREG(st.st_mode):
        raise corrupt(where, f"{f.name} is not a regular file")
    if st.st_size > limit:
        raise corrupt(where, f"{f.name} is {st.st_size} bytes, more than the {limit} a file of its kind can be")
    return st.st_size


def read_text(f: Path, where: str | Path, limit: int = TEXT_LIMIT) -> str:
    regular_file(f, where, limit)
    try:
        with open(f, "rb") as fh:
            data = fh.read(limit + 1)  # the file may have grown since stat
    except OSError as e:
        raise corrupt(where, f"{f.name} unreadable ({first_line(e)})") from None
    if len(data) > limit:
        raise corrupt(where, f"{f.name} is larger than {limit} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise corrupt(where, f"{f.name} is not UTF-8 text") from None


def read_json(f: Path, where: str | Path, limit: int = TEXT_LIMIT) -> dict:
    """A JSON object from ``f`` (bounded); anything else (bad JSON, too deep, a list) is one error."""
    try:
        obj = json.loads(read_text(f, where, limit))
    except (ValueError, RecursionError) as e:
        raise corrupt(where, f"{f.name} is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(obj, dict):
        raise corrupt(where, f"{f.name} holds a {type(obj).__name__}, not a JSON object")
    return obj


def read_config(path: Path) -> dict:
    if not os.path.lexists(path / "config.json"):
        raise QuantError(f"{path} is not a model folder: no config.json")
    return read_json(path / "config.json", path)


# --------------------------------------------------------------------------------------------- config.json

_SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "max_position_embeddings",
    "n_positions",
    "moe_intermediate_size",
    "num_local_experts",
    "num_experts",
    "num_experts_per_tok",
)
_EPS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "rope_theta")
_ACTS = ("hidden_act", "hidden_activation", "activation_function")
_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_cache")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def check_model_config(raw: dict, where: str | Path) -> None:
    """The fields every decoder config shares, checked before transformers builds anything: sizes are
    positive integers below 2^31, epsilons and rope_theta positive finite numbers, activations known, flags
    booleans. A wrong one would otherwise fail deep inside transformers, or at the first forward pass."""
    from transformers.activations import ACT2FN

    def bad(field: str, v, want: str) -> QuantError:
        return corrupt(where, f"config.json: {field} is {json.dumps(v)[:60]}; {want}")

    mt = raw.get("model_type")
    if not isinstance(mt, str) or not mt:
        raise bad("model_type", mt, "it must name the architecture")
    for k in _SIZES:
        v = raw.get(k)
        if v is not None and not (_is_int(v) and 0 < v < MAX_DIM):
            raise bad(k, v, f"it must be a positive integer below {MAX_DIM}")
    rope = raw.get("rope_parameters", raw.get("rope_scaling"))
    if rope is not None and not isinstance(rope, dict):
        raise bad("rope_parameters", rope, "it must be an object")
    for k, v in [(k, raw.get(k)) for k in _EPS] + [(f"rope_parameters.{k}", (rope or {}).get(k)) for k in _EPS]:
        if v is not None and not _positive_number(v):
            raise bad(k, v, "it must be a positive finite number")
    for k in _ACTS:
        v = raw.get(k)
        if k in raw and not (isinstance(v, str) and v in ACT2FN):
            raise bad(k, v, "it must name a known activation")
    for k in _BOOLS:
        if k in raw and not isinstance(raw[k], bool):
            raise bad(k, raw[k], "it must be true or false")
    for k in ("dtype", "torch_dtype"):
        if raw.get(k) is not None:
            try:
                torch_dtype(raw[k])
            except (QuantError, TypeError):
                raise bad(k, raw[k], "it must name a floating-point dtype") from None


def model_config(raw: dict, where: str | Path):
    """transformers' config object for ``raw`` (its quantization_config left out), or one error."""
    from transformers import CONFIG_MAPPING

    from quant.engine.structure import check_model_type

    check_model_config(raw, where)
    check_model_type(raw["model_type"])  # unsupported architectures are refused by name
    raw = {k: v for k, v in raw.items() if k not in ("quantization_config", "auto_map")}  # never import code
    try:
        return CONFIG_MAPPING[raw["model_type"]].from_dict(raw)
    except Exception as e:  # noqa: BLE001  (transformers' validation: any error is the config's fault)
        raise corrupt(where, f"config.json rejected by transformers ({first_line(e)})") from None


def open_model_config(raw: dict, where: str | Path, default: torch.dtype, dtype: torch.dtype | None):
    """``(config, stored dtype, dtype to build in)`` for a checkpoint's config.json contents ``raw``: the
    dtype the file states (``default`` where it states none) and the one asked for (else the stored one)."""
    config = model_config(raw, where)
    stored = torch_dtype(getattr(config, "dtype", None) or default)
    return config, stored, torch_dtype(dtype or stored)


def build(config, dtype: torch.dtype, where: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The model of ``config`` with uninitialised weights, in the form our checkpoints store (per-expert
    linears, Conv1D as nn.Linear: ``quant.engine.structure.normalize``); on ``"meta"`` it costs no memory, which
    is how sizes are checked against the files before anything real is allocated."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from quant.engine.structure import normalize

    try:
        with no_init_weights(), torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as e:  # noqa: BLE001
        raise corrupt(where, f"config.json does not build a model ({first_line(e)})") from None
    with torch.device(device):
        return normalize(model)


def available_memory() -> int | None:
    """Bytes of memory this machine has available (Linux ``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(x.split()[1]) * 1024 for x in f if x.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def check_memory(meta_model: nn.Module, where: str | Path) -> None:
    """Refuse a build that cannot fit in the memory this machine has free (instead of being killed)."""
    need = sum(t.numel() * t.element_size() for t in meta_model.state_dict().values())
    avail = available_memory()
    if avail is None:
        return
    if need > avail:
        raise QuantError(
            f"{where}: loading needs {need / 2**30:.1f} GiB of memory and {avail / 2**30:.1f} GiB are available"
        )


# ------------------------------------------------------------------------------------------------ weights

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def weight_file(path: Path, name: object, where: str | Path, listed_in: str) -> Path:
    """A weight file that ``listed_in`` names: a plain file name inside the folder, that exists."""
    if not isinstance(name, str) or Path(name).name != name or name in (".", "..") or not name:
        raise corrupt(where, f"{listed_in} names {name!r}, not a file of the folder")
    f = path / name
    if not f.exists():
        raise corrupt(where, f"weight file {name} is missing")
    regular_file(f, where, 2**50)  # links are followed (the Hub's cache links to its blobs); devices are not
    return f


def read_headers(files: Iterable[Path], where: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor the files hold as a meta tensor of its dtype and shape, read from the headers alone;
    a name stored twice is refused (which copy would win is the order of files, not the checkpoint)."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    sl = fh.get_slice(k)
                    dt, shape = _ST_DTYPES.get(sl.get_dtype()), sl.get_shape()
                    if dt is None:
                        raise corrupt(where, f"{k} in {f.name} has unsupported dtype {sl.get_dtype()}")
                    if k in out:
                        raise corrupt(where, f"tensor {k} is stored twice")
                    out[k] = torch.empty(shape, dtype=dt, device="meta")
        except QuantError:
            raise
        except Exception as e:  # noqa: BLE001  (safetensors' header errors, an unreadable file)
            raise corrupt(where, f"cannot read {f.name} ({first_line(e)})") from None
    return out


def read_tensors(files: Iterable[Path], where: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # noqa: BLE001
            raise corrupt(where, f"cannot read {f.name} ({first_line(e)})") from None
    return state


def tied(config) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def check_names(stored: Iterable[str], expected: set[str], config, where: str | Path) -> None:
    """The stored tensor names are exactly the ``expected`` ones (a tied lm_head is stored once, as the
    embedding, and the loader ties it back)."""
    stored = set(stored)
    missing = expected - stored
    if tied(config):
        missing = {k for k in missing if not k.endswith("lm_head.weight")}
    unexpected = stored - expected
    if missing or unexpected:
        first = sorted(missing)[:1] or sorted(unexpected)[:1]
        raise corrupt(where, f"{len(missing)} missing and {len(unexpected)} unexpected tensors (first: {first[0]})")


def _untie(model: nn.Module, state: dict[str, torch.Tensor], where: str | Path) -> None:
    """A tied model stores its output weights once, as the embedding. Some tools also write ``lm_head.weight``:
    accepted (and dropped) only if it equals the embedding, since with tied weights only one of the two can be
    what the model computes with."""
    emb = model.get_input_embeddings()
    emb_name = next(f"{n}.weight" for n, m in model.named_modules() if m is emb)
    for k in [k for k in state if k.endswith("lm_head.weight")]:
        if emb_name not in state or not torch.equal(state[k], state[emb_name]):
            raise corrupt(where, f"{k} differs from the embedding it is tied to (config.json: tie_word_embeddings)")
        del state[k]


def check_headers(
    headers: dict[str, torch.Tensor], meta: nn.Module, expected: set[str], config, stored: torch.dtype, where
) -> None:
    """The headers' tensors (meta tensors from :func:`read_headers`) are exactly the ``expected`` names of the
    meta skeleton, each of its dtype and shape: checked before any tensor data is read."""
    check_names(headers, expected, config, where)
    check_state(headers, meta, stored, str(where))


def load_weights(
    model: nn.Module, state: dict[str, torch.Tensor], config, stored: torch.dtype, where, assign: bool = False
) -> None:
    """Put ``state`` into ``model`` after checking every tensor (dtype, shape, finite values). ``assign`` hands
    the read tensors to the model instead of copying them (converted to the model's dtype where it differs):
    one copy of the weights in memory, not two."""
    check_state(state, model, stored, str(where))
    if tied(config):
        _untie(model, state, where)
    if assign:
        expected = model.state_dict()
        for k, t in state.items():
            ref = expected.get(k)
            if ref is not None and t.is_floating_point() and t.dtype != ref.dtype:
                state[k] = t.to(ref.dtype)
    try:
        model.load_state_dict(state, strict=False, assign=assign)
    except RuntimeError as e:
        raise corrupt(where, str(e).strip().splitlines()[-1].strip()) from None
    if tied(config):
        model.tie_weights()


# ---------------------------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The folder's tokenizer, its files checked first (regular, bounded, tokenizer_config an object)."""
    from transformers import AutoTokenizer

    present = [n for n in TOKENIZER_FILES if os.path.lexists(path / n)]
    if not present:
        raise QuantError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])})")
    for n in present:
        regular_file(path / n, path, TOKENIZER_LIMIT if n in ("tokenizer.json", "tokenizer.model") else TEXT_LIMIT)
    if "tokenizer_config.json" in present:
        read_json(path / "tokenizer_config.json", path)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001  (tokenizers' and transformers' errors on broken files)
        raise QuantError(f"cannot load the tokenizer in {path} ({first_line(e)})") from None
