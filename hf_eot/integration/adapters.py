"""Learned attention parameters under adapter training (PEFT and any code that freezes the base model).

The learned parameters of a configured model (entmax ``alpha``, relative-position buckets) live in the
``eot_parameters`` child of each attention module.  Adapter libraries freeze every base parameter and save
only the adapter, so without help those parameters stay at their initial values and are missing from
the saved adapter.  With PEFT, list them in ``modules_to_save=["eot_parameters"]``: PEFT then trains a
copy, saves it in the adapter and restores it onto a base model configured the same way.
"""

from __future__ import annotations

from torch import nn

from .._warnings import warn
from .modules import ConfigMemo

__all__ = ["warn_if_frozen"]

_WARNED: ConfigMemo[bool] = ConfigMemo()


def warn_if_frozen(module: nn.Module) -> None:
    """Warn (once per model config) when ``module`` trains with learned attention parameters that are all
    frozen: the configured alpha / buckets would silently stay at their initial values."""
    params = getattr(module, "eot_parameters", None)
    if params is None or not module.training or any(p.requires_grad for p in params.parameters()):
        return
    if _WARNED.get(module.config):
        return
    _WARNED.set(module.config, True)
    warn(
        f"the learned attention parameters of {type(module).__name__} (eot_parameters) are frozen while the "
        "model trains, so they keep their initial values; with PEFT, pass modules_to_save=['eot_parameters'] "
        "to the adapter config (they are then trained and saved with the adapter)"
    )
