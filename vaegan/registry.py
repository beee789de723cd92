"""The registered artifact: an MLflow pyfunc model wrapping a checkpoint directory.

`mlflow.pytorch.log_model` would export a graph with only `forward` (PLATFORM.md), losing
`sample` and `reconstruct`, so the model is a `PythonModel` whose artifact is the plain
checkpoint directory (weights load with `weights_only=True`: no pickle runs).

    mlflow.pyfunc.load_model(uri).predict(images, params={"op": "reconstruct"})
    mlflow.pyfunc.load_model(uri).predict(np.zeros((1, 1)), params={"op": "sample", "n": 16})
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import torch

OPS = ("reconstruct", "sample", "encode")


class VAEGANPyfunc(mlflow.pyfunc.PythonModel):
    """predict(images (B, C, H, W) float32 in [-1, 1], params={"op": ..., "n": ..., "seed": ...})."""

    def load_context(self, context) -> None:
        from vaegan.checkpoint import load_checkpoint

        self.model, self.cfg, _ = load_checkpoint(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params: dict | None = None) -> np.ndarray:
        params = params or {}
        op = params.get("op", "reconstruct")
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; choose one of: {', '.join(OPS)}")
        with torch.no_grad():
            if op == "sample":
                n = int(params.get("n", 16))
                if not 1 <= n <= 1024:
                    raise ValueError(f"n={n} is not allowed; it must be in 1..1024")
                gen = torch.Generator().manual_seed(int(params.get("seed", 0)))
                return self.model.sample(n, generator=gen).numpy()
            x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
            if op == "encode":
                return self.model.encode(x)[0].numpy()
            return self.model.reconstruct(x).numpy()


def signature(channels: int, image_size: int):
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, channels, image_size, image_size))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]),
        params=ParamSchema([ParamSpec("op", "string", "reconstruct"),
                            ParamSpec("n", "long", 16), ParamSpec("seed", "long", 0)]),
    )


def pip_requirements() -> list[str]:
    """Pinned to what runs here, so a served model gets the same stack."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "mlflow", "numpy", "pyyaml")]


def log_checkpoint_model(checkpoint_dir: str | Path, name: str, step: int):
    """Log a checkpoint directory as a pyfunc model of the active run, linked to `step`."""
    from vaegan.checkpoint import load_config_from

    cfg = load_config_from(checkpoint_dir)
    return mlflow.pyfunc.log_model(
        name=name, python_model=VAEGANPyfunc(), artifacts={"checkpoint": str(checkpoint_dir)},
        signature=signature(cfg.model.channels, cfg.model.image_size),
        pip_requirements=pip_requirements(), step=step,
        # The package travels with the model, so a serving environment needs no vaegan install.
        code_paths=[str(Path(__file__).parent)])


def register(model_uri: str, name: str, alias: str | None = None) -> str:
    """Register a logged model under `name` as a new version; point `alias` at it if given.

    No alias is needed for "latest": MLflow reserves that name, and `models:/NAME/latest`
    always resolves to the newest version, which this one now is.
    """
    version = mlflow.register_model(model_uri, name)
    if alias:
        mlflow.MlflowClient().set_registered_model_alias(name, alias, version.version)
        return f"models:/{name}@{alias}"
    return f"models:/{name}/latest"
