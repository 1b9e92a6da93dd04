"""The dual objective g of eq. (7), written once in R^d and once in the coordinates of the template span.

From "Deciphering Attention Mechanisms: Optimization and Fenchel Dual Solutions" (anonymous, under
review; no arXiv id), eq. (7):

    g(lam) = <lam, mu + z> - ||lam||^2 / (2 alpha) - log sum_i u_i exp(<t_i, lam>),   mu = sum_i u_i t_i,

    grad g(lam) = mu + z - lam / alpha - E_p[t],   p_i = u_i exp(<t_i, lam>) / M(lam)   (eq. 9).

In the span coordinates lam = alpha (z + T^T beta) with c = T z and G = T T^T the same value reads

    g = alpha (c.u + |z|^2 / 2 + beta.G u - beta.G beta / 2) - logsumexp(log u + alpha (c + G beta)).

Both forms also return a bound on their round-off (in units of the dtype's epsilon), which the line
search uses to accept steps whose change of g is below round-off. Pure torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DualTerms", "dual_objective", "dual_terms", "log_partition", "normalized_log_u", "span_value"]


def log_partition(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logsumexp over the last dim and a bound on its absolute round-off (units of the dtype's
    epsilon): |lse| + |max logit| + 1. ``(..., n) -> (...), (...)``."""
    lse = torch.logsumexp(logits, dim=-1)
    top = logits.amax(dim=-1)
    return lse, lse.abs() + torch.where(torch.isfinite(top), top.abs(), torch.zeros_like(top)) + 1


def normalized_log_u(
    n: int, u: torch.Tensor | None, log_u: torch.Tensor | None, like: torch.Tensor
) -> torch.Tensor:
    """log u normalized onto the simplex (uniform when both are None); rows without support are NaN."""
    if u is not None:
        log_u = torch.log(u.to(like.dtype))
    elif log_u is None:
        log_u = torch.zeros(n, dtype=like.dtype, device=like.device)
    log_u = log_u.to(like.dtype)
    return log_u - torch.logsumexp(log_u, dim=-1, keepdim=True)


@dataclass
class DualTerms:
    """g(lam), its gradient, the primal weights p of eq. (9) and the round-off bound of g."""

    value: torch.Tensor  # (...)
    grad: torch.Tensor  # (..., d)
    weights: torch.Tensor  # (..., n)
    roundoff: torch.Tensor  # (...)


def dual_terms(
    lam: torch.Tensor, t: torch.Tensor, z: torch.Tensor, log_u: torch.Tensor, alpha: float
) -> DualTerms:
    """Eq. (7) and its gradient at ``lam: (..., d)`` for templates ``t: (..., n, d)``, ``z: (..., d)`` and
    normalized ``log_u: (..., n)``. Differentiable."""
    u = torch.exp(log_u)
    mu = torch.einsum("...i,...id->...d", u, t)
    logits = log_u + torch.einsum("...id,...d->...i", t, lam)
    lse, lse_roundoff = log_partition(logits)
    value = (lam * (mu + z)).sum(-1) - (lam * lam).sum(-1) / (2 * alpha) - lse
    p = torch.softmax(logits, dim=-1)
    grad = mu + z - lam / alpha - torch.einsum("...i,...id->...d", p, t)
    roundoff = (lam.abs() * (mu.abs() + z.abs())).sum(-1) + (lam * lam).sum(-1) / (2 * alpha) + lse_roundoff
    return DualTerms(value=value, grad=grad, weights=p, roundoff=roundoff)


def dual_objective(
    lam: torch.Tensor,
    t: torch.Tensor,
    z: torch.Tensor,
    u: torch.Tensor | None = None,
    alpha: float = 1.0,
    *,
    log_u: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """g(lam) of eq. (7) and its gradient mu + z - lam / alpha - E_p[t]. Shapes as
    :func:`hf_eot.analysis.dual.fenchel_dual`, plus ``lam: (..., d)``. Differentiable; no dtype change."""
    terms = dual_terms(lam, t, z, normalized_log_u(t.shape[-2], u, log_u, t), alpha)
    return terms.value, terms.grad


def span_value(
    beta: torch.Tensor,
    Gb: torch.Tensor,
    cu: torch.Tensor,
    Gu: torch.Tensor,
    zz: torch.Tensor,
    logits: torch.Tensor,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """g at lam = alpha (z + T^T beta) from cached products (``Gb = G beta``, ``cu = c.u``, ``Gu = G u``,
    ``zz = |z|^2``, ``logits = log u + alpha (c + G beta)``), and its round-off bound."""
    lse, lse_roundoff = log_partition(logits)
    value = alpha * (cu + 0.5 * zz + (beta * Gu).sum(-1) - 0.5 * (beta * Gb).sum(-1)) - lse
    sizes = cu.abs() + 0.5 * zz + (beta.abs() * Gu.abs()).sum(-1) + 0.5 * (beta.abs() * Gb.abs()).sum(-1)
    return value, alpha * sizes + lse_roundoff
