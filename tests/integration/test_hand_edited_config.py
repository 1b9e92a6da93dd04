"""A hand-edited ``eot_attention`` in config.json is checked against the model as ``configure`` checks it:
overrides for layers or parts the model lacks fail at load or first forward, never silently."""

from __future__ import annotations

import json

import _tiny as tiny
import pytest
import torch
from transformers import BertModel, T5ForConditionalGeneration

import hf_eot


def _edit(path, change) -> None:
    data = json.loads((path / "config.json").read_text())
    change(data["eot_attention"])
    (path / "config.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"layers": [5], "part": None, "regularizer": "sparsemax"}, r"invalid layers=\[5\]: this bert model has layers 0..1"),
        ({"layers": None, "part": "decoder", "regularizer": "sparsemax"}, r"invalid part='decoder': .*\['encoder'\]"),
    ],
)
def test_overrides_the_model_lacks_fail_at_first_forward(tmp_path, override: dict, message: str) -> None:
    """An override for layer 5 of a 2-layer BERT, or for a decoder it does not have, raises a ValueError
    saying the config does not fit the model."""
    model = tiny.model("bert", "eot")
    hf_eot.configure(model, "entmax")
    model.save_pretrained(tmp_path)
    _edit(tmp_path, lambda eot: eot["overrides"].append(override))
    ids, mask = tiny.padded_tokens()
    with pytest.raises(ValueError, match="does not fit this model: " + message):
        loaded = BertModel.from_pretrained(tmp_path, attn_implementation="eot")
        loaded(input_ids=ids, attention_mask=mask)


def test_sinkhorn_edited_onto_a_decoder_fails(tmp_path) -> None:
    """Sinkhorn written by hand as T5's default (so on its decoder) is refused, as configure refuses it."""
    model = tiny.model("t5", "eot")
    hf_eot.configure(model, "sparsemax")
    model.save_pretrained(tmp_path)
    _edit(tmp_path, lambda eot: eot["default"].update(regularizer="sinkhorn", epsilon=1.0))
    ids, mask = tiny.padded_tokens()
    with pytest.raises(ValueError, match=r"does not fit this model: regularizer 'sinkhorn' couples all queries"):
        loaded = T5ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eot")
        loaded(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.zeros(3, 2, dtype=torch.long))


def test_valid_edits_load(tmp_path) -> None:
    """A hand-written override inside the model's layers loads and runs."""
    model = tiny.model("bert", "eot")
    hf_eot.configure(model, "softmax")
    model.save_pretrained(tmp_path)
    _edit(tmp_path, lambda eot: eot["overrides"].append({"layers": [1], "regularizer": "sparsemax"}))
    loaded = BertModel.from_pretrained(tmp_path, attn_implementation="eot")
    ids, mask = tiny.padded_tokens()
    out = loaded(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert (out.attentions[1] == 0).any() and not (out.attentions[0][:, :, :, :5] == 0).any()
