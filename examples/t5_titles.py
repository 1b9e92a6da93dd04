#!/usr/bin/env python
"""Train a small byte-level T5 from scratch to write the BBC News title from the article body.

Bytes in, bytes out (``ByT5Tokenizer``: no vocabulary file). Each variant is one attention setup:
``softmax`` is T5's own attention read as a prior softmax (the relative position bias is the
log-prior, paper 003 eq. 17-18); ``sinkhorn:n_iters=20@encoder`` uses Sinkhorn attention in the encoder
self-attention and the prior softmax elsewhere. A spec is ``name[:key=value,...][@part]``.
Titles are generated greedily with the KV cache and scored with chrF and BLEU (sacrebleu); the
script also checks that ``generate`` gives the same titles with and without the cache.

    python examples/t5_titles.py                       # short run: minutes on 2 CPU cores
    python examples/t5_titles.py --epochs 30 --d-model 256 --layers 4 --seeds 0 1 2
    accelerate launch --multi_gpu --num_processes 2 examples/t5_titles.py   # same code, DDP
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _common
import numpy as np
from _common import configure, is_main_process, previous_runs, summarize, write_json

from hf_eot.datasets import load_bbc_news
from hf_eot.model_card import ModelCardCallback, model_card

# Sinkhorn with a fixed number of iterations: the solver is differentiated by unrolling, so its
# training memory grows with the iterations (max_iters=200 needed >16 GB at batch 32 x 161 bytes).
DEFAULT_VARIANTS = ["softmax", "sinkhorn:n_iters=20@encoder"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--variants", nargs="+", default=DEFAULT_VARIANTS, help="attention specs (default: %(default)s)"
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--train-size", type=int, default=0, help="stratified training subset; 0 = all 1,781")
    p.add_argument("--eval-size", type=int, default=200, help="stratified test subset; 0 = all 444")
    p.add_argument("--source-bytes", type=int, default=256, help="article bytes fed to the encoder")
    p.add_argument("--target-bytes", type=int, default=64, help="title bytes (generation limit too)")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-ff", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2, help="encoder layers (decoder: same)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--epochs", type=float, default=4.0)
    p.add_argument("--batch-size", type=int, default=32, help="global batch size (split over processes)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--bf16", action="store_true")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs of <output-dir>/results.json and skip those (variant, seed) pairs",
    )
    p.add_argument("--output-dir", default="runs/t5_titles")
    p.add_argument(
        "--save-dir", default=None, help="save the last seed's model of each variant under this folder"
    )
    p.add_argument(
        "--model-cards-dir", default=None, help="also write the summary card here (e.g. model_cards/)"
    )
    return p


def parse_variant(text: str) -> tuple[str, str | None]:
    spec, _, part = text.partition("@")
    return spec, (part or None)


def checkpoint_name(variant: str) -> str:
    name = _common.parse_spec(parse_variant(variant)[0])[0]
    return "t5-bbc-titles" if name == "softmax" else f"t5-bbc-titles-{name}"


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
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        architectures=["T5ForConditionalGeneration"],
    )
    config._attn_implementation = _common.attn_implementation()
    model = T5ForConditionalGeneration(config)
    model.generation_config.decoder_start_token_id = tokenizer.pad_token_id
    spec, part = parse_variant(variant)
    configure(model, spec, **({"part": part} if part else {}))
    return model


def cache_demo(model, tokenizer, texts: list[str], max_new_tokens: int) -> dict:
    """Greedy generation with and without the KV cache: same titles, and how long each took."""
    import torch

    model.eval()
    enc = tokenizer(texts, return_tensors="pt", padding=True).to(model.device)
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


def run_one(args, variant: str, seed: int, data, tokenizer) -> dict:
    import sacrebleu
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

    model = build_model(args, variant, seed, tokenizer)
    out = Path(args.output_dir) / _common.spec_label(variant.replace("@", "-")) / f"seed{seed}"
    targs = _common.training_arguments(
        Seq2SeqTrainingArguments,
        args,
        out,
        seed,
        per_device_eval_batch_size=64,
        warmup_steps=0.05,
        weight_decay=0.01,
        lr_scheduler_type="linear",
        logging_steps=20,
        predict_with_generate=True,
        generation_max_length=args.target_bytes + 1,
        generation_num_beams=1,
    )

    def scores(pred):
        preds = np.where(pred.predictions < 0, tokenizer.pad_token_id, pred.predictions)
        labels = np.where(pred.label_ids < 0, tokenizer.pad_token_id, pred.label_ids)
        hyps = tokenizer.batch_decode(preds, skip_special_tokens=True)
        refs = tokenizer.batch_decode(labels, skip_special_tokens=True)
        return {
            "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
            "bleu": sacrebleu.corpus_bleu(hyps, [refs]).score,
            "exact": float(np.mean([h.strip() == r.strip() for h, r in zip(hyps, refs, strict=True)])),
        }

    card = ModelCardCallback(
        datasets=["SetFit/bbc-news"],
        metrics=["chrf", "bleu"],
        training={
            "variant": variant,
            "tokenizer": "ByT5Tokenizer (bytes)",
            "source bytes": args.source_bytes,
        },
        title=f"Byte-level T5 (tiny) for BBC News titles, {variant} attention",
    )
    trainer = Seq2SeqTrainer(
        model=model,
        args=targs,
        train_dataset=data["train"],
        eval_dataset=data["test"],
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        compute_metrics=scores,
        callbacks=[card],
    )
    t0 = time.perf_counter()
    train_out = trainer.train()
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = trainer.evaluate()
    eval_s = time.perf_counter() - t0
    if trainer.is_world_process_zero():
        card.write(str(out), trainer.args, trainer.state, trainer.model)
    return {
        "variant": variant,
        "seed": seed,
        "chrf": metrics["eval_chrf"],
        "bleu": metrics["eval_bleu"],
        "exact": metrics["eval_exact"],
        "eval_loss": metrics["eval_loss"],
        "train_loss": train_out.training_loss,
        "train_seconds": train_s,
        "attn_implementation": _common.attn_implementation(),
        "generate_seconds": eval_s,
        "steps": trainer.state.global_step,
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "_trainer": trainer,
    }


def training_table(args, n_train: int) -> dict:
    return {
        "tokenizer": "ByT5Tokenizer (UTF-8 bytes, no vocabulary file)",
        "train articles": n_train,
        "source / target bytes": f"{args.source_bytes} / {args.target_bytes}",
        "d_model / d_ff / heads / layers (enc+dec)": f"{args.d_model} / {args.d_ff} / {args.heads} / {args.layers}+{args.layers}",
        "epochs": args.epochs,
        "global batch": args.batch_size,
        "learning rate": args.lr,
        "optimizer": "AdamW (wd 0.01), linear schedule, 5% warm-up",
        "bf16": args.bf16,
        "decoding": "greedy, KV cache",
    }


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    from transformers import ByT5Tokenizer

    tokenizer = ByT5Tokenizer()
    data = load_bbc_news(train_size=args.train_size or None, eval_size=args.eval_size or None)

    def tokenize(batch):
        enc = tokenizer(batch["body"], truncation=True, max_length=args.source_bytes)
        enc["labels"] = tokenizer(batch["title"], truncation=True, max_length=args.target_bytes)["input_ids"]
        return enc

    tokenized = data.map(tokenize, batched=True, remove_columns=data["train"].column_names)
    old = previous_runs(args.output_dir, args.resume)
    runs, trainers = list(old), {}
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
                    f"[t5_titles] {variant} seed={seed}: chrF={run['chrf']:.2f} BLEU={run['bleu']:.2f} "
                    f"({run['train_seconds']:.0f} s train)",
                    flush=True,
                )
    summary = {"chrf": summarize(runs, "variant", "chrf"), "bleu": summarize(runs, "variant", "bleu")}
    examples = {}
    if args.resume and (Path(args.output_dir) / "results.json").is_file():
        import json

        examples = json.loads((Path(args.output_dir) / "results.json").read_text()).get(
            "generate_examples", {}
        )
    if is_main_process():
        texts = [data["test"][i]["body"][: args.source_bytes] for i in range(4)]
        refs = [data["test"][i]["title"] for i in range(4)]
        for variant, trainer in trainers.items():
            model = trainer.model
            demo = cache_demo(model, tokenizer, texts, args.target_bytes)
            demo["references"] = refs
            examples[variant] = demo
            print(
                f"[t5_titles] {variant}: generate with KV cache {demo['seconds_with_cache']:.2f} s, without "
                f"{demo['seconds_without_cache']:.2f} s, identical={demo['same_with_and_without_cache']}"
            )
            for hyp, ref in zip(demo["titles"], refs, strict=True):
                print(f"    {ref!r} -> {hyp!r}")
    result = {
        "task": "BBC News title generation, byte-level T5 from scratch",
        "attn_implementation": _common.attn_implementation(),
        "train_articles": len(data["train"]),
        "test_articles": len(data["test"]),
        "args": vars(args),
        "runs": runs,
        "summary": summary,
        "generate_examples": examples,
        "env": _common.num_threads_note(),
    }
    if is_main_process():
        write_json(Path(args.output_dir) / "results.json", result)
        table = {
            v: {
                "chrF (mean ± 95% CI)": summary["chrf"][v]["text"],
                "BLEU": summary["bleu"][v]["text"],
                "generate == generate(use_cache=False)": examples.get(v, {}).get(
                    "same_with_and_without_cache", "n/a"
                ),
            }
            for v in summary["chrf"]
        }
        targets = [Path(args.output_dir)] + (
            [Path(args.model_cards_dir) / "t5-bbc-titles.md"] if args.model_cards_dir else []
        )
        for target in targets:
            card_model = (
                trainers[list(trainers)[-1]].model
                if trainers
                else build_model(args, args.variants[-1], 0, tokenizer)
            )
            model_card(
                card_model,
                results=table,
                datasets=["SetFit/bbc-news"],
                metrics=["chrf", "bleu"],
                training=training_table(args, len(data["train"]))
                | {"seeds": sorted({r["seed"] for r in runs})},
                path=target,
                title="Byte-level T5 for BBC News titles: prior softmax vs Sinkhorn encoder",
                model_id=str(
                    Path(args.save_dir)
                    / checkpoint_name(list(trainers)[-1] if trainers else args.variants[-1])
                )
                if args.save_dir
                else None,
                description="Each row of the results is a separately trained model; the attention table "
                "shows the last variant's configuration.",
            )
    if args.save_dir:
        for variant, trainer in trainers.items():
            folder = Path(args.save_dir) / checkpoint_name(variant)
            trainer.save_model(str(folder))
            if is_main_process():
                (folder / "training_args.bin").unlink(missing_ok=True)  # a pickle; the card has the setup
                tokenizer.save_pretrained(str(folder))
                last = [r for r in runs if r["variant"] == variant][-1]
                model_card(
                    trainer.model,
                    results={
                        "chrF": last["chrf"],
                        "BLEU": last["bleu"],
                        "test articles": len(data["test"]),
                        "generate: KV cache == no cache": examples[variant]["same_with_and_without_cache"],
                    },
                    datasets=["SetFit/bbc-news"],
                    metrics=["chrf", "bleu"],
                    training=training_table(args, len(data["train"]))
                    | {"seed": last["seed"], "steps": last["steps"]},
                    path=folder,
                    title=f"Byte-level T5 (tiny) for BBC News titles, {variant} attention",
                    description="Trained from scratch with hf_eot's example `examples/t5_titles.py`; input: the "
                    f"first {args.source_bytes} bytes of the article body, output: the title. A demonstration "
                    "checkpoint for the analysis tools, not a useful headline generator.",
                )
    return result


if __name__ == "__main__":
    main()
