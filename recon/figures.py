"""Figures: sample grids and side-by-side comparison panels (matplotlib, Agg)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _savefig(fig, path: Path):
    """Write atomically with the same permissions as every other output (0o666 & ~umask)."""
    import matplotlib.pyplot as plt

    from recon.io._util import atomic_output

    path = Path(path)
    try:
        with atomic_output(path, path.suffix) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)


def error_scale(truth, recons: dict, vmin=0.0, vmax=1.0):
    """Shared upper limit of the |error| maps and the method that sets it: ``(err_max, method)``.

    The scale follows the best method (lowest RMSE): twice the 99th percentile of its
    |error|, at least 1% of the display range.  Worse methods saturate rather than
    darkening every other map.  ``method`` is None when no reconstruction is finite.
    """
    truth = np.asarray(truth, dtype=np.float64)
    floor = 0.01 * (vmax - vmin)
    best, best_rmse = None, np.inf
    for k, v in recons.items():
        err = np.abs(np.asarray(v, dtype=np.float64) - truth)
        rmse = float(np.sqrt(np.mean(err**2))) if err.size else np.inf
        if np.isfinite(rmse) and rmse < best_rmse:
            best, best_rmse, best_err = k, rmse, err
    if best is None:
        return 0.1 * (vmax - vmin), None
    return max(floor, 2.0 * float(np.percentile(best_err, 99))), best


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
    ``psnr`` and ``ssim`` shown in the titles.  The error maps share the scale
    0..``err_max``; by default it is set by the best method (:func:`error_scale`)
    and printed on the colour bar, and larger errors saturate.  Returns ``err_max``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(recons)
    n = len(names) + 1
    truth = np.asarray(truth)
    errs = {k: np.abs(np.asarray(v) - truth) for k, v in recons.items()}
    ref = None
    if not err_max:
        err_max, ref = error_scale(truth, recons, vmin, vmax)
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
        sat = float(np.mean(errs[k] > err_max))
        axes[1, j].set_title(f"|error| {k}" + (f"\n{sat:.0%} saturated" if sat >= 0.005 else ""), fontsize=8)
    axes[1, 0].text(0.5, 0.5, f"error scale\n0 .. {err_max:.3g}" + (f"\n(2 x p99 of {ref})" if ref else ""),
                    transform=axes[1, 0].transAxes, ha="center", va="center", fontsize=8)
    if names:
        fig.colorbar(im, ax=axes[1, :].tolist(), shrink=0.8, extend="max",
                     label=f"absolute error, 0 .. {err_max:.3g}")
    if title:
        fig.suptitle(title, fontsize=10)
    _savefig(fig, path)
    return err_max


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
