"""Whole studies: every slice of a volume (or ``--slices a:b``), streamed in batches.

``recon ct SERIES`` / ``recon mri VOLUME`` / ``recon inpaint VOLUME`` reconstruct
every slice of a multi-slice input by default (``--slice I`` takes one).  The
slices are read once as float32, brought to the working scale, and
reconstructed ``--batch-slices B`` at a time (one method call per batch, the
slices along the batch axis).  Memory stays bounded by the batch, not the study.

* **Slice consistency.**  A method whose ``z_weight`` is positive couples
  neighbouring slices: ``score-fast`` by default (TV along z in its data step,
  ``--param z_weight=0`` for independent slices), ``tv3d`` (3-D TV), and ``tv``
  with ``--param z_weight=W``.  Each batch is then extended by :data:`HALO` slices on both sides
  (reconstructed and thrown away), so batch borders do not show as seams.
* **Seeds.**  The simulated measurement of slice ``k`` (absolute index in the
  input) uses the generator seed :func:`slice_seed` ``(seed, k)``, so a slice's
  data do not depend on the batching; a stochastic method's batch starting at
  slice ``k`` is seeded the same way (its samples depend on ``--batch-slices``).
* **Resume.**  Finished slices are kept in ``OUT/.recon-parts-<fingerprint>/``
  (one ``.npz`` per slice, written atomically).  A killed run restarted with
  the same settings reuses them and recomputes only the rest; the folder is
  removed when the study is complete.
* **Outputs** (staged, moved into place at the end): for DICOM input a derived
  series ``dicom/`` with every slice (InstanceNumber, ImagePositionPatient,
  SliceLocation, SourceImageSequence per slice, full HU range) and, with
  ``--samples K``, the standard deviation as a second series ``dicom_std/``;
  always ``recon.nii.gz`` (and ``std.nii.gz``) with the volume's affine;
  ``recon.png`` (the middle slice), ``coronal.png`` and ``sagittal.png``
  (reformats at the physical aspect); ``metrics.json`` with metrics over the
  volume, per slice and on the coronal and sagittal reformats (where
  slice-by-slice methods show stripes), ``metrics_slices.csv``; ``run.json``.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from recon.errors import ReconError

__all__ = ["parse_slices", "plan_batches", "slice_seed", "PartStore", "reconstruct_volume", "volume_metrics",
           "HALO", "DEFAULT_BATCH", "default_z_weight"]

#: slices added on each side of a batch when the method couples slices (thrown away afterwards)
HALO = 2
#: slices per method call by default
DEFAULT_BATCH = 4
#: slice spacing (mm) of the volume the default ``z_weight`` values were tuned on
#: (ct/val/totalseg_example_j2k, 2 mm slices).  A study with thicker slices gets the method's
#: default ``z_weight`` times ``Z_TUNING_SPACING_MM / spacing`` (the weight per mm of z), never
#: more than the default: :func:`default_z_weight`.
Z_TUNING_SPACING_MM = 2.0
#: the largest slice spacing / working pixel the spacing rule was measured at (from 0.51: 2 mm
#: at 128 px, to 8.2: 8 mm at 512 px; README "Slice spacing"); far beyond it a run warns
Z_MEASURED_ASPECT_MAX = 8.2
#: what a study run writes (older outputs of these names are replaced)
VOLUME_OUTPUTS = ("recon.nii.gz", "recon.png", "coronal.png", "sagittal.png", "metrics.json", "metrics_slices.csv",
                  "run.json", "sinogram.npy", "std.npy", "std.png", "std.nii.gz", "std_calibrated.npy", "dicom",
                  "dicom_std")


def parse_slices(text: str | None, n: int, path="input") -> tuple[int, int]:
    """``--slices``: ``all`` (default), ``a:b`` (0-based, ``b`` excluded, either may be
    omitted, negative counts from the end) or ``k`` -> ``(start, stop)`` within ``n`` slices."""
    if text is None or str(text).strip().lower() == "all":
        return 0, n
    t = str(text).strip()
    try:
        if ":" in t:
            a_text, b_text = t.split(":", 1)
            a = int(a_text) if a_text.strip() else 0
            b = int(b_text) if b_text.strip() else n
        else:
            a = int(t)
            b = a + 1 if a >= 0 else (a + 1 if a < -1 else n)
    except ValueError:
        raise ReconError(f"--slices must be 'all', 'a:b' (0-based, b excluded) or one index, got {text!r}") from None
    a = a + n if a < 0 else a
    b = b + n if b < 0 else b
    if not (0 <= a < b <= n):
        raise ReconError(f"{path}: --slices {text} selects no slices or lies outside the input's {n} slice(s) "
                         f"(valid: 0..{n - 1}, e.g. --slices 0:{n})")
    return a, b


def plan_batches(start: int, stop: int, batch: int, halo: int = 0) -> list[tuple[int, int, int, int]]:
    """``(core_start, core_stop, ext_start, ext_stop)`` per batch: the core slices are kept,
    the extension adds up to ``halo`` neighbours on each side within ``[start, stop)``."""
    if batch < 1:
        raise ReconError(f"--batch-slices must be a positive integer, got {batch}")
    plan = []
    for c0 in range(start, stop, batch):
        c1 = min(c0 + batch, stop)
        plan.append((c0, c1, max(start, c0 - halo), min(stop, c1 + halo)))
    return plan


def slice_seed(seed: int, k: int) -> int:
    """The generator seed of slice ``k``'s simulated measurement (and of a batch starting at ``k``)."""
    return (int(seed) * 1_000_003 + int(k)) % (2 ** 63)


class PartStore:
    """Finished slices of an interrupted study: ``OUT/.recon-parts-<fingerprint>/slice-K.npz``."""

    def __init__(self, out: Path, fp: str):
        self.folder = Path(out) / f".recon-parts-{fp}"

    def path(self, k: int) -> Path:
        return self.folder / f"slice-{k:05d}.npz"

    def done(self, k: int) -> bool:
        return self.path(k).is_file()

    def save(self, k: int, img: np.ndarray, std: np.ndarray | None, seconds: float, extra: np.ndarray | None,
             info: dict | None = None):
        """Slice ``k``: its image, std, seconds, an extra array and a JSON-able ``info`` dict
        (loaded back as ``info``)."""
        import json

        from recon.io._util import atomic_output

        self.folder.mkdir(parents=True, exist_ok=True)
        arrays = {"img": np.asarray(img, np.float32), "seconds": np.float64(seconds)}
        if std is not None:
            arrays["std"] = np.asarray(std, np.float32)
        if extra is not None:
            arrays["extra"] = np.asarray(extra, np.float32)
        if info is not None:
            arrays["info"] = np.array(json.dumps(info))
        with atomic_output(self.path(k), ".npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

    def load(self, k: int) -> dict:
        import json

        try:
            with np.load(self.path(k), allow_pickle=False) as z:
                part = {key: z[key] for key in z.files}
            if "info" in part:
                part["info"] = json.loads(str(part["info"]))
            return part
        except Exception as e:  # a damaged part is recomputed
            raise OSError(f"unreadable part {self.path(k)}: {e}") from e

    def remove(self):
        shutil.rmtree(self.folder, ignore_errors=True)


def metrics_slices_csv(metrics: dict, first: int, seconds: list[float]) -> str:
    """``metrics_slices.csv``: one row per slice of :func:`volume_metrics`' ``per_slice``
    (slice index from ``first``), with its seconds."""
    rows = ["slice,psnr,ssim,nmse,seconds"] + [
        f"{first + i},{p['psnr']:.6g},{p['ssim']:.6g},{p['nmse']:.6g},{seconds[i]:.4g}"
        for i, p in enumerate(metrics["per_slice"])]
    return "\n".join(rows) + "\n"


def default_z_weight(run, spacing_mm: float | None) -> tuple[object, dict | None]:
    """The slice coupling a study with slices ``spacing_mm`` apart gets when the user gave no
    ``z_weight``: the method's default per 2 mm of z (:data:`Z_TUNING_SPACING_MM`), i.e. the
    default times ``min(1, 2 / spacing_mm)``; unchanged when the spacing is unknown or the user
    set ``z_weight``.  Returns ``(run, record)``: ``run`` with the weight as an explicit option,
    ``record`` (for ``run.json``) saying where it came from (None when the method does not couple).

    Measured (README "Slice spacing"): on the tuning volume (abdomen) subsampled to 4 and 8 mm the
    unscaled default was best, the weights nearest the scaled one 0.1-0.25 dB below it and
    0.4-1.5 dB above slice by slice; on the report volumes (chest 8 mm, head 4 mm) the unscaled
    default lost 1.9 / 1.7 dB to slice by slice, the scaled one +0.3 / -0.4 dB."""
    from recon.execute import _signature_default

    if not couples_slices(run):
        return run, None
    if "z_weight" in run.options:
        return run, {"z_weight": float(run.options["z_weight"]), "from": "set by the user"}
    default = float(_signature_default(run.method, "z_weight") or 0.0)
    if not spacing_mm or not spacing_mm > 0:
        return run, {"z_weight": default, "from": "the method's default (slice spacing unknown, not scaled)"}
    factor = min(1.0, Z_TUNING_SPACING_MM / float(spacing_mm))
    w = default * factor
    how = (f"the method's default {default:g} (tuned on {Z_TUNING_SPACING_MM:g} mm slices)"
           + (f" x {Z_TUNING_SPACING_MM:g} / {float(spacing_mm):g} mm: the same weight per mm of z"
              if factor < 1 else f"; slices {float(spacing_mm):g} mm apart are not thicker, not scaled"))
    return replace(run, options={**run.options, "z_weight": w}), {"z_weight": w, "from": how,
                                                                   "default": default, "factor": factor}


def couples_slices(run) -> bool:
    """Whether the planned method couples neighbouring slices (``z_weight`` > 0)."""
    from recon.execute import _signature_default

    w = run.options.get("z_weight", _signature_default(run.method, "z_weight"))
    try:
        return float(w or 0.0) > 0
    except (TypeError, ValueError):
        return False


def _reformat_ssim(x: np.ndarray, ref: np.ndarray, axis: int) -> float | None:
    """Mean SSIM over the planes of a reformat (axis 1: coronal, 2: sagittal) of (z, y, x) volumes."""
    from recon.metrics import ssim

    if x.shape[0] < 7:  # SSIM's 7-pixel window needs 7 slices
        return None
    step = max(1, x.shape[axis] // 128)  # at most ~128 planes: the mean is stable, the cost small
    vals = [ssim(np.take(x, i, axis=axis), np.take(ref, i, axis=axis), data_range=1.0)
            for i in range(0, x.shape[axis], step)]
    return float(np.mean(vals))


def volume_metrics(x: np.ndarray, ref: np.ndarray) -> dict:
    """Metrics of a ``(z, y, x)`` reconstruction against its reference (both [0, 1] scale, the
    reconstruction clipped as in :func:`recon.metrics.compute_metrics`): PSNR/NMSE over the whole
    volume, SSIM averaged over the axial slices and over the coronal and sagittal reformats, and
    the per-slice PSNR/SSIM/NMSE."""
    from recon.metrics import compute_metrics

    r = np.clip(np.asarray(x, np.float64), 0, 1)
    t = np.clip(np.asarray(ref, np.float64), 0, 1)  # CT truth keeps bone above the window (> 1)
    per = [compute_metrics(r[i], t[i]) for i in range(r.shape[0])]
    mse = float(np.mean((r - t) ** 2))
    return {"psnr": float(10 * np.log10(1.0 / mse)) if mse > 0 else float("inf"),
            "ssim": float(np.mean([p["ssim"] for p in per])),
            "nmse": float(np.sum((r - t) ** 2) / max(float(np.sum(t ** 2)), 1e-30)),
            "ssim_coronal": _reformat_ssim(r, t, 1),
            "ssim_sagittal": _reformat_ssim(r, t, 2), "per_slice": per}


def _reformat_png(vol: np.ndarray, axis: int, z_scale: float, path: Path, vmax: float = 1.0) -> None:
    """The middle coronal (axis 1) or sagittal (axis 2) plane, stretched along z to the physical aspect."""
    from skimage.transform import resize

    from recon.io import write_png

    plane = np.take(vol, vol.shape[axis] // 2, axis=axis)
    rows = max(1, int(round(plane.shape[0] * z_scale)))
    if rows != plane.shape[0]:
        plane = resize(plane, (rows, plane.shape[1]), order=1, preserve_range=True, anti_aliasing=False)
    write_png(np.flipud(plane), path, vmin=0.0, vmax=vmax)  # head up: slice order is usually feet -> head


def reconstruct_volume(task, acq, settings, inputs, out, log: Callable[[str], None] = print, *,
                       slices: tuple[int, int], batch: int = DEFAULT_BATCH, fp: str | None = None,
                       label: str | None = None, volume=None) -> dict:
    """Reconstruct slices ``[a, b)`` of ``inputs.path`` into ``out`` (see the module docstring);
    returns the run record (also ``run.json``)."""
    from forward_models.physics import Measurement
    from recon.case import load_source
    from recon.execute import (check_memory, run_prior, check_samples, known_pixel_mm, noise_text, ood_check,
                               plan_methods, prepare_truth, progress_bar, protected_inputs, record_head,
                               run_fingerprint, run_method, warn, working_window_and_size, write_std_maps)
    from recon.io import write_npy, write_png
    from recon.io.derived import slice_affine, write_image_outputs
    from recon.io.nifti import write_nifti
    from recon.multiscale import scale_record
    from recon.outputs import OutputFolder, fingerprint, write_json, write_text

    t_start = time.perf_counter()
    (run,) = plan_methods(list(settings.methods), task, settings.params, noisy=acq.noisy)
    check_samples(settings.samples, [run])
    a, b = slices
    n = b - a
    device = settings.device
    coupled = couples_slices(run)
    halo = HALO if coupled and n > 1 else 0
    fp = fp or run_fingerprint(task, acq, settings, inputs)  # covers --slices and --batch-slices
    dicom_folders = [Path(inputs.path)] if Path(inputs.path).is_dir() else []
    folder = OutputFolder(out, inputs=protected_inputs(acq, inputs), reserved=VOLUME_OUTPUTS,
                          dicom_folders=dicom_folders)
    timings: dict[str, float] = {}
    with folder:
        stage = folder.stage
        t0 = time.perf_counter()
        source = load_source(inputs.path, inputs.series, a, n_slices=n, volume=volume)
        task.check_source(source, settings.force_modality)
        prior, prior_name = run_prior(run, settings, task, acq, source)
        window, size = working_window_and_size(acq, settings.size, prior)
        check_memory(size if size is not None else min(source.image.shape[-2:]), samples=settings.samples,
                     slices=min(n, batch + 2 * halo), native=size is None)
        truth, acq, geometry_note = prepare_truth(task, acq, source, size, window, log)
        timings["load"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        op = acq.operator(truth.shape, device, seed=settings.seed)
        timings["operator"] = time.perf_counter() - t0
        pixel_mm = known_pixel_mm(truth, acq, size)
        spacing_mm = float(source.reference.spacing[0]) if source.reference is not None else None
        aspect = spacing_mm / truth.pixel_mm if coupled and spacing_mm is not None and source.dx else None
        user_weight = "z_weight" in run.options
        run, z_record = default_z_weight(run, spacing_mm)
        if z_record:
            log(f"slice coupling: z_weight {z_record['z_weight']:.3g} ({z_record['from']})")
        if aspect and not user_weight and aspect > Z_MEASURED_ASPECT_MAX * 1.5:
            warn(task, f"{run.name} couples slices {aspect:.2f} working pixels apart, far beyond the "
                       f"{Z_MEASURED_ASPECT_MAX:g} its default was measured at (README 'Slice spacing'), so the "
                       "coupling may over-smooth along z; set --param z_weight=W, or z_weight=0 for "
                       "independent slices")
        import recon

        parts = PartStore(folder.path, fingerprint({"run": fp, "recon": recon.__version__}))  # no parts of other code
        plan = plan_batches(a, b, batch, halo)
        reused = sum(parts.done(k) for k in range(a, b))
        if reused:
            log(f"resuming: {reused} of {n} slice(s) already reconstructed in {parts.folder}")
        log(f"{label or inputs.path}: {run.name} on {n} slice(s) {a}:{b} of {tuple(op.in_shape)}, "
            f"batches of {batch}" + (f" (+{halo} neighbour slices each side: the method couples slices)"
                                     if halo else ""))
        info0, sigmas, used, method_seconds = None, [], {}, 0.0
        with progress_bar(settings.progress, n, f"{run.name} slices") as bar:
            if bar is not None and reused:
                bar.update(reused)
            for c0, c1, e0, e1 in plan:
                if all(parts.done(k) for k in range(c0, c1)):
                    continue
                ys = []
                for k in range(e0, e1):
                    sub = replace(truth, x=truth.x[k - a])
                    m = task.simulate(sub, acq, device, seed=slice_seed(settings.seed, k), op=op)
                    ys.append(m.y)
                    sigmas.append(m.sigma_y)
                    info0 = info0 or m.info
                meas = Measurement(y=torch.cat(ys), op=op, sigma_y=float(np.sqrt(np.mean(np.square(sigmas)))),
                                   info=info0)
                img, std, seconds, used = run_method(run, meas, prior=prior, seed=slice_seed(settings.seed, c0),
                                                     samples=settings.samples, progress=False, task=task.name,
                                                     pixel_mm=pixel_mm, stack=True)
                method_seconds += seconds
                keep_y = "sinogram.npy" in task.extra_outputs(meas)  # CT writes its (simulated) sinogram
                for k in range(c0, c1):
                    i = k - e0
                    parts.save(k, img[i], None if std is None else std[i], seconds / (c1 - c0),  # halo cost included
                               meas.y[i].float().cpu().numpy() if keep_y else None)
                if bar is not None:
                    bar.update(c1 - c0)
        # assemble from the parts (every slice is there now)
        loaded = [parts.load(k) for k in range(a, b)]
        img = np.stack([p["img"] for p in loaded])
        std = np.stack([p["std"] for p in loaded]) if settings.samples > 1 else None
        sino = np.stack([p["extra"] for p in loaded]) if all("extra" in p for p in loaded) else None
        per_slice_seconds = [float(p["seconds"]) for p in loaded]
        timings["reconstruct"] = float(sum(per_slice_seconds))
        timings["reconstruct_this_run"] = method_seconds
        if info0 is None:  # everything was resumed: describe the measurement of the first slice again
            m = task.simulate(replace(truth, x=truth.x[0]), acq, device, seed=slice_seed(settings.seed, a), op=op)
            info0, sigmas = m.info, [m.sigma_y]
        meas_info = dict(info0)
        log(f"{label or inputs.path}: {run.name} ({noise_text(meas_info)}), {n} slice(s) in "
            f"{timings['reconstruct']:.1f} s ({timings['reconstruct'] / n:.1f} s per slice)")
        stub = Measurement(y=torch.zeros(1), op=op, info=meas_info)  # what the per-slice task hooks read
        warnings = task.measurement_warnings(acq, stub)
        for w in warnings:
            warn(task, w)
        prior_scale = (scale_record(prior, op.in_shape, used)
                       if prior is not None else None)
        ood = ood_check(task, prior, truth.x[n // 2], "input image (middle slice)", warnings)
        t0 = time.perf_counter()
        ref = np.stack([np.asarray(task.metric_image(truth.x[i], stub)) for i in range(n)])
        rec_m = np.stack([np.asarray(task.metric_image(img[i], stub)) for i in range(n)])
        metrics = volume_metrics(rec_m, ref)
        metrics.update(data_range=1.0, scale="[0, 1]", reference="input image", slices=[a, b])
        metrics.update(task.extra_metrics(img, truth))
        write_json(stage / "metrics.json", metrics)
        write_text(stage / "metrics_slices.csv", metrics_slices_csv(metrics, a, per_slice_seconds))
        method_settings = {"task": task.name, "method": run.name, **{k: v for k, v in used.items() if k != "callback"}}
        per_slice = [task.output_image(img[i], truth, stub, window) for i in range(n)]
        values = np.stack([v for v, _, _ in per_slice])
        shown = np.stack([sh for _, sh, _ in per_slice])
        vmax = per_slice[n // 2][2]
        written = write_image_outputs(stage, values, truth, run.name, method_settings)
        affine = (slice_affine(source.reference, a, truth.crop, truth.shape) if source.reference is not None
                  and getattr(source.reference, "affine", None) is not None
                  else np.diag([truth.pixel_mm, truth.pixel_mm, 1.0, 1.0]))
        if "recon.nii.gz" not in written:
            write_nifti(values, stage / "recon.nii.gz", affine=affine)
            written.append("recon.nii.gz")
        write_png(shown[n // 2], stage / "recon.png", vmin=0.0, vmax=vmax)
        written.append("recon.png")
        dz = spacing_mm or 1.0
        if n > 1:
            z_scale = dz / truth.pixel_mm if truth.pixel_mm else 1.0
            _reformat_png(shown, 1, z_scale, stage / "coronal.png", vmax)
            _reformat_png(shown, 2, z_scale, stage / "sagittal.png", vmax)
            written += ["coronal.png", "sagittal.png"]
        if sino is not None:
            write_npy(sino, stage / "sinogram.npy")
            written.append("sinogram.npy")
        std_scale = None
        if std is not None:
            names, std_scale = write_std_maps(stage, std, std[n // 2], prior, task, run.name, acq, warnings)
            unit = (truth.window[1] - truth.window[0]) if truth.units == "HU" else truth.scale
            std_units = (std * unit).astype(np.float32)
            write_nifti(std_units, stage / "std.nii.gz", affine=affine)
            written += names + ["std.nii.gz"]
            if source.fmt == "dicom" and source.reference is not None:
                from recon.io.derived import cropped_reference
                from recon.io.dicom import write_dicom_series

                files = write_dicom_series(std_units, cropped_reference(source.reference, truth.crop),
                                           stage / "dicom_std", f"{run.name} std", method_settings,
                                           slice_indices=source.slice_indices,
                                           series_description=f"posterior std [{run.name}]")
                written += [str(Path("dicom_std") / f.name) for f in files]
        written += ["metrics.json", "metrics_slices.csv"]
        timings["write"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        record = {
            **record_head(task, settings, str(inputs.path)),
            "options": {**acq.settings(), **settings.record(), "method": run.name, "series": inputs.series,
                        "slices": f"{a}:{b}", "batch_slices": batch},
            "geometry": geometry_note,
            "method": {"name": run.name, "options": used},
            "prior": prior_name and str(prior_name),
            "prior_scale": prior_scale,
            "out_of_distribution_check": ood,
            "working_size": list(op.in_shape),
            "slice_coupling": z_record,
            "slices": {"start": a, "stop": b, "count": n, "batch": batch, "halo": halo, "z_aspect": aspect,
                       "resumed": int(reused), "couples_slices": coupled,
                       "seed_rule": "slice k: seed * 1000003 + k (recon.volume.slice_seed)"},
            "window": list(window) if task.uses_window(truth) else None,
            "units": task.units_label(truth),
            "pixel_mm": truth.pixel_mm,
            "slice_spacing_mm": spacing_mm,
            "measurement": meas_info,
            "sigma_y": float(np.sqrt(np.mean(np.square(sigmas)))) if sigmas else None,
            "samples": settings.samples,
            "std_calibration": std_scale,
            "metrics": {k: v for k, v in metrics.items() if k != "per_slice"},
            "warnings": warnings,
            "timings_seconds": {k: round(v, 4) for k, v in timings.items()},
            "seconds_per_slice": round(timings["reconstruct"] / n, 4),
            "outputs": written + ["run.json"],
            "fingerprint": fp,
            "crop": list(truth.crop),
        }
        write_json(stage / "run.json", record)
    parts.remove()
    return record

