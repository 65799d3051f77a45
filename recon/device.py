"""Compute-device resolution: ``'auto'`` picks CUDA when available, never by default elsewhere."""
from __future__ import annotations

import torch

from recon.errors import ReconError

__all__ = ["resolve_device", "synchronize"]


def resolve_device(name: str = "auto") -> torch.device:
    """``'auto'`` -> CUDA if available else CPU; ``'cuda'`` without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ReconError("--device cuda was requested but CUDA is not available; use --device cpu or auto")
    return torch.device(name)


def synchronize(device) -> None:
    """Wait for queued GPU work (so timings measure it); a no-op on the CPU."""
    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()
