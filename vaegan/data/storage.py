"""Where shards live: a local folder or `s3://bucket/prefix`, behind one small interface.

S3 goes through s3fs. The endpoint comes from the config (`data.s3_endpoint`), else the
standard AWS variables `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`; credentials come from
`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN` (or botocore's usual
chain: profiles, instance roles). Every failure leaves this module as one `DataError` that
names the URL and says what to fix (no bucket, no credentials, endpoint unreachable).

Importing this module registers an `s3` opener in `webdataset.gopen_schemes` (WebDataset has
none). `reader.py` imports it, so DataLoader worker processes, forked or spawned, have it.

Outages: `is_transient` tells a transport failure (connection refused or reset, a timeout, a
body cut short, a 5xx or throttling answer) from a real one (missing object, bad bytes,
denied access). `Backoff` waits out the first kind with exponentially growing pauses, for
at most `retry_seconds` without progress; the reader (shards) and `RetryingFSSpecHandler`
(Ray Train's checkpoint storage) use it, so an endpoint that blips costs time, not data.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from vaegan.data.errors import DataError

log = logging.getLogger(__name__)

# One connect attempt fails in ~0 s on a refused port; botocore's default (5 attempts with
# backoff) would make a pre-flight check of a wrong endpoint hang for several seconds.
_READ_RETRIES = 3
CHECK_RETRIES = 1
# How long a read or write waits out an unreachable endpoint (no progress at all) before it
# fails; `data.io_retry_seconds` overrides it for training.
IO_RETRY_SECONDS = 180.0
_BACKOFF_FIRST, _BACKOFF_MAX = 0.5, 10.0  # seconds: the first pause, and the longest


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def resolve_endpoint(endpoint: str = "") -> str:
    """The S3 endpoint to use: the config's, else the standard AWS variables, else AWS."""
    return (endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            or "")


def split_endpoint_credentials(endpoint: str) -> tuple[str, str, str]:
    """`http://KEY:SECRET@host:port` -> (`http://host:port`, KEY, SECRET); an endpoint without
    userinfo -> (endpoint, "", ""). s3fs (aiohttp) refuses credentials in the endpoint URL
    ("Cannot combine AUTHORIZATION header with AUTH argument or credentials encoded in URL"),
    so they are taken out at this edge and passed as s3fs's key and secret."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(endpoint)
    if "@" not in parts.netloc:
        return endpoint, "", ""
    userinfo, _, host = parts.netloc.rpartition("@")
    key, _, secret = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=host)), unquote(key), unquote(secret)


def s3_options(endpoint: str = "", *, retries: int = _READ_RETRIES) -> dict:
    """s3fs constructor arguments. Credentials from the environment are passed explicitly so
    that s3fs's instance cache (keyed on these arguments) never serves stale credentials."""
    opts: dict = {
        # Listings change under us (prepare deletes stale shards; tests reuse bucket names).
        "use_listings_cache": False,
        "config_kwargs": {"connect_timeout": 5, "read_timeout": 60,
                          "retries": {"max_attempts": retries, "mode": "standard"}},
    }
    endpoint, url_key, url_secret = split_endpoint_credentials(resolve_endpoint(endpoint))
    if endpoint:
        opts["endpoint_url"] = endpoint
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        opts["key"] = os.environ["AWS_ACCESS_KEY_ID"]
        opts["secret"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if os.environ.get("AWS_SESSION_TOKEN"):
            opts["token"] = os.environ["AWS_SESSION_TOKEN"]
    if url_key:  # given with the endpoint: they go with it, whatever the environment says
        opts["key"], opts["secret"] = url_key, url_secret
        opts.pop("token", None)
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

    endpoint = split_endpoint_credentials(resolve_endpoint(endpoint))[0]  # messages get printed
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


# ---------------------------------------------------------------------------------------
# Transient failures: the transport broke, not the data.

# errno values of a connection that failed, as opposed to a file that did
_NET_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
               errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EREMOTEIO}
# S3 error codes that mean "try again" (5xx and throttling)
_RETRY_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "Throttling", "ThrottlingException",
                "RequestTimeout", "BadGateway", "GatewayTimeout", "500", "502", "503", "504"}


def _transient_types() -> tuple[type, ...]:
    import http.client

    types: list[type] = [ConnectionError, TimeoutError, http.client.IncompleteRead,
                         http.client.RemoteDisconnected]
    with contextlib.suppress(ImportError):
        from botocore import exceptions as bx

        # HTTPClientError covers ConnectionClosedError, ReadTimeoutError, ResponseStreamingError;
        # botocore's ConnectionError covers EndpointConnectionError and ConnectTimeoutError.
        types += [bx.HTTPClientError, bx.ConnectionError, bx.IncompleteReadError]
    with contextlib.suppress(ImportError):
        import aiohttp

        types.append(aiohttp.ClientError)  # ClientConnectionError, ClientPayloadError, ...
    with contextlib.suppress(ImportError):
        from fsspec.exceptions import FSTimeoutError

        types.append(FSTimeoutError)
    return tuple(types)


def is_transient(exc: BaseException) -> bool:
    """True when `exc` (or what it was raised from) says the connection or the server
    failed, so the same request may well succeed later; False for anything about the data
    or the request itself (not found, denied, bad bytes). s3fs wraps botocore's errors in
    OSError, hence the walk down __cause__/__context__."""
    types = _transient_types()
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DataError):
            return False
        if isinstance(exc, types):
            return True
        if isinstance(exc, OSError) and exc.errno in _NET_ERRNOS:
            return True
        response = getattr(exc, "response", None)  # botocore ClientError
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if code in _RETRY_CODES or int(status) >= 500:
                return True
        exc = exc.__cause__ or exc.__context__
    return False


class Backoff:
    """Pauses between attempts at one thing (a shard, an upload): 0.5 s, 1 s, 2 s, ... up to
    10 s each, until `seconds` have passed since the last progress. Counts the retries
    and the seconds spent waiting, for the caller to report."""

    def __init__(self, seconds: float, what: str, endpoint: str = ""):
        # (without credentials given in the URL: the endpoint is printed)
        self.seconds, self.what = seconds, what
        self.endpoint = split_endpoint_credentials(resolve_endpoint(endpoint))[0]
        self.retries, self.waited = 0, 0.0
        self._since: float | None = None
        self._next = _BACKOFF_FIRST

    def progress(self) -> None:
        """Something was read or written: a later failure starts a new outage."""
        self._since, self._next = None, _BACKOFF_FIRST

    def wait(self, exc: BaseException) -> float:
        """Sleep before the next attempt after the transient failure `exc` and return the
        seconds slept; raise DataError (from exc) once this outage has lasted `seconds`."""
        now = time.monotonic()
        if self._since is None:
            self._since = now
        left = self.seconds - (now - self._since)
        if left <= 0:
            where = f"the S3 endpoint {self.endpoint or '(AWS default)'}"
            raise DataError(
                f"cannot {self.what}: {where} failed for {now - self._since:.0f} s ({self.retries} "
                f"retries; last error {type(exc).__name__}: {exc}); check the endpoint and the network, "
                f"or allow longer outages with data.io_retry_seconds (now {self.seconds:g})") from exc
        pause = min(self._next, left)
        self.retries += 1
        log.warning("%s: transient %s (%s); retry %d in %.1f s", self.what, type(exc).__name__, exc,
                    self.retries, pause)
        time.sleep(pause)
        self.waited += pause
        self._next = min(self._next * 2, _BACKOFF_MAX)
        return pause

    def call(self, fn, *args, **kwargs):
        """fn(*args, **kwargs), retried while it fails transiently (see `wait`)."""
        while True:
            try:
                result = fn(*args, **kwargs)
            except Exception as e:
                if not is_transient(e):
                    raise
                self.wait(e)
            else:
                self.progress()
                return result


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
