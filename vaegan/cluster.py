"""The Ray cluster as the driver sees it: connecting, checking resources, resolving storage.

`vaegan train`, `vaegan tune`, the demo and the jobs all start here:

    connect(cpus_needed)            RAY_ADDRESS when set (a cluster, or inside `ray job submit`),
                                    else a new local Ray sized for the run
    session() / shutdown()          a local Ray that connect started is shut down in order
                                    when the driver is done (not a cluster it joined)
    check_resources(cpus, gpus, ..) a clear error instead of workers that wait forever
    resolve_storage(url, ..)        where checkpoints go (a folder or s3://bucket/prefix), checked
                                    writable, and refused when it is a local folder that the
                                    cluster's nodes do not share
    RunLease(storage, name, ttl)    one run per name: a lease file in the run's storage folder,
                                    renewed while the driver lives; a second driver is refused
    IdleRay                         a local Ray's own processes at idle CPU priority, so that
                                    their wake-ups never preempt the step's threads
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vaegan.errors import UserError

DEFAULT_STORAGE = "runs"  # relative to where the driver starts; made absolute
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray's State API clients look first
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # off on a local Ray (`connect`)
PRESTART_ENV = "RAY_prestart_worker_first_driver"  # off on a local Ray (`connect`)
NICENESS_ENV = "RAY_worker_niceness"  # 0 on a local Ray (`connect`), with IdleRay
LOG_FILES_ENV = "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD"  # 0 on a local Ray (`connect`)
METRICS_ENV = "RAY_enable_metrics_collection"  # off on a local Ray (`connect`)
IDLE_RAY_ENV = "VAEGAN_IDLE_RAY"  # "0": leave a local Ray's own processes at normal priority (`IdleRay`)
_started_gcs: str | None = None  # the GCS address of the local Ray that `connect` started, if any
_started_api_server: str | None = None  # API_SERVER_ENV before `connect` set it
_idle_ray: IdleRay | None = None  # watching the local Ray that `connect` started


class ClusterError(UserError, RuntimeError):
    """The cluster cannot run what was asked (too few CPUs/GPUs, unusable storage); the
    message says what to change."""


def connect(cpus_needed: float = 1, *, min_cpus: int = 0) -> None:
    """Join RAY_ADDRESS when it is set, else start a new local Ray with at least
    max(min_cpus, cores, cpus_needed) logical CPUs (fractions of the same cores)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS", "")
    if address and address != "local":
        ray.init(address=address, log_to_driver=True)
        return
    # address="local": always a new local Ray, never a stale /tmp/ray cluster file's. The
    # dashboard serves Ray's State API, which Ray Train's placement-group watcher polls:
    # without it a "State API unavailable" warning floods the console every second or two.
    # That watcher (a detached actor) finds the State API by looking for "the" Ray on this
    # host: with a second local Ray around (another user's, a test session's) it died with
    # "Found multiple active Ray instances" and a traceback. RAY_API_SERVER_ADDRESS, set before
    # init so every Ray process started here inherits it, points it at this Ray's dashboard.
    global _started_api_server, _started_gcs, _idle_ray
    port = free_port()
    _started_api_server = os.environ.get(API_SERVER_ENV)
    os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    # Nothing preempts the nodes of a local Ray (they are this machine): Ray Train's preemption
    # watcher, an actor per run polling for drain notices, would only take its share of the
    # cores and log an error line at every start (ray-project/ray#53727). A user's value wins.
    env_vars = {} if PREEMPTION_WATCHER_ENV in os.environ else {PREEMPTION_WATCHER_ENV: "0"}
    # The raylet prestarts default workers for the first driver. None of them can serve this
    # driver, whose tasks and actors all carry the runtime_env below (a worker serves one):
    # they import Ray while the run starts, then idle at 0.012 cores each until Ray kills them
    # (a run's actors fill its pool; an idle Ray keeps them). The raylet reads the setting
    # from its environment at start.
    ray_env = {} if PRESTART_ENV in os.environ else {PRESTART_ENV: "0"}
    # Ray's log monitor polls the session's log files every 0.1 s, and below this many files
    # it also lists the log folder at every poll (a glob); at 0 it lists it every 0.5 s
    # (LOG_NAME_UPDATE_INTERVAL_S): an idle local Ray's log monitor took 0.004-0.005 cores
    # instead of 0.010 (docs/results.md). New workers' output starts at most 0.4 s later.
    if LOG_FILES_ENV not in os.environ:
        ray_env[LOG_FILES_ENV] = "0"
    # Ray's processes record metrics for a Prometheus to scrape (the dashboard's graphs read
    # them from one); a local Ray has none, and recording them took a third of Ray's CPU in a
    # training run (0.066 cores with them, 0.043 without). Idle-priority CPU beside a 2-thread
    # step costs it 1.2-1.6% of its speed per 0.01 cores (docs/results.md). A user's value wins.
    if METRICS_ENV not in os.environ:
        ray_env[METRICS_ENV] = "0"
    # The step first: Ray's own processes at idle priority (IdleRay), and its workers at nice 0
    # instead of Ray's 15, against whose small weight even idle-priority processes win the
    # core (docs/results.md). VAEGAN_IDLE_RAY=0 leaves both as Ray sets them.
    idle = os.environ.get(IDLE_RAY_ENV, "1") != "0" and hasattr(os, "SCHED_IDLE")
    if idle and NICENESS_ENV not in os.environ:
        ray_env[NICENESS_ENV] = "0"
    os.environ.update(ray_env)
    try:
        ray.init(address="local", num_cpus=max(min_cpus, os.cpu_count() or 1, math.ceil(cpus_needed)),
                 include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=True,
                 runtime_env={"worker_process_setup_hook": "vaegan.cluster.quiet_local_worker",
                              "env_vars": env_vars})
    finally:
        for name in ray_env:
            os.environ.pop(name, None)
    _started_gcs = ray.get_runtime_context().gcs_address
    if idle:
        _idle_ray = IdleRay(os.getpid())
        _idle_ray.start()


def quiet_local_worker() -> None:
    """Ray's worker_process_setup_hook for the local Ray that `connect` starts: runs first in
    each of its worker processes (Train controller, trial drivers, training workers)."""
    import logging

    # A local Ray has no autoscaler, yet Ray Train sends it a resource request with a 5 s
    # timeout; on a busy machine the first one (it starts the coordinator actor) times out
    # and is logged as a warning with a full traceback, though nothing is wrong. A filter,
    # not a level: Ray Train's logging.config.dictConfig resets the levels of ray.train's
    # child loggers, and leaves their filters.
    def errors_only(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    logging.getLogger("ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"
                      ).addFilter(errors_only)
    # Train's placement-group cleaner asks the State API every second whether the controller
    # lives, with a 10 s timeout, and logs a warning each time that runs out ("State API may be
    # temporarily unavailable. Continuing to monitor."). The State API is the dashboard, which
    # `IdleRay` runs at idle priority: while the step keeps both cores busy it answers late,
    # 6-13 warnings in a 1,000-step run on 2 cores. It only delays the cleaner's next look;
    # the local Ray's shutdown removes the placement group anyway.
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner"
                      ).addFilter(errors_only)


@contextlib.contextmanager
def session() -> Iterator[None]:
    """Around a driver's use of Ray (`fit`, `sweep`): a local Ray that `connect` starts inside
    is shut down in order on the way out (`shutdown`); a Ray already running when entering
    (the caller's, a test session's, a cluster joined through RAY_ADDRESS) is left running."""
    import ray

    running = ray.is_initialized()
    try:
        yield
    finally:
        if not running:
            shutdown()


def shutdown() -> None:
    """Stop the local Ray that `connect` started in this process; call it once the trainer
    or tuner has returned. Left to the interpreter's exit, Ray's atexit hook stops GCS while
    Ray Train's placement-group watcher (a detached actor) still polls it, and a successful
    run ended with its traceback (`RpcError: Timed out while waiting for GCS`). A cluster
    joined through RAY_ADDRESS, or a Ray that someone else started in this process (a test
    session's), is left running."""
    import ray

    global _started_gcs, _idle_ray
    started, _started_gcs = _started_gcs, None
    if _idle_ray is not None:
        _idle_ray.stop()
        _idle_ray = None
    if started is None or not ray.is_initialized():
        return
    if ray.get_runtime_context().gcs_address == started:
        _wait_for_detached_actors()
        ray.shutdown()
        if _started_api_server is None:
            os.environ.pop(API_SERVER_ENV, None)
        else:
            os.environ[API_SERVER_ENV] = _started_api_server


class IdleRay(threading.Thread):
    """Moves the Ray processes under `root` (the driver that started a local Ray) to SCHED_IDLE,
    except the training workers and their data loaders, and watches for new ones (a run's
    controller and helper actors start after the trainer, Tune's trials one by one).

    Why: every Ray process wakes about 100 times a second (its signal check), and a local Ray
    runs fifteen or so (GCS, dashboard and its modules, agents, log monitor, Train's controller
    and helper actors): 0.13 cores together. At normal priority each wake-up preempts one of the
    step's threads, and the other one waits for it at the next barrier of every parallel op, so
    on 2 cores those 0.13 cores cost the step about 20%. An idle-priority process never
    preempts on waking; it runs when a core is free or its small share comes due. Measured with
    fifteen processes waking as Ray's do beside the mnist32 step on 2 threads (docs/results.md,
    "Ray's wake-ups at idle priority"): the step lost 17-22% to them at normal priority, 6-7% at
    idle priority (about their own CPU time), and as much as at normal with SCHED_BATCH or
    nice 19. Only for a step at nice 0, hence `connect`'s RAY_worker_niceness=0: against a
    nice-15 thread (Ray's default) idle-priority processes still win the core.

    Left at normal priority: the raylet (it forks every worker, and a worker would inherit
    SCHED_IDLE, which an unprivileged process cannot leave), a worker still starting (not yet
    titled) or not yet given its actor (`ray::IDLE`): it may become a training worker; training
    workers and their children."""

    KEPT = ("ray::IDLE", "ray::RayTrainWorker")  # process titles left at normal priority

    def __init__(self, root: int):
        import ray

        super().__init__(name="vaegan-idle-ray", daemon=True)
        self.root = root
        # Ray's daemons are the driver's children that run from Ray's package (GCS, raylet,
        # dashboard, log monitor); the driver's other children (a test's servers, the user's
        # subprocesses) are not Ray's to demote, nor is anything they start.
        self.ray_dir = os.path.dirname(os.path.abspath(ray.__file__)).encode() + b"/"
        self.moved: set[tuple[int, bytes]] = set()  # (pid, start time): a pid is reused
        self._done = threading.Event()

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=5)

    def run(self) -> None:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # this thread too
        interval = 0.5
        while not self._done.wait(interval):
            # look often while processes start, rarely once nothing new has come for a while
            interval = 0.5 if self.scan() else min(2 * interval, 8.0)

    def scan(self) -> int:
        """Move the new processes to SCHED_IDLE; -> how many, plus the workers still starting
        (looked at again soon)."""
        children, started = process_tree()
        moved = starting = 0
        todo = [(pid, "daemon") for pid in children.get(self.root, [])]
        while todo:
            pid, kind = todo.pop()
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if kind == "daemon" and not any(arg.startswith(self.ray_dir) for arg in argv):
                continue
            title = argv[0].decode(errors="replace")
            if title.startswith(self.KEPT):
                continue  # nor its children: a training worker's data loaders
            if kind == "worker" and not title.startswith("ray::"):
                # A worker still importing Ray, not yet titled: it may become a training
                # worker, and once moved it could not leave SCHED_IDLE without CAP_SYS_NICE.
                starting += 1
                continue
            if title.endswith("/raylet"):
                todo.extend((child, "worker") for child in children.get(pid, []))
                continue
            todo.extend((child, "other") for child in children.get(pid, []))
            if (pid, started[pid]) in self.moved:
                continue
            self.moved.add((pid, started[pid]))
            moved += _set_policy(pid, os.SCHED_IDLE)
        return moved + starting


def process_stats() -> dict[int, tuple[int, bytes, int, bytes]]:
    """This machine's processes from /proc/PID/stat: pid -> (parent pid, start time, CPU time
    (user + system) in clock ticks, the name in its stat (comm)). A pid is reused; the pid
    and its start time name one process."""
    stats = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:  # gone
                continue
            name, fields = stat[stat.index(b"(") + 1:stat.rindex(b")")], stat.rsplit(b")", 1)[1].split()
            stats[int(entry.name)] = (int(fields[1]), fields[19], int(fields[11]) + int(fields[12]), name)
    return stats


def process_tree() -> tuple[dict[int, list[int]], dict[int, bytes]]:
    """This machine's processes: parent pid -> child pids, and pid -> start time."""
    children: dict[int, list[int]] = {}
    started: dict[int, bytes] = {}
    for pid, (ppid, start, _, _) in process_stats().items():
        children.setdefault(ppid, []).append(pid)
        started[pid] = start
    return children, started


def _set_policy(pid: int, policy: int) -> int:
    """Every thread of process `pid` to `policy` (threads started later inherit their
    creator's); -> 1 if any was set."""
    done = 0
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):  # a thread that ended
                os.sched_setscheduler(int(tid), policy, os.sched_param(0))
                done = 1
    return done


def keep_normal_priority() -> bool:
    """In a training worker: its threads back to normal priority if it runs at SCHED_IDLE (a
    worker that served another task before it became a training worker, and was moved then by
    `IdleRay`); -> False if the OS refused (an unprivileged process may not leave SCHED_IDLE)."""
    if not hasattr(os, "SCHED_IDLE") or os.sched_getscheduler(0) != os.SCHED_IDLE:
        return True
    _set_policy(os.getpid(), os.SCHED_OTHER)
    return os.sched_getscheduler(0) == os.SCHED_OTHER


TUNE_COPIED_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN",
                           "AWS_SESSION_TOKEN")
"""What Ray Tune copies from the driver's environment into every trial's runtime_env
(ray/tune/execution/class_cache.py); Ray's runtime-env agent then logs that runtime_env,
secrets in plain text, in the session logs (and the dashboard shows it)."""


@contextlib.contextmanager
def credentials_kept_from_tune() -> Iterator[None]:
    """Around `Tuner.fit()`: the variables of TUNE_COPIED_CREDENTIALS are out of this process's
    environment, so Tune has none to copy. A local Ray's processes inherited them when it
    started; on a cluster, trials then use the nodes' own credentials, as `vaegan train`'s
    workers always do (Ray Train copies none). What this process needs S3 for was set up
    before (s3fs instances hold their credentials)."""
    saved = {k: os.environ.pop(k) for k in TUNE_COPIED_CREDENTIALS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _wait_for_detached_actors(timeout: float = 10.0) -> None:
    """Give Ray Train's placement-group watcher (detached, so it outlives the trainer) the
    moment it needs to see its controller gone and exit by itself: stopped mid-poll, it
    prints a traceback."""
    from ray.util.state import list_actors

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            alive = list_actors(filters=[("state", "=", "ALIVE"),
                                         ("class_name", "=", "PlacementGroupCleaner")],
                                timeout=5, raise_on_missing_output=False)
        except Exception:  # no State API (no dashboard): nothing to wait for
            return
        if not alive:
            return
        time.sleep(0.5)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_resources(cpus: float, gpus: float, asked: str, fix: str) -> None:
    """Raise ClusterError("{asked} needs N CPUs but the Ray cluster has M; {fix}") when the
    cluster cannot hold `cpus` CPUs and `gpus` GPUs at once."""
    import ray

    res = ray.cluster_resources()
    for kind, need in (("CPU", cpus), ("GPU", gpus)):
        if need > res.get(kind, 0) + 1e-9:
            have = res.get(kind, 0)
            raise ClusterError(f"{asked} needs {need:g} {kind}s but the Ray cluster has {have:g}; {fix}")


def node_id() -> str:
    """The Ray node this process runs on (recorded per rank, so a run shows where it ran)."""
    import ray

    return ray.get_runtime_context().get_node_id()


# ---------------------------------------------------------------------------------------
# Storage: where Ray Train writes checkpoints and Tune its experiment state.


@dataclass
class Storage:
    url: str
    """As the user sees it: an absolute folder or s3://bucket/prefix."""
    path: str
    """What RunConfig.storage_path takes: the folder, or bucket/prefix with `filesystem`."""
    filesystem: Any = None
    """A pyarrow filesystem over s3fs for S3 (custom endpoints work), None for a folder."""

    def child(self, name: str) -> Storage:
        return Storage(f"{self.url.rstrip('/')}/{name}", f"{self.path.rstrip('/')}/{name}", self.filesystem)


def storage_for(url: str, s3_endpoint: str = "", *, retry_seconds: float | None = None) -> Storage:
    """`train.storage_path` (empty: ./runs) -> a Storage, unchecked (see `resolve_storage`).
    On S3, every call Ray makes through it waits out transient failures (an endpoint that
    blips mid-upload) for up to `retry_seconds` (default: the data layer's) with backoff."""
    url = url or DEFAULT_STORAGE
    if url.startswith("s3://"):
        import pyarrow.fs

        from vaegan.data.retrying_fs import RetryingFSSpecHandler
        from vaegan.data.storage import IO_RETRY_SECONDS, s3_filesystem

        seconds = IO_RETRY_SECONDS if retry_seconds is None else retry_seconds
        fs = pyarrow.fs.PyFileSystem(RetryingFSSpecHandler(s3_filesystem(s3_endpoint), seconds, s3_endpoint))
        return Storage(url.rstrip("/"), url[len("s3://"):].rstrip("/"), fs)
    if "://" in url:
        raise ClusterError(f"train.storage_path={url!r}: use a folder or s3://bucket/prefix")
    path = str(Path(url).resolve())  # workers run in another directory
    return Storage(path, path)


def resolve_storage(url: str, s3_endpoint: str = "", *, shared: bool = False,
                    retry_seconds: float | None = None) -> Storage:
    """`train.storage_path` (empty: ./runs) -> a Storage, checked writable. Call it after
    `connect`: a local folder on a cluster of several nodes is refused unless `shared` says
    every node mounts it, and then a probe proves that every node sees the same files."""
    storage = storage_for(url, s3_endpoint, retry_seconds=retry_seconds)
    if storage.filesystem is not None:
        probe = f"{storage.path}/.vaegan-write-probe"
        try:
            storage.filesystem.handler.fs.pipe(probe, b"ok")
            storage.filesystem.handler.fs.rm(probe)
        except Exception as e:
            raise ClusterError(f"checkpoint storage {storage.url} is not writable: {e}") from None
        return storage
    path = storage.path
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ClusterError(f"checkpoint storage {path} is not writable ({e.strerror})") from None
    _check_local_storage_reaches_every_node(path, shared)
    return Storage(path, path)


def _alive_nodes() -> list[dict]:
    import ray

    if not ray.is_initialized():
        return []
    return [n for n in ray.nodes() if n.get("Alive")]


def _check_local_storage_reaches_every_node(path: str, shared: bool) -> None:
    """On one node a folder is fine. On several, checkpoints written by a worker on one node
    must be read by the driver (and resumed workers) on others: refuse, unless the user says
    the folder is a shared mount and a probe file written here is seen on every node."""
    nodes = _alive_nodes()
    if len(nodes) <= 1:
        return
    if not shared:
        raise ClusterError(
            f"checkpoint storage {path} is a local folder, but the Ray cluster has {len(nodes)} nodes: "
            "checkpoints must be on storage every node reaches. Use train.storage_path=s3://bucket/prefix, "
            "or, if the folder is a shared mount (NFS, ...) on every node, set train.shared_storage=true")
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    probe = Path(path) / f".vaegan-shared-probe-{token}"
    probe.write_text(token)
    try:
        @ray.remote(num_cpus=0)
        def sees(file: str) -> bool:
            p = Path(file)
            return p.is_file() and p.read_text() == token

        missing = [n["NodeID"] for n in nodes if not ray.get(sees.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(probe)))]
    finally:
        probe.unlink(missing_ok=True)
    if missing:
        raise ClusterError(f"train.shared_storage=true, but {len(missing)} of {len(nodes)} Ray nodes do not "
                           f"see the files in {path} (nodes {', '.join(m[:12] for m in missing)}): "
                           "checkpoints must be on storage every node reaches; use s3://bucket/prefix")


# ---------------------------------------------------------------------------------------
# One run per name: two drivers training under one name would share its storage folder and
# delete each other's checkpoints.

LEASE = ".vaegan-lease.json"


class RunLeaseError(ClusterError):
    """The run's name is held by another live run; the message names it."""


def _warn(message: str) -> None:
    print(f"[vaegan] warning: {message}", file=sys.stderr, flush=True)


def _job_id() -> str:
    """The Ray job submission id inside `ray job submit`, else the Ray driver's job id."""
    if os.environ.get("RAY_JOB_SUBMISSION_ID"):
        return os.environ["RAY_JOB_SUBMISSION_ID"]
    try:
        import ray

        if ray.is_initialized():
            return f"ray-job-{ray.get_runtime_context().get_job_id()}"
    except Exception:  # the id only decorates the lease
        pass
    return "(no Ray job)"


class RunLease:
    """A lease on `name` in its storage folder: `{storage}/{name}/.vaegan-lease.json`, holding
    the owner (job, host, pid, start time) and when it was last renewed.

    `acquire` refuses (RunLeaseError) a lease renewed within its ttl by another owner, takes
    over an older one (its driver died without releasing it), writes its own, reads it back
    after a moment (of two drivers starting together, the last writer wins and the other is
    refused), and renews it from a thread every ttl/3 s; `release` removes it. Staleness is
    judged by the wall clocks of the hosts, so they must agree to well within the ttl (NTP).
    Works on folders and on S3 (a PUT replaces an object whole).
    """

    def __init__(self, storage: Storage, name: str, ttl_s: float):
        run = storage.child(name)
        self.url, self.path = f"{run.url}/{LEASE}", f"{run.path}/{LEASE}"
        self.fs = storage.filesystem.handler.fs if storage.filesystem is not None else None
        self.name, self.ttl_s = name, ttl_s
        self.owner = {"token": uuid.uuid4().hex, "job": _job_id(), "host": socket.gethostname(),
                      "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> dict | None:
        """The lease as stored; None when there is none (or it is unreadable: a lease is
        replaced whole, so that is not another live run's)."""
        try:
            raw = Path(self.path).read_bytes() if self.fs is None else self.fs.cat_file(self.path)
            held = json.loads(raw)
            return held if isinstance(held, dict) else None
        except FileNotFoundError:
            return None
        except ValueError:
            _warn(f"run lease {self.url} is unreadable; replacing it")
            return None

    def _write(self) -> None:
        body = json.dumps({**self.owner, "renewed": time.time(), "ttl_s": self.ttl_s}, indent=1).encode()
        if self.fs is not None:
            self.fs.pipe_file(self.path, body)
            return
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{LEASE}.{self.owner['token']}")
        tmp.write_bytes(body)
        os.replace(tmp, path)  # readers see the old lease or the new one, never half of one

    def _refusal(self, held: dict) -> RunLeaseError:
        age = time.time() - float(held.get("renewed", 0))
        return RunLeaseError(
            f"train.name={self.name} is already running: job {held.get('job')} on host {held.get('host')} "
            f"(pid {held.get('pid')}, started {held.get('started')}), whose lease {self.url} was renewed "
            f"{age:.0f} s ago. Wait for it to finish or stop it, or choose another train.name; a lease "
            f"not renewed for {float(held.get('ttl_s', self.ttl_s)):.0f} s is taken over")

    def acquire(self, settle_s: float = 0.5) -> RunLease:
        held = self.read()
        if held and held.get("token") != self.owner["token"]:
            age = time.time() - float(held.get("renewed", 0))
            if age <= float(held.get("ttl_s", self.ttl_s)):
                raise self._refusal(held)
            _warn(f"taking over the lease on train.name={self.name} from job {held.get('job')} on host "
                  f"{held.get('host')} (pid {held.get('pid')}): not renewed for {age:.0f} s, so that run "
                  "is gone")
        self._write()
        time.sleep(settle_s)
        held = self.read()
        if not held or held.get("token") != self.owner["token"]:
            raise self._refusal(held or {})
        self._thread = threading.Thread(target=self._renew, name=f"vaegan-lease-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                held = self.read()
                if held and held.get("token") != self.owner["token"]:
                    _warn(f"the lease on train.name={self.name} was taken over by job {held.get('job')} on "
                          f"host {held.get('host')} (this driver did not renew it for {self.ttl_s:.0f} s)")
                    return
                self._write()
            except Exception as e:  # storage blips: try again at the next renewal
                _warn(f"could not renew the lease {self.url} ({type(e).__name__}: {e}); retrying")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            held = self.read()
            if held and held.get("token") == self.owner["token"]:
                if self.fs is None:
                    Path(self.path).unlink(missing_ok=True)
                else:
                    self.fs.rm_file(self.path)
        except Exception as e:  # a lease left behind goes stale after its ttl
            _warn(f"could not remove the lease {self.url} ({type(e).__name__}: {e})")

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
