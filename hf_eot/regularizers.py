"""The one registry of attention regularizers.

Every attention map of hf_eot solves, per query row, ``min_p <C, p> + Omega(p)`` with ``C = -scores``
("Scaled-Dot-Product Attention as One-Sided Entropic Optimal Transport", Litman, arXiv:2508.08369);
the regularizer ``Omega`` names the map.  A :class:`Regularizer` entry carries everything that varies
between maps, as data and hooks, so that the rest of the library selects by lookup in :data:`REGISTRY`,
never by ``if name == ...``:

* ``params``: the parameters it accepts (defaults, validity checks, legacy aliases);
* ``check(params)``: rules that tie several parameters together (e.g. a learned entmax alpha);
* ``learned(params)``: the per-head :class:`LearnedParameter` s a model must hold for these parameters;
* ``weights(scores, mask, log_prior, **params) -> WeightsOutput``: the pure tensor map, with optional
  diagnostics (Sinkhorn's column-marginal error and iteration count);
* ``attention(query, key, value, mask, log_prior, *, scale, dropout, **params)``: optionally, the whole
  attention ``weights @ value`` fused (the weights never stored), used when the weights are not requested;
* ``needs_templates`` / ``couples_queries``: what it needs from an attention module.

Shared conventions (see :mod:`hf_eot.ops`):

* ``scores`` are ``(..., n_queries, n_keys)``; ``mask`` is boolean and broadcastable, True = may attend;
* ``epsilon`` multiplies the model's own temperature: the map is applied to ``scores / epsilon + log_prior``,
  which for softmax is exactly ``Omega = epsilon * KL(p || pi)`` (the prior softmax of "Deciphering
  Attention Mechanisms: Optimization and Fenchel Dual Solutions", eq. (16)-(18)) and for the other
  regularizers is the same additive score bias (the convention T5 uses for its position bias).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from . import ops
from .ops import entmax as _entmax_ops
from .ops import sinkhorn as _sinkhorn_ops

__all__ = [
    "PRIORS",
    "REGISTRY",
    "LearnedParameter",
    "Param",
    "Regularizer",
    "WeightsOutput",
    "available_regularizers",
    "get_regularizer",
    "register_regularizer",
    "validate_params",
]

#: Named priors a user may request; T5's own relative position bias is always used when present.
PRIORS: tuple[str, ...] = ("alibi", "relative_buckets")


@dataclass(frozen=True)
class WeightsOutput:
    """What a regularizer's ``weights`` hook returns.

    ``weights``: ``(..., n_queries, n_keys)`` in the dtype of the scores.  ``diagnostics``: named tensors
    about the solve (e.g. Sinkhorn's ``marginal_error`` ``(...,)`` and ``n_iters``), empty for closed forms.
    """

    weights: torch.Tensor
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class LearnedParameter:
    """A per-head parameter that a model learns in place of a configured value.

    The module stores ``<name>_logit`` ``(n_heads,)`` and uses ``low + (high - low) * sigmoid(logit)``,
    which stays in the open interval ``(low, high)``; ``init`` is the configured starting value.
    """

    name: str
    init: float
    low: float
    high: float


@dataclass(frozen=True)
class Param:
    """One parameter of a regularizer.

    ``check`` decides validity of a (number-coerced) value and ``valid`` names the valid values.
    ``tensor_check``, when set, also accepts a tensor broadcastable to ``scores[..., :1]`` in
    :func:`hf_eot.attention_weights` (e.g. one entmax alpha per head).  ``config_only`` parameters
    describe the model (a named prior, whether to learn a value) and are not passed to ``weights``.
    ``aliases``: legacy names still read from saved configs.
    """

    name: str
    default: Any
    check: Callable[[Any], bool]
    valid: str
    doc: str = ""
    tensor_check: Callable[[torch.Tensor], bool] | None = None
    config_only: bool = False
    aliases: tuple[str, ...] = ()


def _no_check(params: Mapping[str, Any]) -> None:
    return None


def _nothing_learned(params: Mapping[str, Any]) -> tuple[LearnedParameter, ...]:
    return ()


@dataclass(frozen=True)
class Regularizer:
    """A registered attention map.

    Attributes:
        name: the registry key.
        params: accepted parameters.
        weights: ``weights(scores, mask, log_prior, **params) -> WeightsOutput``; ``params`` are the
            validated non-config-only parameters, plus ``template_gram`` and ``hidden_size`` for maps that
            ``needs_templates``.
        check: cross-parameter rules on the completed parameters; raises ValueError.
        learned: the :class:`LearnedParameter` s a model needs for the given parameters.
        couples_queries: the map is not row-separable (Sinkhorn's column marginals tie all queries), so it
            cannot be used where queries are produced one at a time (causal calls, cross-attention).
        needs_templates: the map needs the Gram matrix of the keys (the OT-based attention).
        is_sdpa: the map of ``scores / epsilon + the model's own bias`` is SDPA's softmax with the scale
            divided by epsilon, so a model may run it on the fused kernel when no named prior is added.
        attention: optional fused attention ``attention(query, key, value, mask, log_prior, *, scale,
            dropout, **params) -> (B, H, Q, d_v)``, the same as ``dropout(weights(...)) @ value`` with
            ``scores = query @ key^T * scale`` but without storing the weights; it returns None for
            parameters it does not cover (then ``weights`` is used).
    """

    name: str
    params: tuple[Param, ...]
    weights: Callable[..., WeightsOutput]
    check: Callable[[Mapping[str, Any]], None] = _no_check
    learned: Callable[[Mapping[str, Any]], tuple[LearnedParameter, ...]] = _nothing_learned
    couples_queries: bool = False
    needs_templates: bool = False
    is_sdpa: bool = False
    attention: Callable[..., torch.Tensor | None] | None = None

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def call_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The parameters ``weights`` takes: ``params`` without the config-only ones."""
        config_only = {p.name for p in self.params if p.config_only}
        return {k: v for k, v in params.items() if k not in config_only}


REGISTRY: dict[str, Regularizer] = {}


def register_regularizer(regularizer: Regularizer) -> Regularizer:
    """Add ``regularizer`` to the registry; refuses a name that is already taken."""
    if regularizer.name in REGISTRY:
        raise ValueError(f"regularizer {regularizer.name!r} is already registered")
    REGISTRY[regularizer.name] = regularizer
    return regularizer


def get_regularizer(name: str) -> Regularizer:
    """The registry entry for ``name``; a ValueError names the valid choices."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown regularizer {name!r}; valid choices: {sorted(REGISTRY)}") from None


def available_regularizers() -> dict[str, dict[str, Any]]:
    """``{name: {param: default}}`` for every registered regularizer."""
    return {name: reg.defaults() for name, reg in sorted(REGISTRY.items())}


def _as_number(value: Any) -> Any:
    """numpy scalars and single-element tensors without gradient -> Python numbers; anything else as is."""
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if isinstance(value, torch.Tensor):
        if value.numel() == 1 and value.dim() <= 1 and not value.requires_grad and value.dtype != torch.bool:
            return value.item()
        return value
    if isinstance(value, numbers.Number) and hasattr(value, "item"):  # numpy scalars
        return value.item()
    return value


def _show(value: Any) -> str:
    """A one-line repr (tensors: their first values and shape)."""
    if isinstance(value, torch.Tensor):
        values = value.detach().flatten()[:6].tolist()
        more = ", ..." if value.numel() > 6 else ""
        return f"tensor({values}{more}, shape={tuple(value.shape)}, dtype={value.dtype})"
    return repr(value)


def validate_params(name: str, params: Mapping[str, Any], *, allow_tensors: bool = False) -> dict[str, Any]:
    """Check ``params`` for regularizer ``name`` and return them completed with the defaults.

    numpy scalars and one-element tensors count as numbers.  With ``allow_tensors``, parameters that
    have a ``tensor_check`` also accept tensors (checked, e.g. every alpha > 1).  Raises ValueError
    naming the bad value and the valid choices.
    """
    regularizer = get_regularizer(name)
    names = {p.name for p in regularizer.params}
    unknown = set(params) - names
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {sorted(unknown)} for regularizer {name!r}; valid parameters: {sorted(names)}"
        )
    out = regularizer.defaults()
    for p in regularizer.params:
        if p.name not in params:
            continue
        value = _as_number(params[p.name])
        if isinstance(value, torch.Tensor):
            if not (allow_tensors and p.tensor_check is not None):
                raise ValueError(
                    f"invalid {p.name}={_show(value)} for regularizer {name!r}: expected {p.valid} "
                    "(a single number, not a tensor)"
                )
            if not p.tensor_check(value):
                raise ValueError(
                    f"invalid {p.name}={_show(value)} for regularizer {name!r}: expected a floating tensor with every "
                    f"value {p.valid}"
                )
        else:
            if isinstance(value, int) and not isinstance(value, bool) and isinstance(p.default, float):
                value = float(value)
            if not p.check(value):
                raise ValueError(f"invalid {p.name}={value!r} for regularizer {name!r}: expected {p.valid}")
        out[p.name] = value
    regularizer.check(out)
    return out


# --------------------------------------------------------------------------------------------------
# Parameter checks and shared parameters


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _positive(x: Any) -> bool:
    return _is_real(x) and x > 0


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda x: x is None or check(x)


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _tensor_above_one(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.numel() > 0 and bool(torch.isfinite(t).all()) and bool((t > 1).all())


EPSILON = Param("epsilon", 1.0, _positive, "a finite float > 0", "multiplies the model's temperature")
PRIOR = Param(
    "prior",
    None,
    lambda x: x is None or x in PRIORS,
    f"None or one of {list(PRIORS)}",
    "extra log-prior added to the scores (T5's position bias is always used)",
    config_only=True,
)


def _logits(scores: torch.Tensor, log_prior: torch.Tensor | None, epsilon: float) -> torch.Tensor:
    """``scores / epsilon + log_prior``: the one temperature-and-prior convention of the row-wise maps."""
    logits = scores if epsilon == 1.0 else scores / epsilon
    if log_prior is not None:
        logits = logits + log_prior.to(logits.dtype)
    return logits


# --------------------------------------------------------------------------------------------------
# softmax, sparsemax, entmax: row-wise maps of scores / epsilon + log_prior


def _entmax_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    log_prior: torch.Tensor | None,
    *,
    scale: float,
    dropout: float,
    epsilon: float,
    alpha: float | torch.Tensor,
    max_iters: int,
) -> torch.Tensor | None:
    """Fused alpha-entmax attention (sparsemax at alpha = 2) for a number alpha in (1, 2] where it pays;
    None for short rows, a tensor (learned) alpha, whose gradient needs the weights, and alpha > 2."""
    if isinstance(alpha, torch.Tensor) or not 1.0 < alpha <= 2.0 or not ops.fused_pays(query, key, alpha):
        return None
    return ops.entmax_attention(
        query, key, value, alpha=float(alpha), mask=mask, log_prior=log_prior, scale=scale, epsilon=epsilon,
        max_iters=max_iters, dropout=dropout,
    )


def _softmax(
    scores: torch.Tensor, mask: torch.Tensor | None, log_prior: torch.Tensor | None, *, epsilon: float
) -> WeightsOutput:
    """``Omega = -epsilon H(p)`` (``epsilon KL(p || pi)`` with a prior): ``softmax(scores / epsilon + log pi)``."""
    return WeightsOutput(ops.softmax_weights(_logits(scores, log_prior, epsilon), mask))


def _sparsemax(
    scores: torch.Tensor, mask: torch.Tensor | None, log_prior: torch.Tensor | None, *, epsilon: float
) -> WeightsOutput:
    """``Omega = epsilon / 2 ||p||^2``: Euclidean projection onto the simplex (Martins & Astudillo 2016)."""
    return WeightsOutput(ops.sparsemax_weights(_logits(scores, log_prior, epsilon), mask))


register_regularizer(
    Regularizer(
        name="softmax",
        params=(EPSILON, PRIOR),
        weights=_softmax,
        is_sdpa=True,
    )
)


register_regularizer(
    Regularizer(
        name="sparsemax",
        params=(EPSILON, PRIOR),
        weights=_sparsemax,
        attention=functools.partial(_entmax_attention, alpha=2.0, max_iters=1),  # max_iters: unused at 2
    )
)

#: a learned alpha = 1 + sigmoid(logit) lives in (1, 2) (Correia et al. 2019, "Adaptively Sparse Transformers")
_LEARNED_ALPHA_RANGE = (1.0, 2.0)


def _entmax(
    scores: torch.Tensor,
    mask: torch.Tensor | None,
    log_prior: torch.Tensor | None,
    *,
    epsilon: float,
    alpha: float | torch.Tensor,
    max_iters: int,
) -> WeightsOutput:
    """``Omega = epsilon (sum_j p_j^alpha - 1) / (alpha (alpha - 1))`` (Tsallis; Peters et al. 2019, eq. (9))."""
    logits = _logits(scores, log_prior, epsilon)
    return WeightsOutput(ops.entmax_weights(logits, alpha, mask, max_iters=max_iters))


def _entmax_check(params: Mapping[str, Any]) -> None:
    low, high = _LEARNED_ALPHA_RANGE
    if params["learn_alpha"] and not (isinstance(params["alpha"], float) and low < params["alpha"] < high):
        raise ValueError(
            f"invalid alpha={params['alpha']!r} with learn_alpha=True: a learned alpha lives in the open "
            f"interval ({low:g}, {high:g}) (alpha = 1 + sigmoid(w)); pick an initial alpha there"
        )


def _entmax_learned(params: Mapping[str, Any]) -> tuple[LearnedParameter, ...]:
    if not params["learn_alpha"]:
        return ()
    return (LearnedParameter("alpha", params["alpha"], *_LEARNED_ALPHA_RANGE),)


register_regularizer(
    Regularizer(
        name="entmax",
        params=(
            EPSILON,
            Param(
                "alpha",
                1.5,
                lambda x: _is_real(x) and x > 1,
                "a finite float > 1",
                "Tsallis exponent (Peters et al. 2019)",
                tensor_check=_tensor_above_one,
            ),
            Param(
                "learn_alpha", False, lambda x: isinstance(x, bool), "True or False", "train alpha per head",
                config_only=True,
            ),
            Param("max_iters", _entmax_ops.DEFAULT_MAX_ITERS, _positive_int, "an int >= 1",
                  "Newton steps on the threshold (alpha != 1.5, 2)", aliases=("n_iter",)),
            PRIOR,
        ),
        weights=_entmax,
        attention=_entmax_attention,
        check=_entmax_check,
        learned=_entmax_learned,
    )
)

# --------------------------------------------------------------------------------------------------
# Sinkhorn: both marginals fixed, all queries coupled

def _sinkhorn(
    scores: torch.Tensor,
    mask: torch.Tensor | None,
    log_prior: torch.Tensor | None,
    *,
    epsilon: float,
    n_iters: int | None,
    tol: float,
    max_iters: int,
    grad: str,
) -> WeightsOutput:
    """``Omega = -epsilon H(P)`` with both marginals fixed: doubly stochastic attention (Sander et al. 2022,
    "Sinkformers"; Cuturi 2013)."""
    # kernel exp(scores / epsilon + log_prior) = exp((scores + epsilon * log_prior) / epsilon): the solver
    # gets the user's epsilon, so that its non-convergence advice speaks of the user's value
    if log_prior is not None:
        scores = scores + epsilon * log_prior.to(scores.dtype)
    result = ops.sinkhorn_weights(
        scores, mask, epsilon=epsilon, n_iters=n_iters, tol=tol, max_iters=max_iters, grad=grad
    )
    n_iters_done = torch.as_tensor(result.n_iters)  # an int stays on the host: no device copy per call
    return WeightsOutput(result.weights, {"marginal_error": result.marginal_error, "n_iters": n_iters_done})


register_regularizer(
    Regularizer(
        name="sinkhorn",
        params=(
            EPSILON,
            Param(
                "n_iters",
                None,
                _optional(_positive_int),
                "None (iterate to tol) or an int >= 1",
                "fixed iteration count (eager: one or two host syncs; none under torch.compile)",
            ),
            Param("tol", _sinkhorn_ops.DEFAULT_TOL, _positive, "a finite float > 0",
                  "target max column-marginal error"),
            Param("max_iters", _sinkhorn_ops.DEFAULT_MAX_ITERS, _positive_int, "an int >= 1",
                  "iteration cap when n_iters is None"),
            Param("grad", "implicit", lambda x: x in _sinkhorn_ops.GRAD_MODES, f"one of {list(_sinkhorn_ops.GRAD_MODES)}",
                  "gradient: implicit differentiation at the fixed point, or through the unrolled iterations"),
            PRIOR,
        ),
        weights=_sinkhorn,
        couples_queries=True,
    )
)

# --------------------------------------------------------------------------------------------------
# OT-based attention of "Deciphering Attention Mechanisms: Optimization and Fenchel Dual Solutions"


def _ot(
    scores: torch.Tensor,
    mask: torch.Tensor | None,
    log_prior: torch.Tensor | None,
    *,
    alpha: float,
    gamma: float | None,
    template_gram: torch.Tensor | None = None,
    hidden_size: int | None = None,
) -> WeightsOutput:
    """``Omega = W_gamma(p, u; M)``, the gamma-entropic OT distance to the preference ``u`` with the cost
    ``M(a, b) = -<a, b> + C`` over the templates (keys): Section 9, eq. (22), Appendix D eq. (44)."""
    if template_gram is None:
        raise ValueError("the 'ot' regularizer needs template_gram (the Gram matrix of the keys)")
    if gamma is None:
        if hidden_size is None:
            raise ValueError("the 'ot' regularizer needs gamma (None means sqrt(hidden size) inside a model)")
        gamma = math.sqrt(hidden_size)
    preference = None
    if log_prior is not None:  # the preference u of eq. (22): u_i proportional to exp(log pi_i)
        log_prior = log_prior.float()
        preference = torch.exp(log_prior - log_prior.amax(-1, keepdim=True)).expand(scores.shape)
    return WeightsOutput(ops.ot_weights(scores, template_gram, mask, alpha=alpha, gamma=gamma, preference=preference))


register_regularizer(
    Regularizer(
        name="ot",
        params=(
            Param("alpha", 1.0, _positive, "a finite float > 0", "evidence strength (eq. (3))"),
            Param(
                "gamma",
                None,
                _optional(_positive),
                "None (sqrt of the hidden size) or a finite float > 0",
                "entropic OT regularisation",
            ),
            PRIOR,
        ),
        weights=_ot,
        needs_templates=True,
    )
)
