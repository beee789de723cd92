"""How good are a preset's digits after N steps? The probe behind docs/results.md's demo tuning.

    .venv/bin/python benchmarks/demo_probe.py --steps 3000 --threads 1 model.width=0.25 ...

One process, no Ray or MLflow: the mnist5k train split is held in memory, Algorithm 1
(`vaegan.step.TrainStep`) runs on shuffled batches, and every --every steps the share of 500
fixed prior samples that a digit classifier (the evaluation featurizer, trained on first use)
puts in one class with p > 0.9 is printed. At the end: `vaegan.evaluate.evaluate_model` on the
500 held-out digits, the share at p > 0.5 too, and a sample grid PNG. Two probes with
--threads 1 side by side on 2 cores see about what each of the demo's 2 workers sees.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vaegan.config import load_config
from vaegan.evaluate import evaluate_model, load_real_images
from vaegan.featurizer import load_featurizer, train_featurizer
from vaegan.images import save_grid
from vaegan.model import VAEGAN
from vaegan.step import TrainStep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="key=value config overrides on the preset")
    p.add_argument("--preset", default="mnist32")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seconds", type=float, default=float("inf"), help="stop early after this long")
    p.add_argument("--batch", type=int, default=64, help="the demo's 2 workers x 32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--every", type=int, default=500)
    p.add_argument("--shards", default="data/mnist5k")
    p.add_argument("--featurizer", default="data/featurizers/mnist5k-32px-1ch")
    p.add_argument("--out", default="outputs/probe")
    p.add_argument("--save", action="store_true", help="also write the weights to OUT/model.pt")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if not (Path(a.featurizer) / "featurizer.json").is_file():
        train_featurizer(a.shards, "digit", a.featurizer)
    featurizer = load_featurizer(a.featurizer)
    cfg = load_config(a.preset, overrides=[f"data.batch_size={a.batch}", *a.overrides,
                                           f"train.steps={a.steps}"])
    train = load_real_images(a.shards, n=100_000, split="train")
    val = load_real_images(a.shards, n=500, split="val")
    layout = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    torch.manual_seed(cfg.train.seed)
    model = VAEGAN(cfg.model).to(memory_format=layout)
    step = TrainStep.for_model(model, cfg)
    z = torch.randn(500, cfg.model.latent_dim, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def recognised() -> float:  # the protocol's p > 0.9 share, cheaply, mid-run
        model.eval()
        p_max = featurizer.probs(model.decode(z).float()).max(dim=1).values
        model.train()
        return float((p_max > 0.9).float().mean())

    order, pos, n, t0 = torch.randperm(len(train)), 0, 0, time.time()
    while n < a.steps and time.time() - t0 < a.seconds:
        if pos + a.batch > len(train):  # a new epoch
            order, pos = torch.randperm(len(train)), 0
        m = step(train[order[pos:pos + a.batch]].contiguous(memory_format=layout))
        pos, n = pos + a.batch, n + 1
        if n % a.every == 0:
            print(f"step {n:>5}  {time.time() - t0:5.0f} s  recognised {recognised():.3f}  "
                  f"D(x) {m.d_real:.2f} D(x~) {m.d_recon:.2f} D(xp) {m.d_prior:.2f}  "
                  f"kl {m.kl_prior:.1f}  llike {m.llike_dis_l:.1f}", flush=True)
    seconds = time.time() - t0
    ev = evaluate_model(model, val, featurizer, n=500)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    with torch.no_grad():
        save_grid(model.decode(z[:64]), out / "samples.png", nrow=8)
    if a.save:
        torch.save(model.state_dict(), out / "model.pt")
    print(json.dumps({"overrides": a.overrides, "steps": n, "seconds": round(seconds),
                      "recognised_p90": ev.recognisable, "recognised_p50": ev.recognisable_p50,
                      "real_p90": ev.recognisable_real, "fid_samples": round(ev.fid_samples, 1),
                      "fid_recon": round(ev.fid_recon, 1)}))


if __name__ == "__main__":
    main()
