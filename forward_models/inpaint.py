"""Inpainting: ``A x = mask * x`` (self-adjoint), output keeps the image shape."""
from __future__ import annotations

import torch

from .base import Decomposition, Identity, LinearOperator

__all__ = ["Inpainting"]


class Inpainting(LinearOperator):
    """Keep the pixels where ``mask == 1``; ``(B, H, W) -> (B, H, W)``.

    ``mask``: 0/1 ``(H, W)`` tensor, array or ``masks.Mask``.  ``shape``
    (optional): the image size the mask must match.  Real or complex input;
    the output has the input's dtype.
    """

    modality = "inpaint"

    def __init__(self, mask, shape=None):
        m = torch.as_tensor(getattr(mask, "mask", mask))
        if m.is_complex() or m.dim() != 2:
            raise ValueError(f"mask must be a real (H, W) 0/1 tensor, got shape {tuple(m.shape)}"
                             f" and dtype {m.dtype}")
        m = m.float()
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError("mask must contain only 0 and 1")
        if shape is not None and tuple(m.shape) != tuple(int(s) for s in shape):
            raise ValueError(f"mask has shape {tuple(m.shape)}, expected {tuple(shape)} "
                             "(the image size)")
        super().__init__(m.shape, m.shape)
        self.register_buffer("mask", m.contiguous())

    def _forward(self, x):
        real = x.real.dtype if x.is_complex() else x.dtype
        return x * self.mask.to(device=x.device, dtype=real)

    def _adjoint(self, y):
        return self._forward(y)

    def decompose(self) -> Decomposition:
        """``T = Identity``, ``mask`` (H, W), ``embed`` = identity."""
        return Decomposition(Identity(self.in_shape), self.mask, lambda y: y)
