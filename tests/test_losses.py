import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from vaegan.losses import equilibrium, gan_bce, kl_prior, llike_dis_l


def test_kl_prior_matches_torch_distributions():
    mu, log_var = torch.randn(16, 10), torch.randn(16, 10)
    q = Normal(mu, torch.exp(0.5 * log_var))
    p = Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = kl_divergence(q, p).sum(1).mean()
    torch.testing.assert_close(kl_prior(mu, log_var), expected)


def test_llike_is_gaussian_negative_log_likelihood_up_to_a_constant():
    a, b = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    nll = -Normal(b, 1.0).log_prob(a).flatten(1).sum(1).mean()
    const = 0.5 * math.log(2 * math.pi) * 75
    torch.testing.assert_close(llike_dis_l(a, b), nll - const)


def test_gan_bce_is_the_papers_log_form():
    lr, lt, lp = torch.randn(8), torch.randn(8), torch.randn(8)
    d = torch.sigmoid
    paper = (torch.log(d(lr)).mean() + torch.log(1 - d(lt)).mean()
             + torch.log(1 - d(lp)).mean())
    torch.testing.assert_close(gan_bce(lr, lt, lp), -paper)
    without_recon = torch.log(d(lr)).mean() + torch.log(1 - d(lp)).mean()
    torch.testing.assert_close(gan_bce(lr, None, lp), -without_recon)


@pytest.mark.parametrize(("real", "fake", "expected"), [
    (0.68, 0.68, (False, False)),  # balanced: both update
    (0.20, 0.68, (True, False)),   # Dis far ahead on real: Dis pauses
    (0.68, 1.20, (False, True)),   # Dis losing on fakes: Dec pauses
    (0.20, 1.20, (False, False)),  # both would pause: both update
])
def test_equilibrium_rule_four_cases(real, fake, expected):
    assert equilibrium(real, fake, 0.68, 0.35) == expected
