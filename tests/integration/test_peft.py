"""Learned attention parameters with PEFT adapters: the supported route (``modules_to_save=["eot_parameters"]``
on a configured base, reloaded onto a base configured the same way) trains, saves and restores the learned
alpha; freezing it while training warns."""

from __future__ import annotations

import warnings
from pathlib import Path

import _tiny as tiny
import pytest
import torch
from safetensors.torch import load_file
from transformers import BertForSequenceClassification

import hf_eot

peft = pytest.importorskip("peft")

# PEFT calls a Transformers method that Transformers deprecates; that drift is PEFT's, not ours
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

# large initial weights: peaked attention, so that softmax and entmax give visibly different outputs
SIZES = {"num_labels": 2, "initializer_range": 0.5}
SPEC = {"regularizer": "entmax", "alpha": 1.3, "learn_alpha": True}


def _configured_base(path: Path | None = None) -> BertForSequenceClassification:
    """A tiny BERT classifier with learned entmax alpha; from ``path`` when given (a base checkpoint)."""
    if path is None:
        model = tiny.model("bert", cls=BertForSequenceClassification, **SIZES)
    else:
        model = BertForSequenceClassification.from_pretrained(path, attn_implementation="eot")
    return hf_eot.configure(model, **SPEC)


def _lora(**kwargs) -> peft.LoraConfig:
    return peft.LoraConfig(target_modules=["query", "value"], r=2, **kwargs)


def _train_step(model: torch.nn.Module) -> None:
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(**tiny.inputs("bert"), labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()


def _hidden(model: torch.nn.Module) -> torch.Tensor:
    """The last hidden states (the logits of a tiny random classifier barely depend on attention)."""
    with torch.no_grad():
        return model(**tiny.inputs("bert"), output_hidden_states=True).hidden_states[-1]


def _alphas(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("alpha_logit") and p.requires_grad}


def test_modules_to_save_trains_saves_and_restores_learned_alpha(tmp_path: Path) -> None:
    """With modules_to_save=["eot_parameters"], the learned alpha trains, is stored in the adapter, and an
    adapter loaded onto a base configured the same way reproduces the trained model's outputs."""
    _configured_base().save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(_configured_base(tmp_path / "base"), _lora(modules_to_save=["eot_parameters"]))
    before = _alphas(model)
    assert len(before) == 2  # one trainable copy per layer
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _train_step(model)
    after = _alphas(model)
    assert all(not torch.equal(before[n], after[n]) for n in before), "alpha did not train"
    model.save_pretrained(tmp_path / "adapter")
    stored = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert sum("eot_parameters" in key for key in stored) == 2

    model.eval()
    expected = _hidden(model)
    reloaded = peft.PeftModel.from_pretrained(_configured_base(tmp_path / "base"), tmp_path / "adapter")
    torch.testing.assert_close(_hidden(reloaded.eval()), expected)
    # the base must be configured: the same adapter on an unconfigured base runs softmax
    plain = tiny.model("bert", cls=BertForSequenceClassification, **SIZES)
    plain.load_state_dict(reloaded.get_base_model().state_dict(), strict=False)
    unconfigured = peft.PeftModel.from_pretrained(plain, tmp_path / "adapter")
    assert not torch.allclose(_hidden(unconfigured.eval()), expected, atol=1e-3)


def test_configuring_the_config_before_loading_restores_the_adapter(tmp_path: Path) -> None:
    """Reloading from a plain base checkpoint: configure its config, load the base with it (it runs "eot"
    and gets the learned parameters), then the adapter's trained alpha is restored."""
    tiny.model("bert", "sdpa", cls=BertForSequenceClassification, **SIZES).save_pretrained(tmp_path / "plain")
    base = hf_eot.configure(
        BertForSequenceClassification.from_pretrained(tmp_path / "plain", attn_implementation="eot"), **SPEC
    )
    model = peft.get_peft_model(base, _lora(modules_to_save=["eot_parameters"]))
    _train_step(model)
    model.save_pretrained(tmp_path / "adapter")
    model.eval()

    config = hf_eot.configure(BertForSequenceClassification.config_class.from_pretrained(tmp_path / "plain"), **SPEC)
    reloaded = peft.PeftModel.from_pretrained(
        BertForSequenceClassification.from_pretrained(tmp_path / "plain", config=config), tmp_path / "adapter"
    )
    assert reloaded.config._attn_implementation == "eot"
    torch.testing.assert_close(_hidden(reloaded.eval()), _hidden(model))


def test_frozen_learned_alpha_warns_once_when_training() -> None:
    """get_peft_model without modules_to_save freezes the learned alpha: the first training forward warns
    (naming modules_to_save), later ones stay quiet, and alpha does not change."""
    model = peft.get_peft_model(_configured_base(), _lora())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("alpha_logit")}
    assert frozen and not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("alpha_logit"))
    with pytest.warns(UserWarning, match=r"frozen.*modules_to_save=\['eot_parameters'\]") as record:
        _train_step(model)
    assert len([w for w in record if "frozen" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _train_step(model)
        model.eval()
        with torch.no_grad():
            model(**tiny.inputs("bert"))
    for name, value in frozen.items():
        torch.testing.assert_close(dict(model.named_parameters())[name], value)
