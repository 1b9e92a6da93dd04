"""Shared fixtures for the analysis tests: one torch thread (the machine is shared; the solver's
batched small linear algebra is faster single-threaded under contention), a seeded RNG, and the tiny
float64 BERT / ViT / T5 models of ``tests/_tiny.py`` (its narrow variants) through the ``tiny`` fixture."""

from types import SimpleNamespace

import _tiny
import pytest
import torch
from transformers import BertForSequenceClassification, T5EncoderModel


@pytest.fixture(autouse=True)
def _single_thread_and_seed():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def tiny_bert(attn="eager", cls=None, **overrides):
    return _tiny.model("bert", attn, cls=cls, dtype=torch.float64, **{**_tiny.NARROW["bert"], **overrides})


def tiny_bert_cls(attn="eager"):
    return tiny_bert(attn, BertForSequenceClassification)


def tiny_vit(attn="eager"):
    return _tiny.model("vit", attn, dtype=torch.float64, **_tiny.NARROW["vit"])


def tiny_t5(attn="eager"):
    """T5 with its relative-position bias tables drawn from N(0, 4), so that the bias matters."""
    model = _tiny.model("t5", attn, dtype=torch.float64, **_tiny.NARROW["t5"])
    return _tiny.randomize_position_bias(model, std=2.0)


def tiny_t5_encoder(attn="eager"):
    return _tiny.model("t5", attn, cls=T5EncoderModel, dtype=torch.float64, **_tiny.NARROW["t5"])


def text_batch(batch=3, length=7, vocab=40):
    """Right-padded token ids: row 1 has 4 real tokens, row 2 has 2 (for batch 3)."""
    lengths = tuple(min(length, n) for n in (7, 4, 2, 7, 7, 7, 7, 7)[:batch])
    return _tiny.text_batch(batch, length, vocab, lengths=lengths)


def t5_batch():
    return _tiny.seq2seq_batch(3, 7, 5, 50, lengths=(7, 4, 2))


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
