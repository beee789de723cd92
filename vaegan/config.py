"""One typed config tree for everything: model, loss, optim, data, train, tracking.

Defaults live in code; named presets (`debug`, `mnist32`, `celeba64`, `celeba64-reference`)
are plain functions returning a `Config`. YAML files and `key=value` dotted overrides are
accepted at the edge (`load_config`), and anything unknown or out of range is rejected
with a `ConfigError` that names the key and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vaegan.errors import UserError


class ConfigError(UserError, ValueError):
    """A config key or value that is not allowed; the message says which and what is."""


def _choice(section: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        allowed_s = " | ".join(str(a) for a in allowed)
        raise ConfigError(f"{section}.{name}={value!r} is not allowed; choose one of: {allowed_s}")


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed; it must be {allowed}")


MAX_MIXTURE = 256
LATENTS = ("auto", "prior", "mixture")
"""Where a model's sample() draws z_p: the prior N(0, I), the latent mixture fitted to the
encoder's codes (model.latent_mixture), or auto (the mixture when there is one)."""


@dataclass
class ModelConfig:
    image_size: int = 64
    """Height = width of the images: 32, 64 or 128 (Table 1 is 64; other sizes add or
    remove stride-2 stages so the bottleneck stays 8x8)."""
    channels: int = 3
    """1 (grey) or 3 (RGB)."""
    latent_dim: int = 128
    """Size of z."""
    width: float = 1.0
    """Multiplier on every conv and hidden FC width of Table 1 (0.125 for tiny debug nets)."""
    enc_fc: int = 2048
    """Encoder hidden FC width before the width multiplier (paper 2048, authors' code 1024)."""
    dis_fc: int = 512
    """Discriminator hidden FC width before the width multiplier."""
    dis_layer: int = -1
    """Which discriminator conv gives Dis_l (1-based; -1 = the last conv, which is the
    paper's 4th conv at 64x64). Taken before that conv's BN and ReLU."""
    dis_attributes: int = 0
    """Outputs of an attribute head on Dis's hidden FC (loss.attribute_weight): one logit per
    labelled attribute of the data. Training sets it from the shards' manifest; a checkpoint
    keeps it so its head loads. 0: no head (the paper's Dis)."""
    latent_mixture: int = 0
    """Components of a Gaussian mixture fitted to the encoder's means of the training images
    at every checkpoint and evaluation (ex-post density estimation, Ghosh et al. 2020), which
    samples can be drawn from instead of the prior N(0, I): z_p then lands where the decoder
    was trained on real codes rather than in the gaps between them. 0: the prior only (and
    loss.mode=gan, which trains no encoder, ignores it)."""

    def validate(self) -> None:
        _choice("model", "image_size", self.image_size, (32, 64, 128))
        _choice("model", "channels", self.channels, (1, 3))
        _check(self.latent_dim >= 1, "model.latent_dim", self.latent_dim, "an integer >= 1")
        _check(0 < self.width <= 8, "model.width", self.width, "a number in (0, 8]")
        _check(self.enc_fc >= 1, "model.enc_fc", self.enc_fc, "an integer >= 1")
        _check(self.dis_fc >= 1, "model.dis_fc", self.dis_fc, "an integer >= 1")
        _check(self.dis_attributes >= 0, "model.dis_attributes", self.dis_attributes,
               "an integer >= 0 (0: no attribute head)")
        _check(0 <= self.latent_mixture <= MAX_MIXTURE, "model.latent_mixture", self.latent_mixture,
               f"an integer in 0..{MAX_MIXTURE} (0: sample the prior only)")
        n_convs = 1 + int(math.log2(self.image_size // 8))
        ok = self.dis_layer == -1 or 1 <= self.dis_layer <= n_convs
        _check(ok, "model.dis_layer", self.dis_layer, f"-1 (last conv) or 1..{n_convs}")


MODES = ("vaegan", "vae", "vae_dis_l", "gan")
"""The paper's model and its three baselines (docs/method.md#baselines)."""
AUGMENTATIONS = ("translation", "cutout", "color")  # vaegan.augment


@dataclass
class LossConfig:
    mode: str = "vaegan"
    """vaegan (the paper's model) | vae (pixel-wise Gaussian VAE baseline) | vae_dis_l (the
    paper's VAE_Dis_l: reconstruction error in Dis_l of a discriminator trained as a GAN, no
    adversarial term for the decoder) | gan (no encoder)."""
    recipe: str = "paper"
    """paper (Algorithm 1) | reference (the authors' code: no x_tilde in the GAN loss, convex
    decoder weight w, equilibrium rule)."""
    gamma: float = 1e-2
    """Weight of the Dis_l reconstruction term in the decoder's objective (content vs style);
    recipe=paper only. What Ray Tune sweeps."""
    kl_weight: float = 1.0
    """beta: the encoder descends beta * L_prior + L_llike (every mode with an encoder). 1 is
    the paper's VAE; beta < 1 (beta-VAE's knob, Higgins et al. 2017) lets the codes carry
    more of the image, at the price of a prior that fits them less well."""
    w: float = 1e-6
    """recipe=reference: the decoder's gradient is w * grad(L_llike) - (1 - w) * grad(L_GAN)."""
    generator: str = "minimax"
    """minimax (Dec ascends the BCE, as written in the paper) | nonsaturating (Dec descends
    -log D(fake), the usual DCGAN practice; costs one extra input-gradient pass)."""
    equilibrium: bool = False
    """The authors' margin rule: skip the Dis or Dec update when the other is far ahead.
    Always on for recipe=reference."""
    equilibrium_target: float = 0.68
    equilibrium_margin: float = 0.35
    decoder_bn: str = "joint"
    """joint (one decoder forward over [z; z_p]: batch norm takes one mean and variance over
    the codes and the prior's draws) | separate (Dec(z) and Dec(z_p) as two forwards, as
    Algorithm 1 writes them: each normalised on its own). separate cured mnist32's stalls
    (codes drifting off N(0, I) parted x~ from x_p); on synthetic faces it weakened the
    attribute edits (docs/results.md#separate-decoder-batch-norm), so joint stays the default."""
    augment: str = ""
    """Differentiable augmentation of everything Dis sees, real and generated alike
    (DiffAugment; vaegan.augment): translation, cutout, color, joined by ',' or '+' (in a
    sweep: --grid "loss.augment='',translation+cutout"); empty: none.
    For small data sets, where Dis otherwise memorises the real images."""
    adversarial_warmup: int = 0
    """Steps over which the adversarial term's weight in Dec's gradient ramps from 0 to 1
    (mode=vaegan): Dis trains from the start, Dec first learns from L_llike alone. 0: none."""
    attribute_weight: float = 0.0
    """Weight of an auxiliary attribute loss in Dis's objective (AC-GAN, Odena et al. 2017):
    a head on Dis's hidden FC predicts the labelled attributes of the real images (BCE), so
    Dis's layers, Dis_l included, learn to tell them apart and L_llike then charges the
    decoder for losing them. Needs shards with attributes; the labels reach Dis only (Enc,
    Dec and the latent space are trained as before). mode=vae has no Dis and ignores it.
    With loss.augment the head sees the augmented real images under their own labels (a
    recoloured or cut-out face keeps its Black_Hair or Eyeglasses). 0: off (the paper)."""
    attribute_llike: float = 0.0
    """Weight of an attribute term in L_llike (needs loss.attribute_weight > 0): the BCE of
    Dis's attribute head on x~ against its reading of x (sigmoid, a constant target), so the
    reconstruction error also counts an attribute the head sees in x and not in x~ (Enc
    descends it, Dec gamma times it, as the rest of L_llike). Labels still train Dis only.
    0: off (the paper)."""

    @property
    def augment_policy(self) -> tuple[str, ...]:
        """loss.augment's names; ',' or '+' between them (a sweep's grid splits values at ',')."""
        return tuple(p.strip() for p in self.augment.replace("+", ",").split(",") if p.strip())

    def validate(self) -> None:
        _choice("loss", "mode", self.mode, MODES)
        for policy in self.augment_policy:
            _choice("loss", "augment", policy, AUGMENTATIONS)
        _check(self.adversarial_warmup >= 0, "loss.adversarial_warmup", self.adversarial_warmup,
               "a number of steps >= 0 (0: none)")
        _choice("loss", "recipe", self.recipe, ("paper", "reference"))
        _choice("loss", "generator", self.generator, ("minimax", "nonsaturating"))
        _choice("loss", "decoder_bn", self.decoder_bn, ("joint", "separate"))
        _check(self.gamma >= 0 and math.isfinite(self.gamma), "loss.gamma", self.gamma,
               "a finite number >= 0")
        _check(self.kl_weight > 0 and math.isfinite(self.kl_weight), "loss.kl_weight", self.kl_weight,
               "a finite number > 0 (1: the paper)")
        _check(self.attribute_weight >= 0 and math.isfinite(self.attribute_weight),
               "loss.attribute_weight", self.attribute_weight, "a finite number >= 0 (0: off)")
        _check(self.attribute_llike >= 0 and math.isfinite(self.attribute_llike),
               "loss.attribute_llike", self.attribute_llike, "a finite number >= 0 (0: off)")
        _check(not (self.attribute_llike and not self.attribute_weight), "loss.attribute_llike",
               self.attribute_llike, "0 unless loss.attribute_weight > 0 trains the attribute head "
               "it reads")
        _check(0 <= self.w <= 1, "loss.w", self.w, "a number in [0, 1]")
        _check(self.equilibrium_margin >= 0, "loss.equilibrium_margin",
               self.equilibrium_margin, "a number >= 0")

    @property
    def use_equilibrium(self) -> bool:
        return self.equilibrium or self.recipe == "reference"


@dataclass
class OptimConfig:
    name: str = "rmsprop"
    """rmsprop (the paper) | adam."""
    lr: float = 3e-4
    """Learning rate for all three networks (paper: 3e-4)."""
    alpha: float = 0.9
    """RMSProp smoothing constant (the authors' decay 0.9)."""
    betas: tuple[float, float] = (0.5, 0.999)
    """Adam betas (DCGAN practice)."""
    eps: float = 1e-8
    weight_decay: float = 0.0
    """L2 weight decay (authors' code: 1e-5)."""
    lr_final: float = 0.0
    """If > 0, the lr is annealed geometrically from `lr` to `lr_final` over train.steps."""

    def validate(self) -> None:
        _choice("optim", "name", self.name, ("rmsprop", "adam"))
        _check(self.lr > 0, "optim.lr", self.lr, "a number > 0")
        _check(0 <= self.alpha < 1, "optim.alpha", self.alpha, "a number in [0, 1)")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
               self.betas, "two numbers in [0, 1)")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "a number >= 0")
        _check(self.lr_final >= 0, "optim.lr_final", self.lr_final, "a number >= 0")


@dataclass
class DataConfig:
    shards: str = ""
    """URL or folder of the WebDataset shards (local path or s3://bucket/prefix), written by
    `vaegan data prepare`. Empty: the preset's bundled data, prepared on first use."""
    source: str = "mnist5k"
    """What `make demo` and an empty `shards` prepare: mnist5k | synthetic-faces[:N] | ..."""
    batch_size: int = 64
    """Per-worker mini-batch size (paper: 64)."""
    shuffle_buffer: int = 1000
    """Samples held in the shuffle buffer of each loader."""
    flip: bool = True
    """Random horizontal flips (the authors' CelebA recipe). Off for digits."""
    loader_workers: int = 1
    """DataLoader worker processes per training worker."""
    decode_cache_mb: float = 256.0
    """MiB of decoded images each loader worker keeps for later epochs (uint8; 0: none).
    Epochs read from it skip the shard reads, tar parsing and decoding; a worker reads every
    part of the split over the epochs, so it pays off when the split fits (mnist5k: 4.6 MB,
    CelebA at 64x64: 2 GB). Counts toward each loader process's memory."""
    max_corrupt_fraction: float = 0.01
    """Stop the run once more than this fraction of samples read was corrupt."""
    s3_endpoint: str = ""
    """S3 endpoint URL; empty: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL from the environment."""
    io_retry_seconds: float = 180.0
    """How long a shard read or a checkpoint upload waits out an unreachable or failing S3
    endpoint (connection refused/reset, timeouts, 5xx), retrying with backoff from 0.5 s to
    10 s, before the run fails naming the file and the endpoint. Corrupt data is not retried."""

    def validate(self) -> None:
        _check(self.batch_size >= 2, "data.batch_size", self.batch_size,
               "an integer >= 2 (batch norm needs two samples)")
        _check(self.shuffle_buffer >= 0, "data.shuffle_buffer", self.shuffle_buffer,
               "an integer >= 0")
        _check(self.loader_workers >= 0, "data.loader_workers", self.loader_workers,
               "an integer >= 0")
        _check(self.decode_cache_mb >= 0, "data.decode_cache_mb", self.decode_cache_mb,
               "a number of MiB >= 0 (0: no cache)")
        _check(0 <= self.max_corrupt_fraction <= 1, "data.max_corrupt_fraction",
               self.max_corrupt_fraction, "a number in [0, 1]")
        _check(self.io_retry_seconds >= 0, "data.io_retry_seconds", self.io_retry_seconds,
               "a number of seconds >= 0 (0: fail at the first transport error)")


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps (each updates Enc, Dec and Dis once)."""
    minutes: float = 0.0
    """A wall-clock budget: the run ends at the first step after this many minutes of its
    training loop (summed over restarts), with the final checkpoint, evaluation and
    registration there, as at train.steps. 0: none. For comparing models on equal time, and
    for runs that must end in time; an lr anneal then follows whichever of train.steps and
    train.minutes runs out first."""
    num_workers: int = 2
    """Ray Train workers (DDP ranks)."""
    use_gpu: bool = False
    """One GPU per worker; nccl backend."""
    cpus_per_worker: float = 1.0
    """Logical CPUs each worker asks Ray for (fractions let a sweep fit on 2 cores)."""
    sync_bn: bool = False
    """Batch norm over the global batch of all ranks (torch's SyncBatchNorm on GPUs,
    vaegan.distributed.GlobalBatchNorm on CPUs): N workers then compute what one would."""
    precision: str = "auto"
    """auto | bf16 (autocast) | fp32. auto = bf16 on GPUs and on CPUs with native bf16
    (AVX512-BF16 or AMX: ~2x faster), fp32 elsewhere (bf16 is emulated there, ~100x slower)."""
    channels_last: bool = True
    """NHWC memory layout (faster convolutions on CPU)."""
    compile: bool = False
    """Run the step's gradient computation under torch.compile (CPU and CUDA; one worker
    only). The first step compiles (minutes on CPU); see docs/results.md for when it pays."""
    ema: float = 0.0
    """Decay of an exponential moving average of the encoder's and decoder's weights, with a
    ramp-up (vaegan.ema); the averaged networks make the image grids, the evaluation and the
    registered model. 0: off (the live weights are served)."""
    seed: int = 0
    storage_path: str = ""
    """Where checkpoints go: a folder or s3://bucket/prefix. Empty: ./runs (absolute). On a
    cluster of several nodes a folder is refused unless `shared_storage` (S3 always works)."""
    shared_storage: bool = False
    """storage_path is a folder every Ray node mounts (NFS, ...); checked by a probe file."""
    name: str = "vaegan"
    """The run name; a run started again with the same name resumes."""
    log_every: int = 10
    """Report metrics every N steps."""
    checkpoint_every: int = 200
    """Write a checkpoint every K steps (and at the end)."""
    keep_checkpoints: int = 2
    """Keep the last M checkpoints."""
    image_every: int = 200
    """Log sample and reconstruction grids every E steps."""
    eval_every: int = 0
    """Validation evaluation (FID of samples and reconstructions, ...) every V steps on rank 0,
    reported with the metrics as eval_* (0: off)."""
    eval_images: int = 500
    """Held-out images (and prior samples) per periodic evaluation."""
    eval_featurizer: str = ""
    """Featurizer directory for FID (`vaegan eval train-featurizer`); empty: one is trained on
    the shards' labels on first use and cached under ./data/featurizers."""
    max_failures: int = 1
    """Ray Train restarts of a failed worker group."""
    max_rollbacks: int = 3
    """Divergences survived: a non-finite loss (on any rank) rolls every rank back to the
    last complete checkpoint with the lr multiplied by `rollback_lr_factor`; one more stops
    the run with an error. 0: stop at the first."""
    rollback_lr_factor: float = 0.5
    """What each rollback multiplies the learning rate by (in (0, 1])."""
    lease_ttl_s: float = 120.0
    """A run holds a lease on its name in its storage folder, renewed every third of this;
    a run with the same name is refused while the lease is fresher than this, and takes it
    over once it is older (its owner died)."""

    def validate(self) -> None:
        _check(self.steps >= 1, "train.steps", self.steps, "an integer >= 1")
        _check(self.minutes >= 0 and math.isfinite(self.minutes), "train.minutes", self.minutes,
               "a number of minutes >= 0 (0: no time budget)")
        _check(self.num_workers >= 1, "train.num_workers", self.num_workers, "an integer >= 1")
        _check(self.cpus_per_worker > 0, "train.cpus_per_worker", self.cpus_per_worker,
               "a number > 0")
        _choice("train", "precision", self.precision, ("auto", "bf16", "fp32"))
        for key in ("log_every", "checkpoint_every", "image_every", "keep_checkpoints"):
            value = getattr(self, key)
            _check(value >= 1, f"train.{key}", value, "an integer >= 1")
        _check(self.eval_every >= 0, "train.eval_every", self.eval_every, "an integer >= 0")
        _check(self.eval_images >= 2, "train.eval_images", self.eval_images, "an integer >= 2")
        _check(self.max_failures >= 0, "train.max_failures", self.max_failures,
               "an integer >= 0")
        _check(self.max_rollbacks >= 0, "train.max_rollbacks", self.max_rollbacks, "an integer >= 0")
        _check(0 < self.rollback_lr_factor <= 1, "train.rollback_lr_factor", self.rollback_lr_factor,
               "a number in (0, 1]")
        _check(0 <= self.ema < 1, "train.ema", self.ema, "a decay in [0, 1) (0: off), e.g. 0.999")
        _check(self.lease_ttl_s >= 3, "train.lease_ttl_s", self.lease_ttl_s, "a number of seconds >= 3")
        _check(bool(self.name) and "/" not in self.name, "train.name", self.name,
               "a non-empty name without '/'")


COMPARE_METRIC = "eval_fid_samples"
"""The metric models and trials are compared by unless told otherwise (lower is better): what
`vaegan models promote` checks and what a sweep optimises."""


@dataclass
class TrackingConfig:
    tracking_uri: str = ""
    """MLflow tracking URI; empty: $MLFLOW_TRACKING_URI, else SQLite under ./mlruns."""
    experiment: str = "vaegan"
    model_name: str = "vaegan"
    """Registered model name in the MLflow Model Registry."""
    log_checkpoints: bool = False
    """Also log every checkpoint as an MLflow model (`checkpoint-NNNNNNN`), never pruned: ~200 MB
    each at celeba64. Off: MLflow keeps the final model and the best one (`best_metric`);
    checkpoints stay in the run's storage, the last `train.keep_checkpoints` of them."""
    best_metric: str = COMPARE_METRIC
    """The run keeps its best checkpoint by this metric as the MLflow model `best` (tagged
    vaegan.best / vaegan.best_value); a better later one replaces it, and the one replaced is
    deleted from MLflow (model and artifacts) unless registered. A checkpoint competes when
    the metric was reported at its step (eval_* metrics: train.eval_every, at the checkpoint
    steps and at the end). Empty: no best model. When the final checkpoint is the best, the
    final model `model` is tagged as it, not logged twice."""
    best_mode: str = "min"
    """min | max: whether a lower or a higher `best_metric` is better (min for FIDs)."""
    outage_grace_seconds: float = 600.0
    """At the end of training, how long rank 0 waits for an unreachable MLflow server to come
    back to send what it kept and to log and register the final model. During training it
    never waits: metrics and images are kept (images on disk) and sent when it is back."""
    start_wait_seconds: float = 30.0
    """How long the driver retries an unreachable MLflow server before failing at start."""
    request_timeout_seconds: int = 30
    """Timeout of one MLflow HTTP request from rank 0 (MLflow's own retries are turned off
    there: the background sender retries with backoff instead)."""
    max_pending_metrics: int = 200_000
    """Metric values kept in memory while MLflow is unreachable; beyond it new ones are
    dropped and reported as lost at the end."""
    max_spool_mb: int = 2048
    """Disk space for images and checkpoint models kept while MLflow is unreachable; beyond
    it new ones are dropped and reported as lost (checkpoints stay in storage)."""

    def validate(self) -> None:
        _check(bool(self.experiment), "tracking.experiment", self.experiment, "non-empty")
        _check(bool(self.model_name), "tracking.model_name", self.model_name, "non-empty")
        _choice("tracking", "best_mode", self.best_mode, ("min", "max"))
        _check(self.outage_grace_seconds >= 0, "tracking.outage_grace_seconds",
               self.outage_grace_seconds, ">= 0")
        _check(self.start_wait_seconds >= 0, "tracking.start_wait_seconds", self.start_wait_seconds,
               ">= 0")
        _check(self.request_timeout_seconds >= 1, "tracking.request_timeout_seconds",
               self.request_timeout_seconds, ">= 1")
        _check(self.max_pending_metrics >= 1, "tracking.max_pending_metrics",
               self.max_pending_metrics, ">= 1")
        _check(self.max_spool_mb >= 0, "tracking.max_spool_mb", self.max_spool_mb, ">= 0")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> Config:
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """{'model.image_size': 64, ...}: MLflow params, `config show`, overrides."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}

    def to_yaml(self) -> str:
        import yaml

        d = self.to_dict()
        d["optim"]["betas"] = list(d["optim"]["betas"])
        return yaml.safe_dump(d, sort_keys=False)

    def redacted(self) -> Config:
        """A copy to write, log or print: every string field through `redact_text`, so no
        credential in a URI reaches MLflow params, a checkpoint's or a registered model's
        config.yaml, or the console. Never the config in use (workers need the real URIs);
        nothing read back from a stored config needs them (resume takes the driver's config,
        a model only its `model` section)."""
        out = copy.deepcopy(self)
        for section in dataclasses.fields(out):
            sec = getattr(out, section.name)
            for f in dataclasses.fields(sec):
                value = getattr(sec, f.name)
                if isinstance(value, str):
                    setattr(sec, f.name, redact_text(value))
        return out


# ---------------------------------------------------------------------------------------
# Secrets. URIs may carry credentials: userinfo (https://user:token@host for MLflow, an S3
# endpoint with key:secret@), or a query (presigned URLs: X-Amz-Signature, X-Amz-Credential,
# X-Amz-Security-Token, sig, token, ...). Whatever is written, logged or printed goes through
# these first; the values in use stay as they are.

REDACTED = "***"
SAFE_QUERY_KEYS = frozenset({"endpoint_override", "scheme", "region", "host", "port", "sslmode",
                             "x-amz-algorithm", "x-amz-date", "x-amz-expires",
                             "x-amz-signedheaders", "versionid"})
"""Query parameters known to hold no secret, kept as they are; every other value is redacted
(safe by default: a query parameter nobody listed may well be a token)."""
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
              "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_CLIENT_CERT_PATH",
              "DATABRICKS_TOKEN", "AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_CONNECTION_STRING",
              "GOOGLE_APPLICATION_CREDENTIALS")
"""Credential variables whose values `redact_text` also blanks wherever they show up (an
error message of a client, say); values shorter than 8 characters are too likely to be
ordinary words to replace."""
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")


def redact_url(url: str) -> str:
    """`scheme://user:secret@host/path?token=t&scheme=http` ->
    `scheme://***@host/path?token=***&scheme=http`: userinfo and every query value not in
    SAFE_QUERY_KEYS replaced; anything else (and a string that is no URL) unchanged."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:  # not parseable as a URL: blank it rather than guess
        return REDACTED
    if not parts.scheme or (not parts.netloc and not parts.query):
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rpartition('@')[2]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, redact_url(v) if k.lower() in SAFE_QUERY_KEYS else REDACTED)
                           for k, v in pairs], safe="*:/")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Every URL in `text` through `redact_url`, and the values of the SECRET_ENV variables
    that are set (8 characters or more) replaced by ***."""
    import os

    def one(m: re.Match) -> str:  # punctuation after a URL in a sentence is not part of it
        url = m.group(0)
        core = url.rstrip(".,;:)]}")
        return redact_url(core) + url[len(core):]

    text = _URL.sub(one, text)
    for name in SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 8:
            text = text.replace(value, REDACTED)
    return text


# ---------------------------------------------------------------------------------------
# Presets: plain functions, so a preset is read (and diffed) like code.


def celeba64() -> Config:
    """The paper's settings: CelebA 64x64 RGB, Table 1 networks, RMSProp 3e-4, batch 64."""
    return Config(
        model=ModelConfig(image_size=64, channels=3, latent_dim=128),
        data=DataConfig(source="synthetic-faces", flip=True),
        train=TrainConfig(steps=62_500, name="celeba64"),
        tracking=TrackingConfig(model_name="vaegan-celeba64"),
    )


def celeba64_reference() -> Config:
    """The authors' code (andersbll/autoencoding_beyond_pixels), see docs/method.md#reference-recipe."""
    cfg = celeba64()
    cfg.model.enc_fc = 1024
    cfg.loss = LossConfig(recipe="reference", w=1e-6, equilibrium=True)
    cfg.optim = OptimConfig(name="rmsprop", lr=0.025 / 64, alpha=0.9, weight_decay=1e-5,
                            lr_final=1e-7)
    cfg.train.name = "celeba64-reference"
    return cfg


def mnist32() -> Config:
    """1-channel 32x32 digits (mnist5k): what `make demo` trains, sized to give recognisable
    digits in a few minutes on 2 CPU cores. Departures from the paper's defaults, each chosen
    by measurement (docs/results.md): quarter-width nets, a 16-d latent, Adam (betas 0.5,
    0.999) annealed from 5e-4 to 5e-5, the non-saturating decoder objective, gamma 5e-5, the
    authors' equilibrium rule, the decoder's batch norm separate for z and z_p, batch 32 per
    worker; and a 10-component mixture over the
    latent codes to sample from (model.latent_mixture), one per digit."""
    return Config(
        model=ModelConfig(image_size=32, channels=1, latent_dim=16, width=0.25, enc_fc=256,
                          dis_fc=128, latent_mixture=10),
        loss=LossConfig(gamma=5e-5, generator="nonsaturating", equilibrium=True, decoder_bn="separate"),
        optim=OptimConfig(name="adam", lr=5e-4, lr_final=5e-5),
        data=DataConfig(source="mnist5k", flip=False, batch_size=32),
        train=TrainConfig(steps=3000, name="mnist32", log_every=100, checkpoint_every=1000,
                          image_every=500),
        tracking=TrackingConfig(model_name="vaegan-mnist32"),
    )


def debug() -> Config:
    """Tiny everything: a step in a few milliseconds on CPU. The smoke-test preset."""
    return Config(
        model=ModelConfig(image_size=32, channels=1, latent_dim=8, width=0.125, enc_fc=64,
                          dis_fc=32),
        data=DataConfig(source="mnist5k", flip=False, batch_size=8, shuffle_buffer=64),
        train=TrainConfig(steps=20, name="debug", log_every=5, checkpoint_every=10,
                          image_every=10, cpus_per_worker=0.5),
        tracking=TrackingConfig(model_name="vaegan-debug"),
    )


PRESETS = {
    "debug": debug,
    "mnist32": mnist32,
    "celeba64": celeba64,
    "celeba64-reference": celeba64_reference,
}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()


# ---------------------------------------------------------------------------------------
# Overrides: YAML files and key=value arguments, typed against the dataclasses.


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert a YAML-parsed value to the field's type, or say what the key takes."""
    hint = typing.get_origin(annotation) or annotation
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} is not allowed; it must be true or false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r} is not allowed; it must be an integer")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} is not allowed; it must be a number")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} is not allowed; it must be a string")
    if hint is tuple:
        args = typing.get_args(annotation)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(key, v, a) for v, a in zip(value, args, strict=True))
        raise ConfigError(f"{key}={value!r} is not allowed; it must be a list of {len(args)}")
    raise ConfigError(f"{key}: unsupported type {annotation}")  # pragma: no cover


def _section_types(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Set dotted keys ('loss.gamma': 0.1) on cfg; unknown keys are rejected by name."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section not in sections or not name:
            raise ConfigError(
                f"unknown config key {key!r}; keys look like SECTION.NAME with SECTION one of: "
                f"{', '.join(sections)}")
        obj = getattr(cfg, section)
        types_ = _section_types(type(obj))
        if name not in types_:
            raise ConfigError(
                f"unknown config key {key!r}; {section} has: {', '.join(types_)}")
        setattr(obj, name, _coerce(key, value, types_[name]))
    return cfg


def parse_kv(items: list[str]) -> dict[str, Any]:
    """['loss.gamma=0.1', 'train.name=x'] -> {'loss.gamma': 0.1, 'train.name': 'x'} (YAML values)."""
    import yaml

    out = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. loss.gamma=0.1)")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
    return out


def _flatten_yaml(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ConfigError(f"config file: {prefix or 'top level'} must be a mapping")
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten_yaml(v, key + "."))
        else:
            out[key] = v
    return out


def load_config(preset_name: str = "debug", yaml_path: str | Path | None = None,
                overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """preset -> YAML file -> key=value overrides, then validate. The single way in."""
    import yaml

    cfg = preset(preset_name)
    if yaml_path:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        apply_overrides(cfg, _flatten_yaml(yaml.safe_load(path.read_text()) or {}))
    if overrides:
        kv = parse_kv(overrides) if isinstance(overrides, list) else overrides
        apply_overrides(cfg, kv)
    return cfg.validate()


def config_from_dict(d: dict[str, Any]) -> Config:
    """Inverse of `Config.to_dict` (checkpoints and registered models store that dict)."""
    return apply_overrides(Config(), _flatten_yaml(d)).validate()


__all__ = [
    "Config", "ConfigError", "DataConfig", "LossConfig", "ModelConfig", "OptimConfig",
    "TrackingConfig", "TrainConfig", "PRESETS", "preset", "load_config", "config_from_dict",
    "apply_overrides", "parse_kv", "redact_text", "redact_url",
]
