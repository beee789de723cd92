"""The Ray cluster as the driver sees it: connecting, checking resources, resolving storage.

`vaegan train`, `vaegan tune`, the demo and the jobs all start here:

    connect(cpus_needed)            RAY_ADDRESS when set (a cluster, or inside `ray job submit`),
                                    else a new local Ray sized for the run
    check_resources(cpus, gpus, ..) a clear error instead of workers that wait forever
    resolve_storage(url, ..)        where checkpoints go (a folder or s3://bucket/prefix), checked
                                    writable, and refused when it is a local folder that the
                                    cluster's nodes do not share
"""

from __future__ import annotations

import math
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vaegan.errors import UserError

DEFAULT_STORAGE = "runs"  # relative to where the driver starts; made absolute


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
    ray.init(address="local", num_cpus=max(min_cpus, os.cpu_count() or 1, math.ceil(cpus_needed)),
             include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)


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


def storage_for(url: str, s3_endpoint: str = "") -> Storage:
    """`train.storage_path` (empty: ./runs) -> a Storage, unchecked (see `resolve_storage`)."""
    url = url or DEFAULT_STORAGE
    if url.startswith("s3://"):
        import pyarrow.fs

        from vaegan.data.storage import s3_filesystem

        fs = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(s3_filesystem(s3_endpoint)))
        return Storage(url.rstrip("/"), url[len("s3://"):].rstrip("/"), fs)
    if "://" in url:
        raise ClusterError(f"train.storage_path={url!r}: use a folder or s3://bucket/prefix")
    path = str(Path(url).resolve())  # workers run in another directory
    return Storage(path, path)


def resolve_storage(url: str, s3_endpoint: str = "", *, shared: bool = False) -> Storage:
    """`train.storage_path` (empty: ./runs) -> a Storage, checked writable. Call it after
    `connect`: a local folder on a cluster of several nodes is refused unless `shared` says
    every node mounts it, and then a probe proves that every node sees the same files."""
    storage = storage_for(url, s3_endpoint)
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
