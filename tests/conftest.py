"""Shared fixtures. Integration fixtures (servers, clusters) live in their own modules."""

import pytest
import torch
from servers import free_port, mlflow_server, ray_head, ray_local  # noqa: F401  (fixtures)

from vaegan.config import load_config


@pytest.fixture
def debug_cfg():
    """The debug preset in fp32: exact gradient comparisons need deterministic precision."""
    return load_config("debug", overrides=["train.precision=fp32"])


@pytest.fixture(scope="session")
def mnist_shards(tmp_path_factory):
    """mnist5k as 32x32 shards, prepared once for every integration test."""
    from vaegan.data import prepare

    out = tmp_path_factory.mktemp("shards") / "mnist5k"
    prepare("mnist5k", str(out), image_size=32, channels=1, shard_size=1000, progress=False)
    return str(out)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------
# S3: a real moto server (a subprocess, so Ray workers, DataLoader workers and an MLflow
# server all see the same buckets). No boto/s3fs patching: clients reach it over HTTP.


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """`python -m moto.server` on a free port; AWS_* variables point every client at it for
    the session (credentials are dummies, which moto accepts). Yields the endpoint URL."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": url, "AWS_ENDPOINT_URL": url}
    saved = {k: os.environ.get(k) for k in env}
    try:
        deadline = time.time() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moto server exited with {proc.returncode}; see {log_path}")
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except urllib.error.HTTPError:  # an HTTP error status is an answer too
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"moto server on {url} did not answer in 60 s; see {log_path}")
                time.sleep(0.2)
        os.environ.update(env)
        yield url
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the moto server; yields 's3://NAME'."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"
