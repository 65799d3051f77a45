"""X-ray CT: parallel- and fan-beam projectors with exact adjoints.

Geometry (both classes)
-----------------------
* Images are ``(B, H, W)`` with ``H = W = size`` and pixel size 1.  World
  coordinates of pixel ``(row, col)``: ``x = col - center`` (to the right) and
  ``y = center - row`` (up).  ``center`` (the rotation axis, a pixel index)
  defaults to the geometric centre ``(size - 1) / 2``.
* Detector bin ``k`` sits at ``u_k = (k - det_center) * det_spacing`` with
  ``det_center`` defaulting to ``(n_det - 1) / 2``.
* Parallel beam, view angle ``θ`` (radians): bin ``k`` measures the line
  integral of the image over the line ``{p : p·(cos θ, sin θ) = u_k}``.
  θ = 0 integrates down the columns (bin index grows with ``col``); θ = π/2
  integrates along the rows (bin index grows upwards, i.e. with decreasing
  ``row``).  Angles increase counter-clockwise.
* Fan beam, source angle ``β``: the source sits at ``R (sin β, -cos β)``
  (``R = source_distance``), the central ray runs along ``(-sin β, cos β)``
  and the flat detector is perpendicular to it at ``detector_distance`` (source
  to detector) from the source; bin ``k`` sits at ``u_k`` along
  ``(cos β, sin β)``.  The central fan ray of view β is the parallel-beam ray
  ``θ = β, u = 0``; in general a fan ray with detector coordinate ``u`` is the
  parallel ray ``θ = β - γ``, ``s = R sin γ`` with ``γ = atan(u / D)``.
  Lines are integrated across the whole image (the detector position only sets
  the magnification), so the source must lie outside the image.

scikit-image's ``radon(image, theta=degrees, circle=...)``
-----------------------------------------------------------
Same angle direction and detector orientation as above with ``θ = radians(
theta)``, but the rotation axis is the pixel ``size // 2`` (not the geometric
centre) and the detector centre is bin ``n_det // 2``; ``n_det`` is
``ceil(sqrt(2) * size)`` for ``circle=False`` and ``size`` for ``circle=True``.
skimage returns ``(n_det, n_views)``; we return ``(B, n_views, n_det)``, so
``op.A(x)[0] ≈ radon(x[0], theta).T``.  ``ParallelBeamCT.like_skimage``
builds that geometry (equal within ~1 % relative L2 on Shepp-Logan: skimage
interpolates bilinearly in a rotated grid, we use Joseph's method).

Projector
---------
Ray-driven Joseph: each line is sampled once per column (if it is closer to
vertical… precisely, if ``|dir_x| >= |dir_y|``) or per row otherwise, with
linear interpolation along the other axis and weight = step length.  The
weights form a sparse system matrix, stored as int32 CSR together with its
transpose, so ``AH`` is exactly the transpose of ``A``.  It is built in
vectorised chunks of views and cached on disk (``$RECON_CACHE_DIR``, default
``~/.cache/recon``) as ``.npz`` keyed by a hash of the geometry.  When the
matrix would exceed ``memory_budget`` bytes the same weights are recomputed on
the fly (matrix-free: gather forward, ``index_add_`` adjoint, still exact).

Centred parallel-beam geometries whose view set is (nearly) closed under the
square's symmetries (e.g. equally spaced views with ``n_views % 4 == 0``, or
limited-angle sets of such a grid) store only the views in ``[0, π/4]`` and
apply them to re-indexed copies of the image ("symmetry folding", see
``_SymmetryPlan``): a quarter of the memory and faster single-image products.
Joseph ties at exactly 45° are broken so that folded and direct weights agree.

Optional backends (never imported at module import, never chosen by 'auto'):
``backend='astra'`` (ASTRA CPU 'linear' for parallel, 'line_fanflat' for fan;
same geometry via ``*_vec`` descriptions; float32) and ``backend='torch-radon'``
(CUDA, parallel only, geometry not verified here).  'auto' picks the sparse
matrix (which also runs on CUDA through torch's CSR kernels) or matrix-free.

Performance note: on a 2-core machine that is also running other jobs, torch's
default of 2 threads made these products 5-10x slower than 1 thread (OpenMP
oversubscription); ``torch.set_num_threads(1)`` there.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import Decomposition, LinearOperator, cgls, check_tensor

__all__ = [
    "FinerGridProjection",
    "ParallelBeamCT", "FanBeamCT", "view_angles", "joseph_entries", "cache_dir",
    "DEFAULT_MEMORY_BUDGET",
]

DEFAULT_MEMORY_BUDGET = 2 * 1024 ** 3  # bytes for A and its transpose together
_MATRIX_FORMAT = 2  # bump when the weights change, invalidates disk caches
_CHUNK_ENTRIES = 1 << 21  # candidate entries per chunk while generating weights


def view_angles(n: int, arc_deg: float = 180.0, start_deg: float = 0.0) -> torch.Tensor:
    """``n`` equally spaced view angles in radians over ``[start, start + arc)``."""
    if int(n) < 1:
        raise ValueError(f"need at least one view, got n={n}")
    deg = start_deg + arc_deg * np.arange(int(n), dtype=np.float64) / int(n)
    return torch.from_numpy(np.deg2rad(deg))


def cache_dir() -> Path:
    """Where system matrices are cached: ``$RECON_CACHE_DIR`` or ``~/.cache/recon``."""
    return Path(os.environ.get("RECON_CACHE_DIR", "~/.cache/recon")).expanduser()


def _as_angles(angles) -> np.ndarray:
    if isinstance(angles, torch.Tensor):
        angles = angles.detach().cpu().double().numpy()
    a = np.asarray(angles, dtype=np.float64)
    if a.ndim == 0:
        a = a.reshape(1)
    if a.ndim != 1:
        raise ValueError(f"angles must be a 1-D array of radians, got shape {a.shape}")
    if a.size == 0:
        raise ValueError("angles is empty: expected at least one view angle (radians)")
    if not np.isfinite(a).all():
        raise ValueError("angles contain NaN or infinite values; expected finite radians")
    return a


def _positive(value, name):
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return v


# ---------------------------------------------------------------------------
# Joseph weights
# ---------------------------------------------------------------------------
def joseph_entries(origins: torch.Tensor, dirs: torch.Tensor, size: int, center: float):
    """Joseph weights of the lines ``origin + t * dir`` through a ``size²`` image.

    ``origins`` and ``dirs`` are ``(R, 2)`` world ``(x, y)`` coordinates (see the
    module docstring), ``dirs`` unit vectors.  Returns ``(ray, pixel, weight)``:
    ray index in ``[0, R)``, flat pixel index ``row * size + col`` and the weight
    (linear-interpolation weight times the step length along the line).
    """
    steps = torch.arange(size, device=origins.device, dtype=origins.dtype)
    steps_i = torch.arange(size, device=origins.device)
    out_r, out_p, out_w = [], [], []
    ax, ay = dirs[:, 0].abs(), dirs[:, 1].abs()
    tie = (ax - ay).abs() <= 1e-12  # 45° lines: break ties so that the symmetry folding
    x_major = (ax > ay) & ~tie | tie & (dirs[:, 0] * dirs[:, 1] < 0)  # below is exact
    for along_x in (True, False):
        sel = torch.nonzero(x_major if along_x else ~x_major).squeeze(1)
        if sel.numel() == 0:
            continue
        o, d = origins[sel], dirs[sel]
        if along_x:  # one sample per column j, interpolate between rows
            t = ((steps - center)[None] - o[:, :1]) / d[:, :1]
            other = center - (o[:, 1:] + t * d[:, 1:])
            step = 1.0 / d[:, 0].abs()
        else:  # one sample per row i, interpolate between columns
            t = ((center - steps)[None] - o[:, 1:]) / d[:, 1:]
            other = o[:, :1] + t * d[:, :1] + center
            step = 1.0 / d[:, 1].abs()
        lo = torch.floor(other)
        frac = other - lo
        lo = lo.clamp(-2, size + 1).long()
        for idx, w in ((lo, 1.0 - frac), (lo + 1, frac)):
            valid = (idx >= 0) & (idx < size) & (w > 0)
            march = steps_i.expand_as(idx)[valid]
            other_i = idx[valid]
            out_r.append(sel[:, None].expand_as(idx)[valid])
            out_p.append(other_i * size + march if along_x else march * size + other_i)
            out_w.append((w * step[:, None])[valid])
    if not out_r:
        empty = torch.empty(0, dtype=torch.long, device=origins.device)
        return empty, empty, torch.empty(0, dtype=origins.dtype, device=origins.device)
    return torch.cat(out_r), torch.cat(out_p), torch.cat(out_w)


# ---------------------------------------------------------------------------
# Geometries
# ---------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class _Geometry:
    size: int
    angles: np.ndarray = field(repr=False)
    n_det: int
    det_spacing: float
    center: float
    det_center: float

    @property
    def n_views(self) -> int:
        return len(self.angles)

    def det_coords(self) -> np.ndarray:
        return (np.arange(self.n_det) - self.det_center) * self.det_spacing

    def params(self) -> dict:
        return {"size": self.size, "n_det": self.n_det, "det_spacing": self.det_spacing,
                "center": self.center, "det_center": self.det_center}

    def key(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"kind": type(self).__name__, "format": _MATRIX_FORMAT,
                             **self.params()}, sort_keys=True).encode())
        h.update(np.ascontiguousarray(self.angles, dtype="<f8").tobytes())
        kind = type(self).__name__.strip("_").replace("Geometry", "").lower()
        return f"ct-{kind}-{self.size}-{h.hexdigest()[:20]}"

    def view_chunks(self):
        per_view = 2 * self.n_det * self.size
        step = max(1, _CHUNK_ENTRIES // per_view)
        for v0 in range(0, self.n_views, step):
            yield v0, min(v0 + step, self.n_views)

    def entries(self, v0, v1, device=None):
        """Joseph entries of views ``[v0, v1)``; ray indices are global."""
        o, d = self.rays(v0, v1)
        r, p, w = joseph_entries(o.to(device), d.to(device), self.size, self.center)
        return r + v0 * self.n_det, p, w

    def nnz_estimate(self) -> int:
        """≈ number of matrix entries: 2 per ray step inside the image."""
        th = self.angles
        dominant = np.maximum(np.abs(np.cos(th)), np.abs(np.sin(th))).sum()
        iso = self._iso_spacing()
        covered = self.size * min(self.size, self.n_det * iso)  # image area the rays cross
        area_based = 1.05 * 2 * covered / iso * dominant
        return int(min(area_based, 2 * self.size * self.n_det * self.n_views)) + 1

    def matrix_bytes(self) -> int:
        """Memory of A and Aᵀ as float32/int32 CSR."""
        n_rays, n_pix = self.n_views * self.n_det, self.size ** 2
        return 16 * self.nnz_estimate() + 4 * (n_rays + n_pix + 2)


@dataclass(frozen=True, eq=False)
class _ParallelGeometry(_Geometry):
    def _iso_spacing(self):
        return self.det_spacing

    def rays(self, v0, v1):
        th = torch.from_numpy(self.angles[v0:v1])
        u = torch.from_numpy(self.det_coords())
        e = torch.stack([th.cos(), th.sin()], -1)  # (V, 2) detector axis
        d = torch.stack([-th.sin(), th.cos()], -1)  # (V, 2) ray direction
        origins = u[None, :, None] * e[:, None, :]
        dirs = d[:, None, :].expand_as(origins)
        return origins.reshape(-1, 2), dirs.reshape(-1, 2)


@dataclass(frozen=True, eq=False)
class _FanGeometry(_Geometry):
    source_distance: float = 0.0
    detector_distance: float = 0.0

    def params(self) -> dict:
        return {**super().params(), "source_distance": self.source_distance,
                "detector_distance": self.detector_distance, "detector": "flat"}

    def _iso_spacing(self):
        return self.det_spacing * self.source_distance / self.detector_distance

    def rays(self, v0, v1):
        b = torch.from_numpy(self.angles[v0:v1])
        u = torch.from_numpy(self.det_coords())
        e = torch.stack([b.cos(), b.sin()], -1)
        d = torch.stack([-b.sin(), b.cos()], -1)
        src = -self.source_distance * d  # (V, 2)
        to_det = self.detector_distance * d[:, None, :] + u[None, :, None] * e[:, None, :]
        dirs = to_det / to_det.norm(dim=-1, keepdim=True)
        origins = src[:, None, :].expand_as(dirs)
        return origins.reshape(-1, 2), dirs.reshape(-1, 2)


# ---------------------------------------------------------------------------
# Projectors (backends)
# ---------------------------------------------------------------------------
class _single_thread:
    """Run the CPU matrix build on one torch thread (restored afterwards).

    The build is many mid-sized elementwise ops; on a busy 2-core machine
    OpenMP's barriers made them ~5x slower with two threads than with one.
    """

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def _build_csr(geom: _Geometry):
    """System matrix as scipy CSR (float32 values, int32 indices, sorted)."""
    with _single_thread():
        return _build_csr_entries(geom)


def _build_csr_entries(geom: _Geometry):
    import scipy.sparse as sp

    n_pix = geom.size ** 2
    crows, cols, vals, offset = [np.zeros(1, np.int64)], [], [], 0
    for v0, v1 in geom.view_chunks():
        r, p, w = geom.entries(v0, v1)
        n_rays = (v1 - v0) * geom.n_det
        r = (r - v0 * geom.n_det).numpy().astype(np.int32)
        block = sp.csr_matrix((w.numpy().astype(np.float32), (r, p.numpy().astype(np.int32))),
                              shape=(n_rays, n_pix))
        block.sort_indices()
        crows.append(block.indptr[1:].astype(np.int64) + offset)
        cols.append(block.indices.astype(np.int32, copy=False))
        vals.append(block.data.astype(np.float32, copy=False))
        offset += block.nnz
    if offset >= 2 ** 31:
        raise ValueError(f"system matrix has {offset} entries, more than int32 CSR holds; "
                         "use backend='matrix-free'")
    crow = np.concatenate(crows).astype(np.int32)
    col = np.concatenate(cols) if cols else np.zeros(0, np.int32)
    val = np.concatenate(vals) if vals else np.zeros(0, np.float32)
    return crow, col, val


def _transpose_csr(crow, col, val, shape):
    import scipy.sparse as sp

    at = sp.csr_matrix((val, col, crow), shape=shape).T.tocsr()
    at.sort_indices()
    return (at.indptr.astype(np.int32, copy=False), at.indices.astype(np.int32, copy=False),
            at.data.astype(np.float32, copy=False))


def _load_or_build(geom: _Geometry, use_cache: bool):
    """Return ``(crow, col, val, seconds, source)``; source is 'cache' or 'built'."""
    t0 = time.perf_counter()
    n_rays = geom.n_views * geom.n_det
    path = cache_dir() / f"{geom.key()}.npz"
    if use_cache and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                crow, col, val = f["crow"], f["col"], f["val"]
            if crow.shape == (n_rays + 1,) and col.shape == val.shape == (int(crow[-1]),):
                return crow, col, val, time.perf_counter() - t0, "cache"
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache entry: rebuild and overwrite
    crow, col, val = _build_csr(geom)
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".npz", dir=path.parent)
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, crow=crow, col=col, val=val)
            os.replace(tmp, path)
        except OSError:
            pass  # read-only cache location: keep the matrix in memory only
    return crow, col, val, time.perf_counter() - t0, "built"


class _SparseMatrixProjector(nn.Module):
    """Precomputed Joseph matrix ``A`` and ``Aᵀ`` as int32 CSR buffers."""

    def __init__(self, geom: _Geometry, cache: bool = True):
        super().__init__()
        n_rays, n_pix = geom.n_views * geom.n_det, geom.size ** 2
        crow, col, val, self.build_seconds, self.source = _load_or_build(geom, cache)
        t0 = time.perf_counter()
        tcrow, tcol, tval = _transpose_csr(crow, col, val, (n_rays, n_pix))
        self.build_seconds += time.perf_counter() - t0
        self.nnz = int(val.size)
        for name, arr in (("crow", crow), ("col", col), ("val", val),
                          ("t_crow", tcrow), ("t_col", tcol), ("t_val", tval)):
            self.register_buffer(name, torch.from_numpy(np.ascontiguousarray(arr)), persistent=False)
        self.shape = (n_rays, n_pix)
        self._cast = {}

    def _matrix(self, transpose: bool, dtype: torch.dtype) -> torch.Tensor:
        crow, col, val = ((self.t_crow, self.t_col, self.t_val) if transpose
                          else (self.crow, self.col, self.val))
        if val.dtype != dtype:  # keep one cast copy per matrix (e.g. float64 tests)
            key = (transpose, dtype, val.data_ptr())
            if key not in self._cast:
                self._cast = {k: v for k, v in self._cast.items() if k[0] != transpose}
                self._cast[key] = val.to(dtype)
            val = self._cast[key]
        shape = self.shape[::-1] if transpose else self.shape
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(crow, col, val, shape, check_invariants=False)

    def product(self, rhs: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``A @ rhs`` (or ``Aᵀ @ rhs``) for a column block ``rhs`` of shape (n, k)."""
        m, mt = self._matrix(transpose, rhs.dtype), self._matrix(not transpose, rhs.dtype)
        return _SparseProduct.apply(rhs, m, mt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, n_pix) -> (B, n_rays)
        return self.product(x.T.contiguous()).T

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:  # (B, n_rays) -> (B, n_pix)
        return self.product(y.T.contiguous(), transpose=True).T


# CPU sparse @ dense gathers rows of the dense block at random; once the block
# outgrows the last-level cache it ran 2-3x slower (512² images, 32 columns),
# so on the CPU the columns are processed in blocks of at most this many bytes.
_CPU_RHS_BYTES = 8 << 20


def _csr_times(m: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``m @ rhs`` for a row-major (n, k) block; ``mv`` when k = 1."""
    n, k = rhs.shape
    if k == 1:
        return torch.mv(m, rhs[:, 0].contiguous())[:, None]
    block = max(1, _CPU_RHS_BYTES // max(1, n * rhs.element_size()))
    if rhs.device.type == "cpu" and k > block:
        return torch.cat([m @ rhs[:, i:i + block].contiguous() for i in range(0, k, block)], dim=1)
    return m @ rhs.contiguous()


class _SparseProduct(torch.autograd.Function):
    """``rhs ↦ M rhs`` with the backward pass through the stored transpose ``Mt``."""

    @staticmethod
    def forward(ctx, rhs, m, mt):
        ctx.mt = mt
        return _csr_times(m, rhs)

    @staticmethod
    def backward(ctx, grad):
        return _csr_times(ctx.mt, grad), None, None


# Symmetry folding (parallel beam, centred geometry).  With R the rotation by
# +90° and M the mirror x -> -x, the Radon transform satisfies
#   A_{θ+π/2} f = A_θ (f∘R),  A_{π-θ} f = A_θ (f∘M),  A_{θ+π} f (u) = A_θ f (-u),
# so every view is a "base" view φ ∈ [0, π/4] applied to one of four re-indexed
# images (slots: f, f∘R, f∘M, f∘M∘R), detector possibly reversed.  Only the
# base views' matrix is stored; the images of all slots form one multi-column
# right-hand side (fewer matrix bytes streamed per image and 1/4 of the memory
# for symmetric view sets).  Pixel re-indexing is a permutation, so the adjoint
# stays exact.
@dataclass(frozen=True, eq=False)
class _SymmetryPlan:
    base: _ParallelGeometry
    base_index: np.ndarray  # (V,) base view of each view
    slot: np.ndarray  # (V,) image re-indexing of each view (0..3)
    flip: np.ndarray  # (V,) detector reversed


def _symmetry_plan(geom: _Geometry, waste: float = 1.25):
    """A folding plan when it costs at most ``waste`` × the plain matrix's rows, else None."""
    if (type(geom) is not _ParallelGeometry or geom.center != (geom.size - 1) / 2
            or geom.det_center != (geom.n_det - 1) / 2):
        return None
    eps = 1e-12
    th = np.mod(geom.angles, 2 * np.pi)
    flip = th >= np.pi - eps
    t = np.where(flip, th - np.pi, th).clip(0, np.pi)
    slot = np.select([t <= np.pi / 4 + eps, t <= np.pi / 2 + eps, t <= 3 * np.pi / 4 + eps],
                     [0, 3, 1], 2)
    phi = np.choose(slot, [t, t - np.pi / 2, np.pi - t, np.pi / 2 - t]).clip(0, np.pi / 4)
    keys, first, base_index = np.unique(np.round(phi / 1e-9).astype(np.int64),
                                        return_index=True, return_inverse=True)
    n_slots = len(np.unique(slot))
    if n_slots < 2 or len(keys) * n_slots > waste * geom.n_views:
        return None
    base = _ParallelGeometry(size=geom.size, angles=phi[first], n_det=geom.n_det,
                             det_spacing=geom.det_spacing, center=geom.center,
                             det_center=geom.det_center)
    return _SymmetryPlan(base, base_index.reshape(-1), slot, flip)


def _slot_forward(f: torch.Tensor, slot: int, r: int, c: int) -> torch.Tensor:
    """Re-indexed image of ``slot`` (row dim ``r``, column dim ``c``): f, f∘R, f∘M, f∘M∘R."""
    if slot == 0:
        return f
    if slot == 1:  # g[i, j] = f[n-1-j, i]
        return f.flip(r).transpose(r, c)
    if slot == 2:  # g[i, j] = f[i, n-1-j]
        return f.flip(c)
    return f.flip(r, c).transpose(r, c)  # g[i, j] = f[n-1-j, n-1-i]


def _slot_inverse(g: torch.Tensor, slot: int, r: int, c: int) -> torch.Tensor:
    """Inverse (= transpose, a permutation) of :func:`_slot_forward`."""
    if slot == 0:
        return g
    if slot == 1:
        return g.transpose(r, c).flip(r)
    if slot == 2:
        return g.flip(c)
    return g.transpose(r, c).flip(r, c)


class _FoldedMatrixProjector(nn.Module):
    """The sparse matrix of the base views + pixel/detector re-indexing (see above)."""

    def __init__(self, geom: _Geometry, plan: _SymmetryPlan, cache: bool = True):
        super().__init__()
        self.inner = _SparseMatrixProjector(plan.base, cache=cache)
        self.build_seconds, self.source, self.nnz = (self.inner.build_seconds, self.inner.source,
                                                     self.inner.nnz)
        self.slots = tuple(int(v) for v in np.unique(plan.slot))
        n_det = geom.n_det
        k = np.arange(n_det)
        det = np.where(plan.flip[:, None], n_det - 1 - k[None], k[None])
        rows = plan.base_index[:, None] * n_det + det  # (V, n_det) row of the base matrix
        cols = np.searchsorted(self.slots, plan.slot)[:, None].repeat(n_det, 1)
        self.unique = len(np.unique(rows * len(self.slots) + cols)) == rows.size
        for name, arr in (("rows", rows.reshape(-1)), ("cols", cols.reshape(-1))):
            self.register_buffer(name, torch.from_numpy(np.ascontiguousarray(arr)), persistent=False)
        self.n_slots, self.n_base_rays, self.size = len(self.slots), plan.base.n_views * n_det, geom.size

    def forward(self, x):  # (B, n_pix) -> (B, n_rays)
        B, n = x.shape[0], self.size
        img = x.reshape(B, n, n)
        stack = torch.stack([_slot_forward(img, s, 1, 2) for s in self.slots])  # (S, B, n, n)
        y = self.inner.product(stack.view(self.n_slots * B, n * n).T)  # (rays, S*B)
        return y.view(self.n_base_rays, self.n_slots, B)[self.rows, self.cols].T

    def adjoint(self, y):  # (B, n_rays) -> (B, n_pix)
        B, n = y.shape[0], self.size
        z = y.new_zeros(self.n_base_rays, self.n_slots, B)
        z = z.index_put((self.rows, self.cols), y.T, accumulate=not self.unique)
        w = self.inner.product(z.view(self.n_base_rays, self.n_slots * B), transpose=True)
        w = w.view(n, n, self.n_slots, B)
        x = sum(_slot_inverse(w[:, :, i], s, 0, 1) for i, s in enumerate(self.slots))
        return x.permute(2, 0, 1).reshape(B, n * n)


class _MatrixFreeProjector(nn.Module):
    """The same Joseph weights, recomputed per call (gather / index_add_)."""

    def __init__(self, geom: _Geometry, cache: bool = True):
        super().__init__()
        self.geom = geom
        self.build_seconds, self.source = 0.0, "matrix-free"

    def forward(self, x):
        g = self.geom
        out = x.new_zeros(x.shape[0], g.n_views * g.n_det)
        for v0, v1 in g.view_chunks():
            r, p, w = g.entries(v0, v1, x.device)
            out.index_add_(1, r, x[:, p] * w.to(x.dtype))
        return out

    def adjoint(self, y):
        g = self.geom
        out = y.new_zeros(y.shape[0], g.size ** 2)
        for v0, v1 in g.view_chunks():
            r, p, w = g.entries(v0, v1, y.device)
            out.index_add_(1, p, y[:, r] * w.to(y.dtype))
        return out


class _AstraProjector(nn.Module):
    """ASTRA's CPU 'linear' (Joseph) projector via ``*_vec`` geometries.

    Thin and optional: imported only when selected.  ASTRA's CPU forward and
    back projections use the same weights, so the adjoint is its transpose (to
    float32 precision; ASTRA computes in float32).  Runs on the CPU with numpy
    round trips.  The y axis of ASTRA's volume points to row 0, like ours.
    """

    def __init__(self, geom: _Geometry, cache: bool = True):
        super().__init__()
        import astra  # noqa: F401  (raises ImportError when missing)

        self.geom = geom
        self.build_seconds, self.source = 0.0, "astra"
        self._ids = None

    def _setup(self):
        import astra

        g = self.geom
        shift = g.center - (g.size - 1) / 2  # our origin in ASTRA's centred frame
        origins, dirs = g.rays(0, g.n_views)
        o = origins.numpy().reshape(g.n_views, g.n_det, 2)
        d = dirs.numpy().reshape(g.n_views, g.n_det, 2)
        off = np.array([shift, -shift])
        first, last = o[:, 0] + off, o[:, -1] + off
        u = (last - first) / max(g.n_det - 1, 1)
        if g.n_det == 1:
            u = np.stack([np.cos(g.angles), np.sin(g.angles)], -1) * g.det_spacing
        if isinstance(g, _FanGeometry):
            th = g.angles
            e = np.stack([np.cos(th), np.sin(th)], -1)
            c = np.stack([-np.sin(th), np.cos(th)], -1)
            src = -g.source_distance * c + off
            det0 = src + g.detector_distance * c + e * g.det_coords()[0]
            u = e * g.det_spacing
            mid = det0 + u * (g.n_det - 1) / 2
            vec = np.concatenate([src, mid, u], 1)
            proj = astra.create_proj_geom("fanflat_vec", g.n_det, vec)
            kind = "line_fanflat"
        else:
            mid = (first + last) / 2
            vec = np.concatenate([d[:, 0], mid, u], 1)
            proj = astra.create_proj_geom("parallel_vec", g.n_det, vec)
            kind = "linear"
        vol = astra.create_vol_geom(g.size, g.size)
        self._ids = (vol, proj, astra.create_projector(kind, proj, vol))

    def forward(self, x):
        import astra

        if self._ids is None:
            self._setup()
        vol, proj, pid = self._ids
        out = []
        for img in x.detach().cpu().float().numpy().reshape(-1, self.geom.size, self.geom.size):
            sid, sino = astra.create_sino(img, pid)
            astra.data2d.delete(sid)
            out.append(sino.reshape(-1))
        return torch.from_numpy(np.stack(out)).to(device=x.device, dtype=x.dtype)

    def adjoint(self, y):
        import astra

        if self._ids is None:
            self._setup()
        vol, proj, pid = self._ids
        g, out = self.geom, []
        for sino in y.detach().cpu().float().numpy().reshape(-1, g.n_views, g.n_det):
            bid, img = astra.create_backprojection(sino, pid)
            astra.data2d.delete(bid)
            out.append(img.reshape(-1))
        return torch.from_numpy(np.stack(out)).to(device=y.device, dtype=y.dtype)


class _TorchRadonProjector(nn.Module):
    """torch-radon (CUDA) for parallel beam; thin and optional.

    Selected only by ``backend='torch-radon'``.  Its geometry conventions were
    not verifiable in this project's test environment (no CUDA build); check
    it against the matrix backend before relying on it.  Its back projection is
    not an exact transpose.
    """

    def __init__(self, geom: _Geometry, cache: bool = True):
        super().__init__()
        import torch_radon  # raises ImportError when missing

        if not torch.cuda.is_available():
            raise ValueError("backend='torch-radon' needs CUDA; use backend='matrix'")
        if not isinstance(geom, _ParallelGeometry):
            raise ValueError("backend='torch-radon' supports ParallelBeamCT only")
        self.geom = geom
        self.radon = torch_radon.Radon(geom.size, geom.angles.astype(np.float32),
                                       det_count=geom.n_det, det_spacing=geom.det_spacing)
        self.build_seconds, self.source = 0.0, "torch-radon"

    def forward(self, x):
        g = self.geom
        y = self.radon.forward(x.float().reshape(-1, g.size, g.size).contiguous())
        return y.reshape(x.shape[0], -1).to(x.dtype)

    def adjoint(self, y):
        g = self.geom
        x = self.radon.backprojection(y.float().reshape(-1, g.n_views, g.n_det).contiguous())
        return x.reshape(y.shape[0], -1).to(y.dtype)


_BACKENDS = {
    "matrix": _SparseMatrixProjector,
    "matrix-free": _MatrixFreeProjector,
    "astra": _AstraProjector,
    "torch-radon": _TorchRadonProjector,
}


# ---------------------------------------------------------------------------
# Operators
# ---------------------------------------------------------------------------
def _full_view_set(measured: np.ndarray, full_views: int, arc: float):
    """A dense view set containing ``measured``; returns (angles, index of each measured view)."""
    if len(np.unique(np.round(measured / 1e-9))) != len(measured):
        raise ValueError("decompose() needs distinct view angles; got repeated angles")
    order = np.sort(measured)
    diffs = np.diff(order)
    full = None
    if len(order) > 1 and np.allclose(diffs, diffs[0], rtol=1e-6, atol=1e-9) and diffs[0] > 0:
        step = diffs[0]
        k = max(1, math.ceil(full_views * step / arc - 1e-9))
        n_full = arc / (step / k)
        if abs(n_full - round(n_full)) < 1e-6 and len(order) * step <= arc + 1e-9:
            full = order[0] + (step / k) * np.arange(round(n_full))
    elif len(order) == 1:
        full = order[0] + arc * np.arange(full_views) / full_views
    if full is None:
        dense = arc * np.arange(full_views) / full_views
        near = np.abs((dense[:, None] - order[None, :])).min(1) < 1e-6
        full = np.sort(np.concatenate([order, dense[~near]]))
    idx = np.abs(full[:, None] - measured[None, :]).argmin(0)
    if not np.allclose(full[idx], measured, atol=1e-6):  # pragma: no cover
        raise ValueError("internal error: measured views not contained in the full view set")
    full[idx] = measured  # bit-identical rays for the measured views
    return full, idx


class _CT(LinearOperator):
    """Shared machinery of the CT operators (backend, inverse, decompose)."""

    modality = "ct"
    _full_arc = math.pi
    _default_full_views = 180

    def __init__(self, geom: _Geometry, backend: str, memory_budget: int, cache: bool,
                 fold: bool = True):
        super().__init__((geom.size, geom.size), (geom.n_views, geom.n_det))
        self.geom = geom
        self.register_buffer("angles", torch.from_numpy(geom.angles.copy()))
        plan = _symmetry_plan(geom) if fold else None
        self.fold = bool(fold)
        if backend == "auto":
            stored = plan.base if plan is not None else geom
            backend = "matrix" if stored.matrix_bytes() <= memory_budget else "matrix-free"
        if backend not in _BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {sorted(_BACKENDS)}")
        self.backend = backend
        self.memory_budget, self.cache = int(memory_budget), bool(cache)
        if backend == "matrix" and plan is not None:
            self.projector = _FoldedMatrixProjector(geom, plan, cache=cache)
        else:
            self.projector = _BACKENDS[backend](geom, cache=cache)

    # properties mirroring the geometry
    size = property(lambda self: self.geom.size)
    n_views = property(lambda self: self.geom.n_views)
    n_det = property(lambda self: self.geom.n_det)
    det_spacing = property(lambda self: self.geom.det_spacing)
    center = property(lambda self: self.geom.center)
    det_center = property(lambda self: self.geom.det_center)

    @property
    def build_seconds(self) -> float:
        """Seconds spent building or loading the system matrix (0 if matrix-free)."""
        return self.projector.build_seconds

    def _check_real(self, t):
        if isinstance(t, torch.Tensor) and t.is_complex():
            raise ValueError(f"{type(self).__name__} expects a real floating tensor, got {t.dtype}")
        if not isinstance(t, torch.Tensor) or t.dtype in (torch.float32, torch.float64):
            return t
        return t.float()

    def _forward(self, x):
        xin = self._check_real(x)
        y = self.projector(xin.reshape(x.shape[0], -1))
        return y.reshape(x.shape[0], *self.out_shape).to(x.dtype if x.is_floating_point() else y.dtype)

    def _adjoint(self, y):
        yin = self._check_real(y)
        x = self.projector.adjoint(yin.reshape(y.shape[0], -1))
        return x.reshape(y.shape[0], *self.in_shape).to(y.dtype if y.is_floating_point() else x.dtype)

    def inverse(self, z: torch.Tensor, n_iter: int = 50, x0: torch.Tensor | None = None,
                tol: float = 0.0) -> torch.Tensor:
        """Least-squares image from a sinogram by CGLS (batched, warm start ``x0``)."""
        return cgls(self, self._check_real(z), n_iter=n_iter, x0=x0, tol=tol)

    def _kwargs(self) -> dict:
        return {"backend": self.backend, "memory_budget": self.memory_budget, "cache": self.cache}

    @property
    def folded(self) -> bool:
        """Whether the stored matrix is symmetry-folded (see the module docstring)."""
        return isinstance(self.projector, _FoldedMatrixProjector)

    def with_angles(self, angles) -> "_CT":
        """The same geometry and backend at other view angles."""
        raise NotImplementedError  # pragma: no cover

    def decompose(self, full_views: int | None = None) -> Decomposition:
        """``A = P(mask) T`` with ``T`` this geometry at a dense view set.

        Equally spaced measured views get a full set that refines their step by
        an integer factor (at least ``full_views`` views over the full arc);
        otherwise the full set is the union of the measured angles and
        ``full_views`` equally spaced ones.  ``mask`` has shape ``(n_full, 1)``.
        """
        full_views = int(full_views or self._default_full_views)
        if full_views < 1:
            raise ValueError(f"full_views must be >= 1, got {full_views}")
        full, idx = _full_view_set(self.geom.angles, full_views, self._full_arc)
        T = self.with_angles(full)
        dev = self.angles.device
        index = torch.from_numpy(idx).to(dev)
        mask = torch.zeros(len(full), 1, device=dev)
        mask[index] = 1.0
        n_det = self.n_det

        def embed(y: torch.Tensor) -> torch.Tensor:
            check_tensor(y, self.out_shape, "embed input")
            z = y.new_zeros(y.shape[0], len(full), n_det)
            z[:, index.to(y.device)] = y
            return z

        return Decomposition(T, mask, embed)

    def extra_repr(self) -> str:
        return (f"size={self.size}, n_views={self.n_views}, n_det={self.n_det}, "
                f"det_spacing={self.det_spacing}, backend={self.backend!r}")


class ParallelBeamCT(_CT):
    """Parallel-beam CT ``(B, size, size) -> (B, n_views, n_det)``.

    ``angles`` in radians (any set: sparse-view, limited-angle); see the module
    docstring for the geometry.  ``n_det`` defaults to ``ceil(sqrt(2) * size /
    det_spacing)`` (covers the image diagonal, skimage's count for
    ``circle=False``).  ``backend``: 'auto' (sparse matrix, or matrix-free when
    A and Aᵀ would exceed ``memory_budget`` bytes), 'matrix', 'matrix-free',
    'astra' (CPU, optional) or 'torch-radon' (CUDA, optional; explicit only).
    ``center`` / ``det_center``: rotation-axis pixel index and detector centre
    bin (defaults: geometric centres).  ``cache``: keep the matrix on disk.
    ``fold``: store symmetry-folded matrices when the view set allows it.
    """

    def __init__(self, size: int, angles, n_det: int | None = None, det_spacing: float = 1.0,
                 backend: str = "auto", *, center: float | None = None,
                 det_center: float | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 cache: bool = True, fold: bool = True):
        size = int(size)
        if size < 1:
            raise ValueError(f"size must be a positive image side length, got {size}")
        det_spacing = _positive(det_spacing, "det_spacing")
        if n_det is None:
            n_det = math.ceil(math.sqrt(2) * size / det_spacing - 1e-9)
        n_det = int(n_det)
        if n_det < 1:
            raise ValueError(f"n_det must be >= 1, got {n_det}")
        geom = _ParallelGeometry(
            size=size, angles=_as_angles(angles), n_det=n_det, det_spacing=det_spacing,
            center=(size - 1) / 2 if center is None else float(center),
            det_center=(n_det - 1) / 2 if det_center is None else float(det_center))
        super().__init__(geom, backend, memory_budget, cache, fold)

    @classmethod
    def from_degrees(cls, size: int, degrees, **kwargs) -> "ParallelBeamCT":
        """Same as the constructor with angles in degrees."""
        return cls(size, np.deg2rad(_as_angles(degrees)), **kwargs)

    @classmethod
    def like_skimage(cls, size: int, theta=None, circle: bool = False, **kwargs) -> "ParallelBeamCT":
        """The geometry of ``skimage.transform.radon(image, theta, circle)``.

        ``theta`` in degrees (default ``arange(180)`` like skimage).  Then
        ``op.A(x)[0] ≈ radon(x[0], theta, circle).T``.
        """
        theta = np.arange(180.0) if theta is None else _as_angles(theta)
        n_det = size if circle else math.ceil(math.sqrt(2) * size)
        return cls(size, np.deg2rad(theta), n_det=n_det, center=size // 2,
                   det_center=n_det // 2, **kwargs)

    def with_angles(self, angles) -> "ParallelBeamCT":
        g = self.geom
        return ParallelBeamCT(g.size, angles, n_det=g.n_det, det_spacing=g.det_spacing,
                              center=g.center, det_center=g.det_center, fold=self.fold,
                              **self._kwargs())


class FanBeamCT(_CT):
    """Fan-beam CT with a flat detector ``(B, size, size) -> (B, n_views, n_det)``.

    ``angles``: source angles β in radians.  ``source_distance``: source to
    rotation axis (must exceed the image half-diagonal); ``detector_distance``:
    source to detector.  ``det_spacing`` defaults to the magnification
    ``detector_distance / source_distance`` (1 pixel at the axis); ``n_det``
    defaults to the count that covers the image's circumscribed circle.
    """

    _full_arc = 2 * math.pi
    _default_full_views = 360

    def __init__(self, size: int, angles, source_distance: float, detector_distance: float,
                 n_det: int | None = None, det_spacing: float | None = None,
                 detector: str = "flat", backend: str = "auto", *, center: float | None = None,
                 det_center: float | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 cache: bool = True):
        size = int(size)
        if size < 1:
            raise ValueError(f"size must be a positive image side length, got {size}")
        if detector != "flat":
            raise ValueError(f"detector={detector!r} is not supported; expected 'flat'")
        R = _positive(source_distance, "source_distance")
        D = _positive(detector_distance, "detector_distance")
        radius = math.sqrt(2) * size / 2
        if R <= radius:
            raise ValueError(f"source_distance={R:g} pixels puts the source inside the image; expected "
                             f"> {radius:.2f} pixels (the half-diagonal of a {size}x{size} image, "
                             f"{radius / size:.3f} image widths)")
        if D < R:
            raise ValueError(f"detector_distance (source to detector) = {D:g} pixels is shorter than "
                             f"source_distance = {R:g} pixels; expected >= {R:g} pixels")
        det_spacing = D / R if det_spacing is None else _positive(det_spacing, "det_spacing")
        if n_det is None:
            half = D * math.tan(math.asin(radius / R))
            n_det = 2 * math.ceil(half / det_spacing) + 1
        n_det = int(n_det)
        if n_det < 1:
            raise ValueError(f"n_det must be >= 1, got {n_det}")
        geom = _FanGeometry(
            size=size, angles=_as_angles(angles), n_det=n_det, det_spacing=det_spacing,
            center=(size - 1) / 2 if center is None else float(center),
            det_center=(n_det - 1) / 2 if det_center is None else float(det_center),
            source_distance=R, detector_distance=D)
        super().__init__(geom, backend, memory_budget, cache)

    source_distance = property(lambda self: self.geom.source_distance)
    detector_distance = property(lambda self: self.geom.detector_distance)

    def with_angles(self, angles) -> "FanBeamCT":
        g = self.geom
        return FanBeamCT(g.size, angles, g.source_distance, g.detector_distance, n_det=g.n_det,
                         det_spacing=g.det_spacing, center=g.center, det_center=g.det_center,
                         **self._kwargs())

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", source_distance={self.source_distance}, "
                f"detector_distance={self.detector_distance}")


class FinerGridProjection(LinearOperator):
    """``op``'s measurement of an image refined ``factor`` times, for simulation only.

    ``x`` is interpolated bilinearly to a ``factor`` times finer pixel grid, projected
    there by the same parallel-beam geometry with ``factor`` detector sub-bins per
    detector bin, and each bin averages its sub-bins (an area-integrating detector);
    the result is in ``op``'s units (line integrals in ``op``'s pixels).  Simulating
    with it and reconstructing with ``op`` avoids the inverse crime (the same discrete
    operator for data and reconstruction, Kaipio & Somersalo 2007).  Linear, with the
    exact adjoint (the adjoints of its three parts).  Parallel beam only.
    """

    modality = "ct"

    def __init__(self, op: "ParallelBeamCT", factor: int = 2):
        if not isinstance(op, ParallelBeamCT):
            raise ValueError(f"FinerGridProjection supports ParallelBeamCT only, got {type(op).__name__} "
                             "(fan beam: simulate on the working grid)")
        k = int(factor)
        if k != factor or k < 2:
            raise ValueError(f"factor must be an integer >= 2, got {factor!r}")
        super().__init__(op.in_shape, op.out_shape)
        g = op.geom
        self.factor, self.coarse_geometry = k, g
        # pixel i of op spans [i - 1/2, i + 1/2]: fine pixel f has its centre at (f + 1/2) / k - 1/2, so
        # the rotation axis c lies at (c + 1/2) k - 1/2; the same holds for the detector bins
        self.fine = ParallelBeamCT(k * g.size, g.angles, n_det=k * g.n_det, det_spacing=g.det_spacing,
                                   center=(g.center + 0.5) * k - 0.5, det_center=(g.det_center + 0.5) * k - 0.5,
                                   backend="auto", memory_budget=op.memory_budget, cache=op.cache)

    def _up(self, x):
        return F.interpolate(x[:, None], scale_factor=self.factor, mode="bilinear", align_corners=False)[:, 0]

    def _forward(self, x):
        z = self.fine.A(self._up(x))  # line integrals in fine pixels: k times those in op's pixels
        b, v, n = z.shape
        return z.reshape(b, v, n // self.factor, self.factor).mean(-1) / self.factor

    def _adjoint(self, y):
        z = y.repeat_interleave(self.factor, dim=-1) / self.factor**2
        x_fine = self.fine.AH(z)
        with torch.enable_grad():
            x = torch.zeros((y.shape[0], *self.in_shape), dtype=x_fine.dtype, device=x_fine.device,
                            requires_grad=True)
            (grad,) = torch.autograd.grad(self._up(x), x, grad_outputs=x_fine)
        return grad

    def extra_repr(self) -> str:
        return f"factor={self.factor}, fine={self.fine.extra_repr()}"
