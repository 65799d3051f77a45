"""Small helpers shared by the readers and writers (not public API)."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

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


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence library warnings (pydicom value warnings, nibabel notes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


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
