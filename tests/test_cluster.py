"""The multi-node cluster of infra/local/up.sh, end to end: a Ray head with no CPUs and two
1-CPU worker nodes (each its own raylet), moto S3, PostgreSQL (pgserver) and an MLflow server
on PostgreSQL with artifacts proxied to S3. Jobs go in through Ray job submission, as on a
real cluster (the training job through the `ray job submit` CLI, the others through
JobSubmissionClient); data, checkpoints and MLflow artifacts live in the S3 bucket.

One cluster for the module (up.sh at the start, down.sh at the end, on free ports and a
temporary state folder).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from servers import BIN, env_with_venv, free_port

ROOT = Path(__file__).resolve().parents[1]
UP, DOWN = ROOT / "infra" / "local" / "up.sh", ROOT / "infra" / "local" / "down.sh"
BUCKET = "vaegan-cluster"
SHARDS = f"s3://{BUCKET}/shards"
JOB_TIMEOUT = 480  # seconds; a job takes 1-2 minutes on 2 idle cores

pytestmark = pytest.mark.slow

# Small runs: 4 debug steps, a report every 2, the checkpoint and the image grids at step 4.
QUICK = ["--preset", "debug", "train.steps=4", "train.log_every=2", "train.checkpoint_every=4",
         "train.image_every=4", "tracking.log_checkpoints=false", "data.loader_workers=0"]


@dataclass
class Cluster:
    state: Path
    env: dict[str, str]
    """What up.sh's `env` file exports (RAY_ADDRESS, MLFLOW_TRACKING_URI, AWS_* ...)."""
    local_storage: Path
    """A folder on this machine's disk, for the run that must be refused."""
    timings: dict[str, float] = field(default_factory=dict)
    """Wall seconds of each step, written to STATE/report.json with `nodes` at the end."""
    nodes_seen: dict[str, str] = field(default_factory=dict)
    job_ids: dict[str, str] = field(default_factory=dict)
    results: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def dashboard(self) -> str:
        return self.env["RAY_DASHBOARD_ADDRESS"]

    @property
    def mlflow(self) -> str:
        return self.env["MLFLOW_TRACKING_URI"]

    def log_tails(self) -> str:
        out = []
        for log in sorted((self.state / "logs").glob("*.log")):
            out.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(out)

    def nodes(self) -> list[dict]:
        """Alive Ray nodes from the State API."""
        with urllib.request.urlopen(f"{self.dashboard}/api/v0/nodes?limit=100&detail=false", timeout=10) as r:
            nodes = json.load(r)["data"]["result"]["result"]
        return [n for n in nodes if n["state"] == "ALIVE"]

    def start(self, name: str) -> None:
        """Submit job `name` of `jobs(self)` unless it was: jobs start as early as the cluster
        can take them (the refused one beside the training run; the sweep once that is done)."""
        if name in self.job_ids:
            return
        from ray.job_submission import JobSubmissionClient

        script, args = jobs(self)[name]
        if name != "train":  # the working tree as the job's working_dir, as the CLI sends it
            self.job_ids[name] = JobSubmissionClient(self.dashboard).submit_job(
                entrypoint=shlex.join(["python", script, *args]), runtime_env={"working_dir": str(ROOT)})
            return
        # The training job as the README submits it: the `ray job submit` CLI, in a shell that
        # sourced up.sh's env file (RAY_ADDRESS is the head's GCS address, no --address).
        job_id = f"train-{uuid.uuid4().hex[:8]}"
        cmd = [str(BIN / "ray"), "job", "submit", "--no-wait", "--submission-id", job_id,
               "--working-dir", ".", "--", "python", script, *args]
        done = subprocess.run(cmd, env={**env_with_venv(), **self.env}, cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0 and job_id in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
        self.job_ids[name] = job_id

    def result(self, name: str, timeout: float = JOB_TIMEOUT) -> tuple[str, str]:
        """(final status, logs) of job `name`, submitted now if it was not."""
        if name in self.results:
            return self.results[name]
        from ray.job_submission import JobStatus, JobSubmissionClient

        self.start(name)
        client, job_id = JobSubmissionClient(self.dashboard), self.job_ids[name]
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = client.get_job_status(job_id)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                info = client.get_job_info(job_id)  # submitted -> finished, as the job server saw it
                self.timings[f"{name} job"] = (info.end_time - info.start_time) / 1000
                self.results[name] = str(status.value), client.get_job_logs(job_id)
                return self.results[name]
            time.sleep(0.5)
        client.stop_job(job_id)
        pytest.fail(f"job {name} ({job_id}) still running after {timeout}s; logs:\n"
                    f"{client.get_job_logs(job_id)[-5000:]}")


def jobs(cluster: Cluster) -> dict[str, tuple[str, list[str]]]:
    """The jobs this module submits: name -> (entry point, arguments)."""
    tracking = f"tracking.tracking_uri={cluster.mlflow}"
    return {
        "train": ("jobs/train.py", [
            *QUICK, "train.num_workers=2", "train.cpus_per_worker=1", f"data.shards={SHARDS}",
            f"train.storage_path=s3://{BUCKET}/runs", "train.name=multi-node", tracking,
            "tracking.experiment=cluster", "tracking.model_name=cluster-model"]),
        # Each trial: its driver (0.25 CPU) and one worker (0.5 CPU); two trials at a time fit
        # the two 1-CPU worker nodes (the head has none).
        "sweep": ("jobs/tune.py", [
            *QUICK, "train.cpus_per_worker=0.5", f"data.shards={SHARDS}",
            f"train.storage_path=s3://{BUCKET}/sweeps", tracking, "tracking.experiment=cluster-sweep",
            "tracking.model_name=cluster-sweep-model", "--name", "cluster-sweep", "--trials", "2",
            "--workers-per-trial", "1", "--metric", "loss", "--grace-period", "2", "--max-concurrent", "2"]),
        "refused": ("jobs/train.py", [
            *QUICK, "train.num_workers=2", "train.cpus_per_worker=1", f"data.shards={SHARDS}",
            f"train.storage_path={cluster.local_storage}", "train.name=local-storage", tracking,
            "tracking.experiment=cluster-refused"]),
    }


def _read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            env[key] = value.split("#")[0].strip().strip('"')
    env.pop("PATH", None)  # "$VENV:$PATH": ours already has the venv first
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster")
    env = {**env_with_venv(), "VAEGAN_CLUSTER_DIR": str(state), "VAEGAN_BUCKET": BUCKET,
           "VAEGAN_RAY_PORT": str(free_port()), "VAEGAN_DASHBOARD_PORT": str(free_port()),
           "VAEGAN_S3_PORT": str(free_port()), "VAEGAN_MLFLOW_PORT": str(free_port())}
    t = time.time()
    up = subprocess.run(["bash", str(UP)], env=env, capture_output=True, text=True, timeout=300)
    up_s = time.time() - t
    (state / "up.out").write_text(up.stdout + up.stderr)
    c = Cluster(state, {}, tmp_path_factory.mktemp("local-storage"))
    try:
        assert up.returncode == 0, f"up.sh failed:\n{up.stdout}\n{up.stderr}\n{c.log_tails()}"
        c.env = _read_env_file(state / "env")
        c.timings["up.sh"] = up_s
        with pytest.MonkeyPatch.context() as mp:  # this process talks to the cluster too
            for key, value in c.env.items():
                mp.setenv(key, value)
            from vaegan.data import prepare

            t = time.time()
            prepare("synthetic-faces:64", SHARDS, image_size=32, channels=1, shard_size=16,
                    progress=False)
            c.timings["prepare shards"] = time.time() - t
            # Refused in its driver before any worker asks for CPUs: it runs beside the training.
            c.start("refused")
            c.start("train")
            yield c
    finally:
        run = (state / "runtime_dir").read_text().strip() if (state / "runtime_dir").is_file() else ""
        t = time.time()
        down = subprocess.run(["bash", str(DOWN)], env=env, capture_output=True, text=True, timeout=120)
        c.timings["down.sh"] = time.time() - t
        (state / "down.out").write_text(down.stdout + down.stderr)
        report = {"wall_s": {k: round(v, 1) for k, v in c.timings.items()}, "nodes": c.nodes_seen}
        (state / "report.json").write_text(json.dumps(report, indent=1))
        sys.__stderr__.write(f"\n[test_cluster] {json.dumps(report)}\n")
        assert down.returncode == 0, f"down.sh failed:\n{down.stdout}\n{down.stderr}"
        _assert_all_stopped(state, run)


def _assert_all_stopped(state: Path, run: str) -> None:
    """Nothing of the cluster is left: no pid file, no process whose command line names the
    state folder (MLflow) or the runtime dir (every Ray process, PostgreSQL), and none that
    runs in it (job entry points); the runtime dir is gone."""
    assert not list(state.glob("*.pid")), list(state.glob("*.pid"))
    assert run and not Path(run).exists(), run
    deadline = time.monotonic() + 20  # down.sh's SIGKILLs land, not at once on a loaded machine
    while (left := _left_running([str(state), run])) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, "left running after down.sh:\n" + "\n".join(left)


def _left_running(marks: list[str]) -> list[str]:
    left = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if stat != "Z" and any(m in cmd or cwd.startswith(m) for m in marks):
            left.append(f"{entry.name}: {cmd[:200]}")
    return left


def _mlflow_client(cluster: Cluster):
    import mlflow

    return mlflow.MlflowClient(cluster.mlflow)


def _s3_keys(cluster: Cluster, prefix: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=cluster.env["AWS_ENDPOINT_URL"],
                      aws_access_key_id=cluster.env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=cluster.env["AWS_SECRET_ACCESS_KEY"],
                      region_name=cluster.env["AWS_DEFAULT_REGION"])
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def _mlflow_backend(cluster: Cluster) -> str:
    """--backend-store-uri of the MLflow server that up.sh started."""
    pid = (cluster.state / "mlflow.pid").read_text().strip()
    args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return args[args.index("--backend-store-uri") + 1]


def _pg_run_ids(cluster: Cluster) -> set[str]:
    """Run ids straight from the PostgreSQL database the MLflow server was started on."""
    import psycopg2

    uri = (cluster.state / "postgres_uri").read_text().strip()
    socket_dir = uri.split("host=", 1)[1]
    with psycopg2.connect(host=socket_dir, user="postgres", dbname="postgres") as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT run_uuid FROM runs")
            return {row[0] for row in cur.fetchall()}


def test_two_worker_job_spreads_over_nodes_tracks_to_postgres_and_s3(cluster, tmp_path):
    nodes = cluster.nodes()
    head = [n["node_id"] for n in nodes if n["is_head_node"]]
    workers = {n["node_id"] for n in nodes if not n["is_head_node"]}
    assert len(head) == 1 and len(workers) == 2, nodes

    status, logs = cluster.result("train")
    assert status == "SUCCEEDED", logs[-6000:]
    assert "[vaegan] done: multi-node at step 4" in logs
    cluster.start("sweep")  # the cluster is free again: the sweep runs while this test checks

    client = _mlflow_client(cluster)
    exp = client.get_experiment_by_name("cluster")
    (run,) = client.search_runs([exp.experiment_id], "tags.`vaegan.run_name` = 'multi-node'")
    run_id = run.info.run_id

    # The two ranks ran on the two worker nodes: one each, none on the head.
    rank_nodes = [run.data.tags.get(f"vaegan.node.rank{r}") for r in (0, 1)]
    assert all(rank_nodes), f"no vaegan.node.rank0/rank1 tags: {sorted(run.data.tags)}"
    assert set(rank_nodes) == workers, (rank_nodes, workers, head)
    cluster.nodes_seen.update(head=head[0], rank0=rank_nodes[0], rank1=rank_nodes[1])

    # Params, metrics and image grids are in MLflow, whose store is the PostgreSQL database.
    assert _mlflow_backend(cluster).startswith("postgresql")
    assert run_id in _pg_run_ids(cluster)
    assert run.data.params["train.num_workers"] == "2"
    assert run.data.params["data.shards"] == SHARDS
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [2, 4]

    # Artifacts go through the server into the bucket (none on local disk): the grids, the
    # logged model. Checkpoints are in the bucket too.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    keys = _s3_keys(cluster, "mlflow/")
    grids = [k for k in keys if run_id in k and k.endswith(".png")]
    assert any("samples" in k for k in grids) and any("reconstructions" in k for k in grids), keys
    assert any(k.endswith("/MLmodel") for k in keys), keys
    assert not list(cluster.state.rglob("*.png")) and not (ROOT / "mlartifacts").exists()
    assert any(k.startswith("runs/multi-node/") for k in _s3_keys(cluster, "runs/"))

    # The registered model loads and samples in another process that knows only the tracking
    # server (no S3 credentials: the server proxies the artifacts).
    env = {k: v for k, v in env_with_venv().items() if not k.startswith("AWS_")}
    env["MLFLOW_TRACKING_URI"] = cluster.mlflow
    code = ("import vaegan; m = vaegan.load_model('models:/cluster-model/latest'); "
            "x = m.sample(4, seed=0); print('shape', tuple(x.shape))")
    t = time.time()
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=180)
    cluster.timings["load+sample subprocess"] = time.time() - t
    assert done.returncode == 0, done.stderr[-3000:]
    assert "shape (4, 1, 32, 32)" in done.stdout


def test_sweep_job_parent_child_runs_and_challenger(cluster):
    status, logs = cluster.result("sweep")
    assert status == "SUCCEEDED", logs[-6000:]

    client = _mlflow_client(cluster)
    exp = client.get_experiment_by_name("cluster-sweep")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.data.tags for r in runs]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and len(runs) == 3
    assert parent.info.status == "FINISHED"
    assert {parent.info.run_id, *(c.info.run_id for c in children)} <= _pg_run_ids(cluster)

    version = client.get_model_version_by_alias("cluster-sweep-model", "challenger")
    assert version.run_id in {c.info.run_id for c in children}


def test_local_storage_across_nodes_is_refused_before_any_worker_starts(cluster):
    status, logs = cluster.result("refused")
    assert status == "FAILED", logs[-6000:]
    assert "every node" in logs and str(cluster.local_storage) in logs, logs[-6000:]
    assert "Started training worker group" not in logs and "[vaegan] training" not in logs
    assert not (cluster.local_storage / "local-storage").exists()
    # refused before the MLflow run was made, too
    assert _mlflow_client(cluster).get_experiment_by_name("cluster-refused") is None
