"""Tests for hf_eot.ops.softmax_weights: masked softmax (one-sided entropic OT)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_eot.ops import softmax_weights

# dtype -> (atol, rtol) of the output against a float64 reference
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-5),
    torch.float16: (1e-3, 1e-2),
    torch.bfloat16: (8e-3, 2e-2),
}
SHAPES = [(7,), (3, 5), (2, 3, 4, 9), (1, 2, 1, 130)]


def plain_masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reference written plainly: row by row, softmax over the allowed keys only, 0 elsewhere."""
    x = logits.double().reshape(-1, logits.shape[-1])
    m = mask.expand(logits.shape).reshape(-1, logits.shape[-1])
    out = torch.zeros_like(x)
    for r in range(x.shape[0]):
        if m[r].any():
            e = torch.exp(x[r][m[r]] - x[r][m[r]].max())
            out[r][m[r]] = e / e.sum()
    return out.reshape(logits.shape)


def random_mask(shape: tuple[int, ...], p: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=gen) > p


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape", SHAPES)
def test_unmasked_matches_torch_softmax(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """Without a mask the result is torch.softmax over the last axis, in the input dtype."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    out = softmax_weights(x)
    assert out.dtype == dtype and out.shape == x.shape
    ref = torch.softmax(x.double(), dim=-1)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("p_masked", [0.3, 0.7])
def test_masked_matches_plain_reference(dtype: torch.dtype, p_masked: float) -> None:
    """With a mask, each row is the softmax of its allowed entries; masked entries are exactly 0."""
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 3, 6, 11, generator=gen, dtype=torch.float64) * 3).to(dtype)
    mask = random_mask((2, 3, 6, 11), p_masked, gen)
    out = softmax_weights(x, mask)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double(), plain_masked_softmax(x, mask), atol=atol, rtol=rtol)
    assert (out[~mask] == 0).all()


def test_broadcast_mask_key_padding() -> None:
    """A (batch, 1, 1, keys) padding mask broadcasts over heads and queries."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 4, 6, generator=gen, dtype=torch.float64)
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[0, ..., 4:] = False
    out = softmax_weights(x, mask)
    torch.testing.assert_close(out, plain_masked_softmax(x, mask))
    assert (out[0, ..., 4:] == 0).all()


@pytest.mark.parametrize("dtype", list(TOL))
def test_fully_masked_row_gives_zero_weights_and_zero_grad(dtype: torch.dtype) -> None:
    """A query without any allowed key has exactly 0 weights and 0 gradient (never NaN)."""
    x = torch.randn(2, 4, 5, dtype=torch.float64).to(dtype).requires_grad_()
    mask = torch.ones(2, 4, 5, dtype=torch.bool)
    mask[0, 1] = False
    mask[1, 3] = False
    out = softmax_weights(x, mask)
    assert (out[0, 1] == 0).all() and (out[1, 3] == 0).all()
    out.double().mul(torch.randn(2, 4, 5, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(x.grad.double()).all()
    assert (x.grad[0, 1] == 0).all() and (x.grad[1, 3] == 0).all()
    assert (x.grad[~mask] == 0).all()
    valid = mask.any(-1)
    torch.testing.assert_close(
        out.double().sum(-1)[valid],
        torch.ones(int(valid.sum()), dtype=torch.float64),
        atol=TOL[dtype][0] * 10,
        rtol=0,
    )


def test_gradcheck_float64() -> None:
    """Analytical gradient equals finite differences (float64), with a mask and a fully masked row."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = random_mask((2, 3, 5), 0.4, gen)
    mask[1, 2] = False
    assert torch.autograd.gradcheck(lambda t: softmax_weights(t, mask), (x,))
    assert torch.autograd.gradgradcheck(lambda t: softmax_weights(t, mask), (x,))


@settings(max_examples=30, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    n_keys=st.integers(1, 12),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1.0, 1e2, 1e4]),
    p_masked=st.floats(0.0, 1.0),
)
def test_extreme_scores_and_random_masks_stay_finite(
    dtype: torch.dtype, n_keys: int, seed: int, scale: float, p_masked: float
) -> None:
    """Scores up to +-1e4 (also in float16/bfloat16) and any mask: finite weights and gradients,
    valid rows sum to 1, masked entries 0."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(3, 4, n_keys, generator=gen) * scale).clamp(-1e4, 1e4).to(dtype).requires_grad_()
    mask = random_mask((3, 4, n_keys), p_masked, gen)
    out = softmax_weights(x, mask)
    assert torch.isfinite(out).all()
    assert (out[~mask] == 0).all()
    valid = mask.any(-1)
    sums = out.float().sum(-1)
    assert torch.allclose(sums[valid], torch.ones_like(sums[valid]), atol=1e-2)
    assert (sums[~valid] == 0).all()
    out.float().square().sum().backward()
    assert torch.isfinite(x.grad.float()).all()


def test_bad_inputs_raise() -> None:
    """Integer logits, a non-bool mask and a mask that enlarges the logits are rejected."""
    x = torch.randn(2, 3)
    with pytest.raises(TypeError):
        softmax_weights(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(TypeError):
        softmax_weights(x, torch.zeros(2, 3))
    with pytest.raises(ValueError):
        softmax_weights(x, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError):
        softmax_weights(x, torch.ones(5, 2, 3, dtype=torch.bool))
