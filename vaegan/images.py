"""Images in every form a user has them, and image grids out.

    as_image_batch(images, channels, size)  tensors, arrays, PIL images, files, lists of them
                                            -> (B, C, S, S) float32 in [-1, 1], checked
    grid_image(images, nrow)                (B, C, H, W) in [-1, 1] -> one PIL image grid
    save_grid(images, path, nrow)           the same, written as a PNG

Bad input raises `ModelError` saying what the model takes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from vaegan.artifact import ModelError

RANGE_SLACK = 1e-3  # float images may exceed [-1, 1] by rounding error, not more

# What the image arguments accept (see `as_image_batch`).
ImagesLike = Union[torch.Tensor, np.ndarray, "PIL.Image.Image", str, os.PathLike, list, tuple]  # noqa: F821


def describe_input(channels: int, size: int) -> str:
    kind = {1: "grey", 3: "RGB"}.get(channels, f"{channels}-channel")
    return f"this model takes {kind} {size}x{size} images ({channels}x{size}x{size})"


def _open_image(item: Any, channels: int):
    """A path or PIL image -> a uint8 HWC array in the model's mode (L or RGB): a file's own
    mode (palette, RGBA, grey) is a storage detail, so it is converted, not refused."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            raise ModelError(f"image file {str(path)!r} does not exist")
        try:
            with Image.open(path) as img:
                img.load()
                item = img.copy()
        except (UnidentifiedImageError, OSError) as e:
            raise ModelError(f"{str(path)!r} is not a readable image ({e})") from None
    arr = np.asarray(item.convert("L" if channels == 1 else "RGB"))
    return arr if arr.ndim == 3 else arr[:, :, None]


def _is_image_object(item: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return isinstance(item, (str, os.PathLike))
    return isinstance(item, (str, os.PathLike, Image.Image))


def _to_tensor(arr: Any) -> torch.Tensor:
    """A tensor or array of one image or a batch -> (B, ?, ?, ?) float tensor, pixels scaled
    from 0..255 when the dtype is uint8."""
    if isinstance(arr, np.ndarray):
        if arr.dtype == object:
            raise ModelError("images must be a regular numeric array; got a ragged (object) array")
        arr = torch.from_numpy(np.ascontiguousarray(arr) if arr.flags.writeable else arr.copy())
    elif not isinstance(arr, torch.Tensor):
        try:
            arr = torch.as_tensor(np.asarray(arr, dtype=np.float32))
        except (ValueError, TypeError) as e:
            raise ModelError(f"images of type {type(arr).__name__} are not allowed ({e}); pass tensors, "
                             "numpy arrays, PIL images or file paths") from None
    x = arr.detach().cpu()
    if x.dtype == torch.uint8:
        x = x.float() / 127.5 - 1.0  # 0..255 -> [-1, 1], as the data reader scales them
    elif x.dtype.is_floating_point:
        x = x.float()
    else:
        raise ModelError(f"images of dtype {x.dtype} are not allowed; pass uint8 (0..255) or float "
                         "values in [-1, 1]")
    if x.ndim == 2:
        x = x[None]  # (H, W): one grey image
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ModelError(f"images must be (C, H, W), (H, W, C) or a batch of them; got shape "
                         f"{tuple(arr.shape)}")
    return x


def _channels_first(x: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """(B, C, H, W) or (B, H, W, C) -> (B, C, H, W), or a ModelError naming what is wrong."""
    a, b, c = x.shape[1:]
    if a == channels and b == c:
        layout = "chw"
    elif c == channels and a == b:
        layout = "hwc"
    elif a in (1, 3, 4) and c not in (1, 3, 4):
        layout = "chw"
    elif c in (1, 3, 4):
        layout = "hwc"
    else:
        raise ModelError(f"images must be C x H x W or H x W x C; got shape {tuple(x.shape[1:])}; "
                         f"{describe_input(channels, size)}")
    if layout == "hwc":
        x = x.permute(0, 3, 1, 2)
    got_c, got_h, got_w = x.shape[1:]
    if got_c != channels:
        raise ModelError(f"images have {got_c} channel(s); {describe_input(channels, size)}")
    if (got_h, got_w) != (size, size):
        raise ModelError(f"images are {got_h}x{got_w}; {describe_input(channels, size)} (resize them first)")
    return x


def check_values(x: torch.Tensor, what: str = "image values") -> None:
    if not bool(torch.isfinite(x).all()):
        raise ModelError(f"{what} contain NaN or infinite numbers")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1 - RANGE_SLACK or hi > 1 + RANGE_SLACK:
        raise ModelError(f"{what} must be in [-1, 1]; got min {lo:.4g}, max {hi:.4g} (pass uint8 arrays "
                         "for 0..255 pixels, or scale them with x / 127.5 - 1)")


def as_image_batch(images: ImagesLike, channels: int, size: int) -> torch.Tensor:
    """Anything image-like -> (B, channels, size, size) float32 in [-1, 1] on the CPU.

    Accepted: float tensors/arrays in [-1, 1] and uint8 arrays/tensors (0..255), each one image
    or a batch, channels first (C, H, W) or last (H, W, C); PIL images and image file paths
    (converted to the model's grey/RGB mode); or a list of any of these. Wrong sizes, channel
    counts, NaN and out-of-range values raise ModelError.
    """
    if isinstance(images, (list, tuple)) and images and all(
            _is_image_object(i) or isinstance(i, (np.ndarray, torch.Tensor)) for i in images):
        parts = [as_image_batch(i, channels, size) for i in images]
        return torch.cat(parts)
    if isinstance(images, (list, tuple)) and not images:
        raise ModelError("no images given")
    if _is_image_object(images):
        images = _open_image(images, channels)
    x = _channels_first(_to_tensor(images), channels, size)
    if x.shape[0] == 0:
        raise ModelError("no images given (a batch of 0)")
    check_values(x)
    return x.clamp(-1, 1).contiguous()


# ---------------------------------------------------------------------------------------
# Grids: what the training run logs to MLflow and what `vaegan models ...` writes.


def grid_image(images: torch.Tensor, nrow: int = 8):
    """Images (B, C, H, W) in [-1, 1] -> one PIL image (torchvision make_grid, white padding),
    `nrow` images per row; grey images give a grey (mode L) grid."""
    from PIL import Image
    from torchvision.utils import make_grid

    x = ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)
    grid = make_grid(x, nrow=max(1, nrow), padding=2, pad_value=1.0)  # always 3 channels
    arr = grid.mul(255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr[:, :, 0] if x.shape[1] == 1 else arr)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> Path:
    """`grid_image` written as a PNG file (its folder created); -> the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(images, nrow).save(path, format="PNG")
    return path
