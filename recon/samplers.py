"""Samplers: short functions over an explicit noise schedule.

All samplers work in the *scaled* space of the prior's SDE: with
x_t = s(t) (x0 + sigma(t) z) every SDE of ``recon.sde`` is a VE process in
u = x / s, so predictor, corrector and data consistency are written once.
Every sampler takes an explicit ``torch.Generator`` and checks each step for
non-finite values.

As in k-diffusion, the noise schedule and the starting sample can be injected:
the Karras-schedule samplers (``ode_sample``, ``dps_sample``, ``dds_sample``)
take ``sigmas=`` (default :func:`karras_sigmas` of their ``n_steps``,
``sigma_min``, ``sigma_max``, ``rho``), ``pc_sample`` takes SDE times
``timesteps=`` (default :func:`sde_timesteps`), and all take ``x_init=`` (default:
prior noise at the first level, drawn from the generator).  Passing the
defaults explicitly gives bit-identical results.

Implemented:
* ``pc_sample`` -- predictor-corrector (Song et al., ICLR 2021, Alg. 1-3):
  reverse-diffusion or Euler-Maruyama predictor, Langevin corrector driven by
  ``snr``.  With ``consistency`` it is the conditional sampler of Song, Shen,
  Xing & Ermon (ICLR 2022): before every predictor and corrector step the
  sample is replaced by T^-1[lam Lambda y_t + (1 - lam) Lambda T x + (I - Lambda) T x].
* ``ode_sample`` -- the probability-flow ODE with Heun steps on the EDM
  schedule (Karras et al., NeurIPS 2022, Alg. 1).
* ``dps_sample`` -- diffusion posterior sampling (Chung et al., ICLR 2023).
* ``dds_sample`` -- a fast solver: Tweedie estimate, a few conjugate-gradient
  steps on the data term, full re-noising (in the style of DDS, Chung, Lee &
  Ye, ICLR 2024), on a Karras schedule of <= 100 network evaluations.  With
  ``z_weight > 0`` the batch is one volume (consecutive slices along the batch
  axis) and the data step adds a TV penalty along z, solved by ADMM with CG
  inner solves (:class:`ZTVDataStep`, as in DiffusionMBIR, Chung et al. CVPR
  2023, and DDS).
"""
from __future__ import annotations

import math

import torch

from forward_models.base import cgls, complex_dtype
from recon.baselines import grad_z, grad_z_adjoint, operator_norm
from recon.errors import ReconError
from recon.sde import SDE


# ---------------------------------------------------------------------------
# small utilities
# ---------------------------------------------------------------------------
def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 10.0, rho: float = 7.0):
    """Noise levels of Karras et al. (2022), eq. 5, descending, without the final 0 (float64)."""
    i = torch.arange(n, dtype=torch.float64)
    ramp = i / max(n - 1, 1)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def sde_timesteps(sde: SDE, n_steps: int = 1000, eps: float = 1e-3) -> torch.Tensor:
    """SDE times of ``pc_sample``: ``n_steps`` equally spaced from ``sde.T`` down to ``eps`` (float64)."""
    return torch.linspace(sde.T, eps, n_steps, dtype=torch.float64)


def _schedule(values, name: str) -> torch.Tensor:
    """An injected schedule as a float64 1-D tensor; descending and finite, else ValueError."""
    v = values.detach() if isinstance(values, torch.Tensor) else torch.as_tensor(values, dtype=torch.float64)
    if v.is_complex() or v.dim() != 1:
        raise ValueError(f"{name} must be a real 1-D tensor, got shape {tuple(v.shape)} and dtype {v.dtype}")
    v = v.to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(v).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if len(v) > 1 and not bool((v[1:] <= v[:-1]).all()):
        raise ValueError(f"{name} must be descending (largest noise level first)")
    return v


def _sigma_list(sigmas, default) -> list:
    """The Karras samplers' levels as Python floats ending in 0: ``sigmas`` if given (a
    trailing 0 is optional), else ``default()`` (built lazily)."""
    if sigmas is None:
        return default().tolist() + [0.0]
    v = _schedule(sigmas, "sigmas")
    if len(v) and bool((v[:-1] <= 0).any() or v[-1] < 0):
        raise ValueError("sigmas must be positive (only the last one may be 0)")
    out = v.tolist()
    if not out or out[-1] != 0:
        out.append(0.0)
    return out


def _initial(x_init, shape, sigma0: float, generator, dtype, device) -> torch.Tensor:
    """The starting sample: ``x_init`` (shape-checked, cast to dtype/device) or prior noise."""
    if x_init is None:
        return torch.randn(shape, generator=generator, dtype=dtype, device=device) * sigma0
    x = torch.as_tensor(x_init).detach()
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"x_init has shape {tuple(x.shape)}, expected {tuple(shape)}")
    if x.is_complex() or not torch.isfinite(x).all():
        raise ValueError("x_init must be a real tensor with finite values")
    return x.to(dtype=dtype, device=device).clone()


def check_finite(x: torch.Tensor, step: int, sigma: float, snr: float | None = None, where: str = "") -> None:
    if not torch.isfinite(x).all():
        extra = f", snr {snr}" if snr is not None else ""
        raise ReconError(
            f"sampler produced non-finite values at step {step} (noise level sigma={float(sigma):.4g}{extra}"
            f"{', ' + where if where else ''}); lower snr or the step size, or check the prior and the data"
        )


def _randn(x, generator):
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def _as_measurement(op, x):
    return op.A(x.to(complex_dtype(x.dtype))) if op.is_complex_input else op.A(x)


def cgls_data_step(op, y, x0, n_iter: int = 10, damp: float = 0.0):
    """Data step of the fast solver: ``argmin_x ||A x - y||^2 + damp ||x - x0||^2`` over real
    images, by CGLS started at x0 (``forward_models.cgls``).  Items stop at a relative
    residual set by the dtype's precision, so converged items never drift along the null space."""
    tol = torch.finfo(x0.dtype).eps * 1000
    return cgls(op, y, n_iter=n_iter, x0=x0, tol=tol, damp=math.sqrt(damp), x_ref=x0, real=True)


def _soft_threshold(v: torch.Tensor, t: float) -> torch.Tensor:
    """``sign(v) max(|v| - t, 0)``: the prox of ``t ||.||_1`` (real tensors)."""
    return torch.sign(v) * torch.clamp(v.abs() - t, min=0.0)


#: ADMM penalty of :class:`ZTVDataStep` relative to ``||A||^2`` (rho = ZTV_RHO * ||A||^2).
#: With noise-free data the data term leaves the null space of A free, so solved to the end
#: the step would be "min TV_z subject to A x = y" whatever the weight; what keeps the prior's
#: estimate is the short solve (one ADMM iteration of ``cg_iters`` CG steps per level, started
#: at the Tweedie estimate).  A large rho makes that short solve flatten the volume along z:
#: on the tuning volume (see ``recon.score_methods.SCORE_FAST_Z_WEIGHT``), 23 views, slices
#: 0-5, 20 steps, volume PSNR 34.58 dB uncoupled, best z_weight per rho: rho 1 -> 33.59,
#: 0.1 -> 34.48, 0.03 -> 35.00, 0.01 -> 35.14, 0.003 -> 35.15, 0.001 -> 35.03 dB.
ZTV_RHO = 0.003


class ZTVDataStep:
    """Data step with slice consistency (issue #11): over real volumes ``x`` whose batch
    axis is z (consecutive slices), ``argmin_x 0.5 ||A x - y||^2 + 0.5 damp ||x - x0||^2
    + lam ||D_z x||_1`` with ``lam = z_weight ||A||^2`` (the relative weight convention of
    :mod:`recon.baselines`) and ``D_z`` the forward difference along the batch axis
    (:func:`recon.baselines.grad_z`, Neumann boundary).

    Solved by ADMM on the split ``v = D_z x`` (scaled dual ``u``), as DiffusionMBIR
    (Chung et al., CVPR 2023) and DDS (Chung, Lee & Ye, ICLR 2024) do:

    * x-update: ``n_iter`` CG iterations, started at the current estimate, on the
      normal equations ``(A^T A + damp + rho D_z^T D_z) x = A^T y + damp x0 +
      rho D_z^T (v - u)`` (one coupled system: inner products over the whole volume);
    * ``v = soft(D_z x + u, lam / rho)``;  ``u = u + D_z x - v``.

    ``rho = ZTV_RHO ||A||^2`` (``rho`` given: ``rho ||A||^2``).  The splitting variables
    ``v, u`` start at zero and are carried from one call (noise level) to the next, as
    DiffusionMBIR and DDS share them across diffusion steps; each call runs
    ``admm_iters`` ADMM iterations started at ``x0`` (the Tweedie estimate).
    """

    def __init__(self, op, y, z_weight: float, admm_iters: int = 1, op_norm: float | None = None,
                 rho: float | None = None):
        self.op, self.y = op, y
        s2 = float(op_norm) ** 2 if op_norm is not None else operator_norm(op, y.device, y.real.dtype) ** 2
        self.lam = float(z_weight) * s2
        self.rho = (ZTV_RHO if rho is None else float(rho)) * s2
        self.admm_iters = int(admm_iters)
        self.v = self.u = None
        self._aty = None

    def _adj(self, r):
        out = self.op.AH(r)
        return out.real if out.is_complex() else out

    def _normal(self, x, damp):
        out = self._adj(_as_measurement(self.op, x)) + self.rho * grad_z_adjoint(grad_z(x))
        return out + damp * x if damp else out

    def _cg(self, x, b, n_iter, damp):
        tol2 = (torch.finfo(x.dtype).eps * 1000) ** 2
        r = b - self._normal(x, damp)
        p = r.clone()
        gamma = float((r * r).sum())
        stop = tol2 * max(float((b * b).sum()), torch.finfo(x.dtype).tiny)
        for _ in range(int(n_iter)):
            if gamma <= stop:
                break
            q = self._normal(p, damp)
            delta = float((p * q).sum())
            if not delta > 0:
                break
            alpha = gamma / delta
            x = x + alpha * p
            r = r - alpha * q
            gamma_new = float((r * r).sum())
            p = r + (gamma_new / gamma) * p
            gamma = gamma_new
        return x

    def __call__(self, x0, n_iter: int = 10, damp: float = 0.0):
        if self._aty is None:
            self._aty = self._adj(self.y)
            self.v = torch.zeros_like(x0)
            self.u = torch.zeros_like(x0)
        x = x0
        rhs0 = self._aty + damp * x0 if damp else self._aty
        for _ in range(self.admm_iters):
            x = self._cg(x, rhs0 + self.rho * grad_z_adjoint(self.v - self.u), n_iter, damp)
            dz = grad_z(x)
            self.v = _soft_threshold(dz + self.u, self.lam / self.rho)
            self.u = self.u + dz - self.v
        return x


# ---------------------------------------------------------------------------
# data consistency: (u, sigma, step_scale) -> u, in the scaled space
# ---------------------------------------------------------------------------
class ProjectionConsistency:
    """Song et al. (2022): x <- T^-1[lam Lambda y_t + (1-lam) Lambda T x + (I-Lambda) T x].

    y_t = y + sigma Lambda T z is the measurement brought to the current
    noise level with fresh noise.  With measurement noise ``sigma_y`` (in the
    units of y) the measurement already carries noise of that size: only the
    missing variance is added, and while the sample's own noise is smaller
    than the measurement's the projection weight is reduced to
    lam * (sigma c_T)^2 / sigma_y^2, so noisy data are never enforced exactly
    (c_T is the RMS row norm of T, which converts image noise into
    measurement noise).

    Where ``T`` has an exact inverse (``T.exact_inverse``: the centred FFT of MRI, the
    identity of inpainting) the formula is applied as written.  Where it has none (CT: the
    dense-view Radon transform, whose least-squares inverse is ill-conditioned -- measured at
    256x256, 23 views: more CGLS iterations made the step diverge) the same step is taken as
    the minimum-norm correction ``x <- x + A^+ lam (y_t - A x)`` (``A^+`` by ``inverse_iters``
    CGLS iterations on A itself, started at zero), the projection onto the relaxed measured
    set.  For a unitary ``T`` the two coincide (``A^+ = T^H Lambda``).
    """

    def __init__(self, y, op, lam: float = 1.0, sigma_y: float = 0.0, generator=None, inverse_iters: int = 10):
        dec = op.decompose()
        self.T, self.embed, self.mask = dec.T, dec.embed, dec.mask
        self.op, self.y = op, y
        self.exact = bool(getattr(self.T, "exact_inverse", False))
        self.y_full = self.embed(y)
        self.lam, self.sigma_y, self.g = float(lam), float(sigma_y), generator
        self.inverse_iters = inverse_iters
        self.complex = op.is_complex_input
        probe = torch.randn((1, *self.T.in_shape), generator=generator, dtype=torch.float64)
        tz = self._T(probe.to(y.real.dtype))
        self.c_T = float(tz.abs().pow(2).mean().sqrt()) if tz.numel() else 1.0

    def _T(self, x):
        if self.complex:
            x = x.to(complex_dtype(x.dtype))
        return self.T.A(x)

    def __call__(self, u, sigma, lam=None):
        lam = self.lam if lam is None else lam
        sigma = float(sigma)
        meas_sigma = sigma * self.c_T
        extra = math.sqrt(max(meas_sigma**2 - self.sigma_y**2, 0.0)) / self.c_T
        if self.sigma_y > 0 and meas_sigma < self.sigma_y:
            lam = lam * (meas_sigma / self.sigma_y) ** 2
        if not self.exact:
            y_t = self.y + extra * _as_measurement(self.op, _randn(u, self.g)) if extra > 0 else self.y
            r = lam * (y_t - _as_measurement(self.op, u))
            return u + cgls(self.op, r, n_iter=self.inverse_iters, real=True)
        y_t = self.y_full + extra * self._T(_randn(u, self.g)) if extra > 0 else self.y_full
        tx = self._T(u)
        z = tx + lam * self.mask * (y_t - tx)
        out = self.T.inverse(z, x0=u, n_iter=self.inverse_iters)
        return out.real if out.is_complex() else out


# ---------------------------------------------------------------------------
# predictor-corrector
# ---------------------------------------------------------------------------
def pc_sample(prior, shape, *, sde: SDE | None = None, n_steps: int = 1000, snr: float = 0.16,
              n_corrector: int = 1, predictor: str = "reverse_diffusion", corrector: str = "langevin", consistency=None,
              final_lam: float | None = 1.0, eps: float = 1e-3, generator=None, callback=None,
              dtype=torch.float32, device=None, denoise: bool = True, timesteps=None, x_init=None):
    """Predictor-corrector sampling, unconditional or with ``consistency``.

    Returns x0 of ``shape`` (B, H, W).  ``predictor`` is 'reverse_diffusion'
    or 'euler_maruyama'; ``n_corrector`` Langevin steps per level with step
    size 2 (snr ||z|| / ||score||)^2, capped at 2 (snr sigma)^2; ``corrector`` 'langevin'
    (Song et al.) or 'vp' (the same step with its noise scaled so that it keeps the variance
    of noise at the current level, :func:`_vp_langevin`).  The last step uses lam = ``final_lam``
    and a final Tweedie denoising step (``denoise``).

    ``timesteps``: descending positive SDE times, one per step (default
    ``sde_timesteps(sde, n_steps, eps)``; when given, ``n_steps`` and ``eps``
    are ignored).  ``x_init``: the starting sample of ``shape`` in the scaled
    space u = x / s(t) (for a VE SDE simply x; default: Gaussian noise of std
    sigma(t_0) from ``generator``).
    """
    if predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor '{predictor}'; available: {', '.join(PREDICTORS)}")
    if corrector not in CORRECTORS:
        raise ValueError(f"unknown corrector '{corrector}'; available: {', '.join(CORRECTORS)}")
    sde = sde or prior.sde
    if timesteps is None:
        ts = sde_timesteps(sde, n_steps, eps)
    else:
        ts = _schedule(timesteps, "timesteps")
        if len(ts) == 0 or not bool((ts > 0).all()):
            raise ValueError("timesteps must hold at least one time, all positive")
        n_steps = len(ts)
    _, sigmas = sde.scale_sigma(ts)
    u = _initial(x_init, shape, float(sigmas[0]), generator, dtype, device)
    dc = consistency or (lambda u, sigma, lam=None: u)
    step_fn = PREDICTORS[predictor]
    correct = CORRECTORS[corrector]
    for i in range(n_steps):
        sigma = float(sigmas[i])
        sigma_next = float(sigmas[i + 1]) if i + 1 < n_steps else 0.0
        last = i == n_steps - 1
        lam = final_lam if last else None
        for _ in range(n_corrector):
            u = dc(u, sigma, lam)
            score = (prior.denoise(u, sigma) - u) / sigma**2
            z = _randn(u, generator)
            zn = z.flatten(1).norm(dim=1)
            # ||score|| of a denoiser that sees noise of std sigma is about ||z|| / sigma; where it
            # sees less (structured errors it keeps as signal, e.g. a native-pixel detail prior at
            # low noise), the step 2 (snr ||z|| / ||score||)^2 would grow without bound and inject
            # noise far above sigma that the denoiser then keeps (measured: CT 256x256, 23 views,
            # 100 steps, 23.2 dB; capped, 27.1 dB): capped at 2 (snr sigma)^2, the annealed
            # Langevin step of Song & Ermon (2019) for a denoiser that sees the noise it is told
            gn = score.flatten(1).norm(dim=1).clamp_min(1e-12).maximum(zn / sigma)
            step = (2 * (snr * zn / gn) ** 2).reshape(-1, *[1] * (u.dim() - 1))
            u = correct(u, score, z, step, sigma)
            check_finite(u, i, sigma, snr, "corrector")
        u = dc(u, sigma, lam)
        u = step_fn(prior, u, sigma, sigma_next, generator, ts[i], ts[i + 1] if not last else None, sde)
        check_finite(u, i, sigma, snr, "predictor")
        if callback is not None:
            callback(i, u)
    if denoise:
        u = prior.denoise(u, float(sigmas[-1]))
        if consistency is not None and final_lam:
            u = dc(u, 0.0, final_lam)
    check_finite(u, n_steps, float(sigmas[-1]), snr, "final denoising")
    return u


def _reverse_diffusion(prior, u, sigma, sigma_next, generator, *_):
    score = (prior.denoise(u, sigma) - u) / sigma**2
    var = sigma**2 - sigma_next**2
    return u + var * score + math.sqrt(var) * _randn(u, generator)


def _euler_maruyama(prior, u, sigma, sigma_next, generator, t, t_next, sde):
    """Euler-Maruyama step of the reverse SDE in the scaled (VE-equivalent) space,
    du = -g^2(t) score dt + g(t) dw with g^2 = d sigma^2 / dt evaluated at t (not the exact
    variance difference used by the reverse-diffusion predictor)."""
    t = float(t)
    dt = t - (float(t_next) if t_next is not None else 0.0)
    h = min(1e-4, t / 2)
    sig_prev = float(sde.scale_sigma(torch.tensor([t - h], dtype=torch.float64))[1])
    g2 = (sigma**2 - sig_prev**2) / h
    score = (prior.denoise(u, sigma) - u) / sigma**2
    return u + g2 * dt * score + math.sqrt(max(g2 * dt, 0.0)) * _randn(u, generator)


PREDICTORS = {"reverse_diffusion": _reverse_diffusion, "euler_maruyama": _euler_maruyama}


def _langevin(u, score, z, step, sigma):
    """Langevin corrector step (Song et al. 2021, Alg. 4): u + eps score + sqrt(2 eps) z."""
    return u + step * score + torch.sqrt(2 * step) * z


def _vp_langevin(u, score, z, step, sigma):
    """The Langevin step with its noise scaled to keep the variance of noise at level sigma.

    With a = eps / sigma^2, the noise of a sample at level sigma (score -n / sigma^2) becomes
    (1 - a) n + sigma sqrt(2a - a^2) z: variance sigma^2 again, where the plain step leaves
    sigma^2 / (1 - a/2) (the unadjusted Langevin algorithm's stationary variance on a
    Gaussian; with the capped step a = 2 snr^2, i.e. 2.8x at snr 0.8).  Equal to
    :func:`_langevin` to first order in a; a is capped at 1, where the step is "denoise,
    then add fresh noise of std sigma" (D(u) + sigma z).  Along signal directions whose
    variance is far above sigma^2 the step shrinks the spread by about (1 - a/2), so it
    leans toward the posterior mean: more accurate images, less diverse samples.
    """
    a = (step / sigma**2).clamp(max=1.0)
    return u + (a * sigma**2) * score + sigma * torch.sqrt(2 * a - a * a) * z


CORRECTORS = {"langevin": _langevin, "vp": _vp_langevin}


# ---------------------------------------------------------------------------
# probability-flow ODE (Heun, Karras et al. 2022 Alg. 1)
# ---------------------------------------------------------------------------
def ode_sample(prior, shape, *, n_steps: int = 40, sigma_min: float = 0.002, sigma_max: float = 20.0,
               rho: float = 7.0, generator=None, dtype=torch.float32, device=None, callback=None,
               sigmas=None, x_init=None):
    """Heun steps of the probability-flow ODE from ``sigmas[0]`` down to 0.

    ``sigmas``: descending noise levels (default ``karras_sigmas(n_steps,
    sigma_min, sigma_max, rho)``; a trailing 0 is optional).  ``x_init``: the
    starting sample of ``shape`` (default: noise of std ``sigmas[0]``).
    """
    sigmas = _sigma_list(sigmas, lambda: karras_sigmas(n_steps, sigma_min, sigma_max, rho))
    n_steps = len(sigmas) - 1
    x = _initial(x_init, shape, sigmas[0], generator, dtype, device)
    for i in range(n_steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - prior.denoise(x, s)) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d2 = (x_next - prior.denoise(x_next, s_next)) / s_next
            x_next = x + (s_next - s) * 0.5 * (d + d2)
        x = x_next
        check_finite(x, i, s, where="ODE step")
        if callback is not None:
            callback(i, x)
    return x


# ---------------------------------------------------------------------------
# DPS (Chung et al., ICLR 2023)
# ---------------------------------------------------------------------------
def dps_sample(y, op, prior, *, n_steps: int = 500, zeta: float = 1.0, sigma_max: float = 10.0,
               sigma_min: float = 0.002, generator=None, callback=None, clip=None,
               sigmas=None, x_init=None):
    """Ancestral sampling plus a step -zeta grad_x ||y - A D(x, sigma)|| (Chung et al. 2023, Alg. 1).

    ``sigmas``: descending noise levels (default ``karras_sigmas(n_steps,
    sigma_min, sigma_max)``; a trailing 0 is optional).  ``x_init``: the
    starting sample ``(B, *op.in_shape)`` (default: noise of std ``sigmas[0]``).
    """
    sigmas = _sigma_list(sigmas, lambda: karras_sigmas(n_steps, sigma_min, sigma_max))
    n_steps = len(sigmas) - 1
    shape = (y.shape[0], *op.in_shape)
    dtype = y.real.dtype
    x = _initial(x_init, shape, sigmas[0], generator, dtype, y.device)
    for i in range(n_steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            x0 = prior.denoise(xg, s)
            res = (_as_measurement(op, x0) - y).abs().pow(2).flatten(1).sum(1).sqrt()
            grad = torch.autograd.grad(res.sum(), xg)[0]
        x0 = x0.detach()
        check_finite(x0, i, s, where="network output")
        if clip is not None:
            x0 = x0.clamp(*clip)
        # ancestral step of the VE process from s to s_next given x0
        if s_next > 0:
            mean = x0 + (s_next**2 / s**2) * (x - x0)
            std = s_next * math.sqrt(max(1 - s_next**2 / s**2, 0.0))
            x = mean + std * _randn(x, generator)
        else:
            x = x0
        x = x - zeta * grad
        check_finite(x, i, s, where="DPS step")
        if callback is not None:
            callback(i, x)
    return x


# ---------------------------------------------------------------------------
# fast solver: Tweedie + conjugate gradients + re-noising (DDS-style)
# ---------------------------------------------------------------------------
def dds_sample(y, op, prior, *, n_steps: int = 100, cg_iters: int = 10, sigma_max: float = 3.0,
               sigma_min: float = 0.002, rho: float = 7.0, eta: float = 1.0, sigma_y: float = 0.0,
               final_cg_iters: int | None = None, clip=(0.0, 1.0), generator=None, callback=None,
               sigmas=None, x_init=None, z_weight: float = 0.0, admm_iters: int = 1, final_clip="clip"):
    """One network evaluation per level: x0 = D(x, sigma); x0 <- CG on ||A x - y||^2
    (damped toward D's estimate when the data are noisy); x <- x0 + sigma_next noise.

    ``eta`` = 1 re-noises with fresh noise (measured best); < 1 keeps part of the
    previous direction (DDIM-like).  ``final_cg_iters`` (default ``cg_iters``) sets the
    CG iterations of the last level, after which nothing is re-noised: with noise-free
    data more iterations there enforce the measurement (lam = 1 at the end, as in Song
    et al. 2022); with noisy data the last step stays damped toward the prior's estimate.

    ``sigmas``: descending noise levels (default ``karras_sigmas(n_steps,
    sigma_min, sigma_max, rho)``; a trailing 0 is optional; when given,
    ``n_steps``, ``sigma_min``, ``sigma_max`` and ``rho`` are ignored).
    ``x_init``: the starting sample ``(B, *op.in_shape)`` (default: noise of
    std ``sigmas[0]`` from ``generator``).

    ``z_weight > 0`` (slice consistency): the batch items are consecutive slices of
    one volume and the data step adds ``z_weight ||A||^2 ||D_z x||_1`` (TV along the
    batch axis), solved by ``admm_iters`` ADMM iterations per level with ``cg_iters``
    (``final_cg_iters`` at the last level) CG iterations each (:class:`ZTVDataStep`).
    ``z_weight = 0`` (default) or a single slice runs the plain CGLS data step
    unchanged (bit-identical results).

    ``clip`` bounds every level's estimate (the prior's [0, 1] range); ``final_clip``
    the last one (default: the same; ``(0, None)`` keeps values the data put above
    the window, e.g. bone above +1000 HU in CT).
    """
    final_clip = clip if isinstance(final_clip, str) and final_clip == "clip" else final_clip
    sigmas = _sigma_list(sigmas, lambda: karras_sigmas(n_steps, sigma_min, sigma_max, rho))
    n_steps = len(sigmas) - 1
    shape = (y.shape[0], *op.in_shape)
    dtype = y.real.dtype
    x = _initial(x_init, shape, sigmas[0], generator, dtype, y.device)
    z_step = ZTVDataStep(op, y, z_weight, admm_iters) if z_weight > 0 and shape[0] > 1 else None
    for i in range(n_steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0_prior = prior.denoise(x, s)
        check_finite(x0_prior, i, s, where="network output")
        # damping: trust the prior's estimate in proportion to the measurement noise
        damp = (sigma_y / max(s, 1e-3)) ** 2 if sigma_y > 0 else 0.0
        last = s_next == 0
        n_cg = final_cg_iters if last and final_cg_iters is not None else cg_iters
        if z_step is None:
            x0 = cgls_data_step(op, y, x0_prior, n_iter=n_cg, damp=damp)
        else:
            x0 = z_step(x0_prior, n_iter=n_cg, damp=damp)
        bounds = final_clip if last else clip
        if bounds is not None:
            x0 = x0.clamp(*bounds)
        if s_next > 0:
            eps_dir = (x - x0_prior) / s
            noise = math.sqrt(1 - (1 - eta) ** 2) * _randn(x, generator) + (1 - eta) * eps_dir
            x = x0 + s_next * noise
        else:
            x = x0
        check_finite(x, i, s, where="DDS step")
        if callback is not None:
            callback(i, x)
    return x
