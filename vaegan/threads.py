"""torch's CPU threads in a training process: one OpenMP team, the step's.

torch runs its CPU ops on OpenMP (libgomp), which gives every thread that runs a parallel op
a team of its own, kept for the thread's life. While the threads of all teams outnumber the
cores, libgomp makes every team's idle threads spin 100 times instead of ~300,000 before they
sleep (its "throttled" spin count), so the step's team sleeps and is woken at each of its
thousands of parallel regions a step. Measured at mnist32 with 2 threads on 2 cores
(docs/results.md): the step 22% slower, its threads 1,600-2,200 sleeps a second instead of
1-80. A side thread that runs torch ops, as the MLflow sender does when it logs a model (it
loads the weights and MLflow runs the model on the input example), kept that up for the rest
of the run after the first logged checkpoint.

So a side thread runs its torch ops on one thread (no team), `side_thread()`. torch reads its
thread count into each thread once, at the thread's first parallel op, from a process-wide
value that `torch.set_num_threads` also sets: the step's thread settles its own count first
(`settle_this_thread`), or a side thread's setting would become the step's.
"""

from __future__ import annotations

import torch


def settle_this_thread() -> int:
    """Fix the calling thread's torch thread count now (at the process-wide setting, as its
    first parallel op would); a later `side_thread()` elsewhere leaves it. -> the count."""
    return torch.get_num_threads()


def side_thread() -> None:
    """Run the calling thread's torch ops on one thread, in no OpenMP team: call it first
    thing in a thread that is not the step's. Threads that have not settled their count take
    one thread from then on."""
    torch.set_num_threads(1)
