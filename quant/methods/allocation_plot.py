"""The allocation map: layers × roles heatmap of NSDS scores next to the widths chosen."""

from __future__ import annotations

from pathlib import Path

from quant.methods.allocation import Allocation, mix_text
from quant.methods.nsds import ROLES


def _annotate(ax, values, fmt: str, dark_below: float, fontsize: int) -> None:
    """Write each cell's value on a heatmap, white on dark cells."""
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            color = "white" if values[i, j] < dark_below else "black"
            ax.text(j, i, fmt.format(values[i, j]), ha="center", va="center", fontsize=fontsize, color=color)


def plot_allocation(alloc: Allocation, path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    import numpy as np

    s = alloc.summary()
    cols = list(dict.fromkeys(u.label.partition(".")[2] for u in alloc.units)) if alloc.units[0].label != "0" else []
    n_layers = len(alloc.units) if not cols else len(alloc.units) // len(cols)
    bits = np.array(alloc.bits, dtype=float).reshape(n_layers, -1)
    fig, axes = plt.subplots(
        1,
        2,
        figsize=(9.5, 0.26 * n_layers + 2.2),
        gridspec_kw={"width_ratios": [len(ROLES) + 1.5, bits.shape[1] + 0.6]},
    )
    ax = axes[0]
    if alloc.scores is not None:
        sc = alloc.scores
        heat = np.concatenate([sc.role_score.numpy(), sc.layer_score.numpy()[:, None]], 1)
        im = ax.imshow(heat, cmap="magma", vmin=0, vmax=1, aspect="auto")
        _annotate(ax, heat, "{:.2f}", dark_below=0.6, fontsize=6)
        ax.set_xticks(range(heat.shape[1]), [*ROLES, "layer S"])
        fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02, label="sensitivity (MAD-Sigmoid, Soft-OR)")
        ax.set_title("NSDS scores (no data)", fontsize=9)
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, f"{alloc.config.allocator}: no scores", ha="center", va="center")
    ax.set_ylabel("layer")
    ax.set_yticks(range(n_layers))
    ax.tick_params(labelsize=7)

    ax = axes[1]
    cands = sorted(alloc.config.candidates)
    cmap = plt.get_cmap("viridis", len(cands))
    im = ax.imshow(bits, cmap=cmap, vmin=cands[0] - 0.5, vmax=cands[-1] + 0.5, aspect="auto")
    _annotate(ax, bits, "{:.0f}", dark_below=float(np.mean(cands)), fontsize=7)
    cols = cols or ["block"]
    ax.set_xticks(range(bits.shape[1]), cols)
    ax.set_yticks(range(n_layers))
    ax.tick_params(labelsize=7)
    ax.set_title("bits chosen", fontsize=9)
    fig.suptitle(
        title
        or f"{alloc.config.allocator} allocation, budget {s['budget_bits']} bits: {mix_text(s['units_per_width'])} "
        f"({alloc.config.granularity}s); {s['bits_per_weight']} bits/weight with scales and zeros",
        fontsize=9,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    tmp.replace(path)
    return path
