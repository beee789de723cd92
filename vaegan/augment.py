"""Differentiable augmentation of the discriminator's inputs (loss.augment).

DiffAugment (Zhao et al., NeurIPS 2020): with little data a discriminator memorises the real
images and its gradient stops guiding the generator. Transforming every image Dis sees, real
and generated alike, with transforms the gradient passes through, keeps Dis from that
without teaching the generator to produce transformed images (the generator's gradient flows
back through the same transform). Policies, each drawn per image:

    translation  shift by up to 1/8 of the side in x and y, the uncovered border set to 0
                 (mid-grey in [-1, 1])
    cutout       a square of half the side, at a random place, set to 0
    color        brightness + U(-0.5, 0.5), saturation x U(0, 2) (colour images),
                 contrast x U(0.5, 1.5) about the image mean

VAE/GAN specifics: Dis_l of a reconstruction is compared with Dis_l of its input, so an
input and its reconstruction get the same transform (`paired`: the first `paired` images
and the next `paired` share their draws); the prior samples get their own. Single device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _draw(shape: tuple[int, ...], paired: int, generator: torch.Generator | None, device,
          low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """U(low, high) per image, the images [paired:2*paired] taking the draws of [:paired]."""
    n = shape[0]
    u = torch.rand((n - paired, *shape[1:]), generator=generator, device=device)
    u = torch.cat([u[:paired], u]) if paired else u
    return low + (high - low) * u


def translation(x: torch.Tensor, paired: int, generator=None, ratio: float = 0.125) -> torch.Tensor:
    b, _, h, w = x.shape
    sh, sw = max(1, int(h * ratio + 0.5)), max(1, int(w * ratio + 0.5))
    dy = (_draw((b, 1, 1), paired, generator, x.device) * (2 * sh + 1)).long().clamp(max=2 * sh)
    dx = (_draw((b, 1, 1), paired, generator, x.device) * (2 * sw + 1)).long().clamp(max=2 * sw)
    padded = F.pad(x, [sw, sw, sh, sh])  # zeros around: what a shift uncovers
    rows = torch.arange(h, device=x.device).view(1, h, 1) + dy  # (B, H, 1), offset into the padding
    cols = torch.arange(w, device=x.device).view(1, 1, w) + dx  # (B, 1, W)
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    # Advanced indices on dims 0, 2, 3 put them first: (B, H, W, C) -> back to (B, C, H, W).
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, paired: int, generator=None, ratio: float = 0.5) -> torch.Tensor:
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    # The square's first row and column; it may hang over the border (DiffAugment's range).
    top = (_draw((b, 1, 1), paired, generator, x.device) * (h + 1 - ch % 2)).long() - ch // 2
    left = (_draw((b, 1, 1), paired, generator, x.device) * (w + 1 - cw % 2)).long() - cw // 2
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (ys >= top) & (ys < top + ch) & (xs >= left) & (xs < left + cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def color(x: torch.Tensor, paired: int, generator=None) -> torch.Tensor:
    b = x.shape[0]
    x = x + _draw((b, 1, 1, 1), paired, generator, x.device, -0.5, 0.5).to(x.dtype)
    if x.shape[1] > 1:
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * _draw((b, 1, 1, 1), paired, generator, x.device, 0.0, 2.0).to(x.dtype) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * _draw((b, 1, 1, 1), paired, generator, x.device, 0.5, 1.5).to(x.dtype) + mean


_FUNCS = {"color": color, "translation": translation, "cutout": cutout}  # applied in this order


def augment(x: torch.Tensor, policy: tuple[str, ...], paired: int = 0,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """x (B, C, H, W) through the policy's transforms (names of config.AUGMENTATIONS), in
    DiffAugment's order: color, translation, cutout; images [paired:2*paired] get the same
    draws as [:paired]."""
    unknown = set(policy) - set(_FUNCS)
    if unknown:
        raise ValueError(f"unknown augmentation {sorted(unknown)[0]!r}; allowed: {', '.join(_FUNCS)}")
    for name, transform in _FUNCS.items():
        if name in policy:
            x = transform(x, paired, generator)
    return x
