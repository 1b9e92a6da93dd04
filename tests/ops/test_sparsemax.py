"""Tests for hf_eot.ops.sparsemax_weights against the `entmax` package and plain properties."""

from __future__ import annotations

import pytest
import torch
from entmax import sparsemax
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_eot.ops import sparsemax_weights

# dtype -> atol of the output against the package run in float64 on the same (rounded) input
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def package_on_valid_entries(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reference: entmax.sparsemax (float64) applied to the allowed entries of each row only."""
    xd = x.double().reshape(-1, x.shape[-1])
    m = mask.expand(x.shape).reshape(-1, x.shape[-1])
    out = torch.zeros_like(xd)
    for r in range(xd.shape[0]):
        if m[r].any():
            out[r][m[r]] = sparsemax(xd[r][m[r]], dim=-1)
    return out.reshape(x.shape)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape", [(9,), (4, 7), (2, 3, 5, 40), (2, 2, 16, 300)])
@pytest.mark.parametrize("scale", [0.05, 1.0, 10.0])
def test_unmasked_matches_package(dtype: torch.dtype, shape: tuple[int, ...], scale: float) -> None:
    """Same values as entmax.sparsemax (full sort) on unmasked rows, for small keys (full-sort
    path) and many keys (top-k path), flat (support ~ all) and peaked (support ~ 1) rows."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    out = sparsemax_weights(x)
    assert out.dtype == dtype and out.shape == x.shape
    ref = sparsemax(x.double(), dim=-1)
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=0)
    if dtype in (torch.float64, torch.float32):
        assert torch.equal(out == 0, ref == 0), "exact zeros must coincide with the package's"


def test_topk_fallback_rows_are_exact() -> None:
    """Rows whose support is far larger than the sampled estimate (flat rows among peaked ones,
    placed off the sampled stride) are detected and recomputed exactly."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1000, 200, generator=gen, dtype=torch.float64) * 8
    for r in (1, 500, 998):
        x[r] = torch.randn(200, generator=gen, dtype=torch.float64) * 0.01
    out = sparsemax_weights(x)
    ref = sparsemax(x, dim=-1)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    assert (out[500] > 0).sum() > 100


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_keys", [6, 150])
def test_masked_matches_package_on_valid_entries(dtype: torch.dtype, n_keys: int) -> None:
    """With a mask, each row is the package's sparsemax of its allowed entries; masked entries and
    fully masked rows are exactly 0; valid rows sum to 1."""
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 3, 5, n_keys, generator=gen, dtype=torch.float64) * 2).to(dtype)
    mask = torch.rand(2, 3, 5, n_keys, generator=gen) > 0.4
    mask[0, 0, 0] = False
    out = sparsemax_weights(x, mask)
    torch.testing.assert_close(out.double(), package_on_valid_entries(x, mask), atol=TOL[dtype], rtol=0)
    assert (out[~mask] == 0).all()
    assert (out[0, 0, 0] == 0).all()
    valid = mask.any(-1)
    torch.testing.assert_close(
        out.double().sum(-1)[valid],
        torch.ones(int(valid.sum()), dtype=torch.float64),
        atol=10 * TOL[dtype],
        rtol=0,
    )


@pytest.mark.parametrize("n_keys", [7, 120])
def test_gradient_matches_package(n_keys: int) -> None:
    """Vector-Jacobian products equal the package's (float64), unmasked."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, n_keys, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 4, n_keys, generator=gen, dtype=torch.float64)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    sparsemax_weights(a).backward(g)
    sparsemax(b, dim=-1).backward(g)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=0)


def test_gradcheck_float64_with_mask() -> None:
    """gradcheck in float64 with a mask including a fully masked row (gradient 0 there)."""
    gen = torch.Generator().manual_seed(4)
    # distinct values whose gaps are never exactly 1 (a tie at the threshold is a kink)
    x = (torch.randperm(40, generator=gen).double() / 6.9).reshape(2, 4, 5).requires_grad_()
    mask = torch.rand(2, 4, 5, generator=gen) > 0.3
    mask[1, 1] = False
    assert torch.autograd.gradcheck(lambda t: sparsemax_weights(t, mask), (x,))
    out = sparsemax_weights(x, mask)
    out.sum().backward()
    assert (x.grad[1, 1] == 0).all() and (x.grad[~mask] == 0).all()


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    n_keys=st.sampled_from([1, 3, 17, 70, 129]),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([0.01, 1.0, 1e2, 1e4]),
    p_masked=st.floats(0.0, 1.0),
)
def test_extreme_scores_and_random_masks(
    dtype: torch.dtype, n_keys: int, seed: int, scale: float, p_masked: float
) -> None:
    """Any mask (incl. fully masked rows) and scores up to +-1e4 in any dtype: finite weights and
    gradients, masked entries 0, valid rows sum to 1, invalid rows 0, same as the package on the
    valid entries."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, 3, n_keys, generator=gen) * scale).clamp(-1e4, 1e4).to(dtype).requires_grad_()
    mask = torch.rand(2, 3, n_keys, generator=gen) > p_masked
    out = sparsemax_weights(x, mask)
    assert torch.isfinite(out).all() and (out >= 0).all()
    assert (out[~mask] == 0).all()
    valid = mask.any(-1)
    sums = out.double().sum(-1)
    assert torch.allclose(sums[valid], torch.ones_like(sums[valid]), atol=2e-2)
    assert (sums[~valid] == 0).all()
    ref = package_on_valid_entries(x.detach().float(), mask)  # the package on the rounded input
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype] * 2, rtol=0)
    out.float().pow(2).sum().backward()
    assert torch.isfinite(x.grad.float()).all()
    assert (x.grad[~mask] == 0).all()


def test_bad_inputs_raise() -> None:
    """Non-float logits and non-bool or ill-shaped masks are rejected."""
    with pytest.raises(TypeError):
        sparsemax_weights(torch.arange(5))
    with pytest.raises(TypeError):
        sparsemax_weights(torch.randn(2, 5), torch.ones(2, 5))
    with pytest.raises(ValueError):
        sparsemax_weights(torch.randn(2, 5), torch.ones(3, 5, dtype=torch.bool))
