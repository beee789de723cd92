"""`vaegan bench train`: the whole service around the step, beside the bare step.

Runs the real training (`vaegan.train.fit`: Ray Train, the WebDataset reader, DDP, metric
reports, checkpoints, MLflow logging, evaluation as configured) for a fixed number of steps,
and in the same process times the bare step (`TrainStep` on in-memory batches, one process,
the same global batch, precision and layout, workers x threads threads). Reported:

    images_per_s        end to end: the images of every report window after the warm-up
                        over the time those windows took (the loop's own clock, all ranks)
                        and what the run waits for after its last report: the last image
                        grids, the final checkpoint, the final model's logging and
                        registration (`final_s`, once a run: the shorter the run, the more
                        of its time)
    steps_timed         the steps in those windows (the report windows that start after the
                        warm-up)
    bare_images_per_s   the bare step (images over time, timed before and after the training,
                        the mean of the two); `ratio` = end to end / bare
    per_step_ms         where a step's time goes on rank 0 (the loop's time_* metrics), averaged
                        over every counted step: data (waiting for a batch), step (forward,
                        backward, optimizer), allreduce (with several workers: the step's one
                        collective, the wait for the slowest rank included; on GPUs what DDP's
                        all-reduce, overlapped with the backward, leaves), report (the metric
                        reduction and Ray's report barrier), eval, logging, images, checkpoint
    share               the same as shares of the timed window's wall time
    allreduce_ms        one all-reduce of the three networks' gradients between two local
                        gloo processes (what the ranks exchange per step; measured apart)
    final_s             the run's tail after its last report (in images_per_s, and in the
                        phases above by what it was)
    cores               where the machine's CPU time went over the report windows, in cores
                        busy (`CpuSampler`): the training workers, their data loaders, Ray's
                        own processes (raylet, GCS, dashboard, Train's controller and helper
                        actors), the driver, and everything else on the machine. On a machine
                        with as many cores as the workers' threads, whatever the rest uses is
                        taken from the step.

Ray start-up, data preparation and the first `warmup` steps are not counted. The loop reports
at the preset's `train.log_every` (at least five times after the warm-up), as a run of the
preset does, unless the overrides set it.
"""

from __future__ import annotations

import bisect
import math
import os
import statistics
import sys
import tempfile
import threading
import time

import torch

from vaegan.config import Config, load_config
from vaegan.errors import UserError

PHASES = ("data", "step", "allreduce", "report", "eval", "logging", "images", "checkpoint")


def bare_step(cfg: Config, batch: int, threads: int, steps: int, warmup: int,
              device: torch.device | str = "cpu") -> float:
    """Images/s of TrainStep alone on random in-memory batches of `batch`, `threads` threads,
    on `device`."""
    from vaegan.allocator import keep_freed_memory
    from vaegan.bench import synchronize
    from vaegan.model import VAEGAN
    from vaegan.step import TrainStep, resolve_precision, set_cuda_backends

    keep_freed_memory()  # as the training workers do
    device = torch.device(device)
    set_cuda_backends(device, resolve_precision(cfg.train.precision, device))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        layout = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        model = VAEGAN(cfg.model).to(device, memory_format=layout)
        step = TrainStep.for_model(model, cfg)
        m = cfg.model
        x = (torch.rand(batch, m.channels, m.image_size, m.image_size, device=device) * 2 - 1
             ).to(memory_format=layout)
        for i in range(warmup + steps):
            if i == warmup:
                synchronize(device)
                start = time.perf_counter()
            step(x)
        synchronize(device)
        # images over the whole time, as the end-to-end figure is counted (a median would
        # leave out the stalls that end to end has to count)
        return batch * steps / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
        if device.type == "cuda":  # the training worker gets the GPU's memory back
            torch.cuda.empty_cache()


CPU_GROUPS = ("training workers", "data loaders", "Ray", "driver", "other")
STICKY_GROUPS = ("training workers", "data loaders")  # a process once in one stays in it


def cpu_group(cmdline: str, parent_cmdline: str, pid: int, driver_pid: int) -> str:
    """Which of CPU_GROUPS a process belongs to, from its command line and its parent's.
    A DataLoader worker is a fork of a training worker, so it carries the same title."""
    if pid == driver_pid:
        return "driver"
    if cmdline.startswith("ray::RayTrainWorker"):
        return "data loaders" if parent_cmdline.startswith("ray::RayTrainWorker") else "training workers"
    ray_parts = ("ray::", "ray-dashboard", "/ray/", "raylet", "gcs_server")
    return "Ray" if any(part in cmdline for part in ray_parts) else "other"


class CpuSampler:
    """Cumulative CPU seconds (user + system) of every process on the machine, by group
    (`classify(cmdline, parent's cmdline, pid, this pid)`, `cpu_group` by default), sampled
    every `interval` s in a thread; `cores(t0, t1)` is the CPU time each group used between
    two wall-clock times over their distance. The CPU a process used between two samples goes
    to the group it is in at the second; one that starts counts from zero, one that ends keeps
    what it had at the last sample. So a group's total never falls, also when a process moves
    to another group (a pooled ray::IDLE worker that becomes a training worker: its time as
    one of Ray's stays Ray's).

    A sample reads /proc itself: psutil took 48 ms of CPU a sample over 170 processes, this
    11 ms, and the sampler runs beside the step it measures. Every 5 s by default: a timed
    window is minutes long, and the cumulative totals are interpolated between samples."""

    def __init__(self, interval: float = 5.0, classify=cpu_group):
        self.interval, self.classify = interval, classify
        self.groups: list[str] = list(CPU_GROUPS)
        self.times: list[float] = []
        self.totals: list[dict[str, float]] = []
        self._last: dict[tuple[int, bytes], tuple[str, float]] = {}  # (pid, start) -> (group, cpu s)
        self._sums: dict[str, float] = dict.fromkeys(self.groups, 0.0)  # CPU s by group so far
        self._tick = os.sysconf("SC_CLK_TCK")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vaegan-cpu-sampler", daemon=True)

    def __enter__(self) -> CpuSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        from vaegan.cluster import process_stats

        now, me = time.time(), os.getpid()
        procs = {}  # pid -> (parent pid, start time, cpu s, command line)
        for pid, (ppid, start, ticks, name) in process_stats().items():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:  # gone, or not ours to read
                continue
            # the title a process gave itself (ray::...) is its cmdline; a kernel thread has none,
            # nor has a process that is exiting
            cmd = cmdline.replace(b"\0", b" ").strip()
            procs[pid] = (ppid, start, ticks / self._tick, (cmd or name).decode(errors="replace"), not cmd)
        for pid, (ppid, start, seconds, cmd, untitled) in procs.items():
            parent_cmd = procs[ppid][3] if ppid in procs else ""
            # Classified afresh each time: a Ray worker starts as ray::IDLE and takes its
            # actor's name (ray::RayTrainWorker) later. But a training worker stays one, and a
            # process seen before keeps its group once its title is gone as it exits (Ray's,
            # as the run ends, would have moved to "other").
            group = self.classify(cmd, parent_cmd, pid, me)
            before, seen = self._last.get((pid, start), (group, 0.0))
            if before in STICKY_GROUPS or (untitled and (pid, start) in self._last):
                group = before
            if group not in self._sums:
                self.groups.append(group)
                self._sums[group] = 0.0
            self._sums[group] += max(seconds - seen, 0.0)
            self._last[(pid, start)] = (group, seconds)
        self.times.append(now)
        self.totals.append(dict(self._sums))

    def _at(self, t: float) -> dict[str, float]:
        """The cumulative totals at time t, linear between the two samples around it."""
        i = min(max(bisect.bisect_left(self.times, t), 1), len(self.times) - 1)
        t0, t1 = self.times[i - 1], self.times[i]
        w = min(max((t - t0) / (t1 - t0), 0.0), 1.0) if t1 > t0 else 1.0
        return {g: (1 - w) * self.totals[i - 1].get(g, 0.0) + w * self.totals[i].get(g, 0.0)
                for g in self.groups}

    def cores(self, t0: float, t1: float) -> dict[str, float]:
        """Cores each group kept busy on average between wall-clock times t0 < t1."""
        a, b = self._at(t0), self._at(t1)
        return {g: (b[g] - a[g]) / (t1 - t0) for g in self.groups}


def _allreduce_rank(rank: int, numel: int, port: int, repeats: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        t = torch.ones(numel)
        dist.all_reduce(t)  # warm-up: connections
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            dist.all_reduce(t)
            times.append(time.perf_counter() - start)
        if rank == 0:
            with open(out, "w") as f:
                f.write(str(statistics.median(times)))
    finally:
        dist.destroy_process_group()


def allreduce_seconds(numel: int, repeats: int = 10) -> float:
    """Median seconds of one gloo all-reduce of `numel` floats between two local processes."""
    import torch.multiprocessing as mp

    from vaegan.cluster import free_port

    with tempfile.NamedTemporaryFile(suffix=".txt") as f:
        mp.spawn(_allreduce_rank, args=(numel, free_port(), repeats, f.name), nprocs=2, join=True)
        return float(open(f.name).read())


def bench_train(preset: str = "mnist32", overrides: list[str] | None = None, *, workers: int = 1,
                threads: int = 2, steps: int = 200, warmup: int = 20, cpu_every: float = 5.0) -> dict:
    """Train `steps` steps of `preset` with `workers` Ray workers of `threads` CPUs each, and
    time the bare step beside it; -> the report (module docstring). `cpu_every`: seconds
    between the CPU sampler's looks at every process."""
    if not cpu_every > 0:
        raise UserError(f"--cpu-every {cpu_every:g}: the CPU sampler's interval must be a positive "
                        "number of seconds")
    import mlflow

    from vaegan.bench import check_benchable
    from vaegan.model import VAEGAN, param_count
    from vaegan.step import resolve_precision
    from vaegan.train import fit

    # its runs, checkpoints and MLflow store are read back below, then removed
    with tempfile.TemporaryDirectory(prefix="vaegan-bench-train-") as tmp:
        base = [f"train.storage_path={tmp}/runs", f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db"]
        cfg = load_config(preset, overrides=[*base, *(overrides or []), f"train.num_workers={workers}",
                                             f"train.cpus_per_worker={threads}", f"train.steps={steps}",
                                             f"train.name=bench-{int(time.time())}"])
        if not any(o.startswith("train.log_every=") for o in overrides or []):
            # The preset's report interval (the demo's 100 steps: each report is a barrier and
            # an MLflow write), but at least five reports after the warm-up to time.
            cfg.train.log_every = max(1, min(cfg.train.log_every, (steps - warmup) // 5))
        check_benchable(cfg)  # before the bare step, which has no labels for the attribute head
        global_batch = workers * cfg.data.batch_size
        # On GPUs the yardstick is one GPU (the bare step at one worker's batch), times the workers.
        device = torch.device("cuda" if cfg.train.use_gpu else "cpu")
        per_device = cfg.data.batch_size if cfg.train.use_gpu else global_batch
        def bare_now() -> float:
            return bare_step(cfg, per_device, workers * threads, steps=max(5, steps // 10), warmup=3,
                             device=device) * (workers if cfg.train.use_gpu else 1)

        before = bare_now()
        with CpuSampler(cpu_every) as cpu:
            res = fit(cfg)
        bare = statistics.mean([before, bare_now()])  # before and after: these machines drift
        client = mlflow.MlflowClient(res.tracking_uri)

        def history(name: str) -> dict[int, float]:
            return {m.step: m.value for m in client.get_metric_history(res.mlflow_run_id, name)}

        reports = client.get_metric_history(res.mlflow_run_id, "images_per_s")
        # Each report covers the steps since the one before; its images over its seconds. Only
        # the reports whose window starts after the warm-up count.
        reported = sorted(m.step for m in reports)
        starts = dict(zip(reported, [0, *reported], strict=False))
        rates = {m.step: m.value for m in reports if starts[m.step] >= warmup}
        if not rates:
            raise UserError(f"no report window after the warm-up of {warmup} steps; raise --steps "
                            f"(or lower train.log_every, {cfg.train.log_every})")
        spans = {s: s - starts[s] for s in rates}
        windows = sum(spans[s] * global_batch / rates[s] for s in rates)
        # the run's tail after its last report, by phase (`train.report`: final_<phase>_s)
        logged = client.get_run(res.mlflow_run_id).data.metrics
        final = {k[len("final_"):-len("_s")]: v for k, v in logged.items()
                 if k.startswith("final_") and k.endswith("_s")}
        seconds = windows + sum(final.values())
        counted = sum(spans.values())  # the steps timed
        end_to_end = counted * global_batch / seconds
        # The report windows on the wall clock (rank 0 logs each report when it is made): they
        # end at the last report and last the counted windows' seconds.
        window_end = max(m.timestamp for m in reports) / 1000
        cores = cpu.cores(window_end - windows, window_end)
        if windows < 2 * cpu_every:
            # A worker that lived between two looks was never seen under its own title: its
            # CPU time went to Ray's group (as ray::IDLE) or nowhere (a test run, 2026-12-03).
            print(f"vaegan bench train: the timed window ({windows:.1f} s) is shorter than two of the "
                  f"CPU sampler's intervals (--cpu-every {cpu_every:g}); the cores per group are rough",
                  file=sys.stderr)
        per_step, share = {}, {}
        for phase in PHASES:  # each report's seconds per step, times its steps: the phase's seconds
            h = history(f"time_{phase}")
            total = sum(h[s] * spans[s] for s in spans if s in h) + final.get(phase, 0.0)
            if total:  # averaged over every counted step: rare events (eval, checkpoints) too
                per_step[phase] = 1000 * total / counted
                share[phase] = total / seconds
        with torch.device("meta"):  # shapes only: no weights to draw
            grads = param_count(VAEGAN(cfg.model))
        allreduce = allreduce_seconds(grads) if workers > 1 else 0.0
        return {
            "preset": preset, "workers": workers, "threads_per_worker": threads, "global_batch": global_batch,
            "precision": resolve_precision(cfg.train.precision, device), "device": device.type,
            "channels_last": cfg.train.channels_last, "steps": steps,
            "warmup": warmup, "log_every": cfg.train.log_every, "steps_timed": counted,
            "images_per_s": round(end_to_end, 1),
            "bare_images_per_s": round(bare, 1),
            "ratio": round(end_to_end / bare, 3) if bare else math.nan,
            "per_step_ms": {k: round(v, 2) for k, v in per_step.items()},
            "share": {k: round(v, 4) for k, v in share.items()},
            "final_s": round(sum(final.values()), 3),
            "bare_step_ms": round(1000 * global_batch / bare, 2),
            "allreduce_ms": round(1000 * allreduce, 2), "gradients": grads,
            "cores": {g: round(c, 3) for g, c in cores.items()}, "machine_cores": os.cpu_count(),
            "cpu_every": cpu_every,
        }


def parse_layouts(spec: str) -> list[tuple[int, int]]:
    """"1x2,2x1" -> [(1, 2), (2, 1)]: workers x threads per worker, each once."""
    layouts = []
    for item in spec.split(","):
        workers, sep, threads = item.strip().partition("x")
        if not (sep and workers.isdigit() and threads.isdigit() and int(workers) > 0 and int(threads) > 0):
            raise UserError(f"--layouts {spec!r}: {item.strip()!r} is not a layout; each is WORKERSxTHREADS "
                            "with both at least 1, comma-separated, e.g. 1x2,2x1")
        layouts.append((int(workers), int(threads)))
    if len(set(layouts)) < len(layouts):
        raise UserError(f"--layouts {spec!r}: a layout is named twice; --rounds repeats them")
    return layouts


def run_order(layouts: list, rounds: int) -> list[tuple[int, object]]:
    """(round, layout) in the order to run them: each round runs every layout, the odd rounds
    in reverse (1x2, 2x1, 2x1, 1x2, ...), so that a machine drifting through the session
    weighs on every layout alike."""
    return [(r, layout) for r in range(rounds) for layout in (layouts if r % 2 == 0 else layouts[::-1])]


def layout_name(report: dict) -> str:
    return f"{report['workers']}x{report['threads_per_worker']}"


def bench_train_rounds(preset: str = "mnist32", overrides: list[str] | None = None, *,
                       layouts: list[tuple[int, int]], rounds: int, on_run=None, **kwargs) -> dict:
    """`bench_train` for every layout, `rounds` times, alternated (`run_order`); each report
    goes to `on_run(report)` as it comes. -> {"runs": the reports (each with its "round"),
    "medians": per layout ("WxT") the medians of images/s, bare images/s, ratio, step ms and
    bare step ms, and its images/s over the first layout's ("vs_first", medians)}. These
    machines drift by more than the effects looked for between runs minutes apart, so one
    run of each layout shows little; the medians of alternated rounds do."""
    if rounds < 1:
        raise UserError(f"--rounds {rounds}: the number of rounds must be at least 1")
    runs = []
    for r, (workers, threads) in run_order(layouts, rounds):
        report = bench_train(preset, overrides, workers=workers, threads=threads, **kwargs)
        runs.append(report := {"round": r + 1, **report})
        if on_run:
            on_run(report)

    def figures(x: dict) -> dict:
        return {"images_per_s": x["images_per_s"], "bare_images_per_s": x["bare_images_per_s"],
                "ratio": x["ratio"], "step_ms": x["per_step_ms"].get("step", math.nan),
                "bare_step_ms": x["bare_step_ms"]}

    by_layout: dict[str, list[dict]] = {f"{w}x{t}": [] for w, t in layouts}  # in the given order
    for x in runs:
        by_layout[layout_name(x)].append(figures(x))
    medians = {name: {k: round(statistics.median(x[k] for x in mine), 3) for k in mine[0]}
               for name, mine in by_layout.items()}
    first = next(iter(medians.values()))["images_per_s"]
    for m in medians.values():
        m["vs_first"] = round(m["images_per_s"] / first, 3)
    return {"preset": preset, "rounds": rounds, "runs": runs, "medians": medians}


def format_run(r: dict) -> str:
    """One line for one run of several (`bench_train_rounds`)."""
    return (f"round {r['round']}  {layout_name(r)}  end to end {r['images_per_s']:7.1f}  "
            f"bare {r['bare_images_per_s']:7.1f} images/s  ratio {r['ratio']:.3f}  "
            f"step in the worker {r['per_step_ms'].get('step', math.nan):.1f} ms, "
            f"bare {r['bare_step_ms']:.1f} ms")


def format_medians(result: dict) -> str:
    runs = result["runs"]
    batches = ", ".join(sorted({f"{layout_name(x)} {x['global_batch']}" for x in runs}))
    lines = [f"vaegan bench train: {result['preset']}, {result['rounds']} round(s), global batch "
             f"{batches}, precision {runs[0]['precision']}; medians over the rounds:",
             f"  {'layout':<8} {'end to end':>11} {'bare':>9} {'ratio':>7} {'step ms':>9} {'bare ms':>9}"
             f" {'vs first':>9}"]
    for layout, m in result["medians"].items():
        lines.append(f"  {layout:<8} {m['images_per_s']:>11.1f} {m['bare_images_per_s']:>9.1f}"
                     f" {m['ratio']:>7.3f} {m['step_ms']:>9.1f} {m['bare_step_ms']:>9.1f}"
                     f" {m['vs_first']:>9.3f}")
    return "\n".join(lines)


def format_report(r: dict) -> str:
    lines = [f"vaegan bench train: {r['preset']}, {r['workers']} worker(s) x {r['threads_per_worker']} "
             f"thread(s), global batch {r['global_batch']}, precision {r['precision']}, "
             f"{r['steps']} steps ({r['warmup']} warm-up, a report every {r['log_every']}, "
             f"{r['steps_timed']} timed)",
             f"  {'end to end':<28} {r['images_per_s']:>9.1f} images/s",
             f"  {'bare step, one process':<28} {r['bare_images_per_s']:>9.1f} images/s",
             f"  {'ratio':<28} {r['ratio']:>9.3f}",
             f"  per step (rank 0), ms and share of the time; the bare step takes {r['bare_step_ms']:.1f}:"]
    for phase, ms in r["per_step_ms"].items():
        lines.append(f"    {phase:<26} {ms:>9.2f}   {r['share'][phase]:6.1%}")
    if r["workers"] > 1:
        lines.append(f"  {'gradient all-reduce (gloo)':<28} {r['allreduce_ms']:>9.2f} ms "
                     f"({r['gradients']:,} values, measured apart, nobody waiting)")
    lines.append(f"  {'after the last report':<28} {r['final_s']:>9.2f} s, in the phases above (the final "
                 "checkpoint, model logging and registration: once a run)")
    lines.append(f"  cores busy over the report windows (the machine has {r['machine_cores']}):")
    for group, cores in r["cores"].items():
        lines.append(f"    {group:<26} {cores:>9.2f}")
    return "\n".join(lines)
