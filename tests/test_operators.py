"""Operators against reference implementations, error handling, dtype/device rules."""
import math

import numpy as np
import pytest
import torch
from skimage.data import shepp_logan_phantom
from skimage.transform import iradon, radon, resize

from forward_models import (INPAINT_MASKS, MRI_MASKS, BoxMask, CartesianMRI, Compose,
                            EquispacedMask, FanBeamCT, FFT2c, GaussianNoise, Identity, Inpainting,
                            LinearOperator, ParallelBeamCT, PoissonNoise, RandomMask, SenseMRI,
                            complex_dtype, estimate_sensitivity_maps, fft2c, ifft2c,
                            inpainting_mask, operator_kind, real_dtype, view_angles)
from recon.fbp import fbp




def _phantom(n):
    return resize(shepp_logan_phantom(), (n, n), anti_aliasing=True)


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def _disc(n):
    yy, xx = np.mgrid[:n, :n]
    return ((yy - n // 2) ** 2 + (xx - n // 2) ** 2) <= (n // 2 - 1) ** 2


# --- CT ---------------------------------------------------------------------
@pytest.mark.parametrize("n,circle,step", [(128, False, 2.0), (65, True, 4.0)])
def test_parallel_matches_skimage_radon(n, circle, step):
    img = _phantom(n) * (_disc(n) if circle else 1)
    theta = np.arange(0, 180, step)
    op = ParallelBeamCT.like_skimage(n, theta, circle=circle)
    ours = op.A(torch.from_numpy(img)[None])[0].numpy()
    ref = radon(img, theta, circle=circle).T
    assert ours.shape == ref.shape
    assert _rel(ours, ref) < 0.01


def test_radians_helpers():
    op = ParallelBeamCT.from_degrees(16, [0, 45, 90])
    torch.testing.assert_close(op.angles, torch.tensor([0, math.pi / 4, math.pi / 2], dtype=torch.float64))
    assert op.n_det == math.ceil(math.sqrt(2) * 16)
    torch.testing.assert_close(view_angles(4, arc_deg=360), torch.tensor([0, 0.5, 1, 1.5], dtype=torch.float64) * math.pi)


def test_geometry_orientation():
    """θ=0 integrates columns (bins follow col), θ=π/2 integrates rows (bins go up)."""
    n = 9
    x = torch.zeros(1, n, n, dtype=torch.float64)
    x[0, 2, 6] = 1.0  # row 2 (above centre), col 6 (right of centre)
    op = ParallelBeamCT(n, [0.0, math.pi / 2], n_det=n)
    y = op.A(x)[0]
    assert y[0].argmax().item() == 6  # u = col - 4 = +2
    assert y[1].argmax().item() == 6  # u = 4 - row = +2


@pytest.mark.parametrize("filt", ["ramp", "shepp-logan", "cosine", "hann"])
def test_fbp_matches_iradon(filt):
    n = 96
    theta = np.linspace(0, 180, 180, endpoint=False)
    op = ParallelBeamCT.like_skimage(n, theta)
    sino = op.A(torch.from_numpy(_phantom(n))[None])
    rec = fbp(sino, op, filter=filt)[0].numpy()
    ref = iradon(sino[0].numpy().T, theta, filter_name=filt, circle=False)
    inside = _disc(n)
    assert _rel(rec[inside], ref[inside]) < 0.02


def test_fbp_fan_beam_close_to_parallel():
    n = 64
    img = torch.from_numpy(_phantom(n))[None]
    fan = FanBeamCT(n, view_angles(240, arc_deg=360), 110, 190)
    par = ParallelBeamCT(n, view_angles(120))
    rec_fan = fbp(fan.A(img), fan)[0].numpy()
    rec_par = fbp(par.A(img), par)[0].numpy()
    inside = _disc(n)
    assert _rel(rec_fan[inside], rec_par[inside]) < 0.1
    assert _rel(rec_fan[inside], img[0].numpy()[inside]) < 0.2


def test_fan_central_ray_is_parallel_ray():
    n = 32
    img = torch.from_numpy(_phantom(n))[None]
    fan = FanBeamCT(n, view_angles(12, arc_deg=360), 80, 120, n_det=31)
    par = ParallelBeamCT(n, view_angles(12, arc_deg=360), n_det=1)
    torch.testing.assert_close(fan.A(img)[0, :, 15], par.A(img)[0, :, 0])


def test_matrix_free_equals_matrix():
    x = torch.randn(2, 33, 33, dtype=torch.float64)
    a = ParallelBeamCT(33, view_angles(19), backend="matrix").A(x)
    b = ParallelBeamCT(33, view_angles(19), backend="matrix-free").A(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,angles", [(33, view_angles(180)), (32, view_angles(16, arc_deg=360)),
                                      (31, view_angles(45, arc_deg=135))])
def test_symmetry_folding_equals_direct_weights(n, angles):
    folded = ParallelBeamCT(n, angles)
    assert folded.folded and not ParallelBeamCT(n, angles, fold=False).folded
    direct = ParallelBeamCT(n, angles, fold=False)
    x = torch.randn(2, n, n, dtype=torch.float64)
    y = torch.randn(2, *folded.out_shape, dtype=torch.float64)
    torch.testing.assert_close(folded.A(x), direct.A(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded.AH(y), direct.AH(y), rtol=1e-5, atol=1e-5)


def test_matrix_cache_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("RECON_CACHE_DIR", str(tmp_path))
    first = ParallelBeamCT(20, view_angles(9))
    assert first.projector.source == "built" and list(tmp_path.glob("*.npz"))
    second = ParallelBeamCT(20, view_angles(9))
    assert second.projector.source == "cache"
    x = torch.randn(1, 20, 20)
    torch.testing.assert_close(first.A(x), second.A(x))
    assert ParallelBeamCT(20, view_angles(9), det_spacing=1.1).projector.source == "built"


def test_cgls_inverse_recovers_image():
    n = 32
    op = ParallelBeamCT(n, view_angles(180))
    x = torch.from_numpy(_phantom(n))[None].repeat(2, 1, 1)
    x[1] = x[1].flip(-1)
    rec = op.inverse(op.A(x), n_iter=150)
    assert rec.shape == x.shape
    assert _rel(rec, x) < 0.02
    warm = op.inverse(op.A(x), n_iter=2, x0=x)
    assert _rel(warm, x) < 1e-6


@pytest.mark.parametrize("make", [
    lambda: ParallelBeamCT(32, view_angles(23)),
    lambda: ParallelBeamCT(32, view_angles(40, arc_deg=120)),
    lambda: ParallelBeamCT(32, [0.3, 1.0, 2.9, 0.1]),
    lambda: FanBeamCT(32, view_angles(30, arc_deg=360), 60, 100),
])
def test_ct_decompose(make):
    op = make()
    d = op.decompose()
    assert d.mask.shape == (d.T.n_views, 1) and int(d.mask.sum()) == op.n_views
    x = torch.randn(2, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(d.embed(op.A(x)), d.mask * d.T.A(x))
    assert d.T.inverse(d.T.A(x), n_iter=3).shape == x.shape


def test_ct_full_view_sets():
    assert ParallelBeamCT(16, view_angles(23)).decompose().T.n_views == 184
    assert ParallelBeamCT(16, view_angles(60, arc_deg=120)).decompose().T.n_views == 180
    assert ParallelBeamCT(16, view_angles(90)).decompose(full_views=360).T.n_views == 360
    assert FanBeamCT(16, view_angles(40, arc_deg=360), 40, 60).decompose().T.n_views == 360


# --- MRI --------------------------------------------------------------------
def test_fft2c_matches_numpy():
    x = np.random.default_rng(0).standard_normal((2, 15, 12)) + 1j * np.random.default_rng(1).standard_normal((2, 15, 12))
    ref = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    np.testing.assert_allclose(fft2c(torch.from_numpy(x)).numpy(), ref, atol=1e-12)
    np.testing.assert_allclose(ifft2c(fft2c(torch.from_numpy(x))).numpy(), x, atol=1e-12)
    op = FFT2c((15, 12))
    np.testing.assert_allclose(op.inverse(op.A(torch.from_numpy(x))).numpy(), x, atol=1e-12)


def test_cartesian_decompose_and_real_input():
    mask = EquispacedMask(4)((16, 16))
    op = CartesianMRI(mask)
    x = torch.randn(2, 16, 16)
    y = op.A(x)
    assert y.dtype == torch.complex64
    d = op.decompose()
    torch.testing.assert_close(d.embed(y), d.mask * d.T.A(x))
    torch.testing.assert_close(d.T.inverse(d.T.A(x)).real, x, rtol=1e-5, atol=1e-5)


def test_sense_fully_sampled_inverse_and_maps():
    g = torch.Generator().manual_seed(0)
    H = W = 32
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    coils = torch.stack([torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2)) for cy, cx in
                         [(-1, -1), (-1, 1), (1, -1), (1, 1)]]).to(torch.complex64)
    img = torch.from_numpy(_phantom(H)).float() + 0.1
    kspace = fft2c(coils * img)
    maps = estimate_sensitivity_maps(kspace, calib_size=12)
    assert maps.shape == (4, H, W) and maps.is_complex()
    rss = (maps.abs() ** 2).sum(0).sqrt()
    assert torch.allclose(rss[rss > 0], torch.ones(()), atol=1e-4)
    op = SenseMRI(maps)
    x = torch.complex(torch.randn(1, H, W, generator=g), torch.randn(1, H, W, generator=g))
    torch.testing.assert_close(op.inverse(op.A(x)), x * (rss > 0), rtol=1e-4, atol=1e-4)


# --- masks ------------------------------------------------------------------
def _fastmri_center(num_cols, num_low):
    mask = np.zeros(num_cols, dtype=np.float32)
    pad = (num_cols - num_low + 1) // 2
    mask[pad:pad + num_low] = 1
    return mask


def _fastmri_random(num_cols, acc, cf, seed):
    rng = np.random.RandomState(seed)
    num_low = round(num_cols * cf)
    prob = (num_cols / acc - num_low) / (num_cols - num_low)
    return np.maximum(_fastmri_center(num_cols, num_low), rng.uniform(size=num_cols) < prob)


def _fastmri_equispaced(num_cols, acc, cf, seed):
    rng = np.random.RandomState(seed)
    num_low = round(num_cols * cf)
    mask = _fastmri_center(num_cols, num_low)
    offset = rng.randint(0, high=round(acc))
    mask[offset::acc] = 1
    return mask


@pytest.mark.parametrize("acc,cf", [(4, 0.08), (8, 0.04)])
@pytest.mark.parametrize("seed", [0, 7])
def test_line_masks_match_fastmri_reference(acc, cf, seed):
    shape = (64, 320)
    for cls, ref in ((RandomMask, _fastmri_random), (EquispacedMask, _fastmri_equispaced)):
        m = cls(acc, center_fraction=cf)(shape, seed=seed)
        cols = ref(shape[1], acc, cf, seed).astype(np.float32)
        np.testing.assert_array_equal(m.mask.numpy(), np.broadcast_to(cols, shape))


@pytest.mark.parametrize("kind", sorted(MRI_MASKS))
@pytest.mark.parametrize("acc", [4, 8])
def test_mri_mask_acceleration_is_truthful(kind, acc):
    shape = (96, 80)
    m = MRI_MASKS[kind](acc)(shape, seed=3)
    assert m.mask.shape == shape and m.mask.dtype == torch.float32
    assert set(m.mask.unique().tolist()) <= {0.0, 1.0}
    assert m.acceleration == pytest.approx(m.mask.numel() / m.mask.sum().item())
    assert m.sampling_rate == pytest.approx(1 / m.acceleration)
    if kind in ("gaussian1d", "gaussian2d", "poisson"):
        assert m.acceleration == pytest.approx(acc, rel=0.05)
    else:
        assert 0.5 * acc < m.acceleration <= acc * 1.5
    if kind != "gaussian2d" and kind != "poisson":  # whole columns
        assert bool((m.mask == m.mask[:1]).all())
    assert bool(m.mask[shape[0] // 2, shape[1] // 2] == 1)  # centre sampled
    torch.testing.assert_close(MRI_MASKS[kind](acc)(shape, seed=3).mask, m.mask)


def test_random_mask_expected_acceleration():
    accs = [RandomMask(4)((8, 256), seed=s).acceleration for s in range(40)]
    rates = np.mean([1 / a for a in accs])
    assert rates == pytest.approx(0.25, rel=0.05)


def test_equispaced_match_acceleration():
    m = EquispacedMask(4, match_acceleration=True)((32, 320), seed=0)
    assert m.acceleration == pytest.approx(4, rel=0.05)


@pytest.mark.parametrize("kind", sorted(INPAINT_MASKS))
def test_inpaint_masks(kind):
    m = INPAINT_MASKS[kind]()((48, 40), seed=1)
    assert m.mask.shape == (48, 40)
    assert 0 < m.sampling_rate < 1
    torch.testing.assert_close(INPAINT_MASKS[kind]()((48, 40), seed=1).mask, m.mask)
    assert BoxMask(0.25)((40, 40)).sampling_rate == pytest.approx(0.75)
    assert INPAINT_MASKS["random"](0.3)((50, 50)).sampling_rate == pytest.approx(0.3)


# --- noise ------------------------------------------------------------------
def test_noise_models_are_seeded():
    y = torch.rand(2, 5, 7, dtype=torch.float64)
    n1 = GaussianNoise(0.1)(y, generator=torch.Generator().manual_seed(4))
    n2 = GaussianNoise(0.1)(y, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(n1, n2)
    assert (n1 - y).std().item() == pytest.approx(0.1, rel=0.3)
    k = torch.randn(1, 64, 64, dtype=torch.complex64)
    nk = GaussianNoise(0.5)(k, generator=torch.Generator().manual_seed(0)) - k
    assert nk.dtype == torch.complex64 and nk.real.std().item() == pytest.approx(0.5, rel=0.05)
    mask = (torch.rand(64, 64) > 0.5).float()
    assert bool((GaussianNoise(1.0)(k * mask, mask=mask)[0][mask == 0] == 0).all())
    rel = GaussianNoise(0.1, relative=True)(10 * y, generator=torch.Generator().manual_seed(1)) - 10 * y
    assert rel.std().item() == pytest.approx(0.1 * (10 * y).square().mean().sqrt().item(), rel=0.3)
    p = torch.full((1, 100, 100), 2.0)
    noisy = PoissonNoise(1e6)(p, generator=torch.Generator().manual_seed(0))
    assert noisy.dtype == p.dtype and (noisy - p).abs().mean().item() < 0.01
    low = PoissonNoise(1.0)(torch.full((1, 50), 30.0), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(low).all()


# --- errors -----------------------------------------------------------------
def test_value_errors():
    ct = ParallelBeamCT(16, view_angles(5))
    with pytest.raises(ValueError, match=r"expected \(B, 16, 16\)"):
        ct.A(torch.zeros(1, 16, 15))
    with pytest.raises(ValueError, match="expected"):
        ct.AH(torch.zeros(1, 4, ct.n_det))
    with pytest.raises(ValueError, match="NaN"):
        ct.A(torch.full((1, 16, 16), float("nan")))
    with pytest.raises(ValueError, match="empty"):
        ParallelBeamCT(16, [])
    with pytest.raises(ValueError, match="finite"):
        ParallelBeamCT(16, [0.0, float("inf")])
    with pytest.raises(ValueError, match="real"):
        ct.A(torch.zeros(1, 16, 16, dtype=torch.complex64))
    with pytest.raises(ValueError, match="source"):
        FanBeamCT(16, view_angles(5), source_distance=5, detector_distance=20)
    with pytest.raises(ValueError, match="backend"):
        ParallelBeamCT(16, view_angles(5), backend="nope")
    with pytest.raises(ValueError, match="filter"):
        fbp(ct.A(torch.zeros(1, 16, 16)), ct, filter="nope")
    with pytest.raises(ValueError, match=r"expected \(20, 20\)"):
        Inpainting(torch.ones(16, 16), shape=(20, 20))
    with pytest.raises(ValueError, match=r"expected \(20, 20\)"):
        CartesianMRI(torch.ones(16, 16), shape=(20, 20))
    with pytest.raises(ValueError, match="mask"):
        SenseMRI(torch.ones(2, 16, 16, dtype=torch.complex64), torch.ones(16, 15))
    with pytest.raises(ValueError, match="0 and 1"):
        CartesianMRI(torch.full((8, 8), 0.5))
    with pytest.raises(ValueError, match="expected"):
        Inpainting(torch.ones(8, 8)).A(torch.ones(1, 8, 9))
    with pytest.raises(ValueError, match="acceleration"):
        EquispacedMask(0.5)
    with pytest.raises(ValueError, match="sigma"):
        GaussianNoise(-1)
    with pytest.raises(ValueError, match="I0"):
        PoissonNoise(0)


# --- dtype / device ---------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("make", [
    lambda: ParallelBeamCT(16, view_angles(7)),
    lambda: ParallelBeamCT(16, view_angles(7), backend="matrix-free"),
    lambda: FanBeamCT(16, view_angles(7, arc_deg=360), 30, 50),
    lambda: Inpainting(torch.ones(16, 16)),
    lambda: CartesianMRI(torch.ones(16, 16)),
    lambda: SenseMRI(torch.ones(2, 16, 16, dtype=torch.complex64)),
])
def test_dtype_follows_input(make, dtype):
    op = make()
    x = torch.rand(2, 16, 16, dtype=dtype)
    y = op.A(x)
    complex_out = op.is_complex_output
    expected = {torch.float32: torch.complex64, torch.float64: torch.complex128}[dtype] if complex_out else dtype
    assert y.dtype == expected and y.device == x.device
    assert op.AH(y).dtype == expected if complex_out else op.AH(y).dtype == dtype


def test_module_conversions_move_buffers():
    op = ParallelBeamCT(16, view_angles(5))
    assert op.to("cpu") is op and op.double() is op
    x = torch.rand(1, 16, 16, dtype=torch.float64)
    assert op.A(x).dtype == torch.float64
    assert float(op.norm_estimate(n_iter=5)) > 0
    mri = CartesianMRI(torch.ones(8, 8)).to(torch.float64)
    assert mri.mask.dtype == torch.float64
    assert mri.norm_estimate(n_iter=3) == pytest.approx(1.0)
    assert mri.H.norm_estimate(n_iter=3) == pytest.approx(1.0)


def test_conversions_reach_nested_operators():
    """``_forward`` is the operator hook; ``nn.Module._apply`` (behind .to/.double) is untouched."""
    inner = Inpainting(torch.ones(8, 8))
    op = Compose(CartesianMRI(torch.ones(8, 8)), inner)
    assert op.double() is op and inner.mask.dtype == torch.float64
    assert op.outer.mask.dtype == torch.float64
    assert not hasattr(LinearOperator, "_apply_op") and LinearOperator._apply is torch.nn.Module._apply
    x = torch.rand(1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(op._forward(x), op.A(x))


def test_complex_and_real_dtype():
    assert complex_dtype(torch.float32) == torch.complex64
    assert complex_dtype(torch.float64) == torch.complex128
    assert complex_dtype(torch.float16) == torch.complex32
    assert complex_dtype(torch.bfloat16) == torch.complex64  # no complex bfloat16
    assert complex_dtype(torch.complex128) == torch.complex128
    assert real_dtype(torch.complex64) == torch.float32 and real_dtype(torch.complex128) == torch.float64
    assert real_dtype(torch.float16) == torch.float16
    with pytest.raises(ValueError, match="no complex dtype"):
        complex_dtype(torch.int64)


# --- operator kinds -----------------------------------------------------------
class _PixelMask(LinearOperator):
    """A pixel mask that is not an ``Inpainting``: recognised by its structure."""

    def __init__(self, mask):
        super().__init__(mask.shape, mask.shape)
        self.register_buffer("mask", mask)

    def _forward(self, x):
        return self.mask.to(x.dtype) * x

    def _adjoint(self, y):
        return self.mask.to(y.dtype) * y


class _ComplexDense(LinearOperator):
    is_complex_input = True

    def __init__(self):
        super().__init__((4,), (4,))

    def _forward(self, x):
        return x

    def _adjoint(self, y):
        return y


@pytest.mark.parametrize("make,kind", [
    (lambda: ParallelBeamCT(16, view_angles(7)), "ct"),
    (lambda: ParallelBeamCT(16, view_angles(7), backend="matrix-free"), "ct"),
    (lambda: FanBeamCT(16, view_angles(7, arc_deg=360), 30, 50), "ct"),
    (lambda: ParallelBeamCT(16, view_angles(7)).decompose().T, "ct"),
    (lambda: CartesianMRI(MRI_MASKS["equispaced"](acceleration=4, center_fraction=0.1)((16, 16), seed=0)), "mri"),
    (lambda: SenseMRI(torch.ones(2, 16, 16, dtype=torch.complex64)), "mri"),
    (lambda: FFT2c((16, 16)), "mri"),
    (lambda: CartesianMRI(torch.ones(16, 16)).decompose().T, "mri"),
    (lambda: Inpainting(INPAINT_MASKS["box"]()((16, 16), seed=0)), "inpaint"),
    (lambda: _PixelMask((torch.rand(8, 8) > 0.5).double()), "inpaint"),
    (lambda: _ComplexDense(), "mri"),                              # complex input
    (lambda: Compose(CartesianMRI(torch.ones(8, 8)), Inpainting(torch.ones(8, 8))), None),
    (lambda: Compose(Inpainting(torch.ones(8, 8)), CartesianMRI(torch.ones(8, 8))), "mri"),
    (lambda: Compose(ParallelBeamCT(8, view_angles(5)), Inpainting(torch.ones(8, 8))), None),
    (lambda: 0.5 * ParallelBeamCT(8, view_angles(5)), None),
    (lambda: ParallelBeamCT(8, view_angles(5)).H, None),
    (lambda: Identity((8, 8)), None),
])
def test_operator_kind(make, kind):
    op = make()
    assert operator_kind(op) == kind
    assert (inpainting_mask(op) is not None) == (kind == "inpaint")


def test_operator_kind_class_attribute():
    assert LinearOperator.modality is None and Identity.modality is None
    assert ParallelBeamCT.modality == FanBeamCT.modality == "ct"
    assert FFT2c.modality == CartesianMRI.modality == SenseMRI.modality == "mri"
    assert Inpainting.modality == "inpaint"

    class Custom(Identity):
        modality = "CT"

    assert operator_kind(Custom((4, 4))) == "ct"
    assert operator_kind(object()) is None


def test_fbp_dtype_and_batch():
    op = ParallelBeamCT(24, view_angles(30))
    x = torch.rand(3, 24, 24)
    rec = fbp(op.A(x), op)
    assert rec.shape == (3, 24, 24) and rec.dtype == torch.float32
    torch.testing.assert_close(fbp(op.A(x[1:2]), op)[0], rec[1])


@pytest.mark.parametrize("n_views,folded", [(9, False), (16, True)])
def test_ct_gradients_flow(n_views, folded):
    op = ParallelBeamCT(20, view_angles(n_views))
    assert op.folded == folded
    x = torch.rand(2, 20, 20, requires_grad=True)
    y = torch.rand(2, *op.out_shape)
    loss = 0.5 * (op.A(x) - y).square().sum()
    loss.backward()
    torch.testing.assert_close(x.grad, op.AH(op.A(x.detach()) - y), rtol=1e-4, atol=1e-4)


def test_astra_backend_matches_matrix():
    pytest.importorskip("astra")
    x = torch.rand(1, 24, 24, dtype=torch.float64)
    a = ParallelBeamCT(24, view_angles(13), backend="astra").A(x)
    b = ParallelBeamCT(24, view_angles(13)).A(x)
    assert _rel(a, b) < 1e-4


# ---------------------------------------------------------------------------
# simulation on a finer grid (no inverse crime)
# ---------------------------------------------------------------------------
def test_finer_grid_projection_agrees_on_smooth_images_and_differs_at_edges():
    from forward_models import FanBeamCT, FinerGridProjection, ParallelBeamCT, view_angles

    op = ParallelBeamCT(48, view_angles(12))
    fine = FinerGridProjection(op, 2)
    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    r2 = (yy - 23.5) ** 2 + (xx - 23.5) ** 2
    smooth = torch.exp(-r2 / (2 * 8.0**2))[None].double()
    rel = float((fine.A(smooth) - op.A(smooth)).norm() / op.A(smooth).norm())
    assert rel < 0.005  # the same line integrals where the image is smooth
    disc = (r2 < 15.0**2).double()[None]
    rel_edge = float((fine.A(disc) - op.A(disc)).norm() / op.A(disc).norm())
    assert rel_edge > 2 * rel  # but another discretisation at edges: not the inverse crime
    # total attenuation per view is the image's mass in both (line integrals in op's pixels)
    assert torch.allclose(fine.A(disc).sum(-1), op.A(disc).sum(-1), rtol=0.02)
    with pytest.raises(ValueError, match="ParallelBeamCT only"):
        FinerGridProjection(FanBeamCT(16, view_angles(8, arc_deg=360), 40, 80), 2)
    with pytest.raises(ValueError, match="integer >= 2"):
        FinerGridProjection(op, 1)
