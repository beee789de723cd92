"""Where shards live: a local folder or `s3://bucket/prefix`, behind one small interface.

S3 goes through s3fs. The endpoint comes from the config (`data.s3_endpoint`), else the
standard AWS variables `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`; credentials come from
`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN` (or botocore's usual
chain: profiles, instance roles). Every failure leaves this module as one `DataError` that
names the URL and says what to fix (no bucket, no credentials, endpoint unreachable).

Importing this module registers an `s3` opener in `webdataset.gopen_schemes` (WebDataset has
none). `reader.py` imports it, so DataLoader worker processes, forked or spawned, have it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vaegan.data.errors import DataError

# One connect attempt fails in ~0 s on a refused port; botocore's default (5 attempts with
# backoff) would make a pre-flight check of a wrong endpoint hang for several seconds.
_READ_RETRIES = 3
CHECK_RETRIES = 1


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def resolve_endpoint(endpoint: str = "") -> str:
    """The S3 endpoint to use: the config's, else the standard AWS variables, else AWS."""
    return (endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            or "")


def s3_options(endpoint: str = "", *, retries: int = _READ_RETRIES) -> dict:
    """s3fs constructor arguments. Credentials from the environment are passed explicitly so
    that s3fs's instance cache (keyed on these arguments) never serves stale credentials."""
    opts: dict = {
        # Listings change under us (prepare deletes stale shards; tests reuse bucket names).
        "use_listings_cache": False,
        "config_kwargs": {"connect_timeout": 5, "read_timeout": 60,
                          "retries": {"max_attempts": retries, "mode": "standard"}},
    }
    endpoint = resolve_endpoint(endpoint)
    if endpoint:
        opts["endpoint_url"] = endpoint
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        opts["key"] = os.environ["AWS_ACCESS_KEY_ID"]
        opts["secret"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if os.environ.get("AWS_SESSION_TOKEN"):
            opts["token"] = os.environ["AWS_SESSION_TOKEN"]
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        opts["client_kwargs"] = {"region_name": region}
    return opts


# Every s3fs instance made in this process, kept alive on purpose. fsspec empties its instance
# cache in a forked child (a DataLoader worker); an instance the child then frees runs its
# finalizer, which waits 1 s for the parent's event loop, which does not run there (measured:
# a 1.2 s stall per worker per epoch). Held here, the parent's instances are never freed in a
# child. Keyed by pid too, so a child makes its own instead of using the parent's dead loop.
_LIVE: dict[tuple[int, str], object] = {}


def s3_filesystem(endpoint: str = "", *, retries: int = _READ_RETRIES):
    import s3fs

    opts = s3_options(endpoint, retries=retries)
    key = (os.getpid(), json.dumps(opts, sort_keys=True))
    if key not in _LIVE:
        _LIVE[key] = s3fs.S3FileSystem(**opts)
    return _LIVE[key]


def as_data_error(exc: BaseException, url: str, endpoint: str = "", action: str = "read") -> DataError:
    """Turn whatever s3fs/botocore/the OS raised into one line that names the URL."""
    if isinstance(exc, DataError):
        return exc
    if not is_s3(url):
        if isinstance(exc, FileNotFoundError):
            return DataError(f"cannot {action} {url}: {exc.filename or exc} does not exist")
        if isinstance(exc, (PermissionError, NotADirectoryError, IsADirectoryError)):
            return DataError(f"cannot {action} {url}: {exc.strerror or exc} ({exc.filename or url})")
        return DataError(f"cannot {action} {url}: {type(exc).__name__}: {exc}")

    from botocore import exceptions as bx

    endpoint = resolve_endpoint(endpoint)
    where = f"{url} (S3 endpoint {endpoint or 'AWS default'})"
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return DataError(f"cannot {action} {where}: no S3 credentials found; set AWS_ACCESS_KEY_ID and "
                         f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ConnectionClosedError)) or \
            "Cannot connect to host" in str(exc):
        return DataError(f"cannot {action} {url}: the S3 endpoint {endpoint or '(AWS default)'} cannot be "
                         f"reached ({exc}); check data.s3_endpoint or AWS_ENDPOINT_URL_S3")
    bucket = url[len("s3://"):].split("/", 1)[0]
    if isinstance(exc, FileNotFoundError) and "bucket" in str(exc).lower():
        return DataError(f"cannot {action} {where}: the bucket {bucket!r} does not exist")
    if isinstance(exc, FileNotFoundError):
        return DataError(f"cannot {action} {where}: not found")
    if isinstance(exc, PermissionError):
        return DataError(f"cannot {action} {where}: access denied ({exc}); check the S3 credentials")
    return DataError(f"cannot {action} {where}: {type(exc).__name__}: {exc}")


class Location:
    """A folder of shards: a local path or `s3://bucket/prefix`. Names are file names in it.

    Writes are atomic: a file appears under its name only when complete (local: a hidden
    temporary name, then rename; S3: an object appears only when its upload completes).
    """

    def __init__(self, url: str, endpoint: str = "", *, retries: int = _READ_RETRIES):
        url = url.removeprefix("file://")
        if not url:
            raise DataError("no shard location given (an empty path or URL)")
        self.url = url.rstrip("/") if is_s3(url) else url
        self.endpoint = endpoint
        self.s3 = is_s3(url)
        if self.s3:
            if not self.url[len("s3://"):].split("/", 1)[0]:
                raise DataError(f"{url!r} names no bucket; write s3://BUCKET/PREFIX")
            self.fs = s3_filesystem(endpoint, retries=retries)
            self.root = self.url[len("s3://"):]
        else:
            self.root = os.path.abspath(url)

    def __str__(self) -> str:
        return self.url

    def path(self, name: str) -> str:
        """The full URL (S3) or absolute path (local) of a file in this folder."""
        return f"{self.url}/{name}" if self.s3 else os.path.join(self.root, name)

    @contextlib.contextmanager
    def errors(self, action: str, name: str = "") -> Iterator[None]:
        """Translate any failure inside into a DataError naming the file or folder."""
        try:
            yield
        except Exception as e:
            raise as_data_error(e, self.path(name) if name else self.url, self.endpoint, action) from e

    def _key(self, name: str) -> str:
        return f"{self.root}/{name}"

    def read_bytes(self, name: str) -> bytes:
        with self.errors("read", name):
            if self.s3:
                return self.fs.cat_file(self._key(name))
            return Path(self.root, name).read_bytes()

    def exists(self, name: str) -> bool:
        with self.errors("read", name):
            return self.fs.exists(self._key(name)) if self.s3 else os.path.exists(self.path(name))

    def list_names(self) -> list[str]:
        """File names directly in this folder ([] when the folder does not exist yet)."""
        with self.errors("list"):
            if self.s3:
                bucket = self.root.split("/", 1)[0]
                if not self.fs.exists(bucket):  # a missing bucket must not read as an empty folder
                    raise FileNotFoundError(f"The specified bucket {bucket} does not exist")
                try:
                    entries = self.fs.ls(self.root, detail=False)
                except FileNotFoundError:
                    return []
                return sorted(e.rsplit("/", 1)[-1] for e in entries)
            if not os.path.isdir(self.root):
                return []
            return sorted(e.name for e in os.scandir(self.root) if e.is_file())

    def remove(self, name: str) -> None:
        with self.errors("delete", name):
            if self.s3:
                self.fs.rm_file(self._key(name))
            else:
                os.remove(self.path(name))

    def put_file(self, local_path: str, name: str) -> None:
        """Move (local) or upload (S3) a finished file into place under `name`; the local
        file may be gone afterwards."""
        with self.errors("write", name):
            if self.s3:
                self.fs.put_file(local_path, self._key(name))
            else:
                try:  # staged beside the destination: a rename, atomic
                    os.replace(local_path, self.path(name))
                except OSError:  # another device: copy under a hidden name, then rename
                    tmp = os.path.join(self.root, f".{name}.{os.getpid()}.tmp")
                    shutil.copyfile(local_path, tmp)
                    os.replace(tmp, self.path(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.errors("write", name):
            if self.s3:
                self.fs.pipe_file(self._key(name), data)
            else:
                tmp = os.path.join(self.root, f".{name}.{os.getpid()}.tmp")
                Path(tmp).write_bytes(data)
                os.replace(tmp, self.path(name))

    def check_writable(self) -> None:
        """Fail now, naming the destination, rather than after minutes of encoding."""
        probe = f".vaegan-write-probe-{os.getpid()}"
        with self.errors("write to"):
            if self.s3:
                self.fs.pipe_file(self._key(probe), b"ok")
                self.fs.rm_file(self._key(probe))
            else:
                os.makedirs(self.root, exist_ok=True)
                Path(self.root, probe).write_bytes(b"ok")
                os.remove(self.path(probe))

    @contextlib.contextmanager
    def staging(self) -> Iterator[str]:
        """A local folder to build files in before `put_file`: beside the destination when
        local (so the final rename is cheap), else a temporary folder."""
        if self.s3:
            with tempfile.TemporaryDirectory(prefix="vaegan-shards-") as tmp:
                yield tmp
        else:
            with tempfile.TemporaryDirectory(prefix=".staging-", dir=self.root) as tmp:
                yield tmp


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, s3_endpoint: str = "", **kw):
    """webdataset.gopen handler for s3:// URLs (streaming reads through s3fs)."""
    fs = s3_filesystem(s3_endpoint)
    # Shards are read front to back once: large read-ahead blocks mean few requests.
    return fs.open(url, mode, block_size=8 * 2**20, cache_type="readahead")


def _register_gopen() -> None:
    import webdataset

    webdataset.gopen_schemes["s3"] = gopen_s3


_register_gopen()
