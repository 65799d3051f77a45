"""Geometry of derived outputs: a reconstruction written back in its input's frame.

The working image is the input (MRI, inpainting) or its centred square (CT), perhaps resized; these helpers
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


def _crop4(crop) -> tuple[int, int, int, int]:
    """``(top, left, rows, cols)`` (a 3-tuple ``(top, left, side)`` is a square)."""
    return tuple(crop) if len(crop) == 4 else (crop[0], crop[1], crop[2], crop[2])


def slice_affine(reference, k: int, crop, shape) -> np.ndarray | None:
    """Voxel->RAS affine of slice ``k`` after the crop ``(top, left, rows, cols)`` and the resize
    to ``shape`` (``(rows, cols)``, or one int for a square)."""
    aff = getattr(reference, "affine", None)
    if aff is None:
        return None
    top, left, rows, cols = _crop4(crop)
    out_r, out_c = (shape, shape) if np.isscalar(shape) else tuple(shape)[-2:]
    fr, fc = rows / out_r, cols / out_c
    idx = np.array([[fc, 0, 0, left + 0.5 * fc - 0.5],
                    [0, fr, 0, top + 0.5 * fr - 0.5],
                    [0, 0, 1, k],
                    [0, 0, 0, 1]], dtype=np.float64)
    return np.asarray(aff, dtype=np.float64) @ idx


def cropped_reference(vol, crop):
    """A shallow copy of a DICOM Volume describing only the crop (for write_dicom_series)."""
    top, left, rows, cols = _crop4(crop)
    ref = copy.copy(vol)
    ref.data = vol.data[:, top:top + rows, left:left + cols]
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
        affine = slice_affine(src.reference, src.slice_index, truth.crop, values.shape[-2:])
    elif truth is not None:
        affine = np.diag([truth.pixel_mm, truth.pixel_mm, 1.0, 1.0])
    write_nifti(values, stage / "recon.nii.gz", affine=affine)
    return ["recon.nii.gz"]
