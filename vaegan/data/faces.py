"""Synthetic faces in the real CelebA layout: a stand-in for CelebA that needs no download.

`generate_synthetic_faces(folder, n)` writes

    folder/img_align_celeba/000001.jpg ...   178x218 JPEGs, the face inside the reference
                                             crop window (rows 40:188, cols 15:163)
    folder/list_attr_celeba.txt              count, attribute names, `file v1 ... vK` (1/-1)
    folder/list_eval_partition.txt           `file 0|1|2` (train / val / test)

and returns the ground truth. Each face has five independent binary attributes under
CelebA's names (`ATTRIBUTES`), each drawn to stay visible after the crop and a resize to
64x64 (148 -> 64 px: a stroke must be >= 4 px here to be ~2 px there):

    Bangs        a fringe of hair covering the forehead
    Black_Hair   near-black hair (else brown, blond, auburn or grey)
    Eyeglasses   two dark rings with a bridge over the eyes
    Male         short hair and heavy brows (else long hair down to the jaw)
    Smiling      an open smile with teeth (else a closed, straight mouth)

Skin tone, face size and position, hair colour, eye colour, clothes and background (colour,
gradient, clutter, noise) vary too, so the model has something to learn besides the flags.
Only the five drawn attributes are listed (not CelebA's other 35): a constant -1 column would
claim, say, that everyone has a beard. Deterministic by seed; image i depends on (seed, i)
only, so the first N faces are the same for any larger N.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

W, H = 178, 218
ATTRIBUTES = ["Bangs", "Black_Hair", "Eyeglasses", "Male", "Smiling"]  # CelebA's order

_HAIR = {"brown": (96, 58, 32), "blond": (206, 170, 96), "auburn": (150, 64, 36), "grey": (150, 148, 146)}


def _jitter(rng: np.random.Generator, rgb: tuple, amount: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _skin(rng: np.random.Generator) -> tuple[int, int, int]:
    light, dark = np.array([242, 206, 178]), np.array([92, 58, 40])
    return _jitter(rng, tuple((light + rng.uniform() * (dark - light)).astype(int)), 8)


def _background(rng: np.random.Generator) -> Image.Image:
    """A vertical two-colour gradient with a few blurred shapes behind the head."""
    top, bottom = rng.integers(20, 236, 3), rng.integers(20, 236, 3)
    t = np.linspace(0, 1, H)[:, None, None]
    img = Image.fromarray((top * (1 - t) + bottom * t).repeat(W, axis=1).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(0, 5)):
        x, y, r = rng.integers(0, W), rng.integers(0, H), rng.integers(10, 50)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.uniform() < 0.5 else draw.rectangle
        shape((x - r, y - r, x + r, y + r), fill=colour)
    return img.filter(ImageFilter.GaussianBlur(3))


def draw_face(rng: np.random.Generator, attrs: dict[str, int]) -> Image.Image:
    """One 178x218 RGB face with the given 0/1 attributes."""
    img = _background(rng)
    d = ImageDraw.Draw(img)
    skin = _skin(rng)
    hair = _jitter(rng, (22, 20, 20), 10) if attrs["Black_Hair"] else \
        _jitter(rng, _HAIR[rng.choice(list(_HAIR))], 16)
    # The crop window is x 15..163, y 40..188; its centre is (89, 114).
    cx, cy = 89 + rng.integers(-7, 8), 118 + rng.integers(-6, 7)
    a = int(rng.integers(36, 45))  # half-width of the face
    b = int(a * rng.uniform(1.22, 1.34))  # half-height

    # Shoulders and neck (clothes colour varies), under everything else.
    clothes = tuple(int(c) for c in rng.integers(0, 256, 3))
    d.ellipse((cx - 2.2 * a, cy + 1.05 * b, cx + 2.2 * a, cy + 2.6 * b), fill=clothes)
    d.rectangle((cx - 0.42 * a, cy + 0.6 * b, cx + 0.42 * a, cy + 1.2 * b), fill=skin)

    # Hair behind the head: short (a cap) for Male, long (down to the jaw) otherwise.
    d.ellipse((cx - 1.16 * a, cy - 1.2 * b, cx + 1.16 * a, cy + 0.35 * b), fill=hair)
    if not attrs["Male"]:
        d.rounded_rectangle((cx - 1.3 * a, cy - 0.6 * b, cx + 1.3 * a, cy + 0.95 * b), radius=a // 2,
                            fill=hair)

    d.ellipse((cx - a, cy - b, cx + a, cy + b), fill=skin)  # the face
    ear_y = cy - 0.05 * b
    for side in (-1, 1):
        d.ellipse((cx + side * a - 7, ear_y - 11, cx + side * a + 7, ear_y + 11), fill=skin)

    if attrs["Bangs"]:  # a fringe: the top of the face covered down to just above the brows
        d.chord((cx - 1.02 * a, cy - 1.08 * b, cx + 1.02 * a, cy - 0.08 * b), 180, 360, fill=hair)
        fringe_y = cy - 0.58 * b
        for k in range(7):  # a jagged lower edge, so it reads as hair, not a hat
            x0 = cx - 0.9 * a + k * 0.26 * a
            d.polygon([(x0, fringe_y - 2), (x0 + 0.26 * a, fringe_y - 2), (x0 + 0.13 * a, fringe_y + 7)],
                      fill=hair)

    # Eyes, brows and (optionally) glasses.
    eye_y, eye_dx = cy - 0.14 * b, 0.4 * a
    iris = _jitter(rng, (60, 40, 30) if rng.uniform() < 0.6 else (60, 100, 140), 20)
    brow = 6 if attrs["Male"] else 3
    for side in (-1, 1):
        ex = cx + side * eye_dx
        d.ellipse((ex - 8, eye_y - 4.5, ex + 8, eye_y + 4.5), fill=(245, 245, 240))
        d.ellipse((ex - 4, eye_y - 4, ex + 4, eye_y + 4), fill=iris)
        d.line((ex - 10, eye_y - 12, ex + 10, eye_y - 13), fill=_jitter(rng, hair, 6) if not
               attrs["Black_Hair"] else (20, 20, 20), width=brow)
    if attrs["Eyeglasses"]:
        frame = _jitter(rng, (25, 25, 30), 20)
        r = 0.3 * a
        for side in (-1, 1):
            ex = cx + side * eye_dx
            d.ellipse((ex - r, eye_y - 0.8 * r, ex + r, eye_y + 0.8 * r), outline=frame, width=5)
            d.line((ex + side * r, eye_y - 2, cx + side * a, eye_y - 6), fill=frame, width=4)  # temples
        d.line((cx - eye_dx + r, eye_y, cx + eye_dx - r, eye_y), fill=frame, width=4)  # bridge

    # Nose: a shaded wedge.
    nose = tuple(int(c * 0.8) for c in skin)
    d.polygon([(cx, cy + 0.02 * b), (cx - 6, cy + 0.28 * b), (cx + 6, cy + 0.28 * b)], fill=nose)

    # Mouth: an open smile with teeth, or a closed straight line.
    mouth_y, lips = cy + 0.5 * b, _jitter(rng, (150, 50, 55), 20)
    if attrs["Smiling"]:
        mw, mh = 0.52 * a, 0.26 * b
        d.chord((cx - mw, mouth_y - mh, cx + mw, mouth_y + mh), 0, 180, fill=lips)
        d.chord((cx - 0.8 * mw, mouth_y - 0.7 * mh, cx + 0.8 * mw, mouth_y + 0.55 * mh), 0, 180,
                fill=(250, 250, 245))
    else:
        mw = 0.32 * a
        d.line((cx - mw, mouth_y + 4, cx + mw, mouth_y + 4), fill=lips, width=5)

    # Sensor noise, so flat regions are not perfectly flat.
    arr = np.asarray(img, dtype=np.int16) + rng.normal(0, 4, (H, W, 3)).astype(np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def face_attributes(rng: np.random.Generator) -> dict[str, int]:
    """Independent fair coins, so attribute vectors are not confounded with each other."""
    return {name: int(rng.uniform() < 0.5) for name in ATTRIBUTES}


def generate_synthetic_faces(folder: str | Path, n: int = 2000, *, seed: int = 0, val_fraction: float = 0.1,
                             progress: bool = False) -> dict:
    """Write n faces in the CelebA layout to `folder`. Partition like the real one: the first
    files train (0), then val (1), then test (2), val and test each half of val_fraction.

    Returns {"attributes": [...], "labels": {file: {name: 0/1}}, "partition": {file: 0|1|2}}.
    """
    from tqdm import tqdm

    folder = Path(folder)
    (folder / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    n_holdout = round(n * val_fraction)
    n_val = (n_holdout + 1) // 2
    labels, partition = {}, {}
    for i in tqdm(range(n), desc="synthetic faces", disable=not progress, unit="img"):
        rng = np.random.default_rng([seed, i])
        name = f"{i + 1:06d}.jpg"
        labels[name] = face_attributes(rng)
        partition[name] = 0 if i < n - n_holdout else (1 if i < n - n_holdout + n_val else 2)
        draw_face(rng, labels[name]).save(folder / "img_align_celeba" / name, quality=95)

    # The official files' exact shape: values right-aligned in 2-character columns.
    rows = [f"{name} " + " ".join(f"{1 if v else -1:2d}" for v in attrs.values())
            for name, attrs in labels.items()]
    (folder / "list_attr_celeba.txt").write_text(
        f"{n}\n" + " ".join(ATTRIBUTES) + " \n" + "\n".join(rows) + "\n")
    (folder / "list_eval_partition.txt").write_text(
        "".join(f"{name} {p}\n" for name, p in partition.items()))
    return {"attributes": list(ATTRIBUTES), "labels": labels, "partition": partition}
