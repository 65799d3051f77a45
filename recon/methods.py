"""Registry of reconstruction methods by user-facing name, with their metadata.

Every method has the signature ``method(y, operator, **options) -> image``
(see :mod:`recon.baselines` and :mod:`recon.score_methods`).  Each entry of
:data:`METHODS` is a :class:`Method`: calling it checks that the operator is
supported (its ``supports(op)`` predicate) and that the options are accepted,
raising :class:`recon.errors.ReconError` otherwise, then calls the function.
Its metadata is what every listing and plan reads (never a hard-coded list of
names): ``needs_prior`` (score methods: a ``prior`` option), ``stochastic``
(takes a seed; ``--samples K`` draws K posterior samples), ``needs_decompose``
(the operator must factor as ``A = P(mask) T``) and ``tasks`` (the task kinds
it applies to).

Built-in names::

    'fbp'           CT only (recon.fbp.fbp, imported lazily)
    'sirt'          any real operator with nonnegative row/column sums
    'tv'            any operator (real or complex)
    'tv3d'          any operator; 3-D TV over the batch of consecutive slices (tv with z_weight)
    'cgls'          any operator
    'zero-filled'   MRI only
    'sense-adjoint' MRI only
    'cs-wavelet'    MRI only
    'biharmonic'    inpainting only
    'score'         operators with decompose() (CT, MRI, inpainting); needs a prior
    'score-fast'    any operator; needs a prior; couples a batch of consecutive slices (z_weight)
    'dps'           any operator; needs a prior

Add more with :func:`register` (usable as a decorator)::

    @register("my-method", supports=is_ct, tasks=("ct",))
    def my_method(y, op, *, lam=1e-3, callback=None): ...

Operator kinds come from :func:`forward_models.operator_kind` (the operator
class's ``modality``, complex input for MRI, a pixel mask for inpainting).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

from forward_models import operator_kind
from recon import baselines, score_methods
from recon.errors import ReconError

__all__ = [
    "METHODS",
    "Method",
    "register",
    "get_method",
    "available",
    "run",
    "is_ct",
    "is_mri",
    "is_inpainting",
    "any_operator",
    "real_operator",
    "has_decomposition",
    "prior_methods",
]


# ---------------------------------------------------------------------------
# operator predicates
# ---------------------------------------------------------------------------
def is_ct(op) -> bool:
    """A CT projector (``operator_kind(op) == 'ct'``)."""
    return operator_kind(op) == "ct"


def is_mri(op) -> bool:
    """An MRI operator (MRI classes, or any complex-input operator)."""
    return operator_kind(op) == "mri"


def is_inpainting(op) -> bool:
    """A pixel-mask operator ``A x = mask * x``."""
    return operator_kind(op) == "inpaint"


def has_decomposition(op) -> bool:
    """The operator implements ``decompose()`` (A = P(mask) T), as the projection sampler needs."""
    from forward_models import LinearOperator

    impl = getattr(type(op), "decompose", None)
    return impl is not None and impl is not LinearOperator.decompose


def any_operator(op) -> bool:
    return True


def real_operator(op) -> bool:
    return not bool(getattr(op, "is_complex_input", False))


_APPLIES_TO = {
    is_ct: "a CT operator (ParallelBeamCT/FanBeamCT)",
    is_mri: "an MRI operator",
    is_inpainting: "an inpainting (pixel-mask) operator",
    any_operator: "any operator",
    real_operator: "a real operator",
    has_decomposition: "an operator with decompose() (CT, MRI, inpainting)",
}


# ---------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------
@dataclass
class Method:
    """A registered reconstructor: ``Method(y, op, **options)``."""

    name: str
    fn: Callable
    supports: Callable[[object], bool] = any_operator
    description: str = ""
    applies_to: str = "any operator"
    needs_prior: bool = False
    stochastic: bool = False
    needs_decompose: bool = False
    tasks: tuple = ("ct", "mri", "inpaint")
    _sig: Optional[inspect.Signature] = field(default=None, repr=False)

    def __post_init__(self):
        try:
            self._sig = inspect.signature(self.fn)
        except (TypeError, ValueError):
            self._sig = None

    def check(self, op) -> None:
        """Raise ReconError unless this method applies to ``op``."""
        try:
            ok = bool(self.supports(op))
        except Exception as e:  # a broken predicate is the method's problem, say so
            raise ReconError(
                f"method '{self.name}' could not check operator {type(op).__name__}: {e}") from e
        if not ok:
            fits = [n for n, m in METHODS.items() if m is not self and _safe_supports(m, op)]
            raise ReconError(
                f"method '{self.name}' does not apply to {type(op).__name__} "
                f"(it needs {self.applies_to}); methods for this operator: "
                f"{', '.join(sorted(fits)) or 'none'}"
            )

    def options(self):
        """Names of the accepted keyword options (``None`` if unknown/open)."""
        if self._sig is None:
            return None
        params = list(self._sig.parameters.values())[2:]
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return None
        return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def __call__(self, y, op, **options):
        self.check(op)
        if self._sig is not None:
            try:
                self._sig.bind(y, op, **options)
            except TypeError as e:
                opts = self.options()
                hint = f"; accepted options: {', '.join(opts)}" if opts is not None else ""
                raise ReconError(f"method '{self.name}': {e}{hint}") from None
        return self.fn(y, op, **options)


def _safe_supports(m: Method, op) -> bool:
    try:
        return bool(m.supports(op))
    except Exception:
        return False


METHODS: Dict[str, Method] = {}


def register(name: str, fn: Optional[Callable] = None, *, supports: Callable = any_operator,
             description: str = "", applies_to: Optional[str] = None, overwrite: bool = False,
             needs_prior: bool = False, stochastic: bool = False, needs_decompose: bool = False,
             tasks=("ct", "mri", "inpaint")):
    """Register ``fn`` under ``name`` (also usable as ``@register(name, ...)``).

    ``supports(op) -> bool`` says which operators the method applies to;
    ``needs_prior``, ``stochastic``, ``needs_decompose`` and ``tasks`` are the
    metadata described in the module docstring.
    Registering a different function under an existing name raises
    ``ReconError`` unless ``overwrite=True`` (re-registering the same function,
    e.g. on module reload, is fine).  Returns ``fn``.
    """
    if not isinstance(name, str) or not name:
        raise ReconError(f"method name must be a non-empty string, got {name!r}")

    def _do(f):
        if not callable(f):
            raise ReconError(f"method '{name}' must be callable, got {type(f).__name__}")
        old = METHODS.get(name)
        if old is not None and not overwrite:
            same = (getattr(old.fn, "__module__", None), getattr(old.fn, "__qualname__", None)) == \
                   (getattr(f, "__module__", None), getattr(f, "__qualname__", None))
            if not same:
                raise ReconError(
                    f"method '{name}' is already registered ({old.fn!r}); pass overwrite=True to replace it")
        doc = description or (inspect.getdoc(f) or "").split("\n")[0]
        if applies_to is None and old is not None and old.supports is supports:
            text = old.applies_to
        else:
            text = applies_to or _APPLIES_TO.get(supports, "an operator it supports")
        METHODS[name] = Method(name, f, supports, doc, text, needs_prior=bool(needs_prior),
                               stochastic=bool(stochastic), needs_decompose=bool(needs_decompose),
                               tasks=tuple(tasks))
        return f

    return _do if fn is None else _do(fn)


def get_method(name: str) -> Method:
    """The registered method ``name``; unknown names raise ReconError."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ReconError(
            f"unknown method '{name}'; available: {', '.join(sorted(METHODS))}") from None


def available(op=None):
    """Sorted method names, restricted to those supporting ``op`` if given."""
    if op is None:
        return sorted(METHODS)
    return sorted(n for n, m in METHODS.items() if _safe_supports(m, op))


def prior_methods() -> list[str]:
    """Names of the registered methods that need a score prior."""
    return sorted(n for n, m in METHODS.items() if m.needs_prior)


def run(name: str, y, op, **options):
    """``get_method(name)(y, op, **options)``."""
    return get_method(name)(y, op, **options)


# ---------------------------------------------------------------------------
# built-ins
# ---------------------------------------------------------------------------
def _fbp(y, op, **options):
    """Filtered back-projection (recon.fbp.fbp)."""
    try:
        from recon.fbp import fbp
    except ImportError as e:
        raise ReconError(f"the 'fbp' method is not available: {e}") from e
    return fbp(y, op, **options)


register("fbp", _fbp, supports=is_ct, applies_to="a CT operator (ParallelBeamCT/FanBeamCT)", tasks=("ct",))
register("sirt", baselines.sirt, supports=real_operator,
         applies_to="a real operator with nonnegative entries (e.g. CT)", tasks=("ct", "inpaint"))
register("tv", baselines.tv, supports=any_operator, applies_to="any operator")
register("tv3d", baselines.tv3d, supports=any_operator, applies_to="any operator",
         description="3-D TV over a stack of consecutive slices (tv with a tuned z_weight)")
register("cgls", baselines.cgls, supports=any_operator, applies_to="any operator")
register("zero-filled", baselines.zero_filled, supports=is_mri, applies_to="an MRI operator", tasks=("mri",))
register("sense-adjoint", baselines.sense_adjoint, supports=is_mri, applies_to="an MRI operator", tasks=("mri",))
register("cs-wavelet", baselines.cs_wavelet, supports=is_mri, applies_to="an MRI operator", tasks=("mri",))
register("biharmonic", baselines.biharmonic, supports=is_inpainting,
         applies_to="an inpainting (pixel-mask) operator", tasks=("inpaint",))
register("score", score_methods.score_pc, supports=has_decomposition, needs_prior=True, stochastic=True,
         needs_decompose=True, applies_to="an operator with decompose() (CT, MRI, inpainting)")
register("score-fast", score_methods.score_fast, supports=any_operator, needs_prior=True, stochastic=True,
         applies_to="any operator")
register("dps", score_methods.dps, supports=any_operator, needs_prior=True, stochastic=True,
         applies_to="any operator")
