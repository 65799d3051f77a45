"""Measured multi-slice data as a whole study (recon.measured_volume, issue #11): a sinogram stack
(slices, views, detectors) and multi-slice k-space are streamed slice by slice, batched (CT),
resumable, and written like image studies.

Synthetic data only: 32 px disc phantoms projected with the repo's own operator, 3 slices.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from forward_models import ParallelBeamCT, view_angles
from recon.cli import main
from recon.io import image_to_kspace, read_input

N = 32
VIEWS = 60


def _discs(k: int, n: int = N) -> np.ndarray:
    """Slice k: two off-centre discs that move with k (so slices differ and a mix-up shows)."""
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    s = n / 32
    img = 0.6 * (((xx - (4 + k) * s) ** 2 + (yy + 3 * s) ** 2) <= (8 * s) ** 2)
    img = img + 1.0 * (((xx + 8 * s) ** 2 + (yy - (7 - k) * s) ** 2) <= (3 * s) ** 2)
    return img.astype(np.float32)


def _sinograms(path, n_slices: int = 3, n: int = N, views: int = VIEWS) -> np.ndarray:
    """A (slices, views, detectors) stack projected with the repo's parallel-beam operator."""
    x = torch.from_numpy(np.stack([_discs(k, n) for k in range(n_slices)]))
    y = ParallelBeamCT(n, view_angles(views, 180)).A(x).numpy()
    np.save(path, y)
    return y


def _run(argv, capsys):
    rc = main([str(a) for a in argv] + ["--device", "cpu", "--quiet"])
    return rc, capsys.readouterr().err


def _ct(tmp_path, out, *extra):
    return ["ct", "--sinogram", tmp_path / "sino.npy", "--size", N, "--views", 20, *extra, "--out", tmp_path / out]


def _volume(folder) -> np.ndarray:
    return read_input(folder / "recon.nii.gz").data


# ---------------------------------------------------------------------------
# CT: a sinogram stack
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", [["fbp"], ["tv", "--param", "n_iter=60"]])
def test_sinogram_stack_equals_single_slice_runs_with_volume_metrics(method, tmp_path, capsys):
    _sinograms(tmp_path / "sino.npy")
    rc, err = _run(_ct(tmp_path, "v", "--method", *method, "--reference", "full", "--batch-slices", 2), capsys)
    assert rc == 0, err
    out = tmp_path / "v"
    vol = _volume(out)
    assert vol.shape == (3, N, N)
    for name in ("recon.png", "coronal.png", "sagittal.png", "metrics.json", "metrics_slices.csv", "run.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".recon-parts-*")), "parts are removed once the study is complete"
    for k in range(3):  # every slice is what `--slice k` (the single-slice path) gives
        rc, err = _run(_ct(tmp_path, f"s{k}", "--method", *method, "--slice", k), capsys)
        assert rc == 0, err
        np.testing.assert_allclose(vol[k], _volume(tmp_path / f"s{k}")[0], atol=1e-2)  # HU
        assert json.loads((tmp_path / f"s{k}" / "run.json").read_text())["measurement"]["slice"] == k
    # the slices really differ, and sit where they should: slice k is nearest to phantom k
    hu01 = (vol + 1000) / 2000
    for k in range(3):
        errs = [np.mean((hu01[k] - _discs(j)) ** 2) for j in range(3)]
        assert int(np.argmin(errs)) == k
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["per_slice"]) == 3 and metrics["slices"] == [0, 3]
    assert metrics["psnr"] > 25 and "all 60 measured views" in metrics["reference"]  # fbp 30.4 dB, tv 35 dB
    rows = (out / "metrics_slices.csv").read_text().splitlines()
    assert rows[0] == "slice,psnr,ssim,nmse,seconds" and [r.split(",")[0] for r in rows[1:]] == ["0", "1", "2"]
    rec = json.loads((out / "run.json").read_text())
    assert rec["slices"]["count"] == 3 and rec["slices"]["in_file"] == 3 and rec["slices"]["resumed"] == 0
    assert rec["slices"]["batch"] == 2 and rec["units"] == "HU"
    assert rec["measurement"]["slice"] == 0 and rec["measurement"]["views"] == 20
    assert len(rec["measurement_per_slice"]) == 3 and all("seconds" in r for r in rec["measurement_per_slice"])
    assert rec["metrics"]["psnr"] == pytest.approx(metrics["psnr"])
    assert "memory-mapped" in rec["slices"]["read"] and "slice spacing unknown: 1" in rec["affine_note"]


def test_slices_range_reconstructs_only_those(tmp_path, capsys):
    _sinograms(tmp_path / "sino.npy")
    assert _run(_ct(tmp_path, "all", "--method", "fbp"), capsys)[0] == 0
    rc, err = _run(_ct(tmp_path, "part", "--method", "fbp", "--slices", "1:3", "--reference", "full"), capsys)
    assert rc == 0, err
    part = _volume(tmp_path / "part")
    assert part.shape == (2, N, N)
    np.testing.assert_allclose(part, _volume(tmp_path / "all")[1:3], atol=1e-3)
    rows = (tmp_path / "part" / "metrics_slices.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["1", "2"]
    rec = json.loads((tmp_path / "part" / "run.json").read_text())
    assert rec["slices"]["start"] == 1 and rec["slices"]["count"] == 2 and rec["options"]["slices"] == "1:3"
    # one slice of the stack through --slices is the single-slice path
    assert _run(_ct(tmp_path, "one", "--method", "fbp", "--slices", "2:3"), capsys)[0] == 0
    assert json.loads((tmp_path / "one" / "run.json").read_text())["options"]["slice"] == 2


def test_stack_is_streamed_never_read_whole(tmp_path, capsys, monkeypatch):
    import recon.io

    sino = tmp_path / "sino.npy"
    _sinograms(sino)
    real = recon.io.read_npy

    def guarded(path):
        assert str(path) != str(sino), "the sinogram stack must be memory-mapped, not read whole"
        return real(path)

    monkeypatch.setattr(recon.io, "read_npy", guarded)
    loads = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, **kw: (loads.append(kw.get("mmap_mode")), real_load(*a, **kw))[1])
    rc, err = _run(_ct(tmp_path, "v", "--method", "fbp"), capsys)
    assert rc == 0, err
    assert "r" in loads


def test_killed_run_resumes_without_recomputing(tmp_path, capsys, monkeypatch):
    import recon.execute as execute

    _sinograms(tmp_path / "sino.npy")
    real = execute.run_method
    calls = []

    def dying(run, meas, **kw):
        calls.append(meas.y.shape[0])
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed during the second batch
        return real(run, meas, **kw)

    monkeypatch.setattr(execute, "run_method", dying)
    argv = _ct(tmp_path, "out", "--method", "tv", "--param", "n_iter=30", "--batch-slices", 1, "--reference", "full")
    assert _run(argv, capsys)[0] != 0
    out = tmp_path / "out"
    assert len(list(out.glob(".recon-parts-*/slice-*.npz"))) == 1 and not (out / "run.json").exists()
    calls.clear()
    monkeypatch.setattr(execute, "run_method", lambda run, meas, **kw: (calls.append(meas.y.shape[0]),
                                                                        real(run, meas, **kw))[1])
    rc, err = _run(argv, capsys)
    assert rc == 0, err
    assert calls == [1, 1], "only the two unfinished slices are recomputed"
    rec = json.loads((out / "run.json").read_text())
    assert rec["slices"]["resumed"] == 1 and rec["slices"]["done_this_run"] == 2
    assert rec["metrics"] is not None and len(rec["measurement_per_slice"]) == 3  # the resumed slice's too
    assert not list(out.glob(".recon-parts-*"))
    monkeypatch.setattr(execute, "run_method", real)
    assert _run(argv[:-1] + [tmp_path / "ref"], capsys)[0] == 0
    np.testing.assert_array_equal(_volume(out), _volume(tmp_path / "ref"))


def test_changed_measured_file_does_not_reuse_parts(tmp_path, capsys, monkeypatch):
    import recon.execute as execute

    y = _sinograms(tmp_path / "sino.npy")
    real = execute.run_method
    calls = []

    def dying(run, meas, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(run, meas, **kw)

    monkeypatch.setattr(execute, "run_method", dying)
    argv = _ct(tmp_path, "out", "--method", "fbp", "--batch-slices", 1)
    assert _run(argv, capsys)[0] != 0
    np.save(tmp_path / "sino.npy", y[::-1].copy())  # other data under the same name
    monkeypatch.setattr(execute, "run_method", real)
    assert _run(argv, capsys)[0] == 0
    assert json.loads((tmp_path / "out" / "run.json").read_text())["slices"]["resumed"] == 0


@pytest.mark.parametrize("method", [["tv3d", "--param", "n_iter=20"], ["tv", "--param", "n_iter=20", "--param",
                                                                      "z_weight=2"]])
def test_coupled_method_runs_batches_with_halo(method, tmp_path, capsys, monkeypatch):
    import recon.execute as execute

    _sinograms(tmp_path / "sino.npy", n_slices=5)
    real = execute.run_method
    calls = []
    monkeypatch.setattr(execute, "run_method", lambda run, meas, **kw: (calls.append(meas.y.shape[0]),
                                                                        real(run, meas, **kw))[1])
    rc, err = _run(_ct(tmp_path, "v", "--method", *method, "--batch-slices", 2), capsys)
    assert rc == 0, err
    # batches [0,2) [2,4) [4,5), each with up to 2 halo slices per side inside the 5 slices
    assert calls == [4, 5, 3]
    rec = json.loads((tmp_path / "v" / "run.json").read_text())
    assert rec["slices"]["halo"] == 2 and rec["slices"]["couples_slices"] is True
    assert rec["slice_coupling"].startswith("on:")
    assert _volume(tmp_path / "v").shape == (5, N, N)


def test_score_method_on_a_sinogram_stack(tmp_path, capsys):
    import tests.test_cli as tc

    prior = tc._tiny_prior_file(tmp_path, size=16)
    _sinograms(tmp_path / "sino.npy", n=16, views=30)
    rc, err = _run(["ct", "--sinogram", tmp_path / "sino.npy", "--size", 16, "--views", 10, "--method", "score-fast",
                    "--prior", prior, "--param", "n_steps=3", "--out", tmp_path / "s"], capsys)
    assert rc == 0, err
    rec = json.loads((tmp_path / "s" / "run.json").read_text())
    assert rec["slices"]["couples_slices"] is True and rec["slices"]["halo"] == 2  # z_weight > 0 by default
    assert rec["prior"] == str(prior) and _volume(tmp_path / "s").shape == (3, 16, 16)


def test_affine_from_fov_and_slice_spacing(tmp_path, capsys):
    import nibabel as nib

    _sinograms(tmp_path / "sino.npy")
    rc, err = _run(_ct(tmp_path, "v", "--method", "fbp", "--fov", 64, "--slice-spacing", 2.5), capsys)
    assert rc == 0, err
    assert nib.load(tmp_path / "v" / "recon.nii.gz").header.get_zooms() == pytest.approx((2.0, 2.0, 2.5))
    rec = json.loads((tmp_path / "v" / "run.json").read_text())
    assert rec["pixel_mm"] == 2.0 and rec["slice_spacing_mm"] == 2.5


def test_slice_spacing_scales_the_default_coupling(tmp_path, capsys):
    from recon.baselines import TV3D_Z_WEIGHT

    _sinograms(tmp_path / "sino.npy")
    rc, err = _run(_ct(tmp_path, "v", "--method", "tv3d", "--param", "n_iter=5", "--slice-spacing", 8), capsys)
    assert rc == 0, err
    rec = json.loads((tmp_path / "v" / "run.json").read_text())
    assert rec["method"]["options"]["z_weight"] == pytest.approx(TV3D_Z_WEIGHT * 2 / 8)  # per mm of z
    assert "2 / 8 mm" in rec["slice_coupling"]
    rc, err = _run(_ct(tmp_path, "w", "--method", "tv3d", "--param", "n_iter=5"), capsys)  # spacing unknown
    rec = json.loads((tmp_path / "w" / "run.json").read_text())
    assert rc == 0 and rec["method"]["options"].get("z_weight", TV3D_Z_WEIGHT) == TV3D_Z_WEIGHT


def test_counts_stack_with_shared_and_per_slice_flat(tmp_path, capsys):
    p = _sinograms(tmp_path / "p.npy") * 0.02  # line integrals (attenuation units)
    flat = np.full(p.shape[-1], 1e5)
    np.save(tmp_path / "flat_sino.npy", flat * np.exp(-p))
    np.save(tmp_path / "flat.npy", flat)
    # per-slice fields that differ (slice k: (k + 1) x brighter), so a field paired with the wrong slice shows
    flat3 = flat * np.arange(1, 4)[:, None, None]
    np.save(tmp_path / "flat3_sino.npy", flat3 * np.exp(-p))
    np.save(tmp_path / "flat3.npy", flat3)
    np.save(tmp_path / "att.npy", p)
    base = ["ct", "--size", N, "--views", 20, "--method", "fbp"]
    assert _run(base + ["--sinogram", tmp_path / "att.npy", "--sinogram-units", "attenuation", "--out",
                        tmp_path / "att"], capsys)[0] == 0
    for name in ("flat", "flat3"):
        rc, err = _run(base + ["--sinogram", tmp_path / f"{name}_sino.npy", "--flat", tmp_path / f"{name}.npy",
                               "--out", tmp_path / name], capsys)
        assert rc == 0, err
        np.testing.assert_allclose(_volume(tmp_path / name), _volume(tmp_path / "att"), atol=0.5)  # HU
        assert json.loads((tmp_path / name / "run.json").read_text())["measurement"]["prelog"]["entries"] > 0


# ---------------------------------------------------------------------------
# bad input: one clear error each, nothing written
# ---------------------------------------------------------------------------
def _bad_case(kind, tmp_path):
    y = _sinograms(tmp_path / "sino.npy")
    if kind == "4-D sinogram":
        np.save(tmp_path / "sino.npy", y[None])
        return [], "(1, 3, 60, 46)"
    if kind == "NaN in slice 1":
        y[1, 5, 7] = np.nan
        np.save(tmp_path / "sino.npy", y)
        return [], "slice 1"
    if kind == "--slices out of range":
        return ["--slices", "2:5"], "outside the input's 3 slice(s)"
    if kind == "flat of the wrong shape":
        np.save(tmp_path / "sino.npy", 1e5 * np.exp(-0.02 * y))
        np.save(tmp_path / "flat.npy", np.ones((2, 1, y.shape[-1])) * 1e5)
        return ["--flat", tmp_path / "flat.npy"], "one field for every slice"
    if kind == "--slices with --slice":
        return ["--slices", "0:2", "--slice", 1], "not both"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["4-D sinogram", "NaN in slice 1", "--slices out of range", "flat of the wrong shape",
                                  "--slices with --slice"])
def test_bad_stack_inputs_are_one_clear_error(kind, tmp_path, capsys):
    extra, needle = _bad_case(kind, tmp_path)
    rc, err = _run(_ct(tmp_path, "o", "--method", "fbp", *extra), capsys)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "error" in lines[0] and needle in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "o" / "recon.nii.gz").exists()


def test_slice_spacing_is_for_measured_data(tmp_path, capsys):
    np.save(tmp_path / "img.npy", _discs(0))
    rc, err = _run(["ct", tmp_path / "img.npy", "--views", 20, "--method", "fbp", "--slice-spacing", 2,
                    "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "--slice-spacing" in err


# ---------------------------------------------------------------------------
# MRI: multi-slice k-space
# ---------------------------------------------------------------------------
def _coil_kspace(n_slices: int = 3, n: int = N, coils: int = 4):
    """Fully sampled multi-coil k-space (slices, coils, H, W) of the disc phantoms, each slice at
    its own intensity (so the per-slice scale differs), with smooth complex coil maps."""
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    centres = [(-n / 2, -n / 2), (n / 2, -n / 2), (-n / 2, n / 2), (n / 2, n / 2)][:coils]
    sens = np.stack([np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (0.6 * n) ** 2)) *
                     np.exp(1j * 0.02 * (xx * cx + yy * cy)) for cx, cy in centres])
    imgs = np.stack([(1 + 0.5 * k) * (0.2 + _discs(k, n)) for k in range(n_slices)])
    k = np.stack([image_to_kspace(sens * img) for img in imgs]).astype(np.complex64)
    rss = np.sqrt((np.abs(sens[None] * imgs[:, None]) ** 2).sum(1)).astype(np.float32)
    return k, rss


def _mri(path, out, *extra):
    return ["mri", "--kspace", path, "--mask", "equispaced", "--accel", 2, *extra, "--out", out]


@pytest.mark.parametrize("method", [["zero-filled"], ["tv", "--param", "n_iter=40"]])
def test_multicoil_h5_kspace_volume_every_slice_independent(method, tmp_path, capsys):
    k, rss = _coil_kspace()
    with h5py.File(tmp_path / "k.h5", "w") as f:  # fastMRI layout
        f.create_dataset("kspace", data=k)
        f.create_dataset("reconstruction_rss", data=rss)
    rc, err = _run(_mri(tmp_path / "k.h5", tmp_path / "v", "--method", *method), capsys)
    assert rc == 0, err
    out = tmp_path / "v"
    vol = _volume(out)
    assert vol.shape == (3, N, N)
    rec = json.loads((out / "run.json").read_text())
    assert rec["slice_coupling"].startswith("off:") and "coil" in rec["slice_coupling"]
    assert rec["slices"]["count"] == 3 and "HDF5" in rec["slices"]["read"]
    assert rec["measurement"]["coils"] == 4 and rec["measurement"]["reference"] == "reconstruction_rss"
    scales = [r["scale"] for r in rec["measurement_per_slice"]]
    assert scales[0] < scales[1] < scales[2]  # each slice keeps its own intensity scale
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["per_slice"]) == 3 and metrics["psnr"] > 15
    for j in (0, 2):  # equal to the single-slice path
        rc, err = _run(_mri(tmp_path / "k.h5", tmp_path / f"s{j}", "--method", *method, "--slice", j), capsys)
        assert rc == 0, err
        one = _volume(tmp_path / f"s{j}")[0]
        np.testing.assert_allclose(vol[j], one, atol=1e-4 * float(np.abs(one).max()))
        psnr = json.loads((tmp_path / f"s{j}" / "metrics.json").read_text())["psnr"]
        assert metrics["per_slice"][j]["psnr"] == pytest.approx(psnr, abs=1e-3)


def test_kspace_volume_coupled_method_runs_uncoupled_and_npy_is_memory_mapped(tmp_path, capsys, monkeypatch):
    import recon.execute as execute

    k, _ = _coil_kspace()
    np.save(tmp_path / "k.npy", k)
    real = execute.run_method
    calls = []
    monkeypatch.setattr(execute, "run_method", lambda run, meas, **kw: (calls.append(meas.y.shape[0]),
                                                                        real(run, meas, **kw))[1])
    rc, err = _run(_mri(tmp_path / "k.npy", tmp_path / "v", "--method", "tv3d", "--param", "n_iter=20",
                        "--slices", "0:2", "--slice-spacing", 3), capsys)
    assert rc == 0, err
    assert calls == [1, 1]  # one call per slice, no halo
    rec = json.loads((tmp_path / "v" / "run.json").read_text())
    assert rec["method"]["options"]["z_weight"] == 0 and "z_weight=0" in rec["slice_coupling"]
    assert rec["slices"]["halo"] == 0 and "memory-mapped" in rec["slices"]["read"]
    assert rec["slice_spacing_mm"] == 3.0
    assert rec["metrics"]["psnr"] > 15  # fully sampled file: the RSS of each slice is its reference


def test_kspace_volume_with_a_reference_volume(tmp_path, capsys):
    from recon.io import write_nifti

    k, rss = _coil_kspace()
    np.save(tmp_path / "k.npy", k)
    write_nifti(rss, tmp_path / "ref.nii.gz")
    rc, err = _run(_mri(tmp_path / "k.npy", tmp_path / "v", "--method", "zero-filled", "--reference",
                        tmp_path / "ref.nii.gz"), capsys)
    assert rc == 0, err
    metrics = json.loads((tmp_path / "v" / "metrics.json").read_text())
    assert metrics["reference"] == str(tmp_path / "ref.nii.gz") and len(metrics["per_slice"]) == 3
    # the reference volume is the RSS of the fully sampled slices, paired slice by slice: the same
    # scores as the file's own fully sampled RSS (slices paired in reverse order score ~4 dB lower)
    assert _run(_mri(tmp_path / "k.npy", tmp_path / "rss", "--method", "zero-filled"), capsys)[0] == 0
    own = json.loads((tmp_path / "rss" / "metrics.json").read_text())
    assert [p["psnr"] for p in metrics["per_slice"]] == pytest.approx([p["psnr"] for p in own["per_slice"]],
                                                                      abs=0.01)
    write_nifti(rss[:1], tmp_path / "one.nii.gz")  # one reference slice cannot score three k-space slices
    rc, err = _run(_mri(tmp_path / "k.npy", tmp_path / "w", "--method", "zero-filled", "--reference",
                        tmp_path / "one.nii.gz"), capsys)
    assert rc == 2 and "one slice per k-space slice" in err


def test_kspace_volume_with_a_bart_reference_is_one_clear_error(tmp_path, capsys):
    from recon.io import write_cfl

    k, rss = _coil_kspace()
    np.save(tmp_path / "k.npy", k)
    write_cfl(tmp_path / "ref", rss.astype(np.complex64))
    rc, err = _run(_mri(tmp_path / "k.npy", tmp_path / "v", "--method", "zero-filled", "--reference",
                        tmp_path / "ref.cfl"), capsys)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "BART" in lines[0] and "3 k-space slices" in lines[0], err
    assert "has 1 slice(s)" not in err and not (tmp_path / "v" / "recon.nii.gz").exists()


def test_single_slice_kspace_is_read_once(tmp_path, capsys, monkeypatch):
    """A one-slice k-space file (and one slice of a whole-read format through --slices) is the
    single-slice path: the file opened to count its slices is not read a second time."""
    import recon.io
    import recon.io.kspace as kspace_io

    k, _ = _coil_kspace()
    np.save(tmp_path / "k1.npy", k[1])  # (coils, H, W): one slice
    np.save(tmp_path / "k3.npy", k)  # (slices, coils, H, W): memory-mapped
    reads = []
    real = kspace_io.read_kspace

    def counting(*args, **kw):
        reads.append(str(args[0]))
        return real(*args, **kw)

    monkeypatch.setattr(kspace_io, "read_kspace", counting)
    monkeypatch.setattr(recon.io, "read_kspace", counting)
    rc, err = _run(_mri(tmp_path / "k1.npy", tmp_path / "one", "--method", "zero-filled"), capsys)
    assert rc == 0, err
    assert reads == [str(tmp_path / "k1.npy")], reads
    rec = json.loads((tmp_path / "one" / "run.json").read_text())
    assert rec["options"]["slice"] is None and "slices" not in rec and rec["metrics"]["psnr"] > 15
    reads.clear()  # --slices 1:2 is --slice 1, served by the open file (memory map), not read whole again
    rc, err = _run(_mri(tmp_path / "k3.npy", tmp_path / "range", "--method", "zero-filled", "--slices", "1:2"), capsys)
    assert rc == 0, err
    assert reads == [], reads
    rc, err = _run(_mri(tmp_path / "k3.npy", tmp_path / "s1", "--method", "zero-filled", "--slice", 1), capsys)
    assert rc == 0, err
    np.testing.assert_array_equal(_volume(tmp_path / "range"), _volume(tmp_path / "s1"))
    assert json.loads((tmp_path / "range" / "run.json").read_text())["measurement"] == \
        json.loads((tmp_path / "s1" / "run.json").read_text())["measurement"]


def test_file_signatures_cover_files_named_full_and_bart_pairs(tmp_path, monkeypatch):
    """The resume fingerprint covers every measured file: one whose name starts with 'full' (only
    CT's --reference full[:METHOD] is no file), and both halves of a BART .cfl/.hdr pair."""
    from types import SimpleNamespace

    from recon.io import write_cfl
    from recon.measured_volume import measured_file_signatures

    monkeypatch.chdir(tmp_path)
    np.save("fully_sampled.npy", np.ones((2, 4, 4), np.complex64))
    np.save("full_ref.npy", np.ones((4, 4), np.float32))
    write_cfl(tmp_path / "ks", np.ones((2, 4, 4), np.complex64))
    sig = measured_file_signatures(SimpleNamespace(kspace="fully_sampled.npy", reference="full_ref.npy"))
    assert [(s[0], Path(s[1]).name) for s in sig] == [("kspace", "fully_sampled.npy"), ("reference", "full_ref.npy")]
    for given in ("ks", "ks.hdr", "ks.cfl"):
        sig = measured_file_signatures(SimpleNamespace(kspace=given))
        assert sorted(Path(s[1]).name for s in sig) == ["ks.cfl", "ks.hdr"], given
    np.save("s.npy", np.ones((2, 3, 4), np.float32))
    for ref in ("full", "full:tv"):  # CT: no file
        assert [s[0] for s in measured_file_signatures(SimpleNamespace(sinogram="s.npy", reference=ref))] == \
            ["sinogram"]
