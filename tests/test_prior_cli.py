"""`recon sample` and `recon likelihood` end to end with a tiny prior."""
import json

import numpy as np

from recon.cli import main
from tests.test_cli import _phantom, _tiny_prior_file


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
    # same seed, same samples
    out2 = tmp_path / "s2"
    main(["sample", "--prior", str(prior), "--n", "3", "--sampler", "ode", "--steps", "3", "--out", str(out2),
          "--quiet", "--device", "cpu"])
    assert np.array_equal(np.load(out2 / "samples.npy"), arr)


def test_likelihood_reports_bits_per_dim(tmp_path, capsys):
    prior = _tiny_prior_file(tmp_path, size=16, modality="mri")
    img = tmp_path / "img.npy"
    np.save(img, _phantom(16))
    out = tmp_path / "ll.json"
    assert main(["likelihood", str(img), "--prior", str(prior), "--steps", "4", "--out", str(out),
                 "--quiet", "--device", "cpu"]) == 0
    res = json.loads(out.read_text())
    assert np.isfinite(res["bits_per_dim"]) and np.isfinite(res["log_likelihood_nats"])


def test_missing_prior_is_one_line_error(tmp_path, capsys):
    assert main(["sample", "--prior", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "o"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prior weights not found" in err[0]
