"""Training on Ray: the per-worker loop (data -> step -> report/checkpoint) and the driver.

    fit(cfg)                    driver: checks inputs, finds/creates the MLflow run, starts a
                                TorchTrainer whose workers run `train_loop_per_worker`
    train_loop_per_worker(..)   one DDP rank: its shard partition, Algorithm 1, metrics,
                                images and checkpoints (rank 0 tracks and writes)

A run is named (`train.name`); starting a run with the name of an earlier one resumes it
from its newest complete checkpoint at exactly that step, in the same MLflow run, and a
name that is running is refused (a lease, `cluster.RunLease`). Faults survived: a worker
killed (Ray restarts the group; steps redone are not logged twice, the final model is
registered once), a non-finite loss on any rank (every rank rolls back in place with a
lower learning rate, up to train.max_rollbacks), a torn checkpoint or Ray index (skipped,
set aside). docs/operations.md#failure-modes lists them.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from vaegan.artifact import WEIGHTS
from vaegan.checkpoint import (
    LIVE,
    MANIFEST,
    UNFINISHED,
    TrainState,
    check_complete,
    fetch_complete,
    load_trainer_state,
    non_finite_tensors,
    read_state,
    save_checkpoint,
    scratch_dir,
)
from vaegan.config import Config, ConfigError, config_from_dict, redact_text
from vaegan.ema import EMA
from vaegan.errors import UserError
from vaegan.images import grid_image
from vaegan.losses import StepMetrics
from vaegan.model import VAEGAN
from vaegan.step import NonFiniteLossError, resolve_precision, set_cuda_backends
from vaegan.tracking import STEP_TAG

if TYPE_CHECKING:
    from vaegan.cluster import Storage

# Fault injection for tests and drills: "STEP:MARKER_PATH" makes rank 0 fail once, right
# after finishing STEP, unless MARKER_PATH exists (it is created when the fault fires).
FAULT_ENV = "VAEGAN_FAULT_AT_STEP"
# "RANK:STEP:MARKER[,RANK:STEP:MARKER...]": that rank's worker process SIGKILLs itself once,
# right after step STEP's report (so after its checkpoint, and at the last step before the
# final model is registered).
KILL_ENV = "VAEGAN_FAULT_KILL"
# "RANK:STEP:MARKER[,...]": that rank trains step STEP on an all-NaN batch, once (divergence).
NAN_ENV = "VAEGAN_FAULT_NAN"
RAY_INDEX = "checkpoint_manager_snapshot.json"  # Ray Train's list of a run's checkpoints
NODE_TAG = "vaegan.node"  # MLflow run tags vaegan.node.rankR: the Ray node each rank ran on


class TrainError(UserError, RuntimeError):
    """Training cannot start or go on; the message says why and what to change."""


@dataclass
class FitResult:
    run_name: str
    mlflow_run_id: str
    tracking_uri: str
    model_uri: str
    storage: str
    step: int


# ---------------------------------------------------------------------------------------
# The worker loop


def say(message: str) -> None:
    """One line to the driver's console from inside a Ray Train worker.

    Not `print`: Ray Train V2 patches the worker's print to go through its logger, and when
    another library has wrapped sys.stdout it also prints the line directly, so every line
    reached the console twice. Writing to the stream shows it once."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def quiet_ray_train_reports() -> None:
    """Ray Train V2 logs each `ray.train.report` of every rank at INFO with its whole metrics
    dict (two long lines per report here); the progress line already says what matters."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # a Ray without that module: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)  # its logger's name


def noise_seed(seed: int, rank: int, step: int, rollbacks: int = 0) -> int:
    """The step's noise depends only on (seed, rank, step): a resumed run draws exactly the
    noise the uninterrupted run would have, with no generator state to save. A rollback
    changes it, so the retried steps draw other noise."""
    return (seed * 1_000_003 + rank) * 1_000_033 + step + rollbacks * 998_244_353


@torch.no_grad()
def image_grids(model: VAEGAN, fixed_z: torch.Tensor, real: torch.Tensor):
    """A sample grid from a fixed noise batch (comparable across steps), and a
    reconstruction grid with each real image next to its reconstruction."""
    was_training = model.training
    model.eval()
    samples = model.decode(fixed_z)
    recon = model.reconstruct(real)
    model.train(was_training)
    pairs = torch.stack([real.to(recon.dtype), recon], dim=1).flatten(0, 1)
    return grid_image(samples, 8), grid_image(pairs, 8)


@dataclass
class Worker:
    """What one rank holds for the whole run."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    memory_format: torch.memory_format
    model: VAEGAN
    step: Any  # vaegan.step.TrainStep over the (DDP-wrapped) networks
    state: TrainState
    logger: Any  # MlflowLogger on rank 0, NullLogger elsewhere
    fixed_z: torch.Tensor | None = None  # rank 0: what the sample grid shows, fixed for the run
    real: torch.Tensor | None = None  # rank 0: the held-out images the reconstruction grid shows
    evaluator: _Evaluator | None = None
    guard: _FiniteGuard | None = None
    initial_trainer: dict | None = None  # the optimizers before step 1: a rollback with no checkpoint
    base_lr: tuple[float, float] = (0.0, 0.0)  # optim.lr, optim.lr_final before any rollback
    logged_through: int = 0  # rank 0: steps whose metrics are in MLflow already (a restart redoes some)
    tracking_uri: str = ""
    kills: list = field(default_factory=list)  # fault drills for this rank: (step, marker)
    nans: list = field(default_factory=list)
    ema: EMA | None = None  # rank 0 with train.ema: the averaged encoder and decoder
    fit_images: torch.Tensor | None = None  # rank 0 with model.latent_mixture: what it is fitted to
    unrecorded: _UnrecordedCheckpoints = field(  # rank 0: folders Ray does not hold
        default_factory=lambda: _UnrecordedCheckpoints())  # defined below

    @property
    def served(self) -> VAEGAN:
        """What the grids, the evaluation and the checkpoints show: the averaged networks
        with train.ema, else the live ones."""
        return self.ema.served_with(self.model.discriminator) if self.ema is not None else self.model


def train_loop_per_worker(config: dict) -> None:
    """One DDP rank. `config` carries the resolved Config and the driver's resolutions."""
    w = set_up(config)
    announce(w)
    if w.state.step >= w.cfg.train.steps:  # resumed from the final checkpoint
        # A crash between the final checkpoint and the registration: report it again (every
        # rank: a report is a barrier), which registers the model unless this run did already.
        _report_checkpoint(w, None, True, config.get("register", True), again=True)
    loop(w, config)
    w.logger.end()


def set_up(config: dict) -> Worker:
    """The model (resumed from the newest complete checkpoint, if any, with the learning rate
    of its rollbacks), its DDP wrappers, the step and its divergence guard, the tracker, and
    on rank 0 what the image grids and the evaluation look at."""
    import ray.train
    import ray.train.torch

    from vaegan import distributed
    from vaegan.allocator import keep_freed_memory
    from vaegan.cluster import keep_normal_priority, node_id
    from vaegan.step import TrainStep
    from vaegan.threads import raise_this_thread
    from vaegan.tracking import MlflowLogger, NullLogger

    cfg = config_from_dict(config["cfg"])
    quiet_ray_train_reports()
    keep_freed_memory()  # no page faults for each step's buffers (vaegan.allocator)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    distributed.leave_group_if_alone()
    if not keep_normal_priority():
        say(f"[vaegan] warning: rank {rank} runs at idle CPU priority and may not leave it; "
            "set VAEGAN_IDLE_RAY=0 for this driver")
    niceness = raise_this_thread()  # before the step's first parallel op starts its OpenMP team
    device = ray.train.torch.get_device()
    set_cuda_backends(device, resolve_precision(cfg.train.precision, device))
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = VAEGAN(cfg.model).to(device, memory_format=memory_format)
    state, trainer_state = TrainState(mlflow_run_id=config["mlflow_run_id"]), None
    ema = EMA(model, cfg.train.ema) if cfg.train.ema and rank == 0 else None
    start = newest_complete_checkpoint(rank)
    found, skipped = start.found, start.skipped
    if found:
        state, trainer_state = load_checkpoint_into(model, device, start, ema)
        if out_of_time(cfg.train, state):  # the budget ran out at the final checkpoint
            cfg.train.steps = state.step
    base_lr = (cfg.optim.lr, cfg.optim.lr_final)
    cfg.optim.lr, cfg.optim.lr_final = (lr * state.lr_scale for lr in base_lr)  # earlier rollbacks
    nets = distributed.wrap(model, device, cfg.train.sync_bn)
    guard = _FiniteGuard(model, device, distributed.exchange(nets))
    step = TrainStep(*nets, cfg, device, mean_across_ranks=guard.mean_across_ranks)
    initial_trainer = copy.deepcopy(step.state_dict())
    if trainer_state:
        step.load_state_dict(trainer_state)
    nodes = distributed.gather(node_id())  # every rank takes part; rank 0 records them
    logger = NullLogger()
    if rank == 0:
        logger = MlflowLogger(config["tracking_uri"], state.mlflow_run_id, cfg.tracking.log_checkpoints,
                              tracking=cfg.tracking, say=say)
        logger.set_tags({**{f"{NODE_TAG}.rank{r}": n for r, n in enumerate(nodes)},
                         "vaegan.step_niceness": str(niceness)})
        if found or skipped:
            logger.set_tags({"vaegan.resumed_from": f"step {state.step} ({Path(found).name})" if found
                             else "step 0 (no complete checkpoint)",
                             "vaegan.skipped_checkpoints": "; ".join(skipped) or "(none)"})
    w = Worker(cfg, rank, world, device, memory_format, model, step, state, logger, guard=guard,
               initial_trainer=initial_trainer, base_lr=base_lr, tracking_uri=config["tracking_uri"],
               kills=_faults(config.get("faults", {}).get(KILL_ENV, ""), rank),
               nans=_faults(config.get("faults", {}).get(NAN_ENV, ""), rank), ema=ema,
               unrecorded=_UnrecordedCheckpoints(start))
    if rank == 0:
        w.logged_through = _last_logged_step(w.tracking_uri, state.mlflow_run_id)
        from vaegan.data import read_split

        held_out = read_split(cfg.data.shards, max(16, cfg.train.eval_images),
                              s3_endpoint=cfg.data.s3_endpoint, io_retry_seconds=cfg.data.io_retry_seconds)
        fixed_z = torch.randn(64, cfg.model.latent_dim, generator=torch.Generator().manual_seed(1234))
        w.fixed_z = fixed_z.to(device)
        w.real = held_out[:16].to(device)
        if cfg.model.latent_mixture and cfg.loss.mode != "gan":  # a GAN's encoder is never trained
            # 2-3 s of imports: here, not at the first fit, where every rank waits for rank 0
            import sklearn.mixture  # noqa: F401

            from vaegan.latent import FIT_IMAGES

            w.fit_images = read_split(cfg.data.shards, FIT_IMAGES, "train", s3_endpoint=cfg.data.s3_endpoint,
                                      io_retry_seconds=cfg.data.io_retry_seconds)
        if cfg.train.eval_every:
            w.evaluator = _Evaluator(held_out, config["featurizer"], cfg.train.eval_images, device,
                                     reconstructs=cfg.loss.mode != "gan")
    return w


class Checkpoints(NamedTuple):
    """What `newest_complete_checkpoint` found in the run's storage as a run (re)started."""
    found: str | None  # the newest complete checkpoint folder (None: none)
    skipped: list[str]  # the newer incomplete ones, each with what is wrong
    folders: list[str]  # rank 0: every checkpoint folder, newest first ([] elsewhere)
    fs: Any = None  # rank 0: the storage's pyarrow filesystem
    local: str | None = None  # rank 0: a folder on this machine holding `found`, as checked


def newest_complete_checkpoint(rank: int) -> Checkpoints:
    """This run's checkpoints in its storage (`Checkpoints`). Rank 0 looks, with a warning line
    per skipped folder; every rank gets `found` and `skipped` (all must load the same one).

    Not Ray's `get_checkpoint()`: that is the last one reported, complete or not (a torn
    model.pt crash-looped every restart), and None when Ray's index was set aside.

    In a remote storage (S3) rank 0 checks a download, which it then loads (`local`): the
    storage is read once, and what is loaded is what was checked."""
    import pyarrow.fs

    from vaegan import distributed

    found, skipped, folders, fs, local = None, [], [], None, None
    if rank == 0:
        fs, folders = _checkpoint_folders()
        remote = not isinstance(fs, pyarrow.fs.LocalFileSystem)
        for path in folders:
            if remote:
                loaded = scratch_dir("vaegan-resume-")
                problem = fetch_complete(path, fs, loaded)
            else:  # a folder storage: checked and loaded in place
                loaded, problem = path, check_complete(path, fs)
            if not problem:
                found, local = path, str(loaded)
                break
            skipped.append(f"{Path(path).name}: {problem}")
            say(f"[vaegan] warning: skipping incomplete checkpoint {path}: {problem}")
    return Checkpoints(*distributed.gather((found, skipped))[0], folders, fs, local)


def _checkpoint_folders() -> tuple[Any, list[str]]:
    """(the storage filesystem, this run's checkpoint folders newest first): Ray names them
    checkpoint_<timestamp>, so the names sort in time. Called as a run (re)starts, when no
    checkpoint is being written: unfinished ones left by a killed writer are removed."""
    import pyarrow.fs
    import ray.train

    storage = ray.train.get_context().get_storage()
    fs = storage.storage_filesystem
    infos = fs.get_file_info(pyarrow.fs.FileSelector(storage.experiment_fs_path, allow_not_found=True))
    names = [i.path for i in infos
             if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_")]
    for torn in [n for n in names if n.endswith(UNFINISHED)]:
        # a checkpoint written in place whose writer died before its rename: never reported
        say(f"[vaegan] removing the unfinished checkpoint {torn}")
        try:
            fs.delete_dir(torn)
        except OSError as e:  # an NFS leftover, say: it is skipped all the same
            say(f"[vaegan] warning: could not remove {torn}: {e}")
    return fs, sorted((n for n in names if not n.endswith(UNFINISHED)), reverse=True)


class _UnrecordedCheckpoints:
    """Rank 0: the run's checkpoint folders found at the start that Ray's index does not hold.
    Ray deletes the checkpoints it recorded beyond train.keep_checkpoints, never a folder it
    did not record: one written in place by a rank 0 killed before Ray's controller took its
    report, an S3 upload cut short, all of them after the index was set aside. Each such folder
    is deleted as Ray would have, once keep_checkpoints complete ones are newer."""

    def __init__(self, start: Checkpoints | None = None):
        """`start`: what rank 0 found as the run (re)started (None: nothing to look after)."""
        self.left: list[tuple[str, int]] = []  # (folder, complete ones newer at the start)
        self.written = 0  # checkpoints written since the start: complete, newer than all of those
        if start is None or not start.folders:
            return
        import ray.train

        folders, found, self.fs = start.folders, start.found, start.fs
        try:
            # Read before this start's first report: the call returns at once, and Ray's
            # retention has not yet deleted (and so dropped from the index) any folder.
            recorded = {PurePosixPath(c.checkpoint.path).name
                        for c in ray.train.get_all_reported_checkpoints(timeout_s=60)}
        except Exception as e:  # an alpha API: keep the folders rather than fail the run
            say(f"[vaegan] warning: could not read Ray's checkpoint index ({type(e).__name__}: {e}); "
                "checkpoints it may not hold are kept")
            return
        if all(PurePosixPath(path).name in recorded for path in folders):
            return
        newer, older_than_found = 0, False  # all torn where none was found
        for path in folders:
            if PurePosixPath(path).name not in recorded:
                self.left.append((path, newer))
            older_than_found = older_than_found or path == found
            if older_than_found and _has_manifest(self.fs, path):  # those newer than `found` are torn
                newer += 1

    def after_checkpoint(self, keep: int) -> None:
        """Called by rank 0 after each checkpoint's report."""
        self.written += 1
        due = [(path, newer) for path, newer in self.left if newer + self.written >= keep]
        self.left = [item for item in self.left if item not in due]
        for path, _ in due:
            say(f"[vaegan] removing the checkpoint {path}: Ray's index does not hold it, and "
                f"train.keep_checkpoints={keep} newer ones exist")
            try:
                self.fs.delete_dir(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                say(f"[vaegan] warning: could not remove {path}: {e}")


def _has_manifest(fs: Any, folder: str) -> bool:
    import pyarrow.fs

    return fs.get_file_info(f"{folder}/{MANIFEST}").type == pyarrow.fs.FileType.File


def load_checkpoint_into(model: VAEGAN, device: torch.device, start: Checkpoints,
                         ema: EMA | None = None) -> tuple[TrainState, dict | None]:
    """Weights into `model` (and the averages into `ema`) from the checkpoint `start.found`
    (in the run's storage; rank 0 from the copy it checked, removed once loaded); -> (its
    train state, its optimizer states)."""
    import ray.train

    def load(d: str) -> tuple[TrainState, dict | None]:
        model.load_weights(torch.load(Path(d) / WEIGHTS, map_location=device, weights_only=True))
        return read_state(d), load_trainer_state(d)

    if start.local:
        state, trainer_state = load(start.local)
        if start.local != start.found:
            shutil.rmtree(start.local, ignore_errors=True)
    else:
        fs = ray.train.get_context().get_storage().storage_filesystem
        with ray.train.Checkpoint(start.found, filesystem=fs).as_directory() as d:
            state, trainer_state = load(d)
    # With train.ema the model file holds the averaged encoder and decoder (what is served)
    # and the trainer state the live ones.
    live = (trainer_state or {}).pop(LIVE, None)
    if ema is not None:
        ema.reset(model, live["updates"] if live else 0)  # no live weights: EMA turned on now
    if live:
        model.encoder.load_state_dict(live["encoder"])
        model.decoder.load_state_dict(live["decoder"])
    return state, trainer_state


def _last_logged_step(uri: str, run_id: str) -> int:
    """The last step whose metrics the MLflow run holds: a restarted run redoes the steps
    since its checkpoint, and logs only those after this one."""
    import mlflow

    try:
        return max((m.step for m in mlflow.MlflowClient(uri).get_metric_history(run_id, "loss")), default=0)
    except Exception as e:  # MLflow away: training goes on; the redone steps may be logged twice
        say(f"[vaegan] warning: could not read the last logged step from MLflow ({type(e).__name__}); "
            "steps redone since the checkpoint may be logged twice")
        return 0


def announce(w: Worker) -> None:
    if w.rank != 0:
        return
    T, s = w.cfg.train, w.state
    if s.step == 0:
        budget = f" (or {T.minutes:g} minutes, if sooner)" if T.minutes else ""
        say(f"[vaegan] training {T.name}: {T.steps} steps{budget}, {w.world} worker(s) x batch "
            f"{w.cfg.data.batch_size}, precision {w.step.precision}, MLflow run {s.mlflow_run_id}")
    else:
        say(f"[vaegan] resuming {T.name} at step {s.step} (epoch {s.epoch}, batch {s.batch})")


def loop(w: Worker, config: dict) -> None:
    """Epochs of this rank's shard partition until train.steps; every rank does the same
    number of steps and reports (a report is a barrier, and DDP needs the same backwards).
    One loader streams all the epochs (its processes start once); a rollback starts another."""
    from vaegan.data import make_loader

    cfg, T = w.cfg, w.cfg.train
    loader_kw = dict(batch_size=cfg.data.batch_size, rank=w.rank, world_size=w.world,
                     loader_workers=cfg.data.loader_workers, shuffle_buffer=cfg.data.shuffle_buffer,
                     flip=cfg.data.flip, s3_endpoint=cfg.data.s3_endpoint,
                     max_corrupt_fraction=cfg.data.max_corrupt_fraction,
                     io_retry_seconds=cfg.data.io_retry_seconds, pin_memory=w.device.type == "cuda",
                     cache_mb=cfg.data.decode_cache_mb,
                     with_attributes=cfg.model.dis_attributes > 0)  # labels for Dis's attribute head
    progress = Progress(w.state.step, T.steps)
    clock = time.perf_counter()  # train.minutes counts the loop's wall-clock time
    if T.minutes:
        w.step.progress = run_progress(T, w.state)
        # this rank's seconds at the step's exchange, which averages them over the ranks
        w.guard.clock = lambda: w.state.trained_seconds + (time.perf_counter() - clock)
    while w.state.step < T.steps:
        state = w.state  # a rollback replaces it
        # After a rollback the data order and the noise change too, so the retried steps
        # do not walk into the same NaN (rollbacks=0: exactly the uninterrupted run's).
        loader = make_loader(cfg.data.shards, epoch=state.epoch, start_batch=state.batch, epochs=None,
                             seed=T.seed + 7919 * state.rollbacks, **loader_kw)
        progress.lap()
        for images in loader:
            progress.lap("data")  # waiting for the next batch
            images, attrs = images if isinstance(images, tuple) else (images, None)
            images = images.to(w.device, memory_format=w.memory_format, non_blocking=True)
            if _fires(w.nans, state.step + 1):  # fault drill
                images = torch.full_like(images, float("nan"))
            w.step.generator.manual_seed(noise_seed(T.seed, w.rank, state.step, state.rollbacks))
            try:
                progress.window.append(w.step(images, attrs=attrs))
                if (state.step + 1) % T.checkpoint_every == 0 or state.step + 1 >= T.steps:
                    w.guard.check_weights(w.model)  # a checkpoint never holds NaN
            except Divergence as e:  # raised on every rank at the same point
                roll_back(w, progress, e)
                break
            progress.lap("step")  # forward, backward, optimizer steps
            if w.world > 1:  # the gradient all-reduce, with the wait for the slowest rank
                progress.move("step", "allreduce", w.guard.take_exchange_seconds())
            if w.ema is not None:
                w.ema.update(w.model)
            state.step += 1
            state.batch += 1
            if state.batch == len(loader):  # the stream goes on into the next epoch
                state.epoch, state.batch = state.epoch + 1, 0
            if T.minutes:  # one clock for all ranks (their own differ a little), so they stop together
                state.trained_seconds, clock = w.guard.agreed_seconds, w.guard.exchanged_at
                w.step.progress = run_progress(T, state)  # the lr anneal's, identical on every rank
                if out_of_time(T, state):
                    T.steps = state.step  # this step is the last: final checkpoint, evaluation, registration
            else:
                state.trained_seconds += time.perf_counter() - clock
                clock = time.perf_counter()
            if w.rank == 0 and config.get("fault"):
                _maybe_fail(config["fault"], state.step)
            report(w, progress, loader, register=config.get("register", True))
            if state.step >= T.steps:
                break


def out_of_time(T, state: TrainState) -> bool:
    """train.minutes spent."""
    return bool(T.minutes) and state.trained_seconds >= T.minutes * 60


def run_progress(T, state: TrainState) -> float:
    """The share of the run done with a time budget: of train.steps or of train.minutes,
    whichever runs out first (what the lr anneal follows then)."""
    return min(1.0, max(state.step / T.steps, state.trained_seconds / (T.minutes * 60)))


class Divergence(NonFiniteLossError):
    """Non-finite values on some rank, raised on every rank at the same point of the same
    step, before any optimizer steps, so that all ranks roll back together."""


class _FiniteGuard:
    """Watches this rank's networks for non-finite outputs (forward hooks, in training mode)
    and folds the verdict into the one collective each step makes once its gradients are in
    (`exchange`: the step's scalars, and on CPUs the gradients): if any rank saw NaN or inf
    in a network's output or in a loss term, every rank raises Divergence there, before any
    weight is touched.

    With a time budget (train.minutes) the same collective also carries the ranks' clocks:
    `clock()` is read at the exchange, and `agreed_seconds` / `exchanged_at` are then the
    ranks' mean and this rank's time of it, so every rank sees the same clock without a
    second collective a step."""

    def __init__(self, model: VAEGAN, device: torch.device,
                 exchange: Callable[[torch.Tensor], torch.Tensor]):
        self.device, self.exchange = device, exchange
        self.bad = torch.zeros((), device=device)
        self.clock: Callable[[], float] | None = None
        self.agreed_seconds, self.exchanged_at = 0.0, 0.0
        self.exchange_seconds = 0.0  # in the collective, since `take_exchange_seconds`
        for net in (model.encoder, model.decoder, model.discriminator):
            net.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        if not module.training:  # image grids, evaluation: not the step
            return
        for out in output if isinstance(output, tuple | list) else (output,):
            if torch.is_tensor(out) and out.is_floating_point():  # no host sync here
                # A NaN or inf anywhere makes the sum non-finite: one reduction instead of a
                # mask as large as the output (Dis_l at celeba64: 0.09 against 3.6 ms). Only
                # outputs beyond 1e32 or so could sum to inf while finite, and those have
                # diverged: the losses they feed overflow too.
                self.bad = self.bad + ~torch.isfinite(out.detach().sum())

    def mean_across_ranks(self, scalars: torch.Tensor) -> torch.Tensor:
        # float32 like the gradients it travels with: a clock to 0.1 s over a week
        self.exchanged_at = time.perf_counter()
        seconds = torch.full((1,), self.clock() if self.clock else 0.0, device=scalars.device)
        both = torch.cat([scalars.float(), seconds, self.bad.reshape(1).to(scalars.device, torch.float32)])
        self.bad = torch.zeros((), device=self.device)
        # the step's one host sync (on GPUs it waits for the collective's end); every read
        # after it, the step's own included, is of this host copy
        both = self.exchange(both).cpu()
        finite = bool(torch.isfinite(both).all())
        self.exchange_seconds += time.perf_counter() - self.exchanged_at
        if not finite or both[-1] > 0:
            raise Divergence("non-finite values in a forward pass or a loss term")
        self.agreed_seconds = float(both[-2])
        return both[:-2].to(scalars.dtype)

    def take_exchange_seconds(self) -> float:
        """Seconds spent in the step's collective since the last call: on CPU ranks the
        gradients' all-reduce, the wait for the slowest rank included; on GPUs the wait for
        what DDP's all-reduce, overlapped with the backward pass, has left."""
        seconds, self.exchange_seconds = self.exchange_seconds, 0.0
        return seconds

    def check_weights(self, model: VAEGAN) -> None:
        from vaegan import distributed

        bad = torch.tensor([float(bool(non_finite_tensors(model)))], device=self.device)
        if distributed.total(bad).item() > 0:
            raise Divergence("non-finite weights before a checkpoint")


def roll_back(w: Worker, progress: Progress, err: Divergence) -> None:
    """Every rank: back to the newest complete checkpoint (or the initial weights), with the
    learning rate multiplied by train.rollback_lr_factor; recorded as the `rollbacks` and
    `lr` metrics and a `vaegan.rollback.N` tag. One more than train.max_rollbacks stops the
    run with a TrainError."""
    T, old = w.cfg.train, w.state
    at = old.step + 1
    if old.rollbacks >= T.max_rollbacks:
        raise TrainError(f"training diverged at step {at} ({err}) after {old.rollbacks} rollback(s), and "
                         f"train.max_rollbacks={T.max_rollbacks}: lower optim.lr (now {w.cfg.optim.lr:g}) or "
                         "loss.gamma, or allow more rollbacks")
    start = newest_complete_checkpoint(w.rank)
    if start.found:
        state, trainer_state = load_checkpoint_into(w.model, w.device, start, w.ema)
    else:  # diverged before the first checkpoint: start over from the initial weights
        torch.manual_seed(T.seed)
        w.model.load_state_dict(VAEGAN(w.cfg.model).state_dict())
        if w.ema is not None:
            w.ema.reset(w.model, 0)
        state, trainer_state = TrainState(mlflow_run_id=old.mlflow_run_id), w.initial_trainer
    state.rollbacks, state.lr_scale = old.rollbacks + 1, old.lr_scale * T.rollback_lr_factor
    w.cfg.optim.lr, w.cfg.optim.lr_final = (lr * state.lr_scale for lr in w.base_lr)
    w.step.load_state_dict(trainer_state)
    for opt in w.step.optimizers.values():
        for group in opt.param_groups:
            group["lr"] = w.cfg.optim.lr  # an annealed lr is set again from the config each step
    w.state = state
    progress.window, progress.t_window = [], time.time()
    w.guard.take_exchange_seconds()  # the diverged step's, whose time was charged to no phase
    note = (f"step {at} -> step {state.step}, lr x{T.rollback_lr_factor:g} = {w.cfg.optim.lr:g} ({err})")
    w.logger.log_metrics({"rollbacks": float(state.rollbacks), "lr": w.cfg.optim.lr}, at)
    w.logger.set_tags({f"vaegan.rollback.{state.rollbacks}": note})
    if w.rank == 0:
        say(f"[vaegan] rollback {state.rollbacks}/{T.max_rollbacks}: diverged at {note}")


@dataclass
class Progress:
    """The step breakdowns since the last report, the clock for the ETA, and where the time
    of the steps since the last report went (`lap`), reported as time_PHASE metrics."""

    start_step: int
    steps: int
    window: list = field(default_factory=list)
    t_window: float = field(default_factory=time.time)
    t_start: float = field(default_factory=time.time)
    phases: dict = field(default_factory=dict)
    t_lap: float = field(default_factory=time.perf_counter)

    def lap(self, phase: str | None = None) -> None:
        """Charge the time since the last lap to `phase` (None: to nothing, a restart)."""
        now = time.perf_counter()
        if phase:
            self.phases[phase] = self.phases.get(phase, 0.0) + now - self.t_lap
        self.t_lap = now

    def move(self, source: str, phase: str, seconds: float) -> None:
        """Charge `seconds` of what was charged to `source` to `phase` instead."""
        self.phases[source] -= seconds
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds

    def phase_metrics(self, steps: int) -> dict[str, float]:
        """{time_PHASE: seconds per step} over the last `steps` steps (this rank's clock);
        then the phases start again."""
        out = {f"time_{k}": v / max(steps, 1) for k, v in self.phases.items()}
        self.phases = {}
        return out


def report(w: Worker, progress: Progress, loader, register: bool) -> None:
    """What is due after this step: metrics (and evaluation), image grids, a checkpoint."""
    import ray.train

    from vaegan import distributed

    T, step = w.cfg.train, w.state.step
    last = step >= T.steps
    eval_due = T.eval_every and (step % T.eval_every == 0 or last)
    checkpoint_due = step % T.checkpoint_every == 0 or last
    fresh = step > w.logged_through  # a restart or a rollback redoes steps that MLflow holds
    metrics = None
    if w.fit_images is not None and (eval_due or checkpoint_due):
        from vaegan.latent import fit_mixture

        # what is evaluated and saved samples from a mixture fitted to its own encoder
        fit_mixture(w.served, w.fit_images, seed=T.seed)
        progress.lap("eval" if eval_due else "checkpoint")
    if step % T.log_every == 0 or last or eval_due:
        steps = len(progress.window)
        metrics = _window_metrics(progress.window, time.time() - progress.t_window, w.cfg.data.batch_size,
                                  loader, distributed)
        progress.lap("report")
        if w.evaluator and eval_due:  # rank 0 only; the others wait at the report below
            metrics.update(w.evaluator(w.served))
            progress.lap("eval")
        metrics.update(progress.phase_metrics(steps))
        progress.window, progress.t_window = [], time.time()
        if fresh:
            w.logger.log_metrics(metrics, step)
            w.logged_through = step
        if w.rank == 0:
            _print_progress(step, T.steps, metrics, progress.start_step, progress.t_start,
                            T.minutes * 60 - w.state.trained_seconds if T.minutes else math.inf)
        progress.lap("logging")
    if w.rank == 0 and (step % T.image_every == 0 or last) and fresh:
        samples, recons = image_grids(w.served, w.fixed_z, w.real)
        w.logger.log_image(samples, "samples", step)
        w.logger.log_image(recons, "reconstructions", step)
        progress.lap("images")
    if checkpoint_due:
        _report_checkpoint(w, metrics, last, register)
        progress.lap("checkpoint")  # writing it, and the report barrier
    elif metrics is not None:  # a barrier on every rank; reaches Tune too (with its step)
        ray.train.report({**metrics, "step": step})
        progress.lap("report")
    if last and fresh:
        # What the run waits for after its last report (the last image grids, the final
        # checkpoint, the final model's logging and registration) is in no report's window:
        # logged apart, as final_<phase>_s (`vaegan bench train` counts it in the end to end).
        w.logger.log_metrics({f"final_{k}_s": v for k, v in progress.phases.items()}, step)
    _maybe_kill(w)


class _Evaluator:
    """Periodic validation on rank 0: FID of samples and reconstructions, MSE, SSIM, Dis_l
    distance and (digits) the share of recognisable samples, as eval_* metrics."""

    def __init__(self, held_out: torch.Tensor, featurizer_dir: str, n: int, device, reconstructs: bool):
        from vaegan.featurizer import load_featurizer

        self.n, self.reconstructs = min(n, len(held_out)), reconstructs
        self.real = held_out[: self.n].to(device)
        self.featurizer = load_featurizer(featurizer_dir, device)

    def __call__(self, model: VAEGAN) -> dict[str, float]:
        """The metrics of `model` (the served one: averaged with train.ema) now."""
        from vaegan.evaluate import evaluate_model

        return evaluate_model(model, self.real, self.featurizer, n=self.n,
                              reconstructs=self.reconstructs).as_metrics()


def _faults(spec: str, rank: int) -> list[tuple[int, Path]]:
    """(step, marker) of each "RANK:STEP:MARKER" in `spec` (comma-separated) for `rank`."""
    out = []
    for item in filter(None, spec.split(",")):
        r, at, marker = item.split(":", 2)
        if int(r) == rank:
            out.append((int(at), Path(marker)))
    return out


def _fires(faults: list[tuple[int, Path]], step: int) -> bool:
    """Whether a fault is due at `step` and has not fired yet (its marker file is created)."""
    for at, marker in faults:
        if at == step and not marker.exists():
            marker.touch()
            return True
    return False


def _maybe_kill(w: Worker) -> None:
    if _fires(w.kills, w.state.step):
        say(f"[vaegan] fault drill: SIGKILL of rank {w.rank} after step {w.state.step} ({KILL_ENV})")
        os.kill(os.getpid(), signal.SIGKILL)


def _maybe_fail(fault: str, step: int) -> None:
    at, _, marker = fault.partition(":")
    if step == int(at) and not Path(marker).exists():
        Path(marker).touch()
        raise RuntimeError(f"injected fault at step {step} ({FAULT_ENV})")


def _window_metrics(window: list[StepMetrics], seconds: float, batch: int, loader, distributed
                    ) -> dict[str, float]:
    """Means of the step breakdowns since the last report, averaged over ranks, plus
    throughput (all ranks) and the corrupt samples skipped so far (all ranks)."""
    n = len(window)
    means = torch.tensor([sum(col) / n for col in zip(*window, strict=True)], dtype=torch.float64)
    means = distributed.mean(means)
    metrics = dict(zip(StepMetrics._fields, means.tolist(), strict=True))
    rate = distributed.total(torch.tensor([n * batch / max(seconds, 1e-9),
                                           float(getattr(loader, "corrupt_count", 0))]))
    metrics["images_per_s"], metrics["skipped_samples"] = rate.tolist()
    return metrics


def _print_progress(step: int, steps: int, m: dict[str, float], start_step: int, t_start: float,
                    budget_left: float = math.inf) -> None:
    done = step - start_step
    eta = min((time.time() - t_start) / max(done, 1) * (steps - step), max(budget_left, 0))
    llike = m["llike_dis_l"] + m["llike_pixel"]  # one of them is 0: Dis_l, or pixels (mode=vae)
    attr = f" attr {m['attribute_bce']:.3f}" if m.get("attribute_bce") else ""  # loss.attribute_weight
    say(f"[vaegan] step {step:>6}/{steps} | kl {m['kl_prior']:8.2f} | llike {llike:9.2f}"
        f" | gan {m['gan_bce']:.3f}{attr} | D(x) {m['d_real']:.2f} D(x~) {m['d_recon']:.2f}"
        f" D(xp) {m['d_prior']:.2f} | {m['images_per_s']:6.1f} img/s | ETA {_hms(eta)}")


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _report_checkpoint(w: Worker, metrics: dict | None, last: bool, register: bool,
                       again: bool = False) -> None:
    """Rank 0 writes the checkpoint directory; every rank reports (a barrier). After the last
    one rank 0 logs the final model and registers it, unless `register` is off (a sweep's
    trials: the sweep registers only its best trial). `again`: the final checkpoint once more,
    after a restart that may have come after its registration."""
    import pyarrow.fs
    import ray.train
    from ray.train.v2._internal.constants import VALIDATE_STORAGE_MARKER_FILENAME

    metrics = metrics or {}
    if w.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    storage = ray.train.get_context().get_storage()
    fs, name = storage.storage_filesystem, storage.make_default_checkpoint_dir_name()
    # A folder storage gets the checkpoint written in place (atomically, by its rename): Ray's
    # copy of it from a temp folder was 0.6 s and 580 MB more written at celeba64. S3 gets
    # the temp folder uploaded, and so does a node that does not see the run's folder (Ray's
    # marker missing: a node without the shared mount), where Ray's upload then says so.
    direct = isinstance(fs, pyarrow.fs.LocalFileSystem) and (
        Path(storage.experiment_fs_path) / VALIDATE_STORAGE_MARKER_FILENAME).is_file()
    # MLflow keeps the final model and the best checkpoint by tracking.best_metric; the
    # final one is logged (and registered) once per run and step
    final = last and register and not _registered_at_this_step(w)
    tmp = None if direct else scratch_dir("vaegan-ckpt-")
    try:
        trainer_state = w.step.state_dict()
        if w.ema is not None:
            trainer_state[LIVE] = {"encoder": w.model.encoder.state_dict(),
                                   "decoder": w.model.decoder.state_dict(), "updates": w.ema.updates}
        # The final model's logging (2 s at celeba64: MLflow's check of the model, the upload)
        # starts once its files are written, beside the optimizer states' write (and S3's upload).
        # Not `again`: a restarted run may have logged this step's model already (looked up below).
        path = save_checkpoint(
            Path(storage.build_checkpoint_path_from_name(name)) if direct else tmp / name,
            w.served, w.cfg, w.state, trainer_state,
            model_written=(lambda f: _start_final_model(w, f, metrics)) if final and not again else None)
        checkpoint = ray.train.Checkpoint(str(path), fs if direct else pyarrow.fs.LocalFileSystem())
        mode = ray.train.CheckpointUploadMode.NO_UPLOAD if direct else ray.train.CheckpointUploadMode.SYNC
        ray.train.report({**metrics, "step": w.state.step, "last": float(last)}, checkpoint=checkpoint,
                         checkpoint_dir_name=name, checkpoint_upload_mode=mode)
        w.unrecorded.after_checkpoint(w.cfg.train.keep_checkpoints)
        w.logger.log_checkpoint(path, w.state.step, metrics, final=final)
        _maybe_kill(w)  # fault drills: a death between the final checkpoint and the registration
        if final:
            from vaegan.registry import register as register_model

            logged = _logged_final_model(w) if again else None
            if logged:
                say(f"[vaegan] the final model was logged before the restart: {logged}")
            uri = register_model(logged or w.logger.log_final_model(path, w.state.step, metrics),
                                 w.cfg.tracking.model_name,
                                 retry_seconds=w.logger.grace_left(),  # MLflow may be restarting
                                 tags={STEP_TAG: str(w.state.step)})
            say(f"[vaegan] registered {uri}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _start_final_model(w: Worker, folder: Path, metrics: dict) -> None:
    """`save_checkpoint`'s hand-over of the final model's files to the MLflow sender. A failure
    here (a full spool disk) must not cost the checkpoint: the model is then logged after it."""
    try:
        w.logger.start_final_model(folder, w.state.step, metrics)
    except Exception as e:
        say(f"[vaegan] warning: could not start logging the final model beside its checkpoint "
            f"({type(e).__name__}: {e}); logging it after the checkpoint")


def _logged_final_model(w: Worker) -> str | None:
    """This run's final model at this step, if a run before the restart logged it whole."""
    import mlflow

    from vaegan.tracking import logged_final_model, retry

    return retry(lambda: logged_final_model(mlflow.MlflowClient(w.tracking_uri), w.state.mlflow_run_id,
                                            w.state.step),
                 seconds=w.logger.grace_left(), what="looking up this run's final model", uri=w.tracking_uri)


def _registered_at_this_step(w: Worker) -> list:
    """The versions of tracking.model_name that this MLflow run registered from this step's
    weights (their STEP_TAG). A run restarted after its final checkpoint reports it again;
    this keeps that from registering a second version."""
    import mlflow

    from vaegan.tracking import retry

    name = w.cfg.tracking.model_name.replace("'", "\\'")
    versions = retry(lambda: mlflow.MlflowClient(w.tracking_uri).search_model_versions(
        f"name='{name}' and run_id='{w.state.mlflow_run_id}'"), seconds=w.logger.grace_left(),
        what=f"looking up the versions of {name!r} this run registered", uri=w.tracking_uri)
    return [v for v in versions if v.tags.get(STEP_TAG) == str(w.state.step)]


# ---------------------------------------------------------------------------------------
# The driver


def resolve_data(cfg: Config) -> str:
    """`data.shards`, or the bundled source prepared into ./data/SOURCE on first use."""
    from vaegan.data import check_shards, prepare

    shards = cfg.data.shards
    if not shards:
        shards = str(Path("data").resolve() / cfg.data.source.replace(":", "-"))
        if not (Path(shards) / "manifest.json").is_file():
            print(f"[vaegan] preparing {cfg.data.source} shards in {shards}", flush=True)
            prepare(cfg.data.source, shards, image_size=cfg.model.image_size,
                    channels=cfg.model.channels)
    elif "://" not in shards:
        shards = str(Path(shards).resolve())  # workers run in another directory
    manifest = check_shards(shards, cfg.data.s3_endpoint)
    got = (manifest["image_size"], manifest["channels"])
    want = (cfg.model.image_size, cfg.model.channels)
    if got != want:
        raise TrainError(f"shards {shards} hold {got[1]}-channel {got[0]}x{got[0]} images but the "
                         f"model expects {want[1]}-channel {want[0]}x{want[0]}: set "
                         f"model.image_size={got[0]} model.channels={got[1]}, or prepare the data "
                         "at the model's size")
    return shards


def binary_attributes(shards: str, s3_endpoint: str = "") -> list[str]:
    """The shards' labelled attributes if they are binary (1/0 or CelebA's 1/-1: what Dis's
    attribute head predicts), judged on the first training images; else [] (e.g. a digit)."""
    from vaegan.data import read_manifest, read_split
    from vaegan.featurizer import is_binary

    names = list(read_manifest(shards, s3_endpoint)["attributes"])
    if not names:
        return []
    _, labels = read_split(shards, 256, "train", with_attributes=True, s3_endpoint=s3_endpoint)
    return names if is_binary(labels) else []


def resolve_attribute_head(cfg: Config, names: list[str]) -> Config:
    """Sizes Dis's attribute head to the shards' labels `names`: model.dis_attributes =
    len(names) when loss.attribute_weight > 0, else 0; refused where it cannot work."""
    weight, asked, shards = cfg.loss.attribute_weight, cfg.model.dis_attributes, cfg.data.shards
    if weight == 0 or cfg.loss.mode == "vae":  # no attribute loss (mode=vae has no Dis)
        if asked:
            raise TrainError(f"model.dis_attributes={asked} adds an attribute head to Dis that only "
                             "loss.attribute_weight > 0 trains (and mode=vae has no Dis): leave "
                             "model.dis_attributes at 0; training sets it")
        return cfg
    if not names:
        raise TrainError(f"loss.attribute_weight={weight:g} needs binary attributes (1/0 or 1/-1, "
                         f"e.g. CelebA's), and shards {shards} have none (no labels, or labels with "
                         "other values, such as a digit): set loss.attribute_weight=0, or prepare "
                         "labelled data (e.g. --source synthetic-faces)")
    if asked not in (0, len(names)):
        raise TrainError(f"model.dis_attributes={asked}, but shards {shards} label {len(names)} "
                         f"attributes ({', '.join(names)}); leave it 0 and training sets it")
    cfg.model.dis_attributes = len(names)
    return cfg


def resolve_featurizer(cfg: Config, needed_by: str = "") -> str:
    """`train.eval_featurizer`, or one trained on the shards' labels and cached (first use);
    "" when nothing evaluates (no train.eval_every and no `needed_by`, e.g. "--compare")."""
    needed_by = needed_by or (f"train.eval_every={cfg.train.eval_every}" if cfg.train.eval_every else "")
    if not needed_by:
        return ""
    if cfg.train.eval_featurizer:  # absolute: workers run in another directory
        return str(Path(cfg.train.eval_featurizer).resolve())
    from vaegan.data import read_manifest
    from vaegan.featurizer import train_featurizer

    manifest = read_manifest(cfg.data.shards, cfg.data.s3_endpoint)
    if not manifest["attributes"]:
        raise TrainError(f"{needed_by} needs a featurizer, and shards "
                         f"{cfg.data.shards} have no labels to train one on: set train.eval_featurizer")
    name = f"{manifest['source']}-{manifest['image_size']}px-{manifest['channels']}ch".replace(":", "-")
    out = Path("data/featurizers").resolve() / name
    if not (out / "featurizer.json").is_file():
        print(redact_text(f"[vaegan] training an evaluation featurizer on {cfg.data.shards} -> {out}"),
              flush=True)
        attrs = manifest["attributes"]
        train_featurizer(cfg.data.shards, attrs[0] if len(attrs) == 1 else "all", out)
    return str(out)


def build_trainer(cfg: Config, run_id: str, uri: str, featurizer: str, storage: Storage,
                  *, callbacks: list | None = None, register: bool = True):
    """The TorchTrainer of one training run named `cfg.train.name`, everything resolved (data,
    featurizer, storage, MLflow run). `fit` runs one; a Tune driver builds one per trial
    (with Tune's report callback, and `register=False`)."""
    T = cfg.train
    # Before any worker starts (fit and tune both come here): the compiled step is tested on one
    # worker, and on GPUs its gradients, returned rather than accumulated, would bypass DDP.
    if T.compile and T.num_workers > 1:
        raise ConfigError(f"train.compile=true runs the step on one worker; train.num_workers="
                          f"{T.num_workers} is not allowed with it (set train.num_workers=1)")
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from vaegan.allocator import ONE_ARENA

    # Ray Train V2's controller takes a worker's report off its one-slot queue when it polls,
    # every 2 s by default, and the next report blocks until then: at log_every steps shorter
    # than that, every report stalled every rank for up to 2 s (docs/platform.md). Read from
    # this process's environment when the trainer starts its controller; a user's value wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "mlflow_run_id": run_id, "tracking_uri": uri,
                           "fault": os.environ.get(FAULT_ENV, ""), "featurizer": featurizer,
                           "register": register,
                           "faults": {k: os.environ[k] for k in (KILL_ENV, NAN_ENV) if os.environ.get(k)}},
        scaling_config=ScalingConfig(num_workers=T.num_workers, use_gpu=T.use_gpu,
                                     resources_per_worker={"CPU": T.cpus_per_worker}),
        run_config=RunConfig(
            name=T.name, storage_path=storage.path, storage_filesystem=storage.filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=T.keep_checkpoints),
            failure_config=FailureConfig(max_failures=T.max_failures), callbacks=callbacks,
            worker_runtime_env={"env_vars": dict(ONE_ARENA)}),  # see vaegan.allocator
    )


def fit(cfg: Config) -> FitResult:
    """Check everything that can be checked, then train on Ray. Blocks until done; a local
    Ray started for it is shut down in order before it returns (`cluster.shutdown`)."""
    from vaegan import cluster

    with cluster.session():
        return _fit(cfg)


def _fit(cfg: Config) -> FitResult:
    from vaegan import cluster
    from vaegan.threads import step_niceness
    from vaegan.tracking import resolve_tracking_uri

    T = cfg.train
    step_niceness()  # a bad VAEGAN_STEP_NICE is refused here, not in every worker
    cfg.data.shards = resolve_data(cfg)
    if cfg.loss.attribute_weight or cfg.model.dis_attributes:
        resolve_attribute_head(cfg, binary_attributes(cfg.data.shards, cfg.data.s3_endpoint))
    featurizer = resolve_featurizer(cfg)
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    cfg.tracking.tracking_uri = uri
    cluster.connect(T.num_workers * T.cpus_per_worker)
    cluster.check_resources(
        T.num_workers * T.cpus_per_worker, T.num_workers if T.use_gpu else 0,
        asked=f"train.num_workers={T.num_workers} x train.cpus_per_worker={T.cpus_per_worker:g}"
              + (" (one GPU each: train.use_gpu=true)" if T.use_gpu else ""),
        fix="lower train.num_workers or train.cpus_per_worker, or add nodes")
    storage = cluster.resolve_storage(T.storage_path, cfg.data.s3_endpoint, shared=T.shared_storage,
                                      retry_seconds=cfg.data.io_retry_seconds)
    with cluster.RunLease(storage, T.name, T.lease_ttl_s):  # one run per name: refused while held
        set_aside_unreadable_index(storage.child(T.name))
        return _run(cfg, uri, featurizer, storage)


def _run(cfg: Config, uri: str, featurizer: str, storage: Storage) -> FitResult:
    """The MLflow run (found again, or created), then the trainer, under the run's lease."""
    from vaegan.tracking import start_or_resume_run

    T = cfg.train
    run_id = start_or_resume_run(uri, cfg.tracking.experiment, T.name, cfg.flat(),
                                 wait_seconds=cfg.tracking.start_wait_seconds)
    trainer = build_trainer(cfg, run_id, uri, featurizer, storage)
    caller_sigint = signal.getsignal(signal.SIGINT)
    try:
        result = trainer.fit()
    except Exception as e:  # Ray's TrainingFailedError wraps the worker's exception
        raise TrainError(f"training run {T.name} failed: {e}; start it again with "
                         f"train.name={T.name} to resume from its latest checkpoint") from e
    finally:
        # In the main thread, Ray Train's fit installs a Ctrl-C handler (abort the run) and leaves
        # it: it would swallow the caller's later Ctrl-C, and the run's controller actor it holds
        # would live on, polling, until the next run replaced it (seen in the test session).
        if threading.current_thread() is threading.main_thread() and caller_sigint is not None:
            signal.signal(signal.SIGINT, caller_sigint)
    if result.error:
        raise TrainError(f"training run {T.name} failed: {result.error}")
    step = read_state_from_result(result)
    model_uri = f"models:/{cfg.tracking.model_name}/latest"
    return FitResult(T.name, run_id, uri, model_uri, storage.child(T.name).url, step)


def set_aside_unreadable_index(run: Storage) -> None:
    """Ray's index of a run's checkpoints (checkpoint_manager_snapshot.json) cut short, as a
    crash mid-write leaves it, makes every later start of the run fail in Ray
    (CheckpointManagerInitializationError). Move it aside, with a warning: the workers find
    the checkpoints by listing the run's folder (`newest_complete_checkpoint`)."""
    import json

    import pyarrow.fs

    fs = run.filesystem or pyarrow.fs.LocalFileSystem()
    path = f"{run.path}/{RAY_INDEX}"
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return
    try:
        with fs.open_input_stream(path) as f:
            if isinstance(json.loads(f.read().decode()), dict):
                return
        problem = "not a JSON object"
    except (ValueError, UnicodeDecodeError) as e:
        problem = f"{type(e).__name__}: {e}"
    aside = f"{path}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}"
    fs.move(path, aside)
    print(f"[vaegan] warning: Ray's checkpoint index {run.url}/{RAY_INDEX} is unreadable ({problem}); "
          f"moved it to {Path(aside).name}. Resuming from the newest complete checkpoint in "
          f"{run.url}", file=sys.stderr, flush=True)


def remove_torn_checkpoints(run: Storage) -> None:
    """Remove the unfinished checkpoints of a run that will not resume (a sweep's trial that
    ASHA stopped, killing its workers wherever they were): a `.tmp` folder written in place,
    or an S3 upload cut short (a folder whose manifest is missing or does not list what is
    there), up to 580 MB each at celeba64. Never a folder Ray's index holds. A failure is a
    warning. Parts of a multipart upload that was cut short are not objects and stay until
    the bucket's rule for incomplete uploads removes them (docs/operations.md)."""
    import json

    from pyarrow.fs import FileSelector, FileType, LocalFileSystem

    fs = run.filesystem or LocalFileSystem()
    try:
        folders = [i for i in fs.get_file_info(FileSelector(run.path, allow_not_found=True))
                   if i.type == FileType.Directory and i.base_name.startswith("checkpoint_")]
        if not folders:
            return
        held = set()  # stopped before Ray's first index: it holds none
        if fs.get_file_info(f"{run.path}/{RAY_INDEX}").type == FileType.File:
            with fs.open_input_stream(f"{run.path}/{RAY_INDEX}") as f:
                held = {c["checkpoint_dir_name"] for c in json.loads(f.read().decode())["checkpoint_results"]}
    except (OSError, ValueError, KeyError, TypeError) as e:  # an index cut short: leave it all
        say(redact_text(f"[vaegan] warning: not clearing the unfinished checkpoints of {run.url}: "
                        f"{type(e).__name__}: {e}"))
        return
    for folder in [f for f in folders if f.base_name not in held]:
        try:
            if folder.base_name.endswith(UNFINISHED) or check_complete(folder.path, fs, sha256=False):
                say(redact_text(f"[vaegan] removing the unfinished checkpoint {folder.path} (a stopped run)"))
                fs.delete_dir(folder.path)
        except OSError as e:
            say(redact_text(f"[vaegan] warning: could not remove {folder.path}: {e}"))


def read_state_from_result(result) -> int:
    if result.checkpoint is None:
        return 0
    with result.checkpoint.as_directory() as d:
        return read_state(d).step


def main_train(cfg: Config) -> FitResult:
    """What `vaegan train` and jobs/train.py run: fit, then say where everything is."""
    res = fit(cfg)
    print(redact_text(f"\n[vaegan] done: {res.run_name} at step {res.step}\n"
                      f"  model:       {res.model_uri}\n"
                      f"  checkpoints: {res.storage}\n"
                      f"  MLflow run:  {res.mlflow_run_id}"
                      f"  (mlflow ui --backend-store-uri {res.tracking_uri})"),
          file=sys.stdout, flush=True)
    return res
