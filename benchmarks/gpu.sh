#!/usr/bin/env bash
# The GPU path, measured on one CUDA GPU, celeba64 (synthetic faces, generated here):
#   device.json   the GPU, torch, and its bf16 / fp32 matmul rate (the peak each step row's
#                 `share_of_peak` is taken against)
#   step.jsonl    `vaegan bench step`: bf16 (both layouts), fp32, bf16 compiled (last: the
#                 slowest to start), each row against the plain port of Algorithm 1
#   loop.txt      the loop around the step without Ray (benchmarks/loop_without_ray.py: the
#                 WebDataset reader in pinned memory, copies that do not wait, the divergence
#                 guard) against the bare step, alternated
#   train.jsonl   `vaegan bench train`, one Ray worker with the GPU, bf16 and fp32: only where
#                 Ray and MLflow are installed
# all under $OUT (default benchmarks/gpu-out). Each part that fails is named at the end; the
# others still run.
#
#   benchmarks/gpu.sh            # the project's .venv if there is one, else python3 ($PY)
#
# The device machines lent to this project have python3 with torch and no network: carry
# webdataset and braceexpand as wheels in .whl/ (docs/results.md, "The GPU path"), installed
# below. Ray's wheel (79 MB) is over what a call may carry, so there `bench train` is skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ -d .whl ] && ! "$PY" -c "import webdataset" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/vaegan-site .whl/*.whl
    export PYTHONPATH=/tmp/vaegan-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-benchmarks/gpu-out}
STEPS=${STEPS:-20}
LOOP_STEPS=${LOOP_STEPS:-200}
TRAIN_STEPS=${TRAIN_STEPS:-300}
SHARDS=${SHARDS:-/tmp/vaegan-faces64}  # not under $OUT: only results come back from a device
mkdir -p "$OUT"
failed=()

part() {  # NAME FUNCTION: run one part, timed; a failure is recorded, not fatal
    local name=$1 start=$SECONDS
    echo "== $name" >&2
    "$2" || { failed+=("$name"); echo "== $name FAILED" >&2; }
    echo "== $name: $((SECONDS - start)) s" >&2
}
vaegan() { "$PY" -m vaegan.cli "$@"; }

device() {
    "$PY" - "$OUT/device.json" <<'EOF'
import json, sys
import torch
from vaegan.bench import matmul_peak_gflops
assert torch.cuda.is_available(), "benchmarks/gpu.sh needs a CUDA GPU"
d = torch.device("cuda")
out = {"gpu": torch.cuda.get_device_name(d), "torch": torch.__version__, "cuda": torch.version.cuda,
       "python": sys.version.split()[0]}
for precision in ("bf16", "fp32"):  # true fp32: no TF32, as an fp32 step runs (vaegan.step)
    out[f"matmul_tflops_{precision}"] = round(matmul_peak_gflops(precision, d) / 1000, 1)
print(json.dumps(out))
open(sys.argv[1], "w").write(json.dumps(out) + "\n")
EOF
}
step() {  # `vaegan bench step` rows, appended to step.jsonl
    vaegan bench step --preset celeba64 --device cuda --steps "$STEPS" --warmup 5 "$@" | tee -a "$OUT/step.jsonl"
}
step_bf16() { step train.precision=bf16; }
step_fp32() { step --memory-format channels-last train.precision=fp32; }
step_compiled() { step --memory-format channels-last train.precision=bf16 train.compile=true; }
data() {
    [ -f "$SHARDS/manifest.json" ] ||
        vaegan data prepare --source synthetic-faces:4000 --out "$SHARDS" --image-size 64 --quiet
}
loop() {
    "$PY" benchmarks/loop_without_ray.py --preset celeba64 --shards "$SHARDS" --device cuda --threads 4 \
        --steps "$LOOP_STEPS" --rounds 4 train.precision=bf16 data.loader_workers=4 | tee "$OUT/loop.txt"
}
train() {
    if ! "$PY" -c "import ray, mlflow" 2>/dev/null; then
        echo "Ray or MLflow is not installed: no bench train here" >&2
        return 0
    fi
    for precision in bf16 fp32; do
        # --json's report is the last line: Ray forwards the worker's lines before it
        vaegan bench train --preset celeba64 --workers 1 --threads 4 --steps "$TRAIN_STEPS" --warmup 30 \
            --json train.use_gpu=true "data.shards=$SHARDS" data.loader_workers=4 train.eval_every=0 \
            "train.precision=$precision" | tail -n 1 | tee -a "$OUT/train.jsonl" || return 1
    done
}

rm -f "$OUT/step.jsonl" "$OUT/train.jsonl"
part device device
if [ ${#failed[@]} -gt 0 ]; then echo "no usable GPU: stopping" >&2; exit 1; fi
part "bench step bf16" step_bf16
part "bench step fp32" step_fp32
part "data" data
part "loop without Ray" loop
part "bench train" train
part "bench step bf16 compiled" step_compiled
echo "figures in $OUT" >&2
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}" >&2
    exit 1
fi
