"""Prior weights: safetensors round trip, refusal of pickles, Tweedie score."""
import json

import pytest
import torch

from recon.errors import ReconError
from recon.networks import UNet
from recon.prior import EDMDenoiser, GaussianPrior, Prior, load_prior, save_prior
from recon.sde import VESDE, VPSDE

META = {"image_size": 16, "modality": "ct", "window": [-1000, 1000], "sde": {"name": "ve"},
        "architecture": {"channels": 1, "base": 8, "mults": [1, 2], "n_res": 1, "attn_levels": [],
                         "coords": True, "sigma_data": 0.5}}


def tiny_prior(seed=0):
    torch.manual_seed(seed)
    arch = {k: v for k, v in META["architecture"].items() if k != "sigma_data"}
    net = UNet(**arch)
    for p in net.parameters():  # non-trivial weights (zero-init layers otherwise)
        p.data.normal_(0, 0.05)
    return Prior(EDMDenoiser(net), META)


def test_save_load_bit_exact(tmp_path):
    prior = tiny_prior()
    raw = tiny_prior(1).denoiser
    path = save_prior(prior, tmp_path / "p.safetensors", raw=raw)
    loaded = load_prior(path)
    for (k, a), (k2, b) in zip(prior.denoiser.state_dict().items(), loaded.denoiser.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    raw_loaded = load_prior(path, ema=False)
    for a, b in zip(raw.state_dict().values(), raw_loaded.denoiser.state_dict().values()):
        assert torch.equal(a, b)
    x = torch.rand(2, 16, 16)
    assert torch.equal(prior.denoise(x, 0.3), loaded.denoise(x, 0.3))
    assert json.loads((tmp_path / "p.json").read_text())["image_size"] == 16


def test_pickle_refused(tmp_path):
    prior = tiny_prior()
    bad = tmp_path / "evil.safetensors"
    torch.save(prior.denoiser.state_dict(), bad)  # a pickle archive under a safetensors name
    (tmp_path / "evil.json").write_text(json.dumps(META))
    with pytest.raises(ReconError, match="not a valid safetensors file"):
        load_prior(bad)


def test_missing_weights_and_metadata(tmp_path):
    with pytest.raises(ReconError, match="prior weights not found"):
        load_prior(tmp_path / "none.safetensors")
    path = save_prior(tiny_prior(), tmp_path / "q.safetensors")
    (tmp_path / "q.json").unlink()
    with pytest.raises(ReconError, match="metadata file missing"):
        load_prior(path)


def test_score_from_denoiser_matches_gaussian_closed_form():
    d = 4
    cov = torch.eye(d, dtype=torch.float64) * 0.5 + 0.1
    gp = GaussianPrior(torch.zeros(d), cov, (1, d))
    x = torch.randn(3, 1, d, dtype=torch.float64)
    for sde in (VESDE(), VPSDE()):
        t = torch.full((3,), 0.4, dtype=torch.float64)
        s, sig = sde.scale_sigma(t)
        # x_t ~ N(0, s^2 (cov + sig^2 I)) -> score = -(s^2 (cov + sig^2))^-1 x
        covt = s[0] ** 2 * (cov + sig[0] ** 2 * torch.eye(d, dtype=torch.float64))
        expect = -(torch.linalg.solve(covt, x.reshape(3, d).T).T).reshape(x.shape)
        assert torch.allclose(gp.score(x, t, sde), expect, atol=1e-8)


def test_network_fully_convolutional():
    prior = tiny_prior()
    for size in (16, 32):
        assert prior.denoise(torch.rand(1, size, size), 0.5).shape == (1, size, size)
    with pytest.raises(ValueError, match="divisible"):
        prior.denoise(torch.rand(1, 15, 15), 0.5)


def test_export_half_precision_ema(tmp_path):
    from safetensors.torch import load_file

    from recon.prior import export_prior

    prior = tiny_prior()
    raw = tiny_prior(1).denoiser
    src = save_prior(prior, tmp_path / "p.safetensors", raw=raw)
    dst = export_prior(src, tmp_path / "h.safetensors", ema_dtype="float16")
    t = load_file(str(dst))
    assert all(v.dtype == torch.float16 for k, v in t.items() if k.startswith("ema."))
    assert all(v.dtype == torch.float32 for k, v in t.items() if k.startswith("raw."))
    assert dst.stat().st_size < src.stat().st_size
    assert json.loads(dst.with_suffix(".json").read_text())["ema_dtype"] == "float16"
    loaded = load_prior(dst)  # cast back to float32 on load: the fp16-rounded EMA weights
    for (k, a), b in zip(prior.denoiser.state_dict().items(), loaded.denoiser.state_dict().values()):
        assert b.dtype == torch.float32 and torch.equal(a.half().float(), b), k
    x = torch.rand(2, 16, 16)
    d32, d16 = prior.denoise(x, 0.3), loaded.denoise(x, 0.3)
    assert not torch.equal(d32, d16) and torch.allclose(d32, d16, atol=1e-3)
    for a, b in zip(raw.state_dict().values(), load_prior(dst, ema=False).denoiser.state_dict().values()):
        assert torch.equal(a, b)  # the raw training weights are untouched
    # in place, and back to float32 (exact: float16 values are float32 values)
    export_prior(dst, dst, ema_dtype="float32")
    assert all(v.dtype == torch.float32 for v in load_file(str(dst)).values())


def test_export_refuses_weights_half_cannot_hold(tmp_path):
    from recon.prior import export_prior

    prior = tiny_prior()
    p = next(prior.denoiser.parameters())
    p.data.view(-1)[0] = 1e6  # beyond float16's range
    src = save_prior(prior, tmp_path / "p.safetensors")
    with pytest.raises(ReconError, match="does not fit float16"):
        export_prior(src, tmp_path / "h.safetensors")
    p.data.view(-1)[0] = 0.0
    p.data.mul_(1e-5)  # a layer of tiny weights: float16 flushes most of them to zero
    src = save_prior(prior, tmp_path / "p.safetensors")
    with pytest.raises(ReconError, match="relative"):
        export_prior(src, tmp_path / "h.safetensors")
    export_prior(src, tmp_path / "b.safetensors", ema_dtype="bfloat16")  # bfloat16 holds both
    with pytest.raises(ReconError, match="ema_dtype must be one of"):
        export_prior(src, tmp_path / "x.safetensors", ema_dtype="int8")
    assert not (tmp_path / "h.safetensors").exists()
