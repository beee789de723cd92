"""`make demo`: the main job on its embedded default, end to end on one machine.

mnist5k shards (prepared on first use) -> 2 CPU workers on a local Ray -> the embedded
MLflow store under ./mlruns -> a registered model -> a sample grid PNG.
"""

from __future__ import annotations

from pathlib import Path

from vaegan.config import load_config

DEMO_OVERRIDES = ["train.num_workers=2", "train.name=demo"]


def run_demo(out: str | Path = "outputs/demo-samples.png") -> None:
    import mlflow
    import torch

    from vaegan.train import _grid, main_train

    cfg = load_config("mnist32", overrides=DEMO_OVERRIDES)
    res = main_train(cfg)
    mlflow.set_tracking_uri(res.tracking_uri)
    model = mlflow.pyfunc.load_model(res.model_uri)
    # the input is ignored for op=sample, but must fit the signature (B, C, H, W)
    m = cfg.model
    dummy = torch.zeros(1, m.channels, m.image_size, m.image_size).numpy()
    samples = model.predict(dummy, params={"op": "sample", "n": 64, "seed": 0})
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    _grid(torch.from_numpy(samples), 8).save(out)
    print(f"\n[vaegan] demo finished\n"
          f"  samples:  {out}\n"
          f"  model:    {res.model_uri}\n"
          f"  MLflow:   mlflow ui --backend-store-uri {res.tracking_uri}")
