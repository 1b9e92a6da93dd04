"""Tests for hf_eot.ops entmax15 / Newton alpha-entmax / entmax dispatch against the `entmax` package."""

from __future__ import annotations

import pytest
import torch
from entmax import entmax15, entmax_bisect
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_eot.ops import (
    entmax15_weights,
    entmax_bisect_weights,
    entmax_newton_weights,
    entmax_weights,
    softmax_weights,
    sparsemax_weights,
)

# dtype -> atol of the output against the package run in float64 on the same (rounded) input
TOL = {torch.float64: 1e-12, torch.float32: 3e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
NEWTON_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


def package_on_valid_entries(fn, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reference: a package map (float64) applied to the allowed entries of each row only."""
    xd = x.double().reshape(-1, x.shape[-1])
    m = mask.expand(x.shape).reshape(-1, x.shape[-1])
    out = torch.zeros_like(xd)
    for r in range(xd.shape[0]):
        if m[r].any():
            out[r][m[r]] = fn(xd[r][m[r]])
    return out.reshape(x.shape)


# ------------------------------------------------------------------------------------ 1.5-entmax


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape", [(9,), (4, 7), (2, 3, 5, 40), (2, 2, 16, 300)])
@pytest.mark.parametrize("scale", [0.05, 1.0, 10.0])
def test_entmax15_unmasked_matches_package(dtype: torch.dtype, shape: tuple[int, ...], scale: float) -> None:
    """Same values and exact zeros as entmax.entmax15 (full sort), full-sort and top-k paths."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    out = entmax15_weights(x)
    assert out.dtype == dtype and out.shape == x.shape
    ref = entmax15(x.double(), dim=-1)
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=0)
    if dtype == torch.float64:
        assert torch.equal(out == 0, ref == 0)


def test_entmax15_topk_fallback_rows_are_exact() -> None:
    """Rows with a much larger support than the sampled estimate are recomputed exactly."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1000, 200, generator=gen, dtype=torch.float64) * 8
    for r in (1, 500, 998):
        x[r] = torch.randn(200, generator=gen, dtype=torch.float64) * 0.01
    torch.testing.assert_close(entmax15_weights(x), entmax15(x, dim=-1), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_keys", [6, 150])
def test_entmax15_masked_matches_package_on_valid_entries(dtype: torch.dtype, n_keys: int) -> None:
    """Masked: the package on the allowed entries; masked entries and fully masked rows are 0."""
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 3, 5, n_keys, generator=gen, dtype=torch.float64) * 2).to(dtype)
    mask = torch.rand(2, 3, 5, n_keys, generator=gen) > 0.4
    mask[1, 2, 3] = False
    out = entmax15_weights(x, mask)
    ref = package_on_valid_entries(lambda v: entmax15(v, dim=-1), x, mask)
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=0)
    assert (out[~mask] == 0).all() and (out[1, 2, 3] == 0).all()
    valid = mask.any(-1)
    torch.testing.assert_close(
        out.double().sum(-1)[valid],
        torch.ones(int(valid.sum()), dtype=torch.float64),
        atol=10 * TOL[dtype],
        rtol=0,
    )


@pytest.mark.parametrize("n_keys", [7, 120])
def test_entmax15_gradient_matches_package(n_keys: int) -> None:
    """Vector-Jacobian products equal the package's (float64)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, n_keys, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 4, n_keys, generator=gen, dtype=torch.float64)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    entmax15_weights(a).backward(g)
    entmax15(b, dim=-1).backward(g)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=0)


def test_entmax15_gradcheck_float64_with_mask() -> None:
    """gradcheck in float64 with a mask and a fully masked row (gradient exactly 0 there)."""
    gen = torch.Generator().manual_seed(4)
    x = (torch.randperm(40, generator=gen).double() / 6.9).reshape(2, 4, 5).requires_grad_()
    mask = torch.rand(2, 4, 5, generator=gen) > 0.3
    mask[0, 3] = False
    assert torch.autograd.gradcheck(lambda t: entmax15_weights(t, mask), (x,))
    entmax15_weights(x, mask).sum().backward()
    assert (x.grad[0, 3] == 0).all() and (x.grad[~mask] == 0).all()


# ----------------------------------------------------------------------------- Newton alpha-entmax


@pytest.mark.parametrize("dtype", list(NEWTON_TOL))
@pytest.mark.parametrize("alpha", [1.1, 1.25, 1.5, 1.75, 2.5, 4.0])
def test_newton_unmasked_matches_package(dtype: torch.dtype, alpha: float) -> None:
    """Same values as entmax.entmax_bisect (float64 reference) for a range of alpha."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 3, 4, 33, generator=gen, dtype=torch.float64) * 2).to(dtype)
    out = entmax_newton_weights(x, alpha)
    assert out.dtype == dtype
    ref = entmax_bisect(x.double(), alpha, dim=-1)
    torch.testing.assert_close(out.double(), ref, atol=NEWTON_TOL[dtype], rtol=0)


def test_newton_masked_matches_package_on_valid_entries() -> None:
    """Masked rows equal the package on the allowed entries; masked/fully masked entries are 0."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 5, 12, generator=gen, dtype=torch.float64) * 2
    mask = torch.rand(2, 3, 5, 12, generator=gen) > 0.4
    mask[0, 1, 2] = False
    out = entmax_newton_weights(x, 1.3, mask)
    ref = package_on_valid_entries(lambda v: entmax_bisect(v, 1.3, dim=-1), x, mask)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    assert (out[~mask] == 0).all() and (out[0, 1, 2] == 0).all()


def test_newton_alpha2_is_sparsemax_and_alpha15_is_entmax15() -> None:
    """At alpha = 2 the Newton solver reproduces sparsemax, at alpha = 1.5 the exact 1.5-entmax."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 6, 25, generator=gen, dtype=torch.float64) * 3
    mask = torch.rand(3, 6, 25, generator=gen) > 0.2
    torch.testing.assert_close(
        entmax_newton_weights(x, 2.0, mask), sparsemax_weights(x, mask), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(
        entmax_newton_weights(x, 1.5, mask), entmax15_weights(x, mask), atol=1e-12, rtol=0
    )


def test_newton_approaches_softmax_as_alpha_goes_to_1() -> None:
    """The distance to softmax shrinks as alpha -> 1 (about linearly in alpha - 1)."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(4, 10, generator=gen, dtype=torch.float64)
    sm = softmax_weights(x)
    dists = [(entmax_newton_weights(x, 1 + d) - sm).abs().max().item() for d in (1e-1, 1e-2, 1e-3)]
    assert dists[0] > dists[1] > dists[2]
    assert dists[2] < 1e-3


def test_newton_per_head_alpha_tensor() -> None:
    """A (n_heads, 1, 1) alpha applies one alpha per head (convex and non-convex cases mixed in one
    call); equals per-head float calls."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 4, 8, generator=gen, dtype=torch.float64)
    alpha = torch.tensor([1.2, 1.5, 2.0, 3.0], dtype=torch.float64).view(4, 1, 1)
    x = torch.cat([x, x[:, :1] * 2], dim=1)
    out = entmax_newton_weights(x, alpha)
    for h, a in enumerate(alpha.flatten().tolist()):
        torch.testing.assert_close(out[:, h], entmax_newton_weights(x[:, h], a), atol=1e-12, rtol=0)


def test_newton_gradients_match_package_logits_and_alpha() -> None:
    """Gradients w.r.t. logits and a per-row alpha equal the package's (Correia et al. 2019)."""
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    alpha = 1.2 + torch.rand(5, 1, generator=gen, dtype=torch.float64)
    g = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    xa, aa = x.clone().requires_grad_(), alpha.clone().requires_grad_()
    xb, ab = x.clone().requires_grad_(), alpha.clone().requires_grad_()
    entmax_newton_weights(xa, aa).backward(g)
    entmax_bisect(xb, ab, dim=-1).backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(aa.grad, ab.grad, atol=1e-9, rtol=1e-7)


def test_newton_gradcheck_logits_and_per_head_alpha() -> None:
    """gradcheck (float64) w.r.t. logits and a per-head alpha tensor, with a mask."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64).requires_grad_()
    alpha = torch.tensor([1.3, 1.6], dtype=torch.float64).view(2, 1, 1).requires_grad_()
    mask = torch.rand(2, 3, 4, generator=gen) > 0.25
    mask[1, 0] = False
    assert torch.autograd.gradcheck(lambda t, a: entmax_newton_weights(t, a, mask), (x, alpha), atol=1e-6)


def test_newton_fully_masked_row_zero_and_finite_grads() -> None:
    """Fully masked rows: 0 weights, 0 gradient for logits, finite alpha gradient."""
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor(1.4, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 3, 5, dtype=torch.bool)
    mask[0, 2] = False
    out = entmax_newton_weights(x, alpha, mask)
    assert (out[0, 2] == 0).all()
    out.pow(2).sum().backward()
    assert (x.grad[0, 2] == 0).all() and torch.isfinite(alpha.grad)


@pytest.mark.parametrize("alpha", [1.01, 1.2, 1.3, 1.6, 1.9, 1.99])
@pytest.mark.parametrize("scale", [0.1, 1.0, 30.0])
def test_newton_float32_is_exact_to_round_off(alpha: float, scale: float) -> None:
    """float32 results equal the package's float64 bisection (100 steps, on the same rounded
    input) to float32 round-off (3e-6, as the exact 1.5-entmax), for alpha in (1, 2) and score
    scales from 0.1 to 30."""
    gen = torch.Generator().manual_seed(13)
    x = (torch.randn(3, 16, 300, generator=gen) * scale)
    ref = entmax_bisect(x.double(), alpha, dim=-1, n_iter=100)
    torch.testing.assert_close(entmax_newton_weights(x, alpha).double(), ref, atol=TOL[torch.float32], rtol=0)


@pytest.mark.parametrize("alpha", [1.05, 1.3, 1.7, 2.0])
def test_newton_converges_in_a_few_steps(alpha: float) -> None:
    """For alpha <= 2 at most 8 Newton steps give the same float64 result as 50 (to 1e-14), over
    score scales from 0.01 to 100 and a mask; 1 step is not enough (the check is not vacuous)."""
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(4, 32, 200, generator=gen, dtype=torch.float64) * torch.logspace(-2, 2, 4).view(4, 1, 1)
    mask = torch.rand(4, 32, 200, generator=gen) > 0.3
    full = entmax_newton_weights(x, alpha, mask, max_iters=50)
    torch.testing.assert_close(entmax_newton_weights(x, alpha, mask, max_iters=8), full, atol=1e-14, rtol=0)
    assert (entmax_newton_weights(x, alpha, mask, max_iters=1) - full).abs().max() > 1e-6


@pytest.mark.parametrize("alpha", [1.05, 1.3, 1.7, 1.95, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_newton_is_exact_to_round_off_on_clustered_scores(alpha: float, dtype: torch.dtype) -> None:
    """Rows of a few clusters of nearly equal scores, each solved alone (the iteration stops when all rows
    of a call are done), where Newton's steps shrink quadratically only late, so that a stopping test
    extrapolating from the early steps stops too soon: the threshold iteration still ends at round-off
    (1e-6 in float32, 1e-13 in float64) of the package's float64 bisection (200 steps)."""
    gen = torch.Generator().manual_seed(15)
    rows = [torch.tensor([0.0, -0.01] + [-0.2] * 50, dtype=torch.float64) / 0.7]
    for _ in range(30):
        centers = torch.rand(4, generator=gen, dtype=torch.float64) * 3
        members = torch.randint(0, 4, (52,), generator=gen)
        rows.append(centers[members] + 1e-3 * torch.randn(52, generator=gen, dtype=torch.float64))
    atol = 1e-6 if dtype == torch.float32 else 1e-13
    for x in rows:
        x = x.to(dtype).unsqueeze(0)
        ref = entmax_bisect(x.double(), alpha, dim=-1, n_iter=200)
        torch.testing.assert_close(entmax_newton_weights(x, alpha).double(), ref, atol=atol, rtol=0)


def test_former_name_and_max_iters_keyword() -> None:
    """entmax_bisect_weights(n_iter=k) is entmax_newton_weights(max_iters=k), and entmax_weights
    forwards max_iters (a 1-step cap changes a non-closed-form alpha, not alpha = 1.5)."""
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(3, 40, generator=gen, dtype=torch.float64) * 3
    for k in (1, 3, 50):
        assert torch.equal(entmax_bisect_weights(x, 1.3, n_iter=k), entmax_newton_weights(x, 1.3, max_iters=k))
        assert torch.equal(entmax_weights(x, 1.3, max_iters=k), entmax_newton_weights(x, 1.3, max_iters=k))
    assert not torch.equal(entmax_weights(x, 1.3, max_iters=1), entmax_weights(x, 1.3))
    assert torch.equal(entmax_weights(x, 1.5, max_iters=1), entmax15_weights(x))


# -------------------------------------------------------------------------------------- dispatch


def test_entmax_weights_dispatch() -> None:
    """alpha 1 -> softmax, 1.5 -> exact entmax15, 2 -> sparsemax (bit-identical), else Newton
    (a float alpha or any tensor, even one equal to 1.5)."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(3, 4, 20, generator=gen)
    mask = torch.rand(3, 4, 20, generator=gen) > 0.3
    assert torch.equal(entmax_weights(x, 1.0, mask), softmax_weights(x, mask))
    assert torch.equal(entmax_weights(x, 1.5, mask), entmax15_weights(x, mask))
    assert torch.equal(entmax_weights(x, 2, mask), sparsemax_weights(x, mask))
    assert torch.equal(entmax_weights(x, 1.7, mask), entmax_newton_weights(x, 1.7, mask))
    a = torch.tensor(1.5)
    assert torch.equal(entmax_weights(x, a, mask), entmax_newton_weights(x, a, mask))


@settings(max_examples=30, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    alpha=st.sampled_from([1.5, 1.2, 2.0, 3.0]),
    n_keys=st.sampled_from([1, 4, 19, 130]),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([0.01, 1.0, 1e2, 1e4]),
    p_masked=st.floats(0.0, 1.0),
)
def test_extreme_scores_and_random_masks(
    dtype: torch.dtype, alpha: float, n_keys: int, seed: int, scale: float, p_masked: float
) -> None:
    """Any mask and scores up to +-1e4 in any dtype, exact (1.5) and Newton paths: finite
    weights and gradients, masked entries 0, valid rows sum to 1, invalid rows 0."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, 3, n_keys, generator=gen) * scale).clamp(-1e4, 1e4).to(dtype).requires_grad_()
    mask = torch.rand(2, 3, n_keys, generator=gen) > p_masked
    for out in (entmax_weights(x, alpha, mask), entmax_newton_weights(x, alpha, mask)):
        assert torch.isfinite(out).all() and (out >= 0).all()
        assert (out[~mask] == 0).all()
        valid = mask.any(-1)
        sums = out.double().sum(-1)
        assert torch.allclose(sums[valid], torch.ones_like(sums[valid]), atol=2e-2)
        assert (sums[~valid] == 0).all()
        x.grad = None
        out.float().pow(2).sum().backward()
        assert torch.isfinite(x.grad.float()).all() and (x.grad[~mask] == 0).all()


def test_bad_inputs_raise() -> None:
    """alpha <= 1 or infinite, a non-float alpha, an alpha tensor of the wrong shape, bad max_iters
    are rejected."""
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="alpha"):
        entmax_newton_weights(x, 1.0)  # (entmax_weights maps alpha = 1 to softmax)
    for bad in (0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            entmax_weights(x, bad)
    with pytest.raises(TypeError):
        entmax_newton_weights(x, "1.5")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        entmax_newton_weights(x, torch.tensor(2))
    with pytest.raises(ValueError):
        entmax_newton_weights(x, torch.full((4,), 1.5))  # would broadcast over keys
    for bad_iters in (0, 2.5, True):
        with pytest.raises(ValueError, match="max_iters"):
            entmax_weights(x, 1.3, max_iters=bad_iters)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        entmax15_weights(x, torch.ones(2, 3, 4))


@pytest.mark.parametrize("alpha", [1.1, 1.3, 1.4, 1.52, 1.99])
def test_nonnegative_power_matches_pow(alpha: float) -> None:
    """t^r computed as exp(r log t) on CPU (Newton's sums, the weights) equals torch.pow to float32 round-off
    relative to each row's sum (1e-6), over rows whose largest entry is about 0.5 or 0.05 (Newton's rows
    reach at least (1/d)^(alpha-1), 0.2 at 200 keys) and entries down to 1e-30; zeros give exactly 0, or for
    the sums at most the floor (the smallest normal number to the power 0.9, 8e-35) where the smallest
    normal number's power is below it (exponents from 0.9: alpha up to about 1.53, not 1.99: 0^0.01 would
    be 0.4); exponents that torch.pow computes fast keep torch.pow."""
    from hf_eot.ops.entmax import _exp_log_pays, _nonnegative_power, _zeros_vanish

    exponent = 1.0 / (alpha - 1.0) - 1.0
    gen = torch.Generator().manual_seed(15)
    t = (torch.rand(64, 200, generator=gen) - 0.5).clamp_(min=0.0)
    t[:, :20] *= 1e-30
    t[:8] *= 0.1
    assert _exp_log_pays(exponent, t) and (t == 0).any()
    exact = t.double().pow(exponent)
    sums = exact.sum(dim=-1, keepdim=True)
    for for_sums in (False, True):
        ours = _nonnegative_power(t, exponent, for_sums=for_sums).double()
        assert ((ours - exact).abs() / sums).max() < 1e-6
        zeros = ours[t == 0]
        if for_sums and _zeros_vanish(exponent, t.dtype):
            assert alpha < 1.53 and (zeros <= torch.finfo(torch.float32).tiny ** 0.9 * 1.0001).all()
        else:
            assert (zeros == 0).all()
    assert not any(_exp_log_pays(e, t) for e in (0.5, 1.0, 2.0, 3.0))
    assert not _exp_log_pays(torch.tensor(2.5), t)  # a per-row alpha: torch.pow


@pytest.mark.parametrize("alpha", [1.3, 1.5, 2.0, "per head"])
@pytest.mark.parametrize("masked", [False, True])
def test_a_nan_row_stays_nan_with_or_without_a_mask(alpha, masked: bool) -> None:
    """A row holding a NaN logit on an allowed key gives NaN weights, with or without a mask (Newton's
    alphas used to give a masked NaN row zeros, as if it were fully masked); a NaN on a masked key is
    ignored, and the other rows are unchanged."""
    logits = torch.randn(3, 2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    logits[0, 1, 2] = float("nan")
    logits[1, 0, 5] = float("nan")
    mask = torch.ones(3, 2, 6, dtype=torch.bool)
    mask[1, 0, 5] = False
    a = torch.tensor([[[1.3]], [[1.6]], [[1.9]]], dtype=torch.float64) if alpha == "per head" else alpha
    weights = entmax_weights(logits, a, mask if masked else None)
    assert torch.isnan(weights[0, 1]).all()
    assert torch.isnan(weights[1, 0]).all() != masked  # the masked NaN is ignored
    finite = entmax_weights(logits.nan_to_num(0.0), a, mask if masked else None)
    torch.testing.assert_close(weights[2], finite[2])
    torch.testing.assert_close(weights[0, 0], finite[0, 0])
