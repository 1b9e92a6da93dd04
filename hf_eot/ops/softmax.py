"""Masked softmax: the one-sided entropic optimal-transport solution.

Solves ``max_p <s, p> + H(p)`` over the probability simplex restricted to the allowed keys, with
``H(p) = -sum_j p_j log p_j`` the Shannon entropy (Omega = -H).  The solution is
``p_j = exp(s_j) / sum_k exp(s_k)``: the attention row of "Scaled-Dot-Product Attention as
One-Sided Entropic Optimal Transport" (Litman, arXiv:2508.08369; cost C_j = -<q, k_j>, temperature eps = tau, here folded into
the logits by the caller: ``logits = scores / eps + log_prior``).  Its Jacobian is
``diag(p) - p p^T``, so the backward pass is ``ds_j = p_j (g_j - E_p[g])``.

Native ``torch.softmax`` already has the right backward, so there is no custom autograd Function
here; the work is in the masking: masked keys get exactly 0, and a row without any allowed key (a
non-existent query) gets exactly 0 weights and 0 gradient, never NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._masking import check_logits, check_mask, compute_dtype

__all__ = ["softmax_weights"]


def _masked_softmax(logits: Tensor, mask: Tensor | None) -> Tensor:
    """Core: softmax over the last axis in the compute dtype; fully masked rows -> 0."""
    cdtype = compute_dtype(logits.dtype)
    if mask is None:
        return torch.softmax(logits, dim=-1, dtype=cdtype)
    x = logits.to(cdtype)
    row_valid = mask.any(dim=-1, keepdim=True)  # (..., Q, 1)
    # masked keys -> -inf; a fully masked row -> all zeros (finite, so softmax and its backward
    # stay NaN-free), then its output is zeroed by the final `where`.
    x = torch.where(mask, x, torch.where(row_valid, float("-inf"), 0.0))
    p = torch.softmax(x, dim=-1)
    return torch.where(mask, p, 0.0)


def softmax_weights(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Solves ``max_p <logits, p> + H(p)`` over the simplex of allowed keys (masked softmax).

    Args:
        logits: ``(..., n_queries, n_keys)`` float tensor (any float dtype); temperature and log
            prior are already folded in by the caller.
        mask: optional bool tensor broadcastable to ``logits``; True = may attend.

    Returns:
        Weights of the shape and dtype of ``logits``; each row with at least one allowed key sums
        to 1, masked entries and fully masked rows are exactly 0 (with 0 gradient).  Half dtypes
        are computed in float32.
    """
    check_logits(logits)
    mask = check_mask(mask, logits.shape)
    return _masked_softmax(logits, mask).to(logits.dtype)
