"""Training on Ray: the per-worker loop (data -> step -> report/checkpoint) and the driver.

    fit(cfg)                    driver: checks inputs, finds/creates the MLflow run, starts a
                                TorchTrainer whose workers run `train_loop_per_worker`
    train_loop_per_worker(..)   one DDP rank: its shard partition, Algorithm 1, metrics,
                                images and checkpoints (rank 0 tracks and writes)

A run is named (`train.name`); starting a run with the name of an earlier one resumes it
from its latest checkpoint at exactly that step, in the same MLflow run.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vaegan.artifact import WEIGHTS
from vaegan.checkpoint import TrainState, load_trainer_state, read_state, save_checkpoint
from vaegan.config import Config, config_from_dict
from vaegan.errors import UserError
from vaegan.images import grid_image
from vaegan.losses import StepMetrics
from vaegan.model import VAEGAN

if TYPE_CHECKING:
    from vaegan.cluster import Storage

# Fault injection for tests and drills: "STEP:MARKER_PATH" makes rank 0 fail once, right
# after finishing STEP, unless MARKER_PATH exists (it is created when the fault fires).
FAULT_ENV = "VAEGAN_FAULT_AT_STEP"
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


def noise_seed(seed: int, rank: int, step: int) -> int:
    """The step's noise depends only on (seed, rank, step): a resumed run draws exactly the
    noise the uninterrupted run would have, with no generator state to save."""
    return (seed * 1_000_003 + rank) * 1_000_033 + step


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


def train_loop_per_worker(config: dict) -> None:
    """One DDP rank. `config` carries the resolved Config and the driver's resolutions."""
    w = set_up(config)
    announce(w)
    loop(w, config)
    w.logger.end()


def set_up(config: dict) -> Worker:
    """The model (resumed from the latest checkpoint, if any), its DDP wrappers, the step,
    the tracker, and on rank 0 what the image grids and the evaluation look at."""
    import ray.train
    import ray.train.torch

    from vaegan import distributed
    from vaegan.cluster import node_id
    from vaegan.step import TrainStep
    from vaegan.tracking import MlflowLogger, NullLogger

    cfg = config_from_dict(config["cfg"])
    quiet_ray_train_reports()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = VAEGAN(cfg.model).to(device, memory_format=memory_format)
    state, trainer_state = resume(model, device, TrainState(mlflow_run_id=config["mlflow_run_id"]))
    enc, dec, dis = distributed.wrap(model, device, cfg.train.sync_bn)
    step = TrainStep(enc, dec, dis, cfg, device, mean_across_ranks=distributed.mean)
    if trainer_state:
        step.load_state_dict(trainer_state)
    nodes = distributed.gather(node_id())  # every rank takes part; rank 0 records them
    logger = NullLogger()
    if rank == 0:
        logger = MlflowLogger(config["tracking_uri"], state.mlflow_run_id, cfg.tracking.log_checkpoints)
        logger.set_tags({f"{NODE_TAG}.rank{r}": n for r, n in enumerate(nodes)})
    w = Worker(cfg, rank, world, device, memory_format, model, step, state, logger)
    if rank == 0:
        from vaegan.data import read_split

        held_out = read_split(cfg.data.shards, max(16, cfg.train.eval_images),
                              s3_endpoint=cfg.data.s3_endpoint)
        fixed_z = torch.randn(64, cfg.model.latent_dim, generator=torch.Generator().manual_seed(1234))
        w.fixed_z = fixed_z.to(device)
        w.real = held_out[:16].to(device)
        if cfg.train.eval_every:
            w.evaluator = _Evaluator(model, held_out, config["featurizer"], cfg.train.eval_images, device)
    return w


def resume(model: VAEGAN, device: torch.device, state: TrainState) -> tuple[TrainState, dict | None]:
    """Weights into `model`, and (train state, optimizer states) from Ray's latest checkpoint;
    `state` and None when the run starts fresh."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return state, None
    with checkpoint.as_directory() as d:
        model.load_state_dict(torch.load(Path(d) / WEIGHTS, map_location=device, weights_only=True))
        return read_state(d), load_trainer_state(d)


def announce(w: Worker) -> None:
    if w.rank != 0:
        return
    T, s = w.cfg.train, w.state
    if s.step == 0:
        say(f"[vaegan] training {T.name}: {T.steps} steps, {w.world} worker(s) x batch "
            f"{w.cfg.data.batch_size}, precision {w.step.precision}, MLflow run {s.mlflow_run_id}")
    else:
        say(f"[vaegan] resuming {T.name} at step {s.step} (epoch {s.epoch}, batch {s.batch})")


def loop(w: Worker, config: dict) -> None:
    """Epochs of this rank's shard partition until train.steps; every rank does the same
    number of steps and reports (a report is a barrier, and DDP needs the same backwards)."""
    from vaegan.data import make_loader

    cfg, T, state = w.cfg, w.cfg.train, w.state
    loader_kw = dict(batch_size=cfg.data.batch_size, rank=w.rank, world_size=w.world,
                     loader_workers=cfg.data.loader_workers, shuffle_buffer=cfg.data.shuffle_buffer,
                     flip=cfg.data.flip, seed=T.seed, s3_endpoint=cfg.data.s3_endpoint,
                     max_corrupt_fraction=cfg.data.max_corrupt_fraction)
    progress = Progress(state.step, T.steps)
    while state.step < T.steps:
        loader = make_loader(cfg.data.shards, epoch=state.epoch, start_batch=state.batch, **loader_kw)
        for images in loader:
            images = images.to(w.device, memory_format=w.memory_format, non_blocking=True)
            w.step.generator.manual_seed(noise_seed(T.seed, w.rank, state.step))
            progress.window.append(w.step(images))
            state.step += 1
            state.batch += 1
            if w.rank == 0 and config.get("fault"):
                _maybe_fail(config["fault"], state.step)
            report(w, progress, loader, register=config.get("register", True))
            if state.step >= T.steps:
                break
        else:  # the epoch ran out before the steps did
            state.epoch, state.batch = state.epoch + 1, 0


@dataclass
class Progress:
    """The step breakdowns since the last report, and the clock for the ETA."""

    start_step: int
    steps: int
    window: list = field(default_factory=list)
    t_window: float = field(default_factory=time.time)
    t_start: float = field(default_factory=time.time)


def report(w: Worker, progress: Progress, loader, register: bool) -> None:
    """What is due after this step: metrics (and evaluation), image grids, a checkpoint."""
    import ray.train

    from vaegan import distributed

    T, step = w.cfg.train, w.state.step
    last = step >= T.steps
    eval_due = T.eval_every and (step % T.eval_every == 0 or last)
    metrics = None
    if step % T.log_every == 0 or last or eval_due:
        metrics = _window_metrics(progress.window, time.time() - progress.t_window, w.cfg.data.batch_size,
                                  loader, distributed)
        if w.evaluator and eval_due:  # rank 0 only; the others wait at the report below
            metrics.update(w.evaluator())
        progress.window, progress.t_window = [], time.time()
        w.logger.log_metrics(metrics, step)
        if w.rank == 0:
            _print_progress(step, T.steps, metrics, progress.start_step, progress.t_start)
    if w.rank == 0 and (step % T.image_every == 0 or last):
        samples, recons = image_grids(w.model, w.fixed_z, w.real)
        w.logger.log_image(samples, "samples", step)
        w.logger.log_image(recons, "reconstructions", step)
    if step % T.checkpoint_every == 0 or last:
        _report_checkpoint(w, metrics, last, register)
    elif metrics is not None:  # a barrier on every rank; reaches Tune too (with its step)
        ray.train.report({**metrics, "step": step})


class _Evaluator:
    """Periodic validation on rank 0: FID of samples and reconstructions, MSE, SSIM, Dis_l
    distance and (digits) the share of recognisable samples, as eval_* metrics."""

    def __init__(self, model: VAEGAN, held_out: torch.Tensor, featurizer_dir: str, n: int, device):
        from vaegan.featurizer import load_featurizer

        self.model, self.n = model, min(n, len(held_out))
        self.real = held_out[: self.n].to(device)
        self.featurizer = load_featurizer(featurizer_dir, device)

    def __call__(self) -> dict[str, float]:
        from vaegan.evaluate import evaluate_model

        return evaluate_model(self.model, self.real, self.featurizer, n=self.n).as_metrics()


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


def _print_progress(step: int, steps: int, m: dict[str, float], start_step: int, t_start: float) -> None:
    done = step - start_step
    eta = (time.time() - t_start) / max(done, 1) * (steps - step)
    say(f"[vaegan] step {step:>6}/{steps} | kl {m['kl_prior']:8.2f} | llike {m['llike_dis_l']:9.2f}"
        f" | gan {m['gan_bce']:.3f} | D(x) {m['d_real']:.2f} D(x~) {m['d_recon']:.2f}"
        f" D(xp) {m['d_prior']:.2f} | {m['images_per_s']:6.1f} img/s | ETA {_hms(eta)}")


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _report_checkpoint(w: Worker, metrics: dict | None, last: bool, register: bool) -> None:
    """Rank 0 writes the checkpoint directory; every rank reports (a barrier). After the last
    one rank 0 logs the final model and registers it, unless `register` is off (a sweep's
    trials: the sweep registers only its best trial)."""
    import ray.train

    metrics = metrics or {}
    if w.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    tmp = Path(tempfile.mkdtemp(prefix="vaegan-ckpt-"))
    try:
        path = save_checkpoint(tmp / f"step-{w.state.step:07d}", w.model, w.cfg, w.state, w.step.state_dict())
        ray.train.report({**metrics, "step": w.state.step},
                         checkpoint=ray.train.Checkpoint.from_directory(str(path)))
        w.logger.log_checkpoint(path, w.state.step)
        if last and register:
            from vaegan.registry import register as register_model

            uri = register_model(w.logger.log_final_model(path, w.state.step), w.cfg.tracking.model_name)
            say(f"[vaegan] registered {uri}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def resolve_featurizer(cfg: Config) -> str:
    """`train.eval_featurizer`, or one trained on the shards' labels and cached (first use)."""
    if not cfg.train.eval_every:
        return ""
    if cfg.train.eval_featurizer:  # absolute: workers run in another directory
        return str(Path(cfg.train.eval_featurizer).resolve())
    from vaegan.data import read_manifest
    from vaegan.featurizer import train_featurizer

    manifest = read_manifest(cfg.data.shards, cfg.data.s3_endpoint)
    if not manifest["attributes"]:
        raise TrainError(f"train.eval_every={cfg.train.eval_every} needs a featurizer, and shards "
                         f"{cfg.data.shards} have no labels to train one on: set train.eval_featurizer")
    name = f"{manifest['source']}-{manifest['image_size']}px-{manifest['channels']}ch".replace(":", "-")
    out = Path("data/featurizers").resolve() / name
    if not (out / "featurizer.json").is_file():
        print(f"[vaegan] training an evaluation featurizer on {cfg.data.shards} -> {out}", flush=True)
        attrs = manifest["attributes"]
        train_featurizer(cfg.data.shards, attrs[0] if len(attrs) == 1 else "all", out)
    return str(out)


def build_trainer(cfg: Config, run_id: str, uri: str, featurizer: str, storage: Storage,
                  *, callbacks: list | None = None, register: bool = True):
    """The TorchTrainer of one training run named `cfg.train.name`, everything resolved (data,
    featurizer, storage, MLflow run). `fit` runs one; a Tune driver builds one per trial
    (with Tune's report callback, and `register=False`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    T = cfg.train
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "mlflow_run_id": run_id, "tracking_uri": uri,
                           "fault": os.environ.get(FAULT_ENV, ""), "featurizer": featurizer,
                           "register": register},
        scaling_config=ScalingConfig(num_workers=T.num_workers, use_gpu=T.use_gpu,
                                     resources_per_worker={"CPU": T.cpus_per_worker}),
        run_config=RunConfig(
            name=T.name, storage_path=storage.path, storage_filesystem=storage.filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=T.keep_checkpoints),
            failure_config=FailureConfig(max_failures=T.max_failures), callbacks=callbacks),
    )


def fit(cfg: Config) -> FitResult:
    """Check everything that can be checked, then train on Ray. Blocks until done."""
    from vaegan import cluster
    from vaegan.tracking import resolve_tracking_uri, start_or_resume_run

    T = cfg.train
    cfg.data.shards = resolve_data(cfg)
    featurizer = resolve_featurizer(cfg)
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    cfg.tracking.tracking_uri = uri
    cluster.connect(T.num_workers * T.cpus_per_worker)
    cluster.check_resources(
        T.num_workers * T.cpus_per_worker, T.num_workers if T.use_gpu else 0,
        asked=f"train.num_workers={T.num_workers} x train.cpus_per_worker={T.cpus_per_worker:g}"
              + (" (one GPU each: train.use_gpu=true)" if T.use_gpu else ""),
        fix="lower train.num_workers or train.cpus_per_worker, or add nodes")
    storage = cluster.resolve_storage(T.storage_path, cfg.data.s3_endpoint, shared=T.shared_storage)
    run_id = start_or_resume_run(uri, cfg.tracking.experiment, T.name, cfg.flat())
    trainer = build_trainer(cfg, run_id, uri, featurizer, storage)
    try:
        result = trainer.fit()
    except Exception as e:  # Ray's TrainingFailedError wraps the worker's exception
        raise TrainError(f"training run {T.name} failed: {e}; start it again with "
                         f"train.name={T.name} to resume from its latest checkpoint") from e
    if result.error:
        raise TrainError(f"training run {T.name} failed: {result.error}")
    step = read_state_from_result(result)
    model_uri = f"models:/{cfg.tracking.model_name}/latest"
    return FitResult(T.name, run_id, uri, model_uri, storage.child(T.name).url, step)


def read_state_from_result(result) -> int:
    if result.checkpoint is None:
        return 0
    with result.checkpoint.as_directory() as d:
        return read_state(d).step


def main_train(cfg: Config) -> FitResult:
    """What `vaegan train` and jobs/train.py run: fit, then say where everything is."""
    res = fit(cfg)
    print(f"\n[vaegan] done: {res.run_name} at step {res.step}\n"
          f"  model:       {res.model_uri}\n"
          f"  checkpoints: {res.storage}\n"
          f"  MLflow run:  {res.mlflow_run_id}  (mlflow ui --backend-store-uri {res.tracking_uri})",
          file=sys.stdout, flush=True)
    return res
