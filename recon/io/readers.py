"""One entry point for image inputs: :func:`read_input` picks the reader.

The format is chosen from the path: a folder is read as DICOM; otherwise the
file name suffix is looked up in :data:`SUFFIX_FORMATS`; a file with an
unknown or no suffix is read as DICOM when its content looks like DICOM
(preamble ``DICM`` or a leading group 0002/0008 tag).  K-space files are not
images: read them with :func:`recon.io.read_kspace`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from recon.errors import ReconError
from recon.io.dicom import is_dicom_file, read_dicom
from recon.io.images import IMAGE_SUFFIXES, read_image
from recon.io.nifti import read_nifti
from recon.io.volume import Volume

__all__ = ["read_input", "input_format", "SUFFIX_FORMATS", "SUPPORTED_FORMATS"]

#: File name suffix (lower case) -> format name.
SUFFIX_FORMATS: dict[str, str] = {
    ".dcm": "dicom", ".dicom": "dicom", ".ima": "dicom",
    ".nii": "nifti", ".nii.gz": "nifti",
    **{s: "image" for s in IMAGE_SUFFIXES},
    ".npy": "image",
}

SUPPORTED_FORMATS = ("DICOM file or folder (any or no extension)", ".nii", ".nii.gz",
                     *IMAGE_SUFFIXES, ".npy")

_KSPACE_SUFFIXES = (".h5", ".hdf5", ".cfl", ".hdr", ".dat")


def input_format(path: str | os.PathLike) -> str | None:
    """``'dicom'``, ``'nifti'``, ``'image'`` or ``None`` (not an image input)."""
    p = Path(path)
    if p.is_dir():
        return "dicom"
    name = p.name.lower()
    for suffix in sorted(SUFFIX_FORMATS, key=len, reverse=True):  # '.nii.gz' before '.gz'
        if name.endswith(suffix):
            return SUFFIX_FORMATS[suffix]
    if p.is_file() and is_dicom_file(p):
        return "dicom"
    return None


def _image_volume(path: Path, series_uid: str | None) -> Volume:
    arr = read_image(path)
    meta = {"format": "image", "source": str(path), "modality": None, "series_uid": None,
            "series_description": path.stem, "patient_id": None, "window_center": None,
            "window_width": None, "files": [str(path)], "complex": bool(np.iscomplexobj(arr))}
    return Volume(data=arr[None], spacing=(1.0, 1.0, 1.0), affine=None, datasets=[], meta=meta)


_READERS: dict[str, Callable[[Path, str | None], Volume]] = {
    "dicom": lambda p, uid: read_dicom(p, series_uid=uid),
    "nifti": lambda p, uid: read_nifti(p),
    "image": _image_volume,
}


def read_input(path: str | os.PathLike, series_uid: str | None = None) -> Volume:
    """Read any supported image input as a :class:`Volume`.

    ``series_uid`` selects a series in a DICOM folder holding several.  A 2D
    image becomes a one-slice volume without geometry (``affine=None``).
    """
    p = Path(path)
    if not p.exists():
        raise ReconError(f"{p}: no such file or folder; check the input path")
    fmt = input_format(p)
    if fmt is None:
        hint = ""
        if p.name.lower().endswith(_KSPACE_SUFFIXES):
            hint = " (this looks like MRI k-space: read it with read_kspace / --kspace)"
        raise ReconError(f"{p}: unsupported input format{hint}; supported: "
                         f"{', '.join(SUPPORTED_FORMATS)}")
    return _READERS[fmt](p, series_uid)
