"""``hf_eot.configure``: per-layer choice in the config, validation at configure time, save/load round
trips, learned attention parameters as ordinary model parameters."""

from __future__ import annotations

import _tiny as tiny
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, BertModel

import hf_eot
from hf_eot.integration.modules import attention_modules, layer_index, module_part
from hf_eot.integration.parameters import module_spec


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"regularizer": "softmaxx"}, r"unknown regularizer 'softmaxx'; valid choices: \['entmax', 'ot'"),
        ({"regularizer": "softmax", "epsilon": 0.0}, r"invalid epsilon=0.0 .*a finite float > 0"),
        ({"regularizer": "softmax", "epsilon": -1}, r"invalid epsilon=-1"),
        ({"regularizer": "softmax", "temperature": 2.0}, r"unknown parameter\(s\) \['temperature'\].*valid"),
        ({"regularizer": "entmax", "alpha": 1.0}, r"invalid alpha=1.0 .*> 1"),
        ({"regularizer": "entmax", "alpha": 2.5, "learn_alpha": True}, r"learn_alpha=True"),
        ({"regularizer": "sinkhorn", "n_iters": 0}, r"invalid n_iters=0 .*int >= 1"),
        ({"regularizer": "softmax", "prior": "rope"}, r"invalid prior='rope' .*\['alibi', 'relative_buckets'\]"),
        ({"regularizer": "softmax", "layers": [2]}, r"invalid layers=\[2\]: this bert model has layers 0..1"),
        ({"regularizer": "softmax", "layers": [-1]}, r"invalid layers=\[-1\]"),
        ({"regularizer": "softmax", "part": "decoder"}, r"invalid part='decoder': .*\['encoder'\]"),
        ({"regularizer": "softmax", "part": "middle"}, r"invalid part='middle'; valid choices"),
        ({"regularizer": "ot", "gamma": 0}, r"invalid gamma=0"),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs: dict, message: str) -> None:
    """Every bad choice raises a ValueError naming the bad value and the valid choices, at configure time,
    and leaves the config untouched."""
    config = tiny.config("bert")
    with pytest.raises(ValueError, match=message):
        hf_eot.configure(config, **kwargs)
    assert getattr(config, "eot_attention", None) is None


def test_sinkhorn_is_refused_in_decoders() -> None:
    """Sinkhorn couples queries: configuring it on T5's decoder or cross-attention (or on all parts) is
    refused; the encoder is accepted."""
    for part in (None, "decoder", "cross"):
        with pytest.raises(ValueError, match="couples all queries"):
            hf_eot.configure(tiny.config("t5"), "sinkhorn", part=part)
    config = hf_eot.configure(tiny.config("t5"), "sinkhorn", part="encoder")
    assert config.eot_attention["overrides"][0]["part"] == "encoder"


def test_position_priors_are_refused_on_cross_attention() -> None:
    """ALiBi / relative buckets need queries and keys on one axis: refused for T5's cross-attention."""
    for part in (None, "cross"):
        with pytest.raises(ValueError, match="no meaning for cross-attention"):
            hf_eot.configure(tiny.config("t5"), "softmax", part=part, prior="alibi")
    hf_eot.configure(tiny.config("t5"), "softmax", part="decoder", prior="alibi")


def test_overrides_select_layers_and_parts() -> None:
    """The last matching override wins; parts and layer indices are read off the modules."""
    model = tiny.model("t5", "eot")
    hf_eot.configure(model, "entmax", alpha=1.5)
    hf_eot.configure(model, "sparsemax", layers=[1], part="decoder")
    hf_eot.configure(model, "sinkhorn", layers=[0], part="encoder")
    seen = {}
    for _, module in attention_modules(model):
        seen[(module_part(module), layer_index(module))] = module_spec(module).regularizer
    assert seen == {
        ("encoder", 0): "sinkhorn",
        ("encoder", 1): "entmax",
        ("decoder", 0): "entmax",
        ("decoder", 1): "sparsemax",
        ("cross", 0): "entmax",
        ("cross", 1): "entmax",
    }


def test_vit_layers_are_indexed_without_layer_idx() -> None:
    """ViT attention modules carry no layer_idx; hf_eot records their index at construction."""
    model = tiny.model("vit", "eot")
    indices = [layer_index(m) for _, m in attention_modules(model)]
    assert indices == [0, 1]


@pytest.mark.parametrize("kind", ["bert", "t5", "vit"])
def test_save_and_load_round_trip(kind: str, tmp_path) -> None:
    """save_pretrained / from_pretrained keeps eot_attention, the learned parameters and the outputs."""
    model = tiny.model(kind, "eot")
    part = "encoder"
    hf_eot.configure(model, "entmax", alpha=1.6, learn_alpha=True, part=part)
    hf_eot.configure(model, "softmax", layers=[1], part=part, prior="relative_buckets", epsilon=0.8)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "eot_parameters" in name:
                param.add_(torch.randn_like(param) * 0.3)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, attn_implementation="eot").eval()
    assert loaded.config.eot_attention == model.config.eot_attention
    ours = {n: p for n, p in model.named_parameters() if "eot_parameters" in n}
    theirs = {n: p for n, p in loaded.named_parameters() if "eot_parameters" in n}
    assert ours.keys() == theirs.keys() and len(ours) >= 2
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name])
    inputs = _inputs(kind)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs)[0], model(**inputs)[0])


def _inputs(kind: str) -> dict:
    if kind == "vit":
        return {"pixel_values": torch.randn(2, 1, 8, 8)}
    ids, mask = tiny.padded_tokens()
    inputs = {"input_ids": ids, "attention_mask": mask}
    if kind == "t5":
        inputs["decoder_input_ids"] = torch.zeros(ids.shape[0], 3, dtype=torch.long)
    return inputs


def test_learned_parameters_exist_when_loaded_from_a_plain_checkpoint(tmp_path) -> None:
    """A softmax checkpoint loaded with a config asking for learned alpha gets the parameters at their
    initial value (not uninitialised memory), and an optimizer built afterwards trains them."""
    plain = tiny.model("bert", "sdpa")
    plain.save_pretrained(tmp_path)
    config = hf_eot.configure(tiny.config("bert"), "entmax", alpha=1.25, learn_alpha=True)
    model = BertModel.from_pretrained(tmp_path, config=config, attn_implementation="eot")
    alphas = [m.eot_parameters.alpha() for _, m in attention_modules(model)]
    assert len(alphas) == 2
    for alpha in alphas:
        torch.testing.assert_close(alpha.flatten(), torch.full((4,), 1.25))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    ids, mask = tiny.padded_tokens()
    model.train()
    model(input_ids=ids, attention_mask=mask).last_hidden_state.pow(2).mean().backward()
    logit = model.encoder.layer[0].attention.self.eot_parameters.alpha_logit
    assert logit.grad is not None and logit.grad.abs().sum() > 0
    before = logit.detach().clone()
    optimizer.step()
    assert not torch.equal(before, logit.detach())


def test_relative_buckets_start_at_the_models_outputs() -> None:
    """prior='relative_buckets' adds zero-initialised learned buckets: the outputs do not change."""
    reference = tiny.model("bert", "sdpa")
    model = tiny.model("bert", "eot", state_dict=reference.state_dict())
    hf_eot.configure(model, "softmax", prior="relative_buckets")
    ids, mask = tiny.padded_tokens()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        actual = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(actual * mask[..., None], expected * mask[..., None], atol=1e-5, rtol=1e-5)


def test_reconfigure_removes_unneeded_parameters() -> None:
    """Switching back to softmax drops the learned parameters (no dead weights in the state dict)."""
    model = tiny.model("bert", "eot")
    hf_eot.configure(model, "entmax", learn_alpha=True)
    assert any("eot_parameters" in n for n in model.state_dict())
    hf_eot.configure(model, "softmax")
    assert not any("eot_parameters" in n for n in model.state_dict())


def test_t5_prior_softmax_is_the_closed_form() -> None:
    """T5's position bias is the log-prior: with epsilon, the attention rows equal
    pi_j exp(s_j / epsilon) / sum_l pi_l exp(s_l / epsilon) with log pi = position bias ("Deciphering
    Attention Mechanisms: Optimization and Fenchel Dual Solutions", eq. (17)-(18))."""
    model = tiny.model("t5", "eot")
    hf_eot.configure(model, "softmax", epsilon=2.0)
    ids, mask = tiny.padded_tokens()
    attention = model.encoder.block[0].layer[0].SelfAttention
    with torch.no_grad():
        out = model.encoder(input_ids=ids, attention_mask=mask, output_attentions=True)
        hidden = model.encoder.block[0].layer[0].layer_norm(model.encoder.embed_tokens(ids))
    weights = out.attentions[0]
    q = attention.q(hidden).view(3, 9, 4, 8).transpose(1, 2)
    k = attention.k(hidden).view(3, 9, 4, 8).transpose(1, 2)
    bias = attention.compute_bias(9, 9)
    logits = (q @ k.transpose(-1, -2)) / 2.0 + bias
    logits = logits.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
    torch.testing.assert_close(weights, torch.softmax(logits, -1), atol=1e-5, rtol=1e-5)


def test_config_json_is_plain_and_loads_back(tmp_path) -> None:
    """eot_attention is a plain JSON dict in config.json, and a model built from the saved config
    applies it per layer."""
    import json

    config = hf_eot.configure(tiny.config("vit"), "sparsemax", layers=[0])
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["eot_attention"]["overrides"][0]["regularizer"] == "sparsemax"
    model = AutoModel.from_config(AutoConfig.from_pretrained(tmp_path), attn_implementation="eot")
    specs = [module_spec(m).regularizer for _, m in attention_modules(model)]
    assert specs == ["sparsemax", "softmax"]


@pytest.mark.parametrize(
    ("layers", "expected"),
    [(1, [1]), (torch.tensor([0, 1]), [0, 1]), (torch.tensor(0), [0]), (np.array([1]), [1]), (np.int64(0), [0])],
)
def test_layers_accept_ints_and_integer_arrays(layers, expected) -> None:
    """configure(layers=...) takes an int, numpy integers/arrays and 0-d/1-d integer tensors."""
    config = hf_eot.configure(tiny.config("bert"), "sparsemax", layers=layers)
    assert config.eot_attention["overrides"][0]["layers"] == expected


@pytest.mark.parametrize("layers", [torch.tensor([0.0, 1.0]), "0", [0, "1"]])
def test_bad_layers_are_named(layers) -> None:
    """Non-integer layer selections raise a ValueError that names the layers argument."""
    with pytest.raises(ValueError, match="invalid layers"):
        hf_eot.configure(tiny.config("bert"), "sparsemax", layers=layers)


def test_numpy_scalar_parameters_are_numbers() -> None:
    """alpha=np.float32(1.5) is stored as the float 1.5 (the config stays plain JSON)."""
    config = hf_eot.configure(tiny.config("bert"), "entmax", alpha=np.float32(1.5), max_iters=np.int64(9))
    assert config.eot_attention["default"]["alpha"] == 1.5 and type(config.eot_attention["default"]["alpha"]) is float
    assert type(config.eot_attention["default"]["max_iters"]) is int


def test_configure_takes_a_whole_config() -> None:
    """configure(model, EOTAttentionConfig(...)) applies it (with its learned parameters); mixing it with
    layers/part/params is refused; an EOTAttentionConfig that does not fit the model is refused."""
    from hf_eot.config import AttentionSpec, Override

    model = tiny.model("bert", "eot")
    choice = hf_eot.EOTAttentionConfig(
        AttentionSpec("sparsemax"), (Override(AttentionSpec("entmax", {"learn_alpha": True}), (1,)),)
    )
    hf_eot.configure(model, choice)
    assert model.config.eot_attention == choice.to_dict()
    specs = [module_spec(m).regularizer for _, m in attention_modules(model)]
    assert specs == ["sparsemax", "entmax"]
    assert hasattr(model.encoder.layer[1].attention.self, "eot_parameters")
    with pytest.raises(ValueError, match="replaces the whole choice"):
        hf_eot.configure(model, choice, layers=[0])
    with pytest.raises(ValueError, match=r"invalid layers=\[7\]"):
        hf_eot.configure(model, hf_eot.EOTAttentionConfig(overrides=(Override(AttentionSpec(), (7,)),)))
