"""A configured model comes back as configured: ``save_pretrained`` records ``attn_implementation="eot"``,
a plain ``from_pretrained(path)`` runs it (learned alpha included), other implementations are loud, and
``configure`` refuses a model that does not run "eot"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import _tiny as tiny
import pytest
import torch
from transformers import AutoModel

import hf_eot


def _trained_entmax(path: Path) -> torch.nn.Module:
    """A tiny BERT with learned entmax alpha moved away from its initial value, saved to ``path``."""
    model = hf_eot.configure(tiny.model("bert"), "entmax", alpha=1.3, learn_alpha=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("alpha_logit"):
                param.add_(torch.linspace(-2.0, 2.0, param.numel()))
    model.save_pretrained(path)
    return model


def _hidden(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny.inputs("bert")).last_hidden_state


def test_plain_from_pretrained_runs_the_saved_attention(tmp_path: Path) -> None:
    """config.json says attn_implementation="eot"; from_pretrained(path) without the argument runs "eot"
    with the learned alpha (same outputs as the saved model), and so does a second save/load cycle."""
    model = _trained_entmax(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["attn_implementation"] == "eot"
    assert not [key for key in saved if key.startswith("_eot")]  # no bookkeeping of hf_eot in the file
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = AutoModel.from_pretrained(tmp_path / "a")
    assert loaded.config._attn_implementation == "eot"
    torch.testing.assert_close(_hidden(loaded), _hidden(model))
    loaded.save_pretrained(tmp_path / "b")
    resaved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert resaved["attn_implementation"] == "eot" and not [key for key in resaved if key.startswith("_eot")]
    again = AutoModel.from_pretrained(tmp_path / "b")
    assert again.config._attn_implementation == "eot"
    torch.testing.assert_close(_hidden(again), _hidden(model))


def test_another_implementation_warns_at_load_and_points_at_the_caller(tmp_path: Path) -> None:
    """An explicit attn_implementation="sdpa" still wins, with a warning naming the fix and pointing at the
    caller; so does a checkpoint saved before attn_implementation was recorded."""
    _trained_entmax(tmp_path / "a")
    message = r"selects \['entmax'\].*attn_implementation='sdpa'.*attn_implementation='eot'"
    with pytest.warns(UserWarning, match=message) as record:
        loaded = AutoModel.from_pretrained(tmp_path / "a", attn_implementation="sdpa")
    assert loaded.config._attn_implementation == "sdpa"
    assert record[0].filename == __file__
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    del config["attn_implementation"]
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="model.set_attn_implementation"):
        AutoModel.from_pretrained(tmp_path / "a")


def test_plain_softmax_config_loads_without_a_warning(tmp_path: Path) -> None:
    """A config whose eot_attention is plain softmax (epsilon 1) means exactly "sdpa": no warning."""
    hf_eot.configure(tiny.model("bert"), "softmax").save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AutoModel.from_pretrained(tmp_path, attn_implementation="sdpa")


def test_configure_refuses_a_model_that_does_not_run_eot() -> None:
    """configure on an "sdpa" model raises a ValueError naming the fix and leaves the config untouched;
    after set_attn_implementation("eot") it works."""
    model = tiny.model("bert", "sdpa")
    with pytest.raises(ValueError, match=r"runs attn_implementation='sdpa'.*set_attn_implementation\('eot'\)"):
        hf_eot.configure(model, "sparsemax")
    assert getattr(model.config, "eot_attention", None) is None
    model.set_attn_implementation("eot")
    hf_eot.configure(model, "sparsemax")
    assert model.config.eot_attention["default"]["regularizer"] == "sparsemax"


def test_configured_config_builds_an_eot_model() -> None:
    """configure on a config makes the models built from it run "eot" (an explicit choice still wins)."""
    config = hf_eot.configure(tiny.config("bert"), "sparsemax")
    assert AutoModel.from_config(config).config._attn_implementation == "eot"
    assert AutoModel.from_config(config, attn_implementation="eager").config._attn_implementation == "eager"


@pytest.mark.slow  # a fresh interpreter imports torch and Transformers
def test_without_hf_eot_loading_fails_loudly_instead_of_running_softmax(tmp_path: Path) -> None:
    """In a process that never imports hf_eot, from_pretrained on a configured checkpoint raises (naming
    attn_implementation "eot") instead of silently running softmax."""
    _trained_entmax(tmp_path / "a")
    script = (
        "import sys\n"
        "from transformers import AutoModel\n"
        "try:\n"
        f"    AutoModel.from_pretrained({str(tmp_path / 'a')!r})\n"
        "except ValueError as error:\n"
        "    assert 'hf_eot' not in sys.modules\n"
        "    print(error)\n"
        "    sys.exit(0)\n"
        "sys.exit('loaded without hf_eot')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    assert 'attn_implementation="eot"' in proc.stdout


def test_configuring_the_config_of_a_live_model_does_not_switch_it() -> None:
    """configure on the config of a model that already runs "sdpa" records the choice (saved with
    attn_implementation="eot") but leaves the running model alone."""
    model = tiny.model("bert", "sdpa")
    hf_eot.configure(model.config, "sparsemax")
    assert model.config._attn_implementation == "sdpa"
    assert model.config.to_dict()["attn_implementation"] == "eot"
