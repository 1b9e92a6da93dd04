"""Shared fixtures for the analysis tests: one torch thread (the machine is shared; the solver's
batched small linear algebra is faster single-threaded under contention), a seeded RNG, and tiny random
BERT / ViT / T5 models built from configs (no network) through the ``tiny`` fixture."""

from types import SimpleNamespace

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    T5Config,
    T5EncoderModel,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
)


@pytest.fixture(autouse=True)
def _single_thread_and_seed():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def tiny_bert(attn="eager", cls=BertModel, **kw):
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=40,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=32,
        max_position_embeddings=16,
        attn_implementation=attn,
        **kw,
    )
    return cls(cfg).double().eval()


def tiny_bert_cls(attn="eager"):
    return tiny_bert(attn, BertForSequenceClassification)


def tiny_vit(attn="eager"):
    torch.manual_seed(0)
    cfg = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        num_labels=3,
        attn_implementation=attn,
    )
    return ViTForImageClassification(cfg).double().eval()


def _t5_config(attn):
    return T5Config(
        vocab_size=50,
        d_model=16,
        d_kv=4,
        d_ff=24,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        attn_implementation=attn,
    )


def tiny_t5(attn="eager"):
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(_t5_config(attn)).double().eval()
    with torch.no_grad():  # make the position bias matter
        for m in model.modules():
            if hasattr(m, "relative_attention_bias"):
                m.relative_attention_bias.weight.normal_(0, 2.0)
    return model


def tiny_t5_encoder(attn="eager"):
    torch.manual_seed(0)
    return T5EncoderModel(_t5_config(attn)).double().eval()


def text_batch(batch=3, length=7, vocab=40):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def t5_batch():
    enc = text_batch(vocab=50)
    g = torch.Generator().manual_seed(2)
    dec = torch.randint(2, 50, (3, 5), generator=g)
    dmask = torch.ones(3, 5, dtype=torch.long)
    dmask[0, 3:] = 0
    return {**enc, "decoder_input_ids": dec.masked_fill(dmask == 0, 0), "decoder_attention_mask": dmask}


@pytest.fixture
def tiny():
    """Factories of tiny models and inputs: ``tiny.bert()``, ``tiny.vit()``, ``tiny.t5()``, ..."""
    return SimpleNamespace(
        bert=tiny_bert,
        bert_cls=tiny_bert_cls,
        vit=tiny_vit,
        t5=tiny_t5,
        t5_encoder=tiny_t5_encoder,
        text_batch=text_batch,
        t5_batch=t5_batch,
    )
