"""alpha-entmax: the Tsallis-regularised maps between softmax (alpha -> 1) and sparsemax (alpha = 2).

Solves ``max_p <s, p> + H^T_alpha(p)`` over the simplex of allowed keys, with the Tsallis entropy
``H^T_alpha(p) = (1 - sum_j p_j^alpha) / (alpha (alpha - 1))`` (Peters, Niculae & Martins 2019,
eq. (9)-(10)).  The solution is ``p_j = [(alpha - 1) s_j - tau]_+^{1 / (alpha - 1)}`` with ``tau``
fixed by ``sum_j p_j = 1``.

* :func:`entmax15_weights`: alpha = 1.5, exact threshold from a (partial) sort (Peters et al. 2019,
  Algorithm 2), sharing the top-k driver of :mod:`hf_eot.ops.sparsemax`.
* :func:`entmax_bisect_weights`: any alpha > 1 (float or per-row tensor) by bisection on ``tau``;
  differentiable w.r.t. the logits and alpha (Correia, Niculae & Martins 2019, "Adaptively Sparse
  Transformers", Proposition 1 / Appendix B).
* :func:`entmax_weights`: dispatch on a float alpha (1 -> softmax, 1.5 -> exact, 2 -> sparsemax).

Backward (all alpha): with ``g_j = p_j^{2 - alpha}`` on the support (0 elsewhere), the Jacobian is
``diag(g) - g g^T / sum(g)``, so ``ds = g * dp - g <g, dp> / sum(g)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._masking import check_logits, check_mask, compute_dtype, sum_to_shape
from .softmax import softmax_weights
from .sparsemax import _partial_sort_threshold, _shifted_rows, sparsemax_weights

__all__ = ["entmax15_weights", "entmax_bisect_weights", "entmax_weights"]


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


# ------------------------------------------------------------------------ alpha-entmax (bisection)


def _entmax_bisect_forward(logits: Tensor, am1: Tensor, mask: Tensor | None, n_iter: int) -> Tensor:
    """Core: bisection on ``tau`` for ``sum_j [X_j - tau]_+^{1/(alpha-1)} = 1``.

    ``X = (alpha - 1) (s - max s)`` so the maximum is 0 and ``tau`` lies in
    ``[-1, -(1/d)^{alpha - 1}]`` (``d`` = number of allowed keys): at ``tau = -1`` the max entry alone
    has mass 1, at the upper end every entry has mass ``<= 1/d``.  Entries ``<= -1`` never enter the
    support, so masked keys are set to -1.  ``am1`` = alpha - 1, ``(..., Q, 1)`` in the compute dtype.
    Returns normalised weights in the compute dtype (fully masked rows are 0).
    """
    cdtype = am1.dtype
    x = logits.to(cdtype)
    if mask is None:
        m = x.amax(dim=-1, keepdim=True)
        X = x - m
        d = torch.full_like(m, float(x.shape[-1]))
        row_valid = None
    else:
        X = torch.where(mask, x, float("-inf"))
        m = X.amax(dim=-1, keepdim=True)
        finite = torch.isfinite(m)
        X.sub_(torch.where(finite, m, torch.zeros_like(m)))
        d = mask.sum(dim=-1, keepdim=True).clamp_(min=1).to(cdtype)
        row_valid = finite
    X.mul_(am1).clamp_(min=-1.0)
    inv = 1.0 / am1  # exponent 1 / (alpha - 1)
    tau_lo = torch.full_like(X[..., :1], -1.0)  # (..., Q, 1)
    dm = 1.0 - torch.pow(d, -am1)  # tau_hi - tau_lo = 1 - (1/d)^{alpha-1} >= 0
    p = torch.empty_like(X)
    for _ in range(n_iter):
        dm = dm / 2
        tau_m = tau_lo + dm
        torch.sub(X, tau_m, out=p).clamp_(min=0.0).pow_(inv)
        f = p.sum(dim=-1, keepdim=True) - 1.0
        tau_lo = torch.where(f >= 0, tau_m, tau_lo)
    total = p.sum(dim=-1, keepdim=True)
    p.div_(torch.where(total > 0, total, torch.ones_like(total)))
    if row_valid is not None:
        p.mul_(row_valid)
    return p


class EntmaxBisectFunction(torch.autograd.Function):
    """alpha-entmax by bisection; gradients w.r.t. logits and alpha (Correia et al. 2019)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, logits: Tensor, alpha: Tensor, mask: Tensor | None, n_iter: int
    ) -> Tensor:
        cdtype = compute_dtype(logits.dtype)
        am1 = (alpha.to(cdtype) - 1.0).expand(*logits.shape[:-1], 1)
        p = _entmax_bisect_forward(logits, am1, mask, n_iter)
        out = p.to(logits.dtype)
        ctx.alpha_shape = alpha.shape
        ctx.alpha_dtype = alpha.dtype
        ctx.save_for_backward(p if ctx.needs_input_grad[1] else out, am1)
        return out

    @staticmethod
    def backward(  # type: ignore[override]
        ctx, grad_out: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, None]:
        Y, am1 = ctx.saved_tensors
        cdtype = am1.dtype
        Y = Y.to(cdtype)
        dY = grad_out.to(cdtype)
        pos = Y > 0
        # g = p^{2 - alpha} on the support; (2 - alpha) may be negative, hence the where on the base
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
            d_alpha = sum_to_shape(d_alpha, ctx.alpha_shape).to(ctx.alpha_dtype)
        return d_logits, d_alpha, None, None


def _as_alpha_tensor(alpha: float | Tensor, logits: Tensor) -> Tensor:
    """Validate alpha and return it as a tensor broadcastable to ``logits[..., :1]``."""
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
    if not alpha > 1.0:
        raise ValueError(f"entmax_bisect_weights needs alpha > 1, got {alpha} (alpha = 1 is softmax_weights)")
    return torch.tensor(float(alpha), dtype=compute_dtype(logits.dtype), device=logits.device)


def entmax_bisect_weights(
    logits: Tensor, alpha: float | Tensor, mask: Tensor | None = None, n_iter: int = 50
) -> Tensor:
    """Solves ``max_p <logits, p> + H^T_alpha(p)`` over the simplex of allowed keys, by bisection.

    ``p_j = [(alpha - 1) logits_j - tau]_+^{1/(alpha-1)}`` (Peters et al. 2019, eq. (10)); ``tau`` is
    found by ``n_iter`` halvings of ``[max - 1, max - (1/d)^{alpha-1}]`` (``d`` = allowed keys) and
    ``p`` is renormalised at the end.  Differentiable w.r.t. ``logits`` and ``alpha`` (Correia et al.
    2019, Appendix B); the alpha gradient has ``1/(alpha-1)^2`` factors, so keep alpha away from 1
    (e.g. ``alpha = 1 + softplus(.)`` clamped, or ``1 + sigmoid(.)`` as in that paper).

    Args:
        logits: ``(..., n_queries, n_keys)`` float tensor (any float dtype).
        alpha: float > 1, or a float tensor broadcastable to ``logits[..., :1]`` (e.g.
            ``(n_heads, 1, 1)`` for one alpha per head); a tensor's values must be > 1 (not checked,
            to avoid a host synchronisation).
        mask: optional bool tensor broadcastable to ``logits``; True = may attend.
        n_iter: number of bisection steps (50 reaches float64 precision).

    Returns:
        Weights of the shape and dtype of ``logits``; rows with an allowed key sum to 1, masked
        entries and fully masked rows are exactly 0.  At alpha = 2 this is sparsemax; as alpha -> 1
        it tends to softmax.
    """
    check_logits(logits)
    mask = check_mask(mask, logits.shape)
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be a positive int, got {n_iter!r}")
    alpha_t = _as_alpha_tensor(alpha, logits)
    return EntmaxBisectFunction.apply(logits, alpha_t, mask, n_iter)


def entmax_weights(
    logits: Tensor, alpha: float | Tensor = 1.5, mask: Tensor | None = None, n_iter: int = 50
) -> Tensor:
    """Solves ``max_p <logits, p> + H^T_alpha(p)`` over the simplex of allowed keys (alpha-entmax).

    Dispatches on a float ``alpha``: 1 -> :func:`softmax_weights` (the alpha -> 1 limit),
    1.5 -> exact :func:`entmax15_weights`, 2 -> :func:`sparsemax_weights`, any other value > 1 or a
    tensor -> :func:`entmax_bisect_weights` with ``n_iter`` steps.  Arguments as there.
    """
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        if alpha == 1.0:
            return softmax_weights(logits, mask)
        if alpha == 1.5:
            return entmax15_weights(logits, mask)
        if alpha == 2.0:
            return sparsemax_weights(logits, mask)
    return entmax_bisect_weights(logits, alpha, mask, n_iter)
