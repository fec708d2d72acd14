"""The README's architecture × pass table, from the test matrix (tests/arch_matrix.py).

Runs every cell as ``tests/test_architectures.py`` does (tiny random-init models: mechanics, not
quality) and writes the table to benchmarks/results/arch_table.md and into the README between the
``<!-- arch-table -->`` markers. A cell is ✔ (quantized, saved, reloaded to identical logits through
load_quantized and from_pretrained, and for RTN/GPTQ through a GPTQ export) or the pass's refusal.

    python benchmarks/arch_table.py          # about 4 minutes on 2 cores
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

MARK = "<!-- arch-table -->"
PASS_TITLES = {
    "rtn": "RTN",
    "gptq": "GPTQ",
    "gptaq": "GPTAQ",
    "d2quant": "D²Quant (DSQ)",
    "dac": "DAC",
    "nsds": "NSDS alloc.",
    "rotate": "rotation",
    "fptquant": "FPTQuant",
    "w4a8": "W4A8 + KV8",
}


def short(refusal: str) -> str:
    """The reason part of a refusal: what the model lacks, without the pass name or the alternative."""
    reason = refusal.split(" model: ", 1)[-1].rsplit("; ", 1)[0]
    return reason.replace("|", "/")


def main() -> None:
    from arch_matrix import FAMILIES, PASSES, run_cell
    from tqdm.auto import tqdm

    from calibrate import calibration_windows
    from quant.formats.atomic import atomic_file
    from quant.formats.models import load_model

    tok = load_model().tokenizer
    calib = calibration_windows(tok, "c4", 8, 128, seed=0)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for family in tqdm(FAMILIES, desc="families"):
            cells = [run_cell(family, p, tok, calib, Path(d) / f"{family}-{p}") for p in PASSES]
            rows.append((family, cells))
    notes: dict[str, int] = {}
    lines = ["| architecture | " + " | ".join(PASS_TITLES[p] for p in PASSES) + " |", "|---" * (len(PASSES) + 1) + "|"]
    for family, cells in rows:
        out = []
        for c in cells:
            if c == "✔":
                out.append("✔")
            else:
                n = notes.setdefault(short(c), len(notes) + 1)
                out.append(f"✘ {n}")
        lines.append(f"| {family} | " + " | ".join(out) + " |")
    lines += ["", "Refusals (each a one-line error naming the pass, what the model lacks and an alternative):", ""]
    lines += [f"{n}. {reason}" for reason, n in notes.items()]
    table = "\n".join(lines) + "\n"
    res = ROOT / "benchmarks" / "results" / "arch_table.md"
    with atomic_file(res) as f:
        f.write("# Architecture × pass (tiny random-init models; `python benchmarks/arch_table.py`)\n\n" + table)
    readme = (ROOT / "README.md").read_text()
    if readme.count(MARK) == 2:
        head, _, rest = readme.partition(MARK)
        _, _, tail = rest.partition(MARK)
        with atomic_file(ROOT / "README.md") as f:
            f.write(f"{head}{MARK}\n{table}{MARK}{tail}")
    print(table)


if __name__ == "__main__":
    main()
