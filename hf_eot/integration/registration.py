"""Registration of ``"eot"`` with Transformers, and the construction-time hook that places learned
attention parameters.

``register()`` is idempotent and runs on ``import hf_eot``.  It registers the attention function with
``AttentionInterface`` and the mask function with ``AttentionMaskInterface`` (without the latter,
Transformers builds no mask for an unknown implementation and padding would silently be attended to).

A config that carries ``config.eot_attention`` is saved with ``"attn_implementation": "eot"``, so that a
plain ``from_pretrained(path)`` (after ``import hf_eot``) runs the attention it was configured with; an
explicit ``attn_implementation=...`` still wins.  A model that is built or loaded with another
implementation while its config selects a regularizer other than plain softmax gets a warning, and
:func:`require_eot` refuses to configure a model that does not run ``"eot"``.  Without hf_eot,
Transformers refuses such a checkpoint (``attn_implementation="eot"`` is unknown to it) instead of
running it as softmax.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from .._warnings import warn
from ..config import CONFIG_KEY, EOTAttentionConfig
from .attention import eot_attention_forward, eot_mask
from .modules import ConfigMemo, attention_modules
from .parameters import sync_parameters

__all__ = ["ATTN_IMPLEMENTATION", "register", "request_eot", "require_eot"]

#: The name under which hf_eot registers its attention with Transformers.
ATTN_IMPLEMENTATION = "eot"

logger = logging.getLogger("hf_eot")
_CHECKED: ConfigMemo[bool] = ConfigMemo()
_state = {"registered": False}


def register() -> None:
    """Register ``"eot"`` with Transformers (idempotent); fails loudly without the needed API."""
    if _state["registered"]:
        return
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as error:  # pragma: no cover - depends on the installed version
        import transformers

        raise ImportError(
            f"hf_eot needs transformers >= 5.0 (AttentionInterface and AttentionMaskInterface); "
            f"found transformers {transformers.__version__}"
        ) from error
    AttentionInterface.register(ATTN_IMPLEMENTATION, eot_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eot_mask)
    register_module_module_registration_hook(_on_module_registered)
    _state["registered"] = True


def _on_module_registered(parent: nn.Module, name: str, submodule: nn.Module | None) -> None:
    """When a layer joins a ``ModuleList`` (``encoder.layer[i]``), record ``i`` on the attention modules
    inside it that carry no ``layer_idx`` (the outermost list wins, as it is filled last) and give them the
    learned parameters that ``config.eot_attention`` asks for, so that they exist before weights load."""
    if not isinstance(parent, nn.ModuleList) or submodule is None or not name.isdigit():
        return
    for _, module in attention_modules(submodule):
        module.__dict__["_eot_layer_index"] = int(name)
        module.__dict__.pop("_eot_spec_cache", None)
        if getattr(module.config, CONFIG_KEY, None) is not None:
            _check_implementation(module.config)
            sync_parameters(module)


def request_eot(config: Any) -> None:
    """Make ``config`` ask for ``"eot"``: it is saved with ``"attn_implementation": "eot"`` (read back by
    ``from_pretrained``), and models built from it run ``"eot"`` unless told otherwise.  A config that a
    model already runs with (its implementation is resolved) keeps that implementation: switching it here
    would switch the model behind its back."""
    config.attn_implementation = ATTN_IMPLEMENTATION
    if config._attn_implementation is None:
        config._attn_implementation = ATTN_IMPLEMENTATION


def require_eot(model: nn.Module) -> None:
    """Raise a ValueError naming the fix when an attention module of ``model`` does not run ``"eot"``."""
    running = {getattr(m.config, "_attn_implementation", None) for _, m in attention_modules(model)}
    others = sorted(str(r) for r in running - {ATTN_IMPLEMENTATION})
    if others:
        raise ValueError(
            f"this {type(model).__name__} runs attn_implementation={others[0]!r}, so a choice in "
            f"config.{CONFIG_KEY} would have no effect: call model.set_attn_implementation({ATTN_IMPLEMENTATION!r}) "
            f"first, or load it with from_pretrained(..., attn_implementation={ATTN_IMPLEMENTATION!r})"
        )


def _check_implementation(config: Any) -> None:
    """Once per config seen at construction: a config that carries ``eot_attention`` and runs ``"eot"``
    keeps asking for it when saved; one that runs another implementation while its ``eot_attention``
    selects something other than plain softmax gets a warning (the choice would be ignored)."""
    if _CHECKED.get(config):
        return
    _CHECKED.set(config, True)
    running = getattr(config, "_attn_implementation", None)
    if running == ATTN_IMPLEMENTATION:
        config.attn_implementation = ATTN_IMPLEMENTATION
        return
    specs = EOTAttentionConfig.from_dict(getattr(config, CONFIG_KEY)).specs()
    if all(s.runs_on_sdpa and s.params["epsilon"] == 1.0 for s in specs):
        return
    names = sorted({s.regularizer for s in specs})
    warn(
        f"config.{CONFIG_KEY} selects {names} attention, but this model was built with "
        f"attn_implementation={running!r}, which ignores it (and any learned attention parameters): load it with "
        f"from_pretrained(..., attn_implementation={ATTN_IMPLEMENTATION!r}) or call "
        f"model.set_attn_implementation({ATTN_IMPLEMENTATION!r})"
    )
