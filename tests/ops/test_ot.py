"""Tests for hf_eot.ops.ot_weights: OT-based attention of "Deciphering Attention Mechanisms:
Optimization and Fenchel Dual Solutions", eq. (22) / Appendix D eq. (44)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hf_eot.ops.ot as ot_module
from hf_eot.ops import ot_weights, softmax_weights


def eq22_reference(
    scores: torch.Tensor,
    gram: torch.Tensor,
    mask: torch.Tensor | None,
    alpha: float,
    gamma: float,
    preference: torch.Tensor | None = None,
    C: float = 0.0,
) -> torch.Tensor:
    """Slow transcription of eq. (22) with explicit loops, float64, cost M(t_j, t_i) = -G_ji + C:
    p_j = sum_i u_i exp((alpha s_j - M_ji) / gamma) / Z_i, Z_i = sum_j' exp((alpha s_j' - M_j'i) / gamma),
    sums over the allowed keys only, u = preference renormalised over the allowed keys."""
    s = scores.double()
    batch = s.shape[:-2]
    n_q, n_k = s.shape[-2:]
    G = gram.double().expand(*batch, n_k, n_k)
    m = torch.ones_like(s, dtype=torch.bool) if mask is None else mask.expand(s.shape)
    pref = torch.ones(n_k, dtype=torch.float64) if preference is None else preference.double()
    pref = pref.expand(*batch, n_k)
    out = torch.zeros_like(s)
    for idx in itertools.product(*[range(b) for b in batch]):
        for q in range(n_q):
            valid = [j for j in range(n_k) if m[idx + (q, j)]]
            if not valid:
                continue
            tot = sum(float(pref[idx + (i,)]) for i in valid)
            for j in valid:
                acc = 0.0
                for i in valid:
                    u_i = float(pref[idx + (i,)]) / tot
                    M = lambda a, b, idx=idx: -float(G[idx + (a, b)]) + C  # noqa: E731
                    Z_i = sum(math.exp((alpha * float(s[idx + (q, jp)]) - M(jp, i)) / gamma) for jp in valid)
                    acc += u_i * math.exp((alpha * float(s[idx + (q, j)]) - M(j, i)) / gamma) / Z_i
                out[idx + (q, j)] = acc
    return out


def plain_reference(
    scores: torch.Tensor,
    gram: torch.Tensor,
    mask: torch.Tensor | None = None,
    alpha: float = 1.0,
    gamma: float = 1.0,
    preference: torch.Tensor | None = None,
) -> torch.Tensor:
    """The former implementation without chunking, through plain autograd: the (Q, K, K) tensor
    x_qj + g_ji, a log-softmax over j for each source template i, the u-mixture over i."""
    x = scores * alpha / gamma  # (..., Q, K)
    n_k = x.shape[-1]
    pref = torch.ones(n_k, dtype=x.dtype) if preference is None else preference
    u = pref.unsqueeze(-2) if pref.dim() < x.dim() else pref
    if mask is not None:
        u = torch.where(mask, u, 0.0)
        x = torch.where(mask, x, float("-inf"))
        x = torch.where(mask.any(-1, keepdim=True), x, 0.0)
    u = u / u.sum(-1, keepdim=True).clamp_min(1e-300)
    a = x.unsqueeze(-1) + (gram / gamma).unsqueeze(-3)  # (..., Q, K_j, K_i)
    P = torch.softmax(a, dim=-2)
    return (P * u.unsqueeze(-2)).sum(-1)


def attention_problem(seed: int, n: int, d: int, scale: float, dtype: torch.dtype = torch.float32):
    """Scores and gram of random keys / queries as in attention: (2, 2, n, n), (2, 2, n, n)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2, n, d, generator=gen, dtype=torch.float64) * scale
    k = torch.randn(2, 2, n, d, generator=gen, dtype=torch.float64)
    return (q @ k.mT / d**0.5).to(dtype), (k @ k.mT / d**0.5).to(dtype)


def count_fallbacks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls of the exact (chunked) fallback."""
    calls = [0]
    exact = ot_module._exact_forward

    def spy(*args):
        calls[0] += 1
        return exact(*args)

    monkeypatch.setattr(ot_module, "_exact_forward", spy)
    return calls


def grads(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], seed: int) -> tuple[torch.Tensor, ...]:
    h = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.autograd.grad((out.double() * h).sum(), inputs)


def test_gemm_path_matches_former_implementation_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attention-sized float32 problem with key padding and a preference: the GEMM formulation
    (no fallback taken) gives the values and the gradients w.r.t. scores, gram and preference of
    the former implementation (float64) to 1e-5."""
    calls = count_fallbacks(monkeypatch)
    scores, gram = attention_problem(0, 48, 8, 1.0)
    mask = torch.ones(2, 1, 1, 48, dtype=torch.bool)
    mask[1, ..., 40:] = False
    pref = torch.rand(2, 1, 48, generator=torch.Generator().manual_seed(1)) + 0.1
    ins32 = tuple(t.clone().requires_grad_() for t in (scores, gram, pref))
    ins64 = tuple(t.double().requires_grad_() for t in (scores, gram, pref))
    out = ot_weights(ins32[0], ins32[1], mask, alpha=1.3, gamma=2.0, preference=ins32[2])
    ref = plain_reference(ins64[0], ins64[1], mask, 1.3, 2.0, ins64[2])
    assert calls[0] == 0
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-5)
    for got, want in zip(grads(out, ins32, 2), grads(ref, ins64, 2), strict=True):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype,calls_expected", [(torch.float32, True), (torch.float64, False)])
def test_underflowing_rows_fall_back_to_the_exact_computation(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, calls_expected: bool
) -> None:
    """Half of the queries have score spreads of ~100 and the gram entries spread ~100 (their
    GEMM products underflow in float32, not in float64): the float32 call recomputes those rows exactly, the float64 one stays on the
    GEMMs, and both give the former implementation's values and gradients."""
    calls = count_fallbacks(monkeypatch)
    scores, gram = attention_problem(3, 24, 4, 1.0, dtype)
    scores[:, :, ::2] *= 40.0
    gram = gram * 30.0
    ins = tuple(t.clone().requires_grad_() for t in (scores, gram))
    ins64 = tuple(t.double().requires_grad_() for t in (scores, gram))
    out = ot_weights(*ins, gamma=1.0)
    ref = plain_reference(*ins64)
    assert (calls[0] > 0) == calls_expected
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    for got, want in zip(grads(out, ins, 4), grads(ref, ins64, 4), strict=True):
        torch.testing.assert_close(got.double(), want, atol=10 * tol, rtol=10 * tol)


def test_gradcheck_with_exact_fallback_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """gradcheck (float64) where one row takes the exact fallback (its top key has a gram entry
    500 below each other column's maximum: a gap > 354) and the others the GEMMs: the merged
    backward is the derivative of the merged forward."""
    calls = count_fallbacks(monkeypatch)
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    scores[1, 0] += 2000.0
    gram = 500.0 * torch.eye(5, dtype=torch.float64) + torch.randn(5, 5, generator=gen, dtype=torch.float64)
    mask = torch.ones(5, 5, dtype=torch.bool)
    mask[3, 1] = False
    inputs = tuple(t.clone().requires_grad_() for t in (scores, gram))
    ot_weights(*inputs, mask)
    assert calls[0] == 1
    assert torch.autograd.gradcheck(lambda s, g: ot_weights(s, g, mask, gamma=1.0), inputs)


def random_problem(seed: int, batch: tuple[int, ...], n_q: int, n_k: int, d: int = 3):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(*batch, n_k, d, generator=gen, dtype=torch.float64)
    z = torch.randn(*batch, n_q, d, generator=gen, dtype=torch.float64)
    scores = z @ keys.transpose(-1, -2)
    gram = keys @ keys.transpose(-1, -2)
    return scores, gram, gen


@pytest.mark.parametrize("chunk_size", [1, 2, None])
@pytest.mark.parametrize("alpha,gamma", [(1.0, 1.0), (0.5, 2.0), (2.0, 0.7)])
def test_matches_eq22_reference_with_mask(chunk_size: int | None, alpha: float, gamma: float) -> None:
    """Same values as the loop transcription of eq. (22) (float64), with a random mask including a
    fully masked query, for any chunking over the source templates i."""
    scores, gram, gen = random_problem(0, (2,), 4, 5)
    mask = torch.rand(2, 4, 5, generator=gen) > 0.3
    mask[1, 2] = False
    out = ot_weights(scores, gram, mask, alpha=alpha, gamma=gamma, chunk_size=chunk_size)
    ref = eq22_reference(scores, gram, mask, alpha, gamma)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    assert (out[~mask] == 0).all() and (out[1, 2] == 0).all()
    valid = mask.any(-1)
    torch.testing.assert_close(out.sum(-1)[valid], torch.ones(int(valid.sum()), dtype=torch.float64))


def test_matches_reference_with_preference_and_broadcast_gram() -> None:
    """A non-uniform preference u (renormalised over allowed keys) and a gram shared across heads
    ((B, 1, K, K) against (B, H, Q, K) scores)."""
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 1, 6, 4, generator=gen, dtype=torch.float64)
    scores = torch.randn(2, 3, 3, 6, generator=gen, dtype=torch.float64)
    gram = keys @ keys.transpose(-1, -2)
    pref = torch.rand(2, 1, 6, generator=gen, dtype=torch.float64) + 0.1
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[1, ..., 4:] = False
    out = ot_weights(scores, gram, mask, gamma=1.5, preference=pref, chunk_size=4)
    ref = eq22_reference(scores, gram, mask, 1.0, 1.5, preference=pref)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)


def test_invariant_to_the_cost_constant_C() -> None:
    """M = -G + C: the constant C cancels between numerator and Z_i (eq. (22))."""
    scores, gram, _ = random_problem(2, (), 3, 5)
    base = ot_weights(scores, gram, gamma=0.8)
    torch.testing.assert_close(ot_weights(scores, gram - 37.5, gamma=0.8), base, atol=1e-12, rtol=0)
    torch.testing.assert_close(eq22_reference(scores, gram, None, 1.0, 0.8, C=37.5), base, atol=1e-12, rtol=0)


def test_gamma_to_infinity_gives_uniform_weights_over_allowed_keys() -> None:
    """Every exponent (alpha s_j + G_ji) / gamma -> 0, so each per-i softmax, hence p, tends to the
    uniform distribution over the allowed keys (whatever u)."""
    scores, gram, gen = random_problem(3, (2,), 4, 6)
    mask = torch.rand(2, 4, 6, generator=gen) > 0.3
    mask[..., 0] = True
    out = ot_weights(scores, gram, mask, gamma=1e7)
    uniform = mask.double() / mask.sum(-1, keepdim=True)
    torch.testing.assert_close(out, uniform, atol=1e-6, rtol=0)


def test_zero_gram_is_softmax_and_dominant_diagonal_is_preference() -> None:
    """G = 0 (no template similarity): p = softmax(alpha s / gamma) for any u.  A dominant diagonal
    (every template closest to itself, the grouping example of Section 9): p = u."""
    scores, _, gen = random_problem(4, (), 4, 5)
    pref = torch.rand(5, generator=gen, dtype=torch.float64) + 0.1
    zero = torch.zeros(5, 5, dtype=torch.float64)
    torch.testing.assert_close(
        ot_weights(scores, zero, alpha=2.0, gamma=3.0, preference=pref), softmax_weights(scores * 2.0 / 3.0)
    )
    diag = torch.eye(5, dtype=torch.float64) * 1e4
    out = ot_weights(scores, diag, preference=pref)
    torch.testing.assert_close(out, (pref / pref.sum()).expand(4, 5), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-6), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_low_precision_dtypes_match_float64(dtype: torch.dtype, atol: float) -> None:
    """Half dtypes are computed in float32 and returned in their dtype."""
    scores, gram, _ = random_problem(5, (2,), 5, 7)
    out = ot_weights(scores.to(dtype), gram.to(dtype), gamma=2.0)
    assert out.dtype == dtype
    ref = ot_weights(scores.to(dtype).double(), gram.to(dtype).double(), gamma=2.0)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=0)


def test_gradcheck_all_inputs() -> None:
    """gradcheck (float64, chunked) w.r.t. scores, template gram, preference, alpha and gamma,
    with a mask including a fully masked query (custom chunked backward)."""
    scores, gram, gen = random_problem(6, (2,), 3, 4)
    mask = torch.rand(2, 3, 4, generator=gen) > 0.25
    mask[0, 1] = False
    pref = torch.rand(2, 4, generator=gen, dtype=torch.float64) + 0.2
    alpha = torch.tensor(0.8, dtype=torch.float64)
    gamma = torch.tensor(1.3, dtype=torch.float64)
    inputs = tuple(t.clone().requires_grad_() for t in (scores, gram, pref, alpha, gamma))

    def fn(s, g, p, a, c):
        return ot_weights(s, g, mask, alpha=a, gamma=c, preference=p, chunk_size=3)

    assert torch.autograd.gradcheck(fn, inputs)


def test_fully_masked_row_and_masked_keys_get_zero_gradient() -> None:
    """Masked scores and fully masked queries receive exactly 0 gradient; all gradients finite."""
    scores, gram, gen = random_problem(7, (), 4, 5)
    s = scores.clone().requires_grad_()
    g = gram.clone().requires_grad_()
    mask = torch.rand(4, 5, generator=gen) > 0.3
    mask[2] = False
    ot_weights(s, g, mask).pow(2).sum().backward()
    assert (s.grad[~mask] == 0).all() and (s.grad[2] == 0).all()
    assert torch.isfinite(g.grad).all()


@settings(max_examples=25, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    scale=st.sampled_from([1.0, 1e2, 1e4]),
    n_k=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    p_masked=st.floats(0.0, 1.0),
)
def test_extreme_scores_and_random_masks_stay_finite(
    dtype: torch.dtype, scale: float, n_k: int, seed: int, p_masked: float
) -> None:
    """Scores and gram entries up to +-1e4 in any dtype, any mask: finite weights and gradients,
    valid rows sum to 1, masked entries and fully masked rows exactly 0."""
    gen = torch.Generator().manual_seed(seed)
    s = (torch.randn(2, 3, n_k, generator=gen) * scale).clamp(-1e4, 1e4).to(dtype).requires_grad_()
    g = (torch.randn(2, n_k, n_k, generator=gen) * scale).clamp(-1e4, 1e4).to(dtype).requires_grad_()
    mask = torch.rand(2, 3, n_k, generator=gen) > p_masked
    out = ot_weights(s, g, mask, chunk_size=2)
    assert torch.isfinite(out).all() and (out[~mask] == 0).all()
    rv = mask.any(-1)
    sums = out.float().sum(-1)
    assert torch.allclose(sums[rv], torch.ones(int(rv.sum())), atol=2e-2) and (sums[~rv] == 0).all()
    out.float().square().sum().backward()
    assert torch.isfinite(s.grad.float()).all() and torch.isfinite(g.grad.float()).all()


def test_bad_inputs_raise() -> None:
    """Wrong gram shape, non-broadcastable batch, bad alpha/gamma/chunk_size/preference rejected."""
    s = torch.randn(2, 3, 4)
    g = torch.randn(2, 4, 4)
    with pytest.raises(ValueError):
        ot_weights(s, torch.randn(2, 4, 5))
    with pytest.raises(ValueError):
        ot_weights(s, torch.randn(3, 4, 4))
    for kwargs in ({"alpha": 0.0}, {"gamma": -1.0}, {"chunk_size": 0}):
        with pytest.raises(ValueError):
            ot_weights(s, g, **kwargs)
    with pytest.raises(ValueError):
        ot_weights(s, g, preference=torch.ones(5))
    with pytest.raises(TypeError):
        ot_weights(s, g, torch.ones(2, 3, 4))
    with pytest.raises(TypeError):
        ot_weights(s, g.long())


def test_per_query_preference_matches_each_query_alone() -> None:
    """A preference with the dims of the scores is one u per query: row q equals the call with u_q."""
    torch.manual_seed(3)
    scores = torch.randn(2, 3, 5, dtype=torch.float64)
    gram = torch.randn(2, 5, 5, dtype=torch.float64)
    pref = torch.rand(2, 3, 5, dtype=torch.float64) + 0.1
    out = ot_weights(scores, gram, preference=pref, gamma=1.3)
    for q in range(3):
        alone = ot_weights(scores[:, q : q + 1], gram, preference=pref[:, q], gamma=1.3)
        torch.testing.assert_close(out[:, q : q + 1], alone)
