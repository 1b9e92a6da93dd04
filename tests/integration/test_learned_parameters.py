"""Learned attention parameters follow the config: re-configuring re-initialises what changed and keeps
what did not, missing parameters are reported at forward, and changes on a trained model warn."""

from __future__ import annotations

import warnings

import _tiny as tiny
import pytest
import torch

import hf_eot
from hf_eot.integration.modules import attention_modules


def _alphas(model) -> list[torch.Tensor]:
    return [m.eot_parameters.alpha().flatten() for _, m in attention_modules(model)]


def test_reconfigured_alpha_follows_the_config() -> None:
    """learn_alpha at 1.3 then at 1.7: the parameters start again at 1.7, as the config says."""
    model = tiny.model("bert", "eot")
    hf_eot.configure(model, "entmax", alpha=1.3, learn_alpha=True)
    hf_eot.configure(model, "entmax", alpha=1.7, learn_alpha=True)
    assert model.config.eot_attention["default"]["alpha"] == 1.7
    for alpha in _alphas(model):
        torch.testing.assert_close(alpha, torch.full((4,), 1.7))


def test_adding_a_prior_keeps_a_trained_alpha() -> None:
    """Adding relative buckets to a trained learned-alpha model keeps the very same alpha parameters (an
    optimizer holding them keeps training them) and adds zero-initialised buckets."""
    model = tiny.model("bert", "eot")
    hf_eot.configure(model, "entmax", alpha=1.4, learn_alpha=True)
    attention = model.encoder.layer[0].attention.self
    logit = attention.eot_parameters.alpha_logit
    with torch.no_grad():
        logit.add_(torch.tensor([0.5, -0.5, 1.0, 0.0]))
    trained = logit.detach().clone()
    hf_eot.configure(model, "entmax", alpha=1.4, learn_alpha=True, prior="relative_buckets")
    assert attention.eot_parameters.alpha_logit is logit
    assert torch.equal(logit.detach(), trained)
    assert torch.equal(attention.eot_parameters.relative_bias, torch.zeros(32, 4))
    hf_eot.configure(model, "entmax", alpha=1.4, learn_alpha=True)  # and removing it again
    assert attention.eot_parameters.alpha_logit is logit
    assert not hasattr(attention.eot_parameters, "relative_bias")


def test_changes_on_a_trained_model_warn_at_the_callers_line() -> None:
    """Creating or replacing learned parameters on a model with gradients warns (an optimizer may hold
    the old ones), pointing at the caller; a fresh model configures silently."""
    model = tiny.model("bert", "eot")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf_eot.configure(model, "entmax", alpha=1.3, learn_alpha=True)
    ids, mask = tiny.padded_tokens()
    model(input_ids=ids, attention_mask=mask).last_hidden_state.sum().backward()
    with pytest.warns(UserWarning, match="build it \\(again\\) after configure") as record:
        hf_eot.configure(model, "entmax", alpha=1.7, learn_alpha=True)
    assert record[0].filename == __file__
    with pytest.warns(UserWarning, match="created relative_bias"):
        hf_eot.configure(model, "entmax", alpha=1.7, learn_alpha=True, prior="relative_buckets")


def test_discarding_trained_values_warns_without_gradients() -> None:
    """Re-initialising an alpha that holds trained (or loaded) values warns even without gradients."""
    model = tiny.model("bert", "eot")
    hf_eot.configure(model, "entmax", alpha=1.3, learn_alpha=True)
    with torch.no_grad():
        model.encoder.layer[0].attention.self.eot_parameters.alpha_logit.add_(1.0)
    with pytest.warns(UserWarning, match="discarding its trained values"):
        hf_eot.configure(model, "entmax", alpha=1.6, learn_alpha=True)


def test_learn_alpha_edited_into_a_live_config_is_reported() -> None:
    """Setting learn_alpha in model.config.eot_attention by hand (no configure, so no parameters) raises
    at forward with the fix, instead of an AttributeError or a silently fixed alpha."""
    model = tiny.model("bert", "eot")
    hf_eot.configure(model, "entmax", alpha=1.3)
    edited = dict(model.config.eot_attention)
    edited["default"] = {**edited["default"], "learn_alpha": True}
    model.config.eot_attention = edited
    ids, mask = tiny.padded_tokens()
    with pytest.raises(ValueError, match=r"asks for learned \['alpha'\].*call hf_eot.configure"):
        model(input_ids=ids, attention_mask=mask)
    hf_eot.configure(model, "entmax", alpha=1.3, learn_alpha=True)
    model(input_ids=ids, attention_mask=mask)
