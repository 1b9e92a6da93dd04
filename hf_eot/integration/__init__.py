"""The Transformers glue: the ``"eot"`` attention and mask functions, their registration, ``configure``."""

from .attention import eot_attention_forward, eot_mask
from .configure import configure
from .parameters import EOTAttentionParameters
from .registration import ATTN_IMPLEMENTATION, register

__all__ = [
    "ATTN_IMPLEMENTATION",
    "EOTAttentionParameters",
    "configure",
    "eot_attention_forward",
    "eot_mask",
    "register",
]
