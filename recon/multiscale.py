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

* the **global prior** at high noise: when the prior names one (``meta['global_prior']``, a
  whole-image network trained at a coarser grid, e.g. 64 x 64, where a small U-Net's
  receptive field spans the whole body: ``../shared/notes/global-64-probe.md``), every noise
  level at or above ``global_above`` (in the whole-image prior's own noise units, i.e. native
  noise / scale factor, so the split does not depend on the data's size) is denoised by it in
  the same two bands, on its own coarser grid.  The layout decided at high noise is what it knows.
* the **detail prior** at low noise: when the prior names one (``meta['detail_prior']``,
  a patch network trained at native pixel size by ``recon train --native``, in the
  spirit of PaDIS, Hu et al. 2024) and the data's pixels suit it, every noise level
  below ``detail_below`` (native units of the [0, 1] scale) is denoised by it alone,
  on the data's own grid, over overlapping tiles (:func:`denoise_tiled`).  Above
  that level the two bands above are used: the global layout is decided where
  fine detail is buried in noise anyway.

With ``f = 1`` and an image of the prior's size, and no detail prior, this is
exactly the prior's own denoiser.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from recon.errors import ReconError

__all__ = ["ResampledPrior", "scale_factor", "detail_std_for", "for_data", "denoise_tiled", "detail_applies",
           "scale_record", "DEFAULT_GLOBAL_ABOVE", "measure_detail_std", "PRECISIONS", "DEFAULT_PRECISION",
           "resolve_precision", "native_bf16"]

#: used when a prior's metadata has no measured detail std (fraction of the [0, 1] range)
DEFAULT_DETAIL_STD = 0.03
#: data this many times finer than the prior (or more) are denoised in two bands; between
#: 1/RESAMPLE_ABOVE and RESAMPLE_ABOVE the prior runs on the data's grid directly
RESAMPLE_ABOVE = 1.5
#: noise level (native, [0, 1] scale) below which a detail prior denoises, when neither the
#: call nor the prior's metadata (``detail_below_sigma``) says otherwise
DEFAULT_DETAIL_BELOW = 0.2
#: noise level (the whole-image prior's own units) at or above which a global prior denoises,
#: when neither the call nor the prior's metadata (``global_above_sigma``) says otherwise: the
#: multi-scale probe's level above which denoising at half resolution loses <= 3 %
DEFAULT_GLOBAL_ABOVE = 0.8
#: tiles of the detail prior: its GroupNorm statistics were learned on 64-px patches, so it
#: is run on tiles of a few patch sizes rather than on a 512-px image at once
DETAIL_TILE, DETAIL_OVERLAP = 128, 32


#: network precision of the score methods: 'fp32'; 'bf16' (the network's convolutions and
#: matrix products in bfloat16 under autocast, the EDM skip path and everything outside the
#: network in float32); 'auto': bf16 where the processor computes it natively (CPUs with AMX or
#: AVX512-BF16, CUDA GPUs that support it), else fp32
PRECISIONS = ("fp32", "bf16", "auto")
#: the score methods' default precision
DEFAULT_PRECISION = "auto"


def native_bf16(device) -> bool:
    """Whether ``device`` computes bfloat16 natively (so bf16 is faster, not emulated)."""
    device = torch.device(device)
    if device.type == "cuda":  # Ampere (8.0) and later compute bf16; older cards only emulate it
        return bool(torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8)
    if device.type != "cpu":
        return False
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except (OSError, AttributeError, RuntimeError):
        return False
    return False


def resolve_precision(precision, device) -> str:
    """'fp32' or 'bf16' for ``precision`` (one of :data:`PRECISIONS`) on ``device``."""
    if precision not in PRECISIONS:
        raise ReconError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


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


def measure_detail_std(images, factors) -> dict:
    """``meta['detail_std']`` of a prior: for each scale factor ``f``, the RMS over ``images``
    (a list of (H, W) tensors at native resolution on the [0, 1] scale) of ``x - up(down(x))``,
    area-averaged down by ``f`` and bilinear up, as :class:`ResampledPrior` splits its bands.
    Keys are the factors as text (``'2'``, ``'1.5'``), values rounded to 4 digits."""
    out = {}
    for f in factors:
        f = float(f)
        if not (math.isfinite(f) and f >= 1):
            raise ReconError(f"detail_std factors must be >= 1, got {f}")
        total, count = 0.0, 0
        for img in images:
            x = torch.as_tensor(img, dtype=torch.float32)[None, None]
            h, w = x.shape[-2:]
            low = F.interpolate(x, size=(max(1, round(h / f)), max(1, round(w / f))), mode="area")
            up = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
            total += float(((x - up) ** 2).sum())
            count += h * w
        if count == 0:
            raise ReconError("measure_detail_std needs at least one image")
        out[f"{f:g}"] = round(math.sqrt(total / count), 4)
    return out


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


def _ramp(n: int, overlap: int, dtype, device) -> torch.Tensor:
    """Blending weights of one tile side: a linear ramp over ``overlap`` pixels at each end,
    positive everywhere (so a pixel covered by one tile only gets that tile's value)."""
    i = torch.arange(n, dtype=dtype, device=device)
    if overlap <= 0:
        return torch.ones(n, dtype=dtype, device=device)
    return torch.minimum(torch.ones((), dtype=dtype, device=device),
                         torch.minimum(i + 0.5, n - i - 0.5) / overlap)


def _tile_starts(n: int, tile: int, overlap: int) -> list:
    if n <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, n - tile, stride)) + [n - tile]
    return sorted(set(starts))


def denoise_tiled(prior, x: torch.Tensor, sigma, tile: int = DETAIL_TILE, overlap: int = DETAIL_OVERLAP):
    """``prior``'s denoiser on ``x`` (B, H, W) of any size, over ``tile``-px tiles that overlap by
    ``overlap`` px, blended with linear ramps; all tiles of the batch go to the denoiser as one
    batch (which on the CPU runs the network in chunks, ``recon.prior.CPU_CHUNK_PX``).  An image
    no larger than a tile is denoised whole."""
    b, h, w = x.shape
    th, tw = min(tile, h), min(tile, w)
    ys, xs = _tile_starts(h, th, overlap), _tile_starts(w, tw, overlap)
    if len(ys) == 1 and len(xs) == 1:
        return denoise_any_size(prior, x, sigma)
    tiles = torch.stack([x[:, y:y + th, c:c + tw] for y in ys for c in xs], 1)  # (B, T, th, tw)
    n_t = tiles.shape[1]
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
    s = (s.expand(b) if s.numel() == 1 else s).repeat_interleave(n_t)
    den = denoise_any_size(prior, tiles.reshape(b * n_t, th, tw), s).reshape(b, n_t, th, tw)
    wgt = _ramp(th, overlap, x.dtype, x.device)[:, None] * _ramp(tw, overlap, x.dtype, x.device)[None]
    out = torch.zeros_like(x)
    norm = torch.zeros((h, w), dtype=x.dtype, device=x.device)
    k = 0
    for y in ys:
        for c in xs:
            out[:, y:y + th, c:c + tw] += den[:, k] * wgt
            norm[y:y + th, c:c + tw] += wgt
            k += 1
    return out / norm


def detail_applies(detail, factor: float, pixel_mm: float | None = None,
                   side: int | None = None) -> tuple[bool, str]:
    """Whether a detail prior (trained at native pixels) suits data of ``pixel_mm`` at ``factor``
    native pixels per whole-image-prior pixel, and why.  In order:

    * both pixel sizes known: the data's must lie within 1.5x of the detail prior's training
      range (``pixel_mm_range``);
    * pixel sizes unknown, the detail prior records the larger side of its training images
      (``native_px_range``, 5th-95th percentile) and the data's larger ``side`` is given: it must
      lie within 1.5x of that range (images of a similar matrix show anatomy at a similar pixel
      scale: a brain prior trained on 224-px slices suits 149-336 px);
    * else the data must be much finer than the whole-image prior's grid (``factor`` >= 1.5)."""
    meta = getattr(detail, "meta", {}) or {}
    rng = meta.get("pixel_mm_range") or ([meta["pixel_mm"]] * 2 if meta.get("pixel_mm") else None)
    if pixel_mm and rng:
        lo, hi = float(rng[0]) / RESAMPLE_ABOVE, float(rng[1]) * RESAMPLE_ABOVE
        ok = lo <= float(pixel_mm) <= hi
        return ok, (f"{float(pixel_mm):.3g} mm pixels {'within' if ok else 'outside'} the detail prior's "
                    f"{lo:.3g}-{hi:.3g} mm (its training range within 1.5x)")
    px = meta.get("native_px_range")
    if side and px:
        lo, hi = float(px[0]) / RESAMPLE_ABOVE, float(px[1]) * RESAMPLE_ABOVE
        ok = lo <= float(side) <= hi
        return ok, (f"pixel size of the data or of the detail prior unknown; the data's {int(side)} px side is {'within' if ok else 'outside'} "
                    f"{lo:.0f}-{hi:.0f} px (the detail prior's training images' sides within 1.5x)")
    ok = factor >= RESAMPLE_ABOVE
    return ok, (f"pixel sizes unknown; the data are {factor:.3g}x finer than the whole-image prior's grid "
                f"({'>=' if ok else '<'} {RESAMPLE_ABOVE})")


class ResampledPrior(torch.nn.Module):
    """A prior applied at ``factor`` native pixels per prior pixel, with its detail prior below
    ``detail_below`` (module docstring)."""

    def __init__(self, prior, factor: float = 1.0, detail_std: float | None = None, how: str = "",
                 detail=None, detail_below: float = 0.0, detail_how: str = "", precision: str = "fp32",
                 glob=None, global_above: float = 0.0, global_how: str = ""):
        super().__init__()
        if precision not in ("fp32", "bf16"):
            raise ReconError(f"precision must be 'fp32' or 'bf16' here (resolve 'auto' first), got {precision!r}")
        self.precision = precision
        if not (math.isfinite(factor) and factor > 0):
            raise ReconError(f"the scale factor between the data and the prior must be > 0, got {factor}")
        if not (math.isfinite(detail_below) and detail_below >= 0):
            raise ReconError(f"detail_below must be a noise level >= 0, got {detail_below}")
        self.prior, self.factor, self.how = prior, float(factor), how
        self.resample = self.factor >= RESAMPLE_ABOVE
        self.detail_std = float(detail_std_for(prior, factor) if detail_std is None else detail_std)
        self.detail = detail if detail_below > 0 else None
        self.detail_below = float(detail_below) if detail is not None else 0.0
        self.detail_how = detail_how
        if not (math.isfinite(global_above) and global_above >= 0):
            raise ReconError(f"global_above must be a noise level >= 0, got {global_above}")
        if glob is not None and not isinstance(glob, ResampledPrior):
            raise ReconError("glob must be a ResampledPrior (the global prior on its own grid); use for_data")
        self.glob = glob if global_above > 0 else None
        self.global_above = float(global_above) if self.glob is not None else 0.0
        self.global_how = global_how

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
        name = (getattr(self.detail, "meta", None) or {}).get("name", "detail prior")
        gname = None if self.glob is None else (getattr(self.glob.prior, "meta", None) or {}).get("name", "global prior")
        if self.glob is not None:
            action = (f"{action}; at or above noise {self.global_above:g} (the prior's units): the global prior "
                      f"'{gname}' at 1/{self.glob.factor:.3g} resolution ({self.glob.prior.image_size}-px grid)")
        if self.detail is not None:
            action = (f"below noise {self.detail_below:g}: the detail prior '{name}' at the data's own pixels "
                      f"({DETAIL_TILE}-px tiles); above it: {action}")
        rec = {"scale_factor": round(self.factor, 4), "scale_from": self.how, "action": action,
               "precision": self.precision,
               "prior_image_size": self.prior.image_size,
               "detail_prior": name if self.detail is not None else None, "detail_below": self.detail_below,
               "global_prior": gname, "global_above": self.global_above}
        if self.detail_how:
            rec["detail_from"] = self.detail_how
        if self.global_how:
            rec["global_from"] = self.global_how
        return rec

    def coarse_shape(self, h: int, w: int) -> tuple[int, int]:
        return max(4, round(h / self.factor)), max(4, round(w / self.factor))

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        squeeze = x.dim() == 4
        x3 = x[:, 0] if squeeze else x
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = self._denoise3(x3, sigma)
        out = out.to(x.dtype)
        return out[:, None] if squeeze else out

    def _denoise3(self, x: torch.Tensor, sigma) -> torch.Tensor:
        if self.detail is None and self.glob is None:
            return self._bands(x, sigma)
        b = x.shape[0]
        sig = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        sig = sig.expand(b) if sig.numel() == 1 else sig
        none = torch.zeros(b, dtype=torch.bool, device=x.device)
        low = sig < self.detail_below if self.detail is not None else none
        high = (sig >= self.global_above * self.sigma_scale) & ~low if self.glob is not None else none
        parts = ((low, lambda xs, ss: denoise_tiled(self.detail, xs, ss)),
                 (high, lambda xs, ss: self.glob._bands(xs, ss)),
                 (~(low | high), self._bands))
        for mask, fn in parts:
            if bool(mask.all()):
                return fn(x, sig)
        out = torch.empty_like(x)  # a batch across the splits: each part runs on its own elements
        for mask, fn in parts:
            if bool(mask.any()):
                out[mask] = fn(x[mask], sig[mask]).to(out.dtype)
        return out

    def _bands(self, x: torch.Tensor, sigma) -> torch.Tensor:
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


def for_data(prior, shape, pixel_mm: float | None = None, factor: float | None = None,
             detail_below: float | None = None, precision: str = "fp32",
             global_above: float | None = None) -> ResampledPrior:
    """``prior`` for data of ``shape`` (H, W) with pixels of ``pixel_mm`` (None: unknown);
    ``factor`` overrides the scale (data pixels per prior pixel).  The prior's detail prior
    (``prior.detail_prior``, loaded by :func:`recon.prior.load_prior`) joins below
    ``detail_below`` (default: the prior's ``detail_below_sigma``, else
    :data:`DEFAULT_DETAIL_BELOW`; 0 turns it off) when :func:`detail_applies`.  The prior's global
    prior (``prior.global_prior``) joins at and above ``global_above`` (the prior's own noise units;
    default the prior's ``global_above_sigma``, else :data:`DEFAULT_GLOBAL_ABOVE`; 0 turns it off)
    when its grid is at least 1.5x coarser than the data's.  ``precision``
    ('fp32', 'bf16', 'auto': :data:`PRECISIONS`) is the network's (default fp32 here; the score
    methods pass :data:`DEFAULT_PRECISION`).  A ``prior`` that is already a :class:`ResampledPrior`
    is returned as it is, with its own settings."""
    if isinstance(prior, ResampledPrior):
        return prior
    if factor is not None:
        factor, how = float(factor), "set explicitly (prior_scale)"
    else:
        factor, how = scale_factor(tuple(shape), prior, pixel_mm)
    detail = getattr(prior, "detail_prior", None)
    below, detail_how = 0.0, ""
    if detail is not None:
        meta = getattr(prior, "meta", {}) or {}
        below = float(meta.get("detail_below_sigma", DEFAULT_DETAIL_BELOW) if detail_below is None else detail_below)
        ok, detail_how = detail_applies(detail, factor, pixel_mm, side=max(shape))
        if not ok:
            below = 0.0
        elif below == 0:
            detail_how = "turned off (detail_below=0)"
    device = next((p.device for p in prior.parameters()), torch.device("cpu")) if hasattr(prior, "parameters") \
        else torch.device("cpu")
    precision = resolve_precision(precision, device)
    glob, above, global_how = _global_for(prior, factor, global_above, precision)
    return ResampledPrior(prior, factor, how=how, detail=detail, detail_below=below, detail_how=detail_how,
                          precision=precision, glob=glob, global_above=above, global_how=global_how)


def _global_for(prior, factor: float, global_above: float | None, precision: str):
    """The prior's global prior (``prior.global_prior``) as a :class:`ResampledPrior` on its own grid,
    the level at and above which it denoises, and why (:func:`for_data`)."""
    glob = getattr(prior, "global_prior", None)
    if glob is None:
        return None, 0.0, ""
    meta = getattr(prior, "meta", {}) or {}
    above = float(meta.get("global_above_sigma", DEFAULT_GLOBAL_ABOVE) if global_above is None else global_above)
    if above == 0:
        return None, 0.0, "turned off (global_above=0)"
    gfactor = float(factor) * float(prior.image_size) / float(glob.image_size)
    if gfactor < RESAMPLE_ABOVE:
        return None, 0.0, (f"not used: its {glob.image_size}-px grid is only {gfactor:.3g}x coarser than the "
                           f"data's (< {RESAMPLE_ABOVE})")
    how = (f"{factor:.3g} data pixels per {prior.image_size}-px prior pixel x {prior.image_size}/"
           f"{glob.image_size}")
    return ResampledPrior(glob, gfactor, how=how, precision=precision), above, how


def scale_record(prior, shape, used: dict) -> dict:
    """The run record's ``prior_scale``: what :func:`for_data` does for data of ``shape`` with
    the options a method ``used`` (``pixel_mm``, ``prior_scale``, ``detail_below``, ``precision``,
    ``global_above``)."""
    return for_data(prior, shape, used.get("pixel_mm"), used.get("prior_scale"), used.get("detail_below"),
                    used.get("precision", DEFAULT_PRECISION), used.get("global_above")).describe()
