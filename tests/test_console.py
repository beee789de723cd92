"""A successful run looks successful: `vaegan train` as a user runs it (a subprocess that
starts its own local Ray, next to the test session's) ends with exit code 0, no traceback
(Ray's placement-group watcher printed one when the driver exited without shutting Ray down)
and no warning printed over and over (per step or per checkpoint)."""

from __future__ import annotations

import re
import subprocess
import time
from collections import Counter

import pytest
from servers import ANSI, BIN, RAY_PREFIX, env_with_venv

pytestmark = pytest.mark.slow

_STAMP = re.compile(r"^\d{4}[-/]\d\d[-/]\d\d[ T]\d\d:\d\d:\d\d[,.\d]*\s*")


def normalise(line: str) -> str:
    """A console line without colours, Ray's `(Actor pid=N)` prefix, the timestamp, and
    numbers (steps, ids, addresses): two lines that say the same thing compare equal."""
    line = RAY_PREFIX.sub("", ANSI.sub("", line).strip())
    line = _STAMP.sub("", line)
    return re.sub(r"[0-9a-f]{8,}|\d+", "N", line).strip()


def warning_lines(output: str) -> list[str]:
    return [normalise(x) for x in output.splitlines() if re.search(r"warn", x, re.IGNORECASE)]


def test_normalise_makes_repeats_equal():
    a = "\x1b[36m(RayTrainWorker pid=29928)\x1b[0m 2026/11/29 23:46:52 WARNING mlflow.pyfunc: step 10 x"
    b = "(RayTrainWorker pid=30001) 2026/11/29 23:47:01 WARNING mlflow.pyfunc: step 20 x"
    assert warning_lines(a + "\n" + b + "\nall fine") == [normalise(a)] * 2


def test_debug_training_prints_no_traceback_and_no_warning(tmp_path, mnist_shards, ray_local):
    """`ray_local` only so that another local Ray runs on the host, as in the test session or
    on a shared machine: Ray Train's placement-group watcher printed a traceback then."""
    env = {**env_with_venv(), "RAY_AUTH_MODE": "disabled",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"}
    env.pop("RAY_ADDRESS", None)  # its own local Ray, as `vaegan train` on a laptop
    (tmp_path / "mlruns").mkdir()
    t0 = time.time()
    proc = subprocess.run(
        [str(BIN / "vaegan"), "train", "--preset", "debug", f"data.shards={mnist_shards}",
         f"train.storage_path={tmp_path / 'runs'}", "train.num_workers=2", "train.name=console"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    out = proc.stdout
    print(f"vaegan train took {time.time() - t0:.0f} s; its output:\n{out}")
    assert proc.returncode == 0, out[-3000:]
    assert "[vaegan] done: console at step 20" in out
    assert "Traceback" not in out, out[-3000:]
    warnings = warning_lines(out)
    repeated = {line: n for line, n in Counter(warnings).items() if n > 1}
    assert not repeated, repeated
    assert not warnings, warnings


def test_a_ray_running_before_is_left_running(ray_local):
    """`fit` and `sweep` shut down only a local Ray they started: not the caller's (here the
    test session's), nor a cluster joined through RAY_ADDRESS."""
    from vaegan import cluster

    with cluster.session():
        cluster.connect()
    assert ray_local.is_initialized() and ray_local.cluster_resources().get("CPU") == 8


IDLE_WORKERS = """
import time
from ray.util.state import list_workers
from vaegan import cluster
cluster.connect()
time.sleep(5)  # the raylet prestarted its default workers at once; they register within seconds
print(len(list_workers(filters=[("worker_type", "=", "WORKER")])))
cluster.shutdown()
"""


def test_a_local_ray_starts_no_idle_workers():
    """The local Ray that `connect` starts has no prestarted workers: they could not serve
    this driver (its runtime_env differs) and would idle beside the step (two did)."""
    env = {**env_with_venv(), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([str(BIN / "python"), "-c", IDLE_WORKERS], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "0", proc.stdout[-3000:]
