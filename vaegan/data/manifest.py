"""The shard set's manifest: what `prepare` writes last and every reader reads first.

A shard folder holds `train-000000.tar`, ..., `val-000000.tar`, ... and `manifest.json`:

    {"format": "vaegan-shards", "format_version": 1, "vaegan_version": "0.1.0",
     "source": "mnist5k", "image_size": 32, "channels": 1, "image_format": "png",
     "attributes": ["digit"], "skipped": 0, "seed": 0, "val_fraction": 0.1, ...,
     "splits": {"train": {"samples": 4500, "shards": [{"name": "train-000000.tar", "samples": 1000}, ...]},
                "val": {"samples": 500, "shards": [...]}}}

Sample keys are `{split}_{index:08d}` with `index` counting the split's samples in shard
order, so a reader knows from the key alone where a sample sits in the split (and keys hold
no dots, which WebDataset would cut the name at).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from vaegan.data.errors import DataError
from vaegan.data.storage import CHECK_RETRIES, Backoff, Location, as_data_error

MANIFEST = "manifest.json"
FORMAT = "vaegan-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
SHARD_NAME = re.compile(r"^(train|val)-\d{6}\.tar$")


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def sample_key(split: str, index: int) -> str:
    return f"{split}_{index:08d}"


def key_index(key: str) -> int | None:
    """The split index in a sample key, or None for a key we did not write (garbage)."""
    _, _, digits = key.rpartition("_")
    return int(digits) if digits.isdigit() else None


def shard_folder(shards: str) -> str:
    """Accept the folder or its manifest.json."""
    return shards[: -len(MANIFEST)].rstrip("/") if shards.endswith("/" + MANIFEST) else shards


def _validate(m: object, url: str) -> dict:
    def bad(why: str) -> DataError:
        return DataError(f"{url}/{MANIFEST} is not a vaegan shard manifest: {why}")

    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise bad(f"'format' is not {FORMAT!r}")
    if m.get("format_version") != FORMAT_VERSION:
        raise bad(f"format_version {m.get('format_version')!r} is not {FORMAT_VERSION} (re-run prepare)")
    for key, kind in (("image_size", int), ("channels", int), ("attributes", list), ("splits", dict)):
        if not isinstance(m.get(key), kind):
            raise bad(f"{key!r} is missing or not a {kind.__name__}")
    for split in SPLITS:
        s = m["splits"].get(split)
        if not isinstance(s, dict) or not isinstance(s.get("shards"), list):
            raise bad(f"split {split!r} is missing")
        if sum(sh["samples"] for sh in s["shards"]) != s.get("samples"):
            raise bad(f"split {split!r}: shard sample counts do not add up to {s.get('samples')}")
    return m


def _read(loc: Location, retry_seconds: float = 0) -> dict:
    def fetch() -> bytes:
        return loc.fs.cat_file(f"{loc.root}/{MANIFEST}") if loc.s3 else Path(loc.path(MANIFEST)).read_bytes()

    try:
        # A give-up after retries is a DataError naming the manifest and the endpoint.
        raw = Backoff(retry_seconds, f"read {loc.path(MANIFEST)}", loc.endpoint).call(fetch) \
            if retry_seconds > 0 else fetch()
    except FileNotFoundError as e:
        if loc.s3 and "bucket" in str(e).lower():
            raise as_data_error(e, loc.url, loc.endpoint, "read shards from") from e
        raise DataError(f"no {MANIFEST} in {loc.url}: not a shard folder, or `vaegan data prepare` has "
                        f"not finished writing it") from e
    except Exception as e:
        raise as_data_error(e, loc.url, loc.endpoint, "read shards from") from e
    try:
        return _validate(json.loads(raw), loc.url)
    except (ValueError, KeyError, TypeError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{loc.url}/{MANIFEST} is not valid: {e}") from e


def read_manifest(shards: str, s3_endpoint: str = "", *, retry_seconds: float = 0) -> dict:
    """The manifest of a shard folder (local path or s3://bucket/prefix). A transport
    failure is retried with backoff for up to `retry_seconds` (0: one attempt, so a wrong
    endpoint fails at once; the training reader waits out outages)."""
    return _read(Location(shard_folder(shards), s3_endpoint), retry_seconds)


def check_shards(shards: str, s3_endpoint: str = "") -> dict:
    """Fast pre-flight before training: the manifest is readable and every shard it lists is
    there. Raises one DataError naming the URL (missing bucket, no credentials, endpoint
    unreachable, no manifest, missing shards); returns the manifest."""
    loc = Location(shard_folder(shards), s3_endpoint, retries=CHECK_RETRIES)
    manifest = _read(loc)
    present = set(loc.list_names())
    missing = [sh["name"] for split in SPLITS for sh in manifest["splits"][split]["shards"]
               if sh["name"] not in present]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DataError(f"{loc.url}: {len(missing)} shard(s) listed in {MANIFEST} are missing: {shown}")
    return manifest
