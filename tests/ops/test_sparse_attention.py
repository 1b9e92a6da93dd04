"""Tests for hf_eot.ops.sparse_attention: the fused entmax attention (blocked, sparse where it pays) must
equal ``entmax_weights(scores) @ value`` in values and gradients, in each of its block modes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_eot.ops import _native, entmax_attention, entmax_weights, sparse_attention
from hf_eot.ops.sparse_attention import _SupportBlock

ALPHAS = [2.0, 1.5, 1.3, 1.7]
#: Each alpha with the paths that solve its rows: the native kernel on CPU (Newton's iteration, or the exact
#: closed form for sparsemax and 1.5-entmax), or the torch top-k path (devices without it, no compiler,
#: HF_EOT_NATIVE=0).
ALPHA_PATHS = [(a, path) for a in (2.0, 1.5, 1.3, 1.7) for path in ("native", "torch")]


def _use_path(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows solved by the native kernel (which must be built: it is wherever a C++ compiler is) or by
    the torch top-k path."""
    if path == "torch":
        monkeypatch.setattr(sparse_attention, "_native_rows", lambda logits, alpha: False)
    elif _native._compiler() is None:
        pytest.skip("no C++ compiler on this machine: the native kernel cannot be built")
    else:
        assert _native._library() is not None, "a C++ compiler is there but the native kernel did not build"


def _inputs(
    batch: int, heads: int, n_queries: int, n_keys: int, dim: int, *, spread: float, seed: int, dtype=torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(batch, heads, n_queries, dim, generator=gen, dtype=torch.float64) * spread).to(dtype)
    k = torch.randn(batch, heads, n_keys, dim, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(batch, heads, n_keys, dim, generator=gen, dtype=torch.float64).to(dtype)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_()


def _reference(q, k, v, alpha, mask=None, log_prior=None, scale=None, epsilon=1.0):
    """The unfused map: scores, entmax_weights, then the values."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q @ k.transpose(-1, -2)) * scale / epsilon
    if log_prior is not None:
        logits = logits + log_prior
    return entmax_weights(logits, alpha, mask) @ v


def _assert_gradients_match(out, ref, inputs, atol: float) -> None:
    """The gradients of ``out`` and ``ref`` w.r.t. ``inputs`` for one random output gradient agree to ``atol``."""
    grad = torch.randn_like(out)
    ours, theirs = torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, inputs, grad)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


def _block_kinds(out: torch.Tensor) -> set[str]:
    """The modes the forward chose for its blocks (the autograd node of a custom Function is its ctx):
    "csr" and "scatter" (threshold from the top k, sparse products over the support or dense ones on the
    scattered weights) or "dense" (statistics only, recomputed in the backward)."""
    return {
        ("csr" if block.csr else "scatter") if isinstance(block, _SupportBlock) else "dense"
        for block in out.grad_fn.blocks
    }


@pytest.mark.parametrize(("alpha", "path"), ALPHA_PATHS)
@pytest.mark.parametrize("spread", [0.3, 6.0])
@pytest.mark.parametrize("mode", ["support", "dense"])
def test_values_and_gradients_match_the_unfused_map(
    alpha: float, path: str, spread: float, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outputs and the gradients of query, key, value and a learned prior equal the unfused map to float64
    round-off, with a padding mask (one fully masked row) and several query blocks, for flatter (spread
    0.3) and peaked scores (spread 6); every block keeps its support (the first sizes its top k from a
    sample of its rows, whose masked keys do not count), or, with no top k allowed, every block is dense
    (statistics only, the weights recomputed in the backward with the forward's normaliser; the native
    kernel's blocks take it when their supports exceed that fraction of the entries)."""
    _use_path(path, monkeypatch)
    if mode == "dense":
        monkeypatch.setattr(sparse_attention, "_TOP_K_FRACTION", 0.0)
    q, k, v = _inputs(2, 3, 40, 320, 8, spread=spread, seed=0)
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(2, 1, 40, 320, generator=gen) > 0.2
    mask[1, 0, 5] = False  # a query with no allowed key
    prior = torch.randn(1, 3, 40, 320, generator=gen, dtype=torch.float64).requires_grad_()
    kwargs = dict(mask=mask, log_prior=prior, scale=0.4, epsilon=0.8)
    out = entmax_attention(q, k, v, alpha=alpha, block_elements=2 * 3 * 320 * 8, **kwargs)
    ref = _reference(q, k, v, alpha, **kwargs)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    assert torch.all(out[1, :, 5] == 0)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v, prior), grad)
    theirs = torch.autograd.grad(ref, (q, k, v, prior), grad)
    for name, a, b in zip("qkvp", ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=0, msg=lambda m, name=name: f"d{name}: {m}")
    assert _block_kinds(out) == ({"csr"} if mode == "support" else {"dense"})


@pytest.mark.parametrize("csr", [True, False])
@pytest.mark.parametrize(
    ("alpha", "path", "peak", "medium"),
    [
        (alpha, path, peak, medium)
        for alpha, peak, medium in ((2.0, 12.0, 0.15), (1.5, 12.0, 2.0), (1.3, 30.0, 20.0))
        for path in ("torch", "native")
    ],
)
def test_the_block_modes_in_one_call(
    alpha: float, path: str, peak: float, medium: float, csr: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call whose query blocks are flat (wide supports: dense mode), then peaked (supports of a few keys:
    sparse CSR products), then in between (supports of tens of keys: CSR products while they hold at most
    a fraction of the entries, here 1/32, else products on the scattered weights) equals the unfused map,
    gradients included; a prior broadcast over the queries gets the summed gradient.  On a device without
    sparse CSR products every top-k block takes the scattered weights."""
    _use_path(path, monkeypatch)
    monkeypatch.setattr(sparse_attention, "CSR_FRACTION", 1 / 32)
    if not csr:
        monkeypatch.setattr(sparse_attention, "_CSR_DEVICES", ())
    q, k, v = _inputs(1, 2, 128, 512, 4, spread=1.0, seed=2)
    with torch.no_grad():
        q[..., :32, :] = 0.0  # logits = the prior (std 0.002): supports of most keys
        q[..., 32:80, :] *= peak
        q[..., 80:, :] *= medium
    prior = 0.002 * torch.randn(1, 2, 1, 512, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    prior.requires_grad_()
    out = entmax_attention(q, k, v, alpha=alpha, log_prior=prior, block_elements=2 * 512 * 16)
    ref = _reference(q, k, v, alpha, log_prior=prior)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    expected = {"dense", "csr", "scatter"} if alpha == 2.0 else {"dense", "csr"}
    assert _block_kinds(out) == (expected if csr else {"dense", "scatter"})
    _assert_gradients_match(out, ref, (q, k, v, prior), atol=1e-11)


@pytest.mark.parametrize(("alpha", "path"), [(a, path) for a in (2.0, 1.5, 1.4) for path in ("torch", "native")])
@pytest.mark.parametrize("spread", [0.5, 8.0])
def test_gradcheck(alpha: float, path: str, spread: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finite differences (float64, gradcheck's fast mode: random directions) agree with the analytic
    backward of every block mode met (three query blocks from their top k or the native kernel, sparse CSR
    products on peaked scores)."""
    _use_path(path, monkeypatch)
    q, k, v = _inputs(1, 2, 48, 288, 3, spread=spread, seed=3)

    def fn(q, k, v):
        return entmax_attention(q, k, v, alpha=alpha, block_elements=2 * 288 * 16)

    if spread > 1 and alpha in (2.0, 1.5):
        assert "csr" in _block_kinds(fn(q, k, v))
    assert torch.autograd.gradcheck(fn, (q, k, v), atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("flat_queries", [0, 16])
@pytest.mark.parametrize("needed", ["q", "k", "v", "kv"])
def test_gradients_of_any_subset_of_the_inputs(flat_queries: int, needed: str) -> None:
    """Only the inputs that require a gradient get one, equal to the unfused map's, whether every block
    takes CSR products or the first one (flat queries) takes dense ones: each gradient accumulator is made
    only where a block adds to it."""
    q, k, v = _inputs(1, 2, 64, 512, 4, spread=12.0, seed=9)
    with torch.no_grad():
        q[..., :flat_queries, :] = 0.0
    inputs = {"q": q, "k": k, "v": v}
    for name, tensor in inputs.items():
        tensor.requires_grad_(name in needed)
    out = entmax_attention(q, k, v, alpha=1.5, block_elements=2 * 512 * 16)
    assert _block_kinds(out) == ({"dense", "csr"} if flat_queries else {"csr"})
    _assert_gradients_match(out, _reference(q, k, v, 1.5), [inputs[name] for name in needed], atol=1e-11)


@pytest.mark.parametrize("spread", [0.5, 8.0])
def test_dropout_is_reproducible_and_differentiated(spread: float) -> None:
    """With dropout, the same seed gives the same output, gradcheck passes (the backward uses the forward's
    dropout masks, stored with a CSR support (peaked scores) or regenerated for a dense block), about the
    dropout fraction of the support is zeroed, and the output differs from the one without dropout."""
    q, k, v = _inputs(1, 2, 48, 288, 3, spread=spread, seed=4)
    with torch.no_grad():
        q[..., :16, :] = 0.0  # equal logits: the first block is dense

    def fn(q, k, v, block_elements=2 * 288 * 16):
        torch.manual_seed(0)
        return entmax_attention(q, k, v, alpha=2.0, dropout=0.3, block_elements=block_elements)

    assert "dense" in _block_kinds(fn(q, k, v))
    if spread > 1:
        assert "csr" in _block_kinds(fn(q, k, v))
    torch.testing.assert_close(fn(q, k, v), fn(q, k, v), atol=0, rtol=0)
    assert torch.autograd.gradcheck(fn, (q, k, v), atol=1e-6, fast_mode=True)
    assert not torch.allclose(fn(q, k, v), entmax_attention(q, k, v, alpha=2.0))
    # the weights that were used: drop the values' gradient path to read them off through an identity
    eye = torch.eye(288, dtype=torch.float64).expand(1, 2, 288, 288)
    torch.manual_seed(0)
    used = entmax_attention(q.detach(), k.detach(), eye, alpha=2.0, dropout=0.3, block_elements=2 * 288 * 16)
    plain = entmax_attention(q.detach(), k.detach(), eye, alpha=2.0)
    kept = used[plain > 0] > 0
    assert 0.4 < kept.double().mean() < 0.95
    torch.testing.assert_close(used[plain > 0][kept], plain[plain > 0][kept] / 0.7, atol=1e-12, rtol=0)


@settings(max_examples=40, deadline=None)
@given(
    alpha=st.sampled_from(ALPHAS),
    n_queries=st.integers(1, 80),
    n_keys=st.integers(1, 300),
    spread=st.sampled_from([0.0, 0.1, 1.0, 10.0, 1e4]),
    pad=st.one_of(st.none(), st.integers(0, 5)),
    seed=st.integers(0, 2**16),
)
def test_property_matches_unfused_float32(
    alpha: float, n_queries: int, n_keys: int, spread: float, pad: int | None, seed: int
) -> None:
    """For any sizes (several query blocks, hence every block mode), with or without padding, and score
    scales from constant to extreme (x1e4), float32 outputs equal the unfused map (float64) to float32
    round-off of the logits, padded (fully masked) query rows are exactly 0 and nothing is NaN."""
    q, k, v = _inputs(2, 2, n_queries, n_keys, 4, spread=spread, seed=seed, dtype=torch.float32)
    mask = None
    if pad is not None:
        keys_valid = torch.arange(n_keys) < max(1, n_keys - pad)
        mask = keys_valid.expand(2, 1, n_queries, n_keys).clone()
        mask[1, :, 0] = False
    out = entmax_attention(q, k, v, alpha=alpha, mask=mask, block_elements=512)
    ref = _reference(q.double(), k.double(), v.double(), alpha, mask=mask).float()
    assert torch.isfinite(out).all()
    # float32 round-off of the logits (relative to their size) moves the weights by as much
    logit_size = float((q.detach().double() @ k.detach().double().transpose(-1, -2)).abs().max()) / 2
    atol = max(2e-4, 20 * torch.finfo(torch.float32).eps * logit_size) * max(1.0, float(v.detach().abs().max()))
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-4)
    if mask is not None:
        assert torch.all(out[1, :, 0] == 0)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_match_float32(dtype: torch.dtype) -> None:
    """Half inputs are computed in float32 inside and returned in their dtype, close to the float32 result."""
    q, k, v = _inputs(2, 2, 30, 200, 8, spread=2.0, seed=5, dtype=torch.float32)
    out = entmax_attention(q.to(dtype), k.to(dtype), v.to(dtype), alpha=1.5)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), entmax_attention(q, k, v, alpha=1.5), atol=5e-2, rtol=5e-2)
    out.float().sum().backward()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 2.5}, "alpha in \\(1, 2\\]"),
        ({"alpha": 1}, "alpha in \\(1, 2\\]"),
        ({"alpha": 1.5, "dropout": 1.0}, "dropout must be in \\[0, 1\\)"),
        ({"alpha": 1.5, "block_elements": 0}, "block_elements must be >= 1"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    """Invalid alpha, dropout or block size raise a ValueError naming the value and the valid range."""
    q, k, v = _inputs(1, 1, 2, 3, 2, spread=1.0, seed=0)
    with pytest.raises(ValueError, match=message):
        entmax_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("prior_shape", [(), (96,), (5, 96), (2, 5, 96), (2, 1, 1, 96), (1, 2, 5, 1)])
def test_prior_of_any_broadcastable_shape(prior_shape: tuple[int, ...]) -> None:
    """A log-prior of any shape that broadcasts to the scores (0-d to 4-d) gives the unfused values and its
    own gradient, summed over the axes it is broadcast along."""
    q, k, v = _inputs(2, 2, 5, 96, 3, spread=1.0, seed=6)
    prior = torch.randn(prior_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    prior.requires_grad_()
    out = entmax_attention(q, k, v, alpha=1.5, log_prior=prior)
    ref = _reference(q, k, v, 1.5, log_prior=prior)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    grad = torch.randn_like(out)
    ours, theirs = torch.autograd.grad(out, prior, grad)[0], torch.autograd.grad(ref, prior, grad)[0]
    assert ours.shape == prior.shape
    torch.testing.assert_close(ours, theirs, atol=1e-11, rtol=0)


def test_second_derivative_is_refused() -> None:
    """The backward is not differentiable itself: asking for a second derivative raises instead of
    returning one with missing terms."""
    q, k, v = _inputs(1, 1, 4, 40, 3, spread=1.0, seed=0)
    (g,) = torch.autograd.grad(entmax_attention(q, k, v, alpha=1.5).square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


def test_mismatched_shapes_are_named() -> None:
    """Keys from another batch, or values of another length, raise a ValueError listing the shapes."""
    q, k, v = _inputs(1, 1, 2, 3, 2, spread=1.0, seed=0)
    with pytest.raises(ValueError, match="query \\(B, H, Q, d\\)"):
        entmax_attention(q, k[..., :2, :], v, alpha=1.5)
    with pytest.raises(ValueError, match="log_prior of shape \\(4,\\) does not broadcast"):
        entmax_attention(q, k, v, alpha=1.5, log_prior=torch.zeros(4, dtype=q.dtype))


def test_a_fully_masked_query_block_in_the_sparse_mode() -> None:
    """A block of queries that may attend no key, between peaked ones (an empty CSR block, no entries):
    zero outputs, values and gradients of the unfused map."""
    q, k, v = _inputs(1, 2, 64, 512, 4, spread=8.0, seed=9)
    mask = torch.ones(1, 1, 64, 512, dtype=torch.bool)
    mask[..., 16:32, :] = False
    out = entmax_attention(q, k, v, alpha=2.0, mask=mask, block_elements=2 * 512 * 16)
    blocks = out.grad_fn.blocks
    assert isinstance(blocks[1], _SupportBlock) and blocks[1].csr and blocks[1].col.numel() == 0
    assert torch.all(out[..., 16:32, :] == 0)
    ref = _reference(q, k, v, 2.0, mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    _assert_gradients_match(out, ref, (q, k, v), atol=1e-12)


@pytest.mark.parametrize(("alpha", "path"), [(a, path) for a in (2.0, 1.5, 1.3) for path in ("torch", "native")])
@pytest.mark.parametrize("infinite", ["-inf row", "+inf key"])
def test_a_row_of_minus_inf_logits_without_a_mask_is_nan_as_in_the_weights_path(
    alpha: float, path: str, infinite: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A query whose log-prior is -inf on every key, or +inf on one (no mask), in a block that takes its
    threshold from the top k (sorted for sparsemax, in any order for Newton's 1.3-entmax) or from the
    native kernel: NaN, as the unfused map gives, and the other rows unchanged (the row is never counted
    as solved, so it is not left out of the support; the native kernel leaves such blocks to the torch
    path)."""
    _use_path(path, monkeypatch)
    q, k, v = _inputs(1, 2, 48, 320, 4, spread=8.0, seed=10)
    prior = torch.zeros(1, 2, 48, 320, dtype=torch.float64)
    if infinite == "-inf row":
        prior[0, 1, 40] = float("-inf")
    else:
        prior[0, 1, 40, 50] = float("inf")
    out = entmax_attention(q, k, v, alpha=alpha, log_prior=prior, block_elements=2 * 320 * 16)
    ref = _reference(q, k, v, alpha, log_prior=prior)
    assert torch.isnan(ref[0, 1, 40]).all() and torch.isnan(out[0, 1, 40]).all()
    finite = torch.ones(48, dtype=torch.bool)
    finite[40] = False
    torch.testing.assert_close(out[0, 1, finite], ref[0, 1, finite], atol=1e-12, rtol=0)
    torch.testing.assert_close(out[0, 0], ref[0, 0], atol=1e-12, rtol=0)


def _one_flat_query_in_sixteen() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Peaked queries with one flat query in sixteen, whose 1.3-entmax support is several times wider
    than the others' (beyond the 90% quantile that sizes the top k): ``q, k, v`` and the flat queries."""
    q, k, v = _inputs(1, 2, 64, 512, 4, spread=1.0, seed=11)
    flat = torch.zeros(64, dtype=torch.bool)
    flat[::16] = True
    with torch.no_grad():
        q *= 12.0
        q[..., flat, :] *= 0.02
    return q, k, v, flat


def test_newton_rows_wider_than_the_typical_support_are_solved_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """1.3-entmax sizes its top k from the 90% quantile of the previous block's supports: in blocks where
    one query in sixteen is flat (a support several times wider than the others', beyond the quantile),
    those rows are solved again from a wider top k or their whole rows, the blocks keep their supports (no
    dense fallback), and the values and gradients equal the unfused map (the torch path: the native
    kernel solves whole rows)."""
    _use_path("torch", monkeypatch)
    q, k, v, flat = _one_flat_query_in_sixteen()
    top_k, topk = [], torch.topk
    monkeypatch.setattr(torch, "topk", lambda x, k, *a, **kw: top_k.append((x.shape[0], k)) or topk(x, k, *a, **kw))
    out = entmax_attention(q, k, v, alpha=1.3, block_elements=2 * 512 * 16)
    monkeypatch.undo()
    block_rows = 2 * 16  # heads x queries per block
    retried = [(rows, k) for rows, k in top_k if rows < block_rows]
    assert retried and any(k == 512 for _, k in retried), f"rows solved again, whole rows included: {top_k}"
    ref = _reference(q, k, v, 1.3)
    weights = entmax_weights((q @ k.transpose(-1, -2)) * 0.5, 1.3)
    sizes = (weights > 0).sum(dim=-1)
    assert sizes[..., flat].min() > 3 * sizes[..., ~flat].max(), "the flat rows must have much wider supports"
    assert _block_kinds(out) == {"csr"} and len(out.grad_fn.blocks) == 4
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    _assert_gradients_match(out, ref, (q, k, v), atol=1e-11)


def test_rows_solved_again_keep_their_entries_in_csr_rows_after_the_blocks_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A row that a later pass of the torch path solves again has an empty CSR row of its own and all of
    its support in one CSR row after the block's rows (one per pass that solved it again, the last one
    holding it): every support entry once, with its row's weights; with dropout (multipliers drawn per
    entry) gradcheck still passes through such blocks."""
    _use_path("torch", monkeypatch)
    q, k, v, _ = _one_flat_query_in_sixteen()
    out = entmax_attention(q, k, v, alpha=1.3, block_elements=2 * 512 * 16)
    weights = entmax_weights((q @ k.transpose(-1, -2)) * 0.5, 1.3).detach()  # (1, 2, 64, 512)
    solved_again = 0
    for block in out.grad_fn.blocks:
        expected = weights[:, :, block.rows].reshape(-1, 512)  # (R, K), rows (h, i)
        n_rows, sizes = expected.shape[0], block.crow.long().diff()
        dense = torch.zeros(sizes.numel(), 512, dtype=torch.float64)
        csr_rows = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
        dense.index_put_((csr_rows, block.col.long() % 512), block.weights, accumulate=True)
        again = torch.empty(0, dtype=torch.long) if block.again is None else block.again
        owner = torch.cat([torch.arange(n_rows), again])  # the row of each CSR row
        assert torch.equal(block.row, owner[csr_rows]), "entries keep their rows"
        assert torch.all(sizes[again] == 0) and torch.all(torch.bincount(owner[sizes > 0]) <= 1)
        solved_again += again.numel()
        dense[:n_rows].index_add_(0, again, dense[n_rows:])
        torch.testing.assert_close(dense[:n_rows], expected, atol=1e-12, rtol=0)
    assert solved_again > 0

    def dropped(q, k, v):
        torch.manual_seed(0)
        return entmax_attention(q, k, v, alpha=1.3, dropout=0.3, block_elements=2 * 512 * 16)

    assert any(block.again is not None for block in dropped(q, k, v).grad_fn.blocks)
    assert torch.autograd.gradcheck(dropped, (q, k, v), atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("alpha", [1.5, 1.3])
def test_compiles_to_the_eager_values_and_gradients(alpha: float) -> None:
    """Under torch.compile the fused map takes dense blocks (no host-synchronised top k) and gives the
    eager outputs and gradients, with a padding mask and several query blocks."""
    q, k, v = _inputs(1, 2, 24, 64, 8, spread=2.0, seed=5)
    mask = torch.rand(1, 1, 24, 64, generator=torch.Generator().manual_seed(6)) > 0.3

    def attend(q, k, v):
        return entmax_attention(q, k, v, alpha=alpha, mask=mask, block_elements=2 * 64 * 8)

    compiled = torch.compile(attend, backend="aot_eager")
    out, ref = compiled(q, k, v), attend(q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    _assert_gradients_match(out, ref, (q, k, v), atol=1e-11)
    assert _block_kinds(out) == {"dense"}, "compiled: every block dense"
    with torch.no_grad():
        explained = torch._dynamo.explain(attend)(q, k, v)
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize(("alpha", "rows"), [(1.5, "peaked"), (1.3, "peaked"), (1.3, "one flat in sixteen")])
def test_devices_other_than_the_cpu(alpha: float, rows: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the CSR products need each row's keys in ascending order (cuSPARSE) and the row sums take
    ``index_add_`` (forced here on CPU), the support blocks hold each CSR row's keys ascending, and the
    transposed pattern of the key and value gradients each key's rows ascending, also with rows solved
    again by later passes; the outputs and gradients still equal the unfused map.  (Newton's alphas take
    the torch path there: the native kernel is CPU only.)"""
    _use_path("torch", monkeypatch)
    monkeypatch.setattr(sparse_attention, "_UNSORTED_CSR_DEVICES", ())
    monkeypatch.setattr(sparse_attention, "_SEGMENT_SUM_DEVICES", ())
    if rows == "peaked":
        q, k, v = _inputs(1, 2, 64, 512, 8, spread=2.0, seed=8)
    else:
        q, k, v, _ = _one_flat_query_in_sixteen()
    out = entmax_attention(q, k, v, alpha=alpha, block_elements=2 * 512 * 16)
    again = 0
    for block in out.grad_fn.blocks:
        assert isinstance(block, _SupportBlock)
        keys_in_rows = torch.tensor_split(block.col.long(), block.crow[1:-1].long().tolist())
        assert all(torch.all(keys.diff() > 0) for keys in keys_in_rows)
        crow_t, col_t, _ = sparse_attention._csr_transpose(block, 2 * 512)
        rows_of_keys = torch.tensor_split(col_t.long(), crow_t[1:-1].long().tolist())
        assert all(torch.all(columns.diff() > 0) for columns in rows_of_keys)
        again += 0 if block.again is None else block.again.numel()
    assert again > 0 or rows == "peaked", "rows solved again by later passes"
    ref = _reference(q, k, v, alpha)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    _assert_gradients_match(out, ref, (q, k, v), atol=1e-11)


@pytest.mark.parametrize("shape", [(0, 2, 5), (1, 0, 5), (1, 2, 0)])
def test_no_rows_to_attend_give_an_empty_differentiable_output(shape: tuple[int, int, int]) -> None:
    """An empty batch, no heads or no queries give an empty output that backpropagates (zero-size
    gradients); no keys is refused by name."""
    batch, heads, n_queries = shape
    q = torch.randn(batch, heads, n_queries, 4, requires_grad=True)
    k, v = torch.randn(batch, heads, 7, 4, requires_grad=True), torch.randn(batch, heads, 7, 3)
    out = entmax_attention(q, k, v, alpha=1.3)
    assert out.shape == (batch, heads, n_queries, 3)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape
    with pytest.raises(ValueError, match="at least one key"):
        entmax_attention(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 0, 4), torch.randn(1, 2, 0, 3))


@pytest.mark.parametrize(("alpha", "path"), ALPHA_PATHS)
@pytest.mark.parametrize("mode", ["support", "dense"])
def test_a_row_whose_allowed_keys_all_have_minus_inf_prior_is_a_masked_row(
    alpha: float, path: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A query whose allowed keys all have log-prior -inf (no finite logit left) gives zeros and zero
    gradients, as ``entmax_weights`` does for it: never weights on its masked keys (the block's dense
    mode used to spread it uniformly over every key, masked ones included)."""
    _use_path(path, monkeypatch)
    if mode == "dense":
        monkeypatch.setattr(sparse_attention, "_TOP_K_FRACTION", 0.0)
    q, k, v = _inputs(1, 2, 48, 320, 4, spread=2.0, seed=12)
    mask = torch.ones(1, 1, 48, 320, dtype=torch.bool)
    mask[..., 256:] = False
    prior = torch.zeros(1, 2, 48, 320, dtype=torch.float64)
    prior[0, 1, 9, :256] = float("-inf")  # query 9 of head 1: every allowed key forbidden by the prior
    out = entmax_attention(q, k, v, alpha=alpha, mask=mask, log_prior=prior, block_elements=2 * 320 * 16)
    ref = _reference(q, k, v, alpha, mask=mask, log_prior=prior)
    assert torch.all(ref[0, 1, 9] == 0)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    _assert_gradients_match(out, ref, (q, k, v), atol=1e-11)


@pytest.mark.parametrize(("alpha", "path"), ALPHA_PATHS)
def test_a_nan_query_under_a_mask_gives_nan_as_in_the_weights_path(
    alpha: float, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A query with a NaN coordinate, in a masked call: its row is NaN, as the unfused map gives (the
    torch path used to give it zeros, as if fully masked), and the other rows are unchanged."""
    _use_path(path, monkeypatch)
    q, k, v = _inputs(1, 2, 48, 320, 4, spread=2.0, seed=13)
    with torch.no_grad():
        q[0, 1, 20, 0] = float("nan")
    mask = torch.rand(1, 1, 48, 320, generator=torch.Generator().manual_seed(2)) > 0.3
    out = entmax_attention(q, k, v, alpha=alpha, mask=mask, block_elements=2 * 320 * 16)
    ref = _reference(q, k, v, alpha, mask=mask)
    assert torch.isnan(ref[0, 1, 20]).all() and torch.isnan(out[0, 1, 20]).all()
    finite = torch.ones(48, dtype=torch.bool)
    finite[20] = False
    torch.testing.assert_close(out[0, :, finite], ref[0, :, finite], atol=1e-12, rtol=0)


@pytest.mark.parametrize("native", [True, False])
def test_the_fused_map_starts_at_128_keys_for_the_exact_maps_on_the_native_kernel(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fused_pays: sparsemax and 1.5-entmax take the fused map from FUSED_MIN_KEYS_EXACT_NATIVE keys on CPU
    with the native kernel, from FUSED_MIN_KEYS without it (HF_EOT_NATIVE=0) and for Newton's alphas."""
    if native:
        _use_path("native", monkeypatch)
    else:
        monkeypatch.setenv("HF_EOT_NATIVE", "0")
    q = torch.zeros(1, 2, 8, 4)
    short, medium = torch.zeros(1, 2, 127, 4), torch.zeros(1, 2, 128, 4)
    for alpha in (2.0, 1.5):
        assert not sparse_attention.fused_pays(q, short, alpha)
        assert sparse_attention.fused_pays(q, medium, alpha) == native
    assert not sparse_attention.fused_pays(q, medium, 1.3) and not sparse_attention.fused_pays(q, medium)
    assert sparse_attention.fused_pays(q, torch.zeros(1, 2, 256, 4), 1.3)
