"""Geometry of derived outputs: a reconstruction written back in its input's frame.

The working image is a square centre crop of the input, resized; these helpers
carry the crop and the resize into the DICOM positions and the NIfTI affine so
that a derived series overlays its source.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from recon.io.dicom import write_dicom_series
from recon.io.nifti import write_nifti

__all__ = ["slice_affine", "cropped_reference", "write_image_outputs"]


def slice_affine(reference, k: int, crop, size: int) -> np.ndarray | None:
    """Voxel->RAS affine of slice ``k`` after the square crop and resize to ``size``."""
    aff = getattr(reference, "affine", None)
    if aff is None:
        return None
    top, left, m = crop
    f = m / size
    idx = np.array([[f, 0, 0, left + 0.5 * f - 0.5],
                    [0, f, 0, top + 0.5 * f - 0.5],
                    [0, 0, 1, k],
                    [0, 0, 0, 1]], dtype=np.float64)
    return np.asarray(aff, dtype=np.float64) @ idx


def cropped_reference(vol, crop):
    """A shallow copy of a DICOM Volume describing only the square crop (for write_dicom_series)."""
    top, left, m = crop
    ref = copy.copy(vol)
    ref.data = vol.data[:, top:top + m, left:left + m]
    ref.meta = dict(vol.meta)
    positions, orient = vol.meta.get("positions"), vol.meta.get("orientation")
    if positions is not None and orient is not None and (top or left):
        dy, dx = vol.meta.get("pixel_spacing") or vol.spacing[1:]
        row_dir, col_dir = np.asarray(orient[:3], float), np.asarray(orient[3:], float)
        ref.meta["positions"] = [tuple(np.asarray(p, float) + left * dx * row_dir + top * dy * col_dir)
                                 for p in positions]
    return ref


def write_image_outputs(stage: Path, values: np.ndarray, truth, method: str, settings: dict) -> list[str]:
    """The reconstruction (``values`` in the input's units, one slice or a stack) into
    ``stage``: a derived DICOM series (``dicom/``) for DICOM input, else ``recon.nii.gz``
    with the slice's affine (or the working pixel size).  Returns the written names."""
    src = truth.source if truth is not None else None
    if src is not None and src.fmt == "dicom" and src.reference is not None:
        ref = cropped_reference(src.reference, truth.crop)
        files = write_dicom_series(values, ref, stage / "dicom", method, settings,
                                   slice_indices=src.slice_indices)
        return [str(Path("dicom") / f.name) for f in files]
    affine = None
    if src is not None and src.fmt == "nifti" and src.reference is not None:
        affine = slice_affine(src.reference, src.slice_index, truth.crop, values.shape[-1])
    elif truth is not None:
        affine = np.diag([truth.pixel_mm, truth.pixel_mm, 1.0, 1.0])
    write_nifti(values, stage / "recon.nii.gz", affine=affine)
    return ["recon.nii.gz"]
