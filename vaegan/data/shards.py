"""`prepare`: a source -> WebDataset shards + manifest, in a local folder or on S3.

Each sample is `{split}_{index:08d}.png` (or `.jpg`) plus `{split}_{index:08d}.json` =
`{"file": original name, "attributes": {name: value}}`. Samples are written in a seeded
shuffled order, so a shard is a random slice of its split (a loader reading few shards still
sees every class).

Re-running into the same destination replaces the previous shards: the old manifest is
deleted first (a reader meanwhile fails clearly instead of mixing old and new shards), each
shard appears under its name only once complete, stale shards the new manifest does not list
are deleted, and the manifest is written last.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import re
import sys
import warnings

import numpy as np
from PIL import Image

from vaegan.data.errors import DataError, DataWarning
from vaegan.data.manifest import FORMAT, FORMAT_VERSION, MANIFEST, SHARD_NAME, SPLITS, sample_key, shard_name
from vaegan.data.sources import Source, open_source, parse_source
from vaegan.data.storage import Location

IMAGE_FORMATS = ("png", "jpg")
_WARN_FIRST = 5  # name this many unreadable images in warnings, then just count
_LEFTOVER = re.compile(r"^\.((train|val)-\d{6}\.tar|manifest\.json)\.\d+\.tmp$|^\.vaegan-write-probe-\d+$")
_TAR_MTIME = 0  # fixed member times: the same input gives byte-identical shards


def encode_image(img: Image.Image, image_size: int, channels: int, image_format: str) -> bytes:
    """Centre-crop to a square, convert to 1 or 3 channels, resize, encode."""
    if img.width != img.height:
        s = min(img.size)
        left, top = (img.width - s) // 2, (img.height - s) // 2
        img = img.crop((left, top, left + s, top + s))
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if image_format == "png":
        img.save(buf, "PNG")
    else:
        img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


class _SplitWriter:
    """Fills `{split}-NNNNNN.tar` shards of `shard_size` samples in a local staging folder;
    each finished shard is moved (local) or uploaded (S3) into place under its final name."""

    def __init__(self, dest: Location, stage: str, split: str, shard_size: int):
        self.dest, self.stage, self.split, self.shard_size = dest, stage, split, shard_size
        self.shards: list[dict] = []
        self.samples = 0
        self._tar = None
        self._file = None

    def add(self, image: bytes, image_format: str, meta: dict) -> None:
        import webdataset as wds

        if self._tar is None:
            self._file = open(os.path.join(self.stage, shard_name(self.split, len(self.shards))), "wb")
            self._tar = wds.TarWriter(self._file, mtime=_TAR_MTIME)
            self._in_shard = 0
        self._tar.write({"__key__": sample_key(self.split, self.samples), image_format: image, "json": meta})
        self.samples += 1
        self._in_shard += 1
        if self._in_shard == self.shard_size:
            self._finish()

    def _finish(self) -> None:
        name = shard_name(self.split, len(self.shards))
        self._tar.close()
        self._file.close()
        self._tar = self._file = None
        self.dest.put_file(os.path.join(self.stage, name), name)
        self.shards.append({"name": name, "samples": self._in_shard})

    def close(self) -> dict:
        if self._tar is not None:
            self._finish()
        return {"samples": self.samples, "shards": self.shards}


def _check_args(image_size, channels, shard_size, image_format, val_fraction) -> None:
    if image_size is not None and not (isinstance(image_size, int) and 8 <= image_size <= 1024):
        raise DataError(f"image_size={image_size!r} is not allowed; it must be an integer in 8..1024")
    if channels not in (None, 1, 3):
        raise DataError(f"channels={channels!r} is not allowed; choose 1 (grey) or 3 (RGB)")
    if not (isinstance(shard_size, int) and shard_size >= 1):
        raise DataError(f"shard_size={shard_size!r} is not allowed; it must be an integer >= 1")
    if image_format not in IMAGE_FORMATS:
        raise DataError(f"image_format={image_format!r} is not allowed; choose one of: png | jpg")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction!r} is not allowed; it must be in [0, 1)")


def prepare(source: str, out: str, *, image_size: int | None = None, channels: int | None = None,
            shard_size: int = 1000, image_format: str = "png", seed: int = 0, val_fraction: float = 0.1,
            progress: bool = True, s3_endpoint: str = "") -> dict:
    """Write `source` as train/val WebDataset shards plus manifest.json to `out` (a folder
    or s3://bucket/prefix) and return the manifest.

    image_size / channels default to the source's own (64 / 3 for faces, 32 / 1 for mnist5k).
    Unreadable images are skipped, counted in the manifest and named in warnings. A missing
    or empty source, or an `out` that cannot be written, raises DataError before any work.
    """
    from tqdm import tqdm

    import vaegan

    _check_args(image_size, channels, shard_size, image_format, val_fraction)
    parse_source(source)  # unknown spec or missing folder: fail before touching `out`
    dest = Location(out, s3_endpoint)
    dest.check_writable()

    with open_source(source, seed=seed, val_fraction=val_fraction, progress=progress) as src:
        size, ch = image_size or src.image_size, channels or src.channels
        if dest.exists(MANIFEST):
            dest.remove(MANIFEST)
        skipped: list[str] = []
        bar = tqdm(total=len(src.items), desc=f"prepare {source}", unit="img", disable=not progress,
                   file=sys.stderr)
        splits = {}
        with dest.staging() as stage:
            for number, split in enumerate(SPLITS):
                writer = _SplitWriter(dest, stage, split, shard_size)
                for item in _shuffled(src, split, seed + number):
                    bar.update()
                    try:
                        image = encode_image(item.load(), size, ch, image_format)
                    except Exception as e:  # PIL raises many types for a bad file
                        skipped.append(item.name)
                        if len(skipped) <= _WARN_FIRST:
                            warnings.warn(f"skipping unreadable image {item.name} from {source}: {e}",
                                          DataWarning, stacklevel=2)
                        continue
                    writer.add(image, image_format, {"file": item.name, "attributes": item.attrs})
                splits[split] = writer.close()
        bar.close()
        if len(skipped) > _WARN_FIRST:
            warnings.warn(f"skipped {len(skipped)} unreadable images from {source} in all (first "
                          f"{_WARN_FIRST} named above)", DataWarning, stacklevel=2)
        if not any(s["samples"] for s in splits.values()):
            raise DataError(f"source {source!r}: none of its {len(src.items)} images could be read")

        listed = {sh["name"] for s in splits.values() for sh in s["shards"]}
        for name in dest.list_names():
            if (SHARD_NAME.match(name) and name not in listed) or _LEFTOVER.match(name):
                dest.remove(name)

        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "vaegan_version": vaegan.__version__,
            "source": source, "notes": src.notes,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "image_size": size, "channels": ch, "image_format": image_format,
            "attributes": src.attributes, "seed": seed, "val_fraction": val_fraction,
            "shard_size": shard_size, "skipped": len(skipped), "skipped_examples": skipped[:20],
            "splits": splits,
        }
        dest.write_bytes(MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def _shuffled(src: Source, split: str, seed: int) -> list:
    items = [it for it in src.items if it.split == split]
    return [items[i] for i in np.random.default_rng(seed).permutation(len(items))]
