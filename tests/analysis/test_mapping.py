"""Architecture -> (t, z, u) (hf_eot.analysis.mapping): with lambda = alpha z, eq. (16) reproduces every
head's attention weights in BERT, ViT and T5 (encoder, decoder and cross-attention)."""

import pytest
import torch
from transformers import GPT2Config, GPT2Model

from hf_eot.analysis.dual import fenchel_dual
from hf_eot.analysis.mapping import (
    ArchitectureSpec,
    UnsupportedModelError,
    attention_sites,
    capture_attention,
    dual_problems,
    get_architecture,
    register_architecture,
    supported_model_types,
)


def _check_reproduces(model, inputs, atol):
    with capture_attention(model) as cap, torch.no_grad():
        model(**inputs)
    seen = set()
    for site in cap.sites:
        (call,) = cap.calls[site.name]
        pr = dual_problems(site, call)
        assert pr.model_weights is not None
        err = (pr.attention() - pr.model_weights).abs().max()
        assert err < atol, (site.name, float(err))
        # the rows are distributions supported on the allowed keys
        w = pr.attention()
        assert torch.allclose(w.sum(-1), torch.ones((), dtype=w.dtype))
        assert (w.masked_fill(pr.valid, 0) == 0).all()
        seen.add(site.component)
    return seen, cap


@pytest.mark.parametrize("factory", ["bert", "bert_cls"], ids=["BertModel", "BertForSequenceClassification"])
def test_bert_mapping_reproduces_attention(tiny, factory):
    """BERT: t_i = x_i / sqrt(d'), z = W_K^T q (query bias included), u uniform on unmasked keys."""
    seen, cap = _check_reproduces(getattr(tiny, factory)(), tiny.text_batch(), atol=1e-13)
    assert seen == {"encoder"} and [s.layer for s in cap.sites] == [0, 1]


def test_vit_mapping_reproduces_attention(tiny):
    """ViT (q_proj/k_proj): same mapping as BERT; its eager softmax runs in float32, hence 1e-7."""
    pix = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    seen, _ = _check_reproduces(tiny.vit(), {"pixel_values": pix}, atol=1e-6)
    assert seen == {"encoder"}


def test_t5_mapping_reproduces_encoder_decoder_and_cross_attention(tiny):
    """T5: t_i = x_i (no scaling), u proportional to exp(position bias), zero on masked (and future) keys."""
    seen, cap = _check_reproduces(tiny.t5(), {**tiny.t5_batch(), "use_cache": False}, atol=1e-13)
    assert seen == {"encoder", "decoder", "cross"}
    site = next(s for s in cap.sites if s.component == "decoder")
    pr = dual_problems(site, cap.calls[site.name][0])
    Q, K = pr.valid.shape[-2:]
    assert not pr.valid[..., torch.ones(Q, K, dtype=torch.bool).triu(1)].any()  # causal
    assert pr.log_prior is not None and pr.log_prior.abs().max() > 0.1  # u is not uniform


def test_t5_encoder_model_mapping(tiny):
    """T5EncoderModel: only encoder self-attention sites."""
    seen, _ = _check_reproduces(tiny.t5_encoder(), tiny.text_batch(vocab=50), atol=1e-13)
    assert seen == {"encoder"}


def test_sdpa_masks_and_missing_weights_are_handled(tiny):
    """With sdpa the module returns no weights (None) and may get no mask; the mapping still builds the
    right supports, and eq. (16) matches the eager model."""
    inputs = tiny.text_batch()
    eager = tiny.bert("eager")
    sdpa = tiny.bert("sdpa")
    with capture_attention(sdpa) as cap, torch.no_grad():
        sdpa(**inputs)
    with capture_attention(eager) as cap_e, torch.no_grad():
        eager(**inputs)
    for site, site_e in zip(cap.sites, cap_e.sites, strict=True):
        pr = dual_problems(site, cap.calls[site.name][0])
        pr_e = dual_problems(site_e, cap_e.calls[site_e.name][0])
        assert pr.model_weights is None
        torch.testing.assert_close(pr.attention(), pr_e.model_weights, rtol=1e-10, atol=1e-12)


def test_dual_problems_solve_and_deviations_are_finite(tiny):
    """The captured problems are well posed: Newton converges on every head and query."""
    model = tiny.t5()
    with capture_attention(model) as cap, torch.no_grad():
        model(**tiny.t5_batch(), use_cache=False)
    for site in cap.sites:
        pr = dual_problems(site, cap.calls[site.name][0])
        r = fenchel_dual(pr.t, pr.z, log_u=pr.log_u, return_lam=False)
        assert r.converged.all() and torch.isfinite(r.relative_deviation).all()


def test_hooks_are_removed_on_exit(tiny):
    """capture_attention leaves no hook behind."""
    model = tiny.bert()
    with capture_attention(model):
        pass
    for site in attention_sites(model):
        assert not site.module._forward_hooks


def test_unsupported_model_type_is_refused():
    """A model type without a registered mapping gets UnsupportedModelError naming the supported ones."""
    model = GPT2Model(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=20, n_positions=8))
    with pytest.raises(UnsupportedModelError, match="gpt2.*supported model types: bert, t5, vit"):
        get_architecture(model)
    with pytest.raises(UnsupportedModelError):
        with capture_attention(model):
            pass


def test_registry_refuses_duplicates():
    """register_architecture refuses a model type that is already registered."""
    assert set(supported_model_types()) >= {"bert", "vit", "t5"}
    spec = get_architecture("bert")
    with pytest.raises(ValueError, match="already registered"):
        register_architecture(ArchitectureSpec(**{**spec.__dict__}))


@pytest.mark.parametrize("factory", ["bert", "t5"])
def test_every_split_gives_the_same_attention_and_the_paper_split_scales_templates(tiny, factory):
    """t_i = s x_i with s = 1 / sqrt(d') (the paper's Section 8, T5 included); under every split of
    the score scale eq. (16) gives the same attention, while the dual maximizer lambda* changes."""
    from hf_eot.analysis.mapping import SPLITS

    model = getattr(tiny, factory)()
    batch = {**tiny.t5_batch(), "use_cache": False} if factory == "t5" else tiny.text_batch()
    with capture_attention(model) as cap, torch.no_grad():
        model(**batch)
    site = cap.sites[0]
    pr = dual_problems(site, cap.calls[site.name][0])
    x = cap.calls[site.name][0].kv.double()
    torch.testing.assert_close(pr.t[:, 0, 0], x / pr.head_dim**0.5)
    reference = pr.attention()
    deviations = {}
    for split in SPLITS:
        t, z = pr.split(split)
        logits = pr.log_u + torch.einsum("bxyid,bhqd->bhqi", t, pr.alpha * z)
        torch.testing.assert_close(torch.softmax(logits, -1), reference, rtol=1e-12, atol=1e-12)
        r = fenchel_dual(t, z, log_u=pr.log_u, alpha=pr.alpha, return_lam=False)
        deviations[split] = r.relative_deviation[torch.isfinite(r.relative_deviation)].mean()
    assert not torch.isclose(deviations["paper"], deviations["unscaled_templates"])
