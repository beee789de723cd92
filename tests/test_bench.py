"""The step benchmark's yardstick (the plain port) must itself be Algorithm 1: from the same
weights and noise, its Dis update equals ours; and the FLOP count shows the saving."""

import copy
import json
import time
from pathlib import Path

import pytest
import torch

from vaegan.bench import PlainStep, count_gflop_per_image
from vaegan.cli import main
from vaegan.config import load_config
from vaegan.model import VAEGAN
from vaegan.step import TrainStep, resolve_precision


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_plain_port_updates_dis_like_the_efficient_step(debug_cfg, precision):
    """In either precision: the yardstick runs at the precision of the step it is timed
    against (a bf16 step against an fp32 port would flatter the step on AMX CPUs)."""
    cfg = copy.deepcopy(debug_cfg)
    cfg.train.precision = precision
    model = VAEGAN(cfg.model)
    other = copy.deepcopy(model)
    x = torch.rand(8, 1, 32, 32) * 2 - 1
    torch.manual_seed(3)
    plain = PlainStep(model, cfg)
    plain(x)  # draws eps then z_p with the global generator
    torch.manual_seed(3)
    noise = (torch.randn(8, 8), torch.randn(8, 8))
    ours = TrainStep.for_model(other, cfg)
    ours(x, noise)
    assert plain.precision == ours.precision == precision
    tol = {"fp32": dict(rtol=1e-4, atol=1e-6), "bf16": dict(rtol=2e-2, atol=2e-4)}[precision]
    for a, b in zip(model.discriminator.parameters(), other.discriminator.parameters(), strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_efficient_step_counts_fewer_flops(debug_cfg):
    ours = count_gflop_per_image(debug_cfg, "vaegan")
    plain = count_gflop_per_image(debug_cfg, "plain")
    assert 0 < ours < plain


def test_cli_bench_step_prints_one_json_row_per_variant_and_layout(capsys):
    assert main(["bench", "step", "--preset", "debug", "--steps", "3", "--warmup", "0"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [(r["step"], r["channels_last"]) for r in rows] == [
        ("vaegan", False), ("vaegan", True), ("plain", False), ("plain", True)]
    cfg = load_config("debug")
    gflop = {name: round(count_gflop_per_image(cfg, name), 2) for name in ("vaegan", "plain")}
    precision = resolve_precision(cfg.train.precision, torch.device("cpu"))
    for r in rows:
        assert (r["preset"], r["batch"], r["precision"]) == ("debug", cfg.data.batch_size, precision)
        assert r["gflop_per_image"] == gflop[r["step"]] and r["threads"] == torch.get_num_threads()
        # images per second = the batch over the median step time (rounded to 1 ms and 0.1)
        sec = r["seconds_per_step"]
        assert cfg.data.batch_size / (sec + 5e-4) - 0.05 <= r["images_per_s"], r
        assert sec < 5e-4 or r["images_per_s"] <= cfg.data.batch_size / (sec - 5e-4) + 0.05, r
    assert gflop["vaegan"] < gflop["plain"]
    assert main(["bench", "step", "--preset", "debug", "--steps", "1", "--warmup", "0",
                 "--memory-format", "channels-last"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [(r["step"], r["channels_last"]) for r in rows] == [("vaegan", True), ("plain", True)]


def test_layouts_run_alternated_and_a_bad_one_is_named():
    from vaegan.bench_train import parse_layouts, run_order
    from vaegan.errors import UserError

    assert parse_layouts("1x2, 2x1") == [(1, 2), (2, 1)]
    # odd rounds reversed: a drifting machine weighs on both layouts alike
    assert run_order(["A", "B"], 3) == [(0, "A"), (0, "B"), (1, "B"), (1, "A"), (2, "A"), (2, "B")]
    for spec, bad in [("1x2,2y1", "'2y1'"), ("0x2", "'0x2'"), ("1x2,", "''"), ("1x2,1x2", "named twice")]:
        with pytest.raises(UserError, match=bad):
            parse_layouts(spec)


def test_rounds_give_each_layout_its_medians(monkeypatch):
    """`bench_train_rounds` over stand-in runs: the medians per layout, and each layout's
    end-to-end speed against the first layout's."""
    import vaegan.bench_train as bt

    rates = {(1, 2): iter([300.0, 250.0, 320.0]), (2, 1): iter([400.0, 390.0, 200.0])}
    calls = []

    def fake(preset, overrides, *, workers, threads, steps, warmup, cpu_every):
        calls.append((workers, threads))
        rate = next(rates[workers, threads])
        return {"workers": workers, "threads_per_worker": threads, "images_per_s": rate,
                "bare_images_per_s": 400.0, "ratio": rate / 400, "per_step_ms": {"step": 64e3 / rate},
                "bare_step_ms": 160.0, "global_batch": 64, "precision": "bf16"}

    monkeypatch.setattr(bt, "bench_train", fake)
    seen = []
    result = bt.bench_train_rounds("mnist32", [], layouts=[(1, 2), (2, 1)], rounds=3, on_run=seen.append,
                                   steps=10, warmup=2, cpu_every=1.0)
    assert calls == [(1, 2), (2, 1), (2, 1), (1, 2), (1, 2), (2, 1)]
    assert [r["round"] for r in seen] == [1, 1, 2, 2, 3, 3] and result["runs"] == seen
    one, two = result["medians"]["1x2"], result["medians"]["2x1"]
    assert (one["images_per_s"], one["ratio"], one["step_ms"]) == (300.0, 0.75, round(64e3 / 300, 3))
    assert (two["images_per_s"], two["vs_first"], one["vs_first"]) == (390.0, 1.3, 1.0)
    assert "2x1" in bt.format_medians(result) and "round 3  2x1" in bt.format_run(seen[-1])
    with pytest.raises(bt.UserError, match="--rounds 0"):
        bt.bench_train_rounds("mnist32", [], layouts=[(1, 2)], rounds=0)


def test_cli_bench_train_layouts_name_the_workers_themselves(capsys):
    assert main(["bench", "train", "--layouts", "1x2,2x1", "--workers", "2"]) == 2
    assert "leave out --workers and --threads" in capsys.readouterr().err


def test_cpu_groups_name_ray_train_and_its_loaders():
    from vaegan.bench_train import cpu_group

    raylet = "/x/ray/core/src/ray/raylet/raylet --a"
    assert cpu_group("ray::RayTrainWorker", raylet, 5, 1) == "training workers"
    assert cpu_group("ray::RayTrainWorker", "ray::RayTrainWorker", 6, 1) == "data loaders"  # a fork
    for ray in ("ray::TrainController.run", "/v/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server",
                "ray-dashboard-NodeHead-0 (python -c ...)", "ray::IDLE"):
        assert cpu_group(ray, "", 7, 1) == "Ray", ray
    assert cpu_group("python -m pytest", "bash", 1, 1) == "driver"
    assert cpu_group("python -c busy()", "python -m pytest", 8, 1) == "other"


def test_cpu_sampler_accounts_a_busy_process_in_its_group(tmp_path):
    """A child that spins for 0.6 s of CPU (then idles, so a sample sees its total) appears
    with the CPU time it measured itself."""
    import subprocess
    import sys

    from vaegan.bench_train import CpuSampler, cpu_group

    def classify(cmd, parent_cmd, pid, me):
        return "spinner" if "spin-marker" in cmd else cpu_group(cmd, parent_cmd, pid, me)

    spin = ("# spin-marker\nimport time\nt = time.process_time()\n"
            "while time.process_time() - t < 0.6: pass\nprint(time.process_time())\ntime.sleep(3)")
    with CpuSampler(interval=0.1, classify=classify) as cpu:
        start = time.time()
        child = subprocess.run([sys.executable, "-c", spin], capture_output=True, text=True, check=True)
        end = time.time()
    own = float(child.stdout)  # the child's CPU seconds, interpreter start included
    seen = cpu.cores(start, end)["spinner"] * (end - start)
    assert own - 0.1 <= seen <= own + 0.1, (own, seen)


def test_cpu_sampler_keeps_a_training_worker_in_its_group():
    """A Ray worker is classified afresh at each sample (it starts as ray::IDLE), but once a
    training worker always one: as it exits its title is gone, and its CPU time must not
    move to another group (it did, to Ray's, in a bench whose last sample came after it)."""
    from vaegan.bench_train import CpuSampler

    title = {"now": "training workers"}
    cpu = CpuSampler(classify=lambda cmd, parent_cmd, pid, me: title["now"] if pid == me else "other")
    cpu._sample()
    title["now"] = "Ray"
    cpu._sample()
    mine = time.process_time()
    assert cpu.totals[-1]["Ray"] == 0 and cpu.totals[-1]["training workers"] >= mine - 0.5, cpu.totals


def test_cpu_sampler_never_takes_time_from_a_group_a_process_leaves():
    """A pooled ray::IDLE worker that becomes a training worker: the CPU it used as one of Ray's
    stays Ray's (the bench once reported Ray at -0.003 cores when it moved with the worker),
    and what it uses afterwards is the training workers'."""
    from vaegan.bench_train import CpuSampler

    title = {"now": "Ray"}
    cpu = CpuSampler(classify=lambda cmd, parent_cmd, pid, me: title["now"] if pid == me else "other")
    cpu._sample()
    as_ray = cpu.totals[-1]["Ray"]
    title["now"] = "training workers"
    t = time.process_time()
    while time.process_time() - t < 0.2:
        pass
    cpu._sample()
    assert cpu.totals[-1]["Ray"] == as_ray > 0, cpu.totals
    assert cpu.totals[-1]["training workers"] >= 0.19, cpu.totals  # in clock ticks (10 ms)


def test_cpu_sampler_keeps_an_exiting_process_in_its_group():
    """A process that has exited (a zombie, not yet reaped: Ray's, as a run ends) has no title
    left; its CPU time stays in the group it was seen in, not moved to "other"."""
    import subprocess
    import sys

    from vaegan.bench_train import CpuSampler, cpu_group

    def classify(cmd, parent_cmd, pid, me):
        return "Ray" if "ray-marker" in cmd else cpu_group(cmd, parent_cmd, pid, me)

    spin = ("# ray-marker\nimport sys, time\nt = time.process_time()\n"
            "while time.process_time() - t < 0.3: pass\nsys.stdin.readline()")
    child = subprocess.Popen([sys.executable, "-c", spin], stdin=subprocess.PIPE)
    try:
        cpu = CpuSampler(classify=classify)
        deadline = time.monotonic() + 30
        while (not cpu.totals or cpu.totals[-1]["Ray"] < 0.3) and time.monotonic() < deadline:
            time.sleep(0.1)
            cpu._sample()
        seen = cpu.totals[-1]["Ray"]
        child.stdin.close()  # it exits; unreaped, /proc keeps its stat without a cmdline
        while Path(f"/proc/{child.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        cpu._sample()
        assert cpu.totals[-1]["Ray"] >= seen >= 0.3, cpu.totals
    finally:
        child.wait()


@pytest.mark.slow
def test_cli_bench_train_times_the_real_loop_beside_the_bare_step(tmp_path, mnist_shards):
    """`vaegan bench train` end to end (its own local Ray, a temporary MLflow store): the
    figures come from the run's own reports, at the preset's report interval."""
    import subprocess

    from servers import BIN, env_with_venv

    env = {**env_with_venv(), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([str(BIN / "vaegan"), "bench", "train", "--preset", "debug", "--workers", "1",
                           "--threads", "1", "--steps", "30", "--warmup", "10", "--cpu-every", "0.5",
                           "--json", f"data.shards={mnist_shards}", "data.loader_workers=0"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    r = json.loads(proc.stdout[proc.stdout.rindex("\n{"):])
    assert r["log_every"] == 4, r  # the preset's 5, but five reports after the warm-up
    assert r["steps_timed"] == 18, r  # the windows from step 12 on: none that holds warm-up steps
    assert r["images_per_s"] > 0 and r["bare_images_per_s"] > 0, r
    assert r["ratio"] == pytest.approx(r["images_per_s"] / r["bare_images_per_s"], abs=2e-3), r
    assert {"data", "step", "report", "checkpoint"} <= set(r["per_step_ms"]), r
    # the final checkpoint, after the last report, is in the end to end and in its phase
    assert r["final_s"] > 0 and r["per_step_ms"]["checkpoint"] > 0, r
    assert "allreduce" not in r["per_step_ms"], r  # one worker exchanges nothing
    assert sum(r["share"].values()) <= 1.05, r  # parts of the timed window, not more
    # looks every 0.5 s: at the default 5 the worker of so short a run once lived between two
    assert r["cores"]["training workers"] > 0 and r["cores"]["Ray"] > 0, r
    assert not list(tmp_path.iterdir()), list(tmp_path.iterdir())  # it cleans up after itself
