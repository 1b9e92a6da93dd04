"""With no ``eot_attention`` in the config, "eot" is the model's own softmax: same outputs as "sdpa" and
"eager" for BERT, T5 (encoder, causal decoder, cross-attention, generate with the KV cache) and ViT."""

from __future__ import annotations

import _tiny as tiny
import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

import hf_eot
from hf_eot.integration.attention import eot_attention_forward, eot_mask
from hf_eot.ops import sparse_attention

ATOL = 1e-5


def test_registration_is_idempotent_and_complete() -> None:
    """Both the attention function and the mask function are registered under "eot"."""
    hf_eot.register()
    hf_eot.register()
    assert AttentionInterface._global_mapping["eot"] is eot_attention_forward
    assert AttentionMaskInterface._global_mapping["eot"] is eot_mask


def _outputs(kind: str, impl: str, output_attentions: bool = False):
    reference = tiny.model(kind, "sdpa")
    model = tiny.model(kind, impl, state_dict=reference.state_dict())
    ids, mask = tiny.padded_tokens()
    with torch.no_grad():
        if kind == "bert":
            out = model(input_ids=ids, attention_mask=mask, output_attentions=output_attentions)
            return out.last_hidden_state * mask[..., None], out
        if kind == "t5":
            dec = ids[:, :5].clone()
            dec[:, 0] = 0
            out = model(
                input_ids=ids, attention_mask=mask, decoder_input_ids=dec, output_attentions=output_attentions
            )
            return out.logits, out
        pixels = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
        out = model(pixel_values=pixels, output_attentions=output_attentions)
        return out.logits, out


@pytest.mark.parametrize("kind", ["bert", "t5", "vit"])
@pytest.mark.parametrize("impl", ["eager", "eot"])
def test_unconfigured_eot_matches_sdpa(kind: str, impl: str) -> None:
    """"eot" (fused path) and "eager" agree with "sdpa" to float32 round-off on the real tokens."""
    expected, _ = _outputs(kind, "sdpa")
    actual, _ = _outputs(kind, impl)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "t5", "vit"])
def test_output_attentions_returns_the_weights_used(kind: str) -> None:
    """With output_attentions, "eot" computes the weights itself: outputs still match "sdpa", the weights
    match "eager", rows sum to one and padded keys get zero weight."""
    expected, _ = _outputs(kind, "sdpa")
    actual, out = _outputs(kind, "eot", output_attentions=True)
    _, eager = _outputs(kind, "eager", output_attentions=True)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=1e-5)
    groups = ["attentions"] if kind != "t5" else ["encoder_attentions", "decoder_attentions", "cross_attentions"]
    for group in groups:
        for ours, theirs in zip(getattr(out, group), getattr(eager, group), strict=True):
            torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=1e-5)
            torch.testing.assert_close(ours.sum(-1), torch.ones_like(ours.sum(-1)), atol=1e-5, rtol=0)
    if kind == "bert":
        _, mask = tiny.padded_tokens()
        for weights in out.attentions:
            assert torch.all(weights.masked_select(mask[:, None, None, :] == 0) == 0)


def test_t5_generate_with_cache_matches_sdpa() -> None:
    """Greedy generate with the KV cache gives the same tokens and scores under "eot" and "sdpa",
    for the fused path and for the explicit (output_attentions) path."""
    reference = tiny.model("t5", "sdpa")
    model = tiny.model("t5", "eot", state_dict=reference.state_dict())
    ids, mask = tiny.padded_tokens()
    kwargs = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        expected = reference.generate(input_ids=ids, attention_mask=mask, **kwargs)
        actual = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        explicit = model.generate(input_ids=ids, attention_mask=mask, output_attentions=True, **kwargs)
    assert torch.equal(actual.sequences, expected.sequences)
    assert torch.equal(explicit.sequences, expected.sequences)
    for ours, theirs in zip(explicit.scores, expected.scores, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_set_attn_implementation_on_a_loaded_model() -> None:
    """A model loaded with "sdpa" switches to "eot" with set_attn_implementation and keeps its outputs."""
    model = tiny.model("bert", "sdpa")
    ids, mask = tiny.padded_tokens()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        model.set_attn_implementation("eot")
        assert model.config._attn_implementation == "eot"
        actual = model(input_ids=ids, attention_mask=mask, output_attentions=True).last_hidden_state
    torch.testing.assert_close(actual * mask[..., None], expected * mask[..., None], atol=ATOL, rtol=1e-5)


def test_fully_masked_sequence_gives_no_nan() -> None:
    """A sequence whose attention mask is all zeros yields finite outputs for every regularizer."""
    ids, mask = tiny.padded_tokens()
    mask[0] = 0
    for name in hf_eot.available_regularizers():
        model = tiny.model("bert", "eot", configure=lambda c, n=name: hf_eot.configure(c, n))
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        assert torch.isfinite(out.last_hidden_state).all(), name
        assert all(torch.isfinite(w).all() for w in out.attentions), name


@pytest.mark.parametrize(
    ("regularizer", "params"),
    [
        ("entmax", {}),
        ("sparsemax", {}),
        ("softmax", {"prior": "alibi", "epsilon": 0.7}),
        ("softmax", {"prior": "relative_buckets"}),
        ("ot", {}),
    ],
)
def test_t5_generate_with_cache_equals_recomputation(regularizer: str, params: dict) -> None:
    """For a configured decoder, greedy generate with the KV cache gives the tokens and scores of a
    generate that recomputes every step without cache (causal masks and priors align with the cache)."""

    def configure(config):
        parts = ("encoder", "decoder") if "prior" in params else (None,)
        for part in parts:
            hf_eot.configure(config, regularizer, part=part, **params)

    model = tiny.model("t5", "eot", configure=configure)
    if params.get("prior") == "relative_buckets":  # leave zero init, so the buckets matter
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "relative_bias" in name:
                    param.normal_()
    ids, mask = tiny.padded_tokens()
    kwargs = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **kwargs)
        recomputed = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for ours, theirs in zip(cached.scores, recomputed.scores, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["bert", "t5", "vit"])
@pytest.mark.parametrize(
    ("regularizer", "params"),
    [("sparsemax", {"epsilon": 0.5}), ("entmax", {"alpha": 1.5}), ("entmax", {"alpha": 1.3, "prior": "alibi"})],
)
def test_fused_sparse_maps_equal_their_weights_path(
    kind: str, regularizer: str, params: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without output_attentions the sparse maps run fused (blocked, weights never stored); the outputs and
    every parameter gradient equal those of the weights path (output_attentions=True), on padded batches,
    T5's causal decoder, cross-attention and learned position bias included."""
    fused_calls = []
    fused = hf_eot.ops.entmax_attention
    monkeypatch.setattr(hf_eot.ops, "entmax_attention", lambda *a, **k: fused_calls.append(1) or fused(*a, **k))
    monkeypatch.setattr(sparse_attention, "FUSED_MIN_KEYS", 0)  # tiny models: take the fused path anyway

    def configure(config):
        parts = ("encoder", "decoder") if (kind == "t5" and "prior" in params) else (None,)
        for part in parts:
            hf_eot.configure(config, regularizer, part=part, **params)

    model = tiny.model(kind, "eot", configure=configure)
    if kind == "t5":
        tiny.randomize_position_bias(model)
    batch = tiny.inputs(kind, batch=3)
    results = []
    for output_attentions in (False, True):
        model.zero_grad()
        out = model(**batch, output_attentions=output_attentions)
        main = next(iter(tiny.tensors(out).values()))
        (main * torch.linspace(-1, 1, main.numel()).view_as(main)).sum().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((main.detach(), grads))
        assert bool(fused_calls) != output_attentions, "fused exactly when the weights are not requested"
        fused_calls.clear()
    (fused, fused_grads), (unfused, unfused_grads) = results
    torch.testing.assert_close(fused, unfused, atol=ATOL, rtol=1e-5)
    assert fused_grads.keys() == unfused_grads.keys() and fused_grads
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad, unfused_grads[name], atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("kind", ["bert", "gpt2", "t5"])
@pytest.mark.parametrize("regularizer", ["softmax", "sparsemax"])
@pytest.mark.parametrize("where", ["forward", "config"])
def test_weights_are_returned_however_they_are_requested(kind: str, regularizer: str, where: str) -> None:
    """Attention weights requested on the forward or in the config (which Transformers records through its
    output-capturing hooks, not always as a keyword of the attention call: GPT-2, config flags) are the
    weights used, never None: the fused paths step aside, and the outputs are unchanged."""
    model = tiny.model(kind, "eot", configure=lambda c: hf_eot.configure(c, regularizer))
    batch = tiny.inputs(kind, batch=2)
    with torch.no_grad():
        plain = model(**batch)
        if where == "config":  # set before the model is built (Transformers refuses it on a live "eot" config)
            requesting = tiny.model(
                kind, "eot", configure=lambda c: hf_eot.configure(c, regularizer), output_attentions=True
            )
            out = requesting(**batch)
        else:
            out = model(**batch, output_attentions=True)
    groups = ["encoder_attentions", "decoder_attentions", "cross_attentions"] if kind == "t5" else ["attentions"]
    for group in groups:
        weights = getattr(out, group)
        assert weights is not None and len(weights) == 2 and all(w is not None for w in weights), group
        for w in weights:
            sums = w.sum(-1)
            assert torch.all(((sums - 1).abs() < 1e-5) | (sums == 0)), group
    torch.testing.assert_close(next(iter(tiny.tensors(out).values())), next(iter(tiny.tensors(plain).values())))


def test_short_rows_use_the_weights_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows shorter than FUSED_MIN_KEYS keys (here the tiny model's 9 tokens) use the weights path, which is
    faster there; from that length on, the fused path."""
    calls = []
    fused = hf_eot.ops.entmax_attention
    monkeypatch.setattr(hf_eot.ops, "entmax_attention", lambda *a, **k: calls.append(1) or fused(*a, **k))
    model = tiny.model("bert", "eot", configure=lambda c: hf_eot.configure(c, "sparsemax"))
    with torch.no_grad():
        model(**tiny.inputs("bert"))
        assert not calls
        monkeypatch.setattr(sparse_attention, "FUSED_MIN_KEYS", 9)
        model(**tiny.inputs("bert"))
        assert calls
