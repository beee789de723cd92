"""The MLflow pyfunc wrapper of a vaegan model: what `predict` and the REST server run.

A registered vaegan model is an MLflow pyfunc model, because `mlflow.pytorch.log_model` would
export a graph with only `forward` (docs/platform.md#mlflow). Its artifacts are the plain
files of a model folder (vaegan.artifact), and the vaegan package travels with it
(`code_paths`), so serving needs no install. It is logged as code (MLflow's models-from-code:
`MODEL_CODE`, a file that calls `mlflow.models.set_model`), not as a pickled instance, so
loading it unpickles nothing; versions pickled before (`python_model.pkl`) still load.

predict / REST. The input is one float32 tensor of rank 4, the op and its options are params:

    op           input                                       output
    reconstruct  images (B, C, H, W) or (B, H, W, C), [-1, 1]  images (B, C, H, W) in [-1, 1]
    encode       images                                      {"mu": (B, L), "log_var": (B, L)}
    decode       z as (B, L, 1, 1) (DCGAN's noise shape)      images
    sample       ignored (send [[[[0]]]]); params n, seed,   images (n, C, H, W)
                 latent (auto | prior | mixture, as VAEGANModel.sample)
    edit         images; param attributes "Eyeglasses=1,Smiling=-1"   images
    interpolate  two images; param steps                     images (steps, C, H, W)

    curl -X POST http://HOST:PORT/invocations -H 'Content-Type: application/json' \\
         -d '{"inputs": [[[[0.0]]]], "params": {"op": "sample", "n": 4, "seed": 1}}'

Requests are capped (MAX_SAMPLES samples, MAX_IMAGES images, MAX_STEPS steps, and the output's
size: at most $VAEGAN_MAX_OUTPUT_VALUES numbers, default MAX_OUTPUT_VALUES, counted before
anything runs); bad input is an MlflowException with INVALID_PARAMETER_VALUE, which the
scoring server answers with a 400 and the message. `vaegan models serve` (vaegan.serve) also
caps the request body.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch

from vaegan.artifact import ModelError
from vaegan.attributes import parse_attributes
from vaegan.inference import VAEGANModel, load_files

OPS = ("reconstruct", "sample", "encode", "decode", "edit", "interpolate")
MAX_SAMPLES = 1024  # op=sample: n per request
MAX_IMAGES = 256  # images (or z rows) per request
MAX_STEPS = 64  # op=interpolate: steps per request
MAX_OUTPUT_VALUES = 4 * 1024 * 1024
"""Numbers one request may ask for (samples x channels x pixels): 341 RGB 64x64 images or
4,096 grey 32x32 ones, 16 MiB as float32 and ~80 MB as the JSON answer (the serving pod has
4-8 GiB). Sized so the largest image batch allowed (MAX_IMAGES RGB 64x64, 3.1M numbers)
still fits; a sample request is capped by it before MAX_SAMPLES at 64x64."""
MAX_OUTPUT_ENV = "VAEGAN_MAX_OUTPUT_VALUES"  # overrides MAX_OUTPUT_VALUES where a model is loaded
DEVICE_ENV = "VAEGAN_DEVICE"  # where a loaded pyfunc runs: auto (default) | cpu | cuda[:i]
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
"""The file a vaegan pyfunc is logged as (models-from-code): it builds a `VAEGANPyfunc`."""


def _int_param(params: dict, key: str, default: int, lo: int, hi: int) -> int:
    value = params.get(key, default)
    if value is None:
        value = default
    try:
        as_int = int(value)
    except (TypeError, ValueError):
        raise ModelError(f"{key}={value!r} is not allowed; it must be an integer in {lo}..{hi}") from None
    if as_int != value and not (isinstance(value, (np.integer, str)) and str(as_int) == str(value)):
        raise ModelError(f"{key}={value!r} is not allowed; it must be an integer in {lo}..{hi}")
    if not lo <= as_int <= hi:
        raise ModelError(f"{key}={as_int} is not allowed; it must be in {lo}..{hi}")
    return as_int


def output_limit() -> int:
    """$VAEGAN_MAX_OUTPUT_VALUES, else MAX_OUTPUT_VALUES."""
    raw = os.environ.get(MAX_OUTPUT_ENV, "")
    if not raw:
        return MAX_OUTPUT_VALUES
    if not raw.isdigit() or int(raw) < 1:
        raise ModelError(f"{MAX_OUTPUT_ENV}={raw!r} is not allowed; it must be an integer >= 1")
    return int(raw)


def _check_output(model: VAEGANModel, op: str, rows: int, limit: int) -> None:
    """Refuse a request whose answer would hold more than `limit` numbers, before computing it
    (the answer is built in memory and then again as JSON)."""
    per_row = 2 * model.latent_dim if op == "encode" else model.channels * model.image_size ** 2
    if rows * per_row > limit:
        what = "rows" if op == "encode" else "images"
        raise ModelError(f"op={op}: {rows} {what} x {per_row:,} numbers = {rows * per_row:,} output values, "
                         f"more than the {limit:,} allowed per request; ask for at most "
                         f"{max(limit // per_row, 0)} {what}")


def predict_op(model: VAEGANModel, model_input: Any, params: dict | None,
               max_output_values: int = MAX_OUTPUT_VALUES) -> np.ndarray | dict:
    """One request: the op in params["op"] on the rank-4 float input (module docstring); a
    request whose output would exceed `max_output_values` numbers is refused first."""
    params = params or {}
    op = params.get("op") or "reconstruct"
    if op not in OPS:
        raise ModelError(f"unknown op {op!r}; choose one of: {', '.join(OPS)}")
    if op == "sample":
        n = _int_param(params, "n", 16, 1, MAX_SAMPLES)
        seed = _int_param(params, "seed", -1, -1, 2**63 - 1)
        _check_output(model, op, n, max_output_values)
        return _out(model.sample(n, seed=None if seed < 0 else seed, latent=params.get("latent") or "auto"))
    try:
        x = np.asarray(model_input, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ModelError(f"op={op}: the input must be a rank-4 array of numbers ({e})") from None
    if x.ndim >= 1 and len(x) > MAX_IMAGES:
        raise ModelError(f"op={op}: {len(x)} rows in one request; at most {MAX_IMAGES} are allowed")
    if op != "interpolate" and x.ndim >= 1:
        _check_output(model, op, len(x), max_output_values)
    if op == "decode":
        L = model.latent_dim
        if x.ndim == 4 and x.shape[1:] == (L, 1, 1):
            x = x[:, :, 0, 0]
        elif not (x.ndim == 2 and x.shape[1] == L):
            raise ModelError(f"op=decode takes z as a (B, {L}, 1, 1) tensor (latent_dim {L}); got shape "
                             f"{tuple(x.shape)}")
        return _out(model.decode(x))
    if x.ndim != 4:
        raise ModelError(f"op={op} takes images as (B, C, H, W) or (B, H, W, C); got shape {tuple(x.shape)}")
    if op == "reconstruct":
        return _out(model.reconstruct(x))
    if op == "encode":
        mu, log_var = model.encode(x)
        return {"mu": _out(mu), "log_var": _out(log_var)}
    if op == "edit":
        if not params.get("attributes"):
            raise ModelError("op=edit needs params attributes, e.g. 'Eyeglasses=1,Smiling=-1'; this model "
                             f"knows: {', '.join(model.attribute_vectors) or '(no attribute vectors)'}")
        return _out(model.edit(x, parse_attributes(params["attributes"])))
    # interpolate
    steps = _int_param(params, "steps", 8, 2, MAX_STEPS)
    if len(x) != 2:
        raise ModelError(f"op=interpolate takes exactly 2 images (a and b); got {len(x)}")
    _check_output(model, op, steps, max_output_values)
    return _out(model.interpolate(x[:1], x[1:], steps=steps))


def _out(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


class VAEGANPyfunc(mlflow.pyfunc.PythonModel):
    """predict(rank-4 float32 tensor, params={"op": ..., ...}); see the module docstring."""

    # MLflow would wrap predict for type-hint validation (and warn that it has none): the
    # signature and predict_op check the input instead.
    _skip_type_hint_validation = True
    max_output_values = MAX_OUTPUT_VALUES

    def load_context(self, context) -> None:
        self.model = load_files(context.artifacts, device=os.environ.get(DEVICE_ENV, "auto"))
        self.max_output_values = output_limit()

    def predict(self, context, model_input, params: dict | None = None):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            return predict_op(self.model, model_input, params, self.max_output_values)
        except ModelError as e:  # the scoring server answers this with a 400 and the message
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None


def signature():
    """A rank-4 float32 input (images, z as (B, L, 1, 1), or a dummy for sample) and the op's
    params. Which shapes fit depends on the model and is checked by `predict_op`, whose error
    says what it takes."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1, -1))]),
        params=ParamSchema([
            ParamSpec("op", "string", "reconstruct"), ParamSpec("n", "long", 16),
            ParamSpec("seed", "long", -1), ParamSpec("attributes", "string", ""),
            ParamSpec("steps", "long", 8), ParamSpec("latent", "string", "auto")]),
    )


def input_example(model: VAEGANModel) -> tuple[np.ndarray, dict]:
    """One blank image of the model's shape and op=reconstruct: what MLflow stores as the
    model's input example (and its serving_input_example.json, a ready REST body)."""
    return (np.zeros((1, model.channels, model.image_size, model.image_size), np.float32),
            {"op": "reconstruct"})


def pip_requirements() -> list[str]:
    """Pinned to what runs here, so a served model gets the same stack."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "mlflow", "numpy", "pyyaml", "pillow")]
