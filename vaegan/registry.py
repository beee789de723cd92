"""The registered artifact, and what is done with it in the MLflow registry.

A registered vaegan model is an MLflow pyfunc model (a `PythonModel`), because
`mlflow.pytorch.log_model` would export a graph with only `forward` (PLATFORM.md). Its
artifacts are plain files, and the vaegan package travels with it (`code_paths`), so serving
needs no install:

    artifacts/model.pt         the VAEGAN state_dict (torch.load(weights_only=True): no pickle)
    artifacts/config.yaml      the resolved config
    artifacts/state.json       training step, run id, vaegan version (checkpoints only)
    artifacts/attributes.json  attribute vectors and their edit scores (`vaegan models attributes`)

predict / REST. The input is one float32 tensor of rank 4, the op and its options are params:

    op           input                                       output
    reconstruct  images (B, C, H, W) or (B, H, W, C), [-1, 1]  images (B, C, H, W) in [-1, 1]
    encode       images                                      {"mu": (B, L), "log_var": (B, L)}
    decode       z as (B, L, 1, 1) (DCGAN's noise shape)      images
    sample       ignored (send [[[[0]]]]); params n, seed    images (n, C, H, W)
    edit         images; param attributes "Eyeglasses=1,Smiling=-1"   images
    interpolate  two images; param steps                     images (steps, C, H, W)

    curl -X POST http://HOST:PORT/invocations -H 'Content-Type: application/json' \\
         -d '{"inputs": [[[[0.0]]]], "params": {"op": "sample", "n": 4, "seed": 1}}'

Requests are capped (MAX_SAMPLES samples, MAX_IMAGES images, MAX_STEPS steps); bad input is
an MlflowException with INVALID_PARAMETER_VALUE, which the scoring server answers with a 400
and the message.

Registry actions: `download_model` (URIs resolved with clear errors), `list_versions`,
`promote` (alias moves only if a metric is not worse), `register_attribute_version` (the
paper's attribute vectors as a new model version of the same weights).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch

from vaegan.models import ATTRIBUTE_IMAGES, ATTRIBUTES_FILE, ModelError, VAEGANModel

OPS = ("reconstruct", "sample", "encode", "decode", "edit", "interpolate")
MAX_SAMPLES = 1024  # op=sample: n per request
MAX_IMAGES = 256  # images (or z rows) per request
MAX_STEPS = 64  # op=interpolate: steps per request
DEVICE_ENV = "VAEGAN_DEVICE"  # where a loaded pyfunc runs: auto (default) | cpu | cuda[:i]
DEFAULT_METRIC = "eval_fid_samples"  # what `promote` compares by default (lower is better)


class PromotionError(ModelError):
    """A promotion refused: the challenger is worse, or cannot be compared (see --force)."""


# ---------------------------------------------------------------------------------------
# The pyfunc model.


def parse_attributes(spec: str | dict | list[str]) -> dict[str, float]:
    """'Eyeglasses=1,Smiling=-0.5' (or a JSON object, or ['Eyeglasses=+1', ...]) -> dict."""
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        text = spec if isinstance(spec, str) else ",".join(spec)
        text = text.strip()
        if text.startswith("{"):
            try:
                items = list(json.loads(text).items())
            except (ValueError, AttributeError) as e:
                raise ModelError(f"attributes {text!r} is not a JSON object ({e})") from None
        else:
            items = []
            for part in filter(None, (p.strip() for p in text.split(","))):
                name, eq, value = part.partition("=")
                if not eq or not name.strip():
                    raise ModelError(f"attribute edit {part!r} is not NAME=STRENGTH (e.g. Eyeglasses=+1)")
                items.append((name.strip(), value.strip()))
    out = {}
    for name, value in items:
        try:
            out[name] = float(value)
        except (TypeError, ValueError):
            raise ModelError(f"attribute {name!r}: strength {value!r} is not a number") from None
    if not out:
        raise ModelError("no attribute edits given; pass e.g. attributes='Eyeglasses=1,Smiling=-1'")
    return out


def _int_param(params: dict, key: str, default: int, lo: int, hi: int) -> int:
    value = params.get(key, default)
    if value is None:
        value = default
    try:
        as_int = int(value)
    except (TypeError, ValueError):
        raise ModelError(f"{key}={value!r} is not allowed; it must be an integer in {lo}..{hi}") from None
    if as_int != value and not (isinstance(value, (np.integer, str)) and str(as_int) == str(value)):
        raise ModelError(f"{key}={value!r} is not allowed; it must be an integer in {lo}..{hi}")
    if not lo <= as_int <= hi:
        raise ModelError(f"{key}={as_int} is not allowed; it must be in {lo}..{hi}")
    return as_int


def predict_op(model: VAEGANModel, model_input: Any, params: dict | None) -> np.ndarray | dict:
    """One request: the op in params["op"] on the rank-4 float input (module docstring)."""
    params = params or {}
    op = params.get("op") or "reconstruct"
    if op not in OPS:
        raise ModelError(f"unknown op {op!r}; choose one of: {', '.join(OPS)}")
    if op == "sample":
        n = _int_param(params, "n", 16, 1, MAX_SAMPLES)
        seed = _int_param(params, "seed", -1, -1, 2**63 - 1)
        return _out(model.sample(n, seed=None if seed < 0 else seed))
    try:
        x = np.asarray(model_input, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ModelError(f"op={op}: the input must be a rank-4 array of numbers ({e})") from None
    if x.ndim >= 1 and len(x) > MAX_IMAGES:
        raise ModelError(f"op={op}: {len(x)} rows in one request; at most {MAX_IMAGES} are allowed")
    if op == "decode":
        L = model.latent_dim
        if x.ndim == 4 and x.shape[1:] == (L, 1, 1):
            x = x[:, :, 0, 0]
        elif not (x.ndim == 2 and x.shape[1] == L):
            raise ModelError(f"op=decode takes z as a (B, {L}, 1, 1) tensor (latent_dim {L}); got shape "
                             f"{tuple(x.shape)}")
        return _out(model.decode(x))
    if x.ndim != 4:
        raise ModelError(f"op={op} takes images as (B, C, H, W) or (B, H, W, C); got shape {tuple(x.shape)}")
    if op == "reconstruct":
        return _out(model.reconstruct(x))
    if op == "encode":
        mu, log_var = model.encode(x)
        return {"mu": _out(mu), "log_var": _out(log_var)}
    if op == "edit":
        if not params.get("attributes"):
            raise ModelError("op=edit needs params attributes, e.g. 'Eyeglasses=1,Smiling=-1'; this model "
                             f"knows: {', '.join(model.attribute_vectors) or '(no attribute vectors)'}")
        return _out(model.edit(x, parse_attributes(params["attributes"])))
    # interpolate
    steps = _int_param(params, "steps", 8, 2, MAX_STEPS)
    if len(x) != 2:
        raise ModelError(f"op=interpolate takes exactly 2 images (a and b); got {len(x)}")
    return _out(model.interpolate(x[:1], x[1:], steps=steps))


def _out(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


class VAEGANPyfunc(mlflow.pyfunc.PythonModel):
    """predict(rank-4 float32 tensor, params={"op": ..., ...}); see the module docstring."""

    # MLflow would wrap predict for type-hint validation (and warn that it has none): the
    # signature and predict_op check the input instead.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from vaegan.models import load_model_files

        files = context.artifacts
        if "checkpoint" in files:  # logged before the artifacts were split out: a whole checkpoint
            files = checkpoint_files(files["checkpoint"])
        self.model = load_model_files(files, device=os.environ.get(DEVICE_ENV, "auto"))

    def predict(self, context, model_input, params: dict | None = None):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            return predict_op(self.model, model_input, params)
        except ModelError as e:  # the scoring server answers this with a 400 and the message
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None


def signature(channels: int | None = None, image_size: int | None = None):
    """A rank-4 float32 input (images, z as (B, L, 1, 1), or a dummy for sample) and the op's
    params. The arguments are accepted for older callers; which shapes fit is checked by the
    model, whose error then says what it takes."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1, -1))]),
        params=ParamSchema([
            ParamSpec("op", "string", "reconstruct"), ParamSpec("n", "long", 16),
            ParamSpec("seed", "long", -1), ParamSpec("attributes", "string", ""),
            ParamSpec("steps", "long", 8)]),
    )


def pip_requirements() -> list[str]:
    """Pinned to what runs here, so a served model gets the same stack."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "mlflow", "numpy", "pyyaml", "pillow")]


def log_model_files(files: dict[str, str | Path], name: str, step: int | None = None):
    """Log {"weights", "config", "state"?, "attributes"?} files as a pyfunc model of the
    active run (MLflow 3: its own LoggedModel, linked to the run and `step`)."""
    from vaegan.models import load_model_files

    cfg = load_model_files(files).cfg  # refuse files that do not load, before logging anything
    kwargs = {"step": step} if step is not None else {}
    return mlflow.pyfunc.log_model(
        name=name, python_model=VAEGANPyfunc(), artifacts={k: str(v) for k, v in files.items()},
        signature=signature(cfg.model.channels, cfg.model.image_size),
        pip_requirements=pip_requirements(),
        # The package travels with the model, so a serving environment needs no vaegan install.
        code_paths=[str(Path(__file__).parent)], **kwargs)


def checkpoint_files(checkpoint_dir: str | Path) -> dict[str, Path]:
    """The files of a checkpoint folder a model needs (not the optimizer states)."""
    from vaegan.checkpoint import CONFIG, MODEL, STATE

    d = Path(checkpoint_dir)
    files = {"weights": d / MODEL, "config": d / CONFIG}
    for key, fname in (("state", STATE), ("attributes", ATTRIBUTES_FILE)):
        if (d / fname).is_file():
            files[key] = d / fname
    return files


def log_checkpoint_model(checkpoint_dir: str | Path, name: str, step: int):
    """Log a checkpoint directory as a pyfunc model of the active run, linked to `step`."""
    return log_model_files(checkpoint_files(checkpoint_dir), name, step)


def register(model_uri: str, name: str, alias: str | None = None) -> str:
    """Register a logged model under `name` as a new version; point `alias` at it if given.

    No alias is needed for "latest": MLflow reserves that name, and `models:/NAME/latest`
    always resolves to the newest version, which this one now is.
    """
    version = mlflow.register_model(model_uri, name)
    if alias:
        mlflow.MlflowClient().set_registered_model_alias(name, alias, version.version)
        return f"models:/{name}@{alias}"
    return f"models:/{name}/latest"


# ---------------------------------------------------------------------------------------
# Resolving URIs with messages that name what is missing.

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<ref>[^/]+))?/?$")


def client_for(tracking_uri: str | None = None) -> mlflow.MlflowClient:
    """A client for `tracking_uri` (default: MLflow's current URI); an http server that does
    not answer fails in seconds (MLflow's own client retries for minutes)."""
    from vaegan.tracking import check_reachable

    uri = tracking_uri or mlflow.get_tracking_uri()
    check_reachable(uri)
    return mlflow.MlflowClient(uri)


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
        found = [v for v in versions if v.version == str(int(ref))]
        if not found:
            listed = ", ".join(v.version for v in versions) or "(none)"
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
        target = f"models:/{version.name}/{version.version}"  # pinned: an alias may move meanwhile
    elif uri.startswith("runs:/"):
        info["run_id"] = uri[len("runs:/"):].split("/", 1)[0]
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
                  metric: str = DEFAULT_METRIC) -> list[dict]:
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
                         "aliases": sorted(by_version.get(v.version, [])),
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


def promote(client: mlflow.MlflowClient, name: str, source: str, alias: str, metric: str = DEFAULT_METRIC,
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
    if old is not None and old.version == new.version:
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
# Attribute vectors as a new model version.


def register_attribute_version(uri: str, shards: str, *, featurizer: str | None = None,
                               max_images: int = ATTRIBUTE_IMAGES, eval_images: int = 1000,
                               strength: float = 1.0, name: str | None = None, alias: str | None = None,
                               experiment: str = "vaegan", featurizer_steps: int | None = None,
                               tracking_uri: str | None = None, device: str = "auto", s3_endpoint: str = "",
                               log=print) -> tuple[str, VAEGANModel, Any]:
    """`vaegan models attributes`: compute the vectors of every attribute in the shards'
    manifest from up to `max_images` training images, score edits on up to `eval_images`
    held-out images with an attribute classifier (`featurizer`, or one trained on the shards),
    and register the same weights plus the vectors as a new version.

    The new version is logged into the source version's run (same weights, so the run's eval
    metrics still describe it, and `promote` can compare it); a model from a folder gets a new
    run in `experiment`. -> (the new version's URI, the model with vectors, the EditReport).
    """
    from vaegan.featurizer import STEPS, load_featurizer, train_featurizer
    from vaegan.models import attribute_vectors_from_shards, load_model, load_split, measure_edits

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    client = client_for(tracking_uri)
    model = load_model(uri, device=device, tracking_uri=client.tracking_uri)
    name = name or model.info.get("name")
    if not name:
        raise ModelError(f"{uri!r} is not a registered model version; pass --name to register the vectors")
    log(f"attribute vectors of {uri} from up to {max_images} training images of {shards}")
    vectors, meta = attribute_vectors_from_shards(model, shards, max_images, s3_endpoint=s3_endpoint)
    edited = VAEGANModel(model.net, model.cfg, vectors, meta, device=model.device, info=model.info)
    if featurizer:
        feat = load_featurizer(featurizer, device=model.device)
    else:
        log("no --featurizer: training an attribute classifier on the shards")
        feat = train_featurizer(shards, "all", None, steps=featurizer_steps or STEPS, device=model.device,
                                log=log)
    images, attrs, names = load_split(shards, eval_images, "val", s3_endpoint=s3_endpoint)
    report = measure_edits(edited, feat, images, attrs, names, strength=strength)
    edited.attribute_meta.update(
        edit=report.to_dict(), source_uri=uri,
        featurizer={"path": featurizer or "(trained for this run)", "labels": feat.meta.labels,
                    "val_accuracy": feat.meta.val_accuracy})

    run_id = model.info.get("run_id") or ""
    status = client.get_run(run_id).info.status if run_id else None
    with tempfile.TemporaryDirectory(prefix="vaegan-attrs-") as tmp:
        files = checkpoint_files(edited.save(tmp))
        if run_id:
            from vaegan.tracking import start_run_by_id

            run = start_run_by_id(run_id)
        else:
            exp = mlflow.set_experiment(experiment)
            run = mlflow.start_run(experiment_id=exp.experiment_id, run_name=f"attributes-{name}")
        with run:
            mlflow.log_metrics(report.as_metrics())
            logged = log_model_files(files, name="model-attributes")
    if status and status != "FINISHED":  # leave a still-running (or failed) training run as it was
        client.update_run(run_id, status=status)
    version = mlflow.register_model(logged.model_uri, name)
    client.set_model_version_tag(name, version.version, "vaegan.attributes", ",".join(vectors))
    client.set_model_version_tag(name, version.version, "vaegan.source", uri)
    client.set_model_version_tag(name, version.version, "vaegan.edit_flipped", f"{report.mean_flipped:.4f}")
    client.update_model_version(name, version.version, description=report.format())
    if alias:
        if alias == "latest":
            raise ModelError("'latest' is reserved by MLflow; models:/NAME/latest already is this version")
        client.set_registered_model_alias(name, alias, version.version)
    return f"models:/{name}/{version.version}", edited, report
