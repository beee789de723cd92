"""The training-side reader: WebDataset shards -> batches of float images in [-1, 1].

    loader = make_loader(url, batch_size=64, rank=r, world_size=n, loader_workers=2, epoch=e)
    for images in loader:            # (B, C, H, W) float32; (images, attrs) with_attributes
        ...
    loader.corrupt_count             # corrupt/missing samples met so far in this epoch

    make_loader(..., epoch=e, start_batch=k, epochs=None)   # epochs e, e+1, ... without end:
                                     # the training loop's; its loader processes start once

How samples are split, and why every rank gets the same number of batches (an uneven count
makes the other ranks wait forever in DDP's all-reduce):

1. The manifest gives each shard's sample count. Each epoch the shards are put in a seeded
   order (the same on every rank), which lays the split's N samples on one line.
2. Rank r takes positions [r * S, (r + 1) * S) of that line, S = (N // world_size) //
   batch_size * batch_size; the remainder is dropped (a different remainder each epoch, as
   the shard order changes). So len(loader) = S / batch_size on every rank, whatever the
   shard count or sizes, and ranks never share a sample.
3. Batch b of a rank is made by DataLoader worker b % W. Worker w holds a consecutive block
   of the rank's positions, exactly batch_size times its batch count, reads only the shard
   pieces that overlap it (streaming from the shard's start: tar has no index), shuffles them
   in its own buffer and decodes them. Sample keys carry their index in the split, so a
   worker recognises its samples by key, and workers never share one either.
4. The main process puts batches back in order b = start_batch, start_batch + 1, ...; the
   order is a function of (seed, epoch, world_size, rank, loader_workers, batch_size,
   shuffle_buffer) alone, so a resumed run (start_batch = k) sees batches k, k+1, ... of
   the uninterrupted one (flips included: they are seeded per batch).
5. With `epochs` > 1 (or None: no end) each worker goes on to its block of the next epoch
   without stopping, and the batches are those of one loader per epoch, one after another.
   That is what training uses: forking a loader process from a trainer of a GB or more
   costs a stall at every epoch's start (the fork, the first batch, and the trainer's pages
   copied on its next writes: 0.3-0.4 s at mnist32), which one stream pays once.
6. With `cache_mb` > 0 each worker keeps the images it decoded (uint8, by index in the
   split) up to that many MiB, and a later epoch takes a shard piece whose samples are all
   kept from there: no read, no tar parsing, no decoding. Parsing and decoding are a loader
   worker's whole cost (8.5 ms of CPU a batch of 32 digits), and on a machine with as many
   cores as the step has threads that CPU time is taken from the step. Batches are the same
   with or without it; it pays off when a worker's part of the split fits in the budget
   (mnist5k: 4.6 MB), since over epochs each worker reads every part of the split.

Outages are not corruption: a shard read that fails in transport (connection refused or
reset, a timeout, a body cut short, a 5xx answer; `storage.is_transient`) is retried with
backoff (0.5 s doubling to 10 s), opening the shard again and reading on past the samples
already taken, so the batches are exactly those of an undisturbed read. Once an outage has
lasted `io_retry_seconds` without progress the loader raises DataError naming the shard and
the endpoint. `loader.retry_count` / `loader.retry_seconds` say what the outages cost.

Corrupt data: a shard that fails to open or breaks off (truncated, garbled) and a sample that
is incomplete or fails to decode are skipped and counted; the missing count of a shard is
exact, from the manifest. To keep batch counts equal, a worker replaces what it lost with
repeats of samples it read well. Counts travel with each batch from the worker processes;
`loader.corrupt_count` sums them (this rank, this epoch), and once it exceeds
max_corrupt_fraction of the rank's samples per epoch the loader raises DataError in the
main process.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vaegan.data import storage  # registers the s3 opener in webdataset.gopen_schemes
from vaegan.data.errors import DataError, DataWarning
from vaegan.data.manifest import SPLITS, key_index, read_manifest, shard_folder

_SPARES = 64  # good samples a worker keeps to stand in for corrupt ones
_WARN_FIRST = 3  # corrupt shards named per worker, then silence
_TAG_SHARDS, _TAG_BUFFER, _TAG_FLIP = 1, 2, 3


def _seed(*parts: int) -> int:
    """One 32-bit seed from several integers (seed, epoch, rank, ...), well mixed."""
    return int(np.random.SeedSequence([p % 2**63 for p in parts]).generate_state(1)[0])


def epoch_order(shards: list[dict], seed: int, epoch: int, shuffle: bool) -> list[tuple[str, int, int]]:
    """The split's shards as (name, first index, count), in this epoch's seeded order."""
    first = np.cumsum([0] + [s["samples"] for s in shards])
    order = np.random.default_rng(_seed(seed, epoch, _TAG_SHARDS)).permutation(len(shards)) if shuffle \
        else range(len(shards))
    return [(shards[i]["name"], int(first[i]), shards[i]["samples"]) for i in order]


def segments(order: list[tuple[str, int, int]], begin: int, end: int) -> list[tuple[str, int, int]]:
    """The pieces of positions [begin, end) of the epoch line, as (name, lo, hi) per shard."""
    out, pos = [], 0
    for name, first, count in order:
        a, b = max(begin, pos), min(end, pos + count)
        if a < b:
            out.append((name, first + a - pos, first + b - pos))
        pos += count
    return out


def _tar_samples(stream):
    """Group a tar stream's files into samples by key (WebDataset's rule: the key is the
    name up to the first dot of its last path part)."""
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    current = None
    for f in tar_file_iterator(stream):
        key, ext = base_plus_ext(f["fname"])
        if key is None:
            continue
        if current is None or key != current["__key__"]:
            if current is not None:
                yield current
            current = {"__key__": key}
        current[ext.lower()] = f["data"]
    if current is not None:
        yield current


def decode_image(data: bytes, channels: int, size: int) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 array (C, H, W); raises on bad bytes or a wrong shape."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        if im.size != (size, size):
            raise ValueError(f"image is {im.width}x{im.height}, the manifest says {size}x{size}")
        arr = np.asarray(im)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


class _Counter:
    def __init__(self):
        self.corrupt = 0
        self.warned = 0
        self.retries, self.waited = 0, 0.0  # transport retries, and the seconds they waited

    def stats(self) -> tuple[int, int, float]:
        return self.corrupt, self.retries, self.waited

    def warn(self, message: str) -> None:
        self.warned += 1
        if self.warned <= _WARN_FIRST:
            warnings.warn(message, DataWarning, stacklevel=3)


def _loader_started(worker_id: int) -> None:
    # A fork of the thread that iterates the loader, whose niceness it inherits: a training
    # thread runs raised where it may (vaegan.threads.raise_this_thread). A loader process
    # takes its parent process's, its main thread's, instead (raising it needs no privilege).
    parent = os.getpriority(os.PRIO_PROCESS, os.getppid())  # Linux: the thread with that id
    if os.getpriority(os.PRIO_PROCESS, 0) < parent:
        os.setpriority(os.PRIO_PROCESS, 0, parent)


def _as_sent(item):
    """A loader worker's items as they are: numpy batches, pickled through the queue's pipe.
    DataLoader's default would make them tensors, which cross in shared memory: the training
    thread fetches each tensor's file descriptor over a socket from a sharer thread in the
    loader process, which wakes at normal priority for it (80-95 times a second at mnist32,
    each a preempted step thread on a machine the step fills). A copy through the pipe costs
    the training thread less: waiting for data fell from 2.0 to 1.1 ms a step at mnist32
    (docs/results.md)."""
    return item


class _ShardStream(IterableDataset):
    """What each DataLoader worker runs, each epoch: its block of samples -> ("batch", ...)
    tuples, then one ("end", ...) so its final counts (corrupt samples, transport retries,
    seconds waited) reach the main process even if it has no batches to carry them.

    DataLoader takes one item from each worker in turn. A worker with fewer batches in an
    epoch than another (10 batches on 3 workers: 4, 3, 3) sends ("pad", ...) items to make
    up the difference, so that over many epochs no worker runs ahead of the others and the
    main process never holds more than a round of batches for reordering."""

    def __init__(self, loader: ShardLoader):
        self.shards = loader.manifest["splits"][loader.split]["shards"]
        # decoded images kept across epochs, in this worker process (module docstring, 6.)
        self.cache: dict[int, tuple[np.ndarray, tuple]] = {}
        self.cache_left = int(loader.cache_mb * 2**20)
        self.urls = {s["name"]: loader.location.path(s["name"]) for s in self.shards}
        self.endpoint = loader.s3_endpoint
        self.epochs = loader.epochs
        self.rank_begin = loader.rank * loader.samples_per_epoch
        self.batch_size, self.n_batches = loader.batch_size, loader.batches_per_epoch
        self.n_workers = max(1, loader.loader_workers)
        self.start_batch, self.shuffle_buffer = loader.start_batch, loader.shuffle_buffer
        self.flip = loader.flip
        self.seed, self.epoch, self.rank = loader.seed, loader.epoch, loader.rank
        self.size, self.channels = loader.manifest["image_size"], loader.manifest["channels"]
        self.attributes = list(loader.manifest["attributes"])
        self.io_retry_seconds = loader.io_retry_seconds

    def _open(self, url: str):
        import webdataset as wds

        return wds.gopen(url, "rb", s3_endpoint=self.endpoint) if storage.is_s3(url) else wds.gopen(url, "rb")

    def _parse(self, idx: int, sample: dict):
        """(index, image bytes, attribute row), or None for an incomplete sample."""
        image = sample.get("png", sample.get("jpg"))
        if image is None or "json" not in sample:
            return None
        try:
            attrs = json.loads(sample["json"])["attributes"]
            return idx, image, tuple(float(attrs[a]) for a in self.attributes)
        except (ValueError, KeyError, TypeError):
            return None

    def _raw(self, pieces: list[tuple[str, int, int]], planned: int, counter: _Counter):
        """Exactly `planned` samples: those of `pieces`, then stand-ins for the lost. Each is
        (index, image bytes, attribute row), or (index, None, None) when its decoded image is
        in the cache."""
        good, spares = 0, []
        for name, lo, hi in pieces:
            if all(i in self.cache for i in range(lo, hi)):  # decoded before: no need to read it
                for i in range(lo, hi):
                    if len(spares) < _SPARES:
                        spares.append((i, None, None))
                    yield i, None, None
                good += hi - lo
                continue
            url, got, last = self.urls[name], 0, lo - 1
            backoff = storage.Backoff(self.io_retry_seconds, f"read {url}", self.endpoint)
            while True:  # one pass per attempt: a retry opens the shard again, reads on after `last`
                try:
                    with self._open(url) as stream:
                        for sample in _tar_samples(stream):
                            idx = key_index(sample["__key__"])
                            if idx is None or idx <= last or idx < lo:  # garbage, repeat, not ours,
                                continue                                # or taken before a retry
                            if idx >= hi:  # keys are in order: the rest of the shard is not ours
                                break
                            last = idx
                            parsed = (idx, None, None) if idx in self.cache else self._parse(idx, sample)
                            backoff.progress()
                            if parsed is not None:
                                got += 1
                                if len(spares) < _SPARES:
                                    spares.append(parsed)
                                yield parsed
                except Exception as e:
                    if storage.is_transient(e):  # the endpoint blipped: wait, then read on
                        counter.waited += backoff.wait(e)  # raises DataError once it lasts too long
                        counter.retries += 1
                        continue
                    # a shard that fails to open or breaks off: corrupt
                    counter.warn(f"corrupt shard {url}: {type(e).__name__}: {e}; lost {hi - lo - got} of "
                                 f"the {hi - lo} samples read from it")
                break
            counter.corrupt += (hi - lo) - got
            good += got
        for i in range(planned - good):
            if not spares:
                return  # nothing to stand in: the main process reports the short epoch
            yield spares[i % len(spares)]

    def _shuffle(self, samples, rng: random.Random):
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        buf = []
        for s in samples:
            buf.append(s)
            if len(buf) >= self.shuffle_buffer:
                i = rng.randrange(len(buf))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def _decode(self, group: list, epoch: int, b: int, counter: _Counter, fallback: list):
        images, rows = [], []
        for idx, data, row in group:
            if data is None:
                image, row = self.cache[idx]
            else:
                try:
                    image = decode_image(data, self.channels, self.size)
                except Exception:
                    counter.corrupt += 1
                    continue
                if image.nbytes <= self.cache_left:
                    self.cache[idx] = image, row
                    self.cache_left -= image.nbytes
            images.append(image)
            rows.append(row)
        if not images:  # a whole batch undecodable: stand in with the last good image
            if not fallback:
                raise DataError(f"batch {b}: none of its {len(group)} images could be decoded")
            images, rows = [fallback[0]], [fallback[1]]
        fallback[:] = [images[0], rows[0]]
        n_good = len(images)
        for i in range(len(group) - n_good):  # stand-ins for undecodable images, from this batch
            images.append(images[i % n_good])
            rows.append(rows[i % n_good])
        # numpy, not torch, on this path: torch's intra-op threads contend with the decoding
        # thread for small tensors (3x slower in-process on 2 cores, measured).
        x = np.stack(images).astype(np.float32) / 127.5 - 1.0  # (B, C, H, W) in [-1, 1]
        if self.flip:
            rng = np.random.default_rng(_seed(self.seed, epoch, self.rank, b, _TAG_FLIP))
            mirror = rng.random(len(x)) < 0.5
            x[mirror] = x[mirror, :, :, ::-1]
        attrs = np.asarray(rows, dtype=np.float32).reshape(len(x), len(self.attributes))
        return x, attrs

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        W, B = self.n_workers, self.batch_size
        mine = range(worker, self.n_batches, W)  # this worker's batch numbers
        begin = self.rank_begin + B * sum(len(range(v, self.n_batches, W)) for v in range(worker))
        end = begin + B * len(mine)
        for epoch in itertools.islice(itertools.count(self.epoch), self.epochs):  # epochs=None: no end
            counter, fallback = _Counter(), []  # counts are per epoch
            order = epoch_order(self.shards, self.seed, epoch, shuffle=self.shuffle_buffer > 0)
            rng = random.Random(_seed(self.seed, epoch, self.rank, worker, _TAG_BUFFER))
            stream = self._shuffle(self._raw(segments(order, begin, end), end - begin, counter), rng)
            start = self.start_batch if epoch == self.epoch else 0
            rounds = max(sum(b >= start for b in range(v, self.n_batches, W)) for v in range(W))
            sent = 0
            for b in mine:
                group = list(itertools.islice(stream, B))
                if len(group) < B:
                    rounds = 0  # short (only when nothing could stand in for lost samples): an error
                    break
                if b < start:
                    continue  # resuming: read past it, but do not spend time decoding it
                images, attrs = self._decode(group, epoch, b, counter, fallback)
                yield "batch", epoch, b, images, attrs, worker, counter.stats()
                sent += 1
            for _ in range(rounds - sent):
                yield "pad", epoch, None, None, None, worker, counter.stats()
            yield "end", epoch, None, None, None, worker, counter.stats()


class ShardLoader:
    """One rank's batches of `epochs` epochs from `epoch` (None: no end; see the module
    docstring). Iterating again replays the same batches.

    len(loader) = batches_per_epoch, the same on every rank; with start_batch = k the
    first epoch yields batches k .. len - 1, i.e. len - k of them, the next ones all.
    """

    def __init__(self, shards: str, manifest: dict, *, batch_size: int, rank: int, world_size: int,
                 split: str, loader_workers: int, shuffle_buffer: int, flip: bool, seed: int, epoch: int,
                 start_batch: int, with_attributes: bool, s3_endpoint: str, max_corrupt_fraction: float,
                 io_retry_seconds: float = storage.IO_RETRY_SECONDS, pin_memory: bool = False,
                 epochs: int | None = 1, cache_mb: float = 0):
        self.shards, self.manifest, self.split = shards, manifest, split
        self.epochs, self.cache_mb = epochs, cache_mb
        self.pin_memory = pin_memory
        self.location = storage.Location(shard_folder(shards), s3_endpoint)
        self.s3_endpoint = s3_endpoint
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.loader_workers, self.shuffle_buffer, self.flip = loader_workers, shuffle_buffer, flip
        self.seed, self.epoch, self.start_batch = seed, epoch, start_batch
        self.with_attributes, self.max_corrupt_fraction = with_attributes, max_corrupt_fraction
        self.io_retry_seconds = io_retry_seconds
        self.attributes: list[str] = list(manifest["attributes"])
        self.image_shape = (manifest["channels"], manifest["image_size"], manifest["image_size"])

        n = manifest["splits"][split]["samples"]
        self.batches_per_epoch = n // world_size // batch_size
        self.samples_per_epoch = self.batches_per_epoch * batch_size  # per rank
        if self.batches_per_epoch == 0:
            raise DataError(f"{shards}: the {split!r} split has {n} samples, too few for {world_size} "
                            f"rank(s) x batch_size {batch_size}")
        if start_batch > self.batches_per_epoch:
            raise DataError(f"start_batch={start_batch} is past the end of the epoch "
                            f"({self.batches_per_epoch} batches)")
        self._counts: dict[int, tuple[int, int, float]] = {}  # worker -> _Counter.stats(), this epoch
        self.most_held = 0  # the most batches held at once for reordering (tests: it stays bounded)

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def corrupt_count(self) -> int:
        """Corrupt or missing samples met so far in this epoch, summed over the workers."""
        return sum(c[0] for c in self._counts.values())

    @property
    def retry_count(self) -> int:
        """Shard reads retried after a transport error so far in this epoch (all workers)."""
        return sum(c[1] for c in self._counts.values())

    @property
    def retry_seconds(self) -> float:
        """Seconds spent waiting before those retries (summed over workers)."""
        return sum(c[2] for c in self._counts.values())

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        # Pinned (page-locked) batches let the trainer's .to(cuda, non_blocking=True) copy
        # asynchronously, overlapped with the step it follows. The pinning copy is made here,
        # on the training thread (DataLoader's pinning thread takes only tensors): not
        # measured on a GPU machine yet.
        t = torch.from_numpy(a)
        return t.pin_memory() if self.pin_memory else t

    def _check_corrupt(self) -> None:
        if self.corrupt_count > self.max_corrupt_fraction * self.samples_per_epoch:
            raise DataError(
                f"{self.shards} ({self.split}, rank {self.rank}): {self.corrupt_count} of the "
                f"{self.samples_per_epoch} samples of this epoch are corrupt or missing, more than "
                f"data.max_corrupt_fraction={self.max_corrupt_fraction}; re-run `vaegan data prepare` "
                f"or check the storage")

    def __iter__(self):
        dl = DataLoader(_ShardStream(self), batch_size=None, num_workers=self.loader_workers,
                        persistent_workers=False, collate_fn=_as_sent, worker_init_fn=_loader_started)
        W = max(1, self.loader_workers)
        final = None if self.epochs is None else self.epoch + self.epochs - 1
        counts: dict[int, dict[int, tuple]] = {}  # epoch -> worker -> stats; a worker may be an epoch ahead
        pending, ended = {}, {}  # (epoch, b) -> batch; epoch -> workers done with it
        epoch, expected = self.epoch, self.start_batch
        self._counts = counts.setdefault(epoch, {})
        for kind, e, b, images, attrs, worker, stats in dl:
            if e < epoch:
                continue  # a worker's end of an epoch already delivered: nothing left to count
            counts.setdefault(e, {})[worker] = stats
            if kind == "end":
                ended[e] = ended.get(e, 0) + 1
            elif kind == "batch":
                pending[e, b] = (images, attrs)
                self.most_held = max(self.most_held, len(pending))
            while True:
                self._check_corrupt()
                if (epoch, expected) in pending:  # workers answer round-robin: restore the order
                    images, attrs = pending.pop((epoch, expected))
                    expected += 1
                    yield ((self._tensor(images), self._tensor(attrs)) if self.with_attributes
                           else self._tensor(images))
                elif expected == self.batches_per_epoch and epoch != final:  # on to the next epoch
                    del counts[epoch]
                    ended.pop(epoch, None)
                    epoch, expected = epoch + 1, 0
                    self._counts = counts.setdefault(epoch, {})
                elif ended.get(epoch, 0) == W and expected < self.batches_per_epoch:
                    self._short(expected)  # every worker is done with an epoch it left short
                else:
                    break
        if expected != self.batches_per_epoch:
            self._short(expected)

    def _short(self, got: int):
        raise DataError(f"{self.shards} ({self.split}, rank {self.rank}): the epoch ended after "
                        f"{got} of {self.batches_per_epoch} batches; {self.corrupt_count} "
                        f"samples were corrupt or missing and no readable ones were left to stand in")


def make_loader(shards: str, *, batch_size: int, rank: int = 0, world_size: int = 1, split: str = "train",
                loader_workers: int = 0, shuffle_buffer: int = 1000, flip: bool = False, seed: int = 0,
                epoch: int = 0, start_batch: int = 0, with_attributes: bool = False, s3_endpoint: str = "",
                max_corrupt_fraction: float = 0.01,
                io_retry_seconds: float = storage.IO_RETRY_SECONDS, pin_memory: bool = False,
                epochs: int | None = 1, cache_mb: float = 0) -> ShardLoader:
    """`epochs` epochs (None: no end) of batches for `rank` of `world_size` from the shards at
    `shards` (a folder or s3://bucket/prefix written by `prepare`), in pinned memory if
    `pin_memory` (for a CUDA trainer), each worker keeping up to `cache_mb` MiB of decoded
    images for later epochs. See the module docstring."""
    checks = [
        (isinstance(batch_size, int) and batch_size >= 1, "batch_size", batch_size, "an integer >= 1"),
        (isinstance(world_size, int) and world_size >= 1, "world_size", world_size, "an integer >= 1"),
        (isinstance(rank, int) and 0 <= rank < world_size, "rank", rank, f"in 0..{world_size - 1}"),
        (split in SPLITS, "split", split, " | ".join(SPLITS)),
        (loader_workers >= 0, "loader_workers", loader_workers, "an integer >= 0"),
        (shuffle_buffer >= 0, "shuffle_buffer", shuffle_buffer, "an integer >= 0"),
        (epoch >= 0, "epoch", epoch, "an integer >= 0"),
        (epochs is None or (isinstance(epochs, int) and epochs >= 1), "epochs", epochs,
         "an integer >= 1, or None for no end"),
        (start_batch >= 0, "start_batch", start_batch, "an integer >= 0"),
        (0 <= max_corrupt_fraction <= 1, "max_corrupt_fraction", max_corrupt_fraction, "in [0, 1]"),
        (io_retry_seconds >= 0, "io_retry_seconds", io_retry_seconds, "a number of seconds >= 0"),
        (cache_mb >= 0, "cache_mb", cache_mb, "a number of MiB >= 0 (0: no cache)"),
    ]
    for ok, name, value, allowed in checks:
        if not ok:
            raise DataError(f"{name}={value!r} is not allowed; it must be {allowed}")
    manifest = read_manifest(shards, s3_endpoint, retry_seconds=io_retry_seconds)
    return ShardLoader(shards, manifest, batch_size=batch_size, rank=rank, world_size=world_size, split=split,
                       loader_workers=loader_workers, shuffle_buffer=shuffle_buffer, flip=flip, seed=seed,
                       epoch=epoch, start_batch=start_batch, with_attributes=with_attributes,
                       s3_endpoint=s3_endpoint, max_corrupt_fraction=max_corrupt_fraction,
                       io_retry_seconds=io_retry_seconds, pin_memory=pin_memory, epochs=epochs,
                       cache_mb=cache_mb)


def covering_batch_size(split_samples: int, wanted: int, cap: int) -> int:
    """A batch size <= cap with which a loader (which drops a split's last partial batch)
    still yields `wanted` of the split's `split_samples` images: cap if that is enough, else
    the largest divisor of split_samples in [cap / 4, cap] (500 -> 250), else the size of
    ceil(split_samples / cap) near-equal batches (then fewer than that many images are lost)."""
    if split_samples // cap * cap >= wanted:
        return cap
    for b in range(cap, max(cap // 4, 1) - 1, -1):
        if split_samples % b == 0:
            return b
    return max(split_samples // -(-split_samples // cap), 1)


def read_split(shards: str, n: int, split: str = "val", *, with_attributes: bool = False,
               batch_size: int = 250, s3_endpoint: str = "",
               io_retry_seconds: float = storage.IO_RETRY_SECONDS):
    """The first n images of `split` in reader order (no shuffle, no flip): the same images
    every time, for evaluation, image grids and attribute vectors.

    -> images (N, C, H, W), or (images, attributes (N, A)) with `with_attributes`; N <= n."""
    manifest = read_manifest(shards, s3_endpoint, retry_seconds=io_retry_seconds)
    if split not in manifest["splits"]:
        raise DataError(f"split {split!r} is not in {shards!r}; it has: {', '.join(manifest['splits'])}")
    available = manifest["splits"][split]["samples"]
    bs = covering_batch_size(available, min(n, available), batch_size)
    xs, ys, seen = [], [], 0
    for batch in make_loader(shards, batch_size=bs, split=split, with_attributes=with_attributes,
                             shuffle_buffer=0, flip=False, s3_endpoint=s3_endpoint,
                             io_retry_seconds=io_retry_seconds):
        x, a = batch if with_attributes else (batch, None)
        xs.append(x[:n - seen])
        if with_attributes:
            ys.append(a[:n - seen])
        seen += len(xs[-1])
        if seen >= n:
            break
    if not xs:
        raise DataError(f"split {split!r} of {shards!r} has no images")
    images = torch.cat(xs)
    return (images, torch.cat(ys)) if with_attributes else images
