"""The latent mixture (model.latent_mixture): fitted to the encoder's codes, it gives back the
clusters planted in them, samples from them, travels in a model folder, and the evaluation
scores its samples beside the prior's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vaegan.artifact import ModelError
from vaegan.config import ConfigError, load_config
from vaegan.evaluate import evaluate_model
from vaegan.featurizer import load_featurizer
from vaegan.inference import VAEGANModel, load_folder
from vaegan.latent import fit_mixture
from vaegan.model import VAEGAN

MEANS = torch.tensor([[3.0, 0, 0, 0, 0, 0, 0, 0], [-3.0, 0, 0, 0, 0, 0, 0, 0], [0, 4.0, 0, 0, 0, 0, 0, 0]])
SHARES = (0.5, 0.3, 0.2)
SCALES = (0.5, 0.2, 0.3)  # isotropic standard deviations


class PixelCodes(nn.Module):
    """An encoder whose mu is the first row's first 8 pixels: codes can be planted in images."""

    def forward(self, x):
        mu = x[:, 0, 0, :8].float()
        return mu, torch.zeros_like(mu)


def planted(n: int = 2000) -> tuple[torch.Tensor, torch.Tensor]:
    """Images carrying codes from three Gaussians (MEANS, SHARES, isotropic SCALES) -> (images, labels)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.multinomial(torch.tensor(SHARES), n, replacement=True, generator=g)
    codes = MEANS[labels] + torch.tensor(SCALES)[labels, None] * torch.randn(n, 8, generator=g)
    images = torch.zeros(n, 1, 32, 32)
    images[:, 0, 0, :8] = codes
    return images, labels


def mixture_model(components: int = 3) -> VAEGAN:
    cfg = load_config("debug", overrides=[f"model.latent_mixture={components}"]).model
    return VAEGAN(cfg, encoder=PixelCodes())


def test_the_fit_finds_the_planted_clusters_and_samples_them():
    model = mixture_model()
    assert not model.has_mixture
    with pytest.raises(ValueError, match="latent='mixture' needs a model trained with model.latent_mixture"):
        model.sample(4, latent="mixture")
    images, labels = planted()
    fit_mixture(model, images)
    assert model.has_mixture
    mix = model.latent_mixture
    order = mix.means[:, 0].argsort(descending=True)  # the clusters at x = 3, 0 (y = 4), -3
    order = order[[0, 2, 1]]
    # Clusters this far apart: the fit is each cluster's own maximum-likelihood Gaussian
    codes = images[:, 0, 0, :8].double()
    for k, j in enumerate(order):
        mine = codes[labels == k]
        torch.testing.assert_close(mix.weights[j], torch.tensor(len(mine) / len(codes)), atol=1e-4, rtol=0)
        torch.testing.assert_close(mix.means[j].double(), mine.mean(0), atol=1e-4, rtol=0)
        cov = (mix.scale_tril[j] @ mix.scale_tril[j].T).double()
        torch.testing.assert_close(cov, torch.cov(mine.T, correction=0), atol=1e-4, rtol=0)
    torch.testing.assert_close(mix.means[order], MEANS, atol=0.06, rtol=0)
    # z_p drawn from it: the planted shares, each near its own cluster; the same seed, the same z_p
    z = mix.sample(6000, torch.Generator().manual_seed(1))
    nearest = torch.cdist(z, MEANS).argmin(dim=1)
    shares = torch.bincount(nearest, minlength=3).float() / len(z)
    torch.testing.assert_close(shares, torch.tensor(SHARES), atol=0.03, rtol=0)
    torch.testing.assert_close(z, mix.sample(6000, torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="latent='sideways' is not allowed; choose one of: auto, prior, "):
        model.sample(2, latent="sideways")


def test_too_few_images_for_the_components_is_a_clear_error():
    images, _ = planted(10)
    with pytest.raises(ValueError, match="a 8-component latent mixture needs at least 16 images; got 10"):
        fit_mixture(mixture_model(8), images)


def test_the_mixture_travels_in_the_model_folder(tmp_path):
    model = mixture_model()
    fit_mixture(model, planted()[0])
    cfg = load_config("debug", overrides=["model.latent_mixture=3"])
    m = VAEGANModel(VAEGAN(cfg.model), cfg)
    m.net.load_state_dict(model.state_dict(), strict=False)  # the decoder's weights and the mixture
    back = load_folder(m.save(tmp_path / "m"), device="cpu")
    assert back.latents_available == ("prior", "mixture")
    torch.testing.assert_close(back.net.latent_mixture.means, model.latent_mixture.means)
    # auto = the mixture here; prior = Dec(z_p), z_p ~ N(0, I) from the seed, as before
    torch.testing.assert_close(back.sample(5, seed=3), back.sample(5, seed=3, latent="mixture"))
    z = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(back.sample(5, seed=3, latent="prior"), back.net.decode(z))
    assert not torch.allclose(back.sample(5, seed=3), back.sample(5, seed=3, latent="prior"))
    # a model without one: only the prior, and a clear error when the mixture is asked for
    plain = VAEGANModel(VAEGAN(load_config("debug").model), load_config("debug"))
    assert plain.latents_available == ("prior",)
    torch.testing.assert_close(plain.sample(3, seed=0), plain.sample(3, seed=0, latent="prior"))
    with pytest.raises(ModelError, match="trained without model.latent_mixture; use latent='prior'"):
        plain.sample(3, latent="mixture")


def test_the_evaluation_scores_the_mixture_samples_too(mnist_shards, featurizer):
    from vaegan.evaluate import fid, load_real_images

    digits = load_featurizer(featurizer)
    real = load_real_images(mnist_shards, n=64)
    model = VAEGAN(load_config("debug", overrides=["model.latent_mixture=2"]).model)
    assert evaluate_model(model, real, digits, n=64).recognisable_mixture is None  # not fitted yet
    fit_mixture(model, load_real_images(mnist_shards, n=200, split="train"))
    result = evaluate_model(model, real, digits, n=64, seed=0)
    model.eval()
    with torch.no_grad():  # the protocol's mixture samples: the same seeded generator as the prior's
        samples = model.sample(64, torch.Generator().manual_seed(0), latent="mixture")
        p = digits.probs(samples).max(dim=1).values
    assert result.fid_samples_mixture == pytest.approx(fid(samples, real, digits), rel=1e-4)
    assert abs(result.recognisable_mixture - float((p > 0.9).float().mean())) <= 1 / 64
    metrics = result.as_metrics()
    assert {"eval_fid_samples_mixture", "eval_kid_samples_mixture", "eval_recognisable_mixture",
            "eval_recognisable_p50_mixture"} <= set(metrics)


def test_a_bad_component_count_is_refused():
    with pytest.raises(ConfigError, match=r"model.latent_mixture=-1 is not allowed; it must be an integer"):
        load_config("debug", overrides=["model.latent_mixture=-1"])


def test_a_checkpoint_from_before_the_mixture_resumes_into_a_model_with_one():
    plain = VAEGAN(load_config("debug").model)
    model = VAEGAN(load_config("debug", overrides=["model.latent_mixture=2"]).model)
    model.load_weights(plain.state_dict())  # the mixture stays unfitted, refitted at the next checkpoint
    assert not model.has_mixture
    torch.testing.assert_close(model.decoder.state_dict(), plain.decoder.state_dict())
    plain.load_weights(model.state_dict())
    broken = {k: v for k, v in plain.state_dict().items() if not k.startswith("decoder.")}
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_weights(broken)
