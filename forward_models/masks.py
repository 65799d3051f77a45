"""Seeded sampling masks: k-space undersampling (MRI) and inpainting.

Every mask kind is a small callable object: ``kind(**params)(shape, seed=0)``
returns a :class:`Mask` whose ``.mask`` is a float32 0/1 tensor of ``shape =
(H, W)`` (1 = measured / observed pixel) and whose ``.acceleration`` is the
*true* ``H * W / mask.sum()`` of that mask (never the nominal one).  Same
parameters + same seed -> same mask (NumPy ``RandomState(seed)``, matching
the fastMRI reference code's draws).

K-space (DC at ``(H//2, W//2)``, see ``mri.fft2c``).  Line masks sample whole
*columns*: the phase-encode direction is the last dim (W), readout along H.

* ``EquispacedMask(acceleration, center_fraction=0.08)``: fastMRI
  ``EquispacedMaskFunc`` semantics — ``round(W * center_fraction)`` central
  columns plus every ``acceleration``-th column from a seeded offset in
  ``[0, acceleration)`` (the mask of Song et al., ICLR 2022).  With
  ``match_acceleration=True`` it follows ``EquispacedMaskFractionFunc``: the
  spacing is adjusted so the total acceleration ≈ the nominal one.
* ``RandomMask(acceleration, center_fraction=0.08)``: fastMRI
  ``RandomMaskFunc`` — centre plus each other column with probability
  ``(W / acc - n_center) / (W - n_center)``, so the *expected* acceleration is
  the nominal one.
* ``Gaussian1DMask``: centre plus columns drawn without replacement with a
  Gaussian density (std ``sigma * W``) so that exactly ``round(W / acc)``
  columns are sampled.
* ``Gaussian2DMask``: the same for single k-space points with a fully
  sampled central ``center_fraction`` block (for 2D random / 3D-like
  sampling).
* ``PoissonDiscMask``: variable-density Poisson-disc points (the minimum
  distance grows linearly with the distance from the centre) plus a fully
  sampled central block; the radius is bisected to approach the nominal
  acceleration (reported truthfully).

Inpainting (1 = observed pixel): ``BoxMask``, ``RandomPixelMask``,
``StrokeMask`` (free-form brush strokes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "Mask", "EquispacedMask", "RandomMask", "Gaussian1DMask", "Gaussian2DMask",
    "PoissonDiscMask", "BoxMask", "RandomPixelMask", "StrokeMask", "MRI_MASKS",
    "INPAINT_MASKS",
]


@dataclass(frozen=True)
class Mask:
    """A 0/1 sampling mask and what it really achieves."""

    mask: torch.Tensor  # (H, W) float32, 1 = measured
    kind: str = ""

    @property
    def acceleration(self) -> float:
        """``H * W / n_measured`` (``inf`` for an empty mask)."""
        n = float(self.mask.sum())
        return self.mask.numel() / n if n > 0 else math.inf

    @property
    def sampling_rate(self) -> float:
        """Fraction of measured entries, ``1 / acceleration``."""
        return float(self.mask.sum()) / self.mask.numel()

    def bool(self) -> torch.Tensor:
        return self.mask.bool()


def _shape(shape) -> tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"mask shape must be (H, W) with positive sizes, got {shape}")
    return shape


def _accel(acceleration) -> float:
    a = float(acceleration)
    if not math.isfinite(a) or a < 1:
        raise ValueError(f"acceleration must be a finite number >= 1, got {acceleration}")
    return a


def _fraction(value, name, low_open=False) -> float:
    v = float(value)
    if not (0 < v <= 1 if low_open else 0 <= v <= 1):
        raise ValueError(f"{name} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value}")
    return v


def _finish(mask: np.ndarray, kind: str) -> Mask:
    return Mask(torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32)), kind)


def _lines(cols: np.ndarray, shape) -> np.ndarray:
    return np.broadcast_to(cols.astype(np.float32)[None, :], shape).copy()


def _center_cols(num_cols: int, num_low: int) -> np.ndarray:
    """fastMRI ``calculate_center_mask``: ``num_low`` central columns."""
    mask = np.zeros(num_cols, dtype=np.float32)
    pad = (num_cols - num_low + 1) // 2
    mask[pad:pad + num_low] = 1
    return mask


class _LineMask:
    def __init__(self, acceleration, center_fraction: float = 0.08, center_lines: int | None = None):
        self.acceleration = _accel(acceleration)
        self.center_fraction = _fraction(center_fraction, "center_fraction")
        if center_lines is not None and int(center_lines) < 0:
            raise ValueError(f"center_lines must be >= 0, got {center_lines}")
        self.center_lines = None if center_lines is None else int(center_lines)

    def _num_low(self, num_cols: int) -> int:
        n = self.center_lines if self.center_lines is not None else round(num_cols * self.center_fraction)
        if n > num_cols:
            raise ValueError(f"center_lines={n} exceeds the number of columns {num_cols}")
        return n

    def __repr__(self):
        return (f"{type(self).__name__}(acceleration={self.acceleration}, "
                f"center_fraction={self.center_fraction}, center_lines={self.center_lines})")


class EquispacedMask(_LineMask):
    """Equispaced columns + fully sampled centre (fastMRI ``EquispacedMaskFunc``)."""

    def __init__(self, acceleration, center_fraction: float = 0.08, center_lines: int | None = None,
                 offset: int | None = None, match_acceleration: bool = False):
        super().__init__(acceleration, center_fraction, center_lines)
        if not match_acceleration and self.acceleration != int(self.acceleration):
            raise ValueError(f"equispaced acceleration must be an integer, got {acceleration} "
                             "(or pass match_acceleration=True)")
        self.offset = None if offset is None else int(offset)
        self.match_acceleration = bool(match_acceleration)

    def __call__(self, shape, seed: int | None = 0) -> Mask:
        H, W = _shape(shape)
        rng = np.random.RandomState(seed)
        num_low = self._num_low(W)
        cols = _center_cols(W, num_low)
        if self.match_acceleration:  # fastMRI EquispacedMaskFractionFunc
            acc = self.acceleration
            if num_low * acc >= W:
                raise ValueError(f"centre ({num_low} of {W} columns) already exceeds 1/{acc}")
            adjusted = acc * (num_low - W) / (num_low * acc - W)
            offset = rng.randint(0, high=round(adjusted)) if self.offset is None else self.offset
            samples = np.around(np.arange(offset, W - 1, adjusted)).astype(np.int64)
            cols[samples] = 1
        else:
            acc = int(self.acceleration)
            offset = rng.randint(0, high=acc) if self.offset is None else self.offset
            cols[offset::acc] = 1
        return _finish(_lines(cols, (H, W)), "equispaced")


class RandomMask(_LineMask):
    """Random columns + fully sampled centre (fastMRI ``RandomMaskFunc``)."""

    def __call__(self, shape, seed: int | None = 0) -> Mask:
        H, W = _shape(shape)
        rng = np.random.RandomState(seed)
        num_low = self._num_low(W)
        if num_low >= W:
            prob = 0.0
        else:
            prob = (W / self.acceleration - num_low) / (W - num_low)
        cols = np.maximum(_center_cols(W, num_low), rng.uniform(size=W) < prob)
        return _finish(_lines(cols, (H, W)), "random")


def _gauss_pick(rng, weights: np.ndarray, free: np.ndarray, count: int) -> np.ndarray:
    """``count`` distinct indices among ``free`` drawn with probability ∝ weights."""
    idx = np.flatnonzero(free)
    count = min(max(count, 0), idx.size)
    if count == 0:
        return idx[:0]
    p = weights[idx] + 1e-12
    return rng.choice(idx, size=count, replace=False, p=p / p.sum())


class Gaussian1DMask(_LineMask):
    """Centre + Gaussian variable-density columns; exactly ``round(W / acc)`` columns."""

    def __init__(self, acceleration, center_fraction: float = 0.08, center_lines: int | None = None,
                 sigma: float = 0.2):
        super().__init__(acceleration, center_fraction, center_lines)
        self.sigma = _fraction(sigma, "sigma", low_open=True)

    def __call__(self, shape, seed: int | None = 0) -> Mask:
        H, W = _shape(shape)
        rng = np.random.RandomState(seed)
        cols = _center_cols(W, self._num_low(W))
        k = np.arange(W) - W // 2
        weights = np.exp(-0.5 * (k / (self.sigma * W)) ** 2)
        target = max(1, round(W / self.acceleration))
        cols[_gauss_pick(rng, weights, cols == 0, target - int(cols.sum()))] = 1
        return _finish(_lines(cols, (H, W)), "gaussian1d")


def _center_block(shape, fraction) -> np.ndarray:
    H, W = shape
    block = np.zeros(shape, dtype=np.float32)
    h, w = round(H * fraction), round(W * fraction)
    r0, c0 = (H - h + 1) // 2, (W - w + 1) // 2
    block[r0:r0 + h, c0:c0 + w] = 1
    return block


class Gaussian2DMask:
    """Fully sampled central block + Gaussian variable-density points; exact count."""

    def __init__(self, acceleration, center_fraction: float = 0.08, sigma: float = 0.2):
        self.acceleration = _accel(acceleration)
        self.center_fraction = _fraction(center_fraction, "center_fraction")
        self.sigma = _fraction(sigma, "sigma", low_open=True)

    def __call__(self, shape, seed: int | None = 0) -> Mask:
        H, W = _shape(shape)
        rng = np.random.RandomState(seed)
        mask = _center_block((H, W), self.center_fraction).ravel()
        ky = (np.arange(H) - H // 2)[:, None] / (self.sigma * H)
        kx = (np.arange(W) - W // 2)[None, :] / (self.sigma * W)
        weights = np.exp(-0.5 * (ky ** 2 + kx ** 2)).ravel()
        target = max(1, round(H * W / self.acceleration))
        mask[_gauss_pick(rng, weights, mask == 0, target - int(mask.sum()))] = 1
        return _finish(mask.reshape(H, W), "gaussian2d")


class PoissonDiscMask:
    """Variable-density Poisson-disc points + fully sampled central block.

    The exclusion radius at normalised k-space radius ``ρ ∈ [0, 1]`` is
    ``r0 * (1 + density_slope * ρ)``; ``r0`` is bisected (``n_bisect`` steps,
    fixed seed) to approach the requested acceleration.
    """

    def __init__(self, acceleration, center_fraction: float = 0.08, density_slope: float = 2.0,
                 n_bisect: int = 14):
        self.acceleration = _accel(acceleration)
        self.center_fraction = _fraction(center_fraction, "center_fraction")
        if density_slope < 0:
            raise ValueError(f"density_slope must be >= 0, got {density_slope}")
        self.density_slope = float(density_slope)
        self.n_bisect = int(n_bisect)

    def _throw(self, shape, order, r0, scale):
        H, W = shape
        radius = r0 * scale
        R = int(math.ceil(radius.max()))
        forbidden = np.zeros((H + 2 * R, W + 2 * R), dtype=bool)
        mask = np.zeros(H * W, dtype=np.float32)
        stencils = {}
        for p in order:
            i, j = divmod(int(p), W)
            if forbidden[i + R, j + R]:
                continue
            mask[p] = 1
            q = int(round(radius[p] * 4))  # quarter-pixel radius classes
            st = stencils.get(q)
            if st is None:
                rr = q / 4
                n = int(math.ceil(rr))
                yy, xx = np.mgrid[-n:n + 1, -n:n + 1]
                st = stencils[q] = (n, (yy ** 2 + xx ** 2) < rr ** 2)
            n, disc = st
            forbidden[i + R - n:i + R + n + 1, j + R - n:j + R + n + 1] |= disc
        return mask

    def __call__(self, shape, seed: int | None = 0) -> Mask:
        H, W = _shape(shape)
        rng = np.random.RandomState(seed)
        order = rng.permutation(H * W)
        ky = (np.arange(H) - H // 2)[:, None] / (H / 2)
        kx = (np.arange(W) - W // 2)[None, :] / (W / 2)
        rho = np.minimum(np.sqrt(ky ** 2 + kx ** 2) / math.sqrt(2), 1.0).ravel()
        scale = 1 + self.density_slope * rho
        center = _center_block((H, W), self.center_fraction).ravel()
        target = H * W / self.acceleration
        lo, hi = 0.5, math.sqrt(self.acceleration) * 2 + 1
        best = None
        for _ in range(self.n_bisect):
            r0 = math.sqrt(lo * hi)
            mask = np.maximum(self._throw((H, W), order, r0, scale), center)
            if best is None or abs(mask.sum() - target) < abs(best.sum() - target):
                best = mask
            if mask.sum() > target:
                lo = r0
            else:
                hi = r0
        return _finish(best.reshape(H, W), "poisson")


# ---------------------------------------------------------------------------
# Inpainting
# ---------------------------------------------------------------------------
class BoxMask:
    """Missing box(es); 1 = observed.

    ``fraction``: area fraction of one box (centred, or at a seeded random
    position with ``random_position=True``).  ``boxes``: explicit list of
    ``(top, left, height, width)`` given as fractions of the image size in
    [0, 1]; overrides ``fraction``.
    """

    def __init__(self, fraction: float = 0.25, boxes=None, random_position: bool = False):
        self.fraction = _fraction(fraction, "fraction")
        self.boxes = None if boxes is None else [tuple(float(v) for v in b) for b in boxes]
        for b in self.boxes or []:
            if len(b) != 4 or not all(0 <= v <= 1 for v in b):
                raise ValueError(f"each box must be (top, left, height, width) fractions in [0, 1], got {b}")
        self.random_position = bool(random_position)

    def __call__(self, shape, seed: int | None = 0) -> Mask:
        H, W = _shape(shape)
        mask = np.ones((H, W), dtype=np.float32)
        if self.boxes is not None:
            for top, left, h, w in self.boxes:
                r0, c0 = round(top * H), round(left * W)
                mask[r0:r0 + round(h * H), c0:c0 + round(w * W)] = 0
        else:
            side = math.sqrt(self.fraction)
            h, w = round(side * H), round(side * W)
            if self.random_position:
                rng = np.random.RandomState(seed)
                r0, c0 = rng.randint(0, H - h + 1), rng.randint(0, W - w + 1)
            else:
                r0, c0 = (H - h) // 2, (W - w) // 2
            mask[r0:r0 + h, c0:c0 + w] = 0
        return _finish(mask, "box")


class RandomPixelMask:
    """Exactly ``round(keep * H * W)`` observed pixels, uniformly at random."""

    def __init__(self, keep: float = 0.2):
        self.keep = _fraction(keep, "keep")

    def __call__(self, shape, seed: int | None = 0) -> Mask:
        H, W = _shape(shape)
        rng = np.random.RandomState(seed)
        mask = np.zeros(H * W, dtype=np.float32)
        mask[rng.choice(H * W, size=round(self.keep * H * W), replace=False)] = 1
        return _finish(mask.reshape(H, W), "random")


class StrokeMask:
    """Free-form brush strokes (missing) in the style of Yu et al. 2019; 1 = observed.

    ``n_strokes``, ``max_vertices``, and ``max_width`` / ``max_length`` as
    fractions of the image side.
    """

    def __init__(self, n_strokes: int = 4, max_vertices: int = 8, max_width: float = 0.08,
                 max_length: float = 0.25):
        if int(n_strokes) < 0 or int(max_vertices) < 1:
            raise ValueError("n_strokes must be >= 0 and max_vertices >= 1")
        self.n_strokes, self.max_vertices = int(n_strokes), int(max_vertices)
        self.max_width = _fraction(max_width, "max_width", low_open=True)
        self.max_length = _fraction(max_length, "max_length", low_open=True)

    def __call__(self, shape, seed: int | None = 0) -> Mask:
        H, W = _shape(shape)
        rng = np.random.RandomState(seed)
        side = min(H, W)
        yy, xx = np.mgrid[:H, :W]
        hole = np.zeros((H, W), dtype=bool)
        for _ in range(self.n_strokes):
            y, x = rng.uniform(0, H), rng.uniform(0, W)
            radius = max(1.0, rng.uniform(0.3, 1.0) * self.max_width * side / 2)
            for _ in range(rng.randint(1, self.max_vertices + 1)):
                angle = rng.uniform(0, 2 * np.pi)
                length = rng.uniform(0.2, 1.0) * self.max_length * side
                y1 = float(np.clip(y + length * np.sin(angle), 0, H - 1))
                x1 = float(np.clip(x + length * np.cos(angle), 0, W - 1))
                # distance of every pixel to the segment (y, x) -> (y1, x1)
                dy, dx = y1 - y, x1 - x
                t = ((yy - y) * dy + (xx - x) * dx) / max(dy * dy + dx * dx, 1e-12)
                t = np.clip(t, 0, 1)
                hole |= (yy - y - t * dy) ** 2 + (xx - x - t * dx) ** 2 <= radius ** 2
                y, x = y1, x1
        return _finish(1.0 - hole, "strokes")


MRI_MASKS = {
    "equispaced": EquispacedMask,
    "random": RandomMask,
    "gaussian1d": Gaussian1DMask,
    "gaussian2d": Gaussian2DMask,
    "poisson": PoissonDiscMask,
}

INPAINT_MASKS = {
    "box": BoxMask,
    "random": RandomPixelMask,
    "strokes": StrokeMask,
}
