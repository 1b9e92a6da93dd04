"""The one registry of attention regularizers.

Every attention map of hf_eot solves, per query row, ``min_p <C, p> + Omega(p)`` with ``C = -scores``
(paper 000, eq. 13 of note 001); the regularizer ``Omega`` names the map.  A :class:`Regularizer` entry
holds the parameters it accepts (with defaults and validation) and the pure tensor function that maps
``(logits, mask)`` to weights.  Selection is always by lookup in :data:`REGISTRY`, never by ``if/elif``.

Shared conventions (see :mod:`hf_eot.ops`):

* ``scores`` are ``(..., n_queries, n_keys)``; ``mask`` is boolean and broadcastable, True = may attend;
* ``epsilon`` multiplies the model's own temperature: the map is applied to ``scores / epsilon + log_prior``,
  which for softmax is exactly ``Omega = epsilon * KL(p || pi)`` (note 001, the PriorSoftmax row) and for the
  other regularizers is the same additive score bias (the convention T5 uses for its position bias).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from . import ops

__all__ = [
    "PRIORS",
    "REGISTRY",
    "Param",
    "Regularizer",
    "available_regularizers",
    "get_regularizer",
    "register_regularizer",
    "validate_params",
]

#: Named priors a user may request; T5's own relative position bias is always used when present.
PRIORS: tuple[str, ...] = ("alibi", "relative_buckets")


@dataclass(frozen=True)
class Param:
    """One parameter of a regularizer: its default, a validity check and the text naming valid values."""

    name: str
    default: Any
    check: Callable[[Any], bool]
    valid: str
    doc: str = ""


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _positive(x: Any) -> bool:
    return _is_real(x) and x > 0


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda x: x is None or check(x)


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


EPSILON = Param("epsilon", 1.0, _positive, "a finite float > 0", "multiplies the model's temperature")
PRIOR = Param(
    "prior",
    None,
    lambda x: x is None or x in PRIORS,
    f"None or one of {list(PRIORS)}",
    "extra log-prior added to the scores (T5's position bias is always used)",
)


@dataclass(frozen=True)
class Regularizer:
    """A registered attention map: ``weights(logits, mask, **params)``, with its parameters.

    ``couples_queries``: the map is not row-separable (Sinkhorn's column marginals tie all queries), so
    it cannot be used where queries are produced one at a time (causal decoders, their cross-attention).
    ``uses_templates``: the map needs the Gram matrix of the keys (the OT-based attention).
    """

    name: str
    omega: str
    params: tuple[Param, ...]
    weights: Callable[..., torch.Tensor]
    couples_queries: bool = False
    uses_templates: bool = False
    reference: str = ""
    param_names: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "param_names", frozenset(p.name for p in self.params))

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}


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


def validate_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``params`` for regularizer ``name`` and return them completed with the defaults.

    Raises ValueError naming the bad value and the valid choices.
    """
    regularizer = get_regularizer(name)
    unknown = set(params) - regularizer.param_names
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {sorted(unknown)} for regularizer {name!r}; "
            f"valid parameters: {sorted(regularizer.param_names)}"
        )
    out = regularizer.defaults()
    for p in regularizer.params:
        if p.name in params:
            value = params[p.name]
            if isinstance(value, int) and not isinstance(value, bool) and isinstance(p.default, float):
                value = float(value)
            if not p.check(value):
                raise ValueError(f"invalid {p.name}={value!r} for regularizer {name!r}: expected {p.valid}")
            out[p.name] = value
    if name == "entmax" and out["learn_alpha"] and not 1.0 < out["alpha"] < 2.0:
        raise ValueError(
            f"invalid alpha={out['alpha']!r} with learn_alpha=True: a learned alpha lives in the open "
            "interval (1, 2) (alpha = 1 + sigmoid(w)); pick an initial alpha there"
        )
    return out


# --------------------------------------------------------------------------------------------------
# The entries.  Each weights function takes logits = scores / epsilon + log_prior (already formed by
# hf_eot.functional), except Sinkhorn and OT, which take their own regularisation parameters.


def _softmax(logits: torch.Tensor, mask: torch.Tensor | None, **_: Any) -> torch.Tensor:
    return ops.softmax_weights(logits, mask)


def _sparsemax(logits: torch.Tensor, mask: torch.Tensor | None, **_: Any) -> torch.Tensor:
    return ops.sparsemax_weights(logits, mask)


def _entmax(
    logits: torch.Tensor, mask: torch.Tensor | None, *, alpha: float | torch.Tensor, n_iter: int, **_: Any
) -> torch.Tensor:
    return ops.entmax_weights(logits, alpha, mask, max_iters=n_iter)


register_regularizer(
    Regularizer(
        name="softmax",
        omega="-epsilon * H(p)  (epsilon * KL(p || pi) with a prior)",
        params=(EPSILON, PRIOR),
        weights=_softmax,
        reference="paper 000 (one-sided EOT); paper 003 eq. (16)-(18) with a prior",
    )
)
register_regularizer(
    Regularizer(
        name="sparsemax",
        omega="epsilon / 2 * ||p||^2",
        params=(EPSILON, PRIOR),
        weights=_sparsemax,
        reference="note 001 (Sparsemax row); Martins & Astudillo 2016",
    )
)
register_regularizer(
    Regularizer(
        name="entmax",
        omega="epsilon * Tsallis_alpha(p) = epsilon * (sum_j p_j^alpha - 1) / (alpha (alpha - 1))",
        params=(
            EPSILON,
            Param("alpha", 1.5, lambda x: _is_real(x) and x > 1, "a finite float > 1", "Tsallis exponent"),
            Param("learn_alpha", False, lambda x: isinstance(x, bool), "True or False", "train alpha per head"),
            Param("n_iter", 50, _positive_int, "an int >= 1", "bisection steps (alpha != 1.5, 2)"),
            PRIOR,
        ),
        weights=_entmax,
        reference="Peters et al. 2019; Correia et al. 2019 (learned alpha)",
    )
)


def _sinkhorn_params() -> tuple[Param, ...]:
    return (
        EPSILON,
        Param(
            "n_iters",
            None,
            _optional(_positive_int),
            "None (iterate to tol) or an int >= 1",
            "fixed iteration count: no host synchronisation, torch.compile friendly",
        ),
        Param("tol", 1e-3, _positive, "a finite float > 0", "target max column-marginal error"),
        Param("max_iters", 200, _positive_int, "an int >= 1", "iteration cap when n_iters is None"),
        PRIOR,
    )


def _sinkhorn(
    logits: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    epsilon: float,
    n_iters: int | None,
    tol: float,
    max_iters: int,
    **_: Any,
) -> torch.Tensor:
    # logits = scores / epsilon + log_prior: hand the solver its own epsilon back, so that its
    # non-convergence advice speaks of the user's value
    scores = logits if epsilon == 1.0 else logits * epsilon
    return ops.sinkhorn_weights(scores, mask, epsilon=epsilon, n_iters=n_iters, tol=tol, max_iters=max_iters).weights


register_regularizer(
    Regularizer(
        name="sinkhorn",
        omega="-epsilon * H(P) with both marginals fixed (doubly stochastic attention)",
        params=_sinkhorn_params(),
        weights=_sinkhorn,
        couples_queries=True,
        reference="Sinkformers (Sander et al. 2022); Cuturi 2013",
    )
)


def _ot(
    scores: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    template_gram: torch.Tensor | None,
    log_prior: torch.Tensor | None,
    alpha: float,
    gamma: float | None,
    **_: Any,
) -> torch.Tensor:
    if template_gram is None:
        raise ValueError("the 'ot' regularizer needs template_gram (the Gram matrix of the keys)")
    if gamma is None:
        raise ValueError("the 'ot' regularizer needs gamma (None means sqrt(hidden size) inside a model)")
    preference = None
    if log_prior is not None:  # the preference u of eq. (22): u_i proportional to exp(log pi_i)
        log_prior = log_prior.float()
        preference = torch.exp(log_prior - log_prior.amax(-1, keepdim=True)).expand(scores.shape)
    return ops.ot_weights(scores, template_gram, mask, alpha=alpha, gamma=gamma, preference=preference)


register_regularizer(
    Regularizer(
        name="ot",
        omega="gamma-entropic OT distance W_gamma(p, u; M), M(a, b) = -<a, b> + C",
        params=(
            Param("alpha", 1.0, _positive, "a finite float > 0", "evidence strength (paper 003 eq. 3)"),
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
        uses_templates=True,
        reference="paper 003, Section 9 eq. (22), Appendix D eq. (44)",
    )
)
