"""Small helpers for infra/local/up.sh and down.sh (standard library, plus pgserver/boto3 where
named). Run with the project's venv python:

    python infra/local/cluster.py free-port
    python infra/local/cluster.py check-ports NAME=PORT...             # all free on 127.0.0.1?
    python infra/local/cluster.py wait-http URL PID TIMEOUT          # PID: the server's; 0: none
    python infra/local/cluster.py wait-nodes DASHBOARD_URL N TIMEOUT PID  # N alive Ray nodes
    python infra/local/cluster.py make-bucket ENDPOINT BUCKET
    python infra/local/cluster.py pg-start PGDATA                     # prints the postgresql:// URI
    python infra/local/cluster.py pg-stop PGDATA
    python infra/local/cluster.py session-pids DIR                    # processes of a Ray temp dir

Each waits in short polls and exits non-zero with one line on stderr when it gives up.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")  # pgserver's platformdirs, harmless


def die(message: str) -> None:
    print(f"up.sh: {message}", file=sys.stderr)
    sys.exit(1)


def alive(pid: int) -> bool:
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not reaped yet) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def free_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])


def check_ports(*named: str) -> None:
    busy = []
    for item in named:
        name, _, port = item.partition("=")
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no conflict
            try:
                s.bind(("127.0.0.1", int(port)))
            except OSError:
                busy.append(f"{name}={port}")
    if busy:
        die(f"port(s) in use: {', '.join(busy)}; choose free ones (VAEGAN_*_PORT) or stop what holds them")


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        return b"" if e.code < 500 else None
    except (OSError, ValueError):
        return None


def wait_http(url: str, pid: str, timeout: str) -> None:
    deadline = time.time() + float(timeout)
    while time.time() < deadline:
        if not alive(int(pid)):
            die(f"the process serving {url} (pid {pid}) exited")
        if _get(url) is not None:
            return
        time.sleep(0.25)
    die(f"{url} did not answer in {timeout} s")


def _alive_nodes(dashboard: str) -> list[dict] | None:
    """Alive nodes from Ray's State API (asks the GCS; the dashboard's /nodes view is cached)."""
    body = _get(f"{dashboard}/api/v0/nodes?limit=1000&detail=false")
    if not body:
        return None
    try:
        nodes = json.loads(body)["data"]["result"]["result"]
    except (ValueError, KeyError, TypeError):
        return None
    return [n for n in nodes if n.get("state") == "ALIVE"]


def wait_nodes(dashboard: str, n: str, timeout: str, pid: str = "0") -> None:
    deadline = time.time() + float(timeout)
    while time.time() < deadline:
        if not alive(int(pid)):
            die(f"the Ray node process (pid {pid}) exited before it joined")
        nodes = _alive_nodes(dashboard)
        if nodes is not None and len(nodes) >= int(n):
            return
        time.sleep(0.25)
    die(f"the Ray cluster at {dashboard} did not reach {n} alive nodes in {timeout} s")


def make_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    try:
        s3.create_bucket(Bucket=bucket)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass


def pg_start(pgdata: str) -> None:
    import pgserver

    Path(pgdata).mkdir(parents=True, exist_ok=True)
    # cleanup_mode=None: the server outlives this process; pg-stop stops it.
    print(pgserver.get_server(pgdata, cleanup_mode=None).get_uri())


def pg_stop(pgdata: str) -> None:
    path = Path(pgdata)
    pidfile = path / "postmaster.pid"
    if not pidfile.is_file():
        return  # not running
    pid = int(pidfile.read_text().split()[0])
    if not alive(pid):
        return
    import pgserver

    # The last handle with cleanup_mode="stop" runs `pg_ctl stop` on this data dir.
    pgserver.get_server(pgdata, cleanup_mode="stop").cleanup()
    deadline = time.time() + 20
    while alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    if alive(pid):
        os.kill(pid, 9)


def session_pids(directory: str) -> None:
    """Processes that belong to the Ray temp dir DIR: it is on their command line (raylets,
    core workers, agents) or is their working directory (job entry points)."""
    directory = os.path.realpath(directory)
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if directory in cmdline or cwd == directory or cwd.startswith(directory + "/"):
            print(entry.name)


COMMANDS = {"free-port": free_port, "check-ports": check_ports, "wait-http": wait_http,
            "wait-nodes": wait_nodes, "make-bucket": make_bucket, "pg-start": pg_start,
            "pg-stop": pg_stop, "session-pids": session_pids}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        die(f"usage: cluster.py {{{'|'.join(COMMANDS)}}} ARGS")
    COMMANDS[sys.argv[1]](*sys.argv[2:])
