"""Measurement operators: ``A``, exact adjoint ``AH`` and ``decompose()``.

See ``base.py`` for the interface.  Importing this package never imports the
optional CT backends (ASTRA, torch-radon).
"""
from .base import (Adjoint, Compose, Decomposition, Identity, LinearOperator, Scaled,
                   cgls, check_tensor, complex_dtype, real_dtype)
from .ct import FanBeamCT, FinerGridProjection, ParallelBeamCT, view_angles
from .inpaint import Inpainting
from .kind import inpainting_mask, operator_kind
from .masks import (INPAINT_MASKS, MRI_MASKS, BoxMask, EquispacedMask, Gaussian1DMask,
                    Gaussian2DMask, Mask, PoissonDiscMask, RandomMask, RandomPixelMask,
                    StrokeMask)
from .mri import (FFT2c, CartesianMRI, PhaseModulated, SenseMRI, centred_block, estimate_sensitivity_maps, fft2c,
                  ifft2c, smooth_phase)
from .noise import GaussianNoise, PoissonNoise

__all__ = [
    "LinearOperator", "Decomposition", "Adjoint", "Compose", "Scaled", "Identity", "cgls",
    "check_tensor", "complex_dtype", "real_dtype", "operator_kind", "inpainting_mask",
    "ParallelBeamCT", "FanBeamCT", "FinerGridProjection", "view_angles",
    "FFT2c", "CartesianMRI", "SenseMRI", "estimate_sensitivity_maps", "fft2c", "ifft2c",
    "PhaseModulated", "smooth_phase", "centred_block",
    "Inpainting",
    "Mask", "EquispacedMask", "RandomMask", "Gaussian1DMask", "Gaussian2DMask", "PoissonDiscMask",
    "BoxMask", "RandomPixelMask", "StrokeMask", "MRI_MASKS", "INPAINT_MASKS",
    "GaussianNoise", "PoissonNoise",
]
