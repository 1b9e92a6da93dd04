"""Where an attention module sits in its model.

The one place that finds attention modules and their layer counts (the glue, ``configure``, the model
card and the analysis all ask here).  Transformers hands the attention function the module itself; from
it we read

* its *part* (``"encoder"``, ``"decoder"`` or ``"cross"``, see :mod:`hf_eot.config`),
* its layer index: the module's own ``layer_idx`` (BERT, T5, Llama) or, for models without one (ViT,
  DistilBERT, Whisper's encoder, CLIP), the index of the outermost ``nn.ModuleList`` entry that holds it,
  recorded at construction time or by :func:`attention_modules`,

The spec that applies to a module and its learned parameters are in :mod:`hf_eot.integration.parameters`.
"""

from __future__ import annotations

import copy
import re
import weakref
from typing import Any, Generic, NamedTuple, TypeVar

import torch
from torch import nn

from ..config import CONFIG_KEY, PARTS

__all__ = [
    "AttentionLocation",
    "ConfigMemo",
    "attention_modules",
    "hidden_size",
    "index_from_name",
    "is_attention_module",
    "layer_index",
    "locate_attention",
    "model_parts",
    "module_part",
    "num_heads",
]

# query projections, separate (q_proj, query, q, q_lin) or fused with the keys and values (GPT-2's c_attn,
# ModernBERT's Wqkv)
_QUERY_PROJECTIONS = ("q_proj", "query", "q", "q_lin", "c_attn", "Wqkv", "qkv")
# name components of cross-attention modules (BART/Whisper, BERT, T5, others)
_CROSS_NAMES = ("encoder_attn", "crossattention", "cross_attention", "cross_attn", "encdecattention")
# text towers whose attention modules are built non-causal but called with is_causal=True on every call
_CAUSAL_PER_CALL = frozenset(
    {
        "clip_text_model",
        "clipseg_text_model",
        "groupvit_text_model",
        "metaclip_2_text_model",
        "owlv2_text_model",
        "owlvit_text_model",
        "x_clip_text_model",
    }
)


def is_attention_module(module: nn.Module) -> bool:
    """A Transformers attention module: it holds the config, a causality flag and a query projection
    (a separate one or a fused query/key/value projection)."""
    return (
        hasattr(module, "config")
        and isinstance(getattr(module, "is_causal", None), bool)
        and any(isinstance(getattr(module, name, None), nn.Module) for name in _QUERY_PROJECTIONS)
    )


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` for every attention module of ``model``, in registration order.

    Also records on each module what its name tells: cross-attention (``encoder_attn``, ``crossattention``,
    ``EncDecAttention``, ...) and, for modules without ``layer_idx`` and no index recorded at construction,
    the layer index in the name (:func:`index_from_name`).
    """
    found = [(name, m) for name, m in model.named_modules() if is_attention_module(m)]
    for name, module in found:
        components = name.lower().split(".")
        if any(c in _CROSS_NAMES for c in components):
            module.__dict__["_eot_cross"] = True
        if layer_index(module) is None and index_from_name(name) is not None:
            module.__dict__["_eot_layer_index"] = index_from_name(name)
    return found


def module_part(module: nn.Module) -> str:
    """The module's part: ``"cross"`` for cross-attention (flagged by the module or its name),
    ``"decoder"`` for causal self-attention (causal at construction, or a text tower that is causal on
    every call such as CLIP's), ``"cross"`` for non-causal attention inside a decoder (T5's
    ``EncDecAttention``), ``"encoder"`` otherwise."""
    if getattr(module, "is_cross_attention", False) is True or module.__dict__.get("_eot_cross", False):
        return "cross"
    config = getattr(module, "config", None)
    if getattr(module, "is_causal", False) or getattr(config, "model_type", None) in _CAUSAL_PER_CALL:
        return "decoder"
    if getattr(module, "is_decoder", False) is True or getattr(config, "is_decoder", False) is True:
        return "cross"
    return "encoder"


def layer_index(module: nn.Module) -> int | None:
    """The module's layer index, or None when it cannot be known (see the module docstring)."""
    index = getattr(module, "layer_idx", None)
    if isinstance(index, int):
        return index
    return module.__dict__.get("_eot_layer_index")


def index_from_name(qualified_name: str) -> int | None:
    """The first integer component of a qualified module name (``vit.encoder.layer.3.attention`` -> 3)."""
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", qualified_name)
    return int(match.group(1)) if match else None


class AttentionLocation(NamedTuple):
    """One attention module: its part, layer index, qualified name and the module itself."""

    part: str
    layer: int
    name: str
    module: nn.Module


def locate_attention(model: nn.Module) -> list[AttentionLocation]:
    """Every attention module of ``model`` with its part and layer, sorted by part (as in
    :data:`hf_eot.config.PARTS`) then layer.

    Raises:
        ValueError: when the model has no attention module that goes through Transformers' attention
            interface, or when the layer index of one cannot be found.
    """
    located = []
    for name, module in attention_modules(model):
        index = layer_index(module)
        if index is None:
            raise ValueError(
                f"cannot find the layer index of attention module {name!r} ({type(module).__name__}): it has no "
                "layer_idx and its name holds no layer number"
            )
        located.append(AttentionLocation(module_part(module), index, name, module))
    if not located:
        raise ValueError(
            f"found no attention module in {type(model).__name__}: hf_eot supports models whose attention goes "
            "through Transformers' attention interface (modules with a config, an is_causal flag and a query "
            f"projection named one of {list(_QUERY_PROJECTIONS)})"
        )
    order = {part: i for i, part in enumerate(PARTS)}
    return sorted(located, key=lambda loc: (order[loc.part], loc.layer))


def num_heads(module: nn.Module) -> int:
    """The number of query heads of an attention module (its own attribute, else its config's)."""
    for name in ("num_attention_heads", "n_heads", "num_heads"):
        value = getattr(module, name, None)
        if isinstance(value, int):
            return value
    config = module.config
    for name in ("num_attention_heads", "num_heads", "n_heads", "n_head"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot find the number of heads of {type(module).__name__}")


def hidden_size(config: Any) -> int:
    """The model width of a config (``hidden_size``, ``d_model``, ``n_embd`` or ``dim``)."""
    for name in ("hidden_size", "d_model", "n_embd", "dim"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot find the hidden size of {type(config).__name__}")


T = TypeVar("T")


class ConfigMemo(Generic[T]):
    """A value per config object, by identity, that neither keeps the config alive nor writes into it (a
    config's ``__dict__`` is what ``save_pretrained`` serialises; configs are not hashable)."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, T]] = {}

    def get(self, config: Any) -> T | None:
        entry = self._entries.get(id(config))
        return entry[1] if entry is not None and entry[0]() is config else None

    def set(self, config: Any, value: T) -> None:
        key = id(config)
        self._entries[key] = (weakref.ref(config, lambda _, key=key: self._entries.pop(key, None)), value)


_CONFIG_PARTS: ConfigMemo[dict[str, int]] = ConfigMemo()


def model_parts(config_or_model: Any) -> dict[str, int]:
    """``{part: number of layers}`` for the attention parts of a model, or of the model a config builds.

    A model is read from its attention modules (:func:`locate_attention`), and the answer is remembered
    for its configs.  For a config met first, the model is built once on the meta device (no memory, no
    weights) with ``AutoModel.from_config`` and read the same way; a config that ``AutoModel`` does not
    know falls back to the config's layer-count fields.

    Raises:
        ValueError: for the config of one tower of a composite model (CLIP's ``text_config``) that was not
            read from its model, and for a model without attention modules (:func:`locate_attention`).
    """
    if isinstance(config_or_model, nn.Module):
        parts: dict[str, int] = {}
        located = locate_attention(config_or_model)
        for location in located:
            parts[location.part] = max(parts.get(location.part, 0), location.layer + 1)
        configs = [getattr(config_or_model, "config", None), *(location.module.config for location in located)]
        for config in {id(c): c for c in configs if c is not None}.values():
            _CONFIG_PARTS.set(config, dict(parts))
        return parts
    known = _CONFIG_PARTS.get(config_or_model)
    tower = getattr(config_or_model, "base_config_key", "")
    if known is None and tower:
        raise ValueError(
            f"{type(config_or_model).__name__} is the {tower} of a composite model, whose other towers it does "
            "not describe: pass the model (or the composite model's config) instead"
        )
    if known is None:
        skeleton = _meta_model(config_or_model)
        known = model_parts(skeleton) if skeleton is not None else _parts_from_config_fields(config_or_model)
        _CONFIG_PARTS.set(config_or_model, known)
    return dict(known)


def _meta_model(config: Any) -> nn.Module | None:
    """The base model of ``config`` on the meta device, or None when ``AutoModel`` cannot build it."""
    from transformers import AutoModel

    plain = copy.deepcopy(config)
    for target in [plain, *(getattr(plain, key, None) for key in getattr(plain, "sub_configs", {}))]:
        if target is not None and CONFIG_KEY in target.__dict__:
            delattr(target, CONFIG_KEY)
    try:
        with torch.device("meta"):
            return AutoModel.from_config(plain, attn_implementation="eager")
    except (ValueError, KeyError, TypeError, AttributeError, ImportError, RuntimeError, NotImplementedError):
        return None  # an architecture AutoModel cannot build here: the config's fields are read instead


def _parts_from_config_fields(config: Any) -> dict[str, int]:
    """``{part: layers}`` from the usual layer-count fields of a config (encoder-decoder or encoder)."""

    def first(*names: str) -> int | None:
        values = [getattr(config, n, None) for n in names]
        return next((v for v in values if isinstance(v, int)), None)

    if getattr(config, "is_encoder_decoder", False):
        encoder = first("encoder_layers", "num_layers", "num_hidden_layers")
        decoder = first("decoder_layers", "num_decoder_layers")
        decoder = decoder if decoder is not None else encoder
        if encoder is None:
            raise ValueError(f"cannot find the number of layers of {type(config).__name__}")
        return {"encoder": encoder, "decoder": decoder, "cross": decoder}
    n = first("num_hidden_layers", "num_layers", "n_layer", "n_layers")
    if n is None:
        raise ValueError(f"cannot find the number of layers of {type(config).__name__}")
    if getattr(config, "is_decoder", False):
        parts = {"decoder": n}
        if getattr(config, "add_cross_attention", False):
            parts["cross"] = n
        return parts
    return {"encoder": n}
