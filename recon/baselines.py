"""Classical (non-learned) reconstruction baselines.

Every reconstructor has the same signature::

    x = method(y, operator, **options)

* ``y`` has shape ``(B, *operator.out_shape)``; the result has shape
  ``(B, *operator.in_shape)``.  Device follows ``y``; the working precision is
  ``y``'s (real) precision.  Real-input operators (CT, inpainting) give a real
  image; complex-input operators (MRI: ``operator.is_complex_input``) give a
  complex image -- callers take ``abs()`` for display and metrics.
* ``y`` is validated first: wrong shape or non-finite values raise
  ``ValueError`` naming the expected shape.  A method that cannot handle the
  operator (e.g. ``sirt`` on a complex operator, ``biharmonic`` on something
  that is not a pixel mask) raises :class:`recon.errors.ReconError`.
* Every iterative method accepts ``callback=None``; when given it is called as
  ``callback(i, x)`` after iteration ``i`` (0-based) with the current batched
  estimate.  Its return value is ignored.
* Image-domain regularisers (TV, wavelets) act on the last two axes of
  ``in_shape``; any leading axes (e.g. a channel axis of size 1) are treated as
  independent images.

Regularisation-weight convention (``tv``, ``cs_wavelet``)
--------------------------------------------------------
The objective is ``0.5 * ||A x - y||^2 + lam_eff * R(x)`` with

* ``relative=True`` (default): ``lam_eff = lam * ||A||^2``, i.e. ``lam`` is the
  weight for the *normalised* operator ``A / ||A||`` (and ``y / ||A||``).  This
  makes one default ``lam`` usable across operators whose scale differs by
  orders of magnitude (a CT projector has ``||A||`` in the tens to hundreds, a masked
  orthonormal FFT has ``||A|| = 1``).  ``||A||`` is a (deterministic, seeded)
  power-method estimate, cached per operator.
* ``relative=False``: ``lam_eff = lam`` exactly.

For the identity operator ``||A|| = 1`` and both conventions coincide.  The
weight still scales with image intensity (images are assumed normalised to
roughly ``[0, 1]``; for ``x -> c x`` use ``lam -> c lam``) and with the noise
level.  ``||A||^2`` is dominated by the smoothest mode, so the best relative
``lam`` still differs between modalities; rough ranges seen on 64x64 phantoms
with ~1 % noise: parallel-beam CT 3e-4..3e-3, Cartesian MRI (``||A|| = 1``)
3e-3..1e-2, inpainting 1e-3..1e-2, plain denoising = the skimage ``weight``
(~0.05..0.2 for noise sigma 0.1).  The ``tv`` default (1e-3) errs on the weak
side, which degrades gracefully.

``tv`` vs scikit-image: ``skimage.restoration.denoise_tv_chambolle(f,
weight=w)`` minimises ``0.5 * ||u - f||^2 + w * TV(u)`` with the same
isotropic, forward-difference, Neumann-boundary TV used here, so
``tv(f, Identity, lam=w)`` solves the same problem (tested).
"""
from __future__ import annotations

import math
import weakref
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from forward_models.base import LinearOperator, check_tensor, complex_dtype, real_dtype
from forward_models.base import cgls as _cgls_solver
from forward_models.kind import inpainting_mask  # re-exported: part of this module's API
from recon.errors import ReconError

__all__ = [
    "sirt",
    "tv",
    "tv3d",
    "TV3D_Z_WEIGHT",
    "tv_inpaint",
    "zero_filled",
    "sense_adjoint",
    "cs_wavelet",
    "biharmonic",
    "cgls",
    "operator_norm",
    "inpainting_mask",
    "grad2d",
    "grad2d_adjoint",
    "grad_z",
    "grad_z_adjoint",
    "wavelet_forward",
    "wavelet_inverse",
]

Callback = Optional[Callable[[int, torch.Tensor], object]]


# ---------------------------------------------------------------------------
# numeric options: one rule per option name, shared by every method
# ---------------------------------------------------------------------------
#: option name -> (kind, low, low_inclusive, high, high_inclusive); ``kind`` 'int' or 'float'.
#: The same names mean the same thing in every method (baselines and score methods), so one
#: table checks them all, at call time here and up front in ``recon.execute.plan_methods``.
OPTION_RULES = {
    "n_iter": ("int", 1, True, None, False),
    "n_steps": ("int", 1, True, None, False),
    "cg_iters": ("int", 1, True, None, False),
    "final_cg_iters": ("int", 0, True, None, False),
    "inverse_iters": ("int", 1, True, None, False),
    "n_corrector": ("int", 0, True, None, False),
    "level": ("int", 1, True, None, False),
    "chunk_pixels": ("int", 1, True, None, False),
    "lam": ("float", 0.0, True, None, False),
    "tol": ("float", 0.0, True, None, False),
    "damp": ("float", 0.0, True, None, False),
    "eps": ("float", 0.0, True, None, False),
    "snr": ("float", 0.0, True, None, False),
    "zeta": ("float", 0.0, True, None, False),
    "eta": ("float", 0.0, True, 1.0, True),
    "sigma_y": ("float", 0.0, True, None, False),
    "sigma_max": ("float", 0.0, False, None, False),
    "step_ratio": ("float", 0.0, False, None, False),
    "op_norm": ("float", 0.0, False, None, False),
    "relax": ("float", 0.0, False, 2.0, False),
    # slice consistency (issue #11): weight of the regulariser along the batch (z) axis
    "z_weight": ("float", 0.0, True, None, False),
    "admm_iters": ("int", 1, True, None, False),
    # multi-scale priors (issue #10): native noise level below which the detail prior denoises
    "detail_below": ("float", 0.0, True, None, False),
    # and the prior's own noise level at and above which its coarser global prior denoises
    "global_above": ("float", 0.0, True, None, False),
}


def _rule_text(rule) -> str:
    kind, lo, lo_in, hi, hi_in = rule
    what = "an integer" if kind == "int" else "a finite number"
    if hi is None:
        return f"{what} {'>=' if lo_in else '>'} {lo:g}"
    return f"{what} in {'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"


def check_option(method: str, name: str, value):
    """``value`` of option ``name`` of ``method``, checked against :data:`OPTION_RULES`
    (None and options without a rule pass unchanged); integral floats become ints for
    integer options.  Raises :class:`ReconError` naming the method, the option and the range."""
    rule = OPTION_RULES.get(name)
    if rule is None or value is None:
        return value
    kind, lo, lo_in, hi, hi_in = rule
    bad = ReconError(f"method '{method}': option {name} must be {_rule_text(rule)}, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise bad
    v = float(value)
    if not math.isfinite(v):
        raise bad
    if kind == "int":
        if v != int(v):
            raise bad
        value = int(v)
    if (v < lo if lo_in else v <= lo) or (hi is not None and (v > hi if hi_in else v >= hi)):
        raise bad
    return value


def check_options(method: str, **values) -> dict:
    """:func:`check_option` for each keyword; returns the (converted) values."""
    return {k: check_option(method, k, v) for k, v in values.items()}


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def _check_inputs(y, op, method: str) -> None:
    if not isinstance(op, LinearOperator):
        raise ValueError(
            f"{method}: operator must be a forward_models LinearOperator, got "
            f"{type(op).__name__}"
        )
    check_tensor(y, op.out_shape, f"{method}: measurement y")
    if not (y.is_floating_point() or y.is_complex()):
        raise ValueError(f"{method}: measurement y must be a float or complex tensor, got {y.dtype}")


def _real_dtype(y: torch.Tensor) -> torch.dtype:
    return real_dtype(y.dtype)


def _image_dtype(y: torch.Tensor, op: LinearOperator) -> torch.dtype:
    rd = _real_dtype(y)
    return complex_dtype(rd) if op.is_complex_input else rd


def _adj(op: LinearOperator, r: torch.Tensor, real: bool) -> torch.Tensor:
    out = op.AH(r)
    if real and out.is_complex():
        out = out.real
    return out


def _fwd(op: LinearOperator, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    out = op.A(x)
    if not like.is_complex() and out.is_complex():
        # a real-in/real-out operator never does this; keep y's dtype family
        out = out.real
    return out


def _check_x0(x0, op, y, method) -> Optional[torch.Tensor]:
    if x0 is None:
        return None
    check_tensor(x0, op.in_shape, f"{method}: x0")
    if x0.shape[0] != y.shape[0]:
        raise ValueError(f"{method}: x0 has batch size {x0.shape[0]} but y has {y.shape[0]}")
    return x0.to(device=y.device, dtype=_image_dtype(y, op)).clone()


_NORM_CACHE: "weakref.WeakKeyDictionary[LinearOperator, float]" = weakref.WeakKeyDictionary()


def operator_norm(op: LinearOperator, device=None, dtype=torch.float32, n_iter: int = 50) -> float:
    """Spectral norm ``||A||_2`` by the (seeded, deterministic) power method.

    Cached per operator object (weakly), so it is computed once per operator;
    an operator whose buffers are changed in place after the first call keeps
    its old cached value (pass ``op_norm=`` explicitly in that case).
    """
    try:
        return _NORM_CACHE[op]
    except (KeyError, TypeError):
        pass
    dev = torch.device(device) if device is not None else torch.device("cpu")
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)
    with torch.no_grad():
        s = float(op.norm_estimate(n_iter=n_iter, dtype=dtype, device=dev, generator=gen))
    if not math.isfinite(s):
        raise ReconError(f"the norm estimate of {type(op).__name__} is not finite ({s})")
    try:
        _NORM_CACHE[op] = s
    except TypeError:
        pass
    return s


def _resolve_norm(op, y, op_norm) -> float:
    if op_norm is not None:
        s = float(op_norm)
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"op_norm must be a positive finite number, got {op_norm}")
        return s
    s = operator_norm(op, device=y.device, dtype=_real_dtype(y))
    if s <= 0:
        raise ReconError(f"{type(op).__name__} appears to be the zero operator (||A|| = 0)")
    return s


def _bounds(nonneg: bool, clip, complex_img: bool, method: str):
    lo, hi = None, None
    if clip is not None:
        try:
            lo, hi = clip
        except (TypeError, ValueError):
            raise ValueError(f"{method}: clip must be a (low, high) pair, got {clip!r}") from None
        lo = None if lo is None else float(lo)
        hi = None if hi is None else float(hi)
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"{method}: clip low {lo} > high {hi}")
    if nonneg:
        lo = 0.0 if lo is None else max(lo, 0.0)
    if complex_img and (lo is not None or hi is not None):
        raise ReconError(
            f"{method}: nonneg/clip constraints need a real image, but the operator "
            "has complex input (MRI); leave nonneg=False and clip=None"
        )
    return lo, hi


def _project(x, lo, hi):
    if lo is None and hi is None:
        return x
    return x.clamp(min=lo, max=hi)


def _rel_change(new, old) -> torch.Tensor:
    num = (new - old).flatten(1).norm(dim=1)
    den = new.flatten(1).norm(dim=1).clamp_min(torch.finfo(num.dtype).tiny)
    return num / den


# ---------------------------------------------------------------------------
# finite differences (isotropic TV)
# ---------------------------------------------------------------------------
def grad2d(x: torch.Tensor) -> torch.Tensor:
    """Forward differences over the last two axes with Neumann boundary.

    Returns shape ``(2, *x.shape)``: ``[d/d(axis -2), d/d(axis -1)]``; the last
    row (resp. column) of each difference is zero.
    """
    g = x.new_zeros((2,) + tuple(x.shape))
    g[0, ..., :-1, :] = x[..., 1:, :] - x[..., :-1, :]
    g[1, ..., :, :-1] = x[..., :, 1:] - x[..., :, :-1]
    return g


def grad2d_adjoint(g: torch.Tensor) -> torch.Tensor:
    """Exact adjoint of :func:`grad2d` (i.e. minus the divergence)."""
    g0, g1 = g[0], g[1]
    out = torch.zeros_like(g0)
    out[..., :-1, :] -= g0[..., :-1, :]
    out[..., 1:, :] += g0[..., :-1, :]
    out[..., :, :-1] -= g1[..., :, :-1]
    out[..., :, 1:] += g1[..., :, :-1]
    return out


def grad_z(x: torch.Tensor) -> torch.Tensor:
    """Forward difference along the batch axis (axis 0 = z for a volume passed as
    consecutive slices) with Neumann boundary: ``g[k] = x[k+1] - x[k]``, ``g[-1] = 0``.
    Same shape as ``x``; zero for a single slice."""
    g = torch.zeros_like(x)
    g[:-1] = x[1:] - x[:-1]
    return g


def grad_z_adjoint(g: torch.Tensor) -> torch.Tensor:
    """Exact adjoint of :func:`grad_z` (minus the backward difference)."""
    out = torch.zeros_like(g)
    out[:-1] -= g[:-1]
    out[1:] += g[:-1]
    return out


def _tv_value(x: torch.Tensor) -> torch.Tensor:
    g = grad2d(x)
    return (g.abs() ** 2).sum(0).sqrt().flatten(1).sum(1)


# ---------------------------------------------------------------------------
# SIRT
# ---------------------------------------------------------------------------
def sirt(y: torch.Tensor, op: LinearOperator, n_iter: int = 100, x0: Optional[torch.Tensor] = None,
         nonneg: bool = True, relax: float = 1.0, callback: Callback = None) -> torch.Tensor:
    """Simultaneous Iterative Reconstruction Technique.

    ``x <- P(x + relax * C * A^T (R * (y - A x)))`` with ``R = 1 / A(1)`` (row
    sums) and ``C = 1 / A^T(1)`` (column sums); entries with a zero sum are
    left out (weight 0).  ``P`` clamps at 0 when ``nonneg``.  Needs a real
    operator with nonnegative row and column sums (CT projectors, masks);
    ``0 < relax < 2``.
    """
    _check_inputs(y, op, "sirt")
    if op.is_complex_input or y.is_complex():
        raise ReconError("sirt needs a real operator and real data; use 'tv' or 'cgls' for complex (MRI) problems")
    n_iter = check_options("sirt", n_iter=n_iter, relax=relax)["n_iter"]
    dt, dev = y.dtype, y.device
    with torch.no_grad():
        rows = _fwd(op, torch.ones((1, *op.in_shape), dtype=dt, device=dev), y)
        cols = _adj(op, torch.ones((1, *op.out_shape), dtype=dt, device=dev), True)
        tol = 1e-6
        if (rows < -tol * rows.abs().max().clamp_min(1e-30)).any() or \
                (cols < -tol * cols.abs().max().clamp_min(1e-30)).any():
            raise ReconError(
                "sirt needs a nonnegative operator (row/column sums A(1), A^T(1) must be >= 0); "
                "use 'cgls' or 'tv' instead"
            )
        eps = torch.finfo(dt).eps
        R = torch.where(rows > eps * rows.max(), 1.0 / rows.clamp_min(eps), torch.zeros_like(rows))
        C = torch.where(cols > eps * cols.max(), 1.0 / cols.clamp_min(eps), torch.zeros_like(cols))
        lo = 0.0 if nonneg else None
        x = _check_x0(x0, op, y, "sirt")
        if x is None:
            x = torch.zeros((y.shape[0], *op.in_shape), dtype=dt, device=dev)
        x = _project(x, lo, None)
        for i in range(n_iter):
            r = y - _fwd(op, x, y)
            x = _project(x + relax * C * _adj(op, R * r, True), lo, None)
            if callback is not None:
                callback(i, x)
    return x


# ---------------------------------------------------------------------------
# TV by Chambolle-Pock (PDHG)
# ---------------------------------------------------------------------------
def tv(y: torch.Tensor, op: LinearOperator, lam: float = 1e-3, n_iter: int = 500,
       nonneg: bool = False, x0: Optional[torch.Tensor] = None, tol: float = 1e-6,
       clip=None, relative: bool = True, op_norm: Optional[float] = None,
       step_ratio: float = 1.0, adaptive: bool = True, z_weight: float = 0.0,
       callback: Callback = None) -> torch.Tensor:
    """TV-regularised least squares by Chambolle-Pock (PDHG), any operator.

    Solves ``min_x 0.5 ||A x - y||^2 + lam_eff * TV(x)  s.t.  x in box`` where
    ``TV(x) = sum_pixels sqrt(|D_0 x|^2 + |D_1 x|^2)`` (isotropic, forward
    differences over the last two axes, Neumann boundary) and ``lam_eff`` is
    ``lam * ||A||^2`` when ``relative`` (default) or ``lam`` otherwise (see the
    module docstring).  For complex images (MRI) the TV couples real and
    imaginary parts: ``|D x|^2 = |D Re x|^2 + |D Im x|^2`` (the complex modulus).

    Algorithm: PDHG on ``K = [A/||A||; D/sqrt(8)]`` (both blocks of norm <= 1,
    so ``||K|| <= sqrt(2)``) with both the data term and the TV term dualised
    (no inner solves), over-relaxation ``theta = 1``.  Initial steps
    ``tau = 0.99/(sqrt(2) step_ratio)``, ``sigma = 0.99 step_ratio/sqrt(2)``
    (``tau sigma ||K||^2 < 1``).  With ``adaptive=True`` (default) the ratio
    ``tau/sigma`` is rebalanced per batch item from the primal/dual residuals
    (Goldstein et al., "Adaptive primal-dual splitting methods", 2015;
    ``alpha0 = 0.5, eta = 0.95, Delta = 1.5``), keeping ``tau sigma`` fixed;
    the adaptation decays geometrically so convergence is retained.  This
    costs no extra operator applications (one ``A`` and one ``A^H`` per
    iteration) and matters for problems where some pixels are determined by
    the TV term alone (inpainting holes, sparse-view CT).  ``||A||`` comes from
    the cached power method (times 1.02 as a safety margin for the step sizes
    only) unless ``op_norm`` is given.

    Constraints: ``nonneg=True`` clamps at 0; ``clip=(lo, hi)`` projects onto a
    box (e.g. ``(0, 1)`` for CT images normalised to [0, 1]); both only for real
    images.  Stops early once the relative change of every batch item's
    iterate is below ``tol`` (``tol=0`` runs all ``n_iter``).  Starts from
    ``x0`` (default zeros).

    Slice consistency (``z_weight > 0``, issue #11): the batch items are read as
    consecutive, equally spaced slices of one volume (the batch axis is z) and the
    TV becomes isotropic 3-D TV with the z difference scaled by ``z_weight``:
    ``TV(x) = sum_voxels sqrt(|D_0 x|^2 + |D_1 x|^2 + z_weight^2 |D_z x|^2)``,
    ``D_z`` the forward difference along the batch axis with Neumann boundary
    (:func:`grad_z`).  The gradient block is then normalised by
    ``sqrt(8 + 4 z_weight^2)`` (``||D_z|| < 2``, so ``||[D_0; D_1; w D_z]||^2 <
    8 + 4 w^2``) and, since the items are one coupled problem, the adaptive step
    ratio is one for the whole volume (from the volume's residuals) instead of one
    per item.  ``z_weight = 0`` (default) or a single slice runs the 2-D code path
    unchanged (bit-identical results).  ``z_weight = pixel size / slice spacing``
    is the TV of the physical gradient (1 for cubic voxels); larger weights favour
    volumes that are smooth along z.  :func:`tv3d` is this solver with a tuned
    ``z_weight`` (:data:`TV3D_Z_WEIGHT`).
    """
    _check_inputs(y, op, "tv")
    if len(op.in_shape) < 2:
        raise ReconError(f"tv needs an image (at least 2 axes), but the operator input is {op.in_shape}")
    n_iter = check_options("tv", lam=lam, n_iter=n_iter, tol=tol, step_ratio=step_ratio, op_norm=op_norm)["n_iter"]
    zw = float(check_option("tv", "z_weight", z_weight))
    cplx = bool(op.is_complex_input)
    real = not cplx
    lo, hi = _bounds(nonneg, clip, cplx, "tv")
    s_est = _resolve_norm(op, y, op_norm)
    lam_eff = float(lam) * (s_est ** 2 if relative else 1.0)
    s = s_est * (1.02 if op_norm is None else 1.0)  # step-size normaliser
    B = y.shape[0]
    use_z = zw > 0 and B > 1  # one slice: D_z x = 0, the 2-D path is exact
    if use_z:
        r8 = math.sqrt(8.0 + 4.0 * zw * zw)  # ||[D_0; D_1; w D_z]|| bound (see docstring)

        def grad(v):
            return torch.cat([grad2d(v), zw * grad_z(v)[None]])

        def grad_adjoint(g):
            return grad2d_adjoint(g[:2]) + zw * grad_z_adjoint(g[2])
    else:
        r8 = math.sqrt(8.0)
        grad, grad_adjoint = grad2d, grad2d_adjoint
    # data dual for F1(z) = 0.5||s z - y||^2 (z = A x / s):
    #   prox_{sigma F1*}(v) = (v - sigma y / s) / (1 + sigma / s^2)
    # TV dual for F2(w) = lam_eff * sqrt(8) ||w||_{2,1} (w = D x / sqrt 8):
    #   projection onto {|q|_pixel <= lam_eff * sqrt(8)}  (sqrt(8 + 4 w^2) with z)
    radius = lam_eff * r8
    xdt = _image_dtype(y, op)
    rdt = _real_dtype(y)
    dev = y.device
    tau = torch.full((B,), 0.99 / (math.sqrt(2.0) * step_ratio), dtype=rdt, device=dev)
    sigma = torch.full((B,), 0.99 * step_ratio / math.sqrt(2.0), dtype=rdt, device=dev)
    alpha = torch.full((B,), 0.5, dtype=rdt, device=dev)
    eta, Delta = 0.95, 1.5

    def bx(v):  # (B,) -> broadcast over x / y
        return v.reshape((B,) + (1,) * len(op.in_shape))

    def by(v):
        return v.reshape((B,) + (1,) * len(op.out_shape))

    def bq(v):
        return v.reshape((1, B) + (1,) * len(op.in_shape))

    def norms(t, lead=0):
        t = t.flatten(lead + 1) if lead == 0 else t.transpose(0, 1).flatten(2)
        return (t.abs() ** 2).sum(-1) if lead == 0 else (t.abs() ** 2).sum((-1, -2))

    with torch.no_grad():
        x = _check_x0(x0, op, y, "tv")
        if x is None:
            x = torch.zeros((B, *op.in_shape), dtype=xdt, device=dev)
        x = _project(x, lo, hi)
        p = torch.zeros_like(y)
        q = torch.zeros((3 if use_z else 2, B, *op.in_shape), dtype=xdt, device=dev)
        ys = y / s
        Ax = _fwd(op, x, y) / s          # K x, data block
        Dx = grad(x) / r8                # K x, TV block
        KTd = torch.zeros_like(x)        # K^T (p, q)
        for i in range(int(n_iter)):
            # primal descent
            x_new = _project(x - bx(tau) * KTd, lo, hi)
            Ax_new = _fwd(op, x_new, y) / s
            Dx_new = grad(x_new) / r8
            # dual ascent at the over-relaxed point (K xbar by linearity)
            sg_y, sg_q = by(sigma), bq(sigma)
            p_new = (p + sg_y * (2.0 * Ax_new - Ax) - sg_y * ys) / (1.0 + sg_y / s ** 2)
            q_new = q + sg_q * (2.0 * Dx_new - Dx)
            if radius > 0:
                mag = (q_new.abs() ** 2).sum(0, keepdim=True).sqrt()
                q_new = q_new / torch.clamp(mag / radius, min=1.0)
            else:
                q_new = torch.zeros_like(q_new)
            KTd_new = _adj(op, p_new, real) / s + grad_adjoint(q_new) / r8
            if adaptive:
                P2 = norms((x - x_new) / bx(tau) - (KTd - KTd_new))
                D2 = (norms((p - p_new) / sg_y - (Ax - Ax_new))
                      + norms((q - q_new) / sg_q - (Dx - Dx_new), lead=1))
                if use_z:  # one coupled problem: one step ratio for the volume
                    P2, D2 = P2.sum().expand(B), D2.sum().expand(B)
                P, Dd = P2.sqrt(), D2.sqrt()
                up = P > Delta * Dd       # primal lagging: larger primal step
                down = P < Dd / Delta     # dual lagging: larger dual step
                f = 1.0 - alpha
                tau = torch.where(up, tau / f, torch.where(down, tau * f, tau))
                sigma = torch.where(up, sigma * f, torch.where(down, sigma / f, sigma))
                alpha = torch.where(up | down, alpha * eta, alpha)
            x_old = x
            x, p, q, Ax, Dx, KTd = x_new, p_new, q_new, Ax_new, Dx_new, KTd_new
            if callback is not None:
                callback(i, x)
            # (iteration 0 only moves the duals when x0 is 0: do not stop there)
            if i > 0 and tol and tol > 0 and bool((_rel_change(x, x_old) < tol).all()):
                break
    return x


#: default ``z_weight`` of :func:`tv3d`.  Tuned on the tuning volume only
#: (ct/val/totalseg_example_j2k, slices 0-9 of 20, abdomen, 2 mm slice spacing, resized to
#: 128 x 128 px = 3.9 mm pixels), noise-free parallel-beam CT with the CT task's tv settings
#: (lam 1e-7, clip at 0/1); volume PSNR in dB for z_weight 0 / 0.5 / 1 / 2 / 4 / 8 / 16:
#: 23 views, 2000 iterations: 35.09 / 35.22 / 35.36 / 35.56 / 35.78 / 35.92 / 35.93;
#: 8 views, 5000 iterations: 23.78 / - / - / 23.79 / 23.86 / 23.90 / 23.90.
#: 8 is where the gain levels off.  Every slice sees the same view angles, so 3-D TV cannot
#: fill what all slices miss alike: the gain is modest (+0.8 dB at 23 views, +0.1 dB at 8).
TV3D_Z_WEIGHT = 8.0


def tv3d(y: torch.Tensor, op: LinearOperator, lam: float = 1e-3, n_iter: int = 500,
         nonneg: bool = False, x0: Optional[torch.Tensor] = None, tol: float = 1e-6,
         clip=None, relative: bool = True, op_norm: Optional[float] = None,
         step_ratio: float = 1.0, adaptive: bool = True, z_weight: float = TV3D_Z_WEIGHT,
         callback: Callback = None) -> torch.Tensor:
    """3-D TV over a stack of consecutive slices: :func:`tv` with ``z_weight`` set.

    The batch items are the slices of one volume in order along z (uniform
    spacing); the regulariser is isotropic 3-D TV with the z difference scaled by
    ``z_weight`` (see :func:`tv`).  The baseline that matches the score methods'
    ``z_weight`` option (issue #11).  With one slice it equals ``tv``.  From the
    command line it takes the task's tuned ``tv`` settings (``lam``, ``n_iter``,
    ``clip``).
    """
    return tv(y, op, lam=lam, n_iter=n_iter, nonneg=nonneg, x0=x0, tol=tol, clip=clip, relative=relative,
              op_norm=op_norm, step_ratio=step_ratio, adaptive=adaptive, z_weight=z_weight, callback=callback)


def tv_inpaint(y: torch.Tensor, op: LinearOperator, lam: float = 2e-3, n_iter: int = 500,
               x0: Optional[torch.Tensor] = None, **options) -> torch.Tensor:
    """TV inpainting: :func:`tv` with an inpainting (mask) operator.

    Same objective and options as ``tv``; differences are the defaults: a
    small ``lam`` (the missing pixels are set by the TV term alone, the
    measured ones should stay close to ``y``) and, unless ``x0`` is given, a
    start with each missing pixel set to the mean of the measured pixels of
    its image, which makes PDHG fill large holes much faster than a zero
    start.  (The registry uses plain ``tv`` under the name ``'tv'`` for every
    operator, inpainting included; this is the same solver with inpainting
    defaults.)
    """
    _check_inputs(y, op, "tv_inpaint")
    check_options("tv_inpaint", lam=lam, n_iter=n_iter)
    if x0 is None:
        mask = inpainting_mask(op)
        if mask is not None and not y.is_complex():
            try:
                m = torch.broadcast_to((mask != 0).to(device=y.device, dtype=y.dtype), y.shape)
            except RuntimeError as e:
                raise ReconError(
                    f"inpainting mask of shape {tuple(mask.shape)} does not broadcast to {tuple(y.shape)}"
                ) from e
            cnt = m.sum(dim=(-2, -1), keepdim=True)
            mean = (y * m).sum(dim=(-2, -1), keepdim=True) / cnt.clamp_min(1.0)
            x0 = y * m + (1.0 - m) * mean
    return tv(y, op, lam=lam, n_iter=n_iter, x0=x0, **options)


# ---------------------------------------------------------------------------
# MRI adjoints
# ---------------------------------------------------------------------------
def zero_filled(y: torch.Tensor, op: LinearOperator, callback: Callback = None) -> torch.Tensor:
    """``A^H y``.  For Cartesian MRI: the inverse FFT of zero-filled k-space;
    for SENSE: the coil-combined adjoint ``sum_c conj(S_c) F^H P^H y_c``.
    Complex for MRI operators."""
    _check_inputs(y, op, "zero_filled")
    with torch.no_grad():
        x = op.AH(y)
    if callback is not None:
        callback(0, x)
    return x


_MAPS_ATTRS = ("maps", "sens_maps", "smaps", "coil_maps")


def sense_adjoint(y: torch.Tensor, op: LinearOperator, eps: float = 1e-8,
                  callback: Callback = None) -> torch.Tensor:
    """SENSE adjoint normalised by the coil sensitivity energy:
    ``A^H y / sum_c |S_c|^2`` (0 where ``sum_c |S_c|^2 <= eps * max``).

    The maps are read from ``op.maps`` (or ``sens_maps``/``smaps``/
    ``coil_maps``) with the coil axis at ``-3`` (``(C, H, W)`` or
    ``(B, C, H, W)``).  An operator without maps (single-coil Cartesian MRI)
    is treated as having one all-ones map, so the result equals
    :func:`zero_filled`.
    """
    _check_inputs(y, op, "sense_adjoint")
    check_options("sense-adjoint", eps=eps)
    with torch.no_grad():
        x = op.AH(y)
        maps = None
        for name in _MAPS_ATTRS:
            m = getattr(op, name, None)
            if isinstance(m, torch.Tensor):
                maps = m
                break
        if maps is not None:
            if maps.dim() < 3:
                raise ReconError(
                    f"sense_adjoint: coil maps of shape {tuple(maps.shape)} need a coil axis at -3"
                )
            energy = (maps.abs() ** 2).sum(-3).to(device=x.device, dtype=_real_dtype(x))
            thr = eps * energy.max().clamp_min(torch.finfo(energy.dtype).tiny)
            inv = torch.where(energy > thr, 1.0 / energy.clamp_min(torch.finfo(energy.dtype).tiny),
                              torch.zeros_like(energy))
            try:
                x = x * inv
            except RuntimeError as e:
                raise ReconError(
                    f"sense_adjoint: coil energy of shape {tuple(inv.shape)} does not broadcast "
                    f"to the image shape {tuple(x.shape)}"
                ) from e
    if callback is not None:
        callback(0, x)
    return x


# ---------------------------------------------------------------------------
# orthonormal periodised wavelets in torch
# ---------------------------------------------------------------------------
def _wavelet_filters(wavelet: str, dtype, device) -> torch.Tensor:
    import pywt

    try:
        w = pywt.Wavelet(wavelet)
    except ValueError as e:
        raise ReconError(f"unknown wavelet {wavelet!r}; try 'db4', 'haar', 'sym8'") from e
    if not w.orthogonal:
        raise ReconError(f"wavelet {wavelet!r} is not orthogonal; use e.g. 'db4', 'haar', 'sym8'")
    lo = torch.tensor(w.dec_lo[::-1], dtype=torch.float64)
    hi = torch.tensor(w.dec_hi[::-1], dtype=torch.float64)
    return torch.stack([lo, hi])[:, None, :].to(device=device, dtype=dtype)  # (2, 1, L)


def _dwt1(x: torch.Tensor, filt: torch.Tensor, dim: int) -> torch.Tensor:
    x = x.movedim(dim, -1)
    shape = x.shape
    N, L = shape[-1], filt.shape[-1]
    # offset 1 - L/2 reproduces pywt's 'periodization' mode exactly
    idx = (torch.arange(N + L - 1, device=x.device) + (1 - L // 2)) % N
    xe = x.reshape(-1, 1, N)[..., idx]
    out = F.conv1d(xe, filt, stride=2)  # (M, 2, N/2): [low, high]
    return out.reshape(shape).movedim(-1, dim)


def _idwt1(c: torch.Tensor, filt: torch.Tensor, dim: int) -> torch.Tensor:
    c = c.movedim(dim, -1)
    shape = c.shape
    N, L = shape[-1], filt.shape[-1]
    full = F.conv_transpose1d(c.reshape(-1, 2, N // 2), filt, stride=2)[:, 0]  # (M, N+L-2)
    idx = (torch.arange(N + L - 2, device=c.device) + (1 - L // 2)) % N
    out = torch.zeros(full.shape[0], N, dtype=c.dtype, device=c.device)
    out.index_add_(1, idx, full)
    return out.reshape(shape).movedim(-1, dim)


def _default_level(H: int, W: int, filt_len: int) -> int:
    import pywt

    lvl = pywt.dwt_max_level(min(H, W), filt_len)
    k = 0
    while k < lvl and H % (2 ** (k + 1)) == 0 and W % (2 ** (k + 1)) == 0:
        k += 1
    return k


def _check_level(H, W, level):
    if level < 1 or H % (2 ** level) or W % (2 ** level):
        raise ReconError(
            f"wavelet level {level} needs image sizes divisible by 2**{level}; "
            f"got {H}x{W} (pad/crop the image to even sizes or lower the level)"
        )


def _real_apply(fn, x):
    if x.is_complex():
        return torch.complex(fn(x.real.contiguous()), fn(x.imag.contiguous()))
    return fn(x)


def wavelet_forward(x: torch.Tensor, wavelet: str = "db4", level: Optional[int] = None) -> torch.Tensor:
    """Orthonormal periodised 2-D DWT over the last two axes, packed into an
    array of the same shape (coarsest approximation in the top-left
    ``H/2**level x W/2**level`` block).  Complex input: real and imaginary
    parts transformed separately (the transform is real)."""
    H, W = x.shape[-2:]
    filt = _wavelet_filters(wavelet, _real_dtype(x), x.device)
    if level is None:
        level = _default_level(H, W, filt.shape[-1])
    _check_level(H, W, level)

    def f(v):
        c = v.clone()
        h, w = H, W
        for _ in range(level):
            sub = _dwt1(_dwt1(c[..., :h, :w], filt, -1), filt, -2)
            c[..., :h, :w] = sub
            h, w = h // 2, w // 2
        return c

    return _real_apply(f, x)


def wavelet_inverse(c: torch.Tensor, wavelet: str = "db4", level: Optional[int] = None) -> torch.Tensor:
    """Inverse (= adjoint) of :func:`wavelet_forward`."""
    H, W = c.shape[-2:]
    filt = _wavelet_filters(wavelet, _real_dtype(c), c.device)
    if level is None:
        level = _default_level(H, W, filt.shape[-1])
    _check_level(H, W, level)

    def f(v):
        x = v.clone()
        for k in reversed(range(level)):
            h, w = H >> k, W >> k
            x[..., :h, :w] = _idwt1(_idwt1(x[..., :h, :w], filt, -2), filt, -1)
        return x

    return _real_apply(f, c)


def _soft(c: torch.Tensor, t) -> torch.Tensor:
    mag = c.abs()
    scale = torch.clamp(1.0 - t / mag.clamp_min(torch.finfo(mag.dtype).tiny), min=0.0)
    return c * scale


def cs_wavelet(y: torch.Tensor, op: LinearOperator, lam: float = 1e-3, n_iter: int = 200,
               wavelet: str = "db4", level: Optional[int] = None, x0: Optional[torch.Tensor] = None,
               tol: float = 1e-6, relative: bool = True, threshold_approx: bool = False,
               op_norm: Optional[float] = None, cycle_spin: bool = True, seed: int = 0,
               callback: Callback = None) -> torch.Tensor:
    """L1-wavelet compressed sensing by FISTA (Beck & Teboulle 2009).

    Solves ``min_x 0.5 ||A x - y||^2 + lam_eff * ||Psi x||_1`` with ``Psi`` an
    orthonormal periodised 2-D DWT (``wavelet`` from PyWavelets, implemented in
    torch so it runs on ``y``'s device; ``level`` defaults to PyWavelets' max
    level limited so every level has even size).  Complex images: coefficients
    are complex and soft-thresholded by magnitude.  By default the coarsest
    approximation band is not penalised (``threshold_approx=False``).
    ``lam_eff = lam * ||A||^2`` when ``relative`` (see module docstring), else
    ``lam``.  Step ``1/L`` with ``L = ||A||^2`` (power-method estimate x 1.02,
    or ``op_norm**2``).  Starts from ``x0`` (default ``A^H y / L``); stops
    early when every item's relative change is below ``tol``.

    ``cycle_spin`` (default): every iteration thresholds the wavelet
    coefficients of the image circularly shifted by a random offset below
    ``2**level`` (seeded by ``seed``, so results are reproducible), which makes
    the decimated transform's regulariser shift-invariant on average (random
    cycle spinning, Figueiredo & Nowak 2003).  On brain MRI at 8x it gained
    0.1-1.1 dB over the plain transform and beat SigPy's ``L1WaveletRecon``
    (``recon bench references``).
    """
    _check_inputs(y, op, "cs_wavelet")
    if len(op.in_shape) < 2:
        raise ReconError(f"cs_wavelet needs an image (at least 2 axes), but the operator input is {op.in_shape}")
    n_iter = check_options("cs-wavelet", lam=lam, n_iter=n_iter, tol=tol, level=level, op_norm=op_norm)["n_iter"]
    H, W = op.in_shape[-2:]
    filt_len = _wavelet_filters(wavelet, torch.float64, "cpu").shape[-1]
    if level is None:
        level = _default_level(H, W, filt_len)
    _check_level(H, W, level)
    real = not op.is_complex_input
    s_est = _resolve_norm(op, y, op_norm)
    lam_eff = float(lam) * (s_est ** 2 if relative else 1.0)
    L = (s_est * (1.02 if op_norm is None else 1.0)) ** 2
    thr = lam_eff / L
    detail = torch.ones((H, W), dtype=torch.bool, device=y.device)
    if not threshold_approx:
        detail[: H >> level, : W >> level] = False

    spin = torch.Generator().manual_seed(int(seed)) if cycle_spin else None

    def prox(v):
        shift = torch.randint(0, 2 ** level, (2,), generator=spin).tolist() if spin is not None else [0, 0]
        if any(shift):
            v = torch.roll(v, shift, dims=(-2, -1))
        c = wavelet_forward(v, wavelet, level)
        c = torch.where(detail, _soft(c, thr), c)
        out = wavelet_inverse(c, wavelet, level)
        return torch.roll(out, [-shift[0], -shift[1]], dims=(-2, -1)) if any(shift) else out

    with torch.no_grad():
        x = _check_x0(x0, op, y, "cs_wavelet")
        if x is None:
            x = _adj(op, y, real) / L
        z = x.clone()
        t = 1.0
        for i in range(int(n_iter)):
            g = _adj(op, _fwd(op, z, y) - y, real)
            x_old = x
            x = prox(z - g / L)
            t_new = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
            z = x + ((t - 1.0) / t_new) * (x - x_old)
            t = t_new
            if callback is not None:
                callback(i, x)
            if tol and tol > 0 and bool((_rel_change(x, x_old) < tol).all()):
                break
    return x


# ---------------------------------------------------------------------------
# inpainting
# ---------------------------------------------------------------------------
def biharmonic(y: torch.Tensor, op: LinearOperator, callback: Callback = None) -> torch.Tensor:
    """Biharmonic inpainting (``skimage.restoration.inpaint_biharmonic``) of
    each batch item and each leading (channel) slice, on CPU numpy.

    Needs an inpainting operator (see :func:`inpainting_mask`); pixels with
    ``mask == 0`` are filled, measured pixels keep ``y``.  Returns ``y``'s
    dtype/device.
    """
    from skimage.restoration import inpaint_biharmonic

    _check_inputs(y, op, "biharmonic")
    mask = inpainting_mask(op)
    if mask is None:
        raise ReconError(
            f"biharmonic needs an inpainting operator (A x = mask * x); got {type(op).__name__}"
        )
    if y.is_complex():
        raise ReconError("biharmonic needs real data")
    if len(op.in_shape) < 2:
        raise ReconError(f"biharmonic needs an image (at least 2 axes), got input shape {op.in_shape}")
    try:
        m = torch.broadcast_to(mask.detach().to("cpu") != 0, y.shape)
    except RuntimeError as e:
        raise ReconError(
            f"inpainting mask of shape {tuple(mask.shape)} does not broadcast to {tuple(y.shape)}"
        ) from e
    known = m.numpy().reshape(-1, *y.shape[-2:])
    img = y.detach().to("cpu", torch.float64).numpy().reshape(-1, *y.shape[-2:])
    out = img.copy()
    for k in range(img.shape[0]):
        unknown = ~known[k]
        if not unknown.any():
            continue
        if not known[k].any():
            raise ReconError("biharmonic: the mask measures no pixel; nothing to inpaint from")
        out[k] = inpaint_biharmonic(np.where(known[k], img[k], 0.0), unknown)
        out[k][known[k]] = img[k][known[k]]
    x = torch.from_numpy(out.reshape(y.shape)).to(device=y.device, dtype=y.dtype)
    if callback is not None:
        callback(0, x)
    return x


# ---------------------------------------------------------------------------
# CGLS
# ---------------------------------------------------------------------------
def cgls(y: torch.Tensor, op: LinearOperator, n_iter: int = 50,
         x0: Optional[torch.Tensor] = None, damp: float = 0.0, tol: float = 1e-10,
         callback: Callback = None) -> torch.Tensor:
    """CGLS baseline: conjugate gradients on the normal equations, batched
    (the baseline signature ``method(y, op, **options)`` around the solver
    :func:`forward_models.cgls`).

    Minimises ``||A x - y||^2 + damp**2 ||x||^2`` (scipy ``lsqr`` convention
    for ``damp``) from ``x0`` (default zeros), per batch item with its own
    step sizes.  Works for real and complex operators.  An item stops moving
    once its normal-equation residual ``||A^H (y - A x) - damp^2 x||`` falls
    below ``tol`` times its initial value; the loop ends when all have.
    """
    _check_inputs(y, op, "cgls")
    n_iter = check_options("cgls", n_iter=n_iter, damp=damp, tol=tol)["n_iter"]
    x = _check_x0(x0, op, y, "cgls")
    if x is None:
        x = torch.zeros((y.shape[0], *op.in_shape), dtype=_image_dtype(y, op), device=y.device)
    return _cgls_solver(op, y, n_iter=int(n_iter), x0=x, tol=tol, damp=float(damp),
                        real=not op.is_complex_input, callback=callback)
