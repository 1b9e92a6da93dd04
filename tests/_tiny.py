"""Tiny models built from configs (no network) and padded batches, shared by every test suite.

One table, :data:`ARCHITECTURES`, names each architecture with its tiny config, its default model class,
its inputs and which attention parts (see :mod:`hf_eot.config`) it has.  Sizes are small on purpose
(width 32, 2 layers, 4 heads, sequences of at most 9 tokens or 8x8 images) so that a forward pass costs
milliseconds; every size can be overridden per call.

    model = _tiny.model("bert", "eot")                              # seeded, eval mode
    model = _tiny.model("bert", "eager", cls=BertForSequenceClassification, dtype=torch.float64,
                        hidden_size=24, num_attention_heads=3)      # any config field overridden
    batch = _tiny.inputs("bart")                                    # padded input dict for model(**batch)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers as tf
from torch import nn

VOCAB = 64
WIDTH = 32
HEADS = 4
LAYERS = 2


def text_batch(
    batch: int = 3, length: int = 9, vocab: int = VOCAB, lengths: tuple[int, ...] | None = None, seed: int = 1
) -> dict[str, torch.Tensor]:
    """``input_ids`` (no pad id 0 among real tokens) and a right-padded ``attention_mask``.

    ``lengths`` gives the real length of each row; by default row ``b`` has ``length - 2 b`` real tokens.
    """
    lengths = lengths if lengths is not None else tuple(max(1, length - 2 * b) for b in range(batch))
    if len(lengths) != batch or not all(1 <= n <= length for n in lengths):
        raise ValueError(f"invalid lengths={lengths!r} for batch={batch}, length={length}")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, length), generator=generator)
    mask = (torch.arange(length)[None] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def padded_tokens(batch: int = 3, length: int = 9, vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of :func:`text_batch`."""
    batch_ = text_batch(batch, length, vocab)
    return batch_["input_ids"], batch_["attention_mask"]


def seq2seq_batch(
    batch: int = 3, length: int = 7, target_length: int = 5, vocab: int = VOCAB, lengths: tuple[int, ...] | None = None
) -> dict[str, torch.Tensor]:
    """A padded encoder batch plus ``decoder_input_ids`` / ``decoder_attention_mask`` (first row padded)."""
    encoder = text_batch(batch, length, vocab, lengths)
    target_lengths = (max(1, target_length - 2),) + (target_length,) * (batch - 1)  # first row padded
    decoder = text_batch(batch, target_length, vocab, seed=2, lengths=target_lengths)
    return {**encoder, "decoder_input_ids": decoder["input_ids"], "decoder_attention_mask": decoder["attention_mask"]}


def pixel_batch(batch: int = 2, channels: int = 1, size: int = 8, seed: int = 3) -> torch.Tensor:
    """``(batch, channels, size, size)`` images."""
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class Architecture:
    """A tiny architecture: ``config(**overrides)``, its default model class, ``inputs(batch)`` and the
    number of attention layers in each part (``{"encoder": 2}``, ``{"decoder": 2}``, ...)."""

    config: Callable[..., tf.PretrainedConfig]
    model_class: type[nn.Module]
    inputs: Callable[[int], dict[str, torch.Tensor]]
    parts: dict[str, int]


def _factory(config_class: type, **defaults: Any) -> Callable[..., tf.PretrainedConfig]:
    def make(**overrides: Any) -> tf.PretrainedConfig:
        return config_class(**{**defaults, **overrides})

    make.__name__ = f"tiny_{config_class.__name__}"
    return make


_BERT_LIKE = dict(
    vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
    intermediate_size=2 * WIDTH, max_position_embeddings=64, hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)  # fmt: skip
_VIT_LIKE = dict(
    image_size=8, patch_size=4, num_channels=1, hidden_size=WIDTH, num_hidden_layers=LAYERS,
    num_attention_heads=HEADS, intermediate_size=2 * WIDTH, num_labels=3, hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)  # fmt: skip
_DECODER_ONLY = dict(
    vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
    num_key_value_heads=2, intermediate_size=2 * WIDTH, max_position_embeddings=64, pad_token_id=0,
    bos_token_id=1, eos_token_id=1,
)  # fmt: skip
_BART_LIKE = dict(
    vocab_size=VOCAB, d_model=WIDTH, encoder_layers=LAYERS, decoder_layers=1, encoder_attention_heads=HEADS,
    decoder_attention_heads=HEADS, encoder_ffn_dim=2 * WIDTH, decoder_ffn_dim=2 * WIDTH, dropout=0.0,
    attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=1, decoder_start_token_id=1,
)  # fmt: skip


def _text(batch: int) -> dict[str, torch.Tensor]:
    return text_batch(batch)


def _pixels(batch: int) -> dict[str, torch.Tensor]:
    return {"pixel_values": pixel_batch(batch)}


def _seq2seq(batch: int) -> dict[str, torch.Tensor]:
    return seq2seq_batch(batch)


def _whisper(batch: int) -> dict[str, torch.Tensor]:
    features = torch.randn(batch, 8, 32, generator=torch.Generator().manual_seed(4))  # (B, mel bins, 2 * positions)
    decoder = seq2seq_batch(batch)
    return {"input_features": features, "decoder_input_ids": decoder["decoder_input_ids"],
            "decoder_attention_mask": decoder["decoder_attention_mask"]}  # fmt: skip


def _clip(batch: int) -> dict[str, torch.Tensor]:
    return {**text_batch(batch), "pixel_values": pixel_batch(batch, channels=3)}


ARCHITECTURES: dict[str, Architecture] = {
    "bert": Architecture(_factory(tf.BertConfig, **_BERT_LIKE), tf.BertModel, _text, {"encoder": LAYERS}),
    "roberta": Architecture(
        _factory(tf.RobertaConfig, **_BERT_LIKE, pad_token_id=0), tf.RobertaModel, _text, {"encoder": LAYERS}
    ),
    "electra": Architecture(
        _factory(tf.ElectraConfig, **_BERT_LIKE, embedding_size=16), tf.ElectraModel, _text, {"encoder": LAYERS}
    ),
    "distilbert": Architecture(
        _factory(
            tf.DistilBertConfig, vocab_size=VOCAB, dim=WIDTH, n_layers=LAYERS, n_heads=HEADS, hidden_dim=2 * WIDTH,
            max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, pad_token_id=0,
        ),  # fmt: skip
        tf.DistilBertModel,
        _text,
        {"encoder": LAYERS},
    ),
    "modernbert": Architecture(
        _factory(
            tf.ModernBertConfig, vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, intermediate_size=2 * WIDTH, max_position_embeddings=64, pad_token_id=0,
            bos_token_id=1, eos_token_id=1, cls_token_id=1, sep_token_id=1, global_attn_every_n_layers=1,
        ),  # fmt: skip
        tf.ModernBertModel,
        _text,
        {"encoder": LAYERS},
    ),
    "vit": Architecture(
        _factory(tf.ViTConfig, **_VIT_LIKE), tf.ViTForImageClassification, _pixels, {"encoder": LAYERS}
    ),
    "deit": Architecture(_factory(tf.DeiTConfig, **_VIT_LIKE), tf.DeiTModel, _pixels, {"encoder": LAYERS}),
    "gpt2": Architecture(
        _factory(
            tf.GPT2Config, vocab_size=VOCAB, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS, n_positions=64,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1, pad_token_id=0,
        ),  # fmt: skip
        tf.GPT2Model,
        _text,
        {"decoder": LAYERS},
    ),
    "llama": Architecture(_factory(tf.LlamaConfig, **_DECODER_ONLY), tf.LlamaModel, _text, {"decoder": LAYERS}),
    "qwen2": Architecture(_factory(tf.Qwen2Config, **_DECODER_ONLY), tf.Qwen2Model, _text, {"decoder": LAYERS}),
    "t5": Architecture(
        _factory(
            tf.T5Config, vocab_size=VOCAB, d_model=WIDTH, d_kv=8, d_ff=2 * WIDTH, num_layers=LAYERS,
            num_decoder_layers=LAYERS, num_heads=HEADS, dropout_rate=0.0, decoder_start_token_id=0,
            pad_token_id=0, eos_token_id=1,
        ),  # fmt: skip
        tf.T5ForConditionalGeneration,
        _seq2seq,
        {"encoder": LAYERS, "decoder": LAYERS, "cross": LAYERS},
    ),
    # one decoder layer but two encoder layers: the part sizes must not be taken from each other
    "bart": Architecture(
        _factory(tf.BartConfig, **_BART_LIKE, max_position_embeddings=64),
        tf.BartModel,
        _seq2seq,
        {"encoder": LAYERS, "decoder": 1, "cross": 1},
    ),
    "whisper": Architecture(
        _factory(
            tf.WhisperConfig, **_BART_LIKE, num_mel_bins=8, max_source_positions=16, max_target_positions=16,
            suppress_tokens=None, begin_suppress_tokens=None,
        ),  # fmt: skip
        tf.WhisperModel,
        _whisper,
        {"encoder": LAYERS, "decoder": 1, "cross": 1},
    ),
    # CLIP's text tower is causal (it passes is_causal=True on every call): its layers are "decoder" layers
    "clip": Architecture(
        _factory(
            tf.CLIPConfig,
            text_config=dict(
                vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=2 * WIDTH, max_position_embeddings=16, bos_token_id=1, eos_token_id=1,
                pad_token_id=0,
            ),  # fmt: skip
            vision_config=dict(
                image_size=8, patch_size=4, num_channels=3, hidden_size=WIDTH, num_hidden_layers=1,
                num_attention_heads=HEADS, intermediate_size=2 * WIDTH,
            ),  # fmt: skip
            projection_dim=16,
        ),
        tf.CLIPModel,
        _clip,
        {"encoder": 1, "decoder": LAYERS},
    ),
}


#: Narrower variants (config overrides) for float64 solver tests: 3 heads of width 8 for BERT, 2 of 8 for
#: ViT, T5 with 8 position buckets; ``model("t5", "eager", dtype=torch.float64, **NARROW["t5"])``.
#: The matching inputs are ``text_batch(3, 7, 40, lengths=(7, 4, 2))`` and
#: ``seq2seq_batch(3, 7, 5, 50, lengths=(7, 4, 2))``.
NARROW: dict[str, dict[str, Any]] = {
    "bert": dict(
        vocab_size=40, hidden_size=24, num_attention_heads=3, intermediate_size=32, max_position_embeddings=16,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    ),  # fmt: skip
    "vit": dict(hidden_size=16, num_attention_heads=2, intermediate_size=24),
    "t5": dict(
        vocab_size=50, d_model=16, d_kv=4, d_ff=24, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, dropout_rate=0.1,
    ),  # fmt: skip
}


def config(kind: str, **overrides: Any) -> tf.PretrainedConfig:
    """The tiny config of ``kind`` (a key of :data:`ARCHITECTURES`), with ``overrides`` applied."""
    if kind not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {kind!r}; valid choices: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[kind].config(**overrides)


def model(
    kind: str,
    attn_implementation: str = "eot",
    *,
    cls: type[nn.Module] | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    configure: Callable[[tf.PretrainedConfig], Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    **overrides: Any,
) -> nn.Module:
    """A tiny model of ``kind`` with seeded weights, in eval mode.

    Args:
        cls: the model class (default: the architecture's); ``overrides``: config fields.
        configure: called on the config before the model is built (e.g. ``hf_eot.configure``).
        state_dict: loaded non-strictly after construction (the same weights under another implementation).
    """
    cfg = config(kind, **overrides)
    if configure is not None:
        configure(cfg)
    torch.manual_seed(seed)
    built = (cls or ARCHITECTURES[kind].model_class)._from_config(cfg, attn_implementation=attn_implementation)
    if dtype is not None:
        built = built.to(dtype)
    if state_dict is not None:
        built.load_state_dict(state_dict, strict=False)
    return built.eval()


def inputs(kind: str, batch: int = 2) -> dict[str, torch.Tensor]:
    """A padded input dict for ``model(kind)(**inputs(kind))``."""
    return ARCHITECTURES[kind].inputs(batch)


def randomize_position_bias(model: nn.Module, std: float = 2.0) -> nn.Module:
    """Draw T5's relative-position bias tables from N(0, std^2) so that the bias matters in tests."""
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "relative_attention_bias"):
                module.relative_attention_bias.weight.normal_(0, std)
    return model


def tensors(output: Any) -> dict[str, torch.Tensor]:
    """The floating-point tensors of a model output (nested outputs flattened by name)."""
    found: dict[str, torch.Tensor] = {}
    items = output.items() if hasattr(output, "items") else enumerate(output)
    for key, value in items:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            found[str(key)] = value
        elif hasattr(value, "items") or isinstance(value, tuple):
            found.update({f"{key}.{k}": v for k, v in tensors(value).items()})
    return found
