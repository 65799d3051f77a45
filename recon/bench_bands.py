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

``against='global'`` compares the whole-image prior with its coarser **global prior**
(``meta['global_prior']``) instead, both in their two bands: the noise levels are then in the
whole-image prior's own units (native sigma / scale factor, the units of ``global_above``), and
the recommended ``global_above`` is the lowest level from which the global prior is at least as
good at every higher level measured.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from recon.errors import ReconError

DEFAULT_SIGMAS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
#: ``against='global'``: levels in the whole-image prior's units
DEFAULT_GLOBAL_SIGMAS = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2)
AGAINST = ("detail", "global")


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


def recommended_global_above(table: list[dict]) -> float | None:
    """The lowest noise level from which ``global`` matches or beats ``whole`` on average at every
    higher level measured; None when it loses at the highest."""
    best = None
    for row in sorted(table, key=lambda r: r["sigma"], reverse=True):
        if row["global_db"] < row["whole_db"]:
            break
        best = row["sigma"]
    return best


@torch.no_grad()
def bench_bands(series, prior="ct", task_name: str = "ct", per_series: int = 4, sigmas=None,
                seed: int = 0, out=None, log=print, against: str = "detail") -> dict:
    from recon.case import load_source
    from recon.multiscale import denoise_tiled, for_data
    from recon.prior import load_prior
    from recon.tasks import TASKS

    if against not in AGAINST:
        raise ReconError(f"against must be one of {', '.join(AGAINST)}, got {against!r}")
    p = load_prior(prior) if isinstance(prior, (str, Path)) else prior
    other = getattr(p, f"{against}_prior", None)
    if other is None:
        raise ReconError(f"prior {prior!r} names no {against} prior (meta '{against}_prior'): nothing to compare")
    if not series:
        raise ReconError("recon bench bands needs at least one --series")
    sigmas = sigmas or (DEFAULT_GLOBAL_SIGMAS if against == "global" else DEFAULT_SIGMAS)
    cols = ("whole", "global") if against == "global" else ("detail", "whole")
    task = TASKS[task_name]
    rows = []
    for path in series:
        vol, picks = _slices(path, per_series)
        for k in picks:
            truth = task.prepare(load_source(path, slice_index=k, volume=vol), None)
            x = torch.from_numpy(truth.x)[None].float()
            pix = truth.pixel_mm if truth.source.dx else None
            whole = for_data(p, x.shape[-2:], pix, detail_below=0, global_above=0)
            if against == "global":  # levels in the whole-image prior's units
                glob = for_data(p, x.shape[-2:], pix, detail_below=0, global_above=min(sigmas)).glob
                if glob is None:
                    raise ReconError(f"{path} slice {k}: the global prior does not apply at {tuple(x.shape[-2:])} "
                                     "(its grid is not 1.5x coarser than the data's)")
                unit, fns = whole.sigma_scale, {"whole": whole.denoise, "global": glob.denoise}
            else:
                unit, fns = 1.0, {"detail": lambda v, sn: denoise_tiled(other, v, sn), "whole": whole.denoise}
            for j, s in enumerate(sigmas):
                g = torch.Generator().manual_seed(seed * 100003 + k * 101 + j)
                sn = float(s) * unit
                xn = x + sn * torch.randn(x.shape, generator=g)
                row = {"series": str(path), "slice": k, "sigma": float(s), "shape": list(x.shape[-2:])}
                if against == "global":
                    row["native_sigma"] = sn
                rows.append({**row, **{f"{c}_db": _psnr(fns[c](xn, sn), x) for c in cols}})
            log(f"{Path(path).name} slice {k}: " + ", ".join(
                f"{r['sigma']:g}: " + "/".join(f"{r[c + '_db']:.1f}" for c in cols) for r in rows[-len(sigmas):]))
    table = []
    for s in sigmas:
        sel = [r for r in rows if r["sigma"] == float(s)]
        table.append({"sigma": float(s), "n": len(sel), **{f"{c}_db": float(np.mean([r[c + "_db"] for r in sel]))
                                                           for c in cols}})
    result = {"prior": str(prior), f"{against}_prior": other.meta.get("name"), "task": task_name,
              "against": against, "series": [str(s) for s in series], "per_series": per_series, "table": table}
    if against == "global":
        key, units = "recommended_global_above", " (prior units)"
        result["sigma_units"] = "the whole-image prior's (native sigma / scale factor)"
        result[key] = recommended_global_above(table)
    else:
        key, units = "recommended_detail_below", ""
        result[key] = recommended_split(table)
    result["rows"] = rows
    lines = [f"| sigma{units} | " + " | ".join(f"{c} (dB)" for c in cols) + " | n |",
             "|---:|" + "---:|" * len(cols) + "---:|"]
    lines += [f"| {r['sigma']:g} | " + " | ".join(f"{r[c + '_db']:.2f}" for c in cols) + f" | {r['n']} |"
              for r in table]
    lines.append(f"\n{key.replace('recommended_', 'recommended ')}: {result[key]}")
    log("\n".join(lines))
    if out:
        from recon.outputs import write_json

        write_json(Path(out), result)
    return result


def _slices(path, per_series):
    from recon.io import read_input

    vol = read_input(path)
    n = vol.n_slices
    m = min(per_series, n)
    return vol, [int((i + 0.5) * n / m) for i in range(m)]  # evenly spread, distinct (n / m >= 1)
