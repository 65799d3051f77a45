"""Score-based reconstructors with the common signature ``(y, op, **options) -> x``.

* ``score``      -- predictor-corrector with the projection data consistency of
                    Song, Shen, Xing & Ermon (ICLR 2022).
* ``score-fast`` -- Tweedie estimate + conjugate gradients + re-noising on a
                    Karras schedule (DDS-style, <= 100 network evaluations); a
                    batch of consecutive slices is coupled by TV along z in the
                    data step (``z_weight``, issue #11).
* ``dps``        -- diffusion posterior sampling (Chung et al., ICLR 2023).

They reconstruct at the operator's own image size, any size: the prior is
applied through :func:`recon.multiscale.for_data` (the learned band at the
prior's pixel scale, a Gaussian detail band at the data's), and every noise
level of the samplers is multiplied by the scale factor between the two, so
the network sees its own noise range; below ``detail_below`` (native noise level; default
from the prior, 0 turns it off) the prior's native-resolution detail prior denoises instead,
where the data's pixels suit it; at and above ``global_above`` (the prior's own noise units;
default from the prior, 0 turns it off) its coarser whole-image global prior does.  ``pixel_mm`` (the data's pixel size,
when known) sets that factor against the prior's recorded ``pixel_mm``;
otherwise the field of view is assumed to match the prior's training images;
``prior_scale`` sets the factor directly.  ``precision`` ('fp32', 'bf16', 'auto';
:data:`recon.multiscale.PRECISIONS`) is the network's arithmetic: bf16 runs its convolutions
in bfloat16 (twice as fast on CPUs with AMX), the EDM skip path and the data steps stay float32.

Each takes ``prior`` (a shipped name, a path, or a loaded ``Prior``), ``seed``
(or an explicit ``generator``), ``sigma_y``, the standard deviation of the
measurement noise in the units of y (0 for noise-free data), and ``task``
('ct', 'mri', 'inpaint'; default: the operator's kind).  Defaults tuned per
task are stored in the prior's metadata under ``sampler_defaults[task]`` and
are overridden by explicit options.  They are registered, with their
metadata, in :mod:`recon.methods`.
"""
from __future__ import annotations

import inspect

import torch

from forward_models import operator_kind
from recon.baselines import check_options
from recon.errors import ReconError
from recon.multiscale import DEFAULT_PRECISION, for_data
from recon.prior import load_prior
from recon.samplers import CORRECTORS, ProjectionConsistency, dds_sample, dps_sample, pc_sample


def _prior(prior, device, op=None, pixel_mm: float | None = None, prior_scale: float | None = None,
           detail_below: float | None = None, precision: str = DEFAULT_PRECISION, global_above: float | None = None):
    """The prior, loaded and on ``device``; with ``op``, wrapped for the operator's image size."""
    if prior is None:
        raise ReconError("score-based methods need a prior: pass prior='ct' / 'brain-mri' or a path "
                         "(on the command line: --prior NAME)")
    if isinstance(prior, (str, bytes)) or hasattr(prior, "__fspath__"):
        prior = load_prior(prior, device=device)
    elif hasattr(prior, "to"):
        prior = prior.to(device)
    if op is None:
        return prior
    for name, v in (("pixel_mm", pixel_mm), ("prior_scale", prior_scale)):
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
            raise ReconError(f"{name} must be a positive number, got {v!r}")
    levels = check_options("score", detail_below=detail_below, global_above=global_above)
    return for_data(prior, op.in_shape, pixel_mm, prior_scale, levels["detail_below"], precision,
                    levels["global_above"])


def _defaults(prior, method: str, op, task: str | None) -> dict:
    """The prior's tuned defaults for ``method`` on ``task`` (default: the operator's kind)."""
    meta = getattr(prior, "meta", {}) or {}
    key = task or operator_kind(op) or "other"
    return dict(meta.get("sampler_defaults", {}).get(key, {}).get(method, {}))


def _generator(y, seed, generator):
    if generator is not None:
        return generator
    return torch.Generator(device=y.device).manual_seed(int(seed))


def _check_2d(op):
    if len(op.in_shape) != 2:
        raise ReconError(f"score-based methods reconstruct 2-D images; operator input shape is {op.in_shape}")


def magnitude_operator(op, y):
    """The operator a real (magnitude) prior reconstructs through.

    MRI data of an object with phase (every measured k-space): a real image fitted to them
    fits their real part, and the phase's share of the signal becomes artefacts.  The
    object's smooth phase is estimated from the fully sampled k-space centre of ``y``
    (:func:`forward_models.smooth_phase`) and the unknown becomes the magnitude, through
    :class:`forward_models.PhaseModulated` (linear, exact adjoint, so every data step is
    unchanged).  Measured on the fastMRI knee (320x320, complex): score-fast at 4x went from
    below TV to above it (README, "MRI: measured").  Left as it is: other operators, data
    without a fully sampled centre, and data of a real image (magnitude-simulated), whose
    estimated phase is 0."""
    from forward_models import PhaseModulated, check_tensor, smooth_phase

    if operator_kind(op) != "mri" or not op.is_complex_input or isinstance(op, PhaseModulated):
        return op
    try:
        check_tensor(y, op.out_shape, "measurement y")
    except ValueError as exc:
        raise ReconError(str(exc)) from None
    phase = smooth_phase(op, y)
    if phase is None or not bool((phase != 0).any()):
        return op
    return PhaseModulated(op, phase)


def score_pc(y, op, *, prior=None, n_steps: int | None = None, snr: float | None = None, lam: float | None = None,
             n_corrector: int | None = None, inverse_iters: int | None = None, corrector: str | None = None,
             sigma_y: float = 0.0, seed: int = 0,
             generator=None, callback=None, task: str | None = None, pixel_mm: float | None = None,
             prior_scale: float | None = None, detail_below: float | None = None,
             precision: str = DEFAULT_PRECISION, global_above: float | None = None):
    """Predictor-corrector sampling with projection data consistency (Song et al. 2022)."""
    _check_2d(op)
    op = magnitude_operator(op, y)
    p = _prior(prior, y.device, op, pixel_mm, prior_scale, detail_below, precision, global_above)
    d = {"n_steps": 500, "snr": 0.16, "lam": 1.0, "n_corrector": 1, "inverse_iters": 10, "corrector": "langevin",
         **_defaults(p, "score", op, task)}
    for k, v in dict(n_steps=n_steps, snr=snr, lam=lam, n_corrector=n_corrector, inverse_iters=inverse_iters,
                     corrector=corrector).items():
        if v is not None:
            d[k] = v
    d = check_options("score", **d)
    if d["corrector"] not in CORRECTORS:
        raise ReconError(f"method 'score': option corrector must be one of {', '.join(CORRECTORS)}, "
                         f"got {d['corrector']!r}")
    sigma_y = check_options("score", sigma_y=sigma_y)["sigma_y"]
    g = _generator(y, seed, generator)
    dc = ProjectionConsistency(y, op, lam=d["lam"], sigma_y=sigma_y, generator=g, inverse_iters=int(d["inverse_iters"]))
    dtype = y.real.dtype
    with torch.no_grad():
        x = pc_sample(p, (y.shape[0], *op.in_shape), sde=p.sde, n_steps=int(d["n_steps"]), snr=float(d["snr"]),
                      n_corrector=int(d["n_corrector"]), corrector=d["corrector"], consistency=dc, generator=g,
                      dtype=dtype, device=y.device, callback=callback, final_lam=1.0 if sigma_y == 0 else None)
    return x.clamp(min=0)  # not above: the data may hold values above the window (full HU range)


#: bounds of every level's estimate in ``score-fast`` and ``dps``: below only.  Values the data
#: put above the window (bone and metal above +1000 HU in CT) must survive every level, not only
#: the last: measured on ct/val/ge_head z14 at 512 x 512, 23 views, noise-free, detail prior,
#: clipping each level at 1 gave 25.83 dB (streaks from the skull the data step kept putting
#: back), clipping below only 38.71 dB; lung_pet_ct_dx z15: 32.94 dB either way.
LEVEL_CLIP = (0.0, None)


#: default ``z_weight`` of ``score-fast`` (slice consistency; relative to ``||A||^2``).  Tuned on
#: the tuning volume only (ct/val/totalseg_example_j2k, slices 0-9 of 20, 2 mm spacing, resized
#: to 128 x 128), noise-free parallel-beam CT, prior 'ct', seed 0, n_steps=30 (not 100, for time),
#: rho = ZTV_RHO = 0.003; volume PSNR in dB (lowest slice) for z_weight 0 / 3e-5 / 1e-4 / 3e-4:
#: 23 views: 35.25 (35.12) / 35.78 (35.57) / 35.90 (35.67) / 35.54 (34.97);
#: 8 views:  26.52 (24.62) / 27.94 (27.70) / 28.09 (27.95) / 27.99 (27.54).
#: Uncoupled slices vary twice as much along z as the truth (mean |x[k+1] - x[k]| 0.0061 vs
#: 0.0031 at 23 views); coupled, 0.0029.  Check at the default 100 steps (8 views, slices 0-5):
#: 29.15 dB uncoupled, 29.85 dB at 1e-4 (not re-tuned there).  On by default: a single slice
#: is unaffected (nothing to couple) and ``z_weight=0`` gives the slice-by-slice sampler bit
#: for bit.  A study with thicker slices gets this weight per 2 mm of z
#: (:func:`recon.volume.default_z_weight`; measured in README "Slice spacing").
SCORE_FAST_Z_WEIGHT = 1e-4


def score_fast(y, op, *, prior=None, n_steps: int | None = None, cg_iters: int | None = None,
               final_cg_iters: int | None = None, sigma_max: float | None = None, eta: float | None = None,
               sigma_y: float = 0.0, seed: int = 0, generator=None, callback=None, task: str | None = None,
               pixel_mm: float | None = None, prior_scale: float | None = None,
               z_weight: float = SCORE_FAST_Z_WEIGHT, admm_iters: int = 1, detail_below: float | None = None,
               precision: str = DEFAULT_PRECISION, global_above: float | None = None):
    """Fast solver: Tweedie + CG + re-noising (DDS-style), n_steps network evaluations.

    Slice consistency (issue #11): the batch is read as a volume, consecutive slices
    in order along the batch axis (uniform spacing), and the data step adds TV along z,
    ``z_weight ||A||^2 ||D_z x||_1``, solved by ``admm_iters`` ADMM iterations per level
    with CG inner solves (:class:`recon.samplers.ZTVDataStep`, as DiffusionMBIR and DDS).
    Default :data:`SCORE_FAST_Z_WEIGHT` (tuned on CT); ``z_weight=0`` reconstructs the
    slices independently (the sampler before issue #11, bit for bit).  One slice is never
    coupled.  Pass unrelated images as separate calls (or ``z_weight=0``), not as a batch."""
    _check_2d(op)
    op = magnitude_operator(op, y)
    p = _prior(prior, y.device, op, pixel_mm, prior_scale, detail_below, precision, global_above)
    d = {"n_steps": 100, "cg_iters": 10, "final_cg_iters": None, "sigma_max": 3.0, "eta": 1.0,
         **_defaults(p, "score-fast", op, task)}
    for k, v in dict(n_steps=n_steps, cg_iters=cg_iters, final_cg_iters=final_cg_iters, sigma_max=sigma_max,
                     eta=eta).items():
        if v is not None:
            d[k] = v
    d = check_options("score-fast", **d)
    sigma_y = check_options("score-fast", sigma_y=sigma_y)["sigma_y"]
    z = check_options("score-fast", z_weight=z_weight, admm_iters=admm_iters)
    with torch.no_grad():
        return dds_sample(y, op, p, n_steps=int(d["n_steps"]), cg_iters=int(d["cg_iters"]),
                          final_cg_iters=None if d["final_cg_iters"] is None else int(d["final_cg_iters"]),
                          sigma_max=float(d["sigma_max"]) * p.sigma_scale, sigma_min=0.002 * p.sigma_scale,
                          eta=float(d["eta"]), sigma_y=sigma_y, generator=_generator(y, seed, generator),
                          callback=callback, z_weight=float(z["z_weight"]), admm_iters=int(z["admm_iters"]),
                          clip=LEVEL_CLIP)


def dps(y, op, *, prior=None, n_steps: int | None = None, zeta: float | None = None, sigma_max: float | None = None,
        sigma_y: float = 0.0, seed: int = 0, generator=None, callback=None, task: str | None = None,
        pixel_mm: float | None = None, prior_scale: float | None = None, detail_below: float | None = None,
        precision: str = DEFAULT_PRECISION, global_above: float | None = None):
    """Diffusion posterior sampling (Chung et al. 2023)."""
    _check_2d(op)
    op = magnitude_operator(op, y)
    p = _prior(prior, y.device, op, pixel_mm, prior_scale, detail_below, precision, global_above)
    d = {"n_steps": 500, "zeta": 1.0, "sigma_max": 10.0, **_defaults(p, "dps", op, task)}
    for k, v in dict(n_steps=n_steps, zeta=zeta, sigma_max=sigma_max).items():
        if v is not None:
            d[k] = v
    d = check_options("dps", **d)
    x = dps_sample(y, op, p, n_steps=int(d["n_steps"]), zeta=float(d["zeta"]),
                   sigma_max=float(d["sigma_max"]) * p.sigma_scale, sigma_min=0.002 * p.sigma_scale,
                   generator=_generator(y, seed, generator), callback=callback, clip=LEVEL_CLIP)
    return x.clamp(min=0)  # not above: the data may hold values above the window (full HU range)


def _z_weight(method, options) -> float:
    """The ``z_weight`` a call of ``method`` with ``options`` uses (0 when it has none)."""
    if "z_weight" in options:
        w = options["z_weight"]
    else:
        fn = getattr(method, "fn", method)
        try:
            param = inspect.signature(fn).parameters.get("z_weight")
        except (TypeError, ValueError):
            param = None
        w = None if param is None or param.default is param.empty else param.default
    try:
        return float(w or 0.0)
    except (TypeError, ValueError):
        return 0.0


def sample_posterior(method, y, op, k: int, **options):
    """Draw ``k`` reconstructions (one batch) and return (mean, per-pixel std), each (B, H, W).

    A method that couples slices (``z_weight`` > 0) on a volume (B > 1) cannot take
    the k samples as one batch (the batch axis is z): it is run k times on the
    volume, drawing from one generator (``generator``, else seeded by ``seed``; a
    method without a ``generator`` option gets seeds ``seed .. seed + k - 1``)."""
    if k < 1:
        raise ReconError(f"--samples must be at least 1, got {k}")
    b = y.shape[0]
    if k > 1 and b > 1 and _z_weight(method, options) > 0:
        opts = dict(options)
        try:
            takes_generator = "generator" in inspect.signature(getattr(method, "fn", method)).parameters
        except (TypeError, ValueError):
            takes_generator = False
        if opts.get("generator") is not None or takes_generator:
            seed = opts.pop("seed", 0)
            if opts.get("generator") is None:
                opts["generator"] = torch.Generator(device=y.device).manual_seed(int(seed))
            xs = [method(y, op, **opts) for _ in range(k)]
        else:
            seed = int(opts.pop("seed", 0))
            xs = [method(y, op, seed=seed + j, **opts) for j in range(k)]
        x = torch.stack([v.abs() if v.is_complex() else v for v in xs], 1)
        return x.mean(1), x.std(1)
    yk = y.repeat_interleave(k, dim=0)
    x = method(yk, op, **options)
    x = x.reshape(b, k, *x.shape[1:])
    x = x.abs() if x.is_complex() else x
    return x.mean(1), (x.std(1) if k > 1 else torch.zeros_like(x[:, 0]))
