"""``configure``: write and validate ``config.eot_attention`` on a config or a model."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any, TypeVar

from torch import nn

from ..config import CONFIG_KEY, PARTS, AttentionSpec, EOTAttentionConfig, Override, as_layers
from .modules import attention_modules, index_from_name, model_parts
from .parameters import mark_checked, sync_parameters
from .registration import request_eot, require_eot

__all__ = ["configure"]

T = TypeVar("T")


def configure(
    config_or_model: T,
    regularizer: str | EOTAttentionConfig = "softmax",
    layers: int | Iterable[int] | None = None,
    *,
    part: str | None = None,
    **params: Any,
) -> T:
    """Choose the attention regularizer of a model, in its config (``config.eot_attention``).

    Args:
        config_or_model: a ``PretrainedConfig`` or a ``PreTrainedModel``.  For a model, its attention
            modules also get (or lose) the learned parameters the choice needs (learned entmax alpha,
            relative-position buckets), so build the optimizer after this call.
        regularizer: a name from :func:`hf_eot.available_regularizers`, or a whole
            :class:`~hf_eot.config.EOTAttentionConfig` (then ``layers``, ``part`` and ``params`` must be
            left out).
        layers: a layer index or layer indices to override (ints, numpy integers or integer tensors);
            None for all layers.
        part: ``"encoder"``, ``"decoder"`` or ``"cross"`` (see :mod:`hf_eot.config`); None for all.
        **params: the regularizer's parameters; missing ones take their defaults.

    With ``layers=None`` and ``part=None`` the whole choice is replaced; otherwise an override is added
    on top of the current choice (replacing one with the same ``layers`` and ``part``).

    Learned parameters already on the model are kept when the new choice needs the same kind (a trained
    alpha survives adding a prior); one whose configured initial value changes is re-initialised to it.
    A UserWarning says so when parameters are created, re-initialised or removed on a model that has
    gradients (an optimizer built before may hold the old ones).

    Returns:
        ``config_or_model``, for chaining.

    A model must run ``"eot"``; a config is made to ask for it (models built from it run ``"eot"``, and it
    is saved with ``"attn_implementation": "eot"``).

    Raises:
        ValueError: for a model that does not run ``"eot"`` (naming the fix), or one with no attention
            module hf_eot can drive; naming the bad value and the valid choices, for an unknown regularizer
            or parameter, an out-of-range value, a layer index or part that the model does not have, a map
            that couples queries (Sinkhorn) on a decoder part, or a position prior on cross-attention.
    """
    model = config_or_model if isinstance(config_or_model, nn.Module) else None
    config = model.config if model is not None else config_or_model
    if not hasattr(config, "to_dict"):
        raise ValueError(f"configure expects a transformers config or model, got {type(config_or_model).__name__}")
    if model is not None:
        require_eot(model)

    if isinstance(regularizer, EOTAttentionConfig):
        if layers is not None or part is not None or params:
            raise ValueError(
                "configure(model, EOTAttentionConfig(...)) replaces the whole choice: pass layers, part and "
                "parameters inside the EOTAttentionConfig, not as arguments"
            )
        new = regularizer
    else:
        spec = AttentionSpec(regularizer, params)
        if part is not None and part not in PARTS:
            raise ValueError(f"invalid part={part!r}; valid choices: None or one of {list(PARTS)}")
        layer_tuple = as_layers(layers)
        if layer_tuple is None and part is None:
            new = EOTAttentionConfig(spec)
        else:
            current = EOTAttentionConfig.from_dict(getattr(config, CONFIG_KEY, None))
            new = current.with_override(Override(spec, layer_tuple, part))
    new.check_model(model_parts(model if model is not None else config), getattr(config, "model_type", ""))

    raw = new.to_dict()
    for target in _configs(config, model):
        setattr(target, CONFIG_KEY, raw)
        mark_checked(target, raw)
        request_eot(target)
    if model is not None:
        _sync_model(model)
    return config_or_model


def _sync_model(model: nn.Module) -> None:
    """Give every attention module of ``model`` the learned parameters of its new spec; warn when that
    changes parameters of a model that has gradients (an optimizer may hold the old ones)."""
    has_gradients = any(p.grad is not None for p in model.parameters())
    changes: list[str] = []
    for name, module in attention_modules(model):
        if not isinstance(getattr(module, "layer_idx", None), int):
            module.__dict__["_eot_layer_index"] = index_from_name(name)
        module.__dict__.pop("_eot_spec_cache", None)
        changes += [f"{name}: {change}" for change in sync_parameters(module)]
    discarded = [c for c in changes if "discarding" in c]
    if changes and (has_gradients or discarded):
        shown = "; ".join(changes[:4]) + (f"; ... ({len(changes)} in all)" if len(changes) > 4 else "")
        warnings.warn(
            f"hf_eot.configure changed the learned attention parameters of a model that has been trained "
            f"({shown}): an optimizer built before this call still holds the old parameters, so build it "
            "(again) after configure",
            UserWarning,
            stacklevel=3,
        )


def _configs(config: Any, model: nn.Module | None) -> list[Any]:
    """The config and the per-stack copies a model keeps of it (T5's encoder/decoder configs)."""
    found = [config]
    if model is not None:
        for module in model.modules():
            sub = getattr(module, "config", None)
            if sub is not None and hasattr(sub, "to_dict") and all(sub is not c for c in found):
                found.append(sub)
    return found
