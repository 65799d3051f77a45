"""Measured multi-slice data as a whole study (issue #11).

``recon ct --sinogram VOL.npy`` with a stack ``(slices, views, detectors)`` and
``recon mri --kspace FILE`` with several slices reconstruct every slice (or
``--slices a:b``; ``--slice I`` keeps the single-slice path of
:mod:`recon.single`).  The file is streamed: the task's study object
(:meth:`recon.tasks.Task.measured_study`) reads one slice at a time (a memory
map of the ``.npy`` sinogram, one HDF5 slice of fastMRI k-space), so memory is
bounded by the batch, not the study.  The rest is :mod:`recon.volume`'s
machinery: batches (:func:`~recon.volume.plan_batches`), resumable parts
(:class:`~recon.volume.PartStore`), a progress bar over slices, volume metrics
and the same staged outputs.

* **CT**: every slice shares one geometry (angles, detector, ``--views``
  subset), so ``--batch-slices B`` slices go to the method as one batch; a
  method that couples slices (``z_weight`` > 0: ``score-fast`` by default,
  ``tv3d``) gets :data:`~recon.volume.HALO` neighbour slices each side,
  reconstructed and discarded.  ``--reference full`` reconstructs each slice
  from all its measured views (the reference of that slice).  Flat and dark
  fields may be shared (``(detectors,)``, ``(views, detectors)``) or per slice
  (``(slices, views|1, detectors)``).
* **MRI**: each slice has its own coil maps and intensity scale
  (:meth:`recon.tasks.MRITask.measured`), so slices are reconstructed
  independently, one method call each; a coupling method runs with
  ``z_weight=0`` (said in the log and in ``run.json``'s ``slice_coupling``).
  References (the file's ``reconstruction_rss``, the RSS of fully sampled
  data, a ``--reference`` volume with one slice per k-space slice) are per slice.
* **Geometry**: the NIfTI affine has the in-plane pixel ``--fov / --size`` (CT;
  else 1) and the slice spacing ``--slice-spacing MM`` (else 1, noted in
  ``run.json``).
* **Resume**: the parts' fingerprint covers the settings and the measured
  files (path, size, modification time), so changed data are never reused.
* **Outputs**: ``recon.nii.gz`` (in the units of the single-slice measured
  path: HU for CT, the k-space's scale for MRI), ``recon.png`` (middle slice),
  ``coronal.png``/``sagittal.png``, ``metrics.json`` + ``metrics_slices.csv``
  when every slice has a reference, ``run.json`` (slices done/resumed,
  per-slice seconds and the measurement values that differ between slices,
  e.g. the MRI scale).
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from recon.errors import ReconError
from recon.volume import DEFAULT_BATCH, HALO, PartStore, couples_slices, default_z_weight, plan_batches, slice_seed

__all__ = ["reconstruct_measured_volume", "measured_file_signatures"]

#: per-slice measurement values too long to repeat for every slice in run.json
_BULKY = ("angles_deg", "selected_views")


def measured_file_signatures(acq) -> list:
    """``[option, path, bytes, mtime_ns]`` of the measured files an acquisition names (for
    fingerprints: data changed on disk are not taken for the same run)."""
    from recon.execute import reference_file

    out = []
    for name in ("sinogram", "flat", "dark", "angles", "kspace", "mask_file", "reference"):
        value = reference_file(acq) if name == "reference" else getattr(acq, name, None)
        if not value:
            continue
        text = str(value)
        p = Path(text)
        if p.suffix.lower() in (".cfl", ".hdr") or not p.is_file():  # BART: the data and its header
            base = text[:-4] if p.suffix.lower() in (".cfl", ".hdr") else text
            paths = [Path(base + ".cfl"), Path(base + ".hdr")]
        else:
            paths = [p]
        for q in paths:
            if q.is_file():
                st = q.stat()
                out.append([name, str(q.resolve()), st.st_size, st.st_mtime_ns])
    return out


def _json_safe(info: dict) -> dict:
    import json

    return json.loads(json.dumps(info, default=str))


def reconstruct_measured_volume(task, acq, settings, inputs, out, log: Callable[[str], None] = print, *,
                                slices: tuple[int, int], batch: int = DEFAULT_BATCH, fp: str | None = None,
                                label: str | None = None, handle=None) -> dict:
    """Reconstruct slices ``[a, b)`` of the measured file of ``acq`` into ``out`` (module
    docstring); ``handle``: the file as opened by :meth:`Task.measured_slices`.  Returns the
    run record (also ``run.json``)."""
    from forward_models.physics import Measurement
    import recon
    from recon.execute import (check_memory, run_prior, check_samples, noise_text, ood_check, plan_methods,
                               progress_bar, protected_inputs, record_head, run_fingerprint, run_method, warn,
                               working_window_and_size, write_std_maps)
    from recon.io import write_png
    from recon.io.nifti import write_nifti
    from recon.multiscale import scale_record
    from recon.outputs import OutputFolder, fingerprint, write_json, write_text
    from recon.volume import VOLUME_OUTPUTS, _reformat_png, metrics_slices_csv, volume_metrics

    t_start = time.perf_counter()
    (run,) = plan_methods(list(settings.methods), task, settings.params, noisy=acq.noisy)
    check_samples(settings.samples, [run])
    a, b = slices
    n = b - a
    device = settings.device
    what = label or acq.measured
    spacing = getattr(inputs, "slice_spacing", None)
    files = measured_file_signatures(acq)
    fp = fp or fingerprint({"run": run_fingerprint(task, acq, settings, inputs), "files": files,
                            "slice_spacing": spacing})
    folder = OutputFolder(out, inputs=protected_inputs(acq, inputs), reserved=VOLUME_OUTPUTS)
    timings: dict[str, float] = {}
    with folder:
        stage = folder.stage
        t0 = time.perf_counter()
        prior, prior_name = run_prior(run, settings, task, acq)
        window, size = working_window_and_size(acq, settings.size, prior)
        study = task.measured_study(acq, device, size=size, requested_size=settings.size, window=window,
                                    seed=settings.seed, handle=handle)
        if study.n_slices < b:
            raise ReconError(f"{acq.measured}: slices {a}:{b} requested but the file has {study.n_slices}")
        study.validate(a, b)
        # slice coupling: only where the slices share one operator and scale
        coupled = couples_slices(run)
        if not study.batched:
            coupling = f"off: {study.independent}"
            if coupled:
                run = replace(run, options={**run.options, "z_weight": 0.0})
                coupling += f"; {run.name} runs with z_weight=0 (its coupling of neighbouring slices is off)"
                coupled = False
            log(f"{what}: slice coupling {coupling}")
        elif coupled:
            run, z_record = default_z_weight(run, spacing)
            coupling = (f"on: {run.name} couples each batch of consecutive slices (z_weight "
                        f"{z_record['z_weight']:.3g}: {z_record['from']}), with {HALO} "
                        "neighbour slices each side reconstructed and discarded")
            log(f"{what}: slice coupling {coupling}")
        else:
            coupling = f"none: {run.name} reconstructs each slice on its own"
        batch = batch if study.batched else 1
        halo = HALO if coupled and n > 1 else 0
        if size is not None:
            check_memory(size, samples=settings.samples, slices=min(n, batch + 2 * halo))
        timings["open"] = time.perf_counter() - t0
        parts = PartStore(folder.path, fingerprint({"run": fp, "recon": recon.__version__, "files": files}))
        plan = plan_batches(a, b, batch, halo)
        reused = sum(parts.done(k) for k in range(a, b))
        if reused:
            log(f"resuming: {reused} of {n} slice(s) already reconstructed in {parts.folder}")
        log(f"{what}: {run.name} on {n} measured slice(s) {a}:{b} of {study.n_slices}, read {study.how}, "
            + (f"batches of {batch}" if study.batched else "one method call per slice")
            + (f" (+{halo} neighbour slices each side: the method couples slices)" if halo else ""))
        pixel_mm = float(acq.fov) / size if getattr(acq, "fov", None) and size else None
        used, method_seconds, measure_seconds = dict(run.options), 0.0, 0.0
        with progress_bar(settings.progress, n, f"{run.name} slices") as bar:
            if bar is not None and reused:
                bar.update(reused)
            for c0, c1, e0, e1 in plan:
                if all(parts.done(k) for k in range(c0, c1)):
                    continue
                t0 = time.perf_counter()
                metas = [study.measurement(k, reference=c0 <= k < c1, seed=slice_seed(settings.seed, k))
                         for k in range(e0, e1)]
                measure_seconds += time.perf_counter() - t0
                meas = metas[0] if len(metas) == 1 else Measurement(
                    y=torch.cat([m.y for m in metas]), op=metas[0].op,
                    sigma_y=float(np.sqrt(np.mean([m.sigma_y ** 2 for m in metas]))), info=metas[0].info)
                img, std, seconds, used = run_method(run, meas, prior=prior, seed=slice_seed(settings.seed, c0),
                                                     samples=settings.samples, progress=False, task=task.name,
                                                     pixel_mm=pixel_mm, stack=True)
                method_seconds += seconds
                for k in range(c0, c1):
                    i = k - e0
                    parts.save(k, img[i], None if std is None else std[i], seconds / (c1 - c0),  # halo cost included
                               metas[i].reference, info=_json_safe(metas[i].info))
                if bar is not None:
                    bar.update(c1 - c0)
        # assemble from the parts (every slice is there now)
        loaded = [parts.load(k) for k in range(a, b)]
        img = np.stack([p["img"] for p in loaded])
        std = np.stack([p["std"] for p in loaded]) if settings.samples > 1 else None
        infos = [p["info"] for p in loaded]
        refs = [p.get("extra") for p in loaded]
        per_slice_seconds = [float(p["seconds"]) for p in loaded]
        timings["read_and_reference_this_run"] = measure_seconds
        timings["reconstruct"] = float(sum(per_slice_seconds))
        timings["reconstruct_this_run"] = method_seconds
        info0 = infos[0]
        log(f"{what}: {run.name} ({noise_text(info0)}), {n} slice(s) in {timings['reconstruct']:.1f} s "
            f"({timings['reconstruct'] / n:.1f} s per slice)")
        stubs = [Measurement(y=torch.zeros(1), op=study.op, sigma_y=float(i.get("sigma_y") or 0.0), info=i)
                 for i in infos]  # what the per-slice task hooks read
        mid = n // 2
        warnings = task.measurement_warnings(acq, stubs[0])
        for w in warnings:
            warn(task, w)
        prior_scale = scale_record(prior, img.shape[-2:], used) if prior is not None else None
        ood = ood_check(task, prior, img[mid], "reconstruction (measured data, middle slice)", warnings)
        t0 = time.perf_counter()
        metrics = None
        written = []
        if all(r is not None for r in refs):
            ref = np.stack(refs)
            rec_m = np.stack([np.asarray(task.metric_image(img[i], stubs[i])) for i in range(n)])
            metrics = volume_metrics(rec_m, ref)
            metrics.update(data_range=1.0, scale="[0, 1]", reference=info0.get("reference"), slices=[a, b])
            write_json(stage / "metrics.json", metrics)
            write_text(stage / "metrics_slices.csv", metrics_slices_csv(metrics, a, per_slice_seconds))
            written += ["metrics.json", "metrics_slices.csv"]
        elif any(r is not None for r in refs):
            note = (f"only {sum(r is not None for r in refs)} of {n} slices have a reference: no volume metrics")
            warn(task, note)
            warnings.append(note)
        per_slice = [task.output_image(img[i], None, stubs[i], window) for i in range(n)]
        values = np.stack([v for v, _, _ in per_slice]).astype(np.float32)
        shown = np.stack([sh for _, sh, _ in per_slice])
        vmax = per_slice[mid][2]
        px = pixel_mm or 1.0
        dz = float(spacing) if spacing else 1.0
        affine = np.diag([px, px, dz, 1.0])
        write_nifti(values, stage / "recon.nii.gz", affine=affine)
        write_png(shown[mid], stage / "recon.png", vmin=0.0, vmax=vmax)
        written += ["recon.nii.gz", "recon.png"]
        if n > 1:
            _reformat_png(shown, 1, dz / px, stage / "coronal.png", vmax)
            _reformat_png(shown, 2, dz / px, stage / "sagittal.png", vmax)
            written += ["coronal.png", "sagittal.png"]
        std_scale = None
        if std is not None:
            names, std_scale = write_std_maps(stage, std, std[mid], prior, task, run.name, acq, warnings)
            written += names
        timings["write"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        keep = [k for k in info0 if k not in _BULKY]
        per_slice_rows = []
        for i, inf in enumerate(infos):
            row = {"slice": a + i, "seconds": round(per_slice_seconds[i], 4)}
            row.update({k: inf.get(k) for k in keep if k != "slice" and (inf.get(k) != info0.get(k) or k == "scale")})
            per_slice_rows.append(row)
        record = {
            **record_head(task, settings, str(acq.measured)),
            "options": {**acq.settings(), **settings.record(), "method": run.name, "slices": f"{a}:{b}",
                        "batch_slices": batch, "slice_spacing": spacing},
            "method": {"name": run.name, "options": used},
            "prior": prior_name and str(prior_name),
            "prior_scale": prior_scale,
            "out_of_distribution_check": ood,
            "working_size": list(img.shape[-2:]),
            "slices": {"start": a, "stop": b, "count": n, "in_file": study.n_slices, "batch": batch, "halo": halo,
                       "done_this_run": n - int(reused), "resumed": int(reused), "couples_slices": coupled,
                       "read": study.how,
                       "seed_rule": ("slice k (MRI --noise) and a batch starting at slice k (stochastic methods): "
                                     "seed * 1000003 + k (recon.volume.slice_seed)")},
            "slice_coupling": coupling,
            "window": list(window) if task.uses_window(None) else None,
            "units": task.units_label(None),
            "pixel_mm": pixel_mm,
            "slice_spacing_mm": float(spacing) if spacing else None,
            "affine_note": ("in-plane pixel " + (f"--fov / --size = {px:g} mm" if pixel_mm else "unknown: 1")
                            + "; slice spacing " + (f"--slice-spacing {dz:g} mm" if spacing else
                                                    "unknown: 1 (give --slice-spacing MM)")),
            "measurement": info0,
            "measurement_per_slice": per_slice_rows,
            "sigma_y": float(np.sqrt(np.mean([s.sigma_y ** 2 for s in stubs]))),
            "samples": settings.samples,
            "std_calibration": std_scale,
            "metrics": None if metrics is None else {k: v for k, v in metrics.items() if k != "per_slice"},
            "warnings": warnings,
            "timings_seconds": {k: round(v, 4) for k, v in timings.items()},
            "seconds_per_slice": round(timings["reconstruct"] / n, 4),
            "outputs": written + ["run.json"],
            "fingerprint": fp,
        }
        record.update(task.record_extra(stubs[0]))
        write_json(stage / "run.json", record)
    parts.remove()
    return record
