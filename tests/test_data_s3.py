"""The data layer on S3: a real moto server (servers.py `s3_server`), reached over HTTP by
s3fs in this process and in DataLoader worker processes. Nothing on the way to S3 is patched
(the bench test fakes only the clock it reads)."""

from __future__ import annotations

import importlib
import time
from types import SimpleNamespace

import pytest
import torch
import webdataset as wds
from servers import free_port, own_lines

from vaegan.data import DataError, bench_loader, check_shards, make_loader, prepare, read_manifest
from vaegan.data.storage import s3_filesystem

pytestmark = pytest.mark.slow


def _same_manifest(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k != "created"} == {k: v for k, v in b.items() if k != "created"}


def test_prepare_to_s3_and_to_a_folder_give_identical_samples(tmp_path, s3_bucket, make_folder):
    src = make_folder(tmp_path / "src", 26)
    kw = dict(image_size=16, shard_size=7, seed=2, val_fraction=0.2, progress=False)
    local = prepare(f"folder:{src}", str(tmp_path / "local"), **kw)
    url = f"{s3_bucket}/faces/v1"
    remote = prepare(f"folder:{src}", url, **kw)
    assert _same_manifest(local, remote) and _same_manifest(read_manifest(url), remote)
    assert check_shards(url) == read_manifest(url)

    # Byte-identical shards, and nothing else left in the prefix (no temporary objects).
    fs = s3_filesystem()
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(url[len("s3://"):], detail=False))
    shards = [s["name"] for split in ("train", "val") for s in remote["splits"][split]["shards"]]
    assert names == sorted(["manifest.json", *shards])
    for name in shards:
        assert fs.cat_file(f"{url}/{name}") == (tmp_path / "local" / name).read_bytes()

    # Plain WebDataset reads s3:// too: importing vaegan.data registered the opener.
    assert len(list(wds.WebDataset(f"{url}/{shards[0]}", shardshuffle=False))) == 7

    # The same batches from both, through DataLoader worker processes reading S3.
    lkw = dict(batch_size=4, loader_workers=2, shuffle_buffer=5, flip=True, seed=1, with_attributes=True)
    from_s3, from_disk = list(make_loader(url, **lkw)), list(make_loader(str(tmp_path / "local"), **lkw))
    assert len(from_s3) == len(from_disk) == 5
    for (x1, a1), (x2, a2) in zip(from_s3, from_disk, strict=True):
        assert torch.equal(x1, x2) and torch.equal(a1, a2)


def test_rerun_into_the_same_s3_prefix_replaces_stale_shards(tmp_path, s3_bucket, make_folder):
    src = make_folder(tmp_path / "src", 12, labels=False)
    url = f"{s3_bucket}/data"
    prepare(f"folder:{src}", url, image_size=8, shard_size=2, progress=False)
    m = prepare(f"folder:{src}", url, image_size=8, shard_size=100, progress=False)
    fs = s3_filesystem()
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(url[len("s3://"):], detail=False))
    assert names == ["manifest.json", "train-000000.tar", "val-000000.tar"]
    assert check_shards(url) == m


def test_s3_bench_counts_the_batches_it_reads_and_their_time(tmp_path, s3_bucket, make_folder, monkeypatch):
    """The report is what was read from S3 and how long it took. Time is a fake clock that
    every batch moves on by 1 s, the first by 4 s (worker start-up and the first fetch)."""
    src = make_folder(tmp_path / "src", 20, labels=False)
    url = f"{s3_bucket}/bench"
    prepare(f"folder:{src}", url, image_size=8, shard_size=5, val_fraction=0, progress=False)
    bench = importlib.import_module("vaegan.data.bench")
    clock = {"now": 0.0, "read": 0}

    class TimedLoader:
        def __init__(self, loader):
            self.loader = loader

        def __getattr__(self, name):
            return getattr(self.loader, name)

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            for x in self.loader:
                clock["now"] += 4.0 if clock["read"] == 0 else 1.0
                clock["read"] += 1
                yield x

    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock["now"]))
    monkeypatch.setattr(bench, "make_loader", lambda *a, **kw: TimedLoader(make_loader(*a, **kw)))
    # 7 batches of 4 from 20 images (5 batches an epoch): the bench reads on into a 2nd epoch.
    report = bench_loader(url, workers=1, batches=7, batch_size=4)
    assert clock["read"] == 7
    assert report == {"shards": url, "split": "train", "workers": 1, "batch_size": 4, "batches": 7,
                      "epochs": 1.4, "cache_mb": 0, "image_shape": [3, 8, 8], "seconds": 10.0,
                      "startup_s": 4.0, "images_per_s": 6 * 4 / 6.0,
                      "images_per_s_with_startup": 7 * 4 / 10.0}


def test_missing_bucket_unreachable_endpoint_and_missing_credentials_are_clear(
        tmp_path, s3_bucket, make_folder, monkeypatch, capsys):
    src = make_folder(tmp_path / "src", 4, labels=False)
    with pytest.raises(DataError, match=r"s3://no-such-bucket/p .*bucket 'no-such-bucket' does not exist"):
        check_shards("s3://no-such-bucket/p")
    with pytest.raises(DataError, match=r"cannot write to s3://no-such-bucket/p .*does not exist"):
        prepare(f"folder:{src}", "s3://no-such-bucket/p", progress=False)
    with pytest.raises(DataError, match=rf"no manifest.json in {s3_bucket}/empty"):
        check_shards(f"{s3_bucket}/empty")

    closed = f"http://127.0.0.1:{free_port()}"  # a port nobody listens on
    t0 = time.time()
    with pytest.raises(DataError, match=rf"cannot read shards from {s3_bucket}/x: the S3 endpoint {closed} "
                                        r"cannot be reached"):
        check_shards(f"{s3_bucket}/x", s3_endpoint=closed)
    assert time.time() - t0 < 15

    from vaegan.cli import main

    assert main(["data", "check", "--shards", "s3://no-such-bucket/p"]) == 2
    err = own_lines(capsys.readouterr().err)
    assert err.startswith("vaegan: error: ") and err.count("\n") == 1 and "no-such-bucket" in err

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(DataError, match=rf"{s3_bucket}/x .*no S3 credentials found; set AWS_ACCESS_KEY_ID"):
        check_shards(f"{s3_bucket}/x")
