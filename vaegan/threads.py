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

The step's threads also run at a higher CPU priority than the rest of the machine where the OS
allows it (`raise_this_thread`, niceness VAEGAN_STEP_NICE, -10 by default). A process that
wakes beside a 2-thread step takes a core from one of its threads while the other spins at the
next barrier; Ray's own processes of a local Ray run at idle priority (`cluster.IdleRay`), yet
fifteen such wakers, 0.13 cores in all, still cost a nice-0 step 13-15% and a nice -10 one 7-8%
(benchmarks/wakeups.py, docs/results.md). Threads that the step's thread starts inherit its
niceness: a side thread goes back to the process's own (`lower_this_thread`), and the data
loader's processes to their parent's (`vaegan.data.reader`).
"""

from __future__ import annotations

import os
import threading

import torch

from vaegan.errors import UserError

STEP_NICE_ENV = "VAEGAN_STEP_NICE"
STEP_NICE = -10  # 9.3x a nice-0 thread's CPU weight; below 0 needs CAP_SYS_NICE
_base_nice: int | None = None  # the process's niceness before the step's thread was raised


def settle_this_thread() -> int:
    """Fix the calling thread's torch thread count now (at the process-wide setting, as its
    first parallel op would); a later `side_thread()` elsewhere leaves it. -> the count."""
    return torch.get_num_threads()


def side_thread() -> None:
    """Run the calling thread's torch ops on one thread, in no OpenMP team: call it first
    thing in a thread that is not the step's. Threads that have not settled their count take
    one thread from then on. It also leaves the step's raised priority, if it inherited it."""
    torch.set_num_threads(1)
    lower_this_thread()


def step_niceness() -> int:
    """VAEGAN_STEP_NICE, checked: an integer from -20 to 19 (default STEP_NICE)."""
    raw = os.environ.get(STEP_NICE_ENV, str(STEP_NICE))
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not -20 <= value <= 19:
        raise UserError(f"{STEP_NICE_ENV}={raw!r}: the training step's niceness must be an integer "
                        f"from -20 to 19 ({STEP_NICE} by default; 0 leaves the step's thread as it is)")
    return value


def raise_this_thread() -> int:
    """The calling thread (the step's) to niceness VAEGAN_STEP_NICE (default -10), before its
    first parallel op so that its OpenMP team, started then, inherits it. Where the OS refuses
    (no CAP_SYS_NICE: the usual container) the thread stays as it is, quietly: the step loses
    only what it loses anyway. -> the niceness the thread runs at."""
    global _base_nice
    tid = threading.get_native_id()
    now = os.getpriority(os.PRIO_PROCESS, tid)  # Linux: per thread
    if _base_nice is None:
        _base_nice = now
    want = step_niceness()
    if want < now:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, want)
        except PermissionError:
            pass
    return os.getpriority(os.PRIO_PROCESS, tid)


def lower_this_thread() -> None:
    """The calling thread back to the process's niceness before `raise_this_thread`: first
    thing in a thread that the step's thread started (it inherited the step's)."""
    if _base_nice is not None:
        tid = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, tid) < _base_nice:
            os.setpriority(os.PRIO_PROCESS, tid, _base_nice)  # raising niceness needs no privilege
