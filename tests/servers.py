"""Real servers for integration tests, started by the tests on 127.0.0.1 (free ports).

The one home of the free-port and wait-for-server helpers. Imported by conftest.py, which
makes the fixtures here available to every test. Each fixture starts the real thing as a
subprocess (or, for Ray, in-process) and stops it.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


# Ray's log monitor streams its processes' output to the driver, coloured and prefixed with
# the process: `(raylet)`, `(RayTrainWorker pid=N)`, `(raylet, ip=...)` on other nodes.
ANSI = re.compile(r"\x1b\[[0-9;]*m")
RAY_PREFIX = re.compile(r"^\((?:raylet|\w+ pid=\d+)(?:, ip=[\d.]+)?\)\s*")


def own_lines(text: str) -> str:
    """Captured stderr without the lines Ray streamed in from the session's Ray (`ray_local`
    connects this process as a driver): e.g. the raylet's "disk over 95% full" error arrives
    at any moment on a full CI disk and is no part of the command under test."""
    return "".join(line for line in text.splitlines(keepends=True)
                   if not RAY_PREFIX.match(ANSI.sub("", line)))


def free_port() -> int:
    """A free port for a server that binds it later, from below the kernel's ephemeral range
    (where outgoing connections take theirs, so none can take it meanwhile) and above Ray's
    worker ports (10002-19999)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    draw = random.SystemRandom()  # apart from any seeding: the xdist workers draw differently
    tries = 100 if low > 21000 else 0  # none where there is no such range: any free port
    for port in (draw.randrange(20000, low) for _ in range(tries)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 60.0, log: Path | None = None) -> None:
    """Return once `url` answers below 500; raise if `proc` exits first or `timeout` passes."""
    import requests

    see = f"; see {log}" if log else ""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}{see}")
        try:
            if requests.get(url, timeout=1).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout}s{see}")


def env_with_venv() -> dict[str, str]:
    """The venv's bin first on PATH: Ray and MLflow start subprocesses by name."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server`: SQLite backend, artifacts proxied to a local folder."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log_path = root / "server.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT,
        # No background job runner (huey workers): tests need none, and it costs 4 processes.
        env={**env_with_venv(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(uri + "/health", proc, timeout=300, log=log_path)  # migrations, beside another module
        yield uri
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A real local Ray for the test session, started as `vaegan train` starts one
    (cluster.connect), with 8 logical CPUs over the 2 cores so a sweep's trials and workers
    all fit (docs/platform.md#ray-tune). With its dashboard: Ray Train's placement-group
    watcher asks Ray's State API whether the controller lives, and without one every run's
    end waited 12 s for it to give up. After the S3 server: Ray's worker processes inherit
    the environment ray.init saw, and S3 tests need its AWS_* variables (and the venv's bin
    first on PATH)."""
    import ray

    from vaegan import cluster

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["PATH"] = env_with_venv()["PATH"]
    cluster.connect(min_cpus=8)
    yield ray
    cluster.shutdown()


# S3: a real moto server (a subprocess, so Ray workers, DataLoader workers and an MLflow
# server all see the same buckets). No boto/s3fs patching: clients reach it over HTTP.


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """`python -m moto.server` on a free port; AWS_* variables point every client at it for
    the session (credentials are dummies, which moto accepts). Yields the endpoint URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": url, "AWS_ENDPOINT_URL": url}
    saved = {k: os.environ.get(k) for k in env}
    try:
        wait_http(url, proc, timeout=120, log=log_path)
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


@contextlib.contextmanager
def scoring_server(args: list[str], port: int, env: dict[str, str], log_path: Path):
    """A model server (`mlflow models serve ...`, `vaegan models serve ...`) as a subprocess in
    its own session; yields its URL once /ping answers, then stops the whole session (the
    server and the uvicorn it starts)."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            wait_http(f"http://127.0.0.1:{port}/ping", proc, timeout=180, log=log_path)
            yield f"http://127.0.0.1:{port}"
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
