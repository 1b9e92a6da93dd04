"""hf_eot: optimal-transport views of attention for HuggingFace Transformers.

``import hf_eot`` registers the attention implementation ``"eot"``; then::

    model = AutoModel.from_pretrained(path, attn_implementation="eot")
    hf_eot.configure(model, "entmax", alpha=1.5)          # all layers
    hf_eot.configure(model, "sinkhorn", layers=[5])      # override one layer
    model.save_pretrained(out)                           # saved with attn_implementation="eot"
    AutoModel.from_pretrained(out)                       # runs the configured attention again

The pure math lives in :mod:`hf_eot.ops` (no Transformers import), the registry of regularizers in
:mod:`hf_eot.regularizers`, the config schema in :mod:`hf_eot.config`, the glue in
:mod:`hf_eot.integration`, and the analysis tools in :mod:`hf_eot.analysis`.
"""

from .config import EOTAttentionConfig
from .functional import attention_weights
from .integration import ATTN_IMPLEMENTATION, configure, register
from .regularizers import available_regularizers

register()

__version__ = "0.1.0"

__all__ = [
    "ATTN_IMPLEMENTATION",
    "EOTAttentionConfig",
    "attention_weights",
    "available_regularizers",
    "configure",
    "model_card",
]


def __getattr__(name: str):
    if name == "model_card":
        from .model_card import model_card

        return model_card
    raise AttributeError(f"module 'hf_eot' has no attribute {name!r}")
