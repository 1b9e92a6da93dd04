"""Run one checkpoint under every regularizer and tabulate how each changes the model.

For each regularizer the table reports, on the same sentences: agreement with ``"sdpa"`` (cosine
similarity of the mean-pooled sentence embeddings, and the largest deviation of the hidden states of
real tokens), the sparsity of the attention (share of exact zeros on real keys), the marginal errors of
the attention plans (rows must sum to one; Sinkhorn's columns to one too), and the forward time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .integration.configure import configure

__all__ = ["DEFAULT_SETTINGS", "RegularizerComparison", "compare_regularizers", "format_table"]

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


@torch.no_grad()
def compare_regularizers(
    model_path: str,
    texts: Sequence[str],
    settings: Sequence[tuple[str, str, dict[str, Any]]] = DEFAULT_SETTINGS,
    max_length: int = 128,
) -> list[RegularizerComparison]:
    """Load ``model_path`` (a BERT-like encoder) once per setting and compare it with ``"sdpa"``."""
    from transformers import AutoModel, AutoTokenizer

    if not texts:
        raise ValueError("compare_regularizers needs at least one text")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    real = batch["attention_mask"].bool()  # (B, L)
    reference = AutoModel.from_pretrained(model_path, attn_implementation="sdpa").eval()
    expected = reference(**batch).last_hidden_state
    expected_pooled = _mean_pool(expected, real)

    rows = []
    for label, name, params in settings:
        model = AutoModel.from_pretrained(model_path, attn_implementation="eot").eval()
        configure(model, name, **params)
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
    return [asdict(r) for r in rows]
