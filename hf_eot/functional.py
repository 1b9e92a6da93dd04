"""``attention_weights``: scores -> weights for any registered regularizer, without any model."""

from __future__ import annotations

from typing import Any

import torch

from .regularizers import get_regularizer, validate_params

__all__ = ["attention_weights"]


def _check_tensors(
    scores: torch.Tensor, mask: torch.Tensor | None, log_prior: torch.Tensor | None
) -> None:
    """ValueErrors for inputs the maps cannot take (named, with the expected form)."""
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise ValueError(f"scores must be a floating-point tensor (..., n_queries, n_keys), got {scores!r:.80}")
    if scores.dim() < 2 or scores.shape[-1] == 0 or scores.shape[-2] == 0:
        raise ValueError(
            f"scores must have shape (..., n_queries, n_keys) with at least one query and one key, got "
            f"{tuple(scores.shape)}"
        )
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            found = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(
                f"mask must be a boolean tensor (True = may attend), got {found}; convert an additive float "
                "mask with `mask = additive_mask == 0` and a 0/1 mask with `mask = mask.bool()`"
            )
        _check_broadcasts(mask, scores, "mask")
    if log_prior is not None:
        if not isinstance(log_prior, torch.Tensor) or not log_prior.is_floating_point():
            raise ValueError(
                f"log_prior must be a floating-point tensor broadcastable to the scores, got {log_prior!r:.80}"
            )
        _check_broadcasts(log_prior, scores, "log_prior")


def _check_broadcasts(tensor: torch.Tensor, scores: torch.Tensor, name: str) -> None:
    try:
        shape = torch.broadcast_shapes(tensor.shape, scores.shape)
    except RuntimeError:
        shape = None
    if shape != scores.shape:
        raise ValueError(
            f"{name} of shape {tuple(tensor.shape)} does not broadcast to the scores' shape {tuple(scores.shape)}"
        )


def attention_weights(
    scores: torch.Tensor,
    regularizer: str = "softmax",
    mask: torch.Tensor | None = None,
    *,
    log_prior: torch.Tensor | None = None,
    template_gram: torch.Tensor | None = None,
    **params: Any,
) -> torch.Tensor:
    """Solves ``min_p <-scores, p> + Omega(p)`` row by row (jointly for ``sinkhorn``).

    Args:
        scores: ``(..., n_queries, n_keys)`` attention scores (already multiplied by the model's scaling),
            with at least one query and one key.
        regularizer: a name from :func:`hf_eot.available_regularizers`.
        mask: boolean, broadcastable to ``scores``; True = may attend.  A fully masked row is a
            non-existent query (its weights are 0); a fully masked column a non-existent key.
        log_prior: optional additive log-prior ``log pi``, broadcastable to ``scores`` (e.g. T5's
            position bias, or :func:`hf_eot.ops.alibi_bias`).  For ``ot`` it is the log of the preference
            ``u`` of "Deciphering Attention Mechanisms: Optimization and Fenchel Dual Solutions", eq. (22).
        template_gram: ``(..., n_keys, n_keys)`` Gram matrix of the templates, for ``ot`` only.
        **params: the regularizer's parameters (validated; see ``available_regularizers()``); numpy and
            one-element torch scalars count as numbers.  ``alpha`` of ``entmax`` may also be a tensor
            broadcastable to ``scores[..., :1]`` (every value > 1).  Parameters that describe a model
            (``prior``, ``learn_alpha``) are refused: pass ``log_prior`` or a tensor ``alpha`` instead.

    Returns:
        weights with the shape and dtype of ``scores``; each valid row lies on the simplex.

    Raises:
        ValueError: for an unknown regularizer or parameter, an invalid value, or malformed tensors.
    """
    reg = get_regularizer(regularizer)
    model_only = sorted(p.name for p in reg.params if p.config_only and p.name in params)
    if model_only:
        raise ValueError(
            f"parameter(s) {model_only} describe a model's configuration (hf_eot.configure) and have no meaning "
            "for attention_weights: pass log_prior= (e.g. hf_eot.ops.alibi_bias(...)) for a prior, and a tensor "
            "alpha for per-head values"
        )
    checked = reg.call_params(validate_params(regularizer, params, allow_tensors=True))
    _check_tensors(scores, mask, log_prior)
    if reg.needs_templates:
        checked["template_gram"] = template_gram
    elif template_gram is not None:
        raise ValueError(f"template_gram is only used by regularizers that need templates, not {regularizer!r}")
    return reg.weights(scores, mask, log_prior, **checked).weights
