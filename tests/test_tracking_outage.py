"""MLflow outages: the tracking server stopped mid-run and started again on the same database
and artifact folder. Training must not wait on it, nothing logged may be lost, and the final
model must still be registered (docs/operations.md#failure-modes)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import mlflow
import pytest
from PIL import Image
from servers import BIN, env_with_venv, free_port, wait_http

from vaegan.artifact import CONFIG, WEIGHTS
from vaegan.config import TrackingConfig, load_config
from vaegan.tracking import MlflowLogger, TrackingError, start_or_resume_run
from vaegan.train import fit

pytestmark = pytest.mark.slow


class RestartableMlflow:
    """A real `mlflow server` (SQLite, artifacts proxied to a folder) that a test stops and
    starts again on the same port, database and artifact folder: a server restart."""

    def __init__(self, root):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = open(root / "server.log", "ab")

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,  # its own group
            env={**env_with_venv(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        wait_http(self.uri + "/health", self.proc, timeout=120, log=self.root / "server.log")

    def stop(self) -> None:
        """Stop the server and whatever it started (uvicorn), so the port stops answering."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@pytest.fixture
def client_env(monkeypatch):
    """MlflowLogger turns MLflow's client retries off in its process (rank 0), so in this
    test process too when a test makes one: set (to MLflow's defaults) through monkeypatch,
    they are put back as they were for the rest of the session."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")


@pytest.fixture
def restartable_mlflow(tmp_path, client_env):
    (tmp_path / "mlflow").mkdir()
    server = RestartableMlflow(tmp_path / "mlflow")  # not started: each test starts it
    try:
        yield server
    finally:
        server.stop()
        server.log.close()


def test_logging_returns_at_once_while_mlflow_is_down_and_is_sent_when_it_is_back(restartable_mlflow):
    server = restartable_mlflow
    # A run started while the server is still starting: the driver waits for it.
    starter = threading.Thread(target=server.start)
    starter.start()
    run_id = start_or_resume_run(server.uri, "outage", "unit", {"a": 1}, wait_seconds=180)
    starter.join()
    said: list[str] = []
    logger = MlflowLogger(server.uri, run_id, log_checkpoints=False,
                          tracking=TrackingConfig(outage_grace_seconds=60), say=said.append)
    logger.log_metrics({"loss": 1.0}, step=1)
    assert logger.flush(30), "the server is up: sent at once"
    server.stop()
    t0 = time.monotonic()
    for step in range(2, 12):
        logger.log_metrics({"loss": float(step), "other": -float(step)}, step=step)
    logger.log_image(Image.new("L", (64, 64), 128), "samples", step=11)
    # waiting would mean the request's retries, 30 s and more: the bounds leave a loaded machine room
    assert time.monotonic() - t0 < 5, "logging must not wait on a stopped server"
    t0 = time.monotonic()
    assert not logger.flush(30) and time.monotonic() - t0 < 10, "flush does not wait out an outage"
    server.start()
    assert logger.flush(60, through_outage=True), "everything is sent once the server is back"
    logger.end()
    client = mlflow.MlflowClient(server.uri)
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, 12))
    assert [m.value for m in client.get_metric_history(run_id, "other")] == [-float(s) for s in range(2, 12)]
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    assert len(images) == 2 and all(p.startswith("images/samples+step+11+") for p in images), images
    assert client.get_run(run_id).info.status == "FINISHED"
    assert any("not answering" in s for s in said) and any("is back" in s for s in said), said


def _stop_for(server: RestartableMlflow, after_step: int, seconds: float, log: dict) -> None:
    """Wait until `after_step` is in MLflow, then stop the server for `seconds`."""
    client = mlflow.MlflowClient(server.uri)
    run_id = None
    while run_id is None or max((m.step for m in client.get_metric_history(run_id, "kl_prior")),
                                default=0) < after_step:
        time.sleep(0.5)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  filter_string="tags.`vaegan.run_name` = 'outage'")
        run_id = runs[0].info.run_id if runs else None
    log["stopped"] = time.time()
    server.stop()
    time.sleep(seconds)
    log["restarting"] = time.time()
    server.start()
    log["restarted"] = time.time()


def test_training_goes_on_through_an_mlflow_restart_and_loses_nothing(
        tmp_path, mnist_shards, ray_local, restartable_mlflow):
    """The server is stopped for 12 s (and about as long again to start) around step 10 of 90:
    longer than rank 0's MLflow client retries last (off: one try per request), which
    without the sender would stall every rank, and a longer outage would fail the run."""
    server, outage = restartable_mlflow, 12.0
    server.start()
    steps, log_every, image_every, checkpoint_every = 90, 2, 10, 45
    cfg = load_config("debug", overrides=[
        f"data.shards={mnist_shards}", f"train.storage_path={tmp_path / 'runs'}",
        f"tracking.tracking_uri={server.uri}", "train.num_workers=2", f"train.steps={steps}",
        f"train.log_every={log_every}", f"train.checkpoint_every={checkpoint_every}",
        f"train.image_every={image_every}", "tracking.model_name=outage-model",
        "tracking.experiment=outage", "train.name=outage", "data.loader_workers=0",
        "tracking.log_checkpoints=true", "tracking.request_timeout_seconds=5"])
    times: dict[str, float] = {}
    stopper = threading.Thread(target=_stop_for, args=(server, 10, outage, times), daemon=True)
    stopper.start()
    t0 = time.time()
    res = fit(cfg)
    took = time.time() - t0
    stopper.join(180)
    assert res.step == steps and "restarted" in times
    client = mlflow.MlflowClient(server.uri)
    run = client.get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert "vaegan.tracking_lost" not in run.data.tags
    history = client.get_metric_history(res.mlflow_run_id, "kl_prior")
    assert sorted(m.step for m in history) == list(range(log_every, steps + 1, log_every))
    # Training went on during the outage: the metrics were stamped when they were logged, and
    # a rank 0 that waited on MLflow would leave a gap of the outage's length between two.
    stamps = sorted(m.timestamp / 1000 for m in history)
    during = [t for t in stamps if times["stopped"] + 1 < t < times["restarting"]]
    assert during, f"no step was logged during the {outage:.0f} s outage"
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    # (a checkpoint's report and its flush of up to 5 s fall in one gap; a stall is 12 s or more)
    assert max(gaps) < outage, f"rank 0 stalled {max(gaps):.1f} s"
    images = {a.path.split("+")[0] + "@" + a.path.split("+")[2]
              for a in client.list_artifacts(res.mlflow_run_id, "images") if a.path.endswith(".png")}
    assert images == {f"images/{k}@{s}" for k in ("samples", "reconstructions")
                      for s in range(image_every, steps + 1, image_every)}
    models = client.search_logged_models([run.info.experiment_id])
    assert {m.name for m in models} >= {f"checkpoint-{s:07d}" for s in (45, 90)} | {"model"}
    versions = client.search_model_versions("name='outage-model'")
    assert [v.run_id for v in versions] == [res.mlflow_run_id]
    print(f"\n[outage test] fit took {took:.1f} s; stopped {times['restarting'] - times['stopped']:.1f} s; "
          f"restart took {times['restarted'] - times['restarting']:.1f} s; "
          f"{len(during)} metric steps logged during the outage; largest gap {max(gaps):.2f} s")


def test_an_outage_past_the_grace_period_fails_clearly_and_names_what_was_lost(tmp_path, client_env):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    said: list[str] = []
    logger = MlflowLogger(uri, "0" * 32, log_checkpoints=False,
                          tracking=TrackingConfig(outage_grace_seconds=2), say=said.append)
    logger.log_metrics({"loss": 1.0}, step=4)
    logger.log_metrics({"loss": 0.5}, step=6)
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / WEIGHTS).write_bytes(b"weights")
    (checkpoint / CONFIG).write_text("{}")
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match=(
            r"the final model \(step 6\) was not logged: MLflow at .* is still unreachable after "
            r"tracking.outage_grace_seconds=2 .*checkpoint is in the run's storage.*same train.name")):
        logger.log_final_model(checkpoint, step=6)
    assert time.monotonic() - t0 < 10
    assert "not in MLflow: metric steps 4, 6 (2)" in said[-1], said
