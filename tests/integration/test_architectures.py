"""Architectures beyond BERT/T5/ViT, each built from a tiny config (tests/_tiny.py): their attention
modules and parts are found, unconfigured "eot" is "sdpa", sparsemax and (learned) entmax run, and
Sinkhorn is refused wherever a call is causal or cross-attention."""

from __future__ import annotations

import _tiny as tiny
import pytest
import torch
from torch import nn

import hf_eot
from hf_eot.integration.modules import (
    attention_modules,
    hidden_size,
    layer_index,
    locate_attention,
    model_parts,
    module_part,
    num_heads,
)

KINDS = sorted(tiny.ARCHITECTURES)


def _forward(model: nn.Module, kind: str) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return tiny.tensors(model(**tiny.inputs(kind)))


@pytest.mark.parametrize("kind", KINDS)
def test_parts_and_layer_counts_from_model_and_from_config(kind: str) -> None:
    """model_parts reads the same {part: layers} from the model and from its config alone, and it is the
    architecture's true layout (BART's and Whisper's one decoder layer is not taken from the encoder)."""
    expected = tiny.ARCHITECTURES[kind].parts
    model = tiny.model(kind)
    assert model_parts(model) == expected
    assert model_parts(tiny.config(kind)) == expected
    located = locate_attention(model)
    assert len(located) == sum(expected.values())
    for part, n in expected.items():
        assert sorted(loc.layer for loc in located if loc.part == part) == list(range(n))
    for loc in located:
        assert module_part(loc.module) == loc.part and layer_index(loc.module) == loc.layer
        assert num_heads(loc.module) == tiny.HEADS
        assert hidden_size(loc.module.config) == tiny.WIDTH


@pytest.mark.parametrize("kind", KINDS)
def test_unconfigured_eot_equals_sdpa(kind: str) -> None:
    """Without config.eot_attention, "eot" gives exactly the outputs of "sdpa" (same weights)."""
    reference = tiny.model(kind, "sdpa")
    model = tiny.model(kind, "eot", state_dict=reference.state_dict())
    expected, got = _forward(reference, kind), _forward(model, kind)
    assert expected.keys() == got.keys() and expected
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("regularizer", "params"),
    [("sparsemax", {}), ("entmax", {"alpha": 1.5}), ("entmax", {"alpha": 1.3, "learn_alpha": True})],
    ids=["sparsemax", "entmax", "entmax-learned"],
)
def test_sparse_regularizers_run_and_change_the_outputs(kind: str, regularizer: str, params: dict) -> None:
    """sparsemax / entmax (with a learned per-head alpha) run in every attention module: finite outputs
    that differ from softmax; a learned alpha exists on every module and receives a gradient."""
    softmax = _forward(tiny.model(kind), kind)
    model = hf_eot.configure(tiny.model(kind), regularizer, **params)
    out = _forward(model, kind)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert any(not torch.allclose(out[k], softmax[k]) for k in out)
    if params.get("learn_alpha"):
        modules = [m for _, m in attention_modules(model)]
        assert all(hasattr(m, "eot_parameters") for m in modules)
        model.train()
        sum(v.float().sum() for v in tiny.tensors(model(**tiny.inputs(kind))).values()).backward()
        grads = [m.eot_parameters.alpha_logit.grad for m in modules]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(bool(g.abs().sum() > 0) for g in grads)


@pytest.mark.parametrize("kind", KINDS)
def test_sinkhorn_runs_on_encoder_self_attention_and_is_refused_elsewhere(kind: str) -> None:
    """Sinkhorn is accepted on encoder self-attention (and runs there), refused at configure for every
    other part, and refused at the call when a config asks for it anyway (written by hand)."""
    parts = tiny.ARCHITECTURES[kind].parts
    model = tiny.model(kind)
    if "encoder" in parts:
        hf_eot.configure(model, "sinkhorn", part="encoder", n_iters=5)
        assert all(torch.isfinite(v).all() for v in _forward(model, kind).values())
    else:
        with pytest.raises(ValueError, match="has no encoder part"):
            hf_eot.configure(model, "sinkhorn")
    for part in sorted(set(parts) - {"encoder"}):
        with pytest.raises(ValueError, match="couples all queries"):
            hf_eot.configure(model, "sinkhorn", part=part)
        forced = tiny.model(kind)
        forced_config = {"version": 1, "default": {"regularizer": "softmax"},
                         "overrides": [{"part": part, "regularizer": "sinkhorn"}]}  # fmt: skip
        for _, module in attention_modules(forced):
            module.config.eot_attention = forced_config
            module.__dict__.pop("_eot_spec_cache", None)
        with pytest.raises(ValueError, match="sinkhorn"):
            _forward(forced, kind)


def test_clip_text_tower_is_a_decoder_and_vision_tower_an_encoder() -> None:
    """CLIP's text attention is causal on every call (not at construction): it is the "decoder" part, so a
    choice for the vision encoder leaves the text tower on softmax."""
    model = hf_eot.configure(tiny.model("clip"), "sparsemax", part="encoder")
    for loc in locate_attention(model):
        assert loc.part == ("decoder" if loc.name.startswith("text_model") else "encoder"), loc.name
    text_only = {"input_ids": tiny.inputs("clip")["input_ids"], "attention_mask": tiny.inputs("clip")["attention_mask"]}
    reference = tiny.model("clip", "sdpa", state_dict=model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model.get_text_features(**text_only), reference.get_text_features(**text_only))


def test_a_model_without_supported_attention_is_refused_at_configure() -> None:
    """A model with no attention module that goes through Transformers' attention interface gets a clear
    ValueError at configure, not a silent no-op."""

    class NoAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = tiny.config("bert")
            self.config._attn_implementation = "eot"
            self.linear = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="found no attention module in NoAttention"):
        hf_eot.configure(NoAttention(), "sparsemax")
