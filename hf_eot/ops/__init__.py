"""Pure tensor functions: attention scores -> attention weights, OT solvers, position priors.

Nothing here imports Transformers.  Conventions (see :mod:`hf_eot.ops._masking`): scores are
``(..., n_queries, n_keys)``, ``mask`` is a bool tensor broadcastable to them (True = may attend),
fully masked rows give exactly 0 weights, half dtypes are computed in float32.
"""

from ._native import native_kernels_available
from .entmax import entmax15_weights, entmax_bisect_weights, entmax_newton_weights, entmax_weights
from .ot import ot_weights
from .priors import alibi_bias, alibi_slopes, relative_position_buckets
from .sinkhorn import SinkhornConvergenceWarning, SinkhornResult, sinkhorn_weights
from .softmax import softmax_weights
from .sparse_attention import entmax_attention, fused_pays
from .sparsemax import sparsemax_weights

__all__ = [
    "SinkhornConvergenceWarning",
    "SinkhornResult",
    "alibi_bias",
    "alibi_slopes",
    "entmax15_weights",
    "entmax_attention",
    "entmax_bisect_weights",
    "entmax_newton_weights",
    "entmax_weights",
    "fused_pays",
    "native_kernels_available",
    "ot_weights",
    "relative_position_buckets",
    "sinkhorn_weights",
    "softmax_weights",
    "sparsemax_weights",
]
