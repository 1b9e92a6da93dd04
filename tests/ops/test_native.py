"""Tests for hf_eot.ops._native: the native CPU kernel of entmax rows (Newton's alphas, and the exact
sparsemax and 1.5-entmax) must equal the torch weights (``entmax_weights``) row by row, and its build must fall back to the torch path, with a warning,
where it cannot be made."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_eot.ops import (
    _native,
    entmax_attention,
    entmax_newton_weights,
    entmax_weights,
    native_kernels_available,
)
from hf_eot.ops.entmax import _entmax_newton_threshold

pytestmark = pytest.mark.skipif(
    _native._compiler() is None, reason="no C++ compiler on this machine: the native kernel cannot be built"
)


@pytest.fixture
def fresh_build(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """The loader's cache of the built library emptied before and after the test, builds into ``tmp_path``."""
    monkeypatch.setenv("HF_EOT_CACHE", str(tmp_path))
    _native._library.cache_clear()
    yield tmp_path
    _native._library.cache_clear()


def _solved(logits: torch.Tensor, alpha: float, mask: torch.Tensor | None = None, max_iters: int = 50):
    """The kernel's rows of ``logits`` ``(R, n)`` (masked keys at -inf) as dense weights ``(R, n)``, with its
    thresholds and support sizes."""
    valid = None if mask is None else mask.any(dim=-1)
    x = logits if mask is None else logits.masked_fill(~mask, float("-inf"))
    row_max = x.amax(dim=-1)
    if valid is not None:
        row_max = torch.where(valid, row_max, torch.zeros_like(row_max))
    rows = _native.entmax_rows(x.clone(), row_max, valid, alpha, max_iters)
    weights, keys, row = rows.packed()
    dense = torch.zeros_like(logits)
    dense[row, keys] = weights
    return dense, rows, keys, row


@pytest.mark.parametrize("alpha", [1.05, 1.3, 1.7, 1.95, 1.5, 2.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rows_equal_the_torch_weights(alpha: float, dtype: torch.dtype) -> None:
    """Each row's weights equal ``entmax_weights`` (Newton's torch path; the sort-based one for sparsemax
    and 1.5-entmax) to round-off, with a padding mask and a fully masked row (no entries, threshold -1);
    each row's keys are ascending and its size is its support's.  The thresholds equal the torch Newton
    threshold's; those of the exact maps give their weights without a normaliser,
    ``p = [(alpha - 1)(L - m) - tau]_+^(1/(alpha - 1))``."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 300, generator=gen, dtype=torch.float64) * 3).to(dtype)
    mask = torch.rand(64, 300, generator=gen) > 0.25
    mask[7] = False
    dense, rows, keys, row = _solved(logits, alpha, mask)
    ref = entmax_weights(logits, alpha, mask)
    atol = 1e-13 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(dense, ref, atol=atol, rtol=0)
    assert torch.equal(rows.counts, (ref > 0).sum(dim=-1)) or dtype == torch.float32
    assert rows.counts[7] == 0 and rows.tau[7] == -1
    assert torch.all(row.diff() >= 0)
    same_row = row[1:] == row[:-1]
    assert torch.all(keys[1:][same_row] > keys[:-1][same_row]), "keys ascending within each row"
    assert torch.all(mask[row, keys]), "no masked key in a support"
    valid = mask.any(-1)
    X = (alpha - 1) * (logits - logits.masked_fill(~mask, float("-inf")).amax(-1, keepdim=True))
    if alpha in (1.5, 2.0):
        from_tau = (X - rows.tau[:, None]).clamp(min=0) ** (1 / (alpha - 1)) * mask
        torch.testing.assert_close(from_tau[valid], ref[valid], atol=atol, rtol=0)
        return
    X = X.clamp(min=-1).masked_fill(~mask, -1.0)
    tau = _entmax_newton_threshold(X, alpha - 1.0, mask.sum(-1, keepdim=True).clamp(min=1).to(dtype), 50)
    torch.testing.assert_close(
        rows.tau[valid], tau.squeeze(-1)[valid], atol=10 * torch.finfo(dtype).eps, rtol=0
    )


@settings(max_examples=120, deadline=None)
@given(
    alpha=st.one_of(st.floats(1.01, 1.99), st.sampled_from([1.5, 2.0])),
    n_keys=st.integers(1, 200),
    scale=st.sampled_from([0.0, 1e-3, 0.25, 1.0, 30.0, 1e4]),
    integer=st.booleans(),
    p_masked=st.floats(0.0, 0.9),
    seed=st.integers(0, 2**16),
)
def test_property_rows_are_entmax(
    alpha: float, n_keys: int, scale: float, integer: bool, p_masked: float, seed: int
) -> None:
    """For any alpha in (1, 2] (Newton's, or the exact sparsemax and 1.5-entmax), row length, score scale
    (constant rows to +-1e4), mask, and integer logits (ties, also at the threshold), float64 rows are
    valid distributions (sum 1, non-negative, 0 on masked keys and fully masked rows) equal to
    ``entmax_weights``."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, n_keys, generator=gen, dtype=torch.float64)
    if integer:
        logits = (logits * 2).round()
    logits = logits * scale
    mask = torch.rand(6, n_keys, generator=gen) >= p_masked
    dense, *_ = _solved(logits, alpha, mask)
    valid = mask.any(-1)
    assert torch.all(dense >= 0) and torch.all(dense[~mask] == 0)
    torch.testing.assert_close(dense.sum(-1)[valid], torch.ones(int(valid.sum()), dtype=torch.float64))
    torch.testing.assert_close(dense, entmax_weights(logits, alpha, mask), atol=1e-12, rtol=0)


@pytest.mark.parametrize("alpha", [2.0, 1.5])
def test_exact_rows_of_many_near_tied_keys_sum_to_one(alpha: float) -> None:
    """float64 sparsemax and 1.5-entmax rows of 16,384 keys within 1e-6 of each other (every key a
    candidate near the maximum) sum to 1 to float64 round-off, as the sort-based rows do (the threshold
    refined on the final support; without it, 1.5e-10 off)."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 16_384, generator=gen, dtype=torch.float64) * 1e-6
    dense, *_ = _solved(logits, alpha)
    assert (dense.sum(-1) - 1).abs().max() < 1e-13
    torch.testing.assert_close(dense, entmax_weights(logits, alpha), atol=1e-17, rtol=1e-10)


def test_scratch_buffers_are_reused_only_where_they_fit() -> None:
    """A call given the previous call's rows writes into their value and key buffers (same shape and
    dtype) and gives the same rows as a fresh call; buffers of another shape are not used."""
    gen = torch.Generator().manual_seed(9)
    first, second = (torch.randn(32, 200, generator=gen) * 4 for _ in range(2))

    def solve(x, scratch=None):
        return _native.entmax_rows(x, x.amax(-1), None, 1.5, 50, scratch)

    previous = solve(first)
    reused = solve(second, scratch=previous)
    assert reused.values.data_ptr() == previous.values.data_ptr()
    assert reused.keys.data_ptr() == previous.keys.data_ptr()
    fresh = solve(second)
    assert torch.equal(reused.counts, fresh.counts) and torch.equal(reused.tau, fresh.tau)
    assert all(torch.equal(a, b) for a, b in zip(reused.packed(), fresh.packed(), strict=True))
    shorter = solve(second[:16], scratch=fresh)
    assert shorter.values.data_ptr() != fresh.values.data_ptr()


def test_max_iters_bounds_the_steps() -> None:
    """With no Newton step the threshold stays at its start (-1) and every candidate is in the support."""
    logits = torch.randn(4, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _, rows, _, _ = _solved(logits, 1.3, max_iters=0)
    candidates = ((logits - logits.amax(-1, keepdim=True)) * 0.3 > -1).sum(-1)
    assert torch.all(rows.tau == -1) and torch.equal(rows.counts, candidates)


def test_applies_only_where_it_can() -> None:
    """The kernel takes CPU float32 / float64 logits for 1 < alpha <= 2; half dtypes and other alphas not."""
    x = torch.zeros(2, 8)
    assert _native.entmax_support_applies(x, 1.3) and _native.entmax_support_applies(x, 2.0)
    assert _native.entmax_support_applies(x.double(), 1.5)
    assert not _native.entmax_support_applies(x.half(), 1.3)
    assert not _native.entmax_support_applies(x, 1.0) and not _native.entmax_support_applies(x, 2.5)


def test_builds_once_and_caches(fresh_build) -> None:
    """The library is built into ``$HF_EOT_CACHE`` on first use and reused, not rebuilt, afterwards."""
    assert _native._library() is not None
    (library,) = (fresh_build / "native").glob("hf_eot_native_*.so")
    built = library.stat().st_mtime_ns
    _native._library.cache_clear()
    assert _native._library() is not None
    assert library.stat().st_mtime_ns == built


@pytest.mark.parametrize("cxx", ["gcc", "env g++"])
def test_builds_with_a_c_compiler_driver_or_a_command_with_arguments(
    cxx: str, fresh_build, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``CXX=gcc`` (which, unlike g++, does not link libm, home of the vectorised exp / log) and a ``CXX``
    that holds arguments (as "ccache g++") build a library that loads and solves rows."""
    if _native.shutil.which(cxx.split()[0]) is None or _native.shutil.which("g++") is None:
        pytest.skip(f"{cxx} not on this machine")
    monkeypatch.setenv("CXX", cxx)
    assert _native._library() is not None
    dense, *_ = _solved(torch.randn(3, 40, dtype=torch.float64), 1.3)
    torch.testing.assert_close(dense.sum(-1), torch.ones(3, dtype=torch.float64))


def test_float32_rows_of_many_keys_keep_their_sums() -> None:
    """float32 rows of 200,000 keys sum to 1 to float32 round-off and equal the float64 rows to about it
    (the kernel's sums are accumulated in double)."""
    logits = torch.randn(4, 200_000, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 0.3
    dense32, *_ = _solved(logits.float(), 1.1)
    dense64, *_ = _solved(logits, 1.1)
    assert (dense32.double().sum(-1) - 1).abs().max() < 2e-7
    assert (dense32.double() - dense64).abs().sum(-1).max() < 2e-5


@pytest.mark.parametrize("compiler", ["missing", "failing"])
def test_a_failed_build_warns_and_falls_back_to_torch(
    compiler: str, fresh_build, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a working compiler hf_eot warns once (naming the cause and the switch) and the fused map
    takes the torch path, with the same values."""
    monkeypatch.setenv("CXX", "no-such-compiler-hf-eot" if compiler == "missing" else "false")
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 40, 16, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 400, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    with pytest.warns(_native.NativeBuildWarning, match="HF_EOT_NATIVE=0"):
        out = entmax_attention(q, k, v, alpha=1.3)
    assert not _native.entmax_support_applies(q, 1.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second call is silent
        entmax_attention(q, k, v, alpha=1.3)
    ref = entmax_weights((q @ k.transpose(-1, -2)) * 16**-0.5, 1.3) @ v
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


def test_loading_keeps_denormals(fresh_build) -> None:
    """Loading the library (compiled with -ffast-math) leaves the process's floating-point state alone:
    denormal numbers still exist (a fast-math link would flush them to zero in every later computation)."""
    assert _native._library() is not None
    tiny = torch.tensor(torch.finfo(torch.float32).tiny)
    assert float(tiny / 8) > 0.0 and float(torch.tensor(1e-310, dtype=torch.float64)) > 0.0


def test_switched_off_by_the_environment(fresh_build, monkeypatch: pytest.MonkeyPatch) -> None:
    """``HF_EOT_NATIVE=0``: nothing is built, no warning, the torch path."""
    monkeypatch.setenv("HF_EOT_NATIVE", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not native_kernels_available()
    assert not list(fresh_build.glob("**/*.so"))
    monkeypatch.setenv("HF_EOT_NATIVE", "1")
    assert native_kernels_available(), "the switch is read at every call"


def _newton_weights_both_paths(logits, alpha, mask, grad, monkeypatch):
    """``entmax_newton_weights`` and its gradients (logits, and alpha if a tensor) by the native kernel and
    by the torch path."""
    results = []
    for switch in ("1", "0"):
        monkeypatch.setenv("HF_EOT_NATIVE", switch)
        inputs = (logits, alpha) if isinstance(alpha, torch.Tensor) else (logits,)
        out = entmax_newton_weights(logits, alpha, mask)
        results.append((out, torch.autograd.grad(out, inputs, grad)))
    return results


@pytest.mark.parametrize("alpha", [1.05, 1.3, 1.7, "per head"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dense_rows_equal_the_torch_path(alpha, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The weights path (``entmax_newton_weights``, dense rows) by the native kernel equals its torch path
    in values and gradients (logits and a learned alpha per head), with a padding mask and a fully masked
    row (exactly 0)."""
    gen = torch.Generator().manual_seed(4)
    logits = (torch.randn(2, 3, 20, 90, generator=gen, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    mask = torch.rand(2, 1, 20, 90, generator=gen) > 0.3
    mask[1, 0, 4] = False
    if alpha == "per head":
        alpha = torch.tensor([1.2, 1.5, 1.8], dtype=dtype).view(3, 1, 1).requires_grad_()
    grad = torch.randn(2, 3, 20, 90, generator=gen, dtype=torch.float64).to(dtype)
    assert _native.entmax_dense_rows_apply(
        logits, alpha - 1.0 if isinstance(alpha, float) else alpha.detach() - 1
    )
    (out, grads), (ref, ref_grads) = _newton_weights_both_paths(logits, alpha, mask, grad, monkeypatch)
    atol = 1e-13 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    assert torch.all(out[1, :, 4] == 0)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=100 * atol, rtol=1e-5 if dtype == torch.float32 else 0)


def test_dense_rows_gradcheck_with_a_learned_alpha() -> None:
    """Finite differences (float64) agree with the gradients of logits and a per-head alpha through the
    native forward."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 2, 3, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor([1.25, 1.6], dtype=torch.float64).view(2, 1, 1).requires_grad_()
    assert _native.entmax_dense_rows_apply(logits, alpha.detach() - 1)
    assert torch.autograd.gradcheck(lambda x, a: entmax_newton_weights(x, a), (logits, alpha), atol=1e-7)


@pytest.mark.parametrize("infinite", ["-inf row", "+inf key"])
def test_dense_rows_of_infinite_logits_are_the_torch_paths(
    infinite: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row of -inf logits, or one with a +inf logit (no mask), gives NaN where the torch path does (the
    whole row, or the infinite key): such calls take the torch path (the kernel, compiled for finite
    inputs, never sees them)."""
    logits = torch.randn(3, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    if infinite == "-inf row":
        logits[1] = float("-inf")
    else:
        logits[1, 7] = float("inf")
    out = entmax_newton_weights(logits, 1.3)
    monkeypatch.setenv("HF_EOT_NATIVE", "0")
    ref = entmax_newton_weights(logits, 1.3)
    assert torch.isnan(out[1]).any()
    torch.testing.assert_close(out, ref, atol=0, rtol=0, equal_nan=True)


def test_dense_rows_leave_other_alphas_to_torch() -> None:
    """alpha >= 2 (non-convex Newton, or sparsemax) and tensors with such values take the torch path."""
    x = torch.zeros(2, 3, 5)
    assert not _native.entmax_dense_rows_apply(x, 1.0) and not _native.entmax_dense_rows_apply(x, 1.5)
    assert not _native.entmax_dense_rows_apply(x, torch.tensor([0.3, 1.2, 0.5]).view(3, 1))
    assert _native.entmax_dense_rows_apply(x, torch.tensor([0.3, 0.9, 0.5]).view(3, 1))
