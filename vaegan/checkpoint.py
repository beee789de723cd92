"""A checkpoint is a plain directory; Ray only wraps it, so resume works with or without Ray.

    model.pt      the VAEGAN state_dict (three networks and their BN buffers); with
                  train.ema, the averaged encoder and decoder (what is served)
    trainer.pt    the three optimizer states and the step count, torch RNG state; with
                  train.ema, the live encoder and decoder too (LIVE)
    state.json    step, data position (epoch, batch), MLflow run id, vaegan version
    config.yaml   the resolved config
    manifest.json the size and sha256 of every file above, written last

A checkpoint is complete only when its manifest is there and every file matches it: a writer
killed mid-way (or an upload cut short) leaves a folder without one, or with a file that does
not match, and resume skips such a folder for the newest complete one (`check_complete`).
A checkpoint is never written with non-finite weights (`CheckpointError`).

Everything loads with `torch.load(weights_only=True)`: no pickle is executed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vaegan.artifact import STATE, WEIGHTS, folder_files, load_net, save_model_folder, save_tensors
from vaegan.config import Config
from vaegan.errors import UserError
from vaegan.model import VAEGAN

TRAINER = "trainer.pt"  # beside the model folder's files (vaegan.artifact)
MANIFEST = "manifest.json"
LIVE = "live_weights"  # in trainer.pt with train.ema: {"encoder", "decoder", "updates"}


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that must not be written (non-finite weights) or cannot be used."""


@dataclass
class TrainState:
    """Where training is: enough to continue at exactly this step."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    """Batches of `epoch` already consumed on every rank."""
    mlflow_run_id: str = ""
    version: str = ""
    rollbacks: int = 0
    """Divergences rolled back so far (train.max_rollbacks caps them)."""
    lr_scale: float = 1.0
    """The product of train.rollback_lr_factor over those rollbacks: optim.lr is multiplied
    by it, also after a restart."""
    trained_seconds: float = 0.0
    """Wall-clock seconds of the training loop up to `step`, over restarts (train.minutes)."""


UNFINISHED = ".tmp"
"""The suffix of a checkpoint folder being written (renamed without it when whole)."""


def scratch_dir(prefix: str) -> Path:
    """A new folder PREFIX<pid>-XXXX in the system's temp folder for this process, after
    removing those of the same prefix whose process is gone: a worker killed by SIGKILL (an OOM
    kill, a lost node's restart, Ray's) cleans nothing up, and at celeba64 a checkpoint's temp
    folder holds 580 MB, a spooled model 200 MB. The temp folder is this host's, so a process
    id names its owner."""
    parent = Path(tempfile.gettempdir())
    for old in parent.glob(f"{prefix}*-*"):
        pid = old.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        pass
    return True


def save_checkpoint(path: str | Path, model: VAEGAN, cfg: Config, state: TrainState,
                    trainer_state: dict | None = None,
                    model_written: Callable[[Path], None] | None = None) -> Path:
    """Write the directory at `path` atomically (a temp sibling, then a rename), its
    manifest last. Refuses (CheckpointError) weights that are not all finite.

    `model_written(folder)` is called once the files a registered model keeps (model.pt,
    config.yaml, state.json) are in the temp folder, before the optimizer states: what it
    starts with them (the final model's logging) goes on beside the rest of the write. Their
    hard links and open files survive the rename."""
    from vaegan import __version__

    bad = non_finite_tensors(model)
    if bad:
        raise CheckpointError(f"not writing the checkpoint of step {state.step}: non-finite values in "
                              f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    path = Path(path)
    tmp = path.with_name(path.name + UNFINISHED)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_model_folder(tmp, model, cfg)
        state.version = __version__
        (tmp / STATE).write_text(json.dumps(asdict(state), indent=2))
        if model_written is not None:
            model_written(tmp)
        if trainer_state is not None:
            save_tensors({**trainer_state, "torch_rng": torch.get_rng_state()}, tmp / TRAINER)
        write_manifest(tmp, state.step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves no half-written folder behind
        raise
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


def non_finite_tensors(model: VAEGAN) -> list[str]:
    """Names of the weights and buffers holding NaN or inf (empty: all finite)."""
    return [k for k, v in model.state_dict().items() if v.is_floating_point() and not _all_finite(v)]


def _all_finite(t: torch.Tensor) -> bool:
    # A NaN or inf anywhere makes the sum NaN or inf, so a finite sum settles it without a
    # mask as large as the tensor (20x faster: 0.15 s a checkpoint at celeba64); a sum that
    # overflowed from finite values is told apart by the exact check.
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _sha256(stream) -> str:
    h = hashlib.sha256()
    for block in iter(lambda: stream.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


def write_manifest(folder: str | Path, step: int) -> None:
    """manifest.json: size and sha256 of every other file in `folder`. Written last, so its
    presence says the writer got to the end."""
    folder = Path(folder)
    files = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name != MANIFEST:
            with open(f, "rb") as stream:
                files[f.name] = {"bytes": f.stat().st_size, "sha256": _sha256(stream)}
    (folder / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))


def check_complete(folder: str | Path, fs=None, *, sha256: bool = True) -> str:
    """"" when the checkpoint at `folder` is complete (its manifest is there and every file
    matches it), else what is wrong, in a few words. `fs`: the pyarrow filesystem `folder` is
    on (None: this machine's), read in place: an S3 checkpoint is not downloaded to be checked.
    sha256=False compares the sizes only, which one listing gives. An error reading the storage
    is raised, not taken for a torn checkpoint: an outage must not look like one."""
    from pyarrow.fs import FileSelector, FileType, LocalFileSystem

    fs, folder = fs or LocalFileSystem(), str(folder if fs else Path(folder).absolute())
    try:
        with fs.open_input_stream(f"{folder}/{MANIFEST}") as f:
            files = json.loads(f.read())["files"]
        listed = [(name, want["bytes"], want["sha256"]) for name, want in files.items()]
    except FileNotFoundError:
        return f"no {MANIFEST} (the writer stopped before the end)"
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"unreadable {MANIFEST} ({type(e).__name__})"
    for name in (STATE, WEIGHTS):
        if name not in files:
            return f"{MANIFEST} lists no {name}"
    sizes = {i.base_name: i.size for i in fs.get_file_info(FileSelector(folder)) if i.type == FileType.File}
    for name, size, digest in listed:
        if name not in sizes:
            return f"{name} is missing"
        if sizes[name] != size:
            return f"{name} has {sizes[name]} bytes, the manifest says {size}"
        if sha256:
            with fs.open_input_stream(f"{folder}/{name}") as f:
                if _sha256(f) != digest:
                    return f"{name} does not match its sha256 in the manifest"
    return ""


def fetch_complete(folder: str, fs, into: Path) -> str:
    """Copy the checkpoint at `folder` on the (remote) pyarrow filesystem `fs` into the local
    folder `into`, and check the copy: "" when it is complete (`into` then holds what is loaded,
    and the storage was read once), else what is wrong (`into` is then removed). A folder whose
    manifest or listing already tells it torn is not downloaded."""
    from pyarrow.fs import LocalFileSystem, copy_files

    try:
        problem = check_complete(folder, fs, sha256=False)
        if not problem:
            Path(into).mkdir(parents=True, exist_ok=True)  # copy_files makes no local folder
            copy_files(folder, str(Path(into).absolute()), source_filesystem=fs,
                       destination_filesystem=LocalFileSystem())
            problem = check_complete(into)
    except BaseException:  # a storage outage: no half copy left behind
        shutil.rmtree(into, ignore_errors=True)
        raise
    if problem:
        shutil.rmtree(into, ignore_errors=True)
    return problem
