"""EOT certificates and the policy-gradient identity (hf_eot.analysis.eot), after "Scaled-Dot-Product
Attention as One-Sided Entropic Optimal Transport" (Litman, arXiv:2508.08369)."""

import math

import pytest
import torch

from hf_eot.analysis.eot import eot_certificates, fisher_information, policy_gradient_check

D = torch.float64


def _rows(shape=(3, 5, 7), epsilon=2.0, masked=True, prior=True):
    s = torch.randn(*shape, dtype=D) * 3
    mask = torch.ones(shape, dtype=torch.bool)
    if masked:
        mask[..., -2:] = False
        mask[0, 0, :] = False
        mask[0, 0, 0] = True  # a row with a single key
    b = torch.randn(*shape, dtype=D) if prior else None
    logits = s / epsilon + (b if b is not None else 0)
    p = torch.softmax(logits.masked_fill(~mask, -math.inf), -1)
    return s, b, mask, p


@pytest.mark.parametrize("prior", [False, True])
def test_softmax_rows_close_the_gap(prior):
    """For p = softmax(s / epsilon + b) the primal <C,p> - epsilon H(p) - epsilon <p,b> equals the log-sum-exp dual."""
    s, b, mask, p = _rows(prior=prior)
    c = eot_certificates(p, s, epsilon=2.0, log_prior=b, mask=mask)
    assert c.gap.abs().max() < 1e-12
    expected_dual = -2.0 * torch.logsumexp(
        (s / 2.0 + (b if b is not None else 0)).masked_fill(~mask, -math.inf), -1
    )
    torch.testing.assert_close(c.dual, expected_dual)


def test_gap_is_eps_kl_for_other_rows():
    """Any other row on the simplex has gap = epsilon KL(p || p*) > 0: the dual is the primal minimum."""
    s, b, mask, p_star = _rows(prior=True)
    q = torch.rand_like(p_star).masked_fill(~mask, 0)
    q = q / q.sum(-1, keepdim=True)
    c = eot_certificates(q, s, epsilon=2.0, log_prior=b, mask=mask)
    kl = torch.where(q > 0, q * (q.log() - p_star.clamp_min(1e-300).log()), torch.zeros_like(q)).sum(-1)
    torch.testing.assert_close(c.gap, 2.0 * kl, rtol=1e-9, atol=1e-12)
    assert (c.gap[mask.sum(-1) > 1] > 0).all()


def test_entropy_and_uniform_limits():
    """H(uniform over m keys) = log m; the dual of zero scores is -epsilon log m."""
    mask = torch.tensor([[True] * 4 + [False] * 2])
    p = mask.to(D) / 4
    c = eot_certificates(p, torch.zeros(1, 6, dtype=D), epsilon=0.5, mask=mask)
    torch.testing.assert_close(c.entropy, torch.tensor([math.log(4)], dtype=D))
    torch.testing.assert_close(c.dual, torch.tensor([-0.5 * math.log(4)], dtype=D))


def test_fisher_information_is_the_hessian_of_the_lse_potential():
    """Hessian of epsilon log sum exp(s / epsilon + b) in s equals (diag(p) - p p^T) / epsilon."""
    s = torch.randn(6, dtype=D)
    b = torch.randn(6, dtype=D)
    epsilon = 0.7
    H = torch.autograd.functional.hessian(lambda x: epsilon * torch.logsumexp(x / epsilon + b, -1), s)
    p = torch.softmax(s / epsilon + b, -1)
    torch.testing.assert_close(H, fisher_information(p) / epsilon)
    g = torch.autograd.functional.jacobian(lambda x: epsilon * torch.logsumexp(x / epsilon + b, -1), s)
    torch.testing.assert_close(g, p)  # its gradient is the attention row


def test_fisher_spectrum_top_eigenvalue_and_effective_rank():
    """Uniform p over n: eigenvalues 1/n (n-1 times) and 0, so top = 1/n and effective rank n - 1;
    a one-hot row has zero Fisher information (rank 0); general rows match numpy."""
    n = 5
    p = torch.full((1, n), 1.0 / n, dtype=D)
    c = eot_certificates(p, torch.zeros(1, n, dtype=D))
    torch.testing.assert_close(c.fisher_top_eig, torch.tensor([1.0 / n], dtype=D))
    torch.testing.assert_close(c.fisher_eff_rank, torch.tensor([n - 1.0], dtype=D))
    onehot = torch.tensor([[0.0, 1.0, 0.0]], dtype=D)
    c = eot_certificates(onehot, torch.zeros(1, 3, dtype=D))
    assert float(c.fisher_top_eig) == pytest.approx(0.0, abs=1e-15) and float(c.fisher_eff_rank) == 0.0
    _, _, _, p = _rows(masked=False, prior=False)
    c = eot_certificates(p, torch.zeros_like(p))
    ev = torch.linalg.eigvalsh(fisher_information(p)).clamp_min(0)
    torch.testing.assert_close(c.fisher_top_eig, ev[..., -1])
    w = ev / ev.sum(-1, keepdim=True)
    eff = torch.exp(-(w * w.clamp_min(1e-300).log()).sum(-1))
    torch.testing.assert_close(c.fisher_eff_rank, eff)


@pytest.mark.parametrize("prior,masked", [(False, False), (True, True)])
def test_backprop_is_an_advantage_policy_gradient(prior, masked):
    """dL/ds_j = p_j (g_j - E_p[g]) / epsilon for a loss of o = p @ V (here a non-quadratic one)."""
    s, b, mask, _ = _rows(shape=(2, 3, 6), epsilon=1.5, masked=masked, prior=prior)
    v = torch.randn(2, 6, 4, dtype=D)
    target = torch.randn(2, 3, 4, dtype=D)

    def loss(out):
        return torch.log1p(((out - target) ** 2).sum())

    r = policy_gradient_check(s, v, epsilon=1.5, log_prior=b, mask=mask, loss=loss)
    assert float(r.relative_residual) < 1e-12
    assert float(r.grad_autograd.abs().max()) > 1e-3
    p = torch.softmax((s / 1.5 + (b if b is not None else 0)).masked_fill(~mask, -math.inf), -1)
    # the baseline makes the advantage centred under p (variance reduction without bias)
    assert (p * r.advantage).sum(-1).abs().max() < 1e-12


def test_policy_gradient_default_loss_and_grad_disabled_context():
    """Works under torch.no_grad (the analysis driver's context) with the default loss 0.5 ||o||^2."""
    s = torch.randn(4, 5, dtype=D)
    v = torch.randn(5, 3, dtype=D)
    with torch.no_grad():
        r = policy_gradient_check(s, v)
    assert float(r.relative_residual) < 1e-12


def test_bad_eps_raises():
    with pytest.raises(ValueError, match="epsilon"):
        eot_certificates(torch.ones(1, 2, dtype=D) / 2, torch.zeros(1, 2, dtype=D), epsilon=0.0)
