"""Task setup for the command line: ``ct``, ``mri`` and ``inpaint``.

Each task kind is a :class:`Task` object in :data:`TASKS`; it knows

* its acquisition options (``add_arguments``), shared by ``recon <task>`` and
  ``recon compare <task>``;
* how to turn an input image (native units) into a ground truth ``x`` in
  [0, 1] at the working size ``S`` (:meth:`Task.prepare`), and back to the
  input's units for writing outputs (:meth:`Truth.to_units`);
* how to build its operator at size ``S`` (:meth:`Task.build_operator`) and
  simulate ``y = noise(A x)`` with a seeded ``torch.Generator``
  (:meth:`Task.simulate`), reporting the measurement-noise std ``sigma_y`` in
  the units of ``y`` (passed to methods that accept ``sigma_y``);
* default method options (:meth:`Task.default_options`) and the default prior
  name (:meth:`Task.default_prior`).

Intensity conventions
---------------------
* CT: Hounsfield units are windowed to [0, 1] (``(HU - lo) / (hi - lo)``,
  clipped).  The window is ``--window`` if given, else the score prior's
  window when a score method runs, else (-1000, 1000).  Which inputs are in
  HU (``--units auto``): DICOM with Modality CT; NIfTI and ``.npy`` whose
  minimum is below -100 (air is -1000 HU).  Other inputs (PNG/JPEG/TIFF,
  non-negative arrays, non-CT DICOM) are display intensities and are divided
  by their maximum (their [0, 1] values are then read as windowed HU for the
  CT physics).  ``--units hu|intensity`` overrides the guess.
* MRI: magnitude divided by its maximum.
* Inpainting: the CT window for DICOM CT input, else divided by the maximum.
* Images are centre-cropped to a square and resized (anti-aliased) to ``S``.

CT noise physics (``--photons I0``)
-----------------------------------
With ``x`` in [0, 1] from the window ``(lo, hi)``, ``HU = (hi - lo) x + lo``
and the linear attenuation is ``mu = mu_water (1 + HU / 1000)`` with
``mu_water = 0.0192 / mm``.  Line integrals in physical units are
``p = pixel_mm * A(mu) = a A(x) + b A(1)`` with ``a = pixel_mm mu_water (hi -
lo) / 1000`` and ``b = pixel_mm mu_water (1 + lo / 1000)``; the operator has
unit pixels, so ``pixel_mm`` (millimetres per pixel at size ``S``) carries
the physical scale: the field of view divided by ``S``, where the field of
view is ``--fov`` if given, else the input's pixel spacing (DICOM
PixelSpacing, NIfTI zooms) times the cropped native size, else 1 mm per
native pixel.  Counts ``~ Poisson(I0 exp(-p))``, ``p_noisy = -log(max(counts,
1) / I0)``, and the methods see ``y = (p_noisy - b A(1)) / a``, i.e. the
sinogram in the units of ``A(x)``; ``sigma_y`` is the standard deviation of
``y - A(x)`` actually realised.

Gaussian noise (``--noise SIGMA``, all tasks)
--------------------------------------------
``SIGMA`` is relative to the root-mean-square of the clean measurement (over
the measured entries for MRI and inpainting): the absolute standard deviation
``SIGMA * rms(A x)`` is added (to the real and the imaginary part of k-space)
and passed to the methods as ``sigma_y``.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recon.errors import ReconError
from recon.preprocess import CT_WINDOW, square_resize

__all__ = ["TASKS", "Task", "Source", "Truth", "Measurement", "MU_WATER", "load_source",
           "source_from_case", "parse_window", "ct_line_integral_coefficients"]

MU_WATER = 0.0192  # linear attenuation of water, 1/mm (~70 keV)


# ---------------------------------------------------------------------------
# data carriers
# ---------------------------------------------------------------------------
@dataclass(eq=False)
class Source:
    """One 2-D input image in its native units plus what is needed to write outputs."""

    image: np.ndarray                 # (rows, cols) float32
    path: str
    fmt: str                          # 'dicom' | 'nifti' | 'image'
    modality: str | None = None       # DICOM Modality ('CT', 'MR', ...) or None
    dx: float | None = None           # mm per native pixel (None: unknown)
    reference: Any = None             # recon.io.Volume (DICOM/NIfTI) or None
    slice_index: int | None = None
    name: str = ""


@dataclass(eq=False)
class Truth:
    """The ground truth on the [0, 1] working scale and how to map it back."""

    x: np.ndarray                     # (S, S) float32 in [0, 1]
    source: Source
    units: str                        # 'HU' or 'intensity'
    scale: float = 1.0                # intensity: native = x * scale
    window: tuple | None = None       # HU window when units == 'HU'
    crop: tuple = (0, 0, 0)           # (top, left, side) of the square crop (native pixels)
    pixel_mm: float = 1.0             # mm per pixel at the working size

    @property
    def size(self) -> int:
        return int(self.x.shape[-1])

    def to_units(self, x01: np.ndarray) -> np.ndarray:
        """[0, 1] working scale -> the input's units (HU, or the input intensity)."""
        x01 = np.asarray(x01, dtype=np.float32)
        if self.units == "HU":
            lo, hi = self.window
            return (x01 * (hi - lo) + lo).astype(np.float32)
        return (x01 * self.scale).astype(np.float32)


@dataclass(eq=False)
class Measurement:
    """``y`` (batch of one), its operator, the noise std in y units, and provenance."""

    y: torch.Tensor
    op: Any
    sigma_y: float = 0.0
    info: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------
# reading inputs
# ---------------------------------------------------------------------------
def _check_finite(img: np.ndarray, label: str) -> None:
    if not np.all(np.isfinite(img)):
        n = int(np.size(img) - np.count_nonzero(np.isfinite(img)))
        raise ReconError(f"{label}: contains {n} NaN or infinite value(s); clean the data first "
                         "(e.g. numpy.nan_to_num) and retry")


def load_source(path, series_uid: str | None = None, slice_index: int | None = None) -> Source:
    """Read a ground-truth input (DICOM file/folder, NIfTI, PNG/JPEG/TIFF, .npy) and take one slice."""
    from recon.io import read_input

    vol = read_input(path, series_uid=series_uid)
    n = vol.n_slices
    k = vol.middle_index() if slice_index is None else int(slice_index)
    if not 0 <= k < n:
        raise ReconError(f"{path}: --slice {slice_index} is out of range; the input has {n} "
                         f"slice(s) (0..{n - 1})")
    img = np.asarray(vol.data[k])
    if np.iscomplexobj(img):
        img = np.abs(img)
    img = img.astype(np.float32)
    _check_finite(img, str(path))
    fmt = vol.meta.get("format", "image")
    dx = None
    if (fmt == "dicom" and vol.meta.get("spacing_known", True)) or (fmt == "nifti" and vol.affine is not None):
        dx = float(vol.spacing[2])
    return Source(image=img, path=str(path), fmt=fmt, modality=vol.meta.get("modality"), dx=dx,
                  reference=vol if fmt in ("dicom", "nifti") else None, slice_index=k,
                  name=Path(str(path)).name)


def _dicom_pixel_spacing(path) -> float | None:
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
        ps = ds.get("PixelSpacing")
        return float(ps[1]) if ps is not None else None
    except Exception:
        return None


def source_from_case(case) -> Source:
    """A :class:`Source` for a :class:`recon.io.Case` (``recon compare``)."""
    img = np.asarray(case.image, dtype=np.float32)
    _check_finite(img, str(case.source))
    dx = None
    if case.kind == "dicom":
        dx = _dicom_pixel_spacing(case.source)
    elif case.kind == "nifti":
        ref = case.reference
        dx = float(ref.spacing[2]) if ref is not None else None
    return Source(image=img, path=str(case.source), fmt=case.kind, modality=case.modality, dx=dx,
                  reference=None, slice_index=case.slice_index, name=case.name)


def parse_window(text) -> tuple[float, float] | None:
    if text is None:
        return None
    if isinstance(text, (tuple, list)):
        lo, hi = (float(v) for v in text)
    else:
        try:
            lo, hi = (float(v) for v in str(text).split(","))
        except ValueError:
            raise ReconError(f"--window must be 'LO,HI' in HU (e.g. -1000,1000), got {text!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ReconError(f"--window needs finite LO < HI, got {lo}, {hi}")
    return lo, hi


def ct_line_integral_coefficients(window, pixel_mm: float) -> tuple[float, float]:
    """``(a, b)`` with physical line integrals ``p = a A(x) + b A(1)`` (see module docstring)."""
    lo, hi = window
    a = pixel_mm * MU_WATER * (hi - lo) / 1000.0
    b = pixel_mm * MU_WATER * (1.0 + lo / 1000.0)
    return a, b


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {v}")
    return v


def _positive_float(text: str) -> float:
    v = _nonneg_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {v}")
    return v


def _fraction(text: str) -> float:
    v = _nonneg_float(text)
    if v > 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {v}")
    return v


def read_mask_file(path, shape) -> torch.Tensor:
    """A 0/1 mask from an image or ``.npy`` (nonzero = measured); must have ``shape``."""
    from recon.io import read_image

    arr = np.asarray(read_image(path))
    if np.iscomplexobj(arr):
        arr = np.abs(arr)
    _check_finite(arr, str(path))
    if tuple(arr.shape) != tuple(shape):
        raise ReconError(f"{path}: mask has shape {tuple(arr.shape)} but the image is "
                         f"{tuple(shape)}; give a mask of the working size (see --size)")
    return torch.from_numpy((arr != 0).astype(np.float32))


def _gaussian(y: torch.Tensor, rel: float, generator, mask=None) -> tuple[torch.Tensor, float]:
    from forward_models import GaussianNoise

    noise = GaussianNoise(rel, relative=True)
    std = float(noise.std(y, mask).flatten()[0])
    return noise(y, generator=generator, mask=mask), std


# ---------------------------------------------------------------------------
# the task kinds
# ---------------------------------------------------------------------------
class Task:
    """Base class; see the module docstring."""

    name = ""
    description = ""
    #: method -> default options (only those a method accepts are passed)
    method_defaults: dict[str, dict] = {}
    noisy_method_defaults: dict[str, dict] = {}

    # -- command-line options ------------------------------------------------
    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        raise NotImplementedError

    def acquisition(self, args) -> dict:
        """The acquisition settings from ``args`` (for run.json / summaries / fingerprints)."""
        return {k: getattr(args, k, None) for k in self._acq_keys}

    _acq_keys: tuple = ()

    # -- intensities -----------------------------------------------------------
    def units_for(self, source: Source, mode: str) -> str:
        return "intensity"

    def uses_window(self, source: Source, mode: str) -> bool:
        return self.units_for(source, mode) == "HU"

    def default_prior(self, source: Source | None, mode: str = "auto") -> str:
        raise NotImplementedError

    def prepare(self, source: Source, size: int | None, window=None, units: str = "auto",
                fov_mm: float | None = None) -> Truth:
        """Normalise ``source`` to [0, 1] and resize to ``size`` (None: native square crop)."""
        img = source.image
        h, w = img.shape
        m = min(h, w)
        top, left = (h - m) // 2, (w - m) // 2
        kind = self.units_for(source, units)
        if kind == "HU":
            lo, hi = window or CT_WINDOW
            x = np.clip((square_resize(img, size) - lo) / (hi - lo), 0, 1).astype(np.float32)
            scale, win = 1.0, (float(lo), float(hi))
        else:
            mag = np.abs(img)
            scale = float(mag.max())
            if scale <= 0:
                raise ReconError(f"{source.path}: the image is all zero; nothing to reconstruct")
            x = np.clip(square_resize(mag / scale, size), 0, 1).astype(np.float32)
            win = window or CT_WINDOW  # intensities read as windowed HU for CT physics
        S = x.shape[-1]
        if fov_mm is not None:
            pixel_mm = float(fov_mm) / S
        else:
            pixel_mm = (source.dx or 1.0) * m / S
        return Truth(x=x, source=source, units=kind, scale=scale, window=win, crop=(top, left, m),
                     pixel_mm=pixel_mm)

    # -- operator and simulation ----------------------------------------------
    def build_operator(self, args, size: int, device):
        raise NotImplementedError

    def simulate(self, truth: Truth, op, args, generator: torch.Generator) -> Measurement:
        raise NotImplementedError

    def default_options(self, method: str, noisy: bool = False) -> dict:
        """Per-method defaults, tuned on validation cases that are not reported (README)."""
        table = self.noisy_method_defaults if noisy and self.noisy_method_defaults else self.method_defaults
        return dict(table.get(method, self.method_defaults.get(method, {})))


def _add_noise_option(p, photons: bool):
    g = p.add_mutually_exclusive_group() if photons else p
    if photons:
        g.add_argument("--photons", type=_positive_float, default=None, metavar="I0",
                       help="Poisson (low-dose) noise with I0 incident photons per ray (see CT physics "
                            "in recon.tasks); default: noise-free")
    g.add_argument("--noise", type=_nonneg_float, default=None, metavar="SIGMA",
                   help="additive Gaussian noise, std = SIGMA x RMS of the clean measurement "
                        "(relative, e.g. 0.01 = 1%%); default: noise-free")



def _simulate_masked(truth, op, args, generator):
    """y = A x (+ Gaussian noise on the measured entries): shared by MRI and inpainting."""
    x = torch.from_numpy(truth.x)[None].to(generator.device)
    with torch.no_grad():
        clean = op.A(x)
        if args.noise:
            y, sigma_y = _gaussian(clean, args.noise, generator, mask=op.mask)
            return y, sigma_y, {"model": "gaussian", "relative_sigma": args.noise}
    return clean, 0.0, {"model": "none"}

class CTTask(Task):
    name = "ct"
    description = "sparse-view / limited-angle CT (parallel or fan beam)"
    # tuned on totalseg_example_j2k slices 5 and 15 at 128 px (23/60 views; I0 = 1e5 for noisy).
    # Noise-free: lam 1e-5 / 3e-6 / 1e-6 / 3e-7 / 1e-7 / 1e-8 gave 34.9 / 35.0 / 35.1 / 35.1 / 35.2 / 31.6 dB
    # at 23 views and 43.4 / 44.6 / 45.1 / 45.8 / 46.4 / 46.0 dB at 60 views: with exact data TV works
    # best as "min TV subject to A x = y" (below 1e-7, 2000 iterations no longer converge at 23 views).
    method_defaults = {
        "tv": {"lam": 1e-7, "n_iter": 2000, "clip": (0.0, 1.0)},
        "sirt": {"n_iter": 300},
    }
    noisy_method_defaults = {
        "tv": {"lam": 3e-4, "n_iter": 1000, "clip": (0.0, 1.0)},
    }
    _acq_keys = ("views", "limited_angle", "geometry", "source_distance", "detector_distance",
                 "photons", "noise", "window", "units", "fov")

    def add_arguments(self, p):
        g = p.add_argument_group("CT acquisition")
        g.add_argument("--views", type=_positive_int, default=None, metavar="N",
                       help="number of projection views (required when simulating; with --sinogram "
                            "it defaults to the file's first axis)")
        g.add_argument("--limited-angle", type=_positive_float, default=None, metavar="DEG",
                       help="angular range covered by the views in degrees (default: 180 parallel, "
                            "360 fan)")
        g.add_argument("--geometry", choices=["parallel", "fan"], default="parallel",
                       help="beam geometry (default: parallel)")
        g.add_argument("--source-distance", type=_positive_float, default=2.0, metavar="F",
                       help="fan beam: source to rotation axis, in multiples of the image width (default 2)")
        g.add_argument("--detector-distance", type=_positive_float, default=4.0, metavar="F",
                       help="fan beam: source to detector, in multiples of the image width (default 4)")
        _add_noise_option(g, photons=True)
        g.add_argument("--window", default=None, metavar="LO,HI",
                       help="HU window mapped to [0, 1] (default: the prior's window for score "
                            "methods, else -1000,1000)")
        g.add_argument("--units", choices=["auto", "hu", "intensity"], default="auto",
                       help="input intensities: Hounsfield units (windowed) or display intensities "
                            "(divided by the maximum); default: guessed (see recon.tasks)")
        g.add_argument("--fov", type=_positive_float, default=None, metavar="MM",
                       help="field of view in mm (sets the pixel size for --photons; default: from "
                            "the input's pixel spacing, else 1 mm per native pixel)")

    def acquisition(self, args) -> dict:
        acq = super().acquisition(args)
        if getattr(args, "geometry", "parallel") != "fan":
            acq.pop("source_distance", None)
            acq.pop("detector_distance", None)
        if acq.get("units") == "auto":
            acq.pop("units")
        return acq

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

    def angles(self, args, n_views: int):
        from forward_models import views

        fan = args.geometry == "fan"
        arc = args.limited_angle if args.limited_angle is not None else (360.0 if fan else 180.0)
        return views(n_views, arc)

    def build_operator(self, args, size, device, n_views: int | None = None, n_det: int | None = None):
        from forward_models import FanBeamCT, ParallelBeamCT

        n_views = n_views or args.views
        if n_views is None:
            raise ReconError("--views N is required (the number of projection views to simulate)")
        angles = self.angles(args, n_views)
        if args.geometry == "fan":
            op = FanBeamCT(size, angles, source_distance=args.source_distance * size,
                           detector_distance=args.detector_distance * size, n_det=n_det)
        else:
            op = ParallelBeamCT(size, angles, n_det=n_det)
        return op.to(device)

    def simulate(self, truth, op, args, generator):
        from forward_models import PoissonNoise

        dev = generator.device
        x = torch.from_numpy(truth.x)[None].to(dev)
        with torch.no_grad():
            clean = op.A(x)
            if args.photons is not None:
                a, b = ct_line_integral_coefficients(truth.window, truth.pixel_mm)
                ones_p = op.A(torch.ones_like(x)).double()
                p = a * clean.double() + b * ones_p
                p_noisy = PoissonNoise(args.photons)(p, generator=generator)
                y = ((p_noisy - b * ones_p) / a).to(clean.dtype)
                sigma_y = float((y.double() - clean.double()).std())
                info = {"model": "poisson", "I0": args.photons, "pixel_mm": truth.pixel_mm,
                        "mu_water_per_mm": MU_WATER, "window": list(truth.window),
                        "a": a, "b": b, "max_line_integral": float(p.max())}
            elif args.noise:
                y, sigma_y = _gaussian(clean, args.noise, generator)
                info = {"model": "gaussian", "relative_sigma": args.noise}
            else:
                y, sigma_y, info = clean, 0.0, {"model": "none"}
        info["sigma_y"] = sigma_y
        return Measurement(y=y, op=op, sigma_y=sigma_y, info=info)

    def measured(self, args, size: int, device, window, fov_mm) -> Measurement:
        """A measured sinogram from ``--sinogram FILE`` (no ground truth)."""
        from recon.io import read_npy

        path = Path(args.sinogram)
        arr = read_npy(path)
        if np.iscomplexobj(arr) or arr.ndim != 2:
            raise ReconError(f"{path}: expected a real 2-D sinogram (views, detectors), got "
                             f"{'complex ' if np.iscomplexobj(arr) else ''}shape {arr.shape}")
        _check_finite(arr, str(path))
        n_views, n_det = arr.shape
        if args.views is not None and args.views != n_views:
            raise ReconError(f"{path}: has {n_views} views (first axis) but --views {args.views}; "
                             "fix --views or the file")
        op = self.build_operator(args, size, device, n_views=n_views, n_det=n_det)
        y = torch.from_numpy(np.ascontiguousarray(arr))[None].to(device)
        info = {"model": "measured", "file": str(path), "sinogram_units": args.sinogram_units}
        if args.sinogram_units == "attenuation":
            pixel_mm = (fov_mm / size) if fov_mm else 1.0
            a, b = ct_line_integral_coefficients(window, pixel_mm)
            y = (y - b * op.A(torch.ones((1, size, size), device=device))) / a
            info.update(pixel_mm=pixel_mm, a=a, b=b, window=list(window))
        sigma_y = float(args.sigma_y or 0.0)
        info["sigma_y"] = sigma_y
        return Measurement(y=y, op=op, sigma_y=sigma_y, info=info)


class MRITask(Task):
    name = "mri"
    description = "undersampled Cartesian MRI (single-coil, or SENSE from multi-coil k-space)"
    # tuned on brain_tumor_progression_t1c slices 5 and 15 at 128 px, 4x equispaced (noisy: --noise 0.02)
    method_defaults = {
        "tv": {"lam": 1e-2, "n_iter": 1000},
        "cs-wavelet": {"lam": 1e-4, "n_iter": 300},
    }
    noisy_method_defaults = {
        "tv": {"lam": 1e-2, "n_iter": 1000},
        "cs-wavelet": {"lam": 3e-4, "n_iter": 300},
    }
    _acq_keys = ("mask", "accel", "center_fraction", "mask_file", "noise")

    def add_arguments(self, p):
        from forward_models import MRI_MASKS

        g = p.add_argument_group("MRI sampling")
        g.add_argument("--mask", choices=sorted(MRI_MASKS), default=None,
                       help="k-space sampling pattern (line masks sample columns)")
        g.add_argument("--accel", type=_positive_float, default=None, metavar="R",
                       help="acceleration factor (equispaced needs an integer)")
        g.add_argument("--center-fraction", type=_fraction, default=0.08, metavar="F",
                       help="fully sampled central fraction (default 0.08)")
        g.add_argument("--mask-file", default=None, metavar="FILE",
                       help="use this 0/1 mask (.npy or image, the k-space size) instead of --mask")
        _add_noise_option(g, photons=False)

    def default_prior(self, source=None, mode="auto"):
        return "brain-mri"

    def make_mask(self, args, shape) -> torch.Tensor:
        from forward_models import MRI_MASKS

        if args.mask_file:
            if args.mask:
                raise ReconError("give either --mask or --mask-file, not both")
            return read_mask_file(args.mask_file, shape)
        if args.mask is None or args.accel is None:
            raise ReconError("--mask KIND and --accel R are required to undersample k-space "
                             f"(kinds: {', '.join(sorted(MRI_MASKS))}), or give --mask-file")
        kind = MRI_MASKS[args.mask]
        kw = {"center_fraction": args.center_fraction}
        if args.mask == "equispaced" and float(args.accel) != int(args.accel):
            kw["match_acceleration"] = True
        return kind(args.accel, **kw)(shape, seed=args.seed).mask

    def build_operator(self, args, size, device):
        from forward_models import CartesianMRI

        return CartesianMRI(self.make_mask(args, (size, size)), shape=(size, size)).to(device)

    def simulate(self, truth, op, args, generator):
        y, sigma_y, info = _simulate_masked(truth, op, args, generator)
        info.update(sigma_y=sigma_y, acceleration=float(op.acceleration))
        return Measurement(y=y, op=op, sigma_y=sigma_y, info=info)

    # -- measured k-space -------------------------------------------------------
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

    def measured(self, args, device):
        """``--kspace FILE``: returns (Measurement, reference [0,1] or None, scale, info)."""
        from forward_models import CartesianMRI, SenseMRI, estimate_sensitivity_maps
        from recon.io import kspace_to_image, read_kspace

        path = Path(args.kspace)
        suffix = path.suffix.lower()
        slice_arg = args.slice if suffix in (".h5", ".hdf5") else None
        ks = read_kspace(path, dataset=args.dataset, from_image=args.from_image, slice_index=slice_arg)
        k_index = 0 if slice_arg is not None else (ks.n_slices // 2 if args.slice is None else args.slice)
        if not 0 <= k_index < ks.n_slices:
            raise ReconError(f"{path}: --slice {args.slice} out of range; the file has {ks.n_slices} slice(s)")
        k = np.asarray(ks.data[k_index])  # (C, H, W)
        _check_finite(k, str(path))
        C, H, W = k.shape
        pattern = (np.abs(k) > 0).any(0)
        fraction = float(pattern.mean())
        if fraction == 0:
            raise ReconError(f"{path}: the k-space is all zero")
        undersampled = fraction < 0.999
        if args.mask or args.mask_file:
            mask = self.make_mask(args, (H, W)).numpy().astype(bool) & pattern
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
                "scale": scale, "scale_from": "fully sampled RSS" if not undersampled else "zero-filled RSS"}
        mask_t = torch.from_numpy(mask.astype(np.float32))
        if C == 1:
            op = CartesianMRI(mask_t).to(device)
            y = y[0][None]
        else:
            calib = args.calib or min(self.calibration_size(mask), 32)
            if calib < 4:
                raise ReconError(f"{path}: no fully sampled calibration region at the k-space centre "
                                 f"(largest centred block: {calib}x{calib}); coil maps cannot be "
                                 "estimated - pass --calib N to force a size")
            maps = estimate_sensitivity_maps(torch.from_numpy(kmask), calib_size=calib)
            op = SenseMRI(maps, mask_t).to(device)
            y = y[None]
            info["calib_size"] = int(calib)
        sigma_y = float(args.sigma_y or 0.0)
        if args.noise:
            gen = torch.Generator(device=device).manual_seed(args.seed)
            y, sigma_y = _gaussian(y, args.noise, gen, mask=op.mask)
            info["added_noise_relative"] = args.noise
        info["sigma_y"] = sigma_y
        # reference for metrics: file reference > fully sampled image > --reference
        reference, ref_name = None, None
        if args.reference:
            from recon.io import read_input
            rp = Path(args.reference)
            if rp.suffix.lower() in (".cfl", ".hdr") or (rp.with_suffix(".cfl").is_file()):
                from recon.io import read_cfl

                ref = np.squeeze(np.abs(read_cfl(rp.with_suffix("") if rp.suffix.lower() in (".cfl", ".hdr")
                                                 else rp)))
                if ref.ndim > 2:  # e.g. BART pics with several ESPIRiT maps: root-sum-of-squares
                    ref = np.sqrt((ref.reshape(*ref.shape[:2], -1) ** 2).sum(-1))
                reference = ref
            else:
                vol = read_input(rp)
                reference = np.abs(vol.data[vol.middle_index()])
            ref_name = str(rp)
        elif ks.reference is not None:
            reference = ks.reference[0 if slice_arg is not None else k_index]
            ref_name = ks.reference_name
        elif not undersampled:
            reference, ref_name = rss, "RSS of the fully sampled k-space"
        if reference is not None:
            reference = np.asarray(reference, dtype=np.float32)
            _check_finite(reference, ref_name)
            rmax = float(reference.max())
            if rmax <= 0:
                raise ReconError(f"{ref_name}: the reference image is all zero")
            reference = reference / rmax
            info["reference"] = ref_name
            info["metrics_scale"] = ("reconstruction and reference each divided by their maximum"
                                     if undersampled else "both divided by the fully sampled maximum")
        return Measurement(y=y, op=op, sigma_y=sigma_y, info=info), reference, scale, undersampled


class InpaintTask(Task):
    name = "inpaint"
    description = "image inpainting (missing box, random pixels or brush strokes)"
    # tuned on totalseg_example_j2k slices 5 and 15 at 128 px, central box of 25 % area
    method_defaults = {
        "tv": {"lam": 2e-2, "n_iter": 1000, "clip": (0.0, 1.0)},
    }
    _acq_keys = ("mask", "box_fraction", "keep_ratio", "strokes", "mask_file", "noise", "window", "units")

    def add_arguments(self, p):
        from forward_models import INPAINT_MASKS

        g = p.add_argument_group("inpainting mask")
        g.add_argument("--mask", choices=sorted(INPAINT_MASKS), default="box",
                       help="missing region: centred box, random pixels, or brush strokes (default box)")
        g.add_argument("--box-fraction", type=_fraction, default=0.25, metavar="F",
                       help="box: missing area fraction (default 0.25)")
        g.add_argument("--keep-ratio", type=_fraction, default=0.2, metavar="P",
                       help="random: fraction of observed pixels (default 0.2)")
        g.add_argument("--strokes", type=int, default=4, metavar="N",
                       help="strokes: number of brush strokes (default 4)")
        g.add_argument("--mask-file", default=None, metavar="FILE",
                       help="use this 0/1 mask (.npy or image, 1 = observed, the working size)")
        _add_noise_option(g, photons=False)
        g.add_argument("--window", default=None, metavar="LO,HI",
                       help="HU window for CT input (default: prior's window or -1000,1000)")
        g.add_argument("--units", choices=["auto", "hu", "intensity"], default="auto",
                       help="input intensities (default auto: HU for DICOM CT, else intensity)")

    def units_for(self, source, mode):
        if mode == "hu":
            return "HU"
        if mode == "intensity":
            return "intensity"
        return "HU" if source.fmt == "dicom" and (source.modality or "").upper() == "CT" else "intensity"

    def acquisition(self, args) -> dict:
        acq = super().acquisition(args)
        keep = {"box": "box_fraction", "random": "keep_ratio", "strokes": "strokes"}.get(acq.get("mask"))
        for k in ("box_fraction", "keep_ratio", "strokes"):
            if k != keep or acq.get("mask_file"):
                acq.pop(k, None)
        if acq.get("units") == "auto":
            acq.pop("units")
        return acq

    def default_prior(self, source=None, mode="auto"):
        if source is not None and self.units_for(source, mode) == "HU":
            return "ct"
        return "brain-mri"

    def make_mask(self, args, shape) -> torch.Tensor:
        from forward_models import INPAINT_MASKS

        if args.mask_file:
            return read_mask_file(args.mask_file, shape)
        kw = {"box": {"fraction": args.box_fraction}, "random": {"keep": args.keep_ratio},
              "strokes": {"n_strokes": args.strokes}}[args.mask]
        return INPAINT_MASKS[args.mask](**kw)(shape, seed=args.seed).mask

    def build_operator(self, args, size, device):
        from forward_models import Inpainting

        return Inpainting(self.make_mask(args, (size, size)), shape=(size, size)).to(device)

    def simulate(self, truth, op, args, generator):
        y, sigma_y, info = _simulate_masked(truth, op, args, generator)
        info.update(sigma_y=sigma_y, observed_fraction=float(op.mask.mean()))
        return Measurement(y=y, op=op, sigma_y=sigma_y, info=info)


TASKS: dict[str, Task] = {"ct": CTTask(), "mri": MRITask(), "inpaint": InpaintTask()}
