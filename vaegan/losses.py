"""The loss terms of VAE/GAN (Larsen et al. 2016, eqs. 3-9), named after the equations.

Reduction everywhere: sum over a sample's dimensions (latents, features, pixels), mean over
the batch, so every term is "per image" and gamma means the same at any batch size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


def kl_prior(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """L_prior = KL(q(z|x) || N(0, I)) = -1/2 sum_j (1 + log_var_j - mu_j^2 - exp(log_var_j)).

    Closed form for diagonal Gaussians (Kingma & Welling 2014, appendix B).
    """
    kl = -0.5 * (1 + log_var - mu.square() - log_var.exp()).sum(dim=1)
    return kl.mean()


def llike_dis_l(feats_real: torch.Tensor, feats_recon: torch.Tensor) -> torch.Tensor:
    """L_llike^Dis_l = -log N(Dis_l(x) | Dis_l(x_tilde), I) = 1/2 ||Dis_l(x) - Dis_l(x_tilde)||^2
    (+ const), summed over the features (paper eq. 7-8)."""
    diff = (feats_real.float() - feats_recon.float()).flatten(1)
    return 0.5 * diff.square().sum(dim=1).mean()


def llike_pixel(x: torch.Tensor, x_recon: torch.Tensor) -> torch.Tensor:
    """The plain VAE's pixel-wise Gaussian error, 1/2 ||x - x_tilde||^2: the baseline that
    the learned similarity replaces."""
    return llike_dis_l(x, x_recon)


def gan_bce(logit_real: torch.Tensor, logit_recon: torch.Tensor | None,
            logit_prior: torch.Tensor) -> torch.Tensor:
    """L_GAN as a binary cross-entropy, which Dis descends and Dec ascends (paper eq. 9):

        -[log Dis(x) + log(1 - Dis(x_tilde)) + log(1 - Dis(x_p))]

    each term a batch mean. `logit_recon=None` drops the x_tilde term (the authors' code).
    """
    bce = F.binary_cross_entropy_with_logits
    loss = bce(logit_real.float(), torch.ones_like(logit_real, dtype=torch.float32))
    loss = loss + bce(logit_prior.float(), torch.zeros_like(logit_prior, dtype=torch.float32))
    if logit_recon is not None:
        loss = loss + bce(logit_recon.float(), torch.zeros_like(logit_recon, dtype=torch.float32))
    return loss


def generator_nonsaturating(logit_fake: torch.Tensor) -> torch.Tensor:
    """-log Dis(fake), batch mean: the non-saturating decoder objective (Goodfellow 2014, s3)."""
    return F.binary_cross_entropy_with_logits(
        logit_fake.float(), torch.ones_like(logit_fake, dtype=torch.float32))


def attribute_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The attribute head's loss (loss.attribute_weight; AC-GAN's class term, Odena et al.
    2017): BCE of Dis's attribute logits (B, A) against the real images' labels (B, A; > 0
    means "has it", so 1/0 and CelebA's 1/-1 both work). A mean over the attributes as well
    as the batch, the one exception to the per-image sums here: the weight then means the
    same for 5 labels as for CelebA's 40."""
    return F.binary_cross_entropy_with_logits(logits.float(), (labels > 0).float())


def attribute_llike(logits_recon: torch.Tensor, logits_real: torch.Tensor) -> torch.Tensor:
    """The attribute term of L_llike (loss.attribute_llike): BCE of Dis's attribute logits for
    x~ against its reading of x, sigmoid(logits of x), a constant; a mean over the
    attributes and the batch, as `attribute_bce`."""
    return F.binary_cross_entropy_with_logits(logits_recon.float(), logits_real.detach().float().sigmoid())


def equilibrium(real_cost: float, fake_cost: float, target: float, margin: float) -> tuple[bool, bool]:
    """The authors' margin rule -> (skip_dis, skip_dec); target and margin are
    loss.equilibrium_target / _margin (the authors' 0.68 and 0.35).

    real_cost = mean -log Dis(x), fake_cost = mean -log(1 - Dis(x_p)). A Dis that is far
    ahead (a cost below target - margin) pauses; a Dec that is far ahead (a cost above
    target + margin: Dis is losing) pauses; if both would pause, both update.
    """
    skip_dis = real_cost < target - margin or fake_cost < target - margin
    skip_dec = real_cost > target + margin or fake_cost > target + margin
    if skip_dis and skip_dec:
        return False, False
    return skip_dis, skip_dec


class StepMetrics(NamedTuple):
    """What one training step reports; the field names are the metric names.

    Terms a mode does not have (e.g. gan_bce for mode=vae) are 0.
    """

    loss: float
    """L = L_prior + L_llike + L_GAN, the paper's total criterion (for plotting only)."""
    kl_prior: float
    llike_dis_l: float
    llike_pixel: float
    gan_bce: float
    d_real: float
    """mean Dis(x)"""
    d_recon: float
    """mean Dis(x_tilde)"""
    d_prior: float
    """mean Dis(x_p)"""
    skip_dis: float
    """1 if the equilibrium rule skipped the discriminator update"""
    skip_dec: float
    """1 if the equilibrium rule skipped the decoder update"""
    attribute_bce: float = 0.0
    """Dis's attribute loss on the real images (loss.attribute_weight; 0 when off)"""
