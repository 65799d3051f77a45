"""The case type: one slice or a stack of slices, native and on the working scale.

* :class:`Source` -- the input image(s) in native units (HU, intensities),
  with what is needed to write outputs back in the input's geometry: format,
  modality, pixel spacing, the source :class:`recon.io.Volume` and the slice
  indices taken from it.  ``image`` is ``(rows, cols)`` for one slice or
  ``(slices, rows, cols)`` for a stack.
* :class:`Truth` -- the ground truth on the [0, 1] working scale
  (``(S, S)`` or ``(slices, S, S)``) and how to map it back to the input's units.

Readers: :func:`load_source` (a file or folder, one slice or a range) and
:func:`source_from_case` (a discovered :class:`recon.io.Case`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recon.errors import ReconError
from recon.preprocess import unit_to_hu

__all__ = ["Source", "Truth", "load_source", "source_from_case", "check_finite"]


def check_finite(img: np.ndarray, label: str) -> None:
    if not np.all(np.isfinite(img)):
        n = int(np.size(img) - np.count_nonzero(np.isfinite(img)))
        raise ReconError(f"{label}: contains {n} NaN or infinite value(s); clean the data first "
                         "(e.g. numpy.nan_to_num) and retry")


@dataclass(eq=False)
class Source:
    """Input image(s) in native units plus what is needed to write outputs."""

    image: np.ndarray                 # (rows, cols) or (slices, rows, cols), float32
    path: str
    fmt: str                          # 'dicom' | 'nifti' | 'image'
    modality: str | None = None       # DICOM Modality ('CT', 'MR', ...) or None
    dx: float | None = None           # mm per native pixel (None: unknown)
    reference: Any = None             # recon.io.Volume (DICOM/NIfTI) or None
    slice_index: int | None = None    # first slice taken from the reference volume
    name: str = ""

    @property
    def n_slices(self) -> int:
        return 1 if self.image.ndim == 2 else int(self.image.shape[0])

    @property
    def slice_indices(self) -> list[int | None]:
        if self.slice_index is None:
            return [None] * self.n_slices
        return list(range(self.slice_index, self.slice_index + self.n_slices))


@dataclass(eq=False)
class Truth:
    """The ground truth on the [0, 1] working scale and how to map it back."""

    x: np.ndarray                     # (S, S) or (slices, S, S) float32 in [0, 1]
    source: Source
    units: str                        # 'HU' or 'intensity'
    scale: float = 1.0                # intensity: native = x * scale
    window: tuple | None = None       # HU window when units == 'HU'
    crop: tuple = (0, 0, 0, 0)        # (top, left, rows, cols) of the input region used (native pixels)
    pixel_mm: float = 1.0             # mm per pixel at the working size (along a row)

    @property
    def size(self) -> int:
        """The working width (= height for a square working image)."""
        return int(self.x.shape[-1])

    @property
    def shape(self) -> tuple[int, int]:
        """The working ``(rows, cols)``."""
        return int(self.x.shape[-2]), int(self.x.shape[-1])

    def batch(self, device=None) -> torch.Tensor:
        """The slices as a ``(B, S, S)`` tensor (B = 1 for one slice)."""
        x = torch.from_numpy(self.x)
        return (x[None] if x.dim() == 2 else x).to(device)

    def to_units(self, x01: np.ndarray) -> np.ndarray:
        """[0, 1] working scale -> the input's units (HU, or the input intensity)."""
        if self.units == "HU":
            return unit_to_hu(x01, self.window)
        return (np.asarray(x01, dtype=np.float32) * self.scale).astype(np.float32)


def load_source(path, series_uid: str | None = None, slice_index: int | None = None,
                n_slices: int = 1, volume=None) -> Source:
    """Read a ground-truth input (DICOM file/folder, NIfTI, PNG/JPEG/TIFF, .npy).

    Takes slice ``slice_index`` (default: the middle one) or, with ``n_slices
    > 1``, that many consecutive slices from it as a stack.  ``volume``: the
    :class:`recon.io.Volume` already read from ``path`` (not read again)."""
    from recon.io import read_input

    vol = volume if volume is not None else read_input(path, series_uid=series_uid)
    n = vol.n_slices
    k = vol.middle_index() if slice_index is None else int(slice_index)
    if not 0 <= k < n:
        raise ReconError(f"{path}: --slice {slice_index} is out of range; the input has {n} "
                         f"slice(s) (0..{n - 1})")
    if n_slices < 1 or k + n_slices > n:
        raise ReconError(f"{path}: {n_slices} slice(s) from slice {k} do not fit in its {n} slice(s)")
    img = np.asarray(vol.data[k] if n_slices == 1 else vol.data[k:k + n_slices])
    if np.iscomplexobj(img):
        img = np.abs(img)
    img = img.astype(np.float32)
    check_finite(img, str(path))
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
    check_finite(img, str(case.source))
    dx = None
    if case.kind == "dicom":
        dx = _dicom_pixel_spacing(case.source)
    elif case.kind == "nifti":
        ref = case.reference
        dx = float(ref.spacing[2]) if ref is not None else None
    return Source(image=img, path=str(case.source), fmt=case.kind, modality=case.modality, dx=dx,
                  reference=None, slice_index=case.slice_index, name=case.name)
