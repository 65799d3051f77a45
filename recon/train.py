"""Training of score priors by denoising score matching.

Default objective: EDM (Karras et al., NeurIPS 2022) -- denoising score matching
over a log-normal noise distribution with the weighting
lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, which is DSM on
the VE SDE sigma(t) = t with EDM preconditioning.  Alternatives: continuous-time
DSM on any SDE of ``recon.sde`` (optionally likelihood-weighted, Song et al.
2021) and sliced score matching (Song et al., UAI 2019).

Compute is the constraint on CPU: training runs on random patches with their
position (PaDIS, Hu et al. 2024) and every fourth step on whole images, so the
fully convolutional network learns both local texture and global layout.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from recon.errors import ReconError
from recon.networks import UNet
from recon.preprocess import CT_WINDOW, hu_to_unit, normalise, square_resize
from recon.prior import EDMDenoiser, Prior, save_prior, tweedie_score
from recon.sde import SDE, VESDE, _bc, sde_from_config



# ---------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------
def _draw(fn, shape, generator, like):
    """``fn`` (``torch.randn`` / ``torch.rand``) of ``shape`` drawn on ``generator``'s device (so a
    CPU generator drives training on a GPU, and CPU runs are unchanged), then moved to ``like``'s."""
    dev = generator.device if generator is not None else like.device
    return fn(shape, generator=generator, dtype=like.dtype, device=dev).to(like.device)


def edm_loss(denoiser, x0, generator=None, p_mean=-1.2, p_std=1.2, coords=None, sigma_data=None):
    """EDM loss (Karras et al. 2022, eq. 8 with lambda = 1 / c_out^2)."""
    b = x0.shape[0]
    n = _draw(torch.randn, (b,), generator, x0)
    sigma = torch.exp(p_mean + p_std * n)
    noise = _draw(torch.randn, x0.shape, generator, x0)
    sd = sigma_data if sigma_data is not None else denoiser.sigma_data
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    d = denoiser(x0 + _bc(sigma, x0) * noise, sigma, coords)
    return (_bc(weight, x0) * (d - x0) ** 2).flatten(1).mean(1).mean()


def dsm_loss(score_fn, x0, sde: SDE, generator=None, eps=1e-5, likelihood_weighting=False):
    """Continuous-time DSM on ``sde`` (Song et al. 2021, eq. 7); ``score_fn(x, t)``.

    Weighting lambda(t) = std(t)^2, or g(t)^2 with ``likelihood_weighting``
    (Song, Durkan, Murray & Ermon 2021).
    """
    b = x0.shape[0]
    t = _draw(torch.rand, (b,), generator, x0) * (sde.T - eps) + eps
    z = _draw(torch.randn, x0.shape, generator, x0)
    mean, std = sde.marginal(x0, t)
    score = score_fn(mean + std * z, t)
    if likelihood_weighting:
        g2 = sde.sde(torch.zeros_like(x0), t)[1] ** 2
        losses = (score + z / std) ** 2 * _bc(g2, x0)
    else:
        losses = (score * std + z) ** 2
    return losses.flatten(1).sum(1).mean()


def _denoiser_score_fn(denoiser, sde: SDE, coords=None):
    """Score of the noisy marginal from an EDM denoiser (Tweedie), for any SDE."""
    return lambda x, t: tweedie_score(lambda u, sigma: denoiser(u, sigma, coords), x, t, sde)


def training_loss(objective: str, denoiser, x0, generator, coords=None, sigma_data=0.5, sde: SDE | None = None):
    """The objective used by ``recon train``: 'edm' (default), 'dsm', 'dsm-lw' or 'ssm'."""
    if objective == "edm":
        return edm_loss(denoiser, x0, generator=generator, coords=coords, sigma_data=sigma_data)
    sde = sde or VESDE()
    if objective in ("dsm", "dsm-lw"):
        return dsm_loss(_denoiser_score_fn(denoiser, sde, coords), x0, sde, generator,
                        likelihood_weighting=objective == "dsm-lw") / x0[0].numel()
    if objective == "ssm":
        # noise-conditional sliced score matching: SSM of p_sigma at a random level, weighted by sigma^2
        b = x0.shape[0]
        t = _draw(torch.rand, (b,), generator, x0) * (1 - 1e-3) + 1e-3
        _, sigma = sde.scale_sigma(t)
        xt = x0 + _bc(sigma, x0) * _draw(torch.randn, x0.shape, generator, x0)
        fn = _denoiser_score_fn(denoiser, sde, coords)
        return ssm_loss(lambda v: fn(v, t) * _bc(sigma, v), xt, generator) / x0[0].numel()
    raise ReconError(f"unknown objective '{objective}'; available: edm, dsm, dsm-lw, ssm")


def ssm_loss(score_fn, x, generator=None, n_particles=1):
    """Sliced score matching with Gaussian projections (Song et al., UAI 2019)."""
    x = x.detach().requires_grad_(True)
    total = 0.0
    for _ in range(n_particles):
        v = _draw(torch.randn, x.shape, generator, x)
        s = score_fn(x)
        sv = (s * v).flatten(1).sum(1)
        grad = torch.autograd.grad(sv.sum(), x, create_graph=True)[0]
        total = total + ((grad * v).flatten(1).sum(1) + 0.5 * sv**2).mean()
    return total / n_particles


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}


def _read_training_file(path: Path, modality: str, window):
    """Return list of (2-D float image in HU / intensity, patient id, pixel size in mm or None)
    from one file; an unreadable file gives an empty list."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        from skimage.io import imread

        img = np.asarray(imread(str(path)), dtype=np.float32)
        if img.ndim == 3:
            img = img[..., :3].mean(-1)
        return [(img, None, None)]
    if suffix in (".nii", ".gz"):
        import nibabel as nib

        nii = nib.load(str(path))
        vol = np.asarray(nii.get_fdata(), dtype=np.float32)
        zooms = nii.header.get_zooms()[:2]
        mm = float(np.sqrt(zooms[0] * zooms[1])) if len(zooms) == 2 and min(zooms) > 0 else None
        return [(vol[:, :, k].T, path.name, mm) for k in range(vol.shape[2])]
    import pydicom
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(str(path))
        arr = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    except Exception:
        return []
    spacing = getattr(ds, "PixelSpacing", None)
    try:
        mm = float(np.sqrt(float(spacing[0]) * float(spacing[1]))) if spacing else None
    except (TypeError, ValueError, IndexError):
        mm = None
    frames = arr if arr.ndim == 3 else arr[None]
    return [(f, str(getattr(ds, "PatientID", "") or path.parent), mm) for f in frames]


def _training_files(dirs, max_images=None, seed=0) -> list:
    """Every file under ``dirs`` (README/LICENSE skipped), or a seeded random subset of them."""
    files = []
    for d in dirs:
        d = Path(d)
        if not d.exists():
            raise ReconError(f"training data folder not found: {d}")
        files += sorted(p for p in d.rglob("*") if p.is_file() and p.name.lower() not in ("readme.md", "license"))
    if max_images and len(files) > max_images:
        rng = np.random.default_rng(seed)
        files = [files[i] for i in sorted(rng.choice(len(files), max_images, replace=False))]
    return files


def _training_images(dirs, modality, max_images=None, seed=0, min_side=16):
    """(image, patient id, pixel mm, file) for every readable 2-D image of at least ``min_side``
    pixels under ``dirs``; files without a patient id are their own patient."""
    for f in _training_files(dirs, max_images, seed):
        for img, pid, mm in _read_training_file(f, modality, None):
            if img.ndim != 2 or min(img.shape) < min_side or not np.isfinite(img).all():
                continue
            yield img, pid or hashlib.sha1(str(f).encode()).hexdigest()[:10], mm, f


def _to_unit(img: np.ndarray, modality: str, window, full_range: bool) -> np.ndarray:
    """The prior's working scale: CT through the HU window (``full_range``: clipped below only,
    so bone and metal keep values above 1), other modalities divided by their maximum."""
    if modality == "ct":
        return hu_to_unit(img, window, full_range=full_range)
    return normalise(img, modality, window)


#: format tag of a packed training set (:func:`write_pack`)
PACK_FORMAT = "recon-train-pack-v1"


def _differs(a, b) -> bool:
    """Settings differ (a list and a tuple of the same values do not: JSON has no tuples)."""
    def plain(v):
        return list(v) if isinstance(v, (list, tuple)) else v

    return plain(a) != plain(b)


def pack_file(path) -> Path:
    """``path`` as a training pack's name (.npz), or one clear error."""
    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise ReconError(f"a training pack is written as .npz, got {path.name!r}: name it {path.stem}.npz")
    return path


def write_pack(path, images: torch.Tensor, patients: list, settings: dict) -> Path:
    """Write a loaded training set (``images`` (N, 1, S, S) on the working scale, patient ids)
    to ``path`` (.npz, compressed), so training can run where the source folders are not:
    a lent GPU machine takes 64 MiB (README, "Training on a lent GPU").  Intensities are
    stored as uint16 over [0, max] (step max / 65535, about 1.5e-5 on the [0, 1] scale, far
    below the smallest training noise level 0.002); ``settings`` (modality, size, window,
    full_range, data) are checked when the pack is read."""
    from recon.io._util import atomic_output

    x = images.detach().cpu().numpy().astype(np.float64)
    top = float(x.max()) if x.size else 0.0
    scale = top if top > 0 else 1.0
    q = np.round(np.clip(x / scale, 0.0, 1.0) * 65535).astype(np.uint16)
    info = json.dumps({"format": PACK_FORMAT, "scale": scale, **settings})
    path = pack_file(path)
    with atomic_output(path, ".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, images=q, patients=np.array([str(p) for p in patients], dtype=str),
                                info=np.array(info))
    return path


def read_pack(path, settings: dict) -> tuple[torch.Tensor, list]:
    """The training set of a pack written by :func:`write_pack`, after checking that it was
    made with ``settings`` (modality, size, window, full_range); one clear error otherwise."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            info = json.loads(str(z["info"]))
            q, patients = z["images"], [str(p) for p in z["patients"]]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise ReconError(f"{path}: not a readable training pack ({exc}); write one with "
                         "`recon train --data DIR ... --pack --out FILE.npz`") from None
    if info.get("format") != PACK_FORMAT:
        raise ReconError(f"{path}: format {info.get('format')!r}, not {PACK_FORMAT!r}; write it again "
                         "with `recon train --pack`")
    for key, want in settings.items():
        have = info.get(key)
        if _differs(have, want):
            raise ReconError(f"{path} was packed with {key} {have}, this training asks for {want}; "
                             f"pack the folders again with these settings (`recon train --pack`)")
    if q.ndim != 4 or q.shape[1] != 1 or q.dtype != np.uint16 or len(patients) != len(q) or not len(q):
        raise ReconError(f"{path}: images {q.dtype}{list(q.shape)} with {len(patients)} patient ids; "
                         "expected uint16 (N, 1, S, S) and N ids; write the pack again")
    if "size" in settings and q.shape[-2:] != (settings["size"],) * 2:
        raise ReconError(f"{path}: images of {q.shape[-2]}x{q.shape[-1]}, not the {settings['size']}x"
                         f"{settings['size']} its settings say; write the pack again")
    images = torch.from_numpy(q.astype(np.float32) / np.float32(65535) * np.float32(info["scale"]))
    return images, patients


def pack_sources(dirs) -> list[str]:
    """The folders a training run's data came from: ``dirs``, or those a pack was made from."""
    pack = _pack_path(dirs)
    if pack is None:
        return [str(d) for d in dirs]
    with np.load(pack, allow_pickle=False) as z:
        return [str(d) for d in json.loads(str(z["info"])).get("data", [])] + [f"packed in {pack.name}"]


def pack_settings(modality: str, size: int, window, full_range: bool) -> dict:
    """What a packed training set must match (:func:`read_pack`)."""
    return {"modality": modality, "size": int(size),
            "window": [float(w) for w in window] if modality == "ct" else None,
            "full_range": bool(full_range and modality == "ct")}


def _pack_path(dirs) -> Path | None:
    """The pack file when ``dirs`` names one (a single .npz), else None; a pack mixed with
    folders is an error."""
    packs = [Path(d) for d in dirs if str(d).lower().endswith(".npz")]
    if not packs:
        return None
    if len(packs) != len(dirs):
        raise ReconError("--data: give either one training pack (.npz) or folders, not both")
    if not packs[0].is_file():
        raise ReconError(f"training pack not found: {packs[0]}")
    return packs[0]


def load_image_folder(dirs, modality: str, size: int, window=CT_WINDOW, max_images=None, seed=0,
                      full_range: bool = False):
    """Load every readable image under ``dirs`` at ``size`` x ``size``, or the training set of
    a pack (``dirs`` = one .npz written by :func:`write_pack` with the same settings).

    Returns (images (N, 1, S, S) float32 tensor, patient ids list).  Patient ids
    come from DICOM PatientID; files without one are their own patient.
    """
    pack = _pack_path(dirs)
    if pack is not None:
        if max_images:
            raise ReconError("--max-images does not apply to a training pack; pack the folders with it")
        return read_pack(pack, pack_settings(modality, size, window, full_range))
    images, patients = [], []
    for img, pid, _, _ in _training_images(dirs, modality, max_images, seed):
        images.append(_to_unit(square_resize(img, size), modality, window, full_range))
        patients.append(pid)
    if not images:
        raise ReconError(f"no readable training images under {', '.join(map(str, dirs))}")
    return torch.from_numpy(np.stack(images))[:, None], patients


def load_native_images(dirs, modality: str, window=CT_WINDOW, max_images=None, seed=0, min_side=64):
    """Every readable image under ``dirs`` at its own pixel grid: nothing is resized or cropped.
    CT keeps its full range (clipped below the window only).  Returns (list of (H, W) float32
    tensors, patient ids, pixel sizes in mm (None where unknown))."""
    if _pack_path(dirs) is not None:
        raise ReconError("--native trains on each image at its own pixel grid; a training pack holds "
                         "images resized to --size: give the folders")
    images, patients, pixel_mm = [], [], []
    for img, pid, mm, _ in _training_images(dirs, modality, max_images, seed, min_side=min_side):
        images.append(torch.from_numpy(np.ascontiguousarray(_to_unit(img, modality, window, True))))
        patients.append(pid)
        pixel_mm.append(mm)
    if not images:
        raise ReconError(f"no readable training images of at least {min_side} px under "
                         f"{', '.join(map(str, dirs))}")
    return images, patients, pixel_mm


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 exact flips/rotations of the last two axes (k in 0..7): no interpolation."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


def native_patches(images, patch: int, batch: int, generator: torch.Generator, air_keep: float = 0.1):
    """``batch`` random ``patch`` x ``patch`` crops at the images' own pixel size, each under a
    random flip/rotation.  Images are drawn in proportion to their number of crop positions
    (so many small crops do not outweigh a few whole slices); a crop that is almost all air
    (std < 0.01 and mean < 0.05 on the [0, 1] scale) is kept with probability ``air_keep``,
    else redrawn (up to 20 times)."""
    weights = torch.tensor([float((t.shape[0] - patch + 1) * (t.shape[1] - patch + 1)) for t in images])
    out = []
    for _ in range(batch):
        for _try in range(20):
            i = int(torch.multinomial(weights, 1, generator=generator))
            img = images[i]
            oy = int(torch.randint(0, img.shape[0] - patch + 1, (1,), generator=generator))
            ox = int(torch.randint(0, img.shape[1] - patch + 1, (1,), generator=generator))
            crop = img[oy:oy + patch, ox:ox + patch]
            keep_air = float(torch.rand(1, generator=generator)) < air_keep
            if keep_air or float(crop.std()) >= 0.01 or float(crop.mean()) >= 0.05:
                break
        out.append(dihedral(crop, int(torch.randint(0, 8, (1,), generator=generator))))
    return torch.stack(out)[:, None].contiguous()


def split_by_patient(patients, val_fraction=0.05, seed=0):
    """Indices (train, val), splitting by patient so no patient is in both."""
    uniq = sorted(set(patients))
    rng = np.random.default_rng(seed)
    rng.shuffle(uniq)
    n_val = max(1, int(round(len(uniq) * val_fraction))) if len(uniq) > 1 else 0
    val_p = set(uniq[:n_val])
    tr = [i for i, p in enumerate(patients) if p not in val_p]
    va = [i for i, p in enumerate(patients) if p in val_p]
    return tr, va


def augment(x: torch.Tensor, generator: torch.Generator, max_rot_deg=10.0, zoom=0.1):
    """Random flips, small rotations and zooms (a random affine crop) of (B, 1, S, S)."""
    b = x.shape[0]
    flip = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    ang = (torch.rand(b, generator=generator) * 2 - 1) * math.radians(max_rot_deg)
    sc = 1 - torch.rand(b, generator=generator) * zoom
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * (1 - sc)[:, None]
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = sc * torch.cos(ang)
    theta[:, 0, 1] = -sc * torch.sin(ang)
    theta[:, 1, 0] = sc * torch.sin(ang)
    theta[:, 1, 1] = sc * torch.cos(ang)
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_patches(x: torch.Tensor, patch: int, generator: torch.Generator):
    """Crop one random ``patch`` x ``patch`` window per image, with coordinate channels."""
    b, _, h, w = x.shape
    oy = torch.randint(0, h - patch + 1, (b,), generator=generator)
    ox = torch.randint(0, w - patch + 1, (b,), generator=generator)
    iy = oy[:, None] + torch.arange(patch)[None]
    ix = ox[:, None] + torch.arange(patch)[None]
    crops = torch.stack([x[i, :, iy[i]][:, :, ix[i]] for i in range(b)])
    coords = UNet.coordinate_grid(b, patch, patch, offset=torch.stack([oy, ox], 1).to(x.dtype),
                                  full=(h, w), dtype=x.dtype)
    return crops, coords


# ---------------------------------------------------------------------------
# training loop
# ---------------------------------------------------------------------------
@dataclass
class TrainConfig:
    data: list
    modality: str
    out: str
    size: int = 128
    patch: int = 64
    steps: int = 2000
    batch: int = 16
    lr: float = 8e-4
    ema: float = 0.999
    base: int = 32
    mults: tuple = (1, 2, 4)
    n_res: int = 1
    attn_levels: tuple = ()
    seed: int = 0
    resume: bool = False
    minutes: float | None = None
    checkpoint_every: int = 200
    val_every: int = 200
    max_images: int | None = None
    window: tuple = CT_WINDOW
    progress: bool = True
    threads: int | None = None
    objective: str = "edm"
    full_every: int = 4
    full_p_mean: float = -1.2
    full_p_std: float = 1.2
    #: log-normal noise distribution of the patch steps (EDM's default; a detail prior uses
    #: a lower band, e.g. -3, 1.2)
    p_mean: float = -1.2
    p_std: float = 1.2
    #: train on patches at each image's own pixel size (no resizing, no coordinates, 8 exact
    #: flips/rotations): a native-resolution detail prior for the low noise levels
    native: bool = False
    #: CT clipped below the window only (bone and metal keep values > 1); native implies it
    full_range: bool = False
    extra_meta: dict = field(default_factory=dict)
    #: compute device ('cpu', 'cuda', 'auto' or a torch.device); batches and noise are drawn on
    #: the CPU generator either way, so a fixed seed gives the same stream on both
    device: str = "cpu"
    #: network precision of the training steps: 'fp32'; 'bf16' (forward under bfloat16 autocast,
    #: float32 weights, optimiser and validation; measured 2.0-2.7x faster per step on this
    #: project's AMX CPU); 'auto': bf16 where the device computes it natively
    precision: str = "fp32"


def _dist():
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    if ws > 1:
        return torch.distributed.get_rank(), ws
    return 0, 1


@torch.no_grad()
def validation_bands(denoiser, val: torch.Tensor, seed=1234, n_sigma=8, p_mean=-1.2, p_std=1.2):
    """EDM-weighted loss on held-out images at ``n_sigma`` fixed noise levels spread over
    p_mean +- 2 p_std (comparable across runs): a list of (sigma, loss) per noise band."""
    if val is None or len(val) == 0:
        return []
    g = torch.Generator().manual_seed(seed)
    sigmas = torch.exp(torch.linspace(p_mean - 2 * p_std, p_mean + 2 * p_std, n_sigma))
    sd = denoiser.sigma_data
    bands = []
    for s in sigmas:
        noise = torch.randn(val.shape, generator=g).to(val.device)
        s = s.to(val.device)
        d = denoiser(val + s * noise, s.expand(len(val)))
        bands.append((float(s), float(((s**2 + sd**2) / (s * sd) ** 2) * ((d - val) ** 2).mean())))
    return bands


def validation_loss(denoiser, val: torch.Tensor, seed=1234, n_sigma=8, p_mean=-1.2, p_std=1.2):
    """The mean over :func:`validation_bands` (NaN without validation images)."""
    bands = validation_bands(denoiser, val, seed, n_sigma, p_mean, p_std)
    return float(np.mean([b[1] for b in bands])) if bands else float("nan")


def _native_validation(images, patch: int, n: int = 64, seed: int = 4321):
    """``n`` fixed crops of the held-out images (the same for every run with the same data)."""
    if not images:
        return None
    return native_patches(images, patch, n, torch.Generator().manual_seed(seed))


def _pixel_summary(pixel_mm, sides=()) -> dict:
    """The training pixel size (median, 5th-95th percentile range) and, for data without pixel
    sizes, the larger side of the training images (``native_px_range``, 5th-95th percentile)."""
    out = {}
    if len(sides):
        s = np.asarray(sides, dtype=np.float64)
        out["native_px_range"] = [int(round(np.percentile(s, 5))), int(round(np.percentile(s, 95)))]
    known = np.array([m for m in pixel_mm if m], dtype=np.float64)
    if not len(known):
        return {**out, "pixel_mm": None, "pixel_mm_from": "unknown (no pixel spacing in the training files)"}
    return {**out, "pixel_mm": round(float(np.median(known)), 3),
            "pixel_mm_range": [round(float(np.percentile(known, 5)), 3), round(float(np.percentile(known, 95)), 3)],
            "pixel_mm_from": (f"median (5th-95th percentile) pixel spacing of the {len(known)} of "
                              f"{len(pixel_mm)} training images that state it, trained at native pixels")}


def _recipe(cfg: TrainConfig, world: int) -> dict:
    """The settings of a training run as its metadata records them (``training.*``)."""
    return {"batch": cfg.batch * world, "patch": cfg.patch, "lr": cfg.lr, "ema": cfg.ema,
            "full_image_every": 0 if cfg.native else cfg.full_every,
            "full_image_noise": [cfg.full_p_mean, cfg.full_p_std], "patch_noise": [cfg.p_mean, cfg.p_std],
            "native": cfg.native}


def train(cfg: TrainConfig, log=print) -> Path:
    from tqdm import tqdm

    from recon.device import resolve_device
    from recon.multiscale import resolve_precision

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device) if isinstance(cfg.device, str) else torch.device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    rank, world = _dist()
    if device.type == "cuda" and world > 1:  # one GPU per process (torchrun sets LOCAL_RANK)
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed + rank)
    out = Path(cfg.out)
    if out.suffix != ".safetensors":
        out = out.with_suffix(".safetensors")
    if not cfg.native and cfg.patch > cfg.size:
        raise ReconError(f"--patch {cfg.patch} is larger than --size {cfg.size}")
    full_range = cfg.full_range or cfg.native

    t_load = time.time()
    if cfg.native:
        natives, patients, pixel_mm = load_native_images(cfg.data, cfg.modality, cfg.window, cfg.max_images,
                                                         cfg.seed, min_side=cfg.patch)
        tr_idx, va_idx = split_by_patient(patients, seed=cfg.seed)
        train_native = [natives[i] for i in tr_idx]
        val_x = _native_validation([natives[i] for i in va_idx], cfg.patch)
        n_images = len(natives)
    else:
        images, patients = load_image_folder(cfg.data, cfg.modality, cfg.size, cfg.window, cfg.max_images,
                                             cfg.seed, full_range=full_range)
        tr_idx, va_idx = split_by_patient(patients, seed=cfg.seed)
        train_x, val_x = images[tr_idx], images[va_idx][:16]
        n_images = len(images)
    if val_x is not None:
        val_x = val_x.to(device)
    if rank == 0:
        log(f"loaded {n_images} images ({len(set(patients))} patients) in {time.time() - t_load:.0f}s: "
            f"{len(tr_idx)} train, {len(va_idx)} validation")

    history, step, elapsed_before, val_history = [], 0, 0.0, []
    precision_history = []  # [first step, precision] per change
    recipe_history = []  # {"step": first step, "changed": {key: [before, after]}} per resume that changed it
    recipe = _recipe(cfg, world)
    device_history = []  # [first step, device type] per change
    arch = dict(channels=1, base=cfg.base, mults=list(cfg.mults), n_res=cfg.n_res,
                attn_levels=list(cfg.attn_levels), coords=not cfg.native, sigma_data=0.5)
    if cfg.modality != "ct":
        norm = "magnitude divided by its maximum"
    elif full_range:
        norm = "HU window [lo, hi] -> [0, 1], clipped below lo only (values above hi kept, > 1)"
    else:
        norm = "HU window [lo, hi] -> [0, 1], clipped"
    meta = {
        "format": "recon-prior-v1",
        "modality": cfg.modality,
        "image_size": cfg.patch if cfg.native else cfg.size,
        "window": list(cfg.window) if cfg.modality == "ct" else None,
        "normalisation": norm,
        "full_range": bool(full_range and cfg.modality == "ct"),
        "architecture": arch,
        "sde": {"name": "ve", "sigma_min": 0.002, "sigma_max": 20.0},
        "parameterisation": "EDM denoiser (Karras et al. 2022), sigma_data 0.5",
        **cfg.extra_meta,
    }
    if cfg.native:
        meta.update(native=True, **_pixel_summary(pixel_mm, [max(v.shape[-2:]) for v in natives]))
    model = EDMDenoiser(UNet(**{k: v for k, v in arch.items() if k != "sigma_data"}), 0.5).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    optim_path = out.with_suffix(".optim.pt")
    data_rng = None  # the batch/noise generator's state at the checkpoint, when resuming
    if cfg.resume and out.exists():
        from safetensors.torch import load_file

        prev = json.loads(out.with_suffix(".json").read_text())
        if prev.get("architecture") != arch:
            raise ReconError(f"--resume: {out} has architecture {prev.get('architecture')}, not {arch}")
        tensors = load_file(str(out))
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        raw = {k[4:]: v for k, v in tensors.items() if k.startswith("raw.")}
        model.load_state_dict(raw or ema.state_dict())
        tr = prev.get("training", {})
        step, elapsed_before, history = tr.get("steps", 0), tr.get("seconds", 0.0), tr.get("history", [])
        val_history = list(tr.get("val_history", []))
        # priors trained before precision was recorded ran in float32
        precision_history = [list(e) for e in tr.get("precision_history", [[0, "fp32"]])]
        device_history = [list(e) for e in tr.get("device_history", [[0, tr.get("device", "cpu")]])]
        recipe_history = list(tr.get("recipe_history", []))
        changed = {k: [tr[k], v] for k, v in recipe.items() if k in tr and _differs(tr[k], v)}
        if changed:  # a resume with other settings is allowed, but never silent: said and recorded
            recipe_history.append({"step": step, "changed": changed})
            if rank == 0:
                log(f"WARNING: --resume with settings other than {out.name} was trained with: " + ", ".join(
                    f"{k} {a} -> {b}" for k, (a, b) in changed.items()) + "; recorded in training.recipe_history "
                    "(give the recorded values to continue the same recipe)")
        for key, value in prev.items():  # keep what training does not own (name, tuned sampler
            if key != "ema_dtype":       # defaults, out-of-distribution reference, pixel size, ...);
                meta.setdefault(key, value)  # training writes float32 EMA weights
        if prev.get("normalisation") != meta["normalisation"]:
            meta["normalisation_history"] = prev.get("normalisation_history", []) + [
                {"until_step": step, "normalisation": prev.get("normalisation")}]
        if optim_path.exists():
            st = torch.load(optim_path, weights_only=True, map_location="cpu")
            if st.get("step") == step:
                opt.load_state_dict(st["optim"])
                torch.set_rng_state(st["rng"])
                data_rng = st.get("data_rng")
            elif rank == 0:
                log(f"WARNING: {optim_path.name} is of step {st.get('step')}, the weights of step {step}: "
                    "Adam starts afresh and the data stream restarts from the seed")
        if rank == 0:
            log(f"resumed from {out} at step {step}")
            if step >= cfg.steps:  # --steps is a total: easy to forget on a resumed prior
                log(f"WARNING: {out} is already at step {step} >= --steps {cfg.steps} (a total, not a "
                    f"number of new steps): nothing to train; give --steps larger than {step}")
    meta.setdefault("name", out.stem)
    if not precision_history or precision_history[-1][1] != precision:
        precision_history.append([step, precision])
    if not device_history or device_history[-1][1] != device.type:  # [first step, device] per change:
        device_history.append([step, device.type])  # GPU steps are told apart from CPU-hours
    sources = pack_sources(cfg.data)
    train_sde = sde_from_config(meta["sde"])
    meta["objective"] = cfg.objective
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    g = torch.Generator().manual_seed(cfg.seed * 1000 + rank + step)
    if world == 1 and data_rng is not None:
        g.set_state(data_rng)  # continue the batch/noise stream exactly where the checkpoint left it

    def checkpoint(final=False):
        if rank != 0:
            return
        bands = validation_bands(ema, val_x, p_mean=cfg.p_mean if cfg.native else -1.2,
                                 p_std=cfg.p_std if cfg.native else 1.2)
        val = float(np.mean([b[1] for b in bands])) if bands else float("nan")
        val_history.append([step, round(val, 5)])
        meta["training"] = {
            "data": sources, "steps": step, **recipe, "seed": cfg.seed,
            "seconds": round(elapsed_before + time.time() - t0, 1),
            "train_images": len(tr_idx), "val_images": len(va_idx),
            "final_train_loss": float(np.mean([h[1] for h in history[-10:]])) if history else None,
            "final_val_loss": val, "val_loss_by_sigma": [[round(a, 5), round(b, 5)] for a, b in bands],
            "val_history": val_history, "history": history, "world_size": world,
            "torch": torch.__version__, "device": device.type, "precision": precision,
            "precision_history": precision_history, "device_history": device_history,
            "recipe_history": recipe_history,
        }
        save_prior(Prior(ema, meta), out, raw=model)
        torch.save({"step": step, "optim": opt.state_dict(), "rng": torch.get_rng_state(),
                    "data_rng": g.get_state()}, optim_path)
        log(f"step {step}: checkpoint {out} (val loss {val:.4f})")

    t0 = time.time()
    bar = tqdm(total=cfg.steps, initial=step, disable=not cfg.progress or rank != 0, desc="train", dynamic_ncols=True)
    running = []
    while step < cfg.steps:
        if cfg.minutes and (time.time() - t0) / 60 > cfg.minutes:
            if rank == 0:
                log(f"time budget of {cfg.minutes} min reached at step {step}")
            break
        full = not cfg.native and cfg.full_every > 0 and step % cfg.full_every == cfg.full_every - 1
        coords = None
        if cfg.native:
            x = native_patches(train_native, cfg.patch, cfg.batch, g)
        else:
            bsz = max(1, cfg.batch // 4) if full else cfg.batch
            idx = torch.randint(0, len(train_x), (bsz,), generator=g)
            x = augment(train_x[idx], g)
            if not full:
                x, coords = random_patches(x, cfg.patch, g)
        x = x.to(device)
        coords = None if coords is None else coords.to(device)
        warm = min(1.0, (step + 1) / 100)
        for pg in opt.param_groups:
            pg["lr"] = cfg.lr * warm
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            if full and cfg.objective == "edm":
                # whole images also learn the layout, decided at high noise: a broader noise distribution
                loss = edm_loss(net, x, g, cfg.full_p_mean, cfg.full_p_std, sigma_data=model.sigma_data)
            elif cfg.objective == "edm":
                loss = edm_loss(net, x, g, cfg.p_mean, cfg.p_std, coords=coords, sigma_data=model.sigma_data)
            else:
                loss = training_loss(cfg.objective, net, x, g, coords, model.sigma_data, train_sde)
        loss = loss.float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        step += 1
        running.append(float(loss.detach()))
        if not math.isfinite(running[-1]):
            raise ReconError(f"training diverged: loss is {running[-1]} at step {step}; lower --lr")
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(running[-50:]):.4f}")
        if step % 50 == 0:
            history.append([step, float(np.mean(running[-50:])), round(elapsed_before + time.time() - t0, 1)])
        if step % cfg.checkpoint_every == 0:
            checkpoint()
    bar.close()
    checkpoint(final=True)
    if world > 1:
        torch.distributed.barrier()
    return out
