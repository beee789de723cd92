#!/usr/bin/env bash
# Stops what up.sh started.
set -uo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
state="$root/.local-cluster"
export PATH="$root/.venv/bin:$PATH"
[ -f "$state/mlflow.pid" ] && kill "$(cat "$state/mlflow.pid")" && rm "$state/mlflow.pid"
ray stop
