"""Reference solvers of the dual problem (7), for tests and benchmarks only (use
:func:`hf_eot.analysis.dual.fenchel_dual` for real work).

* :func:`gradient_ascent_dual`: plain gradient ascent, the method of "Deciphering Attention Mechanisms:
  Optimization and Fenchel Dual Solutions" (anonymous, under review; no arXiv id), Section 8;
* :func:`second_order_dense`: eq. (13) by a d x d solve per problem.
"""

from __future__ import annotations

import torch

from .dual import FenchelDualResult, _prepare, _second_order_dense
from .objective import dual_terms

__all__ = ["gradient_ascent_dual", "second_order_dense"]


@torch.no_grad()
def gradient_ascent_dual(
    t: torch.Tensor,
    z: torch.Tensor,
    u: torch.Tensor | None = None,
    alpha: float = 1.0,
    *,
    log_u: torch.Tensor | None = None,
    tol: float = 1e-8,
    max_iters: int = 100_000,
    dtype: torch.dtype = torch.float64,
) -> FenchelDualResult:
    """Solves eq. (7) by gradient ascent with the fixed step 1 / L per problem,
    L = 1 / alpha + diam(T)^2 / 4 (an upper bound on the curvature: Var_p <t, v> <= (range of <t, v>)^2 / 4
    for a unit v). Started at lam = alpha z and stopped at ||grad g|| / ||z|| <= tol like
    :func:`~hf_eot.analysis.dual.fenchel_dual`. Batched, but every problem is materialized: ``(*S, n, d)``."""
    t, z, log_u, batch = _prepare(t, z, u, log_u, alpha, dtype)
    n, d = t.shape[-2], t.shape[-1]
    T = t.expand(*batch, n, d)
    zb = z.expand(*batch, d)
    lu = log_u.expand(*batch, n)
    valid = lu > -torch.inf
    G = T @ T.mT
    sq = torch.diagonal(G, dim1=-2, dim2=-1)
    dist2 = (sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2 * G).clamp_min(0)
    vv = valid.unsqueeze(-1) & valid.unsqueeze(-2)
    diam2 = torch.where(vv, dist2, torch.zeros_like(dist2)).amax(dim=(-2, -1))
    step = 1.0 / (1.0 / alpha + diam2 / 4)
    lam = alpha * zb.clone()
    znorm = zb.norm(dim=-1).clamp_min(torch.finfo(dtype).tiny)
    n_iters = torch.zeros(batch, dtype=torch.int64, device=t.device)
    terms = dual_terms(lam, T, zb, lu, alpha)
    for _ in range(max_iters):
        todo = terms.grad.norm(dim=-1) / znorm > tol
        if not bool(todo.any()):
            break
        lam = torch.where(todo.unsqueeze(-1), lam + step.unsqueeze(-1) * terms.grad, lam)
        n_iters += todo.to(torch.int64)
        terms = dual_terms(lam, T, zb, lu, alpha)
    gn = terms.grad.norm(dim=-1)
    return FenchelDualResult(
        lam=lam,
        weights=terms.weights,
        value=terms.value,
        relative_deviation=(lam - alpha * zb).norm(dim=-1) / lam.norm(dim=-1),
        second_order_deviation=None,
        n_iters=n_iters,
        grad_norm=gn,
        rel_grad_norm=gn / znorm,
        converged=gn / znorm <= tol,
        method="gradient_ascent",
    )


def second_order_dense(
    t: torch.Tensor,
    z: torch.Tensor,
    u: torch.Tensor | None = None,
    alpha: float = 1.0,
    *,
    log_u: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """lam_2 = alpha (I + alpha Sigma)^-1 z (eq. 13), Sigma = Cov_u(t), by a d x d solve per problem.
    Returns ``(*S, d)``."""
    t, z, log_u, batch = _prepare(t, z, u, log_u, alpha, dtype)
    n, d = t.shape[-2:]
    return _second_order_dense(
        t.expand(*batch, n, d), z.expand(*batch, d), log_u.expand(*batch, n), float(alpha)
    )
