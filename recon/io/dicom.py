"""Read DICOM series into a :class:`~recon.io.volume.Volume`; write derived series.

Reading
-------
``read_dicom(path)`` accepts a file, a folder (searched recursively; files
with or without an extension; non-DICOM files such as README or LICENSE are
skipped) or a list of files.  Files are grouped by SeriesInstanceUID; when
several series are found, ``series_uid`` must name one.

* Pixel values are converted to modality units (Hounsfield units for CT) with
  the modality LUT (RescaleSlope/RescaleIntercept or a Modality LUT
  Sequence); enhanced multi-frame objects use the per-frame or shared Pixel
  Value Transformation; RT Dose applies DoseGridScaling (Gy).
* Slices are sorted by ImagePositionPatient projected on the slice normal
  (cross product of the two ImageOrientationPatient direction cosines), not
  by InstanceNumber.  InstanceNumber is used only when a position is missing,
  and file name/frame order only when both are missing.
* Multi-frame objects contribute one slice per frame; frame positions come
  from the Per-Frame (or Shared) Functional Groups, or from
  GridFrameOffsetVector (RT Dose).
* ``spacing = (dz, dy, dx)`` with ``(dy, dx) = PixelSpacing`` and ``dz`` the
  median distance between consecutive sorted positions along the normal.
  The LPS -> RAS affine is described in :mod:`recon.io.volume`.

Writing
-------
``write_dicom_series`` writes a derived series next to (never into the folder
of) the reference series: new Series/SOP Instance UIDs, same Study and Frame
of Reference, ImageType DERIVED\\SECONDARY, int16 pixels with a rescale that
keeps values within 1 unit, explicit VR little endian, validated with
pydicom's strict (RAISE) validation.  Every file is written atomically.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pydicom
from pydicom import config as _pdconfig
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         generate_uid)

try:  # pydicom >= 3
    from pydicom.pixels import apply_modality_lut
except ImportError:  # pragma: no cover - pydicom 2.x
    from pydicom.pixel_data_handlers.util import apply_modality_lut

try:
    from pydicom.valuerep import validate_value as _validate_value
except ImportError:  # pragma: no cover - very old pydicom
    _validate_value = None

from recon.errors import ReconError
from recon.io._util import BoundedReader, atomic_output, check_size, quiet, short
from recon.io.volume import LPS_TO_RAS, Volume

__all__ = [
    "SeriesInfo",
    "is_dicom_file",
    "list_series",
    "read_dicom",
    "write_dicom_series",
    "CODECS_HINT",
]

PYDICOM_MAJOR = int(pydicom.__version__.split(".")[0])

#: How to get the optional decoders for compressed transfer syntaxes.
CODECS_HINT = ("pip install -e '.[dicom-codecs]' "
               "(pylibjpeg, pylibjpeg-openjpeg, pylibjpeg-libjpeg)")

#: More frames than this in one object is taken as a corrupt header.
_MAX_FRAMES = 100_000

_CT_IMAGE = UID("1.2.840.10008.5.1.4.1.1.2")
_MR_IMAGE = UID("1.2.840.10008.5.1.4.1.1.4")
_SC_IMAGE = UID("1.2.840.10008.5.1.4.1.1.7")

# ---------------------------------------------------------------------------
# file discovery
# ---------------------------------------------------------------------------


def _sniff(path: Path) -> str | None:
    """``'part10'`` for a file with the DICM preamble, ``'raw'`` for a
    preamble-less dataset that starts with a group 0002/0008 tag, else None."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return None
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "part10"
    if len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00"):
        vr = head[4:6]
        if vr.isalpha() and vr.isupper():  # explicit VR
            return "raw"
        length = int.from_bytes(head[4:8], "little")  # implicit VR
        if length < 1024 or length == 0xFFFFFFFF:
            return "raw"
    return None


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Cheap content check (no full parse): does ``path`` look like DICOM?"""
    path = Path(path)
    return path.is_file() and _sniff(path) is not None


def _walk_files(root: Path) -> list[Path]:
    """All regular files under ``root``, sorted, hidden files/folders skipped."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                out.append(Path(dirpath) / name)
    return out


def _as_paths(path: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[Path], str]:
    """Expand the user's ``path`` into candidate files and a label for errors."""
    if isinstance(path, (str, os.PathLike)):
        p = Path(path)
        if p.is_dir():
            return _walk_files(p), str(p)
        if p.is_file():
            return [p], str(p)
        raise ReconError(f"{p}: no such file or folder; check the input path")
    paths = [Path(x) for x in path]
    for p in paths:
        if not p.is_file():
            raise ReconError(f"{p}: no such file; check the input path")
    return sorted(paths), (str(paths[0].parent) if paths else "<no files>")


# ---------------------------------------------------------------------------
# header scanning
# ---------------------------------------------------------------------------


def _corrupt(path: Path, exc: BaseException | None = None, what: str = "DICOM file") -> ReconError:
    detail = f" ({short(exc)})" if exc is not None else ""
    return ReconError(f"{path}: cannot read this {what}: it is truncated or corrupt{detail}; "
                      "re-export or re-download it, or remove it from the folder")


def _read(path: Path, kind: str, header_only: bool) -> Dataset:
    try:
        with quiet(), BoundedReader(path) as fh:  # a corrupt length cannot allocate past the file
            ds = pydicom.dcmread(fh, stop_before_pixels=header_only, force=(kind == "raw"))
        _set_transfer_syntax(ds)
        return ds
    except Exception as exc:  # pydicom raises InvalidDicomError, EOFError, struct.error, ...
        raise _corrupt(path, exc) from exc


def _set_transfer_syntax(ds: Dataset) -> None:
    """A dataset without file meta (read by content) gets the transfer syntax
    it was actually encoded in, so that its pixel data can be decoded."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    encoding = getattr(ds, "original_encoding", None)
    implicit, little = encoding if encoding else (getattr(ds, "is_implicit_VR", None),
                                                  getattr(ds, "is_little_endian", None))
    if implicit is None or little is None:
        return
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _floats(value: Any, n: int | None = None) -> np.ndarray | None:
    """Finite float array from a DS/FD value (single or multi-valued), else None."""
    if value is None:
        return None
    try:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            seq = [value]
        else:
            seq = list(value)
        arr = np.asarray([float(v) for v in seq], dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        return None
    if (n is not None and arr.size != n) or not np.all(np.isfinite(arr)):
        return None
    return arr


def _float(value: Any) -> float | None:
    arr = _floats(value, 1)
    return None if arr is None else float(arr[0])


def _positive(arr: np.ndarray | None) -> np.ndarray | None:
    """``arr`` when every value is > 0 (spacings, thicknesses), else None."""
    return arr if arr is not None and np.all(arr > 0) else None


def _first(value: Any) -> Any:
    if value is None or isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return value
    value = list(value)
    return value[0] if value else None


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None and str(value).strip() != "" else None
    except (TypeError, ValueError):
        return None


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, None)
    if value is None:
        return ""
    return str(value).strip()


@dataclass
class _Frame:
    """One slice of a series: a single-frame file or one frame of a multi-frame file."""

    path: Path
    kind: str                       # 'part10' or 'raw' (see _sniff)
    header: Dataset
    frame: int | None               # index into a multi-frame object
    n_frames: int
    rows: int
    cols: int
    position: np.ndarray | None     # LPS, mm
    orientation: np.ndarray | None  # 6 direction cosines
    pixel_spacing: np.ndarray | None  # (dy, dx)
    thickness: float | None
    instance: int | None
    rescale: tuple[float, float] | None  # enhanced per-frame (slope, intercept)
    window: tuple[float, float] | None


def _group_item(groups: Sequence[Dataset | None], seq: str, attr: str) -> Any:
    """Look up ``attr`` in the first item of ``seq`` in per-frame then shared groups."""
    for group in groups:
        if group is None or seq not in group:
            continue
        items = group[seq].value
        if items and attr in items[0]:
            return items[0][attr].value
    return None


def _frames_from_header(path: Path, kind: str, ds: Dataset) -> list[_Frame]:
    rows, cols = _int(ds.get("Rows")), _int(ds.get("Columns"))
    if not rows or not cols:
        raise _corrupt(path, what="DICOM image (no Rows/Columns)")
    n_frames = _int(ds.get("NumberOfFrames")) or 1
    if not 1 <= n_frames <= _MAX_FRAMES:
        raise _corrupt(path, what=f"DICOM image (NumberOfFrames {n_frames})")
    samples = _int(ds.get("SamplesPerPixel")) or 1
    bits = _int(ds.get("BitsAllocated")) or 16
    # decoded as float32 (colour via float64): refuse absurd dims before any pixel is decoded
    check_size(path, (n_frames, rows, cols, max(samples, 1)), "DICOM pixel data",
               max(8 if samples > 1 else 4, -(-bits // 8)))
    top_ipp = _floats(ds.get("ImagePositionPatient"), 3)
    top_iop = _floats(ds.get("ImageOrientationPatient"), 6)
    top_ps = _positive(_floats(ds.get("PixelSpacing"), 2))
    if top_ps is None:
        top_ps = _positive(_floats(ds.get("ImagerPixelSpacing"), 2))
    top_th = _float(ds.get("SliceThickness"))
    top_th = top_th if top_th is not None and top_th > 0 else None
    instance = _int(ds.get("InstanceNumber"))
    top_win = None
    wc, ww = _float(_first(ds.get("WindowCenter"))), _float(_first(ds.get("WindowWidth")))
    if wc is not None and ww is not None:
        top_win = (wc, ww)

    shared = None
    if "SharedFunctionalGroupsSequence" in ds and ds.SharedFunctionalGroupsSequence:
        shared = ds.SharedFunctionalGroupsSequence[0]
    per_frame = None
    if "PerFrameFunctionalGroupsSequence" in ds:
        per_frame = ds.PerFrameFunctionalGroupsSequence
        if len(per_frame) != n_frames:
            raise _corrupt(path, what=f"multi-frame DICOM ({len(per_frame)} per-frame groups "
                                      f"for {n_frames} frames)")
    grid = _floats(ds.get("GridFrameOffsetVector"))
    if grid is not None and grid.size != n_frames:
        grid = None

    frames: list[_Frame] = []
    for i in range(n_frames):
        groups = [per_frame[i] if per_frame is not None else None, shared]
        ipp = _floats(_group_item(groups, "PlanePositionSequence", "ImagePositionPatient"), 3)
        iop = _floats(_group_item(groups, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        ps = _positive(_floats(_group_item(groups, "PixelMeasuresSequence", "PixelSpacing"), 2))
        th = _float(_group_item(groups, "PixelMeasuresSequence", "SliceThickness"))
        th = th if th is not None and th > 0 else None
        slope = _float(_group_item(groups, "PixelValueTransformationSequence", "RescaleSlope"))
        inter = _float(_group_item(groups, "PixelValueTransformationSequence", "RescaleIntercept"))
        fwc = _float(_first(_group_item(groups, "FrameVOILUTSequence", "WindowCenter")))
        fww = _float(_first(_group_item(groups, "FrameVOILUTSequence", "WindowWidth")))
        iop = iop if iop is not None else top_iop
        if ipp is None:
            if n_frames == 1:
                ipp = top_ipp
            elif grid is not None and top_ipp is not None and iop is not None:
                normal = np.cross(iop[:3], iop[3:])
                ipp = top_ipp + (grid[i] - grid[0]) * normal
        frames.append(_Frame(
            path=path, kind=kind, header=ds, frame=i if n_frames > 1 else None,
            n_frames=n_frames, rows=rows, cols=cols, position=ipp, orientation=iop,
            pixel_spacing=ps if ps is not None else top_ps,
            thickness=th if th is not None else top_th, instance=instance,
            rescale=(slope, inter) if slope is not None and inter is not None else None,
            window=(fwc, fww) if fwc is not None and fww is not None else top_win,
        ))
    return frames


_NON_IMAGE_HINTS = ("Directory", "Structured", "SR ", "Structure Set", "Plan", "Presentation",
                    "Registration", "Key Object", "Segmentation", "Waveform", "Encapsulated")


@dataclass
class _Series:
    uid: str
    description: str
    modality: str
    patient_id: str
    number: int | None
    frames: list[_Frame] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        seen: dict[Path, None] = {}
        for f in self.frames:
            seen.setdefault(f.path, None)
        return sorted(seen)


def _scan(paths: Iterable[Path]) -> list[_Series]:
    """Read headers of every DICOM image among ``paths``, grouped by series."""
    with quiet():  # pydicom warns about invalid values on access; they are not actionable
        return _scan_quiet(paths)


def _scan_quiet(paths: Iterable[Path]) -> list[_Series]:
    series: dict[str, _Series] = {}
    seen_sops: set[str] = set()
    for path in paths:
        kind = _sniff(path)
        if kind is None:
            continue  # README, LICENSE, .json, ...: not DICOM, skip silently
        ds = _read(path, kind, header_only=True)
        try:
            if "Rows" not in ds:
                sop = ds.get("SOPClassUID", None)
                fmeta = getattr(ds, "file_meta", None)
                if sop is None and fmeta is not None:
                    sop = fmeta.get("MediaStorageSOPClassUID", None)
                name = getattr(sop, "name", "") if sop is not None else ""
                if sop is not None and not any(h in name for h in _NON_IMAGE_HINTS):
                    raise _corrupt(path, what="DICOM image (header ends before Rows/Columns)")
                continue  # DICOMDIR, structured report, ...: no image to read
            sop_uid = _text(ds, "SOPInstanceUID")
            if sop_uid and sop_uid in seen_sops:
                continue  # the same instance twice (a copy): keep the first
            if sop_uid:
                seen_sops.add(sop_uid)
            uid = _text(ds, "SeriesInstanceUID") or f"(no SeriesInstanceUID: {path.parent})"
            if uid not in series:
                series[uid] = _Series(uid=uid, description=_text(ds, "SeriesDescription"),
                                      modality=_text(ds, "Modality"),
                                      patient_id=_text(ds, "PatientID"),
                                      number=_int(ds.get("SeriesNumber")))
            series[uid].frames.extend(_frames_from_header(path, kind, ds))
        except ReconError:
            raise
        except Exception as exc:
            raise _corrupt(path, exc) from exc
    return sorted(series.values(), key=lambda s: (str(s.files[0]), s.uid))


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series found under a folder (see :func:`list_series`)."""

    uid: str
    description: str
    files: tuple[Path, ...]
    n_slices: int
    modality: str
    patient_id: str
    series_number: int | None = None

    @property
    def folder(self) -> Path:
        """The deepest folder holding all files of the series."""
        return Path(os.path.commonpath([str(f.parent) for f in self.files]))


def _info(s: _Series) -> SeriesInfo:
    return SeriesInfo(uid=s.uid, description=s.description, files=tuple(s.files),
                      n_slices=len(s.frames), modality=s.modality, patient_id=s.patient_id,
                      series_number=s.number)


def list_series(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[SeriesInfo]:
    """Group the DICOM files under ``path`` (recursive) by SeriesInstanceUID.

    Only headers are read.  The list is ordered by each series' first file
    path.  An empty list means no DICOM image was found.
    """
    files, _ = _as_paths(path)
    return [_info(s) for s in _scan(files)]


def _describe(series: Sequence[_Series]) -> str:
    parts = []
    for s in series:
        desc = s.description or "no description"
        parts.append(f"{s.uid} ('{desc}', {s.modality or '?'}, {len(s.frames)} slices)")
    return "; ".join(parts)


def _select(series: list[_Series], series_uid: str | None, label: str) -> _Series:
    if not series:
        if Path(label).is_file():
            raise ReconError(f"{label}: not a readable DICOM image (no image data found: the file "
                             "is not DICOM, holds no image, or is truncated); point to a DICOM "
                             "image file or a folder containing a DICOM series")
        raise ReconError(f"{label}: no DICOM image files found; point to a DICOM file or a "
                         "folder containing a DICOM series")
    if series_uid is not None:
        for s in series:
            if s.uid == str(series_uid).strip():
                return s
        raise ReconError(f"{label}: no series with UID {series_uid}; available: "
                         f"{_describe(series)}; pass one of these with --series UID")
    if len(series) > 1:
        raise ReconError(f"{label}: holds {len(series)} DICOM series: {_describe(series)}; "
                         "choose one with --series UID (series_uid=...)")
    return series[0]


# ---------------------------------------------------------------------------
# sorting and geometry
# ---------------------------------------------------------------------------


def _normal(orientation: np.ndarray) -> np.ndarray | None:
    n = np.cross(orientation[:3], orientation[3:])
    norm = float(np.linalg.norm(n))
    return n / norm if norm > 1e-6 else None


def _sort_frames(frames: list[_Frame]) -> tuple[list[_Frame], str, np.ndarray | None]:
    """Sort slices; return them, the method used and the slice normal."""
    normal = None
    if frames and frames[0].orientation is not None:
        normal = _normal(frames[0].orientation)
    if normal is not None and all(f.position is not None for f in frames):
        key = lambda f: (float(f.position @ normal), f.instance or 0, str(f.path), f.frame or 0)
        return sorted(frames, key=key), "position", normal
    if all(f.instance is not None for f in frames):
        key = lambda f: (f.instance, str(f.path), f.frame or 0)
        return sorted(frames, key=key), "instance", normal
    key = lambda f: (str(f.path), f.frame or 0)
    return sorted(frames, key=key), "file", normal


def _geometry(frames: list[_Frame], method: str, normal: np.ndarray | None):
    """Return spacing (dz, dy, dx), affine (RAS) or None, positions or None, notes."""
    first = frames[0]
    ps = first.pixel_spacing
    dy, dx = (float(ps[0]), float(ps[1])) if ps is not None else (1.0, 1.0)
    notes: dict[str, Any] = {"spacing_known": ps is not None}
    positions = None
    dz = None
    if method == "position":
        positions = np.stack([f.position for f in frames])
        proj = positions @ normal
        steps = np.diff(proj)
        steps = steps[steps > 1e-4]
        if steps.size:
            dz = float(np.median(steps))
            notes["irregular_slice_spacing"] = bool(np.ptp(steps) > 0.01 * dz + 1e-3)
            notes["duplicate_positions"] = bool(steps.size < len(frames) - 1)
    if dz is None:
        sbs = _float(first.header.get("SpacingBetweenSlices"))
        dz = sbs if sbs is not None and sbs > 0 else (first.thickness if first.thickness else 1.0)
    spacing = (float(dz), dy, dx)

    affine = None
    if ps is not None and first.orientation is not None and first.position is not None \
            and normal is not None:
        row_dir, col_dir = first.orientation[:3], first.orientation[3:]
        if positions is not None and len(frames) > 1 and np.ptp(positions @ normal) > 1e-4:
            step = (positions[-1] - positions[0]) / (len(frames) - 1)
        else:
            step = normal * dz
        lps = np.eye(4)
        lps[:3, 0] = row_dir * dx   # column index c moves along the row direction
        lps[:3, 1] = col_dir * dy   # row index r moves along the column direction
        lps[:3, 2] = step           # slice index k
        lps[:3, 3] = first.position
        affine = LPS_TO_RAS @ lps
    return spacing, affine, positions, notes


# ---------------------------------------------------------------------------
# pixel decoding
# ---------------------------------------------------------------------------


def _decoder_available(ts: UID) -> bool | None:
    try:
        from pydicom.pixels import get_decoder
        return bool(get_decoder(ts).is_available)
    except Exception:
        return None


def _codec_error(path: Path, ts: UID, exc: BaseException) -> ReconError:
    name = getattr(ts, "name", str(ts))
    available = _decoder_available(ts)
    if available is False or "missing dependencies" in str(exc):
        return ReconError(
            f"{path}: pixel data uses the compressed transfer syntax '{name}' ({ts}) and no "
            f"decoder for it is installed; install the optional DICOM codecs with {CODECS_HINT}")
    return ReconError(
        f"{path}: could not decode pixel data in transfer syntax '{name}' ({ts}) "
        f"({short(exc)}); the file may be corrupt or need another decoder: run "
        f"{CODECS_HINT}, or re-export the series uncompressed")


def _to_grey(arr: np.ndarray, samples: int) -> np.ndarray:
    if samples > 1 and arr.shape[-1] == samples:
        rgb = arr[..., :3].astype(np.float64)
        return rgb @ np.array([0.299, 0.587, 0.114])
    return arr


def _decode_file(path: Path, kind: str, n_frames: int,
                 apply_lut: bool = True) -> tuple[np.ndarray, Dataset]:
    """All frames of one file, ``(n_frames, rows, cols)`` float32, with the
    top-level modality LUT applied when ``apply_lut`` (callers pass False when
    the frames carry functional-group rescale values, applied per frame)."""
    ds = _read(path, kind, header_only=False)
    ts = None
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        ts = UID(str(meta.TransferSyntaxUID))
    try:
        with quiet():
            arr = ds.pixel_array
    except Exception as exc:
        if ts is not None and ts.is_compressed:
            raise _codec_error(path, ts, exc) from exc
        raise _corrupt(path, exc) from exc
    try:
        samples = _int(ds.get("SamplesPerPixel")) or 1
        arr = _to_grey(np.asarray(arr), samples)
        if n_frames == 1 and arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3 or arr.shape[0] != n_frames:
            raise ValueError(f"pixel array shape {arr.shape} does not match {n_frames} frame(s)")
        if apply_lut and ("ModalityLUTSequence" in ds or "RescaleSlope" in ds
                          or "RescaleIntercept" in ds):
            with quiet():
                arr = apply_modality_lut(arr, ds)
        if _text(ds, "Modality") == "RTDOSE":
            scale = _float(ds.get("DoseGridScaling"))
            if scale is not None:
                arr = arr * scale
        out = np.asarray(arr, dtype=np.float32)
    except ReconError:
        raise
    except Exception as exc:
        raise _corrupt(path, exc) from exc
    if "PixelData" in ds:
        del ds.PixelData
    return out, ds


def _load_frames(frames: Sequence[_Frame]) -> np.ndarray:
    """Decode the given slices (each file once), in the given order."""
    rows, cols = frames[0].rows, frames[0].cols
    by_file: dict[Path, list[int]] = defaultdict(list)
    for i, f in enumerate(frames):
        if (f.rows, f.cols) != (rows, cols):
            raise ReconError(
                f"{f.path}: image size {f.rows}x{f.cols} differs from {rows}x{cols} in "
                f"{frames[0].path} of the same series; remove the odd file (e.g. a scout) or "
                "select the slices of one size")
        by_file[f.path].append(i)
    planes: list[np.ndarray | None] = [None] * len(frames)
    for path, idx in by_file.items():
        f0 = frames[idx[0]]
        group_rescale = any(frames[i].rescale is not None for i in idx)
        data, _ = _decode_file(path, f0.kind, f0.n_frames, apply_lut=not group_rescale)
        if data.shape[1:] != (rows, cols):
            raise _corrupt(path, what=f"DICOM image (decoded size {data.shape[1:]} but header "
                                      f"says {rows}x{cols})")
        for i in idx:
            f = frames[i]
            plane = data[f.frame or 0]
            if f.rescale is not None:
                plane = plane * np.float32(f.rescale[0]) + np.float32(f.rescale[1])
            planes[i] = plane
    return np.stack(planes).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------
# public reader
# ---------------------------------------------------------------------------


def _volume_from_series(s: _Series, label: str) -> Volume:
    frames, method, normal = _sort_frames(s.frames)
    if frames[0].orientation is not None and normal is not None:
        for f in frames[1:]:
            if f.orientation is None or not np.allclose(f.orientation, frames[0].orientation, atol=1e-3):
                raise ReconError(
                    f"{f.path}: slice orientation differs from {frames[0].path} in series "
                    f"{s.uid}; the series mixes planes (e.g. a localizer) - remove those files "
                    "or read a single plane")
    data = _load_frames(frames)
    spacing, affine, positions, notes = _geometry(frames, method, normal)
    first = frames[0]
    h = first.header
    units = None
    if s.modality == "CT" and ("RescaleIntercept" in h or first.rescale is not None):
        units = "HU"
    elif s.modality == "RTDOSE":
        units = _text(h, "DoseUnits") or None
    elif "RescaleType" in h:
        units = _text(h, "RescaleType") or None
    ts = None
    if getattr(h, "file_meta", None) is not None and "TransferSyntaxUID" in h.file_meta:
        ts = str(h.file_meta.TransferSyntaxUID)
    meta: dict[str, Any] = {
        "format": "dicom",
        "source": label,
        "modality": s.modality or None,
        "series_uid": s.uid,
        "series_description": s.description,
        "series_number": s.number,
        "patient_id": s.patient_id,
        "study_uid": _text(h, "StudyInstanceUID") or None,
        "frame_of_reference_uid": _text(h, "FrameOfReferenceUID") or None,
        "window_center": first.window[0] if first.window else None,
        "window_width": first.window[1] if first.window else None,
        "units": units,
        "transfer_syntax": ts,
        "files": [str(f.path) for f in frames],
        "frames": [f.frame for f in frames],
        "sort": method,
        "positions": positions,
        "orientation": first.orientation,
        "pixel_spacing": (spacing[1], spacing[2]),
        "slice_thickness": first.thickness,
        **notes,
    }
    return Volume(data=data, spacing=spacing, affine=affine,
                  datasets=[f.header for f in frames], meta=meta)


def read_dicom(path: str | os.PathLike | Sequence[str | os.PathLike],
               series_uid: str | None = None) -> Volume:
    """Read one DICOM series (file, folder searched recursively, or file list).

    Raises :class:`ReconError` when nothing DICOM is found, when several
    series are present and ``series_uid`` is not given (the message lists the
    UIDs with descriptions and slice counts), for truncated/corrupt files, and
    for compressed pixel data without an installed decoder.
    """
    files, label = _as_paths(path)
    series = _scan(files)
    chosen = _select(series, series_uid, label)
    return _safe_volume(chosen, label)


def _safe_volume(series: _Series, label: str) -> Volume:
    try:
        with quiet():
            return _volume_from_series(series, label)
    except ReconError:
        raise
    except Exception as exc:  # safety net: only our error type escapes
        raise ReconError(f"{label}: cannot assemble DICOM series {series.uid} ({short(exc)}); "
                         "the files may be corrupt or inconsistent - re-export the series") from exc


def _safe_frames(frames: Sequence[_Frame], label: str) -> np.ndarray:
    try:
        with quiet():
            return _load_frames(frames)
    except ReconError:
        raise
    except Exception as exc:
        raise ReconError(f"{label}: cannot decode DICOM slice(s) ({short(exc)}); the file may be "
                         "corrupt - re-export the series") from exc


# ---------------------------------------------------------------------------
# writing derived series
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _strict() -> Iterator[None]:
    settings = _pdconfig.settings
    old_r, old_w = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = _pdconfig.RAISE
    settings.writing_validation_mode = _pdconfig.RAISE
    try:
        yield
    finally:
        settings.reading_validation_mode = old_r
        settings.writing_validation_mode = old_w


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters for ``value``."""
    value = float(value)
    if value == 0 or not math.isfinite(value):
        return "0"
    for digits in range(12, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            if "e" in text:  # pydicom's DS accepts 1e-05 style
                mant, exp = text.split("e")
                text = f"{mant}e{int(exp)}"
            return text
    return "0"


def _truncate(text: str, limit: int) -> str:
    text = " ".join(text.replace("\\", "/").split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _choose_rescale(arr: np.ndarray, modality: str) -> tuple[str, str]:
    """RescaleSlope/Intercept (as DS text) for int16 storage.

    CT (or integer-valued data) spanning at most 65534 units: slope 1, so the
    error is at most 0.5 HU.  Otherwise the slope spreads the range over the
    int16 codes (error <= slope / 2); only a CT range wider than 65534 HU
    (not physical) could then exceed 0.5 HU.  The formatted (<= 16 chars)
    values are what the caller must scale with."""
    lo, hi = float(arr.min()), float(arr.max())
    integral = bool(np.all(np.abs(arr - np.round(arr)) < 1e-3))
    if (modality == "CT" or integral) and hi - lo <= 65534:
        if lo >= -32768 and hi <= 32767:
            return "1", "0"
        return "1", _ds(round((hi + lo) / 2))
    if hi == lo:
        return "1", _ds(lo)
    return _ds((hi - lo) / 65534.0 * (1 + 1e-9)), _ds((hi + lo) / 2)


def _input_files(reference: Volume) -> list[Path]:
    files = reference.meta.get("files") or []
    return [Path(f).resolve() for f in files]


_COPY_COMMON = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "PatientWeight", "PatientSize", "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID",
    "AccessionNumber", "ReferringPhysicianName", "StudyDescription", "FrameOfReferenceUID",
    "PositionReferenceIndicator", "BodyPartExamined", "PatientPosition", "AcquisitionDate",
    "AcquisitionTime",
)
_COPY_CT = ("KVP", "AcquisitionNumber", "ConvolutionKernel", "GantryDetectorTilt")
_COPY_MR = ("ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType",
            "RepetitionTime", "EchoTime", "EchoTrainLength", "InversionTime", "ImagedNucleus",
            "MagneticFieldStrength", "ImagingFrequency", "FlipAngle", "AcquisitionNumber")
_REQUIRED_SAME = ("StudyInstanceUID", "FrameOfReferenceUID")


def _copy_elements(dst: Dataset, src: Dataset, keywords: Sequence[str]) -> None:
    for kw in keywords:
        if kw not in src:
            continue
        elem = src[kw]
        try:
            value = elem.value
            _check(elem.VR, value)
            setattr(dst, kw, value)
        except Exception as exc:
            if kw in _REQUIRED_SAME:
                raise ReconError(
                    f"reference series: {kw} {str(elem.value)!r} is not valid DICOM "
                    f"({short(exc)}); a derived series must share it, so fix the reference "
                    "header (e.g. with dcmodify) or write NIfTI instead") from exc
            # an invalid optional value in the reference: leave it out


_STRING_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM",
               "UC", "UI", "UR", "UT"}


def _check(vr: str, value: Any) -> None:
    """Strict (RAISE) validation of one element value, item by item if
    multi-valued; DS/IS/PN/date objects are checked in their encoded text form."""
    if _validate_value is None or vr in ("SQ", "OB", "OW", "UN"):  # pragma: no cover
        return
    if isinstance(value, (list, tuple)) or (hasattr(value, "__iter__")
                                             and not isinstance(value, (str, bytes))):
        items = list(value)
    else:
        items = [value]
    for item in items:
        if vr in _STRING_VRS and item is not None and not isinstance(item, (str, bytes)):
            item = str(item)
        _validate_value(vr, item, _pdconfig.RAISE)


def _validate_all(ds: Dataset) -> None:
    for elem in ds.iterall():
        _check(elem.VR, elem.value)


def _save(ds: Dataset, path: Path) -> None:
    if PYDICOM_MAJOR >= 3:
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    else:  # pragma: no cover - pydicom 2.x
        ds.is_little_endian = True
        ds.is_implicit_VR = False
        ds.save_as(path, write_like_original=False)


def write_dicom_series(volume_or_array: Volume | np.ndarray, reference: Volume,
                       out_dir: str | os.PathLike, method: str,
                       settings: Mapping[str, Any] | None = None, *,
                       slice_indices: Sequence[int] | int | None = None,
                       series_description: str | None = None) -> list[Path]:
    """Write ``volume_or_array`` as a derived DICOM series of ``reference``.

    Parameters
    ----------
    volume_or_array:
        ``(n, rows, cols)`` or ``(rows, cols)`` real values in the reference's
        units (HU for CT), or a :class:`Volume`.  ``rows``/``cols`` may differ
        from the reference; PixelSpacing is then scaled (and the first pixel
        position moved) so that the field of view is unchanged.
    reference:
        The DICOM :class:`Volume` the data was derived from.
    out_dir:
        Output folder (created).  Refused when it contains any file of the
        reference series.  Files are named ``IM0001.dcm``, ... and replaced
        atomically if present.
    method, settings:
        Recorded in DerivationDescription (JSON, truncated to 1024 chars) and
        SeriesDescription (64 chars).
    slice_indices:
        Which reference slice each output slice corresponds to.  Default: all
        slices when the counts match, or the only slice of a 1-slice reference.
    series_description:
        Overrides the default ``"<reference description> [<method>]"``.

    Returns the written paths in slice order.
    """
    if not isinstance(reference, Volume) or not reference.datasets:
        raise ReconError("write_dicom_series: the reference is not a DICOM series (it has no "
                         "DICOM headers); write NIfTI (write_nifti) or PNG instead")
    arr = volume_or_array.data if isinstance(volume_or_array, Volume) else volume_or_array
    arr = np.asarray(arr)
    if np.iscomplexobj(arr):
        raise ReconError("write_dicom_series: the image is complex; pass its magnitude "
                         "(np.abs) or real part")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or 0 in arr.shape:
        raise ReconError(f"write_dicom_series: expected a (slices, rows, cols) or (rows, cols) "
                         f"image, got shape {arr.shape}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ReconError("write_dicom_series: the image contains NaN or infinite values; "
                         "replace them (np.nan_to_num) before writing DICOM")
    n_ref = reference.n_slices
    if slice_indices is None:
        if arr.shape[0] == n_ref:
            indices = list(range(n_ref))
        elif n_ref == 1 and arr.shape[0] == 1:
            indices = [0]
        else:
            raise ReconError(
                f"write_dicom_series: {arr.shape[0]} slice(s) given for a reference of "
                f"{n_ref} slices; pass slice_indices= to say which reference slices they are")
    else:
        indices = [int(slice_indices)] if np.isscalar(slice_indices) else [int(i) for i in slice_indices]
    if len(indices) != arr.shape[0] or any(not 0 <= i < n_ref for i in indices):
        raise ReconError(f"write_dicom_series: slice_indices {indices} do not match "
                         f"{arr.shape[0]} slice(s) of a {n_ref}-slice reference")

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ReconError(f"{out}: exists and is not a folder; choose a new output folder")
    out_res = out.resolve()
    for f in _input_files(reference):
        if f == out_res or out_res in f.parents:
            raise ReconError(f"{out}: contains input file {f}; refusing to write a derived "
                             "series among the inputs - choose a different output folder")

    modality = str(reference.meta.get("modality") or "OT")
    slope_s, inter_s = _choose_rescale(arr, modality)
    slope, inter = float(slope_s), float(inter_s)
    stored = np.clip(np.round((arr - inter) / slope), -32768, 32767).astype("<i2")

    r_ref, c_ref = reference.data.shape[1:]
    rows, cols = arr.shape[1:]
    dy, dx = reference.meta.get("pixel_spacing") or reference.spacing[1:]
    dy_new, dx_new = dy * r_ref / rows, dx * c_ref / cols
    orient = reference.meta.get("orientation")
    positions = reference.meta.get("positions")
    normal = _normal(np.asarray(orient)) if orient is not None else None

    if modality == "CT":
        sop_class = _CT_IMAGE
    elif modality == "MR":
        sop_class = _MR_IMAGE
    else:
        sop_class = _SC_IMAGE
    series_uid = generate_uid()
    now = _dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    settings_text = json.dumps(dict(settings or {}), sort_keys=True, default=str)
    derivation = _truncate(f"{method}: {settings_text}", 1024)
    ref_desc = str(reference.meta.get("series_description") or "").strip()
    if series_description is None:
        tail = f" [{method}]"
        head = _truncate(ref_desc, max(0, 64 - len(tail))) if ref_desc else ""
        series_description = (head + tail).strip() if head else str(method)
    series_description = _truncate(series_description, 64)
    ref_number = reference.meta.get("series_number")
    series_number = (int(ref_number) % 1_000_000 + 1000) if ref_number is not None else 1000

    try:
        import recon
        version = str(getattr(recon, "__version__", "0"))
    except Exception:  # pragma: no cover
        version = "0"

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with _strict():
        for i, k in enumerate(indices):
            src = reference.datasets[k]
            ds = Dataset()
            ds.SpecificCharacterSet = "ISO_IR 192"
            _copy_elements(ds, src, _COPY_COMMON)
            if sop_class == _CT_IMAGE:
                _copy_elements(ds, src, _COPY_CT)
            elif sop_class == _MR_IMAGE:
                _copy_elements(ds, src, _COPY_MR)
                if "ScanningSequence" not in ds:
                    ds.ScanningSequence = "RM"
                if "SequenceVariant" not in ds:
                    ds.SequenceVariant = "NONE"
            else:
                ds.ConversionType = "WSD"
            for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                       "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                       "ReferringPhysicianName"):
                if kw not in ds:
                    setattr(ds, kw, "")
            if "StudyInstanceUID" not in ds:
                ds.StudyInstanceUID = generate_uid()
            ds.SOPClassUID = sop_class
            ds.SOPInstanceUID = generate_uid()
            ds.SeriesInstanceUID = series_uid
            ds.Modality = modality if len(modality) <= 16 else "OT"
            ds.SeriesNumber = series_number
            ds.InstanceNumber = i + 1
            ds.SeriesDescription = series_description
            ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = date
            ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = time
            src_type = [str(v) for v in (src.get("ImageType") or [])] \
                if not isinstance(src.get("ImageType"), str) else [str(src.get("ImageType"))]
            image_type = ["DERIVED", "SECONDARY"]
            if len(src_type) >= 3 and src_type[2] and len(src_type[2]) <= 16:
                image_type.append(src_type[2])
            elif sop_class == _CT_IMAGE:
                image_type.append("AXIAL")
            ds.ImageType = image_type
            ds.DerivationDescription = derivation
            if src.get("SOPInstanceUID") and src.get("SOPClassUID"):  # which source image this slice derives from
                item = Dataset()
                item.ReferencedSOPClassUID = src.SOPClassUID
                item.ReferencedSOPInstanceUID = src.SOPInstanceUID
                if int(src.get("NumberOfFrames", 1) or 1) > 1:
                    item.ReferencedFrameNumber = k + 1  # a multi-frame header repeats once per frame
                ds.SourceImageSequence = [item]
            ds.Manufacturer = "recon"
            ds.SoftwareVersions = f"recon {version}"[:64]
            # geometry
            if orient is not None:
                ds.ImageOrientationPatient = [_ds(v) for v in orient]
            if positions is not None and orient is not None:
                row_dir, col_dir = np.asarray(orient[:3]), np.asarray(orient[3:])
                corner = np.asarray(positions[k]) - 0.5 * dx * row_dir - 0.5 * dy * col_dir
                ipp = corner + 0.5 * dx_new * row_dir + 0.5 * dy_new * col_dir
                ds.ImagePositionPatient = [_ds(v) for v in ipp]
                if normal is not None:
                    ds.SliceLocation = _ds(float(np.asarray(positions[k]) @ normal))
            if reference.meta.get("spacing_known", True):
                ds.PixelSpacing = [_ds(dy_new), _ds(dx_new)]
            thick = reference.meta.get("slice_thickness")
            if thick:
                ds.SliceThickness = _ds(thick)
            if reference.meta.get("window_center") is not None:
                ds.WindowCenter = _ds(reference.meta["window_center"])
                ds.WindowWidth = _ds(reference.meta["window_width"])
            # pixels
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows, ds.Columns = int(rows), int(cols)
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 1
            ds.RescaleSlope = slope_s
            ds.RescaleIntercept = inter_s
            if modality != "CT":
                ds.RescaleType = "US"
            ds.PixelData = stored[i].tobytes()
            ds["PixelData"].VR = "OW"
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = sop_class
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta = meta
            try:
                _validate_all(ds)
            except Exception as exc:
                raise ReconError(f"write_dicom_series: derived header for slice {i} is not valid "
                                 f"DICOM ({short(exc)}); please report this with the reference "
                                 "series") from exc
            target = out / f"IM{i + 1:04d}.dcm"
            with atomic_output(target, ".dcm") as tmp:
                try:
                    _save(ds, tmp)
                except ReconError:
                    raise
                except Exception as exc:
                    if isinstance(exc, OSError):
                        raise
                    raise ReconError(f"{target}: pydicom refused to write the derived slice "
                                     f"({short(exc)}); please report this") from exc
            written.append(target)
    return written
