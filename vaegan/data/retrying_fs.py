"""A pyarrow filesystem over s3fs that waits out S3 outages: Ray Train's checkpoint storage.

Ray Train writes checkpoints, and reads them back on resume, through the pyarrow filesystem
it is given (`RunConfig(storage_filesystem=...)`, built in `vaegan.cluster.storage_for`).
pyarrow's own `FSSpecHandler` makes one attempt per call, and s3fs/botocore retry only for a
second or two, so an endpoint that is unreachable for 10 s failed the upload and, with it,
the worker group. `RetryingFSSpecHandler` retries every call that fails transiently
(`storage.is_transient`) with `storage.Backoff`, up to `retry_seconds` without progress:

- metadata calls (info, listings, mkdir, deletes, moves) are simply called again;
- an output stream is spooled (memory, then a temporary file past 64 MiB) and uploaded as
  one object when it is closed, so a failed upload is repeated whole and an object never
  appears half-written;
- an input stream reopens the object and seeks back to where the read broke off.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile

from pyarrow.fs import FSSpecHandler

from vaegan.data.storage import IO_RETRY_SECONDS, Backoff, is_transient

_SPOOL_MEMORY = 64 * 2**20  # bytes of an upload kept in memory before it spills to disk


class RetryingFSSpecHandler(FSSpecHandler):
    """FSSpecHandler whose calls wait out transient failures (see the module docstring).
    Picklable (Ray sends it to the workers): it holds the s3fs instance and two numbers."""

    def __init__(self, fs, retry_seconds: float = IO_RETRY_SECONDS, endpoint: str = ""):
        super().__init__(fs)
        self.retry_seconds, self.endpoint = retry_seconds, endpoint

    def _backoff(self, what: str) -> Backoff:
        return Backoff(self.retry_seconds, what, self.endpoint)

    def _call(self, what: str, method, *args):
        return self._backoff(what).call(method, *args)

    # Metadata calls: repeating them is harmless.
    def get_file_info(self, paths):
        return self._call(f"stat {len(paths)} path(s) in checkpoint storage", super().get_file_info, paths)

    def get_file_info_selector(self, selector):
        return self._call(f"list s3://{selector.base_dir}", super().get_file_info_selector, selector)

    def create_dir(self, path, recursive):
        return self._call(f"create s3://{path}", super().create_dir, path, recursive)

    def delete_dir(self, path):
        return self._call(f"delete s3://{path}", super().delete_dir, path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        return self._call(f"empty s3://{path}", super().delete_dir_contents, path, missing_dir_ok)

    def delete_file(self, path):
        return self._call(f"delete s3://{path}", super().delete_file, path)

    def move(self, src, dest):
        return self._call(f"move s3://{src}", super().move, src, dest)

    def copy_file(self, src, dest):
        return self._call(f"copy s3://{src}", super().copy_file, src, dest)

    # Streams.
    def open_input_stream(self, path):
        from pyarrow import PythonFile

        if not self._call(f"open s3://{path}", self.fs.isfile, path):
            raise FileNotFoundError(path)  # as FSSpecHandler does
        return PythonFile(_ReopeningReader(self.fs, path, self._backoff(f"read s3://{path}")), mode="r")

    open_input_file = open_input_stream

    def open_output_stream(self, path, metadata):
        from pyarrow import PythonFile

        return PythonFile(_SpooledUpload(self.fs, path, self._backoff(f"upload s3://{path}")), mode="w")


class _ReopeningReader(io.RawIOBase):
    """A read-only file over fs.open(path) that, when a read fails transiently, opens the
    object again and carries on from the same offset."""

    def __init__(self, fs, path: str, backoff: Backoff):
        self.fs, self.path, self.backoff, self.pos = fs, path, backoff, 0
        self.f = backoff.call(fs.open, path, "rb")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        while True:
            try:
                data = self.f.read(size)
            except Exception as e:
                if not is_transient(e):
                    raise
                self.backoff.wait(e)
                with contextlib.suppress(Exception):
                    self.f.close()
                self.f = self.backoff.call(self.fs.open, self.path, "rb")
                self.f.seek(self.pos)
                continue
            self.pos += len(data)
            self.backoff.progress()
            return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = self.f.seek(offset, whence)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                self.f.close()
        super().close()


class _SpooledUpload(io.RawIOBase):
    """A write-only file that collects what is written (memory, then a temporary file) and
    uploads it as one object on close, repeating the whole upload on a transient failure."""

    def __init__(self, fs, path: str, backoff: Backoff):
        self.fs, self.path, self.backoff = fs, path, backoff
        self.buffer: io.BytesIO | None = io.BytesIO()
        self.spill = None  # a NamedTemporaryFile once the data outgrows _SPOOL_MEMORY
        self.size, self.uploaded = 0, False

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = bytes(data)
        if self.spill is not None:
            self.spill.write(data)
        else:
            self.buffer.write(data)
            if self.buffer.tell() > _SPOOL_MEMORY:
                self.spill = tempfile.NamedTemporaryFile(prefix="vaegan-upload-", delete=False)
                self.spill.write(self.buffer.getvalue())
                self.buffer = None
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        if self.closed or self.uploaded:
            return super().close()
        self.uploaded = True  # close() is not repeated by __del__ after a failure
        try:
            if self.spill is not None:
                self.spill.close()
                self.backoff.call(self.fs.put_file, self.spill.name, self.path)
            else:
                self.backoff.call(self.fs.pipe_file, self.path, self.buffer.getvalue())
        finally:
            if self.spill is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.spill.name)
            self.buffer = None
            super().close()
