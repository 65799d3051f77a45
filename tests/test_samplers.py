"""Samplers against closed forms (Gaussian prior), determinism and failure reporting."""
import pytest
import torch

from forward_models import Inpainting as MaskOp
from recon.errors import ReconError
from recon.likelihood import log_likelihood
from recon.prior import GaussianPrior
from recon.samplers import CORRECTORS, dds_sample, dps_sample, ode_sample, pc_sample, ProjectionConsistency


def correlated_gaussian(h=3, w=3):
    d = h * w
    idx = torch.arange(d, dtype=torch.float64)
    yy, xx = idx // w, idx % w
    dist2 = (yy[:, None] - yy[None]) ** 2 + (xx[:, None] - xx[None]) ** 2
    cov = 0.04 * torch.exp(-dist2 / 2.0) + 1e-4 * torch.eye(d, dtype=torch.float64)
    mean = torch.full((d,), 0.5, dtype=torch.float64)
    return GaussianPrior(mean, cov, (h, w)), mean, cov


def closed_form_posterior_mean(mean, cov, obs_idx, y_obs):
    d = mean.numel()
    un = [i for i in range(d) if i not in obs_idx]
    s_uo = cov[un][:, obs_idx]
    s_oo = cov[obs_idx][:, obs_idx]
    post = mean.clone()
    post[un] = mean[un] + s_uo @ torch.linalg.solve(s_oo, y_obs - mean[obs_idx])
    post[obs_idx] = y_obs
    return post


def _setup():
    prior, mean, cov = correlated_gaussian()
    mask = torch.zeros(3, 3, dtype=torch.float64)
    mask[0, :] = 1
    mask[1, 0] = 1
    op = MaskOp(mask)
    x_true = torch.tensor([[0.7, 0.6, 0.4], [0.65, 0.5, 0.5], [0.5, 0.5, 0.5]], dtype=torch.float64)
    y = op.A(x_true[None])
    obs = [i for i in range(9) if mask.reshape(-1)[i] > 0]
    post = closed_form_posterior_mean(mean, cov, obs, x_true.reshape(-1)[obs]).reshape(3, 3)
    return prior, op, y, post


def test_projection_pc_sampler_matches_posterior_mean():
    prior, op, y, post = _setup()
    n = 400
    g = torch.Generator().manual_seed(0)
    dc = ProjectionConsistency(y.expand(n, 3, 3), op, lam=1.0, generator=g)
    x = pc_sample(prior, (n, 3, 3), n_steps=200, snr=0.16, consistency=dc, generator=g, dtype=torch.float64)
    assert (x.mean(0) - post).abs().max() < 0.03


def test_dds_and_dps_approach_posterior_mean():
    prior, op, y, post = _setup()
    n = 200
    x = dds_sample(y.expand(n, 3, 3), op, prior, n_steps=60, generator=torch.Generator().manual_seed(1), clip=None)
    assert (x.mean(0) - post).abs().max() < 0.05
    x = dps_sample(y.expand(n, 3, 3), op, prior, n_steps=200, zeta=0.3, generator=torch.Generator().manual_seed(2))
    assert (x.mean(0) - post).abs().max() < 0.1


def test_dds_final_cg_iterations_enforce_noise_free_data():
    """More CG iterations at the last level (nothing re-noised after it) fit the data more closely."""
    from forward_models import ParallelBeamCT, view_angles

    prior, _, _ = correlated_gaussian(8, 8)
    op = ParallelBeamCT(8, view_angles(4))
    g = torch.Generator().manual_seed(5)
    x = 0.5 + 0.1 * torch.randn(1, 8, 8, generator=g, dtype=torch.float64)
    y = op.A(x)
    res = []
    for k in (1, 100):
        out = dds_sample(y, op, prior, n_steps=20, cg_iters=1, final_cg_iters=k, clip=None,
                         generator=torch.Generator().manual_seed(1))
        res.append(float((op.A(out) - y).norm() / y.norm()))
    assert res[1] < 1e-6 < res[0]


def test_unconditional_samplers_match_prior_moments():
    prior, mean, cov = correlated_gaussian()
    g = torch.Generator().manual_seed(3)
    # snr is a high-dimensional heuristic; in 9 dimensions a smaller one keeps Langevin unbiased
    for x in (pc_sample(prior, (2000, 3, 3), n_steps=150, snr=0.05, generator=g, dtype=torch.float64),
              ode_sample(prior, (2000, 3, 3), n_steps=30, generator=g, dtype=torch.float64)):
        flat = x.reshape(len(x), -1)
        assert (flat.mean(0) - mean).abs().max() < 0.02
        assert (torch.cov(flat.T) - cov).abs().max() < 0.01


def test_same_seed_same_output():
    prior, op, y, _ = _setup()
    out = []
    for _ in range(2):
        g = torch.Generator().manual_seed(7)
        dc = ProjectionConsistency(y, op, generator=g)
        out.append(pc_sample(prior, (1, 3, 3), n_steps=20, consistency=dc, generator=g, dtype=torch.float64))
    assert torch.equal(out[0], out[1])


class BrokenPrior:
    meta = {"sde": {"name": "ve"}}

    def __init__(self, fail_at_sigma):
        self.fail_at = fail_at_sigma
        from recon.sde import VESDE

        self.sde = VESDE()

    def denoise(self, x, sigma):
        return torch.full_like(x, float("nan")) if float(sigma) < self.fail_at else x * 0


def test_non_finite_score_reports_step_and_level():
    with pytest.raises(ReconError, match=r"non-finite values at step \d+ \(noise level sigma=.*snr 0.2"):
        pc_sample(BrokenPrior(1.0), (1, 4, 4), n_steps=20, snr=0.2, generator=torch.Generator().manual_seed(0))
    _, op, y, _ = _setup()
    with pytest.raises(ReconError, match="non-finite values at step"):
        dds_sample(y, op, BrokenPrior(1.0), n_steps=10)


def test_likelihood_of_gaussian_matches_closed_form():
    prior, mean, cov = correlated_gaussian(2, 2)
    g = torch.Generator().manual_seed(0)
    x = (mean + torch.linalg.cholesky(cov) @ torch.randn(4, generator=g, dtype=torch.float64)).reshape(1, 2, 2)
    logp, bpd = log_likelihood(prior, x, sigma_min=1e-3, sigma_max=50.0, n_steps=200, n_probes=8, generator=g)
    exact = prior.log_prob(x)
    assert float(logp[0]) == pytest.approx(float(exact[0]), abs=0.15)
    assert torch.isfinite(bpd).all()


def test_cgls_data_step_stable_on_projection_operator():
    """A^H A of a masked FFT is a projector: CG converges in a step or two and must then stay put."""
    from forward_models import CartesianMRI, MRI_MASKS
    from recon.samplers import cgls_data_step

    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 32, 32, generator=g)
    op = CartesianMRI(MRI_MASKS["equispaced"](acceleration=4, center_fraction=0.08)((32, 32), seed=0).mask)
    y = op.A(x.to(torch.complex64))
    x0 = x + 0.05 * torch.randn(x.shape, generator=g)
    a = cgls_data_step(op, y, x0, n_iter=2)
    b = cgls_data_step(op, y, x0, n_iter=50)
    assert torch.isfinite(b).all() and (a - b).abs().max() < 1e-4
    assert (op.A(b.to(torch.complex64)) - y).abs().norm() < 1e-3 * y.abs().norm()


def test_cgls_data_step_damped_toward_x0_matches_closed_form():
    """Inpainting is diagonal: argmin ||m x - y||^2 + d ||x - x0||^2 = (m y + d x0) / (m + d) per pixel."""
    from recon.samplers import cgls_data_step

    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(16, 16, generator=g) > 0.5).double()
    op = MaskOp(mask)
    x = torch.rand(2, 16, 16, generator=g, dtype=torch.float64)
    y = op.A(x)
    x0 = torch.rand(2, 16, 16, generator=g, dtype=torch.float64)
    d = 0.3
    out = cgls_data_step(op, y, x0, n_iter=20, damp=d)
    ref = (mask * op.AH(y) + d * x0) / (mask + d)
    assert (out - ref).abs().max() < 1e-10


def test_euler_maruyama_predictor_matches_prior_moments():
    prior, mean, cov = correlated_gaussian()
    g = torch.Generator().manual_seed(4)
    x = pc_sample(prior, (2000, 3, 3), n_steps=300, n_corrector=0, predictor="euler_maruyama",
                  generator=g, dtype=torch.float64)
    flat = x.reshape(len(x), -1)
    assert (flat.mean(0) - mean).abs().max() < 0.02
    assert (torch.cov(flat.T) - cov).abs().max() < 0.01


# ---------------------------------------------------------------------------
# injected schedules and starting samples (k-diffusion style)
# ---------------------------------------------------------------------------
def test_dds_explicit_default_schedule_and_start_are_bit_identical():
    from recon.samplers import karras_sigmas

    prior, op, y, _ = _setup()
    y = y.expand(4, 3, 3)
    kw = dict(n_steps=12, sigma_max=3.0, sigma_min=0.002, rho=7.0, clip=None)
    ref = dds_sample(y, op, prior, generator=torch.Generator().manual_seed(3), **kw)
    sig = karras_sigmas(12, 0.002, 3.0, 7.0)
    for s in (sig, torch.cat([sig, sig.new_zeros(1)])):  # the trailing 0 is optional
        out = dds_sample(y, op, prior, generator=torch.Generator().manual_seed(3), sigmas=s, **kw)
        assert torch.equal(out, ref)
    # the same start drawn by hand, then the same generator continues: identical
    g = torch.Generator().manual_seed(3)
    x_init = torch.randn((4, 3, 3), generator=g, dtype=torch.float64) * float(sig[0])
    out = dds_sample(y, op, prior, generator=g, sigmas=sig, x_init=x_init, **kw)
    assert torch.equal(out, ref)
    # another start changes the result; with no steps the start is returned as is
    other = dds_sample(y, op, prior, generator=torch.Generator().manual_seed(3), x_init=x_init + 0.5, **kw)
    assert not torch.equal(other, ref)
    x0 = torch.full((4, 3, 3), 0.25, dtype=torch.float64)
    assert torch.equal(dds_sample(y, op, prior, sigmas=torch.zeros(0), x_init=x0), x0)


def test_pc_explicit_default_timesteps_and_start_are_bit_identical():
    from recon.samplers import sde_timesteps

    prior, op, y, _ = _setup()

    def run(**kw):
        g = torch.Generator().manual_seed(11)
        dc = ProjectionConsistency(y.expand(3, 3, 3), op, generator=g)
        return pc_sample(prior, (3, 3, 3), n_steps=15, eps=1e-3, consistency=dc, generator=g,
                         dtype=torch.float64, **kw)

    ref = run()
    ts = sde_timesteps(prior.sde, 15, 1e-3)
    assert torch.equal(ts, prior.sde.timesteps(15, 1e-3))
    assert torch.equal(run(timesteps=ts), ref)
    assert torch.equal(run(timesteps=ts.tolist()), ref)
    other = run(x_init=torch.zeros(3, 3, 3, dtype=torch.float64))
    assert other.shape == ref.shape and not torch.equal(other, ref)
    # a shorter custom schedule runs one step per time
    seen = []
    run(timesteps=ts[::5], callback=lambda i, u: seen.append(i))
    assert seen == [0, 1, 2]


def test_dps_and_ode_accept_injected_schedule_and_start():
    from recon.samplers import karras_sigmas

    prior, op, y, _ = _setup()
    ref = dps_sample(y, op, prior, n_steps=8, zeta=0.3, generator=torch.Generator().manual_seed(2))
    out = dps_sample(y, op, prior, n_steps=999, zeta=0.3, generator=torch.Generator().manual_seed(2),
                     sigmas=karras_sigmas(8, 0.002, 10.0))
    assert torch.equal(out, ref)
    ref = ode_sample(prior, (2, 3, 3), n_steps=6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = ode_sample(prior, (2, 3, 3), generator=torch.Generator().manual_seed(4), dtype=torch.float64,
                     sigmas=karras_sigmas(6, 0.002, 20.0, 7.0))
    assert torch.equal(out, ref)
    x0 = torch.rand(2, 3, 3, dtype=torch.float64)
    assert torch.equal(ode_sample(prior, (2, 3, 3), sigmas=[], x_init=x0, dtype=torch.float64), x0)


def test_injected_schedule_and_start_are_validated():
    prior, op, y, _ = _setup()
    with pytest.raises(ValueError, match="descending"):
        dds_sample(y, op, prior, sigmas=torch.tensor([0.1, 1.0]))
    with pytest.raises(ValueError, match="positive"):
        dds_sample(y, op, prior, sigmas=torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="x_init has shape"):
        dds_sample(y, op, prior, x_init=torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="timesteps"):
        pc_sample(prior, (1, 3, 3), timesteps=torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("method", ["score-fast", "dps"])
def test_values_above_the_window_survive_every_level_not_only_the_last(method):
    """CT data hold bone above +1000 HU (> 1 on the [0, 1] scale): clipping each level's
    estimate at 1 made the data step put the skull back at every level (streaks, -13 dB on a
    head); only the lower bound is applied."""
    from recon.methods import get_method

    d = 16
    prior = GaussianPrior(torch.full((d,), 1.5, dtype=torch.float64),
                          0.01 * torch.eye(d, dtype=torch.float64), (4, 4))
    prior.image_size, prior.meta = 4, {}  # what the multi-scale wrapper reads (scale 1: used as it is)
    op = MaskOp(torch.ones(4, 4, dtype=torch.float64))
    y = op.A(torch.full((1, 4, 4), 1.5, dtype=torch.float64))
    levels = []
    get_method(method)(y, op, prior=prior, n_steps=6, seed=0,
                       callback=lambda i, x: levels.append(float(x.max())))
    assert len(levels) == 6 and min(levels[2:]) > 1.2  # bone stays bone at the low noise levels


class _KeepsMostPrior:
    """A denoiser that removes only a tenth of what separates its input from the truth (a
    native-pixel detail prior on the structured errors of a conditional sample): its score
    is ten times smaller than the ||z|| / sigma of the noise level it is told."""

    def __init__(self, truth):
        from recon.sde import VESDE

        self.truth, self.sde = truth, VESDE(0.01, 1.0)

    def denoise(self, u, sigma):
        return u - 0.1 * (u - self.truth)


def test_langevin_corrector_step_never_injects_noise_far_above_the_level():
    """The corrector's step 2 (snr ||z|| / ||score||)^2 (Song et al. 2021) grows without bound when
    the denoiser keeps what it sees; it is capped at 2 (snr sigma)^2, the step of a denoiser that
    sees noise of the level it is told, so the sample's error stays of the order of sigma (it is
    about 16 sigma_max per corrector step without the cap)."""
    torch.manual_seed(0)
    truth = torch.rand(1, 16, 16, dtype=torch.float64)
    prior = _KeepsMostPrior(truth)
    g = torch.Generator().manual_seed(0)
    x_init = truth + torch.randn(truth.shape, generator=g, dtype=torch.float64)  # sigma_max = 1
    x = pc_sample(prior, truth.shape, n_steps=10, snr=0.8, n_corrector=1, generator=g, dtype=torch.float64,
                  denoise=False, x_init=x_init)
    assert float((x - truth).pow(2).mean().sqrt()) < 3.0


def test_projection_step_without_an_exact_inverse_is_the_minimum_norm_correction():
    """CT's dense-view T has no exact inverse: the lam = 1 step moves the sample by the
    minimum-norm correction onto {A x = y}: the data fit, the move lies in range(A^H)."""
    from forward_models import ParallelBeamCT, view_angles

    op = ParallelBeamCT(12, view_angles(5)).double()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 12, 12, generator=g, dtype=torch.float64)
    y = op.A(x)
    dc = ProjectionConsistency(y, op, generator=g, inverse_iters=200)
    assert not dc.exact
    u = torch.rand(1, 12, 12, generator=g, dtype=torch.float64)
    out = dc(u, 0.0, 1.0)
    assert float((op.A(out) - y).norm() / y.norm()) < 1e-8
    # the move is A^H w for some w: its component in null(A) is zero
    d = (out - u).reshape(-1)
    rows = torch.stack([op.AH(e.reshape(1, *op.out_shape)).reshape(-1)
                        for e in torch.eye(int(torch.tensor(op.out_shape).prod()), dtype=torch.float64)])
    coef = torch.linalg.pinv(rows.T) @ d[:, None]
    assert float((rows.T @ coef - d[:, None]).norm()) < 1e-6 * float(d.norm())
    rnd = torch.randn(d.shape, generator=g, dtype=torch.float64)[:, None]  # a generic move is not
    assert float((rows.T @ (torch.linalg.pinv(rows.T) @ rnd) - rnd).norm()) > 0.3 * float(rnd.norm())


def test_projection_step_with_an_exact_inverse_is_song_et_al_formula():
    from forward_models import Inpainting

    mask = (torch.rand(6, 5, generator=torch.Generator().manual_seed(2)) > 0.5).double()
    op = Inpainting(mask)
    y = op.A(torch.rand(1, 6, 5, dtype=torch.float64))
    dc = ProjectionConsistency(y, op, generator=torch.Generator().manual_seed(0))
    assert dc.exact
    u = torch.rand(1, 6, 5, dtype=torch.float64)
    lam = 0.3
    torch.testing.assert_close(dc(u, 0.0, lam), u + lam * mask * (y - u))


@pytest.mark.parametrize("snr", [0.3, 0.7071])
def test_vp_corrector_keeps_the_noise_level_where_langevin_inflates_it(snr):
    """On noise of std sigma, repeated capped Langevin steps settle at variance sigma^2 / (1 - snr^2)
    (the unadjusted Langevin algorithm's bias, 2.8x at the old CT default snr 0.8); the 'vp'
    corrector keeps sigma^2.  The prior is a point mass at 0: the sample is pure noise, its score -u / sigma^2."""
    sigma = 0.5
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, fn in CORRECTORS.items():
        u = sigma * torch.randn(4, 64, 64, generator=g, dtype=torch.float64)
        var = []
        for i in range(60):
            score = -u / sigma**2
            step = torch.full((4, 1, 1), 2 * (snr * sigma) ** 2, dtype=torch.float64)
            u = fn(u, score, torch.randn(u.shape, generator=g, dtype=torch.float64), step, sigma)
            if i >= 20:  # settled (the variance converges like (1 - 2 snr^2)^(2i))
                var.append(float(u.pow(2).mean()) / sigma**2)
        out[name] = sum(var) / len(var)
    assert abs(out["vp"] - 1.0) < 0.02
    assert abs(out["langevin"] - 1.0 / (1.0 - snr**2)) < 0.03 / (1.0 - snr**2)


def test_vp_corrector_at_unit_step_is_denoise_then_renoise():
    g = torch.Generator().manual_seed(3)
    sigma, u, d, z = 0.3, *(torch.randn(1, 5, 5, generator=g, dtype=torch.float64) for _ in range(3))
    score = (d - u) / sigma**2
    out = CORRECTORS["vp"](u, score, z, torch.full((1, 1, 1), 4.0 * sigma**2, dtype=torch.float64), sigma)
    assert torch.allclose(out, d + sigma * z)  # the step is capped at a = 1


def test_vp_pc_sampler_matches_posterior_mean():
    prior, op, y, post = _setup()
    n = 400
    g = torch.Generator().manual_seed(0)
    dc = ProjectionConsistency(y.expand(n, 3, 3), op, lam=1.0, generator=g)
    x = pc_sample(prior, (n, 3, 3), n_steps=200, snr=0.7071, corrector="vp", consistency=dc, generator=g,
                  dtype=torch.float64)
    assert (x.mean(0) - post).abs().max() < 0.03


def test_unknown_corrector_is_refused():
    prior, _, _, _ = _setup()
    with pytest.raises(ValueError, match="unknown corrector 'mala'; available: langevin, vp"):
        pc_sample(prior, (1, 3, 3), n_steps=2, corrector="mala")
