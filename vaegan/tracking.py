"""Tracking: MLflow from rank 0, a do-nothing twin everywhere else, and logging models.

The driver resolves the tracking URI and creates (or finds again, by run name) the MLflow
run before any worker starts, so an unreachable server fails fast and a resumed training
run continues the same MLflow run. Workers only log into that run id.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from vaegan.config import TrackingConfig, redact_text
from vaegan.errors import UserError

RUN_NAME_TAG = "vaegan.run_name"
T = TypeVar("T")


class TrackingError(UserError, RuntimeError):
    """MLflow cannot be used (unreachable server, unwritable store); names the URI."""


def resolve_tracking_uri(configured: str = "") -> str:
    """Config, else $MLFLOW_TRACKING_URI, else SQLite at an absolute path under ./mlruns
    (absolute because Ray workers run in another working directory)."""
    from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
    from mlflow.utils.uri import is_local_uri

    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    # MLflow 3 refuses its file store (a path or file:) with a traceback, unless the user
    # opts in with its own variable; say so before anything starts
    if uri and is_local_uri(uri) and not MLFLOW_ALLOW_FILE_STORE.get():
        raise TrackingError(
            f"MLflow tracking URI {uri!r} (tracking.tracking_uri or $MLFLOW_TRACKING_URI) is MLflow's "
            "file store, which MLflow 3 refuses; use sqlite:///ABSOLUTE/PATH/mlflow.db (the default, "
            "under ./mlruns), postgresql://... or http(s)://SERVER")
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


def is_transient(e: BaseException) -> bool:
    """An error that may go away by itself: the server unreachable, timing out or answering
    5xx/429. Anything else (a bad request, a missing run) would fail the same way again."""
    from mlflow.exceptions import MlflowException

    if isinstance(e, TrackingError):  # check_reachable: the server did not answer
        return True
    if isinstance(e, MlflowException):  # the client's own connection errors are INTERNAL_ERROR (500)
        code = e.get_http_status_code()
        return code >= 500 or code == 429
    return isinstance(e, OSError)  # requests' errors are OSErrors too


def brief(e: BaseException) -> str:
    """An error in one short line: MLflow's connection errors run to a screenful."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def retry(fn: Callable[[], T], *, seconds: float, what: str, uri: str) -> T:
    """fn() retried with backoff while it fails transiently (see `is_transient`), for up to
    `seconds`; then a TrackingError naming `what`, the URI and the last error. With
    `seconds <= 0` one try, whose error is raised as it is."""
    if seconds <= 0:
        return fn()
    deadline, delay = time.monotonic() + seconds, 0.5
    while True:
        try:
            return fn()
        except Exception as e:
            left = deadline - time.monotonic()
            if not is_transient(e):
                raise
            if left <= 0:
                if isinstance(e, TrackingError):  # already names the server and what to do
                    raise TrackingError(f"{e} (retried for {seconds:.0f} s)") from None
                raise TrackingError(f"{what}: MLflow at {uri} still fails after {seconds:.0f} s of "
                                    f"retries ({brief(e)})") from None
            time.sleep(min(delay, left))
            delay = min(delay * 2, 5.0)


def hide_credentialed_links(uri: str) -> None:
    """MLflow prints "View run NAME at: URI/#/..." whenever a run ends, with the URI as given:
    credentials and all. For a URI that carries some (`redact_text` changes it) this process
    asks MLflow not to print those links; the run id is on the console anyway."""
    if redact_text(uri) != uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def start_or_resume_run(uri: str, experiment: str, run_name: str, params: dict[str, Any],
                        wait_seconds: float = 30.0) -> str:
    """The id of the MLflow run for this training run name: found again if it exists (a
    resumed run continues it), created with the flattened config as params otherwise.
    Params are stored redacted (`vaegan.config.redact_text`): no credential in a URI, nor a
    credential variable's value, reaches the tracking server.

    A server that is down (restarting, say) is retried for `wait_seconds` before the
    TrackingError; each request on its own, so a retry neither makes a second run nor
    leaves a run without its params."""
    import mlflow
    from mlflow.entities import Param

    hide_credentialed_links(uri)  # this process may end runs (a sweep's driver does)

    def attempt(fn: Callable[[], T], what: str) -> T:
        left = max(deadline - time.monotonic(), 0.1) if wait_seconds > 0 else 0
        return retry(fn, seconds=left, what=what, uri=uri)

    deadline = time.monotonic() + wait_seconds
    attempt(lambda: check_reachable(uri), "reaching the server")
    client = mlflow.MlflowClient(uri)

    def experiment_id() -> str:
        exp = client.get_experiment_by_name(experiment)
        return exp.experiment_id if exp else client.create_experiment(
            experiment, artifact_location=default_artifact_location(uri))

    exp_id = attempt(experiment_id, f"finding experiment {experiment!r}")
    found = attempt(lambda: client.search_runs(
        [exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
        order_by=["attributes.start_time DESC"], max_results=1), f"finding run {run_name!r}")
    if found:
        attempt(lambda: client.update_run(found[0].info.run_id, status="RUNNING"), "resuming the run")
        return found[0].info.run_id
    run = attempt(lambda: client.create_run(exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name}),
                  f"creating run {run_name!r}")
    items = [Param(k, redact_text(str(v))) for k, v in params.items()]
    for i in range(0, len(items), 100):  # log_batch takes at most 100 params at a time
        attempt(lambda i=i: client.log_batch(run.info.run_id, params=items[i:i + 100]), "logging params")
    return run.info.run_id


def start_run_by_id(run_id: str):
    """`mlflow.start_run(run_id=...)` that works whatever experiment the process made active
    earlier (MLflow refuses a run of another experiment than the fluent active one)."""
    import mlflow

    mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(run_id).info.experiment_id)
    return mlflow.start_run(run_id=run_id)


STEP_TAG = "vaegan.step"
"""On a logged model and a registered version: the training step of its weights."""
FINAL_MODEL = "model"
"""The name of a run's final model among its logged models."""


def log_model_files(files: dict[str, str | Path], name: str, step: int | None = None):
    """Log a model folder's files ({"weights", "config", "state"?, "attributes"?}) as a pyfunc
    model of the active run (MLflow 3: its own LoggedModel, linked to the run and `step`).

    Logged as code (`vaegan.pyfunc.MODEL_CODE`), not as a pickled instance: loading the model
    unpickles nothing. The input example (one blank image, op=reconstruct) shows the shape
    the model takes and gives MLflow a ready REST body (serving_input_example.json)."""
    import mlflow

    from vaegan.inference import load_files
    from vaegan.pyfunc import MODEL_CODE, input_example, pip_requirements, signature

    model = load_files(files)  # refuse files that do not load, before logging anything
    kwargs = {"step": step, "tags": {STEP_TAG: str(step)}} if step is not None else {}
    # validating the input example downloads the model: no progress bar per file in the console
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return mlflow.pyfunc.log_model(
        name=name, python_model=str(MODEL_CODE), artifacts={k: str(v) for k, v in files.items()},
        signature=signature(), input_example=input_example(model), pip_requirements=pip_requirements(),
        # The package travels with the model, so a serving environment needs no vaegan install.
        code_paths=[str(Path(__file__).parent)], **kwargs)


def logged_final_model(client, run_id: str, step: int) -> str | None:
    """The URI of this run's final model already logged whole ("model", READY) from the
    weights of `step`, else None: a run restarted between that logging and the registration
    registers this one instead of logging a second copy. One whose logging the restart cut
    short (not READY) is deleted."""
    from mlflow.entities import LoggedModelStatus

    experiment_id = client.get_run(run_id).info.experiment_id
    found = [m for m in client.search_logged_models(
        [experiment_id], filter_string=f"source_run_id = '{run_id}' AND tags.`{STEP_TAG}` = '{step}'")
        if m.name == FINAL_MODEL]
    for m in found:
        if m.status != LoggedModelStatus.READY:
            try:
                delete_logged_model(client, m)
            except Exception:  # best effort: a leftover must not keep the model from registering
                pass
    ready = [m for m in found if m.status == LoggedModelStatus.READY]
    return f"models:/{ready[0].model_id}" if ready else None


def log_folder_model(folder: str | Path, name: str, step: int | None = None):
    """Log a model or checkpoint folder (not its optimizer states) as a pyfunc model."""
    from vaegan.artifact import folder_files

    return log_model_files(folder_files(folder), name, step)


BEST_MODEL = "best"
"""The logged model that holds a run's best checkpoint (tracking.best_metric)."""
BEST_TAG, BEST_VALUE_TAG = "vaegan.best", "vaegan.best_value"
"""Tags of the model that is a run's best: the metric, and its value there."""


def settle_best(client, run_id: str, model_uri: str, metric: str, value: float,
                higher_is_better: bool) -> float:
    """After `model_uri` (a model of `run_id` whose step has `metric` = `value`) was logged as a
    best candidate: keep the better of it and the run's best so far (which a resumed run's
    process has not seen), tag that one, and drop the others (`drop_logged_model`), so a run
    holds one best model whatever its restarts. -> the best value now."""
    model_id = model_uri.rsplit("/", 1)[-1]  # models:/m-<id>
    experiment_id = client.get_run(run_id).info.experiment_id
    earlier = [m for m in client.search_logged_models(
        [experiment_id], filter_string=f"source_run_id = '{run_id}' AND tags.`{BEST_TAG}` = '{metric}'")
        if m.model_id != model_id]

    def tagged_value(m) -> float:
        try:
            return float(m.tags.get(BEST_VALUE_TAG, "nan"))
        except ValueError:
            return float("nan")

    def better(a: float, b: float) -> bool:
        return a > b if higher_is_better else a < b

    incumbent = None
    for m in earlier:
        if tagged_value(m) == tagged_value(m) and (incumbent is None or better(tagged_value(m),
                                                                             tagged_value(incumbent))):
            incumbent = m
    if incumbent is not None and better(tagged_value(incumbent), value):  # the earlier best stays
        drop_logged_model(client, run_id, client.get_logged_model(model_id))
        for m in earlier:
            if m is not incumbent:
                drop_logged_model(client, run_id, m)
        return tagged_value(incumbent)
    client.set_logged_model_tags(model_id, {BEST_TAG: metric, BEST_VALUE_TAG: repr(float(value))})
    for m in earlier:
        drop_logged_model(client, run_id, m)
    return value


def drop_logged_model(client, run_id: str, model) -> None:
    """A best model that is no longer the best: deleted with its artifacts if it is a `best`
    copy that no model version points at; otherwise (the final model, a registered one) it only
    loses the best tags."""
    registered = any(getattr(v, "model_id", None) == model.model_id
                     for v in client.search_model_versions(f"run_id = '{run_id}'"))
    if model.name != BEST_MODEL or registered:
        for key in (BEST_TAG, BEST_VALUE_TAG):
            if key in model.tags:
                client.delete_logged_model_tag(model.model_id, key)
        return
    delete_logged_model(client, model)


def delete_logged_model(client, model) -> None:
    """A logged model and its files (MLflow's delete alone only marks it deleted; its files
    would stay until `mlflow gc`)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    client.delete_logged_model(model.model_id)
    get_artifact_repository(model.artifact_location, tracking_uri=client.tracking_uri).delete_artifacts()


def quick_http_requests(timeout_s: int) -> None:
    """One try per MLflow HTTP request, with a short timeout, in this process. MLflow's own
    client retries for minutes (7 retries with backoff) and then raises; rank 0's sender
    thread retries itself instead, for as long as the run lasts. Read by MLflow at each request."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(timeout_s))


def say_line(message: str) -> None:
    """One line to the console (rank 0 writes to the driver's console through Ray)."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


class NullLogger:
    """What ranks other than 0 get: every call does nothing."""

    run_id = ""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, image, key: str, step: int) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_checkpoint(self, path: str | Path, step: int, metrics: dict | None = None, *,
                       final: bool = False) -> None: ...
    def start_final_model(self, path: str | Path, step: int, metrics: dict | None = None) -> None: ...
    def log_final_model(self, path: str | Path, step: int, metrics: dict | None = None) -> str: return ""
    def flush(self, timeout: float, through_outage: bool = False) -> bool: return True
    def grace_left(self) -> float: return 0.0
    def end(self, status: str = "FINISHED") -> None: ...


LOST_TAG = "vaegan.tracking_lost"
"""Set on a run when some of what was logged never reached MLflow: what, and why."""
CHECKPOINT_FLUSH_S = 5.0
"""At a checkpoint, how long rank 0 waits for what came before it to be sent (not at all
while MLflow is unreachable): a crash right after a checkpoint then loses none of it."""
MAX_BACKOFF_S = 5.0
"""The longest pause between two tries of the sender: MLflow back -> sending within it."""
POISON_TRIES = 5
"""Tries after which an item that fails on a server that answers its health check is
dropped (and reported as lost) instead of holding up everything behind it."""


@dataclass
class _Item:
    """One thing to send: metrics of a step, tags, an image (a spooled folder), a model (a
    spooled folder), or the run's end status."""

    kind: str  # "metrics" | "tags" | "image" | "model" | "end"
    step: int
    payload: Any
    label: str  # what it is, in the report of what was lost
    metrics: int = 0  # metric values held in memory
    spooled: int = 0  # bytes held on disk
    done: threading.Event | None = None  # for the callers that wait for this one
    result: Any = None
    error: BaseException | None = None
    failures: int = 0


class MlflowLogger(NullLogger):
    """Logs into an existing run by id (see `start_or_resume_run`), from a background thread.

    Training never waits on MLflow: every call queues what it logs (metrics in memory, images
    and checkpoint models spooled to a temp folder) and returns; the sender thread sends in
    order, and while the server is unreachable retries with backoff (MLflow's own retries are
    turned off, see `quick_http_requests`), so an outage of any length is bridged. Only the end
    waits: `log_final_model` and `end` give the server `tracking.outage_grace_seconds` (from the
    first of them) to come back; what could not be sent by then is named on the console and,
    when possible, in the run's `vaegan.tracking_lost` tag. All MLflow calls of this process
    happen in that thread, so the fluent run that `log_model` needs is opened there too.
    """

    def __init__(self, uri: str, run_id: str, log_checkpoints: bool = True, *,
                 tracking: TrackingConfig | None = None, say: Callable[[str], None] = say_line):
        opts = tracking or TrackingConfig()
        # Every logged checkpoint model would draw a download progress bar in the training
        # console (rank 0 writes to it through Ray); the progress line says enough.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        hide_credentialed_links(uri)
        quick_http_requests(opts.request_timeout_seconds)
        import mlflow

        from vaegan.checkpoint import scratch_dir

        mlflow.set_tracking_uri(uri)  # log_model (fluent) resolves the server from it
        self.client = mlflow.MlflowClient(uri)
        self.uri, self.run_id, self.log_checkpoints = uri, run_id, log_checkpoints
        self.say = lambda line: say(redact_text(line))  # its lines name the server's URI
        self.grace_seconds = opts.outage_grace_seconds
        self.best_metric, self.best_mode, self.best_value = opts.best_metric, opts.best_mode, None
        self.max_metrics, self.max_spool = opts.max_pending_metrics, opts.max_spool_mb * 2**20
        self.spool = scratch_dir("vaegan-mlflow-spool-")
        self.lost: dict[str, list[str]] = {}  # kind -> what never reached MLflow
        self.lost_reasons: set[str] = set()
        self._items: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._metrics = self._spooled = 0
        self._down_since: float | None = None  # monotonic; None while MLflow answers
        self._last_error = ""
        self._stopped = False
        self._deadline: float | None = None  # end of the grace period, once the end began
        self._final: _Item | None = None  # the final model, once queued
        self._run_open = False  # the fluent run in the sender thread
        self._images_tagged = False
        self._serial = itertools.count()
        # The sender runs torch when it logs a model (vaegan.threads): on one thread of its
        # own, after the caller's thread has settled its count.
        from vaegan.threads import settle_this_thread

        settle_this_thread()
        self._thread = threading.Thread(target=self._send_loop, name="vaegan-mlflow-sender", daemon=True)
        self._thread.start()

    # -- what training calls: each returns at once ---------------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)  # fixed now, so a retried batch is the same batch
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if self._metrics + len(batch) > self.max_metrics:
            self._lose("metric steps", str(step), f"more than tracking.max_pending_metrics="
                       f"{self.max_metrics} metric values waiting")
            return
        self._put(_Item("metrics", step, batch, str(step), metrics=len(batch)))

    def log_image(self, image, key: str, step: int) -> None:
        """The image as MLflow's `log_image(key=, step=)` would store it (a PNG and a webp
        thumbnail named key+step+STEP+timestamp+MS+UUID under images/, which the UI's image
        charts read), written to the spool now; fixed names make a retried upload idempotent."""
        label = f"{key}@{step}"
        if self._spooled > self.max_spool:
            self._lose("images", label, f"spool over tracking.max_spool_mb={self.max_spool >> 20}")
            return
        folder = self.spool / f"{next(self._serial):07d}-image"
        folder.mkdir()
        stem = f"{key.replace('/', '~')}+step+{step}+timestamp+{int(time.time() * 1000)}+{uuid.uuid4()}"
        image.save(folder / f"{stem}.png")
        thumb = image.copy()
        thumb.thumbnail((256, 256))
        thumb.save(folder / f"{stem}+compressed.webp")
        self._put(_Item("image", step, folder, label, spooled=_size(folder)))

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._put(_Item("tags", -1, [RunTag(k, str(v)) for k, v in tags.items()], ", ".join(tags)))

    def log_checkpoint(self, path: str | Path, step: int, metrics: dict | None = None, *,
                       final: bool = False) -> None:
        """A checkpoint whose `metrics` (those reported at its step) beat the run's best
        `tracking.best_metric` becomes the MLflow model `best`, replacing the one before
        (`settle_best`); with tracking.log_checkpoints every checkpoint is also logged as
        `checkpoint-NNNNNNN`. `final`: `log_final_model` logs this checkpoint next, and then
        is the best as well (one copy, not two). Sent in the background."""
        value = self._best_candidate(metrics)
        if not self.log_checkpoints and (value is None or final):
            return
        self.flush(CHECKPOINT_FLUSH_S)
        if self.log_checkpoints:
            name = f"checkpoint-{step:07d}"
            folder = self._spool_model(path, name, required=False)
            if folder is not None:
                self._put(_Item("model", step, (folder, name), name, spooled=_size(folder)))
        if value is not None and not final:
            folder = self._spool_model(path, BEST_MODEL, required=False)
            if folder is not None:
                self._put_best(_Item("model", step, (folder, BEST_MODEL), f"best model (step {step})",
                                     spooled=_size(folder)), value)

    def _best_candidate(self, metrics: dict | None) -> float | None:
        """The value of tracking.best_metric in `metrics` if it beats the best so far."""
        value = (metrics or {}).get(self.best_metric) if self.best_metric else None
        if value is None or not math.isfinite(float(value)):
            return None
        value, best = float(value), self.best_value
        if best is not None and not (value > best if self.best_mode == "max" else value < best):
            return None
        return value

    def _put_best(self, model: _Item, value: float) -> None:
        """Queue `model` and, behind it, the choice of the run's best (`settle_best`)."""
        self._put(model)
        self._put(_Item("best", model.step, (model, value), f"choice of the best model (step {model.step})"))
        self.best_value = value  # so far; the sender corrects it (a resumed run's better best)

    def flush(self, timeout: float, through_outage: bool = False) -> bool:
        """Wait until what is queued is sent, for at most `timeout` s, and not at all while
        MLflow is unreachable unless `through_outage`; -> whether nothing is left to send."""
        until = time.monotonic() + timeout
        with self._cond:
            while self._items and (through_outage or self._down_since is None) and not self._stopped:
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return not self._items

    # -- the end: waits, within the grace period ----------------------------------------

    def grace_left(self) -> float:
        """Seconds left of the end's grace period (it starts at the first call of this,
        `log_final_model` or `end`): what registration may spend retrying."""
        if self._deadline is None:
            self._deadline = time.monotonic() + self.grace_seconds
        return max(self._deadline - time.monotonic(), 0.0)

    def start_final_model(self, path: str | Path, step: int, metrics: dict | None = None) -> None:
        """Queue the final model's logging (its files are spooled now) without waiting for it:
        `log_final_model` of the same step waits. When its `metrics` beat the run's best it is
        also the run's best (tagged; the `best` copy it replaces is deleted)."""
        value = self._best_candidate(metrics)
        folder = self._spool_model(path, FINAL_MODEL, required=True)
        self._final = _Item("model", step, (folder, FINAL_MODEL), "final model", done=threading.Event())
        if value is None:
            self._put(self._final)
        else:
            self._put_best(self._final, value)

    def log_final_model(self, path: str | Path, step: int, metrics: dict | None = None) -> str:
        """Log the final model of this run once everything before it is sent (unless
        `start_final_model` queued it already); -> its model URI (for
        `vaegan.registry.register`). Waits out an outage within the grace period, then raises
        a TrackingError that says where the model is."""
        if self._final is None or self._final.step != step:
            self.start_final_model(path, step, metrics)
        item = self._final
        if not item.done.wait(self.grace_left()):
            self._stop()
            self._note_unsent()
            self.say(f"[vaegan] WARNING: not in MLflow: {self.lost_summary()}")
            raise TrackingError(
                f"the final model (step {step}) was not logged: MLflow at {self.uri} is still "
                f"unreachable after tracking.outage_grace_seconds={self.grace_seconds:g} "
                f"({self._last_error}). Its checkpoint is in the run's storage (train.storage_path/"
                "train.name); once MLflow is back, start the run again with the same train.name "
                "to log and register it")
        if item.error is not None:
            raise TrackingError(f"the final model (step {step}) could not be logged to MLflow at "
                                f"{self.uri}: {brief(item.error)}") from item.error
        return item.result

    def end(self, status: str = "FINISHED") -> None:
        """Send what is left and mark the run `status`, waiting out an outage within the grace
        period (at least 10 s); then say what never reached MLflow, if anything."""
        item = _Item("end", -1, status, f"run status {status}", done=threading.Event())
        self._put(item)
        finished = item.done.wait(max(self.grace_left(), 10.0))
        self._stop()
        if not finished:
            self._note_unsent()
        if self.lost:
            where = (f"the MLflow run {self.run_id} is tagged {LOST_TAG}" if finished else
                     f"MLflow at {self.uri} stayed unreachable ({self._last_error}); the run "
                     "stays RUNNING there")
            self.say(f"[vaegan] WARNING: not in MLflow: {self.lost_summary()} "
                     f"({'; '.join(sorted(self.lost_reasons))}); {where}")
        shutil.rmtree(self.spool, ignore_errors=True)

    def lost_summary(self) -> str:
        """'metric steps 10, 20 (2); images samples@20 (1)': what never reached MLflow."""
        parts = []
        for kind, labels in self.lost.items():
            shown = ", ".join(labels[:30]) + (", ..." if len(labels) > 30 else "")
            parts.append(f"{kind} {shown} ({len(labels)})")
        return "; ".join(parts)

    # -- the sender thread ---------------------------------------------------------------

    def _put(self, item: _Item) -> None:
        with self._cond:
            if self._stopped:
                self._lose_item(item, "logged after the logger ended")
                return
            self._items.append(item)
            self._metrics += item.metrics
            self._spooled += item.spooled
            self._cond.notify_all()

    def _send_loop(self) -> None:
        from vaegan.threads import side_thread

        side_thread()
        delay = 0.5
        while True:
            with self._cond:
                while not self._items and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                batch = self._head()
            try:
                result = self._send(batch)
            except Exception as e:
                if self._stopped:
                    return
                if is_transient(e) and not self._poisoned(batch[0]):
                    self._outage(e)
                    with self._cond:
                        self._cond.wait_for(lambda: self._stopped, timeout=delay)
                    delay = min(delay * 2, MAX_BACKOFF_S)
                    continue
                self._done(batch, error=e)
                continue
            delay = 0.5
            self._done(batch, result=result)

    def _head(self) -> list[_Item]:
        """The first item; consecutive metric items go in one request (up to 1000 values)."""
        batch = [self._items[0]]
        if batch[0].kind == "metrics":
            n = batch[0].metrics
            for item in itertools.islice(self._items, 1, None):
                if item.kind != "metrics" or n + item.metrics > 1000:
                    break
                batch.append(item)
                n += item.metrics
        return batch

    def _send(self, batch: list[_Item]) -> Any:
        item = batch[0]
        if item.kind == "metrics":
            self.client.log_batch(self.run_id, metrics=[m for it in batch for m in it.payload])
        elif item.kind == "tags":
            self.client.log_batch(self.run_id, tags=item.payload)
        elif item.kind == "image":
            self.client.log_artifacts(self.run_id, str(item.payload), artifact_path="images")
            if not self._images_tagged:  # what MLflow's log_image sets, for the UI
                from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_IMAGES

                self.client.set_tag(self.run_id, MLFLOW_LOGGED_IMAGES, True)
                self._images_tagged = True
        elif item.kind == "model":
            if not self._run_open:  # log_model links the model to the fluent active run
                start_run_by_id(self.run_id)
                self._run_open = True
            folder, name = item.payload
            return log_folder_model(folder, name=name, step=item.step).model_uri
        elif item.kind == "best":  # behind its model item: one best model per run
            model, value = item.payload
            self.best_value = None if model.error is not None or not model.result else settle_best(
                self.client, self.run_id, model.result, self.best_metric, value, self.best_mode == "max")
        elif item.kind == "end":
            if self.lost:
                self.client.set_tag(self.run_id, LOST_TAG, f"{self.lost_summary()} "
                                    f"({'; '.join(sorted(self.lost_reasons))})"[:5000])
            self.client.set_terminated(self.run_id, item.payload)
        return None

    def _poisoned(self, item: _Item) -> bool:
        """An item that keeps failing on a server that answers is given up, not retried forever.
        Only failures with the server answering count: one that failed while the server was
        down must not be dropped because the server came back just before the count."""
        try:
            check_reachable(self.uri, timeout=2.0)
        except TrackingError:
            item.failures = 0  # an outage, not this item
            return False
        item.failures += 1
        return item.failures >= POISON_TRIES

    def _outage(self, e: Exception) -> None:
        with self._cond:
            self._last_error = brief(e)
            if self._down_since is None:
                self._down_since = time.monotonic()
                self.say(f"[vaegan] MLflow at {self.uri} is not answering ({self._last_error}); "
                         "training goes on, what it logs is kept and sent when MLflow is back")
            self._cond.notify_all()  # flush() stops waiting

    def _done(self, batch: list[_Item], result: Any = None, error: BaseException | None = None) -> None:
        with self._cond:
            if self._down_since is not None and error is None:
                self.say(f"[vaegan] MLflow at {self.uri} is back after "
                         f"{time.monotonic() - self._down_since:.0f} s; sending the "
                         f"{len(self._items)} item(s) kept meanwhile")
                self._down_since = None
            for item in batch:
                self._items.popleft()
                self._metrics -= item.metrics
                self._spooled -= item.spooled
                if item.kind in ("image", "model"):
                    shutil.rmtree(item.payload if item.kind == "image" else item.payload[0],
                                  ignore_errors=True)
                item.result, item.error = result, error
                if error is not None and item.done is None:
                    self._lose_item(item, brief(error))
                if item.done is not None:
                    item.done.set()
            self._cond.notify_all()

    def _stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def _note_unsent(self) -> None:
        with self._cond:
            for item in self._items:
                if item.kind != "end":
                    self._lose_item(item, f"MLflow unreachable until the end of "
                                    f"tracking.outage_grace_seconds={self.grace_seconds:g}")

    def _lose_item(self, item: _Item, reason: str) -> None:
        kind = {"metrics": "metric steps", "image": "images", "tags": "tags"}.get(item.kind, "models")
        self._lose(kind, item.label, reason)

    def _lose(self, kind: str, label: str, reason: str) -> None:
        with self._cond:  # the sender reads them for the run's tag
            self.lost.setdefault(kind, []).append(label)
            self.lost_reasons.add(reason)

    def _spool_model(self, path: str | Path, name: str, required: bool) -> Path | None:
        """A copy (hard links where possible) of the model files of a checkpoint folder that
        training deletes once reported; None (and reported lost) when the spool is full,
        unless `required` (the final model)."""
        from vaegan.artifact import folder_files

        files = folder_files(path)
        size = sum(f.stat().st_size for f in files.values())
        if not required and self._spooled + size > self.max_spool:
            self._lose("models", name, f"spool over tracking.max_spool_mb={self.max_spool >> 20}")
            return None
        folder = self.spool / f"{next(self._serial):07d}-{name}"
        folder.mkdir()
        for f in files.values():
            try:
                os.link(f, folder / f.name)
            except OSError:
                shutil.copy2(f, folder / f.name)
        return folder


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir())
