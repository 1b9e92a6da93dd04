"""One-sided entropic-OT certificates of attention rows and the policy-gradient form of backprop.

From "Scaled-Dot-Product Attention as One-Sided Entropic Optimal Transport" (Litman, arXiv:2508.08369).

Convention (tested in ``tests/analysis/test_eot.py``). For one query with raw scores s_j = <q, k_j>,
temperature epsilon (= tau, the inverse of the model's ``scaling``) and an optional prior given as
unnormalized log-weights b_j (T5's position bias; 0 for BERT and ViT; -inf on masked keys), the cost is
C_j = -s_j and the attention row solves

    min_p  <C, p> - epsilon H(p) - epsilon <p, b>       over the simplex on the unmasked keys,

(with b = 0 this is <C, p> - epsilon H(p)); its minimizer is p = softmax(s / epsilon + b) and its
minimum is the log-sum-exp dual value  -epsilon log sum_j exp(b_j - C_j / epsilon).  The gap primal - dual is
>= 0 for every p on the simplex and 0 exactly at the attention row, so for a softmax row it is zero up
to round-off. The dual potential phi(s) = epsilon log sum_j exp(b_j + s_j / epsilon) has gradient p and Hessian
(diag(p) - p p^T) / epsilon: the Fisher information of the categorical distribution p (scaled by 1 / epsilon).

Backprop: for any loss L of the row, with g_j = dL/dp_j,  dL/ds_j = p_j (g_j - E_p[g]) / epsilon — an
advantage-weighted policy gradient with baseline E_p[g].

Pure torch; no Transformers import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "EOTCertificates",
    "PolicyGradientCheck",
    "eot_certificates",
    "fisher_information",
    "policy_gradient_check",
]


@dataclass
class EOTCertificates:
    """Certificates for a batch of attention rows; every field has the batch shape of the rows.

    Attributes:
        primal: <C, p> - epsilon H(p) - epsilon <p, b>.
        dual: -epsilon log sum_j exp(b_j - C_j / epsilon).
        gap: primal - dual (>= 0; 0 up to round-off for the exact EOT solution).
        entropy: H(p) = -sum_j p_j log p_j (nats).
        fisher_top_eig: largest eigenvalue of diag(p) - p p^T.
        fisher_eff_rank: effective rank exp(H(lambda / sum lambda)) of the eigenvalues of
            diag(p) - p p^T (Roy & Vetterli, 2007); between 1 and n - 1, and 0 for a one-hot row.
    """

    primal: torch.Tensor
    dual: torch.Tensor
    gap: torch.Tensor
    entropy: torch.Tensor
    fisher_top_eig: torch.Tensor
    fisher_eff_rank: torch.Tensor


def fisher_information(p: torch.Tensor) -> torch.Tensor:
    """diag(p) - p p^T, the Fisher information of Categorical(p) and the Hessian of log-sum-exp at the
    scores whose softmax is p. ``p: (..., n) -> (..., n, n)``."""
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


def _fisher_spectrum(p: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    batch, n = p.shape[:-1], p.shape[-1]
    flat = p.reshape(-1, n)
    top = torch.empty(flat.shape[0], dtype=p.dtype, device=p.device)
    eff = torch.empty_like(top)
    for start in range(0, flat.shape[0], chunk):
        pc = flat[start : start + chunk]
        ev = torch.linalg.eigvalsh(fisher_information(pc)).clamp_min(0)
        top[start : start + chunk] = ev[..., -1]
        total = ev.sum(-1, keepdim=True)
        w = ev / total.clamp_min(torch.finfo(p.dtype).tiny)
        h = -torch.where(
            w > 0, w * torch.log(w.clamp_min(torch.finfo(p.dtype).tiny)), torch.zeros_like(w)
        ).sum(-1)
        # a one-hot row has zero Fisher information: rank 0
        eff[start : start + chunk] = torch.where(total.squeeze(-1) > 0, torch.exp(h), torch.zeros_like(h))
    return top.reshape(batch), eff.reshape(batch)


def eot_certificates(
    p: torch.Tensor,
    scores: torch.Tensor,
    *,
    epsilon: float = 1.0,
    log_prior: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    spectrum: bool = True,
) -> EOTCertificates:
    """Primal and dual values of the one-sided EOT problem for the attention rows `p`.

    Solves nothing: evaluates  <C, p> - epsilon H(p) - epsilon <p, b>  at the given rows and the dual
    -epsilon logsumexp(b - C / epsilon) with C = -scores, so that their gap certifies how far `p` is from the
    optimum (the gap equals epsilon KL(p || softmax(scores / epsilon + b))).

    Args:
        p: ``(..., n)`` attention rows (zero on masked keys).
        scores: ``(..., n)`` raw scores s_j = <q, k_j> (cost C_j = -s_j), broadcastable to `p`.
        epsilon: entropic regularization = softmax temperature tau (1 / scaling in Transformers).
        log_prior: ``(..., n)`` unnormalized log prior b (T5's position bias), broadcastable; 0 if None.
        mask: ``(..., n)`` bool, True for keys that may be attended to; default: all.
        spectrum: also compute the Fisher information's top eigenvalue and effective rank (an
            n x n eigendecomposition per row); NaN when False.
    """
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
    dtype = torch.promote_types(p.dtype, torch.float64)
    p = p.to(dtype)
    scores = scores.to(dtype)
    shape = torch.broadcast_shapes(p.shape, scores.shape)
    b = torch.zeros((), dtype=dtype, device=p.device) if log_prior is None else log_prior.to(dtype)
    valid = torch.ones(shape, dtype=torch.bool, device=p.device) if mask is None else mask.expand(shape)
    valid = valid & torch.isfinite(b).expand(shape)
    zero = torch.zeros((), dtype=dtype, device=p.device)
    p = p.expand(shape)
    logp = torch.where(p > 0, torch.log(p.clamp_min(torch.finfo(dtype).tiny)), zero)
    entropy = -torch.where(valid, p * logp, zero).sum(-1)
    cost_term = torch.where(valid, -scores * p, zero).sum(-1)
    prior_term = torch.where(valid, b * p, zero).sum(-1)
    primal = cost_term - epsilon * entropy - epsilon * prior_term
    logits = torch.where(valid, b + scores / epsilon, torch.full((), -torch.inf, dtype=dtype, device=p.device))
    dual = -epsilon * torch.logsumexp(logits, dim=-1)
    if spectrum:
        top, eff = _fisher_spectrum(torch.where(valid, p, zero))
    else:
        top = eff = torch.full(primal.shape, torch.nan, dtype=dtype, device=p.device)
    return EOTCertificates(
        primal=primal, dual=dual, gap=primal - dual, entropy=entropy, fisher_top_eig=top, fisher_eff_rank=eff
    )


@dataclass
class PolicyGradientCheck:
    """dL/ds by autograd against the policy-gradient formula p_j (g_j - E_p[g]) / epsilon.

    Attributes:
        grad_autograd: ``(..., n)`` dL/ds from backprop through the softmax.
        grad_policy: ``(..., n)`` p_j (g_j - E_p[g]) / epsilon with g = dL/dp.
        advantage: ``(..., n)`` g_j - E_p[g].
        residual: max |grad_autograd - grad_policy| (a scalar tensor).
        relative_residual: residual / max |grad_autograd|.
    """

    grad_autograd: torch.Tensor
    grad_policy: torch.Tensor
    advantage: torch.Tensor
    residual: torch.Tensor
    relative_residual: torch.Tensor


def _default_loss(out: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out * out).sum()


def policy_gradient_check(
    scores: torch.Tensor,
    values: torch.Tensor,
    *,
    epsilon: float = 1.0,
    log_prior: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> PolicyGradientCheck:
    """Checks dL/ds_j = p_j (g_j - E_p[g]) / epsilon for attention p = softmax(s / epsilon + b) and output
    o = p @ values.

    Args:
        scores: ``(..., q, n)`` raw scores.
        values: ``(..., n, d_v)`` value vectors, broadcastable against the batch dims of `scores`.
        epsilon, log_prior, mask: as in :func:`eot_certificates`.
        loss: scalar function of the output ``(..., q, d_v)``; default 0.5 * ||o||^2 summed.
    """
    loss = _default_loss if loss is None else loss
    values = values.detach()
    with torch.enable_grad():
        s = scores.detach().clone().requires_grad_(True)
        logits = s / epsilon
        if log_prior is not None:
            logits = logits + log_prior.detach()
        if mask is not None:
            logits = logits.masked_fill(~mask, -torch.inf)
        p = torch.softmax(logits, dim=-1)
        (grad_s,) = torch.autograd.grad(loss(p @ values), s)
        p_leaf = p.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss(p_leaf @ values), p_leaf)
    pd = p.detach()
    baseline = (pd * g).sum(-1, keepdim=True)
    adv = g - baseline
    formula = pd * adv / epsilon
    if mask is not None:
        grad_s = grad_s.masked_fill(~mask, 0.0)
        formula = formula.masked_fill(~mask, 0.0)
    res = (grad_s - formula).abs().amax() if grad_s.numel() else torch.zeros((), dtype=grad_s.dtype)
    scale = grad_s.abs().amax() if grad_s.numel() else torch.zeros((), dtype=grad_s.dtype)
    return PolicyGradientCheck(
        grad_autograd=grad_s,
        grad_policy=formula,
        advantage=adv,
        residual=res,
        relative_residual=res / scale.clamp_min(torch.finfo(grad_s.dtype).tiny),
    )
