"""``configure``: write and validate ``config.eot_attention`` on a config or a model."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from torch import nn

from ..config import CONFIG_KEY, PARTS, AttentionSpec, EOTAttentionConfig, Override
from ..regularizers import get_regularizer
from .modules import attention_modules, index_from_name, model_parts, sync_parameters
from .registration import request_eot, require_eot

__all__ = ["configure"]

T = TypeVar("T")


def configure(
    config_or_model: T,
    regularizer: str = "softmax",
    layers: Iterable[int] | None = None,
    *,
    part: str | None = None,
    **params: Any,
) -> T:
    """Choose the attention regularizer of a model, in its config (``config.eot_attention``).

    Args:
        config_or_model: a ``PretrainedConfig`` or a ``PreTrainedModel``.  For a model, its attention
            modules also get (or lose) the learned parameters the choice needs (learned entmax alpha,
            relative-position buckets), so build the optimizer after this call.
        regularizer: a name from :func:`hf_eot.available_regularizers`.
        layers: layer indices to override; None for all layers.
        part: ``"encoder"``, ``"decoder"`` or ``"cross"`` (see :mod:`hf_eot.config`); None for all.
        **params: the regularizer's parameters; missing ones take their defaults.

    With ``layers=None`` and ``part=None`` the whole choice is replaced; otherwise an override is added
    on top of the current choice (replacing one with the same ``layers`` and ``part``).

    Returns:
        ``config_or_model``, for chaining.

    Raises:
        ValueError: naming the bad value and the valid choices, for an unknown regularizer or parameter,
            an out-of-range value, a layer index or part that the model does not have, a map that
            couples queries (Sinkhorn) on a decoder part, or a position prior on cross-attention.
    """
    model = config_or_model if isinstance(config_or_model, nn.Module) else None
    config = model.config if model is not None else config_or_model
    if not hasattr(config, "to_dict"):
        raise ValueError(f"configure expects a transformers config or model, got {type(config_or_model).__name__}")

    if model is not None:
        require_eot(model)
    spec = AttentionSpec(regularizer, params)
    parts = model_parts(model if model is not None else config)
    if part is not None and part not in PARTS:
        raise ValueError(f"invalid part={part!r}; valid choices: None or one of {list(PARTS)}")
    if part is not None and part not in parts:
        raise ValueError(f"invalid part={part!r}: this {config.model_type} model has parts {sorted(parts)}")
    selected = [part] if part is not None else sorted(parts)
    layer_tuple = None if layers is None else tuple(layers)
    if layer_tuple is not None:
        n_layers = max(parts[p] for p in selected)
        bad = [i for i in layer_tuple if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n_layers]
        if bad or not layer_tuple:
            raise ValueError(
                f"invalid layers={list(layer_tuple)!r}: this model has layers 0..{n_layers - 1}"
                + (f" in part {part!r}" if part else "")
            )
    if get_regularizer(regularizer).couples_queries:
        coupled = [p for p in selected if p != "encoder"]
        if coupled and "encoder" not in parts:
            raise ValueError(
                f"regularizer {regularizer!r} couples all queries of a sequence, and this {config.model_type} model "
                f"has no encoder self-attention (its parts: {sorted(parts)}), only attention where later tokens "
                "would change earlier ones: choose another regularizer"
            )
        if coupled:
            raise ValueError(
                f"regularizer {regularizer!r} couples all queries of a sequence, so it cannot be used in the "
                f"{coupled} attention (later tokens would change earlier ones); choose part='encoder'"
            )

    if spec.params.get("prior") is not None and "cross" in selected:
        raise ValueError(
            f"prior={spec.params['prior']!r} is a position prior over one sequence and has no meaning for "
            "cross-attention (queries and keys come from different sequences); choose part='encoder' or "
            "part='decoder'"
        )

    if layer_tuple is None and part is None:
        new = EOTAttentionConfig(spec)
    else:
        current = EOTAttentionConfig.from_dict(getattr(config, CONFIG_KEY, None))
        new = current.with_override(Override(spec, layer_tuple, part))
    raw = new.to_dict()
    for target in _configs(config, model):
        setattr(target, CONFIG_KEY, raw)
        request_eot(target)
    if model is not None:
        for name, module in attention_modules(model):
            if not isinstance(getattr(module, "layer_idx", None), int):
                module.__dict__["_eot_layer_index"] = index_from_name(name)
            module.__dict__.pop("_eot_spec_cache", None)
            sync_parameters(module)
    return config_or_model


def _configs(config: Any, model: nn.Module | None) -> list[Any]:
    """The config and the per-stack copies a model keeps of it (T5's encoder/decoder configs)."""
    found = [config]
    if model is not None:
        for module in model.modules():
            sub = getattr(module, "config", None)
            if sub is not None and hasattr(sub, "to_dict") and all(sub is not c for c in found):
                found.append(sub)
    return found
