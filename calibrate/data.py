"""Text sources. Evaluation reads only the WikiText-2 raw *test* split; calibration never does.

Calibration sources (``--calib``):

* ``c4`` (default): records 1,000-1,999 of the bundled 2,000-record C4 validation sample; the first
  1,000 are the C4 evaluation slice (``c4_eval_text``), so calibration never sees them
* ``c4-all``: all 2,000 records (what ``c4`` meant before the evaluation slice existed; overlaps it)
* ``wikitext2-valid``: the bundled (tokenized, ``<unk>``-bearing) WikiText-2 validation split
* a path to a UTF-8 text file (or ``.jsonl`` with a ``"text"`` field per line)
* ``hf:NAME[:CONFIG[:SPLIT]]``: a Hugging Face ``datasets`` dataset (needs ``datasets`` and a network)
* ``self``: text the float model samples itself (:mod:`calibrate.generate`; data-free, needs the model)
* ``A+B``: any of these mixed, the windows split evenly between them (:func:`calibration_windows`)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from calibrate.generate import sample_windows
from quant.errors import QuantError

DATA_DIR = Path(__file__).parent / "data"
WIKITEXT2_TEST = DATA_DIR / "wikitext-2-raw" / "wiki.test.raw"
WIKITEXT2_VALID = DATA_DIR / "wikitext-2" / "valid.txt"
C4_SAMPLE = DATA_DIR / "c4" / "c4_validation_2k.jsonl"
C4_EVAL_DOCS = 1000  # records [0, 1000) evaluate; [1000, 2000) calibrate
CALIB_SOURCES = ("c4", "c4-all", "wikitext2-valid", "self")


def eval_text() -> str:
    """WikiText-2 raw test as the standard protocol joins it: HF rows joined with ``"\\n\\n"``.

    HF ``wikitext-2-raw-v1`` rows are the file's lines with their newline, blank lines (``" "``)
    becoming ``""``; the joined text has 1,294,336 characters.
    """
    lines = WIKITEXT2_TEST.read_text(encoding="utf-8").split("\n")[:-1]
    rows = ["" if line.strip() == "" else line + "\n" for line in lines]
    return "\n\n".join(rows)


def _jsonl_docs(path: Path) -> list[str]:
    docs = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if line.strip():
            try:
                docs.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise QuantError(f"{path}:{i + 1}: expected a JSON object with a 'text' field") from None
    return docs


def _jsonl_text(path: Path) -> str:
    return "\n\n".join(_jsonl_docs(path))


def c4_eval_text() -> str:
    """The C4 evaluation slice: the first 1,000 records of the bundled sample joined with a single space
    (QuaRot's ``c4_new`` joining; its 1,100 documents of shard 0 are not available offline)."""
    return " ".join(_jsonl_docs(C4_SAMPLE)[:C4_EVAL_DOCS])


def load_calibration_text(source: str) -> str:
    if source == "c4":
        return "\n\n".join(_jsonl_docs(C4_SAMPLE)[C4_EVAL_DOCS:])
    if source == "c4-all":
        return _jsonl_text(C4_SAMPLE)
    if source == "wikitext2-valid":
        return WIKITEXT2_VALID.read_text(encoding="utf-8")
    if source.startswith("hf:"):
        name, cfg, split = (source[3:].split(":") + [None, None])[:3]
        try:
            import datasets
        except ImportError:
            raise QuantError("--calib hf:... needs the 'datasets' package: pip install datasets") from None
        try:
            ds = datasets.load_dataset(name, cfg, split=split or "train")
        except Exception as e:
            raise QuantError(f"cannot load dataset {source!r}: {str(e).splitlines()[0]}") from None
        return "\n\n".join(t for t in ds["text"] if t)
    path = Path(source)
    if path.resolve() == WIKITEXT2_TEST.resolve():
        raise QuantError("refusing to calibrate on the WikiText-2 test split, which is the evaluation text")
    if not path.is_file():
        raise QuantError(
            f"calibration source {source!r} is not one of {CALIB_SOURCES}, a text file, or hf:NAME[:CONFIG[:SPLIT]]"
        )
    try:
        return _jsonl_text(path) if path.suffix == ".jsonl" else path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise QuantError(f"{path} is not UTF-8 text") from None


def calibration_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0,
                        model: nn.Module | None = None) -> torch.Tensor:
    """``[nsamples, seqlen]`` token windows drawn at random offsets (seeded) from the tokenized source, or with
    ``self`` sampled (seeded) from ``model``, the float model.

    ``A+B`` (e.g. ``c4+wikitext2-valid``) mixes sources: the windows are split evenly between them (the first
    ones take the remainder), each part drawn from its own text, then shuffled (seeded) so that any held-out
    slice of them holds every source."""
    if nsamples < 1 or seqlen < 2:
        raise QuantError(f"need at least 1 calibration sample of 2+ tokens, got {nsamples} x {seqlen}")
    sources = [source] if Path(source).is_file() else source.split("+")
    if len(sources) > nsamples or not all(sources):
        raise QuantError(f"calibration source {source!r}: need one or more sources and a window for each")
    g = torch.Generator().manual_seed(seed)
    share, extra = divmod(nsamples, len(sources))
    parts = [_windows(tokenizer, src, share + (i < extra), seqlen, g, model) for i, src in enumerate(sources)]
    windows = torch.cat(parts)
    return windows if len(parts) == 1 else windows[torch.randperm(nsamples, generator=g)]


def _windows(tokenizer, source: str, n: int, seqlen: int, g: torch.Generator, model: nn.Module | None) -> torch.Tensor:
    if source == "self":
        if model is None:
            raise QuantError("--calib self samples the model's own text; this command has no float model to sample")
        special = set(tokenizer.all_special_ids)
        vocab = min(len(tokenizer), model.get_input_embeddings().num_embeddings)
        first = torch.tensor([i for i in range(vocab) if i not in special])
        return sample_windows(model, first, n, seqlen, g)
    ids = tokenizer(load_calibration_text(source), return_tensors="pt").input_ids[0]
    if ids.numel() <= seqlen:
        raise QuantError(f"calibration text {source!r} has {ids.numel()} tokens; need more than --seqlen {seqlen}")
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
