"""The ``recon`` command line: reconstruction subcommands, compare, manifests, bad input.

Tiny data only (32x32 images, few views/iterations).  Most calls run
``recon.cli.main([...])`` in-process; a couple use a subprocess to check the
real exit status of the console script.
"""
import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from pydicom.data import get_testdata_file

from recon.cli import main

CT_SMALL = get_testdata_file("CT_small.dcm")
HEADER = ["case", "method", "psnr", "ssim", "nmse", "seconds"]


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------
def _phantom(n=32):
    yy, xx = np.mgrid[:n, :n] / (n - 1) * 2 - 1
    img = 0.2 * ((xx / 0.8) ** 2 + (yy / 0.9) ** 2 <= 1)
    img += 0.6 * (((xx - 0.2) / 0.3) ** 2 + (yy / 0.4) ** 2 <= 1)
    img += 0.2 * (((xx + 0.3) / 0.15) ** 2 + ((yy + 0.3) / 0.15) ** 2 <= 1)
    return img.astype(np.float32)


@pytest.fixture
def phantom(tmp_path):
    p = tmp_path / "phantom.npy"
    np.save(p, _phantom())
    return p


@pytest.fixture
def png_folder(tmp_path):
    from PIL import Image

    d = tmp_path / "pngs"
    d.mkdir()
    img = _phantom()
    Image.fromarray((img / img.max() * 255).astype(np.uint8)).save(d / "a.png")
    Image.fromarray((np.fliplr(img) / img.max() * 200).astype(np.uint8)).save(d / "b.png")
    return d


def _tiny_prior_file(tmp_path, size=16, modality="ct"):
    from recon.networks import UNet
    from recon.prior import EDMDenoiser, Prior, save_prior

    meta = {"image_size": size, "modality": modality, "window": [-1000, 1000], "sde": {"name": "ve"},
            "architecture": {"channels": 1, "base": 8, "mults": [1, 2], "n_res": 1, "attn_levels": [],
                             "coords": True, "sigma_data": 0.5}}
    torch.manual_seed(0)
    net = UNet(**{k: v for k, v in meta["architecture"].items() if k != "sigma_data"})
    for p in net.parameters():
        p.data.normal_(0, 0.05)
    return save_prior(Prior(EDMDenoiser(net), meta), tmp_path / "tiny.safetensors")


def _run(args, capsys=None):
    rc = main([str(a) for a in args] + ["--quiet"])
    err = capsys.readouterr().err if capsys is not None else ""
    return rc, err


def _error_lines(err):
    return [line for line in err.strip().splitlines() if line.strip()]


# ---------------------------------------------------------------------------
# help
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", [["ct"], ["mri"], ["inpaint"], ["compare"], ["compare", "ct"],
                                 ["compare", "mri"], ["compare", "inpaint"], ["demo"], ["methods"],
                                 ["train"], ["sample"], ["likelihood"], ["bench"]])
def test_every_subcommand_help_exits_zero(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main(cmd + ["--help"])
    assert e.value.code == 0
    assert "usage: recon" in capsys.readouterr().out


@pytest.mark.parametrize("option,value", [("--full-noise", "0.5"), ("--full-noise", "a,1"), ("--mults", "1,x"),
                                          ("--window", "-1000")])
def test_train_number_list_options_are_validated(option, value, tmp_path, capsys):
    rc, err = _run(["train", "--data", tmp_path, "--modality", "ct", "--out", tmp_path / "p.safetensors",
                    option, value], capsys)
    assert rc == 2 and f"{option} takes" in err and repr(value) in err


def test_console_script_help_and_exit_status(tmp_path):
    out = subprocess.run([sys.executable, "-m", "recon.cli", "ct", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--views" in out.stdout and "--photons" in out.stdout
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(open(CT_SMALL, "rb").read()[:1500])  # truncated DICOM
    res = subprocess.run([sys.executable, "-m", "recon.cli", "ct", str(bad), "--views", "8", "--method",
                          "fbp", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert res.returncode == 2
    lines = _error_lines(res.stderr)
    assert len(lines) == 1 and lines[0].startswith("recon ct: error: ") and "broken.dcm" in lines[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------
# recon ct
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("method,params", [("fbp", []), ("tv", ["--param", "n_iter=20"])])
def test_ct_phantom_end_to_end(phantom, tmp_path, capsys, method, params):
    out = tmp_path / f"out_{method}"
    rc, _ = _run(["ct", phantom, "--views", 8, "--method", method, *params, "--out", out], capsys)
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    assert {"recon.nii.gz", "recon.png", "metrics.json", "run.json", "sinogram.npy"} <= names
    assert not any(n.startswith(".") for n in names)  # no staging leftovers
    m = json.loads((out / "metrics.json").read_text())
    assert {"psnr", "ssim", "nmse"} <= set(m) and m["data_range"] == 1.0
    assert 10 < m["psnr"] < 60 and 0 < m["ssim"] <= 1
    run = json.loads((out / "run.json").read_text())
    assert set(run["versions"]) >= {"recon", "torch", "numpy", "pydicom"}
    assert run["seed"] == 0 and run["options"]["views"] == 8 and run["input"] == str(phantom)
    assert "reconstruct" in run["timings_seconds"] and run["method"]["name"] == method
    assert np.load(out / "sinogram.npy").shape == (8, 46)  # ceil(sqrt(2) * 32)
    from recon.io import read_nifti

    vol = read_nifti(out / "recon.nii.gz")
    assert vol.data.shape == (1, 32, 32)


def test_ct_dicom_input_writes_derived_series(tmp_path, capsys):
    from recon.io import read_dicom

    out = tmp_path / "ct_dcm"
    rc, _ = _run(["ct", CT_SMALL, "--views", 8, "--size", 32, "--method", "fbp", "--out", out], capsys)
    assert rc == 0
    src = read_dicom(CT_SMALL)
    vol = read_dicom(out / "dicom")
    assert vol.data.shape == (1, 32, 32)
    assert vol.meta["series_uid"] != src.meta["series_uid"]
    assert vol.meta["study_uid"] == src.meta["study_uid"]
    # full HU range: clipped only below the window (air), never above it (CT_small holds bone above +1000 HU)
    assert vol.meta["units"] == "HU" and -1001 <= vol.data.min()
    assert src.data.max() > 1000 and vol.data.max() > 1000
    assert vol.spacing[1] == pytest.approx(src.spacing[1] * 128 / 32, rel=1e-4)  # same field of view
    assert "DERIVED" in list(vol.datasets[0].ImageType)
    assert not (out / "recon.nii.gz").exists()


def test_ct_noise_models_report_sigma_y(phantom, tmp_path, capsys):
    rc, _ = _run(["ct", phantom, "--views", 8, "--photons", 1e4, "--method", "fbp", "--out", tmp_path / "p"],
                 capsys)
    assert rc == 0
    run = json.loads((tmp_path / "p" / "run.json").read_text())
    assert run["measurement"]["model"] == "poisson" and run["sigma_y"] > 0
    rc, _ = _run(["ct", phantom, "--views", 8, "--noise", 0.05, "--method", "fbp", "--out", tmp_path / "g"],
                 capsys)
    run = json.loads((tmp_path / "g" / "run.json").read_text())
    clean = json.loads((tmp_path / "p" / "run.json").read_text())
    assert run["measurement"]["model"] == "gaussian" and run["sigma_y"] > 0
    # the same seed gives the same measurement
    rc, _ = _run(["ct", phantom, "--views", 8, "--noise", 0.05, "--method", "fbp", "--out", tmp_path / "g2"],
                 capsys)
    np.testing.assert_array_equal(np.load(tmp_path / "g" / "sinogram.npy"), np.load(tmp_path / "g2" / "sinogram.npy"))
    assert clean["sigma_y"] != run["sigma_y"]


def test_ct_poisson_is_unbiased_in_image_units():
    """y from --photons is in A(x) units: its mean over many rays follows the clean sinogram."""
    from forward_models import ParallelBeamCT
    from recon.acquisition import CTAcquisition
    from recon.case import Source
    from recon.tasks import TASKS

    task = TASKS["ct"]
    src = Source(image=_phantom() * 1000 - 1000, path="x.npy", fmt="image", dx=1.0)
    truth = task.prepare(src, None, (-1000, 1000), "hu")
    meas = task.simulate(truth, CTAcquisition(views=8, photons=1e6), "cpu", seed=0)
    assert isinstance(meas.op, ParallelBeamCT) and meas.info["model"] == "poisson"
    clean = meas.op.A(truth.batch())
    assert float((meas.y - clean).mean().abs()) < 0.1 * meas.sigma_y
    assert meas.sigma_y > 0


def test_ct_fan_and_measured_sinogram_round_trip(phantom, tmp_path, capsys):
    rc, _ = _run(["ct", phantom, "--views", 10, "--geometry", "fan", "--method", "fbp", "--out", tmp_path / "f"],
                 capsys)
    assert rc == 0
    sino = tmp_path / "f" / "sinogram.npy"
    rc, _ = _run(["ct", "--sinogram", sino, "--geometry", "fan", "--size", 32, "--method", "sirt",
                  "--param", "n_iter=20", "--out", tmp_path / "s"], capsys)
    assert rc == 0
    assert (tmp_path / "s" / "recon.nii.gz").exists() and not (tmp_path / "s" / "metrics.json").exists()
    rc, err = _run(["ct", "--sinogram", sino, "--views", 11, "--geometry", "fan", "--size", 32, "--method",
                    "fbp", "--out", tmp_path / "s2"], capsys)  # --views N <= 10 selects N of the 10 views
    assert rc == 2 and "views" in err and not (tmp_path / "s2").exists()


def test_ct_score_method_with_tiny_prior_and_samples(phantom, tmp_path, capsys):
    prior = _tiny_prior_file(tmp_path)
    out = tmp_path / "score"
    rc, _ = _run(["ct", phantom, "--views", 8, "--method", "score-fast", "--prior", prior,
                  "--param", "n_steps=3", "--samples", 2, "--out", out], capsys)
    assert rc == 0
    std = np.load(out / "std.npy")
    assert std.shape == (32, 32) and (out / "std.png").exists()  # the data's own size, not the prior's 16
    run = json.loads((out / "run.json").read_text())
    assert run["method"]["options"]["n_steps"] == 3 and run["samples"] == 2
    assert run["method"]["options"]["prior"] == str(prior)
    assert run["working_size"] == [32, 32] and run["prior_scale"]["scale_factor"] == 2.0
    ood = run["out_of_distribution_check"]  # reported with every score reconstruction
    assert ood["available"] is False and "recon ood fit" in ood["why"]
    assert "two bands" in run["prior_scale"]["action"]
    # --size still picks a working size (for speed); at the prior's size the prior runs as it is
    rc, _ = _run(["ct", phantom, "--views", 8, "--method", "score-fast", "--prior", prior, "--size", 16,
                  "--param", "n_steps=3", "--out", tmp_path / "s16"], capsys)
    run = json.loads((tmp_path / "s16" / "run.json").read_text())
    assert rc == 0 and run["working_size"] == [16, 16] and run["prior_scale"]["scale_factor"] == 1.0


def test_ct_score_corrector_option(phantom, tmp_path, capsys):
    """`--param corrector=vp|langevin` reaches the predictor-corrector sampler; an unknown one is one
    clear error naming the choices, with nothing written."""
    from recon.io import read_nifti

    prior = _tiny_prior_file(tmp_path)
    imgs = {}
    for c in ("vp", "langevin"):
        rc, _ = _run(["ct", phantom, "--views", 8, "--method", "score", "--prior", prior, "--param", "n_steps=3",
                      "--param", f"corrector={c}", "--param", "snr=0.7", "--out", tmp_path / c], capsys)
        assert rc == 0
        run = json.loads((tmp_path / c / "run.json").read_text())
        assert run["method"]["options"]["corrector"] == c
        imgs[c] = read_nifti(tmp_path / c / "recon.nii.gz").data
    assert not np.allclose(imgs["vp"], imgs["langevin"])
    rc, err = _run(["ct", phantom, "--views", 8, "--method", "score", "--prior", prior, "--param", "n_steps=3",
                    "--param", "corrector=mala", "--out", tmp_path / "bad"], capsys)
    assert rc != 0 and "option corrector must be one of langevin, vp, got 'mala'" in err
    assert not (tmp_path / "bad").exists()


def test_ct_deterministic_method_refuses_samples(phantom, tmp_path, capsys):
    rc, err = _run(["ct", phantom, "--views", 8, "--method", "fbp", "--samples", 3, "--out", tmp_path / "o"],
                   capsys)
    assert rc == 2 and "deterministic" in err


# ---------------------------------------------------------------------------
# recon mri / inpaint
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("mask", ["equispaced", "random", "gaussian1d", "gaussian2d", "poisson"])
def test_mri_each_mask_zero_filled(phantom, tmp_path, capsys, mask):
    out = tmp_path / mask
    rc, _ = _run(["mri", phantom, "--mask", mask, "--accel", 4, "--center-fraction", 0.16,
                  "--method", "zero-filled", "--out", out], capsys)
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert 5 < m["psnr"] < 60
    run = json.loads((out / "run.json").read_text())
    assert run["measurement"]["acceleration"] > 1.5
    assert (out / "recon.nii.gz").exists() and (out / "recon.png").exists()


def test_mri_kspace_complex_npy_single_coil(phantom, tmp_path, capsys):
    from recon.io import image_to_kspace

    k = image_to_kspace(_phantom().astype(np.complex64))
    np.save(tmp_path / "k.npy", k)
    rc, err = _run(["mri", "--kspace", tmp_path / "k.npy", "--method", "zero-filled", "--out", tmp_path / "n"],
                   capsys)
    assert rc == 2 and "fully sampled" in err  # needs a mask to undersample
    rc, _ = _run(["mri", "--kspace", tmp_path / "k.npy", "--mask", "equispaced", "--accel", 2,
                  "--method", "tv", "--param", "n_iter=20", "--out", tmp_path / "o"], capsys)
    assert rc == 0
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["psnr"] > 15 and "fully sampled" in m["reference"]


def test_mri_multicoil_cfl_already_undersampled(tmp_path, capsys):
    from recon.io import image_to_kspace, write_cfl

    x = _phantom()
    n = x.shape[0]
    yy, xx = np.mgrid[:n, :n] / n
    maps = np.stack([np.exp(-((yy - a) ** 2 + (xx - b) ** 2)) for a, b in [(0, 0), (0, 1), (1, 0), (1, 1)]])
    k = image_to_kspace(maps * x)
    mask = np.zeros((n, n), bool)
    mask[:, ::2] = True
    mask[:, n // 2 - 4:n // 2 + 4] = True
    write_cfl(tmp_path / "ksp", np.transpose(k * mask, (1, 2, 0))[:, :, None, :])  # BART (READ, PHS1, PHS2, COIL)
    np.save(tmp_path / "ref.npy", x)
    out = tmp_path / "sense"
    rc, _ = _run(["mri", "--kspace", tmp_path / "ksp.cfl", "--method", "sense-adjoint",
                  "--reference", tmp_path / "ref.npy", "--out", out], capsys)
    assert rc == 0
    run = json.loads((out / "run.json").read_text())
    assert run["measurement"]["coils"] == 4 and run["measurement"]["calib_size"] >= 4
    assert run["undersampled_input"] is True
    assert json.loads((out / "metrics.json").read_text())["psnr"] > 10


def test_inpaint_box_biharmonic(phantom, tmp_path, capsys):
    out = tmp_path / "inp"
    rc, _ = _run(["inpaint", phantom, "--mask", "box", "--box-fraction", 0.1, "--method", "biharmonic",
                  "--out", out], capsys)
    assert rc == 0
    assert {"recon.nii.gz", "recon.png", "observed.png", "metrics.json", "run.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "metrics.json").read_text())["psnr"] > 15


# ---------------------------------------------------------------------------
# compare, manifests, shards
# ---------------------------------------------------------------------------
def test_compare_ct_on_png_folder(png_folder, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc, _ = _run(["compare", "ct", "--data", png_folder, "--methods", "fbp,tv", "--param", "tv.n_iter=10",
                  "--views", 8, "--out", out], capsys)
    assert rc == 0
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][:6] == HEADER
    assert sorted((r[0], r[1]) for r in rows[1:]) == [("a", "fbp"), ("a", "tv"), ("b", "fbp"), ("b", "tv")]
    assert all(float(r[2]) > 5 for r in rows[1:])
    summary = (out / "summary.md").read_text()
    assert "| fbp |" in summary and "| tv |" in summary and "±" in summary and "Cases: 2" in summary
    assert (out / "figures" / "a.png").exists() and (out / "figures" / "b.png").exists()


def test_compare_failing_method_is_logged_and_run_continues(png_folder, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc, err = _run(["compare", "ct", "--data", png_folder, "--methods", "fbp,sirt", "--param", "sirt.relax=3",
                    "--views", 8, "--out", out], capsys)
    assert rc == 1
    assert "sirt" in err
    rows = list(csv.reader(open(out / "metrics.csv")))
    assert rows[0][:6] == HEADER and sorted(r[1] for r in rows[1:]) == ["fbp", "fbp"]
    assert "Failures" in (out / "summary.md").read_text()


def test_compare_mri_and_inpaint_with_score_prior_at_native_size(png_folder, tmp_path, capsys):
    prior = _tiny_prior_file(tmp_path, modality="mri")
    out = tmp_path / "mri"
    rc, _ = _run(["compare", "mri", "--data", png_folder, "--methods", "zero-filled,score-fast",
                  "--prior", prior, "--param", "score-fast.n_steps=2", "--mask", "equispaced", "--accel", 2,
                  "--out", out], capsys)
    assert rc == 0
    rows = list(csv.reader(open(out / "metrics.csv")))
    assert rows[0][:6] == HEADER and len(rows) == 5
    case = json.loads((out / "cases" / "a.json").read_text())
    assert case["size"] == 32  # every method, score methods too, works at the data's own size
    rc, _ = _run(["compare", "inpaint", "--data", png_folder, "--methods", "biharmonic,tv",
                  "--param", "tv.n_iter=10", "--mask", "random", "--keep-ratio", 0.5, "--max-cases", 1,
                  "--out", tmp_path / "inp"], capsys)
    assert rc == 0
    assert len(list(csv.reader(open(tmp_path / "inp" / "metrics.csv")))) == 3


def test_compare_samples_scores_the_posterior_mean_of_score_methods_only(png_folder, tmp_path, capsys):
    prior = _tiny_prior_file(tmp_path, modality="mri")
    psnr = {}
    for k in (1, 3):
        out = tmp_path / f"k{k}"
        rc, _ = _run(["compare", "mri", "--data", png_folder, "--methods", "zero-filled,score-fast",
                      "--prior", prior, "--param", "score-fast.n_steps=3", "--mask", "equispaced", "--accel", 2,
                      "--max-cases", 1, "--samples", k, "--out", out], capsys)
        assert rc == 0
        psnr[k] = {r[1]: float(r[2]) for r in list(csv.reader(open(out / "metrics.csv")))[1:]}
    assert psnr[1]["zero-filled"] == psnr[3]["zero-filled"]  # deterministic methods run once
    assert psnr[1]["score-fast"] != psnr[3]["score-fast"]
    assert "samples: 3 per case" in (tmp_path / "k3" / "summary.md").read_text()
    rc, err = _run(["compare", "mri", "--data", png_folder, "--methods", "zero-filled", "--samples", 0,
                    "--out", tmp_path / "k0"], capsys)
    assert rc == 2 and "--samples must be >= 1" in err


def test_manifest_shards_and_skip_done(png_folder, phantom, tmp_path, capsys):
    manifest = tmp_path / "cases.txt"
    manifest.write_text(f"# inputs\n{png_folder / 'a.png'}\n\n{png_folder / 'b.png'}\n{phantom}  # phantom\n")
    out = tmp_path / "batch"
    common = ["--manifest", manifest, "--views", 8, "--method", "fbp", "--out", out]
    assert _run(["ct", *common, "--shard", "0/2"], capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["0000_a", "0002_phantom"]
    assert _run(["ct", *common, "--shard", "1/2"], capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["0000_a", "0001_b", "0002_phantom"]
    rows = list(csv.reader(open(out / "metrics.csv")))
    assert rows[0][:6] == HEADER and len(rows) == 4
    stamp = (out / "0000_a" / "run.json").stat().st_mtime_ns
    rc = main([str(a) for a in ["ct", *common, "--shard", "0/2"]])
    err = capsys.readouterr().err
    assert rc == 0 and "0000_a: done already, skipped" in err
    assert (out / "0000_a" / "run.json").stat().st_mtime_ns == stamp
    shard = json.loads((out / "shard-0-of-2.json").read_text())
    assert shard["skipped"] == ["0000_a", "0002_phantom"] and shard["done"] == []
    # changed settings are recomputed, not skipped
    assert _run(["ct", *common[:-2], "--views", 9, "--out", out, "--shard", "0/2"], capsys)[0] == 0
    assert json.loads((out / "0000_a" / "run.json").read_text())["options"]["views"] == 9


def test_manifest_failure_is_logged_and_exit_nonzero(phantom, tmp_path, capsys):
    manifest = tmp_path / "cases.txt"
    manifest.write_text(f"{tmp_path / 'missing.png'}\n{phantom}\n")
    rc = main(["ct", "--manifest", str(manifest), "--views", "8", "--method", "fbp", "--out",
               str(tmp_path / "b"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "missing.png" in err
    assert (tmp_path / "b" / "0001_phantom" / "run.json").exists()
    assert not (tmp_path / "b" / "0000_missing").exists()


def test_compare_manifest_shards_aggregate(png_folder, phantom, tmp_path, capsys):
    manifest = tmp_path / "m.txt"
    manifest.write_text(f"{png_folder}\n{phantom}\n")
    out = tmp_path / "cm"
    for shard in ("0/2", "1/2"):
        assert _run(["compare", "ct", "--manifest", manifest, "--shard", shard, "--methods", "fbp",
                     "--views", 8, "--out", out], capsys)[0] == 0
    rows = list(csv.reader(open(out / "metrics.csv")))
    assert rows[0][:6] == HEADER
    assert sorted(r[0] for r in rows[1:]) == ["0000_a", "0000_b", "0001_phantom"]


def test_shard_validation(phantom, tmp_path, capsys):
    manifest = tmp_path / "m.txt"
    manifest.write_text(f"{phantom}\n")
    for bad in ("2/2", "x", "1/0", "-1/3"):
        rc, err = _run(["ct", "--manifest", manifest, f"--shard={bad}", "--views", 8, "--method", "fbp",
                        "--out", tmp_path / "o"], capsys)
        assert rc == 2 and "--shard" in err


# ---------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------
def test_demo_skips_unshipped_prior(tmp_path, capsys, monkeypatch):
    import recon.prior

    monkeypatch.setattr(recon.prior, "PRETRAINED_DIR", tmp_path / "no-weights")
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--methods", "fbp,score,score-fast", "--device", "cpu"])
    cap = capsys.readouterr()
    assert rc == 0
    assert "not shipped" in cap.err and "skipping score, score-fast" in cap.err
    assert "| fbp |" in cap.out
    assert {p.name for p in out.iterdir()} == {"demo.png", "metrics.md", "metrics.csv"}
    rows = list(csv.reader(open(out / "metrics.csv")))
    assert rows[0][:6] == HEADER and [r[1] for r in rows[1:]] == ["fbp"]
    assert rows[0][6:] == ["rmse_hu", "psnr_brain", "ssim_brain", "psnr_soft_tissue", "ssim_soft_tissue", "psnr_lung",
                           "ssim_lung", "rmse_hu_body", "psnr_body", "ssim_body"]  # CT: HU, clinical windows, patient only


# ---------------------------------------------------------------------------
# parameters
# ---------------------------------------------------------------------------
def test_param_parsing():
    from recon.execute import parse_params, parse_value

    assert parse_value("3") == 3 and parse_value("1e-3") == 1e-3 and parse_value("True") is True
    assert parse_value("none") is None and parse_value("0,1") == (0, 1) and parse_value("db4") == "db4"
    assert parse_params(["lam=1e-3", "tv.n_iter=5"]) == {None: {"lam": 1e-3}, "tv": {"n_iter": 5}}


def test_param_errors(phantom, tmp_path, capsys):
    rc, err = _run(["ct", phantom, "--views", 8, "--method", "tv", "--param", "bogus=1", "--out", tmp_path / "a"],
                   capsys)
    assert rc == 2 and "bogus" in err and "accepted options" in err
    rc, err = _run(["ct", phantom, "--views", 8, "--method", "fbp", "--param", "lam=1", "--out", tmp_path / "b"],
                   capsys)
    assert rc == 2 and "lam" in err
    rc, err = _run(["ct", phantom, "--views", 8, "--method", "nope", "--out", tmp_path / "c"], capsys)
    assert rc == 2 and "available:" in err and "fbp" in err
    rc, err = _run(["ct", phantom, "--views", 8, "--method", "zero-filled", "--out", tmp_path / "d"], capsys)
    assert rc == 2 and "does not apply" in err
    for d in "abcd":
        assert not (tmp_path / d).exists()


# ---------------------------------------------------------------------------
# bad input: one line, exit 2, no partial output, inputs untouched
# ---------------------------------------------------------------------------
def _two_series_folder(folder):
    import pydicom
    from pydicom.uid import generate_uid

    folder.mkdir()
    for i in range(2):
        ds = pydicom.dcmread(CT_SMALL)
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(folder / f"s{i}.dcm")
    return folder


def _bad_cases(tmp_path, phantom):
    trunc = tmp_path / "trunc.dcm"
    trunc.write_bytes(open(CT_SMALL, "rb").read()[:2000])
    empty = tmp_path / "empty"
    empty.mkdir()
    nan = tmp_path / "nan.npy"
    arr = _phantom()
    arr[3, 3] = np.nan
    np.save(nan, arr)
    mask = tmp_path / "mask16.npy"
    np.save(mask, np.ones((16, 16), np.float32))
    blocker = tmp_path / "regular_file"
    blocker.write_text("x")
    dcm_dir = tmp_path / "dcm"
    dcm_dir.mkdir()
    shutil.copy(CT_SMALL, dcm_dir / "CT_small.dcm")
    mixed = _two_series_folder(tmp_path / "mixed")
    import h5py

    h5 = tmp_path / "nokspace.h5"
    with h5py.File(h5, "w") as f:
        f["foo"] = np.zeros((1, 8, 8), np.complex64)
    out = tmp_path / "out"
    ct = ["--views", 8, "--method", "fbp"]
    return {
        "truncated dicom": (["ct", trunc, *ct, "--out", out], "trunc.dcm", out),
        "empty folder": (["ct", empty, *ct, "--out", out], "no DICOM", out),
        "nan data": (["ct", nan, *ct, "--out", out], "NaN", out),
        "mask size": (["inpaint", phantom, "--mask-file", mask, "--method", "biharmonic", "--out", out],
                      "mask16.npy", out),
        "out under a file": (["ct", phantom, *ct, "--out", blocker / "sub"], "regular_file", blocker / "sub"),
        "out is a file": (["ct", phantom, *ct, "--out", blocker], "not a folder", None),
        "out inside dicom folder": (["ct", dcm_dir, *ct, "--out", dcm_dir / "res"], "inside the input",
                                    dcm_dir / "res"),
        "mixed series": (["ct", mixed, *ct, "--out", out], "--series", out),
        "kspace without dataset": (["mri", "--kspace", h5, "--method", "zero-filled", "--out", out],
                                   "no dataset 'kspace'", out),
        "empty compare folder": (["compare", "ct", "--data", empty, "--methods", "fbp", "--views", 8,
                                  "--out", out], "no cases", out),
    }


@pytest.mark.parametrize("case", ["truncated dicom", "empty folder", "nan data", "mask size", "out under a file",
                                  "out is a file", "out inside dicom folder", "mixed series",
                                  "kspace without dataset", "empty compare folder"])
def test_bad_input_one_line_exit_2(case, tmp_path, phantom, capsys):
    argv, needle, must_not_exist = _bad_cases(tmp_path, phantom)[case]
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert rc == 2, err
    assert len(lines) == 1, err
    cmd = argv[0]
    assert lines[0].startswith(f"recon {cmd}: error: ") and needle in lines[0]
    assert "Traceback" not in err
    if must_not_exist is not None:
        assert not must_not_exist.exists()


def test_debug_shows_traceback(tmp_path, phantom):
    from recon.errors import ReconError

    with pytest.raises(ReconError):
        main(["ct", str(phantom), "--views", "8", "--method", "nope", "--out", str(tmp_path / "o"), "--debug"])


def test_never_overwrites_an_input(tmp_path, capsys):
    out = tmp_path / "res"
    out.mkdir()
    victim = out / "recon.png"
    from PIL import Image

    Image.fromarray((_phantom() * 255).astype(np.uint8)).save(victim)
    before = victim.read_bytes()
    rc, err = _run(["ct", victim, "--views", 8, "--method", "fbp", "--out", out], capsys)
    assert rc == 2 and "overwritten" in err
    assert victim.read_bytes() == before


def test_failed_run_leaves_previous_outputs_and_no_staging(phantom, tmp_path, capsys):
    out = tmp_path / "o"
    assert _run(["ct", phantom, "--views", 8, "--method", "fbp", "--out", out], capsys)[0] == 0
    before = (out / "run.json").read_text()
    rc, _ = _run(["ct", phantom, "--views", 8, "--method", "sirt", "--param", "relax=3", "--out", out], capsys)
    assert rc == 2
    assert (out / "run.json").read_text() == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_samples_write_a_calibrated_std_when_the_prior_has_a_calibration(phantom, tmp_path, capsys):
    prior = _tiny_prior_file(tmp_path)
    meta_path = prior.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["std_calibration"] = {"ct": {"score-fast": {"scale": 2.5, "fitted_on": "test"}}}
    meta_path.write_text(json.dumps(meta))
    out = tmp_path / "cal"
    rc, _ = _run(["ct", phantom, "--views", 8, "--method", "score-fast", "--prior", prior,
                  "--param", "n_steps=3", "--samples", 2, "--out", out], capsys)
    assert rc == 0
    assert np.allclose(np.load(out / "std_calibrated.npy"), 2.5 * np.load(out / "std.npy"))
    assert json.loads((out / "run.json").read_text())["std_calibration"]["scale"] == 2.5


def test_a_calibrated_std_is_written_only_within_the_settings_it_was_fitted_at(phantom, tmp_path, capsys):
    """A scale fitted at 23 views and 128 px covered 97 % there but 36 % at 8 views and 512 px (README)."""
    prior = _tiny_prior_file(tmp_path)
    meta_path = prior.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    args = ["ct", phantom, "--views", 8, "--method", "score-fast", "--prior", prior, "--param", "n_steps=3",
            "--samples", 2]
    for fitted_views, applies in ((10, True), (23, False)):
        conditions = {"views": fitted_views, "geometry": "parallel", "photons": None, "image_px": _phantom().shape[-1]}
        meta["std_calibration"] = {"ct": {"score-fast": {"scale": 2.5, "fitted_on": "test", "conditions": conditions}}}
        meta_path.write_text(json.dumps(meta))
        out = tmp_path / f"cal{fitted_views}"
        rc, err = _run(args + ["--out", out], capsys)
        assert rc == 0
        rec = json.loads((out / "run.json").read_text())["std_calibration"]
        assert rec["applied"] is applies
        assert (out / "std_calibrated.npy").exists() is applies
        assert (out / "std.npy").exists()
        if applies:
            assert "not_applied" not in rec and "std_calibrated.npy not written" not in err
        else:
            assert "views is 8 here" in rec["not_applied"] and "views 23" in rec["not_applied"]
            assert "std_calibrated.npy not written" in err
            assert any("std_calibrated.npy not written" in w for w in json.loads((out / "run.json").read_text())["warnings"])


def test_calibration_applies_compares_views_and_sizes_within_a_factor_and_the_rest_exactly():
    from recon.acquisition import CTAcquisition, MRIAcquisition
    from recon.execute import CALIBRATION_RANGE, calibration_applies, calibration_conditions

    img = np.zeros((128, 128))
    fitted = calibration_conditions(CTAcquisition(views=23), img)
    assert fitted == {"views": 23, "limited_angle": None, "geometry": "parallel", "photons": None, "noise": None,
                      "window": None, "fov": None, "measured": False, "image_px": 128}
    entry = {"scale": 3.0, "conditions": fitted}

    def why(acq, side=128):
        return calibration_applies(entry, calibration_conditions(acq, np.zeros((int(side), int(side)))))

    assert why(CTAcquisition(views=23)) is None
    assert why(CTAcquisition(views=34), 128 * CALIBRATION_RANGE) is None  # within 1.5x
    assert why(CTAcquisition(views=16), 100) is None
    assert "views is 8 here" in why(CTAcquisition(views=8))
    assert "image_px is 512 here" in why(CTAcquisition(views=23), 512)
    assert "image_px is 64 here" in why(CTAcquisition(views=23), 64)
    # anything but views / acceleration / size must match exactly, also when close
    assert "photons is 100000.0 here" in why(CTAcquisition(views=23, photons=1e5))
    assert "noise is 0.01 here" in why(CTAcquisition(views=23, noise=0.01))
    assert "limited_angle is 150" in why(CTAcquisition(views=23, limited_angle=150))
    assert "geometry is fan here" in why(CTAcquisition(views=23, geometry="fan"))
    # settings that describe() lists only away from their defaults count as unset in the fit
    assert "simulate_finer is 2 here, unset in the fit" in why(CTAcquisition(views=23, simulate_finer=2))
    assert "units is hu here" in why(CTAcquisition(views=23, units="hu"))
    # measured data are not simulated data; a measured run without --views has views unset
    measured = {**fitted, "measured": True}
    assert "measured is True here" in calibration_applies(entry, measured)
    assert "views is not set here" in calibration_applies(entry, {**fitted, "views": None})
    # a fitted value of 0 matches 0
    zero = {"scale": 2.0, "conditions": {**fitted, "noise": 0.0}}
    assert calibration_applies(zero, {**fitted, "noise": 0.0}) is None
    # another task's settings never match
    assert calibration_applies(entry, calibration_conditions(MRIAcquisition(mask="equispaced", accel=4), img))
    assert calibration_applies({"scale": 3.0}, {"views": 8, "image_px": 512}) is None  # older metadata: no conditions


def test_bench_calibration_records_the_settings_of_its_fit(tmp_path):
    from recon.acquisition import CTAcquisition
    from recon.bench_calibration import _cases, run_calibration
    from recon.execute import calibration_applies, calibration_conditions

    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "a.npy", _phantom())
    np.save(data / "b.npy", np.flipud(_phantom()).copy())
    cases = _cases(str(data), [0, 1])
    acq = CTAcquisition(views=8)
    res = run_calibration("ct", acq, cases[:1], cases[1:], str(_tiny_prior_file(tmp_path)), k=2, size=16,
                          log=lambda m: None)
    assert res["conditions"] == calibration_conditions(acq, np.zeros((16, 16)))
    entry = {"scale": res["scale_fitted_on_tune"], "conditions": res["conditions"]}
    assert calibration_applies(entry, calibration_conditions(acq, np.zeros((16, 16)))) is None
    assert calibration_applies(entry, calibration_conditions(CTAcquisition(views=23), np.zeros((16, 16))))


def test_the_shipped_ct_calibration_records_where_it_was_fitted():
    from recon.acquisition import CTAcquisition
    from recon.execute import calibration_applies, calibration_conditions
    from recon.prior import load_prior

    entry = load_prior("ct").meta["std_calibration"]["ct"]["score-fast"]
    assert entry["conditions"]["views"] == 23 and entry["conditions"]["image_px"] == 128
    assert calibration_applies(entry, calibration_conditions(CTAcquisition(views=23), np.zeros((128, 128)))) is None
    assert calibration_applies(entry, calibration_conditions(CTAcquisition(views=8), np.zeros((512, 512))))


def test_openmp_threads_wait_passively_unless_the_user_says_otherwise():
    """Spinning OpenMP threads fight other processes on a shared node (README "Busy machines")."""
    import os
    import subprocess
    import sys

    code = ("import os, sys; from recon.cli import main; main(['methods']); "
            "print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules, file=sys.stderr)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.stderr.strip().splitlines()[-1] == "PASSIVE True"
    r = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, capture_output=True,
                       text=True, timeout=120)
    assert r.stderr.strip().splitlines()[-1] == "ACTIVE True"


def test_ct_simulate_finer_records_the_simulation_and_refuses_fan_and_measured(phantom, tmp_path, capsys):
    rc, _ = _run(["ct", phantom, "--views", 8, "--simulate-finer", 2, "--method", "tv", "--param", "n_iter=50",
                  "--out", tmp_path / "f"], capsys)
    assert rc == 0
    run = json.loads((tmp_path / "f" / "run.json").read_text())
    assert run["measurement"]["simulated_with"].startswith("FinerGridProjection(factor=2")
    rc, _ = _run(["ct", phantom, "--views", 8, "--method", "tv", "--param", "n_iter=50", "--out", tmp_path / "m"],
                 capsys)
    matched = json.loads((tmp_path / "m" / "run.json").read_text())
    assert "simulated_with" not in matched["measurement"]
    mf, mm = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("f", "m"))
    assert mf["psnr"] != mm["psnr"]  # other data, same reconstruction operator
    rc, err = _run(["ct", phantom, "--views", 8, "--simulate-finer", 2, "--geometry", "fan", "--method", "fbp",
                    "--out", tmp_path / "fan"], capsys)
    assert rc == 2 and "--simulate-finer" in err and not (tmp_path / "fan").exists()
