"""Evaluating a VAE/GAN: FID of samples and reconstructions, and reconstruction metrics.

The paper reports no FID (it came later); this project computes it under one fixed protocol,
so that numbers from different runs compare:

    real       the first N images of a held-out split ("val") in reader order: no shuffle,
               no flip. N = FID_N = 10,000, or the whole split when it is smaller (mnist5k);
               the N used is reported as `n_images`, and FIDs compare only at equal N.
    samples    N prior samples Dec(z_p), z_p ~ N(0, I), drawn from a generator seeded with
               SAMPLE_SEED = 0 (the same z_p for every checkpoint), model in eval mode.
               A model with a fitted latent mixture (model.latent_mixture) is also scored
               on N samples with z_p from the mixture, same seed: the `*_mixture` metrics.
    recon      Dec(mu(x)) for the same N real images (the posterior mean, no sampling).
    features   Inception-v3 pool3 (2048-d; images repeated to RGB and resized to 299x299,
               bilinear) when its weights are on disk; otherwise the penultimate layer
               (128-d) of a classifier trained on the data's own labels at the data's own
               size (`vaegan.featurizer`). The featurizer's name is part of the result:
               an FID is only comparable to FIDs with the same featurizer.
    distance   FID = ||mu_r - mu_g||^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2)) (Dowson & Landau
               1982; Heusel et al. 2017) of Gaussians fitted to the features, in float64;
               KID (Binkowski et al. 2018): the unbiased MMD^2 under the kernel
               (f.g / D + 1)^3, averaged over 100 random subsets of min(1000, N), drawn
               from SAMPLE_SEED. Both computed by torchmetrics from this project's
               features. Small N biases FID upwards, KID much less (periodic evaluation
               during training uses a small N: compare those FIDs only with each other).
    sharpness  mean |grad x| (forward differences, pixels in [0, 1]) of the generated
               images over that of the real ones: 1 is as sharp as the data, below 1 blurrier.

Reconstruction metrics on the same N images, with pixels scaled from [-1, 1] to [0, 1]:
`mse_recon` (mean squared error per pixel), `ssim_recon` (SSIM of Wang et al. 2004, 11x11
Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, mean over the valid window positions and
the channels), and `dis_l_recon` = mean 1/2 ||Dis_l(x) - Dis_l(x~)||^2, the paper's learned
similarity measured with the model's own discriminator in eval mode (not comparable across
models: each has its own Dis). With a softmax featurizer, `recognisable` is the share of
samples whose top class has probability > 0.9 (`recognisable_p50`: > 0.5), and
`recognisable_real` the p > 0.9 share of the N real images (its ceiling under that featurizer).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from vaegan.artifact import ModelError, net_from_weights
from vaegan.featurizer import SOFTMAX_CONFIDENT, EvalError, Featurizer, resolve_featurizer
from vaegan.inference import resolve_device
from vaegan.losses import llike_dis_l
from vaegan.model import VAEGAN

FID_N = 10_000  # images per FID (or the whole held-out split when smaller)
SAMPLE_SEED = 0  # seeds the prior samples, so every checkpoint is scored on the same z_p
EVAL_SPLIT = "val"  # the held-out split the real images come from
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # Binkowski et al. 2018's protocol
BATCH = 250  # images per forward pass; memory only, the results do not depend on it
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03  # Wang et al. 2004


# ---------------------------------------------------------------------------------------
# FID and KID: torchmetrics' statistics over this project's features.


class _Precomputed(torch.nn.Module):
    """The feature extractor handed to torchmetrics: the features are computed beforehand
    (once per image set, shared by FID and KID), so it only passes them on, in float64."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.double()


def _check_features(real: torch.Tensor, fake: torch.Tensor) -> None:
    for name, f in (("real", real), ("fake", fake)):
        if f.ndim != 2 or len(f) < 2:
            raise EvalError(f"{name} features must have shape (N >= 2, D); got {tuple(f.shape)}")
    if real.shape[1] != fake.shape[1]:
        raise EvalError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]} "
                        "(features from different featurizers?)")


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID (Heusel et al. 2017) between (N, D) feature sets, by torchmetrics in float64."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check_features(real, fake)
    # sync_on_compute=False: only rank 0 evaluates, so there is no one to gather from.
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]), sync_on_compute=False)
    metric.update(real.cpu(), real=True)
    metric.update(fake.cpu(), real=False)
    return max(float(metric.compute()), 0.0)  # rounding can give -1e-13 for identical sets


def kid_from_features(real: torch.Tensor, fake: torch.Tensor, seed: int = SAMPLE_SEED
                      ) -> tuple[float, float]:
    """KID (Binkowski et al. 2018: unbiased MMD^2, cubic polynomial kernel) between (N, D)
    feature sets by torchmetrics: mean and standard deviation over KID_SUBSETS random subsets
    of min(KID_SUBSET_SIZE, N) each, drawn from `seed` (the same subsets every time, and the
    caller's random state untouched)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    _check_features(real, fake)
    size = min(KID_SUBSET_SIZE, len(real), len(fake))
    with warnings.catch_warnings():  # "will save all extracted features": N x D, they are here already
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        metric = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=KID_SUBSETS,
                                         subset_size=size, sync_on_compute=False)
    metric.update(real.cpu(), real=True)
    metric.update(fake.cpu(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


@torch.no_grad()
def featurize(images: torch.Tensor, featurizer: Featurizer, batch_size: int = BATCH) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> (N, D) features on the CPU, batch by batch."""
    return torch.cat([featurizer.features(images[i:i + batch_size]).cpu()
                      for i in range(0, len(images), batch_size)])


def fid(images_a: torch.Tensor, images_b: torch.Tensor, featurizer: Featurizer,
        batch_size: int = BATCH) -> float:
    """FID between two image sets in [-1, 1] under `featurizer`."""
    return fid_from_features(featurize(images_a, featurizer, batch_size),
                             featurize(images_b, featurizer, batch_size))


# ---------------------------------------------------------------------------------------
# Pixel metrics.


def _gaussian_1d(size: int, sigma: float, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-x.square() / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0, window: int = SSIM_WINDOW,
         sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """SSIM (Wang, Bovik, Sheikh, Simoncelli 2004, eq. 13) per image -> (B,).

    x, y: (B, C, H, W) with values in [0, data_range]. Local statistics under a Gaussian
    window (separable, 'valid' positions only, as in the authors' reference code), computed
    per channel; the SSIM map is averaged over positions and channels.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise EvalError(f"ssim needs two (B, C, H, W) tensors of equal shape; got {tuple(x.shape)} "
                        f"and {tuple(y.shape)}")
    window = min(window, x.shape[-1], x.shape[-2])  # tiny images: the window shrinks to fit
    # float64: var = E[x^2] - E[x]^2 cancels badly in float32 on flat regions, where c2 is tiny.
    x, y = x.double(), y.double()
    c = x.shape[1]
    g = _gaussian_1d(window, sigma, x.device, x.dtype)
    gh, gw = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)

    def blur(t):  # the Gaussian-weighted local mean of every channel
        return F.conv2d(F.conv2d(t, gh, groups=c), gw, groups=c)

    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.square()
    var_y = blur(y * y) - mu_y.square()
    cov = blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return s.mean(dim=(1, 2, 3)).float()


def gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
    """(B,) mean over pixels and channels of |grad x| = sqrt(dx^2 + dy^2), forward
    differences, pixels in [0, 1]: the edge energy that blur takes away."""
    dx = x[..., :-1, 1:] - x[..., :-1, :-1]
    dy = x[..., 1:, :-1] - x[..., :-1, :-1]
    return (dx.square() + dy.square()).sqrt().mean(dim=(1, 2, 3)).float()


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] (clamped: a decoder's tanh stays inside, real data might not quite)."""
    return ((x.float() + 1) / 2).clamp(0, 1)


# ---------------------------------------------------------------------------------------
# All metrics of one model.


MIXTURE_FIELDS = ("fid_samples_mixture", "kid_samples_mixture", "recognisable_mixture",
                  "recognisable_p50_mixture")
RECON_FIELDS = ("fid_recon", "kid_recon", "sharpness_recon", "mse_recon", "ssim_recon", "dis_l_recon")


class EvalMetrics(NamedTuple):
    """What `evaluate_model` reports; the field names are the metric names."""

    fid_samples: float
    """FID of N prior samples against N held-out real images."""
    fid_recon: float
    """FID of the reconstructions Dec(mu(x)) of those real images against them."""
    kid_samples: float
    """KID of the prior samples against the real images (mean over subsets)."""
    kid_recon: float
    """KID of the reconstructions against the real images."""
    sharpness_samples: float
    """Mean gradient magnitude of the samples over that of the real images (1: as sharp as
    real images; below 1: blurrier)."""
    sharpness_recon: float
    """The same ratio for the reconstructions."""
    mse_recon: float
    """Mean squared pixel error of the reconstructions, pixels in [0, 1]."""
    ssim_recon: float
    """Mean SSIM of the reconstructions (1 = identical), pixels in [0, 1]."""
    dis_l_recon: float
    """Mean 1/2 ||Dis_l(x) - Dis_l(x~)||^2 under the model's own discriminator (eval mode)."""
    recognisable: float | None
    """Share of samples a softmax featurizer classifies with p > 0.9; None for other featurizers."""
    recognisable_p50: float | None
    """Share of samples whose top class has p > 0.5: the class beats all the others together
    (a looser reading of "a digit a classifier recognises")."""
    recognisable_real: float | None
    """The same share for the N held-out real images: the ceiling `recognisable` is read
    against (a classifier is not sure of every real digit either)."""
    n_images: int
    """N: real images, samples and reconstructions each."""
    fid_samples_mixture: float | None = None
    """FID of N samples with z_p from the model's fitted latent mixture (model.latent_mixture),
    not the prior; None for a model without one. The same z_p seed as the prior's."""
    kid_samples_mixture: float | None = None
    recognisable_mixture: float | None = None
    """`recognisable` of those samples."""
    recognisable_p50_mixture: float | None = None

    def as_metrics(self, prefix: str = "eval_") -> dict[str, float]:
        """{'eval_fid_samples': ..., ...} for a tracker; metrics that do not apply are left out."""
        return {prefix + k: float(v) for k, v in self._asdict().items() if v is not None}


def _top_class_p(featurizer: Featurizer, images: torch.Tensor) -> torch.Tensor:
    """(B,) probability of each image's top class under a softmax featurizer."""
    return featurizer.probs(images).max(dim=1).values


@torch.no_grad()
def evaluate_model(model: VAEGAN, real_images: torch.Tensor, featurizer: Featurizer, n: int = FID_N,
                   seed: int = SAMPLE_SEED, *, batch_size: int = BATCH,
                   reconstructs: bool = True) -> EvalMetrics:
    """Score `model` against held-out `real_images` (N, C, H, W) in [-1, 1] (module docstring).
    `reconstructs` False (loss.mode=gan: no encoder was trained) leaves the reconstruction
    metrics out (None).

    Uses the first min(n, N) images. The model is put in eval mode (batch norm on its running
    statistics) and handed back in the mode it came in, so the training loop can call this
    every V steps on rank 0 (pass the unwrapped model, not the DDP wrapper).
    """
    if real_images.ndim != 4 or len(real_images) < 2:
        raise EvalError(f"real_images must be (N >= 2, C, H, W); got {tuple(real_images.shape)}")
    model.check_images(real_images[:1])
    if n < 2:
        raise EvalError(f"n={n} is not allowed; FID needs n >= 2 images (the protocol uses {FID_N})")
    n = min(n, len(real_images))
    device = model.device
    was_training = model.training
    model.eval()
    try:
        feats_real, feats_recon = [], []
        softmax = getattr(featurizer, "kind", "") == "softmax"
        confident_real = 0
        sq_err = ssim_sum = dis_l_sum = 0.0
        edges = {"real": 0.0, "recon": 0.0}
        for i in range(0, n, batch_size):
            x = real_images[i:min(i + batch_size, n)].to(device, torch.float32)
            x_recon = model.reconstruct(x).float()
            feats_real.append(featurizer.features(x).cpu())
            if softmax:
                confident_real += int((_top_class_p(featurizer, x) > SOFTMAX_CONFIDENT).sum())
            feats_recon.append(featurizer.features(x_recon).cpu())
            x01, r01 = to_unit(x), to_unit(x_recon)
            sq_err += float((x01 - r01).square().mean(dim=(1, 2, 3)).sum())
            ssim_sum += float(ssim(x01, r01).sum())
            edges["real"] += float(gradient_magnitude(x01).sum())
            edges["recon"] += float(gradient_magnitude(r01).sum())
            # L_llike^Dis_l of the paper (a batch mean), with the model's own (eval-mode) Dis.
            dis = model.discriminator
            dis_l_sum += float(llike_dis_l(dis.features(x), dis.features(x_recon))) * len(x)

        samples, edges["samples"], confident, confident_p50 = _score_samples(
            model, "prior", featurizer, n, seed, batch_size, softmax)
        mixture = None
        if model.has_mixture:
            mixture = _score_samples(model, "mixture", featurizer, n, seed, batch_size, softmax)
    finally:
        model.train(was_training)

    real, recon = torch.cat(feats_real), torch.cat(feats_recon)
    metrics = EvalMetrics(
        fid_samples=fid_from_features(real, samples),
        fid_recon=fid_from_features(real, recon),
        kid_samples=kid_from_features(real, samples, seed)[0],
        kid_recon=kid_from_features(real, recon, seed)[0],
        sharpness_samples=edges["samples"] / max(edges["real"], 1e-12),
        sharpness_recon=edges["recon"] / max(edges["real"], 1e-12),
        mse_recon=sq_err / n,
        ssim_recon=ssim_sum / n,
        dis_l_recon=dis_l_sum / n,
        recognisable=confident / n if softmax else None,
        recognisable_p50=confident_p50 / n if softmax else None,
        recognisable_real=confident_real / n if softmax else None,
        n_images=n,
    )
    if mixture is not None:
        feats, _, conf, conf_p50 = mixture
        metrics = metrics._replace(
            fid_samples_mixture=fid_from_features(real, feats), kid_samples_mixture=kid_from_features(
                real, feats, seed)[0], recognisable_mixture=conf / n if softmax else None,
            recognisable_p50_mixture=conf_p50 / n if softmax else None)
    return metrics if reconstructs else metrics._replace(**dict.fromkeys(RECON_FIELDS))


def _score_samples(model: VAEGAN, latent: str, featurizer: Featurizer, n: int, seed: int, batch_size: int,
                   softmax: bool) -> tuple[torch.Tensor, float, int, int]:
    """n samples drawn from `latent` (prior | mixture) with the seeded generator -> (their
    features, their summed gradient magnitude, how many pass p > 0.9 and p > 0.5)."""
    # a CPU generator, so that a seed draws the same z_p on every device (model.sample moves them)
    generator = torch.Generator().manual_seed(seed)
    feats, edges, confident, confident_p50 = [], 0.0, 0, 0
    for i in range(0, n, batch_size):
        samples = model.sample(min(batch_size, n - i), generator, latent=latent).float()
        feats.append(featurizer.features(samples).cpu())
        edges += float(gradient_magnitude(to_unit(samples)).sum())
        if softmax:
            p_top = _top_class_p(featurizer, samples)
            confident += int((p_top > SOFTMAX_CONFIDENT).sum())
            confident_p50 += int((p_top > 0.5).sum())
    return torch.cat(feats), edges, confident, confident_p50


# ---------------------------------------------------------------------------------------
# What `vaegan eval` runs: a checkpoint and shards in, a report out.


def _load_model(path: str | Path, device: torch.device | str = "cpu") -> VAEGAN:
    """A checkpoint directory (vaegan.checkpoint), or a file saved as
    torch.save({"config": cfg.to_dict(), "model": model.state_dict()})."""
    from vaegan.config import config_from_dict

    path = Path(path)
    if path.is_dir():
        from vaegan.checkpoint import load_checkpoint

        try:
            model, _, _ = load_checkpoint(path, map_location=device)
        except ModelError as e:
            raise EvalError(str(e)) from None
        return model
    if not path.is_file():
        raise EvalError(f"checkpoint {str(path)!r} does not exist; pass a checkpoint directory "
                        "(with model.pt and config.yaml) or a file holding {'config', 'model'}")
    blob = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(blob, dict) or not {"config", "model"} <= blob.keys():
        raise EvalError(f"checkpoint file {str(path)!r} must hold a dict with keys 'config' and 'model'")
    return net_from_weights(config_from_dict(blob["config"]).model, blob["model"]).to(device).eval()


def load_real_images(shards: str, n: int = FID_N, split: str = EVAL_SPLIT, *, s3_endpoint: str = ""
                     ) -> torch.Tensor:
    """The protocol's reals: the first n images of `split` in reader order (no shuffle, no flip)."""
    from vaegan.data import DataError, read_split

    try:
        real = read_split(shards, n, split, batch_size=BATCH, s3_endpoint=s3_endpoint)
    except DataError as e:
        raise EvalError(str(e)) from None
    if len(real) < 2:
        raise EvalError(f"split {split!r} of {shards!r} has {len(real)} images; FID needs at least 2")
    return real


def run_eval(checkpoint: str | Path, shards: str, featurizer: str, *, n: int = FID_N,
             split: str = EVAL_SPLIT, seed: int = SAMPLE_SEED, inception_weights: str | None = None,
             device: str = "auto") -> dict[str, Any]:
    """`vaegan eval`: load, score, and return a JSON-able report (protocol + metrics)."""
    dev = resolve_device(device)
    feat = resolve_featurizer(featurizer, inception_weights, dev)  # fail fast, before reading data
    model = _load_model(checkpoint, dev)
    real = load_real_images(shards, n, split)
    metrics = evaluate_model(model, real, feat, n=n, seed=seed)
    return {
        "checkpoint": str(checkpoint),
        "shards": shards,
        "split": split,
        "featurizer": feat.name,
        "featurizer_path": featurizer,
        "seed": seed,
        # the mixture's metrics only for a model that has one
        "metrics": {k: v for k, v in metrics._asdict().items() if v is not None or k not in MIXTURE_FIELDS},
    }


def format_report(report: dict[str, Any]) -> str:
    """A small aligned table of the report's metrics."""
    lines = [f"{report['checkpoint']}  ({report['split']} split, {report['metrics']['n_images']} images, "
             f"features: {report['featurizer']})"]
    for name, value in report["metrics"].items():
        if value is None:
            text = "-"
        elif isinstance(value, int):
            text = f"{value:d}"
        else:
            text = f"{value:.4f}" if math.isfinite(value) else str(value)
        lines.append(f"  {name:<24} {text:>12}")
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


__all__ = [
    "FID_N", "SAMPLE_SEED", "EVAL_SPLIT", "EvalError", "EvalMetrics", "fid_from_features",
    "kid_from_features", "featurize", "fid", "ssim", "gradient_magnitude", "evaluate_model",
    "load_real_images", "run_eval", "format_report", "write_report",
]
