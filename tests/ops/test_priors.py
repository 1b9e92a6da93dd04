"""Tests for hf_eot.ops.priors: ALiBi slopes/bias and T5 relative-position buckets."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes
from transformers.models.t5.modeling_t5 import T5Attention

from hf_eot.ops import alibi_bias, alibi_slopes, relative_position_buckets


def press_slopes(n: int) -> list[float]:
    """Reference: the slope rule of Press et al.'s released code (attention_with_linear_biases)."""

    def power_of_2(k: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(k) - 3)))
        return [start * start**i for i in range(k)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + press_slopes(2 * closest)[0::2][: n - closest]


@pytest.mark.parametrize("n_heads", [1, 2, 3, 5, 6, 8, 12, 16, 20, 32, 40, 64])
def test_alibi_slopes_match_press_and_bloom(n_heads: int) -> None:
    """Slopes equal the paper's rule (geometric 2^(-8h/n); interleaved for non-powers of 2) and
    Transformers' BLOOM implementation."""
    got = alibi_slopes(n_heads)
    assert got.shape == (n_heads,) and got.dtype == torch.float32
    torch.testing.assert_close(
        got, torch.tensor(press_slopes(n_heads), dtype=torch.float32), atol=0, rtol=1e-6
    )
    torch.testing.assert_close(got, _get_alibi_slopes(n_heads, torch.device("cpu")), atol=0, rtol=1e-6)


def test_alibi_slopes_power_of_two_is_geometric() -> None:
    """For n = 8 the slopes are 1/2, 1/4, ..., 1/256 exactly."""
    assert torch.equal(alibi_slopes(8), torch.tensor([2.0**-h for h in range(1, 9)]))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_q,n_k", [(5, 5), (1, 6), (3, 7)])
def test_alibi_bias_values(causal: bool, n_q: int, n_k: int) -> None:
    """bias[h, i, j] = -m_h |i' - j| with i' = i (non-causal) or i + n_k - n_q (causal: queries are
    the last positions of the keys, so on allowed keys it is -m_h (i' - j))."""
    slopes = alibi_slopes(4)
    bias = alibi_bias(4, n_q, n_k, causal=causal)
    assert bias.shape == (4, n_q, n_k) and bias.dtype == torch.float32
    for h in range(4):
        for i in range(n_q):
            ip = i + (n_k - n_q if causal else 0)
            for j in range(n_k):
                assert bias[h, i, j].item() == pytest.approx(-slopes[h].item() * abs(ip - j))
    if causal:
        # the last query sees the last key at distance 0
        assert (bias[:, -1, -1] == 0).all()


def test_alibi_bias_dtype_and_device() -> None:
    """dtype and device arguments are honoured."""
    bias = alibi_bias(3, 2, 4, causal=False, dtype=torch.bfloat16, device="cpu")
    assert bias.dtype == torch.bfloat16 and bias.device.type == "cpu"


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 20), (8, 64)])
@pytest.mark.parametrize("n_q,n_k,offset", [(10, 10, 0), (1, 300, 299), (7, 200, 50), (300, 40, 0)])
def test_relative_position_buckets_match_t5(
    bidirectional: bool, num_buckets: int, max_distance: int, n_q: int, n_k: int, offset: int
) -> None:
    """Bit-identical to T5Attention._relative_position_bucket on (memory - context) positions, the
    context shifted by query_offset (past_seen_tokens when decoding)."""
    got = relative_position_buckets(
        n_q,
        n_k,
        bidirectional=bidirectional,
        num_buckets=num_buckets,
        max_distance=max_distance,
        query_offset=offset,
    )
    context = torch.arange(n_q, dtype=torch.long)[:, None] + offset
    memory = torch.arange(n_k, dtype=torch.long)[None, :]
    ref = T5Attention._relative_position_bucket(
        memory - context, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    assert got.dtype == torch.long and got.shape == (n_q, n_k)
    assert torch.equal(got, ref)


def test_bad_inputs_raise() -> None:
    """Non-positive head counts, negative lengths and degenerate bucket settings are rejected."""
    with pytest.raises(ValueError):
        alibi_slopes(0)
    with pytest.raises(ValueError):
        alibi_bias(2, -1, 3, causal=True)
    with pytest.raises(ValueError):
        relative_position_buckets(3, 3, num_buckets=2)
    with pytest.raises(ValueError):
        relative_position_buckets(3, 3, num_buckets=32, max_distance=8)
