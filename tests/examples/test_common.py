"""The examples' shared pieces: tensor datasets, the slicing collator, --quick parsing, T5 variants."""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import _common  # noqa: E402
from _common import TensorBatchCollator, TensorDataset, Trim  # noqa: E402


def _dataset() -> TensorDataset:
    ids = torch.tensor([[5, 6, 0, 0, 0], [7, 0, 0, 0, 0], [8, 9, 10, 0, 0]])
    return TensorDataset({
        "input_ids": ids, "attention_mask": (ids != 0).long(),
        "labels": torch.tensor([[1, -100, -100], [2, 3, -100], [4, -100, -100]]), "y": torch.arange(3),
    })  # fmt: skip


def test_getitems_gathers_the_rows_a_dataloader_asks_for():
    ds = _dataset()
    batch = ds.__getitems__([2, 0])
    assert torch.equal(batch["y"], torch.tensor([2, 0]))
    assert torch.equal(batch["input_ids"], ds.columns["input_ids"][[2, 0]])
    assert len(ds) == 3 and set(ds[1]) == {"input_ids", "attention_mask", "labels", "y"}


def test_tensor_dataset_refuses_columns_of_different_lengths():
    with pytest.raises(ValueError, match="same number of examples"):
        TensorDataset({"a": torch.zeros(3), "b": torch.zeros(4)})


def test_collator_cuts_each_group_to_the_longest_real_row_of_the_batch():
    ds = _dataset()
    collate = TensorBatchCollator((
        Trim("attention_mask", 0, ("input_ids", "attention_mask")), Trim("labels", -100, ("labels",)),
    ))  # fmt: skip
    batch = collate(ds.__getitems__([0, 1]))
    assert batch["input_ids"].tolist() == [[5, 6], [7, 0]]
    assert batch["labels"].tolist() == [[1, -100], [2, 3]]
    assert collate(ds.__getitems__([2]))["input_ids"].tolist() == [[8, 9, 10]]
    # a list of rows (a DataLoader without __getitems__) gives the same batch
    rows = collate([ds[0], ds[1]])
    assert all(torch.equal(rows[k], batch[k]) for k in batch)


def test_dataloader_with_tensor_dataset_yields_whole_batches():
    loader = torch.utils.data.DataLoader(_dataset(), batch_size=2, collate_fn=TensorBatchCollator())
    sizes = [b["y"].shape[0] for b in loader]
    assert sizes == [2, 1]


def test_quick_replaces_defaults_but_not_given_options():
    p = argparse.ArgumentParser()
    p.add_argument("--a", type=int, default=1)
    p.add_argument("--b", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    args = _common.parse_with_quick(p, ["--quick", "--b", "5"], {"a": 10, "b": 20})
    assert (args.a, args.b) == (10, 5)
    assert vars(_common.parse_with_quick(p, [], {"a": 10})) == {"a": 1, "b": 2, "quick": False}


def test_set_threads_rejects_negative_counts():
    with pytest.raises(ValueError, match="threads must be >= 0"):
        _common.set_threads(-1)


def test_the_environment_note_names_the_cpu_that_timed_the_runs():
    """Run times compare on one processor only, so every results file names it."""
    name = _common.cpu_name()
    assert name.strip() and name != "unknown"
    assert _common.num_threads_note().endswith(name)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_keep_freed_memory_lets_each_step_reuse_its_temporaries_without_page_faults():
    import resource

    # In a fresh interpreter: 10 "steps" that each allocate and free 4 x 16 MiB.  Kept, the freed memory
    # is reused: at most about one step's worth of page faults in ten steps.  (With glibc's defaults the
    # count depends on the heap's history and on transparent huge pages: 1.2 to 10 steps' worth here.)
    script = """
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
import _common
assert _common.keep_freed_memory()
def step():
    blocks = [torch.ones(4 << 20) for _ in range(4)]
    del blocks
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    run = subprocess.run([sys.executable, "-c", script, str(EXAMPLES)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    pages_per_step = 4 * (16 << 20) // resource.getpagesize()
    assert int(run.stdout) < 2 * pages_per_step


def _args(output_dir: Path, resume: bool = True, runs_from=(), **settings) -> argparse.Namespace:
    values = {"output_dir": str(output_dir), "resume": resume, "runs_from": [str(d) for d in runs_from],
              "seeds": [0], "epochs": 3.0}  # fmt: skip
    return argparse.Namespace(**(values | settings))


def _write_runs(folder: Path, runs: list[dict], **settings) -> Path:
    args = vars(_args(folder, **settings))
    _common.write_json(folder / "results.json", {"args": args, "runs": runs})
    return folder


def test_previous_runs_keeps_resumed_and_other_folders_runs_in_order(tmp_path):
    own = _write_runs(tmp_path / "own", [{"variant": "vit", "seed": 0, "accuracy": 0.5}])
    other = _write_runs(tmp_path / "other", [{"variant": "vit", "seed": 1, "accuracy": 0.6}], seeds=[1])
    runs = _common.previous_runs(_args(own, runs_from=[other]))
    assert [(r["seed"], r["accuracy"]) for r in runs] == [(0, 0.5), (1, 0.6)]
    assert _common.previous_runs(_args(own, False, [other])) == runs[1:]  # without --resume: redone
    assert _common.previous_runs(_args(tmp_path / "new")) == []  # resuming before anything ran


def test_previous_runs_summarises_again_after_a_summary_copied_the_runs(tmp_path):
    # A summary writes every kept run into its own results.json; summarising again (e.g. to add a seed)
    # finds each of those runs twice, identical, and keeps it once (also when a folder is named twice).
    other = _write_runs(tmp_path / "other", [{"variant": "vit", "seed": 1, "accuracy": 0.6}])
    first = _common.previous_runs(_args(tmp_path / "sum", runs_from=[other]))
    _write_runs(tmp_path / "sum", first)
    again = _common.previous_runs(_args(tmp_path / "sum", runs_from=[other, tmp_path / "other" / ".." / "other"]))
    assert again == first


def test_paired_difference_pairs_runs_by_seed_within_any_grouping_key():
    runs = [
        {"regularizer": "softmax", "seed": 0, "accuracy": 0.90}, {"regularizer": "softmax", "seed": 1, "accuracy": 0.80},
        {"regularizer": "ot", "seed": 1, "accuracy": 0.85}, {"regularizer": "ot", "seed": 0, "accuracy": 0.70},
        {"regularizer": "ot", "seed": 2, "accuracy": 0.99},  # no softmax run of seed 2: not paired
    ]  # fmt: skip
    paired = _common.paired_difference(runs, "ot", "softmax", group="regularizer")
    assert paired["seeds"] == [0, 1]
    assert paired["values"] == pytest.approx([-0.20, 0.05])
    assert paired["mean"] == pytest.approx(-0.075)
    assert _common.paired_difference(runs, "sparsemax", "softmax", group="regularizer") is None
    with pytest.raises(KeyError):  # the default grouping key of the other examples
        _common.paired_difference(runs, "ot", "softmax")
    every = _common.paired_differences_to(runs, ["softmax", "ot", "sparsemax"], "softmax", group="regularizer")
    assert every == {"ot": paired}  # the baseline itself and names without a common seed are left out


def test_previous_runs_refuses_conflicting_runs_other_settings_and_missing_folders(tmp_path):
    a = _write_runs(tmp_path / "a", [{"regularizer": "ot", "seed": 2, "accuracy": 0.5}])
    b = _write_runs(tmp_path / "b", [{"regularizer": "ot", "seed": 2, "accuracy": 0.7}])
    key = ("regularizer", "seed")
    with pytest.raises(ValueError, match=r"'regularizer': 'ot', 'seed': 2.* differs between"):
        _common.previous_runs(_args(a, runs_from=[b]), key=key)
    longer = _write_runs(tmp_path / "long", [{"regularizer": "ot", "seed": 3, "accuracy": 0.9}], epochs=10.0)
    with pytest.raises(ValueError, match=r"other settings \(epochs=10.0 there, 3.0 here\)"):
        _common.previous_runs(_args(a, runs_from=[longer]), key=key)
    with pytest.raises(FileNotFoundError, match="--runs-from .*missing: no results.json"):
        _common.previous_runs(_args(a, runs_from=[tmp_path / "missing"]), key=key)


def test_pad_sequences_right_pads_and_truncates():
    assert _common.pad_sequences([[1, 2, 3], [4]], pad=0).tolist() == [[1, 2, 3], [4, 0, 0]]
    assert _common.pad_sequences([[1, 2, 3]], pad=-1, length=2).tolist() == [[1, 2]]


def test_t5_variant_parts_and_checkpoint_names():
    import t5_titles

    assert t5_titles.parse_variant("softmax:prior=alibi@encoder+decoder") == (
        "softmax:prior=alibi",
        ["encoder", "decoder"],
    )
    assert t5_titles.parse_variant("softmax") == ("softmax", [])
    assert t5_titles.checkpoint_name("softmax", "title") == "t5-bbc-titles"
    assert t5_titles.checkpoint_name("sinkhorn:n_iters=20@encoder", "category") == "t5-bbc-category-sinkhorn"
    assert (
        t5_titles.checkpoint_name("softmax:prior=alibi@encoder+decoder", "category")
        == "t5-bbc-category-alibi"
    )


def test_t5_prior_variant_freezes_the_models_own_position_bias_at_zero():
    """With a named prior the log-prior is the prior alone: T5's own bias is zero and gets no gradient."""
    import t5_titles
    from transformers import ByT5Tokenizer

    args = t5_titles.parse_args(["--quick"])
    tok = ByT5Tokenizer()
    model = t5_titles.build_model(args, "softmax:prior=alibi@encoder+decoder", 0, tok)
    owners = [m for m in model.modules() if getattr(m, "has_relative_attention_bias", False)]
    assert len(owners) == 2  # encoder and decoder layer 0
    assert all(not m.relative_attention_bias.weight.requires_grad for m in owners)
    assert all(float(m.relative_attention_bias.weight.abs().sum()) == 0.0 for m in owners)
    cfg = model.config.eot_attention
    assert {o["part"] for o in cfg["overrides"]} == {"encoder", "decoder"}
    plain = t5_titles.build_model(args, "softmax", 0, tok)
    assert all(
        m.relative_attention_bias.weight.requires_grad
        for m in plain.modules()
        if getattr(m, "has_relative_attention_bias", False)
    )


def test_cut_columns_are_contiguous_so_models_can_view_them():
    """T5's loss calls labels.view(-1): a cut column must be contiguous."""
    batch = TensorBatchCollator((Trim("labels", -100, ("labels",)),))(_dataset().__getitems__([0, 2]))
    assert batch["labels"].is_contiguous() and batch["labels"].shape == (2, 1)


def test_attention_lr_puts_learned_attention_parameters_in_groups_of_their_own(tmp_path):
    """with_attention_lr: every trainable parameter is in exactly one group of the optimizer, the learned
    entmax alphas (and only they) at the attention learning rate, each with the weight decay the Trainer
    chose; the scheduler scales both rates; without a rate the Trainer class is unchanged."""
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    import hf_eot

    config = BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        attn_implementation=hf_eot.ATTN_IMPLEMENTATION,
    )  # fmt: skip
    model = BertForSequenceClassification(config)
    _common.configure(model, "entmax:alpha=1.5,learn_alpha=true")
    assert _common.learns_attention("entmax:alpha=1.5,learn_alpha=true") and not _common.learns_attention("sparsemax")
    assert _common.learns_attention("softmax:prior=relative_buckets")  # the learned bucket table
    targs = TrainingArguments(
        output_dir=str(tmp_path), learning_rate=1e-4, weight_decay=0.01, warmup_steps=2, report_to=[], use_cpu=True
    )
    assert _common.with_attention_lr(Trainer, None) is Trainer
    trainer = _common.with_attention_lr(Trainer, 0.05)(model=model, args=targs)
    plain = Trainer(model=model, args=targs).create_optimizer()
    optimizer = trainer.create_optimizer()
    own = {id(p) for p in _common.attention_parameters(model)}
    assert len(own) == 2  # one alpha logit vector per layer
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    decay = {id(p): group["weight_decay"] for group in plain.param_groups for p in group["params"]}
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= own or not ids & own
        assert group["lr"] == (0.05 if ids <= own else 1e-4)
        assert {decay[i] for i in ids} == {group["weight_decay"]}
    scheduler = trainer.create_scheduler(num_training_steps=10, optimizer=optimizer)
    optimizer.step()
    scheduler.step()  # step 1 of 2 warm-up steps: both rates at half their peak
    assert sorted({group["lr"] for group in optimizer.param_groups}) == pytest.approx([0.5e-4, 0.025])


def test_end_processes_closes_the_process_group_and_is_a_no_op_without_one(tmp_path):
    """end_processes (called at the end of each example script) destroys an initialised process group (a
    one-process gloo group here), and does nothing when there is none."""
    import torch.distributed as dist

    _common.end_processes()  # no group: nothing happens
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    _common.end_processes()
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    ("kind", "regularizer", "params"),
    [
        ("vit", "ot", {"layers": 1}),  # ViT's saved keys are its original names, converted on load
        ("t5", "sinkhorn", {"part": "encoder", "n_iters": 3}),
        ("bert", "entmax", {"learn_alpha": True}),  # learned attention parameters come back too
    ],
)
def test_checkpoint_weights_load_as_from_pretrained_reads_them(tmp_path, kind, regularizer, params):
    """load_checkpoint_weights (the examples' --resume) restores every weight of a saved model, learned
    attention parameters included, into a model with other weights: Trainer's own resume left a ViT's
    encoder layers random."""
    import _tiny as tiny

    import hf_eot

    def build(seed):
        return tiny.model(kind, seed=seed, configure=lambda c: hf_eot.configure(c, regularizer, **params))

    saved = build(0)
    with torch.no_grad():
        for p in saved.parameters():
            p.add_(0.01)  # trained away from any seed's initialization
    saved.save_pretrained(tmp_path / "checkpoint-3")
    resumed = build(1)
    _common.load_checkpoint_weights(resumed, tmp_path / "checkpoint-3")
    want, got = saved.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("other", [{"intermediate_size": 48}, {"num_hidden_layers": 1}])
def test_a_checkpoint_of_another_model_is_refused(tmp_path, other):
    """A checkpoint whose weights do not fit the model (another width: mismatched shapes; fewer layers:
    missing keys) raises instead of loading what matches."""
    import _tiny as tiny

    tiny.model("bert", **other).save_pretrained(tmp_path / "checkpoint-1")
    with pytest.raises(RuntimeError, match="does not match the model"):
        _common.load_checkpoint_weights(tiny.model("bert"), tmp_path / "checkpoint-1")


def test_a_checkpoint_saved_with_another_attention_config_is_refused(tmp_path):
    """Resuming from a folder written by a run with another regularizer (a wrong --output-dir) raises,
    naming both configs, although every weight would fit."""
    import _tiny as tiny

    import hf_eot

    tiny.model("bert", configure=lambda c: hf_eot.configure(c, "sinkhorn")).save_pretrained(tmp_path / "checkpoint-1")
    model = tiny.model("bert", configure=lambda c: hf_eot.configure(c, "sparsemax"))
    with pytest.raises(RuntimeError, match="was saved with eot_attention=.*sinkhorn.*sparsemax"):
        _common.load_checkpoint_weights(model, tmp_path / "checkpoint-1")


def test_a_checkpoint_without_weights_is_refused(tmp_path):
    """A checkpoint folder whose save was interrupted (a config, no weights file) says so."""
    import _tiny as tiny

    tiny.model("bert").config.save_pretrained(tmp_path / "checkpoint-1")
    (tmp_path / "checkpoint-1" / "training_args.bin").write_bytes(b"")  # Trainer writes it too
    with pytest.raises(RuntimeError, match="no config.json and weights"):
        _common.load_checkpoint_weights(tiny.model("bert"), tmp_path / "checkpoint-1")


def test_checkpoint_weights_keep_the_models_dtype(tmp_path):
    """The weights load in the model's dtype, whatever the config says (a stale config.dtype)."""
    import _tiny as tiny

    saved = tiny.model("bert", dtype=torch.float64)
    saved.config.dtype = torch.bfloat16
    saved.save_pretrained(tmp_path / "checkpoint-1")
    resumed = tiny.model("bert", seed=1, dtype=torch.float64)
    _common.load_checkpoint_weights(resumed, tmp_path / "checkpoint-1")
    want, got = saved.state_dict(), resumed.state_dict()
    assert all(got[k].dtype == torch.float64 and torch.equal(want[k], got[k]) for k in want)


class _Pixels(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        pixels = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(i))
        return {"pixel_values": pixels, "labels": torch.tensor(i % 3)}


def _train_vit(output_dir: Path, resume: bool) -> dict[str, torch.Tensor]:
    """4 Trainer steps of a tiny OT-ViT, a checkpoint after each; with ``resume``, from the last one."""
    import _tiny as tiny
    from transformers import Trainer, TrainingArguments

    import hf_eot

    torch.manual_seed(0)
    model = tiny.model("vit", configure=lambda c: hf_eot.configure(c, "ot", layers=1)).train()
    targs = TrainingArguments(
        str(output_dir), max_steps=4, per_device_train_batch_size=4, save_strategy="steps", save_steps=1,
        report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, learning_rate=1e-2,
    )  # fmt: skip
    trainer = Trainer(model=model, args=targs, train_dataset=_Pixels())
    _common.train(trainer, argparse.Namespace(resume=resume))
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.slow
def test_a_run_resumed_mid_way_ends_where_the_uninterrupted_run_ends(tmp_path):
    """An OT-ViT trained 4 steps, and the same run stopped after step 2 and resumed from its checkpoint
    through the examples' train(), end with identical weights (Trainer's own resume does not: it leaves
    the encoder layers at their initial values, transformers issue #43701)."""
    import shutil

    uninterrupted = _train_vit(tmp_path / "full", resume=False)
    (tmp_path / "cut").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "cut" / "checkpoint-2")
    resumed = _train_vit(tmp_path / "cut", resume=True)
    assert uninterrupted.keys() == resumed.keys()
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)


def test_training_time_leaves_out_the_evaluations_logged_while_training(tmp_path):
    """train() subtracts the runtime of evaluations Trainer ran during this training (--eval-each-epoch),
    and logged_evaluations() returns them with their metrics' names."""
    from types import SimpleNamespace

    state = SimpleNamespace(log_history=[{"loss": 1.0, "step": 1, "epoch": 0.5}])

    def train(resume_from_checkpoint=None):
        evaluation = {"eval_loss": 0.7, "eval_accuracy": 0.8, "eval_runtime": 5.0, "step": 2, "epoch": 1.0}
        state.log_history.append(evaluation)
        return "out"

    trainer = SimpleNamespace(args=SimpleNamespace(output_dir=str(tmp_path)), state=state, train=train)
    output, seconds, resumed = _common.train(trainer, argparse.Namespace(resume=False))
    assert output == "out" and resumed is None
    assert -5.0 < seconds < -4.0  # the fake trains in no time; its 5 s evaluation was taken off
    assert _common.logged_evaluations(trainer) == [
        {"epoch": 1.0, "step": 2, "loss": 0.7, "accuracy": 0.8, "runtime": 5.0}
    ]
