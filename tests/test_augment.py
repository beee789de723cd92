"""Differentiable augmentation of Dis's inputs (vaegan.augment, loss.augment)."""

import pytest
import torch
import torch.nn.functional as F

from vaegan.augment import augment, cutout, translation
from vaegan.config import ConfigError, load_config


def images(n=6, c=1, size=16, seed=0):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def shifted(x, dy, dx):
    """x moved down dy and right dx, zeros where it uncovers (the definition)."""
    h, w = x.shape[-2:]
    p = F.pad(x, [abs(dx), abs(dx), abs(dy), abs(dy)])
    return p[..., abs(dy) - dy:abs(dy) - dy + h, abs(dx) - dx:abs(dx) - dx + w]


def test_translation_is_a_shift_of_at_most_an_eighth_with_zeros_uncovered():
    x = images()
    out = translation(x, paired=0, generator=torch.Generator().manual_seed(1))
    found = []
    for i in range(len(x)):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(out[i], shifted(x[i], dy, dx))]
        assert matches, f"image {i} is no shift of at most 2 of its input"
        found.append(matches[0])
    assert len(set(found)) > 1, "every image got the same shift"


def test_cutout_zeroes_one_half_size_square_and_keeps_the_rest():
    x = images(n=8, size=16) * 0.5 + 0.6  # no zeros of its own
    out = cutout(x, paired=0, generator=torch.Generator().manual_seed(2))
    for i in range(len(x)):
        zero = out[i, 0] == 0
        rows, cols = zero.any(dim=1).nonzero().flatten(), zero.any(dim=0).nonzero().flatten()
        assert 0 < zero.sum() <= 64
        assert zero.sum() == len(rows) * len(cols), "the zeros form one rectangle"
        assert len(rows) <= 8 and len(cols) <= 8  # half the side, less where it hangs over
        assert torch.equal(out[i, 0][~zero], x[i, 0][~zero])


def test_paired_images_get_the_same_draws_and_the_others_their_own():
    x, y = images(n=4, c=3, seed=1), images(n=4, c=3, seed=2)
    policy = ("color", "translation", "cutout")
    out = augment(torch.cat([x, x, y]), policy, paired=4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out[:4], out[4:8]), "an input and its reconstruction are transformed alike"
    alone = augment(torch.cat([y, y]), policy, paired=0, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(alone[:4], alone[4:]), "unpaired images draw their own transforms"


def test_gradients_flow_through_every_transform():
    x = images(n=2, c=3, size=8).double().requires_grad_()
    policy = ("color", "translation", "cutout")
    assert torch.autograd.gradcheck(
        lambda t: augment(t, policy, paired=1, generator=torch.Generator().manual_seed(4)), (x,))


def test_the_policy_is_checked_by_name():
    cfg = load_config("debug", overrides=["loss.augment=translation, cutout"])
    assert cfg.loss.augment_policy == ("translation", "cutout")
    plus = load_config("debug", overrides=["loss.augment=color+cutout"])  # a sweep grid's form
    assert plus.loss.augment_policy == ("color", "cutout")
    with pytest.raises(ConfigError, match=r"loss.augment='flip' is not allowed.*translation \| cutout"):
        load_config("debug", overrides=["loss.augment=translation,flip"])
    with pytest.raises(ValueError, match="'flip'"):
        augment(images(), ("flip",))
    with pytest.raises(ConfigError, match="loss.adversarial_warmup=-1"):
        load_config("debug", overrides=["loss.adversarial_warmup=-1"])
