"""Intensity conventions: the one home for the [0, 1] working scale.

Shared by training, evaluation, the command line and the notebooks.

* CT: Hounsfield units are mapped linearly from a window [lo, hi] to [0, 1]
  (:func:`hu_to_unit`, clipped) and back (:func:`unit_to_hu`); the default
  window is [-1000, 1000] HU, a prior's metadata overrides it.
* MRI and other magnitude images: divided by their maximum
  (:func:`magnitude_to_unit`), so the ground truth's maximum is 1.
* Images are centre-cropped to a square and resized (anti-aliased) to the
  working size (:func:`square_resize`).
"""
from __future__ import annotations

import numpy as np

CT_WINDOW = (-1000.0, 1000.0)


def square_resize(img: np.ndarray, size: int | None) -> np.ndarray:
    """Centre-crop to a square, then resize to ``size`` x ``size`` (None keeps the crop)."""
    from skimage.transform import resize

    h, w = img.shape
    m = min(h, w)
    top, left = (h - m) // 2, (w - m) // 2
    img = img[top:top + m, left:left + m]
    if size is None or size == m:
        return np.ascontiguousarray(img, dtype=np.float32)
    return resize(img, (size, size), order=1, anti_aliasing=True, preserve_range=True).astype(np.float32)


def hu_to_unit(hu: np.ndarray, window=CT_WINDOW, full_range: bool = False) -> np.ndarray:
    """HU -> [0, 1] through the window ``(lo, hi)``, clipped; with ``full_range`` only values
    below ``lo`` are clipped (bone and metal above ``hi`` keep their attenuation: > 1)."""
    lo, hi = window or CT_WINDOW
    x = (np.asarray(hu, dtype=np.float32) - lo) / (hi - lo)
    return np.clip(x, 0, None if full_range else 1).astype(np.float32)


def unit_to_hu(x01: np.ndarray, window=CT_WINDOW) -> np.ndarray:
    """[0, 1] -> HU through the window ``(lo, hi)`` (values clipped by the window are lost)."""
    lo, hi = window or CT_WINDOW
    return (np.asarray(x01, dtype=np.float32) * (hi - lo) + lo).astype(np.float32)


def magnitude_to_unit(img: np.ndarray) -> tuple[np.ndarray, float]:
    """``|img| / max|img|`` and the scale ``max|img|`` (0 for an all-zero image)."""
    mag = np.abs(img)
    scale = float(mag.max())
    return (mag / scale if scale > 0 else mag).astype(np.float32), scale


def normalise(img: np.ndarray, modality: str, window=CT_WINDOW) -> np.ndarray:
    """CT: HU window -> [0, 1] (clipped). MRI (and other): magnitude / max."""
    if modality == "ct":
        return hu_to_unit(img, window)
    return magnitude_to_unit(img)[0]


def load_case_image(path, modality: str, size: int | None, window=CT_WINDOW, series_uid=None) -> np.ndarray:
    """Read any supported file, take its middle slice, normalise and resize."""
    from recon.io import read_input

    vol = read_input(path, series_uid=series_uid)
    data = np.asarray(vol.data)
    img = data[data.shape[0] // 2] if data.ndim == 3 else data
    return normalise(square_resize(np.asarray(img, dtype=np.float32), size), modality, window)
