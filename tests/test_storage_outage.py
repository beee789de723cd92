"""S3 outages cost time, not data: shard reads and checkpoint uploads wait out an endpoint
that drops every connection for a few seconds, and real corruption is still skipped.

The outage is made by `FlakyProxy`, a loopback TCP proxy in front of the session's moto
server (which keeps its state: it is never stopped). While it is "down" it resets every open
connection and every new one. It goes down on a trigger, so the outage lands exactly where
the test wants it: after N bytes of a response (mid-shard), or on the first request that
carries a given string (a checkpoint upload). Nothing on the way to S3 is patched.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import tarfile
import threading
import time

import pytest
import torch

from vaegan.data import DataError, DataWarning, make_loader, prepare
from vaegan.data.storage import Backoff, is_transient, s3_filesystem


class FlakyProxy:
    """127.0.0.1:port -> the upstream port, with outages (see the module docstring).
    `outages` lists (start, end) monotonic times; `cut` counts the connections it reset:
    the one that set off an outage, and every one attempted during it."""

    def __init__(self, upstream: str):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.lock = threading.Lock()
        self.open: set[socket.socket] = set()
        self.down_until = 0.0
        self.outages: list[tuple[float, float]] = []
        self.cut = 0
        self._after_bytes: int | None = None
        self._on_request: bytes | None = None
        self._seconds = 0.0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    # -- triggers
    def down_after_bytes(self, n: int, seconds: float) -> None:
        """Go down for `seconds` once `n` more response bytes have passed (mid-body)."""
        with self.lock:
            self._after_bytes, self._seconds = n, seconds

    def down_on_request(self, needle: bytes, seconds: float) -> None:
        """Go down for `seconds` at the first request containing `needle` (not forwarded)."""
        with self.lock:
            self._on_request, self._seconds = needle, seconds

    def is_down(self) -> bool:
        return time.monotonic() < self.down_until

    def go_down(self, seconds: float) -> None:
        with self.lock:
            now = time.monotonic()
            self.down_until = now + seconds
            self.outages.append((now, self.down_until))
            self._after_bytes = self._on_request = None
            victims, self.open = list(self.open), set()
        for s in victims:
            self._reset(s)

    def close(self) -> None:
        self._closed = True
        self.server.close()
        with self.lock:
            victims, self.open = list(self.open), set()
        for s in victims:
            self._reset(s)

    # -- plumbing
    def _reset(self, s: socket.socket) -> None:
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
            s.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv
        with contextlib.suppress(OSError):
            s.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.is_down():
                self.cut += 1
                self._reset(client)
                continue
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                self._reset(client)
                continue
            with self.lock:
                self.open |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, request: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                trip = None
                with self.lock:
                    if request and self._on_request is not None and self._on_request in data:
                        trip, data = self._seconds, b""
                    elif not request and self._after_bytes is not None:
                        if len(data) >= self._after_bytes:
                            trip, data = self._seconds, data[: self._after_bytes]
                        else:
                            self._after_bytes -= len(data)
                if data:
                    dst.sendall(data)
                if trip is not None:
                    self.cut += 1
                    self.go_down(trip)
                    break
        except OSError:
            pass
        finally:
            with self.lock:
                self.open -= {src, dst}
            self._reset(src)
            self._reset(dst)


@pytest.fixture
def proxy(s3_server):
    p = FlakyProxy(s3_server)
    yield p
    p.close()


@pytest.fixture
def face_shards(tmp_path, s3_bucket, make_folder):
    """60 RGB 16x16 images as 5 train shards of 12 (~30 KB each) on S3; yields the URL."""
    url = f"{s3_bucket}/faces"
    prepare(f"folder:{make_folder(tmp_path / 'src', 60)}", url, image_size=16, shard_size=12,
            val_fraction=0, progress=False)
    return url


LOADER = dict(batch_size=4, loader_workers=2, shuffle_buffer=16, flip=True, seed=3, with_attributes=True)


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2)
                                     for (x1, y1), (x2, y2) in zip(a, b, strict=True))


def test_transport_failures_are_transient_and_data_failures_are_not():
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": code},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    def wrapped(cause: BaseException) -> OSError:  # what s3fs raises: an OSError from botocore's error
        e = OSError(errno.EIO, str(cause))
        e.__cause__ = cause
        return e

    transient = [ConnectionRefusedError(), ConnectionResetError(), TimeoutError(),
                 EndpointConnectionError(endpoint_url="http://x"), ReadTimeoutError(endpoint_url="http://x"),
                 wrapped(client_error("SlowDown", 503)), wrapped(client_error("InternalError", 500)),
                 OSError(errno.ECONNRESET, "reset")]
    data = [FileNotFoundError("s3://b/k"), PermissionError("denied"), tarfile.ReadError("bad tar"),
            ValueError("bad image"), wrapped(client_error("NoSuchKey", 404)),
            wrapped(client_error("AccessDenied", 403)),
            OSError(errno.EIO, "disk"), DataError("x")]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in data] == [False] * len(data)

    backoff = Backoff(0, "read s3://b/k", "http://127.0.0.1:1")  # 0 s: the first failure is final
    with pytest.raises(DataError, match=r"cannot read s3://b/k: the S3 endpoint http://127.0.0.1:1 failed"):
        backoff.call(lambda: (_ for _ in ()).throw(ConnectionResetError("reset")))
    with pytest.raises(FileNotFoundError):  # not retried at all
        Backoff(60, "read s3://b/k").call(lambda: (_ for _ in ()).throw(FileNotFoundError("k")))


@pytest.mark.slow
def test_an_outage_mid_shard_is_waited_out_and_the_batches_do_not_change(face_shards, proxy):
    t0 = time.monotonic()
    undisturbed = list(make_loader(face_shards, s3_endpoint=proxy.url, **LOADER))
    calm = time.monotonic() - t0

    loader = make_loader(face_shards, s3_endpoint=proxy.url, io_retry_seconds=60, **LOADER)
    proxy.down_after_bytes(10_000, seconds=4)  # a third into the first shard body sent
    t0 = time.monotonic()
    batches = list(loader)
    took = time.monotonic() - t0

    assert len(proxy.outages) == 1 and proxy.cut >= 2, "the outage must hit the read"
    assert loader.corrupt_count == 0
    assert _same(batches, undisturbed), "an outage must not change the data"
    # Waited out: by the reader reopening the shard (retry_count), or, when the cut fell
    # between two requests, by s3fs's own retries (seen once on a loaded machine).
    assert took >= 4
    print(f"\nmid-shard outage of 4 s: {loader.retry_count} shard retries, {loader.retry_seconds:.1f} s "
          f"of backoff, {proxy.cut} connections reset, epoch read in {took:.1f} s ({calm:.1f} s undisturbed)")


@pytest.mark.slow
def test_an_outage_longer_than_io_retry_seconds_fails_naming_the_shard_and_endpoint(face_shards, proxy):
    loader = make_loader(face_shards, s3_endpoint=proxy.url, io_retry_seconds=1, **LOADER)
    proxy.down_after_bytes(10_000, seconds=120)
    t0 = time.monotonic()
    with pytest.raises(DataError, match=rf"cannot read {face_shards}/train-\d+\.tar: the S3 endpoint "
                                        rf"{proxy.url} failed for \d+ s .*data.io_retry_seconds \(now 1\)"):
        list(loader)
    assert time.monotonic() - t0 < 60


@pytest.mark.slow
def test_real_corruption_behind_the_proxy_is_still_skipped_and_counted_not_retried(
        tmp_path, s3_bucket, make_folder, proxy):
    local = tmp_path / "shards"
    prepare(f"folder:{make_folder(tmp_path / 'src', 48)}", str(local), image_size=16, shard_size=12,
            val_fraction=0, progress=False)
    # Cut one shard off in the middle of a member's data: tarfile raises ("unexpected end of
    # data"), which must be counted as corrupt, not taken for an outage and retried.
    victim = local / "train-000001.tar"
    with tarfile.open(victim) as tar:
        member = tar.getmembers()[9]
    victim.write_bytes(victim.read_bytes()[: member.offset_data + member.size // 2])
    url = f"{s3_bucket}/cut"
    fs = s3_filesystem()
    for f in sorted(local.iterdir()):
        fs.put_file(str(f), f"{url}/{f.name}")

    loader = make_loader(url, s3_endpoint=proxy.url, max_corrupt_fraction=1.0, io_retry_seconds=5,
                         **{**LOADER, "loader_workers": 0})  # in-process, so its warning is seen here
    with pytest.warns(DataWarning, match=r"corrupt shard .*train-000001.tar"):
        batches = list(loader)
    assert len(batches) == len(loader) == 12  # stand-ins keep the count
    assert 0 < loader.corrupt_count < 12 and loader.retry_count == 0
    assert not proxy.outages


@pytest.mark.slow
def test_checkpoint_storage_uploads_and_downloads_through_outages(tmp_path, s3_bucket, proxy):
    """The pyarrow filesystem Ray Train gets (`cluster.storage_for`), used the way Ray uses
    it (`pyarrow.fs.copy_files`): an upload whose PUT meets an outage, and a download cut
    off mid-body, both arrive whole. (s3fs's and botocore's own retries last ~2-5 s.)"""
    import numpy as np
    import pyarrow.fs

    from vaegan.cluster import storage_for

    src = tmp_path / "checkpoint"
    src.mkdir()
    blob = np.random.default_rng(0).bytes(3 * 2**20)
    (src / "model.pt").write_bytes(blob)
    (src / "state.json").write_text('{"step": 3}')
    storage = storage_for(f"{s3_bucket}/runs", proxy.url, retry_seconds=60)
    dest = f"{storage.path}/checkpoint_1"

    proxy.down_on_request(b"model.pt", seconds=8)
    t0 = time.monotonic()
    pyarrow.fs.copy_files(str(src), dest, destination_filesystem=storage.filesystem)
    up = time.monotonic() - t0
    assert len(proxy.outages) == 1
    assert s3_filesystem().cat_file(f"{dest}/model.pt") == blob

    (tmp_path / "back").mkdir()
    proxy.down_after_bytes(2**20, seconds=8)  # a third into model.pt's body
    t0 = time.monotonic()
    pyarrow.fs.copy_files(dest, str(tmp_path / "back"), source_filesystem=storage.filesystem)
    down = time.monotonic() - t0
    assert len(proxy.outages) == 2
    assert (tmp_path / "back" / "model.pt").read_bytes() == blob
    assert (tmp_path / "back" / "state.json").read_text() == '{"step": 3}'
    print(f"\n8 s outages: upload took {up:.1f} s, download {down:.1f} s; {proxy.cut} connections reset")


@pytest.mark.slow
def test_training_survives_an_outage_during_a_checkpoint_upload(tmp_path, mnist_shards, s3_bucket, proxy,
                                                                mlflow_server, ray_local):
    """Shards and checkpoints on S3 behind the proxy; it goes down for 10 s (longer than
    s3fs's and botocore's own retries last, ~2-5 s) when the first model.pt upload starts.
    No restart is allowed (max_failures=0): the upload and the reads must wait it out."""
    import mlflow

    from vaegan.config import load_config
    from vaegan.train import fit

    fs = s3_filesystem()
    data = f"{s3_bucket}/mnist"
    fs.put(f"{mnist_shards}/", f"{data}/", recursive=True)
    cfg = load_config("debug", overrides=[
        f"data.shards={data}", f"data.s3_endpoint={proxy.url}", "data.io_retry_seconds=60",
        f"train.storage_path={s3_bucket}/runs", "train.name=outage", f"tracking.tracking_uri={mlflow_server}",
        "train.num_workers=2", "train.steps=6", "train.log_every=2", "train.checkpoint_every=3",
        "train.image_every=6", "train.max_failures=0", "tracking.log_checkpoints=false",
        "tracking.model_name=outage-model", "data.loader_workers=0"])
    proxy.down_on_request(b"model.pt", seconds=10)
    t0 = time.monotonic()
    res = fit(cfg)
    took = time.monotonic() - t0

    assert len(proxy.outages) == 1, "the outage must hit a checkpoint upload"
    assert res.step == 6
    client = mlflow.MlflowClient(mlflow_server)
    skipped = client.get_metric_history(res.mlflow_run_id, "skipped_samples")
    assert [m.step for m in skipped] == [2, 4, 6] and all(m.value == 0 for m in skipped)
    files = fs.find(f"{s3_bucket}/runs/outage")
    uploads = sorted(f.rsplit("/", 2)[-2] for f in files if f.endswith("/model.pt"))
    assert len(uploads) == 2, files  # checkpoints at steps 3 and 6 (keep_checkpoints=2)
    print(f"\ncheckpoint-upload outage of 10 s: {proxy.cut} connections reset, run took {took:.0f} s")
