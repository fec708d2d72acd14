"""Perplexity against bits per weight: every full-split WikiText-2 result in benchmarks/results/*.json.

    python benchmarks/plot_ppl_bits.py      # writes benchmarks/results/ppl_vs_bits.png

Bits per weight count every packed code, scale and zero-point of the quantized linears (16 for
float). Only settings measured on the whole test split are drawn; weight-only and W4A4/W4A8 runs
get different markers. Settings are grouped by the benchmark and the first word of their name; settings
calibrated on text other than C4 (WikiText-2 validation, the literature's domain-matched protocol) form their own
group, drawn as triangles. A second panel zooms on 3-4 bits, where the best rows crowd each other.
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


ZOOM = (3.1, 4.4, 34.0)  # bits from, bits to, perplexity up to: where the best rows crowd each other


def zoom(ax, pts: list[tuple[str, str, float, float]], ref: float | None) -> None:
    """The frontier at 3-4 bits on a linear scale: every point, the best of each calibration text at each width
    labelled, and the float + 5% / + 20% lines."""
    lo, hi, top = ZOOM
    sel = [(n, x, y) for _, n, x, y in pts if lo <= x <= hi and y <= top]
    best: dict[tuple[str, float], tuple[float, str]] = {}
    for n, x, y in sel:
        source = n[n.index("[") + 1 : -1] if "[" in n else "c4"
        best[(source, round(x, 1))] = min(best.get((source, round(x, 1)), (y, n)), (y, n))
    ax.scatter([x for _, x, _ in sel], [y for *_, y in sel], s=18, color="0.7")
    last: dict[float, float] = {}  # the last label's height at each width: labels closer than 0.4 are pushed up
    for (y, n), (source, width) in sorted((v, k) for k, v in best.items()):
        x = next(x for m, x, _ in sel if m == n)
        ax.scatter([x], [y], s=36, marker="o" if source == "c4" else "^", color="C0" if source == "c4" else "C3")
        at = last[width] = max(y, last.get(width, -1.0) + 0.4)
        ax.annotate(f"{y:.2f} ({source})", (x, y), (x + 0.03, at - 0.1), fontsize=7)
    if ref:
        for k, style in ((1.05, ":"), (1.2, "--")):
            ax.axhline(ref * k, color="gray", ls=style, lw=1)
            ax.annotate(f"float +{100 * (k - 1):.0f}%: {ref * k:.1f}", (3.9, ref * k), fontsize=7, xytext=(0, 3),
                        textcoords="offset points", ha="center")  # fmt: skip (between the 3- and 4-bit rows)
        ax.axhline(ref, color="gray", lw=1)
    ax.set_xlim(lo, hi)
    ax.set_xlabel("bits per weight")
    ax.set_title(f"{lo}-{hi} bits, perplexity up to {top:g}: best per calibration text and width", fontsize=9)
    ax.grid(True, alpha=0.3)


def main() -> None:
    pts = points()
    fig, (ax, az) = plt.subplots(1, 2, figsize=(15, 6.5), gridspec_kw={"width_ratios": [1.6, 1]})
    families = sorted({(b, family(n)) for b, n, _, _ in pts})
    # only the lowest point of each family at each width is labelled (in the zoom's range, only there): the rest
    # overlap unreadably
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
            elif best[(bench, fam, round(x, 1))][1] == n and not (ZOOM[0] <= x <= ZOOM[1] and y <= ZOOM[2]):
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
    zoom(az, pts, ref)
    fig.legend(*ax.get_legend_handles_labels(), fontsize=7, loc="lower center", ncol=6)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    out = RESULTS / "ppl_vs_bits.png"
    fig.savefig(out, dpi=130)
    print(f"{len(pts)} settings -> {out}")


if __name__ == "__main__":
    main()
