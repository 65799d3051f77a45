"""Log-likelihood under a prior via the probability-flow ODE (Song et al., ICLR 2021, Sec. 4.3).

In the scaled VE space the probability-flow ODE is du/dsigma = (u - D(u, sigma)) / sigma
(Karras et al. 2022, eq. 3 with sigma(t) = t).  Integrating u and the divergence of
the velocity from sigma_min to sigma_max gives

    log p_0(u_0) = log N(u_T; 0, sigma_max^2 I) + int div f dsigma,

with the divergence estimated by Hutchinson's trace estimator (Rademacher probes).
Bits per dimension follow the usual convention for data in [0, 1] quantised to
256 levels: bpd = -log p / (D ln 2) + 8.
"""
from __future__ import annotations

import math

import torch

from recon.errors import ReconError


def _velocity(prior, u, sigma):
    return (u - prior.denoise(u, sigma)) / sigma


def _div(prior, u, sigma, probes):
    with torch.enable_grad():
        ug = u.detach().requires_grad_(True)
        f = _velocity(prior, ug, sigma)
        total = 0.0
        for eps in probes:
            g = torch.autograd.grad((f * eps).sum(), ug, retain_graph=True)[0]
            total = total + (g * eps).flatten(1).sum(1)
    return f.detach(), total / len(probes)


#: fewer ODE steps than this give bits/dim too inaccurate to report without a warning
MIN_RELIABLE_STEPS = 16


def reliability_warnings(bits_per_dim: float, n_steps: int) -> list[str]:
    """Why a bits/dim estimate should not be trusted (empty when nothing is suspicious):
    a negative value (impossible for data quantised to 256 levels) or too few ODE steps."""
    out = []
    if bits_per_dim < 0:
        out.append(f"bits/dim {bits_per_dim:.3g} is negative, which is impossible for 8-bit-quantised data: "
                   f"the estimate is unreliable; raise --steps (now {n_steps}, e.g. 64 or more)")
    if n_steps < MIN_RELIABLE_STEPS:
        out.append(f"--steps {n_steps} is below {MIN_RELIABLE_STEPS}: the ODE discretisation error makes the "
                   "estimate unreliable; raise --steps (e.g. 64)")
    return out


def log_likelihood(prior, x: torch.Tensor, *, sigma_min: float = 0.002, sigma_max: float = 20.0,
                   n_steps: int = 64, n_probes: int = 1, generator=None):
    """Return (log p(x) in nats per image, bits per dimension) for x of shape (B, H, W)."""
    for name, v in (("n_steps", n_steps), ("n_probes", n_probes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ReconError(f"likelihood: {name} must be an integer >= 1, got {v!r}")
    if not (0 < sigma_min < sigma_max and math.isfinite(sigma_max)):
        raise ReconError(f"likelihood: need 0 < sigma_min < sigma_max (finite), got {sigma_min}, {sigma_max}")
    if x.dim() != 3:
        raise ValueError(f"expected images of shape (B, H, W), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("input contains NaN or infinite values")
    d = x[0].numel()
    # geometric grid from sigma_min to sigma_max; Heun steps on u and log-density
    sig = torch.exp(torch.linspace(math.log(sigma_min), math.log(sigma_max), n_steps + 1, dtype=torch.float64)).tolist()
    u = x.clone()
    delta = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for i in range(n_steps):
        s, s2 = sig[i], sig[i + 1]
        h = s2 - s
        probes = [torch.randint(0, 2, u.shape, generator=generator, device=u.device).to(u.dtype) * 2 - 1
                  for _ in range(n_probes)]
        f1, dv1 = _div(prior, u, s, probes)
        u_pred = u + h * f1
        f2, dv2 = _div(prior, u_pred, s2, probes)
        u = u + h * 0.5 * (f1 + f2)
        delta = delta + h * 0.5 * (dv1 + dv2).double()
        if not torch.isfinite(u).all():
            raise ReconError(f"likelihood ODE produced non-finite values at step {i} (sigma={s:.4g})")
    prior_logp = (-d / 2 * math.log(2 * math.pi * sigma_max**2)
                  - u.double().flatten(1).pow(2).sum(1) / (2 * sigma_max**2))
    logp = prior_logp + delta
    bpd = -logp / (d * math.log(2)) + 8.0
    return logp, bpd
