"""The data layer on local folders: sources, shard writer, manifest, reader, CLI.

S3 (a real moto server) is in test_data_s3.py. Every source here is tiny (tens of images,
8-32 px) so the file runs in seconds.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from servers import own_lines

from vaegan.data import DataError, DataWarning, check_shards, make_loader, prepare, read_manifest
from vaegan.data.faces import ATTRIBUTES, generate_synthetic_faces
from vaegan.data.manifest import FORMAT, FORMAT_VERSION, MANIFEST, sample_key, shard_name
from vaegan.data.reader import decode_image
from vaegan.data.sources import CELEBA_CROP


def write_uneven_shards(root: Path, sizes: list[int], image_size: int = 8) -> Path:
    """Train shards of the given sizes, written by hand (not by `prepare`), so the reader is
    tested on shard layouts prepare would not produce. Attribute `idx` = the sample's index."""
    root.mkdir(parents=True, exist_ok=True)
    shards, index = [], 0
    for number, n in enumerate(sizes):
        name = shard_name("train", number)
        with open(root / name, "wb") as f, wds.TarWriter(f) as tar:
            for _ in range(n):
                img = Image.new("L", (image_size, image_size), color=index % 256)
                buf = io.BytesIO()
                img.save(buf, "PNG")
                tar.write({"__key__": sample_key("train", index), "png": buf.getvalue(),
                           "json": {"file": f"{index}", "attributes": {"idx": index}}})
                index += 1
        shards.append({"name": name, "samples": n})
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "image_size": image_size, "channels": 1,
                "attributes": ["idx"], "splits": {"train": {"samples": index, "shards": shards},
                                                  "val": {"samples": 0, "shards": []}}}
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


def indices(loader) -> list[list[int]]:
    """The `idx` attribute of every sample, batch by batch."""
    return [attrs[:, 0].long().tolist() for _, attrs in loader]


# ---------------------------------------------------------------------------------------
# Reader: splitting across ranks and workers, order, resume, flips


def test_two_ranks_two_workers_uneven_shards_are_disjoint_with_equal_batch_counts(tmp_path):
    sizes = [7, 23, 11, 33, 9]  # 83 samples: 41 per rank, 10 batches of 4, the rest dropped
    shards = str(write_uneven_shards(tmp_path / "s", sizes))
    per_rank, lengths = [], []
    for rank in range(2):
        loader = make_loader(shards, batch_size=4, rank=rank, world_size=2, loader_workers=2,
                             shuffle_buffer=8, with_attributes=True, seed=3)
        batches = indices(loader)
        lengths.append((len(loader), len(batches)))
        assert all(len(b) == 4 for b in batches)
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat)), "a sample repeated within a rank (workers overlap)"
        per_rank.append(set(flat))
        # The rank's sample set does not depend on the worker count, only its order does.
        in_process = make_loader(shards, batch_size=4, rank=rank, world_size=2, loader_workers=0,
                                 shuffle_buffer=8, with_attributes=True, seed=3)
        assert {i for b in indices(in_process) for i in b} == per_rank[-1]
    assert lengths == [(10, 10), (10, 10)]
    assert not per_rank[0] & per_rank[1], "ranks share samples"
    assert per_rank[0] | per_rank[1] <= set(range(sum(sizes)))


def test_batches_from_loader_processes_cross_as_copies_not_shared_memory(tmp_path):
    # a shared-memory tensor is fetched from a sharer thread in the loader process, which wakes
    # at every tensor beside the step (reader._as_sent)
    shards = write_uneven_shards(tmp_path / "s", [12, 8])
    batches = list(make_loader(str(shards), batch_size=4, loader_workers=2, with_attributes=True))
    assert len(batches) == 5
    assert [(x.is_shared(), a.is_shared()) for x, a in batches] == [(False, False)] * 5
    assert sorted(i for _, a in batches for i in a[:, 0].long().tolist()) == list(range(20))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on 2 cores: on purpose
@pytest.mark.parametrize("world_size,workers,batch_size", [(3, 2, 5), (4, 3, 2), (2, 1, 16)])
def test_batch_counts_are_equal_on_every_rank(tmp_path, world_size, workers, batch_size):
    shards = str(write_uneven_shards(tmp_path / "s", [1, 30, 4, 17, 2, 26]))  # 80 samples
    seen = set()
    for rank in range(world_size):
        loader = make_loader(shards, batch_size=batch_size, rank=rank, world_size=world_size,
                             loader_workers=workers, shuffle_buffer=4, with_attributes=True)
        batches = indices(loader)
        assert len(batches) == len(loader) == 80 // world_size // batch_size
        flat = {i for b in batches for i in b}
        assert len(flat) == len(batches) * batch_size and not flat & seen
        seen |= flat


def test_same_seed_and_epoch_give_the_same_order_and_start_batch_resumes(tmp_path):
    shards = str(write_uneven_shards(tmp_path / "s", [10, 14, 12]))
    kw = dict(batch_size=4, loader_workers=2, shuffle_buffer=6, flip=True, with_attributes=True, seed=7)
    first = [(x.clone(), a.clone()) for x, a in make_loader(shards, epoch=2, **kw)]
    again = list(make_loader(shards, epoch=2, **kw))
    assert len(first) == len(again) == 9
    for (x1, a1), (x2, a2) in zip(first, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(a1, a2)
    other_epoch = [a for _, a in make_loader(shards, epoch=3, **kw)]
    assert [a.tolist() for a in other_epoch] != [a.tolist() for _, a in first]
    resumed = list(make_loader(shards, epoch=2, start_batch=3, **kw))
    assert len(resumed) == len(first) - 3
    for (x1, a1), (x2, a2) in zip(first[3:], resumed, strict=True):
        assert torch.equal(x1, x2) and torch.equal(a1, a2)


@pytest.mark.parametrize("workers", [0, 3])
@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_a_loader_over_several_epochs_gives_each_epochs_batches_in_turn(tmp_path, workers):
    """What training reads (epochs=None, its loader processes started once) is exactly one
    loader per epoch, one after another, from a resumed batch on."""
    shards = str(write_uneven_shards(tmp_path / "s", [10, 14, 12]))
    kw = dict(batch_size=4, loader_workers=workers, shuffle_buffer=6, flip=True, with_attributes=True, seed=7)
    per_epoch = [b for e in (2, 3, 4)
                 for b in make_loader(shards, epoch=e, start_batch=5 if e == 2 else 0, **kw)]
    assert len(per_epoch) == 4 + 9 + 9
    stream = make_loader(shards, epoch=2, start_batch=5, epochs=None, **kw)
    for (x1, a1), (x2, a2) in zip(per_epoch, stream, strict=False):  # the stream has no end
        assert torch.equal(x1, x2) and torch.equal(a1, a2)
    two = list(make_loader(shards, epoch=2, start_batch=5, epochs=2, **kw))
    assert len(two) == 13
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(per_epoch[:13], two, strict=True))


@pytest.mark.parametrize("workers", [0, 2])
def test_decoded_images_kept_across_epochs_change_no_batch(tmp_path, workers):
    """The decode cache: the same batches, flips and attributes, epoch after epoch."""
    shards = str(write_uneven_shards(tmp_path / "s", [10, 14, 12]))
    kw = dict(batch_size=4, loader_workers=workers, shuffle_buffer=6, flip=True, with_attributes=True,
              seed=3, epochs=4)
    plain, cached = list(make_loader(shards, **kw)), list(make_loader(shards, cache_mb=1, **kw))
    assert len(plain) == len(cached) == 4 * 9
    for (x1, a1), (x2, a2) in zip(plain, cached, strict=True):
        assert torch.equal(x1, x2) and torch.equal(a1, a2)


@pytest.mark.parametrize("cache_mb", [0, 2 * 64 / 2**20, 1])  # none, two of its 36 8x8 images, all
def test_later_epochs_come_from_the_decode_cache_without_reading_the_shards(tmp_path, cache_mb):
    """One in-process worker reads the whole split in its first epoch; with room for all of
    it, the next epochs are read from the cache: the shards can be gone by then."""
    shards = write_uneven_shards(tmp_path / "s", [10, 14, 12])
    kw = dict(batch_size=4, shuffle_buffer=6, with_attributes=True, seed=3)
    expected = [indices(make_loader(str(shards), epoch=e, **kw)) for e in (0, 1, 2)]
    stream = make_loader(str(shards), epochs=3, cache_mb=cache_mb, max_corrupt_fraction=0.0, **kw)
    batches = iter(stream)
    first = [next(batches)[1][:, 0].long().tolist() for _ in range(len(stream))]
    assert first == expected[0]
    for tar in shards.glob("*.tar"):
        tar.unlink()
    if cache_mb < 1:  # not all of it kept: a later epoch has to read a shard that is gone
        with pytest.raises(DataError, match="corrupt or missing"), pytest.warns(DataWarning):
            list(batches)
    else:
        assert [a[:, 0].long().tolist() for _, a in batches] == expected[1] + expected[2]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_workers_with_fewer_batches_do_not_fall_behind_over_many_epochs(tmp_path):
    """10 batches on 3 workers (4, 3, 3): DataLoader takes one item from each in turn, so
    without padding the two shorter ones ran an item further ahead every epoch, and the
    batches held back for reordering grew with the run (45 after 30 epochs)."""
    shards = str(write_uneven_shards(tmp_path / "s", [10, 14, 16]))
    loader = make_loader(shards, batch_size=4, loader_workers=3, shuffle_buffer=6, epochs=None)
    assert len(loader) == 10 and sum(1 for _ in itertools.islice(loader, 300)) == 300
    assert loader.most_held <= 3


def test_flip_mirrors_some_images_and_nothing_else(tmp_path, make_folder):
    src = make_folder(tmp_path / "src", 24)
    out = str(tmp_path / "shards")
    prepare(f"folder:{src}", out, image_size=16, shard_size=10, val_fraction=0, progress=False)
    kw = dict(batch_size=8, shuffle_buffer=0, with_attributes=True)
    plain, flipped = list(make_loader(out, **kw)), list(make_loader(out, flip=True, **kw))
    mirrored = 0
    for (x, a), (xf, af) in zip(plain, flipped, strict=True):
        assert torch.equal(a, af)
        for img, imgf in zip(x, xf, strict=True):
            same, mirror = torch.equal(img, imgf), torch.equal(img.flip(-1), imgf)
            assert same or mirror
            mirrored += mirror and not same
    assert 0 < mirrored < 24


# ---------------------------------------------------------------------------------------
# prepare: folder source, manifest, decode round trip, re-runs


def test_prepare_folder_round_trip_manifest_and_labels(tmp_path, make_folder):
    src = make_folder(tmp_path / "src", 30)
    (src / "a" / "broken.png").write_bytes(b"\x89PNG not really")  # listed, unreadable
    with open(src / "labels.csv", "a") as f:
        f.write("a/broken.png,99,1\n")
    out = tmp_path / "shards"
    with pytest.warns(DataWarning, match="broken.png"):
        m = prepare(f"folder:{src}", str(out), image_size=16, shard_size=8, val_fraction=0.2, seed=1,
                    progress=False)

    import vaegan

    assert m == read_manifest(str(out))
    assert (m["image_size"], m["channels"], m["attributes"]) == (16, 3, ["idx", "odd"])
    assert (m["skipped"], m["skipped_examples"], m["source"]) == (1, ["a/broken.png"], f"folder:{src}")
    assert m["vaegan_version"] == vaegan.__version__
    assert (m["splits"]["train"]["samples"], m["splits"]["val"]["samples"]) == (24, 6)
    assert [s["samples"] for s in m["splits"]["train"]["shards"]] == [8, 8, 8]
    assert sorted(os.listdir(out)) == [MANIFEST, "train-000000.tar", "train-000001.tar", "train-000002.tar",
                                       "val-000000.tar"]

    # Every stored image is the source image (16x16 already: no resize), keys have no dots.
    seen = {}
    for name in sorted(os.listdir(out)):
        if not name.endswith(".tar"):
            continue
        with tarfile.open(out / name) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                assert ext in ("png", "json") and "." not in key
                data = tar.extractfile(member).read()
                seen.setdefault(key, {})[ext] = data
    assert len(seen) == 30
    for sample in seen.values():
        meta = json.loads(sample["json"])
        original = np.asarray(Image.open(src / meta["file"]).convert("RGB")).transpose(2, 0, 1)
        assert np.array_equal(decode_image(sample["png"], 3, 16), original)
        assert meta["attributes"]["idx"] == int(meta["file"][-7:-4])

    # The loader gives the same pixels as floats in [-1, 1] and the attributes in manifest order.
    x, attrs = next(iter(make_loader(str(out), batch_size=6, split="val", shuffle_buffer=0,
                                     with_attributes=True)))
    assert x.shape == (6, 3, 16, 16) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    for img, (idx, odd) in zip(x, attrs.tolist(), strict=True):
        rel = f"{'a' if idx % 2 else 'b'}/img{int(idx):03d}.png"
        original = torch.from_numpy(np.asarray(Image.open(src / rel)).transpose(2, 0, 1).copy())
        assert torch.equal(img, original.float() / 127.5 - 1) and odd == idx % 2

    # Deterministic split by seed: the same seed, the same val files.
    def val_files(seed):
        d = tmp_path / f"split{seed}"
        with pytest.warns(DataWarning):
            prepare(f"folder:{src}", str(d), image_size=8, val_fraction=0.2, seed=seed, progress=False)
        ds = wds.WebDataset(str(d / "val-000000.tar"), shardshuffle=False)
        return sorted(json.loads(s["json"])["file"] for s in ds)
    assert val_files(1) == val_files(1) != val_files(2)


def test_rerun_into_the_same_folder_replaces_stale_shards(tmp_path, make_folder):
    src = make_folder(tmp_path / "src", 20, labels=False)
    out = tmp_path / "shards"
    prepare(f"folder:{src}", str(out), image_size=8, shard_size=3, progress=False)
    assert len(list(out.glob("train-*.tar"))) == 6
    (out / ".train-000009.tar.1234.tmp").write_bytes(b"left by a crashed run")
    m = prepare(f"folder:{src}", str(out), image_size=8, shard_size=10, progress=False)
    assert m["attributes"] == [] and m["channels"] == 3
    assert sorted(os.listdir(out)) == [MANIFEST, "train-000000.tar", "train-000001.tar", "val-000000.tar"]
    assert check_shards(str(out)) == m


def test_grey_folder_keeps_one_channel_and_channels_converts(tmp_path):
    src = tmp_path / "grey"
    src.mkdir()
    for i in range(6):
        Image.new("L", (20, 12), color=40 * i).save(src / f"{i}.png")  # not square: centre-cropped
    grey = prepare(f"folder:{src}", str(tmp_path / "g"), image_size=8, val_fraction=0, progress=False)
    rgb = prepare(f"folder:{src}", str(tmp_path / "c"), image_size=8, channels=3, val_fraction=0,
                  image_format="jpg", progress=False)
    assert grey["channels"] == 1 and rgb["channels"] == 3 and rgb["image_format"] == "jpg"
    x = next(iter(make_loader(str(tmp_path / "c"), batch_size=6, shuffle_buffer=0)))
    assert x.shape == (6, 3, 8, 8)


# ---------------------------------------------------------------------------------------
# Corrupt shards and samples


def test_truncated_shard_is_skipped_and_counted_then_too_many_raise(tmp_path):
    shards = write_uneven_shards(tmp_path / "s", [8, 8, 8, 8, 8])
    victim = shards / "train-000002.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # breaks off mid-shard

    loader = make_loader(str(shards), batch_size=4, loader_workers=2, shuffle_buffer=0,
                         with_attributes=True, max_corrupt_fraction=1.0)
    batches = indices(loader)  # (the warning naming the shard comes from a worker process)
    assert len(batches) == len(loader) == 10  # lost samples are stood in for: counts stay equal
    good = {i for b in batches for i in b}
    lost = set(range(16, 24)) - good
    assert lost and loader.corrupt_count == len(lost) == 40 - len(good)

    strict = make_loader(str(shards), batch_size=4, loader_workers=2, max_corrupt_fraction=0.01)
    with pytest.raises(DataError, match=r"corrupt or missing, more than data.max_corrupt_fraction=0.01"):
        list(strict)


def test_garbled_shard_and_undecodable_image_are_skipped_and_counted(tmp_path):
    shards = write_uneven_shards(tmp_path / "s", [8, 8, 8, 8])
    # Garble the middle of one shard (headers and data alike).
    victim = shards / "train-000001.tar"
    data = bytearray(victim.read_bytes())
    data[len(data) // 3: len(data) // 3 + 3000] = np.random.default_rng(0).integers(0, 256, 3000,
                                                                                      dtype=np.uint8).tobytes()
    victim.write_bytes(bytes(data))
    # A well-formed tar whose image is not a PNG: fails only at decode time.
    other = shards / "train-000003.tar"
    with tarfile.open(other) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(other, "w") as tar:
        for m, blob in members:
            if m.name == f"{sample_key('train', 26)}.png":
                blob = b"\x89PNG\r\n\x1a\n garbage"
                m.size = len(blob)
            tar.addfile(m, io.BytesIO(blob))

    loader = make_loader(str(shards), batch_size=4, shuffle_buffer=0, with_attributes=True,
                         max_corrupt_fraction=1.0)
    with pytest.warns(DataWarning, match=r"corrupt shard .*train-000001.tar"):
        batches = indices(loader)
    assert len(batches) == len(loader) == 8
    good = {i for b in batches for i in b}
    assert 26 not in good and 0 < len(set(range(8, 16)) - good)
    assert loader.corrupt_count == 32 - len(good)  # every lost sample counted exactly once
    with pytest.raises(DataError, match="corrupt"), pytest.warns(DataWarning):
        list(make_loader(str(shards), batch_size=4, max_corrupt_fraction=0.05))


# ---------------------------------------------------------------------------------------
# Sources: CelebA importer on synthetic faces, mnist5k


def test_celeba_importer_reads_synthetic_faces_with_their_attributes_splits_and_crop(tmp_path):
    truth = generate_synthetic_faces(tmp_path / "celeba", 40, seed=5, val_fraction=0.2)
    assert truth["attributes"] == ATTRIBUTES
    assert {"Eyeglasses", "Smiling", "Bangs", "Black_Hair"} <= set(ATTRIBUTES)
    assert sorted(truth["partition"].values()).count(0) == 32
    for spec in (f"celeba:{tmp_path / 'celeba'}", "synthetic-faces:40"):  # the same faces, twice
        out = tmp_path / spec.split(":")[0]
        m = prepare(spec, str(out), shard_size=16, seed=5, val_fraction=0.2, progress=False)
        assert (m["image_size"], m["channels"], m["attributes"]) == (64, 3, ATTRIBUTES)
        got = {}
        for split in ("train", "val"):
            urls = [str(out / s["name"]) for s in m["splits"][split]["shards"]]
            for s in wds.WebDataset(urls, shardshuffle=False):
                meta = json.loads(s["json"])
                got[meta["file"]] = (split, meta["attributes"], s["png"])
        assert set(got) == set(truth["labels"])
        for name, (split, attrs, _) in got.items():
            assert attrs == truth["labels"][name]
            assert split == ("train" if truth["partition"][name] == 0 else "val")
        # The stored image is the reference crop (rows 40:188, cols 15:163) resized to 64.
        name = sorted(got)[0]
        ref = Image.open(tmp_path / "celeba" / "img_align_celeba" / name).convert("RGB").crop(CELEBA_CROP)
        ref = np.asarray(ref.resize((64, 64), Image.Resampling.LANCZOS)).transpose(2, 0, 1)
        assert np.array_equal(decode_image(got[name][2], 3, 64), ref)


def test_celeba_importer_rejects_malformed_files(tmp_path):
    root = tmp_path / "celeba"
    generate_synthetic_faces(root, 4)
    lines = (root / "list_attr_celeba.txt").read_text().splitlines()
    (root / "list_attr_celeba.txt").write_text("\n".join(lines[:3] + ["000002.jpg 1 0 1 1 1"] + lines[4:]))
    with pytest.raises(DataError, match=r"list_attr_celeba.txt:4: expected a file name and 5 values"):
        prepare(f"celeba:{root}", str(tmp_path / "out"), progress=False)
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").unlink()
    with pytest.raises(DataError, match="list_eval_partition.txt does not exist"):
        prepare(f"celeba:{root}", str(tmp_path / "out"), progress=False)


def test_mnist5k_has_5000_digits_split_4500_500_by_class(tmp_path):
    m = prepare("mnist5k", str(tmp_path / "m"), shard_size=2000, progress=False)
    assert (m["image_size"], m["channels"], m["attributes"]) == (32, 1, ["digit"])
    assert m["splits"]["train"]["samples"] + m["splits"]["val"]["samples"] == 5000
    assert (m["splits"]["train"]["samples"], m["splits"]["val"]["samples"]) == (4500, 500)
    _, attrs = next(iter(make_loader(str(tmp_path / "m"), batch_size=500, split="val", with_attributes=True)))
    assert torch.bincount(attrs[:, 0].long(), minlength=10).tolist() == [50] * 10


# ---------------------------------------------------------------------------------------
# Bad input: one DataError naming the bad value


def test_bad_inputs_fail_at_once_naming_the_value(tmp_path):
    with pytest.raises(DataError, match=r"'folder:/no/such/dir'.*does not exist"):
        prepare("folder:/no/such/dir", str(tmp_path / "o"), progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"no images found below .*empty"):
        prepare(f"folder:{tmp_path / 'empty'}", str(tmp_path / "o"), progress=False)
    with pytest.raises(DataError, match=r"unknown source 'imagenet'; choose one of: folder:PATH"):
        prepare("imagenet", str(tmp_path / "o"), progress=False)
    with pytest.raises(DataError, match=r"celeba:.*does not exist"):
        prepare(f"celeba:{tmp_path / 'nope'}", str(tmp_path / "o"), progress=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(DataError, match=rf"cannot write to {blocker}/out"):
        prepare("synthetic-faces:4", str(blocker / "out"), progress=False)
    with pytest.raises(DataError, match=r"image_format='gif' is not allowed"):
        prepare("mnist5k", str(tmp_path / "o"), image_format="gif", progress=False)
    with pytest.raises(DataError, match=r"no manifest.json in .*nothing-here"):
        check_shards(str(tmp_path / "nothing-here"))
    shards = write_uneven_shards(tmp_path / "s", [5, 5])
    with pytest.raises(DataError, match=r"has 10 samples, too few for 2 rank\(s\) x batch_size 8"):
        make_loader(str(shards), batch_size=8, world_size=2)
    with pytest.raises(DataError, match=r"rank=2 is not allowed"):
        make_loader(str(shards), batch_size=2, rank=2, world_size=2)
    (shards / "train-000001.tar").unlink()
    with pytest.raises(DataError, match=r"1 shard\(s\) listed in manifest.json are missing: train-000001"):
        check_shards(str(shards))


# ---------------------------------------------------------------------------------------
# CLI


def rate_bounds(images: int, seconds: float, error: float) -> tuple[float, float]:
    """The range of round(images / t, 1) for a time t that `seconds` is within `error` of."""
    hi = images / (seconds - error) + 0.05 if seconds > error else math.inf
    return images / (seconds + error) - 0.05, hi


def test_cli_data_prepare_and_bench_end_to_end(tmp_path):
    out = tmp_path / "faces"
    run = subprocess.run(
        [sys.executable, "-m", "vaegan.cli", "data", "prepare", "--source", "synthetic-faces:24",
         "--out", str(out), "--image-size", "32", "--shard-size", "10", "--format", "jpg", "--seed", "1",
         "--val-fraction", "0.25"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "18 train + 6 val samples in 3 shards" in run.stdout
    assert "prepare synthetic-faces:24" in run.stderr  # the progress bar
    m = read_manifest(str(out))
    assert (m["image_size"], m["image_format"], m["seed"]) == (32, "jpg", 1)

    bench = subprocess.run([sys.executable, "-m", "vaegan.cli", "bench", "data", "--shards", str(out),
                            "--batches", "3", "--batch-size", "4", "--workers", "1"],
                           capture_output=True, text=True, timeout=120)
    assert bench.returncode == 0, bench.stderr
    report = json.loads(bench.stdout)
    assert (report["batches"], report["batch_size"], report["workers"], report["split"]) == (3, 4, 1, "train")
    assert report["image_shape"] == [3, 32, 32]
    # The rates are the images read over the times reported (each rounded to 1 ms): all 3 x 4
    # from the call on; 2 x 4 from the first batch on (the first batch is start-up).
    assert 0 < report["startup_s"] <= report["seconds"]
    lo, hi = rate_bounds(12, report["seconds"], 0.0005)
    assert lo <= report["images_per_s_with_startup"] <= hi, report
    lo, hi = rate_bounds(8, report["seconds"] - report["startup_s"], 0.001)
    assert lo <= report["images_per_s"] <= hi, report


def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys):
    from vaegan.cli import main

    assert main(["data", "prepare", "--source", "folder:/no/such/dir", "--out", str(tmp_path)]) == 2
    err = own_lines(capsys.readouterr().err)
    assert err.startswith("vaegan: error: source 'folder:/no/such/dir'") and err.count("\n") == 1
    assert main(["bench", "data", "--shards", str(tmp_path / "none")]) == 2
    assert "no manifest.json in" in capsys.readouterr().err
