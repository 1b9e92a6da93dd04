"""OT-based attention of "Deciphering Attention Mechanisms: Optimization and Fenchel Dual Solutions".

Solves (approximately, for small ``alpha`` and ``alpha / gamma``) the problem of eq. (21) there:
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

Computation (GEMMs).  With ``x = alpha s / gamma``, ``g = G / gamma``, the row shift
``mx_q = max_j x_qj`` and the column shift ``mg_i = max_j g_ji``, ``E = exp(x - mx)`` ``(Q, K)`` and
``F = exp(g - mg)`` ``(K, K)`` have entries in [0, 1] and::

    W = E @ F                      (Z_qi = exp(mx_q + mg_i) W_qi)
    w = u / W                      (0 where u = 0)
    p = E * (w @ F^T)

two ``Q x K x K`` products instead of ``O(Q K^2)`` exponentials.  ``W_qi`` is exact to round-off
unless the largest term ``max_j (x_qj + g_ji)`` lies far below the bound ``mx_q + mg_i`` (the key
with the largest score has a small ``g_ji``), where its terms underflow.  Such entries are detected:
``W_qi >= exp(-L)`` with ``L = -log(smallest normal) / 2`` (43.7 in float32, 354 in float64, so the
lost terms are below ``K exp(-L)`` relative to ``W_qi`` and ``w`` cannot overflow); a query row with
a failing entry where ``u_qi > 0`` is recomputed exactly (below).  Computing in float64 widens the
safe range to gaps of 354.

Exact fallback.  ``log Z_qi = logsumexp_j(x_qj + g_ji)`` on the ``(Q, K, K)`` tensor
``x_qj + g_ji``, formed in chunks over ``i`` (at most about ``2**24`` elements at a time), and
``p = sum_i u_i exp(x + g - log Z)`` accumulated in the linear domain; the backward recomputes the
chunks.  Used only for the failing rows, one batch element at a time.

Backward (``P_qji = exp(x_qj + g_ji - log Z_qi) = E_qj F_ji / W_qi``, ``h = dL/dp``,
``c_qi = sum_j h_qj P_qji``)::

    dL/du_qi = c_qi                                      c = ((h E) @ F) / W
    dL/dx_qk = sum_i u_qi P_qki (h_qk - c_qi)            = h p - E ((w c) @ F^T)
    dL/dg_ki = sum_q u_qi P_qki (h_qk - c_qi)            = F ((h E)^T @ w - E^T @ (w c))

four more ``Q x K x K`` products; saved for the backward are ``E, w, W, p`` ``(Q, K)`` and
``F`` ``(K, K)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._masking import check_logits, check_mask, compute_dtype, sum_to_shape

__all__ = ["ot_weights"]

# Elements of one (Q, K, chunk) block of the exact fallback.
_CHUNK_ELEMENTS = 1 << 24


def _safe_log_min(dtype: torch.dtype) -> float:
    """``L``: ``W_qi >= exp(-L)`` certifies the GEMM value (half the log of the smallest normal)."""
    return -0.5 * math.log(torch.finfo(dtype).tiny)


def _chunk_size(batch_numel: int, n_q: int, n_k: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return max(1, min(n_k, chunk_size))
    return max(1, min(n_k, _CHUNK_ELEMENTS // max(1, batch_numel * n_q * n_k)))


# ------------------------------------------------------------------------------ exact (chunked)


def _exact_forward(x: Tensor, g: Tensor, u: Tensor, c: int) -> tuple[Tensor, Tensor]:
    """``(p, log Z)`` by logsumexp over chunks of ``c`` source templates.

    x: ``(..., Q, K)`` (-inf on masked keys); g: ``(..., K, K)``; u: ``(..., Q or 1, K)``.
    """
    batch = torch.broadcast_shapes(x.shape[:-2], g.shape[:-2], u.shape[:-2])
    n_q, n_k = x.shape[-2], x.shape[-1]
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
    return p, log_z


def _exact_backward(
    x: Tensor, g: Tensor, u: Tensor, log_z: Tensor, h: Tensor, c: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dL/dx, dL/dg, dL/du)`` with full batch shapes, recomputing ``P`` chunk by chunk."""
    n_k = x.shape[-1]
    batch = log_z.shape[:-2]
    dx = torch.zeros_like(log_z)
    dg = log_z.new_zeros((*batch, n_k, n_k))
    du = torch.empty_like(log_z)
    xe = x.unsqueeze(-1)
    for i0 in range(0, n_k, c):
        i1 = min(n_k, i0 + c)
        P = xe + g[..., i0:i1].unsqueeze(-3)
        P.sub_(log_z[..., i0:i1].unsqueeze(-2)).exp_()  # (..., Q, K_j, c)
        cq = torch.matmul(h.unsqueeze(-2), P).squeeze(-2)  # (..., Q, c): E_{P_i}[h]
        du[..., i0:i1] = cq
        T = P * u[..., i0:i1].unsqueeze(-2)  # u_qi P_qki, (..., Q, K, c)
        T.mul_(h.unsqueeze(-1) - cq.unsqueeze(-2))  # * (h_qk - c_qi)
        dx += T.sum(dim=-1)
        dg[..., i0:i1] = T.sum(dim=-3)
    return dx, dg, du


# --------------------------------------------------------------------------------------- GEMMs


def _unravel(n: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for size in reversed(shape):
        n, r = divmod(n, size)
        out.append(r)
    return tuple(reversed(out))


class _Fallback:
    """Rows of one batch element computed exactly: flat and multi-index, rows, ``log Z``."""

    __slots__ = ("flat", "index", "rows", "log_z")

    def __init__(self, flat: int, batch: torch.Size, rows: Tensor) -> None:
        self.flat, self.index, self.rows = flat, _unravel(flat, tuple(batch)), rows
        self.log_z: Tensor | None = None

    def inputs(self, x: Tensor, g: Tensor, u: Tensor, batch: torch.Size) -> tuple[Tensor, Tensor, Tensor]:
        """``x`` rows ``(m, K)``, ``g`` ``(K, K)`` and ``u`` rows ``(m or 1, K)`` of these rows."""
        xs = x.expand(*batch, *x.shape[-2:])[self.index].index_select(0, self.rows)
        gs = g.expand(*batch, *g.shape[-2:])[self.index]
        us = u.expand(*batch, *u.shape[-2:])[self.index]
        if us.shape[0] == x.shape[-2]:
            us = us.index_select(0, self.rows)
        return xs, gs, us


class OTAttentionFunction(torch.autograd.Function):
    """``p_qj = sum_i u_qi softmax_j(x_qj + g_ji)`` by GEMMs, failing rows exactly (module doc)."""

    @staticmethod
    def forward(ctx, x: Tensor, g: Tensor, u: Tensor, chunk_size: int | None) -> Tensor:  # type: ignore[override]
        # x: (..., Q, K) with -inf on masked keys; g: (..., K, K); u: (..., Q or 1, K), rows sum to 1
        batch = torch.broadcast_shapes(x.shape[:-2], g.shape[:-2], u.shape[:-2])
        n_q, n_k = x.shape[-2], x.shape[-1]
        E = (x - x.amax(dim=-1, keepdim=True)).exp_()  # (..., Q, K), rows with max 1
        F = (g - g.amax(dim=-2, keepdim=True)).exp_()  # (..., K, K), columns with max 1
        W = torch.matmul(E, F)  # (..., Q, K)
        fallbacks: list[_Fallback] = []
        log_min = _safe_log_min(W.dtype)
        if not bool(W.amin() >= math.exp(-log_min)):  # some entries may have underflowed
            ok = W >= math.exp(-log_min)
            # rows with an uncertified entry for an allowed (or preferred) source template i
            bad = (~ok & ((u > 0) | torch.isfinite(x))).any(dim=-1, keepdim=True)  # (..., Q, 1)
            W = torch.where(ok & ~bad, W, math.inf)  # w = 0 and c = 0 there: no GEMM contribution
            bad_flat = bad.expand(*batch, n_q, 1).reshape(-1, n_q)
            for flat in bad_flat.any(dim=-1).nonzero().squeeze(1).tolist():
                fallbacks.append(_Fallback(flat, batch, bad_flat[flat].nonzero().squeeze(1)))
        w = u / W  # (..., Q, K)
        p = E * torch.matmul(w, F.transpose(-1, -2))  # (..., Q, K)
        if fallbacks:
            c = _chunk_size(1, n_q, n_k, chunk_size)
            p_flat = p.view(-1, n_q, n_k)
            for fb in fallbacks:
                ps, fb.log_z = _exact_forward(*fb.inputs(x, g, u, batch), c)
                p_flat[fb.flat].index_copy_(0, fb.rows, ps)
        ctx.chunk = chunk_size
        ctx.fallbacks = fallbacks
        ctx.shapes = (x.shape, g.shape, u.shape)
        ctx.save_for_backward(x if fallbacks else None, g if fallbacks else None, u, E, F, w, W, p)
        return p

    @staticmethod
    def backward(ctx, h: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:  # type: ignore[override]
        x, g, u, E, F, w, W, p = ctx.saved_tensors
        x_shape, g_shape, u_shape = ctx.shapes
        need_x, need_g, need_u = ctx.needs_input_grad[:3]
        hE = h * E  # (..., Q, K)
        cq = torch.matmul(hE, F).div_(W)  # c_qi = E_{P_i}[h], (..., Q, K)
        wc = w * cq
        dx = dg = None
        if need_x:
            dx = torch.addcmul(h * p, E, torch.matmul(wc, F.transpose(-1, -2)), value=-1.0)
        if need_g:
            dg = torch.matmul(hE.transpose(-1, -2), w).sub_(torch.matmul(E.transpose(-1, -2), wc)).mul_(F)
        du = cq
        if ctx.fallbacks:
            batch = p.shape[:-2]
            n_q, n_k = p.shape[-2:]
            c = _chunk_size(1, n_q, n_k, ctx.chunk)
            views = []
            for t in (dx, du):
                views.append(None if t is None else t.view(-1, n_q, n_k))
            dx_flat, du_flat = views
            if dg is not None:
                dg = dg.expand(*batch, n_k, n_k).contiguous()
                dg_flat = dg.view(-1, n_k, n_k)
            h_flat = h.reshape(-1, n_q, n_k)
            for fb in ctx.fallbacks:
                xs, gs, us = fb.inputs(x, g, u, batch)
                hs = h_flat[fb.flat].index_select(0, fb.rows)
                dxs, dgs, dus = _exact_backward(xs, gs, us, fb.log_z, hs, c)
                if dx_flat is not None:
                    dx_flat[fb.flat].index_copy_(0, fb.rows, dxs)
                du_flat[fb.flat].index_copy_(0, fb.rows, dus)
                if dg is not None:
                    dg_flat[fb.flat] += dgs
        return (
            sum_to_shape(dx, x_shape) if dx is not None else None,
            sum_to_shape(dg, g_shape) if dg is not None else None,
            sum_to_shape(du, u_shape) if need_u else None,
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
    """Solves the OT-regularised inference problem of eq. (21) in closed form, eq. (22) / (44).

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
        chunk_size: number of source templates ``i`` per chunk in the exact fallback for rows
            whose GEMM values underflow (default: about ``2**24`` elements per ``(Q, K, chunk)``
            block); the GEMM path does not chunk.

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
    # else (..., Q, K): a preference per query (e.g. T5's position bias as u, eq. (17))

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
