"""The linear-operator interface every measurement model implements.

Conventions
-----------
* Inputs carry a leading batch dimension: ``x`` has shape ``(B, *in_shape)`` and
  ``A(x)`` has shape ``(B, *out_shape)``.  Nothing silently broadcasts: a wrong
  trailing shape raises ``ValueError`` naming the expected shape.
* dtype and device follow the input.  Buffers (angles, masks, system matrices)
  are registered buffers, so ``op.to(device)`` moves them.
* ``AH`` is the exact adjoint: ``<A x, y> == <x, AH y>`` to float precision
  (tested for every operator by ``tests/test_adjoint.py``).

Decomposition for the conditional sampler (Song et al., ICLR 2022)
-----------------------------------------------------------------
``op.decompose()`` returns ``Decomposition(T, mask, embed)`` such that
``A = P(mask) T``: ``T`` is a full, (approximately) invertible transform with
``T.inverse(z)`` (exact or least-squares), ``mask`` is a 0/1 tensor
broadcastable to ``(B, *T.out_shape)``, and ``embed(y)`` places a measurement
in T's output space (zeros where not measured).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import math

import torch
from torch import nn


def _fmt(shape) -> str:
    return "(B, " + ", ".join(str(s) for s in shape) + ")"


def check_tensor(x: torch.Tensor, shape: tuple, name: str = "input") -> None:
    """Raise ValueError unless ``x`` is a finite tensor of shape ``(B, *shape)``."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}, expected {_fmt(shape)} "
            "(batch dimension first)"
        )
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values; clean the data first")


class LinearOperator(nn.Module):
    """A linear map from ``(B, *in_shape)`` to ``(B, *out_shape)``.

    Subclasses implement ``_forward`` and ``_adjoint`` on validated tensors
    (not ``_apply``: that is ``nn.Module``'s hook behind ``.to()``/``.cuda()``).

    ``modality`` names the kind of measurement (``'ct'``, ``'mri'``,
    ``'inpaint'``) for operators that are one; see :func:`operator_kind`.
    """

    in_shape: tuple = ()
    out_shape: tuple = ()
    modality: str | None = None

    def __init__(self, in_shape, out_shape):
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)
        self.out_shape = tuple(int(s) for s in out_shape)

    # --- to be implemented -------------------------------------------------
    def _forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} must implement _forward(x) (the forward map)")

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    # --- public API ----------------------------------------------------------
    def A(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor(x, self.in_shape, f"{type(self).__name__} input")
        return self._forward(x)

    def AH(self, y: torch.Tensor) -> torch.Tensor:
        check_tensor(y, self.out_shape, f"{type(self).__name__} adjoint input")
        return self._adjoint(y)

    def forward(self, x):
        return self.A(x)

    @property
    def H(self) -> "LinearOperator":
        return Adjoint(self)

    def __matmul__(self, other: "LinearOperator") -> "LinearOperator":
        return Compose(self, other)

    def __mul__(self, scale: float) -> "LinearOperator":
        return Scaled(self, scale)

    __rmul__ = __mul__

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """AᴴA x."""
        return self._adjoint(self._forward(x))

    def decompose(self) -> "Decomposition":
        raise NotImplementedError(
            f"{type(self).__name__} has no A = P(mask) T decomposition; the "
            "projection sampler needs one (use a gradient-based sampler such as dps)"
        )

    def extra_repr(self) -> str:
        return f"in_shape={self.in_shape}, out_shape={self.out_shape}"

    # Convenience: the power method for ||A||_2, used by step-size rules.
    @torch.no_grad()
    def norm_estimate(self, n_iter: int = 30, dtype=torch.float64, device=None,
                      generator: torch.Generator | None = None) -> float:
        x = torch.randn((1, *self.in_shape), dtype=dtype, device=device, generator=generator)
        if self.is_complex_input:
            x = torch.complex(x, torch.randn_like(x))
        x = x / x.norm()
        s = 0.0
        for _ in range(n_iter):
            z = self.normal(x)
            s = z.norm().item()
            if s == 0:
                return 0.0
            x = z / s
        return s ** 0.5

    is_complex_input: bool = False
    is_complex_output: bool = False


def _inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-item real inner product Re<a, b>, shape (B,)."""
    p = a.conj() * b
    if p.is_complex():
        p = p.real
    return p.reshape(p.shape[0], -1).sum(1)


# bfloat16 has no complex counterpart: it maps to complex64.
_COMPLEX_DTYPES = {torch.float16: torch.complex32, torch.bfloat16: torch.complex64,
                   torch.float32: torch.complex64, torch.float64: torch.complex128}
_REAL_DTYPES = {torch.complex32: torch.float16, torch.complex64: torch.float32,
                torch.complex128: torch.float64}


def complex_dtype(dtype: torch.dtype) -> torch.dtype:
    """The complex dtype of a real floating ``dtype`` (complex dtypes pass through).

    float16 -> complex32, float32 -> complex64, float64 -> complex128;
    bfloat16, which has no complex counterpart, -> complex64.
    """
    if dtype.is_complex:
        return dtype
    try:
        return _COMPLEX_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"no complex dtype for {dtype}; expected a floating dtype") from None


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype of a complex ``dtype`` (complex64 -> float32, ...); real dtypes pass through."""
    return _REAL_DTYPES[dtype] if dtype.is_complex else dtype


@torch.no_grad()
def cgls(op: LinearOperator, z: torch.Tensor, n_iter: int = 50, x0: torch.Tensor | None = None,
         tol: float = 0.0, damp: float = 0.0, x_ref: torch.Tensor | None = None, real: bool = False,
         callback=None) -> torch.Tensor:
    """``argmin_x ||op(x) - z||^2 + damp^2 ||x - x_ref||^2`` by CGLS (CG on the normal equations).

    The one conjugate-gradient solver of the project: ``T.inverse`` of CT and
    SENSE, the ``cgls`` baseline and the data step of the fast sampler use it.

    Batched: every item has its own step sizes and stops moving once its
    normal-equation residual ``||A^H (z - A x) - damp^2 (x - x_ref)||`` fell
    below ``tol`` times its start (so round-off never walks a converged item
    along the operator's null space).  ``x0`` warm-starts (default zeros);
    ``x_ref`` defaults to zeros (``damp`` follows scipy ``lsqr``).  With
    ``real`` the unknown is a real image even when the operator takes complex
    input: it is cast to complex for ``A`` and the adjoint's real part is used.
    ``callback(i, x)`` runs after every iteration.
    """
    check_tensor(z, op.out_shape, f"{type(op).__name__}.inverse input")
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    if damp < 0 or not math.isfinite(damp):
        raise ValueError(f"damp must be a nonnegative finite number, got {damp}")
    cast = real and op.is_complex_input

    def fwd(v):
        return op._forward(v.to(complex_dtype(v.dtype)) if cast else v)

    def adj(r):
        out = op._adjoint(r)
        return out.real if real and out.is_complex() else out

    d2 = float(damp) ** 2
    if x0 is None:
        x = torch.zeros_like(adj(z))
        r = z.clone()
    else:
        check_tensor(x0, op.in_shape, "x0")
        x = x0.clone()
        r = z - fwd(x)
    if d2 and x_ref is not None:
        check_tensor(x_ref, op.in_shape, "x_ref")

    def normal_residual(r, x):
        s = adj(r)
        if d2:
            s = s - d2 * (x - x_ref if x_ref is not None else x)
        return s

    s = normal_residual(r, x)
    p = s.clone()
    gamma = _inner(s, s)
    stop = (tol ** 2) * gamma
    shape = (-1,) + (1,) * (x.dim() - 1)
    for i in range(int(n_iter)):
        active = gamma > stop
        if not bool(active.any()):
            break
        q = fwd(p)
        delta = _inner(q, q) + (d2 * _inner(p, p) if d2 else 0)
        ok = active & (delta > 0)
        alpha = torch.where(ok, gamma / torch.where(ok, delta, torch.ones_like(delta)), torch.zeros_like(delta))
        x = x + alpha.view(shape).to(x.dtype) * p
        r = r - alpha.view((-1,) + (1,) * (q.dim() - 1)).to(r.dtype) * q
        s = normal_residual(r, x)
        gamma_new = _inner(s, s)
        beta = torch.where(ok, gamma_new / torch.where(ok, gamma, torch.ones_like(gamma)), torch.zeros_like(gamma))
        p = s + beta.view(shape).to(p.dtype) * p
        gamma = torch.where(ok, gamma_new, torch.zeros_like(gamma))
        if callback is not None:
            callback(i, x)
    return x


@dataclass
class Decomposition:
    T: LinearOperator
    mask: torch.Tensor
    embed: Callable[[torch.Tensor], torch.Tensor]


class Adjoint(LinearOperator):
    def __init__(self, op: LinearOperator):
        super().__init__(op.out_shape, op.in_shape)
        self.op = op
        self.is_complex_input = op.is_complex_output
        self.is_complex_output = op.is_complex_input

    def _forward(self, x):
        return self.op._adjoint(x)

    def _adjoint(self, y):
        return self.op._forward(y)

    @property
    def H(self):
        return self.op


class Compose(LinearOperator):
    """``(outer @ inner)(x) = outer(inner(x))``."""

    def __init__(self, outer: LinearOperator, inner: LinearOperator):
        if tuple(outer.in_shape) != tuple(inner.out_shape):
            raise ValueError(
                f"cannot compose: outer expects {_fmt(outer.in_shape)} but inner "
                f"produces {_fmt(inner.out_shape)}"
            )
        super().__init__(inner.in_shape, outer.out_shape)
        self.outer, self.inner = outer, inner
        self.is_complex_input = inner.is_complex_input
        self.is_complex_output = outer.is_complex_output

    def _forward(self, x):
        return self.outer._forward(self.inner._forward(x))

    def _adjoint(self, y):
        return self.inner._adjoint(self.outer._adjoint(y))


class Scaled(LinearOperator):
    def __init__(self, op: LinearOperator, scale: float):
        if isinstance(scale, complex):
            raise ValueError("complex scaling is not supported; scale must be real")
        super().__init__(op.in_shape, op.out_shape)
        self.op, self.scale = op, float(scale)
        self.is_complex_input = op.is_complex_input
        self.is_complex_output = op.is_complex_output

    def _forward(self, x):
        return self.scale * self.op._forward(x)

    def _adjoint(self, y):
        return self.scale * self.op._adjoint(y)


class Identity(LinearOperator):
    #: ``inverse`` is exact (the projection sampler applies Song et al.'s formula through it)
    exact_inverse = True

    def __init__(self, shape):
        super().__init__(shape, shape)

    def _forward(self, x):
        return x

    def _adjoint(self, y):
        return y

    def inverse(self, z, **_):
        return z
