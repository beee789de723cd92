#!/usr/bin/env bash
# A one-machine "cluster": a Ray head with job submission and an MLflow tracking server,
# both on loopback, from the project's venv. Then submit jobs against it:
#
#   infra/local/up.sh
#   export RAY_AUTH_MODE=disabled MLFLOW_TRACKING_URI=http://127.0.0.1:5001
#   ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
#       python jobs/train.py --preset mnist32 train.name=first
#   infra/local/down.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
state="$root/.local-cluster"
mkdir -p "$state"
# Ray runs job entry points with the `python` on the PATH the head was started with.
export PATH="$root/.venv/bin:$PATH"
# Token auth is off because everything listens on 127.0.0.1 only; clients use the same mode.
export RAY_AUTH_MODE=disabled
ray start --head --port=6380 --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 \
    --dashboard-port=8265 --num-cpus="${RAY_NUM_CPUS:-4}"
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false nohup mlflow server --backend-store-uri "sqlite:///$state/mlflow.db" \
    --artifacts-destination "$state/artifacts" --host 127.0.0.1 --port 5001 \
    > "$state/mlflow.log" 2>&1 &
echo $! > "$state/mlflow.pid"
echo "Ray dashboard/jobs: http://127.0.0.1:8265   MLflow: http://127.0.0.1:5001"
