"""Where an attention module sits in its model.

Transformers hands the attention function the module itself; from it we read

* its *part* (``"encoder"``, ``"decoder"`` or ``"cross"``, see :mod:`hf_eot.config`),
* its layer index: the module's own ``layer_idx`` (BERT, T5) or, for models without one (ViT), the
  index of the outermost ``nn.ModuleList`` entry that holds it, recorded at construction time.

The spec that applies to a module and its learned parameters are in :mod:`hf_eot.integration.parameters`.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

__all__ = [
    "attention_modules",
    "is_attention_module",
    "layer_index",
    "model_parts",
    "module_part",
    "num_heads",
]

_QUERY_PROJECTIONS = ("q_proj", "query", "q")


def is_attention_module(module: nn.Module) -> bool:
    """A Transformers attention module: it holds the config, a causality flag and a query projection."""
    return (
        hasattr(module, "config")
        and hasattr(module, "is_causal")
        and any(isinstance(getattr(module, name, None), nn.Module) for name in _QUERY_PROJECTIONS)
    )


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` for every attention module of ``model``, in registration order."""
    return [(name, m) for name, m in model.named_modules() if is_attention_module(m)]


def module_part(module: nn.Module) -> str:
    """``"decoder"`` for causal self-attention, ``"cross"`` for attention inside a decoder that is not
    causal (cross-attention), ``"encoder"`` otherwise."""
    if getattr(module, "is_causal", False):
        return "decoder"
    if getattr(module.config, "is_decoder", False):
        return "cross"
    return "encoder"


def layer_index(module: nn.Module) -> int | None:
    """The module's layer index, or None when it cannot be known (see the module docstring)."""
    index = getattr(module, "layer_idx", None)
    if isinstance(index, int):
        return index
    return getattr(module, "_eot_layer_index", None)


def index_from_name(qualified_name: str) -> int | None:
    """The first integer component of a qualified module name (``vit.encoder.layer.3.attention`` -> 3)."""
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", qualified_name)
    return int(match.group(1)) if match else None


def num_heads(module: nn.Module) -> int:
    for name in ("num_attention_heads", "n_heads", "num_heads"):
        value = getattr(module, name, None)
        if isinstance(value, int):
            return value
    config = module.config
    for name in ("num_attention_heads", "num_heads", "n_head"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot find the number of heads of {type(module).__name__}")


def hidden_size(config: Any) -> int:
    for name in ("hidden_size", "d_model", "n_embd"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot find the hidden size of {type(config).__name__}")


def model_parts(config: Any) -> dict[str, int]:
    """``{part: number of layers}`` for the attention parts a config's model has."""
    if getattr(config, "is_encoder_decoder", False):
        encoder = getattr(config, "num_layers", None) or config.num_hidden_layers
        decoder = getattr(config, "num_decoder_layers", None) or encoder
        return {"encoder": encoder, "decoder": decoder, "cross": decoder}
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", None)
    if n is None:
        raise ValueError(f"cannot find the number of layers of {type(config).__name__}")
    if getattr(config, "is_decoder", False):
        parts = {"decoder": n}
        if getattr(config, "add_cross_attention", False):
            parts["cross"] = n
        return parts
    return {"encoder": n}
