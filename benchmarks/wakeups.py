"""What small, frequent wake-ups beside the step cost it, by the waking processes' CPU policy.

    .venv/bin/python benchmarks/wakeups.py --processes 15 --busy-us 87 --rounds 4

Starts `--processes` processes that each wake every 10 ms and compute for `--busy-us`
microseconds, as Ray's own processes do (15 of them at ~0.9% of a core each: 0.13 cores),
and times the bare mnist32 step on 2 threads beside them, the policies alternated each round:
none (no wakers), normal (SCHED_OTHER), idle (SCHED_IDLE), batch (SCHED_BATCH), nice19.
No Ray: this isolates the mechanism `vaegan.cluster.IdleRay` acts on. `--step-nice -10` runs
the step at the niceness `vaegan.threads.raise_this_thread` gives the training thread (needs
CAP_SYS_NICE); the wakers stay at 0 whatever it is.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

import torch

POLICIES = ("none", "normal", "idle", "batch", "nice19")


def waker(busy_us: float, policy: str, stop) -> None:
    os.setpriority(os.PRIO_PROCESS, 0, 0)  # not the step's niceness (--step-nice), which forks copy
    if policy == "idle":
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    elif policy == "batch":
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    elif policy == "nice19":
        os.nice(19)
    while not stop.is_set():
        time.sleep(0.010)
        until = time.perf_counter() + busy_us / 1e6
        while time.perf_counter() < until:
            pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--processes", type=int, default=15)
    ap.add_argument("--busy-us", type=float, default=87.0)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--step-nice", type=int, default=0,
                    help="the step's niceness, set before its threads start (below 0 needs CAP_SYS_NICE)")
    args = ap.parse_args()
    os.setpriority(os.PRIO_PROCESS, 0, args.step_nice)  # this thread; the OpenMP team inherits it

    from vaegan.allocator import keep_freed_memory
    from vaegan.config import load_config
    from vaegan.model import VAEGAN
    from vaegan.step import TrainStep

    keep_freed_memory()
    torch.set_num_threads(2)
    cfg = load_config("mnist32")
    model = VAEGAN(cfg.model).to(memory_format=torch.channels_last)
    step = TrainStep.for_model(model, cfg)
    x = (torch.rand(cfg.data.batch_size, 1, 32, 32) * 2 - 1).to(memory_format=torch.channels_last)
    for _ in range(5):
        step(x)
    rates: dict[str, list[float]] = {p: [] for p in POLICIES}
    for r in range(args.rounds):
        for policy in POLICIES if r % 2 == 0 else POLICIES[::-1]:  # drift falls on every policy
            stop = mp.Event()
            procs = [mp.Process(target=waker, args=(args.busy_us, policy, stop))
                     for _ in range(args.processes if policy != "none" else 0)]
            for p in procs:
                p.start()
            time.sleep(0.5)
            start = time.perf_counter()
            for _ in range(args.steps):
                step(x)
            rates[policy].append(args.steps * x.shape[0] / (time.perf_counter() - start))
            stop.set()
            for p in procs:
                p.join()
            print(f"round {r + 1}: {policy:<7} {rates[policy][-1]:7.1f} images/s", flush=True)
    base = statistics.median(rates["none"])
    print(f"{args.processes} wakers x {args.busy_us:g} us every 10 ms "
          f"({args.processes * args.busy_us / 1e4:.2f} cores), medians:")
    for policy, v in rates.items():
        m = statistics.median(v)
        print(f"  {policy:<7} {m:7.1f} images/s  {m / base:.3f}x  ({', '.join(f'{x:.1f}' for x in v)})")


if __name__ == "__main__":
    main()
