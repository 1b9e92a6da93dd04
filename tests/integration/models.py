"""Tiny BERT, T5 and ViT models built from configs (no network), and inputs with padding."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertModel,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
)


def bert_config(**kwargs) -> BertConfig:
    return BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **kwargs,
    )


def t5_config(**kwargs) -> T5Config:
    return T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        **kwargs,
    )


def vit_config(**kwargs) -> ViTConfig:
    return ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **kwargs,
    )


def build(kind: str, attn_implementation: str, state_dict: dict | None = None, configure=None):
    """A tiny model of ``kind`` ("bert", "t5", "vit"), seeded, in eval mode, optionally configured."""
    torch.manual_seed(0)
    config, cls = {
        "bert": (bert_config(), BertModel),
        "t5": (t5_config(), T5ForConditionalGeneration),
        "vit": (vit_config(), ViTForImageClassification),
    }[kind]
    if configure is not None:
        configure(config)
    model = cls._from_config(config, attn_implementation=attn_implementation)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=False)
    return model.eval()


def padded_tokens(batch: int = 3, length: int = 9, vocab: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (no pad id inside real tokens) and a right-padded attention mask of varied lengths."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, vocab, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(1, batch):
        mask[b, length - 2 * b :] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask
