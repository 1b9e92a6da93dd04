"""The ``"eot"`` attention function and its mask function (the only two entry points into Transformers).

Mask convention (one for the whole library): a boolean tensor broadcastable to the scores
``(batch, heads, n_queries, n_keys)``, True = may attend.  The mask function delegates to Transformers'
own ``sdpa_mask``, so ``"eot"`` sees exactly the masks ``"sdpa"`` sees, including its two shortcuts:

* ``None`` for a bidirectional layer without padding (nothing to mask);
* ``None`` for a causal layer without padding, leaving causality to ``is_causal``: the attention
  function below rebuilds the causal mask whenever it does not hand the call to SDPA itself.

The 4D masks of Transformers mark padded *keys* only, so a padded query row looks like a real one.
Row-separable maps do not care (a padded row never feeds a real token), but Sinkhorn's column marginals
sum over queries: for it, the query rows of padded tokens are masked too (self-attention: token ``i`` is
padding iff key ``i`` is masked on its own row).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from ..config import AttentionSpec
from ..functional import attention_weights
from ..ops.priors import alibi_bias, relative_position_buckets
from ..regularizers import get_regularizer
from .adapters import warn_if_frozen
from .modules import (
    NUM_RELATIVE_BUCKETS,
    RELATIVE_MAX_DISTANCE,
    hidden_size,
    module_part,
    module_spec,
    num_heads,
)

__all__ = ["eot_attention_forward", "eot_mask"]


def eot_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """The ``"eot"`` mask: Transformers' boolean SDPA mask (True = may attend), or None when not needed."""
    return sdpa_mask(*args, **kwargs)


def _boolean_mask_and_bias(
    attention_mask: torch.Tensor | None, n_queries: int, n_keys: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Split a Transformers mask into (boolean mask, additive bias); float masks are additive."""
    if attention_mask is None:
        return None, None
    attention_mask = attention_mask[..., :n_queries, :n_keys]
    if attention_mask.dtype == torch.bool:
        return attention_mask, None
    allowed = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    bias = attention_mask.masked_fill(~allowed, 0.0)
    return allowed, (bias if bool(bias.any()) else None)


def _causal_mask(n_queries: int, n_keys: int, device: torch.device) -> torch.Tensor:
    """SDPA's ``is_causal`` pattern (top-left aligned): query i sees keys j <= i."""
    return torch.ones(n_queries, n_keys, dtype=torch.bool, device=device).tril()


def _log_prior(
    module: nn.Module,
    spec: AttentionSpec,
    position_bias: torch.Tensor | None,
    mask_bias: torch.Tensor | None,
    n_queries: int,
    n_keys: int,
    device: torch.device,
) -> torch.Tensor | None:
    """The additive log-prior of a layer: T5's position bias, a float mask's finite part, and the prior
    named in the spec (ALiBi, or learned relative-position buckets)."""
    terms = [t for t in (position_bias, mask_bias) if t is not None]
    prior = spec.params.get("prior")
    part = module_part(module)
    if prior is not None and part == "cross":
        raise ValueError(f"prior={prior!r} is a position prior and has no meaning for cross-attention")
    causal = part == "decoder"
    if prior == "alibi":
        terms.append(alibi_bias(num_heads(module), n_queries, n_keys, causal=causal, device=device)[None])
    elif prior == "relative_buckets":
        buckets = relative_position_buckets(
            n_queries,
            n_keys,
            bidirectional=not causal,
            num_buckets=NUM_RELATIVE_BUCKETS,
            max_distance=RELATIVE_MAX_DISTANCE,
            query_offset=n_keys - n_queries,
        ).to(device)
        table = module.eot_parameters.relative_bias  # (buckets, heads)
        terms.append(table[buckets].permute(2, 0, 1)[None])  # (1, heads, Q, K)
    if not terms:
        return None
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _append_partner_templates(
    key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, partners: torch.Tensor, n_queries: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Append to each example's templates (keys/values) those of ``partners[b]`` (-1: none), masked where
    absent: the OT-ViT training trick of paper 003, Section 9."""
    batch, _, n_keys, _ = key.shape
    if partners.shape != (batch,):
        raise ValueError(f"eot_template_partners must have shape ({batch},), got {tuple(partners.shape)}")
    partners = partners.to(key.device)
    has_partner = partners >= 0
    source = partners.clamp(min=0)
    key = torch.cat([key, key[source]], dim=2)
    value = torch.cat([value, value[source]], dim=2)
    own = (
        torch.ones(batch, 1, n_queries, n_keys, dtype=torch.bool, device=key.device)
        if mask is None
        else mask.expand(batch, -1, n_queries, n_keys)
    )
    partner_keys = own[source] & has_partner.view(batch, 1, 1, 1)
    # a partner's own padded keys stay masked: its mask row is taken for its first query
    partner_keys = partner_keys[:, :, :1, :].expand(batch, own.shape[1], n_queries, n_keys)
    return key, value, torch.cat([own, partner_keys], dim=-1)


def eot_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    eot_template_partners: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention with the regularizer that ``module.config.eot_attention`` selects for ``module``.

    Shapes: query ``(batch, heads, Q, d)``, key/value ``(batch, kv_heads, K, d)``; returns the output
    ``(batch, Q, heads, d_v)`` and the weights ``(batch, heads, Q, K)`` that were used (None on the
    fused SDPA path, which only runs when weights are not requested).

    ``eot_template_partners`` (LongTensor ``(batch,)``, -1 for none) is read by ``ot`` layers only: it
    appends the templates of example ``partners[b]`` to those of example ``b`` (the OT-ViT training
    trick of paper 003, Section 9); the other layers of the same model ignore it.
    """
    spec = module_spec(module)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if spec.runs_on_sdpa and not kwargs.get("output_attentions", False):
        # softmax(q.k * scaling / epsilon + the model's bias): Transformers' own SDPA path, fused kernel
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scale / spec.params["epsilon"],
            is_causal=is_causal,
            position_bias=position_bias,
            **kwargs,
        )

    regularizer = get_regularizer(spec.regularizer)
    if torch.is_grad_enabled():
        warn_if_frozen(module)
    part = module_part(module)
    if regularizer.couples_queries and part != "encoder":
        raise ValueError(
            f"regularizer {spec.regularizer!r} couples all queries through its column marginals, so in the "
            f"{part} attention of layer {getattr(module, 'layer_idx', '?')} later tokens would change earlier ones "
            "(and generate() with a KV cache would disagree with a full forward); use it for encoder "
            "self-attention only: hf_eot.configure(model, 'sinkhorn', part='encoder')"
        )
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)

    n_queries, n_keys = query.shape[-2], key.shape[-2]
    mask, mask_bias = _boolean_mask_and_bias(attention_mask, n_queries, n_keys)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    if mask is None and causal and n_queries > 1:
        mask = _causal_mask(n_queries, n_keys, query.device)
    log_prior = _log_prior(module, spec, position_bias, mask_bias, n_queries, n_keys, query.device)

    params: dict[str, Any] = dict(spec.params)
    params.pop("prior", None)
    if spec.regularizer == "entmax" and params.pop("learn_alpha"):
        params["alpha"] = module.eot_parameters.alpha()
    if regularizer.uses_templates:
        if eot_template_partners is not None:
            key, value, mask = _append_partner_templates(key, value, mask, eot_template_partners, n_queries)
            if log_prior is not None:
                log_prior = torch.cat([log_prior, log_prior], dim=-1)  # a partner's keys: same positions
        if params.get("gamma") is None:
            params["gamma"] = math.sqrt(hidden_size(module.config))
        params["template_gram"] = key @ key.transpose(-1, -2)  # (B, H, K, K): <t_i, t_j>
    if regularizer.couples_queries and mask is not None and mask.shape[-2] == mask.shape[-1]:
        # padded tokens are not queries: their rows must not take column mass
        real_tokens = mask.diagonal(dim1=-2, dim2=-1)  # (B, 1|H, Q)
        mask = mask & real_tokens.unsqueeze(-1)

    scores = (query @ key.transpose(-1, -2)) * scale  # (B, H, Q, K)
    weights = attention_weights(scores, spec.regularizer, mask, log_prior=log_prior, **params)
    if spec.regularizer == "sinkhorn":
        _record_sinkhorn_error(module, weights, mask)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = weights.to(value.dtype) @ value  # (B, H, Q, d_v)
    return output.transpose(1, 2).contiguous(), weights


def _record_sinkhorn_error(module: nn.Module, weights: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Keep the plan's column-marginal error on the module (``module.eot_marginal_error``, per batch and
    head) so that users can inspect it; no host synchronisation."""
    with torch.no_grad():
        w = weights.float()
        valid_keys = w.new_ones(w.shape[-1]) if mask is None else mask.any(dim=-2).float()  # (B,1|H,K)
        valid_queries = w.new_ones(w.shape[-2]) if mask is None else mask.any(dim=-1).float()
        n_q = valid_queries.sum(-1, keepdim=True)
        n_k = valid_keys.sum(-1, keepdim=True).clamp(min=1)
        target = valid_keys * (n_q / n_k)
        module.eot_marginal_error = ((w.sum(-2) - target).abs() * valid_keys).amax(-1)

