"""`ray job submit` of jobs/train.py against a real `ray start --head` cluster."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import mlflow
import pytest
from servers import BIN

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_ray_job_submit_trains_and_registers(ray_head, mlflow_server, tmp_path_factory, tmp_path):
    from vaegan.data import prepare

    url, env = ray_head
    shards = tmp_path / "shards"
    prepare("synthetic-faces:40", str(shards), image_size=32, channels=1, progress=False)
    cmd = [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(ROOT), "--",
           "python", "jobs/train.py", "--preset", "debug", f"data.shards={shards}",
           f"tracking.tracking_uri={mlflow_server}", f"train.storage_path={tmp_path / 'runs'}",
           "train.name=job", "train.steps=4", "train.num_workers=2", "train.log_every=2",
           "tracking.model_name=job-model", "tracking.log_checkpoints=false"]
    for _ in range(30):  # a head just started may not have its job agent yet (answers 500)
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        if "No available agent to submit job" not in done.stderr:
            break
        time.sleep(2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout and "[vaegan] done: job at step 4" in done.stdout
    client = mlflow.MlflowClient(mlflow_server)
    assert client.search_model_versions("name='job-model'")
