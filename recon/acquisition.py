"""Typed acquisition descriptions: what was (or is to be) measured, and how.

One frozen dataclass per task kind.  The command line builds them from its
options (``recon/cli.py`` is the only place that reads argparse); the Python
API and the notebooks construct them directly::

    from recon.acquisition import CTAcquisition, MRIAcquisition
    acq = CTAcquisition(views=23, photons=1e5)
    op = acq.operator(256, device="cpu")

Field names are the command-line option names (``--limited-angle`` ->
``limited_angle``), so ``run.json`` and ``summary.md`` list the settings under
the names a user typed.  Every acquisition knows

* ``operator(size, device, ...)`` -- its measurement operator at the working size;
* ``noise_model(...)`` -- its noise model (``forward_models.physics``);
* ``noisy`` -- whether the data carry noise (selects the noise-tuned defaults);
* ``describe()`` -- the settings that matter, for run records and summaries.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from recon.errors import ReconError

__all__ = ["CTAcquisition", "MRIAcquisition", "InpaintAcquisition", "parse_window", "read_mask_file"]


def parse_window(text) -> tuple[float, float] | None:
    """``'LO,HI'`` (or a pair) -> ``(lo, hi)`` in HU; None stays None."""
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


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ReconError(message)


def _positive(value, option: str, integer: bool = False) -> None:
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if integer:
        ok = ok and float(value) == int(value)
    _check(ok, f"{option} must be a positive {'integer' if integer else 'number'}, got {value!r}")


def _fraction(value, option: str) -> None:
    if value is None:
        return
    _check(isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 1,
           f"{option} must be a fraction in [0, 1], got {value!r}")


def _nonneg(value, option: str) -> None:
    if value is None:
        return
    _check(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0,
           f"{option} must be a finite number >= 0, got {value!r}")


def read_mask_file(path, shape) -> torch.Tensor:
    """A 0/1 mask from an image or ``.npy`` (nonzero = measured); must have ``shape``."""
    from recon.case import check_finite
    from recon.io import read_image

    arr = np.asarray(read_image(path))
    if np.iscomplexobj(arr):
        arr = np.abs(arr)
    check_finite(arr, str(path))
    if tuple(arr.shape) != tuple(shape):
        raise ReconError(f"{path}: mask has shape {tuple(arr.shape)} but the image is "
                         f"{tuple(shape)}; give a mask of the working size (see --size)")
    return torch.from_numpy((arr != 0).astype(np.float32))


class _Acquisition:
    """Shared helpers (not a hierarchy to extend: each kind is a plain dataclass)."""

    _describe: tuple = ()

    def settings(self) -> dict:
        """Every field (for run.json's options and fingerprints)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def describe(self) -> dict:
        """The settings that define the acquisition (for summaries and figure titles)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()
                if k in self._describe}

    def gaussian(self):
        from forward_models.physics import NoNoise, RelativeGaussian

        return RelativeGaussian(self.noise) if self.noise else NoNoise()


@dataclass(frozen=True)
class CTAcquisition(_Acquisition):
    """Sparse-view / limited-angle CT, parallel or fan beam (distances in image widths)."""

    views: int | None = None
    limited_angle: float | None = None
    geometry: str = "parallel"
    source_distance: float = 2.0
    detector_distance: float = 4.0
    photons: float | None = None
    noise: float | None = None
    window: tuple | None = None
    units: str = "auto"
    fov: float | None = None
    # measured data instead of a simulation
    sinogram: str | None = None
    sinogram_units: str = "image"
    sigma_y: float | None = None

    task = "ct"

    def __post_init__(self):
        _positive(self.views, "--views", integer=True)
        _positive(self.limited_angle, "--limited-angle")
        _positive(self.source_distance, "--source-distance")
        _positive(self.detector_distance, "--detector-distance")
        _positive(self.photons, "--photons")
        _positive(self.fov, "--fov")
        _nonneg(self.noise, "--noise")
        _nonneg(self.sigma_y, "--sigma-y")
        _check(self.geometry in ("parallel", "fan"), f"--geometry must be parallel or fan, got {self.geometry!r}")
        _check(self.units in ("auto", "hu", "intensity"), f"--units must be auto, hu or intensity, got {self.units!r}")
        _check(self.sinogram_units in ("image", "attenuation"),
               f"--sinogram-units must be image or attenuation, got {self.sinogram_units!r}")
        _check(not (self.photons is not None and self.noise), "give either --photons or --noise, not both")
        if self.geometry == "fan":
            # distances are in image widths; the source must stay outside the image's circumscribed circle
            half_diagonal = math.sqrt(2) / 2
            _check(self.source_distance > half_diagonal,
                   f"--source-distance {self.source_distance:g} puts the X-ray source inside the image: it is in "
                   f"multiples of the image width and must exceed {half_diagonal:.3f} (half the image diagonal); "
                   "e.g. --source-distance 2")
            _check(self.detector_distance >= self.source_distance,
                   f"--detector-distance {self.detector_distance:g} is shorter than --source-distance "
                   f"{self.source_distance:g} (both from the source, in image widths); the detector must lie beyond "
                   "the rotation axis, e.g. --detector-distance 4")
            for option, value in (("--source-distance", self.source_distance),
                                  ("--detector-distance", self.detector_distance)):
                _check(value <= 1000, f"{option} {value:g} is more than 1000 image widths: that is a parallel "
                                      "beam in all but name; use --geometry parallel")
        object.__setattr__(self, "window", parse_window(self.window))

    @property
    def measured(self) -> str | None:
        return self.sinogram

    @property
    def noisy(self) -> bool:
        return bool(self.photons or self.noise or self.sigma_y or self.sinogram)

    def describe(self) -> dict:
        keys = ["views", "limited_angle", "geometry", "photons", "noise", "window", "fov"]
        if self.geometry == "fan":
            keys[3:3] = ["source_distance", "detector_distance"]
        if self.units != "auto":
            keys.append("units")
        d = self.settings()
        return {k: d[k] for k in keys}

    def angles(self, n_views: int) -> torch.Tensor:
        from forward_models import view_angles

        fan = self.geometry == "fan"
        arc = self.limited_angle if self.limited_angle is not None else (360.0 if fan else 180.0)
        return view_angles(n_views, arc)

    def operator(self, size: int, device=None, *, n_views: int | None = None, n_det: int | None = None, seed=0):
        from forward_models import FanBeamCT, ParallelBeamCT

        n_views = n_views or self.views
        if n_views is None:
            raise ReconError("--views N is required (the number of projection views to simulate)")
        angles = self.angles(n_views)
        if self.geometry == "fan":
            op = FanBeamCT(size, angles, source_distance=self.source_distance * size,
                           detector_distance=self.detector_distance * size, n_det=n_det)
        else:
            op = ParallelBeamCT(size, angles, n_det=n_det)
        return op.to(device)

    def noise_model(self, window, pixel_mm: float):
        from forward_models.physics import LowDoseCT

        if self.photons is not None:
            return LowDoseCT(self.photons, window, pixel_mm)
        return self.gaussian()


@dataclass(frozen=True)
class MRIAcquisition(_Acquisition):
    """Undersampled Cartesian MRI: a sampling mask, or measured k-space."""

    mask: str | None = None
    accel: float | None = None
    center_fraction: float = 0.08
    mask_file: str | None = None
    noise: float | None = None
    # measured k-space instead of a simulation
    kspace: str | None = None
    dataset: str | None = None
    from_image: bool = False
    calib: int | None = None
    reference: str | None = None
    sigma_y: float | None = None

    task = "mri"
    _describe = ("mask", "accel", "center_fraction", "mask_file", "noise")

    def __post_init__(self):
        from forward_models import MRI_MASKS

        _positive(self.accel, "--accel")
        _fraction(self.center_fraction, "--center-fraction")
        _nonneg(self.noise, "--noise")
        _nonneg(self.sigma_y, "--sigma-y")
        _positive(self.calib, "--calib", integer=True)
        _check(self.mask is None or self.mask in MRI_MASKS,
               f"--mask must be one of {', '.join(sorted(MRI_MASKS))}, got {self.mask!r}")

    @property
    def measured(self) -> str | None:
        return self.kspace

    @property
    def noisy(self) -> bool:
        return bool(self.noise or self.sigma_y or self.kspace)

    def make_mask(self, shape, seed: int = 0) -> torch.Tensor:
        from forward_models import MRI_MASKS

        if self.mask_file:
            if self.mask:
                raise ReconError("give either --mask or --mask-file, not both")
            return read_mask_file(self.mask_file, shape)
        if self.mask is None or self.accel is None:
            raise ReconError("--mask KIND and --accel R are required to undersample k-space "
                             f"(kinds: {', '.join(sorted(MRI_MASKS))}), or give --mask-file")
        kw = {"center_fraction": self.center_fraction}
        if self.mask == "equispaced" and float(self.accel) != int(self.accel):
            kw["match_acceleration"] = True
        return MRI_MASKS[self.mask](self.accel, **kw)(shape, seed=seed).mask

    def operator(self, size: int, device=None, *, seed: int = 0):
        from forward_models import CartesianMRI

        return CartesianMRI(self.make_mask((size, size), seed), shape=(size, size)).to(device)

    def noise_model(self, window=None, pixel_mm: float = 1.0):
        return self.gaussian()


@dataclass(frozen=True)
class InpaintAcquisition(_Acquisition):
    """Missing pixels: a centred box, random pixels, brush strokes, or a mask file."""

    mask: str = "box"
    box_fraction: float = 0.25
    keep_ratio: float = 0.2
    strokes: int = 4
    mask_file: str | None = None
    noise: float | None = None
    window: tuple | None = None
    units: str = "auto"

    task = "inpaint"

    def __post_init__(self):
        from forward_models import INPAINT_MASKS

        _check(self.mask in INPAINT_MASKS, f"--mask must be one of {', '.join(sorted(INPAINT_MASKS))}, "
                                           f"got {self.mask!r}")
        _fraction(self.box_fraction, "--box-fraction")
        _fraction(self.keep_ratio, "--keep-ratio")
        _positive(self.strokes, "--strokes", integer=True)
        _nonneg(self.noise, "--noise")
        _check(self.units in ("auto", "hu", "intensity"), f"--units must be auto, hu or intensity, got {self.units!r}")
        object.__setattr__(self, "window", parse_window(self.window))

    measured = None

    @property
    def noisy(self) -> bool:
        return bool(self.noise)

    def describe(self) -> dict:
        d = self.settings()
        keys = ["mask"]
        if not self.mask_file:
            keys.append({"box": "box_fraction", "random": "keep_ratio", "strokes": "strokes"}[self.mask])
        keys += ["mask_file", "noise", "window"]
        if self.units != "auto":
            keys.append("units")
        return {k: d[k] for k in keys}

    def make_mask(self, shape, seed: int = 0) -> torch.Tensor:
        from forward_models import INPAINT_MASKS

        if self.mask_file:
            return read_mask_file(self.mask_file, shape)
        kw = {"box": {"fraction": self.box_fraction}, "random": {"keep": self.keep_ratio},
              "strokes": {"n_strokes": self.strokes}}[self.mask]
        return INPAINT_MASKS[self.mask](**kw)(shape, seed=seed).mask

    def operator(self, size: int, device=None, *, seed: int = 0):
        from forward_models import Inpainting

        return Inpainting(self.make_mask((size, size), seed), shape=(size, size)).to(device)

    def noise_model(self, window=None, pixel_mm: float = 1.0):
        return self.gaussian()
