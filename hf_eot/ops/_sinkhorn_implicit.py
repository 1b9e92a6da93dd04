"""Converged Sinkhorn: over-relaxed solver (scaling or log domain) and the implicit backward.

Private to :mod:`hf_eot.ops.sinkhorn`.  Notation: ``F = scores / epsilon`` of shape ``(..., Q, K)``
with ``-inf`` on masked entries, row potentials ``f`` (``(..., Q)``), column potentials ``g``
(``(..., K)``), plan ``P = exp(F + f[:, None] + g[None, :])``, row target ``a = 1`` on valid rows,
column target ``b = n_valid_queries / n_valid_keys`` on valid columns (0 on invalid lines).

Half-steps are written through two log-sum-exps, ``row_lse(g)_i = log sum_j exp(F_ij + g_j)`` and
``col_lse(f)_j = log sum_i exp(F_ij + f_i)``; a row update is ``f = log a - row_lse(g)``.  Two
implementations: :class:`_ScalingOps` (one ``exp`` of the balanced kernel, then matrix-vector
products) and :class:`_LogOps` (a log-sum-exp over ``Q x K`` per half-step, safe for any scores).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._masking import masked_logsumexp

# Rows per block of the blocked column sums (float32 products within a block, float64 across blocks)
_COLSUM_BLOCK = 32

# Largest over-relaxation factor: the local rate of SOR-Sinkhorn is omega - 1 at the optimal omega.
_OMEGA_MAX = 1.9


def _where_valid(x: Tensor, valid: Tensor | None, fill: float = 0.0) -> Tensor:
    return x if valid is None else torch.where(valid, x, fill)


def _column_sums(w: Tensor, kb: Tensor) -> Tensor:
    """``w @ kb`` (``(..., Q) @ (..., Q, K) -> (..., K)``) accurate to a few ulps for any ``Q``.

    A float32 matrix-vector product accumulates ``Q`` terms in float32 (error ~ ``sqrt(Q)`` ulps,
    about 1e-6 relative at ``Q = 512``: the floor of the column-marginal error).  Products over
    blocks of ``_COLSUM_BLOCK`` rows are summed in float64 instead, at the cost of one product.
    """
    if kb.dtype == torch.float64:
        return torch.matmul(w.unsqueeze(-2), kb).squeeze(-2)
    n_q, n_k = kb.shape[-2], kb.shape[-1]
    m = n_q - n_q % _COLSUM_BLOCK
    out = torch.zeros(kb.shape[:-2] + (n_k,), dtype=torch.float64, device=kb.device)
    if m:
        wb = w[..., :m].reshape(w.shape[:-1] + (m // _COLSUM_BLOCK, 1, _COLSUM_BLOCK))
        kbb = kb[..., :m, :].reshape(kb.shape[:-2] + (m // _COLSUM_BLOCK, _COLSUM_BLOCK, n_k))
        out = out + torch.matmul(wb, kbb).squeeze(-2).sum(dim=-2, dtype=torch.float64)
    if m < n_q:
        out = out + torch.matmul(w[..., m:].unsqueeze(-2), kb[..., m:, :]).squeeze(-2)
    return out


class _LogOps:
    """Log-domain half-steps: exact for any scores (``O(Q K)`` exponentials per half-step)."""

    def __init__(self, f: Tensor, row_valid: Tensor | None, col_valid: Tensor | None) -> None:
        self.f, self.row_valid, self.col_valid = f, row_valid, col_valid
        self.vdtype = f.dtype  # dtype of the potentials

    def initial_g(self) -> Tensor:
        return self.f.new_zeros(self.f.shape[:-2] + self.f.shape[-1:]).detach()  # (..., K)

    def row_lse(self, g: Tensor) -> Tensor:
        return masked_logsumexp(self.f + g.unsqueeze(-2), self.row_valid, dim=-1)  # (..., Q)

    def col_lse(self, f: Tensor) -> Tensor:
        return masked_logsumexp(self.f + f.unsqueeze(-1), self.col_valid, dim=-2)  # (..., K)

    def plan(self, g: Tensor) -> tuple[Tensor, Tensor]:
        """Row-normalised plan ``softmax_k(F + g)`` (rows sum to 1 whatever the scale of the scores;
        0 on invalid rows) and the matching row potentials ``f``."""
        z = self.f + g.unsqueeze(-2)  # (..., Q, K)
        m = z.detach().amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, 0.0)
        if torch.is_grad_enabled():  # differentiable (unrolled gradients)
            p = torch.exp(z - m)
        else:  # inside the implicit Function: in place
            p = torch.exp_(z.sub_(m))
        s = p.sum(dim=-1, keepdim=True)
        s = _where_valid(s, None if self.row_valid is None else self.row_valid.unsqueeze(-1), 1.0)
        f = _where_valid(-(m + torch.log(s)).squeeze(-1), self.row_valid)
        return (p / s if torch.is_grad_enabled() else p.div_(s)), f


class _ScalingOps:
    """Scaling-domain half-steps with the balanced kernel ``Kb = exp(F - c[:, None] - d[None, :])``.

    ``c`` is the row max of ``F`` and ``d`` the column max of ``F - c``, so every valid row and
    column of ``Kb`` has an entry exactly 1 and all entries are ``<= 1``; then
    ``row_lse(g) = c + log(Kb @ exp(d + g))`` and ``col_lse(f) = d + log(exp(c + f) @ Kb)``.
    Safe while no valid entry of ``Kb`` underflows (:meth:`is_safe`) and the scalings
    ``exp(c + f)``, ``exp(d + g)`` stay in range (checked by the solver).  The kernel is kept in
    the compute dtype; the potentials (vectors) in float64, so that their round-off (``|g| * ulp``)
    does not limit the marginal error of float32 problems.
    """

    vdtype = torch.float64

    def __init__(self, f: Tensor, row_valid: Tensor | None, col_valid: Tensor | None, mask: Tensor | None) -> None:
        self.row_valid, self.col_valid, self.mask = row_valid, col_valid, mask
        c = f.amax(dim=-1, keepdim=True)  # (..., Q, 1)
        c = torch.where(torch.isfinite(c), c, 0.0)
        kb = f - c  # (..., Q, K), balanced in the log domain first: any row/column shift is absorbed
        d = kb.amax(dim=-2, keepdim=True)  # (..., 1, K)
        d = torch.where(torch.isfinite(d), d, 0.0)
        self.kb = kb.sub_(d).exp_()  # the one exponential
        # (..., K, Q) copy: row sums become column sums, accumulated blockwise like them
        self.kbt = self.kb.transpose(-1, -2).contiguous() if self.kb.dtype != torch.float64 else None
        self.c = c.squeeze(-1).to(self.vdtype)
        self.d = d.squeeze(-2).to(self.vdtype)

    def initial_g(self) -> Tensor:
        """Column potentials ``-d``: scalings 1 against the balanced kernel (``g = 0`` would put
        ``exp(d + g)`` out of range when columns are shifted by large constants)."""
        return _where_valid(-self.d, self.col_valid)

    def is_safe(self) -> bool:
        """No valid kernel entry below ``tiny ** 0.75`` (host sync): scalings then stay in range."""
        kmin = self.kb if self.mask is None else torch.where(self.mask, self.kb, 1.0)
        return bool(kmin.amin() >= torch.finfo(self.kb.dtype).tiny ** 0.75) if kmin.numel() else True

    def out_of_range(self, f: Tensor, g: Tensor) -> Tensor:
        """0-dim bool tensor (no host sync): a log-scaling ``c + f`` or ``d + g`` is not finite or beyond
        half the log of the kernel dtype's largest value (so that their exponentials, and products of two
        of them, stay in range)."""
        if not f.numel() or not g.numel():
            return torch.zeros((), dtype=torch.bool, device=f.device)
        worst = torch.maximum((self.c + f).abs().amax(), (self.d + g).abs().amax())
        return ~(worst <= 0.5 * math.log(torch.finfo(self.kb.dtype).max))  # True for NaN

    def _scaling(self, pot: Tensor) -> Tensor:
        return torch.exp(pot).to(self.kb.dtype)

    def row_lse(self, g: Tensor) -> Tensor:
        v = self._scaling(self.d + g)  # (..., K)
        if self.kbt is None:
            s = torch.matmul(self.kb, v.unsqueeze(-1)).squeeze(-1)  # (..., Q)
        else:
            s = _column_sums(v, self.kbt)  # (..., Q) in float64
        return _where_valid(self.c + torch.log(s.to(self.vdtype)), self.row_valid)

    def col_lse(self, f: Tensor) -> Tensor:
        s = _column_sums(self._scaling(self.c + f), self.kb)  # (..., K), float64 for float32 kernels
        return _where_valid(self.d + torch.log(s.to(self.vdtype)), self.col_valid)

    def plan(self, g: Tensor) -> tuple[Tensor, Tensor]:
        """Row-normalised plan ``Kb * exp(d + g)`` / row sums, built in place of the kernel."""
        self.kbt = None
        p = self.kb.mul_(self._scaling(self.d + g).unsqueeze(-2))
        s = p.sum(dim=-1, keepdim=True).to(self.vdtype)  # cascade summation along the row
        s = _where_valid(s, None if self.row_valid is None else self.row_valid.unsqueeze(-1), 1.0)
        f = _where_valid(-(self.c + torch.log(s).squeeze(-1)), self.row_valid)
        return p.div_(s.to(p.dtype)), f.to(p.dtype)


class Targets:
    """Row and column targets of a batch of problems, as logs (0 on invalid lines: unused there)."""

    def __init__(self, row_valid: Tensor | None, col_valid: Tensor | None, b: Tensor | float) -> None:
        self.row_valid, self.col_valid, self.b = row_valid, col_valid, b
        self.log_b = math.log(b) if isinstance(b, float) else torch.log(b)

    def row(self, row_lse: Tensor) -> Tensor:
        return _where_valid(-row_lse, self.row_valid)

    def col(self, col_lse: Tensor) -> Tensor:
        return _where_valid(self.log_b - col_lse, self.col_valid)

    def col_error(self, g: Tensor, col_lse: Tensor) -> Tensor:
        """Max abs column-sum error ``|exp(g + col_lse) - b|`` over valid columns, ``(...,)``."""
        err = _where_valid((torch.exp(g + col_lse) - self.b).abs(), self.col_valid)
        return err.amax(dim=-1) if err.shape[-1] else err.sum(dim=-1)


def plan_col_error(p: Tensor, targets: Targets) -> Tensor:
    """Max abs error of the column sums of a plan over its valid columns, ``(...,)``."""
    sums = _column_sums(torch.ones_like(p[..., 0]), p)  # (..., K), float64 across row blocks
    err = _where_valid((sums - targets.b).abs().to(p.dtype), targets.col_valid)
    return err.amax(dim=-1) if err.shape[-1] else err.sum(dim=-1)


def fixed_iterations(ops: _LogOps | _ScalingOps, targets: Targets, g: Tensor, n_iters: int) -> Tensor:
    """``n_iters`` plain Sinkhorn iterations (row update, then column update) from ``g``; no host sync."""
    for _ in range(n_iters):
        f = targets.row(ops.row_lse(g))
        g = targets.col(ops.col_lse(f))
    return g


def _relax(old: Tensor, new: Tensor, omega: Tensor) -> Tensor:
    return old + omega.unsqueeze(-1) * (new - old)


def over_relaxed_solve(
    ops: _LogOps | _ScalingOps,
    targets: Targets,
    *,
    tol: float,
    max_iters: int,
    check_every: int,
    fallback: _LogOps | None,
) -> tuple[Tensor, int, _LogOps | _ScalingOps]:
    """Over-relaxed Sinkhorn (SOR) until every column-marginal error is ``<= tol``.

    Returns the column potentials (in ``ops.vdtype``), the number of iterations and the half-step implementation in use
    at the end (for the final plan).

    Each iteration is ``g <- g + omega (log b - col_lse(f) - g)`` then ``f <- log a - row_lse(g)``
    (the row update is exact at every check so that the checked error is the one of the
    row-normalised plan).  ``omega`` is per problem, 1 for the first block, then set from the
    observed contraction ``mu`` per iteration with Young's relation for 2-cyclic iterations
    ``(mu + omega - 1)^2 = mu omega^2 eta`` (``eta``: rate of plain Sinkhorn) to the optimum
    ``omega* = 2 / (1 + sqrt(1 - eta))`` ("Overrelaxed Sinkhorn-Knopp algorithm for regularized
    optimal transport", Thibault et al., arXiv:1711.01851; "A note on overrelaxation in the Sinkhorn
    algorithm", Lehmann et al., arXiv:2012.12562), halved towards 1 when the error grows.

    Starts from ``ops.initial_g()``.  Host syncs only at the checks.  ``fallback`` (log-domain ops) takes over from the last checked
    state if the scaling-domain iterates leave the floating-point range.
    """
    g = ops.initial_g()
    omega = torch.ones(g.shape[:-1], dtype=g.dtype, device=g.device)  # (...,)
    f = targets.row(ops.row_lse(g))
    prev_err: Tensor | None = None
    g_ok, steps, done = g, check_every, 0
    while True:
        col = ops.col_lse(f)
        err = targets.col_error(g, col)  # (...,)
        worst = err.amax() if err.numel() else err.new_zeros(())
        bad = ~torch.isfinite(worst)
        if isinstance(ops, _ScalingOps):
            bad = bad | ops.out_of_range(f, g)
        worst_v, bad_v = torch.stack([worst, bad.to(worst.dtype)]).tolist()  # the one host sync
        if bad_v and fallback is not None:  # restart in the log domain from the last checked state
            ops, fallback, g, prev_err = fallback, None, g_ok.to(fallback.vdtype), None
            f = targets.row(ops.row_lse(g))
            omega = torch.ones_like(omega, dtype=g.dtype)
            continue
        if worst_v <= tol or done >= max_iters:
            return g, done, ops
        if prev_err is not None:
            # a problem already solved to round-off (err = 0, e.g. exactly in float32) gives mu = 0 and
            # 0 / 0 in Young's relation: only problems with a measured contraction 0 < mu < 1 are tuned
            mu = (err / prev_err.clamp(min=torch.finfo(err.dtype).tiny)).pow(1.0 / steps)
            measured = (mu > 0) & (mu < 1)
            mu_safe = torch.where(measured, mu, 0.5)
            eta = ((mu_safe + omega - 1).square() / (mu_safe * omega.square())).clamp(0.0, 1.0 - 1e-6)
            tuned = (2.0 / (1.0 + torch.sqrt(1.0 - eta))).clamp(1.0, _OMEGA_MAX)
            omega = torch.where(measured, tuned, torch.where(mu == 0, omega, 1.0 + (omega - 1.0) / 2))
        prev_err, g_ok = err, g
        steps = min(check_every, max_iters - done)
        for k in range(steps):
            if k:
                col = ops.col_lse(f)
            g = _relax(g, targets.col(col), omega)
            f_new = targets.row(ops.row_lse(g))
            f = f_new if k == steps - 1 else _relax(f, f_new, omega)
        done += steps


def _cg_schur(p: Tensor, c: Tensor, rhs: Tensor, *, tol: float, max_iters: int, sync: bool) -> Tensor:
    """Solves ``(diag(c) - P^T P) z = rhs`` by conjugate gradients, batched over ``...``.

    The matrix is the Schur complement of the Hessian of the Sinkhorn dual
    ``[[diag(P 1), P], [P^T, diag(c)]]`` with ``P 1 = 1`` on valid rows (``P`` is 0 on invalid
    ones) and ``c = P^T 1``.  It is positive semi-definite (``sum_ij P_ij (w_i + z_j)^2 >= 0``) even
    for a plan that is not converged; its kernel (constant vectors on the valid columns of each connected
    block) is orthogonal to ``rhs``, and CG started at 0 stays in its orthogonal complement, so no
    gauge needs fixing.  A shift ``machine_eps * max(c)`` on the diagonal bounds the solution when
    the plan nearly splits into disconnected blocks (extreme scores), where round-off in ``rhs``
    would otherwise be amplified by the near-zero eigenvalues; it changes well-conditioned solutions
    by a relative ``machine_eps / lambda_min``.  Stops when ``|r| <= tol |rhs|`` for every problem (checked every 5
    iterations: host sync) or after ``max_iters``; with ``sync=False`` runs ``max_iters`` iterations
    (finished problems are frozen by their zero step), as needed under ``torch.compile``.
    """

    diag = c + torch.finfo(c.dtype).eps * c.amax(dim=-1, keepdim=True)  # (..., K)

    def matvec(z: Tensor) -> Tensor:
        pz = torch.matmul(p, z.unsqueeze(-1))  # (..., Q, 1)
        return diag * z - torch.matmul(pz.transpose(-1, -2), p).squeeze(-2)

    z = torch.zeros_like(rhs)
    r = rhs.clone()
    d = r.clone()
    rr = (r * r).sum(-1, keepdim=True)  # (..., 1)
    stop = (tol * tol) * rr
    for it in range(max_iters):
        if sync and it % 5 == 0 and bool((rr <= stop).all()):
            break
        sd = matvec(d)
        dsd = (d * sd).sum(-1, keepdim=True)
        active = (rr > stop) & (dsd > 0)
        alpha = torch.where(active, rr / torch.where(active, dsd, 1.0), 0.0)
        z = z + alpha * d
        r = r - alpha * sd
        rr_new = (r * r).sum(-1, keepdim=True)
        beta = torch.where(active, rr_new / torch.where(active, rr, 1.0), 0.0)
        d = r + beta * d
        rr = torch.where(active, rr_new, rr)
    return z


def implicit_plan_vjp(p: Tensor, grad_p: Tensor, *, cg_max_iters: int, sync: bool) -> Tensor:
    """Vector-Jacobian product of the converged plan w.r.t. ``F`` by implicit differentiation.

    The optimality conditions ``P 1 = a``, ``P^T 1 = b`` with ``P = exp(F + f 1^T + 1 g^T)`` give,
    for ``L = <G, P>``, ``dL/dF = P * (G - w 1^T - 1 z^T)`` where ``(w, z)`` solves
    ``[[diag(a), P], [P^T, diag(b)]] (w, z) = ((G * P) 1, (G * P)^T 1)``.  Eliminating
    ``w = x - P z`` (``x = (G * P) 1``, ``a = 1`` on valid rows) leaves the Schur system
    ``(diag(b) - P^T P) z = (G * P)^T 1 - P^T x``, solved by conjugate gradients.  ``b`` is taken
    as the plan's own column sums ``c = P^T 1`` (equal to ``b`` up to the marginal error): the
    system is then positive semi-definite for any plan, and the result is the exact derivative of
    the problem whose column target is ``c``.  Costs
    ``O(Q K)`` per CG iteration and memory for a few ``Q x K`` tensors, whatever the number of
    forward iterations.  ``(w, z)`` is defined up to ``(t, -t)``, which leaves ``w_i + z_j``
    unchanged.
    """
    gp = grad_p * p  # (..., Q, K)
    x, y = gp.sum(dim=-1), gp.sum(dim=-2)  # (..., Q), (..., K)
    del gp
    rhs = y - torch.matmul(x.unsqueeze(-2), p).squeeze(-2)
    tol = 1e-12 if p.dtype == torch.float64 else 1e-6
    z = _cg_schur(p, p.sum(dim=-2), rhs, tol=tol, max_iters=cg_max_iters, sync=sync)
    w = x - torch.matmul(p, z.unsqueeze(-1)).squeeze(-1)
    out = grad_p - w.unsqueeze(-1)
    out = out.sub_(z.unsqueeze(-2)) if out.shape == p.shape else out - z.unsqueeze(-2)
    return out.mul_(p) if out.shape == p.shape else out * p
