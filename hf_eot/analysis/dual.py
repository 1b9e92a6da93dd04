"""The Fenchel dual of attention's inference problem, solved exactly (paper 003, Sections 4-6).

For one query of one head the primal problem is eq. (3),

    min_p  alpha/2 ||mu + z - E_p[t]||^2 + KL(p || u)      over distributions p on the templates t_i,

and its Fenchel dual is eq. (7),

    g(lam) = <lam, mu + z> - ||lam||^2 / (2 alpha) - log sum_i u_i exp(<t_i, lam>),   mu = sum_i u_i t_i.

g is strictly concave, with gradient  mu + z - lam / alpha - E_p[t]  and Hessian
-(I / alpha + Cov_p(t)), where p_i = u_i exp(<t_i, lam>) / M(lam) is the primal solution of eq. (9).
The paper approximates the maximizer lam* by alpha z (eq. 14); with lam = alpha z, p is exactly the
attention row of eq. (16).

Solver. Setting the gradient to zero gives lam* = alpha (z + T^T (u - p*)), so lam* - alpha z lies in the
span of the templates. When n < d we therefore write lam = alpha (z + T^T beta) and solve the
n-dimensional root problem F(beta) = beta - u + p(beta) = 0 with Newton's method: its Jacobian is
I + alpha Cov_p G, with G = T T^T the Gram matrix, and the step it gives is *exactly* the Newton step
of g in R^d (substitute Delta lam = alpha T^T Delta beta into (I / alpha + T^T Cov_p T) Delta lam =
grad g). The Newton system is rewritten as an SPD system (see :func:`_span_newton_step`) and solved
either by preconditioned conjugate gradients to a relative accuracy that tightens with the gradient
(inexact Newton with forcing terms; ``linear_solver="cg"``, the default: all products with G are GEMMs
shared by the problems that use the same templates, e.g. all heads and queries of one sequence), or
by a Cholesky factorization per problem (``"cholesky"``). When n >= d the Newton step is taken
directly in R^d (Cholesky of the d x d Hessian). All paths use a backtracking (Armijo) line search on
g, start from the paper's approximation lam = alpha z, and stop when ||grad g(lam)|| / ||z|| <= tol,
i.e. when the gradient has shrunk by `tol` relative to its value at lam = 0 (which is z).

Everything here is pure torch: no Transformers import.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

__all__ = [
    "FenchelDualResult",
    "fenchel_dual",
    "dual_objective",
    "gradient_ascent_dual",
    "quadratic_approximation",
]

_METHODS = ("auto", "span", "full")


@dataclass
class FenchelDualResult:
    """The solution of the dual problem (7) for a batch of problems.

    All tensors carry the broadcast batch shape ``S`` of the inputs.

    Attributes:
        lam: ``(*S, d)`` the maximizer lambda* (``None`` when ``return_lam=False``).
        weights: ``(*S, n)`` the primal solution p* of eq. (9); zero where ``u`` is zero.
        value: ``(*S,)`` the dual value g(lambda*), which equals the primal minimum of eq. (3).
        relative_deviation: ``(*S,)`` ||lambda* - alpha z|| / ||lambda*|| (the paper's Fig. 4-8).
        n_iter: ``(*S,)`` Newton iterations each problem took.
        grad_norm: ``(*S,)`` ||grad g(lambda*)||.
        rel_grad_norm: ``(*S,)`` ||grad g(lambda*)|| / ||z||, the stopping criterion.
        converged: ``(*S,)`` whether ``rel_grad_norm <= tol`` was reached.
        method: ``"span"`` (Newton in the n-dimensional template span) or ``"full"`` (Newton in R^d).
    """

    lam: torch.Tensor | None
    weights: torch.Tensor
    value: torch.Tensor
    relative_deviation: torch.Tensor
    n_iter: torch.Tensor
    grad_norm: torch.Tensor
    rel_grad_norm: torch.Tensor
    converged: torch.Tensor
    method: str


# --------------------------------------------------------------------------------------------------
# input handling


def _prepare(
    t: torch.Tensor,
    z: torch.Tensor,
    u: torch.Tensor | None,
    log_u: torch.Tensor | None,
    alpha: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Size]:
    """Validates shapes, casts to `dtype`, returns (t, z, normalized log_u, batch shape)."""
    if t.dim() < 2:
        raise ValueError(f"t must have shape (..., n, d), got {tuple(t.shape)}")
    n, d = t.shape[-2], t.shape[-1]
    if n == 0 or d == 0:
        raise ValueError(f"t must have at least one template of positive dimension, got {tuple(t.shape)}")
    if z.dim() < 1 or z.shape[-1] != d:
        raise ValueError(f"z must have shape (..., d) with d = {d} (from t), got {tuple(z.shape)}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if u is not None and log_u is not None:
        raise ValueError("pass at most one of u and log_u")
    if u is not None:
        if u.shape[-1] != n:
            raise ValueError(f"u must have shape (..., n) with n = {n} (from t), got {tuple(u.shape)}")
        if bool((u < 0).any()):
            raise ValueError("u must be non-negative")
        log_u = torch.log(u.to(dtype))
    elif log_u is not None:
        if log_u.shape[-1] != n:
            raise ValueError(
                f"log_u must have shape (..., n) with n = {n} (from t), got {tuple(log_u.shape)}"
            )
        log_u = log_u.to(dtype)
    else:
        log_u = torch.zeros(n, dtype=dtype, device=t.device)
    # normalize u onto the simplex; rows with no support become NaN and are reported as such
    log_u = log_u - torch.logsumexp(log_u, dim=-1, keepdim=True)
    batch = torch.broadcast_shapes(t.shape[:-2], z.shape[:-1], log_u.shape[:-1])
    return t.to(dtype), z.to(dtype), log_u, batch


def _pad_left(x: torch.Tensor, batch_ndim: int, event_ndim: int) -> torch.Tensor:
    extra = batch_ndim - (x.dim() - event_ndim)
    return x.reshape((1,) * extra + tuple(x.shape)) if extra > 0 else x


def _take(x: torch.Tensor, index: tuple[torch.Tensor, ...], event_ndim: int) -> torch.Tensor:
    """Gathers ``x[(*S, *event)]`` at the flat batch positions `index` (an unravelled index into S),
    honouring broadcasting (size-1 batch dims are read at 0). Returns ``(N, *event)``."""
    batch_ndim = len(index)
    x = _pad_left(x, batch_ndim, event_ndim)
    parts = tuple(ix if x.shape[k] > 1 else torch.zeros_like(ix) for k, ix in enumerate(index))
    return x[parts]


def _chunks(batch: torch.Size, chunk_size: int, device: torch.device):
    total = math.prod(batch)
    for start in range(0, total, chunk_size):
        flat = torch.arange(start, min(start + chunk_size, total), device=device)
        if len(batch) == 0:
            yield start, flat, ()
        else:
            yield start, flat, torch.unravel_index(flat, tuple(batch))


# --------------------------------------------------------------------------------------------------
# Newton in the template span (n < d)


def _lse_with_scale(logits):
    """logsumexp and a bound on its absolute round-off (in units of eps): |lse| + |max logit| + 1."""
    lse = torch.logsumexp(logits, dim=-1)
    top = logits.amax(dim=-1)
    return lse, lse.abs() + torch.where(torch.isfinite(top), top.abs(), torch.zeros_like(top)) + 1


def _mv(A, x):
    """Batched matrix-vector product (..., n, n) x (..., n) -> (..., n)."""
    return (A @ x.unsqueeze(-1)).squeeze(-1)


def _span_value(beta, Gb, cu, Gu, zz, logits, alpha, with_scale=False):
    """g(lam) at lam = alpha (z + T^T beta), from cached products (Gb = G beta, cu = c.u, Gu = G u,
    logits = log u + alpha (c + G beta)):
    alpha (c.u + |z|^2/2 + beta.G u - beta.G beta / 2) - logsumexp(logits).

    With `with_scale`, also a bound (in units of eps) on the round-off of the value."""
    bGu = (beta * Gu).sum(-1)
    bGb = (beta * Gb).sum(-1)
    lse, lse_scale = _lse_with_scale(logits)
    value = alpha * (cu + 0.5 * zz + bGu - 0.5 * bGb) - lse
    if not with_scale:
        return value
    sizes = cu.abs() + 0.5 * zz + (beta.abs() * Gu.abs()).sum(-1) + 0.5 * (beta.abs() * Gb.abs()).sum(-1)
    return value, alpha * sizes + lse_scale


def _span_newton_step(M, Gp, GF, F, p, alpha):
    """Solves (I + alpha Cov_p G) step = -F for a batch of problems through an SPD system.

    Cov_p = diag(p) - p p^T = R R^T with R = diag(sqrt p) (I - q q^T), q = sqrt p, so by the push-through
    identity (I + alpha R R^T G)^-1 = I - alpha R S^-1 R^T G with S = I + alpha R^T G R (SPD, eigenvalues
    >= 1): step = -F + alpha R S^-1 R^T G F.

    M = diag(q) G diag(q) (N, n, n), overwritten; Gp = G p, GF = G F, F, p: (N, n)."""
    q = p.sqrt()
    a = q * Gp - 0.5 * (p * Gp).sum(-1, keepdim=True) * q  # M q - (q^T M q / 2) q
    # S = I + alpha P M P,  P = I - q q^T,  P M P = M - q a^T - a q^T
    S = torch.baddbmm(M, torch.stack((q, a), dim=-1), torch.stack((a, q), dim=-2), alpha=-1.0).mul_(alpha)
    S.diagonal(dim1=-2, dim2=-1).add_(1.0)
    w = q * GF
    rhs = w - q * (q * w).sum(-1, keepdim=True)  # R^T G F
    L, info = torch.linalg.cholesky_ex(S)
    if bool((info != 0).any()):  # impossible in exact arithmetic (S >= I); fall back to LU
        y = torch.linalg.solve(S, rhs.unsqueeze(-1)).squeeze(-1)
    else:
        y = torch.cholesky_solve(rhs.unsqueeze(-1), L).squeeze(-1)
    Ry = q * (y - q * (q * y).sum(-1, keepdim=True))
    return -F + alpha * Ry


def _span_newton_step_cg(G, GF, F, p, active, alpha, eta, max_cg):
    """The step of :func:`_span_newton_step` by preconditioned conjugate gradients on S y = R^T G F, for
    groups of problems sharing G (grouped layout (g, P, n)); every product with G is a (P x n) @ (n x n)
    GEMM and nothing n x n is formed per problem. Each problem stops at relative residual `eta` (a
    tensor (g, P)); any CG iterate gives an ascent direction (y . R^T G F grows towards its exact value),
    so inexact steps are safe with the line search. Inactive problems get a zero step."""
    q = p.sqrt()

    def R(x):  # diag(q) (I - q q^T) x
        return q * (x - q * (q * x).sum(-1, keepdim=True))

    def Rt(x):  # (I - q q^T) diag(q) x
        qx = q * x
        return qx - q * (q * qx).sum(-1, keepdim=True)

    def S(v):
        return v + alpha * Rt(R(v) @ G)

    rhs = Rt(GF)
    # Jacobi preconditioner: diag(S) = 1 + alpha diag(P M P), M = diag(q) G diag(q)
    Gdiag = torch.diagonal(G, dim1=-2, dim2=-1).unsqueeze(1)  # (g, 1, n)
    Mq = q * (p @ G)
    qMq = (p * (p @ G)).sum(-1, keepdim=True)
    dS = 1.0 + alpha * (p * Gdiag - 2 * q * Mq + p * qMq).clamp_min(0)
    y = torch.zeros_like(rhs)
    r = rhs.clone()
    zv = r / dS
    d = zv.clone()
    rz = (r * zv).sum(-1)
    r0 = r.norm(dim=-1)
    done = ~active | (r0 == 0)
    for _ in range(max_cg):
        Sd = S(d)
        dSd = (d * Sd).sum(-1)
        a = torch.where(done, torch.zeros_like(rz), rz / dSd.clamp_min(torch.finfo(rz.dtype).tiny))
        y = y + a.unsqueeze(-1) * d
        r = r - a.unsqueeze(-1) * Sd
        done = done | (r.norm(dim=-1) <= eta * r0)
        if bool(done.all()):
            break
        zv = r / dS
        rz_new = (r * zv).sum(-1)
        b = torch.where(done, torch.zeros_like(rz), rz_new / rz.clamp_min(torch.finfo(rz.dtype).tiny))
        d = zv + b.unsqueeze(-1) * d
        rz = rz_new
    step = -F + alpha * R(y)
    return torch.where(active.unsqueeze(-1), step, torch.zeros_like(step))


def _span_step_direct(G, GF, F, p, idx, group, alpha):
    """The Newton step by a Cholesky factorization per active problem (flat indices `idx`)."""
    g, P, n = F.shape
    q = p.sqrt()
    every = idx.numel() == g * P
    sel = None if every else idx

    def flat(x):
        x = x.reshape(g * P, -1)
        return x if sel is None else x[sel]

    if every:  # broadcast G over the group's problems, no gather
        M = (G.unsqueeze(1) * (q.unsqueeze(-1) * q.unsqueeze(-2))).reshape(g * P, n, n)
    else:
        qa = flat(q)
        M = G[group[idx]] * (qa.unsqueeze(-1) * qa.unsqueeze(-2))
    step_a = _span_newton_step(M, flat(p @ G), flat(GF), flat(F), flat(p), alpha)
    step = torch.zeros(g * P, n, dtype=F.dtype, device=F.device)
    step[idx] = step_a
    return step.reshape(g, P, n)


def _newton_span(G, c, log_u, zz, alpha, tol, max_iter, armijo=1e-4, max_halvings=40, linear_solver="cg"):
    """Newton on F(beta) = beta - u + p(beta) for groups of problems that share a Gram matrix.

    G: (g, n, n); c, log_u: (g, P, n); zz: (g, P). Products with G are (P x n) @ (n x n) GEMMs per group;
    only the n x n Newton systems are per problem, and only problems that have not converged get one.
    Returns beta, p, n_iter, grad_norm (||grad g|| = sqrt(F^T G F)) and value, shaped like c / zz."""
    g, P, n = c.shape
    dev = c.device
    u = torch.exp(log_u)
    Gu = u @ G  # G is symmetric
    cu = (c * u).sum(-1)
    znorm = zz.sqrt().clamp_min(torch.finfo(c.dtype).tiny)
    roundoff = 64 * torch.finfo(c.dtype).eps
    group = torch.arange(g, device=dev).repeat_interleave(P)  # group of each flat problem
    beta = torch.zeros_like(c)
    Gb = torch.zeros_like(c)
    logits = log_u + alpha * c
    val, scale = _span_value(beta, Gb, cu, Gu, zz, logits, alpha, with_scale=True)
    n_iter = torch.zeros(g, P, dtype=torch.int64, device=dev)
    frozen = torch.zeros(g, P, dtype=torch.bool, device=dev)  # line search failed: stop there
    for _ in range(max_iter):
        p = torch.softmax(logits, dim=-1)
        F = beta - u + p
        GF = F @ G
        gnorm = (F * GF).sum(-1).clamp_min(0).sqrt()
        active = (gnorm / znorm > tol) & ~frozen  # NaN rows (no support) compare False
        idx = active.reshape(-1).nonzero().squeeze(-1)
        if idx.numel() == 0:
            break
        if linear_solver == "cg":
            # forcing term: solve the Newton system only as accurately as the gradient is small, and no
            # more accurately than needed to land below tol (eta * rel <= tol / 2) once rel is tiny
            rel = gnorm / znorm
            eta = torch.maximum(0.1 * rel, 0.5 * tol / rel).clamp(1e-14, 0.1)
            step = _span_newton_step_cg(G, GF, F, p, active, alpha, eta, max_cg=2 * n + 10)
        else:
            step = _span_step_direct(G, GF, F, p, idx, group, alpha)
        Gstep = step @ G
        # directional derivative of g along the step: grad_lam g . (alpha T^T step) = -alpha F^T G step
        slope = -alpha * (F * Gstep).sum(-1)
        slack = roundoff * scale  # a change of g below this is round-off: accept the Newton step
        t = torch.ones_like(val)
        pending = active.clone()
        for _ in range(max_halvings):
            if not bool(pending.any()):
                break
            b1 = beta + t.unsqueeze(-1) * step
            Gb1 = Gb + t.unsqueeze(-1) * Gstep
            l1 = log_u + alpha * (c + Gb1)
            g1, s1 = _span_value(b1, Gb1, cu, Gu, zz, l1, alpha, with_scale=True)
            ok = pending & (g1 >= val + armijo * t * slope - slack)
            okv = ok.unsqueeze(-1)
            beta = torch.where(okv, b1, beta)
            Gb = torch.where(okv, Gb1, Gb)
            logits = torch.where(okv, l1, logits)
            val = torch.where(ok, g1, val)
            scale = torch.where(ok, s1, scale)
            pending = pending & ~ok
            t = torch.where(pending, 0.5 * t, t)
        n_iter += active.to(torch.int64)
        frozen |= pending
    p = torch.softmax(logits, dim=-1)
    F = beta - u + p
    gnorm = (F * (F @ G)).sum(-1).clamp_min(0).sqrt()
    return beta, p, n_iter, gnorm, val


# --------------------------------------------------------------------------------------------------
# Newton in R^d (n >= d)


def _full_value(lam, T, z, log_u, u, alpha, with_scale=False):
    mu = torch.einsum("...i,...id->...d", u, T)
    lse, lse_scale = _lse_with_scale(log_u + torch.einsum("...id,...d->...i", T, lam))
    value = (lam * (mu + z)).sum(-1) - (lam * lam).sum(-1) / (2 * alpha) - lse
    if not with_scale:
        return value
    return value, (lam.abs() * (mu.abs() + z.abs())).sum(-1) + (lam * lam).sum(-1) / (2 * alpha) + lse_scale


def _newton_full(T, z, log_u, alpha, tol, max_iter, armijo=1e-4, max_halvings=40):
    """Newton on g in R^d for N problems (T: (N,n,d), z: (N,d), log_u: (N,n))."""
    N, n, d = T.shape
    u = torch.exp(log_u)
    mu = torch.einsum("...i,...id->...d", u, T)
    lam = alpha * z.clone()
    n_iter = torch.zeros(N, dtype=torch.int64, device=z.device)
    znorm = z.norm(dim=-1).clamp_min(torch.finfo(z.dtype).tiny)
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    active = torch.arange(N, device=z.device)
    roundoff = 64 * torch.finfo(z.dtype).eps
    for _ in range(max_iter):
        if active.numel() == 0:
            break
        Ta, za, la, ua, mua, lama = T[active], z[active], log_u[active], u[active], mu[active], lam[active]
        p = torch.softmax(la + torch.einsum("...id,...d->...i", Ta, lama), dim=-1)
        Ep = torch.einsum("...i,...id->...d", p, Ta)
        grad = mua + za - lama / alpha - Ep
        todo = grad.norm(dim=-1) / znorm[active] > tol
        if not bool(todo.any()):
            break
        active = active[todo]
        Ta, za, la, ua, mua, lama, p, Ep, grad = (x[todo] for x in (Ta, za, la, ua, mua, lama, p, Ep, grad))
        Tc = Ta - Ep.unsqueeze(-2)
        H = eye / alpha + torch.einsum("...i,...id,...ie->...de", p, Tc, Tc)  # -Hessian, SPD
        step = torch.cholesky_solve(grad.unsqueeze(-1), torch.linalg.cholesky(H)).squeeze(-1)
        slope = (grad * step).sum(-1)
        g0, scale = _full_value(lama, Ta, za, la, ua, alpha, with_scale=True)
        slack = roundoff * scale
        t_step = torch.ones_like(g0)
        pending = torch.ones_like(g0, dtype=torch.bool)
        new_l = lama.clone()
        for _ in range(max_halvings):
            idx = pending.nonzero().squeeze(-1)
            if idx.numel() == 0:
                break
            trial = lama[idx] + t_step[idx, None] * step[idx]
            g1 = _full_value(trial, Ta[idx], za[idx], la[idx], ua[idx], alpha)
            ok = g1 >= g0[idx] + armijo * t_step[idx] * slope[idx] - slack[idx]
            new_l[idx[ok]] = trial[ok]
            pending[idx[ok]] = False
            t_step[idx[~ok]] *= 0.5
        lam[active] = new_l
        n_iter[active] += 1
        active = active[~pending]
    p = torch.softmax(log_u + torch.einsum("...id,...d->...i", T, lam), dim=-1)
    grad = mu + z - lam / alpha - torch.einsum("...i,...id->...d", p, T)
    value = _full_value(lam, T, z, log_u, u, alpha)
    return lam, p, n_iter, grad.norm(dim=-1), value


# --------------------------------------------------------------------------------------------------
# public API


@torch.no_grad()
def fenchel_dual(
    t: torch.Tensor,
    z: torch.Tensor,
    u: torch.Tensor | None = None,
    alpha: float = 1.0,
    *,
    log_u: torch.Tensor | None = None,
    tol: float = 1e-8,
    max_iter: int = 100,
    method: str = "auto",
    return_lam: bool = True,
    chunk_size: int | None = None,
    memory_budget: int = 512 * 2**20,
    dtype: torch.dtype = torch.float64,
    warn: bool = True,
    linear_solver: str = "auto",
) -> FenchelDualResult:
    """Solves max_lam <lam, mu + z> - ||lam||^2 / (2 alpha) - log sum_i u_i exp(<t_i, lam>) (eq. 7).

    Newton's method with a backtracking line search, started at the paper's approximation
    lam = alpha z (eq. 14) and run to ||grad g|| / ||z|| <= `tol`. For n < d it works in the
    n-dimensional span of the templates (lam = alpha (z + T^T beta)), where one Newton step costs
    O(n^3) instead of O(d^3) and is the same step; `method` forces ``"span"`` or ``"full"``.

    Args:
        t: ``(..., n, d)`` templates. Broadcasts against the batch dims of `z` and `u` without being
            copied, so one sequence's templates can serve all its heads and queries
            (``t: (B, 1, 1, n, d)``, ``z: (B, H, Q, d)``). Must be finite, also where u is zero.
        z: ``(..., d)`` evidence.
        u: ``(..., n)`` non-negative preference weights (normalized here; zero = masked template).
            ``None`` means uniform.
        alpha: strength alpha > 0 of the evidence term.
        log_u: alternative to `u`: ``(..., n)`` unnormalized log-weights, ``-inf`` for masked templates
            (T5's position bias is naturally a log-weight).
        tol: relative gradient norm to reach.
        max_iter: Newton iterations at most.
        method: ``"auto"`` (span if n < d, else full), ``"span"`` or ``"full"``.
        return_lam: build ``lam`` (``(*S, d)``); turn off to save memory when only weights and
            deviations are needed.
        chunk_size: problems solved at once; by default at most 2048, fewer if `memory_budget` (bytes)
            requires.
        dtype: computation dtype (float64 recommended to reach tol = 1e-8).
        warn: emit one ``RuntimeWarning`` when some problems did not converge.
        linear_solver: how the span method solves each Newton system: ``"cg"`` (preconditioned
            conjugate gradients, matrix-free), ``"cholesky"`` (one factorization per problem), or
            ``"auto"``: CG when at least 8 problems share each template set, else Cholesky.

    Returns:
        a :class:`FenchelDualResult` whose tensors have the broadcast batch shape of the inputs. The
        solver is not differentiable (it runs under ``torch.no_grad``).
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if linear_solver not in ("auto", "cg", "cholesky"):
        raise ValueError(f"linear_solver must be 'auto', 'cg' or 'cholesky', got {linear_solver!r}")
    if not (tol > 0):
        raise ValueError(f"tol must be > 0, got {tol!r}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter!r}")
    t, z, log_u, batch = _prepare(t, z, u, log_u, alpha, dtype)
    n, d = t.shape[-2], t.shape[-1]
    if method == "auto":
        method = "span" if n < d else "full"
    nb = len(batch)
    total = math.prod(batch)
    itemsize = torch.finfo(dtype).bits // 8
    if linear_solver == "auto":  # CG pays off when many problems share one Gram matrix
        shared = math.prod(batch[k] for k in range(nb) if _pad_left(t, nb, 2).shape[k] == 1)
        linear_solver = "cg" if shared >= 8 else "cholesky"
    if method == "full":
        per_problem, cap = 6 * d * d + 4 * n * d + 8 * n, 2048
    elif linear_solver == "cg":
        per_problem, cap = 30 * n + 4 * d, 4096
    else:
        per_problem, cap = 6 * n * n + 8 * n + 4 * d, 2048
    if chunk_size is None:
        # moderate chunks keep the working arrays in cache; the budget caps large problems
        chunk_size = max(1, min(cap, memory_budget // (per_problem * itemsize)))
    device = t.device

    weights = torch.empty((*batch, n), dtype=dtype, device=device)
    value = torch.empty(batch, dtype=dtype, device=device)
    reldev = torch.empty(batch, dtype=dtype, device=device)
    n_iter = torch.empty(batch, dtype=torch.int64, device=device)
    gnorm = torch.empty(batch, dtype=dtype, device=device)
    lam_out = torch.empty((*batch, d), dtype=dtype, device=device) if return_lam else None
    flat = lambda x: x.reshape(-1, *x.shape[nb:])  # noqa: E731

    if method == "span":
        # Group the problems by template set: batch dims where t has size > 1 index groups (each with
        # its own Gram matrix G = T T^T), the other batch dims enumerate the P problems of a group.
        tb = _pad_left(t, nb, 2)
        gdims = [k for k in range(nb) if tb.shape[k] > 1]
        pdims = [k for k in range(nb) if tb.shape[k] == 1]
        perm = gdims + pdims
        gshape = [batch[k] for k in gdims]
        pshape = [batch[k] for k in pdims]
        NG, P = math.prod(gshape), math.prod(pshape)
        T = tb.reshape(NG, n, d)  # size-1 dims drop out; the group dims keep their order
        G = T @ T.mT

        def grouped(x, event):  # (*S', *event) broadcastable to S -> (NG, P, *event)
            x = _pad_left(x, nb, len(event)).expand(tuple(batch) + tuple(event))
            x = x.permute(tuple(perm) + tuple(range(nb, nb + len(event))))
            return x.reshape((NG, P) + tuple(event))

        def ungrouped(x, event):  # (NG, P, *event) -> (*S, *event)
            x = x.reshape(tuple(gshape) + tuple(pshape) + tuple(event))
            inv = [perm.index(k) for k in range(nb)]
            return x.permute(tuple(inv) + tuple(range(nb, nb + len(event))))

        c = grouped(torch.einsum("...id,...d->...i", t, z), (n,))  # einsum does not expand t
        lu = grouped(log_u, (n,))
        zz = grouped((z * z).sum(-1), ())
        beta = torch.empty(NG, P, n, dtype=dtype, device=device)
        pw = torch.empty_like(beta)
        it = torch.empty(NG, P, dtype=torch.int64, device=device)
        gn = torch.empty(NG, P, dtype=dtype, device=device)
        val = torch.empty_like(gn)
        gpc = max(1, chunk_size // max(P, 1))  # groups per chunk
        pc = min(P, chunk_size) if gpc == 1 else P  # problems per chunk (one huge group is split)
        for g0 in range(0, NG, gpc):
            g1 = min(NG, g0 + gpc)
            for p0 in range(0, P, pc):
                p1 = min(P, p0 + pc)
                sl = (slice(g0, g1), slice(p0, p1))
                out = _newton_span(
                    G[g0:g1], c[sl], lu[sl], zz[sl], alpha, tol, max_iter, linear_solver=linear_solver
                )
                beta[sl], pw[sl], it[sl], gn[sl], val[sl] = out
        # ||lam - alpha z||^2 = alpha^2 beta^T G beta ; ||lam||^2 = alpha^2 (|z|^2 + 2 beta.c + beta^T G beta)
        bGb = (beta * (beta @ G)).sum(-1).clamp_min(0)
        lam2 = (zz + 2 * (beta * c).sum(-1) + bGb).clamp_min(0)
        weights = ungrouped(pw, (n,))
        value = ungrouped(val, ())
        reldev = ungrouped(bGb.sqrt() / lam2.sqrt(), ())
        n_iter = ungrouped(it, ())
        gnorm = ungrouped(gn, ())
        if return_lam:
            lam_out = ungrouped(alpha * (grouped(z, (d,)) + beta @ T), (d,))
    else:
        for start, fl, index in _chunks(batch, chunk_size, device):
            stop = start + fl.numel()
            tc = _take(t, index, 2) if nb else t.reshape(1, n, d)
            zcv = _take(z, index, 1) if nb else z.reshape(1, d)
            lc = _take(log_u, index, 1) if nb else log_u.reshape(1, n)
            lam, p, it, gn, val = _newton_full(tc, zcv, lc, alpha, tol, max_iter)
            flat(weights)[start:stop] = p
            flat(value)[start:stop] = val
            flat(reldev)[start:stop] = (lam - alpha * zcv).norm(dim=-1) / lam.norm(dim=-1)
            flat(n_iter)[start:stop] = it
            flat(gnorm)[start:stop] = gn
            if lam_out is not None:
                flat(lam_out)[start:stop] = lam

    znorm = z.norm(dim=-1).expand(batch) if nb else z.norm(dim=-1)
    rel = gnorm / znorm.clamp_min(torch.finfo(dtype).tiny)
    nosupport = torch.isnan(rel)  # u is zero on every template: no distribution to infer
    if bool(nosupport.any()):
        nan = torch.tensor(math.nan, dtype=dtype, device=device)
        value, reldev = torch.where(nosupport, nan, value), torch.where(nosupport, nan, reldev)
        if lam_out is not None:
            lam_out = torch.where(nosupport.unsqueeze(-1), nan, lam_out)
    converged = rel <= tol
    if warn and total > 0:
        bad = ~converged
        n_bad = int(bad.sum())
        if n_bad:
            n_nan = int(rel.isnan().sum())
            warnings.warn(
                f"fenchel_dual: {n_bad} of {total} problems did not reach tol={tol:g} in max_iter={max_iter} "
                f"Newton iterations ({n_nan} of them have no support: u is zero on every template). "
                "Raise max_iter, loosen tol, or compute in float64 (dtype=torch.float64).",
                RuntimeWarning,
                stacklevel=3,
            )
    return FenchelDualResult(
        lam=lam_out,
        weights=weights,
        value=value,
        relative_deviation=reldev,
        n_iter=n_iter,
        grad_norm=gnorm,
        rel_grad_norm=rel,
        converged=converged,
        method=method,
    )


def dual_objective(
    lam: torch.Tensor,
    t: torch.Tensor,
    z: torch.Tensor,
    u: torch.Tensor | None = None,
    alpha: float = 1.0,
    *,
    log_u: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluates g(lam) of eq. (7) and its gradient mu + z - lam / alpha - E_p[t]; shapes as
    :func:`fenchel_dual`, plus ``lam: (..., d)``. Differentiable; no dtype change."""
    n = t.shape[-2]
    if u is not None:
        log_u = torch.log(u)
    elif log_u is None:
        log_u = torch.zeros(n, dtype=t.dtype, device=t.device)
    log_u = log_u - torch.logsumexp(log_u, dim=-1, keepdim=True)
    u_ = torch.exp(log_u)
    mu = torch.einsum("...i,...id->...d", u_, t)
    s = log_u + torch.einsum("...id,...d->...i", t, lam)
    p = torch.softmax(s, dim=-1)
    value = (lam * (mu + z)).sum(-1) - (lam * lam).sum(-1) / (2 * alpha) - torch.logsumexp(s, dim=-1)
    grad = mu + z - lam / alpha - torch.einsum("...i,...id->...d", p, t)
    return value, grad


def gradient_ascent_dual(
    t: torch.Tensor,
    z: torch.Tensor,
    u: torch.Tensor | None = None,
    alpha: float = 1.0,
    *,
    log_u: torch.Tensor | None = None,
    tol: float = 1e-8,
    max_iter: int = 100_000,
    dtype: torch.dtype = torch.float64,
) -> FenchelDualResult:
    """Solves eq. (7) by plain gradient ascent, the method the paper uses (Section 8). Reference only.

    Fixed step 1 / L per problem with L = 1 / alpha + diam(T)^2 / 4, an upper bound on the curvature
    (Var_p <t, v> <= (range of <t, v>)^2 / 4 for a unit v). Started at lam = alpha z like
    :func:`fenchel_dual` and stopped at the same criterion. Batched over leading dims, but each problem
    is materialized: ``(*S, n, d)``.
    """
    t, z, log_u, batch = _prepare(t, z, u, log_u, alpha, dtype)
    n, d = t.shape[-2], t.shape[-1]
    T = t.expand(*batch, n, d)
    zb = z.expand(*batch, d)
    lu = log_u.expand(*batch, n)
    uu = torch.exp(lu)
    valid = uu > 0
    G = torch.einsum("...id,...jd->...ij", T, T)
    sq = torch.diagonal(G, dim1=-2, dim2=-1)
    dist2 = (sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2 * G).clamp_min(0)
    vv = valid.unsqueeze(-1) & valid.unsqueeze(-2)
    diam2 = torch.where(vv, dist2, torch.zeros_like(dist2)).amax(dim=(-2, -1))
    step = 1.0 / (1.0 / alpha + diam2 / 4)
    mu = torch.einsum("...i,...id->...d", uu, T)
    lam = alpha * zb.clone()
    znorm = zb.norm(dim=-1).clamp_min(torch.finfo(dtype).tiny)
    n_iter = torch.zeros(batch, dtype=torch.int64, device=t.device)
    for _ in range(max_iter):
        p = torch.softmax(lu + torch.einsum("...id,...d->...i", T, lam), dim=-1)
        grad = mu + zb - lam / alpha - torch.einsum("...i,...id->...d", p, T)
        todo = grad.norm(dim=-1) / znorm > tol
        if not bool(todo.any()):
            break
        lam = torch.where(todo.unsqueeze(-1), lam + step.unsqueeze(-1) * grad, lam)
        n_iter += todo.to(torch.int64)
    p = torch.softmax(lu + torch.einsum("...id,...d->...i", T, lam), dim=-1)
    value, grad = dual_objective(lam, T, zb, log_u=lu, alpha=alpha)
    gn = grad.norm(dim=-1)
    rel = gn / znorm
    return FenchelDualResult(
        lam=lam,
        weights=p,
        value=value,
        relative_deviation=(lam - alpha * zb).norm(dim=-1) / lam.norm(dim=-1),
        n_iter=n_iter,
        grad_norm=gn,
        rel_grad_norm=rel,
        converged=rel <= tol,
        method="gradient_ascent",
    )


def quadratic_approximation(
    t: torch.Tensor,
    z: torch.Tensor,
    u: torch.Tensor | None = None,
    alpha: float = 1.0,
    *,
    log_u: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """lam = alpha (I + alpha Sigma)^-1 z (eq. 13), exact when log M is quadratic; Sigma = Cov_u(t).

    Returns ``(*S, d)``. Solves a d x d system per problem: meant for checks, not for whole models."""
    t, z, log_u, batch = _prepare(t, z, u, log_u, alpha, dtype)
    uu = torch.exp(log_u)
    mu = torch.einsum("...i,...id->...d", uu, t)
    tc = t - mu.unsqueeze(-2)
    sigma = torch.einsum("...i,...id,...ie->...de", uu, tc, tc)
    d = t.shape[-1]
    A = torch.eye(d, dtype=dtype, device=t.device) + alpha * sigma
    return alpha * torch.linalg.solve(A, z.expand(*batch, d).unsqueeze(-1)).squeeze(-1)
