"""Bad inputs: each gives one clear error (exit 2, nothing left behind) or a correct result.

One test (or a parametrised group) per row of the bad-input table: images passed as
k-space, references of another size, out-of-range and mistyped method options, working
sizes, accelerations that cannot be reached, sample/likelihood counts, empty method
names, stale outputs of an earlier run, fan-beam distances, DICOM of the other modality,
pickled priors, and every numeric option checked at parse time.  Tiny synthetic data
only (32x32 phantoms, 8 views, a 16x16 prior).
"""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from pydicom.data import get_testdata_file

from recon.cli import main
from recon.errors import ReconError
from tests.test_cli import _error_lines, _phantom, _run, _tiny_prior_file

CT_SMALL = get_testdata_file("CT_small.dcm")
MR_SMALL = get_testdata_file("MR_small.dcm")


@pytest.fixture
def phantom(tmp_path):
    p = tmp_path / "phantom.npy"
    np.save(p, _phantom())
    return p


def _one_error(rc, err, cmd, *needles):
    lines = _error_lines(err)
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"recon {cmd}: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert "Traceback" not in err


def _parse_error(argv, capsys):
    """Refused at parse time: exit status 2, one line naming the option, nothing run."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert rc == 2 and len(lines) == 1 and "usage" not in err, err
    return lines[0]


def _complex_image(n=32):
    """A complex image: the phantom with a smooth phase (as a real MR image has)."""
    yy, xx = np.mgrid[:n, :n] / n
    return (_phantom(n) * np.exp(1j * (0.8 * xx + 0.5 * yy))).astype(np.complex64)


# ---------------------------------------------------------------------------
# a complex IMAGE given as --kspace
# ---------------------------------------------------------------------------
def test_complex_image_as_kspace_is_refused_with_from_image_hint(tmp_path, capsys):
    from recon.io import image_to_kspace

    img = tmp_path / "img.npy"
    np.save(img, _complex_image())
    mri = ["--mask", "equispaced", "--accel", 2, "--method", "zero-filled"]
    rc, err = _run(["mri", "--kspace", img, *mri, "--out", tmp_path / "a"], capsys)
    _one_error(rc, err, "mri", "img.npy", "complex image", "--from-image")
    assert not (tmp_path / "a").exists()
    # the same file with --from-image, and its true k-space, reconstruct and are scored
    rc, err = _run(["mri", "--kspace", img, "--from-image", *mri, "--out", tmp_path / "b"], capsys)
    assert rc == 0, err
    ksp = tmp_path / "k.npy"
    np.save(ksp, image_to_kspace(_complex_image()))
    rc, err = _run(["mri", "--kspace", ksp, *mri, "--out", tmp_path / "c"], capsys)
    assert rc == 0, err
    m_b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    m_c = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert m_b["psnr"] == pytest.approx(m_c["psnr"], abs=0.01) and m_c["psnr"] > 15


def test_image_vs_kspace_detector_on_multicoil_and_undersampled_kspace():
    from recon.io import image_to_kspace
    from recon.tasks import _refuse_image_as_kspace

    x = _complex_image()
    n = x.shape[0]
    yy, xx = np.mgrid[:n, :n] / n
    maps = np.stack([np.exp(-((yy - a) ** 2 + (xx - b) ** 2)) for a, b in [(0, 0), (0, 1), (1, 0), (1, 1)]])
    k = image_to_kspace(maps * x)
    mask = np.zeros((n, n), bool)
    mask[:, ::3] = True
    mask[:, n // 2 - 2:n // 2 + 2] = True
    _refuse_image_as_kspace(k, "k")            # k-space passes
    _refuse_image_as_kspace(k * mask, "k")     # undersampled k-space passes
    with pytest.raises(ReconError, match="--from-image"):
        _refuse_image_as_kspace(maps * x, "coil images")


# ---------------------------------------------------------------------------
# --reference of another size
# ---------------------------------------------------------------------------
def test_reference_smaller_than_reconstruction_is_refused(tmp_path, capsys):
    from recon.io import image_to_kspace

    np.save(tmp_path / "k.npy", image_to_kspace(_complex_image()))
    np.save(tmp_path / "ref.npy", np.abs(_complex_image())[8:24, 8:24])
    rc, err = _run(["mri", "--kspace", tmp_path / "k.npy", "--mask", "equispaced", "--accel", 2,
                    "--method", "zero-filled", "--reference", tmp_path / "ref.npy", "--out", tmp_path / "o"], capsys)
    _one_error(rc, err, "mri", "ref.npy", "16x16", "32x32")
    assert not (tmp_path / "o").exists()


def test_compute_metrics_is_strict_about_shapes():
    from recon.metrics import center_crop, compute_metrics

    x = _phantom()
    with pytest.raises(ReconError, match="16x16.*32x32"):
        compute_metrics(x, x[8:24, 8:24])
    assert compute_metrics(center_crop(x, (16, 16)), x[8:24, 8:24])["psnr"] == math.inf


def test_fastmri_style_reference_crop_is_explicit():
    """A file's own (fastMRI) reference is a centre crop of the reconstruction: cropped on purpose."""
    from forward_models.physics import Measurement
    from recon.tasks import TASKS

    meas = Measurement(y=torch.zeros(1), op=None, sigma_y=0.0, info={"reference_crop": [16, 16]})
    img = np.arange(32 * 32, dtype=np.float32).reshape(32, 32)
    assert np.array_equal(TASKS["mri"].metric_image(img, meas), img[8:24, 8:24])


# ---------------------------------------------------------------------------
# method options: ranges (every baseline and score method) and types (plan_methods)
# ---------------------------------------------------------------------------
def test_negative_n_iter_is_refused_not_an_all_zero_image(phantom, tmp_path, capsys):
    rc, err = _run(["ct", phantom, "--views", 8, "--method", "tv", "--param", "n_iter=-5", "--out", tmp_path / "o"],
                   capsys)
    _one_error(rc, err, "ct", "'tv'", "n_iter", "-5")
    assert not (tmp_path / "o").exists()


def _ops():
    from forward_models import CartesianMRI, Inpainting, ParallelBeamCT, view_angles

    ct = ParallelBeamCT(16, view_angles(4))
    mri = CartesianMRI(torch.ones(16, 16))
    inp = Inpainting(torch.ones(16, 16))
    return {"ct": (ct, torch.zeros(1, *ct.out_shape)), "mri": (mri, torch.zeros(1, 16, 16, dtype=torch.complex64)),
            "inpaint": (inp, torch.zeros(1, 16, 16))}


@pytest.mark.parametrize("method,op,options,needle", [
    ("tv", "ct", {"n_iter": -5}, "n_iter"), ("tv", "ct", {"lam": -1.0}, "lam"),
    ("tv", "ct", {"lam": float("nan")}, "lam"), ("tv", "ct", {"tol": -1.0}, "tol"),
    ("tv", "ct", {"step_ratio": 0.0}, "step_ratio"), ("sirt", "ct", {"n_iter": 0}, "n_iter"),
    ("sirt", "ct", {"relax": 3.0}, "relax"), ("cgls", "ct", {"n_iter": -1}, "n_iter"),
    ("cgls", "ct", {"damp": -1.0}, "damp"), ("cs-wavelet", "mri", {"n_iter": -5}, "n_iter"),
    ("cs-wavelet", "mri", {"lam": -1e-3}, "lam"), ("cs-wavelet", "mri", {"level": 0}, "level"),
    ("sense-adjoint", "mri", {"eps": -1.0}, "eps"), ("tv", "inpaint", {"n_iter": 2.5}, "n_iter"),
])
def test_every_baseline_validates_its_numeric_options(method, op, options, needle):
    from recon.methods import get_method

    A, y = _ops()[op]
    with pytest.raises(ReconError, match=rf"method '.*': option {needle} must be"):
        get_method(method)(y, A, **options)


@pytest.mark.parametrize("method,options,needle", [
    ("score", {"n_steps": 0}, "n_steps"), ("score", {"snr": -0.1}, "snr"),
    ("score", {"n_corrector": -1}, "n_corrector"), ("score", {"corrector": "mala"}, "corrector"),
    ("score-fast", {"n_steps": -3}, "n_steps"),
    ("score-fast", {"cg_iters": 0}, "cg_iters"), ("score-fast", {"eta": 2.0}, "eta"),
    ("dps", {"zeta": -1.0}, "zeta"), ("dps", {"sigma_max": 0.0}, "sigma_max"),
])
def test_every_score_method_validates_its_numeric_options(method, options, needle, tmp_path):
    from recon.methods import get_method

    prior = _tiny_prior_file(tmp_path, size=16)
    A, y = _ops()["inpaint"]
    with pytest.raises(ReconError, match=rf"option {needle} must be"):
        get_method(method)(y, A, prior=str(prior), **options)


def test_mistyped_param_is_refused_up_front(phantom, png_folder, tmp_path, capsys):
    rc, err = _run(["ct", phantom, "--views", 8, "--method", "tv", "--param", "lam=abc", "--out", tmp_path / "a"],
                   capsys)
    _one_error(rc, err, "ct", "'tv'", "lam", "'abc'", "a number")
    # compare: one error before any case, not a failure per case
    rc, err = _run(["compare", "ct", "--data", png_folder, "--views", 8, "--methods", "fbp,tv",
                    "--param", "tv.lam=abc", "--out", tmp_path / "b"], capsys)
    _one_error(rc, err, "compare", "lam", "'abc'")
    for d in "ab":
        assert not (tmp_path / d).exists()
    # an out-of-range value is the method's own check: that method fails, the others run
    rc, err = _run(["compare", "ct", "--data", png_folder, "--views", 8, "--methods", "fbp,tv",
                    "--param", "tv.n_iter=-5", "--out", tmp_path / "c"], capsys)
    assert rc == 1 and "method 'tv': option n_iter must be an integer >= 1, got -5" in err
    assert "| fbp |" in (tmp_path / "c" / "summary.md").read_text()


@pytest.fixture
def png_folder(tmp_path):
    from PIL import Image

    d = tmp_path / "pngs"
    d.mkdir()
    Image.fromarray((_phantom() / _phantom().max() * 255).astype(np.uint8)).save(d / "a.png")
    return d


def test_plan_methods_checks_types_from_signature_defaults():
    from recon.execute import plan_methods
    from recon.tasks import TASKS

    (tv,) = plan_methods(["tv"], TASKS["ct"], {None: {"n_iter": 1e3, "lam": 1}})
    assert tv.options["n_iter"] == 1000 and isinstance(tv.options["n_iter"], int)
    assert tv.options["lam"] == 1.0 and isinstance(tv.options["lam"], float)
    for opts, msg in (({"n_iter": 2.5}, "n_iter expects an integer"), ({"lam": "abc"}, "lam expects a number"),
                      ({"lam": True}, "lam expects a number"), ({"nonneg": 1}, "nonneg expects true or false"),
                      ({"n_iter": None}, "n_iter expects an integer")):
        with pytest.raises(ReconError, match=msg):
            plan_methods(["tv"], TASKS["ct"], {None: opts})
    # score methods: None defaults, the type comes from the annotation (int | None)
    with pytest.raises(ReconError, match="n_steps expects an integer"):
        plan_methods(["score-fast"], TASKS["ct"], {None: {"n_steps": "many"}})
    # cs-wavelet's str option
    with pytest.raises(ReconError, match="wavelet expects a text value"):
        plan_methods(["cs-wavelet"], TASKS["mri"], {None: {"wavelet": 4}})


# ---------------------------------------------------------------------------
# --size
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["0", "3", "-1", "x"])
def test_size_below_4_is_a_parse_error(size, phantom, tmp_path, capsys):
    line = _parse_error(["ct", phantom, "--views", 8, "--method", "fbp", "--size", size, "--out", tmp_path / "o"],
                        capsys)
    assert line.startswith("recon ct: error: --size must be") and ("must be >= 4" in line) != (size == "x")
    assert not (tmp_path / "o").exists()


def test_working_size_zero_is_not_native():
    from recon.execute import RunSettings, working_window_and_size

    with pytest.raises(ReconError, match="--size"):
        RunSettings(methods="fbp", size=0)
    assert working_window_and_size(None, None, None)[1] is None
    assert working_window_and_size(None, 8, None)[1] == 8


def test_huge_size_is_refused_before_allocating(phantom, tmp_path, capsys):
    rc, err = _run(["ct", phantom, "--views", 8, "--method", "fbp", "--size", 100000, "--out", tmp_path / "o"],
                   capsys)
    _one_error(rc, err, "ct", "--size 100000", "memory", "smaller --size")
    assert not (tmp_path / "o").exists()


def test_memory_estimate():
    from recon.execute import check_memory

    check_memory(128, available=10 ** 9)
    with pytest.raises(ReconError, match="native working size 4096x4096.*smaller --size"):
        check_memory(4096, native=True, available=10 ** 9)
    with pytest.raises(ReconError, match="--samples 64"):
        check_memory(512, samples=64, available=10 ** 9)


def test_memory_error_is_a_clear_exit_2(phantom, tmp_path, capsys, monkeypatch):
    import recon.single

    def oom(*a, **k):
        raise MemoryError()

    monkeypatch.setattr(recon.single, "run_method", oom)
    rc, err = _run(["ct", phantom, "--views", 8, "--method", "fbp", "--out", tmp_path / "o"], capsys)
    _one_error(rc, err, "ct", "out of memory", "--size")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------
# --accel that the mask cannot reach
# ---------------------------------------------------------------------------
def test_unreachable_acceleration_warns_with_the_true_value(phantom, tmp_path, capsys):
    rc = main([str(a) for a in ["mri", phantom, "--mask", "random", "--accel", 1000, "--method", "zero-filled",
                                "--out", tmp_path / "a"]])
    err = capsys.readouterr().err
    assert rc == 0, err
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    true = run["measurement"]["acceleration"]
    assert true < 100
    assert f"acceleration {true:.3g}x" in err  # logged
    warning = [line for line in err.splitlines() if "warning" in line]
    assert len(warning) == 1 and warning[0].startswith("recon mri: warning: --accel 1000")
    assert "--center-fraction" in warning[0] and run["warnings"] and "--accel 1000" in run["warnings"][0]
    # a reached acceleration does not warn (warnings show even with --quiet)
    rc, err = _run(["mri", phantom, "--mask", "equispaced", "--accel", 2, "--center-fraction", 0.04,
                    "--method", "zero-filled", "--out", tmp_path / "b"], capsys)
    assert rc == 0 and "warning" not in err
    assert json.loads((tmp_path / "b" / "run.json").read_text())["warnings"] == []


# ---------------------------------------------------------------------------
# sample / likelihood counts
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("option,value", [("--n", "0"), ("--n", "-2"), ("--steps", "0"), ("--snr", "-1")])
def test_sample_counts_are_parse_errors(option, value, tmp_path, capsys):
    line = _parse_error(["sample", "--prior", "ct", option, value, "--out", tmp_path / "s"], capsys)
    assert line.startswith(f"recon sample: error: {option} must be")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("option,value", [("--steps", "0"), ("--steps", "-5"), ("--probes", "-1"),
                                          ("--probes", "0")])
def test_likelihood_counts_are_parse_errors(option, value, phantom, capsys):
    line = _parse_error(["likelihood", phantom, "--prior", "ct", option, value], capsys)
    assert line.startswith(f"recon likelihood: error: {option} must be >= 1, got ")


def test_likelihood_warns_when_unreliable(phantom, tmp_path, capsys):
    from recon.likelihood import log_likelihood, reliability_warnings

    prior = _tiny_prior_file(tmp_path, size=16)
    out = tmp_path / "ll.json"
    rc = main(["likelihood", str(phantom), "--prior", str(prior), "--steps", "4", "--out", str(out), "--quiet",
               "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "recon likelihood: warning: --steps 4" in err and "raise --steps" in err
    assert json.loads(out.read_text())["warnings"]
    assert any("negative" in w for w in reliability_warnings(-1.5, 64))
    assert reliability_warnings(3.2, 64) == []
    with pytest.raises(ReconError, match="n_steps"):
        log_likelihood(None, torch.zeros(1, 4, 4), n_steps=0)


# ---------------------------------------------------------------------------
# empty method names
# ---------------------------------------------------------------------------
def test_compare_empty_method_name(png_folder, tmp_path, capsys):
    rc, err = _run(["compare", "mri", "--data", png_folder, "--methods", "zero-filled,,tv", "--mask", "equispaced",
                    "--accel", 2, "--out", tmp_path / "o"], capsys)
    _one_error(rc, err, "compare", "'zero-filled,,tv'", "empty entry", "method names")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------
# rerun into the output folder of an earlier run
# ---------------------------------------------------------------------------
def test_rerun_removes_reserved_outputs_the_new_run_did_not_write(phantom, tmp_path, capsys):
    out = tmp_path / "o"
    dcm = tmp_path / "dcm"
    dcm.mkdir()
    shutil.copy(CT_SMALL, dcm / "CT_small.dcm")
    assert _run(["ct", dcm, "--views", 8, "--method", "fbp", "--out", out], capsys)[0] == 0
    assert (out / "dicom").is_dir() and not (out / "recon.nii.gz").exists()
    (out / "notes.txt").write_text("mine")  # not an output name: kept
    assert _run(["ct", phantom, "--views", 8, "--method", "fbp", "--out", out], capsys)[0] == 0
    names = {p.name for p in out.iterdir()}
    assert "dicom" not in names and {"recon.nii.gz", "run.json", "metrics.json", "notes.txt"} <= names
    assert set(json.loads((out / "run.json").read_text())["outputs"]) == names - {"notes.txt"}


def test_output_folder_commit_removes_stale_reserved_names(tmp_path):
    from recon.outputs import OutputFolder

    out = tmp_path / "o"
    out.mkdir()
    (out / "old.json").write_text("{}")
    (out / "olddir").mkdir()
    (out / "olddir" / "x").write_text("x")
    (out / "keep.txt").write_text("k")
    with OutputFolder(out, reserved=("new.json", "old.json", "olddir")) as folder:
        (folder.stage / "new.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "new.json"]


# ---------------------------------------------------------------------------
# fan-beam distances, in the option's units
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("extra,needle", [(["--source-distance", "0.1"], "--source-distance 0.1"),
                                          (["--source-distance", "0.7"], "--source-distance 0.7"),
                                          (["--detector-distance", "1.5"], "--detector-distance 1.5")])
def test_fan_distances_are_checked_in_image_widths(extra, needle, phantom, tmp_path, capsys):
    rc, err = _run(["ct", phantom, "--views", 8, "--geometry", "fan", *extra, "--method", "fbp",
                    "--out", tmp_path / "o"], capsys)
    _one_error(rc, err, "ct", needle, "image width")
    assert "pixel" not in err
    assert not (tmp_path / "o").exists()


def test_fan_acquisition_checks_distances():
    from recon.acquisition import CTAcquisition

    CTAcquisition(views=8, geometry="fan", source_distance=0.8, detector_distance=0.8)
    CTAcquisition(views=8, source_distance=0.1)  # parallel beam: the fan distances do not apply
    with pytest.raises(ReconError, match="--source-distance 0.5"):
        CTAcquisition(views=8, geometry="fan", source_distance=0.5)


# ---------------------------------------------------------------------------
# DICOM of the other modality
# ---------------------------------------------------------------------------
def test_mr_dicom_to_ct_needs_force_modality(tmp_path, capsys):
    rc, err = _run(["ct", MR_SMALL, "--views", 8, "--method", "fbp", "--out", tmp_path / "a"], capsys)
    _one_error(rc, err, "ct", "Modality is MR", "recon mri", "--force-modality")
    assert not (tmp_path / "a").exists()
    rc, err = _run(["ct", MR_SMALL, "--views", 8, "--method", "fbp", "--force-modality", "--out", tmp_path / "b"],
                   capsys)
    assert rc == 0, err


def test_ct_dicom_to_mri_needs_force_modality(tmp_path, capsys):
    rc, err = _run(["mri", CT_SMALL, "--mask", "equispaced", "--accel", 2, "--method", "zero-filled",
                    "--out", tmp_path / "a"], capsys)
    _one_error(rc, err, "mri", "Modality is CT", "recon ct", "--force-modality")
    assert not (tmp_path / "a").exists()
    # inpainting takes either
    rc, err = _run(["inpaint", CT_SMALL, "--method", "biharmonic", "--size", 32, "--out", tmp_path / "b"], capsys)
    assert rc == 0, err


# ---------------------------------------------------------------------------
# pickled priors
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt", ".pkl"])
@pytest.mark.parametrize("exists", [False, True])
def test_pickled_prior_is_refused(suffix, exists, phantom, tmp_path, capsys):
    prior = tmp_path / f"x{suffix}"
    if exists:
        prior.write_bytes(b"\x80\x04.")
    rc, err = _run(["ct", phantom, "--views", 8, "--method", "score-fast", "--prior", prior, "--size", 16,
                    "--out", tmp_path / "o"], capsys)
    _one_error(rc, err, "ct", f"x{suffix}", "pickled weights are refused", "convert to safetensors", "README")
    assert "x.json" not in err and not (tmp_path / "o").exists()


def test_pickled_prior_refused_by_sample_and_compare(png_folder, tmp_path, capsys):
    rc, err = _run(["sample", "--prior", tmp_path / "w.pth", "--out", tmp_path / "s"], capsys)
    _one_error(rc, err, "sample", "pickled weights are refused")
    rc, err = _run(["compare", "ct", "--data", png_folder, "--views", 8, "--methods", "fbp,score-fast",
                    "--prior", tmp_path / "w.pth", "--out", tmp_path / "c"], capsys)
    _one_error(rc, err, "compare", "pickled weights are refused")  # once, before any case
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------
# every numeric option is checked at parse time, one message style
# ---------------------------------------------------------------------------
_RECON = ["--method", "fbp", "--views", "8"]


@pytest.mark.parametrize("argv,option", [
    (["train", "--data", "d", "--modality", "ct", "--steps", "0"], "--steps"),
    (["train", "--data", "d", "--modality", "ct", "--batch", "0"], "--batch"),
    (["train", "--data", "d", "--modality", "ct", "--lr", "0"], "--lr"),
    (["train", "--data", "d", "--modality", "ct", "--size", "2"], "--size"),
    (["train", "--data", "d", "--modality", "ct", "--patch", "x"], "--patch"),
    (["train", "--data", "d", "--modality", "ct", "--base", "-1"], "--base"),
    (["train", "--data", "d", "--modality", "ct", "--minutes", "-1"], "--minutes"),
    (["train", "--data", "d", "--modality", "ct", "--max-images", "0"], "--max-images"),
    (["train", "--data", "d", "--modality", "ct", "--checkpoint-every", "0"], "--checkpoint-every"),
    (["train", "--data", "d", "--modality", "ct", "--full-every", "-1"], "--full-every"),
    (["ct", "x.npy", *_RECON, "--samples", "0"], "--samples"),
    (["ct", "x.npy", *_RECON, "--seed", "-1"], "--seed"),
    (["ct", "x.npy", *_RECON, "--slice", "-1"], "--slice"),
    (["ct", "x.npy", *_RECON, "--views", "0"], "--views"),
    (["ct", "x.npy", *_RECON, "--photons", "nan"], "--photons"),
    (["mri", "x.npy", "--method", "tv", "--accel", "0"], "--accel"),
    (["mri", "x.npy", "--method", "tv", "--center-fraction", "1.5"], "--center-fraction"),
    (["inpaint", "x.npy", "--method", "tv", "--strokes", "0"], "--strokes"),
    (["inpaint", "x.npy", "--method", "tv", "--size", "0"], "--size"),
    (["compare", "ct", "--data", "d", "--methods", "fbp", "--max-cases", "0"], "--max-cases"),
    (["compare", "mri", "--data", "d", "--methods", "tv", "--size", "3"], "--size"),
    (["demo", "--seed", "-3"], "--seed"),
    (["demo", "--views", "0"], "--views"),
    (["sample", "--prior", "ct", "--seed", "1.5"], "--seed"),
])
def test_numeric_options_are_parse_errors(argv, option, tmp_path, capsys):
    line = _parse_error(argv + ["--out", str(tmp_path / "o")], capsys)
    assert line.startswith(f"recon {argv[0]}: error: {option} must be ") and ", got " in line
    assert not (tmp_path / "o").exists()
