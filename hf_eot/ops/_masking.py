"""Small helpers shared by the ops: input checks, compute dtypes, masked reductions.

Conventions (the whole library relies on them):

* scores / logits: float tensor ``(..., n_queries, n_keys)``; normalisation is over the last axis.
* mask: optional bool tensor broadcastable to the scores, ``True`` = may attend.  A row with no
  allowed key is a non-existent query (weights exactly 0, gradient 0); a column with no allowed
  query is a non-existent key.
* half dtypes (float16, bfloat16) are computed in float32 and cast back; float32 / float64 are kept.

Masking is always done with ``torch.where`` / ``masked_fill`` and ``-inf`` handled explicitly, never
by adding a float mask (which overflows in float16 and turns ``-inf + inf`` into NaN).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "check_logits",
    "check_mask",
    "compute_dtype",
    "masked_logsumexp",
    "sum_to_shape",
]


def check_logits(logits: Tensor, name: str = "logits") -> None:
    """Raise ``TypeError`` unless ``logits`` is a floating-point tensor with at least one axis."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float64/32/16, bfloat16), got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"{name} must have at least one axis (the keys), got a 0-d tensor")


def check_mask(mask: Tensor | None, shape: torch.Size, name: str = "mask") -> Tensor | None:
    """Validate a boolean attention mask and return it broadcast (as a view) to ``shape``.

    ``mask`` must be a bool tensor broadcastable to ``shape`` (True = may attend); ``None`` is
    passed through.  Raises ``TypeError`` for a non-bool mask and ``ValueError`` for a shape that
    does not broadcast to ``shape`` without enlarging it.
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{name} must have dtype torch.bool (True = may attend), got {mask.dtype}; "
            "convert an additive float mask with `mask = additive_mask == 0`"
        )
    try:
        out = torch.broadcast_shapes(mask.shape, shape)
    except RuntimeError as err:
        raise ValueError(f"{name} of shape {tuple(mask.shape)} does not broadcast to {tuple(shape)}") from err
    if tuple(out) != tuple(shape):
        raise ValueError(
            f"{name} of shape {tuple(mask.shape)} would enlarge the scores of shape {tuple(shape)} "
            f"to {tuple(out)}; it must broadcast to the scores' shape"
        )
    return mask.expand(shape)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half dtypes (float16, bfloat16), the dtype itself otherwise."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def masked_logsumexp(x: Tensor, valid: Tensor | None, dim: int) -> Tensor:
    """``log(sum(exp(x), dim))`` where masked entries of ``x`` are ``-inf``; 0 on empty lines.

    ``valid`` (bool, shape of ``x`` with ``dim`` removed, or None) says which lines have at least
    one finite entry.  On an empty line (all ``-inf``) the result is 0 instead of ``-inf`` and the
    gradient is 0 instead of NaN; this is what lets the Sinkhorn potentials of padded rows and
    columns stay finite.
    """
    m = x.detach().amax(dim=dim, keepdim=True)  # shift (no gradient needed: lse is shift-invariant)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(x - m).sum(dim=dim)
    if valid is not None:
        s = torch.where(valid, s, torch.ones_like(s))
    return m.squeeze(dim) + torch.log(s)


def sum_to_shape(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to ``shape`` (the inverse of ``expand``)."""
    if tuple(grad.shape) == tuple(shape):
        return grad
    return grad.sum_to_size(shape)
