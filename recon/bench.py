"""Operator benchmarks: our CT projector against scikit-image (and ASTRA).

``bench_operators()`` times ``ParallelBeamCT`` forward (``A``) and adjoint
(``AH``) after its system matrix is ready (build/load time reported
separately) against ``skimage.transform.radon`` and unfiltered ``iradon``
(``filter_name=None``, the backprojection) and, when ``astra`` imports, ASTRA's
CPU 'linear' (Joseph) projector.  Times are the best of ``repeats`` calls
(after a warm-up; the minimum is the least disturbed by other processes) in
ms per image; skimage
and ASTRA process one image at a time, so their per-image cost is measured at
batch 1 and reused for every batch.  The ratio columns are skimage time /
our time at that batch.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from forward_models.ct import ParallelBeamCT, view_angles

__all__ = ["bench_operators"]


def _best_ms(fn, repeats: int) -> float:
    """Best of ``repeats`` timed calls after one warm-up (robust to background load)."""
    fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * min(times)


def _astra_ms(size, angles, image, sino, repeats):
    try:
        import astra  # noqa: F401
    except ImportError:
        return None, None
    op = ParallelBeamCT(size, angles, backend="astra")
    x, y = torch.from_numpy(image)[None], torch.from_numpy(sino)[None]
    return _best_ms(lambda: op.A(x), repeats), _best_ms(lambda: op.AH(y), repeats)


def bench_operators(sizes=(256, 512), views=(23, 90, 180), batch=(1, 8), repeats: int = 5,
                    skimage_repeats: int = 1, threads: int | None = None,
                    out: Callable[[str], None] = print) -> list[dict]:
    """Time CT forward/adjoint for every size × views × batch; print a markdown table.

    ``threads``: torch CPU threads for the run (restored afterwards); ``None``
    keeps the current setting.  Returns one dict per table row.
    """
    from skimage.transform import iradon, radon

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    rows = []
    try:
        out(f"CT operator benchmark (torch threads: {torch.get_num_threads()}; ms per image, "
            f"best of {repeats} (skimage/ASTRA: {skimage_repeats}); ratio = skimage / ours)\n")
        out("| size | views | batch | matrix ready (s) | ours A | ours AH | skimage radon | "
            "skimage iradon (no filter) | A speed-up | AH speed-up | astra A | astra AH |")
        out("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        rng = np.random.default_rng(0)
        for size in sizes:
            for n_views in views:
                angles = view_angles(n_views)
                op = ParallelBeamCT(size, angles)
                ready = f"{op.build_seconds:.2f} ({op.projector.source}, {op.backend})"
                theta = np.rad2deg(angles.numpy())
                image = rng.random((size, size))
                sino = radon(image, theta, circle=False)
                sk_a = _best_ms(lambda: radon(image, theta, circle=False), skimage_repeats)
                sk_ah = _best_ms(lambda: iradon(sino, theta, output_size=size, filter_name=None,
                                                  circle=False), skimage_repeats)
                astra_a, astra_ah = _astra_ms(size, angles, image, sino.T, skimage_repeats)
                for b in batch:
                    x = torch.from_numpy(rng.random((b, size, size), dtype=np.float32))
                    y = op.A(x)
                    a_ms = _best_ms(lambda: op.A(x), repeats) / b
                    ah_ms = _best_ms(lambda: op.AH(y), repeats) / b
                    row = {"size": size, "views": n_views, "batch": b, "ready_s": op.build_seconds,
                           "source": op.projector.source, "A_ms": a_ms, "AH_ms": ah_ms,
                           "skimage_radon_ms": sk_a, "skimage_iradon_ms": sk_ah,
                           "astra_A_ms": astra_a, "astra_AH_ms": astra_ah}
                    rows.append(row)
                    fmt = (lambda v: "–" if v is None else f"{v:.1f}")
                    out(f"| {size} | {n_views} | {b} | {ready} | {a_ms:.2f} | {ah_ms:.2f} | "
                        f"{sk_a:.1f} | {sk_ah:.1f} | {sk_a / a_ms:.0f}x | {sk_ah / ah_ms:.0f}x | "
                        f"{fmt(astra_a)} | {fmt(astra_ah)} |")
                del op
    finally:
        torch.set_num_threads(old_threads)
    return rows
