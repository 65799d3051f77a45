"""Out-of-distribution check for a score prior: is this input like the images it was trained on?

Raw likelihood fails for this (a matplotlib figure scores fewer bits/dim under
the CT prior than a real CT slice: smooth, flat images are "likely" under any
image model).  This module uses the prior's *denoising behaviour* instead, in
the spirit of multiscale score matching (Mahmood, Lopez & Fleuret, ICLR 2021,
"Multiscale score matching for out-of-distribution detection"), with typicality
against held-out in-distribution images:

1. Features.  For fixed noise levels sigma_k and fixed, seeded noise draws z_k
   (the same z_k for every image), with D the prior's denoiser and x the input
   on the [0, 1] working scale at the prior's size::

       e_k = D(x + sigma_k z_k, sigma_k) - x
       f_k = log mean(e_k^2)                       (denoising error)
       g_k = log mean(avgpool_4(e_k)^2)            (its coarse-scale part)

   Measured on ``recon.bench_ood``: noise images give large errors dominated by
   fine scales; figures, phantoms and photographs large errors at sigma >= 0.3
   (the denoiser replaces their content with its own); over-smooth inputs (CT
   down- and up-sampled 4x) *smaller* errors than real CT at every sigma; so
   the score must be two-sided, hence a distance rather than a one-sided test.

2. Typicality.  The features of one set of in-distribution images give a mean
   and a Ledoit-Wolf shrinkage covariance; an input's score is its Mahalanobis
   distance to them.  The threshold is the ``quantile`` (default 99 %) of the
   distances of a *separate* set of in-distribution images (not those used
   for the mean and covariance), so about 1 % of in-distribution images are
   flagged.

The fitted reference lives in the prior's metadata, ``prior.meta["ood"]``
(written by ``recon ood fit``); it records a fingerprint of the weights, so a
reference fitted for other weights is refused rather than silently misused.

What "in distribution" means: like the prior's training images.  Held-out
images of the same population pass (0-3 % flagged on the benchmark);
sub-populations absent from training are flagged although they are the same
modality: head CT under the chest/abdomen ``ct`` prior, skull-stripped brains
under ``brain-mri`` (where the prior's reconstructions are also weakest).
Cost: one denoiser evaluation per noise level (6 by default) per image.

Inputs are normalised exactly as a reconstruction sees them (``recon.tasks``
``Task.prepare``: CT HU window -> [0, 1], other images magnitude / max;
centre square crop, resize to the prior's ``image_size``).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from recon.errors import ReconError

FORMAT = "recon-ood-v1"
DEFAULT_SIGMAS = tuple(float(s) for s in np.geomspace(0.01, 3.0, 6))
DEFAULT_QUANTILE = 0.99
POOL = 4
FEATURES = ("log_mse", "log_mse_coarse")


# ---------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------
def _noise(shape, sigma_index: int, seed: int, draw: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed) * 100_003 + 1000 * int(draw) + int(sigma_index))
    return torch.randn(shape, generator=g, dtype=torch.float32)


def _check_batch(prior, x) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() == 2:
        x = x[None]
    if x.dim() == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() != 3:
        raise ReconError(f"OOD check expects images of shape (B, H, W), got {tuple(x.shape)}")
    size = int(prior.meta["image_size"])
    if tuple(x.shape[-2:]) != (size, size):
        raise ReconError(f"OOD check: images are {tuple(x.shape[-2:])}, the prior expects {size}x{size} "
                         "(prepare inputs with recon.ood.prepare_image / prepare_file)")
    if not torch.isfinite(x).all():
        raise ReconError("OOD check: the input contains NaN or infinite values")
    return x.float()


@torch.no_grad()
def compute_features(prior, x01, sigmas=DEFAULT_SIGMAS, seed: int = 0, n_draws: int = 1,
                     batch_size: int = 16) -> np.ndarray:
    """Features (B, 2K) of images ``x01`` (B, S, S) on [0, 1]: for every sigma_k the
    log denoising error and the log error of its ``POOL``x average-pooled version,
    averaged over ``n_draws`` fixed noise draws (identical for every image)."""
    x = _check_batch(prior, x01)
    tensors = list(prior.parameters()) + list(prior.buffers()) if hasattr(prior, "parameters") else []
    dev = tensors[0].device if tensors else x.device
    out = np.zeros((len(x), 2 * len(sigmas)), dtype=np.float64)
    for k, s in enumerate(sigmas):
        fine = np.zeros(len(x))
        coarse = np.zeros(len(x))
        for d in range(n_draws):
            z = _noise(x.shape[-2:], k, seed, d)
            for i in range(0, len(x), batch_size):
                xb = x[i:i + batch_size].to(dev)
                e = (prior.denoise(xb + float(s) * z.to(dev), float(s)) - xb).float()
                fine[i:i + len(xb)] += e.pow(2).flatten(1).mean(1).double().cpu().numpy()
                ec = F.avg_pool2d(e[:, None], POOL) if min(e.shape[-2:]) >= POOL else e[:, None]
                coarse[i:i + len(xb)] += ec.pow(2).flatten(1).mean(1).double().cpu().numpy()
        out[:, 2 * k] = np.log(fine / n_draws + 1e-12)
        out[:, 2 * k + 1] = np.log(coarse / n_draws + 1e-12)
    return out


def feature_names(sigmas=DEFAULT_SIGMAS) -> list[str]:
    return [f"{name}@{s:.3g}" for s in sigmas for name in FEATURES]


# ---------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------
def ledoit_wolf(X: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf (2004) shrinkage covariance towards (tr S / d) I; returns (cov, shrinkage)."""
    X = np.asarray(X, dtype=np.float64)
    n, d = X.shape
    Xc = X - X.mean(0)
    S = Xc.T @ Xc / n
    mu = np.trace(S) / d
    target = mu * np.eye(d)
    delta2 = np.sum((S - target) ** 2) / d
    beta2 = sum(np.sum((np.outer(x, x) - S) ** 2) for x in Xc) / (n * n) / d
    beta2 = min(beta2, delta2)
    a = beta2 / delta2 if delta2 > 0 else 1.0
    return a * target + (1 - a) * S, float(a)


def mahalanobis(F_: np.ndarray, mean, precision) -> np.ndarray:
    D = np.asarray(F_, dtype=np.float64) - np.asarray(mean, dtype=np.float64)
    return np.sqrt(np.maximum(np.einsum("ni,ij,nj->n", D, np.asarray(precision, dtype=np.float64), D), 0))


def _stats(d: np.ndarray) -> dict:
    d = np.asarray(d, dtype=np.float64)
    return {"n": int(len(d)), "median": float(np.median(d)), "p90": float(np.quantile(d, 0.9)),
            "p95": float(np.quantile(d, 0.95)), "p99": float(np.quantile(d, 0.99)), "max": float(d.max())}


def weights_fingerprint(prior) -> str:
    """SHA-1 (16 hex digits) of the prior's parameters and buffers, in name order; a detail or a
    global prior loaded beside it is not part of it (their errors are not the features)."""
    h = hashlib.sha1()
    for name, t in sorted(prior.state_dict().items()):
        if name.startswith(("detail_prior.", "global_prior.")):
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def auroc(in_scores, out_scores) -> float:
    """Area under the ROC curve for 'out has the larger score' (Mann-Whitney U / (n m), ties 1/2)."""
    a = np.asarray(in_scores, dtype=np.float64)
    b = np.asarray(out_scores, dtype=np.float64)
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    allv = np.concatenate([a, b])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sv = allv[order]
    i = 0
    while i < len(sv):  # average ranks over ties
        j = i
        while j + 1 < len(sv) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[len(a):].sum() - len(b) * (len(b) + 1) / 2
    return float(u / (len(a) * len(b)))


# ---------------------------------------------------------------------------
# fit / score / check
# ---------------------------------------------------------------------------
def fit_reference(prior, images_fit, images_threshold, *, sigmas=DEFAULT_SIGMAS, seed: int = 0,
                  n_draws: int = 1, quantile: float = DEFAULT_QUANTILE, data: str = "",
                  batch_size: int = 16, features_fit=None, features_threshold=None) -> dict:
    """Fit the reference of ``prior`` from two disjoint sets of in-distribution images
    (B, S, S) on [0, 1]: mean and shrinkage covariance of the features of
    ``images_fit``, threshold = the ``quantile`` of the distances of ``images_threshold``.
    Returns a JSON-able dict (store it as ``prior.meta["ood"]``).  Precomputed features
    (same sigmas/seed/draws) may be passed instead of recomputing them."""
    if not 0 < quantile < 1:
        raise ReconError(f"quantile must be in (0, 1), got {quantile}")
    sigmas = tuple(float(s) for s in sigmas)
    Ff = features_fit if features_fit is not None else compute_features(
        prior, images_fit, sigmas, seed, n_draws, batch_size)
    Ft = features_threshold if features_threshold is not None else compute_features(
        prior, images_threshold, sigmas, seed, n_draws, batch_size)
    Ff, Ft = np.asarray(Ff, dtype=np.float64), np.asarray(Ft, dtype=np.float64)
    if len(Ff) < 5 or len(Ft) < 5:
        raise ReconError(f"OOD fit needs at least 5 images in each split (got {len(Ff)} to fit, "
                         f"{len(Ft)} for the threshold); pass more in-distribution data")
    mean = Ff.mean(0)
    cov, shrink = ledoit_wolf(Ff)
    precision = np.linalg.inv(cov)
    d_fit = mahalanobis(Ff, mean, precision)
    d_thr = mahalanobis(Ft, mean, precision)
    threshold = float(np.quantile(d_thr, quantile))
    return {
        "format": FORMAT,
        "method": ("Mahalanobis distance of multiscale denoising-error features "
                   "(log MSE of D(x + sigma z, sigma) - x and of its 4x-pooled version) to held-out "
                   "in-distribution images; Ledoit-Wolf shrinkage covariance"),
        "image_size": int(prior.meta["image_size"]),
        "window": prior.meta.get("window"),
        "weights": weights_fingerprint(prior),
        "sigmas": list(sigmas),
        "seed": int(seed),
        "n_draws": int(n_draws),
        "pool": POOL,
        "features": feature_names(sigmas),
        "mean": mean.tolist(),
        "precision": precision.tolist(),
        "shrinkage": shrink,
        "quantile": float(quantile),
        "threshold": threshold,
        "n_fit": int(len(Ff)),
        "n_threshold": int(len(Ft)),
        "data": data,
        "distances": {"fit": _stats(d_fit), "threshold": _stats(d_thr)},
    }


def get_reference(prior) -> dict:
    """``prior.meta["ood"]``, checked against the prior's weights; a ReconError naming the fix otherwise."""
    ref = (getattr(prior, "meta", None) or {}).get("ood")
    name = (getattr(prior, "meta", None) or {}).get("name", "this prior")
    if not ref:
        raise ReconError(f"{name} has no out-of-distribution reference (metadata key 'ood'); fit one with "
                         f"`recon ood fit --prior {name} --data DIR --out ref.json` and store it as \"ood\" "
                         "in the prior's JSON metadata")
    if ref.get("format") != FORMAT:
        raise ReconError(f"{name}: OOD reference has format {ref.get('format')!r}, expected {FORMAT!r}; "
                         "refit it with `recon ood fit`")
    if ref.get("weights") and ref["weights"] != weights_fingerprint(prior):
        raise ReconError(f"{name}: the OOD reference was fitted for other weights (fingerprint "
                         f"{ref['weights']}, these weights {weights_fingerprint(prior)}); refit it with "
                         "`recon ood fit`")
    return ref


def ood_score(prior, x01_batch, reference: dict | None = None, batch_size: int = 16):
    """Mahalanobis distances (B,) and features (B, 2K) of images (B, S, S) on [0, 1]."""
    ref = reference if reference is not None else get_reference(prior)
    feats = compute_features(prior, x01_batch, ref["sigmas"], ref["seed"], ref["n_draws"], batch_size)
    return mahalanobis(feats, ref["mean"], ref["precision"]), feats


def reference_text(ref: dict) -> str:
    t = ref["distances"]["threshold"]
    what = ref.get("data") or "in-distribution images"
    return (f"in-distribution ({what}, n={t['n']}): median {t['median']:.2f}, "
            f"{100 * ref['quantile']:g}th pct {ref['threshold']:.2f}")


def check(prior, x01, reference: dict | None = None) -> dict:
    """OOD verdict for one image (S, S) or (1, S, S) on [0, 1]:
    {"distance", "threshold", "in_distribution", "reference"}."""
    ref = reference if reference is not None else get_reference(prior)
    d, _ = ood_score(prior, x01, ref)
    if len(d) != 1:
        raise ReconError(f"check() takes one image, got {len(d)}; use ood_score for batches")
    dist = float(d[0])
    return {"distance": dist, "threshold": float(ref["threshold"]),
            "in_distribution": bool(dist <= ref["threshold"]), "reference": reference_text(ref)}


# ---------------------------------------------------------------------------
# inputs, normalised as a reconstruction sees them
# ---------------------------------------------------------------------------
def prior_task(prior) -> str:
    return "ct" if (prior.meta.get("modality") == "ct" or prior.meta.get("window")) else "mri"


def prepare_image(img: np.ndarray, prior, units: str = "intensity") -> np.ndarray:
    """A 2-D array -> [0, 1] at the prior's size, as ``Task.prepare`` does it:
    ``units="HU"``: the prior's window; ``"intensity"``: magnitude / max, clipped."""
    from recon.preprocess import CT_WINDOW, hu_to_unit, square_resize

    img = np.asarray(img)
    if img.ndim == 3 and img.shape[-1] in (3, 4):
        img = img[..., :3].mean(-1)
    if img.ndim != 2:
        raise ReconError(f"expected a 2-D image, got shape {img.shape}")
    img = np.abs(img).astype(np.float32) if np.iscomplexobj(img) else img.astype(np.float32)
    size = int(prior.meta["image_size"])
    if units == "HU":
        return hu_to_unit(square_resize(img, size), tuple(prior.meta.get("window") or CT_WINDOW))
    scale = float(np.abs(img).max())
    if scale <= 0:
        return np.zeros((size, size), np.float32)
    return np.clip(square_resize(np.abs(img) / scale, size), 0, 1).astype(np.float32)


def prepare_file(path, prior, slice_index: int | None = None) -> np.ndarray:
    """Read an input file/folder (middle slice by default) and normalise it exactly as
    ``recon ct`` / ``recon mri`` would for this prior (units chosen by the task's rules)."""
    from recon.case import load_source
    from recon.tasks import TASKS

    task = TASKS[prior_task(prior)]
    source = load_source(path, slice_index=slice_index)
    truth = task.prepare(source, int(prior.meta["image_size"]), window=prior.meta.get("window"))
    return np.asarray(truth.x, dtype=np.float32)


# ---------------------------------------------------------------------------
# reading in-distribution folders for `recon ood fit`
# ---------------------------------------------------------------------------
def load_folder_images(dirs, prior, max_images: int | None = None, seed: int = 0, only=None):
    """Every readable 2-D image under ``dirs`` (DICOM slices, NIfTI slices, PNG/JPEG),
    normalised for ``prior``; returns (images (N, S, S), patient ids, file names).
    Patient ids: DICOM PatientID, the NIfTI file, otherwise the file itself.
    ``only``: keep just these files; ``max_images``: a seeded random subset of the files."""
    from recon.train import _read_training_file

    files = []
    for d in dirs:
        d = Path(d)
        if not d.exists():
            raise ReconError(f"data folder not found: {d}")
        files += sorted(p for p in (d.rglob("*") if d.is_dir() else [d])
                        if p.is_file() and p.name.lower() not in ("readme.md", "license", "license.md"))
    if only is not None:
        keep = {Path(p).resolve() for p in only}
        files = [f for f in files if f.resolve() in keep]
        if not files:
            raise ReconError(f"none of the prior's held-out training images lie under {', '.join(map(str, dirs))}")
    if max_images and len(files) > max_images:
        rng = np.random.default_rng(seed)
        files = [files[i] for i in sorted(rng.choice(len(files), max_images, replace=False))]
    ct = prior_task(prior) == "ct"
    images, patients, names = [], [], []
    for f in files:
        is_dicom = f.suffix.lower() not in (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".nii", ".gz")
        for k, (img, pid, _mm) in enumerate(_read_training_file(f, "ct" if ct else "mri", None)):
            if img.ndim != 2 or min(img.shape) < 16 or not np.isfinite(img).all():
                continue
            if float(np.abs(img).max()) <= 0:
                continue
            units = "HU" if (ct and (is_dicom or float(img.min()) < -100)) else "intensity"
            images.append(prepare_image(img, prior, units))
            patients.append(pid or str(f))
            names.append(f"{f}" + (f"#{k}" if f.suffix.lower() in (".nii", ".gz") else ""))
    if not images:
        raise ReconError(f"no readable images under {', '.join(map(str, dirs))}")
    return np.stack(images), patients, names


def _short_path(d) -> str:
    """``../shared/data/ct/train/x`` -> ``ct/train/x`` (the part below a ``data`` folder, else the last two)."""
    parts = Path(d).parts
    if "data" in parts[:-1]:
        return "/".join(parts[len(parts) - parts[::-1].index("data"):])
    return "/".join(parts[-2:])


def split_patients(patients, fraction: float = 0.5, seed: int = 0):
    """Indices (a, b) with about ``fraction`` of the patients in b, no patient in both."""
    uniq = sorted(set(patients))
    rng = np.random.default_rng(seed)
    rng.shuffle(uniq)
    nb = min(len(uniq) - 1, max(1, int(round(len(uniq) * fraction))))
    pb = set(uniq[:nb])
    a = [i for i, p in enumerate(patients) if p not in pb]
    b = [i for i, p in enumerate(patients) if p in pb]
    return a, b


def fit_from_folders(prior, dirs, *, max_images: int | None = 200, threshold_fraction: float = 0.4,
                     seed: int = 0, quantile: float = DEFAULT_QUANTILE, sigmas=DEFAULT_SIGMAS,
                     held_out_only: bool = False, log=print) -> dict:
    """Load ``dirs`` (with ``held_out_only``: only the images ``recon train`` held out of
    this prior's training, see :func:`prior_validation_files`), split them by patient
    into a fit part and a threshold part (``threshold_fraction`` of the patients), and fit."""
    import time

    t0 = time.time()
    only = prior_validation_files(prior)[1] if held_out_only else None
    images, patients, _ = load_folder_images(dirs, prior, max_images=max_images, seed=seed, only=only)
    if len(set(patients)) < 2:
        raise ReconError("OOD fit needs images of at least two patients (files) to split into a fit "
                         "and a threshold part")
    a, b = split_patients(patients, threshold_fraction, seed)
    log(f"loaded {len(images)} images ({len(set(patients))} patients) in {time.time() - t0:.0f}s: "
        f"{len(a)} to fit mean/covariance, {len(b)} for the threshold (split by patient)")
    x = torch.from_numpy(images)
    desc = " + ".join(_short_path(d) for d in dirs) + (" (images held out of the prior's training)"
                                                        if held_out_only else "")
    ref = fit_reference(prior, x[a], x[b], sigmas=sigmas, seed=seed, quantile=quantile, data=desc)
    log(f"fitted in {time.time() - t0:.0f}s: threshold {ref['threshold']:.2f} "
        f"({100 * quantile:g}th pct of {len(b)} held-out distances); {reference_text(ref)}")
    return ref


# ---------------------------------------------------------------------------
# prior's own validation split (reproduced from its metadata)
# ---------------------------------------------------------------------------
def prior_validation_files(prior) -> tuple[list[Path], list[Path]]:
    """(train files, validation files) of ``recon train``'s patient split for this prior,
    reproduced from ``meta["training"]`` (data folders, seed); image files only
    (their patient id is a hash of the path as given to ``recon train``)."""
    from recon.prior import PRETRAINED_DIR
    from recon.train import IMAGE_SUFFIXES, split_by_patient

    tr = prior.meta.get("training") or {}
    dirs = tr.get("data") or []
    files, patients = [], []
    for d in dirs:
        base = Path.cwd() if (Path.cwd() / d).exists() else PRETRAINED_DIR.parent
        root = base / d
        if not root.exists():
            raise ReconError(f"training data folder {d} of the prior not found (relative to {base})")
        listed = sorted(Path(d) / p.relative_to(root) for p in root.rglob("*") if p.is_file()
                        and p.name.lower() not in ("readme.md", "license"))
        for f in listed:
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                raise ReconError(f"reproducing the prior's split needs image files only; found {f}")
            files.append(base / f)
            patients.append(hashlib.sha1(str(f).encode()).hexdigest()[:10])
    n_expected = int(tr.get("train_images", -1)) + int(tr.get("val_images", -1))
    if len(files) != n_expected:
        raise ReconError(f"cannot reproduce the prior's training split: {len(files)} files now, "
                         f"{n_expected} when it was trained")
    a, b = split_by_patient(patients, seed=int(tr.get("seed", 0)))
    if len(b) != int(tr.get("val_images", -1)):
        raise ReconError("cannot reproduce the prior's training split (validation size differs)")
    return [files[i] for i in a], [files[i] for i in b]


def report_for_run(prior, image01: np.ndarray, what: str) -> dict:
    """The OOD verdict recorded with a score reconstruction (run.json, summary.md): ``image01``
    (a 2-D working-scale image: the input, or the reconstruction for measured data) resized to the
    prior's grid; never raises -- a prior without a reference gets ``{"available": False, ...}``."""
    from recon.preprocess import square_resize

    try:
        img = np.clip(np.asarray(image01, dtype=np.float32), 0, 1)
        x = square_resize(img, int(prior.meta["image_size"]))
        out = check(prior, x[None])
    except ReconError as e:
        return {"available": False, "why": str(e), "checked": what}
    return {"available": True, "checked": what, **out}
