"""Is the step slower in a Ray worker process? The bare step in a plain Ray task (2 CPUs)
against the same step in this process, alternated.

    .venv/bin/python benchmarks/step_in_ray.py --repeats 4

No Ray Train, no data reader, no MLflow: if the two agree, what slows the step inside
`vaegan train`'s worker is something Ray Train's worker runs beside it, not Ray's process.
"""

from __future__ import annotations

import argparse
import time

import ray
import torch


def bare(preset: str = "mnist32", threads: int = 2, steps: int = 30, warmup: int = 5) -> float:
    from vaegan.config import load_config
    from vaegan.model import VAEGAN
    from vaegan.step import TrainStep

    torch.set_num_threads(threads)
    cfg = load_config(preset)
    torch.manual_seed(0)
    layout = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = VAEGAN(cfg.model).to(memory_format=layout)
    step = TrainStep.for_model(model, cfg)
    m, b = cfg.model, cfg.data.batch_size
    x = (torch.rand(b, m.channels, m.image_size, m.image_size) * 2 - 1).to(memory_format=layout)
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        step(x)
    return b * steps / (time.perf_counter() - start)


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
