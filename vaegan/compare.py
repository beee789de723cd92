"""Models side by side: a finished sweep's trials scored under one protocol (`vaegan tune --compare`).

The paper's claim is comparative (its Figure 3 and Table 1: VAE, VAE_Dis_l, GAN and VAE/GAN
trained alike). After a sweep, every completed trial's final model is scored by
`vaegan.evaluate.evaluate_model` on the same held-out images, the same prior samples and the
same featurizer: FID and KID of samples and of reconstructions, sharpness against the real
images and, with a digit classifier, the share of recognisable samples. Trials that differ
only in train.seed are one configuration: the table gives the mean over seeds and the spread
(max - min). The figure has one row per configuration, in the paper's style: the seed-0
trial's reconstructions of the same 8 held-out images, then its decodings of the same 8
prior samples z_p. Table (markdown and JSON) and figure go to the sweep's MLflow parent run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vaegan.config import Config
from vaegan.evaluate import FID_N, EvalMetrics, evaluate_model, load_real_images
from vaegan.model import VAEGAN

SEED_KEY = "train.seed"
FIGURE_INPUTS = 8  # held-out images and prior samples per figure row
FIGURE_SEED = 4321  # the z_p of the figure, the same for every row

COLUMNS = (  # (EvalMetrics field, heading): the table's metrics
    ("fid_samples", "FID samples"),
    ("fid_recon", "FID recon"),
    ("kid_samples", "KID samples"),
    ("kid_recon", "KID recon"),
    ("sharpness_samples", "sharpness samples"),
    ("sharpness_recon", "sharpness recon"),
    ("recognisable", "recognised p>0.9"),
    ("fid_samples_mixture", "FID mixture samples"),  # model.latent_mixture: z_p from the codes' density
    ("recognisable_mixture", "recognised (mixture)"),
)


@dataclass
class Scored:
    """One trial's final model and its scores."""

    trial_id: str
    params: dict[str, Any]
    step: int
    metrics: EvalMetrics
    model: VAEGAN
    mode: str
    """Its loss.mode: gan models have no encoder to reconstruct with."""


@dataclass
class ConfigRow:
    """One configuration (the searched keys but the seed) over its seeds."""

    label: str
    trials: list[Scored] = field(default_factory=list)

    def _values(self, name: str) -> list[float] | None:
        values = [getattr(t.metrics, name) for t in self.trials]
        return None if any(v is None for v in values) else values

    def mean(self, name: str) -> float | None:
        values = self._values(name)
        return None if values is None else sum(values) / len(values)

    def spread(self, name: str) -> float | None:
        values = self._values(name)
        return None if values is None else max(values) - min(values)


def label(params: dict[str, Any]) -> str:
    """A configuration's name: its searched values but the seed; the value alone when one key
    is searched (`loss.mode=gan` -> `gan`), else `mode=gan, gamma=0.1`."""
    searched = {k: v for k, v in params.items() if k != SEED_KEY}
    if len(searched) == 1:
        return str(next(iter(searched.values())))
    return ", ".join(f"{k.rpartition('.')[2]}={v}" for k, v in searched.items()) or "(base config)"


def group(scored: list[Scored]) -> list[ConfigRow]:
    """Trials grouped by configuration, in the order they first appear, seeds sorted."""
    rows: dict[str, ConfigRow] = {}
    for s in scored:
        rows.setdefault(label(s.params), ConfigRow(label(s.params))).trials.append(s)
    for r in rows.values():
        r.trials.sort(key=lambda s: s.params.get(SEED_KEY, 0))
    return list(rows.values())


def score_trials(rows, cfg: Config, featurizer_dir: str, n: int = FID_N,
                 device: str | torch.device = "cpu") -> tuple[list[Scored], torch.Tensor]:
    """Load every completed trial's final checkpoint (`rows`: vaegan.tune.TrialRow) and score
    it; -> the scores and the held-out images they were scored on."""
    from ray.train import Checkpoint

    from vaegan.checkpoint import load_checkpoint
    from vaegan.cluster import storage_for
    from vaegan.featurizer import load_featurizer

    real = load_real_images(cfg.data.shards, n, s3_endpoint=cfg.data.s3_endpoint)
    featurizer = load_featurizer(featurizer_dir, device)
    fs = storage_for(cfg.train.storage_path, cfg.data.s3_endpoint).filesystem
    scored = []
    for r in rows:
        if r.status != "completed" or not r.checkpoint_path:
            continue
        with Checkpoint(r.checkpoint_path, filesystem=fs).as_directory() as d:
            model, trial_cfg, state = load_checkpoint(d, map_location=device)
        metrics = evaluate_model(model, real, featurizer, n=n, reconstructs=trial_cfg.loss.mode != "gan")
        scored.append(Scored(r.trial_id, r.params, state.step, metrics, model, trial_cfg.loss.mode))
    return scored, real


def _cell(row: ConfigRow, name: str) -> str:
    m, s = row.mean(name), row.spread(name)
    if m is None:
        return "n/a"
    digits = 3 if abs(m) < 10 else 1 if abs(m) < 100 else 0  # about 3 significant digits
    return f"{m:.{digits}f}" + (f" ± {s / 2:.{digits}f}" if len(row.trials) > 1 else "")


def format_table(configs: list[ConfigRow]) -> str:
    """Markdown: one line per configuration, mean ± half the spread over its seeds."""
    columns = [c for c in COLUMNS if any(r.mean(c[0]) is not None for r in configs)]
    head = "| model | seeds | steps | " + " | ".join(h for _, h in columns) + " |"
    lines = [head, "|---" * (3 + len(columns)) + "|"]
    for r in configs:
        steps = "/".join(str(t.step) for t in r.trials)
        lines.append(f"| {r.label} | {len(r.trials)} | {steps} | "
                     + " | ".join(_cell(r, name) for name, _ in columns) + " |")
    return "\n".join(lines) + "\n"


def as_json(configs: list[ConfigRow]) -> list[dict]:
    return [{"model": r.label, "trials": [{"trial_id": t.trial_id, "params": t.params, "step": t.step,
                                          **t.metrics._asdict()} for t in r.trials]}
            for r in configs]


@torch.no_grad()
def figure(configs: list[ConfigRow], real: torch.Tensor):
    """The paper's kind of figure: the 8 held-out inputs on top, then one row per
    configuration (its first seed's model): reconstructions of those inputs | samples of the
    same 8 z_p (| 8 samples from its latent mixture, when a model has one). A model without an
    encoder (loss.mode=gan) leaves its reconstructions blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vaegan.images import grid_image

    x = real[:FIGURE_INPUTS]
    blank = torch.ones_like(x)  # white in [-1, 1]
    # model.latent_mixture: a third block, samples with z_p from the model's latent mixture
    blocks = 3 if any(r.trials[0].model.has_mixture for r in configs) else 2
    rows = [("input", torch.cat([x, *[blank] * (blocks - 1)]))]
    for r in configs:
        first = r.trials[0]
        model = first.model.eval()
        z = torch.randn(FIGURE_INPUTS, model.cfg.latent_dim,
                        generator=torch.Generator().manual_seed(FIGURE_SEED))
        recon = blank if first.mode == "gan" else model.reconstruct(x.to(model.device)).float().cpu()
        parts = [recon, model.decode(z.to(model.device)).float().cpu()]
        if blocks == 3:
            gen = torch.Generator().manual_seed(FIGURE_SEED)  # the same codes on any device
            parts.append(model.sample(FIGURE_INPUTS, gen, latent="mixture").float().cpu()
                         if model.has_mixture else blank)
        rows.append((r.label, torch.cat(parts)))
    width = 8 if blocks == 2 else 12
    fig, axes = plt.subplots(len(rows), 1, figsize=(width, 0.85 * len(rows) + 0.4), dpi=120, squeeze=False)
    for ax, (name, images) in zip(axes[:, 0], rows, strict=True):
        ax.imshow(grid_image(images, nrow=blocks * FIGURE_INPUTS), cmap="gray", vmin=0, vmax=255)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(name, loc="left", fontsize=8, pad=2)  # above the row: labels may be long
    fig.suptitle("reconstructions of the same inputs  |  samples of the same z_p ~ N(0, I)"
                 + ("  |  samples from the model's latent mixture" if blocks == 3 else ""), fontsize=9)
    fig.tight_layout()
    plt.close(fig)
    return fig
