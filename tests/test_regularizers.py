"""The registry: one entry per regularizer, lookup errors that name the valid choices, no duplicates."""

import pytest

from hf_eot.regularizers import REGISTRY, available_regularizers, get_regularizer, register_regularizer


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
    """The flags that the Transformers glue relies on are set on the right entries."""
    assert [n for n, r in REGISTRY.items() if r.couples_queries] == ["sinkhorn"]
    assert [n for n, r in REGISTRY.items() if r.needs_templates] == ["ot"]
