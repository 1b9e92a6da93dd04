"""Fused alpha-entmax attention (sparsemax at alpha = 2), in blocks of queries, sparse where it pays.

``out = P V`` with ``P = entmax_alpha(L)`` row by row and ``L = (Q K^T) * scale / epsilon + log_prior``
(masked keys excluded), without materialising the ``(n_queries, n_keys)`` weights of a whole head.
Every alpha-entmax row is ``p_j = [(alpha - 1) (L_j - m) - tau]_+^{1/(alpha-1)} / Z`` (Peters,
Niculae & Martins 2019, eq. (10)) with ``m`` the row maximum, ``tau`` the threshold and ``Z`` 1 for the
exact maps (alpha = 2, 1.5) or the sum before renormalisation (Newton's threshold, other alpha).

Per block of queries the scores come from one matrix product.  On CPU, every ``1 < alpha <= 2`` solves
each row in one pass of a native kernel (:func:`hf_eot.ops._native.entmax_rows`: the row's candidates
``X_j > -1`` compacted, the threshold found on them, the support written out), over all its keys:
Newton's iteration for general alpha, the exact closed form on the final support for sparsemax and
1.5-entmax; blocks whose supports exceed :data:`_TOP_K_FRACTION` of their entries take the dense mode
with its thresholds.  Elsewhere (other devices, no compiler, ``HF_EOT_NATIVE=0``) each
block finds its thresholds from the
``k`` largest entries of each row (``torch.topk``, ``k`` a little above the previous block's largest
support, or its 90% quantile for Newton's threshold, whose supports are wider; for the first block, that
of a sample of its rows solved over whole rows), which is exact when the row's support lies in its top
``k`` (checked per row: the rows whose support may continue are solved again from their top
``2 k``, ``4 k``, ..., and from their whole rows once that passes a third of the keys, if they are
few; else the block falls back to the dense mode).  The block's mode follows its support:

* **csr** (at most :data:`CSR_FRACTION` of the entries in the support, e.g. sparsemax, 1.5-entmax and
  1.3-entmax at 1024 keys, on CPU and CUDA): only the support is kept, compacted to a sparse CSR matrix over all
  batches and heads (its weights, key indices and row pointers).  ``P V`` and the backward are sparse
  products, ``O(nnz d)`` instead of ``O(q n d)``: ``P V``, ``P^T dO`` and ``dL K``, ``dL^T Q`` as
  CSR-times-dense products, and ``dP_j = <dO, v_j>`` only on the support (a sampled product); with
  ``g = p^{2 - alpha}`` on the support (1 for sparsemax), ``dL = g dP - g <g, dP> / sum(g)`` (the
  entmax Jacobian; Correia, Niculae & Martins 2019, "Adaptively Sparse Transformers", Appendix B).
* **scatter** (wider supports, or devices without sparse CSR products): the support is kept the same
  way, and the products are matrix products on the weights scattered into a dense block (no recomputed
  scores).
* **dense** (wider supports, and under torch.compile): only ``m, tau, Z`` per row, as the log-sum-exp in
  flash attention; the backward recomputes the block's scores and ``P`` bit for bit.

Peak memory per head is one block of scores (``O(n_keys * block)``; three with the native kernel, whose
rows are compacted into two scratch blocks) plus the kept supports (20 bytes per support entry, 24 with
dropout), instead of the several ``(n_queries, n_keys)`` tensors of
computing the weights first.  The values equal those of
:func:`hf_eot.ops.entmax_weights` followed by ``@ value`` to round-off (tests compare them).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _native
from ._masking import compute_dtype, sum_to_shape
from .entmax import DEFAULT_MAX_ITERS, _entmax15_threshold, _entmax_newton_threshold, _nonnegative_power
from .sparsemax import ThresholdFn, _partial_sort_threshold, _sparsemax_threshold

__all__ = ["DEFAULT_BLOCK_ELEMENTS", "entmax_attention", "fused_pays"]

#: The fused map pays from about this many keys on (``python benchmarks/fused_crossover.py``, one thread,
#: two runs: at 256 keys 0.51-0.88x the weights path's time for sparsemax and 1.5-entmax, 0.87-1.15x for
#: 1.3-entmax, and far less memory); with fewer (e.g. 128 tokens) computing and storing the weights is
#: about as fast or faster, and they are small ...
FUSED_MIN_KEYS = 256
#: ... from this many for sparsemax and 1.5-entmax where the native kernel solves their rows (CPU, eager):
#: at 128 keys there the fused map takes 0.45-0.64x the weights path's time (the same benchmark, one run;
#: 1.3-entmax 1.14-1.23x, so Newton's alphas keep :data:`FUSED_MIN_KEYS`) ...
FUSED_MIN_KEYS_EXACT_NATIVE = 128
#: ... or once the scores of a call would hold this many entries (1 GiB of float32), whatever the length.
FUSED_MIN_SCORES = 2**28

#: Score entries per block (all batches and heads together): 2**21 float32 = 8 MiB ...
DEFAULT_BLOCK_ELEMENTS = 2**21
#: ... but never fewer queries than this per block.
_MIN_BLOCK_QUERIES = 16
#: The threshold comes from each row's top k while k is at most this fraction of the keys ...
_TOP_K_FRACTION = 1 / 3
#: ... (rows that do not fit in their top k are solved from their whole rows while they are at most this
#: fraction of the block's rows) ...
_WHOLE_ROWS_FRACTION = 1 / 8
#: ... and the block's products are sparse (CSR) products over the support (instead of matrix products on
#: the weights scattered into a dense block) while its support holds at most this fraction of the entries:
#: CSR was 0.82-0.92x the dense products' time at 11-14% and 0.99x at 22% (``python
#: benchmarks/fused_crossover.py csr``, one CPU thread; not measured on CUDA).
CSR_FRACTION = 1 / 5
#: Devices whose torch backend has the sparse CSR products used here (``mm``, ``sampled_addmm``); other
#: devices take the scattered weights.
_CSR_DEVICES = ("cpu", "cuda")
#: Devices whose sparse CSR products take the keys of a row in any order (cuSPARSE assumes them sorted).
_UNSORTED_CSR_DEVICES = ("cpu",)


@dataclass
class _SupportBlock:
    """A block's support in CSR layout over the ``B H K`` flattened keys: weights (before dropout) ``(nnz,)``,
    dropout multipliers, row pointers, key columns (ascending within a CSR row; in any order on CPU) and the
    row of every entry ``(nnz,)``; row pointers and columns are int32 where they fit.  The block's rows are
    ``R = B H q`` (row ``(b H + h) q + i``).  CSR row ``i < R`` holds row ``i``'s entries, except for the
    rows that a later pass of the top-k solve solved again (``again``, in the order of the passes): their
    entries are in CSR rows ``R, R + 1, ...`` and their own CSR rows are empty (None: no such rows, the
    CSR rows are the block's rows).  ``csr``: its products are sparse CSR products (else matrix products
    on the weights scattered into a dense block)."""

    rows: slice
    weights: Tensor
    keep: Tensor | None
    crow: Tensor
    col: Tensor
    row: Tensor
    again: Tensor | None
    csr: bool

    @property
    def n_rows(self) -> int:
        """The block's rows ``R = B H q`` (the CSR rows less those of the rows solved again)."""
        return self.crow.numel() - 1 - (0 if self.again is None else self.again.numel())


@dataclass
class _DenseBlock:
    """A block's row statistics ``(B, H, q, 1)``: maximum, threshold, normaliser (and its dropout seed, and
    its rows masked for having no finite logit: :func:`_dead_rows`)."""

    rows: slice
    row_max: Tensor
    tau: Tensor
    total: Tensor | None
    seed: int
    dead: Tensor | None = None


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
    masked row (without one, a row of -inf logits keeps -inf and gives NaN, as the weights path does; a
    NaN row keeps NaN either way)."""
    m = logits.amax(dim=-1, keepdim=True)
    return m.masked_fill(m == float("-inf"), 0.0) if masked else m


def _floor(alpha: float) -> float:
    """Value of the entries that can never be in the support (the threshold is ``>= -1``): -2 for the
    sort-based thresholds (no exact ties with ``tau = -1``), -1 for Newton's bracket."""
    return -2.0 if _sort_based(alpha) else -1.0


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
    """``t^{1/(alpha-1)}`` for ``t >= 0`` (a fresh tensor, or ``t`` itself for sparsemax)."""
    if alpha == 2.0:
        return t
    if alpha == 1.5:
        return t * t
    return _nonnegative_power(t, 1.0 / (alpha - 1.0))


def _sort_based(alpha: float) -> bool:
    """Whether alpha is an exact map (sparsemax, 1.5-entmax: a closed-form threshold, no normaliser; the
    torch path finds its support by a sort) rather than one of Newton's iteration."""
    return alpha in (1.5, 2.0)


def _sort_rule(alpha: float) -> ThresholdFn:
    """The sort-based threshold rule of the exact maps (alpha = 2 or 1.5)."""
    return _sparsemax_threshold if alpha == 2.0 else _entmax15_threshold


def _newton_total(powers: Tensor) -> Tensor:
    """Newton's normaliser ``Z = sum_j [X_j - tau]_+^{1/(alpha-1)}`` ``(..., 1)`` from the powers
    ``(..., K)``, 1 where it is 0."""
    total = powers.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, total, torch.ones_like(total))


def _top_threshold(V: Tensor, alpha: float, max_iters: int) -> tuple[Tensor, Tensor]:
    """Threshold from the top entries ``V`` ``(R, k)`` of rows of max 0 (sorted decreasing for the
    sort-based rules, in any order for Newton's).

    Returns ``(tau, exact)`` ``(R, 1)``: ``exact`` says the support lies in ``V`` (then ``tau`` is the row's
    threshold): fewer than ``k`` entries in the support, or ``V`` holds every entry above the floor
    (sort-based rules); the smallest entry of ``V`` at or below ``tau`` (Newton).
    """
    k = V.shape[-1]
    if _sort_based(alpha):
        tau, support = _sort_rule(alpha)(V)
        return tau, (support < k) | (V[:, -1:] <= -1.0)
    tau = _entmax_newton_threshold(V, alpha - 1.0, float(k), max_iters)
    return tau, V.amin(dim=-1, keepdim=True) <= tau


#: Newton's top k is sized from this quantile of the previous block's support sizes (the rows beyond it are
#: solved again from a wider top k).
_NEWTON_SUPPORT_QUANTILE = 0.9


def _typical_support(sizes: Tensor, alpha: float) -> int:
    """The support size that sizes the next block's top k, from the sizes ``(R,)`` of a block's rows: the
    largest for the sort-based maps (their top k is cheap), a high quantile for Newton's wider supports
    (host sync)."""
    if _sort_based(alpha):
        return int(sizes.max())
    return int(torch.quantile(sizes.to(torch.float32), _NEWTON_SUPPORT_QUANTILE))


#: The first block sizes its top k from the exact supports of this many of its rows.
_SAMPLE_ROWS = 64


def _sampled_support(logits: Tensor, alpha: float, max_iters: int, masked: bool) -> int:
    """The typical support (:func:`_typical_support`) of the rows of a block ``(R, n)`` (masked keys at -inf),
    from the exact supports over whole rows of an evenly spaced sample of :data:`_SAMPLE_ROWS` rows."""
    n_rows = logits.shape[0]
    # evenly spaced over all rows, at a non-integer step: not every sampled row at the same query position
    picks = torch.linspace(0, n_rows - 1, min(n_rows, _SAMPLE_ROWS), device=logits.device).round().long()
    sample = logits.index_select(0, picks)
    X = _shifted(sample, None, _row_max(sample, masked), alpha)  # masked keys: -inf -> the floor
    tau = _dense_threshold(X, None, alpha, max_iters, None)
    in_support = (X > tau) & (X > _floor(alpha))  # entries at the floor (masked keys) never are
    return _typical_support(in_support.sum(dim=-1), alpha)


@dataclass
class _Support:
    """The support entries of a block's rows ``(nnz,)``: weights, rows, keys (each row's keys in any order)
    and CSR rows (as in :class:`_SupportBlock`: a row's own, or one after the block's rows for the rows
    solved ``again`` by a later pass), grouped by CSR row in ascending order."""

    weights: Tensor
    row: Tensor
    key: Tensor
    csr_row: Tensor
    again: Tensor | None


def _top_support(
    logits: Tensor, alpha: float, max_iters: int, k: int, row_valid: Tensor | None
) -> _Support | None:
    """The support of every row of ``logits`` ``(R, n)`` (masked keys at -inf) from its top ``k`` entries;
    None if ``k`` exceeds the top-k fraction of the keys.  Rows whose
    support may continue past their top ``k`` are solved again from their top ``2 k``, ``4 k``, ..., and
    from their whole rows once that exceeds the top-k fraction; None (the block is solved over whole rows)
    if more than half of the rows are left after a pass, or more than :data:`_WHOLE_ROWS_FRACTION` for the
    whole-row pass.  The first pass fills the rows' own CSR rows, each later pass appends new CSR rows for
    the rows it solves again (no merge of the passes).  Only the top entries are shifted and scaled:
    ``X = max((alpha - 1) (V - m), floor)``.
    Rows not in ``row_valid`` (fully masked queries) get no entries; a row whose maximum is -inf without a
    mask (a row of -inf logits, NaN once shifted) is never solved, so the block goes to the whole-row
    path, which gives NaN as the weights path does."""
    n_rows, n_keys = logits.shape
    weights, rows, keys, csr_rows, again = [], [], [], [], []
    todo: Tensor | None = None  # the rows still to solve (None: all)
    n_csr_rows = 0  # the CSR rows of the passes so far: one per row solved
    while True:
        if k > _TOP_K_FRACTION * n_keys:
            if todo is None or todo.numel() > _WHOLE_ROWS_FRACTION * n_rows:
                return None
            k = n_keys  # the few rows left: whole rows
        part = logits if todo is None else logits.index_select(0, todo)
        # Newton's threshold takes the top entries in any order (a cheaper top k for its wide supports)
        V, index = torch.topk(part, k, dim=-1, sorted=_sort_based(alpha))
        row_max = _row_max(V, row_valid is not None)
        X = _shifted(V, None, row_max, alpha)
        tau, exact = _top_threshold(X, alpha, max_iters)
        if k == n_keys:
            exact = torch.isfinite(tau)
        exact &= torch.isfinite(row_max)  # rows with an infinite maximum (without a mask): NaN once shifted
        P = _power(X.sub_(tau).clamp_(min=0.0), alpha)
        if not _sort_based(alpha):
            P.div_(_newton_total(P))
        row = torch.arange(n_rows, device=logits.device) if todo is None else todo
        solved = (P > 0) & exact
        if row_valid is not None:
            solved &= row_valid.index_select(0, row).unsqueeze(-1)
        entry = solved.view(-1).nonzero().squeeze(-1)  # (nnz,) into the flattened (rows, k) top entries
        weights.append(P.reshape(-1).index_select(0, entry))  # index_select: faster than [entry] on CPU
        position = entry.div(k, rounding_mode="floor")  # the entry's row among this pass's rows
        rows.append(position if todo is None else row.index_select(0, position))
        csr_rows.append(position if todo is None else position + n_csr_rows)
        keys.append(index.reshape(-1).index_select(0, entry))
        if todo is not None:
            again.append(todo)
        n_csr_rows += row.numel()
        unsolved = (~exact.squeeze(-1)).nonzero().squeeze(-1)  # host sync
        if not unsolved.numel():
            if len(weights) == 1:
                return _Support(weights[0], rows[0], keys[0], csr_rows[0], None)
            return _Support(*(torch.cat(parts) for parts in (weights, rows, keys, csr_rows, again)))
        if k == n_keys or 2 * unsolved.numel() > n_rows:  # never solved (-inf rows), or most of the rows
            return None
        todo = row.index_select(0, unsolved)
        k *= 2


def _native_rows(logits: Tensor, alpha: float) -> bool:
    """Whether the block's rows are solved by the native kernel (:func:`hf_eot.ops._native.entmax_rows`:
    ``1 < alpha <= 2`` on CPU) rather than by :func:`_top_support`."""
    return _native.entmax_support_applies(logits, alpha)


def _native_support(
    logits: Tensor, alpha: float, max_iters: int, row_valid: Tensor | None, scratch: list[_native.EntmaxRows]
) -> tuple[_Support | None, Tensor | None]:
    """The rows of ``logits`` ``(R, n)`` (masked keys at -inf) solved by the native kernel, each over all its
    keys (on its candidates ``(alpha - 1)(L_j - m) > -1``): ``(support, None)``, or
    ``(None, tau)`` ``(R,)`` if the supports hold more than :data:`_TOP_K_FRACTION` of the entries (the
    block takes the dense mode with these thresholds, as the torch path does past its top-k limit), or
    ``(None, None)`` if a row to solve has no finite maximum (a row of -inf logits without a mask, or NaN:
    the torch path gives NaN, as the weights path does).  ``scratch`` holds the previous block's rows, whose
    buffers this block reuses (and then its own)."""
    row_max = logits.amax(dim=-1)
    solvable = torch.isfinite(row_max) if row_valid is None else torch.isfinite(row_max) | ~row_valid
    if not bool(solvable.all()):
        return None, None
    rows = _native.entmax_rows(logits, row_max, row_valid, alpha, max_iters, scratch[0] if scratch else None)
    scratch[:] = [rows]
    if int(rows.counts.sum()) > _TOP_K_FRACTION * logits.numel():
        return None, rows.tau
    weights, key, row = rows.packed()
    return _Support(weights, row, key, row, None), None


def _support_block(
    rows: slice, support: _Support, shape: tuple[int, ...], dropout: float, csr: bool
) -> _SupportBlock:
    """The :class:`_SupportBlock` of a ``(B, H, q, K)`` block's support: row pointers, flattened key
    columns (sorted within each CSR row where the device's CSR products need it), and dropout
    multipliers."""
    n_rows, n_queries, n_keys = shape[0] * shape[1] * shape[2], shape[2], shape[3]
    n_csr_rows = n_rows + (0 if support.again is None else support.again.numel())
    weights, row, key, csr_row = support.weights, support.row, support.key, support.csr_row
    if row.device.type not in _UNSORTED_CSR_DEVICES:
        entry, order = _sort_keys(csr_row * n_keys + key, n_csr_rows * n_keys).sort()
        entry = entry.long()
        csr_row = entry.div(n_keys, rounding_mode="floor")
        key = entry - csr_row * n_keys
        weights, row = weights.index_select(0, order), row.index_select(0, order)
    col = key + row.div(n_queries, rounding_mode="floor") * n_keys  # + (b H + h) K
    crow = _row_pointers(csr_row, n_csr_rows)
    if max(shape[0] * shape[1] * n_keys, n_csr_rows, row.numel()) <= torch.iinfo(torch.int32).max:
        crow, col = crow.to(torch.int32), col.to(torch.int32)  # the CSR products' index type: no copies
    keep = _bernoulli_keep(weights, dropout) if dropout > 0.0 else None
    return _SupportBlock(rows, weights, keep, crow, col, row, support.again, csr)


def _to_csr_rows(block: _SupportBlock, x: Tensor) -> Tensor:
    """Per-row values ``(R, c)`` as values of the block's CSR rows ``(R', c)``."""
    return x if block.again is None else torch.cat([x, x.index_select(0, block.again)])


def _from_csr_rows(block: _SupportBlock, x: Tensor) -> Tensor:
    """Values of the block's CSR rows ``(R', ...)`` (a product's, or sums) summed into its rows ``(R, ...)``
    (a row solved again has an empty, zero, CSR row of its own)."""
    n_rows = block.n_rows
    return x if block.again is None else x[:n_rows].index_add_(0, block.again, x[n_rows:])


def _support_sizes(block: _SupportBlock) -> Tensor:
    """The number of support entries of each of the block's rows ``(R,)``."""
    return block.crow.diff() if block.again is None else torch.bincount(block.row, minlength=block.n_rows)


def _sort_keys(keys: Tensor, bound: int) -> Tensor:
    """Integer sort keys in ``[0, bound)`` in the narrowest of int16, int32, int64 that holds them (the
    narrower, the faster to sort on CPU)."""
    for dtype in (torch.int16, torch.int32):
        if bound <= torch.iinfo(dtype).max + 1:
            return keys.to(dtype)
    return keys


def _row_pointers(row: Tensor, n_rows: int) -> Tensor:
    """CSR row pointers ``(n_rows + 1,)`` of entries whose (CSR) rows ``row`` are grouped in ascending
    order."""
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=row.device)
    torch.cumsum(torch.bincount(row, minlength=n_rows), dim=0, out=crow[1:])
    return crow


def _dense_threshold(
    X: Tensor, mask: Tensor | None, alpha: float, max_iters: int, support_hint: int | None
) -> Tensor:
    """The exact threshold of every row of ``X`` ``(B, H, q, K)`` over all keys ``(B, H, q, 1)``."""
    shape = (*X.shape[:-1], 1)
    if _sort_based(alpha):
        tau = _partial_sort_threshold(X.reshape(-1, X.shape[-1]), _sort_rule(alpha), support_hint)[0]
        return tau.reshape(shape)
    allowed = float(X.shape[-1]) if mask is None else mask.sum(dim=-1, keepdim=True).clamp_(min=1).to(X.dtype)
    return _entmax_newton_threshold(X, alpha - 1.0, allowed, max_iters)


def _dense_weights(
    X: Tensor, tau: Tensor, total: Tensor | None, row_valid: Tensor | None, alpha: float
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``P = t^{1/(alpha-1)} / Z`` with ``t = [X - tau]_+`` (in place on ``X``) and fully masked rows 0;
    returns ``(P, t, Z)`` (``t = sqrt(P)`` for 1.5-entmax, ``t = P`` for sparsemax).  ``Z`` is Newton's
    normaliser ``total`` (None: computed from the row sums, as in the forward; the backward passes the
    forward's, and so recomputes ``P`` bit for bit); the exact maps have none."""
    t = X.sub_(tau).clamp_(min=0.0)
    if row_valid is not None:
        t.mul_(row_valid)
    P = _power(t, alpha)
    if not _sort_based(alpha):
        total = _newton_total(P) if total is None else total
        P.div_(total)
    return P, t, total


def _gppr(P: Tensor, alpha: float) -> Tensor:
    """``g = p^{2 - alpha}`` on the support, 0 elsewhere (``2 - alpha >= 0`` here)."""
    if alpha == 2.0:
        return torch.sign(P)
    if alpha == 1.5:
        return torch.sqrt(P)
    return _nonnegative_power(P, 2.0 - alpha)


def _last_dim_sums(x: Tensor) -> Tensor:
    """Sums over the last dimension ``(..., 1)``."""
    return x.sum(dim=-1, keepdim=True)


def _entmax_backward(
    dP: Tensor, gppr: Tensor, row_sums: Callable[[Tensor], Tensor] = _last_dim_sums
) -> Tensor:
    """``dL = g dP - g <g, dP> / sum(g)`` (in place on ``dP``): the gradient w.r.t. the logits, row by row;
    ``row_sums`` gives each entry the sum of its row (rows of the last dimension, or the support entries of
    a block: :func:`_support_row_sums`)."""
    dL = dP.mul_(gppr)
    den = row_sums(gppr)
    coef = row_sums(dL) / torch.where(den > 0, den, torch.ones_like(den))
    return dL.addcmul_(gppr, coef, value=-1.0)


#: Devices whose sums over the support's rows are segment sums over the CSR rows (``torch.segment_reduce``,
#: faster than ``index_add_`` by row on CPU; it has no kernel on some devices, e.g. MPS).
_SEGMENT_SUM_DEVICES = ("cpu",)


def _support_row_sums(block: _SupportBlock) -> Callable[[Tensor], Tensor]:
    """Sums over the rows of a block's support entries ``(nnz,)``, each entry getting its row's sum."""

    def row_sums(x: Tensor) -> Tensor:
        if x.device.type in _SEGMENT_SUM_DEVICES:
            sums = _from_csr_rows(block, torch.segment_reduce(x, "sum", offsets=block.crow))
        else:
            sums = x.new_zeros(block.n_rows).index_add_(0, block.row, x)
        return sums.index_select(0, block.row)

    return row_sums


def _scattered(buffer: Tensor, block: _SupportBlock, values: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The dense ``(B, H, q, K)`` block (in ``buffer``'s memory) that holds the support entries ``values``
    ``(nnz,)`` of ``block`` and 0 elsewhere."""
    numel = shape[0] * shape[1] * shape[2] * shape[3]
    dense = buffer.view(-1)[:numel].view(shape) if buffer.dtype == values.dtype else values.new_empty(shape)
    dense.zero_().view(-1).index_put_((_dense_index(block, shape[3]),), values)
    return dense


def _dense_index(block: _SupportBlock, n_keys: int) -> Tensor:
    """The support entries' indices ``(nnz,)`` into the flattened ``(B, H, q, K)`` block."""
    return block.row * n_keys + block.col % n_keys


def _csr_matrix(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """A sparse CSR matrix from its parts (valid by construction: torch's invariant checks are skipped, and
    its warning that CSR support is in beta is not repeated to the user)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def _csr_transpose(block: _SupportBlock, n_cols: int) -> tuple[Tensor, Tensor, Tensor]:
    """The pattern of the block's transpose ``(B H K, R)``: row pointers, columns (the block's rows, not
    its CSR rows) and the permutation of the entries.  The columns of a row are ascending where the device
    needs it (a stable sort by key keeps the entries' order, ascending rows unless rows were solved
    again), else in any order."""
    if block.again is not None and block.col.device.type not in _UNSORTED_CSR_DEVICES:
        order = torch.argsort(block.col.long() * block.n_rows + block.row)  # by key, then row
    else:
        order = torch.argsort(_sort_keys(block.col, n_cols), stable=True)
    crow_t = _row_pointers(block.col, n_cols).to(block.crow.dtype)  # counts per column: any order
    return crow_t, block.row.index_select(0, order).to(block.col.dtype), order


def _flat(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``(B, H, n, d)`` as a contiguous ``(B H n, d)`` matrix of ``dtype``."""
    return t.reshape(-1, t.shape[-1]).to(dtype).contiguous()


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
        blocks: list[_SupportBlock | _DenseBlock] = []
        support: int | None = None  # the typical support of the previous block (or the first block's sample)
        csr_device = value.device.type in _CSR_DEVICES
        value_c: Tensor | None = None  # the values as a (B H K, d_v) matrix of the compute dtype, once needed
        eager = not torch.compiler.is_compiling()  # else every block is dense (no host-synchronised top k)
        native = eager and _native_rows(buffer, alpha)  # rows solved by the native kernel
        scratch: list[_native.EntmaxRows] = []  # the native kernel's buffers, reused from block to block
        top_k = eager and not native  # supports from each row's top k, sized from the previous block's
        for start in range(0, n_queries, block):
            rows = slice(start, min(start + block, n_queries))
            mask_b, prior_b = _rows(mask, rows), _rows(log_prior, rows)
            logits = _block_logits(query[..., rows, :], key_t, prior_b, cdtype, buffer)  # (B, H, q, K)
            dead, row_valid = None, None
            if mask_b is not None:
                logits.masked_fill_(~mask_b, float("-inf"))
                allowed = mask_b.any(dim=-1, keepdim=True)
                dead = _dead_rows(logits, allowed)
                row_valid = (allowed if dead is None else allowed & ~dead).to(cdtype)
            top, tau = None, None  # tau: the rows' thresholds, if already known
            valid = None if row_valid is None else row_valid.view(-1).bool()
            if native:
                top, tau = _native_support(logits.view(-1, n_keys), alpha, max_iters, valid, scratch)
            elif top_k:
                if support is None:
                    support = _sampled_support(logits.view(-1, n_keys), alpha, max_iters, mask_b is not None)
                guess = max(8, (5 * support) // 4 + 1)
                top = _top_support(logits.view(-1, n_keys), alpha, max_iters, guess, valid)
            if top is not None:
                n_rows = logits.shape[0] * logits.shape[1] * logits.shape[2]
                csr = csr_device and top.weights.numel() <= CSR_FRACTION * n_rows * n_keys
                blk = _support_block(rows, top, logits.shape, dropout, csr)
                if top_k:
                    support = _typical_support(_support_sizes(blk), alpha)
                dropped = blk.weights if blk.keep is None else blk.weights * blk.keep
                if csr:
                    if value_c is None:
                        value_c = _flat(value, cdtype)  # (B H K, d_v)
                    size = (blk.crow.numel() - 1, value_c.shape[0])
                    product = _from_csr_rows(blk, _csr_matrix(blk.crow, blk.col, dropped, size) @ value_c)
                    out[..., rows, :] = product.reshape(*logits.shape[:-1], -1)
                else:
                    out[..., rows, :] = _scattered(logits, blk, dropped, logits.shape).to(value.dtype) @ value
                blocks.append(blk)
            else:
                row_max = _row_max(logits, mask_b is not None)
                X = _shifted(logits, mask_b, row_max, alpha)
                if tau is None:
                    tau = _dense_threshold(X, mask_b, alpha, max_iters, support)
                else:
                    tau = tau.view(*X.shape[:-1], 1)
                P, _, total = _dense_weights(X, tau, None, row_valid, alpha)
                if top_k:
                    support = _typical_support((P > 0).sum(dim=-1).view(-1), alpha)
                if dropout > 0.0:
                    P.mul_(_seeded_keep(P, dropout, seed + start))
                out[..., rows, :] = P.to(value.dtype) @ value
                blocks.append(_DenseBlock(rows, row_max, tau, total, seed + start, dead))
        ctx.save_for_backward(query, key, value, mask, log_prior)  # query: scaled
        ctx.blocks = blocks
        ctx.settings = (scale, epsilon, alpha, dropout)
        return out

    @staticmethod
    @once_differentiable  # a second derivative raises instead of silently missing terms
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        query, key, value, mask, log_prior = ctx.saved_tensors
        scale, epsilon, alpha, dropout = ctx.settings
        bw = _Backward.start(ctx.blocks, query, key, value, log_prior, ctx.needs_input_grad, alpha)
        for blk in ctx.blocks:
            q_b, g_b = query[..., blk.rows, :], grad_out[..., blk.rows, :]
            if isinstance(blk, _SupportBlock):
                _support_backward(bw, blk, q_b, g_b)
            else:
                _dense_backward(bw, blk, q_b, g_b, _rows(mask, blk.rows), _rows(log_prior, blk.rows), dropout)
        d_query = bw.d_query
        if d_query is not None:
            d_query.mul_(scale / epsilon)
        need_k, need_v = ctx.needs_input_grad[1:3]
        d_key = _input_gradient(bw.d_key, bw.d_key_t, key) if need_k else None
        d_value = _input_gradient(bw.d_value, bw.d_value_t, value) if need_v else None
        d_prior = None if bw.d_prior is None else bw.d_prior.to(log_prior.dtype)
        return (d_query, d_key, d_value, None, d_prior, None, None, None, None, None, None)


def _input_gradient(csr_part: Tensor | None, dense_part: Tensor | None, like: Tensor) -> Tensor:
    """The key or value gradient ``(B, H, K, d)`` in ``like``'s dtype from the CSR products' accumulator and
    the dense products' transposed one ``(B, H, d, K)`` (None where no block used it)."""
    if dense_part is None:
        total = csr_part
    elif csr_part is None:
        total = dense_part.transpose(-1, -2)
    else:
        total = csr_part + dense_part.transpose(-1, -2)
    return total.to(like.dtype, memory_format=torch.contiguous_format)


@dataclass
class _Backward:
    """The inputs of a backward pass (``query`` scaled, ``key_t``/``value_t`` transposed copies where dense
    products need them) and its gradient accumulators, None where no gradient is needed or no block adds
    to them.  Products on dense blocks accumulate the key and value gradients transposed (``d_key_t``,
    ``d_value_t``: ``(B, H, d, K)``), CSR products untransposed (``d_key``, ``d_value``); ``buffer`` holds
    one block of dense scores."""

    query: Tensor
    key: Tensor
    value: Tensor
    key_t: Tensor | None
    value_t: Tensor | None
    alpha: float
    cdtype: torch.dtype
    d_query: Tensor | None
    d_key: Tensor | None
    d_value: Tensor | None
    d_key_t: Tensor | None
    d_value_t: Tensor | None
    d_prior: Tensor | None
    buffer: Tensor
    flat: dict[str, Tensor]  # key and value as (B H K, d) matrices of the compute dtype, once needed

    @classmethod
    def start(
        cls,
        blocks: list[_SupportBlock | _DenseBlock],
        query: Tensor,
        key: Tensor,
        value: Tensor,
        log_prior: Tensor | None,
        needs_input_grad: tuple[bool, ...],
        alpha: float,
    ) -> _Backward:
        cdtype = compute_dtype(query.dtype)
        need_q, need_k, need_v, _, need_prior = needs_input_grad[:5]

        def zeros(shape: torch.Size, needed: bool) -> Tensor | None:
            return torch.zeros(shape, dtype=cdtype, device=query.device) if needed else None

        csr = [isinstance(b, _SupportBlock) and b.csr for b in blocks]
        transposed = not all(csr)  # some block takes dense products
        key_t = key.transpose(-1, -2).contiguous() if transposed else None  # (B, H, d, K)
        value_t = value.transpose(-1, -2).contiguous() if transposed else None  # (B, H, d_v, K)
        dense = [b for b, sparse in zip(blocks, csr, strict=True) if need_prior or not sparse]
        block_rows = max((b.rows.stop - b.rows.start for b in dense), default=0)
        return cls(
            query=query,
            key=key,
            value=value,
            key_t=key_t,
            value_t=value_t,
            alpha=alpha,
            cdtype=cdtype,
            d_query=torch.zeros_like(query) if need_q else None,
            d_key=zeros(key.shape, need_k and any(csr)),
            d_value=zeros(value.shape, need_v and any(csr)),
            d_key_t=zeros(key_t.shape, need_k) if transposed else None,
            d_value_t=zeros(value_t.shape, need_v) if transposed else None,
            d_prior=zeros(log_prior.shape, need_prior) if log_prior is not None else None,
            buffer=query.new_empty((*query.shape[:-2], block_rows, key.shape[-2]), dtype=cdtype),
            flat={},
        )

    @property
    def needs_scores_grad(self) -> bool:
        """Whether the gradient w.r.t. the logits is needed (for the queries, keys or the prior)."""
        return any(g is not None for g in (self.d_query, self.d_key, self.d_key_t, self.d_prior))

    def flat_c(self, name: str) -> Tensor:
        """``key`` or ``value`` as a ``(B H K, d)`` matrix of the compute dtype (made once)."""
        if name not in self.flat:
            self.flat[name] = _flat(getattr(self, name), self.cdtype)
        return self.flat[name]


def _support_backward(bw: _Backward, blk: _SupportBlock, q_b: Tensor, g_b: Tensor) -> None:
    """Accumulates the gradients of a block kept as its support: sparse CSR products, or dense products
    on the scattered weights."""
    n_keys = bw.key.shape[-2]
    shape = (*g_b.shape[:-1], n_keys)  # (B, H, q, K)
    n_rows, n_flat_keys = shape[0] * shape[1] * shape[2], bw.key.shape[0] * bw.key.shape[1] * n_keys
    size, size_t = (blk.crow.numel() - 1, n_flat_keys), (n_flat_keys, n_rows)  # (R', B H K), (B H K, R)
    dropped = blk.weights if blk.keep is None else blk.weights * blk.keep
    g_flat = _flat(g_b, bw.cdtype)  # (R, d_v)
    if blk.csr:
        if bw.d_value is not None or bw.d_key is not None:
            crow_t, col_t, order = _csr_transpose(blk, n_flat_keys)
        if bw.d_value is not None:
            # accumulated in place (a product then an addition copies a (B H K, d_v) matrix twice)
            bw.d_value.view(-1, g_flat.shape[-1]).addmm_(
                _csr_matrix(crow_t, col_t, dropped.index_select(0, order), size_t), g_flat
            )
    elif bw.d_value_t is not None:
        dense = _scattered(bw.buffer, blk, dropped, shape).to(g_b.dtype)
        bw.d_value_t += (g_b.transpose(-1, -2).contiguous() @ dense).to(bw.cdtype)
    if not bw.needs_scores_grad:
        return
    if blk.csr:  # dP on the support: a sampled product (beta = 0: the pattern's values unused)
        pattern = _csr_matrix(blk.crow, blk.col, blk.weights, size)
        dL = torch.sparse.sampled_addmm(pattern, _to_csr_rows(blk, g_flat), bw.flat_c("value").t(), beta=0.0).values()
    else:
        dL = (g_b @ bw.value_t).to(bw.cdtype).view(-1).index_select(0, _dense_index(blk, n_keys))
    if blk.keep is not None:
        dL.mul_(blk.keep)
    dL = _entmax_backward(dL, _gppr(blk.weights, bw.alpha), _support_row_sums(blk))  # (nnz,)
    if not blk.csr:
        _scores_backward(bw, blk.rows, q_b, _scattered(bw.buffer, blk, dL, shape))
        return
    if bw.d_prior is not None:
        _add_rows(bw.d_prior, blk.rows, _scattered(bw.buffer, blk, dL, shape))
    if bw.d_query is not None:
        d_q = _from_csr_rows(blk, _csr_matrix(blk.crow, blk.col, dL, size) @ bw.flat_c("key"))  # (R, d)
        bw.d_query[..., blk.rows, :] = d_q.reshape(q_b.shape)
    if bw.d_key is not None:
        q_flat = _flat(q_b, bw.cdtype)  # (R, d)
        bw.d_key.view(-1, q_flat.shape[-1]).addmm_(
            _csr_matrix(crow_t, col_t, dL.index_select(0, order), size_t), q_flat
        )


def _dense_backward(
    bw: _Backward,
    blk: _DenseBlock,
    q_b: Tensor,
    g_b: Tensor,
    mask_b: Tensor | None,
    prior_b: Tensor | None,
    dropout: float,
) -> None:
    """Accumulates the gradients of a dense block: its scores and ``P`` recomputed as in the forward."""
    logits = _block_logits(q_b, bw.key_t, prior_b, bw.cdtype, bw.buffer)
    X = _shifted(logits, mask_b, blk.row_max, bw.alpha)
    row_valid = _row_valid(mask_b, bw.cdtype, blk.dead)
    P, t, _ = _dense_weights(X, blk.tau, blk.total, row_valid, bw.alpha)  # (B, H, q, K)
    keep = _seeded_keep(P, dropout, blk.seed) if dropout > 0.0 else None
    if bw.d_value_t is not None:
        dropped = P if keep is None else P * keep
        bw.d_value_t += (g_b.transpose(-1, -2).contiguous() @ dropped.to(bw.value.dtype)).to(bw.cdtype)
    if not bw.needs_scores_grad:
        return
    dL = (g_b @ bw.value_t).to(bw.cdtype)  # (B, H, q, K): gradient w.r.t. the (dropped) weights
    if keep is not None:
        dL.mul_(keep)
    dL = _entmax_backward(dL, t if bw.alpha == 1.5 else _gppr(P, bw.alpha))  # sqrt(P) = t at 1.5
    _scores_backward(bw, blk.rows, q_b, dL)


def _scores_backward(bw: _Backward, rows: slice, q_b: Tensor, dL: Tensor) -> None:
    """Accumulates the prior, query and key gradients of a block from the logits' gradient ``dL``
    ``(B, H, q, K)`` by dense products."""
    if bw.d_prior is not None:
        _add_rows(bw.d_prior, rows, dL)
    dS = dL.to(bw.query.dtype)  # gradient w.r.t. (scaled Q) K^T
    if bw.d_query is not None:
        bw.d_query[..., rows, :] = dS @ bw.key
    if bw.d_key_t is not None:
        bw.d_key_t += (q_b.transpose(-1, -2).contiguous() @ dS).to(bw.cdtype)


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


def _dead_rows(logits: Tensor, allowed: Tensor) -> Tensor | None:
    """The rows ``(B, H, q, 1)`` that the mask allows some key (``allowed``: ``mask.any(-1, keepdim=True)``)
    but whose allowed logits are all -inf (a log-prior of -inf on each of them): masked rows, as in
    ``entmax_weights`` (zeros).  ``logits``: the masked keys already at -inf; a NaN row is not dead.  None
    if there are none (a host synchronisation; under torch.compile the indicator is always returned)."""
    dead = (logits.amax(dim=-1, keepdim=True) == float("-inf")) & allowed
    if torch.compiler.is_compiling() or bool(dead.any()):
        return dead
    return None


def _row_valid(mask: Tensor | None, cdtype: torch.dtype, dead: Tensor | None = None) -> Tensor | None:
    """``(..., q, 1)`` indicator of rows with an allowed key (None without mask), less the ``dead`` rows
    (:func:`_dead_rows`)."""
    if mask is None:
        return None
    valid = mask.any(dim=-1, keepdim=True)
    return (valid if dead is None else valid & ~dead).to(cdtype)


def _add_rows(d_prior: Tensor, rows: slice, dL: Tensor) -> None:
    """Accumulate the logits' gradient of a block into the gradient of a broadcast log-prior."""
    if d_prior.shape[-2] == 1:
        d_prior += sum_to_shape(dL.sum(dim=-2, keepdim=True), d_prior.shape)
    else:
        target = d_prior[..., rows, :]
        target += sum_to_shape(dL, target.shape)


def fused_pays(query: Tensor, key: Tensor, alpha: float | None = None) -> bool:
    """Whether :func:`entmax_attention` beats computing the weights first for these shapes: long rows
    (at least :data:`FUSED_MIN_KEYS` keys; :data:`FUSED_MIN_KEYS_EXACT_NATIVE` for sparsemax and
    1.5-entmax on CPU with the native kernel), or scores too large to store comfortably."""
    n_keys = key.shape[-2]
    if n_keys >= FUSED_MIN_KEYS or query.shape[:-1].numel() * n_keys >= FUSED_MIN_SCORES:
        return True
    return (
        n_keys >= FUSED_MIN_KEYS_EXACT_NATIVE  # first: shorter rows never build the kernel
        and _sort_based(alpha)
        and query.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and _native.native_kernels_available()
    )


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
    if n_keys == 0:
        raise ValueError(f"entmax_attention needs at least one key, got key of shape {tuple(key.shape)}")
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
    if batch * heads * n_queries == 0:  # no rows to attend: an empty output, still part of the graph
        return query @ key.transpose(-1, -2) @ value
    return EntmaxAttentionFunction.apply(
        query, key, value, mask, log_prior, scale, float(epsilon), alpha, max_iters, block, float(dropout)
    )
