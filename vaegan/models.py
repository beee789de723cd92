"""Using a trained VAE/GAN: load it from the MLflow registry (or a folder) and call it.

    from vaegan import load_model

    m = load_model("models:/vaegan-celeba64@champion")   # or models:/NAME/3, models:/NAME/latest,
                                                         # runs:/RUN_ID/model, a checkpoint folder
    mu, log_var = m.encode(images)                       # images: see `as_image_batch`
    x = m.decode(mu)                                     # (B, C, H, W) in [-1, 1]
    x = m.sample(16, seed=0)
    x = m.reconstruct(images)                            # Dec(mu(x))
    x = m.interpolate(image_a, image_b, steps=8)         # Dec of the line mu(a) -> mu(b)
    m.attribute_vectors["Eyeglasses"]                    # (latent_dim,)
    x = m.edit(images, {"Eyeglasses": 1.0, "Smiling": -1.0})

Attribute vectors are the paper's (section 5.2 / PAPER.md): for each labelled attribute, the
mean z of images with it minus the mean z of images without it, z = mu(x) of the first
ATTRIBUTE_IMAGES training images (the authors used 10,000). `edit` adds sum_a s_a * v_a to
mu(x) and decodes: +1 adds an attribute, -1 removes it. `measure_edits` scores edits with an
attribute classifier (`vaegan.featurizer`): does the target attribute flip, do the others
stay put.

Bad input raises `ModelError` (a ValueError) saying what the model takes. No MLflow here
except where a URI has to be resolved (`vaegan.registry`, imported lazily).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from vaegan.config import Config
from vaegan.model import VAEGAN

ATTRIBUTE_IMAGES = 10_000  # the authors' count: vectors from the first 10,000 training images
ATTRIBUTES_FILE = "attributes.json"
ATTRIBUTES_FORMAT = "vaegan-attributes/1"
RANGE_SLACK = 1e-3  # float images may exceed [-1, 1] by rounding error, not more

# What the image arguments accept (see `as_image_batch`).
ImagesLike = Union[torch.Tensor, np.ndarray, "PIL.Image.Image", str, os.PathLike, list, tuple]  # noqa: F821


class ModelError(ValueError):
    """Bad input to a model (shape, channels, values, attribute, URI); the message says what
    the model takes."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ModelError(f"device={device!r} is not allowed; use auto, cpu or cuda[:i]") from None


# ---------------------------------------------------------------------------------------
# Images in every form a user has them -> (B, C, S, S) float32 in [-1, 1].


def _takes(channels: int, size: int) -> str:
    kind = {1: "grey", 3: "RGB"}.get(channels, f"{channels}-channel")
    return f"this model takes {kind} {size}x{size} images ({channels}x{size}x{size})"


def _open_image(item: Any, channels: int):
    """A path or PIL image -> a uint8 HWC array in the model's mode (L or RGB): a file's own
    mode (palette, RGBA, grey) is a storage detail, so it is converted, not refused."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            raise ModelError(f"image file {str(path)!r} does not exist")
        try:
            with Image.open(path) as img:
                img.load()
                item = img.copy()
        except (UnidentifiedImageError, OSError) as e:
            raise ModelError(f"{str(path)!r} is not a readable image ({e})") from None
    arr = np.asarray(item.convert("L" if channels == 1 else "RGB"))
    return arr if arr.ndim == 3 else arr[:, :, None]


def _is_image_object(item: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return isinstance(item, (str, os.PathLike))
    return isinstance(item, (str, os.PathLike, Image.Image))


def _to_tensor(arr: Any) -> torch.Tensor:
    """A tensor or array of one image or a batch -> (B, ?, ?, ?) float tensor, pixels scaled
    from 0..255 when the dtype is uint8."""
    if isinstance(arr, np.ndarray):
        if arr.dtype == object:
            raise ModelError("images must be a regular numeric array; got a ragged (object) array")
        arr = torch.from_numpy(np.ascontiguousarray(arr) if arr.flags.writeable else arr.copy())
    elif not isinstance(arr, torch.Tensor):
        try:
            arr = torch.as_tensor(np.asarray(arr, dtype=np.float32))
        except (ValueError, TypeError) as e:
            raise ModelError(f"images of type {type(arr).__name__} are not allowed ({e}); pass tensors, "
                             "numpy arrays, PIL images or file paths") from None
    x = arr.detach().cpu()
    if x.dtype == torch.uint8:
        x = x.float() / 127.5 - 1.0  # 0..255 -> [-1, 1], as the data reader scales them
    elif x.dtype.is_floating_point:
        x = x.float()
    else:
        raise ModelError(f"images of dtype {x.dtype} are not allowed; pass uint8 (0..255) or float "
                         "values in [-1, 1]")
    if x.ndim == 2:
        x = x[None]  # (H, W): one grey image
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ModelError(f"images must be (C, H, W), (H, W, C) or a batch of them; got shape "
                         f"{tuple(arr.shape)}")
    return x


def _channels_first(x: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """(B, C, H, W) or (B, H, W, C) -> (B, C, H, W), or a ModelError naming what is wrong."""
    a, b, c = x.shape[1:]
    if a == channels and b == c:
        layout = "chw"
    elif c == channels and a == b:
        layout = "hwc"
    elif a in (1, 3, 4) and c not in (1, 3, 4):
        layout = "chw"
    elif c in (1, 3, 4):
        layout = "hwc"
    else:
        raise ModelError(f"images must be C x H x W or H x W x C; got shape {tuple(x.shape[1:])}; "
                         f"{_takes(channels, size)}")
    if layout == "hwc":
        x = x.permute(0, 3, 1, 2)
    got_c, got_h, got_w = x.shape[1:]
    if got_c != channels:
        raise ModelError(f"images have {got_c} channel(s); {_takes(channels, size)}")
    if (got_h, got_w) != (size, size):
        raise ModelError(f"images are {got_h}x{got_w}; {_takes(channels, size)} (resize them first)")
    return x


def check_values(x: torch.Tensor, what: str = "image values") -> None:
    if not bool(torch.isfinite(x).all()):
        raise ModelError(f"{what} contain NaN or infinite numbers")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1 - RANGE_SLACK or hi > 1 + RANGE_SLACK:
        raise ModelError(f"{what} must be in [-1, 1]; got min {lo:.4g}, max {hi:.4g} (pass uint8 arrays "
                         "for 0..255 pixels, or scale them with x / 127.5 - 1)")


def as_image_batch(images: ImagesLike, channels: int, size: int) -> torch.Tensor:
    """Anything image-like -> (B, channels, size, size) float32 in [-1, 1] on the CPU.

    Accepted: float tensors/arrays in [-1, 1] and uint8 arrays/tensors (0..255), each one image
    or a batch, channels first (C, H, W) or last (H, W, C); PIL images and image file paths
    (converted to the model's grey/RGB mode); or a list of any of these. Wrong sizes, channel
    counts, NaN and out-of-range values raise ModelError.
    """
    if isinstance(images, (list, tuple)) and images and all(
            _is_image_object(i) or isinstance(i, (np.ndarray, torch.Tensor)) for i in images):
        parts = [as_image_batch(i, channels, size) for i in images]
        return torch.cat(parts)
    if isinstance(images, (list, tuple)) and not images:
        raise ModelError("no images given")
    if _is_image_object(images):
        images = _open_image(images, channels)
    x = _channels_first(_to_tensor(images), channels, size)
    if x.shape[0] == 0:
        raise ModelError("no images given (a batch of 0)")
    check_values(x)
    return x.clamp(-1, 1).contiguous()


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

    @torch.no_grad()
    def sample(self, n: int, seed: int | None = None) -> torch.Tensor:
        """n images Dec(z_p), z_p ~ N(0, I). A seed gives the same images on any device (z_p is
        drawn on the CPU)."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ModelError(f"n={n!r} is not allowed; it must be an integer >= 1")
        gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        z = torch.randn(int(n), self.latent_dim, generator=gen)
        return self.net.decode(z.to(self.device))

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
        return {"format": ATTRIBUTES_FORMAT, "latent_dim": self.latent_dim, **self.attribute_meta,
                "vectors": {k: [float(f) for f in v.cpu()] for k, v in self._vectors.items()}}

    def save(self, path: str | Path) -> Path:
        """A checkpoint-style folder: model.pt (state_dict), config.yaml and, with vectors,
        attributes.json. `load_model(path)` reads it back."""
        from vaegan.checkpoint import CONFIG, MODEL

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in self.net.state_dict().items()}, path / MODEL)
        (path / CONFIG).write_text(self.cfg.to_yaml())
        if self._vectors:
            (path / ATTRIBUTES_FILE).write_text(json.dumps(self.attributes_json(), indent=1) + "\n")
        return path

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


# ---------------------------------------------------------------------------------------
# Loading.


def read_attributes(path: str | Path, latent_dim: int) -> tuple[dict[str, torch.Tensor], dict]:
    """attributes.json -> ({name: vector}, the rest of the file as metadata)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{str(path)!r} is not a readable attributes file ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != ATTRIBUTES_FORMAT:
        raise ModelError(f"{str(path)!r} is not a {ATTRIBUTES_FORMAT} file")
    if raw.get("latent_dim") != latent_dim:
        raise ModelError(f"{str(path)!r} holds vectors for latent_dim {raw.get('latent_dim')}; the model has "
                         f"{latent_dim}")
    vectors = {k: torch.tensor(v, dtype=torch.float32) for k, v in raw.pop("vectors", {}).items()}
    raw.pop("format")
    raw.pop("latent_dim")
    return vectors, raw


def _model_files(path: Path) -> dict[str, Path]:
    """The weights/config/attributes files of a checkpoint folder or an MLflow model folder."""
    from vaegan.checkpoint import CONFIG, MODEL

    if (path / MODEL).is_file() and (path / CONFIG).is_file():  # a checkpoint folder
        files = {"weights": path / MODEL, "config": path / CONFIG}
        if (path / ATTRIBUTES_FILE).is_file():
            files["attributes"] = path / ATTRIBUTES_FILE
        return files
    if (path / "MLmodel").is_file():  # a downloaded pyfunc model: its artifacts
        import yaml

        flavor = (yaml.safe_load((path / "MLmodel").read_text()) or {}).get("flavors", {}).get(
            "python_function", {})
        arts = {k: path / v["path"] for k, v in (flavor.get("artifacts") or {}).items()}
        if "checkpoint" in arts:  # models logged before the artifacts were split out
            return _model_files(arts["checkpoint"])
        if {"weights", "config"} <= arts.keys():
            return arts
        raise ModelError(f"{str(path)!r} is an MLflow model but not a vaegan model (no weights/config "
                         "artifacts)")
    raise ModelError(f"{str(path)!r} is neither a vaegan checkpoint folder (model.pt + config.yaml) nor an "
                     "MLflow model folder")


def load_model_files(files: Mapping[str, str | Path], device: str | torch.device = "cpu",
                     info: dict | None = None) -> VAEGANModel:
    """{"weights": model.pt, "config": config.yaml, "attributes"?: attributes.json} -> model.
    Weights load with torch.load(weights_only=True): no pickle runs."""
    import yaml

    from vaegan.config import ConfigError, config_from_dict

    try:
        cfg = config_from_dict(yaml.safe_load(Path(files["config"]).read_text()))
    except (OSError, yaml.YAMLError, ConfigError) as e:
        raise ModelError(f"cannot read the model's config {str(files['config'])!r}: {e}") from None
    net = VAEGAN(cfg.model)
    state = torch.load(files["weights"], map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    vectors, meta = {}, {}
    if files.get("attributes"):
        vectors, meta = read_attributes(files["attributes"], cfg.model.latent_dim)
    return VAEGANModel(net, cfg, vectors, meta, device=device, info=info)


def load_model(uri: str | os.PathLike, device: str | torch.device = "auto",
               tracking_uri: str | None = None) -> VAEGANModel:
    """A VAEGANModel from the registry or a folder.

    uri: models:/NAME@ALIAS | models:/NAME/VERSION | models:/NAME/latest | models:/m-<id> |
      runs:/RUN_ID/PATH | a local checkpoint folder (model.pt + config.yaml) or a downloaded
      MLflow model folder. Registry URIs use `tracking_uri`, else MLflow's current one
      ($MLFLOW_TRACKING_URI). Unknown names, aliases and versions raise ModelError naming them.
    device: auto (a GPU if there is one) | cpu | cuda[:i].
    """
    device = resolve_device(device)
    text = os.fspath(uri)
    if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+:/", text):  # no scheme: a local folder
        path = Path(text)
        if not path.exists():
            raise ModelError(f"{text!r} is neither a model URI (models:/..., runs:/...) nor an existing "
                             "folder")
        return load_model_files(_model_files(path), device, info={"uri": text})
    from vaegan.registry import download_model

    with tempfile.TemporaryDirectory(prefix="vaegan-model-") as tmp:
        local, info = download_model(text, tmp, tracking_uri=tracking_uri)
        return load_model_files(_model_files(local), device, info=info)


# ---------------------------------------------------------------------------------------
# Attribute vectors (the paper's method) and how well edits work.


@torch.no_grad()
def compute_attribute_vectors(model: VAEGANModel, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                              names: list[str], max_images: int = ATTRIBUTE_IMAGES
                              ) -> tuple[dict[str, torch.Tensor], dict]:
    """v_a = mean mu(x) over images with attribute a - mean mu(x) over images without it,
    from the first `max_images` images of `batches` ((images, attrs) with attrs (B, len(names)),
    1/0 or CelebA's 1/-1; > 0 means "has it").

    -> ({name: vector}, metadata with per-attribute counts). Attributes present in all or in
    none of the images have no vector; they are listed under "skipped".
    """
    A, L = len(names), model.latent_dim
    sum_with = torch.zeros(A, L, dtype=torch.float64)
    n_with = torch.zeros(A, dtype=torch.float64)
    sum_all = torch.zeros(L, dtype=torch.float64)
    n = 0
    for x, attrs in batches:
        take = min(len(x), max_images - n)
        if take <= 0:
            break
        mu, _ = model.encode(x[:take])
        mu = mu.double().cpu()
        has = (attrs[:take].reshape(take, A) > 0).double()  # (B, A)
        sum_with += has.T @ mu  # per attribute: the sum of mu over images that have it
        n_with += has.sum(0)
        sum_all += mu.sum(0)
        n += take
    if n == 0:
        raise ModelError("no images to compute attribute vectors from")
    vectors, counts, skipped = {}, {}, []
    for i, name in enumerate(names):
        k = int(n_with[i])
        counts[name] = {"with": k, "without": n - k}
        if k == 0 or k == n:
            skipped.append(name)
            continue
        mean_with = sum_with[i] / k
        mean_without = (sum_all - sum_with[i]) / (n - k)
        vectors[name] = (mean_with - mean_without).float()
    if not vectors:
        raise ModelError(f"no attribute has both images with and without it among the {n} images "
                         f"({', '.join(names)})")
    return vectors, {"n_images": n, "counts": counts, "skipped": skipped}


def attribute_vectors_from_shards(model: VAEGANModel, shards: str, max_images: int = ATTRIBUTE_IMAGES,
                                  split: str = "train", s3_endpoint: str = ""
                                  ) -> tuple[dict[str, torch.Tensor], dict]:
    """`compute_attribute_vectors` over the first `max_images` images of a shard split, in
    reader order (no shuffle, no flip), as the authors took the first 10,000."""
    from vaegan.data import make_loader, read_manifest
    from vaegan.featurizer import covering_batch_size

    manifest = read_manifest(shards, s3_endpoint)
    names = list(manifest["attributes"])
    if not names:
        raise ModelError(f"{shards!r} has no attributes in its manifest; attribute vectors need labelled "
                         "data")
    _check_data_fits(model, manifest, shards)
    n = manifest["splits"][split]["samples"]
    bs = covering_batch_size(n, min(n, max_images), 250)
    loader = make_loader(shards, batch_size=bs, split=split, with_attributes=True, shuffle_buffer=0,
                         flip=False, s3_endpoint=s3_endpoint)
    vectors, meta = compute_attribute_vectors(model, loader, names, max_images)
    return vectors, {**meta, "source": shards, "split": split, "method": "mean mu(with) - mean mu(without)"}


def _check_data_fits(model: VAEGANModel, manifest: dict, shards: str) -> None:
    if (manifest["channels"], manifest["image_size"]) != (model.channels, model.image_size):
        raise ModelError(f"{shards!r} holds {manifest['channels']}x{manifest['image_size']}x"
                         f"{manifest['image_size']} images; {_takes(model.channels, model.image_size)}")


def load_split(shards: str, n: int, split: str = "val", s3_endpoint: str = ""
               ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The first n (images, attrs) of a split in reader order, and the attribute names."""
    from vaegan.data import make_loader, read_manifest
    from vaegan.featurizer import covering_batch_size

    manifest = read_manifest(shards, s3_endpoint)
    total = manifest["splits"][split]["samples"]
    bs = covering_batch_size(total, min(total, n), 250)
    xs, ys, seen = [], [], 0
    for x, a in make_loader(shards, batch_size=bs, split=split, with_attributes=True, shuffle_buffer=0,
                            flip=False, s3_endpoint=s3_endpoint):
        xs.append(x[:n - seen])
        ys.append(a[:n - seen])
        seen += len(xs[-1])
        if seen >= n:
            break
    if not xs:
        raise ModelError(f"split {split!r} of {shards!r} has no images")
    return torch.cat(xs), torch.cat(ys), list(manifest["attributes"])


@dataclass
class EditReport:
    """How well attribute edits work, judged by an attribute classifier.

    Each image is edited towards the opposite of its label: +v_a when it lacks attribute a,
    -v_a when it has it (strength `strength`). Per attribute:
      flipped      share of edited images the classifier reads as having the target value
      unedited     the same share for the unedited reconstructions Dec(mu(x)): what no edit
                   at all would score (so `flipped` means something only well above it)
      others_kept  share of edited images whose other attributes all read as in Dec(mu(x))
      others_each  the same per (image, other attribute) pair: the share of other-attribute
                   readings an edit leaves alone
    """

    strength: float
    n_images: int
    flipped: dict[str, float] = field(default_factory=dict)
    unedited: dict[str, float] = field(default_factory=dict)
    others_kept: dict[str, float] = field(default_factory=dict)
    others_each: dict[str, float] = field(default_factory=dict)

    @property
    def mean_flipped(self) -> float:
        return float(np.mean(list(self.flipped.values())))

    @property
    def mean_unedited(self) -> float:
        return float(np.mean(list(self.unedited.values())))

    @property
    def mean_others_kept(self) -> float:
        return float(np.mean(list(self.others_kept.values())))

    @property
    def mean_others_each(self) -> float:
        return float(np.mean(list(self.others_each.values())))

    def as_metrics(self, prefix: str = "edit_") -> dict[str, float]:
        out = {f"{prefix}flipped": self.mean_flipped, f"{prefix}unedited": self.mean_unedited,
               f"{prefix}others_kept": self.mean_others_kept, f"{prefix}others_each": self.mean_others_each}
        for name in self.flipped:
            out[f"{prefix}flipped_{name}"] = self.flipped[name]
            out[f"{prefix}others_kept_{name}"] = self.others_kept[name]
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "mean_flipped": self.mean_flipped, "mean_unedited": self.mean_unedited,
                "mean_others_kept": self.mean_others_kept, "mean_others_each": self.mean_others_each}

    def format(self) -> str:
        lines = [f"attribute edits (strength {self.strength:g}, {self.n_images} held-out images):",
                 f"  {'attribute':<14} {'flipped':>8} {'unedited':>9} {'others kept':>12} "
                 f"{'others each':>12}"]
        for name in self.flipped:
            lines.append(f"  {name:<14} {self.flipped[name]:>8.3f} {self.unedited[name]:>9.3f} "
                         f"{self.others_kept[name]:>12.3f} {self.others_each[name]:>12.3f}")
        lines.append(f"  {'mean':<14} {self.mean_flipped:>8.3f} {self.mean_unedited:>9.3f} "
                     f"{self.mean_others_kept:>12.3f} {self.mean_others_each:>12.3f}")
        return "\n".join(lines)


@torch.no_grad()
def measure_edits(model: VAEGANModel, featurizer, images: torch.Tensor, attrs: torch.Tensor,
                  names: list[str], strength: float = 1.0, batch_size: int = 250) -> EditReport:
    """Score `model.edit` on labelled images (see EditReport) with a multi-label attribute
    classifier (`vaegan.featurizer.ClassifierFeaturizer`, kind multilabel) whose labels
    include the model's attribute names."""
    meta = getattr(featurizer, "meta", None)
    if meta is None or meta.kind != "multilabel":
        raise ModelError("edit success needs a multi-label attribute classifier; train one with "
                         "`vaegan eval train-featurizer --shards URL --label-key all --out DIR`")
    edited_names = [a for a in names if a in model.attribute_vectors]
    missing = [a for a in edited_names if a not in meta.labels]
    if not edited_names or missing:
        raise ModelError(f"the classifier knows {', '.join(meta.labels)}; it must cover the model's "
                         f"attributes {', '.join(edited_names) or '(none)'}")
    cols = [meta.labels.index(a) for a in edited_names]
    labels = attrs.reshape(len(attrs), len(names)) > 0

    def read(x: torch.Tensor) -> torch.Tensor:  # classifier's yes/no for each edited attribute
        return torch.cat([featurizer.probs(x[i:i + batch_size])[:, cols].cpu() > 0.5
                          for i in range(0, len(x), batch_size)])

    mus = torch.cat([model.encode(images[i:i + batch_size])[0] for i in range(0, len(images), batch_size)])
    recon_read = read(torch.cat([model.net.decode(mus[i:i + batch_size])
                                 for i in range(0, len(mus), batch_size)]))
    report = EditReport(strength=float(strength), n_images=len(images))
    for j, name in enumerate(edited_names):
        target = ~labels[:, names.index(name)]  # add it where absent, remove it where present
        sign = target.float().mul(2).sub(1).to(model.device)[:, None]  # +1 add, -1 remove
        z = mus + strength * sign * model.attribute_vectors[name]
        edit_read = read(torch.cat([model.net.decode(z[i:i + batch_size])
                                    for i in range(0, len(z), batch_size)]))
        others = [k for k in range(len(edited_names)) if k != j]
        report.flipped[name] = float((edit_read[:, j] == target).float().mean())
        report.unedited[name] = float((recon_read[:, j] == target).float().mean())
        same = edit_read[:, others] == recon_read[:, others]  # (B, n_others)
        report.others_kept[name] = float(same.all(1).float().mean()) if others else 1.0
        report.others_each[name] = float(same.float().mean()) if others else 1.0
    return report


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> Path:
    """Images (B, C, H, W) in [-1, 1] -> one PNG grid (torchvision make_grid), nrow per row."""
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(((images.detach().float().cpu() + 1) / 2).clamp(0, 1), nrow=max(1, nrow), padding=2,
                     pad_value=1.0)
    arr = (grid.mul(255).round().byte().permute(1, 2, 0).numpy())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(path, format="PNG")
    return path
