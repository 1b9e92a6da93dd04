"""Run one checkpoint under every regularizer and tabulate how each changes the model.

For each regularizer the table reports, on the same sentences: agreement with ``"sdpa"`` (cosine
similarity of the mean-pooled sentence embeddings, and the largest deviation of the hidden states of
real tokens), the sparsity of the attention (share of exact zeros on real keys), the marginal errors of
the attention plans (rows must sum to one; Sinkhorn's columns to one too), and the forward time.
The model must be an encoder-only text model (BERT-like): encoder-decoders, causal decoders and image
models are refused with :class:`ComparisonError` before any regularizer runs.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .config import AttentionSpec
from .integration.configure import configure

__all__ = [
    "DEFAULT_SETTINGS",
    "ComparisonError",
    "RegularizerComparison",
    "as_records",
    "compare_regularizers",
    "format_table",
    "settings_from_strings",
]


class ComparisonError(ValueError):
    """The model cannot be compared (not an encoder-only text model, or no usable tokenizer)."""

#: (label, regularizer, params) compared by default.
DEFAULT_SETTINGS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("softmax", "softmax", {}),
    ("softmax eps=2", "softmax", {"epsilon": 2.0}),
    ("softmax+alibi", "softmax", {"prior": "alibi"}),
    ("sparsemax", "sparsemax", {}),
    ("entmax 1.5", "entmax", {}),
    ("entmax 1.25", "entmax", {"alpha": 1.25}),
    ("sinkhorn", "sinkhorn", {}),
    ("ot", "ot", {}),
)


def settings_from_strings(specs: Sequence[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """``["sparsemax", "sinkhorn:n_iters=20"]`` -> settings labelled by their spec strings, each validated
    (:meth:`hf_eot.config.AttentionSpec.from_string`) before any model is loaded."""
    settings = []
    for text in specs:
        try:
            spec = AttentionSpec.from_string(text)
        except ValueError as e:
            raise ComparisonError(f"bad regularizer spec {text!r}: {e}") from e
        settings.append((text, spec.regularizer, dict(spec.params)))
    return settings


@dataclass
class RegularizerComparison:
    label: str
    regularizer: str
    cosine_to_sdpa: float
    max_abs_deviation: float
    sparsity: float
    row_error: float
    column_error: float
    seconds: float


def _check_encoder_only(model_path: str) -> None:
    """Refuses encoder-decoder, image and causal models before any weights are loaded (the causal
    check builds the model on the meta device and reads its attention modules' ``is_causal``)."""
    from transformers import AutoConfig, AutoModel

    from .analysis.inputs import auto_model_class, read_model_config

    config = read_model_config(Path(model_path))
    model_type = config.get("model_type")
    cls = auto_model_class(config)
    if config.get("is_encoder_decoder") or (
        cls is not None and "decoder_input_ids" in inspect.signature(cls.forward).parameters
    ):
        raise ComparisonError(
            f"{model_path} is an encoder-decoder model ({model_type}); compare runs encoder-only text "
            "models such as BERT (hf-eot analyze handles T5)"
        )
    if cls is not None and getattr(cls, "main_input_name", "input_ids") != "input_ids":
        raise ComparisonError(
            f"{model_path} is not a text model ({model_type} reads {cls.main_input_name}); compare runs "
            "encoder-only text models such as BERT"
        )
    try:
        with torch.device("meta"):
            skeleton = AutoModel.from_config(AutoConfig.from_pretrained(model_path))
    except (OSError, ValueError, KeyError) as e:
        raise ComparisonError(f"{model_path}: cannot build the model from its config ({e})") from e
    if getattr(skeleton.config, "is_decoder", False) or any(
        getattr(m, "is_causal", False) is True for m in skeleton.modules()
    ):
        raise ComparisonError(
            f"{model_path} has causal (decoder) attention ({model_type}); compare runs encoder-only "
            "text models such as BERT"
        )


@torch.no_grad()
def compare_regularizers(
    model_path: str,
    texts: Sequence[str],
    settings: Sequence[tuple[str, str, dict[str, Any]]] = DEFAULT_SETTINGS,
    max_length: int = 128,
    *,
    progress: bool = False,
    desc: str | None = None,
) -> list[RegularizerComparison]:
    """Load ``model_path`` (a BERT-like encoder) once per setting and compare it with ``"sdpa"``.

    ``progress`` shows a progress bar over the settings (on stderr, labelled ``desc``); Transformers'
    own loading bars are silenced meanwhile (the model is loaded once per setting)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _compare(model_path, texts, settings, max_length, progress, desc)
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _compare(
    model_path: str,
    texts: Sequence[str],
    settings: Sequence[tuple[str, str, dict[str, Any]]],
    max_length: int,
    progress: bool,
    desc: str | None,
) -> list[RegularizerComparison]:
    from tqdm.auto import tqdm
    from transformers import AutoModel

    from .analysis.inputs import check_vocabulary, load_tokenizer

    if not texts:
        raise ValueError("compare_regularizers needs at least one text")
    _check_encoder_only(model_path)
    tokenizer = load_tokenizer(Path(model_path))
    if tokenizer.pad_token is None and len(texts) > 1:
        raise ComparisonError(f"{model_path}: the tokenizer has no padding token, needed to batch the texts")
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    check_vocabulary(tokenizer, batch["input_ids"].tolist(), Path(model_path))
    real = batch["attention_mask"].bool()  # (B, L)
    reference = AutoModel.from_pretrained(model_path, attn_implementation="sdpa").eval()
    expected = reference(**batch).last_hidden_state
    expected_pooled = _mean_pool(expected, real)

    rows = []
    for label, name, params in tqdm(settings, desc=desc or "compare", disable=not progress, leave=False):
        model = AutoModel.from_pretrained(model_path, attn_implementation="eot").eval()
        try:
            configure(model, name, **params)
        except ValueError as e:
            raise ComparisonError(f"{model_path}: cannot run {label!r}: {e}") from e
        start = time.perf_counter()
        out = model(**batch, output_attentions=True)
        seconds = time.perf_counter() - start
        hidden = out.last_hidden_state
        cosine = torch.nn.functional.cosine_similarity(_mean_pool(hidden, real), expected_pooled, dim=-1)
        deviation = (hidden - expected).abs().amax(-1).masked_select(real).max()
        weights = torch.stack(out.attentions)  # (layers, B, H, L, L)
        key_ok = real[None, :, None, None, :]
        query_ok = real[None, :, None, :]
        zeros = ((weights == 0) & key_ok).sum() / key_ok.expand_as(weights).sum()
        row_error = (weights.sum(-1) - 1).abs().masked_select(query_ok.expand(weights.shape[:-1])).max()
        column_sums = (weights * query_ok[..., None]).sum(-2)
        # self-attention: as many real queries as real keys, so Sinkhorn's column target is 1
        column_error = ((column_sums - 1).abs() * key_ok[..., 0, :]).amax()
        rows.append(
            RegularizerComparison(
                label,
                name,
                float(cosine.mean()),
                float(deviation),
                float(zeros),
                float(row_error),
                float(column_error),
                seconds,
            )
        )
    return rows


def _mean_pool(hidden: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    weights = real.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(1) / weights.sum(1)


def format_table(rows: Sequence[RegularizerComparison]) -> str:
    """A Markdown table of the comparison."""
    header = "| setting | cos(emb, sdpa) | max dev | sparsity | row err | col err | time (s) |"
    lines = [header, "|" + "---|" * 7]
    for r in rows:
        lines.append(
            f"| {r.label} | {r.cosine_to_sdpa:.4f} | {r.max_abs_deviation:.3g} | {r.sparsity:.1%} | "
            f"{r.row_error:.1e} | {r.column_error:.1e} | {r.seconds:.2f} |"
        )
    return "\n".join(lines)


def as_records(rows: Sequence[RegularizerComparison]) -> list[dict[str, Any]]:
    """The rows as plain dicts (for JSON)."""
    return [asdict(r) for r in rows]
