"""Measured CT sinograms with their real geometry (issue #11): ``--angles``, any detector
(``--det-spacing`` with ``--fov``), ``--views N`` subsets, ``--reference full``, raw counts
with ``--flat``/``--dark``, and FBP weights for uneven angles.

Small images (32-64 px) and few iterations; PSNR thresholds were measured on these
phantoms and are checked to fail with the wrong geometry.
"""
import json
import math

import numpy as np
import pytest
import torch

from forward_models import FanBeamCT, ParallelBeamCT, view_angles
from forward_models.physics import ct_line_integral_coefficients
from recon.acquisition import CTAcquisition, log_transform, read_angles, select_views
from recon.cli import main
from recon.errors import ReconError
from recon.fbp import fbp, view_weights
from recon.methods import run
from recon.tasks import TASKS

N = 64
WINDOW = (-1000.0, 1000.0)


def _phantom(n=N):
    """Two off-centre discs (a centred disc would project identically at every angle, so
    wrong angles would go unnoticed)."""
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    s = n / 64
    img = 0.6 * (((xx - 8 * s) ** 2 + (yy + 6 * s) ** 2) <= (16 * s) ** 2)
    img += 1.0 * (((xx + 16 * s) ** 2 + (yy - 14 * s) ** 2) <= (6 * s) ** 2)
    return img.astype(np.float32)


def _psnr(a, b):
    return float(10 * np.log10(1.0 / np.mean((np.asarray(a) - b) ** 2)))


def _random_degrees(n_views=40, seed=0, arc=180.0):
    return np.sort(np.random.default_rng(seed).uniform(0, arc, n_views))


def _sinogram(img, degrees, n_det, det_spacing, geometry="parallel", **kw):
    x = torch.from_numpy(img)[None]
    if geometry == "fan":
        op = FanBeamCT(img.shape[0], np.deg2rad(degrees), n_det=n_det, det_spacing=det_spacing, **kw)
    else:
        op = ParallelBeamCT(img.shape[0], np.deg2rad(degrees), n_det=n_det, det_spacing=det_spacing)
    return op.A(x)[0].numpy()


def _measure(tmp_path, sino, size=N, **acq):
    path = tmp_path / "sino.npy"
    np.save(path, sino)
    return TASKS["ct"].measured(CTAcquisition(sinogram=str(path), **acq), "cpu", size=size, window=WINDOW)


def _run(argv, capsys):
    rc = main([str(a) for a in argv] + ["--device", "cpu", "--quiet"])
    return rc, capsys.readouterr().err


# ---------------------------------------------------------------------------
# FBP with uneven angles
# ---------------------------------------------------------------------------
def test_view_weights_are_angular_intervals():
    eq = view_angles(40, 180).numpy()
    np.testing.assert_allclose(view_weights(eq, math.pi), math.pi / 40)
    rnd = np.deg2rad(_random_degrees())
    w = view_weights(rnd, math.pi)
    np.testing.assert_allclose(w.sum(), math.pi)  # a full scan's weights sum to the period
    gaps = np.diff(np.concatenate([rnd, [rnd[0] + math.pi]]))
    np.testing.assert_allclose(w, 0.5 * (gaps + np.roll(gaps, 1)))  # half the gaps to both neighbours
    # a limited-angle scan: the 60-degree missing wedge is not spread over the two end views
    lim = view_angles(40, 120).numpy()
    wl = view_weights(lim, math.pi)
    step = math.radians(3)
    np.testing.assert_allclose(wl[1:-1], step)
    assert wl[0] < 5 * step and wl[-1] < 5 * step


def test_fbp_uneven_angles_wide_detector(monkeypatch):
    img = _phantom()
    deg = _random_degrees()
    y = torch.from_numpy(_sinogram(img, deg, 96, 0.8))[None]
    op = ParallelBeamCT(N, np.deg2rad(deg), n_det=96, det_spacing=0.8)
    good = _psnr(fbp(y, op)[0], img)
    assert good > 20  # measured 22.4 dB (40 random views: streaks limit FBP)
    wrong = ParallelBeamCT(N, view_angles(40, 180), n_det=96, det_spacing=0.8)
    assert _psnr(fbp(y, wrong)[0], img) < 20  # equispaced angles assumed: 15.2 dB
    import recon.fbp as fbp_module

    monkeypatch.setattr(fbp_module, "WEDGE_FACTOR", 1.0)  # the old rule: every gap capped at the median
    assert _psnr(fbp(y, op)[0], img) < 20  # 15.1 dB: the image came out at about half its intensity


# ---------------------------------------------------------------------------
# geometry: uneven angles, detectors wider / narrower than the image
# ---------------------------------------------------------------------------
def test_tv_uneven_angles_wide_detector_and_wrong_geometry_fails(tmp_path):
    img = _phantom()
    deg = _random_degrees()
    sino = _sinogram(img, deg, 96, 0.8)  # detector 1.5x the image width, pitch 0.8 pixel
    np.save(tmp_path / "angles.npy", deg)
    tv = {"lam": 3e-4, "n_iter": 300, "clip": (0.0, None)}
    meas = _measure(tmp_path, sino, angles=str(tmp_path / "angles.npy"), det_spacing=0.4, fov=32.0)  # 0.5 mm px
    assert meas.op.det_spacing == pytest.approx(0.8) and meas.op.n_det == 96
    assert meas.info["detector"]["width_at_axis_pixels"] == pytest.approx(76.8)
    assert _psnr(run("tv", meas.y, meas.op, **tv)[0], img) > 28  # measured 32 dB at 300 iterations
    # the same data read with equispaced angles (no --angles): the threshold fails
    wrong = _measure(tmp_path, sino, det_spacing=0.4, fov=32.0)
    assert _psnr(run("tv", wrong.y, wrong.op, **tv)[0], img) < 20  # 15.6 dB
    # ... or with the default 1-pixel detector spacing (no --det-spacing): FBP shows it at once
    unit = _measure(tmp_path, sino, angles=str(tmp_path / "angles.npy"))
    assert _psnr(fbp(unit.y, unit.op)[0], img) < 18 < _psnr(fbp(meas.y, meas.op)[0], img)


def test_detector_narrower_than_the_image_works_and_warns(tmp_path, capsys):
    img = _phantom()
    deg = _random_degrees(seed=1)
    sino = _sinogram(img, deg, 64, 0.9)  # covers +-28.8 px: the phantom, not the image's corners
    np.savetxt(tmp_path / "angles.txt", deg)
    np.save(tmp_path / "sino.npy", sino)
    out = tmp_path / "o"
    rc, err = _run(["ct", "--sinogram", tmp_path / "sino.npy", "--angles", tmp_path / "angles.txt",
                    "--det-spacing", 0.9, "--fov", 64, "--size", N, "--method", "tv", "--param", "n_iter=300",
                    "--out", out], capsys)
    assert rc == 0, err
    assert "truncated projections" in err  # the warning names the risk
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["measurement"]["detector"]["n_det"] == 64
    assert any("truncated" in w for w in run_json["warnings"])
    from recon.io import read_input

    hu = read_input(out / "recon.nii.gz").data[0]  # measured CT is written in HU of the window
    assert _psnr((hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), img) > 28


def test_fan_beam_uneven_angles_with_detector_pitch(tmp_path):
    img = _phantom(48)
    deg = _random_degrees(60, seed=2, arc=360.0)
    R, D = 2.0 * 48, 4.0 * 48  # the default --source-distance 2 / --detector-distance 4 image widths
    sino = _sinogram(img, deg, 120, 1.5, geometry="fan", source_distance=R, detector_distance=D)
    np.save(tmp_path / "angles.npy", deg)
    acq = dict(geometry="fan", angles=str(tmp_path / "angles.npy"), det_spacing=1.5 * 0.5, fov=24.0)
    meas = _measure(tmp_path, sino, size=48, **acq)
    assert meas.op.det_spacing == pytest.approx(1.5)  # on the detector, in image pixels
    assert meas.info["detector"]["width_at_axis_pixels"] == pytest.approx(120 * 1.5 / 2)
    tv = {"lam": 3e-4, "n_iter": 300, "clip": (0.0, None)}
    assert _psnr(run("tv", meas.y, meas.op, **tv)[0], img) > 28
    wrong = _measure(tmp_path, sino, size=48, geometry="fan", det_spacing=0.75, fov=24.0)
    assert _psnr(run("tv", wrong.y, wrong.op, **tv)[0], img) < 20


# ---------------------------------------------------------------------------
# angle files
# ---------------------------------------------------------------------------
def test_angles_degrees_radians_text_and_npy_agree(tmp_path):
    deg = _random_degrees(12)
    np.savetxt(tmp_path / "deg.txt", deg)
    (tmp_path / "rad.txt").write_text("# radians, commas and spaces\n" +
                                      ", ".join(repr(float(v)) for v in np.deg2rad(deg[:6])) + "\n" +
                                      "  ".join(repr(float(v)) for v in np.deg2rad(deg[6:])) + "\n")
    np.save(tmp_path / "deg.npy", deg)
    np.save(tmp_path / "rad.npy", np.deg2rad(deg)[:, None])  # a column vector is fine
    ref = read_angles(tmp_path / "deg.txt", "deg", 12)
    for name, units in (("rad.txt", "rad"), ("deg.npy", "deg"), ("rad.npy", "rad")):
        np.testing.assert_allclose(read_angles(tmp_path / name, units, 12), ref, rtol=0, atol=1e-12)
    sino = _sinogram(_phantom(32), deg, 46, 1.0)
    y = [_measure(tmp_path, sino, size=32, angles=str(tmp_path / f), angle_units=u)
         for f, u in (("deg.txt", "deg"), ("rad.npy", "rad"))]
    np.testing.assert_allclose(y[0].op.geom.angles, y[1].op.geom.angles, atol=1e-12)
    np.testing.assert_allclose(fbp(y[0].y, y[0].op), fbp(y[1].y, y[1].op), atol=1e-5)


def test_radians_read_as_degrees_warn(tmp_path, capsys):
    deg = _random_degrees(20)
    np.savetxt(tmp_path / "rad.txt", np.deg2rad(deg))
    np.save(tmp_path / "sino.npy", _sinogram(_phantom(32), deg, 46, 1.0))
    rc, err = _run(["ct", "--sinogram", tmp_path / "sino.npy", "--angles", tmp_path / "rad.txt", "--size", 32,
                    "--method", "fbp", "--out", tmp_path / "o"], capsys)
    assert rc == 0 and "--angle-units rad" in err


@pytest.mark.parametrize("content, needle", [
    ("0 10 20", "3 view angles but the sinogram has 4 views"),
    ("0 10 nan 30", "NaN or infinite"),
    ("0 10 10 30", "views 1 and 2 (0-based) have the same angle (10 deg"),
    ("0 90 180 360", "views 0 and 3 (0-based) have the same angle"),
    ("0 10 x 30", "line 1: 'x' is not a number"),
    ("", "no view angles"),
])
def test_bad_angle_files_are_clear_errors(content, needle, tmp_path, capsys):
    (tmp_path / "a.txt").write_text(content)
    np.save(tmp_path / "sino.npy", np.ones((4, 20), np.float32))
    rc, err = _run(["ct", "--sinogram", tmp_path / "sino.npy", "--angles", tmp_path / "a.txt", "--size", 16,
                    "--method", "fbp", "--out", tmp_path / "o"], capsys)
    assert rc == 2 and needle in err, err
    assert not (tmp_path / "o").exists()


def test_bad_angle_npy_shape(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 3)))
    with pytest.raises(ReconError, match="1-D array"):
        read_angles(tmp_path / "a.npy", "deg", 6)


@pytest.mark.parametrize("extra, needle", [
    (["--views", 7], "--views 7 but the sinogram has only 6 measured views"),
    (["--det-spacing", 0.5], "--det-spacing MM needs --fov MM"),
    (["--angles", "A", "--limited-angle", 90], "not both"),
    (["--dark", "F"], "--dark needs --flat"),
    (["--flat", "F", "--sinogram-units", "attenuation"], "cannot be used with --sinogram-units attenuation"),
    (["--sinogram-units", "counts"], "needs --flat FILE"),
    (["--flat", "BADFLAT"], "--flat has shape (3,) but the sinogram is (6, 10)"),
    (["--flat", "F", "--dark", "BADDARK"], "--dark has shape (2, 10) but the sinogram is (6, 10)"),
    (["--reference", "half"], "--reference must be full or full:METHOD"),
    (["--reference", "full:score"], "--reference must be full or full:METHOD"),
    (["--noise", 0.01], "measured data (--sinogram) carry their own noise"),
])
def test_bad_measured_options_are_clear_errors(extra, needle, tmp_path, capsys):
    np.save(tmp_path / "sino.npy", np.full((6, 10), 50.0, np.float32))
    np.save(tmp_path / "F.npy", np.full(10, 100.0))
    np.save(tmp_path / "BADFLAT.npy", np.ones(3))
    np.save(tmp_path / "BADDARK.npy", np.ones((2, 10)))
    (tmp_path / "A.txt").write_text(" ".join(str(30 * i) for i in range(6)))
    names = {"A": tmp_path / "A.txt", "F": tmp_path / "F.npy", "BADFLAT": tmp_path / "BADFLAT.npy",
             "BADDARK": tmp_path / "BADDARK.npy"}
    extra = [names.get(e, e) if isinstance(e, str) else e for e in extra]
    rc, err = _run(["ct", "--sinogram", tmp_path / "sino.npy", "--size", 16, "--method", "fbp",
                    "--out", tmp_path / "o", *extra], capsys)
    assert rc == 2 and needle in err, err


def test_measured_options_need_a_sinogram(tmp_path, capsys):
    img = tmp_path / "img.npy"
    np.save(img, _phantom(16))
    rc, err = _run(["ct", img, "--views", 8, "--reference", "full", "--method", "fbp", "--out", tmp_path / "o"],
                   capsys)
    assert rc == 2 and "--reference describes a measured sinogram" in err
    with pytest.raises(ReconError, match="--angles, --flat describe a measured sinogram"):
        CTAcquisition(views=8, angles="a.txt", flat="f.npy")


# ---------------------------------------------------------------------------
# --views N: an evenly spread subset
# ---------------------------------------------------------------------------
def test_select_views_rule():
    eq = view_angles(60, 180).numpy()
    idx = select_views(eq, 12, math.pi)
    np.testing.assert_array_equal(idx, np.arange(0, 60, 5))  # every 5th view...
    np.testing.assert_allclose(eq[idx], view_angles(12, 180).numpy())  # ...= simulating --views 12
    np.testing.assert_array_equal(select_views(view_angles(37, 180).numpy(), 10, math.pi),
                                  np.floor(np.arange(10) * 3.7 + 0.5).astype(int))
    np.testing.assert_array_equal(select_views(eq, 60, math.pi), np.arange(60))
    shuffled = np.random.default_rng(0).permutation(60)  # file order need not be angle order
    idx = select_views(eq[shuffled], 12, math.pi)
    np.testing.assert_allclose(np.sort(eq[shuffled][idx]), view_angles(12, 180).numpy())
    # a 360-degree parallel scan: views 180 degrees apart are the same lines, so they are not both taken
    full = view_angles(72, 360).numpy()
    picked = np.mod(full[select_views(full, 18, math.pi)], math.pi)
    assert len(np.unique(np.round(picked, 9))) == 18


def test_views_subset_and_full_reference_via_cli(tmp_path, capsys):
    img = _phantom(32)
    deg = np.arange(60) * 3.0
    np.save(tmp_path / "sino.npy", _sinogram(img, deg, 46, 1.0))
    np.savetxt(tmp_path / "angles.txt", deg)
    out = tmp_path / "o"
    rc, err = _run(["ct", "--sinogram", tmp_path / "sino.npy", "--angles", tmp_path / "angles.txt", "--size", 32,
                    "--views", 12, "--reference", "full", "--method", "fbp", "--out", out], capsys)
    assert rc == 0, err
    info = json.loads((out / "run.json").read_text())["measurement"]
    assert info["selected_views"] == list(range(0, 60, 5)) and info["views"] == 12
    assert info["angles_deg"] == [15.0 * k for k in range(12)]
    assert info["reference_method"] == "fbp" and "all 60 measured views" in info["reference"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reference"] == info["reference"]
    assert 10 < metrics["psnr"] < 40
    assert np.load(out / "sinogram.npy").shape == (12, 46)  # the views used


def test_full_reference_auto_choice(tmp_path):
    img = _phantom(32)
    dense = np.arange(40) * 4.5
    sparse = _random_degrees(20, seed=3)
    for deg, method in ((dense, "fbp"), (sparse, "tv")):
        np.save(tmp_path / "a.npy", deg)
        meas = _measure(tmp_path, _sinogram(img, deg, 46, 1.0), size=32, angles=str(tmp_path / "a.npy"),
                        views=10, reference="full")
        assert meas.info["reference_method"] == method
        assert meas.reference.shape == (32, 32) and meas.reference.min() >= 0
        assert _psnr(meas.reference, img) > 22
    meas = _measure(tmp_path, _sinogram(img, dense, 46, 1.0), size=32, views=10, reference="full:sirt")
    assert meas.info["reference_method"] == "sirt" and "forced" in meas.info["reference"]
    assert not TASKS["ct"].measurement_warnings(CTAcquisition(sinogram="s.npy", views=10, reference="full"), meas)
    # without --views the reference comes from the same views as the result: said so
    meas = _measure(tmp_path, _sinogram(img, dense, 46, 1.0), size=32, reference="full:fbp")
    warnings = TASKS["ct"].measurement_warnings(CTAcquisition(sinogram="s.npy", reference="full:fbp"), meas)
    assert len(warnings) == 1 and "same views" in warnings[0]


# ---------------------------------------------------------------------------
# raw counts: --flat / --dark
# ---------------------------------------------------------------------------
def test_log_transform_formula_and_clamping():
    counts = np.array([[510.0, 260.0, 10.0, 5.0], [110.0, 4.0, 2.0, 1010.0]])
    flat = np.array([1010.0, 1010.0, 1010.0, 2010.0])
    dark = np.array([10.0, 10.0, 10.0, 10.0])
    p, stats = log_transform(counts, flat, dark)
    e = 1e-6 * 2000.0  # eps times the brightest flat pixel after dark subtraction
    expected = -np.log(np.maximum(counts - dark, e) / np.maximum(flat - dark, e))
    np.testing.assert_allclose(p, expected)
    np.testing.assert_allclose(p[0, :2], [math.log(2), -math.log(0.25)])
    np.testing.assert_allclose(p[1, 3], math.log(2))
    assert stats["clamped_counts"] == 4 and stats["nonpositive_counts"] == 4  # I - D = 0, -5, -6, -8
    assert p[0, 2] == pytest.approx(-math.log(e / 1000.0))  # I - D = 0: clamped, finite
    assert np.isfinite(p).all()
    # per-view flat fields
    p2, _ = log_transform(counts, np.stack([flat, flat]), dark)
    np.testing.assert_allclose(p2, p)
    with pytest.raises(ReconError, match="not swapped"):
        log_transform(counts, dark, flat)


def test_counts_with_flat_and_dark_reconstruct_like_line_integrals(tmp_path, capsys):
    img = _phantom(32)
    deg = np.arange(30) * 6.0
    fov = 64.0  # 2 mm pixels at 32 px
    a, b = ct_line_integral_coefficients(WINDOW, fov / 32)
    op = ParallelBeamCT(32, np.deg2rad(deg), n_det=46)
    p = (a * op.A(torch.from_numpy(img)[None]) + b * op.A(torch.ones(1, 32, 32)))[0].double().numpy()
    flat = np.linspace(9e4, 1.1e5, 46)  # uneven detector gain
    dark = np.full((30, 46), 100.0)
    counts = flat * np.exp(-p) + dark
    counts[3, 0] = 50.0  # below the dark level: clamped, counted
    for name, arr in (("sino", counts), ("flat", flat), ("dark", dark)):
        np.save(tmp_path / f"{name}.npy", arr.astype(np.float32))
    out = tmp_path / "o"
    rc, err = _run(["ct", "--sinogram", tmp_path / "sino.npy", "--flat", tmp_path / "flat.npy", "--dark",
                    tmp_path / "dark.npy", "--fov", fov, "--size", 32, "--method", "fbp", "--out", out], capsys)
    assert rc == 0, err
    info = json.loads((out / "run.json").read_text())["measurement"]
    assert info["sinogram_units"] == "counts" and info["prelog"]["clamped_counts"] == 1
    y = np.load(out / "sinogram.npy")
    clean = op.A(torch.from_numpy(img)[None])[0].numpy()
    ok = np.ones_like(clean, bool)
    ok[3, 0] = False
    np.testing.assert_allclose(y[ok], clean[ok], atol=2e-3 * clean.max())
