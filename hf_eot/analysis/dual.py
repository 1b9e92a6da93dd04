"""The Fenchel dual of attention's inference problem, solved exactly.

From "Deciphering Attention Mechanisms: Optimization and Fenchel Dual Solutions" (anonymous, under
review; no arXiv id), Sections 4-6. For one query of one head the primal problem is eq. (3),

    min_p  alpha/2 ||mu + z - E_p[t]||^2 + KL(p || u)      over distributions p on the templates t_i,

and its Fenchel dual is eq. (7),

    g(lam) = <lam, mu + z> - ||lam||^2 / (2 alpha) - log sum_i u_i exp(<t_i, lam>),   mu = sum_i u_i t_i.

g is strictly concave with Hessian -(I / alpha + Cov_p(t)), p the primal solution of eq. (9). The paper
approximates the maximizer lam* by alpha z (eq. 14); with lam = alpha z, p is exactly the attention row of
eq. (16). Its second-order approximation, eq. (13), lam_2 = alpha (I + alpha Sigma)^-1 z with
Sigma = Cov_u(t), is one Newton step of g from lam = 0 (grad g(0) = z, Hessian -(I / alpha + Sigma)), and
is computed here in the template span like the Newton steps.

:func:`fenchel_dual` runs Newton's method (:mod:`hf_eot.analysis.newton`) from lam = alpha z to
||grad g(lam)|| / ||z|| <= tol, i.e. until the gradient has shrunk by `tol` relative to its value at
lam = 0 (which is z). Options are a :class:`DualSettings`. Pure torch: no Transformers import.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .newton import newton_full, newton_span, span_solve
from .objective import normalized_log_u

__all__ = [
    "DualSettings",
    "FenchelDualResult",
    "fenchel_dual",
    "second_order_approximation",
]

METHODS = ("auto", "span", "full")
LINEAR_SOLVERS = ("auto", "cg", "cholesky")


@dataclass(frozen=True)
class DualSettings:
    """How :func:`fenchel_dual` solves the dual problem (7).

    Attributes:
        tol: relative gradient norm ||grad g|| / ||z|| to reach (> 0).
        max_iters: Newton iterations at most (>= 1).
        method: ``"auto"`` (span if n < d, else full), ``"span"`` (Newton in the n-dimensional template
            span) or ``"full"`` (Newton in R^d).
        linear_solver: how the span method solves its Newton systems: ``"cg"`` (conjugate gradients,
            matrix-free, every product with the Gram matrix one GEMM per template set), ``"cholesky"``
            (one factorization per problem) or ``"auto"``: CG when at least 8 problems share each
            template set, else Cholesky.
        chunk_size: problems solved at once (>= 1); None: at most 2048 (4096 with CG), fewer if
            `memory_budget` (bytes) requires.
        dtype: computation dtype (float64 recommended to reach tol = 1e-8).
        return_lam: build ``lam`` (``(*S, d)``); turn off to save memory.
        second_order: also compute ||lam* - lam_2|| / ||lam*|| for eq. (13)'s lam_2.
        warn: emit one ``RuntimeWarning`` when some problems did not converge.
    """

    tol: float = 1e-8
    max_iters: int = 100
    method: str = "auto"
    linear_solver: str = "auto"
    chunk_size: int | None = None
    memory_budget: int = 512 * 2**20
    dtype: torch.dtype = torch.float64
    return_lam: bool = True
    second_order: bool = False
    warn: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.linear_solver not in LINEAR_SOLVERS:
            raise ValueError(f"linear_solver must be one of {LINEAR_SOLVERS}, got {self.linear_solver!r}")
        if not (_is_real(self.tol) and self.tol > 0):
            raise ValueError(f"tol must be a finite number > 0, got {self.tol!r}")
        if not (_is_int(self.max_iters) and self.max_iters >= 1):
            raise ValueError(f"max_iters must be an int >= 1, got {self.max_iters!r}")
        if self.chunk_size is not None and not (_is_int(self.chunk_size) and self.chunk_size >= 1):
            raise ValueError(f"chunk_size must be None or an int >= 1, got {self.chunk_size!r}")
        if not (_is_int(self.memory_budget) and self.memory_budget >= 1):
            raise ValueError(f"memory_budget must be an int >= 1 (bytes), got {self.memory_budget!r}")
        if not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype, got {self.dtype!r}")


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclass
class FenchelDualResult:
    """The solution of the dual problem (7) for a batch of problems.

    All tensors carry the broadcast batch shape ``S`` of the inputs.

    Attributes:
        lam: ``(*S, d)`` the maximizer lambda* (``None`` when ``return_lam=False``).
        weights: ``(*S, n)`` the primal solution p* of eq. (9); zero where ``u`` is zero.
        value: ``(*S,)`` the dual value g(lambda*), which equals the primal minimum of eq. (3).
        relative_deviation: ``(*S,)`` ||lambda* - alpha z|| / ||lambda*|| (the paper's Fig. 4-8).
        second_order_deviation: ``(*S,)`` ||lambda* - lambda_2|| / ||lambda*|| with lambda_2 of eq. (13)
            (``None`` unless ``second_order=True``).
        n_iters: ``(*S,)`` Newton iterations each problem took.
        grad_norm: ``(*S,)`` ||grad g(lambda*)||.
        rel_grad_norm: ``(*S,)`` ||grad g(lambda*)|| / ||z||, the stopping criterion.
        converged: ``(*S,)`` whether ``rel_grad_norm <= tol`` was reached.
        method: ``"span"`` or ``"full"``.
    """

    lam: torch.Tensor | None
    weights: torch.Tensor
    value: torch.Tensor
    relative_deviation: torch.Tensor
    second_order_deviation: torch.Tensor | None
    n_iters: torch.Tensor
    grad_norm: torch.Tensor
    rel_grad_norm: torch.Tensor
    converged: torch.Tensor
    method: str


# --------------------------------------------------------------------------------------------------
# input handling


def _check_finite(name: str, x: torch.Tensor, allow_neg_inf: bool = False) -> None:
    bad = torch.isnan(x) | (x == math.inf) if allow_neg_inf else ~torch.isfinite(x)
    if bool(bad.any()):
        what = "NaN or +inf" if allow_neg_inf else "NaN or inf"
        raise ValueError(
            f"{name} contains {what} at {int(bad.sum())} of {x.numel()} entries (first at index "
            f"{tuple(int(i) for i in bad.nonzero()[0])}); the dual problem needs finite {name}"
        )


def _prepare(
    t: torch.Tensor,
    z: torch.Tensor,
    u: torch.Tensor | None,
    log_u: torch.Tensor | None,
    alpha: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Size]:
    """Validates the inputs, casts to `dtype`, returns (t, z, normalized log_u, batch shape)."""
    for name, x in (("t", t), ("z", z), ("u", u), ("log_u", log_u)):
        if x is not None and not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if t.dim() < 2:
        raise ValueError(f"t must have shape (..., n, d), got {tuple(t.shape)}")
    n, d = t.shape[-2], t.shape[-1]
    if n == 0 or d == 0:
        raise ValueError(f"t must have at least one template of positive dimension, got {tuple(t.shape)}")
    if z.dim() < 1 or z.shape[-1] != d:
        raise ValueError(f"z must have shape (..., d) with d = {d} (from t), got {tuple(z.shape)}")
    if not (_is_real(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if u is not None and log_u is not None:
        raise ValueError("pass at most one of u and log_u")
    weights_name = "u" if u is not None else "log_u"
    weights = u if u is not None else log_u
    if weights is not None and weights.shape[-1] != n:
        raise ValueError(
            f"{weights_name} must have shape (..., n) with n = {n} (from t), got {tuple(weights.shape)}"
        )
    shapes = {"t": tuple(t.shape[:-2]), "z": tuple(z.shape[:-1])}
    if weights is not None:
        shapes[weights_name] = tuple(weights.shape[:-1])
    try:
        batch = torch.broadcast_shapes(*shapes.values())
    except RuntimeError:
        raise ValueError(
            "the batch dims of the inputs do not broadcast: "
            + ", ".join(f"{k} {v}" for k, v in shapes.items())
            + " (t is (..., n, d), z (..., d), u / log_u (..., n))"
        ) from None
    if math.prod(batch) == 0:
        raise ValueError(
            "the batch is empty: " + ", ".join(f"{k} has batch shape {v}" for k, v in shapes.items())
        )
    _check_finite("t", t)
    _check_finite("z", z)
    if u is not None:
        _check_finite("u", u)
        if bool((u < 0).any()):
            raise ValueError("u must be non-negative")
    if log_u is not None:
        _check_finite("log_u", log_u, allow_neg_inf=True)
    t, z = t.to(dtype), z.to(dtype)
    return t, z, normalized_log_u(n, u, log_u, t), batch


def _pad_left(x: torch.Tensor, batch_ndim: int, event_ndim: int) -> torch.Tensor:
    extra = batch_ndim - (x.dim() - event_ndim)
    return x.reshape((1,) * extra + tuple(x.shape)) if extra > 0 else x


class _SpanLayout:
    """Problems grouped by template set: batch dims where t has size > 1 index groups (each with its own
    Gram matrix G = T T^T), the other batch dims enumerate the P problems of a group. Nothing of size
    (*S, n, d) is materialized."""

    def __init__(self, t: torch.Tensor, batch: torch.Size) -> None:
        nb = len(batch)
        n, d = t.shape[-2:]
        tb = _pad_left(t, nb, 2)
        gdims = [k for k in range(nb) if tb.shape[k] > 1]
        pdims = [k for k in range(nb) if tb.shape[k] == 1]
        self.batch, self.perm = batch, gdims + pdims
        self.gshape, self.pshape = [batch[k] for k in gdims], [batch[k] for k in pdims]
        self.NG, self.P = math.prod(self.gshape), math.prod(self.pshape)
        self.T = tb.reshape(self.NG, n, d)  # size-1 dims drop out; the group dims keep their order
        self.G = self.T @ self.T.mT

    def grouped(self, x: torch.Tensor, event: tuple[int, ...]) -> torch.Tensor:
        """``(*S', *event)`` broadcastable to S -> ``(NG, P, *event)``."""
        nb = len(self.batch)
        x = _pad_left(x, nb, len(event)).expand(tuple(self.batch) + tuple(event))
        x = x.permute(tuple(self.perm) + tuple(range(nb, nb + len(event))))
        return x.reshape((self.NG, self.P) + tuple(event))

    def ungrouped(self, x: torch.Tensor, event: tuple[int, ...]) -> torch.Tensor:
        """``(NG, P, *event)`` -> ``(*S, *event)``."""
        nb = len(self.batch)
        x = x.reshape(tuple(self.gshape) + tuple(self.pshape) + tuple(event))
        inv = [self.perm.index(k) for k in range(nb)]
        return x.permute(tuple(inv) + tuple(range(nb, nb + len(event))))

    def chunks(self, chunk_size: int):
        """Slices (groups, problems) of at most about `chunk_size` problems."""
        gpc = max(1, chunk_size // max(self.P, 1))  # groups per chunk
        pc = min(self.P, chunk_size) if gpc == 1 else self.P  # one huge group is split
        for g0 in range(0, self.NG, gpc):
            for p0 in range(0, self.P, pc):
                yield slice(g0, min(self.NG, g0 + gpc)), slice(p0, min(self.P, p0 + pc))


def _second_order_span(G: torch.Tensor, c: torch.Tensor, log_u: torch.Tensor, alpha: float, solver: str):
    """beta_2 with lam_2 = alpha (z + T^T beta_2) = alpha (I + alpha Sigma)^-1 z (eq. 13):
    (I + alpha Cov_u G) beta_2 = -alpha Cov_u c. ``G: (g, n, n)``, ``c, log_u: (g, P, n)``."""
    u = torch.exp(log_u)
    cov_u_c = u * c - u * (u * c).sum(-1, keepdim=True)
    active = torch.isfinite(log_u).any(-1)
    u = torch.where(active.unsqueeze(-1), u, torch.zeros_like(u))
    b = torch.where(active.unsqueeze(-1), -alpha * cov_u_c, torch.zeros_like(c))
    return span_solve(G, u, b, alpha, active, linear_solver=solver)


def _second_order_dense(t: torch.Tensor, z: torch.Tensor, log_u: torch.Tensor, alpha: float) -> torch.Tensor:
    """lam_2 = alpha (I + alpha Sigma)^-1 z (eq. 13) by a d x d solve per problem; normalized ``log_u``.
    ``t: (N, n, d)``, ``z: (N, d)`` -> ``(N, d)``."""
    u = torch.exp(log_u)
    tc = t - torch.einsum("...i,...id->...d", u, t).unsqueeze(-2)
    sigma = torch.einsum("...i,...id,...ie->...de", u, tc, tc)
    A = torch.eye(t.shape[-1], dtype=t.dtype, device=t.device) + alpha * sigma
    return alpha * torch.linalg.solve(A, z.unsqueeze(-1)).squeeze(-1)


def _take(x: torch.Tensor, index: tuple[torch.Tensor, ...], event_ndim: int) -> torch.Tensor:
    """``x[(*S, *event)]`` at the unravelled flat batch positions `index` (size-1 dims read at 0)."""
    x = _pad_left(x, len(index), event_ndim)
    return x[tuple(ix if x.shape[k] > 1 else torch.zeros_like(ix) for k, ix in enumerate(index))]


# --------------------------------------------------------------------------------------------------
# public API


def _settings(settings: DualSettings | None, options: dict) -> DualSettings:
    settings = DualSettings() if settings is None else settings
    if not isinstance(settings, DualSettings):
        raise ValueError(f"settings must be a DualSettings, got {type(settings).__name__}")
    unknown = set(options) - {f.name for f in dataclasses.fields(DualSettings)}
    if unknown:
        valid = [f.name for f in dataclasses.fields(DualSettings)]
        raise ValueError(f"unknown option(s) {sorted(unknown)}; valid options (DualSettings fields): {valid}")
    return dataclasses.replace(settings, **options) if options else settings


@torch.no_grad()
def fenchel_dual(
    t: torch.Tensor,
    z: torch.Tensor,
    u: torch.Tensor | None = None,
    alpha: float = 1.0,
    *,
    log_u: torch.Tensor | None = None,
    settings: DualSettings | None = None,
    **options,
) -> FenchelDualResult:
    """Solves max_lam <lam, mu + z> - ||lam||^2 / (2 alpha) - log sum_i u_i exp(<t_i, lam>) (eq. 7).

    Newton's method with a backtracking line search, started at lam = alpha z (eq. 14) and run to
    ||grad g|| / ||z|| <= ``settings.tol``. For n < d it works in the n-dimensional span of the templates
    (lam = alpha (z + T^T beta)), where one Newton step costs O(n^3) instead of O(d^3) and is the same step.

    Args:
        t: ``(..., n, d)`` templates. Broadcasts against the batch dims of `z` and `u` without being
            copied, so one sequence's templates serve all its heads and queries
            (``t: (B, 1, 1, n, d)``, ``z: (B, H, Q, d)``). Finite, also where u is zero.
        z: ``(..., d)`` evidence, finite.
        u: ``(..., n)`` non-negative preference weights (normalized here; zero = masked template).
            ``None`` means uniform.
        alpha: strength alpha > 0 of the evidence term.
        log_u: alternative to `u`: ``(..., n)`` unnormalized log-weights, ``-inf`` for masked templates
            (T5's position bias is naturally a log-weight).
        settings: a :class:`DualSettings` (default ``DualSettings()``).
        **options: :class:`DualSettings` fields that override `settings`, e.g. ``tol=1e-10``.

    Returns:
        a :class:`FenchelDualResult` with the broadcast batch shape of the inputs. Not differentiable.

    Raises:
        ValueError: bad shapes, non-broadcasting or empty batches, non-finite t / z / u (log_u may be
            -inf), alpha <= 0, or invalid settings.
    """
    settings = _settings(settings, options)
    dtype = settings.dtype
    t, z, log_u, batch = _prepare(t, z, u, log_u, alpha, dtype)
    alpha = float(alpha)
    n, d = t.shape[-2], t.shape[-1]
    method = settings.method if settings.method != "auto" else ("span" if n < d else "full")
    nb = len(batch)
    total = math.prod(batch)
    device = t.device
    linear_solver = settings.linear_solver
    if linear_solver == "auto":  # CG pays off when many problems share one Gram matrix
        shared = math.prod(batch[k] for k in range(nb) if _pad_left(t, nb, 2).shape[k] == 1)
        linear_solver = "cg" if shared >= 8 else "cholesky"
    if method == "full":
        per_problem, cap = 6 * d * d + 4 * n * d + 8 * n, 2048
    elif linear_solver == "cg":
        per_problem, cap = 30 * n + 4 * d, 4096
    else:
        per_problem, cap = 6 * n * n + 8 * n + 4 * d, 2048
    chunk_size = settings.chunk_size
    if chunk_size is None:  # moderate chunks keep the working arrays in cache; the budget caps large ones
        itemsize = torch.finfo(dtype).bits // 8
        chunk_size = max(1, min(cap, settings.memory_budget // (per_problem * itemsize)))

    lam_out = None
    second = None
    if method == "span":
        lay = _SpanLayout(t, batch)
        G = lay.G
        c = lay.grouped(torch.einsum("...id,...d->...i", t, z), (n,))  # einsum does not expand t
        lu = lay.grouped(log_u, (n,))
        zz = lay.grouped((z * z).sum(-1), ())
        beta = torch.empty(lay.NG, lay.P, n, dtype=dtype, device=device)
        pw, beta2 = torch.empty_like(beta), torch.empty_like(beta)
        it = torch.empty(lay.NG, lay.P, dtype=torch.int64, device=device)
        gn = torch.empty(lay.NG, lay.P, dtype=dtype, device=device)
        val = torch.empty_like(gn)
        for gs, ps in lay.chunks(chunk_size):
            sl = (gs, ps)
            out = newton_span(
                G[gs], c[sl], lu[sl], zz[sl], alpha, settings.tol, settings.max_iters, linear_solver
            )
            beta[sl], pw[sl], it[sl], gn[sl], val[sl] = out
            if settings.second_order:
                beta2[sl] = _second_order_span(G[gs], c[sl], lu[sl], alpha, linear_solver)
        # ||lam - alpha z||^2 = alpha^2 beta^T G beta ; ||lam||^2 = alpha^2 (|z|^2 + 2 beta.c + beta^T G beta)
        bGb = (beta * (beta @ G)).sum(-1).clamp_min(0)
        lam_norm = (zz + 2 * (beta * c).sum(-1) + bGb).clamp_min(0).sqrt()
        weights, value = lay.ungrouped(pw, (n,)), lay.ungrouped(val, ())
        reldev = lay.ungrouped(bGb.sqrt() / lam_norm, ())
        n_iters, gnorm = lay.ungrouped(it, ()), lay.ungrouped(gn, ())
        if settings.second_order:
            diff = beta - beta2
            second = lay.ungrouped((diff * (diff @ G)).sum(-1).clamp_min(0).sqrt() / lam_norm, ())
        if settings.return_lam:
            lam_out = lay.ungrouped(alpha * (lay.grouped(z, (d,)) + beta @ lay.T), (d,))
    else:
        weights = torch.empty((*batch, n), dtype=dtype, device=device)
        value, reldev, gnorm = (torch.empty(batch, dtype=dtype, device=device) for _ in range(3))
        n_iters = torch.empty(batch, dtype=torch.int64, device=device)
        second = torch.empty(batch, dtype=dtype, device=device) if settings.second_order else None
        lam_out = torch.empty((*batch, d), dtype=dtype, device=device) if settings.return_lam else None
        flat: Callable[[torch.Tensor], torch.Tensor] = lambda x: x.reshape(-1, *x.shape[nb:])  # noqa: E731
        for start in range(0, total, chunk_size):
            idx = torch.arange(start, min(start + chunk_size, total), device=device)
            index = torch.unravel_index(idx, tuple(batch)) if nb else ()
            stop = start + idx.numel()
            tc = _take(t, index, 2) if nb else t.reshape(1, n, d)
            zc = _take(z, index, 1) if nb else z.reshape(1, d)
            lc = _take(log_u, index, 1) if nb else log_u.reshape(1, n)
            lam, p, it, gn, val = newton_full(tc, zc, lc, alpha, settings.tol, settings.max_iters)
            lam_norm = lam.norm(dim=-1)
            flat(weights)[start:stop], flat(value)[start:stop] = p, val
            flat(reldev)[start:stop] = (lam - alpha * zc).norm(dim=-1) / lam_norm
            flat(n_iters)[start:stop], flat(gnorm)[start:stop] = it, gn
            if second is not None:
                flat(second)[start:stop] = (lam - _second_order_dense(tc, zc, lc, alpha)).norm(
                    dim=-1
                ) / lam_norm
            if lam_out is not None:
                flat(lam_out)[start:stop] = lam

    znorm = z.norm(dim=-1).expand(batch) if nb else z.norm(dim=-1)
    rel = gnorm / znorm.clamp_min(torch.finfo(dtype).tiny)
    nosupport = torch.isnan(rel)  # u is zero on every template: no distribution to infer
    if bool(nosupport.any()):
        nan = torch.tensor(math.nan, dtype=dtype, device=device)
        value, reldev = torch.where(nosupport, nan, value), torch.where(nosupport, nan, reldev)
        if second is not None:
            second = torch.where(nosupport, nan, second)
        if lam_out is not None:
            lam_out = torch.where(nosupport.unsqueeze(-1), nan, lam_out)
    converged = rel <= settings.tol
    if settings.warn:
        n_bad = int((~converged).sum())
        if n_bad:
            warnings.warn(
                f"fenchel_dual: {n_bad} of {total} problems did not reach tol={settings.tol:g} in "
                f"max_iters={settings.max_iters} Newton iterations ({int(nosupport.sum())} of them have no "
                "support: u is zero on every template). Raise max_iters, loosen tol, or compute in float64.",
                RuntimeWarning,
                stacklevel=3,
            )
    return FenchelDualResult(
        lam=lam_out,
        weights=weights,
        value=value,
        relative_deviation=reldev,
        second_order_deviation=second,
        n_iters=n_iters,
        grad_norm=gnorm,
        rel_grad_norm=rel,
        converged=converged,
        method=method,
    )


@torch.no_grad()
def second_order_approximation(
    t: torch.Tensor,
    z: torch.Tensor,
    u: torch.Tensor | None = None,
    alpha: float = 1.0,
    *,
    log_u: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """lam_2 = alpha (I + alpha Sigma)^-1 z, Sigma = Cov_u(t): eq. (13), the maximizer of the dual (7)
    with log M replaced by its second-order expansion (12); exact when u is Gaussian.

    Computed in the template span (an n x n solve per problem), broadcasting like :func:`fenchel_dual`.
    Returns ``(*S, d)``; NaN where u has no support."""
    t, z, log_u, batch = _prepare(t, z, u, log_u, alpha, dtype)
    alpha = float(alpha)
    n, d = t.shape[-2:]
    if not len(batch):
        t, z, log_u, batch = t[None], z[None], log_u[None], torch.Size([1])
        return second_order_approximation(t, z, log_u=log_u, alpha=alpha, dtype=dtype)[0]
    lay = _SpanLayout(t, batch)
    c = lay.grouped(torch.einsum("...id,...d->...i", t, z), (n,))
    beta2 = _second_order_span(lay.G, c, lay.grouped(log_u, (n,)), alpha, "cholesky")
    lam = lay.ungrouped(alpha * (lay.grouped(z, (d,)) + beta2 @ lay.T), (d,))
    nosupport = ~torch.isfinite(log_u).any(-1).expand(batch)
    return torch.where(nosupport.unsqueeze(-1), torch.full_like(lam, math.nan), lam)
