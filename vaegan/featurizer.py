"""Feature networks for FID: Inception-v3 pool3 where its weights are on disk, otherwise a
small classifier trained on the data's own labels.

    InceptionFeaturizer   torchvision Inception-v3, 2048-d pool3 features, input resized to
                          299x299. Weights come from a path or the torch hub cache, never a
                          download (the training machines have no internet).
    ClassifierFeaturizer  a small CNN trained by `train_featurizer` on labelled real images:
                          softmax over the classes of one integer label (mnist `digit`), or a
                          sigmoid per binary attribute (CelebA-like multi-label). FID uses its
                          penultimate layer (FEATURE_DIM-d).

A trained classifier is a plain directory, loadable without pickle:

    DIR/weights.pt        state_dict, saved with torch.save, loaded with weights_only=True
    DIR/featurizer.json   its config, label names, input size/channels, val accuracy

Both featurizers take images in [-1, 1] (the model's range), shape (B, C, H, W).
Single device; no Ray or MLflow here.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vaegan.errors import UserError
from vaegan.losses import attribute_bce


class EvalError(UserError, ValueError):
    """Bad evaluation input (a path, a label key, a shape); the message says what is allowed."""


# ---------------------------------------------------------------------------------------
# The domain featurizer: a small CNN classifier.

FORMAT = "vaegan-featurizer/1"
WEIGHTS_FILE = "weights.pt"
META_FILE = "featurizer.json"
FEATURE_DIM = 128  # penultimate width = the dimension FID works in (Inception: 2048)
STEPS = 500  # default training steps at batch 64: ~97-98% on mnist5k val in ~15 s on 2 cores
SOFTMAX_CONFIDENT = 0.9  # a sample is "recognisable" when its top class has p > this
VAL_MAX_IMAGES = 10_000  # cap on the validation pass (CelebA's val split is ~20k images)
_LABEL_PEEK_BATCHES = 20  # batches buffered to infer the kind of label and class count


class FeatureNet(nn.Module):
    """x (B, C, S, S) in [-1, 1] -> logits (B, n_out); `features` gives the penultimate layer.

    3x3 conv, BN, ReLU, 2x2 max-pool per stage until 4x4 (3 stages at 32x32, 4 at 64x64),
    then FC FEATURE_DIM, ReLU (the FID features), then FC n_out. Deliberately tiny: it has to
    train in seconds on 2 CPU cores and only needs to tell the data's classes apart.
    """

    def __init__(self, image_size: int, channels: int, n_out: int, width: int = 16,
                 feature_dim: int = FEATURE_DIM):
        super().__init__()
        n_stages = int(math.log2(image_size // 4))
        if image_size < 8 or 4 * 2**n_stages != image_size:
            raise EvalError(f"featurizer image_size={image_size} is not allowed; it must be a power "
                            "of two >= 8 (e.g. 32, 64, 128)")
        layers, cin = [], channels
        for i in range(n_stages):  # channel counts width, 2*width, 4*width, ... capped at 8*width
            cout = width * min(2**i, 8)
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            cin = cout
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(cin * 16, feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(feature_dim, n_out)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.convs(x))  # (B, feature_dim), what the head sees

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, n_out) logits


@dataclass
class FeaturizerMeta:
    """What featurizer.json holds: enough to rebuild the net and to judge it."""

    kind: str
    """softmax (one integer label, classes 0..K-1) | multilabel (a sigmoid per binary attribute)."""
    label_key: str
    """The attribute(s) it was trained on, as given to train_featurizer."""
    labels: list[str]
    """Output names: class names ('0'..'9' for digits) or attribute names."""
    image_size: int
    channels: int
    width: int = 16
    feature_dim: int = FEATURE_DIM
    val_accuracy: float = float("nan")
    """Top-1 accuracy (softmax) or mean per-attribute accuracy (multilabel) on the val split."""
    val_images: int = 0
    steps: int = 0
    batch_size: int = 0
    seed: int = 0
    train_seconds: float = 0.0
    source: str = ""
    """Where the training images came from (a shards URL, or 'in-memory')."""
    format: str = FORMAT


@dataclass
class ClassifierFeaturizer:
    """A trained FeatureNet plus its metadata; the featurizer FID uses when Inception is absent."""

    net: FeatureNet
    meta: FeaturizerMeta
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def name(self) -> str:
        return f"classifier:{self.meta.label_key}"

    @property
    def kind(self) -> str:
        return self.meta.kind

    def to(self, device: torch.device | str) -> ClassifierFeaturizer:
        self.device = torch.device(device)
        self.net.to(self.device)
        return self

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        m = self.meta
        if x.ndim != 4 or x.shape[1] != m.channels:
            raise EvalError(f"featurizer {self.name!r} takes images of shape (B, {m.channels}, H, W); "
                            f"got {tuple(x.shape)}")
        x = x.to(self.device, torch.float32)
        if x.shape[-2:] != (m.image_size, m.image_size):
            # Another size than it was trained at: resize rather than refuse, so a 64x64 model
            # can still be scored by a 32x32 featurizer (the numbers then compare only to runs
            # scored the same way).
            x = F.interpolate(x, size=(m.image_size, m.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return x

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, feature_dim) penultimate activations, float32."""
        self.net.eval()
        return self.net.features(self._prepare(x)).float()

    @torch.no_grad()
    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities (softmax, rows sum to 1) or per-attribute probabilities."""
        self.net.eval()
        logits = self.net(self._prepare(x)).float()
        return logits.softmax(dim=1) if self.meta.kind == "softmax" else logits.sigmoid()

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise EvalError(f"featurizer output {str(out)!r} exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
        torch.save(state, out / WEIGHTS_FILE)
        (out / META_FILE).write_text(json.dumps(dataclasses.asdict(self.meta), indent=2) + "\n")
        return out


_TRAIN_ONE = "`vaegan eval train-featurizer --shards URL --label-key KEY --out DIR`"
_HOW_TO_GET_ONE = f"train one with {_TRAIN_ONE}, or use Inception features with `--featurizer inception`"


def load_featurizer(path: str | Path, device: torch.device | str = "cpu") -> ClassifierFeaturizer:
    """Load a directory written by `train_featurizer` / `ClassifierFeaturizer.save`."""
    path = Path(path)
    if not path.exists():
        raise EvalError(f"featurizer directory {str(path)!r} does not exist; {_HOW_TO_GET_ONE}")
    if not path.is_dir():
        raise EvalError(f"featurizer {str(path)!r} is not a directory; a featurizer is a directory "
                        f"holding {META_FILE} and {WEIGHTS_FILE}")
    for name in (META_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise EvalError(f"featurizer directory {str(path)!r} has no {name}; {_HOW_TO_GET_ONE}")
    try:
        raw = json.loads((path / META_FILE).read_text())
    except json.JSONDecodeError as e:
        raise EvalError(f"{str(path / META_FILE)!r} is not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise EvalError(f"{str(path / META_FILE)!r} has format {got!r}; this version reads {FORMAT!r}")
    known = {f.name for f in dataclasses.fields(FeaturizerMeta)}
    meta = FeaturizerMeta(**{k: v for k, v in raw.items() if k in known})
    net = FeatureNet(meta.image_size, meta.channels, len(meta.labels), meta.width, meta.feature_dim)
    net.load_state_dict(torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return ClassifierFeaturizer(net.eval(), meta).to(device)


# ---------------------------------------------------------------------------------------
# Training the domain featurizer.

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def _tensor_batches(images: torch.Tensor, attrs: torch.Tensor, batch_size: int, seed: int,
                    shuffle: bool) -> Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """In-memory (images, attrs) -> a function epoch -> batches (reshuffled per epoch)."""
    if len(images) != len(attrs):
        raise EvalError(f"images and labels differ in length: {len(images)} vs {len(attrs)}")

    def epoch_batches(epoch: int):
        order = torch.arange(len(images))
        if shuffle:
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed + epoch))
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            yield images[idx], attrs[idx]
    return epoch_batches


def _open(data: Any, split: str, *, batch_size: int, seed: int, shuffle: bool,
          loader_workers: int) -> tuple[Callable[[int], Iterator], list[str] | None, str]:
    """Any accepted data form -> (epoch -> batch iterator, attribute names or None, source)."""
    if isinstance(data, (str, Path)):
        from vaegan.data import covering_batch_size, make_loader, read_manifest

        shards = str(data)
        manifest = read_manifest(shards)
        names = list(manifest["attributes"])
        if not shuffle:  # an evaluation pass: read the whole split, not all but its last partial batch
            n = manifest["splits"][split]["samples"]
            batch_size = covering_batch_size(n, min(n, VAL_MAX_IMAGES), batch_size)

        def epoch_batches(epoch: int):
            return iter(make_loader(shards, batch_size=batch_size, split=split, with_attributes=True,
                                    shuffle_buffer=1000 if shuffle else 0, seed=seed, epoch=epoch,
                                    loader_workers=loader_workers))
        return epoch_batches, names, shards
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        images, attrs = data
        attrs = attrs.float().reshape(len(attrs), -1)
        return _tensor_batches(images, attrs, batch_size, seed, shuffle), None, "in-memory"
    if isinstance(data, Iterable):
        return (lambda epoch: iter(data)), None, type(data).__name__
    raise EvalError(f"featurizer data of type {type(data).__name__} is not allowed; pass a shards URL, "
                    "a (images, labels) pair of tensors, or an iterable of (images, labels) batches")


def _select_columns(label_key: str, names: list[str]) -> list[int]:
    """'digit' -> [i]; 'Smiling,Eyeglasses' -> [i, j]; 'all' -> every attribute."""
    if label_key == "all":
        return list(range(len(names)))
    keys = [k.strip() for k in label_key.split(",") if k.strip()]
    missing = [k for k in keys if k not in names]
    if not keys or missing:
        raise EvalError(f"label key {label_key!r} is not allowed; use one attribute, several joined by "
                        f"',', or 'all', from: {', '.join(names) or '(the data has no attributes)'}")
    return [names.index(k) for k in keys]


def is_binary(y: torch.Tensor) -> bool:
    """Labels that are yes/no attributes: every value 0 or 1, or CelebA's -1 or 1."""
    return bool(((y == 0) | (y == 1) | (y == -1)).all())


def _infer_kind(y: torch.Tensor, kind: str, label_key: str) -> str:
    """One integer label with values beyond {0, 1} is a class index (softmax); binary columns
    ({0, 1} or CelebA's {-1, 1}) are attributes (multilabel)."""
    integer = bool((y == y.round()).all())
    binary = is_binary(y)
    if kind == "auto":
        kind = "softmax" if (y.shape[1] == 1 and integer and not binary) else "multilabel"
    if kind == "softmax" and (y.shape[1] != 1 or not integer or bool((y < 0).any())):
        raise EvalError(f"label key {label_key!r}: kind=softmax needs one integer label >= 0; "
                        f"got {y.shape[1]} column(s) with values like {y[:4].flatten().tolist()}")
    if kind == "multilabel" and not binary:
        raise EvalError(f"label key {label_key!r}: kind=multilabel needs binary attributes (0/1 or -1/1); "
                        f"got values like {y[:4].flatten().tolist()}")
    if kind not in ("softmax", "multilabel"):
        raise EvalError(f"featurizer kind={kind!r} is not allowed; choose one of: auto | softmax | "
                        "multilabel")
    return kind


def _loss(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "softmax":
        return F.cross_entropy(logits, y[:, 0].long())
    return attribute_bce(logits, y)  # -1/1 and 0/1 alike


def _n_correct(logits: torch.Tensor, y: torch.Tensor, kind: str) -> float:
    """Correct predictions; for multilabel a sample counts the share of its attributes right."""
    if kind == "softmax":
        return float((logits.argmax(1) == y[:, 0].long()).sum())
    return float(((logits > 0) == (y > 0)).float().mean(1).sum())


@torch.no_grad()
def _accuracy(net: FeatureNet, batches: Iterator, cols: list[int], kind: str, device: torch.device,
              limit: int = VAL_MAX_IMAGES) -> tuple[float, int]:
    net.eval()
    correct, seen = 0.0, 0
    for x, attrs in batches:
        y = attrs.float().reshape(len(attrs), -1)[:, cols].to(device)
        correct += _n_correct(net(x.to(device, torch.float32)), y, kind)
        seen += len(x)
        if seen >= limit:
            break
    return (correct / seen if seen else float("nan")), seen


def train_featurizer(data: Any, label_key: str, out: str | Path | None = None, *,
                     val_data: Any = None, attributes: list[str] | None = None, steps: int = STEPS,
                     batch_size: int = 64, lr: float = 2e-3, seed: int = 0, kind: str = "auto",
                     num_classes: int | None = None, width: int = 16, loader_workers: int = 0,
                     device: torch.device | str = "cpu",
                     log: Callable[[str], None] | None = None) -> ClassifierFeaturizer:
    """Train a FeatureNet on labelled real images; save it to `out` (if given) and return it.

    data / val_data: a shards URL (its "train" and "val" splits are used; val_data is then
      optional), an (images (N, C, S, S) in [-1, 1], labels (N, n_attr)) pair of tensors, or an
      iterable of such batches (re-iterated each epoch). For tensors and iterables,
      `attributes` names the label columns.
    label_key: one attribute (an integer label such as mnist `digit` -> softmax classifier;
      a binary one -> sigmoid), several joined by ',' or 'all' (binary attributes -> multilabel).
    kind: auto | softmax | multilabel (auto decides from the first batches, as above).
    num_classes: softmax only; default: 1 + the largest label in the first batches.
    Adam with a cosine learning-rate decay; a fixed seed gives the same net on the same data.
    """
    log = log or (lambda msg: None)
    if steps < 1:
        raise EvalError(f"featurizer steps={steps} is not allowed; it must be an integer >= 1")
    device = torch.device(device)
    train_batches, names, source = _open(data, "train", batch_size=batch_size, seed=seed, shuffle=True,
                                         loader_workers=loader_workers)
    if val_data is None and isinstance(data, (str, Path)):
        val_data = data
    val_batches = None
    if val_data is not None:
        val_batches, _, _ = _open(val_data, "val", batch_size=256, seed=seed, shuffle=False,
                                  loader_workers=loader_workers)
    names = names or attributes
    if names is None:
        raise EvalError("train_featurizer: pass `attributes` (the label columns' names) with tensor or "
                        "iterable data; only a shards URL carries them in its manifest")
    cols = _select_columns(label_key, list(names))
    batches = _endless(train_batches, cols, source)
    # Peek at some batches to learn the kind of label and the class count; they are trained
    # on first, so nothing is read twice.
    peek = [next(batches) for _ in range(min(steps, _LABEL_PEEK_BATCHES))]
    meta = _meta_from_peek(peek, kind, label_key, names, cols, num_classes)
    meta.width, meta.steps, meta.batch_size, meta.seed, meta.source = width, steps, batch_size, seed, source

    start = time.perf_counter()
    net = _fit(meta, itertools.chain(peek, batches), lr, device, log)
    meta.train_seconds = round(time.perf_counter() - start, 2)
    if val_batches is not None:
        meta.val_accuracy, meta.val_images = _accuracy(net, val_batches(0), cols, meta.kind, device)
        log(f"featurizer val accuracy {meta.val_accuracy:.4f} on {meta.val_images} images")
    featurizer = ClassifierFeaturizer(net.eval(), meta, device)
    if out is not None:
        featurizer.save(out)
    return featurizer


def _endless(train_batches: Callable[[int], Iterator], cols: list[int], source: str) -> Iterator:
    """(images, the selected label columns) over epochs 0, 1, 2, ... without end."""
    epoch = 0
    while True:
        n = 0
        for x, attrs in train_batches(epoch):
            n += 1
            yield x, attrs.float().reshape(len(attrs), -1)[:, cols]
        if n == 0:
            raise EvalError(f"featurizer training data from {source!r} yielded no batches")
        epoch += 1


def _meta_from_peek(peek: list, kind: str, label_key: str, names: list[str], cols: list[int],
                    num_classes: int | None) -> FeaturizerMeta:
    """The kind of classifier, its labels and the image shape, from the first batches."""
    x0, y_peek = peek[0][0], torch.cat([y for _, y in peek])
    kind = _infer_kind(y_peek, kind, label_key)
    if kind == "softmax":
        labels = [str(i) for i in range(num_classes or int(y_peek.max()) + 1)]
    else:
        labels = [names[i] for i in cols]
    if x0.ndim != 4 or x0.shape[-1] != x0.shape[-2]:
        raise EvalError(f"featurizer training images must be square (B, C, S, S); got {tuple(x0.shape)}")
    return FeaturizerMeta(kind=kind, label_key=label_key, labels=labels, image_size=x0.shape[-1],
                          channels=x0.shape[1])


def _fit(meta: FeaturizerMeta, batches: Iterator, lr: float, device: torch.device,
         log: Callable[[str], None]) -> FeatureNet:
    """meta.steps Adam steps with a cosine decay on `batches`; -> the trained net."""
    n_out, steps = len(meta.labels), meta.steps
    # A forked RNG: the seed fixes this net's initialisation without resetting the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(meta.seed)
        net = FeatureNet(meta.image_size, meta.channels, n_out, meta.width).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    # Cosine decay to 0: short runs end on small steps, which buys a point or two of accuracy.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    net.train()
    for step, (x, y) in zip(range(steps), batches, strict=False):
        x, y = x.to(device, torch.float32), y.to(device)
        if meta.kind == "softmax" and int(y.max()) >= n_out:
            raise EvalError(f"label {int(y.max())} of {meta.label_key!r} is >= num_classes={n_out} "
                            "(inferred from the first batches); pass num_classes")
        loss = _loss(net(x), y, meta.kind)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"featurizer step {step + 1}/{steps}  loss {loss.item():.4f}")
    return net


# ---------------------------------------------------------------------------------------
# Inception-v3 (pool3, 2048-d), only from weights already on disk.

INCEPTION_SIZE = 299  # Inception-v3's input size; images are resized to it (bilinear)
INCEPTION_FILES = "inception_v3_google-*.pth"  # torchvision's file name in the hub cache
INCEPTION_URL = "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth"


def find_inception_weights(path: str | Path | None = None) -> Path:
    """The Inception-v3 weights file: `path` if given, else torchvision's file in the torch hub
    cache ($TORCH_HOME/hub/checkpoints). Never downloads: raises EvalError saying where it looked."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise EvalError(f"Inception-v3 weights {str(p)!r} do not exist; pass the path of torchvision's "
                            f"inception_v3_google-*.pth file, or use a domain featurizer: {_TRAIN_ONE}")
        return p
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    found = sorted(glob.glob(str(cache / INCEPTION_FILES)))
    if not found:
        raise EvalError(
            f"Inception-v3 weights not found: no {INCEPTION_FILES} in {str(cache)!r}, and they are never "
            f"downloaded here. Copy {INCEPTION_URL} there or pass --inception-weights PATH; or use a "
            f"domain featurizer: {_TRAIN_ONE}")
    return Path(found[-1])


class InceptionFeaturizer:
    """torchvision's Inception-v3 with its classifier removed: 2048-d pool3 features.

    Input: [-1, 1] images, grey repeated to RGB, resized to 299x299 (bilinear). The Google
    weights expect exactly [-1, 1], so transform_input stays off. These are torchvision's
    weights, not the TF graph pytorch-fid ships: values are close to, not equal to, published FIDs.
    """

    name = "inception-v3-pool3"
    kind = "inception"

    def __init__(self, weights: str | Path | None = None, device: torch.device | str = "cpu"):
        from torchvision.models import inception_v3

        path = find_inception_weights(weights)
        # init_weights=False: the random init (slow truncated normals) is overwritten anyway.
        net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
        try:
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except (RuntimeError, KeyError) as e:
            raise EvalError(f"{str(path)!r} is not torchvision Inception-v3 weights "
                            f"({str(e)[:200]})") from None
        net.fc = nn.Identity()  # the pool3 activations (after avg-pool; dropout is off in eval)
        self.net = net.eval()
        self.device = torch.device("cpu")
        self.to(device)

    def to(self, device: torch.device | str) -> InceptionFeaturizer:
        self.device = torch.device(device)
        self.net.to(self.device)
        return self

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1 or 3, H, W) in [-1, 1] -> (B, 2048), float32."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise EvalError("Inception features take images of shape (B, 1 or 3, H, W); "
                            f"got {tuple(x.shape)}")
        x = x.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        self.net.eval()
        return self.net(x).float()

    def probs(self, x: torch.Tensor) -> None:
        return None  # no classes of this data set: "recognisable" is not defined


Featurizer = ClassifierFeaturizer | InceptionFeaturizer


def resolve_featurizer(spec: str, inception_weights: str | Path | None = None,
                       device: torch.device | str = "cpu") -> Featurizer:
    """'inception' -> Inception-v3 from local weights; anything else -> a featurizer directory."""
    if spec == "inception":
        return InceptionFeaturizer(inception_weights, device)
    return load_featurizer(spec, device)


__all__ = [
    "EvalError", "FeatureNet", "FeaturizerMeta", "ClassifierFeaturizer", "InceptionFeaturizer",
    "Featurizer", "train_featurizer", "load_featurizer", "find_inception_weights", "resolve_featurizer",
    "FEATURE_DIM", "INCEPTION_SIZE", "SOFTMAX_CONFIDENT",
]
