"""`accelerate launch --multi_gpu --num_processes 2` on CPU (two gloo processes) trains an "eot" model with
the Trainer to the same result as one process, up to data order.

Full-batch training (the global batch is the whole toy data set, dropout 0) makes the data order
irrelevant: each step's gradient is the mean over the same examples whether one process sees all
of them or two processes see half each, so the trained weights must agree to float tolerance.

``average_tokens_across_devices=False``: with the default (True), Transformers 5.23's Trainer multiplies
the loss by the number of processes for every model whose forward takes ``**kwargs``, expecting the
loss to be a sum divided by the global token count; BERT's (and ViT's, T5's) classification loss is
a plain mean, so two processes would train on twice the loss (Adam hides most of it, the logged
loss and gradient clipping do not). The examples set it to False for the same reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    sys.path[:0] = [os.environ["HF_EOT_REPO"], os.path.join(os.environ["HF_EOT_REPO"], "tests")]
    import torch
    import datasets
    import hf_eot
    import _tiny
    from transformers import BertForSequenceClassification, Trainer, TrainingArguments

    out_dir = sys.argv[1]
    model = _tiny.model("bert", "eot", cls=BertForSequenceClassification, num_attention_heads=2, num_labels=2)
    hf_eot.configure(model, "entmax", alpha=1.5, learn_alpha=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(8, 64, (16, 10), generator=g)
    labels = (ids == 9).any(1).long()
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 10] * 16,
                                       "labels": labels.tolist()})
    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=16, per_device_eval_batch_size=4,
                             learning_rate=5e-3, max_steps=4, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0, logging_steps=1, dataloader_drop_last=False,
                             average_tokens_across_devices=False)  # see the module docstring
    args.per_device_train_batch_size = 16 // args.world_size  # same global batch in every setting
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        state = {k: v.detach().double().flatten().tolist() for k, v in trainer.model.state_dict().items()}
        json.dump({"world_size": args.world_size, "eval_loss": metrics["eval_loss"], "state": state,
                   "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]},
                  open(os.path.join(out_dir, "result.json"), "w"))
    if torch.distributed.is_initialized():  # gloo's threads still running at exit can abort a process
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    """
)


def _run(cmd: list[str], cwd: Path, timeout: int = 150) -> None:
    env = dict(
        os.environ,
        HF_EOT_REPO=str(REPO),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONWARNINGS="ignore",
    )
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    if not Path(accelerate).exists():
        pytest.skip("accelerate CLI not found")
    script = tmp_path / "finetune.py"
    script.write_text(SCRIPT)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    _run([sys.executable, str(script), str(tmp_path / "one")], tmp_path)
    _run(
        [
            accelerate,
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            "29517",
            str(script),
            str(tmp_path / "two"),
        ],
        tmp_path,
    )
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert len(one["losses"]) == len(two["losses"]) == 4
    for a, b in zip(one["losses"], two["losses"], strict=True):
        assert abs(a - b) < 1e-4 * max(1.0, abs(a)), (one["losses"], two["losses"])
    assert abs(one["eval_loss"] - two["eval_loss"]) < 1e-4
    assert one["state"].keys() == two["state"].keys()
    for key, values in one["state"].items():
        diff = max(abs(x - y) for x, y in zip(values, two["state"][key], strict=True))
        assert diff < 1e-4, (key, diff)
