"""Whole studies (recon.volume): every slice of a series, streamed, resumable, written back."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from recon.cli import main
from recon.errors import ReconError
from recon.volume import parse_slices, plan_batches, slice_seed, volume_metrics

CT_SMALL = get_testdata_file("CT_small.dcm")


def _phantom_hu(n: int, k: int) -> np.ndarray:
    """Slice k of a head-like phantom in HU: air, a 'brain' disc of 40 HU, a 'skull' ring at 1800 HU
    (beyond the default +1000 window) and a bright dot of 3000 HU whose position moves with k."""
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    r = np.hypot(yy, xx)
    img = np.full((n, n), -1000.0)
    img[r < 0.42 * n] = 1800.0
    img[r < 0.36 * n] = 40.0
    img[np.hypot(yy - 4 + k, xx + 5) < 3] = 3000.0
    return img


def write_series(folder: Path, n_slices: int, size: int = 32, dz: float = 2.5) -> list[pydicom.Dataset]:
    """A synthetic CT series (one file per slice, shuffled names) with real geometry."""
    folder.mkdir(parents=True)
    series_uid, out = generate_uid(), []
    for k in range(n_slices):
        ds = pydicom.dcmread(CT_SMALL)
        ds.Rows = ds.Columns = size
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-40.0, -30.0, 100.0 + dz * k]
        ds.PixelSpacing = [0.8, 0.8]
        ds.SliceThickness = dz
        ds.InstanceNumber = n_slices - k  # instance numbers reversed: the reader must sort by position
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = (np.round(_phantom_hu(size, k)) + 1024).astype(np.int16).tobytes()
        ds.save_as(folder / f"z{(7 * k) % n_slices:03d}.dcm")
        out.append(ds)
    return out


def _run(*args):
    return main(["ct", *map(str, args), "--quiet"])


# -- slice ranges and batches -------------------------------------------------------------------------
def test_parse_slices_and_batches():
    assert parse_slices(None, 30) == (0, 30)
    assert parse_slices("all", 30) == (0, 30)
    assert parse_slices("5:9", 30) == (5, 9)
    assert parse_slices(":3", 30) == (0, 3)
    assert parse_slices("-4:", 30) == (26, 30)
    assert parse_slices("7", 30) == (7, 8)
    for bad in ("9:5", "0:31", "x", "3:3"):
        with pytest.raises(ReconError, match="--slices"):
            parse_slices(bad, 30)
    assert plan_batches(0, 10, 4) == [(0, 4, 0, 4), (4, 8, 4, 8), (8, 10, 8, 10)]
    assert plan_batches(3, 10, 4, halo=2) == [(3, 7, 3, 9), (7, 10, 5, 10)]
    assert len({slice_seed(0, k) for k in range(100)}) == 100 and slice_seed(1, 0) != slice_seed(0, 0)


def test_volume_metrics_reformats_see_stripes():
    rng = np.random.default_rng(0)
    ref = np.clip(rng.normal(0.5, 0.02, (12, 24, 24)), 0, 1)
    smooth = ref + 0.01
    striped = ref + 0.01 * np.where(np.arange(12) % 2, 1, -1)[:, None, None]  # same error energy, alternating in z
    ms, mz = volume_metrics(smooth, ref), volume_metrics(striped, ref)
    assert ms["psnr"] == pytest.approx(mz["psnr"], abs=1e-6)
    assert mz["ssim_coronal"] < ms["ssim_coronal"] - 0.01 and mz["ssim_sagittal"] < ms["ssim_sagittal"] - 0.01
    assert len(ms["per_slice"]) == 12


# -- a synthetic series round-trips through every output -----------------------------------------------
@pytest.mark.parametrize("n_slices", [2, 3])
def test_series_roundtrip_every_output(tmp_path, n_slices):
    src = write_series(tmp_path / "series", n_slices)
    out = tmp_path / "out"
    assert _run(tmp_path / "series", "--views", 90, "--method", "fbp", "--out", out) == 0
    rec = json.loads((out / "run.json").read_text())
    assert rec["slices"]["count"] == n_slices and rec["working_size"] == [32, 32]
    files = sorted((out / "dicom").glob("*.dcm"))
    assert len(files) == n_slices
    derived = [pydicom.dcmread(f) for f in files]
    assert [int(d.InstanceNumber) for d in derived] == list(range(1, n_slices + 1))
    assert len({d.SeriesInstanceUID for d in derived}) == 1
    for k, d in enumerate(derived):  # slice k of the output is slice k of the (position-sorted) source
        assert [float(v) for v in d.ImagePositionPatient] == pytest.approx([-40.0, -30.0, 100.0 + 2.5 * k])
        assert float(d.SliceLocation) == pytest.approx(100.0 + 2.5 * k)
        (item,) = d.SourceImageSequence
        assert item.ReferencedSOPInstanceUID == src[k].SOPInstanceUID
        hu = d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)
        assert hu.max() > 1500, "HU above +1000 must not be clipped"  # skull 1800 HU, dot 3000 HU
        assert hu.min() >= -1000
    # NIfTI volume: the same values, and the affine of the source series
    nii = nib.load(out / "recon.nii.gz")
    assert nii.shape == (32, 32, n_slices)
    from recon.io import read_input

    vol = read_input(tmp_path / "series")
    np.testing.assert_allclose(nii.affine, vol.affine, atol=1e-4)
    back = read_input(out / "recon.nii.gz")
    dic = read_input(out / "dicom")
    np.testing.assert_allclose(back.data, dic.data, atol=0.51)
    assert np.abs(back.data - vol.data).mean() < 200  # 90-view FBP of the phantom, in HU
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["per_slice"]) == n_slices
    assert {"rmse_hu", "psnr_brain", "ssim_brain", "psnr_soft_tissue", "psnr_lung"} <= set(m)
    csv = (out / "metrics_slices.csv").read_text().splitlines()
    assert csv[0] == "slice,psnr,ssim,nmse,seconds" and len(csv) == n_slices + 1
    assert (out / "coronal.png").is_file() and (out / "sagittal.png").is_file()
    assert not list(out.glob(".recon-parts-*")), "finished studies leave no parts behind"


def test_nifti_volume_keeps_its_affine_and_slices_range(tmp_path):
    data = np.stack([_phantom_hu(24, k) for k in range(5)]).astype(np.float32)
    affine = np.array([[0.7, 0, 0, -10], [0, 0.7, 0, 5], [0, 0, 3.0, 20], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.transpose(data, (2, 1, 0)), affine), tmp_path / "v.nii.gz")
    out = tmp_path / "out"
    assert _run(tmp_path / "v.nii.gz", "--views", 60, "--method", "fbp", "--slices", "1:4", "--out", out) == 0
    nii = nib.load(out / "recon.nii.gz")
    assert nii.shape == (24, 24, 3)
    expected = affine.copy()
    expected[:3, 3] += affine[:3, 2] * 1  # the output starts at slice 1
    np.testing.assert_allclose(nii.affine, expected, atol=1e-5)
    assert np.asarray(nii.dataobj).max() > 1500
    assert json.loads((out / "run.json").read_text())["options"]["slices"] == "1:4"


def test_slice_and_slices_together_are_refused(tmp_path, capsys):
    write_series(tmp_path / "s", 3)
    assert _run(tmp_path / "s", "--views", 30, "--method", "fbp", "--slice", 1, "--slices", "0:2",
                "--out", tmp_path / "o") == 2
    assert "--slice" in capsys.readouterr().err
    assert _run(tmp_path / "s", "--views", 30, "--method", "fbp", "--slices", "2:9", "--out", tmp_path / "o") == 2


def test_one_slice_of_a_series_is_the_single_slice_path(tmp_path):
    write_series(tmp_path / "s", 3)
    assert _run(tmp_path / "s", "--views", 30, "--method", "fbp", "--slice", 1, "--out", tmp_path / "o") == 0
    rec = json.loads((tmp_path / "o" / "run.json").read_text())
    assert "slices" not in rec and rec["input_slice"] == 1


def test_volume_slices_equal_single_slice_runs_noise_free(tmp_path):
    write_series(tmp_path / "s", 3)
    assert _run(tmp_path / "s", "--views", 40, "--method", "sirt", "--param", "n_iter=20", "--out", tmp_path / "v",
                "--batch-slices", 2) == 0
    from recon.io import read_input

    vol = read_input(tmp_path / "v" / "dicom").data
    for k in range(3):
        assert _run(tmp_path / "s", "--views", 40, "--method", "sirt", "--param", "n_iter=20", "--slice", k,
                    "--out", tmp_path / f"s{k}") == 0
        one = read_input(tmp_path / f"s{k}" / "dicom").data[0]
        np.testing.assert_allclose(vol[k], one, atol=1.01)  # integer-HU rounding only


# -- a killed run resumes from its finished slices -------------------------------------------------------
def test_killed_run_resumes_without_recomputing(tmp_path, monkeypatch):
    import recon.execute as execute

    write_series(tmp_path / "s", 5)
    real = execute.run_method
    calls = []

    def dying(run, meas, **kw):
        calls.append(meas.y.shape[0])
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if killed during the third batch
        return real(run, meas, **kw)

    monkeypatch.setattr(execute, "run_method", dying)
    out = tmp_path / "out"
    assert _run(tmp_path / "s", "--views", 30, "--method", "fbp", "--batch-slices", 1, "--out", out) != 0
    parts = list(out.glob(".recon-parts-*/slice-*.npz"))
    assert len(parts) == 2 and not (out / "run.json").exists()
    calls.clear()
    monkeypatch.setattr(execute, "run_method", lambda run, meas, **kw: (calls.append(meas.y.shape[0]),
                                                                        real(run, meas, **kw))[1])
    assert _run(tmp_path / "s", "--views", 30, "--method", "fbp", "--batch-slices", 1, "--out", out) == 0
    assert calls == [1, 1, 1], "only the three unfinished slices are recomputed"
    rec = json.loads((out / "run.json").read_text())
    assert rec["slices"]["resumed"] == 2
    assert len(list((out / "dicom").glob("*.dcm"))) == 5
    assert not list(out.glob(".recon-parts-*"))
    # the resumed result equals an uninterrupted run
    monkeypatch.setattr(execute, "run_method", real)
    assert _run(tmp_path / "s", "--views", 30, "--method", "fbp", "--batch-slices", 1, "--out", tmp_path / "ref") == 0
    from recon.io import read_input

    np.testing.assert_array_equal(read_input(out / "recon.nii.gz").data, read_input(tmp_path / "ref" / "recon.nii.gz").data)


def test_changed_settings_do_not_reuse_parts(tmp_path):
    write_series(tmp_path / "s", 3)
    out = tmp_path / "out"
    from recon.volume import PartStore

    store = PartStore(out, "deadbeefdeadbeef")
    store.save(0, np.zeros((32, 32)), None, 1.0, None)  # a stale part from other settings
    assert _run(tmp_path / "s", "--views", 30, "--method", "fbp", "--out", out) == 0
    assert json.loads((out / "run.json").read_text())["slices"]["resumed"] == 0


def test_noisy_volume_slices_get_their_own_noise(tmp_path):
    write_series(tmp_path / "s", 2)
    assert _run(tmp_path / "s", "--views", 30, "--photons", "1e4", "--method", "fbp", "--out", tmp_path / "o") == 0
    sino = np.load(tmp_path / "o" / "sinogram.npy")
    assert sino.shape[0] == 2
    # same phantom except the dot: the noise must differ between slices (not one realisation reused)
    assert not np.allclose(sino[0] - sino[1], 0)


def test_samples_write_a_std_series(tmp_path):
    import tests.test_cli as tc

    prior = tc._tiny_prior_file(tmp_path, size=16)
    write_series(tmp_path / "s", 2, size=16)
    out = tmp_path / "o"
    assert _run(tmp_path / "s", "--views", 20, "--method", "score-fast", "--prior", prior, "--param", "n_steps=3",
                "--samples", 2, "--out", out) == 0
    std_files = sorted((out / "dicom_std").glob("*.dcm"))
    assert len(std_files) == 2
    d = pydicom.dcmread(std_files[0])
    assert "std" in d.SeriesDescription
    assert d.SeriesInstanceUID != pydicom.dcmread(sorted((out / "dicom").glob("*.dcm"))[0]).SeriesInstanceUID
    assert nib.load(out / "std.nii.gz").shape == (16, 16, 2)


# -- scanner geometry from the DICOM header --------------------------------------------------------------
def test_fan_beam_geometry_from_scanner_tags(tmp_path):
    write_series(tmp_path / "s", 1)
    for f in (tmp_path / "s").glob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.DistanceSourceToPatient, ds.DistanceSourceToDetector = 541.0, 949.0
        ds.save_as(f)
    fov = 0.8 * 32  # PixelSpacing x columns
    assert _run(tmp_path / "s", "--views", 30, "--geometry", "fan", "--method", "fbp", "--out", tmp_path / "a") == 0
    rec = json.loads((tmp_path / "a" / "run.json").read_text())
    assert rec["options"]["source_distance"] == pytest.approx(541.0 / fov)
    assert rec["options"]["detector_distance"] == pytest.approx(949.0 / fov)
    assert "DICOM tags" in rec["geometry"]
    # explicit distances win; parallel beam ignores the tags
    assert _run(tmp_path / "s", "--views", 30, "--geometry", "fan", "--source-distance", 3, "--detector-distance", 5,
                "--method", "fbp", "--out", tmp_path / "b") == 0
    rec = json.loads((tmp_path / "b" / "run.json").read_text())
    assert (rec["options"]["source_distance"], rec["options"]["detector_distance"]) == (3.0, 5.0)
    assert _run(tmp_path / "s", "--views", 30, "--method", "fbp", "--out", tmp_path / "c") == 0
    assert json.loads((tmp_path / "c" / "run.json").read_text())["geometry"] is None


def test_fan_beam_without_tags_uses_the_documented_defaults(tmp_path):
    write_series(tmp_path / "s", 1)
    for f in (tmp_path / "s").glob("*.dcm"):
        ds = pydicom.dcmread(f)
        for kw in ("DistanceSourceToPatient", "DistanceSourceToDetector"):
            if kw in ds:
                delattr(ds, kw)
        ds.save_as(f)
    assert _run(tmp_path / "s", "--views", 30, "--geometry", "fan", "--method", "fbp", "--out", tmp_path / "a") == 0
    rec = json.loads((tmp_path / "a" / "run.json").read_text())
    assert rec["options"]["source_distance"] is None and "default distances" in rec["geometry"]


# -- the input's own matrix: nothing cropped --------------------------------------------------------------
@pytest.mark.parametrize("task,extra", [("mri", ["--mask", "equispaced", "--accel", "4", "--method", "zero-filled"]),
                                        ("inpaint", ["--mask", "box", "--method", "biharmonic"])])
def test_non_square_inputs_keep_their_matrix(tmp_path, task, extra):
    rng = np.random.default_rng(0)
    data = np.abs(rng.normal(100, 10, (2, 40, 28))).astype(np.float32)  # 2 slices of 40 x 28
    affine = np.diag([0.9, 0.8, 4.0, 1.0])
    nib.save(nib.Nifti1Image(np.transpose(data, (2, 1, 0)), affine), tmp_path / "v.nii.gz")
    out = tmp_path / "o"
    assert main([task, str(tmp_path / "v.nii.gz"), *extra, "--out", str(out), "--quiet"]) == 0
    rec = json.loads((out / "run.json").read_text())
    assert rec["working_size"] == [40, 28] and rec["crop"] == [0, 0, 40, 28]
    nii = nib.load(out / "recon.nii.gz")
    assert nii.shape == (28, 40, 2)
    np.testing.assert_allclose(nii.affine, affine, atol=1e-6)
    # --size still gives the centred square, resized
    assert main([task, str(tmp_path / "v.nii.gz"), *extra, "--size", "16", "--slice", "0", "--out",
                 str(tmp_path / "s"), "--quiet"]) == 0
    assert json.loads((tmp_path / "s" / "run.json").read_text())["working_size"] == [16, 16]


def test_bench_volumes_tables_figure_and_reuse(tmp_path):
    from recon.bench_volumes import bench_volumes, parse_method_spec

    assert parse_method_spec("score-fast:z_weight=0.05;n_steps=50") == ("score-fast", {"z_weight": 0.05, "n_steps": 50})
    write_series(tmp_path / "s", 8, size=24)
    out = tmp_path / "b"
    res = bench_volumes(str(tmp_path), [str(tmp_path / "s")], [12], ["fbp", "tv:n_iter=20"], out, size=None,
                        log=lambda m: None)
    rows = res["rows"]
    assert [r["method"] for r in rows] == ["fbp", "tv:n_iter=20"] and all(r["slices"] == 8 for r in rows)
    assert all(r["ssim_coronal"] is not None and r["rmse_hu"] > 0 for r in rows)
    assert (out / "s-12v.png").is_file() and "| fbp |" in (out / "volumes.md").read_text()
    stamp = (out / "s" / "12v" / "fbp" / "run.json").stat().st_mtime_ns
    bench_volumes(str(tmp_path), [str(tmp_path / "s")], [12], ["fbp"], out, size=None, log=lambda m: None)
    assert (out / "s" / "12v" / "fbp" / "run.json").stat().st_mtime_ns == stamp, "finished methods are reused"


def test_manifest_per_study_and_per_slice_range(tmp_path):
    write_series(tmp_path / "a", 3)
    write_series(tmp_path / "b", 4)
    (tmp_path / "m.txt").write_text("a\nb --slices 1:3  # only two slices of b\n")
    out = tmp_path / "out"
    argv = ["--manifest", tmp_path / "m.txt", "--views", 20, "--method", "fbp", "--out", out]
    assert _run(*argv) == 0
    recs = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/run.json")}
    assert set(recs) == {"0000_a", "0001_b_slices-1-3"}
    assert recs["0000_a"]["slices"]["count"] == 3 and recs["0001_b_slices-1-3"]["slices"]["count"] == 2
    assert len((out / "metrics.csv").read_text().splitlines()) == 3
    assert _run(*argv) == 0  # everything done: both skipped
    shard = json.loads((out / "shard-0-of-1.json").read_text())
    assert shard["skipped"] == ["0000_a", "0001_b_slices-1-3"] and shard["done"] == []


def test_default_coupling_scales_with_slice_spacing_and_warns_far_beyond(tmp_path, capsys):
    from recon.baselines import TV3D_Z_WEIGHT

    write_series(tmp_path / "s", 3, dz=20.0)  # 20 mm slices, 0.8 mm pixels: far beyond the measured geometry
    assert _run(tmp_path / "s", "--views", 20, "--method", "tv3d", "--param", "n_iter=5", "--out", tmp_path / "a") == 0
    assert "over-smooth" in capsys.readouterr().err
    rec = json.loads((tmp_path / "a" / "run.json").read_text())
    assert rec["slices"]["z_aspect"] == pytest.approx(20.0 / 0.8) and rec["slices"]["couples_slices"]
    # the default per mm of z: 2 mm / 20 mm of the tuned weight, and the method ran with it
    assert rec["slice_coupling"]["z_weight"] == pytest.approx(TV3D_Z_WEIGHT * 2.0 / 20.0)
    assert rec["method"]["options"]["z_weight"] == pytest.approx(TV3D_Z_WEIGHT * 2.0 / 20.0)
    assert _run(tmp_path / "s", "--views", 20, "--method", "tv3d", "--param", "n_iter=5", "--param", "z_weight=1",
                "--out", tmp_path / "b") == 0
    assert "over-smooth" not in capsys.readouterr().err
    rec = json.loads((tmp_path / "b" / "run.json").read_text())
    assert rec["slice_coupling"] == {"z_weight": 1.0, "from": "set by the user"}
    write_series(tmp_path / "t", 3, dz=4.0)  # 4 mm, aspect 5: within the measured range, no warning
    assert _run(tmp_path / "t", "--views", 20, "--method", "tv3d", "--param", "n_iter=5", "--out", tmp_path / "c") == 0
    assert "over-smooth" not in capsys.readouterr().err
    rec = json.loads((tmp_path / "c" / "run.json").read_text())
    assert rec["slice_coupling"]["z_weight"] == pytest.approx(TV3D_Z_WEIGHT / 2)


def test_default_z_weight_rule():
    from recon.execute import plan_methods
    from recon.score_methods import SCORE_FAST_Z_WEIGHT
    from recon.tasks import TASKS
    from recon.volume import default_z_weight

    task = TASKS["ct"]
    (run,) = plan_methods(["score-fast"], task, {})
    for spacing in (None, 0.0):  # unknown: the method's own default, not scaled
        r, rec = default_z_weight(run, spacing)
        assert r is run and rec["z_weight"] == SCORE_FAST_Z_WEIGHT and "unknown" in rec["from"]
    for spacing, want in ((1.0, 1.0), (2.0, 1.0), (4.0, 0.5), (8.0, 0.25)):
        r, rec = default_z_weight(run, spacing)
        assert r.options["z_weight"] == pytest.approx(SCORE_FAST_Z_WEIGHT * want), spacing
        assert rec["z_weight"] == r.options["z_weight"]
    assert "z_weight" not in run.options  # the planned run itself is not changed
    (user,) = plan_methods(["score-fast"], task, {None: {"z_weight": 3e-4}})
    assert default_z_weight(user, 8.0)[0].options["z_weight"] == 3e-4
    (off,) = plan_methods(["score-fast"], task, {None: {"z_weight": 0}})
    (tv,) = plan_methods(["tv"], task, {})
    assert default_z_weight(off, 8.0) == (off, None) and default_z_weight(tv, 8.0) == (tv, None)


def test_which_methods_couple_slices():
    from recon.execute import plan_methods
    from recon.tasks import TASKS
    from recon.volume import couples_slices

    def coupled(name, **params):
        (run,) = plan_methods([name], TASKS["ct"], {None: params} if params else {})
        return couples_slices(run)

    assert coupled("tv3d") and coupled("score-fast") and coupled("tv", z_weight=2.0)
    assert not coupled("tv") and not coupled("fbp") and not coupled("score-fast", z_weight=0.0)
