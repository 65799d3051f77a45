"""NIfTI-1/2 volumes (``.nii``, ``.nii.gz``) via nibabel.

Axis mapping (see also :mod:`recon.io.volume`)::

    Volume.data[k, j, i] == nifti_array[i, j, k]

i.e. ``Volume.data = nifti_array.transpose(2, 1, 0)``: the slice axis is the
*last* NIfTI axis, rows are the second NIfTI axis and columns the first.  The
NIfTI affine (voxel ``(i, j, k)`` -> RAS+ mm) is kept unchanged as
``Volume.affine``, so it maps ``(col, row, slice)`` exactly as the affine of a
DICOM volume does.  ``spacing = (dz, dy, dx) = (zoom_k, zoom_j, zoom_i)``.

A 2D NIfTI becomes one slice; a 4D NIfTI with a single volume is squeezed;
more volumes are refused (split them first).  No reorientation is done.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np

from recon.errors import ReconError
from recon.io._util import atomic_output, check_size, quiet, require_file, short
from recon.io.volume import Volume

__all__ = ["read_nifti", "write_nifti", "NIFTI_SUFFIXES", "is_nifti_path"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")

#: deflate expands at most ~1032:1, so a .nii.gz cannot hold more data than this times its size.
_GZIP_MAX_RATIO = 1100


def is_nifti_path(path: str | os.PathLike) -> bool:
    name = Path(path).name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _nifti_suffix(path: Path) -> str:
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"


def read_nifti(path: str | os.PathLike) -> Volume:
    """Read a NIfTI volume; see the module docstring for the axis mapping."""
    import nibabel as nib

    path = require_file(path)
    try:
        with quiet():
            img = nib.load(str(path))
            _check_nifti_size(path, img)
            raw = img.dataobj
            if np.issubdtype(img.get_data_dtype(), np.complexfloating):
                arr = np.asarray(raw).astype(np.complex64)
            else:
                arr = np.asarray(img.get_fdata(dtype=np.float32))
            affine = np.array(img.affine, dtype=np.float64)
            zooms = tuple(float(z) for z in img.header.get_zooms())
            header = img.header
    except ReconError:
        raise
    except Exception as exc:  # ImageFileError, EOFError, zlib/gzip errors, OSError, ...
        raise ReconError(f"{path}: cannot read this NIfTI file: it is truncated, corrupt or not "
                         f"NIfTI ({short(exc)}); re-export or re-download it") from exc
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ReconError(f"{path}: NIfTI array has shape {arr.shape}; only 2D/3D volumes are "
                         "supported - split the 4D series into 3D volumes first "
                         "(e.g. fslsplit or nibabel.four_to_three)")
    if arr.size == 0:
        raise ReconError(f"{path}: NIfTI array is empty (shape {arr.shape}); the header is corrupt")
    zooms = (zooms + (1.0, 1.0, 1.0))[:3]
    notes = {}
    if not all(math.isfinite(z) and z > 0 for z in zooms):
        notes["spacing_known"] = False
        notes["header_pixdim"] = [float(z) for z in zooms]
        zooms = tuple(z if math.isfinite(z) and z > 0 else 1.0 for z in zooms)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        warnings.warn(f"{path}: the NIfTI header affine is not finite; using voxel sizes {zooms} "
                      "without orientation or origin", UserWarning, stacklevel=2)
        notes["header_affine_invalid"] = True
        affine = np.diag([zooms[0], zooms[1], zooms[2], 1.0])
    data = np.ascontiguousarray(arr.transpose(2, 1, 0))
    descrip = header.get("descrip")
    meta = {
        "format": "nifti",
        "source": str(path),
        "modality": None,
        "series_uid": None,
        "series_description": (bytes(descrip).split(b"\0")[0].decode("latin-1").strip()
                               if descrip is not None else ""),
        "patient_id": None,
        "window_center": None,
        "window_width": None,
        "files": [str(path)],
        "axes": "data[k, j, i] == nifti[i, j, k]",
        "nifti_shape": tuple(int(s) for s in arr.shape),
        **notes,
    }
    return Volume(data=data, spacing=(zooms[2], zooms[1], zooms[0]), affine=affine,
                  datasets=[], meta=meta)


def _check_nifti_size(path: Path, img) -> None:
    """Refuse dims the file cannot hold (or too large to decode) before nibabel allocates them."""
    dtype = np.dtype(img.get_data_dtype())
    shape = tuple(int(d) for d in img.shape)
    size = path.stat().st_size
    if path.name.lower().endswith(".gz"):
        available = size * _GZIP_MAX_RATIO
    else:
        available = size - int(img.header.get_data_offset())
    check_size(path, shape, "NIfTI image", max(dtype.itemsize, 8 if dtype.kind == "c" else 4),
               available=available, stored_itemsize=dtype.itemsize)


def write_nifti(array: np.ndarray | Volume, path: str | os.PathLike,
                affine: np.ndarray | None = None) -> Path:
    """Write ``array`` in Volume layout ``(slices, rows, cols)`` (or 2D
    ``(rows, cols)``) as NIfTI with ``affine`` (default: the Volume's affine,
    else identity), atomically.

    The array is transposed back to NIfTI order ``(cols, rows, slices)``, so
    ``read_nifti(write_nifti(v.data, p, v.affine))`` returns the same data and
    affine.  NIfTI stores the affine (sform) as float32: affines whose entries
    are float32-representable round-trip exactly, others to float32 precision.
    Real data is stored as float32, complex as complex64.
    """
    import nibabel as nib

    if isinstance(array, Volume):
        if affine is None:
            affine = array.affine
        array = array.data
    path = Path(path)
    if not is_nifti_path(path):
        raise ReconError(f"{path}: NIfTI output must end in .nii or .nii.gz; rename the output")
    arr = np.asarray(array)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ReconError(f"{path}: cannot write an array of shape {arr.shape} as NIfTI; "
                         "expected (slices, rows, cols) or (rows, cols)")
    arr = arr.astype(np.complex64 if np.iscomplexobj(arr) else np.float32)
    aff = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
        raise ReconError(f"{path}: the affine must be a finite 4x4 matrix, got shape {aff.shape}")
    with np.errstate(over="ignore"):
        aff32 = aff.astype(np.float32)
    if not np.all(np.isfinite(aff32)):
        raise ReconError(f"{path}: the affine has entries beyond NIfTI's float32 range "
                         f"({np.abs(aff).max():.3g}); check the voxel size (e.g. --fov)")
    # the header is filled here, not by nibabel from the affine: nibabel's qform
    # decomposition fails on degenerate affines (zero or denormal voxel sizes)
    img = nib.Nifti1Image(np.ascontiguousarray(arr.transpose(2, 1, 0)), None)
    with quiet(), np.errstate(all="ignore"):
        img.header.set_sform(aff, code=1)
        try:
            img.header.set_qform(aff, code=1)
        except Exception:  # a sheared or degenerate affine has no qform; the sform carries it
            img.header.set_qform(None, code=0)
            zooms = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
            if np.all(np.isfinite(zooms)):
                img.header.set_zooms(tuple(float(z) for z in zooms))
    with atomic_output(path, _nifti_suffix(path)) as tmp:
        try:
            nib.save(img, str(tmp))
        except OSError:
            raise
        except Exception as exc:
            raise ReconError(f"{path}: nibabel could not write the image ({short(exc)})") from exc
    return path
