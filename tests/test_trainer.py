"""Every "eot" regularizer trains with a plain transformers.Trainer: tiny BERT / T5 / ViT models from
configs, a few steps each (loss goes down, bf16 on CPU stays finite, gradient checkpointing, and
save_pretrained / from_pretrained restore the variant and its learned parameters)."""

from __future__ import annotations

import math

import _tiny as tiny
import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    T5ForConditionalGeneration,
    Trainer,
    TrainingArguments,
    ViTForImageClassification,
)

import hf_eot

# regularizer, params: one entry per regularizer (plus the learned / prior variants)
SPECS = [
    ("softmax", {}),
    ("softmax", {"prior": "alibi"}),
    ("sparsemax", {}),
    ("entmax", {"alpha": 1.5}),
    ("entmax", {"alpha": 1.5, "learn_alpha": True}),
    ("sinkhorn", {}),
    ("ot", {}),
]
SPEC_IDS = [name + "".join(f"-{k}={v}" for k, v in p.items()) for name, p in SPECS]


def test_every_registered_regularizer_is_covered():
    assert set(hf_eot.available_regularizers()) <= {name for name, _ in SPECS}


def tiny_bert(name: str, params: dict, seed: int = 0) -> BertForSequenceClassification:
    model = tiny.model(
        "bert", "eot", cls=BertForSequenceClassification, seed=seed, num_attention_heads=2, num_labels=2
    ).train()
    return hf_eot.configure(model, name, **params)


def toy_text(n: int = 16, length: int = 8, seed: int = 0) -> datasets.Dataset:
    """Label = whether the token after [CLS] is small: learnable (or memorisable) in a few steps."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, 64, (n, length), generator=g)
    ids[:, 0] = 2  # [CLS]-like
    labels = (ids[:, 1] < 36).long()
    mask = torch.ones_like(ids)
    mask[::3, -2:] = 0  # some padding
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()}
    )


def args(tmp_path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, per_device_eval_batch_size=32,
        learning_rate=1e-2, max_steps=10, logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    base.update(kw)
    return TrainingArguments(**base)


@pytest.mark.parametrize(("name", "params"), SPECS, ids=SPEC_IDS)
def test_loss_decreases(tmp_path, name, params):
    data = toy_text()
    trainer = Trainer(
        model=tiny_bert(name, params), args=args(tmp_path), train_dataset=data, eval_dataset=data
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert math.isfinite(after) and after < before - 0.05, (before, after)


@pytest.mark.parametrize(("name", "params"), SPECS, ids=SPEC_IDS)
def test_bf16_on_cpu_has_no_nan(tmp_path, name, params):
    data = toy_text()
    model = tiny_bert(name, params)
    trainer = Trainer(
        model=model, args=args(tmp_path, bf16=True, max_steps=4), train_dataset=data, eval_dataset=data
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(v) for v in losses), losses
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(trainer.evaluate()["eval_loss"])


@pytest.mark.parametrize(
    ("name", "params"),
    [("softmax", {}), ("entmax", {"alpha": 1.5, "learn_alpha": True}), ("sinkhorn", {}), ("ot", {})],
)
def test_gradient_checkpointing_gives_the_same_gradients(name, params):
    batch = toy_text(8)[:]
    batch = {k: torch.tensor(v) for k, v in batch.items()}
    grads = []
    for checkpointing in (False, True):
        model = tiny_bert(name, params)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-4, atol=1e-6, msg=key)


def test_trainer_with_gradient_checkpointing(tmp_path):
    data = toy_text()
    trainer = Trainer(
        model=tiny_bert("sparsemax", {}),
        args=args(tmp_path, activation_checkpointing=True, max_steps=3),
        train_dataset=data,
    )
    out = trainer.train()
    assert math.isfinite(out.training_loss)


def test_save_load_round_trip_restores_variant_and_learned_params(tmp_path):
    data = toy_text()
    model = tiny_bert("softmax", {})
    hf_eot.configure(model, "entmax", layers=[1], alpha=1.5, learn_alpha=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    Trainer(model=model, args=args(tmp_path, learning_rate=3e-2, max_steps=5), train_dataset=data).train()
    plain = model.config.to_dict()
    plain.pop("eot_attention")
    learned = [n for n in before if n not in BertForSequenceClassification(BertConfig(**plain)).state_dict()]
    assert learned, "learn_alpha=True should add a parameter"
    assert any(not torch.equal(before[n], dict(model.named_parameters())[n]) for n in learned), (
        "alpha did not train"
    )

    model.save_pretrained(tmp_path / "ckpt")
    stored = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert set(learned) <= set(stored)
    loaded = BertForSequenceClassification.from_pretrained(tmp_path / "ckpt", attn_implementation="eot")
    assert loaded.config.eot_attention == model.config.eot_attention
    assert loaded.config._attn_implementation == "eot"
    for n, p in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[n], p, msg=n)
    model.eval(), loaded.eval()
    batch = {k: torch.tensor(v) for k, v in data[:4].items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def tiny_t5(encoder: str = "softmax") -> T5ForConditionalGeneration:
    model = tiny.model("t5", "eot", vocab_size=40, d_kv=16, num_heads=2).train()
    hf_eot.configure(model, "softmax")
    if encoder != "softmax":
        hf_eot.configure(model, encoder, part="encoder")
    return model


@pytest.mark.parametrize("encoder", ["softmax", "sinkhorn", "sparsemax"])
def test_t5_trains_and_round_trips(tmp_path, encoder):
    g = torch.Generator().manual_seed(0)
    src = torch.randint(3, 40, (16, 10), generator=g)
    data = datasets.Dataset.from_dict({
        "input_ids": src.tolist(), "attention_mask": torch.ones_like(src).tolist(),
        "labels": torch.cat([src[:, :4], torch.ones(16, 1, dtype=torch.long)], 1).tolist(),  # copy 4 tokens + eos
    })  # fmt: skip
    model = tiny_t5(encoder)
    trainer = Trainer(
        model=model,
        args=args(tmp_path, learning_rate=1e-2, max_steps=10),
        train_dataset=data,
        eval_dataset=data,
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < before
    model.save_pretrained(tmp_path / "t5")
    loaded = T5ForConditionalGeneration.from_pretrained(tmp_path / "t5", attn_implementation="eot")
    assert loaded.config.eot_attention == model.config.eot_attention
    model.eval()
    with torch.no_grad():
        out_a = model.generate(src[:2], max_new_tokens=5, do_sample=False)
        out_b = loaded.generate(src[:2], max_new_tokens=5, do_sample=False)
        out_c = loaded.generate(src[:2], max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(out_a, out_b) and torch.equal(out_b, out_c)


def test_sinkhorn_is_refused_in_the_t5_decoder():
    with pytest.raises(ValueError, match="sinkhorn"):
        hf_eot.configure(tiny_t5(), "sinkhorn", part="decoder")


def test_vit_ot_last_layer_with_template_partners(tmp_path):
    sizes = dict(hidden_size=16, num_attention_heads=2, intermediate_size=32, num_labels=2)
    model = tiny.model("vit", "eot", **sizes)
    config = tiny.config("vit", **sizes)
    hf_eot.configure(model, "ot", layers=[1])
    n_plain = sum(p.numel() for p in ViTForImageClassification(config).parameters())
    assert sum(p.numel() for p in model.parameters()) == n_plain  # same parameter count as the ViT
    pixels = torch.randn(4, 1, 8, 8)
    labels = torch.tensor([0, 1, 0, 1])
    partners = torch.tensor([2, -1, 0, 1])
    model.train()
    out = model(pixel_values=pixels, labels=labels, eot_template_partners=partners)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    model.eval()
    with torch.no_grad():
        own = model(pixel_values=pixels).logits
        shared = model(pixel_values=pixels, eot_template_partners=partners).logits
        none = model(pixel_values=pixels, eot_template_partners=torch.full((4,), -1)).logits
    torch.testing.assert_close(none, own)
    assert not torch.allclose(shared[0], own[0])  # the partner's templates change image 0's output
