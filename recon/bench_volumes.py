"""``recon bench volumes``: whole-study reconstructions compared over the volume and its reformats.

For each series (default: the two report volumes of ``ct/val``, ``ge_head`` and
``lung_pet_ct_dx``), each view count and each method it runs the study command
(:func:`recon.volume.reconstruct_volume`, resumable) into
``OUT/<series>/<views>v/<method label>/`` and collects:

* PSNR over the volume and SSIM averaged over the axial slices and over the
  coronal and sagittal reformats (the [0, 1] scale of the working window);
* RMSE in HU over the full range and PSNR/SSIM inside the series' clinical
  window (brain for heads, lung and soft tissue for chests; from the DICOM
  BodyPartExamined);
* seconds per slice.

It writes ``volumes.json``, ``volumes.md`` (one table per series and view
count) and ``OUT/<series>-<views>v.png`` (middle axial, coronal and sagittal
planes of the truth and every method, in the clinical window).

A method is ``NAME`` or ``NAME:key=value;key=value`` (options as ``--param``),
e.g. ``score-fast:z_weight=0.05``; its label in tables and folders is the
whole text.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from recon.errors import ReconError
from recon.metrics import clinical_window_for, clinical_windows_of

__all__ = ["bench_volumes", "parse_method_spec", "clinical_window_for"]

DEFAULT_SERIES = ("ct/val/ge_head", "ct/val/lung_pet_ct_dx")
DEFAULT_MRI_SERIES = ("mri/val/brain_tumor_progression_t1c",)


def parse_method_spec(text: str) -> tuple[str, dict]:
    """``'score-fast:z_weight=0.05;n_steps=50'`` -> ``('score-fast', {'z_weight': 0.05, 'n_steps': 50})``."""
    from recon.execute import parse_params

    name, _, rest = text.partition(":")
    if not name.strip():
        raise ReconError(f"--methods: empty method name in {text!r}")
    return name.strip(), parse_params([p for p in rest.split(";") if p.strip()]).get(None, {})


def _figure(planes: dict, title: str, window_hu, unit_window, path: Path) -> None:
    """Rows: truth and each method; columns: middle axial, coronal, sagittal (in ``window_hu``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = window_hu
    ulo, uhi = unit_window
    names = list(planes)
    fig, axes = plt.subplots(len(names), 3, figsize=(9, 2.6 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        for j, (label, img, aspect) in enumerate(planes[name]["planes"]):
            hu = np.asarray(img) * (uhi - ulo) + ulo
            ax = axes[i, j]
            ax.imshow(hu, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(planes[name]["label"], fontsize=8)
            if i == 0:
                ax.set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    path.chmod(0o644)


def bench_volumes(data: str, series: list[str] | None, views: list[int], methods: list[str], out,
                  size: int | None = 128, slices: str | None = None, batch: int = 4, prior: str | None = None,
                  photons: float | None = None, seed: int = 0, log=print, task_name: str = "ct",
                  mask: str = "equispaced") -> dict:
    """``views``: CT view counts, or for ``task_name='mri'`` accelerations (``mask`` k-space lines)."""
    from recon.acquisition import CTAcquisition, MRIAcquisition
    from recon.execute import RunSettings, run_fingerprint
    from recon.io import read_input
    from recon.outputs import write_json, write_text
    from recon.single import Inputs
    from recon.tasks import TASKS
    from recon.volume import parse_slices, reconstruct_volume

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [Path(s) if Path(s).exists() else Path(data) / s
             for s in (series or (DEFAULT_SERIES if task_name == "ct" else DEFAULT_MRI_SERIES))]
    for p in paths:
        if not p.exists():
            raise ReconError(f"{p}: no such series; pass --series PATH (or --data pointing at ../shared/data)")
    specs = [(m, *parse_method_spec(m)) for m in methods]
    task = TASKS[task_name]
    ct = task_name == "ct"
    results = []
    for path in paths:
        vol = read_input(path)
        a, b = parse_slices(slices, vol.n_slices, path)
        windows = clinical_windows_of(vol) if ct else []
        for v in views:
            # MRI: the fastMRI convention for the fully sampled centre, 0.32 / R (4x: 8 %, 8x: 4 %)
            acq = (CTAcquisition(views=v, photons=photons) if ct
                   else MRIAcquisition(mask=mask, accel=v, center_fraction=0.32 / v))
            level = f"{v}v" if ct else f"{v:g}x"
            planes = {}
            for label, name, params in specs:
                settings = RunSettings(methods=[name], params={None: params} if params else {}, param_text=[f"{k}={v}" for k, v in params.items()],
                                       prior=prior, size=size, seed=seed, progress=False)
                case_out = out / path.name / level / label.replace(":", "_").replace(";", "_").replace("=", "")
                t0 = time.perf_counter()
                inputs = Inputs(path=str(path), slices=f"{a}:{b}", batch=batch)
                rec = _finished(case_out, run_fingerprint(task, acq, settings, inputs))
                if rec is None:  # (a finished method is not rerun; an interrupted one resumes its slices)
                    rec = reconstruct_volume(task, acq, settings, inputs, case_out, log=lambda m: None,
                                             slices=(a, b), batch=batch, volume=vol)
                m = rec["metrics"]
                row = {"series": path.name, "views": v, "level": level, "method": label, "slices": b - a,
                       "size": rec["working_size"][0], "psnr": m["psnr"], "ssim": m["ssim"],
                       "ssim_coronal": m.get("ssim_coronal"), "ssim_sagittal": m.get("ssim_sagittal"),
                       "rmse_hu": m.get("rmse_hu"), "seconds_per_slice": rec["seconds_per_slice"],
                       "wall_seconds": round(time.perf_counter() - t0, 1), "windows": windows,
                       **{f"{k}_{w}": m.get(f"{k}_{w}") for w in windows for k in ("psnr", "ssim")}}
                results.append(row)
                hu = f", RMSE {row['rmse_hu']:.1f} HU" if row["rmse_hu"] is not None else ""
                log(f"{path.name} {level} {label}: PSNR {row['psnr']:.2f} dB, SSIM ax/cor/sag {row['ssim']:.3f}/"
                    f"{row['ssim_coronal'] or float('nan'):.3f}/{row['ssim_sagittal'] or float('nan'):.3f}"
                    f"{hu}, {row['seconds_per_slice']:.1f} s/slice")
                planes[label] = {"label": label, "dir": case_out, "window": rec["window"]}
            _write_figure(path, vol, level, planes, windows[0] if windows else None, task, size, a, b, out)
    write_json(out / "volumes.json", results)
    write_text(out / "volumes.md", _markdown(results))
    return {"rows": results}


def _finished(folder: Path, fp: str) -> dict | None:
    try:
        rec = json.loads((folder / "run.json").read_text())
    except (OSError, ValueError):
        return None
    return rec if rec.get("fingerprint") == fp else None


def _write_figure(path, vol, level, planes, window_name, task, size, a, b, out):
    """``vol``: the volume already read from ``path`` (not read again)."""
    from recon.case import load_source
    from recon.io import read_input
    from recon.metrics import CLINICAL_WINDOWS

    rows = {}
    first = next(iter(planes.values()))
    unit_window = first["window"] or ([-1000.0, 1000.0] if window_name else [0.0, 1.0])
    truth = task.prepare(load_source(path, None, a, n_slices=b - a, volume=vol), size, tuple(unit_window), "auto")
    aspect = float(vol.spacing[0]) / truth.pixel_mm

    def three(vol):
        z, y, x = vol.shape
        return [("axial (middle)", vol[z // 2], 1.0), ("coronal", np.flipud(vol[:, y // 2, :]), aspect),
                ("sagittal", np.flipud(vol[:, :, x // 2]), aspect)]

    rows["truth"] = {"label": "truth", "planes": three(truth.x)}
    for label, info in planes.items():
        rec = np.asarray(read_input(info["dir"] / "recon.nii.gz").data)  # HU, or the input's intensities
        if window_name:
            lo, hi = unit_window
            rows[label] = {"label": label, "planes": three((rec - lo) / (hi - lo))}
        else:
            rows[label] = {"label": label, "planes": three(rec / max(truth.scale, 1e-12))}
    if window_name:
        _figure(rows, f"{path.name}, {level}, {b - a} slices, {window_name} window", CLINICAL_WINDOWS[window_name],
                unit_window, out / f"{path.name}-{level}.png")
    else:
        _figure(rows, f"{path.name}, {level}, {b - a} slices", (0.0, 1.0), (0.0, 1.0), out / f"{path.name}-{level}.png")


def _markdown(rows: list[dict]) -> str:
    lines = []
    keys = sorted({(r["series"], r["views"], r.get("level", f"{r['views']}v")) for r in rows},
                  key=lambda k: (k[0], k[1]))
    for series, v, level in keys:
        sel = [r for r in rows if r["series"] == series and r["views"] == v]
        w = sel[0]["windows"]
        lines += [f"### {series}, {level} ({sel[0]['slices']} slices, {sel[0]['size']}²)", "",
                  "| method | PSNR (dB) | SSIM axial | SSIM coronal | SSIM sagittal | RMSE (HU) | "
                  + "".join(f"PSNR/SSIM {x} | " for x in w) + "s/slice |",
                  "|---|---|---|---|---|---|" + "---|" * len(w) + "---|"]
        for r in sel:
            fmt = lambda x: "–" if x is None else f"{x:.3f}"  # noqa: E731
            hu = "–" if r["rmse_hu"] is None else f"{r['rmse_hu']:.1f}"
            lines.append(f"| {r['method']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {fmt(r['ssim_coronal'])} | "
                         f"{fmt(r['ssim_sagittal'])} | {hu} | "
                         + "".join(f"{r[f'psnr_{x}']:.2f} / {r[f'ssim_{x}']:.3f} | " for x in w)
                         + f"{r['seconds_per_slice']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def load_rows(out) -> list[dict]:
    return json.loads((Path(out) / "volumes.json").read_text())
