"""Position priors: additive log-priors ``log pi`` for the prior-softmax view of attention.

In the OT view ("Scaled-Dot-Product Attention as One-Sided Entropic Optimal Transport", Litman,
arXiv:2508.08369) a prior enters as ``Omega(p) = tau KL(p || pi)``, whose solution is
``p_j ~ pi_j exp(s_j / tau)``, i.e. logits ``s / tau + log pi``.  ALiBi (Press et al. 2022) is the
prior ``log pi_ij = -m_h |i - j|``; T5's relative attention bias (eq. (17)-(18) of "Deciphering
Attention Mechanisms: Optimization and Fenchel Dual Solutions") is ``log pi_ij = b_h[bucket(j - i)]``
with the buckets computed here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["alibi_bias", "alibi_slopes", "relative_position_buckets"]


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def alibi_slopes(n_heads: int) -> Tensor:
    """ALiBi head slopes ``m_h`` (Press et al. 2022, Section 3), float32 ``(n_heads,)``.

    For ``n`` a power of 2: the geometric sequence ``m_h = 2^(-8 h / n)``, ``h = 1..n``.  Otherwise
    (the reference implementation's rule) the slopes of the closest lower power of 2 ``c``,
    followed by every other slope of ``2c`` (``2^(-8 h / (2c))``, ``h = 1, 3, 5, ...``) up to ``n``.
    """
    _check_count("n_heads", n_heads, 1)
    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = [2.0 ** (-8.0 * h / closest) for h in range(1, closest + 1)]
    extra = [2.0 ** (-8.0 * h / (2 * closest)) for h in range(1, 2 * closest + 1, 2)]
    slopes += extra[: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(
    n_heads: int,
    n_queries: int,
    n_keys: int,
    *,
    causal: bool,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """ALiBi log-prior ``-m_h |i' - j|``, ``(n_heads, n_queries, n_keys)``.

    Non-causal: ``i' = i`` (query ``i`` sits at key position ``i``).  Causal: the queries are the
    last ``n_queries`` positions of the keys, ``i' = i + n_keys - n_queries`` (KV-cache decoding),
    and on the allowed keys ``j <= i'`` the bias is ``-m_h (i' - j)``.  Future keys (``j > i'``) must
    be masked by the caller; they get ``-m_h (j - i')`` so that they are never favoured if left
    unmasked.  Returned in ``dtype`` (default float32) on ``device``.
    """
    _check_count("n_heads", n_heads, 1)
    _check_count("n_queries", n_queries, 0)
    _check_count("n_keys", n_keys, 0)
    offset = n_keys - n_queries if causal else 0
    q_pos = torch.arange(n_queries, device=device, dtype=torch.float32).unsqueeze(-1) + offset
    k_pos = torch.arange(n_keys, device=device, dtype=torch.float32).unsqueeze(0)
    dist = (q_pos - k_pos).abs()  # (Q, K)
    slopes = alibi_slopes(n_heads).to(device)
    bias = -slopes[:, None, None] * dist
    return bias.to(dtype or torch.float32)


def relative_position_buckets(
    n_queries: int,
    n_keys: int,
    *,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
    query_offset: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """T5 relative-position buckets of ``j - i``, int64 ``(n_queries, n_keys)``.

    Reproduces ``T5Attention.compute_bias`` / ``_relative_position_bucket`` (Raffel et al. 2020):
    the query at row ``i`` sits at position ``i + query_offset`` (``past_seen_tokens`` when
    decoding with a cache).  With ``bidirectional``, half the buckets are for ``j > i``; within a
    direction, half of the buckets are exact distances ``0 .. nb/2 - 1`` and the rest are
    log-spaced up to ``max_distance`` (larger distances share the last bucket).  Decoder
    (``bidirectional=False``) buckets only distinguish past keys; future keys fall into bucket 0.
    """
    _check_count("n_queries", n_queries, 0)
    _check_count("n_keys", n_keys, 0)
    _check_count("num_buckets", num_buckets, 4 if bidirectional else 2)
    _check_count("max_distance", max_distance, 1)
    exact = num_buckets // 4 if bidirectional else num_buckets // 2
    if max_distance <= exact:
        raise ValueError(
            f"max_distance must exceed the number of exact buckets ({exact} for num_buckets={num_buckets}, "
            f"bidirectional={bidirectional}), got {max_distance}"
        )
    context = torch.arange(n_queries, dtype=torch.long, device=device)[:, None] + query_offset
    memory = torch.arange(n_keys, dtype=torch.long, device=device)[None, :]
    rel = memory - context  # (Q, K)

    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).to(torch.long) * num_buckets
        rel = rel.abs()
    else:
        rel = -torch.clamp(rel, max=0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    # same float32 operations as the reference, for bit-identical buckets
    large = max_exact + (
        torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, rel, large)
