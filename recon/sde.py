"""Forward SDEs of score-based generative modelling (Song et al., ICLR 2021).

One small interface shared by samplers, losses and the likelihood:

* ``sde(x, t) -> (drift, diffusion)`` of dx = f(x, t) dt + g(t) dw,
* ``marginal(x0, t) -> (mean, std)`` of the perturbation kernel p_t(x | x0),
* ``scale_sigma(t) -> (s, sigma)`` with x_t = s (x0 + sigma z): every SDE here
  is a rescaled VE process, so one EDM denoiser D(x, sigma) serves them all,
* ``prior_sample(shape, generator)`` and ``prior_logp(z)`` at t = T,
* ``discretize(x, t, dt)`` and ``reverse(score_fn, probability_flow)``.

Times are tensors of shape (B,) in [eps, T] with T = 1.
"""
from __future__ import annotations

import math

import torch


def _bc(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample (B,) tensor over x's trailing dims."""
    return v.reshape(-1, *([1] * (x.dim() - 1)))


def _as_t(t, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.expand(x.shape[0]) if t.dim() == 0 else t


class SDE:
    """Base class: subclasses define ``sde``, ``scale_sigma`` and ``prior_sample``."""

    T: float = 1.0
    name: str = "sde"

    def sde(self, x, t):  # pragma: no cover - abstract
        raise NotImplementedError

    def scale_sigma(self, t):  # pragma: no cover - abstract
        raise NotImplementedError

    def marginal(self, x0: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        t = _as_t(t, x0)
        s, sigma = self.scale_sigma(t)
        return _bc(s, x0) * x0, _bc(s * sigma, x0)

    def prior_std(self) -> float:
        s, sigma = self.scale_sigma(torch.tensor([self.T], dtype=torch.float64))
        return float(s * sigma)

    def prior_sample(self, shape, generator=None, dtype=torch.float32, device=None):
        return torch.randn(shape, generator=generator, dtype=dtype, device=device) * self.prior_std()

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        std = self.prior_std()
        n = z[0].numel()
        return -n / 2 * math.log(2 * math.pi * std**2) - z.flatten(1).pow(2).sum(1) / (2 * std**2)

    def discretize(self, x, t, dt: float):
        """Euler-Maruyama discretisation: x_{t+dt} = x + f dt + G sqrt(|dt|) z."""
        drift, diffusion = self.sde(x, t)
        return drift * dt, diffusion * math.sqrt(abs(dt))

    def reverse(self, score_fn, probability_flow: bool = False):
        """Drift and diffusion of the reverse-time SDE (or probability-flow ODE)."""
        fwd = self

        def rsde(x, t):
            drift, diffusion = fwd.sde(x, t)
            g2 = _bc(diffusion**2, x)
            score = score_fn(x, t)
            if probability_flow:
                return drift - 0.5 * g2 * score, torch.zeros_like(diffusion)
            return drift - g2 * score, diffusion

        return rsde

    def timesteps(self, n: int, eps: float = 1e-5, dtype=torch.float64):
        return torch.linspace(self.T, eps, n, dtype=dtype)

    def to_config(self) -> dict:
        return {"name": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


class VESDE(SDE):
    """Variance exploding: sigma(t) = sigma_min (sigma_max / sigma_min)^t."""

    name = "ve"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 20.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def scale_sigma(self, t):
        return torch.ones_like(t), self.sigma(t)

    def sde(self, x, t):
        t = _as_t(t, x)
        sigma = self.sigma(t)
        g = sigma * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))
        return torch.zeros_like(x), g

    def t_of_sigma(self, sigma):
        return torch.log(torch.as_tensor(sigma) / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)


class VPSDE(SDE):
    """Variance preserving (DDPM): beta(t) = beta_min + t (beta_max - beta_min)."""

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0 < beta_min < beta_max:
            raise ValueError(f"need 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def _log_alpha(self, t):
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def scale_sigma(self, t):
        la = self._log_alpha(t)
        s = torch.exp(la)
        std = torch.sqrt(-torch.expm1(2 * la))
        return s, std / s

    def sde(self, x, t):
        t = _as_t(t, x)
        beta = self.beta(t)
        return -0.5 * _bc(beta, x) * x, torch.sqrt(beta)

    def prior_std(self) -> float:
        return 1.0


class SubVPSDE(VPSDE):
    """sub-VP: same drift as VP, diffusion beta(t) (1 - exp(-2 int beta))."""

    name = "subvp"

    def scale_sigma(self, t):
        la = self._log_alpha(t)
        s = torch.exp(la)
        std = -torch.expm1(2 * la)  # 1 - alpha^2
        return s, std / s

    def sde(self, x, t):
        t = _as_t(t, x)
        beta = self.beta(t)
        disc = -torch.expm1(-2 * self.beta_min * t - (self.beta_max - self.beta_min) * t**2)
        return -0.5 * _bc(beta, x) * x, torch.sqrt(beta * disc)


SDES = {"ve": VESDE, "vp": VPSDE, "subvp": SubVPSDE}


def sde_from_config(cfg: dict) -> SDE:
    cfg = dict(cfg)
    name = cfg.pop("name", "ve")
    if name not in SDES:
        raise ValueError(f"unknown SDE '{name}'; available: {', '.join(SDES)}")
    return SDES[name](**cfg)
