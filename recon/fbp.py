"""Filtered backprojection for the CT operators of ``forward_models.ct``.

``fbp(y, operator, filter='ramp')`` returns ``(B, size, size)`` images.

* Parallel beam: ramp filtering of each view (the band-limited ramp of Kak &
  Slaney eq. 3.61, as in ``skimage.transform.iradon``, zero-padded to the next
  power of two ≥ 2·n_det), optional window, then a pixel-driven backprojection
  with linear interpolation, weighted by each view's angular share ``Δθ``.
  With the geometry of ``ParallelBeamCT.like_skimage`` it reproduces
  ``iradon(..., circle=False)``.
* Fan beam (flat detector): the weighted FBP for a full 360° scan (Kak &
  Slaney §3.4.2): cosine pre-weighting ``D / sqrt(D² + u²)``, ramp filtering
  at the detector spacing scaled to the rotation axis, and a pixel-driven
  backprojection weighted by ``R² / L²`` (``L``: distance from the source
  along the central ray) and ``Δβ / 2``.  Short scans would need Parker
  weights, which are not implemented: use an iterative solver there.

View weights: every view gets half the sum of the angular gaps to its two
neighbours (angles taken modulo π for parallel, 2π for fan, so the weights of a
full scan sum to the period): equally spaced sets get ``period / n`` and uneven
sets (random, golden-angle, sparse subsets of a measured scan) are weighted by
the angular interval each view represents.  A gap wider than
``WEDGE_FACTOR`` (8) times the median gap is a missing wedge (limited-angle
scans), not sampling: it counts as 8 median gaps, so the views at its edges are
not stretched over the missing range.  (Capping every gap at the median, as
before, halved the image of uniformly random angle sets.)  The backprojection
is pixel-driven rather than ``op.AH`` (the ray-driven Joseph adjoint has
Moiré-like weight variations that a reconstruction should not show).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from forward_models.base import check_tensor
from forward_models.ct import FanBeamCT, ParallelBeamCT

__all__ = ["fbp", "ramp_filter", "FILTERS", "view_weights", "WEDGE_FACTOR"]


def _shepp_logan(n):
    omega = np.pi * np.fft.fftfreq(n)
    w = np.ones(n)
    w[1:] = np.sin(omega[1:]) / omega[1:]
    return w


FILTERS = {
    "ramp": lambda n: np.ones(n),
    "shepp-logan": _shepp_logan,
    "cosine": lambda n: np.fft.fftshift(np.sin(np.linspace(0, np.pi, n, endpoint=False))),
    "hamming": lambda n: np.fft.fftshift(np.hamming(n)),
    "hann": lambda n: np.fft.fftshift(np.hanning(n)),
}


def ramp_filter(n_det: int, filter: str = "ramp") -> np.ndarray:
    """Frequency response (length ``P``, the padded size) of the windowed ramp.

    Unit detector spacing; convolving with it approximates ``h * p`` where ``h``
    is the ideal ramp's kernel (``|ω|`` band-limited to the sampling rate).
    """
    if filter not in FILTERS:
        raise ValueError(f"unknown filter {filter!r}; expected one of {sorted(FILTERS)}")
    size = max(64, int(2 ** math.ceil(math.log2(2 * n_det))))
    n = np.concatenate([np.arange(1, size / 2 + 1, 2, dtype=int),
                        np.arange(size / 2 - 1, 0, -2, dtype=int)])
    f = np.zeros(size)
    f[0] = 0.25
    f[1::2] = -1 / (np.pi * n) ** 2
    return np.real(np.fft.fft(f)) * FILTERS[filter](size)


#: a gap between neighbouring views wider than this many median gaps is a missing wedge
WEDGE_FACTOR = 8.0


def view_weights(angles: np.ndarray, period: float) -> np.ndarray:
    """Angular weight of each view: half the gaps to its two neighbours (cyclic modulo
    ``period``), gaps capped at ``WEDGE_FACTOR`` median gaps (module docstring)."""
    a = np.mod(np.asarray(angles, dtype=np.float64), period)
    order = np.argsort(a, kind="stable")
    s = a[order]
    gaps = np.diff(np.concatenate([s, [s[0] + period]]))  # gap after each sorted view
    positive = gaps[gaps > 1e-12]
    cap = WEDGE_FACTOR * np.median(positive) if positive.size else period
    gaps = np.minimum(gaps, cap)
    share = 0.5 * (gaps + np.roll(gaps, 1))
    w = np.empty_like(share)
    w[order] = share
    return w


def _filter_views(y: torch.Tensor, n_det: int, filter: str, spacing: float) -> torch.Tensor:
    resp = torch.from_numpy(ramp_filter(n_det, filter)).to(device=y.device, dtype=y.dtype)
    size = resp.numel()
    spec = torch.fft.fft(y, n=size, dim=-1) * resp
    return torch.fft.ifft(spec, dim=-1).real[..., :n_det] / spacing


def _backproject(q, geometry, chunk_pixels):
    """Σ_v weight[v, p] · q[:, v, det_index[v, p]] (linear interpolation, zero outside).

    ``geometry(v0, v1)`` returns ``(det_index, weight)`` of shape (v1 - v0, n_pixels).
    """
    B, V, n_det = q.shape
    qp = torch.nn.functional.pad(q, (1, 1))  # zero neighbours for interpolation
    out = None
    step = None
    v0 = 0
    while v0 < V:
        if step is None:
            n_pix = geometry(0, 1)[0].shape[1]
            step = max(1, chunk_pixels // max(1, B * n_pix))
            out = q.new_zeros(B, n_pix)
        v1 = min(V, v0 + step)
        det_index, weight = geometry(v0, v1)
        k = det_index + 1.0
        inside = (k >= 0) & (k <= n_det + 1)
        k0 = torch.floor(k).clamp(0, n_det)
        w1 = (k - k0).clamp(0, 1)
        idx = k0.long().unsqueeze(0).expand(B, -1, -1)
        lo = torch.gather(qp[:, v0:v1], 2, idx)
        hi = torch.gather(qp[:, v0:v1], 2, (idx + 1).clamp(max=n_det + 1))
        out += ((lo + (hi - lo) * w1) * (weight * inside)).sum(1)
        v0 = v1
    return out


def fbp(y: torch.Tensor, operator, filter: str = "ramp", *, circle: bool = False,
        chunk_pixels: int = 1 << 22) -> torch.Tensor:
    """Filtered backprojection of sinograms ``(B, n_views, n_det)`` -> ``(B, size, size)``.

    ``operator``: the ``ParallelBeamCT`` or ``FanBeamCT`` that produced ``y``.
    ``filter``: 'ramp', 'shepp-logan', 'cosine', 'hamming' or 'hann'.
    ``circle=True`` zeroes pixels outside the inscribed circle.
    """
    if not isinstance(operator, (ParallelBeamCT, FanBeamCT)):
        raise ValueError(f"fbp needs a ParallelBeamCT or FanBeamCT, got {type(operator).__name__}")
    check_tensor(y, operator.out_shape, "fbp sinogram")
    if filter not in FILTERS:
        raise ValueError(f"unknown filter {filter!r}; expected one of {sorted(FILTERS)}")
    if y.is_complex():
        raise ValueError(f"fbp expects a real sinogram, got {y.dtype}")
    if not y.is_floating_point():
        y = y.float()
    dev, dt = y.device, y.dtype
    size, n_det = operator.size, operator.n_det
    angles = operator.geom.angles  # float64 radians (the buffer may have been cast)
    c = operator.center
    grid = torch.arange(size, device=dev, dtype=torch.float64)
    x = (grid - c)[None, :].expand(size, size).reshape(-1)  # columns
    yy = (c - grid)[:, None].expand(size, size).reshape(-1)  # rows, y up
    th = torch.from_numpy(angles).to(dev)
    cos_all, sin_all = th.cos()[:, None], th.sin()[:, None]
    if isinstance(operator, FanBeamCT):
        R, D = operator.source_distance, operator.detector_distance
        u = torch.from_numpy((np.arange(n_det) - operator.det_center) * operator.det_spacing)
        pre = (D / torch.sqrt(D ** 2 + u ** 2)).to(device=dev, dtype=dt)
        q = _filter_views(y * pre, n_det, filter, operator.det_spacing * R / D)
        dtheta = torch.from_numpy(0.5 * view_weights(angles, 2 * np.pi)).to(dev)[:, None]

        def geometry(v0, v1):
            cos, sin = cos_all[v0:v1], sin_all[v0:v1]
            L = R - x[None] * sin + yy[None] * cos  # distance from source along central ray
            det_index = D * (x[None] * cos + yy[None] * sin) / L / operator.det_spacing
            return ((det_index + operator.det_center).to(dt),
                    (dtheta[v0:v1] * (R / L) ** 2).to(dt))
    else:
        q = _filter_views(y, n_det, filter, operator.det_spacing)
        dtheta = torch.from_numpy(view_weights(angles, np.pi)).to(device=dev, dtype=dt)[:, None]

        def geometry(v0, v1):
            s = x[None] * cos_all[v0:v1] + yy[None] * sin_all[v0:v1]
            return (s / operator.det_spacing + operator.det_center).to(dt), dtheta[v0:v1]

    img = _backproject(q, geometry, chunk_pixels)
    img = img.reshape(y.shape[0], size, size)
    if circle:
        inside = (x ** 2 + yy ** 2 <= (size / 2) ** 2).reshape(size, size).to(dt)
        img = img * inside
    return img
