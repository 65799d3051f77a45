"""SDE marginals against Monte Carlo simulation of the forward SDE."""
import math

import pytest
import torch

from recon.sde import SubVPSDE, VESDE, VPSDE, sde_from_config


@pytest.mark.parametrize("sde", [VESDE(0.01, 5.0), VPSDE(0.1, 20.0), SubVPSDE(0.1, 20.0)], ids=["ve", "vp", "subvp"])
def test_marginal_matches_monte_carlo(sde):
    g = torch.Generator().manual_seed(0)
    n, steps, t_end = 20000, 400, 0.6
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    x = x0.clone()
    dt = t_end / steps
    for i in range(steps):
        t = torch.full((n,), i * dt, dtype=torch.float64)
        f, gdt = sde.discretize(x, t, dt)
        x = x + f + gdt.reshape(-1, 1) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    mean, std = sde.marginal(x0, torch.full((n,), t_end, dtype=torch.float64))
    assert x.mean().item() == pytest.approx(mean[0, 0].item(), abs=4 * std[0, 0].item() / math.sqrt(n) + 0.01)
    assert x.std().item() == pytest.approx(std[0, 0].item(), rel=0.03)


def test_scale_sigma_consistent_with_marginal():
    for sde in (VESDE(), VPSDE(), SubVPSDE()):
        t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
        s, sig = sde.scale_sigma(t)
        mean, std = sde.marginal(torch.ones(3, 1, dtype=torch.float64), t)
        assert torch.allclose(mean[:, 0], s) and torch.allclose(std[:, 0], s * sig)


def test_prior_sample_and_logp():
    sde = VESDE(0.01, 3.0)
    z = sde.prior_sample((4000, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert z.std().item() == pytest.approx(3.0, rel=0.05)
    lp = sde.prior_logp(torch.zeros(1, 2, dtype=torch.float64))
    assert lp.item() == pytest.approx(-math.log(2 * math.pi * 9.0), rel=1e-9)


@pytest.mark.parametrize("sde", [VESDE(0.01, 5.0), VPSDE(0.1, 20.0), SubVPSDE(0.1, 20.0)], ids=["ve", "vp", "subvp"])
def test_reverse_probability_flow_has_no_diffusion(sde):
    def score(x, t):  # a known, x- and t-dependent score
        return -x * (1 + t.reshape(-1, 1, 1)) + 0.3

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    f, gt = sde.sde(x, t)
    # f and g in closed form (Song et al. 2021, eqs. 30-34)
    if isinstance(sde, VESDE):
        sig = sde.sigma_min * (sde.sigma_max / sde.sigma_min) ** t
        f_exp, g_exp = torch.zeros_like(x), sig * math.sqrt(2 * math.log(sde.sigma_max / sde.sigma_min))
    else:
        beta = sde.beta_min + t * (sde.beta_max - sde.beta_min)
        f_exp, g_exp = -0.5 * beta.reshape(-1, 1, 1) * x, beta.sqrt()
        if isinstance(sde, SubVPSDE):
            g_exp = g_exp * (1 - torch.exp(-2 * (sde.beta_min * t + 0.5 * (sde.beta_max - sde.beta_min) * t**2))).sqrt()
    assert torch.allclose(f, f_exp, rtol=1e-12, atol=1e-12) and torch.allclose(gt, g_exp, rtol=1e-12)
    g2 = gt.reshape(-1, 1, 1) ** 2

    drift, diff = sde.reverse(score, probability_flow=True)(x, t)
    assert torch.equal(diff, torch.zeros_like(diff))
    assert torch.allclose(drift, f - 0.5 * g2 * score(x, t), rtol=1e-12, atol=1e-12)

    # the reverse SDE keeps g(t) and uses the full score
    drift, diff = sde.reverse(score)(x, t)
    assert torch.allclose(diff, gt) and torch.allclose(drift, f - g2 * score(x, t), rtol=1e-12, atol=1e-12)


def test_config_round_trip_and_errors():
    assert isinstance(sde_from_config({"name": "vp", "beta_min": 0.1, "beta_max": 20}), VPSDE)
    with pytest.raises(ValueError, match="unknown SDE"):
        sde_from_config({"name": "nope"})
    with pytest.raises(ValueError):
        VESDE(5.0, 1.0)
