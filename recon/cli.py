"""The ``recon`` command line.

Each subcommand is a pair (``add_*`` parser builder, ``run_*`` function)
registered in ``SUBCOMMANDS``.  User-facing problems raise ``ReconError`` (or
``ValueError`` from the operators, ``OSError`` from the file system): the CLI
prints one line ``recon <cmd>: error: ...`` and exits with status 2;
``--debug`` shows the traceback.  Commands that process many cases (``compare``,
``--manifest``) log failing cases, go on, and exit with status 1 at the end if
any failed.

This module is the only place that reads argparse: it declares every option
once and turns them into typed objects (:mod:`recon.acquisition`,
:class:`recon.execute.RunSettings`, :class:`recon.single.Inputs`) for the
runners (:mod:`recon.single`, :mod:`recon.compare`).  Reconstruction commands::

    recon ct INPUT --views N [--limited-angle DEG] [--geometry parallel|fan]
             [--photons I0 | --noise SIGMA] --method NAME [--param K=V ...] [--prior P]
             [--size S] [--samples K] [--series UID] [--slice I] --out DIR
    recon ct --sinogram FILE.npy [--angles FILE] [--det-spacing MM --fov MM] [--flat F [--dark D]]
             [--views N [--reference full]] [--geometry ...] --size S --method NAME --out DIR
             [--slices a:b] [--batch-slices B] [--slice-spacing MM]   (a stack: slices, views, detectors)
    recon mri INPUT --mask KIND --accel R [--center-fraction F] --method NAME --out DIR
    recon mri --kspace FILE [--mask KIND --accel R] --method NAME [--slices a:b] --out DIR
    recon inpaint INPUT --mask box|random|strokes [--box-fraction F] [--keep-ratio P]
             [--strokes N] --method NAME --out DIR
    recon compare ct|mri|inpaint (--data DIR | --manifest FILE) --methods m1,m2 [task options]
             [--slices middle|all] [--max-cases N] [--shard i/n] --out DIR
    recon demo [--out DIR] [--methods fbp,tv,score,score-fast]
    recon methods
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from recon.errors import ReconError


def common_options(p: argparse.ArgumentParser, out_required: bool = True):
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="compute device (default: auto)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="random seed, an integer >= 0 (default: 0)")
    p.add_argument("--out", required=out_required, help="output folder (or file where stated)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def progress_enabled(args) -> bool:
    return not args.quiet and sys.stderr.isatty()


def log(args, msg: str):
    """A progress message on stderr; ``--quiet`` silences it, except for warnings."""
    if not getattr(args, "quiet", False) or msg.startswith("WARNING"):
        print(msg, file=sys.stderr)


# ---------------------------------------------------------------------------
# number types: every numeric option of every subcommand is checked at parse time by one of
# these, in one message style: "recon ct: error: --size must be >= 4 (...), got 0" (main()
# prints argparse's ArgumentError as one line and returns 2)
# ---------------------------------------------------------------------------
def _int(text: str, minimum: int, note: str = "") -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if v < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}{note}, got {v}")
    return v


def _positive_int(text: str) -> int:
    return _int(text, 1)


def _nonneg_int(text: str) -> int:
    return _int(text, 0)


def _size(text: str) -> int:
    return _int(text, 4, " (the image side in pixels)")


def _nonneg_float(text: str) -> float:
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {v}")
    return v


def _positive_float(text: str) -> float:
    v = _nonneg_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


def _fraction(text: str) -> float:
    v = _nonneg_float(text)
    if v > 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {v}")
    return v


class _Parser(argparse.ArgumentParser):
    """Bad option values raise ``argparse.ArgumentError`` (printed by :func:`main` as one line,
    exit status 2) instead of printing the usage; subparsers inherit the class."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("exit_on_error", False)
        super().__init__(*args, **kwargs)


def _argument_error_text(e: argparse.ArgumentError) -> str:
    name, msg = e.argument_name, e.message
    if name and msg.startswith("must be"):
        return f"{name} {msg}"
    return f"argument {name}: {msg}" if name else msg


# ---------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------
def add_train(sub):
    p = sub.add_parser("train", help="train a score prior on folders of DICOM / NIfTI / PNG / JPEG images",
                       description="Train an unconditional score prior (EDM-preconditioned denoiser) on patches. "
                                   "Runs under torchrun for several processes or GPUs (only rank 0 writes).")
    p.add_argument("--data", action="append", required=True,
                   help="training folder (repeatable), or one training pack (.npz, see --pack)")
    p.add_argument("--modality", required=True, choices=["ct", "mri"])
    p.add_argument("--pack", action="store_true",
                   help="do not train: load the training set (folders resized to --size, with --window and "
                        "--full-range) into one compressed file, --out FILE.npz; --data FILE.npz then "
                        "trains on it where the folders are not, e.g. on a lent GPU (README)")
    p.add_argument("--size", type=_size, default=128, help="training image size (default 128)")
    p.add_argument("--patch", type=_size, default=64, help="patch size (default 64; = size for whole images)")
    p.add_argument("--steps", type=_positive_int, default=2000)
    p.add_argument("--batch", type=_positive_int, default=16)
    p.add_argument("--lr", type=_positive_float, default=8e-4)
    p.add_argument("--base", type=_positive_int, default=32, help="U-Net base channels")
    p.add_argument("--mults", default="1,2,4", help="channel multipliers per level")
    p.add_argument("--minutes", type=_positive_float, default=None,
                   help="stop after this wall time (checkpoint kept)")
    p.add_argument("--window", default="-1000,1000", help="CT HU window mapped to [0, 1] (default -1000,1000)")
    p.add_argument("--max-images", type=_positive_int, default=None)
    p.add_argument("--objective", default="edm", choices=["edm", "dsm", "dsm-lw", "ssm"],
                   help="edm: EDM-weighted DSM (default); dsm: continuous-time DSM on the VE SDE "
                        "(dsm-lw: likelihood weighting); ssm: sliced score matching")
    p.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    p.add_argument("--checkpoint-every", type=_positive_int, default=200)
    p.add_argument("--full-every", type=_nonneg_int, default=4,
                   help="every N-th step trains on whole images instead of patches (0: never; default 4)")
    p.add_argument("--full-noise", default="-1.2,1.2", metavar="P_MEAN,P_STD",
                   help="log-normal noise distribution of the whole-image steps (default: EDM's -1.2,1.2; "
                        "a larger mean teaches the layout decided at high noise)")
    p.add_argument("--noise", default="-1.2,1.2", metavar="P_MEAN,P_STD",
                   help="log-normal noise distribution of the patch steps (default -1.2,1.2; a detail "
                        "prior for the low noise levels: --noise=-3,1.2, with '=' as the value starts with -)")
    p.add_argument("--native", action="store_true",
                   help="train a detail prior on --patch crops at each image's own pixel size: nothing is "
                        "resized, no coordinate channels, 8 exact flips/rotations, CT at its full range; "
                        "records the training pixel size (--size and --full-every are not used)")
    p.add_argument("--full-range", action="store_true",
                   help="CT: clip below the window only, so bone and metal keep values above 1 (the scale "
                        "reconstructions use); without it the window clips at both ends")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="training steps in float32, or with the network under bfloat16 autocast (weights, "
                        "optimiser and validation stay float32); auto (default): bf16 where the device "
                        "computes it natively (CPUs with AMX or AVX512-BF16, recent GPUs), else fp32")
    common_options(p)
    return p


def _numbers(text: str, option: str, kind=float, count: int | None = None) -> tuple:
    """Comma-separated numbers of an option, or one clear error naming the option."""
    try:
        values = tuple(kind(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or (count is not None and len(values) != count):
        what = f"{count} comma-separated" if count else "comma-separated"
        raise ReconError(f"{option} takes {what} {kind.__name__} values, got {text!r}")
    return values


def run_train(args):
    from recon.train import TrainConfig, train

    if args.pack:
        return _write_train_pack(args)
    full_p_mean, full_p_std = _numbers(args.full_noise, "--full-noise", count=2)
    p_mean, p_std = _numbers(args.noise, "--noise", count=2)
    if not (p_std > 0 and full_p_std > 0):
        raise ReconError("--noise and --full-noise: P_STD must be > 0")
    cfg = TrainConfig(data=args.data, modality=args.modality, out=args.out, size=args.size, patch=args.patch,
                      steps=args.steps, batch=args.batch, lr=args.lr, base=args.base,
                      mults=_numbers(args.mults, "--mults", int), seed=args.seed, resume=args.resume,
                      minutes=args.minutes, window=_numbers(args.window, "--window", count=2),
                      max_images=args.max_images, checkpoint_every=args.checkpoint_every,
                      progress=progress_enabled(args), objective=args.objective, full_every=args.full_every,
                      full_p_mean=full_p_mean, full_p_std=full_p_std, p_mean=p_mean, p_std=p_std,
                      native=args.native, full_range=args.full_range, device=args.device,
                      precision=args.precision)
    out = train(cfg, log=lambda m: log(args, m))
    log(args, f"wrote {out}")


def _write_train_pack(args):
    from recon.train import load_image_folder, pack_file, pack_settings, write_pack

    if args.native:
        raise ReconError("--pack stores images resized to --size; --native trains on the folders")
    pack_file(args.out)  # before the folders are read
    window = _numbers(args.window, "--window", count=2)
    images, patients = load_image_folder(args.data, args.modality, args.size, window, args.max_images,
                                         args.seed, full_range=args.full_range)
    settings = pack_settings(args.modality, args.size, window, args.full_range)
    out = write_pack(args.out, images, patients, {**settings, "data": [str(d) for d in args.data],
                                                         "max_images": args.max_images, "seed": args.seed})
    log(args, f"wrote {out}: {len(images)} images of {len(set(patients))} patients at {args.size}x{args.size}, "
              f"{out.stat().st_size / 2**20:.1f} MiB")


# ---------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------
def add_sample(sub):
    p = sub.add_parser("sample", help="draw unconditional samples from a prior")
    p.add_argument("--prior", required=True, help="shipped prior name (ct, brain-mri) or path to .safetensors")
    p.add_argument("--n", type=_positive_int, default=8, help="number of samples (default 8)")
    p.add_argument("--sampler", default="pc", choices=["pc", "ode"])
    p.add_argument("--steps", type=_positive_int, default=None, help="noise levels (default: pc 500, ode 40)")
    p.add_argument("--snr", type=_nonneg_float, default=0.16, help="corrector signal-to-noise ratio (pc)")
    p.add_argument("--real", action="append", default=None,
                   help="folder of real images: show as many of them (same size, same normalisation) "
                        "in a second row of samples.png (repeatable)")
    p.add_argument("--size", default=None, metavar="H[,W]",
                   help="sample at this matrix with the multi-scale denoiser (the prior at its own scale, its "
                        "detail prior at the fine levels), as the score methods reconstruct such data; "
                        "default: the prior's own image_size. With --real, real images of exactly this "
                        "matrix are shown")
    p.add_argument("--pixel-mm", type=_positive_float, default=None, metavar="MM",
                   help="with --size: the pixel size the samples stand for (decides whether the detail "
                        "prior applies, as for data)")
    common_options(p)
    return p


def _sample_size(text):
    try:
        parts = [int(v) for v in str(text).split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 8:
        raise ReconError(f"--size must be H or H,W with both >= 8, got {text!r}")
    return (parts[0], parts[-1])


#: real images loaded by `recon sample --real` for the memorisation check (a random subset beyond)
MEMORISATION_MAX_IMAGES = 2000


def memorisation_check(samples, real, n_ref: int = 50) -> dict:
    """For a model card: the RMS distance (on the [0, 1] scale) from each sample to its nearest
    real image, against the distance from a real image to its nearest other real image (median
    over up to ``n_ref`` of them).  Samples no closer to the training images than those are to
    each other reproduce none of them."""
    import numpy as np

    s = np.asarray(samples, dtype=np.float64).reshape(len(samples), -1)
    r = np.asarray(real, dtype=np.float64).reshape(len(real), -1)
    d = np.sqrt(np.maximum((s ** 2).sum(1)[:, None] + (r ** 2).sum(1)[None] - 2 * s @ r.T, 0) / s.shape[1])
    nearest = d.min(1)
    k = min(n_ref, len(r))
    rr = np.sqrt(np.maximum((r[:k] ** 2).sum(1)[:, None] + (r ** 2).sum(1)[None] - 2 * r[:k] @ r.T, 0) / r.shape[1])
    rr[np.arange(k), np.arange(k)] = np.inf
    ref = rr.min(1) if len(r) > 1 else None
    return {"samples": int(len(s)), "real_images": int(len(r)),
            "sample_nearest": [round(float(v), 4) for v in nearest],
            "sample_nearest_index": [int(i) for i in d.argmin(1)],
            "sample_nearest_min": float(nearest.min()), "sample_nearest_max": float(nearest.max()),
            "real_nearest_median": float(np.median(ref)) if ref is not None else None,
            "real_reference_images": int(k),
            "scale": "RMS over pixels on the prior's [0, 1] scale, both clipped to [0, 1]"}


def run_sample(args):
    import torch

    from recon.prior import load_prior
    from recon.samplers import ode_sample, pc_sample
    from recon.figures import save_grid

    device = resolve_device(args.device)
    prior = load_prior(args.prior, device=device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    hw = (prior.image_size, prior.image_size) if args.size is None else _sample_size(args.size)
    model = prior
    if args.size is not None:
        from recon.multiscale import DEFAULT_PRECISION, for_data

        model = for_data(prior, hw, args.pixel_mm, precision=DEFAULT_PRECISION)
        d = model.describe()
        log(args, f"sampling {hw[0]}x{hw[1]}: {d.get('action', '')}; detail prior "
                  f"{d.get('detail_prior') or 'none'} ({d.get('detail_from') or 'not used'}); global prior "
                  f"{d.get('global_prior') or 'none'} ({d.get('global_from') or 'not used'}); network in "
                  f"{d['precision']}")
    shape = (args.n, *hw)
    sde = model.sde
    with torch.no_grad():
        if args.sampler == "pc":
            x = pc_sample(model, shape, n_steps=args.steps or 500, snr=args.snr, generator=g, device=device,
                          sde=sde)
        else:
            span = {"sigma_min": sde.sigma_min, "sigma_max": sde.sigma_max} if hasattr(sde, "sigma_max") else {}
            x = ode_sample(model, shape, n_steps=args.steps or 40, generator=g, device=device, **span)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arr = x.clamp(0, 1).cpu().numpy()
    from recon.io.images import write_npy

    write_npy(arr, out / "samples.npy")
    images, labels = [a for a in arr], None
    if args.real:
        from recon.train import load_image_folder

        if args.size is None:
            found, _ = load_image_folder(args.real, prior.meta.get("modality", "ct"), prior.image_size,
                                         prior.window or (-1000.0, 1000.0), max_images=MEMORISATION_MAX_IMAGES,
                                         seed=args.seed)
            real = [r[0].clamp(0, 1).numpy() for r in found]
        else:
            from recon.train import load_native_images

            found, _, _ = load_native_images(args.real, prior.meta.get("modality", "ct"),
                                             prior.window or (-1000.0, 1000.0), MEMORISATION_MAX_IMAGES,
                                             seed=args.seed, min_side=min(hw))
            real = [r.clamp(0, 1).numpy() for r in found if tuple(r.shape) == hw]
            if not real:
                raise ReconError(f"--real: no image of exactly {hw[0]}x{hw[1]} under {', '.join(args.real)}")
        check = {**memorisation_check(arr, real), "real_images_cap": MEMORISATION_MAX_IMAGES}
        from recon.io._util import atomic_output

        with atomic_output(out / "memorisation.json") as tmp:
            tmp.write_text(json.dumps(check, indent=2))
        ref = check["real_nearest_median"]
        log(args, f"memorisation check: RMS distance from each sample to its nearest real image "
                  f"{check['sample_nearest_min']:.3f}-{check['sample_nearest_max']:.3f}; between real images "
                  f"(median nearest other) {'n/a (one real image)' if ref is None else f'{ref:.3f}'} "
                  f"({out / 'memorisation.json'})")
        images += real[: args.n]
        labels = ["samples", "real"]
    save_grid(images, out / "samples.png", ncols=args.n, row_labels=labels)
    log(args, f"wrote {args.n} samples to {out}")


# ---------------------------------------------------------------------------
# likelihood
# ---------------------------------------------------------------------------
def add_likelihood(sub):
    p = sub.add_parser("likelihood", help="bits per dimension of an image under a prior (probability-flow ODE)")
    p.add_argument("input", help="image file (DICOM, NIfTI, PNG/JPEG, .npy)")
    p.add_argument("--prior", required=True)
    p.add_argument("--steps", type=_positive_int, default=64,
                   help="ODE steps (default 64; fewer than 16 give unreliable estimates)")
    p.add_argument("--probes", type=_positive_int, default=1, help="Hutchinson probes per step")
    common_options(p, out_required=False)
    return p


def run_likelihood(args):
    import torch

    from recon.likelihood import log_likelihood, reliability_warnings
    from recon.prior import load_prior
    from recon.preprocess import load_case_image

    device = resolve_device(args.device)
    prior = load_prior(args.prior, device=device)
    img = load_case_image(args.input, prior.meta.get("modality", "ct"), prior.image_size, prior.window)
    x = torch.as_tensor(img, device=device)[None]
    g = torch.Generator(device=device).manual_seed(args.seed)
    logp, bpd = log_likelihood(prior, x, n_steps=args.steps, n_probes=args.probes, generator=g)
    result = {"input": str(args.input), "prior": str(args.prior), "log_likelihood_nats": float(logp[0]),
              "bits_per_dim": float(bpd[0])}
    warnings = reliability_warnings(float(bpd[0]), args.steps)
    for w in warnings:
        print(f"recon likelihood: warning: {w}", file=sys.stderr)
    if warnings:
        result["warnings"] = warnings
    print(json.dumps(result, indent=2))
    if args.out:
        from recon.outputs import write_text

        write_text(Path(args.out), json.dumps(result, indent=2) + "\n")


# ---------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------
def add_bench(sub):
    p = sub.add_parser("bench", help="benchmarks (operators; fuzz: damaged files through every reader; "
                                      "calibration: posterior std vs error; references: baselines vs SigPy/skimage)")
    p.add_argument("what", choices=["operators", "fuzz", "calibration", "references", "volumes", "bands"])
    p.add_argument("--data", default="../shared/data", metavar="DIR",
                   help="calibration/references: the shared data folder (default ../shared/data)")
    p.add_argument("--task", choices=["ct", "mri"], default="ct", help="calibration, bands: task (default ct)")
    p.add_argument("--per-series", type=_positive_int, default=4,
                   help="bands: slices per --series, evenly spread (default 4)")
    p.add_argument("--sigmas", default=None, metavar="S1,S2,...",
                   help="bands: noise levels on the [0, 1] scale (default 0.01,0.02,0.05,0.1,0.2,0.4,0.8,1.6; "
                        "--against global: in the whole-image prior's units, default 0.1,0.2,0.4,0.8,1.6,3.2)")
    p.add_argument("--against", choices=["detail", "global"], default="detail",
                   help="bands: compare the whole-image prior with its detail prior (low noise; recommends "
                        "detail_below) or with its coarser global prior (high noise; recommends global_above)")
    p.add_argument("--samples", type=_positive_int, default=8, help="calibration: posterior samples (default 8)")
    p.add_argument("--accel", type=_positive_float, default=8.0, help="references: MRI acceleration (default 8)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="calibration/references/bands: JSON results here; volumes: output folder (default bench_volumes)")
    p.add_argument("--sizes", default="256,512")
    p.add_argument("--views", default=None, help="operators: view counts (default 23,90,180); volumes: (default 8,23)")
    p.add_argument("--series", action="append", default=None, metavar="PATH",
                   help="volumes, bands: a series (repeatable; volumes default ct/val/ge_head and ct/val/lung_pet_ct_dx "
                        "in --data)")
    p.add_argument("--methods", default="fbp,tv,tv3d,score-fast:z_weight=0,score-fast",
                   help="volumes: methods, NAME or NAME:key=value;key=value (recon.bench_volumes)")
    p.add_argument("--size", type=_positive_int, default=128, help="volumes: working size (default 128)")
    p.add_argument("--slices", default=None, metavar="a:b", help="volumes: slice range (default all)")
    p.add_argument("--batch-slices", type=_positive_int, default=4, help="volumes: slices per method call")
    p.add_argument("--prior", default=None, help="volumes, bands: score prior (default ct; bands with --task mri: "
                                                  "brain-mri)")
    p.add_argument("--photons", type=_positive_float, default=None, help="volumes: Poisson noise I0 (default none)")
    p.add_argument("--volume-task", choices=["ct", "mri"], default="ct",
                   help="volumes: ct (levels = --views) or mri (levels = accelerations, --views 4,8 means 4x, 8x; "
                        "equispaced lines)")
    p.add_argument("--n", type=_positive_int, default=1000, help="fuzz: inputs per reader (default 1000)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="fuzz: seed of the mutations (default 0)")
    p.add_argument("--readers", default=None, metavar="R1,R2,...",
                   help="fuzz: readers to fuzz (default all: dicom,nifti,png,jpeg,tiff,npy,cfl,h5)")
    p.add_argument("--timeout", type=_positive_float, default=10.0, help="fuzz: seconds per input (default 10)")
    p.add_argument("--save", default=None, metavar="DIR", help="fuzz: keep the failing inputs here")
    p.add_argument("--debug", action="store_true")
    return p


def run_bench(args):
    if args.what == "calibration":
        from recon.bench_calibration import bench_calibration

        bench_calibration(args.data, args.task, args.samples, args.out, log=lambda m: print(m, file=sys.stderr))
        return 0
    if args.what == "references":
        from recon.bench_references import bench_references

        bench_references(args.data, args.accel, args.out, log=lambda m: print(m, file=sys.stderr))
        return 0
    if args.what == "volumes":
        from recon.bench_volumes import bench_volumes

        default_levels = "8,23" if args.volume_task == "ct" else "4,8"
        bench_volumes(args.data, args.series, [int(v) for v in (args.views or default_levels).split(",")],
                      [m for m in args.methods.split(",") if m], args.out or "bench_volumes", size=args.size,
                      slices=args.slices, batch=args.batch_slices, prior=args.prior, photons=args.photons,
                      log=lambda m: print(m, file=sys.stderr), task_name=args.volume_task)
        return 0
    if args.what == "bands":
        from recon.bench_bands import bench_bands

        sigmas = _numbers(args.sigmas, "--sigmas") if args.sigmas else None
        if sigmas is not None and any(not s > 0 for s in sigmas):
            raise ReconError(f"--sigmas must all be > 0, got {args.sigmas}")
        bench_bands(args.series or [], args.prior or ("ct" if args.task == "ct" else "brain-mri"), args.task,
                    args.per_series, sigmas, out=args.out, log=lambda m: print(m, file=sys.stderr),
                    against=args.against)
        return 0
    if args.what == "fuzz":
        from recon.fuzz import fuzz_readers

        report = fuzz_readers(args.n, seed=args.seed, timeout=args.timeout, save_failures=args.save,
                              readers=[r for r in (args.readers or "").split(",") if r] or None)
        return 0 if report.clean else 1
    from recon.bench import bench_operators

    bench_operators(sizes=tuple(int(s) for s in args.sizes.split(",")),
                    views=tuple(int(v) for v in (args.views or "23,90,180").split(",")))


# ---------------------------------------------------------------------------
# reconstruction: ct / mri / inpaint / compare / demo / methods
# ---------------------------------------------------------------------------
def _method_help() -> str:
    """Methods per task, from the registry's metadata."""
    from recon.methods import METHODS

    parts = []
    for task in ("ct", "mri", "inpaint"):
        names = [n for n, m in METHODS.items() if task in m.tasks and not m.needs_prior]
        parts.append(f"{', '.join(names)} ({task})")
    prior = [n for n, m in METHODS.items() if m.needs_prior]
    return (f"reconstruction method: {'; '.join(parts)}; {', '.join(prior)} (any task, need a prior); "
            "`recon methods` lists them")


# -- acquisition options (one declaration per option) -------------------------
def _noise_options(g, photons: bool):
    if photons:
        g = g.add_mutually_exclusive_group()
        g.add_argument("--photons", type=_positive_float, default=None, metavar="I0",
                       help="Poisson (low-dose) noise with I0 incident photons per ray (see CT physics "
                            "in forward_models.physics); default: noise-free")
    g.add_argument("--noise", type=_nonneg_float, default=None, metavar="SIGMA",
                   help="additive Gaussian noise, std = SIGMA x RMS of the clean measurement "
                        "(relative, e.g. 0.01 = 1%%); default: noise-free")


def _window_units_options(g, what: str):
    g.add_argument("--window", default=None, metavar="LO,HI",
                   help=f"HU window mapped to [0, 1] {what}")
    g.add_argument("--units", choices=["auto", "hu", "intensity"], default="auto",
                   help="input intensities: Hounsfield units (windowed) or display intensities "
                        "(divided by the maximum); default: guessed (see recon.tasks)")


def _ct_options(p):
    g = p.add_argument_group("CT acquisition")
    g.add_argument("--views", type=_positive_int, default=None, metavar="N",
                   help="number of projection views (required when simulating; with --sinogram: keep N "
                        "of the measured views, evenly spread over the angles; default all)")
    g.add_argument("--limited-angle", type=_positive_float, default=None, metavar="DEG",
                   help="angular range covered by the views in degrees (default: 180 parallel, 360 fan)")
    g.add_argument("--geometry", choices=["parallel", "fan"], default="parallel",
                   help="beam geometry (default: parallel)")
    g.add_argument("--simulate-finer", type=_positive_int, default=1, metavar="K",
                   help="simulate the sinogram on a K-times finer pixel grid with K detector sub-bins per "
                        "bin than the reconstruction uses (parallel beam; avoids the inverse crime); "
                        "default 1: the reconstruction's own operator")
    g.add_argument("--source-distance", type=_positive_float, default=None, metavar="F",
                   help="fan beam: source to rotation axis, in multiples of the image width (default: the "
                        "scanner's DistanceSourceToPatient for DICOM input that has it, else 2)")
    g.add_argument("--detector-distance", type=_positive_float, default=None, metavar="F",
                   help="fan beam: source to detector, in multiples of the image width (default: the "
                        "scanner's DistanceSourceToDetector for DICOM input that has it, else 4)")
    _noise_options(g, photons=True)
    _window_units_options(g, "(default: the prior's window for score methods, else -1000,1000)")
    g.add_argument("--fov", type=_positive_float, default=None, metavar="MM",
                   help="field of view in mm (sets the pixel size for --photons; default: from "
                        "the input's pixel spacing, else 1 mm per native pixel)")


def _mri_options(p):
    from forward_models import MRI_MASKS

    g = p.add_argument_group("MRI sampling")
    g.add_argument("--mask", choices=sorted(MRI_MASKS), default=None,
                   help="k-space sampling pattern (line masks sample columns)")
    g.add_argument("--accel", type=_positive_float, default=None, metavar="R",
                   help="acceleration factor (equispaced needs an integer)")
    g.add_argument("--center-fraction", type=_fraction, default=0.08, metavar="F",
                   help="fully sampled central fraction (default 0.08)")
    g.add_argument("--mask-file", default=None, metavar="FILE",
                   help="use this 0/1 mask (.npy or image, the k-space size) instead of --mask")
    _noise_options(g, photons=False)


def _inpaint_options(p):
    from forward_models import INPAINT_MASKS

    g = p.add_argument_group("inpainting mask")
    g.add_argument("--mask", choices=sorted(INPAINT_MASKS), default="box",
                   help="missing region: centred box, random pixels, or brush strokes (default box)")
    g.add_argument("--box-fraction", type=_fraction, default=0.25, metavar="F",
                   help="box: missing area fraction (default 0.25)")
    g.add_argument("--keep-ratio", type=_fraction, default=0.2, metavar="P",
                   help="random: fraction of observed pixels (default 0.2)")
    g.add_argument("--strokes", type=_positive_int, default=4, metavar="N",
                   help="strokes: number of brush strokes (default 4)")
    g.add_argument("--mask-file", default=None, metavar="FILE",
                   help="use this 0/1 mask (.npy or image, 1 = observed, the working size)")
    _noise_options(g, photons=False)
    _window_units_options(g, "for CT input (default: the prior's window or -1000,1000)")


def _ct_acquisition(args):
    from recon.acquisition import CTAcquisition

    return CTAcquisition(views=args.views, limited_angle=args.limited_angle, geometry=args.geometry,
                         source_distance=args.source_distance, detector_distance=args.detector_distance,
                         photons=args.photons, noise=args.noise, window=args.window, units=args.units,
                         fov=args.fov, sinogram=args.sinogram,
                         sinogram_units=args.sinogram_units or ("counts" if args.flat else "image"),
                         sigma_y=args.sigma_y, angles=args.angles, angle_units=args.angle_units,
                         det_spacing=args.det_spacing, flat=args.flat, dark=args.dark, reference=args.reference,
                         simulate_finer=args.simulate_finer)


def _mri_acquisition(args):
    from recon.acquisition import MRIAcquisition

    return MRIAcquisition(mask=args.mask, accel=args.accel, center_fraction=args.center_fraction,
                          mask_file=args.mask_file, noise=args.noise, kspace=args.kspace,
                          dataset=args.dataset, from_image=args.from_image, calib=args.calib,
                          reference=args.reference, sigma_y=args.sigma_y)


def _inpaint_acquisition(args):
    from recon.acquisition import InpaintAcquisition

    return InpaintAcquisition(mask=args.mask, box_fraction=args.box_fraction, keep_ratio=args.keep_ratio,
                              strokes=args.strokes, mask_file=args.mask_file, noise=args.noise,
                              window=args.window, units=args.units)


#: the measured-data options of `recon ct` / `recon mri`, absent from `recon compare`
_NO_MEASURED_DATA = dict(sinogram=None, sinogram_units="image", sigma_y=None, kspace=None, dataset=None,
                         from_image=False, calib=None, reference=None, angles=None, angle_units="deg",
                         det_spacing=None, flat=None, dark=None)

#: task name -> (acquisition options, acquisition builder, help)
_TASK_CLI = {
    "ct": (_ct_options, _ct_acquisition, "CT reconstruction from a simulated (or a measured --sinogram) sinogram"),
    "mri": (_mri_options, _mri_acquisition,
            "MRI reconstruction from simulated or measured (--kspace) undersampled k-space"),
    "inpaint": (_inpaint_options, _inpaint_acquisition, "fill missing pixels (box, random pixels, brush strokes)"),
}


# -- method, input and batch options ---------------------------------------------
def _method_options(p, multi: bool = False):
    g = p.add_argument_group("method")
    if multi:
        g.add_argument("--methods", required=True, metavar="M1,M2,...",
                       help="comma-separated methods, e.g. fbp,tv,score-fast (see `recon methods`)")
    else:
        g.add_argument("--method", required=True, metavar="NAME", help=_method_help())
    g.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="extra method option (repeatable), value parsed as int/float/bool/none/str, "
                        "'a,b' as a tuple; e.g. lam=1e-3, n_iter=50" +
                        ("; METHOD.KEY=VALUE for one method only (e.g. tv.lam=1e-3)" if multi else ""))
    g.add_argument("--prior", default=None, metavar="NAME|PATH",
                   help="score prior: shipped name (ct, brain-mri) or .safetensors path (default: ct for "
                        "CT, brain-mri for MRI)")
    g.add_argument("--size", type=_size, default=None, metavar="S",
                   help="working image size SxS (default: the native size after a square centre crop, for "
                        "every method; score methods apply their prior at its own scale inside); a speed option")
    g.add_argument("--samples", type=_positive_int, default=1, metavar="K",
                   help=("posterior samples per case for the score methods (score, score-fast, dps): "
                         "their mean is scored; other methods run once (default 1)") if multi else
                        ("posterior samples for score methods: the mean is the reconstruction and "
                         "std.png/std.npy their per-pixel std, narrower than the error; "
                         "std_calibrated.npy where the prior's calibration was fitted at these settings (default 1)"))


def _run_settings(args, methods):
    from recon.execute import RunSettings, parse_params

    return RunSettings(methods=methods, params=parse_params(args.param), param_text=list(args.param or []),
                       prior=args.prior, size=args.size, samples=args.samples, seed=args.seed,
                       device=resolve_device(args.device), progress=progress_enabled(args),
                       debug=args.debug, force=args.force, force_modality=args.force_modality)


def _input_options(p, positional: bool = True, required: bool = True):
    if positional:
        p.add_argument("input", nargs=None if required else "?", metavar="INPUT",
                       help="ground-truth image: DICOM file or folder, NIfTI, PNG/JPEG/TIFF, or 2-D .npy")
    p.add_argument("--series", default=None, metavar="UID", help="DICOM series to read from a folder holding several")
    p.add_argument("--slice", type=_nonneg_int, default=None, metavar="I",
                   help="reconstruct only this slice of a volume, 0-based")
    p.add_argument("--slices", default=None, metavar="all|a:b",
                   help="slices of a multi-slice input (DICOM series, NIfTI volume, measured sinogram stack or "
                        "k-space): all (default) or a:b (0-based, b excluded); streamed in batches, resumable "
                        "(see recon.volume, recon.measured_volume)")
    p.add_argument("--batch-slices", type=_positive_int, default=16, metavar="B",
                   help="slices per method call for a volume (default 16; a method that couples slices also "
                        "reconstructs 2 neighbour slices on each inner side of a batch, so larger batches "
                        "waste less; fewer saves memory)")


def _modality_option(p, task: str):
    """``--force-modality``: a DICOM input of the other modality (MR for ct, CT for mri) is refused
    without it (recon.tasks Task.check_source)."""
    other = {"ct": "MR", "mri": "CT"}.get(task)
    if other is None:
        p.set_defaults(force_modality=False)
        return
    p.add_argument("--force-modality", action="store_true",
                   help=f"accept DICOM input whose Modality is {other} (refused by default: `recon {task}` "
                        f"expects {'CT' if task == 'ct' else 'MR'} images)")


def _manifest_options(p):
    g = p.add_argument_group("batches (see recon.outputs for a Slurm example)")
    g.add_argument("--manifest", default=None, metavar="FILE",
                   help="text file with one input per line (# comments); one output folder per line")
    g.add_argument("--shard", default=None, metavar="i/n",
                   help="process only lines whose 0-based index %% n == i")
    g.add_argument("--force", action="store_true", help="recompute cases whose outputs already exist")


_EPILOG = ("Outputs in --out: the reconstruction (a derived DICOM series in dicom/ for DICOM input, else "
           "recon.nii.gz; in the input's units), recon.png, metrics.json (PSNR/SSIM/NMSE on the [0, 1] scale "
           "when a ground truth exists), run.json (versions, options, timings). Exit status 2 on bad input.")


def _slice_spacing_option(g):
    g.add_argument("--slice-spacing", type=_positive_float, default=None, metavar="MM",
                   help="multi-slice measured data (reconstructed as a study: every slice, or --slices a:b): "
                        "slice spacing in mm for recon.nii.gz's affine (default: unknown, 1)")


def add_ct(sub):
    help_ = _TASK_CLI["ct"][2]
    p = sub.add_parser("ct", help=help_, description=help_ + ". " + _EPILOG)
    _input_options(p, required=False)
    g = p.add_argument_group("measured data")
    g.add_argument("--sinogram", default=None, metavar="FILE",
                   help="measured sinogram .npy (views, detectors) instead of INPUT, any number of detector "
                        "pixels, or a stack (slices, views, detectors) sharing one geometry (every slice is "
                        "reconstructed, or --slices a:b / --slice I); --geometry and the options below describe "
                        "it; no ground truth")
    g.add_argument("--sinogram-units", choices=["image", "attenuation", "counts"], default=None,
                   help="image: y = A x for the [0, 1] image with unit pixels (as sinogram.npy is written); "
                        "attenuation: post-log line integrals (mu in 1/mm times mm), converted with the "
                        "window and --fov; counts: raw counts (needs --flat). Default: image, counts with --flat")
    g.add_argument("--angles", default=None, metavar="FILE",
                   help="view angle of each sinogram row (.npy, or text: numbers separated by newlines, spaces "
                        "or commas); default: equispaced over 180 (parallel) / 360 (fan) degrees")
    g.add_argument("--angle-units", choices=["deg", "rad"], default="deg", help="units of --angles (default deg)")
    g.add_argument("--det-spacing", type=_positive_float, default=None, metavar="MM",
                   help="detector pixel pitch in mm (parallel: at the rotation axis; fan: on the detector); "
                        "needs --fov (default: 1 image pixel; fan: the magnification)")
    g.add_argument("--flat", default=None, metavar="FILE",
                   help="flat (open-beam) counts .npy, shape (detectors,) or (views, detectors), or one per "
                        "slice of a sinogram stack (slices, views|1, detectors): the sinogram holds raw counts I, "
                        "converted to p = -log(max(I-D,e) / max(F-D,e))")
    g.add_argument("--dark", default=None, metavar="FILE", help="dark counts .npy for --flat (default 0)")
    g.add_argument("--reference", default=None, metavar="full[:METHOD]",
                   help="score against the reconstruction of ALL measured views (with --views N): full picks "
                        "fbp for dense full scans, else tv; or full:fbp|tv|sirt|cgls; written to metrics.json")
    g.add_argument("--sigma-y", type=_nonneg_float, default=None, metavar="STD",
                   help="noise std of the measured data in y units (passed to score methods)")
    _slice_spacing_option(g)
    _ct_options(p)
    _method_options(p)
    _modality_option(p, "ct")
    _manifest_options(p)
    common_options(p)
    return p


def add_mri(sub):
    help_ = _TASK_CLI["mri"][2]
    p = sub.add_parser("mri", help=help_, description=help_ + ". " + _EPILOG)
    _input_options(p, required=False)
    g = p.add_argument_group("measured k-space")
    g.add_argument("--kspace", default=None, metavar="FILE",
                   help="k-space instead of INPUT: fastMRI or ISMRMRD .h5, Siemens raw .dat (extra "
                        "[siemens]), BART .cfl/.hdr, complex .npy; multi-coil "
                        "-> SENSE with coil maps from the calibration region; already undersampled data "
                        "keeps its sampling pattern (then --mask/--accel are optional)")
    g.add_argument("--dataset", default=None, metavar="NAME", help=".h5 k-space dataset (fastMRI, default kspace) or ISMRMRD group (default dataset)")
    g.add_argument("--from-image", action="store_true",
                   help="--kspace FILE is a complex image; its centred FFT is the k-space")
    g.add_argument("--calib", type=_positive_int, default=None, metavar="N",
                   help="calibration block size for coil maps (default: the fully sampled centre, <= 32)")
    g.add_argument("--reference", default=None, metavar="FILE",
                   help="reference image for metrics (e.g. BART img.cfl); .h5 reconstruction_rss is used "
                        "automatically")
    g.add_argument("--sigma-y", type=_nonneg_float, default=None, metavar="STD",
                   help="noise std of the measured k-space after scaling (passed to score methods)")
    _slice_spacing_option(g)
    _mri_options(p)
    _method_options(p)
    _modality_option(p, "mri")
    _manifest_options(p)
    common_options(p)
    return p


def add_inpaint(sub):
    help_ = _TASK_CLI["inpaint"][2]
    p = sub.add_parser("inpaint", help=help_, description=help_ + ". " + _EPILOG)
    _input_options(p)
    _inpaint_options(p)
    _method_options(p)
    _modality_option(p, "inpaint")
    common_options(p)
    p.set_defaults(manifest=None, shard=None, force=False)
    return p


def _run_task(name):
    def run(args):
        from recon.single import Inputs, run_single
        from recon.tasks import TASKS

        acq = _TASK_CLI[name][1](args)
        return run_single(TASKS[name], acq, _run_settings(args, [args.method]),
                          Inputs(path=args.input, series=args.series, slice=args.slice, slices=args.slices,
                                 batch=args.batch_slices, slice_spacing=getattr(args, "slice_spacing", None)),
                          args.out,
                          lambda m: log(args, m), manifest=args.manifest, shard=args.shard)

    run.__name__ = f"run_{name}"
    return run


def add_compare(sub):
    from recon.tasks import TASKS

    desc = ("Compare methods on every case under --data (or listed in --manifest): each case is "
            "normalised, resized to --size, measured ONCE (seeded) and reconstructed by every method. "
            "Writes metrics.csv (case,method,psnr,ssim,nmse,seconds), summary.md (mean ± std per method) "
            "and figures/CASE.png. A failing method or case is logged and the run goes on; the exit "
            "status is 1 if anything failed.")
    p = sub.add_parser("compare", help="compare methods over a folder of cases", description=desc)
    tsub = p.add_subparsers(dest="task", required=True, metavar="{ct,mri,inpaint}")
    for name, task in TASKS.items():
        q = tsub.add_parser(name, help=f"compare on {task.description}", description=desc)
        g = q.add_argument_group("cases")
        g.add_argument("--data", default=None, metavar="DIR",
                       help="folder of cases: DICOM series, NIfTI volumes, PNG/JPEG/TIFF, 2-D .npy")
        g.add_argument("--slices", default="middle", metavar="middle|all|every:K",
                       help="which slices of each volume: the middle one (default), all, or every K-th")
        g.add_argument("--max-cases", type=_positive_int, default=None, metavar="N",
                       help="only the first N cases (per manifest line with --manifest)")
        _TASK_CLI[name][0](q)
        q.set_defaults(**_NO_MEASURED_DATA)  # compare simulates every case
        _method_options(q, multi=True)
        _modality_option(q, name)
        _manifest_options(q)
        common_options(q)
    return p


def run_compare(args):
    from recon.compare import run_compare as _run
    from recon.tasks import TASKS

    acq = _TASK_CLI[args.task][1](args)
    return _run(TASKS[args.task], acq, _run_settings(args, args.methods), args.out, lambda m: log(args, m),
                data=args.data, manifest=args.manifest, slices=args.slices, max_cases=args.max_cases,
                shard=args.shard)


def add_demo(sub):
    p = sub.add_parser("demo", help="the README example: CT_small.dcm, 23 views, fbp vs tv vs score",
                       description="Reconstruct pydicom's CT_small.dcm (128x128 real CT) from 23 noise-free "
                                   "parallel-beam views with FBP, TV and (if the 'ct' prior is shipped) "
                                   "score (predictor-corrector, Song et al. 2022) and score-fast; writes "
                                   "demo.png, metrics.md, metrics.csv and prints the table.")
    p.add_argument("--methods", default="fbp,tv,score,score-fast", metavar="M1,M2,...")
    p.add_argument("--views", type=_positive_int, default=23, help=argparse.SUPPRESS)
    common_options(p, out_required=False)
    p.set_defaults(out="recon-demo")
    return p


def run_demo(args):
    from recon.compare import run_demo as _run
    from recon.execute import RunSettings

    settings = RunSettings(methods=args.methods, seed=args.seed, device=resolve_device(args.device),
                           progress=progress_enabled(args), debug=args.debug)
    return _run(settings, args.out, lambda m: log(args, m), views=args.views)


def add_methods(sub):
    return sub.add_parser("methods", help="list the reconstruction methods and what they apply to")


def run_methods(args):
    from recon.methods import METHODS

    width = max(len(n) for n in METHODS)
    for name in sorted(METHODS):
        m = METHODS[name]
        opts = m.options()
        hidden = ("callback", "task")
        names = "any (passed through)" if opts is None else (", ".join(o for o in opts if o not in hidden)
                                                             or "none")
        traits = [t for t, on in (("needs a prior", m.needs_prior), ("stochastic", m.stochastic)) if on]
        print(f"{name:<{width}}  tasks: {', '.join(m.tasks)}; {m.applies_to}"
              f"{'; ' + ', '.join(traits) if traits else ''}; options: {names}")
    return 0


# ---------------------------------------------------------------------------
# ood: out-of-distribution check of inputs against a prior (recon/ood.py)
# ---------------------------------------------------------------------------
def _sigma_list(text: str) -> tuple:
    vals = tuple(_positive_float(v) for v in text.split(",") if v.strip())
    if not vals:
        raise argparse.ArgumentTypeError(f"must be a comma-separated list of noise levels > 0, got {text!r}")
    return vals


def _quantile(text: str) -> float:
    v = _fraction(text)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {v}")
    return v


def add_ood(sub):
    p = sub.add_parser("ood", help="out-of-distribution check: is an input like the prior's training images?")
    act = p.add_subparsers(dest="ood_command", required=True)
    f = act.add_parser("fit", help="fit the reference statistics of a prior on in-distribution images")
    f.add_argument("--prior", required=True)
    f.add_argument("--data", action="append", required=True, metavar="DIR",
                   help="folder (or file) of in-distribution images; repeat for several")
    f.add_argument("--held-out-only", action="store_true",
                   help="use only the images `recon train` held out of this prior's training "
                        "(reproduced from its metadata; image folders only)")
    f.add_argument("--max-images", type=_positive_int, default=200,
                   help="seeded random subset of at most N files (default 200)")
    f.add_argument("--threshold-fraction", type=_fraction, default=0.4,
                   help="fraction of patients that set the threshold, the rest fit mean/covariance (default 0.4)")
    f.add_argument("--quantile", type=_quantile, default=0.99, help="threshold quantile (default 0.99)")
    f.add_argument("--sigmas", type=_sigma_list, default=None, metavar="S1,S2,...",
                   help="noise levels on the [0, 1] scale (default: 6 log-spaced in [0.01, 3])")
    common_options(f)
    c = act.add_parser("check", help="distance, threshold and verdict for each input")
    c.add_argument("inputs", nargs="+", metavar="INPUT", help="image file or DICOM folder (middle slice)")
    c.add_argument("--prior", required=True)
    c.add_argument("--slice", type=_nonneg_int, default=None, help="slice index (default: the middle one)")
    common_options(c, out_required=False)
    b = act.add_parser("bench", help="AUROC of the check on ../shared/data (recon.bench_ood)")
    b.add_argument("--prior", required=True)
    b.add_argument("--n", type=_positive_int, default=40, help="images per class (about; default 40)")
    b.add_argument("--data", default=None, metavar="DIR", help="data root (default: ../shared/data beside the repo)")
    b.add_argument("--threads", type=_positive_int, default=1, help="torch CPU threads (default 1)")
    b.add_argument("--no-cache", action="store_true", help="recompute features (cached in OUT/cache otherwise)")
    b.add_argument("--out", default="ood_bench", help="output folder (default: ood_bench)")
    b.add_argument("--quiet", action="store_true")
    b.add_argument("--debug", action="store_true")
    return p


def run_ood(args):
    from recon import ood
    from recon.prior import load_prior

    if args.ood_command == "bench":
        from recon.bench_ood import run_bench

        run_bench(args.prior, args.n, args.out, threads=args.threads, cache=not args.no_cache, data=args.data,
                  log=(lambda m: None) if args.quiet else print)
        return 0
    prior = load_prior(args.prior, device=resolve_device(args.device))
    if args.ood_command == "fit":
        from recon.outputs import write_text

        ref = ood.fit_from_folders(prior, args.data, max_images=args.max_images, seed=args.seed,
                                   threshold_fraction=args.threshold_fraction, quantile=args.quantile,
                                   sigmas=args.sigmas or ood.DEFAULT_SIGMAS, held_out_only=args.held_out_only,
                                   log=lambda m: log(args, m))
        write_text(Path(args.out), json.dumps(ref, indent=1) + "\n")
        log(args, f"wrote {args.out}; merge it into the prior's JSON metadata as \"ood\" "
                  "(meta[\"ood\"] = the file's content)")
        return 0
    ref = ood.get_reference(prior)
    results = []
    for path in args.inputs:
        res = {"input": str(path), **ood.check(prior, ood.prepare_file(path, prior, args.slice), ref)}
        results.append(res)
        print(f"{path}: distance {res['distance']:.2f}, threshold {res['threshold']:.2f} -> "
              f"{'in-distribution' if res['in_distribution'] else 'OUT OF DISTRIBUTION'}")
    if results:
        print(f"reference: {results[0]['reference']}")
    if args.out:
        from recon.outputs import write_text

        write_text(Path(args.out), json.dumps(results, indent=2) + "\n")
    return 0


SUBCOMMANDS = {
    "train": (add_train, run_train),
    "sample": (add_sample, run_sample),
    "likelihood": (add_likelihood, run_likelihood),
    "bench": (add_bench, run_bench),
    "ct": (add_ct, _run_task("ct")),
    "mri": (add_mri, _run_task("mri")),
    "inpaint": (add_inpaint, _run_task("inpaint")),
    "compare": (add_compare, run_compare),
    "demo": (add_demo, run_demo),
    "methods": (add_methods, run_methods),
    "ood": (add_ood, run_ood),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="recon", description="Medical image reconstruction with score-based priors "
                                     "and pluggable measurement operators.")
    from recon import __version__

    parser.add_argument("--version", action="version", version=f"recon {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, _) in SUBCOMMANDS.items():
        add(sub)
    return parser


#: what to reduce when a command runs out of memory
_MEMORY_HINT = {
    "train": "reduce --batch, --patch or --size (or --base)",
    "sample": "reduce --n",
    "likelihood": "use a prior with a smaller image size",
    None: "reduce --size (or --samples, --views, --max-cases)",
}


def resolve_device(name: str):
    from recon.device import resolve_device as _resolve  # torch loads here, inside main's handlers

    return _resolve(name)


#: OpenMP threads that finished their share sleep instead of spinning: on a shared node where another
#: process holds a core, spinning threads fight it (measured: 256^2, 180 views, A with 2 threads and one
#: core busy: 203 ms spinning, 35 ms passive, 22 ms with one thread; README "Busy machines")
OMP_ENV_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "torch" not in sys.modules:  # read once when torch loads its OpenMP runtime; a user's setting wins
        for key, value in OMP_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
    try:
        parser = build_parser()  # imports the method registry (and torch): Ctrl-C here is an interrupt too
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("recon: interrupted", file=sys.stderr)
        return 130
    except argparse.ArgumentError as e:  # a bad option value: one line, like every other user error
        cmd = next((a for a in argv if a in SUBCOMMANDS), None)
        print(f"recon{' ' + cmd if cmd else ''}: error: {_argument_error_text(e)}", file=sys.stderr)
        return 2
    _, run = SUBCOMMANDS[args.command]
    try:
        rc = run(args)
    except (ReconError, ValueError, OSError) as e:
        if getattr(args, "debug", False):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"recon {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"recon {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: one line, the traceback with --debug
        if getattr(args, "debug", False):
            raise
        if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
            gpu = type(e).__name__ == "OutOfMemoryError"
            hint = _MEMORY_HINT.get(args.command, _MEMORY_HINT[None]) + (", or use --device cpu" if gpu else "")
            print(f"recon {args.command}: error: out of {'GPU memory' if gpu else 'memory'}; {hint}",
                  file=sys.stderr)
            return 2
        print(f"recon {args.command}: internal error: {type(e).__name__}: {' '.join(str(e).split())} "
              "(rerun with --debug for the traceback and please report it)", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
