"""One input, one method: ``recon ct | mri | inpaint``.

:func:`reconstruct` runs one case into an output folder: read the input (or
the measured data), bring it to the working scale, simulate the measurement
(or take the measured one), run the method, and write the reconstruction in
the input's units (derived DICOM series or NIfTI), ``recon.png``,
``metrics.json`` (when a ground truth of the same object exists), the task's
extra files and ``run.json`` into a staging folder that is moved into place
only after everything succeeded.  :func:`run_single` adds ``--manifest`` /
``--shard``: one output folder per manifest line, finished lines skipped.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable


from recon.errors import ReconError
from recon.multiscale import scale_record
from recon.execute import (RunSettings, check_memory, check_samples, known_pixel_mm, noise_text, run_prior,
                           ood_check, plan_methods, prepare_truth, protected_inputs, record_head, run_fingerprint,
                           run_method, warn, working_window_and_size, write_std_maps)
from recon.io._util import short
from recon.outputs import (EXTRA_METRIC_COLUMNS, OutputFolder, entry_name, fingerprint, metrics_csv_text, parse_shard,
                           read_manifest, select_shard, split_manifest_line, write_json, write_text)

__all__ = ["Inputs", "reconstruct", "reconstruct_any", "run_single", "SINGLE_OUTPUTS"]

SINGLE_OUTPUTS = ("recon.nii.gz", "recon.png", "metrics.json", "run.json", "sinogram.npy", "observed.png",
                  "std.npy", "std.png", "std_calibrated.npy", "dicom")


@dataclass(frozen=True)
class Inputs:
    """Where the ground truth comes from: a file or folder (``path``), a DICOM
    series in a folder holding several, and which slices of a volume: one
    (``slice``) or a range (``slices``, default every slice, reconstructed
    ``batch`` at a time by :mod:`recon.volume`).  Measured data are named by the
    acquisition instead."""

    path: str | None = None
    series: str | None = None
    slice: int | None = None
    #: a multi-slice input: which slices (``all`` by default, ``a:b``; see recon.volume)
    slices: str | None = None
    #: slices per method call for a multi-slice input
    batch: int = 16
    #: measured multi-slice data: slice spacing in mm for the NIfTI affine (None: unknown, 1)
    slice_spacing: float | None = None


def reconstruct(task, acq, settings: RunSettings, inputs: Inputs, out, log: Callable[[str], None] = print, *,
                fp: str | None = None, label: str | None = None, volume=None, measured_handle=None) -> dict:
    """Reconstruct one case into ``out`` (staged); returns the run record (also ``run.json``).
    ``volume``: the input already read (:func:`reconstruct_any`), not read again; likewise
    ``measured_handle``: the measured file as :meth:`Task.measured_slices` opened it."""
    from recon.case import load_source
    from recon.io import write_npy, write_png
    from recon.io.derived import write_image_outputs

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    (run,) = plan_methods(list(settings.methods), task, settings.params, noisy=acq.noisy)
    check_samples(settings.samples, [run])
    measured = acq.measured
    if measured and inputs.path:
        raise ReconError("give either an INPUT image (simulated measurement) or measured data "
                         f"({measured}), not both")
    if not measured and not inputs.path:
        extra = {"ct": " or --sinogram FILE", "mri": " or --kspace FILE"}.get(task.name, "")
        raise ReconError(f"an INPUT image is required{extra}")
    device = settings.device
    dicom_folders = [Path(inputs.path)] if inputs.path and Path(inputs.path).is_dir() else []
    folder = OutputFolder(out, inputs=protected_inputs(acq, inputs), reserved=SINGLE_OUTPUTS,
                          dicom_folders=dicom_folders)
    with folder:
        stage = folder.stage
        t0 = time.perf_counter()
        source = None
        if inputs.path:
            source = load_source(inputs.path, inputs.series, inputs.slice, volume=volume)
            task.check_source(source, settings.force_modality)
        prior, prior_name = run_prior(run, settings, task, acq, source)
        window, size = working_window_and_size(acq, settings.size, prior)
        if size is not None or source is not None:
            check_memory(size if size is not None else min(source.image.shape[-2:]), samples=settings.samples,
                         native=size is None)
        truth, geometry_note = None, None
        if measured:
            meas = task.measured(acq, device, size=size, requested_size=settings.size, window=window,
                                 seed=settings.seed, slice_index=inputs.slice,
                                 **({} if measured_handle is None else {"handle": measured_handle}))
            timings["load"] = time.perf_counter() - t0
        else:
            truth, acq, geometry_note = prepare_truth(task, acq, source, size, window, log)
            timings["load"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            op = acq.operator(truth.shape, device, seed=settings.seed)
            timings["operator"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            meas = task.simulate(truth, acq, device, seed=settings.seed, op=op)
            meas.reference = truth.x
            timings["simulate"] = time.perf_counter() - t0
        log(f"{label or inputs.path or measured}: {run.name} on {tuple(meas.op.in_shape)} "
            f"({noise_text(meas.info)}, sigma_y={meas.sigma_y:.3g})")
        warnings = task.measurement_warnings(acq, meas)
        for w in warnings:
            warn(task, w)
        pixel_mm = known_pixel_mm(truth, acq, size)
        img, std, seconds, used = run_method(run, meas, prior=prior, seed=settings.seed, samples=settings.samples,
                                             progress=settings.progress, task=task.name, pixel_mm=pixel_mm)
        prior_scale = (scale_record(prior, meas.op.in_shape, used)
                       if prior is not None else None)
        if prior_scale is not None:
            text = (f"prior scale: {prior_scale['scale_factor']:g} data pixels per prior pixel "
                    f"({prior_scale['scale_from']}); {prior_scale['action']}")
            if "WARNING" in text:
                warn(task, text)
                warnings.append(text)
            else:
                log(text)
        # is the input like the prior's training images? (recon.ood)
        ood = ood_check(task, prior, truth.x if truth is not None else img,
                        "input image" if truth is not None else "reconstruction (measured data)", warnings)
        timings["reconstruct"] = seconds
        t0 = time.perf_counter()
        metrics = None
        if meas.reference is not None:
            from recon.metrics import compute_metrics

            metrics = compute_metrics(task.metric_image(img, meas), meas.reference)
            metrics.update(data_range=1.0, scale="[0, 1]", reference=meas.info.get("reference", "input image"))
            if truth is not None:
                metrics.update(task.extra_metrics(img, truth))
            write_json(stage / "metrics.json", metrics)
        method_settings = {"task": task.name, "method": run.name, **{k: v for k, v in used.items()
                                                                      if k != "callback"}}
        values, shown, vmax = task.output_image(img, truth, meas, window)
        written = write_image_outputs(stage, values, truth, run.name, method_settings)
        write_png(shown, stage / "recon.png", vmin=0.0, vmax=vmax)
        written.append("recon.png")
        for name, (kind, arr) in task.extra_outputs(meas).items():
            (write_npy if kind == "npy" else lambda a, p: write_png(a, p, vmin=0.0, vmax=1.0))(arr, stage / name)
            written.append(name)
        std_scale = None
        if std is not None:
            names, std_scale = write_std_maps(stage, std, std, prior, task, run.name, acq, warnings)
            written += names
        if metrics is not None:
            written.append("metrics.json")
        timings["write"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        record = {
            **record_head(task, settings, str(inputs.path or measured)),
            "options": {**acq.settings(), **settings.record(), "method": run.name, "series": inputs.series,
                        "slice": inputs.slice},
            "geometry": geometry_note,
            "method": {"name": run.name, "options": used},
            "prior": prior_name and str(prior_name),
            "prior_scale": prior_scale,
            "out_of_distribution_check": ood,
            "working_size": list(meas.op.in_shape),
            "window": list(window) if task.uses_window(truth) else None,
            "units": task.units_label(truth),
            "pixel_mm": truth.pixel_mm if truth is not None else None,
            "measurement": meas.info,
            "sigma_y": meas.sigma_y,
            "samples": settings.samples,
            "std_calibration": std_scale,
            "metrics": metrics,
            "warnings": warnings,
            "timings_seconds": {k: round(v, 4) for k, v in timings.items()},
            "outputs": written + ["run.json"],
            "fingerprint": fp or run_fingerprint(task, acq, settings, inputs),
        }
        if truth is not None:
            record["input_slice"] = truth.source.slice_index
            record["crop"] = list(truth.crop)
        record.update(task.record_extra(meas))
        write_json(stage / "run.json", record)
    return record


def reconstruct_any(task, acq, settings: RunSettings, inputs: Inputs, out, log: Callable[[str], None] = print, *,
                    fp: str | None = None, label: str | None = None) -> dict:
    """One slice (:func:`reconstruct`) or, for a multi-slice input without ``--slice``, every
    slice in ``--slices`` (:func:`recon.volume.reconstruct_volume`; measured data:
    :func:`recon.measured_volume.reconstruct_measured_volume`)."""
    if inputs.slices is not None and inputs.slice is not None:
        raise ReconError("give either --slice I (one slice) or --slices a:b, not both")
    if inputs.slice_spacing is not None and not acq.measured:
        raise ReconError("--slice-spacing describes measured data (--sinogram / --kspace); an image input "
                         "carries its own slice spacing")
    if inputs.path and not acq.measured and inputs.slice is None:
        from recon.io import read_input
        from recon.volume import parse_slices, reconstruct_volume

        vol = read_input(inputs.path, series_uid=inputs.series)
        a, b = parse_slices(inputs.slices, vol.n_slices, inputs.path)
        if vol.n_slices > 1 and b - a > 1:
            return reconstruct_volume(task, acq, settings, inputs, out, log, slices=(a, b), batch=inputs.batch,
                                      fp=fp, label=label, volume=vol)
        return reconstruct(task, acq, settings, replace(inputs, slice=a), out, log, fp=fp, label=label, volume=vol)
    if acq.measured and inputs.slice is None and not inputs.path:
        from recon.measured_volume import reconstruct_measured_volume
        from recon.volume import parse_slices

        n, handle = task.measured_slices(acq)
        a, b = parse_slices(inputs.slices, n, acq.measured)
        if b - a > 1:
            return reconstruct_measured_volume(task, acq, settings, inputs, out, log, slices=(a, b),
                                               batch=inputs.batch, fp=fp, label=label, handle=handle)
        if n > 1:  # one slice of a multi-slice file: the single-slice path, as --slice a
            inputs = replace(inputs, slice=a)
        return reconstruct(task, acq, settings, inputs, out, log, fp=fp, label=label, measured_handle=handle)
    return reconstruct(task, acq, settings, inputs, out, log, fp=fp, label=label)


def run_single(task, acq, settings: RunSettings, inputs: Inputs, out, log: Callable[[str], None] = print, *,
               manifest: str | None = None, shard: str | None = None) -> int:
    """``recon ct|mri|inpaint``: one input, or a manifest shard."""
    if manifest:
        return _run_manifest(task, acq, settings, inputs, out, log, manifest, shard)
    if shard:
        raise ReconError("--shard needs --manifest FILE (the list of inputs to split)")
    record = reconstruct_any(task, acq, settings, inputs, Path(out), log)
    m = record.get("metrics")
    if m:
        where = f" over {record['slices']['count']} slices" if record.get("slices") else ""
        log(f"{record['method']['name']}: PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f}, NMSE {m['nmse']:.3g}"
            f"{where} ({record['timings_seconds']['reconstruct']:.2f} s)")
    log(f"wrote {out}")
    return 0


def _run_manifest(task, acq, settings, inputs, out, log, manifest, shard_text) -> int:
    shard = parse_shard(shard_text)
    entries = select_shard(read_manifest(manifest), shard)
    if inputs.path or acq.measured:
        raise ReconError("--manifest replaces the INPUT argument; give one or the other")
    out = Path(out)
    folder = OutputFolder(out, inputs=[split_manifest_line(e)[0] for _, e in entries],
                          reserved=[entry_name(i, e) for i, e in entries], staged=False)
    folder.prepare()
    base_fp = run_fingerprint(task, acq, settings, inputs)

    def line_fp(entry):  # a line with its own --slices range has its own fingerprint
        slices = split_manifest_line(entry)[1]
        return base_fp if slices is None else fingerprint({"base": base_fp, "slices": slices})

    fps = {line_fp(e) for _, e in read_manifest(manifest)}  # every shard's lines, for the table
    done, skipped, failed = [], [], []
    for index, entry in entries:
        name = entry_name(index, entry)
        fp = line_fp(entry)
        case_out = out / name
        marker = case_out / "run.json"
        if not settings.force and marker.is_file():
            try:
                if json.loads(marker.read_text()).get("fingerprint") == fp:
                    skipped.append(name)
                    log(f"{name}: done already, skipped")
                    continue
            except (OSError, ValueError):
                pass
        path, slices = split_manifest_line(entry)
        case_acq, case_inputs = task.manifest_entry(acq, inputs, path)
        if slices is not None:
            case_inputs = replace(case_inputs, slices=slices)
        try:
            reconstruct_any(task, case_acq, settings, case_inputs, case_out, log, fp=fp, label=f"{name} ({entry})")
            done.append(name)
        except Exception as e:  # noqa: BLE001 - log and go on with the next case
            if settings.debug:
                raise
            failed.append({"case": name, "input": entry, "error": f"{e}" if isinstance(e, ReconError)
                           else short(e)})
            print(f"recon {task.name}: {name} ({entry}): error: {failed[-1]['error']}", file=sys.stderr)
    # aggregate every finished case with these settings (all shards)
    rows = []
    for run_json in sorted(out.glob("*/run.json")):
        try:
            rec = json.loads(run_json.read_text())
        except (OSError, ValueError):
            continue
        if rec.get("fingerprint") not in fps or not rec.get("metrics"):
            continue
        m = rec["metrics"]
        rows.append({"case": run_json.parent.name, "method": rec["method"]["name"], "psnr": m["psnr"],
                     "ssim": m["ssim"], "nmse": m["nmse"],
                     "seconds": rec["timings_seconds"].get("reconstruct", float("nan")),
                     **{k: m[k] for k in EXTRA_METRIC_COLUMNS if k in m}})
    if rows:
        write_text(out / "metrics.csv", metrics_csv_text(rows))
    i, n = shard
    write_json(out / f"shard-{i}-of-{n}.json", {"manifest": str(manifest), "shard": [i, n],
                                                "done": done, "skipped": skipped, "failed": failed,
                                                "fingerprint": fp})
    log(f"shard {i}/{n}: {len(done)} done, {len(skipped)} skipped, {len(failed)} failed")
    return 1 if failed else 0
