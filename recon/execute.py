"""Running planned methods on a measurement: options, priors, timing, progress.

* :class:`RunSettings` -- the method side of a run (methods, ``--param``
  options, prior, working size, posterior samples, seed, device, progress),
  shared by ``recon ct|mri|inpaint``, ``recon compare`` and ``recon demo``.
* :func:`plan_methods` -- method names -> :class:`MethodRun` (registry entry
  + task defaults + user options), every check done before any work.
* :func:`run_method` -- one method on one :class:`forward_models.Measurement`.
* :func:`working_window_and_size` -- the one rule for the HU window and the
  working size (option > prior > default).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from recon.device import synchronize
from recon.errors import ReconError

__all__ = ["RunSettings", "MethodRun", "PriorCache", "parse_value", "parse_params", "plan_methods",
           "run_method", "check_samples", "working_window_and_size", "progress_bar", "check_option_values",
           "check_memory"]


@dataclass
class RunSettings:
    """The method side of a run.  ``params`` are parsed ``--param`` options
    (``{None: {...}, 'tv': {...}}``, see :func:`parse_params`); ``param_text``
    keeps the user's strings for records."""

    methods: list
    params: dict = field(default_factory=dict)
    param_text: list = field(default_factory=list)
    prior: Any = None
    size: int | None = None
    samples: int = 1
    seed: int = 0
    device: Any = "cpu"
    progress: bool = False
    debug: bool = False
    force: bool = False
    force_modality: bool = False

    def __post_init__(self):
        if isinstance(self.methods, str):
            self.methods = [m.strip() for m in self.methods.split(",")]
        if not self.methods or any(not m for m in self.methods):
            raise ReconError(f"--methods {','.join(self.methods)!r} has an empty entry (a doubled, leading or trailing "
                             "comma); expected comma-separated method names like fbp,tv (see `recon methods`)")
        for option, value, low in (("--samples", self.samples, 1), ("--size", self.size, 4), ("--seed", self.seed, 0)):
            if value is None and option == "--size":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ReconError(f"{option} must be an integer, got {value!r}")
            if value < low:
                raise ReconError(f"{option} must be >= {low}, got {value}")

    def record(self) -> dict:
        """The settings that change results (for fingerprints and run records)."""
        return {"methods": list(self.methods), "param": list(self.param_text), "prior": self.prior,
                "size": self.size, "samples": self.samples, "seed": self.seed}


def check_samples(samples: int, runs) -> None:
    """``--samples K > 1`` needs stochastic methods (registry metadata)."""
    if samples < 1:
        raise ReconError(f"--samples must be >= 1, got {samples}")
    fixed = [r.name for r in runs if not r.method.stochastic]
    if samples > 1 and len(fixed) == len(list(runs)):
        from recon.methods import METHODS

        names = ", ".join(sorted(n for n, m in METHODS.items() if m.stochastic))
        raise ReconError(f"--samples {samples}: method '{fixed[0]}' is deterministic; posterior samples need "
                         f"a sampling method ({names})")


def working_window_and_size(acq, size: int | None, prior) -> tuple[tuple, int | None]:
    """HU window: the acquisition's ``--window``, else the prior's, else [-1000, 1000];
    working size: ``--size``, else native (None) -- score methods too: they apply the prior
    at its own pixel scale inside (:mod:`recon.multiscale`)."""
    from recon.preprocess import CT_WINDOW

    window = getattr(acq, "window", None) or (prior.window if prior is not None and prior.window else None) \
        or CT_WINDOW
    return tuple(window), size


def known_pixel_mm(truth, acq=None, size: int | None = None) -> float | None:
    """The working pixel size in mm when it is known (``--fov``, or the input's spacing), else None.
    Without a ground truth (measured data) ``size`` is the working size the field of view spans."""
    fov = getattr(acq, "fov", None)
    size = truth.size if truth is not None else size
    if fov and size:
        return float(fov) / size
    return truth.pixel_mm if truth is not None and truth.source.dx else None


# ---------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------
#: bytes per working pixel: the image, the measurement, a method's iterates and duals
#: (TV keeps about ten image-sized arrays, complex for MRI) and the outputs, with margin
BYTES_PER_PIXEL = 128


def available_memory() -> int | None:
    """Bytes of memory available now (``MemAvailable`` of /proc/meminfo, else the free
    physical pages), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.3g} GiB" if n < 2 ** 40 else f"{n / 2 ** 40:.3g} TiB"


def check_memory(size: int, *, samples: int = 1, slices: int = 1, native: bool = False,
                 available: int | None = None) -> None:
    """Refuse, before allocating, a working size whose arrays would not fit in memory
    (an estimate: ``size**2 * BYTES_PER_PIXEL`` per slice and posterior sample)."""
    need = int(size) ** 2 * BYTES_PER_PIXEL * max(1, int(samples)) * max(1, int(slices))
    have = available_memory() if available is None else available
    if have is None or need <= have:
        return
    what = (f"the native working size {size}x{size}" if native else f"--size {size}")
    extra = f" with --samples {samples}" if samples > 1 else ""
    raise ReconError(f"{what}{extra} needs about {_gib(need)} of memory but about {_gib(have)} is available; "
                     f"use a smaller --size (e.g. 256 or 512){' or fewer --samples' if samples > 1 else ''}")


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
@dataclass
class MethodRun:
    name: str
    method: Any          # recon.methods.Method
    options: dict        # task defaults + user --param

    @property
    def score(self) -> bool:
        """Needs a score prior (the registry's metadata)."""
        return self.method.needs_prior

    def accepts(self, key: str) -> bool:
        """Whether the method's signature names ``key`` (open ``**options`` signatures do not count:
        automatic options such as ``sigma_y`` are only passed to methods that declare them)."""
        opts = self.method.options()
        return opts is not None and key in opts


def plan_methods(names: list[str], task, params: dict, noisy: bool = False) -> list[MethodRun]:
    """Resolve method names (unknown -> ReconError listing the available ones) and their options.

    ``noisy`` selects the task's defaults tuned for noisy measurements.  Methods
    that do not apply to the task (registry metadata ``tasks``) are refused here,
    before any work."""
    from recon.methods import METHODS, get_method

    if not names:
        raise ReconError("no method given")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ReconError(f"method(s) listed twice: {', '.join(dup)}")
    methods = [(n, get_method(n)) for n in names]
    for n, m in methods:
        if task.name not in m.tasks:
            fits = sorted(k for k, v in METHODS.items() if task.name in v.tasks)
            raise ReconError(f"method '{n}' does not apply to {task.name} (it applies to "
                             f"{', '.join(m.tasks)}); methods for {task.name}: {', '.join(fits)}")
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
        runs.append(MethodRun(n, m, opts))
    unused = sorted(set(params.get(None, {})) - used)
    if unused:
        raise ReconError(f"--param {', '.join(unused)}: not accepted by any of {', '.join(names)}")
    for r in runs:  # validate option names and types now, before any work
        accepted = r.method.options()
        if accepted is not None:
            bad = sorted(set(r.options) - set(accepted))
            if bad:
                raise ReconError(f"method '{r.name}': unknown option(s) {', '.join(bad)}; accepted "
                                 f"options: {', '.join(accepted)}")
        r.options = check_option_values(r.name, r.method, r.options)
    return runs


_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a text value"}


def _option_kind(param):
    """The type an option takes, from its default (int, float, bool, str) or, for a None
    default, from its annotation (``int | None`` -> int); None when unknown."""
    import re

    d = param.default
    if d is not param.empty and d is not None:
        for kind in (bool, int, float, str):
            if isinstance(d, kind):
                return kind
        return None
    ann = param.annotation
    if ann is param.empty:
        return None
    text = ann if isinstance(ann, str) else str(ann)
    for word, kind in (("bool", bool), ("float", float), ("int", int)):
        if re.search(rf"\b{word}\b", text):
            return kind
    return None


def check_option_values(name: str, method, options: dict) -> dict:
    """Options of ``method`` with their types checked against its signature's defaults
    (a number for a numeric option, true/false for a flag, text for a text option;
    integral floats become ints).  Ranges are the methods' own checks
    (:data:`recon.baselines.OPTION_RULES`), made when they run."""
    sig = getattr(method, "_sig", None)
    params = sig.parameters if sig is not None else {}
    out = {}
    for key, value in options.items():
        kind = _option_kind(params[key]) if key in params else None
        if kind is not None:
            has_default = params[key].default is not params[key].empty and params[key].default is not None
            bad = ReconError(f"method '{name}': option {key} expects {_KIND_WORDS[kind]}, got {value!r}")
            if value is None:
                if has_default:
                    raise bad
            elif kind is bool:
                if not isinstance(value, bool):
                    raise bad
            elif kind is str:
                if not isinstance(value, str):
                    raise bad
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad
            elif kind is int:
                if not math.isfinite(float(value)) or float(value) != int(value):
                    raise bad
                value = int(value)
            else:
                value = float(value)
        out[key] = value
    return out


class PriorCache:
    """Load each prior once (by name or path)."""

    def __init__(self, device):
        self.device, self._cache = device, {}

    def get(self, name):
        if name not in self._cache:
            from recon.prior import load_prior

            self._cache[name] = load_prior(name, device=self.device)
        return self._cache[name]


def run_prior(run: MethodRun, settings, task, acq, source=None):
    """The prior a score method ``run`` uses and its name (``--prior``, else the task's default
    for ``source``), loaded once per device: ``(prior, name)``; ``(None, None)`` for other methods."""
    if not run.score:
        return None, None
    name = settings.prior or task.default_prior(source, getattr(acq, "units", "auto"))
    prior = PriorCache(settings.device).get(name)
    prior._recon_source = str(name)
    return prior, name


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


def run_method(run: MethodRun, meas, *, prior=None, seed: int = 0, samples: int = 1,
               progress: bool = False, task: str | None = None, pixel_mm: float | None = None,
               stack: bool = False):
    """Run one method on a measurement.

    Returns ``(image, std, seconds, options)``: ``image`` the real 2-D
    reconstruction of the first batch item, or with ``stack=True`` every item
    ``(B, H, W)`` (magnitude for complex methods; the posterior mean when
    ``samples > 1``), ``std`` the per-pixel std of the samples or ``None``,
    ``options`` the JSON-able options actually passed.  ``task`` is passed to
    methods that take it (the score methods' per-task defaults), and so is
    ``pixel_mm`` when known (the scale between the data and the prior).
    """
    from recon.score_methods import sample_posterior

    opts = dict(run.options)
    if run.score and "prior" not in opts:
        if prior is None:
            raise ReconError(f"method '{run.name}' needs a prior (--prior NAME or PATH)")
        opts["prior"] = prior
    if task is not None and run.accepts("task") and "task" not in opts:
        opts["task"] = task
    if pixel_mm is not None and run.accepts("pixel_mm") and "pixel_mm" not in opts:
        opts["pixel_mm"] = float(pixel_mm)
    if run.accepts("sigma_y") and "sigma_y" not in opts:
        opts["sigma_y"] = float(meas.sigma_y)
    if run.accepts("seed") and "seed" not in opts and "generator" not in opts:
        opts["seed"] = int(seed)
    check_samples(samples, [run])
    total = opts.get("n_iter") or opts.get("n_steps") or _signature_default(run.method, "n_iter") \
        or _signature_default(run.method, "n_steps")
    recorded = {k: (v if isinstance(v, (int, float, str, bool, type(None), tuple, list))
                    else getattr(v, "meta", {}).get("name", type(v).__name__))
                for k, v in opts.items()}
    if "prior" in recorded and not isinstance(opts.get("prior"), str):
        recorded["prior"] = getattr(opts["prior"], "_recon_source", recorded["prior"])
    device = meas.y.device
    with progress_bar(progress and run.accepts("callback") and "callback" not in opts, total, run.name) as bar:
        if bar is not None:
            opts["callback"] = lambda i, x: bar.update(1)
        synchronize(device)
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
        synchronize(device)
        seconds = time.perf_counter() - t0
    pick = slice(None) if stack else 0
    img = mean.detach().reshape(mean.shape[0], *mean.shape[-2:])[pick].float().cpu().numpy()
    if not np.all(np.isfinite(img)):
        raise ReconError(f"method '{run.name}' produced NaN or infinite values; try other options "
                         "(e.g. --param n_iter=..., lam=...)")
    sd = None if std is None else std.detach().reshape(std.shape[0], *std.shape[-2:])[pick].float().cpu().numpy()
    return img, sd, seconds, recorded


# ---------------------------------------------------------------------------
# run records (shared by recon.single and recon.volume)
# ---------------------------------------------------------------------------
def noise_text(info: dict) -> str:
    model = info.get("model")
    text = {"none": "noise-free", "poisson": f"Poisson noise, I0={info.get('I0')}",
            "gaussian": f"Gaussian noise {info.get('relative_sigma')} x RMS",
            "measured": "measured data"}.get(model, str(model))
    if info.get("acceleration"):
        text += f", acceleration {info['acceleration']:.3g}x"
    return text


def std_calibration(prior, task: str, method: str) -> dict | None:
    """The prior's measured calibration of the posterior std for ``task``/``method``, if any
    (``meta['std_calibration'][task][method] = {'scale': c, 'conditions': {...}, ...}``,
    ``recon bench calibration``)."""
    table = (getattr(prior, "meta", {}) or {}).get("std_calibration", {}) if prior is not None else {}
    entry = table.get(task, {}).get(method)
    return dict(entry) if entry and entry.get("scale") else None


#: the settings a std calibration tolerates within a factor (:data:`CALIBRATION_RANGE` either way);
#: every other setting must be equal
CALIBRATION_RANGED = ("views", "accel", "image_px")
CALIBRATION_RANGE = 1.5


def image_side(image) -> int:
    """The larger side, in pixels, of an image ``(..., H, W)``."""
    return int(max(np.shape(image)[-2:]))


def calibration_conditions(acq, image) -> dict:
    """The settings that decide whether a std calibration carries to a run: the acquisition's
    ``describe()`` (which lists a setting only when it is not at its default), whether the data
    were measured, and the side of the working image (``(..., H, W)``)."""
    return {**acq.describe(), "measured": bool(getattr(acq, "measured", None)), "image_px": image_side(image)}


def calibration_applies(entry: dict, run: dict) -> str | None:
    """``None`` when the std calibration ``entry`` may be applied to a run with the settings ``run``
    (:func:`calibration_conditions`); otherwise why not.  ``entry['conditions']`` are the settings
    it was fitted at: views, acceleration and image side must lie within
    :data:`CALIBRATION_RANGE` x of them, every other setting must be equal, and a setting that only
    one side lists counts as unset on the other.  A scale fitted at 23 views and 128 px covered
    97 % of the errors there but 36 % at 8 views and 512 px (README, "Posterior uncertainty"), so
    it is not carried across settings.  Entries without conditions (written before they were
    recorded) apply as they are."""
    conditions = entry.get("conditions")
    if not conditions:
        return None
    keys = sorted(set(conditions) | set(run), key=lambda k: (k != "measured", k))
    for key in keys:
        fitted, got = conditions.get(key), run.get(key)
        if got == fitted or (fitted in (None, False) and got in (None, False)):  # False: a flag's default
            continue
        if key in CALIBRATION_RANGED and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                                             for v in (fitted, got)):
            if max(got / fitted, fitted / got) <= CALIBRATION_RANGE:
                continue
        fitted_at = ", ".join(f"{k} {v}" for k, v in conditions.items() if v is not None)
        here = "not set" if got is None else got
        return (f"{key} is {here} here, {'unset' if fitted is None else fitted} in the fit; the std "
                f"calibration (x{entry['scale']:g}) was fitted at {fitted_at} (views, acceleration and image "
                f"side within {CALIBRATION_RANGE:g}x apply, every other setting must match)")
    return None


def warn(task, message: str) -> None:
    """A warning on stderr (shown even with --quiet: it changes how results should be read)."""
    print(f"recon {task.name}: warning: {message}", file=sys.stderr)


def run_fingerprint(task, acq, settings: RunSettings, inputs) -> str:
    """Hash of what changes a run's results (``inputs``: a :class:`recon.single.Inputs`)."""
    from recon.outputs import fingerprint

    acq_settings = {k: v for k, v in acq.settings().items() if k not in ("sinogram", "kspace")}
    return fingerprint({"task": task.name, **acq_settings, **settings.record(), "series": inputs.series,
                        "slice": inputs.slice, "slices": inputs.slices, "batch": inputs.batch})


def protected_inputs(acq, inputs) -> list[str]:
    """Input files a run must never overwrite."""
    paths = [inputs.path, getattr(acq, "sinogram", None), getattr(acq, "kspace", None),
             getattr(acq, "mask_file", None), getattr(acq, "angles", None), getattr(acq, "flat", None),
             getattr(acq, "dark", None)]
    return [p for p in paths + [reference_file(acq)] if p]


def reference_file(acq):
    """The ``--reference`` file an acquisition names, or None: CT's ``--reference full[:METHOD]``
    names no file (a file may still be called ``full_dose.nii.gz``)."""
    reference = getattr(acq, "reference", None)
    text = str(reference or "")
    return None if not reference or text == "full" or text.startswith("full:") else reference


def prepare_truth(task, acq, source, size, window, log):
    """The ground truth on the working scale and the acquisition fitted to it (CT: the scanner's
    fan-beam geometry), the note about that logged: ``(truth, acq, note)``."""
    truth = task.prepare(source, size, window, getattr(acq, "units", "auto"), getattr(acq, "fov", None))
    acq, note = task.acquisition_for(acq, truth)
    if note:
        log(note)
    return truth, acq, note


def ood_check(task, prior, image, what: str, warnings: list) -> dict | None:
    """The out-of-distribution report of ``image`` (``what`` names it) for ``prior``
    (:mod:`recon.ood`); a warning on stderr, also appended to ``warnings``, when it is out."""
    if prior is None:
        return None
    from recon.ood import report_for_run

    ood = report_for_run(prior, np.clip(image, 0, 1), what)
    if ood.get("available") and not ood["in_distribution"]:
        text = (f"the {ood['checked']} is out of distribution for the prior: distance "
                f"{ood['distance']:.2f} > threshold {ood['threshold']:.2f} ({ood['reference']}); "
                "the prior may hallucinate or smooth what it has not seen -- compare with a baseline")
        warn(task, text)
        warnings.append(text)
    return ood


def record_head(task, settings: RunSettings, input_text: str) -> dict:
    """The first fields of every ``run.json``: command, argv, versions, seed, device, input."""
    from recon.outputs import versions

    return {"command": f"recon {task.name}", "argv": list(sys.argv), "versions": versions(),
            "seed": settings.seed, "device": str(settings.device), "input": input_text}


def write_std_maps(stage, std, shown, prior, task, method: str, acq,
                   warnings: list) -> tuple[list[str], dict | None]:
    """``std.npy`` (the posterior std on the working scale), ``std.png`` (of ``shown``: the
    image, or one slice of a volume) and, when ``prior`` carries a measured calibration for
    ``task``/``method`` that :func:`calibration_applies` to this run (``acq`` at the size of
    ``std``), ``std_calibrated.npy``.  Returns the names written and the calibration (with
    ``applied`` and, when not applied, ``not_applied`` saying why, also added to ``warnings``)."""
    from recon.io import write_npy, write_png

    write_npy(std, stage / "std.npy")
    write_png(shown, stage / "std.png", vmin=0.0, vmax=max(float(std.max()), 1e-12))
    written = ["std.npy", "std.png"]
    scale = std_calibration(prior, task.name, method)
    if scale is None:
        return written, None
    run = calibration_conditions(acq, std)
    why = calibration_applies(scale, run)
    scale["applied"] = why is None
    if why is None:  # the raw std is too narrow: scaled so +-2 std covers 95 % (README)
        write_npy(std * scale["scale"], stage / "std_calibrated.npy")
        written.append("std_calibrated.npy")
    else:
        scale["not_applied"] = why
        text = (f"std_calibrated.npy not written: {why}; std.npy is the spread of the samples, "
                "measured narrower than the error (README, \"Posterior uncertainty\")")
        warn(task, text)
        warnings.append(text)
    return written, scale
