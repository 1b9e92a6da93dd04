"""What ``config.eot_attention`` asks of one attention module: its spec, and the learned parameters that
spec needs.

Learned parameters (a per-head value a regularizer learns, such as entmax's ``alpha``; T5-style relative
position buckets for BERT/ViT) live in an :class:`EOTAttentionParameters` child of the attention module,
so that they are ordinary parameters: trained by any optimizer, saved in safetensors, restored by
``from_pretrained``.  Which ones a spec needs is read from the registry
(:attr:`hf_eot.regularizers.Regularizer.learned`) and from the spec's prior.
"""

from __future__ import annotations

import copy
import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import CONFIG_KEY, AttentionSpec, EOTAttentionConfig
from ..regularizers import LearnedParameter, get_regularizer
from .modules import layer_index, model_parts, module_part, num_heads

__all__ = [
    "NUM_RELATIVE_BUCKETS",
    "RELATIVE_MAX_DISTANCE",
    "EOTAttentionParameters",
    "Layout",
    "learned_values",
    "module_spec",
    "required_layout",
    "sync_parameters",
]

NUM_RELATIVE_BUCKETS = 32
RELATIVE_MAX_DISTANCE = 128

# config object -> the eot_attention dict last checked against its model (one check per config and dict,
# however many attention modules share the config)
_CHECKED: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def mark_checked(config: Any, raw: Any) -> None:
    """Record that ``raw`` was checked against the model of ``config`` (``configure`` checks before it
    writes), so that the modules do not check it again."""
    try:
        _CHECKED[config] = copy.deepcopy(raw)
    except TypeError:
        pass


def _check_fits_model(config: Any, raw: Any, parsed: EOTAttentionConfig) -> None:
    """``parsed.check_model`` against the parts of the model ``config`` describes, once per dict."""
    try:
        if _CHECKED.get(config) == raw:
            return
    except TypeError:  # a config that cannot be weakly referenced: check every time
        pass
    try:
        parts = model_parts(config)
    except ValueError:
        parts = None  # an architecture whose layers cannot be counted: nothing to check against
    if parts is not None:
        try:
            parsed.check_model(parts, getattr(config, "model_type", ""))
        except ValueError as error:
            raise ValueError(f"config.{CONFIG_KEY} does not fit this model: {error}") from None
    mark_checked(config, raw)


def module_spec(module: nn.Module) -> AttentionSpec:
    """The spec of ``config.eot_attention`` that applies to ``module``.

    Parsing is cached on the module and redone whenever the config dict changes; a freshly parsed config
    is checked against the model's parts and layers (as ``configure`` does), so that a hand-edited
    ``config.json`` selecting a layer or part the model lacks fails at the first forward.
    """
    raw = getattr(module.config, CONFIG_KEY, None)
    cached = module.__dict__.get("_eot_spec_cache")
    if cached is not None and cached[0] == raw:
        return cached[1]
    parsed = EOTAttentionConfig.from_dict(raw)
    if raw is not None:
        _check_fits_model(module.config, raw, parsed)
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


@dataclass(frozen=True)
class Layout:
    """The learned parameters a spec needs: per-head values (by name) and the relative-position table."""

    learned: tuple[LearnedParameter, ...] = ()
    relative_buckets: bool = False

    def __bool__(self) -> bool:
        return bool(self.learned) or self.relative_buckets


def required_layout(spec: AttentionSpec) -> Layout:
    """The learned parameters of ``spec``: its regularizer's ``learned`` hook, plus the bucket table of
    ``prior="relative_buckets"``."""
    return Layout(
        get_regularizer(spec.regularizer).learned(spec.params),
        spec.params.get("prior") == "relative_buckets",
    )


class EOTAttentionParameters(nn.Module):
    """Learned parameters of one attention module's regularizer.

    For each :class:`~hf_eot.regularizers.LearnedParameter` ``p``: ``<p.name>_logit`` (``(n_heads,)``),
    used as ``p.low + (p.high - p.low) * sigmoid(logit)`` (entmax: ``alpha = 1 + sigmoid(alpha_logit)``
    in (1, 2), Correia et al. 2019).  ``relative_bias`` (``(num_buckets, n_heads)``): a T5-style learned
    log-prior per relative-position bucket, initialised to zero so that adding it leaves the model's
    outputs unchanged.
    """

    def __init__(self, n_heads: int, layout: Layout = Layout()) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.learned: dict[str, LearnedParameter] = {}
        for learned in layout.learned:
            self.add_learned(learned)
        if layout.relative_buckets:
            self.add_relative_buckets()

    def _new(self, *shape: int) -> nn.Parameter:
        reference = next(self.parameters(), None)
        return nn.Parameter(torch.empty(*shape, device=None if reference is None else reference.device))

    def add_learned(self, learned: LearnedParameter) -> None:
        """(Re)create ``<name>_logit`` at ``learned.init``."""
        self.learned[learned.name] = learned
        setattr(self, f"{learned.name}_logit", self._new(self.n_heads))
        self._reset(f"{learned.name}_logit")

    def remove_learned(self, name: str) -> None:
        del self.learned[name]
        delattr(self, f"{name}_logit")

    def add_relative_buckets(self) -> None:
        self.relative_bias = self._new(NUM_RELATIVE_BUCKETS, self.n_heads)
        self._reset("relative_bias")

    def has_relative_buckets(self) -> bool:
        return "relative_bias" in self._parameters

    def _initial_logit(self, name: str) -> float:
        p = self.learned[name]
        fraction = (p.init - p.low) / (p.high - p.low)
        return math.log(fraction / (1.0 - fraction))

    @torch.no_grad()
    def _reset(self, name: str) -> None:
        param = self._parameters[name]
        if param.device.type == "meta":
            return
        if name == "relative_bias":
            param.zero_()
        else:
            param.fill_(self._initial_logit(name[: -len("_logit")]))
        param._is_hf_initialized = True

    def reset_parameters(self, only_uninitialized: bool = False) -> None:
        """Set the initial values (``logit`` of the configured value, ``relative_bias = 0``).

        With ``only_uninitialized``, parameters that Transformers marked as loaded are left alone.
        """
        for name, param in self.named_parameters(recurse=False):
            if not (only_uninitialized and getattr(param, "_is_hf_initialized", False)):
                self._reset(name)

    def is_initial(self, name: str) -> bool:
        """Whether ``<name>_logit`` still holds its initial value (i.e. has not been trained or loaded)."""
        param = self._parameters[f"{name}_logit"]
        return param.device.type == "meta" or bool((param == self._initial_logit(name)).all())

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

    def value(self, name: str) -> torch.Tensor:
        """The per-head value of the learned parameter ``name``, shape ``(n_heads, 1, 1)`` (broadcasts
        against ``(batch, heads, Q, K)``)."""
        p = self.learned[name]
        logit = self._parameters[f"{name}_logit"]
        return (p.low + (p.high - p.low) * torch.sigmoid(logit.float())).view(-1, 1, 1)

    def alpha(self) -> torch.Tensor:
        """Per-head entmax alpha, shape ``(n_heads, 1, 1)``."""
        return self.value("alpha")

    def extra_repr(self) -> str:
        learned = {name: p.init for name, p in self.learned.items()}
        return f"n_heads={self.n_heads}, learned={learned}, relative_buckets={self.has_relative_buckets()}"


def learned_values(module: nn.Module, spec: AttentionSpec) -> dict[str, torch.Tensor]:
    """``{parameter name: per-head tensor}`` for the learned parameters of ``spec`` on ``module``.

    Raises ValueError when the module lacks them (``config.eot_attention`` was edited without
    ``hf_eot.configure``, which creates them).
    """
    layout = required_layout(spec)
    if not layout.learned:
        return {}
    holder = getattr(module, "eot_parameters", None)
    missing = [p.name for p in layout.learned if holder is None or p.name not in holder.learned]
    if missing:
        raise ValueError(
            f"config.{CONFIG_KEY} asks for learned {missing} in the {module_part(module)} attention of layer "
            f"{layer_index(module)}, but the module has no such parameters (the config was edited directly): "
            "call hf_eot.configure(model, ...) to create them, then build the optimizer"
        )
    return {p.name: holder.value(p.name) for p in layout.learned}


def sync_parameters(module: nn.Module) -> list[str]:
    """Give ``module`` exactly the learned parameters its spec needs.

    Existing parameters of the right kind (same name, initial value and range) are kept, so trained or
    loaded values survive a change elsewhere in the layout (e.g. adding a prior); a parameter whose
    configured initial value changed is re-initialised to it (config and parameters agree); parameters
    no longer needed are removed.

    Returns:
        descriptions of the parameters created, re-initialised or removed (empty when nothing changed).
    """
    layout = required_layout(module_spec(module))
    current: EOTAttentionParameters | None = getattr(module, "eot_parameters", None)
    if not layout:
        if current is None:
            return []
        del module.eot_parameters
        return [f"removed {name}" for name, _ in current.named_parameters()]
    changes: list[str] = []
    if current is None:
        current = EOTAttentionParameters(num_heads(module), layout)
        reference = next(module.parameters(), None)
        if reference is not None and reference.device.type != "meta":
            current = current.to(device=reference.device)
        module.eot_parameters = current
        return [f"created {name}" for name, _ in current.named_parameters()]
    wanted = {p.name: p for p in layout.learned}
    for name in list(current.learned):
        if name not in wanted:
            current.remove_learned(name)
            changes.append(f"removed {name}_logit")
    for name, learned in wanted.items():
        if current.learned.get(name) != learned:
            existed = name in current.learned
            trained = existed and not current.is_initial(name)
            current.add_learned(learned)
            changes.append(f"{'re-initialised' if existed else 'created'} {name}_logit at {learned.init:g}"
                           + (" (discarding its trained values)" if trained else ""))
    if layout.relative_buckets and not current.has_relative_buckets():
        current.add_relative_buckets()
        changes.append("created relative_bias")
    elif not layout.relative_buckets and current.has_relative_buckets():
        del current.relative_bias
        changes.append("removed relative_bias")
    return changes
