"""Running reconstruction methods on tasks, for the command line.

* :func:`run_single` -- ``recon ct|mri|inpaint``: one input (or, with
  ``--manifest``/``--shard``, one output folder per manifest line), one
  method; writes the reconstruction, ``recon.png``, ``metrics.json`` and
  ``run.json`` into a staging folder that is moved into ``--out`` only after
  everything succeeded.
* :func:`run_compare` -- ``recon compare``: every discovered case gets ONE
  simulated measurement (seeded by ``--seed``) shared by all methods;
  ``metrics.csv`` (columns exactly ``case,method,psnr,ssim,nmse,seconds``),
  ``summary.md`` and ``figures/CASE.png``.
* :func:`run_demo` -- ``recon demo``.

Metrics are computed on the [0, 1] working scale with ``data_range = 1``;
reconstructions are clipped to [0, 1] first (MRI: the magnitude).

Manifests and shards
--------------------
``--manifest FILE`` lists one input per line (blank lines and ``#``
comments are skipped); ``--shard i/n`` (0-based) takes the lines whose index
modulo ``n`` is ``i``.  Every case writes a completion record (``run.json``
in its folder for ``recon ct|mri``, ``cases/CASE.json`` for ``recon
compare``) holding a fingerprint of the settings; a rerun skips cases whose
record exists with the same fingerprint (``--force`` recomputes), logs
failures and goes on, and exits with status 1 at the end if any case failed.
Each shard rewrites the aggregated ``metrics.csv`` from all records present,
so the last shard to finish (or any rerun) leaves the complete table.

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

import argparse
import contextlib
import copy
import csv
import hashlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from recon.errors import ReconError
from recon.io._util import atomic_output, safe_name, short

METRIC_COLUMNS = ("case", "method", "psnr", "ssim", "nmse", "seconds")

# ---------------------------------------------------------------------------
# --param key=value
# ---------------------------------------------------------------------------
_BOOLS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def parse_value(text: str):
    """``'3'`` -> 3, ``'1e-3'`` -> 0.001, ``'true'`` -> True, ``'none'`` -> None,
    ``'0,1'`` -> (0, 1), anything else -> the string."""
    t = text.strip()
    low = t.lower()
    if low in _BOOLS:
        return _BOOLS[low]
    if low in ("none", "null"):
        return None
    if "," in t:
        return tuple(parse_value(v) for v in t.split(","))
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t


def parse_params(items: Iterable[str] | None) -> dict:
    """``['lam=1e-3', 'tv.n_iter=50']`` -> ``{None: {'lam': 0.001}, 'tv': {'n_iter': 50}}``."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ReconError(f"--param {item!r}: expected KEY=VALUE (e.g. lam=1e-3, or tv.lam=1e-3 "
                             "for one method)")
        key, value = item.split("=", 1)
        key = key.strip()
        scope = None
        if "." in key:
            scope, key = key.rsplit(".", 1)
        if not key.isidentifier():
            raise ReconError(f"--param {item!r}: {key!r} is not a valid option name")
        out.setdefault(scope, {})[key] = parse_value(value)
    return out


# ---------------------------------------------------------------------------
# methods
# ---------------------------------------------------------------------------
def _noisy(args) -> bool:
    """Whether the measurement is simulated with noise or measured (then assumed noisy)."""
    return bool(getattr(args, "photons", None) or getattr(args, "noise", None) or getattr(args, "sigma_y", None)
                or getattr(args, "sinogram", None) or getattr(args, "kspace", None))


@dataclass
class MethodRun:
    name: str
    method: Any          # recon.methods.Method
    options: dict        # task defaults + user --param
    score: bool          # needs a prior

    def accepts(self, key: str) -> bool:
        """Whether the method's signature names ``key`` (open ``**options`` signatures do not count:
        automatic options such as ``sigma_y`` are only passed to methods that declare them)."""
        opts = self.method.options()
        return opts is not None and key in opts


def plan_methods(names: list[str], task, params: dict, noisy: bool = False) -> list[MethodRun]:
    """Resolve method names (unknown -> ReconError listing the available ones) and their options.

    ``noisy`` selects the task's defaults tuned for noisy measurements."""
    from recon.methods import get_method

    if not names:
        raise ReconError("no method given")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ReconError(f"method(s) listed twice: {', '.join(dup)}")
    methods = [(n, get_method(n)) for n in names]
    for scope in params:
        if scope is not None and scope not in names:
            raise ReconError(f"--param {scope}.*: method '{scope}' is not among the methods "
                             f"({', '.join(names)})")
    runs = []
    used = set()
    for n, m in methods:
        accepted = m.options()
        defaults = {k: v for k, v in task.default_options(n, noisy).items() if accepted is None or k in accepted}
        opts = dict(defaults)
        for k, v in params.get(None, {}).items():
            if len(methods) == 1 or (accepted is not None and k in accepted):
                opts[k] = v  # a single method gets every option (it reports unknown ones)
                used.add(k)
        opts.update(params.get(n, {}))
        runs.append(MethodRun(n, m, opts, score=accepted is not None and "prior" in accepted))
    unused = sorted(set(params.get(None, {})) - used)
    if unused:
        raise ReconError(f"--param {', '.join(unused)}: not accepted by any of {', '.join(names)}")
    for r in runs:  # validate option names now, before any work
        accepted = r.method.options()
        if accepted is not None:
            bad = sorted(set(r.options) - set(accepted))
            if bad:
                raise ReconError(f"method '{r.name}': unknown option(s) {', '.join(bad)}; accepted "
                                 f"options: {', '.join(accepted)}")
    return runs


class PriorCache:
    """Load each prior once (by name or path)."""

    def __init__(self, device):
        self.device, self._cache = device, {}

    def get(self, name):
        if name not in self._cache:
            from recon.prior import load_prior

            self._cache[name] = load_prior(name, device=self.device)
        return self._cache[name]


def _signature_default(method, key):
    sig = getattr(method, "_sig", None)
    if sig is None or key not in sig.parameters:
        return None
    d = sig.parameters[key].default
    return None if d is sig.parameters[key].empty else d


@contextlib.contextmanager
def progress_bar(enabled: bool, total, desc: str):
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


def _sync(device):
    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


def run_method(run: MethodRun, meas, *, prior=None, seed: int = 0, samples: int = 1,
               progress: bool = False):
    """Run one method on a measurement.

    Returns ``(image, std, seconds, options)``: ``image`` the real 2-D
    reconstruction (magnitude for complex methods; the posterior mean when
    ``samples > 1``), ``std`` the per-pixel std of the samples or ``None``,
    ``options`` the JSON-able options actually passed.
    """
    from recon.score_methods import sample_posterior

    opts = dict(run.options)
    if run.score and "prior" not in opts:
        if prior is None:
            raise ReconError(f"method '{run.name}' needs a prior (--prior NAME or PATH)")
        opts["prior"] = prior
    if run.accepts("sigma_y") and "sigma_y" not in opts:
        opts["sigma_y"] = float(meas.sigma_y)
    if run.accepts("seed") and "seed" not in opts and "generator" not in opts:
        opts["seed"] = int(seed)
    if samples > 1 and not (run.accepts("seed") or run.accepts("generator")):
        raise ReconError(f"--samples {samples}: method '{run.name}' is deterministic; posterior samples "
                         "need a sampling method (score, score-fast, dps)")
    total = opts.get("n_iter") or opts.get("n_steps") or _signature_default(run.method.fn, "n_iter") \
        or _signature_default(run.method.fn, "n_steps")
    recorded = {k: (v if isinstance(v, (int, float, str, bool, type(None), tuple, list))
                    else getattr(v, "meta", {}).get("name", type(v).__name__))
                for k, v in opts.items()}
    if "prior" in recorded and not isinstance(opts.get("prior"), str):
        recorded["prior"] = getattr(opts["prior"], "_recon_source", recorded["prior"])
    device = meas.y.device
    with progress_bar(progress and run.accepts("callback") and "callback" not in opts, total, run.name) as bar:
        if bar is not None:
            opts["callback"] = lambda i, x: bar.update(1)
        _sync(device)
        t0 = time.perf_counter()
        try:
            if samples > 1:
                mean, std = sample_posterior(run.method, meas.y, meas.op, samples, **opts)
            else:
                x = run.method(meas.y, meas.op, **opts)
                mean, std = (x.abs() if x.is_complex() else x), None
        except TypeError as e:  # open (**options) signatures report unknown options only here
            if "keyword argument" not in str(e):
                raise
            raise ReconError(f"method '{run.name}': {e}") from None
        _sync(device)
        seconds = time.perf_counter() - t0
    img = mean.detach().reshape(mean.shape[0], *mean.shape[-2:])[0].float().cpu().numpy()
    if not np.all(np.isfinite(img)):
        raise ReconError(f"method '{run.name}' produced NaN or infinite values; try other options "
                         "(e.g. --param n_iter=..., lam=...)")
    sd = None if std is None else std.detach().reshape(std.shape[0], *std.shape[-2:])[0].float().cpu().numpy()
    return img, sd, seconds, recorded


# ---------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------
def center_crop(img: np.ndarray, shape) -> np.ndarray:
    h, w = img.shape
    H, W = shape
    if H > h or W > w:
        raise ReconError(f"the reference is {H}x{W} but the reconstruction only {h}x{w}")
    top, left = (h - H) // 2, (w - W) // 2
    return img[top:top + H, left:left + W]


def compute_metrics(recon: np.ndarray, truth: np.ndarray) -> dict:
    """PSNR / SSIM / NMSE of ``clip(recon, 0, 1)`` against ``truth`` (both [0, 1], data_range 1)."""
    from recon.metrics import nmse, psnr, ssim

    r = np.clip(np.asarray(recon, dtype=np.float64), 0, 1)
    t = np.asarray(truth, dtype=np.float64)
    if r.shape != t.shape:
        r = center_crop(r, t.shape)
    return {"psnr": float(psnr(r, t, data_range=1.0)), "ssim": float(ssim(r, t, data_range=1.0)),
            "nmse": float(nmse(r, t))}


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return str(v)
        return f"{v:.6g}"
    return str(v)


def metrics_csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(METRIC_COLUMNS)
    for r in rows:
        w.writerow([_fmt(r[c]) for c in METRIC_COLUMNS])
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


_NOT_SETTINGS = {"out", "quiet", "debug", "device", "shard", "manifest", "data", "max_cases", "force",
                 "command", "input", "kspace", "sinogram", "_task"}


def options_of(args) -> dict:
    return {k: v for k, v in sorted(vars(args).items()) if not k.startswith("_")}


def fingerprint(args) -> str:
    """Hash of the settings that change results (not paths, device or verbosity)."""
    d = {k: v for k, v in options_of(args).items() if k not in _NOT_SETTINGS}
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------
# output folders
# ---------------------------------------------------------------------------
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
      (replacing older outputs of the same name), on failure the staging
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
            self.stage = Path(tempfile.mkdtemp(prefix=".recon-staging-", dir=p))
        return self

    def _cleanup_created(self):
        for d in self._created:  # deepest first
            with contextlib.suppress(OSError):
                d.rmdir()

    def commit(self):
        if self.stage is None:
            return
        for entry in sorted(self.stage.iterdir()):
            target = self.path / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
        self.stage.rmdir()
        self.stage = None

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


def read_manifest(path) -> list[tuple[int, str]]:
    """``(index, entry)`` per non-empty, non-comment line; relative paths are taken
    relative to the manifest's folder when they exist there, else to the working directory."""
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
        q = Path(s).expanduser()
        if not q.is_absolute() and (p.parent / q).exists():
            q = p.parent / q
        entries.append(str(q))
    if not entries:
        raise ReconError(f"{p}: the manifest lists no inputs (one path per line, # for comments)")
    return list(enumerate(entries))


def select_shard(items: list, shard: tuple[int, int]) -> list:
    i, n = shard
    return [it for k, it in enumerate(items) if k % n == i]


_STEM_SUFFIXES = (".nii.gz", ".nii", ".npy", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp",
                  ".dcm", ".dicom", ".ima", ".h5", ".hdf5", ".cfl", ".hdr")


def entry_name(index: int, entry: str) -> str:
    name = Path(entry.rstrip("/")).name
    low = name.lower()
    for s in _STEM_SUFFIXES:
        if low.endswith(s):
            name = name[: -len(s)]
            break
    return f"{index:04d}_{safe_name(name, 60)}"


# ---------------------------------------------------------------------------
# one case, one method: recon ct | mri | inpaint
# ---------------------------------------------------------------------------
SINGLE_OUTPUTS = ("recon.nii.gz", "recon.png", "metrics.json", "run.json", "sinogram.npy", "observed.png",
                  "std.npy", "std.png", "dicom")


def resolve_device(name: str):
    from recon.cli import resolve_device as _resolve

    return _resolve(name)


def _input_paths(args) -> list[str]:
    return [p for p in (getattr(args, k, None) for k in ("input", "sinogram", "kspace", "mask_file",
                                                          "reference")) if p]


def _dicom_folders(args) -> list[Path]:
    """An INPUT folder of DICOM files: --out may not lie inside it (a derived series there would be
    read together with the input next time).  A single input file is protected by the
    reserved-name check and by write_dicom_series itself."""
    inp = getattr(args, "input", None)
    if not inp:
        return []
    p = Path(inp)
    return [p] if p.is_dir() else []


def _slice_affine(reference, k: int, crop, size: int) -> np.ndarray | None:
    """Voxel->RAS affine of slice ``k`` after the square crop and resize to ``size``."""
    aff = getattr(reference, "affine", None)
    if aff is None:
        return None
    top, left, m = crop
    f = m / size
    idx = np.array([[f, 0, 0, left + 0.5 * f - 0.5],
                    [0, f, 0, top + 0.5 * f - 0.5],
                    [0, 0, 1, k],
                    [0, 0, 0, 1]], dtype=np.float64)
    return np.asarray(aff, dtype=np.float64) @ idx


def _cropped_reference(vol, crop):
    """A shallow copy of a DICOM Volume describing only the square crop (for write_dicom_series)."""
    top, left, m = crop
    ref = copy.copy(vol)
    ref.data = vol.data[:, top:top + m, left:left + m]
    ref.meta = dict(vol.meta)
    positions, orient = vol.meta.get("positions"), vol.meta.get("orientation")
    if positions is not None and orient is not None and (top or left):
        dy, dx = vol.meta.get("pixel_spacing") or vol.spacing[1:]
        row_dir, col_dir = np.asarray(orient[:3], float), np.asarray(orient[3:], float)
        ref.meta["positions"] = [tuple(np.asarray(p, float) + left * dx * row_dir + top * dy * col_dir)
                                 for p in positions]
    return ref


def _write_image_outputs(stage: Path, img01: np.ndarray, truth, task_name: str, method: str,
                         settings: dict, units_img: np.ndarray | None = None) -> list[str]:
    """The reconstruction as DICOM (DICOM input) or NIfTI, in the input's units."""
    from recon.io import write_dicom_series, write_nifti

    written = []
    src = truth.source if truth is not None else None
    values = units_img if units_img is not None else (truth.to_units(img01) if truth is not None else img01)
    if src is not None and src.fmt == "dicom" and src.reference is not None:
        ref = _cropped_reference(src.reference, truth.crop)
        files = write_dicom_series(values, ref, stage / "dicom", method, settings,
                                   slice_indices=[src.slice_index])
        written += [str(Path("dicom") / f.name) for f in files]
    else:
        affine = None
        if src is not None and src.fmt == "nifti" and src.reference is not None:
            affine = _slice_affine(src.reference, src.slice_index, truth.crop, img01.shape[-1])
        elif truth is not None:
            affine = np.diag([truth.pixel_mm, truth.pixel_mm, 1.0, 1.0])
        write_nifti(values, stage / "recon.nii.gz", affine=affine)
        written.append("recon.nii.gz")
    return written


def _single_case(task, args, out: Path, log: Callable[[str], None], *, fp: str | None = None,
                 input_label: str | None = None) -> dict:
    """Reconstruct one input into ``out`` (staged); returns the run record."""
    from recon.io import write_npy, write_png
    from recon.preprocess import CT_WINDOW
    from recon.tasks import load_source, parse_window

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    params = parse_params(args.param)
    (run,) = plan_methods([args.method], task, params, noisy=_noisy(args))
    if args.samples < 1:
        raise ReconError(f"--samples must be >= 1, got {args.samples}")
    if args.samples > 1 and not run.score:
        raise ReconError(f"--samples {args.samples}: method '{args.method}' is deterministic; posterior "
                         "samples need a score method (score, score-fast, dps)")
    measured = bool(getattr(args, "sinogram", None) or getattr(args, "kspace", None))
    if measured and getattr(args, "input", None):
        raise ReconError("give either an INPUT image (simulated measurement) or measured data "
                         f"(--{'sinogram' if getattr(args, 'sinogram', None) else 'kspace'}), not both")
    if not measured and not getattr(args, "input", None):
        extra = {"ct": " or --sinogram FILE", "mri": " or --kspace FILE"}.get(task.name, "")
        raise ReconError(f"an INPUT image is required{extra}")
    device = resolve_device(args.device)
    progress = not args.quiet and sys.stderr.isatty()
    folder = OutputFolder(out, inputs=_input_paths(args), reserved=SINGLE_OUTPUTS,
                          dicom_folders=_dicom_folders(args))
    with folder:
        stage = folder.stage
        t0 = time.perf_counter()
        prior = None
        prior_name = None
        source = None
        if run.score:
            if getattr(args, "input", None):
                source = load_source(args.input, args.series, args.slice)
            prior_name = args.prior or task.default_prior(source, getattr(args, "units", "auto"))
            prior = PriorCache(device).get(prior_name)
            prior._recon_source = str(prior_name)
        window = parse_window(getattr(args, "window", None)) or \
            (prior.window if prior is not None and prior.window else None) or CT_WINDOW
        size = args.size or (prior.image_size if prior is not None else None)
        if size is not None and size < 4:
            raise ReconError(f"--size must be at least 4, got {size}")
        truth = None
        reference = None
        extra = {}
        if task.name == "ct" and measured:
            if size is None:
                raise ReconError("--size S is required with --sinogram (the reconstructed image is SxS)")
            meas = task.measured(args, size, device, window, args.fov)
            timings["load"] = time.perf_counter() - t0
        elif task.name == "mri" and measured:
            if args.size:
                raise ReconError("--size cannot be used with --kspace: the k-space sets the image size")
            meas, reference, scale, undersampled = task.measured(args, device)
            extra = {"kspace_scale": scale, "undersampled_input": undersampled}
            timings["load"] = time.perf_counter() - t0
        else:
            if source is None:
                source = load_source(args.input, args.series, args.slice)
            truth = task.prepare(source, size, window, getattr(args, "units", "auto"), getattr(args, "fov", None))
            timings["load"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            op = task.build_operator(args, truth.size, device)
            timings["operator"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            gen = torch.Generator(device=device).manual_seed(args.seed)
            meas = task.simulate(truth, op, args, gen)
            timings["simulate"] = time.perf_counter() - t0
            reference = truth.x
        log(f"{input_label or (args.input or getattr(args, 'sinogram', None) or args.kspace)}: "
            f"{args.method} on {tuple(meas.op.in_shape)} "
            f"({_noise_text(meas.info)}, sigma_y={meas.sigma_y:.3g})")
        img, std, seconds, used = run_method(run, meas, prior=prior, seed=args.seed, samples=args.samples,
                                             progress=progress)
        timings["reconstruct"] = seconds
        t0 = time.perf_counter()
        is_mri = task.name == "mri"
        metrics = None
        if reference is not None:
            if is_mri and measured and extra.get("undersampled_input"):
                shown = img / max(float(img.max()), 1e-12)
            else:
                shown = img
            metrics = compute_metrics(shown, reference)
            metrics.update(data_range=1.0, scale="[0, 1]", reference=meas.info.get("reference", "input image"))
            write_json(stage / "metrics.json", metrics)
        settings = {"task": task.name, "method": args.method, **{k: v for k, v in used.items()
                                                                  if k not in ("callback",)}}
        if is_mri:  # magnitude, not clipped, in the input's scale (k-space: the raw scale)
            values = img * (truth.scale if truth is not None else extra["kspace_scale"])
            written = _write_image_outputs(stage, img, truth, task.name, args.method, settings, units_img=values)
            vmax = 1.0 if truth is not None else max(1e-12, float(np.percentile(img, 99.9)))
            write_png(img, stage / "recon.png", vmin=0.0, vmax=vmax)
        else:
            img01 = np.clip(img, 0, 1)
            if truth is None:  # measured sinogram: the window maps [0, 1] to HU
                lo, hi = window
                written = _write_image_outputs(stage, img01, None, task.name, args.method, settings,
                                               units_img=(img01 * (hi - lo) + lo).astype(np.float32))
            else:
                written = _write_image_outputs(stage, img01, truth, task.name, args.method, settings)
            write_png(img01, stage / "recon.png", vmin=0.0, vmax=1.0)
        written.append("recon.png")
        if task.name == "ct":
            write_npy(meas.y[0].float().cpu().numpy(), stage / "sinogram.npy")
            written.append("sinogram.npy")
        if task.name == "inpaint":
            write_png(meas.y[0].float().cpu().numpy(), stage / "observed.png", vmin=0.0, vmax=1.0)
            written.append("observed.png")
        if std is not None:
            write_npy(std, stage / "std.npy")
            write_png(std, stage / "std.png", vmin=0.0, vmax=max(float(std.max()), 1e-12))
            written += ["std.npy", "std.png"]
        if metrics is not None:
            written.append("metrics.json")
        timings["write"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        record = {
            "command": f"recon {task.name}",
            "argv": list(sys.argv),
            "versions": versions(),
            "seed": args.seed,
            "device": str(device),
            "input": str(args.input or getattr(args, "sinogram", None) or getattr(args, "kspace", None)),
            "options": options_of(args),
            "method": {"name": args.method, "options": used},
            "prior": prior_name and str(prior_name),
            "working_size": list(meas.op.in_shape),
            "window": list(window) if (truth is None or truth.units == "HU") and task.name != "mri" else None,
            "units": truth.units if truth is not None else ("HU" if task.name == "ct" else "k-space scale"),
            "pixel_mm": truth.pixel_mm if truth is not None else None,
            "measurement": meas.info,
            "sigma_y": meas.sigma_y,
            "samples": args.samples,
            "metrics": metrics,
            "timings_seconds": {k: round(v, 4) for k, v in timings.items()},
            "outputs": written + ["run.json"],
            "fingerprint": fp or fingerprint(args),
        }
        if truth is not None:
            record["input_slice"] = truth.source.slice_index
            record["crop"] = list(truth.crop)
        record.update({k: v for k, v in extra.items()})
        write_json(stage / "run.json", record)
    return record


def _noise_text(info: dict) -> str:
    model = info.get("model")
    return {"none": "noise-free", "poisson": f"Poisson noise, I0={info.get('I0')}",
            "gaussian": f"Gaussian noise {info.get('relative_sigma')} x RMS",
            "measured": "measured data"}.get(model, str(model))


def run_single(task, args, log) -> int:
    """``recon ct|mri|inpaint``: one input, or a manifest shard."""
    if args.manifest:
        return _run_manifest(task, args, log)
    if args.shard:
        raise ReconError("--shard needs --manifest FILE (the list of inputs to split)")
    record = _single_case(task, args, Path(args.out), log)
    m = record.get("metrics")
    if m:
        log(f"{args.method}: PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f}, NMSE {m['nmse']:.3g} "
            f"({record['timings_seconds']['reconstruct']:.2f} s)")
    log(f"wrote {args.out}")
    return 0


def _mri_entry_is_kspace(entry: str, from_image: bool) -> bool:
    low = entry.lower()
    if low.endswith((".h5", ".hdf5", ".cfl", ".hdr")):
        return True
    if low.endswith(".npy"):
        from recon.io.images import npy_shape

        try:
            _, dtype = npy_shape(entry)
        except ReconError:
            return False
        return bool(np.issubdtype(dtype, np.complexfloating))
    return False


def _run_manifest(task, args, log) -> int:
    shard = parse_shard(args.shard)
    entries = select_shard(read_manifest(args.manifest), shard)
    if getattr(args, "input", None) or getattr(args, "sinogram", None) or getattr(args, "kspace", None):
        raise ReconError("--manifest replaces the INPUT argument; give one or the other")
    out = Path(args.out)
    folder = OutputFolder(out, inputs=[e for _, e in entries], reserved=[entry_name(i, e) for i, e in entries],
                          staged=False)
    folder.prepare()
    fp = fingerprint(args)
    done, skipped, failed = [], [], []
    for index, entry in entries:
        name = entry_name(index, entry)
        case_out = out / name
        marker = case_out / "run.json"
        if not args.force and marker.is_file():
            try:
                if json.loads(marker.read_text()).get("fingerprint") == fp:
                    skipped.append(name)
                    log(f"{name}: done already, skipped")
                    continue
            except (OSError, ValueError):
                pass
        a = copy.copy(args)
        a.manifest = None
        a.shard = None
        if task.name == "mri" and _mri_entry_is_kspace(entry, args.from_image):
            a.input, a.kspace = None, entry
        else:
            a.input = entry
            if hasattr(a, "kspace"):
                a.kspace = None
        try:
            _single_case(task, a, case_out, log, fp=fp, input_label=f"{name} ({entry})")
            done.append(name)
        except Exception as e:  # noqa: BLE001 - log and go on with the next case
            if args.debug:
                raise
            failed.append({"case": name, "input": entry, "error": f"{e}" if isinstance(e, ReconError)
                           else short(e)})
            print(f"recon {task.name}: {name} ({entry}): error: {failed[-1]['error']}", file=sys.stderr)
    # aggregate every finished case with these settings (all shards)
    rows = []
    for run_json in sorted(out.glob("*/run.json")):
        try:
            rec = json.loads(run_json.read_text())
        except (OSError, ValueError):
            continue
        if rec.get("fingerprint") != fp or not rec.get("metrics"):
            continue
        m = rec["metrics"]
        rows.append({"case": run_json.parent.name, "method": rec["method"]["name"], "psnr": m["psnr"],
                     "ssim": m["ssim"], "nmse": m["nmse"],
                     "seconds": rec["timings_seconds"].get("reconstruct", float("nan"))})
    if rows:
        write_text(out / "metrics.csv", metrics_csv_text(rows))
    i, n = shard
    write_json(out / f"shard-{i}-of-{n}.json", {"manifest": str(args.manifest), "shard": [i, n],
                                                "done": done, "skipped": skipped, "failed": failed,
                                                "fingerprint": fp})
    log(f"shard {i}/{n}: {len(done)} done, {len(skipped)} skipped, {len(failed)} failed")
    return 1 if failed else 0


# ---------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------
@dataclass
class CaseResult:
    name: str
    truth: Any = None
    recons: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    sigma_y: float = 0.0


class Comparison:
    """Shared state of a comparison: methods, priors and cached operators."""

    def __init__(self, task, args, runs: list[MethodRun], device, log, progress=False):
        self.task, self.args, self.runs, self.device, self.log = task, args, runs, device, log
        self.priors = PriorCache(device)
        self.any_score = any(r.score for r in runs)
        self._ops: dict = {}
        self.progress = progress

    def prior_for(self, source):
        if not self.any_score:
            return None, None
        name = self.args.prior or self.task.default_prior(source, getattr(self.args, "units", "auto"))
        p = self.priors.get(name)
        p._recon_source = str(name)
        return p, name

    def operator(self, size):
        if size not in self._ops:
            self._ops[size] = self.task.build_operator(self.args, size, self.device)
        return self._ops[size]

    def run_case(self, name: str, source) -> CaseResult:
        from recon.preprocess import CT_WINDOW
        from recon.tasks import parse_window

        args = self.args
        res = CaseResult(name)
        prior, _ = self.prior_for(source)
        window = parse_window(getattr(args, "window", None)) or \
            (prior.window if prior is not None and prior.window else None) or CT_WINDOW
        size = args.size or (prior.image_size if prior is not None else None)
        truth = self.task.prepare(source, size, window, getattr(args, "units", "auto"), getattr(args, "fov", None))
        op = self.operator(truth.size)
        gen = torch.Generator(device=self.device).manual_seed(args.seed)
        meas = self.task.simulate(truth, op, args, gen)  # ONE measurement shared by all methods
        res.truth, res.sigma_y = truth, meas.sigma_y
        for run in self.runs:
            try:
                img, _, seconds, _ = run_method(run, meas, prior=prior, seed=args.seed,
                                                samples=args.samples if run.score else 1,
                                                progress=self.progress)
                m = compute_metrics(img, truth.x)
            except Exception as e:  # noqa: BLE001 - a failing method must not stop the comparison
                if args.debug:
                    raise
                msg = str(e) if isinstance(e, ReconError) else short(e)
                res.failures.append({"method": run.name, "error": msg})
                print(f"recon compare: {name}: {run.name}: error: {msg}", file=sys.stderr)
                continue
            res.recons[run.name] = np.clip(img, 0, 1)
            res.metrics[run.name] = m
            res.rows.append({"case": name, "method": run.name, **m, "seconds": seconds})
            self.log(f"{name}: {run.name}: PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f} ({seconds:.2f} s)")
        return res


def _acq_summary(task, args) -> str:
    acq = {k: v for k, v in task.acquisition(args).items() if v is not None}
    return ", ".join(f"{k}={v}" for k, v in acq.items())


def save_case_figure(res: CaseResult, path: Path, title: str):
    from recon.figures import save_comparison

    save_comparison(res.truth.x, res.recons, res.metrics, path, title=title)


def run_compare(args, log) -> int:
    from recon.io import discover_cases
    from recon.tasks import TASKS, source_from_case

    task = TASKS[args.task]
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    runs = plan_methods(names, task, parse_params(args.param), noisy=_noisy(args))
    shard = parse_shard(args.shard)
    if args.max_cases is not None and args.max_cases < 1:
        raise ReconError(f"--max-cases must be >= 1, got {args.max_cases}")
    if args.samples < 1:
        raise ReconError(f"--samples must be >= 1, got {args.samples}")
    if bool(args.manifest) == bool(args.data):
        raise ReconError("give exactly one of --data DIR or --manifest FILE")
    device = resolve_device(args.device)
    out = Path(args.out)
    data_roots = [Path(args.data)] if args.data else []
    entries = []
    if args.manifest:
        entries = select_shard(read_manifest(args.manifest), shard)
    folder = OutputFolder(out, reserved=("metrics.csv", "summary.md", "figures", "cases"),
                          inputs=[e for _, e in entries],
                          contain_forbidden=[r for r in data_roots + [Path(e) for _, e in entries] if r.is_dir()],
                          staged=False)
    folder.prepare()
    try:
        # discover cases: (name, Case)
        cases = []
        if args.data:
            found = discover_cases(args.data, slices=args.slices)
            if not found:
                raise ReconError(f"{args.data}: no cases found (DICOM series, NIfTI volumes, PNG/JPEG/TIFF "
                                 "images or 2-D .npy arrays)")
            if args.max_cases:
                found = found[:args.max_cases]
            cases = [(c.name, c) for c in select_shard(found, shard)]
        else:
            for index, entry in entries:
                try:
                    found = discover_cases(entry, slices=args.slices)
                except ReconError as e:
                    cases.append((entry_name(index, entry), e))
                    continue
                if not found:
                    cases.append((entry_name(index, entry), ReconError(f"{entry}: no cases found")))
                if args.max_cases:
                    found = found[:args.max_cases]
                cases += [(f"{index:04d}_{c.name}", c) for c in found]
    except BaseException:
        folder.abort()
        raise
    fp = fingerprint(args)
    progress = not args.quiet and sys.stderr.isatty()
    comp = Comparison(task, args, runs, device, log, progress=False)
    (out / "cases").mkdir(exist_ok=True)
    n_fail = 0
    title_acq = _acq_summary(task, args)
    case_iter = cases
    bar_ctx = progress_bar(progress, len(cases), "cases")
    with bar_ctx as bar:
        for name, case in case_iter:
            marker = out / "cases" / f"{name}.json"
            if bar is not None:
                bar.update(1)
            if not args.force and marker.is_file():
                try:
                    rec = json.loads(marker.read_text())
                    if rec.get("fingerprint") == fp and rec.get("complete"):
                        log(f"{name}: done already, skipped")
                        continue
                except (OSError, ValueError):
                    pass
            try:
                if isinstance(case, Exception):
                    raise case
                res = comp.run_case(name, source_from_case(case))
            except Exception as e:  # noqa: BLE001 - a failing case must not stop the comparison
                if args.debug:
                    raise
                msg = str(e) if isinstance(e, ReconError) else short(e)
                print(f"recon compare: {name}: error: {msg}", file=sys.stderr)
                n_fail += 1
                write_json(marker, {"case": name, "fingerprint": fp, "complete": False, "rows": [],
                                    "failures": [{"method": None, "error": msg}]})
                continue
            if res.recons:
                save_case_figure(res, out / "figures" / f"{name}.png",
                                 f"{name}: {task.name} ({title_acq})")
            n_fail += bool(res.failures)
            write_json(marker, {"case": name, "source": str(getattr(case, "source", "")), "fingerprint": fp,
                                "complete": not res.failures, "rows": res.rows, "failures": res.failures,
                                "sigma_y": res.sigma_y, "size": res.truth.size,
                                "pixel_mm": res.truth.pixel_mm, "units": res.truth.units})
    # aggregate all cases with these settings (all shards)
    rows, failures, n_cases = [], [], 0
    order = {m: k for k, m in enumerate(names)}
    for mj in sorted((out / "cases").glob("*.json")):
        try:
            rec = json.loads(mj.read_text())
        except (OSError, ValueError):
            continue
        if rec.get("fingerprint") != fp:
            continue
        n_cases += 1
        rows += rec.get("rows", [])
        failures += [{"case": rec["case"], **f} for f in rec.get("failures", [])]
    rows.sort(key=lambda r: (r["case"], order.get(r["method"], 99)))
    write_text(out / "metrics.csv", metrics_csv_text(rows))
    write_text(out / "summary.md", summary_markdown(task, args, rows, names, n_cases, failures))
    log(markdown_table(rows, names).rstrip())
    log(f"wrote {out / 'metrics.csv'} ({len(rows)} rows), {out / 'summary.md'}, figures in {out / 'figures'}")
    return 1 if n_fail else 0


def summary_markdown(task, args, rows, names, n_cases, failures) -> str:
    settings = {"task": task.name, "methods": ",".join(names), "seed": args.seed,
                "size": args.size or "native (prior's image size for score methods)",
                "slices": getattr(args, "slices", None), "prior": getattr(args, "prior", None),
                "param": " ".join(args.param or []) or None,
                "samples": (f"{args.samples} per case for score methods (their mean is scored)"
                            if args.samples > 1 else None),
                **task.acquisition(args)}
    lines = [f"# recon compare {task.name}", "",
             f"Cases: {n_cases} ({len({r['case'] for r in rows})} with results). "
             "Mean ± sample std over cases; metrics on the [0, 1] scale (data_range 1), "
             "reconstructions clipped to [0, 1]; one simulated measurement per case shared by all methods.",
             "", markdown_table(rows, names), "## Settings", ""]
    lines += [f"- {k}: {v}" for k, v in settings.items() if v is not None]
    if failures:
        lines += ["", "## Failures", ""]
        lines += [f"- {f['case']}: {f.get('method') or '(case)'}: {f['error']}" for f in failures]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------
def run_demo(args, log) -> int:
    from pydicom.data import get_testdata_file

    from recon.tasks import TASKS, load_source
    from recon.prior import resolve_prior_path

    task = TASKS["ct"]
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if any(n in ("score", "score-fast", "dps") for n in names):
        try:
            resolve_prior_path("ct")
        except ReconError:
            skipped = [n for n in names if n in ("score", "score-fast", "dps")]
            print(f"recon demo: note: the pretrained 'ct' prior (pretrained/ct.safetensors) is not shipped "
                  f"in this installation; skipping {', '.join(skipped)}", file=sys.stderr)
            names = [n for n in names if n not in skipped]
    if not names:
        raise ReconError("no method left to run")
    # the acquisition of the README: 23 parallel views, noise-free
    p = argparse.ArgumentParser()
    task.add_arguments(p)
    acq = p.parse_args(["--views", str(args.views)])
    for k, v in vars(acq).items():
        setattr(args, k, v)
    args.param, args.prior, args.size, args.task, args.samples = [], None, None, "ct", 1
    runs = plan_methods(names, task, {})
    device = resolve_device(args.device)
    path = get_testdata_file("CT_small.dcm")
    folder = OutputFolder(args.out, reserved=("demo.png", "metrics.md", "metrics.csv"), staged=True)
    with folder:
        comp = Comparison(task, args, runs, device, log, progress=not args.quiet and sys.stderr.isatty())
        res = comp.run_case("CT_small", load_source(path))
        if not res.recons:
            raise ReconError("every method failed: " + "; ".join(f"{f['method']}: {f['error']}"
                                                               for f in res.failures))
        save_case_figure(res, folder.stage / "demo.png",
                         f"pydicom CT_small.dcm, {args.views} parallel views, noise-free")
        table = markdown_table(res.rows, [n for n in names if n in res.recons])
        header = (f"# recon demo\n\npydicom's CT_small.dcm ({res.truth.size}x{res.truth.size}), {args.views} "
                  "parallel-beam views, noise-free; HU window [-1000, 1000] -> [0, 1].\n\n")
        write_text(folder.stage / "metrics.md", header + table)
        write_text(folder.stage / "metrics.csv", metrics_csv_text(res.rows))
    print(table, end="")
    log(f"wrote {Path(args.out) / 'demo.png'}, metrics.md, metrics.csv")
    return 1 if res.failures else 0
