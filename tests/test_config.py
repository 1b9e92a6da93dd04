"""The config schema: lossless dict round trip, last-override-wins selection, validation of the dict."""

import numpy as np
import pytest
import torch

from hf_eot.config import AttentionSpec, EOTAttentionConfig, Override, as_layers, split_spec_string


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


def test_legacy_n_iter_is_read_as_max_iters() -> None:
    """A config saved when entmax's parameter was called n_iter loads with it as max_iters; both at once
    is ambiguous and refused."""
    config = EOTAttentionConfig.from_dict({"default": {"regularizer": "entmax", "alpha": 1.3, "n_iter": 7}})
    assert config.default.params["max_iters"] == 7 and "n_iter" not in config.default.params
    with pytest.raises(ValueError, match="sets both 'max_iters' and its legacy name 'n_iter'"):
        AttentionSpec.from_dict({"regularizer": "entmax", "n_iter": 7, "max_iters": 8})


@pytest.mark.parametrize(
    ("text", "name", "params"),
    [
        ("softmax", "softmax", {}),
        ("entmax:alpha=1.5,learn_alpha=true", "entmax", {"alpha": 1.5, "learn_alpha": True}),
        ("sinkhorn:n_iters=20, tol=1e-6", "sinkhorn", {"n_iters": 20, "tol": 1e-6}),
        ("softmax:prior=alibi,epsilon=2", "softmax", {"prior": "alibi", "epsilon": 2}),
        ("softmax:prior=none", "softmax", {"prior": None}),
    ],
)
def test_spec_strings_parse_to_typed_params(text, name, params) -> None:
    """The command-line form name[:key=value,...] reads ints, floats, bools, None and strings."""
    assert split_spec_string(text) == (name, params)
    assert AttentionSpec.from_string(text) == AttentionSpec(name, params)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("entmax:alpha", r"bad regularizer parameter 'alpha' .* expected key=value"),
        ("entmax:=1.5", "expected key=value"),
        ("softmaxx", "softmaxx"),
        ("entmax:alpah=1.5", "alpah"),
        ("entmax:alpha=high", "alpha"),
        ("entmax:alpha=1.5,alpha=2", "'alpha' .* sets it twice"),
        ("entmax:regularizer=sparsemax", "names the regularizer before the ':'"),
    ],
)
def test_bad_spec_strings_name_the_problem(text, message) -> None:
    """A malformed item, an unknown regularizer or parameter, or a bad value raises a ValueError naming it."""
    with pytest.raises(ValueError, match=message):
        AttentionSpec.from_string(text)


def test_committed_checkpoint_configs_load() -> None:
    """Every packaged checkpoint's config.json parses with the current schema."""
    import json
    from pathlib import Path

    import hf_eot

    found = sorted(Path(hf_eot.__file__).parent.glob("data/checkpoints/*/config.json"))
    assert found
    for path in found:
        raw = json.loads(path.read_text()).get("eot_attention")
        assert EOTAttentionConfig.from_dict(raw).to_dict()["version"] == 1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"overrides": {"layers": [0], "regularizer": "sparsemax"}}, r"\['overrides'\] must be a list of dicts"),
        ({"overrides": ["sparsemax"]}, r"each entry of config.eot_attention\['overrides'\] must be a dict"),
        ({"default": "sparsemax"}, r"an attention spec must be a dict"),
        ({"overrides": [{"layers": "0", "regularizer": "softmax"}]}, r"invalid layers: expected None, a layer index"),
        ({"overrides": [{"layers": [1.5], "regularizer": "softmax"}]}, r"invalid layers=\[1.5\]"),
    ],
)
def test_malformed_overrides_are_rejected(data, message) -> None:
    """overrides written as a dict, non-dict entries or specs, and non-integer layers fail with the problem
    named."""
    with pytest.raises(ValueError, match=message):
        EOTAttentionConfig.from_dict(data)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, (1,)),
        ([0, 2], (0, 2)),
        (np.int64(3), (3,)),
        (np.array([0, 1]), (0, 1)),
        (torch.tensor(1), (1,)),
        (torch.tensor([0, 1]), (0, 1)),
        (None, None),
    ],
)
def test_layers_accept_integer_scalars_and_arrays(value, expected) -> None:
    """Layer selections may be an int, a list, numpy integers/arrays or 0-d/1-d integer tensors."""
    assert as_layers(value) == expected


@pytest.mark.parametrize("value", [torch.tensor([0.5]), torch.tensor([[0, 1]]), "0", {0: 1}, [], [True], 2.0])
def test_bad_layers_name_the_argument(value) -> None:
    """Float tensors, 2-d tensors, strings, dicts, empty lists, booleans and floats are refused naming layers."""
    with pytest.raises(ValueError, match="invalid layers"):
        as_layers(value)


@pytest.mark.parametrize(
    ("config", "parts", "message"),
    [
        (EOTAttentionConfig(overrides=(Override(AttentionSpec("sparsemax"), (5,)),)), {"encoder": 2},
         r"invalid layers=\[5\]: this bert model has layers 0..1"),
        (EOTAttentionConfig(overrides=(Override(AttentionSpec("sparsemax"), None, "cross"),)), {"encoder": 2},
         r"invalid part='cross': this bert model has parts \['encoder'\]"),
        (EOTAttentionConfig(AttentionSpec("sinkhorn")), {"encoder": 2, "decoder": 2, "cross": 2},
         r"couples all queries .*\['cross', 'decoder'\].*choose part='encoder'"),
        (EOTAttentionConfig(AttentionSpec("sinkhorn")), {"decoder": 2},
         r"couples all queries .*has no encoder part"),
        (EOTAttentionConfig(AttentionSpec("softmax", {"prior": "alibi"})), {"encoder": 2, "decoder": 2, "cross": 2},
         r"prior='alibi' .*no meaning for cross-attention"),
    ],
)
def test_check_model_refuses_what_the_model_cannot_run(config, parts, message) -> None:
    """Layers or parts the model lacks, query-coupling maps on decoder/cross parts and position priors on
    cross-attention are refused; the Sinkhorn advice names part='encoder' only where there is one."""
    with pytest.raises(ValueError, match=message):
        config.check_model(parts, "bert")


def test_check_model_resolves_overrides() -> None:
    """A Sinkhorn default shadowed by softmax overrides on the decoder parts is accepted."""
    config = EOTAttentionConfig(
        AttentionSpec("sinkhorn"),
        (Override(AttentionSpec(), None, "decoder"), Override(AttentionSpec(), None, "cross")),
    )
    config.check_model({"encoder": 2, "decoder": 2, "cross": 2}, "t5")
