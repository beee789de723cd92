"""`make demo`: the main job on its embedded default, end to end on one machine.

mnist5k shards (prepared on first use) -> 2 CPU workers on a local Ray -> the embedded
MLflow store under ./mlruns -> a registered model -> sample grid PNGs (z_p from the latent
mixture and from the prior), and the final evaluation (FIDs, and the share of samples a digit
classifier recognises, for both).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from vaegan.config import load_config, redact_text

DEMO_OVERRIDES = ["train.num_workers=2", "train.minutes=7.5"]
"""Two CPU workers; at most 7.5 minutes of training (the preset's 3,000 steps take ~6 on a
2-core CPU with AMX, ~11 on one with AVX-512 BF16 only), so that with the featurizer, Ray's
start, the evaluation and the registration the demo ends within 10 minutes of its start."""


def run_demo(out: str | Path = "outputs/demo-samples.png") -> None:
    import mlflow

    from vaegan.images import save_grid
    from vaegan.registry import load_model
    from vaegan.train import main_train

    t0 = time.time()
    cfg = load_config("mnist32", overrides=DEMO_OVERRIDES)
    cfg.train.name = time.strftime("demo-%Y%m%d-%H%M%S")  # a fresh run each time
    cfg.train.eval_every = cfg.train.steps  # evaluate once, at the end, for the summary
    res = main_train(cfg)
    model = load_model(res.model_uri, tracking_uri=res.tracking_uri)  # from the registry, as a user would
    out = save_grid(model.sample(64, seed=0), Path(out).resolve(), nrow=8)  # from the mixture
    out_prior = save_grid(model.sample(64, seed=0, latent="prior"), out.with_name(out.stem + "-prior.png"),
                          nrow=8)
    metrics = mlflow.MlflowClient(res.tracking_uri).get_run(res.mlflow_run_id).data.metrics
    scores = "(no evaluation metrics)"
    if "eval_recognisable" in metrics:
        m = {"eval_recognisable_mixture": math.nan, "eval_fid_samples_mixture": math.nan, **metrics}
        scores = (f"samples recognised as one digit with p > 0.9 (held-out real digits: "
                  f"{m['eval_recognisable_real']:.1%}):\n"
                  f"               z_p from the latent mixture {m['eval_recognisable_mixture']:.1%}"
                  f" (FID {m['eval_fid_samples_mixture']:.3g}), from the prior N(0, I) "
                  f"{m['eval_recognisable']:.1%} (FID {m['eval_fid_samples']:.3g})\n"
                  f"               reconstructions: FID {m['eval_fid_recon']:.3g}, SSIM "
                  f"{m['eval_ssim_recon']:.3f}")
    print(redact_text(f"\n[vaegan] demo finished in {time.time() - t0:.0f} s\n"
                      f"  samples:     {out} (prior: {out_prior.name})\n"
                      f"  model:       {res.model_uri}\n"
                      f"  evaluation:  {scores}\n"
                      f"  checkpoints: {res.storage}\n"
                      f"  MLflow UI:   mlflow ui --backend-store-uri {res.tracking_uri}"))
