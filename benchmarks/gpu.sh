#!/usr/bin/env bash
# The GPU path, measured: `vaegan bench step` and `vaegan bench train` for celeba64 on one
# GPU, in fp32, bf16 and compiled, written as JSON lines to $OUT (default benchmarks/gpu-out).
#
#   make .venv/.installed-stamp && benchmarks/gpu.sh          # on a machine with one CUDA GPU
#
# Also records the GPU's name and its bf16 / fp32 matmul rate (`vaegan.bench.matmul_peak_gflops`,
# a large square matmul); each step row gives its FLOP rate as a share of it (`share_of_peak`).
# Nothing is fetched: the data are the generated synthetic faces (`vaegan data prepare ...`).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-benchmarks/gpu-out}
STEPS=${STEPS:-20}
TRAIN_STEPS=${TRAIN_STEPS:-300}
mkdir -p "$OUT"
export PATH="$PWD/$BIN:$PATH"

"$BIN/python" - "$OUT/device.json" <<'EOF'
import json, sys
import torch
from vaegan.bench import matmul_peak_gflops
assert torch.cuda.is_available(), "benchmarks/gpu.sh needs a CUDA GPU"
d = torch.device("cuda")
out = {"gpu": torch.cuda.get_device_name(d), "torch": torch.__version__, "cuda": torch.version.cuda}
for precision in ("bf16", "fp32"):  # each bench step row also carries its share of these
    out[f"matmul_tflops_{precision}"] = round(matmul_peak_gflops(precision, d) / 1000, 1)
print(json.dumps(out))
open(sys.argv[1], "w").write(json.dumps(out) + "\n")
EOF

step() {  # one `vaegan bench step` run -> $OUT/step-$1.jsonl
    local name=$1; shift
    echo "== bench step $name" >&2
    "$BIN/vaegan" bench step --preset celeba64 --device cuda --steps "$STEPS" --warmup 5 "$@" \
        | tee "$OUT/step-$name.jsonl"
}
step fp32 train.precision=fp32
step bf16 train.precision=bf16
step bf16-compiled train.precision=bf16 train.compile=true

shards="$OUT/faces64"
[ -f "$shards/manifest.json" ] || "$BIN/vaegan" data prepare --source synthetic-faces:4000 --out "$shards" --image-size 64 --quiet
train() {  # one `vaegan bench train` run (one Ray worker with the GPU) -> $OUT/train-$1.json
    local name=$1; shift
    echo "== bench train $name" >&2
    "$BIN/vaegan" bench train --preset celeba64 --workers 1 --threads 4 --steps "$TRAIN_STEPS" --warmup 30 \
        --json train.use_gpu=true "data.shards=$shards" data.loader_workers=4 train.eval_every=0 "$@" \
        | tee "$OUT/train-$name.json"
}
train bf16 train.precision=bf16
train fp32 train.precision=fp32
echo "figures in $OUT" >&2
