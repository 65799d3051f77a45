"""Fuzzing the readers: every mutated input must read correctly or raise ``ReconError``.

The mutation engine starts from small valid files of every format the
readers accept (pydicom's shipped test files, NIfTI-1/2 written with nibabel,
PNG / JPEG / TIFF, real and complex ``.npy``, BART ``.cfl/.hdr``, fastMRI
``.h5``) and damages them:

* bytes: truncation at a random length, random byte flips, insertions,
  deletions, overwritten or duplicated runs, an empty file;
* header fields: DICOM tags (Rows, Columns, BitsAllocated, NumberOfFrames,
  PixelData length, TransferSyntaxUID, rescale, geometry, ...), NIfTI header
  fields (dims, datatype, vox_offset, scaling, ...), PNG IHDR / JPEG SOF /
  TIFF IFD entries, the ``.npy`` header dict and its length and version, the
  ``.hdr`` dims text, the layout and dtypes of a fastMRI ``.h5`` (including
  huge declared but unwritten datasets and dangling links);
* names: content of another format under this reader's extension.

Each input is read in a separate worker process (``python -m recon.fuzz
--worker``) with a wall-clock limit per input and a cap on the worker's
address space, so a hang or a runaway allocation is reported as a failure
instead of stopping the run.  An outcome is ``ok`` (the reader returned an
object of the documented type, shape and dtype), ``recon`` (a clean
:class:`recon.errors.ReconError`) or a failure: ``other`` (any other
exception), ``bad`` (a malformed result), ``timeout`` or ``crash``.

:func:`fuzz_readers` is the runner behind ``recon bench fuzz --n N``;
:func:`make_input` builds one mutated input from a ``random.Random``-like
object (the tests drive it with hypothesis' ``st.randoms()``), and
:class:`Sandbox` reads inputs in the worker.  Input ``i`` of reader ``r`` in a
run with seed ``s`` is ``make_input(r, random.Random(f"{s}:{r}:{i}"))``, so a
reported failure can be rebuilt with :func:`rebuild_input` (``r, i, s``).
"""
from __future__ import annotations

import gzip
import io
import json
import math
import os
import random
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = ["READERS", "FuzzInput", "FuzzReport", "ReaderStats", "Sandbox", "check_read",
           "fuzz_readers", "make_input", "mutate_bytes"]

#: The readers fuzzed, one name per input format.
READERS = ("dicom", "nifti", "png", "jpeg", "tiff", "npy", "cfl", "h5")

#: Outcomes that are not failures.
CLEAN = ("ok", "recon")


@dataclass
class FuzzInput:
    """One mutated input: the files to write (relative path -> bytes; ``None``
    deletes a seed file), which path to read, and how."""

    reader: str
    files: dict[str, bytes | None]
    target: str
    api: str
    options: dict[str, Any] = field(default_factory=dict)
    mutation: str = ""

    def write(self, folder: str | os.PathLike) -> Path:
        """Write the files under ``folder``; return the path to read."""
        folder = Path(folder)
        for rel, data in self.files.items():
            if data is None:
                continue
            p = folder / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        return folder / self.target

    def request(self, path: Path) -> dict:
        return {"reader": self.reader, "api": self.api, "path": str(path), "options": self.options}


# ---------------------------------------------------------------------------
# byte-level mutations
# ---------------------------------------------------------------------------
_INTERESTING = (b"\x00", b"\xff", b"\x7f", b"\x80", b"\x00\x00\x00\x00", b"\xff\xff\xff\xff",
                b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80", b"\x01\x00", b"\xff\xfe")


def _pos(data: bytes, rnd, head: int = 1024) -> int:
    """A position in ``data``, half of the time within the first ``head`` bytes (headers)."""
    n = len(data)
    if n == 0:
        return 0
    if rnd.random() < 0.5:
        return rnd.randrange(min(n, head))
    return rnd.randrange(n)


def _randbytes(rnd, n: int) -> bytes:
    return bytes(rnd.randrange(256) for _ in range(n))


def mutate_bytes(data: bytes, rnd, head: int = 1024) -> tuple[bytes, str]:
    """One to three random byte-level mutations of ``data``; returns the new
    bytes and a short description."""
    done = []
    for _ in range(rnd.choice((1, 1, 1, 2, 3))):
        op = rnd.choice(("truncate", "truncate", "flip", "flip", "insert", "delete", "overwrite",
                         "interesting", "duplicate", "append"))
        n = len(data)
        if op == "truncate":
            cut = rnd.randrange(n + 1) if n else 0
            if rnd.random() < 0.5 and n:
                cut = rnd.randrange(min(n, head) + 1)
            data = data[:cut]
            done.append(f"truncate@{cut}")
        elif op == "flip" and n:
            k = rnd.choice((1, 1, 2, 4, 8, 32))
            buf = bytearray(data)
            for _ in range(k):
                i = _pos(data, rnd, head)
                buf[i] ^= rnd.randrange(1, 256)
            data = bytes(buf)
            done.append(f"flip{k}")
        elif op == "insert":
            i = _pos(data, rnd, head)
            chunk = _randbytes(rnd, rnd.choice((1, 2, 4, 16, 64)))
            data = data[:i] + chunk + data[i:]
            done.append(f"insert{len(chunk)}@{i}")
        elif op == "delete" and n:
            i = _pos(data, rnd, head)
            k = rnd.choice((1, 2, 4, 16, 64, 512))
            data = data[:i] + data[i + k:]
            done.append(f"delete{k}@{i}")
        elif op == "overwrite" and n:
            i = _pos(data, rnd, head)
            k = rnd.choice((1, 4, 16, 128))
            fill = rnd.choice((b"\x00", b"\xff", None))
            chunk = _randbytes(rnd, k) if fill is None else fill * k
            data = data[:i] + chunk + data[i + k:]
            done.append(f"overwrite{k}@{i}")
        elif op == "interesting" and n:
            i = _pos(data, rnd, head)
            chunk = rnd.choice(_INTERESTING)
            data = data[:i] + chunk + data[i + len(chunk):]
            done.append(f"interesting@{i}")
        elif op == "duplicate" and n:
            i = _pos(data, rnd, head)
            k = rnd.choice((4, 64, 1024))
            data = data[:i] + data[i:i + k] + data[i:]
            done.append(f"duplicate{k}@{i}")
        else:
            chunk = _randbytes(rnd, rnd.choice((1, 7, 100)))
            data = data + chunk
            done.append(f"append{len(chunk)}")
    return data, "bytes:" + ",".join(done)


# ---------------------------------------------------------------------------
# seeds: small valid files of every format
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Seed:
    name: str
    files: dict[str, bytes]
    target: str


_SEEDS: dict[str, list[_Seed]] = {}


def _tmp_bytes(suffix: str, write: Callable[[str], None]) -> bytes:
    fd, name = tempfile.mkstemp(suffix=suffix)
    os.close(fd)
    try:
        write(name)
        return Path(name).read_bytes()
    finally:
        os.unlink(name)


def _dicom_seeds() -> list[_Seed]:
    import numpy as np
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    out = []
    folder = Path(get_testdata_file("CT_small.dcm")).parent  # only files shipped with pydicom
    for name in ("CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
                 "MR_small_padded.dcm", "rtdose.dcm", "MR_small_RLE.dcm", "SC_rgb_small_odd.dcm",
                 "image_dfl.dcm", "JPEG-lossy.dcm"):
        path = folder / name
        if path.is_file() and path.stat().st_size < 200_000:
            out.append(_Seed(name, {"in.dcm": path.read_bytes()}, "in.dcm"))
    # a dataset without preamble and file meta (read by content)
    ds = pydicom.dcmread(folder / "CT_small.dcm")
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=False, little_endian=True)
    raw = buf.getvalue()
    start = raw.find(b"\x08\x00")  # after preamble + group 0002
    if start > 0:
        body = raw[128 + 4:]
        k = 0
        while body[k:k + 2] == b"\x02\x00":  # skip explicit-VR group 0002 elements
            vr = body[k + 4:k + 6]
            if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
                k += 12 + struct.unpack("<I", body[k + 8:k + 12])[0]
            else:
                k += 8 + struct.unpack("<H", body[k + 6:k + 8])[0]
        out.append(_Seed("CT_small-nometa", {"raw": body[k:]}, "raw"))
    # a two-slice series in a folder (CT_small and a shifted copy)
    ct = get_testdata_file("CT_small.dcm")
    files = {}
    for k in range(2):
        ds = pydicom.dcmread(ct)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
            entropy_srcs=["recon-fuzz", str(k)])
        ds.ImagePositionPatient = [float(v) for v in np.asarray(ds.ImagePositionPatient, float)
                                   + [0.0, 0.0, 5.0 * k]]
        ds.InstanceNumber = k + 1
        buf = io.BytesIO()
        ds.save_as(buf)
        files[f"series/IM{k}"] = buf.getvalue()
    out.append(_Seed("series", files, "series"))
    return out


def _nifti_seeds() -> list[_Seed]:
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    aff = np.diag([0.8, 0.9, 2.5, 1.0])
    aff[:3, 3] = (-10, 5, 30)
    out = []
    img = nib.Nifti1Image(rng.random((6, 5, 4)).astype(np.float32), aff)
    out.append(_Seed("float3d.nii", {"in.nii": img.to_bytes()}, "in.nii"))
    out.append(_Seed("float3d.nii.gz", {"in.nii.gz": gzip.compress(img.to_bytes(), 6, mtime=0)},
                     "in.nii.gz"))
    i16 = nib.Nifti1Image(rng.integers(-1000, 1000, (5, 4, 3)).astype(np.int16), aff)
    i16.header.set_slope_inter(2.0, -1024.0)
    out.append(_Seed("int16-scaled.nii", {"in.nii": i16.to_bytes()}, "in.nii"))
    out.append(_Seed("uint8-2d.nii", {"in.nii": nib.Nifti1Image(
        rng.integers(0, 255, (8, 7)).astype(np.uint8), np.eye(4)).to_bytes()}, "in.nii"))
    out.append(_Seed("complex.nii", {"in.nii": nib.Nifti1Image(
        (rng.random((4, 4, 2)) + 1j).astype(np.complex64), aff).to_bytes()}, "in.nii"))
    out.append(_Seed("nifti2.nii", {"in.nii": nib.Nifti2Image(
        rng.random((4, 3, 2)).astype(np.float32), aff).to_bytes()}, "in.nii"))
    return out


def _raster_seeds(fmt: str) -> list[_Seed]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    grey = rng.integers(0, 255, (10, 12), dtype=np.uint8)
    rgb = rng.integers(0, 255, (9, 11, 3), dtype=np.uint8)
    out = []

    def pil(name, img, ext, **kw):
        buf = io.BytesIO()
        img.save(buf, format={"png": "PNG", "jpg": "JPEG"}[ext], **kw)
        out.append(_Seed(name, {f"in.{ext}": buf.getvalue()}, f"in.{ext}"))

    if fmt == "png":
        pil("grey.png", Image.fromarray(grey), "png")
        pil("grey16.png", Image.fromarray(rng.integers(0, 65535, (8, 9)).astype(np.uint16)), "png")
        pil("rgb.png", Image.fromarray(rgb), "png")
        pil("rgba.png", Image.fromarray(np.dstack([rgb, rgb[..., :1]])), "png")
        pil("palette.png", Image.fromarray(rgb).convert("P"), "png")
        pil("bilevel.png", Image.fromarray(grey).convert("1"), "png")
        pil("interlaced.png", Image.fromarray(grey), "png", optimize=False)
    elif fmt == "jpeg":
        pil("grey.jpg", Image.fromarray(grey), "jpg", quality=90)
        pil("rgb.jpg", Image.fromarray(rgb), "jpg", quality=75)
        pil("progressive.jpg", Image.fromarray(rgb), "jpg", progressive=True)
        pil("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), "jpg")
    else:
        import tifffile

        def tif(name, arr, **kw):
            buf = io.BytesIO()
            try:
                tifffile.imwrite(buf, arr, **kw)
            except Exception:  # noqa: BLE001 - an optional codec (imagecodecs) missing
                return
            out.append(_Seed(name, {"in.tif": buf.getvalue()}, "in.tif"))

        tif("uint8.tif", grey)
        tif("uint16.tif", rng.integers(0, 65535, (8, 9)).astype(np.uint16))
        tif("float32.tif", rng.random((7, 6)).astype(np.float32))
        tif("rgb.tif", rgb, photometric="rgb")
        tif("planar.tif", np.moveaxis(rgb, -1, 0).copy(), photometric="rgb", planarconfig="separate")
        tif("pages.tif", rng.integers(0, 255, (2, 6, 5), dtype=np.uint8))
        tif("zlib.tif", grey, compression="zlib")
        tif("packbits.tif", grey, compression="packbits")
    return out


def _npy_bytes(arr, version=None) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=version, allow_pickle=False)
    return buf.getvalue()


def _npy_seeds() -> list[_Seed]:
    import numpy as np

    rng = np.random.default_rng(2)
    items = [
        ("float32.npy", rng.random((5, 6)).astype(np.float32), None),
        ("float64-1slice.npy", rng.random((1, 4, 4)), None),
        ("uint8.npy", rng.integers(0, 255, (3, 3)).astype(np.uint8), None),
        ("bool.npy", rng.random((4, 3)) > 0.5, None),
        ("int16-bigendian.npy", rng.integers(-5, 5, (4, 4)).astype(">i2"), None),
        ("fortran.npy", np.asfortranarray(rng.random((3, 5)).astype(np.float32)), None),
        ("complex64.npy", (rng.random((4, 4)) + 1j * rng.random((4, 4))).astype(np.complex64), None),
        ("complex-coils.npy", (rng.random((2, 4, 4)) + 1j).astype(np.complex64), None),
        ("complex128-4d.npy", (rng.random((1, 2, 4, 4)) - 1j).astype(np.complex128), None),
        ("v2.npy", rng.random((4, 5)).astype(np.float32), (2, 0)),
        ("v3.npy", rng.random((4, 5)).astype(np.float32), (3, 0)),
    ]
    return [_Seed(n, {"in.npy": _npy_bytes(a, v)}, "in.npy") for n, a, v in items]


def _cfl_files(arr) -> dict[str, bytes]:
    import numpy as np

    arr = np.asarray(arr, dtype=np.complex64)
    dims = list(arr.shape)
    return {"k.cfl": arr.ravel(order="F").astype("<c8").tobytes(),
            "k.hdr": ("# Dimensions\n" + " ".join(str(d) for d in dims) + " \n").encode()}


def _cfl_seeds() -> list[_Seed]:
    import numpy as np

    rng = np.random.default_rng(3)

    def c(*shape):
        return rng.random(shape) + 1j * rng.random(shape)

    return [_Seed("2d.cfl", _cfl_files(c(8, 6)), "k.cfl"),
            _Seed("coils.cfl", _cfl_files(c(8, 6, 1, 3)), "k.hdr"),
            _Seed("phs.cfl", _cfl_files(c(1, 8, 6)), "k"),
            _Seed("1d.cfl", _cfl_files(c(16)), "k.cfl"),
            _Seed("maps.cfl", _cfl_files(c(4, 4, 1, 1, 2)), "k.cfl")]


def _h5_write(path: str, layout: dict) -> None:
    import h5py
    import numpy as np

    with h5py.File(path, "w") as fh:
        for name, spec in layout.get("datasets", {}).items():
            kind = spec[0]
            if kind == "array":
                kw = spec[2] if len(spec) > 2 else {}
                fh.create_dataset(name, data=spec[1], **kw)
            elif kind == "empty":  # declared shape, nothing written (chunks read as fill value)
                fh.create_dataset(name, shape=spec[1], dtype=spec[2], chunks=spec[3])
            elif kind == "group":
                fh.create_group(name)
            elif kind == "soft":
                fh[name] = h5py.SoftLink(spec[1])
            elif kind == "external":
                fh[name] = h5py.ExternalLink(spec[1], spec[2])
            elif kind == "scalar":
                fh.create_dataset(name, data=spec[1])
            elif kind == "null":
                fh.create_dataset(name, data=h5py.Empty(spec[1]))
        for key, value in layout.get("attrs", {}).items():
            fh.attrs[key] = value
        if layout.get("ref") and isinstance(fh.get("kspace", getlink=True), h5py.HardLink):
            fh.create_dataset("refs", data=np.array([fh["kspace"].ref], dtype=h5py.ref_dtype))


def _h5_bytes(layout: dict) -> bytes:
    return _tmp_bytes(".h5", lambda p: _h5_write(p, layout))


def _h5_seed_layouts():
    import numpy as np

    rng = np.random.default_rng(4)

    def c(*shape):
        return (rng.random(shape) + 1j * rng.random(shape)).astype(np.complex64)

    header = b"<?xml version='1.0'?><ismrmrdHeader><encoding/></ismrmrdHeader>"
    return {
        "singlecoil.h5": {"datasets": {"kspace": ("array", c(2, 8, 6)),
                                       "reconstruction_esc": ("array", rng.random((2, 8, 6)).astype(np.float32)),
                                       "ismrmrd_header": ("scalar", header)},
                          "attrs": {"acquisition": "CORPD_FBK", "max": 0.5, "norm": 0.3}},
        "multicoil.h5": {"datasets": {"kspace": ("array", c(2, 3, 8, 6)),
                                      "reconstruction_rss": ("array", rng.random((2, 6, 6)).astype(np.float32)),
                                      "mask": ("array", rng.random(6) > 0.5)},
                         "attrs": {"patient_id": b"abc"}},
        "pairs.h5": {"datasets": {"kspace": ("array", rng.random((1, 8, 6, 2)).astype(np.float32))}},
        "chunked-gzip.h5": {"datasets": {"kspace": ("array", c(3, 8, 6),
                                                    {"chunks": (1, 8, 6), "compression": "gzip"})}},
    }


def _h5_seeds() -> list[_Seed]:
    return [_Seed(n, {"k.h5": _h5_bytes(layout)}, "k.h5") for n, layout in _h5_seed_layouts().items()]


_SEED_BUILDERS: dict[str, Callable[[], list[_Seed]]] = {
    "dicom": _dicom_seeds, "nifti": _nifti_seeds, "png": lambda: _raster_seeds("png"),
    "jpeg": lambda: _raster_seeds("jpeg"), "tiff": lambda: _raster_seeds("tiff"),
    "npy": _npy_seeds, "cfl": _cfl_seeds, "h5": _h5_seeds,
}


def seeds(reader: str) -> list[_Seed]:
    """The valid files mutations start from (built once per process)."""
    if reader not in _SEEDS:
        _SEEDS[reader] = _SEED_BUILDERS[reader]()
    return _SEEDS[reader]


# ---------------------------------------------------------------------------
# structured (header field) mutations, one per format
# ---------------------------------------------------------------------------
def _dicom_fields(data: bytes, rnd) -> tuple[bytes, str]:
    """Corrupt header fields of a DICOM file through pydicom (raw values, so
    invalid text such as NumberOfFrames 'abc' is written as is)."""
    import pydicom
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception:  # noqa: BLE001 - the seed itself may be odd (no meta): mutate bytes
        return mutate_bytes(data, rnd)
    little = getattr(ds, "is_little_endian", True)
    implicit = getattr(ds, "is_implicit_VR", False)
    if little is None:
        little = True
    if implicit is None:
        implicit = False
    end = "<" if little else ">"

    def raw(keyword, vr, value: bytes):
        tag = Tag(keyword)
        if len(value) % 2:
            value += b" " if vr not in ("OB", "OW", "US", "UL", "SS", "SL", "UN") else b"\0"
        ds._dict[tag] = RawDataElement(tag, vr, len(value), value, 0, implicit, little)

    us = lambda v: struct.pack(end + "H", v)  # noqa: E731
    edits = []
    ts_edit = None
    for _ in range(rnd.choice((1, 1, 2, 3))):
        what = rnd.choice(("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                           "PixelRepresentation", "SamplesPerPixel", "PlanarConfiguration",
                           "NumberOfFrames", "PhotometricInterpretation", "PixelData",
                           "PixelData", "TransferSyntaxUID", "RescaleSlope", "RescaleIntercept",
                           "WindowCenter", "ImagePositionPatient", "ImageOrientationPatient",
                           "PixelSpacing", "SOPClassUID", "Modality", "delete",
                           "ModalityLUTSequence", "SeriesInstanceUID", "GridFrameOffsetVector"))
        if what in ("Rows", "Columns"):
            v = rnd.choice((0, 1, 2, 3, 63, 64, 65, 127, 128, 129, 255, 256, 4096, 32768, 65535))
            raw(what, "US", us(v))
        elif what in ("BitsAllocated", "BitsStored", "HighBit"):
            v = rnd.choice((0, 1, 7, 8, 12, 15, 16, 17, 24, 32, 64, 255, 65535))
            raw(what, "US", us(v))
        elif what in ("PixelRepresentation", "PlanarConfiguration"):
            raw(what, "US", us(rnd.choice((0, 1, 2, 65535))))
        elif what == "SamplesPerPixel":
            raw(what, "US", us(rnd.choice((0, 1, 2, 3, 4, 65535))))
        elif what == "NumberOfFrames":
            v = rnd.choice(("0", "1", "2", "3", "-1", "10", "100000", "99999999999", "abc", "", "1.5",
                            "1e9"))
            raw(what, "IS", v.encode())
        elif what == "PhotometricInterpretation":
            v = rnd.choice(("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422",
                            "PALETTE COLOR", "FOO", ""))
            raw(what, "CS", v.encode())
        elif what == "PixelData":
            pd = ds.get("PixelData", None)
            cur = pd if isinstance(pd, bytes) else b""
            how = rnd.choice(("truncate", "odd", "empty", "double", "delete", "junk"))
            if how == "delete":
                if Tag("PixelData") in ds._dict:
                    del ds._dict[Tag("PixelData")]
            else:
                v = {"truncate": cur[:rnd.randrange(len(cur) + 1)] if cur else b"",
                     "odd": cur[:-1], "empty": b"", "double": cur + cur,
                     "junk": _randbytes(rnd, rnd.choice((2, 100, 1000)))}[how]
                tag = Tag("PixelData")
                ds._dict[tag] = RawDataElement(tag, "OW" if not implicit else None, len(v), v, 0,
                                               implicit, little)
            what = f"PixelData:{how}"
        elif what == "TransferSyntaxUID":
            ts_edit = rnd.choice(("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
                                  "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.50",
                                  "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.90",
                                  "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80", "1.2.3.4", "",
                                  "garbage!"))
            what = f"TransferSyntaxUID={ts_edit!r}"
        elif what in ("RescaleSlope", "RescaleIntercept", "WindowCenter"):
            v = rnd.choice(("nan", "inf", "-inf", "1e308", "1e999", "abc", "", "0", "-1", "1\\2"))
            raw(what, "DS", v.encode())
            what = f"{what}={v!r}"
        elif what in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                      "GridFrameOffsetVector"):
            v = rnd.choice(("a\\b\\c", "1\\2", "nan\\0\\0", "0\\0\\0\\0\\0\\0", "1\\0\\0\\1\\0\\0",
                            "0\\0", "-1\\abc", "1e999\\1\\1", "", "0\\0\\0"))
            raw(what, "DS", v.encode())
            what = f"{what}={v!r}"
        elif what == "SOPClassUID":
            v = rnd.choice(("1.2.840.10008.1.3.10", "1.2.840.10008.5.1.4.1.1.88.11", "1.2.3", "",
                            "1.2.840.10008.5.1.4.1.1.481.2"))
            raw(what, "UI", v.encode())
        elif what == "Modality":
            raw(what, "CS", rnd.choice((b"CT", b"MR", b"RTDOSE", b"", b"\xff\xfe")))
        elif what == "SeriesInstanceUID":
            raw(what, "UI", rnd.choice((b"", b"1.2.3", b"\x00\x01")))
        elif what == "ModalityLUTSequence":
            from pydicom.dataset import Dataset
            from pydicom.sequence import Sequence

            item = Dataset()
            item.LUTDescriptor = [rnd.choice((0, 1, 4, 4096)), rnd.choice((0, 1, 65535)),
                                  rnd.choice((0, 8, 16, 1))]
            item.ModalityLUTType = "HU"
            item.LUTData = [rnd.randrange(65536) for _ in range(rnd.choice((0, 1, 3)))]
            ds.ModalityLUTSequence = Sequence([item])
        else:  # delete a tag
            kw = rnd.choice(("Rows", "Columns", "BitsAllocated", "PixelRepresentation",
                             "SamplesPerPixel", "PhotometricInterpretation", "SeriesInstanceUID",
                             "SOPClassUID", "BitsStored"))
            if Tag(kw) in ds._dict:
                del ds._dict[Tag(kw)]
            what = f"delete {kw}"
        edits.append(what)
    buf = io.BytesIO()
    try:
        pydicom.dcmwrite(buf, ds, implicit_vr=implicit, little_endian=little, force_encoding=True)
    except Exception:  # noqa: BLE001 - pydicom refused the damaged dataset: damage the bytes
        return mutate_bytes(data, rnd)
    out = buf.getvalue()
    if ts_edit is not None:
        out = _patch_transfer_syntax(out, ts_edit)
    return out, "dicom:" + ",".join(edits)


def _patch_transfer_syntax(data: bytes, uid: str) -> bytes:
    """Replace the (0002,0010) value in an explicit-VR little-endian file meta."""
    key = b"\x02\x00\x10\x00UI"
    i = data.find(key)
    if i < 0:
        return data
    old_len = struct.unpack("<H", data[i + 6:i + 8])[0]
    new = uid.encode()
    if len(new) % 2:
        new += b"\0"
    data = data[:i + 6] + struct.pack("<H", len(new)) + new + data[i + 8 + old_len:]
    g = data.find(b"\x02\x00\x00\x00UL\x04\x00")
    if 0 <= g < i:
        glen = struct.unpack("<I", data[g + 8:g + 12])[0] + len(new) - old_len
        data = data[:g + 8] + struct.pack("<I", glen & 0xFFFFFFFF) + data[g + 12:]
    return data


_NII1_FIELDS = {
    "sizeof_hdr": (0, "<i", (0, 348, 540, -1, 2 ** 31 - 1)),
    "dim0": (40, "<h", (-1, 0, 1, 2, 3, 4, 5, 7, 8, 9, 32767)),
    "dim1": (42, "<h", (-32768, -1, 0, 1, 2, 255, 1000, 32767)),
    "dim2": (44, "<h", (-1, 0, 1, 3, 1000, 32767)),
    "dim3": (46, "<h", (-1, 0, 1, 2, 1000, 32767)),
    "dim4": (48, "<h", (-1, 0, 1, 2, 32767)),
    "dim5": (50, "<h", (0, 1, 2, 32767)),
    "datatype": (70, "<h", (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792,
                            2048, 2304, -1, 9999)),
    "bitpix": (72, "<h", (0, 1, 8, 16, 32, 64, 128, -8)),
    "pixdim1": (80, "<f", (0.0, -1.0, math.nan, math.inf, 1e-30, 1e30)),
    "pixdim3": (88, "<f", (0.0, -2.5, math.nan, math.inf)),
    "vox_offset": (108, "<f", (0.0, 348.0, 351.0, 352.0, 356.0, 1e9, -352.0, math.nan, math.inf)),
    "scl_slope": (112, "<f", (0.0, math.nan, math.inf, -1.0, 1e38)),
    "scl_inter": (116, "<f", (math.nan, math.inf, -1e38)),
    "qform_code": (252, "<h", (0, 1, 2, 5, -1, 999)),
    "sform_code": (254, "<h", (0, 1, 2, 5, -1, 999)),
    "quatern_b": (256, "<f", (math.nan, 2.0, -2.0)),
    "srow_x0": (280, "<f", (math.nan, math.inf, 0.0, 1e38)),
    "srow_z3": (324, "<f", (math.nan, math.inf, -1e38)),
    "magic": (344, "4s", (b"n+1\0", b"ni1\0", b"n+2\0", b"xxxx")),
}


def _nifti_fields(data: bytes, rnd, gz: bool) -> tuple[bytes, str]:
    raw = data
    if gz:
        try:
            raw = gzip.decompress(data)
        except Exception:  # noqa: BLE001
            return mutate_bytes(data, rnd)
    if len(raw) < 348 or struct.unpack("<i", raw[:4])[0] != 348:  # NIfTI-2 or odd: bytes only
        return mutate_bytes(data, rnd)
    buf = bytearray(raw)
    edits = []
    for _ in range(rnd.choice((1, 1, 2, 3))):
        name = rnd.choice(sorted(_NII1_FIELDS))
        off, fmt, values = _NII1_FIELDS[name]
        v = rnd.choice(values)
        struct.pack_into(fmt, buf, off, v)
        edits.append(f"{name}={v!r}")
    out = bytes(buf)
    if gz:
        out = gzip.compress(out, 6, mtime=0)
    return out, "nifti:" + ",".join(edits)


def _png_chunks(data: bytes) -> list[list] | None:
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    chunks, i = [], 8
    while i + 8 <= len(data):
        n = struct.unpack(">I", data[i:i + 4])[0]
        ctype = data[i + 4:i + 8]
        body = data[i + 8:i + 8 + n]
        chunks.append([ctype, body])
        i += 12 + n
    return chunks


def _png_join(chunks, rnd, fix_crc=True) -> bytes:
    out = [b"\x89PNG\r\n\x1a\n"]
    for ctype, body in chunks:
        crc = zlib.crc32(ctype + body) & 0xFFFFFFFF
        if not fix_crc:
            crc ^= 1
        out.append(struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", crc))
    return b"".join(out)


def _png_fields(data: bytes, rnd) -> tuple[bytes, str]:
    chunks = _png_chunks(data)
    if not chunks or chunks[0][0] != b"IHDR" or len(chunks[0][1]) != 13:
        return mutate_bytes(data, rnd)
    edits = []
    for _ in range(rnd.choice((1, 1, 2))):
        what = rnd.choice(("width", "height", "depth", "colour", "interlace", "drop", "dup",
                           "idat-junk", "length"))
        ihdr = bytearray(chunks[0][1])
        if what in ("width", "height"):
            v = rnd.choice((0, 1, 2, 9, 13, 65535, 100000, 2 ** 31 - 1, 2 ** 32 - 1))
            struct.pack_into(">I", ihdr, 0 if what == "width" else 4, v)
            what += f"={v}"
        elif what == "depth":
            v = rnd.choice((0, 1, 2, 3, 4, 8, 16, 255))
            ihdr[8] = v
            what += f"={v}"
        elif what == "colour":
            v = rnd.choice((0, 1, 2, 3, 4, 6, 7))
            ihdr[9] = v
            what += f"={v}"
        elif what == "interlace":
            ihdr[12] = rnd.choice((0, 1, 2))
        elif what == "drop" and len(chunks) > 1:
            k = rnd.randrange(len(chunks))
            what = f"drop {chunks[k][0]!r}"
            del chunks[k]
        elif what == "dup":
            k = rnd.randrange(len(chunks))
            chunks.insert(k, list(chunks[k]))
        elif what == "idat-junk":
            for ch in chunks:
                if ch[0] == b"IDAT":
                    ch[1] = rnd.choice((zlib.compress(_randbytes(rnd, 200)), _randbytes(rnd, 50),
                                        zlib.compress(b"\0" * 10_000_000)))
                    break
        if chunks and chunks[0][0] == b"IHDR":
            chunks[0][1] = bytes(ihdr)
        edits.append(what)
    out = _png_join(chunks, rnd, fix_crc=rnd.random() < 0.85)
    if "length" in edits:  # a chunk length field far beyond the file
        k = 8 + 13 + 12 if len(out) > 40 else 8
        out = out[:k] + struct.pack(">I", rnd.choice((2 ** 31 - 1, 2 ** 32 - 1, 100000))) + out[k + 4:]
    return out, "png:" + ",".join(edits)


def _jpeg_fields(data: bytes, rnd) -> tuple[bytes, str]:
    sofs = [i for i in range(len(data) - 10) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC1, 0xC2)]
    if not sofs:
        return mutate_bytes(data, rnd)
    i = sofs[0]
    buf = bytearray(data)
    edits = []
    for _ in range(rnd.choice((1, 1, 2))):
        what = rnd.choice(("precision", "height", "width", "components", "length", "no-eoi",
                           "cut-sos", "dqt"))
        if what == "precision":
            buf[i + 4] = rnd.choice((0, 1, 8, 12, 16, 255))
        elif what in ("height", "width"):
            v = rnd.choice((0, 1, 8, 65500, 65535))
            struct.pack_into(">H", buf, i + 5 if what == "height" else i + 7, v)
            what += f"={v}"
        elif what == "components":
            buf[i + 9] = rnd.choice((0, 1, 2, 3, 4, 255))
        elif what == "length":
            struct.pack_into(">H", buf, i + 2, rnd.choice((0, 2, 8, 65535)))
        elif what == "no-eoi" and buf.endswith(b"\xff\xd9"):
            buf = buf[:-2]
        elif what == "cut-sos":
            s = bytes(buf).find(b"\xff\xda")
            if s > 0:
                buf = buf[:s + rnd.randrange(2, 40)]
        else:
            q = bytes(buf).find(b"\xff\xdb")
            if q > 0:
                struct.pack_into(">H", buf, q + 2, rnd.choice((0, 3, 67, 65535)))
        edits.append(what)
    return bytes(buf), "jpeg:" + ",".join(edits)


_TIFF_TAGS = (256, 257, 258, 259, 262, 273, 277, 278, 279, 284, 339)
_TIFF_VALUES = (0, 1, 2, 3, 5, 7, 8, 16, 32, 64, 255, 65535, 2 ** 31 - 1, 2 ** 32 - 1)


def _tiff_fields(data: bytes, rnd) -> tuple[bytes, str]:
    if len(data) < 16 or data[:4] != b"II*\0":
        return mutate_bytes(data, rnd)
    buf = bytearray(data)
    ifd = struct.unpack_from("<I", buf, 4)[0]
    if ifd + 2 > len(buf):
        return mutate_bytes(data, rnd)
    n = struct.unpack_from("<H", buf, ifd)[0]
    entries = [ifd + 2 + 12 * k for k in range(n) if ifd + 2 + 12 * (k + 1) <= len(buf)]
    edits = []
    for _ in range(rnd.choice((1, 1, 2, 3))):
        what = rnd.choice(("value", "value", "value", "count", "ifd-offset", "entries"))
        if what == "value" and entries:
            targets = [e for e in entries if struct.unpack_from("<H", buf, e)[0] in _TIFF_TAGS] or entries
            e = rnd.choice(targets)
            tag, typ = struct.unpack_from("<HH", buf, e)
            v = rnd.choice(_TIFF_VALUES)
            if typ == 3:
                struct.pack_into("<H", buf, e + 8, v & 0xFFFF)
            else:
                struct.pack_into("<I", buf, e + 8, v & 0xFFFFFFFF)
            edits.append(f"tag{tag}={v}")
        elif what == "count" and entries:
            e = rnd.choice(entries)
            v = rnd.choice((0, 2, 1000, 2 ** 31 - 1, 2 ** 32 - 1))
            struct.pack_into("<I", buf, e + 4, v)
            edits.append(f"count{struct.unpack_from('<H', buf, e)[0]}={v}")
        elif what == "ifd-offset":
            v = rnd.choice((0, 4, 8, len(buf), 2 ** 32 - 1, ifd))
            struct.pack_into("<I", buf, 4, v)
            edits.append(f"ifd@{v}")
        else:
            v = rnd.choice((0, 1, 1000, 65535))
            struct.pack_into("<H", buf, ifd, v)
            edits.append(f"entries={v}")
    return bytes(buf), "tiff:" + ",".join(edits)


_NPY_DESCR = ("<f4", "<f8", "<c8", "<c16", "|u1", "<i2", ">f4", "|b1", "|O", "<U4", "|V8", "<M8[s]",
              "<m8[s]", "f4", "<f16", "<f2", "zz", "", "[('a', '<f4')]", "[('r', '<f4'), ('i', '<f4')]",
              "<i8", ">c8", "S3")
_NPY_SHAPES = ("()", "(0,)", "(0, 0)", "(0, 4)", "(-1, 4)", "(4, 4)", "(1, 4, 4)", "(2, 4, 4)",
               "(1, 2, 4, 4)", "(1000000, 1000000)", "(1000000000000,)", "(2, 1099511627776)",
               "(4, 4, 4, 4, 4)", f"({2 ** 63}, 2)", "('a',)", "(4.5, 2)", "(3, 5)", "(5, 6)", "(6, 5)",
               "(30,)", "(65536, 65536)", "(" + "1, " * 40 + ")", "(2, 3, 1)", "(10**6, 10**6)")


def _npy_parts(data: bytes):
    if len(data) < 10 or not data.startswith(b"\x93NUMPY"):
        return None
    major = data[6]
    if major == 1:
        hlen, start = struct.unpack("<H", data[8:10])[0], 10
    elif len(data) >= 12:
        hlen, start = struct.unpack("<I", data[8:12])[0], 12
    else:
        return None
    return major, data[start:start + hlen], data[start + hlen:]


def _npy_fields(data: bytes, rnd) -> tuple[bytes, str]:
    parts = _npy_parts(data)
    if parts is None:
        return mutate_bytes(data, rnd)
    major, header, body = parts
    what = rnd.choice(("dict", "dict", "dict", "text", "hlen", "version", "magic"))
    if what == "dict":
        descr = rnd.choice(_NPY_DESCR)
        shape = rnd.choice(_NPY_SHAPES)
        fortran = rnd.choice(("False", "True", "'x'"))
        descr_text = descr if descr.startswith("[") else repr(descr)
        text = f"{{'descr': {descr_text}, 'fortran_order': {fortran}, 'shape': {shape}, }}"
        desc = f"npy:descr={descr},shape={shape},fortran={fortran}"
    elif what == "text":
        text = rnd.choice(("", "{}", "garbage", "{'descr': '<f4'}", "[1, 2, 3]",
                           "{'descr': '<f4', 'fortran_order': False, 'shape': (5, 6), 'x': 1}",
                           "{'descr': '<f4', 'fortran_order': False, 'shape': (5, 6)",
                           "__import__('os').system('true')", "{'a': " * 200 + "1" + "}" * 200,
                           " " * 20000))
        desc = f"npy:header={text[:40]!r}"
    else:
        text = None
    if text is not None:
        enc = text.encode("latin-1" if major < 3 else "utf-8")
        pad = (-(len(enc) + 1 + (10 if major == 1 else 12))) % 64 if rnd.random() < 0.8 else 0
        enc = enc + b" " * pad + b"\n"
        if major == 1 and len(enc) > 65535:
            major = 2
        head = b"\x93NUMPY" + bytes([major, 0])
        head += struct.pack("<H", len(enc)) if major == 1 else struct.pack("<I", len(enc))
        return head + enc + body, desc
    buf = bytearray(data)
    if what == "hlen":
        v = rnd.choice((0, 1, 9, 65535, 2 ** 31, 2 ** 32 - 1))
        if major == 1:
            struct.pack_into("<H", buf, 8, v & 0xFFFF)
        else:
            struct.pack_into("<I", buf, 8, v & 0xFFFFFFFF)
        return bytes(buf), f"npy:header-length={v}"
    if what == "version":
        buf[6], buf[7] = rnd.choice(((0, 0), (1, 1), (2, 0), (3, 0), (4, 0), (255, 255)))
        return bytes(buf), f"npy:version={buf[6]}.{buf[7]}"
    buf[rnd.randrange(6)] ^= 0x20
    return bytes(buf), "npy:magic"


_HDR_TOKENS = ("0", "1", "2", "3", "6", "8", "16", "-1", "1000000000000", str(2 ** 63), "1" + "0" * 30,
               "x", "1.5", "0x10", "\u0663", "+4", "nan", "")


def _cfl_fields(files: dict, rnd) -> str:
    hdr = files.get("k.hdr") or b""
    what = rnd.choice(("dims", "dims", "dims", "many-dims", "consistent", "label", "binary",
                       "missing", "cfl-size"))
    if what == "dims":
        dims = [rnd.choice(_HDR_TOKENS) for _ in range(rnd.choice((0, 1, 2, 3, 4, 5, 8, 16)))]
        files["k.hdr"] = ("# Dimensions\n" + " ".join(dims) + " \n").encode()
        return f"hdr:dims={' '.join(dims)!r}"
    if what == "many-dims":  # product consistent with the data, but hundreds of dims
        cfl = files.get("k.cfl") or b""
        n = len(cfl) // 8
        dims = ["1"] * rnd.choice((16, 40, 70, 1000)) + [str(max(n, 1))]
        if rnd.random() < 0.5:
            dims = [str(max(n, 1))] + dims
        files["k.hdr"] = ("# Dimensions\n" + " ".join(dims) + "\n").encode()
        return f"hdr:{len(dims)}-dims"
    if what == "consistent":  # same element count, other arrangement
        cfl = files.get("k.cfl") or b""
        n = max(len(cfl) // 8, 1)
        divs = [d for d in range(1, n + 1) if n % d == 0]
        a = rnd.choice(divs)
        b = rnd.choice([d for d in range(1, n // a + 1) if (n // a) % d == 0])
        dims = [a, b, n // a // b] + [1] * rnd.choice((0, 1, 2))
        rnd.shuffle(dims)
        files["k.hdr"] = ("# Dimensions\n" + " ".join(map(str, dims)) + "\n").encode()
        return f"hdr:dims={dims}"
    if what == "label":
        text = hdr.decode("latin-1").replace(rnd.choice(("# Dimensions", "\n")),
                                             rnd.choice(("#Dimensions", "# dimensions", "", " ")), 1)
        files["k.hdr"] = ("# Command\nbart fake\n" if rnd.random() < 0.5 else "").encode() + \
            text.encode("latin-1")
        return "hdr:label"
    if what == "binary":
        files["k.hdr"] = hdr[:14] + _randbytes(rnd, rnd.choice((1, 8, 64))) + hdr[14:]
        return "hdr:binary"
    if what == "missing":
        victim = rnd.choice(("k.hdr", "k.cfl"))
        files[victim] = None
        return f"missing {victim}"
    cfl = files.get("k.cfl") or b""
    files["k.cfl"] = rnd.choice((cfl[:-8], cfl[:-1], cfl + b"\0" * 8, cfl + b"\0", b""))
    return "cfl:size"


def _h5_layout(rnd) -> tuple[dict, str]:
    """A fastMRI-like file with odd dtypes, shapes, links and attributes."""
    import numpy as np

    rng = np.random.default_rng(rnd.randrange(2 ** 32))
    layout: dict = {"datasets": {}, "attrs": {}}
    what = rnd.choice(("dtype", "dtype", "shape", "shape", "huge", "huge", "link", "reference",
                       "mask", "attrs", "header", "missing", "null"))
    shape = rnd.choice(((2, 8, 6), (1, 3, 8, 6), (8, 6)))
    kspace = ("array", (rng.random(shape) + 1j * rng.random(shape)).astype(np.complex64))
    desc = what
    if what == "dtype":
        kind = rnd.choice(("float32", "float32-pairs", "int16", "bool", "bytes", "str", "compound-ri",
                           "compound-other", "complex128", "float16", "uint64", "compound-ri-int"))
        data = {
            "float32": lambda: rng.random(shape).astype(np.float32),
            "float32-pairs": lambda: rng.random(shape + (2,)).astype(np.float32),
            "int16": lambda: rng.integers(-5, 5, shape).astype(np.int16),
            "bool": lambda: rng.random(shape) > 0.5,
            "bytes": lambda: np.full(shape, b"abc", dtype="S3"),
            "str": lambda: np.array(["x" * 3] * int(np.prod(shape)), dtype=object).reshape(shape),
            "compound-ri": lambda: np.zeros(shape, dtype=[("r", "<f4"), ("i", "<f4")]),
            "compound-other": lambda: np.zeros(shape, dtype=[("a", "<f4"), ("b", "<i2")]),
            "complex128": lambda: np.ones(shape, dtype=np.complex128),
            "float16": lambda: rng.random(shape + (2,)).astype(np.float16),
            "uint64": lambda: np.full(shape, 2 ** 63, dtype=np.uint64),
            "compound-ri-int": lambda: np.zeros(shape, dtype=[("r", "<i8"), ("i", "S2")]),
        }[kind]()
        if kind == "str":
            import h5py
            layout["datasets"]["kspace"] = ("array", data, {"dtype": h5py.string_dtype()})
        else:
            layout["datasets"]["kspace"] = ("array", data)
        desc = f"kspace dtype {kind}"
    elif what == "shape":
        s = tuple(rnd.choice((0, 1, 2, 3, 8)) for _ in range(rnd.choice((0, 1, 2, 3, 4, 5, 6))))
        layout["datasets"]["kspace"] = ("array", np.ones(s, dtype=np.complex64)) if s else \
            ("scalar", np.complex64(1 + 2j))
        desc = f"kspace shape {s}"
    elif what == "huge":  # declared, never written: a tiny file describing terabytes
        s = rnd.choice(((100000, 64, 4096, 4096), (10 ** 9, 8, 8), (2, 100000, 100000),
                        (1, 1, 2 ** 31, 2), (2 ** 40,)))
        layout["datasets"]["kspace"] = ("empty", s, np.complex64, tuple(min(d, 64) for d in s))
        if rnd.random() < 0.5:
            layout["datasets"]["kspace"] = kspace
            layout["datasets"][rnd.choice(("reconstruction_rss", "mask"))] = \
                ("empty", s, np.float32, tuple(min(d, 64) for d in s))
        desc = f"huge {s}"
    elif what == "link":
        layout["datasets"]["kspace"] = rnd.choice((("soft", "/nowhere"), ("external", "missing.h5", "/kspace"),
                                                   ("group",)))
        desc = f"kspace {layout['datasets']['kspace'][0]}"
    elif what == "reference":
        layout["datasets"]["kspace"] = kspace
        ref = rnd.choice((np.ones((5, 5, 5, 5), np.float32), np.array([b"x"]), np.ones((0,), np.float32),
                          np.ones(shape, np.complex64), np.float32(3.0), np.ones((1,), np.float32)))
        layout["datasets"][rnd.choice(("reconstruction_rss", "reconstruction_esc"))] = ("array", ref) \
            if np.ndim(ref) else ("scalar", ref)
        desc = f"reference {getattr(ref, 'shape', ())} {getattr(ref, 'dtype', '')}"
    elif what == "mask":
        layout["datasets"]["kspace"] = kspace
        layout["datasets"]["mask"] = rnd.choice((("scalar", b"abc"), ("array", np.ones((3, 3, 3))),
                                                 ("group",), ("null", "f4")))
    elif what == "attrs":
        layout["datasets"]["kspace"] = kspace
        layout["attrs"] = rnd.choice(({"x": b"\xff\xfe\x00"}, {"x": np.zeros((3, 0))},
                                      {"x": np.array([b"a", b"\xff"])},
                                      {"x": np.float64("nan")}))
    elif what == "header":
        layout["datasets"]["kspace"] = kspace
        layout["datasets"]["ismrmrd_header"] = rnd.choice((("array", np.arange(5)), ("scalar", b"\xff" * 5),
                                                           ("group",), ("null", "f4")))
    elif what == "null":
        layout["datasets"]["kspace"] = ("null", rnd.choice(("f4", "c8")))
    else:
        layout["datasets"]["other"] = kspace
    if rnd.random() < 0.2:
        layout["ref"] = True
    return layout, "h5:" + desc


def _h5_mutated(data: bytes, rnd) -> tuple[bytes, str]:
    layout, desc = _h5_layout(rnd)
    try:
        return _h5_bytes(layout), desc
    except Exception:  # noqa: BLE001 - h5py refused to write this layout: damage the bytes
        return mutate_bytes(data, rnd)


# ---------------------------------------------------------------------------
# building one input
# ---------------------------------------------------------------------------
_EXT = {"dicom": ".dcm", "nifti": ".nii", "png": ".png", "jpeg": ".jpg", "tiff": ".tif", "npy": ".npy",
        "cfl": ".cfl", "h5": ".h5"}


def _api(reader: str, rnd) -> tuple[str, dict]:
    if reader == "npy":
        api = rnd.choice(("read_input", "read_input", "discover", "read_kspace", "read_kspace",
                          "complex_image"))
    elif reader == "cfl":
        api = rnd.choice(("read_kspace", "read_kspace", "read_kspace", "complex_image"))
    elif reader == "h5":
        opts = {}
        if rnd.random() < 0.2:
            opts["dataset"] = rnd.choice(("kspace", "reconstruction_rss", "mask", "missing", "refs"))
        if rnd.random() < 0.2:
            opts["slice_index"] = rnd.choice((0, 1, 2, -1, 10 ** 6))
        return "read_kspace", opts
    else:
        api = rnd.choice(("read_input", "read_input", "read_input", "discover"))
    return api, {}


def make_input(reader: str, rnd) -> FuzzInput:
    """One mutated input for ``reader`` drawn with ``rnd`` (``random.Random`` or
    hypothesis' ``st.randoms()``)."""
    if reader not in READERS:
        raise ValueError(f"unknown reader {reader!r}; choose from {', '.join(READERS)}")
    seed = rnd.choice(seeds(reader))
    files: dict[str, bytes | None] = dict(seed.files)
    target = seed.target
    api, options = _api(reader, rnd)
    victim = rnd.choice(sorted(files))
    r = rnd.random()
    if r < 0.04:
        files[victim] = b""
        desc = f"empty {victim}"
    elif r < 0.12:  # another format's content under this name
        other = rnd.choice([x for x in READERS if x != reader])
        donor = rnd.choice(seeds(other))
        content = donor.files[sorted(donor.files)[0]]
        files[victim] = content
        desc = f"{other} content as {victim}"
    elif r < 0.55:  # header fields (h5: the file's layout and dtypes)
        data = files[victim] or b""
        if reader == "dicom":
            files[victim], desc = _dicom_fields(data, rnd)
        elif reader == "nifti":
            files[victim], desc = _nifti_fields(data, rnd, victim.endswith(".gz"))
        elif reader == "png":
            files[victim], desc = _png_fields(data, rnd)
        elif reader == "jpeg":
            files[victim], desc = _jpeg_fields(data, rnd)
        elif reader == "tiff":
            files[victim], desc = _tiff_fields(data, rnd)
        elif reader == "npy":
            files[victim], desc = _npy_fields(data, rnd)
        elif reader == "cfl":
            desc = _cfl_fields(files, rnd)
        else:
            files[victim], desc = _h5_mutated(data, rnd)
        if rnd.random() < 0.2 and files.get(victim):
            files[victim], more = mutate_bytes(files[victim], rnd)
            desc += " + " + more
    else:
        files[victim], desc = mutate_bytes(files[victim] or b"", rnd)
    if rnd.random() < 0.03 and reader != "cfl":  # the right content, a wrong extension
        new = {"dicom": "in.png", "nifti": "in.npy", "png": "in.jpg", "jpeg": "in.tif",
               "tiff": "in.png", "npy": "in.nii", "h5": "k.npy"}[reader]
        if target in files:
            files[new] = files.pop(target)
            target = new
            desc += f", renamed {new}"
    return FuzzInput(reader=reader, files=files, target=target, api=api, options=options,
                     mutation=f"{seed.name}: {desc} [{api}{' ' + json.dumps(options) if options else ''}]")


# ---------------------------------------------------------------------------
# reading one input (in the worker)
# ---------------------------------------------------------------------------
def _check_array(arr, ndim: int, dtypes: tuple, what: str) -> str | None:
    import numpy as np

    if not isinstance(arr, np.ndarray):
        return f"{what} is {type(arr).__name__}, not an ndarray"
    if arr.ndim != ndim:
        return f"{what} has shape {arr.shape}, expected {ndim} dims"
    if arr.size == 0:
        return f"{what} is empty {arr.shape}"
    if arr.dtype not in [np.dtype(d) for d in dtypes]:
        return f"{what} has dtype {arr.dtype}, expected {'/'.join(map(str, dtypes))}"
    return None


def _call(api: str, path: str, options: dict) -> str | None:
    """Run one reader; return a problem with its result, or None when it is well formed."""
    import numpy as np

    from recon.io import discover_cases, read_complex_image, read_input, read_kspace
    from recon.io.volume import Volume

    if api == "read_input":
        vol = read_input(path)
        if not isinstance(vol, Volume):
            return f"read_input returned {type(vol).__name__}"
        problem = _check_array(vol.data, 3, ("float32", "complex64"), "Volume.data")
        if problem:
            return problem
        if len(vol.spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in vol.spacing):
            return f"Volume.spacing {vol.spacing} is not 3 finite positive values"
        if vol.affine is not None and (np.shape(vol.affine) != (4, 4)
                                       or not np.all(np.isfinite(vol.affine))):
            return f"Volume.affine is not a finite 4x4 matrix: {vol.affine!r}"
        return None
    if api == "discover":
        cases = discover_cases(Path(path).parent)
        for case in cases:
            problem = _check_array(case.image, 2, ("float32",), f"case {case.name} image")
            if problem:
                return problem
            ref = case.reference
            if ref is not None and case.slice_index is not None and \
                    not 0 <= case.slice_index < ref.data.shape[0]:
                return f"case {case.name}: slice {case.slice_index} outside its reference"
        return None
    if api == "read_kspace":
        k = read_kspace(path, options.get("dataset"), slice_index=options.get("slice_index"))
        problem = _check_array(k.data, 4, ("complex64",), "KSpace.data")
        if problem:
            return problem
        if k.reference is not None:
            return _check_array(k.reference, 3, ("float32",), "KSpace.reference")
        return None
    if api == "complex_image":
        return _check_array(read_complex_image(path), 2, ("complex64",), "complex image")
    raise ValueError(f"unknown api {api!r}")


def _summary(exc: BaseException) -> str:
    """``Type: message`` and the innermost frames, on a few short lines."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-3:]]
    msg = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {msg} (at {' <- '.join(reversed(where))})"


def check_read(request: dict) -> dict:
    """Read one input in this process; the outcome as a dict (``status``:
    ok / recon / other / bad, ``detail``, ``type``; the input's folder is left
    out of ``detail``)."""
    res = _check_read(request)
    if "detail" in res:
        folder = str(Path(request["path"]).parent)
        res["detail"] = res["detail"].replace(folder + os.sep, "").replace(folder, ".")
    return res


def _check_read(request: dict) -> dict:
    from recon.errors import ReconError

    try:
        problem = _call(request["api"], request["path"], request.get("options") or {})
    except ReconError as exc:
        cause = exc.__cause__ or exc.__context__
        while cause is not None:  # a wrapped MemoryError: the reader tried to allocate first
            if isinstance(cause, MemoryError):
                return {"status": "other", "type": "MemoryError (wrapped in ReconError)",
                        "detail": _summary(exc)}
            cause = cause.__cause__ or cause.__context__
        msg = " ".join(str(exc).split())
        target = Path(request["path"])
        names = {target.name, target.stem, target.parent.name}
        return {"status": "recon", "detail": msg[:300], "named": any(n and n in msg for n in names)}
    except (Exception, RecursionError, MemoryError) as exc:  # noqa: BLE001 - that is what we look for
        return {"status": "other", "type": type(exc).__name__, "detail": _summary(exc)}
    if problem:
        return {"status": "bad", "type": "bad result", "detail": problem}
    return {"status": "ok"}


def check_cli(request: dict) -> dict:
    """Call a command-line entry point in this process: ``request['entry']``
    (``'module:function'``, e.g. ``'recon.cli:main'``) with ``request['argv']``.
    ``status`` 'cli' with the exit status ``rc`` and the tail of stderr; an
    exception escaping the entry point gives ``status`` 'other'."""
    import contextlib
    import importlib

    module, _, name = str(request["entry"]).partition(":")
    main = getattr(importlib.import_module(module), name)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = main(list(request["argv"]))
            except SystemExit as exc:  # argparse's own exits (--help, usage errors)
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except (Exception, RecursionError, MemoryError) as exc:  # noqa: BLE001 - what we look for
        return {"status": "other", "type": type(exc).__name__, "detail": _summary(exc),
                "stderr": err.getvalue()[-600:]}
    return {"status": "cli", "rc": int(rc or 0), "stderr": err.getvalue()[-600:]}


def _worker(memory_mb: int) -> int:
    """``python -m recon.fuzz --worker``: JSON requests on stdin, one JSON line each on stdout."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # anything a library prints must not garble the protocol
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    import warnings

    warnings.simplefilter("ignore")
    import h5py  # noqa: F401 - import everything before capping memory
    import nibabel  # noqa: F401
    import pydicom  # noqa: F401
    import tifffile  # noqa: F401
    from PIL import Image  # noqa: F401

    import recon.io  # noqa: F401
    if memory_mb:
        try:
            import resource

            with open("/proc/self/status") as fh:
                vm = next(int(line.split()[1]) for line in fh if line.startswith("VmSize"))
            cap = (vm // 1024 + memory_mb) * 2 ** 20
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        except Exception:  # noqa: BLE001 - no /proc or resource: run without a cap
            pass
    out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if request.get("kind") == "cli":
            if "torch" not in sys.modules:
                import torch

                torch.set_num_threads(1)
            out.write(json.dumps(check_cli(request)) + "\n")
        else:
            out.write(json.dumps(check_read(request)) + "\n")
    return 0


class Sandbox:
    """Reads inputs in a worker process with a time limit per input and a
    memory cap; a hung or crashed worker is replaced.  Use as a context manager."""

    def __init__(self, timeout: float = 10.0, memory_mb: int = 3072, start_timeout: float = 120.0,
                 max_bytes: int = 256 * 2 ** 20):
        self.timeout, self.memory_mb, self.start_timeout = timeout, memory_mb, start_timeout
        self.max_bytes = max_bytes
        self.proc: subprocess.Popen | None = None

    def _start(self):
        # a low decode limit: the readers' own size checks must refuse large claims long before
        # the worker's address-space cap turns an allocation into a MemoryError
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                   RECON_MAX_BYTES=str(self.max_bytes))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "recon.fuzz", "--worker", "--memory-mb", str(self.memory_mb)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            bufsize=1, env=env)
        line = self._readline(self.start_timeout)
        if not line or not json.loads(line).get("ready"):
            self.close()
            raise RuntimeError("the fuzz worker did not start (python -m recon.fuzz --worker)")

    def _readline(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        return self.proc.stdout.readline()

    def read(self, request: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        t0 = time.perf_counter()
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self.close()
            return {"status": "crash", "type": "crash", "detail": "worker pipe closed"}
        line = self._readline(self.timeout)
        if line is None:
            self.close()
            return {"status": "timeout", "type": "timeout",
                    "detail": f"no result within {self.timeout:g} s"}
        if not line:
            rc = self.proc.wait()
            self.proc = None
            return {"status": "crash", "type": "crash", "detail": f"worker died (exit status {rc})"}
        res = json.loads(line)
        res["seconds"] = time.perf_counter() - t0
        return res

    run = read  # any request: a reader input, or {"kind": "cli", "entry": "mod:func", "argv": [...]}

    def close(self):
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
            self.proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


# ---------------------------------------------------------------------------
# the runner
# ---------------------------------------------------------------------------
@dataclass
class ReaderStats:
    reader: str
    tried: int = 0
    ok: int = 0
    recon: int = 0
    other: int = 0
    seconds: float = 0.0
    failures: list = field(default_factory=list)  # (index, mutation, outcome)
    kinds: dict = field(default_factory=dict)     # failure summary -> count

    def add(self, index: int, inp: FuzzInput, res: dict, keep: int):
        self.tried += 1
        status = res["status"]
        if status == "ok":
            self.ok += 1
        elif status == "recon":
            self.recon += 1
        else:
            self.other += 1
            key = f"{res.get('type', status)}: {res.get('detail', '')}"[:160]
            self.kinds[key] = self.kinds.get(key, 0) + 1
            if len(self.failures) < keep:
                self.failures.append((index, inp.mutation, res))


@dataclass
class FuzzReport:
    seed: int
    stats: dict[str, ReaderStats]
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return all(s.other == 0 for s in self.stats.values())

    def table(self) -> str:
        lines = ["| reader | tried | read OK | ReconError | other | s |", "|---|---:|---:|---:|---:|---:|"]
        for s in self.stats.values():
            lines.append(f"| {s.reader} | {s.tried} | {s.ok} | {s.recon} | {s.other} | {s.seconds:.0f} |")
        return "\n".join(lines)

    def details(self, limit: int = 5) -> str:
        out = []
        for s in self.stats.values():
            if not s.other:
                continue
            out.append(f"{s.reader}: {s.other} failure(s), {len(s.kinds)} kind(s):")
            for key, n in sorted(s.kinds.items(), key=lambda kv: -kv[1])[:limit]:
                out.append(f"  {n} x {key}")
            for index, mutation, res in s.failures[:limit]:
                out.append(f"  #{index} {mutation}\n      -> {res.get('detail')}")
        return "\n".join(out)


def fuzz_readers(n_per_reader: int = 1000, seed: int = 0, readers=None, timeout: float = 10.0,
                 memory_mb: int = 3072, out: Callable[[str], None] | None = print,
                 save_failures: str | os.PathLike | None = None, keep: int = 20) -> FuzzReport:
    """Read ``n_per_reader`` mutated inputs per reader; print and return the counts.

    Every input runs in the :class:`Sandbox` worker (``timeout`` seconds each,
    address space capped ``memory_mb`` MiB above the worker's start).  With
    ``save_failures`` the files of each failing input are kept there, one
    folder per input.
    """
    readers = list(readers or READERS)
    for r in readers:
        if r not in READERS:
            raise ValueError(f"unknown reader {r!r}; choose from {', '.join(READERS)}")
    report = FuzzReport(seed=seed, stats={r: ReaderStats(r) for r in readers})
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="recon-fuzz-"))
    try:
        with Sandbox(timeout=timeout, memory_mb=memory_mb) as box:
            for reader in readers:
                stats = report.stats[reader]
                t0 = time.perf_counter()
                for i in range(n_per_reader):
                    inp = make_input(reader, random.Random(f"{seed}:{reader}:{i}"))
                    folder = work / f"{reader}-{i}"
                    path = inp.write(folder)
                    res = box.read(inp.request(path))
                    stats.add(i, inp, res, keep)
                    if res["status"] not in CLEAN and save_failures:
                        dest = Path(save_failures) / f"{reader}-{i}"
                        shutil.rmtree(dest, ignore_errors=True)
                        shutil.copytree(folder, dest)
                        (dest / "outcome.json").write_text(json.dumps(
                            {"mutation": inp.mutation, "request": inp.request(path), **res}, indent=2))
                    shutil.rmtree(folder, ignore_errors=True)
                stats.seconds = time.perf_counter() - t0
                if out:
                    out(f"{reader}: {stats.tried} tried, {stats.ok} read OK, {stats.recon} ReconError, "
                        f"{stats.other} other ({stats.seconds:.0f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.seconds = time.perf_counter() - t_start
    if out:
        out("")
        out(f"reader fuzzing: {n_per_reader} inputs per reader, seed {seed}, {report.seconds:.0f} s")
        out(report.table())
        if not report.clean:
            out("")
            out(report.details())
    return report


def rebuild_input(reader: str, index: int, seed: int = 0, folder: str | os.PathLike | None = None) -> Path:
    """Write input ``index`` of ``reader`` from a run with ``seed`` into ``folder``
    (a new temporary folder by default) and print its mutation; returns the path to read."""
    inp = make_input(reader, random.Random(f"{seed}:{reader}:{index}"))
    path = inp.write(folder or tempfile.mkdtemp(prefix="recon-fuzz-input-"))
    print(f"{inp.mutation}\n{inp.api}({str(path)!r}, **{inp.options})")
    return path


def main(argv=None) -> int:
    """``python -m recon.fuzz --worker [--memory-mb N]``: the :class:`Sandbox` worker.
    Fuzz runs are started with ``recon bench fuzz`` (or :func:`fuzz_readers`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] != ["--worker"]:
        print("usage: python -m recon.fuzz --worker [--memory-mb N]  (internal; run "
              "`recon bench fuzz --n 1000` to fuzz the readers)", file=sys.stderr)
        return 2
    memory_mb = 3072
    if len(args) == 3 and args[1] == "--memory-mb":
        memory_mb = int(args[2])
    return _worker(memory_mb)


if __name__ == "__main__":
    sys.exit(main())
