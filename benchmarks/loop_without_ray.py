"""How much of the 1-worker x 2-CPU gap is the training loop's own, and how much is Ray's?
The step as a training worker builds and feeds it, without Ray Train, against the bare step
of `vaegan bench train`, alternated in one long-lived thread (as Ray Train runs the loop).

    .venv/bin/python benchmarks/loop_without_ray.py --steps 200 --rounds 6
    .venv/bin/python benchmarks/loop_without_ray.py --steps 200 --rounds 6 --beside-ray

"As a training worker builds and feeds it" (vaegan.train.set_up and loop, one rank): the
divergence guard's forward hooks and its exchange, batches from the real WebDataset reader
with the preset's loader processes, the noise seeded every step, batches moved to the step's
memory layout. `--beside-ray` starts a local Ray first as `vaegan train` does
(`cluster.connect`: its own processes at idle priority), idle beside both.

On a GPU (`--device cuda`) the batches come in pinned memory and are copied without waiting,
as a CUDA worker gets them; with `--preset celeba64 --shards DIR` it is the closest measure of
the loop around the step where Ray and MLflow are not installed (`benchmarks/gpu.sh`).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import torch

from vaegan import cluster, distributed
from vaegan.allocator import keep_freed_memory
from vaegan.bench import synchronize
from vaegan.bench_train import bare_step
from vaegan.config import load_config
from vaegan.data import make_loader
from vaegan.model import VAEGAN
from vaegan.step import TrainStep, resolve_precision, set_cuda_backends
from vaegan.train import _FiniteGuard, noise_seed

SHARDS = Path(__file__).resolve().parents[1] / "data" / "mnist5k"  # mnist32's bundled digits


def worker_loop(cfg, steps: int, warmup: int = 10, shards: Path = SHARDS, device: str = "cpu",
                threads: int = 2) -> float:
    """Images/s of the worker's step, fed by the reader, over `steps` steps after `warmup`."""
    keep_freed_memory()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev, layout = torch.device(device), torch.channels_last
    set_cuda_backends(dev, resolve_precision(cfg.train.precision, dev))
    model = VAEGAN(cfg.model).to(dev, memory_format=layout)
    nets = distributed.wrap(model, dev, cfg.train.sync_bn)
    guard = _FiniteGuard(model, dev, distributed.exchange(nets))
    step = TrainStep(*nets, cfg, dev, mean_across_ranks=guard.mean_across_ranks)
    loader = make_loader(str(shards), batch_size=cfg.data.batch_size, loader_workers=cfg.data.loader_workers,
                         shuffle_buffer=cfg.data.shuffle_buffer, flip=cfg.data.flip, epochs=None,
                         cache_mb=cfg.data.decode_cache_mb, pin_memory=dev.type == "cuda")
    for i, images in enumerate(loader):
        if i == warmup:
            synchronize(dev)
            start = time.perf_counter()
        step.generator.manual_seed(noise_seed(cfg.train.seed, 0, i))
        step(images.to(dev, memory_format=layout, non_blocking=True))
        if i + 1 == warmup + steps:
            synchronize(dev)
            return cfg.data.batch_size * steps / (time.perf_counter() - start)
    raise RuntimeError("the reader ended")  # epochs=None: it does not


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--beside-ray", action="store_true")
    ap.add_argument("--preset", default="mnist32", help="default mnist32 (the demo)")
    ap.add_argument("--shards", type=Path, default=SHARDS, help="the data (default: the bundled digits)")
    ap.add_argument("--device", default="cpu", help="cpu (default) | cuda[:N]")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = ap.parse_args()
    cfg = load_config(args.preset, overrides=args.overrides)
    rates: dict[str, list[float]] = {"bare": [], "worker": []}

    def rounds() -> None:
        for r in range(args.rounds):
            for name in ("bare", "worker") if r % 2 == 0 else ("worker", "bare"):
                rate = (bare_step(cfg, cfg.data.batch_size, args.threads, steps=args.steps, warmup=10,
                                  device=args.device) if name == "bare"
                        else worker_loop(cfg, args.steps, shards=args.shards, device=args.device,
                                         threads=args.threads))
                rates[name].append(rate)
                print(f"round {r} {name:6} {rate:7.1f} images/s", flush=True)

    if args.beside_ray:
        cluster.connect(2)
    try:
        thread = threading.Thread(target=rounds)  # one thread for all: one OpenMP team
        thread.start()
        thread.join()
    finally:
        if args.beside_ray:
            cluster.shutdown()
    ratios = [w / b for w, b in zip(rates["worker"], rates["bare"], strict=True)]
    print(f"worker / bare, per round: {', '.join(f'{x:.3f}' for x in ratios)}; "
          f"median {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
