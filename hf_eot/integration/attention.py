"""The ``"eot"`` attention function and its mask function (the only two entry points into Transformers).

Mask convention (one for the whole library): a boolean tensor broadcastable to the scores
``(batch, heads, n_queries, n_keys)``, True = may attend.  The mask function delegates to Transformers'
own ``sdpa_mask``, so ``"eot"`` sees exactly the masks ``"sdpa"`` sees, including its two shortcuts:

* ``None`` for a bidirectional layer without padding (nothing to mask);
* ``None`` for a causal layer without padding, leaving causality to ``is_causal``: the attention
  function below rebuilds the causal mask whenever it does not hand the call to SDPA itself.

The 4D masks of Transformers mark padded *keys* only, so a padded query row looks like a real one.
Row-separable maps do not care (a padded row never feeds a real token), but maps that couple queries
(Sinkhorn's column marginals sum over queries) must not let padded tokens take column mass.  For them,
in self-attention, a token is padding iff no query may attend to it (its key column is fully masked, as
for every padded token of a Transformers mask), and its query row is then masked too; fully masked rows
are non-existent queries, as in :func:`hf_eot.attention_weights`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from ..config import AttentionSpec
from ..ops.priors import alibi_bias, relative_position_buckets
from ..regularizers import get_regularizer
from .adapters import warn_if_frozen
from .modules import hidden_size, layer_index, model_parts, module_part, num_heads
from .parameters import NUM_RELATIVE_BUCKETS, RELATIVE_MAX_DISTANCE, learned_values, module_spec

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
    prior = spec.params.get("prior")  # never set on cross-attention (EOTAttentionConfig.check_model)
    causal = module_part(module) == "decoder"
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
    absent: the OT-ViT training trick of "Deciphering Attention Mechanisms: Optimization and Fenchel Dual
    Solutions", Section 9."""
    batch, _, n_keys, _ = key.shape
    if not isinstance(partners, torch.Tensor) or partners.shape != (batch,):
        raise ValueError(f"eot_template_partners must be an integer tensor of shape ({batch},), got {partners!r}")
    if partners.dtype.is_floating_point or partners.dtype.is_complex or partners.dtype == torch.bool:
        raise ValueError(
            f"eot_template_partners must hold integer example indices (-1: none), got dtype {partners.dtype}"
        )
    if bool(((partners < -1) | (partners >= batch)).any()):
        raise ValueError(
            f"eot_template_partners must hold example indices in 0..{batch - 1} (or -1: none), got {partners.tolist()}"
        )
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


def _mask_is_causal(mask: torch.Tensor) -> bool:
    """Whether a boolean mask ``(..., Q, K)`` hides future tokens: no allowed entry above the (bottom-right
    aligned) diagonal, and some entry there hidden between a real query and a real key."""
    n_queries, n_keys = mask.shape[-2:]
    if n_queries < 2:
        return False
    future = torch.ones(n_queries, n_keys, dtype=torch.bool, device=mask.device).triu(n_keys - n_queries + 1)
    if bool((mask & future).any()):
        return False
    real = mask.any(dim=-1, keepdim=True) & mask.any(dim=-2, keepdim=True)  # (..., Q, K)
    return bool((future & real).any())


def _mask_padded_queries(mask: torch.Tensor) -> torch.Tensor:
    """Self-attention mask with the query rows of padded tokens masked too: token ``i`` is padding iff no
    query may attend to it (key column ``i`` fully masked)."""
    padded = ~mask.any(dim=-2)  # (B, 1|H, K) = (B, 1|H, Q)
    return mask & ~padded.unsqueeze(-1)


def _refuse_coupled_queries(name: str, module: nn.Module, part: str, call_causal: bool) -> None:
    """A map that couples queries cannot run where queries come one at a time (causal calls, decoders,
    cross-attention): later tokens would change earlier ones.  The advice names ``part='encoder'`` only
    when the model has a non-causal encoder part elsewhere."""
    try:
        has_encoder = "encoder" in model_parts(module.config)
    except ValueError:
        has_encoder = False
    where = "a causal attention call" if call_causal else f"the {part} attention"
    if has_encoder and part != "encoder":
        advice = f"use it for encoder self-attention only: hf_eot.configure(model, {name!r}, part='encoder')"
    else:
        advice = "use it only on attention that is neither causal nor cross-attention"
    raise ValueError(
        f"regularizer {name!r} couples all queries through its column marginals, so in {where} (layer "
        f"{layer_index(module)}) later tokens would change earlier ones (and generate() with a KV cache would "
        f"disagree with a full forward); {advice}"
    )


def _weights_requested(kwargs: dict[str, Any]) -> bool:
    """Whether the caller wants this call's attention weights: ``output_attentions`` passed down to the
    attention function, or (Transformers 5) requested on the model's forward or config, which the
    output-capturing hooks record in a context variable that not every model passes on as a keyword
    (GPT-2 does not, nor does ``config.output_attentions=True``).  Without the weights those hooks would
    record None, so the fused paths must not run."""
    if kwargs.get("output_attentions", False):
        return True
    collector = _active_output_collector()
    return collector is not None and any("attentions" in name for name in collector)


def _active_output_collector() -> dict[str, Any] | None:
    """The outputs Transformers' ``capture_outputs`` is recording for the running forward (None if none)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # a Transformers without output capturing passes output_attentions as a keyword
        return None
    try:
        return _active_collector.get()  # compile-safe in Transformers
    except LookupError:
        return None


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
    fused paths, SDPA for softmax and the regularizer's ``attention`` hook for the sparse maps, which only
    run when weights are not requested).  The regularizer's diagnostics
    (e.g. Sinkhorn's ``marginal_error`` per batch and head, ``n_iters``) are kept on the module as
    ``module.eot_diagnostics`` and as ``module.eot_<name>`` attributes.

    ``eot_template_partners`` (LongTensor ``(batch,)``, -1 for none) is read by layers whose map needs
    templates (``ot``) only: it appends the templates of example ``partners[b]`` to those of example
    ``b`` (the OT-ViT training trick of "Deciphering Attention Mechanisms: Optimization and Fenchel Dual
    Solutions", Section 9); the other layers of the same model ignore it.
    """
    spec = module_spec(module)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    weights_requested = _weights_requested(kwargs)
    if spec.runs_on_sdpa and not weights_requested:
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
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)

    n_queries, n_keys = query.shape[-2], key.shape[-2]
    mask, mask_bias = _boolean_mask_and_bias(attention_mask, n_queries, n_keys)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    if regularizer.couples_queries:
        part = module_part(module)
        # causal per call too (CLIP's text attention passes is_causal=True to a non-causal module); the
        # mask test synchronises with the host, so it is skipped while compiling
        call_causal = (bool(causal) and n_queries > 1) or (
            mask is not None and not torch.compiler.is_compiling() and _mask_is_causal(mask)
        )
        if part != "encoder" or call_causal:
            _refuse_coupled_queries(spec.regularizer, module, part, call_causal)
    if mask is None and causal and n_queries > 1:
        mask = _causal_mask(n_queries, n_keys, query.device)
    log_prior = _log_prior(module, spec, position_bias, mask_bias, n_queries, n_keys, query.device)

    params = regularizer.call_params(spec.params)
    params.update(learned_values(module, spec))
    if regularizer.needs_templates:
        if eot_template_partners is not None:
            key, value, mask = _append_partner_templates(key, value, mask, eot_template_partners, n_queries)
            if log_prior is not None:
                log_prior = torch.cat([log_prior, log_prior], dim=-1)  # a partner's keys: same positions
        params["template_gram"] = key @ key.transpose(-1, -2)  # (B, H, K, K): <t_i, t_j>
        params["hidden_size"] = hidden_size(module.config)
    if regularizer.couples_queries and mask is not None and n_queries == n_keys:
        mask = _mask_padded_queries(mask)  # padded tokens are not queries: no column mass for them

    if regularizer.attention is not None and not weights_requested:
        # weights not requested: the fused map (e.g. sparse maps in query blocks, weights never stored);
        # its host synchronisations keep it out of compiled graphs, which use the weights path
        if not torch.compiler.is_compiling():
            output = regularizer.attention(
                query, key, value, mask, log_prior, scale=scale, dropout=dropout if module.training else 0.0, **params
            )
            if output is not None:
                return output.transpose(1, 2).contiguous(), None

    scores = (query @ key.transpose(-1, -2)) * scale  # (B, H, Q, K)
    out = regularizer.weights(scores, mask, log_prior, **params)
    if out.diagnostics:
        module.__dict__["eot_diagnostics"] = out.diagnostics
        for name, diagnostic in out.diagnostics.items():
            module.__dict__[f"eot_{name}"] = diagnostic
    weights = nn.functional.dropout(out.weights, p=dropout, training=module.training)
    output = weights.to(value.dtype) @ value  # (B, H, Q, d_v)
    return output.transpose(1, 2).contiguous(), weights
