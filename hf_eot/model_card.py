"""Hugging Face model cards for models with "eot" attention.

:func:`model_card` renders a README.md: YAML front matter (library_name, tags naming the
regularizers, datasets, metrics, base_model, pipeline_tag), how to load the model with hf_eot,
the attention configuration of every attention module, the training setup and the measured
results. :class:`ModelCardCallback` writes it from a :class:`transformers.Trainer` run into each
checkpoint folder and into the output folder at the end of training.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import PretrainedConfig, TrainerCallback

from .config import CONFIG_KEY, PARTS, EOTAttentionConfig
from .integration.modules import model_parts

__all__ = ["ModelCardCallback", "attention_layout", "model_card"]

_PIPELINE_TAGS = (
    ("ForSequenceClassification", "text-classification"),
    ("ForImageClassification", "image-classification"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("ForMaskedLM", "fill-mask"),
    ("ForCausalLM", "text-generation"),
    ("ForTokenClassification", "token-classification"),
)
_TRAINING_ARGS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "world_size", "weight_decay", "warmup_steps",
    "lr_scheduler_type", "optim", "seed", "bf16", "fp16", "activation_checkpointing", "max_grad_norm",
)  # fmt: skip


def _config_of(model_or_config: Any) -> PretrainedConfig:
    config = getattr(model_or_config, "config", model_or_config)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(
            f"expected a PreTrainedModel or PretrainedConfig, got {type(model_or_config).__name__}"
        )
    return config


def attention_layout(model_or_config: Any) -> list[dict[str, Any]]:
    """One row per group of consecutive layers of a part with the same spec:
    ``{"part", "layers": [first, last], "regularizer", "params"}``."""
    config = _config_of(model_or_config)
    eot = EOTAttentionConfig.from_dict(getattr(config, CONFIG_KEY, None))
    counts = model_parts(model_or_config if isinstance(model_or_config, torch.nn.Module) else config)
    rows: list[dict[str, Any]] = []
    for part in PARTS:
        n = counts.get(part, 0)
        for layer in range(n):
            spec = eot.spec_for(layer, part)
            if (
                rows
                and rows[-1]["part"] == part
                and rows[-1]["spec"] == spec
                and rows[-1]["layers"][1] == layer - 1
            ):
                rows[-1]["layers"][1] = layer
            else:
                rows.append({"part": part, "layers": [layer, layer], "spec": spec})
    return [
        {
            "part": r["part"],
            "layers": r["layers"],
            "regularizer": r["spec"].regularizer,
            "params": dict(r["spec"].params),
        }
        for r in rows
    ]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.4g}"
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, (int, float)) for v in value)
    ):
        mean, half = value
        return f"{mean:.4g} ± {half:.2g}" if not math.isnan(half) else f"{mean:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _results_table(results: Mapping[str, Any]) -> str:
    """A flat mapping gives a metric/value table; a mapping of mappings gives one row per key."""
    if all(isinstance(v, Mapping) for v in results.values()):
        columns: list[str] = []
        for row in results.values():
            columns += [c for c in row if c not in columns]
        lines = ["| run | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for name, row in results.items():
            lines.append(f"| {_fmt(name)} | " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
        return "\n".join(lines)
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {_fmt(k)} | {_fmt(v)} |" for k, v in results.items()]
    return "\n".join(lines)


def _pipeline_tag(config: PretrainedConfig, arch: str | None) -> str | None:
    for name in [arch, *(getattr(config, "architectures", None) or ())]:
        if name is None:
            continue
        for suffix, tag in _PIPELINE_TAGS:
            if name.endswith(suffix):
                return tag
    return None


def model_card(
    model_or_config: Any,
    *,
    results: Mapping[str, Any] | None = None,
    datasets: Iterable[str] = (),
    metrics: Iterable[str] = (),
    base_model: str | None = None,
    training: Mapping[str, Any] | None = None,
    path: str | os.PathLike | None = None,
    title: str | None = None,
    description: str | None = None,
    model_id: str | None = None,
) -> str:
    """Render a Hugging Face model card (README.md) for a model with "eot" attention.

    Args:
        model_or_config: the model or its config (``config.eot_attention`` gives the attention layout).
        results: measured numbers, ``{metric: value}`` or ``{run: {metric: value}}``; a value may be a
            number, a string or a ``(mean, ci_half_width)`` pair.
        datasets, metrics: hub ids / names for the front matter.
        base_model: the model that was fine-tuned (None when trained from scratch).
        training: the training setup, ``{name: value}``.
        path: if given, the card is also written there (a folder gets ``README.md``).
        title, description: optional heading and free text.
        model_id: the hub id or folder in the loading example (default: the folder of ``path``).

    Returns the card as a string.
    """
    config = _config_of(model_or_config)
    layout = attention_layout(config)
    regularizers = sorted({row["regularizer"] for row in layout})
    datasets, metrics = list(datasets), list(metrics)
    if hasattr(model_or_config, "config"):
        arch = type(getattr(model_or_config, "module", model_or_config)).__name__
    else:
        arch = (getattr(config, "architectures", None) or [None])[0]
    target = Path(path) if path is not None else None
    if target is not None and (target.is_dir() or target.suffix == ""):
        target = target / "README.md"
    location = model_id or (str(target.parent) if target is not None else "path/to/checkpoint")

    front: dict[str, Any] = {"library_name": "transformers"}
    tags = ["hf-eot", "attention-regularizer", config.model_type]
    tags += [f"eot-{name}" for name in regularizers]
    front["tags"] = tags
    pipeline_tag = _pipeline_tag(config, arch)
    if pipeline_tag:
        front["pipeline_tag"] = pipeline_tag
    if datasets:
        front["datasets"] = datasets
    if metrics:
        front["metrics"] = metrics
    if base_model:
        front["base_model"] = base_model
    front["license"] = "apache-2.0"

    auto_class = arch or "AutoModel"
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(),
        "---",
        "",
        f"# {title or (arch or config.model_type) + ' with eot attention (' + ', '.join(regularizers) + ')'}",
        "",
    ]
    if description:
        lines += [description.strip(), ""]
    lines += [
        "## How to load",
        "",
        "The attention regularizers are stored in `config.eot_attention`; importing `hf_eot` (`pip install",
        '"hf_eot"`) registers the "eot" attention implementation with Transformers. Without it, Transformers',
        'refuses this checkpoint with `Specified attn_implementation="eot" is not supported`.',
        "",
        "```python",
        "import hf_eot  # registers attn_implementation='eot'",
        f"from transformers import {auto_class}",
        "",
        f'model = {auto_class}.from_pretrained("{location}", attn_implementation="eot")',
        "```",
        "",
        "## Attention configuration",
        "",
        "| part | layers | regularizer | parameters |",
        "|---|---|---|---|",
    ]
    for row in layout:
        first, last = row["layers"]
        layers = str(first) if first == last else f"{first}-{last}"
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items()) or "-"
        lines.append(f"| {row['part']} | {layers} | {row['regularizer']} | {_fmt(params)} |")
    if config.model_type in ("t5", "mt5", "umt5", "longt5"):
        lines += [
            "",
            "T5's relative position bias is the log-prior of every softmax (prior softmax, eq. 17-18 of \"Deciphering Attention Mechanisms: Optimization and Fenchel Dual Solutions\").",
        ]
    eot_dict = getattr(config, CONFIG_KEY, None)
    lines += ["", "`config.eot_attention`:", "", "```json", json.dumps(eot_dict, indent=2), "```", ""]

    n_params = None
    if hasattr(model_or_config, "parameters"):
        n_params = sum(p.numel() for p in model_or_config.parameters())
    lines += ["## Training", ""]
    setup = dict(training or {})
    if n_params is not None:
        setup.setdefault("parameters", f"{n_params:,}")
    if base_model:
        setup.setdefault("base model", base_model)
    if setup:
        lines += ["| setting | value |", "|---|---|"]
        lines += [f"| {_fmt(k)} | {_fmt(v)} |" for k, v in setup.items()]
    else:
        lines.append("Not recorded.")
    lines += ["", "## Results", ""]
    lines.append(_results_table(results) if results else "Not recorded.")
    lines.append("")
    card = "\n".join(lines)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(card, encoding="utf-8")
    return card


class ModelCardCallback(TrainerCallback):
    """Writes README.md (see :func:`model_card`) into each checkpoint and, at the end of training,
    into ``args.output_dir``, on the main process only.

    The card's results are ``results`` (if given) followed by the last evaluation metrics logged
    by the Trainer; its training setup merges ``training`` with the TrainingArguments that matter.
    """

    def __init__(
        self,
        *,
        datasets: Iterable[str] = (),
        metrics: Iterable[str] = (),
        base_model: str | None = None,
        training: Mapping[str, Any] | None = None,
        results: Mapping[str, Any] | None = None,
        title: str | None = None,
        description: str | None = None,
    ):
        self.datasets, self.metrics = list(datasets), list(metrics)
        self.base_model, self.title, self.description = base_model, title, description
        self.training = dict(training or {})
        self.results = dict(results or {})

    def _training(self, args) -> dict[str, Any]:
        out = dict(self.training)
        for name in _TRAINING_ARGS:
            value = getattr(args, name, None)
            if name == "max_steps" and (value is None or value <= 0):
                continue
            if value is not None and value != "" and not (name == "warmup_steps" and not value):
                out.setdefault(name, getattr(value, "value", value))
        return out

    @staticmethod
    def _last_eval(state) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        for entry in state.log_history:
            if any(k.startswith("eval_") for k in entry):
                metrics = {
                    k: v for k, v in entry.items() if k.startswith("eval_") and not k.endswith("_per_second")
                }
                metrics.pop("eval_runtime", None)
        return metrics

    def write(self, folder: str, args, state, model) -> str | None:
        if not state.is_world_process_zero or model is None:
            return None
        model = getattr(model, "module", model)
        training = self._training(args)
        training["steps"] = state.global_step
        results = {**self.results, **self._last_eval(state)}
        return model_card(
            model,
            results=results or None,
            datasets=self.datasets,
            metrics=self.metrics,
            base_model=self.base_model,
            training=training,
            path=folder,
            title=self.title,
            description=self.description,
        )

    def on_save(self, args, state, control, model=None, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            self.write(folder, args, state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        os.makedirs(args.output_dir, exist_ok=True)
        self.write(args.output_dir, args, state, model)
