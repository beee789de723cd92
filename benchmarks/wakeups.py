"""What small, frequent wake-ups beside the step cost it, by the waking processes' CPU policy.

    .venv/bin/python benchmarks/wakeups.py --processes 15 --busy-us 87 --rounds 4

Starts `--processes` processes that each wake every 10 ms (`--period-ms`) and compute for `--busy-us`
microseconds, as Ray's own processes do (15 of them at ~0.9% of a core each: 0.13 cores),
and times the bare mnist32 step on 2 threads beside them, the policies alternated each round:
none (no wakers), normal (SCHED_OTHER), idle (SCHED_IDLE), batch (SCHED_BATCH), nice19.
No Ray: this isolates the mechanism `vaegan.cluster.IdleRay` acts on. `--step-nice -10` runs
the step at the niceness `vaegan.threads.raise_this_thread` gives the training thread (needs
CAP_SYS_NICE); the wakers stay at 0 whatever it is. `--policies` picks which to alternate;
idle-slack is idle with a timer slack of `--slack-us` (the kernel may fire a waker's timer
that much late, with others). Each line also gives the CPU the wakers got while the step ran.
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import os
import resource
import statistics
import time

import torch

POLICIES = ("none", "normal", "idle", "batch", "nice19")
PR_SET_TIMERSLACK = 29  # linux/prctl.h


def waker(busy_us: float, policy: str, stop, slack_us: float = 0.0, period_ms: float = 10.0) -> None:
    os.setpriority(os.PRIO_PROCESS, 0, 0)  # not the step's niceness (--step-nice), which forks copy
    if policy == "idle-slack":  # the kernel may fire a timer up to slack_us late, with others
        ctypes.CDLL(None).prctl(PR_SET_TIMERSLACK, int(slack_us * 1000), 0, 0, 0)
    if policy in ("idle", "idle-slack"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    elif policy == "batch":
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    elif policy == "nice19":
        os.nice(19)
    while not stop.is_set():
        time.sleep(period_ms / 1000)
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
    ap.add_argument("--policies", default=",".join(POLICIES),
                    help=f"which to alternate, of {', '.join(POLICIES)}, idle-slack (needs --slack-us)")
    ap.add_argument("--slack-us", type=float, default=0.0,
                    help="the idle-slack wakers' timer slack (the kernel's default is 50 us)")
    ap.add_argument("--period-ms", type=float, default=10.0, help="how often each waker wakes")
    args = ap.parse_args()
    policies = tuple(args.policies.split(","))
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
    rates: dict[str, list[float]] = {p: [] for p in policies}
    cores: dict[str, list[float]] = {p: [] for p in policies}  # the wakers' CPU while the step ran
    for r in range(args.rounds):
        for policy in policies if r % 2 == 0 else policies[::-1]:  # drift falls on every policy
            stop = mp.Event()
            procs = [mp.Process(target=waker,
                                args=(args.busy_us, policy, stop, args.slack_us, args.period_ms))
                     for _ in range(args.processes if policy != "none" else 0)]
            for p in procs:
                p.start()
            time.sleep(0.5)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            for _ in range(args.steps):
                step(x)
            seconds = time.perf_counter() - start
            rates[policy].append(args.steps * x.shape[0] / seconds)
            stop.set()
            for p in procs:
                p.join()  # a child's CPU time counts once it is reaped: all of it, the 0.5 s before included
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
            cores[policy].append(cpu / (seconds + 0.5))
            print(f"round {r + 1}: {policy:<10} {rates[policy][-1]:7.1f} images/s, wakers "
                  f"{cores[policy][-1]:.3f} cores", flush=True)
    base = statistics.median(rates["none" if "none" in rates else policies[0]])
    print(f"{args.processes} wakers x {args.busy_us:g} us every {args.period_ms:g} ms "
          f"({args.processes * args.busy_us / 1e3 / args.period_ms:.2f} cores), medians:")
    for policy, v in rates.items():
        m = statistics.median(v)
        print(f"  {policy:<10} {m:7.1f} images/s  {m / base:.3f}x  ({', '.join(f'{x:.1f}' for x in v)}), "
              f"wakers {statistics.median(cores[policy]):.3f} cores")


if __name__ == "__main__":
    main()
