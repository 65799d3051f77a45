"""Out-of-distribution check (recon.ood) with an analytic Gaussian prior and a tiny U-Net."""
import json

import numpy as np
import pytest
import torch

from recon import ood
from recon.errors import ReconError
from recon.prior import GaussianPrior

S = 8
SIGMAS = (0.02, 0.08, 0.3, 1.0)


def gaussian_prior():
    """N(0.5, C) over 8x8 images, C a smooth (squared-exponential) covariance: its exact denoiser."""
    yy, xx = np.meshgrid(np.arange(S), np.arange(S), indexing="ij")
    p = np.stack([yy.ravel(), xx.ravel()], 1).astype(np.float64)
    d2 = ((p[:, None] - p[None]) ** 2).sum(-1)
    cov = 0.02 * np.exp(-d2 / (2 * 2.0**2)) + 1e-4 * np.eye(S * S)
    prior = GaussianPrior(torch.full((S * S,), 0.5), torch.from_numpy(cov), (S, S))
    prior.meta.update({"name": "gauss", "modality": "mri"})
    return prior


def samples(prior, n, seed):
    g = torch.Generator().manual_seed(seed)
    L = torch.linalg.cholesky(prior.cov)
    z = torch.randn(n, S * S, generator=g, dtype=torch.float64)
    return (prior.mean + z @ L.T).reshape(n, S, S).float()


@pytest.fixture(scope="module")
def fitted():
    prior = gaussian_prior()
    ref = ood.fit_reference(prior, samples(prior, 60, 1), samples(prior, 60, 2), sigmas=SIGMAS, quantile=0.95,
                            data="gaussian samples")
    return prior, ref


def test_in_distribution_below_threshold_and_different_inputs_above(fitted):
    prior, ref = fitted
    d_in, f_in = ood.ood_score(prior, samples(prior, 40, 3), ref)
    assert f_in.shape == (40, 2 * len(SIGMAS)) and np.isfinite(f_in).all()
    assert np.mean(d_in > ref["threshold"]) <= 0.15
    g = torch.Generator().manual_seed(4)
    out = torch.cat([
        torch.rand(4, S, S, generator=g),                                # white noise
        torch.full((2, S, S), 0.5), torch.zeros(1, S, S),                 # flat images
        ((torch.arange(S)[:, None] + torch.arange(S)[None]) % 2).float()[None].repeat(2, 1, 1),  # checkerboard
        samples(prior, 3, 5) * 4 - 1.5,                                   # right structure, wrong contrast
    ])
    d_out, _ = ood.ood_score(prior, out, ref)
    assert (d_out > ref["threshold"]).all(), (d_out, ref["threshold"])
    assert ood.auroc(d_in, d_out) >= 0.98


def test_reference_json_round_trip_and_check(fitted):
    prior, ref = fitted
    ref2 = json.loads(json.dumps(ref))
    assert ref2["sigmas"] == list(SIGMAS) and ref2["n_fit"] == 60 and ref2["n_threshold"] == 60
    assert ref2["threshold"] == pytest.approx(np.quantile(
        ood.mahalanobis(ood.compute_features(prior, samples(prior, 60, 2), SIGMAS), ref["mean"], ref["precision"]),
        0.95))
    prior.meta["ood"] = ref2
    try:
        x = samples(prior, 1, 6)[0]
        res = ood.check(prior, x)
        assert set(res) == {"distance", "threshold", "in_distribution", "reference"}
        assert res["distance"] == pytest.approx(float(ood.ood_score(prior, x[None], ref)[0][0]))
        assert res["in_distribution"] is (res["distance"] <= res["threshold"])
        assert "median" in res["reference"] and "95th pct" in res["reference"]
        assert ood.check(prior, torch.rand(S, S))["in_distribution"] is False
        json.dumps(res)
    finally:
        prior.meta.pop("ood")


def test_missing_or_stale_reference_is_a_clear_error(fitted):
    prior, ref = fitted
    with pytest.raises(ReconError, match="recon ood fit"):
        ood.check(prior, samples(prior, 1, 7)[0])
    other = gaussian_prior()
    other.mean += 0.01
    other.meta["ood"] = ref
    with pytest.raises(ReconError, match="other weights.*recon ood fit"):
        ood.check(other, samples(prior, 1, 7)[0])
    with pytest.raises(ReconError, match="expects 8x8|prior expects"):
        ood.ood_score(prior, torch.rand(1, 16, 16), ref)


def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=30).round(1), (rng.normal(size=20) + 0.5).round(1)  # with ties
    pairs = (b[None] > a[:, None]).mean() + 0.5 * (b[None] == a[:, None]).mean()
    assert ood.auroc(a, b) == pytest.approx(pairs)
    assert ood.auroc([0, 1], [2, 3]) == 1.0 and ood.auroc([2, 3], [0, 1]) == 0.0


def test_ledoit_wolf_shrinks_towards_scaled_identity():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(10, 6)) * np.arange(1, 7)
    cov, a = ood.ledoit_wolf(X)
    assert 0 <= a <= 1
    assert np.allclose(cov, cov.T) and np.linalg.eigvalsh(cov).min() > 0
    S_ = np.cov(X.T, bias=True)
    assert np.allclose(cov, a * np.trace(S_) / 6 * np.eye(6) + (1 - a) * S_)


def test_cli_fit_then_check(tmp_path, capsys):
    """`recon ood fit` on a folder of PNGs, then `recon ood check` with the reference merged."""
    from skimage.io import imsave

    from recon.cli import main
    from recon.prior import load_prior
    from tests.test_cli import _tiny_prior_file

    path = _tiny_prior_file(tmp_path, size=16, modality="mri")
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:20, :20]
    for i in range(12):  # smooth blobs: one "patient" per file
        img = np.exp(-((yy - rng.uniform(6, 14)) ** 2 + (xx - rng.uniform(6, 14)) ** 2) / rng.uniform(10, 30))
        imsave(data / f"b{i:02d}.png", (img / img.max() * 255).astype(np.uint8), check_contrast=False)
    ref_path = tmp_path / "ref.json"
    assert main(["ood", "fit", "--prior", str(path), "--data", str(data), "--out", str(ref_path),
                 "--sigmas", "0.05,0.5", "--quiet"]) == 0
    ref = json.loads(ref_path.read_text())
    assert ref["n_fit"] + ref["n_threshold"] == 12 and ref["sigmas"] == [0.05, 0.5]
    # without the reference in the metadata: one clear error line naming the fix
    rc = main(["ood", "check", "--prior", str(path), str(data / "b00.png"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "recon ood fit" in err
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["ood"] = ref
    meta_path.write_text(json.dumps(meta))
    noise = tmp_path / "noise.png"
    imsave(noise, (rng.random((20, 20)) * 255).astype(np.uint8), check_contrast=False)
    out = tmp_path / "check.json"
    assert main(["ood", "check", "--prior", str(path), str(data / "b00.png"), str(noise),
                 "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "b00.png" in printed and "noise.png" in printed
    res = json.loads(out.read_text())
    assert [r["input"] for r in res] == [str(data / "b00.png"), str(noise)]
    x = ood.prepare_file(noise, load_prior(path))
    assert res[1]["distance"] == pytest.approx(ood.check(load_prior(path), x)["distance"], rel=1e-5)


def test_prior_validation_split_is_reproduced(tmp_path):
    """--held-out-only: the files `recon train` held out, reproduced from the metadata; refused when data changed."""
    from skimage.io import imsave

    from recon.train import load_image_folder, split_by_patient

    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(30):
        img = np.full((20, 20), 255, np.uint8)
        img[:10] = 8 * i  # a distinct normalised mean per file
        imsave(d / f"i{i:02d}.png", img, check_contrast=False)
    images, patients = load_image_folder([str(d)], "mri", 16)
    tr, va = split_by_patient(patients, seed=0)
    prior = gaussian_prior()
    prior.meta["training"] = {"data": [str(d)], "seed": 0, "train_images": len(tr), "val_images": len(va)}
    train_files, val_files = ood.prior_validation_files(prior)
    means = sorted(float(images[i].mean()) for i in va)
    assert sorted(float(np.mean(imread_01(f))) for f in val_files) == pytest.approx(means, abs=1e-6)
    assert len(train_files) == len(tr) and not set(train_files) & set(val_files)
    imsave(d / "new.png", np.zeros((20, 20), np.uint8), check_contrast=False)
    with pytest.raises(ReconError, match="cannot reproduce"):
        ood.prior_validation_files(prior)


def imread_01(path):
    from recon.preprocess import normalise, square_resize
    from skimage.io import imread

    return normalise(square_resize(np.asarray(imread(str(path)), np.float32), 16), "mri")


@pytest.mark.parametrize("sub", ["fit", "check", "bench"])
def test_ood_cli_help_and_bad_sigmas(sub, capsys, tmp_path):
    from recon.cli import main

    with pytest.raises(SystemExit) as e:
        main(["ood", sub, "--help"])
    assert e.value.code == 0 and "usage: recon ood" in capsys.readouterr().out
    if sub == "fit":
        rc = main(["ood", "fit", "--prior", "ct", "--data", str(tmp_path), "--out", str(tmp_path / "r.json"),
                   "--sigmas", "0.1,x"])
        assert rc == 2 and "--sigmas" in capsys.readouterr().err


def test_every_score_reconstruction_gets_a_verdict(fitted):
    """report_for_run (used by recon ct|mri|inpaint and compare) never raises: a verdict with the
    reference's numbers, or 'not available' with the fix."""
    prior, ref = fitted
    prior.meta["ood"] = ref
    try:
        inside = ood.report_for_run(prior, samples(prior, 1, 7)[0].numpy(), "input image")
        noise = ood.report_for_run(prior, np.random.default_rng(0).random((S, S)), "input image")
    finally:
        prior.meta.pop("ood")
    assert inside["available"] and inside["in_distribution"] and inside["threshold"] == ref["threshold"]
    assert noise["available"] and not noise["in_distribution"] and noise["distance"] > inside["distance"]
    missing = ood.report_for_run(prior, samples(prior, 1, 7)[0].numpy(), "input image")
    assert missing["available"] is False and "recon ood fit" in missing["why"]
