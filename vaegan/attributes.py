"""Attribute vectors (the paper's section 5.2) and how well edits with them work.

For each labelled attribute, the vector is the mean z of images with it minus the mean z
of images without it, z = mu(x) of the first ATTRIBUTE_IMAGES training images (the authors
used 10,000; docs/method.md#attribute-vectors). `VAEGANModel.edit` adds sum_a s_a * v_a to
mu(x) and decodes: +1 adds an attribute, -1 removes it. `measure_edits` scores edits with an
attribute classifier (`vaegan.featurizer`): does the target attribute flip, do the others
stay put. `attribute_model` does both for a model and a shard set; registering the result
as a model version is `vaegan.registry.register_attribute_version`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from vaegan.artifact import ModelError
from vaegan.images import describe_input
from vaegan.inference import VAEGANModel

ATTRIBUTE_IMAGES = 10_000  # the authors' count: vectors from the first 10,000 training images


def parse_attributes(spec: str | dict | list[str]) -> dict[str, float]:
    """'Eyeglasses=1,Smiling=-0.5' (or a JSON object, or ['Eyeglasses=+1', ...]) -> dict."""
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        text = spec if isinstance(spec, str) else ",".join(spec)
        text = text.strip()
        if text.startswith("{"):
            try:
                items = list(json.loads(text).items())
            except (ValueError, AttributeError) as e:
                raise ModelError(f"attributes {text!r} is not a JSON object ({e})") from None
        else:
            items = []
            for part in filter(None, (p.strip() for p in text.split(","))):
                name, eq, value = part.partition("=")
                if not eq or not name.strip():
                    raise ModelError(f"attribute edit {part!r} is not NAME=STRENGTH (e.g. Eyeglasses=+1)")
                items.append((name.strip(), value.strip()))
    out = {}
    for name, value in items:
        try:
            out[name] = float(value)
        except (TypeError, ValueError):
            raise ModelError(f"attribute {name!r}: strength {value!r} is not a number") from None
    if not out:
        raise ModelError("no attribute edits given; pass e.g. attributes='Eyeglasses=1,Smiling=-1'")
    return out


@torch.no_grad()
def compute_attribute_vectors(model: VAEGANModel, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                              names: list[str], max_images: int = ATTRIBUTE_IMAGES
                              ) -> tuple[dict[str, torch.Tensor], dict]:
    """v_a = mean mu(x) over images with attribute a - mean mu(x) over images without it,
    from the first `max_images` images of `batches` ((images, attrs) with attrs (B, len(names)),
    1/0 or CelebA's 1/-1; > 0 means "has it").

    -> ({name: vector}, metadata with per-attribute counts). Attributes present in all or in
    none of the images have no vector; they are listed under "skipped".
    """
    A, L = len(names), model.latent_dim
    sum_with = torch.zeros(A, L, dtype=torch.float64)
    n_with = torch.zeros(A, dtype=torch.float64)
    sum_all = torch.zeros(L, dtype=torch.float64)
    n = 0
    for x, attrs in batches:
        take = min(len(x), max_images - n)
        if take <= 0:
            break
        mu, _ = model.encode(x[:take])
        mu = mu.double().cpu()
        has = (attrs[:take].reshape(take, A) > 0).double()  # (B, A)
        sum_with += has.T @ mu  # per attribute: the sum of mu over images that have it
        n_with += has.sum(0)
        sum_all += mu.sum(0)
        n += take
    if n == 0:
        raise ModelError("no images to compute attribute vectors from")
    vectors, counts, skipped = {}, {}, []
    for i, name in enumerate(names):
        k = int(n_with[i])
        counts[name] = {"with": k, "without": n - k}
        if k == 0 or k == n:
            skipped.append(name)
            continue
        mean_with = sum_with[i] / k
        mean_without = (sum_all - sum_with[i]) / (n - k)
        vectors[name] = (mean_with - mean_without).float()
    if not vectors:
        raise ModelError(f"no attribute has both images with and without it among the {n} images "
                         f"({', '.join(names)})")
    return vectors, {"n_images": n, "counts": counts, "skipped": skipped}


def attribute_vectors_from_shards(model: VAEGANModel, shards: str, max_images: int = ATTRIBUTE_IMAGES,
                                  split: str = "train", s3_endpoint: str = ""
                                  ) -> tuple[dict[str, torch.Tensor], dict]:
    """`compute_attribute_vectors` over the first `max_images` images of a shard split, in
    reader order (no shuffle, no flip), as the authors took the first 10,000."""
    from vaegan.data import covering_batch_size, make_loader, read_manifest

    manifest = read_manifest(shards, s3_endpoint)
    names = list(manifest["attributes"])
    if not names:
        raise ModelError(f"{shards!r} has no attributes in its manifest; attribute vectors need labelled "
                         "data")
    _check_data_fits(model, manifest, shards)
    n = manifest["splits"][split]["samples"]
    bs = covering_batch_size(n, min(n, max_images), 250)
    loader = make_loader(shards, batch_size=bs, split=split, with_attributes=True, shuffle_buffer=0,
                         flip=False, s3_endpoint=s3_endpoint)
    vectors, meta = compute_attribute_vectors(model, loader, names, max_images)
    return vectors, {**meta, "source": shards, "split": split, "method": "mean mu(with) - mean mu(without)"}


def _check_data_fits(model: VAEGANModel, manifest: dict, shards: str) -> None:
    if (manifest["channels"], manifest["image_size"]) != (model.channels, model.image_size):
        size = manifest["image_size"]
        raise ModelError(f"{shards!r} holds {manifest['channels']}x{size}x{size} images; "
                         f"{describe_input(model.channels, model.image_size)}")


@dataclass
class EditReport:
    """How well attribute edits work, judged by an attribute classifier.

    Each image is edited towards the opposite of its label: +v_a when it lacks attribute a,
    -v_a when it has it (strength `strength`). Per attribute:
      flipped      share of edited images the classifier reads as having the target value
      unedited     the same share for the unedited reconstructions Dec(mu(x)): what no edit
                   at all would score (so `flipped` means something only well above it)
      others_kept  share of edited images whose other attributes all read as in Dec(mu(x))
      others_each  the same per (image, other attribute) pair: the share of other-attribute
                   readings an edit leaves alone
      others_worst the lowest of those shares over the other attributes one by one: each
                   other attribute is kept in at least this share of the edited images
    """

    strength: float
    n_images: int
    flipped: dict[str, float] = field(default_factory=dict)
    unedited: dict[str, float] = field(default_factory=dict)
    others_kept: dict[str, float] = field(default_factory=dict)
    others_each: dict[str, float] = field(default_factory=dict)
    others_worst: dict[str, float] = field(default_factory=dict)

    @property
    def mean_flipped(self) -> float:
        return float(np.mean(list(self.flipped.values())))

    @property
    def mean_unedited(self) -> float:
        return float(np.mean(list(self.unedited.values())))

    @property
    def mean_others_kept(self) -> float:
        return float(np.mean(list(self.others_kept.values())))

    @property
    def mean_others_each(self) -> float:
        return float(np.mean(list(self.others_each.values())))

    @property
    def min_flipped(self) -> float:
        return min(self.flipped.values())

    @property
    def min_others_worst(self) -> float:
        return min(self.others_worst.values())

    def as_metrics(self, prefix: str = "edit_") -> dict[str, float]:
        out = {f"{prefix}flipped": self.mean_flipped, f"{prefix}unedited": self.mean_unedited,
               f"{prefix}others_kept": self.mean_others_kept, f"{prefix}others_each": self.mean_others_each,
               f"{prefix}min_flipped": self.min_flipped, f"{prefix}others_worst": self.min_others_worst}
        for name in self.flipped:
            out[f"{prefix}flipped_{name}"] = self.flipped[name]
            out[f"{prefix}others_kept_{name}"] = self.others_kept[name]
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "mean_flipped": self.mean_flipped, "mean_unedited": self.mean_unedited,
                "mean_others_kept": self.mean_others_kept, "mean_others_each": self.mean_others_each,
                "min_flipped": self.min_flipped, "min_others_worst": self.min_others_worst}

    def format(self) -> str:
        lines = [f"attribute edits (strength {self.strength:g}, {self.n_images} held-out images):",
                 f"  {'attribute':<14} {'flipped':>8} {'unedited':>9} {'others kept':>12} "
                 f"{'others each':>12} {'worst other':>12}"]
        for name in self.flipped:
            lines.append(f"  {name:<14} {self.flipped[name]:>8.3f} {self.unedited[name]:>9.3f} "
                         f"{self.others_kept[name]:>12.3f} {self.others_each[name]:>12.3f} "
                         f"{self.others_worst[name]:>12.3f}")
        lines.append(f"  {'mean':<14} {self.mean_flipped:>8.3f} {self.mean_unedited:>9.3f} "
                     f"{self.mean_others_kept:>12.3f} {self.mean_others_each:>12.3f} "
                     f"{'':>12}")
        lines.append(f"  {'lowest':<14} {self.min_flipped:>8.3f} {'':>9} {'':>12} {'':>12} "
                     f"{self.min_others_worst:>12.3f}")
        return "\n".join(lines)


@torch.no_grad()
def measure_edits(model: VAEGANModel, featurizer, images: torch.Tensor, attrs: torch.Tensor,
                  names: list[str], strength: float = 1.0, batch_size: int = 250) -> EditReport:
    """Score `model.edit` on labelled images (see EditReport) with a multi-label attribute
    classifier (`vaegan.featurizer.ClassifierFeaturizer`, kind multilabel) whose labels
    include the model's attribute names."""
    meta = getattr(featurizer, "meta", None)
    if meta is None or meta.kind != "multilabel":
        raise ModelError("edit success needs a multi-label attribute classifier; train one with "
                         "`vaegan eval train-featurizer --shards URL --label-key all --out DIR`")
    edited_names = [a for a in names if a in model.attribute_vectors]
    missing = [a for a in edited_names if a not in meta.labels]
    if not edited_names or missing:
        raise ModelError(f"the classifier knows {', '.join(meta.labels)}; it must cover the model's "
                         f"attributes {', '.join(edited_names) or '(none)'}")
    cols = [meta.labels.index(a) for a in edited_names]
    labels = attrs.reshape(len(attrs), len(names)) > 0

    def read(x: torch.Tensor) -> torch.Tensor:  # classifier's yes/no for each edited attribute
        return torch.cat([featurizer.probs(x[i:i + batch_size])[:, cols].cpu() > 0.5
                          for i in range(0, len(x), batch_size)])

    mus = torch.cat([model.encode(images[i:i + batch_size])[0] for i in range(0, len(images), batch_size)])
    recon_read = read(torch.cat([model.net.decode(mus[i:i + batch_size])
                                 for i in range(0, len(mus), batch_size)]))
    report = EditReport(strength=float(strength), n_images=len(images))
    for j, name in enumerate(edited_names):
        target = ~labels[:, names.index(name)]  # add it where absent, remove it where present
        sign = target.float().mul(2).sub(1).to(model.device)[:, None]  # +1 add, -1 remove
        z = mus + strength * sign * model.attribute_vectors[name]
        edit_read = read(torch.cat([model.net.decode(z[i:i + batch_size])
                                    for i in range(0, len(z), batch_size)]))
        others = [k for k in range(len(edited_names)) if k != j]
        report.flipped[name] = float((edit_read[:, j] == target).float().mean())
        report.unedited[name] = float((recon_read[:, j] == target).float().mean())
        same = edit_read[:, others] == recon_read[:, others]  # (B, n_others)
        report.others_kept[name] = float(same.all(1).float().mean()) if others else 1.0
        report.others_each[name] = float(same.float().mean()) if others else 1.0
        report.others_worst[name] = float(same.float().mean(0).min()) if others else 1.0
    return report


def attribute_model(model: VAEGANModel, shards: str, featurizer, *, max_images: int = ATTRIBUTE_IMAGES,
                    eval_images: int = 1000, strength: float = 1.0, s3_endpoint: str = "",
                    log=print) -> tuple[VAEGANModel, EditReport]:
    """The same weights with the vectors of every attribute in the shards' manifest, computed
    from up to `max_images` training images; and its edits scored on up to `eval_images`
    held-out images by `featurizer` (a multi-label attribute classifier)."""
    from vaegan.data import read_split

    log(f"attribute vectors from up to {max_images} training images of {shards}")
    vectors, meta = attribute_vectors_from_shards(model, shards, max_images, s3_endpoint=s3_endpoint)
    edited = VAEGANModel(model.net, model.cfg, vectors, meta, device=model.device, info=model.info)
    images, attrs = read_split(shards, eval_images, "val", with_attributes=True, s3_endpoint=s3_endpoint)
    names = list(meta["counts"])  # every attribute of the manifest, in its order
    report = measure_edits(edited, featurizer, images, attrs, names, strength=strength)
    edited.attribute_meta["edit"] = report.to_dict()
    return edited, report
