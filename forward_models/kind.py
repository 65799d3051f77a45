"""What kind of measurement an operator is: ``'ct'``, ``'mri'``, ``'inpaint'`` or ``None``.

The one place that recognises operator kinds (method registry, sampler
defaults and baselines all ask :func:`operator_kind`).  Operator classes
declare their kind with the class attribute ``modality``; other operators are
recognised by their structure (complex input: MRI; a pixel mask
``A x = mask * x``: inpainting).
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import Identity, LinearOperator
from .inpaint import Inpainting

__all__ = ["operator_kind", "inpainting_mask", "KINDS"]

KINDS = ("ct", "mri", "inpaint")


def _modality(op) -> Optional[str]:
    m = getattr(op, "modality", None)
    return m.lower() if isinstance(m, str) else None


def inpainting_mask(op: LinearOperator) -> Optional[torch.Tensor]:
    """The 0/1 pixel mask of an inpainting operator (``A x = mask * x``), or
    ``None`` when ``op`` is not one.

    Only real operators with ``in_shape == out_shape`` qualify.  Then, in order:

    1. an instance of :class:`~forward_models.inpaint.Inpainting`: its ``mask``;
    2. an operator with a tensor attribute ``mask`` for which ``A(1) == mask``
       (broadcast to the image shape; checked with one cheap ``A`` call);
    3. an operator whose ``decompose()`` returns ``T`` =
       :class:`~forward_models.base.Identity`: ``decompose().mask``.  Not tried
       for CT operators (``modality == 'ct'``: their decomposition builds a
       dense-view projector).

    Cartesian MRI (complex input, Fourier ``T``) is never an inpainting operator.
    """
    if getattr(op, "is_complex_input", False) or getattr(op, "is_complex_output", False):
        return None
    if tuple(op.in_shape) != tuple(op.out_shape):
        return None
    m = getattr(op, "mask", None)
    if isinstance(op, Inpainting) and isinstance(m, torch.Tensor):
        return m
    if isinstance(m, torch.Tensor) and not m.is_complex():
        try:
            with torch.no_grad():
                ones = torch.ones((1, *op.in_shape), dtype=torch.float64, device=m.device)
                a1 = op.A(ones)
                target = torch.broadcast_to(m.to(a1.dtype), a1.shape)
            if torch.equal(a1, target):
                return m
        except Exception:
            pass
    if _modality(op) == "ct":
        return None
    try:
        dec = op.decompose()
    except Exception:  # NotImplementedError: no decomposition
        return None
    if isinstance(getattr(dec, "T", None), Identity) and isinstance(getattr(dec, "mask", None), torch.Tensor):
        return dec.mask
    return None


def operator_kind(op) -> Optional[str]:
    """``'ct'``, ``'mri'``, ``'inpaint'`` or ``None`` for ``op``.

    In order: ``op.modality`` when set (lower-cased); ``'mri'`` for any
    complex-input operator; ``'inpaint'`` when ``op`` is a pixel mask (see
    :func:`inpainting_mask`); else ``None`` (e.g. ``Identity``, compositions).
    """
    m = _modality(op)
    if m is not None:
        return m
    if bool(getattr(op, "is_complex_input", False)):
        return "mri"
    try:
        if inpainting_mask(op) is not None:
            return "inpaint"
    except Exception:
        pass
    return None
