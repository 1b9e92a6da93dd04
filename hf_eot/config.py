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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .regularizers import get_regularizer, validate_params

__all__ = ["PARTS", "AttentionSpec", "EOTAttentionConfig", "Override", "CONFIG_KEY"]

CONFIG_KEY = "eot_attention"
SCHEMA_VERSION = 1
Part = Literal["encoder", "decoder", "cross"]
PARTS: tuple[str, ...] = ("encoder", "decoder", "cross")


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
        return self.regularizer == "softmax" and self.params["prior"] is None

    def to_dict(self) -> dict[str, Any]:
        return {"regularizer": self.regularizer, **self.params}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AttentionSpec:
        data = dict(data)
        if "regularizer" not in data:
            raise ValueError(f"attention spec {data!r} has no 'regularizer' key")
        name = data.pop("regularizer")
        get_regularizer(name)
        return cls(name, data)


@dataclass(frozen=True)
class Override:
    """``spec`` for the modules of ``part`` (None: any) at ``layers`` (None: all)."""

    spec: AttentionSpec
    layers: tuple[int, ...] | None = None
    part: str | None = None

    def __post_init__(self) -> None:
        if self.part is not None and self.part not in PARTS:
            raise ValueError(f"invalid part={self.part!r}; valid choices: None or one of {list(PARTS)}")
        if self.layers is not None:
            bad = [i for i in self.layers if not isinstance(i, int) or isinstance(i, bool) or i < 0]
            if bad or not self.layers:
                raise ValueError(f"invalid layers={list(self.layers)!r}: expected a non-empty list of ints >= 0")

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
        data = dict(data)
        layers = data.pop("layers", None)
        part = data.pop("part", None)
        return cls(AttentionSpec.from_dict(data), None if layers is None else tuple(layers), part)


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
        overrides: Sequence[Mapping[str, Any]] = data.get("overrides", [])
        return cls(default, tuple(Override.from_dict(o) for o in overrides))
