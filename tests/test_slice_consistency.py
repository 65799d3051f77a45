"""Slice consistency across a volume (issue #11): the z difference D_z, 3-D TV
(``tv`` with ``z_weight``, ``tv3d``) and the z-TV data step of ``score-fast``.

The batch axis is z: a volume is passed as consecutive slices in order."""
import math

import numpy as np
import pytest
import torch

from forward_models import ParallelBeamCT
from forward_models.base import Identity, LinearOperator
from recon import baselines as bl
from recon import methods
from recon.errors import ReconError
from recon.samplers import (ZTVDataStep, _initial, _randn, _sigma_list, cgls_data_step, check_finite,
                            dds_sample, karras_sigmas)
from recon.score_methods import sample_posterior
from tests.test_baselines import DenseOp
from tests.test_prior import tiny_prior


def _psnr(x, ref):
    x = x.clamp(0, 1)
    return float(10 * torch.log10(1.0 / ((x - ref) ** 2).mean()))


def _z_variation(x):
    return float(bl.grad_z(x).abs().sum())


def disc_volume(n_slices=6, size=32):
    """A smooth 3-D phantom: per slice a disc whose radius changes smoothly with z, and an
    inner disc of another intensity whose centre drifts with z (float64, values in [0, 1])."""
    c = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    out = []
    for k in range(n_slices):
        t = k / max(n_slices - 1, 1)
        r = size * (0.30 + 0.08 * math.sin(math.pi * t))
        img = 0.5 * (xx ** 2 + yy ** 2 <= r ** 2).double()
        cx, cy = size * (0.12 * t - 0.06), size * 0.05
        img = img + 0.4 * ((xx - cx) ** 2 + (yy - cy) ** 2 <= (size * 0.12) ** 2).double()
        out.append(img)
    return torch.stack(out)


# ---------------------------------------------------------------------------
# D_z
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("complex_", [False, True])
def test_grad_z_adjoint_and_boundary(complex_):
    g = torch.Generator().manual_seed(0)
    shape = (5, 2, 6, 7)  # (z, channel, H, W)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    p = torch.randn(shape, generator=g, dtype=torch.float64)
    if complex_:
        x = torch.complex(x, torch.randn(shape, generator=g, dtype=torch.float64))
        p = torch.complex(p, torch.randn(shape, generator=g, dtype=torch.float64))
    lhs = (bl.grad_z(x) * p.conj()).sum()
    rhs = (x * bl.grad_z_adjoint(p).conj()).sum()
    assert abs(complex(lhs) - complex(rhs)) < 1e-10 * abs(complex(lhs))
    dz = bl.grad_z(x)
    assert torch.equal(dz[:-1], x[1:] - x[:-1]) and dz[-1].abs().max() == 0  # Neumann
    assert bl.grad_z(x[:1]).abs().max() == 0  # one slice: no z difference
    # the norm bound used for the step sizes: ||D_z||^2 < 4
    M = torch.stack([bl.grad_z(e.reshape(7, 1)).reshape(-1) for e in torch.eye(7, dtype=torch.float64)], 1)
    assert torch.linalg.matrix_norm(M, 2) ** 2 < 4


# ---------------------------------------------------------------------------
# 3-D TV baseline
# ---------------------------------------------------------------------------
# frozen copy of recon.baselines.tv before issue #11 (docstring dropped): z_weight=0 must
# reproduce it bit for bit
def _tv_before_issue_11(y: torch.Tensor, op: LinearOperator, lam: float = 1e-3, n_iter: int = 500,
       nonneg: bool = False, x0: object = None, tol: float = 1e-6,
       clip=None, relative: bool = True, op_norm: object = None,
       step_ratio: float = 1.0, adaptive: bool = True, callback: object = None) -> torch.Tensor:
    bl._check_inputs(y, op, "tv")
    if len(op.in_shape) < 2:
        raise ReconError(f"tv needs an image (at least 2 axes), but the operator input is {op.in_shape}")
    n_iter = bl.check_options("tv", lam=lam, n_iter=n_iter, tol=tol, step_ratio=step_ratio, op_norm=op_norm)["n_iter"]
    cplx = bool(op.is_complex_input)
    real = not cplx
    lo, hi = bl._bounds(nonneg, clip, cplx, "tv")
    s_est = bl._resolve_norm(op, y, op_norm)
    lam_eff = float(lam) * (s_est ** 2 if relative else 1.0)
    s = s_est * (1.02 if op_norm is None else 1.0)  # step-size normaliser
    r8 = math.sqrt(8.0)
    # data dual for F1(z) = 0.5||s z - y||^2 (z = A x / s):
    #   prox_{sigma F1*}(v) = (v - sigma y / s) / (1 + sigma / s^2)
    # TV dual for F2(w) = lam_eff * sqrt(8) ||w||_{2,1} (w = D x / sqrt 8):
    #   projection onto {|q|_pixel <= lam_eff * sqrt(8)}
    radius = lam_eff * r8
    B = y.shape[0]
    xdt = bl._image_dtype(y, op)
    rdt = bl._real_dtype(y)
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
        x = bl._check_x0(x0, op, y, "tv")
        if x is None:
            x = torch.zeros((B, *op.in_shape), dtype=xdt, device=dev)
        x = bl._project(x, lo, hi)
        p = torch.zeros_like(y)
        q = torch.zeros((2, B, *op.in_shape), dtype=xdt, device=dev)
        ys = y / s
        Ax = bl._fwd(op, x, y) / s          # K x, data block
        Dx = bl.grad2d(x) / r8              # K x, TV block
        KTd = torch.zeros_like(x)        # K^T (p, q)
        for i in range(int(n_iter)):
            # primal descent
            x_new = bl._project(x - bx(tau) * KTd, lo, hi)
            Ax_new = bl._fwd(op, x_new, y) / s
            Dx_new = bl.grad2d(x_new) / r8
            # dual ascent at the over-relaxed point (K xbar by linearity)
            sg_y, sg_q = by(sigma), bq(sigma)
            p_new = (p + sg_y * (2.0 * Ax_new - Ax) - sg_y * ys) / (1.0 + sg_y / s ** 2)
            q_new = q + sg_q * (2.0 * Dx_new - Dx)
            if radius > 0:
                mag = (q_new.abs() ** 2).sum(0, keepdim=True).sqrt()
                q_new = q_new / torch.clamp(mag / radius, min=1.0)
            else:
                q_new = torch.zeros_like(q_new)
            KTd_new = bl._adj(op, p_new, real) / s + bl.grad2d_adjoint(q_new) / r8
            if adaptive:
                P = norms((x - x_new) / bx(tau) - (KTd - KTd_new)).sqrt()
                Dd = (norms((p - p_new) / sg_y - (Ax - Ax_new))
                      + norms((q - q_new) / sg_q - (Dx - Dx_new), lead=1)).sqrt()
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
            if i > 0 and tol and tol > 0 and bool((bl._rel_change(x, x_old) < tol).all()):
                break
    return x



def _ct(size, views):
    return ParallelBeamCT(size, torch.linspace(0, math.pi, views + 1, dtype=torch.float64)[:-1])


@pytest.mark.parametrize("adaptive", [True, False])
def test_tv_z_weight_zero_is_bit_identical_to_2d_tv(adaptive):
    x = disc_volume(3, 16)
    op = _ct(16, 5)
    y = op.A(x)
    opts = dict(lam=1e-4, n_iter=60, clip=(0.0, 1.0), adaptive=adaptive)
    ref = _tv_before_issue_11(y, op, **opts)
    assert torch.equal(bl.tv(y, op, **opts), ref)
    assert torch.equal(bl.tv(y, op, z_weight=0.0, **opts), ref)
    assert torch.equal(methods.run("tv", y, op, z_weight=0, **opts), ref)
    # one slice: no z difference, the 2-D path whatever the weight (tv3d included)
    one = _tv_before_issue_11(y[:1], op, **opts)
    assert torch.equal(bl.tv(y[:1], op, z_weight=2.0, **opts), one)
    assert torch.equal(methods.run("tv3d", y[:1], op, **opts), one)
    assert not torch.equal(bl.tv(y, op, z_weight=0.5, **opts), ref)


def test_tv3d_matches_brute_force_3d_tv():
    """Denoising (A = I) with isotropic 3-D TV against a generic constrained solver."""
    so = pytest.importorskip("scipy.optimize")
    g = torch.Generator().manual_seed(3)
    B, H, W = 3, 3, 3
    f = disc_volume(B, H) + 0.2 * torch.randn(B, H, W, generator=g, dtype=torch.float64)
    lam, w = 0.15, 0.7
    x = bl.tv(f, Identity((H, W)), lam=lam, n_iter=20000, tol=1e-12, relative=False, z_weight=w)

    def objective(u):
        u = torch.as_tensor(u).reshape(B, H, W)
        gr = torch.cat([bl.grad2d(u), w * bl.grad_z(u)[None]])
        return float(0.5 * ((u - f) ** 2).sum() + lam * (gr ** 2).sum(0).sqrt().sum())

    n = B * H * W
    eye = torch.eye(n, dtype=torch.float64).reshape(n, B, H, W)
    D = torch.stack([torch.cat([bl.grad2d(e), w * bl.grad_z(e)[None]]).reshape(3, n) for e in eye], -1).numpy()
    fv = f.reshape(-1).numpy()
    # min 0.5 ||u - f||^2 + lam sum t  s.t.  t_i >= |(D u)_i| (a second-order cone, smoothed by 1e-18)
    cons = {"type": "ineq", "fun": lambda v: v[n:] - np.sqrt(((D @ v[:n]) ** 2).sum(0) + 1e-18)}
    v0 = np.concatenate([fv, np.sqrt(((D @ fv) ** 2).sum(0)) + 1e-3])
    res = so.minimize(lambda v: 0.5 * ((v[:n] - fv) ** 2).sum() + lam * v[n:].sum(), v0,
                      jac=lambda v: np.concatenate([v[:n] - fv, lam * np.ones(n)]),
                      constraints=[cons], method="SLSQP", options={"maxiter": 2000, "ftol": 1e-15})
    ref = res.x[:n]
    # the objective is 1-strongly convex, so ||x - x*||^2 <= 2 (F(x) - F(x*)): matching (or beating) the generic
    # solver's objective pins x to the unique minimiser; SLSQP itself sometimes stops early ("positive
    # directional derivative"), so its point is compared only when it reports success
    assert objective(x) <= objective(ref) + 1e-7
    if res.success:
        assert np.abs(x.reshape(-1).numpy() - ref).max() < 1e-3
    assert objective(x) < objective(f) - 0.05  # and x is far better than the data itself


def test_tv3d_beats_2d_tv_on_smooth_volume():
    """6 slices of 32x32, 6 noise-free views: coupling the slices recovers the volume better."""
    x = disc_volume(6, 32)
    op = _ct(32, 6)
    y = op.A(x)
    opts = dict(lam=1e-6, n_iter=800, clip=(0.0, 1.0))
    p2 = _psnr(bl.tv(y, op, **opts), x)
    p3 = _psnr(methods.run("tv3d", y, op, **opts), x)
    # measured: 28.2 dB slice by slice, 45.2 dB with tv3d's default z_weight (8)
    assert p3 > p2 + 8.0, (p2, p3)


def test_z_options_are_checked_and_listed():
    op = _ct(16, 4)
    y = op.A(disc_volume(2, 16))
    for name in ("tv", "tv3d"):
        assert "z_weight" in methods.get_method(name).options()
        with pytest.raises(ReconError, match="z_weight"):
            methods.run(name, y, op, z_weight=-1.0, n_iter=2)
        with pytest.raises(ReconError, match="z_weight"):
            methods.run(name, y, op, z_weight=float("nan"), n_iter=2)
    assert {"z_weight", "admm_iters"} <= set(methods.get_method("score-fast").options())
    assert bl.check_option("x", "admm_iters", 2.0) == 2
    with pytest.raises(ReconError, match="admm_iters"):
        bl.check_option("score-fast", "admm_iters", 0)
    assert methods.get_method("tv3d").tasks == methods.get_method("tv").tasks
    from recon.tasks import TASKS

    for task in TASKS.values():  # tv3d runs with the task's tuned tv settings
        for noisy in (False, True):
            assert task.default_options("tv3d", noisy) == task.default_options("tv", noisy)


# ---------------------------------------------------------------------------
# z-TV data step of the fast sampler
# ---------------------------------------------------------------------------
def test_ztv_data_step_matches_brute_force():
    """ADMM with many iterations solves 0.5||Ax-y||^2 + 0.5 damp||x-x0||^2 + lam||D_z x||_1."""
    so = pytest.importorskip("scipy.optimize")
    g = torch.Generator().manual_seed(0)
    B, H, W = 5, 3, 3
    M = torch.randn(6, H * W, generator=g, dtype=torch.float64)  # underdetermined per slice
    op = DenseOp(M, (H, W), (6,))
    xt = torch.cumsum(0.3 * torch.randn(B, H, W, generator=g, dtype=torch.float64), 0)
    y = op.A(xt)
    x0 = xt + 0.5 * torch.randn(B, H, W, generator=g, dtype=torch.float64)
    s = float(torch.linalg.matrix_norm(M, 2))
    zw, damp = 0.05, 0.3
    # (ADMM converges for any rho; the sampler's small default only needs more iterations)
    x = ZTVDataStep(op, y, zw, admm_iters=400, op_norm=s, rho=1.0)(x0, n_iter=50, damp=damp)
    lam = zw * s ** 2
    n = B * H * W
    Dm = torch.stack([bl.grad_z(e.reshape(B, H, W)).reshape(-1) for e in torch.eye(n, dtype=torch.float64)], 1).numpy()
    A = np.kron(np.eye(B), M.numpy())
    yv, x0v = y.reshape(-1).numpy(), x0.reshape(-1).numpy()

    def f(v):
        r = A @ v[:n] - yv
        return 0.5 * r @ r + 0.5 * damp * (v[:n] - x0v) @ (v[:n] - x0v) + lam * v[n:].sum()

    def grad(v):
        return np.concatenate([A.T @ (A @ v[:n] - yv) + damp * (v[:n] - x0v), lam * np.ones(n)])

    I = np.eye(n)
    cons = [{"type": "ineq", "fun": lambda v: v[n:] - Dm @ v[:n], "jac": lambda v: np.hstack([-Dm, I])},
            {"type": "ineq", "fun": lambda v: v[n:] + Dm @ v[:n], "jac": lambda v: np.hstack([Dm, I])}]
    res = so.minimize(f, np.concatenate([x0v, np.abs(Dm @ x0v)]), jac=grad, constraints=cons, method="SLSQP",
                      options={"maxiter": 1000, "ftol": 1e-14})
    xv = x.reshape(-1).numpy()
    assert f(np.concatenate([xv, np.abs(Dm @ xv)])) <= res.fun * (1 + 1e-6)
    assert np.abs(xv - res.x[:n]).max() < 1e-4
    # the soft threshold is the prox of t|.|: against a brute-force grid minimisation
    v = torch.linspace(-2, 2, 9, dtype=torch.float64)
    grid = torch.linspace(-3, 3, 60001, dtype=torch.float64)
    brute = grid[(0.5 * (grid[None] - v[:, None]) ** 2 + 0.7 * grid[None].abs()).argmin(1)]
    from recon.samplers import _soft_threshold
    assert (_soft_threshold(v, 0.7) - brute).abs().max() < 1e-4


# frozen copy of recon.samplers.dds_sample before issue #11 (docstring dropped)
def _dds_before_issue_11(y, op, prior, *, n_steps: int = 100, cg_iters: int = 10, sigma_max: float = 3.0,
               sigma_min: float = 0.002, rho: float = 7.0, eta: float = 1.0, sigma_y: float = 0.0,
               final_cg_iters: int | None = None, clip=(0.0, 1.0), generator=None, callback=None,
               sigmas=None, x_init=None):
    sigmas = _sigma_list(sigmas, lambda: karras_sigmas(n_steps, sigma_min, sigma_max, rho))
    n_steps = len(sigmas) - 1
    shape = (y.shape[0], *op.in_shape)
    dtype = y.real.dtype
    x = _initial(x_init, shape, sigmas[0], generator, dtype, y.device)
    for i in range(n_steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0_prior = prior.denoise(x, s)
        check_finite(x0_prior, i, s, where="network output")
        # damping: trust the prior's estimate in proportion to the measurement noise
        damp = (sigma_y / max(s, 1e-3)) ** 2 if sigma_y > 0 else 0.0
        last = s_next == 0
        n_cg = final_cg_iters if last and final_cg_iters is not None else cg_iters
        x0 = cgls_data_step(op, y, x0_prior, n_iter=n_cg, damp=damp)
        if clip is not None:
            x0 = x0.clamp(*clip)
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



@pytest.mark.parametrize("sigma_y", [0.0, 0.05])
def test_dds_z_weight_zero_is_bit_identical(sigma_y):
    prior = tiny_prior().eval()
    x = disc_volume(3, 16).float()
    op = _ct(16, 6).float()
    y = op.A(x)
    kw = dict(n_steps=5, sigma_max=2.0, sigma_y=sigma_y)
    with torch.no_grad():
        ref = _dds_before_issue_11(y, op, prior, generator=torch.Generator().manual_seed(1), **kw)
        new = dds_sample(y, op, prior, generator=torch.Generator().manual_seed(1), z_weight=0.0, **kw)
        dflt = dds_sample(y, op, prior, generator=torch.Generator().manual_seed(1), **kw)
        # one slice: nothing to couple, the old path whatever the weight
        one = _dds_before_issue_11(y[:1], op, prior, generator=torch.Generator().manual_seed(1), **kw)
        one_z = dds_sample(y[:1], op, prior, generator=torch.Generator().manual_seed(1), z_weight=1.0, **kw)
        # the network in float32 as in the reference (the default, 'auto', is bf16 on CPUs with AMX)
        sf = methods.run("score-fast", y, op, prior=prior, seed=1, n_steps=5, sigma_max=2.0, sigma_y=sigma_y,
                         z_weight=0.0, precision="fp32")
        sf_ref = _dds_before_issue_11(y, op, prior, generator=torch.Generator().manual_seed(1), n_steps=5,
                                      sigma_max=2.0, sigma_min=0.002, eta=1.0, cg_iters=10, sigma_y=sigma_y,
                                      clip=(0.0, None))
    assert torch.equal(new, ref) and torch.equal(dflt, ref)
    assert torch.equal(one_z, one)
    # score-fast clips every level below only (values above the window, the full HU range, stay)
    assert torch.equal(sf, sf_ref)


def test_score_fast_z_weight_reduces_z_variation():
    prior = tiny_prior().eval()
    x = disc_volume(5, 16).float()
    op = _ct(16, 4).float()
    y = op.A(x)
    kw = dict(prior=prior, seed=0, n_steps=6, sigma_max=2.0)
    with torch.no_grad():
        x0 = methods.run("score-fast", y, op, z_weight=0.0, **kw)
        x1 = methods.run("score-fast", y, op, z_weight=0.05, **kw)
        x2 = methods.run("score-fast", y, op, z_weight=0.05, admm_iters=3, **kw)
        xd = methods.run("score-fast", y, op, **kw)  # the tuned default couples too
    v0, v1, v2, vd = _z_variation(x0), _z_variation(x1), _z_variation(x2), _z_variation(xd)
    # measured: 157 independent; 59, 43 and 83 (default) coupled
    assert max(v1, v2, vd) < 0.8 * v0, (v0, v1, v2, vd)
    assert _z_variation(x) < v0  # the truth is smoother along z than independent slices


def test_ztv_data_step_on_complex_operator():
    """MRI (complex-input operator, real image): the coupled step runs and couples."""
    from forward_models import CartesianMRI

    mask = torch.zeros(16, 16)
    mask[::3] = 1
    op = CartesianMRI(mask, shape=(16, 16))
    x = disc_volume(4, 16).float()
    y = op.A(x.to(torch.complex64))
    prior = tiny_prior().eval()
    with torch.no_grad():
        a = dds_sample(y, op, prior, n_steps=3, sigma_max=2.0, generator=torch.Generator().manual_seed(0))
        b = dds_sample(y, op, prior, n_steps=3, sigma_max=2.0, generator=torch.Generator().manual_seed(0),
                       z_weight=1e-3)
    assert not b.is_complex() and torch.isfinite(b).all()
    assert _z_variation(b) < _z_variation(a)


def test_sample_posterior_keeps_the_volume_together_when_coupled():
    """--samples with z coupling runs the method on the whole volume k times (never a batch
    in which the samples of one slice sit next to each other)."""
    seen = []

    def fake(y, op, *, z_weight=0.3, seed=0, generator=None):
        seen.append((y.shape[0], generator is not None))
        return y + torch.randn(y.shape, generator=generator, dtype=y.dtype)

    y = torch.arange(3.0).reshape(3, 1, 1).expand(3, 2, 2).contiguous()
    mean, std = sample_posterior(fake, y, Identity((2, 2)), 4, seed=5)
    assert seen == [(3, True)] * 4 and mean.shape == (3, 2, 2) and bool((std > 0).all())
    seen.clear()
    sample_posterior(fake, y, Identity((2, 2)), 4, seed=5, z_weight=0.0)  # independent slices: one batch
    assert seen == [(12, False)]
    seeds = []

    def seeded(y, op, *, z_weight=0.3, seed=0):  # no generator option: seeds seed .. seed + k - 1
        seeds.append((y.shape[0], seed))
        return y + seed

    mean, std = sample_posterior(seeded, y, Identity((2, 2)), 3, seed=5)
    assert seeds == [(3, 5), (3, 6), (3, 7)] and torch.allclose(mean, y + 6)
