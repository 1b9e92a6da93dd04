"""The Fenchel-dual solver (hf_eot.analysis.dual) against closed forms, a generic optimizer and the
primal problem (3)."""

import math

import numpy as np
import pytest
import torch

from hf_eot.analysis.dual import DualSettings, fenchel_dual, second_order_approximation
from hf_eot.analysis.objective import dual_objective
from hf_eot.analysis.reference import gradient_ascent_dual, second_order_dense

D = torch.float64


def _random_problem(batch=(), n=6, d=9, masked=1, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*batch, n, d, generator=g, dtype=D)
    z = scale * torch.randn(*batch, d, generator=g, dtype=D)
    u = torch.rand(*batch, n, generator=g, dtype=D) + 0.1
    if masked:
        u[..., :masked] = 0.0
    return t, z, u


def _primal_value(p, t, z, u, alpha):
    """alpha/2 ||mu + z - E_p t||^2 + KL(p || u), eq. (3)."""
    u = u / u.sum(-1, keepdim=True)
    mu = (u.unsqueeze(-1) * t).sum(-2)
    h = (p.unsqueeze(-1) * t).sum(-2)
    kl = torch.where(p > 0, p * (torch.log(p) - torch.log(u)), torch.zeros_like(p)).sum(-1)
    return 0.5 * alpha * ((mu + z - h) ** 2).sum(-1) + kl


def _gauss_hermite(k, mean, chol):
    """Discrete u whose log-MGF is quadratic to round-off for moderate lambda (a 2-D Gauss-Hermite rule)."""
    x, w = np.polynomial.hermite_e.hermegauss(k)
    X, Y = np.meshgrid(x, x)
    nodes = torch.tensor(np.stack([X.ravel(), Y.ravel()], -1), dtype=D)
    weights = torch.tensor(np.outer(w, w).ravel(), dtype=D)
    return mean + nodes @ chol.T, weights / weights.sum()


@pytest.mark.parametrize("method", ["span", "full"])
@pytest.mark.parametrize("alpha", [0.2, 1.0, 3.0])
def test_quadratic_log_mgf_gives_closed_form_eq13(method, alpha):
    """When log M is quadratic (u Gaussian), lambda* = alpha (I + alpha Sigma)^-1 z exactly (eq. 13)."""
    chol = torch.tensor([[1.0, 0.0], [0.5, 0.7]], dtype=D)
    t, u = _gauss_hermite(24, torch.tensor([0.3, -0.2], dtype=D), chol)
    z = torch.tensor([0.8, -0.5], dtype=D)
    r = fenchel_dual(t, z, u, alpha=alpha, method=method)
    closed = alpha * torch.linalg.solve(torch.eye(2, dtype=D) + alpha * chol @ chol.T, z)
    assert r.converged.all()
    torch.testing.assert_close(r.lam, closed, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(second_order_approximation(t, z, u, alpha), closed, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(second_order_dense(t, z, u, alpha), closed, rtol=1e-10, atol=1e-12)


def test_spherical_gaussian_gives_motivating_example():
    """Sec. 5: u ~ N(mu, I) gives lambda* = alpha / (1 + alpha) z, also when z leaves the span of the
    templates (templates in a 2-D plane of R^5, z with components outside it)."""
    t2, u = _gauss_hermite(20, torch.zeros(2, dtype=D), torch.eye(2, dtype=D))
    t = torch.cat([t2, torch.zeros(t2.shape[0], 3, dtype=D)], dim=-1) + 0.5
    z = torch.tensor([0.4, -0.3, 1.0, 2.0, -1.0], dtype=D)
    alpha = 0.7
    r = fenchel_dual(t, z, u, alpha=alpha)
    expected = z.clone()
    expected[:2] *= alpha / (1 + alpha)  # Sigma = I on the plane ...
    expected[2:] *= alpha  # ... and 0 off it
    torch.testing.assert_close(r.lam, expected, rtol=1e-10, atol=1e-12)


def test_degenerate_templates_give_alpha_z_exactly():
    """Sigma z = 0 (one template, or z orthogonal to every t_i - mu): lambda* = alpha z, deviation 0."""
    t = torch.randn(1, 7, dtype=D)
    z = torch.randn(7, dtype=D)
    r = fenchel_dual(t, z, alpha=0.5)
    torch.testing.assert_close(r.lam, 0.5 * z, rtol=0, atol=1e-15)
    t = torch.randn(5, 3, dtype=D)
    t[:, 2] = 1.0
    z = torch.tensor([0.0, 0.0, 2.0], dtype=D)
    r = fenchel_dual(t, z, alpha=1.5)
    torch.testing.assert_close(r.lam, 1.5 * z, rtol=0, atol=1e-14)
    assert float(r.relative_deviation) < 1e-14


def test_small_alpha_orders_of_eq14_and_eq13():
    """lambda* - alpha z = O(alpha^2) (relative error O(alpha), eq. 14) and lambda* - eq. (13) = O(alpha^3)
    (relative O(alpha^2)): the slopes of the errors in log-log are about 1 and 2."""
    t, z, u = _random_problem(n=7, d=5, masked=0, seed=3)
    alphas = [1e-1, 1e-2, 1e-3]
    e14, e13 = [], []
    for a in alphas:
        r = fenchel_dual(t, z, u, alpha=a, tol=1e-12)
        e14.append(float((r.lam - a * z).norm() / r.lam.norm()))
        e13.append(float((r.lam - second_order_approximation(t, z, u, a)).norm() / r.lam.norm()))
    s14 = np.polyfit(np.log(alphas), np.log(e14), 1)[0]
    s13 = np.polyfit(np.log(alphas), np.log(e13), 1)[0]
    assert abs(s14 - 1) < 0.1 and abs(s13 - 2) < 0.1, (s14, s13)


@pytest.mark.parametrize("seed", range(4))
def test_matches_scipy_bfgs_on_random_problems(seed):
    """lambda* and g(lambda*) agree with a generic quasi-Newton optimizer (scipy BFGS)."""
    scipy_optimize = pytest.importorskip("scipy.optimize")
    t, z, u = _random_problem(n=4 + seed, d=6, masked=seed % 2, scale=1.5, seed=seed)
    alpha = [0.3, 1.0, 2.0, 5.0][seed]
    r = fenchel_dual(t, z, u, alpha=alpha)

    def neg(lam):
        v, g = dual_objective(torch.tensor(lam, dtype=D), t, z, u, alpha)
        return -float(v), -g.numpy()

    ref = scipy_optimize.minimize(neg, np.zeros(6), jac=True, method="BFGS", options={"gtol": 1e-11})
    np.testing.assert_allclose(r.lam.numpy(), ref.x, rtol=1e-6, atol=1e-7)
    assert abs(float(r.value) + ref.fun) < 1e-10
    assert float(r.rel_grad_norm) <= 1e-8


def test_strong_duality_and_recovery_eq9():
    """p* = u exp(<t, lambda*>) / M (eq. 9), stationarity lambda* = alpha (mu + z - E_p* t), and the dual
    value equals the primal value (3) at p* (zero duality gap)."""
    t, z, u = _random_problem(batch=(3,), n=8, d=5, masked=2)
    alpha = 1.3
    r = fenchel_dual(t, z, u, alpha=alpha, tol=1e-12)
    un = u / u.sum(-1, keepdim=True)
    p = torch.softmax(torch.log(un) + (t @ r.lam.unsqueeze(-1)).squeeze(-1), -1)
    torch.testing.assert_close(r.weights, p, rtol=1e-12, atol=1e-14)
    mu = (un.unsqueeze(-1) * t).sum(-2)
    h = (p.unsqueeze(-1) * t).sum(-2)
    torch.testing.assert_close(r.lam, alpha * (mu + z - h), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(r.value, _primal_value(p, t, z, u, alpha), rtol=1e-10, atol=1e-12)
    assert (r.weights[..., :2] == 0).all()


@pytest.mark.parametrize("n,d", [(5, 12), (12, 5)])
def test_span_and_full_newton_agree(n, d):
    """The n-dimensional span formulation and the d-dimensional Newton give the same solution."""
    t, z, u = _random_problem(batch=(4,), n=n, d=d, masked=1, scale=2.0, seed=n)
    a = fenchel_dual(t, z, u, alpha=0.8, method="span")
    b = fenchel_dual(t, z, u, alpha=0.8, method="full")
    torch.testing.assert_close(a.lam, b.lam, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(a.relative_deviation, b.relative_deviation, rtol=1e-7, atol=1e-10)
    assert a.converged.all() and b.converged.all()


def test_cg_and_cholesky_newton_systems_agree():
    """The matrix-free (conjugate gradients) and the factorized Newton steps reach the same solution."""
    t = torch.randn(3, 1, 1, 9, 20, dtype=D)
    z = torch.randn(3, 4, 6, 20, dtype=D)
    a = fenchel_dual(t, z, linear_solver="cg", tol=1e-10)
    b = fenchel_dual(t, z, linear_solver="cholesky", tol=1e-10)
    assert a.converged.all() and b.converged.all()
    torch.testing.assert_close(a.lam, b.lam, rtol=1e-8, atol=1e-9)


def test_broadcast_shared_templates_and_chunking_match_single_solves():
    """t (B,1,1,n,d) shared over heads and queries, z (B,H,Q,d), log_u (B,1,Q,n): same answers as
    solving each problem alone, for any chunk size."""
    B, H, Q, n, d = 2, 3, 4, 5, 11
    t = torch.randn(B, 1, 1, n, d, dtype=D) * 0.7
    z = torch.randn(B, H, Q, d, dtype=D)
    log_u = torch.randn(B, 1, Q, n, dtype=D)
    log_u[1, 0, :, -1] = -math.inf
    full = fenchel_dual(t, z, log_u=log_u, linear_solver="cholesky")
    small = fenchel_dual(t, z, log_u=log_u, chunk_size=5, linear_solver="cholesky")
    assert full.lam.shape == (B, H, Q, d) and full.weights.shape == (B, H, Q, n)
    torch.testing.assert_close(full.lam, small.lam, rtol=1e-12, atol=1e-13)
    default = fenchel_dual(t, z, log_u=log_u)  # conjugate gradients: same point within the tolerance
    torch.testing.assert_close(default.lam, full.lam, rtol=1e-7, atol=1e-8)
    for b, h, q in [(0, 0, 0), (1, 2, 3), (1, 1, 0)]:
        one = fenchel_dual(t[b, 0, 0], z[b, h, q], log_u=log_u[b, 0, q])
        torch.testing.assert_close(full.lam[b, h, q], one.lam, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(full.weights[b, h, q], one.weights, rtol=1e-10, atol=1e-12)
        assert full.n_iters[b, h, q] == one.n_iters


def test_relative_deviation_and_no_lam_mode():
    """relative_deviation = ||lambda* - alpha z|| / ||lambda*||, also when lam is not materialized."""
    t, z, u = _random_problem(batch=(3,), n=6, d=10)
    r = fenchel_dual(t, z, u, alpha=2.0)
    torch.testing.assert_close(r.relative_deviation, (r.lam - 2.0 * z).norm(dim=-1) / r.lam.norm(dim=-1))
    r2 = fenchel_dual(t, z, u, alpha=2.0, return_lam=False)
    assert r2.lam is None
    torch.testing.assert_close(r2.relative_deviation, r.relative_deviation)


def test_gradient_ascent_reference_reaches_the_same_point():
    """The paper's method (plain gradient ascent) converges to the Newton solution, in many more steps."""
    t, z, u = _random_problem(batch=(2,), n=5, d=4, masked=0)
    newton = fenchel_dual(t, z, u, alpha=0.5)
    ga = gradient_ascent_dual(t, z, u, alpha=0.5)
    assert ga.converged.all()
    torch.testing.assert_close(ga.lam, newton.lam, rtol=1e-6, atol=1e-7)
    assert ga.n_iters.min() > newton.n_iters.max()


def test_float32_inputs_are_solved_in_float64():
    """float32 inputs are cast to the settings' dtype (float64) and still reach tol."""
    t, z, u = _random_problem(n=4, d=6)
    r = fenchel_dual(t.float(), z.float(), u.float())
    assert r.lam.dtype == D and r.converged.all()


def test_nonconvergence_warns_once():
    """Problems that miss tol in max_iters are flagged and reported by one RuntimeWarning."""
    t, z, u = _random_problem(n=6, d=8, scale=3.0)
    with pytest.warns(RuntimeWarning, match="did not reach tol"):
        r = fenchel_dual(t, z, u, max_iters=1, tol=1e-14)
    assert not r.converged.all()


def test_row_without_support_is_nan_and_reported():
    """A row whose u is zero everywhere has no distribution: NaN, not converged, and named in the warning."""
    t = torch.randn(2, 3, 4, dtype=D)
    u = torch.ones(2, 3, dtype=D)
    u[1] = 0.0
    with pytest.warns(RuntimeWarning, match="no support"):
        r = fenchel_dual(t, torch.randn(2, 4, dtype=D), u)
    assert r.converged[0] and not r.converged[1]
    assert torch.isnan(r.lam[1]).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"z": torch.zeros(5, dtype=D)}, "z must have shape"),
        ({"u": -torch.ones(3, dtype=D)}, "non-negative"),
        ({"u": torch.ones(4, dtype=D)}, "u must have shape"),
        ({"u": torch.ones(3, dtype=D), "log_u": torch.zeros(3, dtype=D)}, "at most one"),
        ({"method": "lbfgs"}, "method must be one of"),
        ({"linear_solver": "qr"}, "linear_solver"),
        ({"tol": 0.0}, "tol"),
        ({"max_iters": 0}, "max_iters"),
        ({"chunk_size": -1}, "chunk_size"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"max_iter": 5}, "unknown option"),
        ({"t": torch.tensor([[0.0, 1, 2, math.nan]] * 3, dtype=D)}, "t contains NaN"),
        ({"z": torch.tensor([0.0, math.inf, 1, 2], dtype=D)}, "z contains NaN or inf"),
        ({"u": torch.tensor([1.0, math.nan, 1], dtype=D)}, "u contains NaN"),
        ({"log_u": torch.tensor([0.0, math.nan, -math.inf], dtype=D)}, "log_u contains NaN"),
        ({"log_u": torch.tensor([0.0, math.inf, 0.0], dtype=D)}, "log_u contains NaN or \\+inf"),
        ({"z": torch.zeros(0, 4, dtype=D)}, "batch is empty"),
        (
            {"z": torch.zeros(2, 4, dtype=D), "u": torch.ones(3, 3, dtype=D)},
            r"do not broadcast.*z \(2,\).*u \(3,\)",
        ),
    ],
)
def test_bad_inputs_raise_naming_the_argument(kwargs, match):
    """Invalid shapes, settings and non-finite data raise a ValueError that names the argument (a negative
    or zero chunk_size used to return uninitialised memory marked as converged)."""
    args = {"t": torch.randn(3, 4, dtype=D), "z": torch.randn(4, dtype=D)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fenchel_dual(**args)


def _t5_like(B=4, H=4, Q=24, n=24, d=128, seed=0):
    """Problems shaped like a small T5's: unscaled templates (||t_i|| ~ sqrt(d)), a small evidence z, a
    position-bias-like log-prior with a causal mask, heads and queries sharing each sequence's templates."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(B, 1, 1, n, d, generator=g, dtype=D)
    z = 0.2 * torch.randn(B, H, Q, d, generator=g, dtype=D)
    log_u = 2 * torch.randn(B, H, Q, n, generator=g, dtype=D)
    return t, z, log_u.masked_fill(~torch.ones(Q, n, dtype=torch.bool).tril(), -math.inf)


@pytest.mark.parametrize("linear_solver", ["cg", "cholesky"])
def test_t5_like_batch_converges_within_15_newton_iterations(linear_solver):
    """Well-conditioned problems converge quadratically with either linear solver: every problem reaches
    tol = 1e-8 in <= 15 Newton iterations (an inexact Newton step whose accuracy is measured in the wrong
    norm used to stall near the target for 100 iterations)."""
    t, z, log_u = _t5_like()
    r = fenchel_dual(t, z, log_u=log_u, linear_solver=linear_solver, return_lam=False)
    assert r.converged.all()
    assert int(r.n_iters.max()) <= 15


def test_settings_dataclass_and_keyword_overrides_agree():
    """fenchel_dual(settings=DualSettings(...)) and the same fields as keywords give the same answer."""
    t, z, u = _random_problem(batch=(3,), n=5, d=7)
    a = fenchel_dual(t, z, u, settings=DualSettings(tol=1e-11, linear_solver="cholesky"))
    b = fenchel_dual(t, z, u, tol=1e-11, linear_solver="cholesky")
    torch.testing.assert_close(a.lam, b.lam, rtol=0, atol=0)
    assert (a.rel_grad_norm <= 1e-11).all()


@pytest.mark.parametrize("method", ["span", "full"])
def test_second_order_approximation_matches_dense_solve_with_masks_and_broadcasting(method):
    """Eq. (13) in the template span (an n x n solve) equals the d x d solve alpha (I + alpha Sigma)^-1 z,
    with masked templates and templates shared over a batch dim; fenchel_dual's second_order_deviation is
    ||lambda* - lambda_2|| / ||lambda*|| of that lambda_2."""
    g = torch.Generator().manual_seed(5)
    n, d = (5, 9) if method == "span" else (9, 5)
    t = torch.randn(2, 1, n, d, generator=g, dtype=D)
    z = torch.randn(2, 3, d, generator=g, dtype=D)
    log_u = torch.randn(2, 3, n, generator=g, dtype=D)
    log_u[0, 1, :2] = -math.inf
    lam2 = second_order_approximation(t, z, log_u=log_u, alpha=0.7)
    dense = second_order_dense(t, z, log_u=log_u, alpha=0.7)
    torch.testing.assert_close(lam2, dense, rtol=1e-10, atol=1e-12)
    r = fenchel_dual(t, z, log_u=log_u, alpha=0.7, method=method, second_order=True, tol=1e-12)
    expected = (r.lam - dense).norm(dim=-1) / r.lam.norm(dim=-1)
    torch.testing.assert_close(r.second_order_deviation, expected, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_second_order_approximation_is_closer_than_alpha_z_for_small_alpha(alpha):
    """For small alpha, lambda* - alpha z = O(alpha^2) but lambda* - lambda_2 = O(alpha^3) (eq. 13 keeps the
    covariance term that eq. 14 drops): on every random problem lambda_2 is the closer one."""
    t, z, u = _random_problem(batch=(64,), n=6, d=10, masked=1, seed=11)
    r = fenchel_dual(t, z, u, alpha=alpha, second_order=True, tol=1e-12)
    assert r.converged.all()
    assert (r.second_order_deviation < 0.5 * r.relative_deviation).all()


def test_second_order_is_one_newton_step_from_zero():
    """lambda_2 of eq. (13) is the Newton step of g from lambda = 0: grad g(0) = z and the Hessian there is
    -(I / alpha + Cov_u(t)), so (I / alpha + Sigma) lambda_2 = z."""
    t, z, u = _random_problem(n=5, d=8, masked=1, seed=2)
    alpha = 1.7
    lam2 = second_order_approximation(t, z, u, alpha)
    _, grad0 = dual_objective(torch.zeros(8, dtype=D), t, z, u, alpha)
    torch.testing.assert_close(grad0, z, rtol=1e-12, atol=1e-12)
    hess = torch.autograd.functional.hessian(
        lambda lam: dual_objective(lam, t, z, u, alpha)[0], torch.zeros(8, dtype=D)
    )
    torch.testing.assert_close(-hess @ lam2, z, rtol=1e-10, atol=1e-12)
