"""Small helpers shared by the readers and writers (not public API)."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Iterator

from recon.errors import ReconError

_UMASK = os.umask(0)
os.umask(_UMASK)


def short(exc: BaseException, limit: int = 200) -> str:
    """``Type: message`` on one line, truncated, for embedding in errors."""
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it into place on success.

    The temporary file lives in the same folder (so ``os.replace`` is atomic)
    and ends with ``suffix`` (writers such as nibabel pick the format from the
    file name).  On any error the temporary file is removed and ``path`` is
    left untouched.  ``OSError`` is turned into a ``ReconError``.
    """
    path = Path(path)
    if path.is_dir():
        raise ReconError(f"{path}: is a folder, expected an output file name; "
                         f"give a file path such as {path / 'out'}{suffix or ''}")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix,
                                        dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise ReconError(f"{path}: cannot write ({short(exc)}); "
                         "check that the folder exists, is writable and has free space") from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()


_CHATTY_LOGGERS = ("nibabel", "tifffile", "pydicom", "PIL", "h5py")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence library warnings and log messages (pydicom value warnings,
    nibabel header fixes, tifffile tag complaints): a damaged file gives one
    ReconError, not a screenful of notes before it."""
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str, limit: int = 80) -> str:
    """A filesystem-safe token: letters, digits, ``.``, ``_``, ``-`` only."""
    out = _UNSAFE.sub("_", text).strip("._-")
    return (out[:limit].rstrip("._-") or "case")


def require_file(path: str | os.PathLike, what: str = "input") -> Path:
    path = Path(path)
    if not path.exists():
        raise ReconError(f"{path}: no such file or folder; check the {what} path")
    return path


#: Default for :func:`max_bytes`: 8 GiB.
DEFAULT_MAX_BYTES = 8 * 2 ** 30


def max_bytes() -> int:
    """The largest decoded array a reader will allocate, in bytes.

    A header describing more (e.g. a ``.npy`` or ``.hdr`` claiming 10^12
    elements) is refused before anything is allocated.  Set the environment
    variable ``RECON_MAX_BYTES`` to change it (default 8 GiB)."""
    text = os.environ.get("RECON_MAX_BYTES", "").strip()
    if text:
        try:
            value = int(float(text))
        except ValueError:
            raise ReconError(f"RECON_MAX_BYTES={text!r}: expected a number of bytes, e.g. 8e9") from None
        if value > 0:
            return value
    return DEFAULT_MAX_BYTES


def check_size(path: str | os.PathLike, shape: Iterable[int], what: str, itemsize: int, *,
               available: int | None = None, stored_itemsize: int | None = None,
               allow_empty: bool = False) -> int:
    """Validate array dims taken from a file header before allocating them.

    Refuses negative dims, an empty array (unless ``allow_empty``), more than
    :func:`max_bytes` once decoded (``itemsize`` bytes per element), and more
    data than the file can hold: ``available`` is the number of data bytes
    present (or an upper bound for compressed data), ``stored_itemsize`` the
    bytes per element on disk (default ``itemsize``).  Returns the element
    count."""
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError, OverflowError):
        raise ReconError(f"{path}: {what} has an invalid shape {shape!r} in its header; the file is "
                         "corrupt - re-export it") from None
    if any(d < 0 for d in dims):
        raise ReconError(f"{path}: {what} has a negative dimension in its shape {dims}; the header "
                         "is corrupt - re-export the file")
    count = math.prod(dims)
    if count == 0 and not allow_empty:
        raise ReconError(f"{path}: {what} is empty (shape {dims}); there is no image data to read")
    need = count * max(int(itemsize), 1)
    limit = max_bytes()
    if need > limit:
        raise ReconError(f"{path}: {what} of shape {dims} would need {need / 2 ** 30:.3g} GiB, more than "
                         f"the {limit / 2 ** 30:.3g} GiB limit (RECON_MAX_BYTES); the header is corrupt, "
                         "or crop or split the data first")
    stored = count * max(int(stored_itemsize or itemsize), 1)
    if available is not None and stored > available:
        raise ReconError(f"{path}: the header describes {what} of shape {dims} ({stored} bytes) but the "
                         f"file holds only {max(int(available), 0)} bytes of data; the file is truncated "
                         "or its header is corrupt - re-export it")
    return count


class BoundedReader(io.BufferedReader):
    """A read-only file whose ``read(n)`` never asks for more than the bytes
    left, so a corrupt length field cannot make a library allocate gigabytes
    for a small file (pydicom and Pillow read element/chunk lengths as given)."""

    def __init__(self, path: str | os.PathLike):
        raw = io.FileIO(os.fspath(path), "rb")
        super().__init__(raw)
        self._size = os.fstat(raw.fileno()).st_size

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size >= 0:
            size = min(size, max(0, self._size - self.tell()))
        return super().read(size)
