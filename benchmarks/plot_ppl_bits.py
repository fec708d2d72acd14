"""Perplexity against bits per weight: every full-split WikiText-2 result in benchmarks/results/*.json.

    python benchmarks/plot_ppl_bits.py      # writes benchmarks/results/ppl_vs_bits.png

Bits per weight count every packed code, scale and zero-point of the quantized linears (16 for
float). Only settings measured on the whole test split are drawn; weight-only and W4A4/W4A8 runs
get different markers. Settings are grouped by the benchmark and the first word of their name; settings
calibrated on text other than C4 (WikiText-2 validation, the literature's domain-matched protocol) form their own
group, drawn as triangles.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def points() -> list[tuple[str, str, float, float]]:
    """(benchmark, setting, bits per weight, perplexity) of every full-split weight-quantized setting; the setting
    of a non-C4 calibration is named with its source in brackets."""
    out = []
    for path in sorted(RESULTS.glob("*.json")):
        results = json.loads(path.read_text()).get("results", {})
        for name, r in results.items() if isinstance(results, dict) else []:
            ppl, sizes = r.get("ppl"), r.get("sizes")
            if not isinstance(ppl, dict) or ppl.get("windows") != ppl.get("total_windows") or not sizes:
                continue
            bpw = sizes.get("bits_per_weight") or 16 * sizes["ratio_to_fp16"]
            source = r.get("calibration_source", "c4")
            out.append((path.stem, name if source == "c4" else f"{name} [{source}]", float(bpw), float(ppl["ppl"])))
    return out


def float_ppl() -> float | None:
    for path in sorted(RESULTS.glob("*.json")):
        r = json.loads(path.read_text()).get("results", {}).get("float")
        if isinstance(r, dict) and r["ppl"]["windows"] == r["ppl"]["total_windows"]:
            return float(r["ppl"]["ppl"])
    return None


def family(name: str) -> str:
    """The first word of a setting's name, with its calibration source if not C4."""
    return name.split("-")[0] + (" " + name[name.index("["):] if "[" in name else "")


YMAX = 1500.0  # collapsed runs (2-bit RTN) would squash everything else; they sit on the top edge


def main() -> None:
    pts = points()
    fig, ax = plt.subplots(figsize=(10.5, 6))
    families = sorted({(b, family(n)) for b, n, _, _ in pts})
    # only the lowest point of each family at each width is labelled: the rest overlap unreadably
    best: dict[tuple[str, str, float], tuple[float, str]] = {}
    for b, n, x, y in pts:
        key = (b, family(n), round(x, 1))
        best[key] = min(best.get(key, (y, n)), (y, n))
    for i, (bench, fam) in enumerate(families):
        sel = [(x, y, n) for b, n, x, y in pts if b == bench and family(n) == fam]
        marker = "s" if any(f"-a{k}" in n or n.startswith(f"w4a{k}") for _, _, n in sel for k in (4, 8)) else "o"
        marker = "^" if "[" in fam else marker
        ax.scatter([x for x, _, _ in sel], [min(y, YMAX) for _, y, _ in sel], label=f"{bench}: {fam}", marker=marker,
                   s=36, color=plt.cm.tab20(i % 20))  # fmt: skip
        for x, y, n in sel:
            if y > YMAX:
                ax.annotate(f"{n}: {y:,.0f} (off the scale)", (x, YMAX), fontsize=7, xytext=(-4, -10),
                            textcoords="offset points", ha="right" if x > 3.5 else "left")  # fmt: skip
            elif best[(bench, fam, round(x, 1))][1] == n:
                ax.annotate(f"{n} {y:.1f}", (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ref = float_ppl()
    if ref:
        ax.axhline(ref, color="gray", ls="--", lw=1)
        ax.annotate(f"float {ref:.2f}", (ax.get_xlim()[0], ref), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_ylim(top=YMAX * 1.05)
    ax.set_xlabel("bits per weight (codes + every scale and zero)")
    ax.set_ylabel("WikiText-2 perplexity (full test split, 2048-token windows)")
    ax.set_title("SmolLM2-135M: perplexity against bits per weight (best of each method labelled)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    out = RESULTS / "ppl_vs_bits.png"
    fig.savefig(out, dpi=130)
    print(f"{len(pts)} settings -> {out}")


if __name__ == "__main__":
    main()
