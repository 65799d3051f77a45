"""recon.metrics against scikit-image (the reference implementation)."""
import numpy as np
import pytest
import torch
from skimage.metrics import normalized_root_mse, peak_signal_noise_ratio, structural_similarity

from recon.metrics import nmse, psnr, ssim


def _pair(shape=(32, 32), seed=0):
    rng = np.random.default_rng(seed)
    ref = rng.random(shape)
    x = np.clip(ref + 0.05 * rng.standard_normal(shape), 0, 1)
    return x, ref


def test_single_image_matches_skimage():
    x, ref = _pair()
    assert psnr(x, ref, 1.0) == pytest.approx(peak_signal_noise_ratio(ref, x, data_range=1.0), rel=1e-12)
    assert ssim(x, ref, 1.0) == pytest.approx(structural_similarity(ref, x, data_range=1.0), rel=1e-12)
    assert nmse(x, ref) == pytest.approx(normalized_root_mse(ref, x, normalization="euclidean") ** 2, rel=1e-12)
    assert nmse(x, ref) == pytest.approx(np.sum((x - ref) ** 2) / np.sum(ref ** 2), rel=1e-12)
    assert isinstance(psnr(x, ref, 1.0), float)
    # data_range is used as given (not inferred)
    assert psnr(x, ref, 2.0) == pytest.approx(peak_signal_noise_ratio(ref, x, data_range=2.0))
    assert ssim(x, ref, 2.0) == pytest.approx(structural_similarity(ref, x, data_range=2.0))
    # pass-through options
    assert ssim(x, ref, 1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False) == pytest.approx(
        structural_similarity(ref, x, data_range=1.0, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False))


def test_batched_torch_and_numpy():
    x, ref = _pair((3, 2, 24, 24), seed=1)
    xt, rt = torch.tensor(x, dtype=torch.float32), torch.tensor(ref, dtype=torch.float32)
    for fn, kw in ((psnr, {"data_range": 1.0}), (ssim, {"data_range": 1.0}), (nmse, {})):
        vals = fn(x, ref, **kw)
        assert isinstance(vals, np.ndarray) and vals.shape == (3, 2)
        for i in range(3):
            for j in range(2):
                assert vals[i, j] == pytest.approx(fn(x[i, j], ref[i, j], **kw), rel=1e-12)
        tv = fn(xt, rt, **kw)  # float32 torch: same up to float32 rounding of the inputs
        np.testing.assert_allclose(tv, fn(xt.double().numpy(), rt.double().numpy(), **kw), rtol=1e-12)
        np.testing.assert_allclose(tv, vals, rtol=1e-4)


def test_identical_images():
    _, ref = _pair()
    assert psnr(ref, ref, 1.0) == np.inf
    assert ssim(ref, ref, 1.0) == pytest.approx(1.0)
    assert nmse(ref, ref) == 0.0


def test_bad_inputs():
    x, ref = _pair()
    with pytest.raises(ValueError, match=r"\(32, 32\).*\(32, 31\)"):
        psnr(x, ref[:, :31], 1.0)
    with pytest.raises(ValueError, match=r"shape"):
        nmse(x[None], ref)
    bad = x.copy()
    bad[3, 4] = np.nan
    for fn in (lambda a, b: psnr(a, b, 1.0), lambda a, b: ssim(a, b, 1.0), nmse):
        with pytest.raises(ValueError, match="NaN"):
            fn(bad, ref)
        with pytest.raises(ValueError, match="NaN"):
            fn(x, np.where(bad > 2, 0, bad))  # NaN in ref (comparison keeps NaN)
    with pytest.raises(ValueError, match="inf|NaN"):
        psnr(torch.tensor(x).fill_(float("inf")), torch.tensor(ref), 1.0)
    with pytest.raises(TypeError):
        psnr(x, ref)  # data_range is required
    with pytest.raises(TypeError):
        ssim(x, ref)
    for dr in (0, -1, float("nan"), None, "a"):
        with pytest.raises(ValueError, match="data_range"):
            psnr(x, ref, dr)
    with pytest.raises(ValueError, match="complex"):
        psnr(torch.tensor(x) * 1j, torch.tensor(ref), 1.0)
    with pytest.raises(ValueError, match="all zeros"):
        nmse(x, np.zeros_like(ref))
    with pytest.raises(ValueError):
        psnr(x[0], ref[0], 1.0)  # 1-D
