"""Classical baselines beside reference implementations (``recon bench references``).

On the same simulated measurements, each of the toolkit's baselines runs
beside an independent implementation, with the regularisation weight of both
tuned on tuning cases (a grid; the best mean PSNR) and the figures reported
on other cases:

* MRI (single-coil Cartesian, brain-tumour-progression T1c, 128 x 128): ``tv`` against
  SigPy's ``TotalVariationRecon`` and ``cs-wavelet`` against SigPy's
  ``L1WaveletRecon`` (db4), for equispaced line masks (Song et al.) and the
  variable-density random masks compressed sensing is built for (2-D Poisson
  disc, 2-D Gaussian);
* CT (parallel beam): ``fbp`` against scikit-image's ``iradon`` and ``sirt``
  against scikit-image's ``iradon_sart``.

BART's ``pics`` is used when the ``bart`` command is installed (it is not on
the machines this was measured on).  SigPy is an optional extra
(``pip install sigpy``); without it the SigPy rows are skipped.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["mri_references", "ct_references"]

MRI_GRIDS = {
    "tv": [1e-3, 3e-3, 1e-2, 3e-2],
    "cs-wavelet": [1e-5, 3e-5, 1e-4, 3e-4, 1e-3],
    "sigpy-tv": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1],
    "sigpy-l1wavelet": [3e-5, 1e-4, 3e-4, 1e-3, 3e-3],
}


def _cases(folder, indices):
    from recon.case import source_from_case
    from recon.io import discover_cases

    found = discover_cases(str(folder), slices="all")
    return [(c.name, source_from_case(c)) for i, c in enumerate(found) if i in set(indices)]


def _sigpy_recon(kind: str, y: np.ndarray, mask: np.ndarray, lam: float, max_iter: int) -> np.ndarray:
    import sigpy.mri as mr

    mps = np.ones((1, *y.shape), dtype=np.complex64)
    app = (mr.app.TotalVariationRecon if kind == "sigpy-tv" else mr.app.L1WaveletRecon)(
        y[None], mps, lam, weights=mask[None], max_iter=max_iter, show_pbar=False)
    return np.abs(app.run())


def _ours(name: str, meas, lam: float, task) -> np.ndarray:
    from recon.execute import plan_methods, run_method

    (run,) = plan_methods([name], task, {name: {"lam": lam}}, noisy=False)
    img, _, _, _ = run_method(run, meas, task=task.name)
    return img


def mri_references(root: Path, masks=("equispaced", "poisson", "gaussian2d"), accel: float = 8.0,
                   size: int = 128, max_iter: int = 300, log=print) -> list[dict]:
    """Tune on BTP slices 5, 15; report on 2, 7, 12, 17, 22 (one patient; no adjacent slices)."""
    from recon.acquisition import MRIAcquisition
    from recon.metrics import compute_metrics
    from recon.tasks import TASKS

    task = TASKS["mri"]
    folder = root / "mri/val/brain_tumor_progression_t1c"
    splits = {"tune": _cases(folder, [5, 15]), "report": _cases(folder, [2, 7, 12, 17, 22])}
    import importlib.util

    methods = list(MRI_GRIDS)
    if importlib.util.find_spec("sigpy") is None:
        log("sigpy is not installed: SigPy rows skipped (pip install sigpy)")
        methods = ["tv", "cs-wavelet"]
    rows = []
    for mask in masks:
        acq = MRIAcquisition(mask=mask, accel=accel)
        data = {}
        for split, cases in splits.items():
            data[split] = []
            for name, src in cases:
                truth = task.prepare(src, size)
                meas = task.simulate(truth, acq, "cpu", seed=0)
                data[split].append((name, truth, meas))
        accel_true = float(data["tune"][0][2].op.acceleration)

        def score(method, lam, items):
            out = []
            for name, truth, meas in items:
                t0 = time.perf_counter()
                if method.startswith("sigpy"):
                    img = _sigpy_recon(method, meas.y[0].numpy(), meas.op.mask.numpy(), lam, max_iter)
                else:
                    img = _ours(method, meas, lam, task)
                m = compute_metrics(img, truth.x)
                out.append({**m, "seconds": time.perf_counter() - t0, "case": name})
            return out

        zf = score_zero_filled(data["report"], task)
        rows.append({"mask": mask, "accel": accel_true, "method": "zero-filled", "lam": None, **_mean(zf)})
        for method in methods:
            tuned = {lam: np.mean([r["psnr"] for r in score(method, lam, data["tune"])])
                     for lam in MRI_GRIDS[method]}
            best = max(tuned, key=tuned.get)
            rep = score(method, best, data["report"])
            rows.append({"mask": mask, "accel": accel_true, "method": method, "lam": best,
                         "tune_psnr": tuned, **_mean(rep)})
            log(f"{mask} x{accel_true:.1f} {method}: lam {best:g} (tuning {tuned[best]:.2f} dB) -> "
                f"report {rows[-1]['psnr']:.2f} dB / {rows[-1]['ssim']:.3f}")
    return rows


def score_zero_filled(items, task):
    from recon.execute import plan_methods, run_method
    from recon.metrics import compute_metrics

    (run,) = plan_methods(["zero-filled"], task, {})
    out = []
    for name, truth, meas in items:
        img, _, sec, _ = run_method(run, meas)
        out.append({**compute_metrics(img, truth.x), "seconds": sec, "case": name})
    return out


def _mean(rows) -> dict:
    return {"psnr": float(np.mean([r["psnr"] for r in rows])), "psnr_std": float(np.std([r["psnr"] for r in rows])),
            "ssim": float(np.mean([r["ssim"] for r in rows])), "seconds": float(np.mean([r["seconds"] for r in rows])),
            "n": len(rows)}


def ct_references(root: Path, views: int = 60, size: int = 128, sart_iters: int = 10, log=print) -> list[dict]:
    """FBP vs skimage iradon and SIRT vs skimage iradon_sart on ge_head + lung slices."""
    from skimage.transform import iradon, iradon_sart

    from forward_models import ParallelBeamCT, view_angles
    from recon.acquisition import CTAcquisition
    from recon.execute import plan_methods, run_method
    from recon.metrics import center_crop, compute_metrics
    from recon.tasks import TASKS

    task, acq = TASKS["ct"], CTAcquisition(views=views)
    theta = np.rad2deg(view_angles(views).numpy())
    op = ParallelBeamCT.like_skimage(size, theta)  # the same geometry for both implementations
    cases = _cases(root / "ct/val/ge_head", [6, 13, 20]) + _cases(root / "ct/val/lung_pet_ct_dx", [7, 15, 22])
    res = {k: [] for k in ("fbp", "skimage-iradon", "sirt", "skimage-iradon_sart")}
    for name, src in cases:
        truth = task.prepare(src, size, (-1000, 1000))
        meas = task.simulate(truth, acq, "cpu", seed=0, op=op)
        sino = meas.y[0].numpy().T.astype(np.float64)
        for method in ("fbp", "sirt"):
            (run,) = plan_methods([method], task, {}, noisy=False)
            img, _, sec, _ = run_method(run, meas)
            res[method].append({**compute_metrics(img, truth.x), "seconds": sec, "case": name})
        t0 = time.perf_counter()
        ref = iradon(sino, theta, output_size=size, filter_name="ramp", circle=False)  # size x size
        res["skimage-iradon"].append({**compute_metrics(ref, truth.x), "seconds": time.perf_counter() - t0})
        t0 = time.perf_counter()
        rec = None
        for _ in range(sart_iters):
            rec = iradon_sart(sino, theta, image=rec)
        res["skimage-iradon_sart"].append({**compute_metrics(center_crop(rec, truth.x.shape), truth.x),
                                           "seconds": time.perf_counter() - t0})
    rows = [{"views": views, "method": k, **_mean(v)} for k, v in res.items()]
    for r in rows:
        log(f"CT {views} views {r['method']}: {r['psnr']:.2f} dB / {r['ssim']:.3f} ({r['seconds']:.2f} s)")
    return rows


def markdown(mri_rows, ct_rows) -> str:
    lines = ["| mask | acceleration | method | λ (tuned) | PSNR (dB) | SSIM | s |", "|---|---|---|---|---|---|---|"]
    for r in mri_rows:
        lam = "–" if r["lam"] is None else f"{r['lam']:g}"
        lines.append(f"| {r['mask']} | {r['accel']:.1f} | {r['method']} | {lam} | {r['psnr']:.2f} ± {r['psnr_std']:.2f} "
                     f"| {r['ssim']:.3f} | {r['seconds']:.2f} |")
    lines += ["", "| CT views | method | PSNR (dB) | SSIM | s |", "|---|---|---|---|---|"]
    for r in ct_rows:
        lines.append(f"| {r['views']} | {r['method']} | {r['psnr']:.2f} ± {r['psnr_std']:.2f} | {r['ssim']:.3f} | "
                     f"{r['seconds']:.2f} |")
    if shutil.which("bart") is None:
        lines += ["", "BART `pics`: not installed here, not run."]
    return "\n".join(lines) + "\n"


def bench_references(data="../shared/data", accel: float = 8.0, out=None, log=print) -> dict:
    """``recon bench references``: the MRI and CT tables (module docstring)."""
    torch.set_num_threads(1)
    mri = mri_references(Path(data), accel=accel, log=log)
    ct = ct_references(Path(data), log=log)
    print(markdown(mri, ct))
    if out:
        Path(out).write_text(json.dumps({"mri": mri, "ct": ct}, indent=2, default=float) + "\n")
    return {"mri": mri, "ct": ct}
