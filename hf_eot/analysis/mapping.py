"""Architecture -> (t, z, u): how each pretrained attention layer poses the dual problem.

From "Deciphering Attention Mechanisms: Optimization and Fenchel Dual Solutions" (anonymous, under
review; no arXiv id), Section 8. For one head with query/key projections (W_Q, b_Q), (W_K, b_K), the
model's score scaling ``scaling`` (1 / sqrt(d') in BERT and ViT, 1 in T5) and the softmax temperature
``epsilon`` of an hf_eot softmax layer (1 otherwise), the attention logit of query x_k for key x_i is

    scaling / epsilon <W_K x_i + b_K, W_Q x_k + b_Q> = alpha <t_i, z> + (a term constant in i),

which only fixes the product of the scales of t, z and alpha. The paper's split, used for every
architecture (T5 included), is

    t_i = x_i / sqrt(d'),   z = scaling sqrt(d') W_K^T (W_Q x_k + b_Q),   alpha = 1 / epsilon,

(for BERT and ViT: z = W_K^T q and alpha = 1, as in the paper), so eq. (16) with lambda = alpha z
reproduces the softmax row exactly (the key bias shifts every score of the row by the same amount).
Attention does not depend on the split; the dual problem, and lambda*, do: :data:`SPLITS` names the
alternatives the analysis reports beside it. x_i is the input of the attention module (the key-side
input for T5's cross-attention). The preference weights u are uniform on the unmasked keys (BERT, ViT)
or proportional to exp(position_bias) and zero on masked keys (T5's encoder and decoder
self-attention, with its causal mask, and cross-attention, whose bias is zero): eq. (17).

Only softmax attention has this dual: a layer configured with another hf_eot regularizer, or with a
named position prior, is refused (:func:`softmax_epsilon`).

The inputs are captured with forward hooks on the attention modules: nothing in Transformers is
patched, and the hooks are removed when :func:`capture_attention` exits. A model type is supported
when it has an entry in the registry (:func:`register_architecture`); others get
:class:`UnsupportedModelError`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import CONFIG_KEY, PARTS, EOTAttentionConfig
from ..integration.modules import locate_attention

__all__ = [
    "COMPONENTS",
    "COMPONENT_TITLES",
    "SPLITS",
    "ArchitectureSpec",
    "AttentionCapture",
    "AttentionSite",
    "CapturedCall",
    "DualProblems",
    "UnsupportedModelError",
    "attention_sites",
    "capture_attention",
    "dual_problems",
    "get_architecture",
    "register_architecture",
    "softmax_epsilon",
    "supported_model_types",
    "template_scale",
]

#: The kinds of attention, as named in ``config.eot_attention`` (:data:`hf_eot.config.PARTS`).
COMPONENTS: tuple[str, ...] = PARTS
COMPONENT_TITLES: dict[str, str] = {
    "encoder": "encoder self-attention",
    "decoder": "decoder self-attention",
    "cross": "cross-attention",
}
assert tuple(COMPONENT_TITLES) == COMPONENTS

#: Ways to split the score scale between templates and evidence: name -> (t_i, z) in words. The
#: attention is the same under each; "paper" is the mapping of Section 8.
SPLITS: dict[str, str] = {
    "paper": "t_i = x_i / sqrt(d'), z = scaling sqrt(d') W_K^T q",
    "unscaled_templates": "t_i = x_i, z = scaling W_K^T q",
    "unscaled_evidence": "t_i = scaling x_i, z = W_K^T q",
}


def template_scale(split: str, head_dim: int, scaling: float) -> float:
    """s with t_i = s x_i under `split` (z then carries scaling / s)."""
    if split == "paper":
        return head_dim**-0.5
    if split == "unscaled_templates":
        return 1.0
    if split == "unscaled_evidence":
        return scaling
    raise ValueError(f"unknown split {split!r}; valid choices: {list(SPLITS)}")


class UnsupportedModelError(ValueError):
    """The model has no (t, z, u) mapping (its ``config.model_type`` is not registered)."""


@dataclass(frozen=True)
class ArchitectureSpec:
    """How one model family exposes its attention.

    Attributes:
        model_type: ``config.model_type`` this spec serves.
        attention_class: class name of the attention module to hook.
        q, k, v: attribute names of the query, key and value projections (``nn.Linear``).
        n_heads_attr, head_dim_attr: attribute names of the head count and head size.
        hidden_arg, mask_arg: names of the forward arguments holding the query-side input and the mask.
        kv_arg: name of the key-side input of cross-attention (None: self-attention only).
        position_bias_output: index of the position bias in the module's output tuple (T5), or None.
    """

    model_type: str
    attention_class: str
    q: str
    k: str
    v: str
    n_heads_attr: str
    head_dim_attr: str
    hidden_arg: str = "hidden_states"
    mask_arg: str = "attention_mask"
    kv_arg: str | None = None
    position_bias_output: int | None = None


_REGISTRY: dict[str, ArchitectureSpec] = {}


def register_architecture(spec: ArchitectureSpec) -> None:
    """Adds a model family to the registry; refuses a model type that is already registered."""
    if spec.model_type in _REGISTRY:
        raise ValueError(f"model type {spec.model_type!r} is already registered")
    _REGISTRY[spec.model_type] = spec


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_architecture(model_or_type: nn.Module | str) -> ArchitectureSpec:
    """The spec for a model (by ``model.config.model_type``) or a model type string."""
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        config = getattr(model_or_type, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type is None:
            raise UnsupportedModelError(
                f"{type(model_or_type).__name__} has no config.model_type; supported model types: "
                f"{', '.join(supported_model_types())}"
            )
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"no (t, z, u) mapping for model type {model_type!r}; supported model types: "
            f"{', '.join(supported_model_types())}"
        ) from None


register_architecture(
    ArchitectureSpec(
        model_type="bert",
        attention_class="BertSelfAttention",
        q="query",
        k="key",
        v="value",
        n_heads_attr="num_attention_heads",
        head_dim_attr="attention_head_size",
    )
)
register_architecture(
    ArchitectureSpec(
        model_type="vit",
        attention_class="ViTAttention",
        q="q_proj",
        k="k_proj",
        v="v_proj",
        n_heads_attr="num_attention_heads",
        head_dim_attr="head_dim",
    )
)
register_architecture(
    ArchitectureSpec(
        model_type="t5",
        attention_class="T5Attention",
        q="q",
        k="k",
        v="v",
        n_heads_attr="n_heads",
        head_dim_attr="key_value_proj_dim",
        mask_arg="mask",
        kv_arg="key_value_states",
        position_bias_output=1,
    )
)


@dataclass(frozen=True)
class AttentionSite:
    """One hooked attention module: its role, layer and qualified name."""

    component: str
    layer: int
    name: str
    module: nn.Module = field(repr=False, compare=False)


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """All analysable attention modules of `model`, sorted by component then layer."""
    spec = get_architecture(model)
    sites = []
    for location in locate_attention(model):
        if type(location.module).__name__ != spec.attention_class:
            continue
        if location.part == "cross" and spec.kv_arg is None:
            raise UnsupportedModelError(f"{spec.model_type} cross-attention has no mapping yet")
        sites.append(AttentionSite(location.part, location.layer, location.name, location.module))
    if not sites:
        raise UnsupportedModelError(
            f"found no {spec.attention_class} modules in {type(model).__name__} (model type {spec.model_type!r})"
        )
    return sites  # locate_attention sorts by part (= component) then layer


@dataclass
class CapturedCall:
    """What one forward call of an attention module saw (detached)."""

    hidden: torch.Tensor  # (B, Q, D): query-side input
    kv: torch.Tensor  # (B, K, D): key-side input (the same tensor for self-attention)
    mask: torch.Tensor | None  # as the attention interface received it
    position_bias: torch.Tensor | None  # (B or 1, H, Q, K)
    weights: torch.Tensor | None  # (B, H, Q, K), when the attention implementation returns them
    self_attention: bool = True


@dataclass
class AttentionCapture:
    """Filled by :func:`capture_attention`: the sites and, per site name, one record per forward call."""

    sites: list[AttentionSite]
    calls: dict[str, list[CapturedCall]]

    def clear(self) -> None:
        for v in self.calls.values():
            v.clear()


@contextmanager
def capture_attention(model: nn.Module) -> Iterator[AttentionCapture]:
    """Registers forward hooks that record each attention module's inputs, mask, position bias and
    returned weights; removes them on exit."""
    spec = get_architecture(model)
    sites = attention_sites(model)
    capture = AttentionCapture(sites=sites, calls={s.name: [] for s in sites})
    handles = []

    for site in sites:
        signature = inspect.signature(site.module.forward)

        def hook(module, args, kwargs, output, _site=site, _sig=signature):
            bound = _sig.bind_partial(*args, **kwargs).arguments
            hidden = bound[spec.hidden_arg]
            kv = bound.get(spec.kv_arg) if spec.kv_arg else None
            mask = bound.get(spec.mask_arg)
            outputs = output if isinstance(output, tuple) else (output,)
            bias = outputs[spec.position_bias_output] if spec.position_bias_output is not None else None
            weights = outputs[-1] if len(outputs) > 1 and isinstance(outputs[-1], torch.Tensor) else None
            capture.calls[_site.name].append(
                CapturedCall(
                    hidden=hidden.detach(),
                    kv=(hidden if kv is None else kv).detach(),
                    mask=mask.detach() if isinstance(mask, torch.Tensor) else None,
                    position_bias=bias.detach() if isinstance(bias, torch.Tensor) else None,
                    weights=weights.detach() if weights is not None else None,
                    self_attention=kv is None,
                )
            )

        handles.append(site.module.register_forward_hook(hook, with_kwargs=True))
    try:
        yield capture
    finally:
        for h in handles:
            h.remove()


@dataclass
class DualProblems:
    """The dual problems of one attention call, for every head and query, in float64, under the paper's
    split (see the module docstring).

    Shapes: B batch, H heads, Q queries, K keys, D model width, d' head size.

    Attributes:
        t: ``(B, 1, 1, K, D)`` templates t_i = x_i / sqrt(d') (shared by all heads and queries).
        z: ``(B, H, Q, D)`` evidence z = scaling sqrt(d') W_K^T (W_Q x_k + b_Q).
        log_u: ``(B, H or 1, Q, K)`` unnormalized log preference weights; -inf on masked keys.
        alpha: 1 / epsilon.
        valid: ``(B, 1, Q, K)`` keys each query may attend to.
        scores: ``(B, H, Q, K)`` raw scores <q, k> with both biases (cost C = -scores).
        epsilon: entropic regularization of the one-sided EOT view, epsilon / scaling (the softmax
            temperature: the rows are softmax(scores / epsilon + log_prior)).
        log_prior: ``(B or 1, H, Q, K)`` T5's position bias, or None.
        values: ``(B, H, K, d')`` the head's value vectors (bias included).
        model_weights: ``(B, H, Q, K)`` the attention weights the model returned, or None.
        head_dim, scaling: d' and the model's score scaling, which fix the other splits.
    """

    t: torch.Tensor
    z: torch.Tensor
    log_u: torch.Tensor
    alpha: float
    valid: torch.Tensor
    scores: torch.Tensor
    epsilon: float
    log_prior: torch.Tensor | None
    values: torch.Tensor
    model_weights: torch.Tensor | None
    head_dim: int
    scaling: float

    def attention(self, lam: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. (9)/(16): p_i proportional to u_i exp(<t_i, lam>), with lam = alpha z by default.
        ``lam: (B, H, Q, D)``; returns ``(B, H, Q, K)``."""
        lam = self.alpha * self.z if lam is None else lam
        logits = self.log_u + torch.einsum("bxyid,bhqd->bhqi", self.t, lam)
        return torch.softmax(logits, dim=-1)

    def template_scale(self, split: str) -> float:
        """s with t_i = s x_i under `split` (:data:`SPLITS`)."""
        return template_scale(split, self.head_dim, self.scaling)

    def split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, z) under another split of the score scale; alpha <t_i, z> (the attention) is unchanged."""
        factor = self.template_scale(split) / self.template_scale("paper")
        return self.t * factor, self.z / factor


def softmax_epsilon(module: nn.Module, component: str, layer: int) -> float:
    """The softmax temperature epsilon that `module` (``component``, ``layer``) runs with.

    1 for a model without ``config.eot_attention`` or not running hf_eot's "eot" attention;
    the configured epsilon for an hf_eot softmax layer. Raises ValueError for layers configured with
    another regularizer or a named prior, whose weights the Fenchel dual (7) does not describe, and for a
    configured model that does not run the "eot" implementation (it would not compute what its config
    says).
    """
    config = module.config
    raw = getattr(config, CONFIG_KEY, None)
    if raw is None:
        return 1.0
    spec = EOTAttentionConfig.from_dict(raw).spec_for(layer, component)
    where = f"{component} layer {layer}"
    implementation = getattr(config, "_attn_implementation", None)
    if implementation != "eot":
        if spec.regularizer == "softmax" and spec.params.get("prior") is None and spec.params["epsilon"] == 1.0:
            return 1.0
        raise ValueError(
            f"config.{CONFIG_KEY} configures the {where} as {spec.to_dict()}, but the model runs the "
            f"{implementation!r} attention implementation, which ignores it; load or set the model with "
            "attn_implementation='eot' (after `import hf_eot`) to analyse what it is configured to compute"
        )
    if spec.regularizer != "softmax":
        raise ValueError(
            f"the {where} runs {spec.regularizer!r} attention; the Fenchel dual (7) analysed here is that of "
            "softmax attention (the KL term of problem (3), whose conjugate is log-sum-exp), so lambda* and "
            f"alpha z do not describe {spec.regularizer!r} weights. Analyse models whose attention is softmax "
            "(hf_eot's 'softmax' regularizer, any epsilon)"
        )
    if spec.params.get("prior") is not None:
        raise ValueError(
            f"the {where} runs softmax with prior={spec.params['prior']!r}; the prior would enter u (eq. 17), "
            "but the analysis reads position priors only from the model's own modules (T5's position "
            "bias). Analyse the model without a named prior"
        )
    return float(spec.params["epsilon"])


def _heads(weight: torch.Tensor, bias: torch.Tensor | None, n_heads: int, head_dim: int, dtype):
    w = weight.detach().to(dtype).reshape(n_heads, head_dim, -1)
    b = (
        torch.zeros(n_heads, head_dim, dtype=dtype, device=weight.device)
        if bias is None
        else bias.detach().to(dtype)
    )
    return w, b.reshape(n_heads, head_dim)


def _valid_keys(mask: torch.Tensor | None, causal: bool, B: int, Q: int, K: int, device) -> torch.Tensor:
    """(B, 1, Q, K) bool from whatever mask the attention interface received."""
    if mask is None:
        valid = torch.ones(1, 1, Q, K, dtype=torch.bool, device=device)
    elif mask.dtype == torch.bool:
        valid = mask[..., :Q, :K]
    else:
        valid = mask[..., :Q, :K] > torch.finfo(mask.dtype).min / 2
    if valid.dim() == 2:
        valid = valid[None, None]
    elif valid.dim() == 3:
        valid = valid[:, None]
    valid = valid.any(dim=1, keepdim=True) if valid.shape[1] != 1 else valid
    if causal:
        valid = valid & torch.ones(Q, K, dtype=torch.bool, device=device).tril()
    return valid.expand(B, 1, Q, K)


def dual_problems(
    site: AttentionSite, call: CapturedCall, epsilon: float = 1.0, dtype: torch.dtype = torch.float64
) -> DualProblems:
    """Builds (t, z, u) under the paper's split and the EOT quantities of one captured call (see the
    module docstring); `epsilon` is the softmax temperature the layer runs with
    (:func:`softmax_epsilon`)."""
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
    module = site.module
    spec = get_architecture(site.module.config.model_type) if hasattr(module, "config") else None
    if spec is None:
        raise UnsupportedModelError(f"attention module {site.name} has no config")
    H = int(getattr(module, spec.n_heads_attr))
    dh = int(getattr(module, spec.head_dim_attr))
    scaling = float(getattr(module, "scaling", dh**-0.5))
    q_lin, k_lin, v_lin = (getattr(module, a) for a in (spec.q, spec.k, spec.v))
    Wq, bq = _heads(q_lin.weight, q_lin.bias, H, dh, dtype)
    Wk, bk = _heads(k_lin.weight, k_lin.bias, H, dh, dtype)
    Wv, bv = _heads(v_lin.weight, v_lin.bias, H, dh, dtype)
    x = call.hidden.to(dtype)
    xkv = call.kv.to(dtype)
    B, Q, _ = x.shape
    K = xkv.shape[1]
    q = torch.einsum("bqd,hed->bhqe", x, Wq) + bq[None, :, None, :]
    k = torch.einsum("bkd,hed->bhke", xkv, Wk) + bk[None, :, None, :]
    v = torch.einsum("bkd,hed->bhke", xkv, Wv) + bv[None, :, None, :]
    s_t = template_scale("paper", dh, scaling)
    z = (scaling / s_t) * torch.einsum("bhqe,hed->bhqd", q, Wk)
    t = (s_t * xkv)[:, None, None]
    causal = bool(getattr(module, "is_causal", False)) and call.self_attention
    valid = _valid_keys(call.mask, causal, B, Q, K, x.device)
    neg_inf = torch.tensor(-torch.inf, dtype=dtype, device=x.device)
    log_prior = None
    if call.position_bias is not None:
        log_prior = call.position_bias.to(dtype)[..., -Q:, :K]
        log_u = torch.where(valid, log_prior, neg_inf)
    else:
        log_u = torch.where(valid, torch.zeros((), dtype=dtype, device=x.device), neg_inf)
    scores = torch.einsum("bhqe,bhke->bhqk", q, k)
    return DualProblems(
        t=t,
        z=z,
        log_u=log_u,
        alpha=1.0 / epsilon,
        valid=valid,
        scores=scores,
        epsilon=epsilon / scaling,
        log_prior=log_prior,
        values=v,
        model_weights=call.weights.to(dtype) if call.weights is not None else None,
        head_dim=dh,
        scaling=scaling,
    )
