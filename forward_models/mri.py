"""MRI: centred orthonormal 2D FFT, single-coil Cartesian and SENSE multi-coil.

Conventions: images ``(B, H, W)`` complex (real input is cast: float32 ->
complex64, float64 -> complex128); k-space has its DC at index ``(H//2,
W//2)``: ``fft2c(x) = fftshift(fft2(ifftshift(x), norm='ortho'))`` over the
last two dims.  Sampling masks are real 0/1 ``(H, W)``; Cartesian line masks
select columns (the phase-encode direction is the last dim, see ``masks``).
"""
from __future__ import annotations

import torch

from .base import Decomposition, LinearOperator, cgls, check_tensor

__all__ = ["fft2c", "ifft2c", "FFT2c", "CartesianMRI", "SenseMRI", "estimate_sensitivity_maps",
           "centred_block", "smooth_phase", "PhaseModulated"]

_DIMS = (-2, -1)


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2D FFT over the last two dims."""
    x = torch.fft.ifftshift(x, dim=_DIMS)
    return torch.fft.fftshift(torch.fft.fft2(x, dim=_DIMS, norm="ortho"), dim=_DIMS)


def ifft2c(k: torch.Tensor) -> torch.Tensor:
    """Inverse (and adjoint) of :func:`fft2c`."""
    k = torch.fft.ifftshift(k, dim=_DIMS)
    return torch.fft.fftshift(torch.fft.ifft2(k, dim=_DIMS, norm="ortho"), dim=_DIMS)


def _complex(x: torch.Tensor) -> torch.Tensor:
    if x.is_complex():
        return x
    if x.dtype == torch.float64:
        return x.to(torch.complex128)
    return x.to(torch.complex64)


def _as_mask(mask, name: str = "mask") -> torch.Tensor:
    """A real 0/1 float tensor from a tensor, array or ``masks.Mask``."""
    mask = getattr(mask, "mask", mask)
    m = torch.as_tensor(mask)
    if m.is_complex():
        raise ValueError(f"{name} must be real 0/1, got a complex tensor")
    m = m.float()
    if m.dim() != 2:
        raise ValueError(f"{name} must have shape (H, W), got {tuple(m.shape)}")
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError(f"{name} must contain only 0 and 1")
    return m.contiguous()


def _check_shape(mask: torch.Tensor, shape, name="mask"):
    if shape is not None and tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(shape)} "
                         "(the image size)")


class FFT2c(LinearOperator):
    """Unitary centred 2D FFT ``(B, H, W) -> (B, H, W)`` complex; ``inverse = AH``."""

    modality = "mri"
    is_complex_input = True
    is_complex_output = True
    #: ``inverse`` is exact (the projection sampler applies Song et al.'s formula through it)
    exact_inverse = True

    def __init__(self, shape):
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"shape must be (H, W) with positive sizes, got {shape}")
        super().__init__(shape, shape)

    def _forward(self, x):
        return fft2c(_complex(x))

    def _adjoint(self, y):
        return ifft2c(_complex(y))

    def inverse(self, z, **unused):
        """Exact inverse; iteration options (``n_iter``, ``x0``) are ignored."""
        check_tensor(z, self.out_shape, "FFT2c.inverse input")
        return ifft2c(_complex(z))


class CartesianMRI(LinearOperator):
    """Single-coil ``A x = mask * fft2c(x)``, ``(B, H, W) -> (B, H, W)`` complex.

    ``shape`` (optional) is the expected image size; a mask of another size
    raises ``ValueError``.
    """

    modality = "mri"
    is_complex_input = True
    is_complex_output = True

    def __init__(self, mask, shape=None):
        m = _as_mask(mask)
        _check_shape(m, shape)
        super().__init__(m.shape, m.shape)
        self.register_buffer("mask", m)

    @property
    def acceleration(self) -> float:
        return self.mask.numel() / max(float(self.mask.sum()), 1.0)

    def _mask(self, t):
        return self.mask.to(device=t.device, dtype=t.real.dtype)

    def _forward(self, x):
        x = _complex(x)
        return self._mask(x) * fft2c(x)

    def _adjoint(self, y):
        y = _complex(y)
        return ifft2c(self._mask(y) * y)

    def decompose(self) -> Decomposition:
        """``T = FFT2c``, ``mask`` (H, W), ``embed`` = identity (A's output is already zero-filled)."""
        return Decomposition(FFT2c(self.in_shape), self.mask, lambda y: y)


class SenseMRI(LinearOperator):
    """Multi-coil SENSE ``A x = mask * fft2c(maps * x)``: ``(B, H, W) -> (B, C, H, W)``.

    ``maps``: complex ``(C, H, W)`` coil sensitivities; ``mask``: ``(H, W)``.
    ``AH y = Σ_c conj(maps_c) · ifft2c(mask * y_c)``.
    """

    modality = "mri"
    is_complex_input = True
    is_complex_output = True

    def __init__(self, maps, mask=None):
        maps = torch.as_tensor(maps)
        if maps.dim() != 3:
            raise ValueError(f"maps must have shape (C, H, W), got {tuple(maps.shape)}")
        if not torch.isfinite(maps).all():
            raise ValueError("maps contain NaN or infinite values")
        m = torch.ones(maps.shape[-2:]) if mask is None else _as_mask(mask)
        _check_shape(m, maps.shape[-2:], "mask")
        super().__init__(m.shape, maps.shape)
        self.register_buffer("maps", _complex(maps).contiguous())
        self.register_buffer("mask", m)

    def _cast(self, t):
        return (self.maps.to(device=t.device, dtype=t.dtype),
                self.mask.to(device=t.device, dtype=t.real.dtype))

    def _forward(self, x):
        x = _complex(x)
        maps, mask = self._cast(x)
        return mask * fft2c(maps * x[:, None])

    def _adjoint(self, y):
        y = _complex(y)
        maps, mask = self._cast(y)
        return (maps.conj() * ifft2c(mask * y)).sum(1)

    def inverse(self, z, n_iter: int = 30, x0=None, tol: float = 0.0):
        """Least-squares image: closed form when fully sampled, else CGLS."""
        check_tensor(z, self.out_shape, "SenseMRI.inverse input")
        z = _complex(z)
        if bool((self.mask == 1).all()) and x0 is None:
            maps, _ = self._cast(z)
            energy = (maps.abs() ** 2).sum(0)
            num = (maps.conj() * ifft2c(z)).sum(1)
            return torch.where(energy > 0, num / energy.clamp_min(1e-12), torch.zeros_like(num))
        return cgls(self, z, n_iter=n_iter, x0=x0, tol=tol)

    def decompose(self) -> Decomposition:
        """``T`` = fully sampled SENSE, ``mask`` (1, H, W) shared by coils, ``embed`` = identity."""
        return Decomposition(SenseMRI(self.maps), self.mask[None], lambda y: y)


def estimate_sensitivity_maps(kspace: torch.Tensor, calib_size: int = 24,
                              floor: float = 0.05) -> torch.Tensor:
    """Coil maps from the fully sampled k-space centre of ``kspace`` ``(C, H, W)``.

    Low-resolution coil images (the central ``calib_size²`` block, Hann-windowed,
    zero elsewhere) divided by their root-sum-of-squares.  Where the RSS is
    below ``floor`` times its maximum the maps fade to zero (no noise
    amplification outside the object).  Returns complex ``(C, H, W)``.
    """
    k = torch.as_tensor(kspace)
    if k.dim() != 3:
        raise ValueError(f"kspace must have shape (C, H, W), got {tuple(k.shape)}")
    if not torch.isfinite(k).all():
        raise ValueError("kspace contains NaN or infinite values")
    C, H, W = k.shape
    calib_size = int(calib_size)
    if not 1 <= calib_size <= min(H, W):
        raise ValueError(f"calib_size must be in [1, {min(H, W)}], got {calib_size}")
    k = _complex(k)
    real = k.real.dtype
    win1 = torch.hann_window(calib_size + 2, periodic=False, dtype=real, device=k.device)[1:-1]
    win = torch.zeros(H, W, dtype=real, device=k.device)
    r0, c0 = H // 2 - calib_size // 2, W // 2 - calib_size // 2
    win[r0:r0 + calib_size, c0:c0 + calib_size] = win1[:, None] * win1[None, :]
    low = ifft2c(k * win)
    rss = (low.abs() ** 2).sum(0).sqrt()
    thresh = floor * rss.max().clamp_min(torch.finfo(real).tiny)
    maps = low / torch.maximum(rss, thresh)
    return maps * (rss >= thresh)


# ---------------------------------------------------------------------------
# the object's smooth phase, for real-valued (magnitude) priors on complex data
# ---------------------------------------------------------------------------
def centred_block(mask) -> tuple[int, int] | None:
    """Half-sizes ``(a, b)`` of the largest fully sampled block of ``mask`` ``(H, W)`` that is
    symmetric about the k-space centre ``(H//2, W//2)``: rows ``H//2 - a .. H//2 + a``, columns
    ``W//2 - b .. W//2 + b``, all sampled, of largest area.  ``None`` when the centre itself is
    not sampled.  A Cartesian line mask (all rows of its central columns) gives a tall block."""
    m = _as_mask(mask).bool()
    H, W = m.shape
    rc, cc = H // 2, W // 2
    if not bool(m[rc, cc]):
        return None
    a_max, b_max = min(rc, H - 1 - rc), min(cc, W - 1 - cc)
    full = m[rc].clone()
    best, best_area = (0, 0), -1
    for a in range(a_max + 1):
        if a:
            full &= m[rc - a] & m[rc + a]
        if not bool(full[cc]):
            break
        left = full[:cc + 1].flip(0)
        right = full[cc:]
        run_l = int(left.logical_not().nonzero()[0]) if not bool(left.all()) else left.numel()
        run_r = int(right.logical_not().nonzero()[0]) if not bool(right.all()) else right.numel()
        b = min(run_l - 1, run_r - 1, b_max)
        area = (2 * a + 1) * (2 * b + 1)
        if area > best_area:
            best, best_area = (a, b), area
    return best


#: a block narrower than this (half-size, pixels) in either direction gives no phase estimate
MIN_PHASE_BLOCK = 2
#: an item whose low-resolution image has less imaginary energy than this fraction is real
#: (magnitude-simulated data): its phase is taken as 0, not as the 0/pi of its ringing
REAL_IMAGE_TOL = 1e-3


def smooth_phase(op: LinearOperator, y: torch.Tensor) -> torch.Tensor | None:
    """The object's smooth phase ``(B, H, W)`` from the fully sampled k-space centre of ``y``.

    ``op`` is a Cartesian or SENSE MRI operator with a ``mask`` ``(H, W)`` (SENSE: its maps
    combine the coils).  Inside the largest centred fully sampled block (:func:`centred_block`)
    the data are weighted by a Gaussian of std half the block's half-size in each direction,
    zero outside it, and brought back to the image by the adjoint: a low-resolution image whose
    angle is the phase, estimated only from measured samples (so no aliasing enters it).
    Items whose low-resolution image is real (data simulated from a magnitude image) get phase
    0.  ``None`` when the mask has no usable centre block (no phase can be estimated)."""
    mask = getattr(op, "mask", None)
    if mask is None:
        return None
    mask = mask.reshape(mask.shape[-2:]) if mask.dim() > 2 else mask
    block = centred_block(mask.cpu())
    if block is None or min(block) < MIN_PHASE_BLOCK:
        return None
    a, b = block
    H, W = mask.shape
    real = y.real.dtype
    rr = torch.arange(H, dtype=real, device=y.device) - H // 2
    cc = torch.arange(W, dtype=real, device=y.device) - W // 2
    win = torch.exp(-0.5 * (rr[:, None] / (a / 2)) ** 2 - 0.5 * (cc[None, :] / (b / 2)) ** 2)
    win = win * ((rr.abs() <= a)[:, None] & (cc.abs() <= b)[None, :])
    low = op._adjoint(_complex(y) * win)
    phase = torch.angle(low)
    energy = low.abs().pow(2).flatten(1).sum(1)
    imag = low.imag.pow(2).flatten(1).sum(1)
    is_real = imag <= REAL_IMAGE_TOL * energy.clamp_min(torch.finfo(real).tiny)
    return torch.where(is_real.view(-1, 1, 1), torch.zeros_like(phase), phase)


class PhaseModulated(LinearOperator):
    """``A' x = A(e^{i phi} x)``: the operator ``op`` seen by a real image ``x`` with a known
    phase ``phi`` ``(B, *in_shape)`` or ``(*in_shape)``; ``A'^H y = e^{-i phi} A^H y``.

    A real-valued (magnitude) prior cannot represent an object with phase: fitting a real
    image to complex data fits its real part.  With the smooth phase of the object (estimated
    from the fully sampled centre, :func:`smooth_phase`) the unknown is the magnitude and the
    data step stays linear.  ``decompose()`` keeps ``op``'s mask and wraps its ``T``, so the
    projection sampler works unchanged; ``inverse`` (of a wrapped ``T``) carries ``x0`` into
    ``T``'s domain and back."""

    is_complex_input = True
    is_complex_output = True

    def __init__(self, op: LinearOperator, phase: torch.Tensor):
        phase = torch.as_tensor(phase)
        if phase.is_complex():
            raise ValueError("phase must be real (radians), got a complex tensor")
        if tuple(phase.shape[-len(op.in_shape):]) != tuple(op.in_shape) or phase.dim() > len(op.in_shape) + 1:
            raise ValueError(f"phase has shape {tuple(phase.shape)}, expected {tuple(op.in_shape)} "
                             f"or (B, {', '.join(map(str, op.in_shape))})")
        if not torch.isfinite(phase).all():
            raise ValueError("phase contains NaN or infinite values")
        super().__init__(op.in_shape, op.out_shape)
        self.op = op
        self.modality = getattr(op, "modality", None)
        if phase.dim() == len(op.in_shape):
            phase = phase[None]
        self.register_buffer("phase", phase.contiguous())
        self.is_complex_output = op.is_complex_output

    def _carrier(self, t):
        if self.phase.shape[0] not in (1, t.shape[0]):
            raise ValueError(f"PhaseModulated: the phase holds {self.phase.shape[0]} items but the input has a "
                             f"batch of {t.shape[0]}; give one phase per item (or one for all)")
        return torch.polar(torch.ones_like(self.phase), self.phase).to(device=t.device, dtype=t.dtype)

    def norm_estimate(self, *args, **kwargs) -> float:
        """``||A e^{i phi}|| = ||A||``: a phase factor is unitary."""
        return self.op.norm_estimate(*args, **kwargs)

    def _forward(self, x):
        x = _complex(x)
        return self.op._forward(self._carrier(x) * x)

    def _adjoint(self, y):
        out = _complex(self.op._adjoint(y))
        return self._carrier(out).conj() * out

    def inverse(self, z, x0=None, **options):
        """``e^{-i phi} T^{-1} z`` for a wrapped transform ``T`` (started at ``e^{i phi} x0``)."""
        if x0 is not None:
            x0 = _complex(x0)
            x0 = self._carrier(x0) * x0
        u = _complex(self.op.inverse(z, x0=x0, **options))
        return self._carrier(u).conj() * u

    def decompose(self) -> Decomposition:
        dec = self.op.decompose()
        return Decomposition(PhaseModulated(dec.T, self.phase), dec.mask, dec.embed)

    @property
    def mask(self):
        return getattr(self.op, "mask", None)

    @property
    def exact_inverse(self) -> bool:
        return bool(getattr(self.op, "exact_inverse", False))
