"""alpha-entmax: the Tsallis-regularised maps between softmax (alpha -> 1) and sparsemax (alpha = 2).

Solves ``max_p <s, p> + H^T_alpha(p)`` over the simplex of allowed keys, with the Tsallis entropy
``H^T_alpha(p) = (1 - sum_j p_j^alpha) / (alpha (alpha - 1))`` (Peters, Niculae & Martins 2019,
eq. (9)-(10)).  The solution is ``p_j = [(alpha - 1) s_j - tau]_+^{1 / (alpha - 1)}`` with ``tau``
fixed by ``sum_j p_j = 1``.

* :func:`entmax15_weights`: alpha = 1.5, exact threshold from a (partial) sort (Peters et al. 2019,
  Algorithm 2), sharing the top-k driver of :mod:`hf_eot.ops.sparsemax`.
* :func:`entmax_newton_weights`: any alpha > 1 (float or per-row tensor, e.g. learned per head)
  by a safeguarded Newton iteration on ``tau`` (a few passes, exact to round-off); differentiable
  w.r.t. the logits and alpha (Correia, Niculae & Martins 2019, "Adaptively Sparse Transformers",
  Proposition 1 / Appendix B).
* :func:`entmax_weights`: dispatch on a float alpha (1 -> softmax, 1.5 -> exact, 2 -> sparsemax,
  else Newton; a tensor alpha -> Newton).

Backward (all alpha): with ``g_j = p_j^{2 - alpha}`` on the support (0 elsewhere), the Jacobian is
``diag(g) - g g^T / sum(g)``, so ``ds = g * dp - g <g, dp> / sum(g)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _native
from ._masking import check_logits, check_mask, compute_dtype, sum_to_shape
from .softmax import softmax_weights
from .sparsemax import _partial_sort_threshold, _shifted_rows, sparsemax_weights

__all__ = ["entmax15_weights", "entmax_bisect_weights", "entmax_newton_weights", "entmax_weights"]


# ----------------------------------------------------------------------------- 1.5-entmax (exact)


def _entmax15_threshold(V: Tensor) -> tuple[Tensor, Tensor]:
    """1.5-entmax threshold from sorted-decreasing entries ``V`` ``(r, k)`` (already halved).

    For a support of the top ``j`` entries, ``tau_j`` is the smaller root of
    ``sum_{i<=j} (v_i - tau)^2 = 1``: ``tau_j = mean_j - sqrt((1 - ss_j) / j)`` with ``ss_j`` the
    sum of squared deviations (Peters et al. 2019, Algorithm 2).  ``tau_j <= v_j`` holds exactly for
    ``j <= |S|`` (if ``v_j < tau*`` then ``sum_{i<=j} (v_i - v_j)^2 > 1`` so ``tau_j > v_j``; if
    ``v_j > tau*`` the same sum is ``<= 1`` so ``tau_j <= v_j``), hence counting the condition over
    a top-``k`` prefix is exact when the count is < k.  When ``ss_j > 1`` there is no root and
    ``tau_j = mean_j > v_j``, so clamping the discriminant at 0 never selects a wrong ``j``.
    """
    k = V.shape[-1]
    rho = torch.arange(1, k + 1, device=V.device, dtype=V.dtype)
    mean = V.cumsum(dim=-1) / rho
    mean_sq = (V * V).cumsum(dim=-1) / rho
    ss = rho * (mean_sq - mean * mean)
    delta = ((1.0 - ss) / rho).clamp_(min=0.0)
    tau = mean - torch.sqrt(delta)
    supp = (tau <= V).sum(dim=-1, keepdim=True).clamp_(min=1)
    return tau.gather(-1, supp - 1), supp


class Entmax15Function(torch.autograd.Function):
    """Exact 1.5-entmax over the last axis; backward uses ``g = sqrt(p)``."""

    @staticmethod
    def forward(ctx, logits: Tensor, mask: Tensor | None) -> Tensor:  # type: ignore[override]
        shape = logits.shape
        # p = [s/2 - tau]_+^2: work on X = (s - max) / 2, entries <= -1 (outside the support) -> -2
        X, row_valid = _shifted_rows(logits, mask, 0.5)
        tau, _ = _partial_sort_threshold(X, _entmax15_threshold)
        P = X.sub_(tau).clamp_(min=0.0).square_()
        if row_valid is not None:
            P.mul_(row_valid)
        out = P.reshape(shape).to(logits.dtype)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        (out,) = ctx.saved_tensors
        cdtype = compute_dtype(out.dtype)
        gppr = torch.sqrt(out.to(cdtype))  # p^{2 - alpha} at alpha = 1.5
        dx = grad_out.to(cdtype) * gppr
        den = gppr.sum(dim=-1, keepdim=True)
        q = dx.sum(dim=-1, keepdim=True) / torch.where(den > 0, den, torch.ones_like(den))
        dx.addcmul_(gppr, q, value=-1.0)
        return dx.to(grad_out.dtype), None


def entmax15_weights(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Solves ``max_p <logits, p> + H^T_{1.5}(p)`` over the simplex of allowed keys (1.5-entmax).

    Exact (sort-based threshold, Peters et al. 2019, Algorithm 2): ``p = [logits/2 - tau]_+^2``
    with exact zeros.

    Args:
        logits: ``(..., n_queries, n_keys)`` float tensor (any float dtype).
        mask: optional bool tensor broadcastable to ``logits``; True = may attend.

    Returns:
        Weights of the shape and dtype of ``logits``; rows with an allowed key sum to 1, masked
        entries and fully masked rows are exactly 0 (gradient 0 there).
    """
    check_logits(logits)
    mask = check_mask(mask, logits.shape)
    return Entmax15Function.apply(logits, mask)


# ---------------------------------------------------------------------- alpha-entmax (Newton)

DEFAULT_MAX_ITERS = 50


def _shifted_scaled_rows(logits: Tensor, am1: Tensor | float, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``X = max((alpha - 1) (logits - rowmax), -1)`` in the compute dtype, and the row indicator.

    The maximum of each row is 0 and ``tau`` lies in ``[-1, -(1/d)^{alpha - 1}]`` (``d`` = allowed
    keys): at ``tau = -1`` the top entry alone has mass 1, at the upper end every entry has mass
    ``<= 1/d``.  Entries ``<= -1`` never enter the support, hence the clamp; masked keys get -1.
    A fully masked row becomes all 0 (a finite dummy, zeroed at the end).  ``row_valid`` is the
    ``(..., Q, 1)`` bool of rows with an allowed key (None without mask).
    """
    x = logits.to(compute_dtype(logits.dtype))
    if mask is None:
        X = x - x.amax(dim=-1, keepdim=True)
        row_valid = None
    else:
        X = torch.where(mask, x, float("-inf"))
        m = X.amax(dim=-1, keepdim=True)
        row_valid = m != float("-inf")  # a NaN row stays valid: NaN, as without a mask
        X.sub_(torch.where(row_valid, m, torch.zeros_like(m)))
        X = torch.where(row_valid, X, 0.0)
    return X.mul_(am1).clamp_(min=-1.0), row_valid


def _min_log_power(dtype: torch.dtype) -> float:
    """The log of the smallest power :func:`_exp_log_power` gives: 0.9 times the log of the smallest normal
    number (float32: ``exp(-78.6)`` ~ 8e-35; below the smallest normal number ``exp`` takes a slow path on
    CPU)."""
    return 0.9 * math.log(torch.finfo(dtype).tiny)


def _exp_log_power(t: Tensor, exponent: float, out: Tensor) -> Tensor:
    """``t^exponent`` for ``t >= 0`` as ``exp(exponent log t)`` into ``out``: 1.7-3.4x faster than
    ``torch.pow`` on CPU for exponents without a fast path there (``python benchmarks/entmax_power.py``).

    ``t`` is clamped at the smallest normal number and ``exponent log t`` at :func:`_min_log_power`, so
    that neither ``log(0)`` nor denormal results take slow paths: smaller powers come out as that floor
    (float32: 8e-35; zeros included: :func:`_nonnegative_power` puts them back), and the relative error of
    the others is about ``|exponent log t| eps`` (largest for the smallest entries).
    """
    torch.clamp(t, min=torch.finfo(t.dtype).tiny, out=out)
    return out.log_().mul_(exponent).clamp_(min=_min_log_power(t.dtype)).exp_()


def _exp_log_pays(exponent: Tensor | float, t: Tensor) -> bool:
    """Whether :func:`_exp_log_power` replaces ``torch.pow``: a float exponent that ``torch.pow`` has no
    fast path for, on CPU, in eager mode."""
    return (
        isinstance(exponent, float)
        and exponent not in (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0)
        and t.device.type == "cpu"
        and not torch.compiler.is_compiling()
    )


def _zeros_vanish(exponent: float, dtype: torch.dtype) -> bool:
    """Whether :func:`_exp_log_power` sends 0 to its floor (the smallest normal number's power is below it:
    exponents from 0.9), so that a sum needs no zeros put back."""
    return exponent * math.log(torch.finfo(dtype).tiny) <= _min_log_power(dtype)


def _nonnegative_power(
    t: Tensor, exponent: Tensor | float, out: Tensor | None = None, *, for_sums: bool = False
) -> Tensor:
    """``t^exponent`` for ``t >= 0`` with ``0^exponent = 0`` (also for exponents <= 0): by
    :func:`_exp_log_power` where it pays, else ``torch.pow``.  ``for_sums``: the result only enters sums
    over rows that have entries near 1 (Newton's), so zeros may stay at the floor of
    :func:`_exp_log_power` where :func:`_zeros_vanish`."""
    out = torch.empty_like(t) if out is None else out
    if _exp_log_pays(exponent, t):
        _exp_log_power(t, exponent, out)
        if for_sums and _zeros_vanish(exponent, t.dtype):
            return out
    else:
        torch.pow(t, exponent, out=out)
        if isinstance(exponent, float) and exponent > 0:
            return out
    return out.masked_fill_(t == 0, 0.0)


def _entmax_newton_threshold(X: Tensor, am1: Tensor | float, d: Tensor | float, max_iters: int) -> Tensor:
    """Core: ``tau`` ``(..., Q, 1)`` with ``sum_j [X_j - tau]_+^r = 1``, ``r = 1 / (alpha - 1)``.

    Newton's method on ``phi(tau) = ||[X - tau]_+||_r - 1`` rather than on the sum itself: for a
    support of equal entries ``phi`` is linear (one step), and for ``alpha <= 2`` (``r >= 1``) it is
    convex and decreasing, so the iterates started at ``tau = -1`` (where ``phi >= 0``) increase
    monotonically to the root with quadratic convergence.  With ``S = sum t^r``, ``T = sum t^(r-1)``
    (``t = [X - tau]_+``) the step is ``(S - S^(1 - 1/r)) / T``.  Safeguard (needed for
    ``alpha > 2``, where ``phi`` is not convex): a bracket ``[lo, hi]`` updated from the sign of
    ``phi``, starting from ``[-1, -(1/d)^(alpha-1)]``; a step leaving it is replaced by the
    bisection of the bracket, and so is, for ``alpha > 2``, a step shorter than a quarter of the
    bracket (near a key entering the support ``T`` is huge and Newton stalls) or longer than half
    the previous step (cycles); there ``p`` is not Lipschitz in ``tau``, so those rows iterate until
    the step is a few ulps (about as many steps as bisection).  The other rows stop once their step
    is below ``eps^(2/3)`` (the error left is then ``O(eps^(4/3))`` by the quadratic convergence);
    all stop after ``max_iters`` steps.  (A test on the step predicted from the last two, ``s^3 / s_prev^2``,
    would save a step on Gaussian scores but stops early on clustered ones, whose steps shrink
    quadratically only late: float32 errors of 5e-5 near alpha = 2.)

    X: ``(..., Q, K)`` from :func:`_shifted_scaled_rows`; am1 = alpha - 1 (float or ``(..., Q, 1)``);
    d: number of allowed keys (float or ``(..., Q, 1)``).
    """
    r = 1.0 / am1
    rm1 = r - 1.0  # = (2 - alpha) / (alpha - 1), the exponent of p^{2 - alpha} in t
    lo = torch.full_like(X[..., :1], -1.0)  # (..., Q, 1)
    hi = -torch.pow(torch.as_tensor(d, dtype=X.dtype, device=X.device), -am1).expand_as(lo)
    hi = torch.maximum(hi, lo)
    tau = lo
    if isinstance(am1, float):
        nonconvex = None if am1 <= 1.0 else torch.ones_like(lo, dtype=torch.bool)
    else:
        nonconvex = am1 > 1.0
    eps = torch.finfo(X.dtype).eps
    check = not torch.compiler.is_compiling()
    step = hi - lo  # the last step taken (the bracket before the first)
    t = torch.empty_like(X)
    q = torch.empty_like(X)
    for it in range(max_iters):
        torch.sub(X, tau, out=t)
        if it > 0:  # X >= -1 = tau at the start
            t.clamp_(min=0.0)
        _nonnegative_power(t, rm1, q, for_sums=True)  # 0 outside the support (also for 2 - alpha <= 0)
        T = q.sum(dim=-1, keepdim=True)
        S = torch.linalg.vecdot(t, q).unsqueeze(-1)  # sum t^r, (..., Q, 1)
        above = S >= 1.0  # phi(tau) >= 0: tau is left of the root
        lo = torch.where(above, tau, lo)
        hi = torch.where(above, hi, tau)
        new = tau + (S - torch.pow(S, 1.0 - 1.0 / r)) / T
        inside = (new >= lo) & (new <= hi) & torch.isfinite(new)
        if nonconvex is not None:  # alpha > 2: steps that stall (kinks) or cycle are no progress
            size = (new - tau).abs()
            inside &= ~nonconvex | ((size * 4 >= hi - lo) & (size * 2 <= step))
        new = torch.where(inside, new, (lo + hi) / 2)
        step = (new - tau).abs()
        tau = new
        done = step <= eps ** (2.0 / 3.0)
        if nonconvex is not None:
            done = torch.where(nonconvex, step <= 4 * eps, done)
        if check and bool(done.all()):
            break
    return tau


def _entmax_newton_forward(X: Tensor, am1: Tensor | float, d: Tensor | float, max_iters: int) -> Tensor:
    """``p = [X - tau]_+^{1/(alpha-1)}`` with ``tau`` from :func:`_entmax_newton_threshold` (same
    arguments), renormalised to sum 1; on CPU for ``1 < alpha < 2``, by the native kernel
    (:func:`hf_eot.ops._native.entmax_dense_rows`: the same iteration row by row, over the row's
    candidates ``X_j > -1``)."""
    if _native.entmax_dense_rows_apply(X, am1):
        return _native.entmax_dense_rows(X, am1, max_iters)[0]
    t = torch.sub(X, _entmax_newton_threshold(X, am1, d, max_iters)).clamp_(min=0.0)
    p = _nonnegative_power(t, 1.0 / am1) if isinstance(am1, float) else t.pow_(1.0 / am1)
    total = p.sum(dim=-1, keepdim=True)
    return p.div_(torch.where(total > 0, total, torch.ones_like(total)))


class EntmaxNewtonFunction(torch.autograd.Function):
    """alpha-entmax by Newton on the threshold; gradients w.r.t. logits and alpha (Correia et al. 2019)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, logits: Tensor, alpha: Tensor | float, mask: Tensor | None, max_iters: int
    ) -> Tensor:
        cdtype = compute_dtype(logits.dtype)
        if isinstance(alpha, Tensor):
            am1: Tensor | float = (alpha.detach().to(cdtype) - 1.0).expand(*logits.shape[:-1], 1)
        else:
            am1 = float(alpha) - 1.0
        X, row_valid = _shifted_scaled_rows(logits, am1, mask)
        d = float(X.shape[-1]) if mask is None else mask.sum(dim=-1, keepdim=True).clamp_(min=1).to(cdtype)
        p = _entmax_newton_forward(X, am1, d, max_iters)
        if row_valid is not None:
            p.mul_(row_valid)
        out = p.to(logits.dtype)
        ctx.am1 = am1
        ctx.alpha_meta = (alpha.shape, alpha.dtype) if isinstance(alpha, Tensor) else None
        ctx.save_for_backward(p if ctx.needs_input_grad[1] else out)
        return out

    @staticmethod
    def backward(  # type: ignore[override]
        ctx, grad_out: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, None]:
        (Y,) = ctx.saved_tensors
        am1 = ctx.am1
        cdtype = compute_dtype(Y.dtype)
        Y = Y.to(cdtype)
        dY = grad_out.to(cdtype)
        pos = Y > 0
        # g = p^{2 - alpha} on the support; (2 - alpha) may be negative, hence the where on the base
        if isinstance(am1, float) and am1 < 1.0:  # 2 - alpha > 0: 0^(2-alpha) = 0
            gppr = Y.pow(1.0 - am1)
        else:
            gppr = torch.where(pos, torch.where(pos, Y, 1.0).pow(1.0 - am1), 0.0)
        den = gppr.sum(dim=-1, keepdim=True)
        den = torch.where(den > 0, den, torch.ones_like(den))
        d_logits = d_alpha = None
        if ctx.needs_input_grad[0]:
            dx = dY * gppr
            q = dx.sum(dim=-1, keepdim=True) / den
            dx.addcmul_(gppr, q, value=-1.0)
            d_logits = dx.to(grad_out.dtype)
        if ctx.needs_input_grad[1]:
            # dp_j/dalpha = (p_j - g~_j) / (alpha-1)^2 - (p_j log p_j - g~_j sum_i p_i log p_i) / (alpha-1)
            # with g~ = g / sum(g)  (Correia et al. 2019, Appendix B)
            S = torch.where(pos, Y * torch.log(torch.where(pos, Y, 1.0)), 0.0)
            ent = S.sum(dim=-1, keepdim=True)
            g_sk = gppr / den
            dpda = (Y - g_sk) / (am1 * am1) - (S - g_sk * ent) / am1
            d_alpha = (dY * dpda).sum(dim=-1, keepdim=True)
            alpha_shape, alpha_dtype = ctx.alpha_meta
            d_alpha = sum_to_shape(d_alpha, alpha_shape).to(alpha_dtype)
        return d_logits, d_alpha, None, None


def _check_alpha(alpha: float | Tensor, logits: Tensor) -> float | Tensor:
    """Validate alpha: a float > 1, or a floating tensor broadcastable to ``logits[..., :1]``."""
    row_shape = (*logits.shape[:-1], 1)
    if isinstance(alpha, Tensor):
        if not alpha.is_floating_point():
            raise TypeError(
                f"alpha must be a float or a floating tensor, got a tensor of dtype {alpha.dtype}"
            )
        try:
            out = torch.broadcast_shapes(alpha.shape, row_shape)
        except RuntimeError as err:
            raise ValueError(
                f"alpha of shape {tuple(alpha.shape)} does not broadcast to logits[..., :1] of shape {row_shape}"
            ) from err
        if tuple(out) != row_shape:
            raise ValueError(
                f"alpha of shape {tuple(alpha.shape)} must broadcast to logits[..., :1] of shape {row_shape} "
                "(e.g. (n_heads, 1, 1) for one alpha per head)"
            )
        return alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a float > 1 or a tensor, got {type(alpha).__name__}")
    if not (alpha > 1.0 and math.isfinite(alpha)):
        raise ValueError(f"alpha-entmax needs a finite alpha > 1, got {alpha} (alpha = 1 is softmax_weights)")
    return float(alpha)


def _check_max_iters(max_iters: int) -> None:
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters must be an int >= 1, got {max_iters!r}")


def entmax_newton_weights(
    logits: Tensor, alpha: float | Tensor, mask: Tensor | None = None, *, max_iters: int = DEFAULT_MAX_ITERS
) -> Tensor:
    """Solves ``max_p <logits, p> + H^T_alpha(p)`` over the simplex of allowed keys, for any alpha > 1.

    ``p_j = [(alpha - 1) logits_j - tau]_+^{1/(alpha-1)}`` (Peters et al. 2019, eq. (10)), ``tau``
    by a safeguarded Newton iteration (:func:`_entmax_newton_forward`; typically 3-6 passes over the
    scores, stopping when converged), ``p`` renormalised.  Differentiable w.r.t. ``logits`` and
    ``alpha`` (Correia et al. 2019, Appendix B); the alpha gradient has ``1/(alpha-1)^2`` factors, so
    keep a learned alpha away from 1 (e.g. ``alpha = 1 + sigmoid(w)`` as in that paper).

    Args:
        logits: ``(..., n_queries, n_keys)`` float tensor (any float dtype; half computed in float32).
        alpha: float > 1, or a float tensor broadcastable to ``logits[..., :1]`` (e.g.
            ``(n_heads, 1, 1)`` for one alpha per head); a tensor's values must be > 1 (not checked,
            to avoid a host synchronisation).
        mask: optional bool tensor broadcastable to ``logits``; True = may attend.
        max_iters: at most this many Newton steps (under ``torch.compile``: exactly this many).

    Returns:
        Weights of the shape and dtype of ``logits``; rows with an allowed key sum to 1, masked
        entries and fully masked rows are exactly 0.  At alpha = 2 this is sparsemax; as alpha -> 1
        it tends to softmax.
    """
    check_logits(logits)
    mask = check_mask(mask, logits.shape)
    _check_max_iters(max_iters)
    alpha_c = _check_alpha(alpha, logits)
    return EntmaxNewtonFunction.apply(logits, alpha_c, mask, max_iters)


def entmax_bisect_weights(
    logits: Tensor, alpha: float | Tensor, mask: Tensor | None = None, n_iter: int = DEFAULT_MAX_ITERS
) -> Tensor:
    """Former name of :func:`entmax_newton_weights` (``n_iter`` is its ``max_iters``)."""
    return entmax_newton_weights(logits, alpha, mask, max_iters=n_iter)


def entmax_weights(
    logits: Tensor,
    alpha: float | Tensor = 1.5,
    mask: Tensor | None = None,
    *,
    max_iters: int = DEFAULT_MAX_ITERS,
) -> Tensor:
    """Solves ``max_p <logits, p> + H^T_alpha(p)`` over the simplex of allowed keys (alpha-entmax).

    Dispatches on a float ``alpha``: 1 -> :func:`softmax_weights` (the alpha -> 1 limit),
    1.5 -> exact :func:`entmax15_weights`, 2 -> :func:`sparsemax_weights`; any other float > 1 or a
    tensor (e.g. a learned alpha per head) -> :func:`entmax_newton_weights` with at most
    ``max_iters`` Newton steps.  Arguments as there.
    """
    _check_max_iters(max_iters)
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        if alpha == 1.0:
            return softmax_weights(logits, mask)
        if alpha == 1.5:
            return entmax15_weights(logits, mask)
        if alpha == 2.0:
            return sparsemax_weights(logits, mask)
    return entmax_newton_weights(logits, alpha, mask, max_iters=max_iters)
