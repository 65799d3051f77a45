"""Image-quality metrics: PSNR, SSIM, NMSE.

Thin, strict wrappers around scikit-image (the reference implementation):

* ``psnr(x, ref, data_range)`` == ``skimage.metrics.peak_signal_noise_ratio(ref, x, data_range=data_range)``
* ``ssim(x, ref, data_range)`` == ``skimage.metrics.structural_similarity(ref, x, data_range=data_range)``
  (skimage defaults: 7x7 uniform window, K1=0.01, K2=0.03; extra keyword
  arguments are passed through)
* ``nmse(x, ref)`` == ``||x - ref||^2 / ||ref||^2`` ==
  ``skimage.metrics.normalized_root_mse(ref, x, normalization='euclidean')**2``

Inputs may be numpy arrays or torch tensors (any device; converted to float64
numpy).  The last two axes are the image; any leading axes are a batch:
a 2-D input gives a Python ``float``, an input of shape ``(*lead, H, W)`` gives
a float64 numpy array of shape ``lead`` (one value per image).

``data_range`` is required and explicit (e.g. ``1.0`` for images normalised
to [0, 1]); it is never inferred from the dtype or the data.  Complex inputs
are rejected (take ``abs()`` first), as are non-finite values and shape
mismatches (``ValueError`` naming both shapes).
"""
from __future__ import annotations

import math
from typing import Union

import numpy as np

from recon.errors import ReconError
from recon.preprocess import CT_WINDOW

__all__ = ["psnr", "ssim", "nmse", "compute_metrics", "center_crop", "body_mask", "hu_metrics"]

ArrayLike = Union[np.ndarray, "torch.Tensor"]  # noqa: F821


def _to_numpy(a, name: str) -> np.ndarray:
    try:
        import torch

        if isinstance(a, torch.Tensor):
            a = a.detach().cpu()
            if a.is_complex():
                raise ValueError(f"{name} is complex ({a.dtype}); take abs() first")
            a = a.to(torch.float64).numpy()
    except ImportError:  # pragma: no cover
        pass
    a = np.asarray(a)
    if np.iscomplexobj(a):
        raise ValueError(f"{name} is complex ({a.dtype}); take abs() first")
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise ValueError(f"{name} must be a numeric array, got dtype {a.dtype}")
    return a.astype(np.float64, copy=False)


def _prepare(x, ref):
    x = _to_numpy(x, "x")
    ref = _to_numpy(ref, "ref")
    if x.shape != ref.shape:
        raise ValueError(f"shape mismatch: x has shape {x.shape}, ref has shape {ref.shape}")
    if x.ndim < 2:
        raise ValueError(f"expected 2-D images (or a batch (..., H, W)); got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"x (shape {x.shape}) contains NaN or infinite values")
    if not np.isfinite(ref).all():
        raise ValueError(f"ref (shape {ref.shape}) contains NaN or infinite values")
    lead = x.shape[:-2]
    return x.reshape(-1, *x.shape[-2:]), ref.reshape(-1, *ref.shape[-2:]), lead


def _check_range(data_range) -> float:
    try:
        dr = float(data_range)
    except (TypeError, ValueError):
        raise ValueError(f"data_range must be a positive number, got {data_range!r}") from None
    if not (math.isfinite(dr) and dr > 0):
        raise ValueError(f"data_range must be a positive finite number, got {data_range!r}")
    return dr


def _finish(vals, lead):
    vals = np.asarray(vals, dtype=np.float64)
    if len(lead) == 0:
        return float(vals[0])
    return vals.reshape(lead)


def psnr(x: ArrayLike, ref: ArrayLike, data_range: float) -> Union[float, np.ndarray]:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range^2 / MSE)``
    (``inf`` when ``x == ref``)."""
    from skimage.metrics import peak_signal_noise_ratio

    dr = _check_range(data_range)
    xs, rs, lead = _prepare(x, ref)
    vals = []
    for a, r in zip(xs, rs):
        mse = np.mean((a - r) ** 2)
        if mse == 0:
            vals.append(np.inf)  # skimage would warn about the division by zero
        else:
            vals.append(peak_signal_noise_ratio(r, a, data_range=dr))
    return _finish(vals, lead)


def ssim(x: ArrayLike, ref: ArrayLike, data_range: float, **kwargs) -> Union[float, np.ndarray]:
    """Structural similarity (scikit-image's ``structural_similarity`` with its
    defaults; ``kwargs`` such as ``win_size`` or ``gaussian_weights`` pass
    through).  Images smaller than the window (7x7) raise ``ValueError``."""
    from skimage.metrics import structural_similarity

    dr = _check_range(data_range)
    for bad in ("full", "gradient", "channel_axis"):
        if kwargs.get(bad):
            raise ValueError(f"ssim: option {bad!r} is not supported by this wrapper")
    xs, rs, lead = _prepare(x, ref)
    vals = [structural_similarity(r, a, data_range=dr, **kwargs) for a, r in zip(xs, rs)]
    return _finish(vals, lead)


def nmse(x: ArrayLike, ref: ArrayLike) -> Union[float, np.ndarray]:
    """Normalised mean squared error ``||x - ref||^2 / ||ref||^2`` per image
    (``ValueError`` if ``ref`` is all zeros)."""
    xs, rs, lead = _prepare(x, ref)
    vals = []
    for a, r in zip(xs, rs):
        den = np.sum(r ** 2)
        if den == 0:
            raise ValueError("nmse: ref is all zeros, so the normalised error is undefined")
        vals.append(np.sum((a - r) ** 2) / den)
    return _finish(vals, lead)


def center_crop(img: np.ndarray, shape) -> np.ndarray:
    """The centred ``shape`` window of ``img`` (a reconstruction larger than its reference)."""
    h, w = img.shape
    H, W = shape
    if H > h or W > w:
        raise ReconError(f"the reference is {H}x{W} but the reconstruction only {h}x{w}")
    top, left = (h - H) // 2, (w - W) // 2
    return img[top:top + H, left:left + W]


def compute_metrics(recon: np.ndarray, truth: np.ndarray) -> dict:
    """PSNR / SSIM / NMSE of ``clip(recon, 0, 1)`` against ``clip(truth, 0, 1)`` (data_range 1):
    the [0, 1] scale of the working window (CT: -1000..1000 HU by default).

    Strict: the shapes must match (a reference of another size is not a ground truth of the
    same image; crop explicitly with :func:`center_crop` where a convention says so)."""
    r = np.clip(np.asarray(recon, dtype=np.float64), 0, 1)
    t = np.clip(np.asarray(truth, dtype=np.float64), 0, 1)  # CT truth keeps bone above the window (> 1)
    if r.shape != t.shape:
        raise ReconError(f"the reference is {'x'.join(map(str, t.shape))} but the reconstruction "
                         f"{'x'.join(map(str, r.shape))}; metrics need both at the same size")
    return {"psnr": float(psnr(r, t, data_range=1.0)), "ssim": float(ssim(r, t, data_range=1.0)),
            "nmse": float(nmse(r, t))}


#: clinical display windows (HU): brain for heads, soft tissue for bodies, lung for the chest
CLINICAL_WINDOWS = {"brain": (0.0, 80.0), "soft_tissue": (-160.0, 240.0), "lung": (-1350.0, 150.0)}


def clinical_window_for(body_part: str | None) -> list[str]:
    """The clinical windows that matter for a DICOM BodyPartExamined (first: the one to show)."""
    part = (body_part or "").upper()
    if any(k in part for k in ("HEAD", "BRAIN", "SKULL")):
        return ["brain"]
    if any(k in part for k in ("CHEST", "LUNG", "THORAX")):
        return ["lung", "soft_tissue"]
    return ["soft_tissue"]


def clinical_windows_of(volume) -> list[str]:
    """:func:`clinical_window_for` the BodyPartExamined of a read volume (``recon.io.Volume``,
    DICOM; any other volume, or None, has no body part: soft tissue)."""
    datasets = getattr(volume, "datasets", None) or []
    return clinical_window_for(str(datasets[0].get("BodyPartExamined") or "") if datasets else None)


def hu_metrics(recon_hu: np.ndarray, truth_hu: np.ndarray) -> dict:
    """CT in clinical terms: RMSE in HU over the full range (nothing clipped), and PSNR/SSIM
    inside each clinical window of :data:`CLINICAL_WINDOWS` (both images mapped to the window
    and clipped to it, data_range 1), e.g. ``psnr_brain``, ``ssim_lung``; and the same inside the
    patient only (``rmse_hu_body``, ``psnr_body``, ``ssim_body``: :func:`_body_metrics`), so the
    patient table and the air around the patient do not decide the figures.  ``(z, y, x)``
    volumes: PSNR over the volume, SSIM averaged over the slices."""
    r = np.asarray(recon_hu, dtype=np.float64)
    t = np.asarray(truth_hu, dtype=np.float64)
    if r.shape != t.shape:
        raise ReconError(f"hu_metrics: shapes differ, {r.shape} vs {t.shape}")
    out = {"rmse_hu": float(np.sqrt(np.mean((r - t) ** 2)))}
    for name, (lo, hi) in CLINICAL_WINDOWS.items():
        rw, tw = _windowed(r, lo, hi), _windowed(t, lo, hi)
        out[f"psnr_{name}"] = _psnr_unit(float(np.mean((rw - tw) ** 2)))
        planes = [(rw, tw)] if r.ndim == 2 else list(zip(rw, tw))
        out[f"ssim_{name}"] = float(np.mean([ssim(a, b, data_range=1.0) for a, b in planes]))
    out.update(_body_metrics(r, t))
    return out


def _windowed(hu: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """HU mapped to ``[lo, hi] -> [0, 1]`` and clipped there (float64, for the metrics)."""
    return np.clip((hu - lo) / (hi - lo), 0, 1)


def _psnr_unit(mse: float) -> float:
    """PSNR in dB of a mean squared error on a [0, 1] scale (``inf`` when it is 0)."""
    return float(10 * np.log10(1.0 / mse)) if mse > 0 else float("inf")


#: HU above which a pixel may belong to the patient (fat is about -100, lung -900 to -500 but
#: enclosed by the chest wall, so it is filled in as a hole)
BODY_HU = -500.0
#: the body must cover at least this fraction of a slice for body metrics to be reported
BODY_MIN_FRACTION = 0.01


def body_mask(truth_hu: np.ndarray) -> np.ndarray:
    """The patient in a CT slice (or each slice of a ``(z, y, x)`` volume), from the reference:
    pixels above :data:`BODY_HU`, opened by 3 pixels (cuts thin bridges to the table, sheets and
    cables), holes filled (lungs, airways, bowel gas), and the largest connected piece kept.
    Everything else is outside the body: air, the patient table, head holders."""
    from scipy import ndimage as ndi

    t = np.asarray(truth_hu, dtype=np.float64)
    if t.ndim == 3:
        return np.stack([body_mask(s) for s in t])
    if t.ndim != 2:
        raise ReconError(f"body_mask: expected a 2-D slice or a (z, y, x) volume, got shape {t.shape}")
    m = ndi.binary_opening(t > BODY_HU, structure=ndi.generate_binary_structure(2, 1), iterations=3)
    lab, n = ndi.label(m)
    if n == 0:
        return m
    sizes = ndi.sum(m, lab, index=np.arange(1, n + 1))
    return ndi.binary_fill_holes(lab == 1 + int(np.argmax(sizes)))


def _body_metrics(r: np.ndarray, t: np.ndarray) -> dict:
    """RMSE in HU, and PSNR/SSIM on the default working window (:data:`recon.preprocess.CT_WINDOW`,
    that of the headline PSNR), inside :func:`body_mask` of the
    reference only (``rmse_hu_body``, ``psnr_body``, ``ssim_body``; the SSIM map of the whole
    slice averaged over the body); nothing when no slice holds a body."""
    from skimage.metrics import structural_similarity

    m = body_mask(t)
    planes = [(r, t, m)] if r.ndim == 2 else list(zip(r, t, m))
    planes = [p for p in planes if p[2].mean() >= BODY_MIN_FRACTION]
    if not planes:
        return {}
    lo, hi = CT_WINDOW
    se_hu, se, n, ss = 0.0, 0.0, 0, []
    for a, b, mk in planes:
        aw, bw = _windowed(a, lo, hi), _windowed(b, lo, hi)
        se_hu += float(np.sum((a - b)[mk] ** 2))
        se += float(np.sum((aw - bw)[mk] ** 2))
        n += int(mk.sum())
        _, smap = structural_similarity(bw, aw, data_range=1.0, full=True)
        ss.append(float(np.mean(smap[mk])))
    return {"rmse_hu_body": float(np.sqrt(se_hu / n)), "psnr_body": _psnr_unit(se / n),
            "ssim_body": float(np.mean(ss))}
