"""The data funnel as a picture (PNG): documents and bytes left after each step."""

from __future__ import annotations

from pathlib import Path


def plot_funnel(steps: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [s["step"] for s in steps]
    docs = [s["documents_left"] for s in steps]
    mbytes = [s["bytes_left"] / 1e6 for s in steps]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(steps) + 1.6), sharey=True)
    for ax, values, xlabel in ((axes[0], docs, "documents left"), (axes[1], mbytes, "MB left")):
        ax.barh(labels, values, color="#4C72B0")
        ax.set_xlabel(xlabel)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:,.0f}" if xlabel.startswith("doc") else f" {v:,.2f}", va="center", fontsize=8)
    axes[0].invert_yaxis()  # the axes share y: invert once, so the funnel reads top-down
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
