"""Comparing methods over many cases: ``recon compare`` and ``recon demo``.

Every discovered case gets ONE simulated measurement (seeded by ``--seed``)
shared by all methods; ``metrics.csv`` (columns exactly
``case,method,psnr,ssim,nmse,seconds``), ``summary.md`` and
``figures/CASE.png``.  Metrics are computed on the [0, 1] working scale with
``data_range = 1``; reconstructions are clipped to [0, 1] first (MRI: the
magnitude).  A failing method or case is logged and the run goes on; the exit
status is 1 if anything failed.  Each case writes ``cases/CASE.json`` with a
fingerprint of the settings, so a rerun (or another shard) skips it; every
run rewrites the aggregated table from all records present.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from recon.errors import ReconError
from recon.execute import known_pixel_mm
from recon.execute import PriorCache, RunSettings, check_memory, check_samples, plan_methods, progress_bar, \
    run_method, working_window_and_size
from recon.io._util import short
from recon.outputs import (OutputFolder, entry_name, fingerprint, markdown_table, metrics_csv_text, parse_shard,
                           read_manifest, select_shard, write_json, write_text)

__all__ = ["CaseResult", "Comparison", "run_compare", "run_demo", "summary_markdown"]


@dataclass
class CaseResult:
    name: str
    truth: Any = None
    recons: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    sigma_y: float = 0.0
    ood: dict | None = None


class Comparison:
    """Methods, priors and cached operators shared by the cases of one comparison."""

    def __init__(self, task, acq, settings: RunSettings, log: Callable[[str], None] = print,
                 method_progress: bool = False):
        self.task, self.acq, self.settings, self.log = task, acq, settings, log
        self.method_progress = method_progress
        self.runs = plan_methods(list(settings.methods), task, settings.params, noisy=acq.noisy)
        check_samples(settings.samples, self.runs)
        self.priors = PriorCache(settings.device)
        self.any_score = any(r.score for r in self.runs)
        self._ops: dict = {}
        self._warned: set = set()
        # checks that would fail every case: once, up front, before any output
        if self.any_score and settings.prior:
            from recon.prior import resolve_prior_path

            resolve_prior_path(settings.prior)
        if settings.size is not None:
            check_memory(settings.size, samples=settings.samples)

    def prior_for(self, source):
        if not self.any_score:
            return None, None
        name = self.settings.prior or self.task.default_prior(source, getattr(self.acq, "units", "auto"))
        p = self.priors.get(name)
        p._recon_source = str(name)
        return p, name

    def operator(self, size):
        if size not in self._ops:
            self._ops[size] = self.acq.operator(size, self.settings.device, seed=self.settings.seed)
        return self._ops[size]

    def run_case(self, name: str, source) -> CaseResult:
        s = self.settings
        res = CaseResult(name)
        self.task.check_source(source, s.force_modality)
        prior, _ = self.prior_for(source)
        window, size = working_window_and_size(self.acq, s.size, prior)
        check_memory(size if size is not None else min(source.image.shape[-2:]), samples=s.samples,
                     native=size is None)
        truth = self.task.prepare(source, size, window, getattr(self.acq, "units", "auto"),
                                  getattr(self.acq, "fov", None))
        # ONE measurement shared by all methods
        meas = self.task.simulate(truth, self.acq, s.device, seed=s.seed, op=self.operator(truth.shape))
        res.truth, res.sigma_y = truth, meas.sigma_y
        if prior is not None:
            from recon.ood import report_for_run

            res.ood = report_for_run(prior, np.clip(truth.x[0] if truth.x.ndim == 3 else truth.x, 0, 1), "input image")
        for w in self.task.measurement_warnings(self.acq, meas):
            if w not in self._warned:  # the same acquisition warns once, not once per case
                self._warned.add(w)
                print(f"recon compare: warning: {w}", file=sys.stderr)
        for run in self.runs:
            try:
                img, _, seconds, _ = run_method(run, meas, prior=prior, seed=s.seed,
                                                samples=s.samples if run.method.stochastic else 1,
                                                progress=self.method_progress, task=self.task.name,
                                                pixel_mm=known_pixel_mm(truth, self.acq))
                from recon.metrics import compute_metrics

                m = compute_metrics(img, truth.x)
                m.update(self.task.extra_metrics(img, truth))
            except Exception as e:  # noqa: BLE001 - a failing method must not stop the comparison
                if s.debug:
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


def _acq_summary(acq) -> str:
    return ", ".join(f"{k}={v}" for k, v in acq.describe().items() if v is not None)


def figure_window(truth) -> tuple[float, float, str]:
    """Display window of a case's figure on the [0, 1] scale, and its name: CT (HU) in the
    clinical window of its DICOM BodyPartExamined (brain for heads, lung for the chest, else
    soft tissue), as a radiologist reads it; other images on [0, 1]."""
    from recon.metrics import CLINICAL_WINDOWS, clinical_windows_of

    if truth.units != "HU":
        return 0.0, 1.0, ""
    name = clinical_windows_of(getattr(truth.source, "reference", None))[0]
    lo, hi = CLINICAL_WINDOWS[name]
    wlo, whi = truth.window
    return (lo - wlo) / (whi - wlo), (hi - wlo) / (whi - wlo), f"{name} window [{lo:g}, {hi:g}] HU"


def save_case_figure(res: CaseResult, path: Path, title: str):
    from recon.figures import save_comparison

    vmin, vmax, shown = figure_window(res.truth)
    save_comparison(res.truth.x, res.recons, res.metrics, path, title=f"{title}; {shown}" if shown else title,
                    vmin=vmin, vmax=vmax)


def _discover(data, manifest_entries, slices, max_cases, shard):
    """``[(name, Case | ReconError)]`` from ``--data`` or the manifest's entries."""
    from recon.io import discover_cases

    cases = []
    if data:
        found = discover_cases(data, slices=slices)
        if not found:
            raise ReconError(f"{data}: no cases found (DICOM series, NIfTI volumes, PNG/JPEG/TIFF "
                             "images or 2-D .npy arrays)")
        if max_cases:
            found = found[:max_cases]
        return [(c.name, c) for c in select_shard(found, shard)]
    for index, entry in manifest_entries:
        try:
            found = discover_cases(entry, slices=slices)
        except ReconError as e:
            cases.append((entry_name(index, entry), e))
            continue
        if not found:
            cases.append((entry_name(index, entry), ReconError(f"{entry}: no cases found")))
        if max_cases:
            found = found[:max_cases]
        cases += [(f"{index:04d}_{c.name}", c) for c in found]
    return cases


def run_compare(task, acq, settings: RunSettings, out, log: Callable[[str], None] = print, *,
                data: str | None = None, manifest: str | None = None, slices: str = "middle",
                max_cases: int | None = None, shard: str | None = None) -> int:
    """``recon compare TASK``: every case under ``data`` (or listed in ``manifest``)."""
    from recon.case import source_from_case

    comp = Comparison(task, acq, settings, log)
    shard_ = parse_shard(shard)
    if max_cases is not None and max_cases < 1:
        raise ReconError(f"--max-cases must be >= 1, got {max_cases}")
    if bool(manifest) == bool(data):
        raise ReconError("give exactly one of --data DIR or --manifest FILE")
    out = Path(out)
    data_roots = [Path(data)] if data else []
    entries = select_shard(read_manifest(manifest), shard_) if manifest else []
    for _, e in entries:
        if " --slices " in e:
            raise ReconError(f"{manifest}: a line's own --slices range ({e}) is for recon ct/mri; recon compare "
                             "takes --slices middle|all|every:K for every line")
    folder = OutputFolder(out, reserved=("metrics.csv", "summary.md", "figures", "cases"),
                          inputs=[e for _, e in entries],
                          contain_forbidden=[r for r in data_roots + [Path(e) for _, e in entries] if r.is_dir()],
                          staged=False)
    folder.prepare()
    try:
        cases = _discover(data, entries, slices, max_cases, shard_)
    except BaseException:
        folder.abort()
        raise
    fp = fingerprint({"task": task.name, **acq.settings(), **settings.record(), "slices": slices})
    (out / "cases").mkdir(exist_ok=True)
    n_fail = 0
    title_acq = _acq_summary(acq)
    with progress_bar(settings.progress, len(cases), "cases") as bar:
        for name, case in cases:
            marker = out / "cases" / f"{name}.json"
            if bar is not None:
                bar.update(1)
            if not settings.force and marker.is_file():
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
                if settings.debug:
                    raise
                msg = str(e) if isinstance(e, ReconError) else short(e)
                print(f"recon compare: {name}: error: {msg}", file=sys.stderr)
                n_fail += 1
                write_json(marker, {"case": name, "fingerprint": fp, "complete": False, "rows": [],
                                    "failures": [{"method": None, "error": msg}]})
                continue
            if res.recons:
                save_case_figure(res, out / "figures" / f"{name}.png", f"{name}: {task.name} ({title_acq})")
            n_fail += bool(res.failures)
            write_json(marker, {"case": name, "source": str(getattr(case, "source", "")), "fingerprint": fp,
                                "complete": not res.failures, "rows": res.rows, "failures": res.failures,
                                "sigma_y": res.sigma_y, "size": res.truth.size,
                                "pixel_mm": res.truth.pixel_mm, "units": res.truth.units, "ood": res.ood})
    # aggregate all cases with these settings (all shards)
    names = list(settings.methods)
    rows, failures, n_cases, oods = [], [], 0, {}
    order = {m: k for k, m in enumerate(names)}
    for mj in sorted((out / "cases").glob("*.json")):
        try:
            rec = json.loads(mj.read_text())
        except (OSError, ValueError):
            continue
        if rec.get("fingerprint") != fp:
            continue
        n_cases += 1
        if rec.get("ood"):
            oods[rec["case"]] = rec["ood"]
        rows += rec.get("rows", [])
        failures += [{"case": rec["case"], **f} for f in rec.get("failures", [])]
    rows.sort(key=lambda r: (r["case"], order.get(r["method"], 99)))
    write_text(out / "metrics.csv", metrics_csv_text(rows))
    write_text(out / "summary.md", summary_markdown(task, acq, settings, rows, n_cases, failures, slices, oods))
    flagged = sorted(c for c, o in oods.items() if o.get("available") and not o["in_distribution"])
    if flagged:
        print(f"recon compare: warning: {len(flagged)} of {len(oods)} case(s) are out of distribution for the "
              f"prior (see summary.md): {', '.join(flagged[:5])}{' ...' if len(flagged) > 5 else ''}",
              file=sys.stderr)
    log(markdown_table(rows, names).rstrip())
    log(f"wrote {out / 'metrics.csv'} ({len(rows)} rows), {out / 'summary.md'}, figures in {out / 'figures'}")
    return 1 if n_fail else 0


def summary_markdown(task, acq, settings: RunSettings, rows, n_cases, failures, slices=None, oods=None) -> str:
    names = list(settings.methods)
    info = {"task": task.name, "methods": ",".join(names), "seed": settings.seed,
            "size": settings.size if settings.size is not None else "native",
            "slices": slices, "prior": settings.prior,
            "param": " ".join(settings.param_text) or None,
            "samples": (f"{settings.samples} per case for score methods (their mean is scored)"
                        if settings.samples > 1 else None),
            **acq.describe()}
    lines = [f"# recon compare {task.name}", "",
             f"Cases: {n_cases} ({len({r['case'] for r in rows})} with results). "
             "Mean ± sample std over cases; metrics on the [0, 1] scale (data_range 1), "
             "reconstructions clipped to [0, 1]; one simulated measurement per case shared by all methods.",
             "", markdown_table(rows, names), "## Settings", ""]
    lines += [f"- {k}: {v}" for k, v in info.items() if v is not None]
    if oods:
        lines += ["", "## Out-of-distribution check of the inputs (score prior, `recon.ood`)", ""]
        avail = {c: o for c, o in oods.items() if o.get("available")}
        if avail:
            ref = next(iter(avail.values()))
            lines += [f"Reference: {ref['reference']}; threshold {ref['threshold']:.2f}.", "",
                      "| case | distance | verdict |", "|---|---|---|"]
            lines += [f"| {c} | {o['distance']:.2f} | {'in distribution' if o['in_distribution'] else '**OUT**'} |"
                      for c, o in sorted(avail.items())]
        missing = sorted(c for c, o in oods.items() if not o.get("available"))
        if missing:
            lines += ["", f"Not checked ({len(missing)} case(s)): {oods[missing[0]]['why']}"]
    if failures:
        lines += ["", "## Failures", ""]
        lines += [f"- {f['case']}: {f.get('method') or '(case)'}: {f['error']}" for f in failures]
    return "\n".join(lines) + "\n"


def run_demo(settings: RunSettings, out, log: Callable[[str], None] = print, views: int = 23) -> int:
    """``recon demo``: pydicom's CT_small.dcm, ``views`` parallel views, noise-free."""
    from pydicom.data import get_testdata_file

    from recon.acquisition import CTAcquisition
    from recon.case import load_source
    from recon.methods import get_method
    from recon.prior import resolve_prior_path
    from recon.tasks import TASKS

    names = list(settings.methods)
    scored = [n for n in names if get_method(n).needs_prior]
    if scored:
        try:
            resolve_prior_path("ct")
        except ReconError:
            print(f"recon demo: note: the pretrained 'ct' prior (pretrained/ct.safetensors) is not shipped "
                  f"in this installation; skipping {', '.join(scored)}", file=sys.stderr)
            names = [n for n in names if n not in scored]
    if not names:
        raise ReconError("no method left to run")
    settings = RunSettings(methods=names, seed=settings.seed, device=settings.device, progress=settings.progress,
                           debug=settings.debug)
    acq = CTAcquisition(views=views)  # the acquisition of the README: parallel views, noise-free
    folder = OutputFolder(out, reserved=("demo.png", "metrics.md", "metrics.csv"), staged=True)
    with folder:
        comp = Comparison(TASKS["ct"], acq, settings, log, method_progress=settings.progress)
        res = comp.run_case("CT_small", load_source(get_testdata_file("CT_small.dcm")))
        if not res.recons:
            raise ReconError("every method failed: " + "; ".join(f"{f['method']}: {f['error']}"
                                                               for f in res.failures))
        save_case_figure(res, folder.stage / "demo.png", f"pydicom CT_small.dcm, {views} parallel views, noise-free")
        table = markdown_table(res.rows, [n for n in names if n in res.recons])
        header = (f"# recon demo\n\npydicom's CT_small.dcm ({res.truth.size}x{res.truth.size}), {views} "
                  "parallel-beam views, noise-free; HU window [-1000, 1000] -> [0, 1].\n\n")
        write_text(folder.stage / "metrics.md", header + table)
        write_text(folder.stage / "metrics.csv", metrics_csv_text(res.rows))
    print(table, end="")
    log(f"wrote {Path(out) / 'demo.png'}, metrics.md, metrics.csv")
    return 1 if res.failures else 0
