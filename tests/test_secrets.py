"""No credential leaks: values planted in the AWS and MLflow credential variables and in URIs
(userinfo of the tracking URI and of the S3 endpoint, a presigned-style query) are found
nowhere a run writes, logs or prints: not in any MLflow param or tag, artifact or logged
model (config.yaml included), registered model version, the checkpoint storage (Ray's own
files too), Ray's session logs, or the console of the driver (which Ray workers print to).

The run is what a user would start: one process (a subprocess, so every Ray process it
starts inherits the planted environment) that trains the debug preset and then sweeps it,
against a real MLflow server and a real S3-protocol server (moto)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import mlflow
import pytest
from servers import env_with_venv

from vaegan.config import load_config, redact_text, redact_url

# ---------------------------------------------------------------------------------------
# The redaction itself


def test_userinfo_and_query_credentials_are_redacted_and_harmless_parts_kept():
    assert redact_url("https://user:tok@mlflow.example.com:5000/p") == "https://***@mlflow.example.com:5000/p"
    assert redact_url("https://tokenonly@host") == "https://***@host"
    presigned = ("https://b.s3.amazonaws.com/shards/train-000000.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256"
                 "&X-Amz-Credential=AKIA%2F20240101&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600"
                 "&X-Amz-Security-Token=FwoG&X-Amz-Signature=ab12&token=t0k")
    out = redact_url(presigned)
    for secret in ("AKIA", "FwoG", "ab12", "t0k"):
        assert secret not in out
    assert "X-Amz-Date=20240101T000000Z" in out and out.startswith("https://b.s3.amazonaws.com/shards/")
    # what carries no credential stays as it is
    for plain in ("sqlite:////abs/mlruns/mlflow.db", "/data/shards", "s3://bucket/prefix",
                  "http://127.0.0.1:5000", "s3://b/p?endpoint_override=http://127.0.0.1:9000&scheme=http"):
        assert redact_url(plain) == plain
    assert redact_url("postgresql://mlflow:pw@db:5432/mlflow") == "postgresql://***@db:5432/mlflow"


def test_text_config_and_environment_values_are_redacted(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envSecretValue123")
    assert redact_text("failed (key envSecretValue123) at https://u:p@h/x, retrying") == \
        "failed (key ***) at https://***@h/x, retrying"
    cfg = load_config("debug", overrides=["tracking.tracking_uri=http://u:pw@h:5000",
                                          "data.s3_endpoint=http://k:s@h:9000"])
    shown = cfg.redacted()
    assert shown.tracking.tracking_uri == "http://***@h:5000" and shown.data.s3_endpoint == "http://***@h:9000"
    assert cfg.tracking.tracking_uri == "http://u:pw@h:5000"  # the config in use keeps its values
    assert "pw" not in shown.to_yaml() and all("pw" not in str(v) for v in shown.flat().values())


def test_s3_endpoint_credentials_go_to_s3fs_not_into_the_url(monkeypatch):
    from vaegan.data.storage import s3_options

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "envkey")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "envtoken")
    opts = s3_options("http://urlkey:url%2Fsecret@127.0.0.1:9000")
    assert opts["endpoint_url"] == "http://127.0.0.1:9000"  # s3fs refuses userinfo in the URL
    assert (opts["key"], opts["secret"]) == ("urlkey", "url/secret") and "token" not in opts


# ---------------------------------------------------------------------------------------
# A real training run and sweep with planted credentials

RUN = """
import json, sys
from vaegan import cluster
from vaegan.config import load_config
from vaegan.train import main_train
from vaegan.tune import SweepOptions, main_tune

overrides = json.loads(sys.argv[1])
cluster.connect(min_cpus=8)  # one local Ray for both; what they start inherits the environment
main_train(load_config("debug", overrides=overrides + ["train.name=planted-train"]))
main_tune(load_config("debug", overrides=overrides + ["train.name=planted"]),
          SweepOptions(name="planted-sweep", trials=1, workers_per_trial=1, metric="loss",
                       scheduler="fifo", gamma_min=1e-4, gamma_max=1e-2))
cluster.shutdown()
"""


def _upload(folder: str, bucket: str, endpoint: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket=bucket)
    for f in Path(folder).iterdir():
        s3.upload_file(str(f), bucket, f"shards/{f.name}")


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def _found(planted: dict[str, str], data: bytes | str, where: str) -> list[str]:
    if isinstance(data, str):
        data = data.encode("utf-8", "replace")
    return [f"{name} in {where}" for name, value in planted.items() if value.encode() in data]


@pytest.mark.slow
def test_planted_credentials_appear_nowhere(tmp_path, mnist_shards, mlflow_server, s3_server):
    tag = uuid.uuid4().hex[:8]
    planted = {
        "AWS_SECRET_ACCESS_KEY": f"plantedAwsSecret{tag}",
        "AWS_SESSION_TOKEN": f"plantedAwsSession{tag}",
        "MLFLOW_TRACKING_PASSWORD": f"plantedMlflowPassword{tag}",
        "MLFLOW_TRACKING_TOKEN": f"plantedMlflowToken{tag}",
        "tracking URI userinfo": f"plantedUriToken{tag}",
        "S3 endpoint userinfo": f"plantedEndpointSecret{tag}",
        "presigned query signature": f"plantedSignature{tag}",
        "presigned query credential": f"plantedCredential{tag}",
    }
    bucket = f"secrets-{tag}"
    _upload(mnist_shards, bucket, s3_server)
    host = mlflow_server.removeprefix("http://")
    endpoint_host = s3_server.removeprefix("http://")
    overrides = [
        f"tracking.tracking_uri=http://planteduser:{planted['tracking URI userinfo']}@{host}",
        f"data.s3_endpoint=http://testing:{planted['S3 endpoint userinfo']}@{endpoint_host}",
        f"data.shards=s3://{bucket}/shards",
        # a config field that records where data came from, as a presigned URL
        "data.source=https://example.com/mnist.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        f"&X-Amz-Credential={planted['presigned query credential']}"
        f"&X-Amz-Signature={planted['presigned query signature']}",
        f"train.storage_path={tmp_path / 'runs'}", "tracking.experiment=planted",
        "tracking.model_name=planted-model", "tracking.log_checkpoints=true", "train.steps=4",
        "train.log_every=2", "train.checkpoint_every=2", "train.image_every=4", "data.loader_workers=0",
    ]
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths have a limit
    env = {**env_with_venv(), "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(ray_tmp),
           "AWS_ACCESS_KEY_ID": "testing", "MLFLOW_TRACKING_USERNAME": "planteduser",
           **{k: v for k, v in planted.items() if k.isupper()}}
    for unset in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        env.pop(unset, None)  # the endpoint comes from the config, with its credentials
    try:
        proc = subprocess.run([sys.executable, "-c", RUN, json.dumps(overrides)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
        out = proc.stdout.decode("utf-8", "replace")
        print(out)
        assert proc.returncode == 0, out[-4000:]
        assert "[vaegan] done: planted-train" in out and "challenger:" in out
        leaks = _found(planted, proc.stdout, "the console")

        # every run of the experiment: params, tags, artifacts; logged models; registered versions
        client = mlflow.MlflowClient(mlflow_server)
        exp = client.get_experiment_by_name("planted")
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == 3  # the training run, the sweep's parent and its trial
        downloads = tmp_path / "downloads"
        mlflow.set_tracking_uri(mlflow_server)
        for run in runs:
            rid = run.info.run_id
            leaks += _found(planted, json.dumps([run.data.params, run.data.tags]), f"run {rid} params/tags")
            mlflow.artifacts.download_artifacts(run_id=rid, dst_path=str(downloads / rid))
        models = client.search_logged_models(experiment_ids=[exp.experiment_id])
        assert any(m.name == "model" for m in models), [m.name for m in models]
        configs = 0
        for m in models:
            leaks += _found(planted, json.dumps([m.params, m.tags]), f"logged model {m.model_id}")
            d = mlflow.artifacts.download_artifacts(artifact_uri=m.artifact_location,
                                                    dst_path=str(downloads / m.model_id))
            configs += sum(1 for _ in Path(d).rglob("config.yaml"))
        assert configs >= len(models)  # every logged model has its config.yaml, and it was read
        for v in client.search_model_versions("name='planted-model'"):
            leaks += _found(planted, json.dumps([v.source, v.tags, v.description or ""]),
                            f"model version {v.version}")
        scanned = {"MLflow artifacts": downloads, "checkpoint storage": tmp_path / "runs",
                   "Ray session logs": ray_tmp}
        for where, root in scanned.items():
            files = _files(root)
            assert files, where
            for f in files:
                leaks += _found(planted, f.read_bytes(), f"{where}: {f.relative_to(root)}")
        assert any(f.name == "config.yaml" for f in _files(tmp_path / "runs"))
        assert not leaks, "planted credentials found:\n" + "\n".join(leaks)
        # redacted, not dropped: the params still say which server and endpoint were used
        assert {r.data.params["tracking.tracking_uri"] for r in runs} == {f"http://***@{host}"}
        assert {r.data.params["data.s3_endpoint"] for r in runs} == {f"http://***@{endpoint_host}"}
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
