"""What MLflow keeps of a model and how it is served: models logged as code with an input
example, one best model per run (the one it replaces deleted), and `vaegan models serve`
with its request limits.

The output limit is checked in-process on a tiny untrained model; the rest talks to a real
`mlflow server` (the `mlflow_server` fixture) and a real `vaegan models serve` subprocess.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
import yaml
from servers import BIN, env_with_venv, free_port, scoring_server

from vaegan.artifact import ModelError
from vaegan.checkpoint import TrainState, save_checkpoint
from vaegan.config import COMPARE_METRIC, TrackingConfig, load_config
from vaegan.inference import VAEGANModel
from vaegan.model import VAEGAN
from vaegan.pyfunc import predict_op


def tiny():
    """The debug preset's networks: 1 x 32 x 32 images, 1,024 numbers each; latent 8."""
    cfg = load_config("debug", overrides=["train.precision=fp32"])
    return VAEGAN(cfg.model).eval(), cfg


@pytest.fixture
def checkpoint(tmp_path):
    net, cfg = tiny()
    return save_checkpoint(tmp_path / "ckpt", net, cfg, TrainState(step=7))


def test_requests_for_too_much_output_are_refused_before_running():
    net, cfg = tiny()
    model = VAEGANModel(net, cfg, device="cpu")
    limit = 4 * 1024  # four 1x32x32 images
    blank = np.zeros((1, 1, 32, 32), np.float32)
    assert predict_op(model, blank, {"op": "sample", "n": 4}, limit).shape == (4, 1, 32, 32)
    assert predict_op(model, np.zeros((4, 1, 32, 32), np.float32), {}, limit).shape == (4, 1, 32, 32)
    for x, params, message in [
        (blank, {"op": "sample", "n": 5}, r"5 images x 1,024 numbers = 5,120 output values, more than the "
                                          r"4,096 allowed per request; ask for at most 4 images"),
        (np.zeros((5, 1, 32, 32), np.float32), {"op": "reconstruct"}, "5,120 output values"),
        (np.zeros((5, 8, 1, 1), np.float32), {"op": "decode"}, "5,120 output values"),
        (np.zeros((2, 1, 32, 32), np.float32), {"op": "interpolate", "steps": 5}, "5,120 output values"),
    ]:
        with pytest.raises(ModelError, match=message):
            predict_op(model, x, params, limit)
    # encode answers 2 x latent numbers per image
    assert predict_op(model, np.zeros((4, 1, 32, 32), np.float32), {"op": "encode"}, 64)["mu"].shape == (4, 8)
    with pytest.raises(ModelError, match="5 rows x 16 numbers"):
        predict_op(model, np.zeros((5, 1, 32, 32), np.float32), {"op": "encode"}, 64)


# ---------------------------------------------------------------------------------------
# Integration: a real MLflow server.


@pytest.fixture
def tracking(mlflow_server):
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment("test-serving")
    yield mlflow_server
    mlflow.set_tracking_uri(before)


def log_model(checkpoint, name: str = "model"):
    from vaegan.tracking import log_folder_model

    with mlflow.start_run():
        return log_folder_model(checkpoint, name=name, step=7)


@pytest.mark.slow
def test_a_logged_model_is_code_with_an_input_example_and_no_pickle(tracking, checkpoint, tmp_path, caplog):
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        info = log_model(checkpoint)
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [s for s in said if "pickl" in s.lower() or "input_example" in s or "input example" in s], said
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "dl")))
    assert not list(local.rglob("*.pkl")), "a pickled model would run its code at load"
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert Path(flavor["model_code_path"]).name == "pyfunc_model.py" and (local / "pyfunc_model.py").is_file()
    assert "python_model" not in flavor
    pyfunc = mlflow.pyfunc.load_model(info.model_uri)
    example = pyfunc.input_example  # (one blank 1x32x32 image, op=reconstruct)
    assert np.asarray(example[0] if isinstance(example, tuple) else example).shape == (1, 1, 32, 32)
    out = pyfunc.predict(np.zeros((2, 1, 32, 32), np.float32), params={"op": "reconstruct"})
    assert out.shape == (2, 1, 32, 32) and np.abs(out).max() <= 1
    serving_example = (local / "serving_input_example.json").read_text()
    assert '"op": "reconstruct"' in serving_example


def live_models(client, run_id: str) -> list:
    exp = client.get_run(run_id).info.experiment_id
    return client.search_logged_models([exp], filter_string=f"source_run_id = '{run_id}'")


@pytest.mark.slow
def test_a_run_keeps_one_best_model_and_deletes_the_one_it_replaces(tracking, checkpoint):
    from vaegan.tracking import (
        BEST_TAG,
        BEST_VALUE_TAG,
        STEP_TAG,
        MlflowLogger,
        logged_final_model,
        start_or_resume_run,
    )

    client = mlflow.MlflowClient(tracking)
    run_id = start_or_resume_run(tracking, "test-serving", f"best-{os.getpid()}-{id(checkpoint)}", {})
    m = COMPARE_METRIC

    def logger():
        return MlflowLogger(tracking, run_id, False, tracking=TrackingConfig(), say=lambda s: None)

    first = logger()
    first.log_checkpoint(checkpoint, 10, {m: 5.0})              # the first best
    first.flush(60)
    (best5,) = live_models(client, run_id)
    first.log_checkpoint(checkpoint, 20, {m: 7.0})              # worse: nothing logged
    first.log_checkpoint(checkpoint, 30, {"loss": 1.0})          # no eval at this step: no candidate
    first.log_checkpoint(checkpoint, 40, {m: 3.0})              # better: replaces the best
    first.log_final_model(checkpoint, 50, {m: 4.0})             # the final model, not the best
    first.end()
    models = {mm.name: mm for mm in live_models(client, run_id)}
    assert set(models) == {"best", "model"}, models
    assert models["best"].tags[BEST_TAG] == m and float(models["best"].tags[BEST_VALUE_TAG]) == 3.0
    assert BEST_TAG not in models["model"].tags
    # the replaced best is gone, its files too (MLflow's delete alone would leave them)
    assert best5.model_id not in {mm.model_id for mm in live_models(client, run_id)}
    assert mlflow.artifacts.list_artifacts(artifact_uri=best5.artifact_location) == []
    assert mlflow.artifacts.list_artifacts(artifact_uri=models["best"].artifact_location)

    # A resumed run's process does not know the best so far: MLflow does.
    resumed = logger()
    resumed.log_checkpoint(checkpoint, 60, {m: 3.5})            # worse than the 3.0 in MLflow
    resumed.flush(60)
    assert resumed.best_value == 3.0
    resumed.start_final_model(checkpoint, 70, {m: 2.0})         # the final model is the best now,
    resumed.log_final_model(checkpoint, 70, {m: 2.0})           # queued early and logged once
    resumed.end()
    live = live_models(client, run_id)
    bests = [mm for mm in live if mm.tags.get(BEST_TAG) == m]
    assert [mm.name for mm in bests] == ["model"] and float(bests[0].tags[BEST_VALUE_TAG]) == 2.0
    assert sorted(mm.name for mm in live) == ["model", "model"]  # no best copy left, finals kept
    # a run restarted before registering finds the final model it logged, by step (not a "best")
    finals = {mm.tags[STEP_TAG]: f"models:/{mm.model_id}" for mm in live}
    assert sorted(finals) == ["50", "70"]
    found = [logged_final_model(client, run_id, step) for step in (50, 70, 40, 60)]
    assert found == [finals["50"], finals["70"], None, None]


# ---------------------------------------------------------------------------------------
# `vaegan models serve`, a real subprocess.

MAX_BODY = 100_000
MAX_OUTPUT = 4 * 1024


def vaegan_serve(model_uri: str, tracking_uri: str, log_path: Path):
    port = free_port()
    return scoring_server(
        [str(BIN / "vaegan"), "models", "serve", model_uri, "--host", "127.0.0.1", "--port", str(port),
         "--max-body-bytes", str(MAX_BODY), "--max-output-values", str(MAX_OUTPUT), "--device", "cpu"],
        port, {**env_with_venv(), "MLFLOW_TRACKING_URI": tracking_uri}, log_path)


@pytest.mark.slow
def test_vaegan_models_serve_refuses_big_bodies_unread_and_big_outputs(tracking, checkpoint, tmp_path):
    info = log_model(checkpoint)
    with vaegan_serve(info.model_uri, tracking, tmp_path / "serve.log") as url:
        def post(data, **kw):
            return requests.post(f"{url}/invocations", data=data, timeout=60,
                                 headers={"Content-Type": "application/json"}, **kw)

        sample = {"inputs": [[[[0.0]]]], "params": {"op": "sample", "n": 4, "seed": 1}}
        r = requests.post(f"{url}/invocations", json=sample, timeout=60)
        assert r.status_code == 200, r.text
        assert np.asarray(r.json()["predictions"]).shape == (4, 1, 32, 32)
        # Over the limit and not JSON at all: 413, so the body was never parsed (that is a 400).
        junk = b"{" + b"x" * MAX_BODY
        r = post(junk)
        assert r.status_code == 413, (r.status_code, r.text[:300])
        assert f"at most {MAX_BODY:,} bytes" in r.json()["message"]
        # The same, streamed without a Content-Length (chunked): counted as it arrives.
        r = post(iter([b"{" + b"x" * 30_000] * 4))
        assert r.status_code == 413, (r.status_code, r.text[:300])
        # Under the limit, the same junk reaches MLflow's parser: a 400.
        r = post(b"{" + b"x" * 1000)
        assert r.status_code == 400, (r.status_code, r.text[:300])
        # Too much output: 5 x 1x32x32 = 5,120 numbers over 4,096.
        r = requests.post(f"{url}/invocations", json={**sample, "params": {"op": "sample", "n": 5}},
                          timeout=60)
        assert r.status_code == 400 and "5,120 output values" in r.json()["message"], r.text[:300]
        # A normal request after all that, on the same server.
        x = np.zeros((2, 1, 32, 32), np.float32)
        r = requests.post(f"{url}/invocations", json={"inputs": x.tolist(), "params": {"op": "reconstruct"}},
                          timeout=60)
        assert r.status_code == 200, r.text[:300]
        assert np.asarray(r.json()["predictions"]).shape == (2, 1, 32, 32)
