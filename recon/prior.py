"""Score priors: an EDM-preconditioned denoiser plus the metadata to use it.

``Prior.denoise(x, sigma)`` is the EDM denoiser D(x, sigma) ~ E[x0 | x0 + sigma z]
(Karras et al., NeurIPS 2022).  For any SDE of ``recon.sde`` with
x_t = s (x0 + sigma z), Tweedie's formula gives the score

    grad log p_t(x_t) = (s D(x_t / s, sigma) - x_t) / (s sigma)^2,

so one trained network serves VE, VP and sub-VP samplers alike.

Weights are stored as safetensors with a JSON metadata file beside them
(``NAME.safetensors`` + ``NAME.json``).  Loading never unpickles.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from recon.errors import ReconError
from recon.networks import UNet
from recon.sde import SDE, _as_t, _bc, sde_from_config

PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained"

#: pixels per network call on the CPU when no gradient is taken: a larger batch is split into
#: calls of at most this many pixels (four 128x128 images or tiles).  Measured on this 2-core
#: CPU (bf16, 15 slices of 512x512 as 375 tiles of 128 px through the detail prior): 42.2 s
#: per evaluation in one call, 14.7 s in calls of 4 tiles.  One call's activations run to
#: gigabytes, which the allocator takes fresh from the kernel and the kernel zeroes page by
#: page (17 million page faults per evaluation; 0.5 million in calls of 4 tiles).
CPU_CHUNK_PX = 4 * 128 * 128


class EDMDenoiser(nn.Module):
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) (Karras et al. 2022, Table 1)."""

    def __init__(self, net: UNet, sigma_data: float = 0.5):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)

    def forward(self, x, sigma, coords=None):
        sigma = _as_t(sigma, x)
        sd = self.sigma_data
        s = _bc(sigma, x)
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / torch.sqrt(s**2 + sd**2)
        c_in = 1 / torch.sqrt(s**2 + sd**2)
        c_noise = torch.log(sigma) / 4
        return c_skip * x + c_out * self._net(c_in * x, c_noise.reshape(-1).expand(x.shape[0]), coords)

    def _net(self, x, c_noise, coords):
        """The network on the batch ``x``, in calls of at most :data:`CPU_CHUNK_PX` pixels on
        the CPU without gradients (the same values, far fewer page faults); one call otherwise."""
        n = max(1, CPU_CHUNK_PX // (x.shape[-2] * x.shape[-1]))
        if x.device.type != "cpu" or torch.is_grad_enabled() or x.shape[0] <= n:
            return self.net(x, c_noise, coords)
        return torch.cat([self.net(x[i:i + n], c_noise[i:i + n], None if coords is None else coords[i:i + n])
                          for i in range(0, x.shape[0], n)])


class Prior(nn.Module):
    """A trained unconditional prior over images of one modality.

    Attributes:
        denoiser: the EDM denoiser module.
        meta: dict with ``image_size``, ``modality``, ``window`` (CT HU window
            mapped to [0, 1], or None), ``sde`` (default SDE config),
            ``sampler_defaults`` and training provenance.
    """

    def __init__(self, denoiser: EDMDenoiser, meta: dict):
        super().__init__()
        self.denoiser = denoiser
        self.meta = dict(meta)

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def window(self):
        w = self.meta.get("window")
        return tuple(w) if w else None

    @property
    def sde(self) -> SDE:
        return sde_from_config(self.meta.get("sde", {"name": "ve"}))

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """D(x, sigma) for x of shape (B, H, W) or (B, 1, H, W)."""
        squeeze = x.dim() == 3
        xi = x[:, None] if squeeze else x
        out = self.denoiser(xi.float(), _as_t(sigma, xi).float()).to(x.dtype)
        return out[:, 0] if squeeze else out

    def score(self, x: torch.Tensor, t, sde: SDE | None = None) -> torch.Tensor:
        """grad_x log p_t(x) under ``sde`` (default: the prior's own SDE)."""
        return tweedie_score(self.denoise, x, _as_t(t, x), sde or self.sde)


def tweedie_score(denoise, x: torch.Tensor, t: torch.Tensor, sde: SDE) -> torch.Tensor:
    """Score of p_t from a denoiser ``denoise(u, sigma)`` (Tweedie), for x_t = s (x0 + sigma z)."""
    s, sigma = sde.scale_sigma(t)
    sb, stdb = _bc(s, x), _bc(s * sigma, x)
    return (sb * denoise(x / sb, sigma) - x) / stdb**2


def build_prior(meta: dict) -> Prior:
    arch = meta.get("architecture")
    if not arch:
        raise ReconError("prior metadata has no 'architecture'; the JSON beside the weights is incomplete")
    net = UNet(**{k: v for k, v in arch.items() if k != "sigma_data"})
    return Prior(EDMDenoiser(net, arch.get("sigma_data", 0.5)), meta)


def _atomic_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_prior(prior: Prior, path, raw: nn.Module | None = None) -> Path:
    """Write ``path`` (.safetensors) and its JSON metadata, atomically.

    ``prior.denoiser`` (the EMA weights) is stored under ``ema.*``; the raw
    training weights ``raw`` (an ``EDMDenoiser``), if given, under ``raw.*`` so
    that training can resume from a committed prior.
    """
    from safetensors.torch import save

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    tensors = {f"ema.{k}": v.detach().contiguous().cpu() for k, v in prior.denoiser.state_dict().items()}
    if raw is not None:
        tensors.update({f"raw.{k}": v.detach().contiguous().cpu() for k, v in raw.state_dict().items()})
    _atomic_bytes(path, save(tensors, metadata={"format": "recon-prior-v1"}))
    _atomic_bytes(path.with_suffix(".json"), json.dumps(prior.meta, indent=2, sort_keys=True).encode())
    return path


#: largest relative change (Frobenius norm) of one weight tensor :func:`export_prior` accepts;
#: the shipped priors change by at most 3e-4 in float16 and 2.5e-3 in bfloat16
EXPORT_MAX_REL_ERROR = 1e-2
#: storage types :func:`export_prior` can give the EMA weights
EMA_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def export_prior(src, dst, ema_dtype: str = "float16") -> Path:
    """Copy the prior ``src`` (.safetensors + .json) to ``dst`` with its EMA weights (the ones
    reconstructions use) stored as ``ema_dtype``; the raw training weights stay float32, so
    ``recon train --resume`` continues from them exactly.  Loading casts back to float32.

    Refuses a weight that the type cannot hold (beyond its range, or changed by more than
    :data:`EXPORT_MAX_REL_ERROR`, as when float16 flushes tiny weights to zero), naming it.  ``src`` and ``dst`` may be the same file (written
    atomically).  The shipped priors use float16: it changed reconstructions by under 0.05 dB
    (README "Half-precision weights")."""
    from safetensors import safe_open
    from safetensors.torch import save

    if ema_dtype not in EMA_DTYPES:
        raise ReconError(f"ema_dtype must be one of {', '.join(EMA_DTYPES)}, got {ema_dtype!r}")
    dtype = EMA_DTYPES[ema_dtype]
    src = resolve_prior_path(src)
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        dst = dst.with_suffix(".safetensors")
    meta_path = src.with_suffix(".json")
    if not meta_path.exists():
        raise ReconError(f"metadata file missing: {meta_path} (every prior needs NAME.json beside NAME.safetensors)")
    tensors, info = {}, torch.finfo(dtype)
    with safe_open(str(src), framework="pt") as f:
        file_meta = f.metadata() or {}
        for key in f.keys():
            t = f.get_tensor(key)
            if key.startswith("ema.") and t.is_floating_point():
                t32 = t.float()
                big = t32.abs().max().item() if t32.numel() else 0.0
                if not torch.isfinite(t32).all() or big > info.max:
                    raise ReconError(f"{src}: weight {key} (largest magnitude {big:.3g}) does not fit {ema_dtype} "
                                     f"(max {info.max:.3g}); keep float32")
                h = t32.to(dtype)
                err = ((h.float() - t32).norm() / t32.norm()).item() if t32.norm() > 0 else 0.0
                if err > EXPORT_MAX_REL_ERROR:  # e.g. a layer of tiny weights that float16 flushes to zero
                    raise ReconError(f"{src}: weight {key} changes by {err:.1%} (relative) in {ema_dtype}, "
                                     f"more than {EXPORT_MAX_REL_ERROR:.0%}; keep float32 or use bfloat16")
                t = h
            tensors[key] = t.contiguous()
    data = save(tensors, metadata={**file_meta, "ema_dtype": ema_dtype})
    meta = json.loads(meta_path.read_text())
    meta["ema_dtype"] = ema_dtype
    _atomic_bytes(dst, data)
    _atomic_bytes(dst.with_suffix(".json"), json.dumps(meta, indent=2, sort_keys=True).encode())
    return dst


def resolve_prior_path(name_or_path) -> Path:
    p = Path(name_or_path)
    if p.suffix.lower() in (".pt", ".pth", ".ckpt", ".pkl", ".pickle"):
        raise ReconError(f"{p}: pickled weights are refused (loading a pickle can run arbitrary code); "
                         "convert to safetensors (see README, 'Converting a PyTorch checkpoint')")
    if p.suffix == ".safetensors" or p.exists():
        path = p if p.suffix == ".safetensors" else p.with_suffix(".safetensors")
    else:
        path = PRETRAINED_DIR / f"{name_or_path}.safetensors"
    if not path.exists():
        shipped = sorted(q.stem for q in PRETRAINED_DIR.glob("*.safetensors"))
        raise ReconError(
            f"prior weights not found: {path}. Use a shipped prior name "
            f"({', '.join(shipped) or 'none shipped'}) or a path to a .safetensors file "
            "with its .json metadata beside it (train one with `recon train`)."
        )
    return path


def _companion_path(meta: dict, path: Path, key: str = "detail_prior", what: str = "detail prior") -> Path | None:
    """Where a companion prior the metadata names under ``key`` (the detail or the global prior)
    lives: beside the prior, else among the shipped priors; one clear error naming both places and
    both fixes when it is in neither."""
    name = meta.get(key)
    if not name:
        return None
    for cand in (path.parent / f"{name}.safetensors", PRETRAINED_DIR / f"{name}.safetensors"):
        if cand.exists() and cand.with_suffix(".json").exists():
            return cand
    raise ReconError(
        f"{path.with_suffix('.json').name} names the {what} '{name}', but {name}.safetensors with "
        f"{name}.json is neither beside it ({path.parent}) nor among the shipped priors ({PRETRAINED_DIR}). "
        f"Put both files beside {path.name}, or remove \"{key}\" from {path.with_suffix('.json').name} "
        "to use the whole-image prior without it.")


def load_prior(name_or_path, device=None, ema: bool = True, detail: bool = True) -> Prior:
    """Load a prior by shipped name (``ct``, ``brain-mri``) or by path. Never unpickles.

    A prior whose metadata names a ``detail_prior`` or a ``global_prior`` gets them loaded as
    ``prior.detail_prior`` / ``prior.global_prior`` (unless ``detail`` is False), for
    :func:`recon.multiscale.for_data`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = resolve_prior_path(name_or_path)
    meta_path = path.with_suffix(".json")
    if not meta_path.exists():
        raise ReconError(f"metadata file missing: {meta_path} (every prior needs NAME.json beside NAME.safetensors)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ReconError(f"{meta_path}: not valid JSON ({e})") from None
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ReconError(
            f"{path}: not a valid safetensors file ({e}). Pickled checkpoints (.pt/.pth) are refused "
            "for safety; convert them with safetensors.torch.save_file."
        ) from None
    prior = build_prior(meta)
    prefix = "ema." if ema or not any(k.startswith("raw.") for k in tensors) else "raw."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing, unexpected = prior.denoiser.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ReconError(f"{path}: weights do not match the architecture in {meta_path.name} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    prior.eval().requires_grad_(False)
    if detail:
        for key, what in (("detail_prior", "detail prior"), ("global_prior", "global prior")):
            cpath = _companion_path(meta, path, key, what)
            if cpath is not None:
                setattr(prior, key, load_prior(cpath, ema=ema, detail=False))
    return prior.to(device) if device is not None else prior


class GaussianPrior(nn.Module):
    """An analytic prior N(mean, cov) over flattened images, with the exact denoiser.

    D(x, sigma) = mean + cov (cov + sigma^2 I)^-1 (x - mean).  Used to test
    samplers and the likelihood against closed forms.
    """

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor, shape):
        super().__init__()
        self.register_buffer("mean", mean.reshape(-1).double())
        self.register_buffer("cov", cov.double())
        self.shape = tuple(shape)
        self.meta = {"image_size": self.shape[-1], "window": None, "sde": {"name": "ve"}}
        evals, evecs = torch.linalg.eigh(self.cov)
        self.register_buffer("evals", evals.clamp_min(0))
        self.register_buffer("evecs", evecs)

    @property
    def sde(self) -> SDE:
        return sde_from_config(self.meta["sde"])

    def denoise(self, x, sigma):
        b = x.shape[0]
        v = x.reshape(b, -1).double() - self.mean
        sigma = _as_t(sigma, x).double().reshape(-1, 1)
        coef = self.evals[None] / (self.evals[None] + sigma**2)
        out = self.mean + ((v @ self.evecs) * coef) @ self.evecs.T
        return out.to(x.dtype).reshape(x.shape)

    def score(self, x, t, sde: SDE | None = None):
        return Prior.score(self, x, t, sde)

    def log_prob(self, x):
        d = torch.distributions.MultivariateNormal(self.mean, covariance_matrix=self.cov)
        return d.log_prob(x.reshape(x.shape[0], -1).double())
