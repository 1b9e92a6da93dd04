"""Padding never changes the result of the real tokens: for every regularizer and architecture, a padded
batch gives, on its real tokens, what each sequence gives alone."""

from __future__ import annotations

import _tiny as tiny
import pytest
import torch

import hf_eot

SETTINGS = {
    "softmax": {},
    "softmax-epsilon": {"epsilon": 0.5},
    "softmax-alibi": {"prior": "alibi"},
    "softmax-buckets": {"prior": "relative_buckets"},
    "sparsemax": {},
    "entmax": {},
    "entmax-bisect": {"alpha": 1.3},
    "entmax-learned": {"alpha": 1.4, "learn_alpha": True},
    "sinkhorn": {"n_iters": 30},
    "sinkhorn-tol": {"tol": 1e-6, "max_iters": 500},
    "ot": {},
}


def _configure(kind: str, setting: str):
    name = setting.split("-")[0]
    params = SETTINGS[setting]

    def apply(config):
        # In T5, Sinkhorn (which couples queries) goes to the encoder only, and position priors to the
        # self-attention parts only (they mean nothing for cross-attention).
        parts = [None]
        if kind == "t5" and name == "sinkhorn":
            parts = ["encoder"]
        elif kind == "t5" and "prior" in params:
            parts = ["encoder", "decoder"]
        for part in parts:
            hf_eot.configure(config, name, part=part, **params)

    return apply


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_padded_batch_equals_each_sequence_alone(kind: str, setting: str) -> None:
    """Outputs on real tokens of a right-padded batch equal the unpadded per-sequence outputs."""
    model = tiny.model(kind, "eot", configure=_configure(kind, setting))
    ids, mask = tiny.padded_tokens()
    with torch.no_grad():
        if kind == "bert":
            batched = model(input_ids=ids, attention_mask=mask).last_hidden_state
        else:
            dec = torch.zeros(ids.shape[0], 4, dtype=torch.long)
            dec[:, 1:] = ids[:, :3]
            batched = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        for b in range(ids.shape[0]):
            n = int(mask[b].sum())
            if kind == "bert":
                alone = model(input_ids=ids[b : b + 1, :n]).last_hidden_state[0]
                torch.testing.assert_close(batched[b, :n], alone, atol=2e-5, rtol=1e-4)
            else:
                alone = model(input_ids=ids[b : b + 1, :n], decoder_input_ids=dec[b : b + 1]).logits[0]
                torch.testing.assert_close(batched[b], alone, atol=2e-5, rtol=1e-4)


def test_left_padding_is_invariant_too() -> None:
    """Left padding (as in batched generation) also leaves the real tokens unchanged (Sinkhorn); the
    position ids of the real tokens are kept as when alone."""
    model = tiny.model("bert", "eot", configure=lambda c: hf_eot.configure(c, "sinkhorn", n_iters=25))
    ids, mask = tiny.padded_tokens()
    ids, mask = ids.flip(-1), mask.flip(-1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        n = int(mask[2].sum())
        alone = model(input_ids=ids[2:3, -n:]).last_hidden_state[0]
    torch.testing.assert_close(batched[2, -n:], alone, atol=2e-5, rtol=1e-4)


def test_sinkhorn_padded_queries_take_no_column_mass() -> None:
    """In a padded batch, Sinkhorn weights of padded query rows are zero and the real rows form the plan of
    the real tokens alone (column sums one over real keys)."""
    model = tiny.model("bert", "eot", configure=lambda c: hf_eot.configure(c, "sinkhorn", tol=1e-6, max_iters=2000))
    ids, mask = tiny.padded_tokens()
    with torch.no_grad():
        weights = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[0]
    b, n = 2, int(mask[2].sum())
    assert torch.all(weights[b, :, n:, :] == 0)
    assert torch.all(weights[b, :, :, n:] == 0)
    torch.testing.assert_close(weights[b, :, :n, :n].sum(-2), torch.ones(4, n), atol=1e-5, rtol=0)
    torch.testing.assert_close(weights[b, :, :n, :n].sum(-1), torch.ones(4, n), atol=1e-5, rtol=0)


def test_vit_ot_template_partners_change_only_ot_layers() -> None:
    """``eot_template_partners`` appends a partner's templates in `ot` layers; without partners the ViT
    output is what the plain call gives, and -1 partners are a no-op."""
    model = tiny.model("vit", "eot", configure=lambda c: hf_eot.configure(c, "ot", layers=[1]))
    pixels = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        plain = model(pixel_values=pixels).logits
        none = model(pixel_values=pixels, eot_template_partners=torch.full((4,), -1)).logits
        paired = model(pixel_values=pixels, eot_template_partners=torch.tensor([1, 0, 3, 2])).logits
    torch.testing.assert_close(none, plain, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(paired, plain, atol=1e-4)


@pytest.mark.parametrize(
    ("partners", "message"),
    [
        (torch.tensor([1.0, 0.0, 3.0, 2.0]), "integer example indices"),
        (torch.tensor([1, 0, 4, 2]), r"indices in 0..3 \(or -1: none\), got \[1, 0, 4, 2\]"),
        (torch.tensor([1, 0, -2, 2]), r"indices in 0..3"),
        (torch.tensor([1, 0]), r"shape \(4,\)"),
    ],
)
def test_bad_template_partners_are_refused(partners: torch.Tensor, message: str) -> None:
    """Float, out-of-range or mis-shaped eot_template_partners raise a ValueError instead of indexing
    another example (or wrapping around) silently."""
    model = tiny.model("vit", "eot", configure=lambda c: hf_eot.configure(c, "ot", layers=[1]))
    with pytest.raises(ValueError, match=message):
        model(pixel_values=torch.randn(4, 1, 8, 8), eot_template_partners=partners)
