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


# ---------------------------------------------------------------------------
# CT in clinical terms: HU, clinical windows, the patient only
# ---------------------------------------------------------------------------
def _chest_phantom(n=128):
    """Air (-1000 HU) around an elliptic body (40 HU) with two lungs (-850 HU) inside, and a
    patient table (200 HU) below the body, separated from it by an air gap."""
    yy, xx = np.mgrid[:n, :n].astype(float)
    img = np.full((n, n), -1000.0)
    body = ((yy - 52) / 38) ** 2 + ((xx - 64) / 54) ** 2 <= 1
    img[body] = 40.0
    for cx in (40, 88):
        img[((yy - 52) / 22) ** 2 + ((xx - cx) / 16) ** 2 <= 1] = -850.0
    table = np.zeros((n, n), bool)
    table[100:108, 10:118] = True
    img[table] = 200.0
    return img, body, table


def test_body_mask_is_the_patient_with_its_lungs_and_without_the_table():
    from recon.metrics import body_mask

    img, body, table = _chest_phantom()
    m = body_mask(img)
    assert m.dtype == bool and m.shape == img.shape
    assert not (m & table).any()  # the table is not the patient
    assert (m & body).sum() / body.sum() > 0.99 and (m & ~body).sum() / body.sum() < 0.01  # lungs filled in
    vol = np.stack([img, img])
    assert np.array_equal(body_mask(vol), np.stack([m, m]))  # (z, y, x): slice by slice
    with pytest.raises(Exception, match="2-D slice"):
        body_mask(img[0])


def test_hu_metrics_windows_and_body_only():
    from recon.metrics import hu_metrics

    img, body, table = _chest_phantom()
    rec = img.copy()
    rec[body] += 20.0  # 20 HU inside the patient
    m = hu_metrics(rec, img)
    assert m["rmse_hu"] == pytest.approx(20.0 * np.sqrt(body.mean()))
    assert m["rmse_hu_body"] == pytest.approx(20.0, rel=0.02)  # nearly all of the mask is the body
    assert m["psnr_body"] == pytest.approx(10 * np.log10(1 / (20 / 2000) ** 2), abs=0.1)  # [-1000, 1000] HU window
    # the soft-tissue window [-160, 240]: 20 HU of 400 on the body's soft tissue, clipped lungs unchanged
    soft = body & (img > -160)
    assert m["psnr_soft_tissue"] == pytest.approx(10 * np.log10(1 / ((20 / 400) ** 2 * soft.mean())), abs=1e-6)
    # an error on the table alone moves the whole-image figures, not the patient's
    rec2 = img.copy()
    rec2[table] += 300.0
    m2 = hu_metrics(rec2, img)
    assert m2["rmse_hu"] > 0 and m2["rmse_hu_body"] == 0 and m2["psnr_body"] == float("inf")
    assert m2["ssim_body"] == pytest.approx(1.0)
    # no patient in the image (air only): no body figures, the others stay
    air = np.full((64, 64), -1000.0)
    m3 = hu_metrics(air + 1.0, air)
    assert "psnr_body" not in m3 and m3["rmse_hu"] == pytest.approx(1.0)


def test_every_hu_metric_has_a_metrics_csv_column():
    """metrics.csv lists its extra columns by name, in a fixed order: a new key of hu_metrics
    must be added there too, or it would silently stay out of the table."""
    from recon.metrics import hu_metrics
    from recon.outputs import EXTRA_METRIC_COLUMNS

    img, body, _ = _chest_phantom()
    m = hu_metrics(img + 5.0, img)
    assert set(m) <= set(EXTRA_METRIC_COLUMNS)
    assert set(m) >= {"rmse_hu", "rmse_hu_body", "psnr_body", "ssim_body"}
