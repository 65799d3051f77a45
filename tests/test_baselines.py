"""Tests for recon.baselines and the recon.methods registry.

Small self-contained operators are defined here so the tests do not depend on
forward_models.ct / .mri / .inpaint; where those exist, extra checks run
against them (guarded by importorskip).
"""
import math

import numpy as np
import pytest
import torch

from forward_models.base import Decomposition, Identity, LinearOperator
from recon import baselines as bl
from recon import methods
from recon.errors import ReconError
from recon.metrics import psnr




# ---------------------------------------------------------------------------
# test operators
# ---------------------------------------------------------------------------
class DenseOp(LinearOperator):
    """A x = M vec(x) (real or complex matrix)."""

    def __init__(self, M, in_shape, out_shape):
        super().__init__(in_shape, out_shape)
        self.register_buffer("M", torch.as_tensor(M))
        self.is_complex_input = self.M.is_complex()

    def _forward(self, x):
        M = self.M.to(x.device)
        if not M.is_complex():
            M = M.to(x.dtype)
        return (x.flatten(1) @ M.T).reshape(x.shape[0], *self.out_shape)

    def _adjoint(self, y):
        M = self.M.to(y.device)
        if not M.is_complex():
            M = M.to(y.dtype)
        return (y.flatten(1) @ M.conj()).reshape(y.shape[0], *self.in_shape)


def pixel_driven_projector(n, n_angles):
    """Nonnegative parallel-beam system matrix (pixel-driven, linear
    interpolation onto detector bins) for an n x n image: a small CT stand-in."""
    n_det = int(math.ceil(n * math.sqrt(2))) + 1
    c = (np.arange(n) - (n - 1) / 2)
    U, V = np.meshgrid(c, c, indexing="ij")
    rows, cols, vals = [], [], []
    pix = np.arange(n * n)
    for a, th in enumerate(np.linspace(0, np.pi, n_angles, endpoint=False)):
        t = (V * np.cos(th) + U * np.sin(th)).ravel() + (n_det - 1) / 2
        i0 = np.floor(t).astype(int)
        w1 = t - i0
        for idx, w in ((i0, 1 - w1), (i0 + 1, w1)):
            ok = (idx >= 0) & (idx < n_det)
            rows.append(a * n_det + idx[ok]); cols.append(pix[ok]); vals.append(w[ok])
    M = np.zeros((n_angles * n_det, n * n))
    np.add.at(M, (np.concatenate(rows), np.concatenate(cols)), np.concatenate(vals))
    return DenseOp(torch.tensor(M), (n, n), (n_angles, n_det))


class MaskedFFT(LinearOperator):
    """Single-coil Cartesian MRI stand-in: y = mask * FFT_ortho(x), complex."""

    is_complex_input = True

    def __init__(self, mask):
        mask = torch.as_tensor(mask)
        super().__init__(mask.shape, mask.shape)
        self.register_buffer("mask", mask)

    def _forward(self, x):
        return self.mask.to(x.real.dtype) * torch.fft.fft2(x, norm="ortho")

    def _adjoint(self, y):
        return torch.fft.ifft2(self.mask.to(y.real.dtype) * y, norm="ortho")


class MaskOp(LinearOperator):
    """Inpainting stand-in: A x = mask * x, with the Identity decomposition."""

    def __init__(self, mask):
        mask = torch.as_tensor(mask)
        super().__init__(mask.shape, mask.shape)
        self.register_buffer("mask", mask)

    def _forward(self, x):
        return self.mask.to(x.dtype) * x

    def _adjoint(self, y):
        return self.mask.to(y.dtype) * y

    def decompose(self):
        T = Identity(self.in_shape)
        return Decomposition(T, self.mask, lambda y: y)


def phantom(n=48):
    """Piecewise-constant test image in [0, 1]."""
    c = (np.arange(n) - (n - 1) / 2) / (n / 2)
    Y, X = np.meshgrid(c, c, indexing="ij")
    img = np.zeros((n, n))
    img[(X / 0.85) ** 2 + (Y / 0.7) ** 2 <= 1] = 0.5
    img[(np.abs(X + 0.25) < 0.2) & (np.abs(Y) < 0.3)] = 1.0
    img[(X - 0.35) ** 2 + (Y + 0.2) ** 2 <= 0.15 ** 2] = 0.2
    img[(X - 0.3) ** 2 + (Y - 0.35) ** 2 <= 0.1 ** 2] = 0.8
    return img


def best_scaled(x, ref):
    """x rescaled by the least-squares optimal scalar (fair to unnormalised adjoints)."""
    a = (x * ref).sum() / (x * x).sum()
    return a * x


# ---------------------------------------------------------------------------
# TV
# ---------------------------------------------------------------------------
def test_grad_adjoint():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 7, 5, generator=g, dtype=torch.float64)
    p = torch.randn(2, 2, 3, 7, 5, generator=g, dtype=torch.float64)
    lhs = (bl.grad2d(x) * p).sum()
    rhs = (x * bl.grad2d_adjoint(p)).sum()
    assert abs(lhs - rhs) < 1e-10 * abs(lhs)
    # Neumann: last row/column of the differences are zero
    assert bl.grad2d(x)[0, ..., -1, :].abs().max() == 0
    assert bl.grad2d(x)[1, ..., :, -1].abs().max() == 0


@pytest.mark.parametrize("weight", [0.05, 0.2])
def test_tv_identity_matches_skimage(weight):
    from skimage.restoration import denoise_tv_chambolle

    rng = np.random.default_rng(0)
    f = phantom(48) + 0.1 * rng.standard_normal((48, 48))
    ref = denoise_tv_chambolle(f, weight=weight, eps=1e-12, max_num_iter=5000)
    op = Identity((48, 48))
    y = torch.tensor(f)[None]
    # lam = weight exactly: relative=False, and relative=True since ||I|| = 1
    x_abs = bl.tv(y, op, lam=weight, n_iter=800, tol=0, relative=False)[0].numpy()
    x_rel = bl.tv(y, op, lam=weight, n_iter=800, relative=True)[0].numpy()
    for x in (x_abs, x_rel):
        assert np.linalg.norm(x - ref) / np.linalg.norm(ref) < 1e-3

    def obj(u):
        u = torch.tensor(u)[None]
        return 0.5 * ((u - y) ** 2).sum().item() + weight * bl._tv_value(u).item()

    assert obj(x_abs) <= obj(ref) * (1 + 1e-4)


def test_tv_complex_is_rotation_invariant_and_batched():
    """Joint (modulus) TV: tv(e^{i phi} f) = e^{i phi} tv(f); batch items independent."""
    rng = np.random.default_rng(1)
    f = torch.tensor(phantom(32) + 0.1 * rng.standard_normal((32, 32)))
    mask = torch.ones(32, 32)
    op = MaskedFFT(mask)  # unitary, complex
    ph = torch.tensor([0.0, 0.7], dtype=torch.float64)
    x_true = f[None] * torch.exp(1j * ph)[:, None, None]
    y = op.A(x_true)
    x = bl.tv(y, op, lam=0.1, n_iter=400, tol=0, step_ratio=3.0)
    assert x.is_complex() and x.shape == (2, 32, 32)
    real_sol = bl.tv(f[None], Identity((32, 32)), lam=0.1, n_iter=400, tol=0, step_ratio=3.0)[0]
    for b in range(2):
        rotated = x[b] * torch.exp(-1j * ph[b])
        assert (rotated - real_sol).abs().max() < 1e-6


def test_tv_clip_and_callback():
    rng = np.random.default_rng(2)
    f = torch.tensor(phantom(32) + 0.3 * rng.standard_normal((32, 32)), dtype=torch.float32)[None]
    calls = []
    x = bl.tv(f, Identity((32, 32)), lam=0.05, n_iter=20, tol=0, clip=(0, 1),
              callback=lambda i, xi: calls.append(i))
    assert x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    assert calls == list(range(20))
    with pytest.raises(ReconError):
        bl.tv(torch.zeros(1, 8, 8, dtype=torch.complex64), MaskedFFT(torch.ones(8, 8)), nonneg=True)


def test_sparse_view_tv_beats_adjoint_and_least_squares():
    n = 40
    op = pixel_driven_projector(n, 10)  # 10 views: strongly underdetermined
    x_true = torch.tensor(phantom(n), dtype=torch.float32)[None]
    y = op.A(x_true)
    y = y + 0.01 * y.abs().max() * torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    x_adj = best_scaled(bl.zero_filled(y, op), x_true)  # back-projection, optimally scaled
    x_ls = bl.cgls(y, op, n_iter=30)
    x_tv = bl.tv(y, op, lam=2e-3, n_iter=500, clip=(0, 1))
    p_adj = psnr(x_adj, x_true, 1.0)
    p_ls = psnr(x_ls, x_true, 1.0)
    p_tv = psnr(x_tv, x_true, 1.0)
    assert p_tv > p_adj + 5
    assert p_tv > p_ls + 3


def test_tv_beats_fbp_on_real_ct():
    ct = pytest.importorskip("forward_models.ct")
    pytest.importorskip("recon.fbp")
    n = 64
    op = ct.ParallelBeamCT(n, torch.linspace(0, math.pi, 21)[:-1])
    x_true = torch.tensor(phantom(n), dtype=torch.float32).reshape(1, *op.in_shape)
    y = op.A(x_true)
    x_fbp = methods.run("fbp", y, op)
    x_tv = methods.run("tv", y, op, lam=1e-3, n_iter=300, clip=(0, 1))
    assert x_tv.shape == x_true.shape
    assert psnr(x_tv, x_true, 1.0) > psnr(x_fbp.clamp(0, 1), x_true, 1.0) + 3


# ---------------------------------------------------------------------------
# SIRT
# ---------------------------------------------------------------------------
def test_sirt_decreases_residual():
    n = 32
    op = pixel_driven_projector(n, 16)
    x_true = torch.tensor(phantom(n), dtype=torch.float32)[None].repeat(2, 1, 1)
    x_true[1] = x_true[1].flip(-1)
    y = op.A(x_true)
    res = []
    x = bl.sirt(y, op, n_iter=40, callback=lambda i, xi: res.append((op.A(xi) - y).norm().item()))
    assert x.shape == (2, n, n) and x.dtype == torch.float32 and x.min() >= 0
    assert res[-1] < 0.2 * y.norm().item()
    assert res[-1] < 0.5 * res[0]
    assert all(b <= a * 1.01 for a, b in zip(res, res[1:]))
    assert psnr(x, x_true, 1.0).min() > 18


def test_sirt_rejects_complex_and_negative_operators():
    with pytest.raises(ReconError):
        bl.sirt(torch.zeros(1, 8, 8, dtype=torch.complex64), MaskedFFT(torch.ones(8, 8)))
    M = torch.tensor([[1.0, -2.0], [0.5, 0.5]], dtype=torch.float64)
    op = DenseOp(M, (2,), (2,))
    with pytest.raises(ReconError, match="nonnegative"):
        bl.sirt(torch.ones(1, 2, dtype=torch.float64), op)


# ---------------------------------------------------------------------------
# CGLS
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("complex_", [False, True])
def test_cgls_recovers_well_conditioned(complex_):
    g = torch.Generator().manual_seed(3)
    m, shape = 60, (5, 6)
    dt = torch.complex128 if complex_ else torch.float64
    if complex_:
        M = torch.randn(m, 30, generator=g, dtype=torch.float64) + 1j * torch.randn(m, 30, generator=g, dtype=torch.float64)
    else:
        M = torch.randn(m, 30, generator=g, dtype=torch.float64)
    M = M + 4 * torch.eye(m, 30, dtype=M.dtype)
    op = DenseOp(M, shape, (m,))
    x = torch.randn(3, *shape, generator=g, dtype=torch.float64).to(dt)
    y = op.A(x)
    xr = bl.cgls(y, op, n_iter=100)
    assert xr.dtype == dt
    assert (xr - x).abs().max() < 1e-8
    # damped: matches the augmented least-squares solution (scipy lsqr convention)
    damp = 0.7
    aug = torch.cat([M, damp * torch.eye(30, dtype=M.dtype)])
    rhs = torch.cat([y.flatten(1).T, torch.zeros(30, 3, dtype=y.dtype)])
    ref = torch.linalg.lstsq(aug, rhs).solution.T.reshape(3, *shape)
    xd = bl.cgls(y, op, n_iter=100, damp=damp)
    assert (xd - ref).abs().max() < 1e-8


# ---------------------------------------------------------------------------
# MRI
# ---------------------------------------------------------------------------
def _cartesian_mask(n, accel, center, seed):
    """Variable-density random Cartesian rows (fully sampled centre), fft2 layout."""
    rng = np.random.default_rng(seed)
    rows = np.zeros(n, bool)
    rows[n // 2 - center // 2: n // 2 + center // 2] = True
    cand = np.flatnonzero(~rows)
    p = (1 - np.abs(cand - n // 2) / (n / 2)) ** 3
    rows[rng.choice(cand, n // accel - rows.sum(), replace=False, p=p / p.sum())] = True
    mask = np.zeros((n, n))
    mask[np.fft.ifftshift(rows)] = 1.0  # fft2 has DC at index 0
    return torch.tensor(mask, dtype=torch.float32)


def test_cs_wavelet_beats_zero_filled():
    n = 64
    op = MaskedFFT(_cartesian_mask(n, 3, 6, seed=0))
    x_true = torch.tensor(phantom(n), dtype=torch.complex64)[None]
    y = op.A(x_true)
    zf = bl.zero_filled(y, op)
    assert zf.is_complex()
    cs = bl.cs_wavelet(y, op, lam=1e-3, n_iter=150, wavelet="haar")
    assert cs.shape == zf.shape and cs.is_complex()
    p_zf = psnr(zf.abs(), x_true.abs(), 1.0)
    p_cs = psnr(cs.abs(), x_true.abs(), 1.0)
    assert p_cs > p_zf + 3
    # fully sampled single coil: sense_adjoint == zero_filled == x
    full = MaskedFFT(torch.ones(n, n))
    assert (bl.sense_adjoint(full.A(x_true), full) - x_true).abs().max() < 1e-5


def test_real_mri_operators():
    mri = pytest.importorskip("forward_models.mri")
    n = 64
    # centred k-space, Cartesian lines along the last axis (phase encodes = columns)
    mask = torch.fft.fftshift(_cartesian_mask(n, 3, 6, seed=0)).T.contiguous()
    op = mri.CartesianMRI(mask)
    x_true = torch.tensor(phantom(n), dtype=torch.complex64)[None]
    y = op.A(x_true)
    zf = methods.run("zero-filled", y, op)
    cs = methods.run("cs-wavelet", y, op, lam=1e-3, n_iter=150, wavelet="haar")
    assert psnr(cs.abs(), x_true.abs(), 1.0) > psnr(zf.abs(), x_true.abs(), 1.0) + 3
    assert bl.inpainting_mask(op) is None
    avail = methods.available(op)
    assert {"zero-filled", "sense-adjoint", "cs-wavelet", "tv", "cgls"} <= set(avail)
    assert not {"sirt", "fbp", "biharmonic"} & set(avail)
    # SENSE: the normalised adjoint of fully sampled data is the image
    g = torch.Generator().manual_seed(6)
    maps = torch.randn(4, 32, 32, generator=g, dtype=torch.complex64)
    sense = mri.SenseMRI(maps)
    x = torch.randn(2, 32, 32, generator=g, dtype=torch.complex64)
    assert (methods.run("sense-adjoint", sense.A(x), sense) - x).abs().max() < 1e-4
    assert methods.run("tv", sense.A(x), sense, n_iter=5).shape == (2, 32, 32)


def test_real_ct_operator_registry():
    ct = pytest.importorskip("forward_models.ct")
    op = ct.ParallelBeamCT(32, torch.linspace(0, math.pi, 9)[:-1])
    avail = methods.available(op)
    assert {"fbp", "sirt", "tv", "cgls"} <= set(avail)
    assert not {"biharmonic", "zero-filled", "cs-wavelet"} & set(avail)
    x_true = torch.tensor(phantom(32), dtype=torch.float32)[None]
    y = op.A(x_true)
    res = []
    methods.run("sirt", y, op, n_iter=20, callback=lambda i, xi: res.append((op.A(xi) - y).norm().item()))
    assert res[-1] < 0.5 * res[0]


def test_wavelet_is_orthonormal_and_matches_pywt():
    pywt = pytest.importorskip("pywt")
    x = torch.randn(2, 32, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for wavelet, level in (("db4", 1), ("haar", 3), ("db2", None)):
        c = bl.wavelet_forward(x, wavelet, level)
        assert abs(c.norm() - x.norm()) < 1e-10
        assert (bl.wavelet_inverse(c, wavelet, level) - x).abs().max() < 1e-10
        if level is not None:
            arr, _ = pywt.coeffs_to_array(pywt.wavedec2(x[1].numpy(), wavelet, mode="periodization", level=level))
            assert np.abs(arr - c[1].numpy()).max() < 1e-10
    with pytest.raises(ReconError):
        bl.wavelet_forward(torch.zeros(1, 9, 9), "haar", 1)


def test_sense_adjoint_normalises_by_coil_energy():
    class ToySense(LinearOperator):
        is_complex_input = True

        def __init__(self, maps):
            super().__init__(maps.shape[-2:], maps.shape)
            self.register_buffer("maps", maps)

        def _forward(self, x):
            return torch.fft.fft2(self.maps * x[:, None], norm="ortho")

        def _adjoint(self, y):
            return (self.maps.conj() * torch.fft.ifft2(y, norm="ortho")).sum(1)

    g = torch.Generator().manual_seed(5)
    maps = torch.randn(3, 16, 16, generator=g, dtype=torch.complex128)
    op = ToySense(maps)
    x = torch.randn(2, 16, 16, generator=g, dtype=torch.complex128)
    assert (bl.sense_adjoint(op.A(x), op) - x).abs().max() < 1e-10
    assert (methods.run("sense-adjoint", op.A(x), op) - x).abs().max() < 1e-10


# ---------------------------------------------------------------------------
# inpainting
# ---------------------------------------------------------------------------
def _smooth(n=32):
    c = np.linspace(0, 1, n)
    Y, X = np.meshgrid(c, c, indexing="ij")
    return 0.5 + 0.3 * np.sin(2 * X + 1) * np.cos(3 * Y)


def test_biharmonic_fills_box():
    n = 32
    img = torch.tensor(_smooth(n))[None]
    mask = torch.ones(n, n)
    mask[12:20, 10:18] = 0
    op = MaskOp(mask)
    y = op.A(img)
    x = bl.biharmonic(y, op)
    box = mask == 0
    assert x.dtype == y.dtype and x.shape == y.shape
    assert torch.equal(x[0][~box], y[0][~box])
    err = (x[0][box] - img[0][box]).abs().max().item()
    assert err < 0.02
    # TV inpainting (via the generic tv) also fills it, less smoothly
    xt = bl.tv_inpaint(y, op)
    assert (xt[0][box] - img[0][box]).abs().mean() < 0.01
    assert (methods.run("biharmonic", y, op) - x).abs().max() == 0


def test_biharmonic_uses_real_inpainting_operator():
    inp = pytest.importorskip("forward_models.inpaint")
    mask = torch.ones(24, 24)
    mask[8:14, 8:14] = 0
    op = inp.Inpainting(mask)
    img = torch.tensor(_smooth(24), dtype=torch.float32).reshape(1, *op.in_shape)
    x = methods.run("biharmonic", op.A(img), op)
    assert (x - img).abs().max() < 0.03


# ---------------------------------------------------------------------------
# registry and input validation
# ---------------------------------------------------------------------------
def test_registry_names_and_unknown_method():
    for name in ("fbp", "sirt", "tv", "zero-filled", "sense-adjoint", "cs-wavelet", "biharmonic", "cgls"):
        assert name in methods.METHODS
        assert methods.get_method(name) is methods.METHODS[name]
    with pytest.raises(ReconError, match=r"unknown method 'nope'; available: .*tv"):
        methods.get_method("nope")


def test_methods_on_unsupported_operator():
    ct_like = pixel_driven_projector(8, 3)
    y_ct = torch.zeros(1, *ct_like.out_shape, dtype=torch.float64)
    mri = MaskedFFT(torch.ones(8, 8))
    y_mri = torch.zeros(1, 8, 8, dtype=torch.complex64)
    mask_op = MaskOp(torch.ones(8, 8))
    y_mask = torch.zeros(1, 8, 8)
    with pytest.raises(ReconError, match="does not apply"):
        methods.run("biharmonic", y_ct, ct_like)
    with pytest.raises(ReconError):
        methods.run("sirt", y_mri, mri)
    with pytest.raises(ReconError):
        methods.run("fbp", y_mask, mask_op)
    with pytest.raises(ReconError):
        methods.run("zero-filled", y_ct, ct_like)
    with pytest.raises(ReconError):
        methods.run("cs-wavelet", y_mask, mask_op)
    with pytest.raises(ReconError):
        methods.run("biharmonic", y_mri, mri)  # Cartesian MRI has a mask but is not inpainting
    with pytest.raises(ReconError, match="accepted options"):
        methods.run("tv", y_mask, mask_op, not_an_option=1)
    assert "biharmonic" in methods.available(mask_op)
    assert "cs-wavelet" in methods.available(mri) and "sirt" not in methods.available(mri)
    # the generic ones run anywhere
    assert methods.run("tv", y_mri, mri, n_iter=3).shape == (1, 8, 8)
    assert methods.run("cgls", y_ct, ct_like, n_iter=3).shape == (1, 8, 8)


def test_register_custom_method():
    def toy(y, op, *, scale=1.0, callback=None):
        return scale * op.AH(y)

    methods.register("toy-test", toy, supports=methods.is_inpainting, applies_to="a mask operator")
    try:
        op = MaskOp(torch.ones(4, 4))
        out = methods.get_method("toy-test")(torch.ones(1, 4, 4), op, scale=2.0)
        assert torch.allclose(out, 2 * torch.ones(1, 4, 4))
        methods.register("toy-test", toy, supports=methods.is_inpainting)  # same fn: ok
        with pytest.raises(ReconError, match="already registered"):
            methods.register("toy-test", lambda y, op: y)
        with pytest.raises(ReconError, match="a mask operator"):
            methods.run("toy-test", torch.zeros(1, 8, 8, dtype=torch.complex64), MaskedFFT(torch.ones(8, 8)))
    finally:
        methods.METHODS.pop("toy-test", None)


@pytest.mark.parametrize("fn", [bl.sirt, bl.tv, bl.zero_filled, bl.cgls, bl.biharmonic])
def test_bad_measurements_raise_valueerror(fn):
    op = MaskOp(torch.ones(6, 6))
    bad = torch.zeros(1, 6, 6)
    bad[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fn(bad, op)
    with pytest.raises(ValueError, match=r"expected \(B, 6, 6\)"):
        fn(torch.zeros(1, 5, 6), op)
    with pytest.raises(ValueError):
        fn(torch.zeros(6, 6), op)  # missing batch dimension


def test_bad_measurements_mri_methods():
    op = MaskedFFT(torch.ones(8, 8))
    bad = torch.zeros(1, 8, 8, dtype=torch.complex64)
    bad[0, 0, 0] = complex(float("inf"), 0)
    for fn in (bl.cs_wavelet, bl.sense_adjoint, bl.zero_filled):
        with pytest.raises(ValueError):
            fn(bad, op)
        with pytest.raises(ValueError, match=r"expected \(B, 8, 8\)"):
            fn(torch.zeros(2, 8, 9, dtype=torch.complex64), op)
    with pytest.raises(ValueError):
        methods.run("cs-wavelet", bad, op)
