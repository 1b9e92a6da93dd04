"""Maps that couple queries (Sinkhorn) in models: padded tokens take no column mass whatever the mask's
pattern, and every causal call is refused, whether the module, the call or the mask makes it causal."""

from __future__ import annotations

import _tiny as tiny
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

import hf_eot
from hf_eot import attention_weights

SINKHORN = {"tol": 1e-6, "max_iters": 2000}


def test_custom_mask_with_false_diagonal_keeps_real_rows() -> None:
    """A custom 4D mask where no token attends to itself: real tokens' Sinkhorn rows still sum to one (the
    diagonal says nothing about padding), padded tokens' rows are zero, and the layer-0 weights equal the
    functional API's on the same mask with the padded query rows removed."""
    model = tiny.model("bert", "eot", configure=lambda c: hf_eot.configure(c, "sinkhorn", **SINKHORN))
    ids, mask = tiny.padded_tokens()
    length = ids.shape[1]
    custom = mask[:, None, None, :].bool() & ~torch.eye(length, dtype=torch.bool)  # (B, 1, L, L)
    with torch.no_grad():
        weights = model(input_ids=ids, attention_mask=custom, output_attentions=True).attentions[0]
        attention = model.encoder.layer[0].attention.self
        hidden = model.embeddings(input_ids=ids)
        q = attention.query(hidden).view(3, length, 4, 8).transpose(1, 2)
        k = attention.key(hidden).view(3, length, 4, 8).transpose(1, 2)
    real = mask.bool()
    for b in range(3):
        n = int(real[b].sum())
        torch.testing.assert_close(weights[b, :, :n].sum(-1), torch.ones(4, n), atol=1e-5, rtol=0)
        assert torch.all(weights[b, :, n:] == 0)
        assert torch.all(weights[b, :, torch.arange(length), torch.arange(length)] == 0)
    reference = attention_weights(
        (q @ k.transpose(-1, -2)) / 8**0.5, "sinkhorn", custom & real[:, None, :, None], **SINKHORN
    )
    torch.testing.assert_close(weights, reference, atol=1e-5, rtol=1e-4)


def _clip_text() -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16,
    )
    return CLIPTextModel._from_config(config, attn_implementation="eot").eval()


def test_sinkhorn_is_refused_on_a_call_that_is_causal() -> None:
    """CLIP's text attention is a non-causal module called with is_causal=True: it is a decoder part, so
    Sinkhorn is refused at configure, and a hand-written config is refused at forward (it would leak future
    tokens), neither advising part='encoder', which the model lacks."""
    model = _clip_text()
    with pytest.raises(ValueError, match="couples all queries .* no encoder part") as error:
        hf_eot.configure(model, "sinkhorn")
    assert "part='encoder'" not in str(error.value)
    model.config.eot_attention = {"version": 1, "default": {"regularizer": "sinkhorn"}}
    ids = torch.randint(2, 64, (2, 6))
    with pytest.raises(ValueError, match="couples all queries") as error:
        model(input_ids=ids)
    assert "part='encoder'" not in str(error.value)


def test_sinkhorn_is_refused_with_a_causal_mask() -> None:
    """An encoder called with a causal (lower-triangular) 4D mask is causal too: Sinkhorn is refused; a
    padded non-causal mask is accepted."""
    model = tiny.model("bert", "eot", configure=lambda c: hf_eot.configure(c, "sinkhorn", n_iters=5))
    ids, mask = tiny.padded_tokens()
    causal = mask[:, None, None, :].bool() & torch.ones(9, 9, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="in a causal attention call"):
        model(input_ids=ids, attention_mask=causal)
    model(input_ids=ids, attention_mask=mask)


def test_marginal_diagnostics_are_kept_on_the_module() -> None:
    """Each Sinkhorn module keeps the solver's diagnostics: eot_marginal_error (batch, heads), below tol
    once converged, and eot_n_iters (the fixed budget when n_iters is set)."""
    model = tiny.model("bert", "eot", configure=lambda c: hf_eot.configure(c, "sinkhorn", n_iters=7))
    ids, mask = tiny.padded_tokens()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    attention = model.encoder.layer[1].attention.self
    assert attention.eot_marginal_error.shape == (3, 4)
    assert int(attention.eot_n_iters) == 7
    assert set(attention.eot_diagnostics) == {"marginal_error", "n_iters"}
    hf_eot.configure(model, "sinkhorn", **SINKHORN)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert float(attention.eot_marginal_error.max()) <= 1e-6
