"""Fitting `model.LatentMixture`: a Gaussian mixture over the encoder's codes of real images.

Ex-post density estimation (Ghosh et al. 2020, "From variational to deterministic
autoencoders", s4): after (or during) training, fit a mixture to mu(x) over the training
images and sample z_p from it instead of N(0, I). The VAE's KL term pulls the codes towards
the prior, but they still form clusters with gaps between them, and Dec(z) in a gap is a
blend of the neighbouring clusters' images; the mixture's samples stay in the clusters.
scikit-learn's EM does the fitting (full covariances; k-means initialisation).
"""

from __future__ import annotations

import warnings

import torch

from vaegan.model import VAEGAN

FIT_IMAGES = 10_000
"""At most this many training images are encoded for the fit (rank 0, at every checkpoint
and evaluation): enough for a few hundred parameters per component, ~1 s at 32x32."""


@torch.no_grad()
def encode_means(model: VAEGAN, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """mu(x) of `images` (N, C, H, W) in [-1, 1], in eval mode, as float64 on the CPU."""
    was_training = model.training
    model.eval()
    try:
        dev = model.device
        return torch.cat([model.encode(images[i:i + batch_size].to(dev))[0].double().cpu()
                          for i in range(0, len(images), batch_size)])
    finally:
        model.train(was_training)


def fit_mixture(model: VAEGAN, images: torch.Tensor, seed: int = 0) -> None:
    """Fit `model.latent_mixture` (model.latent_mixture components) to mu(images), in place."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    mixture = model.latent_mixture
    if mixture is None:
        raise ValueError("this model has no latent mixture to fit (model.latent_mixture=0)")
    k = len(mixture.weights)
    if len(images) < 2 * k:
        raise ValueError(f"fitting a {k}-component latent mixture needs at least {2 * k} images; "
                         f"got {len(images)} (lower model.latent_mixture)")
    codes = encode_means(model, images[:FIT_IMAGES]).numpy()
    with warnings.catch_warnings():  # a mixture short of convergence still samples well
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm = GaussianMixture(k, covariance_type="full", random_state=seed).fit(codes)
    dev = mixture.means.device
    mixture.weights.copy_(torch.as_tensor(gm.weights_, device=dev))
    mixture.means.copy_(torch.as_tensor(gm.means_, device=dev))
    mixture.scale_tril.copy_(torch.linalg.cholesky(torch.as_tensor(gm.covariances_)).to(dev))
    mixture.fitted.fill_(True)
