"""`vaegan models serve`: MLflow's REST scoring server for a model, with request limits.

`mlflow models serve` (uvicorn + the FastAPI app of `mlflow.pyfunc.scoring_server`) reads and
parses a request body whatever its size. This builds the same app for the loaded model
(`scoring_server.init`: /invocations, /ping, /health, /version, the same JSON formats and
errors) and puts `BodyLimit` in front of it:

- a body over `max_body_bytes` is answered 413 before the app reads any of it: at once when
  Content-Length says so (a client that sent `Expect: 100-continue` is never asked for the
  body), else as soon as the bytes received so far (chunked bodies) pass the limit. The app
  only sees a body once it is known to fit;
- a request for more than `max_output_values` numbers (op=sample n x C x H x W, ...) is
  refused with a 400 by the model before it computes anything (vaegan.pyfunc.MAX_OUTPUT_ENV).

The model is loaded with `mlflow.pyfunc.load_model`, so any vaegan model URI works, those
logged as code and those pickled by earlier versions.
"""

from __future__ import annotations

import json
import os

from vaegan.artifact import ModelError
from vaegan.pyfunc import DEVICE_ENV, MAX_OUTPUT_ENV, MAX_OUTPUT_VALUES

MAX_BODY_BYTES = 32 * 1024 * 1024
"""Request body limit: a JSON float takes ~10-20 bytes, so 32 MiB holds ~128-256 RGB 64x64
images (MAX_IMAGES is 256), and parsing it stays well inside a serving pod's memory (the
parsed floats take ~2-3x the text)."""


class BodyLimit:
    """ASGI middleware: HTTP requests whose body is over `max_bytes` get a 413 and never reach
    `app`; the others reach it with their body read in full (at most `max_bytes` held)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for key, value in scope.get("headers", ()):
            # h11 has already refused a malformed Content-Length with a 400
            if key.lower() == b"content-length" and int(value) > self.max_bytes:
                return await self._refuse(send, int(value))
        chunks, size = [], 0
        while True:  # chunked (or lying): count what arrives, and stop at the limit
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(send, size, so_far=True)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:  # after the body, what the server says next (a disconnect)
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _refuse(self, send, size: int, so_far: bool = False) -> None:
        # No `Connection: close`: uvicorn then reads and drops whatever of the body is still
        # coming, so the client finishes sending and reads this answer instead of a reset.
        what = f"more than {self.max_bytes:,} bytes received" if so_far else f"{size:,} bytes"
        body = json.dumps({"error_code": "REQUEST_LIMIT_EXCEEDED",
                           "message": f"request body too large ({what}); this server takes at most "
                                      f"{self.max_bytes:,} bytes (vaegan models serve --max-body-bytes)"
                           }).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def build_app(model_uri: str, max_body_bytes: int = MAX_BODY_BYTES,
              max_output_values: int = MAX_OUTPUT_VALUES, device: str = "auto"):
    """The ASGI app serving `model_uri` (on `device`): MLflow's scoring app behind `BodyLimit`."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    for flag, value in (("--max-body-bytes", max_body_bytes), ("--max-output-values", max_output_values)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelError(f"{flag} {value!r} is not allowed; it must be an integer >= 1")
    # Both are read by the model as it loads (vaegan.pyfunc.VAEGANPyfunc.load_context).
    os.environ[MAX_OUTPUT_ENV] = str(max_output_values)
    os.environ[DEVICE_ENV] = device
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as e:
        raise ModelError(f"cannot load a model from {model_uri!r}: {e.message}") from None
    return BodyLimit(scoring_server.init(model), max_body_bytes)


def serve(model_uri: str, host: str = "127.0.0.1", port: int = 8080, max_body_bytes: int = MAX_BODY_BYTES,
          max_output_values: int = MAX_OUTPUT_VALUES, device: str = "auto") -> None:
    """Load the model, then answer on host:port until stopped (uvicorn, one process)."""
    import uvicorn

    app = build_app(model_uri, max_body_bytes, max_output_values, device)
    print(f"[vaegan] serving {model_uri} on http://{host}:{port} (request body <= {max_body_bytes:,} bytes, "
          f"output <= {max_output_values:,} values)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
