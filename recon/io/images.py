"""2D images: PNG / JPEG / TIFF / BMP and NumPy ``.npy``.

``read_image`` returns the pixel values unchanged in range (0-255 for 8-bit
files, 0-65535 for 16-bit, floats as stored) as a 2D ``float32`` array.
Colour files are converted to grey: if all channels are equal (grey stored
as RGB) the first channel is taken, otherwise luminance
``0.299 R + 0.587 G + 0.114 B``; an alpha channel is ignored.  Multi-page
files give their first page.  A real ``.npy`` gives ``float32``, a complex
one ``complex64``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from recon.errors import ReconError
from recon.io._util import BoundedReader, atomic_output, check_size, quiet, require_file, short

__all__ = ["read_image", "read_npy", "open_npy", "write_png", "write_npy", "IMAGE_SUFFIXES",
           "npy_shape"]

#: Raster formats read by :func:`read_image` (besides ``.npy``).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

_LUMA = np.array([0.299, 0.587, 0.114])


def _to_grey(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[-1] in (2, 3, 4):
        if arr.shape[-1] == 2:  # grey + alpha
            return arr[..., 0]
        rgb = arr[..., :3]
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            return rgb[..., 0]
        return rgb.astype(np.float64) @ _LUMA
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] > 4:  # planar RGB TIFF
        return _to_grey(np.moveaxis(arr, 0, -1), path)
    if arr.ndim != 2:
        raise ReconError(f"{path}: image has shape {arr.shape}; expected a 2D grey or RGB image "
                         "- save a single 2D slice")
    return arr


def _read_raster(path: Path) -> np.ndarray:
    """Decode the first page; the size the header declares is checked before decoding."""
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        try:
            import tifffile
        except ImportError:  # pragma: no cover - tifffile comes with scikit-image
            tifffile = None
        if tifffile is not None:
            with BoundedReader(path) as fh, tifffile.TiffFile(fh) as tif:
                if not tif.pages:
                    raise ValueError("no image in the file (no TIFF pages)")
                page = tif.pages.first if hasattr(tif.pages, "first") else tif.pages[0]
                check_size(path, page.shape, "TIFF image", max(np.dtype(page.dtype).itemsize, 4)
                           if page.dtype is not None else 8)
                size = path.stat().st_size
                for offset, count in zip(page.dataoffsets, page.databytecounts):
                    if offset + count > size:
                        raise ReconError(f"{path}: TIFF image data at byte {offset} (+{count}) lies "
                                         f"beyond the end of the file ({size} bytes); the file is "
                                         "truncated or corrupt - re-export it")
                return np.asarray(page.asarray())
    from PIL import Image

    with BoundedReader(path) as fh, Image.open(fh) as img:
        img.seek(0)
        bands = len(img.getbands())
        check_size(path, (img.size[1], img.size[0], bands), f"{suffix[1:].upper()} image", 4)
        if img.mode == "P":
            img = img.convert("RGBA")
        elif img.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
            img = img.convert("L" if img.mode == "1" else "RGB")
        return np.array(img)


_NPY_VERSIONS = ((1, 0), (2, 0), (3, 0))


def _npy_header(path: Path) -> tuple[tuple[int, ...], bool, np.dtype, int, int]:
    """``(shape, fortran_order, dtype, data_offset, file_size)`` from a ``.npy`` header."""
    try:
        with BoundedReader(path) as fh:  # a corrupt header length cannot allocate past the file
            version = np.lib.format.read_magic(fh)
            if version not in _NPY_VERSIONS:
                raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            offset = fh.tell()
            size = os.fstat(fh.fileno()).st_size
    except OSError as exc:
        raise ReconError(f"{path}: cannot open ({short(exc)}); check the path and permissions") from exc
    except Exception as exc:
        raise ReconError(f"{path}: not a valid .npy file ({short(exc)}); re-save it with "
                         "numpy.save") from exc
    return tuple(int(s) for s in shape), bool(fortran), np.dtype(dtype), offset, size


def _numeric(dtype: np.dtype) -> bool:
    return dtype.fields is None and dtype.kind in "biufc"


def npy_shape(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a ``.npy`` file from its header (data not read)."""
    shape, _, dtype, _, _ = _npy_header(Path(path))
    return shape, dtype


def read_npy(path: str | os.PathLike) -> np.ndarray:
    """Any real or complex numeric ``.npy`` array (no pickles), as float32/complex64.

    The header is checked first: numeric dtype, a non-empty shape whose data
    the file holds, and at most :func:`recon.io._util.max_bytes` once decoded."""
    path = require_file(path)
    shape, _, dtype, offset, size = _npy_header(path)
    _check_npy_dtype(path, dtype)
    out_itemsize = 8 if dtype.kind == "c" else 4
    check_size(path, shape, ".npy array", max(out_itemsize, dtype.itemsize),
               available=size - offset, stored_itemsize=dtype.itemsize)
    arr = _load_npy(path)
    with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values become inf
        return arr.astype(np.complex64 if np.iscomplexobj(arr) else np.float32)


def open_npy(path: str | os.PathLike) -> np.ndarray:
    """A numeric ``.npy`` array opened as a read-only memory map (nothing read yet), for
    streaming a volume one slice at a time.

    The header is checked as :func:`read_npy` checks it (numeric dtype, non-empty, the data
    present in the file), except that the :func:`recon.io._util.max_bytes` limit applies to
    one slice (the first axis) once decoded, not to the whole array."""
    path = require_file(path)
    shape, _, dtype, offset, size = _npy_header(path)
    _check_npy_dtype(path, dtype)
    out_itemsize = max(8 if dtype.kind == "c" else 4, dtype.itemsize)
    check_size(path, shape[1:] if len(shape) > 2 else shape, "one slice of the .npy array", out_itemsize)
    stored = math.prod(shape) * dtype.itemsize
    if stored > size - offset:
        raise ReconError(f"{path}: the header describes a .npy array of shape {shape} ({stored} bytes) but the "
                         f"file holds only {max(size - offset, 0)} bytes of data; the file is truncated or its "
                         "header is corrupt - re-export it")
    return _load_npy(path, mmap_mode="r")


def _check_npy_dtype(path, dtype) -> None:
    if not _numeric(dtype):
        raise ReconError(f"{path}: .npy holds {dtype} data; expected a numeric (real or complex) "
                         "array - re-save it with numpy.save(path, array.astype('float32'))")


def _load_npy(path, mmap_mode=None) -> np.ndarray:
    """``np.load`` without pickles; a damaged file or a non-numeric / empty array is one ReconError."""
    try:
        arr = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except Exception as exc:
        raise ReconError(f"{path}: cannot read this .npy file: it is truncated, corrupt or holds "
                         f"Python objects ({short(exc)}); re-save it with numpy.save") from exc
    if not isinstance(arr, np.ndarray) or not _numeric(arr.dtype) or arr.size == 0:
        raise ReconError(f"{path}: .npy holds {getattr(arr, 'dtype', type(arr))} data of shape "
                         f"{getattr(arr, 'shape', '?')}; expected a non-empty numeric array")
    return arr


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read one 2D image (PNG/JPEG/TIFF/BMP or ``.npy``) as float32 (complex64
    for a complex ``.npy``)."""
    path = require_file(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        arr = read_npy(path)
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 2:
            raise ReconError(f"{path}: .npy array has shape {arr.shape}; expected a 2D image "
                             "(rows, cols) - save a single slice")
        return arr
    if suffix not in IMAGE_SUFFIXES:
        raise ReconError(f"{path}: unsupported image type '{suffix}'; supported: "
                         f"{', '.join(IMAGE_SUFFIXES + ('.npy',))}")
    try:
        with quiet():
            arr = _read_raster(path)
    except ReconError:
        raise
    except Exception as exc:  # PIL.UnidentifiedImageError, OSError (truncated), tifffile errors
        raise ReconError(f"{path}: cannot read this image: it is truncated, corrupt or not a "
                         f"{suffix[1:].upper()} file ({short(exc)}); re-export it") from exc
    if arr.size == 0 or arr.dtype.kind not in "biufc":
        raise ReconError(f"{path}: the image holds no pixel values (shape {arr.shape}, "
                         f"{arr.dtype}); re-export it")
    if np.iscomplexobj(arr):
        return _to_grey(arr, path).astype(np.complex64)
    return np.asarray(_to_grey(arr, path), dtype=np.float32)


def window_to_uint8(array: np.ndarray, vmin: float | None = None,
                    vmax: float | None = None) -> np.ndarray:
    """Map ``[vmin, vmax]`` linearly to 0..255 (clipped); NaN -> 0."""
    a = np.asarray(array)
    if np.iscomplexobj(a):
        a = np.abs(a)
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    if vmin is None:
        vmin = float(a[finite].min()) if finite.any() else 0.0
    if vmax is None:
        vmax = float(a[finite].max()) if finite.any() else 1.0
    scale = 255.0 / (vmax - vmin) if vmax > vmin else 0.0
    out = np.clip((np.where(finite, a, vmin) - vmin) * scale, 0, 255)
    return np.round(out).astype(np.uint8)


def write_png(array: np.ndarray, path: str | os.PathLike, vmin: float | None = None,
              vmax: float | None = None) -> Path:
    """Write a 2D array as an 8-bit grey PNG windowed to ``[vmin, vmax]``
    (default: the array's min and max), atomically.  Complex input is
    written as its magnitude.  Returns the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ReconError(f"{path}: PNG output must end in .png; rename the output")
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ReconError(f"{path}: cannot write shape {arr.shape} as PNG; pass one 2D slice")
    from PIL import Image

    u8 = window_to_uint8(arr, vmin, vmax)
    with atomic_output(path, ".png") as tmp:
        Image.fromarray(u8).save(tmp, format="PNG")
    return path


def write_npy(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Save ``array`` as ``.npy`` atomically (``.npy`` is appended to the name
    if missing, as numpy.save does).  Returns the path written."""
    path = Path(path)
    if path.suffix.lower() != ".npy":
        path = path.with_name(path.name + ".npy")
    arr = np.asarray(array)
    if arr.dtype == object:
        raise ReconError(f"{path}: refusing to save an object array; pass a numeric array")
    with atomic_output(path, ".npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)
    return path
