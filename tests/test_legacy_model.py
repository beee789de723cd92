"""A model registered by vaegan 0.1 before the artifact/inference/pyfunc split still loads.

tests/data/legacy-model is such a model as `mlflow.artifacts.download_artifacts` wrote it
(its `code/` copy of the old package left out): a pickled `vaegan.registry.VAEGANPyfunc`
and the weights of a debug-preset VAEGAN. legacy-model-expect.pt holds latents and what
that network decoded them to when it was saved.
"""

from pathlib import Path

import mlflow
import numpy as np
import torch

import vaegan

DATA = Path(__file__).parent / "data"


def test_load_model_reads_a_legacy_model_folder():
    expect = torch.load(DATA / "legacy-model-expect.pt")
    model = vaegan.load_model(DATA / "legacy-model", device="cpu")
    torch.testing.assert_close(model.decode(expect["z"]), expect["decoded"], atol=1e-5, rtol=1e-5)


def test_mlflow_unpickles_and_serves_a_legacy_model():
    expect = torch.load(DATA / "legacy-model-expect.pt")
    pyfunc = mlflow.pyfunc.load_model(str(DATA / "legacy-model"))
    z = expect["z"].numpy()[:, :, None, None].astype(np.float32)  # decode takes (B, L, 1, 1)
    out = pyfunc.predict(z, params={"op": "decode"})
    np.testing.assert_allclose(out, expect["decoded"].numpy(), atol=1e-5)
