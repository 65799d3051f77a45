"""MRI k-space: fastMRI ``.h5``, BART ``.cfl/.hdr`` and complex ``.npy``.

Every reader returns a :class:`KSpace` whose ``data`` is ``complex64`` with
the canonical shape ``(n_slices, n_coils, H, W)`` (single-coil data has
``n_coils == 1``).  ``KSpace.coil_slice(i)`` gives one ``(n_coils, H, W)``
slice.  K-space is returned as stored: no shifts or FFTs are applied (fastMRI
and BART both store k-space with the centre in the middle).

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

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recon.errors import ReconError
from recon.io._util import atomic_output, check_size, require_file, short

__all__ = ["KSpace", "read_kspace", "read_cfl", "write_cfl", "read_complex_image",
           "image_to_kspace", "kspace_to_image", "KSPACE_SUFFIXES"]

KSPACE_SUFFIXES = (".h5", ".hdf5", ".cfl", ".hdr", ".npy")
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
    try:
        fh = h5py.File(path, "r")
    except Exception as exc:
        raise _h5_error(path, exc) from exc
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


def read_kspace(path: str | os.PathLike, dataset: str | None = None, *,
                from_image: bool = False, slice_index: int | None = None) -> KSpace:
    """Read k-space from fastMRI ``.h5``, BART ``.cfl/.hdr`` or complex ``.npy``.

    ``dataset`` names the k-space dataset in an ``.h5`` (default ``kspace``);
    a missing one raises ``ReconError`` listing the datasets present.
    ``slice_index`` reads only that slice of an ``.h5``.  ``from_image=True``
    treats the file as a complex image: ``data`` is its centred orthonormal
    FFT and ``reference`` its magnitude.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if from_image:
        img = read_complex_image(p)
        return KSpace(data=image_to_kspace(img)[None, None], reference=np.abs(img)[None],
                      reference_name="abs(image)", source=str(p),
                      layout="complex image (H, W) -> centred orthonormal FFT -> (1, 1, H, W)")
    readers = {".h5": lambda: _kspace_from_h5(require_file(p), dataset, slice_index),
               ".hdf5": lambda: _kspace_from_h5(require_file(p), dataset, slice_index),
               ".cfl": lambda: _kspace_from_cfl(p),
               ".hdr": lambda: _kspace_from_cfl(p),
               ".npy": lambda: _kspace_from_npy(require_file(p))}
    if suffix not in readers and p.with_suffix(".cfl").is_file() and p.with_suffix(".hdr").is_file():
        return _kspace_from_cfl(p)  # a BART base name without suffix
    if suffix not in readers:
        raise ReconError(f"{p}: unsupported k-space format '{suffix or p.name}'; supported: "
                         "fastMRI .h5, BART .cfl/.hdr (or the base name), complex .npy")
    return readers[suffix]()
