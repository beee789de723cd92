"""Faults a run survives, each injected for real: worker processes SIGKILLed (a non-zero
rank mid-run, rank 0 between its final checkpoint and the registration), a NaN loss on one
rank, a torn model.pt and a truncated Ray checkpoint index, and a second run under a name
that is running. Real local Ray (2 CPU workers), a real MLflow server, moto S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import mlflow
import pyarrow.fs
import pytest
import torch
from mlflow.entities import LoggedModelStatus

from vaegan.checkpoint import (
    LIVE,
    MANIFEST,
    CheckpointError,
    TrainState,
    check_complete,
    fetch_complete,
    load_checkpoint,
    non_finite_tensors,
    save_checkpoint,
    scratch_dir,
)
from vaegan.cluster import LEASE, RunLease, RunLeaseError, storage_for
from vaegan.config import load_config
from vaegan.model import VAEGAN
from vaegan.train import KILL_ENV, NAN_ENV, RAY_INDEX, STEP_TAG, TrainError, fit


def train_cfg(tmp_path, mnist_shards, uri, name, *extra):
    """6 debug steps on 2 workers: metrics at 2, 4, 6; checkpoints at 3 and 6."""
    return load_config("debug", overrides=[
        f"data.shards={mnist_shards}", f"train.storage_path={tmp_path / 'runs'}",
        f"tracking.tracking_uri={uri}", "train.num_workers=2", "train.steps=6", f"train.name={name}",
        "train.log_every=2", "train.checkpoint_every=3", "train.image_every=6",
        f"tracking.model_name=faults-{name}", "data.loader_workers=0", *extra])


def checkpoints(tmp_path, name) -> list[Path]:
    """The run's checkpoint folders, oldest first (Ray names them by time)."""
    return sorted(p for p in (tmp_path / "runs" / name).glob("checkpoint_*") if p.is_dir())


def metric_steps(client, run_id, key) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


# ---------------------------------------------------------------------------------------
# Checkpoints: complete only with a matching manifest; never with non-finite weights


def test_a_checkpoint_is_complete_only_when_its_manifest_matches(tmp_path, debug_cfg):
    model = VAEGAN(debug_cfg.model)
    path = save_checkpoint(tmp_path / "ckpt", model, debug_cfg, TrainState(step=3))
    assert json.loads((path / MANIFEST).read_text())["step"] == 3
    assert check_complete(path) == ""
    weights = path / "model.pt"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # torn, as a writer killed mid-file leaves it
    assert "model.pt has" in check_complete(path)
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, other bytes
    assert "model.pt does not match" in check_complete(path)
    (path / MANIFEST).unlink()  # the writer stopped before the manifest
    assert check_complete(path).startswith("no manifest.json")


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_a_checkpoint_in_the_run_storage_is_checked_in_place(where, tmp_path, request, debug_cfg):
    """Resume and a sweep's cleanup read the manifest through the storage's filesystem: on S3
    nothing is downloaded to be checked. Sizes alone (a listing) miss a same-size change that
    the sha256 catches; a missing file is caught either way."""
    import s3fs

    path = save_checkpoint(tmp_path / "ckpt", VAEGAN(debug_cfg.model), debug_cfg, TrainState(step=3))
    root = request.getfixturevalue("s3_bucket") if where == "s3" else str(tmp_path / "store")
    run = storage_for(f"{root}/run")
    folder = f"{run.path}/checkpoint_1"
    data = (path / "model.pt").read_bytes()
    flipped = data[:-1] + bytes([data[-1] ^ 1])

    def put(name: str, content: bytes) -> None:
        if run.filesystem:
            s3fs.S3FileSystem().pipe(f"{folder}/{name}", content)
        else:
            Path(folder).mkdir(parents=True, exist_ok=True)
            Path(folder, name).write_bytes(content)

    for f in path.iterdir():
        put(f.name, f.read_bytes())
    assert check_complete(folder, run.filesystem) == ""
    fs = run.filesystem or pyarrow.fs.LocalFileSystem()
    assert fetch_complete(folder, fs, tmp_path / "copy") == ""  # what resume loads on S3
    assert {f.name: f.read_bytes() for f in (tmp_path / "copy").iterdir()} == \
        {f.name: f.read_bytes() for f in path.iterdir()}
    put("model.pt", flipped)
    assert "model.pt does not match" in check_complete(folder, run.filesystem)
    assert "model.pt does not match" in fetch_complete(folder, fs, tmp_path / "torn")
    assert not (tmp_path / "torn").exists()
    assert check_complete(folder, run.filesystem, sha256=False) == ""
    if run.filesystem:
        s3fs.S3FileSystem().rm(f"{folder}/state.json")
    else:
        Path(folder, "state.json").unlink()
    assert check_complete(folder, run.filesystem, sha256=False) == "state.json is missing"


def test_a_checkpoint_hands_over_the_model_files_before_the_optimizer_states(tmp_path, debug_cfg):
    """`model_written` sees the files a registered model keeps before trainer.pt is written;
    links taken then hold the checkpoint's bytes after the rename. No zip record carries a
    CRC-32 (the manifest's sha256 checks the files), and all of it loads."""
    model, early = VAEGAN(debug_cfg.model), tmp_path / "early"
    seen = []

    def written(folder: Path) -> None:
        early.mkdir()
        for f in sorted(folder.iterdir()):
            seen.append(f.name)
            os.link(f, early / f.name)

    path = save_checkpoint(tmp_path / "ckpt", model, debug_cfg, TrainState(step=3),
                           {"opt": torch.ones(5)}, model_written=written)
    assert seen == ["config.yaml", "model.pt", "state.json"]
    assert check_complete(path) == ""
    assert all((early / name).read_bytes() == (path / name).read_bytes() for name in seen)
    for name in ("model.pt", "trainer.pt"):
        with zipfile.ZipFile(path / name) as z:
            assert {i.CRC for i in z.infolist()} == {0}, name
    assert torch.load(path / "trainer.pt", weights_only=True)["opt"].tolist() == [1.0] * 5
    loaded, _, state = load_checkpoint(path)
    assert state.step == 3
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_a_failed_checkpoint_write_leaves_no_folder_behind(tmp_path, debug_cfg):
    """Written in place in the run's folder, a write that fails half way (a full disk) must
    leave neither a half-written temp folder nor a changed checkpoint."""
    model = VAEGAN(debug_cfg.model)

    def disk_full(folder: Path) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path / "ckpt", model, debug_cfg, TrainState(step=3), {"opt": torch.ones(5)},
                        model_written=disk_full)
    assert list(tmp_path.iterdir()) == []


def test_a_scratch_folder_clears_those_a_killed_process_left(tmp_path, monkeypatch):
    """Checkpoints on S3 go through a temp folder and MLflow's models through a spool: a
    SIGKILLed worker leaves both behind (580 and 200 MB at celeba64), the next one removes
    them; a live process's stay."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    left = tmp_path / f"vaegan-ckpt-{gone.pid}-abc"
    (left / "step").mkdir(parents=True)
    live = tmp_path / f"vaegan-ckpt-{os.getppid()}-def"
    other = tmp_path / f"vaegan-mlflow-spool-{gone.pid}-ghi"  # another prefix: not this call's
    live.mkdir()
    other.mkdir()
    new = scratch_dir("vaegan-ckpt-")
    assert new.name.startswith(f"vaegan-ckpt-{os.getpid()}-") and new.is_dir()
    assert not left.exists() and live.exists() and other.exists()


def test_a_checkpoint_keeps_dis_attribute_head(tmp_path, debug_cfg):
    debug_cfg.model.dis_attributes = 4
    model = VAEGAN(debug_cfg.model)
    path = save_checkpoint(tmp_path / "ckpt", model, debug_cfg, TrainState(step=3))
    loaded, cfg, _ = load_checkpoint(path)
    assert cfg.model.dis_attributes == 4
    torch.testing.assert_close(loaded.discriminator.attributes.weight, model.discriminator.attributes.weight)
    debug_cfg.model.dis_attributes = 0  # a run resumed with the head turned off (or another label count)
    with pytest.raises(ValueError, match=r"attribute head of 4 outputs and this model one of 0 "
                                         r"\(model.dis_attributes; 0: none\): resume with the "
                                         r"loss.attribute_weight and shards"):
        VAEGAN(debug_cfg.model).load_weights(model.state_dict())


def test_a_checkpoint_is_never_written_with_non_finite_weights(tmp_path, debug_cfg):
    model = VAEGAN(debug_cfg.model)
    with torch.no_grad():
        next(model.decoder.parameters())[0].fill_(float("nan"))
    with pytest.raises(CheckpointError, match=r"checkpoint of step 7: non-finite values in decoder\."):
        save_checkpoint(tmp_path / "ckpt", model, debug_cfg, TrainState(step=7))
    assert not list(tmp_path.iterdir())


def test_non_finite_weights_are_named_and_large_finite_ones_are_not(debug_cfg):
    model = VAEGAN(debug_cfg.model)
    enc, dec = next(model.encoder.parameters()), next(model.decoder.parameters())
    with torch.no_grad():
        enc.view(-1)[:2] = 3e38  # finite, but their float32 sum overflows to inf
        dec.view(-1)[-1] = float("-inf")
    names = dict(model.named_parameters())
    assert non_finite_tensors(model) == [k for k, v in names.items() if v is dec]


# ---------------------------------------------------------------------------------------
# One run per name


@pytest.fixture(params=["folder", "s3"])
def storage(request, tmp_path):
    if request.param == "folder":
        return storage_for(str(tmp_path / "runs"))
    return storage_for(f"{request.getfixturevalue('s3_bucket')}/runs")


def write_lease(lease: RunLease, renewed_ago: float, **owner) -> None:
    """What another driver's lease looks like, written straight into storage."""
    body = {"token": "other", "job": "raysubmit_other", "host": "node-7", "pid": 4242,
            "started": "2026-01-01T00:00:00Z", "renewed": time.time() - renewed_ago, "ttl_s": 30.0, **owner}
    if lease.fs is None:
        Path(lease.path).parent.mkdir(parents=True, exist_ok=True)
        Path(lease.path).write_text(json.dumps(body))
    else:
        lease.fs.pipe_file(lease.path, json.dumps(body).encode())


def test_a_live_lease_refuses_the_name_and_a_stale_one_is_taken_over(storage):
    lease = RunLease(storage, "busy", ttl_s=30)
    write_lease(lease, renewed_ago=5)
    with pytest.raises(RunLeaseError, match=r"train.name=busy is already running: job raysubmit_other on "
                                            r"host node-7 \(pid 4242"):
        lease.acquire(settle_s=0)
    assert lease.read()["token"] == "other"  # untouched

    write_lease(lease, renewed_ago=31)  # its driver died 31 s ago, past its 30 s ttl
    with RunLease(storage, "busy", ttl_s=9) as mine:
        held = lease.read()
        assert held["token"] == mine.owner["token"] and held["pid"] == os.getpid()
        renewed, deadline = held["renewed"], time.monotonic() + 20
        while lease.read()["renewed"] == renewed and time.monotonic() < deadline:  # every ttl/3 = 3 s
            time.sleep(0.2)
        assert lease.read()["renewed"] > renewed
        with pytest.raises(RunLeaseError, match="train.name=busy is already running"):
            RunLease(storage, "busy", ttl_s=9).acquire(settle_s=0)
    assert lease.read() is None  # released at the end


@pytest.mark.slow
def test_training_under_a_running_name_is_refused(tmp_path, mnist_shards, ray_local):
    cfg = train_cfg(tmp_path, mnist_shards, "http://127.0.0.1:9", "taken")  # no MLflow is reached
    lease = RunLease(storage_for(str(tmp_path / "runs")), "taken", ttl_s=120)
    write_lease(lease, renewed_ago=1)
    with pytest.raises(RunLeaseError, match=f"train.name=taken is already running: job raysubmit_other "
                                            f".*{LEASE}"):
        fit(cfg)


# ---------------------------------------------------------------------------------------
# Killed workers


@pytest.mark.slow
def test_sigkilled_workers_lose_nothing_and_register_once(tmp_path, mnist_shards, mlflow_server, ray_local,
                                                          s3_bucket, monkeypatch):
    """Checkpoints on S3 (moto): each restart resumes from one read back from there.

    Rank 1 dies after step 5 (its last checkpoint is step 3; step 4's metrics are logged
    already); after the restart rank 0 dies after step 6's checkpoint, before registering."""
    import s3fs

    monkeypatch.setenv(KILL_ENV, f"1:5:{tmp_path / 'rank1-killed'},0:6:{tmp_path / 'rank0-killed'}")
    cfg = train_cfg(tmp_path, mnist_shards, mlflow_server, "killed", "train.max_failures=2",
                    f"train.storage_path={s3_bucket}/runs")
    res = fit(cfg)
    assert (tmp_path / "rank1-killed").exists() and (tmp_path / "rank0-killed").exists()
    assert res.step == 6
    files = s3fs.S3FileSystem().find(f"{s3_bucket}/runs/killed")
    assert any(f.endswith("model.pt") for f in files) and any(f.endswith("manifest.json") for f in files)
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id], "tags.`vaegan.run_name` = 'killed'")) == 1
    for key in ("loss", "kl_prior", "gan_bce", "images_per_s"):
        assert metric_steps(client, res.mlflow_run_id, key) == [2, 4, 6], key  # each step once
    versions = client.search_model_versions("name='faults-killed'")
    assert [(v.run_id, v.tags.get(STEP_TAG)) for v in versions] == [(res.mlflow_run_id, "6")]
    # rank 0 died while or after the final model was logged beside its checkpoint: the restart
    # registered that one or logged it anew, never a second whole copy
    finals = [m for m in client.search_logged_models([run.info.experiment_id],
                                                     filter_string=f"source_run_id = '{res.mlflow_run_id}'")
              if m.name == "model"]
    assert [(m.tags.get(STEP_TAG), m.status) for m in finals] == [("6", LoggedModelStatus.READY)]
    assert finals[0].model_id in versions[0].source


# ---------------------------------------------------------------------------------------
# Divergence


def test_the_steps_one_collective_carries_the_divergence_flag_and_the_ranks_clock():
    """Two ranks, simulated: `exchange` averages this rank's vector with a peer's. The guard
    appends this rank's clock and its non-finite flag to the step's scalars; every rank gets
    the scalars' and the clocks' means back, and a flag raised on the peer alone stops it."""
    from vaegan.train import Divergence, _FiniteGuard

    peer = torch.tensor([3.0, 4.0, 20.0, 0.0])  # the peer's two scalars, its clock, no NaN seen
    guard = _FiniteGuard(VAEGAN(load_config("debug").model), torch.device("cpu"), lambda t: (t + peer) / 2)
    guard.clock = lambda: 10.0
    assert guard.mean_across_ranks(torch.tensor([1.0, 2.0])).tolist() == [2.0, 3.0]
    assert guard.agreed_seconds == 15.0
    peer[-1] = 1.0  # the peer saw a NaN in a forward pass
    with pytest.raises(Divergence, match="non-finite values"):
        guard.mean_across_ranks(torch.tensor([1.0, 2.0]))



@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_the_guard_sees_a_non_finite_value_in_any_forward_output(bad):
    from vaegan.train import Divergence, _FiniteGuard

    model = VAEGAN(load_config("debug").model)
    guard = _FiniteGuard(model, torch.device("cpu"), lambda t: t)
    x = torch.zeros(2, model.cfg.channels, model.cfg.image_size, model.cfg.image_size)
    model.discriminator(x)
    guard.mean_across_ranks(torch.tensor([1.0]))  # finite outputs: nothing raised
    model.eval()
    model.discriminator(x.index_fill(0, torch.tensor([1]), bad))  # not a training step: not watched
    guard.mean_across_ranks(torch.tensor([1.0]))
    model.train()
    model.discriminator(x.index_fill(0, torch.tensor([1]), bad))  # one image of the batch
    with pytest.raises(Divergence, match="non-finite values in a forward pass"):
        guard.mean_across_ranks(torch.tensor([1.0]))

@pytest.mark.slow
def test_a_nan_on_one_rank_rolls_every_rank_back_with_a_lower_lr(tmp_path, mnist_shards, mlflow_server,
                                                                 ray_local, monkeypatch):
    monkeypatch.setenv(NAN_ENV, f"1:5:{tmp_path / 'nan-fired'}")  # rank 1's batch of step 5
    cfg = train_cfg(tmp_path, mnist_shards, mlflow_server, "diverged", "train.max_failures=0",
                    "train.rollback_lr_factor=0.5", "tracking.log_checkpoints=false")
    res = fit(cfg)  # no Ray restart: max_failures=0
    assert (tmp_path / "nan-fired").exists() and res.step == 6
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(res.mlflow_run_id)
    rollbacks = client.get_metric_history(res.mlflow_run_id, "rollbacks")
    assert [(m.step, m.value) for m in rollbacks] == [(5, 1.0)]
    [lr] = client.get_metric_history(res.mlflow_run_id, "lr")
    assert lr.value == pytest.approx(0.5 * cfg.optim.lr)
    assert run.data.tags["vaegan.rollback.1"].startswith("step 5 -> step 3, lr x0.5")
    assert metric_steps(client, res.mlflow_run_id, "loss") == [2, 4, 6]
    state = json.loads((checkpoints(tmp_path, "diverged")[-1] / "state.json").read_text())
    assert (state["step"], state["rollbacks"], state["lr_scale"]) == (6, 1, 0.5)


@pytest.mark.slow
def test_divergence_past_max_rollbacks_stops_with_a_clear_error(tmp_path, mnist_shards, mlflow_server,
                                                                ray_local, monkeypatch):
    monkeypatch.setenv(NAN_ENV, f"0:2:{tmp_path / 'nan-fired'}")
    cfg = train_cfg(tmp_path, mnist_shards, mlflow_server, "gave-up", "train.max_failures=0",
                    "train.max_rollbacks=0", "tracking.log_checkpoints=false", "train.num_workers=1")
    with pytest.raises(TrainError, match=r"training diverged at step 2 .* after 0 rollback\(s\), and "
                                         r"train.max_rollbacks=0: lower optim.lr"):
        fit(cfg)
    assert not checkpoints(tmp_path, "gave-up")


# ---------------------------------------------------------------------------------------
# Torn checkpoints, and a torn Ray index


@pytest.mark.slow
def test_resume_skips_a_torn_checkpoint_and_sets_aside_an_unreadable_ray_index(
        tmp_path, mnist_shards, mlflow_server, ray_local, capfd):
    """Also what any resumed run must do (one worker: resuming is the same on every rank):
    continue in the same MLflow run, log each step once, and continue the weight average."""
    def train(steps):
        return fit(train_cfg(tmp_path, mnist_shards, mlflow_server, "torn", f"train.steps={steps}",
                             "train.checkpoint_every=2", "train.keep_checkpoints=3", "train.num_workers=1",
                             "tracking.log_checkpoints=false", "train.ema=0.9"))

    client = mlflow.MlflowClient(mlflow_server)
    assert train(4).step == 4
    newest = checkpoints(tmp_path, "torn")[-1]
    assert json.loads((newest / "state.json").read_text())["step"] == 4
    weights = newest / "model.pt"
    weights.write_bytes(weights.read_bytes()[:1000])  # a crash mid-upload
    # a writer killed before its rename, in place in the run's folder (the newest name)
    unfinished = newest.with_name("checkpoint_9999-12-31_23-59-59.999999.tmp")
    unfinished.mkdir()
    (unfinished / "model.pt").write_bytes(b"\0" * 1000)
    capfd.readouterr()
    res = train(6)  # before manifests: every restart failed loading model.pt
    assert res.step == 6
    assert f"removing the unfinished checkpoint {unfinished}" in "".join(capfd.readouterr())
    assert not unfinished.exists()
    tags = client.get_run(res.mlflow_run_id).data.tags
    assert tags["vaegan.resumed_from"].startswith("step 2 (checkpoint_")
    assert f"{newest.name}: model.pt has 1000 bytes" in tags["vaegan.skipped_checkpoints"]
    run = client.get_run(res.mlflow_run_id)
    assert len(client.search_runs([run.info.experiment_id], "tags.`vaegan.run_name` = 'torn'")) == 1
    assert metric_steps(client, res.mlflow_run_id, "kl_prior") == [2, 4, 6]  # 3-4 redone, logged once
    # the average restored at step 2 (its 2 updates), then 4 more
    trainer = torch.load(checkpoints(tmp_path, "torn")[-1] / "trainer.pt", weights_only=True)
    assert trainer[LIVE]["updates"] == 6

    index = tmp_path / "runs" / "torn" / RAY_INDEX
    index.write_text(index.read_text()[:40])  # a crash mid-write of Ray's own index
    before = checkpoints(tmp_path, "torn")  # steps 4 (torn), 4 and 6: Ray's retention took step 2
    assert len(before) == 3
    capfd.readouterr()
    res = train(8)  # before: CheckpointManagerInitializationError at every start
    assert res.step == 8
    out, err = capfd.readouterr()
    assert f"Ray's checkpoint index {tmp_path / 'runs' / 'torn'}/{RAY_INDEX} is unreadable" in err
    assert list(index.parent.glob(f"{RAY_INDEX}.unreadable-*"))
    assert client.get_run(res.mlflow_run_id).data.tags["vaegan.resumed_from"].startswith("step 6 (")
    # Ray's new index holds step 8 alone, and would never delete the three from before it: the
    # oldest goes once keep_checkpoints (3) newer ones exist, as Ray does with those it holds
    assert f"removing the checkpoint {before[0]}: Ray's index does not hold it" in out + err
    assert checkpoints(tmp_path, "torn") == [*before[1:], checkpoints(tmp_path, "torn")[-1]]
