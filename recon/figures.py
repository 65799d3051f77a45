"""Figures: sample grids and side-by-side comparison panels (matplotlib, Agg)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np


def _savefig(fig, path: Path):
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_grid(images, path, titles=None, ncols=None, vmin=0.0, vmax=1.0, row_labels=None):
    """A grid of grey images in one shared window [vmin, vmax]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    ncols = ncols or min(n, 8)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(2 * ncols, 2 * nrows + 0.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, img in enumerate(images):
        ax = axes.flat[i]
        ax.imshow(np.asarray(img), cmap="gray", vmin=vmin, vmax=vmax)
        if titles:
            ax.set_title(titles[i], fontsize=8)
    if row_labels:
        for r, lab in enumerate(row_labels):
            axes[r, 0].text(-0.05, 0.5, lab, transform=axes[r, 0].transAxes, ha="right", va="center",
                            rotation=90, fontsize=9)
    _savefig(fig, path)


def save_comparison(truth, recons: dict, metrics: dict, path, title="", vmin=0.0, vmax=1.0, err_max=None):
    """Ground truth, each method, and absolute-error maps, one shared window.

    ``recons`` maps method -> 2-D image; ``metrics`` maps method -> dict with
    ``psnr`` and ``ssim`` shown in the titles.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(recons)
    n = len(names) + 1
    truth = np.asarray(truth)
    errs = {k: np.abs(np.asarray(v) - truth) for k, v in recons.items()}
    err_max = err_max or max(0.1 * (vmax - vmin), max((float(e.max()) for e in errs.values()), default=0.0) / 2)
    fig, axes = plt.subplots(2, n, figsize=(2.4 * n, 5.0), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(truth, cmap="gray", vmin=vmin, vmax=vmax)
    axes[0, 0].set_title("ground truth", fontsize=9)
    for j, k in enumerate(names, start=1):
        axes[0, j].imshow(np.asarray(recons[k]), cmap="gray", vmin=vmin, vmax=vmax)
        m = metrics.get(k, {})
        axes[0, j].set_title(f"{k}\n{m.get('psnr', float('nan')):.2f} dB, SSIM {m.get('ssim', float('nan')):.3f}",
                             fontsize=8)
        im = axes[1, j].imshow(errs[k], cmap="magma", vmin=0, vmax=err_max)
        axes[1, j].set_title(f"|error| {k}", fontsize=8)
    fig.colorbar(im, ax=axes[1, :].tolist(), shrink=0.8, label="absolute error")
    if title:
        fig.suptitle(title, fontsize=10)
    _savefig(fig, path)


def save_training_curve(history, path, val=None, title=""):
    """Training loss (EMA-free running mean per logged step) against steps; ``history`` rows are
    [step, loss, seconds]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = np.asarray(history, dtype=float)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(h[:, 0], h[:, 1], lw=1.2, label="training loss (mean of 50 steps)")
    if val is not None:
        ax.axhline(val, color="C1", ls="--", lw=1, label=f"final validation loss {val:.4f}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("EDM loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    _savefig(fig, path)
