"""The config schema: lossless dict round trip, last-override-wins selection, validation of the dict."""

import pytest

from hf_eot.config import AttentionSpec, EOTAttentionConfig, Override


def test_round_trip_is_lossless() -> None:
    """to_dict / from_dict reproduce the same config, with every parameter filled in."""
    config = EOTAttentionConfig(
        AttentionSpec("entmax", {"alpha": 1.2}),
        (Override(AttentionSpec("sinkhorn", {"n_iters": 5}), (0, 2), "encoder"),),
    )
    data = config.to_dict()
    assert data["default"] == {"regularizer": "entmax", "alpha": 1.2, "epsilon": 1.0, "learn_alpha": False,
                               "max_iters": 50, "prior": None}
    assert EOTAttentionConfig.from_dict(data) == config


def test_last_matching_override_wins() -> None:
    """spec_for returns the last override matching (layer, part), else the default."""
    config = EOTAttentionConfig(
        AttentionSpec(),
        (
            Override(AttentionSpec("sparsemax"), None, "cross"),
            Override(AttentionSpec("entmax"), (1,), None),
        ),
    )
    assert config.spec_for(0, "encoder").regularizer == "softmax"
    assert config.spec_for(0, "cross").regularizer == "sparsemax"
    assert config.spec_for(1, "cross").regularizer == "entmax"


def test_fused_sdpa_detection() -> None:
    """Softmax with any epsilon and no named prior runs on fused SDPA; other maps and priors do not."""
    assert AttentionSpec().runs_on_sdpa
    assert AttentionSpec("softmax", {"epsilon": 2.0}).runs_on_sdpa
    assert not AttentionSpec("softmax", {"prior": "alibi"}).runs_on_sdpa
    assert not AttentionSpec("sparsemax").runs_on_sdpa


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"default": {"epsilon": 1.0}}, "has no 'regularizer' key"),
        ({"default": {"regularizer": "softmax"}, "layer": {}}, r"unknown key\(s\) \['layer'\]"),
        ({"version": 7}, "version 7"),
        ([1, 2], "must be a dict"),
        ({"overrides": [{"layers": [], "regularizer": "softmax"}]}, "non-empty list"),
    ],
)
def test_malformed_dicts_are_rejected(data, message) -> None:
    """A hand-edited config.json with a bad eot_attention fails with a message naming the problem."""
    with pytest.raises(ValueError, match=message):
        EOTAttentionConfig.from_dict(data)
