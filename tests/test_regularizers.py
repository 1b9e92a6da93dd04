"""The registry: one entry per regularizer, lookup errors that name the valid choices, no duplicates."""

import numpy as np
import pytest
import torch

from hf_eot import ops
from hf_eot.ops.sinkhorn import DEFAULT_MAX_ITERS, DEFAULT_TOL
from hf_eot.regularizers import (
    REGISTRY,
    LearnedParameter,
    WeightsOutput,
    available_regularizers,
    get_regularizer,
    register_regularizer,
    validate_params,
)


def test_every_regularizer_of_the_papers_is_registered() -> None:
    """softmax, sparsemax, entmax, sinkhorn and ot are listed with their parameter defaults."""
    listing = available_regularizers()
    assert set(listing) == {"softmax", "sparsemax", "entmax", "sinkhorn", "ot"}
    assert listing["softmax"] == {"epsilon": 1.0, "prior": None}
    assert listing["entmax"]["alpha"] == 1.5 and listing["entmax"]["learn_alpha"] is False
    assert listing["ot"] == {"alpha": 1.0, "gamma": None, "prior": None}


def test_unknown_name_lists_the_choices() -> None:
    """An unknown name raises a ValueError listing the registered names."""
    with pytest.raises(ValueError, match=r"unknown regularizer 'tsallis'; valid choices: \['entmax'"):
        get_regularizer("tsallis")


def test_duplicate_registration_is_refused() -> None:
    """Registering a taken name fails instead of silently replacing the entry."""
    with pytest.raises(ValueError, match="already registered"):
        register_regularizer(REGISTRY["softmax"])


def test_only_sinkhorn_couples_queries_and_only_ot_needs_templates() -> None:
    """The flags that the Transformers glue relies on are set on the right entries: Sinkhorn couples
    queries, OT needs templates, softmax alone may run on fused SDPA."""
    assert [n for n, r in REGISTRY.items() if r.couples_queries] == ["sinkhorn"]
    assert [n for n, r in REGISTRY.items() if r.needs_templates] == ["ot"]
    assert [n for n, r in REGISTRY.items() if r.is_sdpa] == ["softmax"]


def test_weights_hooks_return_weights_output() -> None:
    """Every entry's weights hook maps (scores, mask, log_prior, **params) to a WeightsOutput whose rows are
    distributions; closed forms report no diagnostics."""
    scores = torch.randn(2, 3, 5, dtype=torch.float64)
    for name, reg in REGISTRY.items():
        params = reg.call_params(validate_params(name, {"gamma": 1.0} if name == "ot" else {}))
        if reg.needs_templates:
            params["template_gram"] = torch.eye(5, dtype=torch.float64)
        out = reg.weights(scores, None, None, **params)
        assert isinstance(out, WeightsOutput), name
        torch.testing.assert_close(out.weights.sum(-1), torch.ones(2, 3, dtype=torch.float64))
        assert (set(out.diagnostics) == {"marginal_error", "n_iters"}) == (name == "sinkhorn"), name


def test_sinkhorn_diagnostics_are_the_solvers() -> None:
    """Sinkhorn's entry returns the solver's own marginal error and iteration count, and applies the
    log-prior as the kernel exp(scores / epsilon + log_prior)."""
    scores, log_prior = torch.randn(2, 4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    reg = get_regularizer("sinkhorn")
    out = reg.weights(scores, None, log_prior, **reg.call_params(validate_params("sinkhorn", {"epsilon": 0.5})))
    expected = ops.sinkhorn_weights(scores + 0.5 * log_prior, epsilon=0.5, tol=DEFAULT_TOL, max_iters=DEFAULT_MAX_ITERS)
    torch.testing.assert_close(out.weights, expected.weights)
    torch.testing.assert_close(out.diagnostics["marginal_error"], expected.marginal_error)
    assert int(out.diagnostics["n_iters"]) == expected.n_iters


def test_sinkhorn_defaults_are_the_ops_defaults() -> None:
    """One Sinkhorn default for models and ops: tol and max_iters come from hf_eot.ops.sinkhorn; grad
    defaults to implicit differentiation and accepts only the two gradient modes."""
    defaults = available_regularizers()["sinkhorn"]
    assert (defaults["tol"], defaults["max_iters"], defaults["grad"]) == (DEFAULT_TOL, DEFAULT_MAX_ITERS, "implicit")
    assert validate_params("sinkhorn", {"grad": "unroll"})["grad"] == "unroll"
    with pytest.raises(ValueError, match=r"invalid grad='backprop'.*\['implicit', 'unroll'\]"):
        validate_params("sinkhorn", {"grad": "backprop"})


def test_learned_parameters_come_from_the_entry() -> None:
    """Only entmax with learn_alpha asks for a learned parameter: alpha in (1, 2) starting at the configured
    value; a learned alpha outside (1, 2) is refused by the entry's own check."""
    entmax = get_regularizer("entmax")
    assert entmax.learned(validate_params("entmax", {"alpha": 1.3, "learn_alpha": True})) == (
        LearnedParameter("alpha", 1.3, 1.0, 2.0),
    )
    assert entmax.learned(validate_params("entmax", {"alpha": 1.3})) == ()
    for name, reg in REGISTRY.items():
        if name != "entmax":
            assert reg.learned(validate_params(name, {})) == ()
    with pytest.raises(ValueError, match=r"alpha=2.5 with learn_alpha=True"):
        validate_params("entmax", {"alpha": 2.5, "learn_alpha": True})


def test_numpy_and_torch_scalars_are_numbers() -> None:
    """np.float32(1.5), torch.tensor(0.5), np.int64(7) are accepted as the numbers they hold (stored as
    Python numbers, so configs stay JSON)."""
    params = validate_params("entmax", {"alpha": np.float32(1.5), "epsilon": torch.tensor(0.5),
                                        "max_iters": np.int64(7)})
    assert params["alpha"] == 1.5 and type(params["alpha"]) is float
    assert params["epsilon"] == 0.5 and type(params["epsilon"]) is float
    assert params["max_iters"] == 7 and type(params["max_iters"]) is int


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("softmax", {"epsilon": torch.tensor([1.0, 2.0])}, r"invalid epsilon=.*a single number"),
        ("sinkhorn", {"max_iters": 2.5}, r"invalid max_iters=2.5 .*int >= 1"),
        ("entmax", {"alpha": "1.5"}, r"invalid alpha='1.5'"),
        ("entmax", {"alpha": torch.tensor([1.2, 1.4])}, r"invalid alpha=.*a single number"),
    ],
)
def test_non_numbers_are_refused(name, params, message) -> None:
    """Multi-value tensors (outside the functional API's per-row alpha), strings and floats for ints are
    refused with the parameter named."""
    with pytest.raises(ValueError, match=message):
        validate_params(name, params)
