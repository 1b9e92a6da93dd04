"""Tiny checkpoints saved like real ones (model + tokenizer in a folder) for the command-line tests.

    path = _checkpoints.bert(tmp_path / "bert")       # BertModel + WordPiece tokenizer of WORDS
    path = _checkpoints.vit(tmp_path / "vit")         # ViTForImageClassification, 8x8 grey images
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = "the a cat dog sat on mat and ran fast slow red blue sky is was very big small".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","]


def bert(folder: Path, *, max_position_embeddings: int = 12, tokenizer: bool = True) -> Path:
    """A random 2-layer, 3-head BertModel whose WordPiece vocabulary holds :data:`WORDS`."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + WORDS
    if tokenizer:
        BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=32,
        max_position_embeddings=max_position_embeddings,
    )
    BertModel(config).save_pretrained(folder)
    return folder


def vit(folder: Path) -> Path:
    """A random 2-layer ViTForImageClassification for 8x8 grey images (3 classes)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        num_labels=3,
    )
    ViTForImageClassification(config).save_pretrained(folder)
    return folder


def t5(folder: Path, num_layers: int = 1) -> Path:
    """A random byte-level T5ForConditionalGeneration with its ByT5 tokenizer."""
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    tok = ByT5Tokenizer()
    torch.manual_seed(0)
    T5ForConditionalGeneration(
        T5Config(
            vocab_size=len(tok),
            d_model=16,
            d_kv=4,
            d_ff=24,
            num_layers=num_layers,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
            architectures=["T5ForConditionalGeneration"],
        )
    ).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its content (to assert that nothing changed)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
