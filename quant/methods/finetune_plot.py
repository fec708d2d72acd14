"""The finetune pass's loss curves: each block's held-out block-output error against its steps, relative to the
error the solver left, and the error before and after per block."""

from __future__ import annotations

from pathlib import Path


def plot_finetune(summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    curves = summary["curves"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    cmap = plt.get_cmap("viridis")
    for i, c in enumerate(curves):
        every = max(1, len(c["train"]) // max(len(c["held"]) - 1, 1))
        steps = [min(k * every, len(c["train"])) for k in range(len(c["held"]))]
        ax1.plot(steps, [h / c["held"][0] for h in c["held"]], color=cmap(i / max(len(curves) - 1, 1)), lw=1)
    ax1.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax1.set_xlabel("step")
    ax1.set_ylabel("held-out block error / the solver's")
    ax1.set_title("per block (dark: first, light: last)")
    blocks = range(len(curves))
    ax2.semilogy(blocks, summary["held_loss_before"], "o-", ms=3, label="solver")
    ax2.semilogy(blocks, summary["held_loss_after"], "o-", ms=3, label="+ finetune")
    ax2.set_xlabel("block")
    ax2.set_ylabel("held-out block-output MSE")
    ax2.legend()
    fig.suptitle(f"finetune {summary['mode']}: mean reduction {100 * summary['mean_reduction']:.1f}%")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
