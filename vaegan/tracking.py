"""Tracking: MLflow from rank 0, a do-nothing twin everywhere else, and logging models.

The driver resolves the tracking URI and creates (or finds again, by run name) the MLflow
run before any worker starts, so an unreachable server fails fast and a resumed training
run continues the same MLflow run. Workers only log into that run id.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from vaegan.errors import UserError

RUN_NAME_TAG = "vaegan.run_name"


class TrackingError(UserError, RuntimeError):
    """MLflow cannot be used (unreachable server, unwritable store); names the URI."""


def resolve_tracking_uri(configured: str = "") -> str:
    """Config, else $MLFLOW_TRACKING_URI, else SQLite at an absolute path under ./mlruns
    (absolute because Ray workers run in another working directory)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri
    root = Path("mlruns").resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def default_artifact_location(uri: str) -> str | None:
    """For the embedded SQLite store, artifacts live beside the database."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
    return None


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, naming the URI (MLflow's own client retries for minutes)."""
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=timeout).raise_for_status()
        except requests.RequestException as e:
            raise TrackingError(f"MLflow tracking server {uri} is unreachable ({type(e).__name__}); "
                                "start it or set MLFLOW_TRACKING_URI / tracking.tracking_uri") from None
    elif uri.startswith("sqlite:///"):
        parent = Path(uri[len("sqlite:///"):]).parent
        if not os.access(parent, os.W_OK):
            raise TrackingError(f"MLflow store {uri}: folder {parent} is not writable")


def start_or_resume_run(uri: str, experiment: str, run_name: str, params: dict[str, Any]) -> str:
    """The id of the MLflow run for this training run name: found again if it exists (a
    resumed run continues it), created with the flattened config as params otherwise."""
    import mlflow

    check_reachable(uri)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        experiment, artifact_location=default_artifact_location(uri))
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name})
    from mlflow.entities import Param

    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # log_batch takes at most 100 params at a time
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


def start_run_by_id(run_id: str):
    """`mlflow.start_run(run_id=...)` that works whatever experiment the process made active
    earlier (MLflow refuses a run of another experiment than the fluent active one)."""
    import mlflow

    mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(run_id).info.experiment_id)
    return mlflow.start_run(run_id=run_id)


def log_model_files(files: dict[str, str | Path], name: str, step: int | None = None):
    """Log a model folder's files ({"weights", "config", "state"?, "attributes"?}) as a pyfunc
    model of the active run (MLflow 3: its own LoggedModel, linked to the run and `step`)."""
    import mlflow

    from vaegan.inference import load_files
    from vaegan.pyfunc import VAEGANPyfunc, pip_requirements, signature

    load_files(files)  # refuse files that do not load, before logging anything
    kwargs = {"step": step} if step is not None else {}
    return mlflow.pyfunc.log_model(
        name=name, python_model=VAEGANPyfunc(), artifacts={k: str(v) for k, v in files.items()},
        signature=signature(), pip_requirements=pip_requirements(),
        # The package travels with the model, so a serving environment needs no vaegan install.
        code_paths=[str(Path(__file__).parent)], **kwargs)


def log_folder_model(folder: str | Path, name: str, step: int | None = None):
    """Log a model or checkpoint folder (not its optimizer states) as a pyfunc model."""
    from vaegan.artifact import folder_files

    return log_model_files(folder_files(folder), name, step)


class NullLogger:
    """What ranks other than 0 get: every call does nothing."""

    run_id = ""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, image, key: str, step: int) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_checkpoint(self, path: str | Path, step: int) -> None: ...
    def log_final_model(self, path: str | Path, step: int) -> str: return ""
    def end(self, status: str = "FINISHED") -> None: ...


class MlflowLogger(NullLogger):
    """Logs into an existing run by id (see `start_or_resume_run`)."""

    def __init__(self, uri: str, run_id: str, log_checkpoints: bool = True):
        # Every logged checkpoint model would draw a download progress bar in the training
        # console (rank 0 writes to it through Ray); the progress line says enough.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(uri)
        self.client = mlflow.MlflowClient(uri)
        self.run_id = run_id
        self.log_checkpoints = log_checkpoints
        # The run stays active in this process so log_model attaches to it; `end` closes it.
        start_run_by_id(run_id)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_image(self, image, key: str, step: int) -> None:
        self.client.log_image(self.run_id, image, key=key, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_checkpoint(self, path: str | Path, step: int) -> None:
        """The checkpoint's weights as an MLflow model linked to this run and step, so
        checkpoints can be compared by their metrics."""
        if self.log_checkpoints:
            log_folder_model(path, name=f"checkpoint-{step:07d}", step=step)

    def log_final_model(self, path: str | Path, step: int) -> str:
        """Log the final model of this run; -> its model URI (for `vaegan.registry.register`)."""
        return log_folder_model(path, name="model", step=step).model_uri

    def end(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)
