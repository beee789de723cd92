"""A checkpoint is a plain directory; Ray only wraps it, so resume works with or without Ray.

    model.pt      the VAEGAN state_dict (three networks and their BN buffers)
    trainer.pt    the three optimizer states and the step count, torch RNG state
    state.json    step, data position (epoch, batch), MLflow run id, vaegan version
    config.yaml   the resolved config

Everything loads with `torch.load(weights_only=True)`: no pickle is executed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vaegan.artifact import STATE, folder_files, load_net, save_model_folder
from vaegan.config import Config
from vaegan.model import VAEGAN

TRAINER = "trainer.pt"  # beside the model folder's files (vaegan.artifact)


@dataclass
class TrainState:
    """Where training is: enough to continue at exactly this step."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    """Batches of `epoch` already consumed on every rank."""
    mlflow_run_id: str = ""
    version: str = ""


def save_checkpoint(path: str | Path, model: VAEGAN, cfg: Config, state: TrainState,
                    trainer_state: dict | None = None) -> Path:
    """Write the directory at `path` atomically (a temp sibling, then a rename)."""
    from vaegan import __version__

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_folder(tmp, model, cfg)
    if trainer_state is not None:
        torch.save({**trainer_state, "torch_rng": torch.get_rng_state()}, tmp / TRAINER)
    state.version = __version__
    (tmp / STATE).write_text(json.dumps(asdict(state), indent=2))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"
                    ) -> tuple[VAEGAN, Config, TrainState]:
    """-> (model in eval mode, its config, its train state)."""
    model, cfg = load_net(folder_files(path), map_location)
    return model, cfg, read_state(path)


def read_state(path: str | Path) -> TrainState:
    return TrainState(**json.loads((Path(path) / STATE).read_text()))


def load_trainer_state(path: str | Path) -> dict | None:
    """The optimizer states and step count, and restores the torch RNG state as a side effect."""
    file = Path(path) / TRAINER
    if not file.is_file():
        return None
    state = torch.load(file, map_location="cpu", weights_only=True)
    torch.set_rng_state(state.pop("torch_rng"))
    return state
