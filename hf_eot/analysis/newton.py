"""Newton's method for the dual problem (7): the solver core behind :func:`hf_eot.analysis.dual.fenchel_dual`.

From "Deciphering Attention Mechanisms: Optimization and Fenchel Dual Solutions" (anonymous, under
review; no arXiv id). Setting grad g = 0 gives lam* = alpha (z + T^T (u - p*)), so lam* - alpha z lies
in the span of the templates. When n < d we write lam = alpha (z + T^T beta) and solve the n-dimensional
root problem F(beta) = beta - u + p(beta) = 0. Its Jacobian is I + alpha Cov_p G with G = T T^T, and the
step it gives is exactly the Newton step of g in R^d (substitute Delta lam = alpha T^T Delta beta into
(I / alpha + T^T Cov_p T) Delta lam = grad g). ||grad g|| = sqrt(F^T G F).

Linear systems (I + alpha Cov_p G) x = b are solved through an SPD system: Cov_p = R R^T with
R = diag(sqrt p) (I - q q^T), q = sqrt p, so by the push-through identity
x = b - alpha R y with S y = R^T G b, S = I + alpha R^T G R (eigenvalues >= 1). S is solved

* by a Cholesky factorization per problem (``"cholesky"``), or
* by preconditioned conjugate gradients (``"cg"``) for groups of problems sharing G, where every product
  with G is one GEMM. CG stops when the residual of the *x* system, measured in the norm of the gradient
  (its G-norm: ||alpha R r||_G = sqrt(alpha r^T (S - I) r) for the CG residual r), is below
  eta ||b||_G. The forcing term eta = min(0.1, max(rel, tol / (4 rel))) (rel = ||grad g|| / ||z||) gives
  quadratic convergence far from the target and lands below `tol` near it.

When n >= d the Newton step is taken directly in R^d (Cholesky of the d x d Hessian). Every path uses the
backtracking line search of :mod:`hf_eot.analysis.line_search` on g. Pure torch.
"""

from __future__ import annotations

import torch

from .line_search import backtrack
from .objective import dual_terms, span_value

__all__ = ["cg_forcing", "newton_full", "newton_span", "span_solve"]

_ROUNDOFF = 64  # accept a change of g below this many ulps of its terms


def cg_forcing(rel: torch.Tensor, tol: float) -> torch.Tensor:
    """Relative accuracy of the inexact Newton step: eta = min(0.1, max(rel, tol / (4 rel)))."""
    return torch.minimum(torch.full_like(rel, 0.1), torch.maximum(rel, 0.25 * tol / rel.clamp_min(1e-300)))


def _solve_cholesky(
    G: torch.Tensor, p: torch.Tensor, b: torch.Tensor, Gb: torch.Tensor, alpha: float, active: torch.Tensor
) -> torch.Tensor:
    """x = (I + alpha Cov_p G)^-1 b by one Cholesky factorization of S per active problem.
    ``G: (g, n, n)``; ``p, b, Gb = b @ G: (g, P, n)``; ``active: (g, P)``. Zero where inactive."""
    g, P, n = b.shape
    idx = active.reshape(-1).nonzero().squeeze(-1)
    x = torch.zeros(g * P, n, dtype=b.dtype, device=b.device)
    if idx.numel() == 0:
        return x.reshape(g, P, n)
    q_all = p.sqrt()
    if idx.numel() == g * P:  # broadcast G over the group's problems, no gather
        M = (G.unsqueeze(1) * (q_all.unsqueeze(-1) * q_all.unsqueeze(-2))).reshape(g * P, n, n)
    else:
        qa = q_all.reshape(-1, n)[idx]
        M = G[idx // P] * (qa.unsqueeze(-1) * qa.unsqueeze(-2))

    def flat(v):
        return v.reshape(-1, n)[idx]

    q, pa, Gp = flat(q_all), flat(p), flat(p @ G)
    a = q * Gp - 0.5 * (pa * Gp).sum(-1, keepdim=True) * q  # M q - (q^T M q / 2) q
    # S = I + alpha P M P with P = I - q q^T, M = diag(q) G diag(q):  P M P = M - q a^T - a q^T
    S = torch.baddbmm(M, torch.stack((q, a), dim=-1), torch.stack((a, q), dim=-2), alpha=-1.0).mul_(alpha)
    S.diagonal(dim1=-2, dim2=-1).add_(1.0)
    w = q * flat(Gb)
    rhs = w - q * (q * w).sum(-1, keepdim=True)  # R^T G b
    L, info = torch.linalg.cholesky_ex(S)
    if bool((info != 0).any()):  # impossible in exact arithmetic (S >= I); LU instead
        y = torch.linalg.solve(S, rhs.unsqueeze(-1)).squeeze(-1)
    else:
        y = torch.cholesky_solve(rhs.unsqueeze(-1), L).squeeze(-1)
    Ry = q * (y - q * (q * y).sum(-1, keepdim=True))
    x[idx] = flat(b) - alpha * Ry
    return x.reshape(g, P, n)


def _solve_cg(
    G: torch.Tensor,
    p: torch.Tensor,
    b: torch.Tensor,
    Gb: torch.Tensor,
    alpha: float,
    active: torch.Tensor,
    eta: torch.Tensor,
    max_cg: int,
) -> torch.Tensor:
    """x = (I + alpha Cov_p G)^-1 b by Jacobi-preconditioned CG on S, matrix-free, to
    ||(I + alpha Cov_p G) x - b||_G <= eta ||b||_G. Shapes as :func:`_solve_cholesky`, ``eta: (g, P)``.
    Any CG iterate of a Newton system gives an ascent direction, so inexact steps are safe."""
    q = p.sqrt()

    def R(v):  # diag(q) (I - q q^T) v
        return q * (v - q * (q * v).sum(-1, keepdim=True))

    def Rt(v):  # (I - q q^T) diag(q) v
        qv = q * v
        return qv - q * (q * qv).sum(-1, keepdim=True)

    tiny = torch.finfo(b.dtype).tiny
    rhs = Rt(Gb)
    bnorm = (b * Gb).sum(-1).clamp_min(0).sqrt()  # ||b||_G
    target = eta * bnorm
    # Jacobi preconditioner: diag(S) = 1 + alpha diag(P M P)
    Gdiag = torch.diagonal(G, dim1=-2, dim2=-1).unsqueeze(1)  # (g, 1, n)
    pG = p @ G
    dS = 1.0 + alpha * (p * Gdiag - 2 * q * (q * pG) + p * (p * pG).sum(-1, keepdim=True)).clamp_min(0)

    def residual(r):  # ||alpha R r||_G: the residual of the x system in the gradient's norm
        Rr = R(r)
        return alpha * (Rr * (Rr @ G)).sum(-1).clamp_min(0).sqrt()

    y = torch.zeros_like(rhs)
    r = rhs.clone()
    zv = r / dS
    d = zv.clone()
    rz = (r * zv).sum(-1)
    idle = ~active | (bnorm == 0)
    done = idle
    # The G-norm residual costs a GEMM, so CG runs on the cheap Euclidean residual ||r|| and checks the
    # G-norm only when every problem has met its cheap target; problems that fail get a cheap target
    # rescaled by the observed ratio of the two norms, and continue.
    cheap = eta * r.norm(dim=-1)
    for _ in range(max_cg):
        Sd = d + alpha * Rt(R(d) @ G)
        a = torch.where(done, torch.zeros_like(rz), rz / (d * Sd).sum(-1).clamp_min(tiny))
        y = y + a.unsqueeze(-1) * d
        r = r - a.unsqueeze(-1) * Sd
        rnorm = r.norm(dim=-1)
        stop = done | (rnorm <= cheap)
        if bool(stop.all()):
            res = residual(r)
            ok = idle | (res <= target)
            if bool(ok.all()):
                break
            cheap = torch.where(ok, cheap, 0.5 * rnorm * target / res.clamp_min(tiny))
            stop = ok
        moved = ~done  # the problems that took this CG step get their next direction
        done = stop
        zv = r / dS
        rz_new = (r * zv).sum(-1)
        d = torch.where(moved.unsqueeze(-1), zv + (rz_new / rz.clamp_min(tiny)).unsqueeze(-1) * d, d)
        rz = torch.where(moved, rz_new, rz)
    x = b - alpha * R(y)
    return torch.where(active.unsqueeze(-1), x, torch.zeros_like(x))


def span_solve(
    G: torch.Tensor,
    p: torch.Tensor,
    b: torch.Tensor,
    alpha: float,
    active: torch.Tensor,
    *,
    linear_solver: str,
    eta: torch.Tensor | None = None,
) -> torch.Tensor:
    """x = (I + alpha Cov_p G)^-1 b for groups of problems sharing a Gram matrix.

    ``G: (g, n, n)``; ``p, b: (g, P, n)``; ``active: (g, P)`` (x = 0 elsewhere); ``eta: (g, P)`` the CG
    accuracy (default 1e-12)."""
    Gb = b @ G  # G is symmetric
    if linear_solver == "cholesky":
        return _solve_cholesky(G, p, b, Gb, alpha, active)
    if eta is None:
        eta = torch.full(active.shape, 1e-12, dtype=b.dtype, device=b.device)
    return _solve_cg(G, p, b, Gb, alpha, active, eta, max_cg=2 * b.shape[-1] + 10)


def newton_span(
    G: torch.Tensor,
    c: torch.Tensor,
    log_u: torch.Tensor,
    zz: torch.Tensor,
    alpha: float,
    tol: float,
    max_iters: int,
    linear_solver: str,
) -> tuple[torch.Tensor, ...]:
    """Newton on F(beta) = beta - u + p(beta) = 0 for groups of problems sharing a Gram matrix.

    ``G: (g, n, n)``; ``c = T z, log_u: (g, P, n)``; ``zz = |z|^2: (g, P)``. Starts at beta = 0 (lam = alpha z,
    eq. 14). Returns beta, p, n_iters, ||grad g|| (= sqrt(F^T G F)) and g, shaped like c / zz."""
    g, P, n = c.shape
    u = torch.exp(log_u)
    Gu = u @ G
    cu = (c * u).sum(-1)
    znorm = zz.sqrt().clamp_min(torch.finfo(c.dtype).tiny)
    ulp = _ROUNDOFF * torch.finfo(c.dtype).eps
    beta = torch.zeros_like(c)
    Gb = torch.zeros_like(c)
    logits = log_u + alpha * c
    val, roundoff = span_value(beta, Gb, cu, Gu, zz, logits, alpha)
    n_iters = torch.zeros(g, P, dtype=torch.int64, device=c.device)
    frozen = torch.zeros(g, P, dtype=torch.bool, device=c.device)  # the line search failed: stop there
    for _ in range(max_iters):
        p = torch.softmax(logits, dim=-1)
        F = beta - u + p
        rel = (F * (F @ G)).sum(-1).clamp_min(0).sqrt() / znorm
        active = (rel > tol) & ~frozen  # NaN rows (no support) compare False
        if not bool(active.any()):
            break
        eta = cg_forcing(rel, tol) if linear_solver == "cg" else None
        step = span_solve(G, p, -F, alpha, active, linear_solver=linear_solver, eta=eta)
        Gstep = step @ G
        # directional derivative of g along the step: grad_lam g . (alpha T^T step) = -alpha F^T G step
        slope = -alpha * (F * Gstep).sum(-1)

        def evaluate(t, step=step, Gstep=Gstep, beta=beta, Gb=Gb):
            tt = t.unsqueeze(-1)
            Gb1 = Gb + tt * Gstep
            return span_value(beta + tt * step, Gb1, cu, Gu, zz, log_u + alpha * (c + Gb1), alpha)

        t, ok, (val, roundoff) = backtrack((val, roundoff), slope, ulp * roundoff, evaluate, active)
        tt = torch.where(ok, t, torch.zeros_like(t)).unsqueeze(-1)
        beta = beta + tt * step
        Gb = Gb + tt * Gstep
        logits = log_u + alpha * (c + Gb)
        n_iters += active.to(torch.int64)
        frozen |= active & ~ok
    p = torch.softmax(logits, dim=-1)
    F = beta - u + p
    gnorm = (F * (F @ G)).sum(-1).clamp_min(0).sqrt()
    return beta, p, n_iters, gnorm, val


def newton_full(
    T: torch.Tensor, z: torch.Tensor, log_u: torch.Tensor, alpha: float, tol: float, max_iters: int
) -> tuple[torch.Tensor, ...]:
    """Newton on g in R^d for N problems (``T: (N, n, d)``, ``z: (N, d)``, normalized ``log_u: (N, n)``),
    started at lam = alpha z. Returns lam, p, n_iters, ||grad g|| and g."""
    N, n, d = T.shape
    znorm = z.norm(dim=-1).clamp_min(torch.finfo(z.dtype).tiny)
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    ulp = _ROUNDOFF * torch.finfo(z.dtype).eps
    lam = alpha * z
    n_iters = torch.zeros(N, dtype=torch.int64, device=z.device)
    frozen = torch.zeros(N, dtype=torch.bool, device=z.device)
    terms = dual_terms(lam, T, z, log_u, alpha)
    for _ in range(max_iters):
        active = (terms.grad.norm(dim=-1) / znorm > tol) & ~frozen
        if not bool(active.any()):
            break
        p = torch.where(active.unsqueeze(-1), terms.weights, torch.ones_like(terms.weights) / n)
        Tc = T - torch.einsum("...i,...id->...d", p, T).unsqueeze(-2)
        H = eye / alpha + torch.einsum("...i,...id,...ie->...de", p, Tc, Tc)  # -Hessian, SPD
        step = torch.cholesky_solve(terms.grad.unsqueeze(-1), torch.linalg.cholesky(H)).squeeze(-1)
        step = torch.where(active.unsqueeze(-1), step, torch.zeros_like(step))
        slope = (terms.grad * step).sum(-1)

        def evaluate(t, step=step, lam=lam):
            trial = dual_terms(lam + t.unsqueeze(-1) * step, T, z, log_u, alpha)
            return trial.value, trial.roundoff

        t, ok, _ = backtrack((terms.value, terms.roundoff), slope, ulp * terms.roundoff, evaluate, active)
        lam = lam + torch.where(ok, t, torch.zeros_like(t)).unsqueeze(-1) * step
        terms = dual_terms(lam, T, z, log_u, alpha)
        n_iters += active.to(torch.int64)
        frozen |= active & ~ok
    return lam, terms.weights, n_iters, terms.grad.norm(dim=-1), terms.value
