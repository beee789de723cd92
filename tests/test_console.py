"""A successful run looks successful: `vaegan train` as a user runs it (a subprocess that
starts its own local Ray, next to the test session's) ends with exit code 0, no traceback
(Ray's placement-group watcher printed one when the driver exited without shutting Ray down)
and no warning printed over and over (per step or per checkpoint)."""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import threading
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


LOCAL_RAY = """
import json, os, subprocess, time
import ray
from ray.util.state import list_workers
from vaegan import cluster
cluster.connect()
time.sleep(5)  # the raylet prestarted its default workers at once; they register within seconds
# the State API is the dashboard, at idle priority: slow to answer beside another test's training
idle_workers = len(list_workers(filters=[("worker_type", "=", "WORKER")], timeout=120))

@ray.remote(num_cpus=0)
class RayTrainWorker:  # the title of Ray Train's workers
    def start_child(self):  # as a data loader
        self.child = subprocess.Popen(["sleep", "60"])
        return os.getpid(), self.child.pid

@ray.remote(num_cpus=0)
class Helper:  # as Train's controller and helper actors, which start after the trainer
    def pid(self):
        return os.getpid()

actors = RayTrainWorker.remote(), Helper.remote()  # held: an actor without a handle ends
worker, loader = ray.get(actors[0].start_child.remote())
helper = ray.get(actors[1].pid.remote())
mine = subprocess.Popen(["sleep", "60"])  # the driver's own child: not Ray's
pids = {"worker": worker, "loader": loader, "helper": helper, "driver's child": mine.pid}
for p in os.listdir("/proc"):  # this driver's children (another Ray may run beside it)
    try:
        parent = int(open(f"/proc/{p}/stat", "rb").read().rsplit(b")", 1)[1].split()[1])
        argv = open(f"/proc/{p}/cmdline", "rb").read().decode().split("\\0")
    except (OSError, ValueError):
        continue
    for name in ("gcs_server", "raylet"):
        if parent == os.getpid() and argv[0].endswith("/" + name):
            pids[name] = int(p)
    if parent == os.getpid() and any(a.endswith("/log_monitor.py") for a in argv):
        log_monitor_env = open(f"/proc/{p}/environ", "rb").read().decode().split("\\0")
def policies():
    return {name: sorted({os.sched_getscheduler(int(t)) for t in os.listdir(f"/proc/{pid}/task")})
            for name, pid in pids.items()}
deadline = time.time() + 120  # the watcher looks every 0.5-8 s, itself at idle priority
while policies()["helper"] != [os.SCHED_IDLE] and time.time() < deadline:
    time.sleep(0.5)
print(json.dumps({"idle_workers": idle_workers, "IDLE": os.SCHED_IDLE, "OTHER": os.SCHED_OTHER,
                  "policies": policies(), "worker_nice": os.getpriority(os.PRIO_PROCESS, worker),
                  "log_files_threshold": [v for v in log_monitor_env
                                          if v.startswith("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD=")],
                  "metrics": [v for v in log_monitor_env if v.startswith("RAY_enable_metrics_collection=")]}))
cluster.shutdown()
"""


def test_a_local_ray_idles_beside_the_step():
    """The local Ray that `connect` starts has no prestarted workers (they could not serve
    this driver, whose runtime_env differs, and would idle beside the step; two did), and
    its own processes, also those that start later, run at idle CPU priority (`IdleRay`),
    except the raylet and the training workers with their children, which run at nice 0."""
    env = {**env_with_venv(), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    for name in ("VAEGAN_IDLE_RAY", "RAY_worker_niceness", "RAY_enable_metrics_collection"):
        env.pop(name, None)
    proc = subprocess.run([str(BIN / "python"), "-c", LOCAL_RAY], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["idle_workers"] == 0, out
    idle, other = [out["IDLE"]], [out["OTHER"]]
    assert out["policies"] == {"worker": other, "loader": other, "raylet": other, "driver's child": other,
                               "helper": idle, "gcs_server": idle}, out
    assert out["worker_nice"] == 0, out
    # the log monitor lists the log folder every 0.5 s, not at each 0.1 s poll
    assert out["log_files_threshold"] == ["RAY_LOG_MONITOR_MANY_FILES_THRESHOLD=0"], out
    # no metrics recorded for a Prometheus that a local Ray does not have
    assert out["metrics"] == ["RAY_enable_metrics_collection=0"], out


def test_a_training_worker_leaves_idle_priority():
    """A worker that IdleRay moved while it served another task, then became a training
    worker, goes back to normal priority (where the OS allows it, and says so where not)."""
    from vaegan.cluster import keep_normal_priority

    result = {}

    def thread() -> None:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        result["kept"] = keep_normal_priority()
        result["policy"] = os.sched_getscheduler(0)

    t = threading.Thread(target=thread)
    t.start()
    t.join()
    # the kernel lets a thread leave SCHED_IDLE with CAP_SYS_NICE, or an RLIMIT_NICE that
    # allows its nice value (20 - nice)
    caps = int(next(x for x in open("/proc/self/status") if x.startswith("CapEff")).split()[1], 16)
    allowed = bool(caps >> 23 & 1) or resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20 - os.nice(0)
    assert result == {"kept": allowed, "policy": os.SCHED_OTHER if allowed else os.SCHED_IDLE}, result


def _descendants(root: int) -> dict[str, int]:
    """Title -> pid of the processes under `root`."""
    from vaegan.cluster import process_tree

    children, _ = process_tree()
    found, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            try:
                found[open(f"/proc/{child}/cmdline", "rb").read().split(b"\0")[0].decode()] = child
            except (OSError, ValueError):  # gone
                continue
            todo.append(child)
    return found


def test_idle_ray_leaves_a_starting_worker_alone():
    """Which processes one look of IdleRay moves, on a tree that mimics a local Ray's (titles
    set with bash's `exec -a`): a worker still importing Ray (not yet titled) stays at normal
    priority, as moved it could not come back without CAP_SYS_NICE (in CI a training worker
    stayed at idle priority so)."""
    from vaegan.cluster import IdleRay

    ray_dir = IdleRay(0).ray_dir.decode()
    titles = {"gcs_server": f"{ray_dir}core/src/ray/gcs/gcs_server", "helper": "ray::Helper",
              "agent": "ray::DashboardAgent", "starting worker": "/usr/bin/python3",
              "pooled worker": "ray::IDLE", "training worker": "ray::RayTrainWorker.train_fn",
              "raylet": "/opt/ray/raylet", "not Ray's": "sleep"}
    workers = " ".join(f"(exec -a '{titles[k]}' sleep 60) &" for k in list(titles)[1:6])
    tree = (f"(exec -a '{titles['gcs_server']}' sleep 60) & (exec -a sleep sleep 60) & "
            f"(exec -a {titles['raylet']} bash -c \"{workers} wait\" -- {ray_dir}) & wait")
    root = subprocess.Popen(["bash", "-c", tree], start_new_session=True)  # a group to kill
    try:
        deadline = time.time() + 20
        while not set(titles.values()) <= _descendants(root.pid).keys() and time.time() < deadline:
            time.sleep(0.05)  # until all eight have exec'd to their titles
        IdleRay(root.pid).scan()
        found = _descendants(root.pid)
        policy = {name: os.sched_getscheduler(found[title]) for name, title in titles.items()}
    finally:
        os.killpg(root.pid, 9)
        root.wait()
    idle, other = os.SCHED_IDLE, os.SCHED_OTHER
    assert policy == {"gcs_server": idle, "helper": idle, "agent": idle, "starting worker": other,
                      "pooled worker": other, "training worker": other, "raylet": other,
                      "not Ray's": other}, policy


def test_a_local_rays_workers_drop_two_benign_ray_train_warnings():
    """The filters `quiet_local_worker` sets land on the loggers Ray Train's modules use:
    their warnings go (a timed-out resource request, a late State API answer), errors stay."""
    import logging

    from ray.train.v2._internal.execution.controller import placement_group_cleaner
    from ray.train.v2._internal.execution.scaling_policy import autoscaling_coordinator_client

    from vaegan.cluster import quiet_local_worker

    quiet_local_worker()
    for module in (placement_group_cleaner, autoscaling_coordinator_client):
        def record(level, logger=module.logger):
            return logger.makeRecord(logger.name, level, __file__, 1, "State API unavailable", (), None)

        assert not module.logger.filter(record(logging.WARNING)), module.__name__
        assert module.logger.filter(record(logging.ERROR)), module.__name__
