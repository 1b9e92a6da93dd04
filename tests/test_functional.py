"""``hf_eot.attention_weights``: the public scores -> weights map, for every regularizer, with masks,
temperatures, priors, dtypes and gradients."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import hf_eot
from hf_eot import attention_weights

PARAMS = {"softmax": {}, "sparsemax": {}, "entmax": {}, "sinkhorn": {"tol": 1e-6, "max_iters": 2000}}


def _gram(n: int) -> torch.Tensor:
    keys = torch.randn(n, 4, dtype=torch.float64)
    return keys @ keys.T


def _weights(name: str, scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    if name == "ot":
        gram = _gram(scores.shape[-1]).to(scores.dtype)
        return attention_weights(scores, "ot", mask, template_gram=gram, gamma=2.0)
    return attention_weights(scores, name, mask, **PARAMS[name])


# At score scale 1e4 Sinkhorn may stop short of its tol (it warns; tested in tests/ops): the rows are
# normalised last, so the properties checked here hold regardless.
@pytest.mark.filterwarnings("ignore::hf_eot.ops.sinkhorn.SinkhornConvergenceWarning")
@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(sorted(hf_eot.available_regularizers())),
    n_queries=st.integers(1, 6),
    n_keys=st.integers(1, 7),
    n_valid=st.integers(0, 7),
    scale=st.sampled_from([0.1, 1.0, 10.0, 1e4]),
)
def test_rows_are_distributions_on_the_allowed_keys(name, n_queries, n_keys, n_valid, scale) -> None:
    """For any key padding and score scale: valid rows sum to one, masked keys get exactly zero, no NaN;
    with no valid key the row is all zeros."""
    torch.manual_seed(n_queries * 31 + n_keys)
    scores = torch.randn(2, n_queries, n_keys, dtype=torch.float64) * scale
    n_valid = min(n_valid, n_keys)
    mask = torch.zeros(1, 1, n_keys, dtype=torch.bool)
    mask[..., :n_valid] = True
    weights = _weights(name, scores, mask)
    assert torch.isfinite(weights).all()
    assert torch.all(weights[..., n_valid:] == 0)
    expected = 1.0 if n_valid else 0.0
    torch.testing.assert_close(weights.sum(-1), torch.full((2, n_queries), expected, dtype=torch.float64),
                               atol=1e-5, rtol=0)


def test_epsilon_is_a_temperature() -> None:
    """softmax with epsilon equals torch.softmax(scores / epsilon)."""
    scores = torch.randn(3, 5, 7)
    torch.testing.assert_close(attention_weights(scores, epsilon=0.3), torch.softmax(scores / 0.3, -1))


def test_prior_softmax_closed_form() -> None:
    """With log_prior = log pi: p_j = pi_j exp(s_j/eps) / sum_l pi_l exp(s_l/eps) (note 001, PriorSoftmax)."""
    scores = torch.randn(4, 6, dtype=torch.float64)
    pi = torch.rand(4, 6, dtype=torch.float64) + 0.1
    pi = pi / pi.sum(-1, keepdim=True)
    expected = pi * torch.exp(scores / 1.7)
    expected = expected / expected.sum(-1, keepdim=True)
    actual = attention_weights(scores, "softmax", log_prior=pi.log(), epsilon=1.7)
    torch.testing.assert_close(actual, expected)


# Sinkhorn may not reach tol at +-1e4 (it warns, tested in tests/ops); finiteness is what is checked here.
@pytest.mark.filterwarnings("ignore::hf_eot.ops.sinkhorn.SinkhornConvergenceWarning")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", sorted(PARAMS) + ["ot"])
def test_half_precision_extreme_scores(name: str, dtype: torch.dtype) -> None:
    """Scores of +-1e4 in low precision give finite weights in the input dtype."""
    scores = (torch.randn(2, 3, 5, 5).sign() * 1e4).to(dtype)
    weights = _weights(name, scores)
    assert weights.dtype == dtype and torch.isfinite(weights).all()


def test_learned_alpha_tensor_is_differentiable() -> None:
    """A per-head alpha tensor flows through attention_weights with gradients (gradcheck, float64)."""
    scores = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor([1.3, 1.7], dtype=torch.float64).view(2, 1, 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda s, a: attention_weights(s, "entmax", alpha=a, max_iters=60), (scores, alpha))


def test_mask_must_be_boolean() -> None:
    """A float (additive) mask is refused with a message naming the convention: it would be ignored."""
    with pytest.raises(ValueError, match="boolean tensor"):
        attention_weights(torch.randn(2, 3), mask=torch.zeros(2, 3))
