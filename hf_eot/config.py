"""The one config schema: which regularizer each attention module uses.

It lives in the model config as a plain JSON dict, ``config.eot_attention``, so it survives
``save_pretrained`` / ``from_pretrained`` and the hub::

    {"version": 1,
     "default": {"regularizer": "softmax", "epsilon": 1.0, "prior": null},
     "overrides": [{"layers": [5], "part": "encoder", "regularizer": "ot", "alpha": 1.0, ...}]}

An attention module is identified by its *part* and its layer index:

* ``"encoder"``: non-causal self-attention (BERT, ViT, the T5 encoder);
* ``"decoder"``: causal self-attention (the T5 decoder, BERT as a decoder);
* ``"cross"``: cross-attention from a decoder to an encoder.

The last override that matches a module wins; with none, ``default`` applies.  A model config without
``eot_attention`` means softmax with ``epsilon=1``, i.e. exactly ``"sdpa"``.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .regularizers import get_regularizer, validate_params

__all__ = [
    "CONFIG_KEY",
    "PARTS",
    "AttentionSpec",
    "EOTAttentionConfig",
    "Override",
    "as_layers",
    "split_spec_string",
]

CONFIG_KEY = "eot_attention"
SCHEMA_VERSION = 1
Part = Literal["encoder", "decoder", "cross"]
PARTS: tuple[str, ...] = ("encoder", "decoder", "cross")


def as_layers(value: Any, name: str = "layers") -> tuple[int, ...] | None:
    """``value`` as a non-empty tuple of layer indices (ints >= 0), or None.

    Accepts an int, a list/tuple of ints, numpy integers and arrays, 0-d or 1-d integer tensors; a
    ValueError names ``name`` otherwise.
    """
    if value is None:
        return None
    expected = f"expected None, a layer index or a non-empty list of layer indices (ints >= 0), got {value!r}"
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool or value.dim() > 1:
            raise ValueError(f"invalid {name}: {expected}")
        value = value.tolist()
    elif hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy arrays and scalars
        value = value.tolist()
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise ValueError(f"invalid {name}: {expected}")
    items = list(value)
    bad = [i for i in items if not isinstance(i, numbers.Integral) or isinstance(i, bool) or i < 0]
    if bad or not items:
        raise ValueError(f"invalid {name}={items!r}: expected a non-empty list of ints >= 0")
    return tuple(int(i) for i in items)


def _spec_value(text: str) -> Any:
    """A parameter value of a spec string: None, a bool, an int, a float, else the text itself."""
    lowered = text.lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def split_spec_string(text: str) -> tuple[str, dict[str, Any]]:
    """``"name[:key=value,...]"`` -> ``(name, {key: value})``, unvalidated.

    ``"entmax:alpha=1.5,learn_alpha=true"`` -> ``("entmax", {"alpha": 1.5, "learn_alpha": True})``.
    Values read as None (``none``/``null``), bools, ints, floats, else strings.  The command-line form
    of a spec; :meth:`AttentionSpec.from_string` also validates it.
    """
    if not isinstance(text, str):
        raise ValueError(f"a spec string must be a str like 'entmax:alpha=1.5', got {text!r}")
    name, _, rest = text.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, (i.strip() for i in rest.split(","))):
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or not key:
            raise ValueError(f"bad regularizer parameter {item!r} in {text!r}: expected key=value")
        if key in params or key == "regularizer":
            what = "sets it twice" if key in params else "names the regularizer before the ':'"
            raise ValueError(f"bad regularizer parameter {key!r} in {text!r}: the spec {what}")
        params[key] = _spec_value(value)
    return name.strip(), params


@dataclass(frozen=True)
class AttentionSpec:
    """A regularizer name and its complete, validated parameters."""

    regularizer: str = "softmax"
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", validate_params(self.regularizer, self.params))

    @property
    def runs_on_sdpa(self) -> bool:
        """True for softmax without a named prior: ``softmax(scores / epsilon + model's own bias)`` is
        fused SDPA with the scale divided by epsilon."""
        return get_regularizer(self.regularizer).is_sdpa and self.params.get("prior") is None

    def to_dict(self) -> dict[str, Any]:
        return {"regularizer": self.regularizer, **self.params}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AttentionSpec:
        """Parse ``{"regularizer": name, **params}``; legacy parameter names (e.g. entmax ``n_iter``,
        now ``max_iters``) are read as their current names."""
        if not isinstance(data, Mapping):
            raise ValueError(f"an attention spec must be a dict with a 'regularizer' key, got {data!r}")
        data = dict(data)
        if "regularizer" not in data:
            raise ValueError(f"attention spec {data!r} has no 'regularizer' key")
        name = data.pop("regularizer")
        for param in get_regularizer(name).params:
            for alias in param.aliases:
                if alias in data:
                    if param.name in data:
                        raise ValueError(
                            f"attention spec {data!r} sets both {param.name!r} and its legacy name {alias!r}"
                        )
                    data[param.name] = data.pop(alias)
        return cls(name, data)

    @classmethod
    def from_string(cls, text: str) -> AttentionSpec:
        """Parse and validate ``"name[:key=value,...]"`` (:func:`split_spec_string`), e.g.
        ``"sinkhorn:n_iters=20"``; an unknown name or parameter raises ValueError naming the choices."""
        name, params = split_spec_string(text)
        return cls.from_dict({"regularizer": name, **params})


@dataclass(frozen=True)
class Override:
    """``spec`` for the modules of ``part`` (None: any) at ``layers`` (None: all)."""

    spec: AttentionSpec
    layers: tuple[int, ...] | None = None
    part: str | None = None

    def __post_init__(self) -> None:
        if self.part is not None and self.part not in PARTS:
            raise ValueError(f"invalid part={self.part!r}; valid choices: None or one of {list(PARTS)}")
        object.__setattr__(self, "layers", as_layers(self.layers))

    def matches(self, layer: int | None, part: str) -> bool:
        if self.part is not None and self.part != part:
            return False
        return self.layers is None or layer in self.layers

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": None if self.layers is None else list(self.layers),
            "part": self.part,
            **self.spec.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Override:
        if not isinstance(data, Mapping):
            raise ValueError(f"each entry of config.{CONFIG_KEY}['overrides'] must be a dict, got {data!r}")
        data = dict(data)
        layers = data.pop("layers", None)
        part = data.pop("part", None)
        return cls(AttentionSpec.from_dict(data), layers, part)


@dataclass(frozen=True)
class EOTAttentionConfig:
    """The parsed ``config.eot_attention``: a default spec and ordered overrides."""

    default: AttentionSpec = field(default_factory=AttentionSpec)
    overrides: tuple[Override, ...] = ()

    def spec_for(self, layer: int | None, part: str) -> AttentionSpec:
        """The spec of the module at ``layer`` in ``part`` (the last matching override wins)."""
        for override in reversed(self.overrides):
            if override.matches(layer, part):
                return override.spec
        return self.default

    @property
    def depends_on_layer(self) -> bool:
        return any(o.layers is not None for o in self.overrides)

    def specs(self) -> list[AttentionSpec]:
        return [self.default, *(o.spec for o in self.overrides)]

    def with_override(self, override: Override) -> EOTAttentionConfig:
        """A copy with ``override`` appended (replacing one with the same selector)."""
        kept = tuple(o for o in self.overrides if (o.layers, o.part) != (override.layers, override.part))
        return EOTAttentionConfig(self.default, (*kept, override))

    def check_model(self, parts: Mapping[str, int], model_type: str = "") -> None:
        """Check this config against a model with ``parts`` (``{part: number of layers}``).

        Every override must select a part the model has and layers inside it; a map that couples queries
        (Sinkhorn) must not resolve to a decoder or cross-attention module, nor a position prior to a
        cross-attention module.  Raises ValueError naming the bad value and the valid choices.
        """
        model = f"this {model_type} model" if model_type else "this model"
        for override in self.overrides:
            if override.part is not None and override.part not in parts:
                raise ValueError(f"invalid part={override.part!r}: {model} has parts {sorted(parts)}")
            if override.layers is not None:
                selected = [override.part] if override.part is not None else list(parts)
                n_layers = max(parts[p] for p in selected)
                bad = [i for i in override.layers if i >= n_layers]
                if bad:
                    raise ValueError(
                        f"invalid layers={list(override.layers)!r}: {model} has layers 0..{n_layers - 1}"
                        + (f" in part {override.part!r}" if override.part else "")
                    )
        coupled: dict[str, set[str]] = {}
        cross_priors: set[str] = set()
        for part, n_layers in parts.items():
            for layer in range(n_layers):
                spec = self.spec_for(layer, part)
                if get_regularizer(spec.regularizer).couples_queries and part != "encoder":
                    coupled.setdefault(spec.regularizer, set()).add(part)
                if part == "cross" and spec.params.get("prior") is not None:
                    cross_priors.add(spec.params["prior"])
        for name, where in coupled.items():
            advice = "choose part='encoder'" if "encoder" in parts else f"{model} has no encoder part"
            raise ValueError(
                f"regularizer {name!r} couples all queries of a sequence, so it cannot be used in the "
                f"{sorted(where)} attention (later tokens would change earlier ones, and generate() with a KV "
                f"cache would disagree with a full forward); {advice}"
            )
        if cross_priors:
            raise ValueError(
                f"prior={sorted(cross_priors)[0]!r} is a position prior over one sequence and has no meaning for "
                "cross-attention (queries and keys come from different sequences); choose part='encoder' or "
                "part='decoder'"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": SCHEMA_VERSION,
            "default": self.default.to_dict(),
            "overrides": [o.to_dict() for o in self.overrides],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> EOTAttentionConfig:
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ValueError(f"config.{CONFIG_KEY} must be a dict, got {type(data).__name__}: {data!r}")
        version = data.get("version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ValueError(f"config.{CONFIG_KEY} has version {version!r}; this hf_eot reads version {SCHEMA_VERSION}")
        unknown = set(data) - {"version", "default", "overrides"}
        if unknown:
            raise ValueError(
                f"unknown key(s) {sorted(unknown)} in config.{CONFIG_KEY}; valid keys: ['default', 'overrides', 'version']"
            )
        default = AttentionSpec.from_dict(data.get("default", {"regularizer": "softmax"}))
        overrides = data.get("overrides", [])
        if not isinstance(overrides, (list, tuple)):
            raise ValueError(
                f"config.{CONFIG_KEY}['overrides'] must be a list of dicts (each with 'layers', 'part', "
                f"'regularizer' and its parameters), got {type(overrides).__name__}: {overrides!r}"
            )
        return cls(default, tuple(Override.from_dict(o) for o in overrides))
