"""The finetune pass's loss curves: each block's held-out block-output error against its steps, relative to the
error the solver left, and the error before and after per block (block mode); the held-out KL to the float model
against the end-to-end steps (e2e mode)."""

from __future__ import annotations

from pathlib import Path


def _held_steps(curve: dict) -> list[int]:
    """The step of each held-out measurement (measured every few steps, and after the last)."""
    every = max(1, len(curve["train"]) // max(len(curve["held"]) - 1, 1))
    return [min(k * every, len(curve["train"])) for k in range(len(curve["held"]))]


def plot_finetune(summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    curves, e2e = summary["curves"], summary.get("e2e")
    fig, axes = plt.subplots(1, 2 * bool(curves) + bool(e2e), figsize=(5.5 * (2 * bool(curves) + bool(e2e)), 4),
                             squeeze=False)
    axes, titles = list(axes[0]), []
    if curves:
        ax1, ax2 = axes[0], axes[1]
        cmap = plt.get_cmap("viridis")
        for i, c in enumerate(curves):
            ax1.plot(_held_steps(c), [h / c["held"][0] for h in c["held"]], color=cmap(i / max(len(curves) - 1, 1)),
                     lw=1)
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
        titles.append(f"block error -{100 * summary['mean_reduction']:.1f}%")
    if e2e:
        ax = axes[-1]
        ax.plot(range(1, len(e2e["train"]) + 1), e2e["train"], lw=0.7, alpha=0.6, label="train batch")
        ax.plot(_held_steps(e2e), e2e["held"], "o-", ms=3, label="held out")
        ax.set_xlabel("end-to-end step")
        ax.set_ylabel("KL(float || quantized) per token")
        ax.legend()
        titles.append(f"end-to-end KL -{100 * e2e['kl_reduction']:.1f}%")
    fig.suptitle(f"finetune {summary['mode']}: " + ", ".join(titles))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
