"""The object's smooth phase for real-valued priors on complex MRI data (PhaseModulated)."""
import numpy as np
import pytest
import torch

from forward_models import (CartesianMRI, EquispacedMask, PhaseModulated, PoissonDiscMask, SenseMRI, centred_block,
                            fft2c, smooth_phase)
from recon.samplers import cgls_data_step
from recon.score_methods import magnitude_operator


def _object(H=48, W=40, dtype=torch.float64):
    """A smooth-ish magnitude (an ellipse with an inner disc) and a smooth phase (ramp + bowl)."""
    r = torch.arange(H, dtype=dtype)[:, None] - H / 2
    c = torch.arange(W, dtype=dtype)[None, :] - W / 2
    mag = ((r / (0.4 * H)) ** 2 + (c / (0.4 * W)) ** 2 < 1).to(dtype) * 0.6
    mag = mag + 0.4 * ((r - 3) ** 2 + (c + 4) ** 2 < 36).to(dtype)
    phase = 0.9 + 0.05 * r - 0.04 * c + 0.002 * (r ** 2 + c ** 2)
    return mag, phase


def _brute_block(m):
    H, W = m.shape
    rc, cc = H // 2, W // 2
    if not m[rc, cc]:
        return None
    best, area = None, -1
    for a in range(min(rc, H - 1 - rc) + 1):
        for b in range(min(cc, W - 1 - cc) + 1):
            if m[rc - a:rc + a + 1, cc - b:cc + b + 1].all() and (2 * a + 1) * (2 * b + 1) > area:
                best, area = (a, b), (2 * a + 1) * (2 * b + 1)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_centred_block_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    H, W = rng.integers(5, 14, size=2)
    m = rng.random((H, W)) < 0.8
    m[H // 2 - 1:H // 2 + 2, W // 2 - 1:W // 2 + 2] |= rng.random() < 0.7
    want = _brute_block(m)
    got = centred_block(torch.from_numpy(m.astype(np.float32)))
    if want is None:
        assert got is None
    else:  # several blocks may share the largest area: compare the area
        assert (2 * got[0] + 1) * (2 * got[1] + 1) == (2 * want[0] + 1) * (2 * want[1] + 1)
        a, b = got
        assert m[H // 2 - a:H // 2 + a + 1, W // 2 - b:W // 2 + b + 1].all()


def test_line_mask_gives_a_tall_block():
    mask = EquispacedMask(4, center_fraction=0.1)((48, 40), seed=0)
    a, b = centred_block(mask.mask)
    assert a == 23 and 1 <= b <= 3  # all rows, the central columns


@pytest.mark.parametrize("coils", [1, 4])
def test_smooth_phase_recovers_the_phase(coils):
    mag, phase = _object()
    x = torch.polar(mag, phase)[None]
    mask = EquispacedMask(4, center_fraction=0.25)(mag.shape, seed=0).mask
    if coils == 1:
        op = CartesianMRI(mask)
    else:
        r = torch.linspace(-1, 1, mag.shape[0], dtype=torch.float64)[:, None]
        c = torch.linspace(-1, 1, mag.shape[1], dtype=torch.float64)[None, :]
        maps = torch.stack([torch.polar(torch.exp(-((r - dr) ** 2 + (c - dc) ** 2)), 0.3 * k * (r + c))
                            for k, (dr, dc) in enumerate([(-1, -1), (-1, 1), (1, -1), (1, 1)])])
        op = SenseMRI(maps / (maps.abs() ** 2).sum(0).sqrt(), mask)
    est = smooth_phase(op, op.A(x))
    inside = mag > 0.3
    err = torch.angle(torch.polar(torch.ones_like(phase), est[0] - phase))
    assert float(err[inside].abs().median()) < 0.05, float(err[inside].abs().median())


def test_magnitude_simulated_data_keep_the_operator():
    mag, _ = _object()
    op = CartesianMRI(EquispacedMask(4, center_fraction=0.25)(mag.shape, seed=0).mask)
    y = op.A(mag[None])
    assert bool((smooth_phase(op, y) == 0).all())
    assert magnitude_operator(op, y) is op


def test_no_centre_no_phase():
    mask = PoissonDiscMask(6)((32, 32), seed=0).mask.clone()
    mask[16, 16] = 0
    op = CartesianMRI(mask)
    mag, phase = _object(32, 32)
    y = op.A(torch.polar(mag, phase)[None])
    assert smooth_phase(op, y) is None and magnitude_operator(op, y) is op


def test_magnitude_data_step_fits_complex_data():
    """With the phase, the true magnitude fits the data exactly; a real image fitted without it
    (its real part) leaves a large residual.  Fails if the operator ignores the phase."""
    mag, phase = _object()
    op = CartesianMRI(EquispacedMask(4, center_fraction=0.25)(mag.shape, seed=0).mask)
    y = op.A(torch.polar(mag, phase)[None])
    wrapped = magnitude_operator(op, y)
    assert isinstance(wrapped, PhaseModulated)
    start = mag[None].clone()
    with_phase = cgls_data_step(wrapped, y, start, n_iter=20)
    without = cgls_data_step(op, y, start, n_iter=20)
    res_with = float((wrapped.A(with_phase) - y).norm() / y.norm())
    res_without = float((op.A(without.to(torch.complex128)) - y).norm() / y.norm())
    assert res_with < 0.1 * res_without and res_without > 0.2
    inside = mag > 0.3
    err_with = float((with_phase[0] - mag)[inside].abs().mean())
    err_without = float((without[0] - mag)[inside].abs().mean())
    assert err_with < 0.5 * err_without, (err_with, err_without)


def test_decomposed_inverse_carries_the_start_into_the_transform():
    """``T.inverse(z, x0)`` of a wrapped SENSE transform starts at e^{i phi} x0: with no iterations
    it returns x0 itself."""
    mag, phase = _object(32, 24)
    g = torch.Generator().manual_seed(0)
    maps = torch.complex(torch.randn(3, 32, 24, generator=g, dtype=torch.float64),
                         torch.randn(3, 32, 24, generator=g, dtype=torch.float64))
    op = PhaseModulated(SenseMRI(maps / (maps.abs() ** 2).sum(0).sqrt(),
                                 EquispacedMask(4, center_fraction=0.25)((32, 24), seed=0).mask), phase)
    T = op.decompose().T
    x0 = mag[None].to(torch.complex128)
    z = T.A(x0)
    torch.testing.assert_close(T.inverse(z, x0=x0, n_iter=0), x0)
    torch.testing.assert_close(T.inverse(z, x0=torch.zeros_like(x0), n_iter=60), x0, atol=1e-6, rtol=1e-6)


def test_phase_modulated_checks_its_phase():
    op = CartesianMRI(torch.ones(8, 6))
    with pytest.raises(ValueError, match="phase has shape"):
        PhaseModulated(op, torch.zeros(6, 8))
    with pytest.raises(ValueError, match="NaN"):
        PhaseModulated(op, torch.full((8, 6), float("nan")))
    with pytest.raises(ValueError, match="real"):
        PhaseModulated(op, torch.zeros(8, 6, dtype=torch.complex64))


def test_a_phase_per_item_in_a_batch():
    """smooth_phase gives one phase per item; PhaseModulated keeps items apart, is adjoint for the
    batch, and refuses a batch of another size with one clear error."""
    mag, phase = _object(24, 20)
    mask = EquispacedMask(4, center_fraction=0.3)((24, 20), seed=0).mask
    op = CartesianMRI(mask).double()
    x = torch.stack([torch.polar(mag, phase), mag.to(torch.complex128), torch.polar(mag, -phase)])
    est = smooth_phase(op, op.A(x))
    assert est.shape == (3, 24, 20) and bool((est[1] == 0).all()) and not bool((est[0] == 0).all())
    pm = PhaseModulated(op, est)
    g = torch.Generator().manual_seed(0)
    u = torch.complex(torch.randn(3, 24, 20, generator=g, dtype=torch.float64),
                      torch.randn(3, 24, 20, generator=g, dtype=torch.float64))
    v = torch.complex(torch.randn(3, 24, 20, generator=g, dtype=torch.float64),
                      torch.randn(3, 24, 20, generator=g, dtype=torch.float64))
    for i in range(3):  # adjoint per item, each with its own phase
        lhs = (pm.A(u)[i].conj() * v[i]).sum()
        rhs = (u[i].conj() * pm.AH(v)[i]).sum()
        assert abs(lhs - rhs) < 1e-9 * float(u[i].norm() * v[i].norm())
    one = PhaseModulated(op, est[2:])
    torch.testing.assert_close(pm.A(mag[None].expand(3, -1, -1))[2], one.A(mag[None])[0])
    with pytest.raises(ValueError, match="phase holds 3 items but the input has a batch of 2"):
        pm.A(mag[None].expand(2, -1, -1))
    assert abs(pm.norm_estimate() - op.norm_estimate()) < 1e-6


def test_magnitude_operator_checks_the_measurement_first():
    from recon.errors import ReconError

    op = CartesianMRI(EquispacedMask(4, center_fraction=0.25)((16, 12), seed=0).mask)
    with pytest.raises(ReconError, match="NaN"):
        magnitude_operator(op, torch.full((1, 16, 12), float("nan"), dtype=torch.complex64))
    with pytest.raises(ReconError, match="expected"):
        magnitude_operator(op, torch.zeros(16, 12, dtype=torch.complex64))


@pytest.mark.parametrize("method", ["score", "score-fast", "dps"])
def test_every_score_method_reconstructs_the_magnitude_through_the_phase(method, monkeypatch):
    import recon.score_methods as sm
    from recon.methods import get_method
    from tests.test_native import tiny_whole

    seen = []
    real = sm.magnitude_operator
    monkeypatch.setattr(sm, "magnitude_operator", lambda op, y: seen.append(real(op, y)) or seen[-1])
    mag, phase = _object(24, 20)
    op = CartesianMRI(EquispacedMask(4, center_fraction=0.3)((24, 20), seed=0).mask)
    y = op.A(torch.polar(mag, phase).to(torch.complex64)[None])
    out = get_method(method)(y, op, prior=tiny_whole(), n_steps=3, seed=0)
    assert out.shape == (1, 24, 20) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert len(seen) == 1 and isinstance(seen[0], PhaseModulated)
