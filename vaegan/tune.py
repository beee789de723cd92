"""Ray Tune sweeps over any config key (gamma by default), in three layers:

    sweep(cfg, opts)            the sweep: checks, one MLflow parent run, a Tuner with ASHA;
                                then a summary table and a plot on the parent run, and the
                                best trial's model registered with the alias `challenger`
    driver_fn(config, sweep)    one trial (a Tune function trainable): its MLflow child run,
                                and a TorchTrainer named after the trial id whose reports
                                reach Tune through `TuneReportCallback` (ASHA needs them)
    train_loop_per_worker       one DDP rank: vaegan.train's loop, unchanged

The search space is a set of dotted config keys, each a grid (`--grid loss.mode=vae,vaegan`),
a log-uniform range (`--loguniform loss.gamma=1e-4:1`) or a uniform one (`--uniform
optim.alpha=0.8:0.99`), and repeats over seeds (`--seeds 2`: every configuration with
train.seed and train.seed + 1). Without one, loss.gamma is searched log-uniformly: the default
range [1e-7, 1] covers the paper's gamma (1e-2 .. 1) and the reference recipe's
w / (1 - w) ~ 1e-6. Every value is checked against the config before any trial starts.
ASHA's time axis is the training step, so `--grace-period` counts steps; `--scheduler fifo`
runs every trial to the end (a comparison of models, where stopping one early would bias it).

A sweep is named (`--name`); starting it again with the same name resumes it
(`Tuner.restore`): finished trials stay finished, interrupted or failed ones continue from
their latest checkpoint, each in its own MLflow child run under the same parent run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vaegan.config import COMPARE_METRIC, Config, config_from_dict, redact_text
from vaegan.errors import UserError
from vaegan.tracking import RUN_NAME_TAG

CHALLENGER = "challenger"
PARENT_TAG = "mlflow.parentRunId"  # what makes MLflow show a run nested under another
SWEEP_TAG = "vaegan.sweep"
TRIAL_TAG = "vaegan.trial_id"
# Higher is better for these; lower for the others.
MAXIMIZE = ("eval_ssim_recon", "eval_recognisable", "eval_recognisable_p50", "eval_recognisable_real",
            "images_per_s")
LOCAL_MIN_CPUS = 8  # logical CPUs of a local Ray (2 made a multi-trial sweep hang: docs/platform.md#ray-tune)


class TuneError(UserError, ValueError):
    """A sweep that cannot start as asked; the message says why and what to change."""


class SweepError(UserError, RuntimeError):
    """A sweep ran but some of its trials failed or did not finish; running it again resumes."""


@dataclass
class SweepOptions:
    """What `vaegan tune` takes besides the config (the config is the trials' base)."""

    name: str = ""
    """The sweep's name; empty: TRAIN_NAME-sweep. Starting a sweep again with its name resumes it."""
    trials: int = 0
    """Samples of the random dimensions, each with every grid point and seed; 0: 8 when the
    space has a random dimension, else 1 (a grid is run once)."""
    grid: dict[str, list] = field(default_factory=dict)
    """{dotted key: values}: every value is tried (Tune's grid_search)."""
    loguniform: dict[str, tuple[float, float]] = field(default_factory=dict)
    """{dotted key: (low, high)}: drawn log-uniformly."""
    uniform: dict[str, tuple[float, float]] = field(default_factory=dict)
    """{dotted key: (low, high)}: drawn uniformly."""
    seeds: int = 1
    """Repeats of every configuration, with train.seed + 0 .. seeds - 1."""
    gamma_min: float = 1e-7
    gamma_max: float = 1.0
    """The default search, when no grid or range is given: loss.gamma log-uniform in
    [gamma_min, gamma_max]."""
    lr_min: float | None = None
    lr_max: float | None = None
    """If both are set, optim.lr is drawn log-uniformly from [lr_min, lr_max] too."""
    scheduler: str = "asha"
    """asha (stop poor trials early) | fifo (run every trial to train.steps)."""
    workers_per_trial: int = 0
    """Ray Train workers per trial; 0: train.num_workers."""
    metric: str = COMPARE_METRIC
    """What ASHA and the choice of the best trial look at: a metric the loop reports."""
    mode: str = ""
    """min | max; empty: max for those in MAXIMIZE (SSIM, the recognisable shares, images_per_s),
    else min."""
    grace_period: int = 0
    """Steps every trial runs before ASHA may stop it; 0: about train.steps / 8, at least one
    report of the metric."""
    reduction_factor: float = 3.0
    """ASHA keeps the best 1 / reduction_factor of the trials at each rung."""
    max_concurrent: int = 1
    """Trials running at the same time (on 2 cores, one trial's workers already fill them)."""
    trial_cpus: float = 0.25
    """Logical CPUs of each trial's driver process (its workers ask train.cpus_per_worker each)."""
    seed: int = 0
    """Seed of the search (which gammas are drawn)."""
    compare: bool = False
    """After the sweep, score every completed trial's final model under one protocol and
    log a table and a figure of the configurations side by side (vaegan.compare)."""


@dataclass
class TrialRow:
    trial_id: str
    run_id: str
    params: dict[str, Any]
    """The searched keys' values for this trial."""
    status: str
    """completed | stopped early | failed | unfinished"""
    step: int
    reports: int
    """Results Tune received (those carrying the metric)."""
    value: float
    """The metric at the trial's last report."""
    checkpoint_path: str = ""
    error: str = ""


@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    tracking_uri: str
    metric: str
    mode: str
    rows: list[TrialRow] = field(default_factory=list)
    best: TrialRow | None = None
    challenger_uri: str = ""
    storage: str = ""
    comparison: str = ""
    """--compare: the configurations' table (markdown)."""

    @property
    def failed(self) -> list[TrialRow]:
        return [r for r in self.rows if r.status in ("failed", "unfinished")]


# ---------------------------------------------------------------------------------------
# Checks: everything that can be known before a trial starts


def reportable_metrics(cfg: Config) -> list[str]:
    """The metric names the worker loop reports with this config."""
    from vaegan.losses import StepMetrics

    names = [*StepMetrics._fields, "images_per_s", "skipped_samples"]
    if cfg.train.eval_every:
        from vaegan.evaluate import EvalMetrics

        names += [f"eval_{f}" for f in EvalMetrics._fields]
    return names


def _check_range(flag: str, lo: float, hi: float, log: bool = True) -> None:
    """flag: how the user gave the range, e.g. "--gamma-min A .. --gamma-max B" parts."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or (log and lo <= 0):
        raise TuneError(f"{flag}: a {'log-' if log else ''}uniform search range needs finite bounds"
                        + (" > 0" if log else ""))
    if lo > hi:
        raise TuneError(f"{flag}: the range is inverted ({lo:g} is above {hi:g}); swap them")
    if lo == hi:
        raise TuneError(f"{flag}: the range is empty ({lo:g} .. {hi:g}); widen it, or train once with "
                        "that value")


# The keys a sweep may not vary: they name, place or track the sweep's own runs, or (the
# attribute head's size) training sets them from the data.
FIXED_KEYS = ("train.name", "train.storage_path", "train.num_workers", "model.dis_attributes")


def search_spec(cfg: Config, opts: SweepOptions) -> dict[str, tuple[str, Any]]:
    """{dotted key: ("grid", values) | ("loguniform", (lo, hi)) | ("uniform", (lo, hi))}, each
    key and value checked against `cfg` (unknown keys and values the config rejects are named);
    train.seed as a grid when `opts.seeds` > 1. Without a grid or range: the gamma default."""
    space: dict[str, tuple[str, Any]] = {}
    if not (opts.grid or opts.loguniform or opts.uniform):
        _check_range(f"--gamma-min {opts.gamma_min:g} .. --gamma-max {opts.gamma_max:g}",
                     opts.gamma_min, opts.gamma_max)
        space["loss.gamma"] = ("loguniform", (opts.gamma_min, opts.gamma_max))
    if (opts.lr_min is None) != (opts.lr_max is None):
        raise TuneError("give both --lr-min and --lr-max to search the learning rate, or neither")
    if opts.lr_min is not None:
        _check_range(f"--lr-min {opts.lr_min:g} .. --lr-max {opts.lr_max:g}", opts.lr_min, opts.lr_max)
        space["optim.lr"] = ("loguniform", (opts.lr_min, opts.lr_max))
    for kind, given in (("grid", opts.grid), ("loguniform", opts.loguniform), ("uniform", opts.uniform)):
        for key, value in given.items():
            if key in space:
                raise TuneError(f"--{kind} {key}: {key} is already searched ({space[key][0]}); give it once")
            if key in FIXED_KEYS:
                raise TuneError(f"--{kind} {key}: a sweep sets {key} itself; it cannot be searched")
            if kind == "grid":
                space[key] = ("grid", _check_grid(cfg, key, list(value)))
            else:
                lo, hi = (float(v) for v in value)
                _check_range(f"--{kind} {key}={lo:g}:{hi:g}", lo, hi, log=kind == "loguniform")
                for end in (lo, hi):
                    _config_value(cfg, key, end, f"--{kind} {key}={lo:g}:{hi:g}")
                space[key] = (kind, (lo, hi))
    if opts.seeds > 1:
        if "train.seed" in space:
            raise TuneError("--seeds repeats every configuration over train.seed; do not search it too")
        space["train.seed"] = ("grid", [cfg.train.seed + i for i in range(opts.seeds)])
    return space


def _config_value(cfg: Config, key: str, value: Any, flag: str) -> Any:
    """`value` as the config holds it at `key` (coerced and validated), or a TuneError."""
    from vaegan.config import ConfigError, apply_overrides

    trial = config_from_dict(cfg.to_dict())
    try:
        apply_overrides(trial, {key: value}).validate()
    except ConfigError as e:
        raise TuneError(f"{flag}: {e}") from None
    section, _, name = key.partition(".")
    return getattr(getattr(trial, section), name)


def _check_grid(cfg: Config, key: str, values: list) -> list:
    if not values:
        raise TuneError(f"--grid {key}=: the grid is empty; give at least one value")
    typed = [_config_value(cfg, key, v, f"--grid {key}={v}") for v in values]
    if len(set(map(repr, typed))) != len(typed):
        raise TuneError(f"--grid {key}={','.join(map(str, values))}: a value is given twice")
    return typed


def check_options(cfg: Config, opts: SweepOptions) -> SweepOptions:
    """Validate the sweep against its base config; -> the options with defaults filled in."""
    opts = dataclasses.replace(opts)
    opts.name = opts.name or f"{cfg.train.name}-sweep"
    if "/" in opts.name:
        raise TuneError(f"--name {opts.name!r}: a sweep name cannot contain '/'")
    space = search_spec(cfg, opts)
    if "loss.gamma" in space and "loss.mode" not in space and "loss.recipe" not in space and (
            cfg.loss.mode != "vaegan" or cfg.loss.recipe != "paper"):
        raise TuneError(f"loss.gamma acts only with loss.mode=vaegan loss.recipe=paper (got "
                        f"{cfg.loss.mode}, {cfg.loss.recipe}); a sweep over it would train the same "
                        "model N times")
    random = any(kind != "grid" for kind, _ in space.values())
    opts.trials = opts.trials or (8 if random else 1)
    for flag, value in (("trials", opts.trials), ("max-concurrent", opts.max_concurrent),
                        ("seeds", opts.seeds)):
        if value < 1:
            raise TuneError(f"--{flag} {value}: it must be an integer >= 1")
    if opts.scheduler not in ("asha", "fifo"):
        raise TuneError(f"--scheduler {opts.scheduler!r}: choose one of: asha | fifo")
    opts.workers_per_trial = opts.workers_per_trial or cfg.train.num_workers
    if opts.workers_per_trial < 1:
        raise TuneError(f"--workers-per-trial {opts.workers_per_trial}: it must be an integer >= 1")
    if not opts.reduction_factor > 1:
        raise TuneError(f"--reduction-factor {opts.reduction_factor:g}: it must be > 1")
    if not opts.trial_cpus > 0:
        raise TuneError(f"trial_cpus={opts.trial_cpus:g}: it must be > 0")

    known = reportable_metrics(cfg)
    if opts.metric not in known:
        if opts.metric.startswith("eval_") and not cfg.train.eval_every:
            raise TuneError(f"--metric {opts.metric} is reported only by periodic evaluation, which is "
                            "off (train.eval_every=0): set train.eval_every=V (and train.eval_featurizer), "
                            "or pick a step metric such as --metric loss")
        raise TuneError(f"--metric {opts.metric!r}: no trial reports it; the loop reports: "
                        f"{', '.join(known)}")
    opts.mode = opts.mode or ("max" if opts.metric in MAXIMIZE else "min")
    if opts.mode not in ("min", "max"):
        raise TuneError(f"--mode {opts.mode!r}: choose one of: min | max")

    if opts.scheduler != "asha":  # fifo judges trials at their end only
        return opts
    # ASHA's time axis is the step; the metric arrives every `every` steps (and at the end).
    T = cfg.train
    every = T.eval_every if opts.metric.startswith("eval_") else T.log_every
    if every >= T.steps:
        raise TuneError(f"{opts.metric} is reported only at the last step (every {every} steps, "
                        f"train.steps={T.steps}): ASHA could not compare trials before they end; lower "
                        f"train.{'eval_every' if opts.metric.startswith('eval_') else 'log_every'}")
    if not opts.grace_period:
        opts.grace_period = max(every, T.steps // 8 // every * every)
    if not 1 <= opts.grace_period < T.steps:
        raise TuneError(f"--grace-period {opts.grace_period}: it must be in 1 .. train.steps - 1 = "
                        f"{T.steps - 1} (ASHA never stops a trial before its grace period)")
    if opts.grace_period < every and every < T.steps:
        print(f"[vaegan] note: {opts.metric} is reported every {every} steps, so ASHA first "
              f"compares trials at step {every}, not {opts.grace_period}", flush=True)
    return opts


def _check_featurizer(featurizer: str, metric: str) -> None:
    """The featurizer loads (before any trial fails on it); eval_recognisable needs a softmax one."""
    if not featurizer:
        return
    from vaegan.featurizer import load_featurizer

    kind = load_featurizer(featurizer).kind
    if metric == "eval_recognisable" and kind != "softmax":
        raise TuneError(f"--metric eval_recognisable needs a softmax (class) featurizer; "
                        f"{featurizer} is {kind}: pick eval_fid_samples or another metric")


def total_trials(cfg: Config, opts: SweepOptions) -> int:
    """opts.trials samples x every grid point (seeds included)."""
    grids = [len(arg) for kind, arg in search_spec(cfg, opts).values() if kind == "grid"]
    return opts.trials * math.prod(grids)


def per_trial_cpus(cfg: Config, opts: SweepOptions) -> float:
    return opts.trial_cpus + opts.workers_per_trial * cfg.train.cpus_per_worker


def check_resources(cfg: Config, opts: SweepOptions) -> None:
    """A clear error instead of trials that wait forever for CPUs (or GPUs) nobody has."""
    from vaegan import cluster

    concurrent = min(opts.max_concurrent, total_trials(cfg, opts))
    k, cpw = opts.workers_per_trial, cfg.train.cpus_per_worker
    cluster.check_resources(
        concurrent * per_trial_cpus(cfg, opts), concurrent * k if cfg.train.use_gpu else 0,
        asked=f"--max-concurrent {concurrent} trials x ({opts.trial_cpus:g} CPU for the trial + {k} "
              f"workers x train.cpus_per_worker={cpw:g})",
        fix="lower --max-concurrent, --workers-per-trial or train.cpus_per_worker, or add nodes")


# ---------------------------------------------------------------------------------------
# The driver: one trial


def _check_attribute_head(cfg: Config, opts: SweepOptions) -> list[str]:
    """The shards' binary attributes, for the trials that train Dis's attribute head
    (loss.attribute_weight > 0, as set or as searched); a sweep where one would train it on
    shards without them is refused before any trial starts."""
    from vaegan.train import TrainError, binary_attributes, resolve_attribute_head

    space = search_spec(cfg, opts)
    weights = space.get("loss.attribute_weight", ("grid", [cfg.loss.attribute_weight]))[1]
    modes = space.get("loss.mode", ("grid", [cfg.loss.mode]))[1]
    if not any(weights) and not cfg.model.dis_attributes:
        return []  # no trial has the head: no labels to read
    attributes = binary_attributes(cfg.data.shards, cfg.data.s3_endpoint)
    for weight in weights:  # a grid's values, or a range's two ends
        for mode in modes:
            trial = config_from_dict(cfg.to_dict())
            trial.loss.attribute_weight, trial.loss.mode = float(weight), mode
            try:
                resolve_attribute_head(trial, attributes)
            except TrainError as e:
                raise TuneError(f"loss.attribute_weight={weight:g}, loss.mode={mode} in this sweep: "
                                f"{e}") from None
    return attributes


def _trial_dirname(trial) -> str:
    return trial.trial_id  # short folders: the default name spells out every parameter


def trial_config(base: dict, params: dict, name: str) -> Config:
    """The trial's config: the sweep's base with the searched values and the trial's name."""
    from vaegan.config import apply_overrides

    cfg = apply_overrides(config_from_dict(base), params)
    cfg.train.name = name
    return cfg.validate()


def forwards(metric: str, steps: int, report: dict) -> bool:
    """Which of rank 0's reports reach Tune: those that carry the sweep's metric (Tune rejects
    results without it; eval_* come only every train.eval_every steps), except the last
    step's (train.steps, or "last" where train.minutes ran out): a trial that ASHA stops is
    killed at once, and after the last report rank 0 still logs to MLflow. `driver_fn`
    reports the last step itself once training has returned."""
    return metric in report and report.get("step", 0) < steps and not report.get("last")


def _report_callback(metric: str, steps: int):
    from ray.tune.integration.ray_train import TuneReportCallback

    class SweepReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if forwards(metric, steps, metrics[0]):
                super().after_report(run_context, metrics, checkpoint)

    return SweepReportCallback()


def driver_fn(config: dict, ctx: dict) -> None:
    """One trial: an MLflow child run of the sweep's parent run and a TorchTrainer named
    SWEEP-TRIAL_ID (so a resumed sweep resumes the trial's training run). Runs in the trial's
    process: use ray.tune here, not ray.train."""
    import mlflow
    import ray.tune

    from vaegan.cluster import storage_for
    from vaegan.tracking import start_or_resume_run
    from vaegan.train import FAULT_ENV, build_trainer, resolve_attribute_head

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(ctx["cfg"], config, f"{ctx['name']}-{trial_id}")
    resolve_attribute_head(cfg, ctx["attributes"])  # per trial: the space may search the weight
    cfg.train.num_workers = ctx["workers"]
    storage = storage_for(ctx["trials_storage"], cfg.data.s3_endpoint)  # the sweep checked it
    cfg.train.storage_path = storage.url
    uri = cfg.tracking.tracking_uri
    run_id = start_or_resume_run(uri, cfg.tracking.experiment, cfg.train.name, cfg.flat())
    client = mlflow.MlflowClient(uri)
    for key, value in ((PARENT_TAG, ctx["parent_run_id"]), (SWEEP_TAG, ctx["name"]),
                       (TRIAL_TAG, trial_id)):
        client.set_tag(run_id, key, value)
    if ctx["fault"]:  # fault injection (tests, drills): see vaegan.train.FAULT_ENV
        os.environ[FAULT_ENV] = ctx["fault"]
    metric, steps = ctx["metric"], cfg.train.steps
    trainer = build_trainer(cfg, run_id, uri, ctx["featurizer"], storage,
                            callbacks=[_report_callback(metric, steps)], register=False)
    result = trainer.fit()  # raises if training failed: the trial fails
    final = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    if metric not in final:  # None at times (docs/platform.md#ray-train): read it from the child run
        final.update(client.get_run(run_id).data.metrics)
    final.setdefault("step", steps)  # earlier than train.steps where train.minutes ran out
    final["last"] = 1.0  # training returned: this is the trial's final step
    final["checkpoint_path"] = result.checkpoint.path if result.checkpoint else ""
    ray.tune.report(final)


# ---------------------------------------------------------------------------------------
# The sweep


def search_space(space: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    """Tune's param_space for a checked `search_spec`."""
    from ray import tune

    make = {"grid": tune.grid_search, "loguniform": lambda r: tune.loguniform(*r),
            "uniform": lambda r: tune.uniform(*r)}
    return {key: make[kind](arg) for key, (kind, arg) in space.items()}


def describe(space: dict[str, tuple[str, Any]]) -> str:
    """'loss.mode in {vae, vaegan}, loss.gamma log-uniform in [1e-07, 1]' for the console."""
    parts = []
    for key, (kind, arg) in space.items():
        if kind == "grid":
            parts.append(f"{key} in {{{', '.join(map(str, arg))}}}")
        else:
            parts.append(f"{key} {'log-' if kind == 'loguniform' else ''}uniform in [{arg[0]:g}, {arg[1]:g}]")
    return ", ".join(parts)


def _sweep_params(cfg: Config, opts: SweepOptions) -> dict[str, Any]:
    """The parent run's params: the trials' base config, the sweep's options and its space."""
    import json

    return {**cfg.redacted().flat(), **{f"tune.{k}": v for k, v in dataclasses.asdict(opts).items()},
            "tune.space": json.dumps(search_spec(cfg, opts))}


def _parent_run(uri: str, cfg: Config, opts: SweepOptions) -> str:
    """Create the sweep's parent run, or find it again (by name); a resumed sweep must be the
    same sweep, and a training run of that name is not one."""
    import mlflow

    from vaegan.tracking import check_reachable, start_or_resume_run

    params = {k: str(v) for k, v in _sweep_params(cfg, opts).items()}
    check_reachable(uri)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    found = exp and client.search_runs([exp.experiment_id], max_results=1,
                                       filter_string=f"tags.`{RUN_NAME_TAG}` = '{opts.name}'",
                                       order_by=["attributes.start_time DESC"])
    if found:
        before = found[0].data.params
        if "tune.trials" not in before:
            raise TuneError(f"experiment {cfg.tracking.experiment} has a training run named {opts.name}; "
                            "give the sweep another --name")
        changed = [f"{k}: {before[k]} -> {v}" for k, v in params.items() if k in before and before[k] != v]
        if changed:
            raise TuneError(f"sweep {opts.name} exists with other settings ({'; '.join(changed[:5])}); "
                            "resume it with its own settings, or start another with --name")
    run_id = start_or_resume_run(uri, cfg.tracking.experiment, opts.name, params)
    client.set_tag(run_id, SWEEP_TAG, opts.name)
    return run_id


def sweep(cfg: Config, opts: SweepOptions) -> SweepResult:
    """Check, then run (or resume) the sweep on Ray; summarise it in MLflow and register the
    best completed trial as `challenger`. Blocks until done; a local Ray started for it is
    shut down in order before it returns (`cluster.shutdown`)."""
    from vaegan import cluster

    with cluster.session():
        return _sweep(cfg, opts)


def _sweep(cfg: Config, opts: SweepOptions) -> SweepResult:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from vaegan import cluster
    from vaegan.tracking import resolve_tracking_uri
    from vaegan.train import FAULT_ENV, remove_torn_checkpoints, resolve_data, resolve_featurizer

    cfg = config_from_dict(cfg.to_dict())  # the caller's config stays as it was
    opts = check_options(cfg, opts)
    cfg.data.shards = resolve_data(cfg)
    attributes = _check_attribute_head(cfg, opts)
    featurizer = resolve_featurizer(cfg, "--compare" if opts.compare else "")
    if featurizer and "://" not in featurizer:
        featurizer = str(Path(featurizer).resolve())  # trials and workers run in other folders
    _check_featurizer(featurizer, opts.metric)
    cfg.tracking.tracking_uri = uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    # Logical CPUs to spare: a trial's resources are freed a little after it ends, and a local
    # Ray sized exactly made the next trial wait forever (docs/platform.md#ray-tune).
    concurrent = min(opts.max_concurrent, total_trials(cfg, opts))
    cluster.connect(2 * concurrent * per_trial_cpus(cfg, opts), min_cpus=LOCAL_MIN_CPUS)
    check_resources(cfg, opts)
    storage = cluster.resolve_storage(cfg.train.storage_path, cfg.data.s3_endpoint,
                                      shared=cfg.train.shared_storage)
    parent = _parent_run(uri, cfg, opts)

    trials = storage.child(f"{opts.name}-trials")
    ctx = {"cfg": cfg.to_dict(), "name": opts.name, "parent_run_id": parent, "metric": opts.metric,
           "workers": opts.workers_per_trial, "featurizer": featurizer,
           "trials_storage": trials.url, "attributes": attributes,
           "fault": os.environ.get(FAULT_ENV, "")}
    trainable = tune.with_resources(tune.with_parameters(driver_fn, ctx=ctx), {"CPU": opts.trial_cpus})
    path = f"{storage.path}/{opts.name}"
    if tune.Tuner.can_restore(path, storage_filesystem=storage.filesystem):
        print(redact_text(f"[vaegan] resuming sweep {opts.name} from {path}"), flush=True)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, storage_filesystem=storage.filesystem)
    else:
        space = search_spec(cfg, opts)
        stopping = (f"ASHA on {opts.metric} ({opts.mode}) from step {opts.grace_period}"
                    if opts.scheduler == "asha" else f"every trial to step {cfg.train.steps}")
        print(f"[vaegan] sweep {opts.name}: {total_trials(cfg, opts)} trials over {describe(space)}, "
              f"{opts.workers_per_trial} worker(s) each, {stopping}, MLflow parent run {parent}", flush=True)
        tuner = tune.Tuner(
            trainable, param_space=search_space(space),
            tune_config=tune.TuneConfig(
                metric=opts.metric, mode=opts.mode, num_samples=opts.trials,
                reuse_actors=False,  # a trial's process dies with it (and its trainer's workers)
                # the concurrency limit goes here: Tune ignores max_concurrent_trials with a generator
                search_alg=BasicVariantGenerator(random_state=opts.seed, max_concurrent=opts.max_concurrent),
                scheduler=ASHAScheduler(time_attr="step", max_t=cfg.train.steps,
                                        grace_period=opts.grace_period,
                                        reduction_factor=opts.reduction_factor)
                if opts.scheduler == "asha" else FIFOScheduler(),
                trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(name=opts.name, storage_path=storage.path,
                                      storage_filesystem=storage.filesystem, verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=0)))
    with cluster.credentials_kept_from_tune():  # else Ray logs them (see there)
        grid = tuner.fit()
    res = SweepResult(opts.name, parent, uri, opts.metric, opts.mode, storage=storage.child(opts.name).url)
    res.rows = _rows(grid, cfg, opts)
    for row in res.rows:
        if row.status == "stopped early":  # ASHA killed it wherever it was; no one resumes it
            remove_torn_checkpoints(trials.child(f"{opts.name}-{row.trial_id}"))
    _summarise(res, cfg, opts)
    if opts.compare:
        res.comparison = _compare(res, cfg, featurizer, storage.url)
    return res


def _compare(res: SweepResult, cfg: Config, featurizer: str, storage_url: str) -> str:
    """Score the completed trials side by side (vaegan.compare); table and figure to the
    parent run. -> the table."""
    import mlflow

    from vaegan import compare

    trials = config_from_dict(cfg.to_dict())
    trials.train.storage_path = storage_url  # the filesystem the trials' checkpoints are on
    print(f"[vaegan] comparing the completed trials of sweep {res.name} (final models, "
          f"up to {compare.FID_N} held-out images each)", flush=True)
    scored, real = compare.score_trials(res.rows, trials, featurizer)
    configs = compare.group(scored)
    table = compare.format_table(configs)
    client = mlflow.MlflowClient(res.tracking_uri)
    client.log_text(res.parent_run_id, table, "sweep/comparison.md")
    client.log_dict(res.parent_run_id, compare.as_json(configs), "sweep/comparison.json")
    client.log_figure(res.parent_run_id, compare.figure(configs, real), "sweep/comparison.png")
    return table


def _rows(grid, cfg: Config, opts: SweepOptions) -> list[TrialRow]:
    """One row per trial, from Tune's results and the trials' MLflow child runs."""
    import mlflow

    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    experiment_id = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    keys = list(search_spec(cfg, opts))  # the searched keys, as each trial's params
    rows = []
    for result in grid:
        m = result.metrics or {}
        trial_id = m.get("trial_id") or _trial_id_from_path(result.path)
        run = client.search_runs([experiment_id], max_results=1,
                                 filter_string=f"tags.`{RUN_NAME_TAG}` = '{opts.name}-{trial_id}'")
        step = int(m.get("step", 0))
        if result.error:
            status = "failed"
        elif not m.get("done"):
            status = "unfinished"
        else:
            # "last": the run's final step (train.steps, or where train.minutes ran out)
            status = "completed" if m.get("last") or step >= cfg.train.steps else "stopped early"
        history = result.metrics_dataframe
        rows.append(TrialRow(
            trial_id=trial_id, run_id=run[0].info.run_id if run else "",
            params={k: result.config[k] for k in keys if k in result.config},
            status=status, step=step, reports=0 if history is None else len(history),
            value=float(m.get(opts.metric, math.nan)), checkpoint_path=m.get("checkpoint_path", ""),
            error="" if not result.error else str(result.error).strip().splitlines()[-1][:300]))
    return sorted(rows, key=lambda r: r.trial_id)


def _trial_id_from_path(path: str) -> str:
    found = re.search(r"([0-9a-f]{5}_\d{5})", os.path.basename(str(path).rstrip("/")))
    return found.group(1) if found else os.path.basename(str(path))


def best_row(rows: list[TrialRow], mode: str) -> TrialRow | None:
    """The best completed trial (trials ASHA stopped were judged on fewer steps)."""
    done = [r for r in rows if r.status == "completed" and math.isfinite(r.value)]
    if not done:
        return None
    return (min if mode == "min" else max)(done, key=lambda r: r.value)


def _summarise(res: SweepResult, cfg: Config, opts: SweepOptions) -> None:
    """On the parent run: the table, the plot, the best trial; child runs get their final
    status; the best completed trial's model is registered as `challenger`."""
    import mlflow

    client = mlflow.MlflowClient(res.tracking_uri)
    for r in res.rows:
        if not r.run_id:
            continue
        client.set_tag(r.run_id, "vaegan.tune.status", r.status)
        if r.status == "stopped early":  # its workers were killed mid-run: the run stays RUNNING
            client.set_terminated(r.run_id, status="KILLED")
        elif r.status == "failed":
            client.set_terminated(r.run_id, status="FAILED")
    space = search_spec(cfg, opts)
    keys = list(space)
    table = {k: [getattr(r, k) for r in res.rows]
             for k in ("trial_id", "run_id", "status", "step", "reports")}
    table.update({k: [r.params.get(k) for r in res.rows] for k in keys})
    table[opts.metric] = [r.value for r in res.rows]
    table["error"] = [r.error for r in res.rows]
    client.log_table(res.parent_run_id, data=table, artifact_file="sweep/trials.json")
    client.log_text(res.parent_run_id, format_table(res), "sweep/trials.md")
    x = keys[0]
    client.log_figure(res.parent_run_id, plot(res, opts, x, space[x][0]),
                      f"sweep/{opts.metric}_vs_{x.rpartition('.')[2]}.png")
    res.best = best_row(res.rows, opts.mode)
    if res.best:
        b = res.best
        client.log_metric(res.parent_run_id, f"best_{opts.metric}", b.value)
        for key, value in (("best_trial", b.trial_id), ("best_run_id", b.run_id),
                           *((f"best.{k}", _show(v)) for k, v in b.params.items())):
            client.set_tag(res.parent_run_id, f"vaegan.tune.{key}", value)
        res.challenger_uri = register_challenger(b, cfg, res.tracking_uri)
        client.set_tag(res.parent_run_id, "vaegan.tune.challenger", res.challenger_uri)
    unfinished = [r for r in res.rows if r.status == "unfinished"]
    client.set_terminated(res.parent_run_id, status="KILLED" if unfinished else
                          "FAILED" if res.failed or not res.best else "FINISHED")


def register_challenger(best: TrialRow, cfg: Config, uri: str) -> str:
    """Log the best trial's final checkpoint as the model of its child run and register it
    under tracking.model_name with the alias `challenger` (once: a resumed, already finished
    sweep finds it there)."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from ray.train import Checkpoint

    from vaegan.cluster import storage_for
    from vaegan.registry import register
    from vaegan.tracking import log_folder_model, start_run_by_id

    name = cfg.tracking.model_name
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    try:
        if client.get_model_version_by_alias(name, CHALLENGER).run_id == best.run_id:
            return f"models:/{name}@{CHALLENGER}"
    except MlflowException:
        pass  # no challenger yet
    if not best.checkpoint_path:
        raise SweepError(f"trial {best.trial_id} reported no final checkpoint; cannot register it")
    fs = storage_for(cfg.train.storage_path, cfg.data.s3_endpoint).filesystem
    checkpoint = Checkpoint(best.checkpoint_path, filesystem=fs)
    with checkpoint.as_directory() as d, start_run_by_id(best.run_id):
        info = log_folder_model(d, name="model", step=best.step)
    return register(info.model_uri, name, alias=CHALLENGER)


def _show(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def format_table(res: SweepResult) -> str:
    """The trials as a markdown table, best first (completed, then the rest)."""
    sign = 1 if res.mode == "min" else -1
    order = {"completed": 0, "stopped early": 1, "failed": 2, "unfinished": 3}
    rows = sorted(res.rows, key=lambda r: (order[r.status], sign * r.value if math.isfinite(r.value)
                                           else math.inf))
    keys = list(dict.fromkeys(k for r in res.rows for k in r.params))
    lines = [f"| trial | {' | '.join(keys)} | status | step | {res.metric} | MLflow run |",
             "|---|" + "---|" * len(keys) + "---|---|---|---|"]
    for r in rows:
        best = " (best)" if res.best and r.trial_id == res.best.trial_id else ""
        values = " | ".join(_show(r.params.get(k, "")) for k in keys)
        lines.append(f"| {r.trial_id}{best} | {values} | {r.status} | {r.step} | {r.value:.5g} | "
                     f"{r.run_id} |")
    return "\n".join(lines) + "\n"


def plot(res: SweepResult, opts: SweepOptions, key: str, kind: str):
    """The metric at each trial's last report against the first searched key (a log axis for a
    log-uniform range, one column per value for a grid); marker by status."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = sorted({repr(r.params.get(key)) for r in res.rows}) if kind == "grid" else []
    position = (lambda r: values.index(repr(r.params.get(key)))) if kind == "grid" else (
        lambda r: r.params.get(key))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    styles = {"completed": ("o", "tab:blue"), "stopped early": ("x", "tab:orange"),
              "failed": ("v", "tab:red"), "unfinished": ("s", "tab:grey")}
    for status, (marker, color) in styles.items():
        rows = [r for r in res.rows if r.status == status and math.isfinite(r.value)]
        if rows:
            ax.scatter([position(r) for r in rows], [r.value for r in rows], marker=marker, color=color,
                       label=f"{status} ({len(rows)})")
            if status != "completed":  # judged at an earlier step than the completed ones
                for r in rows:
                    ax.annotate(f"step {r.step}", (position(r), r.value), fontsize=7,
                                xytext=(4, 4), textcoords="offset points")
    best = best_row(res.rows, opts.mode)
    if best:
        ax.scatter([position(best)], [best.value], s=160, facecolors="none", edgecolors="k",
                   label=f"best: {key}={_show(best.params.get(key))}")
    if kind == "grid":
        ax.set_xticks(range(len(values)), [v.strip("'") for v in values])
        ax.set_xlim(-0.5, len(values) - 0.5)
    elif kind == "loguniform":
        ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel(f"{opts.metric} at the trial's last report")
    ax.set_title(f"sweep {res.name}: {opts.metric} ({opts.mode}) vs {key}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    plt.close(fig)
    return fig


def main_tune(cfg: Config, opts: SweepOptions) -> SweepResult:
    """What `vaegan tune` and jobs/tune.py run: sweep, then say where everything is."""
    res = sweep(cfg, opts)
    print(redact_text(f"\n[vaegan] sweep {res.name}: {res.metric} ({res.mode})\n{format_table(res)}"
                      f"  MLflow parent run: {res.parent_run_id} ({res.tracking_uri})\n"
                      f"  sweep storage:     {res.storage} (trials' checkpoints: {res.storage}-trials)"),
          file=sys.stdout, flush=True)
    if res.comparison:
        print(f"\n[vaegan] the completed trials' final models side by side (mean ± half the range "
              f"over seeds; also sweep/comparison.md and .png in the parent run):\n{res.comparison}",
              flush=True)
    if res.best:
        chosen = ", ".join(f"{k}={_show(v)}" for k, v in res.best.params.items())
        print(f"  challenger:        {res.challenger_uri} (trial {res.best.trial_id}, {chosen})", flush=True)
    if res.failed:
        why = "; ".join(f"{r.trial_id}: {r.error or r.status}" for r in res.failed)
        raise SweepError(f"sweep {res.name}: {len(res.failed)} of {len(res.rows)} trials failed or did "
                         f"not finish ({why}); run the same command again to resume them")
    if not res.best:
        raise SweepError(f"sweep {res.name}: no trial completed with {res.metric}; nothing registered")
    return res


__all__ = ["SweepOptions", "SweepResult", "TuneError", "SweepError", "sweep", "main_tune", "driver_fn",
           "check_options", "reportable_metrics"]

