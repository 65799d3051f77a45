"""A prior at any image size: the learned band at the prior's scale plus a native detail band.

A shipped prior is a network trained at one pixel scale (``image_size``
pixels across its training field of view).  :class:`ResampledPrior` gives the
samplers one denoiser ``D(x, sigma)`` on the data's own grid, any size, odd or
non-square, in two bands:

* the **coarse band**: ``x`` is averaged down by the scale factor ``f`` to
  the prior's pixel size (averaging ``f x f`` pixels divides white noise's std
  by ``f``), denoised there by the network at ``sigma / f`` (padded by
  reflection to a size the network accepts, with coordinates of the unpadded
  image), and interpolated back up.  This is the multi-scale observation of
  ``../shared/notes/multiscale-probe.md``: at high noise, denoising at reduced
  resolution loses almost nothing, and the global layout is what the
  low-resolution network knows.
* the **detail band** ``h = x - up(down(x))`` that the coarse grid cannot
  hold: a Gaussian model with per-pixel signal std ``detail_std`` (measured on
  training images at native resolution, stored in the prior's metadata) gives
  the Wiener estimate ``h * a / (a + n)`` with ``a = detail_std^2`` and ``n``
  the noise variance in that band, ``sigma^2 (1 - 1 / f^2)``.  At high noise
  the band is suppressed, at low noise it is kept: the data-consistency steps
  of the samplers then fill in the details the measurement supports.

A patch network trained at native pixel size can replace the Gaussian detail
band at low noise later (PaDIS, Hu et al. 2024); the interface stays.

With ``f = 1`` and an image of the prior's size this is exactly the prior's
own denoiser.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from recon.errors import ReconError

__all__ = ["ResampledPrior", "scale_factor", "detail_std_for", "for_data"]

#: used when a prior's metadata has no measured detail std (fraction of the [0, 1] range)
DEFAULT_DETAIL_STD = 0.03
#: data this many times finer than the prior (or more) are denoised in two bands; between
#: 1/RESAMPLE_ABOVE and RESAMPLE_ABOVE the prior runs on the data's grid directly
RESAMPLE_ABOVE = 1.5


def scale_factor(native_shape, prior, native_pixel_mm: float | None = None) -> tuple[float, str]:
    """Native pixels per prior pixel, and how it was found: the larger image side over the
    prior's ``image_size``, i.e. the data's field of view is mapped onto the prior's grid as
    its training images were (each training slice was resized to ``image_size`` whatever its
    field of view).  When the pixel sizes of the data and of the prior (``meta['pixel_mm']``,
    the median over its training slices) are known and the resampled pixel differs from the
    prior's by more than 1.5x, the description says so (a warning, not a different scale:
    measured on ``ct/val/ge_head`` at 128 px, rescaling a head's 250 mm field of view to the
    chest-trained prior's 2.97 mm pixels lost 6 dB against the plain grid mapping)."""
    factor = max(native_shape) / float(prior.image_size)
    how = f"image size {max(native_shape)} px onto the prior's {prior.image_size} px grid"
    prior_mm = (getattr(prior, "meta", {}) or {}).get("pixel_mm")
    if native_pixel_mm and prior_mm:
        seen = float(native_pixel_mm) * factor
        ratio = seen / float(prior_mm)
        how += f"; {seen:.3g} mm per prior pixel against {float(prior_mm):.3g} mm in training"
        if not 1 / RESAMPLE_ABOVE <= ratio <= RESAMPLE_ABOVE:
            how += (f" (WARNING: {max(ratio, 1 / ratio):.2g}x {'coarser' if ratio > 1 else 'finer'} than the "
                    "prior's training pixels: anatomy appears at a scale the prior has seen rarely)")
    return factor, how


def detail_std_for(prior, factor: float) -> float:
    """Per-pixel std of the detail band at ``factor`` from ``meta['detail_std']`` ({factor: std}),
    interpolated in log factor; the default when not measured."""
    table = (getattr(prior, "meta", {}) or {}).get("detail_std")
    if not table:
        return DEFAULT_DETAIL_STD
    pts = sorted((float(k), float(v)) for k, v in table.items())
    if factor <= pts[0][0]:
        return pts[0][1]
    if factor >= pts[-1][0]:
        return pts[-1][1]
    for (f0, s0), (f1, s1) in zip(pts[:-1], pts[1:]):
        if f0 <= factor <= f1:
            t = (math.log(factor) - math.log(f0)) / (math.log(f1) - math.log(f0))
            return s0 + t * (s1 - s0)
    return pts[-1][1]  # pragma: no cover


def _network_multiple(prior) -> int:
    net = getattr(getattr(prior, "denoiser", None), "net", None)
    return int(getattr(net, "factor", 1) or 1)


def denoise_any_size(prior, x: torch.Tensor, sigma) -> torch.Tensor:
    """``prior``'s denoiser on ``x`` (B, H, W) of any size: reflection-padded to a size the
    network accepts, with the coordinate channels of the unpadded image, then cropped."""
    b, h, w = x.shape
    m = _network_multiple(prior)
    ph, pw = (-h) % m, (-w) % m
    if ph == 0 and pw == 0:
        return prior.denoise(x, sigma)
    top, left = ph // 2, pw // 2
    mode = "reflect" if (top < h and ph - top < h and left < w and pw - left < w) else "replicate"
    xp = F.pad(x[:, None], (left, pw - left, top, ph - top), mode=mode)
    net = prior.denoiser.net
    coords = None
    if getattr(net, "coords", False):
        off = torch.tensor([[-top, -left]], dtype=xp.dtype, device=xp.device).expand(b, 2)
        coords = net.coordinate_grid(b, h + ph, w + pw, offset=off, full=(h, w), dtype=xp.dtype, device=xp.device)
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
    s = s.expand(b) if s.numel() == 1 else s
    out = prior.denoiser(xp.float(), s, coords).to(x.dtype)
    return out[:, 0, top:top + h, left:left + w]


class ResampledPrior(torch.nn.Module):
    """A prior applied at ``factor`` native pixels per prior pixel (module docstring)."""

    def __init__(self, prior, factor: float = 1.0, detail_std: float | None = None, how: str = ""):
        super().__init__()
        if not (math.isfinite(factor) and factor > 0):
            raise ReconError(f"the scale factor between the data and the prior must be > 0, got {factor}")
        self.prior, self.factor, self.how = prior, float(factor), how
        self.resample = self.factor >= RESAMPLE_ABOVE
        self.detail_std = float(detail_std_for(prior, factor) if detail_std is None else detail_std)

    # the Prior interface the samplers use
    @property
    def meta(self):
        return self.prior.meta

    @property
    def image_size(self):
        return self.prior.image_size

    @property
    def window(self):
        return self.prior.window

    @property
    def sigma_scale(self) -> float:
        """Native noise std per unit of the prior's noise std: the samplers' noise levels are
        multiplied by it so that the coarse band sees the prior's own range."""
        if not self.resample:
            return 1.0
        return self.factor

    @property
    def sde(self):
        from recon.sde import VESDE

        sde = self.prior.sde
        if self.sigma_scale == 1.0 or not isinstance(sde, VESDE):
            return sde
        return VESDE(sde.sigma_min * self.sigma_scale, sde.sigma_max * self.sigma_scale)

    def describe(self) -> dict:
        """For run records: the scale, how it was found, and what was done about it."""
        if self.resample:
            action = (f"two bands: the prior at 1/{self.factor:.3g} resolution, a Gaussian detail band "
                      f"(std {self.detail_std:.3g}) at the data's resolution")
        elif self.factor <= 1 / RESAMPLE_ABOVE:
            action = ("WARNING: the data are coarser than the prior's pixels by {:.3g}x; the prior runs on the "
                      "data's grid as it is".format(1 / self.factor))
        else:
            action = "the prior runs on the data's grid (scale within 1.5x)"
        return {"scale_factor": round(self.factor, 4), "scale_from": self.how, "action": action,
                "prior_image_size": self.prior.image_size}

    def coarse_shape(self, h: int, w: int) -> tuple[int, int]:
        return max(4, round(h / self.factor)), max(4, round(w / self.factor))

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        squeeze = x.dim() == 4
        x3 = x[:, 0] if squeeze else x
        out = self._denoise3(x3, sigma)
        return out[:, None] if squeeze else out

    def _denoise3(self, x: torch.Tensor, sigma) -> torch.Tensor:
        b, h, w = x.shape
        ch, cw = self.coarse_shape(h, w)
        if not self.resample or (ch, cw) == (h, w):
            return denoise_any_size(self.prior, x, sigma)
        low = F.interpolate(x[:, None], size=(ch, cw), mode="area")
        f2 = self.factor ** 2  # pixels averaged per coarse pixel
        sig = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
        d_low = denoise_any_size(self.prior, low[:, 0], (sig / math.sqrt(f2)).reshape(-1))
        up_low = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        up_d = F.interpolate(d_low[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        a = self.detail_std ** 2
        n = sig ** 2 * max(1.0 - 1.0 / f2, 0.0)
        gain = a / (a + n) if a > 0 else torch.zeros_like(sig)
        return up_d + gain * (x - up_low)


def for_data(prior, shape, pixel_mm: float | None = None, factor: float | None = None) -> ResampledPrior:
    """``prior`` for data of ``shape`` (H, W) with pixels of ``pixel_mm`` (None: unknown);
    ``factor`` overrides the scale (data pixels per prior pixel)."""
    if isinstance(prior, ResampledPrior):
        return prior
    if factor is not None:
        return ResampledPrior(prior, float(factor), how="set explicitly (prior_scale)")
    factor, how = scale_factor(tuple(shape), prior, pixel_mm)
    return ResampledPrior(prior, factor, how=how)
