"""Every operator's AH is its exact adjoint; A is linear and batch-consistent."""
import math

import pytest
import torch

from forward_models import (MRI_MASKS, Adjoint, CartesianMRI, Compose, FanBeamCT, FinerGridProjection, Inpainting,
                            ParallelBeamCT, PhaseModulated, RandomPixelMask, Scaled, SenseMRI, view_angles)



def _rand(shape, dtype, complex_, gen):
    x = torch.randn(shape, dtype=dtype, generator=gen)
    if complex_:
        x = torch.complex(x, torch.randn(shape, dtype=dtype, generator=gen))
    return x


def _vdot(a, b):
    return (a.conj() * b).sum() if a.is_complex() or b.is_complex() else (a * b).sum()


def assert_adjoint(op, dtype=torch.float64, batch=3, tol=1e-5, seed=0):
    """|<Ax, y> - <x, AHy>| <= tol·||Ax||·||y||, plus linearity and batch consistency.

    Complex-aware: for an operator on real inputs only the real part of the
    inner product is compared (its adjoint is Re(AH y)).
    """
    gen = torch.Generator().manual_seed(seed)
    x = _rand((batch, *op.in_shape), dtype, op.is_complex_input, gen)
    y = _rand((batch, *op.out_shape), dtype, op.is_complex_output, gen)
    Ax, AHy = op.A(x), op.AH(y)
    assert Ax.shape == (batch, *op.out_shape) and AHy.shape == (batch, *op.in_shape)
    lhs, rhs = _vdot(Ax, y), _vdot(x, AHy)
    if not op.is_complex_input:
        lhs, rhs = lhs.real, rhs.real
    scale = (Ax.norm() * y.norm()).item()
    assert scale > 0, "operator returned all zeros"
    assert abs(lhs - rhs).item() <= tol * scale, f"adjoint mismatch {abs(lhs - rhs).item() / scale:.2e}"
    # linearity
    x2 = _rand(x.shape, dtype, op.is_complex_input, gen)
    a, b = 0.7, -1.3
    lin = op.A(a * x + b * x2) - (a * Ax + b * op.A(x2))
    assert lin.norm().item() <= 1e-6 * (Ax.norm().item() + op.A(x2).norm().item())
    # batch consistency
    for i in range(batch):
        torch.testing.assert_close(op.A(x[i:i + 1])[0], Ax[i], rtol=1e-5, atol=1e-6 * Ax.abs().max().item())
        torch.testing.assert_close(op.AH(y[i:i + 1])[0], AHy[i], rtol=1e-5, atol=1e-6 * AHy.abs().max().item())


def _mask(kind, shape=(32, 24)):
    return MRI_MASKS[kind](4)(shape, seed=1)


def _maps(C=4, H=32, W=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.complex(torch.randn(C, H, W, generator=g), torch.randn(C, H, W, generator=g))
    return m / (m.abs() ** 2).sum(0).sqrt()


def _phase(H=32, W=24, seed=4):
    return torch.rand(H, W, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 6 - 3


FACTORIES = {
    "ct-parallel-sparse23-even": lambda: ParallelBeamCT(32, view_angles(23)),
    "ct-parallel-sparse23-odd": lambda: ParallelBeamCT(33, view_angles(23)),
    "ct-parallel-limited-angle": lambda: ParallelBeamCT(32, view_angles(40, arc_deg=120)),
    "ct-parallel-random-angles": lambda: ParallelBeamCT(
        31, torch.rand(17, generator=torch.Generator().manual_seed(3)) * math.pi),
    "ct-parallel-det-spacing": lambda: ParallelBeamCT(32, view_angles(30), n_det=25, det_spacing=1.7),
    "ct-parallel-skimage-geometry": lambda: ParallelBeamCT.like_skimage(30, range(0, 180, 7)),
    "ct-parallel-folded-180-odd": lambda: ParallelBeamCT(33, view_angles(180)),
    "ct-parallel-folded-360": lambda: ParallelBeamCT(32, view_angles(16, arc_deg=360)),
    "ct-parallel-matrix-free": lambda: ParallelBeamCT(32, view_angles(23), backend="matrix-free"),
    "ct-parallel-budget-fallback": lambda: ParallelBeamCT(33, view_angles(23), memory_budget=0),
    "ct-fan": lambda: FanBeamCT(32, view_angles(36, arc_deg=360), 60, 100),
    "ct-finer-grid-2": lambda: FinerGridProjection(ParallelBeamCT(21, view_angles(9)), 2),
    "ct-finer-grid-3-det-spacing": lambda: FinerGridProjection(
        ParallelBeamCT(16, view_angles(7), n_det=19, det_spacing=1.3), 3),
    "ct-fan-odd-short-scan": lambda: FanBeamCT(33, view_angles(25, arc_deg=220), 50, 90, n_det=41),
    "ct-fan-matrix-free": lambda: FanBeamCT(32, view_angles(36, arc_deg=360), 60, 100, backend="matrix-free"),
    **{f"mri-cartesian-{k}": (lambda k=k: CartesianMRI(_mask(k))) for k in MRI_MASKS},
    "mri-sense": lambda: SenseMRI(_maps(), _mask("equispaced")),
    "inpaint": lambda: Inpainting(RandomPixelMask(0.3)((20, 18), seed=2)),
    "compose-ct-inpaint": lambda: Compose(ParallelBeamCT(24, view_angles(15)),
                                          Inpainting(RandomPixelMask(0.5)((24, 24)))),
    "compose-matmul-mri": lambda: CartesianMRI(_mask("random")) @ Inpainting(torch.ones(32, 24)),
    "scaled-mri": lambda: Scaled(CartesianMRI(_mask("gaussian2d")), 2.5),
    "scaled-rmul-ct": lambda: 0.5 * ParallelBeamCT(24, view_angles(10)),
    "adjoint-ct": lambda: ParallelBeamCT(24, view_angles(11)).H,
    "adjoint-sense": lambda: Adjoint(SenseMRI(_maps(C=3), _mask("poisson"))),
    "decompose-T-ct-sparse": lambda: ParallelBeamCT(32, view_angles(23)).decompose().T,
    "decompose-T-ct-limited": lambda: ParallelBeamCT(32, view_angles(40, arc_deg=120)).decompose().T,
    "decompose-T-fan": lambda: FanBeamCT(32, view_angles(36, arc_deg=360), 60, 100).decompose().T,
    "decompose-T-mri": lambda: CartesianMRI(_mask("equispaced")).decompose().T,
    "decompose-T-sense": lambda: SenseMRI(_maps(), _mask("random")).decompose().T,
    "phase-modulated-cartesian": lambda: PhaseModulated(CartesianMRI(_mask("equispaced")), _phase()),
    "phase-modulated-sense": lambda: PhaseModulated(SenseMRI(_maps(), _mask("poisson")), _phase()),
    "decompose-T-phase-modulated-sense": lambda: PhaseModulated(SenseMRI(_maps(), _mask("random")),
                                                                _phase()).decompose().T,
    "decompose-T-inpaint": lambda: Inpainting(RandomPixelMask(0.3)((20, 18))).decompose().T,
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_adjoint(name):
    assert_adjoint(FACTORIES[name]())


@pytest.mark.parametrize("name", ["ct-parallel-sparse23-odd", "ct-fan", "mri-sense", "compose-ct-inpaint"])
def test_adjoint_float32(name):
    assert_adjoint(FACTORIES[name](), dtype=torch.float32, tol=1e-4)


def test_budget_fallback_is_matrix_free():
    assert FACTORIES["ct-parallel-budget-fallback"]().backend == "matrix-free"
