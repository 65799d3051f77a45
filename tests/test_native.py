"""Native-resolution detail priors (issue #10): training at the images' own pixels, tiled
denoising, the multi-scale denoiser with a detail prior, loading, and applicability."""
import json

import numpy as np
import pytest
import torch

from recon.errors import ReconError
from recon.multiscale import ResampledPrior, denoise_tiled, detail_applies, for_data
from recon.networks import UNet
from recon.prior import EDMDenoiser, Prior, load_prior, save_prior
from recon.train import TrainConfig, dihedral, load_image_folder, load_native_images, native_patches, train

DETAIL_META = {"image_size": 16, "modality": "ct", "window": [-1000, 1000], "sde": {"name": "ve"},
               "native": True, "pixel_mm": 0.8, "pixel_mm_range": [0.7, 1.0], "name": "tiny-detail",
               "architecture": {"channels": 1, "base": 8, "mults": [1, 2], "n_res": 1, "attn_levels": [],
                                "coords": False, "sigma_data": 0.5}}


def tiny_net_prior(meta: dict, seed: int):
    """A tiny random-weight U-Net prior with metadata ``meta`` (non-trivial weights: zero-init layers otherwise)."""
    torch.manual_seed(seed)
    net = UNet(**{k: v for k, v in meta["architecture"].items() if k != "sigma_data"})
    for p in net.parameters():
        p.data.normal_(0, 0.05)
    return Prior(EDMDenoiser(net), meta).eval()


def tiny_detail(seed=1):
    return tiny_net_prior(DETAIL_META, seed)


def tiny_whole(seed=0):
    from tests.test_prior import tiny_prior

    return tiny_prior(seed).eval()


class Pointwise:
    """D(x, sigma) = x / (1 + sigma^2), per batch element: any tiling must reproduce it exactly."""

    meta = {"image_size": 16, "name": "pointwise"}
    image_size = 16

    def denoise(self, x, sigma):
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1)
        return x / (1 + s**2)


# ---------------------------------------------------------------------------
# tiles
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 150, 203), (2, 97, 300), (1, 129, 129), (1, 40, 260)])
def test_tiles_reproduce_a_pointwise_denoiser_exactly(shape):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    sig = torch.tensor([0.3, 0.05])[: shape[0]]
    out = denoise_tiled(Pointwise(), x, sig, tile=64, overlap=16)
    assert torch.allclose(out, x / (1 + sig.reshape(-1, 1, 1) ** 2), atol=1e-6)


def test_tiles_of_a_network_blend_smoothly_and_equal_it_when_one_tile_covers_the_image():
    from recon.multiscale import denoise_any_size

    p = tiny_detail()
    x = torch.rand(1, 40, 36, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(denoise_tiled(p, x, 0.1, tile=64, overlap=16), denoise_any_size(p, x, 0.1))
        whole = denoise_any_size(p, x, 0.1)
        tiled = denoise_tiled(p, x, 0.1, tile=24, overlap=8)
    assert tiled.shape == x.shape and torch.isfinite(tiled).all()
    # a convolutional network with a limited receptive field: tiles agree with the whole image
    # away from the tiles' borders, only GroupNorm statistics differ
    assert float((tiled - whole).abs().mean()) < 0.2 * float(whole.abs().mean())


def test_a_large_batch_runs_in_chunks_on_the_cpu_with_the_same_values(monkeypatch):
    import recon.prior as prior_mod
    from tests.test_prior import tiny_prior

    for p in (tiny_detail(), tiny_prior()):  # without and with coordinate channels
        x = torch.rand(7, 16, 16, generator=torch.Generator().manual_seed(2))
        sig = torch.linspace(0.05, 2.0, 7)
        calls = []
        hook = p.denoiser.net.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
        with torch.no_grad():
            whole = p.denoise(x, sig)
            monkeypatch.setattr(prior_mod, "CPU_CHUNK_PX", 3 * 16 * 16)
            chunked = p.denoise(x, sig)
        with torch.enable_grad():  # gradients (DPS): one call
            p.denoise(x.clone().requires_grad_(), sig)
        hook.remove()
        monkeypatch.undo()
        assert calls == [7, 3, 3, 1, 7]
        assert torch.allclose(chunked, whole, atol=1e-5)


# ---------------------------------------------------------------------------
# the multi-scale denoiser with a detail prior
# ---------------------------------------------------------------------------
def test_multiscale_denoiser_equals_its_parts_in_each_band_and_in_a_mixed_batch():
    whole, detail = tiny_whole(), tiny_detail()
    x = torch.rand(3, 40, 52, generator=torch.Generator().manual_seed(2))
    ms = ResampledPrior(whole, 2.5, detail=detail, detail_below=0.2)
    plain = ResampledPrior(whole, 2.5)
    with torch.no_grad():
        for s in (0.01, 0.15):  # below the split: the detail prior alone, on the data's grid
            assert torch.equal(ms.denoise(x, s), denoise_tiled(detail, x, s))
        for s in (0.2, 0.9, 5.0):  # at and above: the whole-image prior's two bands
            assert torch.equal(ms.denoise(x, s), plain.denoise(x, s))
        mixed = torch.tensor([0.05, 1.0, 0.1])
        out = ms.denoise(x, mixed)
        for i, s in enumerate(mixed.tolist()):
            assert torch.allclose(out[i], ms.denoise(x[i:i + 1], s)[0], atol=1e-5)
    rec = ms.describe()
    assert rec["detail_prior"] == "tiny-detail" and rec["detail_below"] == 0.2 and "below noise 0.2" in rec["action"]
    off = ResampledPrior(whole, 2.5, detail=detail, detail_below=0.0)
    assert off.detail is None and off.describe()["detail_prior"] is None


def test_detail_prior_applies_by_pixel_size_or_else_by_scale():
    d = tiny_detail()
    assert detail_applies(d, 4.0, 0.7)[0] and detail_applies(d, 1.0, 1.4)[0]      # within 1.5x of 0.7-1.0 mm
    ok, why = detail_applies(d, 4.0, 2.0)                                            # 2 mm: too coarse
    assert not ok and "outside" in why
    assert detail_applies(d, 4.0, None)[0] and not detail_applies(d, 1.2, None)[0]  # unknown pixels: by scale
    unknown = Prior(d.denoiser, {**DETAIL_META, "pixel_mm": None, "pixel_mm_range": None})
    assert detail_applies(unknown, 2.0, 0.5)[0] and not detail_applies(unknown, 1.0, 0.5)[0]


def test_detail_prior_without_pixel_sizes_applies_by_its_training_matrix():
    """A brain prior trained on 224-px slices suits a 160-px slice of unknown pixel size (1.25x
    the 128-px whole prior, which the scale rule alone refused), not a 512-px one."""
    d = Prior(tiny_detail().denoiser, {**DETAIL_META, "pixel_mm": None, "pixel_mm_range": None,
                                       "native_px_range": [224, 224]})
    ok, why = detail_applies(d, 1.25, None, side=160)
    assert ok and "within 149-336 px" in why
    ok, why = detail_applies(d, 4.0, None, side=512)
    assert not ok and "outside" in why
    assert not detail_applies(d, 1.25, None)[0]              # no side given: the scale rule
    whole = tiny_whole()
    whole.detail_prior = d
    assert for_data(whole, (20, 14)).detail is None          # 20 px: far below 224 / 1.5
    big = Prior(d.denoiser, {**d.meta, "native_px_range": [20, 24]})
    whole.detail_prior = big
    assert for_data(whole, (20, 14)).detail is not None      # its own training matrix


def test_for_data_attaches_the_detail_prior_only_where_it_applies():
    whole = tiny_whole()
    whole.detail_prior = tiny_detail()
    assert for_data(whole, (64, 64)).detail is not None                      # 4x finer, pixels unknown
    assert for_data(whole, (64, 64), pixel_mm=3.0).detail is None            # 3 mm: not the detail prior's scale
    assert for_data(whole, (16, 16)).detail is None                          # the whole prior's own grid
    assert for_data(whole, (64, 64), detail_below=0).detail is None          # turned off
    assert for_data(whole, (64, 64), detail_below=0.5).detail_below == 0.5
    whole.meta = {**whole.meta, "detail_below_sigma": 0.1}
    assert for_data(whole, (64, 64)).detail_below == 0.1


def test_the_split_level_given_on_the_command_line_reaches_the_sampler_and_the_record(tmp_path):
    import nibabel as nib

    from recon.cli import main

    whole = tiny_whole()
    whole.meta = {**whole.meta, "detail_prior": "tiny-detail"}
    prior = save_prior(whole, tmp_path / "w.safetensors")
    save_prior(tiny_detail(), tmp_path / "tiny-detail.safetensors")
    img = tmp_path / "x.npy"
    np.save(img, np.random.default_rng(0).uniform(0, 1, (40, 40)).astype(np.float32))
    outs = {}
    for below in (None, "0", "0.5", "1000"):  # levels 7.5, 2.8, 0.92, 0.24, 0.045, 0.005
        out = tmp_path / f"r{below}"
        args = ["ct", str(img), "--views", "8", "--method", "score-fast", "--prior", str(prior),
                "--param", "n_steps=6", "--out", str(out), "--quiet"]
        if below is not None:
            args += ["--param", f"detail_below={below}"]
        assert main(args) == 0
        run = json.loads((out / "run.json").read_text())
        want = 0.2 if below is None else float(below)  # the default split, else the one asked for
        assert run["prior_scale"]["detail_below"] == want
        assert (run["prior_scale"]["detail_prior"] is None) == (want == 0)
        outs[below] = np.asarray(nib.load(out / "recon.nii.gz").dataobj)
    keys = list(outs)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert not np.array_equal(outs[a], outs[b]), (a, b)


# ---------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------
def test_load_prior_loads_the_named_detail_prior_beside_it_and_fails_clearly_without(tmp_path):
    whole = tiny_whole()
    whole.meta = {**whole.meta, "detail_prior": "tiny-detail"}
    path = save_prior(whole, tmp_path / "w.safetensors")
    with pytest.raises(ReconError, match="names the detail prior 'tiny-detail'.*beside it.*remove"):
        load_prior(path)
    save_prior(tiny_detail(), tmp_path / "tiny-detail.safetensors")
    p = load_prior(path)
    assert p.detail_prior.meta["native"] is True
    x = torch.rand(1, 16, 16)
    with torch.no_grad():
        assert torch.equal(p.detail_prior.denoise(x, 0.1), tiny_detail().denoise(x, 0.1))
    assert not hasattr(load_prior(path, detail=False), "detail_prior")
    # the OOD fingerprint is the whole-image network's alone
    from recon.ood import weights_fingerprint

    assert weights_fingerprint(p) == weights_fingerprint(load_prior(path, detail=False))
    # metadata written before detail priors existed still loads, without one
    meta = json.loads(path.with_suffix(".json").read_text())
    meta.pop("detail_prior")
    path.with_suffix(".json").write_text(json.dumps(meta))
    assert getattr(load_prior(path), "detail_prior", None) is None


@pytest.mark.parametrize("method", ["score", "score-fast", "dps"])
def test_every_score_method_runs_with_a_detail_prior_at_odd_sizes(method):
    from recon.methods import get_method
    from tests.test_multiscale import odd_size_problems

    whole = tiny_whole()
    whole.detail_prior = tiny_detail()
    shape = (41, 35)
    for y, op in odd_size_problems(shape):
        out = get_method(method)(y, op, prior=whole, n_steps=4, seed=0)
        off = get_method(method)(y, op, prior=whole, n_steps=4, seed=0, detail_below=0)
        assert out.shape == (1, *shape) and torch.isfinite(out).all()
        assert not torch.equal(out, off)  # the detail prior took part
        every = get_method(method)(y, op, prior=whole, n_steps=4, seed=0, detail_below=1e3)
        assert not torch.equal(out, every)  # the split level matters, not only on/off
    with pytest.raises(ReconError, match="detail_below"):
        get_method(method)(y, op, prior=whole, n_steps=2, detail_below=-1)


# ---------------------------------------------------------------------------
# native training
# ---------------------------------------------------------------------------
def _write_ct_series(folder, shapes, pixel_mm=0.8):
    """Synthetic single-slice DICOM CT files of the given (rows, cols), HU up to +2000."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(shapes):
        yy, xx = np.mgrid[:h, :w]
        hu = np.full((h, w), -1000.0)
        hu[(yy - h / 2) ** 2 / (0.4 * h) ** 2 + (xx - w / 2) ** 2 / (0.4 * w) ** 2 < 1] = 40
        hu[(yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (0.08 * min(h, w)) ** 2] = 2000  # bone above the window
        hu += rng.normal(0, 10, hu.shape)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"s{i}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.Modality, ds.PatientID = "CT", f"P{i % 3}"
        ds.Rows, ds.Columns = h, w
        ds.PixelSpacing = [pixel_mm, pixel_mm]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = np.round(hu + 1024).astype(np.int16).tobytes()
        ds.save_as(str(folder / f"s{i}.dcm"), enforce_file_format=True)
    return folder


def test_native_images_keep_their_own_grid_and_full_range(tmp_path):
    data = _write_ct_series(tmp_path / "ct", [(70, 90), (64, 130), (101, 77)])
    images, patients, mm = load_native_images([data], "ct")
    assert sorted(tuple(t.shape) for t in images) == [(64, 130), (70, 90), (101, 77)]  # nothing resized
    assert max(float(t.max()) for t in images) > 1.4  # +2000 HU on the [-1000, 1000] window: 1.5
    assert min(float(t.min()) for t in images) >= 0.0 and mm == [0.8] * 3
    clipped, _ = load_image_folder([data], "ct", 32)
    full, _ = load_image_folder([data], "ct", 32, full_range=True)
    assert float(clipped.max()) <= 1.0 < float(full.max())


def test_native_patches_are_exact_crops_under_the_eight_symmetries():
    g = torch.Generator().manual_seed(0)
    img = torch.arange(30 * 41, dtype=torch.float32).reshape(30, 41) / 1000 + 0.1
    crops = native_patches([img], 8, 32, g)
    assert crops.shape == (32, 1, 8, 8)
    windows = {tuple(dihedral(img[y:y + 8, x:x + 8], k).flatten().tolist())
               for y in range(23) for x in range(34) for k in range(8)}
    assert all(tuple(c[0].flatten().tolist()) in windows for c in crops)
    # air-only crops are mostly redrawn
    air = torch.zeros(64, 64)
    air[40:, 40:] = 0.5
    share = float((native_patches([air], 16, 200, g).flatten(1).std(1) < 0.01).float().mean())
    assert share < 0.5  # about 0.36 of positions are air: with air_keep 0.1 far fewer are drawn


def test_native_training_records_its_scale_and_resumes_bit_exactly(tmp_path):
    from safetensors.torch import load_file

    data = _write_ct_series(tmp_path / "ct", [(40, 50), (36, 70), (44, 44), (52, 40), (40, 40), (38, 61)])
    common = dict(data=[data], modality="ct", patch=16, batch=4, base=8, mults=(1, 2), seed=5, progress=False,
                  checkpoint_every=2, native=True, p_mean=-3.0, p_std=1.2)
    a = train(TrainConfig(out=str(tmp_path / "a"), steps=4, **common), log=lambda m: None)
    meta = json.loads(a.with_suffix(".json").read_text())
    assert meta["native"] is True and meta["image_size"] == 16 and meta["architecture"]["coords"] is False
    assert meta["pixel_mm"] == 0.8 and meta["pixel_mm_range"] == [0.8, 0.8] and meta["full_range"] is True
    lo, hi = meta["native_px_range"]  # larger sides 40-70 px (the 5 training images of the split and 1 held out)
    assert 40 <= lo <= hi <= 70
    assert meta["training"]["patch_noise"] == [-3.0, 1.2] and len(meta["training"]["val_loss_by_sigma"]) == 8
    b = train(TrainConfig(out=str(tmp_path / "b"), steps=2, **common), log=lambda m: None)
    b = train(TrainConfig(out=str(tmp_path / "b"), steps=4, resume=True, **common), log=lambda m: None)
    ta, tb = load_file(str(a)), load_file(str(b))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    p = load_prior(a)
    with torch.no_grad():
        out = denoise_tiled(p, torch.rand(1, 45, 37), 0.05, tile=24, overlap=8)
    assert torch.isfinite(out).all()


def test_resuming_a_clipped_prior_with_full_range_records_the_change(tmp_path):
    from tests.test_train import _write_pngs

    data = _write_pngs(tmp_path / "data")
    common = dict(data=[data], modality="ct", size=16, patch=8, batch=4, base=8, mults=(1, 2), seed=3,
                  progress=False, checkpoint_every=2)
    c = train(TrainConfig(out=str(tmp_path / "c"), steps=2, **common), log=lambda m: None)
    c = train(TrainConfig(out=str(tmp_path / "c"), steps=4, resume=True, full_range=True, **common),
              log=lambda m: None)
    meta = json.loads(c.with_suffix(".json").read_text())
    assert meta["full_range"] is True and "clipped below lo only" in meta["normalisation"]
    assert meta["normalisation_history"] == [{"until_step": 2, "normalisation": "HU window [lo, hi] -> [0, 1], clipped"}]


# ---------------------------------------------------------------------------
# recon bench bands
# ---------------------------------------------------------------------------
def test_recommended_split_is_the_first_level_where_the_whole_image_prior_matches():
    from recon.bench_bands import recommended_split

    rows = [{"sigma": 0.4, "whole_db": 20.0, "detail_db": 19.0}, {"sigma": 0.01, "whole_db": 30.0, "detail_db": 35.0},
            {"sigma": 0.1, "whole_db": 25.0, "detail_db": 25.0}]
    assert recommended_split(rows) == 0.1
    assert recommended_split([{"sigma": 0.1, "whole_db": 1.0, "detail_db": 2.0}]) is None


def bench_truth(data, k):
    """Slice ``k`` of series ``data`` as ``recon bench bands`` reads it: (x (1, H, W), the prepared truth)."""
    from recon.case import load_source
    from recon.io import read_input
    from recon.tasks import TASKS

    truth = TASKS["ct"].prepare(load_source(data, slice_index=k, volume=read_input(data)), None)
    return torch.from_numpy(truth.x)[None].float(), truth


def psnr01(d, x) -> float:
    """PSNR of ``d`` against ``x``, both clipped to [0, 1], as ``recon bench bands`` computes it."""
    mse = float(((d.clamp(0, 1) - x.clamp(0, 1)) ** 2).mean())
    return 10 * float(np.log10(1 / mse))


def test_bench_bands_measures_both_denoisers_on_a_series_at_its_own_grid(tmp_path):
    from recon.bench_bands import bench_bands
    from recon.multiscale import for_data

    data = _write_ct_series(tmp_path / "ct", [(44, 44)] * 3)
    whole = tiny_whole()
    whole.detail_prior = tiny_detail()
    out = tmp_path / "bands.json"
    res = bench_bands([data], whole, "ct", per_series=2, sigmas=(0.05, 0.5), out=out, log=lambda m: None)
    saved = json.loads(out.read_text())
    assert saved["table"] == res["table"] and saved["detail_prior"] == "tiny-detail"
    assert [r["sigma"] for r in res["table"]] == [0.05, 0.5] and all(r["n"] == 2 for r in res["table"])
    assert all(r["shape"] == [44, 44] for r in res["rows"])  # the data's own matrix, no resize
    # the two columns are the two denoisers, not one of them twice
    r = res["rows"][0]
    assert r["whole_db"] != r["detail_db"]
    # 'whole' is the sampler's denoiser with the detail prior off: recompute one entry
    x, truth = bench_truth(data, r["slice"])
    g = torch.Generator().manual_seed(r["slice"] * 101)
    xn = x + 0.05 * torch.randn(x.shape, generator=g)
    with torch.no_grad():
        d = for_data(whole, x.shape[-2:], truth.pixel_mm, detail_below=0).denoise(xn, 0.05)
    assert abs(psnr01(d, x) - r["whole_db"]) < 1e-4
    with pytest.raises(ReconError, match="no detail prior"):
        bench_bands([data], tiny_whole(), "ct", log=lambda m: None)


@pytest.mark.parametrize("method", ["score", "score-fast", "dps"])
def test_bf16_network_precision_is_close_to_fp32_and_recorded(method):
    """precision='bf16' runs the network under bfloat16 autocast: the result differs from fp32
    (the option reaches the network) but only slightly; an unknown precision fails clearly."""
    from forward_models import Inpainting
    from recon.methods import get_method
    from recon.multiscale import for_data

    whole = tiny_whole()
    whole.detail_prior = tiny_detail()
    shape = (33, 29)
    g = torch.Generator().manual_seed(1)
    x = torch.rand((1, *shape), generator=g)
    op = Inpainting((torch.rand(shape, generator=g) > 0.5).float(), shape=shape)
    y = op.A(x)
    fn = get_method(method)
    a = fn(y, op, prior=whole, n_steps=4, seed=0, precision="fp32")
    b = fn(y, op, prior=whole, n_steps=4, seed=0, precision="bf16")
    assert a.dtype == b.dtype == torch.float32
    assert not torch.equal(a, b)
    assert float((a - b).abs().mean()) < 0.05 * float(a.abs().mean())
    from recon.multiscale import native_bf16

    want = "bf16" if native_bf16("cpu") else "fp32"
    assert for_data(whole, shape, precision="auto").describe()["precision"] == want
    with pytest.raises(ReconError, match="precision must be one of"):
        fn(y, op, prior=whole, n_steps=2, precision="fp16")


def test_native_bf16_reads_the_processor_flags(monkeypatch, tmp_path):
    import builtins

    import recon.multiscale as ms

    real_open = builtins.open

    def fake(flags):
        f = tmp_path / "cpuinfo"
        f.write_text(f"processor : 0\nflags : fpu sse2 avx2 {flags}\n")
        return lambda path, *a, **k: real_open(f if path == "/proc/cpuinfo" else path, *a, **k)

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(builtins, "open", fake("avx512f amx_bf16"))
    assert ms.native_bf16("cpu") and ms.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(builtins, "open", fake("avx512f"))
    assert not ms.native_bf16("cpu") and ms.resolve_precision("auto", "cpu") == "fp32"
    assert ms.resolve_precision("bf16", "cpu") == "bf16"  # asked for explicitly: emulated if need be
    assert not ms.native_bf16("meta")
