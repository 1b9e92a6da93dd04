"""Sparsemax: Euclidean projection of the logits onto the probability simplex.

Solves ``max_p <s, p> - 1/2 ||p||^2`` over the simplex of allowed keys, i.e.
``argmin_p ||p - s||^2`` (Martins & Astudillo 2016, "From Softmax to Sparsemax", eq. (2); Omega = 1/2 ||p||^2 in the
table of regularised attention maps).  The solution is ``p_j = max(s_j - tau, 0)`` with the threshold ``tau`` fixed by
``sum_j p_j = 1``; on the support S the Jacobian is ``I - 1 1^T / |S|`` (eq. (12) there), so the
backward pass is ``ds_j = [j in S] (g_j - mean_S(g))``.

Speed.  The threshold only depends on the entries within 1 of the row maximum (``tau >= max - 1``
because ``p_max <= 1``), so instead of sorting whole rows (what ``entmax.sparsemax`` does) we
shift the rows to max 0, clamp everything below -1 to -2 (those entries are outside the support
and stay there), and sort only the top ``k`` entries with ``torch.topk``, ``k`` being estimated
from the exact support sizes of a sample of rows.  Rows whose support might not fit in the top ``k`` are detected exactly
and redone with their own ``k`` (or a full sort).  Under ``torch.compile`` a plain full sort is used
(no data-dependent shapes).  The ``entmax15`` core reuses the same driver
(:func:`_partial_sort_threshold`) with its own threshold hook.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._masking import check_logits, check_mask, compute_dtype

__all__ = ["sparsemax_weights"]

ThresholdFn = Callable[[Tensor], tuple[Tensor, Tensor]]

# Below this many keys a full sort is as cheap as the top-k machinery.
_FULL_SORT_MAX_KEYS = 64
# Rows sampled to estimate how many entries lie within the candidate window.
_SAMPLE_ROWS = 256


def _shifted_rows(logits: Tensor, mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor | None]:
    """Core preprocessing shared by the sort-based maps.

    Returns ``X`` of shape ``(R, n)`` (a fresh buffer, compute dtype) with
    ``X = max(scale * (logits - rowmax), -2)`` where ``rowmax`` is taken over the allowed keys.
    Entries ``<= -1`` are never in the support (the threshold is ``>= -1`` when the row max is 0), so
    clamping them, and setting masked keys, to -2 leaves the solution unchanged; -2 rather than -1
    avoids exact ties with the threshold ``-1`` of a one-element support (whose rounding would
    leave ~1e-32 instead of exact zeros).  A fully masked row becomes all -2 (its output is zeroed
    afterwards).  Also returns the
    ``(R, 1)`` float indicator of rows with at least one allowed key (None without mask).
    """
    n = logits.shape[-1]
    cdtype = compute_dtype(logits.dtype)
    if mask is None:
        x = logits.to(cdtype)
        m = x.amax(dim=-1, keepdim=True)
        X = x - m  # fresh buffer
        row_valid = None
    else:
        X = torch.where(mask, logits.to(cdtype), float("-inf"))  # fresh buffer
        m = X.amax(dim=-1, keepdim=True)
        allowed = m != float("-inf")  # a NaN row stays valid: NaN, as without a mask
        m = torch.where(allowed, m, torch.zeros_like(m))
        X.sub_(m)
        row_valid = allowed.to(cdtype).reshape(-1, 1)
    if scale != 1.0:
        X.mul_(scale)
    X.clamp_(min=-2.0)
    return X.reshape(-1, n), row_valid


def _candidate_count(X: Tensor) -> Tensor:
    """Per-row number of entries that may be in the support (``X > -1``), as int64 ``(R,)``."""
    return (X > -1.0).view(torch.uint8).sum(dim=-1, dtype=torch.int64)


def _sorted_top(X: Tensor, k: int) -> Tensor:
    """The ``k`` largest entries of each row of ``X``, in decreasing order."""
    n = X.shape[-1]
    if 2 * k >= n:
        return torch.sort(X, dim=-1, descending=True).values
    return torch.topk(X, k, dim=-1, sorted=True).values


def _partial_sort_threshold(
    X: Tensor, threshold: ThresholdFn, support_hint: int | None = None
) -> tuple[Tensor, Tensor]:
    """Exact threshold of each row of ``X`` ``(R, n)`` from a partial sort of its largest entries.

    ``X`` rows have max 0 (or are all -2) and entries ``<= -1`` are outside the support.
    ``threshold(V)`` maps sorted-decreasing top entries ``V`` ``(r, k)`` to ``(tau, support_size)``
    (both ``(r, 1)``); it must be exact whenever the support has fewer than ``k`` entries or all
    entries ``> -1`` are in ``V``.  Rows for which neither is certain are recomputed.  ``k`` is
    estimated from ``support_hint`` (e.g. the largest support of similar rows already solved) or,
    without one, from the exact support sizes of a sample of rows; it only affects the speed.
    """
    R, n = X.shape
    if torch.compiler.is_compiling() or n <= _FULL_SORT_MAX_KEYS or R == 0:
        return threshold(torch.sort(X, dim=-1, descending=True).values)

    if support_hint is None:  # exact support sizes of a sample of rows (host sync, eager only)
        step = max(1, R // _SAMPLE_ROWS)
        _, supp_sample = threshold(torch.sort(X[::step], dim=-1, descending=True).values)
        support_hint = int(supp_sample.max())
    k = min(n, max(8, math.ceil(1.25 * support_hint) + 1))
    V = _sorted_top(X, k)
    tau, supp = threshold(V)
    if V.shape[-1] == n:
        return tau, supp
    # exact unless the support may continue past the top k
    unsolved = (V[:, -1] > -1.0) & (supp[:, 0] >= V.shape[-1])
    idx = unsolved.nonzero().squeeze(1)
    if idx.numel() > 0:
        Xu = X.index_select(0, idx)
        ku = int(_candidate_count(Xu).max())
        tau_u, supp_u = threshold(_sorted_top(Xu, max(ku, 1)))
        tau = tau.index_copy(0, idx, tau_u)
        supp = supp.index_copy(0, idx, supp_u)
    return tau, supp


def _sparsemax_threshold(V: Tensor) -> tuple[Tensor, Tensor]:
    """Sparsemax threshold from sorted-decreasing entries ``V`` ``(r, k)``.

    Support size ``s = max{j : 1 + j v_j > sum_{i<=j} v_i}`` and
    ``tau = (sum_{i<=s} v_i - 1) / s`` (Martins & Astudillo 2016, Algorithm 1); the condition holds
    exactly for ``j <= s``, so counting it over a top-``k`` prefix is exact when the count is < k.
    """
    k = V.shape[-1]
    rho = torch.arange(1, k + 1, device=V.device, dtype=V.dtype)
    csum = V.cumsum(dim=-1) - 1.0
    supp = (rho * V > csum).sum(dim=-1, keepdim=True).clamp_(min=1)  # (r, 1)
    tau = csum.gather(-1, supp - 1) / supp.to(V.dtype)
    return tau, supp


class SparsemaxFunction(torch.autograd.Function):
    """Sparsemax over the last axis with the support-restricted Jacobian as backward."""

    @staticmethod
    def forward(ctx, logits: Tensor, mask: Tensor | None) -> Tensor:  # type: ignore[override]
        shape = logits.shape
        X, row_valid = _shifted_rows(logits, mask, 1.0)  # (R, n)
        tau, _ = _partial_sort_threshold(X, _sparsemax_threshold)
        P = X.sub_(tau).clamp_(min=0.0)  # in place: X is our buffer
        if row_valid is not None:
            P.mul_(row_valid)  # fully masked rows -> exactly 0
        out = P.reshape(shape).to(logits.dtype)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        (out,) = ctx.saved_tensors
        cdtype = compute_dtype(out.dtype)
        supp = out > 0  # bool: one byte per entry, the only temporary besides g
        g = torch.where(supp, grad_out.to(cdtype), 0.0)
        cnt = supp.sum(dim=-1, keepdim=True, dtype=cdtype).clamp_(min=1.0)
        v_hat = g.sum(dim=-1, keepdim=True) / cnt  # mean of g over the support
        g.sub_(v_hat).mul_(supp)
        return g.to(grad_out.dtype), None


def sparsemax_weights(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Solves ``max_p <logits, p> - 1/2 ||p||^2`` over the simplex of allowed keys (sparsemax).

    Exact (sort-based threshold, Martins & Astudillo 2016, Algorithm 1), with exact zeros outside
    the support and the Jacobian ``diag(s) - s s^T / |S|`` (s = support indicator) as backward.

    Args:
        logits: ``(..., n_queries, n_keys)`` float tensor (any float dtype).
        mask: optional bool tensor broadcastable to ``logits``; True = may attend.

    Returns:
        Weights of the shape and dtype of ``logits``; rows with an allowed key sum to 1, masked
        entries and fully masked rows are exactly 0 (gradient 0 there).
    """
    check_logits(logits)
    mask = check_mask(mask, logits.shape)
    return SparsemaxFunction.apply(logits, mask)
