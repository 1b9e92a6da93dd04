"""Pieces shared by the example scripts: regularizer specs, results files, model cards."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

try:  # run from a checkout without `pip install -e .`
    import hf_eot  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import hf_eot  # noqa: F401

from _stats import format_ci, mean_ci  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_spec(text: str) -> tuple[str, dict[str, Any]]:
    """'entmax:alpha=1.5,learn_alpha=true' -> ("entmax", {"alpha": 1.5, "learn_alpha": True})."""
    name, _, rest = text.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"bad regularizer parameter {item!r} in {text!r}: expected key=value")
        params[key.strip()] = parse_value(value.strip())
    return name.strip(), params


def spec_label(text: str) -> str:
    """A file-name-safe label for a spec string."""
    return text.replace(":", "-").replace(",", "-").replace("=", "")


def attn_implementation() -> str:
    """The attention implementation the examples load models with."""
    return hf_eot.ATTN_IMPLEMENTATION


def configure(model, spec: str, **kwargs):
    """Apply a regularizer spec string (``name[:key=value,...]``) to a model with ``hf_eot.configure``."""
    name, params = parse_spec(spec)
    return hf_eot.configure(model, name, **kwargs, **params)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def write_json(path: str | os.PathLike, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def summarize(runs: list[dict], group: str, metric: str) -> dict[str, dict[str, Any]]:
    """{group value: {"mean", "ci95", "n", "values", "text"}} of ``metric`` over the runs of each group."""
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r[group] for r in runs):
        values = [r[metric] for r in runs if r[group] == name]
        mean, half = mean_ci(values)
        out[name] = {
            "mean": mean,
            "ci95": half,
            "n": len(values),
            "values": values,
            "text": format_ci(values),
        }
    return out


def num_threads_note() -> str:
    import torch

    return f"torch {torch.__version__}, {torch.get_num_threads()} threads"


def previous_runs(output_dir: str | os.PathLike, resume: bool) -> list[dict]:
    """The runs of an earlier invocation (``<output_dir>/results.json``) when resuming, else []."""
    path = Path(output_dir) / "results.json"
    if not resume or not path.is_file():
        return []
    return list(json.loads(path.read_text(encoding="utf-8")).get("runs", []))


def training_arguments(cls, args, output_dir, seed: int, **settings):
    """The ``TrainingArguments`` (or ``Seq2SeqTrainingArguments``) the examples share, plus ``settings``.

    ``--batch-size`` is the global batch: it is split over the processes of ``accelerate launch``
    (``use_cpu=True`` on a machine without GPUs makes them gloo processes).  The examples' losses are plain
    means that ignore ``num_items_in_batch``; with ``average_tokens_across_devices=True`` (the default)
    Transformers' Trainer multiplies them by the number of processes, so N processes would train on an
    N-times loss.
    """
    import torch

    targs = cls(
        output_dir=str(output_dir),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        seed=seed,
        data_seed=seed,
        bf16=args.bf16,
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        average_tokens_across_devices=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **settings,
    )
    targs.per_device_train_batch_size = max(1, args.batch_size // targs.world_size)
    return targs
