"""``attention_weights``: scores -> weights for any registered regularizer, without any model."""

from __future__ import annotations

from typing import Any

import torch

from .regularizers import get_regularizer, validate_params

__all__ = ["attention_weights"]


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
        scores: ``(..., n_queries, n_keys)`` attention scores (already multiplied by the model's scaling).
        regularizer: a name from :func:`hf_eot.available_regularizers`.
        mask: boolean, broadcastable to ``scores``; True = may attend.  A fully masked row is a
            non-existent query (its weights are 0); a fully masked column a non-existent key.
        log_prior: optional additive log-prior ``log pi``, broadcastable to ``scores`` (e.g. T5's
            position bias).  For ``ot`` it is the log of the preference ``u`` of paper 003 eq. (22).
        template_gram: ``(..., n_keys, n_keys)`` Gram matrix of the templates, for ``ot`` only.
        **params: the regularizer's parameters (validated; see ``available_regularizers()``).
            ``alpha`` of ``entmax`` may also be a tensor broadcastable to ``scores[..., :1]``.

    Returns:
        weights with the shape and dtype of ``scores``; each valid row lies on the simplex.
    """
    reg = get_regularizer(regularizer)
    tensor_params = {k: v for k, v in params.items() if isinstance(v, torch.Tensor)}
    checked = validate_params(regularizer, {k: v for k, v in params.items() if k not in tensor_params})
    checked.update(tensor_params)
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"mask must be a boolean tensor (True = may attend), got dtype {mask.dtype}")
    if reg.uses_templates:
        return reg.weights(scores, mask, template_gram=template_gram, log_prior=log_prior, **checked)
    logits = scores if checked["epsilon"] == 1.0 else scores / checked["epsilon"]
    if log_prior is not None:
        logits = logits + log_prior.to(logits.dtype)
    return reg.weights(logits, mask, **checked)
