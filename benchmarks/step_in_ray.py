"""Is the step slower in a Ray worker process? The bare step in a plain Ray task (2 CPUs)
against the same step in this process, alternated.

    .venv/bin/python benchmarks/step_in_ray.py --repeats 4

No Ray Train, no data reader, no MLflow: if the two agree, what slows the step inside
`vaegan train`'s worker is something Ray Train's worker runs beside it, not Ray's process.
"""

from __future__ import annotations

import argparse

import ray

from vaegan.bench_train import bare_step
from vaegan.config import load_config


def bare(preset: str) -> float:
    """`vaegan bench train`'s bare step: the preset's batch, 2 threads, 30 steps after 5."""
    cfg = load_config(preset)
    return bare_step(cfg, cfg.data.batch_size, threads=2, steps=30, warmup=5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mnist32")
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    in_ray = ray.remote(num_cpus=2)(bare)
    for _ in range(args.repeats):
        a = ray.get(in_ray.remote(args.preset))
        b = bare(args.preset)
        print(f"in a Ray task {a:7.1f} images/s   in this process {b:7.1f} images/s", flush=True)


if __name__ == "__main__":
    main()
