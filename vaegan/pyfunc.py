"""The MLflow pyfunc wrapper of a vaegan model: what `predict` and the REST server run.

A registered vaegan model is an MLflow pyfunc model, because `mlflow.pytorch.log_model` would
export a graph with only `forward` (docs/platform.md#mlflow). Its artifacts are the plain
files of a model folder (vaegan.artifact), and the vaegan package travels with it
(`code_paths`), so serving needs no install.

predict / REST. The input is one float32 tensor of rank 4, the op and its options are params:

    op           input                                       output
    reconstruct  images (B, C, H, W) or (B, H, W, C), [-1, 1]  images (B, C, H, W) in [-1, 1]
    encode       images                                      {"mu": (B, L), "log_var": (B, L)}
    decode       z as (B, L, 1, 1) (DCGAN's noise shape)      images
    sample       ignored (send [[[[0]]]]); params n, seed    images (n, C, H, W)
    edit         images; param attributes "Eyeglasses=1,Smiling=-1"   images
    interpolate  two images; param steps                     images (steps, C, H, W)

    curl -X POST http://HOST:PORT/invocations -H 'Content-Type: application/json' \\
         -d '{"inputs": [[[[0.0]]]], "params": {"op": "sample", "n": 4, "seed": 1}}'

Requests are capped (MAX_SAMPLES samples, MAX_IMAGES images, MAX_STEPS steps); bad input is
an MlflowException with INVALID_PARAMETER_VALUE, which the scoring server answers with a 400
and the message.
"""

from __future__ import annotations

import os
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
DEVICE_ENV = "VAEGAN_DEVICE"  # where a loaded pyfunc runs: auto (default) | cpu | cuda[:i]


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


def predict_op(model: VAEGANModel, model_input: Any, params: dict | None) -> np.ndarray | dict:
    """One request: the op in params["op"] on the rank-4 float input (module docstring)."""
    params = params or {}
    op = params.get("op") or "reconstruct"
    if op not in OPS:
        raise ModelError(f"unknown op {op!r}; choose one of: {', '.join(OPS)}")
    if op == "sample":
        n = _int_param(params, "n", 16, 1, MAX_SAMPLES)
        seed = _int_param(params, "seed", -1, -1, 2**63 - 1)
        return _out(model.sample(n, seed=None if seed < 0 else seed))
    try:
        x = np.asarray(model_input, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ModelError(f"op={op}: the input must be a rank-4 array of numbers ({e})") from None
    if x.ndim >= 1 and len(x) > MAX_IMAGES:
        raise ModelError(f"op={op}: {len(x)} rows in one request; at most {MAX_IMAGES} are allowed")
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
    return _out(model.interpolate(x[:1], x[1:], steps=steps))


def _out(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


class VAEGANPyfunc(mlflow.pyfunc.PythonModel):
    """predict(rank-4 float32 tensor, params={"op": ..., ...}); see the module docstring."""

    # MLflow would wrap predict for type-hint validation (and warn that it has none): the
    # signature and predict_op check the input instead.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        self.model = load_files(context.artifacts, device=os.environ.get(DEVICE_ENV, "auto"))

    def predict(self, context, model_input, params: dict | None = None):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            return predict_op(self.model, model_input, params)
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
            ParamSpec("steps", "long", 8)]),
    )


def pip_requirements() -> list[str]:
    """Pinned to what runs here, so a served model gets the same stack."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "mlflow", "numpy", "pyyaml", "pillow")]
