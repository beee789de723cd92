#!/usr/bin/env bash
# The GPU path, measured: `vaegan bench step` and `vaegan bench train` for celeba64 on one
# GPU, in fp32, bf16 and compiled, written as JSON lines to $OUT (default benchmarks/gpu-out).
#
#   make .venv/.installed-stamp && benchmarks/gpu.sh          # on a machine with one CUDA GPU
#
# Also records the GPU's name and a bf16 / fp32 matmul roofline (a large square matmul), so
# the step's FLOP rate can be given as a share of what this GPU reaches. Nothing is fetched:
# the data are the generated synthetic faces (`vaegan data prepare synthetic-faces:N`).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-benchmarks/gpu-out}
STEPS=${STEPS:-20}
TRAIN_STEPS=${TRAIN_STEPS:-300}
mkdir -p "$OUT"
export PATH="$PWD/$BIN:$PATH"

"$BIN/python" - "$OUT/device.json" <<'EOF'
import json, sys, time
import torch
assert torch.cuda.is_available(), "benchmarks/gpu.sh needs a CUDA GPU"
d = torch.device("cuda")
out = {"gpu": torch.cuda.get_device_name(d), "torch": torch.__version__, "cuda": torch.version.cuda}
n = 8192
for dtype in (torch.bfloat16, torch.float32):
    a, b = (torch.randn(n, n, device=d, dtype=dtype) for _ in range(2))
    torch.backends.cuda.matmul.allow_tf32 = False
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    out[f"matmul_tflops_{str(dtype).split('.')[-1]}"] = round(20 * 2 * n**3 / (time.perf_counter() - t) / 1e12, 1)
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
