"""``hf_eot.attention_weights``: the public scores -> weights map, for every regularizer, with masks,
temperatures, priors, dtypes and gradients."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
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
    """With log_prior = log pi: p_j = pi_j exp(s_j / epsilon) / sum_l pi_l exp(s_l / epsilon) (the prior
    softmax of "Deciphering Attention Mechanisms: Optimization and Fenchel Dual Solutions", eq. (17)-(18))."""
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


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("softmax", {"epsilon": torch.tensor(-1.0)}, r"invalid epsilon=-1.0 .*a finite float > 0"),
        ("softmax", {"epsilon": torch.tensor(0.0)}, r"invalid epsilon=0.0"),
        ("sinkhorn", {"epsilon": torch.tensor([1.0, 2.0])}, r"invalid epsilon=.*single number"),
        ("softmax", {"epsilon": torch.tensor(2.0, requires_grad=True)}, r"invalid epsilon=.*single number"),
        ("entmax", {"alpha": torch.tensor(1.0)}, r"invalid alpha=1.0 .*> 1"),
        ("entmax", {"alpha": torch.tensor([1.5, 0.9]).view(2, 1, 1)}, r"invalid alpha=.*every value a finite float > 1"),
        ("entmax", {"alpha": torch.tensor([1.5, float("nan")]).view(2, 1, 1)}, r"invalid alpha="),
        ("entmax", {"alpha": torch.tensor([2, 3]).view(2, 1, 1)}, r"invalid alpha=.*floating tensor"),
        ("ot", {"alpha": torch.tensor([1.0, 2.0]).view(2, 1, 1), "gamma": 1.0}, r"invalid alpha=.*single number"),
        ("softmax", {"temperature": torch.tensor(2.0)}, r"unknown parameter\(s\) \['temperature'\]"),
        ("softmax", {"prior": "alibi"}, r"\['prior'\] describe a model's configuration"),
        ("entmax", {"learn_alpha": True}, r"\['learn_alpha'\] describe a model's configuration"),
    ],
)
def test_tensor_and_model_parameters_are_validated(name: str, params: dict, message: str) -> None:
    """Tensor-valued parameters get the same checks as numbers (no softmax(-x), NaN or uniform rows), only
    entmax's alpha may be a per-row tensor, and model-only parameters are refused with the alternative."""
    with pytest.raises(ValueError, match=message):
        attention_weights(torch.randn(2, 3, 4), name, **params)


def test_scalar_tensors_and_numpy_scalars_are_numbers() -> None:
    """epsilon=torch.tensor(0.5) and alpha=np.float32(1.5) give the maps of the plain numbers."""
    scores = torch.randn(2, 3, 4)
    torch.testing.assert_close(attention_weights(scores, epsilon=torch.tensor(0.5)), torch.softmax(scores / 0.5, -1))
    torch.testing.assert_close(
        attention_weights(scores, "entmax", alpha=np.float32(1.5)), attention_weights(scores, "entmax", alpha=1.5)
    )


def test_per_head_alpha_tensor_is_checked_and_used() -> None:
    """A valid per-head alpha tensor gives, per head, the map of that head's alpha."""
    scores = torch.randn(2, 3, 4, dtype=torch.float64)
    alpha = torch.tensor([1.5, 2.0], dtype=torch.float64).view(2, 1, 1)
    weights = attention_weights(scores, "entmax", alpha=alpha)
    torch.testing.assert_close(weights[0], attention_weights(scores[0], "entmax", alpha=1.5))
    torch.testing.assert_close(weights[1], attention_weights(scores[1], "sparsemax"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scores": torch.randn(2, 3, 0)}, r"at least one query and one key, got \(2, 3, 0\)"),
        ({"scores": torch.randn(2, 0, 4)}, r"at least one query and one key, got \(2, 0, 4\)"),
        ({"scores": torch.randn(4)}, r"shape \(..., n_queries, n_keys\)"),
        ({"scores": torch.ones(2, 3, dtype=torch.long)}, r"scores must be a floating-point tensor"),
        ({"log_prior": torch.randn(3, 5)}, r"log_prior of shape \(3, 5\) does not broadcast .* \(2, 3, 4\)"),
        ({"log_prior": torch.randn(7, 2, 3, 4)}, r"log_prior of shape \(7, 2, 3, 4\) does not broadcast"),
        ({"mask": torch.zeros(2, 3, 4)}, r"mask must be a boolean tensor .*got torch.float32"),
        ({"mask": torch.ones(2, 3, 4, dtype=torch.long)}, r"mask must be a boolean tensor .*got torch.int64"),
        ({"mask": torch.ones(5, dtype=torch.bool)}, r"mask of shape \(5,\) does not broadcast"),
        ({"template_gram": torch.eye(4)}, r"template_gram is only used by"),
    ],
)
def test_malformed_tensors_are_refused(kwargs: dict, message: str) -> None:
    """Zero keys or queries, non-float scores, a log_prior or mask of the wrong shape, float/int masks and a
    stray template_gram raise ValueErrors naming the tensor and the expected form."""
    scores = kwargs.pop("scores", torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=message):
        attention_weights(scores, "softmax", **kwargs)


@pytest.mark.parametrize("name", ["softmax", "sparsemax", "entmax", "sinkhorn"])
def test_log_prior_is_an_additive_score_bias(name: str) -> None:
    """Every map applies the log-prior as scores / epsilon + log_prior (the epsilon convention of the
    registry): a constant log-prior changes nothing, and log_prior = b equals scores + epsilon * b."""
    scores = torch.randn(2, 4, 4, dtype=torch.float64)
    bias = torch.randn(4, 4, dtype=torch.float64)
    params = {"epsilon": 0.7, **PARAMS[name]}
    plain = attention_weights(scores, name, **params)
    torch.testing.assert_close(attention_weights(scores, name, log_prior=torch.full((4, 4), 3.0, dtype=torch.float64),
                                                 **params), plain)
    torch.testing.assert_close(attention_weights(scores, name, log_prior=bias, **params),
                               attention_weights(scores + 0.7 * bias, name, **params))
