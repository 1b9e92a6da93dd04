"""Pieces shared by the example scripts: regularizer specs, tensor datasets, threads, results files."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

try:  # run from a checkout without `pip install -e .`
    import hf_eot  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import hf_eot  # noqa: F401

from _stats import format_ci, mean_ci  # noqa: E402

from hf_eot.config import CONFIG_KEY, split_spec_string  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
#: The folder of the packaged demonstration checkpoints (``--save-dir`` of the documented commands).
CHECKPOINTS_DIR = REPO_ROOT / "hf_eot" / "data" / "checkpoints"


def checkpoint_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """``<root>/<name>``, with ``root`` the committed checkpoints folder by default."""
    return Path(root if root is not None else CHECKPOINTS_DIR) / name


def parse_spec(text: str) -> tuple[str, dict[str, Any]]:
    """'entmax:alpha=1.5,learn_alpha=true' -> ("entmax", {"alpha": 1.5, "learn_alpha": True}) (hf_eot's
    spec-string syntax, :func:`hf_eot.config.split_spec_string`)."""
    return split_spec_string(text)


def spec_label(text: str) -> str:
    """A file-name-safe label for a spec string."""
    return text.replace(":", "-").replace(",", "-").replace(";", "-").replace("=", "")


def learns_attention(spec: str) -> bool:
    """Whether a spec makes the model learn attention parameters (``hf_eot``'s ``required_layout``: e.g.
    ``entmax:learn_alpha=true``, or a learned relative-bucket prior)."""
    from hf_eot.config import AttentionSpec
    from hf_eot.integration.parameters import required_layout

    return bool(required_layout(AttentionSpec(*parse_spec(spec))))


def attention_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The learned attention parameters hf_eot added to a model (entmax alpha, relative-position buckets)."""
    from hf_eot.integration.parameters import EOTAttentionParameters

    return [p for m in model.modules() if isinstance(m, EOTAttentionParameters) for p in m.parameters()]


def with_attention_lr(trainer_cls: type, attention_lr: float | None) -> type:
    """``trainer_cls`` whose optimizer trains the learned attention parameters (:func:`attention_parameters`)
    at their own learning rate ``attention_lr`` (None: ``trainer_cls`` itself, one learning rate).  Each
    parameter group of the Trainer's optimizer is split in two; the scheduler then scales both rates."""
    if attention_lr is None:
        return trainer_cls

    class AttentionLrTrainer(trainer_cls):
        def create_optimizer(self, *args, **kwargs):
            optimizer = super().create_optimizer(*args, **kwargs)
            own = {id(p) for p in attention_parameters(self.model)}
            groups = [
                {**group, "params": params, **({"lr": attention_lr} if attention else {})}
                for group in optimizer.param_groups
                for attention in (False, True)
                if (params := [p for p in group["params"] if (id(p) in own) == attention])
            ]
            optimizer.param_groups.clear()
            for group in groups:
                optimizer.add_param_group(group)
            return optimizer

    return AttentionLrTrainer


def attn_implementation() -> str:
    """The attention implementation the examples load models with."""
    return hf_eot.ATTN_IMPLEMENTATION


def configure(model, spec: str, **kwargs):
    """Apply a regularizer spec string (``name[:key=value,...]``) to a model with ``hf_eot.configure``."""
    name, params = parse_spec(spec)
    return hf_eot.configure(model, name, **kwargs, **params)


def end_processes() -> None:
    """Under ``accelerate launch`` (or ``torchrun``): wait for every process and close their process group;
    gloo's threads still running at interpreter exit can abort a process (SIGABRT) after its results are
    written.  Nothing to do in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as JSON through a temporary file, so that another process never reads half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(partial, path)


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


def paired_difference(
    runs: list[dict], a: str, b: str, metric: str = "accuracy", group: str = "variant"
) -> dict | None:
    """``metric`` of the runs whose ``group`` is ``a`` minus those whose ``group`` is ``b``, over the seeds
    both ran (same seed: same data order and initial weights up to the attention): mean and 95% t-interval
    of the differences; None without common seeds."""
    acc = {(r[group], r["seed"]): r[metric] for r in runs}
    seeds = sorted(s for v, s in acc if v == a and (b, s) in acc)
    if not seeds:
        return None
    diffs = [acc[a, s] - acc[b, s] for s in seeds]
    mean, half = mean_ci(diffs)
    return {"seeds": seeds, "values": diffs, "mean": mean, "ci95": half, "text": format_ci(diffs, 4)}


def paired_differences_to(
    runs: list[dict], names, baseline: str, metric: str = "accuracy", group: str = "variant"
) -> dict[str, dict]:
    """:func:`paired_difference` of every name in ``names`` but ``baseline`` against ``baseline`` (those with
    a seed in common)."""
    return {
        name: paired for name in names if name != baseline
        if (paired := paired_difference(runs, name, baseline, metric, group)) is not None
    }  # fmt: skip


def cpu_name() -> str:
    """The processor's model name (Linux), or the platform's guess: run times only compare on one CPU."""
    try:
        with open("/proc/cpuinfo") as info:
            names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else (platform.processor() or platform.machine() or "unknown")


def num_threads_note() -> str:
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}"


def add_resume_arguments(parser, pair: str) -> None:
    """``--resume`` and ``--runs-from``: keep finished runs, keyed by ``pair`` (e.g. "(variant, seed)")."""
    parser.add_argument(
        "--resume",
        action="store_true",
        help=f"keep the runs of <output-dir>/results.json and skip those {pair} pairs",
    )
    parser.add_argument(
        "--save-steps",
        type=int,
        default=0,
        metavar="N",
        help="save a Trainer checkpoint of each run every N steps (the last one kept, in the run's folder "
        "under --output-dir); with --resume, a run without results continues from its last checkpoint",
    )
    parser.add_argument(
        "--runs-from",
        nargs="+",
        default=[],
        metavar="DIR",
        help=f"also keep the runs of DIR/results.json and skip those {pair} pairs: seeds or variants run by "
        "other processes (one output dir each), summarised together here",
    )


#: Arguments that may differ between the processes whose runs are summarised together: which runs each
#: made, where it wrote, how it ran.  Any other difference means another protocol, and is refused.
PER_PROCESS_ARGUMENTS = frozenset({
    "seeds", "variants", "regularizers", "output_dir", "resume", "runs_from", "save_dir", "save_model",
    "model_cards_dir", "threads", "logging_steps", "eval_batch_size", "data_dir", "save_steps",
})  # fmt: skip


def kept_results_files(args: argparse.Namespace) -> list[Path]:
    """The ``results.json`` files whose runs are kept: ``<args.output_dir>``'s with ``--resume`` (if it
    exists yet), then every ``--runs-from`` folder's (each must exist); each file once."""
    paths = [Path(args.output_dir) / "results.json"] if args.resume else []
    for folder in args.runs_from:
        path = Path(folder) / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"--runs-from {folder}: no results.json there")
        paths.append(path)
    return [p for p in dict.fromkeys(p.resolve() for p in paths) if p.is_file()]


def previous_runs(
    args: argparse.Namespace, key: tuple[str, ...] = ("variant", "seed")
) -> list[dict]:
    """The runs to keep: those of ``<args.output_dir>/results.json`` with ``--resume``, and those of every
    ``<dir>/results.json`` of ``--runs-from`` (each must exist).

    A folder made with other settings than ``args`` (apart from :data:`PER_PROCESS_ARGUMENTS`) is refused,
    as is a ``key`` pair whose runs differ between files; the same run found twice (e.g. copied into
    this output dir by an earlier summary) is kept once.
    """
    current = json.loads(json.dumps(vars(args), default=str))  # as a results file records them
    runs: dict[tuple, dict] = {}
    source: dict[tuple, Path] = {}
    for path in kept_results_files(args):
        saved = json.loads(path.read_text(encoding="utf-8"))
        recorded = saved.get("args", {})
        differ = sorted(
            name for name in recorded.keys() & current.keys() - PER_PROCESS_ARGUMENTS
            if recorded[name] != current[name]
        )  # fmt: skip
        if differ:
            details = ", ".join(f"{n}={recorded[n]!r} there, {current[n]!r} here" for n in differ)
            raise ValueError(f"{path} holds runs of other settings ({details}); summarise like with like")
        for run in saved.get("runs", []):
            k = tuple(run[name] for name in key)
            if k in runs and runs[k] != run:
                run_id = dict(zip(key, k, strict=True))
                raise ValueError(f"run {run_id} differs between {source[k]} and {path}; keep one of them")
            runs.setdefault(k, run)
            source.setdefault(k, path)
    return list(runs.values())


def last_checkpoint(args, output_dir) -> str | None:
    """With ``--resume``, the last Trainer checkpoint (``checkpoint-<step>``, from ``--save-steps``) in a run's
    folder, to continue that unfinished run from; else None (the run starts over)."""
    if not getattr(args, "resume", False) or not Path(output_dir).is_dir():
        return None
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(output_dir))


def load_checkpoint_weights(model: torch.nn.Module, checkpoint: str | os.PathLike) -> None:
    """Load a Trainer checkpoint's weights into ``model`` as ``from_pretrained`` reads them, or raise.

    Transformers 5 saves models whose modules were renamed (ViT among them) under their original key
    names, and only ``from_pretrained`` converts them back: ``Trainer.train(resume_from_checkpoint=...)``
    loads the file with ``load_state_dict(strict=False)``, so a resumed ViT kept its random encoder
    layers with a logged warning (transformers issue #43701).  Here every key must match (a missing,
    unexpected or mismatched one raises), the weights keep the model's dtype, and the checkpoint's
    attention config (``eot_attention``) must be the model's: a run resumed from another run's folder
    fails instead of continuing with the wrong weights."""
    folder = Path(checkpoint)
    config_file = folder / "config.json"
    weights = [*folder.glob("model*.safetensors"), *folder.glob("pytorch_model*.bin")]
    if not config_file.is_file() or not weights:
        raise RuntimeError(f"checkpoint {str(folder)!r} has no config.json and weights (an interrupted save?)")
    saved = json.loads(config_file.read_text(encoding="utf-8")).get(CONFIG_KEY)
    current = json.loads(json.dumps(model.config.to_dict().get(CONFIG_KEY)))  # as saved: lists, not tuples
    if saved != current:
        raise RuntimeError(
            f"checkpoint {str(folder)!r} was saved with {CONFIG_KEY}={saved!r}, "
            f"but the model has {current!r}"
        )
    config = model.config
    try:
        reloaded, info = type(model).from_pretrained(
            folder,
            config=config,
            attn_implementation=config._attn_implementation,
            dtype=next(model.parameters()).dtype,
            output_loading_info=True,
        )
    except (OSError, RuntimeError, ValueError) as e:
        raise RuntimeError(f"checkpoint {str(folder)!r} does not match the model: {e}") from e
    bad = {kind: keys for kind, keys in info.items() if kind != "error_msgs" and keys}
    if bad or info.get("error_msgs"):
        problems = bad or info["error_msgs"]
        raise RuntimeError(f"checkpoint {str(folder)!r} does not match the model: {problems}")
    model.load_state_dict(reloaded.state_dict(), strict=True)


def train(trainer, args):
    """``trainer.train()``, continued from the run's last checkpoint with ``--resume`` (see
    :func:`last_checkpoint`): ``(TrainOutput, seconds this process trained, the step it resumed from or
    None)``.  A resumed run restores the model, optimizer, scheduler, RNG states and the data order; the
    collators' own random draws (e.g. OT-ViT's template partners) restart from their seed."""
    checkpoint = last_checkpoint(args, trainer.args.output_dir)
    if checkpoint is not None:
        load_checkpoint_weights(trainer.model, checkpoint)
        # Trainer's own load would then overwrite the keys it can match with the same values and warn
        # about the ones it cannot (see load_checkpoint_weights): skip it.
        trainer._load_from_checkpoint = lambda *args, **kwargs: None
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - start
    resumed = None if checkpoint is None else int(Path(checkpoint).name.rsplit("-", 1)[-1])
    # evaluations during training (--eval-each-epoch) are not training time
    seconds -= sum(e["runtime"] for e in logged_evaluations(trainer) if e["step"] > (resumed or 0))
    return output, seconds, resumed


def training_record(trainer, train_output, train_seconds: float, resumed: int | None) -> dict:
    """The fields every example's per-run record shares: how training went and what it cost, from
    :func:`train`'s ``(TrainOutput, seconds, resumed step)``."""
    return {
        "train_loss": train_output.training_loss,
        "train_seconds": train_seconds,
        "cpu": cpu_name(),  # train_seconds compare on one CPU only
        "resumed_from_step": resumed,
        "steps_per_second": trainer.state.global_step / train_seconds,
        "attn_implementation": attn_implementation(),
        "steps": trainer.state.global_step,
    }


def logged_evaluations(trainer) -> list[dict]:
    """The evaluations Trainer ran while training (``--eval-each-epoch``), from its log history, a resumed
    run's earlier ones included: ``{"epoch", "step", "loss", "accuracy", "runtime", ...}`` (the metrics
    without their ``eval_`` prefix)."""
    return [
        {"epoch": entry["epoch"], "step": entry["step"]}
        | {name.removeprefix("eval_"): value for name, value in entry.items() if name.startswith("eval_")}
        for entry in trainer.state.log_history
        if "eval_loss" in entry
    ]


def training_arguments(cls, args, output_dir, seed: int, **settings):
    """The ``TrainingArguments`` (or ``Seq2SeqTrainingArguments``) the examples share, plus ``settings``.

    ``--batch-size`` is the global batch: it is split over the processes of ``accelerate launch``
    (``use_cpu=True`` on a machine without GPUs makes them gloo processes).  The examples' losses are plain
    means that ignore ``num_items_in_batch``; with ``average_tokens_across_devices=True`` (the default)
    Transformers' Trainer multiplies them by the number of processes, so N processes would train on an
    N-times loss.  The datasets are :class:`TensorDataset` s (``remove_unused_columns=False``: their
    collator gets whole batches, not rows).
    """
    settings = {"remove_unused_columns": False, "logging_steps": 50} | settings
    if getattr(args, "eval_each_epoch", False):
        settings |= {"eval_strategy": "epoch"}
    save_steps = getattr(args, "save_steps", 0)
    if save_steps:
        settings |= {"save_strategy": "steps", "save_steps": save_steps, "save_total_limit": 1}
    targs = cls(
        output_dir=str(output_dir),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        seed=seed,
        data_seed=seed,
        bf16=args.bf16,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        average_tokens_across_devices=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **({"save_strategy": "no", "eval_strategy": "no"} | settings),
    )
    targs.per_device_train_batch_size = max(1, args.batch_size // targs.world_size)
    return targs


# --------------------------------------------------------------------------------------------
# Throughput: threads, tensor datasets, a collator that only slices
# --------------------------------------------------------------------------------------------
def add_runtime_arguments(parser) -> None:
    """``--threads`` and ``--quick``, shared by the example scripts."""
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: OpenMP threads spin-waiting on a busy CPU can slow a step "
        "down tenfold; use more cores with more processes, e.g. accelerate launch; 0 = torch's default)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run of the protocol in seconds (tiny data and model)"
    )


def parse_with_quick(parser, argv, quick: Mapping[str, Any]):
    """Parse ``argv``; with ``--quick``, the settings in ``quick`` replace those left at their defaults
    (an option given on the command line wins)."""
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in quick.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    return args


def set_threads(n: int) -> None:
    """``torch.set_num_threads(n)`` for n >= 1; 0 keeps torch's default.  Also keeps freed memory
    (:func:`keep_freed_memory`): every Trainer step allocates the same temporaries again."""
    if n < 0:
        raise ValueError(f"threads must be >= 0 (0 = torch's default), got {n!r}")
    if n:
        torch.set_num_threads(n)
    keep_freed_memory()


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse (``mallopt``); False where that is not possible.

    By default glibc hands large freed blocks back to the kernel (``munmap``, or trimming the heap top),
    so a training loop that allocates the same activations every step page-faults them in again, each
    page zeroed by the kernel (``perf record -g -p <pid>`` on the OT-ViT example: ``clear_page`` and
    ``exc_page_fault`` at a fifth of the samples).  Blocks up to glibc's largest mmap threshold (32 MiB on
    64-bit) then come from the heap, and up to 1 GiB of free heap top is kept instead of trimmed.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    largest_mmap_threshold = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)  # glibc's HEAP_MAX_SIZE / 2
    settings = ((m_mmap_threshold, largest_mmap_threshold), (m_trim_threshold, 1 << 30), (m_top_pad, 64 << 20))
    return all([mallopt(option, value) == 1 for option, value in settings])  # a list: set every option


class TensorDataset(torch.utils.data.Dataset):
    """Columns held as tensors with a leading example dimension, for ``Trainer`` without per-row work.

    ``dataset[i]`` is one example (a dict of tensors); ``dataset.__getitems__(indices)``, which torch's
    ``DataLoader`` calls with a whole batch of indices, is one gather per column and returns the batch as
    a dict of tensors.  Use it with :class:`TensorBatchCollator` and ``remove_unused_columns=False``.
    """

    def __init__(self, columns: Mapping[str, Any]) -> None:
        self.columns = {k: torch.as_tensor(v) for k, v in columns.items()}
        lengths = {k: v.shape[0] for k, v in self.columns.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"all columns need the same number of examples, got {lengths}")
        self._len = next(iter(lengths.values()))

    @property
    def column_names(self) -> list[str]:
        return list(self.columns)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {k: v[index] for k, v in self.columns.items()}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {k: v.index_select(0, idx) for k, v in self.columns.items()}


@dataclass(frozen=True)
class Trim:
    """Cut ``columns`` of a padded batch after the last position where ``reference`` is not ``pad``."""

    reference: str
    pad: int
    columns: tuple[str, ...]


class TensorBatchCollator:
    """The collator of a :class:`TensorDataset`: the batch is already stacked; only cut the padding.

    Accepts the dict that ``TensorDataset.__getitems__`` returns, or a list of rows (stacked here).
    ``trims``: the padded column groups (right padding), each cut to the longest real row of the batch.
    """

    def __init__(self, trims: Sequence[Trim] = ()) -> None:
        self.trims = tuple(trims)

    def __call__(self, batch) -> dict[str, Any]:
        if not isinstance(batch, Mapping):  # a list of rows
            batch = {k: torch.stack([row[k] for row in batch]) for k in batch[0]}
        batch = dict(batch)
        for trim in self.trims:
            real = (batch[trim.reference] != trim.pad).any(dim=0)  # (length,)
            length = max(1, int(real.nonzero().max()) + 1) if bool(real.any()) else 1
            for name in trim.columns:
                batch[name] = batch[name][:, :length].contiguous()  # models call .view on labels
        return batch


def pad_sequences(sequences: Sequence[Sequence[int]], pad: int, length: int | None = None):
    """A LongTensor (n, length) of right-padded id lists (length: the longest by default)."""
    import numpy as np

    length = length if length is not None else max((len(s) for s in sequences), default=0)
    out = np.full((len(sequences), length), pad, dtype=np.int64)
    for i, seq in enumerate(sequences):
        seq = seq[:length]
        out[i, : len(seq)] = seq
    return torch.from_numpy(out)
