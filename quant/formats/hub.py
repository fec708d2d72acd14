"""Shipping a checkpoint: the model card, the exact upload set, and the upload to the Hugging Face Hub.

What is uploaded is one folder: every file of the checkpoint plus a generated ``README.md`` (the
model card). ``stage`` builds it; a dry run stops there, an upload hands it to
``HfApi.upload_folder``. Re-running an interrupted upload resumes it: the Hub skips content it
already holds (Xet chunks, or LFS objects it reports as present), so only what is missing travels.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from quant.errors import QuantError
from quant.formats.atomic import atomic_dir
from quant.formats.checkpoint import check_output_dir, read_quantization_config

CARD = "README.md"


def _read_report(ckpt: Path) -> dict:
    rep = ckpt / "quant_report.json"
    return json.loads(rep.read_text()) if rep.is_file() else {}


def _ppl_rows(report: dict) -> list[str]:
    rows = []
    for key, label in (("perplexity_float", "float (base model)"), ("perplexity_quantized", "this checkpoint")):
        r = report.get(key)
        if r:
            rows.append(
                f"| {label} | {r['ppl']:.3f} | {r['windows']} / {r['total_windows']} of {r.get('seqlen', 2048)} |"
            )
    return rows


def model_card(
    ckpt: str | Path, repo_id: str, base_model: str | None = None, license: str | None = None, fmt: str = "lowbit"
) -> str:
    """The Hub model card of checkpoint ``ckpt`` (uploaded as is, ``fmt="lowbit"``, or as its GPTQ export,
    ``fmt="gptq"``): metadata header, what was done, quality, how to load."""
    ckpt = Path(ckpt)
    qc = read_quantization_config(ckpt)
    report = _read_report(ckpt)
    base = report.get("base_model") or {}
    base_id = base_model or base.get("id") or "unknown"
    lic = license or base.get("license") or "unknown"
    mods = qc.get("modules", {})
    bits = Counter(m["bits"] for m in mods.values())
    groups = Counter(m["group_size"] for m in mods.values())
    formats = Counter(m.get("format", "uniform") for m in mods.values())
    calib = qc.get("calibration") or {}
    sizes = report.get("sizes") or {}
    method = qc.get("method", "?")
    names = [p["name"] for p in qc.get("passes", [])]
    passes = f" ({' → '.join(names)})" if len(names) > 1 else ""
    width = "mixed " + "/".join(str(b) for b in sorted(bits)) if len(bits) > 1 else f"{next(iter(bits), '?')}"

    header = ["---", f"base_model: {base_id}" if base_id != "unknown" else "", f"license: {lic}",
              "library_name: transformers", "pipeline_tag: text-generation",
              "tags:", "- lowbit", "- quantized", f"- {method}", f"- {width.replace(' ', '-').replace('/', '-')}-bit",
              "---"]  # fmt: skip
    lines = [line for line in header if line]
    lines += [
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        f"`{base_id}` quantized to {width} bits with **{method}** by lowbit.",
        "",
        "## Quantization",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base_id}` |",
        f"| method | {method}{passes} |",
        f"| bits per linear | {', '.join(f'{b}-bit: {n}' for b, n in sorted(bits.items()))} |",
        f"| group size | {', '.join(f'{g}: {n}' for g, n in sorted(groups.items()))} (layers) |",
        f"| formats | {', '.join(f'{f}: {n}' for f, n in sorted(formats.items()))} |",
        f"| symmetric | {qc.get('sym', False)} |",
    ]
    if qc.get("allocation") not in (None, "none"):
        lines.append(f"| bit allocation | {qc['allocation']}, average budget {qc.get('bits')} bits |")
    if qc.get("norm_biases"):
        lines.append(f"| norm biases (DAC) | {len(qc['norm_biases'])} norms |")
    if calib:
        lines.append(
            f"| calibration | {calib.get('source')}: {calib.get('nsamples')} × {calib.get('seqlen')} tokens, "
            f"seed {calib.get('seed')} |"
        )
    else:
        lines.append("| calibration | none (data-free) |")
    if sizes:
        lines.append(
            f"| bits per weight | {sizes['bits_per_weight']} (quantized linears, all scales and zeros counted) |"
        )
    if "quantize_seconds" in report:
        lines.append(f"| quantization time | {report['quantize_seconds']} s |")
    ppl = _ppl_rows(report)
    lines += ["", "## Quality", ""]
    if ppl:
        lines += [
            "WikiText-2 (raw, test split) perplexity, non-overlapping windows, as measured by the quantization run:",
            "",
            "| model | perplexity | windows |",
            "|---|---|---|",
            *ppl,
        ]
    else:
        lines.append("The quantization run did not measure perplexity (`--no-eval`).")
    if (ckpt / "allocation.png").is_file():
        lines += ["", "![bit allocation](allocation.png)"]
    lines += ["", "## How to load", "", *(_load_gptq(repo_id) if fmt == "gptq" else _load_lowbit(repo_id)), ""]
    lines += [
        "## License",
        "",
        f"{lic}, carried over from the base model `{base_id}`.",
        "",
    ]
    return "\n".join(lines)


def _load_lowbit(repo_id: str) -> list[str]:
    return [
        "```bash",
        "pip install lowbit",
        "```",
        "",
        "```python",
        "import quant  # registers the lowbit format with transformers",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        "```",
        "",
        "or, with the checkpoint's checksums verified: `from quant import load_quantized; "
        f'model, tokenizer = load_quantized(snapshot_download("{repo_id}"))`. Evaluate it with '
        f"`quantize eval {repo_id}`.",
    ]


def _load_gptq(repo_id: str) -> list[str]:
    return [
        "This folder is in the standard GPTQ format (`quant_method: gptq`): transformers (with `gptqmodel` "
        "installed) and vLLM load it without lowbit.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", device_map="auto")',
        "```",
        "",
        f"`vllm serve {repo_id}` (4- and 8-bit symmetric checkpoints run on its Marlin kernels).",
    ]


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def stage(
    ckpt: str | Path,
    out: str | Path,
    repo_id: str,
    files: str | Path | None = None,
    overwrite: bool = False,
    **card_kwargs,
) -> list[str]:
    """Write exactly what an upload sends into ``out``, atomically: the files of ``files`` (default: the
    checkpoint ``ckpt`` itself; or its GPTQ export) plus the model card of ``ckpt``. Returns the names."""
    ckpt = Path(ckpt)
    read_quantization_config(ckpt)  # refuse what is not one of our checkpoints before writing anything
    src = Path(files) if files is not None else ckpt
    out = check_output_dir(out, overwrite).absolute()
    with atomic_dir(out) as tmp:
        for f in sorted(src.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                _link_or_copy(f, tmp / f.name)
        (tmp / CARD).write_text(model_card(ckpt, repo_id, **card_kwargs))
    return sorted(f.name for f in out.iterdir())


def upload(
    ckpt: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    files: str | Path | None = None,
    **card_kwargs,
) -> str:
    """Create ``repo_id`` if needed and upload the checkpoint with its model card; returns the commit URL.

    ``token`` None uses huggingface_hub's usual sources (``HF_TOKEN``, ``hf auth login``).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise QuantError(f"--to-hub needs ORG/NAME, got {repo_id!r}")
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "upload"
        stage(ckpt, folder, repo_id, files=files, **card_kwargs)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                revision=revision,
                commit_message=f"Upload {read_quantization_config(ckpt).get('method')} checkpoint (lowbit)",
            )
        except (HfHubHTTPError, OfflineModeIsEnabled) as e:
            raise QuantError(f"upload to {repo_id} failed: {str(e).splitlines()[0]}") from None
    return str(getattr(info, "commit_url", info))
