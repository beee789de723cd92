"""Threads beside the step in a training process. vaegan.threads: a side thread that runs
torch ops (the MLflow sender logging a model) gets no OpenMP team of its own, and the step's
thread keeps its thread count. The step's team runs at the raised priority of its thread,
where the OS allows it, and the threads and loader processes it starts do not. A lone rank has
no gloo thread waking every 10 ms.

Each check runs in a fresh process (torch's thread settings are process-wide) whose main
thread plays the step's: 2 torch threads, its team made by a parallel op. A team shows as
new threads of the process that Python did not start, named as the process (libgomp's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vaegan.checkpoint import TrainState, save_checkpoint
from vaegan.config import load_config
from vaegan.model import VAEGAN

PRELUDE = """
import os, sys, threading, torch
def comm(tid):
    try:
        return open(f"/proc/self/task/{tid}/comm").read()
    except FileNotFoundError:  # ended meanwhile
        return None
def native():  # threads that Python did not start, under the process's name: libgomp's
    # (a thread takes the name of the thread that starts it; jemalloc's, say, name themselves)
    python, name = {t.native_id for t in threading.enumerate()}, comm(os.getpid())
    return {t for t in map(int, os.listdir("/proc/self/task")) if t not in python and comm(t) == name}
torch.set_num_threads(2)  # as the step's thread is given its CPUs
def step():  # a parallel op: the step's thread gets its team
    torch.randn(2_000_000).mul(2.0)
"""

SIDE_THREAD = PRELUDE + """
from vaegan.threads import settle_this_thread, side_thread
settle_this_thread()
step()
before = native()
def side():
    if sys.argv[1] == "side":
        side_thread()
    torch.randn(2_000_000).mul(2.0)
    torch.nn.functional.conv2d(torch.randn(8, 16, 32, 32), torch.randn(16, 16, 3, 3))
    new.extend(native() - before)  # while the thread lives: its team ends with it
new = []
t = threading.Thread(target=side)
t.start(); t.join()
print(len(new), torch.get_num_threads())
"""

SENDER = PRELUDE + """
from vaegan.config import TrackingConfig
from vaegan.tracking import MlflowLogger, start_or_resume_run
tmp = sys.argv[1]
uri = f"sqlite:///{tmp}/mlflow.db"
# made before this thread's first parallel op: the logger settles the step's thread count
logger = MlflowLogger(uri, start_or_resume_run(uri, "test-threads", "sender", {}), False,
                      tracking=TrackingConfig(), say=lambda s: None)
step()
before = native()
logger.log_final_model(f"{tmp}/ckpt", 3)  # the sender loads the model and MLflow runs it
print(len(native() - before), torch.get_num_threads())  # the sender still lives
logger.end()
"""


PRIORITY = PRELUDE + """
import json, multiprocessing
from vaegan.data.reader import _loader_started
from vaegan.threads import raise_this_thread, side_thread
def nice():
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())  # Linux: per thread
def in_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start(); t.join()
    return out[0]
def may_lower():  # whether this process may lower a thread's niceness (CAP_SYS_NICE)
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice() - 1)
        return True
    except PermissionError:
        return False
def loader(q):  # a DataLoader worker: a fork of the training thread
    _loader_started(0)
    q.put(nice())
def training():  # as Ray runs it: a thread beside the process's main thread
    got = raise_this_thread()  # before the first parallel op
    before = native()
    step()
    team = [os.getpriority(os.PRIO_PROCESS, t) for t in native() - before]
    def side_main():
        side_thread()
        return nice()
    side = in_thread(side_main)
    q = multiprocessing.get_context("fork").Queue()
    p = multiprocessing.get_context("fork").Process(target=loader, args=(q,))
    p.start(); forked = q.get(); p.join()
    return dict(got=got, team=team, side=side, loader=forked)
r = dict(base=nice(), allowed=in_thread(may_lower), **in_thread(training))
print(json.dumps(r))
"""


ALONE = """
import os, time, torch.distributed as dist
from vaegan import distributed
def tcp_loops():
    return sum(open(f"/proc/self/task/{t}/comm").read().strip() == "gloo_tcp_loop"
               for t in os.listdir("/proc/self/task"))
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # as Ray Train's
deadline = time.monotonic() + 10
while not tcp_loops() and time.monotonic() < deadline:  # the loop thread names itself once it runs
    time.sleep(0.01)
before = tcp_loops()
left = distributed.leave_group_if_alone()
deadline = time.monotonic() + 10
while tcp_loops() and time.monotonic() < deadline:  # a joined thread leaves /proc a moment later
    time.sleep(0.01)
print(before, tcp_loops(), left, dist.is_initialized(), distributed.is_distributed())
"""


def run(script: str, arg: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", script, arg], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    new, threads = out.stdout.split()[-2:]
    return int(new), int(threads)


def test_a_side_thread_gets_no_team_and_the_step_keeps_its_threads():
    # without side_thread() the side thread's ops start a team: the check can tell
    assert run(SIDE_THREAD, "plain")[0] > 0
    assert run(SIDE_THREAD, "side") == (0, 2)


@pytest.mark.slow
def test_logging_a_model_starts_no_team_beside_the_step(tmp_path):
    cfg = load_config("mnist32")
    save_checkpoint(tmp_path / "ckpt", VAEGAN(cfg.model), cfg, TrainState(step=3))
    assert run(SENDER, str(tmp_path)) == (0, 2)


def test_the_step_team_runs_raised_and_what_it_starts_does_not():
    env = {**os.environ, "VAEGAN_STEP_NICE": "-10"}
    out = subprocess.run([sys.executable, "-c", PRIORITY], capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.splitlines()[-1])
    # at -10 where the OS allows it (root, CAP_SYS_NICE); else quietly as it was
    assert r["got"] == (-10 if r["allowed"] else r["base"]), r
    assert r["team"] == [r["got"]], r  # the step's one other OpenMP thread inherited it
    assert r["side"] == r["base"] and r["loader"] == r["base"], r


@pytest.mark.parametrize("value", ["high", "-25", "20"])
def test_a_bad_step_niceness_is_named(monkeypatch, value):
    from vaegan.errors import UserError
    from vaegan.threads import step_niceness

    monkeypatch.setenv("VAEGAN_STEP_NICE", value)
    with pytest.raises(UserError, match=f"VAEGAN_STEP_NICE='{value}'.*integer from -20 to 19"):
        step_niceness()


def test_a_lone_rank_leaves_its_group_and_gloo_stops_waking():
    # gloo's TCP loop wakes every 10 ms at normal priority beside the step; one rank needs no group
    out = subprocess.run([sys.executable, "-c", ALONE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["1", "0", "True", "False", "False"]
