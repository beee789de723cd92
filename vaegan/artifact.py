"""A model folder: the files a trained VAEGAN is made of, and how they are read and written.

    model.pt         the VAEGAN state_dict (read with torch.load(weights_only=True): no pickle runs)
    config.yaml      the resolved config
    state.json       training step, MLflow run id, vaegan version (checkpoints only)
    attributes.json  attribute vectors and their edit scores (`vaegan models attributes`)

A checkpoint (`vaegan.checkpoint`) is a model folder plus the optimizer states; a registered
MLflow model keeps these same files as its pyfunc artifacts, under the keys of
`ARTIFACT_KEYS`. No MLflow here: an MLflow model folder is read from its MLmodel file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
import yaml

from vaegan.config import Config, ConfigError, ModelConfig, config_from_dict
from vaegan.errors import UserError
from vaegan.model import VAEGAN

WEIGHTS, CONFIG, STATE, ATTRIBUTES = "model.pt", "config.yaml", "state.json", "attributes.json"
ARTIFACT_KEYS = {"weights": WEIGHTS, "config": CONFIG, "state": STATE, "attributes": ATTRIBUTES}
"""pyfunc artifact key -> file name; weights and config are required, the others optional."""
ATTRIBUTES_FORMAT = "vaegan-attributes/1"


class ModelError(UserError, ValueError):
    """Bad input to a model (shape, channels, values, attribute, URI); the message says what
    the model takes."""


def folder_files(path: str | Path) -> dict[str, Path]:
    """{artifact key: file} of a model or checkpoint folder (weights and config required)."""
    path = Path(path)
    files = {key: path / name for key, name in ARTIFACT_KEYS.items() if (path / name).is_file()}
    if not {"weights", "config"} <= files.keys():
        raise ModelError(f"{str(path)!r} is not a vaegan model folder (it needs {WEIGHTS} and {CONFIG})")
    return files


def model_files(path: str | Path) -> dict[str, Path]:
    """{artifact key: file} of a model folder, a checkpoint folder or a downloaded MLflow model."""
    path = Path(path)
    if (path / WEIGHTS).is_file() and (path / CONFIG).is_file():
        return folder_files(path)
    if (path / "MLmodel").is_file():  # a downloaded pyfunc model: its artifacts
        flavor = (yaml.safe_load((path / "MLmodel").read_text()) or {}).get("flavors", {}).get(
            "python_function", {})
        arts = {k: path / v["path"] for k, v in (flavor.get("artifacts") or {}).items()}
        if {"weights", "config"} <= arts.keys():
            return {k: v for k, v in arts.items() if k in ARTIFACT_KEYS}
        raise ModelError(f"{str(path)!r} is an MLflow model but not a vaegan model (no weights/config "
                         "artifacts)")
    raise ModelError(f"{str(path)!r} is neither a vaegan model folder ({WEIGHTS} + {CONFIG}) nor an "
                     "MLflow model folder")


def read_config(path: str | Path) -> Config:
    """A config.yaml (or a folder holding one) -> Config, or a ModelError naming the file."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG
    try:
        return config_from_dict(yaml.safe_load(path.read_text()))
    except (OSError, yaml.YAMLError, ConfigError) as e:
        raise ModelError(f"cannot read the model's config {str(path)!r}: {e}") from None


def load_net(files: Mapping[str, str | Path], map_location: str | torch.device = "cpu"
             ) -> tuple[VAEGAN, Config]:
    """{"weights", "config", ...} -> (the VAEGAN in eval mode on `map_location`, its config)."""
    cfg = read_config(files["config"])
    net = net_from_weights(cfg.model, torch.load(files["weights"], map_location="cpu", weights_only=True))
    return net.to(map_location).eval(), cfg


def net_from_weights(cfg: ModelConfig, weights: Mapping[str, torch.Tensor]) -> VAEGAN:
    """The VAEGAN of `cfg` holding `weights` (a strict load: every tensor, nothing else).
    Built on the meta device and given the loaded tensors themselves: no random
    initialisation to overwrite (0.4 s at celeba64) and no second copy in memory."""
    with torch.device("meta"):
        net = VAEGAN(cfg)
    net.load_state_dict(weights, assign=True)
    return net


def save_tensors(obj, file: Path) -> None:
    """torch.save without a CRC-32 of every record in the zip: nothing reads them back
    (torch.load does not check them), and they were a third of the time of writing a
    checkpoint (0.45 of 1.5 s at celeba64); a checkpoint's manifest holds each file's sha256."""
    from torch.utils.serialization import config

    with config.patch({"save.compute_crc32": False}):
        torch.save(obj, file)


def save_model_folder(path: str | Path, net: VAEGAN, cfg: Config, attributes: dict | None = None) -> Path:
    """Write model.pt and config.yaml (and attributes.json when given) into `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_tensors({k: v.detach().cpu() for k, v in net.state_dict().items()}, path / WEIGHTS)
    # Redacted: this file travels (checkpoint storage, registered models) and is read back
    # only for the model section; resume takes the driver's live config.
    (path / CONFIG).write_text(cfg.redacted().to_yaml())
    if attributes:
        (path / ATTRIBUTES).write_text(json.dumps(attributes, indent=1) + "\n")
    return path


def attributes_document(vectors: Mapping[str, torch.Tensor], meta: dict, latent_dim: int) -> dict:
    """What attributes.json holds: the vectors and whatever metadata came with them."""
    return {"format": ATTRIBUTES_FORMAT, "latent_dim": latent_dim, **meta,
            "vectors": {k: [float(f) for f in v.cpu()] for k, v in vectors.items()}}


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
