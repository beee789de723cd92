#!/usr/bin/env bash
# Stops exactly what infra/local/up.sh started, from its state folder (VAEGAN_CLUSTER_DIR,
# default .local-cluster): each server's process group by the pid up.sh recorded, then any
# process left of the Ray session (its temp dir on the command line, or as working
# directory: job entry points); PostgreSQL by its data dir. Never a global `ray stop`,
# never a kill by name. Logs stay in the state folder (Ray's under logs/ray/NODE); the runtime
# dir (Ray's temp dirs, the PostgreSQL data) is removed.
set -uo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
here="$root/infra/local"
state="${VAEGAN_CLUSTER_DIR:-$root/.local-cluster}"
venv_bin="${VAEGAN_VENV_BIN:-$root/.venv/bin}"
py="$venv_bin/python"
if [ ! -d "$state" ]; then
    echo "down.sh: no state folder $state: nothing to stop"
    exit 0
fi
state="$(cd "$state" && pwd)"
mkdir -p "$state/logs"

group_alive() {  # any process of group $1 that is not a zombie (exited, not reaped yet)
    ps -eo pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { found = 1 } END { exit !found }'
}

stop_groups() {  # stop_groups NAME...: SIGTERM to each server's whole process group (what
    # `ray stop` sends Ray's processes), wait, then SIGKILL what is left of them
    local name pid pids=() t=$SECONDS
    for name in "$@"; do
        [ -f "$state/$name.pid" ] || continue
        # up.sh started it under setsid: its pid is the process group id, and the group
        # lives while any of its processes does
        pid="$(cat "$state/$name.pid")"
        if group_alive "$pid"; then
            kill -TERM -- "-$pid" 2>/dev/null
            pids+=("$pid")
            echo "stopping $name (process group $pid)"
        fi
        rm -f "$state/$name.pid"
    done
    for pid in "${pids[@]}"; do
        while group_alive "$pid" && [ $((SECONDS - t)) -lt 15 ]; do sleep 0.2; done
        if group_alive "$pid"; then
            echo "  process group $pid still there after $((SECONDS - t)) s: SIGKILL"
            kill -KILL -- "-$pid" 2>/dev/null
        fi
    done
    echo "  stopped in $((SECONDS - t)) s"
    return 0
}

run=""
[ -f "$state/runtime_dir" ] && run="$(cat "$state/runtime_dir")"
pg_stop=""
if [ -n "$run" ] && [ -d "$run/postgres" ]; then
    # `pg_ctl stop` on the data dir (its fast mode disconnects MLflow), beside the rest
    "$py" "$here/cluster.py" pg-stop "$run/postgres" > "$state/logs/postgres-stop.log" 2>&1 &
    pg_stop=$!
fi

# MLflow, S3 and all Ray nodes at once.
workers=()
for f in "$state"/ray-worker-*.pid; do [ -e "$f" ] && workers+=("$(basename "$f" .pid)"); done
stop_groups mlflow s3 "${workers[@]}" ray-head

if [ -n "$run" ] && [ -d "$run/ray" ]; then
    # Core workers and job drivers run in process groups of their own: end those still
    # there by the Ray temp dirs this cluster was started with (its own).
    left="$("$py" "$here/cluster.py" session-pids "$run/ray")"
    if [ -n "$left" ]; then
        kill -KILL $left 2>/dev/null
        echo "stopped $(echo $left | wc -w) leftover process(es) of the Ray session in $run/ray"
    fi
    for node in "$run"/ray/*/; do  # keep each node's Ray logs (jobs, workers, raylet)
        node="$(basename "$node")"
        for logs in "$run/ray/$node"/session_*/logs; do
            [ -d "$logs" ] || continue
            rm -rf "$state/logs/ray/$node" && mkdir -p "$state/logs/ray" && mv "$logs" "$state/logs/ray/$node"
        done
    done
    rm -rf "$run/ray"
fi

if [ -n "$pg_stop" ]; then
    if wait "$pg_stop"; then
        echo "stopped PostgreSQL ($run/postgres)"
        # The S3 server (moto) kept its objects in memory: with the bucket gone, MLflow's
        # database would point at artifacts that no longer exist. The next up.sh starts afresh.
        rm -rf "$run/postgres"
    else
        echo "down.sh: could not stop PostgreSQL in $run/postgres; see $state/logs/postgres-stop.log" >&2
    fi
fi
[ -n "$run" ] && rmdir "$run" 2>/dev/null
rm -f "$state/postgres_uri" "$state/runtime_dir"
echo "local cluster down (logs in $state/logs)"
