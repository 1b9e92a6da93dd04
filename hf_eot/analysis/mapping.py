"""Architecture -> (t, z, u): how each pretrained attention layer poses the dual problem (paper 003, Sec. 8).

For one head with query/key projections (W_Q, b_Q), (W_K, b_K) and the model's score scaling
``scaling`` (1 / sqrt(d') in BERT and ViT, 1 in T5), the score of query x_k against key x_i is

    scaling <W_K x_i + b_K, W_Q x_k + b_Q> = <t_i, z> + (a term constant in i),
    t_i = scaling * x_i,   z = W_K^T (W_Q x_k + b_Q),   alpha = 1,

so eq. (16) with lambda = alpha z reproduces the softmax row exactly (the key bias only shifts every
score of the row by the same amount). x_i is the input of the attention module (the key-side input
for T5's cross-attention). The preference weights u are uniform on the unmasked keys (BERT, ViT) or
proportional to exp(position_bias) and zero on masked keys (T5: encoder self-attention, decoder
self-attention with its causal mask, and cross-attention, whose bias is zero), i.e. eq. (17).

The inputs are captured with forward hooks on the attention modules: nothing in Transformers is
patched, and the hooks are removed when :func:`capture_attention` exits. A model type is supported
when it has an entry in the registry (:func:`register_architecture`); others get
:class:`UnsupportedModelError`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..integration.modules import locate_attention

__all__ = [
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
    "supported_model_types",
]

COMPONENTS = ("encoder", "decoder", "cross")


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
    return sites


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
    """The dual problems of one attention call, for every head and query, in float64.

    Shapes: B batch, H heads, Q queries, K keys, D model width, d' head size.

    Attributes:
        t: ``(B, 1, 1, K, D)`` templates t_i = scaling * x_i (shared by all heads and queries).
        z: ``(B, H, Q, D)`` evidence z = W_K^T (W_Q x_k + b_Q).
        log_u: ``(B, H or 1, Q, K)`` unnormalized log preference weights; -inf on masked keys.
        alpha: 1.
        valid: ``(B, 1, Q, K)`` keys each query may attend to.
        scores: ``(B, H, Q, K)`` raw scores <q, k> with both biases (cost C = -scores).
        eps: entropic regularization 1 / scaling.
        log_prior: ``(B or 1, H, Q, K)`` T5's position bias, or None.
        values: ``(B, H, K, d')`` the head's value vectors (bias included).
        model_weights: ``(B, H, Q, K)`` the attention weights the model returned, or None.
    """

    t: torch.Tensor
    z: torch.Tensor
    log_u: torch.Tensor
    alpha: float
    valid: torch.Tensor
    scores: torch.Tensor
    eps: float
    log_prior: torch.Tensor | None
    values: torch.Tensor
    model_weights: torch.Tensor | None

    def attention(self, lam: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. (9)/(16): p_i proportional to u_i exp(<t_i, lam>), with lam = alpha z by default.
        ``lam: (B, H, Q, D)``; returns ``(B, H, Q, K)``."""
        lam = self.alpha * self.z if lam is None else lam
        logits = self.log_u + torch.einsum("bxyid,bhqd->bhqi", self.t, lam)
        return torch.softmax(logits, dim=-1)


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
    site: AttentionSite, call: CapturedCall, dtype: torch.dtype = torch.float64
) -> DualProblems:
    """Builds (t, z, u) and the EOT quantities of one captured call (see the module docstring)."""
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
    z = torch.einsum("bhqe,hed->bhqd", q, Wk)
    t = (scaling * xkv)[:, None, None]
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
        alpha=1.0,
        valid=valid,
        scores=scores,
        eps=1.0 / scaling,
        log_prior=log_prior,
        values=v,
        model_weights=call.weights.to(dtype) if call.weights is not None else None,
    )
