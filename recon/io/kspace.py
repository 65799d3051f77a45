"""MRI k-space: ISMRMRD and fastMRI ``.h5``, Siemens raw data ``.dat``, BART ``.cfl/.hdr``
and complex ``.npy``.

Every reader returns a :class:`KSpace` whose ``data`` is ``complex64`` with
the canonical shape ``(n_slices, n_coils, H, W)`` (single-coil data has
``n_coils == 1``).  ``KSpace.coil_slice(i)`` gives one ``(n_coils, H, W)``
slice.  fastMRI, BART and ``.npy`` k-space is returned as stored: no shifts or FFTs
are applied (fastMRI and BART both store k-space with the centre in the middle).  Raw
scanner data (ISMRMRD, Siemens) are assembled from their acquisitions as described below.

* ISMRMRD ``.h5`` (:func:`read_ismrmrd`; recognised by a group ``/dataset`` holding
  ``data`` and ``xml``; read with h5py, the ``ismrmrd`` package is not needed): Cartesian
  acquisitions are assembled into ``(slices, coils, ky, kx)`` by ``idx.slice`` and
  ``idx.kspace_encode_step_1`` (centre placed at ``H//2, W//2``); noise, navigator,
  phase-correction, feedback, dummy and calibration-only acquisitions are skipped; only the
  first repetition/contrast/phase/set is read and averages are averaged; readout
  oversampling (encodedSpace FOV x > reconSpace FOV x) is removed by an image-space crop;
  3-D data fully sampled along kz become slices (inverse FFT along kz).  ``mask`` is the
  boolean ``(slices, H, W)`` sampling pattern; ``attrs`` has the matrix sizes and FOVs.
* Siemens ``.dat`` (:func:`read_siemens_twix`, through ``twixtools``: optional extra
  ``pip install 'scoreprior-recon[siemens]'``): the last measurement's image data,
  ``(Sli, Cha, Lin, Col)`` -> ``(slices, coils, lines, columns)``, readout oversampling
  removed by twixtools, same rules for repetitions/averages.
* fastMRI ``.h5``: dataset ``kspace`` of shape ``(slices, H, W)`` (single
  coil) or ``(slices, coils, H, W)`` (multi-coil).  ``reconstruction_rss`` /
  ``reconstruction_esc`` (if present) becomes ``reference`` ``(slices, h, w)``,
  ``mask`` becomes ``mask``, file attributes become ``attrs``.
* BART ``.cfl``: complex64, column-major, dims in the ``.hdr``; BART's dims
  are ``(READ, PHS1, PHS2, COIL, MAPS, ...)``.  The two non-singleton spatial
  dims give ``(H, W)`` in that order and the coil dim gives coils, e.g.
  ``1 180 230 8`` -> ``(1, 8, 180, 230)``.  Data with more than two
  non-singleton spatial dims, or non-singleton dims beyond COIL, is refused.
* ``.npy``: complex 2D ``(H, W)`` single-coil, 3D ``(coils, H, W)``, 4D
  ``(slices, coils, H, W)``.

A complex *image* (such as the fastMRI knee sample ``001.npy``) is read with
:func:`read_complex_image`; :func:`image_to_kspace` (or
``read_kspace(path, from_image=True)``) applies the centred orthonormal 2D
FFT to obtain k-space.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from recon.errors import ReconError
from recon.io._util import atomic_output, check_size, quiet, require_file, short

__all__ = ["KSpace", "read_kspace", "kspace_slices", "read_cfl", "write_cfl", "read_complex_image", "read_ismrmrd",
           "read_siemens_twix", "is_ismrmrd", "image_to_kspace", "kspace_to_image", "KSPACE_SUFFIXES",
           "ISMRMRD_SKIPPED_FLAGS"]

KSPACE_SUFFIXES = (".h5", ".hdf5", ".cfl", ".hdr", ".npy", ".dat")
_REFERENCE_NAMES = ("reconstruction_rss", "reconstruction_esc")
#: BART's DIMS: a ``.hdr`` lists at most this many dims (trailing singleton dims beyond it are dropped).
_BART_DIMS = 16


@dataclass(eq=False)
class KSpace:
    """K-space samples plus whatever reference the file carries.

    ``data``: complex64 ``(n_slices, n_coils, H, W)``.
    ``reference``: float32 ``(n_slices, h, w)`` or ``None`` (fastMRI
    reconstruction; its size may differ from ``H, W``, fastMRI crops it).
    ``reference_name``: the dataset it came from.
    ``mask``: sampling mask as stored (or ``None``).
    ``attrs``: file/header attributes.  ``source``: the path read.
    ``layout``: how the stored axes were mapped (for messages and provenance).
    """

    data: np.ndarray
    reference: np.ndarray | None = None
    reference_name: str | None = None
    mask: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    layout: str = ""

    @property
    def n_slices(self) -> int:
        return int(self.data.shape[0])

    @property
    def n_coils(self) -> int:
        return int(self.data.shape[1])

    @property
    def single_coil(self) -> bool:
        return self.n_coils == 1

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def coil_slice(self, index: int | None = None) -> np.ndarray:
        """``(n_coils, H, W)`` k-space of one slice (the middle one by default)."""
        return self.data[self.n_slices // 2 if index is None else index]

    def __repr__(self) -> str:
        ref = None if self.reference is None else tuple(self.reference.shape)
        return (f"KSpace(shape={self.shape}, reference={self.reference_name}{ref or ''}, "
                f"source={self.source!r})")


# ---------------------------------------------------------------------------
# FFT helpers
# ---------------------------------------------------------------------------


def image_to_kspace(image: np.ndarray) -> np.ndarray:
    """Centred orthonormal 2D FFT over the last two axes (image -> k-space)."""
    x = np.asarray(image)
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"),
                           axes=(-2, -1)).astype(np.complex64)


def kspace_to_image(kspace: np.ndarray) -> np.ndarray:
    """Centred orthonormal 2D inverse FFT over the last two axes."""
    k = np.asarray(kspace)
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), norm="ortho"),
                           axes=(-2, -1)).astype(np.complex64)


# ---------------------------------------------------------------------------
# BART cfl
# ---------------------------------------------------------------------------


def _cfl_base(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.suffix.lower() in (".cfl", ".hdr"):
        return p.with_suffix("")
    return p


def _read_hdr(hdr: Path) -> list[int]:
    try:
        lines = hdr.read_text(errors="replace").splitlines()
    except OSError as exc:
        raise ReconError(f"{hdr}: cannot read BART header ({short(exc)}); check the path") from exc
    for i, line in enumerate(lines):
        if line.strip().startswith("# Dimensions") and i + 1 < len(lines):
            try:
                dims = [int(x) for x in lines[i + 1].split()]
            except ValueError:
                break
            if dims and all(d >= 1 for d in dims):
                while len(dims) > _BART_DIMS and dims[-1] == 1:
                    dims.pop()
                if len(dims) > _BART_DIMS:
                    raise ReconError(f"{hdr}: lists {len(dims)} dims with non-singleton dims beyond the "
                                     f"{_BART_DIMS} BART supports; the header is corrupt - re-write it "
                                     "with bart or write_cfl")
                return dims
            break
    raise ReconError(f"{hdr}: not a valid BART header (needs a '# Dimensions' line followed by "
                     "positive integers); re-write it with bart or write_cfl")


def read_cfl(path_base: str | os.PathLike, squeeze: bool = True) -> np.ndarray:
    """Read a BART ``.cfl/.hdr`` pair as complex64 with BART's dim order
    (column-major on disk).  ``path_base`` may end in .cfl, .hdr or nothing.
    Trailing singleton dims are dropped when ``squeeze``."""
    base = _cfl_base(path_base)
    hdr, cfl = base.with_suffix(".hdr"), base.with_suffix(".cfl")
    for p in (hdr, cfl):
        if not p.is_file():
            raise ReconError(f"{p}: missing; a BART array needs both {hdr.name} and {cfl.name}")
    dims = _read_hdr(hdr)
    actual = cfl.stat().st_size
    count = check_size(cfl, dims, f"the array ({hdr.name} dims)", 8, available=actual)
    expected = count * 8
    if actual != expected:
        raise ReconError(f"{cfl}: holds {actual} bytes but {hdr.name} dims {dims} need "
                         f"{expected} (complex64); the file is truncated or the header does not "
                         "belong to it - re-export both")
    try:
        flat = np.fromfile(cfl, dtype="<c8", count=count)
    except Exception as exc:
        raise ReconError(f"{cfl}: cannot read ({short(exc)})") from exc
    if flat.size != count:
        raise ReconError(f"{cfl}: read {flat.size} of {count} values; the file changed or is unreadable")
    arr = flat.reshape(dims, order="F")
    if squeeze:
        while arr.ndim > 1 and arr.shape[-1] == 1:
            arr = arr[..., 0]
    return arr


def write_cfl(path_base: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` as BART ``<base>.cfl`` + ``<base>.hdr`` (complex64,
    column-major; numpy axis order = BART dim order).  Each file is replaced
    atomically (data first, then header).  Returns the base path."""
    base = _cfl_base(path_base)
    arr = np.asarray(array)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    arr = arr.astype(np.complex64)
    dims = list(arr.shape)
    with atomic_output(base.with_suffix(".cfl"), ".cfl") as tmp:
        arr.ravel(order="F").astype("<c8").tofile(tmp)
    text = "# Dimensions\n" + " ".join(str(d) for d in dims) + " \n"
    with atomic_output(base.with_suffix(".hdr"), ".hdr") as tmp:
        tmp.write_text(text)
    return base


_BART_NAMES = ("READ", "PHS1", "PHS2", "COIL", "MAPS", "TE", "COEFF", "COEFF2", "ITER", "CSHIFT",
               "TIME", "TIME2", "LEVEL", "SLICE", "AVG", "BATCH")


def _kspace_from_cfl(path: Path) -> KSpace:
    base = _cfl_base(path)
    arr = read_cfl(base, squeeze=False)
    dims = list(arr.shape) + [1] * max(0, 4 - arr.ndim)
    arr = arr.reshape(dims)  # append singleton dims (no data movement)
    extra = [(i, d) for i, d in enumerate(dims[4:], start=4) if d > 1]
    if extra:
        names = ", ".join(f"{_BART_NAMES[i] if i < len(_BART_NAMES) else i}={d}" for i, d in extra)
        raise ReconError(f"{base}.cfl: dims {dims} have non-singleton dims beyond COIL ({names}); "
                         "select one with 'bart slice' before reading as k-space")
    arr = arr.reshape(dims[:4])
    spatial = [i for i in range(3) if dims[i] > 1]
    if len(spatial) > 2:
        raise ReconError(f"{base}.cfl: 3D k-space {dims[:3]}; take a 2D slice first (e.g. "
                         "'bart fft -i 1' along the read-out, then 'bart slice 0 N')")
    if len(spatial) < 2:  # 0D/1D spatial data: use the last singleton axes as well
        spatial = sorted(spatial + [i for i in (2, 1, 0) if i not in spatial][: 2 - len(spatial)])
    (drop,) = [i for i in range(3) if i not in spatial]
    sub = np.squeeze(arr, axis=drop)  # (H, W, coils)
    data = np.ascontiguousarray(np.transpose(sub, (2, 0, 1))[None], dtype=np.complex64)
    layout = (f"BART dims {dims[:4]} ({_BART_NAMES[spatial[0]]}=H, {_BART_NAMES[spatial[1]]}=W, "
              "COIL) -> (slices=1, coils, H, W)")
    return KSpace(data=data, attrs={"bart_dims": dims}, source=str(base) + ".cfl", layout=layout)


# ---------------------------------------------------------------------------
# fastMRI h5
# ---------------------------------------------------------------------------


def _h5_error(path: Path, exc: BaseException) -> ReconError:
    return ReconError(f"{path}: cannot read this HDF5 file: it is truncated, corrupt or not "
                      f"HDF5 ({short(exc)}); re-download or re-export it")


def _open_h5(path: Path):
    """The HDF5 file open for reading, or one ReconError saying it cannot be read."""
    import h5py

    try:
        return h5py.File(path, "r")
    except Exception as exc:
        raise _h5_error(path, exc) from exc


def _complex_kind(dtype: np.dtype, shape: tuple) -> str | None:
    """How a stored k-space dtype becomes complex: 'complex', 'ri', 'real_imag',
    'pairs' (float with a last axis of 2), or None (not k-space)."""
    names = dtype.names or ()
    if dtype.kind == "c":
        return "complex"
    for kind, (re_name, im_name) in (("ri", ("r", "i")), ("real_imag", ("real", "imag"))):
        if {re_name, im_name} <= set(names) and all(
                dtype.fields[n][0].kind in "iuf" and dtype.fields[n][0].shape == () for n in (re_name, im_name)):
            return kind
    if not names and dtype.kind == "f" and len(shape) >= 3 and shape[-1] == 2:
        return "pairs"
    return None


def _as_complex(arr: np.ndarray, kind: str) -> np.ndarray:
    if kind == "complex":
        return arr.astype(np.complex64)
    if kind == "ri":
        return (arr["r"] + 1j * arr["i"]).astype(np.complex64)
    if kind == "real_imag":
        return (arr["real"] + 1j * arr["imag"]).astype(np.complex64)
    return (arr[..., 0] + 1j * arr[..., 1]).astype(np.complex64)


def _attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _dataset_shape(path: Path, ds, name: str) -> tuple[int, ...]:
    shape = ds.shape
    if shape is None:  # an HDF5 null dataspace: no values at all
        raise ReconError(f"{path}: dataset '{name}' holds no values (null dataspace); re-export the file")
    return tuple(int(d) for d in shape)


def _kspace_from_h5(path: Path, dataset: str | None, slice_index: int | None) -> KSpace:
    import h5py

    name = dataset or "kspace"
    fh = _open_h5(path)
    try:
        with fh:
            present = {}
            fh.visititems(lambda k, obj: present.__setitem__(k, obj)
                          if isinstance(obj, h5py.Dataset) else None)
            if name not in present:
                listing = ", ".join(f"'{k}' {v.shape}" for k, v in sorted(present.items())) \
                    or "no datasets"
                raise ReconError(f"{path}: has no dataset '{name}'; it holds: {listing}; pass the "
                                 "k-space dataset name with --dataset NAME (dataset=...)")
            ds = present[name]
            shape = _dataset_shape(path, ds, name)
            kind = _complex_kind(ds.dtype, shape)
            if kind is None:
                raise ReconError(f"{path}: dataset '{name}' is {ds.dtype} with shape {shape}; k-space "
                                 "must be complex (or real/imaginary pairs in a last axis of 2)")
            spatial = shape[:-1] if kind == "pairs" else shape
            if len(spatial) not in (2, 3, 4):
                raise ReconError(f"{path}: dataset '{name}' has shape {shape}; expected "
                                 "(slices, H, W) or (slices, coils, H, W)")
            if slice_index is not None:
                if len(spatial) == 2:
                    raise ReconError(f"{path}: dataset '{name}' is a single 2D slice {spatial}; "
                                     "leave out the slice index")
                if not 0 <= slice_index < shape[0]:
                    raise ReconError(f"{path}: slice {slice_index} out of range; '{name}' has "
                                     f"{shape[0]} slices")
            sel = slice(None) if slice_index is None else slice(slice_index, slice_index + 1)
            n_sel = 1 if slice_index is not None else (shape[0] if len(spatial) > 2 else 1)
            per_slice = spatial[1:] if len(spatial) > 2 else spatial
            check_size(path, (n_sel,) + tuple(per_slice), f"k-space dataset '{name}'",
                       max(8, ds.dtype.itemsize))
            arr = _as_complex(np.asarray(ds[sel] if len(spatial) > 2 else ds[()]), kind)
            if arr.ndim == 2:
                arr = arr[None, None]
                layout = f"'{name}' (H, W) -> (1, 1, H, W)"
            elif arr.ndim == 3:
                arr = arr[:, None]
                layout = f"'{name}' (slices, H, W) single-coil -> (slices, 1, H, W)"
            else:
                layout = f"'{name}' (slices, coils, H, W)"
            reference = ref_name = None
            for cand in _REFERENCE_NAMES:
                if cand in present and cand != name:
                    reference, ref_name = _h5_reference(path, present[cand], cand, sel, arr.shape[0],
                                                        slice_index is not None or len(spatial) == 2)
                    break
            mask = None
            if "mask" in present and name != "mask":
                mds = present["mask"]
                mshape = _dataset_shape(path, mds, "mask")
                check_size(path, mshape, "dataset 'mask'", max(8, mds.dtype.itemsize), allow_empty=True)
                mask = np.asarray(mds[()])
                if mask.dtype.kind not in "biuf":
                    raise ReconError(f"{path}: dataset 'mask' is {mask.dtype}; a sampling mask must be "
                                     "numeric or boolean")
            attrs = {k: _attr(v) for k, v in fh.attrs.items()}
            if "ismrmrd_header" in present:
                hds = present["ismrmrd_header"]
                check_size(path, _dataset_shape(path, hds, "ismrmrd_header"), "dataset 'ismrmrd_header'",
                           max(1, hds.dtype.itemsize), allow_empty=True)
                raw = hds[()]
                attrs["ismrmrd_header"] = _attr(raw.tobytes() if isinstance(raw, np.ndarray) else raw)
            attrs["datasets"] = sorted(present)
    except ReconError:
        raise
    except Exception as exc:  # corrupt chunks, bad filters, ...: h5py raises OSError/KeyError/...
        raise _h5_error(path, exc) from exc
    return KSpace(data=np.ascontiguousarray(arr), reference=reference, reference_name=ref_name,
                  mask=mask, attrs=attrs, source=str(path), layout=layout)


def _h5_reference(path: Path, ds, name: str, sel: slice, n_slices: int, single: bool):
    """The fastMRI reconstruction as float32 ``(n_slices, h, w)``, checked against the k-space."""
    shape = _dataset_shape(path, ds, name)
    if ds.dtype.kind not in "biufc" or ds.dtype.names:
        raise ReconError(f"{path}: reference dataset '{name}' is {ds.dtype}; expected real or complex "
                         "values - remove or rename it")
    if len(shape) == 2 and single:
        check_size(path, shape, f"reference dataset '{name}'", max(4, ds.dtype.itemsize))
        ref = np.asarray(ds[()])[None]
    elif len(shape) == 3 and shape[0] >= 1:
        check_size(path, (1 if sel.start is not None else shape[0],) + shape[1:],
                   f"reference dataset '{name}'", max(4, ds.dtype.itemsize))
        ref = np.asarray(ds[sel])
    else:
        raise ReconError(f"{path}: reference dataset '{name}' has shape {shape}; expected (slices, h, w) "
                         "like the k-space's slices - remove or rename it")
    if ref.shape[0] != n_slices:
        raise ReconError(f"{path}: reference dataset '{name}' has {ref.shape[0]} slice(s) but the k-space "
                         f"has {n_slices}; the file is inconsistent - remove or rename the reference")
    if np.iscomplexobj(ref):
        ref = np.abs(ref)
    return ref.astype(np.float32), name


# ---------------------------------------------------------------------------
# shared helpers for raw-data (ISMRMRD, Siemens twix) assembly
# ---------------------------------------------------------------------------

#: ``calibration=`` choices of :func:`read_ismrmrd` / :func:`read_siemens_twix`.
_CALIBRATION_MODES = ("skip", "fill")


def _check_calibration(calibration: str) -> str:
    if calibration not in _CALIBRATION_MODES:
        raise ReconError(f"calibration={calibration!r}: expected one of {', '.join(_CALIBRATION_MODES)}")
    return calibration


def _centre_pad(n: int, centre: int) -> tuple[int, int]:
    """``(size, offset)`` so that index ``centre`` of ``n`` samples lands at ``size // 2``
    (the k-space centre of the centred FFT) when shifted by ``offset``; ``size >= n``.
    Partial Fourier / asymmetric echo data are zero-padded on the missing side."""
    if centre == n // 2:
        return n, 0
    size = max(n, 2 * max(centre, n - centre))
    offset = size // 2 - centre
    if offset < 0 or offset + n > size:  # cannot happen for 0 <= centre <= n; guard anyway
        size, offset = n, 0
    return size, offset


def _crop_readout(data: np.ndarray, keep: int) -> np.ndarray:
    """Remove readout oversampling: centred inverse FFT along the last axis, keep the central
    ``keep`` pixels, centred FFT back (orthonormal both ways, so image values are unchanged).
    Rows that are all zero stay exactly zero."""
    n = data.shape[-1]
    start = n // 2 - keep // 2
    img = np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(data, axes=-1), axis=-1, norm="ortho"), axes=-1)
    img = img[..., start:start + keep]
    return np.fft.fftshift(np.fft.fft(np.fft.ifftshift(img, axes=-1), axis=-1, norm="ortho"),
                           axes=-1).astype(np.complex64)


def _optional_import(module: str, extra: str, path: Path, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ReconError(f"{path}: reading {what} needs the optional package '{module}' "
                         f"({short(exc)}); install it with: pip install 'scoreprior-recon[{extra}]' "
                         f"(or: pip install {module})") from None


# ---------------------------------------------------------------------------
# ISMRMRD h5
# ---------------------------------------------------------------------------

#: ISMRMRD acquisition flags (1-based bit numbers, ``ismrmrd/constants.py``) whose
#: acquisitions are not image k-space and are always skipped.
ISMRMRD_SKIPPED_FLAGS = {19: "noise measurement", 23: "navigator", 24: "phase correction",
                         26: "HP feedback", 27: "dummy scan", 28: "RT feedback",
                         29: "surface-coil correction", 30: "phase stabilisation reference",
                         31: "phase stabilisation"}
_ACQ_IS_PARALLEL_CALIBRATION = 20
_ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING = 21
_ACQ_IS_REVERSE = 22
#: acquisition-header fields the reader needs (others default to 0 when absent).
_ISMRMRD_REQUIRED = ("flags", "number_of_samples", "active_channels")
_ISMRMRD_REQUIRED_IDX = ("kspace_encode_step_1", "slice")
_ISMRMRD_OPTIONAL = ("center_sample", "discard_pre", "discard_post", "trajectory_dimensions",
                     "encoding_space_ref")
_ISMRMRD_OPTIONAL_IDX = ("kspace_encode_step_2", "average", "contrast", "phase", "repetition", "set",
                         "segment")
#: counters of which only the first (lowest) value is read; averages/segments are averaged.
_ISMRMRD_FIRST_ONLY = ("repetition", "contrast", "phase", "set")


def _flag_set(flags: np.ndarray, bit: int) -> np.ndarray:
    return ((flags.astype(np.uint64) >> np.uint64(bit - 1)) & np.uint64(1)).astype(bool)


def _xml_local(tag: Any) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _xml_find(el, *names):
    for name in names:
        if el is None:
            return None
        el = next((c for c in el if _xml_local(c.tag) == name), None)
    return el


def _xml_number(path: Path, el, *names, integer: bool = False):
    node = _xml_find(el, *names)
    if node is None or node.text is None or not node.text.strip():
        return None
    try:
        value = float(node.text.strip())
    except ValueError:
        raise ReconError(f"{path}: ISMRMRD header field {'/'.join(names)} is {node.text.strip()!r}, not a "
                         "number; the XML header is corrupt - re-convert the raw data") from None
    if not np.isfinite(value):
        raise ReconError(f"{path}: ISMRMRD header field {'/'.join(names)} is {value}; re-convert the raw data")
    return int(round(value)) if integer else value


def _ismrmrd_header(path: Path, text: str) -> dict[str, Any]:
    """The first ``<encoding>`` of an ISMRMRD XML header (sizes, FOV, limits, trajectory)."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise ReconError(f"{path}: the ISMRMRD XML header (/dataset/xml) is not valid XML ({short(exc)}); "
                         "re-convert the raw data (e.g. with siemens_to_ismrmrd)") from None
    encodings = [c for c in root if _xml_local(c.tag) == "encoding"]
    if not encodings:
        raise ReconError(f"{path}: the ISMRMRD XML header has no <encoding> element; re-convert the raw data")
    enc = encodings[0]
    info: dict[str, Any] = {"n_encodings": len(encodings)}
    for space in ("encodedSpace", "reconSpace"):
        matrix = [_xml_number(path, enc, space, "matrixSize", a, integer=True) for a in "xyz"]
        fov = [_xml_number(path, enc, space, "fieldOfView_mm", a) for a in "xyz"]
        info[space] = (matrix, fov)
    matrix = info["encodedSpace"][0]
    if matrix[0] is None or matrix[1] is None:
        raise ReconError(f"{path}: the ISMRMRD XML header lacks encoding/encodedSpace/matrixSize x and y; "
                         "re-convert the raw data")
    if matrix[2] is None:
        matrix[2] = 1
    if min(matrix) < 1 or max(matrix) > 65536:
        raise ReconError(f"{path}: the ISMRMRD header's encodedSpace matrixSize {matrix} is invalid (each "
                         "size must be 1..65536); re-convert the raw data")
    limits = {}
    for name in ("kspace_encoding_step_1", "kspace_encoding_step_2", "slice"):
        centre = _xml_number(path, enc, "encodingLimits", name, "center", integer=True)
        limits[name] = centre
    info["limits"] = limits
    traj = _xml_find(enc, "trajectory")
    info["trajectory"] = (traj.text or "").strip() if traj is not None else ""
    return info


def _ismrmrd_fields(path: Path, ds) -> None:
    dtype = ds.dtype
    names = dtype.names or ()
    if not {"head", "data"} <= set(names):
        raise ReconError(f"{path}: /dataset/data has dtype {dtype} without the ISMRMRD 'head' and 'data' "
                         "members; this is not an ISMRMRD acquisition table - re-convert the raw data")
    import h5py

    vlen = h5py.check_vlen_dtype(dtype.fields["data"][0])
    if vlen is None or vlen != np.float32:
        raise ReconError(f"{path}: /dataset/data stores its samples as {dtype.fields['data'][0]}, not "
                         "variable-length float32; the file is corrupt or not ISMRMRD - re-convert the raw data")
    head = dtype.fields["head"][0]
    if not head.names or head.hasobject:
        raise ReconError(f"{path}: /dataset/data has acquisition headers of dtype {head}; expected the ISMRMRD "
                         "fixed-size header - the file is corrupt or not ISMRMRD")
    idx = head.fields.get("idx", (None,))[0]
    missing = [f for f in _ISMRMRD_REQUIRED if f not in (head.names or ())]
    missing += [f"idx.{f}" for f in _ISMRMRD_REQUIRED_IDX if idx is None or f not in (idx.names or ())]
    if missing:
        raise ReconError(f"{path}: the ISMRMRD acquisition headers lack {', '.join(missing)}; the file was "
                         "written with an incompatible layout - re-convert it with the ismrmrd tools")
    if ds.ndim != 1:
        raise ReconError(f"{path}: /dataset/data has shape {ds.shape}; ISMRMRD stores a 1-D list of "
                         "acquisitions - re-convert the raw data")


def _ismrmrd_heads(path: Path, ds) -> dict[str, np.ndarray]:
    heads = ds.fields("head")[()] if ds.shape[0] else np.zeros(0, ds.dtype.fields["head"][0])
    hn = heads.dtype.names
    idx = heads["idx"] if "idx" in hn else None
    out = {}
    for f in _ISMRMRD_REQUIRED + _ISMRMRD_OPTIONAL:
        out[f] = heads[f].astype(np.int64) if f in hn and f != "flags" else (
            heads[f].astype(np.uint64) if f in hn else np.zeros(len(heads), np.int64))
    for f in _ISMRMRD_REQUIRED_IDX + _ISMRMRD_OPTIONAL_IDX:
        out[f] = idx[f].astype(np.int64) if idx is not None and f in idx.dtype.names \
            else np.zeros(len(heads), np.int64)
    return out


def read_ismrmrd(path: str | os.PathLike, *, group: str = "dataset", slice_index: int | None = None,
                 calibration: str = "skip", remove_oversampling: bool = True) -> KSpace:
    """Cartesian k-space from an ISMRMRD HDF5 file (``/<group>/data`` + ``/<group>/xml``).

    Read directly with h5py (the ``ismrmrd`` package is not needed).  Returns
    ``(slices, coils, ky, kx)`` with the k-space centre at ``(ky, kx) = (H//2, W//2)``:

    * acquisitions flagged as noise, navigator, phase correction, feedback, dummy scan or
      phase stabilisation (:data:`ISMRMRD_SKIPPED_FLAGS`) are skipped; calibration-only lines
      (``ACQ_IS_PARALLEL_CALIBRATION`` without ``..._AND_IMAGING``) are skipped too, or, with
      ``calibration="fill"``, used for the ky lines the imaging data did not acquire;
    * each line goes to row ``kspace_encode_step_1`` of ``encodedSpace`` y (shifted so the
      ``encodingLimits`` centre lands at ``H//2``) and slice ``idx.slice`` (slices in ascending
      ``idx.slice`` order); samples are placed so ``center_sample`` lands at ``W//2``
      (``discard_pre/post`` samples are dropped; asymmetric echoes are zero-filled);
    * only encoding space 0 and the first (lowest) repetition, contrast, phase and set are read;
      repeated lines (averages, segments) are averaged;
    * readout oversampling (encodedSpace FOV x larger than reconSpace FOV x) is removed when
      ``remove_oversampling``: centred inverse FFT along kx, central crop to the recon FOV,
      FFT back (orthonormal, so image values are unchanged); phase oversampling is kept;
    * 3-D data (``kspace_encode_step_2``) whose kz is fully sampled for every acquired ky is
      turned into slices by a centred inverse FFT along kz; anything else 3-D is refused, as are
      non-Cartesian trajectories and reversed (EPI) readouts.

    ``mask`` is boolean ``(slices, H, W)``: which samples were acquired.  ``attrs`` holds the
    matrix sizes, FOVs, skipped/dropped acquisition counts and the XML header."""
    import h5py

    path = require_file(path)
    _check_calibration(calibration)
    fh = _open_h5(path)
    try:
        with fh:
            grp = fh.get(group)
            if not isinstance(grp, h5py.Group):
                raise ReconError(f"{path}: has no ISMRMRD group '/{group}'; this is not an ISMRMRD file "
                                 "(pass the group name as --dataset NAME if it differs)")
            for member in ("data", "xml"):
                if not isinstance(grp.get(member), h5py.Dataset):
                    what = "acquisitions" if member == "data" else "XML header"
                    raise ReconError(f"{path}: ISMRMRD group '/{group}' has no '{member}' dataset (the "
                                     f"{what}); the file is incomplete - re-convert the raw data")
            xml = grp["xml"]
            if h5py.check_string_dtype(xml.dtype) is None and xml.dtype.kind != "S":
                raise ReconError(f"{path}: the ISMRMRD XML header /{group}/xml is {xml.dtype}, not a string; "
                                 "the file is corrupt - re-convert the raw data")
            if xml.shape is None or (xml.shape and int(np.prod(xml.shape)) == 0):
                raise ReconError(f"{path}: the ISMRMRD XML header /{group}/xml is empty; re-convert the raw data")
            check_size(path, (int(np.prod(xml.shape or (1,))),), f"dataset '/{group}/xml'",
                       max(1, xml.dtype.itemsize))
            raw = xml[()]
            if isinstance(raw, np.ndarray):
                raw = raw.reshape(-1)[0]
            text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            header = _ismrmrd_header(path, text)
            ds = grp["data"]
            if ds.shape is None:
                raise ReconError(f"{path}: /{group}/data holds no values (null dataspace); re-convert the raw data")
            _ismrmrd_fields(path, ds)
            heads = _ismrmrd_heads(path, ds)
            with np.errstate(over="ignore", invalid="ignore"):  # overflow: refused below as non-finite
                kspace = _ismrmrd_assemble(path, group, ds, heads, header, slice_index, calibration,
                                           remove_oversampling)
    except ReconError:
        raise
    except Exception as exc:  # corrupt chunks, bad vlen data, ...
        raise _h5_error(path, exc) from exc
    kspace.attrs["ismrmrd_header"] = text
    return kspace


def _ismrmrd_assemble(path: Path, group: str, ds, h: dict[str, np.ndarray], header: dict[str, Any],
                      slice_index: int | None, calibration: str, remove_oversampling: bool) -> KSpace:
    n_total = len(h["flags"])
    if n_total == 0:
        raise ReconError(f"{path}: /{group}/data holds no acquisitions; the file is empty - re-convert it")
    flags = h["flags"]
    notes: list[str] = []
    skipped: dict[str, int] = {}
    skip = np.zeros(n_total, bool)
    for bit, name in ISMRMRD_SKIPPED_FLAGS.items():
        hit = _flag_set(flags, bit) & ~skip
        if hit.any():
            skipped[name] = int(hit.sum())
            skip |= hit
    other_enc = (h["encoding_space_ref"] != 0) & ~skip
    if other_enc.any():
        skipped["other encoding space"] = int(other_enc.sum())
        skip |= other_enc
    calib_only = _flag_set(flags, _ACQ_IS_PARALLEL_CALIBRATION) & \
        ~_flag_set(flags, _ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING) & ~skip
    imaging = ~skip & ~calib_only
    if not imaging.any():
        kinds = ", ".join(f"{n} {k}" for k, n in skipped.items()) or "none"
        extra = f", {int(calib_only.sum())} calibration-only" if calib_only.any() else ""
        raise ReconError(f"{path}: none of the {n_total} acquisitions is image k-space (skipped: {kinds}{extra}); "
                         "the file holds no imaging data")
    candidates = imaging | (calib_only if calibration == "fill" else np.zeros_like(imaging))
    # one repetition / contrast / phase / set: the first present in the imaging data
    dropped: dict[str, int] = {}
    for counter in _ISMRMRD_FIRST_ONLY:
        values = np.unique(h[counter][imaging])
        if len(values) > 1:
            dropped[counter] = int(len(values) - 1)
            candidates &= h[counter] == values[0]
            imaging &= h[counter] == values[0]
    if dropped:
        notes.append("first " + ", ".join(f"{k} of {v + 1}" for k, v in dropped.items()) + " read")
    # refuse what this reader cannot assemble
    traj = header["trajectory"].lower()
    if traj and traj != "cartesian":
        raise ReconError(f"{path}: ISMRMRD trajectory '{header['trajectory']}' is not supported; only "
                         "Cartesian k-space can be read (grid non-Cartesian data, e.g. with BART or "
                         "Gadgetron, first)")
    if (h["trajectory_dimensions"][candidates] > 0).any():
        raise ReconError(f"{path}: the acquisitions carry k-space trajectories (non-Cartesian); only "
                         "Cartesian k-space can be read - grid the data first (e.g. BART nufft)")
    if _flag_set(flags[candidates], _ACQ_IS_REVERSE).any():
        raise ReconError(f"{path}: some readouts are reversed (ACQ_IS_REVERSE, EPI-style); they need phase "
                         "correction this reader does not do - reconstruct EPI with Gadgetron or BART")
    channels = np.unique(h["active_channels"][candidates])
    if len(channels) != 1 or channels[0] < 1:
        raise ReconError(f"{path}: the imaging acquisitions have different or zero coil counts "
                         f"(active_channels {channels.tolist()[:8]}); the headers are inconsistent - "
                         "re-convert the raw data")
    n_coils = int(channels[0])
    enc_matrix, enc_fov = header["encodedSpace"]
    rec_matrix, rec_fov = header["reconSpace"]
    W, H, Z = enc_matrix
    limits = header["limits"]
    e1, e2 = h["kspace_encode_step_1"], h["kspace_encode_step_2"]
    for name, values, size, axis in (("kspace_encode_step_1", e1, H, "y"), ("kspace_encode_step_2", e2, Z, "z")):
        bad = candidates & (values >= size)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ReconError(f"{path}: acquisition {i} has idx.{name} = {int(values[i])}, outside the "
                             f"encodedSpace matrixSize {axis} = {size} of the XML header; the headers are "
                             "inconsistent - re-convert the raw data")
    # 2-D slices or 3-D (kz) encoding
    slices_present = np.unique(h["slice"][imaging])
    three_d = Z > 1 or (e2[candidates] > 0).any()
    if three_d and len(slices_present) > 1:
        raise ReconError(f"{path}: 3-D encoding (kspace_encode_step_2) with {len(slices_present)} slabs is "
                         "not supported; split the slabs into separate files first")
    if slice_index is not None and not three_d:
        if not 0 <= slice_index < len(slices_present):
            raise ReconError(f"{path}: slice {slice_index} out of range; the file has "
                             f"{len(slices_present)} slice(s)")
        slices_present = slices_present[slice_index:slice_index + 1]
        candidates &= h["slice"] == slices_present[0]
        imaging &= h["slice"] == slices_present[0]
    slice_pos = np.full(int(h["slice"].max()) + 1, -1, np.int64)
    slice_pos[slices_present] = np.arange(len(slices_present))
    candidates &= np.isin(h["slice"], slices_present)  # calibration lines of slices without imaging
    # rows / partitions / columns
    c1 = limits["kspace_encoding_step_1"]
    c1 = H // 2 if c1 is None or not 0 < c1 < H else c1  # 0 / absent: unset by the writer
    Hp, off1 = _centre_pad(H, c1)
    c2 = limits["kspace_encoding_step_2"]
    c2 = Z // 2 if c2 is None or not 0 < c2 < Z else c2
    Zp, off2 = _centre_pad(Z, c2)
    if Hp != H or off1:
        notes.append(f"ky centre {c1} of {H} moved to row {Hp // 2} of {Hp}")
    ns, centre = h["number_of_samples"], h["center_sample"]
    pre, post = h["discard_pre"], h["discard_post"]
    centre = np.where(centre > 0, centre, ns // 2)  # 0: unset by the writer
    keep_n = ns - pre - post
    col0 = W // 2 - (centre - pre)
    bad = candidates & ((keep_n < 1) | (col0 < 0) | (col0 + keep_n > W) | (centre < pre))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ReconError(f"{path}: acquisition {i} has {int(ns[i])} samples (centre {int(centre[i])}, discarding "
                         f"{int(pre[i])}+{int(post[i])}) that do not fit the encodedSpace matrixSize x = {W}; the "
                         "headers are inconsistent - re-convert the raw data")
    S = len(slices_present)
    row = e1 + off1
    kz = e2 + off2
    key = (slice_pos[np.minimum(h["slice"], len(slice_pos) - 1)] * Zp + kz) * Hp + row
    if calibration == "fill" and (candidates & calib_only).any():
        have = np.zeros(S * Zp * Hp, bool)
        have[key[imaging & candidates]] = True
        fill = candidates & calib_only & ~have[np.where(candidates, key, 0)]
        n_fill = int(len(np.unique(key[fill])))
        notes.append(f"{n_fill} ky line(s) filled from calibration-only acquisitions")
        use = (imaging & candidates) | fill
    else:
        if calib_only.any():
            skipped["calibration only"] = int(calib_only.sum())
        use = imaging & candidates
    used = np.flatnonzero(use)
    check_size(path, (S, Zp, n_coils, Hp, W), "the assembled ISMRMRD k-space", 8)
    out = np.zeros((S, Zp, n_coils, Hp, W), np.complex64)
    counts = np.zeros((S, Zp, Hp), np.int32)
    sampled = np.zeros((S, Zp, Hp, W), bool)
    field = ds.fields("data")
    block = 512
    i = 0
    while i < len(used):
        a = int(used[i])
        b = min(a + block, n_total)
        chunk = field[a:b]
        while i < len(used) and used[i] < b:
            j = int(used[i])
            i += 1
            values = np.asarray(chunk[j - a], dtype=np.float32).reshape(-1)
            need = 2 * n_coils * int(ns[j])
            if values.size != need:
                raise ReconError(f"{path}: acquisition {j} stores {values.size} values but its header (2 x "
                                 f"{n_coils} channels x {int(ns[j])} samples) needs {need}; the file is "
                                 "corrupt - re-convert the raw data")
            if not np.isfinite(values).all():
                raise ReconError(f"{path}: acquisition {j} (slice {int(h['slice'][j])}, line {int(e1[j])}) "
                                 "contains NaN or infinite values; the raw data are corrupt - re-convert "
                                 "them or drop that acquisition")
            line = values.view(np.complex64).reshape(n_coils, int(ns[j]))[:, int(pre[j]):int(ns[j] - post[j])]
            s, z, r, c = int(slice_pos[h["slice"][j]]), int(kz[j]), int(row[j]), int(col0[j])
            out[s, z, :, r, c:c + line.shape[1]] += line
            counts[s, z, r] += 1
            sampled[s, z, r, c:c + line.shape[1]] = True
    repeated = int((counts > 1).sum())
    if repeated:
        out /= np.maximum(counts, 1)[:, :, None, :, None].astype(np.float32)
        notes.append(f"{repeated} ky line(s) acquired more than once (averages/segments) averaged")
    attrs: dict[str, Any] = {
        "format": "ISMRMRD", "encoded_matrix": enc_matrix, "encoded_fov_mm": enc_fov,
        "recon_matrix": rec_matrix, "recon_fov_mm": rec_fov, "trajectory": header["trajectory"] or None,
        "acquisitions": n_total, "acquisitions_used": int(len(used)), "skipped": skipped,
        "dropped_counters": dropped, "slice_indices": slices_present.tolist(), "coils": n_coils}
    if header["n_encodings"] > 1:
        notes.append(f"encoding 0 of {header['n_encodings']} read")
    if three_d:
        rows = counts[0].any(0)
        if not counts[0][:, rows].all():
            raise ReconError(f"{path}: 3-D k-space undersampled along kz (not every acquired ky line has all "
                             f"{Zp} kz partitions); only 3-D data fully sampled along kz can be split into "
                             "slices - reconstruct it with a 3-D tool (e.g. BART pics)")
        vol = np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(out[0], axes=0), axis=0, norm="ortho"), axes=0)
        mask2 = sampled[0].any(0)
        zf = (enc_fov[2] or 0, rec_fov[2] or 0)
        if zf[0] > 0 and 0 < zf[1] < zf[0] * (1 - 1e-6):
            keep = max(1, int(round(Zp * zf[1] / zf[0])))
            vol = vol[Zp // 2 - keep // 2: Zp // 2 - keep // 2 + keep]
            notes.append(f"slice oversampling removed ({Zp} -> {keep} partitions)")
        if slice_index is not None:
            if not 0 <= slice_index < vol.shape[0]:
                raise ReconError(f"{path}: slice {slice_index} out of range; the 3-D data give "
                                 f"{vol.shape[0]} slice(s)")
            vol = vol[slice_index:slice_index + 1]
        data = vol.astype(np.complex64)
        mask = np.broadcast_to(mask2, (data.shape[0],) + mask2.shape).copy()
        desc = (f"3-D: kspace_encode_step_2 ({Zp} partitions, fully sampled) -> centred inverse FFT along "
                f"kz -> {data.shape[0]} slices")
    else:
        data, mask = out[:, 0], sampled[:, 0]
        desc = f"slices by idx.slice {slices_present.tolist()[:16]}{'...' if S > 16 else ''}"
    fx = (enc_fov[0] or 0, rec_fov[0] or 0)
    if remove_oversampling and fx[0] > 0 and 0 < fx[1] < fx[0] * (1 - 1e-6):
        keep = max(1, int(round(W * fx[1] / fx[0])))
        rows_any = mask.any(-1)
        data = _crop_readout(data, keep)
        mask = np.repeat(rows_any[..., None], keep, axis=-1)
        notes.append(f"readout oversampling x{fx[0] / fx[1]:.3g} removed (kx {W} -> {keep}: image-space "
                     "crop to the reconSpace FOV)")
        attrs["readout_oversampling_removed"] = True
    else:
        attrs["readout_oversampling_removed"] = False
        if fx[0] > 0 and 0 < fx[1] < fx[0] * (1 - 1e-6):
            notes.append(f"readout oversampling x{fx[0] / fx[1]:.3g} kept")
    if skipped:
        notes.append("skipped " + ", ".join(f"{n} {k}" for k, n in skipped.items()))
    layout = (f"ISMRMRD /{group}/data: {len(used)} of {n_total} acquisitions -> (slices, coils, ky, kx) "
              f"{tuple(data.shape)}; {desc}; ky by kspace_encode_step_1" + "".join(f"; {n}" for n in notes))
    attrs["notes"] = notes
    if not np.isfinite(data).all():
        raise ReconError(f"{path}: the assembled k-space overflows complex64 (the stored samples are up to "
                         f"{float(np.abs(out).max()):.3g}); the raw data are corrupt or badly scaled - re-convert "
                         "them")
    return KSpace(data=np.ascontiguousarray(data, dtype=np.complex64), mask=mask, attrs=attrs,
                  source=str(path), layout=layout)


# ---------------------------------------------------------------------------
# Siemens twix .dat (through twixtools)
# ---------------------------------------------------------------------------

#: twixtools dims that are read at index 0 only (first repetition, echo, phase, set, ...).
_TWIX_FIRST_ONLY = ("Rep", "Eco", "Phs", "Set", "Ida", "Idb", "Idc", "Idd", "Ide")


def _twix_corrupt(path: Path, why: str) -> ReconError:
    return ReconError(f"{path}: not a readable Siemens raw-data (twix) file: {why}; it is truncated or "
                      "corrupt - copy it from the scanner again (TWIX export)")


def _twix_prewalk(path: Path) -> None:
    """Walk the twix block chain exactly as ``twixtools.read_twix`` does (with its own ``Mdb``
    class, stepping on with the previous block's length after an unreadable block, as it does)
    before twixtools parses the file: a zero-length block in a damaged file would make
    twixtools loop forever.  Reads the file once more (headers and data)."""
    try:
        from twixtools import hdr_def, helpers
        from twixtools import mdb as tw_mdb
    except ImportError:  # a twixtools without these internals: let it parse on its own
        return
    size = path.stat().st_size
    if size < 32:
        raise _twix_corrupt(path, f"only {size} bytes")
    with open(path, "rb") as fid, quiet():
        ve, _ = helpers.idea_version_check(fid)
        spans = [(0, size)]
        if ve:
            fid.seek(0)
            raid = np.fromfile(fid, dtype=hdr_def.MultiRaidFileHeader, count=1)
            if raid.size != 1:
                raise _twix_corrupt(path, "the multi-measurement header is truncated")
            count = int(raid[0]["hdr"]["count_"])
            if not 1 <= count <= 64:
                raise _twix_corrupt(path, f"the header lists {count} measurements (expected 1..64)")
            entries = raid[0]["entry"][:count]
            spans = [(int(e["off_"]), int(e["len_"]) or (size - int(e["off_"]) if count == 1 else 0))
                     for e in entries]
        for k, (off, length) in enumerate(spans):
            if length <= 0 or off + length > size:
                raise _twix_corrupt(path, f"measurement {k} spans bytes {off}..{off + length} of a "
                                          f"{size}-byte file")
            fid.seek(off)
            first = np.fromfile(fid, dtype="<u4", count=1)
            if first.size != 1 or not 8 <= int(first[0]) <= length:
                raise _twix_corrupt(path, f"measurement {k} has an invalid protocol header length")
            pos, end = off + int(first[0]), off + length
            block = None
            while pos + 128 < end:
                fid.seek(pos)
                try:
                    block = tw_mdb.Mdb(fid, ve)
                except ValueError:
                    if block is None:
                        raise _twix_corrupt(path, f"unreadable data block at byte {pos}") from None
                step = int(block.dma_len)
                if step <= 0:
                    raise _twix_corrupt(path, f"a zero-length data block at byte {pos}")
                pos += step
                if block.is_flag_set("ACQEND"):
                    break


def _twix_get(hdr: Any, *keys: Any) -> Any:
    for key in keys:
        try:
            hdr = hdr[key]
        except (KeyError, IndexError, TypeError):
            return None
    return hdr


def _twix_read_array(path: Path, arr, what: str, slice_index: int | None,
                     remove_oversampling: bool) -> tuple[np.ndarray, dict[str, int]]:
    """``(slices, coils, lines, columns)`` of one twixtools ``twix_array`` (first Rep/Eco/...,
    averages and segments averaged) and the sizes of every dim."""
    try:
        arr.flags["remove_os"] = bool(remove_oversampling)
        arr.flags["squeeze_singletons"] = False
        arr.flags["squeeze_ave_dims"] = False
        for dim in ("Ave", "Seg"):
            arr.flags["average"][dim] = True
        dims = [str(d) for d in arr.dims]
        shape = [int(s) for s in arr.shape]
    except ReconError:
        raise
    except Exception as exc:
        raise ReconError(f"{path}: twixtools could not describe the {what} data ({short(exc)}); use a "
                         "supported twixtools version (pip install 'scoreprior-recon[siemens]')") from None
    sizes = dict(zip(dims, shape))
    missing = [d for d in ("Sli", "Lin", "Cha", "Col") if d not in sizes]
    if missing or len(dims) != len(shape):
        raise ReconError(f"{path}: twixtools returned dims {dims} without {missing}; use a supported "
                         "twixtools version (pip install 'scoreprior-recon[siemens]')")
    if sizes.get("Par", 1) > 1:
        raise ReconError(f"{path}: 3-D twix data ({sizes['Par']} partitions) are not supported; convert them "
                         "to ISMRMRD (siemens_to_ismrmrd) - 3-D data fully sampled along kz are read from "
                         "there - or reconstruct with a 3-D tool")
    n_sli = sizes["Sli"]
    if slice_index is not None and not 0 <= slice_index < n_sli:
        raise ReconError(f"{path}: slice {slice_index} out of range; the file has {n_sli} slice(s)")
    index = []
    for d in dims:
        if d in ("Lin", "Cha", "Col"):
            index.append(slice(None))
        elif d == "Sli":
            index.append(slice(None) if slice_index is None else slice(slice_index, slice_index + 1))
        else:
            index.append(0)
    n_out = n_sli if slice_index is None else 1
    check_size(path, (n_out, sizes["Lin"], sizes["Cha"], sizes["Col"]), f"the {what} k-space", 8)
    try:
        with quiet(), contextlib.redirect_stdout(io.StringIO()):
            data = np.asarray(arr[tuple(index)])
    except Exception as exc:
        raise _twix_corrupt(path, f"reading the {what} data failed ({short(exc)})") from None
    if data.shape != (n_out, sizes["Lin"], sizes["Cha"], sizes["Col"]):
        raise ReconError(f"{path}: twixtools returned {what} data of shape {data.shape}, expected (Sli, Lin, "
                         f"Cha, Col) = {(n_out, sizes['Lin'], sizes['Cha'], sizes['Col'])}; use a supported "
                         "twixtools version (pip install 'scoreprior-recon[siemens]')")
    if not np.isfinite(data).all():
        raise ReconError(f"{path}: the {what} data contain NaN or infinite values; the raw data are corrupt")
    return np.transpose(data, (0, 2, 1, 3)).astype(np.complex64), sizes


def read_siemens_twix(path: str | os.PathLike, *, slice_index: int | None = None,
                      calibration: str = "skip", remove_oversampling: bool = True) -> KSpace:
    """Cartesian 2-D k-space from a Siemens raw-data file (``.dat``, VB or VD/VE) through
    ``twixtools`` (optional extra ``[siemens]``).

    The last measurement of the file is read (earlier ones in a VD/VE multi-measurement
    file are adjustment scans); its ``image`` data (twixtools' category: no noise,
    phase-correction, reference or feedback scans) become ``(slices, coils, lines, columns)``
    by the ``Sli``, ``Cha``, ``Lin`` and ``Col`` counters.  Averages and segments are averaged
    (twixtools' default), only index 0 of ``Rep``, ``Eco``, ``Phs``, ``Set`` and ``Ida``..``Ide``
    is read.  Readout oversampling is removed by twixtools (``remove_os``) when
    ``remove_oversampling``.  Lines and columns are zero-padded so the k-space centre
    (``CenterLin``/``CenterCol``) lands at ``(H//2, W//2)`` (partial Fourier, asymmetric echo);
    at least ``lPhaseEncodingLines`` lines.  GRAPPA reference lines (twixtools' ``refscan``) are
    skipped, or with ``calibration="fill"`` used for the lines the image data lack.  ``mask`` is
    boolean ``(slices, H, W)``: acquired samples (lines with any non-zero sample)."""
    path = require_file(path)
    _check_calibration(calibration)
    twixtools = _optional_import("twixtools", "siemens", path, "Siemens raw data (.dat)")
    _twix_prewalk(path)
    try:
        with quiet(), contextlib.redirect_stdout(io.StringIO()):
            try:
                scans = twixtools.read_twix(str(path), verbose=False, parse_pmu=False, parse_geometry=False)
            except TypeError:  # an older twixtools without these options
                scans = twixtools.read_twix(str(path), verbose=False)
            measurements = twixtools.map_twix(scans, verbose=False)
    except ReconError:
        raise
    except Exception as exc:
        raise _twix_corrupt(path, f"twixtools failed ({short(exc)})") from None
    measurements = [m for m in (measurements or []) if isinstance(m, dict)]
    if not measurements:
        raise _twix_corrupt(path, "no measurement found")
    return _twix_assemble(path, measurements, slice_index, calibration, remove_oversampling)


def _twix_assemble(path: Path, measurements: list, slice_index: int | None, calibration: str,
                   remove_oversampling: bool) -> KSpace:
    meas = measurements[-1]
    if "image" not in meas:
        found = sorted(str(k) for k in meas if k not in ("hdr", "hdr_str", "pmu")) or ["nothing"]
        raise ReconError(f"{path}: the last measurement of this Siemens raw-data file has no imaging data "
                         f"(twixtools found: {', '.join(found)}); it is an adjustment or noise-only scan")
    arr = meas["image"]
    data, sizes = _twix_read_array(path, arr, "image", slice_index, remove_oversampling)
    notes = []
    dropped = {d: sizes[d] for d in _TWIX_FIRST_ONLY if sizes.get(d, 1) > 1}
    if dropped:
        notes.append("first " + ", ".join(f"{d} of {n}" for d, n in dropped.items()) + " read")
    S, C, L, N = data.shape
    acquired = np.abs(data).max(axis=(1, 3)) > 0  # (S, L)
    if calibration == "fill" and "refscan" in meas:
        ref, rsizes = _twix_read_array(path, meas["refscan"], "reference (refscan)", slice_index,
                                       remove_oversampling)
        if ref.shape[1] != C or ref.shape[3] != N or ref.shape[0] != S:
            raise ReconError(f"{path}: the GRAPPA reference lines ({ref.shape[0]} slices, {ref.shape[1]} coils, "
                             f"{ref.shape[3]} columns) do not match the image data ({S}, {C}, {N}); read with "
                             "calibration='skip'")
        if ref.shape[2] > L:
            data = np.concatenate([data, np.zeros((S, C, ref.shape[2] - L, N), np.complex64)], axis=2)
            acquired = np.concatenate([acquired, np.zeros((S, ref.shape[2] - L), bool)], axis=1)
            L = ref.shape[2]
        ref_rows = np.zeros((S, L), bool)
        ref_rows[:, :ref.shape[2]] = np.abs(ref).max(axis=(1, 3)) > 0
        fill = ref_rows & ~acquired
        for s in range(S):
            rows = np.flatnonzero(fill[s])
            data[s][:, rows] = ref[s][:, rows]
        acquired |= fill
        notes.append(f"{int(fill.sum())} line(s) filled from the GRAPPA reference scan")
    elif "refscan" in meas:
        notes.append("GRAPPA reference scan skipped")
    if not acquired.any():
        raise ReconError(f"{path}: the imaging data of the last measurement are all zero")
    hdr = meas.get("hdr") or {}
    lines_hdr = _twix_get(hdr, "MeasYaps", "sKSpace", "lPhaseEncodingLines")
    centre_lin = int(getattr(arr, "kspace_center_lin", L // 2) or 0)
    centre_col = int(getattr(arr, "kspace_center_col", 0) or 0)
    n_cols_raw = N * 2 if remove_oversampling else N
    centre_col = centre_col if 0 < centre_col < n_cols_raw else n_cols_raw // 2
    if remove_oversampling:
        centre_col //= 2
    n_lin = max(L, int(lines_hdr)) if isinstance(lines_hdr, (int, float)) and 0 < lines_hdr <= 65536 else L
    if not 0 < centre_lin < n_lin:  # 0: unset
        centre_lin = n_lin // 2
    H, off_l = _centre_pad(n_lin, centre_lin)
    W, off_c = _centre_pad(N, centre_col)
    check_size(path, (S, C, H, W), "the assembled twix k-space", 8)
    out = np.zeros((S, C, H, W), np.complex64)
    out[:, :, off_l:off_l + L, off_c:off_c + N] = data
    mask = np.zeros((S, H, W), bool)
    mask[:, off_l:off_l + L, off_c:off_c + N] = acquired[:, :, None]
    if (H, W) != (L, N):
        notes.append(f"lines/columns {L}x{N} zero-padded to {H}x{W} to centre k-space "
                     f"(CenterLin {centre_lin}, CenterCol {centre_col})")
    if remove_oversampling:
        notes.append("readout oversampling removed by twixtools (remove_os)")
    attrs: dict[str, Any] = {
        "format": "Siemens twix", "measurements_in_file": len(measurements),
        "twix_dims": {k: v for k, v in sizes.items() if v > 1}, "dropped_counters": dropped,
        "readout_oversampling_removed": bool(remove_oversampling), "coils": C,
        "base_resolution": _twix_get(hdr, "MeasYaps", "sKSpace", "lBaseResolution"),
        "phase_encoding_lines": lines_hdr,
        "readout_fov_mm": _twix_get(hdr, "MeasYaps", "sSliceArray", "asSlice", 0, "dReadoutFOV"),
        "phase_fov_mm": _twix_get(hdr, "MeasYaps", "sSliceArray", "asSlice", 0, "dPhaseFOV"),
        "slice_thickness_mm": _twix_get(hdr, "MeasYaps", "sSliceArray", "asSlice", 0, "dThickness"),
        "categories": sorted(str(k) for k in meas if k not in ("hdr", "hdr_str", "pmu")),
        "notes": notes}
    layout = (f"Siemens twix (last of {len(measurements)} measurement(s)), twixtools 'image': (Sli, Lin, Cha, "
              f"Col) -> (slices, coils, lines, columns) {out.shape}; averages/segments averaged"
              + "".join(f"; {n}" for n in notes))
    return KSpace(data=out, mask=mask, attrs=attrs, source=str(path), layout=layout)


# ---------------------------------------------------------------------------
# npy
# ---------------------------------------------------------------------------


def _kspace_from_npy(path: Path) -> KSpace:
    from recon.io.images import read_npy

    arr = read_npy(path)
    if not np.iscomplexobj(arr):
        raise ReconError(f"{path}: .npy is real ({arr.shape}); k-space must be complex - if this "
                         "is a magnitude image, simulate k-space from it instead")
    layouts = {2: ("(H, W) single-coil", (None, None)), 3: ("(coils, H, W)", (None,)),
               4: ("(slices, coils, H, W)", ())}
    if arr.ndim not in layouts:
        raise ReconError(f"{path}: complex .npy has shape {arr.shape}; expected (H, W), "
                         "(coils, H, W) or (slices, coils, H, W)")
    desc, pad = layouts[arr.ndim]
    data = arr[pad + (Ellipsis,)] if pad else arr
    return KSpace(data=np.ascontiguousarray(data, dtype=np.complex64), source=str(path),
                  layout=f".npy {desc} -> (slices, coils, H, W)")


def read_complex_image(path: str | os.PathLike) -> np.ndarray:
    """A complex-valued 2D *image* (e.g. the fastMRI knee sample ``001.npy``)
    as complex64 ``(H, W)``.  Accepts ``.npy`` and BART ``.cfl``."""
    path = require_file(path) if Path(path).suffix.lower() not in (".cfl", ".hdr", "") \
        else Path(path)
    if path.suffix.lower() == ".npy":
        from recon.io.images import read_npy
        arr = read_npy(path)
    else:
        arr = read_cfl(path)
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise ReconError(f"{path}: complex image has shape {arr.shape}; expected 2D (H, W)")
    return arr.astype(np.complex64)


def is_ismrmrd(path: str | os.PathLike, group: str = "dataset") -> bool:
    """Whether an HDF5 file is ISMRMRD: it has a group ``/<group>`` (default ``/dataset``)
    holding ``data`` or ``xml``.  Unreadable files answer ``False`` (the fastMRI reader then
    reports what is wrong)."""
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            grp = fh.get(group)
            return isinstance(grp, h5py.Group) and ("data" in grp or "xml" in grp)
    except Exception:
        return False


def read_kspace(path: str | os.PathLike, dataset: str | None = None, *,
                from_image: bool = False, slice_index: int | None = None,
                calibration: str = "skip", remove_oversampling: bool = True) -> KSpace:
    """Read k-space from ISMRMRD or fastMRI ``.h5``, Siemens ``.dat``, BART ``.cfl/.hdr`` or
    complex ``.npy``.

    An ``.h5``/``.hdf5`` is ISMRMRD when it has a group ``/dataset`` (or ``/<dataset>``)
    holding ``data``/``xml`` (:func:`read_ismrmrd`), else fastMRI: ``dataset`` names the
    k-space dataset (default ``kspace``); a missing one raises ``ReconError`` listing the
    datasets present.  ``.dat`` is Siemens raw data (:func:`read_siemens_twix`, needs the
    ``[siemens]`` extra).  ``slice_index`` reads only that slice of an ``.h5``/``.dat``.
    ``calibration`` and ``remove_oversampling`` apply to ISMRMRD and Siemens data only.
    ``from_image=True`` treats the file as a complex image: ``data`` is its centred
    orthonormal FFT and ``reference`` its magnitude.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if from_image:
        img = read_complex_image(p)
        return KSpace(data=image_to_kspace(img)[None, None], reference=np.abs(img)[None],
                      reference_name="abs(image)", source=str(p),
                      layout="complex image (H, W) -> centred orthonormal FFT -> (1, 1, H, W)")
    raw = {"calibration": calibration, "remove_oversampling": remove_oversampling}

    def h5() -> KSpace:
        require_file(p)
        group = dataset or "dataset"
        if is_ismrmrd(p, group):
            return read_ismrmrd(p, group=group, slice_index=slice_index, **raw)
        return _kspace_from_h5(p, dataset, slice_index)

    readers = {".h5": h5, ".hdf5": h5,
               ".dat": lambda: read_siemens_twix(p, slice_index=slice_index, **raw),
               ".cfl": lambda: _kspace_from_cfl(p),
               ".hdr": lambda: _kspace_from_cfl(p),
               ".npy": lambda: _kspace_from_npy(require_file(p))}
    if suffix not in readers and p.with_suffix(".cfl").is_file() and p.with_suffix(".hdr").is_file():
        return _kspace_from_cfl(p)  # a BART base name without suffix
    if suffix not in readers:
        raise ReconError(f"{p}: unsupported k-space format '{suffix or p.name}'; supported: "
                         "ISMRMRD or fastMRI .h5, Siemens raw data .dat, BART .cfl/.hdr (or the base name), "
                         "complex .npy")
    return readers[suffix]()


def _fastmri_slice_count(path: Path, dataset: str | None) -> int | None:
    """Slices of a fastMRI k-space dataset from its shape (nothing read), or None when the
    dataset is missing or odd (the reader then says what is wrong)."""
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            ds = fh.get(dataset or "kspace")
            if not isinstance(ds, h5py.Dataset) or ds.shape is None:
                return None
            shape = tuple(int(d) for d in ds.shape)
            kind = _complex_kind(ds.dtype, shape)
    except Exception:
        return None
    if kind is None:
        return None
    spatial = shape[:-1] if kind == "pairs" else shape
    return shape[0] if len(spatial) in (3, 4) else None


def kspace_slices(path: str | os.PathLike, dataset: str | None = None, *,
                  from_image: bool = False) -> tuple[int, Callable[[int], KSpace], str]:
    """A k-space file slice by slice: ``(n_slices, read, how)``; ``read(k)`` gives slice ``k``
    as a one-slice :class:`KSpace` (its reference and mask sliced too), ``how`` says how.

    fastMRI ``.h5`` is read one slice at a time (h5py reads only that slice), a 4-D complex
    ``.npy`` through a memory map; other formats (ISMRMRD and Siemens raw data, whose readers
    assemble the whole acquisition; BART ``.cfl``; ``from_image``) are read once, whole."""
    from recon.io.images import npy_shape, open_npy

    p = Path(path)
    suffix = p.suffix.lower()
    if not from_image and suffix in (".h5", ".hdf5") and not is_ismrmrd(require_file(p), dataset or "dataset"):
        n = _fastmri_slice_count(p, dataset)
        if n is not None and n > 1:
            return n, lambda k: _kspace_from_h5(p, dataset, int(k)), "one slice at a time (HDF5 slice reads)"
    if not from_image and suffix == ".npy":
        shape, dtype = npy_shape(require_file(p))
        if dtype.kind == "c" and len(shape) == 4 and shape[0] > 1:
            mm = open_npy(p)

            def read_npy_slice(k: int) -> KSpace:
                return KSpace(data=np.ascontiguousarray(mm[int(k)][None], dtype=np.complex64), source=str(p),
                              layout=".npy (slices, coils, H, W) -> (slices, coils, H, W)")

            return int(shape[0]), read_npy_slice, "one slice at a time (memory-mapped .npy)"
    ks = read_kspace(p, dataset, from_image=from_image)
    n = ks.n_slices

    def one(k: int) -> KSpace:
        k = int(k)
        mask = ks.mask
        if mask is not None and mask.ndim == 3 and mask.shape[0] == n:
            mask = mask[k:k + 1]
        return replace(ks, data=ks.data[k:k + 1], mask=mask,
                       reference=None if ks.reference is None else ks.reference[k:k + 1])

    return n, one, "the whole file read once (this format is assembled as a whole)"
