"""Training on a real local Ray with 2 CPU workers (gloo DDP), tracked in a real MLflow
server, checkpoints on local disk. Checkpoints on S3 and restarts from them: test_faults.py."""

from __future__ import annotations

import re
import signal
import time

import mlflow
import numpy as np
import pytest
import torch
from ray.util.state import list_actors

from vaegan.checkpoint import LIVE
from vaegan.cluster import ClusterError
from vaegan.config import load_config
from vaegan.registry import load_model
from vaegan.tracking import TrackingError, resolve_tracking_uri
from vaegan.train import TrainError, fit, resolve_attribute_head

pytestmark = pytest.mark.slow


def train_cfg(tmp_path, mnist_shards, uri, *extra):
    return load_config("debug", overrides=[
        f"data.shards={mnist_shards}", f"train.storage_path={tmp_path / 'runs'}",
        f"tracking.tracking_uri={uri}", "train.num_workers=2", "train.steps=6",
        "train.log_every=2", "train.checkpoint_every=3", "train.image_every=3",
        "tracking.model_name=debug-model", "data.loader_workers=0", *extra])


def alive_controllers() -> list:
    return list_actors(filters=[("class_name", "=", "TrainController"), ("state", "=", "ALIVE")])


def test_two_workers_track_everything_in_mlflow(tmp_path, mnist_shards, mlflow_server, ray_local,
                                                featurizer):
    cfg = train_cfg(tmp_path, mnist_shards, mlflow_server, "train.name=tracked", "train.eval_every=6",
                    "train.eval_images=64", f"train.eval_featurizer={featurizer}", "train.ema=0.9",
                    "model.latent_mixture=3")
    caller_sigint = signal.getsignal(signal.SIGINT)
    res = fit(cfg)
    assert res.step == 6
    # Ray Train's Ctrl-C handler goes with the run: the caller's is back, and the run's
    # controller actor, which that handler held, ends
    assert signal.getsignal(signal.SIGINT) is caller_sigint
    deadline = time.monotonic() + 60
    while (alive := alive_controllers()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive, alive
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(res.mlflow_run_id)
    assert run.data.params["loss.gamma"] == str(cfg.loss.gamma)
    assert run.data.params["train.num_workers"] == "2"
    for name in ("kl_prior", "llike_dis_l", "gan_bce", "d_real", "d_recon", "d_prior",
                 "skip_dis", "skip_dec", "images_per_s", "skipped_samples"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, name)]
        assert steps == [2, 4, 6], name
    # where each report window's time went, the gradient all-reduce (and the wait for the other
    # rank at it) apart from the step's own compute
    for name in ("time_data", "time_step", "time_allreduce"):
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == [2, 4, 6] and all(m.value > 0 for m in history), name
    # what the run waited for after its last report, logged apart (`vaegan bench train` counts it)
    final = client.get_metric_history(run.info.run_id, "final_checkpoint_s")
    assert [m.step for m in final] == [6] and final[0].value > 0, final
    for name in ("eval_fid_samples", "eval_fid_recon", "eval_ssim_recon", "eval_recognisable",
                 "eval_recognisable_mixture", "eval_fid_samples_mixture"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [6], name
    images = {a.path for a in client.list_artifacts(run.info.run_id, "images")}
    assert any("samples" in p for p in images) and any("reconstructions" in p for p in images)
    # "latest" is MLflow's reserved built-in: models:/NAME/latest is the newest version
    newest = max(client.search_model_versions("name='debug-model'"), key=lambda v: int(v.version))
    assert newest.run_id == res.mlflow_run_id and res.model_uri == "models:/debug-model/latest"
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(res.model_uri)
    samples = model.predict(np.zeros((1, 1, 32, 32), np.float32), params={"op": "sample", "n": 5})
    assert samples.shape == (5, 1, 32, 32) and np.abs(samples).max() <= 1
    # model.latent_mixture: fitted on rank 0 to the served encoder's codes, registered with it
    for latent in ("prior", "mixture"):
        one = {"op": "sample", "n": 3, "seed": 7, "latent": latent}
        assert np.array_equal(model.predict(np.zeros((1, 1, 32, 32), np.float32), params=one),
                              model.predict(np.zeros((1, 1, 32, 32), np.float32), params=one))
    with pytest.raises(mlflow.exceptions.MlflowException, match="latent='normal' is not allowed"):
        model.predict(np.zeros((1, 1, 32, 32), np.float32), params={"op": "sample", "latent": "normal"})
    # train.ema: the registered model is the final checkpoint's averaged encoder and decoder,
    # not the live weights (which the checkpoint keeps for resuming)
    final = max((tmp_path / "runs" / "tracked").glob("*/model.pt"), key=lambda p: p.stat().st_mtime).parent
    served = torch.load(final / "model.pt", weights_only=True)
    live = torch.load(final / "trainer.pt", weights_only=True)[LIVE]
    registered_model = load_model(res.model_uri, device="cpu", tracking_uri=mlflow_server)
    assert registered_model.latents_available == ("prior", "mixture")
    registered = registered_model.net.state_dict()
    for net in ("encoder", "decoder"):
        for k in live[net]:
            assert torch.equal(registered[f"{net}.{k}"], served[f"{net}.{k}"]), k
        assert any(v.is_floating_point() and not torch.equal(registered[f"{net}.{k}"], v)
                   for k, v in live[net].items()), net
    assert live["updates"] == 6
    # MLflow keeps the final model, which here (eval at step 6 only) is also the best: no copy
    # per checkpoint, no second copy as `best`
    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run.info.run_id}'")
    assert [(m.name, m.tags.get("vaegan.best")) for m in logged] == [("model", "eval_fid_samples")]


def test_too_many_workers_is_a_clear_error(tmp_path, mnist_shards, mlflow_server, ray_local):
    cfg = train_cfg(tmp_path, mnist_shards, mlflow_server, "train.num_workers=64")
    with pytest.raises(ClusterError,
                       match=r"train.num_workers=64 .* needs 32 CPUs but the Ray cluster has 8"):
        fit(cfg)


def test_unreachable_mlflow_fails_before_workers_start(tmp_path, mnist_shards):
    from servers import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    cfg = train_cfg(tmp_path, mnist_shards, uri, "tracking.start_wait_seconds=0")
    with pytest.raises(TrackingError, match=f"MLflow tracking server {uri} is unreachable"):
        fit(cfg)


def test_a_file_store_uri_is_a_clear_error_unless_mlflows_opt_in_is_set(tmp_path, mnist_shards,
                                                                          monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    for uri in (f"file://{tmp_path}/mlruns", f"{tmp_path}/mlruns"):
        with pytest.raises(TrackingError, match=f"URI '{re.escape(uri)}' .* is MLflow's file store.* use sqlite:///"):
            fit(train_cfg(tmp_path, mnist_shards, uri))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the user's own choice: passed on
    assert resolve_tracking_uri(f"file://{tmp_path}/mlruns") == f"file://{tmp_path}/mlruns"


def test_unwritable_storage_is_a_clear_error(tmp_path, mnist_shards, mlflow_server):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = train_cfg(tmp_path, mnist_shards, mlflow_server, f"train.storage_path={blocker}/runs")
    with pytest.raises(ClusterError, match="checkpoint storage .* is not writable"):
        fit(cfg)


def test_the_attribute_head_needs_binary_labels_and_is_sized_to_them(tmp_path, mnist_shards):
    """Refused before MLflow or Ray is touched (the URI below is never dialled): mnist's
    label is a digit, not a yes/no attribute."""
    cfg = train_cfg(tmp_path, mnist_shards, "http://127.0.0.1:9", "loss.attribute_weight=2")
    with pytest.raises(TrainError, match=r"loss.attribute_weight=2 needs binary attributes .* have none "
                                         r"\(no labels, or labels with other values, such as a digit\)"):
        fit(cfg)
    names = ["Bangs", "Smiling"]
    assert resolve_attribute_head(load_config("debug", overrides=["loss.attribute_weight=1"]),
                                  names).model.dis_attributes == 2
    vae = load_config("debug", overrides=["loss.attribute_weight=1", "loss.mode=vae"])
    assert resolve_attribute_head(vae, names).model.dis_attributes == 0  # no Dis to put it on
    with pytest.raises(TrainError, match=r"model.dis_attributes=3, but shards .* label 2 attributes"):
        resolve_attribute_head(load_config("debug", overrides=["loss.attribute_weight=1",
                                                               "model.dis_attributes=3"]), names)
    with pytest.raises(TrainError, match=r"model.dis_attributes=2 adds an attribute head to Dis that only "
                                         r"loss.attribute_weight > 0 trains"):
        resolve_attribute_head(load_config("debug", overrides=["model.dis_attributes=2"]), names)
