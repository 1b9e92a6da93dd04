"""Where an attention module sits in its model, and the learned parameters its regularizer owns.

The one place that finds attention modules and their layer counts (the glue, ``configure``, the model
card and the analysis all ask here).  Transformers hands the attention function the module itself; from
it we read

* its *part* (``"encoder"``, ``"decoder"`` or ``"cross"``, see :mod:`hf_eot.config`),
* its layer index: the module's own ``layer_idx`` (BERT, T5, Llama) or, for models without one (ViT,
  DistilBERT, Whisper's encoder, CLIP), the index of the outermost ``nn.ModuleList`` entry that holds it,
  recorded at construction time or by :func:`attention_modules`,
* the spec of ``config.eot_attention`` that applies to it (cached on the module).

Learned parameters (a per-head entmax ``alpha``, T5-style relative position buckets for BERT/ViT) live
in an :class:`EOTAttentionParameters` child of the attention module, so that they are ordinary
parameters: trained by any optimizer, saved in safetensors, restored by ``from_pretrained``.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any, NamedTuple

import torch
from torch import nn

from ..config import CONFIG_KEY, PARTS, AttentionSpec, EOTAttentionConfig

__all__ = [
    "AttentionLocation",
    "EOTAttentionParameters",
    "attention_modules",
    "hidden_size",
    "index_from_name",
    "is_attention_module",
    "layer_index",
    "locate_attention",
    "model_parts",
    "module_part",
    "module_spec",
    "num_heads",
    "sync_parameters",
]

NUM_RELATIVE_BUCKETS = 32
RELATIVE_MAX_DISTANCE = 128
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


def model_parts(config_or_model: Any) -> dict[str, int]:
    """``{part: number of layers}`` for the attention parts of a model, or of the model a config builds.

    A model is read from its attention modules (:func:`locate_attention`).  For a config, the model is
    built on the meta device (no memory, no weights) with ``AutoModel.from_config`` and read the same way;
    a config that ``AutoModel`` does not know falls back to the config's layer-count fields.
    """
    if isinstance(config_or_model, nn.Module):
        parts: dict[str, int] = {}
        for location in locate_attention(config_or_model):
            parts[location.part] = max(parts.get(location.part, 0), location.layer + 1)
        return parts
    skeleton = _meta_model(config_or_model)
    if skeleton is not None:
        return model_parts(skeleton)
    return _parts_from_config_fields(config_or_model)


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
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


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


def module_spec(module: nn.Module) -> AttentionSpec:
    """The spec of ``config.eot_attention`` that applies to ``module``.

    Parsing is cached on the module and redone whenever the config dict changes.
    """
    raw = getattr(module.config, CONFIG_KEY, None)
    cached = module.__dict__.get("_eot_spec_cache")
    if cached is not None and cached[0] == raw:
        return cached[1]
    parsed = EOTAttentionConfig.from_dict(raw)
    index = layer_index(module)
    if index is None and parsed.depends_on_layer:
        raise ValueError(
            f"config.{CONFIG_KEY} selects layers, but the layer index of this {type(module).__name__} is unknown "
            "(it was built before `import hf_eot` and has no layer_idx): call hf_eot.configure(model, ...) on the "
            "model, or import hf_eot before building it"
        )
    spec = parsed.spec_for(index, module_part(module))
    module.__dict__["_eot_spec_cache"] = (copy.deepcopy(raw), spec)
    return spec


class EOTAttentionParameters(nn.Module):
    """Learned parameters of one attention module's regularizer.

    ``alpha_logit`` (``(n_heads,)``): entmax ``alpha = 1 + sigmoid(alpha_logit)`` per head, in (1, 2)
    (Correia et al. 2019).  ``relative_bias`` (``(num_buckets, n_heads)``): a T5-style learned log-prior per
    relative-position bucket, initialised to zero so that adding it leaves the model's outputs unchanged.
    """

    def __init__(self, n_heads: int, *, alpha: float | None = None, relative_buckets: bool = False) -> None:
        super().__init__()
        self.n_heads = n_heads
        self._alpha_init = alpha
        if alpha is not None:
            self.alpha_logit = nn.Parameter(torch.empty(n_heads))
        if relative_buckets:
            self.relative_bias = nn.Parameter(torch.empty(NUM_RELATIVE_BUCKETS, n_heads))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, only_uninitialized: bool = False) -> None:
        """Set the initial values: ``alpha_logit = logit(alpha - 1)``, ``relative_bias = 0``.

        With ``only_uninitialized``, parameters that Transformers marked as loaded are left alone.
        """
        for name, param in self.named_parameters(recurse=False):
            if param.device.type == "meta" or (only_uninitialized and getattr(param, "_is_hf_initialized", False)):
                continue
            if name == "alpha_logit":
                param.fill_(math.log((self._alpha_init - 1.0) / (2.0 - self._alpha_init)))
            else:
                param.zero_()
            param._is_hf_initialized = True

    # ``from_pretrained`` builds the model on the meta device, loads the checkpoint, then initialises every
    # module whose ``_is_hf_initialized`` flag is unset with the model's ``_init_weights``, which knows
    # nothing of these parameters.  Answering the flag ourselves initialises the ones that were missing
    # from the checkpoint (a pretrained model being converted) and keeps the loaded ones.
    @property
    def _is_hf_initialized(self) -> bool:
        self.reset_parameters(only_uninitialized=True)
        return True

    @_is_hf_initialized.setter
    def _is_hf_initialized(self, value: bool) -> None:
        pass

    def alpha(self) -> torch.Tensor:
        """Per-head alpha, shape ``(n_heads, 1, 1)`` (broadcasts against ``(batch, heads, Q, K)``)."""
        return (1.0 + torch.sigmoid(self.alpha_logit.float())).view(-1, 1, 1)

    def layout(self) -> tuple[bool, bool]:
        return hasattr(self, "alpha_logit"), hasattr(self, "relative_bias")

    def extra_repr(self) -> str:
        learns_alpha, relative = self.layout()
        return f"n_heads={self.n_heads}, learn_alpha={learns_alpha}, relative_buckets={relative}"


def required_layout(spec: AttentionSpec) -> tuple[bool, bool]:
    """(learns alpha, has relative buckets) for a spec."""
    learns_alpha = spec.regularizer == "entmax" and spec.params["learn_alpha"]
    return learns_alpha, spec.params.get("prior") == "relative_buckets"


def sync_parameters(module: nn.Module) -> None:
    """Give ``module`` exactly the learned parameters its spec needs (new ones start at the spec's values;
    existing ones of the right layout are kept, so trained or loaded values survive)."""
    spec = module_spec(module)
    learns_alpha, relative = required_layout(spec)
    current = getattr(module, "eot_parameters", None)
    if not (learns_alpha or relative):
        if current is not None:
            del module.eot_parameters
        return
    if current is not None and current.layout() == (learns_alpha, relative):
        return
    reference = next(module.parameters(), None)
    params = EOTAttentionParameters(
        num_heads(module), alpha=spec.params["alpha"] if learns_alpha else None, relative_buckets=relative
    )
    if reference is not None and reference.device.type != "meta":
        params = params.to(device=reference.device)
    module.eot_parameters = params
