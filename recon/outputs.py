"""Outputs: atomic writes, staged output folders, tables, manifests and shards.

* :class:`OutputFolder` -- ``--out`` created and checked up front, outputs
  staged in a hidden folder and moved into place only when everything
  succeeded; inputs are never overwritten.
* :func:`write_text` / :func:`write_json` -- atomic (temporary file + rename).
* ``metrics.csv`` (:data:`METRIC_COLUMNS`, then CT's HU/clinical-window columns) and markdown tables.
* Manifests and shards: ``--manifest FILE`` lists one input per line (blank
  lines and ``#`` comments are skipped); ``--shard i/n`` (0-based) takes the
  lines whose index modulo ``n`` is ``i``.  Every case writes a completion
  record holding a :func:`fingerprint` of the settings; a rerun skips cases
  whose record exists with the same fingerprint.

Slurm job array (one task per shard)::

    #!/bin/bash
    #SBATCH --job-name=recon-compare
    #SBATCH --array=0-15
    #SBATCH --cpus-per-task=4 --mem=16G --time=02:00:00
    recon compare ct --manifest cases.txt --shard ${SLURM_ARRAY_TASK_ID}/${SLURM_ARRAY_TASK_COUNT} \\
        --methods fbp,tv,score-fast --views 23 --out results/ --quiet
    # afterwards (or as a dependent job) rerun any shard, e.g. --shard 0/1:
    # everything is skipped and metrics.csv / summary.md are rebuilt from all shards
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from recon.errors import ReconError
from recon.io._util import atomic_output, safe_name, short

METRIC_COLUMNS = ("case", "method", "psnr", "ssim", "nmse", "seconds")


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return str(v)
        return f"{v:.6g}"
    return str(v)


#: extra columns, after :data:`METRIC_COLUMNS`, when any row has them (CT: HU and clinical windows)
EXTRA_METRIC_COLUMNS = ("rmse_hu", "psnr_brain", "ssim_brain", "psnr_soft_tissue", "ssim_soft_tissue",
                        "psnr_lung", "ssim_lung", "rmse_hu_body", "psnr_body", "ssim_body")


def metrics_csv_text(rows: list[dict]) -> str:
    """``metrics.csv``: :data:`METRIC_COLUMNS`, then those of :data:`EXTRA_METRIC_COLUMNS` that
    any row has (empty where a row lacks one)."""
    extra = [c for c in EXTRA_METRIC_COLUMNS if any(c in r for r in rows)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(METRIC_COLUMNS + tuple(extra))
    for r in rows:
        w.writerow([_fmt(r[c]) for c in METRIC_COLUMNS] + [_fmt(r[c]) if c in r else "" for c in extra])
    return buf.getvalue()


def write_text(path: Path, text: str) -> Path:
    with atomic_output(path, Path(path).suffix) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


def write_json(path: Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (Path, torch.device)):
        return str(o)
    return repr(o)


def mean_std(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def markdown_table(rows: list[dict], methods: list[str]) -> str:
    """Per method: mean ± std (sample std over cases) of PSNR, SSIM, NMSE and seconds
    (plain values when every method has a single case)."""
    if all(sum(r["method"] == m for r in rows) == 1 for m in methods):
        lines = ["| method | PSNR (dB) | SSIM | NMSE | seconds |", "|---|---|---|---|---|"]
        for m in methods:
            (r,) = [r for r in rows if r["method"] == m]
            lines.append(f"| {m} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['nmse']:.3g} | {r['seconds']:.2f} |")
        return "\n".join(lines) + "\n"
    lines = ["| method | PSNR (dB) | SSIM | NMSE | seconds | n |", "|---|---|---|---|---|---|"]
    for m in methods:
        sel = [r for r in rows if r["method"] == m]
        if not sel:
            lines.append(f"| {m} | – | – | – | – | 0 |")
            continue
        cells = []
        for key, fmt in (("psnr", "{:.2f} ± {:.2f}"), ("ssim", "{:.4f} ± {:.4f}"),
                         ("nmse", "{:.3g} ± {:.2g}"), ("seconds", "{:.2f} ± {:.2f}")):
            cells.append(fmt.format(*mean_std([r[key] for r in sel])))
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {len(sel)} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# provenance
# ---------------------------------------------------------------------------
def versions() -> dict:
    import platform

    import numpy
    import pydicom

    import recon

    return {"recon": recon.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "pydicom": pydicom.__version__, "python": platform.python_version()}


def fingerprint(settings: dict) -> str:
    """Hash of the settings that change results (callers leave out paths, device and verbosity)."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------
# output folders
# ---------------------------------------------------------------------------
def _remove_orphaned_stages(folder: Path) -> None:
    """Remove staging folders whose process is gone (a run killed with SIGKILL cannot clean up).
    Their names carry the writer's process id; a folder of a live process (another shard) stays."""
    for stage in folder.glob(".recon-staging-*"):
        parts = stage.name.split("-")
        pid = int(parts[2]) if len(parts) > 3 and parts[2].isdigit() else None
        if pid is None or not stage.is_dir():
            continue
        try:
            os.kill(pid, 0)
            continue  # alive (or not ours to signal): keep it
        except ProcessLookupError:
            shutil.rmtree(stage, ignore_errors=True)
        except PermissionError:
            continue


class OutputFolder:
    """``--out``: created and checked up front; outputs staged and moved in at the end.

    * The folder (and missing parents) is created and a temporary file is
      written to prove it is writable; failures raise ``ReconError``.
    * ``inputs``: paths that must never be overwritten: refused when one is
      (inside) a reserved output name.  ``dicom_folders``: input DICOM
      folders; ``--out`` inside one is refused (a later read of the folder
      would pick up the derived series).  ``contain_forbidden``: folders
      ``--out`` may not lie in, and that may not lie in ``--out``.
    * With ``staged=True`` the body writes into :attr:`stage` (a hidden
      folder inside ``--out``); on success every entry is moved into ``--out``
      (replacing older outputs of the same name, and removing reserved outputs
      of an earlier run that this one did not write), on failure the staging
      folder is removed, as are folders this object created if they are
      still empty.
    """

    def __init__(self, path, *, inputs=(), reserved=(), dicom_folders=(), contain_forbidden=(),
                 staged: bool = True):
        self.path = Path(path)
        self.inputs = [Path(p) for p in inputs if p]
        self.reserved = tuple(reserved)
        self.dicom_folders = [Path(p) for p in dicom_folders if p]
        self.contain_forbidden = [Path(p) for p in contain_forbidden if p]
        self.staged = staged
        self.stage: Path | None = None
        self._created: list[Path] = []

    def _check_paths(self):
        out = self.path.resolve()
        for folder in self.dicom_folders:
            f = folder.resolve()
            if out == f or f in out.parents:
                raise ReconError(f"{self.path}: --out is inside the input DICOM folder {folder}; "
                                 "a derived series there would mix with the input series - "
                                 "choose an output folder outside it")
        for folder in self.contain_forbidden:
            f = folder.resolve()
            if out == f or f in out.parents:
                raise ReconError(f"{self.path}: --out is inside the input folder {folder}; the "
                                 "outputs would be read as inputs next time - choose another folder")
            if out in f.parents:
                raise ReconError(f"{self.path}: the input folder {folder} lies inside --out; "
                                 "choose an output folder that does not contain the inputs")
        for p in self.inputs:
            rp = p.resolve()
            for name in self.reserved:
                target = out / name
                if rp == target or target in rp.parents:
                    raise ReconError(f"{p}: this input would be overwritten by the output "
                                     f"{target}; choose another --out")

    def prepare(self):
        self._check_paths()
        p = self.path
        if p.exists() and not p.is_dir():
            raise ReconError(f"{p}: --out exists and is not a folder; choose a folder path")
        missing = []
        q = p
        while not q.exists():
            missing.append(q)
            if q.parent == q:
                break
            q = q.parent
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ReconError(f"{p}: cannot create the output folder ({short(e)}); choose a writable "
                             "location") from None
        self._created = list(missing)  # deepest first
        try:
            fd, tmp = tempfile.mkstemp(prefix=".recon-write-test-", dir=p)
            os.close(fd)
            os.unlink(tmp)
        except OSError as e:
            self._cleanup_created()
            raise ReconError(f"{p}: the output folder is not writable ({short(e)}); choose a "
                             "writable location") from None
        if self.staged:
            _remove_orphaned_stages(p)
            self.stage = Path(tempfile.mkdtemp(prefix=f".recon-staging-{os.getpid()}-", dir=p))
        return self

    def _cleanup_created(self):
        for d in self._created:  # deepest first
            with contextlib.suppress(OSError):
                d.rmdir()

    def commit(self):
        """Move the staged outputs in, then remove reserved outputs of an earlier run that this
        run did not write (e.g. ``dicom/`` of a DICOM run when this one wrote ``recon.nii.gz``,
        ``metrics.json`` when this run has no ground truth), so the folder holds one run."""
        if self.stage is None:
            return
        written = set()
        for entry in sorted(self.stage.iterdir(), key=lambda e: (e.name == "run.json", e.name)):  # record last
            target = self.path / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
            written.add(entry.name)
        self.stage.rmdir()
        self.stage = None
        for name in self.reserved:
            stale = self.path / name
            if name in written or not (stale.exists() or stale.is_symlink()):
                continue
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            else:
                stale.unlink()

    def abort(self):
        if self.stage is not None:
            shutil.rmtree(self.stage, ignore_errors=True)
            self.stage = None
        self._cleanup_created()

    def __enter__(self):
        return self.prepare()

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self.commit()
            except OSError as e:
                self.abort()
                raise ReconError(f"{self.path}: cannot move the outputs into place ({short(e)})") from None
        else:
            self.abort()
        return False


# ---------------------------------------------------------------------------
# manifests and shards
# ---------------------------------------------------------------------------
def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    try:
        i, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise ReconError(f"--shard {text!r}: expected i/n with integers, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise ReconError(f"--shard {text}: need n >= 1 and 0 <= i < n (i is 0-based), e.g. 0/{max(n, 1)}")
    return i, n


def split_manifest_line(entry: str) -> tuple[str, str | None]:
    """``'study/ --slices 10:20'`` -> ``('study/', '10:20')``: a manifest line may end with its own
    slice range (``recon ct|mri``); ``(entry, None)`` otherwise."""
    head, sep, spec = entry.rpartition(" --slices ")
    if sep and spec.strip() and " " not in spec.strip():
        return head.strip(), spec.strip()
    return entry, None


def read_manifest(path) -> list[tuple[int, str]]:
    """``(index, entry)`` per non-empty, non-comment line; relative paths are taken
    relative to the manifest's folder when they exist there, else to the working directory.
    A line may end with ``--slices a:b`` (its own slice range, :func:`split_manifest_line`)."""
    p = Path(path)
    if not p.is_file():
        raise ReconError(f"{p}: no such manifest file")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ReconError(f"{p}: cannot read the manifest ({short(e)})") from None
    entries = []
    for line in text.splitlines():
        s = line.split("#", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if not s:
            continue
        s, slices = split_manifest_line(s)
        q = Path(s).expanduser()
        if not q.is_absolute() and (p.parent / q).exists():
            q = p.parent / q
        entries.append(str(q) + (f" --slices {slices}" if slices else ""))
    if not entries:
        raise ReconError(f"{p}: the manifest lists no inputs (one path per line, # for comments)")
    return list(enumerate(entries))


def select_shard(items: list, shard: tuple[int, int]) -> list:
    i, n = shard
    return [it for k, it in enumerate(items) if k % n == i]


_STEM_SUFFIXES = (".nii.gz", ".nii", ".npy", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp",
                  ".dcm", ".dicom", ".ima", ".h5", ".hdf5", ".cfl", ".hdr")


def entry_name(index: int, entry: str) -> str:
    entry, slices = split_manifest_line(entry)
    if slices:
        return entry_name(index, entry) + "_slices-" + safe_name(slices.replace(":", "-"), 20)
    name = Path(entry.rstrip("/")).name
    low = name.lower()
    for s in _STEM_SUFFIXES:
        if low.endswith(s):
            name = name[: -len(s)]
            break
    return f"{index:04d}_{safe_name(name, 60)}"
