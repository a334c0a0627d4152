"""The patch-loss figure: per-patch reconstruction error of a few images on their patch grid."""

from __future__ import annotations

from pathlib import Path

import torch


def patch_loss_figure(maps: torch.Tensor, titles: list[str], path: Path, suptitle: str) -> None:
    """One panel per map [k, rows, cols] (raster order), one shared colour scale (viridis, which
    reads in grey and for colour-blind readers), one labelled colour bar; saved as PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    k = maps.shape[0]
    fig, axes = plt.subplots(1, k, figsize=(2.4 * k + 1.0, 2.9), squeeze=False, constrained_layout=True)
    vmax = float(maps.max()) if maps.numel() else 1.0
    for ax, m, title in zip(axes[0], maps, titles):
        image = ax.imshow(m.numpy(), cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("patch column", fontsize=7)
        ax.set_ylabel("patch row", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.85, label="MSE per patch (z-units)")
    fig.suptitle(suptitle, fontsize=9)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def note_figure(path: Path, text: str) -> None:
    """A PNG holding only `text`, where a declared figure has nothing to show (e.g. no square grid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(5, 1.2))
    fig.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, wrap=True)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
