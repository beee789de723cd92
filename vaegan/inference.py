"""The model users hold: a trained VAEGAN in eval mode with input checks. No MLflow here.

    m = load_folder("runs/NAME/checkpoint_000003/step-0003000")   # or vaegan.load_model(URI)
    mu, log_var = m.encode(images)                       # images: see vaegan.images.as_image_batch
    x = m.decode(mu)                                     # (B, C, H, W) in [-1, 1]
    x = m.sample(16, seed=0)                             # latent="prior" for z_p ~ N(0, I)
    x = m.reconstruct(images)                            # Dec(mu(x))
    x = m.interpolate(image_a, image_b, steps=8)         # Dec of the line mu(a) -> mu(b)
    m.attribute_vectors["Eyeglasses"]                    # (latent_dim,), see vaegan.attributes
    x = m.edit(images, {"Eyeglasses": 1.0, "Smiling": -1.0})

Registry URIs (models:/NAME@ALIAS ...) are resolved by `vaegan.registry.load_model`, which
downloads the model folder and hands it to `load_files`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaegan.artifact import (
    ModelError,
    attributes_document,
    load_net,
    model_files,
    read_attributes,
    save_model_folder,
)
from vaegan.config import Config
from vaegan.images import ImagesLike, as_image_batch
from vaegan.model import VAEGAN


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ModelError(f"device={device!r} is not allowed; use auto, cpu or cuda[:i]") from None


# ---------------------------------------------------------------------------------------
# The model users hold.


class VAEGANModel:
    """A trained VAEGAN in eval mode, with input checks, plus its attribute vectors.

    All methods take and return torch tensors on `self.device`; images out are (B, C, H, W)
    in [-1, 1]. Inference only: no gradients.
    """

    def __init__(self, net: VAEGAN, cfg: Config, attribute_vectors: Mapping[str, torch.Tensor] | None = None,
                 attribute_meta: dict | None = None, device: str | torch.device = "cpu",
                 info: dict | None = None):
        self.device = resolve_device(device)
        self.net = net.to(self.device).eval()
        self.cfg = cfg
        L = cfg.model.latent_dim
        self._vectors: dict[str, torch.Tensor] = {}
        for name, v in (attribute_vectors or {}).items():
            v = torch.as_tensor(v, dtype=torch.float32).flatten()
            if v.numel() != L:
                raise ModelError(f"attribute vector {name!r} has {v.numel()} values; the latent has {L}")
            self._vectors[name] = v.to(self.device)
        self.attribute_meta = dict(attribute_meta or {})
        self.info = dict(info or {})
        """Where the model came from: uri, and for registry models name, version, run_id."""

    # -- what it takes -------------------------------------------------------------------

    @property
    def channels(self) -> int:
        return self.cfg.model.channels

    @property
    def image_size(self) -> int:
        return self.cfg.model.image_size

    @property
    def latent_dim(self) -> int:
        return self.cfg.model.latent_dim

    @property
    def attribute_vectors(self) -> dict[str, torch.Tensor]:
        """{attribute name: (latent_dim,) vector}; empty until `vaegan models attributes` ran."""
        return dict(self._vectors)

    def to(self, device: str | torch.device) -> VAEGANModel:
        self.device = resolve_device(device)
        self.net.to(self.device)
        self._vectors = {k: v.to(self.device) for k, v in self._vectors.items()}
        return self

    def images(self, images: ImagesLike) -> torch.Tensor:
        """Any accepted image form -> a checked (B, C, H, W) batch on the model's device."""
        return as_image_batch(images, self.channels, self.image_size).to(self.device)

    def latents(self, z: torch.Tensor | np.ndarray | list) -> torch.Tensor:
        z = _to_latent(z)
        if z.ndim == 1:
            z = z[None]
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ModelError(f"z must have shape (B, {self.latent_dim}) for this model; got {tuple(z.shape)}")
        if not bool(torch.isfinite(z).all()):
            raise ModelError("z contains NaN or infinite numbers")
        return z.to(self.device)

    # -- the networks --------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, images: ImagesLike) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (mu, log_var), each (B, latent_dim): the posterior q(z|x) = N(mu, exp(log_var))."""
        return self.net.encode(self.images(images))

    @torch.no_grad()
    def decode(self, z: torch.Tensor | np.ndarray) -> torch.Tensor:
        """z (B, latent_dim) -> images (B, C, H, W) in [-1, 1]."""
        return self.net.decode(self.latents(z))

    @property
    def latents_available(self) -> tuple[str, ...]:
        """Where sample() can draw z_p from: "prior", and "mixture" for a model trained with
        model.latent_mixture (vaegan.latent)."""
        return ("prior", "mixture") if self.net.has_mixture else ("prior",)

    @torch.no_grad()
    def sample(self, n: int, seed: int | None = None, latent: str = "auto") -> torch.Tensor:
        """n images Dec(z_p), z_p ~ N(0, I) (latent="prior", the paper) or from the latent
        mixture fitted to the encoder's codes (latent="mixture"); "auto": the mixture when the
        model has one. A seed gives the same images on any device (z_p is drawn on the CPU)."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ModelError(f"n={n!r} is not allowed; it must be an integer >= 1")
        gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        try:
            return self.net.sample(int(n), gen, latent=latent)
        except ValueError as e:  # a latent it does not have
            raise ModelError(str(e)) from None

    @torch.no_grad()
    def reconstruct(self, images: ImagesLike) -> torch.Tensor:
        """Dec(mu(x)): the posterior mean decoded (deterministic)."""
        return self.net.reconstruct(self.images(images))

    @torch.no_grad()
    def interpolate(self, a: ImagesLike, b: ImagesLike, steps: int = 8) -> torch.Tensor:
        """Decode `steps` evenly spaced points of the line mu(a) -> mu(b), ends included:
        (steps, C, H, W). a and b are one image each."""
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 2:
            raise ModelError(f"steps={steps!r} is not allowed; it must be an integer >= 2")
        xa, xb = self.images(a), self.images(b)
        if len(xa) != 1 or len(xb) != 1:
            raise ModelError(f"interpolate takes one image for a and one for b; got {len(xa)} and {len(xb)}")
        mu, _ = self.net.encode(torch.cat([xa, xb]))
        t = torch.linspace(0, 1, int(steps), device=self.device)[:, None]
        return self.net.decode((1 - t) * mu[:1] + t * mu[1:])

    def attribute_offset(self, attributes: Mapping[str, float]) -> torch.Tensor:
        """sum_a s_a * v_a for {name: s_a}, a (latent_dim,) vector."""
        if not isinstance(attributes, Mapping) or not attributes:
            raise ModelError("attributes must be a non-empty mapping like {'Eyeglasses': 1.0}")
        if not self._vectors:
            raise ModelError("this model has no attribute vectors; compute them with "
                             "`vaegan models attributes URI --shards URL` (a new model version)")
        offset = torch.zeros(self.latent_dim, device=self.device)
        for name, s in attributes.items():
            if name not in self._vectors:
                raise ModelError(f"unknown attribute {name!r}; this model knows: {', '.join(self._vectors)}")
            if isinstance(s, bool) or not isinstance(s, (int, float, np.number)) or not math.isfinite(s):
                raise ModelError(f"attribute {name!r}: strength {s!r} is not allowed; it must be a finite "
                                 "number (+1 adds the attribute, -1 removes it)")
            offset += float(s) * self._vectors[name]
        return offset

    @torch.no_grad()
    def edit(self, images: ImagesLike, attributes: Mapping[str, float]) -> torch.Tensor:
        """Dec(mu(x) + sum_a s_a * v_a): {"Eyeglasses": 1.0} adds glasses, -1.0 removes them."""
        offset = self.attribute_offset(attributes)
        mu, _ = self.net.encode(self.images(images))
        return self.net.decode(mu + offset)

    # -- on disk -------------------------------------------------------------------------

    def attributes_json(self) -> dict:
        return attributes_document(self._vectors, self.attribute_meta, self.latent_dim)

    def save(self, path: str | Path) -> Path:
        """A model folder (vaegan.artifact): model.pt, config.yaml and, with vectors,
        attributes.json. `load_folder(path)` reads it back."""
        return save_model_folder(path, self.net, self.cfg, self.attributes_json() if self._vectors else None)

    def __repr__(self) -> str:
        m = self.cfg.model
        where = self.info.get("uri", "")
        return (f"VAEGANModel({where!r}, {m.channels}x{m.image_size}x{m.image_size}, latent {m.latent_dim}, "
                f"attributes {list(self._vectors)}, device {self.device})")


def _to_latent(z: Any) -> torch.Tensor:
    if isinstance(z, torch.Tensor):
        t = z.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(z, dtype=np.float32))
        except (ValueError, TypeError) as e:
            raise ModelError(f"z must be a (B, latent_dim) array of numbers ({e})") from None
    if not t.dtype.is_floating_point:
        t = t.float()
    return t.float()


def load_files(files: Mapping[str, str | Path], device: str | torch.device = "cpu",
               info: dict | None = None) -> VAEGANModel:
    """{"weights": model.pt, "config": config.yaml, "attributes"?: attributes.json} -> model.
    Weights load with torch.load(weights_only=True): no pickle runs."""
    net, cfg = load_net(files)
    vectors, meta = {}, {}
    if files.get("attributes"):
        vectors, meta = read_attributes(files["attributes"], cfg.model.latent_dim)
    return VAEGANModel(net, cfg, vectors, meta, device=device, info=info)


def load_folder(path: str | Path, device: str | torch.device = "auto") -> VAEGANModel:
    """A model folder, a checkpoint folder or a downloaded MLflow model folder -> the model."""
    return load_files(model_files(path), resolve_device(device), info={"uri": str(path)})
