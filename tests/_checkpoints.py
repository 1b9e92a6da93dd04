"""The tiny models of :mod:`_tiny`, saved like real checkpoints (model + tokenizer in a folder), for the
command-line tests.

    path = _checkpoints.bert(tmp_path / "bert")       # BertModel + WordPiece tokenizer of WORDS
    path = _checkpoints.vit(tmp_path / "vit")         # ViTForImageClassification, 8x8 grey images
    path = _checkpoints.t5(tmp_path / "t5")           # T5ForConditionalGeneration + ByT5 tokenizer
"""

from __future__ import annotations

from pathlib import Path

import _tiny

WORDS = "the a cat dog sat on mat and ran fast slow red blue sky is was very big small".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","]


def bert(folder: Path, *, max_position_embeddings: int = 12, tokenizer: bool = True) -> Path:
    """A random 2-layer, 3-head BertModel whose WordPiece vocabulary holds :data:`WORDS`."""
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + WORDS
    if tokenizer:
        BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    overrides = {**_tiny.NARROW["bert"], "vocab_size": len(vocab)}
    overrides["max_position_embeddings"] = max_position_embeddings
    _tiny.model("bert", "eager", **overrides).save_pretrained(folder)
    return folder


def vit(folder: Path) -> Path:
    """A random 2-layer, 2-head ViTForImageClassification for 8x8 grey images (3 classes)."""
    _tiny.model("vit", "eager", **_tiny.NARROW["vit"]).save_pretrained(folder)
    return folder


def t5(folder: Path, num_layers: int = 1) -> Path:
    """A random byte-level T5ForConditionalGeneration with its ByT5 tokenizer."""
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    overrides = {**_tiny.NARROW["t5"], "vocab_size": len(tok), "dropout_rate": 0.0}
    model = _tiny.model("t5", "eager", num_layers=num_layers, num_decoder_layers=num_layers, **overrides)
    model.config.architectures = ["T5ForConditionalGeneration"]
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its content (to assert that nothing changed)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
