"""Global priors (issue #10): a coarser whole-image network that denoises the high noise levels,
where the global layout is decided; the multi-scale denoiser equals its parts in each band."""
import json

import numpy as np
import pytest
import torch

from recon.errors import ReconError
from recon.multiscale import ResampledPrior, denoise_tiled, for_data
from recon.prior import load_prior, save_prior
from tests.test_native import tiny_detail, tiny_net_prior, tiny_whole

GLOBAL_META = {"image_size": 8, "modality": "ct", "window": [-1000, 1000], "sde": {"name": "ve"},
               "name": "tiny-global",
               "architecture": {"channels": 1, "base": 8, "mults": [1, 2], "n_res": 1, "attn_levels": [],
                                "coords": True, "sigma_data": 0.5}}


def tiny_global(seed=2):
    return tiny_net_prior(GLOBAL_META, seed)


def with_global(detail=False):
    whole = tiny_whole()
    whole.global_prior = tiny_global()
    if detail:
        whole.detail_prior = tiny_detail()
    return whole


def test_the_denoiser_equals_its_parts_in_each_band_and_in_a_mixed_batch():
    whole, glob, detail = tiny_whole(), tiny_global(), tiny_detail()
    x = torch.rand(3, 40, 52, generator=torch.Generator().manual_seed(2))
    f = 2.5  # data pixels per whole-prior pixel: the global grid is 2x coarser still
    g = ResampledPrior(glob, 2 * f)
    ms = ResampledPrior(whole, f, detail=detail, detail_below=0.2, glob=g, global_above=0.4)
    plain = ResampledPrior(whole, f)
    with torch.no_grad():
        for s in (0.01, 0.15):  # below the detail split: the detail prior alone
            assert torch.equal(ms.denoise(x, s), denoise_tiled(detail, x, s))
        for s in (0.2, 0.5, 0.99):  # between: the whole-image prior's two bands (0.99 / 2.5 < 0.4)
            assert torch.equal(ms.denoise(x, s), plain.denoise(x, s))
        for s in (1.0, 3.0, 20.0):  # at and above 0.4 in the prior's units (native 1.0): the global prior
            assert torch.equal(ms.denoise(x, s), g.denoise(x, s))
            assert not torch.equal(ms.denoise(x, s), plain.denoise(x, s))
        mixed = torch.tensor([0.05, 5.0, 0.5])
        out = ms.denoise(x, mixed)
        for i, s in enumerate(mixed.tolist()):
            assert torch.allclose(out[i], ms.denoise(x[i:i + 1], s)[0], atol=1e-5)
    rec = ms.describe()
    assert rec["global_prior"] == "tiny-global" and rec["global_above"] == 0.4 and "global prior" in rec["action"]
    off = ResampledPrior(whole, f, glob=g, global_above=0.0)
    assert off.glob is None and off.describe()["global_prior"] is None
    with pytest.raises(ReconError, match="global_above"):
        ResampledPrior(whole, f, glob=g, global_above=-1)


def test_the_split_is_in_the_prior_units_whatever_the_data_size():
    """The same prior-unit level selects the global prior at the same noise relative to the
    whole-image grid, for data 2.5x and 5x finer than it."""
    p = with_global()
    for shape in ((40, 40), (80, 80)):
        ms = for_data(p, shape, global_above=0.5)
        factor = ms.factor
        x = torch.rand(1, *shape, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            assert torch.equal(ms.denoise(x, 0.51 * factor), ms.glob.denoise(x, 0.51 * factor))
            assert torch.equal(ms.denoise(x, 0.49 * factor), ResampledPrior(p, factor).denoise(x, 0.49 * factor))


def test_for_data_attaches_the_global_prior_only_where_it_applies():
    p = with_global()
    ms = for_data(p, (64, 64))
    assert ms.glob is not None and ms.glob.factor == pytest.approx(8.0)   # 64 px onto an 8-px grid
    assert ms.global_above == 0.8                                          # the default without metadata
    assert for_data(p, (64, 64), global_above=0).glob is None              # turned off
    assert "turned off" in for_data(p, (64, 64), global_above=0).describe()["global_from"]
    assert for_data(p, (64, 64), global_above=1.5).global_above == 1.5
    assert for_data(p, (10, 10)).glob is None                              # its grid is not coarser by 1.5x
    p.meta = {**p.meta, "global_above_sigma": 0.3}
    assert for_data(p, (64, 64)).global_above == 0.3
    assert for_data(tiny_whole(), (64, 64)).glob is None                   # a prior without one


def test_load_prior_loads_the_named_global_prior_and_fails_clearly_without(tmp_path):
    whole = tiny_whole()
    whole.meta = {**whole.meta, "global_prior": "tiny-global"}
    path = save_prior(whole, tmp_path / "w.safetensors")
    with pytest.raises(ReconError, match="names the global prior 'tiny-global'.*beside it.*remove \"global_prior\""):
        load_prior(path)
    save_prior(tiny_global(), tmp_path / "tiny-global.safetensors")
    p = load_prior(path)
    x = torch.rand(1, 8, 8)
    with torch.no_grad():
        assert torch.equal(p.global_prior.denoise(x, 1.0), tiny_global().denoise(x, 1.0))
    assert not hasattr(load_prior(path, detail=False), "global_prior")
    from recon.ood import weights_fingerprint  # the OOD fingerprint is the whole-image network's alone

    assert weights_fingerprint(p) == weights_fingerprint(load_prior(path, detail=False))


@pytest.mark.parametrize("method", ["score", "score-fast", "dps"])
def test_every_score_method_runs_with_a_global_prior_at_odd_sizes(method):
    from recon.methods import get_method
    from tests.test_multiscale import odd_size_problems

    p = with_global(detail=True)
    shape = (41, 35)
    for y, op in odd_size_problems(shape):
        out = get_method(method)(y, op, prior=p, n_steps=4, seed=0)
        off = get_method(method)(y, op, prior=p, n_steps=4, seed=0, global_above=0)
        assert out.shape == (1, *shape) and torch.isfinite(out).all()
        assert not torch.equal(out, off)  # the global prior took part
    with pytest.raises(ReconError, match="global_above"):
        get_method(method)(y, op, prior=p, n_steps=2, global_above=-1)


def test_the_command_line_records_the_global_prior_and_its_level(tmp_path):
    import nibabel as nib

    from recon.cli import main

    whole = tiny_whole()
    whole.meta = {**whole.meta, "global_prior": "tiny-global", "global_above_sigma": 0.5}
    prior = save_prior(whole, tmp_path / "w.safetensors")
    save_prior(tiny_global(), tmp_path / "tiny-global.safetensors")
    img = tmp_path / "x.npy"
    np.save(img, np.random.default_rng(0).uniform(0, 1, (40, 40)).astype(np.float32))
    outs = {}
    for above in (None, "0"):
        out = tmp_path / f"r{above}"
        args = ["ct", str(img), "--views", "8", "--method", "score-fast", "--prior", str(prior),
                "--param", "n_steps=6", "--out", str(out), "--quiet"]
        if above is not None:
            args += ["--param", f"global_above={above}"]
        assert main(args) == 0
        rec = json.loads((out / "run.json").read_text())["prior_scale"]
        assert rec["global_above"] == (0.5 if above is None else 0.0)
        assert (rec["global_prior"] == "tiny-global") == (above is None)
        outs[above] = np.asarray(nib.load(out / "recon.nii.gz").dataobj)
    assert not np.array_equal(outs[None], outs["0"])


def test_recommended_global_above_is_the_lowest_level_from_which_the_global_prior_always_wins():
    from recon.bench_bands import recommended_global_above

    rows = [{"sigma": 0.2, "whole_db": 30.0, "global_db": 31.0},  # wins here, but loses at 0.4
            {"sigma": 0.4, "whole_db": 25.0, "global_db": 24.0},
            {"sigma": 0.8, "whole_db": 20.0, "global_db": 20.0},
            {"sigma": 1.6, "whole_db": 15.0, "global_db": 16.0}]
    assert recommended_global_above(rows) == 0.8
    assert recommended_global_above([{"sigma": 1.0, "whole_db": 2.0, "global_db": 1.0}]) is None


def test_bench_bands_against_the_global_prior_measures_both_in_the_prior_units(tmp_path):
    from recon.bench_bands import bench_bands
    from tests.test_native import _write_ct_series, bench_truth, psnr01

    data = _write_ct_series(tmp_path / "ct", [(48, 48)] * 3)
    p = with_global()
    res = bench_bands([data], p, "ct", per_series=2, sigmas=(0.2, 1.0), out=tmp_path / "b.json",
                      log=lambda m: None, against="global")
    assert json.loads((tmp_path / "b.json").read_text())["table"] == res["table"]
    assert res["global_prior"] == "tiny-global" and [r["sigma"] for r in res["table"]] == [0.2, 1.0]
    r = res["rows"][-1]
    assert r["whole_db"] != r["global_db"] and r["shape"] == [48, 48]
    x, truth = bench_truth(data, r["slice"])
    ms = for_data(p, x.shape[-2:], truth.pixel_mm, detail_below=0, global_above=0.2)
    assert r["native_sigma"] == pytest.approx(1.0 * ms.factor)  # 48 px onto the 16-px prior: 3x
    g = torch.Generator().manual_seed(r["slice"] * 101 + 1)
    xn = x + r["native_sigma"] * torch.randn(x.shape, generator=g)
    with torch.no_grad():
        d = ms.glob.denoise(xn, r["native_sigma"])
    assert abs(psnr01(d, x) - r["global_db"]) < 1e-4
    with pytest.raises(ReconError, match="no global prior"):
        bench_bands([data], tiny_whole(), "ct", log=lambda m: None, against="global")
    with pytest.raises(ReconError, match="against"):
        bench_bands([data], p, "ct", log=lambda m: None, against="other")


def test_measure_detail_std_is_the_rms_of_what_the_coarse_grid_cannot_hold():
    from recon.multiscale import measure_detail_std

    flat = [torch.full((32, 32), 0.3), torch.full((20, 28), 0.7)]
    assert measure_detail_std(flat, [2, 4]) == {"2": 0.0, "4": 0.0}  # nothing finer than the grid
    checker = torch.zeros(32, 32)
    checker[::2, ::2] = checker[1::2, 1::2] = 1.0  # averaged away entirely at 2x: the band is all of it
    std = measure_detail_std([checker], [2])["2"]
    assert std == pytest.approx(0.5, abs=1e-4)
    with pytest.raises(ReconError, match="factors must be >= 1"):
        measure_detail_std(flat, [0.5])
