"""The Ray Tune sweep: a real 3-trial sweep (ASHA, one TorchTrainer per trial) on a real local
Ray, tracked in a real MLflow server; and the bad-input checks, which need neither."""

from __future__ import annotations

import dataclasses
import json
import math

import mlflow
import numpy as np
import pytest
from servers import own_lines

from vaegan.cli import main
from vaegan.cluster import ClusterError
from vaegan.config import load_config
from vaegan.train import FAULT_ENV
from vaegan.tune import (
    SweepOptions,
    TuneError,
    check_options,
    forwards,
    reportable_metrics,
    search_spec,
    sweep,
    total_trials,
)

# ---------------------------------------------------------------------------------------
# Bad input: clear messages before anything starts (no Ray, no MLflow)


@pytest.mark.parametrize("lo, hi, match", [
    (1.0, 1e-3, "range is inverted"),
    (1e-2, 1e-2, "range is empty"),
    (0.0, 1.0, "finite bounds > 0"),
    (1e-3, math.inf, "finite bounds > 0"),
])
def test_bad_gamma_range_is_a_clear_error(lo, hi, match):
    with pytest.raises(TuneError, match=match):
        check_options(load_config("debug"), SweepOptions(gamma_min=lo, gamma_max=hi))


def test_lr_range_needs_both_bounds_and_a_proper_range():
    cfg = load_config("debug", overrides=["train.eval_every=5"])
    with pytest.raises(TuneError, match="both --lr-min and --lr-max"):
        check_options(cfg, SweepOptions(lr_min=1e-4))
    with pytest.raises(TuneError, match="--lr-min 0.001 .. --lr-max 0.0001: the range is inverted"):
        check_options(cfg, SweepOptions(lr_min=1e-3, lr_max=1e-4))


def test_a_metric_no_trial_reports_is_a_clear_error():
    cfg = load_config("debug")  # eval_every=0: no eval_* metrics
    with pytest.raises(TuneError, match=r"eval_fid_samples is reported only by periodic evaluation.*"
                                        r"train.eval_every=0"):
        check_options(cfg, SweepOptions())
    with pytest.raises(TuneError, match=r"--metric 'fid'.*no trial reports it.*kl_prior"):
        check_options(cfg, SweepOptions(metric="fid"))
    with_eval = load_config("debug", overrides=["train.eval_every=5"])
    assert "eval_ssim_recon" in reportable_metrics(with_eval)
    assert check_options(with_eval, SweepOptions(metric="eval_ssim_recon")).mode == "max"
    assert check_options(with_eval, SweepOptions()).mode == "min"


def test_defaults_cover_paper_and_reference_gammas_and_fill_in():
    opts = check_options(load_config("debug", overrides=["train.eval_every=5", "train.steps=40"]),
                         SweepOptions())
    assert opts.gamma_min <= 1e-6 and opts.gamma_max >= 1.0  # reference w/(1-w) ~ 1e-6; paper 1e-2..1
    assert opts.name == "debug-sweep" and opts.workers_per_trial == 2
    assert opts.grace_period == 5  # the first eval report


def test_other_bad_options_are_clear_errors():
    cfg = load_config("debug", overrides=["train.eval_every=5"])
    with pytest.raises(TuneError, match="--grace-period 20: it must be in 1 .. train.steps - 1 = 19"):
        check_options(cfg, SweepOptions(grace_period=20))
    with pytest.raises(TuneError, match="--trials -1"):
        check_options(cfg, SweepOptions(trials=-1))
    with pytest.raises(TuneError, match="--max-concurrent 0"):
        check_options(cfg, SweepOptions(max_concurrent=0))
    with pytest.raises(TuneError, match="--reduction-factor 1"):
        check_options(cfg, SweepOptions(reduction_factor=1))
    rare = load_config("debug", overrides=["train.steps=8", "train.log_every=10"])
    with pytest.raises(TuneError, match="loss is reported only at the last step"):
        check_options(rare, SweepOptions(metric="loss"))
    reference = load_config("celeba64-reference", overrides=["train.eval_every=5"])
    with pytest.raises(TuneError, match="loss.gamma acts only with .*recipe=paper"):
        check_options(reference, SweepOptions())


def test_a_space_over_any_key_is_checked_before_any_trial():
    cfg = load_config("debug", overrides=["train.eval_every=5"])
    opts = check_options(cfg, SweepOptions(grid={"loss.mode": ["vae", "vaegan", "gan"]},
                                           loguniform={"optim.lr": (1e-4, 1e-3)}, seeds=2, trials=2))
    assert search_spec(cfg, opts) == {"loss.mode": ("grid", ["vae", "vaegan", "gan"]),
                                      "optim.lr": ("loguniform", (1e-4, 1e-3)),
                                      "train.seed": ("grid", [0, 1])}
    assert total_trials(cfg, opts) == 2 * 3 * 2
    assert check_options(cfg, SweepOptions(grid={"loss.mode": ["vae", "gan"]})).trials == 1  # a grid: once
    assert search_spec(cfg, check_options(cfg, SweepOptions())) == {"loss.gamma": ("loguniform", (1e-7, 1.0))}
    # values come out as the config types them (a YAML 1.1 float string from the CLI, an int)
    assert search_spec(cfg, SweepOptions(grid={"optim.lr": ["1e-3", 2]}))["optim.lr"] == ("grid", [1e-3, 2.0])


@pytest.mark.parametrize("space, match", [
    ({"grid": {"loss.modee": ["vae"]}}, r"--grid loss.modee=vae: unknown config key 'loss.modee'"),
    ({"grid": {"loss.mode": ["vae", "bogus"]}}, r"--grid loss.mode=bogus: loss.mode='bogus' is not allowed"),
    ({"grid": {"loss.mode": []}}, r"--grid loss.mode=: the grid is empty"),
    ({"grid": {"loss.mode": ["vae", "vae"]}}, r"a value is given twice"),
    ({"loguniform": {"loss.gamma": (1.0, 1.0)}}, r"--loguniform loss.gamma=1:1: the range is empty"),
    ({"loguniform": {"loss.gamma": (0.0, 1.0)}}, r"--loguniform loss.gamma=0:1: .*finite bounds > 0"),
    ({"uniform": {"optim.lr": (1e-3, 1e-4)}}, r"--uniform optim.lr=0.001:0.0001: the range is inverted"),
    ({"uniform": {"optim.lr": (-1.0, 1.0)}}, r"--uniform optim.lr=-1:1: optim.lr=-1"),
    ({"grid": {"train.name": ["a", "b"]}}, r"--grid train.name: a sweep sets train.name itself"),
    ({"grid": {"model.dis_attributes": [0, 5]}}, r"--grid model.dis_attributes: a sweep sets"),
    ({"grid": {"loss.gamma": [0.1]}, "loguniform": {"loss.gamma": (1e-3, 1.0)}},
     r"loss.gamma is already searched"),
])
def test_bad_spaces_are_refused_naming_the_key(space, match):
    cfg = load_config("debug", overrides=["train.eval_every=5"])
    with pytest.raises(TuneError, match=match):
        check_options(cfg, SweepOptions(**space))


def test_a_sweep_that_would_train_an_attribute_head_on_digits_is_refused(tmp_path, mnist_shards):
    """Before Ray, MLflow or any trial: mnist's label is a digit, not a yes/no attribute."""
    cfg = sweep_cfg(tmp_path, mnist_shards, "http://127.0.0.1:9")
    with pytest.raises(TuneError, match=r"loss.attribute_weight=0.5, loss.mode=vaegan in this sweep: "
                                        r".*needs binary"):
        sweep(cfg, SweepOptions(name="attr", grid={"loss.attribute_weight": [0, 0.5]}, metric="loss"))


def test_cli_parses_spaces(capsys):
    code = main(["tune", "--preset", "debug", "train.eval_every=5", "--grid", "loss.mode=vae,bogus"])
    assert code == 2 and "--grid loss.mode=bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tune", "--loguniform", "loss.gamma=1e-4"])  # not LOW:HIGH: argparse's usage error
    assert "is not KEY=LOW:HIGH" in capsys.readouterr().err


def test_tune_sees_reports_with_the_metric_but_not_the_last_step():
    assert forwards("loss", 8, {"loss": 1.0, "step": 2})
    assert not forwards("eval_fid_samples", 8, {"loss": 1.0, "step": 2})  # not an eval step
    assert forwards("eval_fid_samples", 8, {"loss": 1.0, "eval_fid_samples": 3.0, "step": 4})
    assert not forwards("loss", 8, {"loss": 1.0, "step": 8})  # the driver reports it after fit
    assert not forwards("loss", 8, {"loss": 1.0, "step": 5, "last": 1.0})  # train.minutes ran out


def test_cli_prints_one_line_and_exits_2(capsys):
    code = main(["tune", "--preset", "debug", "train.eval_every=5", "--gamma-min", "1",
                 "--gamma-max", "0.01"])
    err = own_lines(capsys.readouterr().err)
    assert code == 2
    assert err.startswith("vaegan: error: --gamma-min 1 .. --gamma-max 0.01: the range is inverted")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("where", ["folder", pytest.param("s3", marks=pytest.mark.slow)])
def test_a_stopped_trial_loses_its_unfinished_checkpoints_and_keeps_the_rest(where, tmp_path, request,
                                                                              capsys):
    """A trial that ASHA stopped mid-write keeps a .tmp folder (written in place) or an S3
    upload cut short (no manifest, or one listing files that are not there, as S3's parallel
    upload leaves it). Whole checkpoints, the ones Ray's index holds and other files stay."""
    import s3fs

    from vaegan.cluster import storage_for
    from vaegan.train import RAY_INDEX, remove_torn_checkpoints

    root = request.getfixturevalue("s3_bucket") if where == "s3" else tmp_path
    url = f"{root}/sw-trials/sw-a"
    files = s3fs.S3FileSystem() if where == "s3" else None
    manifest = json.dumps({"step": 1, "files": {"model.pt": {"bytes": 1, "sha256": ""}}})
    held = ("checkpoint_1", "checkpoint_5")
    index = json.dumps({"checkpoint_results": [{"checkpoint_dir_name": n} for n in held]})
    tree = {"checkpoint_1/manifest.json": manifest, "checkpoint_1/model.pt": "w",
            "checkpoint_2.tmp/model.pt": "w",  # killed before its rename
            "checkpoint_3/model.pt": "w",  # upload cut short before the manifest
            "checkpoint_4/manifest.json": manifest, "checkpoint_4/state.json": "{}",  # before model.pt
            "checkpoint_5/model.pt": "w",  # Ray's: not ours to judge
            RAY_INDEX: index, "notes/model.pt": "w"}
    for name, text in tree.items():
        if files:
            files.pipe(f"{url}/{name}", text.encode())
        else:
            (tmp_path / "sw-trials" / "sw-a" / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "sw-trials" / "sw-a" / name).write_text(text)
    remove_torn_checkpoints(storage_for(url))
    if files:
        files.invalidate_cache()
        left = sorted(f.removeprefix(url.removeprefix("s3://") + "/") for f in files.find(url))
    else:
        left = sorted(p.relative_to(tmp_path / "sw-trials" / "sw-a").as_posix()
                      for p in (tmp_path / "sw-trials" / "sw-a").rglob("*") if p.is_file())
    assert left == sorted(["checkpoint_1/manifest.json", "checkpoint_1/model.pt", "checkpoint_5/model.pt",
                           RAY_INDEX, "notes/model.pt"])
    assert capsys.readouterr().out.count("removing the unfinished checkpoint") == 3
    # a trial stopped before its first checkpoint has neither folders nor Ray's index; one
    # stopped in the middle of its first has a .tmp folder and no index yet
    remove_torn_checkpoints(storage_for(f"{root}/sw-trials/sw-none"))
    first = tmp_path / "sw-trials" / "sw-first" / "checkpoint_1.tmp"
    first.mkdir(parents=True)
    (first / "model.pt").write_text("w")
    remove_torn_checkpoints(storage_for(str(tmp_path / "sw-trials" / "sw-first")))
    assert not first.exists()
    out = capsys.readouterr().out
    assert "warning" not in out and out.count("removing the unfinished checkpoint") == 1, out


# ---------------------------------------------------------------------------------------
# Real sweeps


def sweep_cfg(tmp_path, shards, uri, *extra):
    return load_config("debug", overrides=[
        f"data.shards={shards}", f"train.storage_path={tmp_path / 'runs'}", f"tracking.tracking_uri={uri}",
        "train.steps=8", "train.log_every=2", "train.checkpoint_every=4", "train.image_every=8",
        "train.precision=fp32", "tracking.log_checkpoints=false", "data.loader_workers=0", *extra])


@pytest.mark.slow
def test_two_trial_sweep_asha_parent_child_runs_and_challenger(tmp_path, mnist_shards, mlflow_server,
                                                                  ray_local):
    cfg = sweep_cfg(tmp_path, mnist_shards, mlflow_server, "tracking.experiment=tune",
                    "tracking.model_name=tune-model")
    # One trial at a time, so ASHA's cut-off at step 2 is known when the second trial gets there.
    # `loss` falls steeply with gamma in [1e-6, 1e-2] over the first steps (the decoder follows
    # the Dis_l term more), and seed 0 draws gammas in decreasing order (3.5e-4, then 1.2e-5):
    # the 2nd trial is worse at step 2 than the 1st, and is cut there.
    opts = SweepOptions(name="asha", trials=2, workers_per_trial=2, metric="loss", grace_period=2,
                        reduction_factor=2, max_concurrent=1, gamma_min=1e-6, gamma_max=1e-2, seed=0)
    res = sweep(cfg, opts)
    client = mlflow.MlflowClient(mlflow_server)
    parent = client.get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["tune.trials"] == "2"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")
    assert len(children) == 2 and {c.info.run_id for c in children} == {r.run_id for r in res.rows}
    gammas = sorted(float(c.data.params["loss.gamma"]) for c in children)
    assert gammas == sorted(r.params["loss.gamma"] for r in res.rows)
    assert all(1e-6 <= g <= 1e-2 for g in gammas)

    # ASHA: Tune got steps 2, 4, 6 and the last from the completed trial, step 2 from the other
    # (its workers may train a few steps more before the trial's process is gone)
    by_gamma = sorted(res.rows, key=lambda r: -r.params["loss.gamma"])
    assert [r.status for r in by_gamma] == ["completed", "stopped early"], res.rows
    assert by_gamma[0].step == 8 and by_gamma[0].reports == 4
    for r in by_gamma[1:]:
        assert r.step == 2 and r.reports == 1
        assert client.get_run(r.run_id).info.status == "KILLED"

    # the summary on the parent: table, plot, best
    artifacts = {a.path for a in client.list_artifacts(res.parent_run_id, "sweep")}
    assert {"sweep/trials.json", "sweep/trials.md", "sweep/loss_vs_gamma.png"} <= artifacts
    best = by_gamma[0]
    assert res.best == best and parent.data.tags["vaegan.tune.best_run_id"] == best.run_id
    assert parent.data.metrics["best_loss"] == pytest.approx(best.value)

    # challenger: the best trial's final model, logged in its child run; trials register nothing
    version = client.get_model_version_by_alias("tune-model", "challenger")
    assert version.run_id == best.run_id and res.challenger_uri == "models:/tune-model@challenger"
    assert len(client.search_model_versions("name='tune-model'")) == 1
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(res.challenger_uri)
    out = model.predict(np.zeros((1, 1, 32, 32), np.float32), params={"op": "sample", "n": 2})
    assert out.shape == (2, 1, 32, 32)

    # the same sweep again: restored, finished: same parent and trials, nothing new registered
    again = sweep(cfg, opts)
    assert again.parent_run_id == res.parent_run_id and again.rows == res.rows
    assert len(client.search_model_versions("name='tune-model'")) == 1
    with pytest.raises(TuneError, match=r"sweep asha exists with other settings \(tune.gamma_max: 0.01 ->"):
        sweep(cfg, dataclasses.replace(opts, gamma_max=0.1))


@pytest.mark.slow
def test_interrupted_sweep_resumes_its_trial_from_the_checkpoint(tmp_path, mnist_shards, featurizer,
                                                                  mlflow_server, ray_local, monkeypatch):
    """On an eval metric (reported every 4th step only); the trial dies after step 5 (its
    checkpoint is step 4); the same sweep again resumes it there, in the same child run."""
    cfg = sweep_cfg(tmp_path, mnist_shards, mlflow_server, "tracking.experiment=tune-resume",
                    "tracking.model_name=tune-resume", "train.eval_every=4", "train.eval_images=32",
                    f"train.eval_featurizer={featurizer}", "train.max_failures=0")
    opts = SweepOptions(name="resumed", trials=1, workers_per_trial=1, grace_period=4)
    monkeypatch.setenv(FAULT_ENV, f"5:{tmp_path / 'fault-marker'}")
    first = sweep(cfg, opts)
    (row,) = first.rows
    assert row.status == "failed" and "injected fault at step 5" in row.error and not first.best
    client = mlflow.MlflowClient(mlflow_server)
    assert client.get_run(first.parent_run_id).info.status == "FAILED"
    monkeypatch.delenv(FAULT_ENV)

    res = sweep(cfg, opts)
    (row,) = res.rows
    assert res.parent_run_id == first.parent_run_id and row.run_id == first.rows[0].run_id
    assert row.status == "completed" and row.step == 8 and math.isfinite(row.value)
    history = client.get_metric_history(row.run_id, "eval_fid_samples")
    assert sorted(m.step for m in history) == [4, 8]  # step 8 once, after the resume
    assert client.get_model_version_by_alias("tune-resume", "challenger").run_id == row.run_id
    assert client.get_run(res.parent_run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_too_many_concurrent_trials_fail_before_any_run(tmp_path, mnist_shards, mlflow_server, ray_local):
    cfg = sweep_cfg(tmp_path, mnist_shards, mlflow_server, "tracking.experiment=tune-bad")
    opts = SweepOptions(name="too-wide", trials=8, max_concurrent=8, workers_per_trial=2, metric="loss")
    with pytest.raises(ClusterError, match=r"--max-concurrent 8 trials x \(0.25 CPU for the trial \+ 2 "
                                           r"workers x train.cpus_per_worker=0.5\) needs 10 CPUs but the "
                                           r"Ray cluster has 8"):
        sweep(cfg, opts)
    assert mlflow.MlflowClient(mlflow_server).get_experiment_by_name("tune-bad") is None


@pytest.mark.slow
def test_grid_sweep_over_loss_mode_on_a_time_budget_compared_side_by_side(
        tmp_path, mnist_shards, featurizer, mlflow_server, ray_local):
    """One child run per value; train.minutes ends each trial (a completed one) long before
    train.steps; --compare scores the final models and draws them side by side."""
    cfg = sweep_cfg(tmp_path, mnist_shards, mlflow_server, "tracking.experiment=tune-modes",
                    "tracking.model_name=tune-modes", "train.steps=100000", "train.minutes=0.02",
                    "train.checkpoint_every=100000", "train.image_every=100000", "train.log_every=1",
                    f"train.eval_featurizer={featurizer}")
    opts = SweepOptions(name="modes", grid={"loss.mode": ["vae_dis_l", "gan"]}, workers_per_trial=1,
                        metric="kl_prior", scheduler="fifo", max_concurrent=2, compare=True)
    res = sweep(cfg, opts)
    client = mlflow.MlflowClient(mlflow_server)
    children = client.search_runs([client.get_run(res.parent_run_id).info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")
    assert sorted(c.data.params["loss.mode"] for c in children) == ["gan", "vae_dis_l"]
    assert sorted(r.params["loss.mode"] for r in res.rows) == ["gan", "vae_dis_l"]
    # 1.2 s of training: a few steps, far from train.steps, and still the trial's end
    assert all(r.status == "completed" and 1 <= r.step < 1000 for r in res.rows), res.rows
    artifacts = {a.path for a in client.list_artifacts(res.parent_run_id, "sweep")}
    assert {"sweep/kl_prior_vs_mode.png", "sweep/comparison.png", "sweep/comparison.json"} <= artifacts
    table = client.download_artifacts(res.parent_run_id, "sweep/trials.md", str(tmp_path))
    assert "| loss.mode |" in open(table).read()
    compared = json.load(open(client.download_artifacts(res.parent_run_id, "sweep/comparison.json",
                                                        str(tmp_path))))
    assert [c["model"] for c in compared] == [r.params["loss.mode"] for r in res.rows]
    for c, r in zip(compared, res.rows, strict=True):  # scored at the step the budget ended
        (trial,) = c["trials"]
        assert trial["step"] == r.step and trial["n_images"] > 2 and trial["fid_samples"] > 0
        assert (trial["fid_recon"] is None) == (c["model"] == "gan")  # a GAN has no encoder
    lines = res.comparison.splitlines()
    assert lines[0].startswith("| model | seeds | steps | FID samples |") and len(lines) == 4
