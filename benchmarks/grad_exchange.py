"""How should CPU ranks exchange gradients? Two gloo ranks x 1 thread, without Ray.

    .venv/bin/python benchmarks/grad_exchange.py --preset mnist32 --repeats 7

Alternates, `--repeats` times, three ways of running the step on the same global batch:
  one-exchange   2 ranks, bare networks, every gradient and the step's scalars in one
                 all-reduce after the backward passes (what CPU workers do)
  ddp            2 ranks, each network in its own DDP wrapper (all-reduces during the
                 backward passes), the scalars in one more all-reduce (what GPU workers do)
  one-process    1 process with 2 threads (the bare step `vaegan bench train` compares with)
and prints each one's images/s per repeat and the median. No data reader, no Ray: what is
left is the exchange itself and how often the ranks wait for each other.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vaegan import distributed
from vaegan.config import load_config
from vaegan.model import VAEGAN
from vaegan.step import TrainStep

VARIANTS = ("one-exchange", "ddp", "one-process")


def _rank(rank: int, world: int, variant: str, preset: str, steps: int, warmup: int, port: int,
          out) -> None:
    torch.set_num_threads(2 if world == 1 else 1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = load_config(preset)
    torch.manual_seed(cfg.train.seed)
    layout = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = VAEGAN(cfg.model).to(memory_format=layout)
    nets = distributed.wrap(model, torch.device("cpu"), ddp=variant == "ddp")
    step = TrainStep(*nets, cfg, "cpu", mean_across_ranks=distributed.exchange(nets))
    batch = cfg.data.batch_size * 2 // world  # the global batch of two workers
    m = cfg.model
    x = (torch.rand(batch, m.channels, m.image_size, m.image_size) * 2 - 1).to(memory_format=layout)
    for i in range(warmup + steps):
        if i == warmup:
            if world > 1:
                dist.barrier()
            start = time.perf_counter()
        step(x)
    if world > 1:
        dist.barrier()
    if rank == 0:
        out.put(batch * world * steps / (time.perf_counter() - start))
    if world > 1:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def images_per_s(variant: str, preset: str, steps: int, warmup: int, port: int) -> float:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    world = 1 if variant == "one-process" else 2
    procs = [ctx.Process(target=_rank, args=(r, world, variant, preset, steps, warmup, port, out))
             for r in range(world)]
    for p in procs:
        p.start()
    rate = out.get()
    for p in procs:
        p.join()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mnist32")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for v in VARIANTS:  # alternated: these machines drift
            rates[v].append(images_per_s(v, args.preset, args.steps, args.warmup, free_port()))
            print(f"{v:<13} {rates[v][-1]:7.1f} images/s", flush=True)
    batch = 2 * load_config(args.preset).data.batch_size
    print(f"\nmedian of {args.repeats}, {args.preset}, global batch {batch}:")
    for v in VARIANTS:
        print(f"  {v:<13} {statistics.median(rates[v]):7.1f} images/s")


if __name__ == "__main__":
    main()
