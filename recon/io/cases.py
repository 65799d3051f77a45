"""Find evaluation cases under a folder for ``recon compare``.

:func:`discover_cases` walks ``root`` recursively (hidden entries skipped,
sorted, symlinked folders not followed) and returns one :class:`Case` per

* DICOM series (files grouped by SeriesInstanceUID anywhere under ``root``):
  its middle slice (``slices='middle'``) or every slice (``'all'``), in the
  sorted slice order of :func:`recon.io.read_dicom`;
* NIfTI volume: the middle (or every) slice along the slice axis (the last
  NIfTI axis, see :mod:`recon.io.nifti`);
* PNG / JPEG / TIFF / BMP image and 2D ``.npy`` array: one case (a complex
  ``.npy``, e.g. a complex MR image, gives its magnitude as ``image`` and
  ``meta['complex'] = True``; read the complex values with
  :func:`recon.io.read_complex_image`).

Other files (README, LICENSE, k-space ``.h5``/``.cfl``/``.hdr``, JSON, ...)
are ignored; valid files that cannot be a 2D case (4D NIfTI, 3D ``.npy``)
are skipped with a ``UserWarning``.  Corrupt files raise ``ReconError`` when
they are read (DICOM headers during discovery, pixels on first access).

Names are built from the path relative to ``root`` ("/" -> "__"), plus
``__z0014`` (slice index) for volumes and a short series tag when a folder
holds several DICOM series; they use only ``[A-Za-z0-9._-]`` and are made
unique with ``_2``, ``_3`` suffixes.  Cases are returned sorted by name.
Pixels and reference volumes are loaded lazily and cached.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from recon.errors import ReconError
from recon.io import dicom as _dicom
from recon.io._util import quiet, safe_name, short
from recon.io.images import IMAGE_SUFFIXES, npy_shape, read_image
from recon.io.nifti import is_nifti_path, read_nifti
from recon.io.volume import Volume

__all__ = ["Case", "discover_cases"]


@dataclass(eq=False)
class Case:
    """One 2D evaluation image.

    ``name``: stable, unique, filesystem-safe.  ``image``: 2D float32
    (loaded on first access).  ``source``: the file (DICOM: the file of this
    slice; NIfTI/image: the file).  ``modality``: DICOM Modality or ``None``
    when the format does not record it.  ``reference``: the :class:`Volume`
    the slice comes from (DICOM/NIfTI; ``None`` for 2D images), for writing
    outputs with the same geometry.  ``slice_index``: index into
    ``reference.data`` (``None`` for 2D images).
    """

    name: str
    source: Path
    modality: str | None
    slice_index: int | None
    kind: str
    meta: dict[str, Any] = field(default_factory=dict)
    _image_loader: Callable[[], np.ndarray] | None = field(default=None, repr=False)
    _reference_loader: Callable[[], Volume | None] | None = field(default=None, repr=False)
    _image: np.ndarray | None = field(default=None, repr=False)

    @property
    def image(self) -> np.ndarray:
        if self._image is None:
            img = self._image_loader()
            if np.iscomplexobj(img):
                img = np.abs(img)
            self._image = np.asarray(img, dtype=np.float32)
        return self._image

    @property
    def reference(self) -> Volume | None:
        return None if self._reference_loader is None else self._reference_loader()


class _Cached:
    def __init__(self, fn: Callable[[], Any]):
        self._fn, self._value, self._done = fn, None, False

    def __call__(self) -> Any:
        if not self._done:
            self._value, self._done = self._fn(), True
        return self._value


def _rel_token(path: Path, root: Path) -> str:
    try:
        rel = path.relative_to(root)
    except ValueError:
        rel = Path(path.name)
    parts = [p for p in rel.parts if p not in ("", ".")] or [root.name or "root"]
    return "__".join(safe_name(p, 60) for p in parts)


def _strip_suffix(name: str) -> str:
    low = name.lower()
    for suf in (".nii.gz", ".nii", ".npy", *IMAGE_SUFFIXES, ".dcm", ".dicom", ".ima"):
        if low.endswith(suf):
            return name[: -len(suf)]
    return name


def _indices(n: int, slices: str) -> list[int]:
    """'middle', 'all', or 'every:K' (every K-th slice, starting at K // 2)."""
    if slices == "all":
        return list(range(n))
    if slices == "middle":
        return [n // 2]
    if isinstance(slices, str) and slices.startswith("every:") and slices[6:].isdigit() and int(slices[6:]) > 0:
        k = int(slices[6:])
        return list(range(min(k // 2, n - 1), n, k))
    raise ReconError(f"slices must be 'middle', 'all' or 'every:K' with K >= 1, got {slices!r}")


def _dicom_cases(files: list[Path], root: Path, slices: str) -> list[tuple[str, Case]]:
    series = _dicom._scan(files)
    per_folder = Counter()
    folders = {}
    for s in series:
        folder = Path(os.path.commonpath([str(f.parent) for f in s.files]))
        folders[s.uid] = folder
        per_folder[folder] += 1
    out = []
    for s in series:
        folder = folders[s.uid]
        base = _rel_token(folder, root) if folder != root else safe_name(root.name or "dicom")
        if per_folder[folder] > 1:
            tag = safe_name(s.description, 30) if s.description else "series"
            base += f"__{tag}_{hashlib.sha1(s.uid.encode()).hexdigest()[:6]}"
        frames, _, _ = _dicom._sort_frames(s.frames)
        label = str(folder)
        volume = _Cached(lambda s=s, label=label: _dicom._safe_volume(s, label))

        def image(k: int, frames=frames, volume=volume, label=label) -> np.ndarray:
            if volume._done:
                return volume().data[k]
            return _dicom._safe_frames([frames[k]], label)[0]

        for k in _indices(len(frames), slices):
            case = Case(name="", source=frames[k].path, modality=s.modality or None,
                        slice_index=k, kind="dicom",
                        meta={"series_uid": s.uid, "series_description": s.description,
                              "n_slices": len(frames), "frame": frames[k].frame},
                        _image_loader=lambda k=k, image=image: image(k),
                        _reference_loader=volume)
            out.append((f"{base}__z{k:04d}", case))
    return out


def _nifti_cases(path: Path, root: Path, slices: str) -> list[tuple[str, Case]]:
    import nibabel as nib

    try:
        with quiet():
            shape = tuple(int(x) for x in nib.load(str(path)).shape)
    except Exception as exc:
        raise ReconError(f"{path}: cannot read this NIfTI file: it is truncated, corrupt or not "
                         f"NIfTI ({short(exc)}); re-export it or remove it") from exc
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) not in (2, 3):
        warnings.warn(f"skipping {path}: NIfTI shape {shape} is not a 2D/3D volume", UserWarning,
                      stacklevel=3)
        return []
    n = shape[2] if len(shape) == 3 else 1
    volume = _Cached(lambda: read_nifti(path))
    base = _rel_token(path.with_name(_strip_suffix(path.name)), root)
    return [(f"{base}__z{k:04d}",
             Case(name="", source=path, modality=None, slice_index=k, kind="nifti",
                  meta={"n_slices": n},
                  _image_loader=lambda k=k: volume().data[k], _reference_loader=volume))
            for k in _indices(n, slices)]


def _image_case(path: Path, root: Path) -> list[tuple[str, Case]]:
    meta: dict[str, Any] = {}
    if path.suffix.lower() == ".npy":
        shape, dtype = npy_shape(path)
        if len(shape) == 3 and shape[0] == 1:
            shape = shape[1:]
        if len(shape) != 2:
            warnings.warn(f"skipping {path}: .npy shape {shape} is not a 2D image", UserWarning,
                          stacklevel=3)
            return []
        meta["complex"] = bool(np.issubdtype(dtype, np.complexfloating))
    base = _rel_token(path.with_name(_strip_suffix(path.name)), root)
    return [(base, Case(name="", source=path, modality=None, slice_index=None, kind="image",
                        meta=meta, _image_loader=lambda: read_image(path),
                        _reference_loader=None))]


def _walk(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return _dicom._walk_files(root)


def discover_cases(root: str | os.PathLike, slices: str = "middle") -> list[Case]:
    """All 2D evaluation cases under ``root`` (see the module docstring)."""
    _indices(1, slices)  # validates the selector
    root_p = Path(root)
    if not root_p.exists():
        raise ReconError(f"{root_p}: no such file or folder; check the data path")
    base_root = root_p.parent if root_p.is_file() else root_p
    named: list[tuple[str, Case]] = []
    dicom_files: list[Path] = []
    for path in _walk(root_p):
        name = path.name.lower()
        if is_nifti_path(path):
            named += _nifti_cases(path, base_root, slices)
        elif name.endswith(IMAGE_SUFFIXES) or name.endswith(".npy"):
            named += _image_case(path, base_root)
        elif _dicom._sniff(path) is not None:
            dicom_files.append(path)
    if dicom_files:
        named += _dicom_cases(dicom_files, base_root, slices)

    named.sort(key=lambda nc: (nc[0], str(nc[1].source), nc[1].slice_index or 0))
    seen: dict[str, int] = defaultdict(int)
    taken = {n for n, _ in named}
    cases = []
    for base, case in named:
        seen[base] += 1
        name = base
        if seen[base] > 1:
            i = seen[base]
            while f"{base}_{i}" in taken:
                i += 1
            name = f"{base}_{i}"
            taken.add(name)
        case.name = name
        cases.append(case)
    cases.sort(key=lambda c: c.name)
    return cases
