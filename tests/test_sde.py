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


def test_reverse_probability_flow_has_no_diffusion():
    sde = VPSDE()
    rsde = sde.reverse(lambda x, t: -x, probability_flow=True)
    drift, diff = rsde(torch.ones(2, 3), torch.tensor([0.5, 0.5]))
    assert torch.all(diff == 0) and drift.shape == (2, 3)


def test_config_round_trip_and_errors():
    assert isinstance(sde_from_config({"name": "vp", "beta_min": 0.1, "beta_max": 20}), VPSDE)
    with pytest.raises(ValueError, match="unknown SDE"):
        sde_from_config({"name": "nope"})
    with pytest.raises(ValueError):
        VESDE(5.0, 1.0)
