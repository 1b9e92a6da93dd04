"""Fused alpha-entmax attention (sparsemax at alpha = 2), in blocks of queries, sparse where it pays.

``out = P V`` with ``P = entmax_alpha(L)`` row by row and ``L = (Q K^T) * scale / epsilon + log_prior``
(masked keys excluded), without materialising the ``(n_queries, n_keys)`` weights of a whole head.
Every alpha-entmax row is ``p_j = [(alpha - 1) (L_j - m) - tau]_+^{1/(alpha-1)} / Z`` (Peters,
Niculae & Martins 2019, eq. (10)) with ``m`` the row maximum, ``tau`` the threshold and ``Z`` 1 for the
exact maps (alpha = 2, 1.5) or the sum before renormalisation (Newton's threshold, other alpha).

Per block of queries the scores come from one matrix product.  The first block finds its thresholds
over whole rows; every later one from the ``k`` largest entries of each row (``torch.topk``, ``k`` a
little above the previous block's largest support), which is exact when every row's support lies in its
top ``k`` (checked per row; ``k`` is doubled once, then the block falls back to whole rows).  The
block's mode follows ``k``:

* **gather** (``k <= n_keys / 32``, e.g. sparsemax): only the support weights ``(q, k)`` and their key
  indices are kept.  ``P V`` and the whole backward are gathers over the support, ``O(q k d)`` instead
  of ``O(q n d)``: with ``g = p^{2 - alpha}`` on the support (1 for sparsemax),
  ``dL = g dP - g <g, dP> / sum(g)`` (the entmax Jacobian; Correia, Niculae & Martins 2019,
  "Adaptively Sparse Transformers", Appendix B) with ``dP_j = <dO, v_j>`` only for support keys.
* **scatter** (``k <= n_keys / 3``, e.g. 1.5- and 1.3-entmax): the same support is kept, and the
  products are matrix products on the weights scattered into a dense block (no recomputed scores).
* **dense** (the first block, and wider supports): only ``m, tau, Z`` per row, as the log-sum-exp in
  flash attention; the backward recomputes the block's scores and ``P`` bit for bit.

Peak memory per head is one block of scores (``O(n_keys * block)``) plus the kept supports
(``O(n_queries * k)``, 12 bytes per entry), instead of the several ``(n_queries, n_keys)`` tensors of
computing the weights first.  The values equal those of
:func:`hf_eot.ops.entmax_weights` followed by ``@ value`` to round-off (tests compare them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._masking import compute_dtype, sum_to_shape
from .entmax import DEFAULT_MAX_ITERS, _entmax15_threshold, _entmax_newton_threshold
from .sparsemax import ThresholdFn, _partial_sort_threshold, _sparsemax_threshold

__all__ = ["DEFAULT_BLOCK_ELEMENTS", "entmax_attention", "fused_pays"]

#: The fused map pays from about this many keys on; with fewer (e.g. 128 or 256 tokens) computing and
#: storing the weights is faster, and they are small (``python benchmarks/fused_crossover.py``) ...
FUSED_MIN_KEYS = 384
#: ... or once the scores of a call would hold this many entries (1 GiB of float32), whatever the length.
FUSED_MIN_SCORES = 2**28

#: Score entries per block (all batches and heads together): 2**21 float32 = 8 MiB ...
DEFAULT_BLOCK_ELEMENTS = 2**21
#: ... but never fewer queries than this per block.
_MIN_BLOCK_QUERIES = 16
#: The threshold comes from each row's top k while k is at most this fraction of the keys ...
_TOP_K_FRACTION = 1 / 3
#: ... and the block's products are gathers over the support (instead of matrix products on the weights
#: scattered into a dense block) while k is at most this fraction.
_GATHER_FRACTION = 1 / 32


@dataclass
class _SparseBlock:
    """A block's support: weights ``(B, H, q, k)`` (before dropout), key indices, dropout multipliers, and
    whether its products are gathers over the support (else matrix products on the scattered weights)."""

    rows: slice
    weights: Tensor
    index: Tensor  # int64 (B, H, q, k), into the keys
    keep: Tensor | None
    gather: bool


@dataclass
class _DenseBlock:
    """A block's row statistics ``(B, H, q, 1)``: maximum, threshold, normaliser (and its dropout seed)."""

    rows: slice
    row_max: Tensor
    tau: Tensor
    total: Tensor | None
    seed: int


def _block_logits(
    query: Tensor, key_t: Tensor, log_prior: Tensor | None, cdtype: torch.dtype, buffer: Tensor
) -> Tensor:
    """``L = Q K^T + log_prior`` ``(B, H, q, K)`` for one block of (already scaled) queries, compute dtype,
    written into ``buffer`` (reused from block to block: a fresh multi-MiB allocation per block costs page
    faults)."""
    shape = (*query.shape[:-1], key_t.shape[-1])
    logits = buffer.view(-1)[: shape[0] * shape[1] * shape[2] * shape[3]].view(shape)
    if query.dtype == cdtype:
        torch.matmul(query, key_t, out=logits)
    else:
        logits.copy_(query @ key_t)
    if log_prior is not None:
        logits += log_prior.to(cdtype)
    return logits


def _row_max(logits: Tensor, masked: bool) -> Tensor:
    """Row maximum ``(..., q, 1)`` of logits whose masked keys are already -inf; with a mask, 0 for a fully
    masked row (without one, a row of -inf logits keeps -inf and gives NaN, as the weights path does)."""
    m = logits.amax(dim=-1, keepdim=True)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m)) if masked else m


def _floor(alpha: float) -> float:
    """Value of the entries that can never be in the support (the threshold is ``>= -1``): -2 for the
    sort-based thresholds (no exact ties with ``tau = -1``), -1 for Newton's bracket."""
    return -2.0 if alpha in (1.5, 2.0) else -1.0


def _shifted(logits: Tensor, mask: Tensor | None, row_max: Tensor, alpha: float) -> Tensor:
    """``X = max((alpha - 1) (L - m), floor)`` in place on ``logits``, masked keys at the floor."""
    X = logits.sub_(row_max)
    if alpha != 2.0:
        X.mul_(alpha - 1.0)
    X.clamp_(min=_floor(alpha))
    if mask is not None:
        X.masked_fill_(~mask, _floor(alpha))
    return X


def _power(t: Tensor, alpha: float) -> Tensor:
    """``t^{1/(alpha-1)}`` (a fresh tensor, or ``t`` itself for sparsemax)."""
    if alpha == 2.0:
        return t
    if alpha == 1.5:
        return t * t
    return t.pow(1.0 / (alpha - 1.0))


def _sort_rule(alpha: float) -> ThresholdFn:
    """The sort-based threshold rule of the exact maps (alpha = 2 or 1.5)."""
    return _sparsemax_threshold if alpha == 2.0 else _entmax15_threshold


def _newton_total(X: Tensor, tau: Tensor, alpha: float) -> Tensor:
    """Newton's normaliser ``Z = sum_j [X_j - tau]_+^{1/(alpha-1)}`` ``(..., 1)``, 1 where it is 0."""
    total = _power(torch.sub(X, tau).clamp_(min=0.0), alpha).sum(dim=-1, keepdim=True)
    return torch.where(total > 0, total, torch.ones_like(total))


def _top_threshold(V: Tensor, alpha: float, max_iters: int) -> tuple[Tensor, Tensor | None, Tensor]:
    """Threshold from the sorted-decreasing top entries ``V`` ``(R, k)`` of rows of max 0.

    Returns ``(tau, total, exact)`` ``(R, 1)`` (``total`` None for the exact maps): ``exact`` says the
    support lies in ``V`` (then ``tau`` is the row's threshold): fewer than ``k`` entries in the support,
    or ``V`` holds every entry above the floor (sort-based rules); the last entry of ``V`` at or below
    ``tau`` (Newton).
    """
    k = V.shape[-1]
    if alpha in (1.5, 2.0):
        tau, support = _sort_rule(alpha)(V)
        return tau, None, (support < k) | (V[:, -1:] <= -1.0)
    tau = _entmax_newton_threshold(V, alpha - 1.0, float(k), max_iters)
    return tau, _newton_total(V, tau, alpha), V[:, -1:] <= tau


def _top_support(
    logits: Tensor, alpha: float, max_iters: int, k: int, masked: bool
) -> tuple[Tensor, Tensor] | None:
    """Weights ``(R, k')`` on the top ``k'`` entries of every row of ``logits`` ``(R, n)`` (masked keys at
    -inf) and their indices, with ``k' = k``, or ``2 k`` if some row's support does not fit in its top
    ``k``; None if it does not fit in the top ``2 k`` either, or ``k'`` exceeds the top-k fraction of the
    keys.  Only the top entries are shifted and scaled: ``X = max((alpha - 1) (V - m), floor)``.  A row
    whose maximum is -inf is a fully masked query (``masked``: weights zeroed later) or, without a mask,
    a row of -inf logits, left to the whole-row path, which gives NaN as the weights path does."""
    for k_try in (k, 2 * k):
        if k_try > _TOP_K_FRACTION * logits.shape[-1]:
            return None
        V, index = torch.topk(logits, k_try, dim=-1, sorted=True)
        X = _shifted(V, None, _row_max(V[:, :1], masked), alpha)  # _row_max copies: V is shifted in place
        tau, total, exact = _top_threshold(X, alpha, max_iters)
        if bool(exact.all()):
            P = _power(X.sub_(tau).clamp_(min=0.0), alpha)
            return (P if total is None else P.div_(total)), index
    return None


def _dense_threshold(
    X: Tensor, mask: Tensor | None, alpha: float, max_iters: int, support_hint: int | None
) -> tuple[Tensor, Tensor | None]:
    """The exact threshold of every row of ``X`` ``(B, H, q, K)`` over all keys, and Newton's normaliser."""
    shape = (*X.shape[:-1], 1)
    if alpha in (1.5, 2.0):
        tau = _partial_sort_threshold(X.reshape(-1, X.shape[-1]), _sort_rule(alpha), support_hint)[0]
        return tau.reshape(shape), None
    allowed = float(X.shape[-1]) if mask is None else mask.sum(dim=-1, keepdim=True).clamp_(min=1).to(X.dtype)
    tau = _entmax_newton_threshold(X, alpha - 1.0, allowed, max_iters)
    return tau, _newton_total(X, tau, alpha)


def _dense_weights(
    X: Tensor, tau: Tensor, total: Tensor | None, row_valid: Tensor | None, alpha: float
) -> tuple[Tensor, Tensor]:
    """``P = t^{1/(alpha-1)} / Z`` with ``t = [X - tau]_+`` (in place on ``X``) and fully masked rows 0;
    returns ``(P, t)`` (``t = sqrt(P)`` for 1.5-entmax, ``t = P`` for sparsemax)."""
    t = X.sub_(tau).clamp_(min=0.0)
    if row_valid is not None:
        t.mul_(row_valid)
    P = _power(t, alpha)
    if total is not None:
        P.div_(total)
    return P, t


def _gppr(P: Tensor, alpha: float) -> Tensor:
    """``g = p^{2 - alpha}`` on the support, 0 elsewhere (``2 - alpha >= 0`` here)."""
    if alpha == 2.0:
        return torch.sign(P)
    if alpha == 1.5:
        return torch.sqrt(P)
    return P.pow(2.0 - alpha)


def _entmax_backward(dP: Tensor, gppr: Tensor) -> Tensor:
    """``dL = g dP - g <g, dP> / sum(g)`` (in place on ``dP``): the gradient w.r.t. the logits."""
    dL = dP.mul_(gppr)
    den = gppr.sum(dim=-1, keepdim=True)
    coef = dL.sum(dim=-1, keepdim=True) / torch.where(den > 0, den, torch.ones_like(den))
    return dL.addcmul_(gppr, coef, value=-1.0)


def _scattered(buffer: Tensor, index: Tensor, weights: Tensor) -> Tensor:
    """The dense ``(B, H, q, K)`` block (in ``buffer``'s memory) that holds ``weights`` ``(B, H, q, k)`` at
    the key indices ``index`` and 0 elsewhere."""
    shape = (*index.shape[:-1], buffer.shape[-1])
    dense = buffer.view(-1)[: shape[0] * shape[1] * shape[2] * shape[3]].view(shape)
    if dense.dtype != weights.dtype:
        dense = torch.zeros(shape, dtype=weights.dtype, device=weights.device)
    return dense.zero_().scatter_(-1, index, weights)


def _flat_index(index: Tensor, rows: Tensor) -> Tensor:
    """Key indices ``(B, H, q, k)`` into ``rows`` ``(B, H, K, d)`` as indices into its ``(B H K, d)`` view."""
    batch, heads, n_keys, _ = rows.shape
    offsets = torch.arange(batch * heads, device=index.device).view(batch, heads, 1, 1) * n_keys
    return (index + offsets).reshape(-1)


def _gather_rows(source: Tensor, index: Tensor) -> Tensor:
    """``source[b, h, index[b, h, i, j], :]`` ``(B, H, q, k, d)`` from ``source`` ``(B, H, K, d)``."""
    dim = source.shape[-1]
    return source.reshape(-1, dim).index_select(0, _flat_index(index, source)).view(*index.shape, dim)


def _scatter_rows(target: Tensor, index: Tensor, rows: Tensor) -> None:
    """``target[b, h, index[b, h, i, j], :] += rows[b, h, i, j, :]`` for ``target`` ``(B, H, K, d)``."""
    dim = target.shape[-1]
    target.view(-1, dim).index_add_(0, _flat_index(index, target), rows.reshape(-1, dim).to(target.dtype))


class EntmaxAttentionFunction(torch.autograd.Function):
    """``entmax_alpha(Q K^T * scale / epsilon + log_prior) V`` in query blocks (see the module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        query: Tensor,  # (B, H, Q, d)
        key: Tensor,  # (B, H, K, d)
        value: Tensor,  # (B, H, K, d_v)
        mask: Tensor | None,  # bool (B, H, Q, K), possibly an expanded view
        log_prior: Tensor | None,  # float (B|1, H|1, Q|1, K)
        scale: float,
        epsilon: float,
        alpha: float,
        max_iters: int,
        block: int,
        dropout: float,
    ) -> Tensor:
        cdtype = compute_dtype(query.dtype)
        n_queries, n_keys = query.shape[-2], key.shape[-2]
        out = value.new_empty((*query.shape[:-1], value.shape[-1]))  # (B, H, Q, d_v)
        query = query * (scale / epsilon)  # the logits' scale folded into the (small) queries
        key_t = key.transpose(-1, -2).contiguous()  # (B, H, d, K): products without transposed operands
        # one seed per call from the default generator; a dense block's dropout mask is drawn from
        # seed + its first row, so the backward regenerates it instead of storing it
        seed = int(torch.randint(2**62, (), device="cpu")) if dropout > 0.0 else 0
        buffer = query.new_empty((*query.shape[:-2], min(block, n_queries), n_keys), dtype=cdtype)
        blocks: list[_SparseBlock | _DenseBlock] = []
        support: int | None = None  # the largest support of the previous block
        for start in range(0, n_queries, block):
            rows = slice(start, min(start + block, n_queries))
            mask_b, prior_b = _rows(mask, rows), _rows(log_prior, rows)
            logits = _block_logits(query[..., rows, :], key_t, prior_b, cdtype, buffer)  # (B, H, q, K)
            if mask_b is not None:
                logits.masked_fill_(~mask_b, float("-inf"))
            row_valid = _row_valid(mask_b, cdtype)
            top = None
            if support is not None and not torch.compiler.is_compiling():
                guess = max(8, (5 * support) // 4 + 1)
                top = _top_support(logits.view(-1, n_keys), alpha, max_iters, guess, mask_b is not None)
            if top is not None:
                P, index = top  # (R, k)
                shape = (*logits.shape[:-1], P.shape[-1])
                P, index = P.view(shape), index.view(shape)
                if row_valid is not None:
                    P.mul_(row_valid)
                support = int((P > 0).sum(dim=-1).max())
                keep = _bernoulli_keep(P, dropout) if dropout > 0.0 else None
                dropped = (P if keep is None else P * keep).to(value.dtype)
                gather = P.shape[-1] <= _GATHER_FRACTION * n_keys
                if gather:
                    values = _gather_rows(value, index)  # (B, H, q, k, d_v)
                    out[..., rows, :] = (dropped.unsqueeze(-2) @ values).squeeze(-2)
                else:
                    out[..., rows, :] = _scattered(logits, index, dropped) @ value
                blocks.append(_SparseBlock(rows, P, index, keep, gather))
            else:
                row_max = _row_max(logits, mask_b is not None)
                X = _shifted(logits, mask_b, row_max, alpha)
                tau, total = _dense_threshold(X, mask_b, alpha, max_iters, support)
                P, _ = _dense_weights(X, tau, total, row_valid, alpha)
                if not torch.compiler.is_compiling():
                    support = int((P > 0).sum(dim=-1).max())
                if dropout > 0.0:
                    P.mul_(_seeded_keep(P, dropout, seed + start))
                out[..., rows, :] = P.to(value.dtype) @ value
                blocks.append(_DenseBlock(rows, row_max, tau, total, seed + start))
        ctx.save_for_backward(query, key, value, mask, log_prior)  # query: scaled
        ctx.blocks = blocks
        ctx.settings = (scale, epsilon, alpha, dropout)
        return out

    @staticmethod
    @once_differentiable  # a second derivative raises instead of silently missing terms
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        query, key, value, mask, log_prior = ctx.saved_tensors
        scale, epsilon, alpha, dropout = ctx.settings
        cdtype = compute_dtype(query.dtype)
        need_q, need_k, need_v, _, need_prior = ctx.needs_input_grad[:5]
        key_t = key.transpose(-1, -2).contiguous()  # (B, H, d, K)
        value_t = value.transpose(-1, -2).contiguous()  # (B, H, d_v, K)
        d_query = torch.zeros_like(query) if need_q else None
        # dense blocks accumulate the key and value gradients transposed, (B, H, d, K), sparse ones untransposed
        d_key = torch.zeros(key.shape, dtype=cdtype, device=key.device) if need_k else None
        d_value = torch.zeros(value.shape, dtype=cdtype, device=value.device) if need_v else None
        d_key_t = torch.zeros(key_t.shape, dtype=cdtype, device=key.device) if need_k else None
        d_value_t = torch.zeros(value_t.shape, dtype=cdtype, device=value.device) if need_v else None
        d_prior = torch.zeros(log_prior.shape, dtype=cdtype, device=log_prior.device) if need_prior else None
        dense_rows = max(
            (b.rows.stop - b.rows.start for b in ctx.blocks if not (isinstance(b, _SparseBlock) and b.gather)),
            default=0,
        )
        buffer = query.new_empty((*query.shape[:-2], dense_rows, key.shape[-2]), dtype=cdtype)
        for blk in ctx.blocks:
            rows = blk.rows
            q_b, g_b = query[..., rows, :], grad_out[..., rows, :]
            if isinstance(blk, _SparseBlock):
                P, keep, index = blk.weights, blk.keep, blk.index  # (B, H, q, k)
                dropped = (P if keep is None else P * keep).to(g_b.dtype)
                if not blk.gather:  # matrix products on the weights scattered into a dense block
                    dense = _scattered(buffer, index, dropped)  # (B, H, q, K)
                    if need_v:
                        d_value_t += (g_b.transpose(-1, -2).contiguous() @ dense).to(cdtype)
                    if not (need_q or need_k or need_prior):
                        continue
                    dL = (g_b @ value_t).gather(-1, index).to(cdtype)  # dP on the support
                    if keep is not None:
                        dL.mul_(keep)
                    dL = _entmax_backward(dL, _gppr(P, alpha))
                    dS = _scattered(buffer, index, dL.to(cdtype))  # (B, H, q, K)
                    if need_prior:
                        _add_rows(d_prior, rows, dS)
                    dS = dS.to(query.dtype)
                    if need_q:
                        d_query[..., rows, :] = dS @ key
                    if need_k:
                        d_key_t += (q_b.transpose(-1, -2).contiguous() @ dS).to(cdtype)
                    continue
                if need_v:
                    _scatter_rows(d_value, index, dropped.unsqueeze(-1) * g_b.unsqueeze(-2))
                if not (need_q or need_k or need_prior):
                    continue
                values = _gather_rows(value, index)  # (B, H, q, k, d_v)
                dL = (values * g_b.unsqueeze(-2)).sum(dim=-1, dtype=cdtype)  # dP on the support (B, H, q, k)
                if keep is not None:
                    dL.mul_(keep)
                dL = _entmax_backward(dL, _gppr(P, alpha))  # (B, H, q, k)
                if need_prior:
                    dense = torch.zeros((*dL.shape[:-1], key.shape[-2]), dtype=cdtype, device=dL.device)
                    _add_rows(d_prior, rows, dense.scatter_(-1, index, dL))
                dL = dL.to(query.dtype)
                if need_q:
                    keys = _gather_rows(key, index)  # (B, H, q, k, d)
                    d_query[..., rows, :] = (dL.unsqueeze(-2) @ keys).squeeze(-2)
                if need_k:
                    _scatter_rows(d_key, index, dL.unsqueeze(-1) * q_b.unsqueeze(-2))
                continue
            # dense block: recompute the scores and P as in the forward
            mask_b, prior_b = _rows(mask, rows), _rows(log_prior, rows)
            X = _shifted(_block_logits(q_b, key_t, prior_b, cdtype, buffer), mask_b, blk.row_max, alpha)
            P, t = _dense_weights(X, blk.tau, blk.total, _row_valid(mask_b, cdtype), alpha)  # (B, H, q, K)
            keep = _seeded_keep(P, dropout, blk.seed) if dropout > 0.0 else None
            if need_v:
                dropped = P if keep is None else P * keep
                d_value_t += (g_b.transpose(-1, -2).contiguous() @ dropped.to(value.dtype)).to(cdtype)
            if not (need_q or need_k or need_prior):
                continue
            dL = (g_b @ value_t).to(cdtype)  # (B, H, q, K): gradient w.r.t. the (dropped) weights
            if keep is not None:
                dL.mul_(keep)
            dL = _entmax_backward(dL, t if alpha == 1.5 else _gppr(P, alpha))  # sqrt(P) = t at 1.5
            if need_prior:
                _add_rows(d_prior, rows, dL)
            dS = dL.to(query.dtype)  # gradient w.r.t. (scaled Q) K^T
            if need_q:
                d_query[..., rows, :] = dS @ key
            if need_k:
                d_key_t += (q_b.transpose(-1, -2).contiguous() @ dS).to(cdtype)
        if d_query is not None:
            d_query.mul_(scale / epsilon)
        if d_key is not None:
            d_key = (d_key + d_key_t.transpose(-1, -2)).to(key.dtype)
        if d_value is not None:
            d_value = (d_value + d_value_t.transpose(-1, -2)).to(value.dtype)
        return (
            d_query,
            d_key,
            d_value,
            None,
            None if d_prior is None else d_prior.to(log_prior.dtype),
            None, None, None, None, None, None,
        )


def _bernoulli_keep(P: Tensor, dropout: float) -> Tensor:
    """Inverted-dropout multipliers (0 or ``1 / (1 - dropout)``) drawn from torch's default generator."""
    return torch.empty_like(P).bernoulli_(1.0 - dropout).div_(1.0 - dropout)


def _seeded_keep(P: Tensor, dropout: float, seed: int) -> Tensor:
    """Inverted-dropout multipliers of one dense block, the same for the same seed."""
    generator = torch.Generator(device=P.device).manual_seed(seed)
    keep = torch.empty_like(P).bernoulli_(1.0 - dropout, generator=generator)
    return keep.div_(1.0 - dropout)


def _rows(tensor: Tensor | None, rows: slice) -> Tensor | None:
    """The query rows ``rows`` of a tensor broadcast over ``(..., Q, K)`` (kept whole if broadcast in Q)."""
    if tensor is None or tensor.shape[-2] == 1:
        return tensor
    return tensor[..., rows, :]


def _row_valid(mask: Tensor | None, cdtype: torch.dtype) -> Tensor | None:
    """``(..., q, 1)`` indicator of rows with an allowed key (None without mask)."""
    return None if mask is None else mask.any(dim=-1, keepdim=True).to(cdtype)


def _add_rows(d_prior: Tensor, rows: slice, dL: Tensor) -> None:
    """Accumulate the logits' gradient of a block into the gradient of a broadcast log-prior."""
    if d_prior.shape[-2] == 1:
        d_prior += sum_to_shape(dL.sum(dim=-2, keepdim=True), d_prior.shape)
    else:
        target = d_prior[..., rows, :]
        target += sum_to_shape(dL, target.shape)


def fused_pays(query: Tensor, key: Tensor) -> bool:
    """Whether :func:`entmax_attention` beats computing the weights first for these shapes: long rows
    (at least :data:`FUSED_MIN_KEYS` keys), or scores too large to store comfortably."""
    n_keys = key.shape[-2]
    return n_keys >= FUSED_MIN_KEYS or query.shape[:-1].numel() * n_keys >= FUSED_MIN_SCORES


def _broadcasts(tensor: Tensor, shape: tuple[int, ...]) -> bool:
    """Whether ``tensor`` broadcasts to ``shape`` without enlarging it."""
    try:
        return tuple(torch.broadcast_shapes(tensor.shape, shape)) == tuple(shape)
    except RuntimeError:
        return False


def entmax_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    alpha: float = 1.5,
    mask: Tensor | None = None,
    log_prior: Tensor | None = None,
    scale: float | None = None,
    epsilon: float = 1.0,
    max_iters: int = DEFAULT_MAX_ITERS,
    dropout: float = 0.0,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> Tensor:
    """``entmax_alpha((Q K^T) * scale / epsilon + log_prior) @ V`` without storing the attention weights.

    alpha = 2 is sparsemax (Martins & Astudillo 2016), 1.5 the exact 1.5-entmax, any other float in
    (1, 2) the Newton threshold of :func:`hf_eot.ops.entmax_newton_weights` (at most ``max_iters``
    steps).  Same values as ``entmax_weights(logits, alpha, mask) @ value`` to round-off; queries are
    processed in blocks of about ``block_elements`` score entries (see the module docstring).

    Args:
        query: ``(B, H, Q, d)``; key: ``(B, H, K, d)``; value: ``(B, H, K, d_v)`` (same float dtype).
        alpha: a float in (1, 2].
        mask: bool, broadcastable to ``(B, H, Q, K)``; True = may attend.  Fully masked rows give 0.
        log_prior: float, broadcastable to ``(B, H, Q, K)`` (differentiable).
        scale: multiplies ``Q K^T`` (default ``d ** -0.5``); epsilon divides the scaled scores.
        dropout: probability of zeroing a weight (inverted dropout, as ``nn.functional.dropout`` applied
            to the weights), drawn from torch's default generator (``torch.manual_seed`` reproduces it).

    Returns:
        ``(B, H, Q, d_v)`` in the dtype of ``value``.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, float) or not 1.0 < alpha <= 2.0:
        raise ValueError(f"entmax_attention needs a float alpha in (1, 2], got {alpha!r}")
    if query.dim() != 4 or key.shape[:-2] != query.shape[:-2] or value.shape[:-1] != key.shape[:-1]:
        raise ValueError(
            "entmax_attention needs query (B, H, Q, d), key (B, H, K, d) and value (B, H, K, d_v), got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if block_elements < 1:
        raise ValueError(f"block_elements must be >= 1, got {block_elements}")
    batch, heads, n_queries, _ = query.shape
    n_keys = key.shape[-2]
    full = (batch, heads, n_queries, n_keys)
    for name, tensor in (("mask", mask), ("log_prior", log_prior)):
        if tensor is not None and not _broadcasts(tensor, full):
            raise ValueError(f"{name} of shape {tuple(tensor.shape)} does not broadcast to the scores {full}")
    if mask is not None:
        mask = mask.expand(full)
    if log_prior is not None and log_prior.dim() < 4:  # (K,), (Q, K), (H, Q, K): leading axes of size 1
        log_prior = log_prior.reshape((1,) * (4 - log_prior.dim()) + tuple(log_prior.shape))
    # about block_elements scores, at most a quarter of the queries (so that a block costs a fraction of the
    # full scores' memory), and at least _MIN_BLOCK_QUERIES queries (each block costs host synchronisations)
    per_block = min(block_elements // max(1, batch * heads * n_keys), -(-n_queries // 4))
    block = min(n_queries, max(_MIN_BLOCK_QUERIES, per_block))
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    return EntmaxAttentionFunction.apply(
        query, key, value, mask, log_prior, scale, float(epsilon), alpha, max_iters, block, float(dropout)
    )
