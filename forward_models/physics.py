"""Physics = a measurement operator plus a noise model; one ``Measurement`` type.

``Physics(op, noise).simulate(x, generator)`` returns a :class:`Measurement`
``y = noise(A x)`` with the realised noise level ``sigma_y`` (in the units of
``y``) and a provenance record ``info``.  Measured data (a sinogram or k-space
read from a file) are wrapped in the same :class:`Measurement` type, so a
reconstructor never needs to know where ``y`` came from (the idea of deepinv's
physics objects).

Noise models here take the clean measurement and the operator and return
``(y, sigma_y, info)``:

* :class:`NoNoise` -- noise-free.
* :class:`RelativeGaussian` -- additive Gaussian noise with standard deviation
  ``sigma * rms(A x)`` (rms over the measured entries when the operator has a
  sampling ``mask``; complex k-space gets noise on both parts).
* :class:`LowDoseCT` -- Poisson photon counts on physical line integrals.

CT line integrals
-----------------
For an image ``x`` on the [0, 1] scale of an HU window ``(lo, hi)``,
``HU = (hi - lo) x + lo`` and the linear attenuation is
``mu = mu_water (1 + HU / 1000)`` with ``mu_water = 0.0192 / mm`` (~70 keV).
Line integrals in physical units are ``p = pixel_mm A(mu) = a A(x) + b A(1)``
with ``a = pixel_mm mu_water (hi - lo) / 1000`` and
``b = pixel_mm mu_water (1 + lo / 1000)`` (:func:`ct_line_integral_coefficients`);
the operator has unit pixels, so ``pixel_mm`` carries the physical scale.
Counts ``~ Poisson(I0 exp(-p))``, ``p_noisy = -log(max(counts, 1) / I0)``, and
the methods see ``y = (p_noisy - b A(1)) / a``, the sinogram in the units of
``A(x)``; ``sigma_y`` is the standard deviation of ``y - A(x)`` realised.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .noise import GaussianNoise, PoissonNoise

__all__ = ["Measurement", "Physics", "NoNoise", "RelativeGaussian", "LowDoseCT", "MU_WATER",
           "ct_line_integral_coefficients"]

MU_WATER = 0.0192  # linear attenuation of water, 1/mm (~70 keV)


@dataclass(eq=False)
class Measurement:
    """A measurement ``y`` (batch first) with its operator, simulated or measured.

    ``sigma_y`` is the noise standard deviation in the units of ``y`` (0 for
    noise-free data).  ``reference`` is an optional image on the working scale
    that the reconstruction may be scored against (for measured data: a
    reference reconstruction shipped with the data); ``info`` records how
    ``y`` was made or read.
    """

    y: torch.Tensor
    op: Any
    sigma_y: float = 0.0
    info: dict = field(default_factory=dict)
    reference: np.ndarray | None = None


class NoNoise:
    """Noise-free measurement."""

    def __call__(self, clean, op, generator):
        return clean, 0.0, {"model": "none"}


class RelativeGaussian:
    """Gaussian noise of std ``sigma * rms(A x)`` on the measured entries (``op.mask`` if any)."""

    def __init__(self, sigma: float):
        self.sigma = float(sigma)

    def __call__(self, clean, op, generator):
        mask = getattr(op, "mask", None)
        noise = GaussianNoise(self.sigma, relative=True)
        std = float(noise.std(clean, mask).flatten()[0])
        return noise(clean, generator=generator, mask=mask), std, {"model": "gaussian",
                                                                    "relative_sigma": self.sigma}


def ct_line_integral_coefficients(window, pixel_mm: float) -> tuple[float, float]:
    """``(a, b)`` with physical line integrals ``p = a A(x) + b A(1)`` (module docstring)."""
    lo, hi = window
    a = pixel_mm * MU_WATER * (hi - lo) / 1000.0
    b = pixel_mm * MU_WATER * (1.0 + lo / 1000.0)
    return a, b


class LowDoseCT:
    """Poisson counts with ``I0`` photons per ray on the line integrals of a windowed image."""

    def __init__(self, I0: float, window, pixel_mm: float):
        self.I0, self.window, self.pixel_mm = float(I0), tuple(float(v) for v in window), float(pixel_mm)

    def __call__(self, clean, op, generator):
        a, b = ct_line_integral_coefficients(self.window, self.pixel_mm)
        ones = torch.ones((clean.shape[0], *op.in_shape), dtype=clean.dtype, device=clean.device)
        ones_p = op.A(ones).double()
        p = a * clean.double() + b * ones_p
        p_noisy = PoissonNoise(self.I0)(p, generator=generator)
        y = ((p_noisy - b * ones_p) / a).to(clean.dtype)
        sigma_y = float((y.double() - clean.double()).std())
        return y, sigma_y, {"model": "poisson", "I0": self.I0, "pixel_mm": self.pixel_mm,
                            "mu_water_per_mm": MU_WATER, "window": list(self.window), "a": a, "b": b,
                            "max_line_integral": float(p.max())}


class Physics:
    """``y = noise(A x)``: an operator and a noise model (default noise-free)."""

    def __init__(self, op, noise=None):
        self.op, self.noise = op, noise or NoNoise()

    @torch.no_grad()
    def simulate(self, x: torch.Tensor, generator: torch.Generator) -> Measurement:
        """Measure ``x`` (batch first, on the operator's device) with a seeded generator."""
        clean = self.op.A(x)
        y, sigma_y, info = self.noise(clean, self.op, generator)
        info["sigma_y"] = sigma_y
        return Measurement(y=y, op=self.op, sigma_y=sigma_y, info=info)
