"""OT-based attention of "Deciphering Attention Mechanisms: Optimization and Fenchel Dual Solutions".

Solves (approximately, for small ``alpha`` and ``alpha / gamma``) the problem of paper 003, eq. (21):
``min_p alpha/2 ||mu~ + z - E_p[t]||^2 + W_gamma(p, u; M)`` where the KL regulariser of eq. (3) is
replaced by the entropic OT cost ``W_gamma`` (eq. (20)) between the attention ``p`` and the
preference ``u`` over the templates.  The closed form (eq. (22), Appendix D eq. (44)) is::

    p_j = sum_i u_i exp((alpha s_j - M(t_j, t_i)) / gamma) / Z_i,
    Z_i = sum_j' exp((alpha s_j' - M(t_j', t_i)) / gamma),

with ``s_j = <t_j, z>`` (the scores, already scaled by the caller) and the cost
``M(t_j, t_i) = -<t_j, t_i> + C = -G_ji + C`` (C cancels between numerator and ``Z_i``).  For each
source template ``i`` this is a softmax over ``j`` of ``(alpha s_j + G_ji) / gamma``, and ``p`` is the
``u``-mixture of these softmaxes, so ``p`` sums to 1.  Limits: ``G = 0`` gives
``softmax(alpha s / gamma)`` whatever ``u``; ``gamma -> infinity`` gives uniform weights over the
allowed keys; a dominant diagonal ``G_ii`` gives ``p = u``.

Computation: ``log Z_qi = logsumexp_j(x_qj + g_ji)`` with ``x = alpha s / gamma``, ``g = G / gamma``
needs the ``(Q, K, K)`` tensor ``x_qj + g_ji``; it is formed in chunks over ``i`` (at most about
``2**24`` elements at a time), and ``p = sum_i u_i exp(x + g - log Z)`` is accumulated in the linear
domain (a sum of terms in [0, 1], so it cannot overflow).  The backward pass recomputes the chunks
(a custom ``autograd.Function``), so training memory is also ``O(Q K chunk)`` instead of
``O(Q K^2)``.  The factorisation ``Z = exp(x - max x) @ exp(g - colmax g)`` with per-row and
per-column shifts is *not* stable in general: when the key with the largest score has a small
``g_ji`` for column ``i`` (``max_j (x_qj + g_ji) << max x + max_j g_ji``, e.g. a difference of 100
in float32) every product underflows and ``Z`` becomes 0, so it is not used.

Backward (``P_qji = exp(x_qj + g_ji - log Z_qi)``, ``h = dL/dp``, ``c_qi = sum_j h_qj P_qji``)::

    dL/dx_qk = sum_i u_qi P_qki (h_qk - c_qi)
    dL/dg_ki = sum_q u_qi P_qki (h_qk - c_qi)
    dL/du_qi = c_qi
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._masking import check_logits, check_mask, compute_dtype, sum_to_shape

__all__ = ["ot_weights"]

# Elements of one (batch, Q, K, chunk) block.
_CHUNK_ELEMENTS = 1 << 24


def _chunk_size(batch_numel: int, n_q: int, n_k: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return max(1, min(n_k, chunk_size))
    return max(1, min(n_k, _CHUNK_ELEMENTS // max(1, batch_numel * n_q * n_k)))


class OTAttentionFunction(torch.autograd.Function):
    """``p_qj = sum_i u_qi softmax_j(x_qj + g_ji)``, chunked over ``i`` in forward and backward."""

    @staticmethod
    def forward(ctx, x: Tensor, g: Tensor, u: Tensor, chunk_size: int | None) -> Tensor:  # type: ignore[override]
        # x: (..., Q, K) with -inf on masked keys; g: (..., K, K); u: (..., Q or 1, K), rows sum to 1
        batch = torch.broadcast_shapes(x.shape[:-2], g.shape[:-2], u.shape[:-2])
        n_q, n_k = x.shape[-2], x.shape[-1]
        c = _chunk_size(int(torch.Size(batch).numel()), n_q, n_k, chunk_size)
        p = x.new_zeros((*batch, n_q, n_k))
        log_z = x.new_empty((*batch, n_q, n_k))  # log Z_qi
        xe = x.unsqueeze(-1)  # (..., Q, K_j, 1)
        for i0 in range(0, n_k, c):
            i1 = min(n_k, i0 + c)
            a = xe + g[..., i0:i1].unsqueeze(-3)  # (..., Q, K_j, c)
            lz = torch.logsumexp(a, dim=-2)  # (..., Q, c)
            log_z[..., i0:i1] = lz
            a.sub_(lz.unsqueeze(-2)).exp_()  # P_qji
            p += torch.matmul(a, u[..., i0:i1].unsqueeze(-1)).squeeze(-1)
        ctx.chunk = c
        ctx.save_for_backward(x, g, u, log_z)
        return p

    @staticmethod
    def backward(ctx, h: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:  # type: ignore[override]
        x, g, u, log_z = ctx.saved_tensors
        need_x, need_g, need_u = ctx.needs_input_grad[:3]
        n_k = x.shape[-1]
        c = ctx.chunk
        batch = log_z.shape[:-2]
        dx = torch.zeros_like(log_z) if need_x else None
        dg = log_z.new_zeros((*batch, n_k, n_k)) if need_g else None
        du = torch.empty_like(log_z) if need_u else None
        xe = x.unsqueeze(-1)
        for i0 in range(0, n_k, c):
            i1 = min(n_k, i0 + c)
            P = xe + g[..., i0:i1].unsqueeze(-3)
            P.sub_(log_z[..., i0:i1].unsqueeze(-2)).exp_()  # (..., Q, K_j, c)
            cq = torch.matmul(h.unsqueeze(-2), P).squeeze(-2)  # (..., Q, c): E_{P_i}[h]
            if du is not None:
                du[..., i0:i1] = cq
            if dx is None and dg is None:
                continue
            T = P * u[..., i0:i1].unsqueeze(-2)  # u_qi P_qki, (full batch, Q, K, c)
            T.mul_(h.unsqueeze(-1) - cq.unsqueeze(-2))  # * (h_qk - c_qi)
            if dx is not None:
                dx += T.sum(dim=-1)
            if dg is not None:
                dg[..., i0:i1] = T.sum(dim=-3)
        return (
            sum_to_shape(dx, x.shape) if dx is not None else None,
            sum_to_shape(dg, g.shape) if dg is not None else None,
            sum_to_shape(du, u.shape) if du is not None else None,
            None,
        )


def _check_positive(name: str, value: float | Tensor) -> None:
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            raise TypeError(
                f"{name} must be a float or a floating tensor, got a tensor of dtype {value.dtype}"
            )
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a float > 0 (or a tensor), got {value!r}")


def ot_weights(
    scores: Tensor,
    template_gram: Tensor,
    mask: Tensor | None = None,
    *,
    alpha: float | Tensor = 1.0,
    gamma: float | Tensor = 1.0,
    preference: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Solves the OT-regularised inference problem of paper 003 eq. (21) in closed form, eq. (22)/(44).

    ``p_j = sum_i u_i softmax_j((alpha s_j + G_ji) / gamma)`` over the allowed keys, i.e. eq. (22)
    with the cost ``M(t_j, t_i) = -G_ji + C``.

    Args:
        scores: ``(..., n_queries, n_keys)`` float tensor, ``s_j = <t_j, z>`` already scaled by the
            caller (any float dtype; half dtypes are computed in float32).
        template_gram: ``(..., n_keys, n_keys)`` inner products of the templates
            ``G_ji = <t_j, t_i>`` (e.g. ``keys @ keys.transpose(-1, -2)``), batch dims broadcastable
            with those of ``scores``; must be finite.
        mask: optional bool tensor broadcastable to ``scores``; True = may attend.  Masked keys get 0
            and are excluded from ``u`` and from every sum; fully masked rows are 0.
        alpha: the weight of the mean-matching term (paper: 1); float > 0 or broadcastable tensor.
        gamma: entropic OT regularisation (paper: ``sqrt(hidden)``); float > 0 or broadcastable
            tensor.
        preference: optional non-negative preference ``u`` (default uniform): ``(..., n_keys)`` with
            fewer dims than ``scores`` for one ``u`` shared by all queries, or ``(..., n_queries, n_keys)``
            (as many dims as ``scores``) for one ``u`` per query;
            renormalised over the allowed keys of each query (a query whose allowed keys all have
            zero preference gets 0 weights).
        chunk_size: number of source templates ``i`` per chunk (default: about ``2**24`` elements
            per ``(..., Q, K, chunk)`` block).

    Returns:
        Weights of the shape and dtype of ``scores``; rows with an allowed key sum to 1.
    """
    check_logits(scores, "scores")
    check_logits(template_gram, "template_gram")
    if scores.dim() < 2:
        raise ValueError(f"scores must be (..., n_queries, n_keys), got shape {tuple(scores.shape)}")
    n_k = scores.shape[-1]
    if template_gram.dim() < 2 or template_gram.shape[-2:] != (n_k, n_k):
        raise ValueError(
            f"template_gram must be (..., n_keys, n_keys) = (..., {n_k}, {n_k}), got {tuple(template_gram.shape)}"
        )
    try:
        torch.broadcast_shapes(scores.shape[:-2], template_gram.shape[:-2])
    except RuntimeError as err:
        raise ValueError(
            f"batch dims of template_gram {tuple(template_gram.shape[:-2])} do not broadcast with those of "
            f"scores {tuple(scores.shape[:-2])}"
        ) from err
    mask = check_mask(mask, scores.shape)
    _check_positive("alpha", alpha)
    _check_positive("gamma", gamma)
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")

    cdtype = compute_dtype(scores.dtype)
    x = scores.to(cdtype) * alpha / gamma  # (..., Q, K)
    g = template_gram.to(cdtype) / gamma  # (..., K, K)

    if preference is None:
        pref = torch.ones(n_k, dtype=cdtype, device=scores.device)
    else:
        check_logits(preference, "preference")
        if preference.shape[-1:] != (n_k,):
            raise ValueError(
                f"preference must be (..., n_keys) = (..., {n_k}), got {tuple(preference.shape)}"
            )
        pref = preference.to(cdtype)
    if preference is None or preference.dim() < scores.dim():
        pref = pref.unsqueeze(-2)  # (..., 1, K): one preference for every query
    # else (..., Q, K): a preference per query (e.g. T5's position bias as u, paper 003 eq. 17)

    if mask is None:
        u = pref / pref.sum(dim=-1, keepdim=True)
    else:
        row_valid = mask.any(dim=-1, keepdim=True)  # (..., Q, 1)
        u = torch.where(mask, pref, 0.0)  # (..., Q, K)
        tot = u.sum(dim=-1, keepdim=True)
        u = u / torch.where(tot > 0, tot, torch.ones_like(tot))
        x = torch.where(mask, x, float("-inf"))
        x = torch.where(row_valid, x, 0.0)  # a fully masked row: finite dummy, its u is 0
    p = OTAttentionFunction.apply(x, g, u, chunk_size)
    return p.to(scores.dtype)
