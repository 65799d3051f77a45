"""Measurement noise models, seeded through a ``torch.Generator``.

``noise(y, generator=g)`` returns a noisy copy of ``y`` (same shape, dtype and
device).  The generator must live on ``y``'s device.
"""
from __future__ import annotations

import math

import torch

__all__ = ["GaussianNoise", "PoissonNoise"]


def _check(y: torch.Tensor, name: str):
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"{name} input must be a torch.Tensor, got {type(y).__name__}")
    if not torch.isfinite(y).all():
        raise ValueError(f"{name} input contains NaN or infinite values")


class GaussianNoise:
    """Additive white Gaussian noise of standard deviation ``sigma``.

    Absolute by default: ``y + sigma * n`` in the measurement's units.  With
    ``relative=True`` the standard deviation is ``sigma * rms(y)`` per batch
    item (rms over the entries of that item; over measured entries when a
    ``mask`` is passed).  Complex measurements (k-space) get independent
    ``N(0, sigma²)`` noise on the real and the imaginary part.  ``mask``
    (broadcastable to ``y``) keeps unmeasured entries exactly zero.
    """

    def __init__(self, sigma: float, relative: bool = False):
        sigma = float(sigma)
        if not math.isfinite(sigma) or sigma < 0:
            raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
        self.sigma, self.relative = sigma, bool(relative)

    def std(self, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Noise standard deviation per batch item, shape ``(B, 1, ..., 1)``."""
        shape = (y.shape[0],) + (1,) * (y.dim() - 1)
        if not self.relative:
            return torch.full(shape, self.sigma, dtype=y.real.dtype, device=y.device)
        power = y.abs() ** 2
        if mask is not None:
            m = torch.broadcast_to(mask.to(power), power.shape)
            rms = ((power * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)).sqrt()
        else:
            rms = power.flatten(1).mean(1).sqrt()
        return self.sigma * rms.view(shape)

    def __call__(self, y: torch.Tensor, generator: torch.Generator | None = None,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        _check(y, "GaussianNoise")
        real = y.real.dtype if y.is_complex() else (y.dtype if y.is_floating_point() else torch.float32)
        n = torch.randn(y.shape, generator=generator, dtype=real, device=y.device)
        if y.is_complex():
            n = torch.complex(n, torch.randn(y.shape, generator=generator, dtype=real, device=y.device))
        n = n * self.std(y, mask)
        if mask is not None:
            n = n * mask.to(device=y.device, dtype=real)
        return y + n

    def __repr__(self):
        return f"GaussianNoise(sigma={self.sigma}, relative={self.relative})"


class PoissonNoise:
    """Low-dose CT: photon counts ``~ Poisson(I0 * exp(-p))`` for line integrals ``p``.

    Returns the post-log sinogram ``-log(max(counts, 1) / I0)``.  ``p`` must be
    in attenuation units (line integrals of μ times the pixel size), real.
    """

    def __init__(self, I0: float):
        I0 = float(I0)
        if not math.isfinite(I0) or I0 <= 0:
            raise ValueError(f"I0 (incident photons per ray) must be a positive number, got {I0}")
        self.I0 = I0

    def __call__(self, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check(y, "PoissonNoise")
        if y.is_complex():
            raise ValueError("PoissonNoise expects a real sinogram of line integrals")
        dt = y.dtype if y.is_floating_point() else torch.float32
        rate = self.I0 * torch.exp(-y.to(torch.float64))
        counts = torch.poisson(rate, generator=generator)
        return (-torch.log(counts.clamp_min(1.0) / self.I0)).to(dt)

    def __repr__(self):
        return f"PoissonNoise(I0={self.I0})"
