"""``recon bench bands``: held-out denoising error per noise level, whole-image prior against
its native-resolution detail prior, at the data's own pixels (issue #10).

For each slice of each series (``per_series`` slices evenly spread, read at the native
matrix and normalised as the task does for a reconstruction), and each noise level sigma
(native units of the [0, 1] scale): x + sigma z is denoised by

* ``whole``: the whole-image prior through :func:`recon.multiscale.for_data` with the detail
  prior off (its two bands: the network at the prior's pixel scale plus the Gaussian detail
  band), as the samplers use it above the split;
* ``detail``: the detail prior alone on the data's grid, over tiles (:func:`denoise_tiled`),

and PSNR against x (both clipped to the window's [0, 1], as ``metrics.json`` is) is recorded.
The recommended split (``detail_below``) is the first level at which ``whole`` is at least
as good as ``detail`` on average: choose it on tuning series, report on others.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from recon.errors import ReconError

DEFAULT_SIGMAS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6)


def _psnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    mse = float(((a.clamp(0, 1) - ref.clamp(0, 1)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def recommended_split(table: list[dict]) -> float | None:
    """The first noise level (ascending) at which ``whole`` matches or beats ``detail`` on average;
    None when the detail prior is better at every level measured."""
    for row in sorted(table, key=lambda r: r["sigma"]):
        if row["whole_db"] >= row["detail_db"]:
            return row["sigma"]
    return None


@torch.no_grad()
def bench_bands(series, prior="ct", task_name: str = "ct", per_series: int = 4, sigmas=DEFAULT_SIGMAS,
                seed: int = 0, out=None, log=print) -> dict:
    from recon.case import load_source
    from recon.io import read_input
    from recon.multiscale import denoise_tiled, for_data
    from recon.prior import load_prior
    from recon.tasks import TASKS

    p = load_prior(prior) if isinstance(prior, (str, Path)) else prior
    detail = getattr(p, "detail_prior", None)
    if detail is None:
        raise ReconError(f"prior {prior!r} names no detail prior (meta 'detail_prior'): nothing to compare")
    if not series:
        raise ReconError("recon bench bands needs at least one --series")
    task = TASKS[task_name]
    rows = []
    for path in series:
        vol = read_input(path)
        n = vol.n_slices
        m = min(per_series, n)
        picks = [int((i + 0.5) * n / m) for i in range(m)]  # evenly spread, distinct (n / m >= 1)
        for k in picks:
            truth = task.prepare(load_source(path, slice_index=k, volume=vol), None)
            x = torch.from_numpy(truth.x)[None].float()
            whole = for_data(p, x.shape[-2:], truth.pixel_mm if truth.source.dx else None, detail_below=0)
            for j, s in enumerate(sigmas):
                g = torch.Generator().manual_seed(seed * 100003 + k * 101 + j)
                xn = x + float(s) * torch.randn(x.shape, generator=g)
                rows.append({"series": str(path), "slice": k, "sigma": float(s), "shape": list(x.shape[-2:]),
                             "whole_db": _psnr(whole.denoise(xn, float(s)), x),
                             "detail_db": _psnr(denoise_tiled(detail, xn, float(s)), x)})
            log(f"{Path(path).name} slice {k}: " + ", ".join(
                f"{r['sigma']:g}: {r['detail_db']:.1f}/{r['whole_db']:.1f}" for r in rows[-len(sigmas):]))
    table = []
    for s in sigmas:
        sel = [r for r in rows if r["sigma"] == float(s)]
        table.append({"sigma": float(s), "n": len(sel), "detail_db": float(np.mean([r["detail_db"] for r in sel])),
                      "whole_db": float(np.mean([r["whole_db"] for r in sel]))})
    result = {"prior": str(prior), "detail_prior": detail.meta.get("name"), "task": task_name,
              "series": [str(s) for s in series], "per_series": per_series, "table": table,
              "recommended_detail_below": recommended_split(table), "rows": rows}
    lines = ["| sigma | detail (dB) | whole (dB) | n |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['sigma']:g} | {r['detail_db']:.2f} | {r['whole_db']:.2f} | {r['n']} |" for r in table]
    lines.append(f"\nrecommended detail_below: {result['recommended_detail_below']}")
    log("\n".join(lines))
    if out:
        from recon.outputs import write_json

        write_json(Path(out), result)
    return result
