"""Training: objectives, data pipeline, determinism, resume, and DDP (gloo, 2 processes)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from recon.networks import UNet
from recon.prior import EDMDenoiser
from recon.train import TrainConfig, augment, edm_loss, random_patches, split_by_patient, ssm_loss, train

REPO = Path(__file__).resolve().parents[1]


class MLPScore(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 2))

    def forward(self, x):
        return self.net(x)


def test_dsm_recovers_analytic_gaussian_score():
    """A small network trained by DSM on 2-D Gaussian data learns the analytic score."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([1.0, -0.5])
    L = torch.tensor([[1.0, 0.0], [0.6, 0.5]])
    cov = L @ L.T
    sigma = 0.5
    model = MLPScore()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 800)
    for _ in range(800):
        x0 = mu + torch.randn(2048, 2, generator=g) @ L.T
        z = torch.randn(2048, 2, generator=g)
        loss = ((model(x0 + sigma * z) * sigma + z) ** 2).sum(1).mean()  # DSM at one noise level
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    x = mu + torch.randn(500, 2, generator=g) @ L.T
    covn = cov + sigma**2 * torch.eye(2)
    analytic = -torch.linalg.solve(covn, (x - mu).T).T
    err = (model(x) - analytic).norm(dim=1).mean() / analytic.norm(dim=1).mean()
    assert err < 0.1


def test_ssm_loss_minimised_by_true_score():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 2, generator=g, dtype=torch.float64)
    true = ssm_loss(lambda v: -v, x, generator=g, n_particles=4)
    wrong = ssm_loss(lambda v: -2 * v, x, generator=g, n_particles=4)
    assert true < wrong
    assert float(true.detach()) == pytest.approx(-1.0, abs=0.1)  # E[-tr I + |x|^2 / 2] = -2 + 1


def _discs():
    """Three 16x16 disc images, (3, 1, 16, 16)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    return torch.stack([((xx - c) ** 2 + yy**2 < 0.3).float() for c in (-0.3, 0.0, 0.3)])[:, None]


def _tiny_denoiser():
    torch.manual_seed(0)
    return EDMDenoiser(UNet(base=8, mults=(1, 2), n_res=1))


def test_edm_loss_decreases_on_tiny_image_set():
    g = torch.Generator().manual_seed(0)
    imgs = _discs()
    model = _tiny_denoiser()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)

    def eval_loss():
        with torch.no_grad():
            return float(np.mean([float(edm_loss(model, imgs.repeat(8, 1, 1, 1), torch.Generator().manual_seed(s)))
                                  for s in range(4)]))

    before = eval_loss()
    for _ in range(60):
        loss = edm_loss(model, imgs.repeat(4, 1, 1, 1), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.7 * before


def test_patches_coordinates_and_augment():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(16 * 16, dtype=torch.float32).reshape(1, 1, 16, 16).repeat(3, 1, 1, 1)
    crops, coords = random_patches(x, 8, g)
    assert crops.shape == (3, 1, 8, 8) and coords.shape == (3, 2, 8, 8)
    for i in range(3):
        top, left = int(crops[i, 0, 0, 0]) // 16, int(crops[i, 0, 0, 0]) % 16
        assert coords[i, 0, 0, 0] == pytest.approx(top / 15 * 2 - 1)
        assert coords[i, 1, 0, 0] == pytest.approx(left / 15 * 2 - 1)
    assert augment(x, g).shape == x.shape


def test_split_by_patient_is_disjoint():
    patients = ["a"] * 5 + ["b"] * 3 + ["c"] * 4 + ["d"] * 2
    tr, va = split_by_patient(patients, val_fraction=0.25, seed=0)
    assert set(tr) | set(va) == set(range(len(patients)))
    assert not {patients[i] for i in tr} & {patients[i] for i in va}


def _write_pngs(folder: Path, n=6, size=24):
    from skimage.io import imsave

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = np.zeros((size, size), np.uint8)
        r = rng.integers(4, 10)
        yy, xx = np.mgrid[:size, :size]
        img[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < r**2] = 200
        imsave(folder / f"im{i}.png", img, check_contrast=False)
    return folder


def test_train_deterministic_and_resumes(tmp_path):
    data = _write_pngs(tmp_path / "data")
    common = dict(data=[data], modality="mri", size=16, patch=8, batch=4, base=8, mults=(1, 2), seed=3,
                  progress=False, checkpoint_every=3)
    a = train(TrainConfig(out=str(tmp_path / "a"), steps=6, **common), log=lambda m: None)
    b = train(TrainConfig(out=str(tmp_path / "b"), steps=6, **common), log=lambda m: None)
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    # resume: 3 steps then 3 more continues bit-exactly (weights, EMA) and keeps metadata that
    # training does not own (tuned sampler defaults, a name) across the resume
    c = train(TrainConfig(out=str(tmp_path / "c"), steps=3, **common), log=lambda m: None)
    meta = json.loads(c.with_suffix(".json").read_text())
    meta.update(name="tiny", sampler_defaults={"mri": {"score-fast": {"n_steps": 7}}})
    c.with_suffix(".json").write_text(json.dumps(meta))
    c = train(TrainConfig(out=str(tmp_path / "c"), steps=6, resume=True, **common), log=lambda m: None)
    meta = json.loads(c.with_suffix(".json").read_text())
    assert meta["training"]["steps"] == 6 and meta["image_size"] == 16
    said = []  # --steps is a total: resuming at or past it trains nothing, and says so
    train(TrainConfig(out=str(tmp_path / "c"), steps=6, resume=True, **common), log=said.append)
    assert any("already at step 6 >= --steps 6" in m for m in said)
    assert meta["name"] == "tiny" and meta["sampler_defaults"]["mri"]["score-fast"]["n_steps"] == 7
    tc = load_file(str(c))
    assert all(torch.equal(ta[k], tc[k]) for k in ta)


@pytest.mark.slow
def test_torchrun_two_process_gloo(tmp_path):
    data = _write_pngs(tmp_path / "data")
    out = tmp_path / "ddp.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: a local c10d rendezvous on a port the OS picks (localhost:0), so no fixed port can clash
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "recon.cli", "train", "--data", str(data), "--modality", "mri", "--size", "16", "--patch", "8",
           "--steps", "4", "--batch", "2", "--base", "8", "--mults", "1,2", "--out", str(out), "--quiet",
           "--device", "cpu", "--checkpoint-every", "2"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["training"]["world_size"] == 2 and meta["training"]["steps"] == 4


@pytest.mark.parametrize("objective", ["dsm", "dsm-lw", "ssm"])
def test_alternative_objectives_decrease_loss(objective):
    from recon.train import training_loss

    g = torch.Generator().manual_seed(0)
    imgs = _discs()
    model = _tiny_denoiser()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)

    def eval_loss():
        return float(np.mean([float(training_loss(objective, model, imgs.repeat(8, 1, 1, 1),
                                                  torch.Generator().manual_seed(s)).detach()) for s in range(6)]))

    before = eval_loss()
    for _ in range(60):
        loss = training_loss(objective, model, imgs.repeat(4, 1, 1, 1), g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < before


def test_resume_from_half_precision_export(tmp_path):
    """A shipped prior has half-precision EMA weights (recon.prior.export_prior); training resumes from it:
    the raw weights continue exactly, the EMA from its float16 values, saved again as float32."""
    from safetensors.torch import load_file

    from recon.errors import ReconError
    from recon.prior import export_prior

    data = _write_pngs(tmp_path / "data")
    common = dict(data=[data], modality="mri", size=16, patch=8, batch=4, base=8, mults=(1, 2), seed=3,
                  progress=False, checkpoint_every=3)
    a = train(TrainConfig(out=str(tmp_path / "a"), steps=6, **common), log=lambda m: None)
    c = train(TrainConfig(out=str(tmp_path / "c"), steps=3, **common), log=lambda m: None)
    with pytest.raises(ReconError, match="relative"):  # 3 steps: near-zero layers float16 would flush
        export_prior(c, c, ema_dtype="float16")
    export_prior(c, c, ema_dtype="bfloat16")
    c.with_suffix(".optim.pt").unlink()  # as on a fresh machine: only the committed weights
    c = train(TrainConfig(out=str(tmp_path / "c"), steps=6, resume=True, **common), log=lambda m: None)
    meta = json.loads(c.with_suffix(".json").read_text())
    assert "ema_dtype" not in meta and meta["training"]["steps"] == 6
    tc = load_file(str(c))
    assert all(v.dtype == torch.float32 for v in tc.values())
    ta = load_file(str(a))
    # a fresh Adam state changes the path; both must still be finite float32 continuations
    assert set(ta) == set(tc) and all(torch.isfinite(v).all() for v in tc.values())


def test_bf16_training_steps_follow_fp32_and_are_recorded(tmp_path):
    """--precision bf16: the forward runs under bfloat16 autocast (weights, optimiser, validation in
    float32). Its loss and gradients must match float32's closely, it must stay deterministic and
    resume bit-exactly, and the metadata must say which precision trained which steps."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = _tiny_denoiser()
    x = _discs().repeat(4, 1, 1, 1)
    grads, losses = {}, {}
    for prec in ("fp32", "bf16"):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
            loss = edm_loss(model, x, torch.Generator().manual_seed(1))
        loss.float().backward()
        losses[prec] = float(loss.detach())
        grads[prec] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.03)
    cos = torch.nn.functional.cosine_similarity(grads["fp32"], grads["bf16"], dim=0)
    assert cos > 0.98, cos

    data = _write_pngs(tmp_path / "data")
    common = dict(data=[data], modality="mri", size=16, patch=8, batch=4, base=8, mults=(1, 2), seed=3,
                  progress=False, checkpoint_every=3, device="cpu")
    a = train(TrainConfig(out=str(tmp_path / "a"), steps=6, precision="bf16", **common), log=lambda m: None)
    meta = json.loads(a.with_suffix(".json").read_text())["training"]
    assert meta["precision"] == "bf16" and meta["device"] == "cpu"
    assert meta["precision_history"] == [[0, "bf16"]]
    c = train(TrainConfig(out=str(tmp_path / "c"), steps=3, precision="bf16", **common), log=lambda m: None)
    c = train(TrainConfig(out=str(tmp_path / "c"), steps=6, precision="bf16", resume=True, **common),
              log=lambda m: None)
    ta, tc = load_file(str(a)), load_file(str(c))
    assert all(torch.equal(ta[k], tc[k]) for k in ta)  # deterministic, and the resume is bit-exact
    # a float32 prior resumed in bf16 records where the precision changed
    f = train(TrainConfig(out=str(tmp_path / "f"), steps=3, precision="fp32", **common), log=lambda m: None)
    f = train(TrainConfig(out=str(tmp_path / "f"), steps=6, precision="bf16", resume=True, **common),
              log=lambda m: None)
    assert json.loads(f.with_suffix(".json").read_text())["training"]["precision_history"] == [[0, "fp32"], [3, "bf16"]]


def test_train_device_and_precision_are_checked(tmp_path):
    from recon.errors import ReconError

    data = _write_pngs(tmp_path / "data")
    common = dict(data=[data], modality="mri", size=16, patch=8, batch=4, base=8, mults=(1, 2), progress=False,
                  steps=1, out=str(tmp_path / "x"))
    with pytest.raises(ReconError, match="precision must be one of"):
        train(TrainConfig(precision="fp8", **common), log=lambda m: None)
    if not torch.cuda.is_available():
        with pytest.raises(ReconError, match="CUDA is not available"):
            train(TrainConfig(device="cuda", **common), log=lambda m: None)
    assert not (tmp_path / "x.safetensors").exists()  # refused before anything was written


def test_training_pack_round_trip_and_checks(tmp_path):
    """recon train --pack stores the loaded training set (uint16, compressed); --data PACK trains on
    the same images (within 1e-4), the same patients and split; a pack made with other settings,
    a corrupt one, or one mixed with folders is refused by name."""
    from recon.cli import main
    from recon.errors import ReconError
    from recon.train import load_image_folder, load_native_images, pack_sources, read_pack, write_pack

    data = _write_pngs(tmp_path / "data")
    pack = tmp_path / "p.npz"
    assert main(["train", "--data", str(data), "--modality", "mri", "--size", "16", "--pack",
                 "--out", str(pack), "--quiet"]) == 0
    a, pa = load_image_folder([data], "mri", 16)
    b, pb = load_image_folder([pack], "mri", 16)
    assert pa == pb and b.shape == a.shape and float((a - b).abs().max()) < 1e-4
    assert split_by_patient(pa) == split_by_patient(pb)
    assert pack_sources([pack]) == [str(data), "packed in p.npz"]
    with pytest.raises(ReconError, match="packed with size 16, this training asks for 24"):
        load_image_folder([pack], "mri", 24)
    with pytest.raises(ReconError, match="packed with modality mri, this training asks for ct"):
        load_image_folder([pack], "ct", 16)
    with pytest.raises(ReconError, match="one training pack .* or folders, not both"):
        load_image_folder([pack, data], "mri", 16)
    with pytest.raises(ReconError, match="--native .* give the folders"):
        load_native_images([pack], "mri")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ReconError, match="not a readable training pack"):
        read_pack(bad, {})
    bad.write_bytes(pack.read_bytes()[:-200])  # truncated
    with pytest.raises(ReconError, match="not a readable training pack"):
        read_pack(bad, {})
    assert main(["train", "--data", str(data), "--modality", "mri", "--pack", "--out", str(tmp_path / "p.bin"),
                 "--quiet"]) != 0 and not (tmp_path / "p.bin").exists()
    with pytest.raises(ReconError, match="written as .npz"):
        write_pack(tmp_path / "p.bin", a, pa, {})
    # a CT pack keeps values above 1 (full range) to the same precision
    x = torch.rand(3, 1, 8, 8) * 1.7
    write_pack(tmp_path / "ct.npz", x, ["a", "b", "a"], {"modality": "ct", "full_range": True})
    y, py = read_pack(tmp_path / "ct.npz", {"full_range": True})
    assert py == ["a", "b", "a"] and float((x - y).abs().max()) < 1.7 / 65535
    with pytest.raises(ReconError, match="packed with full_range True, this training asks for False"):
        read_pack(tmp_path / "ct.npz", {"full_range": False})
    write_pack(tmp_path / "w.npz", x, ["a", "b", "a"], {"window": [-1000.0, 1000.0]})
    with pytest.raises(ReconError, match=r"packed with window \[-1000.0, 1000.0\].*asks for \[-160.0, 240.0\]"):
        read_pack(tmp_path / "w.npz", {"window": [-160.0, 240.0]})
    # training on the pack runs, and records the folders it came from
    out = train(TrainConfig(data=[pack], modality="mri", size=16, patch=8, batch=4, base=8, mults=(1, 2),
                            steps=2, progress=False, out=str(tmp_path / "t")), log=lambda m: None)
    tr = json.loads(out.with_suffix(".json").read_text())["training"]
    assert tr["data"] == [str(data), "packed in p.npz"] and tr["device_history"] == [[0, "cpu"]]


@pytest.mark.skipif(not Path("/bin/bash").exists(), reason="needs bash")
def test_gpu_burst_script_cycle_on_cpu(tmp_path):
    """.ci/gpu-burst: prepare (pack + state), device (here BURST_DEVICE=cpu), collect: the state
    comes back in parts, continues the local one, and is installed with the old one kept; a
    collect after the local training went on is refused."""
    data = _write_pngs(tmp_path / "data", n=10)
    tdir = tmp_path / "train"
    recipe = dict(data=[data], modality="mri", size=16, patch=8, batch=4, base=8, mults=(1, 2), lr=3e-4, seed=5,
                  full_every=2, full_p_mean=0.5, full_p_std=1.5, p_mean=-1.0, p_std=1.1)
    train(TrainConfig(steps=3, progress=False, checkpoint_every=3, out=str(tdir / "tiny"), **recipe),
          log=lambda m: None)
    before = json.loads((tdir / "tiny.json").read_text())["training"]
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "RECON_TRAIN_DIR": str(tdir), "BURST_DIR": str(tmp_path / "burst"), "OUT": str(out),
           "BURST_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}

    def burst(*args):
        return subprocess.run(["bash", str(REPO / ".ci" / "gpu-burst"), *args], env=env, capture_output=True,
                              text=True, timeout=600)

    r = burst("prepare", "tiny")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "burst" / "tiny-pack.npz").exists()
    r = burst("device", "tiny", "0.01")
    assert r.returncode == 0, r.stderr + r.stdout
    assert (out / "tiny.safetensors.part00").exists() and (out / "tiny.optim.pt.part00").exists()
    r = burst("collect", "tiny", str(out))
    assert r.returncode == 0, r.stderr + r.stdout
    meta = json.loads((tdir / "tiny.json").read_text())["training"]
    assert meta["steps"] > 3 and meta["batch"] == 32 and (tdir / "tiny.before-burst-3.json").exists()
    for key in ("lr", "seed", "full_image_every", "full_image_noise", "patch_noise", "patch", "ema",
                "train_images", "val_images"):  # the same recipe and data
        assert meta[key] == before[key], key
    assert "resumed from" in (out / "tiny-burst.log").read_text()
    r = burst("collect", "tiny", str(out))  # the local state moved on since prepare
    assert r.returncode != 0 and "trained on after prepare" in r.stderr
    # a recipe the command line cannot give is refused before anything travels
    t = json.loads((tdir / "tiny.json").read_text())
    t["training"]["ema"] = 0.99
    (tdir / "tiny.json").write_text(json.dumps(t))
    r = burst("prepare", "tiny")
    assert r.returncode != 0 and "'ema': 0.99" in r.stderr and "usage" not in r.stderr


def test_resume_with_other_settings_is_said_and_recorded(tmp_path):
    """--resume with a recipe other than the recorded one trains on (a deliberate change is allowed)
    but says so and records it in training.recipe_history; the same recipe records nothing."""
    data = _write_pngs(tmp_path / "data")
    common = dict(data=[data], modality="mri", size=16, patch=8, base=8, mults=(1, 2), progress=False,
                  out=str(tmp_path / "r"))
    train(TrainConfig(steps=2, batch=4, full_every=1, **common), log=lambda m: None)
    said = []
    train(TrainConfig(steps=4, batch=4, full_every=1, resume=True, **common), log=said.append)
    tr = json.loads((tmp_path / "r.json").read_text())["training"]
    assert tr["recipe_history"] == [] and not any("WARNING" in m for m in said)
    said = []
    train(TrainConfig(steps=6, batch=6, full_every=4, resume=True, **common), log=said.append)
    tr = json.loads((tmp_path / "r.json").read_text())["training"]
    assert tr["recipe_history"] == [{"step": 4, "changed": {"batch": [4, 6], "full_image_every": [1, 4]}}]
    assert any("batch 4 -> 6" in m and "full_image_every 1 -> 4" in m for m in said)
    assert tr["steps"] == 6 and tr["batch"] == 6
    # a torn optimiser state (another step than the weights) is said, not skipped silently
    st = torch.load(tmp_path / "r.optim.pt", weights_only=True)
    st["step"] = 5
    torch.save(st, tmp_path / "r.optim.pt")
    said = []
    train(TrainConfig(steps=7, batch=6, full_every=4, resume=True, **common), log=said.append)
    assert any("r.optim.pt is of step 5, the weights of step 6" in m for m in said)
