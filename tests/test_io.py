"""Tests for recon.io: DICOM, NIfTI, images, k-space, dispatch and case discovery.

Unit tests use synthetic data and the small files shipped inside pydicom.
Tests marked ``data`` read ``../shared/data`` (relative to the repository
root) and skip when it is absent.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom import config as pdconfig
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DcmSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from recon.errors import ReconError
from recon.io import (Volume, discover_cases, image_to_kspace, input_format, kspace_to_image,
                      list_series, read_cfl, read_complex_image, read_dicom, read_image,
                      read_input, read_kspace, read_nifti, write_cfl, write_dicom_series,
                      write_npy, write_nifti, write_png)

DATA = (Path(__file__).resolve().parent.parent / ".." / "shared" / "data").resolve()
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data not present")

CT_SMALL = get_testdata_file("CT_small.dcm")
MR_SMALL = get_testdata_file("MR_small.dcm")
RTDOSE = get_testdata_file("rtdose.dcm")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _save(ds: Dataset, path: Path) -> None:
    try:  # pydicom >= 3
        ds.save_as(path, enforce_file_format=True)
    except TypeError:  # pragma: no cover - pydicom 2.x
        ds.save_as(path, write_like_original=False)


def _template() -> Dataset:
    ds = pydicom.dcmread(CT_SMALL)
    ds.PixelData = ds.pixel_array.astype(np.int16).tobytes()  # uncompressed copy
    return ds


def _write_series(folder: Path, positions, values, *, names=None, instances=None,
                  series_uid=None, description="synthetic", orientation=(1, 0, 0, 0, 1, 0),
                  drop_position=False) -> str:
    """Write a synthetic CT series, slice i filled with ``values[i]`` (stored)."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    for i, (pos, val) in enumerate(zip(positions, values)):
        ds = _template()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesDescription = description
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
        if drop_position:
            del ds.ImagePositionPatient
        else:
            ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        ds.InstanceNumber = instances[i] if instances is not None else i + 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = np.full((ds.Rows, ds.Columns), val, dtype=np.int16).tobytes()
        name = names[i] if names is not None else f"s{i:03d}.dcm"
        _save(ds, folder / name)
    return series_uid


def _only_recon_errors(fn):
    """Run ``fn``; anything other than success or ReconError fails the test."""
    try:
        fn()
    except ReconError:
        return "error"
    return "ok"


# ---------------------------------------------------------------------------
# DICOM: writing derived series
# ---------------------------------------------------------------------------


def test_dicom_write_then_read_preserves_hu_and_sets_new_uids(tmp_path):
    ref = read_dicom(CT_SMALL)
    assert ref.data.dtype == np.float32 and ref.data.shape == (1, 128, 128)
    rng = np.random.default_rng(0)
    recon = ref.data + rng.normal(0, 5, ref.data.shape)  # non-integer HU
    paths = write_dicom_series(recon, ref, tmp_path / "out", "score-sde",
                               {"steps": 1000, "lam": 0.5, "note": "x" * 3000})
    assert len(paths) == 1 and paths[0].is_file()
    back = read_dicom(tmp_path / "out")
    assert np.max(np.abs(back.data - recon)) <= 1.0
    assert back.spacing == pytest.approx(ref.spacing)
    np.testing.assert_allclose(back.affine, ref.affine, atol=1e-4)

    src = pydicom.dcmread(CT_SMALL, stop_before_pixels=True)
    out = pydicom.dcmread(paths[0])
    assert out.SeriesInstanceUID != src.SeriesInstanceUID
    assert out.SOPInstanceUID != src.SOPInstanceUID
    assert out.StudyInstanceUID == src.StudyInstanceUID
    assert out.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert list(out.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert out.DerivationDescription.startswith("score-sde")
    assert '"lam": 0.5' in out.DerivationDescription
    assert len(out.DerivationDescription) <= 1024
    assert "score-sde" in out.SeriesDescription and len(out.SeriesDescription) <= 64
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert out.PixelRepresentation == 1 and out.BitsAllocated == 16
    np.testing.assert_allclose([float(v) for v in out.ImagePositionPatient],
                               [float(v) for v in src.ImagePositionPatient], atol=1e-4)
    assert [float(v) for v in out.PixelSpacing] == pytest.approx([float(v) for v in src.PixelSpacing])
    assert float(out.SliceThickness) == pytest.approx(float(src.SliceThickness))
    assert not list(tmp_path.joinpath("out").glob(".*"))  # no temp files left


def test_dicom_output_is_valid_under_strict_reading(tmp_path):
    ref = read_dicom(CT_SMALL)
    paths = write_dicom_series(ref.data, ref, tmp_path / "o", "fbp", {"filter": "ramp"})
    old = pdconfig.settings.reading_validation_mode
    pdconfig.settings.reading_validation_mode = pdconfig.RAISE
    try:
        ds = pydicom.dcmread(paths[0])
        for elem in ds.iterall():
            elem.value  # every value converts without a validation error
        assert ds.preamble is not None and "TransferSyntaxUID" in ds.file_meta
    finally:
        pdconfig.settings.reading_validation_mode = old


def test_dicom_write_resized_keeps_field_of_view(tmp_path):
    ref = read_dicom(CT_SMALL)
    small = ref.data[0, ::2, ::2]
    write_dicom_series(small, ref, tmp_path / "o", "down", {})
    back = read_dicom(tmp_path / "o")
    assert back.data.shape == (1, 64, 64)
    assert back.spacing[1] == pytest.approx(2 * ref.spacing[1], rel=1e-5)

    def corner(v):  # world position of the top-left corner of the field of view
        return v.affine @ np.array([-0.5, -0.5, 0, 1])

    np.testing.assert_allclose(corner(back), corner(ref), atol=1e-3)
    np.testing.assert_allclose(back.affine @ [63.5, 63.5, 0, 1], ref.affine @ [127.5, 127.5, 0, 1],
                               atol=1e-3)


def test_dicom_write_float_mr_values(tmp_path):
    ref = read_dicom(MR_SMALL)
    values = ref.data / 997.0  # small-range float data: slope must be < 1
    write_dicom_series(values, ref, tmp_path / "o", "cs", {"iters": 3})
    back = read_dicom(tmp_path / "o")
    span = float(values.max() - values.min())
    assert np.max(np.abs(back.data - values)) <= span / 65534 + 1e-6
    assert back.meta["modality"] == "MR"


def test_dicom_write_refuses_input_folder_and_keeps_input(tmp_path):
    src = tmp_path / "in" / "ct.dcm"
    src.parent.mkdir()
    shutil.copy(CT_SMALL, src)
    before = src.read_bytes()
    ref = read_dicom(src.parent)
    for target in (src.parent, tmp_path):
        with pytest.raises(ReconError, match="input"):
            write_dicom_series(ref.data, ref, target, "m", {})
    assert src.read_bytes() == before
    assert sorted(p.name for p in src.parent.iterdir()) == ["ct.dcm"]


def test_dicom_write_rejects_bad_input(tmp_path):
    ref = read_dicom(CT_SMALL)
    bad = ref.data.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ReconError, match="NaN"):
        write_dicom_series(bad, ref, tmp_path / "o", "m", {})
    with pytest.raises(ReconError, match="slice"):
        write_dicom_series(np.zeros((3, 8, 8)), ref, tmp_path / "o", "m", {})
    nifti_like = Volume(data=np.zeros((1, 4, 4), np.float32))
    with pytest.raises(ReconError, match="not a DICOM"):
        write_dicom_series(np.zeros((1, 4, 4)), nifti_like, tmp_path / "o", "m", {})


def test_dicom_write_multislice_subset(tmp_path):
    pos = [(0, 0, z) for z in (0.0, 2.5, 5.0, 7.5)]
    _write_series(tmp_path / "in", pos, [10, 20, 30, 40])
    ref = read_dicom(tmp_path / "in")
    paths = write_dicom_series(ref.data[2], ref, tmp_path / "out", "m", {}, slice_indices=2)
    out = pydicom.dcmread(paths[0])
    assert float(out.ImagePositionPatient[2]) == pytest.approx(5.0)
    assert read_dicom(tmp_path / "out").data[0, 0, 0] == pytest.approx(30 - 1024)


# ---------------------------------------------------------------------------
# DICOM: reading
# ---------------------------------------------------------------------------


def test_dicom_reads_hu_and_metadata():
    v = read_dicom(CT_SMALL)
    raw = pydicom.dcmread(CT_SMALL)
    expected = raw.pixel_array * float(raw.RescaleSlope) + float(raw.RescaleIntercept)
    np.testing.assert_allclose(v.data[0], expected)
    assert v.meta["modality"] == "CT" and v.meta["units"] == "HU"
    assert v.meta["series_uid"] == raw.SeriesInstanceUID
    assert v.meta["patient_id"] == raw.PatientID
    assert len(v.datasets) == 1 and "PixelData" not in v.datasets[0]
    # affine maps (col, row, slice) to RAS: LPS position negated in x and y
    ipp = np.array([float(x) for x in raw.ImagePositionPatient])
    np.testing.assert_allclose(v.affine @ [0, 0, 0, 1], [-ipp[0], -ipp[1], ipp[2], 1])
    dy, dx = (float(x) for x in raw.PixelSpacing)
    np.testing.assert_allclose(v.affine @ [3, 0, 0, 1] - v.affine @ [0, 0, 0, 1],
                               [-3 * dx, 0, 0, 0], atol=1e-9)
    np.testing.assert_allclose(v.affine @ [0, 2, 0, 1] - v.affine @ [0, 0, 0, 1],
                               [0, -2 * dy, 0, 0], atol=1e-9)


def test_dicom_series_order_invariant_to_file_order(tmp_path):
    # oblique slices along the normal of a rotated plane; names shuffled and
    # instance numbers reversed relative to the true spatial order
    c, s = np.cos(0.3), np.sin(0.3)
    orient = (1, 0, 0, 0, c, -s)
    normal = np.cross(orient[:3], orient[3:])
    origin = np.array([-10.0, 20.0, 30.0])
    n = 6
    positions = [origin + k * 2.0 * normal for k in range(n)]
    values = [100 * (k + 1) for k in range(n)]
    rng = np.random.default_rng(1)
    order = rng.permutation(n)  # file i holds slice order[i]
    names = [f"zz{rng.integers(1e6):06d}" for _ in range(n)]  # no extension
    _write_series(tmp_path / "a", [positions[k] for k in order], [values[k] for k in order],
                  names=names, instances=[n - k for k in order], orientation=orient)
    _write_series(tmp_path / "b", positions, values, orientation=orient)
    va, vb = read_dicom(tmp_path / "a"), read_dicom(tmp_path / "b")
    expected = np.array(values, dtype=np.float32) - 1024
    np.testing.assert_array_equal(va.data[:, 0, 0], expected)
    np.testing.assert_array_equal(vb.data[:, 0, 0], expected)
    assert va.meta["sort"] == "position"
    assert va.spacing[0] == pytest.approx(2.0, abs=1e-3)
    np.testing.assert_allclose(va.affine, vb.affine, atol=1e-6)
    np.testing.assert_allclose(va.affine[:3, 2], np.diag([-1, -1, 1]) @ (2.0 * normal), atol=1e-3)


def test_dicom_falls_back_to_instance_number_without_position(tmp_path):
    n = 4
    order = [2, 0, 3, 1]
    _write_series(tmp_path / "a", [(0, 0, 0)] * n, [10 * (k + 1) for k in order],
                  instances=[k + 1 for k in order], drop_position=True)
    v = read_dicom(tmp_path / "a")
    assert v.meta["sort"] == "instance"
    np.testing.assert_array_equal(v.data[:, 0, 0], np.array([10, 20, 30, 40]) - 1024)
    assert v.affine is None


def test_dicom_folder_skips_non_dicom_files(tmp_path):
    _write_series(tmp_path / "s", [(0, 0, 0), (0, 0, 1)], [1, 2])
    (tmp_path / "s" / "README").write_text("not dicom\n")
    (tmp_path / "s" / "LICENSE.txt").write_text("MIT\n")
    (tmp_path / "s" / "notes.json").write_text("{}")
    assert read_dicom(tmp_path / "s").n_slices == 2
    empty = tmp_path / "docs"
    empty.mkdir()
    (empty / "README").write_text("hello")
    with pytest.raises(ReconError, match="no DICOM"):
        read_dicom(empty)
    with pytest.raises(ReconError, match="no such"):
        read_dicom(tmp_path / "missing")


def test_dicom_several_series_need_a_uid(tmp_path):
    uid_a = _write_series(tmp_path / "x" / "a", [(0, 0, z) for z in range(3)], [1, 2, 3],
                          description="first series")
    uid_b = _write_series(tmp_path / "x" / "b", [(0, 0, z) for z in range(2)], [4, 5],
                          description="second series")
    with pytest.raises(ReconError) as err:
        read_dicom(tmp_path / "x")
    msg = str(err.value)
    for text in (uid_a, uid_b, "first series", "second series", "3 slices", "2 slices",
                 "--series", str(tmp_path / "x")):
        assert text in msg
    assert "\n" not in msg
    assert read_dicom(tmp_path / "x", series_uid=uid_b).n_slices == 2
    with pytest.raises(ReconError, match="no series with UID"):
        read_dicom(tmp_path / "x", series_uid="1.2.3")
    infos = list_series(tmp_path / "x")
    assert [(i.uid, i.n_slices, i.description, i.modality) for i in infos] == [
        (uid_a, 3, "first series", "CT"), (uid_b, 2, "second series", "CT")]
    assert all(len(i.files) == i.n_slices for i in infos)
    assert infos[0].patient_id == pydicom.dcmread(CT_SMALL).PatientID


def test_dicom_multiframe_rtdose():
    v = read_dicom(RTDOSE)
    raw = pydicom.dcmread(RTDOSE)
    assert v.data.shape == (15, 10, 10)
    assert v.spacing == pytest.approx((5.0, 10.0, 10.0))
    np.testing.assert_allclose(v.data, raw.pixel_array * float(raw.DoseGridScaling), rtol=1e-6)
    z = v.affine @ np.array([[0, 0, k, 1] for k in range(15)]).T
    np.testing.assert_allclose(np.diff(z[2]), 5.0)
    assert v.meta["units"] == raw.DoseUnits
    assert len(v.datasets) == 15


def test_dicom_enhanced_multiframe_per_frame_groups(tmp_path):
    base = _template()
    rows, cols = base.Rows, base.Columns
    n = 4
    order = [3, 1, 0, 2]  # frame f sits at position index order[f]
    ds = copy.deepcopy(base)
    for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
               "SliceThickness", "RescaleSlope", "RescaleIntercept"):
        if kw in ds:
            delattr(ds, kw)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.NumberOfFrames = n
    shared = Dataset()
    po = Dataset()
    po.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    pm = Dataset()
    pm.PixelSpacing = [0.5, 0.75]
    pm.SliceThickness = 3
    shared.PlaneOrientationSequence = DcmSequence([po])
    shared.PixelMeasuresSequence = DcmSequence([pm])
    ds.SharedFunctionalGroupsSequence = DcmSequence([shared])
    per = []
    for f in range(n):
        item = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = [0, 0, 3.0 * order[f]]
        item.PlanePositionSequence = DcmSequence([pp])
        pv = Dataset()
        pv.RescaleSlope, pv.RescaleIntercept, pv.RescaleType = 2, -1000, "HU"
        item.PixelValueTransformationSequence = DcmSequence([pv])
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = DcmSequence(per)
    frames = np.stack([np.full((rows, cols), 10 * order[f], np.int16) for f in range(n)])
    ds.PixelData = frames.tobytes()
    path = tmp_path / "enh.dcm"
    _save(ds, path)
    v = read_dicom(path)
    assert v.data.shape == (n, rows, cols)
    np.testing.assert_allclose(v.data[:, 5, 5], [2 * 10 * k - 1000 for k in range(n)])
    assert v.spacing == pytest.approx((3.0, 0.5, 0.75))
    assert v.meta["frames"] == [2, 1, 3, 0]


def test_dicom_missing_decoder_names_transfer_syntax():
    path = get_testdata_file("MR_small_jpeg_ls_lossless.dcm")
    try:
        v = read_dicom(path)
    except ReconError as err:
        msg = str(err)
        assert "JPEG-LS Lossless" in msg and "1.2.840.10008.1.2.4.80" in msg
        assert ".[dicom-codecs]" in msg and "pylibjpeg" in msg
        assert Path(path).name in msg
    else:  # a JPEG-LS decoder is installed
        assert v.data.shape == (1, 64, 64)


@pytest.mark.parametrize("cut", [0, 60, 140, 300, 1000, 2500, 20000, 38000])
def test_truncated_dicom_raises_recon_error(tmp_path, cut):
    raw = Path(CT_SMALL).read_bytes()
    path = tmp_path / "t.dcm"
    path.write_bytes(raw[:cut])
    with pytest.raises(ReconError, match=str(path)):
        read_dicom(path)
    # inside a folder as well
    with pytest.raises(ReconError):
        read_dicom(tmp_path)


def test_bit_flipped_dicom_raises_only_recon_error(tmp_path):
    raw = Path(CT_SMALL).read_bytes()
    rng = np.random.default_rng(123)
    outcomes = set()
    for i in range(60):
        buf = bytearray(raw)
        hi = 2600 if i % 2 else len(buf)  # half the flips in the header
        for _ in range(int(rng.integers(1, 6))):
            pos = int(rng.integers(128, hi))
            buf[pos] ^= 1 << int(rng.integers(0, 8))
        path = tmp_path / f"f{i}.dcm"
        path.write_bytes(bytes(buf))
        outcomes.add(_only_recon_errors(lambda: read_dicom(path)))
        outcomes.add(_only_recon_errors(lambda: list_series(path)))
    assert outcomes <= {"ok", "error"}


# ---------------------------------------------------------------------------
# NIfTI
# ---------------------------------------------------------------------------


def _oblique_affine() -> np.ndarray:
    rng = np.random.default_rng(5)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    aff = np.eye(4)
    aff[:3, :3] = q @ np.diag([0.8, 0.9, 2.5])
    aff[:3, 3] = [-90.5, 100.25, -30.125]
    return aff.astype(np.float32).astype(np.float64)  # NIfTI stores float32


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_round_trip_keeps_affine_exactly(tmp_path, suffix):
    aff = _oblique_affine()
    data = np.random.default_rng(0).normal(size=(5, 7, 9)).astype(np.float32)
    path = write_nifti(data, tmp_path / f"v{suffix}", aff)
    v = read_nifti(path)
    np.testing.assert_array_equal(v.affine, aff)
    np.testing.assert_array_equal(v.data, data)
    assert v.spacing == pytest.approx((2.5, 0.9, 0.8), rel=1e-6)
    # axis mapping: nifti[i, j, k] == data[k, j, i]
    arr = np.asanyarray(nib.load(str(path)).dataobj)
    assert arr.shape == (9, 7, 5) and arr[3, 2, 1] == data[1, 2, 3]


def test_nifti_from_dicom_geometry(tmp_path):
    v = read_dicom(CT_SMALL)
    back = read_nifti(write_nifti(v.data, tmp_path / "ct.nii.gz", v.affine))
    np.testing.assert_allclose(back.affine, v.affine, rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(back.data, v.data)


def test_nifti_errors(tmp_path):
    with pytest.raises(ReconError, match=r"\.nii"):
        write_nifti(np.zeros((2, 2, 2)), tmp_path / "x.img", np.eye(4))
    good = write_nifti(np.ones((3, 4, 5)), tmp_path / "g.nii.gz", np.eye(4))
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ReconError, match="bad.nii.gz"):
        read_nifti(bad)
    four = tmp_path / "four.nii"
    nib.save(nib.Nifti1Image(np.zeros((2, 3, 4, 5), np.float32), np.eye(4)), str(four))
    with pytest.raises(ReconError, match="4D"):
        read_nifti(four)


# ---------------------------------------------------------------------------
# 2D images
# ---------------------------------------------------------------------------


def test_png_write_read_windowed(tmp_path):
    arr = np.linspace(-1000, 1000, 64 * 32, dtype=np.float32).reshape(64, 32)
    path = write_png(arr, tmp_path / "w.png", vmin=-500, vmax=500)
    img = read_image(path)
    assert img.dtype == np.float32 and img.shape == (64, 32)
    assert img[0, 0] == 0 and img[-1, -1] == 255
    expected = np.round(np.clip((arr + 500) / 1000, 0, 1) * 255)
    np.testing.assert_array_equal(img, expected)
    auto = read_image(write_png(arr, tmp_path / "auto.png"))
    assert auto.min() == 0 and auto.max() == 255
    with pytest.raises(ReconError, match=".png"):
        write_png(arr, tmp_path / "w.jpg")


def test_colour_images_become_grey(tmp_path):
    from PIL import Image

    grey = np.random.default_rng(0).integers(0, 256, (20, 30), dtype=np.uint8)
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "g3.png")
    np.testing.assert_array_equal(read_image(tmp_path / "g3.png"), grey)
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "red.png")
    assert read_image(tmp_path / "red.png")[0, 0] == pytest.approx(0.299 * 200, abs=1e-3)
    Image.fromarray(grey).save(tmp_path / "g.jpg", quality=95)
    jpg = read_image(tmp_path / "g.jpg")
    assert jpg.shape == grey.shape and jpg.dtype == np.float32
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "g3.jpg", quality=95)
    assert read_image(tmp_path / "g3.jpg").ndim == 2


def test_tiff_and_16bit_png(tmp_path):
    import tifffile
    from PIL import Image

    f = np.random.default_rng(0).normal(size=(12, 10)).astype(np.float32)
    tifffile.imwrite(tmp_path / "f.tif", f)
    np.testing.assert_array_equal(read_image(tmp_path / "f.tif"), f)
    u16 = (np.arange(12 * 10).reshape(12, 10) * 500).astype(np.uint16)
    Image.fromarray(u16).save(tmp_path / "u16.png")
    np.testing.assert_array_equal(read_image(tmp_path / "u16.png"), u16.astype(np.float32))


def test_npy_images(tmp_path):
    real = np.random.default_rng(0).normal(size=(6, 7))
    cplx = real + 1j * real[::-1]
    p1 = write_npy(real, tmp_path / "r.npy")
    p2 = write_npy(cplx, tmp_path / "c")  # suffix added as numpy does
    assert p2.name == "c.npy"
    r, c = read_image(p1), read_image(p2)
    assert r.dtype == np.float32 and c.dtype == np.complex64
    np.testing.assert_allclose(r, real, rtol=1e-6)
    np.testing.assert_allclose(c, cplx, rtol=1e-6)
    np.save(tmp_path / "three.npy", np.zeros((2, 3, 4)))
    with pytest.raises(ReconError, match="2D"):
        read_image(tmp_path / "three.npy")


def test_corrupt_images_raise_recon_error(tmp_path):
    good = write_png(np.eye(16), tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(good.read_bytes()[:40])
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    for name in ("bad.png", "text.jpg", "bad.npy"):
        with pytest.raises(ReconError, match=name):
            read_image(tmp_path / name)


def test_writes_are_atomic_on_failure(tmp_path):
    target = tmp_path / "keep.png"
    target.write_bytes(b"original")
    with pytest.raises(ReconError):
        write_png(np.zeros((2, 2, 2, 2)), target)
    assert target.read_bytes() == b"original"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]


# ---------------------------------------------------------------------------
# k-space
# ---------------------------------------------------------------------------


def _cplx(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)


def test_cfl_round_trip_and_column_major(tmp_path):
    arr = _cplx((1, 6, 5, 3))
    base = write_cfl(tmp_path / "k", arr)
    hdr = (tmp_path / "k.hdr").read_text()
    assert hdr.splitlines()[0] == "# Dimensions" and hdr.split()[2:6] == ["1", "6", "5", "3"]
    back = read_cfl(base, squeeze=False)
    np.testing.assert_array_equal(back, arr)
    raw = np.fromfile(tmp_path / "k.cfl", dtype=np.complex64)
    assert raw[1] == arr[0, 1, 0, 0] and raw[6] == arr[0, 0, 1, 0]  # first index fastest
    np.testing.assert_array_equal(read_cfl(tmp_path / "k.cfl"), arr)
    ks = read_kspace(tmp_path / "k.cfl")
    assert ks.data.shape == (1, 3, 6, 5)
    np.testing.assert_array_equal(ks.data[0, 2], arr[0, :, :, 2])
    # trailing singleton dims are squeezed
    write_cfl(tmp_path / "t", arr.reshape(1, 6, 5, 3, 1, 1))
    assert read_cfl(tmp_path / "t").shape == (1, 6, 5, 3)


def test_cfl_errors(tmp_path):
    write_cfl(tmp_path / "k", _cplx((4, 4)))
    data = (tmp_path / "k.cfl").read_bytes()
    (tmp_path / "k.cfl").write_bytes(data[:-8])
    with pytest.raises(ReconError, match="truncated"):
        read_cfl(tmp_path / "k")
    (tmp_path / "h.hdr").write_text("garbage\n")
    (tmp_path / "h.cfl").write_bytes(b"")
    with pytest.raises(ReconError, match="Dimensions"):
        read_kspace(tmp_path / "h.hdr")
    with pytest.raises(ReconError, match="missing"):
        read_cfl(tmp_path / "nothing")
    write_cfl(tmp_path / "maps", _cplx((1, 4, 4, 2, 2)))
    with pytest.raises(ReconError, match="MAPS"):
        read_kspace(tmp_path / "maps")


def _fastmri(path, k, *, recon_name=None, attrs=None):
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=k)
        if recon_name:
            img = np.abs(kspace_to_image(k))
            if img.ndim == 4:
                img = np.sqrt((img ** 2).sum(1))
            f.create_dataset(recon_name, data=img.astype(np.float32))
        f.create_dataset("ismrmrd_header", data=np.bytes_(b"<ismrmrdHeader/>"))
        for key, val in (attrs or {}).items():
            f.attrs[key] = val


def test_fastmri_single_and_multicoil(tmp_path):
    single = _cplx((3, 16, 12))
    _fastmri(tmp_path / "s.h5", single, recon_name="reconstruction_esc",
             attrs={"acquisition": "CORPD_FBK", "max": 0.5})
    ks = read_kspace(tmp_path / "s.h5")
    assert ks.data.shape == (3, 1, 16, 12) and ks.single_coil
    np.testing.assert_array_equal(ks.data[:, 0], single)
    assert ks.reference_name == "reconstruction_esc" and ks.reference.shape == (3, 16, 12)
    assert ks.attrs["acquisition"] == "CORPD_FBK" and ks.attrs["max"] == 0.5
    assert "ismrmrdHeader" in ks.attrs["ismrmrd_header"]

    multi = _cplx((2, 4, 10, 8), seed=1)
    _fastmri(tmp_path / "m.h5", multi, recon_name="reconstruction_rss")
    km = read_kspace(tmp_path / "m.h5")
    assert km.data.shape == (2, 4, 10, 8) and km.n_coils == 4
    np.testing.assert_array_equal(km.data, multi)
    assert km.reference_name == "reconstruction_rss"
    assert km.coil_slice(1).shape == (4, 10, 8)
    one = read_kspace(tmp_path / "m.h5", slice_index=1)
    np.testing.assert_array_equal(one.data[0], multi[1])
    assert one.reference.shape == (1, 10, 8)


def test_fastmri_missing_dataset_lists_present(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("reconstruction_rss", data=np.zeros((2, 4, 4), np.float32))
        f.create_dataset("meta/info", data=np.zeros(3))
    with pytest.raises(ReconError) as err:
        read_kspace(tmp_path / "x.h5")
    msg = str(err.value)
    assert "'kspace'" in msg and "reconstruction_rss" in msg and "meta/info" in msg
    assert "x.h5" in msg
    with pytest.raises(ReconError, match="'raw'"):
        read_kspace(tmp_path / "x.h5", dataset="raw")


def test_corrupt_hdf5_raises_only_recon_error(tmp_path):
    _fastmri(tmp_path / "a.h5", _cplx((2, 3, 16, 12)), recon_name="reconstruction_rss")
    raw = (tmp_path / "a.h5").read_bytes()
    for cut in (0, 10, 100, 1000, len(raw) // 2, len(raw) - 10):
        (tmp_path / "t.h5").write_bytes(raw[:cut])
        with pytest.raises(ReconError, match="t.h5"):
            read_kspace(tmp_path / "t.h5")
    rng = np.random.default_rng(7)
    outcomes = set()
    for i in range(60):
        buf = bytearray(raw)
        hi = 4000 if i % 2 else len(buf)
        for _ in range(int(rng.integers(1, 8))):
            pos = int(rng.integers(0, hi))
            buf[pos] ^= 1 << int(rng.integers(0, 8))
        path = tmp_path / f"f{i}.h5"
        path.write_bytes(bytes(buf))
        outcomes.add(_only_recon_errors(lambda: read_kspace(path)))
    assert outcomes <= {"ok", "error"}


def test_npy_kspace_and_complex_image(tmp_path):
    k2 = _cplx((8, 6))
    k3 = _cplx((3, 8, 6))
    np.save(tmp_path / "k2.npy", k2)
    np.save(tmp_path / "k3.npy", k3)
    assert read_kspace(tmp_path / "k2.npy").data.shape == (1, 1, 8, 6)
    np.testing.assert_array_equal(read_kspace(tmp_path / "k3.npy").data[0], k3)
    np.save(tmp_path / "real.npy", np.zeros((8, 6)))
    with pytest.raises(ReconError, match="complex"):
        read_kspace(tmp_path / "real.npy")
    img = read_complex_image(tmp_path / "k2.npy")
    np.testing.assert_allclose(kspace_to_image(image_to_kspace(img)), img, atol=1e-5)
    ks = read_kspace(tmp_path / "k2.npy", from_image=True)
    np.testing.assert_allclose(ks.data[0, 0], image_to_kspace(k2), atol=1e-5)
    np.testing.assert_allclose(ks.reference[0], np.abs(k2), rtol=1e-6)
    # Parseval: the transform is orthonormal
    assert np.sum(np.abs(ks.data) ** 2) == pytest.approx(np.sum(np.abs(k2) ** 2), rel=1e-4)
    with pytest.raises(ReconError, match="unsupported"):
        read_kspace(tmp_path / "k.mat")


# ---------------------------------------------------------------------------
# dispatcher and case discovery
# ---------------------------------------------------------------------------


def test_read_input_dispatch(tmp_path):
    shutil.copy(CT_SMALL, tmp_path / "IM0001")  # no extension: sniffed
    assert input_format(tmp_path / "IM0001") == "dicom"
    assert read_input(tmp_path / "IM0001").meta["modality"] == "CT"
    assert read_input(tmp_path).n_slices == 1  # folder
    write_nifti(np.zeros((2, 3, 4)), tmp_path / "v.nii.gz", np.eye(4))
    assert read_input(tmp_path / "v.nii.gz").data.shape == (2, 3, 4)
    write_png(np.eye(5), tmp_path / "i.png")
    v = read_input(tmp_path / "i.png")
    assert v.data.shape == (1, 5, 5) and v.affine is None
    np.save(tmp_path / "a.npy", np.ones((3, 4)))
    assert read_input(tmp_path / "a.npy").data.shape == (1, 3, 4)
    (tmp_path / "x.xyz").write_text("?")
    with pytest.raises(ReconError) as err:
        read_input(tmp_path / "x.xyz")
    assert ".nii.gz" in str(err.value) and ".png" in str(err.value) and "DICOM" in str(err.value)
    (tmp_path / "k.h5").write_bytes(b"")
    with pytest.raises(ReconError, match="k-space"):
        read_input(tmp_path / "k.h5")
    with pytest.raises(ReconError, match="no such"):
        read_input(tmp_path / "missing.png")


def test_discover_cases(tmp_path):
    root = tmp_path / "root"
    _write_series(root / "ct" / "p1", [(0, 0, z) for z in range(5)], [1, 2, 3, 4, 5],
                  description="Axial 1.0")
    _write_series(root / "ct" / "p2", [(0, 0, z) for z in range(3)], [6, 7, 8],
                  description="one")
    _write_series(root / "ct" / "p2", [(0, 0, z) for z in range(2)], [9, 9],
                  description="two", names=["t0.dcm", "t1.dcm"])
    write_nifti(np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2), root / "mr" / "t1 w.nii.gz",
                np.eye(4))
    write_png(np.eye(6), root / "img" / "a.png")
    np.save(root / "img" / "c.npy", _cplx((5, 5)))
    np.save(root / "img" / "vol.npy", np.zeros((2, 3, 3)))  # not 2D: skipped
    (root / "README.md").write_text("docs")
    (root / "LICENSE").write_text("MIT")
    write_cfl(root / "k", _cplx((4, 4)))  # k-space: ignored

    with pytest.warns(UserWarning, match="vol.npy"):
        cases = discover_cases(root)
    names = [c.name for c in cases]
    assert len(names) == len(set(names)) == 6
    assert names == sorted(names)
    assert all(c.name.replace("_", "").replace("-", "").replace(".", "").isalnum() for c in cases)
    by_kind = {k: [c for c in cases if c.kind == k] for k in ("dicom", "nifti", "image")}
    assert len(by_kind["dicom"]) == 3 and len(by_kind["nifti"]) == 1 and len(by_kind["image"]) == 2
    p1 = next(c for c in cases if c.name.startswith("ct__p1"))
    assert p1.slice_index == 2 and p1.modality == "CT"
    assert p1.image.shape == (128, 128) and p1.image.dtype == np.float32
    assert p1.image[0, 0] == 3 - 1024
    np.testing.assert_array_equal(p1.reference.data[p1.slice_index], p1.image)
    nif = by_kind["nifti"][0]
    assert nif.slice_index == 2 and nif.reference.data.shape == (4, 3, 2)
    np.testing.assert_array_equal(nif.image, nif.reference.data[2])
    cplx = next(c for c in cases if c.name.endswith("c"))
    assert cplx.meta["complex"] and cplx.image.dtype == np.float32 and cplx.reference is None

    with pytest.warns(UserWarning):
        again = discover_cases(root)
    assert [c.name for c in again] == names
    with pytest.warns(UserWarning):
        every = discover_cases(root, slices="all")
    assert len(every) == 5 + 3 + 2 + 4 + 2
    assert len({c.name for c in every}) == len(every)
    with pytest.raises(ReconError):
        discover_cases(root, slices="some")


# ---------------------------------------------------------------------------
# real data (skipped without ../shared/data)
# ---------------------------------------------------------------------------


def _air_peak(v: Volume) -> float:
    hist, edges = np.histogram(v.data, bins=np.arange(-1200, 200, 10))
    return float(edges[np.argmax(hist)] + 5)


@needs_data
@pytest.mark.data
@pytest.mark.parametrize("name,n", [("ge_head", 28), ("lung_pet_ct_dx", 30)])
def test_real_ct_series(name, n):
    v = read_dicom(DATA / "ct" / "val" / name)
    assert v.data.shape == (n, 512, 512) and v.meta["units"] == "HU"
    assert -1100 < _air_peak(v) < -900  # air is about -1000 HU
    assert v.data.max() < 4000 and v.data.min() >= -3100
    assert 0.3 < v.spacing[1] < 1.0 and v.spacing[0] > 1.0
    proj = v.meta["positions"] @ np.cross(v.meta["orientation"][:3], v.meta["orientation"][3:])
    assert np.all(np.diff(proj) > 0)


@needs_data
@pytest.mark.data
def test_real_j2k_series_decodes_or_names_the_codec():
    try:
        v = read_dicom(DATA / "ct" / "val" / "totalseg_example_j2k")
    except ReconError as err:
        msg = str(err)
        assert "JPEG 2000" in msg and "1.2.840.10008.1.2.4.90" in msg and "dicom-codecs" in msg
    else:
        assert v.data.shape == (20, 512, 512)
        assert -1100 < _air_peak(v) < -900


@needs_data
@pytest.mark.data
def test_real_brain_8coil_cfl():
    ks = read_kspace(DATA / "mri" / "kspace" / "brain_8coil_pics" / "ksp")
    assert ks.data.shape == (1, 8, 180, 230)
    energy = np.abs(ks.data[0]).sum(0)
    r, c = np.unravel_index(np.argmax(energy), energy.shape)
    assert abs(r - 90) <= 3 and abs(c - 115) <= 3  # k-space centre in the middle
    assert 0.05 < np.mean(energy > 0) < 0.3  # Poisson-disc undersampled (~12.7 %)
    img = read_cfl(DATA / "mri" / "kspace" / "brain_8coil_pics" / "img")
    assert img.shape == (1, 180, 230, 1, 2)


@needs_data
@pytest.mark.data
def test_real_knee_complex_image():
    path = DATA / "mri" / "kspace" / "knee_singlecoil" / "001.npy"
    img = read_complex_image(path)
    assert img.shape == (320, 320) and img.dtype == np.complex64
    ks = read_kspace(path, from_image=True)
    assert ks.data.shape == (1, 1, 320, 320)


@needs_data
@pytest.mark.data
def test_real_discover_ct_val_one_case_per_series():
    root = DATA / "ct" / "val"
    series = list_series(root)
    cases = discover_cases(root)
    assert len(series) == len(cases) == 3
    assert sorted(c.meta["n_slices"] for c in cases) == sorted(s.n_slices for s in series)
    assert {c.name.split("__")[0] for c in cases} == {"ge_head", "lung_pet_ct_dx",
                                                       "totalseg_example_j2k"}


@needs_data
@pytest.mark.data
def test_real_mri_inputs():
    v = read_input(DATA / "mri" / "val" / "stroke" / "T1.nii.gz")
    assert v.data.shape == (140, 160, 124) and v.affine.shape == (4, 4)
    t1c = read_dicom(DATA / "mri" / "val" / "brain_tumor_progression_t1c")
    assert t1c.data.shape == (24, 320, 260) and t1c.meta["modality"] == "MR"
