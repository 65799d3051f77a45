"""Reading and writing medical images and k-space.

Images become a :class:`Volume` (``data`` float32 ``(slices, rows, cols)``,
``spacing`` ``(dz, dy, dx)`` mm, ``affine`` voxel->RAS or ``None``, DICOM
``datasets``, ``meta``); see :mod:`recon.io.volume` for the conventions.
Every user-facing failure is a :class:`recon.errors.ReconError` (damaged files
included: ``recon bench fuzz`` checks this with mutated inputs of every format);
array sizes read from a header are checked against the file and against
``RECON_MAX_BYTES`` (default 8 GiB decoded) before anything is allocated.
Every writer writes to a temporary file in the target folder and renames it
into place.
"""

from recon.io.cases import Case, discover_cases
from recon.io.dicom import SeriesInfo, is_dicom_file, list_series, read_dicom, write_dicom_series
from recon.io.images import open_npy, read_image, read_npy, write_npy, write_png
from recon.io.kspace import (KSpace, image_to_kspace, is_ismrmrd, kspace_slices, kspace_to_image, read_cfl,
                             read_complex_image, read_ismrmrd, read_kspace, read_siemens_twix, write_cfl)
from recon.io.nifti import read_nifti, write_nifti
from recon.io.readers import SUPPORTED_FORMATS, input_format, read_input
from recon.io.volume import LPS_TO_RAS, Volume

__all__ = [
    "Case", "KSpace", "LPS_TO_RAS", "SUPPORTED_FORMATS", "SeriesInfo", "Volume",
    "discover_cases", "image_to_kspace", "input_format", "is_dicom_file", "is_ismrmrd", "kspace_slices",
    "kspace_to_image",
    "list_series", "open_npy", "read_cfl", "read_complex_image", "read_dicom", "read_image", "read_input",
    "read_ismrmrd", "read_kspace", "read_npy", "read_nifti", "read_siemens_twix", "write_cfl", "write_dicom_series", "write_nifti",
    "write_npy", "write_png",
]
