"""hf_eot.model_card: the README.md written for models with eot attention."""

from __future__ import annotations

import _tiny as tiny
import yaml
from transformers import BertConfig

from hf_eot.model_card import ModelCardCallback, attention_layout, model_card


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _bert_config(**eot) -> BertConfig:
    config = tiny.config("bert", num_hidden_layers=4, num_attention_heads=2)
    config.architectures = ["BertForSequenceClassification"]
    if eot:
        config.eot_attention = eot
    return config


def test_front_matter_and_sections(tmp_path):
    config = _bert_config(
        version=1,
        default={"regularizer": "softmax"},
        overrides=[{"layers": [3], "part": "encoder", "regularizer": "sparsemax"}],
    )
    card = model_card(
        config,
        results={"accuracy": 0.91, "ci": (0.9, 0.01)},
        datasets=["SetFit/bbc-news"],
        metrics=["accuracy"],
        base_model="sentence-transformers/all-MiniLM-L6-v2",
        training={"epochs": 2},
        path=tmp_path,
    )
    front = _front_matter(card)
    assert front["library_name"] == "transformers"
    assert {"hf-eot", "eot-softmax", "eot-sparsemax", "bert"} <= set(front["tags"])
    assert front["datasets"] == ["SetFit/bbc-news"] and front["metrics"] == ["accuracy"]
    assert front["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert front["pipeline_tag"] == "text-classification"
    assert (tmp_path / "README.md").read_text() == card
    assert 'attn_implementation="eot"' in card and "import hf_eot" in card
    assert "| encoder | 0-2 | softmax |" in card and "| encoder | 3 | sparsemax |" in card
    assert "| epochs | 2 |" in card and "| accuracy | 0.91 |" in card and "0.9 ± 0.01" in card


def test_layout_of_t5_parts():
    config = tiny.config("t5", num_layers=2, num_decoder_layers=3)
    config.eot_attention = {
        "default": {"regularizer": "softmax"},
        "overrides": [{"part": "encoder", "regularizer": "sinkhorn"}],
    }
    rows = attention_layout(config)
    assert [(r["part"], r["layers"], r["regularizer"]) for r in rows] == [
        ("encoder", [0, 1], "sinkhorn"),
        ("decoder", [0, 2], "softmax"),
        ("cross", [0, 2], "softmax"),
    ]
    card = model_card(config, path=None)
    assert "relative position bias" in card and "Not recorded." in card


def test_plain_config_is_softmax_and_nested_results(tmp_path):
    card = model_card(
        _bert_config(),
        results={"softmax": {"acc": 0.9}, "ot": {"acc": 0.8, "note": "x|y"}},
        path=tmp_path / "cards" / "bert.md",
    )
    assert "| encoder | 0-3 | softmax | epsilon=1.0, prior=None |" in card
    assert "| run | acc | note |" in card and "| ot | 0.8 | x\\|y |" in card
    assert (tmp_path / "cards" / "bert.md").is_file()


def test_callback_writes_checkpoint_and_output_cards(tmp_path):
    from types import SimpleNamespace

    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification(_bert_config())
    args = SimpleNamespace(output_dir=str(tmp_path), learning_rate=1e-3, seed=1, max_steps=-1, bf16=False)
    state = SimpleNamespace(
        global_step=7,
        is_world_process_zero=True,
        log_history=[{"loss": 1.0}, {"eval_accuracy": 0.5, "eval_runtime": 1.0}],
    )
    callback = ModelCardCallback(datasets=["d"], metrics=["accuracy"], training={"note": "tiny"})
    (tmp_path / "checkpoint-7").mkdir()
    callback.on_save(args, state, None, model=model)
    callback.on_train_end(args, state, None, model=model)
    for folder in (tmp_path / "checkpoint-7", tmp_path):
        card = (folder / "README.md").read_text()
        assert "| eval_accuracy | 0.5 |" in card and "eval_runtime" not in card
        assert "| steps | 7 |" in card and "| learning_rate | 0.001 |" in card and "| note | tiny |" in card
        assert "BertForSequenceClassification" in card
    state.is_world_process_zero = False
    (tmp_path / "README.md").unlink()
    callback.on_train_end(args, state, None, model=model)
    assert not (tmp_path / "README.md").exists()
