"""Task kinds: ``ct``, ``mri`` and ``inpaint``.

A task kind (one object each in :data:`TASKS`) knows what differs between the
imaging problems, so that the runners (:mod:`recon.single`,
:mod:`recon.compare`) never branch on a task's name:

* its acquisition type (:mod:`recon.acquisition`) and default prior;
* how an input image in native units becomes a ground truth on the [0, 1]
  working scale (:meth:`Task.prepare`, conventions in :mod:`recon.preprocess`)
  and how a reconstruction goes back to the input's units
  (:meth:`Task.output_image`);
* how a measurement is simulated (:meth:`Task.simulate`: operator + noise
  model from :mod:`forward_models.physics`) or read from a file
  (:meth:`Task.measured`); both give one :class:`forward_models.Measurement`;
* the per-method defaults tuned on validation cases that are not reported
  (:meth:`Task.default_options`) and the task's extra outputs (the simulated
  sinogram, the observed image).

Intensity conventions
---------------------
* CT: Hounsfield units are windowed to [0, 1] (``(HU - lo) / (hi - lo)``,
  clipped below ``lo`` only: bone and metal above ``hi`` keep values > 1, so
  the simulated line integrals and the output HU are not truncated).  The window is ``--window`` if given, else the score prior's
  window when a score method runs, else (-1000, 1000).  Which inputs are in
  HU (``--units auto``): DICOM with Modality CT; NIfTI and ``.npy`` whose
  minimum is below -100 (air is -1000 HU).  Other inputs (PNG/JPEG/TIFF,
  non-negative arrays, non-CT DICOM) are display intensities and are divided
  by their maximum (their [0, 1] values are then read as windowed HU for the
  CT physics).  ``--units hu|intensity`` overrides the guess.
* MRI: magnitude divided by its maximum.
* Inpainting: the CT window for DICOM CT input, else divided by the maximum.
* MRI and inpainting keep the input's matrix, square or not; CT takes the largest centred
  square.  ``--size S`` takes the centred square and resizes it (anti-aliased) to ``S`` x ``S``.

Noise: CT ``--photons I0`` simulates photon counts on physical line integrals
(:class:`forward_models.physics.LowDoseCT`; the pixel size comes from
``--fov``, else the input's pixel spacing times the cropped native size, else
1 mm per native pixel).  ``--noise SIGMA`` (every task) adds Gaussian noise of
std ``SIGMA * rms(A x)`` over the measured entries.  ``sigma_y``, the noise std
in the units of ``y``, is passed to the methods that accept it.

Measured sinograms (``recon ct --sinogram FILE``)
------------------------------------------------
The file is ``(views, detectors)``, or a stack ``(slices, views, detectors)`` whose slices
share one geometry (read through a memory map, one slice at a time:
:class:`MeasuredSinograms`; every slice is reconstructed as a study by
:mod:`recon.measured_volume`, one with ``--slice I``).  ``--sinogram-units image``: ``y = A x`` for
the working image with unit pixels; ``attenuation``: post-log line integrals
(mu in 1/mm times mm), mapped to image units with the window and the pixel
size ``--fov / --size`` (1 mm without ``--fov``); ``counts`` (implied by
``--flat``): raw counts, converted first by ``p = -log(max(I - D, e) /
max(F - D, e))`` with ``e = 1e-6 * max(F - D)`` (for a stack ``F`` and ``D`` are shared
by every slice, or one per slice: ``(slices, views|1, detectors)``)
(:func:`recon.acquisition.log_transform`; clamped entries counted in
``info['prelog']``), then read as attenuation.  View angles: ``--angles
FILE`` (``--angle-units deg|rad``, one per view, distinct modulo 360 degrees),
else equispaced over 180 (parallel) / 360 (fan) degrees or ``--limited-angle``.
Detector: as many pixels as the file has, spaced ``--det-spacing / (--fov /
--size)`` image pixels (parallel beam: the spacing at the rotation axis; fan
beam: on the detector, at ``--detector-distance`` from the source), else 1
pixel (parallel) or the magnification (fan).  ``--views N`` keeps ``N`` views
spread evenly over the angles (:func:`recon.acquisition.select_views`; indices
and angles in ``info``), and ``--reference full[:METHOD]`` reconstructs all
measured views as the reference of ``metrics.json`` (:meth:`CTTask._full_reference`).
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from forward_models.physics import Measurement, Physics, ct_line_integral_coefficients
from recon.acquisition import CTAcquisition, InpaintAcquisition, MRIAcquisition
from recon.case import Source, Truth, check_finite
from recon.errors import ReconError
from recon.preprocess import CT_WINDOW, hu_to_unit, square_resize, unit_to_hu

__all__ = ["TASKS", "Task", "CTTask", "MRITask", "InpaintTask", "MeasuredSinograms", "MeasuredKSpaces"]


class Task:
    """What differs between task kinds (see the module docstring)."""

    name = ""
    description = ""
    acquisition_type: type = object
    #: method -> default options (only those a method accepts are passed)
    method_defaults: dict[str, dict] = {}
    noisy_method_defaults: dict[str, dict] = {}
    #: what the reconstruction's values are when there is no ground truth
    measured_units = "intensity"
    #: the DICOM Modality this task reconstructs (None: any); see :meth:`check_source`
    dicom_modality: str | None = None

    def check_source(self, source: Source, force: bool = False) -> None:
        """Refuse a DICOM input of the other imaging modality (MR for CT, CT for MRI) unless
        ``force`` (``--force-modality``): its intensities and the simulated physics would not match."""
        expected = self.dicom_modality
        found = (source.modality or "").upper()
        if force or expected is None or source.fmt != "dicom" or found not in ("CT", "MR") or found == expected:
            return
        other = {"CT": "ct", "MR": "mri"}[found]
        raise ReconError(f"{source.path}: the DICOM Modality is {found} but the {self.name} task expects {expected} "
                         f"images; use `recon {other}` (or `recon compare {other}`), or pass --force-modality to "
                         f"reconstruct it as {expected} anyway")

    def measurement_warnings(self, acq, meas: Measurement) -> list[str]:
        """Things the user should know about the measurement actually made (one line each)."""
        return []

    # -- intensities -----------------------------------------------------------
    def units_for(self, source: Source, mode: str) -> str:
        return "intensity"

    def default_prior(self, source: Source | None, mode: str = "auto") -> str:
        raise NotImplementedError

    #: without --size, keep the input's own matrix, square or not (MRI, inpainting); False: the
    #: largest centred square (CT: the operators reconstruct a square image)
    native_shape = False

    def prepare(self, source: Source, size: int | None, window=None, units: str = "auto",
                fov_mm: float | None = None) -> Truth:
        """Normalise ``source`` (one slice or a stack) to [0, 1]; with ``size`` take the centred
        square and resize it to ``size`` x ``size``; without, keep the native matrix
        (:attr:`native_shape`) or its centred square."""
        stack = source.image if source.image.ndim == 3 else source.image[None]
        h, w = stack.shape[-2:]
        if size is None and self.native_shape:
            top, left, rows, cols = 0, 0, h, w

            def fit(img):
                return np.ascontiguousarray(img, dtype=np.float32)
        else:
            m = min(h, w)
            top, left, rows, cols = (h - m) // 2, (w - m) // 2, m, m

            def fit(img):
                return square_resize(img, size)
        kind = self.units_for(source, units)
        if kind == "HU":
            win = tuple(float(v) for v in (window or CT_WINDOW))
            x = np.stack([hu_to_unit(fit(img), win, full_range=True) for img in stack])
            scale = 1.0
        else:
            scale = float(np.abs(stack).max())
            if scale <= 0:
                raise ReconError(f"{source.path}: the image is all zero; nothing to reconstruct")
            x = np.stack([np.clip(fit(np.abs(img) / scale), 0, 1).astype(np.float32) for img in stack])
            win = window or CT_WINDOW  # intensities read as windowed HU for CT physics
        x = x if source.image.ndim == 3 else x[0]
        W = x.shape[-1]
        pixel_mm = float(fov_mm) / W if fov_mm is not None else (source.dx or 1.0) * cols / W
        return Truth(x=x, source=source, units=kind, scale=scale, window=win, crop=(top, left, rows, cols),
                     pixel_mm=pixel_mm)

    # -- measurements ------------------------------------------------------------
    def simulate(self, truth: Truth, acq, device, seed: int = 0, op=None) -> Measurement:
        """``y = noise(A x)`` for the ground truth, seeded by ``seed`` (``op``: reuse an operator)."""
        op = op if op is not None else acq.operator(truth.shape, device, seed=seed)
        gen = torch.Generator(device=device).manual_seed(seed)
        sim = acq.simulation_operator(op)
        meas = Physics(sim, acq.noise_model(truth.window, truth.pixel_mm)).simulate(truth.batch(device), gen)
        if sim is not op:  # data from another operator than the one that reconstructs (no inverse crime)
            meas.op = op
            meas.info["simulated_with"] = f"{type(sim).__name__}({sim.extra_repr()})"
        self._annotate(meas)
        return meas

    def _annotate(self, meas: Measurement) -> None:
        pass

    def measured(self, acq, device, *, size: int | None, requested_size: int | None, window, seed: int = 0,
                 slice_index: int | None = None) -> Measurement:
        """Measured data named by the acquisition (``size``: the working size; ``requested_size``:
        the user's ``--size``), as a :class:`Measurement` with a reference image when one exists."""
        raise ReconError(f"{self.name}: no measured-data input for this task")

    def measured_slices(self, acq) -> tuple[int, object]:
        """``(slices in the measured file, handle)``; the handle (the file opened, or None) goes
        back to :meth:`measured_study`.  Read as little as the format allows."""
        return 1, None

    def measured_study(self, acq, device, *, size, requested_size, window, seed=0, handle=None):
        """Every slice of a multi-slice measured file (:mod:`recon.measured_volume`): an object
        with ``n_slices``, ``batched`` (slices share one operator and scale: several go to a
        method as one batch; else each alone), ``independent`` (why they are reconstructed
        independently, or None), ``how`` (how the file is read), ``op`` (the shared operator or
        None), ``validate(start, stop)`` (refuse bad slices up front where that is cheap) and
        ``measurement(k, reference=True, seed=None)`` -> the :class:`Measurement` of slice ``k``
        (``seed``: that slice's seed for anything random, e.g. MRI ``--noise``)."""
        raise ReconError(f"{self.name}: no multi-slice measured-data input for this task")

    def manifest_entry(self, acq, inputs, entry: str):
        """``(acquisition, inputs)`` for one manifest line: by default an input image."""
        return acq, replace(inputs, path=entry)

    def default_options(self, method: str, noisy: bool = False) -> dict:
        """Per-method defaults, tuned on validation cases that are not reported (README)."""
        if method == "tv3d" and "tv3d" not in self.method_defaults:
            method = "tv"  # 3-D TV (issue #11) is tv with z_weight: it takes tv's settings
        table = self.noisy_method_defaults if noisy and self.noisy_method_defaults else self.method_defaults
        return dict(table.get(method, self.method_defaults.get(method, {})))

    # -- outputs -----------------------------------------------------------------
    def metric_image(self, img: np.ndarray, meas: Measurement) -> np.ndarray:
        """The reconstruction as scored against the reference (default: as is)."""
        return img

    def output_image(self, img: np.ndarray, truth: Truth | None, meas: Measurement, window):
        """``(values in the input's units, image for recon.png, its display maximum)``: CT in HU
        clipped only below the window (full range above it: bone and metal are kept), intensities
        clipped to [0, 1]; then back to HU or intensity."""
        hu = truth is None or truth.units == "HU"
        img01 = np.clip(img, 0, None if hu else 1)
        if truth is not None:
            return truth.to_units(img01), img01, 1.0
        return unit_to_hu(img01, window), img01, 1.0

    def extra_outputs(self, meas: Measurement) -> dict:
        """Task-specific files: name -> (``'npy'`` | ``'png'``, array)."""
        return {}

    def extra_metrics(self, img: np.ndarray, truth: Truth | None) -> dict:
        """Metrics beyond PSNR/SSIM/NMSE on the [0, 1] scale (CT: HU and clinical windows)."""
        return {}

    def acquisition_for(self, acq, truth: Truth):
        """The acquisition for this input (CT: the scanner's fan-beam geometry from DICOM tags),
        and a note for the run record (None: unchanged)."""
        return acq, None

    def record_extra(self, meas: Measurement) -> dict:
        return {}

    def units_label(self, truth: Truth | None) -> str:
        return truth.units if truth is not None else self.measured_units

    def uses_window(self, truth: Truth | None) -> bool:
        return truth is None or truth.units == "HU"


# ---------------------------------------------------------------------------
class CTTask(Task):
    name = "ct"
    description = "sparse-view / limited-angle CT (parallel or fan beam)"
    acquisition_type = CTAcquisition
    measured_units = "HU"
    dicom_modality = "CT"
    # tuned on totalseg_example_j2k slices 5 and 15 at 128 px (23/60 views; I0 = 1e5 for noisy).
    # Noise-free: lam 1e-5 / 3e-6 / 1e-6 / 3e-7 / 1e-7 / 1e-8 gave 34.9 / 35.0 / 35.1 / 35.1 / 35.2 / 31.6 dB
    # at 23 views and 43.4 / 44.6 / 45.1 / 45.8 / 46.4 / 46.0 dB at 60 views: with exact data TV works
    # best as "min TV subject to A x = y" (below 1e-7, 2000 iterations no longer converge at 23 views).
    method_defaults = {
        "tv": {"lam": 1e-7, "n_iter": 2000, "clip": (0.0, None)},
        "sirt": {"n_iter": 300},
    }
    noisy_method_defaults = {
        "tv": {"lam": 3e-4, "n_iter": 1000, "clip": (0.0, None)},
    }

    def units_for(self, source, mode):
        if mode == "hu":
            return "HU"
        if mode == "intensity":
            return "intensity"
        if source.fmt == "dicom":
            return "HU" if (source.modality or "").upper() == "CT" else "intensity"
        if source.fmt == "nifti" or source.path.lower().endswith(".npy"):
            return "HU" if float(np.min(source.image)) < -100 else "intensity"
        return "intensity"

    def default_prior(self, source=None, mode="auto"):
        return "ct"

    def acquisition_for(self, acq, truth):
        return acq.with_scanner_geometry(truth.source, truth.crop[3])

    def extra_metrics(self, img, truth):
        if truth is None or truth.units != "HU":
            return {}
        from recon.metrics import hu_metrics

        return hu_metrics(truth.to_units(np.clip(img, 0, None)), truth.to_units(truth.x))

    def measured(self, acq: CTAcquisition, device, *, size, requested_size=None, window, seed=0,
                 slice_index=None) -> Measurement:
        """A measured sinogram from ``--sinogram FILE`` (no ground truth; module docstring,
        "Measured sinograms"): raw counts converted to line integrals (``--flat``/``--dark``),
        the views at ``--angles`` (else equispaced), an evenly spread subset of ``--views N``,
        and with ``--reference full`` the reconstruction of all measured views as the reference.
        A stack ``(slices, views, detectors)`` gives slice ``slice_index`` (default the middle one)."""
        sinograms = self.measured_sinograms(acq, device, size=size, window=window)
        if not sinograms.stack:
            return sinograms.measurement(0)
        n = sinograms.n_slices
        k = n // 2 if slice_index is None else int(slice_index)
        if not 0 <= k < n:
            raise ReconError(f"{sinograms.path}: --slice {slice_index} out of range; the sinogram stack has {n} "
                             f"slice(s) (valid: 0..{n - 1})")
        return sinograms.measurement(k)

    def measured_slices(self, acq):
        from recon.io.images import npy_shape

        try:
            shape, _ = npy_shape(Path(acq.sinogram))
        except ReconError:  # reported by the reader, with the single-slice path's message
            return 1, None
        return (shape[0] if len(shape) == 3 else 1), None

    def measured_study(self, acq, device, *, size, requested_size=None, window, seed=0, handle=None):
        return self.measured_sinograms(acq, device, size=size, window=window)

    def measured_sinograms(self, acq: CTAcquisition, device, *, size, window) -> "MeasuredSinograms":
        """The measured sinogram file opened for reading one slice at a time (:class:`MeasuredSinograms`)."""
        if size is None:
            raise ReconError("--size S is required with --sinogram (the reconstructed image is SxS)")
        return MeasuredSinograms(self, acq, device, size, window)

    def _full_reference(self, acq: CTAcquisition, y, op, size: int, window):
        """``--reference full[:METHOD]``: the reconstruction of every measured view, on the working
        scale (clipped as the outputs are).  ``full`` picks FBP when the full set is dense (at
        least one view per image column and no angular gap of more than 8x the median gap,
        FBP's missing-wedge rule in :mod:`recon.fbp`), else TV with the measured-data defaults."""
        from recon.methods import run as run_method_by_name

        method = acq.reference_method()
        why = "forced by --reference"
        if method == "auto":
            a = np.sort(np.mod(op.geom.angles, acq.period))
            gaps = np.diff(np.concatenate([a, [a[0] + acq.period]]))
            median = float(np.median(gaps[gaps > 1e-12])) if (gaps > 1e-12).any() else acq.period
            dense = len(a) >= size and float(gaps.max()) <= 8 * median
            method = "fbp" if dense else "tv"
            why = ("the full set is dense: >= one view per image column, no missing wedge" if dense else
                   "the full set is not dense enough for FBP (fewer views than image columns, or a missing "
                   "wedge)")
        options = self.default_options(method, noisy=acq.noisy)
        with torch.no_grad():
            img = run_method_by_name(method, y, op, **options)
        img = img[0].detach().float().cpu().numpy()
        img01 = self.output_image(img, None, None, window)[1].astype(np.float32)
        opts = ", ".join(f"{k}={v}" for k, v in options.items()) or "default options"
        text = (f"{method} reconstruction of all {op.n_views} measured views ({opts}; {why}), on the working "
                "scale")
        return img01, text, method

    def measurement_warnings(self, acq, meas):
        """Measured sinograms: angle units that look wrong, a detector that does not cover the image
        (truncated projections) or is far wider than it, a reference made from the same views."""
        info = meas.info
        if info.get("model") != "measured":
            return []
        out = []
        deg = np.asarray(info.get("angles_deg", []), dtype=np.float64)
        span = float(deg.max() - deg.min()) if deg.size > 1 else 0.0
        if info.get("angle_units") == "deg" and deg.size >= 8 and 0 < span <= 2 * math.pi * 1.001:
            out.append(f"the {deg.size} view angles of {info['angles_file']} span only {span:.3g} degrees: if the "
                       "file holds radians, pass --angle-units rad")
        if info.get("angle_units") == "rad" and span > 361:
            out.append(f"the view angles of {info['angles_file']} span {span / 57.29578:.4g} radians "
                       f"({span:.4g} degrees): if the file holds degrees, pass --angle-units deg")
        det = info.get("detector", {})
        width, size = det.get("width_at_axis_pixels"), meas.op.in_shape[-1]
        if width is not None and width < size * (1 - 1e-6):
            out.append(f"the detector spans {width:.4g} image pixels at the rotation axis ({det['n_det']} pixels) but "
                       f"the image is {size} pixels wide: an object wider than the detector gives truncated "
                       "projections; check --det-spacing/--fov/--size")
        elif width is not None and det.get("det_spacing_mm") is None and width > 2 * math.sqrt(2) * size:
            out.append(f"the detector spans {width:.4g} image pixels at the rotation axis, more than twice the "
                       f"image diagonal ({det['n_det']} pixels at 1 pixel each): if the sinogram was measured at "
                       "another resolution, give --det-spacing MM and --fov MM")
        if info.get("reference") and "selected_views" not in info:
            out.append("--reference full without --views N: the reference is reconstructed from the same views "
                       "as the result, so the metrics measure agreement with it, not accuracy")
        return out

    def extra_outputs(self, meas):
        return {"sinogram.npy": ("npy", meas.y[0].float().cpu().numpy())}


class MeasuredSinograms:
    """A measured sinogram file, ``(views, detectors)`` or a stack ``(slices, views,
    detectors)`` sharing one geometry, opened as a memory map: the operator, view selection
    and pre-log fields are set up once, :meth:`measurement` reads and converts one slice.

    Attributes: ``path``, ``stack`` (3-D file), ``n_slices``, ``op`` (the operator of the
    selected views), ``info`` (what every slice shares); as a study (:meth:`Task.measured_study`)
    its slices go to a method as one batch."""

    batched = True
    independent = None
    how = "one slice at a time (memory-mapped .npy)"

    def __init__(self, task: "CTTask", acq: CTAcquisition, device, size: int, window):
        from recon.acquisition import read_angles, read_detector_field, select_views
        from recon.io import open_npy

        self.task, self.acq, self.device, self.size, self.window = task, acq, device, size, tuple(window)
        path = self.path = Path(acq.sinogram)
        arr = open_npy(path)
        if np.iscomplexobj(arr) or arr.ndim not in (2, 3):
            raise ReconError(f"{path}: expected a real sinogram (views, detectors) or a stack of them (slices, "
                             f"views, detectors), got {'complex ' if np.iscomplexobj(arr) else ''}shape "
                             f"{arr.shape}")
        self.arr, self.stack = arr, arr.ndim == 3
        self.n_slices = arr.shape[0] if self.stack else 1
        n_meas, n_det = arr.shape[-2:]
        info = {"model": "measured", "file": str(path), "sinogram_units": acq.sinogram_units,
                "measured_views": n_meas}
        if self.stack:
            info["slices_in_file"] = self.n_slices
        self.flat = self.dark = None
        if acq.sinogram_units == "counts":
            stack_n = self.n_slices if self.stack else None
            self.flat = read_detector_field(acq.flat, "--flat", n_meas, n_det, stack_n)
            self.dark = read_detector_field(acq.dark, "--dark", n_meas, n_det, stack_n) if acq.dark else None
        if acq.angles:
            angles = read_angles(acq.angles, acq.angle_units, n_meas)
            info.update(angles_file=str(acq.angles), angle_units=acq.angle_units)
        else:
            angles = acq.view_angles(n_meas).double().numpy()
            arc = acq.limited_angle if acq.limited_angle is not None else math.degrees(acq.period)
            info["angles_from"] = f"{n_meas} equispaced views over [0, {arc:g}) degrees (no --angles)"
        if acq.views is not None and acq.views > n_meas:
            raise ReconError(f"{path}: --views {acq.views} but the sinogram has only {n_meas} measured views "
                             f"({'second' if self.stack else 'first'} axis); choose --views N <= {n_meas} to "
                             "select a sparse subset, or leave it out to use every view")
        keep = np.arange(n_meas) if acq.views is None else select_views(angles, acq.views, acq.period)
        if len(keep) < n_meas:
            info.update(selected_views=[int(i) for i in keep],
                        selection=f"{len(keep)} of {n_meas} views: ordered by angle modulo "
                                  f"{math.degrees(acq.period):g} degrees, positions floor(k * {n_meas} / "
                                  f"{len(keep)} + 1/2), k = 0..{len(keep) - 1}")
        info["views"] = len(keep)
        info["angles_deg"] = [round(float(v), 6) for v in np.rad2deg(angles[keep])]
        self.det_px = acq.det_spacing_pixels(size)
        self.angles, self.keep, self.n_meas, self.n_det = angles, keep, n_meas, n_det
        op = self.op = self._operator(angles[keep])
        magnification = getattr(op, "detector_distance", 1.0) / getattr(op, "source_distance", 1.0)
        info["detector"] = {"n_det": n_det, "det_spacing_mm": acq.det_spacing, "det_spacing_pixels": op.det_spacing,
                            "width_at_axis_pixels": n_det * op.det_spacing / magnification,
                            "spacing_measured": "on the detector (fan beam)" if acq.geometry == "fan" else
                                                "at the rotation axis (parallel beam)"}
        self.physical = acq.sinogram_units in ("attenuation", "counts")  # line integrals: y = (p - b A(1)) / a
        if self.physical:
            pixel_mm = (acq.fov / size) if acq.fov else 1.0
            self.a, self.b = ct_line_integral_coefficients(window, pixel_mm)
            info.update(pixel_mm=pixel_mm, a=self.a, b=self.b, window=list(window))
        self.sigma_y = float(acq.sigma_y or 0.0)
        info["sigma_y"] = self.sigma_y
        self.info = info
        self._offsets: dict = {}
        self._full_op = None

    def _operator(self, angles):
        return self.acq.operator(self.size, self.device, angles=angles, n_det=self.n_det, det_spacing=self.det_px)

    def _to_image_units(self, sino: torch.Tensor, projector) -> torch.Tensor:
        if not self.physical:
            return sino
        key = id(projector)
        if key not in self._offsets:  # b A(1): the same for every slice
            self._offsets[key] = self.b * projector.A(torch.ones((1, self.size, self.size), device=self.device))
        return (sino - self._offsets[key]) / self.a

    def _field(self, field, option: str, k: int):
        if field is None or field.ndim == 2:
            return field
        from recon.case import check_finite

        one = np.asarray(field[k], dtype=np.float64)
        check_finite(one, f"{getattr(self.acq, option.strip('-'))} ({option}, slice {k})")
        return one

    def validate(self, start: int, stop: int) -> None:
        """Refuse NaN or infinite values in slices ``[start, stop)`` before any work (one slice read at a time)."""
        for k in range(start, stop):
            one = self.arr[k] if self.stack else self.arr
            if not np.isfinite(one).all():
                check_finite(np.asarray(one), f"{self.path} (slice {k})" if self.stack else str(self.path))

    def measurement(self, k: int, reference: bool = True, seed: int | None = None) -> Measurement:
        """Slice ``k`` (0 for a 2-D file): its views in the working image's units, with the
        ``--reference full`` reconstruction of all its measured views when asked for (and
        ``reference``).  ``seed`` is not used (nothing random is added to measured sinograms)."""
        from recon.acquisition import log_transform

        label = f"{self.path} (slice {k})" if self.stack else str(self.path)
        arr = np.asarray(self.arr[k] if self.stack else self.arr)
        with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values become inf: refused below
            arr = arr.astype(np.float32)
        check_finite(arr, label)
        info = dict(self.info)
        if self.stack:
            info["slice"] = int(k)
        if self.flat is not None:
            flat = self._field(self.flat, "--flat", k)
            dark = self._field(self.dark, "--dark", k) if self.dark is not None else 0.0
            arr, prelog = log_transform(arr, flat, dark)
            if prelog["clamped_counts"] == prelog["entries"]:
                raise ReconError(f"{label}: every count is at or below the dark field (no transmitted photons "
                                 "after I - D); check the sinogram, --flat and --dark")
            info["prelog"] = {**prelog, "flat": str(self.acq.flat), "dark": self.acq.dark and str(self.acq.dark)}
        y_all = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None].to(self.device)
        y = self._to_image_units(y_all[:, torch.from_numpy(self.keep).to(self.device)], self.op)
        ref_img = None
        if self.acq.reference is not None and reference:
            if self._full_op is None:
                self._full_op = self.op if len(self.keep) == self.n_meas else self._operator(self.angles)
            y_full = self._to_image_units(y_all, self._full_op)
            ref_img, info["reference"], info["reference_method"] = self.task._full_reference(
                self.acq, y_full, self._full_op, self.size, self.window)
        return Measurement(y=y, op=self.op, sigma_y=self.sigma_y, info=info, reference=ref_img)


class MeasuredKSpaces:
    """The slices of a multi-slice k-space file as a study (:meth:`Task.measured_study`): each
    slice is read alone (:func:`recon.io.kspace_slices`) and measured by
    :meth:`MRITask.measured` with its own coil maps, intensity scale and noise estimate, so the
    slices are reconstructed independently, one method call each.  The retrospective mask is
    the same for every slice (drawn with ``seed``, as a 2-D multi-slice scan samples every
    slice alike); ``--noise`` gets the slice's own seed (the runner passes
    :func:`recon.volume.slice_seed`)."""

    batched = False
    independent = ("each k-space slice has its own coil sensitivity maps and intensity scale, so slices are "
                   "reconstructed independently")
    op = None

    def __init__(self, task: "MRITask", acq: MRIAcquisition, device, seed: int, handle):
        self.task, self.acq, self.device, self.seed = task, acq, device, int(seed)
        self.path = Path(acq.kspace)
        self.n_slices, self._read, self.how = handle
        self.reference = None
        if acq.reference:  # a volume with one slice per k-space slice, read once
            from recon.io import read_input

            rp = Path(acq.reference)
            if rp.suffix.lower() in (".cfl", ".hdr") or rp.with_suffix(".cfl").is_file():
                raise ReconError(f"{rp}: a BART --reference is read as one image (its further dimensions are "
                                 f"maps, combined by root-sum-of-squares), but {self.path} has {self.n_slices} "
                                 "k-space slices; give a reference volume with one slice per k-space slice "
                                 "(NIfTI or a DICOM series), or reconstruct one slice with --slice I")
            vol = read_input(rp)
            n_ref = vol.n_slices
            if n_ref != self.n_slices:
                raise ReconError(f"{rp}: --reference has {n_ref} slice(s) but {self.path} has {self.n_slices} "
                                 "k-space slices; give a reference volume with one slice per k-space slice, or "
                                 "reconstruct one slice with --slice I")
            self.reference = vol.data

    def validate(self, start: int, stop: int) -> None:
        """Nothing up front: each slice is checked as it is read (reading k-space twice costs)."""

    def measurement(self, k: int, reference: bool = True, seed: int | None = None) -> Measurement:
        return self.task.measured(self.acq, self.device, seed=self.seed, slice_index=int(k),
                                  kspace=self._read(k), noise_seed=seed,
                                  reference_image=None if self.reference is None else self.reference[int(k)])


# ---------------------------------------------------------------------------
def _central_energy_fraction(a: np.ndarray) -> float:
    """Fraction of the energy of ``a`` (``(C, H, W)``, summed over coils) in its central
    ``H/8 x W/8`` block."""
    e = (np.abs(a.astype(np.complex64)) ** 2).reshape(-1, *a.shape[-2:]).sum(0)
    H, W = e.shape
    h, w = max(2, H // 8), max(2, W // 8)
    r0, c0 = H // 2 - h // 2, W // 2 - w // 2
    total = float(e.sum())
    return float(e[r0:r0 + h, c0:c0 + w].sum()) / total if total > 0 else 0.0


def _refuse_image_as_kspace(k: np.ndarray, path) -> None:
    """Refuse a complex IMAGE passed as k-space.  Centred k-space concentrates its energy in
    a peak at the centre (low frequencies) and its inverse FFT spreads it over the object;
    an image is the other way round.  Refused only when the transform is clearly more
    concentrated (twice, and at least a quarter of the energy), so uncentred or noise-like
    data pass."""
    from recon.io import kspace_to_image

    here = _central_energy_fraction(k)
    there = _central_energy_fraction(kspace_to_image(k))
    if there > 2 * here and there > 0.25:
        raise ReconError(f"{path}: this looks like a complex image, not k-space: {here:.0%} of its energy lies in the "
                         f"central low-frequency block vs {there:.0%} for its Fourier transform (k-space peaks at the "
                         "centre); pass --from-image to use its centred FFT as the k-space")


def _is_kspace_file(entry: str) -> bool:
    low = entry.lower()
    if low.endswith((".h5", ".hdf5", ".cfl", ".hdr", ".dat")):  # .dat: Siemens raw data
        return True
    if low.endswith(".npy"):
        from recon.io.images import npy_shape

        try:
            _, dtype = npy_shape(entry)
        except ReconError:
            return False
        return bool(np.issubdtype(dtype, np.complexfloating))
    return False


class MRITask(Task):
    name = "mri"
    description = "undersampled Cartesian MRI (single-coil, or SENSE from multi-coil k-space)"
    acquisition_type = MRIAcquisition
    measured_units = "k-space scale"
    dicom_modality = "MR"
    native_shape = True
    # tuned on brain_tumor_progression_t1c slices 5 and 15 at 128 px, 4x equispaced (noisy: --noise 0.02)
    method_defaults = {
        "tv": {"lam": 1e-2, "n_iter": 1000},
        "cs-wavelet": {"lam": 3e-4, "n_iter": 300},
    }
    noisy_method_defaults = {
        "tv": {"lam": 1e-2, "n_iter": 1000},
        "cs-wavelet": {"lam": 3e-4, "n_iter": 300},
    }

    def default_prior(self, source=None, mode="auto"):
        return "brain-mri"

    def _annotate(self, meas):
        meas.info["acceleration"] = float(meas.op.acceleration)

    def measurement_warnings(self, acq, meas):
        """The acceleration actually reached, when it is more than 25 % off the requested ``--accel``
        (masks keep the fully sampled centre, so large factors cannot be reached)."""
        requested, actual = getattr(acq, "accel", None), meas.info.get("acceleration")
        if not (requested and actual and acq.mask and not acq.mask_file):
            return []
        off = abs(actual - requested) / requested
        if off <= 0.25:
            return []
        why = (f"the fully sampled centre (--center-fraction {acq.center_fraction:g}) is always measured; lower "
               "--center-fraction or --accel" if actual < requested else "adjust --accel")
        return [f"--accel {requested:g} was requested but the {acq.mask} mask samples 1/{actual:.3g} of k-space "
                f"(true acceleration {actual:.3g}x, {off:.0%} off): {why}"]

    def uses_window(self, truth):
        return False

    def metric_image(self, img, meas):
        crop = meas.info.get("reference_crop")
        if crop:  # the file's own reference (fastMRI) is a centre crop of the reconstruction
            from recon.metrics import center_crop

            img = center_crop(img, tuple(crop))
        if meas.info.get("undersampled_input"):  # measured undersampled data: both scaled by their maximum
            return img / max(float(img.max()), 1e-12)
        return img

    def output_image(self, img, truth, meas, window):
        """Magnitude, not clipped, in the input's scale (measured k-space: the raw scale)."""
        scale = truth.scale if truth is not None else meas.info["scale"]
        vmax = 1.0 if truth is not None else max(1e-12, float(np.percentile(img, 99.9)))
        return img * scale, img, vmax

    def record_extra(self, meas):
        if meas.info.get("model") != "measured":
            return {}
        return {"kspace_scale": meas.info["scale"], "undersampled_input": meas.info["undersampled_input"]}

    @staticmethod
    def estimate_kspace_noise(y: torch.Tensor, mask: torch.Tensor, radius: float = 0.8, min_samples: int = 100) -> float:
        """Noise std of measured k-space ``y`` (..., H, W) from its sampled periphery (0 if too few samples)."""
        H, W = y.shape[-2:]
        yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64),
                                indexing="ij")
        r = torch.hypot((yy - H / 2) / (H / 2), (xx - W / 2) / (W / 2))
        outer = (mask.to(torch.bool).cpu() & (r > radius))
        if int(outer.sum()) < min_samples:
            return 0.0
        v = y.detach().cpu()[..., outer].real.double().flatten()
        return float(1.4826 * (v - v.median()).abs().median())

    @staticmethod
    def calibration_size(mask: np.ndarray) -> int:
        """Side of the largest fully sampled square centred at the k-space centre."""
        H, W = mask.shape
        r = 0
        while r + 1 <= min(H, W):
            n = r + 1
            r0, c0 = H // 2 - n // 2, W // 2 - n // 2
            if not mask[r0:r0 + n, c0:c0 + n].all():
                break
            r = n
        return r

    def manifest_entry(self, acq, inputs, entry):
        """k-space files (.h5, .cfl, complex .npy) are measured data; other lines are images."""
        if _is_kspace_file(entry):
            return replace(acq, kspace=entry), replace(inputs, path=None)
        return acq, replace(inputs, path=entry)

    def measured_slices(self, acq):
        from recon.io import kspace_slices

        n, read, how = kspace_slices(acq.kspace, acq.dataset, from_image=acq.from_image)
        return n, (n, read, how)

    def measured_study(self, acq, device, *, size=None, requested_size=None, window=None, seed=0, handle=None):
        if requested_size is not None:
            raise ReconError("--size cannot be used with --kspace: the k-space sets the image size")
        return MeasuredKSpaces(self, acq, device, seed, handle or self.measured_slices(acq)[1])

    def measured(self, acq: MRIAcquisition, device, *, size=None, requested_size=None, window=None, seed=0,
                 slice_index=None, kspace=None, noise_seed=None, reference_image=None, handle=None) -> Measurement:
        """``--kspace FILE``: the measurement, with a reference image for metrics when one exists.
        ``kspace``: slice ``slice_index`` already read (a one-slice :class:`recon.io.KSpace`, as
        :mod:`recon.measured_volume` streams a study) and ``reference_image`` its slice of the
        ``--reference`` volume; ``noise_seed``: the seed of ``--noise`` (default ``seed``, which
        also draws the retrospective mask); ``handle``: the file as :meth:`measured_slices` opened
        it (the single-slice path after it: the file is not read a second time)."""
        from forward_models import CartesianMRI, GaussianNoise, SenseMRI, estimate_sensitivity_maps
        from recon.io import kspace_to_image, read_kspace

        if requested_size is not None:
            raise ReconError("--size cannot be used with --kspace: the k-space sets the image size")
        path = Path(acq.kspace)
        suffix = path.suffix.lower()
        if kspace is None and handle is not None:
            n_handle, read_slice, _ = handle
            if slice_index is None and n_handle == 1 or slice_index is not None and 0 <= slice_index < n_handle:
                kspace = read_slice(0 if slice_index is None else int(slice_index))
        if kspace is not None:
            ks, slice_arg = kspace, 0
            label = str(path) if slice_index is None else f"{path} (slice {slice_index})"
        else:
            slice_arg = slice_index if suffix in (".h5", ".hdf5") else None
            ks = read_kspace(path, dataset=acq.dataset, from_image=acq.from_image, slice_index=slice_arg)
            label = str(path)
        k_index = 0 if slice_arg is not None else (ks.n_slices // 2 if slice_index is None else slice_index)
        if not 0 <= k_index < ks.n_slices:
            raise ReconError(f"{path}: --slice {slice_index} out of range; the file has {ks.n_slices} slice(s)")
        k = np.asarray(ks.data[k_index])  # (C, H, W)
        check_finite(k, label)
        C, H, W = k.shape
        if not acq.from_image:
            _refuse_image_as_kspace(k, path)
        pattern = (np.abs(k) > 0).any(0)
        fraction = float(pattern.mean())
        if fraction == 0:
            raise ReconError(f"{path}: the k-space is all zero")
        undersampled = fraction < 0.999
        if acq.mask or acq.mask_file:
            mask = acq.make_mask((H, W), seed).numpy().astype(bool) & pattern
        elif undersampled:
            mask = pattern
        else:
            raise ReconError(f"{path}: the k-space is fully sampled; give --mask KIND --accel R "
                             "(or --mask-file) to undersample it retrospectively")
        kmask = (k * mask[None]).astype(np.complex64)
        # intensity scale: the fully sampled image when we have it, else the zero-filled one
        full = k if not undersampled else kmask
        coil_imgs = kspace_to_image(full)
        rss = np.sqrt((np.abs(coil_imgs) ** 2).sum(0))
        scale = float(rss.max())
        if scale <= 0:
            raise ReconError(f"{path}: the sampled k-space has no energy")
        y = torch.from_numpy(kmask / scale).to(device)
        info = {"model": "measured", "file": str(path), "layout": ks.layout, "coils": C,
                "shape": [H, W], "sampled_fraction_file": fraction,
                "sampled_fraction": float(mask.mean()), "acceleration": float(mask.size / max(mask.sum(), 1)),
                "scale": scale, "scale_from": "fully sampled RSS" if not undersampled else "zero-filled RSS",
                "undersampled_input": undersampled}
        mask_t = torch.from_numpy(mask.astype(np.float32))
        if C == 1:
            op = CartesianMRI(mask_t).to(device)
            y = y[0][None]
        else:
            calib = acq.calib or min(self.calibration_size(mask), 32)
            if calib < 4:
                raise ReconError(f"{path}: no fully sampled calibration region at the k-space centre "
                                 f"(largest centred block: {calib}x{calib}); coil maps cannot be "
                                 "estimated - pass --calib N to force a size")
            maps = estimate_sensitivity_maps(torch.from_numpy(kmask), calib_size=calib)
            op = SenseMRI(maps, mask_t).to(device)
            y = y[None]
            info["calib_size"] = int(calib)
        if undersampled:
            # the zero-filled image underestimates the object's intensity (its peak is spread by the
            # aliasing): rescale so a least-squares reconstruction's 99.9th percentile is 1, as a fully
            # sampled image's maximum would be -- priors and clipping work on that [0, 1] scale
            from forward_models import cgls

            x_ls = cgls(op, y, n_iter=20)
            peak = float(torch.quantile(x_ls.abs().flatten().float(), 0.999))
            if peak > 0:
                y, scale = y / peak, scale * peak
                info.update(scale=scale, scale_from="99.9th percentile of a 20-iteration least-squares "
                                                    "reconstruction of the undersampled data")
        if acq.sigma_y is not None:
            sigma_y = float(acq.sigma_y)
            info["sigma_y_from"] = "--sigma-y"
        else:
            sigma_y = self.estimate_kspace_noise(y, op.mask)
            info["sigma_y_from"] = ("robust std (1.4826 x MAD) of the real part of the sampled k-space beyond "
                                    "80 % of the radius, where the object's signal has faded: measured data "
                                    "are never noise-free" if sigma_y else "too few outer samples: assumed 0")
        if acq.noise:
            gen = torch.Generator(device=device).manual_seed(seed if noise_seed is None else noise_seed)
            noise = GaussianNoise(acq.noise, relative=True)
            sigma_y = float(noise.std(y, op.mask).flatten()[0])
            y = noise(y, generator=gen, mask=op.mask)
            info["added_noise_relative"] = acq.noise
        info["sigma_y"] = sigma_y
        reference, ref_name = self._reference(acq, ks, slice_arg, k_index, undersampled, rss, reference_image)
        if reference is not None:
            if reference.shape != (H, W):
                info["reference_crop"] = list(reference.shape)
            info["reference"] = ref_name
            info["metrics_scale"] = ("reconstruction and reference each divided by their maximum"
                                     if undersampled else "both divided by the fully sampled maximum")
        return Measurement(y=y, op=op, sigma_y=sigma_y, info=info, reference=reference)

    @staticmethod
    def _reference(acq, ks, slice_arg, k_index, undersampled, rss, given=None):
        """Reference for metrics: --reference > the file's own reference > the fully sampled RSS.

        ``--reference`` must have the reconstruction's shape (the k-space's); the file's own
        reference may be a centre crop of it (fastMRI's 320x320), never larger.  ``given``: the
        slice of a ``--reference`` volume already read (a study), else its middle slice is read."""
        H, W = rss.shape
        reference, ref_name = None, None
        if acq.reference:
            from recon.io import read_cfl, read_input

            rp = Path(acq.reference)
            if given is not None:  # this slice of a --reference volume (a study)
                reference = np.abs(given)
            elif rp.suffix.lower() in (".cfl", ".hdr") or rp.with_suffix(".cfl").is_file():
                ref = np.squeeze(np.abs(read_cfl(rp.with_suffix("") if rp.suffix.lower() in (".cfl", ".hdr")
                                                 else rp)))
                if ref.ndim > 2:  # e.g. BART pics with several ESPIRiT maps: root-sum-of-squares
                    ref = np.sqrt((ref.reshape(*ref.shape[:2], -1) ** 2).sum(-1))
                reference = ref
            else:
                vol = read_input(rp)
                reference = np.abs(vol.data[vol.middle_index()])
            ref_name = str(rp)
            if tuple(reference.shape) != (H, W):
                raise ReconError(f"{rp}: --reference is {'x'.join(map(str, reference.shape))} but the reconstruction "
                                 f"is {H}x{W} (the k-space's size); metrics need a reference of the same object at "
                                 "the same size - give a matching reference or leave out --reference")
        elif ks.reference is not None:
            reference = ks.reference[0 if slice_arg is not None else k_index]
            ref_name = ks.reference_name
            h, w = reference.shape
            if h > H or w > W:
                raise ReconError(f"{ks.source}: its reference {ref_name} is {h}x{w}, larger than the reconstruction "
                                 f"({H}x{W}); give a matching --reference")
        elif not undersampled:
            reference, ref_name = rss, "RSS of the fully sampled k-space"
        if reference is None:
            return None, None
        reference = np.asarray(reference, dtype=np.float32)
        check_finite(reference, ref_name)
        rmax = float(reference.max())
        if rmax <= 0:
            raise ReconError(f"{ref_name}: the reference image is all zero")
        return reference / rmax, ref_name


# ---------------------------------------------------------------------------
class InpaintTask(Task):
    name = "inpaint"
    description = "image inpainting (missing box, random pixels or brush strokes)"
    acquisition_type = InpaintAcquisition
    native_shape = True
    # tuned on totalseg_example_j2k slices 5 and 15 at 128 px, central box of 25 % area
    method_defaults = {
        "tv": {"lam": 2e-2, "n_iter": 1000, "clip": (0.0, None)},
    }

    def units_for(self, source, mode):
        if mode == "hu":
            return "HU"
        if mode == "intensity":
            return "intensity"
        return "HU" if source.fmt == "dicom" and (source.modality or "").upper() == "CT" else "intensity"

    def default_prior(self, source=None, mode="auto"):
        if source is not None and self.units_for(source, mode) == "HU":
            return "ct"
        return "brain-mri"

    def _annotate(self, meas):
        meas.info["observed_fraction"] = float(meas.op.mask.mean())

    def uses_window(self, truth):
        return truth is not None and truth.units == "HU"

    def extra_outputs(self, meas):
        return {"observed.png": ("png", meas.y[0].float().cpu().numpy())}


TASKS: dict[str, Task] = {"ct": CTTask(), "mri": MRITask(), "inpaint": InpaintTask()}
