#!/usr/bin/env bash
# A multi-node cluster on one machine, shaped like a production one, its endpoints on 127.0.0.1:
#
#   Ray head      --num-cpus=0: runs no training; GCS, dashboard and job server (like a KubeRay head)
#   Ray workers   VAEGAN_WORKER_NODES (2) nodes, each its own raylet with VAEGAN_WORKER_CPUS (1) CPU
#   S3            moto in server mode, bucket VAEGAN_BUCKET: shards, checkpoints, MLflow artifacts
#   PostgreSQL    the `pgserver` wheel (no system package), on a Unix socket
#   MLflow        `mlflow server` on PostgreSQL, artifacts proxied to s3://BUCKET/mlflow
#
#   infra/local/up.sh
#   source .local-cluster/env        # RAY_ADDRESS, MLFLOW_TRACKING_URI, AWS_* ...
#   vaegan data prepare --source mnist5k --out s3://vaegan/mnist5k
#   ray job submit --working-dir . -- python jobs/train.py --preset mnist32 \
#       train.num_workers=2 data.shards=s3://vaegan/mnist5k train.storage_path=s3://vaegan/runs
#   infra/local/down.sh
#
# Settings (environment): VAEGAN_CLUSTER_DIR (state folder: pids, logs, the `env` file;
# default .local-cluster), VAEGAN_RAY_PORT (6380), VAEGAN_DASHBOARD_PORT (8265),
# VAEGAN_S3_PORT (9000), VAEGAN_MLFLOW_PORT (5001), VAEGAN_BUCKET (vaegan),
# VAEGAN_WORKER_NODES (2), VAEGAN_WORKER_CPUS (1), VAEGAN_OBJECT_STORE_BYTES (200000000 per node),
# VAEGAN_RUNTIME_DIR (each Ray node's temp dir and the PostgreSQL data; default
# /tmp/vaegan-HASH of the state folder: a short path, for the Unix sockets there, and one that
# pgserver may open to its `pgserver` system user when run as root, as it does every parent
# folder of its data dir).
#
# Every server runs under `setsid`, so each is its own process group that down.sh stops by
# id; down.sh never runs a global `ray stop` and kills nothing by name.
#
# Loopback: the dashboard/job server, S3 and MLflow listen on 127.0.0.1 and PostgreSQL on a
# Unix socket only. Ray itself registers each node under the machine's IP (it maps 127.0.0.1
# to it) and binds its internal gRPC ports (GCS, raylets, agents) on all interfaces, as it
# must across machines; token auth stays off here (RAY_AUTH_MODE=disabled, for the nodes and
# in `env` for clients alike), so use this on a machine whose network you trust.
set -Eeuo pipefail
set +m  # background jobs stay in this shell's group, so `setsid` execs in place and $! is the server

root="$(cd "$(dirname "$0")/../.." && pwd)"
here="$root/infra/local"
state="${VAEGAN_CLUSTER_DIR:-$root/.local-cluster}"
mkdir -p "$state"
state="$(cd "$state" && pwd)"
venv_bin="${VAEGAN_VENV_BIN:-$root/.venv/bin}"
# Ray runs job entry points with the `python` on the PATH the nodes were started with, and
# MLflow starts its server by name: the venv's bin goes first (PLATFORM.md).
export PATH="$venv_bin:$PATH"
py="$venv_bin/python"
helper() { "$py" "$here/cluster.py" "$@"; }

ray_port="${VAEGAN_RAY_PORT:-6380}"
dash_port="${VAEGAN_DASHBOARD_PORT:-8265}"
s3_port="${VAEGAN_S3_PORT:-9000}"
mlflow_port="${VAEGAN_MLFLOW_PORT:-5001}"
bucket="${VAEGAN_BUCKET:-vaegan}"
workers="${VAEGAN_WORKER_NODES:-2}"
worker_cpus="${VAEGAN_WORKER_CPUS:-1}"
object_store="${VAEGAN_OBJECT_STORE_BYTES:-200000000}"
run="${VAEGAN_RUNTIME_DIR:-/tmp/vaegan-$(printf %s "$state" | sha1sum | cut -c1-8)}"

if [ "${#run}" -gt 36 ]; then  # + /ray/worker-N/session_.../sockets/plasma_store < 108 (AF_UNIX)
    echo "up.sh: VAEGAN_RUNTIME_DIR=$run is too long for Ray's Unix sockets (36 characters at most)" >&2
    exit 1
fi
for f in "$state"/*.pid; do
    [ -e "$f" ] || continue
    if kill -0 "$(cat "$f")" 2>/dev/null; then
        echo "up.sh: a cluster from $state is running ($(basename "$f" .pid) pid $(cat "$f")); " \
             "run infra/local/down.sh first" >&2
        exit 1
    fi
done
rm -f "$state"/*.pid
helper check-ports VAEGAN_RAY_PORT="$ray_port" VAEGAN_DASHBOARD_PORT="$dash_port" \
    VAEGAN_S3_PORT="$s3_port" VAEGAN_MLFLOW_PORT="$mlflow_port"
# Each node its own temp dir, as on separate machines: nodes sharing one would share the
# runtime_env cache (one node deleted a job's working_dir while the driver on the head was
# still in it) and each log monitor would stream every node's logs.
mkdir -p "$state/logs" "$run/ray"
echo "$run" > "$state/runtime_dir"

# On failure, stop whatever was started so far.
trap 'echo "up.sh: failed; stopping what was started (logs: $state/logs)" >&2;
      VAEGAN_CLUSTER_DIR="$state" "$here/down.sh" >&2 || true' ERR

start() {  # start NAME CMD...: a server in its own session (process group), pid in NAME.pid
    local name="$1"; shift
    setsid "$@" > "$state/logs/$name.log" 2>&1 < /dev/null &
    echo $! > "$state/$name.pid"
}

dashboard="http://127.0.0.1:$dash_port"
s3="http://127.0.0.1:$s3_port"
mlflow_uri="http://127.0.0.1:$mlflow_port"

# What every server and node gets, as a pod would from its Secrets/ConfigMaps: moto's dummy
# credentials and endpoint, the MLflow server; and the same auth mode as the clients.
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
export AWS_ENDPOINT_URL="$s3" AWS_ENDPOINT_URL_S3="$s3"
export MLFLOW_TRACKING_URI="$mlflow_uri"
export RAY_AUTH_MODE=disabled
# A node's `ray start --block` drains the node on SIGTERM (up to 30 s, asking the GCS, which
# down.sh stops at the same moment): a throwaway cluster has nothing to drain.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
# Ray's State API clients (Ray Train's placement-group watcher among them) look for "the" Ray
# on this host; with another Ray running here they pick the wrong one or none. This points
# every process of this cluster at its own dashboard.
export RAY_API_SERVER_ADDRESS="$dashboard"
cat > "$state/env" <<EOF
# source this file to use the local cluster (written by infra/local/up.sh)
export PATH="$venv_bin:\$PATH"
export RAY_ADDRESS="127.0.0.1:$ray_port"           # drivers (ray.init, vaegan train) and ray job submit
export RAY_DASHBOARD_ADDRESS="$dashboard"  # dashboard, job server (also: ray job submit --address)
export RAY_API_SERVER_ADDRESS="$dashboard"  # Ray's State API (ray list ..., Ray Train's watcher)
export RAY_AUTH_MODE=disabled
export MLFLOW_TRACKING_URI="$mlflow_uri"
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export AWS_DEFAULT_REGION=us-east-1
export AWS_ENDPOINT_URL="$s3"
export AWS_ENDPOINT_URL_S3="$s3"
export VAEGAN_BUCKET="$bucket"
EOF

t0=$SECONDS
say() { echo "[up.sh +$((SECONDS - t0))s] $*"; }
# S3 and PostgreSQL first (light), the Ray head at the same time.
start s3 "$py" -m moto.server -H 127.0.0.1 -p "$s3_port"
start ray-head "$venv_bin/ray" start --head --block --port="$ray_port" --node-ip-address=127.0.0.1 \
    --num-cpus=0 --num-gpus=0 --include-dashboard=true --dashboard-host=127.0.0.1 \
    --dashboard-port="$dash_port" --ray-client-server-port="$(helper free-port)" \
    --dashboard-agent-listen-port="$(helper free-port)" --object-store-memory="$object_store" \
    --temp-dir="$run/ray/head" --disable-usage-stats
pg_uri="$(helper pg-start "$run/postgres" 2> "$state/logs/postgres-start.log")"
pg_uri="postgresql+psycopg2://${pg_uri#postgresql://}"  # SQLAlchemy's default postgresql driver is psycopg 3
echo "$pg_uri" > "$state/postgres_uri"
helper wait-http "$s3" "$(cat "$state/s3.pid")" 60
helper make-bucket "$s3" "$bucket"
say "S3 $s3 (bucket $bucket) and PostgreSQL ($run/postgres) up"

helper wait-http "$dashboard/api/version" "$(cat "$state/ray-head.pid")" 120
helper wait-nodes "$dashboard" 1 60 "$(cat "$state/ray-head.pid")"
say "Ray head up: $dashboard"

# MLflow once the head is up, not beside it: a node's raylet waits a fixed 30 s (not a
# setting in this Ray) for its dashboard agent to start, then aborts, and on 2 busy cores
# the head's agent, importing beside the dashboard, MLflow and another test's training,
# once took longer (docs/platform.md).
# PostgreSQL backend, artifacts proxied to S3 (only the server talks to S3 for them).
# No background job runner (huey workers): nothing here uses it, and it costs 4 processes.
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_S3_ENDPOINT_URL="$s3" \
start mlflow "$venv_bin/mlflow" server --backend-store-uri "$pg_uri" \
    --artifacts-destination "s3://$bucket/mlflow" --serve-artifacts \
    --host 127.0.0.1 --port "$mlflow_port" --workers 1
# Worker nodes one at a time: two raylets registering at once timed out on 2 cores. A node
# whose raylet does not register within Ray's fixed 30 s (not a setting in this Ray) exits;
# on busy cores that happened (make test, beside another test's training): up to 3 tries.
for i in $(seq 1 "$workers"); do
    for try in 1 2 3; do
        start "ray-worker-$i" "$venv_bin/ray" start --block --address="127.0.0.1:$ray_port" \
            --node-ip-address=127.0.0.1 --num-cpus="$worker_cpus" --num-gpus=0 \
            --dashboard-agent-listen-port="$(helper free-port)" --object-store-memory="$object_store" \
            --temp-dir="$run/ray/worker-$i" --disable-usage-stats
        if helper wait-nodes "$dashboard" $((i + 1)) 120 "$(cat "$state/ray-worker-$i.pid")"; then
            break
        fi
        if [ "$try" -eq 3 ]; then false; fi  # the ERR trap: stop everything, say where the logs are
        kill -- -"$(cat "$state/ray-worker-$i.pid")" 2> /dev/null || true  # what it left (own group)
        mv "$state/logs/ray-worker-$i.log" "$state/logs/ray-worker-$i.try$try.log"
        say "Ray worker node $i did not join (try $try of 3; log: ray-worker-$i.try$try.log); again"
    done
    say "Ray worker node $i joined"
done
helper wait-http "$mlflow_uri/health" "$(cat "$state/mlflow.pid")" 120
say "MLflow up: $mlflow_uri"
trap - ERR

echo "local cluster up in $((SECONDS - t0)) s (state: $state)
  Ray:     $dashboard (jobs, dashboard), GCS 127.0.0.1:$ray_port; head 0 CPUs + $workers worker nodes x $worker_cpus CPU
  S3:      $s3 (moto), bucket s3://$bucket
  MLflow:  $mlflow_uri  (backend PostgreSQL $pg_uri; artifacts s3://$bucket/mlflow)
  source $state/env   then e.g.   ray job submit --working-dir . -- python jobs/train.py ...
  stop:    VAEGAN_CLUSTER_DIR=$state infra/local/down.sh"
