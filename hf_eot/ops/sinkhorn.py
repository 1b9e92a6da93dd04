"""Two-sided entropic optimal transport (Sinkhorn) attention: converged plans, implicit gradients.

Solves ``max_P <S, P> / epsilon + H(P)`` over the plans ``P >= 0`` with row sums ``a`` and column
sums ``b`` ("Sinkhorn Distances: Lightspeed Computation of Optimal Transport", Cuturi 2013, eq. (2);
"Sinkformers: Transformers with Doubly Stochastic Attention", Sander et al., arXiv:2110.11773), i.e.
``P = diag(u) K diag(v)`` with ``K = exp(S / epsilon)``.  Attention rows alone give the one-sided
problem ("Scaled-Dot-Product Attention as One-Sided Entropic Optimal Transport", Litman,
arXiv:2508.08369); here the columns are constrained too (doubly stochastic attention).

Marginals (tested convention): every valid query row (at least one allowed key) sums to 1; every
valid key column sums to ``n_valid_queries / n_valid_keys`` of its problem (feasible when
``n_queries != n_keys`` or with padding); masked entries, invalid rows and invalid columns are
exactly 0.  The returned plan is always row-normalised as its last step (``P = softmax_k(F + log_v)``
computed with a max shift, or ``K v`` divided by its float64 row sums), so rows sum to 1 to round-off
whatever the scale of the scores; ``n_iters=0`` is the masked softmax.

Iterations, with ``F = S / epsilon`` (``-inf`` where masked), potentials ``f`` (rows), ``g``
(columns), ``row_lse(g)_i = log sum_j exp(F_ij + g_j)``::

    g <- g + omega (log b - col_lse(f) - g)        (columns, over-relaxed)
    f <-            -row_lse(g)                     (rows)

* ``n_iters=k``: ``k`` plain iterations (``omega = 1``) from ``g = 0``.  With the implicit gradient in
  eager mode, in the scaling domain below when it is safe (one or two host syncs: the safety check
  before and the range check after; the log domain otherwise), the same iterates to round-off at a
  fraction of the cost (one exponential per entry in all, instead of two per entry and iteration).
  Under ``torch.compile``, while a CUDA graph is being captured, and with ``grad="unroll"``, in the log
  domain: no host sync, no data-dependent control flow (``torch.compile(fullgraph=True)``: 0 graph
  breaks, both grad modes).
* ``n_iters=None`` (default): in the scaling domain when safe: one exponential of the kernel
  balanced in the log domain, ``Kb = exp(F - c_i - d_j)`` (``c`` row maxima, ``d`` column maxima
  of ``F - c``), then matrix-vector products ``row_lse(g) = c + log(Kb exp(d + g))``; potentials in
  float64 and products accumulated in float64 across blocks of 32 (a float32 matrix-vector product
  alone has ~1e-6 relative error at n = 512, the floor the marginal error would hit).  If a valid
  kernel entry underflows (scores spread over more than ~65 / epsilon after balancing) the log
  domain is used; if the scalings leave the float range (infeasible masks) the solver restarts in
  the log domain from its last check.  Over-relaxation ``omega`` per problem: 1 for the first
  ``check_every`` iterations, then from the observed contraction ``mu`` via Young's relation
  ``(mu + omega - 1)^2 = mu omega^2 eta`` to ``omega* = 2 / (1 + sqrt(1 - eta))`` (capped at 1.9,
  halved towards 1 if the error grows) ("Overrelaxed Sinkhorn-Knopp Algorithm for Regularized
  Optimal Transport", Thibault et al., arXiv:1711.01851; "A note on overrelaxation in the Sinkhorn
  algorithm", Lehmann et al., arXiv:2012.12562).  Convergence is checked every ``check_every``
  iterations (the only host syncs; under ``torch.compile`` these checks are the graph breaks).

Measured (``benchmarks/sinkhorn.py``, float32, B=2, H=8, epsilon 1, scores ``q k^T / sqrt(d)`` at
logit std 1 and 4): iterations to a column-marginal error of 1e-6, over-relaxed vs plain:
n=512: 5 vs 4 (std 1), 55 vs 242 (std 4); n=1024: 5 vs 4 (std 1), 50 vs ~290 (std 4).  Near
assignment (std 8) both need thousands; that is where ``max_iters`` and the warning matter.

Gradients.  ``grad="implicit"`` (default): implicit differentiation of the optimality conditions
``P 1 = a``, ``P^T 1 = b``: for ``L = <G, P>``, ``dL/dF = P * (G - w 1^T - 1 z^T)`` with
``(diag(c) - P^T P) z = (G * P)^T 1 - P^T (G * P) 1`` (Schur complement of the dual Hessian
``[[diag(P 1), P], [P^T, diag(c)]]``, ``c = P^T 1``), solved by conjugate gradients with matrix-vector
products, and ``w = (G * P) 1 - P z``.  The autograd Function saves only the plan; backward cost
and memory do not depend on the forward iterations.  With ``n_iters=k`` it is the derivative of
the converged map taken at the ``k``-iteration plan.  ``grad="unroll"``: autograd through the plain
log-domain iterations, checkpointed every ``check_every`` iterations (memory independent of the
iteration count; exact derivative of the computed map).

Defaults.  ``DEFAULT_TOL = 1e-4``: column sums within 0.01% of their target, two orders above the
float32 round-off of the solver (~1e-7 measured), so it is also reached in the log-domain fallback,
whose float32 potentials limit it to ~``|potential|`` ulps, and at long sequences; 1e-6 costs ~30%
more iterations at std 4.  ``DEFAULT_MAX_ITERS = 1000``: 20x what std 4 needs; a bound on the time
spent on near-assignment problems, which then warn (:class:`SinkhornConvergenceWarning`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import Tensor

from ._masking import check_logits, check_mask, compute_dtype
from ._sinkhorn_implicit import (
    Targets,
    _LogOps,
    _ScalingOps,
    fixed_iterations,
    implicit_plan_vjp,
    over_relaxed_solve,
    plan_col_error,
)

__all__ = [
    "DEFAULT_MAX_ITERS",
    "DEFAULT_TOL",
    "SinkhornConvergenceWarning",
    "SinkhornResult",
    "sinkhorn_weights",
]

DEFAULT_TOL = 1e-4
"""Default target column-marginal error (the choice is explained in the module docstring)."""

DEFAULT_MAX_ITERS = 1000
"""Default iteration cap of the iterate-to-tolerance mode (module docstring)."""

GRAD_MODES = ("implicit", "unroll")

# CG iterations of the implicit backward: cap when checked (eager), fixed count under torch.compile
_CG_MAX_ITERS = 1000
_CG_ITERS_COMPILED = 64

class SinkhornConvergenceWarning(UserWarning):
    """Sinkhorn stopped at ``max_iters`` with a column-marginal error above ``tol``."""


@dataclass(frozen=True)
class SinkhornResult:
    """Structured output of :func:`sinkhorn_weights` (after ott-jax's ``SinkhornOutput``).

    Attributes:
        weights: the plan ``(..., Q, K)`` in the dtype of the scores; valid rows sum to 1 (up to
            round-off, whatever the scores), valid columns to ``n_valid_queries / n_valid_keys`` (up
            to ``marginal_error``), masked entries and invalid rows/columns are exactly 0.
        log_u: row potentials ``(..., Q)`` (compute dtype; 0 on invalid rows; detached with
            ``grad="implicit"``).
        log_v: column potentials ``(..., K)`` (compute dtype; 0 on invalid columns; detached with
            ``grad="implicit"``); on allowed entries
            ``weights = exp(scores / epsilon + log_u[..., :, None] + log_v[..., None, :])``.
        n_iters: number of iterations run (each = column update then row update).
        marginal_error: ``(...,)`` max abs error of the column sums of ``weights`` over the valid
            columns (detached).
        converged: ``(...,)`` bool tensor, ``marginal_error <= tol``.
    """

    weights: Tensor
    log_u: Tensor
    log_v: Tensor
    n_iters: int
    marginal_error: Tensor
    converged: Tensor


class _Problem:
    """Log kernel ``F = scores / epsilon`` (``-inf`` where masked), valid lines and targets."""

    def __init__(self, scores: Tensor, mask: Tensor | None, epsilon: float | Tensor) -> None:
        cdtype = compute_dtype(scores.dtype)
        f = scores.to(cdtype)  # (..., Q, K); no copy for float32/64 scores and epsilon 1
        if isinstance(epsilon, Tensor) or epsilon != 1:
            f = f / epsilon
        n_q, n_k = scores.shape[-2], scores.shape[-1]
        if mask is None:
            row_valid = col_valid = None
            b: Tensor | float = n_q / n_k
        else:
            f = torch.where(mask, f, float("-inf"))
            row_valid = mask.any(dim=-1)  # (..., Q)
            col_valid = mask.any(dim=-2)  # (..., K)
            nq = row_valid.sum(dim=-1, keepdim=True).clamp(min=1).to(cdtype)  # (..., 1)
            nk = col_valid.sum(dim=-1, keepdim=True).clamp(min=1).to(cdtype)
            b = nq / nk
        self.f, self.mask = f, mask
        self.targets = Targets(row_valid, col_valid, b)
        self.log_ops = _LogOps(f, row_valid, col_valid)

    def zeros_cols(self) -> Tensor:
        return self.f.new_zeros(self.f.shape[:-2] + self.f.shape[-1:]).detach()  # (..., K)


class _ImplicitSinkhorn(torch.autograd.Function):
    """Sinkhorn plan with the backward of the converged fixed point (saves only the plan)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        f: Tensor,
        prob: _Problem,
        n_iters: int | None,
        tol: float,
        max_iters: int,
        check_every: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        targets = prob.targets
        if n_iters is not None:
            g, ops = _fixed_solve(f, prob, n_iters)
            done = n_iters
        else:
            scaling = _ScalingOps(f, targets.row_valid, targets.col_valid, prob.mask)
            ops, fallback = (scaling, prob.log_ops) if scaling.is_safe() else (prob.log_ops, None)
            del scaling
            g, done, ops = over_relaxed_solve(
                ops, targets, tol=tol, max_iters=max_iters, check_every=check_every, fallback=fallback
            )
        p, log_u = ops.plan(g)
        g = g.to(f.dtype)
        err = plan_col_error(p, targets)
        ctx.save_for_backward(p)
        ctx.mark_non_differentiable(log_u, g, err)
        return p, log_u, g, err, torch.tensor(done)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_p: Tensor | None, *_: Tensor
    ) -> tuple[Tensor | None, ...]:
        (p,) = ctx.saved_tensors
        if grad_p is None or not ctx.needs_input_grad[0]:
            return (None,) * 6
        compiling = torch.compiler.is_compiling()
        grad_f = implicit_plan_vjp(
            p,
            grad_p,
            cg_max_iters=_CG_ITERS_COMPILED if compiling else _CG_MAX_ITERS,
            sync=not compiling,
        )
        return grad_f, None, None, None, None, None


def _fixed_solve(f: Tensor, prob: _Problem, n_iters: int) -> tuple[Tensor, _LogOps | _ScalingOps]:
    """``n_iters`` plain iterations from ``g = 0``: in the scaling domain (one exponential, then
    matrix-vector products) when it is safe, eager mode only; else, and under ``torch.compile`` or CUDA
    graph capture (no host sync), in the log domain.  Both give the same iterates to round-off.  Returns
    the column potentials and the half-step implementation that computed them (for the final plan)."""
    targets = prob.targets
    capturing = f.is_cuda and torch.cuda.is_current_stream_capturing()  # a CUDA graph: no host sync
    if n_iters > 0 and not torch.compiler.is_compiling() and not capturing:
        scaling = _ScalingOps(f, targets.row_valid, targets.col_valid, prob.mask)
        if scaling.is_safe():  # host sync
            g0 = torch.zeros(f.shape[:-2] + f.shape[-1:], dtype=scaling.vdtype, device=f.device)
            g = fixed_iterations(scaling, targets, g0, n_iters)
            if not bool(scaling.out_of_range(targets.row(scaling.row_lse(g)), g)):  # host sync
                return g, scaling
        del scaling
    return fixed_iterations(prob.log_ops, targets, prob.zeros_cols(), n_iters), prob.log_ops


def _check_sinkhorn_args(
    epsilon: float | Tensor, n_iters: int | None, tol: float, max_iters: int, check_every: int, grad: str
) -> None:
    if not isinstance(epsilon, Tensor) and not (isinstance(epsilon, (int, float)) and epsilon > 0):
        raise ValueError(f"epsilon must be a float > 0 (or a tensor), got {epsilon!r}")
    if n_iters is not None and (isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 0):
        raise ValueError(f"n_iters must be None (iterate to tol) or an int >= 0, got {n_iters!r}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be a float > 0, got {tol!r}")
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters must be an int >= 1, got {max_iters!r}")
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be an int >= 1, got {check_every!r}")
    if grad not in GRAD_MODES:
        raise ValueError(f"grad must be one of {GRAD_MODES}, got {grad!r}")


def _unrolled_block(prob: _Problem, g: Tensor, steps: int) -> Tensor:
    """``steps >= 1`` plain iterations from ``g``, differentiable; returns the new ``g``.

    When a gradient is needed, the block runs under activation checkpointing: autograd keeps only the
    block's input potentials and recomputes its iterations in the backward pass, so training memory is
    ``O(check_every * Q * K)`` instead of ``O(iterations * Q * K)``, with the same gradients.  (Skipped
    under ``torch.compile``, which does its own memory planning.)
    """

    def block(g: Tensor) -> Tensor:
        return fixed_iterations(prob.log_ops, prob.targets, g, steps)

    needs_grad = torch.is_grad_enabled() and (prob.f.requires_grad or g.requires_grad)
    if needs_grad and not torch.compiler.is_compiling():
        return torch.utils.checkpoint.checkpoint(block, g, use_reentrant=False)
    return block(g)


def _unrolled(
    prob: _Problem, n_iters: int | None, tol: float, max_iters: int, check_every: int
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Plain log-domain Sinkhorn, differentiated by autograd through the iterations."""
    g = prob.zeros_cols()
    if n_iters is not None:
        for start in range(0, n_iters, check_every):
            g = _unrolled_block(prob, g, min(check_every, n_iters - start))
        done = n_iters
    else:
        done = 0
        while done < max_iters:
            steps = min(check_every, max_iters - done)
            g = _unrolled_block(prob, g, steps)
            done += steps
            with torch.no_grad():
                f = prob.targets.row(prob.log_ops.row_lse(g))
                err = prob.targets.col_error(g, prob.log_ops.col_lse(f))
            if bool((err <= tol).all()):  # host sync, iterate-to-tolerance mode only
                break
    p, log_u = prob.log_ops.plan(g)
    return p, log_u, g, done


def sinkhorn_weights(
    scores: Tensor,
    mask: Tensor | None = None,
    *,
    epsilon: float | Tensor = 1.0,
    n_iters: int | None = None,
    tol: float = DEFAULT_TOL,
    max_iters: int = DEFAULT_MAX_ITERS,
    grad: str = "implicit",
    check_every: int = 5,
) -> SinkhornResult:
    """Solves entropic OT ``max_P <scores, P> / epsilon + H(P)`` with row sums 1 and column sums
    ``n_valid_queries / n_valid_keys`` (Cuturi 2013, eq. (2); the plan is ``diag(u) K diag(v)``).

    Args:
        scores: ``(..., n_queries, n_keys)`` float tensor (any float dtype; half dtypes are
            computed in float32); the kernel is ``exp(scores / epsilon)``.
        mask: optional bool tensor broadcastable to ``scores``; True = may attend.
        epsilon: entropic regularisation (> 0); a tensor broadcastable to ``scores`` (e.g.
            ``(n_heads, 1, 1)``) is accepted.
        n_iters: ``k`` runs exactly ``k`` plain iterations (eager mode: scaling domain when safe, one or
            two host syncs; under ``torch.compile`` or CUDA graph capture, and with ``grad="unroll"``: log
            domain, no host sync, ``torch.compile(fullgraph=True)`` friendly); ``None`` iterates
            (over-relaxed, scaling domain when safe) until the column-marginal error of every problem
            is ``<= tol`` (checked every ``check_every`` iterations) or ``max_iters``, warning once
            (:class:`SinkhornConvergenceWarning`) when not converged.
        tol: target column-marginal error (also defines ``converged`` in fixed mode).
        max_iters: iteration cap when ``n_iters is None``.
        grad: ``"implicit"`` (default): backward of the converged fixed point (conjugate gradients
            with the plan; cost and memory independent of the iterations; with ``n_iters=k`` it is
            the converged map's derivative taken at the ``k``-iteration plan); ``"unroll"``: autograd
            through the plain iterations (checkpointed; exact for the computed map).
        check_every: iterations between two convergence checks when ``n_iters is None``.

    Returns:
        :class:`SinkhornResult` (plan, potentials, iterations, marginal error, converged).
    """
    check_logits(scores, "scores")
    if scores.dim() < 2:
        raise ValueError(f"scores must be (..., n_queries, n_keys), got shape {tuple(scores.shape)}")
    mask = check_mask(mask, scores.shape)
    _check_sinkhorn_args(epsilon, n_iters, tol, max_iters, check_every, grad)

    prob = _Problem(scores, mask, epsilon)
    if grad == "implicit":
        p, log_u, log_v, err, done_t = _ImplicitSinkhorn.apply(
            prob.f, prob, n_iters, tol, max_iters, check_every
        )
        done = n_iters if n_iters is not None else int(done_t)
    else:
        p, log_u, log_v, done = _unrolled(prob, n_iters, tol, max_iters, check_every)
        err = plan_col_error(p.detach(), prob.targets)
    if n_iters is None:
        worst = float(err.max()) if err.numel() else 0.0
        if not worst <= tol:
            warnings.warn(
                f"sinkhorn_weights did not converge: column-marginal error {worst:.3g} > tol={tol:g} "
                f"after max_iters={max_iters} iterations (epsilon={epsilon}). Increase epsilon "
                "(a smoother plan converges faster), raise max_iters or tol, or pass n_iters=k for a "
                "fixed budget.",
                SinkhornConvergenceWarning,
                stacklevel=2,
            )
    return SinkhornResult(
        weights=p.to(scores.dtype),
        log_u=log_u,
        log_v=log_v,
        n_iters=done,
        marginal_error=err,
        converged=err <= tol,
    )
