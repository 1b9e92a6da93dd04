"""Tests for hf_eot.ops.sinkhorn_weights: two-sided entropic OT in the log domain."""

from __future__ import annotations

import warnings

import numpy as np
import ot
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_eot.ops import SinkhornResult, sinkhorn_weights, softmax_weights
from hf_eot.ops.sinkhorn import DEFAULT_MAX_ITERS, DEFAULT_TOL, SinkhornConvergenceWarning


def naive_log_sinkhorn(
    scores: torch.Tensor, mask: torch.Tensor, epsilon: float, n_iters: int
) -> torch.Tensor:
    """Reference written plainly: textbook log-domain Sinkhorn, masked entries as -inf, log(0)
    marginals for padded rows/columns.  Correct without padding; NaN with padding."""
    f = torch.where(mask, scores / epsilon, float("-inf"))
    nq = mask.any(-1).sum(-1, keepdim=True)
    nk = mask.any(-2).sum(-1, keepdim=True)
    log_a = torch.log(mask.any(-1).double())  # 0 or -inf
    log_b = torch.log(mask.any(-2).double() * nq / nk)
    log_u = torch.zeros(f.shape[:-1], dtype=f.dtype)
    log_v = torch.zeros(f.shape[:-2] + f.shape[-1:], dtype=f.dtype)
    log_u = log_a - torch.logsumexp(f + log_v.unsqueeze(-2), dim=-1)
    for _ in range(n_iters):
        log_v = log_b - torch.logsumexp(f + log_u.unsqueeze(-1), dim=-2)
        log_u = log_a - torch.logsumexp(f + log_v.unsqueeze(-2), dim=-1)
    return torch.exp(f + log_u.unsqueeze(-1) + log_v.unsqueeze(-2))


def key_padding_mask(batch: int, n_q: int, n_k: int, n_valid_keys: list[int]) -> torch.Tensor:
    mask = torch.zeros(batch, n_q, n_k, dtype=torch.bool)
    for b, nv in enumerate(n_valid_keys):
        mask[b, :, :nv] = True
    return mask


def assert_marginals(
    res: SinkhornResult, mask: torch.Tensor, col_atol: float, row_atol: float = 1e-5
) -> None:
    """Valid rows sum to 1, valid columns to nq/nk (per problem), invalid rows/cols exactly 0."""
    w = res.weights.double()
    assert torch.isfinite(w).all()
    row_valid, col_valid = mask.any(-1), mask.any(-2)
    nq = row_valid.sum(-1, keepdim=True).double()
    nk = col_valid.sum(-1, keepdim=True).double()
    rows, cols = w.sum(-1), w.sum(-2)
    torch.testing.assert_close(rows[row_valid], torch.ones_like(rows[row_valid]), atol=row_atol, rtol=0)
    target = (nq / nk).expand_as(cols)
    torch.testing.assert_close(cols[col_valid], target[col_valid], atol=col_atol, rtol=0)
    assert (rows[~row_valid] == 0).all() and (cols[~col_valid] == 0).all()
    assert (w[~mask] == 0).all()


# ------------------------------------------------------------------------------------ references


@pytest.mark.parametrize("n_q,n_k", [(6, 6), (5, 8), (9, 4)])
@pytest.mark.parametrize("epsilon", [0.5, 1.0, 2.0])
def test_matches_pot_sinkhorn_log_unmasked(n_q: int, n_k: int, epsilon: float) -> None:
    """Unmasked single problem: our plan equals n_q * POT's plan for a = 1/n_q, b = 1/n_k,
    M = -scores, reg = epsilon (POT's plan sums to the marginals passed in)."""
    rng = np.random.default_rng(0)
    S = rng.normal(size=(n_q, n_k)) * 2
    a, b = np.ones(n_q) / n_q, np.ones(n_k) / n_k
    ref_log = ot.bregman.sinkhorn_log(a, b, -S, epsilon, numItermax=100000, stopThr=1e-13)
    ref = ot.sinkhorn(a, b, -S, epsilon, numItermax=100000, stopThr=1e-13)
    res = sinkhorn_weights(torch.from_numpy(S), epsilon=epsilon, tol=1e-11, max_iters=100000)
    assert bool(res.converged)
    np.testing.assert_allclose(res.weights.numpy(), n_q * ref_log, atol=1e-9)
    np.testing.assert_allclose(res.weights.numpy(), n_q * ref, atol=1e-9)


def test_fixed_iterations_equal_plain_reference_without_padding() -> None:
    """n_iters=k performs exactly k (column, row) updates after an initial row normalisation."""
    gen = torch.Generator().manual_seed(1)
    S = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64) * 3
    full = torch.ones(3, 5, 7, dtype=torch.bool)
    for k in (0, 1, 4):
        res = sinkhorn_weights(S, n_iters=k, epsilon=0.7)
        assert res.n_iters == k
        torch.testing.assert_close(res.weights, naive_log_sinkhorn(S, full, 0.7, k), atol=1e-12, rtol=0)
    assert torch.allclose(sinkhorn_weights(S, n_iters=0).weights, softmax_weights(S), atol=1e-14)


def test_potentials_reproduce_the_plan() -> None:
    """weights = exp(scores / epsilon + log_u + log_v) on allowed entries; shapes of the output."""
    gen = torch.Generator().manual_seed(2)
    S = torch.randn(2, 4, 6, generator=gen, dtype=torch.float64)
    mask = key_padding_mask(2, 4, 6, [6, 4])
    res = sinkhorn_weights(S, mask, epsilon=0.5, n_iters=7)
    assert res.log_u.shape == (2, 4) and res.log_v.shape == (2, 6)
    assert res.marginal_error.shape == (2,) and res.converged.shape == (2,)
    rebuilt = torch.exp(S / 0.5 + res.log_u[..., :, None] + res.log_v[..., None, :])
    torch.testing.assert_close(torch.where(mask, rebuilt, 0.0), res.weights)


# ------------------------------------------------------------------------------------ padding


@pytest.mark.parametrize("dtype,col_atol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_key_padding_25_and_50_percent_no_nan_and_marginals(dtype: torch.dtype, col_atol: float) -> None:
    """25% and 50% key padding (per batch element): no NaN, valid rows sum to 1, valid columns to
    nq/nk, padded keys exactly 0.  The textbook log-domain code gives NaN on the same input."""
    gen = torch.Generator().manual_seed(3)
    S = (torch.randn(3, 8, 8, generator=gen, dtype=torch.float64) * 2).to(dtype)
    mask = key_padding_mask(3, 8, 8, [8, 6, 4])
    res = sinkhorn_weights(S, mask, tol=col_atol / 2, max_iters=5000)
    assert bool(res.converged.all())
    assert_marginals(res, mask, col_atol=col_atol)
    assert torch.isnan(naive_log_sinkhorn(S.double(), mask, 1.0, 10)).any()


def test_padded_problem_matches_pot_on_the_valid_block() -> None:
    """With padded queries and keys, the valid block equals n_valid_queries * POT's plan of the
    unpadded sub-problem (a = 1/nq, b = 1/nk); everything else is exactly 0."""
    rng = np.random.default_rng(11)
    S = rng.normal(size=(7, 9)) * 2
    nq, nk = 5, 6
    mask = torch.zeros(7, 9, dtype=torch.bool)
    mask[:nq, :nk] = True
    ref = ot.bregman.sinkhorn_log(
        np.ones(nq) / nq, np.ones(nk) / nk, -S[:nq, :nk], 0.8, numItermax=100000, stopThr=1e-13
    )
    res = sinkhorn_weights(torch.from_numpy(S), mask, epsilon=0.8, tol=1e-11, max_iters=100000)
    np.testing.assert_allclose(res.weights[:nq, :nk].numpy(), nq * ref, atol=1e-9)
    assert (res.weights[nq:] == 0).all() and (res.weights[:, nk:] == 0).all()


def test_padded_query_rows_and_keys_rectangular() -> None:
    """Padded queries AND keys, n_q != n_k: invalid rows/columns get exactly 0 mass, column target
    n_valid_queries / n_valid_keys per problem."""
    gen = torch.Generator().manual_seed(4)
    S = torch.randn(2, 2, 6, 9, generator=gen, dtype=torch.float64) * 2
    mask = torch.zeros(2, 1, 6, 9, dtype=torch.bool)
    mask[0, :, :6, :9] = True
    mask[1, :, :4, :5] = True  # 2 padded queries, 4 padded keys
    res = sinkhorn_weights(S, mask, tol=1e-8, max_iters=5000)
    assert_marginals(res, mask.expand_as(S), col_atol=1e-8)
    assert (res.weights[1, :, 4:] == 0).all() and (res.weights[1, :, :, 5:] == 0).all()
    torch.testing.assert_close(
        res.weights[1, ..., :4, :5].sum(-2), torch.full((2, 5), 0.8, dtype=torch.float64)
    )


def test_padding_gradients_are_finite_and_zero_on_padding() -> None:
    """Backward through the unrolled iterations with padding: finite, 0 on masked scores."""
    gen = torch.Generator().manual_seed(5)
    S = (torch.randn(2, 6, 8, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    mask = key_padding_mask(2, 6, 8, [6, 4])
    mask[1, 5] = False  # a padded query as well
    res = sinkhorn_weights(S, mask, n_iters=10)
    (res.weights * torch.randn(2, 6, 8, generator=gen, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(S.grad).all()
    assert (S.grad[~mask] == 0).all()


# ------------------------------------------------------------------------------- gradients


def test_gradcheck_fixed_iterations_with_padding() -> None:
    """gradcheck (float64) through n_iters=6 with key and query padding."""
    gen = torch.Generator().manual_seed(6)
    S = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64).requires_grad_()
    mask = key_padding_mask(2, 4, 5, [5, 3])
    mask[1, 3] = False
    assert torch.autograd.gradcheck(
        lambda t: sinkhorn_weights(t, mask, n_iters=6, epsilon=0.8, grad="unroll").weights, (S,)
    )


def test_gradcheck_adaptive_mode_and_epsilon() -> None:
    """gradcheck (float64) in the iterate-to-tolerance mode, w.r.t. scores and a tensor epsilon."""
    gen = torch.Generator().manual_seed(7)
    S = torch.randn(3, 4, generator=gen, dtype=torch.float64).requires_grad_()
    eps = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)

    def fn(s: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return sinkhorn_weights(s, epsilon=e, tol=1e-12, max_iters=400, check_every=10).weights

    assert torch.autograd.gradcheck(fn, (S, eps))


# --------------------------------------------------------------------------------- modes


@pytest.mark.parametrize("grad", ["implicit", "unroll"])
def test_fixed_iterations_compile_fullgraph(grad: str) -> None:
    """n_iters=k has no graph break in either grad mode: torch.compile(fullgraph=True) traces it
    (aot_eager backend: traces forward and backward graphs without the minute-long C++ build of
    inductor on CPU) and gives the eager result, gradients included."""
    gen = torch.Generator().manual_seed(8)
    S = torch.randn(2, 5, 6, generator=gen)
    mask = torch.rand(2, 5, 6, generator=gen) > 0.2
    mask[0, :, 4:] = False

    def fn(s: torch.Tensor, m: torch.Tensor) -> SinkhornResult:
        return sinkhorn_weights(s, m, n_iters=5, epsilon=0.5, grad=grad)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    s1, s2 = S.clone().requires_grad_(), S.clone().requires_grad_()
    got, ref = compiled(s1, mask), fn(s2, mask)
    torch.testing.assert_close(got.weights, ref.weights)
    torch.testing.assert_close(got.marginal_error, ref.marginal_error)
    assert got.n_iters == 5
    got.weights.square().sum().backward()
    ref.weights.square().sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad)
    torch._dynamo.reset()


def test_adaptive_mode_converges_and_reports() -> None:
    """n_iters=None stops at the first check with error <= tol; n_iters counts iterations."""
    gen = torch.Generator().manual_seed(9)
    S = torch.randn(4, 10, 10, generator=gen)
    res = sinkhorn_weights(S, tol=1e-4, check_every=5)
    assert bool(res.converged.all()) and bool((res.marginal_error <= 1e-4).all())
    assert res.n_iters % 5 == 0 and 0 < res.n_iters < 1000
    torch.testing.assert_close(res.weights.sum(-1), torch.ones(4, 10))


def test_non_convergence_warns_once() -> None:
    """Not converged at max_iters: exactly one warning, giving the error reached and advice."""
    gen = torch.Generator().manual_seed(10)
    S = torch.randn(3, 16, 16, generator=gen) * 8
    with pytest.warns(SinkhornConvergenceWarning, match="epsilon") as record:
        res = sinkhorn_weights(S, tol=1e-6, max_iters=30, check_every=3)
    assert len([w for w in record if issubclass(w.category, SinkhornConvergenceWarning)]) == 1
    assert "error" in str(record[0].message) and "max_iters" in str(record[0].message)
    assert res.n_iters == 30 and not bool(res.converged.all())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sinkhorn_weights(S, n_iters=30, tol=1e-6)  # fixed mode never warns


def test_over_relaxation_needs_far_fewer_iterations_than_plain_sinkhorn() -> None:
    """Iterate-to-tolerance mode (over-relaxed) reaches 1e-8 at logit std 4 (64 x 64, float64) in at
    most half the iterations of plain Sinkhorn (grad="unroll" iterates plainly), to the same plan."""
    gen = torch.Generator().manual_seed(0)
    S = torch.randn(3, 64, 64, generator=gen, dtype=torch.float64) * 4
    fast = sinkhorn_weights(S, tol=1e-8)
    plain = sinkhorn_weights(S, tol=1e-8, check_every=1, grad="unroll")
    assert bool(fast.converged.all()) and bool(plain.converged.all())
    assert plain.n_iters >= 30 and fast.n_iters <= plain.n_iters // 2, (fast.n_iters, plain.n_iters)
    torch.testing.assert_close(fast.weights, plain.weights, atol=1e-7, rtol=0)


# ----------------------------------------------------------------------------- robustness


@settings(max_examples=25, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    scale=st.sampled_from([1.0, 1e2, 1e4]),
    n_q=st.integers(1, 7),
    n_k=st.integers(1, 7),
    seed=st.integers(0, 2**16),
    p_masked=st.floats(0.0, 1.0),
)
def test_extreme_scores_and_random_masks_stay_finite(
    dtype: torch.dtype, scale: float, n_q: int, n_k: int, seed: int, p_masked: float
) -> None:
    """Scores up to +-1e4 in any dtype, any mask: finite plan and gradients, valid rows sum to 1,
    masked entries and invalid rows exactly 0."""
    gen = torch.Generator().manual_seed(seed)
    S = (torch.randn(2, n_q, n_k, generator=gen) * scale).clamp(-1e4, 1e4).to(dtype).requires_grad_()
    mask = torch.rand(2, n_q, n_k, generator=gen) > p_masked
    res = sinkhorn_weights(S, mask, n_iters=8)
    w = res.weights.float()
    assert torch.isfinite(w).all() and torch.isfinite(res.log_u).all() and torch.isfinite(res.log_v).all()
    assert torch.isfinite(res.marginal_error).all()
    assert (w[~mask] == 0).all()
    rv = mask.any(-1)
    assert torch.allclose(w.sum(-1)[rv], torch.ones(int(rv.sum())), atol=2e-2)
    assert (w.sum(-1)[~rv] == 0).all()
    w.square().sum().backward()
    assert torch.isfinite(S.grad.float()).all()


def test_bad_inputs_raise() -> None:
    """Bad epsilon, n_iters, tol, max_iters, check_every, scores and masks are rejected."""
    S = torch.randn(3, 4)
    for kwargs in (
        {"epsilon": 0.0},
        {"epsilon": -1.0},
        {"n_iters": -1},
        {"n_iters": 2.5},
        {"tol": 0.0},
        {"max_iters": 0},
        {"check_every": 0},
        {"grad": "autograd"},
    ):
        with pytest.raises(ValueError):
            sinkhorn_weights(S, **kwargs)
    with pytest.raises(ValueError):
        sinkhorn_weights(torch.randn(4))
    with pytest.raises(TypeError):
        sinkhorn_weights(S, torch.ones(3, 4))
    with pytest.raises(TypeError):
        sinkhorn_weights(torch.ones(3, 4, dtype=torch.long))


def test_bad_grad_mode_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"grad must be one of \('implicit', 'unroll'\), got 'autograd'"):
        sinkhorn_weights(torch.randn(3, 4), grad="autograd")


@pytest.mark.parametrize("grad", ["implicit", "unroll"])
@pytest.mark.parametrize("n_iters", [3, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_sum_to_one_exactly_for_huge_scores(grad: str, n_iters: int | None, dtype: torch.dtype) -> None:
    """Scores x1e10 (and x1e30 in float64): valid rows sum to 1 to round-off, masked entries and a
    fully masked row are exactly 0, nothing is NaN (gradients included)."""
    gen = torch.Generator().manual_seed(12)
    scale = 1e30 if dtype == torch.float64 else 1e10
    S = (torch.randn(2, 6, 7, generator=gen, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    mask = torch.rand(2, 6, 7, generator=gen) > 0.3
    mask[0, 2] = False  # a fully masked row
    mask[1, :, 3] = False  # a fully masked column
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SinkhornConvergenceWarning)
        res = sinkhorn_weights(S, mask, n_iters=n_iters, max_iters=50, grad=grad)
    w = res.weights.double()
    rows = w.sum(-1)
    rv = mask.any(-1)
    atol = 4 * torch.finfo(dtype).eps
    torch.testing.assert_close(rows[rv], torch.ones_like(rows[rv]), atol=atol, rtol=0)
    assert (rows[~rv] == 0).all() and (w[~mask] == 0).all()
    assert torch.isfinite(res.log_u).all() and torch.isfinite(res.log_v).all()
    (res.weights * torch.randn(2, 6, 7, generator=gen, dtype=torch.float64).to(dtype)).sum().backward()
    assert torch.isfinite(S.grad).all() and (S.grad[~mask] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_are_computed_in_float32(dtype: torch.dtype) -> None:
    """A half-precision input gives the float32 result cast to its dtype (potentials in float32)."""
    gen = torch.Generator().manual_seed(13)
    S = (torch.randn(2, 8, 8, generator=gen) * 2).to(dtype)
    mask = key_padding_mask(2, 8, 8, [8, 5])
    res = sinkhorn_weights(S, mask, tol=1e-5)
    ref = sinkhorn_weights(S.float(), mask, tol=1e-5)
    assert res.weights.dtype == dtype and res.log_u.dtype == torch.float32
    assert torch.equal(res.weights, ref.weights.to(dtype))
    assert bool(res.converged.all())


def test_default_tolerance_and_cap_are_the_module_constants() -> None:
    """The defaults come from DEFAULT_TOL / DEFAULT_MAX_ITERS (the registry imports them), and the
    default call converges to DEFAULT_TOL on a float32 problem at logit std 2."""
    import inspect

    params = inspect.signature(sinkhorn_weights).parameters
    assert params["tol"].default == DEFAULT_TOL and params["max_iters"].default == DEFAULT_MAX_ITERS
    assert params["grad"].default == "implicit"
    S = torch.randn(2, 4, 48, 40, generator=torch.Generator().manual_seed(14)) * 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = sinkhorn_weights(S)
    assert bool(res.converged.all()) and float(res.marginal_error.max()) <= DEFAULT_TOL


def test_row_and_column_shifts_leave_the_plan_unchanged() -> None:
    """Adding ``r_i + c_j`` (shifts of +-100, where ``exp(F - rowmax)`` would underflow in float32)
    to the scores does not change the plan nor the convergence in float32: the kernel is balanced
    by row and column maxima in the log domain before its one exponential.  POT's plan as reference."""
    gen = torch.Generator().manual_seed(15)
    S = torch.randn(2, 12, 10, generator=gen, dtype=torch.float64) * 2
    r = torch.randn(2, 12, 1, generator=gen, dtype=torch.float64) * 100
    c = torch.randn(2, 1, 10, generator=gen, dtype=torch.float64) * 100
    plain = sinkhorn_weights(S.float(), tol=1e-6)
    shifted = sinkhorn_weights((S + r + c).float(), tol=1e-6)
    assert bool(plain.converged.all()) and bool(shifted.converged.all())
    torch.testing.assert_close(shifted.weights, plain.weights, atol=5e-5, rtol=0)
    a, b = np.ones(12) / 12, np.ones(10) / 10
    ref = ot.bregman.sinkhorn_log(a, b, -S[1].numpy(), 1.0, numItermax=100000, stopThr=1e-13)
    np.testing.assert_allclose(plain.weights[1].double().numpy(), 12 * ref, atol=2e-6)


def test_infeasible_mask_stays_finite_and_warns() -> None:
    """A mask with no plan meeting both marginals (rows 0, 1 may only attend key 0, which can take
    only 3/2): Sinkhorn cannot converge; it warns, rows still sum to 1, nothing is NaN."""
    mask = torch.tensor([[True, False], [True, False], [True, True]])
    S = torch.randn(3, 2, generator=torch.Generator().manual_seed(16), dtype=torch.float64).requires_grad_()
    with pytest.warns(SinkhornConvergenceWarning):
        res = sinkhorn_weights(S, mask, tol=1e-6, max_iters=200)
    torch.testing.assert_close(res.weights.sum(-1), torch.ones(3, dtype=torch.float64))
    assert res.weights[0, 1] == 0 and res.weights[1, 1] == 0
    assert torch.isfinite(res.log_u).all() and torch.isfinite(res.log_v).all()
    res.weights[2].sum().backward()
    assert torch.isfinite(S.grad).all()


# ------------------------------------------------------------------------- implicit gradients

GRAD_CASES = {
    "square": ((3, 6, 6), None),
    "rectangular": ((2, 5, 8), None),
    "tall": ((2, 9, 4), None),
    "key and query padding": ((2, 6, 7), "padding"),
    "heads, broadcast mask": ((2, 3, 5, 6), "broadcast"),
}


def _grad_case(name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    shape, kind = GRAD_CASES[name]
    gen = torch.Generator().manual_seed(17)
    S = torch.randn(*shape, generator=gen, dtype=torch.float64) * 1.5
    if kind == "padding":
        mask = key_padding_mask(2, 6, 7, [7, 4])
        mask[1, 4:] = False  # two padded queries
    elif kind == "broadcast":
        mask = torch.ones(2, 1, 5, 6, dtype=torch.bool)
        mask[1, :, :, 4:] = False
    else:
        mask = None
    return S, mask


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_implicit_gradient_equals_unrolled_gradient_at_convergence(case: str) -> None:
    """float64, tol 1e-13: the implicit backward (CG on the Schur complement) gives the gradient of
    autograd through plain iterations run to convergence, w.r.t. scores and a per-head epsilon."""
    S, mask = _grad_case(case)
    eps_shape = (S.shape[-3], 1, 1) if S.dim() == 4 else ()
    eps0 = torch.full(eps_shape, 0.8, dtype=torch.float64)
    G = torch.randn(S.shape, generator=torch.Generator().manual_seed(18), dtype=torch.float64)
    grads = {}
    for grad in ("implicit", "unroll"):
        s, e = S.clone().requires_grad_(), eps0.clone().requires_grad_()
        res = sinkhorn_weights(s, mask, epsilon=e, tol=1e-13, max_iters=20000, grad=grad)
        assert bool(res.converged.all())
        (res.weights * G).sum().backward()
        grads[grad] = (res.weights, s.grad, e.grad)
    for got, ref in zip(grads["implicit"], grads["unroll"], strict=True):
        torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-8)
    if mask is not None:
        assert (grads["implicit"][1][~mask.expand_as(S)] == 0).all()


@pytest.mark.parametrize("case", ["rectangular", "key and query padding", "heads, broadcast mask"])
def test_gradcheck_implicit_converged_map(case: str) -> None:
    """gradcheck (float64) of the converged map with the implicit backward, scores and epsilon."""
    S, mask = _grad_case(case)
    eps = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)

    def fn(s: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return sinkhorn_weights(s, mask, epsilon=e, tol=1e-13, max_iters=20000).weights

    assert torch.autograd.gradcheck(fn, (S.requires_grad_(), eps), atol=1e-7, rtol=1e-5)


def test_grad_modes_agree_in_float32() -> None:
    """float32, 32 x 40 at logit std 2, tol 1e-6: implicit and unrolled gradients agree to ~1e-4
    relative (float32 round-off and the residual marginal error)."""
    gen = torch.Generator().manual_seed(19)
    S = torch.randn(2, 32, 40, generator=gen) * 2
    G = torch.randn(2, 32, 40, generator=gen)
    grads = []
    for grad in ("implicit", "unroll"):
        s = S.clone().requires_grad_()
        (sinkhorn_weights(s, tol=1e-6, grad=grad).weights * G).sum().backward()
        grads.append(s.grad)
    scale = grads[1].abs().max()
    torch.testing.assert_close(grads[0] / scale, grads[1] / scale, atol=2e-4, rtol=0)


def test_padding_invariance_of_values_and_implicit_gradients() -> None:
    """Padded keys and queries (any scores there) change neither the valid block of the plan nor the
    gradient on it; the gradient on padding is exactly 0."""
    gen = torch.Generator().manual_seed(20)
    S = torch.randn(7, 9, generator=gen, dtype=torch.float64)
    G = torch.randn(7, 9, generator=gen, dtype=torch.float64)
    mask = torch.zeros(7, 9, dtype=torch.bool)
    mask[:5, :6] = True
    s_full, s_small = S.clone().requires_grad_(), S[:5, :6].clone().requires_grad_()
    full = sinkhorn_weights(s_full, mask, tol=1e-12)
    small = sinkhorn_weights(s_small, tol=1e-12)
    torch.testing.assert_close(full.weights[:5, :6], small.weights, atol=1e-12, rtol=0)
    (full.weights * G).sum().backward()
    (small.weights * G[:5, :6]).sum().backward()
    torch.testing.assert_close(s_full.grad[:5, :6], s_small.grad, atol=1e-10, rtol=0)
    assert (s_full.grad[~mask] == 0).all()


def test_tolerance_mode_compiles_with_breaks_only_at_the_convergence_checks() -> None:
    """n_iters=None under torch.compile: the graph breaks are the data-dependent convergence checks
    (Tensor.item calls), and the compiled call gives the eager plan and gradient."""
    gen = torch.Generator().manual_seed(21)
    S = torch.randn(2, 5, 6, generator=gen)

    def fn(s: torch.Tensor) -> torch.Tensor:
        return sinkhorn_weights(s, tol=1e-6).weights

    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(S)
    assert explained.graph_break_count >= 1
    reasons = {r.reason for r in explained.break_reasons}
    assert all("item()" in r or r == "step_unsupported" for r in reasons), reasons
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager")
    s1, s2 = S.clone().requires_grad_(), S.clone().requires_grad_()
    got, ref = compiled(s1), fn(s2)
    torch.testing.assert_close(got, ref)
    got.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad)
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scaling_domain_and_log_domain_agree(dtype: torch.dtype) -> None:
    """The over-relaxed solver gives the same plan with the scaling-domain half-steps (matrix-vector
    products with the balanced kernel) and with the log-domain ones."""
    from hf_eot.ops import _sinkhorn_implicit as imp

    f = torch.randn(2, 24, 20, generator=torch.Generator().manual_seed(22), dtype=torch.float64) * 2
    f = f.to(dtype)
    targets = imp.Targets(None, None, 24 / 20)
    plans = []
    for ops in (imp._ScalingOps(f, None, None, None), imp._LogOps(f, None, None)):
        g, _, used = imp.over_relaxed_solve(ops, targets, tol=1e-6, max_iters=5000, check_every=5, fallback=None)
        assert used is ops
        p, _ = ops.plan(g)
        assert float(imp.plan_col_error(p, targets).max()) <= 1e-6
        plans.append(p)
    torch.testing.assert_close(plans[0], plans[1], atol=1e-5, rtol=0)


def test_diverging_scalings_fall_back_to_the_log_domain() -> None:
    """On an infeasible mask the float32 scalings diverge; the solver switches to log-domain
    half-steps from its last checked state instead of producing inf/NaN."""
    from hf_eot.ops import _sinkhorn_implicit as imp
    from hf_eot.ops.sinkhorn import _Problem

    mask = torch.tensor([[True, False], [True, False], [True, True]])
    prob = _Problem(torch.randn(3, 2, generator=torch.Generator().manual_seed(23)), mask, 1.0)
    ops = imp._ScalingOps(prob.f, prob.targets.row_valid, prob.targets.col_valid, mask)
    g, done, used = imp.over_relaxed_solve(
        ops, prob.targets, tol=1e-6, max_iters=3000, check_every=5, fallback=prob.log_ops
    )
    assert used is prob.log_ops and done == 3000
    p, f = used.plan(g)
    assert torch.isfinite(g).all() and torch.isfinite(f).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(3))


@pytest.mark.parametrize("seed", range(4))
def test_a_problem_solved_exactly_does_not_poison_the_over_relaxation_of_its_batch(seed: int) -> None:
    """A small padded problem reaches a column error of exactly 0 in float32 while a harder one in the
    same batch still iterates: its step-size estimate must stay finite (0 / 0 gave NaN plans)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.zeros(2, 16, 16)
    scores[0, :4, :4] = 0.3 * torch.randn(4, 4, generator=g)
    scores[1] = 3 * torch.randn(16, 16, generator=g)
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[0, :4, :4] = True
    mask[1] = True
    result = sinkhorn_weights(scores, mask, tol=1e-6)
    assert torch.isfinite(result.weights).all()
    assert bool(result.converged.all()), result.marginal_error
    torch.testing.assert_close(result.weights[0, :4].sum(-1), torch.ones(4))


def _count_log_half_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the log-domain half-steps (``_LogOps.row_lse``) run from now on."""
    from hf_eot.ops import _sinkhorn_implicit as imp

    calls = [0]
    original = imp._LogOps.row_lse

    def counted(self, g):
        calls[0] += 1
        return original(self, g)

    monkeypatch.setattr(imp._LogOps, "row_lse", counted)
    return calls


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_fixed_iterations_run_in_the_scaling_domain_with_the_log_domain_iterates(
    dtype: torch.dtype, atol: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """n_iters=k with the implicit gradient runs its k iterations in the scaling domain (no log-domain
    half-step) and gives the plan of the plain log-domain iterations: the textbook reference without
    padding (float64), and with key and query padding the same plan, potentials and gradients as the
    log-domain half-steps."""
    from hf_eot.ops import sinkhorn as sk

    gen = torch.Generator().manual_seed(24)
    S64 = torch.randn(3, 9, 11, generator=gen, dtype=torch.float64) * 4
    calls = _count_log_half_steps(monkeypatch)
    full = sinkhorn_weights(S64.to(dtype), n_iters=12)
    assert calls[0] == 0 and full.n_iters == 12
    ref = naive_log_sinkhorn(S64, torch.ones(3, 9, 11, dtype=torch.bool), 1.0, 12)
    torch.testing.assert_close(full.weights.double(), ref, atol=atol, rtol=0)

    mask = key_padding_mask(3, 9, 11, [11, 8, 5])
    mask[2, 7:] = False  # padded queries
    S = S64.to(dtype).requires_grad_()
    res = sinkhorn_weights(S, mask, n_iters=12)
    assert calls[0] == 0
    G = torch.randn(3, 9, 11, generator=gen, dtype=torch.float64).to(dtype)
    (res.weights * G).sum().backward()
    with monkeypatch.context() as m:
        m.setattr(sk._ScalingOps, "is_safe", lambda self: False)  # force the log domain
        S_log = S64.to(dtype).requires_grad_()
        res_log = sinkhorn_weights(S_log, mask, n_iters=12)
        (res_log.weights * G).sum().backward()
    assert calls[0] > 0
    torch.testing.assert_close(res.weights, res_log.weights, atol=atol, rtol=0)
    torch.testing.assert_close(res.log_v.double(), res_log.log_v.double(), atol=100 * atol, rtol=0)
    torch.testing.assert_close(S.grad, S_log.grad, atol=100 * atol, rtol=0)


def test_fixed_iterations_fall_back_to_the_log_domain_when_the_kernel_underflows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Scores spread over far more than the float32 exponent range: the scaling domain is unsafe, so
    n_iters=k runs in the log domain; the plan is the textbook plan, rows sum to 1, nothing is NaN."""
    gen = torch.Generator().manual_seed(25)
    S64 = torch.randn(2, 6, 6, generator=gen, dtype=torch.float64) * 300
    calls = _count_log_half_steps(monkeypatch)
    res = sinkhorn_weights(S64.float(), n_iters=5)
    assert calls[0] == 5
    full = torch.ones(2, 6, 6, dtype=torch.bool)
    torch.testing.assert_close(res.weights.double(), naive_log_sinkhorn(S64, full, 1.0, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(res.weights.sum(-1), torch.ones(2, 6))


def test_fixed_iterations_fall_back_when_the_scalings_diverge(monkeypatch: pytest.MonkeyPatch) -> None:
    """On an infeasible mask the scalings of many plain iterations leave the float32 range; n_iters=k
    then reruns the k iterations in the log domain: finite potentials, rows summing to 1."""
    mask = torch.tensor([[True, False], [True, False], [True, True]])
    S = torch.randn(3, 2, generator=torch.Generator().manual_seed(23))
    calls = _count_log_half_steps(monkeypatch)
    sinkhorn_weights(S, mask, n_iters=5)
    assert calls[0] == 0  # a few iterations stay in range: the scaling domain is safe for this kernel
    res = sinkhorn_weights(S, mask, n_iters=3000)
    assert calls[0] == 3000
    assert torch.isfinite(res.log_u).all() and torch.isfinite(res.log_v).all()
    torch.testing.assert_close(res.weights.sum(-1), torch.ones(3))
