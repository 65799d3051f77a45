"""Figures: file permissions like every other output; error-map scale of the comparison panel."""
import os
import stat

import numpy as np
import pytest

from recon.figures import error_scale, save_comparison, save_grid


def test_figure_mode_matches_other_outputs(tmp_path):
    from recon.io import write_npy

    umask = os.umask(0)
    os.umask(umask)
    fig, arr = tmp_path / "grid.png", tmp_path / "arr.npy"
    save_grid([np.zeros((8, 8)), np.ones((8, 8))], fig)
    write_npy(np.zeros((8, 8), np.float32), arr)
    mode = stat.S_IMODE(fig.stat().st_mode)
    assert mode == stat.S_IMODE(arr.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_error_scale_follows_best_method(tmp_path):
    rng = np.random.default_rng(0)
    truth = rng.random((64, 64))
    yy, xx = np.mgrid[:64, :64]
    recons = {"fbp": truth + 0.5 * np.sin(xx / 2.0) + 0.2 * rng.standard_normal(truth.shape),  # streaky, bad
              "score": truth + 0.01 * rng.standard_normal(truth.shape)}  # good
    good_p99 = np.percentile(np.abs(recons["score"] - truth), 99)
    scale, ref = error_scale(truth, recons)
    assert ref == "score" and scale == pytest.approx(2 * good_p99)
    assert scale < 0.1 < np.abs(recons["fbp"] - truth).max() / 2  # the old rule would have used the bad one
    metrics = {k: {"psnr": 0.0, "ssim": 0.0} for k in recons}
    path = tmp_path / "cmp.png"
    assert save_comparison(truth, recons, metrics, path) == pytest.approx(scale)
    assert path.stat().st_size > 0
    # an explicit scale still wins; order of methods does not matter
    assert save_comparison(truth, recons, metrics, tmp_path / "c2.png", err_max=0.3) == 0.3
    assert error_scale(truth, dict(reversed(list(recons.items())))) == (scale, "score")
    # a perfect method does not collapse the scale to zero; non-finite methods are ignored
    s, ref = error_scale(truth, {"exact": truth.copy(), "nan": truth * np.nan})
    assert ref == "exact" and s == pytest.approx(0.01)


def test_ct_figures_show_each_case_in_its_clinical_window():
    from types import SimpleNamespace

    from recon.compare import figure_window

    def truth(part, units="HU"):
        ds = {"BodyPartExamined": part}
        src = SimpleNamespace(reference=SimpleNamespace(datasets=[ds]))
        return SimpleNamespace(units=units, window=(-1000.0, 1000.0), source=src)

    lo, hi, name = figure_window(truth("HEAD"))
    assert (lo, hi) == (0.5, 0.54) and name.startswith("brain")      # [0, 80] HU
    assert figure_window(truth("CHEST"))[2].startswith("lung")
    assert figure_window(truth(""))[2].startswith("soft_tissue")       # unknown body part
    assert figure_window(truth("HEAD", units="intensity")) == (0.0, 1.0, "")  # MRI, inpainting: [0, 1]
