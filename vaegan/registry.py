"""The MLflow Model Registry: load a model by URI, register, list and promote versions.

    load_model(uri)                 models:/NAME@ALIAS | models:/NAME/VERSION | models:/NAME/latest |
                                    models:/m-<id> | runs:/RUN_ID/PATH | a local folder -> VAEGANModel
    register(model_uri, name)       a logged model -> a new version of NAME
    list_versions / promote         governance: an alias moves only if a metric is not worse
    register_attribute_version      the paper's attribute vectors as a new version of the same weights

URIs are resolved with errors that name what is missing (the model, the alias, the version).
The pyfunc wrapper that the registered versions hold is `vaegan.pyfunc`.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch

from vaegan.artifact import ModelError, model_files
from vaegan.attributes import ATTRIBUTE_IMAGES, EditReport
from vaegan.config import COMPARE_METRIC
from vaegan.inference import VAEGANModel, load_files, load_folder, resolve_device

# Versions registered before vaegan.pyfunc existed pickled this class path: keep it loadable.
from vaegan.pyfunc import VAEGANPyfunc  # noqa: F401
from vaegan.tracking import check_reachable, log_folder_model, retry, start_run_by_id


class PromotionError(ModelError):
    """A promotion refused: the challenger is worse, or cannot be compared (see --force)."""


def register(model_uri: str, name: str, alias: str | None = None, retry_seconds: float = 0.0,
             tags: dict[str, str] | None = None) -> str:
    """Register a logged model under `name` as a new version (with version `tags`, set as it
    is created); point `alias` at it if given.

    No alias is needed for "latest": MLflow reserves that name, and `models:/NAME/latest`
    always resolves to the newest version, which this one now is.

    An unreachable server is retried for `retry_seconds` (the end of training: MLflow may be
    restarting); a retry first looks for a version of this model that an earlier try made
    but whose answer was lost, so a retry never makes a second version.
    """
    tries = 0

    def register_once():
        nonlocal tries
        tries += 1
        if tries > 1:
            for v in mlflow.MlflowClient().search_model_versions(f"name='{_q(name)}'"):
                if model_uri in (v.source, f"models:/{getattr(v, 'model_id', None)}"):
                    return v
        return mlflow.register_model(model_uri, name, tags=tags)

    uri = mlflow.get_tracking_uri()
    version = retry(register_once, seconds=retry_seconds, what=f"registering {model_uri} as {name!r}",
                    uri=uri)
    if alias:
        retry(lambda: mlflow.MlflowClient().set_registered_model_alias(name, alias, version.version),
              seconds=retry_seconds, what=f"setting alias {alias!r} of {name!r}", uri=uri)
        return f"models:/{name}@{alias}"
    return f"models:/{name}/latest"


# ---------------------------------------------------------------------------------------
# Resolving URIs with messages that name what is missing.

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<ref>[^/]+))?/?$")


def client_for(tracking_uri: str | None = None) -> mlflow.MlflowClient:
    """A client for `tracking_uri` (default: MLflow's current URI); an http server that does
    not answer fails in seconds (MLflow's own client retries for minutes)."""
    uri = tracking_uri or mlflow.get_tracking_uri()
    check_reachable(uri)
    # The registry too: left out, MLflow 3 takes its default registry (a new ./mlflow.db),
    # and `make demo` could not find the model it had just registered.
    return mlflow.MlflowClient(uri, registry_uri=uri)


def _q(name: str) -> str:
    return name.replace("'", "\\'")


def _versions(client: mlflow.MlflowClient, name: str) -> list:
    return sorted(client.search_model_versions(f"name='{_q(name)}'"), key=lambda v: int(v.version))


def _no_such_model(client: mlflow.MlflowClient, name: str) -> ModelError:
    names = [m.name for m in client.search_registered_models(max_results=50)]
    return ModelError(f"no registered model named {name!r}; registered models: "
                      f"{', '.join(names) or '(none)'}")


def get_version(client: mlflow.MlflowClient, name: str, ref: str):
    """ref: an alias, '@alias', a version number or 'latest' -> the ModelVersion, or a
    ModelError naming the model's aliases / versions."""
    from mlflow.exceptions import MlflowException

    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        raise _no_such_model(client, name) from None
    ref = ref[1:] if ref.startswith("@") else ref
    versions = _versions(client, name)
    if ref == "latest":
        if not versions:
            raise ModelError(f"model {name!r} has no versions yet")
        return versions[-1]
    if ref.isdigit():
        # a version is a str from a tracking server, an int from a local (SQLite) store
        found = [v for v in versions if str(v.version) == str(int(ref))]
        if not found:
            listed = ", ".join(str(v.version) for v in versions) or "(none)"
            raise ModelError(f"model {name!r} has no version {ref}; its versions: {listed}")
        return found[0]
    aliases = getattr(registered, "aliases", {}) or {}
    if ref not in aliases:
        listed = ", ".join(f"{a} (v{v})" for a, v in sorted(aliases.items())) or "(none)"
        raise ModelError(f"model {name!r} has no alias {ref!r}; its aliases: {listed}")
    return client.get_model_version(name, aliases[ref])


def resolve_uri(client: mlflow.MlflowClient, uri: str):
    """models:/NAME@ALIAS, models:/NAME/VERSION, models:/NAME/latest -> the ModelVersion;
    other URIs (runs:/, models:/m-<id>, stages) -> None (MLflow resolves them)."""
    m = _MODELS_URI.match(uri)
    if not m or (m["alias"] is None and m["ref"] is None):
        return None  # models:/m-<id> (a logged model) or not a registry URI
    if m["ref"] is not None and not (m["ref"].isdigit() or m["ref"] == "latest"):
        return None  # a stage name (deprecated in MLflow): MLflow's own resolution
    return get_version(client, m["name"], m["alias"] if m["alias"] is not None else m["ref"])


def download_model(uri: str, dst: str | Path, tracking_uri: str | None = None) -> tuple[Path, dict]:
    """Download the model at `uri` into `dst` -> (its local folder, info {uri, name, version,
    run_id, model_id})."""
    from mlflow.exceptions import MlflowException

    client = client_for(tracking_uri)
    version = resolve_uri(client, uri)
    info: dict[str, Any] = {"uri": uri}
    target = uri
    if version is not None:
        info.update(name=version.name, version=int(version.version), run_id=version.run_id or "",
                    model_id=getattr(version, "model_id", None) or "")
        # pinned (an alias may move meanwhile), and as the version's own artifact location:
        # a models:/NAME/VERSION URI would be resolved in MLflow's default registry, not this one
        target = client.get_model_version_download_uri(version.name, version.version)
    elif uri.startswith("runs:/"):
        info["run_id"] = uri[len("runs:/"):].split("/", 1)[0]
    # a model is a few small files: MLflow's per-file progress bars would be console noise
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=target, dst_path=str(dst),
                                                    tracking_uri=client.tracking_uri)
    except MlflowException as e:
        raise ModelError(f"cannot load a model from {uri!r}: {e.message}") from None
    except OSError as e:
        raise ModelError(f"cannot load a model from {uri!r}: {e}") from None
    return Path(local), info


# ---------------------------------------------------------------------------------------
# Listing and promotion.


def run_metric(client: mlflow.MlflowClient, version, metric: str) -> float | None:
    """The latest value of `metric` in the version's run, or None."""
    if not version.run_id:
        return None
    return client.get_run(version.run_id).data.metrics.get(metric)


def list_versions(client: mlflow.MlflowClient, name: str | None = None,
                  metric: str = COMPARE_METRIC) -> list[dict]:
    """One row per version (of `name`, or of every registered model)."""
    if name:
        try:
            models = [client.get_registered_model(name)]
        except mlflow.exceptions.MlflowException:
            raise _no_such_model(client, name) from None
    else:
        models = client.search_registered_models(max_results=1000)
    rows = []
    for rm in models:
        by_version: dict[str, list[str]] = {}
        for alias, v in (getattr(rm, "aliases", {}) or {}).items():
            by_version.setdefault(str(v), []).append(alias)
        for v in _versions(client, rm.name):
            rows.append({"name": rm.name, "version": int(v.version),
                         "aliases": sorted(by_version.get(str(v.version), [])),
                         metric: run_metric(client, v, metric), "run_id": v.run_id or "",
                         "attributes": v.tags.get("vaegan.attributes", ""),
                         "created": v.creation_timestamp})
    return rows


@dataclass
class Promotion:
    name: str
    alias: str
    version: int
    previous: int | None
    metric: str
    value: float | None
    previous_value: float | None
    forced: bool

    def format(self) -> str:
        def show(x):
            return "n/a" if x is None else f"{x:.4g}"

        was = f"v{self.previous} ({self.metric} {show(self.previous_value)})" if self.previous else "(none)"
        return (f"{self.name}@{self.alias}: {was} -> v{self.version} ({self.metric} {show(self.value)})"
                + ("  [forced]" if self.forced else ""))


def promote(client: mlflow.MlflowClient, name: str, source: str, alias: str, metric: str = COMPARE_METRIC,
            higher_is_better: bool = False, force: bool = False) -> Promotion:
    """Point `alias` at the version `source` names (an alias or a version number) if its
    `metric` (from the versions' runs) is not worse than that of the version `alias` points
    at now; refuse (PromotionError) otherwise, or when it cannot be compared, unless `force`."""
    if alias == "latest":
        raise ModelError("'latest' is reserved by MLflow (models:/NAME/latest is always the newest "
                         "version); promote to another alias, e.g. champion")
    new = get_version(client, name, source)
    aliases = getattr(client.get_registered_model(name), "aliases", {}) or {}
    old = client.get_model_version(name, aliases[alias]) if alias in aliases else None
    value = run_metric(client, new, metric)
    old_value = run_metric(client, old, metric) if old is not None else None
    result = Promotion(name, alias, int(new.version), int(old.version) if old else None, metric, value,
                       old_value, forced=False)
    if old is not None and str(old.version) == str(new.version):
        return result  # already there
    if old is not None:
        better = "higher" if higher_is_better else "lower"
        if value is None or old_value is None:
            missing = f"v{new.version}" if value is None else f"v{old.version}"
            problem = f"{missing} has no metric {metric!r} in its run, so the versions cannot be compared"
        elif (value < old_value) if higher_is_better else (value > old_value):
            problem = (f"v{new.version} ({source}) has {metric} {value:.4g}, worse than {alias} "
                       f"v{old.version}'s {old_value:.4g} ({better} is better)")
        else:
            problem = ""
        if problem and not force:
            raise PromotionError(f"refusing to promote {name} v{new.version} to {alias!r}: {problem}; "
                                 "pass --force to promote anyway")
        result.forced = bool(problem)
    client.set_registered_model_alias(name, alias, new.version)
    return result


# ---------------------------------------------------------------------------------------
# Loading by URI.


def load_model(uri: str | os.PathLike, device: str | torch.device = "auto",
               tracking_uri: str | None = None) -> VAEGANModel:
    """A VAEGANModel from the registry or a folder.

    uri: models:/NAME@ALIAS | models:/NAME/VERSION | models:/NAME/latest | models:/m-<id> |
      runs:/RUN_ID/PATH | a local checkpoint folder (model.pt + config.yaml) or a downloaded
      MLflow model folder. Registry URIs use `tracking_uri`, else MLflow's current one
      ($MLFLOW_TRACKING_URI). Unknown names, aliases and versions raise ModelError naming them.
    device: auto (a GPU if there is one) | cpu | cuda[:i].
    """
    device = resolve_device(device)
    text = os.fspath(uri)
    if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+:/", text):  # no scheme: a local folder
        if not Path(text).exists():
            raise ModelError(f"{text!r} is neither a model URI (models:/..., runs:/...) nor an existing "
                             "folder")
        return load_folder(text, device)
    with tempfile.TemporaryDirectory(prefix="vaegan-model-") as tmp:
        local, info = download_model(text, tmp, tracking_uri=tracking_uri)
        return load_files(model_files(local), device, info=info)


# ---------------------------------------------------------------------------------------
# Attribute vectors as a new model version.


def register_attribute_version(uri: str, shards: str, *, featurizer: str | None = None,
                               max_images: int = ATTRIBUTE_IMAGES, eval_images: int = 1000,
                               strength: float = 1.0, name: str | None = None, alias: str | None = None,
                               experiment: str = "vaegan", featurizer_steps: int | None = None,
                               tracking_uri: str | None = None, device: str = "auto", s3_endpoint: str = "",
                               log=print) -> tuple[str, VAEGANModel, EditReport]:
    """`vaegan models attributes`: the model at `uri` with the vectors of every attribute in
    the shards' manifest, its edits scored by an attribute classifier (`featurizer`, or one
    trained on the shards), registered as a new version of the same weights.

    The new version is logged into the source version's run (same weights, so the run's eval
    metrics still describe it, and `promote` can compare it); a model from a folder gets a new
    run in `experiment`. -> (the new version's URI, the model with vectors, the EditReport).
    """
    from vaegan.attributes import attribute_model
    from vaegan.featurizer import STEPS, load_featurizer, train_featurizer

    if alias == "latest":
        raise ModelError("'latest' is reserved by MLflow; models:/NAME/latest already is the newest version")
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    client = client_for(tracking_uri)
    model = load_model(uri, device=device, tracking_uri=client.tracking_uri)
    name = name or model.info.get("name")
    if not name:
        raise ModelError(f"{uri!r} is not a registered model version; pass --name to register the vectors")
    if featurizer:
        feat = load_featurizer(featurizer, device=model.device)
    else:
        log("no --featurizer: training an attribute classifier on the shards")
        feat = train_featurizer(shards, "all", None, steps=featurizer_steps or STEPS, device=model.device,
                                log=log)
    edited, report = attribute_model(model, shards, feat, max_images=max_images, eval_images=eval_images,
                                     strength=strength, s3_endpoint=s3_endpoint, log=log)
    edited.attribute_meta.update(source_uri=uri, featurizer={
        "path": featurizer or "(trained for this run)", "labels": feat.meta.labels,
        "val_accuracy": feat.meta.val_accuracy})
    logged = _log_into_source_run(client, edited, report, model.info.get("run_id") or "", experiment, name)
    version = mlflow.register_model(logged.model_uri, name)
    for key, value in (("vaegan.attributes", ",".join(edited.attribute_vectors)), ("vaegan.source", uri),
                       ("vaegan.edit_flipped", f"{report.mean_flipped:.4f}")):
        client.set_model_version_tag(name, version.version, key, value)
    client.update_model_version(name, version.version, description=report.format())
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return f"models:/{name}/{version.version}", edited, report


def _log_into_source_run(client: mlflow.MlflowClient, model: VAEGANModel, report: EditReport, run_id: str,
                         experiment: str, name: str):
    """Log the model with vectors (and the edit scores) into the run of the version it came
    from, leaving that run's status as it was; or into a new run of `experiment`."""
    status = client.get_run(run_id).info.status if run_id else None
    with tempfile.TemporaryDirectory(prefix="vaegan-attrs-") as tmp:
        if run_id:
            run = start_run_by_id(run_id)
        else:
            exp = mlflow.set_experiment(experiment)
            run = mlflow.start_run(experiment_id=exp.experiment_id, run_name=f"attributes-{name}")
        with run:
            mlflow.log_metrics(report.as_metrics())
            logged = log_folder_model(model.save(tmp), name="model-attributes")
    if status and status != "FINISHED":  # leave a still-running (or failed) training run as it was
        client.update_run(run_id, status=status)
    return logged
