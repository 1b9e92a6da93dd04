"""Registration of ``"eot"`` with Transformers, and the construction-time hook that places learned
attention parameters.

``register()`` is idempotent and runs on ``import hf_eot``.  It registers the attention function with
``AttentionInterface`` and the mask function with ``AttentionMaskInterface`` (without the latter,
Transformers builds no mask for an unknown implementation and padding would silently be attended to).
"""

from __future__ import annotations

import logging

from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from ..config import CONFIG_KEY
from .attention import eot_attention_forward, eot_mask
from .modules import attention_modules
from .parameters import sync_parameters

__all__ = ["ATTN_IMPLEMENTATION", "register"]

#: The name under which hf_eot registers its attention with Transformers.
ATTN_IMPLEMENTATION = "eot"

logger = logging.getLogger("hf_eot")
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
            sync_parameters(module)
