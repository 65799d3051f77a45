"""The in-memory image volume every reader returns.

Axis and geometry conventions (shared by DICOM and NIfTI):

* ``Volume.data`` has shape ``(n_slices, rows, cols)``; ``data[k, r, c]`` is
  the pixel in row ``r`` and column ``c`` of slice ``k``.
* ``Volume.spacing`` is ``(dz, dy, dx)`` in millimetres: ``dz`` between
  slices, ``dy`` between rows, ``dx`` between columns.  Images without
  geometry (PNG, JPEG, ``.npy``) get ``(1.0, 1.0, 1.0)``.
* ``Volume.affine`` (4x4, or ``None`` when the input has no geometry) maps the
  *reversed* index vector ``(c, r, k, 1)`` to **RAS+** world coordinates in
  millimetres, i.e. exactly the NIfTI convention for an array
  ``nifti[i, j, k] == data[k, j, i]``.  DICOM positions are in LPS+ (x to the
  patient's left, y to the posterior, z to the head); they are converted
  with ``diag(-1, -1, 1, 1) @ affine_lps``.  For a DICOM series the third
  column is the actual step between consecutive slice positions, so a gantry
  tilt shows up as shear rather than being hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: LPS (DICOM) <-> RAS (NIfTI) conversion: flip the first two world axes.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(eq=False)
class Volume:
    """A stack of 2D slices with its geometry and source headers.

    Attributes
    ----------
    data:
        ``float32`` array ``(n_slices, rows, cols)`` in modality units
        (Hounsfield units for CT).  ``complex64`` only when the source holds
        complex values (a complex ``.npy`` or NIfTI).
    spacing:
        ``(dz, dy, dx)`` in millimetres.
    affine:
        4x4 voxel-to-RAS matrix (see the module docstring) or ``None``.
    datasets:
        For DICOM, one pydicom header per slice (pixel data not kept; for a
        multi-frame object the same header object repeats for each frame).
        Empty for other formats.
    meta:
        ``modality``, ``series_uid``, ``series_description``, ``patient_id``,
        ``window_center``, ``window_width`` (``None`` when absent), ``source``
        (the path that was read) and format-specific entries (``files``,
        ``positions`` (LPS), ``orientation``, ``units``, ...).
    """

    data: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    affine: np.ndarray | None = None
    datasets: list = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_slices(self) -> int:
        return int(self.data.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def middle_index(self) -> int:
        """Index of the middle slice (``n_slices // 2``)."""
        return self.n_slices // 2

    def slice(self, index: int | None = None) -> np.ndarray:
        """One 2D slice (the middle one by default)."""
        return self.data[self.middle_index() if index is None else index]

    def __repr__(self) -> str:  # keep reprs short: no arrays, no headers
        return (f"Volume(shape={self.shape}, dtype={self.data.dtype}, "
                f"spacing={tuple(round(float(s), 4) for s in self.spacing)}, "
                f"modality={self.meta.get('modality')!r}, "
                f"source={str(self.meta.get('source'))!r})")
