"""Is the posterior standard deviation of ``--samples K`` calibrated?  (``recon bench calibration``)

For every case: one simulated measurement, K posterior samples of a score
method (default ``score-fast``), their mean ``m`` and per-pixel standard
deviation ``s``; the error ``e = clip(m, 0, 1) - x``.  Reported:

* coverage: the fraction of pixels with ``|e| <= z s`` for z = 1, 2, 3 (a
  calibrated Gaussian posterior gives 68.3 / 95.4 / 99.7 %);
* a reliability curve: pixels binned by ``s``, the RMS error in each bin
  against the bin's RMS ``s`` (calibrated: on the diagonal);
* the per-case Pearson correlation between ``s`` and ``|e|``;
* a scale factor ``c`` fitted on the tuning cases so that ``|e| <= 2 c s``
  holds for 95.4 % of their pixels, and the coverage it gives on the report
  cases (``c s`` is then the calibrated standard deviation).

The K samples of one case are drawn as one batch (the posterior mean has the
sample noise of K draws).  Tuning and report cases must come from different
patients.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["posterior_stats", "calibration_summary", "fit_scale", "run_calibration"]

Z_LEVELS = (1.0, 2.0, 3.0)
GAUSS_COVERAGE = {1.0: 0.6827, 2.0: 0.9545, 3.0: 0.9973}


def posterior_stats(task, acq, source, prior, k: int, method: str = "score-fast", size: int = 128,
                    seed: int = 0, device="cpu") -> dict:
    """Mean, std and error of ``k`` posterior samples on one case."""
    from recon.execute import plan_methods, run_method, working_window_and_size

    window, size = working_window_and_size(acq, size, prior)
    truth = task.prepare(source, size, window, getattr(acq, "units", "auto"), getattr(acq, "fov", None))
    meas = task.simulate(truth, acq, device, seed=seed)
    (run,) = plan_methods([method], task, {}, noisy=acq.noisy)
    t0 = time.perf_counter()
    mean, std, _, _ = run_method(run, meas, prior=prior, seed=seed, samples=k, task=task.name)
    return {"truth": truth.x, "mean": mean, "std": std, "error": np.clip(mean, 0, 1) - truth.x,
            "seconds": time.perf_counter() - t0}


def coverage(error: np.ndarray, std: np.ndarray, z: float, scale: float = 1.0) -> float:
    return float(np.mean(np.abs(error) <= z * scale * std))


def fit_scale(errors, stds, z: float = 2.0, target: float = GAUSS_COVERAGE[2.0]) -> float:
    """Smallest ``c`` with ``mean(|e| <= z c s) >= target`` over all pixels of the given cases."""
    e = np.abs(np.concatenate([np.ravel(a) for a in errors]))
    s = np.concatenate([np.ravel(a) for a in stds])
    ratio = e / np.maximum(z * s, 1e-12)
    return float(np.quantile(ratio, target))


def reliability(errors, stds, n_bins: int = 10) -> list[dict]:
    """Pixels binned by std (quantile bins): RMS std and RMS error per bin."""
    e = np.concatenate([np.ravel(a) for a in errors])
    s = np.concatenate([np.ravel(a) for a in stds])
    edges = np.unique(np.quantile(s, np.linspace(0, 1, n_bins + 1)))
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (s >= lo) & (s <= hi)
        if sel.any():
            rows.append({"std_rms": float(np.sqrt(np.mean(s[sel] ** 2))),
                         "error_rms": float(np.sqrt(np.mean(e[sel] ** 2))), "pixels": int(sel.sum())})
    return rows


def calibration_summary(stats: list[dict], scale: float = 1.0) -> dict:
    errors, stds = [s["error"] for s in stats], [s["std"] for s in stats]
    e = np.concatenate([np.ravel(a) for a in errors])
    s = np.concatenate([np.ravel(a) for a in stds])
    corr = [float(np.corrcoef(np.ravel(st["std"]), np.abs(np.ravel(st["error"])))[0, 1]) for st in stats]
    return {"cases": len(stats),
            "coverage": {f"{z:g}": coverage(e, s, z, scale) for z in Z_LEVELS},
            "correlation_per_case": corr, "correlation_mean": float(np.mean(corr)),
            "reliability": reliability(errors, [b * scale for b in stds]),
            "seconds_per_case": float(np.mean([st["seconds"] for st in stats]))}


def _cases(folder: str, indices):
    from recon.case import source_from_case
    from recon.io import discover_cases

    found = discover_cases(folder, slices="all")
    return [(c.name, source_from_case(c)) for i, c in enumerate(found) if i in set(indices)]


def run_calibration(task_name: str, acq, tune: list, report: list, prior_name: str, k: int = 8,
                    method: str = "score-fast", size: int = 128, log=print) -> dict:
    """``tune``/``report``: lists of (name, Source).  Returns the summary (tuning, report, scale)."""
    from recon.execute import calibration_conditions
    from recon.prior import load_prior
    from recon.tasks import TASKS

    torch.set_num_threads(1)
    task, prior = TASKS[task_name], load_prior(prior_name)
    out = {"task": task_name, "acquisition": acq.describe(), "method": method, "samples": k, "size": size,
           "prior": prior_name}
    stats = {}
    for split, cases in (("tune", tune), ("report", report)):
        stats[split] = []
        for name, src in cases:
            st = posterior_stats(task, acq, src, prior, k, method, size)
            stats[split].append(st)
            log(f"{split} {name}: coverage(2 std) {coverage(st['error'], st['std'], 2):.3f}, "
                f"{st['seconds']:.1f} s")
    scale = fit_scale([s["error"] for s in stats["tune"]], [s["std"] for s in stats["tune"]])
    out["scale_fitted_on_tune"] = scale
    # where the scale may be applied (recon.execute.calibration_applies): the settings it was fitted at
    out["conditions"] = calibration_conditions(acq, stats["tune"][0]["std"])
    out["tune"] = calibration_summary(stats["tune"])
    out["report_raw"] = calibration_summary(stats["report"])
    out["report_scaled"] = calibration_summary(stats["report"], scale)
    out["cases"] = {"tune": [n for n, _ in tune], "report": [n for n, _ in report]}
    return out


def markdown(res: dict) -> str:
    lines = [f"### Calibration of `--samples {res['samples']}` ({res['method']}, {res['task']}, "
             f"{res['acquisition']})", "",
             "| cases | scale | within ±1 std | ±2 std | ±3 std | corr(std, abs err) |", "|---|---|---|---|---|---|"]
    for key, label, scale in (("tune", "tuning", 1.0), ("report_raw", "report, raw std", 1.0),
                              ("report_scaled", f"report, std x {res['scale_fitted_on_tune']:.2f}",
                               res["scale_fitted_on_tune"])):
        r = res[key]
        c = r["coverage"]
        lines.append(f"| {label} ({r['cases']}) | {scale:.2f} | {c['1']:.3f} | {c['2']:.3f} | {c['3']:.3f} | "
                     f"{r['correlation_mean']:.2f} |")
    lines += ["", "Gaussian reference: 0.683 / 0.954 / 0.997.", "", "Reliability (report cases, raw std):", "",
              "| RMS std | RMS error | pixels |", "|---|---|---|"]
    lines += [f"| {b['std_rms']:.4f} | {b['error_rms']:.4f} | {b['pixels']} |" for b in res["report_raw"]["reliability"]]
    return "\n".join(lines) + "\n"


def bench_calibration(data="../shared/data", task: str = "ct", samples: int = 8, out=None, log=print) -> dict:
    """``recon bench calibration``: tuning and report cases from ``data`` (module docstring)."""
    from recon.acquisition import CTAcquisition, MRIAcquisition

    root = Path(data)
    if task == "ct":
        acq = CTAcquisition(views=23)
        tune = _cases(str(root / "ct/val/totalseg_example_j2k"), [5, 15])
        report = _cases(str(root / "ct/val/ge_head"), [6, 13, 20]) + \
            _cases(str(root / "ct/val/lung_pet_ct_dx"), [7, 15, 22])
        prior = "ct"
    else:
        acq = MRIAcquisition(mask="equispaced", accel=4)
        tune = _cases(str(root / "mri/val/brain_tumor_progression_t1c"), [5, 15])
        report = _cases(str(root / "mri/val/stroke"), [60, 200, 340])
        prior = "brain-mri"
    res = run_calibration(task, acq, tune, report, prior, k=samples, log=log)
    print(markdown(res))
    if out:
        Path(out).write_text(json.dumps(res, indent=2, default=float) + "\n")
    return res
