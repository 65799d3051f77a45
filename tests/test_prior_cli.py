"""`recon sample` and `recon likelihood` end to end with a tiny prior."""
import json

import numpy as np
import pytest

from recon.cli import main
from tests.test_cli import _tiny_prior_file


def test_sample_writes_grid_with_real_row(tmp_path):
    prior = _tiny_prior_file(tmp_path, size=16, modality="mri")
    real = tmp_path / "real"
    real.mkdir()
    from skimage.io import imsave

    for i in range(3):
        imsave(real / f"r{i}.png", (np.random.default_rng(i).random((20, 20)) * 255).astype(np.uint8),
               check_contrast=False)
    out = tmp_path / "s"
    assert main(["sample", "--prior", str(prior), "--n", "3", "--sampler", "ode", "--steps", "3",
                 "--real", str(real), "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    arr = np.load(out / "samples.npy")
    assert arr.shape == (3, 16, 16) and np.isfinite(arr).all()
    assert (out / "samples.png").stat().st_size > 0
    mem = json.loads((out / "memorisation.json").read_text())
    assert mem["samples"] == 3 and mem["real_images"] == 3 and len(mem["sample_nearest"]) == 3
    assert mem["real_images_cap"] == 2000
    assert 0 <= mem["sample_nearest_min"] <= mem["sample_nearest_max"] and mem["real_nearest_median"] > 0
    # same seed, same samples
    out2 = tmp_path / "s2"
    main(["sample", "--prior", str(prior), "--n", "3", "--sampler", "ode", "--steps", "3", "--out", str(out2),
          "--quiet", "--device", "cpu"])
    assert np.array_equal(np.load(out2 / "samples.npy"), arr)


def test_sample_at_a_chosen_matrix_uses_the_multiscale_denoiser_and_shows_real_images_of_it(tmp_path, capsys):
    prior = _tiny_prior_file(tmp_path, size=16, modality="mri")
    real = tmp_path / "real"
    real.mkdir()
    from skimage.io import imsave

    for i, shape in enumerate([(40, 28), (40, 28), (30, 30)]):
        imsave(real / f"r{i}.png", (np.random.default_rng(i).random(shape) * 255).astype(np.uint8),
               check_contrast=False)
    out = tmp_path / "s"
    assert main(["sample", "--prior", str(prior), "--n", "2", "--sampler", "ode", "--steps", "3", "--size", "40,28",
                 "--real", str(real), "--out", str(out), "--device", "cpu"]) == 0
    arr = np.load(out / "samples.npy")
    assert arr.shape == (2, 40, 28) and np.isfinite(arr).all()
    assert "sampling 40x28" in capsys.readouterr().err
    assert main(["sample", "--prior", str(prior), "--n", "1", "--sampler", "ode", "--steps", "2", "--size", "33",
                 "--real", str(real), "--out", str(tmp_path / "s3"), "--device", "cpu"]) == 2
    assert "33" in capsys.readouterr().err  # no real image of that size: one clear error
    assert main(["sample", "--prior", str(prior), "--size", "4,x", "--out", str(tmp_path / "s4")]) == 2
    assert "--size must be H or H,W" in capsys.readouterr().err


def test_memorisation_check_finds_a_copied_training_image():
    from recon.cli import memorisation_check

    rng = np.random.default_rng(0)
    real = rng.random((6, 8, 8))
    samples = np.stack([real[4] + 0.001, rng.random((8, 8))])
    m = memorisation_check(samples, real)
    assert m["sample_nearest_index"][0] == 4 and m["sample_nearest"][0] < 0.002
    assert m["sample_nearest"][1] > 0.2 and 0.2 < m["real_nearest_median"] < 0.6  # uniform noise: ~0.41


def test_likelihood_reports_bits_per_dim(tmp_path, monkeypatch):
    """`recon likelihood` with an analytic Gaussian prior reproduces the closed-form density.

    The covariance is diagonal, so the Hutchinson divergence estimate is exact and what is
    left is the ODE discretisation and the N(0, sigma_max^2) end-point approximation (both
    well under the tolerance); bits/dim use the documented convention bpd = -log p / (D ln 2) + 8.
    """
    import math

    import torch

    import recon.likelihood
    import recon.prior
    from recon.prior import GaussianPrior

    size = 16
    d = size * size
    g = torch.Generator().manual_seed(0)
    var = 0.002 + 0.02 * torch.rand(d, generator=g, dtype=torch.float64)
    mean = 0.4 + 0.2 * torch.rand(d, generator=g, dtype=torch.float64)

    class _Gauss(GaussianPrior):
        image_size = size
        window = (0.0, 1.0)  # CT convention with this window leaves values in [0, 1] unchanged

    gp = _Gauss(mean, torch.diag(var), (size, size))
    gp.meta["modality"] = "ct"
    monkeypatch.setattr(recon.prior, "load_prior", lambda *a, **k: gp)
    seen = []
    orig = recon.likelihood.log_likelihood
    monkeypatch.setattr(recon.likelihood, "log_likelihood", lambda prior, x, **k: seen.append(x) or orig(prior, x, **k))

    prior = _tiny_prior_file(tmp_path, size=size, modality="ct")  # a real path; loading it yields gp
    img = tmp_path / "img.npy"  # a draw from the prior
    draw = (mean + var.sqrt() * torch.randn(d, generator=g, dtype=torch.float64)).reshape(size, size).numpy()
    assert 0 < draw.min() and draw.max() < 1
    np.save(img, draw)
    out = tmp_path / "ll.json"
    assert main(["likelihood", str(img), "--prior", str(prior), "--steps", "256", "--out", str(out),
                 "--quiet", "--device", "cpu"]) == 0
    res = json.loads(out.read_text())
    assert len(seen) == 1 and np.allclose(seen[0].numpy()[0], draw, atol=1e-6)
    # the ODE starts at sigma_min = 0.002: compare with the density of the data convolved with it
    x = seen[0].double().reshape(-1)
    v = var + 0.002**2
    exact = float(-0.5 * (d * math.log(2 * math.pi) + torch.log(v).sum() + ((x - mean) ** 2 / v).sum()))
    assert res["log_likelihood_nats"] == pytest.approx(exact, abs=0.002 * d * math.log(2))
    assert res["bits_per_dim"] == pytest.approx(-res["log_likelihood_nats"] / (d * math.log(2)) + 8.0, abs=1e-9)
    assert res["bits_per_dim"] == pytest.approx(-exact / (d * math.log(2)) + 8.0, abs=0.002)


def test_missing_prior_is_one_line_error(tmp_path, capsys):
    assert main(["sample", "--prior", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "o"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prior weights not found" in err[0]
