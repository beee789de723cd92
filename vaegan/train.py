"""Training on Ray: the per-worker loop (data -> step -> report/checkpoint) and the driver.

    fit(cfg)                    driver: checks inputs, finds/creates the MLflow run, starts a
                                TorchTrainer whose workers run `train_loop_per_worker`
    train_loop_per_worker(..)   one DDP rank: its shard partition, Algorithm 1, metrics,
                                images and checkpoints (rank 0 tracks and writes)

A run is named (`train.name`); starting a run with the name of an earlier one resumes it
from its latest checkpoint at exactly that step, in the same MLflow run.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vaegan.checkpoint import (
    MODEL,
    TrainState,
    load_trainer_state,
    read_state,
    save_checkpoint,
)
from vaegan.config import Config, config_from_dict
from vaegan.losses import StepMetrics
from vaegan.model import VAEGAN

# Fault injection for tests and drills: "STEP:MARKER_PATH" makes rank 0 fail once, right
# after finishing STEP, unless MARKER_PATH exists (it is created when the fault fires).
FAULT_ENV = "VAEGAN_FAULT_AT_STEP"


class TrainError(RuntimeError):
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


def _grid(images: torch.Tensor, nrow: int):
    """(B, C, H, W) in [-1, 1] -> a PIL image grid."""
    from torchvision.transforms.functional import to_pil_image
    from torchvision.utils import make_grid

    grid = make_grid(images.float().cpu().clamp(-1, 1), nrow=nrow, normalize=True,
                     value_range=(-1, 1), pad_value=1.0)
    return to_pil_image(grid)


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
    return _grid(samples, 8), _grid(pairs, 8)


def train_loop_per_worker(config: dict) -> None:
    """One DDP rank. `config` carries the resolved Config and the driver's resolutions."""
    import ray.train
    import ray.train.torch

    from vaegan import distributed
    from vaegan.data import make_loader
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
    state, trainer_state = TrainState(mlflow_run_id=config["mlflow_run_id"]), None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # resume: weights, optimizers and data position from the latest checkpoint
        with checkpoint.as_directory() as d:
            model.load_state_dict(torch.load(Path(d) / MODEL, map_location=device, weights_only=True))
            state, trainer_state = read_state(d), load_trainer_state(d)
    enc, dec, dis = distributed.wrap(model, device, cfg.train.sync_bn)
    step = TrainStep(enc, dec, dis, cfg, device, mean_across_ranks=distributed.mean)
    if trainer_state:
        step.load_state_dict(trainer_state)
    logger = (MlflowLogger(config["tracking_uri"], state.mlflow_run_id, cfg.tracking.log_checkpoints)
              if rank == 0 else NullLogger())

    loader_kw = dict(batch_size=cfg.data.batch_size, rank=rank, world_size=world,
                     loader_workers=cfg.data.loader_workers, shuffle_buffer=cfg.data.shuffle_buffer,
                     flip=cfg.data.flip, seed=cfg.train.seed, s3_endpoint=cfg.data.s3_endpoint,
                     max_corrupt_fraction=cfg.data.max_corrupt_fraction)
    fixed_z = real = evaluator = None
    if rank == 0:  # what the image grids show, fixed for the whole run
        from vaegan.evaluate import load_real_images

        fixed_z = torch.randn(64, cfg.model.latent_dim, generator=torch.Generator().manual_seed(1234))
        held_out = load_real_images(cfg.data.shards, n=max(16, cfg.train.eval_images),
                                    s3_endpoint=cfg.data.s3_endpoint)
        fixed_z, real = fixed_z.to(device), held_out[:16].to(device)
        if cfg.train.eval_every:
            evaluator = _Evaluator(model, held_out, config["featurizer"], cfg.train.eval_images, device)

    T, batch = cfg.train, cfg.data.batch_size
    if state.step == 0 and rank == 0:
        say(f"[vaegan] training {T.name}: {T.steps} steps, {world} worker(s) x batch {batch}, "
            f"precision {step.precision}, MLflow run {state.mlflow_run_id}")
    elif rank == 0:
        say(f"[vaegan] resuming {T.name} at step {state.step} (epoch {state.epoch}, "
            f"batch {state.batch})")
    start_step, t_start = state.step, time.time()
    window, t_window = [], time.time()
    while state.step < T.steps:
        loader = make_loader(cfg.data.shards, epoch=state.epoch, start_batch=state.batch, **loader_kw)
        for images in loader:
            images = images.to(device, memory_format=memory_format, non_blocking=True)
            step.generator.manual_seed(noise_seed(T.seed, rank, state.step))
            window.append(step(images))
            state.step += 1
            state.batch += 1
            if rank == 0 and config.get("fault"):
                _maybe_fail(config["fault"], state.step)
            last = state.step >= T.steps
            eval_due = T.eval_every and (state.step % T.eval_every == 0 or last)
            if state.step % T.log_every == 0 or last or eval_due:
                metrics = _window_metrics(window, time.time() - t_window, batch, loader, distributed)
                if evaluator and eval_due:  # rank 0 only; the others wait at the report below
                    metrics.update(evaluator())
                window, t_window = [], time.time()
                logger.log_metrics(metrics, state.step)
                if rank == 0:
                    _print_progress(state.step, T.steps, metrics, start_step, t_start)
            else:
                metrics = None
            if rank == 0 and (state.step % T.image_every == 0 or last):
                samples, recons = image_grids(model, fixed_z, real)
                logger.log_image(samples, "samples", state.step)
                logger.log_image(recons, "reconstructions", state.step)
            if state.step % T.checkpoint_every == 0 or last:
                _report_checkpoint(model, step, cfg, state, metrics, rank, logger, last,
                                   register=config.get("register", True))
            elif metrics is not None:  # a barrier on every rank; reaches Tune too (with its step)
                ray.train.report({**metrics, "step": state.step})
            if last:
                break
        else:  # the epoch ran out before the steps did
            state.epoch, state.batch = state.epoch + 1, 0
    logger.end()


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


def _report_checkpoint(model, step, cfg: Config, state: TrainState, metrics, rank: int, logger,
                       last: bool, register: bool = True) -> None:
    """Rank 0 writes the checkpoint directory; every rank reports (a barrier). After the last
    one rank 0 logs and registers the final model, unless `register` is off (a sweep's trials:
    the sweep registers only its best trial)."""
    import ray.train

    metrics = metrics or {}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    tmp = Path(tempfile.mkdtemp(prefix="vaegan-ckpt-"))
    try:
        path = save_checkpoint(tmp / f"step-{state.step:07d}", model, cfg, state, step.state_dict())
        ray.train.report({**metrics, "step": state.step},
                         checkpoint=ray.train.Checkpoint.from_directory(str(path)))
        logger.log_checkpoint(path, state.step)
        if last and register:
            uri = logger.finish(path, cfg.tracking.model_name, state.step)
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


def _storage(cfg: Config):
    """(storage_path, storage_filesystem) for RunConfig; checks that it is writable."""
    path = cfg.train.storage_path or str(Path("runs").resolve())
    if path.startswith("s3://"):
        import pyarrow.fs

        from vaegan.data.storage import s3_filesystem

        fs = s3_filesystem(cfg.data.s3_endpoint)
        bare = path[len("s3://"):].rstrip("/")
        probe = f"{bare}/.vaegan-write-probe"
        try:
            fs.pipe(probe, b"ok")
            fs.rm(probe)
        except Exception as e:
            raise TrainError(f"checkpoint storage {path} is not writable: {e}") from None
        return bare, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
    path = str(Path(path).resolve())
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as e:
        raise TrainError(f"checkpoint storage {path} is not writable ({e.strerror})") from None
    return path, None


def _connect_ray(cfg: Config) -> None:
    """RAY_ADDRESS when set (a cluster, or inside `ray job submit`), else a local Ray."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        need = math.ceil(cfg.train.num_workers * cfg.train.cpus_per_worker)
        # address="local": always a new local Ray, never a stale /tmp/ray cluster file's
        # The dashboard serves Ray's State API, which Ray Train's placement-group watcher
        # polls: without it, a "State API unavailable" warning every second or two floods the console.
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, need),
                 include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)


def _check_resources(cfg: Config) -> None:
    """A clear error instead of an endless wait for workers that cannot be placed."""
    import ray

    res = ray.cluster_resources()
    T = cfg.train
    need_cpu = T.num_workers * T.cpus_per_worker
    if need_cpu > res.get("CPU", 0) + 1e-9:
        raise TrainError(f"train.num_workers={T.num_workers} x train.cpus_per_worker="
                         f"{T.cpus_per_worker} needs {need_cpu:g} CPUs but the Ray cluster has "
                         f"{res.get('CPU', 0):g}; lower one of them or add nodes")
    if T.use_gpu and T.num_workers > res.get("GPU", 0):
        raise TrainError(f"train.use_gpu=true with train.num_workers={T.num_workers} needs "
                         f"{T.num_workers} GPUs but the Ray cluster has {res.get('GPU', 0):g}")


def build_trainer(cfg: Config, run_id: str, uri: str, featurizer: str, storage_path: str, storage_fs,
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
            name=T.name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=T.keep_checkpoints),
            failure_config=FailureConfig(max_failures=T.max_failures), callbacks=callbacks),
    )


def fit(cfg: Config) -> FitResult:
    """Check everything that can be checked, then train on Ray. Blocks until done."""
    from vaegan.tracking import resolve_tracking_uri, start_or_resume_run

    cfg.data.shards = resolve_data(cfg)
    featurizer = resolve_featurizer(cfg)
    storage_path, storage_fs = _storage(cfg)
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    cfg.tracking.tracking_uri = uri
    run_id = start_or_resume_run(uri, cfg.tracking.experiment, cfg.train.name, cfg.flat())
    _connect_ray(cfg)
    _check_resources(cfg)
    T = cfg.train
    trainer = build_trainer(cfg, run_id, uri, featurizer, storage_path, storage_fs)
    try:
        result = trainer.fit()
    except Exception as e:  # Ray's TrainingFailedError wraps the worker's exception
        raise TrainError(f"training run {T.name} failed: {e}; start it again with "
                         f"train.name={T.name} to resume from its latest checkpoint") from e
    if result.error:
        raise TrainError(f"training run {T.name} failed: {result.error}")
    step = read_state_from_result(result)
    model_uri = f"models:/{cfg.tracking.model_name}/latest"
    storage = f"{T.storage_path or storage_path}/{T.name}"
    return FitResult(T.name, run_id, uri, model_uri, storage, step)


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
