"""Raw-data k-space readers: ISMRMRD ``.h5`` and Siemens twix ``.dat``.

The ISMRMRD files are synthetic: written with h5py in the exact ISMRMRD HDF5
layout (``/dataset/data`` compound acquisitions + ``/dataset/xml``) and, when
the ``ismrmrd`` package is installed, also with ``ismrmrd.Dataset``.  They
hold a known random k-space (2 slices, 4 coils, 32 x 48 after removing 2x
readout oversampling), every 2nd line plus an 8-line centre, in shuffled
order, with noise / navigator / calibration-only / second-repetition
acquisitions that must not end up in the k-space, and one line acquired
twice (two averages).  Random data make any mis-ordered line, slice or coil
fail the comparison.

Siemens data: the assembly logic is tested with a small fake of twixtools'
``map_twix`` / ``twix_array`` interface (always); when ``twixtools`` is
installed a synthetic VE twix file is also written with ``twixtools.write_twix``
and read back through the real package.
"""

from __future__ import annotations

import json
import struct
import sys
import types

import h5py
import numpy as np
import pytest

import recon.io.kspace as kspace_module
from recon.cli import main
from recon.errors import ReconError
from recon.io.kspace import (ISMRMRD_SKIPPED_FLAGS, KSPACE_SUFFIXES, image_to_kspace, is_ismrmrd,
                             read_ismrmrd, read_kspace, read_siemens_twix)

S, C, H, W_OS, W = 2, 4, 32, 96, 48  # slices, coils, ky, oversampled kx, kx after oversampling removal
NOISE, CALIB, CALIB_AND_IMAGING, REVERSE, NAVIGATION = 19, 20, 21, 22, 23
NS = "http://www.ismrm.org/ISMRMRD"

# ---------------------------------------------------------------------------
# ISMRMRD writer (h5py, the exact layout of ismrmrd/hdf5.py)
# ---------------------------------------------------------------------------
_COUNTERS = np.dtype([("kspace_encode_step_1", "<u2"), ("kspace_encode_step_2", "<u2"), ("average", "<u2"),
                      ("slice", "<u2"), ("contrast", "<u2"), ("phase", "<u2"), ("repetition", "<u2"),
                      ("set", "<u2"), ("segment", "<u2"), ("user", "<u2", (8,))])
_HEAD = np.dtype([("version", "<u2"), ("flags", "<u8"), ("measurement_uid", "<u4"), ("scan_counter", "<u4"),
                  ("acquisition_time_stamp", "<u4"), ("physiology_time_stamp", "<u4", (3,)),
                  ("number_of_samples", "<u2"), ("available_channels", "<u2"), ("active_channels", "<u2"),
                  ("channel_mask", "<u8", (16,)), ("discard_pre", "<u2"), ("discard_post", "<u2"),
                  ("center_sample", "<u2"), ("encoding_space_ref", "<u2"), ("trajectory_dimensions", "<u2"),
                  ("sample_time_us", "<f4"), ("position", "<f4", (3,)), ("read_dir", "<f4", (3,)),
                  ("phase_dir", "<f4", (3,)), ("slice_dir", "<f4", (3,)), ("patient_table_position", "<f4", (3,)),
                  ("idx", _COUNTERS), ("user_int", "<i4", (8,)), ("user_float", "<f4", (8,))])
_ACQ = np.dtype([("head", _HEAD), ("traj", h5py.vlen_dtype(np.float32)), ("data", h5py.vlen_dtype(np.float32))])
_IDX = ("kspace_encode_step_1", "kspace_encode_step_2", "average", "slice", "contrast", "phase", "repetition",
        "set", "segment")


def _flags(*bits):
    return sum(1 << (b - 1) for b in bits)


def _xml(enc=(W_OS, H, 1), enc_fov=(480.0, 240.0, 5.0), rec=(W, H, 1), rec_fov=(240.0, 240.0, 5.0),
         centre1=H // 2, centre2=0, trajectory="cartesian", encoding=True):
    def xyz(tag, v):
        return f"<{tag}><x>{v[0]}</x><y>{v[1]}</y><z>{v[2]}</z></{tag}>"

    limits = (f"<encodingLimits><kspace_encoding_step_1><minimum>0</minimum><maximum>{enc[1] - 1}</maximum>"
              f"<center>{centre1}</center></kspace_encoding_step_1><kspace_encoding_step_2><minimum>0</minimum>"
              f"<maximum>{enc[2] - 1}</maximum><center>{centre2}</center></kspace_encoding_step_2>"
              "</encodingLimits>")
    body = (f"<encoding><encodedSpace>{xyz('matrixSize', enc)}{xyz('fieldOfView_mm', enc_fov)}</encodedSpace>"
            f"<reconSpace>{xyz('matrixSize', rec)}{xyz('fieldOfView_mm', rec_fov)}</reconSpace>{limits}"
            f"<trajectory>{trajectory}</trajectory></encoding>") if encoding else ""
    return (f'<?xml version="1.0"?><ismrmrdHeader xmlns="{NS}"><experimentalConditions>'
            f"<H1resonanceFrequency_Hz>63500000</H1resonanceFrequency_Hz></experimentalConditions>{body}"
            "</ismrmrdHeader>")


def _acq(line, *, e1=0, e2=0, slc=0, flags=0, average=0, repetition=0, contrast=0, center=None, traj_dims=0,
         pre=0, post=0):
    """One acquisition: ``line`` is complex (coils, samples)."""
    line = np.asarray(line, np.complex64)
    return {"data": line, "flags": flags, "center_sample": line.shape[1] // 2 if center is None else center,
            "trajectory_dimensions": traj_dims, "discard_pre": pre, "discard_post": post,
            "idx": {"kspace_encode_step_1": e1, "kspace_encode_step_2": e2, "slice": slc, "average": average,
                    "repetition": repetition, "contrast": contrast}}


def _write_h5py(path, acqs, xml, *, acq_dtype=_ACQ, data_override=None):
    rec = np.zeros(len(acqs), dtype=acq_dtype)
    for i, a in enumerate(acqs):
        head = rec[i]["head"]
        c, n = a["data"].shape
        head["version"] = 1
        head["number_of_samples"] = n
        head["active_channels"] = c
        head["available_channels"] = c
        for key in ("flags", "center_sample", "trajectory_dimensions", "discard_pre", "discard_post"):
            if key in head.dtype.names:
                head[key] = a[key]
        for key, value in a["idx"].items():
            if key in head["idx"].dtype.names:
                head["idx"][key] = value
        rec[i]["head"] = head
        rec[i]["data"] = a["data"].view(np.float32).reshape(-1) if data_override is None or i not in data_override \
            else data_override[i]
        rec[i]["traj"] = np.zeros(n * a["trajectory_dimensions"], np.float32)
    with h5py.File(path, "w") as fh:
        grp = fh.create_group("dataset")
        xds = grp.create_dataset("xml", shape=(1,), dtype=h5py.string_dtype())
        xds[0] = xml
        grp.create_dataset("data", data=rec, maxshape=(None,), chunks=True)
    return path


def _write_ismrmrd_package(path, acqs, xml):
    ismrmrd = pytest.importorskip("ismrmrd")
    ds = ismrmrd.Dataset(str(path), "dataset", create_if_needed=True)
    ds.write_xml_header(xml)
    for a in acqs:
        acq = ismrmrd.Acquisition.from_array(a["data"])
        acq.flags = a["flags"]
        acq.center_sample = a["center_sample"]
        acq.discard_pre, acq.discard_post = a["discard_pre"], a["discard_post"]
        for key, value in a["idx"].items():
            setattr(acq.idx, key, value)
        ds.append_acquisition(acq)
    ds.close()
    return path


WRITERS = {"h5py": _write_h5py, "ismrmrd": _write_ismrmrd_package}


# ---------------------------------------------------------------------------
# the phantom acquisition
# ---------------------------------------------------------------------------
ROWS = sorted(set(range(0, H, 2)) | set(range(H // 2 - 4, H // 2 + 4)))  # every 2nd line + 8-line centre
CALIB_ROW = 1  # a calibration-only line outside the imaging pattern


def _source(seed=0):
    """Oversampled-FOV image (S, C, H, W_OS) and its k-space; the object fills the central half."""
    rng = np.random.default_rng(seed)
    img = np.zeros((S, C, H, W_OS), np.complex64)
    inner = rng.standard_normal((S, C, H, W)) + 1j * rng.standard_normal((S, C, H, W))
    img[..., W_OS // 4: W_OS // 4 + W] = inner
    return img, image_to_kspace(img)


def _phantom_acqs(k_os, seed=1, *, extras=True):
    """Imaging acquisitions of ``k_os`` in shuffled order, plus acquisitions that must be skipped."""
    rng = np.random.default_rng(seed)
    acqs = []
    for s in range(S):
        for r in ROWS:
            if r == H // 2:  # the centre line: two averages whose mean is the true line
                delta = (rng.standard_normal((C, W_OS)) * 0.25).astype(np.complex64)
                acqs.append(_acq(k_os[s, :, r] + delta, e1=r, slc=s, average=0))
                acqs.append(_acq(k_os[s, :, r] - delta, e1=r, slc=s, average=1))
            else:
                flags = _flags(CALIB_AND_IMAGING) if r in (H // 2 - 2, H // 2 + 2) else 0
                acqs.append(_acq(k_os[s, :, r], e1=r, slc=s, flags=flags))
    order = rng.permutation(len(acqs))
    acqs = [acqs[i] for i in order]
    if extras:
        big = np.full((C, W_OS), 1e3, np.complex64)
        extra = [_acq(big, e1=H // 2, slc=0, flags=_flags(NOISE)),            # noise adjustment (first)
                 _acq(big, e1=4, slc=1, flags=_flags(NAVIGATION)),            # navigator on an imaging line
                 _acq(big, e1=6, slc=0, flags=_flags(24)),                    # phase correction
                 _acq(k_os[0, :, CALIB_ROW], e1=CALIB_ROW, slc=0, flags=_flags(CALIB)),  # calibration only
                 _acq(k_os[1, :, CALIB_ROW], e1=CALIB_ROW, slc=1, flags=_flags(CALIB)),
                 _acq(big, e1=8, slc=0, repetition=1),                        # second repetition: dropped
                 _acq(big, e1=10, slc=1, repetition=1)]
        acqs = extra[:1] + acqs[:5] + extra[1:4] + acqs[5:] + extra[4:]
    return acqs


def _expected(img, rows=ROWS):
    """The source k-space after the documented oversampling removal, unacquired rows zero."""
    k = image_to_kspace(img[..., W_OS // 4: W_OS // 4 + W])
    mask = np.zeros((S, H, W), bool)
    mask[:, rows] = True
    return k * mask[:, None], mask


@pytest.fixture
def phantom(tmp_path):
    img, k_os = _source()
    path = _write_h5py(tmp_path / "raw.h5", _phantom_acqs(k_os), _xml())
    return path, img, k_os


def _close(a, b):
    scale = float(np.abs(b).max())
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * scale)


# ---------------------------------------------------------------------------
# ISMRMRD: assembly
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_ismrmrd_assembles_the_source_kspace(writer, tmp_path):
    img, k_os = _source()
    path = WRITERS[writer](tmp_path / f"{writer}.h5", _phantom_acqs(k_os), _xml())
    assert is_ismrmrd(path)
    ks = read_kspace(path)
    want, mask = _expected(img)
    assert ks.data.dtype == np.complex64 and ks.shape == (S, C, H, W)
    _close(ks.data, want)
    unacquired = np.setdiff1d(np.arange(H), ROWS)
    assert not ks.data[:, :, unacquired].any()  # exactly zero, FFT crop keeps empty rows empty
    np.testing.assert_array_equal(ks.mask, mask)
    a = ks.attrs
    assert a["format"] == "ISMRMRD" and a["encoded_matrix"] == [W_OS, H, 1] and a["recon_matrix"] == [W, H, 1]
    assert a["encoded_fov_mm"][:2] == [480.0, 240.0] and a["recon_fov_mm"][:2] == [240.0, 240.0]
    assert a["readout_oversampling_removed"] is True and a["slice_indices"] == [0, 1]
    assert a["skipped"] == {"noise measurement": 1, "navigator": 1, "phase correction": 1, "calibration only": 2}
    assert a["dropped_counters"] == {"repetition": 1}
    assert "<ismrmrdHeader" in a["ismrmrd_header"]
    assert "ISMRMRD" in ks.layout and "readout oversampling x2 removed" in ks.layout
    assert "averaged" in ks.layout and "first repetition" in ks.layout


def test_ismrmrd_oversampling_kept_is_the_stored_kspace(phantom):
    path, img, k_os = phantom
    ks = read_ismrmrd(path, remove_oversampling=False)
    assert ks.shape == (S, C, H, W_OS) and ks.attrs["readout_oversampling_removed"] is False
    want = np.zeros_like(k_os)
    want[:, :, ROWS] = k_os[:, :, ROWS]
    np.testing.assert_allclose(ks.data, want, rtol=1e-6, atol=1e-6)  # only the averaged line is not bit-exact
    others = [r for r in ROWS if r != H // 2]
    np.testing.assert_array_equal(ks.data[:, :, others], k_os[:, :, others])
    assert "kept" in ks.layout


def test_ismrmrd_order_of_acquisitions_does_not_matter(tmp_path):
    img, k_os = _source()
    a = read_kspace(_write_h5py(tmp_path / "a.h5", _phantom_acqs(k_os, seed=1), _xml())).data
    b = read_kspace(_write_h5py(tmp_path / "b.h5", _phantom_acqs(k_os, seed=7), _xml())).data
    _close(a, b)


def test_ismrmrd_lines_slices_and_coils_are_not_mixed_up(phantom):
    """Swapped slices, flipped ky and permuted coils each differ from the read k-space."""
    path, img, _ = phantom
    got = read_kspace(path).data
    want, _ = _expected(img)
    for wrong in (want[::-1], want[:, :, ::-1], want[:, ::-1], np.roll(want, 2, axis=2)):
        assert np.abs(got - wrong).max() > 0.1 * np.abs(want).max()


def test_ismrmrd_slice_index_reads_one_slice(phantom):
    path, img, _ = phantom
    want, mask = _expected(img)
    one = read_kspace(path, slice_index=1)
    assert one.shape == (1, C, H, W)
    _close(one.data[0], want[1])
    np.testing.assert_array_equal(one.mask[0], mask[1])
    with pytest.raises(ReconError, match="slice 2 out of range; the file has 2 slice"):
        read_kspace(path, slice_index=2)


def test_ismrmrd_calibration_fill(phantom):
    path, img, _ = phantom
    ks = read_ismrmrd(path, calibration="fill")
    want, mask = _expected(img, rows=sorted(ROWS + [CALIB_ROW]))
    _close(ks.data, want)
    np.testing.assert_array_equal(ks.mask, mask)
    assert "filled from calibration-only" in ks.layout
    with pytest.raises(ReconError, match="calibration='bogus'"):
        read_ismrmrd(path, calibration="bogus")


def test_ismrmrd_off_centre_encoding_and_asymmetric_echo(tmp_path):
    """ky centre not at H//2 (lines shifted into place) and a readout with fewer samples than the
    matrix (asymmetric echo: zero-filled), without oversampling."""
    rng = np.random.default_rng(3)
    k = (rng.standard_normal((1, 2, 16, 20)) + 1j * rng.standard_normal((1, 2, 16, 20))).astype(np.complex64)
    # stored lines 0..11 are ky rows 4..15 (ky centre 8 -> stored index 4); samples are columns 4..19
    acqs = [_acq(k[0, :, r + 4, 4:], e1=r, center=6) for r in range(12)]
    xml = _xml(enc=(20, 12, 1), enc_fov=(200.0, 200.0, 5.0), rec=(20, 12, 1), rec_fov=(200.0, 200.0, 5.0),
               centre1=4)
    ks = read_kspace(_write_h5py(tmp_path / "pf.h5", acqs, xml))
    assert ks.shape == (1, 2, 16, 20)  # 12 lines with centre 4 -> padded to 16 with the centre at row 8
    want = np.zeros_like(k)
    want[..., 4:, 4:] = k[..., 4:, 4:]
    np.testing.assert_array_equal(ks.data, want)
    np.testing.assert_array_equal(ks.mask[0], (np.abs(want[0]) > 0).any(0))
    assert "ky centre 4 of 12 moved to row 8 of 16" in ks.layout


def test_ismrmrd_discard_pre_post(tmp_path):
    rng = np.random.default_rng(4)
    k = (rng.standard_normal((1, 1, 4, 8)) + 1j * rng.standard_normal((1, 1, 4, 8))).astype(np.complex64)
    pad = np.full((1, 2), 99, np.complex64)
    acqs = [_acq(np.concatenate([pad, k[0, :, r], pad[:, :1]], axis=1), e1=r, center=6, pre=2, post=1)
            for r in range(4)]
    xml = _xml(enc=(8, 4, 1), enc_fov=(1.0, 1.0, 1.0), rec=(8, 4, 1), rec_fov=(1.0, 1.0, 1.0), centre1=2)
    ks = read_kspace(_write_h5py(tmp_path / "d.h5", acqs, xml))
    np.testing.assert_array_equal(ks.data, k)


def test_ismrmrd_3d_fully_sampled_kz_becomes_slices(tmp_path):
    rng = np.random.default_rng(5)
    Z, c, h, w = 4, 2, 8, 10
    vol = (rng.standard_normal((c, Z, h, w)) + 1j * rng.standard_normal((c, Z, h, w))).astype(np.complex64)
    k3 = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(vol, axes=(1, 2, 3)), axes=(1, 2, 3), norm="ortho"),
                         axes=(1, 2, 3)).astype(np.complex64)
    rows = [0, 2, 3, 4, 5, 6]
    acqs = [_acq(k3[:, z, r], e1=r, e2=z) for r in rows for z in range(Z)]
    xml = _xml(enc=(w, h, Z), enc_fov=(100.0, 100.0, 40.0), rec=(w, h, Z), rec_fov=(100.0, 100.0, 40.0),
               centre1=4, centre2=2)
    path = _write_h5py(tmp_path / "3d.h5", acqs[::-1], xml)
    ks = read_kspace(path)
    want = image_to_kspace(np.transpose(vol, (1, 0, 2, 3)))  # (Z, coils, h, w): 2-D k-space per slice
    mask = np.zeros((h, w), bool)
    mask[rows] = True
    want = want * mask
    assert ks.shape == (Z, c, h, w)
    _close(ks.data, want)
    np.testing.assert_array_equal(ks.mask, np.broadcast_to(mask, (Z, h, w)))
    assert "3-D" in ks.layout
    _close(read_kspace(path, slice_index=3).data[0], want[3])
    # kz undersampled: refused
    path2 = _write_h5py(tmp_path / "3du.h5", [a for a in acqs if not (a["idx"]["kspace_encode_step_1"] == 2
                                                                      and a["idx"]["kspace_encode_step_2"] == 1)],
                        xml)
    with pytest.raises(ReconError, match="undersampled along kz"):
        read_kspace(path2)


def test_fastmri_h5_is_still_fastmri(tmp_path):
    k = (np.ones((2, 3, 8, 6)) + 1j).astype(np.complex64)
    p = tmp_path / "fastmri.h5"
    with h5py.File(p, "w") as fh:
        fh.create_dataset("kspace", data=k)
    assert not is_ismrmrd(p)
    ks = read_kspace(p)
    assert ks.shape == (2, 3, 8, 6) and "ISMRMRD" not in ks.layout
    assert ".dat" in KSPACE_SUFFIXES and 19 in ISMRMRD_SKIPPED_FLAGS


def test_ismrmrd_custom_group_name_via_dataset(tmp_path):
    img, k_os = _source()
    p = _write_h5py(tmp_path / "g.h5", _phantom_acqs(k_os), _xml())
    with h5py.File(p, "a") as fh:
        fh.move("dataset", "scan1")
    assert not is_ismrmrd(p) and is_ismrmrd(p, "scan1")
    want, _ = _expected(img)
    _close(read_kspace(p, dataset="scan1").data, want)


# ---------------------------------------------------------------------------
# ISMRMRD: end to end
# ---------------------------------------------------------------------------
def test_recon_mri_on_ismrmrd_end_to_end(phantom, tmp_path, capsys):
    path, _, _ = phantom
    out = tmp_path / "zf"
    rc = main(["mri", "--kspace", str(path), "--method", "zero-filled", "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    m = run["measurement"]
    assert m["coils"] == C and m["shape"] == [H, W] and m["undersampled_input"] is True
    assert "ISMRMRD" in m["layout"]
    assert (out / "recon.nii.gz").exists()


def test_recon_mri_bad_ismrmrd_is_one_line_exit_2(tmp_path, capsys):
    p = _write_h5py(tmp_path / "noxml.h5", [_acq(_one())], _small_xml())
    with h5py.File(p, "a") as fh:
        del fh["dataset/xml"]
    rc = main(["mri", "--kspace", str(p), "--method", "zero-filled", "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "no 'xml' dataset" in lines[0]


# ---------------------------------------------------------------------------
# ISMRMRD: bad files
# ---------------------------------------------------------------------------
def _one(n=8, c=2):
    return (np.arange(c * n).reshape(c, n) + 1j).astype(np.complex64)


def _small_xml(**kw):
    base = dict(enc=(8, 4, 1), enc_fov=(1.0, 1.0, 1.0), rec=(8, 4, 1), rec_fov=(1.0, 1.0, 1.0), centre1=2)
    base.update(kw)
    return _xml(**base)


def _bad_cases():
    def nan_line():
        line = _one()
        line[0, 3] = np.nan
        return line

    head_no_slice = np.dtype([(n, _HEAD.fields[n][0]) for n in _HEAD.names if n != "idx"]
                             + [("idx", np.dtype([("kspace_encode_step_1", "<u2")]))])
    acq_no_slice = np.dtype([("head", head_no_slice), ("traj", h5py.vlen_dtype(np.float32)),
                             ("data", h5py.vlen_dtype(np.float32))])
    return {
        "xml not xml": ([_acq(_one())], "<ismrmrdHeader><encoding>", {}, "not valid XML"),
        "no encoding": ([_acq(_one())], _xml(encoding=False), {}, "no <encoding> element"),
        "no matrix": ([_acq(_one())], _small_xml().replace("<matrixSize><x>8</x><y>4</y><z>1</z></matrixSize>",
                                                           "", 1), {}, "lacks encoding/encodedSpace/matrixSize"),
        "bad number": ([_acq(_one())], _small_xml().replace("<x>8</x>", "<x>eight</x>", 1), {}, "not a number"),
        "line outside matrix": ([_acq(_one(), e1=4)], _small_xml(), {}, "kspace_encode_step_1 = 4, outside"),
        "samples outside matrix": ([_acq(_one(12), e1=0)], _small_xml(), {}, "do not fit the encodedSpace"),
        "data length": ([_acq(_one())], _small_xml(), {"data_override": {0: np.zeros(5, np.float32)}},
                        "stores 5 values but its header"),
        "nan": ([_acq(nan_line(), e1=1)], _small_xml(), {}, r"acquisition 0 \(slice 0, line 1\) contains NaN"),
        "coil counts": ([_acq(_one(c=2), e1=0), _acq(_one(c=3), e1=1)], _small_xml(), {},
                        "different or zero coil counts"),
        "only noise": ([_acq(_one(), flags=_flags(NOISE))], _small_xml(), {}, "none of the 1 acquisitions"),
        "radial xml": ([_acq(_one())], _small_xml(trajectory="radial"), {}, "trajectory 'radial' is not supported"),
        "trajectory": ([_acq(_one(), traj_dims=2)], _small_xml(), {}, "carry k-space trajectories"),
        "reverse": ([_acq(_one(), flags=_flags(REVERSE))], _small_xml(), {}, "ACQ_IS_REVERSE"),
        "multi-slab 3d": ([_acq(_one(), e2=1, slc=0), _acq(_one(), e2=0, slc=1)], _small_xml(enc=(8, 4, 2)), {},
                          "with 2 slabs is not supported"),
        "missing head field": ([_acq(_one())], _small_xml(), {"acq_dtype": acq_no_slice}, "lack idx.slice"),
        "empty": ([], _small_xml(), {}, "holds no acquisitions"),
    }


@pytest.mark.parametrize("case", sorted(_bad_cases()))
def test_ismrmrd_bad_files_give_one_clear_error(case, tmp_path):
    acqs, xml, kw, message = _bad_cases()[case]
    p = _write_h5py(tmp_path / "bad.h5", acqs, xml, **kw)
    with pytest.raises(ReconError, match=message) as info:
        read_kspace(p)
    assert str(p) in str(info.value) and "\n" not in str(info.value)


def test_ismrmrd_structural_errors(tmp_path):
    p = tmp_path / "nodata.h5"
    with h5py.File(p, "w") as fh:
        fh.create_group("dataset").create_dataset("xml", data=[_small_xml().encode()])
    with pytest.raises(ReconError, match="has no 'data' dataset .the acquisitions."):
        read_kspace(p)
    p = tmp_path / "notcompound.h5"
    with h5py.File(p, "w") as fh:
        grp = fh.create_group("dataset")
        grp.create_dataset("xml", data=[_small_xml().encode()])
        grp.create_dataset("data", data=np.zeros(4, np.float32))
    with pytest.raises(ReconError, match="without the ISMRMRD 'head' and 'data' members"):
        read_kspace(p)
    p = tmp_path / "corrupt.h5"
    good = _write_h5py(tmp_path / "good.h5", [_acq(_one())], _small_xml())
    p.write_bytes(good.read_bytes()[:600])
    with pytest.raises(ReconError, match="truncated, corrupt or not HDF5"):
        read_kspace(p)
    p = tmp_path / "garbage.h5"
    p.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(ReconError, match="cannot read this HDF5 file"):
        read_kspace(p)
    with pytest.raises(ReconError, match="no such file"):
        read_kspace(tmp_path / "missing.h5")
    with pytest.raises(ReconError, match="has no ISMRMRD group '/nope'"):
        read_ismrmrd(good, group="nope")


# ---------------------------------------------------------------------------
# Siemens twix: missing package, fake twixtools (assembly logic), real twixtools file
# ---------------------------------------------------------------------------
_TWIX_DIMS = ("Ide", "Idd", "Idc", "Idb", "Ida", "Seg", "Set", "Rep", "Phs", "Eco", "Par", "Sli", "Ave", "Lin",
              "Cha", "Col")


def _twix_remove_os(x):
    """twixtools.recon_helpers.remove_oversampling on the last axis (backward-normalised FFTs)."""
    n = x.shape[-1]
    img = np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(x, axes=-1), axis=-1), axes=-1)[..., n // 4:n * 3 // 4]
    return np.fft.fftshift(np.fft.fft(np.fft.ifftshift(img, axes=-1), axis=-1), axes=-1)


class FakeTwixArray:
    """Mimics twixtools' ``twix_array``: ``dims``, ``shape``, ``flags`` (average, remove_os,
    squeeze_*), ``kspace_center_lin/col`` and numpy-style ``__getitem__`` on the 16 twix dims."""

    def __init__(self, full, center_lin, center_col):
        self.full = np.asarray(full, np.complex64)  # 16-D in _TWIX_DIMS order
        self.kspace_center_lin, self.kspace_center_col = center_lin, center_col
        self.flags = {"average": {d: d in ("Ave", "Seg") for d in _TWIX_DIMS}, "remove_os": False,
                      "squeeze_singletons": True, "squeeze_ave_dims": False}

    @property
    def dims(self):
        assert not self.flags["squeeze_singletons"], "the reader must switch squeezing off"
        return _TWIX_DIMS

    @property
    def shape(self):
        return self._data().shape

    def _data(self):
        x = self.full
        for i, d in enumerate(_TWIX_DIMS):
            if self.flags["average"][d]:
                x = x.mean(axis=i, keepdims=True)
        return _twix_remove_os(x) if self.flags["remove_os"] else x

    def __getitem__(self, index):
        return self._data()[index].astype(np.complex64)


def _twix_full(k, *, ave=None, rep=None):
    """(S, C, L, N) k-space -> the 16-D twix array (Sli, Lin, Cha, Col set; optional Ave / Rep axes)."""
    x = np.transpose(k, (0, 2, 1, 3))  # (Sli, Lin, Cha, Col)
    shape = [1] * 16
    shape[11], shape[13], shape[14], shape[15] = x.shape
    full = x.reshape(shape)
    if ave is not None:
        full = np.concatenate([full + ave, full - ave], axis=12)
    if rep is not None:
        full = np.concatenate([full, np.broadcast_to(rep, full.shape)], axis=7)
    return full


def _fake_twixtools(monkeypatch, measurements):
    fake = types.ModuleType("twixtools")
    fake.read_twix = lambda path, **kw: [{"hdr": {}, "mdb": []}]
    fake.map_twix = lambda scans, **kw: measurements
    monkeypatch.setitem(sys.modules, "twixtools", fake)
    # the fake files are not twix files: skip the block-chain walk (it would use the real
    # twixtools' submodules when those were imported by an earlier test)
    monkeypatch.setattr(kspace_module, "_twix_prewalk", lambda path: None)
    return fake


def _twix_source(seed=0, s=2, c=3, lines=10, cols=16):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((s, c, lines, cols)) + 1j * rng.standard_normal((s, c, lines, cols))
            ).astype(np.complex64)


def test_twix_missing_package_names_the_extra(tmp_path, monkeypatch):
    p = tmp_path / "meas.dat"
    p.write_bytes(b"\0" * 64)
    monkeypatch.setitem(sys.modules, "twixtools", None)  # import twixtools -> ImportError
    with pytest.raises(ReconError, match=r"needs the optional package 'twixtools'.*scoreprior-recon\[siemens\]"):
        read_kspace(p)


def test_twix_assembly_with_fake_twixtools(tmp_path, monkeypatch):
    k = _twix_source()
    k[:, :, 1::2] = 0  # every 2nd line acquired
    rng = np.random.default_rng(9)
    ave = (rng.standard_normal(_twix_full(k).shape) * 0.1).astype(np.complex64)
    img = FakeTwixArray(_twix_full(k, ave=ave, rep=np.complex64(50)), center_lin=5, center_col=8)
    noise = FakeTwixArray(_twix_full(np.full_like(k, 1e3)), 5, 8)
    adjust = {"image": FakeTwixArray(_twix_full(np.full_like(k, 7)), 5, 8), "hdr": {}}
    hdr = {"MeasYaps": {"sKSpace": {"lBaseResolution": 16, "lPhaseEncodingLines": 10},
                        "sSliceArray": {"asSlice": [{"dReadoutFOV": 220.0, "dPhaseFOV": 200.0, "dThickness": 3.0}]}}}
    _fake_twixtools(monkeypatch, [adjust, {"image": img, "noise": noise, "hdr": hdr}])
    p = tmp_path / "meas.dat"
    p.write_bytes(b"\0" * 64)
    ks = read_kspace(p, remove_oversampling=False)  # last measurement, first repetition, averages averaged
    assert ks.shape == k.shape
    np.testing.assert_allclose(ks.data, k, rtol=0, atol=1e-5)
    rows = np.zeros(10, bool)
    rows[::2] = True
    np.testing.assert_array_equal(ks.mask, np.broadcast_to(rows[None, :, None], (2, 10, 16)))
    a = ks.attrs
    assert a["format"] == "Siemens twix" and a["measurements_in_file"] == 2 and a["dropped_counters"] == {"Rep": 2}
    assert a["readout_fov_mm"] == 220.0 and a["phase_encoding_lines"] == 10 and a["categories"] == ["image", "noise"]
    assert "first Rep of 2 read" in ks.layout and img.flags["average"]["Ave"] is True
    for wrong in (k[::-1], k[:, ::-1], k[:, :, ::-1]):
        assert np.abs(ks.data - wrong).max() > 0.1
    # readout oversampling removed by twixtools' remove_os; one slice
    one = read_kspace(p, slice_index=1)
    assert img.flags["remove_os"] is True and one.shape == (1, 3, 10, 8)
    np.testing.assert_allclose(one.data[0], _twix_remove_os(k[1]), rtol=0, atol=1e-4)
    with pytest.raises(ReconError, match="slice 2 out of range"):
        read_kspace(p, slice_index=2)


def test_twix_centering_and_reference_fill_with_fake(tmp_path, monkeypatch):
    """Partial Fourier (lines 0..7 of 12, centre line 6) and asymmetric echo (12 columns, centre 4)
    are zero-padded so the centre lands at (H//2, W//2); refscan lines fill missing lines."""
    k = _twix_source(s=1, c=2, lines=8, cols=12)
    k[:, :, 1:4:2] = 0  # lines 1 and 3 missing from the image data
    ref_k = np.zeros_like(k)
    ref_k[:, :, 1:4] = _twix_source(seed=5, s=1, c=2, lines=3, cols=12)
    img = FakeTwixArray(_twix_full(k), center_lin=6, center_col=4)
    ref = FakeTwixArray(_twix_full(ref_k), center_lin=6, center_col=4)
    hdr = {"MeasYaps": {"sKSpace": {"lPhaseEncodingLines": 12}}}
    _fake_twixtools(monkeypatch, [{"image": img, "refscan": ref, "hdr": hdr}])
    p = tmp_path / "pf.dat"
    p.write_bytes(b"\0" * 64)
    ks = read_siemens_twix(p, remove_oversampling=False)
    # lines: 12 (header) with centre 6 -> H 12, offset 0; columns: 12 with centre 4 -> W 16, offset 4
    assert ks.shape == (1, 2, 12, 16)
    want = np.zeros((1, 2, 12, 16), np.complex64)
    want[:, :, :8, 4:] = k
    np.testing.assert_array_equal(ks.data, want)
    assert ks.mask[0, :8, 4:].any(1).tolist() == [True, False, True, False] + [True] * 4
    assert not ks.mask[0, 8:].any() and not ks.mask[0, :, :4].any()
    assert "GRAPPA reference scan skipped" in ks.layout
    filled = read_siemens_twix(p, remove_oversampling=False, calibration="fill")
    want[:, :, 1, 4:], want[:, :, 3, 4:] = ref_k[:, :, 1], ref_k[:, :, 3]
    np.testing.assert_array_equal(filled.data, want)
    assert "2 line(s) filled" in filled.layout


def test_twix_refusals_with_fake(tmp_path, monkeypatch):
    p = tmp_path / "x.dat"
    p.write_bytes(b"\0" * 64)
    k = _twix_source(s=1)
    full = np.concatenate([_twix_full(k)] * 2, axis=10)  # two partitions: 3-D
    _fake_twixtools(monkeypatch, [{"image": FakeTwixArray(full, 5, 8), "hdr": {}}])
    with pytest.raises(ReconError, match="3-D twix data .2 partitions. are not supported"):
        read_kspace(p)
    _fake_twixtools(monkeypatch, [{"noise": FakeTwixArray(_twix_full(k), 5, 8), "hdr": {}}])
    with pytest.raises(ReconError, match="has no imaging data .twixtools found: noise."):
        read_kspace(p)
    bad = k.copy()
    bad[0, 0, 0, 0] = np.nan
    _fake_twixtools(monkeypatch, [{"image": FakeTwixArray(_twix_full(bad), 5, 8), "hdr": {}}])
    with pytest.raises(ReconError, match="NaN or infinite"):
        read_kspace(p)
    fake = _fake_twixtools(monkeypatch, [])
    fake.map_twix = lambda scans, **kw: (_ for _ in ()).throw(ValueError("bad block"))
    with pytest.raises(ReconError, match=r"not a readable Siemens raw-data .twix. file: twixtools failed"):
        read_kspace(p)


# -- real twixtools -----------------------------------------------------------
def _twix_hdr(n_slices, base_res, lines):
    yaps = (f"sKSpace.lBaseResolution = {base_res}\nsKSpace.lPhaseEncodingLines = {lines}\n"
            "sKSpace.lPartitions = 1\nsKSpace.ucDimension = 0x2\n"
            f"sSliceArray.lSize = {n_slices}\n"
            + "".join(f"sSliceArray.asSlice[{i}].dReadoutFOV = 200\nsSliceArray.asSlice[{i}].dPhaseFOV = 200\n"
                      f"sSliceArray.asSlice[{i}].dThickness = 5\n" for i in range(n_slices)))
    bufs = {"Config": '<ParamString."chronSliceIndices">  { "-" }\n',
            "Dicom": '<ParamString."SoftwareVersions">  { "syngo MR XA30" }\n',
            "Meas": '<ParamString."tPatientPosition">  { "HFS" }\n',
            "MeasYaps": "### ASCCONV BEGIN ###\n" + yaps + "### ASCCONV END ###\n"}
    body = b"".join(name.encode() + b"\0" + struct.pack("<I", len(text) + 1) + text.encode("latin1") + b"\0"
                    for name, text in bufs.items())
    hdr_len = 8 + len(body)
    hdr_len += (-hdr_len) % 32
    raw = struct.pack("<II", hdr_len, len(bufs)) + body
    return np.frombuffer(raw + b"\0" * (hdr_len - len(raw)), dtype="S1")


def _write_twix(path, k, rows, twixtools):
    from twixtools.mdb import Mdb_local

    n_s, n_c, n_l, n_col = k.shape
    mdbs = []
    noise = Mdb_local()
    noise.data = np.full((n_c, n_col), 1e3, np.complex64)
    noise.add_flag("NOISEADJSCAN")
    mdbs.append(noise)
    order = [(s, r) for r in rows for s in range(n_s)][::-1]  # reversed, slices interleaved
    for s, r in order:
        m = Mdb_local()
        m.data = k[s, :, r]
        m.mdh.Counter.Lin, m.mdh.Counter.Sli = r, s
        m.mdh.CenterCol, m.mdh.CenterLin = n_col // 2, n_l // 2
        m.mdh.SliceData.Quaternion[0] = 1.0
        mdbs.append(m)
    end = Mdb_local()
    end.add_flag("ACQEND")
    mdbs.append(end)
    twixtools.write_twix([{"hdr_str": _twix_hdr(n_s, n_col // 2, n_l), "mdb": mdbs}], str(path))
    return path


def test_twix_real_file_round_trip(tmp_path):
    twixtools = pytest.importorskip("twixtools")
    k = _twix_source(s=2, c=3, lines=8, cols=16)
    rows = [0, 2, 3, 4, 5, 6]
    p = _write_twix(tmp_path / "meas.dat", k, rows, twixtools)
    ks = read_kspace(p)
    want = np.zeros((2, 3, 8, 8), np.complex64)
    want[:, :, rows] = _twix_remove_os(k[:, :, rows])
    assert ks.shape == want.shape
    np.testing.assert_allclose(ks.data, want, rtol=0, atol=1e-4)
    assert ks.mask[:, :, 0].tolist() == [[r in rows for r in range(8)]] * 2
    assert ks.attrs["categories"] == ["image", "noise"] and ks.attrs["base_resolution"] == 8
    raw = read_kspace(p, remove_oversampling=False)
    want = np.zeros_like(k)
    want[:, :, rows] = k[:, :, rows]
    np.testing.assert_array_equal(raw.data, want)


def test_twix_real_corrupt_files(tmp_path):
    pytest.importorskip("twixtools")
    good = _write_twix(tmp_path / "good.dat", _twix_source(s=1, c=2, lines=4, cols=8), [0, 1, 2, 3],
                       pytest.importorskip("twixtools"))
    cases = {"zeros.dat": b"\0" * 4096,                                  # VE header listing 0 measurements
             "tiny.dat": b"\1\2\3",
             "truncated.dat": good.read_bytes()[:12000],                  # measurement beyond the file end
             # VB layout whose first data block has zero channels (zero length): twixtools would loop forever
             "zero-block.dat": struct.pack("<II", 20000, 100) + b"\0" * (20000 - 8) + b"\0" * 512}
    for name, raw in cases.items():
        p = tmp_path / name
        p.write_bytes(raw)
        with pytest.raises(ReconError, match="not a readable Siemens raw-data .twix. file") as info:
            read_kspace(p)
        assert "\n" not in str(info.value), name


def test_recon_mri_on_siemens_twix_end_to_end(tmp_path, capsys):
    twixtools = pytest.importorskip("twixtools")
    img, k_os = _source()  # 2 slices, 4 coils, 32 lines, 96 oversampled columns
    p = _write_twix(tmp_path / "meas.dat", k_os, ROWS, twixtools)
    out = tmp_path / "zf"
    rc = main(["mri", "--kspace", str(p), "--slice", "1", "--method", "zero-filled", "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "run.json").read_text())["measurement"]
    assert m["coils"] == C and m["shape"] == [H, W] and "Siemens twix" in m["layout"]
