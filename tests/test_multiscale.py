"""The multi-scale denoiser: any image size, its two bands, resampling to the prior's scale."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recon.multiscale import ResampledPrior, denoise_any_size, detail_std_for, scale_factor


def tiny_prior(seed=0):
    """The tiny random-weight U-Net prior of tests/test_prior.py (16 px, coordinate channels)."""
    from tests.test_prior import tiny_prior as _tiny

    return _tiny(seed).eval()


class IdentityPrior:
    """D(x, sigma) = x: the bands can be checked in closed form."""

    meta = {"image_size": 16}
    image_size = 16
    window = None
    sde = None

    def denoise(self, x, sigma):
        return x


def test_any_size_matches_the_network_where_it_fits():
    p = tiny_prior()
    x = torch.rand(2, 16, 16)
    with torch.no_grad():
        assert torch.equal(denoise_any_size(p, x, 0.3), p.denoise(x, 0.3))
        for shape in ((2, 17, 23), (1, 9, 31), (1, 5, 5)):
            out = denoise_any_size(p, torch.rand(*shape), torch.tensor(0.2))
            assert out.shape == shape and torch.isfinite(out).all()


def test_factor_one_is_the_prior_itself():
    p = tiny_prior()
    x = torch.rand(1, 16, 16)
    with torch.no_grad():
        assert torch.equal(ResampledPrior(p, 1.0).denoise(x, 0.5), p.denoise(x, 0.5))
        assert not ResampledPrior(p, 1.3).resample  # within 1.5x: on the data's grid


def test_the_two_bands_in_closed_form():
    """With D = identity the coarse band returns the averaged image, and the detail band
    is kept with the Wiener gain a / (a + n), n = sigma^2 (1 - 1/f^2)."""
    rp = ResampledPrior(IdentityPrior(), 4.0, detail_std=0.05)
    x = torch.rand(2, 32, 24)
    low = F.interpolate(x[:, None], size=(8, 6), mode="area")
    up = F.interpolate(low, size=(32, 24), mode="bilinear", align_corners=False)[:, 0]
    for sigma in (1e-4, 0.05, 0.3, 10.0):
        gain = 0.05 ** 2 / (0.05 ** 2 + sigma ** 2 * (1 - 1 / 16))
        expect = up + gain * (x - up)
        assert torch.allclose(rp.denoise(x, sigma), expect, atol=1e-6)
    assert torch.allclose(rp.denoise(x, 1e-6), x, atol=1e-5)          # no noise: the image itself
    assert torch.allclose(rp.denoise(x, 100.0), up, atol=1e-5)        # high noise: the coarse band only


def test_coarse_band_sees_the_noise_divided_by_the_factor():
    seen = []

    class Spy(IdentityPrior):
        def denoise(self, x, sigma):
            seen.append((tuple(x.shape), float(torch.as_tensor(sigma).reshape(-1)[0])))
            return x

    ResampledPrior(Spy(), 2.0).denoise(torch.rand(1, 32, 32), 0.8)
    assert seen == [((1, 16, 16), pytest.approx(0.4))]


def test_resampling_preserves_a_smooth_image():
    yy, xx = np.mgrid[:64, :48] / 64.0
    smooth = torch.from_numpy(np.exp(-((yy - 0.5) ** 2 + (xx - 0.4) ** 2) / 0.2)).float()[None]
    rp = ResampledPrior(IdentityPrior(), 4.0, detail_std=0.0)  # detail band dropped entirely
    err = rp.denoise(smooth, 1.0) - smooth
    assert float(err.pow(2).mean().sqrt() / smooth.pow(2).mean().sqrt()) < 0.02  # ~1 % interior, edges worse
    assert float(err.abs().max()) < 0.05


def test_scale_factor_maps_the_image_onto_the_prior_grid_and_checks_pixel_sizes():
    p = tiny_prior()
    f, how = scale_factor((64, 48), p)
    assert f == 4.0 and "onto the prior's 16 px grid" in how
    p.meta["pixel_mm"] = 3.0
    f, how = scale_factor((64, 64), p, native_pixel_mm=0.75)  # 3 mm per prior pixel, as in training
    assert f == 4.0 and "WARNING" not in how
    f, how = scale_factor((64, 64), p, native_pixel_mm=0.25)  # 1 mm: 3x finer than in training
    assert f == 4.0 and "WARNING: 3x finer" in how
    p.meta["detail_std"] = {"2": 0.02, "4": 0.04}
    assert detail_std_for(p, 2.0) == pytest.approx(0.02)
    assert detail_std_for(p, math.sqrt(8)) == pytest.approx(0.03)
    assert detail_std_for(p, 8.0) == pytest.approx(0.04)


def odd_size_problems(shape):
    """(y, op) of a random image of ``shape`` under an inpainting and a Cartesian MRI (complex,
    Fourier) operator with one random mask (seed 0)."""
    from forward_models import CartesianMRI, Inpainting

    g = torch.Generator().manual_seed(0)
    x = torch.rand((1, *shape), generator=g)
    mask = (torch.rand(shape, generator=g) > 0.5).float()
    ops = (Inpainting(mask, shape=shape), CartesianMRI(mask))
    return [(op.A(x.to(torch.complex64) if op.is_complex_input else x), op) for op in ops]


@pytest.mark.parametrize("method", ["score", "score-fast", "dps"])
@pytest.mark.parametrize("shape", [(17, 23), (40, 31)])
def test_every_score_method_runs_at_any_image_size(method, shape):
    """Odd and non-square images, smaller and larger than the prior's 16 px, through each
    score method on MRI (complex, Fourier) and inpainting operators."""
    from recon.methods import get_method

    p = tiny_prior()
    for y, op in odd_size_problems(shape):
        out = get_method(method)(y, op, prior=p, n_steps=3, seed=0)
        assert out.shape == (1, *shape) and torch.isfinite(out).all()
