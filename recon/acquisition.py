"""Typed acquisition descriptions: what was (or is to be) measured, and how.

One frozen dataclass per task kind.  The command line builds them from its
options (``recon/cli.py`` is the only place that reads argparse); the Python
API and the notebooks construct them directly::

    from recon.acquisition import CTAcquisition, MRIAcquisition
    acq = CTAcquisition(views=23, photons=1e5)
    op = acq.operator(256, device="cpu")

Measured data are described by the same objects (``recon.tasks.CTTask.measured`` reads them)::

    acq = CTAcquisition(sinogram="sino.npy", angles="angles.txt", det_spacing=0.8, fov=250.0,
                        views=60, reference="full")
    meas = TASKS["ct"].measured(acq, "cpu", size=256, window=(-1000, 1000))

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

__all__ = ["CTAcquisition", "MRIAcquisition", "InpaintAcquisition", "parse_window", "read_mask_file",
           "read_angles", "check_distinct_angles", "select_views", "log_transform", "read_detector_field",
           "REFERENCE_METHODS", "PRELOG_EPS"]


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


# ---------------------------------------------------------------------------
# measured CT sinograms: view angles, view selection, pre-log counts
# ---------------------------------------------------------------------------
#: the largest angles file read (text or .npy), in bytes
_MAX_ANGLES_BYTES = 64 * 1024 ** 2
#: two view angles closer than this (radians, modulo 360 degrees) are the same view
_SAME_ANGLE = 1e-8
#: relative floor of the pre-log conversion (see :func:`log_transform`)
PRELOG_EPS = 1e-6
#: methods ``--reference full:METHOD`` may use for the full-view reference
REFERENCE_METHODS = ("fbp", "tv", "sirt", "cgls")


def _angle_numbers(path) -> np.ndarray:
    """The numbers of an angles file as float64: ``.npy`` (any real numeric array with one
    non-singleton axis) or text (numbers separated by whitespace, commas or newlines; ``#``
    starts a comment)."""
    from recon.io._util import require_file

    path = require_file(path, "--angles")
    if path.is_dir():
        raise ReconError(f"{path}: --angles needs a file (.npy or text), got a folder")
    if path.stat().st_size > _MAX_ANGLES_BYTES:
        raise ReconError(f"{path}: {path.stat().st_size} bytes is too large for a file of view angles "
                         f"(limit {_MAX_ANGLES_BYTES // 1024 ** 2} MiB)")
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise ReconError(f"{path}: cannot read this .npy file of view angles ({type(exc).__name__}: "
                             f"{exc}); save a 1-D array with numpy.save") from None
        if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "iuf":
            raise ReconError(f"{path}: the view angles must be a real numeric array, got "
                             f"{getattr(arr, 'dtype', type(arr).__name__)}")
        if arr.size == 0 or sum(d > 1 for d in arr.shape) > 1:
            raise ReconError(f"{path}: the view angles must be a 1-D array (one angle per view), got shape "
                             f"{arr.shape}")
        return arr.astype(np.float64).reshape(-1)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ReconError(f"{path}: not a text file of numbers; give the view angles as .npy or as text "
                         "(one number per line, or separated by spaces or commas)") from None
    values = []
    for line_no, line in enumerate(text.splitlines(), 1):
        for token in line.split("#", 1)[0].replace(",", " ").split():
            try:
                values.append(float(token))
            except ValueError:
                raise ReconError(f"{path}: line {line_no}: {token!r} is not a number; the angles file holds "
                                 "one angle per view (numbers separated by newlines, spaces or commas; "
                                 "# starts a comment)") from None
    if not values:
        raise ReconError(f"{path}: no view angles in the file (expected one number per view)")
    return np.asarray(values, dtype=np.float64)


def check_distinct_angles(radians: np.ndarray, label: str = "--angles", units: str = "deg") -> None:
    """Refuse two views at the same angle (modulo 360 degrees)."""
    a = np.mod(np.asarray(radians, dtype=np.float64), 2 * math.pi)
    if a.size < 2:
        return
    order = np.argsort(a, kind="stable")
    s = a[order]
    gaps = np.diff(np.concatenate([s, [s[0] + 2 * math.pi]]))
    hit = np.flatnonzero(gaps < _SAME_ANGLE)
    if hit.size:
        i, j = sorted((int(order[hit[0]]), int(order[(hit[0] + 1) % a.size])))
        value = np.rad2deg(radians[i]) if units == "deg" else radians[i]
        raise ReconError(f"{label}: views {i} and {j} (0-based) have the same angle ({value:g} {units}, equal "
                         f"modulo 360 degrees); {hit.size} repeated angle(s) in all. Each view needs its own "
                         "angle: remove the repeated views from the sinogram and the angles file (e.g. the "
                         "360-degree view of a 0..360 scan)")


def read_angles(path, units: str = "deg", n_views: int | None = None) -> np.ndarray:
    """View angles (radians, float64) from ``--angles FILE`` in ``units`` (``deg`` or ``rad``).

    Checked: a 1-D list of finite numbers, ``n_views`` of them when given (the sinogram's
    first axis), no two equal modulo 360 degrees."""
    _check(units in ("deg", "rad"), f"--angle-units must be deg or rad, got {units!r}")
    values = _angle_numbers(path)
    bad = ~np.isfinite(values)
    if bad.any():
        raise ReconError(f"{path}: {int(bad.sum())} view angle(s) are NaN or infinite (first at index "
                         f"{int(np.flatnonzero(bad)[0])}); every view needs a finite angle")
    if n_views is not None and values.size != n_views:
        raise ReconError(f"{path}: {values.size} view angles but the sinogram has {n_views} views (its first "
                         "axis); give exactly one angle per sinogram row, in the same order")
    radians = np.deg2rad(values) if units == "deg" else values
    check_distinct_angles(radians, str(path), units)
    return radians


def select_views(radians: np.ndarray, n: int, period: float) -> np.ndarray:
    """Indices (ascending, into the measured views) of ``n`` views spread evenly over the angles.

    The views are ordered by angle modulo ``period`` (pi for parallel beam, 2 pi for fan beam)
    and those at positions ``floor(k * m / n + 1/2)``, ``k = 0 .. n-1``, of that order are kept
    (``m`` measured views).  For an equispaced scan whose ``m`` is a multiple of ``n`` that is
    every ``(m/n)``-th view: the angles ``recon ct IMAGE --views n`` simulates over the same arc."""
    m = len(radians)
    n = int(n)
    if not 1 <= n <= m:
        raise ReconError(f"--views {n}: the sinogram has {m} measured views; choose 1 <= N <= {m} "
                         "(N < the measured count selects a sparse subset)")
    order = np.argsort(np.mod(np.asarray(radians, dtype=np.float64), period), kind="stable")
    positions = np.floor(np.arange(n) * m / n + 0.5).astype(np.int64)
    return np.sort(order[np.unique(positions)])


def read_detector_field(path, option: str, n_views: int, n_det: int, n_slices: int | None = None) -> np.ndarray:
    """A flat or dark field (``.npy``): one value per detector pixel, shape ``(n_det,)`` (or
    ``(1, n_det)``), or one row per view, ``(n_views, n_det)``; returned as ``(n_views|1, n_det)``
    float64.  For a stack of ``n_slices`` sinograms also one field per slice, ``(n_slices,
    n_views|1, n_det)``, returned as a read-only memory map (a slice's field: ``field[k]``,
    checked when it is used)."""
    from recon.case import check_finite
    from recon.io import open_npy, read_npy
    from recon.io._util import require_file
    from recon.io.images import npy_shape

    per_slice = f", or one field per slice, shape ({n_slices}, {n_views}, {n_det})" if n_slices else ""
    if n_slices is not None and len(npy_shape(require_file(path, option))[0]) == 3:
        arr = open_npy(path)
        if np.iscomplexobj(arr):
            raise ReconError(f"{path}: {option} must be real detector counts, got a complex array")
        if arr.shape[0] != n_slices or arr.shape[1] not in (1, n_views) or arr.shape[2] != n_det:
            raise ReconError(f"{path}: {option} has shape {arr.shape} but the sinogram stack is ({n_slices}, "
                             f"{n_views}, {n_det}) (slices, views, detectors); give one field for every slice, "
                             f"shape ({n_slices}, {n_views}, {n_det}) or ({n_slices}, 1, {n_det}), or one shared by "
                             f"all slices, shape ({n_det},) or ({n_views}, {n_det})")
        return arr
    arr = np.asarray(read_npy(path))
    if np.iscomplexobj(arr):
        raise ReconError(f"{path}: {option} must be real detector counts, got a complex array")
    check_finite(arr, f"{path} ({option})")
    shape = arr.shape
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != n_det or arr.shape[0] not in (1, n_views):
        raise ReconError(f"{path}: {option} has shape {shape} but the sinogram is ({n_views}, {n_det}) "
                         f"(views, detectors); give one value per detector pixel, shape ({n_det},), or one row "
                         f"per view, shape ({n_views}, {n_det}){per_slice}")
    return arr.astype(np.float64)


def log_transform(counts: np.ndarray, flat: np.ndarray, dark=0.0, eps: float = PRELOG_EPS):
    """Raw counts -> line integrals ``p = -log(max(I - D, e) / max(F - D, e))``.

    ``I``: the sinogram's counts, ``F``: the flat (open-beam) field, ``D``: the dark field
    (broadcast over views), ``e = eps * max(F - D)``: transmissions below ``eps`` of the
    brightest flat pixel are clamped (a ray with ``I - D <= 0``, no photons, gets
    ``p = -log(e / (F - D))`` instead of infinity).  Returns ``(p, stats)``; ``stats``
    counts the clamped entries."""
    counts = np.asarray(counts, dtype=np.float64)
    signal = counts - dark
    open_beam = np.broadcast_to(np.asarray(flat, dtype=np.float64) - dark, counts.shape)
    peak = float(open_beam.max())
    if not peak > 0:
        raise ReconError("--flat: the flat field is nowhere above the dark field (max(F - D) = "
                         f"{peak:g}); check that --flat and --dark are not swapped and hold raw counts")
    floor = eps * peak
    low_signal = signal <= floor
    low_flat = open_beam <= floor
    p = -np.log(np.maximum(signal, floor) / np.maximum(open_beam, floor))
    stats = {"formula": "p = -log(max(I - D, e) / max(F - D, e))", "eps_relative": eps, "e": floor,
             "clamped_counts": int(low_signal.sum()), "nonpositive_counts": int((signal <= 0).sum()),
             "clamped_flat": int(low_flat.sum()), "entries": int(signal.size)}
    return p, stats


def _shape(size) -> tuple[int, int]:
    """``S`` -> ``(S, S)``; ``(rows, cols)`` stays."""
    if isinstance(size, (tuple, list)):
        rows, cols = (int(v) for v in size)
        return rows, cols
    return int(size), int(size)


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

    def simulation_operator(self, op):
        """The operator that simulates the data reconstructed with ``op`` (default: ``op``)."""
        return op

    def gaussian(self):
        from forward_models.physics import NoNoise, RelativeGaussian

        return RelativeGaussian(self.noise) if self.noise else NoNoise()


@dataclass(frozen=True)
class CTAcquisition(_Acquisition):
    """Sparse-view / limited-angle CT, parallel or fan beam (distances in image widths)."""

    views: int | None = None
    limited_angle: float | None = None
    geometry: str = "parallel"
    #: fan beam, in image widths; None: from the DICOM input's DistanceSourceToPatient /
    #: DistanceSourceToDetector when present (:meth:`with_scanner_geometry`), else 2 and 4
    source_distance: float | None = None
    detector_distance: float | None = None
    photons: float | None = None
    noise: float | None = None
    window: tuple | None = None
    units: str = "auto"
    fov: float | None = None
    # measured data instead of a simulation
    sinogram: str | None = None
    sinogram_units: str = "image"
    sigma_y: float | None = None
    angles: str | None = None          # file of the measured view angles
    angle_units: str = "deg"
    det_spacing: float | None = None   # detector pixel pitch in mm (needs fov)
    flat: str | None = None            # raw counts: open-beam field
    dark: str | None = None            # raw counts: dark field
    reference: str | None = None       # 'full' or 'full:METHOD'
    #: simulate on a K-times finer grid (forward_models.FinerGridProjection) than the one the
    #: reconstruction uses: no inverse crime; 1 = the reconstruction's own operator
    simulate_finer: int = 1

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
        _check(self.sinogram_units in ("image", "attenuation", "counts"),
               f"--sinogram-units must be image, attenuation or counts, got {self.sinogram_units!r}")
        _check(not (self.photons is not None and self.noise), "give either --photons or --noise, not both")
        self._check_measured()
        _positive(self.simulate_finer, "--simulate-finer", integer=True)
        if self.simulate_finer > 1:
            _check(not self.sinogram, "--simulate-finer refines a simulation; measured data (--sinogram) were "
                                      "not simulated: leave it out")
            _check(self.geometry == "parallel", "--simulate-finer supports --geometry parallel only; leave it out "
                                                "for fan beam")
        if self.geometry == "fan":
            # distances are in image widths; the source must stay outside the image's circumscribed circle
            half_diagonal = math.sqrt(2) / 2
            sd, dd = self.fan_distances
            _check(sd > half_diagonal,
                   f"--source-distance {sd:g} puts the X-ray source inside the image: it is in "
                   f"multiples of the image width and must exceed {half_diagonal:.3f} (half the image diagonal); "
                   "e.g. --source-distance 2")
            _check(dd >= sd,
                   f"--detector-distance {dd:g} is shorter than --source-distance "
                   f"{sd:g} (both from the source, in image widths); the detector must lie beyond "
                   "the rotation axis, e.g. --detector-distance 4")
            for option, value in (("--source-distance", sd), ("--detector-distance", dd)):
                _check(value <= 1000, f"{option} {value:g} is more than 1000 image widths: that is a parallel "
                                      "beam in all but name; use --geometry parallel")
        object.__setattr__(self, "window", parse_window(self.window))

    @property
    def fan_distances(self) -> tuple[float, float]:
        """``(source, detector)`` distances from the source in image widths (defaults 2 and 4)."""
        return (2.0 if self.source_distance is None else float(self.source_distance),
                4.0 if self.detector_distance is None else float(self.detector_distance))

    def with_scanner_geometry(self, source, crop_side: int) -> tuple["CTAcquisition", str | None]:
        """Fan beam without explicit distances: the scanner's own from a DICOM input's
        DistanceSourceToPatient / DistanceSourceToDetector (mm), divided by the field of view
        reconstructed (native pixel spacing x ``crop_side`` pixels).  Returns the acquisition
        and a note saying where the geometry came from (None when nothing changed)."""
        from dataclasses import replace

        if self.geometry != "fan" or (self.source_distance is not None and self.detector_distance is not None):
            return self, None
        ref = getattr(source, "reference", None)
        datasets = getattr(ref, "datasets", None) or []
        k = source.slice_index or 0
        ds = datasets[k] if 0 <= k < len(datasets) else None
        dsp = ds.get("DistanceSourceToPatient") if ds is not None else None
        dsd = ds.get("DistanceSourceToDetector") if ds is not None else None
        fov = (source.dx or 0.0) * crop_side
        try:
            dsp, dsd = float(dsp), float(dsd)
        except (TypeError, ValueError):
            return self, ("fan-beam geometry: default distances (2 and 4 image widths); the input has no "
                          "DistanceSourceToPatient/DistanceSourceToDetector tags")
        if not (fov > 0 and dsd >= dsp > fov / math.sqrt(2)):
            return self, (f"fan-beam geometry: default distances; the scanner tags (source-axis {dsp:g} mm, "
                          f"source-detector {dsd:g} mm) do not fit a {fov:.1f} mm field of view")
        sd = self.source_distance if self.source_distance is not None else dsp / fov
        dd = self.detector_distance if self.detector_distance is not None else dsd / fov
        return replace(self, source_distance=sd, detector_distance=dd), (
            f"fan-beam geometry from the scanner's DICOM tags: source-axis {dsp:g} mm, source-detector {dsd:g} mm "
            f"over a {fov:.1f} mm field of view ({sd:.3f} and {dd:.3f} image widths)")

    def _check_measured(self):
        """The options that describe a measured sinogram (--sinogram) and only that."""
        _check(self.angle_units in ("deg", "rad"), f"--angle-units must be deg or rad, got {self.angle_units!r}")
        _positive(self.det_spacing, "--det-spacing")
        if not self.sinogram:
            given = [o for o, v in (("--angles", self.angles), ("--det-spacing", self.det_spacing),
                                    ("--flat", self.flat), ("--dark", self.dark), ("--reference", self.reference))
                     if v is not None]
            if self.sinogram_units != "image":
                given.append("--sinogram-units")
            _check(not given, f"{', '.join(given)} describe{'s' if len(given) == 1 else ''} a measured sinogram: "
                              "use with --sinogram FILE (a simulation derives them from --views and the image)")
            return
        _check(not (self.photons is not None or self.noise),
               "--photons / --noise simulate noise on a simulated sinogram; measured data (--sinogram) carry "
               "their own noise: leave them out (give its level with --sigma-y)")
        _check(not (self.angles and self.limited_angle is not None),
               "give either --angles FILE (the measured angles) or --limited-angle DEG (equispaced views over "
               "that arc), not both")
        _check(self.det_spacing is None or self.fov is not None,
               "--det-spacing MM needs --fov MM: the detector pitch in mm becomes image pixels through the "
               "pixel size --fov / --size")
        _check(self.dark is None or self.flat is not None,
               "--dark needs --flat: the pre-log conversion p = -log((I - D) / (F - D)) needs the flat field F")
        if self.flat is not None:
            _check(self.sinogram_units == "counts",
                   f"--flat/--dark convert raw detector counts to line integrals; they cannot be used with "
                   f"--sinogram-units {self.sinogram_units} (leave --sinogram-units out, or give counts)")
        _check(self.sinogram_units != "counts" or self.flat is not None,
               "--sinogram-units counts needs --flat FILE (the open-beam counts, and --dark FILE if any) to "
               "convert the counts to line integrals")
        if self.reference is not None:
            self.reference_method()

    def reference_method(self) -> str | None:
        """``--reference full`` -> 'auto'; ``full:METHOD`` -> METHOD; None without --reference."""
        if self.reference is None:
            return None
        kind, _, method = str(self.reference).partition(":")
        _check(kind == "full" and (not _ or method in REFERENCE_METHODS),
               f"--reference must be full or full:METHOD (METHOD one of {', '.join(REFERENCE_METHODS)}), got "
               f"{self.reference!r}; full: the reconstruction from all measured views is the reference for "
               "metrics.json")
        return method or "auto"

    @property
    def measured(self) -> str | None:
        return self.sinogram

    @property
    def noisy(self) -> bool:
        return bool(self.photons or self.noise or self.sigma_y or self.sinogram)

    @property
    def period(self) -> float:
        """Angles that differ by this (radians) measure the same lines: pi parallel, 2 pi fan."""
        return 2 * math.pi if self.geometry == "fan" else math.pi

    def describe(self) -> dict:
        keys = ["views", "limited_angle", "geometry", "photons", "noise", "window", "fov"]
        if self.geometry == "fan":
            keys[3:3] = ["source_distance", "detector_distance"]
        if self.units != "auto":
            keys.append("units")
        keys += [k for k in ("angles", "det_spacing", "reference") if getattr(self, k) is not None]
        if self.simulate_finer > 1:
            keys.append("simulate_finer")
        d = self.settings()
        return {k: d[k] for k in keys}

    def view_angles(self, n_views: int) -> torch.Tensor:
        """``n_views`` equispaced angles (radians) over --limited-angle, else 180 (parallel) / 360 (fan) degrees."""
        from forward_models import view_angles

        fan = self.geometry == "fan"
        arc = self.limited_angle if self.limited_angle is not None else (360.0 if fan else 180.0)
        return view_angles(n_views, arc)

    def det_spacing_pixels(self, size: int) -> float | None:
        """--det-spacing (mm) in image pixels of the ``size``-pixel working image (pixel = --fov / size)."""
        if self.det_spacing is None:
            return None
        return float(self.det_spacing) / (float(self.fov) / int(size))

    def operator(self, size, device=None, *, n_views: int | None = None, n_det: int | None = None,
                 angles=None, det_spacing: float | None = None, seed=0):
        """The projector at the working ``size``: ``angles`` (radians) if given, else ``n_views``
        (default --views) equispaced ones; ``n_det`` detector pixels (default: covering the image)
        spaced ``det_spacing`` image pixels (default: 1 at the rotation axis for parallel beam,
        at the detector for fan beam, where the default is the magnification)."""
        from forward_models import FanBeamCT, ParallelBeamCT

        rows, cols = _shape(size)
        if rows != cols:
            raise ReconError(f"CT reconstructs a square image; got a {rows}x{cols} working size")
        size = rows

        if angles is None:
            n_views = n_views or self.views
            if n_views is None:
                raise ReconError("--views N is required (the number of projection views to simulate)")
            angles = self.view_angles(n_views)
        if self.geometry == "fan":
            sd, dd = self.fan_distances
            op = FanBeamCT(size, angles, source_distance=sd * size, detector_distance=dd * size, n_det=n_det,
                           det_spacing=det_spacing)
        else:
            op = ParallelBeamCT(size, angles, n_det=n_det, det_spacing=1.0 if det_spacing is None else det_spacing)
        return op.to(device)

    def simulation_operator(self, op):
        """The operator that simulates the data reconstructed with ``op``: ``op`` itself, or with
        --simulate-finer K the same geometry on a K-times finer grid."""
        if self.simulate_finer <= 1:
            return op
        from forward_models import FinerGridProjection

        return FinerGridProjection(op, self.simulate_finer)

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

    def operator(self, size, device=None, *, seed: int = 0):
        """Undersampled Cartesian MRI at the working ``size`` (``S`` or ``(rows, cols)``)."""
        from forward_models import CartesianMRI

        shape = _shape(size)
        return CartesianMRI(self.make_mask(shape, seed), shape=shape).to(device)

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

    def operator(self, size, device=None, *, seed: int = 0):
        """Missing pixels at the working ``size`` (``S`` or ``(rows, cols)``)."""
        from forward_models import Inpainting

        shape = _shape(size)
        return Inpainting(self.make_mask(shape, seed), shape=shape).to(device)

    def noise_model(self, window=None, pixel_mm: float = 1.0):
        return self.gaussian()
